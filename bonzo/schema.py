"""Declare a plugin's ``[plugins.<name>]`` table once; get its validation,
its error messages and its documentation from the declaration.

::

    from bonzo import hookimpl
    from bonzo.schema import Key, Schema

    SCHEMA = Schema(
        Key("path", "path", default="journal.log", doc="The journal file."),
        Key("level", "choice", default="info", choices=("info", "debug"), doc="How much."),
        Key("max_lines", "int", default=1000, minimum=1, doc="Lines kept."),
        Key("networks", "networks", default=[], doc="Clients written down."),
        Key("password", "secret", required=True, doc="The journal's password."),
    )

    class Journal:
        @hookimpl
        def bonzo_configure(self, config, app):
            self.options = SCHEMA.parse(config, app)   # a dict, every key present

A problem is a :class:`ValueError` naming the key (``max_lines: expected
an integer >= 1, got 0``; ``levle: unknown key (did you mean 'level'?)``),
which Bonzo reports as ``<file>: plugins.<name>: <message>`` — the same
one-line form as the core's own errors. :meth:`Schema.rst` writes the keys
as reStructuredText for the plugin's documentation, :meth:`Schema.toml` a
commented example table.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Key", "Schema", "KINDS"]

#: The kinds of value a :class:`Key` may declare.
KINDS = (
    "str",
    "bool",
    "int",
    "float",
    "duration",
    "path",
    "choice",
    "strings",
    "network",
    "networks",
    "secret",
    "table",
)

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_MISSING: Any = object()


def _describe(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Key:
    """One key of a plugin's table.

    :arg name: the key.
    :arg kind: one of :data:`KINDS`: ``str`` (non-empty), ``bool`` (a TOML
        boolean), ``int``, ``float`` (an int is taken), ``duration`` (seconds,
        or ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``; gives a float),
        ``path`` (relative to the configuration file; gives a
        :class:`~pathlib.Path`), ``choice`` (one of ``choices``), ``strings``
        (a list of non-empty strings), ``network`` / ``networks`` (CIDR, one
        or a list; gives :mod:`ipaddress` networks), ``secret`` (a string,
        typically ``{ "$env" = ... }`` or ``{ "$file" = ... }`` in the
        file; never shown in an error), ``table`` (any TOML table).
    :arg default: the value when the key is absent (not checked, so it may
        be ``None``); without one the key is optional and absent means
        ``None``, unless ``required``.
    :arg required: the key must be given.
    :arg minimum, maximum: bounds of an ``int``, ``float`` or ``duration``.
    :arg choices: the values of a ``choice``.
    :arg doc: one or two sentences for the documentation.
    """

    name: str
    kind: str = "str"
    default: Any = _MISSING
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: Sequence[str] = ()
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"{self.name}: a choice needs choices")

    def parse(self, value: Any, base_dir: Path | None) -> Any:
        """``value`` checked and converted; :class:`ValueError` naming the key."""
        kind, name = self.kind, self.name
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{name}: expected true or false, got {_describe(value)}")
            return value
        if kind in ("str", "secret"):
            if not isinstance(value, str) or not value.strip():
                shown = "a value" if kind == "secret" else _describe(value)
                raise ValueError(f"{name}: expected a non-empty string, got {shown}")
            return value
        if kind == "choice":
            if value not in self.choices:
                raise ValueError(
                    f"{name}: expected one of {', '.join(map(repr, self.choices))}, "
                    f"got {_describe(value)}"
                )
            return value
        if kind in ("int", "float", "duration"):
            return self._number(value)
        if kind == "path":
            if not isinstance(value, str) or not value or "\0" in value:
                raise ValueError(f"{name}: expected a path, got {_describe(value)}")
            path = Path(value).expanduser()
            if not path.is_absolute():
                path = (base_dir or Path.cwd()) / path
            return Path(os.path.abspath(path))
        if kind == "strings":
            if not isinstance(value, list) or not all(
                isinstance(v, str) and v.strip() for v in value
            ):
                raise ValueError(
                    f"{name}: expected a list of non-empty strings, got {_describe(value)}"
                )
            return list(value)
        if kind in ("network", "networks"):
            items = value if kind == "networks" else [value]
            if kind == "networks" and not isinstance(value, list):
                raise ValueError(f"{name}: expected a list of networks, got {_describe(value)}")
            out = []
            for item in items:
                try:
                    # Strict: host bits set after the prefix length are a typo.
                    out.append(ipaddress.ip_network(item, strict=True))
                except (TypeError, ValueError) as exc:
                    why = "; host bits set" if "host bits" in str(exc) else ""
                    raise ValueError(
                        f"{name}: expected a network such as 192.0.2.0/24, "
                        f"got {_describe(item)}{why}"
                    ) from None
            return out if kind == "networks" else out[0]
        # table
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}: expected a table, got {_describe(value)}")
        return dict(value)

    def _number(self, value: Any) -> float | int:
        name, kind = self.name, self.kind
        number: float | int
        if kind == "duration" and isinstance(value, str):
            match = _DURATION.fullmatch(value)
            if match is None:
                raise ValueError(
                    f'{name}: expected a duration such as 30, "30s", "5m", "4h" or "5d", '
                    f"got {_describe(value)}"
                )
            number = float(match.group(1)) * _UNITS[match.group(2)]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            what = {"int": "an integer", "float": "a number", "duration": "a duration"}[kind]
            raise ValueError(f"{name}: expected {what}, got {_describe(value)}")
        elif kind == "int" and not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {_describe(value)}")
        else:
            number = value if kind == "int" else float(value)
        what = "an integer" if kind == "int" else "a number"
        if self.minimum is not None and number < self.minimum:
            raise ValueError(f"{name}: expected {what} >= {self.minimum:g}, got {_describe(value)}")
        if self.maximum is not None and number > self.maximum:
            raise ValueError(f"{name}: expected {what} <= {self.maximum:g}, got {_describe(value)}")
        return number

    @property
    def type_text(self) -> str:
        """The kind, for people."""
        return {
            "str": "string",
            "bool": "boolean",
            "int": "integer",
            "float": "number",
            "duration": 'duration (seconds, or "30s", "5m", "4h", "5d")',
            "path": "string (a path, relative to the configuration file)",
            "choice": "one of " + ", ".join(f'``"{c}"``' for c in self.choices),
            "strings": "list of strings",
            "network": "string (a network, e.g. ``192.0.2.0/24``)",
            "networks": "list of networks",
            "secret": 'string (best given as ``{ "$env" = "NAME" }`` or ``{ "$file" = "path" }``)',
            "table": "table",
        }[self.kind]


@dataclass(frozen=True)
class Schema:
    """The keys of one plugin's table (see the module description)."""

    keys: tuple[Key, ...] = field(default=())

    def __init__(self, *keys: Key) -> None:
        names = [k.name for k in keys]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"keys declared twice: {', '.join(sorted(duplicates))}")
        object.__setattr__(self, "keys", tuple(keys))

    @property
    def names(self) -> list[str]:
        return [k.name for k in self.keys]

    def parse(self, config: Mapping[str, Any] | None, app: Any = None) -> dict[str, Any]:
        """Check ``config`` (the plugin's table; ``None`` is empty) and return
        every declared key's value, converted, defaults filled in. Relative
        paths are taken from ``app.base_dir``. Raises :class:`ValueError`
        naming the first problem's key."""
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a table, got {_describe(config)}")
        names = self.names
        for given in config:
            if given not in names:
                close = difflib.get_close_matches(str(given), names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(names)}"
                raise ValueError(f"{given}: unknown key ({hint})")
        base = getattr(app, "base_dir", None) if app is not None else None
        base_dir = Path(base) if base is not None else None
        out: dict[str, Any] = {}
        for key in self.keys:
            if key.name in config:
                out[key.name] = key.parse(config[key.name], base_dir)
            elif key.required:
                raise ValueError(f"{key.name}: required")
            elif key.default is _MISSING:
                out[key.name] = None
            elif key.kind == "path" and isinstance(key.default, str):
                out[key.name] = key.parse(key.default, base_dir)
            else:
                out[key.name] = key.default
        return out

    def rst(self) -> str:
        """The keys as a reStructuredText definition list (for a README)."""
        blocks = []
        for key in self.keys:
            facts = [key.type_text]
            if key.required:
                facts.append("required")
            elif key.default is not _MISSING and key.default is not None:
                facts.append(f"default ``{_toml(key.default)}``")
            head = f"``{key.name}``\n    *{'*, *'.join(facts)}*."
            blocks.append(head + (f" {key.doc}" if key.doc else ""))
        return "\n\n".join(blocks) + "\n"

    def toml(self, table: str) -> str:
        """A commented example ``[table]`` with every key and its default."""
        lines = [f"# [{table}]"]
        for key in self.keys:
            if key.default is not _MISSING and key.default is not None:
                value = _toml(key.default)
            elif key.kind == "secret":
                value = '{ "$env" = "NAME" }'
            else:
                value = '""' if key.kind in ("str", "path", "choice", "network") else "..."
            lines.append(f"# {key.name} = {value}")
        return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)

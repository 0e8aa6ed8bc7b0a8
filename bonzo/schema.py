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
import os
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol import parse_address, parse_domain
from .proxy import network
from .settings import finite_number, path_too_long

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
    "size",
    "address",
    "addresses",
    "domain",
    "domains",
    "table",
    "tables",
)

_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"\s*([0-9]+)\s*([KMG]?)(?:i?B)?\s*", re.I)
_MISSING: Any = object()


def _join(name: str, message: str) -> str:
    """``name: message``, or ``name[0].key: ...`` for a nested key's message."""
    return f"{name}{message}" if message.startswith(("[", ".")) else f"{name}: {message}"


def _bound(number: float) -> str:
    """A bound as people write it: ``1``, ``0.5``, ``315360000`` (never ``3.2e+08``)."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


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
        file; never shown in an error), ``size`` (octets, or ``"512K"``,
        ``"25M"``, ``"1G"``: powers of 1024; gives an int), ``address`` /
        ``addresses`` (a mailbox, one or a list, checked as a client's
        ``RCPT TO`` is; gives :class:`~bonzo.address.Address` objects, to
        match on their ``canonical`` form), ``domain`` / ``domains`` (one or
        a list; gives canonical domains: lower-case, IDNA A-labels, as
        :attr:`Address.domain <bonzo.address.Address.domain>`), ``table`` (a TOML
        table: any, or checked by ``schema``, or — with ``each`` — a table
        of named tables each checked by ``each``), ``tables`` (an array of
        tables, each checked by ``schema``; gives a list of dicts).
    :arg default: the value when the key is absent (not checked, so it may
        be ``None``); without one the key is optional and absent means
        ``None``, unless ``required``. A ``path``, ``duration`` or ``size``
        default may be written as in the file (``"5d"``, ``"25M"``): it is
        converted.
    :arg required: the key must be given.
    :arg minimum, maximum: bounds of an ``int``, ``float``, ``duration``
        or ``size``.
    :arg choices: the values of a ``choice``.
    :arg schema: the keys of a ``table`` or of each of ``tables``.
    :arg each: the keys of each named table in a ``table``.
    :arg convert: a function applied to the checked value (a list's or
        table's items are checked first) for what no kind says — a domain,
        a reply, a header name; it returns the value to use or raises
        :class:`ValueError`, whose message is shown after the key's name.
    :arg doc: the documentation: one or more sentences, reStructuredText.

    A shape no kind describes (a value that may be a table or an array of
    tables, tables whose keys depend on their ``type``) is declared with a
    subclass that overrides :meth:`parse` (raising :class:`ValueError`
    that starts with the key's name) and :attr:`type_text` (and
    :attr:`sub_schema` to document nested keys), as the bundled ``queue``
    and ``dkim_sign`` plugins do.
    """

    name: str
    kind: str = "str"
    default: Any = _MISSING
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: Sequence[str] = ()
    schema: Schema | None = None
    each: Schema | None = None
    convert: Callable[[Any], Any] | None = field(default=None, compare=False)
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: unknown kind {self.kind!r} (one of {', '.join(KINDS)})")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"{self.name}: a choice needs choices")
        if self.kind == "tables" and self.schema is None:
            raise ValueError(f"{self.name}: tables need a schema")
        if (self.schema is not None or self.each is not None) and self.kind not in (
            "table",
            "tables",
        ):
            raise ValueError(f"{self.name}: only a table or tables have a schema")
        if self.schema is not None and self.each is not None:
            raise ValueError(f"{self.name}: give schema or each, not both")

    def parse(self, value: Any, base_dir: Path | None) -> Any:
        """``value`` checked and converted; :class:`ValueError` naming the key."""
        checked = self._parse(value, base_dir)
        if self.convert is None:
            return checked
        try:
            return self.convert(checked)
        except ValueError as exc:
            raise ValueError(_join(self.name, str(exc))) from None

    def _parse(self, value: Any, base_dir: Path | None) -> Any:
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
        if kind in ("int", "float", "duration", "size"):
            return self._number(value)
        if kind == "path":
            if not isinstance(value, str) or not value or "\0" in value:
                raise ValueError(f"{name}: expected a path, got {_describe(value)}")
            try:
                path = Path(value).expanduser()
            except RuntimeError:  # "~user" of no user
                raise ValueError(f"{name}: {_describe(value)}: no such user's home") from None
            if not path.is_absolute():
                path = (base_dir or Path.cwd()) / path
            path = Path(os.path.abspath(path))
            too_long = path_too_long(path)
            if too_long:
                raise ValueError(f"{name}: {too_long}")
            return path
        if kind == "strings":
            if not isinstance(value, list) or not all(
                isinstance(v, str) and v.strip() for v in value
            ):
                raise ValueError(
                    f"{name}: expected a list of non-empty strings, got {_describe(value)}"
                )
            return list(value)
        if kind in ("address", "addresses", "domain", "domains"):
            many = kind in ("addresses", "domains")
            check = parse_address if kind.startswith("address") else parse_domain
            if many and not isinstance(value, list):
                noun = "addresses" if kind == "addresses" else "domains"
                raise ValueError(f"{name}: expected a list of {noun}, got {_describe(value)}")
            found = []
            for i, item in enumerate(value if many else [value]):
                try:
                    found.append(check(item))
                except ValueError as exc:
                    where = f"{name}[{i}]" if many else name
                    raise ValueError(f"{where}: {exc}") from None
            return found if many else found[0]
        if kind in ("network", "networks"):
            items = value if kind == "networks" else [value]
            if kind == "networks" and not isinstance(value, list):
                raise ValueError(f"{name}: expected a list of networks, got {_describe(value)}")
            out = []
            for item in items:
                try:
                    if not isinstance(item, str):  # ip_network() takes 0 and True too
                        raise TypeError
                    # Strict: host bits set after the prefix length are a typo.
                    out.append(network(item))
                except (TypeError, ValueError) as exc:
                    why = "; host bits set" if "host bits" in str(exc) else ""
                    if "zone index" in str(exc):
                        why = "; a zone index (%...) is not supported"
                    raise ValueError(
                        f"{name}: expected a network such as 192.0.2.0/24, "
                        f"got {_describe(item)}{why}"
                    ) from None
            return out if kind == "networks" else out[0]
        if kind == "tables":
            assert self.schema is not None
            if not isinstance(value, list):
                raise ValueError(f"{name}: expected an array of tables, got {_describe(value)}")
            tables: list[dict[str, Any]] = []
            for i, item in enumerate(value):
                if not isinstance(item, Mapping):
                    raise ValueError(f"{name}[{i}]: expected a table, got {_describe(item)}")
                try:
                    tables.append(self.schema.parse(item, base_dir=base_dir))
                except ValueError as exc:
                    raise ValueError(f"{name}[{i}].{exc}") from None
            return tables
        # table
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}: expected a table, got {_describe(value)}")
        if self.schema is not None:
            try:
                return self.schema.parse(value, base_dir=base_dir)
            except ValueError as exc:
                raise ValueError(f"{name}.{exc}") from None
        if self.each is not None:
            named: dict[str, Any] = {}
            for sub, item in value.items():
                label = f'"{sub}"' if not re.fullmatch(r"[A-Za-z0-9_-]+", str(sub)) else sub
                if not isinstance(item, Mapping):
                    raise ValueError(f"{name}.{label}: expected a table, got {_describe(item)}")
                try:
                    named[sub] = self.each.parse(item, base_dir=base_dir)
                except ValueError as exc:
                    raise ValueError(f"{name}.{label}.{exc}") from None
            return named
        return dict(value)

    def _number(self, value: Any) -> float | int:
        name, kind = self.name, self.kind
        number: float | int
        if kind == "size" and isinstance(value, str):
            match = _SIZE.fullmatch(value)
            if match is None:
                raise ValueError(
                    f'{name}: expected a size such as 26214400 or "25M", got {_describe(value)}'
                )
            number = int(match.group(1)) * 1024 ** " KMG".index((match.group(2) or " ").upper())
        elif kind == "duration" and isinstance(value, str):
            match = _DURATION.fullmatch(value)
            if match is None:
                raise ValueError(
                    f'{name}: expected a duration such as 30, "30s", "5m", "4h" or "5d", '
                    f"got {_describe(value)}"
                )
            number = float(match.group(1)) * _UNITS[match.group(2)]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            what = {
                "int": "an integer",
                "float": "a number",
                "duration": "a duration",
                "size": "a size",
            }[kind]
            raise ValueError(f"{name}: expected {what}, got {_describe(value)}")
        elif kind in ("int", "size") and not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {_describe(value)}")
        elif not finite_number(value):
            number = value  # refused below, before float() overflows
        else:
            number = value if kind in ("int", "size") else float(value)
        what = {"int": "an integer", "size": "a size"}.get(kind, "a number")
        if not finite_number(number):
            # nan passes every comparison below; inf is no timeout or score.
            raise ValueError(f"{name}: expected a finite number, got {_describe(value)}")
        if self.minimum is not None and number < self.minimum:
            raise ValueError(
                f"{name}: expected {what} >= {_bound(self.minimum)}, got {_describe(value)}"
            )
        if self.maximum is not None and number > self.maximum:
            raise ValueError(
                f"{name}: expected {what} <= {_bound(self.maximum)}, got {_describe(value)}"
            )
        return number

    @property
    def type_text(self) -> str:
        """The kind, for people."""
        return {
            "str": "string",
            "bool": "boolean",
            "int": "integer",
            "float": "number",
            "duration": 'duration (seconds, or ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``)',
            "path": "string (a path, relative to the configuration file)",
            "choice": "one of " + ", ".join(f'``"{c}"``' for c in self.choices),
            "strings": "list of strings",
            "network": "string (a network, e.g. ``192.0.2.0/24``)",
            "networks": "list of networks",
            "address": "string (an address, e.g. ``user@example.org``)",
            "addresses": "list of addresses",
            "domain": "string (a domain, e.g. ``example.org``)",
            "domains": "list of domains",
            "secret": 'string (best given as ``{ "$env" = "NAME" }`` or ``{ "$file" = "path" }``)',
            "size": 'size (octets, or ``"512K"``, ``"25M"``, ``"1G"``)',
            "table": (
                "table with the keys below"
                if self.schema is not None
                else "table of named tables, each with the keys below"
                if self.each is not None
                else "table"
            ),
            "tables": "array of tables, each with the keys below",
        }[self.kind]

    @property
    def bounds_text(self) -> str:
        """The bounds of a number, for people (``"from 1 to 100"``,
        ``"at least 1"``); ``""`` without any."""
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            return f"from {_bound(low)} to {_bound(high)}"
        if low is not None:
            return f"at least {_bound(low)}"
        if high is not None:
            return f"at most {_bound(high)}"
        return ""

    @property
    def sub_schema(self) -> Schema | None:
        """The schema of a nested table (or of each nested table)."""
        return self.schema if self.schema is not None else self.each


@dataclass(frozen=True)
class Schema:
    """The keys of one plugin's table (see the module description).

    :arg keys: the :class:`Key` declarations, in documentation order.
    :arg exclusive: groups of keys of which at most one may be given
        (``("socket", "host")``: a Unix socket or a host, not both).
    :arg together: groups of keys given all or none
        (``("username", "password")``).
    :arg check: a function of the parsed values (a dict, every key present)
        for any other rule between keys; it raises :class:`ValueError`
        whose message starts with the key it blames.
    :arg notes: sentences for the documentation, after the keys (what
        ``check`` enforces, say).
    """

    keys: tuple[Key, ...] = field(default=())
    exclusive: tuple[tuple[str, ...], ...] = ()
    together: tuple[tuple[str, ...], ...] = ()
    check: Callable[[dict[str, Any]], None] | None = field(default=None, compare=False)
    notes: str = ""

    def __init__(
        self,
        *keys: Key,
        exclusive: Sequence[Sequence[str]] = (),
        together: Sequence[Sequence[str]] = (),
        check: Callable[[dict[str, Any]], None] | None = None,
        notes: str = "",
    ) -> None:
        names = [k.name for k in keys]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"keys declared twice: {', '.join(sorted(duplicates))}")
        for group in (*exclusive, *together):
            unknown = [n for n in group if n not in names]
            if unknown or len(group) < 2:
                raise ValueError(f"a group of keys must name declared keys: {tuple(group)}")
        object.__setattr__(self, "keys", tuple(keys))
        object.__setattr__(self, "exclusive", tuple(tuple(g) for g in exclusive))
        object.__setattr__(self, "together", tuple(tuple(g) for g in together))
        object.__setattr__(self, "check", check)
        object.__setattr__(self, "notes", notes)

    @property
    def names(self) -> list[str]:
        return [k.name for k in self.keys]

    def parse(
        self,
        config: Mapping[str, Any] | None,
        app: Any = None,
        *,
        base_dir: Path | None = None,
    ) -> dict[str, Any]:
        """Check ``config`` (the plugin's table; ``None`` is empty) and return
        every declared key's value, converted, defaults filled in. Relative
        paths are taken from ``app.base_dir`` (or ``base_dir``). Raises
        :class:`ValueError` naming the first problem's key."""
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a table, got {_describe(config)}")
        names = self.names
        for given in config:
            if given not in names:
                close = difflib.get_close_matches(str(given), names, n=1)
                if close:
                    hint = f"did you mean {close[0]!r}?"
                elif names:
                    hint = f"known: {', '.join(names)}"
                else:
                    hint = "this table takes no keys"
                raise ValueError(f"{given}: unknown key ({hint})")
        for group in self.exclusive:
            present = [n for n in group if n in config]
            if len(present) > 1:
                raise ValueError(
                    f"{present[-1]}: give {' or '.join(group)}, not {' and '.join(present)}"
                )
        for group in self.together:
            present = [n for n in group if n in config]
            if present and len(present) < len(group):
                missing = next(n for n in group if n not in config)
                raise ValueError(f"{missing}: required with {present[0]}")
        if base_dir is None and app is not None:
            base = getattr(app, "base_dir", None)
            base_dir = Path(base) if base is not None else None
        out: dict[str, Any] = {}
        for key in self.keys:
            if key.name in config:
                out[key.name] = key.parse(config[key.name], base_dir)
            elif key.required:
                raise ValueError(f"{key.name}: required")
            elif key.default is _MISSING:
                out[key.name] = None
            elif key.kind in ("path", "duration", "size") and isinstance(key.default, str):
                # Written as in the file ("journal.log", "5d", "25M"): converted.
                out[key.name] = key.parse(key.default, base_dir)
            else:
                out[key.name] = key.default
        if self.check is not None:
            self.check(out)
        return out

    def rst(self, width: int = 76) -> str:
        """The keys as a reStructuredText definition list (for a README),
        nested tables' keys indented under theirs, lines wrapped at ``width``."""
        if not self.keys:
            return "The table has no keys.\n"
        blocks = []
        for key in self.keys:
            facts = [key.type_text[0].upper() + key.type_text[1:]]
            bounds = key.bounds_text
            if bounds:
                facts.append(bounds)
            if key.required:
                facts.append("required")
            elif key.default is not _MISSING and key.default is not None:
                facts.append(f"default ``{_toml(key.default)}``")
            text = "; ".join(facts) + "." + (f" {key.doc}" if key.doc else "")
            body = _wrap(text, width - 4, "    ")
            block = f"``{key.name}``\n{body}"
            sub = key.sub_schema
            if sub is not None:
                block += "\n\n" + textwrap.indent(sub.rst(width - 4).rstrip("\n"), "    ")
            blocks.append(block)
        rules = []
        for group in self.exclusive:
            rules.append(f"At most one of {', '.join(f'``{n}``' for n in group)}.")
        for group in self.together:
            rules.append(f"{' and '.join(f'``{n}``' for n in group)} go together.")
        if self.notes:
            rules.append(self.notes)
        if rules:
            blocks.append(_wrap(" ".join(rules), width, ""))
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
                value = (
                    '""'
                    if key.kind in ("str", "path", "choice", "network", "address", "domain")
                    else "..."
                )
            lines.append(f"# {key.name} = {value}")
        return "\n".join(lines) + "\n"


def _wrap(text: str, width: int, indent: str) -> str:
    # An inline literal (``550 5.7.1``) is never split across lines.
    text = re.sub(r"``.+?``", lambda m: m.group(0).replace(" ", "\0"), text)
    return textwrap.fill(
        text,
        width=width + len(indent),
        initial_indent=indent,
        subsequent_indent=indent,
        break_on_hyphens=False,
        break_long_words=False,
    ).replace("\0", " ")


def _toml_key(key: Any) -> str:
    text = str(key)
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else _toml(text)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{_toml_key(k)} = {_toml(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }" if value else "{}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)

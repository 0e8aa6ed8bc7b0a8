"""Key declarations (:mod:`bonzo.schema`) the queue's tables share, and the
two shapes no kind of :mod:`bonzo.schema` has: a value that is an integer
or a string (``mode``), and a table of named tables whose keys depend on
their ``type`` (routes and transports).

Private to the ``queue`` plugin.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonzo.schema import Key, Schema

from .._config import describe

__all__ = [
    "Value",
    "ByType",
    "type_key",
    "mode",
    "positive",
    "under_ten_years",
    "TEN_YEARS",
    "label",
]

#: The longest duration the queue takes (a typo guard).
TEN_YEARS = 10 * 365 * 86400


def label(name: Any) -> str:
    """A key of a table as a dotted key shows it: quoted unless a bare key."""
    return str(name) if re.fullmatch(r"[A-Za-z0-9_-]+", str(name)) else f'"{name}"'


def _join(name: str, message: str) -> str:
    return f"{name}{message}" if message.startswith(("[", ".")) else f"{name}: {message}"


@dataclass(frozen=True)
class Value(Key):
    """A key whose value may be of several TOML types; ``convert`` alone
    checks it. ``shown`` is its type for the documentation."""

    shown: str = ""

    def parse(self, value: Any, base_dir: Path | None) -> Any:
        assert self.convert is not None
        try:
            return self.convert(value)
        except ValueError as exc:
            raise ValueError(_join(self.name, str(exc))) from None

    @property
    def type_text(self) -> str:
        return self.shown


@dataclass(frozen=True)
class ByType(Key):
    """A table of named tables, each with a ``type`` that picks its keys:
    ``types`` holds one ``table`` :class:`~bonzo.schema.Key` per type (its
    name the type, its ``schema`` the keys, its ``doc`` what the type is).
    With ``names``, an entry may instead be a string (the name of a
    transport, checked by the caller). The parsed value is a dict of the
    parsed tables (and names). Errors name the whole dotted key:
    ``transports.relay.port: ...``."""

    types: tuple[Key, ...] = ()
    names: bool = False
    #: Document the types' keys under this key (the other user says "as in ...").
    document: bool = True
    shown: str = ""

    @property
    def schemas(self) -> dict[str, Schema]:
        return {k.name: k.schema for k in self.types if k.schema is not None}

    def parse(self, value: Any, base_dir: Path | None) -> Any:
        name = self.name
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}: expected a table, got {describe(value)}")
        schemas = self.schemas
        known = ", ".join(schemas)
        out: dict[str, Any] = {}
        for sub, item in value.items():
            where = f"{name}.{label(sub)}"
            if self.names and isinstance(item, str):
                if not item.strip():
                    raise ValueError(f"{where}: expected the name of a transport, got ''")
                out[sub] = item
                continue
            if not isinstance(item, Mapping):
                what = "a table with a type" + (" or a transport's name" if self.names else "")
                raise ValueError(f"{where}: expected {what}, got {describe(item)}")
            kind = item.get("type")
            schema = schemas.get(kind) if isinstance(kind, str) else None
            if schema is None:
                if "type" not in item:
                    raise ValueError(f"{where}.type: required (one of {known})")
                raise ValueError(f"{where}.type: expected one of {known}, got {describe(kind)}")
            try:
                out[sub] = schema.parse(item, base_dir=base_dir)
            except ValueError as exc:
                raise ValueError(f"{where}.{exc}") from None
        return out

    @property
    def type_text(self) -> str:
        return self.shown

    @property
    def sub_schema(self) -> Schema | None:
        return Schema(*self.types) if self.document else None


def type_key(kind: str) -> Key:
    """The ``type`` key of the sub-schema of type ``kind``."""
    return Key("type", "choice", choices=(kind,), required=True, doc="The type.")


def mode(value: Any) -> int:
    """Permission bits of files, given as an integer (``0o600``) or an octal
    string (``"0600"``, ``"0o600"``): the owner reads and writes, nobody
    else writes."""
    if isinstance(value, str):
        try:
            value = int(value.strip().removeprefix("0o"), 8)
        except ValueError:
            raise ValueError(f"expected an octal string such as '0600', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"expected permission bits such as 0o600, got {describe(value)}")
    if value & 0o600 != 0o600 or value & 0o002:
        raise ValueError(f"the owner must read and write, and nobody else write: {oct(value)}")
    return value


def positive(value: float) -> float:
    """A duration or number of seconds above zero."""
    if value <= 0:
        raise ValueError(f"expected a positive duration, got {value:g}")
    return float(value)


def under_ten_years(zero: bool = False) -> Callable[[float], float]:
    """A check of a duration: positive (or zero, with ``zero``) and under
    :data:`TEN_YEARS`."""

    def check(value: float) -> float:
        if not (0 <= value if zero else 0 < value) or not value < TEN_YEARS:
            raise ValueError(f"expected a positive duration under ten years, got {value:g}")
        return float(value)

    return check

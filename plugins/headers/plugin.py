"""Add and remove message headers once the message has arrived."""

from __future__ import annotations

import asyncio
import string
from collections.abc import Awaitable, Mapping
from typing import Any

from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session, safe_text

from .._config import describe

__all__ = ["HeadersPlugin", "sanitize"]

PLACEHOLDERS = ("session_id", "message_id", "remote_ip", "helo")
TRACE_HEADER = ("X-Bonzo-Plugin", "headers")
#: RFC 5322 2.1.1: a line is at most 998 characters, CRLF excluded.
MAX_LINE = 998
#: RFC 5321 4.4: a Received: line must never be changed or deleted.
PROTECTED = ("received",)


def sanitize(text: str | None, limit: int = 255) -> str:
    """Client-supplied text reduced to ``[A-Za-z0-9.-_:[]]`` (others become
    ``?``), at most ``limit`` characters, so it can never break a header."""
    if not text:
        return "unknown"
    return safe_text(text, limit)


def _check_name(name: Any, where: str) -> str:
    """``name`` if it is a header name; else :class:`ValueError` (``where``
    is the message's start: ``: `` or ``.X-Name: ``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}expected a header name, got {describe(name)}")
    if not all(33 <= ord(c) <= 126 and c != ":" for c in name) or len(name) > 76:
        raise ValueError(
            f"{where}{describe(name)} is not a valid header name "
            "(printable ASCII without ':' or spaces, at most 76 characters)"
        )
    return name


def _check_template(name: str, value: Any) -> str:
    where = f".{name}"
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {describe(value)}")
    if not all(c == "\t" or 32 <= ord(c) <= 126 for c in value):
        raise ValueError(
            f"{where}: the value must be printable ASCII on one line (no CR, LF or control "
            "characters)"
        )
    try:
        fields = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc} (write a literal brace as '{{{{' or '}}}}')") from None
    for _, field, spec, conversion in fields:
        if field is None:
            continue
        if field not in PLACEHOLDERS or spec or conversion:
            raise ValueError(
                f"{where}: unknown placeholder {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} (known: "
                + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                + ")"
            )
    if len(name) + 2 + len(value) > MAX_LINE:
        raise ValueError(f"{where}: the header line would exceed {MAX_LINE} characters")
    return value


def _adds(table: dict[str, Any]) -> dict[str, str]:
    """The ``add`` table checked: header names and templates."""
    for name, value in table.items():
        clean = isinstance(name, str) and name.isascii() and name.isprintable()
        _check_name(name, f".{name}: " if clean else f".{name!r}: ")
        _check_template(name, value)
    return table


def _removes(names: list[str]) -> list[str]:
    """The ``remove`` list checked: header names, never a trace header."""
    for name in names:
        _check_name(name, "")
        if name.lower() in PROTECTED:
            raise ValueError(
                f"{name} headers are trace headers and must not be removed (RFC 5321 4.4)"
            )
    return names


#: The ``[plugins.headers]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("add", "table", default={}, convert=_adds,
        doc="Header name → value, added in this order. Names are printable ASCII "
        "without spaces or ``:`` (at most 76 characters); values are printable "
        "ASCII on one line (no CR, LF or other control characters) and may use "
        "the placeholders ``{session_id}``, ``{message_id}``, ``{remote_ip}`` "
        "and ``{helo}`` (and no others); the header line may be at most 998 "
        "characters."),
    Key("remove", "strings", default=[], convert=_removes,
        doc="Names of the headers to remove (not ``Received``)."),
    Key("trace", "bool", default=False,
        doc="Also add ``X-Bonzo-Plugin: headers``, to show that the plugin ran."),
)  # fmt: skip
KEYS = tuple(SCHEMA.names)


class HeadersPlugin:
    """Removes, then adds, the configured headers on every message."""

    def __init__(self) -> None:
        self.add: list[tuple[str, str]] = []
        self.remove: list[str] = []
        self.trace = False

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate the ``[plugins.headers]`` table."""
        values = SCHEMA.parse(config, app)
        self.add = list(values["add"].items())
        self.remove = list(values["remove"])
        self.trace = values["trace"]

    def render(self, name: str, template: str, session: Session, envelope: Envelope) -> str:
        """The value of header ``name``: ``template`` with its placeholders filled."""
        value = template.format(
            session_id=sanitize(session.id, 64),
            message_id=sanitize(envelope.id, 64),
            remote_ip=sanitize(session.remote_ip, 64),
            helo=sanitize(session.helo),
        )
        return value[: MAX_LINE - len(name) - 2]

    def edit(self, session: Session, envelope: Envelope) -> None:
        """Remove, then add, the configured headers."""
        for name in self.remove:
            envelope.remove_header(name)
        for name, template in self.add:
            envelope.add_header(name, self.render(name, template, session, envelope))
        if self.trace:
            envelope.add_header(*TRACE_HEADER)

    @hookimpl
    def bonzo_message(self, session: Session, envelope: Envelope) -> Awaitable[None] | None:
        """Edit the headers; no verdict, so later filters still run.

        A plain function, so the usual case costs the server no coroutine;
        only removing headers from a spooled body (a file copy) returns an
        awaitable that does the copy off the event loop.
        """
        if self.remove and envelope.spooled:
            return asyncio.get_running_loop().run_in_executor(None, self.edit, session, envelope)
        self.edit(session, envelope)
        return None

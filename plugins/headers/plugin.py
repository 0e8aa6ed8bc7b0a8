"""Add and remove message headers once the message has arrived."""

from __future__ import annotations

import asyncio
import string
from collections.abc import Awaitable, Mapping
from typing import Any

from bonzo.hookspecs import hookimpl
from bonzo.session import Envelope, Session, safe_text

from .._config import as_table, check_keys, describe, get_bool, get_str_list

__all__ = ["HeadersPlugin", "sanitize"]

KEYS = ("add", "remove", "trace")
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
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: expected a header name, got {describe(name)}")
    if not all(33 <= ord(c) <= 126 and c != ":" for c in name) or len(name) > 76:
        raise ValueError(
            f"{where}: {describe(name)} is not a valid header name "
            "(printable ASCII without ':' or spaces, at most 76 characters)"
        )
    return name


def _check_template(name: str, value: Any) -> str:
    where = f"add.{name}"
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


class HeadersPlugin:
    """Removes, then adds, the configured headers on every message."""

    def __init__(self) -> None:
        self.add: list[tuple[str, str]] = []
        self.remove: list[str] = []
        self.trace = False

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate the ``[plugins.headers]`` table."""
        table = as_table(config)
        check_keys(table, KEYS)
        add = table.get("add", {})
        if not isinstance(add, Mapping):
            raise ValueError(f"add: expected a table of name = value, got {describe(add)}")
        pairs = []
        for name, value in add.items():
            clean = isinstance(name, str) and name.isascii() and name.isprintable()
            _check_name(name, f"add.{name}" if clean else f"add.{name!r}")
            pairs.append((name, _check_template(name, value)))
        remove = [_check_name(n, "remove") for n in get_str_list(table, "remove")]
        for name in remove:
            if name.lower() in PROTECTED:
                raise ValueError(
                    f"remove: {name} headers are trace headers and must not be removed "
                    "(RFC 5321 4.4)"
                )
        trace = get_bool(table, "trace", False)
        self.add, self.remove, self.trace = pairs, remove, trace

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

"""How each recipient leaves the queue: routes and the transports behind them.

A **route** is chosen per recipient: a plugin's :func:`bonzo_route` hook
first, then the ``[plugins.queue.routes]`` table, by the recipient's
canonical domain — an exact domain, ``*.example.org`` for its subdomains, or
``"*"`` for everything else. A route has a ``type``:

- ``maildir``: local delivery into Maildir folders (the ``maildir`` plugin's
  writer: ``path``, ``per_recipient``);
- ``discard``: nowhere (tests and benchmarks).

Each route type is a :class:`Transport`: it delivers one message to some of
its recipients and returns an :class:`Outcome` per recipient. Recipients of
a message that share a transport and a :meth:`~Transport.destination` are
delivered together, in one connection where the transport has connections.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .._config import as_table, check_keys, config_domain, describe, get_str
from .outcome import Outcome, Transport
from .spool import QueuedMessage, Recipient
from .transports import LMTPTransport, MXTransport, SmarthostTransport

__all__ = [
    "Outcome",
    "Transport",
    "RouteTable",
    "MaildirTransport",
    "DiscardTransport",
    "ROUTE_TYPES",
]


class DiscardTransport:
    """Delivers to nowhere (for tests and benchmarks)."""

    kind = "discard"
    final = True

    def destination(self, recipient: Recipient) -> str:
        return "discard"

    async def deliver(
        self, message: QueuedMessage, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        return [Outcome("delivered", 250, "2.0.0", "Discarded", "discard") for _ in recipients]

    async def close(self) -> None:
        return None


class MaildirTransport:
    """Local delivery with the ``maildir`` plugin's durable writer: each
    maildir on its own, a failing one deferring only its recipients (a local
    fault is never a bounce)."""

    kind = "maildir"
    final = True

    def __init__(self, table: Mapping[str, Any], app: Any, where: str) -> None:
        from ..maildir import MaildirPlugin

        check_keys(table, ("type", "path", "per_recipient", "mode", "envelope_headers"), where)
        writer = MaildirPlugin()
        try:
            writer.bonzo_configure({k: v for k, v in table.items() if k != "type"}, app)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        self.writer = writer

    def start(self) -> None:
        self.writer.bonzo_startup()

    def destination(self, recipient: Recipient) -> str:
        return str(self.writer.path)

    async def deliver(
        self, message: QueuedMessage, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        writer = self.writer
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(recipients):
            target = writer.maildir_for(r.canonical) if writer.per_recipient else writer.path
            groups.setdefault(target, []).append(i)
        leads = writer.leads(
            message.sender, {t: [recipients[i].canonical for i in idx] for t, idx in groups.items()}
        )
        loop = asyncio.get_running_loop()
        abort = threading.Event()
        try:
            failed = await loop.run_in_executor(
                None, writer.deliver_each, message, list(groups), abort, leads
            )
        except asyncio.CancelledError:
            abort.set()
            raise
        result: list[Outcome] = [Outcome.deferred(451, "4.3.0", "Not attempted")] * len(recipients)
        for target, idx in groups.items():
            exc = failed.get(target)
            host = str(target)
            if exc is None:
                outcome = Outcome("delivered", 250, "2.0.0", "Delivered", host)
            elif exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
                outcome = Outcome.deferred(452, "4.3.1", "Insufficient storage", host)
            else:
                reason = exc.strerror or type(exc).__name__
                outcome = Outcome.deferred(451, "4.3.0", f"Local error: {reason}", host)
            for i in idx:
                result[i] = outcome
        return result

    async def close(self) -> None:
        return None


#: Route types and what they take.
ROUTE_TYPES = ("mx", "smarthost", "lmtp", "maildir", "discard")


def _transport(table: Any, app: Any, where: str) -> Any:
    table = as_table(table)
    kind = get_str(table, "type", "")
    if kind == "maildir":
        return MaildirTransport(table, app, where)
    if kind == "discard":
        check_keys(table, ("type",), where)
        return DiscardTransport()
    if kind == "smarthost":
        return SmarthostTransport(table, app, where)
    if kind == "lmtp":
        return LMTPTransport(table, app, where)
    if kind == "mx":
        return MXTransport(table, app, where)
    raise ValueError(
        f"{where}.type: expected one of {', '.join(ROUTE_TYPES)}, got {describe(kind)}"
    )


class RouteTable:
    """The configured transports and routes.

    :arg routes: ``[plugins.queue.routes]``: domain pattern -> a transport
        table, or the name of one of ``transports``.
    :arg transports: ``[plugins.queue.transports]``: name -> transport table
        (for routes that share one, and for :func:`bonzo_route`).
    """

    def __init__(self, routes: Mapping[str, Any], transports: Mapping[str, Any], app: Any) -> None:
        #: Transports by name (``transports`` keys).
        self.named: dict[str, Any] = {}
        self.exact: dict[str, Any] = {}
        self.suffixes: list[tuple[str, Any]] = []
        self.default: Any = None
        self.transports: list[Any] = []
        for name, table in as_table(transports).items():
            transport = _transport(table, app, f"transports.{name}")
            self.named[name] = transport
            self.transports.append(transport)
        for pattern, value in as_table(routes).items():
            where = f"routes.{pattern}"
            if isinstance(value, str):
                if value not in self.named:
                    known = ", ".join(sorted(self.named)) or "none"
                    raise ValueError(
                        f"{where}: no transport named {value!r} in [plugins.queue.transports] "
                        f"(known: {known})"
                    )
                transport = self.named[value]
            else:
                transport = _transport(value, app, where)
                self.transports.append(transport)
            if pattern == "*":
                self.default = transport
            elif pattern.startswith("*."):
                self.suffixes.append(("." + _domain(pattern[2:], where), transport))
            else:
                self.exact[_domain(pattern, where)] = transport
        # Longest suffix first: the most specific pattern wins.
        self.suffixes.sort(key=lambda item: -len(item[0]))

    def route(self, recipient: Recipient) -> Any:
        """The transport for ``recipient``, or ``None`` if no route matches."""
        domain = recipient.domain
        transport = self.exact.get(domain)
        if transport is not None:
            return transport
        for suffix, transport in self.suffixes:
            if domain.endswith(suffix):
                return transport
        return self.default

    def start(self) -> None:
        for transport in self.transports:
            start = getattr(transport, "start", None)
            if start is not None:
                start()

    async def close(self) -> None:
        for transport in self.transports:
            await transport.close()


def _domain(value: str, where: str) -> str:
    try:
        return config_domain(value)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None

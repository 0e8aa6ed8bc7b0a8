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

from bonzo.schema import Key, Schema

from .._config import config_domain
from .keys import ByType, Value, label, mode, type_key
from .outcome import Outcome, Transport
from .spool import QueuedMessage, Recipient
from .transports import LMTP, MX, SMARTHOST, LMTPTransport, MXTransport, SmarthostTransport

__all__ = [
    "Outcome",
    "Transport",
    "RouteTable",
    "MaildirTransport",
    "DiscardTransport",
    "ROUTE_TYPES",
    "ROUTES",
    "TRANSPORTS",
    "DEFAULT_ROUTES",
    "ROUTING",
]


class DiscardTransport:
    """Delivers to nowhere (for tests and benchmarks)."""

    kind = "discard"
    final = True
    by_recipient = False

    @staticmethod
    def delivers_by_recipient(values: Mapping[str, Any]) -> bool:
        """:attr:`by_recipient` of a transport made from ``values``."""
        return False

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

    @staticmethod
    def delivers_by_recipient(values: Mapping[str, Any]) -> bool:
        """:attr:`by_recipient` of a transport made from ``values``: a folder
        per recipient (``per_recipient``), or one for all."""
        return bool(values.get("per_recipient"))

    def __init__(self, values: Mapping[str, Any], app: Any, where: str) -> None:
        from ..maildir import MaildirPlugin

        table = {k: v for k, v in values.items() if k != "type"}
        table["path"] = str(table["path"])  # absolute already
        writer = MaildirPlugin()
        try:
            # The maildir plugin checks the file system (path, not a file).
            writer.bonzo_configure(table, app)
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None
        self.writer = writer
        self.by_recipient = self.delivers_by_recipient(values)

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
        # A quarantine copy kept for its own recipients (one folder, no
        # quarantine_recipient) is the reviewer's, not theirs: a
        # Delivered-To for one of them would make the released copy look
        # like a forwarding loop to that recipient's server (Postfix's
        # local delivery bounces it).
        held_here = message.transport is not None and not all(
            message.quarantined_for(r) for r in recipients
        )
        leads = writer.leads(
            message.sender,
            {t: [] if held_here else [recipients[i].canonical for i in idx]
             for t, idx in groups.items()},
        )  # fmt: skip
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


#: The keys of a ``maildir`` route or transport (passed on to the
#: ``maildir`` plugin's writer, which checks them again).
MAILDIR = Schema(
    type_key("maildir"),
    Key("path", "path", default="Maildir",
        doc="The catch-all maildir, or the root of the per-recipient folders."),
    Key("per_recipient", "bool", default=False,
        doc="One copy per recipient, in ``<path>/<domain>/<local part>/``."),
    Value("mode", default="0o600", convert=mode, shown="integer or octal string",
          doc="Permissions of the message files (the owner must read and write "
          "them; nobody else may write them)."),
    Key("envelope_headers", "bool", default=True,
        doc="Write ``Return-Path:`` (and ``Delivered-To:`` in a copy that is one "
        "recipient's; not in a quarantine copy kept for its own recipients) at the top of "
        "each stored copy."),
)  # fmt: skip
#: The keys of a ``discard`` route or transport.
DISCARD = Schema(type_key("discard"))

_TYPES = (
    Key("mx", "table", schema=MX,
        doc='``type = "mx"``: to the Internet, to each recipient domain\'s mail '
        "hosts found in DNS."),
    Key("smarthost", "table", schema=SMARTHOST,
        doc='``type = "smarthost"``: everything to one relay.'),
    Key("lmtp", "table", schema=LMTP,
        doc='``type = "lmtp"``: final delivery to a mailbox server: ``host`` '
        "(and ``port``) or ``path``, not both."),
    Key("maildir", "table", schema=MAILDIR,
        doc='``type = "maildir"``: local delivery, as the ``maildir`` plugin '
        "(its keys of the same names)."),
    Key("discard", "table", schema=DISCARD,
        doc='``type = "discard"``: nowhere (tests and benchmarks).'),
)  # fmt: skip
#: Route types.
ROUTE_TYPES = tuple(k.name for k in _TYPES)
#: Without a routes table, everything goes out by MX, as an MTA's default
#: transport does (and defers, saying so, until [dns] is set).
DEFAULT_ROUTES: dict[str, Any] = {"*": {"type": "mx"}}

#: ``[plugins.queue.routes]``.
ROUTES = ByType("routes", "table", types=_TYPES, names=True, document=False,
    # No default= here: bonzo.schema would show it as {* = ...}, and not parse it.
    shown="table of domain patterns, each a transport table or the name of a transport",
    doc='Default ``{ "*" = { type = "mx" } }``. Recipient domain → its route: an '
    'exact domain (``"example.org"``), its '
    'subdomains (``"*.example.org"``) or everything else (``"*"``); the most '
    "specific pattern wins. A route is a table with a ``type`` and the keys of "
    "that type (as in ``transports``), or the name of one of ``transports``. "
    "Without a ``routes`` table every recipient goes by MX (which needs "
    "``[dns]``; until it is set, deliveries are deferred with a message saying "
    "so). A ``routes`` table replaces that default entirely: list ``\"*\"`` in "
    "it to keep a default.")  # fmt: skip
#: ``[plugins.queue.transports]``.
TRANSPORTS = ByType("transports", "table", default={}, types=_TYPES,
    shown="table of named tables, each with a ``type`` and the keys of that type below",
    doc="Transports by name, for routes that share one, for ``quarantine``, "
    "and for plugins that choose one (:func:`~bonzo.hookspecs.bonzo_route`).")  # fmt: skip


def check_routes(values: Mapping[str, Any]) -> None:
    """Every route's pattern is a domain pattern, and every route given by
    name names a transport (a :class:`Schema` check)."""
    for pattern, route in (values["routes"] or {}).items():
        if not pattern.strip():
            # It once matched the bare <postmaster>, now queued with a domain.
            raise ValueError(
                f"routes.{label(pattern)}: an empty domain matches no recipient; mail to "
                "the bare <postmaster> is routed by the domain of [plugins.queue] postmaster "
                "(postmaster@ the first local domain by default)"
            )
        if pattern != "*":
            _domain(pattern.removeprefix("*."), f"routes.{label(pattern)}")
        if isinstance(route, str) and route not in values["transports"]:
            known = ", ".join(sorted(values["transports"])) or "none"
            raise ValueError(
                f"routes.{label(pattern)}: no transport named {route!r} in "
                f"[plugins.queue.transports] (known: {known})"
            )


#: The two tables, for :class:`RouteTable` built from raw tables.
ROUTING = Schema(ROUTES, TRANSPORTS, check=check_routes)


def transport_class(kind: str) -> Any:
    """The class of a transport of type ``kind`` (``"maildir"``, ...)."""
    return {
        "maildir": MaildirTransport,
        "discard": DiscardTransport,
        "smarthost": SmarthostTransport,
        "lmtp": LMTPTransport,
    }.get(kind, MXTransport)


def _transport(values: Mapping[str, Any], app: Any, where: str) -> Any:
    cls = transport_class(values["type"])
    return cls() if cls is DiscardTransport else cls(values, app, where)


class RouteTable:
    """The configured transports and routes.

    :arg routes: ``[plugins.queue.routes]``: domain pattern -> a transport
        table, or the name of one of ``transports``.
    :arg transports: ``[plugins.queue.transports]``: name -> transport table
        (for routes that share one, and for :func:`bonzo_route`).
    """

    def __init__(self, routes: Mapping[str, Any], transports: Mapping[str, Any], app: Any) -> None:
        values = ROUTING.parse({"routes": routes, "transports": transports}, app)
        self._build(values["routes"], values["transports"], app)

    @classmethod
    def parsed(
        cls, routes: Mapping[str, Any], transports: Mapping[str, Any], app: Any
    ) -> RouteTable:
        """The table of ``routes`` and ``transports`` as :data:`ROUTES` and
        :data:`TRANSPORTS` parsed them (see :data:`ROUTING`)."""
        table = cls.__new__(cls)
        table._build(routes, transports, app)
        return table

    def _build(self, routes: Mapping[str, Any], transports: Mapping[str, Any], app: Any) -> None:
        #: Transports by name (``transports`` keys).
        self.named: dict[str, Any] = {}
        self.exact: dict[str, Any] = {}
        self.suffixes: list[tuple[str, Any]] = []
        self.default: Any = None
        self.transports: list[Any] = []
        for name, values in transports.items():
            transport = _transport(values, app, f"transports.{label(name)}")
            self.named[name] = transport
            self.transports.append(transport)
        for pattern, value in routes.items():
            where = f"routes.{label(pattern)}"
            if isinstance(value, str):
                transport = self.named[value]  # checked by check_routes
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
        return self.route_domain(recipient.domain)

    def route_domain(self, domain: str) -> Any:
        """The transport for a canonical ``domain``, or ``None`` if no route matches."""
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

    def expire(self) -> None:
        """Close the idle connections of every transport that pools them."""
        for transport in self.transports:
            expire = getattr(transport, "expire", None)
            if expire is not None:
                expire()

    async def close(self) -> None:
        # All at once: each transport's close may wait (QUITs to its servers).
        await asyncio.gather(*(transport.close() for transport in self.transports))


def _domain(value: str, where: str) -> str:
    try:
        return config_domain(value)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None

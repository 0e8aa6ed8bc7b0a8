"""The ``queue`` plugin: accept a message durably, then deliver it by route.

It owns :func:`~bonzo.hookspecs.bonzo_deliver`: the message and its envelope
are written to the queue directory and fsync'd before the client gets
``250`` (:mod:`.spool`), and a runner in every worker delivers them
(:mod:`.runner`) by the configured routes (:mod:`.routes`), retrying,
expiring and bouncing (:mod:`.bounce`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import io
import json
import logging
import time
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import IO, Any

from bonzo.address import Address
from bonzo.errors import PermanentError, TransientError
from bonzo.hookspecs import Accept, hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session

from .._config import check_creatable, parse_duration
from .._quarantine import add_quarantine_headers
from .bounce import ReportLine
from .keys import Value, mode, under_ten_years
from .routes import DEFAULT_ROUTES, ROUTES, TRANSPORTS, RouteTable, check_routes, transport_class
from .runner import INLINE_SIZE, MAX_HANDED, Runner, RunnerSettings
from .spool import Claim, GroupSync, QueuedMessage, Recipient, Spool, queued_recipient

__all__ = ["QueuePlugin", "parse_duration", "KEYS"]

log = logging.getLogger("bonzo.plugins.queue")

#: Seconds a queued message waits for bonzo_accepted before it is handed to
#: the runner anyway (the client was told something other than 250).
_TOLD_WAIT = 2.0

#: Bounds the queued messages waiting for bonzo_accepted, each with its
#: claim (a descriptor), as the runner bounds those it is handed.
_MAX_UNKICKED = MAX_HANDED
_NO_SPACE = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


def _duration(name: str, default: float, doc: str, zero: bool = False) -> Key:
    return Key(name, "duration", default=default, convert=under_ten_years(zero), doc=doc)


def _check(values: dict[str, Any]) -> None:
    low, high = values["min_backoff"], values["max_backoff"]
    if high < low:
        raise ValueError(f"max_backoff: {high:g}s is less than min_backoff ({low:g}s)")
    check_routes(values)
    quarantine = values["quarantine"]
    if quarantine is None:
        if values["quarantine_recipient"] is not None:
            raise ValueError(
                "quarantine_recipient: set without quarantine (the transport quarantined "
                "messages go to)"
            )
        return
    transport = values["transports"].get(quarantine)
    if transport is None:
        known = ", ".join(sorted(values["transports"])) or "none"
        raise ValueError(
            f"quarantine: no transport named {quarantine!r} in [plugins.queue.transports] "
            f"(known: {known})"
        )
    kind = _by_recipient(transport)
    if kind is not None and values["quarantine_recipient"] is None:
        raise ValueError(
            f"quarantine_recipient: required with quarantine = {quarantine!r}, {kind}: "
            "it delivers to each recipient, so quarantined mail would reach the "
            "mailboxes of its own recipients; set quarantine_recipient to the one "
            "address it goes to instead (a mailbox the operator reviews)"
        )


def _by_recipient(transport: Mapping[str, Any]) -> str | None:
    """How a transport (its parsed table) delivers to each recipient on its
    own (its class's ``delivers_by_recipient``: a quarantined message then
    needs a recipient of its own), or ``None`` for one that keeps every
    message in one place (a maildir without ``per_recipient``, ``discard``)."""
    kind = transport["type"]
    if not transport_class(kind).delivers_by_recipient(transport):
        return None
    if kind == "maildir":
        return 'a "maildir" transport with per_recipient'
    return f'a transport of type "{kind}"'


def _postmaster(address: Address) -> Address:
    if not address.domain:
        raise ValueError(
            "needs a domain: the address mail to the bare <postmaster> is delivered to, "
            'such as "postmaster@example.org"'
        )
    return address


def _quarantine_address(address: Address) -> Address:
    if not address.domain:
        raise ValueError(
            "needs a domain: the address quarantined mail is delivered to, "
            'such as "quarantine@example.org"'
        )
    return address


#: The ``[plugins.queue]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("path", "path", default="queue",
        doc="The queue directory; created with ``tmp/``, ``data/`` and ``state/`` "
        "at startup."),
    Value("mode", default="0o600", convert=mode, shown="integer or octal string",
          doc="Permissions of the queue's files (the owner must read and write "
          "them; nobody else may write them)."),
    _duration("min_backoff", 300,
              "The first wait after a failed attempt, doubled after each further "
              "one up to ``max_backoff``."),
    _duration("max_backoff", 4000,
              "The longest wait between attempts (at least ``min_backoff``)."),
    _duration("lifetime", 5 * 86400,
              "How long a message is tried before its undelivered recipients bounce "
              "(5 days)."),
    _duration("delay_warning", 0,
              "After how long a message still not delivered gets one delay notice; "
              "``0``: none.", zero=True),
    _duration("scan_interval", 30,
              "How often each runner looks through the whole queue (a message "
              "accepted by a worker is tried at once regardless). No delivery "
              "starts during a scan: one that outlasts this interval (a very long "
              "queue) is followed by the next no sooner than four of its durations "
              "later, with a warning."),
    Key("max_deliveries", "int", default=20, minimum=1,
        doc="Deliveries one runner makes at once."),
    Key("per_destination", "int", default=5, minimum=1,
        doc="Deliveries one runner makes at once to one destination."),
    Key("busy_deliveries", "int", default=2, minimum=1,
        doc="Deliveries one runner makes at once while its worker is busy "
        "accepting mail (its event loop busy over 50% of the time, until under "
        "30%, and mail accepted in the last half second): acceptance takes precedence, as in "
        "Postfix, the queue grows during a burst and drains at full speed after "
        "it. ``max_deliveries`` or more: no precedence."),
    Key("bounce_size_limit", "int", default=50_000, minimum=1,
        doc="The largest original message (octets) a report carries whole; larger "
        "ones are returned as their header section, itself cut to this size (before "
        "the first field that does not fit)."),
    _duration("delivery_timeout", 600,
              "The longest one delivery may take: the recipients whose reply has not "
              "come by then are deferred (those already answered keep their reply, "
              "an LMTP recipient's ``250`` too)."),
    Key("max_hops", "int", default=100, minimum=1,
        doc="``Received:`` headers a message may carry before it is refused as a "
        "loop (``554 5.4.6``)."),
    ROUTES,
    TRANSPORTS,
    Key("postmaster", "address", convert=_postmaster,
        doc="Where mail to the bare ``<postmaster>`` goes (no domain: RFC 5321 "
        "4.5.1 makes every server accept it, for its own postmaster): a full "
        "address, which such a recipient is queued as — routed by its domain, "
        "delivered and reported as that address, with ``ORCPT=rfc822;postmaster`` "
        "(unless the client gave an ``ORCPT``) so a report names what the sender "
        "wrote. Default: ``postmaster@`` the first local domain of the "
        "``recipients`` plugin (the first of its ``domains``, else of its "
        "``addresses``, else of its ``file``), or ``postmaster@`` the server's "
        "``hostname`` without one (set the key then: that address is rarely "
        "delivered here, and ``bonzo check`` says so). ``bonzo check`` warns "
        "when no route matches it."),
    Key("quarantine",
        doc="The name of a transport of ``transports`` for messages a filter "
        "quarantined (:class:`bonzo.Quarantine`): with it, this plugin owns "
        ":func:`~bonzo.hookspecs.bonzo_quarantine` and queues each such message "
        "for that transport alone, with an ``X-Bonzo-Quarantine: "
        "<plugin>: <reason>`` header added, instead of routing it to its "
        "recipients: a ``maildir`` without ``per_recipient`` (one folder the "
        "operator reads), or a transport that delivers by recipient (``lmtp``, "
        "``smarthost``, ``mx``, a ``maildir`` with ``per_recipient``) together "
        "with ``quarantine_recipient``."),
    Key("quarantine_recipient", "address", convert=_quarantine_address,
        doc="The one address a quarantined message is delivered to on the "
        "``quarantine`` transport (a review mailbox: ``quarantine@example.org``), "
        "instead of its own recipients; required when that transport delivers by "
        "recipient (``lmtp``, ``smarthost``, ``mx``, a ``maildir`` with "
        "``per_recipient``): without it, quarantined mail would reach the very "
        "mailboxes it is kept from. The sender gets no report about a "
        "quarantine copy (``NOTIFY=NEVER``). Without it (a ``maildir`` "
        "quarantine in one folder), the message is queued for its recipients, "
        "all in that one folder; such a message is never delivered by a "
        "transport that delivers by recipient (it waits if a reload makes its "
        "transport one)."),
    check=_check,
    notes="Durations are seconds, or a string with a unit, and under ten years; "
    "all but ``delay_warning`` more than 0.",
)  # fmt: skip
KEYS = tuple(SCHEMA.names)


class QueuePlugin:
    """Durable queue and delivery by route (see the plugin's README)."""

    #: Gives a verdict on every call of these hooks (``bonzo check`` warns
    #: about plugins listed after it for them: they would never run).
    decides_always = ("bonzo_deliver",)
    #: Sends the delivery status notifications (RFC 3461) asked for the
    #: messages it queues, and the success ones for the final deliveries of
    #: plugins listed before it (``final_delivery``, as ``maildir``): with
    #: it, the server offers DSN (:attr:`bonzo.app.MailApp.dsn_honoured_by`).
    honours_dsn = True
    #: Its bonzo_shutdown bounds its own time, past the hook time limit:
    #: after a reload the deliveries in flight end within their own limits
    #: (data_end_timeout: 10 minutes), at a stop within shutdown_grace.
    bounds_own_shutdown = True

    @property
    def open_files(self) -> int:
        """Descriptors it may hold at once in a process, beside the sessions'
        (:meth:`bonzo.hooks.PluginSet.open_files`): the message files kept
        for their first attempt (:data:`MAX_HANDED`), per delivery slot the
        message, its state and the outbound connection, and the idle
        connections each SMTP/LMTP transport keeps for reuse (at most
        :data:`~.transports.MAX_IDLE` each)."""
        pools = [t for t in (self.routes.transports if self.routes else []) if hasattr(t, "pool")]
        idle = sum(t.pool.max_idle for t in pools)
        return MAX_HANDED + 3 * self.settings.max_deliveries + idle

    def __init__(self) -> None:
        self.spool: Spool | None = None
        self.sync: GroupSync | None = None
        self.runner: Runner | None = None
        self.routes: RouteTable | None = None
        self.settings = RunnerSettings()
        self.max_hops = 100
        self.quarantine: str | None = None
        self.quarantine_recipient: Address | None = None
        #: The ``postmaster`` key (``None``: the default, see :meth:`postmaster`).
        self.postmaster_key: Address | None = None
        self._warnings: list[str] = []
        self._app: Any = None
        self._final: frozenset[str | None] = frozenset()
        #: Messages this process queued and has not yet handed to the runner
        #: (with their claims: :meth:`Spool.accept`).
        self._queued: dict[str, tuple[Claim, QueuedMessage]] = {}

    # ------------------------------------------------------------ configure
    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.queue]`` and build the routes."""
        values = SCHEMA.parse(config, app)
        path = values["path"]
        if path.exists() and not path.is_dir():
            raise ValueError(f"path: {path} exists and is not a directory")
        check_creatable("path", path)
        # float(): a default is taken as declared (an int) where a given
        # duration is a float.
        settings = RunnerSettings(
            hostname=getattr(getattr(app, "settings", None), "hostname", None) or "localhost",
            min_backoff=float(values["min_backoff"]),
            max_backoff=float(values["max_backoff"]),
            lifetime=float(values["lifetime"]),
            delay_warning=float(values["delay_warning"]),
            scan_interval=float(values["scan_interval"]),
            max_deliveries=values["max_deliveries"],
            per_destination=values["per_destination"],
            busy_deliveries=values["busy_deliveries"],
            bounce_size_limit=values["bounce_size_limit"],
            delivery_timeout=float(values["delivery_timeout"]),
        )
        self.max_hops = values["max_hops"]
        routes = values["routes"]
        if routes is None:
            routes = ROUTES.parse(DEFAULT_ROUTES, None)
        self.routes = RouteTable.parsed(routes, values["transports"], app)
        self._warnings = []
        dns = getattr(app, "dns", None)
        if (
            dns is not None
            and not dns.enabled
            and any(t.kind == "mx" for t in self.routes.transports)
        ):
            self._warnings.append(
                'a route of type "mx" needs DNS, which is off ([dns] is not configured): '
                "every message on it will be deferred (and bounced once too old)"
            )
        self.quarantine = values["quarantine"]
        self.quarantine_recipient = values["quarantine_recipient"]
        self.postmaster_key = values["postmaster"]
        #: Whether bonzo_quarantine keeps anything (see App.warnings).
        self.quarantine_owner = bool(self.quarantine)
        self.spool = Spool(path, mode(values["mode"]))
        self.settings = settings
        self._app = app
        plugins: Any = getattr(app, "plugins", None)
        #: The enabled plugins whose deliveries are final (``final_delivery``):
        #: this one reports their successes.
        self._final = frozenset(
            name
            for name in (plugins.names if plugins is not None else ())
            if getattr(plugins.get(name), "final_delivery", False) is True
        )

    def postmaster(self) -> str:
        """The address mail to the bare ``<postmaster>`` is queued as: the
        ``postmaster`` key, else ``postmaster@`` the first of the
        ``local_domains`` of an enabled plugin (``recipients``), else
        ``postmaster@`` the server's hostname (``""``, kept bare, if that
        makes no address). Asked once every plugin is configured:
        ``recipients`` may come after this one."""
        return self._postmaster()[0]

    def _postmaster(self) -> tuple[str, bool]:
        """:meth:`postmaster`, and whether it is the hostname's (no key, no
        local domain)."""
        if self.postmaster_key is not None:
            return self.postmaster_key.original, False
        plugins: Any = getattr(self._app, "plugins", None)
        for name in plugins.names if plugins is not None else ():
            domains = getattr(plugins.get(name), "local_domains", None)
            if isinstance(domains, (list, tuple)) and domains and isinstance(domains[0], str):
                return f"postmaster@{domains[0]}", False
        address = f"postmaster@{self.settings.hostname.rstrip('.')}"
        try:
            Address.parse(address)
        except ValueError:  # a hostname no domain can be made of: kept bare
            return "", True
        return address, True

    @property
    def config_warnings(self) -> list[str]:
        """What ``bonzo check`` should warn about (read once every plugin is
        configured)."""
        warnings = list(self._warnings)
        if self.routes is not None:
            address, hostname = self._postmaster()
            domain = Address.parse(address).domain if address else ""
            if address and hostname:
                # No local domain: a route for the hostname is most often an
                # MX route back to this very server (mail loops back, and
                # after lifetime a bounce to a sender anyone may forge).
                warnings.append(
                    f"mail to <postmaster> goes to <{address}> (no local domain: the "
                    "hostname); unless a route delivers that domain here, it loops back "
                    "and bounces: set [plugins.queue] postmaster to a mailbox someone reads"
                )
            if not address:
                warnings.append(
                    "mail to <postmaster> has no address to go to (no local domain, and "
                    "the hostname makes none): set [plugins.queue] postmaster"
                )
            elif self.routes.route_domain(domain) is None:
                warnings.append(
                    f"mail to <postmaster> goes to <{address}>, and no route matches "
                    f"{domain!r}: it would wait in the queue for ever; add a route for it "
                    "to [plugins.queue.routes], or set [plugins.queue] postmaster to an "
                    "address that has one"
                )
        return warnings

    # ------------------------------------------------------------- lifecycle
    @hookimpl
    async def bonzo_startup(self, app: Any) -> None:
        """Create the queue directory, clean what a crash left (at a reload,
        only what a dead process left: see :meth:`Spool.setup`), start the
        runner."""
        assert self.spool is not None and self.routes is not None
        self.settings = dataclasses.replace(self.settings, postmaster=self.postmaster())
        spool = self.spool
        loop = asyncio.get_running_loop()
        removed = await loop.run_in_executor(None, spool.setup)
        if removed:
            log.info("queue: removed %d file(s) a crash left in %s", removed, spool.path)
        self.routes.start()
        self.sync = GroupSync(spool.data)
        plugins = getattr(app, "plugins", None)
        self.runner = Runner(spool, self.sync, self.routes, plugins, self.settings)
        self.runner.start()
        count = len(await loop.run_in_executor(None, spool.ids))
        log.info(
            "queue: %s, %d message(s) queued; mail to <postmaster> goes to <%s>",
            spool.path,
            count,
            self.settings.postmaster,
        )

    @hookimpl
    async def bonzo_shutdown(self, app: Any = None) -> None:
        """Stop the runner. After a reload the deliveries in flight finish
        (their claims keep the new configuration's runner off them); when
        the server stops they get ``shutdown_grace`` seconds."""
        self._release_queued()
        if self.runner is not None:
            grace = getattr(getattr(app, "settings", None), "shutdown_grace", None)
            await self.runner.stop(
                grace if isinstance(grace, (int, float)) else 30.0,
                getattr(app, "stop_requested", None),
                getattr(app, "stop_forced", None),
            )
            self.runner = None
        if self.sync is not None:
            self.sync.close()  # its spare new files

    # ------------------------------------------------------------ acceptance
    @hookimpl
    def bonzo_message(self, envelope: Envelope) -> None:
        """Refuse a message that has looped (more than ``max_hops`` trace
        headers, RFC 5321 6.3): ``554 5.4.6``."""
        hops = _count_received(envelope)
        if hops > self.max_hops:
            raise PermanentError(
                f"Too many hops ({hops}): mail loop",
                554,
                "5.4.6",
            )

    @hookimpl
    async def bonzo_deliver(self, session: Session, envelope: Envelope) -> Accept | None:
        """Write the message to the queue durably, then accept it."""
        return await self._queue(session, envelope, None)

    @hookimpl
    async def bonzo_quarantine(
        self, session: Session, envelope: Envelope, reason: str
    ) -> Accept | None:
        """With a ``quarantine`` transport: queue the message for it alone
        (to ``quarantine_recipient`` if set), with an ``X-Bonzo-Quarantine:``
        header giving the reason and ``X-Bonzo-Quarantine-Recipients:`` its
        recipients (kept in the queue file too, for ``bonzo queue``)."""
        if self.quarantine is None:
            return None
        facts = add_quarantine_headers(envelope, reason)
        recipient = self.quarantine_recipient
        if recipient is not None:
            # Never the message's own recipients: a transport that delivers
            # by recipient would put it in their mailboxes. NOTIFY=NEVER: the
            # sender is told nothing about the operator's copy.
            recipients = [
                queued_recipient(recipient, {"NOTIFY": "NEVER"}, self.settings.postmaster)
            ]
            # Recorded: the runner delivers a quarantined message on a
            # transport that delivers by recipient to this one alone.
            facts["to"] = recipients[0]["canonical"]
            return await self._queue(session, envelope, self.quarantine, recipients, facts)
        keep = envelope.remaining_indexes
        if not keep:
            # Plugins removed every recipient (the quarantine stands): the
            # one folder keeps it for the recipients the client gave.
            skip = envelope.refused.keys() | envelope.added
            keep = [i for i in range(len(envelope.recipients)) if i not in skip]
        # NOTIFY=NEVER here too: no report to the sender about the
        # operator's copy (its ORCPT kept).
        recipients = [
            queued_recipient(
                envelope.recipients[i],
                {**envelope.rcpt_params[i], "NOTIFY": "NEVER"},
                self.settings.postmaster,
            )
            for i in keep
        ]
        return await self._queue(session, envelope, self.quarantine, recipients, facts)

    async def _queue(
        self,
        session: Session,
        envelope: Envelope,
        transport: str | None,
        recipients: list[dict[str, Any]] | None = None,
        quarantine: dict[str, Any] | None = None,
    ) -> Accept | None:
        spool, sync = self.spool, self.sync
        if spool is None or sync is None:
            raise TransientError("Queue not started", 451, "4.3.0")
        if recipients is None:
            keep = set(envelope.remaining_indexes)  # not refused, not removed
            recipients = [
                queued_recipient(r, envelope.rcpt_params[i], self.settings.postmaster)
                for i, r in enumerate(envelope.recipients)
                if i in keep
            ]
        if not recipients:
            return None
        record = {
            "arrival": time.time(),
            "sender": envelope.mail_from,
            "mail_params": envelope.mail_params,
            "recipients": recipients,
            "session": {
                "session_id": session.id,
                "remote_ip": session.remote_ip,
                "helo": session.helo,
                "protocol": session.protocol,
                "tls": session.tls,
                "auth": session.auth,
            },
            "records": {
                "session": _jsonable(session.stash, "session"),
                "envelope": _jsonable(envelope.stash, "envelope"),
            },
        }
        if transport is not None:
            record["transport"] = transport
        if quarantine is not None:
            record["quarantine"] = quarantine
        try:
            handed = await spool.accept(
                envelope.id,
                record,
                envelope.header_bytes,
                envelope.open_body(),  # stays open: the envelope owns it
                sync,
                in_thread=envelope.spooled or envelope.size > INLINE_SIZE,
            )
        except OSError as exc:
            log.error(
                "[%s %s] queue: message %s not queued: %s",
                session.id,
                session.remote_ip,
                envelope.id,
                exc.strerror or exc,
            )
            if exc.errno in _NO_SPACE:
                raise TransientError("Insufficient system storage", 452, "4.3.1") from None
            raise TransientError("Local error in processing", 451, "4.3.0") from None
        if len(self._queued) >= _MAX_UNKICKED:
            # Accepted but never told (bonzo_accepted did not run): the scan
            # finds them; their claims must not pile up.
            self._release_queued()
        self._queued[envelope.id] = handed
        # bonzo_accepted (the client told 250) normally hands it to the
        # runner at once. When the client is told something else — a
        # deferral for other recipients of the message (an SMTP client gets
        # one reply) — it never comes: the message is queued all the same,
        # so it is handed over after a moment anyway.
        asyncio.get_running_loop().call_later(_TOLD_WAIT, self._hand_over, envelope.id)
        if self.runner is not None:
            self.runner.accepted()
        return Accept(f"Ok: queued as {envelope.id}")

    def _release_queued(self) -> None:
        queued, self._queued = self._queued, {}
        for claim, _ in queued.values():
            claim.release()

    @hookimpl
    def bonzo_accepted(self, envelope: Envelope) -> Awaitable[None] | None:
        """Try the message at once (if this plugin queued it: a set lookup,
        no file system call per message). A message another plugin delivered
        for good (``final_delivery``: ``maildir``) gets the success report its
        recipients' ``NOTIFY=SUCCESS`` asks for (RFC 3461 6.2): this server
        offered DSN, so nobody else sends it."""
        self._hand_over(envelope.id)
        if envelope.delivered_by not in self._final or envelope.quarantined is not None:
            return None  # (one set lookup for a message this plugin queued)
        if envelope.mail_from == "" or self.runner is None:
            return None
        wanted = [i for i in envelope.remaining_indexes if envelope.rcpt_dsn[i].wants("success")]
        return self._report_delivered(envelope, wanted) if wanted else None

    async def _report_delivered(self, envelope: Envelope, indexes: list[int]) -> None:
        """Queue the "delivered" report for ``indexes`` of ``envelope``."""
        runner = self.runner
        assert runner is not None
        now = time.time()
        recipients = []
        for i in indexes:
            r = envelope.recipients[i]
            recipients.append(
                Recipient(
                    address=r.original,
                    canonical=r.canonical,
                    domain=r.domain,
                    params=dict(envelope.rcpt_params[i]),
                    status="delivered",
                    attempts=1,
                    done_at=now,
                    last_attempt=now,
                )
            )
        # The header section is all a success report returns (at most
        # bounce_size_limit octets, and a few more to see where it ends).
        head = envelope.header_bytes + envelope.open_body().read(
            self.settings.bounce_size_limit + 4
        )
        message = _Delivered(
            id=envelope.id,
            arrival=now,
            sender=envelope.mail_from,
            mail_params=dict(envelope.mail_params),
            recipients=recipients,
            session={},
            records={},
            path=Path(),
            offset=0,
            size=len(envelope.header_bytes) + envelope.size,
        )
        message.head = head
        # No diagnostic: the delivery was made here, and told no reply.
        lines = [ReportLine(r, "delivered", "2.0.0") for r in recipients]
        try:
            await runner.report(message, lines)
        except OSError as exc:
            # Delivered all the same; only the notice is lost, and said so.
            log.error(
                "queue: %s: delivered report not queued: %s", envelope.id, exc.strerror or exc
            )

    def _hand_over(self, id: str) -> None:
        """Give the runner a message this process queued (with its claim),
        once; without a runner, let go of the claim."""
        handed = self._queued.pop(id, None)
        if handed is None:
            return
        if self.runner is not None:
            self.runner.kick(id, handed)
        else:
            handed[0].release()


class _Delivered(QueuedMessage):
    """A message another plugin delivered, as a report about it reads it:
    its first octets, taken from the envelope (:attr:`head`)."""

    head = b""

    def open(self) -> IO[bytes]:
        return io.BytesIO(self.head)


#: The stash keys already warned about (once each per process: a plugin
#: that stores a set on every message would otherwise fill the log).
_DROPPED: set[str] = set()


def _jsonable(stash: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The entries of a plugin ``stash`` that can be kept in the queue (JSON
    values); each other key is named in a warning, once. Keys starting with
    ``_`` are transient (live connections, caches): left out silently."""
    out = {}
    for key, value in stash.items():
        if isinstance(key, str) and key.startswith("_"):
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            name = f"{where}.stash[{str(key)[:100]!r}]"
            if name not in _DROPPED and len(_DROPPED) < 1000:
                _DROPPED.add(name)
                log.warning(
                    "queue: %s (%s) is not a JSON value: left out of the queue file, "
                    "so bonzo_route, bonzo_bounce and the observers will not see it "
                    "(warned once)",
                    name,
                    type(value).__name__,
                )
            continue
        out[str(key)] = value
    return out


def _count_received(envelope: Envelope, limit: int = 65536) -> int:
    """The number of ``Received:`` headers (added ones and the client's) in
    the first ``limit`` octets of the header section."""
    head = envelope.header_bytes + envelope.open_body().read(limit)
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        head = head[: end + 2]
    return sum(1 for line in head.split(b"\r\n") if line[:9].lower() == b"received:")

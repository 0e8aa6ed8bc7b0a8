"""The ``queue`` plugin: accept a message durably, then deliver it by route.

It owns :func:`~bonzo.hookspecs.bonzo_deliver`: the message and its envelope
are written to the queue directory and fsync'd before the client gets
``250`` (:mod:`.spool`), and a runner in every worker delivers them
(:mod:`.runner`) by the configured routes (:mod:`.routes`), retrying,
expiring and bouncing (:mod:`.bounce`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bonzo.errors import PermanentError, TransientError
from bonzo.hookspecs import Accept, hookimpl
from bonzo.session import Envelope, Session

from .._config import as_table, check_keys, describe, get_str, parse_duration, resolve_path
from .routes import RouteTable
from .runner import Runner, RunnerSettings
from .spool import GroupSync, Spool

__all__ = ["QueuePlugin", "parse_duration", "KEYS"]

log = logging.getLogger("bonzo.plugins.queue")

KEYS = (
    "path",
    "mode",
    "min_backoff",
    "max_backoff",
    "lifetime",
    "delay_warning",
    "scan_interval",
    "max_deliveries",
    "per_destination",
    "bounce_size_limit",
    "delivery_timeout",
    "max_hops",
    "routes",
    "transports",
    "quarantine",
)

#: Bounds the ids of queued messages waiting for bonzo_accepted (a message
#: whose session ended before it is found by the runner's next scan).
_MAX_UNKICKED = 10_000
_NO_SPACE = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


def _positive_int(table: Mapping[str, Any], key: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}: expected a positive integer, got {describe(value)}")
    return value


def _mode(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip().removeprefix("0o"), 8)
        except ValueError:
            raise ValueError(
                f"mode: expected an octal string such as '0600', got {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"mode: expected permission bits such as 0o600, got {describe(value)}")
    if value & 0o600 != 0o600 or value & 0o002:
        raise ValueError(
            f"mode: the owner must read and write, and nobody else write: {oct(value)}"
        )
    return value


class QueuePlugin:
    """Durable queue and delivery by route (see the plugin's README)."""

    #: Gives a verdict on every call of these hooks (``bonzo check`` warns
    #: about plugins listed after it for them: they would never run).
    decides_always = ("bonzo_deliver",)

    def __init__(self) -> None:
        self.spool: Spool | None = None
        self.sync: GroupSync | None = None
        self.runner: Runner | None = None
        self.routes: RouteTable | None = None
        self.settings = RunnerSettings()
        self.max_hops = 100
        self.quarantine: str | None = None
        self._app: Any = None
        #: Messages this process queued and has not yet kicked the runner for.
        self._queued: set[str] = set()

    # ------------------------------------------------------------ configure
    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.queue]`` and build the routes."""
        table = as_table(config)
        check_keys(table, KEYS)
        raw = get_str(table, "path", "queue")
        if "\0" in raw:
            raise ValueError("path: must not contain a NUL character")
        path = resolve_path(raw, app)
        if path.exists() and not path.is_dir():
            raise ValueError(f"path: {path} exists and is not a directory")
        settings = RunnerSettings(
            hostname=getattr(getattr(app, "settings", None), "hostname", None) or "localhost",
            min_backoff=parse_duration(table.get("min_backoff", 300), "min_backoff"),
            max_backoff=parse_duration(table.get("max_backoff", 4000), "max_backoff"),
            lifetime=parse_duration(table.get("lifetime", "5d"), "lifetime"),
            delay_warning=parse_duration(table.get("delay_warning", 0), "delay_warning", zero=True),
            scan_interval=parse_duration(table.get("scan_interval", 30), "scan_interval"),
            max_deliveries=_positive_int(table, "max_deliveries", 20),
            per_destination=_positive_int(table, "per_destination", 5),
            bounce_size_limit=_positive_int(table, "bounce_size_limit", 50_000),
            delivery_timeout=parse_duration(table.get("delivery_timeout", 600), "delivery_timeout"),
        )
        if settings.max_backoff < settings.min_backoff:
            raise ValueError(
                f"max_backoff: {settings.max_backoff:g}s is less than min_backoff "
                f"({settings.min_backoff:g}s)"
            )
        self.max_hops = _positive_int(table, "max_hops", 100)
        quarantine = table.get("quarantine")
        if quarantine is not None and (not isinstance(quarantine, str) or not quarantine):
            raise ValueError("quarantine: expected the name of a transport")
        # Without a routes table, everything goes out by MX, as an MTA's
        # default transport does (and defers, saying so, until [dns] is set).
        routes = table.get("routes", {"*": {"type": "mx"}})
        self.routes = RouteTable(routes, table.get("transports", {}), app)
        if quarantine is not None and quarantine not in self.routes.named:
            known = ", ".join(sorted(self.routes.named)) or "none"
            raise ValueError(
                f"quarantine: no transport named {quarantine!r} in [plugins.queue.transports] "
                f"(known: {known})"
            )
        self.quarantine: str | None = quarantine
        self.spool = Spool(path, _mode(table.get("mode", 0o600)))
        self.settings = settings
        self._app = app

    # ------------------------------------------------------------- lifecycle
    @hookimpl
    async def bonzo_startup(self, app: Any) -> None:
        """Create the queue directory, clean what a crash left, start the runner."""
        assert self.spool is not None and self.routes is not None
        spool = self.spool
        loop = asyncio.get_running_loop()
        removed = await loop.run_in_executor(None, spool.setup)
        if removed:
            log.info("queue: removed %d partly written file(s) from %s", removed, spool.tmp)
        self.routes.start()
        self.sync = GroupSync(spool.data)
        plugins = getattr(app, "plugins", None)
        self.runner = Runner(spool, self.sync, self.routes, plugins, self.settings)
        self.runner.start()
        count = len(await loop.run_in_executor(None, spool.ids))
        log.info("queue: %s, %d message(s) queued", spool.path, count)

    @hookimpl
    async def bonzo_shutdown(self) -> None:
        """Stop the runner; deliveries in flight get a few seconds to finish."""
        if self.runner is not None:
            await self.runner.stop()
            self.runner = None

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
        """With a ``quarantine`` transport: queue the message for it alone,
        with an ``X-Bonzo-Quarantine:`` header giving the reason."""
        if self.quarantine is None:
            return None
        envelope.add_header("X-Bonzo-Quarantine", f"{envelope.quarantined_by}: {reason}")
        return await self._queue(session, envelope, self.quarantine)

    async def _queue(
        self, session: Session, envelope: Envelope, transport: str | None
    ) -> Accept | None:
        spool, sync = self.spool, self.sync
        if spool is None or sync is None:
            raise TransientError("Queue not started", 451, "4.3.0")
        keep = set(envelope.remaining_indexes)  # not refused, not removed
        recipients = [
            {
                "address": r.original,
                "canonical": r.canonical,
                "domain": r.domain,
                "params": envelope.rcpt_params[i],
            }
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
                "session": _jsonable(session.stash),
                "envelope": _jsonable(envelope.stash),
            },
        }
        if transport is not None:
            record["transport"] = transport
        loop = asyncio.get_running_loop()
        abort = threading.Event()
        future = loop.run_in_executor(None, _write, spool, envelope.id, record, envelope, abort)
        try:
            await asyncio.shield(future)
            await sync.sync()
        except asyncio.CancelledError:
            # The hook timed out: the client gets 451 and sends it again, so
            # this copy must not stay (a duplicate).
            abort.set()
            future.add_done_callback(lambda f: _discard(spool, envelope.id, f))
            raise
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
            self._queued.clear()  # accepted but never told: the scan finds them
        self._queued.add(envelope.id)
        return Accept(f"Ok: queued as {envelope.id}")

    @hookimpl
    def bonzo_accepted(self, envelope: Envelope) -> None:
        """Try the message at once (if this plugin queued it: a set lookup,
        no file system call per message)."""
        if envelope.id in self._queued:
            self._queued.discard(envelope.id)
            if self.runner is not None:
                self.runner.kick(envelope.id)


def _write(
    spool: Spool, id: str, record: dict[str, Any], envelope: Envelope, abort: threading.Event
) -> Path:
    # The envelope's content file stays open: the envelope owns it.
    path = spool.write(id, record, envelope.header_bytes, envelope.open_body())
    if abort.is_set():
        spool.remove(id)
        raise OSError(errno.ECANCELED, "cancelled")
    return path


def _discard(spool: Spool, id: str, future: Any) -> None:
    if not future.cancelled() and future.exception() is None:
        try:
            spool.remove(id)
        except OSError:  # pragma: no cover - logged by the next scan
            pass


def _jsonable(stash: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a plugin ``stash`` that can be kept in the queue."""
    out = {}
    for key, value in stash.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
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

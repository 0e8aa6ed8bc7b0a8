"""The queue's network routes: ``smarthost``, ``lmtp`` and ``mx``, on
:mod:`bonzo.client` (and :mod:`bonzo.dns` for ``mx``).

Each keeps the connections it opened for the next message to the same
destination (:class:`ConnectionPool`): a connection left idle for
``idle_timeout`` seconds is closed with ``QUIT``, and one that stopped
working is replaced. The runner's ``per_destination`` limit bounds how many
are open to one destination at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bonzo import client
from bonzo.client import ClientConnection, ClientError, ClientSettings, DeliveryResult
from bonzo.dns import DNSError

from .._client import client_settings as _settings
from .._client import get_port as _port
from .._config import check_keys, config_domain, describe
from .outcome import Outcome
from .spool import QueuedMessage, Recipient

__all__ = ["ConnectionPool", "SmarthostTransport", "LMTPTransport", "MXTransport"]

log = logging.getLogger("bonzo.plugins.queue")

_STATUS = {"delivered": "delivered", "refused": "failed", "deferred": "deferred"}


class ConnectionPool:
    """Idle connections by destination, for reuse."""

    def __init__(self, idle_timeout: float = 30.0) -> None:
        self.idle_timeout = idle_timeout
        self._idle: dict[str, list[tuple[float, ClientConnection]]] = {}

    def take(self, destination: str) -> ClientConnection | None:
        """An idle, still usable connection to ``destination``, if any."""
        idle = self._idle.get(destination, [])
        now = time.monotonic()
        while idle:
            since, conn = idle.pop()
            if conn.usable and now - since < self.idle_timeout:
                return conn
            asyncio.ensure_future(conn.quit())
        return None

    def give(self, destination: str, conn: ClientConnection) -> None:
        """Keep ``conn`` for the next message to ``destination`` (or close it
        if it is no longer usable)."""
        if not conn.usable:
            conn.close()
            return
        self._idle.setdefault(destination, []).append((time.monotonic(), conn))

    async def expire(self) -> None:
        """Close the connections idle for longer than ``idle_timeout``."""
        now = time.monotonic()
        for destination, idle in list(self._idle.items()):
            keep = []
            for since, conn in idle:
                if now - since >= self.idle_timeout or not conn.usable:
                    await conn.quit()
                else:
                    keep.append((since, conn))
            self._idle[destination] = keep

    async def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, conn in conns:
                await conn.quit()


def _outcomes(result: DeliveryResult, relayed: bool) -> list[Outcome]:
    server = result.server
    return [
        Outcome(
            _STATUS[str(r.status)],
            r.code,
            r.enhanced_code,
            r.text,
            server,
            dsn_downstream=bool(result.dsn),
            relayed=relayed,
        )
        for r in result.recipients
    ]


def _send_options(message: QueuedMessage) -> dict[str, Any]:
    params = {k.upper(): v for k, v in message.mail_params.items()}
    body = (params.get("BODY") or "").upper()
    return {
        "smtputf8": True if "SMTPUTF8" in params else None,
        "eightbit": True if body in ("8BITMIME", "BINARYMIME") else None,
        "ret": params.get("RET"),
        "envid": params.get("ENVID"),
    }


def _recipients(recipients: Sequence[Recipient]) -> list[client.Recipient]:
    return [client.Recipient.from_params(r.address, r.params) for r in recipients]


class _Pooled:
    """Deliveries over pooled connections to one server."""

    kind = "?"
    final = False
    protocol = "smtp"

    def __init__(self, settings: ClientSettings, idle_timeout: float) -> None:
        self.settings = settings
        self.pool = ConnectionPool(idle_timeout)

    async def _connect(self, destination: str) -> ClientConnection:
        raise NotImplementedError

    async def _deliver_to(
        self, destination: str, message: QueuedMessage, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        rcpts = _recipients(recipients)
        options = _send_options(message)
        for _ in range(2):  # a pooled connection may have gone stale: once more on a new one
            conn = self.pool.take(destination)
            reused = conn is not None
            if conn is None:
                try:
                    conn = await self._connect(destination)
                except ClientError as exc:
                    return _outcomes(DeliveryResult.failed(rcpts, exc, destination), not self.final)
            try:
                with message.open() as body:
                    result = await conn.send(message.sender, rcpts, body, **options)
            except ClientError as exc:
                conn.close()
                if reused:
                    continue  # its RSET failed: nothing was sent
                return _outcomes(DeliveryResult.failed(rcpts, exc, destination), not self.final)
            except BaseException:
                conn.close()
                raise
            self.pool.give(destination, conn)
            return _outcomes(result, not self.final)
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        await self.pool.close()


class SmarthostTransport(_Pooled):
    """Every recipient to one relay host (a smarthost): ``host``, ``port``
    (25), ``tls`` (``opportunistic``, ``require``, ``verify``, ``none``),
    ``implicit_tls``, ``username``/``password`` for AUTH."""

    kind = "smarthost"
    final = False

    KEYS = (
        "type", "host", "port", "tls", "implicit_tls", "tls_name", "username", "password",
        "auth_plaintext", "helo_name", "source_address", "connect_timeout", "data_end_timeout",
        "idle_timeout",
    )  # fmt: skip

    def __init__(self, table: Mapping[str, Any], app: Any, where: str) -> None:
        check_keys(table, self.KEYS, where)
        host = table.get("host")
        if not isinstance(host, str) or not host:
            raise ValueError(f"{where}.host: required, the relay's name or address")
        self.host = host
        implicit = table.get("implicit_tls", False)
        self.port = _port(table, where, 465 if implicit is True else 25)
        if table.get("username") is not None and table.get("password") is None:
            raise ValueError(f"{where}.password: required with username")
        super().__init__(_settings(table, app, where, loops=True), _idle(table, where))

    def destination(self, recipient: Recipient) -> str:
        return f"{self.host}:{self.port}"

    async def _connect(self, destination: str) -> ClientConnection:
        return await client.connect(self.host, self.port, settings=self.settings)

    async def deliver(
        self, message: QueuedMessage, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        return await self._deliver_to(self.destination(recipients[0]), message, recipients)


class LMTPTransport(_Pooled):
    """Final delivery to a mailbox server over LMTP (Dovecot, Cyrus, another
    Bonzo): ``host`` and ``port`` (24), or ``path`` of a Unix socket; each
    recipient gets the server's own reply."""

    kind = "lmtp"
    final = True

    KEYS = ("type", "host", "port", "path", "helo_name", "connect_timeout",
            "data_end_timeout", "idle_timeout")  # fmt: skip

    def __init__(self, table: Mapping[str, Any], app: Any, where: str) -> None:
        check_keys(table, self.KEYS, where)
        path = table.get("path")
        host = table.get("host")
        if (path is None) == (host is None):
            raise ValueError(f"{where}: give host (and port) or path, not both or neither")
        if path is not None:
            if not isinstance(path, str) or not path:
                raise ValueError(f"{where}.path: expected a socket path, got {describe(path)}")
            base = getattr(app, "base_dir", None)
            self.path: str | None = str(base / path) if base is not None else path
            self.server = f"unix:{self.path}"
            self.host: str | None = None
            self.port = 0
        else:
            if not isinstance(host, str) or not host:
                raise ValueError(f"{where}.host: expected a name or address, got {describe(host)}")
            self.path = None
            self.host = host
            self.port = _port(table, where, 24)
            self.server = f"{host}:{self.port}"
        super().__init__(_settings(table, app, where, tls_policy="none"), _idle(table, where))

    def destination(self, recipient: Recipient) -> str:
        return self.server

    async def _connect(self, destination: str) -> ClientConnection:
        if self.path is not None:
            return await client.connect(path=self.path, protocol="lmtp", settings=self.settings)
        return await client.connect(self.host, self.port, protocol="lmtp", settings=self.settings)

    async def deliver(
        self, message: QueuedMessage, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        return await self._deliver_to(self.server, message, recipients)


class MXTransport(_Pooled):
    """Delivery to each recipient domain's mail hosts, found in DNS
    (:meth:`bonzo.dns.Resolver.resolve_mx`): tried in order until one
    answers; TLS opportunistic unless ``tls`` or ``tls_policies`` (per
    domain) ask for ``require`` or ``verify``."""

    kind = "mx"
    final = False

    KEYS = ("type", "port", "tls", "tls_policies", "helo_name", "source_address",
            "connect_timeout", "data_end_timeout", "idle_timeout")  # fmt: skip

    def __init__(self, table: Mapping[str, Any], app: Any, where: str) -> None:
        check_keys(table, self.KEYS, where)
        self.resolver = getattr(app, "dns", None)
        self.port = _port(table, where, 25)
        base = _settings(table, app, where, loops=True)
        policies = table.get("tls_policies", {})
        if not isinstance(policies, Mapping):
            raise ValueError(f"{where}.tls_policies: expected a table of domain = policy")
        self.policies: dict[str, ClientSettings] = {}
        for domain, policy in policies.items():
            try:
                self.policies[config_domain(domain)] = base.replace(tls_policy=policy)
            except ValueError as exc:
                raise ValueError(f"{where}.tls_policies.{domain}: {exc}") from None
        super().__init__(base, _idle(table, where))

    def destination(self, recipient: Recipient) -> str:
        return recipient.domain

    def _settings_for(self, domain: str, host: str) -> ClientSettings:
        settings = self.policies.get(domain, self.settings)
        return settings.replace(tls_name=host)

    async def deliver(
        self, message: QueuedMessage, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        domain = recipients[0].domain
        rcpts = _recipients(recipients)
        conn = self.pool.take(domain)
        if conn is not None:
            self.pool.give(domain, conn)  # _deliver_to takes it again
            return await self._deliver_to(domain, message, recipients)
        if self.resolver is None:
            return _deferred(rcpts, 451, "4.3.5", "DNS lookups are off: set [dns] nameservers")
        try:
            mx = await self.resolver.resolve_mx(domain)
        except DNSError as exc:
            if exc.temporary:
                return _deferred(rcpts, 451, exc.enhanced_code, str(exc))
            return [Outcome("failed", 550, exc.enhanced_code, str(exc), domain) for _ in rcpts]
        last: ClientError | None = None
        for host, address in mx.addresses:
            try:
                conn = await client.connect(
                    address, self.port, settings=self._settings_for(domain, host)
                )
            except ClientError as exc:
                log.info("queue: %s: %s [%s] failed: %s", domain, host, address, exc)
                last = exc
                continue
            self.pool.give(domain, conn)
            return await self._deliver_to(domain, message, recipients)
        if last is not None:
            return _outcomes(DeliveryResult.failed(rcpts, last, domain), True)
        return _deferred(rcpts, 451, "4.4.4", f"No mail host of {domain} could be reached")

    async def _connect(self, destination: str) -> ClientConnection:
        # A pooled connection went stale: look the hosts up again.
        try:
            mx = await self.resolver.resolve_mx(destination)
        except DNSError as exc:
            code = 451 if exc.temporary else 550
            reply = client.Reply(code, exc.enhanced_code, str(exc), remote=False)
            raise ClientError(client.Stage.CONNECT, reply) from None
        last: ClientError | None = None
        for host, address in mx.addresses:
            try:
                return await client.connect(
                    address, self.port, settings=self._settings_for(destination, host)
                )
            except ClientError as exc:
                last = exc
        assert last is not None
        raise last


def _deferred(
    rcpts: Sequence[client.Recipient], code: int, enhanced: str, text: str
) -> list[Outcome]:
    return [Outcome.deferred(code, enhanced, text, "dns") for _ in rcpts]


def _idle(table: Mapping[str, Any], where: str) -> float:
    value = table.get("idle_timeout", 30)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{where}.idle_timeout: expected seconds, got {describe(value)}")
    return float(value)

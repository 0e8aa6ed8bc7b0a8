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
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from bonzo import client
from bonzo.client import (
    TLS_POLICIES,
    ClientConnection,
    ClientError,
    ClientSettings,
    DeliveryResult,
)
from bonzo.config import SOCKET_PATH_MAX
from bonzo.dns import DNSError
from bonzo.schema import Key, Schema
from bonzo.settings import host_port

from .._client import client_settings as _settings
from .._config import config_domain, describe, local_address
from .keys import positive, type_key
from .outcome import Outcome
from .spool import QueuedMessage, Recipient

__all__ = [
    "ConnectionPool",
    "SmarthostTransport",
    "LMTPTransport",
    "MXTransport",
    "SMARTHOST",
    "LMTP",
    "MX",
]

log = logging.getLogger("bonzo.plugins.queue")

_STATUS = {"delivered": "delivered", "refused": "failed", "deferred": "deferred"}


# ------------------------------------------------------------- declarations
def _word(value: str) -> str:
    # What an EHLO name or a TLS server name may be (bonzo.client's rule).
    if not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError(f"expected printable ASCII without spaces, got {describe(value)}")
    return value


def _policies(table: dict[str, Any]) -> dict[str, str]:
    """``tls_policies``: canonical domain -> a TLS policy."""
    out = {}
    for domain, policy in table.items():
        where = f'."{domain}"'
        if policy not in TLS_POLICIES:
            raise ValueError(
                f"{where}: expected one of {', '.join(TLS_POLICIES)}, got {describe(policy)}"
            )
        try:
            out[config_domain(domain)] = policy
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return out


def _port(default: int | None, doc: str) -> Key:
    return Key("port", "int", default=default, minimum=1, maximum=65535, doc=doc)


_TLS_TEXT = (
    '``"opportunistic"``: STARTTLS when offered, the certificate not checked (a '
    'failed handshake is tried again once without TLS); ``"require"``: STARTTLS '
    'or defer, the certificate not checked; ``"verify"``: STARTTLS and a '
    'certificate valid for the server\'s name, or defer; ``"none"``: never '
    "STARTTLS. ``verify`` trusts the system's CA store (OpenSSL's default paths, "
    "which ``SSL_CERT_FILE``/``SSL_CERT_DIR`` in the daemon's environment change; "
    "read at start-up and at each reload), or only ``tls_ca_file``'s CAs when it is set."
)
TLS = Key("tls", "choice", default="opportunistic", choices=TLS_POLICIES,
          doc=f"The TLS policy: {_TLS_TEXT}")  # fmt: skip
TLS_CA_FILE = Key("tls_ca_file", "path",
                  doc="A PEM file of CA certificates that ``verify`` trusts instead "
                  "of the system's store (a private CA, a company relay's). Read at "
                  "start-up and at each reload; a missing, unreadable or empty file is "
                  "a configuration error, as is the key with a ``tls`` other than "
                  "``verify`` (for ``mx``: unless a ``tls_policies`` entry is "
                  "``verify``).")  # fmt: skip
HELO_NAME = Key("helo_name", convert=_word,
                doc="The name given in ``EHLO`` (default: ``[server] hostname``). A "
                "server that greets with this name or the hostname is this server: "
                "a loop, deferred (``451 4.4.6``).")  # fmt: skip
LHLO_NAME = Key(
    "helo_name", convert=_word, doc="The name given in ``LHLO`` (default: ``[server] hostname``)."
)
SOURCE_ADDRESS = Key("source_address", convert=local_address,
                     doc="The local IP address to connect from (default: the system's "
                     "choice).")  # fmt: skip
CONNECT_TIMEOUT = Key("connect_timeout", "duration", default=30.0, convert=positive,
                      doc="Seconds to open a connection.")  # fmt: skip
DATA_END_TIMEOUT = Key("data_end_timeout", "duration", default=600.0, convert=positive,
                       doc="Seconds to wait for the reply to the final dot (for "
                       "each recipient's reply, over LMTP).")  # fmt: skip
PIPELINING = Key("pipelining", "bool", default=True,
                 doc="Send each message's envelope as one group (RFC 2920) when the "
                 "server offers ``PIPELINING``: two round trips a message; ``false`` for "
                 "a server that mishandles it.")  # fmt: skip
IDLE_TIMEOUT = Key("idle_timeout", "duration", default=30.0, minimum=0,
                   doc="Seconds a connection is kept open for the next message to the "
                   "same destination (``0``: not kept).")  # fmt: skip

#: The keys of an ``mx`` route or transport.
MX = Schema(
    type_key("mx"),
    _port(25, "The port of the mail hosts."),
    TLS,
    TLS_CA_FILE,
    Key("tls_policies", "table", default={}, convert=_policies,
        doc="The TLS policy for some recipient domains, replacing ``tls``: "
        'domain = policy, e.g. ``{ "bank.example" = "verify" }``.'),
    HELO_NAME,
    SOURCE_ADDRESS,
    CONNECT_TIMEOUT,
    DATA_END_TIMEOUT,
    PIPELINING,
    IDLE_TIMEOUT,
)  # fmt: skip

#: The keys of a ``smarthost`` route or transport.
SMARTHOST = Schema(
    type_key("smarthost"),
    Key("host", required=True, doc="The relay's name or address."),
    _port(None, "The relay's port (default ``25``, or ``465`` with ``implicit_tls``)."),
    TLS,
    TLS_CA_FILE,
    Key("implicit_tls", "bool", default=False,
        doc="TLS from the first byte (port 465, RFC 8314) instead of STARTTLS."),
    Key("tls_name", convert=_word,
        doc="The name the relay's certificate must show, and sent in SNI "
        "(default: ``host``)."),
    Key("username",
        doc="Authenticate (``AUTH PLAIN``, else ``LOGIN``) as this user. With "
        "``tls = \"none\"`` (and no ``implicit_tls``) it is a configuration error "
        "unless ``auth_plaintext`` is true: no delivery could ever authenticate."),
    Key("password", "secret",
        doc='The password of ``username``: ``{ "$env" = "NAME" }`` or '
        '``{ "$file" = "/path" }`` keeps it out of the file.'),
    Key("auth_plaintext", "bool", default=False,
        doc="Authenticate even over a connection that is not encrypted (by "
        "default such a delivery is deferred rather than expose the password)."),
    HELO_NAME,
    SOURCE_ADDRESS,
    CONNECT_TIMEOUT,
    DATA_END_TIMEOUT,
    PIPELINING,
    IDLE_TIMEOUT,
    together=[("username", "password")],
)  # fmt: skip


def _socket_path(path: Path) -> Path:
    # A longer one fails at every delivery (connect(): "AF_UNIX path too
    # long"): refused here, as a listener's path is.
    size = len(os.fsencode(path))
    if size > SOCKET_PATH_MAX:
        raise ValueError(
            f"{path}: {size} octets, longer than a Unix socket's path may be "
            f"({SOCKET_PATH_MAX}): choose a shorter one"
        )
    return path


def _host_or_path(values: dict[str, Any]) -> None:
    if values["host"] is None and values["path"] is None:
        raise ValueError("host: give host (and port) or path")


#: The keys of an ``lmtp`` route or transport.
LMTP = Schema(
    type_key("lmtp"),
    Key("host", doc="The LMTP server's name or address."),
    _port(24, "Its port."),
    Key("path", "path", convert=_socket_path,
        doc=f"Or the path of its Unix socket (at most {SOCKET_PATH_MAX} octets, "
        "the system's limit)."),
    LHLO_NAME,
    CONNECT_TIMEOUT,
    DATA_END_TIMEOUT,
    PIPELINING,
    IDLE_TIMEOUT,
    exclusive=[("host", "path")],
    check=_host_or_path,
)  # fmt: skip


def _client_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """The given client settings of a parsed transport table, for
    :func:`~bonzo_plugins._client.client_settings` (which reads what is there)."""
    return {k: v for k, v in values.items() if v is not None}


#: Seconds :meth:`ConnectionPool.close` gives each connection's ``QUIT``
#: (at a stop) before it aborts the connection: a server that stopped
#: answering must not hold the stop for ``quit_timeout`` (20 s).
CLOSE_TIMEOUT = 5.0


#: Idle connections one pool (one transport) keeps at most: past it, the
#: one idle longest is closed. Each holds a descriptor, counted in the
#: plugin's ``open_files``.
MAX_IDLE = 20


class ConnectionPool:
    """Idle connections by destination, for reuse (at most ``max_idle``)."""

    def __init__(
        self,
        idle_timeout: float = 30.0,
        close_timeout: float = CLOSE_TIMEOUT,
        max_idle: int = MAX_IDLE,
    ) -> None:
        self.idle_timeout = idle_timeout
        self.close_timeout = close_timeout
        self.max_idle = max_idle
        self._idle: dict[str, list[tuple[float, ClientConnection]]] = {}
        #: ``QUIT`` under way, and on which connection.
        self._quitting: dict[asyncio.Future[Any], ClientConnection] = {}

    def _quit(self, conn: ClientConnection) -> None:
        """Say ``QUIT`` on ``conn`` in the background (kept, for :meth:`close`)."""
        task = asyncio.ensure_future(conn.quit())
        self._quitting[task] = conn
        task.add_done_callback(lambda done: self._quitting.pop(done, None))

    def take(self, destination: str) -> ClientConnection | None:
        """An idle, still usable connection to ``destination``, if any."""
        idle = self._idle.get(destination, [])
        now = time.monotonic()
        while idle:
            since, conn = idle.pop()
            if conn.usable and now - since < self.idle_timeout:
                return conn
            self._quit(conn)
        return None

    def give(self, destination: str, conn: ClientConnection) -> None:
        """Keep ``conn`` for the next message to ``destination`` (or close it
        if it is no longer usable)."""
        if not conn.usable:
            conn.close()
            return
        if sum(len(idle) for idle in self._idle.values()) >= self.max_idle:
            # Full: the connection idle longest goes (a descriptor each; many
            # destinations must not keep one open each for idle_timeout).
            oldest = min(self._idle, key=lambda d: self._idle[d][0][0])
            _, stale = self._idle[oldest].pop(0)
            if not self._idle[oldest]:
                del self._idle[oldest]
            self._quit(stale)
        self._idle.setdefault(destination, []).append((time.monotonic(), conn))

    def expire(self) -> int:
        """Close (``QUIT``, in the background) the connections idle for
        ``idle_timeout`` seconds or more, or no longer usable; the runner
        calls this every second. Returns how many it closed."""
        now = time.monotonic()
        closed = 0
        for destination, idle in list(self._idle.items()):
            keep = []
            for since, conn in idle:
                if now - since >= self.idle_timeout or not conn.usable:
                    self._quit(conn)
                    closed += 1
                else:
                    keep.append((since, conn))
            if keep:
                self._idle[destination] = keep
            else:
                del self._idle[destination]
        return closed

    async def close(self) -> None:
        """``QUIT`` every idle connection and wait for the ``QUIT`` under
        way: all at once, and at most :attr:`close_timeout` seconds; a
        connection still not closed then is aborted."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for _, conn in conns:
                self._quit(conn)
        quitting = dict(self._quitting)
        if not quitting:
            return
        _, late = await asyncio.wait(quitting, timeout=self.close_timeout)
        for task in late:
            task.cancel()
            quitting[task].close()
        if late:
            await asyncio.gather(*late, return_exceptions=True)


def _outcomes(result: DeliveryResult, relayed: bool, tls: str = "") -> list[Outcome]:
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
            remote=r.reply.remote,
            too_many=r.too_many,
            tls=tls,
        )
        for r in result.recipients
    ]


def _send_options(message: QueuedMessage) -> dict[str, Any]:
    params = {k.upper(): v for k, v in message.mail_params.items()}
    body = (params.get("BODY") or "").upper()
    return {
        "smtputf8": True if "SMTPUTF8" in params else None,
        "eightbit": True if body == "8BITMIME" else None,
        # Sent with BDAT as it is, or refused (554 5.6.3): never converted.
        "binary": body == "BINARYMIME",
        "ret": params.get("RET"),
        "envid": params.get("ENVID"),
    }


def _fitted(
    options: dict[str, Any],
    conn: ClientConnection,
    message: QueuedMessage,
    recipients: Sequence[Recipient],
    body: IO[bytes],
) -> dict[str, Any]:
    """``options`` for a server that lacks 8BITMIME or SMTPUTF8: a
    declaration the message does not need is dropped (RFC 6152 3 and RFC
    6531 3.2 restrict only content and addresses that need them), so that
    7-bit mail declared ``BODY=8BITMIME``, or mail declared ``SMTPUTF8``
    with ASCII addresses and header fields (UTF-8 in the body needs only
    8BITMIME, RFC 6532 3.1), is delivered rather than bounced. What does
    need them is still refused (``554 5.6.3``, ``553 5.6.7``): there is
    no conversion."""
    eightbit = options["eightbit"] and not conn.supports("8BITMIME")
    smtputf8 = options["smtputf8"] and not conn.supports("SMTPUTF8")
    if not (eightbit or smtputf8):
        return options
    fitted = dict(options)
    if eightbit:
        fitted["eightbit"] = None  # the client scans: 7-bit content goes as it is
    if smtputf8:
        ascii_addresses = message.sender.isascii() and all(r.address.isascii() for r in recipients)
        if ascii_addresses and not _header_8bit(body):
            fitted["smtputf8"] = None
    return fitted


def _header_8bit(body: IO[bytes], chunk: int = 1 << 16) -> bool:
    """True if the header section of the message in ``body`` (from its
    position, which is kept: up to the first empty line, or the end) has an
    octet outside ASCII. Read a line at a time, at most ``chunk`` octets."""
    start = body.tell()
    try:
        line_start = True
        while True:
            piece = body.readline(chunk)
            if not piece:
                return False
            # A piece that starts a line and is only its end is the empty line
            # (a piece cut off a long line is no line start).
            if line_start and piece in (b"\r\n", b"\n"):
                return False
            if not piece.isascii():
                return True
            line_start = piece.endswith(b"\n")
    finally:
        body.seek(start)


def _recipients(recipients: Sequence[Recipient]) -> list[client.Recipient]:
    return [client.Recipient.from_params(r.address, r.params) for r in recipients]


class _Pooled:
    """Deliveries over pooled connections to one server."""

    kind = "?"
    final = False
    #: Each recipient gets the message in its own mailbox (see
    #: :attr:`.outcome.Transport.by_recipient`).
    by_recipient = True

    @staticmethod
    def delivers_by_recipient(values: Mapping[str, Any]) -> bool:
        """:attr:`by_recipient` of a transport made from ``values``."""
        return True

    protocol = "smtp"

    def __init__(self, settings: ClientSettings, idle_timeout: float) -> None:
        self.settings = settings
        self.pool = ConnectionPool(idle_timeout)

    async def _connect(self, destination: str) -> ClientConnection:
        raise NotImplementedError

    async def _deliver_to(
        self, destination: str, message: QueuedMessage, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        # An address no command can carry fails alone, for good, rather than
        # the whole group at every attempt (Bonzo's server accepts none).
        # The same for a parameter a hand-edited queue file made invalid.
        if not client.sendable(message.sender):
            bad = Outcome("failed", 553, "5.1.7", "The sender address cannot be sent on", "queue")
            return [bad] * len(recipients)
        options = _send_options(message)
        problem = client.options_problem(options["ret"], options["envid"])
        if problem is not None:
            text = f"The message's DSN parameters cannot be sent on: {problem[:200]}"
            return [Outcome("failed", 554, "5.5.4", text, "queue")] * len(recipients)
        rcpts = _recipients(recipients)
        refused: dict[int, Outcome] = {}
        for i, r in enumerate(rcpts):
            if not r.address or not client.sendable(r.address):
                text = "The recipient address cannot be sent on"
                refused[i] = Outcome("failed", 553, "5.1.3", text, "queue")
            elif (problem := client.recipient_problem(r)) is not None:
                text = f"The recipient's DSN parameters cannot be sent on: {problem[:200]}"
                refused[i] = Outcome("failed", 553, "5.5.4", text, "queue")
        if refused:
            rest = [r for i, r in enumerate(recipients) if i not in refused]
            done = iter(await self._deliver_to(destination, message, rest) if rest else [])
            return [refused[i] if i in refused else next(done) for i in range(len(recipients))]
        # A kept connection may have gone stale (its RSET fails: nothing was
        # sent): then a new one, never another kept one, which a restarted
        # or half-open server has made as stale. Two tries at most.
        conn = self.pool.take(destination)
        reused = conn is not None
        while True:
            if conn is None:
                try:
                    conn = await self._connect(destination)
                except ClientError as exc:
                    return _outcomes(DeliveryResult.failed(rcpts, exc, destination), not self.final)
            try:
                with message.open() as body:
                    fitted = _fitted(options, conn, message, recipients, body)
                    result = await conn.send(message.sender, rcpts, body, **fitted)
            except ClientError as exc:
                conn.close()
                if reused:
                    conn, reused = None, False
                    continue
                return _outcomes(DeliveryResult.failed(rcpts, exc, destination), not self.final)
            except BaseException:
                conn.close()
                raise
            self.pool.give(destination, conn)
            tls = conn.tls_summary if conn.protocol == "SMTP" else ""
            return _outcomes(result, not self.final, tls)

    def expire(self) -> int:
        """Close the pooled connections left idle for ``idle_timeout``."""
        return self.pool.expire()

    async def close(self) -> None:
        await self.pool.close()


class SmarthostTransport(_Pooled):
    """Every recipient to one relay host (a smarthost): ``host``, ``port``
    (25), ``tls`` (``opportunistic``, ``require``, ``verify``, ``none``),
    ``implicit_tls``, ``username``/``password`` for AUTH."""

    kind = "smarthost"
    final = False

    KEYS = tuple(SMARTHOST.names)

    def __init__(self, values: Mapping[str, Any], app: Any, where: str) -> None:
        self.host: str = values["host"]
        port = values["port"]
        self.port: int = port if port is not None else 465 if values["implicit_tls"] else 25
        settings = _settings(_client_keys(values), app, where, loops=True)
        super().__init__(settings, values["idle_timeout"])

    def destination(self, recipient: Recipient) -> str:
        return host_port(self.host, self.port)

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

    KEYS = tuple(LMTP.names)

    def __init__(self, values: Mapping[str, Any], app: Any, where: str) -> None:
        path = values["path"]
        self.path: str | None = str(path) if path is not None else None
        self.host: str | None = None if path is not None else values["host"]
        self.port: int = 0 if path is not None else values["port"]
        self.server = (
            f"unix:{self.path}" if path is not None else host_port(str(self.host), self.port)
        )
        settings = _settings(_client_keys(values), app, where, tls_policy="none")
        super().__init__(settings, values["idle_timeout"])

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

    KEYS = tuple(MX.names)

    def __init__(self, values: Mapping[str, Any], app: Any, where: str) -> None:
        self.resolver = getattr(app, "dns", None)
        self.port: int = values["port"]
        base = _settings(
            _client_keys(values),
            app,
            where,
            loops=True,
            verify_elsewhere="verify" in values["tls_policies"].values(),
        )
        self.policies: dict[str, ClientSettings] = {
            domain: base.replace(tls_policy=policy)
            for domain, policy in values["tls_policies"].items()
        }
        super().__init__(base, values["idle_timeout"])

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

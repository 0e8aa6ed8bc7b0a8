"""Unit testing support for asynchronous code.

:class:`AsyncSMTPTestCase` starts an :class:`~bonzo.server.SMTPServer` on an
unused port of 127.0.0.1 for each test and offers small helpers to talk SMTP
to it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import smtplib
import socket
from pathlib import Path
from typing import Any

from tornado.escape import utf8
from tornado.iostream import IOStream
from tornado.testing import AsyncTestCase, bind_unused_port, get_async_test_timeout

from .dispatch import Dispatcher
from .errors import SMTPError
from .hooks import PluginSet, offered_settings
from .lmtp import LMTPProtocol
from .protocol import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    DataChunk,
    Event,
    Policy,
    Refusal,
    SMTPProtocol,
    StartTLS,
)
from .server import SMTPServer
from .session import Session
from .settings import ListenerSettings, SMTPSettings

__all__ = ["AsyncSMTPTestCase", "PluginTestServer", "SessionTester", "make_session"]


class AsyncSMTPTestCase(AsyncTestCase):
    """A test case that starts up an SMTP server.

    Subclasses must override :meth:`get_request_callback`, which returns a
    :class:`~bonzo.server.SMTPServer` callback to be tested.
    """

    def setUp(self) -> None:
        super().setUp()
        sock, port = bind_unused_port()
        self.__port = port
        self._request_callback = self.get_request_callback()
        self.smtp_server = self.get_smtp_server()
        self.smtp_server.add_sockets([sock])

    def get_smtp_server(self) -> SMTPServer:
        """Returns the :class:`~bonzo.server.SMTPServer` used by the test.
        Override it to test a server built another way."""
        return SMTPServer(self._request_callback, **self.get_smtpserver_options())

    def get_request_callback(self) -> Any:
        """Should be overridden by subclasses to return a
        :class:`~bonzo.server.SMTPServer` callback."""
        raise NotImplementedError()

    def get_smtpserver_options(self) -> dict[str, Any]:
        """May be overridden by subclasses to return additional keyword
        arguments for the server (settings such as ``max_message_size``)."""
        return {}

    def get_smtp_port(self) -> int:
        """Returns the port used by the server. A new port is chosen for each test."""
        return self.__port

    def connect(self, read_response: bool = True) -> None:
        """Open a connection to the server as ``self.stream``.

        :arg bool read_response: read (and discard) the greeting at once.
        """
        self.stream = IOStream(socket.socket())
        self.io_loop.run_sync(lambda: self.stream.connect(("127.0.0.1", self.get_smtp_port())))
        if read_response:
            self.read_response()

    def read_response(self) -> bytes:
        """Read one whole reply (every line of a multi-line one) and return it."""

        async def read() -> bytes:
            lines = []
            while True:
                line = await self.stream.read_until(b"\r\n", max_bytes=4096)
                lines.append(line)
                if line[3:4] != b"-":
                    return b"".join(lines)

        reply: bytes = self.io_loop.run_sync(read, timeout=get_async_test_timeout())
        return reply

    def send_mail(self, hostname: str, mail: str, rcpt: list[str], data: str) -> bytes:
        """Sends a coherent sequence of commands to send a message. Returns
        the reply to the end of the ``DATA`` command."""
        self.stream.write(utf8("HELO %s\r\n" % hostname))
        self.read_response()
        self.stream.write(utf8("MAIL FROM:%s\r\n" % mail))
        self.read_response()
        for address in rcpt:
            self.stream.write(utf8("RCPT TO:%s\r\n" % address))
            self.read_response()
        self.stream.write(b"DATA\r\n")
        self.read_response()
        self.stream.write(utf8("%s\r\n.\r\n" % data))
        return self.read_response()

    def close(self) -> None:
        """Closes the stream."""
        self.stream.close()
        del self.stream

    def tearDown(self) -> None:
        self.smtp_server.stop()
        # Close the sessions and let them finish their cleanup.
        self.io_loop.run_sync(self.smtp_server.close_all_connections)
        super().tearDown()


class PluginApp:
    """What :class:`PluginTestServer` gives plugins as ``app`` (in
    ``bonzo_configure``, ``bonzo_startup``, ``bonzo_shutdown``): the parts of
    :class:`bonzo.app.MailApp` a plugin uses — :attr:`base_dir` (relative
    paths in its table are taken from there), :attr:`settings`, :attr:`dns`
    (off unless given), :attr:`store` (in this process) and :attr:`plugins`.
    """

    def __init__(
        self, base_dir: Path, settings: SMTPSettings, plugins: PluginSet, dns: Any = None
    ) -> None:
        from .dns import DNSSettings, Resolver
        from .store import MemoryStore

        self.base_dir = base_dir
        self.settings = settings
        self.plugins = plugins
        self.dns = dns if dns is not None else Resolver(DNSSettings())
        self.store = MemoryStore()
        self.config = None


class PluginTestServer:
    """Serve plugins on unused ports of 127.0.0.1, in a background thread,
    for the tests of a plugin::

        import smtplib

        from bonzo import errors, hookimpl
        from bonzo.testing import PluginTestServer

        class NoNightMail:
            @hookimpl
            def bonzo_configure(self, config, app):
                self.word = config.get("word", "night")

            @hookimpl
            def bonzo_helo(self, name):
                if self.word in name:
                    raise errors.PermanentError(550, "Not at night", "5.7.1")

        config = {"night": {"word": "dark"}}
        with PluginTestServer(("night", NoNightMail()), config=config) as server:
            with server.client(remote_ip="203.0.113.9", helo="mx.example") as client:
                client.sendmail("a@example.org", ["b@example.com"], "Subject: hi\\r\\n\\r\\n")
            with server.client(helo="dark.example") as client:
                assert client.helo()[0] == 550
        assert server.envelopes == [("a@example.org", ["b@example.com"])]
        assert server.sessions[0] == ("203.0.113.9", "mx.example")

    :arg plugins: ``(name, plugin)`` pairs (or bare plugin objects), in the
        order they run.
    :arg config: each plugin's ``[plugins.<name>]`` table, by name, given to
        its ``bonzo_configure`` with :attr:`app`.
    :arg capture: ``True`` (default): add, last, a plugin that accepts every
        recipient and delivers by keeping the message in :attr:`messages`;
        ``"recipients"``: it only accepts recipients (your plugins deliver);
        ``"delivery"``: it only delivers (your plugins own recipients);
        ``False``: none.
    :arg base_dir: ``app.base_dir`` (default: a temporary directory, removed
        at the end).
    :arg dns: the :class:`~bonzo.dns.Resolver` plugins get as ``app.dns``
        (default: DNS off), e.g. one on a test DNS server.
    :arg timeout: the hook timeout, in seconds.
    :arg log_level: the level :attr:`logs` keeps from (default ``"INFO"``:
        the access line, each refusal's line, the plugins' own info). The
        root logger's level is lowered to it while the server runs (never
        raised), then restored.
    :arg listener: the :class:`~bonzo.settings.ListenerSettings` of the
        server's ports (what a ``[[listeners]]`` table says: TLS, AUTH), e.g.
        ``ListenerSettings(auth_plaintext=True)`` to offer AUTH without TLS,
        so that a client can ``login()`` to a :func:`bonzo_auth` plugin.
        Default: plain SMTP, no AUTH. Neither a Unix socket nor PROXY
        (:meth:`client` sends that header itself); with ``implicit_tls``,
        connect an :class:`smtplib.SMTP_SSL` to ``server.port``.
    :arg settings: :class:`~bonzo.settings.SMTPSettings` fields.

    As in the daemon, ``DSN`` is offered only when one of the plugins
    honours it (``honours_dsn = True``: :ref:`dsn-who-reports`).

    :meth:`client` connects with any client address and HELO name the
    plugins should see. Startup and shutdown hooks run as in the daemon, and
    everything Bonzo and the plugins log while the server runs is kept in
    :attr:`logs`. The server runs its own event loop, so the test may use
    blocking clients (smtplib, swaks). A pytest fixture, ``bonzo_server``,
    builds one and stops it after the test (:mod:`bonzo.pytest_plugin`).
    """

    def __init__(
        self,
        *plugins: Any,
        config: dict[str, dict[str, Any]] | None = None,
        capture: bool | str = True,
        base_dir: str | Path | None = None,
        dns: Any = None,
        timeout: float = 10.0,
        log_level: int | str = "INFO",
        listener: ListenerSettings | None = None,
        **settings: Any,
    ) -> None:
        import tempfile

        if capture not in (True, False, "recipients", "delivery"):
            raise ValueError(
                f'capture must be True, False, "recipients" or "delivery", not {capture!r}'
            )
        listener = listener if listener is not None else ListenerSettings()
        if not isinstance(listener, ListenerSettings):
            raise TypeError(f"listener must be a ListenerSettings, not {listener!r}")
        if listener.unix_socket or listener.proxy_protocol:
            raise ValueError(
                "listener: the test server listens on TCP ports of 127.0.0.1, and client() "
                "sends the PROXY header itself: no unix_socket or proxy_protocol"
            )
        misplaced = sorted(set(settings) & {f.name for f in dataclasses.fields(ListenerSettings)})
        if misplaced:
            raise TypeError(
                f"{', '.join(misplaced)}: a listener option, not an SMTPSettings field; pass "
                f"listener=ListenerSettings({misplaced[0]}=...)"
            )
        #: The :class:`~bonzo.settings.ListenerSettings` of :attr:`port` (and,
        #: with a PROXY header, of :attr:`proxy_port`).
        self.listener = listener
        self.host = "127.0.0.1"
        self.port = 0
        #: The port that takes a PROXY header first (what :meth:`client` uses
        #: to show the plugins another client address).
        self.proxy_port = 0
        #: Messages delivered to the capturing plugin (whole, trace header first).
        self.messages: list[bytes] = []
        #: Their envelopes' ``(mail_from, recipients)``: the recipients (as
        #: sent) it was delivered to, without those a plugin refused
        #: (``refuse_recipient``) or removed (``remove_recipient``).
        self.envelopes: list[tuple[str, list[str]]] = []
        #: ``(client address, HELO name)`` of each session that delivered a
        #: message to the capturing plugin.
        self.sessions: list[tuple[str, str | None]] = []
        #: Log records of the ``tornado`` and ``bonzo`` loggers (and the
        #: plugins' own) while the server ran, from ``log_level`` up.
        self.logs: list[logging.LogRecord] = []
        level = logging.getLevelName(log_level) if isinstance(log_level, str) else log_level
        if not isinstance(level, int):
            raise ValueError(f"log_level: not a logging level: {log_level!r}")
        self._log_level = level
        self._root_level: int | None = None  # the root logger's, while lowered
        self._tmp = None if base_dir is not None else tempfile.TemporaryDirectory()
        try:
            self._setup(plugins, config, capture, timeout, base_dir, dns, settings)
        except BaseException:
            # A plugin refused its configuration (say): leave nothing behind.
            if self._tmp is not None:
                self._tmp.cleanup()
            raise

    def _setup(
        self,
        plugins: tuple[Any, ...],
        config: dict[str, dict[str, Any]] | None,
        capture: bool | str,
        timeout: float,
        base_dir: str | Path | None,
        dns: Any,
        settings: dict[str, Any],
    ) -> None:
        import asyncio
        import threading

        self.base_dir = Path(base_dir) if base_dir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.plugins = PluginSet(timeout=timeout)
        for item in plugins:
            name, plugin = item if isinstance(item, tuple) else (type(item).__name__, item)
            self.plugins.register(plugin, name)
        if capture:
            self.plugins.register(_capture(self, capture), "bonzo.testing.capture")
        settings.setdefault("hostname", "bonzo.test")
        self.settings = SMTPSettings(**settings)
        #: What the plugins get as ``app``.
        self.app = PluginApp(self.base_dir, self.settings, self.plugins, dns)
        tables = config or {}
        unknown = set(tables) - set(self.plugins.names)
        if unknown:
            raise ValueError(f"config for unknown plugin(s): {', '.join(sorted(unknown))}")
        for call in self.plugins.calls["bonzo_configure"]:
            args = (tables.get(call.plugin, {}), self.app)
            call.function(*[args[i] for i in call.indexes])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._servers: list[SMTPServer] = []
        self._handler = _Keep(self.logs, self._log_level)

    @property
    def log_text(self) -> str:
        """The kept log records, one formatted line each."""
        return "\n".join(f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.logs)

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> PluginTestServer:
        """Start serving (``with`` does this)."""
        root = logging.getLogger()
        root.addHandler(self._handler)
        if root.getEffectiveLevel() > self._log_level:
            self._root_level = root.level
            root.setLevel(self._log_level)
        self._thread.start()

        async def start() -> None:
            await self.plugins.call_observers("bonzo_startup", self.app, strict=True)
            sock, self.port = bind_unused_port()
            # As the daemon: DSN only when a plugin honours it.
            settings = offered_settings(self.settings, self.plugins)
            server = SMTPServer(plugins=self.plugins, settings=settings, listener=self.listener)
            server.add_sockets([sock])
            proxied, self.proxy_port = bind_unused_port()
            listener = dataclasses.replace(
                self.listener,
                proxy_protocol=True,
                proxy_trusted=(ipaddress.ip_network("127.0.0.1/32"),),
            )
            behind = SMTPServer(plugins=self.plugins, settings=settings, listener=listener)
            behind.add_sockets([proxied])
            self._servers = [server, behind]

        try:
            self._call(start())
        except BaseException:
            # A startup hook failed: stop the loop and its thread, take the
            # log handler off and remove the directory, as stop() would.
            self._close()
            raise
        return self

    def client(
        self, remote_ip: str | None = None, helo: str = "client.example", timeout: float = 10.0
    ) -> smtplib.SMTP:
        """An :class:`smtplib.SMTP` connected to the server, introducing
        itself as ``helo``; with ``remote_ip``, the plugins see that client
        address (a PROXY header says so on :attr:`proxy_port`)."""
        if remote_ip is None:
            return smtplib.SMTP(self.host, self.port, local_hostname=helo, timeout=timeout)
        address = ipaddress.ip_address(remote_ip)
        family = "TCP4" if address.version == 4 else "TCP6"
        local = "127.0.0.1" if address.version == 4 else "::1"
        header = f"PROXY {family} {address} {local} 40000 25\r\n".encode()

        class _Proxied(smtplib.SMTP):
            def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
                sock = super()._get_socket(host, port, timeout)  # type: ignore[misc]
                sock.sendall(header)
                return sock  # type: ignore[no-any-return]

        return _Proxied(self.host, self.proxy_port, local_hostname=helo, timeout=timeout)

    def stop(self) -> None:
        """Stop serving and run the shutdown hooks (``with`` does this)."""

        async def stop() -> None:
            for server in self._servers:
                await server.shutdown(grace=5.0)
            await self.plugins.call_observers("bonzo_shutdown", self.app)

        try:
            self._call(stop())
        finally:
            self._close()

    def _close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()
        root = logging.getLogger()
        root.removeHandler(self._handler)
        if self._root_level is not None:
            root.setLevel(self._root_level)
            self._root_level = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> PluginTestServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


class _Keep(logging.Handler):
    """Keeps every record (for :attr:`PluginTestServer.logs`)."""

    def __init__(self, records: list[logging.LogRecord], level: int = logging.DEBUG) -> None:
        super().__init__(level)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _Deliver:
    """Keeps every message (runs last)."""

    def __init__(self, server: PluginTestServer) -> None:
        self.server = server

    def bonzo_deliver(self, session: Any, envelope: Any) -> Any:
        from .hookspecs import Accept

        self.server.messages.append(envelope.content)
        # Not those a plugin refused or removed one by one: they got nothing.
        delivered = [envelope.rcpt_tos[i] for i in envelope.remaining_indexes]
        self.server.envelopes.append((envelope.mail_from, delivered))
        self.server.sessions.append((session.remote_ip, session.helo))
        return Accept()


class _Recipients:
    """Accepts every recipient (runs last)."""

    def bonzo_rcpt(self) -> Any:
        from .hookspecs import Accept

        return Accept()


class _Capture(_Deliver, _Recipients):
    """Accepts every recipient and keeps every message (runs last)."""


def _capture(server: PluginTestServer, mode: bool | str) -> object:
    if mode == "recipients":
        return _Recipients()
    if mode == "delivery":
        return _Deliver(server)
    return _Capture(server)


def make_session(
    remote_ip: str = "192.0.2.1",
    *,
    helo: str | None = "client.example",
    esmtp: bool = True,
    auth: str | None = None,
    auth_mechanism: str | None = None,
    tls: dict[str, Any] | None = None,
    remote_port: int = 40000,
    local_ip: str = "127.0.0.1",
    local_port: int = 25,
    settings: SMTPSettings | None = None,
) -> Session:
    """A :class:`~bonzo.session.Session` in a given state, to call a plugin's
    hooks directly in a unit test: greeted as ``helo`` (with EHLO when
    ``esmtp``), authenticated as ``auth`` (with SASL ``auth_mechanism``,
    ``"PLAIN"`` by default when ``auth`` is given), over TLS with the facts
    ``tls``.

    A session is a view of its protocol core, so the state is set there.
    """
    core = SMTPProtocol(settings or SMTPSettings(hostname="bonzo.test"), remote_ip)
    core.helo = helo
    core.esmtp = esmtp and helo is not None
    core.authenticated = auth
    if auth is not None:
        core.auth_mechanism = auth_mechanism or "PLAIN"
    if tls is not None:
        core.tls_active = True
        core.tls_info = tls
    return Session(remote_ip, remote_port, local_ip, local_port, core=core)


class SessionTester:
    """Run plugins against SMTP bytes, with no socket and no server: the
    protocol core and the same dispatcher a connection uses, driven by
    :meth:`send`. For unit tests of plugins and of the hook contract::

        tester = SessionTester(plugins)
        assert await tester.connect() == b"220 bonzo.test ESMTP\\r\\n"
        replies = await tester.send(b"EHLO client.example\\r\\nMAIL FROM:<a@example.org>\\r\\n")

    :arg plugins: the :class:`~bonzo.hooks.PluginSet` to ask.
    :arg settings: :class:`~bonzo.settings.SMTPSettings` (default: the
        defaults, with host name ``bonzo.test``); as in the daemon, ``DSN``
        is offered only when one of ``plugins`` honours it
        (``honours_dsn = True``).
    :arg policy: the listener's :class:`~bonzo.protocol.Policy`.
    :arg remote_ip: the client's address.
    :arg lmtp: speak LMTP (:class:`~bonzo.lmtp.LMTPProtocol`) instead of SMTP.

    STARTTLS is refused (``454``): TLS needs a connection. Every refusal the
    core reports is kept in :attr:`refusals` as ``(stage, code, enhanced,
    by)``.
    """

    def __init__(
        self,
        plugins: PluginSet,
        *,
        settings: SMTPSettings | None = None,
        policy: Policy | None = None,
        remote_ip: str = "192.0.2.1",
        lmtp: bool = False,
    ) -> None:
        self.settings = offered_settings(settings or SMTPSettings(hostname="bonzo.test"), plugins)
        self.plugins = plugins
        #: ``(stage, code, enhanced, by)`` of every 4xx/5xx reply.
        self.refusals: list[tuple[str, int, str, str]] = []
        kind = LMTPProtocol if lmtp else SMTPProtocol
        self.core = kind(self.settings, remote_ip, policy, on_refusal=self._refused)
        #: The session the plugins see.
        self.session = Session(remote_ip, 40000, "127.0.0.1", 25, core=self.core)
        self.dispatcher = Dispatcher(
            self.core, self.session, plugins, self.settings, send=lambda: None
        )

    def _refused(self, refusal: Refusal) -> None:
        self.refusals.append((refusal.stage, refusal.code, refusal.enhanced, refusal.by))

    async def connect(self) -> bytes:
        """Run the connect hooks; return the greeting (or the refusal)."""
        await self.dispatcher.connect()
        return self.core.data_to_send()

    async def send(self, data: bytes) -> bytes:
        """Feed ``data``, answer every event through the plugins, return the
        replies."""
        core = self.core
        core.receive_data(data)
        out = []
        while True:
            event = core.next_event()
            if event is NEED_DATA or event is CLOSED:
                break
            if event is PAUSED:
                out.append(core.data_to_send())
            elif isinstance(event, DataChunk):
                self.dispatcher.store(event.data)
            elif isinstance(event, StartTLS):
                core.reject(SMTPError(454, "TLS not available", enhanced_code="4.7.0"))
            elif isinstance(event, Event):
                await self.dispatcher.handle(event)
        out.append(core.data_to_send())
        return b"".join(out)

    async def close(self) -> None:
        """End the session: drop the envelope, run the disconnect observers."""
        self.dispatcher.end_transaction()
        await self.plugins.observe("bonzo_disconnect", (self.session,), self.session)

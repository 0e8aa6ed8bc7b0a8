"""Unit testing support for asynchronous code.

:class:`AsyncSMTPTestCase` starts an :class:`~bonzo.server.SMTPServer` on an
unused port of 127.0.0.1 for each test and offers small helpers to talk SMTP
to it.
"""

from __future__ import annotations

import socket
from typing import Any

from tornado.escape import utf8
from tornado.iostream import IOStream
from tornado.testing import AsyncTestCase, bind_unused_port, get_async_test_timeout

from .dispatch import Dispatcher
from .errors import SMTPError
from .hooks import PluginSet
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
from .settings import SMTPSettings

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


class PluginTestServer:
    """Serve plugins on an unused port of 127.0.0.1, in a background thread,
    for the tests of a plugin.

    ::

        from bonzo.testing import PluginTestServer

        def test_tags_invoices():
            with PluginTestServer(("tagger", TaggerPlugin()),
                                  config={"tagger": {"keywords": ["invoice"]}}) as server:
                with smtplib.SMTP(server.host, server.port) as client:
                    client.sendmail("a@example.org", ["b@example.com"],
                                    "Subject: invoice\\r\\n\\r\\nHi\\r\\n")
            assert server.messages[0].startswith(b"X-Bonzo-Tag: invoice\\r\\n")

    :arg plugins: ``(name, plugin)`` pairs (or bare plugin objects), in the
        order they run.
    :arg config: each plugin's ``[plugins.<name>]`` table, by name, given to
        its ``bonzo_configure``.
    :arg capture: add, last, a plugin that accepts every recipient and
        delivers by keeping the message in :attr:`messages` (set ``False``
        when the plugins under test own recipients and delivery themselves).
    :arg timeout: the hook timeout, in seconds.
    :arg settings: :class:`~bonzo.settings.SMTPSettings` fields.

    Startup and shutdown hooks run as in the daemon. The server runs its own
    event loop, so the test may use blocking clients (smtplib, swaks).
    """

    def __init__(
        self,
        *plugins: Any,
        config: dict[str, dict[str, Any]] | None = None,
        capture: bool = True,
        timeout: float = 10.0,
        **settings: Any,
    ) -> None:
        import asyncio
        import threading

        from .hooks import PluginSet
        from .settings import SMTPSettings

        self.host = "127.0.0.1"
        self.port = 0
        #: Messages delivered to the capturing plugin (whole, trace header first).
        self.messages: list[bytes] = []
        #: Their envelopes' ``(mail_from, rcpt_tos)``.
        self.envelopes: list[tuple[str, list[str]]] = []
        self.plugins = PluginSet(timeout=timeout)
        for item in plugins:
            name, plugin = item if isinstance(item, tuple) else (type(item).__name__, item)
            self.plugins.register(plugin, name)
        if capture:
            self.plugins.register(_Capture(self), "bonzo.testing.capture")
        tables = config or {}
        unknown = set(tables) - set(self.plugins.names)
        if unknown:
            raise ValueError(f"config for unknown plugin(s): {', '.join(sorted(unknown))}")
        for call in self.plugins.calls["bonzo_configure"]:
            args = (tables.get(call.plugin, {}), None)
            call.function(*[args[i] for i in call.indexes])
        settings.setdefault("hostname", "bonzo.test")
        self.settings = SMTPSettings(**settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: SMTPServer | None = None

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> PluginTestServer:
        """Start serving (``with`` does this)."""
        self._thread.start()

        async def start() -> None:
            await self.plugins.call_observers("bonzo_startup", None, strict=True)
            sock, self.port = bind_unused_port()
            self._server = SMTPServer(plugins=self.plugins, settings=self.settings)
            self._server.add_sockets([sock])

        self._call(start())
        return self

    def stop(self) -> None:
        """Stop serving and run the shutdown hooks (``with`` does this)."""

        async def stop() -> None:
            if self._server is not None:
                await self._server.shutdown(grace=5.0)
            await self.plugins.call_observers("bonzo_shutdown", None)

        try:
            self._call(stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> PluginTestServer:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


class _Capture:
    """Accepts every recipient and keeps every message (runs last)."""

    def __init__(self, server: PluginTestServer) -> None:
        self.server = server

    def bonzo_rcpt(self) -> Any:
        from .hookspecs import Accept

        return Accept()

    def bonzo_deliver(self, envelope: Any) -> Any:
        from .hookspecs import Accept

        self.server.messages.append(envelope.content)
        self.server.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return Accept()


def make_session(
    remote_ip: str = "192.0.2.1",
    *,
    helo: str | None = "client.example",
    esmtp: bool = True,
    auth: str | None = None,
    tls: dict[str, Any] | None = None,
    remote_port: int = 40000,
    local_ip: str = "127.0.0.1",
    local_port: int = 25,
    settings: SMTPSettings | None = None,
) -> Session:
    """A :class:`~bonzo.session.Session` in a given state, to call a plugin's
    hooks directly in a unit test: greeted as ``helo`` (with EHLO when
    ``esmtp``), authenticated as ``auth``, over TLS with the facts ``tls``.

    A session is a view of its protocol core, so the state is set there.
    """
    core = SMTPProtocol(settings or SMTPSettings(hostname="bonzo.test"), remote_ip)
    core.helo = helo
    core.esmtp = esmtp and helo is not None
    core.authenticated = auth
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
        defaults, with host name ``bonzo.test``).
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
        self.settings = settings or SMTPSettings(hostname="bonzo.test")
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

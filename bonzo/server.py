"""A non-blocking, single-threaded SMTP server.

:class:`SMTPServer` accepts connections and runs an
:class:`~bonzo.connection.SMTPConnection` for each. Give it either the
original Bonzo ``request_callback`` (called with an :class:`SMTPRequest` for
each message) or a :class:`~bonzo.connection.SessionHandler` that decides on
every command.
"""

from __future__ import annotations

import asyncio
import email
import email.message
from collections import Counter
from collections.abc import Callable
from typing import Any

from tornado.concurrent import Future
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream
from tornado.log import app_log, gen_log
from tornado.tcpserver import TCPServer

from . import version
from .connection import FINAL_REPLY_WAIT, SessionHandler, SMTPConnection, log_exception
from .hooks import PluginHandler, PluginSet
from .hookspecs import Accept
from .protocol import format_reply
from .session import Envelope, Session
from .settings import ListenerSettings, SMTPSettings

__all__ = [
    "SMTPServer",
    "SMTPConnection",
    "SMTPRequest",
    "CallbackHandler",
    "CallbackPlugin",
    "ConnectionCount",
]

_TCPSERVER_ARGS = ("ssl_options", "max_buffer_size", "read_chunk_size")

#: After a shutdown's grace period, how long to wait for the closed sessions
#: to finish their cleanup before returning.
_CLEANUP_WAIT = 1.0


class SMTPRequest:
    """A single SMTP request: one message and its envelope.

    .. attribute:: connection

       The :class:`~bonzo.connection.SMTPConnection` the message came on.

    .. attribute:: remote_ip

       The client's IP address.

    .. attribute:: command

       Always ``"DATA"``.

    .. attribute:: hostname

       The HELO/EHLO name the client gave.

    .. attribute:: mail

       The sender address (``""`` for the null sender).

    .. attribute:: rcpt

       The list of recipient addresses.

    .. attribute:: data

       The message content as the client sent it, as a string with ``\\n``
       line ends and no final newline (as in Bonzo 0.1). The trace header the
       server adds is in :attr:`envelope`, not here.

    .. attribute:: envelope

       The :class:`~bonzo.session.Envelope`, with the full stored message.
    """

    def __init__(
        self,
        connection: Any,
        remote_ip: str,
        command: str,
        hostname: str | None = None,
        mail: str | None = None,
        rcpt: list[str] | None = None,
        data: str | None = None,
        envelope: Envelope | None = None,
        session: Session | None = None,
    ) -> None:
        self.connection = connection
        self.remote_ip = remote_ip
        self.command = command
        self.hostname = hostname
        self.mail = mail
        self.rcpt = rcpt if rcpt is not None else []
        self.data = data
        self.envelope = envelope
        self.session = session
        self._message: email.message.Message | None = None
        self._finished: Future[None] = Future()

    @property
    def message(self) -> email.message.Message:
        """The message parsed from :attr:`data` with :func:`email.message_from_string`
        (on first use)."""
        if self._message is None:
            self._message = email.message_from_string(self.data or "")
        return self._message

    def finish(self) -> None:
        """Accept the message: the client gets ``250 Ok``."""
        if self._finished.done():
            raise RuntimeError("finish() called twice")
        self._finished.set_result(None)

    @property
    def finished(self) -> bool:
        """True once :meth:`finish` was called."""
        return self._finished.done()

    def __repr__(self) -> str:
        attrs = ("remote_ip", "hostname", "mail", "rcpt")
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in attrs)
        return f"{self.__class__.__name__} ({args})"


def _legacy_data(envelope: Envelope) -> str:
    text = envelope.body.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
    return text[:-1] if text.endswith("\n") else text


class CallbackPlugin:
    """The original ``request_callback(request)`` as a plugin.

    It accepts every recipient (the callback sees the whole envelope) and
    delivers by calling the callback when the message is complete; the reply
    waits until ``request.finish()`` is called. A callback may also return an
    awaitable. An exception from it (or no ``finish()`` within the hook
    timeout) answers ``451`` and is logged.
    """

    def __init__(self, request_callback: Callable[[SMTPRequest], Any]) -> None:
        self.request_callback = request_callback

    def bonzo_rcpt(self) -> Accept:
        return Accept()

    async def bonzo_deliver(self, session: Session, envelope: Envelope) -> Accept:
        connection = session.stash.get("bonzo.connection")
        request = SMTPRequest(
            connection,
            session.remote_ip,
            "DATA",
            hostname=session.helo,
            mail=envelope.mail_from,
            rcpt=list(envelope.rcpt_tos),
            data=_legacy_data(envelope),
            envelope=envelope,
            session=session,
        )
        result = self.request_callback(request)
        if result is not None and hasattr(result, "__await__"):
            try:
                await result
            except Exception as exc:
                if not request.finished:
                    raise
                # The reply is already decided (finish() was called); an error
                # after that is the application's to see in the log.
                log_exception(exc, session, "message")
        await request._finished
        return Accept()


class CallbackHandler(PluginHandler):
    """Serves an original-style ``request_callback(request)`` on the plugin
    machinery: a :class:`~bonzo.hooks.PluginHandler` running one
    :class:`CallbackPlugin`, with ``handler_timeout`` as its hook timeout."""

    def __init__(
        self, request_callback: Callable[[SMTPRequest], Any], timeout: float = 60.0
    ) -> None:
        plugins = PluginSet(timeout=timeout)
        plugins.register(CallbackPlugin(request_callback), "request_callback")
        super().__init__(plugins)
        self.request_callback = request_callback


class ConnectionCount:
    """Connections open across the servers (listeners) that share this
    object, in all and per client address, for the connection limits."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def add(self, ip: str) -> None:
        self.total += 1
        self.per_ip[ip] += 1

    def remove(self, ip: str) -> None:
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class SMTPServer(TCPServer):
    """A non-blocking, single-threaded SMTP server.

    A server is defined by a request callback that takes an instance of
    :class:`SMTPRequest` as an argument, or by a
    :class:`~bonzo.connection.SessionHandler`:

    .. code:: python

        from tornado.ioloop import IOLoop
        from bonzo.server import SMTPServer

        def handle_request(request):
            do_something_with_the_message(request.message)
            request.finish()

        smtp_server = SMTPServer(handle_request)
        smtp_server.listen(2525)
        IOLoop.current().start()

    :arg request_callback: the original Bonzo callback, or ``None`` when
        ``handler`` is given.
    :arg handler: a :class:`~bonzo.connection.SessionHandler`.
    :arg settings: :class:`~bonzo.settings.SMTPSettings`; other keyword
        arguments that name a setting override it (``SMTPServer(cb,
        max_message_size=10_000_000)``). ``ssl_options``,
        ``max_buffer_size`` and ``read_chunk_size`` go to
        :class:`tornado.tcpserver.TCPServer`.

    Used with a request callback, the greeting is the original
    ``220 Bonzo SMTP Server <version>``; otherwise it is the settings' banner.
    """

    def __init__(
        self,
        request_callback: Callable[[SMTPRequest], Any] | None = None,
        io_loop: Any = None,
        *,
        handler: SessionHandler | None = None,
        settings: SMTPSettings | None = None,
        listener: ListenerSettings | None = None,
        count: ConnectionCount | None = None,
        **kwargs: Any,
    ) -> None:
        # io_loop is accepted (and ignored) for code written for Tornado < 5.
        if (request_callback is None) == (handler is None):
            raise TypeError("give exactly one of request_callback and handler")
        tcp_kwargs = {k: kwargs.pop(k) for k in _TCPSERVER_ARGS if k in kwargs}
        base = settings or SMTPSettings(
            banner=f"Bonzo SMTP Server {version}" if request_callback is not None else None
        )
        unknown = set(kwargs) - set(SMTPSettings.field_names())
        if unknown:
            raise TypeError(f"unknown SMTPServer option(s): {', '.join(sorted(unknown))}")
        self.settings = base.replace(**kwargs) if kwargs else base
        self.request_callback = request_callback
        self.handler: SessionHandler = (
            handler
            if handler is not None
            else CallbackHandler(request_callback, self.settings.handler_timeout)  # type: ignore[arg-type]
        )
        self.listener = listener or ListenerSettings()
        if self.listener.implicit_tls:
            tcp_kwargs["ssl_options"] = self.listener.tls_context
        self.connections: set[SMTPConnection] = set()
        self.count = count or ConnectionCount()
        self._idle_event: asyncio.Event | None = None
        super().__init__(**tcp_kwargs)

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        """Start a session for a new connection (called by TCPServer)."""
        settings = self.settings
        ip = str(address[0]) if isinstance(address, tuple) and address else "0.0.0.0"
        if self.count.total >= settings.max_connections:
            self._refuse(stream, ip, "Too many connections, try again later")
            return
        if self.count.per_ip[ip] >= settings.max_connections_per_ip:
            self._refuse(stream, ip, "Too many connections from your address")
            return
        connection = SMTPConnection(stream, address, self.handler, settings, self)
        connection.session.stash["bonzo.connection"] = connection
        self.connections.add(connection)
        self.count.add(ip)
        # A task straight away (IOLoop.add_callback would take one more loop
        # turn and a conversion); the connection keeps it referenced.
        connection._task = connection._aloop.create_task(connection.run())

    def _refuse(self, stream: IOStream, ip: str, text: str) -> None:
        gen_log.warning("Refused connection from %s: %s", ip, text)
        # On an implicit-TLS listener the reply waits for the client's
        # handshake, which may never come: close by a deadline regardless.
        settings = self.settings
        loop = IOLoop.current()
        deadline = loop.call_later(
            min(FINAL_REPLY_WAIT, settings.tls_handshake_timeout, settings.idle_timeout),
            stream.close,
        )

        def written(fut: Future[None]) -> None:
            fut.exception()  # a client already gone is no error to report
            loop.remove_timeout(deadline)
            stream.close()

        try:
            stream.write(format_reply(421, text, "4.7.0", True)).add_done_callback(written)
        except Exception:  # pragma: no cover - the client is already gone
            loop.remove_timeout(deadline)
            stream.close()

    def _connection_closed(self, connection: SMTPConnection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            self.count.remove(connection.remote_ip)
        if not self.connections and self._idle_event is not None:
            self._idle_event.set()

    def force_stop(self) -> None:
        """End every session now (a second SIGTERM): cancel what each is
        doing, plugin calls included; their cleanup still runs."""
        self.stop()
        for connection in list(self.connections):
            task = connection._task
            if task is not None and not task.done():
                task.cancel()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop gracefully: stop accepting, answer ``421 4.3.2`` to sessions
        waiting for a command, let messages in flight finish, and close what
        is left after ``grace`` seconds (default: the ``shutdown_grace``
        setting), with a last ``421 4.3.2`` where the socket takes it.
        Returns once the sessions are cleaned up (``on_disconnect`` called),
        or shortly after the grace period for those that cannot be."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.stop()
        if not self.connections:
            return
        self._idle_event = asyncio.Event()
        for connection in list(self.connections):
            connection.shutdown()
        try:
            await asyncio.wait_for(self._idle_event.wait(), timeout=grace)
        except asyncio.TimeoutError:
            app_log.warning(
                "Shutdown grace period over; closing %d connection(s)", len(self.connections)
            )
            for connection in list(self.connections):
                connection.abort(421, "Server shutting down", "4.3.2")
            # Let the sessions run their cleanup (and on_disconnect); one
            # whose handler is still running is not waited for long.
            try:
                await asyncio.wait_for(self._idle_event.wait(), timeout=_CLEANUP_WAIT)
            except asyncio.TimeoutError:
                app_log.warning(
                    "%d connection(s) still cleaning up after shutdown", len(self.connections)
                )

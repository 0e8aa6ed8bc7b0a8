"""The Tornado side of a session: read, feed the protocol core, ask the handler, write.

:class:`SMTPConnection` drives one client connection. It reads whatever the
socket has, lets :class:`~bonzo.protocol.SMTPProtocol`
split it into commands, asks a :class:`SessionHandler` for a verdict on each
command that needs one, and writes the replies to a pipelined batch in one
write. On a plain (not TLS) connection it reads and sends on the socket
itself, which stays registered with the event loop for the whole session;
TLS connections go through Tornado's streams. There is no future per line,
no coroutine per command when the handler answers synchronously, and one
timer per connection enforces
every timeout: it is re-armed when it fires, and pulled in only when a state
with a shorter deadline starts (a command line trickling in, DATA, a last
reply), never per read.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream, StreamClosedError
from tornado.log import access_log, app_log, gen_log
from tornado.netutil import ssl_wrap_socket

from . import errors
from .auth import MECHANISMS, Challenge, Mechanism, decode_response
from .protocol import (
    CLOSED,
    NEED_DATA,
    Auth,
    AuthResponse,
    Data,
    DataChunk,
    Helo,
    Mail,
    MessageComplete,
    Rcpt,
    Reset,
    SMTPProtocol,
    StartTLS,
    Unknown,
)
from .session import Envelope, Session, received_header
from .settings import ListenerSettings, SMTPSettings
from .tls import tls_facts

if TYPE_CHECKING:  # pragma: no cover
    from .server import SMTPServer

__all__ = ["SMTPConnection", "SessionHandler", "HandlerTimeout"]

#: Longest wait, in seconds, for a client to take a last reply (``221``,
#: ``421``) before the connection is closed anyway (also never longer than
#: ``idle_timeout``).
FINAL_REPLY_WAIT = 10.0


class HandlerTimeout(Exception):
    """A handler call took longer than ``handler_timeout``."""


class SessionHandler:
    """What a connection asks about each command; the base accepts everything.

    A handler that sets ``handles_timeouts = True`` enforces its own time
    limits; otherwise each call is bounded by the ``handler_timeout`` setting.

    Every method may be a plain function or return an awaitable (``async
    def``); if it does, the connection waits for it, within
    ``handler_timeout``. To refuse, raise a :class:`bonzo.errors.SMTPError`;
    to accept, return ``None`` (the usual reply) or a string (the reply text).
    Any other exception, or a timeout, answers ``451 4.3.0`` and is logged.
    """

    handles_timeouts = False

    def on_connect(self, session: Session) -> Any:
        """A client connected; raise to refuse it (the reply closes the connection)."""

    def on_helo(self, session: Session, name: str, esmtp: bool) -> Any:
        """HELO (``esmtp`` false) or EHLO."""

    def ehlo_keywords(self, session: Session, keywords: list[str]) -> Any:
        """Return the EHLO keywords to advertise (``None``: keep ``keywords``)."""

    def on_mail(self, session: Session, envelope: Envelope) -> Any:
        """MAIL FROM, with ``envelope.mail_from`` and ``mail_params`` filled in."""

    def on_rcpt(
        self, session: Session, envelope: Envelope, address: str, params: dict[str, str | None]
    ) -> Any:
        """RCPT TO; the recipient is added to ``envelope`` only if accepted."""

    def on_data(self, session: Session, envelope: Envelope) -> Any:
        """DATA, before the ``354``."""

    def on_message(self, session: Session, envelope: Envelope) -> Any:
        """The final dot arrived; the reply (``250`` unless this raises) waits
        for it. The message must be stored or handed on before returning."""

    def on_accepted(self, session: Session, envelope: Envelope) -> Any:
        """After the ``250`` for a message has been sent; failures are only logged."""

    def on_reset(self, session: Session) -> Any:
        """RSET: the transaction was discarded (notification)."""

    def on_unknown(self, session: Session, verb: str, arg: str) -> Any:
        """A verb the core does not know; return a reply
        (``(code, text)`` or ``(code, enhanced, text)``) to handle it, or
        ``None`` to answer "command not recognized"."""

    #: True if :meth:`on_auth` can check credentials (AUTH is offered only then).
    auth_available = False

    def on_auth(self, session: Session, credentials: Any) -> Any:
        """Check AUTH :class:`~bonzo.auth.Credentials`: return a true value
        (or an :class:`~bonzo.hookspecs.Accept`) to let the client in, ``None``
        or ``False`` to refuse (``535 5.7.8``), or raise an SMTPError."""

    def on_disconnect(self, session: Session) -> Any:
        """The connection is closed (notification)."""


def log_exception(exc: BaseException, session: Session | None, what: str) -> None:
    """Log an exception raised while handling ``what``, the way the original
    Bonzo did: an :class:`~bonzo.errors.SMTPError` with a ``log_message`` as a
    warning on ``tornado.general``; anything else as ``Uncaught exception`` with
    its traceback on ``tornado.application``."""
    if isinstance(exc, errors.SMTPError):
        if exc.log_message:
            gen_log.warning(
                "%d %s%s", exc.status_code, _summary(session, what), exc.log_message % exc.args
            )
    elif isinstance(exc, HandlerTimeout):
        app_log.error("Timeout %s: %s", _summary(session, what), exc)
    else:
        app_log.error(
            "Uncaught exception %s",
            _summary(session, what),
            exc_info=(type(exc), exc, exc.__traceback__),
        )


def _summary(session: Session | None, what: str) -> str:
    if session is None:
        return what
    return f"[{session.id} {session.remote_ip}] {what}: "


class SMTPConnection:
    """Handles a connection to an SMTP client, executing SMTP commands.

    :arg stream: the client's :class:`tornado.iostream.IOStream`.
    :arg address: the client's address as given by the socket.
    :arg handler: a :class:`SessionHandler`.
    :arg settings: :class:`~bonzo.settings.SMTPSettings`.
    :arg server: the :class:`~bonzo.server.SMTPServer` that accepted it, if any.

    .. attribute:: bytes_received

       Octets read from the client so far (for logs, stats and tests).
    """

    def __init__(
        self,
        stream: IOStream,
        address: Any,
        handler: SessionHandler,
        settings: SMTPSettings,
        server: SMTPServer | None = None,
    ) -> None:
        self.stream = stream
        self.address = address
        self.handler = handler
        self.settings = settings
        self.server = server
        if isinstance(address, tuple) and address:
            self.remote_ip = str(address[0])
            port = address[1] if len(address) > 1 else 0
        else:
            # Unix (or other) socket: there is no client address.
            self.remote_ip, port = "0.0.0.0", 0
        local_ip, local_port = "", 0
        try:
            sockname = stream.socket.getsockname()
            if isinstance(sockname, tuple):
                local_ip, local_port = sockname[0], sockname[1]
        except OSError:  # pragma: no cover - socket already gone
            pass
        self.session = Session(self.remote_ip, port, local_ip, local_port)
        self.protocol = SMTPProtocol(settings, self.remote_ip)
        listener = server.listener if server is not None else ListenerSettings()
        self.listener = listener
        proto = self.protocol
        proto.starttls_available = listener.tls_context is not None and not listener.implicit_tls
        proto.tls_active = listener.implicit_tls
        proto.require_tls = listener.require_tls
        proto.require_auth = listener.require_auth
        proto.auth_plaintext = listener.auth_plaintext
        if getattr(handler, "auth_available", False):
            proto.auth_mechanisms = listener.auth_mechanisms
        self._mechanism: Mechanism | None = None
        # The socket, for direct sends and reads, while the stream is a plain
        # one. Reads then bypass IOStream: the socket stays registered with
        # the event loop for the whole session (no re-registration and no
        # IOStream machinery per command), and every close of the stream goes
        # through _close_fd, which unregisters it first.
        self._plain_socket: socket.socket | None = None
        self._read_waiter: asyncio.Future[bytes] | None = None
        self._watching = False
        self._fd = -1
        if type(stream) is IOStream:
            self._plain_socket = stream.socket
            self._fd = stream.socket.fileno()
            # As much as the stream itself would read at a time.
            self._recv_size = min(settings.read_chunk_size, stream.read_chunk_size)
            self._stream_close_fd = stream.close_fd
            stream.close_fd = self._close_fd  # type: ignore[method-assign]
        self.envelope: Envelope | None = None
        self._close_callback: Callable[[], Any] | None = None
        self._write_future: Awaitable[None] | None = None
        self._waiting_input = False
        self._line_started: float | None = None
        self._shutting_down = False
        self._loop = IOLoop.current()
        self._aloop: asyncio.AbstractEventLoop = self._loop.asyncio_loop  # type: ignore[attr-defined]
        #: The task running :meth:`run`, when the server started one.
        self._task: asyncio.Task[None] | None = None
        now = self._loop.time()
        self._last_activity = now
        self._window_start = now
        self._window_bytes = 0
        self.bytes_received = 0
        self._store_error: OSError | None = None
        self._timer: object | None = None
        self._timer_deadline = 0.0
        # Since when the session has been waiting for the client to take its
        # output (None when it is not), and when to close whatever happens
        # once a last reply is queued (None before that).
        self._output_since: float | None = None
        self._drop_at: float | None = None
        self._closed = False
        # A handler that enforces its own time limits (per plugin) is awaited
        # directly: no extra task per command.
        self._handler_times_itself = bool(getattr(handler, "handles_timeouts", False))

    # ---------------------------------------------------------------- API
    def set_close_callback(self, callback: Callable[[], Any] | None) -> None:
        """Sets a callback that will be run when the connection is closed."""
        self._close_callback = callback

    def close(self) -> None:
        """Close the connection now."""
        self.stream.close()

    def abort(
        self, code: int = 421, text: str = "Server shutting down", enhanced: str = "4.3.2"
    ) -> None:
        """Send a last reply, as far as the socket takes it at once, and close
        now, whatever the session is doing (used when a shutdown's grace
        period is over)."""
        if not self.stream.closed():
            self._final_reply(code, text, enhanced)
            self.stream.close()

    def shutdown(self) -> None:
        """Ask the session to end: at once with ``421 4.3.2`` if it is waiting
        for a command, else after the message in flight is answered."""
        self._shutting_down = True
        if self._waiting_input and not self.protocol.in_data:
            self._final_reply(421, "Server shutting down", "4.3.2")

    # ---------------------------------------------------------- main loop
    async def run(self) -> None:
        """Serve the session until it ends; never raises."""
        try:
            self._arm_timer(self._loop.time() + self._next_check_delay())
            await self._serve()
        except StreamClosedError:
            pass
        except Exception:
            app_log.error("Unexpected error in session %s", self.session.id, exc_info=True)
        finally:
            await self._cleanup()

    async def _serve(self) -> None:
        proto = self.protocol
        if self.listener.implicit_tls:
            if not await self._handshake(self.stream.wait_for_handshake()):  # type: ignore[attr-defined]
                return
        try:
            result = await self._call(self.handler.on_connect, self.session, what="connect")
        except Exception as exc:  # refused (or broken) at connect: close after the reply
            error = self._error_reply(exc, "connect")
            if not isinstance(exc, errors.SMTPError):
                # A local fault: 451 is no greeting; 421 is (RFC 5321 3.1, 4.2.5).
                error = errors.SMTPError(
                    421,
                    "Service not available, closing transmission channel",
                    enhanced_code="4.3.0",
                )
            error.close = True
            proto.send_error(error)
        else:
            proto.send_greeting(result if isinstance(result, str) else None)
        backlog = self.settings.max_write_backlog
        chunk_size = self.settings.read_chunk_size
        now = self._loop.time
        while True:
            event = proto.next_event()
            if event is NEED_DATA:
                self._flush()
                if self._shutting_down and not proto.in_data:
                    self._final_reply(421, "Server shutting down", "4.3.2")
                    return
                fut = self._write_future
                if fut is not None and not fut.done():  # type: ignore[attr-defined]
                    await self._wait_output(fut)  # the client is not reading: stop reading too
                if not proto.in_data:
                    if not proto.buffered:
                        self._line_started = None
                    elif self._line_started is None:
                        self._line_started = now()
                        self._check_by(self._line_started + self.settings.command_timeout)
                self._waiting_input = True
                try:
                    if self._plain_socket is not None:
                        chunk = await self._recv()
                    else:
                        chunk = await self.stream.read_bytes(chunk_size, partial=True)
                finally:
                    self._waiting_input = False
                self._last_activity = now()
                self._window_bytes += len(chunk)
                self.bytes_received += len(chunk)
                proto.receive_data(chunk)
                continue
            if event is CLOSED:
                self._flush()
                fut = self._write_future
                if fut is not None and not fut.done():  # type: ignore[attr-defined]
                    self._drop_later()
                    await fut
                self.stream.close()
                return
            if type(event) is DataChunk:
                self._store(event.data)
                continue
            pending = self._dispatch(event)
            if pending is not None:
                await pending
            if proto.pending_output > backlog:
                self._flush()
                fut = self._write_future
                if fut is not None and not fut.done():  # type: ignore[attr-defined]
                    await self._wait_output(fut)

    async def _wait_output(self, fut: Awaitable[None]) -> None:
        """Wait for the client to take the replies written so far (the timer
        drops a client that has not within ``idle_timeout``)."""
        self._output_since = self._loop.time()
        try:
            await fut
        finally:
            self._output_since = None

    def _recv(self) -> asyncio.Future[bytes]:
        """A future of the next bytes from the plain socket (at most
        ``read_chunk_size``); fails with StreamClosedError at the end."""
        aloop = self._aloop
        waiter = aloop.create_future()
        self._read_waiter = waiter
        if not self._watching:
            aloop.add_reader(self._fd, self._on_readable)
            self._watching = True
        return waiter

    def _on_readable(self) -> None:
        waiter = self._read_waiter
        if waiter is None or waiter.done():
            # Nobody is reading (a handler is running): stop watching until
            # the session asks again, or the loop would spin.
            self._unwatch()
            return
        self._read_waiter = None
        try:
            data = self._plain_socket.recv(self._recv_size)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            self._read_waiter = waiter
            return
        except OSError as exc:
            waiter.set_exception(StreamClosedError(real_error=exc))
            self.stream.close()
            return
        if not data:
            waiter.set_exception(StreamClosedError())
            self.stream.close()
            return
        waiter.set_result(data)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._aloop.remove_reader(self._fd)

    def _close_fd(self) -> None:
        """Stand-in for the plain stream's ``close_fd``: unregister the
        socket before it is closed, and end a read in progress."""
        self._unwatch()
        self._plain_socket = None
        self._stream_close_fd()
        waiter = self._read_waiter
        self._read_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(StreamClosedError())

    def _flush(self) -> None:
        data = self.protocol.data_to_send()
        if not data:
            return
        stream = self.stream
        sock = self._plain_socket
        if sock is not None:
            fut = self._write_future
            if fut is None or fut.done():  # type: ignore[attr-defined]
                # Nothing queued in the stream: send directly, which spares
                # a future and Tornado's write machinery for the usual case
                # of a reply that fits the socket buffer. Whatever does not
                # fit (or an error) goes through the stream as usual.
                try:
                    sent = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    sent = 0  # the stream's own write will see and report it
                if sent == len(data):
                    return
                data = data[sent:]
        if not stream.closed():
            self._write_future = stream.write(data)

    # ------------------------------------------------------------ dispatch
    def _dispatch(self, event: Any) -> Any:
        """Answer ``event``. Returns ``None`` when that is done, or an
        awaitable to wait for when a handler was asynchronous: a server whose
        handlers are plain functions answers every command without creating a
        coroutine."""
        proto = self.protocol
        session = self.session
        handler = self.handler
        kind = type(event)
        try:
            if kind is Mail:
                envelope = Envelope(
                    event.address,
                    event.params,
                    spool_threshold=self.settings.spool_threshold,
                    spool_dir=self.settings.spool_dir,
                    sender=event.mailbox,
                )
                return self._then(
                    handler.on_mail(session, envelope), self._mail_done, envelope, event, "MAIL"
                )
            if kind is Rcpt:
                assert self.envelope is not None
                return self._then(
                    handler.on_rcpt(session, self.envelope, event.address, event.params),
                    self._rcpt_done,
                    event,
                    event,
                    "RCPT",
                )
            if kind is Data:
                assert self.envelope is not None
                return self._then(
                    handler.on_data(session, self.envelope), self._data_done, event, event, "DATA"
                )
            if kind is MessageComplete:
                return self._message_complete(event)
            if kind is Helo:
                return self._then(
                    handler.on_helo(session, event.name, event.esmtp),
                    self._helo_keywords,
                    event,
                    event,
                    "HELO",
                )
            if kind is Reset:
                self._end_transaction()
                proto.accept()
                return self._observe(handler.on_reset(session), "RSET")
            if kind is Unknown:
                return self._then(
                    handler.on_unknown(session, event.verb, event.arg),
                    self._unknown_done,
                    event,
                    event,
                    event.verb,
                )
            if kind is StartTLS:
                return self._starttls()
            if kind is Auth or kind is AuthResponse:
                return self._auth(event)
            raise AssertionError(f"unexpected event {event!r}")  # pragma: no cover
        except StreamClosedError:
            raise  # the client is gone: the session ends, nothing to log
        except Exception as exc:
            self._fail(exc, event)
            return None

    def _then(
        self, result: Any, done: Callable[[Any, Any], Any], arg: Any, event: Any, what: str
    ) -> Any:
        """Call ``done(result, arg)`` now, or once ``result`` is ready if it is
        awaitable (then return the awaitable that does it)."""
        if result is not None and type(result) is not str and inspect.isawaitable(result):
            return self._then_later(result, done, arg, event, what)
        return done(result, arg)

    async def _then_later(
        self, pending: Any, done: Callable[[Any, Any], Any], arg: Any, event: Any, what: str
    ) -> None:
        try:
            result = await self._bounded(pending, what)
            after = done(result, arg)
            if after is not None:
                await after
        except StreamClosedError:
            raise
        except Exception as exc:
            self._fail(exc, event)

    def _fail(self, exc: BaseException, event: Any) -> None:
        """A handler refused (or failed on) ``event``: answer it."""
        proto = self.protocol
        if type(event) is MessageComplete:
            self._end_transaction()
        if proto.pending_event is not None:
            proto.reject(self._error_reply(exc, type(event).__name__))
        else:  # pragma: no cover - defensive: an error after the reply
            log_exception(exc, self.session, type(event).__name__)

    def _observe(self, result: Any, what: str) -> Any:
        """Wait for a notification handler if it is async; only log its failure."""
        if result is not None and inspect.isawaitable(result):
            return self._observe_later(result, what)
        return None

    async def _observe_later(self, pending: Any, what: str) -> None:
        try:
            await self._bounded(pending, what)
        except Exception as exc:
            log_exception(exc, self.session, what)

    def _mail_done(self, result: Any, envelope: Envelope) -> None:
        self._end_transaction()
        self.envelope = envelope
        self.protocol.accept(_text(result))

    def _rcpt_done(self, result: Any, event: Rcpt) -> None:
        envelope = self.envelope
        assert envelope is not None
        envelope.rcpt_tos.append(event.address)
        envelope.rcpt_params.append(event.params)
        envelope.recipients.append(event.mailbox)
        self.protocol.accept(_text(result))

    def _data_done(self, result: Any, event: Data) -> None:
        envelope = self.envelope
        assert envelope is not None
        envelope.prepend_raw(received_header(self.session, envelope, self.settings.hostname))
        now = self._loop.time()
        self._window_start = now
        self._window_bytes = 0
        self._check_by(now + min(self.settings.data_rate_window, self.settings.data_timeout))
        self.protocol.accept(_text(result))

    def _unknown_done(self, result: Any, event: Unknown) -> None:
        proto = self.protocol
        if result is None:
            if proto.esmtp:
                proto.reject(
                    errors.SMTPError(500, "Error: command not recognized", enhanced_code="5.5.2")
                )
            else:
                proto.reject(errors.NotImplementedCommand(_printable(event.verb)))
            return
        code, *rest = result
        enhanced = rest[0] if len(rest) == 2 else None
        # The core counts only "not recognized" replies as unknown commands.
        proto.reject(errors.SMTPError(code, rest[-1], enhanced_code=enhanced))

    def _helo_keywords(self, result: Any, event: Helo) -> Any:
        """HELO/EHLO accepted by the handler: for EHLO, ask it for the keywords."""
        if not event.esmtp:
            return self._helo_done((result, None), event)
        keywords = self.protocol.ehlo_keywords()
        extra = self.handler.ehlo_keywords(self.session, keywords)
        return self._then(
            extra, self._helo_done_keywords, (result, keywords, event), event, "EHLO keywords"
        )

    def _helo_done_keywords(self, extra: Any, state: tuple[Any, list[str], Helo]) -> None:
        result, keywords, event = state
        self._helo_done((result, list(extra) if extra is not None else keywords), event)

    def _helo_done(self, outcome: tuple[Any, list[str] | None], event: Helo) -> None:
        result, keywords = outcome
        self._end_transaction()
        self.session.helo = event.name
        self.session.esmtp = event.esmtp
        self.protocol.accept(_text(result), extensions=keywords)

    # ------------------------------------------------------------ TLS, AUTH
    async def _handshake(self, handshake: Awaitable[Any]) -> bool:
        """Wait for a TLS handshake within ``tls_handshake_timeout``; on
        success record the TLS facts on the session, else close."""
        try:
            result = await asyncio.wait_for(
                _as_future(handshake), timeout=self.settings.tls_handshake_timeout
            )
        except asyncio.TimeoutError:
            gen_log.info("[%s %s] TLS handshake timed out", self.session.id, self.remote_ip)
            self.stream.close()
            return False
        except (StreamClosedError, OSError, ValueError) as exc:
            gen_log.info(
                "[%s %s] TLS handshake failed: %s",
                self.session.id,
                self.remote_ip,
                getattr(exc, "real_error", None) or exc,
            )
            self.stream.close()
            return False
        if result is not None:
            self.stream = result
        self._plain_socket = None
        self.session.tls = tls_facts(self.stream.socket)
        return True

    async def _starttls(self) -> None:
        proto = self.protocol
        context = self.listener.tls_context
        assert context is not None
        proto.accept()
        if "starttls_pipelined" in proto.notes:
            gen_log.warning(
                "[%s %s] discarded plaintext pipelined after STARTTLS",
                self.session.id,
                self.remote_ip,
            )
        self._flush()
        fut = self._write_future
        if fut is not None and not fut.done():  # type: ignore[attr-defined]
            await self._wait_output(fut)
        if self.stream.closed():
            raise StreamClosedError()
        # TLS from here on: reads go through the (TLS) stream again.
        self._unwatch()
        self._plain_socket = None
        self.stream = _wrap_tls(self.stream, context)
        if not await self._handshake(self.stream.wait_for_handshake()):
            # The session is over: nothing more can be said in plaintext.
            proto.close()
            proto.data_to_send()
            return
        self._end_transaction()
        self.session.helo = None
        self.session.esmtp = False
        self.session.auth = None
        proto.tls_started()

    async def _auth(self, event: Any) -> None:
        proto = self.protocol
        try:
            if type(event) is Auth:
                self._mechanism = MECHANISMS[event.mechanism]()
                initial = None if event.initial is None else decode_response(event.initial)
                step = self._mechanism.start(initial)
            else:
                assert self._mechanism is not None
                step = self._mechanism.step(decode_response(event.line))
        except errors.SMTPError as exc:
            self._mechanism = None
            proto.reject(exc)
            return
        if isinstance(step, Challenge):
            proto.auth_challenge(step.encoded())
            return
        self._mechanism = None
        try:
            verdict = await self._call(self.handler.on_auth, self.session, step, what="AUTH")
        except errors.SMTPError as exc:
            proto.reject(exc)
            return
        except Exception as exc:
            log_exception(exc, self.session, "AUTH")
            proto.reject(
                errors.SMTPError(454, "Temporary authentication failure", enhanced_code="4.7.0")
            )
            return
        if verdict:
            self.session.auth = step.username
            proto.auth_success(step.username)
            gen_log.info(
                "[%s %s] authenticated as %r (%s)",
                self.session.id,
                self.remote_ip,
                step.username,
                step.mechanism,
            )
            return
        gen_log.info(
            "[%s %s] AUTH %s failed for %r",
            self.session.id,
            self.remote_ip,
            step.mechanism,
            step.username,
        )
        # Slow down guessing: the reply (and so the next try) waits.
        await asyncio.sleep(self.settings.auth_failure_delay)
        proto.reject(
            errors.SMTPError(535, "Authentication credentials invalid", enhanced_code="5.7.8")
        )

    def _message_complete(self, event: MessageComplete) -> Any:
        proto = self.protocol
        envelope = self.envelope
        assert envelope is not None
        if event.data:
            self._store(event.data)
        store_error, self._store_error = self._store_error, None
        if event.error is not None:
            self._end_transaction()
            proto.reject(event.error)
            return None
        if store_error is not None:
            self._end_transaction()
            if store_error.errno in (errno.ENOSPC, errno.EDQUOT):
                proto.reject(
                    errors.SMTPError(452, "Insufficient system storage", enhanced_code="4.3.1")
                )
            else:
                proto.reject(errors.InternalConfusion())
            return None
        try:
            result = self.handler.on_message(self.session, envelope)
        except StreamClosedError:
            raise
        except Exception as exc:
            self._fail(exc, event)
            return None
        return self._then(result, self._message_done, envelope, event, "message")

    def _message_done(self, result: Any, envelope: Envelope) -> Any:
        proto = self.protocol
        self.envelope = None
        self.session.messages += 1
        proto.accept(_text(result) or ("Ok: queued as " + envelope.id if proto.esmtp else None))
        self._flush()
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s from=<%s> to=%d size=%d id=%s",
                self.session.id,
                self.remote_ip,
                envelope.mail_from,
                len(envelope.rcpt_tos),
                envelope.size,
                envelope.id,
            )
        try:
            pending = self.handler.on_accepted(self.session, envelope)
        except Exception as exc:
            log_exception(exc, self.session, "accepted")
            envelope.close()
            return None
        if pending is not None and inspect.isawaitable(pending):
            return self._accepted_later(pending, envelope)
        envelope.close()
        return None

    async def _accepted_later(self, pending: Any, envelope: Envelope) -> None:
        try:
            await self._bounded(pending, "accepted")
        except Exception as exc:
            log_exception(exc, self.session, "accepted")
        finally:
            envelope.close()

    def _store(self, data: bytes) -> None:
        """Append message content to the envelope. A storage fault (say, the
        spool directory is gone or the disk is full) is logged at once and
        answered after the final dot; the rest of the content is read and
        dropped, so the session stays in step and usable."""
        envelope = self.envelope
        if envelope is None or self._store_error is not None:
            return
        try:
            envelope.write(data)
        except OSError as exc:
            self._store_error = exc
            log_exception(exc, self.session, "storing the message")

    def _end_transaction(self) -> None:
        if self.envelope is not None:
            self.envelope.close()
            self.envelope = None

    async def _call(self, method: Callable[..., Any], *args: Any, what: str) -> Any:
        result = method(*args)
        if result is not None and inspect.isawaitable(result):
            result = await self._bounded(result, what)
        return result

    async def _bounded(self, pending: Any, what: str) -> Any:
        """Await a handler's result, within ``handler_timeout`` unless the
        handler enforces its own limits."""
        if self._handler_times_itself:
            return await pending
        try:
            return await asyncio.wait_for(
                _as_future(pending), timeout=self.settings.handler_timeout
            )
        except asyncio.TimeoutError:
            raise HandlerTimeout(
                f"{what} took longer than {self.settings.handler_timeout}s"
            ) from None

    def _error_reply(self, exc: BaseException, what: str) -> errors.SMTPError:
        """Log ``exc`` and return the reply for it: its own if it is an
        SMTPError, else ``451 Internal confusion``."""
        log_exception(exc, self.session, what)
        if isinstance(exc, errors.SMTPError):
            return exc
        return errors.InternalConfusion()

    # -------------------------------------------------------------- timers
    def _next_check_delay(self) -> float:
        s = self.settings
        return min(s.idle_timeout, s.command_timeout, s.data_timeout, s.data_rate_window)

    def _arm_timer(self, when: float) -> None:
        self._timer = self._loop.call_at(when, self._on_timer)
        self._timer_deadline = when

    def _check_by(self, when: float) -> None:
        """Make the timer fire no later than ``when``.

        The timer is armed for the deadline of the state the session was in
        when it last fired (e.g. ``idle_timeout``); a state with a shorter one
        (a command line that started to trickle in, DATA) must pull it in, or
        it would only be checked at the old deadline.
        """
        if self._closed:
            return
        if self._timer is not None:
            if self._timer_deadline <= when:
                return
            self._loop.remove_timeout(self._timer)
        self._arm_timer(when)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed or self.stream.closed():
            return
        now = self._loop.time()
        s = self.settings
        proto = self.protocol
        if self._drop_at is not None:
            # A last reply is queued: nothing else matters now.
            if now >= self._drop_at:
                gen_log.info(
                    "[%s %s] client did not take the last reply, closing",
                    self.session.id,
                    self.remote_ip,
                )
                self.stream.close()
                return
            self._arm_timer(self._drop_at)
            return
        if proto.in_data:
            if now - self._last_activity >= s.data_timeout:
                return self._timeout("data_timeout")
            elapsed = now - self._window_start
            if elapsed >= s.data_rate_window:
                if s.min_data_rate and self._window_bytes < s.min_data_rate * elapsed:
                    return self._timeout("min_data_rate", "Data rate too low")
                self._window_start = now
                self._window_bytes = 0
            deadline = min(
                self._last_activity + s.data_timeout, self._window_start + s.data_rate_window
            )
        elif self._waiting_input:
            if now - self._last_activity >= s.idle_timeout:
                return self._timeout("idle_timeout")
            started = self._line_started
            if started is not None and now - started >= s.command_timeout:
                return self._timeout("command_timeout")
            deadline = self._last_activity + s.idle_timeout
            if started is not None:
                deadline = min(deadline, started + s.command_timeout)
        elif self._output_since is not None:
            # The client does not read its replies (and so the server does
            # not read its commands): it gets idle_timeout to take what has
            # been written (at most max_write_backlog plus one read's replies).
            if now - self._output_since >= s.idle_timeout:
                gen_log.info(
                    "[%s %s] idle_timeout exceeded waiting for the client to read, closing",
                    self.session.id,
                    self.remote_ip,
                )
                self.stream.close()
                return
            deadline = self._output_since + s.idle_timeout
        else:
            # A handler is running; its own timeout applies.
            deadline = now + self._next_check_delay()
        self._arm_timer(max(deadline, now + 0.01))

    def _timeout(self, setting: str, text: str = "Timeout, closing connection") -> None:
        gen_log.info("[%s %s] %s exceeded, closing", self.session.id, self.remote_ip, setting)
        self._final_reply(421, text, "4.4.2")

    def _final_reply(self, code: int, text: str, enhanced: str) -> None:
        """Send a last reply and close, whatever the session is doing."""
        self.protocol.close(code, text, enhanced)
        data = self.protocol.data_to_send()
        if self.stream.closed():
            return
        if data:
            fut = self.stream.write(data)
            if fut.done():
                self.stream.close()
            else:
                fut.add_done_callback(lambda f: self.stream.close())
                self._drop_later()
        else:
            self.stream.close()

    def _drop_later(self) -> None:
        """Close the connection within a bounded time even if the client
        never takes the last reply that is waiting to be sent."""
        if self._drop_at is None:
            self._drop_at = self._loop.time() + min(self.settings.idle_timeout, FINAL_REPLY_WAIT)
            self._check_by(self._drop_at)

    # ------------------------------------------------------------- cleanup
    async def _cleanup(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._loop.remove_timeout(self._timer)
            self._timer = None
        if self.envelope is not None:
            self.envelope.close()
            self.envelope = None
        if not self.stream.closed():
            self.stream.close()
        callback, self._close_callback = self._close_callback, None
        if callback is not None:
            try:
                callback()
            except Exception:
                app_log.error("Exception in close callback", exc_info=True)
        try:
            await self._call(self.handler.on_disconnect, self.session, what="disconnect")
        except Exception as exc:
            log_exception(exc, self.session, "disconnect")
        if self.server is not None:
            self.server._connection_closed(self)


def _text(result: Any) -> str | None:
    return result if isinstance(result, str) else None


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() and c != '"' else "?" for c in text[:64])


async def _as_future(awaitable: Awaitable[Any]) -> Any:
    """Any awaitable as a coroutine (what ``asyncio.wait_for`` takes)."""
    return await awaitable


def _wrap_tls(stream: IOStream, context: ssl.SSLContext) -> SSLIOStream:
    """Put the server side of TLS on ``stream``'s socket and return the new
    stream; the handshake starts on the next loop iteration.

    This is :meth:`IOStream.start_tls` except that the caller holds the new
    stream from the start, so a handshake that fails or times out can be
    closed (``start_tls`` hides it until the handshake succeeds, and the old
    stream cannot be closed once its socket is gone). It is only called with
    no read or write in progress. Plaintext that Tornado has read but the
    connection has not (more of what the client sent after STARTTLS) is
    dropped with the old stream, as the protocol core drops what it had.
    """
    sock = stream.socket
    stream.io_loop.remove_handler(sock)
    stream.socket = None  # type: ignore[assignment]
    tls_sock = ssl_wrap_socket(sock, context, server_side=True, do_handshake_on_connect=False)
    return SSLIOStream(
        tls_sock,
        ssl_options=context,
        max_buffer_size=stream.max_buffer_size,
        read_chunk_size=stream.read_chunk_size,
    )

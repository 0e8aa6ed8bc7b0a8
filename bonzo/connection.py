"""The session loop: one client connection, read → feed → dispatch → write.

:class:`SMTPConnection` owns the client's socket through one
:class:`tornado.iostream.IOStream`, from accept to close: every read and
write goes through it, plain or TLS (TLS runs as a layer over the stream,
:class:`bonzo.tls.TLSLayer`, so STARTTLS swaps nothing). Its loop is::

    while the session lasts:
        event = core.next_event()
        NEED_DATA  → send the queued replies, read a chunk, feed it to the core
        PAUSED     → send the queued replies, wait until the client took them
        DataChunk  → store it in the envelope
        STARTTLS   → 220, TLS handshake, tell the core
        any event  → dispatcher.handle(event): ask the plugins, apply the verdict
        CLOSED     → end

The protocol core (:mod:`bonzo.protocol`) keeps all protocol state; the
:class:`~bonzo.session.Session` plugins see is a view of it; the dispatcher
(:mod:`bonzo.dispatch`) asks the plugins. What is left here is I/O and time:
one timer per connection, armed for the deadline that the current state
gives (idle, command, DATA progress and rate, the client taking its replies,
the TLS handshake, the last reply, the session's lifetime) and re-armed only
when it fires or an earlier deadline appears.

Closing is done in order: the last reply is flushed, TLS sends its
``close_notify``, the socket closes (each step bounded in time), then the
envelope is dropped and the ``bonzo_disconnect`` observers run. Last, the
callbacks the dispatcher and the core hold into the connection are dropped:
nothing of the session then refers back to it, so it is freed by reference
counting as soon as it ends instead of waiting for the cycle collector.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import ssl
from asyncio import Future
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, StreamClosedError
from tornado.log import app_log, gen_log

from . import errors, metrics
from .dispatch import Dispatcher
from .hooks import PluginSet, passes_through
from .lmtp import LMTPProtocol
from .protocol import (
    AuthResponse,
    Closed,
    DataChunk,
    MessageComplete,
    NeedData,
    Paused,
    Policy,
    Refusal,
    SMTPProtocol,
    StartTLS,
    XClient,
)
from .proxy import ProxyError, ProxyParser, address_in
from .session import Session, current_session_id, one_line
from .settings import ListenerSettings, SMTPSettings, host_port
from .tls import SNI_FAILED, TLSLayer

if TYPE_CHECKING:  # pragma: no cover
    from asyncio import TimerHandle

__all__ = [
    "SMTPConnection",
    "SessionStream",
    "try_write",
    "FINAL_REPLY_WAIT",
    "LINGER_WAIT",
    "LINGER_LIMIT",
]

#: Longest wait, in seconds, for a client to take a last reply (``221``,
#: ``421``) and TLS's ``close_notify`` before the connection is closed anyway
#: (never longer than ``idle_timeout``).
FINAL_REPLY_WAIT = 10.0
#: After a last reply the client did not ask for (a limit, a timeout, a
#: stop), the server ends its side and waits this long, in seconds, for the
#: client to close before closing the socket, reading and dropping at most
#: :data:`LINGER_LIMIT` octets (see ``SMTPConnection._close_socket``).
LINGER_WAIT = 2.0
#: The most octets read and dropped while waiting so.
LINGER_LIMIT = 1 << 20

#: Longest wait, in seconds, for a client to take the TLS alert that ends a
#: failed handshake or a broken TLS session before the connection is closed.
TLS_ALERT_WAIT = 2.0

#: Octets Tornado reads at a time while the client sends commands: its
#: buffer for each read is made (and zeroed) anew, so a command-sized one
#: costs much less than the ``read_chunk_size`` used for message content.
COMMAND_CHUNK = 4096

#: Longest time, in seconds, a session works through reads that its socket
#: answered at once (a client keeping it full) before it lets the other
#: sessions of the process run: awaiting a read already done does not go
#: back to the event loop.
FAIR_SLICE = 0.01

# What the session is doing, for the timer.
_BUSY = 0  # the core or a plugin is working: plugins have their own timeouts
_INPUT = 1  # waiting for the client to send
_OUTPUT = 2  # waiting for the client to read what was written
_HANDSHAKE = 3  # TLS handshake
_CLOSING = 4  # last reply on its way
_PROXY = 5  # waiting for the PROXY protocol header
_LINGER = 6  # last reply sent, the server's side ended: waiting for the client's


def _send_nothing() -> None:
    """The dispatcher's ``send`` once the session is over."""


# A stream waiting for input only: reading, errors reported.
_LISTENING = IOLoop.READ | IOLoop.ERROR


def try_write(stream: IOStream, data: bytes) -> int:
    """Send what the socket takes of ``data`` now, through ``stream``, if
    nothing is queued in it; return how many octets were sent (``0`` if none,
    or if the stream has queued data or is closed).

    A reply to a client that waits for it (most clients) is a few dozen
    octets that the socket takes at once. :meth:`IOStream.write
    <tornado.iostream.BaseIOStream.write>` sends them at once too, but first
    queues them and makes a future with a done-callback, which costs more
    than the send itself (measured in ``bench/``). This sends through the
    stream's own :meth:`~tornado.iostream.IOStream.write_to_fd` when nothing
    is queued, and the caller gives what the socket did not take to
    :meth:`~tornado.iostream.BaseIOStream.write`: the stream keeps owning the
    socket, and its buffer and order are never bypassed. An error is not
    raised here: ``write()`` of the rest meets it and closes the stream as
    usual.
    """
    if stream.writing() or stream.closed():
        return 0
    try:
        return stream.write_to_fd(memoryview(data))
    except OSError:  # would block, or the connection is gone
        return 0


class SessionStream(IOStream):
    """The :class:`~tornado.iostream.IOStream` a server gives each session:
    Tornado's stream, with a shorter path for the one read a session makes
    (``read_bytes(n, partial=True)``, "what has arrived, up to *n* octets").

    **The hint.** A read on Tornado's stream tries the socket at once when
    nothing is buffered, and listens for it to become readable only when that
    read finds nothing. Right after a reply, a client that waits for its
    replies (most clients) cannot have answered yet, so that first attempt
    fails every time: a system call, a buffer and an exception for each
    command. With :attr:`wait_readable` set, the next read that finds nothing
    buffered starts by waiting for the socket to be readable, as the stream's
    own slow path does; what is buffered is still returned at once, the event
    loop reports a socket that already holds data on its next turn, and reads
    during message content (which streams in without replies) keep Tornado's
    order. The session loop sets the hint each time it sends a reply; it holds
    for one read.

    **The direct read.** When such a partial read finds the stream's buffer
    empty, the octets the socket gives (:meth:`recv_chunk`) are the whole
    answer: they are handed to the read's future as they are, instead of
    being appended to the buffer, searched for and cut out of it again (a
    dozen calls per read in Tornado's general path, which serves every kind
    of read). Everything else — buffered data, ``read_until``, errors, close —
    is Tornado's own code.

    .. attribute:: wait_readable

       Whether the next read that finds nothing buffered waits for the
       socket before trying it (reset by that read).
    """

    wait_readable = False
    #: Called once when the client closes or resets the connection while
    #: nothing is read (see :meth:`watch_close`).
    _on_peer_closed: Callable[[], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The asyncio loop under Tornado's, when there is one.
        self._asyncio_loop = getattr(self.io_loop, "asyncio_loop", None)

    def watch_close(self, callback: Callable[[], None] | None) -> None:
        """Have ``callback`` called, once, if the client closes or resets
        the connection while the session reads nothing (a plugin is at
        work); ``None`` stops watching. Only told: the client's octets stay
        in the socket and the connection stays open (a client that shut its
        side may still read its replies). A client that sent more first
        (a pipelined command) is not watched past it."""
        self._on_peer_closed = callback
        if callback is not None and not self._closed and self._read_future is None:
            state = self._state
            if state is None or not state & IOLoop.READ:
                self._add_io_state(IOLoop.READ)

    def _peer_gone(self) -> bool:
        """Whether the client's end of stream (or a reset) is next in the
        socket, looked at without reading it."""
        try:
            return not self.socket.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _start_read(self) -> Future[Any]:
        # Tornado makes each read's future with Future(), which looks up the
        # running loop, and CPython checks the process id each time it does
        # (a fork guard): a getpid() system call per read, measured on 3.11.
        # The stream's loop is known, so its future is made without the
        # lookup.
        loop = self._asyncio_loop
        if self._read_future is not None or loop is None:
            return super()._start_read()  # "already reading", as Tornado says it
        future: Future[Any] = loop.create_future()
        self._read_future = future
        return future

    def read_bytes(self, num_bytes: int, partial: bool = False) -> Future[bytes]:
        """Tornado's :meth:`~tornado.iostream.BaseIOStream.read_bytes`, the
        same steps in the same order, but for its check that ``num_bytes``
        is a :class:`numbers.Integral`: an abstract-class ``isinstance``
        that cost more than the rest of the call, on every read (measured).
        Anything but an :class:`int` goes to Tornado's own."""
        if type(num_bytes) is not int:
            return super().read_bytes(num_bytes, partial)  # type: ignore[return-value]
        future = self._start_read()
        self._read_bytes = num_bytes
        self._read_partial = partial
        try:
            self._try_inline_read()
        except BaseException:
            future.add_done_callback(lambda f: f.exception())
            raise
        return future

    def try_write(self, data: bytes) -> int:
        """:func:`try_write` on this stream: send what the socket takes of
        ``data`` now if nothing is queued in the stream (``0`` if none, or if
        the stream has queued data or is closed). The same rule, without the
        two method calls that ask the stream whether it is writing or
        closed: everything written and nothing left is what the stream's
        own counters say (its buffer's length is another call)."""
        if self._closed or self._total_write_index != self._total_write_done_index:
            return 0
        try:
            return self.socket.send(data)
        except OSError:  # would block, or the connection is gone
            return 0

    def recv_chunk(self, size: int) -> bytes | None:
        """Read up to ``size`` octets from the socket: ``None`` if it has
        none yet, ``b""`` at end of stream; :exc:`OSError` as the socket
        raises it."""
        try:
            return self.socket.recv(size)
        except BlockingIOError:
            return None

    def _direct(self) -> bool:
        # A partial read_bytes of at least one octet, with nothing buffered
        # (read_into and read_until keep Tornado's path).
        return bool(
            self._read_partial
            and self._read_bytes
            and not self._read_buffer_size
            and not self._user_read_buffer
        )

    def _read_direct(self) -> bool:
        """Serve the pending partial read from the socket; ``False`` if the
        socket has nothing yet. Ends and errors close the stream as
        Tornado's read does (which fails the read with
        :exc:`~tornado.iostream.StreamClosedError`)."""
        assert self._read_bytes is not None
        try:
            data = self.recv_chunk(min(self._read_bytes, self.read_chunk_size))
        except OSError as exc:
            if not self._is_connreset(exc):
                gen_log.warning("error on read: %s", exc)
            self.close(exc_info=exc)
            return True
        if data is None:
            return False
        if not data:
            self.close()
            return True
        self._read_bytes = None
        self._read_partial = False
        future, self._read_future = self._read_future, None
        assert future is not None
        if not future.cancelled():
            future.set_result(data)
        return True

    def _try_inline_read(self) -> None:
        # Tornado's BaseIOStream._try_inline_read tries the buffer, then the
        # socket, then listens; this skips the socket try once when hinted,
        # and reads the socket directly when nothing is buffered.
        hinted, self.wait_readable = self.wait_readable, False
        if not self._read_buffer_size:
            if hinted:
                if not self._closed:
                    state = self._state
                    if state is None or not state & IOLoop.READ:
                        self._add_io_state(IOLoop.READ)
                    return
            elif self._direct():
                self._check_closed()
                if not self._read_direct() and not self.closed():
                    self._add_io_state(IOLoop.READ)
                return
        super()._try_inline_read()

    def _handle_read(self) -> None:
        # The socket is readable (the event loop says so).
        if self._direct():
            self._read_direct()
        else:
            super()._handle_read()

    def _handle_events(self, fd: Any, events: int) -> None:
        if events & IOLoop.READ and self._read_future is None and not self._closed:
            watcher = self._on_peer_closed
            if watcher is not None and self._peer_gone():
                self._on_peer_closed = None
                watcher()
            # Nobody is reading: the session is busy answering what it read
            # (a plugin is delivering). Tornado would read now to notice a
            # close, and at the client's end of stream (a client may send
            # its last commands and shut its side) close the whole socket,
            # losing the replies still to come (a 250 for a message stored:
            # the client sends it again). Leave the octets in the socket
            # and stop listening until the session reads again.
            events &= ~IOLoop.READ
            state = self._state
            if state is not None and state & IOLoop.READ:
                self._state = state & ~IOLoop.READ
                self.io_loop.update_handler(self.fileno(), self._state)
            if not events:
                return
        # The event loop's call when the socket is ready. When it is only
        # readable, a direct read is pending, nothing is being written and the
        # stream listens for exactly READ (and errors), Tornado's general
        # handler would do the read and then find the listening state
        # unchanged: the read is all there is to do.
        if (
            events == IOLoop.READ
            and self._state == _LISTENING
            and not self._closed
            and not self._write_buffer
            and not self._connecting
            and self._direct()
        ):
            self._read_direct()
        else:
            super()._handle_events(fd, events)


class SMTPConnection:
    """Handles a connection to an SMTP client, executing SMTP commands.

    :arg stream: the client's :class:`~tornado.iostream.IOStream`.
    :arg address: the client's address as given by the socket.
    :arg plugins: the :class:`~bonzo.hooks.PluginSet` that decides.
    :arg settings: :class:`~bonzo.settings.SMTPSettings`.
    :arg listener: the :class:`~bonzo.settings.ListenerSettings` of the
        socket it came on (TLS and AUTH policy).
    :arg legacy_replies: the original Bonzo API's reply texts (see
        :class:`bonzo.protocol.Policy`).
    :arg refusal: answer this (a ``421``) and close, asking no plugin (the
        server is at its connection limit).
    :arg on_close: called once the session is over and cleaned up.
    :arg on_client: called with the connection once a PROXY header or
        ``XCLIENT`` has named its client (:attr:`remote_ip`); it may return
        the reply (a ``421``) that refuses that client (the per-client
        connection limit), after setting :attr:`refusal_limit`.
    :arg refusal_limit: the limit behind ``refusal`` (``"max_connections"``,
        ``"max_connections_per_ip"``), named in the refusal's log line.

    .. attribute:: stream

       The client's stream (the same for the whole session, TLS or not).

    .. attribute:: address

       The peer's address as given by the socket.

    .. attribute:: remote_ip

       The client's IP address: the peer's, or the one a PROXY header or
       ``XCLIENT`` named (the session's :attr:`~bonzo.session.Session.remote_ip`).

    .. attribute:: session

       The :class:`~bonzo.session.Session`.

    .. attribute:: bytes_received

       Octets read from the client so far (for logs, stats and tests).
    """

    #: The text of the ``421 4.3.2`` that ends the session when the server
    #: stops (:meth:`shutdown`, :meth:`abort` may set another).
    stop_text = "Server shutting down"

    def __init__(
        self,
        stream: IOStream,
        address: Any,
        plugins: PluginSet,
        settings: SMTPSettings,
        listener: ListenerSettings | None = None,
        *,
        legacy_replies: bool = False,
        refusal: errors.SMTPError | None = None,
        on_close: Callable[[SMTPConnection], Any] | None = None,
        on_client: Callable[[SMTPConnection], errors.SMTPError | None] | None = None,
        refusal_limit: str | None = None,
    ) -> None:
        self.stream = stream
        stream.read_chunk_size = min(COMMAND_CHUNK, settings.read_chunk_size)
        # The stream that takes the read hint (a server's own streams do).
        self._hinted = stream if isinstance(stream, SessionStream) else None
        self.address = address
        self.settings = settings
        self.listener = listener = listener or ListenerSettings()
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
        policy = Policy(
            tls_active=listener.implicit_tls,
            starttls=listener.tls_context is not None and not listener.implicit_tls,
            require_tls=listener.require_tls,
            require_auth=listener.require_auth,
            auth_mechanisms=listener.auth_mechanisms if plugins.checks_credentials() else (),
            auth_plaintext=listener.auth_plaintext,
            legacy_replies=legacy_replies,
        )
        kind = LMTPProtocol if listener.protocol == "lmtp" else SMTPProtocol
        self.protocol = core = kind(settings, self.remote_ip, policy, on_refusal=self._log_refusal)
        self.session = Session(self.remote_ip, port, local_ip, local_port, core=core)
        if listener.xclient_trusted:
            core.xclient_allowed = address_in(self.remote_ip, listener.xclient_trusted)
        self.dispatch = Dispatcher(core, self.session, plugins, settings, self._send)
        self.plugins = plugins
        self.bytes_received = 0
        #: The reply a refused connection gets (no plugin is asked), else ``None``.
        self.refusal = refusal
        #: The limit that refused it (``max_connections``...), for the log.
        self.refusal_limit = refusal_limit
        self._on_close = on_close
        self._on_client = on_client
        # True when no plugin is to hear of the session (it never got past
        # the PROXY header).
        self._silent = False
        self._close_callback: Callable[[], Any] | None = None
        self._tls: TLSLayer | None = None
        self._write_future: asyncio.Future[None] | None = None
        # The stream's loop: asking asyncio for the running one costs a
        # getpid() system call (CPython's fork check), once per connection.
        self._loop: asyncio.AbstractEventLoop = (
            getattr(stream.io_loop, "asyncio_loop", None) or asyncio.get_running_loop()
        )
        self._timer: TimerHandle | None = None
        self._timer_at = math.inf
        self._late = False  # the timer was set again by _on_timer (see _waiting)
        self._phase = _BUSY
        now = self._loop.time()
        self._started = now
        self._idle_since = now
        self._command_started: float | None = None
        self._in_content = False
        # When the session's reads began to be answered at once, without a
        # turn of the event loop (None: the last one waited).
        self._busy_since: float | None = None
        self._last_byte = now
        self._window_start = now
        self._window_bytes = 0
        self._since = now  # start of an output wait, a handshake or a last reply
        self._why = ""  # what ended the session, when the timer did
        self._stopping = False
        self._aborted = False  # the grace period is over: no new command
        self._half_closed: float | None = None  # when the server's side ended
        self._forced = False
        self._ended = False
        #: The task running :meth:`run`, once the server started one.
        self.task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- API
    def set_close_callback(self, callback: Callable[[], Any] | None) -> None:
        """Sets a callback that will be run when the connection is closed:
        when the client closes (or resets) it, even while a plugin is at
        work (an original-API handler is running), or else when the session
        ends; once."""
        self._close_callback = callback
        watch = getattr(self.stream, "watch_close", None)
        if watch is not None:
            # The client may go away while the session reads nothing (a
            # plugin is at work): the callback is told then, not when the
            # plugin's work is over.
            watch(self._run_close_callback if callback is not None else None)

    def _run_close_callback(self) -> None:
        """Run the close callback, once (an error in it is logged)."""
        callback, self._close_callback = self._close_callback, None
        if callback is not None:
            try:
                callback()
            except BaseException as exc:  # application code: any exception is its fault
                if passes_through(exc):
                    raise
                app_log.error("Exception in close callback", exc_info=True)

    def close(self) -> None:
        """Close the connection now."""
        self.stream.close()

    def shutdown(self, text: str | None = None) -> None:
        """Ask the session to end: at once with ``421 4.3.2`` if it is waiting
        for a command, else once the message in flight is answered. ``text``:
        the reply's text (default :attr:`stop_text`)."""
        if text:
            self.stop_text = text
        self._stopping = True
        if self._phase == _PROXY:
            self.stream.close()  # not greeted yet: nothing to say
        elif self._phase == _INPUT and not self.protocol.receiving_content:
            self._end(421, self.stop_text, "4.3.2", "shutdown")

    def abort(self, text: str | None = None) -> None:
        """End the session (a shutdown's grace period is over): ``421
        4.3.2`` if the client can still be told, then close. A session in a
        plugin call finishes it first (each is bounded by its timeout) and
        sends its answer before the ``421``: a message that call delivers is
        answered ``250``, never ``421`` while kept (which its client would
        send again). No command after it is run."""
        if text:
            self.stop_text = text
        self._stopping = True
        self._aborted = True
        if self._phase == _HANDSHAKE or self._phase == _PROXY or self._half_closed is not None:
            self.stream.close()  # a lingering one has had its last reply: no more wait
        elif self._phase != _BUSY:
            self._end(421, self.stop_text, "4.3.2", "shutdown")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The asyncio event loop the session runs on."""
        return self._loop

    # ---------------------------------------------------------- main loop
    async def run(self) -> None:
        """Serve the session until it ends; never raises (but for
        cancellation, which still cleans up)."""
        s = self.settings
        first = min(s.idle_timeout, s.max_session_time or s.idle_timeout)
        self._arm(self._loop.time() + first)
        # This task's log lines carry the session's id (JSON logs).
        current_session_id.set(self.session.id)
        try:
            await self._serve()
        except StreamClosedError:
            self._lost()
        except asyncio.CancelledError:
            self._forced = True  # a forced stop: close at once
            raise
        except Exception:
            app_log.error("Unexpected error in session %s", self.session.id, exc_info=True)
        finally:
            await self._finish()

    def _lost(self) -> None:
        """The client closed (or reset) the connection while the session was
        open. In a transaction the operator needs to know ("why was this
        message never sent?"): INFO, as Postfix's "lost connection after
        DATA"; before it (scanners, probes, clients that just leave) DEBUG."""
        core = self.protocol
        if core.closed or self._forced or self._why:
            return  # ended by the server (QUIT, a limit, a timeout, a stop)
        if core.receiving_content:
            where, log = f"in the message of {core.stage}", gen_log.info
        elif core.in_transaction:
            where, log = f"after {core.stage}, in a transaction", gen_log.info
        else:
            where, log = f"after {core.stage}", gen_log.debug
        log(
            "[%s %s] lost connection %s (%d octets received)",
            self.session.id,
            self.remote_ip,
            where,
            self.bytes_received,
        )

    async def _serve(self) -> None:
        core = self.protocol
        dispatch = self.dispatch
        early = b""
        if self.listener.proxy_protocol:
            rest = await self._read_proxy_header()
            if rest is None:
                return
            early = rest
        if self.listener.implicit_tls:
            if not await self._handshake(early):
                return
            early = b""
        if self.refusal is not None:
            core.refuse(self.refusal, close=True, limit=self.refusal_limit)
        else:
            await dispatch.connect()
        if early:
            # What the client sent right after the PROXY header: its first
            # commands, as if read now.
            core.receive_data(early)
        stream = self.stream
        chunk_size = self.settings.read_chunk_size
        while True:
            event = core.next_event()
            kind = type(event)
            if kind is NeedData:
                self._send()
                if self._stopping and (self._aborted or not core.receiving_content):
                    core.close(421, self.stop_text, "4.3.2", limit="shutdown", unprompted=True)
                    continue
                fut = self._write_future
                if fut is not None and not fut.done():
                    # The client is not reading its replies: stop reading its
                    # commands too until it does.
                    await self._wait_output(fut)
                self._waiting()
                if self._tls is None:
                    # Tornado's streams return a Future, typed Awaitable.
                    read: Future[bytes] = stream.read_bytes(chunk_size, partial=True)  # type: ignore[assignment]
                    if read.done():
                        await self._fair_turn()
                    else:
                        self._busy_since = None
                    data = await read
                else:
                    data = await self._read_tls()
                self._phase = _BUSY
                self.bytes_received += len(data)
                if self._in_content:
                    self._last_byte = self._loop.time()
                    self._window_bytes += len(data)
                core.receive_data(data)
            elif kind is DataChunk:
                dispatch.store(event.data)  # type: ignore[union-attr]
            elif kind is Paused:
                self._send()
                await self._drain()
            elif kind is StartTLS:
                if not await self._starttls():
                    return
            elif kind is Closed:
                return
            elif self._aborted or (
                self._stopping and kind is not MessageComplete and kind is not AuthResponse
            ):
                # Commands pipelined after the call that ended the grace
                # period, or after the message (or AUTH exchange) in flight
                # when the stop came: none is run, as a session waiting for
                # a command is answered 421.
                core.close(421, self.stop_text, "4.3.2", limit="shutdown", unprompted=True)
            elif kind is XClient:
                await self._xclient(event)  # type: ignore[arg-type]
            else:
                self._phase = _BUSY
                await dispatch.handle(event)  # type: ignore[arg-type]

    def _waiting(self) -> None:
        """The session is about to wait for the client: note the times the
        deadlines run from, and pull the timer in when a shorter deadline
        starts (a command trickling in, message content). Per read this is a
        few attribute updates; the deadline itself is computed when the
        timer fires (:meth:`_deadline`)."""
        core = self.protocol
        now = self._loop.time()
        self._phase = _INPUT
        if core.receiving_content:
            if not self._in_content:
                self._in_content = True
                self._last_byte = self._window_start = now
                self._window_bytes = 0
                self.stream.read_chunk_size = self.settings.read_chunk_size
                self._check_by(self._deadline()[0])
            return
        if self._in_content:
            self._in_content = False
            self.stream.read_chunk_size = min(COMMAND_CHUNK, self.settings.read_chunk_size)
        if not core.partial_line:
            # A command is complete: the idle time starts again (bytes that
            # do not complete a command never restart it). The timer may be
            # set for a later deadline (it fired in a longer one: a slow
            # message, a handshake; _late): pulled in.
            self._command_started = None
            self._idle_since = now
            if self._late:
                self._late = False
                idle = now + self.settings.idle_timeout
                if idle < self._timer_at:
                    self._arm(idle)
        elif self._command_started is None:
            self._command_started = now
            self._check_by(self._deadline()[0])

    # -------------------------------------------------- the client's address
    async def _read_proxy_header(self) -> bytes | None:
        """Read the PROXY header (within ``proxy_timeout``) and take the
        client's address from it; return the octets that came after it, or
        ``None`` when the connection is closed (untrusted source, malformed
        header, timeout: one warning, no greeting, no plugin asked)."""
        session = self.session
        peer = self._peer()
        self._silent = True
        trusted = self.listener.proxy_trusted
        # A Unix socket listener has none (its file's permissions decide who
        # connects); a peer without an address is never in a list given.
        if trusted and not (
            isinstance(self.address, tuple) and address_in(session.peer_ip, trusted)
        ):
            self._proxy_failed(peer, "source not in proxy_trusted")
            return None
        parser = ProxyParser()
        stream = self.stream
        self._phase = _PROXY
        self._since = self._loop.time()
        self._check_by(self._since + self.settings.proxy_timeout)
        received = 0
        try:
            while True:
                data = await stream.read_bytes(COMMAND_CHUNK, partial=True)
                received += len(data)
                header = parser.feed(data)
                if header is not None:
                    break
        except ProxyError as exc:
            self._proxy_failed(peer, f"bad PROXY header: {exc}")
            return None
        except StreamClosedError:
            if self._why != "proxy_timeout":
                # A TCP health check connects and closes: not worth a warning.
                log = gen_log.info if received else gen_log.debug
                log("[%s %s] closed before the end of the PROXY header", session.id, peer)
            return None
        finally:
            self._phase = _BUSY
        self.bytes_received += received
        self._silent = False
        session.proxy = header
        if header.carries_addresses:
            client = (header.source, header.source_port, header.destination)
            refusal = self._set_client(*client, header.destination_port)
        else:
            # LOCAL (a health check) or no address given: the connection's
            # own addresses stand (counted now for the per-client limit).
            client = (session.remote_ip, session.remote_port, session.local_ip)
            refusal = self._set_client(*client, session.local_port)
        if refusal is not None:
            self.refusal = refusal
        gen_log.debug(
            "[%s %s] PROXY v%d %s %s from %s",
            session.id,
            self.remote_ip,
            header.version,
            header.command,
            header.family,
            peer,
        )
        if header.tlvs.problems:
            # What the client chose (its TLS server name, its certificate)
            # may be malformed: not the proxy's fault, and no reason to
            # refuse the client. Named by the client, as the session is.
            gen_log.info(
                "[%s %s] PROXY v%d header from %s: TLV left out: %s",
                session.id,
                self.remote_ip,
                header.version,
                peer,
                _printable("; ".join(header.tlvs.problems)),
            )
        return parser.rest

    def _peer(self) -> str:
        """The other end of the connection, for a log line: ``host:port``,
        or ``unix:<path>`` on a Unix socket listener, whose peers have no
        address (the session's ``peer_ip`` is ``0.0.0.0`` there)."""
        session = self.session
        if isinstance(self.address, tuple):
            return host_port(session.peer_ip, session.peer_port)
        try:
            path = self.stream.socket.getsockname()
        except (OSError, AttributeError):
            path = ""
        return f"unix:{path}" if isinstance(path, str) and path else "unix socket"

    def _proxy_failed(self, peer: str, why: str) -> None:
        gen_log.warning(
            "[%s %s] closed without greeting: %s", self.session.id, peer, _printable(why)
        )
        if metrics.active is not None:
            metrics.active.connection_refused("proxy")
        self.stream.close()

    def _set_client(
        self, ip: str, port: int, local_ip: str, local_port: int
    ) -> errors.SMTPError | None:
        """Make ``ip`` the client's address for everything (session, core,
        logs, limits): a PROXY header or ``XCLIENT`` named it. Returns the
        refusal the server's per-client limit gives, if any."""
        session = self.session
        self.remote_ip = session.remote_ip = self.protocol.remote_ip = ip
        session.remote_port = port
        session.local_ip = local_ip
        session.local_port = local_port
        trusted = self.listener.xclient_trusted
        self.protocol.xclient_allowed = bool(trusted) and address_in(ip, trusted)
        if self._on_client is not None:
            return self._on_client(self)
        return None

    async def _xclient(self, event: XClient) -> None:
        """``XCLIENT`` from a trusted front-end: the client it names becomes
        the session's, and the session starts over (``bonzo_connect`` asked
        again, a ``220`` greeting)."""
        attrs = event.attributes
        session = self.session
        old = host_port(self.remote_ip, session.remote_port)

        def value(name: str, current: Any, unknown: Any) -> Any:
            if name not in attrs:
                return current
            given = attrs[name]
            return unknown if given is None else given

        refusal = self._set_client(
            value("ADDR", self.remote_ip, "0.0.0.0"),
            int(value("PORT", session.remote_port, 0)),
            value("DESTADDR", session.local_ip, ""),
            int(value("DESTPORT", session.local_port, 0)),
        )
        session.xclient = dict(attrs)
        gen_log.info(
            "[%s %s] XCLIENT from %s: client %s%s",
            session.id,
            self.remote_ip,
            old,
            host_port(self.remote_ip, session.remote_port),
            f" login {attrs['LOGIN']!r}" if attrs.get("LOGIN") else "",
        )
        if refusal is not None:
            self.protocol.reject(refusal, close=True, limit=self.refusal_limit)
            return
        self._phase = _BUSY
        await self.dispatch.reconnect()

    async def _fair_turn(self) -> None:
        """A read was answered at once: past :data:`FAIR_SLICE` of such
        reads in a row, let the event loop run the other sessions (and the
        timers) before going on, so that a client keeping its socket full
        cannot hold the whole process."""
        now = self._loop.time()
        since = self._busy_since
        if since is None:
            self._busy_since = now
        elif now - since > FAIR_SLICE:
            await asyncio.sleep(0)
            self._busy_since = None

    async def _read_tls(self) -> bytes:
        """The next plaintext from the client through TLS."""
        tls = self._tls
        assert tls is not None
        stream = self.stream
        chunk_size = self.settings.read_chunk_size
        while True:
            read: Future[bytes] = stream.read_bytes(chunk_size, partial=True)  # type: ignore[assignment]
            if read.done():
                await self._fair_turn()
            else:
                self._busy_since = None
            received = await read
            try:
                data = tls.receive(received)
            except ssl.SSLError as exc:
                # The client broke TLS (a renegotiation, a bad record): its
                # doing, so one INFO line, as for a failed handshake; the
                # session cannot go on.
                gen_log.info(
                    "[%s %s] TLS error, connection closed: %s",
                    self.session.id,
                    self.remote_ip,
                    getattr(exc, "reason", None) or exc,
                )
                self._tls = None
                await self._alert_and_close(tls)
                raise StreamClosedError() from None
            out = tls.data_to_send()
            if out:
                stream.write(out)
            if data:
                return data
            if tls.peer_closed:
                raise StreamClosedError()

    def _send(self) -> None:
        """Write what the core has queued (never waits, never raises)."""
        data = self.protocol.data_to_send()
        if not data:
            return
        tls = self._tls
        if tls is not None:
            tls.send(data)
            data = tls.data_to_send()
        stream = self.stream
        hinted = self._hinted
        if hinted is not None:
            # The client answers this reply: its next command is not there yet.
            hinted.wait_readable = True
            sent = hinted.try_write(data)
        else:
            sent = try_write(stream, data)
        if sent == len(data):
            self._write_future = None
            return
        try:
            self._write_future = stream.write(data[sent:] if sent else data)
        except StreamClosedError:
            pass  # the loop notices at its next read

    async def _drain(self) -> None:
        """Wait until the client has taken everything written."""
        fut = self._write_future
        if fut is not None and not fut.done():
            await self._wait_output(fut)

    async def _wait_output(self, fut: asyncio.Future[None]) -> None:
        self._phase = _OUTPUT
        self._since = self._loop.time()
        self._check_by(self._since + self.settings.idle_timeout)
        try:
            await fut
        finally:
            self._phase = _BUSY

    # ------------------------------------------------------------------ TLS
    async def _starttls(self) -> bool:
        core = self.protocol
        core.accept()
        if "starttls_pipelined" in core.notes:
            gen_log.warning(
                "[%s %s] discarded plaintext pipelined after STARTTLS",
                self.session.id,
                self.remote_ip,
            )
        self._send()
        await self._drain()
        if not await self._handshake():
            return False
        self.dispatch.end_transaction()
        core.tls_started()
        return True

    async def _handshake(self, initial: bytes = b"") -> bool:
        """Run the TLS handshake over the stream within
        ``tls_handshake_timeout``, starting with the ciphertext ``initial``
        already read (after a PROXY header); log a failure once, with the
        session id."""
        context = self.listener.tls_context
        assert context is not None
        tls = self._tls = TLSLayer(context)
        stream = self.stream
        chunk_size = self.settings.read_chunk_size
        self._phase = _HANDSHAKE
        self._since = self._loop.time()
        self._check_by(self._since + self.settings.tls_handshake_timeout)
        early = b""
        heard = bool(initial)  # anything of a ClientHello
        try:
            if initial:
                early = tls.receive(initial)
                out = tls.data_to_send()
                if out:
                    stream.write(out)
            while not tls.handshake_done:
                received = await stream.read_bytes(chunk_size, partial=True)
                heard = True
                early = tls.receive(received)
                out = tls.data_to_send()
                if out:
                    stream.write(out)
        except ssl.SSLError as exc:
            self._tls = None
            reason = getattr(exc, "reason", None) or exc
            if reason == SNI_FAILED:
                # Our only callback: Python could not read the name asked for.
                reason = "the server name it asked for (SNI) is not ASCII"
            gen_log.info(
                "[%s %s] TLS handshake failed: %s", self.session.id, self.remote_ip, reason
            )
            await self._alert_and_close(tls)
            return False
        except StreamClosedError:
            self._tls = None
            if self._why != "tls_handshake_timeout":
                # Closed before sending anything: a health check (a load
                # balancer's, every few seconds) or a port probe, not a
                # failed handshake: not worth an INFO line each time.
                gen_log.log(
                    logging.INFO if heard else logging.DEBUG,
                    "[%s %s] client closed the connection %s the TLS handshake",
                    self.session.id,
                    self.remote_ip,
                    "during" if heard else "before",
                )
            return False
        finally:
            self._phase = _BUSY
        facts = self.protocol.tls_info = tls.facts()
        if gen_log.isEnabledFor(logging.DEBUG):
            gen_log.debug(
                "[%s %s] TLS established: %s %s%s",
                self.session.id,
                self.remote_ip,
                facts["version"],
                facts["cipher"],
                " (client certificate)" if facts["peer_cert"] else "",
            )
        if early:
            # The client's first command came with the end of the handshake.
            self.bytes_received += len(early)
            self.protocol.receive_data(early)
        return True

    async def _alert_and_close(self, tls: TLSLayer) -> None:
        """Close the connection after a TLS error, first sending the alert
        the TLS layer queued (RFC 8446 6.2: a client refused for its TLS
        version learns ``protocol_version`` instead of seeing the connection
        vanish). Best effort: waits at most :data:`TLS_ALERT_WAIT`."""
        stream = self.stream
        alert = tls.data_to_send()
        if alert and not stream.closed():
            try:
                written = stream.write(alert)
            except StreamClosedError:
                return
            # Closing: a shutdown meanwhile must not write a plaintext 421
            # after the alert.
            self._phase = _CLOSING
            self._since = self._loop.time()
            self._arm(self._deadline()[0])
            # Not wait_for: cancelling the write future would not stop the write.
            await asyncio.wait((written,), timeout=TLS_ALERT_WAIT)
        stream.close()

    # -------------------------------------------------------------- timers
    def _deadline(self) -> tuple[float, str]:
        """When the current state times out, and which limit that is: a pure
        function of the state and the times recorded in it."""
        phase = self._phase
        s = self.settings
        if phase == _INPUT:
            if self._in_content:
                when, why = self._last_byte + s.data_timeout, "data_timeout"
                if s.min_data_rate:
                    window_end = self._window_start + s.data_rate_window
                    if window_end < when:
                        when, why = window_end, "min_data_rate"
            elif self._command_started is not None:
                when, why = self._command_started + s.command_timeout, "command_timeout"
            else:
                when, why = self._idle_since + s.idle_timeout, "idle_timeout"
            if s.max_session_time:
                end = self._started + s.max_session_time
                if end < when:
                    when, why = end, "max_session_time"
            return when, why
        if phase == _OUTPUT:
            return self._since + s.idle_timeout, "output"
        if phase == _HANDSHAKE:
            return self._since + s.tls_handshake_timeout, "tls_handshake_timeout"
        if phase == _PROXY:
            return self._since + s.proxy_timeout, "proxy_timeout"
        if phase == _CLOSING:
            return self._since + min(s.idle_timeout, FINAL_REPLY_WAIT), "final"
        if phase == _LINGER:
            return self._since + LINGER_WAIT, "linger"
        return math.inf, ""  # _BUSY: a plugin's own timeout applies

    def _check_by(self, when: float) -> None:
        """Make the timer fire no later than ``when`` (it is re-armed only for
        an earlier deadline: a later one is found when it fires)."""
        if when < self._timer_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self.stream.closed():
            return
        now = self._loop.time()
        when, why = self._deadline()
        if why == "min_data_rate" and now >= when:
            s = self.settings
            if self._window_bytes >= s.min_data_rate * (now - self._window_start):
                # Fast enough over this window: measure the next one.
                self._window_start = now
                self._window_bytes = 0
                when, why = self._deadline()
        if now < when:
            if when == math.inf:
                # Busy (a plugin runs; its own timeout applies): look again
                # later, as the session will wait for the client again.
                s = self.settings
                when = now + min(s.idle_timeout, s.command_timeout, s.data_rate_window)
            self._arm(when)
            self._late = True  # perhaps later than the next idle deadline
            return
        self._why = why
        if why == "proxy_timeout":
            self._proxy_failed(
                self._peer(),
                f"no PROXY header within {self.settings.proxy_timeout:g}s (proxy_timeout)",
            )
        elif why == "linger":
            self.stream.close()  # the last reply had its time to be read
        elif why in ("output", "final", "tls_handshake_timeout"):
            # Nothing more can be said: the client does not read, or TLS is
            # not up.
            what = {
                "output": "idle_timeout exceeded waiting for the client to read",
                "final": "client did not take the last reply",
                "tls_handshake_timeout": "TLS handshake timed out",
            }[why]
            gen_log.info("[%s %s] %s, closing", self.session.id, self.remote_ip, what)
            self.stream.close()
        elif why == "min_data_rate":
            self._end(421, "Data rate too low", "4.4.2", why)
        elif why == "max_session_time":
            self._end(421, "Session too long, closing connection", "4.4.2", why)
        else:
            self._end(421, "Timeout, closing connection", "4.4.2", why)

    # ------------------------------------------------------------- closing
    def _end(self, code: int, text: str, enhanced: str, why: str) -> None:
        """Send a last reply and close, whatever the loop is doing (it sees
        the stream closed at its next read or write)."""
        if self._phase == _CLOSING or self._half_closed is not None or self.stream.closed():
            return
        self.protocol.close(code, text, enhanced, limit=why, unprompted=True)
        self._send()
        self._phase = _CLOSING
        self._since = self._loop.time()
        self._arm(self._deadline()[0])
        self._after_write(self._close_tls)

    def _after_write(self, then: Callable[[], None]) -> None:
        fut = self._write_future
        if fut is None or fut.done():
            then()
        else:
            fut.add_done_callback(lambda f: then())

    def _close_tls(self) -> None:
        """Send TLS's ``close_notify`` (if TLS is up), then close."""
        tls, self._tls = self._tls, None
        if tls is not None and not self.stream.closed():
            alert = tls.close()
            if alert:
                try:
                    self._write_future = self.stream.write(alert)
                except StreamClosedError:
                    return
                self._after_write(self._close_socket)
                return
        self._close_socket()

    def _lingers(self) -> bool:
        """Whether the session ends with the client perhaps still sending:
        the server ended it (a limit, a timeout, a stop) after the client had
        begun, not at the client's ``QUIT``; a connection refused at once has
        its descriptor back at once."""
        stage = self.protocol.stage
        return stage != "QUIT" and stage != "connect" and not self._forced

    def _close_socket(self) -> None:
        """Close, or only end the server's side where the client may still be
        sending (see :meth:`_lingers`): a socket closed with unread input is
        reset, and a reset client drops the replies it had not read yet —
        the last one, which says why, among them. :meth:`_finish` reads
        until the client closes, within the closing deadline."""
        stream = self.stream
        if self._half_closed is not None:
            return  # already: its wait runs from then (_finish keeps it)
        if not stream.closed() and self._lingers():
            try:
                stream.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self._half_closed = self._loop.time()
                self._linger()
                return
        stream.close()

    def _linger(self) -> None:
        """Wait for the client's close until :data:`LINGER_WAIT` after the
        server's side ended (the loop's own phases may have come between)."""
        assert self._half_closed is not None
        self._phase = _LINGER
        self._since = self._half_closed
        self._arm(self._since + LINGER_WAIT)

    async def _finish(self) -> None:
        """The session is over: flush, close TLS and the socket (bounded),
        then drop the envelope and run the disconnect observers."""
        if self._ended:
            return
        self._ended = True
        stream = self.stream
        try:
            if not stream.closed() and not self._forced:
                self._send()
                fut = self._write_future
                if self._tls is None and (fut is None or fut.done()) and not self._lingers():
                    # The usual end (QUIT answered, all of it sent): nothing
                    # to wait for.
                    stream.close()
                    return
                if self._half_closed is not None:
                    self._linger()  # the server's side has ended: the same wait
                else:
                    if self._phase != _CLOSING:
                        self._phase = _CLOSING
                        self._since = self._loop.time()
                        self._arm(self._deadline()[0])
                    self._after_write(self._close_tls)
                # Until the client closes too (or the closing deadline closes
                # the stream): what it still sends is read and dropped.
                dropped = 0
                while dropped < LINGER_LIMIT:
                    dropped += len(await stream.read_bytes(COMMAND_CHUNK, partial=True))
        except StreamClosedError:
            pass
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if not stream.closed():
                stream.close()
            self.dispatch.end_transaction()
            try:
                await self._cleanup()
            finally:
                # The dispatcher and the core hold callbacks into this
                # connection: reference cycles, which would leave the whole
                # session (stream, core, task...) to the cycle collector, and
                # make it run all the time under many short connections.
                # Dropped, the session is freed as soon as it is over.
                self.dispatch.send = _send_nothing
                self.protocol.on_refusal = None

    async def _cleanup(self) -> None:
        self._run_close_callback()
        if self.refusal is None and not self._silent:
            await self.plugins.observe("bonzo_disconnect", (self.session,), self.session)
        if self._on_close is not None:
            self._on_close(self)

    # ---------------------------------------------------------------- logs
    def _log_refusal(self, refusal: Refusal) -> None:
        """One line for every ``4xx``/``5xx`` reply: who was refused, at which
        stage, by whom, with what."""
        if current_session_id.get() != self.session.id:
            # Called outside the session's task (a timer's timeout, the
            # server's stop): its id still goes on the line (JSON logs).
            token = current_session_id.set(self.session.id)
            try:
                self._log_refusal(refusal)
            finally:
                current_session_id.reset(token)
            return
        # The text and the log message are a plugin's, filled with what a
        # client sent, perhaps (a decoded Subject): escaped, as the argument
        # is by repr, so that none can end this line and forge another. So is
        # the plugin's name; the rest is Bonzo's own (an id, a checked verb,
        # a checked enhanced code, IP addresses, the name of a limit).
        text = one_line(refusal.text.replace("\n", " / "))
        arg = refusal.arg if len(refusal.arg) <= 200 else refusal.arg[:200] + "..."
        by = one_line(refusal.by)
        if refusal.auth_failure:
            # One line per failed AUTH, the client's address always second, for
            # fail2ban: "[<id> <address>] AUTH <mechanism> failed for <user>:
            # <why>: <reply>" (the dispatcher's text: never the password).
            gen_log.warning(
                "[%s %s] %s: %d %s %s",
                self.session.id,
                self.remote_ip,
                one_line(refusal.log_message or f"AUTH failed, refused by {by}"),
                refusal.code,
                refusal.enhanced,
                text,
            )
        elif refusal.log_message:
            # As the original Bonzo logged an SMTPError's log_message: the
            # code and the message first, on tornado.general.
            gen_log.warning(
                "%d %s [%s %s] %s refused by %s: %d %s %s; arg=%r",
                refusal.code,
                one_line(refusal.log_message),
                self.session.id,
                self.remote_ip,
                refusal.stage,
                by,
                refusal.code,
                refusal.enhanced,
                text,
                arg,
            )
        else:
            limit = refusal.limit
            log = gen_log.info
            if limit in _CONNECTION_LIMITS:
                # A connection limit reached is the operator's business
                # (perhaps a limit to raise): a warning, in the one line the
                # refusal gets, naming the proxy that a client came through.
                # Under a flood, past a few a second, they are counted
                # instead and summed up once a second.
                if not connect_refusals.allow(limit):
                    return
                log = gen_log.warning
                peer = self.session.peer_ip
                if peer != self.remote_ip:
                    limit = f"{limit}; via {peer}"
            log(
                "[%s %s] %s refused by %s: %d %s %s; arg=%r%s",
                self.session.id,
                self.remote_ip,
                refusal.stage,
                by,
                refusal.code,
                refusal.enhanced,
                text,
                arg,
                f" ({limit})" if limit else "",
            )


_CONNECTION_LIMITS = ("max_connections", "max_connections_per_ip")


class RefusalLines:
    """How many lines connections refused at connect (over a connection
    limit) get: one each up to ``per_second`` in a second; past that they are
    counted, by limit, and one WARNING a second says how many were not
    logged (a flood of thousands of connections a second must not become as
    many log lines). Per process."""

    def __init__(self, per_second: int = 10) -> None:
        self.per_second = per_second
        self._window = -1.0  # when the current second began (loop time)
        self._lines = 0
        self._unlogged: dict[str, int] = {}
        self._summary: asyncio.TimerHandle | None = None

    def allow(self, limit: str) -> bool:
        """Whether this refusal by ``limit`` gets its own line (else it is
        counted for the next summary)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._window >= 1.0:
            self._window, self._lines = now, 0
        if self._lines < self.per_second:
            self._lines += 1
            return True
        self._unlogged[limit] = self._unlogged.get(limit, 0) + 1
        if self._summary is None:
            self._summary = loop.call_at(self._window + 1.0, self._sum_up)
        return False

    def _sum_up(self) -> None:
        self._summary = None
        counts, self._unlogged = self._unlogged, {}
        if counts:
            gen_log.warning(
                "%d more connection(s) refused at connect in the last second, not "
                "logged one by one (%s); more than %d a second are summed up so",
                sum(counts.values()),
                ", ".join(f"{limit}: {n}" for limit, n in sorted(counts.items())),
                self.per_second,
            )


#: The process's :class:`RefusalLines` (connections refused at connect).
connect_refusals = RefusalLines()


def _printable(text: str) -> str:
    """``text`` with anything but printable ASCII escaped, for one log line."""
    if text.isascii() and text.isprintable():
        return text
    return ascii(text)[1:-1]

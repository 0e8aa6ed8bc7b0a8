"""A non-blocking, single-threaded SMTP server.

:class:`SMTPServer` accepts connections and runs an
:class:`~bonzo.connection.SMTPConnection` for each. The plugins of a
:class:`~bonzo.hooks.PluginSet` decide on every command; or, as in the
original Bonzo, a ``request_callback`` gets an :class:`SMTPRequest` for each
message (it is run as a plugin on the same machinery, :class:`CallbackPlugin`).
"""

from __future__ import annotations

import asyncio
import email
import email.message
import mmap
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from tornado.iostream import IOStream
from tornado.log import app_log, gen_log
from tornado.tcpserver import TCPServer

from . import errors, metrics, version
from .connection import SessionStream, SMTPConnection, connect_refusals
from .hooks import CANCEL_GRACE, PluginSet, passes_through, stop_task
from .hookspecs import Accept
from .listen import accept_on
from .proxy import address_in, client_network
from .session import Envelope, Session, one_line
from .settings import ListenerSettings, SMTPSettings

__all__ = [
    "SMTPServer",
    "SMTPConnection",
    "SMTPRequest",
    "CallbackPlugin",
    "ConnectionCount",
    "client_of",
    "WorkerShare",
    "ACCEPT_BATCH",
]

_TCPSERVER_ARGS = ("max_buffer_size", "read_chunk_size")

#: Connections one readiness event of a listening socket accepts (Tornado's
#: own figure). Worker processes sharing a socket take one at a time
#: (:class:`bonzo.app.MailApp`), so that the others get a chance at a burst
#: of connections the first to wake would otherwise take whole: with long
#: sessions, that worker would carry most of the load for their life.
ACCEPT_BATCH = 128


#: Connections refused over a connection limit that may wait for their
#: ``421`` at once: on an implicit-TLS listener the reply comes after a TLS
#: handshake (a PROXY header on a proxied one); past this many, a refused
#: connection is closed without one.
REFUSING_MAX = 32


class WorkerShare:
    """The connections each worker process has open, in memory that every
    worker sees (an anonymous shared mapping, made before they are forked),
    so that the workers sharing a listening socket share its connections
    evenly.

    A new connection wakes every worker waiting on the socket, and the first
    to call ``accept()`` gets it: whichever the kernel happens to run first.
    A burst of 20 long sessions was split 7/13 as often as 10/10 — and the
    busier worker then limits the whole server for the sessions' life. With
    a share, a worker that has more connections open than the least busy
    accepting one waits a moment before it accepts (:attr:`STEP` seconds per
    connection more, at most :attr:`MAX_WAIT`), so that the other takes the
    connection; if the other does not (it is busy, or stuck), the waiting
    worker accepts it then. A connection is never refused for balance, nor
    kept waiting longer than :attr:`MAX_WAIT`.

    :arg workers: the number of worker slots.
    """

    #: A worker that is not accepting (not started yet, stopping, or dead).
    CLOSED = 1 << 62
    STEP = 0.001
    MAX_WAIT = 0.005

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self._memory = mmap.mmap(-1, 8 * workers)  # shared and anonymous: kept across fork()
        self._counts = memoryview(self._memory).cast("q")
        for i in range(workers):
            self._counts[i] = self.CLOSED
        #: This process's slot, once :meth:`start` was called in it.
        self.slot: int | None = None
        #: Connections open in this process.
        self.open = 0

    def counts(self) -> list[int]:
        """Each slot's open connections (:attr:`CLOSED` if not accepting)."""
        return list(self._counts)

    def start(self, slot: int) -> None:
        """In a worker, once it accepts connections: it is worker ``slot``."""
        self.slot = slot
        self._counts[slot] = self.open

    def stop(self) -> None:
        """In a worker: it accepts no more connections (it is stopping)."""
        if self.slot is not None:
            self._counts[self.slot] = self.CLOSED
            self.slot = None

    def gone(self, slot: int) -> None:
        """In the supervisor: worker ``slot`` died (until its replacement
        starts, nobody waits for it)."""
        self._counts[slot] = self.CLOSED

    def opened(self) -> None:
        self.open += 1
        if self.slot is not None:
            self._counts[self.slot] = self.open

    def closed(self) -> None:
        self.open -= 1
        if self.slot is not None:
            self._counts[self.slot] = self.open

    def wait(self) -> float:
        """Seconds this worker should let the others take a new connection
        before it accepts it (``0``: accept now)."""
        slot = self.slot
        if slot is None:
            return 0.0
        counts = self._counts
        least = min((counts[i] for i in range(len(counts)) if i != slot), default=self.CLOSED)
        more = self.open - least
        return min(self.STEP * more, self.MAX_WAIT) if more > 0 else 0.0


def _count_refused(count: int) -> None:
    counter = metrics.active
    if counter is not None:
        for _ in range(count):
            counter.connection_refused("open_files")


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

    .. attribute:: session

       The :class:`~bonzo.session.Session`.
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
        self._finished = False
        # Made when the server starts waiting (a request can be built with
        # no event loop running, as in Bonzo 0.1).
        self._waiter: asyncio.Future[None] | None = None
        # Handlers an Application started for this request, and the error
        # one failed with before finish() (the reply, when it is waited for).
        self._tasks: list[asyncio.Future[None]] = []
        self._error: BaseException | None = None

    @property
    def message(self) -> email.message.Message:
        """The message parsed from :attr:`data` with :func:`email.message_from_string`
        (on first use)."""
        if self._message is None:
            self._message = email.message_from_string(self.data or "")
        return self._message

    def finish(self) -> None:
        """Accept the message: the client gets ``250 Ok``."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def finished(self) -> bool:
        """True once :meth:`finish` was called."""
        return self._finished

    async def _wait_finished(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if not self._finished:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def _track(self, task: asyncio.Future[None]) -> None:
        """A handler working on this request (cancelled if the reply is
        decided without it: a timeout, an error)."""
        self._tasks.append(task)

    def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    def _fail(self, error: BaseException) -> None:
        """A handler working on this request raised ``error``: before
        :meth:`finish`, that is the reply (``451``, or an
        :class:`~bonzo.errors.SMTPError`'s); after it, the ``250`` stands and
        the error goes to the log."""
        waiter = self._waiter
        if self._finished or (waiter is not None and waiter.done()):
            log_after_reply(self, error)
        elif waiter is not None:
            waiter.set_exception(error)
        else:
            self._error = error

    def __repr__(self) -> str:
        # Exactly as Bonzo 0.1 wrote it: every field quoted, whatever its type.
        attrs = ("remote_ip", "hostname", "mail", "rcpt")
        args = ", ".join("%s='%s'" % (n, getattr(self, n)) for n in attrs)
        return "%s (%s)" % (self.__class__.__name__, args)


def log_after_reply(request: SMTPRequest, error: BaseException) -> None:
    """Log an error of application code raised once the reply to its
    message was decided (after ``finish()``): it cannot change the reply."""
    session = request.session
    app_log.error(
        "Uncaught exception [%s %s] after finish()",
        session.id if session is not None else "-",
        request.remote_ip,
        exc_info=(type(error), error, error.__traceback__),
    )


def _legacy_data(envelope: Envelope) -> str:
    text = envelope.body.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
    return text[:-1] if text.endswith("\n") else text


class CallbackPlugin:
    """The original ``request_callback(request)`` as a plugin.

    It accepts every recipient (the callback sees the whole envelope) and
    delivers by calling the callback when the message is complete; the reply
    waits until ``request.finish()`` is called. A callback may also return an
    awaitable. An exception from it (or no ``finish()`` within the hook
    timeout) answers ``451`` and is logged; an
    :class:`~bonzo.errors.SMTPError` it raises is the reply (one with a
    ``2xx`` code accepts the message: ``250`` with its text, as Bonzo 0.1
    wrote it). Once ``finish()`` was called the ``250`` is decided: a later
    exception is only logged.

    :arg request_callback: the callback.
    :arg server: the server, which tells the callback's request its
        :attr:`SMTPRequest.connection`.
    """

    def __init__(
        self, request_callback: Callable[[SMTPRequest], Any], server: SMTPServer | None = None
    ) -> None:
        self.request_callback = request_callback
        self.server = server

    def bonzo_rcpt(self) -> Accept:
        return Accept()

    async def bonzo_deliver(self, session: Session, envelope: Envelope) -> Accept:
        server = self.server
        request = SMTPRequest(
            server.connection_of(session) if server is not None else None,
            session.remote_ip,
            "DATA",
            hostname=session.helo,
            mail=envelope.mail_from,
            rcpt=list(envelope.rcpt_tos),
            data=_legacy_data(envelope),
            envelope=envelope,
            session=session,
        )
        try:
            await self._run(request)
        except errors.SMTPError as error:
            if error.status_code // 100 != 2:
                raise
            # Bonzo 0.1 wrote any SMTPError as the reply to the data, so a
            # 2xx one ("250 Queued as ...") accepted the message. DATA has
            # one success code: 250, with the error's text.
            note = error.log_text()
            if note is not None:
                gen_log.warning(
                    "%d %s [%s %s]",
                    error.status_code,
                    one_line(note),  # may hold what the client sent
                    session.id,
                    session.remote_ip,
                )
            return Accept(error.message)
        return Accept()

    async def _run(self, request: SMTPRequest) -> None:
        """Call the callback and wait for ``request.finish()``."""
        try:
            try:
                result = self.request_callback(request)
                if result is not None and hasattr(result, "__await__"):
                    await result
            except BaseException as error:
                # Before finish() any error is the reply (the hook runner
                # makes it a fault, whatever its class); after it, the log's.
                if not request.finished or passes_through(error):
                    raise
                # The reply is already decided (finish() was called, and in
                # Bonzo 0.1 the 250 was on its way); an error after that, in
                # a plain callback as in a coroutine, is for the log.
                log_after_reply(request, error)
            await request._wait_finished()
        except BaseException:
            # A handler the callback started and left running (app(request)
            # not returned) must not outlive a reply decided without it.
            request._cancel_tasks()
            raise


class ListenerCount:
    """One listener's open connections, in all (:attr:`open`) and per
    client (:attr:`per_ip`), for its own limits: what a reload's new server
    on the listener shares with the one it replaces."""

    __slots__ = ("open", "per_ip")

    def __init__(self) -> None:
        self.open = 0
        self.per_ip: Counter[str] = Counter()


class ConnectionCount:
    """Connections open across the servers (listeners) that share this
    object, in all and per client address, for the connection limits.

    A connection whose client is not known yet (its PROXY header has not
    arrived) counts in :attr:`total` only (``ip`` is ``None``) until
    :meth:`move` puts it under its client's address.

    :arg max_connections: the server-wide limit (``[limits]``), checked
        besides each listener's own; ``None``: only the listeners' own.
    :arg max_connections_per_ip: the same, per client address.
    :arg ipv6_prefix_length: the bits of an IPv6 address that make one
        client (:func:`client_of`); :attr:`per_ip` is keyed by client.
    """

    def __init__(
        self,
        max_connections: int | None = None,
        max_connections_per_ip: int | None = None,
        ipv6_prefix_length: int = 64,
    ) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.ipv6_prefix_length = ipv6_prefix_length

    def client(self, ip: str) -> str:
        """The client address ``ip`` counts under (:func:`client_of`)."""
        return client_of(ip, self.ipv6_prefix_length)

    def connections_of(self, ip: str) -> int:
        """The connections counted from the client of address ``ip``."""
        return self.per_ip[self.client(ip)]

    def add(self, ip: str | None) -> None:
        self.total += 1
        if ip is not None:
            self.per_ip[self.client(ip)] += 1

    def remove(self, ip: str | None) -> None:
        self.total -= 1
        self._drop(ip)

    def move(self, old: str | None, new: str | None) -> None:
        """Count a connection under ``new`` instead of ``old`` (``None``: in
        the total only)."""
        self._drop(old)
        if new is not None:
            self.per_ip[self.client(new)] += 1

    def _drop(self, ip: str | None) -> None:
        if ip is not None:
            _uncount(self.per_ip, self.client(ip))


def client_of(ip: str, ipv6_prefix_length: int) -> str:
    """The client an address belongs to, for the per-client connection
    count: an IPv4 address itself (also written as IPv4-mapped IPv6), an
    IPv6 address its network of ``ipv6_prefix_length`` bits
    (``2001:db8:1:2::/64``, :func:`~bonzo.proxy.client_network`), since one
    host or home network gets a whole ``/64`` and could otherwise take a
    fresh address for each connection."""
    if ":" not in ip:
        return ip  # IPv4 (or "0.0.0.0" for a peer without an address): as it is
    return client_network(ip, 32, ipv6_prefix_length)


def _uncount(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class SMTPServer(TCPServer):
    """A non-blocking, single-threaded SMTP server.

    A server is defined by a request callback that takes an instance of
    :class:`SMTPRequest` as an argument, or by the plugins that decide on
    every command:

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
        ``plugins`` is given.
    :arg plugins: a :class:`~bonzo.hooks.PluginSet`.
    :arg settings: :class:`~bonzo.settings.SMTPSettings`; other keyword
        arguments that name a setting override it (``SMTPServer(cb,
        max_message_size=10_000_000)``). ``ssl_options`` makes every
        connection start with TLS (implicit TLS, as with Tornado);
        ``max_buffer_size`` and ``read_chunk_size`` go to
        :class:`tornado.tcpserver.TCPServer`. With a request callback,
        ``max_buffer_size`` also caps the message, as it did in Bonzo 0.1
        (which read the whole message into the stream's buffer): the
        smaller of it and ``max_message_size`` is the limit.
    :arg listener: :class:`~bonzo.settings.ListenerSettings` (TLS and AUTH
        policy).
    :arg count: a :class:`ConnectionCount` shared with other servers, so that
        the connection limits hold across listeners.
    :arg accept_batch: connections taken from a listening socket each time it
        is ready (:data:`ACCEPT_BATCH`; the daemon's workers take ``1``).
    :arg share: the daemon's :class:`WorkerShare`, when worker processes
        share the listening sockets.

    Used with a request callback, the greeting is the original
    ``220 Bonzo SMTP Server <version>`` and the original reply texts are
    kept for clients that do not say EHLO; otherwise the greeting is the
    settings' banner and every reply carries an enhanced status code.

    .. versionchanged:: 0.2
       ``plugins``, ``settings``, ``listener``, ``count``, ``accept_batch``
       and ``share``.
    """

    def __init__(
        self,
        request_callback: Callable[[SMTPRequest], Any] | None = None,
        io_loop: Any = None,
        *,
        plugins: PluginSet | None = None,
        settings: SMTPSettings | None = None,
        listener: ListenerSettings | None = None,
        count: ConnectionCount | None = None,
        accept_batch: int = ACCEPT_BATCH,
        share: WorkerShare | None = None,
        **kwargs: Any,
    ) -> None:
        # io_loop is accepted (and ignored) for code written for Tornado < 5.
        if (request_callback is None) == (plugins is None):
            raise TypeError("give exactly one of request_callback and plugins")
        tcp_kwargs = {k: kwargs.pop(k) for k in _TCPSERVER_ARGS if k in kwargs}
        ssl_options = kwargs.pop("ssl_options", None)
        base = settings or SMTPSettings(
            banner=f"Bonzo SMTP Server {version}" if request_callback is not None else None
        )
        unknown = set(kwargs) - set(SMTPSettings.field_names())
        if unknown:
            raise TypeError(f"unknown SMTPServer option(s): {', '.join(sorted(unknown))}")
        if request_callback is not None and tcp_kwargs.get("max_buffer_size"):
            # Bonzo 0.1 buffered the whole message in the IOStream, so
            # max_buffer_size bounded it; messages are read in chunks now,
            # and an operator's smaller cap must still hold.
            cap = tcp_kwargs["max_buffer_size"]
            limit = kwargs.get("max_message_size", base.max_message_size)
            kwargs["max_message_size"] = min(limit, cap) if limit else cap
        self.settings = base.replace(**kwargs) if kwargs else base
        self.request_callback = request_callback
        if plugins is None:
            plugins = PluginSet(timeout=self.settings.handler_timeout)
            plugins.register(CallbackPlugin(request_callback, self), "request_callback")  # type: ignore[arg-type]
        #: The plugins that decide.
        self.plugins = plugins
        if ssl_options is not None and listener is None:
            listener = ListenerSettings(tls_context=_context(ssl_options), implicit_tls=True)
        self.listener = listener or ListenerSettings()
        #: The open connections.
        self.connections: set[SMTPConnection] = set()
        self.count = count or ConnectionCount(ipv6_prefix_length=self.settings.ipv6_prefix_length)
        # This listener's own connections (its limits may differ from the
        # server-wide ones in the count); shared with the server it replaced
        # at a reload (continue_counts).
        self._own = ListenerCount()
        self._by_session: dict[str, SMTPConnection] = {}
        self._forced = False  # force_stop() was called
        # The address each counted connection is counted under (None: in
        # the total only, its client not known yet).
        self._counted: dict[SMTPConnection, str | None] = {}
        self._legacy = request_callback is not None
        if accept_batch < 1:
            raise ValueError(f"accept_batch must be at least 1, not {accept_batch}")
        #: Connections taken from a listening socket each time it is ready.
        self.accept_batch = accept_batch
        #: The daemon's :class:`WorkerShare` (``None``: one process).
        self.share = share
        super().__init__(**tcp_kwargs)

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        """Accept connections on ``sockets`` (as Tornado's, at most
        :attr:`accept_batch` each time a socket is ready). Out of
        descriptors, new clients get ``421 4.3.2`` and are closed
        (:func:`~bonzo.listen.accept_on`), but on an implicit-TLS listener,
        where a plain-text reply means nothing: there they wait."""
        refusal = None
        if not self.listener.implicit_tls:
            refusal = (
                b"421 Service not available, out of resources; try again later\r\n"
                if self._legacy
                else b"421 4.3.2 Service not available, out of resources; try again later\r\n"
            )
        for sock in sockets:
            if sock.fileno() in self._sockets:
                continue  # accepting on it already
            # Registered first, recorded after: a socket the loop refuses
            # (``fd ... added twice``: another server accepts on it) is not
            # left half added for release_sockets() or stop() to trip on.
            handler = accept_on(
                sock,
                self._open_stream,
                self.accept_batch,
                self.share,
                refusal=refusal,
                on_refused=_count_refused,
            )
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = handler

    def _open_stream(self, connection: socket.socket, address: Any) -> None:
        # Tornado's TCPServer makes a plain IOStream; sessions get the one
        # that takes the session loop's read hint (TLS is a layer above it).
        stream: SessionStream | None = None
        try:
            stream = SessionStream(
                connection,
                max_buffer_size=self.max_buffer_size,
                read_chunk_size=self.read_chunk_size,
            )
            self.handle_stream(stream, address)
        except Exception:
            app_log.error("Error in connection callback", exc_info=True)
            # Never leave the client's socket open with nobody serving it.
            if stream is not None:
                stream.close()
            else:
                connection.close()

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        """Start a session for a new connection (called by TCPServer)."""
        settings = self.settings
        # A Unix socket's peer has no address (0.0.0.0 in the session): its
        # clients are local processes, held by max_connections only, as
        # Postfix exempts its own networks from its per-client count.
        unix = not (isinstance(address, tuple) and address)
        ip = "0.0.0.0" if unix else str(address[0])
        # Behind a proxy the client's address comes in the PROXY header: the
        # per-client limit is applied then (_client_named).
        proxied = self.listener.proxy_protocol
        # A trusted XCLIENT front-end (the operator's own filter) names its
        # client in the session: that client is counted then, the front-end
        # never, or it could hold only max_connections_per_ip clients.
        front_end = not proxied and self._front_end(ip)
        uncounted = proxied or front_end or unix
        refusal = limit = None
        count = self.count
        # The listener's limits hold for its own connections, the server-wide
        # ones (if any) for all listeners together.
        if self._own.open >= settings.max_connections or (
            count.max_connections is not None and count.total >= count.max_connections
        ):
            refusal, limit = "Too many connections, try again later", "max_connections"
        elif not uncounted and self._over_ip_limit(ip):
            refusal, limit = "Too many connections from your address", "max_connections_per_ip"
        if (
            limit is not None
            and (self.listener.implicit_tls or proxied)
            and self.refusing >= REFUSING_MAX
        ):
            # Its 421 would wait for a TLS handshake (or a PROXY header), up
            # to tls_handshake_timeout: that many refused clients hold
            # descriptors already, and those that never start TLS hold them
            # without bound. This one is closed at once.
            if connect_refusals.allow(f"{limit}, closed at once"):
                gen_log.info(
                    "[- %s] refused at connect by core: closed at once (%s; %d refused "
                    "connections still waiting for their 421)",
                    ip,
                    limit,
                    self.refusing,
                )
            if metrics.active is not None:
                metrics.active.connection_refused(limit)
            stream.close()
            return
        connection = SMTPConnection(
            stream,
            address,
            self.plugins,
            settings,
            self.listener,
            legacy_replies=self._legacy,
            refusal=errors.SMTPError(421, refusal, enhanced_code="4.7.0", close=True)
            if refusal
            else None,
            on_close=self._connection_closed,
            on_client=self._client_named,
            refusal_limit=limit,
        )
        counter = metrics.active
        if counter is not None:
            counter.connection_opened(connection, limit)
        # A refused connection is not counted; its connection logs the refusal.
        if limit is None:
            counted = None if uncounted else ip
            count.add(counted)
            self._counted[connection] = counted
            self._own.open += 1
            if counted is not None:
                self._own.per_ip[self._client(counted)] += 1
        self.connections.add(connection)
        if self.share is not None:
            self.share.opened()
        self._by_session[connection.session.id] = connection
        connection.task = connection.loop.create_task(connection.run())

    @property
    def refusing(self) -> int:
        """Connections refused at accept (over a connection limit) that are
        still open, their ``421`` not sent yet: every connection but the
        counted ones."""
        return len(self.connections) - len(self._counted)

    def connection_of(self, session: Session) -> SMTPConnection | None:
        """The connection a session of this server runs on (for the original
        API's :attr:`SMTPRequest.connection`; plugins never need it)."""
        return self._by_session.get(session.id)

    def _client_named(self, connection: SMTPConnection) -> errors.SMTPError | None:
        """A PROXY header or ``XCLIENT`` named the connection's client: count
        the connection under that address, or refuse it (``421 4.7.0``) when
        that client has ``max_connections_per_ip`` already."""
        if connection not in self._counted:
            return None  # refused at accept: not counted
        ip = connection.remote_ip
        counted = self._counted[connection]
        if counted == ip:
            return None
        if counted is None and ip == "0.0.0.0" and not isinstance(connection.address, tuple):
            return None  # a Unix socket's own peer (PROXY LOCAL): uncounted, as at accept
        if self._front_end(ip):
            # A PROXY header named a trusted XCLIENT front-end (or XCLIENT a
            # client trusted as one): in the total only, as at accept.
            self.count.move(counted, None)
            self._drop_own(counted)
            self._counted[connection] = None
            return None
        # Another address of the same client (its IPv6 network) changes no count.
        same = (
            counted is not None
            and self._client(counted) == self._client(ip)
            and self.count.client(counted) == self.count.client(ip)
        )
        if not same and self._over_ip_limit(ip):
            text = "Too many connections from your address"
            connection.refusal_limit = "max_connections_per_ip"
            if metrics.active is not None:
                metrics.active.connection_refused("max_connections_per_ip")
            return errors.SMTPError(421, text, enhanced_code="4.7.0", close=True)
        self.count.move(counted, ip)
        self._drop_own(counted)
        self._own.per_ip[self._client(ip)] += 1
        self._counted[connection] = ip
        return None

    def _front_end(self, ip: str) -> bool:
        """Whether ``ip`` is a front-end trusted with ``XCLIENT`` here (not
        counted for ``max_connections_per_ip``)."""
        trusted = self.listener.xclient_trusted
        return bool(trusted) and address_in(ip, trusted)

    def _client(self, ip: str) -> str:
        """The client ``ip`` counts under here (its IPv6 network)."""
        return client_of(ip, self.settings.ipv6_prefix_length)

    def _over_ip_limit(self, ip: str) -> bool:
        """True when the client of ``ip`` has this listener's
        ``max_connections_per_ip`` connections here, or the server-wide
        limit across listeners."""
        count = self.count
        return self._own.per_ip[self._client(ip)] >= self.settings.max_connections_per_ip or (
            count.max_connections_per_ip is not None
            and count.connections_of(ip) >= count.max_connections_per_ip
        )

    def _drop_own(self, ip: str | None) -> None:
        if ip is not None:
            _uncount(self._own.per_ip, self._client(ip))

    def _connection_closed(self, connection: SMTPConnection) -> None:
        if connection in self.connections:
            if metrics.active is not None:
                metrics.active.connection_closed(connection)
            self.connections.discard(connection)
            if self.share is not None:
                self.share.closed()
            self._by_session.pop(connection.session.id, None)
            if connection in self._counted:
                counted = self._counted.pop(connection)
                self.count.remove(counted)
                self._own.open -= 1
                self._drop_own(counted)

    def continue_counts(self, old: SMTPServer) -> None:
        """Count on from ``old``'s connections (a reload: the server it
        replaces on the same listener, whose sessions finish meanwhile), so
        that they hold this server's connection limits too: a reload must
        not give every client a fresh quota beside what it holds. Nothing
        is shared when the two group IPv6 clients differently."""
        if old.settings.ipv6_prefix_length == self.settings.ipv6_prefix_length:
            self._own = old._own

    def release_sockets(self) -> list[socket.socket]:
        """Stop accepting on the listening sockets without closing them, and
        return them (a reload hands them to the server of the new
        configuration); sessions in progress go on."""
        released = []
        for fd, sock in list(self._sockets.items()):
            self._handlers.pop(fd)()  # unregister from the IOLoop; the socket stays open
            released.append(sock)
        self._sockets.clear()
        return released

    async def shutdown(self, grace: float | None = None, text: str | None = None) -> None:
        """Stop gracefully: stop accepting, answer ``421 4.3.2`` to sessions
        waiting for a command, let messages in flight finish for ``grace``
        seconds (default: the ``shutdown_grace`` setting), then end every
        session that is left with a last ``421 4.3.2`` where the client can
        still take it (``text``: that reply's text, default
        :attr:`~bonzo.connection.SMTPConnection.stop_text`). Returns once every
        session has ended and been cleaned up (``bonzo_disconnect`` run): a
        plugin call in flight at the end of the grace period is let finish
        (each is bounded by its timeout, and abandoned
        :data:`~bonzo.hooks.CANCEL_GRACE` seconds later if it ignores its
        cancellation), so nothing runs after this returns. :meth:`force_stop`
        ends them at once."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self.stop()
        if not self.connections:
            return
        for connection in list(self.connections):
            connection.shutdown(text)
        if await self._wait(grace):
            return
        app_log.warning(
            "Shutdown grace period over; closing %d connection(s)", len(self.connections)
        )
        for connection in list(self.connections):
            connection.abort(text)
        while not await self._wait(5.0):
            if self._forced:
                app_log.warning(
                    "stop forced: waiting for %d session(s) to end (their plugin calls are "
                    "cancelled, and abandoned %gs later if they ignore it)",
                    len(self.connections),
                    CANCEL_GRACE,
                )
            else:
                app_log.warning(
                    "waiting for %d session(s) to finish a plugin call (each is bounded by "
                    "its plugin's timeout, and %gs more for one that ignores its "
                    "cancellation; a second SIGTERM forces the stop)",
                    len(self.connections),
                    CANCEL_GRACE,
                )

    async def _wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every session to end."""
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        return not any(c.task is not None and not c.task.done() for c in self.connections)

    def force_stop(self) -> None:
        """End every session now (a second SIGTERM): cancel what each is
        doing, plugin calls included (one that ignores its cancellation is
        abandoned :data:`~bonzo.hooks.CANCEL_GRACE` seconds later); their
        cleanup still runs."""
        self._forced = True
        self.stop()
        self._stop_sessions()

    def _stop_sessions(self) -> None:
        """Cancel, as a stop, what every session still running is doing."""
        for connection in list(self.connections):
            task = connection.task
            if task is not None and not task.done():
                stop_task(task)

    async def close_all_connections(self) -> None:
        """Close every connection now and wait for the sessions to clean up
        (for tests, like :meth:`tornado.httpserver.HTTPServer.close_all_connections`).
        A session still in a plugin call a second later (a request callback
        that never finished) is stopped as a forced stop stops it."""
        for connection in list(self.connections):
            connection.close()
        if await self._wait(1.0):
            return
        self._stop_sessions()
        await self._wait(CANCEL_GRACE + 5.0)


def _context(ssl_options: Any) -> Any:
    import ssl

    from tornado.netutil import ssl_options_to_context

    if isinstance(ssl_options, ssl.SSLContext):
        return ssl_options
    return ssl_options_to_context(ssl_options, server_side=True)

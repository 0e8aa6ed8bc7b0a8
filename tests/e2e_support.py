"""Helpers for the end-to-end tests: a server in a background thread, a
recording plugin, a raw socket client, a log watcher and a polling wait.

Every server listens on 127.0.0.1 only, on a port the kernel picks; every wait
has a deadline. The fixtures that use these live in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from tornado.netutil import bind_sockets, bind_unix_socket
from tornado.testing import bind_unused_port

from bonzo.connection import SMTPConnection
from bonzo.hooks import PluginSet
from bonzo.hookspecs import Accept
from bonzo.server import SMTPServer
from bonzo.session import Envelope, Session

HOST = "127.0.0.1"

#: Default wait for anything in these tests, in seconds.
TIMEOUT = 5.0


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = TIMEOUT,
    interval: float = 0.005,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something true; return that.

    Raises :class:`AssertionError` naming ``message`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# ---------------------------------------------------------------- handlers
@dataclass
class Delivered:
    """A copy of what a handler saw of one accepted message."""

    session_id: str
    helo: str | None
    esmtp: bool
    mail_from: str
    mail_params: dict[str, str | None]
    rcpt_tos: list[str]
    size: int
    spooled: bool
    digest: str
    """SHA-256 of the body (the client's content, unstuffed)."""
    header_bytes: bytes
    body: bytes | None
    """The body, unless it was larger than :data:`KEEP_BODY`."""

    @property
    def content(self) -> bytes:
        assert self.body is not None, "body too large to keep; compare digest"
        return self.header_bytes + self.body


#: Bodies up to this size are copied into :class:`Delivered`.
KEEP_BODY = 1 << 20


def record(session: Session, envelope: Envelope) -> Delivered:
    """Copy what matters of ``envelope`` without reading a large body into memory."""
    digest = hashlib.sha256()
    body = envelope.open_body()
    while True:
        block = body.read(65536)
        if not block:
            break
        digest.update(block)
    return Delivered(
        session_id=session.id,
        helo=session.helo,
        esmtp=session.esmtp,
        mail_from=envelope.mail_from,
        mail_params=dict(envelope.mail_params),
        rcpt_tos=list(envelope.rcpt_tos),
        size=envelope.size,
        spooled=envelope.spooled,
        digest=digest.hexdigest(),
        header_bytes=envelope.header_bytes,
        body=envelope.body if envelope.size <= KEEP_BODY else None,
    )


class RecordingPlugin:
    """Accepts every recipient, delivers by recording each message, and
    records senders, connects and disconnects.

    Tests subclass it to refuse, fail or stall at one point (override a
    ``bonzo_*`` hook). The lists are appended to on the server's thread and
    read on the test's.
    """

    def __init__(self) -> None:
        self.messages: list[Delivered] = []
        self.connected: list[Session] = []
        self.senders: list[str] = []
        self.disconnected: list[Session] = []

    def bonzo_connect(self, session: Session) -> Any:
        self.connected.append(session)

    def bonzo_mail(self, session: Session, envelope: Envelope) -> Any:
        self.senders.append(envelope.mail_from)

    def bonzo_rcpt(self) -> Any:
        return Accept()

    def bonzo_deliver(self, session: Session, envelope: Envelope) -> Any:
        self.messages.append(record(session, envelope))
        return Accept()

    def bonzo_disconnect(self, session: Session) -> Any:
        self.disconnected.append(session)


# ------------------------------------------------------------------ server
class MeasuredServer(SMTPServer):
    """An SMTPServer that can shrink each connection's socket send buffer
    (``sndbuf``) and records the most output a connection held in user space
    at once (Tornado's write buffer plus the core's queued replies) in
    :attr:`high_water`."""

    def __init__(self, *args: Any, sndbuf: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sndbuf = sndbuf
        self.high_water = 0

    def handle_stream(self, stream: Any, address: Any) -> None:
        if self.sndbuf is not None:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        super().handle_stream(stream, address)
        connection = next((c for c in self.connections if c.stream is stream), None)
        if connection is None:
            return  # closed at once: no session to measure
        # Weak references: the wrapper is the stream's own attribute, and a
        # strong one would make a reference cycle that keeps the session
        # alive after it ends (a test checks that nothing does).
        weak_stream, weak_connection = weakref.ref(stream), weakref.ref(connection)
        write = type(stream).write

        def measured_write(data: bytes) -> Any:
            stream, connection = weak_stream(), weak_connection()
            assert stream is not None
            future = write(stream, data)
            # The stream drops its buffer when the write finds the peer gone.
            buffer = stream._write_buffer
            pending = connection.protocol.pending_output if connection is not None else 0
            held = (len(buffer) if buffer is not None else 0) + pending
            self.high_water = max(self.high_water, held)
            return future

        stream.write = measured_write


class ServerThread:
    """An :class:`SMTPServer` on 127.0.0.1 (or on a Unix socket:
    ``unix_path=``), with its own event loop (and so its own Tornado IOLoop)
    in a background thread.

    Sync clients (smtplib, swaks, sockets) and async ones (aiosmtplib run in
    the test's own ``asyncio.run``) talk to it alike; :meth:`call` and
    :meth:`run` reach into the server's thread to look at its state.
    """

    def __init__(
        self,
        request_callback: Callable[..., Any] | None = None,
        *,
        plugin: Any = None,
        plugins: PluginSet | None = None,
        **options: Any,
    ) -> None:
        if request_callback is None and plugin is None and plugins is None:
            plugin = RecordingPlugin()
        if plugin is not None:
            plugins = PluginSet(timeout=options.pop("timeout", 60.0))
            plugins.register(plugin, type(plugin).__name__)
        self.plugin = plugin
        self.plugins = plugins
        self.request_callback = request_callback
        self.sndbuf = options.pop("sndbuf", None)
        #: Listen on this Unix socket (mode 0666) instead of a TCP port.
        self.unix_path: str | None = options.pop("unix_path", None)
        #: Listen on this TCP port (default: one the system picks).
        self.fixed_port: int | None = options.pop("port", None)
        self.options = options
        self.host = HOST
        self.port = 0
        self.server: MeasuredServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._sock: socket.socket | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self) -> ServerThread:
        if self.unix_path is not None:
            sock = bind_unix_socket(self.unix_path, mode=0o666)
        elif self.fixed_port is not None:
            [sock] = bind_sockets(self.fixed_port, HOST)
            self.port = self.fixed_port
        else:
            sock, self.port = bind_unused_port()
        self._sock = sock
        self._thread = threading.Thread(
            target=self._thread_main, name=f"smtp-server-{self.port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(TIMEOUT):
            raise RuntimeError("SMTP server thread did not start")
        if self._error is not None:
            raise self._error
        return self

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # pragma: no cover - reported to the test
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = MeasuredServer(
                self.request_callback, plugins=self.plugins, sndbuf=self.sndbuf, **self.options
            )
            assert self._sock is not None
            self.server.add_sockets([self._sock])
        except BaseException as exc:
            self._error = exc
            if self._sock is not None:
                self._sock.close()
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        server = self.server
        server.stop()
        # Close the sessions and let them run their cleanup.
        await asyncio.wait_for(server.close_all_connections(), TIMEOUT)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = TIMEOUT) -> Any:
        """Run ``fn(*args)`` on the server's thread and return its result."""

        async def wrapper() -> Any:
            return fn(*args)

        return self.run(wrapper(), timeout=timeout)

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = TIMEOUT) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return self.submit(coro).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Start a coroutine on the server's loop; return a concurrent Future."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def connections(self) -> list[SMTPConnection]:
        """The server's live connections (a snapshot)."""
        assert self.server is not None
        return self.call(lambda: list(self.server.connections))  # type: ignore[union-attr]

    def wait_connections(self, count: int, timeout: float = TIMEOUT) -> None:
        """Wait until the server has exactly ``count`` live connections."""
        wait_until(
            lambda: len(self.connections()) == count,
            timeout,
            message=f"{count} live connection(s)",
        )

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        if self.loop is not None and self._stop is not None and thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        thread.join(TIMEOUT * 2)
        if thread.is_alive():  # pragma: no cover - a hung server is a failure
            raise RuntimeError("SMTP server thread did not stop")
        if self._error is not None:
            raise self._error


# ------------------------------------------------------------------ client
_REPLY_END = re.compile(rb"^\d{3}(?: [^\r\n]*)?\r\n", re.M)


class RawClient:
    """A blocking socket client that speaks SMTP bytes, with timeouts.

    Replies are read into a buffer and split into whole replies (every line
    of a multi-line reply together).
    """

    def __init__(
        self,
        port: int,
        host: str = HOST,
        timeout: float = TIMEOUT,
        rcvbuf: int | None = None,
    ) -> None:
        self.timeout = timeout
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                # Set before connect so the advertised window is small.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_once(self, timeout: float | None = None) -> bytes:
        """One ``recv`` call: whatever has arrived (b"" at EOF)."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        data = self.sock.recv(1 << 20)
        if not data:
            self.eof = True
        return data

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no reply in time; have {self.buffer[-300:]!r}")
        data = self.recv_once(left)
        if not data:
            raise ConnectionError(f"connection closed; have {self.buffer[-300:]!r}")
        self.buffer += data

    def _take_reply(self) -> bytes | None:
        # A reply ends at the first line "ddd " (or "ddd") + CRLF.
        for match in _REPLY_END.finditer(self.buffer):
            end = match.end()
            reply, self.buffer = self.buffer[:end], self.buffer[end:]
            return reply
        return None

    def reply(self, timeout: float | None = None) -> bytes:
        """Read one whole reply."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            reply = self._take_reply()
            if reply is not None:
                return reply
            self._fill(deadline)

    def replies(self, count: int, timeout: float | None = None) -> list[bytes]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return [self.reply(max(deadline - time.monotonic(), 0.001)) for _ in range(count)]

    def command(self, line: bytes | str, timeout: float | None = None) -> bytes:
        """Send one command line (CRLF added) and read its reply."""
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply(timeout)

    def read_to_eof(self, timeout: float | None = None) -> bytes:
        """Read until the server closes; return everything not yet consumed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"server did not close; have {self.buffer[-300:]!r}")
            try:
                data = self.recv_once(left)
            except ConnectionResetError:
                self.eof = True
                break
            self.buffer += data
        data, self.buffer = self.buffer, b""
        return data

    def greet(self, ehlo: str | None = "client.test") -> bytes:
        """Read the greeting and (by default) say EHLO; return the EHLO reply."""
        greeting = self.reply()
        assert greeting.startswith(b"220 "), greeting
        if ehlo is None:
            return greeting
        reply = self.command(f"EHLO {ehlo}")
        assert reply.startswith(b"250"), reply
        return reply


def codes(replies: list[bytes]) -> list[int]:
    return [int(r[:3]) for r in replies]


# --------------------------------------------------------------------- logs
class LogWatch(logging.Handler):
    """Collects records from the framework's loggers; ERROR records not
    declared with :meth:`allow` (or found by :meth:`wait_for`) fail the test.
    """

    LOGGERS = ("tornado", "bonzo", "asyncio")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._allowed: list[tuple[str, re.Pattern[str]]] = []
        self._saved: list[tuple[logging.Logger, int]] = []

    def install(self) -> None:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.level))
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)

    def uninstall(self) -> None:
        for logger, level in self._saved:
            logger.removeHandler(self)
            logger.setLevel(level)
        self._saved.clear()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def allow(self, pattern: str, logger: str = "") -> None:
        """Declare ERROR records whose message matches ``pattern`` (from a logger
        named ``logger`` or below it) as expected."""
        self._allowed.append((logger, re.compile(pattern)))

    def _is_allowed(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return any(
            (not logger or record.name == logger or record.name.startswith(logger + "."))
            and pattern.search(message)
            for logger, pattern in self._allowed
        )

    def matching(self, pattern: str, logger: str = "") -> list[logging.LogRecord]:
        regex = re.compile(pattern)
        return [
            r
            for r in list(self.records)
            if (not logger or r.name == logger or r.name.startswith(logger + "."))
            and regex.search(r.getMessage())
        ]

    def wait_for(
        self, pattern: str, logger: str = "", timeout: float = TIMEOUT
    ) -> logging.LogRecord:
        """Wait for a record matching ``pattern``, allow such records, return it."""
        self.allow(pattern, logger)
        found = wait_until(
            lambda: self.matching(pattern, logger), timeout, message=f"log record {pattern!r}"
        )
        return found[0]

    def unexpected(self) -> list[logging.LogRecord]:
        return [
            r for r in list(self.records) if r.levelno >= logging.ERROR and not self._is_allowed(r)
        ]


def fds_under(path) -> list[str]:
    """Open file descriptors of this process whose target is under ``path``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found

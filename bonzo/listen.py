"""Accepting connections on a listening socket, for the SMTP listeners and
the metrics endpoint alike: batches, a pause a pacer asks for (workers that
share sockets), and no busy loop when ``accept()`` fails for want of
descriptors or memory."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any, Protocol

from tornado.ioloop import IOLoop
from tornado.log import gen_log

__all__ = ["ACCEPT_PAUSE", "ACCEPT_LOG_INTERVAL", "Pacer", "accept_on"]


class Pacer(Protocol):
    """What decides whether to take a waiting connection now
    (:class:`bonzo.server.WorkerShare`)."""

    def wait(self) -> float:
        """Seconds to let other processes take it first (``0``: now)."""


#: Seconds a listener stops accepting after ``accept()`` failed for want of
#: resources (descriptors, memory): the waiting connections stay in the
#: kernel's backlog meanwhile, instead of the loop spinning on a socket that
#: stays ready.
ACCEPT_PAUSE = 1.0
#: Seconds between two log lines about such failures on one listener.
ACCEPT_LOG_INTERVAL = 60.0


def accept_on(
    sock: socket.socket,
    callback: Callable[[socket.socket, Any], None],
    batch: int,
    share: Pacer | None = None,
) -> Callable[[], None]:
    """Call ``callback(connection, address)`` for up to ``batch`` waiting
    connections each time the listening socket ``sock`` is ready — after the
    pause ``share`` asks for, if any (:meth:`Pacer.wait`); returns the
    function that stops.

    When ``accept()`` fails for another reason than "nothing waiting" (no
    descriptor left, no memory), accepting stops for :data:`ACCEPT_PAUSE`
    seconds and the failure is logged at most once every
    :data:`ACCEPT_LOG_INTERVAL` seconds, with the number of failures since
    the last line: the socket stays ready, and retrying at once would spin
    the CPU and flood the log while the sessions that hold the descriptors
    get no time to finish."""
    io_loop = IOLoop.current()
    removed = paused = False
    failures = 0
    logged_at = -ACCEPT_LOG_INTERVAL

    def take(count: int) -> None:
        for _ in range(count):
            if removed:
                return  # the socket was closed by an earlier callback
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return  # every waiting connection taken (or another worker's)
            except ConnectionAbortedError:
                continue  # closed by the client while waiting
            except OSError as exc:
                failed(exc)
                return
            callback(connection, address)

    def failed(exc: OSError) -> None:
        nonlocal paused, failures, logged_at
        failures += 1
        now = io_loop.time()
        if now - logged_at >= ACCEPT_LOG_INTERVAL:
            gen_log.error(
                "cannot accept connections on %s: %s%s; not accepting for %g s "
                "(%d failure(s) since the last report); waiting connections stay queued",
                _where(sock),
                exc.strerror or exc,
                _descriptor_hint(exc),
                ACCEPT_PAUSE,
                failures,
            )
            logged_at, failures = now, 0
        if not paused:
            io_loop.remove_handler(sock)
            paused = True
        io_loop.call_later(ACCEPT_PAUSE, resume, batch)

    def ready(fd: Any, events: int) -> None:
        nonlocal paused
        if share is not None:
            wait = share.wait()
            if wait:
                # Let a less busy worker take it (the socket stays ready).
                io_loop.remove_handler(sock)
                paused = True
                io_loop.call_later(wait, resume)
                return
        take(batch)

    def resume(count: int = 1) -> None:
        nonlocal paused
        if removed or not paused:
            return
        paused = False
        io_loop.add_handler(sock, ready, IOLoop.READ)
        take(count)  # what waited, if no other worker took it

    def remove() -> None:
        nonlocal removed
        if not paused:
            io_loop.remove_handler(sock)
        removed = True

    io_loop.add_handler(sock, ready, IOLoop.READ)
    return remove


def _where(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return "a closed socket"
    if isinstance(name, tuple):
        host = name[0]
        return f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
    return str(name) or "a socket"


def _descriptor_hint(exc: OSError) -> str:
    """What to do about a failed ``accept()``, for the log line."""
    if exc.errno == errno.EMFILE:
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
            return ""
        return (
            f" (this process may open {soft} descriptors: lower [limits] max_connections "
            "or raise the limit, e.g. LimitNOFILE= in a systemd unit)"
        )
    if exc.errno == errno.ENFILE:
        return " (the system's table of open files is full)"
    return ""

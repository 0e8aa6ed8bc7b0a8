"""Accepting connections on a listening socket, for the SMTP listeners and
the metrics endpoint alike: batches, a pause a pacer asks for (workers that
share sockets), and no busy loop when ``accept()`` fails for want of
descriptors or memory — a listener that has a refusal to give answers new
clients with it through a descriptor kept in reserve, so that a sending
server tries another MX host at once instead of waiting minutes for a
greeting."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any, Protocol

from tornado.ioloop import IOLoop
from tornado.log import gen_log

from .settings import host_port

__all__ = ["ACCEPT_PAUSE", "ACCEPT_LOG_INTERVAL", "Pacer", "accept_on", "socket_name"]


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

# A descriptor kept open (on /dev/null) for the moment the process has no
# other: closed, it lets accept() take a waiting client to refuse, then it is
# opened again (the "EMFILE trick" of libuv, which closes such clients
# without a word; here they get the listener's refusal).
_reserve: int | None = None


def _keep_reserve() -> None:
    global _reserve
    if _reserve is None:
        try:
            _reserve = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            pass  # out of descriptors already: tried again at the next refusal


def _refuse_waiting(sock: socket.socket, refusal: bytes, count: int) -> int | None:
    """Accept up to ``count`` waiting clients on the reserve descriptor, send
    each ``refusal`` (best effort, never blocking) and close it; the number
    refused, or ``None`` when no client was waiting (``accept()`` fails
    with EMFILE whether one waits or not: then there was nothing to do)."""
    global _reserve
    refused = 0
    for _ in range(count):
        _keep_reserve()
        if _reserve is None:
            break
        os.close(_reserve)
        _reserve = None
        try:
            connection, _ = sock.accept()
        except BlockingIOError:
            if not refused:
                _keep_reserve()
                return None
            break  # every waiting client answered (or another worker's)
        except OSError:
            break  # still no room
        try:
            connection.setblocking(False)
            connection.send(refusal)
        except OSError:
            pass
        finally:
            connection.close()
        refused += 1
    _keep_reserve()
    return refused


def accept_on(
    sock: socket.socket,
    callback: Callable[[socket.socket, Any], None],
    batch: int,
    share: Pacer | None = None,
    *,
    refusal: bytes | None = None,
    on_refused: Callable[[int], None] | None = None,
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
    get no time to finish. With ``refusal`` (a whole reply, such as
    ``b"421 4.3.2 ...\\r\\n"``), a listener out of descriptors (EMFILE,
    ENFILE) answers the waiting clients with it instead, through a
    descriptor kept in reserve, and closes them; ``on_refused(n)`` is told
    how many. It pauses only when even that fails."""
    io_loop = IOLoop.current()
    removed = paused = False
    failures = refusals = 0
    logged_at = -ACCEPT_LOG_INTERVAL
    if refusal is not None:
        _keep_reserve()

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
        nonlocal paused, failures, refusals, logged_at
        refused = 0
        if refusal is not None and exc.errno in (errno.EMFILE, errno.ENFILE):
            answered = _refuse_waiting(sock, refusal, batch)
            if answered is None:
                # The accept that filled the table came first, and no client
                # waits: no failure, no pause (the socket is not ready).
                return
            refused = answered
            refusals += refused
            if refused and on_refused is not None:
                on_refused(refused)
        failures += 1
        now = io_loop.time()
        if now - logged_at >= ACCEPT_LOG_INTERVAL:
            if refused and refusal is not None:
                doing = (
                    f"new clients are answered {refusal.decode('ascii', 'replace').strip()!r} "
                    "and closed"
                )
            else:
                doing = f"not accepting for {ACCEPT_PAUSE:g} s; waiting connections stay queued"
            gen_log.error(
                "cannot accept connections on %s: %s%s; %s "
                "(%d failure(s), %d client(s) refused since the last report)",
                socket_name(sock),
                exc.strerror or exc,
                _descriptor_hint(exc),
                doing,
                failures,
                refusals,
            )
            logged_at, failures, refusals = now, 0, 0
        if refused:
            return  # the next waiting clients are refused as they come
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


def socket_name(sock: socket.socket) -> str:
    """``address:port`` of a listening socket (``[::1]:2525`` for IPv6), or
    ``unix:path``, as the logs name a listener."""
    try:
        name = sock.getsockname()
    except OSError:
        return "a closed socket"
    if isinstance(name, str):
        return f"unix:{name}"
    return host_port(name[0], name[1])


def _descriptor_hint(exc: OSError) -> str:
    """What to do about a failed ``accept()``, for the log line."""
    if exc.errno == errno.EMFILE:
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
            return ""
        return (
            f" (this process may open {soft} descriptors, for its SMTP sessions and their "
            "spool files and outbound, Redis and metrics connections: raise the limit, e.g. "
            "LimitNOFILE= in a systemd unit, or lower [limits] max_connections)"
        )
    if exc.errno == errno.ENFILE:
        return " (the system's table of open files is full)"
    return ""

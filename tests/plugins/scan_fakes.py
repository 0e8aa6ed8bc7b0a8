"""Scripted daemons for the scanner plugins' protocol tests: a TCP server on
127.0.0.1 (or a Unix socket) in a thread, each connection handed to a
blocking ``handler(conn)``; what each connection sent is kept for the test.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

from ports import free_port as free_port  # re-exported for the tests

TIMEOUT = 10.0


class FakeDaemon:
    """``with FakeDaemon(handler) as fake:`` listens on ``fake.port`` (or
    ``fake.path`` with ``unix=PATH``) and runs ``handler(conn)`` for each
    connection in its own thread; the connection is closed afterwards."""

    def __init__(self, handler: Callable[[socket.socket], Any], unix: str | None = None):
        self.handler = handler
        self.path = unix
        if unix is not None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(unix)
        else:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1] if unix is None else 0
        self.connections = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> FakeDaemon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        for thread in self._threads:
            thread.join(TIMEOUT)
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        try:
            self.handler(conn)
        except OSError:
            pass
        except BaseException as exc:  # pragma: no cover - shown by the test
            self.errors.append(exc)
        finally:
            conn.close()


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        piece = conn.recv(n - len(data))
        if not piece:
            raise ConnectionError("closed")
        data += piece
    return data


def recv_until(conn: socket.socket, marker: bytes, limit: int = 1 << 24) -> bytes:
    data = b""
    while marker not in data:
        piece = conn.recv(65536)
        if not piece:
            break
        data += piece
        assert len(data) <= limit
    return data


def results_of(envelope: Any, plugin: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``(result, reason, details)`` of each result ``plugin`` recorded."""
    return [(r.result, r.reason, dict(r.details)) for r in envelope.results.all(plugin)]

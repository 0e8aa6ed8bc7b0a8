"""A private ``redis-server`` (Debian's package) for the tests.

Each :class:`RedisServer` runs in the foreground as the test's child, on a
free port of 127.0.0.1, with no persistence (``--save ''``, no append-only
file) and its working directory in a temporary directory; :meth:`stop` (or
:meth:`kill`, ``SIGKILL``) ends it. Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from .peers import DEADLINE, HOST, PORT_ATTEMPTS, free_port


def redis_binary() -> str | None:
    """The ``redis-server`` program, or ``None`` when it is not installed."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


def ping(port: int, password: str = "", tls: ssl.SSLContext | None = None) -> bool:
    """True if a Redis server answers ``PING`` on ``port`` (a raw RESP exchange,
    so that the check does not depend on the client under test; over TLS
    with ``tls``)."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as raw:
            if tls is None:
                return _ping(raw, password)
            with tls.wrap_socket(raw, server_hostname=HOST) as s:
                return _ping(s, password)
    except OSError:
        return False


def _ping(s: socket.socket, password: str) -> bool:
    if password:
        s.sendall(f"AUTH {password}\r\n".encode())
        if not s.recv(64).startswith(b"+OK"):
            return False
    s.sendall(b"PING\r\n")
    return s.recv(64).startswith(b"+PONG")


class RedisServer:
    """One private ``redis-server``; ``url`` is where it answers."""

    def __init__(
        self,
        workdir: Path,
        password: str = "",
        port: int | None = None,
        tls: tuple[Path, Path, ssl.SSLContext] | None = None,
    ) -> None:
        self.workdir = workdir
        self.password = password
        #: (certificate and key file, CA file, a client context trusting
        #: it): then the port speaks TLS only.
        self.tls = tls
        self.port = port or free_port()
        # A port the caller did not ask for may be replaced when another
        # process (a test server of a parallel run) took it first.
        self._own_port = port is None
        self.log_path = workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                return self._start()
            except AssertionError:
                taken = "Address already in use" in self.log()
                if not (taken and self._own_port and attempt < PORT_ATTEMPTS):
                    raise
                self.port = free_port()
                self.log_path = self.workdir / f"redis-{self.port}.log"
        raise AssertionError("unreachable")  # pragma: no cover

    def _start(self) -> RedisServer:
        binary = redis_binary()
        assert binary is not None, "redis-server is not installed"
        argv = [binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly",
                "no", "--daemonize", "no", "--dir", str(self.workdir), "--logfile",
                str(self.log_path)]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls is not None:
            chain, ca, _ = self.tls
            argv[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            argv += ["--tls-cert-file", str(chain), "--tls-key-file", str(chain),
                     "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + DEADLINE
        while not ping(self.port, self.password, self.tls[2] if self.tls else None):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"redis-server did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop it (``SIGTERM``, then ``SIGKILL`` if it lingers)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """End it at once, as a crash would."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait(timeout=DEADLINE)

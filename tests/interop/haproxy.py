"""A private HAProxy for the tests: ``haproxy -f CONF -db`` in a temporary
directory, TCP frontends on 127.0.0.1 (and ::1) relaying to Bonzo with the
PROXY protocol, started and stopped by the test (never a system service).

HAProxy's own facts used here (its configuration manual, 2.6): ``mode tcp``;
on a ``server`` line ``send-proxy`` (version 1), ``send-proxy-v2`` (version
2), ``proxy-v2-options`` (which TLVs to add) and ``source`` (the address
HAProxy connects from); ``unique-id-format`` on the frontend; ``bind ... ssl
crt FILE alpn ...`` to terminate TLS; ``check`` with ``check-send-proxy`` for
health checks that send the header; ``-db`` keeps it in the foreground.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ports import free_port

DEADLINE = 15.0


def haproxy_binary() -> str | None:
    """The ``haproxy`` program, or ``None`` when it is not installed."""
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None
    )


def ipv6_loopback() -> bool:
    """True when ``::1`` can be listened on and connected to here."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            s.listen(1)
            with socket.create_connection(("::1", s.getsockname()[1]), timeout=2):
                pass
    except OSError:
        return False
    return True


@dataclass
class Frontend:
    """One ``frontend``/``backend`` pair: clients connect to ``bind``,
    HAProxy connects to Bonzo at ``backend`` with ``server_options``."""

    name: str
    backend: tuple[str, int] | str
    """Bonzo's address and port, or the path of its Unix socket."""
    server_options: str = "send-proxy"
    bind_host: str = "127.0.0.1"
    bind_options: str = ""
    frontend_lines: list[str] = field(default_factory=list)
    port: int = 0
    bind_path: str = ""
    """Clients connect to this Unix socket instead of a port."""

    def lines(self) -> list[str]:
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        bind = f"{self.bind_path} mode 666" if self.bind_path else f"{host}:{self.port}"
        backend = self.backend
        target = backend if isinstance(backend, str) else f"{backend[0]}:{backend[1]}"
        return [
            f"frontend fe_{self.name}",
            f"    bind {bind} {self.bind_options}".rstrip(),
            *(f"    {line}" for line in self.frontend_lines),
            f"    default_backend be_{self.name}",
            f"backend be_{self.name}",
            f"    server bonzo {target} {self.server_options}",
        ]


class HAProxy:
    """A running private HAProxy; :attr:`ports` by frontend name."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, ports: dict[str, int]) -> None:
        self.proc = proc
        self.log_path = log
        self.ports = ports

    @property
    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGUSR1: stop listening and leave once the connections are done;
            # then make sure it is gone.
            self.proc.send_signal(signal.SIGUSR1)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=DEADLINE)


#: Accepts and closes: tells the test that HAProxy listens, without making
#: a connection to Bonzo.
READY_FRONTEND = (
    "frontend ready",
    "    bind 127.0.0.1:{port}",
    "    tcp-request connection reject",
)


def config_text(frontends: list[Frontend], ready_port: int) -> str:
    lines = [
        "global",
        "    nbthread 1",
        "    maxconn 200",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 30s",
        "    timeout server 30s",
        *(line.format(port=ready_port) for line in READY_FRONTEND),
    ]
    for frontend in frontends:
        lines += frontend.lines()
    return "\n".join(lines) + "\n"


@contextmanager
def running_haproxy(
    workdir: Path, frontends: list[Frontend] | None = None, text: str | None = None
) -> Iterator[HAProxy]:
    """Start HAProxy with ``frontends`` (free ports chosen for each), or with
    the configuration ``text``; wait until it listens, and stop it at the
    end whatever happens."""
    binary = haproxy_binary()
    assert binary is not None, "haproxy is not installed (.ci/run installs it)"
    frontends = frontends or []
    for frontend in frontends:
        if not frontend.bind_path:
            frontend.port = free_port(frontend.bind_host)
    ready = free_port()
    config = workdir / "haproxy.cfg"
    if text is None:
        config.write_text(config_text(frontends, ready))
    else:
        config.write_text(text + "\n" + "\n".join(READY_FRONTEND).format(port=ready) + "\n")
    check = subprocess.run(
        [binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=DEADLINE
    )
    assert check.returncode == 0, f"bad HAProxy configuration:\n{check.stdout}{check.stderr}"
    log = workdir / "haproxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, "-f", str(config), "-db"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            start_new_session=True,
        )
    haproxy = HAProxy(proc, log, {f.name: f.port for f in frontends})
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"haproxy exited with {proc.returncode}:\n{haproxy.log}")
            try:
                socket.create_connection(("127.0.0.1", ready), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"haproxy did not listen:\n{haproxy.log}") from None
                time.sleep(0.05)
        yield haproxy
    finally:
        haproxy.stop()

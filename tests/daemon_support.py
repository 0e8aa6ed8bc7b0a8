"""Helpers for the tests that run the real daemon: ``python -m bonzo serve``
in a subprocess of its own process group (killed at the end whatever
happens), on 127.0.0.1 only, with every wait bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ports import free_port as free_port  # re-exported for the tests

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 20.0


def wait_until(
    predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def daemon_env() -> dict[str, str]:
    """The environment of the subprocesses: this checkout's bonzo first."""
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), environ.get("PYTHONPATH", "")) if p
    )
    environ["PYTHONUNBUFFERED"] = "1"
    return environ


class Daemon:
    """One ``python -m bonzo serve`` process and its log (and, for the tests'
    Store plugin, the directory it writes its records to)."""

    def __init__(
        self, proc: subprocess.Popen[bytes], log: Path, port: int, out: Path | None = None
    ) -> None:
        self.proc = proc
        self.log_path = log
        self.port = port
        self.out = out

    @property
    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_ready(self, workers: int = 1) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"bonzo exited with {self.proc.returncode}:\n{self.log}")
            return self.log.count("ready (pid") >= workers

        wait_until(ready, what="the daemon to be ready")
        # And it answers: a greeting within the deadline.
        with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE) as s:
            assert s.recv(512).startswith(b"220 ")
            s.sendall(b"QUIT\r\n")

    def stop(self, timeout: float = DEADLINE) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=DEADLINE)

    def records(self) -> list[dict[str, Any]]:
        assert self.out is not None
        return [json.loads(p.read_text()) for p in sorted(self.out.glob("*.json"))]


@contextmanager
def daemons(
    workdir: Path, env: dict[str, str], out: Path | None = None
) -> Iterator[Callable[..., Daemon]]:
    """``start(config, port, prelude="")`` runs ``bonzo serve -c config``
    (``prelude``: Python code run first, in its process); whatever is left
    running at the end, workers included, is killed."""
    started: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []

    def start(config: Path, port: int, prelude: str = "") -> Daemon:
        log = workdir / f"daemon-{len(started)}.log"
        handle = open(log, "wb")  # noqa: SIM115 - closed at the end
        logs.append(handle)
        argv = [sys.executable, "-m", "bonzo", "serve", "-c", str(config)]
        if prelude:
            serve = f"sys.exit(bonzo.cli.main(['serve', '-c', {str(config)!r}]))"
            argv = [sys.executable, "-c", f"import sys, bonzo.cli\n{prelude}\n{serve}"]
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: workers included
        )
        started.append(proc)
        return Daemon(proc, log, port, out)

    try:
        yield start
    finally:
        for proc in started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=DEADLINE)
        for handle in logs:
            handle.close()

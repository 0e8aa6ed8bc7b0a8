"""Real milters run privately by the tests: a foreground daemon with its own
configuration in a temporary directory, listening on 127.0.0.1, started by
a test and stopped after it (never a system service)."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bonzo import Accept, hookimpl

from .peers import HOST, wait_until


class Daemon:
    """``argv`` run in the foreground, its output in ``log``; ready once
    ``port`` on 127.0.0.1 accepts connections."""

    def __init__(self, name: str, argv: Sequence[str], port: int, log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Daemon:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.diagnosis()}")
            with socket.socket() as s:
                s.settimeout(0.2)
                return s.connect_ex((HOST, self.port)) == 0

        wait_until(listening, timeout, f"{self.name} to listen")
        return self

    def diagnosis(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a stuck daemon
            process.kill()
            process.wait(5)


class Keep:
    """Owns every recipient and keeps each message as it would be delivered."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    @hookimpl
    def bonzo_rcpt(self) -> Accept:
        return Accept()

    @hookimpl
    def bonzo_deliver(self, envelope: Any) -> Accept:
        self.messages.append(envelope.content)
        return Accept()


def through_bonzo(
    start_server: Any,
    name: str,
    port: int,
    *messages: bytes,
    after: Sequence[tuple[Any, str]] = (),
    **options: Any,
) -> list[bytes | tuple[int, bytes]]:
    """Send each message through a Bonzo server whose ``milter`` plugin asks
    the milter on ``port`` (then the ``(plugin, name)`` pairs of ``after``);
    return, per message, what was delivered or the ``(code, text)`` it was
    refused with."""
    import smtplib

    from bonzo_plugins.milter import MilterPlugin

    from bonzo.hooks import PluginSet

    plugin = MilterPlugin()
    entry = {"name": name, "socket": f"inet:{port}@{HOST}", **options}
    plugin.bonzo_configure(config={"milters": [entry]}, app=None)
    keep = Keep()
    plugins = PluginSet(timeout=60.0)
    plugins.register(plugin, "milter")
    for other, other_name in after:
        plugins.register(other, other_name)
    plugins.register(keep, "keep")
    server = start_server(plugins=plugins)
    outcomes: list[bytes | tuple[int, bytes]] = []
    with smtplib.SMTP(HOST, server.port, local_hostname="client.test", timeout=60) as client:
        for message in messages:
            before = len(keep.messages)
            try:
                assert client.sendmail("alice@example.org", ["bob@example.net"], message) == {}
            except smtplib.SMTPDataError as exc:
                outcomes.append((exc.smtp_code, exc.smtp_error))
                continue
            assert len(keep.messages) == before + 1
            outcomes.append(keep.messages[-1])
    return outcomes

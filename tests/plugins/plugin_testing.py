"""Helpers for the bundled plugins' tests (imported by the test modules).

:func:`serve` starts a real :class:`~bonzo.server.SMTPServer` with the given
plugins on 127.0.0.1 in a background thread with its own event loop, so
tests talk to it with the blocking :mod:`smtplib`.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tornado.netutil import bind_sockets

from bonzo import testing
from bonzo.hooks import PluginSet
from bonzo.server import SMTPServer
from bonzo.session import Envelope, Session
from bonzo.settings import ListenerSettings, SMTPSettings

TIMEOUT = 10.0


@dataclass
class RunningServer:
    port: int
    loop: asyncio.AbstractEventLoop
    server: SMTPServer

    def client(self, helo: str = "client.example") -> smtplib.SMTP:
        """A connected smtplib client (caller closes it)."""
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname=helo, timeout=TIMEOUT)


def make_plugin_set(*plugins: tuple[str, object]) -> PluginSet:
    plugin_set = PluginSet(timeout=TIMEOUT)
    for name, plugin in plugins:
        plugin_set.register(plugin, name)
    return plugin_set


@contextlib.contextmanager
def serve(
    *plugins: tuple[str, object], listener: ListenerSettings | None = None, **settings: Any
) -> Iterator[RunningServer]:
    """Run a server with ``plugins`` (``(name, object)`` pairs, in order),
    ``settings`` and the listener's policy ``listener``."""
    plugin_set = make_plugin_set(*plugins)
    settings.setdefault("hostname", "mx.test")
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Any] = {}

    async def start() -> None:
        sockets = bind_sockets(0, "127.0.0.1")
        server = SMTPServer(
            plugins=plugin_set, settings=SMTPSettings(**settings), listener=listener
        )
        server.add_sockets(sockets)
        box["server"] = server
        box["port"] = sockets[0].getsockname()[1]

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # pragma: no cover - reported below
            box["error"] = exc
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="bonzo-test-server", daemon=True)
    thread.start()
    assert started.wait(TIMEOUT), "server did not start"
    if "error" in box:  # pragma: no cover
        raise box["error"]
    try:
        yield RunningServer(box["port"], loop, box["server"])
    finally:

        async def stop() -> None:
            await box["server"].shutdown(grace=2.0)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "server thread did not stop"
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def make_session(
    remote_ip: str = "192.0.2.10", helo: str | None = "client.example", auth: str | None = None
) -> Session:
    return testing.make_session(remote_ip, helo=helo, auth=auth)


def make_envelope(
    body: bytes = b"Subject: test\r\n\r\nHello\r\n",
    mail_from: str = "sender@example.net",
    rcpt_tos: list[str] | None = None,
    spool_threshold: int = 262144,
) -> Envelope:
    envelope = Envelope(mail_from, spool_threshold=spool_threshold)
    envelope.rcpt_tos.extend(rcpt_tos if rcpt_tos is not None else ["user@example.com"])
    envelope.write(body)
    return envelope

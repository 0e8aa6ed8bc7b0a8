"""Every program in examples/ runs and does what the docs say it does.

Each example is loaded with :func:`runpy.run_path` (so its ``__main__`` block,
which would listen on port 2525, does not run), then served on an unused
port of 127.0.0.1 and spoken to with :mod:`smtplib`.
"""

from __future__ import annotations

import asyncio
import runpy
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tornado.testing import bind_unused_port

from bonzo.server import SMTPServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

MESSAGE = b"From: alice@example.com\r\nSubject: Hello\r\n\r\nHello, world\r\n"


def load(name: str) -> dict[str, Any]:
    return runpy.run_path(str(EXAMPLES / name), run_name="bonzo_example")


def serve(server: SMTPServer, client: Callable[[int], Any]) -> Any:
    """Serve ``server`` on an unused port while ``client(port)`` runs in a thread."""

    async def main() -> Any:
        sock, port = bind_unused_port()
        server.add_sockets([sock])
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, client, port)
        finally:
            server.stop()
            for connection in list(server.connections):
                connection.close()
            await asyncio.sleep(0.01)

    return asyncio.run(main())


def test_hello(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = load("hello.py")

    def client(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            assert smtp.sendmail("alice@example.com", ["bob@example.org"], MESSAGE) == {}

    serve(SMTPServer(namespace["application"]), client)
    out = capsys.readouterr().out
    assert "Subject: Hello" in out
    assert "Hello, world" in out
    assert "Received:" not in out  # the trace header is not part of request.data


def test_callback(capsys: pytest.CaptureFixture[str]) -> None:
    namespace = load("callback.py")

    def client(port: int) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("alice@example.com", ["bob@example.org"], MESSAGE)
            return smtp.noop()

    assert serve(SMTPServer(namespace["handle_request"]), client)[0] == 250
    out = capsys.readouterr().out
    assert out == "127.0.0.1: from <alice@example.com> to ['bob@example.org']: Hello\n"


def test_store(tmp_path: Path) -> None:
    namespace = load("store.py")

    def client(port: int) -> dict[str, Any]:
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.ehlo("client.example.com")
            smtp.mail("alice@example.com")
            relay = smtp.rcpt("someone@elsewhere.example")
            local = smtp.rcpt("bob@example.org")
            postmaster = smtp.rcpt("<Postmaster>")
            smtp.data(MESSAGE)  # raises unless 250
            return {"relay": relay, "local": local, "postmaster": postmaster}

    replies = serve(namespace["make_server"](str(tmp_path)), client)
    assert replies["relay"] == (554, b"5.7.1 Relay access denied")
    assert replies["local"][0] == 250
    assert replies["postmaster"][0] == 250
    [stored] = tmp_path.iterdir()
    assert stored.suffix == ".eml"
    content = stored.read_bytes()
    assert content.startswith(b"Received: from client.example.com ([127.0.0.1])")
    assert content.endswith(MESSAGE)

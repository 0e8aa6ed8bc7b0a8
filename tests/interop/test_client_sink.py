"""bonzo.client against Postfix's ``smtp-sink`` (SMTP and LMTP): volume
over reused connections, and the sink's options for 4xx/5xx replies, a
421, a dropped connection, a reply before the end of the data and a server
without 8BITMIME."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bonzo.client import ClientSettings, DeliveryResult, Recipient, connect, deliver

from .peers import unavailable

SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
HOST = "127.0.0.1"

pytestmark = pytest.mark.timeout(120)

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: sink\r\n\r\nHello.\r\n"


class Sink:
    """One smtp-sink process on an unused port of 127.0.0.1."""

    def __init__(self, *options: str) -> None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = int(s.getsockname()[1])
        argv = [SINK, "-u", "nobody", *options, f"{HOST}:{self.port}", "256"]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"smtp-sink exited: {self.process.stdout.read()!r}")  # type: ignore[union-attr]
            try:
                with socket.create_connection((HOST, self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def sink() -> Iterator[Callable[..., Sink]]:
    if not shutil.which(SINK):
        unavailable("Postfix's smtp-sink is not installed (.ci/run installs Postfix)")
    started: list[Sink] = []

    def start(*options: str) -> Sink:
        started.append(Sink(*options))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def settings(**changes: Any) -> ClientSettings:
    return ClientSettings(helo_name="relay.test", **changes)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 90))


def outcomes(result: DeliveryResult) -> list[tuple[str, str, int, str]]:
    return [(r.status.value, r.stage.value, r.code, r.enhanced_code) for r in result.recipients]


@pytest.fixture
def dumps() -> Iterator[Path]:
    """A directory smtp-sink (running as nobody) can dump transactions to."""
    path = Path(tempfile.mkdtemp(prefix="sink", dir="/tmp"))
    try:
        os.chmod(path, 0o777)
        yield path
    finally:
        shutil.rmtree(path)


def dumped(path: Path) -> list[bytes]:
    return [p.read_bytes() for p in path.rglob("*") if p.is_file()]


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_200_messages_over_reused_connections(sink, dumps, protocol):
    # -d: one file per transaction, the proof that each arrived.
    server = sink("-d", f"{dumps}/%M.", *(["-L"] if protocol == "lmtp" else []))

    async def worker(n: int) -> list[DeliveryResult]:
        results = []
        async with await connect(HOST, server.port, protocol=protocol, settings=settings()) as conn:
            for i in range(50):
                body = MESSAGE + f"worker {n} message {i}\r\n".encode()
                rcpts = [f"r{j}@example.net" for j in range(3)]
                results.append(await conn.send("a@example.org", rcpts, body))
            assert conn.usable
        return results

    async def main() -> list[DeliveryResult]:
        groups = await asyncio.gather(*(worker(n) for n in range(4)))
        return [r for group in groups for r in group]

    results = run(main())
    assert len(results) == 200
    assert all(len(r.delivered) == 3 for r in results)
    files = dumped(dumps)
    assert len(files) == 200
    assert sum(f.count(b"\nX-Rcpt-Args: <r") for f in files) == 600
    assert b"\n\nHello.\nworker 3 message 49\n" in b"".join(files)


@pytest.mark.parametrize(
    "options, expected",
    [
        (["-r", "rcpt"], [("deferred", "rcpt", 450, "4.3.0")] * 2),
        (["-f", "rcpt"], [("refused", "rcpt", 500, "5.3.0")] * 2),
        (["-r", "mail"], [("deferred", "mail", 450, "4.3.0")] * 2),
        (["-f", "."], [("refused", "end", 500, "5.3.0")] * 2),
        (["-r", "."], [("deferred", "end", 450, "4.3.0")] * 2),
        (["-f", "data"], [("refused", "data", 500, "5.3.0")] * 2),
        (["-Q", "mail"], [("deferred", "mail", 421, "4.0.0")] * 2),
        (["-q", "rcpt"], [("deferred", "rcpt", 451, "4.4.2")] * 2),
    ],
)
def test_sink_replies_become_results(sink, options, expected):
    server = sink(*options)
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@example.org",
            recipients=["b@example.net", "c@example.net"],
            message=MESSAGE,
            settings=settings(),
        )
    )
    assert outcomes(result) == expected


@pytest.mark.parametrize("delay, size", [("0", 0), ("0", 20_000_000), ("1", 20_000_000)])
def test_a_reply_before_the_end_of_the_data(sink, delay, size):
    # -A: 550 after the 354 (at once, or a second later), then the sink
    # closes without reading the rest: never "delivered", never reused.
    server = sink("-A", delay)

    async def main() -> tuple[DeliveryResult, bool]:
        conn = await connect(HOST, server.port, settings=settings())
        body = MESSAGE + b"x" * size + b"\r\n"
        result = await conn.send("a@example.org", ["b@example.net"], body)
        # A reply that came after the whole message was written looks like
        # the answer to it; the sink's close that follows is seen soon after.
        for _ in range(50):
            if not conn.usable:
                break
            await asyncio.sleep(0.02)
        return result, conn.usable

    result, usable = run(main())
    assert outcomes(result) in (
        [("refused", "end", 550, "")],  # the reply, read before the end
        # or lost: the connection closed under our writes
        [("deferred", "data", 451, "4.4.2")],
        [("deferred", "end", 451, "4.4.2")],
    )
    assert not usable


def test_without_8bitmime_8bit_content_is_refused(sink):
    server = sink("-8")
    body = "Subject: x\r\n\r\ncafé\r\n".encode()
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@example.org",
            recipients=["b@example.net"],
            message=body,
            settings=settings(),
        )
    )
    assert outcomes(result) == [("refused", "mail", 554, "5.6.3")]
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@example.org",
            recipients=["b@example.net"],
            message=MESSAGE,
            settings=settings(),
        )
    )
    assert outcomes(result) == [("delivered", "end", 250, "2.0.0")]


def test_dsn_is_passed_to_the_sink(sink, dumps):
    server = sink("-d", f"{dumps}/%M.")
    rcpt = Recipient("b@example.net", notify="FAILURE,DELAY", orcpt="rfc822;b@example.net")
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@example.org",
            recipients=[rcpt],
            message=MESSAGE,
            settings=settings(),
            ret="HDRS",
            envid="ID1",
        )
    )
    assert result.dsn
    assert result.recipients[0].delivered
    (dump,) = dumped(dumps)
    # The sink's dump: the envelope as X- headers, then the message (LF ends).
    assert b"X-Mail-Args: <a@example.org> RET=HDRS ENVID=ID1\n" in dump
    assert b"X-Rcpt-Args: <b@example.net> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@example.net\n" in dump
    assert MESSAGE.replace(b"\r\n", b"\n") in dump

"""The queue plugin delivering to real downstreams: a private Postfix (one
recipient accepted, one tempfailed, one refused at RCPT through an access
map) by the ``smarthost`` route, and Dovecot's LMTP server (stored bytes,
an over-quota user deferred after DATA, an unknown user bounced) by the
``lmtp`` route, over TCP and its Unix socket."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import pytest
from bonzo_plugins.queue.routes import Outcome, RouteTable
from bonzo_plugins.queue.runner import Runner, RunnerSettings
from bonzo_plugins.queue.spool import GroupSync, Spool

from .dovecot import HOST, Dovecot
from .peers import wait_until

pytestmark = pytest.mark.timeout(120)

SENDER = "alice@example.org"


class App:
    def __init__(self, base: Path) -> None:
        self.base_dir = base
        self.dns = None

        class _Settings:
            hostname = "relay.test"

        self.settings = _Settings()


def runner_for(tmp_path: Path, route: dict[str, Any]) -> tuple[Spool, Runner]:
    spool = Spool(tmp_path / "q")
    spool.setup()
    routes = RouteTable({"*": route}, {}, App(tmp_path))
    routes.start()
    runner = Runner(
        spool, GroupSync(spool.data), routes, None, RunnerSettings(hostname="relay.test")
    )
    return spool, runner


def queue(spool: Spool, id: str, body: bytes, *rcpts: str, **mail_params: str | None) -> None:
    recipients = [
        {"address": r, "canonical": r, "domain": r.partition("@")[2], "params": {}} for r in rcpts
    ]
    envelope = {
        "arrival": time.time(),
        "sender": SENDER,
        "recipients": recipients,
        "mail_params": mail_params,
    }
    spool.write(id, envelope, b"", io.BytesIO(body))


async def attempt(runner: Runner, id: str) -> None:
    await runner.attempt(id)
    await runner.routes.close()


def message(subject: str, lines: int = 3) -> bytes:
    head = f"From: {SENDER}\r\nTo: users@example.net\r\nSubject: {subject}\r\n\r\n"
    return head.encode() + b"A line of text that fills the message up.\r\n" * lines + b".dot\r\n"


def test_smarthost_to_postfix(tmp_path, postfix):
    downstream = postfix(
        accept_domains=["mx.test"],
        recipient_access={"busy@mx.test": "450 4.2.1 Busy", "gone@mx.test": "550 5.1.1 Gone"},
    )
    spool, runner = runner_for(
        tmp_path, {"type": "smarthost", "host": "127.0.0.1", "port": downstream.port}
    )
    queue(spool, "P1", message("to postfix"), "ok@mx.test", "busy@mx.test", "gone@mx.test")
    asyncio.run(attempt(runner, "P1"))
    states = {r.address: (r.status, r.reply) for r in spool.load("P1").recipients}
    assert states["ok@mx.test"][0] == "delivered"
    assert states["busy@mx.test"] == (
        "deferred",
        "450 4.2.1 <busy@mx.test>: Recipient address rejected: Busy",
    )
    assert states["gone@mx.test"][0] == "bounced"
    # Postfix took the message for ok@mx.test (and discarded it, as configured).
    assert wait_until(
        lambda: [d for d in downstream.deliveries() if d.recipient == "ok@mx.test"],
        what="Postfix's delivery of ok@mx.test",
    )
    [report] = [m for m in spool.iter_messages() if m.sender == ""]
    text = report.read()
    assert b"Final-Recipient: rfc822; gone@mx.test" in text
    assert b"Diagnostic-Code: smtp; 550 5.1.1 <gone@mx.test>: Recipient address rejected: Gone" in (
        text
    )


def test_smarthost_to_exim_past_its_recipients_max(tmp_path, exim):
    """Exim answers the recipients over its ``recipients_max`` with a bare
    ``452 too many recipients`` (no enhanced code): RFC 5321 4.5.3.1.10's
    reply for it, so the rest go in a new transaction at once rather than
    after a back-off each batch."""
    downstream = exim(accept_domains=["down.test"], main=["recipients_max = 2"])
    spool, runner = runner_for(
        tmp_path, {"type": "smarthost", "host": "127.0.0.1", "port": downstream.port}
    )
    rcpts = [f"k{i}@down.test" for i in range(5)]
    queue(spool, "E1", message("to exim"), *rcpts)

    async def main() -> None:
        await runner.attempt("E1")
        recipients = spool.load("E1").recipients
        assert [r.status for r in recipients] == ["delivered"] * 2 + ["deferred"] * 3
        assert [r.reply for r in recipients[2:]] == ["452 too many recipients"] * 3
        assert all(r.next_attempt <= time.time() for r in recipients[2:])  # no back-off
        await runner.attempt("E1")  # k2, k3
        await runner.attempt("E1")  # k4: done, removed
        await runner.routes.close()

    asyncio.run(main())
    assert spool.ids() == []
    wait_until(
        lambda: len([d for d in downstream.deliveries() if d.status == "sent"]) == 5,
        what="Exim's deliveries",
    )
    sent = sorted(d.recipient for d in downstream.deliveries() if d.status == "sent")
    assert sent == rcpts  # each once


def stored(dovecot: Dovecot, user: str, subject: str) -> list[bytes]:
    return [m for m in dovecot.messages(user) if f"Subject: {subject}\r\n".encode() in m]


@pytest.mark.parametrize("over", ["inet", "unix"])
def test_lmtp_route_to_dovecot(tmp_path, dovecot, over):
    route: dict[str, Any] = {"type": "lmtp"}
    if over == "inet":
        route.update(host=HOST, port=dovecot.port)
    else:
        route["path"] = dovecot.socket_path
    spool, runner = runner_for(tmp_path, route)
    subject = f"queued over {over}"
    body = message(subject, lines=60)  # more than bob's 1 KB quota
    queue(spool, "V1", body, "alice@example.net", "bob@example.net", "nobody@example.net")
    asyncio.run(attempt(runner, "V1"))
    states = {r.address: (r.status, r.reply) for r in spool.load("V1").recipients}
    assert states["alice@example.net"][0] == "delivered"
    status, reply = states["bob@example.net"]
    assert status == "deferred" and reply.startswith("452 4.2.2"), reply  # over quota
    assert states["nobody@example.net"][0] == "bounced"
    [copy] = stored(dovecot, "alice", subject)
    assert copy.endswith(body)  # Dovecot adds its trace headers in front
    assert stored(dovecot, "bob", subject) == []


class Slow:
    """A destination that takes its time (a far server): delivers once
    :attr:`release` is set."""

    kind = "slow"
    final = False

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[list[str]] = []

    def destination(self, recipient: Any) -> str:
        return "slow.test"

    async def deliver(self, message: Any, recipients: Any) -> list[Outcome]:
        self.calls.append([r.address for r in recipients])
        await self.release.wait()
        return [Outcome("delivered", 250, "2.0.0", "Ok", "slow.test") for _ in recipients]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("how", ["stop", "crash"])
def test_dovecot_gets_one_copy_when_another_destination_is_cut_off(tmp_path, dovecot, how):
    """Dovecot stores alice's copy at once; the other destination is slow.
    A stop that cancels the slow delivery after its grace, or a crash (the
    process gone with the slow delivery in flight), then a new start:
    alice still has one copy, and only the slow destination is tried again."""
    route = {"type": "lmtp", "path": dovecot.socket_path}
    spool, runner = runner_for(tmp_path, route)
    slow = Slow()
    runner.routes.exact["slow.test"] = slow
    subject = f"one copy after a {how}"
    queue(spool, "K1", message(subject), "alice@example.net", "far@slow.test")
    state = spool.state / "K1.json"
    left: list[bytes] = []

    async def interrupted() -> None:
        runner.start()
        await asyncio.to_thread(
            wait_until, lambda: stored(dovecot, "alice", subject) and slow.calls, 10
        )
        # Saved as soon as Dovecot answered, the slow delivery in flight.
        await asyncio.to_thread(wait_until, state.exists, 10)
        left.append(state.read_bytes())  # what a kill -9 now leaves
        await runner.stop(grace=0.2)

    asyncio.run(interrupted())
    if how == "crash":
        state.write_bytes(left[0])
    status = {r.address: r.status for r in spool.load("K1").recipients}
    assert status == {"alice@example.net": "delivered", "far@slow.test": "pending"}
    spool, runner = runner_for(tmp_path, route)
    slow.release = asyncio.Event()  # (the first one belongs to the first loop)
    slow.release.set()
    runner.routes.exact["slow.test"] = slow
    asyncio.run(attempt(runner, "K1"))
    assert spool.ids() == []
    assert len(stored(dovecot, "alice", subject)) == 1
    assert slow.calls == [["far@slow.test"], ["far@slow.test"]]


def test_declared_8bitmime_and_smtputf8_a_message_does_not_need_are_dropped(tmp_path):
    # smtp-sink -8 offers neither 8BITMIME nor SMTPUTF8. 7-bit mail that was
    # declared BODY=8BITMIME and SMTPUTF8 is delivered, not bounced; 8-bit
    # content is still refused (5.6.3: there is no conversion).
    import shutil

    from .test_client_sink import SINK, Sink

    if not shutil.which(SINK):
        pytest.skip("Postfix's smtp-sink is not installed (.ci/run installs Postfix)")
    sink = Sink("-8")
    try:
        spool, runner = runner_for(
            tmp_path, {"type": "smarthost", "host": "127.0.0.1", "port": sink.port}
        )
        eightbit = message("8-bit").replace(b"A line", "\u00c0 line".encode())
        queue(spool, "A1", message("plain"), "bob@mx.test", BODY="8BITMIME", SMTPUTF8=None)
        assert spool.load("A1").mail_params == {"BODY": "8BITMIME", "SMTPUTF8": None}
        queue(spool, "B1", eightbit, "bob@mx.test", BODY="8BITMIME")

        reports: list[bytes] = []

        async def both() -> None:
            await runner.attempt("A1")
            await runner.attempt("B1")
            assert "A1" not in spool.ids()  # delivered
            [report] = [m for m in spool.iter_messages() if m.sender == ""]
            reports.append(report.read())
            # It returns the 8-bit message: to the sender's server (the same
            # sink) it cannot go as it is, and goes again in 7-bit form.
            await runner.attempt(report.id)
            [again] = [m for m in spool.iter_messages() if m.sender == ""]
            assert again.id != report.id
            reports.append(again.read())
            await runner.attempt(again.id)
            await runner.routes.close()

        asyncio.run(both())
        text = reports[0].decode("utf-8", "replace")
        assert "Status: 5.6.3" in text and "5.6.7" not in text
        assert "554 5.6.3 the message has 8-bit content" in text
        assert reports[1].isascii() and b"Content-Type: text/rfc822-headers" in reports[1]
        assert spool.ids() == []  # the 7-bit form delivered, nothing dropped
    finally:
        sink.stop()


@pytest.mark.parametrize("policy", ["require", "verify"])
def test_a_postfix_without_starttls_is_left_with_quit(tmp_path, postfix, policy):
    """TLS required, none offered: the message is deferred, and the session
    (healthy in plaintext) ended with QUIT, not dropped after EHLO."""
    downstream = postfix(accept_domains=["mx.test"])
    spool, runner = runner_for(
        tmp_path,
        {
            "type": "smarthost",
            "host": "127.0.0.1",
            "port": downstream.port,
            "tls": policy,
            "tls_name": "postfix.test",
        },
    )
    queue(spool, "Q1", message("no tls"), "bob@mx.test")
    asyncio.run(attempt(runner, "Q1"))
    [r] = spool.load("Q1").recipients
    assert (r.status, r.reply) == (
        "deferred",
        "451 4.7.4 TLS is required, but the server does not offer STARTTLS",
    )

    def disconnect() -> str | None:
        for line in downstream.log_path.read_text(errors="replace").splitlines():
            # Ours said EHLO (Postfix's own readiness probe did not).
            if "postfix/smtpd" in line and ("ehlo=1" in line or "after EHLO" in line):
                return line
        return None

    line = wait_until(disconnect, what="smtpd's disconnect line")
    assert "disconnect from" in line and "ehlo=1 quit=1" in line, line

"""The queue relaying through Bonzo's client to servers that take BINARYMIME,
answer LMTP slowly, or say things a log must not carry as they are."""

from __future__ import annotations

import asyncio
import email
import email.policy
import io
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from bonzo_plugins.queue.bounce import seven_bit
from bonzo_plugins.queue.routes import RouteTable
from bonzo_plugins.queue.runner import Runner, RunnerSettings
from bonzo_plugins.queue.spool import GroupSync, QueuedMessage, Spool
from bonzo_plugins.queue.transports import SMARTHOST, SmarthostTransport
from client_support import Fake, data_then, serve
from e2e_support import RecordingPlugin

BINARY = b"Subject: bin\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\x01\nA\rB\xff\r\n"


class App:
    def __init__(self, base: Path) -> None:
        self.base_dir = base
        self.dns = None
        self.plugins = None

        class _Settings:
            hostname = "relay.test"

        self.settings = _Settings()


def envelope(*rcpts: str, **mail_params: str) -> dict[str, Any]:
    return {
        "arrival": time.time(),
        "sender": "alice@example.org",
        "mail_params": dict(mail_params),
        "recipients": [
            {"address": r, "canonical": r, "domain": r.rpartition("@")[2], "params": {}}
            for r in rcpts
        ],
    }


async def relay(tmp_path: Path, route: dict[str, Any], env: dict[str, Any], body: bytes,
                **settings: Any) -> Spool:  # fmt: skip
    """Queue one message, make one attempt through ``route``; the spool."""
    spool = Spool(tmp_path / "q")
    spool.setup()
    routes = RouteTable({"*": route}, {}, App(tmp_path))
    routes.start()
    runner = Runner(
        spool,
        GroupSync(spool.data),
        routes,
        None,
        RunnerSettings(hostname="relay.test", **settings),
    )
    spool.write("M1", env, b"", io.BytesIO(body))
    try:
        await runner.attempt("M1")
    finally:
        await routes.close()
        runner.sync.close()
    return spool


def test_a_binarymime_message_is_relayed_by_bdat_byte_for_byte(tmp_path, start_server):
    server = start_server(plugin=RecordingPlugin())
    route = {"type": "smarthost", "host": "127.0.0.1", "port": server.port, "tls": "none"}
    spool = asyncio.run(
        relay(tmp_path, route, envelope("bob@dest.test", BODY="BINARYMIME"), BINARY)
    )
    assert spool.ids() == []  # delivered, and so removed
    [stored] = server.plugin.messages
    assert stored.content.endswith(BINARY) and stored.mail_params["BODY"] == "BINARYMIME"


def test_a_binarymime_message_bounces_where_it_cannot_go_as_it_is(tmp_path, caplog):
    fake = Fake()  # no CHUNKING, no BINARYMIME

    async def main() -> Spool:
        async with serve(fake) as port:
            route = {"type": "smarthost", "host": "127.0.0.1", "port": port, "tls": "none"}
            env = envelope("bob@dest.test", BODY="BINARYMIME")
            return await relay(tmp_path, route, env, BINARY)

    spool = asyncio.run(main())
    assert not fake.messages
    assert "queue: M1 to=<bob@dest.test> bounced: 554 5.6.3 " in caplog.text
    [report] = [m for m in spool.iter_messages() if m.sender == ""]  # to alice
    assert report.recipients[0].address == "alice@example.org"


@pytest.mark.parametrize("case", ["8bit message", "utf8 reply"])
def test_a_report_the_senders_server_refuses_as_8bit_goes_again_in_7bit(tmp_path, caplog, case):
    """A report with 8-bit content — a returned 8-bit message, or an ASCII
    message's refusal in UTF-8 — for a sender whose server has no 8BITMIME
    (RFC 6152) was refused here and dropped (null sender): it goes again in
    a 7-bit form (the header section only, UTF-8 as RFC 6533's escapes) and
    arrives, a valid report."""
    no_8bit = b"250-fake.test\r\n250-PIPELINING\r\n250 SIZE 100000000\r\n"

    async def rcpt(reader: Any, writer: Any, line: bytes) -> None:
        if b"<bob@dest.test>" in line and case == "utf8 reply":
            writer.write("550 5.1.1 Empf\u00e4nger unbekannt\r\n".encode())
        else:
            writer.write(b"250 2.1.5 Ok\r\n")

    fake = Fake(ehlo=no_8bit, replies={"RCPT": rcpt})
    text = "K\u00f6rper" if case == "8bit message" else "Body"
    body = f"Subject: Umlaut\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"

    async def main() -> Spool:
        async with serve(fake) as port:
            route = {"type": "smarthost", "host": "127.0.0.1", "port": port, "tls": "none"}
            spool = Spool(tmp_path / "q")
            spool.setup()
            routes = RouteTable({"*": route}, {}, App(tmp_path))
            routes.start()
            runner = Runner(spool, GroupSync(spool.data), routes, None,
                            RunnerSettings(hostname="relay.test"))  # fmt: skip
            params = {"BODY": "8BITMIME"} if case == "8bit message" else {}
            env = envelope("bob@dest.test", **params)
            spool.write("M1", env, b"", io.BytesIO(body.encode("utf-8")))
            try:
                await runner.attempt("M1")  # refused (8-bit here, or by the server)
                [report] = [m.id for m in spool.iter_messages() if m.sender == ""]
                await runner.attempt(report)  # refused here: 8-bit; queued again
                [again] = [m.id for m in spool.iter_messages() if m.sender == ""]
                assert again != report
                await runner.attempt(again)
            finally:
                await routes.close()
                runner.sync.close()
            return spool

    caplog.set_level(logging.INFO)
    spool = asyncio.run(main())
    assert spool.ids() == []
    sent = fake.messages[-1]  # (a pipelined DATA may have sent the first)
    assert sent.isascii()
    assert b"Content-Type: text/rfc822-headers\r\nContent-Transfer-Encoding: 7bit" in sent
    # The header section, each field with its CRLF, then the delimiter's.
    assert b"\r\nSubject: Umlaut\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n--" in sent
    assert b"rper" not in sent and b"\r\nBody\r\n" not in sent
    assert b"does not take 8-bit content (8BITMIME)" in sent
    assert b"Content-Transfer-Encoding: 8bit" not in sent
    if case == "utf8 reply":
        assert b"Empf\\x{E4}nger unbekannt" in sent
        assert b"global" not in sent
    assert fake.commands[-4].startswith("MAIL FROM:<> ")  # no BODY=8BITMIME
    assert "BODY" not in fake.commands[-4]
    assert "queued again in 7-bit form as" in caplog.text
    assert "not reporting failed" not in caplog.text
    parsed = email.message_from_bytes(sent.removesuffix(b".\r\n"), policy=email.policy.default)
    assert parsed.get_content_type() == "multipart/report" and not parsed.defects
    kinds = [p.get_content_type() for p in parsed.get_payload()]
    assert kinds == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = parsed.get_payload()[1].get_payload()[1]
    assert status["Final-Recipient"] == "rfc822; bob@dest.test"
    # 7-bit already: not made over again (no loop).
    assert seven_bit(sent) is None


def test_an_lmtp_recipients_250_stands_when_the_delivery_times_out(tmp_path):
    slow_second = data_then(b"250 2.0.0 <bob> saved\r\n", stall=10)
    fake = Fake(ehlo=b"250-lmtp.test\r\n250 PIPELINING\r\n", replies={"DATA": slow_second})

    async def main() -> Spool:
        async with serve(fake) as port:
            route = {"type": "lmtp", "host": "127.0.0.1", "port": port}
            env = envelope("bob@dest.test", "carol@dest.test")
            return await relay(tmp_path, route, env, b"Subject: t\r\n\r\nhi\r\n",
                               delivery_timeout=1.0)  # fmt: skip

    spool = asyncio.run(main())
    [bob, carol] = spool.load("M1").recipients
    assert (bob.status, bob.reply) == ("delivered", "250 2.0.0 <bob> saved")
    assert carol.status == "deferred" and carol.reply.startswith("451 4.4.2 ")


@pytest.mark.parametrize("crlf", [True, False])
def test_a_servers_reply_is_one_log_line(tmp_path, caplog, crlf):
    """A multiline reply (or one with a Unicode line separator) cannot end
    the log line or forge another."""
    forged = "2026-01-01 00:00:00,000 INFO queue: X to=<ceo@example.org> delivered"
    text = f"452-4.2.2 full\r\n452 4.2.2 {forged}\r\n" if crlf else f"452 4.2.2 a\u2028{forged}\r\n"
    fake = Fake(after_data=[text.encode("utf-8")])

    async def main() -> Spool:
        async with serve(fake) as port:
            route = {"type": "smarthost", "host": "127.0.0.1", "port": port, "tls": "none"}
            return await relay(
                tmp_path, route, envelope("bob@dest.test"), b"Subject: t\r\n\r\nhi\r\n"
            )

    caplog.set_level(logging.INFO)
    asyncio.run(main())
    [line] = [r.getMessage() for r in caplog.records if " deferred: " in r.getMessage()]
    assert "\n" not in line and "\u2028" not in line and line.count(" to=<") == 2
    assert line.startswith("queue: M1 to=<bob@dest.test> deferred: 452 4.2.2 ")


def test_an_address_no_command_can_carry_fails_alone(tmp_path, caplog):
    """Bonzo's server accepts no such address, but a queue file may hold one
    (written by a plugin, by hand): it fails for good, alone, and the other
    recipients of its destination are delivered."""
    fake = Fake()

    async def main() -> Spool:
        async with serve(fake) as port:
            route = {"type": "smarthost", "host": "127.0.0.1", "port": port, "tls": "none"}
            env = envelope("bob@dest.test", "bad>addr@dest.test", "")
            return await relay(tmp_path, route, env, b"Subject: t\r\n\r\nhi\r\n")

    spool = asyncio.run(main())
    assert [c for c in fake.commands if c.startswith("RCPT")] == ["RCPT TO:<bob@dest.test>"]
    assert len(fake.messages) == 1
    assert "queue: M1 to=<bad\\x3eaddr@dest.test> bounced: 553 5.1.3 " in caplog.text
    # An empty address is an address problem too, not a DSN parameter's.
    assert "queue: M1 to=<> bounced: 553 5.1.3 " in caplog.text
    [report] = [m for m in spool.iter_messages() if m.sender == ""]
    assert report.recipients[0].address == "alice@example.org"


def test_a_dsn_parameter_no_command_can_carry_fails_its_recipient_alone(tmp_path, caplog):
    """A NOTIFY or ORCPT made invalid by hand in a queue file fails that
    recipient for good (a report says why); the others are delivered."""
    fake = Fake()
    env = envelope("bob@dest.test", "carol@dest.test", "dave@dest.test")
    env["recipients"][1]["params"] = {"NOTIFY": "FAILURE,\r\nRSET"}
    env["recipients"][2]["params"] = {"ORCPT": "rfc822;a b"}

    async def main() -> Spool:
        async with serve(fake) as port:
            route = {"type": "smarthost", "host": "127.0.0.1", "port": port, "tls": "none"}
            return await relay(tmp_path, route, env, b"Subject: t\r\n\r\nhi\r\n")

    spool = asyncio.run(main())
    assert [c for c in fake.commands if c.startswith("RCPT")] == ["RCPT TO:<bob@dest.test>"]
    assert len(fake.messages) == 1
    assert "queue: M1 to=<carol@dest.test> bounced: 553 5.5.4 " in caplog.text
    assert "queue: M1 to=<dave@dest.test> bounced: 553 5.5.4 " in caplog.text
    assert "bad NOTIFY" in caplog.text and "bad ORCPT" in caplog.text
    [report] = [m for m in spool.iter_messages() if m.sender == ""]
    assert report.recipients[0].address == "alice@example.org"


def test_a_bad_ret_or_envid_fails_the_message_not_every_attempt(tmp_path, caplog):
    fake = Fake()
    env = envelope("bob@dest.test", RET="EVERYTHING")

    async def main() -> Spool:
        async with serve(fake) as port:
            route = {"type": "smarthost", "host": "127.0.0.1", "port": port, "tls": "none"}
            return await relay(tmp_path, route, env, b"Subject: t\r\n\r\nhi\r\n")

    spool = asyncio.run(main())
    assert not fake.messages and not [c for c in fake.commands if c.startswith("MAIL")]
    assert "queue: M1 to=<bob@dest.test> bounced: 554 5.5.4 " in caplog.text
    assert "bad RET 'EVERYTHING'" in caplog.text
    assert [m.sender for m in spool.iter_messages()] == [""]  # the report alone


def smarthost(tmp_path: Path, port: int, **table: Any) -> SmarthostTransport:
    values = SMARTHOST.parse(
        {"type": "smarthost", "host": "127.0.0.1", "port": port, "tls": "none", **table},
        App(tmp_path),
    )
    return SmarthostTransport(values, App(tmp_path), "test")


def spooled(tmp_path: Path, *ids: str) -> list[QueuedMessage]:
    spool = Spool(tmp_path / "q")
    spool.setup()
    for id in ids:
        spool.write(
            id, envelope(f"{id.lower()}@dest.test"), b"", io.BytesIO(b"Subject: t\r\n\r\nhi\r\n")
        )
    return [spool.load(id) for id in ids]


async def refuse_rset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes):
    """A server restarting, or a connection gone half-open: RSET fails."""
    writer.write(b"421 4.3.2 Service shutting down\r\n")
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("pipelining", [True, False])
def test_two_kept_connections_that_went_stale_cost_one_try_then_a_new_one(tmp_path, pipelining):
    """Two deliveries at once leave two connections in the pool; the server
    then fails RSET on both: the next message is sent on a new connection
    after the first stale one, never deferred as a local error."""
    fake = Fake(replies={"RSET": refuse_rset})
    m1, m2, m3 = spooled(tmp_path, "M1", "M2", "M3")

    async def main() -> list[Any]:
        async with serve(fake) as port:
            transport = smarthost(tmp_path, port, idle_timeout=60, pipelining=pipelining)
            try:
                first = await asyncio.gather(
                    transport.deliver(m1, m1.recipients), transport.deliver(m2, m2.recipients)
                )
                assert sum(len(c) for c in transport.pool._idle.values()) == 2
                return [*first, await transport.deliver(m3, m3.recipients)]
            finally:
                await transport.close()

    outcomes = asyncio.run(main())
    assert [o.status for [o] in outcomes] == ["delivered"] * 3
    assert fake.connections == 3  # the two kept ones, and one new
    assert len(fake.messages) == 3


UTF8_BODY = "From: a@example.org\r\nSubject: plain\r\n\r\nGrüße\r\n".encode()
UTF8_HEADER = "From: a@example.org\r\nSubject: Grüße\r\n\r\nhi\r\n".encode()
# A header line longer than a read, cut right before its CRLF: no empty line.
LONG_HEADER = b"X-Long: " + b"a" * ((1 << 16) - 8) + "\r\nSubject: Grüße\r\n\r\nhi\r\n".encode()


@pytest.mark.parametrize(
    ("body", "status", "declared"),
    [
        (UTF8_BODY, "delivered", "MAIL FROM:<alice@example.org> BODY=8BITMIME"),
        (UTF8_HEADER, "failed", None),
        (LONG_HEADER, "failed", None),
    ],
    ids=["utf8-body", "utf8-header", "utf8-header-after-a-long-line"],
)
def test_smtputf8_is_needed_for_utf8_header_fields_not_a_utf8_body(
    tmp_path, body, status, declared
):
    """RFC 6531 3.2, RFC 6532 3.1: to a server with 8BITMIME and no
    SMTPUTF8, a message declared SMTPUTF8 whose addresses and header fields
    are ASCII goes BODY=8BITMIME; one with UTF-8 in a header field bounces
    (553 5.6.7), never sent."""
    fake = Fake(ehlo=b"250-fake.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    spool = Spool(tmp_path / "q")
    spool.setup()
    env = envelope("bob@dest.test", SMTPUTF8=None, BODY="8BITMIME")  # type: ignore[arg-type]
    spool.write("M1", env, b"", io.BytesIO(body))
    message = spool.load("M1")

    async def main() -> list[Any]:
        async with serve(fake) as port:
            transport = smarthost(tmp_path, port)
            try:
                return await transport.deliver(message, message.recipients)
            finally:
                await transport.close()

    [outcome] = asyncio.run(main())
    assert outcome.status == status
    if declared is None:
        assert (outcome.code, outcome.enhanced) == (553, "5.6.7")
        assert not any(c.startswith("MAIL") for c in fake.commands)
    else:
        assert fake.commands[1] == declared
        assert fake.messages and "Grüße".encode() in fake.messages[0]


def test_closing_the_pool_quits_its_connections_at_once_and_bounded(tmp_path):
    """At a stop, the idle connections to a server that stopped answering
    are said QUIT together, each for at most close_timeout seconds, then
    aborted: not one quit_timeout after another."""
    hung: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes):
        hung.append(writer)
        await reader.read()  # no reply; until the client goes

    fake = Fake(replies={"QUIT": hang})
    messages = spooled(tmp_path, "M1", "M2", "M3", "M4")

    async def main() -> float:
        async with serve(fake) as port:
            transport = smarthost(tmp_path, port, idle_timeout=60)
            transport.settings = transport.settings.replace(quit_timeout=3.0)
            transport.pool.close_timeout = 0.5
            await asyncio.gather(*(transport.deliver(m, m.recipients) for m in messages))
            assert sum(len(c) for c in transport.pool._idle.values()) == 4
            start = time.monotonic()
            await transport.close()
            took = time.monotonic() - start
            assert len(hung) == 4  # every one was asked
            await asyncio.sleep(0.1)
            assert all(w.transport.is_closing() or w.is_closing() for w in hung)
            return took

    took = asyncio.run(main())
    assert took < 2.0, took  # one after another: 4 x 3 s


def test_a_huge_reply_is_cut_before_it_is_kept_logged_or_reported(tmp_path, caplog):
    """100 lines of 8,000 octets (within the client's limits) for each
    recipient: the queue keeps, logs and reports a few hundred octets a line
    and a few lines, and says it cut them."""

    async def rcpt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes):
        code, enhanced = (b"550", b"5.2.0") if b"<gone" in line else (b"450", b"4.2.0")
        text = enhanced + b" " + b"A" * 8000 + b"\r\n"
        writer.write((code + b"-" + text) * 99 + code + b" " + enhanced + b" end\r\n")

    fake = Fake(replies={"RCPT": rcpt})

    async def main() -> Spool:
        async with serve(fake) as port:
            route = {"type": "smarthost", "host": "127.0.0.1", "port": port, "tls": "none"}
            env = envelope(*(f"r{i}@dest.test" for i in range(5)), "gone@dest.test")
            return await relay(tmp_path, route, env, b"Subject: t\r\n\r\nhi\r\n")

    caplog.set_level(logging.INFO)
    spool = asyncio.run(main())
    recipients = spool.load("M1").recipients
    assert [r.status for r in recipients] == ["deferred"] * 5 + ["bounced"]
    for r in recipients:
        assert len(r.reply) < 2500
        assert r.reply[3:].startswith(f" {r.reply[0]}.2.0 " + "A" * 400 + " [cut]\n")
        assert r.reply.endswith("\n" + "A" * 400 + " [cut]\n[95 more lines cut]")
    assert sum(p.stat().st_size for p in spool.state.iterdir()) < 6 * 2500 + 4096
    assert max(len(r.getMessage()) for r in caplog.records) < 5000
    [report] = [m for m in spool.iter_messages() if m.sender == ""]  # gone@'s bounce
    text = report.read()
    assert len(text) < 10_000 and b" [cut] " in text

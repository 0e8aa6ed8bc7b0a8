"""bonzo.client pipelining (RFC 2920): to a server that offers PIPELINING,
RSET (on a used connection), MAIL, every RCPT and DATA go as one group; the
replies are read in order however the server's packets fall, and every
reply decides what it decides when sent one at a time.

The scripted server here answers a group only once it has read the whole
group up to DATA: a client that waited for a reply between the commands
would never get one (the test would time out), so each passing test shows
the group was sent before any reply. Real servers (Bonzo, Postfix's
smtp-sink, Postfix, Exim) take pipelined groups in the other client tests.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from client_support import HOST, read_message, run, unstuff

from bonzo.client import ClientError, ClientSettings, Status, connect, deliver

MESSAGE = b"Subject: hi\r\n\r\n.Hello.\r\n"
EHLO = b"250-group.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000000\r\n"


def settings(**changes: Any) -> ClientSettings:
    base: dict[str, Any] = {"helo_name": "client.test", "tls_policy": "none"}
    for name in ("connect", "greeting", "helo", "mail", "rcpt", "data", "rset", "quit"):
        base[f"{name}_timeout"] = 3.0
    base.update(data_block_timeout=3.0, data_end_timeout=3.0)
    base.update(changes)
    return ClientSettings(**base)


class GroupServer:
    """Greets, answers EHLO, then per transaction reads every command up to
    ``DATA`` (or up to ``group_size`` lines) before answering: ``answers``
    gives, per transaction, the replies to the group in order, then the
    reply after the message (sent only if DATA got 354). ``split`` writes
    the replies one octet at a time."""

    def __init__(self, answers: list[list[bytes]], split: bool = False) -> None:
        self.answers = answers
        self.split = split
        self.groups: list[list[bytes]] = []
        self.messages: list[bytes] = []
        self.sequential: list[bytes] = []  # commands answered one at a time

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 group.test ESMTP\r\n")
            await reader.readline()
            writer.write(EHLO)
            for answer in self.answers:
                group: list[bytes] = []
                while True:
                    line = await reader.readline()
                    if not line:
                        return
                    group.append(line.rstrip(b"\r\n"))
                    if line.upper().startswith((b"DATA", b"QUIT")):
                        break
                if group[-1].upper() == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                self.groups.append(group)
                *replies, end = answer
                if b"CLOSE" in replies:  # answer up to there, then hang up
                    writer.write(b"".join(replies[: replies.index(b"CLOSE")]))
                    await writer.drain()
                    return
                data = b"".join(replies)
                if self.split:
                    for i in range(len(data)):
                        writer.write(data[i : i + 1])
                        await writer.drain()
                        await asyncio.sleep(0)
                else:
                    writer.write(data)
                if replies[-1].startswith(b"354"):
                    self.messages.append(await read_message(reader))
                    writer.write(end)
                await writer.drain()
            while line := await reader.readline():
                if line.upper().startswith(b"QUIT"):
                    writer.write(b"221 bye\r\n")
                    return
                self.sequential.append(line.rstrip(b"\r\n"))
                writer.write(b"250 ok\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def serving(server: GroupServer, body: Any) -> Any:
    listener = await asyncio.start_server(server.handle, HOST, 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        return await body(port)
    finally:
        listener.close()
        await listener.wait_closed()


def outcome(result: Any) -> list[tuple[str, str, int]]:
    return [(r.address, r.status.value, r.code) for r in result.recipients]


@pytest.mark.parametrize("split", [False, True], ids=["one-packet", "octet-by-octet"])
def test_the_envelope_goes_as_one_group(split):
    server = GroupServer(
        [[b"250 ok\r\n", b"250 ok\r\n", b"550 5.1.1 no such user\r\n", b"354 go\r\n",
          b"250 2.0.0 queued\r\n"]],
        split=split,
    )  # fmt: skip

    async def body(port: int) -> Any:
        return await deliver(
            HOST, port, sender="a@x.test", recipients=["b@y.test", "c@y.test"],
            message=MESSAGE, settings=settings(),
        )  # fmt: skip

    result = run(serving(server, body))
    assert server.groups == [[b"MAIL FROM:<a@x.test> SIZE=24", b"RCPT TO:<b@y.test>",
                              b"RCPT TO:<c@y.test>", b"DATA"]]  # fmt: skip
    assert outcome(result) == [("b@y.test", "delivered", 250), ("c@y.test", "refused", 550)]
    assert unstuff(server.messages[0]) == MESSAGE


def test_a_reused_connection_puts_rset_first_in_the_group():
    ok = [b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", b"250 queued\r\n"]
    server = GroupServer([ok, [b"250 reset\r\n", *ok]])

    async def body(port: int) -> Any:
        async with await connect(HOST, port, settings=settings()) as conn:
            first = await conn.send("a@x.test", ["b@y.test"], MESSAGE)
            second = await conn.send("a@x.test", ["c@y.test"], MESSAGE)
            return first, second, conn.transactions

    first, second, transactions = run(serving(server, body))
    assert server.groups[1][0] == b"RSET" and server.groups[1][1].startswith(b"MAIL FROM")
    assert outcome(first) == [("b@y.test", "delivered", 250)]
    assert outcome(second) == [("c@y.test", "delivered", 250)]
    assert transactions == 2


def test_a_failed_rset_in_the_group_is_a_connection_error():
    ok = [b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", b"250 queued\r\n"]
    server = GroupServer([ok, [b"421 4.3.2 closing\r\n", b"", b"", b"", b""]])

    async def body(port: int) -> Any:
        conn = await connect(HOST, port, settings=settings())
        await conn.send("a@x.test", ["b@y.test"], MESSAGE)
        with pytest.raises(ClientError) as info:
            await conn.send("a@x.test", ["c@y.test"], MESSAGE)
        return info.value, conn.usable

    error, usable = run(serving(server, body))
    # Nothing of the second message was answered: a pool sends it again on
    # a new connection.
    assert error.reply.code == 421 and not usable
    assert len(server.messages) == 1


def test_every_recipient_refused_then_354_ends_with_an_empty_message():
    # A server that says 354 although no RCPT was accepted (RFC 2920 3.1).
    server = GroupServer(
        [[b"250 ok\r\n", b"550 no\r\n", b"550 no\r\n", b"354 go\r\n", b"554 none valid\r\n"]]
    )

    async def body(port: int) -> Any:
        async with await connect(HOST, port, settings=settings()) as conn:
            result = await conn.send("a@x.test", ["b@y.test", "c@y.test"], MESSAGE)
            return result, conn.usable

    result, usable = run(serving(server, body))
    assert server.messages == [b".\r\n"]  # no content sent
    assert outcome(result) == [("b@y.test", "refused", 550), ("c@y.test", "refused", 550)]
    assert usable


def test_a_refused_sender_stands_for_every_recipient_and_data_is_not_sent():
    server = GroupServer(
        [[b"553 5.7.1 sender refused\r\n", b"503 5.5.1 no sender\r\n",
          b"503 5.5.1 no valid recipients\r\n", b""]]
    )  # fmt: skip

    async def body(port: int) -> Any:
        async with await connect(HOST, port, settings=settings()) as conn:
            return await conn.send("a@x.test", ["b@y.test"], MESSAGE), conn.usable

    result, usable = run(serving(server, body))
    assert [(r.status, r.stage.value, r.code) for r in result.recipients] == [
        (Status.REFUSED, "mail", 553)
    ]
    assert server.messages == [] and usable


def test_data_refused_after_accepted_recipients():
    server = GroupServer([[b"250 ok\r\n", b"250 ok\r\n", b"451 4.3.0 try later\r\n", b""]])

    async def body(port: int) -> Any:
        return await deliver(
            HOST, port, sender="a@x.test", recipients=["b@y.test"], message=MESSAGE,
            settings=settings(),
        )  # fmt: skip

    result = run(serving(server, body))
    assert [(r.status, r.stage.value, r.code) for r in result.recipients] == [
        (Status.DEFERRED, "data", 451)
    ]


@pytest.mark.parametrize(
    ("replies", "why"),
    [
        ([b"250 ok\r\n", b"hello\r\n"], "not SMTP"),
        ([b"250 ok\r\n", b"250-a\r\n251 b\r\n"], "codes differ"),
        ([b"250 ok\r\n", b"250 " + b"x" * 9000 + b"\r\n"], "too long"),
        ([b"250 ok\r\n", b"250-x\r\n" * 200], "lines"),
    ],
)
def test_hostile_replies_in_a_group_defer_and_close(replies, why):
    server = GroupServer([[*replies, b""]])

    async def body(port: int) -> Any:
        async with await connect(HOST, port, settings=settings()) as conn:
            return await conn.send("a@x.test", ["b@y.test"], MESSAGE), conn.usable

    result, usable = run(serving(server, body))
    (r,) = result.recipients
    assert r.status == Status.DEFERRED and why in r.text and not usable


def test_extra_replies_after_the_group_end_the_connection():
    end = b"250 queued\r\n250 what\r\n"
    server = GroupServer([[b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", end]])

    async def body(port: int) -> Any:
        conn = await connect(HOST, port, settings=settings())
        result = await conn.send("a@x.test", ["b@y.test"], MESSAGE)
        await asyncio.sleep(0.1)  # the stray reply arrives
        usable = conn.usable
        conn.close()
        return result, usable

    result, usable = run(serving(server, body))
    assert outcome(result) == [("b@y.test", "delivered", 250)]
    assert not usable  # out of step: never reused


def test_a_server_that_closes_mid_group_defers_every_recipient():
    server = GroupServer([[b"250 ok\r\n", b"250 ok\r\n", b"CLOSE", b""]])

    async def body(port: int) -> Any:
        return await deliver(
            HOST, port, sender="a@x.test", recipients=["b@y.test", "c@y.test"],
            message=MESSAGE, settings=settings(),
        )  # fmt: skip

    result = run(serving(server, body))
    assert [(r.status.value, r.stage.value, r.code) for r in result.recipients] == [
        ("deferred", "rcpt", 451),
        ("deferred", "rcpt", 451),
    ]
    assert "lost" in result.recipients[0].text or "closed" in result.recipients[0].text


def test_pipelining_off_sends_one_command_at_a_time():
    # A GroupServer with no transaction answers everything one at a time.
    server = GroupServer([])

    async def body(port: int) -> Any:
        return await deliver(
            HOST, port, sender="a@x.test", recipients=["b@y.test"], message=MESSAGE,
            settings=settings(pipelining=False, data_timeout=0.5),
        )  # fmt: skip

    result = run(serving(server, body))
    mail = b"MAIL FROM:<a@x.test> SIZE=24"
    assert server.sequential[:3] == [mail, b"RCPT TO:<b@y.test>", b"DATA"]
    # (The scripted server answers DATA with 250, not 354: a protocol error.)
    assert result.recipients[0].status == Status.DEFERRED


def test_lmtp_groups_the_envelope_and_reads_one_reply_per_recipient():
    server = GroupServer(
        [[b"250 ok\r\n", b"250 ok\r\n", b"550 5.1.1 unknown\r\n", b"250 ok\r\n", b"354 go\r\n",
          b"250 2.0.0 <b@y.test> saved\r\n452 4.2.2 <d@y.test> mailbox full\r\n"]]
    )  # fmt: skip

    async def body(port: int) -> Any:
        return await deliver(
            HOST, port, sender="a@x.test", recipients=["b@y.test", "c@y.test", "d@y.test"],
            message=MESSAGE, protocol="lmtp", settings=settings(),
        )  # fmt: skip

    result = run(serving(server, body))
    assert server.groups[0][0] == b"MAIL FROM:<a@x.test> SIZE=24"
    assert server.groups[0][-1] == b"DATA" and len(server.groups[0]) == 5
    assert [(r.address, r.status.value, r.stage.value, r.code) for r in result.recipients] == [
        ("b@y.test", "delivered", "end", 250),
        ("c@y.test", "refused", "rcpt", 550),
        ("d@y.test", "deferred", "end", 452),
    ]


def test_a_flood_of_replies_is_not_kept():
    # Thousands of replies at once, more than the group's commands: an
    # error at the first one too many, not a growing queue of replies.
    server = GroupServer([[b"250 ok\r\n" * 5000, b""]])

    async def body(port: int) -> Any:
        async with await connect(HOST, port, settings=settings()) as conn:
            result = await conn.send("a@x.test", ["b@y.test"], MESSAGE)
            return result, conn.usable

    result, usable = run(serving(server, body))
    (r,) = result.recipients
    assert not usable
    # MAIL, RCPT and DATA got "250 ok" (DATA: not 354, a protocol error),
    # or the flood was cut at the first reply too many.
    assert r.status == Status.DEFERRED


def test_the_reply_reader_keeps_no_more_than_it_is_owed():
    from bonzo.client import _ReplyReader

    class Inner(asyncio.Protocol):
        pass

    async def main() -> Any:
        reader = _ReplyReader(Inner(), 8192, 100)
        reader.owed += 3  # three commands written
        reader.data_received(b"250 ok\r\n" * 5000)
        return len(reader.replies), reader.error, reader.idle

    kept, error, idle = run(main())
    assert kept == 4 and error == "more replies than commands" and not idle

"""Bonzo's client against downstream servers that break the rules: a reply
nobody asked for, a malformed final reply, a stalled LMTP reply, a binary
message, odd EHLO values. The rule under test: a recipient counts as
delivered only on a valid ``250`` to its message, and on no other reply."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from client_support import (
    EHLO,
    HOST,
    Action,
    Fake,
    data_then,
    deliver_through,
    read_message,
    run,
    serve,
)
from e2e_support import RecordingPlugin

from bonzo.client import ClientSettings, DeliveryResult, Recipient, Status, connect, deadline
from bonzo.settings import ListenerSettings

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"
NO_PIPELINING = b"250-fake.test\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"


def settings(**changes: Any) -> ClientSettings:
    base: dict[str, Any] = {"helo_name": "client.test", "tls_policy": "none"}
    for name in ("connect", "greeting", "helo", "mail", "rcpt", "data"):
        base[f"{name}_timeout"] = 5.0
    base.update(data_block_timeout=5.0, data_end_timeout=5.0, rset_timeout=5.0, quit_timeout=2.0)
    base.update(changes)
    return ClientSettings(**base)


def outcome(result: DeliveryResult) -> list[tuple[str, str, int]]:
    return [(r.address, r.status.value, r.code) for r in result.recipients]


@pytest.mark.parametrize("ehlo", [EHLO, NO_PIPELINING], ids=["pipelining", "one-at-a-time"])
def test_a_reply_sent_with_the_354_is_never_taken_for_the_message(ehlo):
    """``250`` in the same packet as the ``354``, then ``554`` to the
    message: out of step, so deferred (the 250 was the message's to nobody)."""
    fake = Fake(
        ehlo=ehlo,
        replies={"DATA": data_then(b"554 5.7.1 refused\r\n", after_354=b"250 2.0.0 stray\r\n")},
    )

    result = run(deliver_through(fake, ["b@example.net"], MESSAGE, settings()))
    assert outcome(result) == [("b@example.net", "deferred", 451)]
    assert result.recipients[0].enhanced_code == "4.5.0"


def early_lmtp_replies(group: int, finals: bytes) -> dict[str, bytes | Action]:
    """:class:`Fake` replies for an LMTP server that answers each recipient
    before the message: ``finals`` in the same write as the ``354``. With
    ``group`` (pipelining), MAIL's and the RCPTs' replies go in that write
    too, so the client reads them all at once, never before the finals."""

    async def data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes):
        writer.write(b"250 2.0.0 Ok\r\n" * group + b"354 go ahead\r\n" + finals)
        await writer.drain()
        await read_message(reader)  # the client sends none: ends at its close

    if not group:
        return {"DATA": data}
    return {"MAIL": b"", "RCPT": b"", "DATA": data}


@pytest.mark.parametrize(
    ("finals", "expected"),
    [
        (
            b"550 5.1.1 <b1> unknown\r\n452 4.2.2 <b2> full\r\n",
            [("b1@example.net", "refused", 550), ("b2@example.net", "deferred", 452)],
        ),
        # A 250 before the message claims a delivery that cannot be: deferred.
        (
            b"250 2.0.0 <b1> saved\r\n550 5.1.1 <b2> unknown\r\n",
            [("b1@example.net", "deferred", 451), ("b2@example.net", "deferred", 451)],
        ),
    ],
    ids=["refusals", "250"],
)
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-at-a-time"])
def test_lmtp_replies_sent_with_the_354_stand_unless_they_claim_delivery(
    finals, expected, pipelining
):
    """Each recipient's reply sent early (with the ``354``) is heard as its
    own, pipelined or not; the connection is not used again."""
    rcpts = ["b1@example.net", "b2@example.net"]
    ehlo = b"250-fake.test\r\n250 PIPELINING\r\n" if pipelining else b"250 fake.test\r\n"
    group = 1 + len(rcpts) if pipelining else 0
    fake = Fake(ehlo=ehlo, replies=early_lmtp_replies(group, finals))

    async def main() -> tuple[DeliveryResult, bool]:
        async with serve(fake) as port:
            conn = await connect(HOST, port, protocol="lmtp", settings=settings())
            try:
                return await conn.send("a@example.org", rcpts, MESSAGE), conn.usable
            finally:
                conn.close()

    result, usable = run(main())
    assert outcome(result) == expected
    if expected[0][2] == 451:
        assert result.recipients[0].enhanced_code == "4.5.0"
        assert "250 before the end of the message" in result.recipients[0].text
    else:
        assert [r.text for r in result.recipients] == ["<b1> unknown", "<b2> full"]
    assert not usable


@pytest.mark.parametrize(
    "final",
    [b"550-5.7.1 refused\r\n250 see above\r\n", b"2501 garbage\r\n", b"250garbage\r\n"],
    ids=["codes-differ", "four-digits", "no-separator"],
)
@pytest.mark.parametrize("ehlo", [EHLO, NO_PIPELINING], ids=["pipelining", "one-at-a-time"])
def test_a_malformed_final_reply_never_counts_as_250(final, ehlo):
    fake = Fake(ehlo=ehlo, after_data=[final])

    result = run(deliver_through(fake, ["b@example.net"], MESSAGE, settings()))
    assert outcome(result) == [("b@example.net", "deferred", 451)]


@pytest.mark.parametrize(
    ("ehlo", "protocol"),
    [
        (EHLO, "smtp"),
        (NO_PIPELINING, "smtp"),
        (b"250-fake.test\r\n250 PIPELINING\r\n", "lmtp"),
        (b"250 fake.test\r\n", "lmtp"),
    ],
    ids=["smtp-pipelining", "smtp", "lmtp-pipelining", "lmtp"],
)
def test_one_reply_too_many_ends_the_connection_not_the_next_message(ehlo, protocol):
    """The first message is answered twice; the connection is not used for
    the next one, whose replies would all be one behind."""
    extra = b"250 2.0.0 Ok\r\n250 2.0.0 extra\r\n"
    fake = Fake(ehlo=ehlo, after_data=[extra])

    async def main() -> tuple[DeliveryResult, bool]:
        async with serve(fake) as port:
            conn = await connect(HOST, port, protocol=protocol, settings=settings())
            try:
                first = await conn.send("a@example.org", ["b1@example.net"], MESSAGE)
                for _ in range(50):  # the extra reply arrives
                    if not conn.usable:
                        break
                    await asyncio.sleep(0.02)
                return first, conn.usable
            finally:
                await conn.quit()

    first, usable = run(main())
    assert outcome(first) == [("b1@example.net", "delivered", 250)]
    assert not usable


def test_an_lmtp_250_already_in_is_kept_when_the_deadline_passes():
    """The deadline (the queue's delivery_timeout) ends the wait for the
    second recipient's reply; the first one's 250 stands."""

    slow_second = data_then(b"250 2.0.0 <bob> saved\r\n", stall=10)
    fake = Fake(ehlo=b"250-fake.test\r\n250 PIPELINING\r\n", replies={"DATA": slow_second})

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            conn = await connect(HOST, port, protocol="lmtp", settings=settings())
            token = deadline.set(asyncio.get_running_loop().time() + 1.0)
            try:
                return await conn.send("a@example.org", ["bob@x.test", "carol@x.test"], MESSAGE)
            finally:
                deadline.reset(token)
                conn.close()

    result = run(main())
    assert outcome(result) == [
        ("bob@x.test", "delivered", 250),
        ("carol@x.test", "deferred", 451),
    ]
    assert result.recipients[1].enhanced_code == "4.4.2"


BINARY = b"Subject: bin\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\x01\nA\rB\xff\r\n.\r\n"


def test_a_binary_message_goes_by_bdat_as_it_is(start_server):
    """To Bonzo's own server (CHUNKING, BINARYMIME): one BDAT LAST with the
    octets as they are; bare CR and LF and a lone dot line untouched."""
    server = start_server(plugin=RecordingPlugin(), listener=ListenerSettings())

    async def main() -> DeliveryResult:
        async with await connect(HOST, server.port, settings=settings()) as conn:
            assert conn.supports("CHUNKING") and conn.supports("BINARYMIME")
            return await conn.send("a@example.org", ["b@example.net"], BINARY, binary=True)

    assert outcome(run(main())) == [("b@example.net", "delivered", 250)]
    [stored] = server.plugin.messages
    assert stored.body == BINARY
    assert stored.mail_params.get("BODY") == "BINARYMIME"


@pytest.mark.parametrize("ehlo", [EHLO, b"250-fake.test\r\n250 CHUNKING\r\n"])
def test_a_binary_message_is_refused_to_a_server_that_cannot_take_it(ehlo):
    fake = Fake(ehlo=ehlo)

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            async with await connect(HOST, port, settings=settings()) as conn:
                return await conn.send("a@example.org", ["b@example.net"], BINARY, binary=True)

    result = run(main())
    assert outcome(result) == [("b@example.net", "refused", 554)]
    assert result.recipients[0].enhanced_code == "5.6.3"
    assert not fake.messages and not any(c.startswith("MAIL") for c in fake.commands)


def test_a_quoted_local_part_with_angle_brackets_is_sent():
    fake = Fake()

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            async with await connect(HOST, port, settings=settings()) as conn:
                for bad in ("x>y@example.net", '"x"@example.net>', '"open>@example.net'):
                    with pytest.raises(ValueError, match="bad recipient address"):
                        await conn.send("a@example.org", [bad], MESSAGE)
                return await conn.send("a@example.org", ['"x>y"@example.net'], MESSAGE)

    assert outcome(run(main())) == [('"x>y"@example.net', "delivered", 250)]
    assert 'RCPT TO:<"x>y"@example.net>' in fake.commands


def test_reply_text_keeps_no_control_character_nor_broken_utf8():
    fake = Fake(after_data=[b"250 2.0.0 ok \xc2\x85 \xc2\x9b31m \xff done\r\n"])

    [r] = run(deliver_through(fake, ["b@example.net"], MESSAGE, settings())).recipients
    assert r.status is Status.DELIVERED
    assert r.text == "ok ? ?31m \ufffd done"  # C1 controls out, broken UTF-8 replaced
    assert r.text.isprintable()


def test_an_ehlo_size_of_absurd_length_is_no_limit():
    fake = Fake(ehlo=b"250-fake.test\r\n250 SIZE " + b"9" * 5000 + b"\r\n")

    async def main() -> tuple[int, DeliveryResult]:
        async with serve(fake) as port:
            async with await connect(HOST, port, settings=settings()) as conn:
                limit = conn.size_limit
                return limit, await conn.send("a@example.org", ["b@example.net"], MESSAGE)

    limit, result = run(main())
    assert limit == 0
    assert outcome(result) == [("b@example.net", "delivered", 250)]


@pytest.mark.parametrize(
    "notify",
    ["SUCCESS,\r\nDELAY", "SUCCESS\r\nRSET", "FAILURE\t", "NEVER\x00", "DELAY\u2028", "SUCCESS\n"],
)
def test_a_notify_value_with_a_control_character_is_refused_before_anything_is_sent(notify):
    fake = Fake(ehlo=EHLO.replace(b"250 SIZE", b"250-DSN\r\n250 SIZE"))

    async def main() -> None:
        async with serve(fake) as port:
            async with await connect(HOST, port, settings=settings()) as conn:
                bad = Recipient("b@example.net", notify=notify)
                with pytest.raises(ValueError, match="bad NOTIFY"):
                    await conn.send("a@example.org", [bad], MESSAGE)
                assert (await conn.mail("a@example.org")).code == 250
                with pytest.raises(ValueError, match="bad NOTIFY"):
                    await conn.rcpt(bad)
                assert (await conn.rset()).code == 250

    run(main())
    assert not any(c.startswith("RCPT") for c in fake.commands)
    assert [c.split(" ")[0] for c in fake.commands] == ["EHLO", "MAIL", "RSET", "QUIT"]

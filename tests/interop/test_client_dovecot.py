"""bonzo.client's LMTP against Dovecot's LMTP server (a private instance,
see ``dovecot.py``): one reply per recipient, the stored bytes, dot-stuffing
and a 5 MB message streamed from a file, over TCP and a Unix socket."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from bonzo.client import ClientSettings, DeliveryResult, connect, deliver

from .dovecot import HOST, Dovecot

pytestmark = pytest.mark.timeout(120)

SENDER = "sender@example.org"


def settings(**changes: Any) -> ClientSettings:
    return ClientSettings(helo_name="relay.test", data_end_timeout=30, **changes)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def message(subject: str, body: bytes) -> bytes:
    head = f"From: {SENDER}\r\nTo: users@example.net\r\nSubject: {subject}\r\n\r\n"
    return head.encode() + body


def stored(dovecot: Dovecot, user: str, subject: str) -> bytes:
    """The one stored message of ``user`` with ``subject``."""
    found = [m for m in dovecot.messages(user) if f"Subject: {subject}\r\n".encode() in m]
    assert len(found) == 1, (user, subject, len(found), dovecot.log[-2000:])
    return found[0]


def test_mixed_results_one_reply_per_recipient(dovecot):
    # Over bob's 1 KB quota; alice and carol have room.
    body = message("mixed", b"A line of text that fills the message up.\r\n" * 60)
    result: DeliveryResult = run(
        deliver(
            HOST,
            dovecot.port,
            protocol="lmtp",
            sender=SENDER,
            recipients=[
                "alice@example.net",
                "nosuchuser@example.net",
                "bob@example.net",
                "carol@example.net",
            ],
            message=body,
            settings=settings(),
        )
    )
    got = [
        (r.address, r.status.value, r.stage.value, r.code, r.enhanced_code)
        for r in result.recipients
    ]
    assert got == [
        ("alice@example.net", "delivered", "end", 250, "2.0.0"),
        ("nosuchuser@example.net", "refused", "rcpt", 550, "5.1.1"),
        ("bob@example.net", "deferred", "end", 452, "4.2.2"),
        ("carol@example.net", "delivered", "end", 250, "2.0.0"),
    ]
    assert "Quota exceeded" in result.recipients[2].text
    assert result.recipients[0].text.endswith("Saved")
    # What Dovecot stored: its trace headers, then our bytes exactly.
    for user in ("alice", "carol"):
        data = stored(dovecot, user, "mixed")
        assert data.startswith(f"Return-Path: <{SENDER}>\r\n".encode())
        assert data.endswith(body)
    assert dovecot.messages("bob") == []


def test_dot_stuffing_over_the_unix_socket(dovecot):
    body = message(
        "dots",
        b".\r\n..\r\n.leading dot\r\n...three\r\nend with a dot.\r\n.\r\n. \r\nlast line",
    )
    result = run(
        deliver(
            path=dovecot.socket_path,
            protocol="lmtp",
            sender=SENDER,
            recipients=["alice@example.net"],
            message=body,
            settings=settings(),
        )
    )
    assert result.server == f"unix:{dovecot.socket_path}"
    assert result.recipients[0].delivered, result.recipients[0]
    # Stored as sent, with the CRLF the client added after the last line.
    assert stored(dovecot, "alice", "dots").endswith(body + b"\r\n")


def test_a_5_mb_message_streamed_from_a_file(dovecot, tmp_path):
    line = b".0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n"
    body = message("big", line * (5 * 1024 * 1024 // len(line)))
    path = tmp_path / "big.eml"
    path.write_bytes(body)
    with open(path, "rb") as f:
        result = run(
            deliver(
                HOST,
                dovecot.port,
                protocol="lmtp",
                sender=SENDER,
                recipients=["carol@example.net"],
                message=f,
                eightbit=False,
                settings=settings(chunk_size=32768),
            )
        )
    assert result.recipients[0].delivered, result.recipients[0]
    data = stored(dovecot, "carol", "big")
    assert hashlib.sha256(data[-len(body) :]).hexdigest() == hashlib.sha256(body).hexdigest()


def test_several_messages_on_one_connection(dovecot):
    async def main() -> list[DeliveryResult]:
        async with await connect(HOST, dovecot.port, protocol="lmtp", settings=settings()) as conn:
            assert {"8BITMIME", "ENHANCEDSTATUSCODES", "PIPELINING"} <= set(conn.extensions)
            return [
                await conn.send(SENDER, ["alice@example.net"], message(f"reuse {n}", b"x\r\n"))
                for n in range(3)
            ]

    results = run(main())
    assert [r.recipients[0].delivered for r in results] == [True, True, True]
    for n in range(3):
        stored(dovecot, "alice", f"reuse {n}")
    assert dovecot.log.count("Connect from 127.0.0.1") >= 1

"""Dovecot as Bonzo's LMTP client: a private Dovecot LMTP *proxy*
(``lmtp_proxy``) passing every recipient on to Bonzo's LMTP listener.

Bonzo trusts the proxy for ``XCLIENT`` (``xclient_trusted``); Dovecot then
names its own client with ``XCLIENT ADDR=... PORT=... PROTO=LMTP`` before
each transaction. Bonzo refused ``PROTO=LMTP`` (501), and Dovecot went on
without a word: every session was the proxy's own (127.0.0.1) for the
plugins, the limits, the logs and the ``Received:`` header."""

from __future__ import annotations

import socket

import pytest

from bonzo.settings import ListenerSettings

from .bonzo_side import CORPUS, Target, split_trace
from .dovecot import available, dovecot_lmtp
from .peers import unavailable, wait_until

pytestmark = pytest.mark.timeout(120)

CLIENT = "127.0.0.7"  # Dovecot's client, as Bonzo must see it


def lmtp_send(port: int, recipients: list[str], body: bytes) -> list[bytes]:
    """One LMTP transaction from :data:`CLIENT` to ``port``; the replies
    after the data, one per accepted recipient."""
    with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(CLIENT, 0)) as s:
        reader = s.makefile("rb")

        def reply() -> bytes:
            lines = []
            for _ in range(100):
                line = reader.readline()
                lines.append(line)
                if line[3:4] != b"-":
                    break
            return b"".join(lines)

        def command(line: bytes) -> bytes:
            s.sendall(line + b"\r\n")
            return reply()

        assert reply().startswith(b"220 ")
        assert command(b"LHLO client.test").startswith(b"250")
        assert command(b"MAIL FROM:<alice@peer.test>").startswith(b"250")
        accepted = sum(command(b"RCPT TO:<%s>" % r.encode()).startswith(b"250") for r in recipients)
        assert command(b"DATA").startswith(b"354")
        s.sendall(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        replies = [reply() for _ in range(accepted)]
        command(b"QUIT")
        return replies


def test_dovecot_names_its_client_by_xclient(start_server):
    if not available():
        unavailable("dovecot-lmtpd is not installed (.ci/run installs it)")
    target = Target()
    server = start_server(
        plugin=target,
        hostname="bonzo.test",
        listener=ListenerSettings(protocol="lmtp", xclient_trusted=["127.0.0.1/32"]),
    )
    with dovecot_lmtp(proxy_to=server.port) as dovecot:
        replies = lmtp_send(dovecot.port, ["bob@example.com", "full@example.com"], CORPUS["dots"])
        assert replies[0].startswith(b"250 "), replies
        assert replies[1].startswith(b"452 4.2.2 "), replies  # Bonzo's reply, passed on
        wait_until(lambda: target.messages, what="the message in Bonzo")
    (delivered,) = target.messages
    trace = split_trace(delivered.body, CORPUS["dots"])
    assert f"([{CLIENT}])".encode() in trace and b" with LMTP" in trace, trace
    (session,) = target.sessions
    assert session["remote_ip"] == CLIENT
    assert session["protocol"] == "LMTP" and session["delivered_to"] == ["bob@example.com"]

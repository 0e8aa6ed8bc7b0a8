"""The ``dmarc`` plugin in the real daemon (``python -m bonzo serve``, on
127.0.0.1, every DNS question answered by the stub): a forged author hidden
behind a first address in ``From:`` is refused as the plain forgery is.

evil.example's SPF passes for 127.0.0.1 (p=none); good.example publishes
p=reject and SPF ``-all``. Python's address parser reads ``bob@evil.example
<alice@good.example>`` as bob@evil.example alone (it drops what follows a
syntax error), while readers show alice@good.example: good.example's policy
must apply. Every wait is bounded; the daemon is killed at the end.
"""

from __future__ import annotations

import smtplib
import textwrap
from pathlib import Path

import pytest
from daemon_support import daemon_env, daemons, free_port
from dns_stub import DNSStub

pytestmark = pytest.mark.timeout(120)

ZONE = [
    ("evil.example", "TXT", '"v=spf1 ip4:127.0.0.0/8 -all"'),
    ("_dmarc.evil.example", "TXT", '"v=DMARC1; p=none"'),
    ("good.example", "TXT", '"v=spf1 -all"'),
    ("_dmarc.good.example", "TXT", '"v=DMARC1; p=reject"'),
]

REFUSED = [
    "alice@good.example",  # the plain forgery, for comparison
    "bob@evil.example <alice@good.example>",
    "<bob@evil.example> <alice@good.example>",
    "bob@evil.example;<alice@good.example>",
    "Alice <bob@evil.example> <alice@good.example>",
    "alice@good\\.example",
    # Only an encoded word, whose text is alice@good.example.
    "=?utf-8?b?YWxpY2VAZ29vZC5leGFtcGxl?=",
    # Mailsploit: an encoded word in the local part (RFC 2047 5 forbids it),
    # shown by some readers as alice@good.example (they stop at the NUL).
    "=?utf-8?b?YWxpY2VAZ29vZC5leGFtcGxlAA==?=@evil.example",
    "=?utf-8?q?alice=40good.example=00?=@evil.example",
    "Alice <=?utf-8?b?YWxpY2VAZ29vZC5leGFtcGxlAA==?=@evil.example>",
    # The same in UTF-16 without a byte-order mark (big-endian to RFC 2781,
    # little-endian to Python), and with a full-width commercial at.
    "=?utf-16?b?AGEAbABpAGMAZQBAAGcAbwBvAGQALgBlAHgAYQBtAHAAbABlAAA=?=@evil.example",
    "=?utf-8?q?alice=EF=BC=A0good.example=00?=@evil.example",
    # Too long to parse (a long folded comment): scanned all the same.
    "alice@good.example" + "".join("\r\n (" + "x" * 70 + ")" for _ in range(240)),
]


def config(tmp_path: Path, port: int, nameserver: str) -> Path:
    path = tmp_path / "bonzo.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [server]
            hostname = "mx.local.test"

            [[listeners]]
            address = "127.0.0.1"
            port = {port}

            [logging]
            level = "info"

            [dns]
            nameservers = ["{nameserver}"]
            timeout = 2.0
            attempts = 1

            [plugins]
            enabled = ["spf", "dmarc", "authres", "recipients", "maildir"]

            [plugins.recipients]
            domains = ["local.test"]

            [plugins.maildir]
            path = "mail"
            """
        )
    )
    return path


def message(author: str) -> bytes:
    return (
        f"From: {author}\r\nTo: user@local.test\r\nSubject: invoice\r\n\r\n"
        "Please wire the money.\r\n"
    ).encode()


def test_a_second_address_in_from_gets_its_domain_s_policy(tmp_path: Path) -> None:
    port = free_port()
    with DNSStub(ZONE) as stub, daemons(tmp_path, daemon_env()) as start:
        daemon = start(config(tmp_path, port, stub.nameserver), port)
        daemon.wait_ready()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="mail.evil.example", timeout=30) as c:
            c.ehlo()
            for author in REFUSED:
                assert c.mail("bob@evil.example")[0] == 250
                assert c.rcpt("user@local.test")[0] == 250
                code, reply = c.data(message(author))
                assert (code, reply[:5]) == (550, b"5.7.1"), (author[:60], reply)
                assert b"DMARC policy of good.example rejects" in reply, reply
                c.rset()
            # evil.example's own mail passes (and is stored).
            assert (
                c.sendmail("bob@evil.example", ["user@local.test"], message("bob@evil.example"))
                == {}
            )
        assert daemon.stop() == 0
    [stored] = (tmp_path / "mail" / "new").iterdir()
    head = stored.read_bytes().split(b"\r\n\r\n", 1)[0]
    assert b"dmarc=pass" in head and b"header.from=evil.example" in head

"""The recipe "an inbound MX with SPF, DKIM, DMARC, rspamd and ClamAV"
(``examples/inbound-mx.toml``) as a real daemon, with a private clamd and a
private rspamd, every DNS question answered by a stub on 127.0.0.1: a
signed message from a domain with SPF and DMARC is stored with one
Authentication-Results: saying so; a virus is refused by ClamAV; a forged
author is refused by DMARC; a listed client is refused at connect."""

from __future__ import annotations

import base64
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
from bonzo_plugins.dkim_sign import dns_record, load_key
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from daemon_support import daemon_env, daemons, free_port
from dns_stub import DNSStub

from .peers import unavailable
from .scanners import EICAR, clamd, clamd_available, rspamd, rspamd_available

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def peers() -> Iterator[tuple[DNSStub, Any, Any]]:
    if not clamd_available():
        unavailable("clamd is not installed (.ci/run installs clamav-daemon)")
    if not rspamd_available():
        unavailable("rspamd is not installed (.ci/run installs it)")
    with DNSStub() as stub, clamd() as av, rspamd(f"127.0.0.1:{stub.port}") as spam:
        yield stub, av, spam


def message(author: str, body: str) -> bytes:
    return (
        f"From: {author}\r\nTo: bob@example.org\r\nSubject: recipe\r\n"
        f"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMessage-ID: <r@sender.test>\r\n\r\n{body}\r\n"
    ).encode()


def test_inbound_mx_recipe(tmp_path: Path, peers: Any) -> None:
    stub, av, spam = peers
    pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "key.pem").write_bytes(pem)
    record = dns_record(load_key(tmp_path / "key.pem"))
    stub.add(
        "s1._domainkey.sender.test",
        "TXT",
        " ".join(f'"{record[i : i + 200]}"' for i in range(0, len(record), 200)),
    )
    stub.add("2.0.0.127.zen.spamhaus.org", "A", "127.0.0.2")  # the client 127.0.0.2 is listed
    stub.add("sender.test", "TXT", '"v=spf1 ip4:127.0.0.0/8 -all"')
    stub.add("_dmarc.sender.test", "TXT", '"v=DMARC1; p=reject"')
    stub.add("_dmarc.bank.test", "TXT", '"v=DMARC1; p=reject"')
    stub.add("bank.test", "TXT", '"v=spf1 ip4:192.0.2.0/24 -all"')
    port = free_port()
    text = (ROOT / "examples" / "inbound-mx.toml").read_text()
    for old, new in (
        ("port = 2529", f"port = {port}"),
        ('nameservers = ["127.0.0.1"]', f'nameservers = ["{stub.nameserver}"]\ntimeout = 2'),
        ("port = 3310", f"port = {av.port}"),
        ("http://127.0.0.1:11333", f"http://127.0.0.1:{spam.port}"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / "inbound-mx.toml"
    config.write_text(text)
    plain = message("Alice <alice@sender.test>", "Hello Bob")
    signed = (
        dkim.sign(plain, b"s1", b"sender.test", pem, include_headers=[b"from", b"to", b"subject"])
        + plain
    )
    virus = message("Alice <alice@sender.test>", base64.b64encode(EICAR).decode())
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="mta.sender.test", timeout=60) as c:
            assert c.sendmail("alice@sender.test", ["bob@example.org"], signed) == {}
            with pytest.raises(smtplib.SMTPDataError) as refused:
                c.sendmail("alice@sender.test", ["bob@example.org"], virus + EICAR + b"\r\n")
            assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (554, b"5.7.1")
            c.rset()
            c.mail("ceo@elsewhere.test")
            c.rcpt("bob@example.org")
            code, reply = c.data(message("CEO <ceo@bank.test>", "Pay the invoice"))
            assert (code, reply[:5]) == (550, b"5.7.1")  # DMARC: a forged author
        with socket.create_connection(("127.0.0.1", port), 10, ("127.0.0.2", 0)) as listed:
            greeting = listed.makefile("rb").readline()
            assert greeting.startswith(b"554 5.7.1")
        assert daemon.stop() == 0
    [stored] = (tmp_path / "mail" / "example.org" / "bob" / "new").iterdir()
    content = stored.read_bytes()
    assert content.count(b"Authentication-Results: mx.example.org;") == 1
    head = content.split(b"\r\n\r\n", 1)[0].decode()
    for found in ("spf=pass", "dkim=pass", "dmarc=pass"):
        assert found in head, head
    assert "Received-SPF: pass" in head
    assert content.endswith(b"\r\n\r\nHello Bob\r\n")

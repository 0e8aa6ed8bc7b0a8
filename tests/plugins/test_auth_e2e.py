"""The mail-authentication plugins together, through a real Bonzo server
(``start_server``) and smtplib: dnsbl, spf, dkim, dmarc, authres, then
recipients and maildir. The DNS stub on 127.0.0.1 serves every record; no
packet leaves the machine."""

from __future__ import annotations

import email
import smtplib
from pathlib import Path
from types import SimpleNamespace

import authres
import pytest
from auth_testing import DkimKey
from bonzo_plugins.authres import AuthresPlugin
from bonzo_plugins.dkim import DkimPlugin
from bonzo_plugins.dmarc import DmarcPlugin
from bonzo_plugins.dnsbl import DnsblPlugin
from bonzo_plugins.maildir import MaildirPlugin
from bonzo_plugins.recipients import RecipientsPlugin
from bonzo_plugins.spf import SpfPlugin
from plugin_testing import make_plugin_set

HOSTNAME = "mx.bonzo.test"


def message(author: str, body: str = "Hello Bob") -> bytes:
    return (
        f"From: {author}\r\nTo: bob@example.com\r\nSubject: test\r\n"
        f"Message-ID: <1@example.org>\r\n\r\n{body}\r\n"
    ).encode()


@pytest.fixture
def mx(start_server, dns_stub, tmp_path):
    """A server with the authentication plugins in their usual order."""
    app = SimpleNamespace(
        dns=dns_stub.resolver(), settings=SimpleNamespace(hostname=HOSTNAME), base_dir=tmp_path
    )
    tables = [
        ("dnsbl", DnsblPlugin(), {"zones": ["bl.example"]}),
        ("spf", SpfPlugin(), {}),
        ("dkim", DkimPlugin(), {"arc": True}),
        ("dmarc", DmarcPlugin(), {}),
        ("authres", AuthresPlugin(), {}),
        ("recipients", RecipientsPlugin(), {"domains": ["example.com"]}),
        ("maildir", MaildirPlugin(), {"path": "Maildir", "quarantine": "Quarantine"}),
    ]
    for _name, plugin, table in tables:
        plugin.bonzo_configure(config=table, app=app)
    plugins = make_plugin_set(*[(name, plugin) for name, plugin, _ in tables])
    server = start_server(plugins=plugins, hostname=HOSTNAME)
    server.maildir = tmp_path / "Maildir"
    server.quarantine = tmp_path / "Quarantine"
    return server


def stored(server, where: str = "maildir") -> list[bytes]:
    new = Path(getattr(server, where)) / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def results_of(content: bytes) -> list[tuple[str, str]]:
    msg = email.message_from_bytes(content)
    (field,) = msg.get_all("Authentication-Results")
    parsed = authres.AuthenticationResultsHeader.parse_value(" ".join(field.split()))
    assert parsed.authserv_id == HOSTNAME
    return [(r.method, r.result) for r in parsed.results]


def test_signed_message_passes_and_is_stored_with_authentication_results(mx, dns_stub, caplog):
    key = DkimKey("rsa")
    key.publish(dns_stub, "s1", "example.org")
    dns_stub.add("example.org", "TXT", '"v=spf1 ip4:127.0.0.0/8 -all"')
    dns_stub.add("_dmarc.example.org", "TXT", '"v=DMARC1; p=reject"')
    signed = key.sign(message("Alice <alice@example.org>"), "s1", "example.org")
    forged = (
        f"Authentication-Results: {HOSTNAME}; dmarc=pass header.from=bank.example\r\n"
        "Authentication-Results: relay.example; spf=pass smtp.mailfrom=example.org\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", mx.port, local_hostname="client.example", timeout=10) as c:
        assert c.sendmail("alice@example.org", ["bob@example.com"], forged + signed) == {}
    (content,) = stored(mx)
    assert b"bank.example" not in content  # the forged field with our id is gone
    assert b"Authentication-Results: relay.example; spf=pass" in content  # not ours: kept
    content = content.replace(forged.splitlines(keepends=True)[1], b"")
    # The change is recorded as the authres plugin's (logged by the core).
    assert any("authres delete_header" in r.getMessage() for r in caplog.records)
    assert results_of(content) == [
        ("spf", "none"),  # the HELO identity: client.example publishes no SPF
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ]
    assert b"smtp.helo=client.example" in content
    assert b"smtp.mailfrom=alice@example.org" in content
    assert b"header.d=example.org header.s=s1" in content
    assert content.endswith(signed.split(b"\r\n\r\n", 1)[1])  # the body untouched


def test_dmarc_reject_of_a_forged_author(mx, dns_stub):
    dns_stub.add("_dmarc.bank.example", "TXT", '"v=DMARC1; p=reject"')
    dns_stub.add("bank.example", "TXT", '"v=spf1 ip4:192.0.2.0/24 -all"')
    with smtplib.SMTP("127.0.0.1", mx.port, local_hostname="client.example", timeout=10) as c:
        c.ehlo()
        c.mail("ceo@elsewhere.example")
        c.rcpt("bob@example.com")
        code, text = c.data(message("CEO <ceo@bank.example>", "Pay the invoice"))
    assert code == 550 and text.startswith(b"5.7.1") and b"bank.example" in text
    assert stored(mx) == []


def test_listed_client_is_refused_at_connect(mx, dns_stub):
    dns_stub.add("1.0.0.127.bl.example", "A", "127.0.0.2")
    dns_stub.add("1.0.0.127.bl.example", "TXT", '"see https://bl.example/127.0.0.1"')
    with pytest.raises(smtplib.SMTPConnectError) as info:
        smtplib.SMTP("127.0.0.1", mx.port, local_hostname="client.example", timeout=10)
    assert info.value.smtp_code == 554
    assert b"bl.example" in info.value.smtp_error


def test_dmarc_quarantine_goes_to_the_quarantine_maildir(mx, dns_stub):
    dns_stub.add("_dmarc.shop.example", "TXT", '"v=DMARC1; p=quarantine"')
    with smtplib.SMTP("127.0.0.1", mx.port, local_hostname="client.example", timeout=10) as c:
        assert (
            c.sendmail("x@elsewhere.example", ["bob@example.com"], message("a@shop.example")) == {}
        )
    assert stored(mx) == []
    (content,) = stored(mx, "quarantine")
    msg = email.message_from_bytes(content)
    mark = " ".join(msg["X-Bonzo-Quarantine"].split())
    assert mark.startswith("dmarc: DMARC: neither SPF nor DKIM aligned with shop.example")
    assert mark.endswith("policy quarantine")

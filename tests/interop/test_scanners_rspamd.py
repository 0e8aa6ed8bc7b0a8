"""The rspamd plugin against a private rspamd (Debian's package, offline:
every DNS question goes to a stub on 127.0.0.1). rspamd's test patterns
choose its action: reject, add header, rewrite subject, no action; an
ordinary message is not refused."""

from __future__ import annotations

import email
import email.policy
import smtplib
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from bonzo_plugins.rspamd import RspamdPlugin
from dns_stub import DNSStub

from bonzo import Accept, hookimpl
from bonzo.hooks import PluginSet

from .peers import free_port, unavailable
from .scanners import Daemon, rspamd, rspamd_available

#: rspamd's GTUBE-like test patterns (enable_test_patterns): the first
#: letter chooses the action.
PATTERN = "JS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    if not rspamd_available():
        unavailable("rspamd is not installed (.ci/run installs it)")
    with DNSStub() as stub, rspamd(f"127.0.0.1:{stub.port}") as instance:
        yield instance


class Store:
    def __init__(self) -> None:
        self.delivered: list[bytes] = []
        self.results: list[object] = []

    @hookimpl
    def bonzo_rcpt(self, session, envelope, address):
        return Accept()

    @hookimpl
    def bonzo_deliver(self, session, envelope):
        self.delivered.append(envelope.content)
        return Accept()


def serve(start_server, **table):
    plugin = RspamdPlugin()
    plugin.bonzo_configure(config=table, app=SimpleNamespace(base_dir="."))
    store = Store()
    plugins = PluginSet(timeout=60.0)
    plugins.register(plugin, "rspamd")
    plugins.register(store, "store")
    return start_server(plugins=plugins), store


def message(text: str, subject: str = "test") -> bytes:
    return (
        f"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: {subject}\r\n"
        "Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <t1@example.org>\r\n"
        f"\r\n{text}\r\n"
    ).encode()


def test_actions(start_server, daemon):
    server, store = serve(start_server, url=f"http://127.0.0.1:{daemon.port}")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("alice@example.org", ["bob@example.com"], message("X" + PATTERN))
        assert info.value.smtp_code == 554 and info.value.smtp_error.startswith(b"5.7.1 ")
        assert b"Gtube pattern" in info.value.smtp_error
        ok = client.sendmail
        assert ok("alice@example.org", ["bob@example.com"], message("Y" + PATTERN, "one")) == {}
        assert ok("alice@example.org", ["bob@example.com"], message("Z" + PATTERN, "two")) == {}
        assert ok("alice@example.org", ["bob@example.com"], message("A" + PATTERN, "three")) == {}
    added, rewritten, clean = store.delivered
    assert b"\r\nX-Spam: Yes\r\n" in added and b"Subject: one\r\n" in added
    assert b"Subject: *** SPAM *** two\r\n" in rewritten and b"Subject: two\r\n" not in rewritten
    assert b"X-Spam" not in clean and b"Subject: three\r\n" in clean


def test_rewritten_subject_of_encoded_words_is_delivered(start_server, daemon):
    # Adjacent encoded words (each line short) decode to one word of 1,500
    # characters, which rspamd's rewritten subject carries: Bonzo encodes it
    # again to fold it (it was 451 4.3.0 at every attempt).
    words = "\r\n ".join("=?us-ascii?Q?" + "A" * 60 + "?=" for _ in range(25))
    server, store = serve(start_server, url=f"http://127.0.0.1:{daemon.port}")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        sent = message("Z" + PATTERN, words)
        assert client.sendmail("alice@example.org", ["bob@example.com"], sent) == {}
    (content,) = store.delivered
    head = content.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    subject = email.message_from_bytes(content, policy=email.policy.default)["Subject"]
    assert subject == "*** SPAM *** " + "A" * 1500


def test_ordinary_message_with_milter_headers(start_server, daemon):
    """Without reverse DNS an ordinary message may get ``greylist`` here;
    with greylisting off it passes, with X-Spam-Status from rspamd."""
    server, store = serve(start_server, url=f"http://127.0.0.1:{daemon.port}", greylist=False)
    text = "Hello Bob,\r\n\r\nsee you at lunch tomorrow.\r\n\r\nAlice"
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo("client.example.org")
        assert client.sendmail("alice@example.org", ["bob@example.com"], message(text)) == {}
    (content,) = store.delivered
    assert b"\r\nX-Spam-Status: No, score=" in content


def test_rspamd_down(start_server):
    server, store = serve(start_server, url=f"http://127.0.0.1:{free_port()}")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("alice@example.org", ["bob@example.com"], message("hi"))
    assert info.value.smtp_code == 451 and info.value.smtp_error.startswith(b"4.7.1 ")
    assert store.delivered == []

"""The spamassassin plugin against a private spamd (Debian's spamd, local
tests only): GTUBE is spam (and refused at reject_score), an ordinary
message gets SpamAssassin's headers, a stopped spamd defers."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from bonzo_plugins.spamassassin import SpamassassinPlugin

from bonzo import Accept, hookimpl
from bonzo.hooks import PluginSet

from .peers import free_port, unavailable
from .scanners import GTUBE, Daemon, spamd, spamd_available


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    if not spamd_available():
        unavailable("spamd is not installed (.ci/run installs spamd)")
    with spamd() as instance:
        yield instance


class Store:
    def __init__(self) -> None:
        self.delivered: list[bytes] = []

    @hookimpl
    def bonzo_rcpt(self, session, envelope, address):
        return Accept()

    @hookimpl
    def bonzo_deliver(self, session, envelope):
        self.delivered.append(envelope.content)
        return Accept()


def serve(start_server, **table):
    plugin = SpamassassinPlugin()
    plugin.bonzo_configure(config=table, app=SimpleNamespace(base_dir="."))
    store = Store()
    plugins = PluginSet(timeout=60.0)
    plugins.register(plugin, "spamassassin")
    plugins.register(store, "store")
    return start_server(plugins=plugins), store


def message(text: str) -> bytes:
    return (
        "From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: lunch\r\n"
        "Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <t1@example.org>\r\n"
        f"\r\n{text}\r\n"
    ).encode()


def test_gtube_tagged_then_refused_and_ham_passes(start_server, daemon):
    server, store = serve(start_server, port=daemon.port)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as client:
        assert client.sendmail("alice@example.org", ["bob@example.com"], message(GTUBE)) == {}
        ham = message("Hello Bob,\r\n\r\nsee you at lunch tomorrow.\r\n\r\nAlice")
        assert client.sendmail("alice@example.org", ["bob@example.com"], ham) == {}
    spam, clean = store.delivered
    assert b"\r\nX-Spam-Flag: YES\r\n" in spam
    # GTUBE scores 1000, give or take a local rule such as ALL_TRUSTED.
    assert re.search(rb"X-Spam-Status: Yes, score=(99\d|100\d)\.", spam) and b"GTUBE" in spam
    assert b"X-Spam-Status: No, score=" in clean and b"X-Spam-Flag: YES" not in clean

    server, store = serve(start_server, port=daemon.port, reject_score=20)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("alice@example.org", ["bob@example.com"], message(GTUBE))
    assert info.value.smtp_code == 554 and info.value.smtp_error.startswith(b"5.7.1 ")
    assert store.delivered == []


def test_forged_spam_headers_with_space_before_the_colon_are_removed(start_server, daemon):
    # "X-Spam-Flag : YES" is an X-Spam-Flag field to a mail reader (RFC 5322
    # 4.5.8): a sender must not make ham look checked and tagged with it.
    server, store = serve(start_server, port=daemon.port)
    forged = message("Hello Bob,\r\n\r\nsee you at lunch tomorrow.\r\n\r\nAlice").replace(
        b"\r\n\r\n", b"\r\nX-Spam-Flag : YES\r\nX-Spam-Status\t: Yes, score=50\r\n\r\n", 1
    )
    with smtplib.SMTP("127.0.0.1", server.port, timeout=60) as client:
        assert client.sendmail("alice@example.org", ["bob@example.com"], forged) == {}
    (delivered,) = store.delivered
    head = delivered.split(b"\r\n\r\n", 1)[0]
    assert re.findall(rb"(?mi)^x-spam-(?:flag|status)\b.*$", head) == [
        re.search(rb"(?m)^X-Spam-Status: No, score=.*$", head).group()  # spamd's own
    ]


def test_spamd_down(start_server):
    server, store = serve(start_server, port=free_port())
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("alice@example.org", ["bob@example.com"], message("hi"))
    assert info.value.smtp_code == 451 and info.value.smtp_error.startswith(b"4.7.1 ")

"""The policy plugin against a private postgrey: the first attempt is
greylisted (450), a retry after the delay is accepted with postgrey's
X-Greylist header; a stopped postgrey defers."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from bonzo_plugins.policy import PolicyPlugin

from bonzo import Accept, hookimpl
from bonzo.hooks import PluginSet

from .peers import free_port, unavailable
from .scanners import Daemon, postgrey, postgrey_available

DELAY = 2


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    if not postgrey_available():
        unavailable("postgrey is not installed (.ci/run installs it)")
    with postgrey(DELAY) as instance:
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
    plugin = PolicyPlugin()
    plugin.bonzo_configure(config=table, app=SimpleNamespace(base_dir="."))
    store = Store()
    plugins = PluginSet(timeout=60.0)
    plugins.register(plugin, "policy")
    plugins.register(store, "store")
    return start_server(plugins=plugins), store


MESSAGE = b"From: alice@example.org\r\nSubject: hello\r\n\r\nhello\r\n"


def test_greylisted_then_accepted_after_the_delay(start_server, daemon):
    server, store = serve(start_server, port=daemon.port)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo("client.example.org")
        assert client.mail("alice@example.org")[0] == 250
        code, text = client.rcpt("bob@example.com")
        assert code == 450 and text.startswith(b"4.7.1 Greylisted")
        client.rset()
        # Too early: still greylisted.
        client.mail("alice@example.org")
        assert client.rcpt("bob@example.com")[0] == 450
        client.rset()
        time.sleep(DELAY + 1)
        assert client.sendmail("alice@example.org", ["bob@example.com"], MESSAGE) == {}
        # Another sender is a new triplet.
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("carol@example.org", ["bob@example.com"], MESSAGE)
    (content,) = store.delivered
    assert b"\r\nX-Greylist: delayed " in content and b"by postgrey" in content


def test_postgrey_down(start_server):
    server, store = serve(start_server, port=free_port())
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("alice@example.org")
        code, text = client.rcpt("bob@example.com")
    assert code == 451 and text.startswith(b"4.7.1 ")

"""Tests of the bonzo-tagger plugin (examples/plugin_package), run with pytest."""

import asyncio
import contextlib
import smtplib
import threading

import pytest
from bonzo_tagger import TaggerPlugin
from tornado.testing import bind_unused_port

from bonzo import Accept
from bonzo.hooks import PluginSet
from bonzo.server import SMTPServer
from bonzo.session import Envelope
from bonzo.settings import SMTPSettings


# Unit tests: call the hooks with keyword arguments, as Bonzo does.
def test_tags_the_subject():
    plugin = TaggerPlugin()
    plugin.bonzo_configure(config={"keywords": ["invoice"]})
    envelope = Envelope("alice@example.org", rcpt_tos=["bob@example.com"])
    envelope.write(b"Subject: Your invoice\r\n\r\nHello\r\n")
    plugin.bonzo_message(envelope=envelope)
    assert envelope.content.startswith(b"X-Bonzo-Tag: invoice\r\nSubject: Your invoice\r\n")
    envelope.close()


def test_a_bad_table_is_refused():
    with pytest.raises(ValueError, match="^keywords: expected a list"):
        TaggerPlugin().bonzo_configure(config={"keywords": "invoice"})


# End to end: the plugin behind a real server on 127.0.0.1, driven by smtplib.
class Store:
    """Owns every recipient and keeps every message, as a delivery plugin would."""

    def __init__(self):
        self.messages = []

    def bonzo_rcpt(self):
        return Accept()

    def bonzo_deliver(self, envelope):
        self.messages.append(envelope.content)
        return Accept()


@contextlib.contextmanager
def running(*plugins):
    """Serve ``(name, plugin)`` pairs, in this order; yield the port."""
    plugin_set = PluginSet(timeout=5)
    for name, plugin in plugins:
        plugin_set.register(plugin, name)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sock, port = bind_unused_port()

    async def start():
        server = SMTPServer(plugins=plugin_set, settings=SMTPSettings())
        server.add_sockets([sock])
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(server.shutdown(1), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_refuses_a_forbidden_word_and_tags_the_rest():
    tagger, store = TaggerPlugin(), Store()
    tagger.bonzo_configure(config={"keywords": ["lottery"], "refuse": ["casino"]})
    with running(("tagger", tagger), ("store", store)) as port:
        with smtplib.SMTP("127.0.0.1", port) as client:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("a@example.org", ["b@example.com"], "Subject: hi\r\n\r\ncasino\r\n")
            assert refused.value.smtp_code == 550
            client.sendmail("a@example.org", ["b@example.com"], "Subject: lottery\r\n\r\nhi\r\n")
    (message,) = store.messages
    assert b"\r\nX-Bonzo-Tag: lottery\r\nSubject: lottery\r\n" in message

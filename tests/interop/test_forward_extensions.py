"""The ``forward`` plugin in front of a downstream without ``8BITMIME`` and
``SMTPUTF8`` (Postfix's ``smtp-sink -8``): a declaration the message does not
need is left out, and 8-bit content the downstream cannot take is refused
before ``DATA`` (there is no conversion to 7 bits)."""

from __future__ import annotations

import shutil
import smtplib
from types import SimpleNamespace

import pytest
from bonzo_plugins.forward import ForwardPlugin

from bonzo.hooks import PluginSet

from .test_client_sink import SINK, Sink

pytestmark = pytest.mark.timeout(120)

PLAIN = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: plain\r\n\r\nHello.\r\n"
EIGHT = PLAIN.replace(b"Hello.", "H\u00e9llo.".encode())


@pytest.fixture
def front(start_server):
    if not shutil.which(SINK):
        pytest.skip("Postfix's smtp-sink is not installed (.ci/run installs Postfix)")
    sink = Sink("-8")
    plugins = PluginSet(timeout=20.0)
    plugin = ForwardPlugin()
    settings = SimpleNamespace(hostname="gw.test")
    plugin.bonzo_configure(
        {"host": "127.0.0.1", "port": sink.port, "command_timeout": 5},
        SimpleNamespace(base_dir=".", settings=settings, dns=None),
    )
    plugins.register(plugin, "forward")
    yield start_server(plugins=plugins, hostname="gw.test")
    sink.stop()


def send(server, body: bytes, options: list[str]) -> tuple[int, bytes]:
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("a@example.org", options)[0] == 250
        assert client.rcpt("b@example.net")[0] == 250
        return client.data(body)


@pytest.mark.parametrize(
    "options", [["BODY=8BITMIME"], ["SMTPUTF8"], ["BODY=8BITMIME", "SMTPUTF8"], []]
)
def test_seven_bit_mail_goes_whatever_it_declared(front, options):
    code, text = send(front, PLAIN, options)
    assert code == 250 and b"forwarded" in text


def test_eight_bit_content_is_refused_before_data(front):
    # Declared or not: the downstream would get octets it did not agree to.
    for options, expected in (
        (["BODY=8BITMIME"], (554, b"5.6.3")),
        ([], (554, b"5.6.3")),
        # UTF-8 in the body needs 8BITMIME, not SMTPUTF8 (RFC 6532).
        (["BODY=8BITMIME", "SMTPUTF8"], (554, b"5.6.3")),
    ):
        code, text = send(front, EIGHT, options)
        assert (code, text.split()[0]) == expected, (options, text)
    # UTF-8 in a header field does need SMTPUTF8.
    utf8_header = EIGHT.replace(b"Subject: ", "Subject: caf\u00e9 ".encode(), 1)
    assert utf8_header != EIGHT
    for options, expected in ((["BODY=8BITMIME", "SMTPUTF8"], (553, b"5.6.7")),):
        code, text = send(front, utf8_header, options)
        assert (code, text.split()[0]) == expected, (options, text)


def test_a_utf8_recipient_is_refused_saying_why(front):
    """A client that declared SMTPUTF8 (left out for this downstream) and
    names a UTF-8 recipient: refused at RCPT with 553 5.6.7 saying the
    server lacks SMTPUTF8, not that the transaction did not declare it (the
    client did)."""
    with smtplib.SMTP(front.host, front.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("a@example.org", ["SMTPUTF8", "BODY=8BITMIME"])[0] == 250
        code, text = client.rcpt("jos\u00e9@example.net")
        assert code == 553 and text.startswith(b"5.6.7"), text
        assert b"does not support SMTPUTF8" in text, text
        assert b"not started with" not in text, text
        assert client.rcpt("jose@example.net")[0] == 250

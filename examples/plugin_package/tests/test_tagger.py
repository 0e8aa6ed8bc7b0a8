"""Tests of bonzo-tagger: unit tests of its hooks, and end to end through a
real server (bonzo.testing.PluginTestServer) driven by smtplib."""

import smtplib

import pytest
from bonzo_tagger import TaggerPlugin

from bonzo.session import Envelope
from bonzo.testing import PluginTestServer

MESSAGE = "From: a@example.org\r\nSubject: {subject}\r\n\r\n{body}\r\n"


def test_configuration_is_checked():
    with pytest.raises(ValueError, match="^keywords: expected a list"):
        TaggerPlugin().bonzo_configure(config={"keywords": "invoice"})
    with pytest.raises(ValueError, match="unknown key"):
        TaggerPlugin().bonzo_configure(config={"keyword": ["x"]})


def test_tags_the_subject_unit():
    plugin = TaggerPlugin()
    plugin.bonzo_configure(config={"keywords": ["invoice"], "header": "X-Tagged"})
    envelope = Envelope("a@example.org")
    envelope.write(b"Subject: Your Invoice\r\n\r\nHello\r\n")
    plugin.bonzo_message(envelope=envelope)
    assert envelope.content.startswith(b"X-Tagged: invoice\r\nSubject: Your Invoice\r\n")
    envelope.close()


@pytest.fixture
def server():
    config = {"tagger": {"keywords": ["invoice", "lottery"], "refuse": ["casino"]}}
    with PluginTestServer(("tagger", TaggerPlugin()), config=config) as running:
        yield running


def send(server, subject, body):
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        return client.sendmail(
            "a@example.org", ["b@example.com"], MESSAGE.format(subject=subject, body=body)
        )


def test_tagged_end_to_end(server):
    assert send(server, "Lottery invoice", "hello") == {}
    (message,) = server.messages
    assert message.startswith(b"Received: from ")
    assert b"\r\nX-Bonzo-Tag: invoice, lottery\r\nFrom: a@example.org\r\n" in message


def test_untagged_end_to_end(server):
    send(server, "Lunch", "hello")
    assert b"X-Bonzo-Tag" not in server.messages[0]


def test_refused_end_to_end(server):
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(server, "Hi", "Visit our CASINO")
    assert (info.value.smtp_code, info.value.smtp_error[:5]) == (550, b"5.7.1")
    assert server.messages == []


@pytest.mark.parametrize("charset", ["unknown-8bit", "x-no-such-charset"])
def test_a_charset_python_does_not_know_is_still_read(server, charset):
    # get_content() raises LookupError for it: the hook must not fail (451
    # at every attempt), and the forbidden word is still found.
    header = f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset={charset}\r\n"
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        body = (header + "\r\nplain \xe9t\xe9\r\n").encode("latin-1")  # not UTF-8
        client.sendmail("a@example.org", ["b@example.com"], body)
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@example.org", ["b@example.com"], header + "\r\nA casino\r\n")
    assert info.value.smtp_code == 550
    assert len(server.messages) == 1

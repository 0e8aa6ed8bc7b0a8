"""The spamassassin plugin against a scripted spamd: the SPAMC request,
verdicts, headers, and every way spamd can fail. The real spamd:
tests/interop/test_scanners_spamassassin.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import plugin_testing
import pytest
from bonzo_plugins._scan import Endpoint, ScanError
from bonzo_plugins.spamassassin import SpamassassinPlugin, parse_reply, spamd_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plugin_testing import make_session
from scan_fakes import FakeDaemon, free_port, recv_exactly, recv_until, results_of

from bonzo.errors import SMTPError

ENVELOPES: list = []


@pytest.fixture(autouse=True)
def _close_envelopes():
    yield
    while ENVELOPES:
        ENVELOPES.pop().close()


def make_envelope(*args, **kwargs):
    envelope = plugin_testing.make_envelope(*args, **kwargs)
    ENVELOPES.append(envelope)
    return envelope


def configured(**table):
    plugin = SpamassassinPlugin()
    plugin.bonzo_configure(config=table, app=SimpleNamespace(base_dir="."))
    return plugin


STATUS = "Yes, score=7.2 required=5.0 tests=FOO,\r\n\tBAR_BAZ autolearn=no\r\n\tversion=4.0.1"


def spamd(answer: bytes, seen: list | None = None, delay: float = 0):
    def handler(conn):
        head = recv_until(conn, b"\r\n\r\n")
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("ascii").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:])
        length = int(fields["Content-length"])
        data = rest + recv_exactly(conn, length - len(rest))
        if seen is not None:
            seen.append((lines[0], fields, data))
        time.sleep(delay)
        conn.sendall(answer)

    return handler


def headers_answer(spam: bool, score: float, extra: str = "") -> bytes:
    body = (
        "Received: from localhost by test\r\n\twith SpamAssassin;\r\n"
        "Subject: hi\r\n"
        f"X-Spam-Flag: {'YES' if spam else 'NO'}\r\n"
        f"X-Spam-Status: {STATUS if spam else 'No, score=0.1 required=5.0 tests=NONE'}\r\n"
        f"{extra}\r\n"
    ).encode()
    return (
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: %s ; %.1f / 5.0\r\n\r\n"
        % (len(body), b"True" if spam else b"False", score)
        + body
    )


def check(plugin, envelope):
    return asyncio.run(plugin.bonzo_message(make_session(), envelope))


def test_ham_gets_spamassassins_headers():
    seen: list = []
    envelope = make_envelope(b"Subject: hi\r\nX-Spam-Flag: YES\r\n\r\nhello\r\n")
    envelope.add_header("Received", "from test")
    with FakeDaemon(spamd(headers_answer(False, 0.1), seen)) as fake:
        assert check(configured(port=fake.port, user="mail"), envelope) is None
    ((line, fields, data),) = seen
    assert line == "HEADERS SPAMC/1.5" and fields["User"] == "mail"
    assert data.startswith(b"Received: from test\r\nSubject: hi\r\nX-Spam-Flag: YES\r\n")
    content = envelope.content
    assert content.count(b"X-Spam-Flag") == 1 and b"X-Spam-Flag: NO\r\n" in content
    assert b"with SpamAssassin" not in content  # only X-Spam-* headers are taken
    ((result, reason, details),) = results_of(envelope, "spamassassin")
    assert (result, reason) == ("pass", "ham")
    assert details == {"score": 0.1, "threshold": 5.0, "tests": ["NONE"]}


def test_spam_is_tagged_with_folded_status():
    envelope = make_envelope()
    with FakeDaemon(spamd(headers_answer(True, 7.2))) as fake:
        assert check(configured(port=fake.port), envelope) is None
    assert b"X-Spam-Status: " + STATUS.encode() + b"\r\n" in envelope.content
    ((result, _, details),) = results_of(envelope, "spamassassin")
    assert result == "spam" and details["tests"] == ["FOO", "BAR_BAZ"]


def test_reject_score():
    envelope = make_envelope()
    with FakeDaemon(spamd(headers_answer(True, 7.2))) as fake:
        with pytest.raises(SMTPError) as info:
            check(configured(port=fake.port, reject_score=7), envelope)
    assert (info.value.status_code, info.value.enhanced_code) == (554, "5.7.1")
    assert results_of(envelope, "spamassassin")[0][0] == "reject"
    envelope = make_envelope()
    with FakeDaemon(spamd(headers_answer(True, 7.2))) as fake:
        assert check(configured(port=fake.port, reject_score=7.5), envelope) is None


def test_check_without_headers():
    seen: list = []
    envelope = make_envelope()
    answer = b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 6.0 / 5.0\r\n\r\n"
    with FakeDaemon(spamd(answer, seen)) as fake:
        assert check(configured(port=fake.port, headers=False), envelope) is None
    assert seen[0][0] == "CHECK SPAMC/1.5"
    assert b"X-Spam" not in envelope.content
    assert results_of(envelope, "spamassassin")[0][:2] == ("spam", "spam")


def test_spamd_down_fails_closed():
    envelope = make_envelope()
    with pytest.raises(SMTPError) as info:
        check(configured(port=free_port()), envelope)
    assert (info.value.status_code, info.value.enhanced_code) == (451, "4.7.1")
    assert results_of(envelope, "spamassassin")[0][0] == "error"


def test_spamd_down_with_on_error_accept():
    envelope = make_envelope()
    assert check(configured(port=free_port(), on_error="accept"), envelope) is None
    assert results_of(envelope, "spamassassin")[0][0] == "error"


def test_slow_spamd_times_out():
    envelope = make_envelope()
    with FakeDaemon(spamd(headers_answer(False, 0), delay=3)) as fake:
        started = time.monotonic()
        with pytest.raises(SMTPError):
            check(configured(port=fake.port, timeout=0.5), envelope)
        assert time.monotonic() - started < 2.5


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"SPAMD/1.1 76 Bad header line: (EX_PROTOCOL)\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nSpam: Maybe ; 1 / 5\r\n\r\n",
        b"SPAMD/1.1 0 EX_OK\r\nContent-length: 100\r\nSpam: False ; 1.0 / 5.0\r\n\r\nshort",
        b"SPAMD/1.1 0 EX_OK\r\n" + b"x" * (2 << 20),
    ],
    ids=["empty", "http", "error", "no-spam-line", "bad-spam-line", "short", "long"],
)
def test_garbage_answer_fails_closed(answer):
    envelope = make_envelope()
    with FakeDaemon(spamd(answer)) as fake:
        with pytest.raises(SMTPError) as info:
            check(configured(port=fake.port), envelope)
    assert info.value.status_code == 451
    assert results_of(envelope, "spamassassin")[0][0] == "error"


def test_message_over_max_size_is_not_checked():
    envelope = make_envelope(b"Subject: x\r\n\r\n" + b"z" * 5000)
    with FakeDaemon(spamd(headers_answer(True, 100))) as fake:
        assert check(configured(port=fake.port, max_size=4096), envelope) is None
    assert fake.connections == 0
    assert results_of(envelope, "spamassassin")[0][:2] == ("skip", "too large")


def test_unix_socket(tmp_path):
    path = str(tmp_path / "spamd.sock")
    with FakeDaemon(spamd(headers_answer(False, 0)), unix=path):
        reply = asyncio.run(spamd_request(Endpoint(path=path), 3, _chunks(b"abc"), timeout=5))
    assert not reply.spam and reply.threshold == 5.0


async def _chunks(data: bytes):
    yield data


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=500))
def test_parse_reply_never_fails_otherwise(raw):
    try:
        reply = parse_reply(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1 / 5\r\n\r\n" + raw)
    except ScanError:
        return
    for name, value in reply.headers:
        assert name.lower().startswith("x-spam-")
        assert all(line[:1] in (" ", "\t") for line in value.split("\r\n")[1:])


@pytest.mark.parametrize(
    "table, message",
    [
        ({"reject_score": "10"}, "^reject_score: expected a number, got '10'$"),
        ({"reject_score": -1}, "^reject_score: expected a number >= 0, got -1$"),
        ({"user": "a b"}, "^user: 'a b' is not a user name spamd accepts$"),
        ({"user": 5}, "^user: expected a non-empty string, got 5$"),
        ({"headers": 1}, "headers: expected true or false"),
        ({"port": 70000}, "^port: expected an integer <= 65535, got 70000$"),
        ({"socket": "/s", "host": "h"}, "^host: give socket or host, not socket and host$"),
        ({"threshold": 5}, "threshold: unknown key"),
    ],
)
def test_configuration_errors(table, message):
    with pytest.raises(ValueError, match=message):
        configured(**table)


def test_configuration_values():
    assert configured(user="").user == "" and configured(user=" ").user == ""
    assert configured(user=" mail@example.com ").user == "mail@example.com"
    plugin = configured(reject_score=15, max_size="1M")
    assert (plugin.reject_score, plugin.max_size) == (15.0, 1024 * 1024)
    assert configured().max_size == 500 * 1024

"""The clamav plugin against scripted clamd daemons: the INSTREAM framing,
verdicts, and every way clamd can fail (down, slow, garbage, its size limit).
The real clamd: tests/interop/test_scanners_clamav.py."""

from __future__ import annotations

import asyncio
import smtplib
import struct
import time
from types import SimpleNamespace

import plugin_testing
import pytest
from bonzo_plugins._scan import Endpoint, ScanError
from bonzo_plugins.clamav import ClamavPlugin, instream
from bonzo_plugins.clamav.client import parse_reply
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plugin_testing import make_session, serve
from scan_fakes import FakeDaemon, free_port, recv_exactly, results_of

from bonzo import Accept, hookimpl
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
    plugin = ClamavPlugin()
    plugin.bonzo_configure(config=table, app=SimpleNamespace(base_dir="."))
    return plugin


def clamd(reply: bytes, seen: list[bytes] | None = None, chunks: list[int] | None = None):
    """A clamd that reads one INSTREAM and answers ``reply``."""

    def handler(conn):
        assert recv_exactly(conn, 10) == b"zINSTREAM\0"
        data = b""
        while True:
            (size,) = struct.unpack(">I", recv_exactly(conn, 4))
            if size == 0:
                break
            if chunks is not None:
                chunks.append(size)
            data += recv_exactly(conn, size)
        if seen is not None:
            seen.append(data)
        conn.sendall(reply)

    return handler


def scan(plugin, envelope, session=None):
    return asyncio.run(plugin.bonzo_message(session or make_session(), envelope))


def test_clean_message_streams_whole_and_passes():
    seen: list[bytes] = []
    chunks: list[int] = []
    body = b"Subject: hello\r\n\r\n" + b"x" * 200_000 + b"\r\n"
    envelope = make_envelope(body, spool_threshold=1024)  # spooled to a file
    envelope.add_header("Received", "from test")
    with FakeDaemon(clamd(b"stream: OK\0", seen, chunks)) as fake:
        assert scan(configured(port=fake.port), envelope) is None
    assert seen == [envelope.content]
    assert max(chunks) <= 64 * 1024 and len(chunks) >= 4
    assert results_of(envelope, "clamav") == [("pass", "", {})]


def test_the_daemon_scans_the_header_split_every_reader_sees():
    """A line that is no header field, with fields after it: the blank line
    the envelope puts there (for every reader) is in the content before the
    scan, so the daemon scans the octets that are delivered."""
    seen: list[bytes] = []
    envelope = make_envelope(b"Subject: x\r\nnot a field\r\nFrom: ceo@bank.example\r\n\r\nBody\r\n")
    with FakeDaemon(clamd(b"stream: OK\0", seen)) as fake:
        assert scan(configured(port=fake.port), envelope) is None
    assert seen == [envelope.content]
    assert b"Subject: x\r\n\r\nnot a field\r\nFrom: ceo@bank.example\r\n" in seen[0]


def test_virus_is_refused_with_the_signature():
    envelope = make_envelope()
    with FakeDaemon(clamd(b"stream: Eicar-Test-Signature FOUND\0")) as fake:
        with pytest.raises(SMTPError) as info:
            scan(configured(port=fake.port), envelope)
    assert (info.value.status_code, info.value.enhanced_code) == (554, "5.7.1")
    assert "Eicar-Test-Signature" in info.value.message
    assert results_of(envelope, "clamav") == [
        ("fail", "virus found", {"signature": "Eicar-Test-Signature"})
    ]


def test_signature_name_is_sanitised():
    envelope = make_envelope()
    with FakeDaemon(clamd(b'stream: Evil<script> \x1b[0m"x FOUND\0')) as fake:
        with pytest.raises(SMTPError):
            scan(configured(port=fake.port), envelope)
    # Control characters make the whole answer garbage; printable oddities
    # are replaced.
    envelope = make_envelope()
    with FakeDaemon(clamd(b"stream: Evil<b>\"x';y FOUND\0")) as fake:
        with pytest.raises(SMTPError) as info:
            scan(configured(port=fake.port), envelope)
    assert info.value.status_code == 554
    assert "Evil?b??x??y" in info.value.message
    assert results_of(envelope, "clamav")[0][2] == {"signature": "Evil?b??x??y"}


def test_unix_socket(tmp_path):
    path = str(tmp_path / "clamd.ctl")
    with FakeDaemon(clamd(b"stream: OK\0"), unix=path) as fake:
        envelope = make_envelope()
        assert scan(configured(socket=path), envelope) is None
    assert fake.connections == 1
    assert results_of(envelope, "clamav")[0][0] == "pass"


def test_clamd_down_fails_closed():
    envelope = make_envelope()
    with pytest.raises(SMTPError) as info:
        scan(configured(port=free_port()), envelope)
    assert (info.value.status_code, info.value.enhanced_code) == (451, "4.7.1")
    assert "refused" not in info.value.message.lower()
    ((result, reason, _),) = results_of(envelope, "clamav")
    assert result == "error" and "cannot connect" in reason


def test_clamd_down_with_on_error_accept_passes():
    envelope = make_envelope()
    assert scan(configured(port=free_port(), on_error="accept"), envelope) is None
    assert results_of(envelope, "clamav")[0][0] == "error"


def test_clamd_that_never_answers_times_out():
    def silent(conn):
        time.sleep(3)

    envelope = make_envelope()
    with FakeDaemon(silent) as fake:
        started = time.monotonic()
        with pytest.raises(SMTPError) as info:
            scan(configured(port=fake.port, timeout=0.5), envelope)
        assert time.monotonic() - started < 2.5
    assert info.value.status_code == 451
    assert "no answer within 0.5s" in results_of(envelope, "clamav")[0][1]


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # closed without a word
        b"stream: maybe\0",
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"stream: \xff\xfe FOUND\0",
        b"x" * 10_000,  # no end in sight
        b"INSTREAM size limit exceeded. ERROR\0",
    ],
)
def test_garbage_or_error_reply_fails_closed(reply):
    envelope = make_envelope()
    with FakeDaemon(clamd(reply)) as fake:
        with pytest.raises(SMTPError) as info:
            scan(configured(port=fake.port), envelope)
    assert info.value.status_code == 451
    assert results_of(envelope, "clamav")[0][0] == "error"


def at_limit(answer: bytes, drain: bool = False):
    """A clamd that reads 1,000 octets of the stream, answers ``answer``
    (nothing: b""), then closes — or, with ``drain``, reads on to the end."""

    def handler(conn):
        recv_exactly(conn, 10)
        recv_exactly(conn, 4 + 1000)
        conn.sendall(answer)
        while drain and conn.recv(1 << 16):
            pass

    return handler


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_clamd_closing_at_its_size_limit_is_an_error_not_a_hang(transport, tmp_path):
    """clamd answers and closes as soon as the stream passes StreamMaxLength:
    its answer is read (and logged), over a Unix socket or TCP alike, not a
    bare broken pipe."""
    path = str(tmp_path / "clamd.ctl")
    envelope = make_envelope(b"Subject: x\r\n\r\n" + b"y" * 3_000_000, spool_threshold=4096)
    limited = at_limit(b"INSTREAM size limit exceeded. ERROR\0")
    with FakeDaemon(limited, unix=path if transport == "unix" else None) as fake:
        where = {"socket": path} if transport == "unix" else {"port": fake.port}
        with pytest.raises(SMTPError) as info:
            scan(configured(**where, timeout=5), envelope)
    assert info.value.status_code == 451
    ((result, reason, _),) = results_of(envelope, "clamav")
    assert result == "error"
    assert reason.endswith(
        "clamd: INSTREAM size limit exceeded. ERROR"
        " (StreamMaxLength in clamd.conf is below the plugin's max_size)"
    )


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_clamd_closing_early_without_an_answer_names_the_likely_cause(transport, tmp_path):
    path = str(tmp_path / "clamd.ctl")
    envelope = make_envelope(b"Subject: x\r\n\r\n" + b"y" * 3_000_000, spool_threshold=4096)
    with FakeDaemon(at_limit(b""), unix=path if transport == "unix" else None) as fake:
        where = {"socket": path} if transport == "unix" else {"port": fake.port}
        started = time.monotonic()
        with pytest.raises(SMTPError):
            scan(configured(**where, timeout=10), envelope)
    assert time.monotonic() - started < 5  # the wait for an answer is short
    ((result, reason, _),) = results_of(envelope, "clamav")
    assert result == "error" and "clamd closed the stream early (" in reason
    assert "a StreamMaxLength in clamd.conf below the plugin's max_size" in reason


def test_a_verdict_before_the_end_of_the_stream_is_none(tmp_path):
    # A clamd (or something in its place) that answers before the stream
    # ended has not seen the message: no pass on it. (Over a Unix socket,
    # whose small buffer cannot hold the whole stream before the answer.)
    path = str(tmp_path / "clamd.ctl")
    envelope = make_envelope(b"Subject: x\r\n\r\n" + b"y" * 3_000_000, spool_threshold=4096)
    with FakeDaemon(at_limit(b"stream: OK\0", drain=True), unix=path):
        with pytest.raises(SMTPError) as info:
            scan(configured(socket=path, timeout=5), envelope)
    assert info.value.status_code == 451
    ((result, reason, _),) = results_of(envelope, "clamav")
    assert result == "error" and "answered before the end of the stream" in reason


def test_message_over_max_size_is_not_scanned():
    envelope = make_envelope(b"Subject: x\r\n\r\n" + b"z" * 5000)
    with FakeDaemon(clamd(b"stream: OK\0")) as fake:
        assert scan(configured(port=fake.port, max_size="4K"), envelope) is None
    assert fake.connections == 0
    assert results_of(envelope, "clamav")[0][:2] == ("skip", "too large")


def test_through_a_server():
    class Deliver:
        delivered: list[bytes] = []

        @hookimpl
        def bonzo_rcpt(self, session, envelope, address):
            return Accept()

        @hookimpl
        def bonzo_deliver(self, session, envelope):
            self.delivered.append(envelope.content)
            return Accept()

    replies = iter([b"stream: OK\0", b"stream: Bad.Thing FOUND\0"])

    def scripted(conn):
        clamd(next(replies))(conn)

    with FakeDaemon(scripted) as fake:
        plugin = configured(port=fake.port)
        with serve(("clamav", plugin), ("deliver", Deliver())) as server, server.client() as c:
            assert c.sendmail("a@example.org", ["b@example.com"], b"Subject: 1\r\n\r\nok\r\n") == {}
            with pytest.raises(smtplib.SMTPDataError) as info:
                c.sendmail("a@example.org", ["b@example.com"], b"Subject: 2\r\n\r\nbad\r\n")
    assert info.value.smtp_code == 554
    assert b"5.7.1" in info.value.smtp_error and b"Bad.Thing" in info.value.smtp_error
    assert len(Deliver.delivered) == 1 and b"Subject: 1" in Deliver.delivered[0]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_parse_reply_never_fails_otherwise(raw):
    try:
        reply = parse_reply(raw)
    except ScanError:
        return
    assert reply.signature is None or reply.signature.isprintable()


def test_instream_directly():
    async def chunks():
        yield b"abc"
        yield b""
        yield b"def"

    seen: list[bytes] = []
    with FakeDaemon(clamd(b"stream: OK\0", seen)) as fake:
        reply = asyncio.run(instream(Endpoint(port=fake.port), chunks(), timeout=5))
    assert not reply.infected and seen == [b"abcdef"]


@pytest.mark.parametrize(
    "table, message",
    [
        ({"port": 0}, "^port: expected an integer >= 1, got 0$"),
        ({"port": 65536}, "^port: expected an integer <= 65535"),
        ({"port": "3310"}, "^port: expected an integer, got '3310'$"),
        ({"socket": "/x", "port": 1}, "^port: give socket or port, not socket and port$"),
        ({"socket": "/x", "host": "h"}, "^host: give socket or host, not socket and host$"),
        ({"timeout": 0}, "^timeout: expected more than 0 seconds, got 0.0$"),
        ({"timeout": float("nan")}, "^timeout: expected a finite number, got nan$"),
        ({"timeout": 3601}, "^timeout: expected a number <= 3600"),
        ({"connect_timeout": 301}, "^connect_timeout: expected a number <= 300"),
        ({"timeout": "5 lots"}, "^timeout: expected a duration"),
        ({"max_size": "lots"}, "^max_size: expected a size"),
        ({"max_size": -1}, "^max_size: expected a size >= 1, got -1$"),
        ({"on_error": "pass"}, "^on_error: expected one of 'tempfail', 'accept', got 'pass'$"),
        ({"hots": "x"}, "^hots: unknown key \\(did you mean 'host'\\?\\)$"),
    ],
)
def test_configuration_errors(table, message):
    with pytest.raises(ValueError, match=message):
        configured(**table)


def test_configuration_defaults_and_sizes():
    plugin = configured()
    assert (plugin.endpoint.host, plugin.endpoint.port) == ("127.0.0.1", 3310)
    assert plugin.max_size == 25 * 1024 * 1024 and not plugin.accept_on_error
    assert configured(max_size="100M").max_size == 100 * 1024 * 1024
    assert configured(max_size=1000).max_size == 1000
    assert configured(host="[::1]", port=1).endpoint == Endpoint("::1", 1)
    assert configured(socket="/run/c.ctl").endpoint == Endpoint(path="/run/c.ctl")
    plugin = configured(timeout="2m", connect_timeout=1)
    assert (plugin.timeout, plugin.connect_timeout) == (120.0, 1)

"""The rspamd plugin against a scripted rspamd (HTTP /checkv2): the request,
each action, header changes, and every way rspamd can fail. The real
rspamd: tests/interop/test_scanners_rspamd.py."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from types import SimpleNamespace

import plugin_testing
import pytest
from bonzo_plugins._scan import ScanError
from bonzo_plugins.rspamd import RspamdPlugin, parse_reply
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plugin_testing import make_session, serve
from scan_fakes import FakeDaemon, free_port, recv_exactly, recv_until, results_of

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


class Store:
    """Accepts every recipient; keeps what is delivered, with the changes
    made to it, and what is quarantined, in ``got``."""

    def __init__(self) -> None:
        self.got: list[tuple] = []

    @hookimpl
    def bonzo_rcpt(self, session, envelope, address):
        return Accept()

    @hookimpl
    def bonzo_deliver(self, session, envelope):
        changes = [(c.plugin, c.action, c.detail) for c in envelope.changes]
        self.got.append(("delivered", envelope.content, changes))
        return Accept()

    @hookimpl
    def bonzo_quarantine(self, session, envelope, reason):
        self.got.append(("quarantined", reason, envelope.content))
        return Accept()


def configured(**table):
    plugin = RspamdPlugin()
    plugin.bonzo_configure(config=table, app=SimpleNamespace(base_dir="."))
    return plugin


def http(answer: dict | bytes, status: int = 200, seen: list | None = None, delay: float = 0):
    """An rspamd that reads one request and answers ``answer``."""
    body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()

    def handler(conn):
        head = recv_until(conn, b"\r\n\r\n")
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
        length = int(dict((k.lower(), v) for k, v in headers)["content-length"])
        data = rest + recv_exactly(conn, length - len(rest))
        if seen is not None:
            seen.append((lines[0], headers, data))
        time.sleep(delay)
        conn.sendall(
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % (status, len(body)) + body
        )

    return handler


def raw_http(reply: bytes):
    """An rspamd (or something in its place) that reads one request and
    answers ``reply``, whatever it is, then closes."""

    def handler(conn):
        head, _, rest = recv_until(conn, b"\r\n\r\n").partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        recv_exactly(conn, length - len(rest))
        conn.sendall(reply)

    return handler


def check(plugin, envelope, session=None):
    return asyncio.run(plugin.bonzo_message(session or make_session(auth="alice"), envelope))


def answer(action: str, score: float = 1.0, **extra) -> dict:
    return {"action": action, "score": score, "required_score": 15.0, "symbols": {}, **extra}


def test_request_carries_the_envelope_and_the_whole_message():
    seen: list = []
    body = b"Subject: hello\r\n\r\n" + b"x" * 300_000 + b"\r\n"
    envelope = make_envelope(
        body, rcpt_tos=["a@example.com", "b@example.com"], spool_threshold=1000
    )
    envelope.add_header("Received", "from test")
    with FakeDaemon(http(answer("no action"), seen=seen)) as fake:
        assert check(configured(url=f"http://127.0.0.1:{fake.port}"), envelope) is None
    ((start, headers, data),) = seen
    assert start == "POST /checkv2 HTTP/1.1"
    assert data == envelope.content
    got = [(k.lower(), v) for k, v in headers]
    for pair in [
        ("ip", "192.0.2.10"),
        ("helo", "client.example"),
        ("from", "sender@example.net"),
        ("rcpt", "a@example.com"),
        ("rcpt", "b@example.com"),
        ("queue-id", envelope.id),
        ("user", "alice"),
    ]:
        assert pair in got
    assert results_of(envelope, "rspamd") == [
        ("pass", "no action", {"score": 1.0, "required_score": 15.0, "symbols": []})
    ]


@pytest.mark.parametrize(
    "action, code, enhanced",
    [("reject", 554, "5.7.1"), ("soft reject", 451, "4.7.1"), ("greylist", 451, "4.7.1")],
)
def test_refusing_actions(action, code, enhanced):
    envelope = make_envelope()
    reply = answer(action, 20.0, symbols={"GTUBE": {"score": 0}})
    with FakeDaemon(http(reply)) as fake:
        with pytest.raises(SMTPError) as info:
            check(configured(url=f"http://127.0.0.1:{fake.port}/"), envelope)
    assert (info.value.status_code, info.value.enhanced_code) == (code, enhanced)
    ((result, reason, details),) = results_of(envelope, "rspamd")
    assert (result, reason) == (action.replace(" ", "_"), action)
    assert details["score"] == 20.0 and details["symbols"] == ["GTUBE"]


def test_reject_uses_rspamds_message_sanitised():
    envelope = make_envelope()
    reply = answer("reject", messages={"smtp_message": "Go away\r\n250 ok \x00 now"})
    with FakeDaemon(http(reply)) as fake:
        with pytest.raises(SMTPError) as info:
            check(configured(url=f"http://127.0.0.1:{fake.port}"), envelope)
    assert info.value.message == "Go away??250 ok ? now"


def test_greylist_can_be_ignored():
    envelope = make_envelope()
    with FakeDaemon(http(answer("greylist"))) as fake:
        assert (
            check(configured(url=f"http://127.0.0.1:{fake.port}", greylist=False), envelope) is None
        )
    assert results_of(envelope, "rspamd")[0][:2] == ("pass", "greylist")


def test_add_header_and_milter_headers():
    # White space before the colon (RFC 5322's obsolete form) is the same name.
    envelope = make_envelope(
        b"Subject: hi\r\nX-Spam: forged\r\nX-Old: 1\r\nX-Spam : forged\r\nX-Old\t: 2\r\n"
        b"\r\nbody\r\n"
    )
    reply = answer(
        "add header",
        7.5,
        milter={
            "add_headers": {
                "X-Spam-Status": {"value": "Yes, score=7.5", "order": 0},
                "X-Evil": "a\r\nInjected: yes",
                "Bad Name": "x",
                "X-Two": ["1", {"value": "2"}],
            },
            "remove_headers": {"X-Old": 0, "X-Spam": 0},
        },
    )
    with FakeDaemon(http(reply)) as fake:
        assert check(configured(url=f"http://127.0.0.1:{fake.port}"), envelope) is None
    content = envelope.content
    assert b"X-Spam-Status: Yes, score=7.5\r\n" in content
    assert b"X-Two: 1\r\n" in content and b"X-Two: 2\r\n" in content
    assert b"Injected" not in content and b"Bad Name" not in content
    assert b"X-Old" not in content and b"forged" not in content
    assert content.count(b"X-Spam: Yes\r\n") == 1
    assert results_of(envelope, "rspamd")[0][0] == "add_header"


def test_spam_header_can_be_turned_off():
    envelope = make_envelope()
    with FakeDaemon(http(answer("add header"))) as fake:
        check(configured(url=f"http://127.0.0.1:{fake.port}", spam_header=""), envelope)
    assert b"X-Spam" not in envelope.content


def test_rewrite_subject():
    envelope = make_envelope(b"Subject: hello\r\nTo: x@example.com\r\n\r\nbody\r\n")
    reply = answer("rewrite subject", subject="*** SPAM *** hello")
    with FakeDaemon(http(reply)) as fake:
        assert check(configured(url=f"http://127.0.0.1:{fake.port}"), envelope) is None
    content = envelope.content
    assert content.count(b"Subject:") == 1
    assert b"Subject: *** SPAM *** hello\r\n" in content


def test_a_header_that_cannot_be_written_is_skipped_and_logged(caplog):
    # rspamd folds its own headers; a custom milter_headers routine or a
    # proxy may not: the header is left out, the rest applies, the message
    # goes on (it was deferred for ever with 451 4.3.0).
    envelope = make_envelope(b"Subject: hello\r\nX-Old: 1\r\n\r\nbody\r\n")
    milter = {
        "add_headers": {"X-Custom": "v=" + "A" * 1500, "X-Bad": "\ud800", "X-Fine": "ok"},
        "remove_headers": {"X-Old": 0},
    }
    reply = answer("rewrite subject", subject="\ud800 broken", milter=milter)
    with FakeDaemon(http(reply)) as fake, caplog.at_level(logging.INFO, "bonzo.plugins.rspamd"):
        assert check(configured(url=f"http://127.0.0.1:{fake.port}"), envelope) is None
    content = envelope.content
    assert b"X-Fine: ok\r\n" in content and b"Subject: hello\r\n" in content
    assert b"X-Custom" not in content and b"X-Bad" not in content and b"X-Old" not in content
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert f"message {envelope.id}: header X-Custom not added: " in warnings[0]
    assert "1512 octets with no space to fold" in warnings[0]
    assert "header X-Bad not added" in warnings[1]
    assert "Subject not rewritten" in warnings[2]


@pytest.mark.parametrize("smtputf8", [False, True])
def test_a_rewritten_subject_too_long_to_fold_is_encoded(smtputf8, caplog):
    # The words too long for a line become RFC 2047 encoded words (the text
    # a reader sees is rspamd's subject); the others stay as they are. (A
    # subject that is not ASCII is encoded whole unless the message is
    # SMTPUTF8, which lets a long UTF-8 word through to this point.)
    envelope = make_envelope(b"Subject: hello\r\nTo: x@example.com\r\n\r\nbody\r\n")
    if smtputf8:
        envelope.mail_params["SMTPUTF8"] = None
    subject = "***SPAM*** " + "B" * 1500 + " tail" + (" " + "\u00e9" * 600 if smtputf8 else "")
    with FakeDaemon(http(answer("rewrite subject", subject=subject))) as fake:
        with caplog.at_level(logging.INFO, "bonzo.plugins.rspamd"):
            assert check(configured(url=f"http://127.0.0.1:{fake.port}"), envelope) is None
    head = envelope.content.split(b"\r\n\r\n")[0]
    assert head.startswith(b"Subject: ***SPAM*** =?utf-8?q?BBB")
    assert b"?= tail" in head
    assert max(len(line) for line in head.split(b"\r\n")) <= 100
    assert envelope.message["Subject"] == subject
    assert "written as RFC 2047 encoded words" in caplog.text


def test_rspamd_down_fails_closed():
    envelope = make_envelope()
    with pytest.raises(SMTPError) as info:
        check(configured(url=f"http://127.0.0.1:{free_port()}"), envelope)
    assert (info.value.status_code, info.value.enhanced_code) == (451, "4.7.1")
    assert results_of(envelope, "rspamd")[0][0] == "error"


def test_rspamd_down_with_on_error_accept():
    envelope = make_envelope()
    plugin = configured(url=f"http://127.0.0.1:{free_port()}", on_error="accept")
    assert check(plugin, envelope) is None
    assert results_of(envelope, "rspamd")[0][0] == "error"


def test_slow_rspamd_times_out():
    envelope = make_envelope()
    with FakeDaemon(http(answer("no action"), delay=3)) as fake:
        started = time.monotonic()
        with pytest.raises(SMTPError) as info:
            check(configured(url=f"http://127.0.0.1:{fake.port}", timeout=0.5), envelope)
        assert time.monotonic() - started < 2.5
    assert info.value.status_code == 451


@pytest.mark.parametrize(
    "body, status",
    [
        (b"not json", 200),
        (b"[1, 2]", 200),
        (b'{"action": "explode", "score": 1}', 200),
        (b'{"action": "reject", "score": "high"}', 200),
        (b'{"action": "reject", "score": NaN}', 200),
        (b'{"error": "bad"}', 500),
        (b"x" * (2 << 20), 200),  # longer than the plugin reads
    ],
    ids=["text", "list", "action", "score", "nan", "500", "long"],
)
def test_garbage_reply_fails_closed(body, status):
    envelope = make_envelope()
    with FakeDaemon(http(body, status)) as fake:
        with pytest.raises(SMTPError) as info:
            check(configured(url=f"http://127.0.0.1:{fake.port}"), envelope)
    assert info.value.status_code == 451
    assert results_of(envelope, "rspamd")[0][0] == "error"


MALFORMED = {
    # A header section that never ends (past Tornado's 64 KiB bound).
    "endless header": b"HTTP/1.1 200 OK\r\nX: " + b"A" * (200 << 10),
    "bad status line": b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n",
    "bad content-length": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}",
}


@pytest.mark.parametrize("reply", MALFORMED.values(), ids=MALFORMED.keys())
def test_an_answer_that_is_not_http_is_an_error(reply, caplog):
    # Whatever Tornado raises for it, it is rspamd's failure to answer: the
    # result error, a WARNING naming rspamd (not its password), on_error.
    for on_error in ("tempfail", "accept"):
        envelope = make_envelope()
        caplog.clear()
        with FakeDaemon(raw_http(reply)) as fake:
            plugin = configured(url=f"http://bonzo:s3cret@127.0.0.1:{fake.port}", on_error=on_error)
            with caplog.at_level(logging.WARNING, "bonzo.plugins.rspamd"):
                if on_error == "accept":
                    assert check(plugin, envelope) is None
                else:
                    with pytest.raises(SMTPError) as info:
                        check(plugin, envelope)
                    assert (info.value.status_code, info.value.enhanced_code) == (451, "4.7.1")
        ((result, reason, _),) = results_of(envelope, "rspamd")
        assert result == "error" and f"http://127.0.0.1:{fake.port}/checkv2: " in reason
        (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert f"http://127.0.0.1:{fake.port}/checkv2" in line and "s3cret" not in line


def test_message_over_max_size_is_not_checked():
    envelope = make_envelope(b"Subject: x\r\n\r\n" + b"z" * 5000)
    with FakeDaemon(http(answer("reject"))) as fake:
        plugin = configured(url=f"http://127.0.0.1:{fake.port}", max_size="4K")
        assert check(plugin, envelope) is None
    assert fake.connections == 0
    assert results_of(envelope, "rspamd")[0][:2] == ("skip", "too large")


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_parse_reply_bytes(raw):
    try:
        parse_reply(raw)
    except ScanError:
        pass


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = (
    scalars
    | st.lists(scalars, max_size=3)
    | st.dictionaries(st.text(max_size=8), scalars, max_size=3)
)
header_values = st.text(max_size=12) | st.fixed_dictionaries(
    {"value": st.text(max_size=12)}, optional={"order": scalars}
)
header_tables = st.dictionaries(
    st.text(max_size=8), header_values | st.lists(header_values, max_size=2) | scalars, max_size=3
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries(
        {"action": st.sampled_from(["reject", "add header", "no action", "x"])},
        optional={
            "score": json_values,
            "milter": st.fixed_dictionaries(
                {}, optional={"add_headers": header_tables, "remove_headers": header_tables}
            ),
            "subject": json_values,
            "messages": json_values,
            "symbols": json_values,
        },
    )
)
def test_parse_reply_json(doc):
    try:
        reply = parse_reply(json.dumps(doc).encode())
    except ScanError:
        return
    for _name, value, _ in reply.add_headers:
        assert "\n" not in value.replace("\r\n ", "").replace("\r\n\t", "").replace("\n ", "")


@pytest.mark.parametrize(
    "table, message",
    [
        ({"url": "ftp://x"}, "url: expected"),
        ({"url": "http://x/checkv2?a=1"}, "url: no query"),
        ({"url": "http://127.0.0.1:99999"}, "^url: expected rspamd's address"),
        ({"url": "http://127.0.0.1:abc"}, "^url: expected rspamd's address"),
        ({"url": "http://[::1"}, "^url: expected rspamd's address"),
        ({"timeout": -1}, "^timeout: expected more than 0 seconds, got -1.0$"),
        ({"max_size": "1T"}, "^max_size: expected a size"),
        ({"url": 5}, "^url: expected a non-empty string, got 5$"),
        ({"greylist": "yes"}, "greylist: expected true or false"),
        ({"spam_header": "X Spam"}, "spam_header: .* is not a header name"),
        ({"settings_id": "a b"}, "settings_id"),
        ({"on_error": "defer"}, "on_error"),
        ({"port": 1}, "port: unknown key"),
    ],
)
def test_configuration_errors(table, message):
    with pytest.raises(ValueError, match=message):
        configured(**table)


def test_configuration_url():
    assert configured().url == "http://127.0.0.1:11333/checkv2"
    assert configured(url="http://[::1]:1/").url == "http://[::1]:1/checkv2"
    assert configured(url="http://h:1/rspamd/checkv2").url == "http://h:1/rspamd/checkv2"


def test_configuration_blank_strings_mean_none():
    plugin = configured(spam_header="", settings_id=" ")
    assert (plugin.spam_header, plugin.settings_id) == ("", "")
    plugin = configured(spam_header=" X-Checked ", settings_id="out")
    assert (plugin.spam_header, plugin.settings_id) == ("X-Checked", "out")
    assert configured().spam_header == "X-Spam"


def test_settings_id_is_sent():
    seen: list = []
    envelope = make_envelope()
    with FakeDaemon(http(answer("no action"), seen=seen)) as fake:
        check(configured(url=f"http://127.0.0.1:{fake.port}", settings_id="inbound"), envelope)
    assert ("settings-id", "inbound") in [(k.lower(), v) for k, v in seen[0][1]]


def test_many_messages_at_once():
    """More than Tornado's default of 10 requests are in flight at once."""
    state = {"now": 0, "most": 0}
    lock = threading.Condition()
    inner = http(answer("no action"))

    def held(conn):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            lock.notify_all()
            # Answer once 15 are in flight (or after a while, to end).
            lock.wait_for(lambda: state["most"] >= 15, timeout=3)
            state["now"] -= 1
        inner(conn)

    envelopes = [make_envelope() for _ in range(20)]
    with FakeDaemon(held) as fake:
        plugin = configured(url=f"http://127.0.0.1:{fake.port}", timeout=10)

        async def all_at_once():
            session = make_session()
            await asyncio.gather(*(plugin.bonzo_message(session, e) for e in envelopes))

        asyncio.run(all_at_once())
    assert state["most"] >= 15
    assert all(results_of(e, "rspamd")[0][0] == "pass" for e in envelopes)


def test_changes_are_recorded_through_a_server():
    """Through Bonzo: each change is in ``envelope.changes`` under the
    plugin's name, and an ``order`` puts a header at that position."""
    reply = answer(
        "rewrite subject",
        subject="[SPAM] hi",
        milter={
            "add_headers": {"X-Top": {"value": "first", "order": 0}, "X-Plain": "v"},
            "remove_headers": {"X-Old": 2},
        },
    )
    store = Store()
    message = b"Subject: hi\r\nX-Old: 1\r\nX-Old: 2\r\nX-Old: 3\r\n\r\nbody\r\n"
    with FakeDaemon(http(reply)) as fake:
        plugin = configured(url=f"http://127.0.0.1:{fake.port}")
        with serve(("rspamd", plugin), ("store", store)) as server, server.client() as c:
            assert c.sendmail("a@example.org", ["b@example.com"], message) == {}
    ((what, content, changes),) = store.got
    assert what == "delivered"
    assert content.startswith(b"X-Top: first\r\nReceived: ")
    assert b"X-Old: 1\r\nX-Old: 3\r\n" in content and b"X-Old: 2" not in content
    assert b"Subject: [SPAM] hi\r\n" in content and b"Subject: hi" not in content
    assert all(plugin == "rspamd" for plugin, _, _ in changes)
    assert {action for _, action, _ in changes} >= {
        "delete_header",
        "insert_header",
        "add_header",
        "change_header",
    }


def test_quarantine_and_discard_actions_in_a_session():
    # rspamd's own quarantine and discard actions (1.9+) are Bonzo's
    # verdicts: 250, then the quarantine with rspamd's headers, or nothing.
    store = Store()
    message = b"Subject: hi\r\n\r\nbody\r\n"
    milter = {"add_headers": {"X-Spamd-Result": {"value": "default: True [16.00 / 15.00]"}}}
    quarantine = answer("quarantine", 16.0, milter=milter)
    with FakeDaemon(http(quarantine)) as fake:
        plugin = configured(url=f"http://127.0.0.1:{fake.port}")
        with serve(("rspamd", plugin), ("store", store)) as server, server.client() as c:
            assert c.sendmail("a@example.org", ["b@example.com"], message) == {}
    [(what, reason, content)] = store.got
    assert (what, reason) == ("quarantined", "rspamd: score 16.00/15.00")
    assert b"X-Spamd-Result: default: True [16.00 / 15.00]\r\n" in content
    store = Store()
    with FakeDaemon(http(answer("discard", 30.0))) as fake:
        plugin = configured(url=f"http://127.0.0.1:{fake.port}")
        with serve(("rspamd", plugin), ("store", store)) as server, server.client() as c:
            assert c.sendmail("a@example.org", ["b@example.com"], message) == {}
    assert store.got == []


@pytest.mark.parametrize("action", ["quarantine", "discard"])
def test_quarantine_and_discard_are_recorded(action):
    envelope = make_envelope()
    with FakeDaemon(http(answer(action, 16.0))) as fake:
        verdict = check(configured(url=f"http://127.0.0.1:{fake.port}"), envelope)
    assert type(verdict).__name__ == action.capitalize()
    assert results_of(envelope, "rspamd")[0][:2] == (action, action)

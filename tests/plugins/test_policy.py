"""The policy plugin against a scripted policy server: the request, every
action, and every way the server can fail. postgrey:
tests/interop/test_scanners_policy.py."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from bonzo_plugins._scan import ScanError
from bonzo_plugins.policy import PolicyPlugin, parse_action
from bonzo_plugins.policy.client import PolicyAction, encode_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plugin_testing import serve
from scan_fakes import FakeDaemon, free_port, recv_until

from bonzo import Accept, hookimpl, testing
from bonzo.errors import SMTPError
from bonzo.session import Envelope


def configured(**table):
    plugin = PolicyPlugin()
    plugin.bonzo_configure(config=table, app=SimpleNamespace(base_dir="."))
    return plugin


def policy(*answers: bytes, seen: list | None = None, delay: float = 0):
    """A policy server answering ``answers`` in turn (the last one after)."""
    queue = list(answers)

    def handler(conn):
        request = recv_until(conn, b"\n\n")
        if seen is not None:
            seen.append(dict(line.split("=", 1) for line in request.decode().splitlines() if line))
        time.sleep(delay)
        conn.sendall(queue.pop(0) if len(queue) > 1 else queue[0])

    return handler


class Store:
    """Owns every recipient (after the policy plugin) and keeps messages."""

    def __init__(self) -> None:
        self.delivered: list[bytes] = []
        self.quarantined: list[str] = []

    @hookimpl
    def bonzo_rcpt(self, session, envelope, address):
        return Accept()

    @hookimpl
    def bonzo_deliver(self, session, envelope):
        self.delivered.append(envelope.content)
        return Accept()

    @hookimpl
    def bonzo_quarantine(self, session, envelope, reason):
        self.quarantined.append(reason)
        return Accept()


MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def send(fake_port: int, rcpts: list[str], **table):
    store = Store()
    plugin = configured(port=fake_port, **table)
    with serve(("policy", plugin), ("store", store)) as server, server.client() as client:
        client.ehlo()
        client.mail("alice@example.org", ["SIZE=22"])
        replies = [client.rcpt(r) for r in rcpts]
        data = client.data(MESSAGE) if any(code == 250 for code, _ in replies) else None
    return replies, data, store


def test_request_attributes_and_dunno():
    seen: list = []
    with FakeDaemon(policy(b"action=DUNNO\n\n", seen=seen)) as fake:
        replies, data, store = send(fake.port, ["bob@example.com", "carol@example.com"])
    assert [code for code, _ in replies] == [250, 250] and data[0] == 250
    first, second = seen
    assert first["request"] == "smtpd_access_policy"
    assert first["protocol_state"] == "RCPT" and first["protocol_name"] == "ESMTP"
    assert first["client_address"] == "127.0.0.1" and first["helo_name"]
    assert first["sender"] == "alice@example.org" and first["recipient"] == "bob@example.com"
    assert (first["recipient_count"], second["recipient_count"]) == ("0", "1")
    assert first["size"] == "22" and first["queue_id"] == second["queue_id"]
    assert len(store.delivered) == 1


@pytest.mark.parametrize(
    "answer, code, text",
    [
        (b"action=REJECT\n\n", 554, b"5.7.1 Access denied"),
        (b"action=REJECT No thanks\n\n", 554, b"5.7.1 No thanks"),
        (b"action=reject 5.7.2 Go away\n\n", 554, b"5.7.2 Go away"),
        (b"action=DEFER\n\n", 450, b"4.7.1 Try again later"),
        (b"action=DEFER_IF_PERMIT Greylisted, see http://x/\n\n", 450, b"4.7.1 Greylisted"),
        (b"action=550 5.1.1 No such user\n\n", 550, b"5.1.1 No such user"),
        (b"action=421 Busy\n\n", 421, b"4.7.1 Busy"),
        (b"action=551 4.1.1 mismatched\n\n", 551, b"5.7.1 4.1.1 mismatched"),
    ],
)
def test_refusing_actions(answer, code, text):
    with FakeDaemon(policy(answer)) as fake:
        replies, data, store = send(fake.port, ["bob@example.com"])
    ((got, reply),) = replies
    assert got == code and reply.startswith(text)
    assert store.delivered == []


def test_prepend_adds_one_header_and_ok_does_not_own_the_recipient():
    answers = (b"action=PREPEND X-Greylist: delayed 3 seconds\n\n", b"action=OK\n\n")
    with FakeDaemon(policy(*answers)) as fake:
        replies, data, store = send(fake.port, ["bob@example.com", "carol@example.com"])
    assert data[0] == 250
    (content,) = store.delivered
    assert content.count(b"X-Greylist: delayed 3 seconds\r\n") == 1


def test_ok_alone_is_not_enough_to_accept_a_recipient():
    with FakeDaemon(policy(b"action=OK\n\n")) as fake:
        plugin = configured(port=fake.port)
        with serve(("policy", plugin)) as server, server.client() as client:
            client.ehlo()
            client.mail("a@example.org")
            assert client.rcpt("bob@example.com")[0] == 550


def test_discard_and_hold():
    with FakeDaemon(policy(b"action=DISCARD\n\n")) as fake:
        _, data, store = send(fake.port, ["bob@example.com"])
    assert data[0] == 250 and store.delivered == [] and store.quarantined == []
    with FakeDaemon(policy(b"action=HOLD suspicious\n\n")) as fake:
        _, data, store = send(fake.port, ["bob@example.com"])
    assert data[0] == 250 and store.delivered == []
    assert store.quarantined == ["policy service: HOLD suspicious"]


@pytest.mark.parametrize("answer", [b"action=WARN look\n\n", b"action=REDIRECT x@y\n\n"])
def test_noted_actions_pass(answer):
    with FakeDaemon(policy(answer)) as fake:
        replies, data, store = send(fake.port, ["bob@example.com"])
    assert replies[0][0] == 250 and len(store.delivered) == 1


def test_server_down_fails_closed_or_passes():
    replies, _, _ = send(free_port(), ["bob@example.com"])
    assert replies[0][0] == 451 and replies[0][1].startswith(b"4.7.1 ")
    replies, data, store = send(free_port(), ["bob@example.com"], on_error="accept")
    assert replies[0][0] == 250 and len(store.delivered) == 1


def test_slow_server_times_out():
    with FakeDaemon(policy(b"action=DUNNO\n\n", delay=3)) as fake:
        started = time.monotonic()
        replies, _, _ = send(fake.port, ["bob@example.com"], timeout=0.5)
        assert time.monotonic() - started < 2.5
    assert replies[0][0] == 451


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"action=DUNNO\n",  # no end
        b"hello\n\n",
        b"result=ok\n\n",
        b"action=\n\n",
        b"action=EXPLODE now\n\n",
        b"action=" + b"x" * 10000 + b"\n\n",
        b"action=\xff\xfe\n\n",
    ],
    ids=["empty", "unended", "no-attribute", "no-action", "blank", "unknown", "long", "binary"],
)
def test_garbage_answer_fails_closed(answer):
    with FakeDaemon(policy(answer)) as fake:
        replies, _, _ = send(fake.port, ["bob@example.com"])
    assert replies[0][0] == 451


def test_results():
    plugin = configured(port=1)
    session = testing.make_session("192.0.2.1")
    envelope = Envelope("a@example.org")
    for _ in range(3):
        assert plugin.act(session, envelope, "b@example.com", PolicyAction("DUNNO", "")) is None
    with pytest.raises(SMTPError):
        plugin.act(session, envelope, "c@example.com", PolicyAction("REJECT", "no"))
    assert [(r.result, r.reason) for r in envelope.results.all("policy")] == [
        ("pass", "dunno"),
        ("reject", "no"),
    ]
    for i in range(300):
        with pytest.raises(SMTPError):
            plugin.act(session, envelope, f"x{i}@example.com", PolicyAction("REJECT", ""))
    assert len(envelope.results.all("policy")) == 100


def test_request_values_stay_on_their_line():
    raw = encode_request({"helo_name": "evil\r\naction=OK", "sender": "a\0b"})
    assert raw == b"helo_name=evil??action=OK\nsender=a?b\n\n"


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_parse_action_never_fails_otherwise(raw):
    try:
        action = parse_action(raw)
    except ScanError:
        return
    assert action.verb and action.verb == action.verb.upper()


@pytest.mark.parametrize(
    "table, message",
    [
        ({"attributes": {"Bad": "x"}}, "^attributes.Bad: expected a lower-case name"),
        ({"attributes": {"ok": 1}}, "^attributes.ok: expected a lower-case name and a string"),
        ({"attributes": {"ok": "a\nb"}}, "^attributes.ok: the value must be one line$"),
        ({"attributes": []}, "^attributes: expected a table, got \\[\\]$"),
        ({"socket": ""}, "^socket: expected a non-empty string, got ''$"),
        ({"timeout": 0}, "^timeout: expected more than 0 seconds"),
        ({"delay": 1}, "delay: unknown key"),
    ],
)
def test_configuration_errors(table, message):
    with pytest.raises(ValueError, match=message):
        configured(**table)


def test_extra_attributes_are_sent():
    seen: list = []
    with FakeDaemon(policy(b"action=DUNNO\n\n", seen=seen)) as fake:
        send(fake.port, ["bob@example.com"], attributes={"policy_context": "inbound"})
    assert seen[0]["policy_context"] == "inbound"


def test_unix_socket_and_null_sender(tmp_path):
    seen: list = []
    path = str(tmp_path / "policy.sock")
    with FakeDaemon(policy(b"action=DUNNO\n\n", seen=seen), unix=path):
        store = Store()
        plugin = configured(socket=path)
        with serve(("policy", plugin), ("store", store)) as server, server.client() as client:
            assert client.sendmail("", ["bob@example.com"], MESSAGE) == {}
    assert seen[0]["sender"] == "" and seen[0]["recipient"] == "bob@example.com"
    assert len(store.delivered) == 1

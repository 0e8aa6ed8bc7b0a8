"""LMTP (RFC 2033): the core (bytes in, replies out), per-recipient verdicts
through the dispatcher, for LMTP and for SMTP's single reply, and the
listener keys (protocol, path, mode, per-listener overrides)."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest
from e2e_support import RawClient
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_helpers import HOST, IP, Client, split_replies
from tornado.iostream import IOStream
from tornado.netutil import bind_unix_socket
from tornado.testing import bind_unused_port

from bonzo import Accept, errors, hookimpl
from bonzo.config import ConfigError, parse_config
from bonzo.hooks import PluginSet
from bonzo.lmtp import LMTPProtocol
from bonzo.protocol import MessageComplete, Rcpt, SMTPProtocol
from bonzo.server import ConnectionCount, SMTPServer
from bonzo.settings import ListenerSettings, SMTPSettings
from bonzo.testing import SessionTester

LHLO = b"LHLO client.example\r\n"
MAIL = b"MAIL FROM:<alice@example.org>\r\n"
MESSAGE = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


def rcpts(*names: str) -> bytes:
    return b"".join(f"RCPT TO:<{n}@example.net>\r\n".encode() for n in names)


def lmtp(**kwargs: Any) -> Client:
    return Client(kind=LMTPProtocol, **kwargs)


FULL = errors.TransientError("Mailbox full", 452, "4.2.2")
GONE = errors.PermanentError("No such user", 550, "5.1.1")
FULL_REPLY = b"452 4.2.2 Mailbox full\r\n"
GONE_REPLY = b"550 5.1.1 No such user\r\n"


# ------------------------------------------------------------------- the core
def test_a_bdat_chunk_gets_one_reply_unless_it_ends_the_message_with_recipients():
    """Per-recipient replies follow the LAST chunk only (RFC 2033 4.2, RFC
    3030 2); a chunk refused before it, or one sent with no recipient
    accepted, gets the one reply its BDAT command is due — none would leave
    the client waiting, several would put a pipelining one out of step."""
    LHLO = b"LHLO c.example\r\n"
    MAIL = b"MAIL FROM:<s@example.org>\r\n"
    client = lmtp()
    client.send(LHLO, MAIL)
    assert client.send(b"BDAT 5\r\nhello") == b"503 5.5.1 Error: need RCPT command\r\n"
    client = lmtp(max_message_size=200)
    client.send(LHLO, MAIL, rcpts("a", "b"))
    too_big = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    assert client.send(b"BDAT 300\r\n" + b"y" * 300) == too_big  # not LAST: one
    assert client.send(b"BDAT 3 LAST\r\nabc") == b"503 5.5.1 Error: need MAIL command\r\n"
    client.send(MAIL, rcpts("a", "b"))
    assert client.send(b"BDAT 300 LAST\r\n" + b"y" * 300) == too_big * 2  # LAST: each
    # A chunk that breaks a rule while it is read (a long line), not LAST.
    client = lmtp(max_data_line=1000)
    client.send(LHLO, MAIL, rcpts("a", "b"))
    body = b"x" * 1100 + b"\r\n"
    assert client.send(b"BDAT %d\r\n" % len(body) + body) == b"500 5.5.2 Line too long\r\n"
    assert client.send(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_greeting_names_lmtp_unless_a_banner_is_set():
    client = lmtp()
    client.proto.send_greeting()
    assert client.proto.data_to_send() == f"220 {HOST} LMTP\r\n".encode()
    client = lmtp(banner="mail store")
    client.proto.send_greeting()
    assert client.proto.data_to_send() == b"220 mail store\r\n"


def test_lhlo_is_the_greeting_and_helo_ehlo_are_refused():
    client = lmtp()
    out = split_replies(client.send(b"HELO c\r\n", b"EHLO c\r\n", MAIL, b"LHLO\r\n", LHLO))
    assert out[0] == b"500 5.5.1 Error: this is an LMTP server, greet with LHLO\r\n"
    assert out[1] == out[0]
    assert out[2] == b"503 5.5.1 Error: need LHLO command\r\n"
    assert out[3] == b"501 5.5.4 Syntax: LHLO hostname\r\n"
    lines = out[4].split(b"\r\n")
    assert lines[0] == f"250-{HOST} Hello {IP}".encode()
    # RFC 2033 5: PIPELINING and ENHANCEDSTATUSCODES must be offered.
    assert b"250-PIPELINING" in lines and b"250-ENHANCEDSTATUSCODES" in lines
    assert client.proto.esmtp and client.proto.helo == "client.example"
    assert [r[:3] for r in client.refusals] == [
        ("HELO", 500, "5.5.1"),
        ("EHLO", 500, "5.5.1"),
        ("MAIL", 503, "5.5.1"),
        ("LHLO", 501, "5.5.4"),
    ]


def test_one_250_per_recipient_after_the_message():
    client = lmtp()
    out = client.send(LHLO + MAIL + rcpts("a", "b", "c") + b"DATA\r\n" + MESSAGE)
    replies = split_replies(out)
    assert replies[-3:] == [b"250 2.0.0 Ok\r\n"] * 3
    assert client.messages == [b"Subject: hi\r\n\r\nhello\r\n"]
    assert client.proto.messages == 1
    assert not client.proto.in_transaction


def test_a_rejected_message_gets_the_error_once_per_recipient():
    def decide(proto: SMTPProtocol, event: Any) -> Any:
        return GONE if isinstance(event, MessageComplete) else None

    client = lmtp(decide=decide)
    replies = split_replies(client.send(LHLO + MAIL + rcpts("a", "b") + b"DATA\r\n" + MESSAGE))
    assert replies[-2:] == [b"550 5.1.1 No such user\r\n"] * 2
    assert client.proto.messages == 0
    # Both refusals are logged, each naming its recipient.
    assert [r[:3] for r in client.refusals] == [("message", 550, "5.1.1")] * 2


def test_each_recipient_gets_its_own_reply_in_rcpt_order():
    refusals: list[Any] = []

    def decide(proto: SMTPProtocol, event: Any) -> Any:
        if isinstance(event, Rcpt) and event.mailbox.local == "nobody":
            return errors.PermanentError("Unknown user", 550, "5.1.1")
        if isinstance(event, MessageComplete):
            return ["<a> saved", FULL, None, GONE]
        return None

    client = lmtp(decide=decide)
    client.proto.on_refusal = refusals.append
    out = client.send(
        LHLO + MAIL + rcpts("a", "full", "nobody", "c", "gone") + b"DATA\r\n" + MESSAGE
    )
    assert split_replies(out)[-4:] == [
        b"250 2.0.0 <a> saved\r\n",
        b"452 4.2.2 Mailbox full\r\n",
        b"250 2.0.0 Ok\r\n",
        b"550 5.1.1 No such user\r\n",
    ]
    per_recipient = [(r.code, r.arg) for r in refusals if r.stage == "message"]
    assert per_recipient == [(452, "full@example.net"), (550, "gone@example.net")]
    # The client did nothing wrong: only the refused RCPT counts as an error.
    assert client.proto.errors == 1
    assert client.proto.messages == 1


def test_a_message_delivered_to_nobody_does_not_count():
    def decide(proto: SMTPProtocol, event: Any) -> Any:
        return [FULL, GONE] if isinstance(event, MessageComplete) else None

    client = lmtp(decide=decide)
    client.send(LHLO + MAIL + rcpts("a", "b") + b"DATA\r\n" + MESSAGE)
    assert client.proto.messages == 0
    assert client.proto.junk_commands == 0


def test_answer_recipients_checks_its_arguments():
    proto = LMTPProtocol(Client().proto.settings, IP)
    proto.receive_data(LHLO + MAIL + rcpts("a", "b") + b"DATA\r\n" + MESSAGE)
    for _ in range(5):
        event = proto.next_event()
        with pytest.raises(RuntimeError, match="answers a message"):
            proto.answer_recipients([None])
        proto.accept()
    assert isinstance(proto.next_event(), MessageComplete)
    with pytest.raises(ValueError, match="1 replies for 2 accepted"):
        proto.answer_recipients([None])
    proto.answer_recipients([None, None])
    with pytest.raises(RuntimeError, match="without a pending message"):
        proto.answer_recipients([])
    assert event is not None


def test_a_message_over_the_size_limit_is_refused_for_every_recipient():
    client = lmtp(max_message_size=10)
    out = client.send(LHLO + MAIL + rcpts("a", "b") + b"DATA\r\n" + b"x" * 50 + b"\r\n.\r\n")
    assert (
        split_replies(out)[-2:]
        == [b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"] * 2
    )
    proto = LMTPProtocol(client.proto.settings, IP)
    proto.receive_data(LHLO + MAIL + rcpts("a") + b"DATA\r\n" + b"x" * 50 + b"\r\n.\r\n")
    while not isinstance(proto.next_event(), MessageComplete):
        proto.accept()
    with pytest.raises(RuntimeError, match="broke a limit"):
        proto.answer_recipients([None])


def test_pipelined_transactions_keep_their_recipients_apart():
    client = lmtp()
    out = client.send(
        LHLO
        + MAIL
        + rcpts("a", "b")
        + b"DATA\r\n"
        + MESSAGE
        + MAIL
        + rcpts("c")
        + b"RSET\r\n"
        + MAIL
        + rcpts("d")
        + b"DATA\r\n"
        + MESSAGE
        + b"QUIT\r\n"
    )
    replies = split_replies(out)
    assert replies[-3:] == [b"354 End data with <CR><LF>.<CR><LF>\r\n", b"250 2.0.0 Ok\r\n"] + [
        b"221 2.0.0 Bye\r\n"
    ]
    assert [r for r in replies if r == b"250 2.0.0 Ok\r\n"] == [b"250 2.0.0 Ok\r\n"] * 4
    assert client.proto.messages == 2
    assert client.closed


def test_a_421_for_one_recipient_closes_after_every_reply():
    shutdown = errors.SMTPError(421, "Shutting down", enhanced_code="4.3.2")

    def decide(proto: SMTPProtocol, event: Any) -> Any:
        return [None, shutdown, None] if isinstance(event, MessageComplete) else None

    client = lmtp(decide=decide)
    out = client.send(LHLO + MAIL + rcpts("a", "b", "c") + b"DATA\r\n" + MESSAGE + b"NOOP\r\n")
    assert split_replies(out)[-3:] == [
        b"250 2.0.0 Ok\r\n",
        b"421 4.3.2 Shutting down\r\n",
        b"250 2.0.0 Ok\r\n",
    ]
    assert client.closed


@settings(max_examples=200, deadline=None)
@given(
    outcomes=st.lists(
        st.sampled_from(["rcpt-refused", "ok", "4xx", "5xx"]), min_size=1, max_size=12
    ),
    split=st.integers(min_value=1, max_value=64),
)
def test_replies_after_the_message_match_the_accepted_recipients(outcomes, split):
    """Whatever RCPTs are refused and whatever each accepted one gets, and
    however the bytes are cut: one reply per accepted recipient, in order."""
    names = [f"r{i}" for i in range(len(outcomes))]
    wanted = dict(zip(names, outcomes, strict=True))
    replies_for = {
        "ok": b"250 2.0.0 Ok\r\n",
        "4xx": b"452 4.2.2 Mailbox full\r\n",
        "5xx": b"550 5.1.1 No such user\r\n",
    }

    def decide(proto: SMTPProtocol, event: Any) -> Any:
        if isinstance(event, Rcpt) and wanted[event.mailbox.local] == "rcpt-refused":
            return errors.PermanentError("Unknown user", 550, "5.1.2")
        if isinstance(event, MessageComplete):
            outcome = {"ok": None, "4xx": FULL, "5xx": GONE}
            return [outcome[wanted[n.partition("@")[0]]] for n in proto.recipients]
        return None

    client = lmtp(decide=decide)
    data = LHLO + MAIL + rcpts(*names) + b"DATA\r\n" + MESSAGE
    accepted = [o for o in outcomes if o != "rcpt-refused"]
    out = client.send(*[data[i : i + split] for i in range(0, len(data), split)])
    replies = split_replies(out)
    if not accepted:
        assert b"503 5.5.1 Error: need RCPT command\r\n" in replies
        assert not client.messages
        return
    assert replies[-len(accepted) :] == [replies_for[o] for o in accepted]
    assert client.proto.messages == (1 if "ok" in accepted else 0)


# --------------------------------------------------------- through plugins
class Store:
    """Accepts every recipient; refuses the message for some of them."""

    def __init__(self, refuse: dict[str, errors.SMTPError], stage: str = "deliver") -> None:
        self.refuse = refuse
        self.stage = stage
        self.delivered: list[list[str]] = []
        self.accepted: list[dict[int, errors.SMTPError]] = []

    @hookimpl
    def bonzo_rcpt(self) -> Accept:
        return Accept()

    def _refuse(self, envelope: Any) -> None:
        for rcpt in envelope.recipients:
            if rcpt.local in self.refuse:
                envelope.refuse_recipient(rcpt, self.refuse[rcpt.local])

    @hookimpl
    def bonzo_message(self, envelope: Any) -> None:
        if self.stage == "message":
            self._refuse(envelope)

    @hookimpl
    def bonzo_deliver(self, envelope: Any) -> Accept | None:
        if self.stage == "deliver":
            self._refuse(envelope)
        self.delivered.append([r.original for r in envelope.remaining_recipients])
        return Accept()

    @hookimpl
    def bonzo_accepted(self, envelope: Any) -> None:
        self.accepted.append(dict(envelope.refused))


def session_with(plugin: Any, lmtp: bool = True) -> SessionTester:
    plugins = PluginSet()
    plugins.register(plugin, "store")
    return SessionTester(plugins, lmtp=lmtp)


async def transaction(t: SessionTester, *names: str, greet: bytes = LHLO) -> list[bytes]:
    await t.connect()
    await t.send(greet)
    await t.send(MAIL + rcpts(*names) + b"DATA\r\n")
    return split_replies(await t.send(MESSAGE))


def test_lmtp_replies_name_each_recipient_and_carry_its_refusal():
    store = Store({"full": FULL, "gone": GONE})
    t = session_with(store)
    replies = asyncio.run(transaction(t, "a", "full", "gone", "b"))
    assert replies[0].startswith(b"250 2.0.0 <a@example.net> Ok: queued as ")
    assert replies[1:3] == [b"452 4.2.2 Mailbox full\r\n", b"550 5.1.1 No such user\r\n"]
    assert replies[3].startswith(b"250 2.0.0 <b@example.net> Ok: queued as ")
    assert store.delivered == [["a@example.net", "b@example.net"]]
    assert store.accepted == [{1: FULL, 2: GONE}]
    assert [r for r in t.refusals if r[0] == "message"] == [
        ("message", 452, "4.2.2", "store"),
        ("message", 550, "5.1.1", "store"),
    ]


def test_recipients_refused_by_a_filter_are_not_delivered_to():
    store = Store({"a": GONE, "b": FULL}, stage="message")
    t = session_with(store)
    replies = asyncio.run(transaction(t, "a", "b"))
    assert replies == [b"550 5.1.1 No such user\r\n", b"452 4.2.2 Mailbox full\r\n"]
    assert store.delivered == []  # bonzo_deliver is not asked
    assert store.accepted == []  # nobody got it


def test_a_delivery_fault_keeps_the_replies_of_recipients_refused_before():
    class Failing(Store):
        @hookimpl
        def bonzo_deliver(self, envelope: Any) -> Accept | None:
            self._refuse(envelope)
            raise errors.TransientError("Store unavailable", 451, "4.3.0")

    t = session_with(Failing({"gone": GONE}))
    replies = asyncio.run(transaction(t, "a", "gone", "b"))
    assert replies == [
        b"451 4.3.0 Store unavailable\r\n",
        b"550 5.1.1 No such user\r\n",
        b"451 4.3.0 Store unavailable\r\n",
    ]


def test_the_same_address_twice_is_two_recipients():
    class First(Store):
        @hookimpl
        def bonzo_deliver(self, envelope: Any) -> Accept | None:
            envelope.refuse_recipient(envelope.recipients[1], FULL)
            self.delivered.append([r.original for r in envelope.remaining_recipients])
            return Accept()

    store = First({})
    replies = asyncio.run(transaction(session_with(store), "a", "a"))
    assert replies[0].startswith(b"250 ")
    assert replies[1] == b"452 4.2.2 Mailbox full\r\n"
    assert store.delivered == [["a@example.net"]]


@pytest.mark.expect_errors
@pytest.mark.parametrize(
    ("recipient", "error", "problem"),
    [
        (0, "not an error", TypeError),
        (0, errors.SMTPError(250, "fine"), TypeError),
        (5, FULL, ValueError),
        (True, FULL, ValueError),
        ("a@example.net", FULL, ValueError),
    ],
)
def test_refuse_recipient_checks_its_arguments(recipient, error, problem, caplog):
    seen: list[BaseException] = []

    class Bad(Store):
        @hookimpl
        def bonzo_deliver(self, envelope: Any) -> Accept | None:
            try:
                envelope.refuse_recipient(recipient, error)
            except Exception as exc:
                seen.append(exc)
                raise
            return Accept()

    with caplog.at_level(logging.ERROR):
        replies = asyncio.run(transaction(session_with(Bad({})), "a"))
    assert isinstance(seen[0], problem)
    # A plugin's mistake is a local fault: 451, never a 5xx or a 250.
    assert len(replies) == 1 and replies[0].startswith(b"451 4.3.0 ")
    assert "in plugin 'store' (bonzo_deliver)" in caplog.text


@pytest.mark.parametrize(
    ("refuse", "reply"),
    [
        # Nobody got it: the first deferral, else the first refusal.
        ({"a": GONE, "b": FULL}, b"452 4.2.2 Mailbox full\r\n"),
        ({"a": GONE, "b": GONE}, b"550 5.1.1 No such user\r\n"),
    ],
)
def test_smtp_gets_one_reply_when_nobody_got_the_message(refuse, reply):
    store = Store(refuse)
    smtp = session_with(store, lmtp=False)
    replies = asyncio.run(transaction(smtp, "a", "b", greet=b"EHLO c\r\n"))
    assert replies == [reply]
    assert store.accepted == []


def test_smtp_partly_deferred_is_deferred_for_all(caplog):
    store = Store({"b": FULL, "c": GONE})
    with caplog.at_level(logging.WARNING, logger="tornado.application"):
        replies = asyncio.run(
            transaction(session_with(store, lmtp=False), "a", "b", "c", greet=b"EHLO c\r\n")
        )
    # A duplicate for <a> later is better than losing the message for <b>.
    assert replies == [b"452 4.2.2 Mailbox full\r\n"]
    assert store.accepted == []
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "delivered to 1 recipient(s) but not to <b@example.net>, <c@example.net>" in warning
    assert "the client will send it again to every recipient" in warning


def test_smtp_partly_refused_for_good_is_accepted_and_logged(caplog):
    store = Store({"b": GONE})
    with caplog.at_level(logging.WARNING, logger="tornado.application"):
        replies = asyncio.run(
            transaction(session_with(store, lmtp=False), "a", "b", greet=b"EHLO c\r\n")
        )
    assert replies[0].startswith(b"250 2.0.0 Ok: queued as ")
    assert store.accepted == [{1: GONE}]
    assert "cannot be told of a refusal per recipient" in caplog.text


class Picky:
    """A filter that refuses the message for the recipients it names."""

    def __init__(self, refuse: dict[str, errors.SMTPError]) -> None:
        self.refuse = refuse

    @hookimpl
    def bonzo_message(self, envelope: Any) -> None:
        for rcpt in envelope.recipients:
            if rcpt.local in self.refuse:
                envelope.refuse_recipient(rcpt, self.refuse[rcpt.local])


@pytest.mark.parametrize("lmtp", [True, False])
@pytest.mark.parametrize("fault", [False, True])
def test_a_refusal_names_the_plugin_that_refused_the_recipient(lmtp, fault):
    # The filter refuses <b> (and, when <a> is refused too, every recipient);
    # the delivery plugin refuses <c> itself, or fails.
    class Delivery(Store):
        @hookimpl
        def bonzo_deliver(self, envelope: Any) -> Accept | None:
            if fault:
                raise errors.TransientError("Store unavailable", 451, "4.3.0")
            return super().bonzo_deliver(envelope)

    plugins = PluginSet()
    plugins.register(Picky({"b": FULL}), "picky")
    store = Delivery({"c": GONE})
    plugins.register(store, "store")
    t = SessionTester(plugins, lmtp=lmtp)
    greet = LHLO if lmtp else b"EHLO c\r\n"
    replies = asyncio.run(transaction(t, "a", "b", "c", greet=greet))
    refusals = [r[1:4] for r in t.refusals if r[0] == "message"]
    if lmtp and not fault:
        assert [r[:3] for r in replies] == [b"250", b"452", b"550"]
        assert refusals == [(452, "4.2.2", "picky"), (550, "5.1.1", "store")]
    elif lmtp:
        assert [r[:3] for r in replies] == [b"451", b"452", b"451"]
        assert refusals == [(451, "4.3.0", "store"), (452, "4.2.2", "picky")] + [
            (451, "4.3.0", "store")
        ]
    elif not fault:
        # SMTP, some got it: the client is told the deferral the filter gave.
        assert replies == [b"452 4.2.2 Mailbox full\r\n"]
        assert refusals == [(452, "4.2.2", "picky")]
    else:
        assert replies == [b"451 4.3.0 Store unavailable\r\n"]
        assert refusals == [(451, "4.3.0", "store")]


def test_a_message_every_recipient_of_which_a_filter_refused_names_the_filter():
    plugins = PluginSet()
    plugins.register(Picky({"a": GONE}), "picky")
    plugins.register(Store({}), "store")
    t = SessionTester(plugins, lmtp=False)
    replies = asyncio.run(transaction(t, "a", greet=b"EHLO c\r\n"))
    assert replies == [b"550 5.1.1 No such user\r\n"]
    assert [r for r in t.refusals if r[0] == "message"] == [("message", 550, "5.1.1", "picky")]


class Archive:
    """Adds a copy for the archive (no reply owed for it); removes the
    recipients it redirects and adds their new address."""

    def __init__(self, redirect: dict[str, str] | None = None) -> None:
        self.redirect = redirect or {}

    @hookimpl
    def bonzo_message(self, envelope: Any) -> None:
        for old, new in self.redirect.items():
            envelope.remove_recipient(f"{old}@example.net")
            envelope.add_recipient_address(f"{new}@example.net")
        envelope.add_recipient_address("archive@example.net")


def archived(
    refused: dict[str, errors.SMTPError],
    store: Store,
    *names: str,
    lmtp: bool,
    redirect: dict[str, str] | None = None,
) -> list[bytes]:
    plugins = PluginSet()
    plugins.register(Archive(redirect), "archive")
    plugins.register(Picky(refused), "picky")
    plugins.register(store, "store")
    t = SessionTester(plugins, lmtp=lmtp)
    return asyncio.run(transaction(t, *names, greet=LHLO if lmtp else b"EHLO c\r\n"))


@pytest.mark.parametrize("lmtp", [True, False])
def test_a_copy_a_plugin_added_does_not_turn_a_refused_message_into_an_accepted_one(lmtp):
    store = Store({})
    replies = archived({"a": GONE, "b": FULL}, store, "a", "b", lmtp=lmtp)
    # SMTP: nobody the client gave got it, so the first deferral; and the
    # message was refused, so the archive has no copy of it either.
    assert replies == ([GONE_REPLY, FULL_REPLY] if lmtp else [FULL_REPLY])
    assert store.delivered == [] and store.accepted == []


@pytest.mark.parametrize("lmtp", [True, False])
def test_a_redirected_recipient_still_gets_the_message_beside_a_refused_one(lmtp):
    # <b> is removed for <c> (a milter's redirect): the client was told <b>
    # got it, so <c> must.
    store = Store({})
    replies = archived({"a": GONE}, store, "a", "b", lmtp=lmtp, redirect={"b": "c"})
    assert replies[0] == GONE_REPLY if lmtp else replies[0].startswith(b"250 2.0.0 ")
    assert store.delivered == [["c@example.net", "archive@example.net"]]


@pytest.mark.parametrize("lmtp", [True, False])
def test_refusals_at_delivery_are_judged_over_the_clients_recipients(lmtp, caplog):
    # The delivery plugin refuses the client's only recipient after storing
    # the archive copy: the client is refused (it bounces; the copy stays).
    store = Store({"a": GONE})
    assert archived({}, store, "a", lmtp=lmtp) == [GONE_REPLY]
    assert store.delivered == [["archive@example.net"]]
    # It defers the archive copy and stores the client's: no reply is owed
    # for the copy, so the client is not told to send the message again.
    store = Store({"archive": FULL})
    with caplog.at_level(logging.WARNING, logger="tornado.application"):
        [reply] = archived({}, store, "a", lmtp=lmtp)
    assert reply.startswith(b"250 2.0.0 ")
    assert store.delivered == [["a@example.net"]] and store.accepted == [{1: FULL}]
    if not lmtp:
        assert "not delivered to <archive@example.net>, added by a plugin" in caplog.text


class CopyAtRcpt:
    """Adds an archive copy while the ``at``-th client recipient is asked
    about at RCPT (so the copy comes before it in the envelope, an always-bcc
    plugin's way); after the message, refuses the copy for good and <b> for
    now, then defers the whole message when ``defer``."""

    def __init__(self, at: int, defer: bool) -> None:
        self.at = at
        self.defer = defer

    @hookimpl
    def bonzo_rcpt(self, envelope: Any) -> None:
        if not envelope.added and len(envelope.recipients) == self.at:
            envelope.add_recipient_address("archive@example.net")

    @hookimpl
    def bonzo_message(self, envelope: Any) -> None:
        for i in envelope.added:
            envelope.refuse_recipient(i, GONE)
        envelope.refuse_recipient(next(r for r in envelope.recipients if r.local == "b"), FULL)
        if self.defer:
            raise errors.TransientError("Try again later", 451, "4.3.0")


def copy_at_rcpt(at: int, defer: bool) -> PluginSet:
    plugins = PluginSet()
    plugins.register(CopyAtRcpt(at, defer), "copy")
    plugins.register(Store({}), "store")
    return plugins


LATER_REPLY = b"451 4.3.0 Try again later\r\n"


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "delivered"])
@pytest.mark.parametrize("at", [0, 1, 2])
def test_a_copy_added_at_rcpt_takes_no_client_recipients_reply(at, defer):
    """Wherever the copy sits among the client's recipients, each of them gets
    its own reply (or the message's) and the log line names it."""
    t = SessionTester(copy_at_rcpt(at, defer), lmtp=True)
    seen: list[Any] = []
    t.core.on_refusal = seen.append
    replies = asyncio.run(transaction(t, "a", "b", "c"))
    assert len(replies) == 3
    assert replies[1] == FULL_REPLY
    for i, name in ((0, b"a"), (2, b"c")):
        if defer:
            assert replies[i] == LATER_REPLY
        else:
            assert replies[i].startswith(b"250 2.0.0 <%s@example.net> Ok: queued as " % name)
    refusals = [(r.arg, r.code, r.by) for r in seen if r.stage == "message"]
    expected = [("b@example.net", 452, "copy")]
    if defer:
        expected = [("a@example.net", 451, "copy"), *expected, ("c@example.net", 451, "copy")]
    assert refusals == expected


def test_a_copy_added_at_rcpt_over_a_real_lmtp_session(start_server, log_watch):
    """The same over a socket: a pipelined client is deferred for both its
    recipients, and each refusal's log line names that recipient."""
    server = start_server(
        plugins=copy_at_rcpt(0, defer=True), listener=ListenerSettings(protocol="lmtp")
    )
    with RawClient(server.port) as client:
        assert client.reply().startswith(b"220 ")
        client.send(LHLO + MAIL + rcpts("a", "b") + b"DATA\r\n")
        assert [r[:3] for r in client.replies(5)] == [b"250", b"250", b"250", b"250", b"354"]
        client.send(MESSAGE)
        assert client.replies(2) == [LATER_REPLY, FULL_REPLY]
        assert client.command("QUIT").startswith(b"221 ")
    lines = [r.getMessage() for r in log_watch.matching("message refused by copy:")]
    assert len(lines) == 2
    assert "451 4.3.0 Try again later; arg='a@example.net'" in lines[0]
    assert "452 4.2.2 Mailbox full; arg='b@example.net'" in lines[1]


def test_received_header_says_lmtp():
    seen: list[bytes] = []

    class Keep(Store):
        @hookimpl
        def bonzo_deliver(self, envelope: Any) -> Accept | None:
            seen.append(envelope.header_bytes)
            return Accept()

    t = session_with(Keep({}))
    asyncio.run(transaction(t, "a"))
    assert b"(Bonzo) with LMTP id " in seen[0]
    assert t.session.lmtp and t.session.protocol == "LMTP"

    async def utf8() -> None:
        t = session_with(Keep({}))
        await t.connect()
        await t.send(LHLO + b"MAIL FROM:<alice@example.org> SMTPUTF8\r\n" + rcpts("b"))
        await t.send(b"DATA\r\n" + MESSAGE)

    asyncio.run(utf8())
    assert b"(Bonzo) with UTF8LMTP id " in seen[1]


# ------------------------------------------------------------ configuration
def test_listener_protocol_path_and_mode(tmp_path):
    (tmp_path / "run").mkdir()  # a socket's directory must exist
    config = parse_config(
        """
        [[listeners]]
        port = 2424
        protocol = "lmtp"

        [[listeners]]
        path = "run/lmtp.sock"
        mode = 0o600
        protocol = "lmtp"

        [[listeners]]
        path = "run/smtp.sock"
        mode = "0666"
        """,
        base_dir=tmp_path,
    )
    tcp, unix, other = config.listeners
    assert tcp.settings.protocol == "lmtp" and tcp.path is None and tcp.where == "127.0.0.1:2424"
    assert unix.path == str(tmp_path / "run" / "lmtp.sock") and unix.mode == 0o600
    assert unix.where == f"unix:{tmp_path}/run/lmtp.sock"
    assert other.settings.protocol == "smtp" and other.mode == 0o666


@pytest.mark.parametrize(
    ("listener", "message"),
    [
        ('protocol = "esmtp"', 'listeners[0].protocol: must be one of "smtp", "lmtp", not "esmtp"'),
        ("protocol = 1", 'listeners[0].protocol: must be one of "smtp", "lmtp", not 1'),
        ('path = "/x.sock"\nport = 25', "listeners[0].port: a Unix socket listener (path) has no"),
        ('path = "/x.sock"\naddress = "::1"', "listeners[0].address: a Unix socket listener"),
        ('path = "/x.sock"\nimplicit_tls = true', "listeners[0].implicit_tls: a Unix socket"),
        ('path = ""', "listeners[0].path: must be a non-empty path string"),
        ('path = "/x.sock"\nmode = 0o1777', "listeners[0].mode: must be permission bits"),
        ('path = "/x.sock"\nmode = "rw"', "listeners[0].mode: must be permission bits"),
        ('path = "/x.sock"\nmode = true', "listeners[0].mode: must be permission bits"),
        ("mode = 0o600", "listeners[0].mode: only a Unix socket listener (path) has a mode"),
        ("max_message_size = -1", "listeners[0].max_message_size:"),
        ('bare_newline = "maybe"', "listeners[0].bare_newline:"),
        ("hostname = 'x'", "listeners[0].hostname: unknown key"),
        ("workers = 2", "listeners[0].workers: unknown key"),
    ],
)
def test_bad_listener_keys_name_the_key(listener, message):
    with pytest.raises(ConfigError) as info:
        parse_config(f"[[listeners]]\n{listener}\n", source="bonzo.toml")
    assert str(info.value).startswith("bonzo.toml: " + message), str(info.value)


def test_two_listeners_on_one_socket_path_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="duplicate listener unix:"):
        parse_config(
            '[[listeners]]\npath = "a.sock"\n[[listeners]]\npath = "./a.sock"\n',
            base_dir=tmp_path,
        )


def test_listener_overrides_apply_to_that_listener_only():
    config = parse_config(
        """
        [limits]
        max_message_size = 1000
        [protocol]
        smtputf8 = true

        [[listeners]]
        port = 25

        [[listeners]]
        port = 587
        max_message_size = 5000
        smtputf8 = false
        max_connections_per_ip = 3
        """
    )
    mx, submission = config.listeners
    assert mx.smtp_settings is None and config.settings.max_message_size == 1000
    assert submission.overrides == {
        "max_message_size": 5000,
        "smtputf8": False,
        "max_connections_per_ip": 3,
    }
    assert submission.smtp_settings is not None
    assert submission.smtp_settings.max_message_size == 5000
    assert submission.smtp_settings.smtputf8 is False
    assert submission.smtp_settings.max_connections_per_ip == 3
    # Everything else is the server's.
    server = config.settings
    assert (
        submission.smtp_settings.replace(
            max_message_size=1000,
            smtputf8=True,
            max_connections_per_ip=server.max_connections_per_ip,
        )
        == server
    )


# ----------------------------------------------------- per-listener limits
def test_connection_limits_per_listener_and_server_wide():
    """A listener's own max_connections / max_connections_per_ip count its
    own connections; the server-wide values count every listener's."""

    async def main() -> list[bytes]:
        plugins = PluginSet()
        plugins.register(Store({}), "store")
        count = ConnectionCount(max_connections=3, max_connections_per_ip=10)
        base = SMTPSettings(hostname="bonzo.test")
        small = SMTPServer(
            plugins=plugins, settings=base.replace(max_connections_per_ip=1), count=count
        )
        wide = SMTPServer(plugins=plugins, settings=base, count=count)
        ports = []
        for server in (small, wide):
            sock, port = bind_unused_port()
            server.add_sockets([sock])
            ports.append(port)
        greetings = []
        streams = []
        try:
            # small: the first is served, the second refused (its own limit);
            # wide: two served, then the server-wide limit of 3 refuses.
            for port in (ports[0], ports[0], ports[1], ports[1], ports[1]):
                stream = IOStream(socket.socket())
                await stream.connect(("127.0.0.1", port))
                streams.append(stream)
                greetings.append(await asyncio.wait_for(stream.read_until(b"\r\n"), 10))
                await asyncio.sleep(0.05)  # the refused one is counted out
        finally:
            for stream in streams:
                stream.close()
            for server in (small, wide):
                server.stop()
                await server.close_all_connections()
        return greetings

    greetings = asyncio.run(main())
    assert [g[:3] for g in greetings] == [b"220", b"421", b"220", b"220", b"421"]
    assert greetings[1] == b"421 4.7.0 Too many connections from your address\r\n"
    assert greetings[4] == b"421 4.7.0 Too many connections, try again later\r\n"


def test_unix_socket_clients_are_not_counted_per_address(tmp_path, log_watch):
    """The clients of a Unix socket have no address (0.0.0.0): they are not
    held to max_connections_per_ip (one address for all of them), only to
    max_connections."""

    async def main() -> tuple[list[bytes], dict[str, int]]:
        plugins = PluginSet()
        plugins.register(Store({}), "store")
        settings = SMTPSettings(hostname="bonzo.test", max_connections_per_ip=1, max_connections=3)
        count = ConnectionCount(max_connections_per_ip=1)
        server = SMTPServer(plugins=plugins, settings=settings, count=count)
        path = str(tmp_path / "lmtp.sock")
        server.add_sockets([bind_unix_socket(path)])
        greetings = []
        streams = []
        try:
            for _ in range(4):
                stream = IOStream(socket.socket(socket.AF_UNIX))
                await stream.connect(path)
                streams.append(stream)
                greetings.append(await asyncio.wait_for(stream.read_until(b"\r\n"), 10))
            per_ip = dict(count.per_ip)
        finally:
            for stream in streams:
                stream.close()
            server.stop()
            await server.close_all_connections()
        return greetings, per_ip

    greetings, per_ip = asyncio.run(main())
    assert [g[:4] for g in greetings] == [b"220 "] * 3 + [b"421 "]
    assert greetings[3] == b"421 4.7.0 Too many connections, try again later\r\n"
    assert per_ip == {}
    [line] = [r.getMessage() for r in log_watch.matching("connect refused by core: 421")]
    assert line.endswith("(max_connections)")

"""The protocol core's defences, byte for byte: the write backlog (PAUSED),
ASCII-only keywords, the junk-command limit, enhanced codes in every
session, dot-unstuffing and line lengths with bare line ends, canonical
addresses, the refusal reports the connection logs, and the verb table.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_helpers import (
    DATA,
    EHLO,
    EHLO_REPLY,
    HELO,
    MAIL,
    RCPT,
    SETTINGS,
    TXN,
    Client,
    codes,
    feed,
    reply_to,
    split_replies,
)

from bonzo.errors import PermanentError
from bonzo.protocol import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthResponse,
    Mail,
    Policy,
    Rcpt,
    SMTPProtocol,
    StartTLS,
    Unknown,
    _crlf_lines,
)

pytestmark = pytest.mark.usefixtures("scan_implementation")


# ------------------------------------------------------------ write backlog
@pytest.mark.parametrize(
    "command", [b"HELP\r\n", b"NOOP\r\n", b"VRFY x\r\n", b"XYZZY\r\n", b"\r\n"]
)
def test_replies_the_core_gives_itself_respect_the_backlog(command):
    """One 64 KiB read of pipelined commands the core answers alone must not
    queue more than max_write_backlog (plus one reply) before PAUSED."""
    backlog = 4096
    settings = SETTINGS.replace(
        max_write_backlog=backlog,
        max_junk_commands=100_000,
        max_errors=100_000,
        max_unknown_commands=100_000,
    )
    proto = SMTPProtocol(settings, "192.0.2.1")
    proto.receive_data(EHLO)
    proto.next_event()
    proto.accept()
    proto.data_to_send()
    proto.receive_data(command * (65536 // len(command)))
    pauses = total = 0
    for _ in range(10_000):
        event = proto.next_event()
        if isinstance(event, Unknown):
            proto.reject(PermanentError("Error: command not recognized", 500, "5.5.2"))
            continue
        assert proto.pending_output <= backlog + 200
        if event is NEED_DATA:
            break
        assert event is PAUSED
        pauses += 1
        sent = len(proto.data_to_send())
        assert sent > backlog
        total += sent
    total += len(proto.data_to_send())
    # Every reply was given, never more than the backlog (and one reply) at once.
    assert total >= 65536 // len(command) * 14
    assert pauses >= total // (backlog + 200)
    assert proto.buffered == 0


def test_paused_until_the_replies_are_taken():
    proto = SMTPProtocol(SETTINGS.replace(max_write_backlog=100), "192.0.2.1")
    proto.receive_data(EHLO)
    proto.next_event()
    proto.accept()  # the EHLO reply alone is over 100 octets
    assert proto.next_event() is PAUSED
    assert proto.next_event() is PAUSED  # still: nothing was taken
    assert proto.data_to_send() == EHLO_REPLY
    assert proto.next_event() is NEED_DATA


# ------------------------------------------------------------ ASCII keywords
@pytest.mark.parametrize(
    "line",
    [
        "\u017fTARTTLS",  # ſ upper-cases to S
        "MA\u0131L FROM:<a@example.org>",  # ı upper-cases to I
        "R\u017fET",
        "\u0131\u0131\u0131\u0131",
    ],
)
def test_non_ascii_verbs_are_unknown_commands(line):
    replies, client = feed(EHLO + line.encode() + b"\r\n")
    assert split_replies(replies)[-1] == b"500 5.5.2 Error: command not recognized\r\n"
    assert client.proto.unknown_commands == 1
    assert len(client.events) == 1  # only the EHLO; no Unknown reaches a plugin


def test_esmtp_keywords_are_ascii_only():
    assert reply_to(EHLO, "MAIL FROM:<a@example.org> BODY=8b\u0131tm\u0131me".encode()) == (
        b"501 5.5.4 Bad BODY parameter\r\n"
    )
    # "ſmtputf8" is no SMTPUTF8 (nor any ESMTP keyword).
    assert codes(reply_to(EHLO, "MAIL FROM:<a@example.org> \u017fMTPUTF8".encode())) == [501]
    assert reply_to(EHLO, b"MAIL FROM:<a@example.org> body=8bitmime") == b"250 2.1.0 Ok\r\n"
    assert codes(reply_to(EHLO, "MAIL FROM:<a@example.org> BODY=7B\u0130T".encode())) == [501]


def test_from_and_to_keywords_are_ascii_only():
    assert codes(reply_to(EHLO, "MAIL \ufb00ROM:<a@example.org>".encode())) == [501]
    assert codes(reply_to(EHLO + MAIL, "RCPT T\u00d6:<a@example.org>".encode())) == [501]


def test_auth_mechanism_names_are_ascii_only():
    policy = Policy(auth_mechanisms=("PLAIN", "LOGIN"), auth_plaintext=True)
    replies, client = feed(EHLO + "AUTH PLA\u0131N".encode() + b"\r\n", policy=policy)
    assert split_replies(replies)[-1] == b"504 5.5.4 Unrecognized authentication type\r\n"
    assert not client.events[1:]


# ------------------------------------------------------------- junk limit
@pytest.mark.parametrize("junk", [b"NOOP\r\n", b"RSET\r\n", b"HELP\r\n", b"VRFY x\r\n", EHLO])
def test_junk_command_limit(junk):
    replies, client = feed(EHLO + junk * 5, max_junk_commands=3)
    assert codes(replies)[-1] == 421
    assert split_replies(replies)[-1] == (
        b"421 4.7.0 Too many commands without mail, closing connection\r\n"
    )
    assert len(split_replies(replies)) == 1 + 3 + 1
    assert client.closed
    assert ("?" if junk == EHLO else junk[:4].decode(), 421, "4.7.0", "core", "max_junk_commands")[
        1:
    ] == client.refusals[-1][1:]


def test_junk_count_restarts_after_each_accepted_message():
    body = b"Subject: x\r\n\r\nhi\r\n.\r\n"
    client = Client(max_junk_commands=3)
    client.send(EHLO)
    for _ in range(4):
        assert codes(client.send(b"NOOP\r\n" * 3)) == [250] * 3
        assert codes(client.send(TXN + DATA + body)) == [250, 250, 354, 250]
    assert codes(client.send(b"NOOP\r\n" * 4)) == [250, 250, 250, 421]


def test_the_first_greeting_is_no_junk():
    replies, _ = feed(EHLO + MAIL, max_junk_commands=1)
    assert codes(replies) == [250, 250]


# ------------------------------------------------- enhanced codes everywhere
@pytest.mark.parametrize(
    "setup, command, expected",
    [
        (b"", b"MAIL FROM:<a@example.org>", b"503 5.5.1 Error: need HELO command\r\n"),
        (b"", b"RCPT TO:<a@example.org>", b"503 5.5.1 Error: need MAIL command\r\n"),
        (b"", b"NOOP", b"250 2.0.0 Ok\r\n"),
        (b"", b"NOOP with args", b"250 2.0.0 Ok\r\n"),
        (b"", b"QUIT", b"221 2.0.0 Bye\r\n"),
        (b"", b"FOO", b"500 5.5.2 Error: command not recognized\r\n"),
        (b"", b"STARTTLS", b"502 5.5.1 Error: STARTTLS not available\r\n"),
        (HELO, b"HELO again.example", b"250 mx.example.org Hello 192.0.2.1\r\n"),
        (HELO + TXN, b"RSET", b"250 2.0.0 Ok\r\n"),
        (HELO + TXN + DATA, b"Hello\r\n.", b"250 2.0.0 Ok\r\n"),
    ],
)
def test_enhanced_codes_without_ehlo(setup, command, expected):
    """RFC 2034 4: enhanced codes "regardless of whether or not EHLO is
    employed", in every session but the original API's."""
    assert reply_to(setup, command) == expected


def test_unknown_command_limit_has_enhanced_codes_without_ehlo():
    replies, _ = feed(b"XFOO\r\n" * 3, max_unknown_commands=1)
    assert split_replies(replies)[-1] == (
        b"421 4.7.0 Too many unknown commands, closing connection\r\n"
    )


def test_enhanced_codes_after_starttls_before_the_new_ehlo():
    client = Client(policy=Policy(starttls=True))
    client.send(EHLO)
    client.proto.receive_data(b"STARTTLS\r\n")
    event = client.proto.next_event()
    assert isinstance(event, StartTLS)
    client.proto.accept()
    assert client.proto.data_to_send() == b"220 2.0.0 Ready to start TLS\r\n"
    client.proto.tls_started()
    assert client.send(MAIL) == b"503 5.5.1 Error: need HELO command\r\n"


# ---------------------------------------------------- bare line ends in DATA
def message(body: bytes, **settings):
    client = Client(**settings)
    assert codes(client.send(EHLO + TXN + DATA)) == [250, 250, 250, 354]
    return client.send(body), client


def test_lines_after_a_bare_lf_are_unstuffed_in_normalize_mode():
    """smtplib.sendmail(..., msg.as_bytes()) sends LF line ends and stuffs a
    dot after each LF; what is stored is what the sender wrote."""
    original = b"line\n.hidden\n..two\n"
    sent = original.replace(b"\n.", b"\n..")  # smtplib's _quote_periods
    replies, client = message(sent + b"\r\n.\r\n")
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [b"line\r\n.hidden\r\n..two\r\n\r\n"]


def test_first_line_after_a_bare_lf_split_across_reads():
    client = Client()
    client.send(EHLO + TXN + DATA)
    client.send(b"one\n")
    assert client.send(b"..two\r\n.\r\n") == b"250 2.0.0 Ok\r\n"
    assert client.messages == [b"one\r\n.two\r\n"]


def test_a_bare_lf_never_makes_the_final_dot():
    replies, client = message(b"one\n.\r\nMAIL FROM:<x@example.org>\r\n.\r\n")
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [b"one\r\n\r\nMAIL FROM:<x@example.org>\r\n"]
    assert not any(isinstance(e, Mail) for e in client.events[2:])


def test_unstuffing_in_allow_mode_only_after_crlf():
    replies, client = message(b"a\n..b\r\n..c\r\n.\r\n", bare_newline="allow")
    assert client.messages == [b"a\n..b\r\n.c\r\n"]


@pytest.mark.parametrize("end", [b"\r", b"\n"])
def test_bare_line_ends_end_lines_for_the_length_limit(end):
    """In normalize mode a bare CR or LF is a line end for max_data_line as
    it is for storage: short lines so ended are not one long line."""
    line = b"x" * 999
    body = (line + end) * 40 + b"\r\n.\r\n"
    replies, client = message(body, max_data_line=1024)
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [(line + b"\r\n") * 40 + b"\r\n"]


@pytest.mark.parametrize("end", [b"\r", b"\n"])
def test_bare_line_ends_split_in_small_reads(end):
    body = (b"y" * 700 + end) * 30 + b"\r\n.\r\n"
    client = Client(max_data_line=1000)
    client.send(EHLO + TXN + DATA)
    replies = b"".join(client.send(body[i : i + 97]) for i in range(0, len(body), 97))
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [(b"y" * 700 + b"\r\n") * 30 + b"\r\n"]


@pytest.mark.parametrize("end", [b"\r", b"\n", b"\r\n"])
def test_a_long_line_is_still_refused_whatever_ends_it(end):
    replies, _ = message(b"z" * 2000 + end + b"\r\n.\r\n", max_data_line=1024)
    assert replies == b"500 5.5.2 Line too long\r\n"


@given(st.binary(max_size=200).map(lambda b: bytes(b"ab\r\n."[x % 5] for x in b)))
def test_line_ends_are_made_crlf_as_each_of_crlf_cr_lf_is_one(block):
    # Three bytes.replace passes, not a regex substitution (a Python-level
    # step per line end): the same result.
    assert _crlf_lines(block) == re.sub(rb"\r\n|\r|\n", b"\r\n", block)


@pytest.mark.parametrize("end", [b"\r", b"\n", b"\r\n", b"\r\r\n", b"\n\r"])
def test_the_longest_line_in_normalize_mode_is_the_limit(end):
    # max_data_line counts the CRLF the line is stored with.
    body = b"a\n" + b"x" * 998 + end + b"y\n"
    replies, client = message(body + b"\r\n.\r\n", max_data_line=1000)
    assert replies == b"250 2.0.0 Ok\r\n"
    replies, _ = message(b"a\n" + b"x" * 999 + end + b"\r\n.\r\n", max_data_line=1000)
    assert replies == b"500 5.5.2 Line too long\r\n"


@pytest.mark.parametrize("mode", ["normalize", "reject", "allow"])
def test_the_transparency_dot_is_no_part_of_a_line_s_length(mode):
    """RFC 5321 4.5.3.1.6: 1000 octets "not counting the leading dot
    duplicated for transparency". A dot-led line of exactly max_data_line
    is taken with DATA as with BDAT (which has no dot to count); one octet
    more is refused both ways."""
    for size, fits in ((998, True), (999, False)):
        line = b"." + b"x" * (size - 1) + b"\r\n"
        body = b"a\r\n" + line + b"b\r\n"
        replies, client = message(
            b"a\r\n." + line + b"b\r\n.\r\n", max_data_line=1000, bare_newline=mode
        )
        chunked = Client(max_data_line=1000, bare_newline=mode)
        chunked.send(EHLO + TXN)
        bdat = chunked.send(b"BDAT %d LAST\r\n" % len(body) + body)
        if fits:
            assert (replies, bdat) == (b"250 2.0.0 Ok\r\n", b"250 2.0.0 Ok\r\n")
            assert client.messages == chunked.messages == [body]
        else:
            assert replies == bdat == b"500 5.5.2 Line too long\r\n"


def test_a_dot_led_line_after_a_bare_lf_is_measured_unstuffed():
    """normalize mode: a line after a bare LF is unstuffed, and measured so
    (998 octets stored with CRLF: the limit)."""
    line = b"." + b"x" * 997
    replies, client = message(b"a\n." + line + b"\n\r\n.\r\n", max_data_line=1000)
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [b"a\r\n" + line + b"\r\n\r\n"]
    replies, _ = message(b"a\n." + line + b"x\n\r\n.\r\n", max_data_line=1000)
    assert replies == b"500 5.5.2 Line too long\r\n"


@given(
    lines=st.lists(
        st.tuples(
            st.booleans(),
            # (around the limit: 997 + dot or "y" + CRLF is 1000 octets)
            st.integers(min_value=995, max_value=999) | st.integers(min_value=0, max_value=1000),
        ),
        max_size=6,
    ),
    points=st.lists(st.integers(min_value=0), max_size=6),
)
def test_data_and_bdat_agree_on_line_lengths(lines, points):
    """The same CRLF message sent dot-stuffed with DATA (cut into reads
    anywhere) and with BDAT: the same verdict, the same content stored."""
    body = b"".join((b"." if dot else b"y") + b"x" * n + b"\r\n" for dot, n in lines)
    stuffed = b"".join(b"." + line if line[:1] == b"." else line for line in body.splitlines(True))
    stream = EHLO + TXN + DATA + stuffed + b".\r\n"
    cuts = sorted({p % (len(stream) + 1) for p in points})
    client = Client(max_data_line=1000)
    replies = b"".join(
        client.send(stream[a:b]) for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)
    )
    chunked = Client(max_data_line=1000)
    chunked.send(EHLO + TXN)
    bdat = chunked.send(b"BDAT %d LAST\r\n" % len(body) + body)
    assert split_replies(replies)[-1] == bdat
    if bdat.startswith(b"250"):
        assert client.messages == chunked.messages == [body]


# ------------------------------------------------------- canonical addresses
@pytest.mark.parametrize(
    "address",
    [
        "ceo@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.\uff43\uff4f\uff4d",  # full-width
        "ceo@example\u3002com",  # ideographic full stop
        "ceo@exam\u00adple.com",  # soft hyphen
        '"ceo"@example.com',
        "ceo@EXAMPLE.com",
    ],
)
def test_every_spelling_has_one_canonical_form(address):
    line = f"RCPT TO:<{address}>".encode()
    client = Client()
    client.send(EHLO + b"MAIL FROM:<a@example.org> SMTPUTF8\r\n")
    assert client.send(line + b"\r\n") == b"250 2.1.5 Ok\r\n"
    event = client.events[-1]
    assert isinstance(event, Rcpt)
    assert event.address == address
    assert event.mailbox.canonical == "ceo@example.com"


def test_a_domain_without_an_idna_form_is_refused():
    client = Client()
    client.send(EHLO + b"MAIL FROM:<a@example.org> SMTPUTF8\r\n")
    assert client.send("RCPT TO:<ceo@exa\uff20mple.com>\r\n".encode()) == (
        b"501 5.1.3 Bad recipient address syntax\r\n"
    )


# ---------------------------------------------------------------- refusals
def test_every_refusal_is_reported_once_with_stage_and_decider():
    def decide(proto, event):
        if isinstance(event, Rcpt):
            return PermanentError("No such user", 550, "5.1.1")
        return None

    client = Client(decide=decide)
    client.send(b"MAIL FROM:<a@example.org>\r\n" + EHLO + MAIL + RCPT + DATA + b"BDAT x\r\n")
    assert client.refusals == [
        ("MAIL", 503, "5.5.1", "core", None),
        ("RCPT", 550, "5.1.1", "core", None),
        ("DATA", 503, "5.5.1", "core", None),
        ("BDAT", 421, "4.7.0", "core", "BDAT syntax"),
    ]


def test_a_refusal_by_a_size_or_length_limit_names_the_limit():
    """The log line's "(limit)" lets the operator see which setting to
    raise: the message size (declared, sent, or BDAT's count), a line of
    the message, a command line, an AUTH line."""
    policy = Policy(auth_mechanisms=("PLAIN",), auth_plaintext=True)
    client = Client(policy=policy, max_message_size=100, max_data_line=1000, bare_newline="reject")
    client.send(EHLO + b"MAIL FROM:<a@example.org> SIZE=101\r\n")
    client.send(TXN + DATA + b"x" * 200 + b"\r\n.\r\n")
    client.send(TXN + DATA + b"y" * 1001 + b"\r\n.\r\n")
    client.send(TXN + DATA + b"a\nb\r\n.\r\n")
    client.send(TXN + b"BDAT 101 LAST\r\n" + b"z" * 101)
    client.send(b"NOOP " + b"n" * 600 + b"\r\n")
    client.send(b"AUTH PLAIN " + b"A" * 13000 + b"\r\n")
    assert [(r[1], r[4]) for r in client.refusals] == [
        (552, "max_message_size"),
        (552, "max_message_size"),
        (500, "max_data_line"),
        (550, "bare_newline"),
        (552, "max_message_size"),
        (500, "max_command_line"),
        (500, "max_auth_line"),
    ]


def test_a_refusal_report_never_holds_an_auth_secret():
    seen = []

    def refused(refusal):
        seen.append((refusal.stage, refusal.arg))

    policy = Policy(auth_mechanisms=("PLAIN",), auth_plaintext=True)
    proto = SMTPProtocol(SETTINGS, "192.0.2.1", policy, on_refusal=refused)
    proto.receive_data(EHLO)
    proto.next_event()
    proto.accept()
    proto.receive_data(b"AUTH PLAIN AHNlY3JldABzZWNyZXQ=\r\n")
    proto.next_event()
    proto.reject(PermanentError("Authentication credentials invalid", 535, "5.7.8"))
    proto.receive_data(b"AUTH PLAIN\r\n")
    proto.next_event()
    proto.auth_challenge("")
    proto.receive_data(b"AHNlY3JldABzZWNyZXQ=\r\n")
    proto.next_event()
    proto.reject(PermanentError("Authentication credentials invalid", 535, "5.7.8"))
    assert seen == [("AUTH", "PLAIN"), ("AUTH", "")]


def test_a_refusal_after_close_is_not_reported_and_answers_nothing():
    client = Client()
    proto = client.proto
    proto.receive_data(EHLO + MAIL)
    proto.next_event()
    proto.accept()
    assert isinstance(proto.next_event(), Mail)
    proto.close(421, "Server shutting down", "4.3.2", limit="shutdown")
    proto.accept()  # the plugin answered after the close: nothing happens
    proto.reject(PermanentError("late"))
    assert split_replies(proto.data_to_send())[-1] == b"421 4.3.2 Server shutting down\r\n"
    assert [r[1:] for r in client.refusals] == [(421, "4.3.2", "core", "shutdown")]


# -------------------------------------------------------------- verb table
def test_a_verb_added_to_one_session_only():
    def xhello(proto, arg):
        proto.reply(250, f"Hello {arg}", "2.0.0")
        return None

    client = Client()
    client.proto.add_verb("xhello", xhello)
    assert client.send(EHLO + b"XHELLO you\r\n").endswith(b"250 2.0.0 Hello you\r\n")
    other = Client()
    assert other.send(EHLO + b"XHELLO you\r\n").endswith(
        b"500 5.5.2 Error: command not recognized\r\n"
    )
    assert "XHELLO" not in SMTPProtocol.VERBS
    with pytest.raises(ValueError):
        client.proto.add_verb("X HELLO", xhello)


def test_a_subclass_extends_the_table_it_inherits():
    class LHLO(SMTPProtocol):
        VERBS = {**SMTPProtocol.VERBS, "LHLO": SMTPProtocol._cmd_ehlo}

    proto = LHLO(SETTINGS, "192.0.2.1")
    proto.receive_data(b"LHLO client.example\r\n")
    event = proto.next_event()
    assert event.esmtp and event.name == "client.example"
    assert "LHLO" not in SMTPProtocol.VERBS


def test_events_are_frozen():
    _, client = feed(EHLO + MAIL + RCPT)
    assert len(client.events) == 3
    for event in client.events:
        field = dataclasses.fields(event)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(event, field, "changed")
    assert "secret" not in repr(AuthResponse("secret"))
    assert "secret" not in repr(Auth("PLAIN", "secret"))


# --------------------------------------------------------- LIMITS (RFC 9422)
@pytest.mark.parametrize(
    "settings, line",
    [
        ({}, b"250-LIMITS RCPTMAX=1000 MAILMAX=100\r\n"),
        (
            {"max_recipients": 100, "max_messages_per_connection": 1},
            b"250-LIMITS RCPTMAX=100 MAILMAX=1\r\n",
        ),
        ({"advertise_limits": False}, None),
    ],
)
def test_ehlo_advertises_the_configured_limits(settings, line):
    replies, _ = feed(EHLO, **settings)
    if line is None:
        assert b"LIMITS" not in replies
    else:
        assert line in replies


def test_the_advertised_limits_are_the_ones_enforced():
    client = Client(max_recipients=100, max_messages_per_connection=1)
    replies = client.send(EHLO)
    assert b"LIMITS RCPTMAX=100 MAILMAX=1" in replies
    rcpts = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % n for n in range(101))
    replies = split_replies(client.send(MAIL + rcpts + DATA + b"x\r\n.\r\n"))
    assert replies[100] == b"250 2.1.5 Ok\r\n"
    assert replies[101] == b"452 4.5.3 Too many recipients\r\n"
    assert client.send(MAIL) == b"452 4.5.3 Too many messages for this connection\r\n"

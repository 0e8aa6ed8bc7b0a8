"""The sans-IO SMTP core, byte for byte: commands in, replies and events out.

No event loop: :class:`protocol_helpers.Client` feeds bytes to
:class:`bonzo.protocol.SMTPProtocol` and answers each event the way a test
says. Sessions that never said EHLO keep the original Bonzo texts; after EHLO
every 2xx/4xx/5xx reply but the EHLO reply carries an enhanced status code.
"""

from __future__ import annotations

import pytest
from protocol_helpers import (
    DATA,
    EHLO,
    EHLO_REPLY,
    HELO,
    HELO_REPLY,
    LEGACY_HELO_REPLY,
    MAIL,
    RCPT,
    SETTINGS,
    TXN,
    Client,
    all_splits,
    codes,
    default_decision,
    feed,
    reply_to,
    split_replies,
)

from bonzo.address import Address
from bonzo.errors import PermanentError, SMTPError, TransientError
from bonzo.protocol import (
    CLOSED,
    NEED_DATA,
    AddressError,
    Data,
    DataChunk,
    Helo,
    Mail,
    MessageComplete,
    Rcpt,
    Reset,
    SMTPProtocol,
    Unknown,
    format_reply,
    parse_path,
)

# Every test here runs with the C DATA scan and with the pure-Python one.
pytestmark = pytest.mark.usefixtures("scan_implementation")

OPEN = EHLO + TXN + DATA  # an ESMTP session with DATA accepted
OPEN_REPLIES = (
    EHLO_REPLY + b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
)


def message(body: bytes, **settings) -> tuple[bytes, Client]:
    """Send ``body`` (already dot-stuffed, terminator included) as a message
    in an ESMTP session; returns the replies after the 354 and the client."""
    client = Client(**settings)
    assert codes(client.send(OPEN)) == [250, 250, 250, 354]
    return client.send(body), client


# --------------------------------------------------------------- greeting
def test_greeting_defaults_to_hostname_without_version():
    proto = SMTPProtocol(SETTINGS, "192.0.2.1")
    proto.send_greeting()
    assert proto.data_to_send() == b"220 mx.example.org ESMTP\r\n"
    assert proto.data_to_send() == b""


def test_greeting_text_and_banner_setting():
    proto = SMTPProtocol(SETTINGS.replace(banner="Bonzo here"), "192.0.2.1")
    proto.send_greeting()
    proto.send_greeting("Custom greeting")
    assert proto.data_to_send() == b"220 Bonzo here\r\n220 Custom greeting\r\n"


# ------------------------------------------------------------ format_reply
@pytest.mark.parametrize(
    "args, wire",
    [
        ((250, "Ok", "2.1.0", True), b"250 2.1.0 Ok\r\n"),
        ((250, "Ok", None, True), b"250 2.0.0 Ok\r\n"),
        ((451, "Later", None, True), b"451 4.0.0 Later\r\n"),
        ((550, "No", None, True), b"550 5.0.0 No\r\n"),
        ((250, "Ok", "2.1.0", False), b"250 Ok\r\n"),
        ((354, "Go ahead", "2.0.0", True), b"354 Go ahead\r\n"),
        ((220, "hi", None, True), b"220 2.0.0 hi\r\n"),
        ((250, ["a", "b", "c"], None, False), b"250-a\r\n250-b\r\n250 c\r\n"),
        ((550, "a\nb", "5.7.1", True), b"550-5.7.1 a\r\n550 5.7.1 b\r\n"),
        ((550, "bad\x00\r\x7fx", None, False), b"550 bad???x\r\n"),
        ((550, "c1\x85\x9f", None, False), b"550 c1??\r\n"),
        # A reply is US-ASCII (RFC 5321 4.2) unless the transaction is
        # SMTPUTF8 (RFC 6531 3.7.4.2): one "?" per other character.
        ((550, "caf\u00e9 \u4e2d\u6587", None, False), b"550 caf? ??\r\n"),
        ((550, "caf\u00e9", None, False, True), "550 caf\u00e9\r\n".encode()),
        (
            (550, ["\u00e9", "x"], "5.1.1", True, True),
            "550-5.1.1 \u00e9\r\n550 5.1.1 x\r\n".encode(),
        ),
        ((550, ["\u00e9", "x"], "5.1.1", True), b"550-5.1.1 ?\r\n550 5.1.1 x\r\n"),
    ],
)
def test_format_reply(args, wire):
    assert format_reply(*args) == wire


def test_format_reply_cuts_lines_at_512_octets():
    wire = format_reply(250, "x" * 1000, None, True)
    assert len(wire) == 512 and wire.endswith(b"x\r\n")
    # A multi-byte character is never cut in half.
    wire = format_reply(250, "\u00e9" * 600, None, False)
    assert len(wire) <= 512
    wire.decode("utf-8")


# ------------------------------------------------- every command, HELO style
# (setup, command, reply): a session of the original Bonzo API
# (legacy_replies) that never said EHLO keeps that version's texts, with no
# enhanced status codes.
LEGACY = [
    (b"", b"NOOP", b"250 Ok\r\n"),
    (b"", b"NOOP args", b"501 Syntax: NOOP\r\n"),
    (b"", b"RSET", b"250 Ok\r\n"),
    (b"", b"RSET args", b"501 Syntax: RSET\r\n"),
    (b"", b"HELO", b"501 Syntax: HELO hostname\r\n"),
    (b"", b"HELO   ", b"501 Syntax: HELO hostname\r\n"),
    (b"", b"EHLO", b"501 Syntax: EHLO hostname\r\n"),
    (b"", b"HELO client.example", LEGACY_HELO_REPLY),
    (b"", b"HELO Client name", LEGACY_HELO_REPLY),
    (b"", b"MAIL FROM:<a@example.org>", b"503 Error: need HELO command\r\n"),
    (b"", b"RCPT TO:<a@example.org>", b"503 Error: need MAIL command\r\n"),
    (b"", b"DATA", b"503 Error: need RCPT command\r\n"),
    (b"", b"", b"500 Error: bad syntax\r\n"),
    (b"", b"   ", b"500 Error: bad syntax\r\n"),
    (b"", b"FOO", b'502 Error: command "FOO" not implemented\r\n'),
    # The verb is echoed as the client sent it, as Bonzo 0.1 did.
    (b"", b"foo bar baz", b'502 Error: command "foo" not implemented\r\n'),
    (b"", b"\xc3\xa9t\xc3\xa9", '502 Error: command "\u00e9t\u00e9" not implemented\r\n'.encode()),
    (b"", b"STARTTLS", b'502 Error: command "STARTTLS" not implemented\r\n'),
    (b"", b"VRFY", b"501 Syntax: VRFY <address>\r\n"),
    (
        b"",
        b"VRFY bob",
        b"252 Cannot VRFY user, but will accept message and attempt delivery\r\n",
    ),
    (
        b"",
        b"HELP",
        b"214 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n",
    ),
    (
        b"",
        b"HELP MAIL",
        b"214 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n",
    ),
    (b"", b"QUIT", b"221 Bye\r\n"),
    (b"", b"BDAT 0 LAST", b"502 Error: CHUNKING not supported\r\n"),
    (HELO, b"HELO again.example", b"503 Duplicate HELO/EHLO\r\n"),
    (HELO, b"MAIL FROM:", b"501 Syntax: MAIL FROM:<address>\r\n"),
    (HELO, b"MAIL FROM:   ", b"501 Syntax: MAIL FROM:<address>\r\n"),
    (HELO, b"MAIL TO:<a@example.org>", b"501 Syntax: MAIL FROM:<address>\r\n"),
    (HELO, b"MAIL", b"501 Syntax: MAIL FROM:<address>\r\n"),
    (HELO, b"MAIL FROM:<a@example.org>", b"250 Ok\r\n"),
    (HELO, b"MAIL FROM:a@example.org", b"250 Ok\r\n"),
    (HELO, b"MAIL FROM:<>", b"250 Ok\r\n"),
    (HELO, b"MAIL FROM:<a@example.org> SIZE=10", b"555 MAIL parameters need EHLO\r\n"),
    (HELO, b"MAIL FROM:<bad address>", b"501 Bad sender address syntax\r\n"),
    (HELO, b"RCPT TO:<a@example.org>", b"503 Error: need MAIL command\r\n"),
    (HELO, b"DATA", b"503 Error: need RCPT command\r\n"),
    (HELO, b"NOOP", b"250 Ok\r\n"),
    (HELO + MAIL, b"MAIL FROM:<a@example.org>", b"503 Error: nested MAIL command\r\n"),
    (HELO + MAIL, b"RCPT TO:", b"501 Syntax: RCPT TO:<address>\r\n"),
    (HELO + MAIL, b"RCPT FROM:<a@example.org>", b"501 Syntax: RCPT TO:<address>\r\n"),
    (HELO + MAIL, b"RCPT TO:<bob@example.net>", b"250 Ok\r\n"),
    (HELO + MAIL, b"RCPT TO:bob@example.net", b"250 Ok\r\n"),
    (HELO + MAIL, b"RCPT TO:<>", b"501 Bad recipient address syntax\r\n"),
    (HELO + MAIL, b"RCPT TO:<b@example.net> NOTIFY=NEVER", b"555 Unsupported parameter NOTIFY\r\n"),
    (HELO + MAIL, b"DATA", b"503 Error: need RCPT command\r\n"),
    (HELO + TXN, b"DATA args", b"501 Syntax: DATA\r\n"),
    (HELO + TXN, b"DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    (HELO + TXN + DATA, b"Subject: hi\r\n\r\nHello\r\n.", b"250 Ok\r\n"),
    (HELO + TXN, b"RSET", b"250 Ok\r\n"),
    (HELO + TXN, b"QUIT", b"221 Bye\r\n"),
]


@pytest.mark.parametrize("setup, command, expected", LEGACY)
def test_legacy_replies(setup, command, expected):
    assert reply_to(setup, command, legacy=True) == expected


# ------------------------------------------------ every command, EHLO style
ESMTP = [
    (b"", b"EHLO client.example", EHLO_REPLY),
    (b"", b"EHLO", b"501 5.5.4 Syntax: EHLO hostname\r\n"),
    (EHLO, b"EHLO", b"501 5.5.4 Syntax: EHLO hostname\r\n"),
    (EHLO, b"HELO", b"501 5.5.4 Syntax: HELO hostname\r\n"),
    # RFC 5321 4.5.3.1.2: a domain is at most 255 octets.
    (b"", b"EHLO " + b"a" * 255, EHLO_REPLY),
    (b"", b"EHLO " + b"a" * 256, b"501 5.5.4 The EHLO hostname is too long\r\n"),
    (EHLO, b"HELO " + b"a" * 300, b"501 5.5.4 The HELO hostname is too long\r\n"),
    (EHLO, b"EHLO again.example", EHLO_REPLY),
    (EHLO, b"HELO again.example", HELO_REPLY),
    (EHLO, b"NOOP", b"250 2.0.0 Ok\r\n"),
    (EHLO, b"NOOP anything at all", b"250 2.0.0 Ok\r\n"),
    (EHLO, b"RSET", b"250 2.0.0 Ok\r\n"),
    (EHLO, b"RSET args", b"501 5.5.4 Syntax: RSET\r\n"),
    (EHLO, b"", b"500 5.5.2 Error: bad syntax\r\n"),
    (EHLO, b"FOO", b"500 5.5.2 Error: command not recognized\r\n"),
    # A non-ASCII verb is an unknown command, never a known one (defect 2).
    (EHLO, b"\xc3\xa9t\xc3\xa9", b"500 5.5.2 Error: command not recognized\r\n"),
    (EHLO, "\u017fTARTTLS".encode(), b"500 5.5.2 Error: command not recognized\r\n"),
    (
        EHLO,
        "MA\u0131L FROM:<a@example.org>".encode(),
        b"500 5.5.2 Error: command not recognized\r\n",
    ),
    (EHLO, "R\u017fET".encode(), b"500 5.5.2 Error: command not recognized\r\n"),
    (EHLO, b"VRFY", b"501 5.5.4 Syntax: VRFY <address>\r\n"),
    (
        EHLO,
        b"VRFY bob",
        b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n",
    ),
    (
        EHLO,
        b"HELP",
        # What this session may use: BDAT (CHUNKING is on), no STARTTLS or
        # AUTH (neither is offered here).
        b"214 2.0.0 Supported commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP BDAT\r\n",
    ),
    (EHLO, b"QUIT", b"221 2.0.0 Bye\r\n"),
    (EHLO, b"BDAT 0 LAST", b"503 5.5.1 Error: need MAIL command\r\n"),
    (EHLO, b"MAIL FROM:<alice@example.org>", b"250 2.1.0 Ok\r\n"),
    (EHLO, b"MAIL FROM:", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
    (EHLO, b"RCPT TO:<bob@example.net>", b"503 5.5.1 Error: need MAIL command\r\n"),
    (EHLO, b"DATA", b"503 5.5.1 Error: need RCPT command\r\n"),
    (EHLO + MAIL, b"MAIL FROM:<a@example.org>", b"503 5.5.1 Error: nested MAIL command\r\n"),
    (EHLO + MAIL, b"RCPT TO:<bob@example.net>", b"250 2.1.5 Ok\r\n"),
    (EHLO + MAIL, b"RCPT TO:", b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
    (EHLO + MAIL, b"DATA", b"503 5.5.1 Error: need RCPT command\r\n"),
    (EHLO + TXN, b"DATA x", b"501 5.5.4 Syntax: DATA\r\n"),
    (EHLO + TXN, b"DATA", b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    (EHLO + TXN + DATA, b"Hello\r\n.", b"250 2.0.0 Ok\r\n"),
    (EHLO + TXN, b"QUIT", b"221 2.0.0 Bye\r\n"),
]


@pytest.mark.parametrize("setup, command, expected", ESMTP)
def test_esmtp_replies(setup, command, expected):
    assert reply_to(setup, command) == expected


@pytest.mark.parametrize(
    "line, event",
    [
        (b"EHLO client.example", Helo("client.example", True)),
        (b"HELO client.example", Helo("client.example", False)),
        (b"ehlo   spaced.example  ", Helo("spaced.example", True)),
        (b"HELO [192.0.2.7]", Helo("[192.0.2.7]", False)),
        (b"FOO", Unknown("FOO", "", "FOO")),
        (b"xforward  NAME=x  ADDR=y ", Unknown("XFORWARD", "NAME=x  ADDR=y", "xforward")),
        (b"RSET", Reset()),
    ],
)
def test_events_before_any_transaction(line, event):
    _, client = feed(line + b"\r\n")
    assert client.events == [event]


def test_transaction_events_and_message():
    replies, client = feed(
        EHLO,
        b"MAIL FROM:<alice@example.org> SIZE=42 BODY=8BITMIME\r\n",
        b"RCPT TO:<bob@example.net>\r\nRCPT TO:<Postmaster>\r\n",
        b"DATA\r\nHello\r\n.\r\n",
    )
    assert client.events == [
        Helo("client.example", True),
        Mail(Address.parse("alice@example.org"), {"SIZE": "42", "BODY": "8BITMIME"}),
        Rcpt(Address.parse("bob@example.net"), {}),
        Rcpt(Address.parse("Postmaster"), {}),
        Data(),
        MessageComplete(b"Hello\r\n"),
    ]
    assert client.messages == [b"Hello\r\n"]
    assert codes(replies) == [250, 250, 250, 250, 354, 250]
    assert not client.proto.in_transaction


@pytest.mark.parametrize(
    "lines",
    [
        [b"ehlo c.example", b"mail from:<a@example.org>", b"rcpt to:<b@example.org>", b"data"],
        [b"EhLo c.example", b"MaIl FrOm:<a@example.org>", b"RcPt tO:<b@example.org>", b"DaTa"],
    ],
)
def test_verbs_and_keywords_are_case_insensitive(lines):
    replies, client = feed(b"".join(line + b"\r\n" for line in lines))
    assert codes(replies) == [250, 250, 250, 354]
    assert client.proto.in_data


def test_noop_rset_help_vrfy_quit_case_insensitive():
    replies, _ = feed(EHLO, b"noop\r\nrset\r\nhelp\r\nvrfy x\r\nquit\r\n")
    assert codes(replies)[1:] == [250, 250, 214, 252, 221]


def test_unknown_verb_accepted_by_a_plugin():
    """A plugin may implement a verb the core does not know."""

    def decide(proto, event):
        return "Done" if isinstance(event, Unknown) else None

    replies, client = feed(EHLO, b"XFOO bar\r\n", decide=decide)
    assert client.events[-1] == Unknown("XFOO", "bar", "XFOO")
    assert replies.endswith(b"250 2.0.0 Done\r\n")
    assert client.proto.unknown_commands == 0


def test_unknown_verb_rejected_with_a_custom_reply():
    def decide(proto, event):
        return (
            SMTPError(502, "Not here", enhanced_code="5.5.1")
            if isinstance(event, Unknown)
            else None
        )

    assert feed(EHLO, b"XFOO\r\n", decide=decide)[0].endswith(b"502 5.5.1 Not here\r\n")


# ---------------------------------------------------------------- EHLO
def test_ehlo_advertises_each_extension():
    lines = EHLO_REPLY.split(b"\r\n")[1:-1]
    keywords = [line[4:] for line in lines]
    assert keywords == [
        b"PIPELINING",
        b"SIZE 33554432",
        b"8BITMIME",
        b"SMTPUTF8",
        b"ENHANCEDSTATUSCODES",
        b"CHUNKING",
        b"BINARYMIME",
        b"DSN",
        b"LIMITS RCPTMAX=1000 MAILMAX=100",
        b"HELP",
    ]
    assert all(line.startswith(b"250-") for line in lines[:-1]) and lines[-1][:4] == b"250 "


@pytest.mark.parametrize(
    "settings, size_line, utf8",
    [
        ({"max_message_size": 1000}, b"250-SIZE 1000\r\n", True),
        ({"max_message_size": 0}, b"250-SIZE\r\n", True),
        ({"smtputf8": False}, b"250-SIZE 33554432\r\n", False),
    ],
)
def test_ehlo_follows_the_settings(settings, size_line, utf8):
    replies, _ = feed(EHLO, **settings)
    assert size_line in replies
    assert (b"250-SMTPUTF8\r\n" in replies) is utf8
    assert not replies.startswith(b"250 ") and replies.endswith(b"250 HELP\r\n")


def test_ehlo_keywords_chosen_by_the_caller():
    proto = SMTPProtocol(SETTINGS, "192.0.2.1")
    proto.receive_data(EHLO)
    assert proto.next_event() == Helo("client.example", True)
    proto.accept("hi there", extensions=["PIPELINING", "X-FOO"])
    assert proto.data_to_send() == b"250-hi there\r\n250-PIPELINING\r\n250 X-FOO\r\n"
    assert proto.esmtp and proto.helo == "client.example"


def test_ehlo_with_no_extensions_is_one_line():
    proto = SMTPProtocol(SETTINGS, "192.0.2.1")
    proto.receive_data(EHLO)
    proto.next_event()
    proto.accept(extensions=[])
    assert proto.data_to_send() == b"250 mx.example.org Hello 192.0.2.1\r\n"


def test_rejected_ehlo_keeps_the_session_state():
    def decide(proto, event):
        if isinstance(event, Helo) and event.name == "bad.example":
            return PermanentError("Go away", 550, "5.7.1")
        return default_decision(proto, event)

    client = Client(decide=decide)
    client.send(EHLO + MAIL)
    assert client.send(b"EHLO bad.example\r\n") == b"550 5.7.1 Go away\r\n"
    assert client.proto.helo == "client.example"
    assert client.proto.in_transaction
    assert client.send(RCPT) == b"250 2.1.5 Ok\r\n"


def test_helo_name_must_be_ascii():
    # The reply says why (the name is there, it is not ASCII); SMTPUTF8,
    # declared at MAIL, does not cover it.
    helo = "HELO h\u00f6st".encode()
    why = b"hostname must be ASCII (an internationalized name in its xn-- form)\r\n"
    assert reply_to(b"", helo, legacy=True) == b"501 The HELO " + why
    assert reply_to(b"", helo) == b"501 5.5.4 The HELO " + why
    assert reply_to(EHLO, "EHLO h\u00f6st".encode()) == b"501 5.5.4 The EHLO " + why
    # The seed's text for a missing name is kept.
    assert reply_to(b"", b"HELO", legacy=True) == b"501 Syntax: HELO hostname\r\n"


# ------------------------------------------------------ ESMTP parameters
# (MAIL arguments after "FROM:", reply, params of the accepted Mail event)
MAIL_PARAMS = [
    (b"<a@example.org> SIZE=100", b"250 2.1.0 Ok\r\n", {"SIZE": "100"}),
    (b"<a@example.org> size=0", b"250 2.1.0 Ok\r\n", {"SIZE": "0"}),
    (b"<a@example.org> SIZE=33554432", b"250 2.1.0 Ok\r\n", {"SIZE": "33554432"}),
    (
        b"<a@example.org> SIZE=33554433",
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n",
        None,
    ),
    (
        b"<a@example.org> SIZE=99999999999999999999",
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n",
        None,
    ),
    (b"<a@example.org> SIZE=999999999999999999999", b"501 5.5.4 Bad SIZE parameter\r\n", None),
    (b"<a@example.org> SIZE", b"501 5.5.4 Bad SIZE parameter\r\n", None),
    (b"<a@example.org> SIZE=", b"501 5.5.4 Bad parameter syntax\r\n", None),
    (b"<a@example.org> SIZE=abc", b"501 5.5.4 Bad SIZE parameter\r\n", None),
    (b"<a@example.org> SIZE=-1", b"501 5.5.4 Bad SIZE parameter\r\n", None),
    (b"<a@example.org> SIZE=1e3", b"501 5.5.4 Bad SIZE parameter\r\n", None),
    (b"<a@example.org> SIZE=+5", b"501 5.5.4 Bad SIZE parameter\r\n", None),
    (b"<a@example.org> BODY=7BIT", b"250 2.1.0 Ok\r\n", {"BODY": "7BIT"}),
    (b"<a@example.org> BODY=8BITMIME", b"250 2.1.0 Ok\r\n", {"BODY": "8BITMIME"}),
    (b"<a@example.org> body=8bitmime", b"250 2.1.0 Ok\r\n", {"BODY": "8bitmime"}),
    (b"<a@example.org> BODY=BINARYMIME", b"250 2.1.0 Ok\r\n", {"BODY": "BINARYMIME"}),
    (b"<a@example.org> BODY=binarymime", b"250 2.1.0 Ok\r\n", {"BODY": "binarymime"}),
    (b"<a@example.org> BODY", b"501 5.5.4 Bad BODY parameter\r\n", None),
    (b"<a@example.org> SMTPUTF8", b"250 2.1.0 Ok\r\n", {"SMTPUTF8": None}),
    (b"<a@example.org> smtputf8", b"250 2.1.0 Ok\r\n", {"SMTPUTF8": None}),
    (b"<a@example.org> SMTPUTF8=yes", b"501 5.5.4 SMTPUTF8 takes no value\r\n", None),
    (b"<a@example.org> FOO=bar", b"555 5.5.4 Unsupported parameter FOO\r\n", None),
    (b"<a@example.org> X-FOO", b"555 5.5.4 Unsupported parameter X-FOO\r\n", None),
    (b"<a@example.org> AUTH=<>", b"555 5.5.4 Unsupported parameter AUTH\r\n", None),
    (b"<a@example.org> SIZE=1 SIZE=2", b"501 5.5.4 Duplicate parameter SIZE\r\n", None),
    (b"<a@example.org> size=1 SIZE=1", b"501 5.5.4 Duplicate parameter SIZE\r\n", None),
    (b"<a@example.org> BODY=7BIT body=7BIT", b"501 5.5.4 Duplicate parameter BODY\r\n", None),
    (b"<a@example.org> -X=1", b"501 5.5.4 Bad parameter syntax\r\n", None),
    (b"<a@example.org> =1", b"501 5.5.4 Bad parameter syntax\r\n", None),
    (b"<a@example.org> X_Y=1", b"501 5.5.4 Bad parameter syntax\r\n", None),
    (
        b"<a@example.org>   SIZE=5    BODY=7BIT  SMTPUTF8 ",
        b"250 2.1.0 Ok\r\n",
        {"SIZE": "5", "BODY": "7BIT", "SMTPUTF8": None},
    ),
    (b"a@example.org SIZE=5", b"250 2.1.0 Ok\r\n", {"SIZE": "5"}),
    (b"<> SIZE=5", b"250 2.1.0 Ok\r\n", {"SIZE": "5"}),
    (b"<a@example.org>SIZE=5", b"501 5.1.7 Bad sender address syntax\r\n", None),
]


@pytest.mark.parametrize("arg, reply, params", MAIL_PARAMS)
def test_mail_parameters(arg, reply, params):
    client = Client()
    client.send(EHLO)
    assert client.send(b"MAIL FROM:" + arg + b"\r\n") == reply
    if params is None:
        assert not client.proto.in_transaction
        assert not any(isinstance(e, Mail) for e in client.events)
    else:
        assert client.events[-1].params == params
        assert client.proto.mail_params == params


@pytest.mark.parametrize(
    "settings, arg, reply",
    [
        ({"max_message_size": 1000}, b"SIZE=1000", b"250 2.1.0 Ok\r\n"),
        (
            {"max_message_size": 1000},
            b"SIZE=1001",
            b"552 5.3.4 Message size exceeds fixed maximum message size\r\n",
        ),
        ({"max_message_size": 0}, b"SIZE=99999999999999999999", b"250 2.1.0 Ok\r\n"),
        ({"smtputf8": False}, b"SMTPUTF8", b"555 5.5.4 Unsupported parameter SMTPUTF8\r\n"),
    ],
)
def test_mail_parameters_follow_the_settings(settings, arg, reply):
    assert reply_to(EHLO, b"MAIL FROM:<a@example.org> " + arg, **settings) == reply


def test_a_refused_size_still_lets_the_client_try_again():
    client = Client(max_message_size=1000)
    client.send(EHLO)
    assert codes(client.send(b"MAIL FROM:<a@example.org> SIZE=5000\r\n")) == [552]
    assert client.send(b"MAIL FROM:<a@example.org> SIZE=500\r\n") == b"250 2.1.0 Ok\r\n"


@pytest.mark.parametrize(
    "arg, reply",
    [
        (b"<b@example.net> NOTIFY=NEVER", b"555 5.5.4 Unsupported parameter NOTIFY\r\n"),
        (
            b"<b@example.net> ORCPT=rfc822;b@example.net",
            b"555 5.5.4 Unsupported parameter ORCPT\r\n",
        ),
        (b"<b@example.net> SIZE=1", b"555 5.5.4 Unsupported parameter SIZE\r\n"),
        (b"<b@example.net> X=1 X=2", b"501 5.5.4 Duplicate parameter X\r\n"),
        (b"<b@example.net> =", b"501 5.5.4 Bad parameter syntax\r\n"),
    ],
)
def test_rcpt_parameters(arg, reply):
    # With DSN off; tests/test_dsn.py has NOTIFY and ORCPT with DSN on.
    client = Client(dsn=False)
    client.send(EHLO + MAIL)
    assert client.send(b"RCPT TO:" + arg + b"\r\n") == reply
    assert client.proto.rcpt_count == 0


# ---------------------------------------------------------------- addresses
# (argument after FROM:/TO:, sender?, accepted address or the reply)
ADDRESSES = [
    (b"<alice@example.org>", True, "alice@example.org"),
    (b"alice@example.org", True, "alice@example.org"),
    (b" <alice@example.org>", True, "alice@example.org"),
    (b"<>", True, ""),
    (b"<>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"", False, b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
    (b"<postmaster>", False, "postmaster"),
    (b"<POSTMASTER>", False, "POSTMASTER"),
    (b"<PostMaster>", False, "PostMaster"),
    (b"postmaster", False, "postmaster"),
    (b"<postmaster@example.net>", False, "postmaster@example.net"),
    (b"<postmaster>", True, b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"<@a.example,@b.example:user@c.example>", False, "user@c.example"),
    (b"<@a.example:user@c.example>", True, "user@c.example"),
    (b"<@a.example>", True, b"501 5.1.7 Bad sender address syntax\r\n"),
    (b'<"john doe"@example.org>', False, '"john doe"@example.org'),
    (b'<"a\\"b"@example.org>', False, '"a\\"b"@example.org'),
    (b'<"a>b"@example.org>', False, '"a>b"@example.org'),
    (b'<"a@b"@example.org>', False, '"a@b"@example.org'),
    (b'<"unclosed@example.org>', False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<user@[192.0.2.1]>", False, "user@[192.0.2.1]"),
    (b"<user@[IPv6:2001:db8::1]>", False, "user@[IPv6:2001:db8::1]"),
    (b"<first.last+tag@sub.example.org>", False, "first.last+tag@sub.example.org"),
    (b"<x!#$%&'*+/=?^_`{|}~-y@example.org>", False, "x!#$%&'*+/=?^_`{|}~-y@example.org"),
    (b"<alice@example.org", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<alice@example.org>junk", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<alice>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<alice@>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<@example.org>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<a@b@example.org>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<a..b@example.org>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<.a@example.org>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<a.@example.org>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<a b@example.org>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<a@example.org.>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<a@-example.org>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<a@exa_mple.org>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<a@[not[a]literal]>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    # Address literals as RFC 5321 4.1.3 spells them, and nothing else.
    (b"<u@[300.1.1.1]>", True, b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"<u@[1.2.3]>", True, b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"<u@[foo]>", True, b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"<u@[IPv6:1::2::3]>", True, b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"<u@[IPv6:fe80::1%eth0]>", False, b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"<@[1.2.3]:u@example.org>", True, b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"<u@[ipv6:2001:db8::2]>", True, "u@[ipv6:2001:db8::2]"),
    (b"<u@[x-tag:anything]>", False, "u@[x-tag:anything]"),
    (b"<a%b@example.org>", False, "a%b@example.org"),
]


@pytest.mark.parametrize("arg, sender, expected", ADDRESSES)
def test_addresses(arg, sender, expected):
    client = Client()
    client.send(EHLO if sender else EHLO + MAIL)
    command = b"MAIL FROM:" if sender else b"RCPT TO:"
    replies = client.send(command + arg + b"\r\n")
    if isinstance(expected, str):
        assert replies == (b"250 2.1.0 Ok\r\n" if sender else b"250 2.1.5 Ok\r\n")
        assert client.events[-1].address == expected
    else:
        assert replies == expected
        assert type(client.events[-1]) is (Helo if sender else Mail)


def test_source_route_without_a_mailbox_is_not_a_null_sender():
    assert reply_to(EHLO, b"MAIL FROM:<@a.example:>") == b"501 5.1.7 Bad sender address syntax\r\n"
    assert reply_to(EHLO, b"MAIL FROM:<@:>") == b"501 5.1.7 Bad sender address syntax\r\n"


@pytest.mark.parametrize(
    "route",
    [b"@:", b"@,@a.example:", b"@a.example,b.example:", b"@a..example:", b"@a.example;@b.example:"],
)
def test_malformed_source_routes_are_refused(route):
    reply = reply_to(EHLO + MAIL, b"RCPT TO:<" + route + b"user@example.net>")
    assert reply == b"501 5.1.3 Bad recipient address syntax\r\n"


def _path(local: int, domain: int) -> bytes:
    labels = []
    left = domain
    while left > 63:
        n = 63 if left >= 65 else 61  # never leave an empty last label
        labels.append(b"d" * n)
        left -= n + 1
    labels.append(b"d" * left)
    dom = b".".join(labels)
    assert len(dom) == domain, (len(dom), domain)
    return b"l" * local + b"@" + dom


@pytest.mark.parametrize(
    "local, domain, reply",
    [
        (64, 20, b"250 2.1.5 Ok\r\n"),
        (65, 20, b"501 5.1.3 Local part too long\r\n"),
        (64, 189, b"250 2.1.5 Ok\r\n"),  # <path> is exactly 256 octets
        (64, 190, b"501 5.1.3 Path too long\r\n"),
        (1, 252, b"250 2.1.5 Ok\r\n"),
        (1, 253, b"501 5.1.3 Path too long\r\n"),
        (1, 300, b"501 5.1.3 Path too long\r\n"),
    ],
)
def test_address_length_limits(local, domain, reply):
    path = _path(local, domain)
    assert reply_to(EHLO + MAIL, b"RCPT TO:<" + path + b">") == reply


def test_domain_length_limit_in_parse_path():
    # The domain limit (255) is only reachable past the 256-octet path limit,
    # so it is checked directly.
    with pytest.raises(AddressError) as info:
        parse_path("<a@" + "d" * 256 + ">", sender=False)
    assert info.value.reply.status_code == 501


def test_path_limit_counts_octets_not_characters():
    local = "\u00e9" * 30  # 60 octets
    domain = ".".join(["\u00e9" * 25] * 4)  # 203 octets
    path = f"<{local}@{domain}>".encode()
    assert 256 < len(path) and len(path.decode()) < 256
    client = Client()
    client.send(EHLO + b"MAIL FROM:<a@example.org> SMTPUTF8\r\n")
    assert client.send(b"RCPT TO:" + path + b"\r\n") == b"501 5.1.3 Path too long\r\n"


def test_path_limit_includes_the_source_route():
    route = b"@" + b"r" * 250 + b":"
    reply = reply_to(EHLO + MAIL, b"RCPT TO:<" + route + b"user@example.net>")
    assert reply == b"501 5.1.3 Path too long\r\n"


# ------------------------------------------------------------------ SMTPUTF8
UTF8_ADDR = "<j\u00f6rg@\u00e9xample.org>".encode()


def test_non_ascii_sender_needs_smtputf8():
    assert reply_to(EHLO, b"MAIL FROM:" + UTF8_ADDR) == (
        b"553 5.6.7 Non-ASCII sender address requires SMTPUTF8\r\n"
    )
    _, client = feed(EHLO + b"MAIL FROM:" + UTF8_ADDR + b" SMTPUTF8\r\n")
    assert client.events[-1] == Mail(
        Address.parse("j\u00f6rg@\u00e9xample.org"), {"SMTPUTF8": None}
    )


def test_non_ascii_recipient_needs_smtputf8_on_mail():
    assert reply_to(EHLO + MAIL, b"RCPT TO:" + UTF8_ADDR) == (
        b"553 5.6.7 Non-ASCII recipient address requires SMTPUTF8\r\n"
    )
    setup = EHLO + b"MAIL FROM:<a@example.org> SMTPUTF8\r\n"
    assert reply_to(setup, b"RCPT TO:" + UTF8_ADDR) == b"250 2.1.5 Ok\r\n"


def test_smtputf8_in_a_helo_session_needs_ehlo():
    reply = reply_to(HELO, b"MAIL FROM:" + UTF8_ADDR + b" SMTPUTF8", legacy=True)
    assert reply == b"555 MAIL parameters need EHLO\r\n"
    reply = reply_to(HELO, b"MAIL FROM:" + UTF8_ADDR + b" SMTPUTF8")
    assert reply == b"555 5.5.4 MAIL parameters need EHLO\r\n"


def test_non_ascii_sender_when_smtputf8_is_off():
    reply = reply_to(EHLO, b"MAIL FROM:" + UTF8_ADDR + b" SMTPUTF8", smtputf8=False)
    assert reply == b"553 5.6.7 Non-ASCII sender address requires SMTPUTF8\r\n"


@pytest.mark.parametrize(
    "params, reply",
    [
        # A ">" in a later value does not hide the SMTPUTF8 before it...
        (b" SMTPUTF8 ENVID=a>b", b"250 2.1.0 Ok\r\n"),
        (b" SIZE=10 SMTPUTF8 ENVID=<>", b"250 2.1.0 Ok\r\n"),
        # ... nor does a value ending in "SMTPUTF8" declare it.
        (b" ENVID=x>SMTPUTF8", b"553 5.6.7 Non-ASCII sender address requires SMTPUTF8\r\n"),
        (b" ENVID=SMTPUTF8", b"553 5.6.7 Non-ASCII sender address requires SMTPUTF8\r\n"),
    ],
)
def test_smtputf8_is_read_from_the_parsed_parameters(params, reply):
    assert reply_to(EHLO, b"MAIL FROM:" + UTF8_ADDR + params) == reply


def test_smtputf8_with_the_auth_parameter_postfix_sends():
    """Postfix as an authenticated client sends ``SMTPUTF8 AUTH=<>``."""
    from bonzo.protocol import Policy

    policy = Policy(auth_mechanisms=("PLAIN",), auth_plaintext=True)
    mail = b"MAIL FROM:" + UTF8_ADDR + b" SIZE=331 SMTPUTF8 AUTH=<>"
    assert reply_to(EHLO, mail, policy=policy) == b"250 2.1.0 Ok\r\n"


def test_smtputf8_inside_a_quoted_local_part_is_not_the_parameter():
    arg = '<"SMTPUTF8 \u00e9"@example.org>'.encode()
    assert codes(reply_to(EHLO, b"MAIL FROM:" + arg)) == [553]


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<\xff@example.org>",
        b"MAIL FROM:<a@example.org> SMTPUTF8 \xc3",
        b"NOOP \xed\xa0\x80",  # an encoded surrogate is not UTF-8
        b"HELO \xc0\xaf",  # overlong encoding
        b"\xff\xfe",
    ],
)
def test_invalid_utf8_is_refused(line):
    client = Client()
    client.send(EHLO)
    assert client.send(line + b"\r\n") == b"500 5.5.2 Error: bad UTF-8 syntax\r\n"
    assert client.send(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


# ---------------------------------------------------- control characters
@pytest.mark.parametrize("ctl", [b"\x00", b"\r", b"\x7f", b"\t", b"\x1b", b"\x0b", b"\x0c"])
@pytest.mark.parametrize(
    "template",
    [
        b"HELO c%s.example",
        b"MAIL FROM:<a%s@example.org>",
        b"MAIL FROM:<a@example.org> SIZE=1%s",
        b"RCPT TO:<b@exa%smple.net>",
        b"VRFY b%sob",
        b"NOOP%s",
        b"XFOO %s",
    ],
)
def test_control_characters_in_commands_are_501(ctl, template):
    client = Client()
    client.send(EHLO + MAIL)
    replies = client.send(template.replace(b"%s", ctl) + b"\r\n")
    assert replies == b"501 5.5.2 Syntax error: control characters are not allowed\r\n"
    assert len(client.events) == 2  # no event for the refused line
    assert client.send(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


@pytest.mark.parametrize(
    ("line", "stage"),
    [
        (b"\x1b[31mRED\x1b[0m hi", "\\x1b[31MRED\\x1b[0M"),
        (b"NO\x00OP", "NO\\x00OP"),
        (b"X\rY foo", "X\\x0dY"),
        (b"\xff\xfeVERB x", "\\xff\\xfeVERB"),
        (b"VERB" + b"x" * 600, "VERBXXXXXXXXXXXX"),
    ],
)
def test_the_verb_of_a_refused_line_is_escaped_for_the_log(line, stage):
    """The refusal's log line names the stage: never a raw control
    character, which could forge or overwrite log lines on a terminal."""
    client = Client()
    client.send(EHLO)
    assert codes(client.send(line + b"\r\n"))[0] in (500, 501)
    assert client.proto.stage == stage
    assert client.proto.stage.isprintable() and client.proto.stage.isascii()


@pytest.mark.parametrize("ctl", ["\u0085", "\u009b", "\u0080"])
def test_c1_control_characters_are_501(ctl):
    replies = reply_to(EHLO, ("MAIL FROM:<a" + ctl + "@example.org> SMTPUTF8").encode())
    assert codes(replies) == [501]


def test_control_characters_in_legacy_session():
    assert reply_to(b"", b"HELO a\x00b", legacy=True) == (
        b"501 Syntax error: control characters are not allowed\r\n"
    )
    assert reply_to(b"", b"HELO a\x00b") == (
        b"501 5.5.2 Syntax error: control characters are not allowed\r\n"
    )


# ------------------------------------------------------------------ limits
def test_command_line_limit_is_512_with_crlf():
    ok = b"NOOP " + b"x" * 505  # 510 + CRLF = 512
    assert reply_to(EHLO, ok) == b"250 2.0.0 Ok\r\n"
    assert reply_to(EHLO, ok + b"x") == b"500 5.5.2 Line too long\r\n"
    assert reply_to(b"", ok + b"x", legacy=True) == b"500 Error: line too long\r\n"
    assert reply_to(b"", ok + b"x") == b"500 5.5.2 Line too long\r\n"


@pytest.mark.parametrize("verb", [b"MAIL FROM:", b"RCPT TO:"])
def test_mail_and_rcpt_get_the_extension_allowance(verb):
    base = verb + b"<a@example.org>"
    ok = base + b" " * (1022 - len(base))  # 1022 + CRLF = 1024
    setup = EHLO if verb.startswith(b"MAIL") else EHLO + MAIL
    assert codes(reply_to(setup, ok)) == [250]
    assert reply_to(setup, ok + b" ") == b"500 5.5.2 Line too long\r\n"


def test_command_line_limit_setting():
    ok = b"NOOP " + b"x" * 1000
    assert reply_to(EHLO, ok, max_command_line=1024) == b"250 2.0.0 Ok\r\n"
    assert codes(reply_to(EHLO, ok + b"x" * 20, max_command_line=1024)) == [500]


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_overlong_line_is_discarded_then_answered_once(ending):
    client = Client()
    client.send(EHLO)
    for _ in range(10):
        assert client.send(b"A" * 1000) == b""
        assert client.proto.buffered <= 2048
    assert client.proto.partial_line
    replies = client.send(b"MAIL FROM:<evil@example.org>" + ending + b"NOOP\r\n")
    assert replies == b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n"
    assert not client.proto.in_transaction
    assert not client.proto.partial_line


def test_overlong_line_in_one_chunk():
    replies, _ = feed(EHLO + b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
    assert replies[len(EHLO_REPLY) :] == b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n"


def test_overlong_line_reply_is_the_same_in_reject_mode():
    line = b"NOOP " + b"x" * 1100 + b"\n"
    whole, _ = feed(EHLO + line, bare_newline="reject")
    split, _ = feed(EHLO, line[:1050], line[1050:], bare_newline="reject")
    assert whole == split
    assert whole.endswith(b"500 5.5.2 Line too long\r\n")


def test_data_line_limit():
    ok = b"x" * 8190 + b"\r\n"  # 8192 with CRLF
    replies, client = message(ok + b".\r\n")
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [ok]
    replies, client = message(b"x" * 8191 + b"\r\n.\r\n")
    assert replies == b"500 5.5.2 Line too long\r\n"
    assert client.message_errors[0].status_code == 500
    assert not client.proto.in_transaction
    assert client.send(b"NOOP\r\n") == b"250 2.0.0 Ok\r\n"


def test_data_line_limit_is_answered_only_after_the_data():
    client = Client(max_data_line=1000)
    client.send(OPEN)
    assert client.send(b"y" * 5000) == b""
    assert client.proto.buffered <= 1000
    assert client.send(b"y" * 5000 + b"\r\nmore\r\n") == b""
    assert client.proto.in_data
    assert client.send(b".\r\nNOOP\r\n") == b"500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n"


def test_data_line_limit_with_bare_lf_lines_is_chunking_independent():
    # Many short lines ending in bare LF are not one long line, however
    # they arrive; and they are never buffered without bound.
    body = b"a\n" * 20000 + b"\r\n.\r\n"
    whole, client = message(body)
    assert whole == b"250 2.0.0 Ok\r\n"
    expected = client.messages[0]
    assert expected == b"a\r\n" * 20000 + b"\r\n"
    client = Client()
    client.send(OPEN)
    pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)]
    replies = b""
    for piece in pieces:
        replies += client.send(piece)
        assert client.proto.buffered <= 8192
    assert replies == whole
    assert client.messages == [expected]


@pytest.mark.parametrize("size, reply", [(1000, b"250 2.0.0 Ok\r\n"), (1001, None)])
def test_message_size_limit(size, reply):
    body = b"x" * (size - 2) + b"\r\n"
    client = Client(max_message_size=1000)
    client.send(OPEN)
    assert client.send(body) == b""  # never answered mid-DATA
    replies = client.send(b".\r\n")
    if reply is None:
        assert replies == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        assert len(client.message_errors) == 1
        assert client.message_errors[0].enhanced_code == "5.3.4"
    else:
        assert replies == reply
        assert client.messages == [body]
    assert client.send(b"MAIL FROM:<a@example.org>\r\n") == b"250 2.1.0 Ok\r\n"


def test_message_size_zero_means_no_limit():
    body = b"x" * 998 + b"\r\n"
    replies, client = message(body * 200 + b".\r\n", max_message_size=0)
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [body * 200]


def test_data_limits_in_a_legacy_session():
    client = Client(max_message_size=10, legacy=True)
    client.send(HELO + TXN + DATA)
    assert client.send(b"x" * 20 + b"\r\n.\r\n") == (
        b"552 Message size exceeds fixed maximum message size\r\n"
    )
    client.send(TXN + DATA)
    assert client.send(b"y" * 9000 + b"\r\n.\r\n") == b"500 Line too long\r\n"


def test_message_size_counts_unstuffed_content():
    body = b".." + b"x" * 997 + b"\r\n"  # 1001 on the wire, 1000 once unstuffed
    replies, client = message(body + b".\r\n", max_message_size=1000)
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [body[1:]]


def test_oversized_message_is_read_to_the_end():
    client = Client(max_message_size=1000)
    client.send(OPEN)
    chunk = b"line of text\r\n" * 100
    for _ in range(50):
        assert client.send(chunk) == b""
        assert client.proto.buffered < 100
    assert client.send(b".\r\nMAIL FROM:<a@example.org>\r\n") == (
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.1.0 Ok\r\n"
    )


def test_recipient_limit():
    client = Client(max_recipients=100)
    client.send(EHLO + MAIL)
    replies = client.send(b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(100)))
    assert codes(replies) == [250] * 100
    assert client.send(RCPT) == b"452 4.5.3 Too many recipients\r\n"
    assert client.proto.rcpt_count == 100
    assert client.send(DATA) == b"354 End data with <CR><LF>.<CR><LF>\r\n"


def test_recipients_past_the_limit_do_not_end_a_pipelining_session():
    """A client that pipelines 200 recipients against a limit of 100 gets 100
    452s, none of which counts towards max_errors (20): its transaction and
    session survive, and it sends the rest in a new transaction. Only past
    twice the limit does each excess recipient count."""
    client = Client(max_recipients=100, max_errors=20)
    client.send(EHLO + MAIL)
    replies = client.send(b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(200)))
    assert codes(replies) == [250] * 100 + [452] * 100
    assert client.proto.errors == 0 and not client.closed
    assert client.send(DATA) == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert len(client.messages) == 1
    # A new transaction starts the allowance again; past it, errors count.
    client.send(MAIL)
    replies = client.send(b"".join(b"RCPT TO:<s%d@example.net>\r\n" % i for i in range(221)))
    assert codes(replies) == [250] * 100 + [452] * 120 + [421]
    assert client.closed


def test_rejected_recipients_count_as_errors():
    def decide(proto, event):
        if isinstance(event, Rcpt) and event.address.startswith("no"):
            return PermanentError("No such user", 550, "5.1.1")
        return default_decision(proto, event)

    client = Client(decide=decide, max_recipients=100)
    client.send(EHLO + MAIL)
    replies = client.send(b"RCPT TO:<no@example.net>\r\n" * 50)
    assert codes(replies) == [550] * 20 + [421]  # the error budget runs out first
    assert client.closed


def test_messages_per_connection_limit():
    client = Client(max_messages_per_connection=2)
    client.send(EHLO)
    one = TXN + DATA + b"hi\r\n.\r\n"
    assert codes(client.send(one + one)) == [250, 250, 354, 250] * 2
    assert client.send(MAIL) == b"452 4.5.3 Too many messages for this connection\r\n"
    assert client.send(b"RSET\r\nNOOP\r\n") == b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"
    assert codes(client.send(MAIL)) == [452]


def test_refused_messages_do_not_count_toward_the_limit():
    def decide(proto, event):
        if isinstance(event, MessageComplete):
            return TransientError("Try later", 451, "4.3.0")
        return default_decision(proto, event)

    client = Client(decide=decide, max_messages_per_connection=1)
    client.send(EHLO)
    one = TXN + DATA + b"hi\r\n.\r\n"
    assert codes(client.send(one + one)) == [250, 250, 354, 451] * 2
    assert client.proto.messages == 0


def test_unknown_command_limit_closes_with_421():
    client = Client()
    client.send(EHLO)
    replies = client.send(b"XFOO\r\n" * 10)
    assert replies == b"500 5.5.2 Error: command not recognized\r\n" * 10
    assert client.send(b"XFOO\r\nNOOP\r\nQUIT\r\n") == (
        b"421 4.7.0 Too many unknown commands, closing connection\r\n"
    )
    assert client.closed
    assert client.proto.next_event() is CLOSED
    assert client.send(b"NOOP\r\n") == b""
    assert client.proto.buffered == 0


def test_unknown_command_limit_legacy_text():
    replies, client = feed(b"XFOO\r\n" * 12, max_unknown_commands=2, legacy=True)
    assert split_replies(replies) == [b'502 Error: command "XFOO" not implemented\r\n'] * 2 + [
        b"421 Too many unknown commands, closing connection\r\n"
    ]
    assert client.closed


def test_error_limit_closes_with_421_and_drops_buffered_lines():
    client = Client()
    client.send(EHLO)
    assert codes(client.send(RCPT * 20)) == [503] * 20
    replies = client.send(RCPT + b"NOOP\r\n" + MAIL)
    assert replies == b"421 4.7.0 Too many errors, closing connection\r\n"
    assert client.closed
    assert not any(isinstance(e, Mail) for e in client.events)


def test_error_limit_counts_policy_rejections():
    def decide(proto, event):
        if isinstance(event, Rcpt):
            return PermanentError("Relay denied", 554, "5.7.1")
        return default_decision(proto, event)

    client = Client(decide=decide, max_errors=3)
    client.send(EHLO + MAIL)
    replies = client.send(RCPT * 3 + b"NOOP\r\n")
    assert replies == b"554 5.7.1 Relay denied\r\n" * 3 + b"250 2.0.0 Ok\r\n"
    assert client.send(RCPT + b"NOOP\r\n") == b"421 4.7.0 Too many errors, closing connection\r\n"
    assert client.closed


def test_error_limit_counts_syntax_errors_of_every_kind():
    lines = [
        b"",  # 500
        b"HELO",  # 501
        b"NOOP \x00",  # 501 control
        b"\xff",  # 500 UTF-8
        b"NOOP " + b"x" * 600,  # 500 too long
        b"DATA",  # 503
        b"XFOO",  # 500 unknown (rejected event)
    ]
    client = Client(max_errors=len(lines))
    client.send(EHLO)
    replies = client.send(b"".join(line + b"\r\n" for line in lines))
    assert len(split_replies(replies)) == len(lines)
    assert client.send(b"HELO\r\n") == b"421 4.7.0 Too many errors, closing connection\r\n"


def test_a_421_reject_closes_the_session():
    def decide(proto, event):
        if isinstance(event, Mail):
            return TransientError("Shutting down", 421, "4.3.2")
        return default_decision(proto, event)

    replies, client = feed(EHLO + MAIL + b"NOOP\r\n", decide=decide)
    assert replies.endswith(b"250 HELP\r\n421 4.3.2 Shutting down\r\n")
    assert client.closed


def test_a_reject_with_close_closes_the_session():
    def decide(proto, event):
        if isinstance(event, Helo):
            return PermanentError("Blocked", 554, "5.7.1", close=True)
        return default_decision(proto, event)

    replies, client = feed(EHLO + b"NOOP\r\n", decide=decide)
    assert replies == b"554 5.7.1 Blocked\r\n"
    assert client.closed and client.events == [Helo("client.example", True)]


# ------------------------------------------------------------- sequencing
def test_ehlo_mid_transaction_resets_it():
    client = Client()
    client.send(EHLO + TXN)
    assert client.proto.in_transaction
    assert client.send(EHLO) == EHLO_REPLY
    assert not client.proto.in_transaction
    assert client.send(RCPT) == b"503 5.5.1 Error: need MAIL command\r\n"
    assert client.send(DATA) == b"503 5.5.1 Error: need RCPT command\r\n"
    assert client.send(MAIL) == b"250 2.1.0 Ok\r\n"


def test_helo_after_ehlo_resets_and_switches_to_legacy_replies():
    client = Client(legacy=True)
    client.send(EHLO + TXN)
    assert client.send(HELO) == LEGACY_HELO_REPLY
    assert not client.proto.in_transaction and not client.proto.esmtp
    assert client.send(RCPT) == b"503 Error: need MAIL command\r\n"
    assert client.send(b"HELO again\r\n") == b"503 Duplicate HELO/EHLO\r\n"
    assert client.send(EHLO) == EHLO_REPLY


def test_ehlo_after_helo_is_allowed():
    client = Client()
    client.send(HELO + MAIL)
    assert client.send(EHLO) == EHLO_REPLY
    assert client.proto.esmtp and not client.proto.in_transaction


@pytest.mark.parametrize("setup", [b"", EHLO, EHLO + MAIL, EHLO + TXN, HELO + TXN])
def test_rset_is_always_250_and_ends_the_transaction(setup):
    client = Client()
    client.send(setup)
    replies = client.send(b"RSET\r\n")
    assert codes(replies) == [250]
    assert not client.proto.in_transaction
    assert client.proto.rcpt_count == 0
    assert client.events[-1] == Reset()
    assert client.proto.helo == (None if not setup else "client.example")


def test_rset_cannot_be_rejected():
    proto = SMTPProtocol(SETTINGS, "192.0.2.1")
    proto.receive_data(b"RSET\r\n")
    assert proto.next_event() == Reset()
    with pytest.raises(RuntimeError):
        proto.reject(PermanentError("no"))
    proto.accept()
    assert proto.data_to_send() == b"250 2.0.0 Ok\r\n"


def test_rejected_mail_leaves_no_transaction():
    def decide(proto, event):
        if isinstance(event, Mail):
            return PermanentError("Sender refused", 550, "5.7.1")
        return default_decision(proto, event)

    replies, client = feed(EHLO + TXN + DATA, decide=decide)
    assert codes(replies) == [250, 550, 503, 503]
    assert not client.proto.in_transaction


def test_rejected_recipients_mean_no_data():
    def decide(proto, event):
        if isinstance(event, Rcpt):
            return PermanentError("No such user", 550, "5.1.1")
        return default_decision(proto, event)

    replies, client = feed(EHLO + TXN + DATA + b"Subject: x\r\n", decide=decide)
    assert codes(replies)[1:] == [250, 550, 503, 500]
    assert not client.proto.in_data


def test_rejected_data_stays_in_the_transaction():
    def decide(proto, event):
        if isinstance(event, Data):
            return TransientError("Not now", 451, "4.3.0")
        return default_decision(proto, event)

    client = Client(decide=decide)
    assert codes(client.send(EHLO + TXN + DATA)) == [250, 250, 250, 451]
    assert client.proto.in_transaction and not client.proto.in_data
    assert client.send(RCPT) == b"250 2.1.5 Ok\r\n"


def test_new_transaction_after_a_message():
    client = Client()
    client.send(OPEN + b"hi\r\n.\r\n")
    assert not client.proto.in_transaction
    assert client.send(RCPT) == b"503 5.5.1 Error: need MAIL command\r\n"
    assert codes(client.send(TXN + DATA + b"again\r\n.\r\n")) == [250, 250, 354, 250]
    assert client.messages == [b"hi\r\n", b"again\r\n"]
    assert client.proto.messages == 2


def test_refused_message_ends_the_transaction():
    def decide(proto, event):
        if isinstance(event, MessageComplete):
            return PermanentError("Spam", 554, "5.7.1")
        return default_decision(proto, event)

    client = Client(decide=decide)
    assert client.send(OPEN + b"buy now\r\n.\r\n").endswith(b"554 5.7.1 Spam\r\n")
    assert not client.proto.in_transaction
    assert client.send(RCPT) == b"503 5.5.1 Error: need MAIL command\r\n"


# --------------------------------------------------------------- pipelining
def test_pipelined_batch_one_reply_per_command_in_order():
    batch = (
        EHLO
        + b"MAIL FROM:<a@example.org>\r\n"
        + b"RCPT TO:<b1@example.net>\r\n"
        + b"RCPT TO:<bad address>\r\n"
        + b"RCPT TO:<b2@example.net>\r\n"
        + b"NOOP\r\n"
        + b"XFOO\r\n"
        + b"DATA\r\n"
    )
    client = Client()
    client.proto.receive_data(batch)
    client.drain()
    replies = client.proto.data_to_send()
    assert split_replies(replies) == [
        EHLO_REPLY,
        b"250 2.1.0 Ok\r\n",
        b"250 2.1.5 Ok\r\n",
        b"501 5.1.3 Bad recipient address syntax\r\n",
        b"250 2.1.5 Ok\r\n",
        b"250 2.0.0 Ok\r\n",
        b"500 5.5.2 Error: command not recognized\r\n",
        b"354 End data with <CR><LF>.<CR><LF>\r\n",
    ]
    assert client.proto.data_to_send() == b""


def test_replies_wait_for_the_pending_decision():
    proto = SMTPProtocol(SETTINGS, "192.0.2.1")
    proto.receive_data(EHLO + b"NOOP\r\n" + MAIL + b"NOOP\r\n")
    assert proto.next_event() == Helo("client.example", True)
    assert proto.data_to_send() == b""
    with pytest.raises(RuntimeError):
        proto.next_event()
    proto.accept()
    event = proto.next_event()
    assert event == Mail(Address.parse("alice@example.org"), {})
    # The NOOP before the MAIL is answered; the one after it is not yet.
    assert proto.data_to_send() == EHLO_REPLY + b"250 2.0.0 Ok\r\n"
    proto.accept()
    assert proto.next_event() is NEED_DATA
    assert proto.data_to_send() == b"250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n"


def test_quit_ends_the_batch():
    replies, client = feed(EHLO + b"QUIT\r\n" + MAIL + b"NOOP\r\n")
    assert replies == EHLO_REPLY + b"221 2.0.0 Bye\r\n"
    assert client.closed and len(client.events) == 1


def test_pipelined_after_the_final_dot_runs_after_the_message_reply():
    replies, client = feed(
        OPEN + b"Hello\r\n.\r\nMAIL FROM:<c@example.org>\r\nRCPT TO:<d@example.net>\r\nQUIT\r\n"
    )
    assert split_replies(replies)[-4:] == [
        b"250 2.0.0 Ok\r\n",
        b"250 2.1.0 Ok\r\n",
        b"250 2.1.5 Ok\r\n",
        b"221 2.0.0 Bye\r\n",
    ]
    assert client.messages == [b"Hello\r\n"]
    assert client.events[-1] == Rcpt(Address.parse("d@example.net"), {})


def test_line_split_anywhere_gives_the_same_replies():
    data = EHLO + TXN + b"NOOP\r\nRSET\r\n"
    whole, _ = feed(data)
    for a, b in all_splits(data):
        assert feed(a, b)[0] == whole


def test_partial_line_is_not_answered():
    client = Client()
    assert client.send(b"NOO") == b""
    assert client.proto.partial_line
    assert client.send(b"P\r") == b""
    assert client.send(b"\n") == b"250 2.0.0 Ok\r\n"
    assert not client.proto.partial_line


@pytest.mark.parametrize("mode", ["normalize", "allow"])
def test_bare_lf_ends_a_command_line(mode):
    replies, client = feed(b"NOOP\nRSET\n", bare_newline=mode)
    assert replies == b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"
    assert "bare_lf" in client.proto.notes


def test_bare_lf_command_in_reject_mode():
    replies, client = feed(EHLO + b"NOOP\nNOOP\r\n", bare_newline="reject")
    assert replies[len(EHLO_REPLY) :] == (
        b"500 5.5.2 Bare LF received, lines must end with CRLF\r\n250 2.0.0 Ok\r\n"
    )


# ------------------------------------------------------------------- BDAT
# CHUNKING off (tests/test_chunking.py has it on).
def test_bdat_chunk_is_discarded_not_run_as_commands():
    chunk = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<x@example.net>\r\n"
    client = Client(chunking=False)
    client.send(EHLO)
    replies = client.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk[:10], chunk[10:] + b"NOOP\r\n")
    assert replies == b"502 5.5.1 Error: CHUNKING not supported\r\n250 2.0.0 Ok\r\n"
    assert not any(isinstance(e, (Mail, Rcpt)) for e in client.events)


def test_bdat_split_at_every_point():
    data = EHLO + b"BDAT 6\r\nRSET\r\nNOOP\r\n"
    whole, _ = feed(data, chunking=False)
    assert whole.endswith(
        b"250 HELP\r\n502 5.5.1 Error: CHUNKING not supported\r\n250 2.0.0 Ok\r\n"
    )
    assert b"CHUNKING\r\n" not in whole
    for a, b in all_splits(data):
        replies, client = feed(a, b, chunking=False)
        assert replies == whole
        assert not any(isinstance(e, Reset) for e in client.events)


@pytest.mark.parametrize("arg", [b"", b"x", b"-1", b"1e3", b"999999999999999999999"])
def test_bdat_without_a_usable_size_closes(arg):
    replies, client = feed(EHLO + b"BDAT " + arg + b"\r\nNOOP\r\n")
    assert replies.endswith(b"421 4.7.0 Bad BDAT command, closing connection\r\n")
    assert client.closed


# --------------------------------------------------------------- DATA content
@pytest.mark.parametrize(
    "wire, content",
    [
        (b".\r\n", b""),
        (b"\r\n.\r\n", b"\r\n"),
        (b"Hello\r\n.\r\n", b"Hello\r\n"),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"...\r\n.\r\n", b"..\r\n"),
        (b"..leading\r\n.\r\n", b".leading\r\n"),
        (b"a\r\n..b\r\n..\r\n.c\r\n.\r\n", b"a\r\n.b\r\n.\r\nc\r\n"),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b" .\r\n.\r\n", b" .\r\n"),
        (b"a.\r\n.\r\n", b"a.\r\n"),
        (b"a\r\n. \r\n.\r\n", b"a\r\n \r\n"),
        (b"\r\n\r\n\r\n.\r\n", b"\r\n\r\n\r\n"),
        (b"8bit \xe9\xff\x00 bytes\r\n.\r\n", b"8bit \xe9\xff\x00 bytes\r\n"),
    ],
)
def test_dot_unstuffing(wire, content):
    replies, client = message(wire)
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [content]


def test_empty_message():
    replies, client = message(b".\r\n")
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [b""]
    assert client.chunks == 0


def test_no_reply_until_the_final_dot():
    client = Client()
    client.send(OPEN)
    assert client.send(b"Subject: x\r\n\r\nbody\r\n") == b""
    assert client.proto.in_data
    assert client.send(b".") == b""
    assert client.send(b"\r") == b""
    assert client.send(b"\n") == b"250 2.0.0 Ok\r\n"
    assert not client.proto.in_data


def test_content_is_emitted_as_it_arrives():
    client = Client()
    client.send(OPEN)
    client.send(b"line one\r\nline tw")
    assert client.content == b"line one\r\n"
    client.send(b"o\r\n")
    assert client.content == b"line one\r\nline two\r\n"
    client.send(b".\r\n")
    assert client.messages == [b"line one\r\nline two\r\n"]


# Smuggling: none of these is an end of data; the second "message" must stay
# content and no second transaction may appear.
SMUGGLE_ENDS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\n.\r\r\n",
    b"\r\n \r\n.\r\r\n",
    b"\n..\n",
    b"\r\r\n..\r\r\n",
]
SMUGGLED = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nevil"

# What normalize stores for each variant (bare CR / LF become CRLF, and a
# dot at the start of a line after CRLF or after a bare LF is unstuffed, as
# a client that sends LF line ends stuffs it; a bare CR starts no line for
# unstuffing). None of them ends the message.
NORMALIZED = {
    b"\n.\n": b"\r\n\r\n",
    b"\n.\r\n": b"\r\n\r\n",
    b"\r\n.\n": b"\r\n\r\n",
    b"\r.\r": b"\r\n.\r\n",
    b"\r.\r\n": b"\r\n.\r\n",
    b"\r\n.\r": b"\r\n\r\n",
    b"\n.\r": b"\r\n\r\n",
    b"\r.\n": b"\r\n.\r\n",
    b"\r\n.\r\r\n": b"\r\n\r\n\r\n",
    b"\r\n \r\n.\r\r\n": b"\r\n \r\n\r\n\r\n",
    b"\n..\n": b"\r\n.\r\n",
    b"\r\r\n..\r\r\n": b"\r\n\r\n.\r\n\r\n",
}


@pytest.mark.parametrize("end", SMUGGLE_ENDS)
@pytest.mark.parametrize("mode", ["normalize", "reject", "allow"])
def test_smuggling_variants_are_content(end, mode):
    body = b"first" + end + SMUGGLED + b"\r\n.\r\n"
    replies, client = message(body, bare_newline=mode)
    assert len(client.messages) == 1
    assert not any(isinstance(e, Mail) for e in client.events[2:])
    if mode == "reject":
        assert replies == b"550 5.5.2 Bare LF or CR in message content\r\n"
        assert [e.status_code for e in client.message_errors] == [550]
        return
    assert replies == b"250 2.0.0 Ok\r\n"
    stored = client.messages[0]
    if mode == "allow":
        # Verbatim, except that a dot after a real CRLF is unstuffed.
        assert stored == (b"first" + end + SMUGGLED + b"\r\n").replace(b"\r\n.", b"\r\n")
    else:
        assert stored == b"first" + NORMALIZED[end] + SMUGGLED + b"\r\n"
        assert stored.count(b"\r") == stored.count(b"\n") == stored.count(b"\r\n")


@pytest.mark.parametrize("start", [b".\n", b".\r", b".\n.\n", b".\r.\r"])
@pytest.mark.parametrize("mode", ["normalize", "allow"])
def test_smuggling_at_the_start_of_the_message(start, mode):
    body = start + SMUGGLED + b"\r\n.\r\n"
    replies, client = message(body, bare_newline=mode)
    assert replies == b"250 2.0.0 Ok\r\n"
    assert len(client.messages) == 1 and client.messages[0].endswith(b"evil\r\n")
    assert not any(isinstance(e, Mail) for e in client.events[2:])


def test_bare_newline_normalize_stores_crlf_only():
    replies, client = message(b"a\nb\rc\r\nd\r\r\n.\r\n")
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [b"a\r\nb\r\nc\r\nd\r\n\r\n"]
    assert "bare_lf_data" in client.proto.notes


def test_bare_newline_allow_stores_verbatim():
    replies, client = message(b"a\nb\rc\r\nd\r\r\n.\r\n", bare_newline="allow")
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [b"a\nb\rc\r\nd\r\r\n"]


@pytest.mark.parametrize("bare", [b"a\nb\r\n", b"a\rb\r\n", b"ab\r\r\n", b"\n", b"x\r\n\n"])
def test_bare_newline_reject_is_550_after_the_data(bare):
    client = Client(bare_newline="reject")
    client.send(OPEN)
    assert client.send(bare) == b""
    assert client.proto.in_data
    assert client.send(b"more\r\n.\r\nNOOP\r\n") == (
        b"550 5.5.2 Bare LF or CR in message content\r\n250 2.0.0 Ok\r\n"
    )
    assert not client.proto.in_transaction


def test_reject_mode_accepts_clean_crlf_content():
    replies, client = message(b"clean\r\n..dot\r\n.\r\n", bare_newline="reject")
    assert replies == b"250 2.0.0 Ok\r\n"
    assert client.messages == [b"clean\r\n.dot\r\n"]


def _shape(events):
    """Events with a finished message reduced to its error (its ``data`` is
    only the last piece, which depends on how the bytes arrived)."""
    return [
        (MessageComplete, e.error and e.error.status_code) if isinstance(e, MessageComplete) else e
        for e in events
    ]


def _split_everywhere(body: bytes, mode: str) -> None:
    """Feed ``body`` after DATA cut at every point (and at every pair of
    points for short bodies); replies and content must never change."""
    whole, ref = message(body, bare_newline=mode)
    points = range(len(body) + 1)
    cuts = [(i,) for i in points]
    if len(body) <= 40:
        cuts += [(i, j) for i in points for j in points if i < j]
    for cut in cuts:
        bounds = (0, *cut, len(body))
        pieces = [body[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        client = Client(bare_newline=mode)
        client.send(OPEN)
        assert client.send(*pieces) == whole, cut
        if ref.message_errors == [None]:
            assert client.messages == ref.messages, cut
        assert [e and e.status_code for e in client.message_errors] == [
            e and e.status_code for e in ref.message_errors
        ]
        assert _shape(client.events) == _shape(ref.events), cut


@pytest.mark.parametrize("mode", ["normalize", "reject", "allow"])
@pytest.mark.parametrize(
    "body",
    [
        b".\r\nNOOP\r\n",
        b"a\r\n.\r\nNOOP\r\n",
        b"..\r\n.\r\n",
        b"a\r\n..b\r\n.\r\nQUIT\r\n",
        b"\r\n.\r\n",
        b"a\r.\rb\r\n.\r\n",
        b"a\n.\nb\r\n.\r\n",
        b"a\r\n.\nb\r\n.\r\n",
        b"a\n.\r\nb\r\n.\r\n",
        b"a\r\n.\rb\r\n.\r\n",
        b".\n.\r\n.\r\n",
        b"x\r\r\n.\r\r\n.\r\n",
    ],
)
def test_terminator_split_at_every_byte_boundary(mode, body):
    _split_everywhere(body, mode)


def test_terminator_split_with_limits_broken():
    client = Client(max_message_size=10)
    client.send(OPEN)
    body = b"0123456789abc\r\n.\r\nNOOP\r\n"
    whole = client.send(body)
    assert whole == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 Ok\r\n"
    for a, b in all_splits(body):
        client = Client(max_message_size=10)
        client.send(OPEN)
        assert client.send(a, b) == whole


def test_message_errors_do_not_depend_on_chunking():
    # A long line after the size limit was passed: whichever way the bytes
    # arrive, the same error is reported.
    body = b"x" * 98 + b"\r\n" + b"y" * 1200 + b"\r\n.\r\n"
    settings = {"max_message_size": 50, "max_data_line": 1000}
    client = Client(**settings)
    client.send(OPEN)
    whole = client.send(body)
    assert whole == b"500 5.5.2 Line too long\r\n"  # outranks the size limit
    for cut in range(0, len(body), 7):
        client = Client(**settings)
        client.send(OPEN)
        assert client.send(body[:cut], body[cut:]) == whole, cut


def test_message_error_bare_lf_and_size_do_not_depend_on_chunking():
    body = b"x" * 60 + b"\r\n" + b"bare\nlf\r\n.\r\n"
    settings = {"max_message_size": 50, "bare_newline": "reject"}
    client = Client(**settings)
    client.send(OPEN)
    whole = client.send(body)
    assert whole == b"550 5.5.2 Bare LF or CR in message content\r\n"  # outranks size
    for a, b in all_splits(body):
        client = Client(**settings)
        client.send(OPEN)
        assert client.send(a, b) == whole


# ------------------------------------------------------------- API misuse
def test_accept_and_reject_need_a_pending_event():
    proto = SMTPProtocol(SETTINGS, "192.0.2.1")
    with pytest.raises(RuntimeError):
        proto.accept()
    with pytest.raises(RuntimeError):
        proto.reject(PermanentError())


def test_a_message_that_broke_a_limit_cannot_be_accepted():
    proto = SMTPProtocol(SETTINGS.replace(max_message_size=5), "192.0.2.1")
    proto.receive_data(OPEN + b"too long for the limit\r\n.\r\n")
    while True:
        event = proto.next_event()
        if isinstance(event, MessageComplete):
            break
        if not isinstance(event, DataChunk):
            proto.accept()
    assert event.error is not None and event.error.status_code == 552
    with pytest.raises(RuntimeError):
        proto.accept()
    proto.reject(event.error)
    assert proto.data_to_send().endswith(
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    )


def test_close_and_refuse():
    proto = SMTPProtocol(SETTINGS, "192.0.2.1")
    proto.refuse(TransientError("Too busy", 421, "4.7.0"))
    assert proto.closed and proto.next_event() is CLOSED
    assert proto.data_to_send() == b"421 4.7.0 Too busy\r\n"
    proto.close()  # a second close says nothing
    assert proto.data_to_send() == b""

    proto = SMTPProtocol(SETTINGS, "192.0.2.1")
    proto.receive_data(EHLO)
    proto.next_event()
    proto.accept()
    proto.close()
    assert proto.data_to_send().endswith(b"421 4.4.2 Service closing transmission channel\r\n")
    proto.receive_data(b"NOOP\r\n")
    assert proto.next_event() is CLOSED and proto.data_to_send() == b""


def test_pending_output_and_state_properties():
    proto = SMTPProtocol(SETTINGS, "192.0.2.1")
    proto.receive_data(EHLO + TXN + DATA + b"partial")
    for expected in (Helo, Mail, Rcpt, Data):
        event = proto.next_event()
        assert type(event) is expected and proto.pending_event is event
        proto.accept()
    assert proto.pending_output == len(OPEN_REPLIES)
    assert proto.in_data and proto.in_transaction and not proto.partial_line
    assert proto.next_event() is NEED_DATA
    assert proto.buffered == len(b"partial")


def test_help_lists_what_the_session_may_use_now():
    from bonzo.lmtp import LMTPProtocol
    from bonzo.protocol import Policy

    def help_after(setup: bytes, **kwargs: object) -> bytes:
        return reply_to(setup, b"HELP", **kwargs)  # type: ignore[arg-type]

    offered = Policy(starttls=True, auth_mechanisms=("PLAIN",), auth_plaintext=True)
    assert help_after(EHLO, policy=offered) == (
        b"214 2.0.0 Supported commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP "
        b"BDAT STARTTLS AUTH\r\n"
    )
    assert help_after(EHLO, chunking=False) == (
        b"214 2.0.0 Supported commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n"
    )
    # LMTP: LHLO, not the SMTP greetings it refuses.
    lmtp = help_after(b"LHLO client.example\r\n", kind=LMTPProtocol)
    assert lmtp.startswith(b"214 2.0.0 Supported commands: MAIL RCPT DATA")
    assert b"LHLO" in lmtp and b"EHLO" not in lmtp and b"HELO " not in lmtp
    # The original API's session that never said EHLO keeps the original list.
    assert help_after(HELO, legacy=True) == (
        b"214 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP\r\n"
    )


def test_the_mail_auth_parameter_only_where_ehlo_offered_auth():
    """RFC 4954 5 ties MAIL's AUTH= to the extension: not before STARTTLS on
    a listener that offers AUTH only under TLS."""
    from bonzo.protocol import Policy

    mail = b"MAIL FROM:<a@example.org> AUTH=<>"
    under_tls = Policy(starttls=True, auth_mechanisms=("PLAIN",))
    ehlo = reply_to(b"", b"EHLO client.example", policy=under_tls)
    assert b"AUTH" not in ehlo
    assert reply_to(EHLO, mail, policy=under_tls) == (b"555 5.5.4 Unsupported parameter AUTH\r\n")
    plaintext = Policy(starttls=True, auth_mechanisms=("PLAIN",), auth_plaintext=True)
    assert reply_to(EHLO, mail, policy=plaintext) == b"250 2.1.0 Ok\r\n"


def test_a_client_without_an_address_is_greeted_by_its_name():
    """A Unix socket's client has no address (``0.0.0.0``): the EHLO and
    HELO replies named that non-address ("Hello 0.0.0.0"); they give the
    name the client said."""
    for command, first in (
        (b"EHLO postfix.test\r\n", b"250-"),
        (b"HELO postfix.test\r\n", b"250 "),
    ):
        proto = SMTPProtocol(SETTINGS, "0.0.0.0")
        proto.send_greeting()
        proto.data_to_send()
        proto.receive_data(command)
        event = proto.next_event()
        proto.accept()
        reply = proto.data_to_send()
        assert reply.startswith(first) and b"Hello postfix.test\r\n" in reply, (event, reply)
        assert b"0.0.0.0" not in reply

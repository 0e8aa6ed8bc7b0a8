"""DSN (RFC 3461): the RET/ENVID parameters of MAIL and NOTIFY/ORCPT of
RCPT, their xtext, their checks in the core (bytes in, replies out), and
what plugins read of them on the envelope.
"""

from __future__ import annotations

import asyncio
import smtplib
import warnings
from typing import Any

import pytest
from e2e_support import RecordingPlugin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_helpers import EHLO, HELO, MAIL, Client, feed, split_replies

from bonzo import hookimpl
from bonzo.address import Address
from bonzo.dsn import (
    NO_MAIL_DSN,
    NO_RECIPIENT_DSN,
    DSNError,
    MailDSN,
    OriginalRecipient,
    RecipientDSN,
    mail_dsn,
    recipient_dsn,
    xtext_decode,
    xtext_encode,
)
from bonzo.hooks import PluginSet
from bonzo.hookspecs import Accept
from bonzo.protocol import Mail, Rcpt
from bonzo.session import Envelope
from bonzo.testing import PluginTestServer, SessionTester

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

with warnings.catch_warnings():  # as in test_protocol_props.py
    warnings.simplefilter("ignore")
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # pragma: no cover - libcst not installed
        pass

OK_MAIL = b"250 2.1.0 Ok\r\n"
OK_RCPT = b"250 2.1.5 Ok\r\n"
UTF8_BAD = b"501 5.5.4 Bad ORCPT parameter: not a utf-8 address (RFC 6533)\r\n"


def mail(params: bytes, **settings: Any) -> tuple[bytes, Client]:
    client = Client(**settings)
    client.send(EHLO)
    return client.send(b"MAIL FROM:<alice@example.org> " + params + b"\r\n"), client


def rcpt(params: bytes, **settings: Any) -> tuple[bytes, Client]:
    client = Client(**settings)
    client.send(EHLO + MAIL)
    return client.send(b"RCPT TO:<bob@example.net> " + params + b"\r\n"), client


# ------------------------------------------------------------------ EHLO
def test_ehlo_offers_dsn_unless_turned_off():
    assert b"250-DSN\r\n" in feed(EHLO)[0]
    assert b"DSN" not in feed(EHLO, dsn=False)[0]


# ------------------------------------------------------------------ MAIL
@pytest.mark.parametrize(
    "params, dsn",
    [
        (b"RET=FULL", MailDSN("FULL", None)),
        (b"RET=hdrs", MailDSN("HDRS", None)),
        (b"ret=Full", MailDSN("FULL", None)),
        (b"ENVID=QQ314159", MailDSN(None, "QQ314159")),
        (b"ENVID=a+2Bb+3Dc+20d", MailDSN(None, "a+b=c d")),
        (b"ENVID=a+2bb", MailDSN(None, "a+b")),  # lower-case hex digits are read too
        (b"RET=HDRS ENVID=x SIZE=10", MailDSN("HDRS", "x")),
        (b"ENVID=" + b"x" * 100, MailDSN(None, "x" * 100)),
        (b"ENVID=" + b"+41" * 100, MailDSN(None, "A" * 100)),
    ],
)
def test_mail_dsn_parameters_are_decoded_onto_the_event(params, dsn):
    replies, client = mail(params)
    assert replies == OK_MAIL
    (event,) = [e for e in client.events if isinstance(e, Mail)]
    assert event.dsn == dsn


def test_mail_without_dsn_parameters_has_the_empty_record():
    replies, client = mail(b"SIZE=10")
    assert replies == OK_MAIL
    assert client.events[-1].dsn is NO_MAIL_DSN
    assert not NO_MAIL_DSN


@pytest.mark.parametrize(
    "params, reply",
    [
        (b"RET", b"501 5.5.4 Bad RET parameter (FULL or HDRS)\r\n"),
        (b"RET=", b"501 5.5.4 Bad parameter syntax\r\n"),
        (b"RET=ALL", b"501 5.5.4 Bad RET parameter (FULL or HDRS)\r\n"),
        (b"RET=FULL RET=HDRS", b"501 5.5.4 Duplicate parameter RET\r\n"),
        (b"RET=FULL ret=FULL", b"501 5.5.4 Duplicate parameter RET\r\n"),
        (b"ENVID", b"501 5.5.4 Bad ENVID parameter\r\n"),
        (b"ENVID=a ENVID=b", b"501 5.5.4 Duplicate parameter ENVID\r\n"),
        (b"ENVID=a=b", b"501 5.5.4 Bad ENVID parameter: not xtext\r\n"),
        (b"ENVID=a+", b"501 5.5.4 Bad ENVID parameter: not xtext\r\n"),
        (b"ENVID=a+4", b"501 5.5.4 Bad ENVID parameter: not xtext\r\n"),
        (b"ENVID=a+GG", b"501 5.5.4 Bad ENVID parameter: not xtext\r\n"),
        (b"ENVID=caf\xc3\xa9", b"501 5.5.4 Bad ENVID parameter: not xtext\r\n"),
        # Decoded control characters would reach headers and logs.
        (b"ENVID=ab+0D+0Acd", b"501 5.5.4 Bad ENVID parameter\r\n"),
        (b"ENVID=a+00", b"501 5.5.4 Bad ENVID parameter\r\n"),
        (b"ENVID=a+7F", b"501 5.5.4 Bad ENVID parameter\r\n"),
        (b"ENVID=a+E9", b"501 5.5.4 Bad ENVID parameter\r\n"),
        (b"ENVID=" + b"x" * 101, b"501 5.5.4 Bad ENVID parameter\r\n"),
        # Keywords are ASCII: Unicode upper() would make "hdr\u017f" HDRS.
        ("RET=hdr\u017f SMTPUTF8".encode(), b"501 5.5.4 Bad RET parameter (FULL or HDRS)\r\n"),
    ],
)
def test_bad_mail_dsn_parameters_get_501(params, reply):
    replies, client = mail(params)
    assert replies == reply
    assert not client.proto.in_transaction
    assert client.refusals[-1][:3] == ("MAIL", 501, "5.5.4")


@pytest.mark.parametrize("params", [b"RET=FULL", b"ENVID=x"])
def test_mail_dsn_parameters_are_unknown_with_dsn_off(params):
    key = params.split(b"=")[0].decode()
    replies, _ = mail(params, dsn=False)
    assert replies == f"555 5.5.4 Unsupported parameter {key}\r\n".encode()


def test_mail_dsn_parameters_need_ehlo():
    client = Client()
    client.send(HELO)
    assert client.send(b"MAIL FROM:<a@example.org> RET=FULL\r\n") == (
        b"555 5.5.4 MAIL parameters need EHLO\r\n"
    )


# ------------------------------------------------------------------ RCPT
@pytest.mark.parametrize(
    "params, dsn",
    [
        (b"NOTIFY=NEVER", RecipientDSN(frozenset({"NEVER"}))),
        (b"NOTIFY=never", RecipientDSN(frozenset({"NEVER"}))),
        (b"NOTIFY=SUCCESS", RecipientDSN(frozenset({"SUCCESS"}))),
        (
            b"NOTIFY=success,Failure,DELAY",
            RecipientDSN(frozenset({"SUCCESS", "FAILURE", "DELAY"})),
        ),
        (
            b"ORCPT=rfc822;bob@example.net",
            RecipientDSN(None, OriginalRecipient("rfc822", "bob@example.net")),
        ),
        (
            b"ORCPT=RFC822;b+2Bx+20y@example.net",
            RecipientDSN(None, OriginalRecipient("RFC822", "b+x y@example.net")),
        ),
        (
            b"ORCPT=utf-8;caf\\x{E9}@example.net",
            RecipientDSN(None, OriginalRecipient("utf-8", "caf\\x{E9}@example.net")),
        ),
        (
            b"NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@example.net",
            RecipientDSN(
                frozenset({"FAILURE", "DELAY"}), OriginalRecipient("rfc822", "bob@example.net")
            ),
        ),
    ],
)
def test_rcpt_dsn_parameters_are_decoded_onto_the_event(params, dsn):
    replies, client = rcpt(params)
    assert replies == OK_RCPT
    (event,) = [e for e in client.events if isinstance(e, Rcpt)]
    assert event.dsn == dsn
    assert event.params  # as sent, for relaying


@pytest.mark.parametrize(
    "params, reply",
    [
        (b"NOTIFY", b"501 5.5.4 Bad NOTIFY parameter\r\n"),
        ("NOTIFY=\u017fuccess,fa\u0131lure".encode(), b"501 5.5.4 Bad NOTIFY parameter\r\n"),
        (b"NOTIFY=", b"501 5.5.4 Bad parameter syntax\r\n"),
        (
            b"NOTIFY=SOMETIMES",
            b"501 5.5.4 Bad NOTIFY parameter (NEVER, or SUCCESS, FAILURE, DELAY)\r\n",
        ),
        (
            b"NOTIFY=SUCCESS,",
            b"501 5.5.4 Bad NOTIFY parameter (NEVER, or SUCCESS, FAILURE, DELAY)\r\n",
        ),
        (
            b"NOTIFY=,SUCCESS",
            b"501 5.5.4 Bad NOTIFY parameter (NEVER, or SUCCESS, FAILURE, DELAY)\r\n",
        ),
        (
            b"NOTIFY=SUCCESS,SUCCESS,BOGUS",
            b"501 5.5.4 Bad NOTIFY parameter (NEVER, or SUCCESS, FAILURE, DELAY)\r\n",
        ),
        (
            b"NOTIFY=NEVER,NEVER,DELAY",
            b"501 5.5.4 Bad NOTIFY parameter: NEVER must appear alone\r\n",
        ),
        (b"NOTIFY=NEVER,SUCCESS", b"501 5.5.4 Bad NOTIFY parameter: NEVER must appear alone\r\n"),
        (b"NOTIFY=DELAY,never", b"501 5.5.4 Bad NOTIFY parameter: NEVER must appear alone\r\n"),
        (b"NOTIFY=NEVER NOTIFY=NEVER", b"501 5.5.4 Duplicate parameter NOTIFY\r\n"),
        (b"ORCPT", b"501 5.5.4 Bad ORCPT parameter\r\n"),
        (b"ORCPT=rfc822", b"501 5.5.4 Bad ORCPT parameter (addr-type;xtext)\r\n"),
        (b"ORCPT=rfc822;", b"501 5.5.4 Bad ORCPT parameter (addr-type;xtext)\r\n"),
        (b"ORCPT=;bob@example.net", b"501 5.5.4 Bad ORCPT parameter (addr-type;xtext)\r\n"),
        (b"ORCPT=rfc(822);bob@example.net", b"501 5.5.4 Bad ORCPT parameter (addr-type;xtext)\r\n"),
        (b"ORCPT=rfc822;bob=x@example.net", b"501 5.5.4 Bad ORCPT parameter: not xtext\r\n"),
        (b"ORCPT=rfc822;bob+0A@example.net", b"501 5.5.4 Bad ORCPT parameter\r\n"),
        (b"ORCPT=rfc822;" + b"b" * 494, b"501 5.5.4 Bad ORCPT parameter\r\n"),
        (b"ORCPT=a;b ORCPT=a;b", b"501 5.5.4 Duplicate parameter ORCPT\r\n"),
        *[
            (b"ORCPT=utf-8;" + bad + b"@example.net", UTF8_BAD)
            for bad in (
                b"\\x{D800}",
                b"\\x{0}",
                b"\\x{110000}",
                b"\\x{}",
                b"\\x{FFFFFFFF}",
                b"a\\b",
            )
        ],
        (b"NOTIFY=NEVER SIZE=1", b"555 5.5.4 Unsupported parameter SIZE\r\n"),
    ],
)
def test_bad_rcpt_dsn_parameters_get_501(params, reply):
    replies, client = rcpt(params)
    assert replies == reply
    assert client.proto.rcpt_count == 0
    assert not any(isinstance(e, Rcpt) for e in client.events)


def test_a_utf8_orcpt_with_valid_escapes_is_kept():
    # RFC 6533: each \x{HEX} a Unicode scalar value that is not a control.
    replies, client = rcpt(b"ORCPT=utf-8;j\\x{F6}rg\\x{20AC}@example.net")
    assert replies == OK_RCPT
    assert client.events[-1].dsn.orcpt.address == "j\\x{F6}rg\\x{20AC}@example.net"


def test_an_orcpt_of_utf8_octets_in_xtext_is_taken_as_utf8():
    """Postfix's client writes a UTF-8 recipient's ORCPT so."""
    replies, client = rcpt(b"ORCPT=rfc822;j+C3+B6rg@b+C3+BCcher.example")
    assert replies == OK_RCPT
    event = client.events[-1]
    assert event.dsn.orcpt == OriginalRecipient("rfc822", "j\u00f6rg@b\u00fccher.example")
    assert event.params["ORCPT"] == "rfc822;j+C3+B6rg@b+C3+BCcher.example"  # as sent


@pytest.mark.parametrize(
    "value",
    [
        b"rfc822;j+F6rg@example.net",  # Latin-1, not UTF-8
        b"rfc822;j+C3@example.net",  # cut short
        b"rfc822;j+C2+85rg@example.net",  # U+0085, a control
        b"rfc822;j+E2+80+A8rg@example.net",  # U+2028, a line separator
    ],
)
def test_an_orcpt_of_octets_that_are_not_printable_utf8_is_refused(value):
    replies, client = rcpt(b"ORCPT=" + value)
    assert replies.startswith(b"501 5.5.4 Bad ORCPT parameter")
    assert client.proto.rcpt_count == 0


def utf8_rcpt(params: bytes) -> tuple[bytes, Client]:
    client = Client()
    client.send(EHLO + b"MAIL FROM:<a@example.org> SMTPUTF8\r\n")
    return client.send(b"RCPT TO:<bob@example.net> " + params + b"\r\n"), client


def test_a_raw_utf8_orcpt_is_taken_with_smtputf8_and_the_utf8_type():
    """RFC 6533 3: utf-8-addr-unitext in a transaction that declared SMTPUTF8."""
    value = "utf-8;j\u00f6rg\\x{2B}x@example.net".encode()
    replies, client = utf8_rcpt(b"ORCPT=" + value)
    assert replies == OK_RCPT
    assert client.events[-1].dsn.orcpt.address == "j\u00f6rg\\x{2B}x@example.net"


@pytest.mark.parametrize(
    "value, smtputf8",
    [
        ("utf-8;j\u00f6rg@example.net", False),  # no SMTPUTF8
        ("rfc822;j\u00f6rg@example.net", True),  # not the utf-8 type
        ("utf-8;j\u00f6rg+x@example.net", True),  # "+" is \x{2B} there
        ("utf-8;j\u00f6rg=x@example.net", True),
        ("utf-8;j\u00f6rg\u2028@example.net", True),  # not printable
        ("utf-8;j\u00f6rg\\x{0}@example.net", True),
    ],
)
def test_a_raw_utf8_orcpt_is_refused_elsewhere(value, smtputf8):
    params = b"ORCPT=" + value.encode()
    replies, client = utf8_rcpt(params) if smtputf8 else rcpt(params)
    assert replies.startswith(b"501 5.5.4 Bad ORCPT parameter")
    assert client.proto.rcpt_count == 0


def test_orcpt_of_500_characters_is_fine():
    value = b"rfc822;" + b"b" * 493
    assert len(value) == 500
    replies, client = rcpt(b"ORCPT=" + value)
    assert replies == OK_RCPT
    assert client.events[-1].dsn.orcpt.address == "b" * 493


@pytest.mark.parametrize("params", [b"NOTIFY=NEVER", b"ORCPT=rfc822;b@example.net"])
def test_rcpt_dsn_parameters_are_unknown_with_dsn_off_or_without_ehlo(params):
    key = params.split(b"=")[0].decode()
    assert rcpt(params, dsn=False)[0] == f"555 5.5.4 Unsupported parameter {key}\r\n".encode()
    client = Client()
    client.send(HELO + MAIL)
    reply = client.send(b"RCPT TO:<bob@example.net> " + params + b"\r\n")
    assert reply == f"555 5.5.4 Unsupported parameter {key}\r\n".encode()


def test_a_whole_dsn_transaction_byte_for_byte():
    replies, client = feed(
        EHLO + b"MAIL FROM:<alice@example.org> RET=HDRS ENVID=QQ314159\r\n"
        b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.net\r\n"
        b"RCPT TO:<carol@example.net> NOTIFY=NEVER\r\n"
        b"RCPT TO:<dave@example.net> NOTIFY=BOGUS\r\n"
        b"RCPT TO:<erin@example.net>\r\n"
        b"DATA\r\nhi\r\n.\r\n"
    )
    assert split_replies(replies)[1:] == [
        OK_MAIL,
        OK_RCPT,
        OK_RCPT,
        b"501 5.5.4 Bad NOTIFY parameter (NEVER, or SUCCESS, FAILURE, DELAY)\r\n",
        OK_RCPT,
        b"354 End data with <CR><LF>.<CR><LF>\r\n",
        b"250 2.0.0 Ok\r\n",
    ]
    dsns = [e.dsn for e in client.events if isinstance(e, Rcpt)]
    assert [d.notify for d in dsns] == [
        frozenset({"SUCCESS", "FAILURE"}),
        frozenset({"NEVER"}),
        None,
    ]


# ------------------------------------------------------- what plugins read
class Recorder:
    """Accepts recipients (but those named "refused"), records what the
    rcpt hook was given and the envelope it delivers. It says it honours
    DSN: without one that does, DSN is not offered."""

    honours_dsn = True

    def __init__(self) -> None:
        self.rcpt_dsn: list[RecipientDSN] = []
        self.envelopes: list[tuple[MailDSN, list[str], list[RecipientDSN], bool]] = []

    def bonzo_rcpt(self, address: str, dsn: RecipientDSN) -> Any:
        self.rcpt_dsn.append(dsn)
        if address.startswith("refused"):
            return None
        return Accept()

    def bonzo_deliver(self, envelope: Envelope) -> Any:
        self.envelopes.append(
            (envelope.dsn, list(envelope.rcpt_tos), list(envelope.rcpt_dsn), envelope.chunked)
        )
        return Accept()


def run_session(data: bytes, **settings: Any) -> tuple[list[bytes], Recorder]:
    recorder = Recorder()
    plugins = PluginSet(timeout=5.0)
    plugins.register(recorder, "recorder")

    async def talk() -> list[bytes]:
        from bonzo.settings import SMTPSettings

        tester = SessionTester(plugins, settings=SMTPSettings(hostname="bonzo.test", **settings))
        await tester.connect()
        replies = split_replies(await tester.send(data))
        await tester.close()
        return replies

    return asyncio.run(talk()), recorder


def test_plugins_read_the_dsn_request_on_the_envelope_per_recipient():
    replies, recorder = run_session(
        EHLO + b"MAIL FROM:<alice@example.org> RET=FULL ENVID=id+2B1\r\n"
        b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS ORCPT=rfc822;bob@example.net\r\n"
        b"RCPT TO:<refused@example.net> NOTIFY=NEVER\r\n"
        b"RCPT TO:<carol@example.net>\r\n"
        b"BDAT 4 LAST\r\nhi\r\n"
    )
    assert [r[:3] for r in replies[1:]] == [b"250", b"250", b"550", b"250", b"250"]
    # The rcpt hook sees each recipient's request, accepted or not.
    assert [d.notify for d in recorder.rcpt_dsn] == [
        frozenset({"SUCCESS"}),
        frozenset({"NEVER"}),
        None,
    ]
    ((mail_dsn_, rcpt_tos, rcpt_dsns, chunked),) = recorder.envelopes
    assert mail_dsn_ == MailDSN("FULL", "id+1")
    assert rcpt_tos == ["bob@example.net", "carol@example.net"]
    assert rcpt_dsns == [
        RecipientDSN(frozenset({"SUCCESS"}), OriginalRecipient("rfc822", "bob@example.net")),
        NO_RECIPIENT_DSN,
    ]
    assert chunked is True
    assert rcpt_dsns[0].wants("success") and not rcpt_dsns[0].wants("failure")
    assert not rcpt_dsns[1].wants("success") and rcpt_dsns[1].wants("failure")


def test_without_dsn_parameters_the_records_are_empty():
    _, recorder = run_session(
        EHLO + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nx\r\n.\r\n"
    )
    ((mail_dsn_, _, rcpt_dsns, chunked),) = recorder.envelopes
    assert mail_dsn_ is NO_MAIL_DSN and rcpt_dsns == [NO_RECIPIENT_DSN]
    assert chunked is False


@pytest.mark.parametrize(
    "notify, success, failure, delay",
    [
        (None, False, True, True),
        (frozenset({"NEVER"}), False, False, False),
        (frozenset({"SUCCESS"}), True, False, False),
        (frozenset({"FAILURE", "DELAY"}), False, True, True),
        (frozenset({"SUCCESS", "FAILURE", "DELAY"}), True, True, True),
    ],
)
def test_wants_follows_rfc_3461(notify, success, failure, delay):
    dsn = RecipientDSN(notify)
    assert (dsn.wants("success"), dsn.wants("FAILURE"), dsn.wants("Delay")) == (
        success,
        failure,
        delay,
    )
    with pytest.raises(ValueError):
        dsn.wants("relayed")


def test_an_envelope_built_by_hand_reads_dsn_from_its_params():
    envelope = Envelope("a@example.org", {"RET": "hdrs", "ENVID": "x+2By"})
    assert envelope.dsn == MailDSN("HDRS", "x+y")
    envelope.add_recipient(Address.parse("b@example.org"), {"NOTIFY": "DELAY"})
    assert envelope.rcpt_dsn == [RecipientDSN(frozenset({"DELAY"}))]
    with pytest.raises(DSNError):
        envelope.add_recipient(Address.parse("c@example.org"), {"NOTIFY": "NEVER,DELAY"})
    assert len(envelope.rcpt_dsn) == len(envelope.rcpt_tos) == 1
    with pytest.raises(DSNError):
        Envelope("a@example.org", {"RET": "SOME"})


# ----------------------------------------------------------------- xtext
@pytest.mark.parametrize(
    "encoded, decoded",
    [
        ("", ""),
        ("plain", "plain"),
        ("a+2Bb", "a+b"),
        ("+3D", "="),
        ("+20+09+0D+0A", " \t\r\n"),
        ("+E9", "\u00e9"),
        ("+41+42", "AB"),
    ],
)
def test_xtext_decode(encoded, decoded):
    assert xtext_decode(encoded) == decoded


@pytest.mark.parametrize("bad", ["a=b", "a b", "+", "+4", "+G1", "caf\u00e9", "\x00", "a\x7f"])
def test_xtext_decode_refuses_what_is_not_xtext(bad):
    with pytest.raises(DSNError):
        xtext_decode(bad)


def test_xtext_encode():
    assert xtext_encode("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+E9"
    assert xtext_encode("!~") == "!~"
    with pytest.raises(DSNError):
        xtext_encode("\u20ac")


latin1 = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=60)


@PROPS
@given(text=latin1)
def test_xtext_round_trip(text):
    encoded = xtext_encode(text)
    assert encoded.isascii() and " " not in encoded and "=" not in encoded
    assert xtext_decode(encoded) == text
    # Encoding is canonical: what a decode gives encodes back the same way.
    assert xtext_encode(xtext_decode(encoded)) == encoded


@PROPS
@given(text=st.text(max_size=60))
def test_random_text_is_decoded_or_refused_never_crashes(text):
    try:
        decoded = xtext_decode(text)
    except DSNError:
        return
    assert all(ord(ch) <= 0xFF for ch in decoded)
    assert xtext_decode(xtext_encode(decoded)) == decoded


@PROPS
@given(
    value=st.one_of(
        st.none(), st.text(max_size=40), st.sampled_from(["NEVER", "SUCCESS,DELAY", "a;b"])
    ),
    key=st.sampled_from(["RET", "ENVID", "NOTIFY", "ORCPT"]),
)
def test_random_dsn_values_give_a_record_or_dsn_error(value, key):
    parse = mail_dsn if key in ("RET", "ENVID") else recipient_dsn
    try:
        record = parse({key: value})
    except DSNError as exc:
        assert str(exc).startswith(f"Bad {key} parameter")
        return
    assert record
    text = repr(record)
    assert "\r" not in text and "\n" not in text


@PROPS
@given(params=st.binary(max_size=80))
def test_random_rcpt_parameters_in_the_core_never_raise(params):
    params = params.replace(b"\r", b"").replace(b"\n", b"")
    replies, client = rcpt(params)
    assert len(split_replies(replies)) == 1
    assert replies[:1] in (b"2", b"5")
    assert not client.closed


# ---------------------------------------------------------- end to end
class DSNRecorder(RecordingPlugin):
    """Records each delivered envelope's DSN records beside the message."""

    def __init__(self) -> None:
        super().__init__()
        self.dsn: list[tuple[MailDSN, list[RecipientDSN]]] = []

    def bonzo_deliver(self, session: Any, envelope: Envelope) -> Any:
        self.dsn.append((envelope.dsn, list(envelope.rcpt_dsn)))
        return super().bonzo_deliver(session, envelope)


@pytest.mark.timeout(30)
def test_e2e_smtplib_sends_dsn_parameters_that_reach_the_delivery_side(start_server):
    server = start_server(plugin=DSNRecorder())
    with smtplib.SMTP(*server.address, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        assert client.has_extn("dsn") and client.has_extn("limits")
        refused = client.sendmail(
            "alice@example.com",
            ["bob@example.com", "carol@example.com"],
            b"Subject: dsn\r\n\r\nhi\r\n",
            mail_options=["RET=HDRS", "ENVID=QQ+2B314159"],
            rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob+2Bx@example.com"],
        )
        assert refused == {}
        with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
            client.sendmail(
                "alice@example.com",
                ["dave@example.com"],
                b"x\r\n",
                rcpt_options=["NOTIFY=NEVER,SUCCESS"],
            )
        assert caught.value.recipients == {
            "dave@example.com": (501, b"5.5.4 Bad NOTIFY parameter: NEVER must appear alone")
        }
    ((mail_dsn_, rcpt_dsns),) = server.plugin.dsn
    assert mail_dsn_ == MailDSN("HDRS", "QQ+314159")
    expected = RecipientDSN(
        frozenset({"SUCCESS", "FAILURE"}), OriginalRecipient("rfc822", "bob+x@example.com")
    )
    assert rcpt_dsns == [expected, expected]
    (message,) = server.plugin.messages
    # The parameters as sent, for a relay to pass on unchanged.
    assert message.mail_params == {"SIZE": "20", "RET": "HDRS", "ENVID": "QQ+2B314159"}


# ------------------------------------------------- who honours the request
class Honours(RecordingPlugin):
    """A plugin that sends the reports (or has them sent)."""

    honours_dsn = True


def dsn_app(
    tmp_path: Any,
    enabled: list[str],
    *extra: Any,
    dsn: str = "true",
    listeners: tuple[str, ...] = ("",),
) -> Any:
    """A MailApp with ``enabled`` and ``extra`` plugins; one listener on
    127.0.0.1 per entry of ``listeners`` (its extra lines)."""
    from bonzo.app import MailApp
    from bonzo.config import parse_config

    tables = "".join(
        f'[[listeners]]\naddress = "127.0.0.1"\nport = 0\n{lines}\n\n' for lines in listeners
    )
    text = f"""
{tables}[protocol]
dsn = {dsn}

[plugins]
enabled = [{", ".join(f'"{n}"' for n in enabled)}]
"""
    if "maildir" in enabled:
        text += '\n[plugins.maildir]\npath = "mail"\n'
    if "recipients" in enabled:
        text += '\n[plugins.recipients]\ndomains = ["example.org"]\n'
    if "forward" in enabled:
        text += '\n[plugins.forward]\nhost = "127.0.0.1"\n'
    return MailApp(parse_config(text, source="bonzo.toml", base_dir=tmp_path), extra)


async def ehlo_of(app: Any) -> bytes:
    """The EHLO reply of ``app``, served on 127.0.0.1."""
    await app.start()
    try:
        reader, writer = await asyncio.open_connection(*app.addresses[0])
        await reader.readline()
        writer.write(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")
        reply = b""
        while not reply.endswith(b"\r\n") or reply.split(b"\r\n")[-2][3:4] != b" ":
            reply += await reader.readline()
        writer.write(b"RCPT TO:<b@example.org> NOTIFY=SUCCESS\r\nQUIT\r\n")
        await reader.readline()  # MAIL
        reply += await reader.readline()  # RCPT
        writer.close()
        return reply
    finally:
        await app.stop()


def test_dsn_is_offered_only_when_a_plugin_honours_it(tmp_path):
    """RFC 3461 6.2: a server that offers DSN sends the reports, which the
    upstream then leaves to it. maildir alone sends none: DSN is not
    offered (NOTIFY refused, as for protocol.dsn = false), so the upstream
    reports the delivery itself."""
    pytest.importorskip("bonzo_plugins", reason="the bundled plugins are not installed")
    alone = dsn_app(tmp_path, ["recipients", "maildir"])
    assert alone.dsn_honoured_by == []
    assert alone.describe_dsn().startswith("not offered: no enabled plugin sends the reports")
    reply = asyncio.run(ehlo_of(alone))
    assert b"250-DSN\r\n" not in reply
    assert reply.endswith(b"555 5.5.4 Unsupported parameter NOTIFY\r\n")

    honoured = dsn_app(tmp_path, ["recipients", "maildir"], Honours())
    assert honoured.dsn_honoured_by == ["Honours"]
    assert honoured.describe_dsn() == "offered (reports sent by 'Honours')"
    reply = asyncio.run(ehlo_of(honoured))
    assert b"250-DSN\r\n" in reply and reply.endswith(OK_RCPT)

    assert dsn_app(tmp_path, ["recipients", "queue"]).dsn_honoured_by == ["queue"]
    forward = dsn_app(tmp_path, ["forward"])
    assert forward.dsn_honoured_by == ["forward"]
    # Its promise depends on the downstream: bonzo check says so.
    assert forward.describe_dsn() == (
        "offered (reports sent by 'forward'; forward: its downstream's; one without "
        "DSN ignores NOTIFY, RET and ENVID, and a NOTIFY=SUCCESS gets no notice)"
    )
    off = dsn_app(tmp_path, ["recipients", "queue"], dsn="false")
    assert off.describe_dsn() == "off (protocol.dsn = false)"


def test_dsn_can_be_off_on_one_listener(tmp_path):
    """docs/dsn.rst: a public MX offers DSN only on the ports where clients
    authenticate (a success notice goes to a MAIL FROM anyone can make
    up): protocol.dsn in a [[listeners]] table."""
    pytest.importorskip("bonzo_plugins", reason="the bundled plugins are not installed")
    app = dsn_app(tmp_path, ["recipients", "maildir"], Honours(), listeners=("dsn = false", ""))

    async def both() -> list[bytes]:
        await app.start()
        try:
            replies = []
            for address in app.addresses:
                reader, writer = await asyncio.open_connection(*address)
                await reader.readline()
                writer.write(b"EHLO client.test\r\nQUIT\r\n")
                replies.append(await reader.readuntil(b"221 "))
                writer.close()
            return replies
        finally:
            await app.stop()

    mx, submission = asyncio.run(both())
    assert b"250-DSN\r\n" not in mx and b"250-8BITMIME\r\n" in mx
    assert b"250-DSN\r\n" in submission


def test_the_test_servers_offer_dsn_as_the_daemon_does():
    """A plugin author's tests see what the daemon does: without a plugin
    that honours DSN, SessionTester and PluginTestServer do not offer it
    (NOTIFY is refused), with one they do."""
    from bonzo.settings import SMTPSettings

    async def ehlo(plugin: object) -> list[bytes]:
        plugins = PluginSet(timeout=5.0)
        plugins.register(plugin, "p")
        tester = SessionTester(plugins, settings=SMTPSettings(hostname="bonzo.test"))
        await tester.connect()
        replies = split_replies(
            await tester.send(
                EHLO + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org> NOTIFY=NEVER\r\n"
            )
        )
        await tester.close()
        return replies

    class Reads:
        @hookimpl
        def bonzo_rcpt(self) -> Any:
            return Accept()

    class Sends(Reads):
        honours_dsn = True

    not_offered = asyncio.run(ehlo(Reads()))
    assert b"250-DSN\r\n" not in not_offered[0]
    assert not_offered[-1] == b"555 5.5.4 Unsupported parameter NOTIFY\r\n"
    offered = asyncio.run(ehlo(Sends()))
    assert b"250-DSN\r\n" in offered[0] and offered[-1].startswith(b"250 ")

    for plugin, expected in ((Reads(), False), (Sends(), True)):
        with PluginTestServer(("p", plugin)) as server:
            with server.client() as client:
                client.ehlo()
                assert client.has_extn("dsn") is expected
                client.mail("a@example.org")
                code = client.rcpt("b@example.org", ["NOTIFY=NEVER"])[0]
                assert code == (250 if expected else 555)


def test_a_notify_keyword_given_twice_counts_once():
    """RFC 3461's grammar does not forbid it and Postfix accepts it."""
    dsn = recipient_dsn({"NOTIFY": "success,SUCCESS,delay"})
    assert dsn.notify == frozenset({"SUCCESS", "DELAY"})
    assert recipient_dsn({"NOTIFY": "NEVER,never"}).notify == frozenset({"NEVER"})

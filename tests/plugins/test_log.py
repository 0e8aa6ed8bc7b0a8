"""The ``log`` plugin: one safe line per accepted message."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from bonzo_plugins.log import LogPlugin
from bonzo_plugins.log.plugin import escape
from bonzo_plugins.maildir import MaildirPlugin
from bonzo_plugins.recipients import RecipientsPlugin
from plugin_testing import make_envelope, make_session, serve
from spellings import SOFT_HYPHEN, parametrize

from bonzo.address import Address
from bonzo.session import Envelope

LOGGER = "bonzo.plugins.log"


def configured(**table: object) -> LogPlugin:
    plugin = LogPlugin()
    plugin.bonzo_configure(config=table, app=None)
    return plugin


def records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER]


def test_one_line_with_the_envelope(caplog):
    session = make_session(remote_ip="192.0.2.10", helo="client.example")
    envelope = make_envelope(
        b"Subject: secret\r\n\r\nTOP SECRET CONTENT\r\n",
        mail_from="sender@example.net",
        rcpt_tos=["alice@example.com", "bob@example.com"],
    )
    try:
        configured().bonzo_accepted(session=session, envelope=envelope)
    finally:
        envelope.close()
    (record,) = records(caplog)
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        f"accepted session={session.id} ip=192.0.2.10 helo=client.example"
        " from=<sender@example.net> to=<alice@example.com>,<bob@example.com> nrcpt=2"
        f" size=39 id={envelope.id}"
    )
    assert "SECRET" not in record.getMessage()


def test_the_message_id_is_logged_so_that_a_complaint_can_be_traced(caplog):
    """Postfix logs message-id=<...>: the one thing a user who complains
    can quote. The client writes it, so it cannot forge a field either."""
    for header, logged in (
        ("<20261207.abc@mail.example.net>", "<20261207.abc@mail.example.net>"),
        ("\r\n <folded@example.net>", "<folded@example.net>"),
        ("<x@y> id=FAKE size=0", "<\\x3cx@y\\x3e\\x20id\\x3dFAKE\\x20size\\x3d0>"),
    ):
        caplog.clear()
        envelope = make_envelope(
            f"Message-ID: {header}\r\nSubject: hi\r\n\r\nbody\r\n".encode(),
            mail_from="a@example.net",
            rcpt_tos=["b@example.com"],
        )
        try:
            configured().bonzo_accepted(session=make_session(), envelope=envelope)
        finally:
            envelope.close()
        message = records(caplog)[0].getMessage()
        assert message.endswith(f" id={envelope.id} msgid={logged}"), message
        assert message.count(" id=") == 1 and message.count(" size=") == 1
    caplog.clear()
    envelope = make_envelope(b"Subject: none\r\n\r\nbody\r\n", rcpt_tos=["b@example.com"])
    try:
        configured().bonzo_accepted(session=make_session(), envelope=envelope)
    finally:
        envelope.close()
    assert " msgid=" not in records(caplog)[0].getMessage()


def test_null_sender_and_missing_helo(caplog):
    envelope = make_envelope(mail_from="", rcpt_tos=["postmaster"])
    try:
        configured().bonzo_accepted(session=make_session(helo=None), envelope=envelope)
    finally:
        envelope.close()
    message = records(caplog)[0].getMessage()
    assert " helo=- from=<> to=<postmaster> nrcpt=1 " in message


def line_for(mail_from: str, rcpt_tos: list[str], caplog, *, recipients: bool = True) -> str:
    envelope = make_envelope(mail_from=mail_from, rcpt_tos=rcpt_tos)
    if recipients:  # as the core fills them; without, the plugin parses rcpt_tos
        envelope.recipients.extend(Address.parse(r) for r in rcpt_tos)
    try:
        configured().bonzo_accepted(session=make_session(), envelope=envelope)
    finally:
        envelope.close()
    (record,) = records(caplog)
    return record.getMessage()


@parametrize("spelling", "ceo", "example.com")
@pytest.mark.parametrize("recipients", [True, False], ids=["core", "hand-built"])
def test_the_canonical_form_is_logged_with_the_spelling(caplog, spelling, recipients):
    line = line_for(spelling, [spelling, "bob@example.com"], caplog, recipients=recipients)
    assert f" from=<ceo@example.com> sent_from=<{escape(spelling)}> " in line
    assert (
        f" to=<ceo@example.com>,<bob@example.com> sent_to=<{escape(spelling)}>,<bob@example.com>"
        " nrcpt=2 " in line
    )


def test_the_spelling_is_escaped_like_any_client_text(caplog):
    line = line_for(f'"c eo"@exa{SOFT_HYPHEN}mple.com', ["bob@example.com"], caplog)
    assert (
        " from=<\\x22c\\x20eo\\x22@example.com> sent_from=<\\x22c\\x20eo\\x22@exa\\xadmple.com> "
        in line
    )


def test_nothing_more_when_every_address_is_canonical(caplog):
    line = line_for("ceo@example.com", ["bob@example.com"], caplog)
    assert "sent_" not in line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("client.example", "client.example"),
        ("a\r\nFAKE accepted", "a\\x0d\\x0aFAKE\\x20accepted"),
        ("x ip=1.2.3.4", "x\\x20ip\\x3d1.2.3.4"),
        ('"quoted"@x', "\\x22quoted\\x22@x"),
        ("a>,<b", "a\\x3e\\x2c\\x3cb"),
        ("back\\slash", "back\\x5cslash"),
        ("bidi\u202eevil", "bidi\\u202eevil"),
        ("line\u2028sep", "line\\u2028sep"),
        ("nul\x00", "nul\\x00"),
        ("d\u00e9j\u00e0", "d\u00e9j\u00e0"),
        ("\U0001f600", "\U0001f600"),
        ("\x7f", "\\x7f"),
        (None, "-"),
    ],
)
def test_escape(text, expected):
    assert escape(text) == expected


def test_escape_cuts_long_values():
    assert escape("x" * 1000, limit=10) == "x" * 10 + "..."


def test_client_strings_cannot_forge_lines_or_fields(caplog):
    session = make_session(helo="evil\r\n2026 INFO accepted session=FAKE")
    envelope = make_envelope(
        mail_from='"a>,<b size=0"@example.net', rcpt_tos=['"x\nid=1"@example.com']
    )
    try:
        configured().bonzo_accepted(session=session, envelope=envelope)
    finally:
        envelope.close()
    message = records(caplog)[0].getMessage()
    assert "\n" not in message and "\r" not in message
    assert message.count(" session=") == 1
    assert message.count(" size=") == 1
    assert message.count(" id=") == 1
    assert message.count("<") == 2 and message.count(">") == 2


@pytest.mark.parametrize(
    "level",
    [
        "debug",
        "WARNING",
        "Info",
        pytest.param("error", marks=pytest.mark.expect_errors),
        pytest.param("critical", marks=pytest.mark.expect_errors),
    ],
)
def test_level(caplog, level):
    envelope = make_envelope()
    try:
        configured(level=level).bonzo_accepted(session=make_session(), envelope=envelope)
    finally:
        envelope.close()
    (record,) = records(caplog)
    assert record.levelname == level.upper()


def test_nothing_formatted_when_the_level_is_off(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    plugin = configured(level="debug")
    monkeypatch.setattr(plugin, "format", lambda *a: pytest.fail("formatted"))
    envelope = make_envelope()
    try:
        plugin.bonzo_accepted(session=make_session(), envelope=envelope)
    finally:
        envelope.close()
    assert records(caplog) == []


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"levels": "info"}, r"^levels: unknown key \(did you mean 'level'\?\)"),
        (
            {"level": "verbose"},
            r"^level: expected one of 'debug', 'info', 'warning', 'error', 'critical', "
            r"got 'verbose'",
        ),
        ({"level": 20}, r"^level: expected one of .*, got 20"),
        ({"level": ""}, r"^level: expected one of .*, got ''"),
    ],
)
def test_configuration_errors_name_the_key(table, message):
    with pytest.raises(ValueError, match=message):
        configured(**table)


def test_end_to_end(tmp_path: Path, caplog):
    recipients = RecipientsPlugin()
    recipients.bonzo_configure(config={"domains": ["example.com"]}, app=None)
    maildir = MaildirPlugin()
    maildir.bonzo_configure(config={"path": str(tmp_path / "Maildir")}, app=None)
    plugins = (("recipients", recipients), ("maildir", maildir), ("log", configured()))
    body = b"Subject: hi\r\n\r\nbody text\r\n"
    with serve(*plugins) as server, server.client(helo="client.example") as client:
        assert client.sendmail("a@example.org", ["alice@example.com", "postmaster"], body) == {}
        client.quit()
    (record,) = records(caplog)
    message = record.getMessage()
    assert message.startswith("accepted session=")
    assert (
        " ip=127.0.0.1 helo=client.example from=<a@example.org>"
        f" to=<alice@example.com>,<postmaster> nrcpt=2 size={len(body)} id=" in message
    )
    assert "body text" not in message


def test_a_quarantined_message_says_so(caplog):
    session = make_session(remote_ip="192.0.2.10", helo="client.example")
    envelope = make_envelope(b"Subject: x\r\n\r\nx\r\n", rcpt_tos=["alice@example.com"])
    envelope.quarantined = "DMARC fail; policy quarantine"
    envelope.quarantined_by = "dmarc"
    try:
        configured().bonzo_accepted(session=session, envelope=envelope)
    finally:
        envelope.close()
    (record,) = records(caplog)
    assert record.getMessage().endswith(
        f" id={envelope.id} quarantined_by=dmarc reason=DMARC\\x20fail;\\x20policy\\x20quarantine"
    )


def test_recipients_refused_or_removed_one_by_one_are_not_logged_as_delivered(caplog):
    from bonzo.errors import PermanentError

    session = make_session(remote_ip="192.0.2.10", helo="client.example")
    envelope = Envelope(
        "sender@example.net",
        rcpt_tos=["alice@example.com", '"bob"@example.com', "carol@example.com", "dan@example.com"],
    )
    envelope.write(b"Subject: x\r\n\r\nx\r\n")
    envelope.refuse_recipient(1, PermanentError(550, "Not wanted", "5.7.1"))
    envelope.remove_recipient("carol@example.com")
    try:
        configured().bonzo_accepted(session=session, envelope=envelope)
    finally:
        envelope.close()
    (record,) = records(caplog)
    assert (
        " to=<alice@example.com>,<dan@example.com> nrcpt=2 refused=<bob@example.com>"
        f" removed=<carol@example.com> size={envelope.size} id={envelope.id}"
    ) in record.getMessage()
    assert "sent_to" not in record.getMessage()  # bob's spelling: he got nothing

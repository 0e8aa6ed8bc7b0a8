"""Sessions, envelopes and the trace header: the session is a view of the
protocol core, and the Received header names the right protocol and never
leaves a line with only the date."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re

import pytest
from e2e_support import RawClient

from bonzo import Accept, errors
from bonzo.address import Address
from bonzo.hooks import PluginSet
from bonzo.protocol import SMTPProtocol
from bonzo.session import Envelope, Session, one_line, received_header, with_keyword
from bonzo.settings import ListenerSettings, SMTPSettings
from bonzo.testing import PluginTestServer, SessionTester, make_session

SETTINGS = SMTPSettings(hostname="mx.test")


def test_the_session_is_a_view_of_the_core():
    core = SMTPProtocol(SETTINGS, "192.0.2.1")
    session = Session("192.0.2.1", 1234, core=core)
    assert (session.helo, session.esmtp, session.auth, session.tls) == (None, False, None, None)
    core.receive_data(b"EHLO client.test\r\n")
    core.next_event()
    core.accept()
    assert (session.helo, session.esmtp) == ("client.test", True)
    core.tls_info = {"version": "TLSv1.3"}
    assert session.tls is None  # facts only count while TLS is active
    core.tls_active = True
    assert session.tls == {"version": "TLSv1.3"}
    for name in ("helo", "esmtp", "auth", "tls", "messages"):
        with pytest.raises(AttributeError):
            setattr(session, name, None)


def envelope(rcpts: list[str], **params: str | None) -> Envelope:
    env = Envelope("a@example.org", params)
    for rcpt in rcpts:
        env.add_recipient(Address.parse(rcpt), {})
    return env


@pytest.mark.parametrize(
    "esmtp, tls, auth, smtputf8, keyword",
    [
        (False, None, None, False, "SMTP"),
        (True, None, None, False, "ESMTP"),
        (True, {"version": "TLSv1.3"}, None, False, "ESMTPS"),
        (True, None, "alice", False, "ESMTPA"),
        (True, {"version": "TLSv1.3"}, "alice", False, "ESMTPSA"),
        (True, None, None, True, "UTF8SMTP"),
        (True, {"version": "TLSv1.3"}, None, True, "UTF8SMTPS"),
        (True, None, "alice", True, "UTF8SMTPA"),
        (True, {"version": "TLSv1.3"}, "alice", True, "UTF8SMTPSA"),
    ],
)
def test_with_keywords(esmtp, tls, auth, smtputf8, keyword):
    """RFC 3848, and RFC 6531 4.3 for messages sent with SMTPUTF8."""
    session = make_session(esmtp=esmtp, tls=tls, auth=auth)
    env = envelope(["b@example.org"], **({"SMTPUTF8": None} if smtputf8 else {}))
    assert with_keyword(session, env) == keyword
    header = received_header(session, env, "mx.test", when=0)
    assert f" with {keyword}" in header


@pytest.mark.parametrize(
    "rcpts, params, named",
    [
        (["b@example.org"], {}, "<b@example.org>"),
        (["j\u00f6rg@example.org"], {"SMTPUTF8": None}, "<j\u00f6rg@example.org>"),
        (["j\u00f6rg@example.org"], {}, None),
        (["b@example.org", "c@example.org"], {}, None),
        (["b@[192.0.2.9]"], {}, "<b@[192.0.2.9]>"),
        # A quoted local part that would end the clause and forge a date, and
        # a direction-changing character: the recipient is not named.
        (['"x>; Mon, 1 Jan 2001 00:00:00 +0000 (by evil) from"@example.org'], {}, None),
        (["\u202eu@example.org"], {"SMTPUTF8": None}, None),
    ],
)
def test_received_header_lines(rcpts, params, named):
    session = make_session(esmtp=True)
    env = envelope(rcpts, **params)
    header = received_header(session, env, "mx.test", when=0)
    lines = header.split("\r\n")
    assert lines[-1] == "" and all(lines[:-1])
    # No line holds only the date: "; date" ends the line before it.
    assert not any(re.fullmatch(r"\s*;.*", line) for line in lines[:-1])
    parsed = email.message_from_string(header + "\r\n", policy=email.policy.default)
    value = str(parsed["Received"])
    assert value.startswith("from client.example ([192.0.2.1])")
    if named:
        assert f"for {named};" in value
    else:
        assert " for " not in value and "Jan 2001" not in value and "\u202e" not in value


def test_received_header_claims_no_address_for_a_unix_socket():
    """A session on a Unix socket has no client address (``0.0.0.0``):
    the header gives the HELO name alone, not ``[0.0.0.0]``."""
    session = make_session(esmtp=True, remote_ip="0.0.0.0", helo="postfix.test")
    header = received_header(session, envelope(["b@example.org"]), "mx.test", when=0)
    assert header.startswith("Received: from postfix.test\r\n\tby mx.test (Bonzo) with ESMTP")
    assert "0.0.0.0" not in header


def _stored(plugins: list[tuple[str, object]], content: bytes, chunked: bool) -> bytes:
    """``content`` sent through a test server with ``plugins`` (after DATA,
    or in one ``BDAT ... LAST``), as the server stored it."""
    with PluginTestServer(*plugins) as server:
        with server.client() as client:
            client.ehlo()
            client.mail("a@example.org")
            client.rcpt("b@example.com")
            if chunked:
                client.send(b"BDAT %d LAST\r\n" % len(content) + content)
                reply = client.getreply()
            else:
                reply = client.data(content)
            assert reply[0] == 250
    return server.messages[0]


def _field_names(head: bytes) -> list[bytes]:
    return [line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in b" \t"]


class _EarlyHeaders:
    def bonzo_mail(self, envelope):
        envelope.add_header("X-At-Mail", "1")

    def bonzo_rcpt(self, envelope):
        envelope.insert_header(0, "X-At-Rcpt", "1")

    def bonzo_data(self, envelope):
        envelope.add_header("X-At-Data", "1")

    def bonzo_message(self, envelope):
        envelope.add_header("X-At-Message", "1")


@pytest.mark.parametrize("chunked", [False, True])
def test_the_trace_header_goes_above_headers_added_before_the_content(chunked):
    # RFC 5321 4.4: the trace header is the first line of what is passed on,
    # whenever a plugin added its headers.
    message = _stored([("early", _EarlyHeaders())], b"Subject: x\r\n\r\nhi\r\n", chunked)
    names = _field_names(message.split(b"\r\n\r\n", 1)[0])
    assert names[:6] == [
        b"Received",
        b"X-At-Rcpt",
        b"X-At-Mail",
        b"X-At-Data",
        b"X-At-Message",
        b"Subject",
    ]


class _EarlyEdits:
    def bonzo_mail(self, envelope):
        envelope.change_header("Subject", "[EXT] hello")

    def bonzo_rcpt(self, envelope):
        envelope.delete_header("X-Spam-Flag")  # a forged client header
        envelope.insert_header(1, "X-Second", "1")

    def bonzo_data(self, envelope):
        envelope.replace_body(b"new body\r\n")


class _EarlyReader:
    """Adds headers and reads the envelope before the content: neither may
    apply the pending edits to the message not yet there."""

    def bonzo_rcpt(self, envelope):
        envelope.add_header("X-At-Rcpt", "1")
        assert envelope.size == 0 and envelope.headers()
        assert envelope.remove_header("X-Remove-Me") == 0  # waits for the content

    def bonzo_data(self, envelope):
        envelope.add_header("X-At-Data", "1")


@pytest.mark.parametrize("reader", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_edits_made_before_the_content_apply_to_the_client_s_header(chunked, reader):
    # They wait for the content: the trace header Bonzo adds at DATA, or
    # another plugin adding a header or reading the size, must not apply
    # them early (to an empty message).
    plugins = [("early", _EarlyEdits())] + ([("reader", _EarlyReader())] if reader else [])
    content = b"X-Spam-Flag: NO\r\nX-Remove-Me: 1\r\nSubject: hello\r\n\r\nold body\r\n"
    head, body = _stored(plugins, content, chunked).split(b"\r\n\r\n", 1)
    names = _field_names(head)
    added = [b"X-At-Rcpt", b"X-At-Data"] if reader else [b"X-Remove-Me"]
    assert sorted(names) == sorted([b"Received", b"Subject", b"X-Second", *added])
    assert names[0] == b"Received" and names.count(b"Subject") == 1  # no X-Spam-Flag
    assert b"Subject: [EXT] hello" in head.split(b"\r\n")
    assert body == b"new body\r\n"


# -------------------------------------------------- plugin exception objects
SHARED = errors.PermanentError("Not here", 554, "5.7.1")


def test_a_plugin_exception_is_never_changed():
    """A refusal at connect closes the session; the very same exception
    object raised later at RCPT must not (it is never marked close)."""
    calls = []

    class Shared:
        def bonzo_connect(self, session):
            calls.append("connect")
            if session.remote_ip == "192.0.2.66":
                raise SHARED

        def bonzo_rcpt(self, mailbox):
            if mailbox.local == "nobody":
                raise SHARED
            return Accept()

    plugins = PluginSet()
    plugins.register(Shared(), "shared")

    async def talk():
        refused = SessionTester(plugins, remote_ip="192.0.2.66")
        assert await refused.connect() == b"554 5.7.1 Not here\r\n"
        assert refused.core.closed
        other = SessionTester(plugins)
        await other.connect()
        replies = await other.send(
            b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<nobody@example.org>\r\n"
            b"RCPT TO:<somebody@example.org>\r\n"
        )
        return other, replies

    other, replies = asyncio.run(talk())
    assert replies.endswith(b"554 5.7.1 Not here\r\n250 2.1.5 Ok\r\n")
    assert not other.core.closed
    assert SHARED.close is False
    assert (SHARED.status_code, SHARED.message, SHARED.enhanced_code) == (554, "Not here", "5.7.1")


# --------------------------------------------------------------- refusal logs
def test_every_refusal_is_one_info_line(start_server, log_watch):
    """550, 554, 553, 530, 502, ...: one INFO line each, with the session id,
    the client address, the stage, who decided, the codes and the argument."""

    class Policy:
        def bonzo_rcpt(self, mailbox):
            if mailbox.local == "unknown":
                raise errors.PermanentError("No such user", 550, "5.1.1")
            if mailbox.domain != "example.org":
                raise errors.PermanentError("Relay access denied", 554, "5.7.1")
            return Accept()

        def bonzo_deliver(self):
            return Accept()

    plugins = PluginSet()
    plugins.register(Policy(), "policy")
    server = start_server(plugins=plugins, listener=ListenerSettings(), hostname="mx.test")
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<a@example.org>").startswith(b"250")
        assert client.command("RCPT TO:<unknown@example.org>").startswith(b"550 5.1.1")
        assert client.command("RCPT TO:<x@elsewhere.test>").startswith(b"554 5.7.1")
        assert client.command("RCPT TO:<\u00e9@example.org>".encode()).startswith(b"553 5.6.7")
        assert client.command("STARTTLS").startswith(b"502 5.5.1")
        assert client.command("AUTH PLAIN c2VjcmV0").startswith(b"502 5.5.1")
        client.send(b"QUIT\r\n")
        client.read_to_eof()
    lines = [
        r.getMessage()
        for r in log_watch.records
        if r.name == "tornado.general" and "refused by" in r.getMessage()
    ]
    assert all(
        r.levelno == logging.INFO
        for r in log_watch.records
        if r.name == "tornado.general" and "refused by" in r.getMessage()
    )
    session = r"\[\w+ 127\.0\.0\.1\] "
    expected = [
        session
        + r"RCPT refused by policy: 550 5.1.1 No such user; arg='TO:<unknown@example\.org>'",
        session
        + r"RCPT refused by policy: 554 5.7.1 Relay access denied; arg='TO:<x@elsewhere\.test>'",
        session + r"RCPT refused by core: 553 5.6.7 Non-ASCII recipient address requires SMTPUTF8",
        session + r"STARTTLS refused by core: 502 5.5.1 Error: STARTTLS not available",
        session + r"AUTH refused by core: 502 5.5.1 Error: AUTH not available; arg='PLAIN'$",
    ]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected, strict=True):
        assert re.match(pattern, line), (pattern, line)
    assert not any("c2VjcmV0" in line for line in lines)


def test_an_envelope_built_for_a_test_has_its_recipients_checked_and_canonical():
    envelope = Envelope(
        "alice@example.org", rcpt_tos=["Bob@ｅｘａｍｐｌｅ.com", "carol@example.com"]
    )
    assert envelope.rcpt_tos == ["Bob@ｅｘａｍｐｌｅ.com", "carol@example.com"]
    assert [r.canonical for r in envelope.remaining_recipients] == [
        "Bob@example.com",
        "carol@example.com",
    ]
    assert len(envelope.rcpt_params) == len(envelope.rcpt_dsn) == 2
    with pytest.raises(ValueError, match="not a valid address: 'bob'"):
        Envelope("alice@example.org", rcpt_tos=["bob"])
    envelope.close()


class _Keeps:
    def bonzo_rcpt(self):
        return Accept()

    def bonzo_deliver(self, envelope):
        for rcpt in envelope.recipients:
            if rcpt.local.startswith('"'):
                envelope.refuse_recipient(rcpt, errors.PermanentError(550, "No", "5.1.1"))
        return Accept()


class _Redirects:
    """Removes every recipient the client gave and adds one of its own."""

    def bonzo_rcpt(self):
        return Accept()

    def bonzo_message(self, envelope):
        for rcpt in list(envelope.recipients):
            envelope.remove_recipient(rcpt)
        envelope.add_recipient_address("archive@example.org")

    def bonzo_deliver(self, envelope):
        return Accept()


def test_the_access_line_counts_the_recipients_the_message_goes_to(caplog):
    """``to=`` counted the client's recipients, those a plugin removed (a
    milter's DELRCPT) too: 2 here, for a message that went to one."""
    plugins = PluginSet()
    plugins.register(_Redirects(), "redirects")
    t = SessionTester(plugins)

    async def run():
        await t.connect()
        await t.send(b"EHLO c\r\n")
        await t.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n")
        await t.send(b"RCPT TO:<c@example.com>\r\nDATA\r\n")
        return await t.send(b"Subject: x\r\n\r\nx\r\n.\r\n")

    with caplog.at_level(logging.INFO):
        assert asyncio.run(run()).startswith(b"250 ")
    [access] = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert " from=<a@example.com> to=1 " in access, access


@pytest.mark.parametrize(
    ("sender", "shown"),
    [
        (
            '"x> to=99 id=FORGED"@example.com',
            r"\x22x\x3e\x20to\x3d99\x20id\x3dFORGED\x22@example.com",
        ),
        ('"a\u2028WARNING forged"@example.com', r"\x22a\u2028WARNING\x20forged\x22@example.com"),
    ],
)
def test_bonzo_s_own_log_lines_escape_the_client_s_addresses(caplog, sender, shown):
    plugins = PluginSet()
    plugins.register(_Keeps(), "keeps")
    t = SessionTester(plugins)

    async def run():
        await t.connect()
        await t.send(b"EHLO c\r\n")
        rcpts = f"RCPT TO:<{sender}>\r\nRCPT TO:<b@example.com>\r\n"
        await t.send(f"MAIL FROM:<{sender}> SMTPUTF8\r\n{rcpts}DATA\r\n".encode())
        return await t.send(b"Subject: x\r\n\r\nx\r\n.\r\n")

    with caplog.at_level(logging.INFO):
        assert asyncio.run(run()).startswith(b"250 ")
    [access] = [r.getMessage() for r in caplog.records if r.name == "tornado.access"]
    assert f" from=<{shown}> to=1 " in access
    [warning] = [r.getMessage() for r in caplog.records if "was delivered to 1" in r.getMessage()]
    assert f"but not to <{shown}>" in warning
    for record in caplog.records:
        assert "\u2028" not in record.getMessage() and "to=99 id" not in record.getMessage()


def test_one_line_escapes_only_what_is_not_printable():
    assert one_line("caf\u00e9 \u00fcber C:\\dir 50%") == "caf\u00e9 \u00fcber C:\\dir 50%"
    assert one_line("a\r\nb\u2028c\u2029d\x85e\x00f\u202eg\udcff\th") == (
        r"a\r\nb\u2028c\u2029d\x85e\x00f\u202eg\udcff\th"
    )


def test_a_plugin_s_refusal_of_one_recipient_cannot_forge_a_log_line(caplog):
    # The warning that names what one recipient was refused carries the
    # plugin's text (which may quote the client): escaped, as in a refusal's line.
    class RefusesBob:
        def bonzo_rcpt(self):
            return Accept()

        def bonzo_deliver(self, envelope):
            for rcpt in envelope.recipients:
                if rcpt.local == "bob":
                    text = "No bob\r\n2026 WARNING forged\u2028\x1b[2J"
                    envelope.refuse_recipient(rcpt, errors.PermanentError(550, text, "5.1.1"))
            return Accept()

    plugins = PluginSet()
    plugins.register(RefusesBob(), "refuses")
    t = SessionTester(plugins)

    async def run():
        await t.connect()
        await t.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n")
        await t.send(b"RCPT TO:<bob@example.com>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n")
        return await t.send(b"Subject: x\r\n\r\nx\r\n.\r\n")

    with caplog.at_level(logging.INFO):
        assert asyncio.run(run()).startswith(b"250 ")
    [warning] = [r.getMessage() for r in caplog.records if "was delivered to 1" in r.getMessage()]
    assert r"(first: 550 5.1.1 No bob\r / 2026 WARNING forged\u2028\x1b[2J); " in warning


def test_credentials_sent_after_a_refused_auth_are_never_logged():
    # AUTH is refused (no plugin checks passwords, no TLS); the client sends
    # its base64 credentials anyway, which the server reads as a command.
    secret = "AGFsaWNlAHMzY3JldA=="  # \0alice\0s3cret
    with PluginTestServer(log_level="DEBUG") as server:
        with server.client() as client:
            client.ehlo()
            assert client.docmd("AUTH", "PLAIN")[0] // 100 == 5
            assert client.docmd(secret)[0] == 500
            # AUTH LOGIN's answers sent without waiting for the prompts:
            # base64 of a short password can be all letters ("hunter").
            assert client.docmd("aHVudGVy")[0] == 500
            # A BDAT whose count was off: the rest of a line read as one,
            # credentials in the argument.
            assert client.docmd("H", f"PLAIN {secret}")[0] == 500
            assert client.docmd("XYZZY", "now")[0] == 500
    lines = server.log_text.splitlines()
    assert sum(" ? refused by core: 500 5.5.2 " in line for line in lines) == 2, lines
    for line in lines:
        assert secret.upper() not in line.upper()
        assert "AHVUDGVY" not in line.upper()
    # A word that could be a verb is still named, never with its argument.
    assert any(" H refused by core: 500 " in line and "arg=''" in line for line in lines)
    assert any(" XYZZY refused by core: 500 " in line and "arg=''" in line for line in lines)

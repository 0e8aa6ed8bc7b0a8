"""The ``milter`` plugin in a real server, against the scripted fake milter."""

from __future__ import annotations

import logging
import re
import smtplib
from pathlib import Path
from typing import Any

import pytest
from bonzo_plugins.milter import MilterPlugin
from bonzo_plugins.milter.plugin import MILTER_KEYS, reply_error
from milter_fake import CLOSE, HANG, FakeMilter
from plugin_testing import serve
from ports import free_port

from bonzo import Accept, hookimpl
from bonzo import milter as m
from bonzo.settings import ListenerSettings

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"From: a@example.org\r\nSubject: hello\r\nX-Old: 1\r\n\r\nBody line\r\n"


class Sink:
    """Owns every recipient and keeps what would be delivered."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, list[str], bytes]] = []
        self.quarantined: list[str] = []
        self.results: list[list[tuple[str, dict[str, Any]]]] = []
        self.changes: list[list[tuple[str, str, str]]] = []

    @hookimpl
    def bonzo_rcpt(self) -> Accept:
        return Accept()

    @hookimpl
    def bonzo_deliver(self, envelope: Any) -> Accept:
        rcpts = [str(getattr(r, "original", r)) for r in envelope.remaining_recipients]
        self.delivered.append((envelope.mail_from, rcpts, envelope.content))
        self.results.append([(r.result, r.details) for r in envelope.results.all("milter")])
        self.changes.append([(c.plugin, c.action, c.detail) for c in envelope.changes])
        return Accept()


class QuarantineSink(Sink):
    """Also owns quarantined messages (issue 11's core)."""

    @hookimpl
    def bonzo_quarantine(self, envelope: Any, reason: str) -> Accept:
        self.quarantined.append(reason)
        return Accept()


def plugin(*milters: dict[str, Any]) -> MilterPlugin:
    p = MilterPlugin()
    p.bonzo_configure(config={"milters": list(milters)}, app=None)
    return p


def entry(fake: FakeMilter, **kw: Any) -> dict[str, Any]:
    kw.setdefault("name", "fake")
    kw.setdefault("command_timeout", 2)
    kw.setdefault("content_timeout", 2)
    return {"socket": fake.spec, **kw}


def send(server: Any, rcpts=("bob@example.com",), message: bytes = MESSAGE) -> Any:
    with server.client() as client:
        return client.sendmail("alice@example.org", list(rcpts), message)


# ------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"milters": 3}, r"^milters: expected an array"),
        ({"milters": [{"socket": "inet:1@h"}]}, r"^milters\[0\]\.name: required"),
        ({"milters": [{"name": "a"}]}, r"^milters\[0\]\.socket: required"),
        ({"milters": [{"name": "a", "socket": "tcp:1"}]}, r"^milters\[0\]\.socket: "),
        ({"milters": [{"name": "a", "socket": "inet:1@h", "x": 1}]}, r"^milters\[0\]\.x: unknown"),
        (
            {"milters": [{"name": "a", "socket": "inet:1@h", "default_action": "reject"}]},
            r"^milters\[0\]\.default_action: expected one of",
        ),
        (
            {"milters": [{"name": "a", "socket": "inet:1@h", "command_timeout": 0}]},
            r"^milters\[0\]\.command_timeout: expected seconds",
        ),
        (
            {"milters": [{"name": "a", "socket": "inet:1@h", "macros": {"bad name": "x"}}]},
            r'^milters\[0\]\.macros\."bad name"',
        ),
        (
            {"milters": [{"name": "a", "socket": "inet:1@h"}, {"name": "a", "socket": "unix:/x"}]},
            r"^milters\[1\]\.name: 'a' is used twice",
        ),
        ({"milter": []}, r"^milter: unknown key \(did you mean 'milters'\?\)$"),
        (
            {"milters": [{"name": "a", "socket": "inet:1@h", "content_timeout": 3601}]},
            r"^milters\[0\]\.content_timeout: expected a number <= 3600, got 3601$",
        ),
        (
            {"milters": [{"name": "a b", "socket": "inet:1@h"}]},
            r"^milters\[0\]\.name: letters, digits",
        ),
        (
            {"milters": [{"name": "a", "socket": "inet:1@h", "macros": {"j": 1}}]},
            r'^milters\[0\]\.macros\."j": expected a string, got 1$',
        ),
    ],
)
def test_configuration_errors_name_the_key(table, error):
    with pytest.raises(ValueError, match=error):
        MilterPlugin().bonzo_configure(config=table, app=None)


def test_timeouts_are_durations_and_macros_are_copied():
    table = {"milters": [{"name": "a", "socket": "inet:1@h", "content_timeout": "2m"}]}
    first, second = MilterPlugin(), MilterPlugin()
    first.bonzo_configure(config=table, app=None)
    second.bonzo_configure(config=table, app=None)
    (c,) = first.milters
    assert c.content_timeout == 120.0 and c.connect_timeout == 10.0
    assert c.socket.port == 1 and c.socket.host == "h"
    assert c.macros == {} and c.macros is not second.milters[0].macros


def test_readme_documents_the_mapping():
    text = (ROOT / "plugins" / "milter" / "README.rst").read_text("utf-8")
    for action in ("ADDHEADER", "INSHEADER", "CHGHEADER", "REPLBODY", "ADDRCPT", "DELRCPT"):
        assert action in text
    for action in ("CHGFROM", "QUARANTINE", "DISCARD", "REPLYCODE", "TEMPFAIL", "REJECT"):
        assert action in text


@pytest.mark.parametrize(
    ("reply", "code", "enhanced", "text"),
    [
        (m.ReplyCode(554, "5.7.1 Go away"), 554, "5.7.1", "Go away"),
        (m.ReplyCode(451, "4.7.1 Later\r\n451-4.7.1 again"), 451, "4.7.1", "Later\nagain"),
        (m.ReplyCode(550, "2.0.0 mismatch"), 550, "5.7.1", "mismatch"),
        (m.ReplyCode(550, "bad\x1b[0m\x00text"), 550, "5.7.1", "bad?[0m?text"),
        (m.ReplyCode(421, ""), 421, "4.7.1", "Refused by a filter"),
    ],
)
def test_reply_codes_are_checked_and_sanitised(reply, code, enhanced, text):
    error = reply_error(reply)
    assert (error.status_code, error.enhanced_code, error.message) == (code, enhanced, text)


# --------------------------------------------------------------- the stages
def test_every_stage_reaches_the_milter_and_the_mail_is_delivered():
    sink = Sink()
    with FakeMilter() as fake, serve(("milter", plugin(entry(fake))), ("sink", sink)) as server:
        assert send(server) == {}
    (session,) = fake.sessions
    codes = session.codes()
    assert [c for c in codes if c != m.C_MACRO] == [
        b"O", b"C", b"H", b"M", b"R", b"T", b"L", b"L", b"L", b"L", b"N", b"B", b"E", b"Q"
    ]  # fmt: skip
    assert session.of(m.C_CONNECT)[0].args[1:] == (
        "4",
        session.of(m.C_CONNECT)[0].args[2],
        "127.0.0.1",
    )
    assert session.of(m.C_MAIL)[0].args[0] == "<alice@example.org>"
    assert session.of(m.C_RCPT)[0].args[0] == "<bob@example.com>"
    headers = [c.args for c in session.of(m.C_HEADER)]
    assert headers[0][0] == "Received"  # the trace header is part of the message
    assert headers[1:] == [("From", "a@example.org"), ("Subject", "hello"), ("X-Old", "1")]
    assert session.of(m.C_BODY)[0].args == (b"Body line\r\n",)
    assert session.macros[m.C_CONNECT]["{client_addr}"] == "127.0.0.1"
    assert session.macros[m.C_MAIL]["{mail_addr}"] == "alice@example.org"
    assert session.macros[m.C_RCPT]["{rcpt_addr}"] == "bob@example.com"
    assert len(sink.delivered) == 1
    assert sink.results == [[("pass", {"milter": "fake", "action": "continue", "changes": 0})]]


def test_refusals_at_each_stage():
    def script(command, session):
        if command.code == m.C_MAIL and "spam" in command.args[0]:
            return [m.Verdict(m.R_REJECT)]
        if command.code == m.C_RCPT and "later" in command.args[0]:
            return [m.Verdict(m.R_TEMPFAIL)]
        if command.code == m.C_RCPT and "nobody" in command.args[0]:
            return [m.ReplyCode(550, "5.1.1 No such\r\nuser")]
        return None

    sink = Sink()
    with (
        FakeMilter(script) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        with server.client() as client:
            client.ehlo()
            assert client.mail("spam@example.org")[0] == 550
            code, text = client.mail("alice@example.org")
            assert code == 250
            assert client.rcpt("later@example.com") == (
                451,
                b"4.7.1 Try again later (content filter)",
            )
            assert client.rcpt("nobody@example.com") == (550, b"5.1.1 No such\n5.1.1 user")
            assert client.rcpt("bob@example.com")[0] == 250
            assert client.data(MESSAGE)[0] == 250
    assert sink.delivered[0][1] == ["bob@example.com"]
    # A second MAIL after a refused one begins with ABORT on the milter's side.
    codes = [c for c in fake.sessions[0].codes() if c != m.C_MACRO]
    assert codes[codes.index(b"M") + 1] == b"A"


@pytest.mark.parametrize(
    ("eom", "code"),
    [
        ([m.Verdict(m.R_REJECT)], 550),
        ([m.Verdict(m.R_TEMPFAIL)], 451),
        ([m.ReplyCode(554, "5.7.0 Virus found: Eicar-Test-Signature")], 554),
    ],
)
def test_end_of_message_verdicts(eom, code):
    sink = Sink()
    with (
        FakeMilter(end_of_message=eom) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        with pytest.raises(smtplib.SMTPDataError) as info:
            send(server)
    assert info.value.smtp_code == code
    assert sink.delivered == []


def test_accept_stops_asking_for_the_message():
    def script(command, session):
        if command.code == m.C_MAIL:
            return [m.Verdict(m.R_ACCEPT)]
        return None

    sink = Sink()
    with (
        FakeMilter(script) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        assert send(server) == {}
    codes = fake.sessions[0].codes()
    assert m.C_RCPT not in codes and m.C_EOB not in codes
    assert len(sink.delivered) == 1
    assert sink.results == [[("pass", {"milter": "fake", "action": "accept", "stage": "mail"})]]


def test_header_changes_are_applied():
    eom = [
        m.HeaderChange(m.R_ADDHEADER, "X-Added", "yes\n\tfolded"),
        m.HeaderChange(m.R_INSHEADER, "X-Top", "first", 0),
        m.HeaderChange(m.R_CHGHEADER, "X-Old", "", 1),
        m.HeaderChange(m.R_ADDHEADER, "X-Last", "z"),
        m.Verdict(m.R_CONTINUE),
    ]
    sink = Sink()
    with (
        FakeMilter(end_of_message=eom) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        assert send(server) == {}
    content = sink.delivered[0][2]
    # INSHEADER 0: the very top; ADDHEADER: the last field; CHGHEADER "": gone.
    assert content.startswith(b"X-Top: first\r\nReceived: ")
    assert content.endswith(
        b"\r\nSubject: hello\r\nX-Added: yes\r\n\tfolded\r\nX-Last: z\r\n\r\nBody line\r\n"
    )
    assert b"X-Old" not in content
    assert sink.changes == [
        [
            ("milter", "insert_header", "X-Added at 4"),
            ("milter", "insert_header", "X-Top at 0"),
            ("milter", "delete_header", "X-Old"),
            ("milter", "insert_header", "X-Last at 5"),
        ]
    ]


def test_two_milters_in_order_first_refusal_wins():
    sink = Sink()
    with (
        FakeMilter(end_of_message=[m.Verdict(m.R_REJECT)]) as second,
        FakeMilter(
            end_of_message=[m.HeaderChange(m.R_ADDHEADER, "X-First", "1"), m.Verdict(m.R_CONTINUE)]
        ) as first,
        serve(
            ("milter", plugin(entry(first, name="one"), entry(second, name="two"))), ("sink", sink)
        ) as server,
    ):
        with pytest.raises(smtplib.SMTPDataError):
            send(server)
    # The second milter saw the first one's header.
    names = [c.args[0] for c in second.sessions[0].of(m.C_HEADER)]
    assert "X-First" in names


# ------------------------------------------------------------ fault paths


def test_milter_down_fails_closed_by_default(caplog):
    sink = Sink()
    p = plugin({"name": "down", "socket": f"inet:{free_port()}@127.0.0.1"})
    with serve(("milter", p), ("sink", sink)) as server:
        with pytest.raises(smtplib.SMTPConnectError) as info:
            server.client()
    # 451 4.7.1, sent as 421: only 421 or 554 may stand in for the greeting.
    assert info.value.smtp_code == 421
    assert b"4.7.1" in info.value.smtp_error
    assert "milter down failed at connect" in caplog.text
    # The log says the code the client got.
    assert "answered 421 4.7.1 (default_action tempfail)" in caplog.text
    assert "answered 451" not in caplog.text


def test_milter_down_with_default_action_accept():
    sink = Sink()
    p = plugin(
        {"name": "down", "socket": f"inet:{free_port()}@127.0.0.1", "default_action": "accept"}
    )
    with serve(("milter", p), ("sink", sink)) as server:
        assert send(server) == {}
    assert len(sink.delivered) == 1


@pytest.mark.parametrize(
    "answer",
    [HANG, CLOSE, b"\0\0\0\x03zzz", b"\x7f\xff\xff\xffh"],
    ids=["timeout", "closed", "garbage", "oversize"],
)
def test_faults_at_end_of_message_give_451(answer):
    def script(command, session):
        return answer if command.code == m.C_EOB else None

    sink = Sink()
    with (
        FakeMilter(script) as fake,
        serve(("milter", plugin(entry(fake, content_timeout=0.5))), ("sink", sink)) as server,
    ):
        with server.client() as client:
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail("alice@example.org", ["bob@example.com"], MESSAGE)
            assert (info.value.smtp_code, info.value.smtp_error[:5]) == (451, b"4.7.1")
            # The milter is out for the session: fail closed from now on.
            assert client.mail("alice@example.org")[0] == 451
    assert sink.delivered == []


def test_rset_aborts_and_disconnect_quits():
    sink = Sink()
    with FakeMilter() as fake, serve(("milter", plugin(entry(fake))), ("sink", sink)) as server:
        with server.client() as client:
            client.ehlo()
            client.mail("alice@example.org")
            client.rset()
            client.quit()
        import time

        deadline = time.monotonic() + 5
        while not fake.sessions[0].closed and time.monotonic() < deadline:
            time.sleep(0.02)
    codes = fake.sessions[0].codes()
    assert codes[-2:] == [m.C_ABORT, m.C_QUIT]


# ------------------------------------------------- issue 11's core verdicts
def test_discard_at_rcpt_and_quarantine(caplog):
    def script(command, session):
        if command.code == m.C_RCPT and "trap" in command.args[0]:
            return [m.Verdict(m.R_DISCARD)]
        return None

    sink = QuarantineSink()
    with (
        FakeMilter(script) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        assert send(server, rcpts=["bob@example.com", "trap@example.com"]) == {}
    assert sink.delivered == []
    assert "milter fake at rcpt: discard" in caplog.text
    with (
        FakeMilter(end_of_message=[m.Verdict(m.R_DISCARD)]) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        assert send(server) == {}
    assert sink.delivered == []
    eom = [m.QuarantineRequest("suspicious"), m.Verdict(m.R_CONTINUE)]
    with (
        FakeMilter(end_of_message=eom) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        assert send(server) == {}
    assert sink.quarantined == ["suspicious"] and sink.delivered == []


def test_refusals_are_recorded_as_results():
    seen = []

    class Look:
        @hookimpl
        def bonzo_rcpt(self, envelope):
            seen.append(
                [(r.result, r.details.get("stage")) for r in envelope.results.all("milter")]
            )
            return Accept()

    def script(command, session):
        if command.code == m.C_RCPT and "no" in command.args[0]:
            return [m.Verdict(m.R_REJECT)]
        return None

    with (
        FakeMilter(script) as fake,
        serve(("milter", plugin(entry(fake))), ("look", Look()), ("sink", Sink())) as server,
        server.client() as client,
    ):
        client.ehlo()
        client.mail("alice@example.org")
        assert client.rcpt("no@example.com")[0] == 550
        assert client.rcpt("yes@example.com")[0] == 250
    assert seen == [[("reject", "rcpt")]]


def test_the_example_configuration_shows_every_key_and_configures():
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    example = (ROOT / "bonzo.toml.example").read_text("utf-8")
    start = example.index("# [plugins.milter]")
    end = example.find("\n\n", start)
    block = example[start:end]
    shown = set(re.findall(r"^# (\w+) = ", block, re.M))
    assert shown == set(MILTER_KEYS)
    text = "\n".join(line[2:] for line in block.splitlines() if line.startswith("# "))
    table = tomllib.loads(text)["plugins"]["milter"]
    p = MilterPlugin()
    p.bonzo_configure(config=table, app=None)
    assert [c.name for c in p.milters] == ["opendkim"]
    assert p.milters[0].macros == {"{daemon_name}": "mx-in"}


def test_a_second_connect_starts_over_and_helo_aborts():
    """XCLIENT runs bonzo_connect again: the old milter sessions end."""
    import asyncio
    import time

    from bonzo import testing

    with FakeMilter() as fake:
        p = plugin(entry(fake))
        session = testing.make_session("192.0.2.7")

        async def go():
            await p.bonzo_connect(session=session)
            envelope = testing.make_envelope() if hasattr(testing, "make_envelope") else None
            if envelope is None:
                from bonzo.session import Envelope

                envelope = Envelope("a@example.org")
            await p.bonzo_mail(
                session=session, envelope=envelope, address="a@example.org", params={}
            )
            await p.bonzo_helo(session=session, name="again.test")
            await p.bonzo_connect(session=session)
            await p.bonzo_disconnect(session=session)

        asyncio.run(go())
        deadline = time.monotonic() + 5
        while not all(s.closed for s in fake.sessions) and time.monotonic() < deadline:
            time.sleep(0.02)
    first, second = fake.sessions
    assert [c for c in first.codes() if c != m.C_MACRO] == [b"O", b"C", b"M", b"A", b"H", b"Q"]
    assert first.of(m.C_CONNECT)[0].args == ("[192.0.2.7]", "4", session.remote_port, "192.0.2.7")
    assert [c for c in second.codes() if c != m.C_MACRO] == [b"O", b"C", b"Q"]


def test_the_milter_is_shown_the_header_section_every_reader_sees():
    """The fields are those the envelope reads (and the delivered message
    has): the section ends at its first line that is no header field (a
    blank line is inserted there when fields follow), so a body sent
    without the blank line is shown as body, never dropped; ``From :`` is
    the From field; every field is shown, however many."""
    sink = Sink()
    # 6,000 fields, one milter packet each: a loaded machine may take more
    # than these tests' usual 2 s to exchange them.
    with (
        FakeMilter() as fake,
        serve(("milter", plugin(entry(fake, content_timeout=60))), ("sink", sink)) as server,
    ):
        no_blank = b"From: a@example.org\r\nSubject: x\r\nX5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR\r\n"
        assert send(server, message=no_blank) == {}
        hidden = b"Subject: x\r\nnot a field\r\nFrom: ceo@bank.example\r\n\r\nBody\r\n"
        assert send(server, message=hidden) == {}
        spaced = b"From : ceo@bank.example\r\nSubject : pay now\r\n\r\nBody\r\n"
        assert send(server, message=spaced) == {}
        many = b"".join(b"X-F: %d\r\n" % i for i in range(6000))
        assert send(server, message=many + b"From: ceo@bank.example\r\n\r\nBody\r\n") == {}
    sessions = [s for s in fake.sessions if s.of(m.C_EOB)]
    assert len(sessions) == 4  # a connection per SMTP session

    def shown(n: int) -> tuple[list[tuple[str, str]], bytes]:
        commands = sessions[n].commands
        headers = [c.args for c in commands if c.code == m.C_HEADER]
        body = b"".join(c.args[0] for c in commands if c.code == m.C_BODY)
        return headers, body

    headers, body = shown(0)
    assert [n for n, _ in headers] == ["Received", "From", "Subject"]
    assert body == b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR\r\n"
    headers, body = shown(1)
    assert [n for n, _ in headers] == ["Received", "Subject"]
    assert body == b"not a field\r\nFrom: ceo@bank.example\r\n\r\nBody\r\n"
    assert b"Subject: x\r\n\r\nnot a field\r\n" in sink.delivered[1][2]
    headers, _ = shown(2)
    assert headers[1:] == [("From", "ceo@bank.example"), ("Subject", "pay now")]
    headers, _ = shown(3)
    assert len(headers) == 6002 and headers[-1] == ("From", "ceo@bank.example")


def test_a_header_field_too_long_for_a_milter_frame_is_refused(caplog):
    """A field over MAX_FIELD cannot be shown whole (a frame holds 64 KiB):
    the message is refused rather than judged, or signed, on part of it."""
    from bonzo_plugins.milter.plugin import MAX_FIELD

    sink = Sink()
    folded = b"\r\n ".join(b"w%05d" % i for i in range(MAX_FIELD // 8 + 10))
    long = b"To: " + folded + b", ceo@bank.example\r\n"
    with (
        FakeMilter() as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        with pytest.raises(smtplib.SMTPDataError) as info:
            send(server, message=long + MESSAGE)
        assert (info.value.smtp_code, info.value.smtp_error[:5]) == (552, b"5.3.4")
        assert send(server) == {}
    assert sum(1 for s in fake.sessions if s.of(m.C_EOB)) == 1  # only the second message
    assert len(sink.delivered) == 1
    assert "Header field too long to be filtered" in caplog.text


def test_a_message_exchange_that_outlasts_content_timeout_applies_default_action(caplog):
    """Each body piece is answered in time, but the message as a whole takes
    longer than content_timeout: a fault of the milter (its default_action,
    here accept), ended before the hook's own limit; the milter is out for
    the session, and its late answers never answer a later command."""
    import time

    def slow(command, session):
        if command.code == m.C_BODY:
            time.sleep(0.15)
        if command.code == m.C_MAIL and "spammer" in command.args[0]:
            return [m.Verdict(m.R_REJECT)]
        return None

    sink = Sink()
    big = MESSAGE + (b"x" * 78 + b"\r\n") * (m.CHUNK_SIZE * 10 // 80)
    with (
        FakeMilter(slow) as fake,
        serve(
            ("milter", plugin(entry(fake, content_timeout=0.6, default_action="accept"))),
            ("sink", sink),
        ) as server,
        server.client() as client,
    ):
        assert client.sendmail("alice@example.org", ["bob@example.com"], big) == {}
        assert client.mail("spammer@example.org")[0] == 250  # the milter is out
        assert client.rcpt("carol@example.com")[0] == 250
    assert len(sink.delivered) == 1
    [[result]] = sink.results
    assert result[0] == "error" and result[1]["stage"] == "end of message"
    assert "no verdict on the message within its content_timeout (0.6s)" in caplog.text


def test_a_modification_the_milter_did_not_declare_is_a_fault():
    """Declared no actions, then sent changes: a protocol fault (its
    default_action), nothing of it applied."""
    sink = Sink()
    eom = [
        m.RecipientChange(m.R_ADDRCPT, "<eve@evil.example>"),
        m.ChangeSender("<spoof@bank.example>"),
        m.HeaderChange(m.R_ADDHEADER, "X-Undeclared", "yes"),
        m.Verdict(m.R_ACCEPT),
    ]
    for action, code in (("tempfail", 451), ("accept", None)):
        with (
            FakeMilter(actions=0, end_of_message=eom) as fake,
            serve(("milter", plugin(entry(fake, default_action=action))), ("sink", sink)) as server,
        ):
            if code is None:
                assert send(server) == {}
            else:
                with pytest.raises(smtplib.SMTPDataError) as info:
                    send(server)
                assert info.value.smtp_code == code
    [(sender, rcpts, content)] = sink.delivered
    assert (sender, rcpts) == ("alice@example.org", ["bob@example.com"])
    assert b"X-Undeclared" not in content


def test_a_header_change_with_octets_that_are_not_utf8_is_applied():
    """A spam tag on a raw Latin-1 subject: the milter's octets are stored
    as it sent them (the character set is unknown), not dropped."""
    sink = Sink()
    eom = [
        m.HeaderChange(m.R_CHGHEADER, "Subject", "[SPAM] caf\udce9", 1),
        m.HeaderChange(m.R_ADDHEADER, "X-Report", "caf\udce9 r\udce9sum\udce9"),
        m.Verdict(m.R_CONTINUE),
    ]
    with (
        FakeMilter(end_of_message=eom) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        assert send(server, message=b"Subject: caf\xe9\r\n\r\nBody\r\n") == {}
    [(_, _, content)] = sink.delivered
    assert b"Subject: [SPAM] caf\xe9\r\n" in content
    assert b"X-Report: caf\xe9 r\xe9sum\xe9\r\n" in content


def test_after_a_discard_at_mail_the_later_milters_get_nothing_of_the_message():
    sink = Sink()
    with (
        FakeMilter() as second,
        FakeMilter(lambda c, s: [m.Verdict(m.R_DISCARD)] if c.code == m.C_MAIL else None) as first,
        serve(
            ("milter", plugin(entry(first, name="one"), entry(second, name="two"))), ("sink", sink)
        ) as server,
    ):
        assert send(server) == {}
    assert sink.delivered == []
    codes = [c for c in second.sessions[0].codes() if c != m.C_MACRO]
    assert codes == [b"O", b"C", b"H", b"Q"]


def test_readme_example_configures(tmp_path):
    import sys

    from test_bundle import toml_blocks

    from bonzo.app import MailApp
    from bonzo.config import parse_config

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    (block,) = toml_blocks((ROOT / "plugins" / "milter" / "README.rst").read_text("utf-8"))
    p = MilterPlugin()
    p.bonzo_configure(config=tomllib.loads(block)["plugins"]["milter"], app=None)
    assert [(c.name, str(c.socket)) for c in p.milters] == [
        ("opendkim", "inet:8891@127.0.0.1"),
        ("clamav", "unix:/run/clamav/clamav-milter.ctl"),
    ]
    # As a whole configuration, as `bonzo check` reads it: no warning that
    # the milters may outlast the plugin's hook time limit.
    config = parse_config(block, source="README.rst", base_dir=tmp_path)
    warnings = MailApp(config).warnings()
    assert not [w for w in warnings if "hook time limit" in w], warnings


ALL_CHANGES = [
    m.HeaderChange(m.R_CHGHEADER, "Subject", "[filtered] hello", 1),
    m.ChangeSender("<bounces@example.org>", "BODY=8BITMIME"),
    m.RecipientChange(m.R_ADDRCPT, "<archive@example.com>"),
    m.RecipientChange(m.R_DELRCPT, "<bob@example.com>"),
    m.ReplaceBody(b"New body\r\n"),
    m.Verdict(m.R_CONTINUE),
]


def test_body_recipient_sender_and_header_changes_are_applied():
    sink = Sink()
    with (
        FakeMilter(end_of_message=ALL_CHANGES) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        assert send(server) == {}
    ((sender, rcpts, content),) = sink.delivered
    assert sender == "bounces@example.org"
    assert rcpts == ["archive@example.com"]
    assert b"\r\nSubject: [filtered] hello\r\n" in content
    assert content.endswith(b"\r\n\r\nNew body\r\n")


def test_a_refused_chgfrom_leaves_the_sender(caplog):
    """A CHGFROM whose parameters are bad (``RET=BOGUS``) is refused and
    logged; the message goes with the client's sender, not the milter's."""
    sink = Sink()
    changes = [m.ChangeSender("<>", "RET=BOGUS"), m.Verdict(m.R_CONTINUE)]
    with (
        FakeMilter(end_of_message=changes) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        assert send(server) == {}
    ((sender, rcpts, content),) = sink.delivered
    assert sender == "alice@example.org" and rcpts == ["bob@example.com"]
    assert "ChangeSender refused: Bad RET parameter" in caplog.text


def test_the_milter_state_is_no_warning_for_the_queue(caplog):
    """The plugin keeps its live connections in the session's stash; the
    queue, which writes the stashes into its files, warned at every start
    that they were no JSON value. They are under a transient key ("_"):
    left out without a word."""
    from bonzo_plugins.queue.plugin import _jsonable

    stashes: list[dict[str, Any]] = []

    class Stashes(Sink):
        @hookimpl
        def bonzo_deliver(self, session: Any, envelope: Any) -> Accept:
            stashes.append(dict(session.stash))
            return super().bonzo_deliver(envelope)

    with (
        FakeMilter() as fake,
        serve(("milter", plugin(entry(fake))), ("sink", Stashes())) as server,
    ):
        assert send(server) == {}
    [stash] = stashes
    assert stash  # the milter's state is there
    with caplog.at_level(logging.WARNING, logger="bonzo.plugins.queue"):
        _jsonable(stash, "session")
    assert "not a JSON value" not in caplog.text


def test_refusal_at_connect_and_helo_and_session_accept():
    def refuse(code):
        def script(command, session):
            return [m.Verdict(m.R_REJECT)] if command.code == code else None

        return script

    with (
        FakeMilter(refuse(m.C_CONNECT)) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", Sink())) as server,
    ):
        with pytest.raises(smtplib.SMTPConnectError) as info:
            server.client()
        assert info.value.smtp_code == 554  # the milter's 550, as a greeting may be
    with (
        FakeMilter(refuse(m.C_HELO)) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", Sink())) as server,
        server.client() as client,
    ):
        assert client.ehlo()[0] == 550
    # ACCEPT at connect: the milter is not asked again in the session.
    accept = lambda c, s: [m.Verdict(m.R_ACCEPT)] if c.code == m.C_CONNECT else None  # noqa: E731
    sink = Sink()
    with (
        FakeMilter(accept) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        assert send(server) == {}
    assert [c for c in fake.sessions[0].codes() if c != m.C_MACRO][:3] == [b"O", b"C", b"Q"]
    assert len(sink.delivered) == 1


def test_any_modifications_are_applied_or_refused_cleanly():
    """Whatever a milter asks for at the end of the message, applying it
    never raises: a change the envelope refuses is logged and skipped."""
    from bonzo_plugins.milter.plugin import _BodySink, _Milter
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from bonzo import testing
    from bonzo.session import Envelope

    names = st.sampled_from(["Subject", "X-New", "From", "Received", "bad name", "", "X:Y", "é"])
    values = st.text(max_size=30)
    changes = st.lists(
        st.one_of(
            st.builds(m.HeaderChange, st.sampled_from([m.R_ADDHEADER]), names, values),
            st.builds(
                m.HeaderChange,
                st.sampled_from([m.R_INSHEADER, m.R_CHGHEADER]),
                names,
                values,
                st.integers(0, 2**32 - 1),
            ),
            st.builds(
                m.RecipientChange,
                st.sampled_from([m.R_ADDRCPT, m.R_DELRCPT, m.R_ADDRCPT_PAR]),
                st.sampled_from(
                    ["<x@example.com>", "<bob@example.com>", "", "<>", "bad", "<a@b@c>"]
                ),
                st.sampled_from(["", "NOTIFY=NEVER", "X"]),
            ),
            st.builds(m.ChangeSender, st.sampled_from(["<new@example.org>", "", "<>", "x y"])),
            st.builds(m.QuarantineRequest, values),
        ),
        max_size=8,
    )
    p = plugin({"name": "h", "socket": "inet:1@127.0.0.1"})
    session = testing.make_session()

    @settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(changes)
    def check(items):
        envelope = Envelope("alice@example.org")
        envelope.rcpt_tos.append("bob@example.com")
        envelope.write(MESSAGE)
        mi = _Milter(p.milters[0])
        mi.client = m.MilterClient(p.milters[0].socket)
        mi.client.options = m.OptionReply(6, m.ALL_ACTIONS, 0)
        sink = _BodySink()
        try:
            p._apply(session, envelope, mi, m.Outcome(m.Verdict(m.R_CONTINUE), items), sink)
            assert envelope.content.endswith(b"\r\n\r\nBody line\r\n")
        finally:
            sink.file.close()
            envelope.close()

    check()


def test_discard_at_helo_discards_every_message_of_the_session():
    def script(command, session):
        return [m.Verdict(m.R_DISCARD)] if command.code == m.C_HELO else None

    sink = Sink()
    with (
        FakeMilter(script) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
        server.client() as client,
    ):
        for _ in range(2):
            assert client.sendmail("alice@example.org", ["bob@example.com"], MESSAGE) == {}
    assert sink.delivered == []


def test_a_nul_in_a_header_field_is_refused_whatever_the_default_action(caplog):
    """The milter protocol carries a field as a C string: a NUL would cut
    it (the milter would judge or sign other content than is stored), so
    the message is refused as malformed, not passed on a fault's default."""
    sink = Sink()
    bad = b"From: a@example.org\r\nSubject: a\x00b\r\n\r\nBody line\r\n"
    for action in ("tempfail", "accept"):
        with (
            FakeMilter() as fake,
            serve(("milter", plugin(entry(fake, default_action=action))), ("sink", sink)) as server,
        ):
            with pytest.raises(smtplib.SMTPDataError) as info:
                send(server, message=bad)
            assert (info.value.smtp_code, info.value.smtp_error) == (
                554,
                b"5.6.0 Header field contains a NUL octet",
            )
            assert send(server) == {}  # the next message is fine
        assert not any(s.of(m.C_HEADER) and s.of(m.C_EOB) for s in fake.sessions[:1])
    assert len(sink.delivered) == 2 and all(b"\0" not in d[2] for d in sink.delivered)
    assert "milter fake: Header field contains a NUL octet; refused" in caplog.text
    assert "Traceback" not in caplog.text


def test_auth_type_names_the_mechanism_the_client_used():
    class Users:
        @hookimpl
        def bonzo_auth(self, username: str, password: str) -> Accept | None:
            return Accept() if (username, password) == ("alice", "secret") else None

    sink = Sink()
    with (
        FakeMilter() as fake,
        serve(
            ("users", Users()),
            ("milter", plugin(entry(fake))),
            ("sink", sink),
            listener=ListenerSettings(auth_plaintext=True),
        ) as server,
    ):
        for mechanism in ("LOGIN", "PLAIN"):
            with server.client() as client:
                client.ehlo()
                client.user, client.password = "alice", "secret"
                method = client.auth_login if mechanism == "LOGIN" else client.auth_plain
                assert client.auth(mechanism, method)[0] == 235
                client.sendmail("alice@example.org", ["bob@example.com"], MESSAGE)
    assert [s.macros[m.C_MAIL].get("{auth_type}") for s in fake.sessions] == ["LOGIN", "PLAIN"]
    assert [s.macros[m.C_MAIL].get("{auth_authen}") for s in fake.sessions] == ["alice", "alice"]


def test_the_macros_postfix_sends_by_default_for_tls_auth_and_the_interface(tmp_path):
    """``{cipher_bits}`` at HELO (a milter's "at least 128-bit TLS" policy),
    ``{auth_author}`` (MAIL's ``AUTH=``, xtext-decoded, from an
    authenticated client only) and ``{daemon_addr}`` at connect, as in
    Postfix's default macro lists."""
    import ssl

    import trustme

    from bonzo.tls import CertificatePair, make_server_context

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    class Users:
        @hookimpl
        def bonzo_auth(self, username: str, password: str) -> Accept | None:
            return Accept() if (username, password) == ("alice", "secret") else None

    listener = ListenerSettings(
        tls_context=make_server_context(CertificatePair(str(cert), str(key)))
    )
    with (
        FakeMilter() as fake,
        serve(
            ("users", Users()), ("milter", plugin(entry(fake))), ("sink", Sink()),
            listener=listener,
        ) as server,
    ):  # fmt: skip
        with server.client() as client:
            client.starttls(context=client_ctx)
            client.ehlo()
            client.login("alice", "secret")
            client.sendmail(
                "alice@example.org", ["bob@example.com"], MESSAGE,
                mail_options=["AUTH=b+2Bc@example.org"],
            )  # fmt: skip
        with server.client() as client:  # not authenticated: no {auth_author}
            client.starttls(context=client_ctx)
            client.sendmail(
                "alice@example.org", ["bob@example.com"], MESSAGE,
                mail_options=["AUTH=b+2Bc@example.org"],
            )  # fmt: skip
    first, second = fake.sessions
    assert first.macros[m.C_CONNECT]["{daemon_addr}"] == "127.0.0.1"
    bits = first.macros[m.C_HELO]["{cipher_bits}"]
    assert bits.isdigit() and int(bits) >= 128
    assert first.macros[m.C_MAIL]["{auth_author}"] == "b+c@example.org"
    assert "{auth_author}" not in second.macros[m.C_MAIL]


# ------------------------------------ as Sendmail and Postfix (a tester's findings)
UPSTREAM = b"Received: from pc.internal (pc [10.1.2.3]) by submit.example.org\r\n" + MESSAGE


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # Delete #1: the upstream field, not Bonzo's own trace.
        (m.HeaderChange(m.R_CHGHEADER, "Received", "", 1), []),
        (m.HeaderChange(m.R_CHGHEADER, "received", "from changed", 0), ["from changed"]),
        # There is no #2 (ours is not counted): a new field at the end.
        (
            m.HeaderChange(m.R_CHGHEADER, "Received", "from added", 2),
            ["from pc.internal (pc [10.1.2.3]) by submit.example.org", "from added"],
        ),
    ],
)
def test_chgheader_received_counts_from_the_field_after_bonzo_s_own(change, expected):
    """Sendmail and Postfix (cleanup_milter.c) count Received: fields for a
    change or a delete from the one after their own trace field: a milter
    written for them that removes the first client trace field removed
    Bonzo's own instead. INSHEADER still counts every field (0: above it)."""
    sink = Sink()
    eom = [change, m.HeaderChange(m.R_INSHEADER, "X-Top", "1", 0), m.Verdict(m.R_CONTINUE)]
    with (
        FakeMilter(end_of_message=eom) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        assert send(server, message=UPSTREAM) == {}
    content = sink.delivered[0][2]
    lines = content.split(b"\r\n")
    assert lines[0] == b"X-Top: 1"
    assert lines[1].startswith(b"Received: from ") and b"by mx.test (Bonzo" in content
    received = [
        line[len(b"Received: ") :].decode() for line in lines[2:] if line.startswith(b"Received:")
    ]
    assert received == expected


def test_daemon_name_is_the_host_name_as_postfix_sends_it():
    """rspamd takes {daemon_name} as its authserv-id: "bonzo" on every
    server was no domain name (RFC 8601 2.5)."""
    from types import SimpleNamespace

    p = MilterPlugin()
    app = SimpleNamespace(settings=SimpleNamespace(hostname="mx.test"))
    with FakeMilter() as fake:
        p.bonzo_configure(config={"milters": [entry(fake)]}, app=app)
        with serve(("milter", p), ("sink", Sink())) as server:
            assert send(server) == {}
    assert fake.sessions[0].macros[m.C_CONNECT]["{daemon_name}"] == "mx.test"


def test_a_later_milter_s_discard_keeps_an_earlier_quarantine():
    """The first of Discard and Quarantine decides, as between plugins."""
    sink = QuarantineSink()
    eom = [m.QuarantineRequest("held by one"), m.Verdict(m.R_CONTINUE)]
    with (
        FakeMilter(end_of_message=[m.Verdict(m.R_DISCARD)]) as second,
        FakeMilter(end_of_message=eom) as first,
        serve(
            ("milter", plugin(entry(first, name="one"), entry(second, name="two"))), ("sink", sink)
        ) as server,
    ):
        assert send(server) == {}
    assert sink.quarantined == ["held by one"] and sink.delivered == []


def test_a_quarantine_stands_when_the_milter_removes_every_recipient(tmp_path, caplog):
    """QUARANTINE and DELRCPT of the only recipient: the maildir plugin's
    quarantine keeps the message (it was silently discarded: tester
    milter3 M1)."""
    from bonzo_plugins.maildir import MaildirPlugin

    maildir = MaildirPlugin()
    maildir.bonzo_configure(
        config={"path": str(tmp_path / "mail"), "quarantine": str(tmp_path / "quar")}, app=None
    )
    maildir.bonzo_startup()
    eom = [
        m.QuarantineRequest("qdel"),
        m.RecipientChange(m.R_DELRCPT, "<bob@example.com>"),
        m.Verdict(m.R_CONTINUE),
    ]
    with (
        FakeMilter(end_of_message=eom) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", Sink()), ("maildir", maildir)) as server,
    ):
        assert send(server) == {}
    [kept] = (tmp_path / "quar" / "new").iterdir()
    assert b"X-Bonzo-Quarantine: milter: qdel\r\n" in kept.read_bytes()
    assert not any((tmp_path / "mail" / "new").iterdir())
    assert " discarded" not in caplog.text


def macros_by_command(session: Any) -> list[tuple[bytes, dict[str, str]]]:
    """Each command, with the macros the MACRO frame just before it carried."""
    out: list[tuple[bytes, dict[str, str]]] = []
    pending: dict[str, str] = {}
    for command in session.commands:
        if command.code == m.C_MACRO:
            pending = dict(command.args[1])
        else:
            out.append((command.code, pending))
            pending = {}
    return out


@pytest.mark.parametrize("symbols", [False, True])
def test_the_end_of_headers_macros_reach_eoh_and_a_symbol_list_only_narrows(symbols):
    """The message id (``i``) goes with EOH, where libmilter takes it, and
    with each header (as Postfix sends it), filtered by the EOH symbol list.
    A symbol list cannot add a macro Bonzo does not send at that stage."""
    lists = {
        m.M_HELO: ("j", "{cipher}"),  # j is sent at connect only
        m.M_ENVRCPT: ("i", "{rcpt_addr}"),  # i is not sent at RCPT
        m.M_DATA: ("{mail_addr}",),  # nor {mail_addr} at DATA
        m.M_EOH: ("{foo}",),
        m.M_EOM: ("i",),
    }
    sink = Sink()
    with (
        FakeMilter(symbols=lists if symbols else None) as fake,
        serve(("milter", plugin(entry(fake))), ("sink", sink)) as server,
    ):
        assert send(server) == {}
    got = macros_by_command(fake.sessions[0])
    qid = dict(got)[m.C_EOB]["i"]
    assert len(sink.delivered) == 1 and qid
    eoh = {} if symbols else {"i": qid}
    assert [x for x in got if x[0] in (m.C_HEADER, m.C_EOH)] == [(m.C_HEADER, eoh)] * 4 + [
        (m.C_EOH, eoh)
    ]
    assert dict(got)[m.C_EOB] == {"i": qid}
    if symbols:
        assert dict(got)[m.C_HELO] == {}  # no TLS: no {cipher}; and never j
        assert dict(got)[m.C_RCPT] == {"{rcpt_addr}": "bob@example.com"}
        assert dict(got)[m.C_DATA] == {}

"""The message-change API of the envelope: header edits, a new body, the
sender and recipients changed — recorded with the plugin that made them,
applied once before delivery, bounded for any message."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bonzo import Accept, hookimpl
from bonzo.hooks import PluginSet
from bonzo.session import MAX_HEADER_SECTION, Change, Envelope, current_plugin
from bonzo.settings import SMTPSettings
from bonzo.testing import SessionTester

CLIENT = (
    b"From: a@example.org\r\nSubject: hi\r\nX-Spam: yes\r\n\tfolded\r\n"
    b"To: b@example.net\r\n\r\nBody\r\n"
)


OPEN: list[Envelope] = []


@pytest.fixture(autouse=True)
def _close_envelopes():
    yield
    while OPEN:
        OPEN.pop().close()


def envelope(content: bytes = CLIENT, threshold: int = 1 << 20) -> Envelope:
    env = Envelope("a@example.org", spool_threshold=threshold)
    OPEN.append(env)
    env.prepend_raw(b"Received: from c by s; now\r\n")
    env.write(content)
    return env


@pytest.mark.parametrize("threshold", [1 << 20, 16])  # in memory, and spooled to a file
def test_header_edits_apply_in_order_to_the_whole_section(threshold):
    env = envelope(threshold=threshold)
    env.add_header("X-Added", "1")
    env.insert_header(0, "X-Top", "first")
    env.change_header("subject", "changed")
    env.delete_header("X-Spam")
    env.insert_header(4, "X-Among", "client")  # below From:, a client header
    env.change_header("X-Missing", "appended", 2)
    assert env.content == (
        b"X-Top: first\r\nReceived: from c by s; now\r\nX-Added: 1\r\n"
        b"From: a@example.org\r\nX-Among: client\r\nSubject: changed\r\nTo: b@example.net\r\n"
        b"X-Missing: appended\r\n\r\nBody\r\n"
    )
    assert env.headers()[0] == ("X-Top", "first")
    assert ("Subject", "changed") in env.headers()
    assert env.size == len(env.body)


def test_a_long_value_is_folded_and_an_unfoldable_one_refused():
    import email.parser
    import email.policy

    env = envelope()
    words = " ".join(f"w{i}" for i in range(700))  # 3,389 octets on one line
    env.add_header("X-Long", words)
    head = env.content.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    # Folding only: the value unfolds to what was given.
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(env.content)
    assert str(parsed["X-Long"]) == words
    for method, args in (("add_header", ()), ("insert_header", (0,)), ("change_header", ())):
        with pytest.raises(ValueError, match="X-Long has a line of 2008 octets with no space"):
            getattr(env, method)(*args, "X-Long", "a" * 2000)


def test_a_value_that_is_not_ascii_is_encoded_unless_the_message_is_smtputf8():
    env = envelope()
    env.add_header("X-Uni", "héllo wörld")
    assert b"X-Uni: =?utf-8?b?aMOpbGxvIHfDtnJsZA==?=\r\n" in env.content
    assert env.content.isascii()
    utf8 = Envelope("a@example.org", {"SMTPUTF8": None})
    OPEN.append(utf8)
    utf8.write(CLIENT)
    utf8.add_header("X-Uni", "héllo wörld")
    assert utf8.content.startswith("X-Uni: héllo wörld\r\n".encode())
    with pytest.raises(ValueError, match="not folding"):
        env.add_header("X-Uni", "héllo\nX-Forged: 1")


@pytest.mark.parametrize("threshold", [1 << 20, 16])
def test_the_parsed_message_follows_every_edit(threshold):
    # A filter that reads envelope.message after an earlier one edited the
    # message sees the edit (the parse is not kept across edits).
    env = envelope(threshold=threshold)
    assert env.message["Subject"] == "hi"
    env.change_header("Subject", "***SPAM*** hi")
    assert env.message["Subject"] == "***SPAM*** hi"
    env.insert_header(0, "X-Top", "1")
    assert env.message["X-Top"] == "1"
    env.delete_header("X-Top")
    assert env.message["X-Top"] is None
    env.replace_body(b"New body\r\n")
    assert env.message.get_content().strip() == "New body"
    env.add_header("X-Added", "2")
    assert env.message["X-Added"] == "2"
    assert env.remove_header("X-Added") == 1
    assert env.message["X-Added"] is None


def test_second_occurrence_and_folded_values():
    env = envelope(b"Received: one\r\nReceived: two\r\n\tmore\r\n\r\nx\r\n")
    assert [v for n, v in env.headers() if n == "Received"] == [
        "from c by s; now",
        "one",
        "two\r\n\tmore",
    ]
    env.delete_header("Received", 3)  # the third in the whole section
    env.change_header("Received", "new\r\n\tfolded", 2)
    assert env.content == b"Received: from c by s; now\r\nReceived: new\r\n\tfolded\r\n\r\nx\r\n"


def test_replace_body_keeps_the_headers_and_reads_files_in_chunks():
    env = envelope()
    env.change_header("Subject", "new")
    env.replace_body(io.BytesIO(b"line\r\n" * 100_000))
    content = env.content
    top = b"Received: from c by s; now\r\nFrom: a@example.org\r\nSubject: new\r\n"
    assert content.startswith(top)
    assert content.endswith(b"\r\n\r\n" + b"line\r\n" * 100_000)
    env.replace_body(b"short\r\n")  # the last body wins
    assert env.body.endswith(b"To: b@example.net\r\n\r\nshort\r\n")


def test_a_message_without_a_header_section_or_blank_line():
    env = envelope(b"no header here\r\n")
    env.add_header("X-A", "1")
    env.insert_header(5, "X-B", "2")  # past the end: after the last header
    assert env.content == b"Received: from c by s; now\r\nX-A: 1\r\nX-B: 2\r\nno header here\r\n"
    only = envelope(b"Subject: s\r\n")
    only.replace_body(b"b\r\n")
    assert only.body == b"Subject: s\r\n\r\nb\r\n"


@pytest.mark.parametrize("threshold", [1 << 20, 16])
def test_white_space_before_the_colon_is_the_same_name_to_every_method(threshold):
    # RFC 5322 4.5.8 (obs-optional): "X-Spam-Flag : YES" is an X-Spam-Flag
    # field, which a parser must accept: a forged one is removed like any.
    forged = (
        b"X-Spam-Flag : YES\r\nSubject: hi\r\nX-Spam-Status\t: Yes,\r\n score=50\r\n"
        b"X-Spam-Flag:NO\r\n\r\nX-Spam-Flag : in the body stays\r\n"
    )
    env = envelope(forged, threshold=threshold)
    env.prepend_raw(b"X-Spam-Flag : added\r\n")
    names = [n for n, _ in env.headers()]
    assert names.count("X-Spam-Flag") == 3 and "X-Spam-Status" in names
    assert env.remove_header("x-spam-flag") == 3
    assert env.remove_header("X-SPAM-STATUS") == 1
    assert env.content == (
        b"Received: from c by s; now\r\nSubject: hi\r\n\r\nX-Spam-Flag : in the body stays\r\n"
    )
    again = envelope(forged, threshold=threshold)
    again.change_header("X-Spam-Flag", "checked", 2)
    again.delete_header("X-Spam-Flag")
    assert again.content.startswith(
        b"Received: from c by s; now\r\nSubject: hi\r\nX-Spam-Status\t: Yes,\r\n score=50\r\n"
        b"X-Spam-Flag: checked\r\n\r\n"
    )


def test_remove_header_stops_where_the_header_section_does():
    # A line that is no header ends the section (as for headers()): a
    # header-like line after it is body text, left alone.
    env = envelope(b"X-Spam-Flag: YES\r\nnot a header\r\nX-Spam-Flag: body\r\n\r\nmore\r\n")
    assert [n for n, _ in env.headers()] == ["Received", "X-Spam-Flag"]
    assert env.remove_header("X-Spam-Flag") == 1
    assert env.body == b"not a header\r\nX-Spam-Flag: body\r\n\r\nmore\r\n"
    assert env.remove_header("Received") == 1
    assert env.remove_header("X-Absent") == 0
    assert env.body == b"not a header\r\nX-Spam-Flag: body\r\n\r\nmore\r\n"


@pytest.mark.parametrize("threshold", [1 << 20, 0])  # in memory, and spooled to a file
def test_a_field_added_after_a_last_line_without_crlf_stands_on_its_own(threshold):
    # BDAT (RFC 3030) lets a message end inside its last header line.
    client = b"Subject: s\r\nX-Mailer: m 1.0"
    env = envelope(client, threshold)
    env.change_header("X-Spam-Flag", "YES")  # missing: added after the last field
    env.insert_header(99, "X-Milter", "added")  # past the end
    assert env.body == b"Subject: s\r\nX-Mailer: m 1.0\r\nX-Spam-Flag: YES\r\nX-Milter: added\r\n"
    assert env.headers()[-3:] == [
        ("X-Mailer", "m 1.0"),
        ("X-Spam-Flag", "YES"),
        ("X-Milter", "added"),
    ]
    folded = envelope(b"Subject: s\r\n\tfolded", threshold)
    folded.insert_header(99, "X-A", "1")
    assert folded.body == b"Subject: s\r\n\tfolded\r\nX-A: 1\r\n"
    # A new body gets its blank line: its first line is not a field.
    rebodied = envelope(client, threshold)
    rebodied.replace_body(b"New: body\r\n")
    assert rebodied.body == b"Subject: s\r\nX-Mailer: m 1.0\r\n\r\nNew: body\r\n"
    assert rebodied.headers()[-1] == ("X-Mailer", "m 1.0")
    # Nothing after it: the message is left as the client sent it.
    kept = envelope(client, threshold)
    kept.insert_header(0, "X-Top", "1")
    kept.change_header("Subject", "t")
    assert kept.body == b"Subject: t\r\nX-Mailer: m 1.0"


def test_a_header_line_longer_than_a_read_is_kept_whole():
    # Read in pieces, such a line once ended the header section at its
    # second piece, and a field added "after the last header" split it.
    long = b"X-Long: " + b"a" * 70000 + b"\r\n"
    env = envelope(long + b"X-B: 1\r\n\r\nBody\r\n", threshold=0)
    env.insert_header(99, "X-New", "1")
    assert env.body == long + b"X-B: 1\r\nX-New: 1\r\n\r\nBody\r\n"
    assert [name for name, _ in env.headers()] == ["Received", "X-Long", "X-B", "X-New"]


def test_bad_changes_are_refused_at_once():
    env = envelope()
    for call in (
        lambda: env.insert_header(-1, "X", "v"),
        lambda: env.insert_header(0, "Bad Name", "v"),
        lambda: env.change_header("X", "a\r\nB: smuggled"),
        lambda: env.change_header("X", "v", 0),
        lambda: env.add_recipient_address("not an address"),
        lambda: env.add_recipient_address("<>"),
        lambda: env.replace_body("a str"),
        lambda: env.replace_body(5),
        lambda: env.replace_body(io.StringIO("text mode")),
    ):
        with pytest.raises(ValueError):
            call()
    assert env.content.endswith(CLIENT)


def test_the_header_section_parsed_is_bounded():
    big = b"X-Long: " + b"a" * 900 + b"\r\n"
    env = envelope(big * (MAX_HEADER_SECTION // len(big) + 2) + b"\r\nbody\r\n", threshold=4096)
    env.change_header("X-Long", "short")
    with pytest.raises(ValueError, match="header section is over"):
        env.content  # noqa: B018 - the read applies the change


def test_recipients_and_sender_changes():
    env = Envelope("a@example.org")
    from bonzo.address import Address

    for rcpt in ("b@example.net", "c@example.net"):
        env.add_recipient(Address.parse(rcpt), {})
    added = env.add_recipient_address("archive@example.org", {"NOTIFY": "NEVER"})
    assert env.remove_recipient("b@EXAMPLE.NET") == 1  # the domain in canonical form
    assert env.remove_recipient("nobody@example.net") == 0
    env.change_sender("bounces@example.org")
    remaining = [r.original for r in env.remaining_recipients]
    assert remaining == ["c@example.net", "archive@example.org"]
    assert env.remaining_indexes == [1, 2]
    assert env.added == {2} and added.original == "archive@example.org"
    assert env.mail_from == "bounces@example.org"
    assert env.changes == []  # made outside any plugin's hook: not a plugin's change


def test_changes_are_recorded_with_the_plugin_and_logged(caplog):
    env = envelope()
    token = current_plugin.set("milter")
    try:
        env.add_header("X-Scanned", "yes")
        env.delete_header("X-Spam")
        env.replace_body(b"clean\r\n")
    finally:
        current_plugin.reset(token)
    with caplog.at_level(logging.INFO, "tornado.general"):
        env.add_header("X-Core", "not recorded")  # outside a hook
        token = current_plugin.set("av")
        env.add_recipient_address("x@example.org")
        current_plugin.reset(token)
    assert env.changes == [
        Change("milter", "add_header", "X-Scanned"),
        Change("milter", "delete_header", "X-Spam"),
        Change("milter", "replace_body", "7 octets"),
        Change("av", "add_recipient", "<x@example.org>"),
    ]
    assert "av add_recipient: <x@example.org>" in caplog.text


# -------------------------------------------------- through the dispatcher
class Owner:
    def __init__(self) -> None:
        self.delivered: list[tuple[str, list[str], bytes]] = []

    @hookimpl
    def bonzo_rcpt(self) -> Any:
        return Accept()

    @hookimpl
    def bonzo_deliver(self, envelope: Envelope) -> Any:
        self.delivered.append(
            (
                envelope.mail_from,
                [r.original for r in envelope.remaining_recipients],
                envelope.content,
            )
        )
        return Accept()


def run(filter_: Any, *, lmtp: bool = False, rcpts: tuple[str, ...] = ("b@example.net",)):
    plugins = PluginSet()
    plugins.register(filter_, "filter")
    owner = Owner()
    plugins.register(owner, "owner")
    tester = SessionTester(plugins, lmtp=lmtp)

    async def main() -> bytes:
        await tester.connect()
        script = b"LHLO c\r\n" if lmtp else b"EHLO c\r\n"
        script += b"MAIL FROM:<a@example.org>\r\n"
        script += b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
        return await tester.send(script + b"DATA\r\n" + CLIENT + b".\r\n")

    return asyncio.run(main()), owner


def test_a_filter_rewrites_the_message_and_delivery_sees_it(caplog):
    class Rewriter:
        @hookimpl
        def bonzo_message(self, envelope: Envelope) -> None:
            envelope.change_header("Subject", "[scanned] hi")
            envelope.delete_header("X-Spam")
            envelope.change_sender("srs=a@example.org")
            envelope.add_recipient_address("archive@example.org")

    with caplog.at_level(logging.INFO):
        replies, owner = run(Rewriter())
    assert replies.splitlines()[-1].startswith(b"250 2.0.0")
    [(sender, rcpts, content)] = owner.delivered
    assert sender == "srs=a@example.org"
    assert rcpts == ["b@example.net", "archive@example.org"]
    assert b"Subject: [scanned] hi\r\n" in content and b"X-Spam" not in content
    assert "filter change_header: Subject" in caplog.text


def test_a_field_a_filter_adds_to_a_bdat_message_ending_in_a_header_line():
    class Scanner:
        @hookimpl
        def bonzo_message(self, envelope: Envelope) -> None:
            envelope.change_header("X-Spam-Flag", "YES")

    plugins = PluginSet()
    plugins.register(Scanner(), "filter")
    owner = Owner()
    plugins.register(owner, "owner")
    tester = SessionTester(plugins, settings=SMTPSettings(hostname="bonzo.test", spool_threshold=1))
    message = b"Subject: s\r\nX-Mailer: m 1.0"

    async def main() -> bytes:
        await tester.connect()
        return await tester.send(
            b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
            b"BDAT %d LAST\r\n%s" % (len(message), message)
        )

    assert asyncio.run(main()).splitlines()[-1].startswith(b"250 2.0.0")
    [(_, _, content)] = owner.delivered
    assert content.endswith(b"\r\nSubject: s\r\nX-Mailer: m 1.0\r\nX-Spam-Flag: YES\r\n")


def test_lmtp_answers_only_the_clients_recipients():
    class Adder:
        @hookimpl
        def bonzo_message(self, envelope: Envelope) -> None:
            envelope.add_recipient_address("archive@example.org")

    replies, owner = run(Adder(), lmtp=True, rcpts=("b@example.net", "c@example.net"))
    finals = replies.split(b"354 ")[-1].splitlines()[1:]
    assert len(finals) == 2 and all(line.startswith(b"250") for line in finals)
    assert owner.delivered[0][1] == ["b@example.net", "c@example.net", "archive@example.org"]


def test_removing_every_recipient_delivers_nothing_and_answers_250(caplog):
    class Remover:
        @hookimpl
        def bonzo_message(self, envelope: Envelope) -> None:
            envelope.remove_recipient("b@example.net")

    with caplog.at_level(logging.INFO, "tornado.access"):
        replies, owner = run(Remover())
    assert replies.splitlines()[-1].startswith(b"250")
    assert owner.delivered == []
    assert "by=filter discarded" in caplog.text


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "change", "delete", "add"]),
            st.integers(0, 8),
            st.sampled_from(["Subject", "X-A", "From", "Received"]),
            st.text(alphabet="abc -", max_size=10),
        ),
        max_size=12,
    )
)
def test_any_edits_leave_a_well_formed_message_with_the_body_intact(ops):
    env = envelope()
    for op, n, name, value in ops:
        if op == "insert":
            env.insert_header(n, name, value)
        elif op == "change":
            env.change_header(name, value, n + 1)
        elif op == "delete":
            env.delete_header(name, n + 1)
        else:
            env.add_header(name, value)
    content = env.content
    head, sep, body = content.partition(b"\r\n\r\n")
    assert sep and body == b"Body\r\n"
    for line in head.split(b"\r\n"):
        assert line[:1] in (b" ", b"\t") or b":" in line
    assert len(env.headers()) == head.count(b"\r\n") + 1 - head.count(b"\r\n\t")

"""The message-change API of the envelope: header edits, a new body, the
sender and recipients changed — recorded with the plugin that made them,
applied once before delivery, bounded for any message."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import io
import itertools
import logging
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bonzo import Accept, hookimpl
from bonzo.client import CRLFLines
from bonzo.dsn import mail_dsn
from bonzo.hooks import PluginSet
from bonzo.session import (
    CHUNK_COST,
    MAX_HEADER_SECTION,
    Change,
    Envelope,
    HeaderSectionTooLarge,
    _Spool,
    current_plugin,
)
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


RECEIVED = [
    ("From", "a@example.org"),
    ("Subject", "hi"),
    ("X-Spam", "yes\r\n\tfolded"),
    ("To", "b@example.net"),
]


@pytest.mark.parametrize("threshold", [1 << 20, 16])
def test_received_headers_are_the_clients_before_any_change(threshold):
    env = envelope(threshold=threshold)
    assert env.received_headers() == RECEIVED  # nothing changed yet
    env.add_header("X-Added", "1")
    env.insert_header(4, "X-Among", "client")
    env.change_header("subject", "changed")
    env.delete_header("X-Spam")
    assert env.received_headers() == RECEIVED
    env.remove_header("To")
    env.replace_body(b"New\r\n")
    assert env.received_headers() == RECEIVED
    assert ("X-Among", "client") in env.headers() and ("To", "b@example.net") not in env.headers()
    other = envelope(threshold=threshold)
    other.remove_header("X-Spam")
    assert other.received_headers() == RECEIVED
    assert Envelope("a@example.org").received_headers() == []


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


def test_a_value_read_with_octets_that_are_not_utf8_can_be_written_back():
    """headers() escapes octets that are not UTF-8 (a raw Latin-1 subject);
    a value given back with them (a spam tag) is written with those octets
    as they were: their character set is unknown, so no encoded words."""
    env = envelope(b"Subject: caf\xe9 ol\xe9\r\n\r\nBody\r\n")
    (subject,) = [v for n, v in env.headers() if n == "Subject"]
    assert subject == "caf\udce9 ol\udce9"
    env.change_header("Subject", "[SPAM] " + subject)
    env.add_header("X-Seen", subject + " " + "word " * 250)  # folded, octets kept
    content = env.content
    assert b"Subject: [SPAM] caf\xe9 ol\xe9\r\n" in content
    assert b"X-Seen: caf\xe9 ol\xe9 word" in content
    assert all(len(line) <= 998 for line in content.split(b"\r\n"))
    with pytest.raises(ValueError):  # a lone surrogate that no octet stands for
        env.add_header("X-Bad", "\ud800")


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


def one_shot(data: bytes) -> bytes:
    """CRLF lines, the whole body at once: what a relay sends."""
    out = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


def no_bare_line_ends(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") == crlf == data.count(b"\n")


class Reads(io.RawIOBase):
    """A binary file whose reads return the given pieces, whatever size is asked."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


@pytest.mark.parametrize("threshold", [1 << 20, 16])
@pytest.mark.parametrize(
    ("pieces", "stored"),
    [
        # A milter's LF lines (a REPLBODY from Python or Perl): CRLF, as relayed.
        (
            [b"Hello,\n\nnew body\n--\nDisclaimer.\n"],
            b"Hello,\r\n\r\nnew body\r\n--\r\nDisclaimer.\r\n",
        ),
        ([b"one\ntwo\r\nthree\rnot an end\r\n"], b"one\r\ntwo\r\nthree\r\nnot an end\r\n"),
        # A CRLF split between reads stays one line end.
        ([b"a\r", b"\nb\r\n"], b"a\r\nb\r\n"),
        # A CR last in a read, then a line: a bare CR.
        ([b"a\r", b"b\r\n"], b"a\r\nb\r\n"),
        ([b"a\r", b"\r", b"\n"], b"a\r\n\r\n"),
        # A CR or no line end at all at the very end: the last line is ended.
        ([b"a\r\nb\r"], b"a\r\nb\r\n"),
        ([b"a\r\nb"], b"a\r\nb\r\n"),
        ([b"\n"], b"\r\n"),
        ([b""], b""),
    ],
)
def test_a_replacement_body_is_stored_with_crlf_lines(pieces, stored, threshold):
    whole = b"".join(pieces)
    env = envelope(threshold=threshold)
    env.replace_body(Reads(pieces))
    assert env.content.endswith(b"To: b@example.net\r\n\r\n" + stored)
    assert env.content.count(b"\r\n\r\n") == 1 + stored.count(b"\r\n\r\n")
    env.replace_body(whole)  # bytes: the same
    assert env.content.endswith(b"To: b@example.net\r\n\r\n" + stored)
    assert env.size == len(env.body)


def test_a_binarymime_replacement_body_is_kept_octet_for_octet():
    env = Envelope("a@example.org", mail_params={"BODY": "BINARYMIME"})
    OPEN.append(env)
    env.write(b"Subject: s\r\n\r\nx\r\n")
    env.replace_body(b"\x00bin\nary\r")
    assert env.body == b"Subject: s\r\n\r\n\x00bin\nary\r"


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=40).map(lambda b: bytes(b"a\r\n"[x % 3] for x in b)),
    st.lists(st.integers(0, 40), max_size=8),
)
def test_crlf_lines_do_not_depend_on_the_chunking(data, cuts):
    stream = CRLFLines()
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    out = b"".join(stream.feed(data[a:b]) for a, b in itertools.pairwise(bounds)) + stream.finish()
    assert no_bare_line_ends(out)
    assert out == one_shot(data)
    # The same through replace_body, given a file that reads in those pieces.
    env = envelope(threshold=16)
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    env.replace_body(Reads(pieces))
    assert env.content.partition(b"\r\n\r\n")[2] == out
    OPEN.remove(env)
    env.close()  # at once: one test, many examples


def test_replace_body_with_bytes_keeps_memory_bounded():
    """A body given as bytes was turned into CRLF lines in one piece, by a
    regular expression that made an object per line: a 16 MiB body of
    two-octet LF lines took some 1.4 GB. It goes in pieces now: the memory
    used past the body itself is a few pieces' worth."""
    import tracemalloc

    body = b"x\n" * (8 << 20)  # 16 MiB, 8 Mi lines
    env = envelope(threshold=1 << 16)
    tracemalloc.start()
    try:
        env.replace_body(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert 3 * (8 << 20) < env.size < 3 * (8 << 20) + 200  # the header section and CRLF lines
    OPEN.remove(env)
    env.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60).map(lambda b: bytes(b"a\r\n"[x % 3] for x in b)))
def test_crlf_lines_is_the_one_regular_expression(data):
    import re

    from bonzo.client import crlf_lines

    assert crlf_lines(data) == re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def test_a_message_without_a_header_section_or_blank_line():
    env = envelope(b"no header here\r\n")
    env.add_header("X-A", "1")
    env.insert_header(5, "X-B", "2")  # past the end: after the last header
    # The blank line goes in: the content is all body.
    assert (
        env.content == b"Received: from c by s; now\r\nX-A: 1\r\nX-B: 2\r\n\r\nno header here\r\n"
    )
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


def strict_header_names(content: bytes) -> list[str]:
    """The field names a reader that reads to the first blank line sees (an
    IMAP server, Sieve): every unfolded line with a colon is a field."""
    text = content.replace(b"\r\n", b"\n")
    head = b"" if text[:1] == b"\n" else text.split(b"\n\n", 1)[0]
    unfolded = head.replace(b"\n ", b" ").replace(b"\n\t", b"\t").split(b"\n")
    return [line.split(b":", 1)[0].strip().decode() for line in unfolded if b":" in line]


@pytest.mark.parametrize("threshold", [1 << 20, 0])  # in memory, and spooled to a file
def test_remove_header_stops_where_the_header_section_does(threshold):
    # A line that is no header ends the section (as for headers()): a
    # header-like line after it is body text, left alone -- and a blank
    # line goes before it, so that a reader that reads on to the first
    # blank line does not take it for a header that remove_header() left.
    sent = b"X-Spam-Flag: YES\r\nnot a header\r\nX-Spam-Flag: body\r\n\r\nmore\r\n"
    env = envelope(sent, threshold)
    assert env.body == sent  # nothing parsed yet: as sent
    assert [n for n, _ in env.headers()] == ["Received", "X-Spam-Flag"]
    assert env.remove_header("X-Spam-Flag") == 1
    assert env.body == b"\r\nnot a header\r\nX-Spam-Flag: body\r\n\r\nmore\r\n"
    assert env.remove_header("Received") == 1
    assert env.remove_header("X-Absent") == 0
    assert env.body == b"\r\nnot a header\r\nX-Spam-Flag: body\r\n\r\nmore\r\n"
    assert strict_header_names(env.content) == []


@pytest.mark.parametrize("threshold", [1 << 20, 0])
@pytest.mark.parametrize(
    "sent",
    [
        b"From: a@b.test\r\ngarbage\r\nX-Spam-Flag: YES\r\nSubject: s\r\n\r\nbody\r\n",
        b"garbage\r\nX-Spam-Flag: YES\r\n\r\nbody\r\n",
        b"From: a@b.test\r\ngarbage\r\n more garbage\r\nX-Spam-Flag: YES",  # no blank line
        b"From: a@b.test\r\n" + b"g" * 70000 + b"\r\nX-Spam-Flag : YES\r\n\r\nb\r\n",
    ],
    ids=["mid-section", "first-line", "no-blank-line", "long-line"],
)
def test_every_reader_ends_the_header_section_where_bonzo_does(sent, threshold):
    env = envelope(sent, threshold)
    names = [n for n, _ in env.headers()]
    assert "X-Spam-Flag" not in names
    content = env.content
    assert strict_header_names(content) == names
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(content)
    assert parsed.keys() == names and parsed.defects == []
    # Only a blank line was added, once, before the first line that is no field.
    cut = sent.index(b"garbage") if b"garbage" in sent else sent.index(b"g" * 10)
    assert env.body == sent[:cut] + b"\r\n" + sent[cut:]
    env.headers()
    env.remove_header("X-Spam-Flag")
    assert env.body == sent[:cut] + b"\r\n" + sent[cut:]


@pytest.mark.parametrize("threshold", [1 << 20, 0])
@pytest.mark.parametrize(
    "sent, cut",
    [
        (b"Subject: s\r\nno field follows\r\nbefore the blank line\r\n\r\nX-Spam: body\r\n", 12),
        (b"Subject: s\r\nno field follows\r\n\tfolded: not a field\r\n", 12),
        (b"Subject: s\nthe body, sent by a script\nsecond line\n", 11),
        (b"no header here\r\n", 0),
    ],
)
def test_a_section_without_its_blank_line_gets_one(sent, cut, threshold):
    # Even with no field after it: a DKIM verifier refuses a section that
    # ends without a blank line, so a signature made on Bonzo's split would
    # not verify elsewhere (and an IMAP server would show those lines as
    # headers).
    env = envelope(sent, threshold)
    env.headers()
    env.remove_header("X-Spam")
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(env.content)
    assert parsed.defects == []
    assert env.body == sent[:cut] + b"\r\n" + sent[cut:]
    env.message  # noqa: B018
    assert env.body == sent[:cut] + b"\r\n" + sent[cut:]  # once


@pytest.mark.parametrize("threshold", [1 << 20, 0])
@pytest.mark.parametrize(
    "sent",
    [
        b"Subject: s\r\n\r\nX-Spam: body\r\n",
        b"Subject: s\r\n\r\n",
        b"Subject: s\r\n",
        b"Subject: s",  # BDAT: may end inside its last header line
    ],
)
def test_a_message_with_its_blank_line_is_kept_as_sent(sent, threshold):
    env = envelope(sent, threshold)
    env.headers()
    env.remove_header("X-Spam")
    env.message  # noqa: B018
    assert env.body == sent


def test_content_starting_with_white_space_is_all_body():
    # Its first line would fold into the header above it (Bonzo's
    # Received:): a blank line goes between them, on the first octet alone.
    sent = b" (authenticated as ceo@example.com)\r\nX-Spam-Flag: YES\r\n\r\nbody\r\n"
    env = Envelope("a@example.org")
    OPEN.append(env)
    env.prepend_raw(b"Received: from c by s; now\r\n")
    env.write(b"")  # an empty first piece: the first octet decides
    env.write(sent[:1])
    env.write(sent[1:])
    assert env.content == b"Received: from c by s; now\r\n\r\n" + sent
    assert env.size == len(sent) + 2
    assert [n for n, _ in env.headers()] == ["Received"]
    assert env.remove_header("X-Spam-Flag") == 0
    assert strict_header_names(env.content) == ["Received"]
    assert envelope(b"\tx\r\n").body == b"\r\n\tx\r\n"
    assert envelope(b"x: \r\n y\r\n").body == b"x: \r\n y\r\n"


@pytest.mark.parametrize("threshold", [1 << 20, 0])
def test_a_folded_line_with_nothing_before_it_is_no_field(threshold):
    # write() never leaves such a first line (above); the parse does not
    # take one for a field either, in any method.
    env = envelope(b"", threshold)
    sent = b" X-Spam-Flag: YES\r\nSubject: s\r\n\r\nbody\r\n"
    env._spool = _Spool(threshold, None)
    env._spool.write(sent)
    env._size = len(sent)
    assert [n for n, _ in env.headers()] == ["Received"]
    assert env.remove_header("X-Spam-Flag") == 0
    assert env.body == b"\r\n" + sent  # a field follows: made plain to every reader


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


BIG = b"X-Long: " + b"a" * 900 + b"\r\n"
OVERSIZED = BIG * (MAX_HEADER_SECTION // len(BIG) + 2) + b"\r\nbody\r\n"


def test_the_header_section_parsed_is_bounded():
    env = envelope(OVERSIZED, threshold=4096)
    env.change_header("X-Long", "short")
    with pytest.raises(HeaderSectionTooLarge) as raised:
        env.content  # noqa: B018 - the read applies the change
    # A permanent refusal (a retry would fail the same way) naming the limit.
    error = raised.value
    assert (error.status_code, error.enhanced_code) == (552, "5.3.4")
    assert error.message == "Message header section too large"
    assert f"over {MAX_HEADER_SECTION} octets (MAX_HEADER_SECTION)" in str(error)
    # Every method that reads the headers says the same, each time.
    for read in (
        lambda e: e.headers(),
        lambda e: e.remove_header("X-Long"),
        lambda e: e.message,
    ):
        fresh = envelope(OVERSIZED, threshold=4096)
        for _ in range(2):
            with pytest.raises(HeaderSectionTooLarge):
                read(fresh)
    unread = envelope(OVERSIZED, threshold=4096)
    assert unread.body == OVERSIZED  # nobody parsed it: delivered as sent


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


@pytest.mark.parametrize(
    "params, error",
    [
        ({"RET": "BOGUS"}, "Bad RET parameter"),
        ({"ENVID": "a+zz"}, "Bad ENVID parameter: not xtext"),
        ({"ENVID": None}, "Bad ENVID parameter"),
    ],
)
def test_a_refused_change_of_sender_changes_nothing(params, error):
    """A milter's CHGFROM with a bad RET or ENVID was refused and logged as
    such, but the new sender and parameters were set already: the queue then
    bounced the message for its bad RET, to the new sender (or, for ``<>``,
    to nobody). Refused, the change now leaves the envelope as it was."""
    env = Envelope("alice@example.org", {"RET": "HDRS", "ENVID": "x1"})
    env.dsn = mail_dsn(env.mail_params)
    before = (env.mail_from, env.sender, dict(env.mail_params), env.dsn)
    for new in ("", "bounces@example.org"):
        with pytest.raises(ValueError, match=error):
            env.change_sender(new, params)
        assert (env.mail_from, env.sender, dict(env.mail_params), env.dsn) == before
    with pytest.raises(ValueError):
        env.change_sender("not an address", {"RET": "FULL"})
    assert (env.mail_from, env.sender, dict(env.mail_params), env.dsn) == before


def test_a_change_of_sender_keeps_the_content_parameters():
    """``BODY`` and ``SMTPUTF8`` describe the content: a new sender with
    parameters (a milter's CHGFROM) keeps them, or a message with UTF-8
    headers would go on to a server without SMTPUTF8."""
    env = Envelope("alice@example.org", {"SMTPUTF8": None, "BODY": "8BITMIME", "RET": "FULL"})
    env.change_sender("bob@example.org", {"ret": "HDRS", "ENVID": "e1", "BODY": "7BIT"})
    assert env.mail_params == {"RET": "HDRS", "ENVID": "e1", "SMTPUTF8": None, "BODY": "8BITMIME"}
    assert (env.dsn.ret, env.dsn.envid) == ("HDRS", "e1")
    env.change_sender("carol@example.org", {})
    assert env.mail_params == {"SMTPUTF8": None, "BODY": "8BITMIME"} and env.dsn.ret is None
    env.change_sender("dave@example.org")  # no parameters given: all kept
    assert env.mail_params == {"SMTPUTF8": None, "BODY": "8BITMIME"}


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


def run(
    filter_: Any,
    *,
    lmtp: bool = False,
    rcpts: tuple[str, ...] = ("b@example.net",),
    content: bytes = CLIENT,
):
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
        return await tester.send(script + b"DATA\r\n" + content + b".\r\n")

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


class Reader:
    @hookimpl
    def bonzo_message(self, envelope: Envelope) -> None:
        envelope.headers()


class Swallower:
    @hookimpl
    def bonzo_message(self, envelope: Envelope) -> None:
        try:
            envelope.remove_header("X-Long")
        except Exception:  # noqa: S110 - what a careless filter does
            pass


class Editor:
    @hookimpl
    def bonzo_message(self, envelope: Envelope) -> None:
        envelope.change_header("Subject", "edited")  # parsed when delivered


@pytest.mark.parametrize("lmtp", [False, True])
@pytest.mark.parametrize("filter_", [Reader(), Swallower(), Editor()], ids=type)
def test_a_header_section_too_large_to_parse_is_refused_for_good(filter_, lmtp, caplog):
    # Whoever parses the headers first (a filter, a careless one, or the
    # delivery that applies an edit): a permanent refusal, no traceback;
    # never 451 at every retry. (The log line: tests/plugins/test_authres.py.)
    rcpts = ("b@example.net", "c@example.net")
    with caplog.at_level(logging.INFO):
        replies, owner = run(filter_, content=OVERSIZED, lmtp=lmtp, rcpts=rcpts)
    finals = replies.splitlines()[-2 if lmtp else -1 :]
    assert finals == [b"552 5.3.4 Message header section too large"] * len(finals)
    assert owner.delivered == []
    assert "Uncaught exception" not in caplog.text
    assert not any(r.exc_info for r in caplog.records)


def test_a_header_section_too_large_to_parse_is_delivered_if_nobody_parses_it():
    class Nothing:
        @hookimpl
        def bonzo_message(self, envelope: Envelope) -> None:
            envelope.add_header("X-Added", "1")  # in front: no parse

    replies, owner = run(Nothing(), content=OVERSIZED)
    assert replies.splitlines()[-1].startswith(b"250 ")
    [(_, _, content)] = owner.delivered
    assert content.endswith(b"X-Added: 1\r\n" + OVERSIZED)


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


def test_content_sent_in_tiny_pieces_goes_to_the_file_by_what_it_holds_in_memory():
    """A message sent as BDAT chunks of two octets made one bytes object
    each, some 40 times the content in memory below spool_threshold (5 MB per
    connection for 240 KB of content): each piece counts its object's cost."""
    threshold = 64 * 1024
    spool = _Spool(threshold, None)
    try:
        pieces = 0
        while not spool.rolled:
            spool.write(b"ab")
            pieces += 1
            assert pieces <= threshold // 2
        # Rolled once the pieces took the threshold in memory, not their octets.
        assert pieces == threshold // (2 + CHUNK_COST) + 1
        assert spool.size == 2 * pieces
        spool.write(b"cd")
        assert spool.read_all() == b"ab" * pieces + b"cd"
    finally:
        spool.close()
    whole = _Spool(threshold, None)
    try:
        whole.write(b"x" * (threshold - CHUNK_COST))
        assert not whole.rolled  # one piece of the same size stays in memory
        assert whole.write(b"") == 0 and not whole.rolled
    finally:
        whole.close()

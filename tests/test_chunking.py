"""CHUNKING and BINARYMIME (RFC 3030) in the sans-IO core, byte for byte.

``BDAT <size> [LAST]`` is framed by its octet count: no dot-unstuffing, no
end marker, chunks split across reads and pipelined with commands. The
first chunk of a transaction is the same decision as DATA (a
:class:`~bonzo.protocol.Data` event with ``chunked``), the LAST one ends the
message with the same :class:`~bonzo.protocol.MessageComplete`; a refused
chunk is read and dropped before its reply, and ends its transaction.
"""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import pytest
from e2e_support import RawClient, fds_under
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_helpers import (
    DATA,
    EHLO,
    HELO,
    MAIL,
    RCPT,
    TXN,
    Client,
    all_splits,
    codes,
    default_decision,
    dot_stuff,
    feed,
    split_replies,
)

from bonzo.errors import SMTPError
from bonzo.hooks import PluginSet
from bonzo.hookspecs import Accept
from bonzo.protocol import SMALL_CHUNK, Data, DataChunk, Mail, MessageComplete, Rcpt, Unknown
from bonzo.session import Envelope
from bonzo.settings import SMTPSettings
from bonzo.testing import SessionTester

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# As in test_protocol_props.py: hypothesis imports libcst to report a
# failure, which warns on import; import it once, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # pragma: no cover - libcst not installed
        pass

OK = b"250 2.0.0 Ok\r\n"
NEED_MAIL = b"503 5.5.1 Error: need MAIL command\r\n"
NEED_RCPT = b"503 5.5.1 Error: need RCPT command\r\n"
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
BINARY = b"MAIL FROM:<alice@example.org> BODY=BINARYMIME\r\n"


def bdat(content: bytes, last: bool = False) -> bytes:
    """One BDAT command with its chunk."""
    return b"BDAT %d%s\r\n" % (len(content), b" LAST" if last else b"") + content


def chunks(content: bytes, sizes: list[int]) -> bytes:
    """``content`` as BDAT chunks of ``sizes`` (the rest in the LAST one)."""
    out, pos = [], 0
    for size in sizes:
        if pos + size >= len(content):
            break
        out.append(bdat(content[pos : pos + size]))
        pos += size
    out.append(bdat(content[pos:], last=True))
    return b"".join(out)


def opened(**settings) -> Client:
    """A client with EHLO, MAIL and RCPT accepted."""
    client = Client(**settings)
    assert codes(client.send(EHLO + TXN)) == [250, 250, 250]
    return client


def after_ehlo(**settings) -> Client:
    client = Client(**settings)
    client.send(EHLO)
    return client


# ------------------------------------------------------------------ EHLO
@pytest.mark.parametrize(
    "settings, chunking, binarymime",
    [
        ({}, True, True),
        ({"binarymime": False}, True, False),
        ({"chunking": False}, False, False),
        ({"chunking": False, "binarymime": True}, False, False),
    ],
)
def test_ehlo_offers_chunking_and_binarymime_as_set(settings, chunking, binarymime):
    replies, _ = feed(EHLO, **settings)
    assert (b"250-CHUNKING\r\n" in replies) is chunking
    assert (b"250-BINARYMIME\r\n" in replies) is binarymime


# ---------------------------------------------------------------- framing
def test_one_chunk_is_a_message():
    client = opened()
    replies = client.send(bdat(b"Subject: hi\r\n\r\nhello\r\n", last=True))
    assert replies == OK
    assert client.messages == [b"Subject: hi\r\n\r\nhello\r\n"]
    kinds = [type(e) for e in client.events]
    assert kinds[-2:] == [Data, MessageComplete]
    assert client.events[-2] == Data(chunked=True)
    assert client.message_errors == [None]
    assert not client.proto.in_transaction
    assert client.proto.messages == 1


def test_several_chunks_one_reply_each_and_one_decision():
    client = opened()
    replies = client.send(bdat(b"abc") + bdat(b"de") + bdat(b"", last=True))
    assert split_replies(replies) == [
        b"250 2.0.0 3 octets received\r\n",
        b"250 2.0.0 2 octets received\r\n",
        OK,
    ]
    assert client.messages == [b"abcde"]
    assert sum(isinstance(e, Data) for e in client.events) == 1
    assert sum(isinstance(e, MessageComplete) for e in client.events) == 1


def test_bdat_0_last_alone_is_an_empty_message():
    client = opened()
    assert client.send(b"BDAT 0 LAST\r\n") == OK
    assert client.messages == [b""]


@pytest.mark.parametrize("last", [b"LAST", b"last", b"Last", b" LAST ", b"LAST  "])
def test_last_in_any_case_and_spacing(last):
    client = opened()
    assert client.send(b"BDAT 2 " + last + b"\r\nhi") == OK
    assert client.messages == [b"hi"]


def test_content_is_neither_unstuffed_nor_ended_by_a_dot():
    content = b"..leading\r\n.\r\nQUIT\r\nMAIL FROM:<evil@example.org>\r\n.\r\n"
    client = opened()
    replies = client.send(bdat(content, last=True) + b"NOOP\r\n")
    assert split_replies(replies) == [OK, OK]
    assert client.messages == [content]
    assert not client.closed
    assert sum(isinstance(e, Mail) for e in client.events) == 1


def test_pipelined_chunks_and_commands_in_one_read():
    stream = EHLO + TXN + bdat(b"one\r\n") + bdat(b"two\r\n", last=True) + MAIL + RCPT
    stream += bdat(b"three\r\n", last=True) + b"QUIT\r\n"
    replies, client = feed(stream)
    assert codes(replies) == [250, 250, 250, 250, 250, 250, 250, 250, 221]
    assert client.messages == [b"one\r\ntwo\r\n", b"three\r\n"]
    assert client.closed


def test_every_split_of_a_chunked_session_gives_the_same_result():
    stream = EHLO + TXN + bdat(b"a\r\nb") + bdat(b"\r\n.\r\n", last=True) + b"NOOP\r\n"
    whole, ref = feed(stream)
    assert ref.messages == [b"a\r\nb\r\n.\r\n"]
    for a, b in all_splits(stream):
        replies, client = feed(a, b)
        assert replies == whole
        assert client.messages == ref.messages


def test_content_arrives_as_it_is_read_and_memory_stays_bounded():
    """A 10 MB chunk fed in 64 KiB reads: each read's octets are handed
    over at once, nothing accumulates in the core."""
    client = opened()
    size = 10 * 1024 * 1024
    client.send(b"BDAT %d LAST\r\n" % size)
    piece = (b"x" * 998 + b"\r\n") * 64
    sent = 0
    while sent < size:
        chunk = piece[: size - sent]
        client.proto.receive_data(chunk)
        client.drain()
        sent += len(chunk)
        assert client.proto.buffered == 0
        assert client.proto.receiving_content or sent == size
    assert client.proto.data_to_send() == OK
    (message,) = client.messages
    assert len(message) == size
    assert client.chunks >= size // len(piece)


def test_receiving_content_between_chunks_and_not_after_the_last():
    client = opened()
    assert not client.proto.receiving_content
    client.send(b"BDAT 4\r\nab")
    assert client.proto.receiving_content and client.proto.in_data
    client.send(b"cd")
    # Between chunks: the message is on its way (DATA timeouts, shutdown waits).
    assert client.proto.receiving_content and not client.proto.in_data
    assert not client.proto.partial_line
    client.send(b"BDAT 0 LAST\r\n")
    assert not client.proto.receiving_content
    assert client.messages == [b"abcd"]


# ------------------------------------------------------------- sequencing
def test_bdat_without_mail_reads_the_chunk_then_503():
    chunk = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<x@example.net>\r\n"
    client = after_ehlo()
    replies = client.send(bdat(chunk, last=True)[:20], bdat(chunk, last=True)[20:] + b"NOOP\r\n")
    assert split_replies(replies) == [NEED_MAIL, OK]
    assert not any(isinstance(e, (Mail, Rcpt, Data)) for e in client.events)
    assert client.refusals[-1] == ("BDAT", 503, "5.5.1", "core", None)


def test_bdat_without_rcpt_ends_the_transaction():
    client = after_ehlo()
    replies = client.send(MAIL + bdat(b"x\r\n") + bdat(b"y\r\n", last=True))
    assert split_replies(replies) == [b"250 2.1.0 Ok\r\n", NEED_RCPT, NEED_MAIL]
    assert not client.proto.in_transaction
    assert client.messages == [b""] and client.message_errors[0].status_code == 503


@pytest.mark.parametrize("arg", [b"3 FOO", b"3 LAST X", b"3 LASTX", b"3 LAST=1"])
def test_bad_bdat_arguments_get_501_after_the_chunk(arg):
    client = after_ehlo()
    assert client.send(b"BDAT " + arg + b"\r\nabcNOOP\r\n") == (
        b"501 5.5.4 Syntax: BDAT count [LAST]\r\n" + OK
    )
    client = opened()
    replies = client.send(b"BDAT " + arg + b"\r\nabc" + bdat(b"z", last=True))
    assert split_replies(replies) == [b"501 5.5.4 Syntax: BDAT count [LAST]\r\n", NEED_MAIL]
    assert client.proto.messages == 0


@pytest.mark.parametrize("arg", [b"", b"x", b"-1", b"+3", b"1e3", b"9" * 21, b" LAST"])
def test_bdat_without_a_usable_size_closes(arg):
    replies, client = feed(EHLO + TXN + b"BDAT " + arg + b"\r\nNOOP\r\n")
    assert replies.endswith(b"421 4.7.0 Bad BDAT command, closing connection\r\n")
    assert client.closed


SMUGGLED = (
    b"RSET\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
)


@pytest.mark.parametrize(
    ("line", "settings"),
    [
        (b"BDAT %d\tLAST", {}),  # a control character
        (b"BDAT %d\x0bLAST", {}),
        (b"bdat %d LAST\x00", {}),
        (b"BDAT %d LAST\rX", {}),  # a bare CR inside the line
        (b"BDAT %d" + b" " * 600 + b"LAST", {}),  # over the line limit, seen whole
        (b"BDAT %d LAST \xff\xfe", {}),  # not UTF-8
        (b"BDAT %d LAST\n", {"bare_newline": "reject"}),  # ends in a bare LF
        (b"BDAT\t%d LAST", {}),
        # The core takes the verb after spaces: so does this check.
        (b" BDAT %d \xff", {}),
        (b"  bdat %d\x01", {}),
        (b" BDAT %d" + b" " * 600 + b"LAST", {}),
        (b"\tBDAT %d LAST", {}),
        # A Unicode space or a sign after the verb: a front end splitting on
        # any space reads "BDAT <size>", so this one closes too.
        ("BDAT\u00a0%d LAST".encode(), {}),
        ("BDAT\u3000%d LAST".encode(), {}),
        ("bdat\u2003%d".encode(), {}),
        (b"BDAT:%d LAST", {}),
    ],
)
@pytest.mark.parametrize("chunking", [True, False])
def test_a_bdat_line_refused_before_its_size_closes_and_never_runs_its_chunk(
    line, settings, chunking
):
    """The chunk of a BDAT line that fails the generic line checks cannot be
    skipped (its size was not read): run as commands, it would be a second
    envelope past every filter. The session closes instead."""
    command = line % len(SMUGGLED)
    if not command.endswith(b"\n"):
        command += b"\r\n"
    client = opened(chunking=chunking, **settings)
    replies = client.send(command + SMUGGLED)
    assert split_replies(replies) == [b"421 4.7.0 Bad BDAT command, closing connection\r\n"]
    assert client.closed
    assert client.messages == []


@PROPS
@given(
    lead=st.text(alphabet=" \t", max_size=3),
    verb=st.sampled_from(["BDAT", "bdat", "Bdat", "bDaT"]),
    size=st.integers(0, 200),
    last=st.booleans(),
    corruption=st.sampled_from(["\x00", "\x01", "\x0b", "\rX", "\x7f", "\xff\xfe", "pad"]),
    where=st.sampled_from(["end", "after verb", "after size"]),
    chunking=st.booleans(),
    pieces=st.lists(st.integers(1, 50), max_size=4),
)
def test_no_refused_bdat_line_runs_its_chunk_as_commands(
    lead, verb, size, last, corruption, where, chunking, pieces
):
    """Property: a line the core would take as BDAT, spoiled so that the
    generic line checks refuse it, always closes the session (421), however
    it is spelled and split; nothing after it is ever run."""
    tail = " LAST" if last else ""
    bad = "x" * 600 if corruption == "pad" else corruption
    parts = {"after verb": (f"{lead}{verb}{bad} {size}{tail}"),
             "after size": (f"{lead}{verb} {size}{bad}{tail}"),
             "end": (f"{lead}{verb} {size}{tail}{bad}")}  # fmt: skip
    if corruption == "pad":
        parts = {k: f"{lead}{verb} {size}{tail}" + " " * 600 for k in parts}
    line = parts[where].encode("latin-1") + b"\r\n"
    chunk = (b"RSET\r\nMAIL FROM:<e@example.net>\r\nRCPT TO:<v@example.org>\r\n" * 10)[:size]
    data = line + chunk + b"NOOP\r\nQUIT\r\n"
    client = opened(chunking=chunking)
    cuts, pos, chunks = sorted(set(pieces)), 0, []
    for cut in cuts:
        if cut < len(data):
            chunks.append(data[pos:cut])
            pos = cut
    chunks.append(data[pos:])
    events = len(client.events)
    replies = client.send(*chunks)
    assert split_replies(replies) == [b"421 4.7.0 Bad BDAT command, closing connection\r\n"]
    assert client.closed and client.messages == [] and len(client.events) == events


def test_an_overlong_bdat_line_discarded_while_arriving_closes_too():
    client = opened()
    # Arrives in pieces, so the core drops it before its end is seen.
    replies = client.send(b"BDAT 108" + b" " * 3000, b" " * 3000 + b"LAST\r\n", SMUGGLED)
    assert split_replies(replies) == [b"421 4.7.0 Bad BDAT command, closing connection\r\n"]
    assert client.closed and client.messages == []
    # However the line arrives: blanks first, the verb in pieces, at the end.
    for pieces in (
        [b" " * 700 + b"BDAT 108" + b" " * 3000, b"LAST\r\n"],
        [b" " * 700, b" " * 5000, b"BD", b"AT 108", b" " * 600, b"\r\n"],
        [b"\t" * 600, b"bdat 108\r\n"],
        [b" " * 6000 + b"BDAT 108\r\n"],
    ):
        client = opened()
        replies = client.send(*pieces, SMUGGLED)
        assert split_replies(replies) == [b"421 4.7.0 Bad BDAT command, closing connection\r\n"], (
            pieces
        )
        assert client.closed and client.messages == []
    # A long line that is not BDAT is still just refused.
    client = opened()
    replies = client.send(b"NOOP" + b" " * 3000, b" " * 3000 + b"\r\n", b"NOOP\r\n")
    assert split_replies(replies) == [b"500 5.5.2 Line too long\r\n", OK]


def test_data_after_bdat_is_refused_and_the_chunks_are_kept():
    client = opened()
    replies = client.send(bdat(b"ab") + DATA + bdat(b"cd", last=True))
    assert split_replies(replies) == [
        b"250 2.0.0 2 octets received\r\n",
        b"503 5.5.1 Error: DATA after BDAT\r\n",
        OK,
    ]
    assert client.messages == [b"abcd"]


def test_bdat_after_data_is_content():
    client = opened()
    replies = client.send(DATA + b"BDAT 3 LAST\r\nabc\r\n.\r\n")
    assert codes(replies) == [354, 250]
    assert client.messages == [b"BDAT 3 LAST\r\nabc\r\n"]


def test_bdat_after_last_needs_a_new_transaction():
    client = opened()
    replies = client.send(bdat(b"a", last=True) + bdat(b"b", last=True))
    assert split_replies(replies) == [OK, NEED_MAIL]
    assert client.messages == [b"a"]


def test_rset_between_chunks_discards_the_transaction():
    client = opened()
    replies = client.send(bdat(b"abc") + b"RSET\r\n" + bdat(b"def", last=True))
    assert split_replies(replies) == [b"250 2.0.0 3 octets received\r\n", OK, NEED_MAIL]
    assert client.messages == []
    assert not client.proto.receiving_content
    # A new transaction starts afresh: DATA is allowed again.
    replies = client.send(TXN + DATA + b"x\r\n.\r\n")
    assert codes(replies) == [250, 250, 354, 250]
    assert client.messages == [b"x\r\n"]


@pytest.mark.parametrize(
    "command, reply",
    [(EHLO, NEED_MAIL), (HELO, b"502 5.5.1 Error: CHUNKING not supported\r\n")],
)
def test_a_new_greeting_between_chunks_resets_too(command, reply):
    client = opened()
    client.send(bdat(b"abc") + command)
    assert not client.proto.in_transaction and not client.proto.receiving_content
    assert split_replies(client.send(bdat(b"d", last=True))) == [reply]


def test_helo_session_gets_no_chunking():
    client = Client()
    client.send(HELO + TXN)
    replies = client.send(bdat(b"RSET\r\n", last=True) + b"NOOP\r\n")
    assert replies == b"502 5.5.1 Error: CHUNKING not supported\r\n" + OK
    assert client.proto.in_transaction


def test_chunking_off_refuses_at_once_and_drops_the_octets():
    client = opened(chunking=False)
    replies = client.send(bdat(b"RSET\r\n", last=True) + b"NOOP\r\n")
    assert replies == b"502 5.5.1 Error: CHUNKING not supported\r\n" + OK
    assert client.proto.in_transaction  # the RSET was content, never run


def test_bdat_0_over_and_over_is_junk():
    client = opened(max_junk_commands=3)
    replies = client.send(b"BDAT 0\r\n" * 5)
    assert split_replies(replies) == [b"250 2.0.0 0 octets received\r\n"] * 3 + [
        b"421 4.7.0 Too many commands without mail, closing connection\r\n"
    ]
    assert client.closed


def test_tiny_chunks_count_as_junk_commands():
    # Each BDAT costs the server far more than its few octets cost the
    # client: a message in thousands of one-octet chunks must not pin a core.
    client = opened(max_junk_commands=3)
    replies = client.send(bdat(b"x") * 5)
    assert split_replies(replies) == [b"250 2.0.0 1 octets received\r\n"] * 3 + [
        b"421 4.7.0 Too many commands without mail, closing connection\r\n"
    ]
    assert client.closed and not client.messages


def test_chunks_of_a_client_buffer_size_and_a_few_small_ones_are_fine():
    # The count starts again with every accepted message, and a chunk of
    # SMALL_CHUNK octets or more, or the LAST one, is never junk.
    client = opened(max_junk_commands=3)
    big = b"y" * SMALL_CHUNK
    for _ in range(3):
        message = bdat(b"a") * 3 + bdat(big) * 10 + bdat(b"z", last=True)
        assert split_replies(client.send(message))[-1] == OK
        client.send(TXN)
    assert not client.closed
    assert client.messages == [b"aaa" + big * 10 + b"z"] * 3


def test_replies_to_many_pipelined_chunks_respect_the_backlog():
    client = opened(max_write_backlog=4096, max_junk_commands=10_000)
    replies = client.send(bdat(b"x") * 2000 + bdat(b"", last=True))
    assert client.paused > 0
    assert split_replies(replies) == [b"250 2.0.0 1 octets received\r\n"] * 2000 + [OK]
    assert client.messages == [b"x" * 2000]


# ------------------------------------------------------------- size limit
def test_a_chunk_that_would_pass_the_size_limit_is_read_dropped_and_refused():
    client = opened(max_message_size=10)
    replies = client.send(
        bdat(b"abcdef") + bdat(b"RSET\r\nNOOP\r\n") + bdat(b"xyz", last=True) + b"NOOP\r\n"
    )
    assert split_replies(replies) == [b"250 2.0.0 6 octets received\r\n", TOO_BIG, NEED_MAIL, OK]
    assert client.proto.messages == 0
    assert not client.proto.in_transaction
    assert client.message_errors[0].status_code == 552
    assert client.refusals[0][:3] == ("BDAT", 552, "5.3.4")


def test_the_size_limit_counts_every_chunk_exactly():
    client = opened(max_message_size=10)
    replies = client.send(bdat(b"abcde") + bdat(b"fghij", last=True))
    assert split_replies(replies) == [b"250 2.0.0 5 octets received\r\n", OK]
    assert client.messages == [b"abcdefghij"]


def test_a_huge_first_chunk_is_refused_without_asking_and_without_keeping_it():
    client = opened(max_message_size=1000)
    replies = client.send(b"BDAT 5000 LAST\r\n")
    for _ in range(5):
        replies += client.send(b"y" * 1000)
        assert client.proto.buffered == 0
    assert replies == TOO_BIG
    assert not any(isinstance(e, Data) for e in client.events)
    assert client.messages == [b""]


# ---------------------------------------------------------- content rules
@pytest.mark.parametrize(
    "pieces, stored",
    [
        ([b"a\nb\rc\r\n"], b"a\r\nb\r\nc\r\n"),
        ([b"a\r", b"\nb"], b"a\r\nb"),  # CRLF split between two chunks
        ([b"a\r"], b"a\r\n"),  # a CR last in the message is bare
        ([b"a\r", b""], b"a\r\n"),
        ([b"a", b"\n"], b"a\r\n"),
        ([b"\r\r\n"], b"\r\n\r\n"),
    ],
)
def test_bare_line_ends_are_normalized_across_chunks(pieces, stored):
    client = opened()
    stream = b"".join(bdat(p) for p in pieces[:-1]) + bdat(pieces[-1], last=True)
    assert split_replies(client.send(stream))[-1] == OK
    assert client.messages == [stored]
    for a, b in all_splits(stream):
        split = opened()
        split.send(a, b)
        assert split.messages == [stored]


def test_bare_lf_in_reject_mode_refuses_the_chunk_where_it_is_found():
    client = opened(bare_newline="reject")
    replies = client.send(bdat(b"ok\r\n") + bdat(b"bad\n") + bdat(b"more\r\n", last=True))
    assert split_replies(replies) == [
        b"250 2.0.0 4 octets received\r\n",
        b"550 5.5.2 Bare LF or CR in message content\r\n",
        NEED_MAIL,
    ]
    assert client.proto.messages == 0
    assert client.refusals[0][:3] == ("message", 550, "5.5.2")


def test_a_cr_then_lf_across_chunks_is_not_bare_in_reject_mode():
    client = opened(bare_newline="reject")
    assert split_replies(client.send(bdat(b"a\r") + bdat(b"\n", last=True)))[-1] == OK
    assert client.messages == [b"a\r\n"]


def test_allow_mode_keeps_bare_line_ends():
    client = opened(bare_newline="allow")
    client.send(bdat(b"a\nb\rc", last=True))
    assert client.messages == [b"a\nb\rc"]


def test_a_long_line_across_chunks_is_refused_at_the_chunk_that_shows_it():
    client = opened(max_data_line=1000)
    replies = client.send(bdat(b"x" * 600) + bdat(b"x" * 500) + bdat(b"\r\n", last=True))
    assert split_replies(replies) == [
        b"250 2.0.0 600 octets received\r\n",
        b"500 5.5.2 Line too long\r\n",
        NEED_MAIL,
    ]


def test_a_line_of_exactly_max_data_line_is_fine():
    client = opened(max_data_line=1000)
    line = b"x" * 998 + b"\r\n"
    client.send(bdat(line[:500]) + bdat(line[500:] + line, last=True))
    assert client.messages == [line * 2]


def test_a_long_line_outranks_a_bare_lf_whatever_the_reads():
    stream = bdat(b"x" * 1200 + b"\n" + b"y" * 10, last=True)
    replies, _ = feed(EHLO + TXN + stream, bare_newline="reject", max_data_line=1000)
    assert split_replies(replies)[-1] == b"500 5.5.2 Line too long\r\n"
    for a, b in all_splits(stream):
        client = opened(bare_newline="reject", max_data_line=1000)
        assert split_replies(client.send(a, b))[-1] == b"500 5.5.2 Line too long\r\n"


# -------------------------------------------------------------- BINARYMIME
def test_binarymime_content_is_kept_octet_for_octet():
    content = b"\x00\xff\r\rx\n\n" + b"z" * 20000 + b"\r\n.\r\n"
    client = Client()
    client.send(EHLO + BINARY + RCPT)
    replies = client.send(chunks(content, [7, 3000]))
    assert split_replies(replies)[-1] == OK
    assert client.messages == [content]


@pytest.mark.parametrize(
    "settings",
    [{"chunking": False}, {"binarymime": False}, {"chunking": False, "binarymime": True}],
)
def test_binarymime_is_refused_when_not_offered(settings):
    client = after_ehlo(**settings)
    assert client.send(BINARY) == b"501 5.5.4 Bad BODY parameter\r\n"


def test_data_is_refused_for_a_binarymime_message():
    client = Client()
    replies = client.send(EHLO + BINARY + RCPT + DATA + bdat(b"ok", last=True))
    assert split_replies(replies)[-2:] == [b"503 5.5.1 Error: BODY=BINARYMIME needs BDAT\r\n", OK]
    assert client.messages == [b"ok"]


def test_binarymime_ends_with_its_transaction():
    client = Client(bare_newline="reject")
    client.send(EHLO + BINARY + RCPT + bdat(b"a\nb", last=True) + TXN)
    replies = client.send(bdat(b"a\nb", last=True))
    assert replies == b"550 5.5.2 Bare LF or CR in message content\r\n"
    assert client.messages == [b"a\nb", b""]


# ------------------------------------------------------------ decisions
def refuse_bdat(error: SMTPError):
    def decide(proto, event):
        if isinstance(event, Data):
            return error
        return default_decision(proto, event)

    return decide


def test_a_refused_first_chunk_is_read_before_the_refusal_and_ends_the_transaction():
    error = SMTPError(554, "No thanks", enhanced_code="5.7.1")
    client = opened(decide=refuse_bdat(error))
    replies = client.send(bdat(b"RSET\r\n") + bdat(b"NOOP\r\n", last=True) + b"NOOP\r\n")
    assert split_replies(replies) == [b"554 5.7.1 No thanks\r\n", NEED_MAIL, OK]
    assert not client.proto.in_transaction
    assert not any(isinstance(e, MessageComplete) for e in client.events)
    assert client.refusals[0] == ("BDAT", 554, "5.7.1", "core", None)


def test_a_refusal_that_closes_does_not_wait_for_the_chunk():
    client = opened(decide=refuse_bdat(SMTPError(421, "Busy", enhanced_code="4.3.2")))
    assert client.send(b"BDAT 100000\r\n") == b"421 4.3.2 Busy\r\n"
    assert client.closed


def test_the_message_decision_comes_after_the_last_chunk():
    def decide(proto, event):
        if isinstance(event, MessageComplete):
            return SMTPError(550, "Spam", enhanced_code="5.7.1")
        return default_decision(proto, event)

    client = opened(decide=decide)
    replies = client.send(bdat(b"a") + bdat(b"b", last=True) + TXN)
    assert split_replies(replies) == [
        b"250 2.0.0 1 octets received\r\n",
        b"550 5.7.1 Spam\r\n",
        b"250 2.1.0 Ok\r\n",
        b"250 2.1.5 Ok\r\n",
    ]


def test_unknown_verb_after_chunks_still_reaches_the_plugins():
    client = opened()
    client.send(bdat(b"a") + b"XFOO bar\r\n")
    assert isinstance(client.events[-1], Unknown)
    assert client.proto.receiving_content  # the message is still on its way


# ---------------------------------------------------------------- properties
content_bytes = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"x", b"\x00", b"\xff", b"abc", b"\r\n.\r\n"]),
    max_size=60,
).map(b"".join)
sizes = st.lists(st.integers(min_value=0, max_value=20), max_size=8)
points = st.lists(st.integers(min_value=0), max_size=10)
MODES = st.sampled_from(["normalize", "reject", "allow"])


def _cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    marks = sorted({c % (len(stream) + 1) for c in cuts})
    pieces, start = [], 0
    for mark in marks:
        pieces.append(stream[start:mark])
        start = mark
    pieces.append(stream[start:])
    return pieces


def _result(client: Client) -> tuple:
    # The content of a refused message is dropped: how much of it was handed
    # over before the refusal depends on the reads, and does not matter.
    errors = [None if e is None else e.status_code for e in client.message_errors]
    return (
        [m for m, e in zip(client.messages, errors, strict=True) if e is None],
        errors,
        client.proto.messages,
        client.closed,
    )


@PROPS
@given(content=content_bytes, chunk_sizes=sizes, cuts=points, mode=MODES, binary=st.booleans())
def test_any_split_of_a_bdat_stream_gives_the_same_message(
    content, chunk_sizes, cuts, mode, binary
):
    mail = BINARY if binary else MAIL
    stream = EHLO + mail + RCPT + chunks(content, chunk_sizes) + b"NOOP\r\n"
    whole, ref = feed(stream, bare_newline=mode, max_data_line=1000)
    cut, client = feed(*_cut(stream, cuts), bare_newline=mode, max_data_line=1000)
    assert cut == whole
    assert _result(client) == _result(ref)
    bytewise, client = feed(
        *[stream[i : i + 1] for i in range(len(stream))], bare_newline=mode, max_data_line=1000
    )
    assert bytewise == whole
    assert _result(client) == _result(ref)
    if binary:
        assert ref.messages == [content]


text_lines = st.lists(
    st.one_of(
        st.sampled_from([b"", b".", b"..", b".x", b"From x", b"x" * 999, b"y" * 1001]),
        st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ),
    max_size=30,
)


@PROPS
@given(lines=text_lines, chunk_sizes=st.lists(st.integers(0, 700), max_size=8), mode=MODES)
def test_any_chunking_of_a_message_gives_what_data_gives(lines, chunk_sizes, mode):
    """Text in canonical form (CRLF lines, RFC 3030 2) sent by BDAT in any
    chunks and by DATA (dot-stuffed) is stored the same, or refused the
    same (long lines), in every bare_newline mode."""
    content = b"".join(line + b"\r\n" for line in lines)
    settings = {"bare_newline": mode, "max_data_line": 1000}
    _, data_client = feed(EHLO + TXN + DATA + dot_stuff(content) + b".\r\n", **settings)
    _, bdat_client = feed(EHLO + TXN + chunks(content, chunk_sizes), **settings)
    data_errors = [e and e.status_code for e in data_client.message_errors]
    bdat_errors = [e and e.status_code for e in bdat_client.message_errors]
    assert bdat_errors == data_errors
    if data_errors == [None]:
        assert bdat_client.messages == data_client.messages


@PROPS
@given(data=st.binary(max_size=300), cuts=points)
def test_arbitrary_bytes_in_chunks_never_raise(data, cuts):
    stream = EHLO + TXN + b"BDAT %d\r\n" % (len(data) // 2) + data
    whole, ref = feed(stream)
    cut, client = feed(*_cut(stream, cuts))
    assert cut == whole
    assert _result(client) == _result(ref)
    assert not any(isinstance(e, DataChunk) for e in client.events)


# ---------------------------------------------------------- end to end
# A real server on 127.0.0.1 (tests/e2e_support.py) and a raw socket client:
# neither smtplib nor aiosmtplib speaks BDAT.
pytest_e2e = pytest.mark.timeout(60)
TXN_LINES = b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\n"


def ehlo_keywords(client: RawClient) -> list[bytes]:
    reply = client.greet()
    return [line[4:] for line in reply.split(b"\r\n")[1:-1]]


@pytest_e2e
def test_e2e_pipelined_bdat_messages(start_server):
    server = start_server()
    with RawClient(server.port) as client:
        keywords = ehlo_keywords(client)
        assert b"CHUNKING" in keywords and b"BINARYMIME" in keywords
        first = b"Subject: one\r\n\r\n.leading dot\r\n.\r\nstill content\r\n"
        # Two messages, every command and chunk in one write.
        client.send(
            TXN_LINES
            + bdat(first[:10])
            + bdat(first[10:], last=True)
            + TXN_LINES
            + bdat(b"", last=True)
            + b"QUIT\r\n"
        )
        replies = client.replies(8)
        assert client.read_to_eof() == b""
    assert [r[:3] for r in replies] == [b"250"] * 7 + [b"221"]
    assert replies[2] == b"250 2.0.0 10 octets received\r\n"
    assert replies[3].startswith(b"250 2.0.0 Ok: queued as ")
    one, two = server.plugin.messages
    assert one.body == first and two.body == b""
    # The same message path as DATA: the trace header is there.
    assert one.header_bytes.startswith(b"Received: from client.test ([127.0.0.1])\r\n")
    assert b"with ESMTP id " in one.header_bytes
    assert one.rcpt_tos == ["bob@example.com"]


@pytest_e2e
@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "lockstep"])
def test_e2e_a_10_mb_message_in_chunks(start_server, pipelined):
    import hashlib

    server = start_server()
    line = b"0123456789" * 99 + b"\r\n"  # 992 octets
    body = line * (10 * 1024 * 1024 // len(line))
    size = 1024 * 1024
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    with RawClient(server.port, timeout=30) as client:
        client.greet()
        client.send(TXN_LINES)
        assert [r[:3] for r in client.replies(2)] == [b"250", b"250"]
        if pipelined:
            client.send(b"".join(bdat(p) for p in pieces[:-1]) + bdat(pieces[-1], last=True))
            replies = client.replies(len(pieces), timeout=30)
        else:
            replies = []
            for n, piece in enumerate(pieces):
                client.send(bdat(piece, last=n == len(pieces) - 1))
                replies.append(client.reply(timeout=30))
    assert replies[:-1] == [b"250 2.0.0 %d octets received\r\n" % size] * (len(pieces) - 1)
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
    (message,) = server.plugin.messages
    assert message.size == len(body)
    assert message.spooled  # past spool_threshold: on disk, not in memory
    assert message.digest == hashlib.sha256(body).hexdigest()


@pytest_e2e
def test_e2e_binarymime_is_stored_octet_for_octet(start_server):
    server = start_server()
    content = bytes(range(256)) * 40 + b"\n.\r\n\r\r\n"
    with RawClient(server.port) as client:
        client.greet()
        client.send(
            b"MAIL FROM:<alice@example.com> BODY=BINARYMIME\r\nRCPT TO:<bob@example.com>\r\n"
            + b"DATA\r\n"
            + bdat(content[:1000])
            + bdat(content[1000:], last=True)
        )
        replies = client.replies(5)
    assert replies[2] == b"503 5.5.1 Error: BODY=BINARYMIME needs BDAT\r\n"
    assert replies[4].startswith(b"250 2.0.0 Ok: queued as ")
    (message,) = server.plugin.messages
    assert message.body == content
    assert message.mail_params == {"BODY": "BINARYMIME"}


@pytest_e2e
def test_e2e_refused_chunks_keep_the_session_in_step(start_server):
    server = start_server(max_message_size=1000)
    with RawClient(server.port) as client:
        client.greet()
        smuggled = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<x@example.com>\r\n" * 50
        client.send(TXN_LINES + bdat(smuggled) + bdat(b"tail", last=True) + b"NOOP\r\n")
        replies = client.replies(5)
        assert replies[2:] == [TOO_BIG, NEED_MAIL, OK]
        assert client.command("RSET") == OK
    assert server.plugin.messages == []
    assert server.plugin.senders == ["alice@example.com"]


@pytest_e2e
def test_e2e_a_message_between_chunks_finishes_during_a_shutdown(start_server):
    server = start_server()
    with RawClient(server.port) as client:
        client.greet()
        client.send(TXN_LINES + bdat(b"Subject: late\r\n"))
        assert [r[:3] for r in client.replies(3)] == [b"250"] * 3

        async def shutdown() -> None:
            await server.server.shutdown(5.0)

        done = server.submit(shutdown())
        # Between chunks the message is in flight: the session is not cut.
        with pytest.raises(TimeoutError):
            client.reply(timeout=0.3)
        client.send(bdat(b"\r\nbody\r\n", last=True))
        assert client.reply().startswith(b"250 2.0.0 Ok: queued as ")
        assert client.read_to_eof() == b"421 4.3.2 Server shutting down\r\n"
        done.result(5)
    (message,) = server.plugin.messages
    assert message.body == b"Subject: late\r\n\r\nbody\r\n"


# ------------------------------------------------------------ the hooks
class Hooks:
    """Accepts recipients, delivers, and records what the DATA-time and
    message-time hooks saw; refuses the first chunk when told to."""

    def __init__(self, refuse_data: bool = False) -> None:
        self.refuse_data = refuse_data
        self.data_calls: list[tuple[bool, bytes]] = []
        self.messages: list[tuple[bool, bytes, bytes]] = []

    def bonzo_rcpt(self) -> Any:
        return Accept()

    def bonzo_data(self, envelope: Envelope) -> Any:
        self.data_calls.append((envelope.chunked, envelope.body))
        if self.refuse_data:
            raise SMTPError(550, "Not from you", enhanced_code="5.7.1")

    def bonzo_message(self, envelope: Envelope) -> Any:
        self.messages.append((envelope.chunked, envelope.header_bytes, envelope.body))

    def bonzo_deliver(self) -> Any:
        return Accept()


def converse(hooks: Hooks, data: bytes, **settings: Any) -> tuple[list[bytes], SessionTester]:
    plugins = PluginSet(timeout=5.0)
    plugins.register(hooks, "hooks")

    async def talk() -> tuple[list[bytes], SessionTester]:
        tester = SessionTester(plugins, settings=SMTPSettings(hostname="bonzo.test", **settings))
        await tester.connect()
        replies = split_replies(await tester.send(data))
        return replies, tester

    return asyncio.run(talk())


def test_hooks_see_a_chunked_message_as_they_see_data():
    hooks = Hooks()
    replies, tester = converse(
        hooks, EHLO + TXN + bdat(b"Subject: x\r\n\r\n") + bdat(b"body\r\n", last=True)
    )
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
    # bonzo_data before the first chunk was read; bonzo_message after the last.
    assert hooks.data_calls == [(True, b"")]
    ((chunked, headers, body),) = hooks.messages
    assert chunked and body == b"Subject: x\r\n\r\nbody\r\n"
    assert headers.startswith(b"Received: from client.example ([192.0.2.1])\r\n")
    assert tester.dispatcher.envelope is None


def test_a_refused_first_chunk_drops_the_envelope():
    hooks = Hooks(refuse_data=True)
    replies, tester = converse(hooks, EHLO + TXN + bdat(b"abc") + bdat(b"def", last=True))
    assert replies[-2:] == [b"550 5.7.1 Not from you\r\n", NEED_MAIL]
    assert tester.dispatcher.envelope is None
    assert hooks.messages == []
    assert tester.refusals[-2:] == [
        ("BDAT", 550, "5.7.1", "hooks"),
        ("BDAT", 503, "5.5.1", "core"),
    ]


def test_a_chunk_refused_mid_message_drops_what_was_stored(tmp_path):
    hooks = Hooks()
    plugins = PluginSet(timeout=5.0)
    plugins.register(hooks, "hooks")
    settings = SMTPSettings(
        hostname="bonzo.test",
        max_message_size=300_005,
        spool_threshold=1024,
        spool_dir=str(tmp_path),
    )

    async def talk() -> None:
        tester = SessionTester(plugins, settings=settings)
        await tester.connect()
        first = await tester.send(EHLO + TXN + bdat((b"x" * 98 + b"\r\n") * 3000))
        assert split_replies(first)[-1] == b"250 2.0.0 300000 octets received\r\n"
        envelope = tester.dispatcher.envelope
        assert envelope is not None and envelope.spooled and fds_under(tmp_path)
        assert await tester.send(bdat(b"y" * 10, last=True)) == TOO_BIG
        assert tester.dispatcher.envelope is None
        assert fds_under(tmp_path) == []  # the spool file is gone with it
        await tester.close()

    asyncio.run(talk())
    assert hooks.messages == []

#!/usr/bin/env python3
"""Coverage-guided fuzzing of the sans-IO protocol core (SMTP and LMTP).

    pip install atheris
    mkdir -p /tmp/corpus && python fuzz/protocol.py /tmp/corpus -max_total_time=600

Each input picks a protocol (SMTP or LMTP), the original API's replies or
not, small or default limits, a ``bare_newline`` mode and which events to
refuse, then feeds the rest to the core in pieces of 1 to 97 octets, as a
client would send them, answering every event the way the session loop does.
It fails on any exception the core raises, and on any broken invariant:

- the replies form a stream of well-formed reply lines (``NNN`` then a space
  or a hyphen, CRLF-terminated), whatever the input;
- the replies queued while input is read stay within ``max_write_backlog``
  plus one reply (the core pauses, issue 8);
- with ``bare_newline = "normalize"`` or ``"reject"``, a message accepted
  after ``DATA`` holds no bare CR and no bare LF (nothing can be smuggled
  past a filter that reads lines differently).

Without atheris, ``tests/test_fuzz_harness.py`` runs :func:`one` on the
seeds below and on random inputs, so the harness itself is tested.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from protocol_helpers import Client, default_decision  # noqa: E402

from bonzo.errors import SMTPError  # noqa: E402
from bonzo.lmtp import LMTPProtocol  # noqa: E402
from bonzo.protocol import (  # noqa: E402
    Auth,
    AuthResponse,
    Data,
    Event,
    MessageComplete,
    Reset,
    SMTPProtocol,
    StartTLS,
)
from bonzo.settings import BARE_NEWLINE_MODES  # noqa: E402

REPLIES = re.compile(rb"(?:[2-5][0-9][0-9][ -][^\r\n]*\r\n)*")
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
REFUSED = SMTPError(550, "Refused by the fuzzer", enhanced_code="5.7.1")
NO_TLS = SMTPError(454, "TLS not available", enhanced_code="4.7.0")
BAD_AUTH = SMTPError(535, "Authentication failed", enhanced_code="5.7.8")
SMALL = {"max_message_size": 64, "max_write_backlog": 1024, "max_command_line": 512}
#: The longest reply the core writes at once (the EHLO or HELP reply), with room.
ONE_REPLY = 4096

#: Inputs the fuzzer starts from (each after its four setup octets).
SEEDS = [
    b"EHLO a\r\nMAIL FROM:<a@b> BODY=8BITMIME SIZE=10\r\n"
    b"RCPT TO:<c@d> NOTIFY=SUCCESS ORCPT=rfc822;c@d\r\nDATA\r\nx\r\n..y\r\n.\r\n",
    b"EHLO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3\r\nabcBDAT 0 LAST\r\nQUIT\r\n",
    b"LHLO a\r\nMAIL FROM:<> SMTPUTF8\r\nRCPT TO:<j\xc3\xb6rg@d>\r\n"
    b'RCPT TO:<"x y"@[127.0.0.1]>\r\nDATA\r\nx\n.\r\n',
    b"EHLO a\r\nAUTH PLAIN AGEAYg==\r\nSTARTTLS\r\nHELP\r\nVRFY x\r\nNOOP\r\nRSET\r\n",
    b"HELO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\na\rb\nc\r\n.\n.\r\n",
]


def one(data: bytes) -> None:
    """Run one input; raise on a fault or a broken invariant."""
    if len(data) < 4:
        return
    flags, mask, text = data[0], int.from_bytes(data[1:3], "little"), data[4:]
    kind: type[SMTPProtocol] = LMTPProtocol if flags & 1 else SMTPProtocol
    mode = BARE_NEWLINE_MODES[(flags >> 1) % len(BARE_NEWLINE_MODES)]
    legacy = bool(flags & 8) and kind is SMTPProtocol
    overrides = dict(SMALL) if flags & 16 else {}
    decided = [0]
    via_data = [False]

    def decide(proto: SMTPProtocol, event: Event) -> object:
        decided[0] += 1
        if isinstance(event, StartTLS):
            return NO_TLS  # no TLS layer here: the handshake is the session's
        if isinstance(event, (Auth, AuthResponse)):
            return BAD_AUTH
        if isinstance(event, Data):
            via_data[0] = not event.chunked
        if isinstance(event, Reset):
            return None  # RSET cannot be refused
        if isinstance(event, MessageComplete):
            if event.error is None and via_data[0] and mode != "allow":
                content = client.messages[-1]
                if BARE.search(content):
                    raise AssertionError(f"bare CR or LF stored in {mode} mode: {content!r}")
        if not (isinstance(event, MessageComplete) and event.error is not None):
            if mask >> (decided[0] % 16) & 1:
                return REFUSED
        return default_decision(proto, event)

    client = Client(decide=decide, legacy=legacy, kind=kind, bare_newline=mode, **overrides)
    proto = client.proto
    backlog = proto.settings.max_write_backlog + ONE_REPLY
    out = [proto.data_to_send()]
    pos = steps = 0
    while pos < len(text) and not client.closed and steps < 200:
        size = 1 + text[pos] % 97
        client.proto.receive_data(text[pos + 1 : pos + 1 + size])
        pos += 1 + size
        steps += 1
        out.append(client.drain())
        if proto.pending_output > backlog:
            raise AssertionError(f"{proto.pending_output} octets of replies queued")
        out.append(proto.data_to_send())
    replies = b"".join(out)
    if not REPLIES.fullmatch(replies):
        raise AssertionError(f"malformed replies: {replies[-300:]!r}")


def seeds() -> list[bytes]:
    """:data:`SEEDS` with setup octets for each kind of session, cut into
    pieces of up to 40 octets (the framing :func:`one` reads)."""
    out = []
    for seed in SEEDS:
        pieces = b"".join(
            bytes([len(seed[i : i + 40]) - 1]) + seed[i : i + 40] for i in range(0, len(seed), 40)
        )
        for flags in (0, 1, 2, 4, 8, 16, 17, 19):
            out.append(bytes([flags, 0, 0, 0]) + pieces)
    return out


def main() -> None:
    import atheris

    # Coverage of everything loaded (the core, its parsers, the helpers).
    atheris.instrument_all()
    corpus = Path(sys.argv[1]) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else None
    if corpus is not None and corpus.is_dir() and not any(corpus.iterdir()):
        for i, seed in enumerate(seeds()):
            (corpus / f"seed-{i}").write_bytes(seed)
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

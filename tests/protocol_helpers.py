"""A tiny synchronous driver for :class:`bonzo.protocol.SMTPProtocol`.

Bytes in, reply bytes and events out, no event loop. Shared by the
table-driven protocol tests and the property tests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from bonzo.errors import NotImplementedCommand, SMTPError
from bonzo.protocol import (
    CLOSED,
    NEED_DATA,
    PAUSED,
    Data,
    DataChunk,
    Event,
    MessageComplete,
    Policy,
    Refusal,
    SMTPProtocol,
    Unknown,
)
from bonzo.settings import SMTPSettings

ScanData = Callable[[bytes | bytearray, int, bool, int], tuple[int, int, int]]


def c_scan_data() -> ScanData | None:
    """``bonzo._speedups.scan_data``, or ``None`` when the module is not
    built. CI builds it (``BONZO_EXTENSION=1``): there its absence raises."""
    try:
        from bonzo._speedups import scan_data
    except ImportError:
        if os.environ.get("BONZO_EXTENSION") == "1":
            raise
        return None
    return scan_data


HOST = "mx.example.org"
IP = "192.0.2.1"
SETTINGS = SMTPSettings(hostname=HOST)

EHLO = b"EHLO client.example\r\n"
HELO = b"HELO client.example\r\n"
MAIL = b"MAIL FROM:<alice@example.org>\r\n"
RCPT = b"RCPT TO:<bob@example.net>\r\n"
TXN = MAIL + RCPT
DATA = b"DATA\r\n"

EHLO_REPLY = (
    b"250-mx.example.org Hello 192.0.2.1\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 33554432\r\n"
    b"250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-CHUNKING\r\n"
    b"250-BINARYMIME\r\n"
    b"250-DSN\r\n"
    b"250-LIMITS RCPTMAX=1000 MAILMAX=100\r\n"
    b"250 HELP\r\n"
)
#: RFC 5321 4.1.1.1: "250 SP Domain".
HELO_REPLY = b"250 " + HOST.encode() + b" Hello 192.0.2.1\r\n"
#: The original API's (legacy_replies) text.
LEGACY_HELO_REPLY = b"250 Hello 192.0.2.1\r\n"

#: What the connection driver answers to an unknown verb.
ESMTP_UNKNOWN = SMTPError(500, "Error: command not recognized", enhanced_code="5.5.2")

Decision = Callable[[SMTPProtocol, Event], Any]


def default_decision(proto: SMTPProtocol, event: Event) -> Any:
    """Accept everything, like the driver with no plugins: unknown verbs are
    refused the way the connection refuses them, and a message that broke a
    limit is refused with the error the core found."""
    if isinstance(event, Unknown):
        return ESMTP_UNKNOWN if proto.enhanced_codes else NotImplementedCommand(event.sent)
    if isinstance(event, MessageComplete) and event.error is not None:
        return event.error
    return None


class Client:
    """Feeds bytes to one protocol instance and answers its events.

    ``decide(proto, event)`` returns ``None`` to accept, a string to accept
    with that text, an :class:`SMTPError` to reject, or (LMTP, at the end of
    a message) a list of per-recipient replies.
    """

    def __init__(
        self,
        settings: SMTPSettings | None = None,
        decide: Decision | None = None,
        *,
        legacy: bool = False,
        policy: Policy | None = None,
        kind: type[SMTPProtocol] = SMTPProtocol,
        **overrides: Any,
    ) -> None:
        settings = settings or SETTINGS
        if overrides:
            settings = settings.replace(**overrides)
        if policy is None:
            policy = Policy(legacy_replies=legacy)
        #: Every refusal the core reported, as (stage, code, enhanced, by, limit).
        self.refusals: list[tuple[str, int, str, str, str | None]] = []
        self.proto = kind(settings, IP, policy, on_refusal=self._refused)
        self.decide = decide or default_decision
        #: Every event (not DataChunks), in order.
        self.events: list[Event] = []
        #: Content of each finished message (accepted or not), in order.
        self.messages: list[bytes] = []
        #: The limit error of each finished message (``None`` if none).
        self.message_errors: list[SMTPError | None] = []
        #: Number of DataChunk events seen.
        self.chunks = 0
        #: Number of times the core said PAUSED.
        self.paused = 0
        self._content = bytearray()

    def _refused(self, refusal: Refusal) -> None:
        self.refusals.append(
            (refusal.stage, refusal.code, refusal.enhanced, refusal.by, refusal.limit)
        )

    @property
    def closed(self) -> bool:
        return self.proto.closed

    @property
    def content(self) -> bytes:
        """Content received so far for the message in progress."""
        return bytes(self._content)

    def send(self, *chunks: bytes) -> bytes:
        """Feed each chunk in turn, handle every event, return the replies
        (a client that reads everything: PAUSED just means "send now")."""
        out = []
        for chunk in chunks:
            self.proto.receive_data(chunk)
            out.append(self.drain())
        out.append(self.proto.data_to_send())
        return b"".join(out)

    def drain(self) -> bytes:
        """Handle events until more input is needed; return replies sent on
        the way (at each PAUSED)."""
        proto = self.proto
        sent = []
        while True:
            event = proto.next_event()
            if event is NEED_DATA or event is CLOSED:
                return b"".join(sent)
            if event is PAUSED:
                self.paused += 1
                sent.append(proto.data_to_send())
                continue
            if type(event) is DataChunk:
                assert event.data, "empty DataChunk"
                self.chunks += 1
                self._content += event.data
                continue
            self.events.append(event)
            if isinstance(event, Data):
                # A new message starts (content left from a transaction that
                # ended between BDAT chunks, by RSET, is not part of it).
                self._content.clear()
            if isinstance(event, MessageComplete):
                self._content += event.data
                self.messages.append(bytes(self._content))
                self.message_errors.append(event.error)
                self._content.clear()
            decision = self.decide(proto, event)
            if decision is None:
                proto.accept()
            elif isinstance(decision, str):
                proto.accept(decision)
            elif isinstance(decision, list):  # LMTP: one reply per recipient
                proto.answer_recipients(decision)  # type: ignore[attr-defined]
            else:
                proto.reject(decision)


def feed(*chunks: bytes, **kwargs: Any) -> tuple[bytes, Client]:
    """One-shot: a fresh client fed ``chunks``; returns (replies, client)."""
    client = Client(**kwargs)
    return client.send(*chunks), client


def reply_to(setup: bytes, command: bytes, **kwargs: Any) -> bytes:
    """The replies to ``command`` (CRLF added) after ``setup`` was sent."""
    client = Client(**kwargs)
    client.send(setup)
    return client.send(command + b"\r\n")


_REPLY_END = re.compile(rb"^\d{3}(?: [^\r\n]*)?\r\n", re.M)


def split_replies(data: bytes) -> list[bytes]:
    """Split reply bytes into whole replies (multi-line ones kept together)."""
    replies = []
    start = 0
    for match in _REPLY_END.finditer(data):
        replies.append(data[start : match.end()])
        start = match.end()
    assert start == len(data), f"trailing partial reply: {data[start:]!r}"
    return replies


def codes(data: bytes) -> list[int]:
    """The status code of each reply in ``data``."""
    return [int(r[:3]) for r in split_replies(data)]


def all_splits(data: bytes) -> Iterable[tuple[bytes, bytes]]:
    """Every way of cutting ``data`` in two."""
    for i in range(len(data) + 1):
        yield data[:i], data[i:]


def dot_stuff(body: bytes) -> bytes:
    """What a client sends for ``body`` (CRLF text ending in CRLF or empty)."""
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..")

"""A small asyncio client for SpamAssassin's spamd (the SPAMC/SPAMD
protocol, version 1.5).

Written here rather than taken from aiospamc: that library wants the whole
message in memory as one ``bytes``, and the protocol is a request line,
a few headers and the message; here the message is streamed from the
spool and the answer is read with bounds.

The exchange (spamd(1p), ``spamd/PROTOCOL`` in SpamAssassin's sources):
the client sends ``HEADERS SPAMC/1.5``, ``Content-length: N``, optionally
``User: name``, a blank line and the message; spamd answers
``SPAMD/1.1 0 EX_OK``, headers including ``Spam: True ; 6.2 / 5.0`` (its
verdict, score and threshold) and ``Content-length``, a blank line, and —
for ``HEADERS`` — the header section of the message as SpamAssassin would
rewrite it (with its ``X-Spam-*`` headers). A code other than 0 is an error
(``EX_USAGE`` 64, ``EX_DATAERR`` 65, ``EX_TOOBIG`` 98, ...).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterable
from dataclasses import dataclass, field

from .._scan import Endpoint, ScanError, close_stream, open_stream

__all__ = ["MAX_HEADERS", "SpamdReply", "parse_reply", "spamd_request"]

#: The longest answer read: spamd's header lines and the message's header
#: section with SpamAssassin's additions.
MAX_ANSWER = 1 << 20
#: The most header lines of spamd's own answer read.
MAX_HEADERS = 50
_STATUS = re.compile(rb"SPAMD/(\d+)\.(\d+) +(\d+) +([ -~]*)")
_SPAM = re.compile(r"(True|False|Yes|No) *; *(-?\d+(?:\.\d+)?) */ *(-?\d+(?:\.\d+)?)", re.I)
_FIELD = re.compile(rb"([!-9;-~]+):[ \t]*(.*)", re.S)


@dataclass(frozen=True)
class SpamdReply:
    """spamd's verdict: whether it is spam, its score and threshold, and
    the ``X-Spam-*`` headers SpamAssassin would add, as ``(name, value)``
    with folded values kept folded (CRLF and white space)."""

    spam: bool
    score: float
    threshold: float
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def tests(self) -> list[str]:
        """The names of the rules that matched (``tests=`` of X-Spam-Status)."""
        for name, value in self.headers:
            if name.lower() == "x-spam-status":
                # Names separated by commas, folded after a comma.
                m = re.search(r"tests=(\w+(?:,\s*\w+)*)", value)
                if m:
                    return re.split(r",\s*", m.group(1))[:100]
        return []


def parse_fields(section: bytes) -> list[tuple[str, str]]:
    """The header fields of a header section (CRLF or LF line ends), each
    with its continuation lines; lines that are no field are skipped."""
    fields: list[tuple[str, str]] = []
    for line in re.split(rb"\r?\n", section):
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + "\r\n" + line.decode("utf-8", "replace"))
            continue
        m = _FIELD.fullmatch(line)
        if m:
            fields.append((m.group(1).decode("ascii"), m.group(2).decode("utf-8", "replace")))
    return fields


def parse_reply(raw: bytes) -> SpamdReply:
    """spamd's whole answer to ``HEADERS`` (or ``CHECK``). Raises
    :class:`ScanError` for an error code or anything that is not an answer."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = raw.partition(b"\n\n")
    lines = re.split(rb"\r?\n", head)
    m = _STATUS.fullmatch(lines[0])
    if m is None:
        raise ScanError(f"spamd answered something unexpected: {lines[0][:80]!r}")
    if m.group(3) != b"0":
        text = m.group(4).decode("ascii")[:80]
        raise ScanError(f"spamd: error {int(m.group(3))} {text}")
    spam = None
    length = None
    for line in lines[1 : MAX_HEADERS + 1]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"spam":
            spam = _SPAM.fullmatch(value.strip().decode("ascii", "replace"))
        elif key == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    if spam is None:
        raise ScanError("spamd's answer has no Spam: line")
    if length is not None and len(body) < length:
        raise ScanError("spamd's answer ends early")
    headers = [(n, v) for n, v in parse_fields(body) if n.lower().startswith("x-spam-")]
    return SpamdReply(
        spam.group(1).lower() in ("true", "yes"),
        float(spam.group(2)),
        float(spam.group(3)),
        headers[:MAX_HEADERS],
    )


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while True:
        piece = await reader.read(65536)
        if not piece:
            return data
        data += piece
        if len(data) > MAX_ANSWER:
            raise ScanError(f"spamd's answer is longer than {MAX_ANSWER} octets")


async def _exchange(
    endpoint: Endpoint,
    command: str,
    size: int,
    chunks: AsyncIterable[bytes],
    user: str,
    connect_timeout: float,
) -> SpamdReply:
    reader, writer = await open_stream(endpoint, connect_timeout)
    try:
        head = f"{command} SPAMC/1.5\r\nContent-length: {size}\r\n"
        if user:
            head += f"User: {user}\r\n"
        writer.write(head.encode("ascii") + b"\r\n")
        sent = 0
        try:
            async for chunk in chunks:
                sent += len(chunk)
                writer.write(chunk)
                await writer.drain()
            if sent != size:
                raise ScanError(f"the message changed while it was sent ({sent} != {size})")
            # spamd reads Content-length octets; half-closing tells old
            # versions the message is complete.
            if writer.can_write_eof():
                writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # spamd answered early (an error): read it
        try:
            raw = await _read_all(reader)
        except (ConnectionError, OSError) as exc:
            raise ScanError(f"{endpoint}: connection lost: {exc}") from None
        if not raw:
            raise ScanError("spamd closed the connection without an answer")
        return parse_reply(raw)
    finally:
        await close_stream(writer)


async def spamd_request(
    endpoint: Endpoint,
    size: int,
    chunks: AsyncIterable[bytes],
    *,
    command: str = "HEADERS",
    user: str = "",
    timeout: float,
    connect_timeout: float = 5.0,
) -> SpamdReply:
    """Send a message of ``size`` octets (``chunks``) to spamd with
    ``command`` (``HEADERS`` or ``CHECK``) and return its verdict, within
    ``timeout`` seconds in all. Raises :class:`ScanError`."""
    try:
        return await asyncio.wait_for(
            _exchange(endpoint, command, size, chunks, user, connect_timeout), timeout
        )
    except asyncio.TimeoutError:
        raise ScanError(f"{endpoint}: no answer within {timeout:g}s") from None

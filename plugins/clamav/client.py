"""A small asyncio client for clamd's ``INSTREAM`` command.

No well-kept async client exists (``clamd`` and ``pyclamd`` on PyPI are
unmaintained and blocking; ``aioclamd`` reads the whole message into memory
before it sends it), and the protocol is a few lines, so it is written here.

The exchange (clamd(8), "INSTREAM"): the client sends ``zINSTREAM\\0``, then
the data as chunks, each a 4-octet big-endian length and that many octets,
and a zero length to end; clamd answers one line ended by ``\\0``:
``stream: OK``, ``stream: <signature> FOUND``, or ``<text> ERROR``. clamd
ends the connection with ``INSTREAM size limit exceeded. ERROR`` when the
data passes its ``StreamMaxLength``.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterable
from dataclasses import dataclass

from .._scan import Endpoint, ScanError, close_stream, open_stream

__all__ = ["ClamdReply", "MAX_REPLY", "instream", "parse_reply"]

#: The longest reply read from clamd; a signature name is far shorter.
MAX_REPLY = 4096
#: The largest chunk clamd is sent at once (its default StreamMaxLength is
#: far larger; the chunk size only sets how much is in memory at a time).
MAX_CHUNK = 1 << 20


@dataclass(frozen=True)
class ClamdReply:
    """clamd's verdict on a stream: ``signature`` is the name of what it
    found, ``None`` when the stream is clean."""

    signature: str | None

    @property
    def infected(self) -> bool:
        return self.signature is not None


def parse_reply(raw: bytes) -> ClamdReply:
    """clamd's answer to INSTREAM (without or with its final ``\\0``).
    Raises :class:`ScanError` for an ``ERROR`` answer or anything else."""
    text = raw.rstrip(b"\0\r\n")
    try:
        line = text.decode("ascii")
    except UnicodeDecodeError:
        raise ScanError("clamd answered with non-ASCII octets") from None
    if not line.isprintable() or "\0" in line:
        raise ScanError(f"clamd answered with control characters: {line[:80]!r}")
    if line.endswith("ERROR"):
        raise ScanError(f"clamd: {line[:200]}")
    if not line.startswith("stream: "):
        raise ScanError(f"clamd answered something unexpected: {line[:80]!r}")
    verdict = line[len("stream: ") :]
    if verdict == "OK":
        return ClamdReply(None)
    if verdict.endswith(" FOUND") and len(verdict) > len(" FOUND"):
        return ClamdReply(verdict[: -len(" FOUND")].strip() or "unnamed")
    raise ScanError(f"clamd answered something unexpected: {line[:80]!r}")


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while b"\0" not in data:
        piece = await reader.read(MAX_REPLY)
        if not piece:
            break
        data += piece
        if len(data) > MAX_REPLY:
            raise ScanError(f"clamd's answer is longer than {MAX_REPLY} octets")
    if not data:
        raise ScanError("clamd closed the connection without an answer")
    return data.split(b"\0", 1)[0]


async def _exchange(
    endpoint: Endpoint, chunks: AsyncIterable[bytes], connect_timeout: float
) -> ClamdReply:
    reader, writer = await open_stream(endpoint, connect_timeout)
    try:
        writer.write(b"zINSTREAM\0")
        try:
            async for chunk in chunks:
                for i in range(0, len(chunk), MAX_CHUNK):
                    piece = chunk[i : i + MAX_CHUNK]
                    writer.write(struct.pack(">I", len(piece)))
                    writer.write(piece)
                    # One chunk in the socket's buffer at a time: memory
                    # stays bounded whatever the size of the message.
                    await writer.drain()
            writer.write(b"\0\0\0\0")
            await writer.drain()
        except (ConnectionError, OSError):
            # clamd stops reading and closes when the stream passes its
            # StreamMaxLength, after writing its answer: read that.
            pass
        try:
            return parse_reply(await _read_reply(reader))
        except (ConnectionError, OSError) as exc:
            raise ScanError(f"{endpoint}: connection lost: {exc}") from None
    finally:
        await close_stream(writer)


async def instream(
    endpoint: Endpoint,
    chunks: AsyncIterable[bytes],
    *,
    timeout: float,
    connect_timeout: float = 5.0,
) -> ClamdReply:
    """Send ``chunks`` to clamd at ``endpoint`` for scanning and return its
    verdict. The whole exchange (connecting included) takes at most
    ``timeout`` seconds. Raises :class:`~bonzo_plugins._scan.ScanError`
    when clamd cannot be reached, is too slow, fails, or answers garbage."""
    try:
        return await asyncio.wait_for(_exchange(endpoint, chunks, connect_timeout), timeout)
    except asyncio.TimeoutError:
        raise ScanError(f"{endpoint}: no answer within {timeout:g}s") from None

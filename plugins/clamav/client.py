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
import socket
import struct
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import NoReturn

from .._scan import Endpoint, ScanError, open_socket

__all__ = ["ClamdReply", "MAX_REPLY", "instream", "parse_reply"]

#: The longest reply read from clamd; a signature name is far shorter.
MAX_REPLY = 4096
#: How long clamd's answer is waited for once it stopped reading the stream
#: (it writes the answer, then closes).
ANSWER_WAIT = 2.0
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


async def _read_reply(sock: socket.socket) -> bytes:
    """clamd's answer up to its ``\\0`` (or the end of the connection)."""
    loop = asyncio.get_running_loop()
    data = b""
    while b"\0" not in data:
        piece = await loop.sock_recv(sock, MAX_REPLY)
        if not piece:
            break
        data += piece
        if len(data) > MAX_REPLY:
            raise ScanError(f"clamd's answer is longer than {MAX_REPLY} octets")
    # b"" when clamd closed without a word (the caller says what that means).
    return data.split(b"\0", 1)[0]


async def _exchange(
    endpoint: Endpoint, chunks: AsyncIterable[bytes], connect_timeout: float
) -> ClamdReply:
    loop = asyncio.get_running_loop()
    sock = await open_socket(endpoint, connect_timeout)
    # clamd's answer is read while the stream is sent: past its
    # StreamMaxLength it answers at once and closes, and the answer is in
    # the socket when the next write fails. (An asyncio stream would lose
    # it: its reader raises the write's error first, and its transport stops
    # reading at once.)
    answer = asyncio.ensure_future(_read_reply(sock))
    sent = 0  # octets of the stream written
    try:
        try:
            await loop.sock_sendall(sock, b"zINSTREAM\0")
            async for chunk in chunks:
                for i in range(0, len(chunk), MAX_CHUNK):
                    if answer.done():
                        # clamd answered before the end: nothing more to send.
                        await _stopped(endpoint, answer, sent, None)
                    # One chunk at a time: memory stays bounded whatever the
                    # size of the message.
                    piece = memoryview(chunk)[i : i + MAX_CHUNK]
                    await loop.sock_sendall(sock, struct.pack(">I", len(piece)))
                    await loop.sock_sendall(sock, piece)
                    sent += len(piece)
            if answer.done():
                await _stopped(endpoint, answer, sent, None)
            await loop.sock_sendall(sock, b"\0\0\0\0")
        except (ConnectionError, OSError) as exc:
            # clamd stopped reading; it answers before it closes.
            await _stopped(endpoint, answer, sent, exc)
        try:
            raw = await answer
        except (ConnectionError, OSError) as exc:
            raise _no_answer(endpoint, sent, exc) from None
        if not raw:
            raise _no_answer(endpoint, sent, None)
        return _verdict(endpoint, raw)
    finally:
        answer.cancel()
        await asyncio.gather(answer, return_exceptions=True)
        sock.close()


async def _stopped(
    endpoint: Endpoint, answer: asyncio.Future[bytes], sent: int, error: OSError | None
) -> NoReturn:
    """Raise :class:`ScanError` for a stream clamd did not take to its end
    (``error``: the write that failed), with clamd's ``ERROR`` line when it
    can be read within :data:`ANSWER_WAIT` seconds."""
    try:
        raw = await asyncio.wait_for(asyncio.shield(answer), ANSWER_WAIT)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        raw = b""
    if not raw:
        raise _no_answer(endpoint, sent, error)
    reply = _verdict(endpoint, raw)
    # A verdict on part of the message is none.
    raise ScanError(
        f"{endpoint}: clamd answered before the end of the stream ({sent} octets "
        f"sent): {'FOUND' if reply.infected else 'OK'}"
    )


def _verdict(endpoint: Endpoint, raw: bytes) -> ClamdReply:
    """:func:`parse_reply`, its :class:`ScanError` naming clamd (and, for
    clamd's size limit, the setting to change)."""
    try:
        return parse_reply(raw)
    except ScanError as exc:
        hint = ""
        if b"size limit" in raw:
            hint = " (StreamMaxLength in clamd.conf is below the plugin's max_size)"
        raise ScanError(f"{endpoint}: {exc}{hint}") from None


def _no_answer(endpoint: Endpoint, sent: int, error: OSError | None) -> ScanError:
    """clamd closed the connection without a word: what the log should say."""
    why = f" ({error.strerror or error})" if error is not None else ""
    return ScanError(
        f"{endpoint}: clamd closed the stream early ({sent} octets sent), without "
        f"an answer{why}: a StreamMaxLength in clamd.conf below the plugin's "
        "max_size is the usual cause"
    )


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

"""try_write: the shortcut for small replies never reorders, loses or
duplicates output, and leaves errors to IOStream.write. SessionStream: the
read hint skips only the socket attempt that cannot succeed, and never
delays or loses input; its direct partial read gives what Tornado's read
would, in the same order, with the same ends and errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from tornado.iostream import IOStream, StreamClosedError

from bonzo.connection import SessionStream, try_write


def pair(
    sndbuf: int | None = None, cls: type[IOStream] = IOStream
) -> tuple[IOStream, socket.socket]:
    ours, theirs = socket.socketpair()
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    return cls(ours), theirs


def _method(stream: IOStream, data: bytes) -> int:
    assert isinstance(stream, SessionStream)
    return stream.try_write(data)


# try_write on any IOStream, and the session stream's own (the same rule).
WRITERS = pytest.mark.parametrize(
    "cls, try_write",
    [(IOStream, try_write), (SessionStream, _method)],
    ids=["function", "SessionStream.try_write"],
)


def read_all(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(5)
    data = b""
    while len(data) < size:
        chunk = sock.recv(65536)
        assert chunk, "closed early"
        data += chunk
    return data


@WRITERS
def test_a_small_reply_is_sent_at_once(cls, try_write):
    async def run() -> None:
        stream, peer = pair(cls=cls)
        try:
            assert try_write(stream, b"250 2.0.0 Ok\r\n") == 14
            assert not stream.writing()
            assert read_all(peer, 14) == b"250 2.0.0 Ok\r\n"
        finally:
            stream.close()
            peer.close()

    asyncio.run(run())


@WRITERS
def test_what_the_socket_does_not_take_goes_through_write_in_order(cls, try_write):
    async def run() -> None:
        stream, peer = pair(sndbuf=4096, cls=cls)
        try:
            blocks = [bytes([65 + n % 26]) * 50_000 for n in range(6)]
            futures = []
            for block in blocks:
                sent = try_write(stream, block)
                assert 0 <= sent <= len(block)
                if sent < len(block):
                    futures.append(stream.write(block[sent:]))
                # While anything is queued, the shortcut takes nothing: the
                # order of the output is the stream's.
                if stream.writing():
                    assert try_write(stream, b"x") == 0
            expected = b"".join(blocks)
            loop = asyncio.get_running_loop()
            received = await loop.run_in_executor(None, read_all, peer, len(expected))
            await asyncio.gather(*futures)
            assert received == expected
        finally:
            stream.close()
            peer.close()

    asyncio.run(run())


@WRITERS
def test_errors_are_left_to_write(cls, try_write):
    async def run() -> None:
        stream, peer = pair(cls=cls)
        peer.close()
        # The peer is gone (EPIPE): nothing is sent and nothing is raised...
        assert try_write(stream, b"250 Ok\r\n") == 0
        assert not stream.closed()
        # ... write() meets the error and closes the stream, as IOStream does.
        future = stream.write(b"250 Ok\r\n")
        await asyncio.sleep(0)
        assert stream.closed()
        assert future.done() and future.exception() is not None
        # A closed stream takes nothing.
        assert try_write(stream, b"250 Ok\r\n") == 0

    asyncio.run(run())


class CountingStream(SessionStream):
    """A SessionStream that counts its attempts to read the socket, by its
    direct read and by Tornado's."""

    tries = 0
    direct = 0

    def recv_chunk(self, size: int) -> bytes | None:
        self.tries += 1
        self.direct += 1
        return super().recv_chunk(size)

    def read_from_fd(self, buf: bytearray | memoryview) -> int | None:
        self.tries += 1
        return super().read_from_fd(buf)


@contextlib.contextmanager
def session_streams(
    kind: type[SessionStream] = CountingStream, tcp: bool = False
) -> Iterator[tuple[Any, socket.socket]]:
    """A session stream of ``kind`` and the peer's socket: a socket pair, or
    with ``tcp`` a connection on 127.0.0.1 (a reset needs TCP). Both are
    closed at the end."""
    if tcp:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            theirs = socket.create_connection(listener.getsockname())
            ours, _ = listener.accept()
        ours.setblocking(False)
    else:
        ours, theirs = socket.socketpair()
    stream = kind(ours)
    try:
        yield stream, theirs
    finally:
        stream.close()
        theirs.close()


def test_a_hinted_read_waits_for_the_socket_instead_of_trying_it():
    async def run() -> None:
        with session_streams() as (stream, peer):
            stream.wait_readable = True
            future = stream.read_bytes(4096, partial=True)
            assert stream.tries == 0  # no attempt that can only fail
            assert not stream.wait_readable  # the hint holds for one read
            await asyncio.sleep(0.01)
            assert not future.done()
            peer.sendall(b"MAIL FROM:<a@example.org>\r\n")
            assert await asyncio.wait_for(future, 5) == b"MAIL FROM:<a@example.org>\r\n"
            assert stream.tries == 1  # the one read, once the data was there

    asyncio.run(run())


def test_an_unhinted_read_tries_the_socket_first_as_tornado_does():
    async def run() -> None:
        with session_streams() as (stream, peer):
            future = stream.read_bytes(4096, partial=True)
            assert stream.tries == 1  # found nothing (EAGAIN), then listens
            peer.sendall(b"DATA\r\n")
            assert await asyncio.wait_for(future, 5) == b"DATA\r\n"
            assert stream.tries == 2

    asyncio.run(run())


def test_a_hinted_read_still_gets_what_is_buffered_or_already_sent():
    async def run() -> None:
        with session_streams() as (stream, peer):
            # Already in the socket: the event loop reports it on its next turn.
            peer.sendall(b"RSET\r\n")
            await asyncio.sleep(0.01)
            stream.wait_readable = True
            first = await asyncio.wait_for(stream.read_bytes(4096, partial=True), 5)
            assert first == b"RSET\r\n"
            # A read_until (Tornado's path, whatever the hint) reads all there
            # is and leaves what follows its delimiter in the stream's buffer...
            peer.sendall(b"NOOP\r\nQUIT\r\n")
            await asyncio.sleep(0.01)
            stream.wait_readable = True
            assert await asyncio.wait_for(stream.read_until(b"\r\n"), 5) == b"NOOP\r\n"
            # ...which a hinted read returns at once, the hint unused.
            stream.wait_readable = True
            future = stream.read_bytes(4096, partial=True)
            assert future.done() and future.result() == b"QUIT\r\n"
            # The peer closes: a hinted read ends with StreamClosedError.
            peer.close()
            stream.wait_readable = True
            with pytest.raises(StreamClosedError):
                await asyncio.wait_for(stream.read_bytes(4096, partial=True), 5)
            # And on a closed stream a hinted read fails at once.
            stream.wait_readable = True
            with pytest.raises(StreamClosedError):
                stream.read_bytes(4096, partial=True)

    asyncio.run(run())


def test_a_partial_read_with_nothing_buffered_takes_the_socket_data_as_it_is():
    async def run() -> None:
        with session_streams() as (stream, peer):
            # Already in the socket: read at once, directly.
            peer.sendall(b"EHLO client.example\r\n")
            future = stream.read_bytes(4096, partial=True)
            assert future.done() and future.result() == b"EHLO client.example\r\n"
            assert (stream.tries, stream.direct) == (1, 1)
            # Arriving later: read when the loop reports it, directly too.
            future = stream.read_bytes(4096, partial=True)
            assert not future.done()
            peer.sendall(b"QUIT\r\n")
            assert await asyncio.wait_for(future, 5) == b"QUIT\r\n"
            assert stream.direct == stream.tries == 3  # one empty try, one read

    asyncio.run(run())


def test_a_direct_read_takes_no_more_than_asked_and_leaves_the_rest_in_order():
    async def run() -> None:
        with session_streams() as (stream, peer):
            stream.read_chunk_size = 4
            peer.sendall(b"0123456789abcdef")
            await asyncio.sleep(0.01)
            got = [await asyncio.wait_for(stream.read_bytes(3, partial=True), 5)]
            # The stream's read_chunk_size bounds a read too, as in Tornado.
            got.append(await asyncio.wait_for(stream.read_bytes(100, partial=True), 5))
            assert got == [b"012", b"3456"]
            # Tornado's own reads see the rest, in order, and leave what they
            # read beyond a delimiter in the buffer...
            assert await asyncio.wait_for(stream.read_until(b"9"), 5) == b"789"
            before = stream.direct
            rest = await asyncio.wait_for(stream.read_bytes(100, partial=True), 5)
            # ...which the next partial read returns first (Tornado's path).
            rest += await asyncio.wait_for(stream.read_bytes(100, partial=True), 5)
            assert b"abcdef".startswith(rest) and rest
            assert stream.direct - before <= 1

    asyncio.run(run())


def test_a_direct_read_ends_with_stream_closed_at_end_of_stream():
    async def run() -> None:
        with session_streams() as (stream, peer):
            future = stream.read_bytes(4096, partial=True)
            peer.shutdown(socket.SHUT_WR)
            with pytest.raises(StreamClosedError):
                await asyncio.wait_for(future, 5)
            assert stream.closed() and stream.error is None

    asyncio.run(run())


def test_a_reset_during_a_direct_read_closes_quietly(caplog):
    async def run() -> None:
        with session_streams(tcp=True) as (stream, peer):
            future = stream.read_bytes(4096, partial=True)
            # SO_LINGER 0: close() sends a reset instead of a FIN.
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()
            with pytest.raises(StreamClosedError):
                await asyncio.wait_for(future, 5)
            assert isinstance(stream.error, ConnectionResetError)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(run())
    assert stream_warnings(caplog) == []


class FailingStream(CountingStream):
    """The socket fails with an error that is not a reset (a fault a real
    peer cannot cause on demand)."""

    def recv_chunk(self, size: int) -> bytes | None:
        raise OSError(5, "Input/output error")


def stream_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tornado.general"]


@pytest.mark.parametrize("hinted", [False, True])
def test_another_socket_error_in_a_direct_read_is_logged_once_and_closes(caplog, hinted):
    async def run() -> None:
        with session_streams(FailingStream) as (stream, peer):
            # Unhinted, the read tries the socket at once; hinted, it does when
            # the event loop reports data.
            stream.wait_readable = hinted
            future = stream.read_bytes(4096, partial=True)
            assert future.done() is not hinted
            if hinted:
                peer.sendall(b"NOOP\r\n")
            with pytest.raises(StreamClosedError):
                await asyncio.wait_for(future, 5)
            assert stream.closed() and isinstance(stream.error, OSError)

    with caplog.at_level(logging.DEBUG):
        asyncio.run(run())
    assert stream_warnings(caplog) == ["error on read: [Errno 5] Input/output error"]


def test_a_read_future_belongs_to_the_stream_loop_and_a_second_read_is_refused():
    async def run() -> None:
        with session_streams() as (stream, peer):
            future = stream.read_bytes(4096, partial=True)
            assert isinstance(future, asyncio.Future)
            assert future.get_loop() is asyncio.get_running_loop()
            # Still Tornado's rule: one read at a time.
            with pytest.raises(AssertionError, match="Already reading"):
                stream.read_bytes(4096, partial=True)
            peer.sendall(b"NOOP\r\n")
            assert await asyncio.wait_for(future, 5) == b"NOOP\r\n"

    asyncio.run(run())


class Count(int):
    """An int subclass: a numbers.Integral that is not exactly int."""


@pytest.mark.parametrize("size", [6, Count(6)], ids=["int", "int subclass"])
def test_read_bytes_reads_exactly_or_partially_as_tornado_does(size):
    async def run() -> None:
        with session_streams() as (stream, peer):
            peer.sendall(b"MAIL FROM:<a@b>\r\n")
            # An exact count: Tornado's buffered path, the rest kept in order.
            assert await asyncio.wait_for(stream.read_bytes(size), 5) == b"MAIL F"
            assert await asyncio.wait_for(stream.read_bytes(size, partial=True), 5) == b"ROM:<a"
            rest = await asyncio.wait_for(stream.read_bytes(4096, partial=True), 5)
            assert rest == b"@b>\r\n"

    asyncio.run(run())


def test_read_bytes_still_refuses_what_is_not_an_integer():
    async def run() -> None:
        with session_streams() as (stream, _peer):
            with pytest.raises(AssertionError):
                stream.read_bytes(6.0, partial=True)  # type: ignore[arg-type]

    asyncio.run(run())

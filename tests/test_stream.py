"""try_write: the shortcut for small replies never reorders, loses or
duplicates output, and leaves errors to IOStream.write."""

from __future__ import annotations

import asyncio
import socket

from tornado.iostream import IOStream

from bonzo.connection import try_write


def pair(sndbuf: int | None = None) -> tuple[IOStream, socket.socket]:
    ours, theirs = socket.socketpair()
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    return IOStream(ours), theirs


def read_all(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(5)
    data = b""
    while len(data) < size:
        chunk = sock.recv(65536)
        assert chunk, "closed early"
        data += chunk
    return data


def test_a_small_reply_is_sent_at_once():
    async def run() -> None:
        stream, peer = pair()
        try:
            assert try_write(stream, b"250 2.0.0 Ok\r\n") == 14
            assert not stream.writing()
            assert read_all(peer, 14) == b"250 2.0.0 Ok\r\n"
        finally:
            stream.close()
            peer.close()

    asyncio.run(run())


def test_what_the_socket_does_not_take_goes_through_write_in_order():
    async def run() -> None:
        stream, peer = pair(sndbuf=4096)
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


def test_errors_are_left_to_write():
    async def run() -> None:
        stream, peer = pair()
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

"""Helpers for the tests of :mod:`bonzo.client`: scripted SMTP/LMTP servers
on 127.0.0.1 (asyncio, in the test's own event loop) for the replies and
faults real daemons do not produce, and a file that records how it is read.

Every wait is bounded: :func:`run` gives each test's coroutine a deadline.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

HOST = "127.0.0.1"

#: The deadline for one test's coroutine, in seconds.
DEADLINE = 30.0

EHLO = b"250-fake.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 100000000\r\n"

Action = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


def run(coro: Coroutine[Any, Any, Any], timeout: float = DEADLINE) -> Any:
    """Run ``coro`` in a new event loop, failing after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Fake:
    """A scripted server: a greeting, an EHLO/LHLO reply, then ``250`` to
    every command unless ``replies`` names the verb (``b"..."`` a reply to
    send, or an async function ``(reader, writer, line)`` that does
    anything). ``DATA`` gets ``354``, the message is read to the final dot
    and kept in :attr:`messages` (as sent, dot-stuffed), and ``after_data``
    (a list of replies: LMTP sends several) follows.

    ``greeting=None`` never greets.
    """

    def __init__(
        self,
        *,
        greeting: bytes | None = b"220 fake.test ESMTP\r\n",
        ehlo: bytes = EHLO,
        replies: dict[str, bytes | Action] | None = None,
        after_data: list[bytes] | None = None,
    ) -> None:
        self.greeting = greeting
        self.ehlo = ehlo
        self.replies = dict(replies or {})
        self.after_data = after_data if after_data is not None else [b"250 2.0.0 Ok\r\n"]
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[Any]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        try:
            if self.greeting is None:
                await reader.read()  # until the client gives up
                return
            writer.write(self.greeting)
            while True:
                line = await reader.readline()
                if not line:
                    return
                self.commands.append(line.decode("utf-8", "replace").rstrip("\r\n"))
                verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
                action = self.replies.get(verb)
                if callable(action):
                    await action(reader, writer, line)
                elif action is not None:
                    writer.write(action)
                elif verb in ("EHLO", "LHLO"):
                    writer.write(self.ehlo)
                elif verb == "DATA":
                    writer.write(b"354 go ahead\r\n")
                    self.messages.append(await read_message(reader))
                    writer.write(b"".join(self.after_data))
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Cancelled by the loop closing: end quietly (asyncio's stream
            # server would log a cancelled handler as an error).
            pass
        finally:
            writer.close()


async def read_message(reader: asyncio.StreamReader) -> bytes:
    """Read DATA content up to and including the final ``.`` line."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed during DATA")
        lines.append(line)
        if line == b".\r\n":
            return b"".join(lines)


@asynccontextmanager
async def serve(fake: Fake) -> AsyncIterator[int]:
    """Run ``fake`` on an unused port of 127.0.0.1; yield the port."""
    server = await asyncio.start_server(fake.handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.close()
        for writer in fake.writers:
            writer.transport.abort()
        # Let every handler see its connection end, so none is left to be
        # cancelled when the loop closes.
        if fake.tasks:
            await asyncio.wait(fake.tasks, timeout=5)
        await server.wait_closed()


def data_then(replies: bytes, after_354: bytes = b"", stall: float = 0.0) -> Action:
    """A ``DATA`` action for :class:`Fake`: ``354`` (with ``after_354`` in
    the same write), the message, then ``replies`` — and then, with
    ``stall``, nothing more for that many seconds."""

    async def action(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes):
        writer.write(b"354 go ahead\r\n" + after_354)
        await writer.drain()
        await read_message(reader)
        writer.write(replies)
        if stall:
            await writer.drain()
            await asyncio.sleep(stall)

    return action


async def deliver_through(fake: Fake, recipients: list[str], message: bytes, settings: Any) -> Any:
    """Run ``fake``, deliver ``message`` from a@example.org to ``recipients``
    through it (:func:`bonzo.client.deliver`); the result."""
    from bonzo.client import deliver

    async with serve(fake) as port:
        return await deliver(
            HOST, port, sender="a@example.org", recipients=recipients, message=message,
            settings=settings,
        )  # fmt: skip


def unstuff(data: bytes) -> bytes:
    """The content of a dot-stuffed DATA block (ending ``.\\r\\n``)."""
    assert data.endswith(b".\r\n")
    lines = data[:-3].split(b"\r\n")
    assert lines[-1] == b""
    return b"\r\n".join(line[1:] if line[:1] == b"." else line for line in lines)


class RecordingFile(io.BufferedReader):
    """A binary file that records the largest single read asked of it."""

    def __init__(self, raw: io.RawIOBase) -> None:
        super().__init__(raw)
        self.largest_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if size is None or size < 0:
            self.largest_read = max(self.largest_read, 1 << 62)
        else:
            self.largest_read = max(self.largest_read, len(data))
        return data

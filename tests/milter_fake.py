"""A scripted fake milter for tests, on 127.0.0.1 (or a Unix socket).

It runs its own event loop in a thread, decodes every command with
:func:`bonzo.milter.decode_command` and answers from a script::

    def script(command, session):
        if command.code == m.C_RCPT and "spam" in command.args[0]:
            return [m.Verdict(m.R_REJECT)]
        return None          # the default answer

    with FakeMilter(script) as fake:
        spec = fake.spec      # inet:PORT@127.0.0.1
        ...
        assert [c.code for c in fake.sessions[0].commands][:2] == [b"O", b"D"]

The default answer is ``OPTNEG`` with ``actions``/``protocol`` (what the
fake asks for, default: every action, no protocol flags), nothing to
``MACRO``/``ABORT``/``QUIT``, ``CONTINUE`` to every other command and
``end_of_message`` (a list of responses, default ``[CONTINUE]``) to the end
of the message. A script may return a list of :data:`~bonzo.milter.Response`,
raw ``bytes`` to send as they are, :data:`HANG` (answer nothing), or
:data:`CLOSE` (close the connection).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bonzo import milter as m

HANG = "hang"
CLOSE = "close"


@dataclass
class Trickle:
    """An answer sent ``count`` times, one every ``every`` seconds (a milter
    that keeps sending ``PROGRESS``)."""

    response: Any
    every: float
    count: int


@dataclass
class FakeSession:
    """One connection to the fake: the commands it received, in order."""

    commands: list[m.Command] = field(default_factory=list)
    macros: dict[bytes, dict[str, str]] = field(default_factory=dict)
    closed: bool = False

    def codes(self) -> list[bytes]:
        return [c.code for c in self.commands]

    def of(self, code: bytes) -> list[m.Command]:
        return [c for c in self.commands if c.code == code]


Script = Callable[[m.Command, FakeSession], Any]


class FakeMilter:
    def __init__(
        self,
        script: Script | None = None,
        *,
        actions: int = m.ALL_ACTIONS,
        protocol: int = 0,
        version: int = 6,
        symbols: dict[int, tuple[str, ...]] | None = None,
        end_of_message: list[Any] | None = None,
        unix_path: str | None = None,
    ) -> None:
        self.script = script
        self.options = m.OptionReply(version, actions, protocol, symbols or {})
        self.end_of_message = (
            end_of_message if end_of_message is not None else [m.Verdict(m.R_CONTINUE)]
        )
        self.unix_path = unix_path
        self.sessions: list[FakeSession] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fake-milter", daemon=True)
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def spec(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        return f"inet:{self.port}@127.0.0.1"

    def __enter__(self) -> FakeMilter:
        self._thread.start()
        assert self._ready.wait(10), "fake milter did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await asyncio.sleep(0)
            # A session still being served (a client that has not closed
            # yet) ends here, not as a task destroyed pending with the loop.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        if self.unix_path and os.path.exists(self.unix_path):
            os.unlink(self.unix_path)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            if self.unix_path:
                self._server = await asyncio.start_unix_server(self._serve, self.unix_path)
            else:
                self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
                self.port = self._server.sockets[0].getsockname()[1]

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()

    def _answer(self, command: m.Command, session: FakeSession) -> Any:
        if self.script is not None:
            answer = self.script(command, session)
            if answer is not None:
                return answer
        code = command.code
        if code == m.C_OPTNEG:
            return [self.options]
        if code in (m.C_MACRO, m.C_ABORT, m.C_QUIT, m.C_QUIT_NC):
            return []
        if code == m.C_EOB:
            return self.end_of_message
        return [m.Verdict(m.R_CONTINUE)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = FakeSession()
        self.sessions.append(session)
        self._writers.add(writer)
        decoder = m.FrameDecoder(max_frame=1 << 20)
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    return
                for code, payload in decoder.feed(data):
                    command = m.decode_command(code, payload)
                    session.commands.append(command)
                    if code == m.C_MACRO:
                        session.macros[command.args[0]] = dict(command.args[1])  # type: ignore[call-overload]
                    answer = self._answer(command, session)
                    if answer == HANG:
                        continue
                    if answer == CLOSE:
                        return
                    if isinstance(answer, Trickle):
                        for _ in range(answer.count):
                            await asyncio.sleep(answer.every)
                            writer.write(m.encode_response(answer.response))
                            await writer.drain()
                        continue
                    if isinstance(answer, bytes):
                        writer.write(answer)
                    else:
                        for response in answer:
                            writer.write(
                                response
                                if isinstance(response, bytes)
                                else m.encode_response(response)
                            )
                    await writer.drain()
                    if code == m.C_QUIT:
                        return
        except (ConnectionError, m.MilterProtocolError, asyncio.CancelledError):
            # Cancelled: the fake stops (a session still open); a normal end,
            # so that asyncio does not report the task (Python 3.11 streams).
            return
        finally:
            session.closed = True
            self._writers.discard(writer)
            writer.close()

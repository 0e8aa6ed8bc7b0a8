"""The original (0.1) API in the corners its own tests never covered: an
Application called from a callback, errors after ``finish()``, odd
``SMTPError`` arguments, ``max_buffer_size``. Real clients (smtplib) talk to
a server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import wait_until

from bonzo import errors
from bonzo.hookspecs import Accept
from bonzo.server import SMTPRequest, SMTPServer
from bonzo.smtp import Application, RequestHandler

pytestmark = pytest.mark.timeout(60)


def kind_of(request: SMTPRequest) -> str:
    """The test case a message is for: its first recipient's local part."""
    return request.rcpt[0].split("@")[0]


@pytest.fixture
def smtp(start_server: Callable[..., Any]) -> Iterator[Callable[..., smtplib.SMTP]]:
    """``smtp(callback, **settings)``: an smtplib client that said HELO (the
    0.1 reply texts) to a server running ``callback``."""
    clients: list[smtplib.SMTP] = []

    def connect(callback: Callable[..., Any], esmtp: bool = False, **settings: Any):
        server = start_server(callback, **settings)
        client = smtplib.SMTP(server.host, server.port, timeout=10)
        clients.append(client)
        if esmtp:
            client.ehlo("client.example")
        else:
            client.helo("client.example")
        return client

    yield connect
    for client in clients:
        client.close()


def send(client: smtplib.SMTP, kind: str, body: bytes = b"Subject: hi\r\n\r\nhi\r\n"):
    """One message to ``<kind>@example.com``: the reply to its data."""
    assert client.mail("a@example.com")[0] == 250
    assert client.rcpt(f"{kind}@example.com")[0] == 250
    return client.data(body)


# ------------------------------------------ an Application called by a callback
class Recorder(RequestHandler):
    """Records what it saw; what it does depends on the recipient."""

    def prepare(self) -> Any:
        if kind_of(self.request).startswith("async"):
            return self._later()
        return None

    async def _later(self) -> None:
        await asyncio.sleep(0.01)

    def data(self) -> None:
        kind = kind_of(self.request)
        if kind.endswith("fail"):
            raise RuntimeError("handler failed")
        if kind.endswith("refuse"):
            raise errors.SMTPError(550, "Not here")
        self.settings["seen"].append(kind)


@pytest.mark.parametrize("returned", [False, True], ids=["called", "returned"])
def test_an_application_called_from_a_callback_runs_the_handler(smtp, log_watch, returned):
    # 0.1 code dispatched with app(request), not returning anything: the
    # handler ran. The coroutine it got instead never ran (a "never
    # awaited" warning) and the client waited handler_timeout for a 451.
    seen: list[str] = []
    app = Application(Recorder, seen=seen)

    def route(request: SMTPRequest) -> Any:
        result = app(request)
        return result if returned else None

    client = smtp(route, handler_timeout=5)
    started = time.monotonic()
    assert send(client, "sync") == (250, b"Ok")
    assert send(client, "async") == (250, b"Ok")
    assert seen == ["sync", "async"]
    assert send(client, "asyncrefuse") == (550, b"Not here")
    log_watch.allow("Uncaught exception", "tornado.application")
    assert send(client, "syncfail") == (451, b"Internal confusion")
    assert send(client, "asyncfail") == (451, b"Internal confusion")
    # Each answered at once, none after handler_timeout.
    assert time.monotonic() - started < 4
    assert len(log_watch.matching("Uncaught exception", "tornado.application")) == 2


def test_an_application_runs_a_plain_handler_at_once_without_a_loop():
    # As in 0.1, the handler's plain methods run in the call itself.
    seen: list[str] = []
    request = SMTPRequest(None, "127.0.0.1", "DATA", rcpt=["sync@example.com"], data="hi")
    assert Application(Recorder, seen=seen)(request) is None
    assert seen == ["sync"]
    assert request.finished


def test_a_handler_left_running_is_cancelled_with_a_timeout(smtp, log_watch):
    # The reply decided without it (handler_timeout), a handler the callback
    # started must not go on working on a message the client was told failed.
    states: list[str] = []

    class Slow(RequestHandler):
        async def data(self) -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                states.append("cancelled")
                raise

    app = Application(Slow)

    def route(request: SMTPRequest) -> None:
        app(request)

    client = smtp(route, handler_timeout=0.5)
    log_watch.allow("no answer within")
    assert send(client, "slow")[0] == 451
    deadline = time.monotonic() + 5
    while not states and time.monotonic() < deadline:
        time.sleep(0.02)
    assert states == ["cancelled"]


# ---------------------------------------------- errors after request.finish()
@pytest.mark.parametrize("kind", ["raise", "twice", "refuse"])
def test_a_plain_callback_failing_after_finish_keeps_its_250(smtp, log_watch, kind):
    # 0.1 wrote "250 Ok" at finish(): a later error could not take it back.
    # A 451 now would make the client send the accepted message again.
    def callback(request: SMTPRequest) -> None:
        request.finish()
        if kind == "raise":
            raise RuntimeError("after finish")
        if kind == "twice":
            request.finish()
        raise errors.SMTPError(550, "Too late")

    client = smtp(callback)
    record = None
    reply = send(client, kind)
    record = log_watch.wait_for(r"Uncaught exception \[\w+ 127\.0\.0\.1\] after finish\(\)")
    assert reply == (250, b"Ok")
    assert record.name == "tornado.application" and record.exc_info is not None


# ------------------------------------- any exception from the application is its fault
class LibraryTimeout(BaseException):
    """As gevent's or eventlet's Timeout: a library's BaseException."""


class Failing(RequestHandler):
    async def data(self) -> None:
        await asyncio.sleep(0)
        if kind_of(self.request) == "exits":
            raise SystemExit(1)  # left in its task, it would end the event loop
        raise LibraryTimeout("handler timed out")


def test_a_base_exception_from_the_application_is_its_fault(smtp, log_watch):
    # Not only an Exception: 451 at once (not after handler_timeout), logged,
    # and the server serves on; after finish() the 250 stands.
    app = Application(Failing)

    def callback(request: SMTPRequest) -> None:
        kind = kind_of(request)
        if kind == "plain":
            raise LibraryTimeout("callback timed out")
        if kind == "after":
            request.finish()
            raise LibraryTimeout("after finish")
        app(request)  # the handler runs in a task of its own

    client = smtp(callback, handler_timeout=5)
    log_watch.allow("Uncaught exception", "tornado.application")
    started = time.monotonic()
    for kind in ("plain", "handler", "exits"):
        assert send(client, kind) == (451, b"Internal confusion"), kind
    assert time.monotonic() - started < 4
    assert send(client, "after") == (250, b"Ok")
    records = log_watch.matching("Uncaught exception", "tornado.application")
    assert [r.exc_info[0] for r in records if r.exc_info] == [
        LibraryTimeout,
        LibraryTimeout,
        SystemExit,
        LibraryTimeout,
    ]
    assert "after finish()" in records[-1].getMessage()


def test_a_base_exception_from_a_close_callback_is_logged(start_server, log_watch):
    closed: list[str] = []

    def on_close() -> None:
        closed.append("called")
        raise LibraryTimeout("close callback timed out")

    def callback(request: SMTPRequest) -> None:
        request.connection.set_close_callback(on_close)
        request.finish()

    server = start_server(callback)
    log_watch.allow("Exception in close callback", "tornado.application")
    for _ in range(2):  # the first did not end the server's loop
        with smtplib.SMTP(server.host, server.port, timeout=10) as client:
            client.helo("client.example")
            assert send(client, "closing") == (250, b"Ok")
    pattern = "Exception in close callback"
    wait_until(lambda: len(log_watch.matching(pattern)) == 2, message="both errors logged")
    records = log_watch.matching(pattern)
    assert [r.exc_info[0] for r in records if r.exc_info] == [LibraryTimeout, LibraryTimeout]
    assert closed == ["called", "called"]


# ------------------------------------------------------ odd SMTPError arguments
def test_a_log_message_that_does_not_format_still_sends_the_reply(smtp, log_watch):
    # 0.1 wrote the reply; only its logging complained. A TypeError from
    # the formatting made it 451 Internal confusion.
    def callback(request: SMTPRequest) -> None:
        if kind_of(request) == "percent":
            raise errors.SMTPError(452, "Disk full", "disk is 100% full")
        raise errors.SMTPError(452, "Disk full", "disk %s on %s", "sda")

    client = smtp(callback)
    assert send(client, "percent") == (452, b"Disk full")
    assert send(client, "fewargs") == (452, b"Disk full")
    assert log_watch.matching(r"^452 disk is 100% full \[", "tornado.general")
    assert log_watch.matching(r"^452 disk %s on %s \('sda',\) \[", "tornado.general")


def test_a_plugin_log_message_that_does_not_format_still_sends_the_reply(start_server, log_watch):
    # The same in the daemon's plugin API (a refusal is logged with it).
    class Refuser:
        def bonzo_rcpt(self, address: str) -> None:
            raise errors.SMTPError(452, "Try later", "quota %s of %s", "bob")

    server = start_server(plugin=Refuser())
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("client.example")
        assert client.mail("a@example.com")[0] == 250
        assert client.rcpt("bob@example.com") == (452, b"4.0.0 Try later")
    assert log_watch.matching(r"^452 quota %s of %s \('bob',\) \[", "tornado.general")


def test_str_of_an_error_whose_log_message_does_not_format():
    assert str(errors.SMTPError(452, "Full", "disk is 100% full")) == (
        "SMTP 452: Full (disk is 100% full)"
    )
    assert str(errors.SMTPError(452, "Full", "%s on %s", "sda")) == (
        "SMTP 452: Full (%s on %s ('sda',))"
    )
    # Formatted even without arguments, as 0.1 did.
    assert str(errors.SMTPError(452, "Full", "disk 50%% used")) == "SMTP 452: Full (disk 50% used)"
    assert str(errors.SMTPError(452, "Full", "disk %s", "sda")) == "SMTP 452: Full (disk sda)"


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (42, "42"),
        (None, "None"),
        (b"No", "No"),
        (b"caf\xc3\xa9 \xff", "caf\u00e9 \ufffd"),
        (["one", "two"], "one\ntwo"),
        (("one",), "one"),
        ([1, 2], "[1, 2]"),
        (3.5, "3.5"),
    ],
)
def test_an_error_message_may_be_any_object(message, text):
    # 0.1 used the message only through "%s": any object worked.
    error = errors.SMTPError(550, message)
    assert error.message == text
    assert str(error) == f"SMTP 550: {text}"


def test_an_error_with_an_int_message_is_sent(smtp):
    def callback(request: SMTPRequest) -> None:
        raise errors.SMTPError(550, 42)

    assert send(smtp(callback), "int") == (550, b"42")


# ---------------------------------------------------- a 2xx SMTPError at DATA
@pytest.mark.parametrize("esmtp", [False, True], ids=["helo", "ehlo"])
def test_a_2xx_error_from_a_callback_accepts_the_message(smtp, log_watch, esmtp):
    # 0.1 wrote any SMTPError as the reply to the data: "250 Queued as ABC".
    accepted = []

    def callback(request: SMTPRequest) -> Any:
        accepted.append(kind_of(request))
        if kind_of(request) == "async":

            async def later() -> None:
                raise errors.SMTPError(250, "Queued as DEF", "queued %s", "DEF")

            return later()
        raise errors.SMTPError(250, "Queued as ABC")

    client = smtp(callback, esmtp=esmtp)
    prefix = b"2.0.0 " if esmtp else b""
    assert send(client, "sync") == (250, prefix + b"Queued as ABC")
    assert send(client, "async") == (250, prefix + b"Queued as DEF")
    assert log_watch.matching(r"^250 queued DEF \[", "tornado.general")
    assert accepted == ["sync", "async"]


def test_a_2xx_error_s_log_message_cannot_forge_a_log_line(smtp, log_watch):
    # Its arguments may be what the sender wrote: escaped, as in a refusal's line.
    def callback(request: SMTPRequest) -> None:
        raise errors.SMTPError(250, "Queued", "queued %s", "X\r\n2026 INFO forged\u2028")

    assert send(smtp(callback), "queued") == (250, b"Queued")
    [record] = log_watch.matching(r"^250 queued ", "tornado.general")
    assert record.getMessage().startswith(r"250 queued X\r\n2026 INFO forged\u2028 [")


def test_a_2xx_error_from_a_plugin_still_fails_closed(start_server, log_watch):
    # Plugins accept with Accept; an "error" saying all is well is a fault.
    class Odd:
        def bonzo_rcpt(self) -> Accept:
            return Accept()

        def bonzo_deliver(self) -> None:
            raise errors.SMTPError(250, "Queued")

    server = start_server(plugin=Odd())
    log_watch.allow("non-error code 250")
    with smtplib.SMTP(server.host, server.port, timeout=10) as client:
        client.ehlo("client.example")
        assert send(client, "odd")[0] == 451


# ------------------------------------------------------------- max_buffer_size
def test_max_buffer_size_caps_the_message(smtp):
    # 0.1 read the whole message into the stream's buffer: max_buffer_size
    # was its cap. Now read in chunks, the cap is kept as the message limit.
    def callback(request: SMTPRequest) -> None:
        request.finish()

    client = smtp(callback, max_buffer_size=64 * 1024)
    line = b"x" * 998 + b"\r\n"
    assert send(client, "small", line * 30)[0] == 250
    assert send(client, "big", line * 200)[0] == 552


def test_max_buffer_size_and_max_message_size_the_smaller_wins():
    def callback(request: SMTPRequest) -> None:
        request.finish()

    default = SMTPServer(callback).settings.max_message_size
    assert SMTPServer(callback, max_buffer_size=1000).settings.max_message_size == 1000
    assert SMTPServer(callback, max_buffer_size=10 * default).settings.max_message_size == default
    assert (
        SMTPServer(callback, max_buffer_size=1000, max_message_size=500).settings.max_message_size
        == 500
    )
    # No message limit (0): max_buffer_size is the limit.
    assert (
        SMTPServer(callback, max_buffer_size=1000, max_message_size=0).settings.max_message_size
        == 1000
    )


# ------------------------------------------- documented changes from 0.1
DOC = (Path(__file__).parent.parent / "docs" / "original-api.rst").read_text()


def documented(text: str) -> bool:
    """True when ``text`` is in docs/original-api.rst (line breaks aside)."""
    return " ".join(text.split()) in " ".join(DOC.split())


def test_vrfy_and_help_answer_as_documented(smtp):
    # 0.1 answered both 502; the page's "What changed" gives the new replies.
    client = smtp(lambda request: request.finish())
    code, text = client.verify("someone")
    assert code == 252 and documented(f"``{code} {text.decode()}``")
    code, text = client.docmd("HELP")
    assert code == 214 and documented(f"``{code} {text.decode()}``")
    assert documented('``502 Error: command "VRFY" not implemented``')


def test_the_connection_keeps_the_documented_members_of_0_1(smtp):
    # What the page says is left of 0.1's SMTPConnection is there; what it
    # says is gone is named there.
    seen: list[Any] = []

    def callback(request: SMTPRequest) -> None:
        seen.append(request.connection)
        request.finish()

    assert send(smtp(callback), "ok") == (250, b"Ok")
    connection = seen[0]
    assert connection.remote_ip == "127.0.0.1"
    assert connection.address[0] == "127.0.0.1" and connection.stream is not None
    assert callable(connection.close) and callable(connection.set_close_callback)
    for member in ("remote_ip", "stream", "address", "close()", "set_close_callback()"):
        assert documented(f"``{member}``")
    for gone in ("write", "write_ok", "reset_arguments", "log_exception", "command_helo"):
        assert not hasattr(connection, gone)
    assert documented("``reset_arguments()``, ``log_exception()`` and the ``command_*`` methods")

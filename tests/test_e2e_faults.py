"""End to end when things go wrong: disconnects, handler faults, shutdown."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import tempfile
import threading
import time

import pytest
from e2e_support import RawClient, RecordingHandler, fds_under, wait_until

from bonzo import errors

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cr3t-exception-text"


def send_message(client: RawClient, rcpt: str = "bob@example.com", body: bytes = b"hi\r\n"):
    assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250")
    assert client.command(f"RCPT TO:<{rcpt}>").startswith(b"250")
    assert client.command("DATA").startswith(b"354")
    client.send(body + b".\r\n")
    return client.reply()


# -------------------------------------------------------------- disconnects
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("how", ["close", "reset"])
def test_disconnect_mid_data_leaves_nothing_behind(start_server, tmp_path, how):
    server = start_server(spool_dir=str(tmp_path), spool_threshold=1024)
    client = RawClient(server.port)
    try:
        client.greet()
        assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<bob@example.com>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        part = b"Subject: cut short\r\n\r\n" + b"line of content\r\n" * 6000
        sent_before = server.connections()[0].bytes_received
        client.send(part)
        wait_until(
            lambda: server.connections()[0].bytes_received - sent_before >= len(part),
            message="the server to read the partial message",
        )
        # Past spool_threshold: the content is in a file in spool_dir.
        assert fds_under(tmp_path), "expected a spool file under spool_dir"
        if how == "reset":
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        client.close()
    wait_until(lambda: server.handler.disconnected, message="on_disconnect")
    server.wait_connections(0)
    wait_until(lambda: not fds_under(tmp_path), message="the spool file to be closed")
    assert os.listdir(tmp_path) == []
    assert server.handler.messages == []
    # The server keeps serving others.
    with RawClient(server.port) as other:
        other.greet()
        assert send_message(other).startswith(b"250 2.0.0 Ok")
    assert len(server.handler.messages) == 1


def test_disconnect_while_handler_runs_still_calls_on_disconnect(start_server):
    class Slow(RecordingHandler):
        entered = threading.Event()

        async def on_message(self, session, envelope):
            self.entered.set()
            await asyncio.sleep(0.3)
            return super().on_message(session, envelope)

    server = start_server(handler=Slow())
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<bob@example.com>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        client.send(b"bye\r\n.\r\n")
        assert Slow.entered.wait(5)
    wait_until(lambda: server.handler.disconnected, message="on_disconnect")
    server.wait_connections(0)


# ------------------------------------------------------------ handler faults
class Faulty(RecordingHandler):
    """Raises an unexpected exception in the hook named by the recipient
    (``mail@`` fails at MAIL for sender ``mail@``)."""

    def on_mail(self, session, envelope):
        if envelope.mail_from.startswith("mail@"):
            raise RuntimeError(SECRET)
        return super().on_mail(session, envelope)

    def on_rcpt(self, session, envelope, address, params):
        if address.startswith("rcpt@"):
            raise KeyError(SECRET)

    def on_data(self, session, envelope):
        if envelope.rcpt_tos[0].startswith("data@"):
            raise ValueError(SECRET)

    async def on_message(self, session, envelope):
        await asyncio.sleep(0)
        if envelope.rcpt_tos[0].startswith("message@"):
            raise OSError(SECRET)
        return super().on_message(session, envelope)


def _transaction_until_failure(client: RawClient, hook: str) -> bytes:
    sender = "mail@example.com" if hook == "mail" else "alice@example.com"
    reply = client.command(f"MAIL FROM:<{sender}>")
    if hook == "mail":
        return reply
    assert reply.startswith(b"250")
    reply = client.command(f"RCPT TO:<{hook}@example.com>")
    if hook == "rcpt":
        return reply
    assert reply.startswith(b"250")
    reply = client.command("DATA")
    if hook == "data":
        return reply
    assert reply.startswith(b"354")
    client.send(b"Subject: doomed\r\n\r\nbody\r\n.\r\n")
    return client.reply()


@pytest.mark.parametrize("hook", ["mail", "rcpt", "data", "message"])
@pytest.mark.parametrize("greeting", ["EHLO", "HELO"])
def test_handler_exception_is_451_logged_never_on_the_wire(start_server, log_watch, hook, greeting):
    server = start_server(handler=Faulty())
    esmtp = greeting == "EHLO"
    with RawClient(server.port) as client:
        client.greet(ehlo=None)
        assert client.command(f"{greeting} client.test").startswith(b"250")
        reply = _transaction_until_failure(client, hook)
        expected = b"451 4.3.0 Internal confusion\r\n" if esmtp else b"451 Internal confusion\r\n"
        assert reply == expected
        record = log_watch.wait_for("Uncaught exception", logger="tornado.application")
        assert record.exc_info is not None and SECRET in str(record.exc_info[1])
        # The session is still usable.
        assert client.command("RSET") == (b"250 2.0.0 Ok\r\n" if esmtp else b"250 Ok\r\n")
        assert send_message(client).startswith(b"250")
        client.send(b"QUIT\r\n")
        everything = client.read_to_eof()
    assert SECRET.encode() not in everything + reply
    assert [m.rcpt_tos for m in server.handler.messages] == [["bob@example.com"]]


def test_smtp_error_from_handler_is_the_reply(start_server):
    class Refusing(RecordingHandler):
        def on_rcpt(self, session, envelope, address, params):
            if address.startswith("nobody@"):
                raise errors.SMTPError(
                    550, "No such user here", "refused %s", address, enhanced_code="5.1.1"
                )

    server = start_server(handler=Refusing())
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>") == b"250 2.1.0 Ok\r\n"
        assert client.command("RCPT TO:<nobody@example.com>") == b"550 5.1.1 No such user here\r\n"
        assert client.command("RCPT TO:<bob@example.com>") == b"250 2.1.5 Ok\r\n"
        assert client.command("DATA").startswith(b"354")
        client.send(b"x\r\n.\r\n")
        assert client.reply().startswith(b"250")
    (delivered,) = server.handler.messages
    assert delivered.rcpt_tos == ["bob@example.com"]


def test_handler_timeout_is_451_and_the_session_goes_on(start_server, log_watch):
    class Stalling(RecordingHandler):
        cancelled = threading.Event()

        async def on_rcpt(self, session, envelope, address, params):
            if address.startswith("slow@"):
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise

    server = start_server(handler=Stalling(), handler_timeout=0.3)
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>") == b"250 2.1.0 Ok\r\n"
        started = time.monotonic()
        assert client.command("RCPT TO:<slow@example.com>") == b"451 4.3.0 Internal confusion\r\n"
        assert 0.25 <= time.monotonic() - started < 2.0
        log_watch.wait_for("Timeout .*RCPT took longer than 0.3s", logger="tornado.application")
        # The stalled call was cancelled, not left running.
        assert Stalling.cancelled.wait(5)
        assert client.command("RSET") == b"250 2.0.0 Ok\r\n"
        assert send_message(client).startswith(b"250 2.0.0 Ok")


def test_callback_that_never_finishes_times_out_with_451(start_server, log_watch):
    server = start_server(lambda request: None, handler_timeout=0.3)
    with RawClient(server.port) as client:
        client.greet(ehlo=None)
        assert client.command("HELO client.test") == b"250 Hello 127.0.0.1\r\n"
        assert send_message(client) == b"451 Internal confusion\r\n"
        log_watch.wait_for(
            "Uncaught exception.*'request_callback' .bonzo_deliver.: no answer within 0.3s",
            logger="tornado.application",
        )
        assert client.command("RSET") == b"250 Ok\r\n"


def test_exception_in_on_connect_refuses_the_connection(start_server, log_watch):
    class Refuse(RecordingHandler):
        def on_connect(self, session):
            raise RuntimeError(SECRET)

    server = start_server(handler=Refuse())
    with RawClient(server.port) as client:
        everything = client.read_to_eof()
    # A transient refusal, then the close. 421 is the only 4xx a greeting
    # may be (RFC 5321 3.1, 4.2.5); 451 would not be one.
    assert everything == b"421 Service not available, closing transmission channel\r\n"
    assert SECRET.encode() not in everything
    log_watch.wait_for("Uncaught exception", logger="tornado.application")
    server.wait_connections(0)


def test_exception_in_observer_hooks_is_only_logged(start_server, log_watch):
    class Noisy(RecordingHandler):
        def on_accepted(self, session, envelope):
            raise RuntimeError(SECRET)

        def on_reset(self, session):
            raise RuntimeError(SECRET)

        def on_disconnect(self, session):
            super().on_disconnect(session)
            raise RuntimeError(SECRET)

    server = start_server(handler=Noisy())
    log_watch.allow("Uncaught exception", logger="tornado.application")
    with RawClient(server.port) as client:
        client.greet()
        assert send_message(client).startswith(b"250 2.0.0 Ok")
        assert client.command("RSET") == b"250 2.0.0 Ok\r\n"
        assert client.command("NOOP") == b"250 2.0.0 Ok\r\n"
        client.send(b"QUIT\r\n")
        assert client.read_to_eof() == b"221 2.0.0 Bye\r\n"
    wait_until(lambda: server.handler.disconnected, message="on_disconnect")
    wait_until(
        lambda: len(log_watch.matching("Uncaught exception")) == 3, message="three logged errors"
    )
    assert len(server.handler.messages) == 1


# ---------------------------------------------------------------- shutdown
class Gate(RecordingHandler):
    """on_message for ``slow@`` waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    async def on_message(self, session, envelope):
        if envelope.rcpt_tos[0].startswith("slow@"):
            self.entered.set()
            for _ in range(1000):  # bounded: at most 10 s
                if self.release.is_set():
                    break
                await asyncio.sleep(0.01)
        return super().on_message(session, envelope)


def test_graceful_shutdown(start_server):
    grace = 1.0
    handler = Gate()
    server = start_server(handler=handler)
    idle = RawClient(server.port)
    in_flight = RawClient(server.port)
    stuck = RawClient(server.port)
    try:
        idle.greet()
        in_flight.greet()
        stuck.greet()
        # A message whose handler is still working.
        assert in_flight.command("MAIL FROM:<a@example.com>").startswith(b"250")
        assert in_flight.command("RCPT TO:<slow@example.com>").startswith(b"250")
        assert in_flight.command("DATA").startswith(b"354")
        in_flight.send(b"Subject: in flight\r\n\r\nbody\r\n.\r\n")
        assert handler.entered.wait(5)
        # A client in the middle of DATA that will not finish in time.
        assert stuck.command("MAIL FROM:<a@example.com>").startswith(b"250")
        assert stuck.command("RCPT TO:<b@example.com>").startswith(b"250")
        assert stuck.command("DATA").startswith(b"354")
        stuck.send(b"Subject: never finished\r\n\r\npartial")

        async def shutdown():
            await server.server.shutdown(grace)
            # What is left the moment shutdown() returns.
            return len(server.server.connections), len(handler.disconnected)

        started = time.monotonic()
        done = server.submit(shutdown())
        # Idle sessions are told at once.
        assert idle.read_to_eof() == b"421 4.3.2 Server shutting down\r\n"
        assert time.monotonic() - started < grace
        # No new connections.
        with pytest.raises(OSError):
            RawClient(server.port, timeout=1).close()
        # The message in flight completes, then the session is closed.
        handler.release.set()
        tail = in_flight.read_to_eof()
        assert tail.startswith(b"250 2.0.0 Ok: queued as ")
        assert tail.endswith(b"\r\n421 4.3.2 Server shutting down\r\n")
        assert time.monotonic() - started < grace
        # The rest are closed once the grace period is over.
        rest = stuck.read_to_eof(timeout=grace + 3)
        assert rest == b"421 4.3.2 Server shutting down\r\n"
        assert time.monotonic() - started >= grace * 0.9
        # When shutdown() returns, every session has been cleaned up.
        assert done.result(5) == (0, 3)
    finally:
        for client in (idle, in_flight, stuck):
            client.close()
    assert [m.rcpt_tos for m in handler.messages] == [["slow@example.com"]]


def test_shutdown_with_no_connections_returns_at_once(server):
    started = time.monotonic()
    server.run(server.server.shutdown(5))
    assert time.monotonic() - started < 1


# ----------------------------------------------------------- storage faults
@pytest.mark.parametrize("greeting", ["EHLO", "HELO"])
def test_spool_failure_is_451_after_the_data_and_the_session_goes_on(
    start_server, tmp_path, log_watch, greeting
):
    # A spool directory that does not exist: the body cannot be spooled.
    server = start_server(spool_dir=str(tmp_path / "missing"), spool_threshold=1024)
    with RawClient(server.port) as client:
        client.greet(ehlo=None)
        assert client.command(f"{greeting} client.test").startswith(b"250")
        assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<bob@example.com>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        # Two sends, the server reading the first before the second comes,
        # so that the content arrives in more than one piece.
        first = b"Subject: big\r\n\r\n" + b"spool me\r\n" * 2000
        before = server.connections()[0].bytes_received
        client.send(first)
        wait_until(
            lambda: server.connections()[0].bytes_received - before >= len(first),
            message="the server to read the first part",
        )
        client.send(b"more\r\n" * 100 + b".\r\n")
        reply = client.reply()
        if greeting == "EHLO":
            assert reply == b"451 4.3.0 Internal confusion\r\n"
        else:
            assert reply == b"451 Internal confusion\r\n"
        log_watch.wait_for("Uncaught exception", logger="tornado.application")
        assert client.command("RSET").startswith(b"250")
        # A message small enough to stay in memory still goes through.
        assert send_message(client).startswith(b"250")
    assert [m.size for m in server.handler.messages] == [len(b"hi\r\n")]


def test_full_disk_is_452_4_3_1(start_server, log_watch, monkeypatch):
    import bonzo.session

    real_temporary_file = tempfile.TemporaryFile

    def full_disk(*args, **kwargs):
        """A spool file on a full disk: created, but every write fails."""
        spool = real_temporary_file(*args, **kwargs)

        def fail(*_):
            raise OSError(errno.ENOSPC, "No space left on device")

        spool.write = fail
        spool.writelines = fail
        return spool

    monkeypatch.setattr(bonzo.session.tempfile, "TemporaryFile", full_disk)
    server = start_server(spool_threshold=1024)
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<bob@example.com>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        client.send(b"Subject: big\r\n\r\n" + b"no room\r\n" * 1000 + b".\r\n")
        assert client.reply() == b"452 4.3.1 Insufficient system storage\r\n"
        log_watch.wait_for("Uncaught exception", logger="tornado.application")
        assert client.command("RSET") == b"250 2.0.0 Ok\r\n"

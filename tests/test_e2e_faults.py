"""End to end when things go wrong: disconnects, plugin faults, shutdown."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import struct
import tempfile
import threading
import time

import pytest
from e2e_support import RawClient, RecordingPlugin, fds_under, wait_until

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
    wait_until(lambda: server.plugin.disconnected, message="bonzo_disconnect")
    server.wait_connections(0)
    wait_until(lambda: not fds_under(tmp_path), message="the spool file to be closed")
    assert os.listdir(tmp_path) == []
    assert server.plugin.messages == []
    # The server keeps serving others.
    with RawClient(server.port) as other:
        other.greet()
        assert send_message(other).startswith(b"250 2.0.0 Ok")
    assert len(server.plugin.messages) == 1


def test_disconnect_while_a_plugin_runs_still_calls_bonzo_disconnect(start_server):
    class Slow(RecordingPlugin):
        entered = threading.Event()

        async def bonzo_deliver(self, session, envelope):
            self.entered.set()
            await asyncio.sleep(0.3)
            return super().bonzo_deliver(session, envelope)

    server = start_server(plugin=Slow())
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<bob@example.com>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        client.send(b"bye\r\n.\r\n")
        assert Slow.entered.wait(5)
    wait_until(lambda: server.plugin.disconnected, message="bonzo_disconnect")
    server.wait_connections(0)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_client_that_shuts_its_side_still_gets_every_reply(start_server, chunked):
    """A client may send its last commands (the content and QUIT, or a whole
    pipelined transaction) and shut its side of the connection: the replies,
    the 250 for a message stored among them, must still reach it, whatever a
    plugin is doing when the end of its stream arrives."""

    class Slow(RecordingPlugin):
        async def bonzo_deliver(self, session, envelope):
            await asyncio.sleep(0.3)
            return super().bonzo_deliver(session, envelope)

    server = start_server(plugin=Slow())
    with RawClient(server.port) as client:
        client.greet()
        if chunked:
            client.send(
                b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\n"
                b"BDAT 5 LAST\r\nhello"
            )
            expected = [b"250 2.1.0 ", b"250 2.1.5 ", b"250 2.0.0 Ok: queued as "]
        else:
            assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250")
            assert client.command("RCPT TO:<bob@example.com>").startswith(b"250")
            assert client.command("DATA").startswith(b"354")
            client.send(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            expected = [b"250 2.0.0 Ok: queued as ", b"221 2.0.0 Bye"]
        client.sock.shutdown(socket.SHUT_WR)
        rest = client.read_to_eof(timeout=5)
    replies = rest.split(b"\r\n")[:-1]
    assert len(replies) == len(expected), rest
    for reply, start in zip(replies, expected, strict=True):
        assert reply.startswith(start), rest
    assert len(server.plugin.messages) == 1


# ------------------------------------------------------------ handler faults
class Faulty(RecordingPlugin):
    """Raises an unexpected exception in the hook named by the recipient
    (``mail@`` fails at MAIL for sender ``mail@``)."""

    def bonzo_mail(self, session, envelope):
        if envelope.mail_from.startswith("mail@"):
            raise RuntimeError(SECRET)
        return super().bonzo_mail(session, envelope)

    def bonzo_rcpt(self, address):
        if address.startswith("rcpt@"):
            raise KeyError(SECRET)
        return super().bonzo_rcpt()

    def bonzo_data(self, envelope):
        if envelope.rcpt_tos[0].startswith("data@"):
            raise ValueError(SECRET)

    async def bonzo_deliver(self, session, envelope):
        await asyncio.sleep(0)
        if envelope.rcpt_tos[0].startswith("message@"):
            raise OSError(SECRET)
        return super().bonzo_deliver(session, envelope)


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
def test_plugin_exception_is_451_logged_never_on_the_wire(start_server, log_watch, hook, greeting):
    server = start_server(plugin=Faulty())
    with RawClient(server.port) as client:
        client.greet(ehlo=None)
        assert client.command(f"{greeting} client.test").startswith(b"250")
        reply = _transaction_until_failure(client, hook)
        # Enhanced codes after HELO too (RFC 2034 4).
        assert reply == b"451 4.3.0 Internal confusion\r\n"
        record = log_watch.wait_for(
            r"Uncaught exception \[\w+ 127\.0\.0\.1\] in plugin 'Faulty' \(bonzo_",
            logger="tornado.application",
        )
        assert record.exc_info is not None and SECRET in str(record.exc_info[1])
        # The session is still usable.
        assert client.command("RSET") == b"250 2.0.0 Ok\r\n"
        assert send_message(client).startswith(b"250")
        client.send(b"QUIT\r\n")
        everything = client.read_to_eof()
    assert SECRET.encode() not in everything + reply
    assert [m.rcpt_tos for m in server.plugin.messages] == [["bob@example.com"]]


def test_smtp_error_from_a_plugin_is_the_reply_and_one_log_line(start_server, log_watch):
    class Refusing(RecordingPlugin):
        def bonzo_rcpt(self, address):
            if address.startswith("nobody@"):
                raise errors.SMTPError(
                    550, "No such user here", "refused %s", address, enhanced_code="5.1.1"
                )
            return super().bonzo_rcpt()

    server = start_server(plugin=Refusing())
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>") == b"250 2.1.0 Ok\r\n"
        assert client.command("RCPT TO:<nobody@example.com>") == b"550 5.1.1 No such user here\r\n"
        record = log_watch.wait_for(r"^550 refused nobody@example\.com \[", "tornado.general")
        assert "RCPT refused by Refusing: 550 5.1.1 No such user here" in record.getMessage()
        assert client.command("RCPT TO:<bob@example.com>") == b"250 2.1.5 Ok\r\n"
        assert client.command("DATA").startswith(b"354")
        client.send(b"x\r\n.\r\n")
        assert client.reply().startswith(b"250")
    (delivered,) = server.plugin.messages
    assert delivered.rcpt_tos == ["bob@example.com"]


def test_plugin_timeout_is_451_and_the_session_goes_on(start_server, log_watch):
    class Stalling(RecordingPlugin):
        cancelled = threading.Event()

        async def bonzo_rcpt(self, address):
            if address.startswith("slow@"):
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    self.cancelled.set()
                    raise
            return super().bonzo_rcpt()

    server = start_server(plugin=Stalling(), timeout=0.3)
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>") == b"250 2.1.0 Ok\r\n"
        started = time.monotonic()
        assert client.command("RCPT TO:<slow@example.com>") == b"451 4.3.0 Internal confusion\r\n"
        assert 0.25 <= time.monotonic() - started < 2.0
        log_watch.wait_for(
            r"in plugin 'Stalling' \(bonzo_rcpt\): no answer within 0.3s",
            logger="tornado.application",
        )
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


def test_exception_in_bonzo_connect_refuses_the_connection(start_server, log_watch):
    class Refuse(RecordingPlugin):
        def bonzo_connect(self, session):
            raise RuntimeError(SECRET)

    server = start_server(plugin=Refuse())
    with RawClient(server.port) as client:
        everything = client.read_to_eof()
    # A transient refusal, then the close. 421 is the only 4xx a greeting
    # may be (RFC 5321 3.1, 4.2.5); 451 would not be one.
    assert everything == b"421 4.3.0 Service not available, closing transmission channel\r\n"
    assert SECRET.encode() not in everything
    log_watch.wait_for("Uncaught exception", logger="tornado.application")
    server.wait_connections(0)


def test_exception_in_observer_hooks_is_only_logged(start_server, log_watch):
    class Noisy(RecordingPlugin):
        def bonzo_accepted(self, session, envelope):
            raise RuntimeError(SECRET)

        def bonzo_rset(self, session):
            raise RuntimeError(SECRET)

        def bonzo_disconnect(self, session):
            super().bonzo_disconnect(session)
            raise RuntimeError(SECRET)

    server = start_server(plugin=Noisy())
    log_watch.allow("Uncaught exception", logger="tornado.application")
    with RawClient(server.port) as client:
        client.greet()
        assert send_message(client).startswith(b"250 2.0.0 Ok")
        assert client.command("RSET") == b"250 2.0.0 Ok\r\n"
        assert client.command("NOOP") == b"250 2.0.0 Ok\r\n"
        client.send(b"QUIT\r\n")
        assert client.read_to_eof() == b"221 2.0.0 Bye\r\n"
    wait_until(lambda: server.plugin.disconnected, message="bonzo_disconnect")
    wait_until(
        lambda: len(log_watch.matching("Uncaught exception")) == 3, message="three logged errors"
    )
    assert len(server.plugin.messages) == 1


# ---------------------------------------------------------------- shutdown
class Gate(RecordingPlugin):
    """Delivery for ``slow@`` waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    async def bonzo_deliver(self, session, envelope):
        if envelope.rcpt_tos[0].startswith("slow@"):
            self.entered.set()
            for _ in range(1000):  # bounded: at most 10 s
                if self.release.is_set():
                    break
                await asyncio.sleep(0.01)
        return super().bonzo_deliver(session, envelope)


def test_graceful_shutdown(start_server):
    grace = 1.0
    handler = Gate()
    server = start_server(plugin=handler)
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


def test_a_transaction_pipelined_behind_the_message_in_flight_gets_the_421(start_server):
    """A stop lets the message in flight finish; the commands pipelined
    behind it (the next transaction) are not run but answered 421, as a
    session waiting for a command is (they were dispatched and the next
    message accepted)."""
    handler = Gate()
    server = start_server(plugin=handler)
    client = RawClient(server.port)
    try:
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<slow@example.com>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        client.send(
            b"Subject: in flight\r\n\r\nbody\r\n.\r\n"
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
            b"Subject: behind it\r\n\r\nbody\r\n.\r\n"
        )
        assert handler.entered.wait(5)
        done = server.submit(server.server.shutdown(5.0))
        handler.release.set()
        tail = client.read_to_eof()
        assert tail.startswith(b"250 2.0.0 Ok: queued as "), tail
        assert tail.count(b"\r\n") == 2 and tail.endswith(b"\r\n421 4.3.2 Server shutting down\r\n")
        done.result(5)
    finally:
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
        assert reply == b"451 4.3.0 Internal confusion\r\n"
        log_watch.wait_for(r"storing message \w+ failed", logger="tornado.general")
        assert client.command("RSET").startswith(b"250")
        # A message small enough to stay in memory still goes through.
        assert send_message(client).startswith(b"250")
    assert [m.size for m in server.plugin.messages] == [len(b"hi\r\n")]


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
        log_watch.wait_for(r"storing message \w+ failed: .*No space left", "tornado.general")
        assert client.command("RSET") == b"250 2.0.0 Ok\r\n"


def test_spool_close_after_a_full_disk_still_answers_452(start_server, log_watch, monkeypatch):
    """Closing a spool file flushes what its buffer holds, which fails again
    on a full disk: that second failure must not turn 452 into 451."""
    import bonzo.session

    real_temporary_file = tempfile.TemporaryFile

    def full_disk(*args, **kwargs):
        spool = real_temporary_file(*args, **kwargs)
        real_close = spool.close

        def fail(*_):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close():
            real_close()
            fail()

        spool.write = fail
        spool.writelines = fail
        spool.close = close
        return spool

    monkeypatch.setattr(bonzo.session.tempfile, "TemporaryFile", full_disk)
    server = start_server(spool_threshold=1024)
    with RawClient(server.port) as client:
        client.greet()
        for _ in range(2):
            assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250")
            assert client.command("RCPT TO:<bob@example.com>").startswith(b"250")
            assert client.command("DATA").startswith(b"354")
            client.send(b"Subject: big\r\n\r\n" + b"no room\r\n" * 1000 + b".\r\n")
            assert client.reply() == b"452 4.3.1 Insufficient system storage\r\n"
        log_watch.allow(r"storing message \w+ failed", "tornado.general")
    assert not log_watch.matching("Uncaught exception")


def test_a_plugin_that_raises_a_full_disk_error_gets_452(start_server, log_watch):
    class Full(RecordingPlugin):
        def bonzo_deliver(self, session, envelope):
            raise OSError(errno.ENOSPC, "No space left on device")

    server = start_server(plugin=Full())
    with RawClient(server.port) as client:
        client.greet()
        assert send_message(client) == b"452 4.3.1 Insufficient system storage\r\n"
    assert failures_logged(log_watch, "Full", "bonzo_deliver")


def failures_logged(log_watch, plugin: str, hook: str) -> list:
    pattern = f"in plugin '{plugin}' \\({hook}\\)"
    log_watch.allow(pattern)
    return log_watch.matching(pattern)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("pipelined", [b"MAIL FROM:<c@example.com>", b"XCLIENT ADDR=192.0.2.9"])
def test_grace_period_ends_while_a_plugin_delivers(start_server, tmp_path, log_watch, pipelined):
    """The grace period is over while bonzo_deliver still runs: the delivery
    finishes, the client is told 250 for it and then 421 (not 421 for a
    message kept, which it would send again), its bonzo_accepted observers
    run, a command pipelined after the dot is not run, the spool file is
    closed, and only then does shutdown() return (so that bonzo_shutdown
    never runs beside bonzo_deliver)."""
    order: list[str] = []
    entered = threading.Event()

    class SlowDelivery(RecordingPlugin):
        async def bonzo_deliver(self, session, envelope):
            order.append("deliver start")
            entered.set()
            await asyncio.sleep(0.8)
            order.append("deliver end")
            return super().bonzo_deliver(session, envelope)

        def bonzo_accepted(self, envelope):
            order.append("accepted")

        def bonzo_disconnect(self, session):
            order.append("disconnect")

    from bonzo.settings import ListenerSettings

    server = start_server(
        plugin=SlowDelivery(),
        spool_dir=str(tmp_path),
        spool_threshold=1024,
        listener=ListenerSettings(xclient_trusted=["127.0.0.0/8"]),
    )
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<b@example.com>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        # A command pipelined after the dot, in the same write: not run.
        client.send(
            b"Subject: big\r\n\r\n" + b"spooled line\r\n" * 200 + b".\r\n" + pipelined + b"\r\n"
        )
        assert entered.wait(5)
        assert fds_under(tmp_path)

        async def shutdown():
            await server.server.shutdown(0.2)
            order.append("shutdown returned")

        done = server.submit(shutdown())
        replies = client.read_to_eof(timeout=5)
        expected = rb"250 2\.0\.0 Ok[^\r\n]*\r\n421 4\.3\.2 Server shutting down\r\n"
        assert re.fullmatch(expected, replies)
        done.result(5)
    assert order == ["deliver start", "deliver end", "accepted", "disconnect", "shutdown returned"]
    assert not fds_under(tmp_path)
    assert os.listdir(tmp_path) == []
    log_watch.wait_for("Shutdown grace period over")


def test_force_stop_cancels_a_plugin_call(start_server):
    cancelled = threading.Event()
    entered = threading.Event()

    class Stuck(RecordingPlugin):
        async def bonzo_deliver(self, session, envelope):
            entered.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

    server = start_server(plugin=Stuck())
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<b@example.com>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        client.send(b"hi\r\n.\r\n")
        assert entered.wait(5)
        started = time.monotonic()
        server.call(server.server.force_stop)
        assert cancelled.wait(5)
        assert client.read_to_eof(timeout=5) == b""
        assert time.monotonic() - started < 2
    wait_until(lambda: server.plugin.disconnected, message="bonzo_disconnect")
    server.wait_connections(0)


def test_a_stop_does_not_wait_out_a_linger_past_the_grace_period(start_server):
    """A session told 421 at the stop waits for its client's close within
    the grace period, not LINGER_WAIT past it."""
    grace = 0.3
    server = start_server(plugin=RecordingPlugin())
    with RawClient(server.port) as idle:
        idle.greet()
        started = time.monotonic()
        done = server.submit(server.server.shutdown(grace))
        # The server's side ends; this client keeps its own open.
        assert idle.read_to_eof() == b"421 4.3.2 Server shutting down\r\n"
        done.result(5)
        assert time.monotonic() - started < grace + 1.0

"""End to end at the byte level: pipelining, framing, large messages, limits."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import re
import select
import socket
import threading
import time
import tracemalloc
import weakref
from typing import Any

import pytest
from e2e_support import TIMEOUT, RawClient, RecordingPlugin, codes, fds_under, wait_until

pytestmark = pytest.mark.timeout(30)


def open_transaction(client: RawClient, rcpts: int = 1) -> None:
    client.greet()
    assert client.command("MAIL FROM:<alice@example.com>") == b"250 2.1.0 Ok\r\n"
    for n in range(rcpts):
        assert client.command(f"RCPT TO:<user{n}@example.com>") == b"250 2.1.5 Ok\r\n"
    assert client.command("DATA").startswith(b"354 ")


# --------------------------------------------------------------- pipelining
class AsyncRecordingPlugin(RecordingPlugin):
    async def bonzo_rcpt(self):
        await asyncio.sleep(0)
        return super().bonzo_rcpt()


@pytest.mark.parametrize("plugin_class", [RecordingPlugin, AsyncRecordingPlugin])
def test_pipelined_batch_replies_come_in_order_in_one_read(start_server, plugin_class):
    server = start_server(plugin=plugin_class())
    with RawClient(server.port) as client:
        client.greet(ehlo=None)
        batch = (
            b"EHLO client.test\r\n"
            b"MAIL FROM:<alice@example.com>\r\n"
            b"RCPT TO:<bob@example.com>\r\n"
            b"RCPT TO:<bad address>\r\n"
            b"NOOP\r\n"
            b"RCPT TO:<carol@example.com>\r\n"
            b"DATA\r\n"
        )
        client.send(batch)
        # The replies to a pipelined batch are written together (RFC 2920):
        # a single recv gets all of them.
        first = client.recv_once()
        assert first.count(b"\r\n") == 11 + 6, first  # 11 EHLO lines, 6 more replies
        client.buffer = first
        ehlo, *rest = client.replies(7)
        assert ehlo.startswith(b"250-bonzo.test Hello 127.0.0.1\r\n")
        assert rest == [
            b"250 2.1.0 Ok\r\n",
            b"250 2.1.5 Ok\r\n",
            b"501 5.1.3 Bad recipient address syntax\r\n",
            b"250 2.0.0 Ok\r\n",
            b"250 2.1.5 Ok\r\n",
            b"354 End data with <CR><LF>.<CR><LF>\r\n",
        ]
        client.send(b"Subject: pipelined\r\n\r\nhi\r\n.\r\nRSET\r\nQUIT\r\n")
        tail = client.read_to_eof()
    assert codes(_split(tail)) == [250, 250, 221]
    (delivered,) = server.plugin.messages
    assert delivered.rcpt_tos == ["bob@example.com", "carol@example.com"]


def _split(data: bytes) -> list[bytes]:
    out = []
    current = b""
    for line in data.splitlines(keepends=True):
        current += line
        if line[3:4] != b"-":
            out.append(current)
            current = b""
    assert not current
    return out


# ------------------------------------------------------------------ framing
def test_dot_stuffing_end_to_end(server):
    wire = b"..starts with one dot\r\n...two dots\r\n..\r\nmiddle . dot\r\n. space\r\nlast\r\n.\r\n"
    expected = b".starts with one dot\r\n..two dots\r\n.\r\nmiddle . dot\r\n space\r\nlast\r\n"
    with RawClient(server.port) as client:
        open_transaction(client)
        client.send(wire)
        assert client.reply().startswith(b"250 2.0.0 Ok")
    (delivered,) = server.plugin.messages
    assert delivered.body == expected


def test_the_server_reads_each_command_once_without_failed_socket_tries(server, monkeypatch):
    """The session loop hints its stream after each reply (SessionStream):
    a client that waits for its replies never makes the server try an
    empty socket, and everything arrives intact."""
    from bonzo.connection import SessionStream

    tries = {"data": 0, "empty": 0}
    read_from_fd = SessionStream.read_from_fd
    recv_chunk = SessionStream.recv_chunk

    def counted(self: SessionStream, buf: Any) -> int | None:
        got = read_from_fd(self, buf)
        tries["data" if got else "empty"] += 1
        return got

    def counted_chunk(self: SessionStream, size: int) -> bytes | None:
        got = recv_chunk(self, size)
        tries["data" if got else "empty"] += 1
        return got

    monkeypatch.setattr(SessionStream, "read_from_fd", counted)
    monkeypatch.setattr(SessionStream, "recv_chunk", counted_chunk)
    with RawClient(server.port) as client:
        client.greet()
        for n in range(3):
            assert client.command("MAIL FROM:<alice@example.com>") == b"250 2.1.0 Ok\r\n"
            assert client.command(f"RCPT TO:<user{n}@example.com>") == b"250 2.1.5 Ok\r\n"
            assert client.command("DATA").startswith(b"354 ")
            client.send(b"Subject: %d\r\n\r\nbody\r\n.\r\n" % n)
            assert client.reply().startswith(b"250 2.0.0 Ok")
    assert [m.body for m in server.plugin.messages] == [
        b"Subject: %d\r\n\r\nbody\r\n" % n for n in range(3)
    ]
    # EHLO and 3 x (MAIL, RCPT, DATA, content): 13 reads with data. Tornado
    # alone would first try the empty socket before each of them; a stray
    # try (content split across segments) is allowed for.
    assert tries["data"] >= 13
    assert tries["empty"] <= 2


def test_a_finished_session_is_freed_at_once_without_the_cycle_collector(server):
    """Nothing of a session refers back to its connection once it is over
    (no reference cycle), so it is freed when it ends, not at the next run
    of the cycle collector: under many short connections that collector
    would otherwise run all the time, and memory would grow between runs."""
    gc.collect()
    gc.disable()
    try:
        refs = []
        for n in range(2):
            with RawClient(server.port) as client:
                client.greet()
                if n:  # one with a message and a refusal (the core's callback)
                    assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250")
                    assert client.command("RCPT TO:<>").startswith(b"5")
                    assert client.command("RCPT TO:<bob@example.com>").startswith(b"250")
                    assert client.command("DATA").startswith(b"354")
                    client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
                    assert client.reply().startswith(b"250")
                (connection,) = wait_until(lambda: list(server.server.connections))
                refs.append(weakref.ref(connection))
                del connection
                assert client.command("QUIT").startswith(b"221")
        wait_until(lambda: all(ref() is None for ref in refs), message="sessions freed")
        assert len(server.plugin.messages) == 1
    finally:
        gc.enable()


def test_empty_message(server):
    with RawClient(server.port) as client:
        open_transaction(client)
        client.send(b".\r\n")
        assert client.reply().startswith(b"250 2.0.0 Ok")
    (delivered,) = server.plugin.messages
    assert delivered.body == b""


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n"],
    ids=["LF.LF", "LF.CRLF", "CRLF.LF", "CR.CR", "CRLF.CR", "CR.CRLF"],
)
def test_smuggled_end_of_data_is_content(server, fake_end):
    smuggled = (
        b"MAIL FROM:<evil@example.net>\r\n"
        b"RCPT TO:<victim@example.com>\r\n"
        b"DATA\r\n"
        b"Subject: smuggled\r\n\r\nsmuggled body\r\n"
    )
    with RawClient(server.port) as client:
        open_transaction(client)
        client.send(b"Subject: first\r\n\r\nfirst body" + fake_end + smuggled + b".\r\nNOOP\r\n")
        replies = client.replies(2)
        assert replies[0].startswith(b"250 2.0.0 Ok: queued as ")
        assert replies[1] == b"250 2.0.0 Ok\r\n"
        client.send(b"QUIT\r\n")
        assert client.read_to_eof() == b"221 2.0.0 Bye\r\n"
    # One message, whose content holds the would-be commands; only one MAIL ran.
    assert server.plugin.senders == ["alice@example.com"]
    (delivered,) = server.plugin.messages
    assert b"MAIL FROM:<evil@example.net>" in delivered.body
    assert delivered.body.endswith(b"smuggled body\r\n")
    # normalize (the default) stores CRLF line ends only.
    assert delivered.body.count(b"\n") == delivered.body.count(b"\r\n")
    assert delivered.body.count(b"\r") == delivered.body.count(b"\r\n")


# ---------------------------------------------------------- large messages
def _big_message(size: int) -> tuple[bytes, bytes]:
    """Return (wire bytes including the final dot, expected stored body)."""
    lines = []
    total = 0
    n = 0
    while total < size:
        line = b"%08d " % n + b"x" * 60 + b"\r\n"
        if n % 7 == 0:
            line = b"." + line
        lines.append(line)
        total += len(line)
        n += 1
    body = b"".join(lines)
    wire = b"".join(b"." + line if line.startswith(b".") else line for line in lines) + b".\r\n"
    return wire, body


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_five_megabyte_message_is_spooled_and_intact(start_server, tmp_path):
    server = start_server(spool_dir=str(tmp_path), spool_threshold=256 * 1024)
    wire, body = _big_message(5 * 1024 * 1024)
    view = memoryview(wire)
    with RawClient(server.port, timeout=15) as client:
        open_transaction(client)
        tracemalloc.start()
        try:
            for start in range(0, len(wire), 65536):
                client.send(view[start : start + 65536])
            reply = client.reply()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert reply.startswith(b"250 2.0.0 Ok"), reply
        assert client.command("NOOP") == b"250 2.0.0 Ok\r\n"
    (delivered,) = server.plugin.messages
    assert delivered.spooled
    assert delivered.size == len(body)
    assert delivered.digest == hashlib.sha256(body).hexdigest()
    # Memory stays bounded: far below the message size (client and server
    # share this process, so this counts both sides).
    assert peak < 2 * 1024 * 1024, f"peak traced memory {peak} bytes"
    wait_until(lambda: not fds_under(tmp_path), message="the spool file to be closed")
    assert os.listdir(tmp_path) == []


def test_message_over_max_size_is_refused_after_the_final_dot(start_server):
    limit = 100_000
    server = start_server(max_message_size=limit)
    wire, body = _big_message(3 * limit)
    with RawClient(server.port) as client:
        open_transaction(client)
        head, dot = wire[:-3], wire[-3:]
        before = _bytes_received(server)
        client.send(head)
        # Wait until the server has read all of it, then check it has said nothing.
        wait_until(
            lambda: _bytes_received(server) - before >= len(head),
            message="the server to read the data",
        )
        readable, _, _ = select.select([client.sock], [], [], 0)
        assert not readable, client.recv_once()
        client.send(dot)
        assert client.reply() == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        # The session is still usable.
        assert client.command("RSET") == b"250 2.0.0 Ok\r\n"
        assert client.command("MAIL FROM:<a@example.com>") == b"250 2.1.0 Ok\r\n"
        assert client.command("RCPT TO:<b@example.com>") == b"250 2.1.5 Ok\r\n"
        assert client.command("DATA").startswith(b"354")
        client.send(b"small\r\n.\r\n")
        assert client.reply().startswith(b"250 2.0.0 Ok")
    (delivered,) = server.plugin.messages
    assert delivered.body == b"small\r\n"


def _bytes_received(server) -> int:
    (connection,) = server.connections()
    return connection.bytes_received


# ------------------------------------------------------------------- limits
def test_a_connection_that_cannot_be_served_is_closed_and_logged(start_server, log_watch):
    server = start_server()
    calls = []

    def broken(stream: Any, address: Any) -> None:
        calls.append(address)
        raise RuntimeError("no session for you")

    server.server.handle_stream = broken  # type: ignore[method-assign]
    log_watch.allow("Error in connection callback", logger="tornado.application")
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as sock:
        # Closed at once, not left open with nobody serving it.
        assert sock.recv(100) == b""
    assert len(calls) == 1
    wait_until(
        lambda: log_watch.matching("Error in connection callback"), message="the error logged"
    )


def test_max_connections(start_server):
    server = start_server(max_connections=2)
    with RawClient(server.port) as one, RawClient(server.port) as two:
        one.greet()
        two.greet()
        with RawClient(server.port) as three:
            assert three.read_to_eof() == b"421 4.7.0 Too many connections, try again later\r\n"
        # The refused one does not count; closing one makes room.
        server.wait_connections(2)
        one.command("QUIT")
        server.wait_connections(1)
        with RawClient(server.port) as four:
            four.greet()
            assert four.command("NOOP") == b"250 2.0.0 Ok\r\n"
        assert two.command("NOOP") == b"250 2.0.0 Ok\r\n"


def test_max_connections_per_ip(start_server, log_watch):
    server = start_server(max_connections_per_ip=1)
    with RawClient(server.port) as one:
        one.greet()
        with RawClient(server.port) as two:
            assert two.read_to_eof() == b"421 4.7.0 Too many connections from your address\r\n"
        assert one.command("NOOP") == b"250 2.0.0 Ok\r\n"
        one.command("QUIT")
    server.wait_connections(0)
    with RawClient(server.port) as three:
        three.greet()
    # One line for the refused connection, a warning naming the limit.
    refused = [r for r in log_watch.records if "Too many connections" in r.getMessage()]
    assert len(refused) == 1
    assert refused[0].levelname == "WARNING"
    assert re.fullmatch(
        r"\[\w+ 127\.0\.0\.1\] connect refused by core: 421 4\.7\.0 Too many connections "
        r"from your address; arg='' \(max_connections_per_ip\)",
        refused[0].getMessage(),
    )


def test_a_flood_of_refused_connections_is_summed_up_in_the_log(
    start_server, log_watch, monkeypatch
):
    """Past a few refusals at connect a second, the lines stop and one
    WARNING a second counts the rest: every refused connection is in the log,
    one by one or in a sum, but a flood does not become as many lines."""
    import time

    from bonzo import connection

    monkeypatch.setattr(connection, "connect_refusals", connection.RefusalLines(per_second=5))
    server = start_server(max_connections_per_ip=1)
    flood = 40
    with RawClient(server.port) as one:
        one.greet()
        start = time.monotonic()
        clients = [RawClient(server.port) for _ in range(flood)]
        for client in clients:
            with client:
                assert client.read_to_eof() == (
                    b"421 4.7.0 Too many connections from your address\r\n"
                )
        elapsed = time.monotonic() - start

        def counted() -> tuple[int, int]:
            records = [r.getMessage() for r in log_watch.records]
            lines = sum("refused by core: 421 4.7.0 Too many" in m for m in records)
            summed = [
                re.search(r"^(\d+) more connection\(s\) refused at connect in the last second", m)
                for m in records
            ]
            return lines, sum(int(m.group(1)) for m in summed if m)

        wait_until(lambda: sum(counted()) == flood, message="every refusal accounted for")
    lines, summed = counted()
    assert lines <= 5 * (int(elapsed) + 2), (lines, elapsed)
    if elapsed < 0.8:
        assert lines <= 10 and summed >= flood - 10
    summary = [r for r in log_watch.records if "more connection(s) refused" in r.getMessage()]
    assert summary and all(r.levelname == "WARNING" for r in summary)
    assert "max_connections_per_ip: " in summary[0].getMessage()


def test_unknown_command_budget_closes_and_drops_buffered_commands(start_server):
    server = start_server(max_unknown_commands=3)
    with RawClient(server.port) as client:
        client.greet()
        client.send(
            b"".join(b"XCMD%d\r\n" % n for n in range(5))
            + b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
            b"Subject: should never arrive\r\n\r\n.\r\n"
        )
        rest = client.read_to_eof()
    assert _split(rest) == [b"500 5.5.2 Error: command not recognized\r\n"] * 3 + [
        b"421 4.7.0 Too many unknown commands, closing connection\r\n"
    ]
    assert server.plugin.senders == []
    assert server.plugin.messages == []


@pytest.mark.timeout(30)
def test_client_that_does_not_read_cannot_make_the_server_buffer_unbounded_output(
    start_server,
):
    chunk = 4096
    backlog = 16384
    server = start_server(
        sndbuf=4096,
        read_chunk_size=chunk,
        max_write_backlog=backlog,
        max_junk_commands=100_000,
    )
    # A repeating group of commands, each with a known reply.
    group = [
        (b"NOOP\r\n", b"250 2.0.0 Ok\r\n"),
        (b"HELP\r\n", None),
        (b"MAIL FROM:<a@example.com>\r\n", b"250 2.1.0 Ok\r\n"),
        (b"RCPT TO:<b@example.com>\r\n", b"250 2.1.5 Ok\r\n"),
        (b"RSET\r\n", b"250 2.0.0 Ok\r\n"),
        (b"VRFY someone\r\n", None),
    ]
    repeats = 3000
    commands = b"".join(c for c, _ in group) * repeats
    with RawClient(server.port, rcvbuf=4096) as client:
        client.greet()
        # Write everything without reading, from a thread (the server stops
        # reading once it cannot write, so sendall blocks for a while).
        errors: list[BaseException] = []

        def writer():
            try:
                client.sock.sendall(commands + b"QUIT\r\n")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        # Wait until the server is holding replies it cannot send.
        wait_until(
            lambda: server.server.high_water >= chunk, message="replies the server cannot send"
        )
        # ... and has stopped reading commands meanwhile.
        assert _bytes_received(server) < len(commands) // 4
        replies = _split(client.read_to_eof(timeout=20))
        thread.join(TIMEOUT)
        assert not thread.is_alive() and not errors, errors
    assert len(replies) == repeats * len(group) + 1
    for n, reply in enumerate(replies[:-1]):
        _, expected = group[n % len(group)]
        if expected is None:
            assert reply[:3] in (b"214", b"252"), (n, reply)
        else:
            assert reply == expected, (n, reply)
    assert replies[-1] == b"221 2.0.0 Bye\r\n"
    # Bounded: the backlog plus what one read's worth of commands can produce.
    assert server.server.high_water <= backlog + 16 * chunk, server.server.high_water


def test_messages_per_connection_limit(start_server):
    server = start_server(max_messages_per_connection=2)
    with RawClient(server.port) as client:
        client.greet()
        for _ in range(2):
            assert client.command("MAIL FROM:<a@example.com>") == b"250 2.1.0 Ok\r\n"
            assert client.command("RCPT TO:<b@example.com>") == b"250 2.1.5 Ok\r\n"
            assert client.command("DATA").startswith(b"354")
            client.send(b"x\r\n.\r\n")
            assert client.reply().startswith(b"250 2.0.0 Ok")
        reply = client.command("MAIL FROM:<a@example.com>")
        assert reply == b"452 4.5.3 Too many messages for this connection\r\n"
    assert len(server.plugin.messages) == 2


@pytest.mark.parametrize(
    "wire, expected",
    [
        (
            b"Subject: split\r\n\r\n..stuffed\r\n...\r\nplain\r\n..\r\n.\r\n",
            b"Subject: split\r\n\r\n.stuffed\r\n..\r\nplain\r\n.\r\n",
        ),
        (
            # Only CRLF.CRLF ends the data. A "." at the start of a line after
            # CRLF or after a bare LF is unstuffed (a client sending LF line
            # ends stuffs those); after a bare CR it is kept. Then bare LF/CR
            # are normalised to CRLF.
            b"Subject: smuggle\r\n\r\na\n.\nb\r\n.\nc\n.\r\nd\r.\r\n.\r\n",
            b"Subject: smuggle\r\n\r\na\r\n\r\nb\r\n\r\nc\r\n\r\nd\r\n.\r\n",
        ),
    ],
    ids=["dots", "smuggling"],
)
def test_content_split_at_every_octet_across_reads(start_server, wire, expected):
    """The driver hands the core whatever each read returns; a message split
    at any point (inside CRLF, around a stuffed dot, inside a fake or the real
    final dot) must be stored the same."""
    server = start_server(max_messages_per_connection=1000)
    with RawClient(server.port) as client:
        client.greet()
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for split in range(1, len(wire)):
            assert client.command("MAIL FROM:<a@example.com>") == b"250 2.1.0 Ok\r\n"
            assert client.command("RCPT TO:<b@example.com>") == b"250 2.1.5 Ok\r\n"
            assert client.command("DATA").startswith(b"354")
            before = _bytes_received(server)
            client.send(wire[:split])
            wait_until(
                lambda: _bytes_received(server) - before >= split,  # noqa: B023
                message="the first part to be read",
            )
            client.send(wire[split:])
            assert client.reply().startswith(b"250 2.0.0 Ok"), split
    assert [m.body for m in server.plugin.messages] == [expected] * (len(wire) - 1)


def test_the_worker_share_asks_the_busier_worker_to_wait():
    # One object plays both workers here (its slot changes); the daemon's
    # workers share the counts across fork() (test_daemon.py).
    from bonzo.server import WorkerShare

    with pytest.raises(ValueError, match="workers must be at least 1"):
        WorkerShare(0)
    share = WorkerShare(2)
    assert share.counts() == [WorkerShare.CLOSED] * 2  # nobody accepts yet
    assert share.wait() == 0.0  # not a worker: never waits
    share.start(1)
    for _ in range(3):
        share.opened()  # worker 1: three connections
    share.open = 1
    share.start(0)  # worker 0: one
    assert share.counts() == [1, 3]
    assert share.wait() == 0.0  # the least busy: accepts at once
    for _ in range(3):
        share.opened()
    assert share.counts()[0] == 4
    assert share.wait() == pytest.approx(WorkerShare.STEP)  # one more than the other
    for _ in range(10):
        share.opened()
    assert share.wait() == WorkerShare.MAX_WAIT  # bounded
    share.gone(1)  # the other died: nobody to wait for
    assert share.wait() == 0.0
    share.closed()
    assert share.counts()[0] == 13
    share.stop()
    assert share.counts()[0] == WorkerShare.CLOSED and share.wait() == 0.0


def test_a_worker_asked_to_wait_leaves_the_connection_to_another_or_takes_it_after():
    from tornado.netutil import bind_sockets

    from bonzo.listen import accept_on

    class Share:
        def __init__(self, wait: float) -> None:
            self.pause = wait

        def wait(self) -> float:
            return self.pause

    async def main() -> tuple[list[str], float]:
        [sock] = bind_sockets(0, "127.0.0.1")
        port = sock.getsockname()[1]
        taken: list[str] = []
        loop = asyncio.get_running_loop()

        def by(name: str) -> Any:
            def callback(conn: socket.socket, address: Any) -> None:
                taken.append(name)
                conn.close()

            return callback

        # Two "workers" on one socket: the busy one waits, the other takes it.
        stop_busy = accept_on(sock, by("busy"), 1, Share(0.05))
        other = sock.dup()  # as another process's descriptor of the same socket
        stop_idle = accept_on(other, by("idle"), 1, Share(0.0))
        first = socket.create_connection(("127.0.0.1", port))
        for _ in range(100):
            if taken:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the busy one's pause is over: nothing left for it
        stop_idle()
        # Alone, the busy one still takes the next connection, after its pause.
        started = loop.time()
        second = socket.create_connection(("127.0.0.1", port))
        for _ in range(100):
            if len(taken) == 2:
                break
            await asyncio.sleep(0.01)
        waited = loop.time() - started
        stop_busy()
        first.close()
        second.close()
        other.close()
        sock.close()
        return taken, waited

    taken, waited = asyncio.run(main())
    assert taken == ["idle", "busy"]
    assert waited >= 0.04


@pytest.mark.parametrize("refusal", [b"421 4.3.2 Out of resources\r\n", None])
def test_out_of_descriptors_a_listener_refuses_through_its_reserve_or_pauses(refusal, log_watch):
    # accept() fails once with EMFILE (as a process out of descriptors sees
    # it): with a refusal, the waiting client gets it at once and is closed;
    # without one, the listener pauses ACCEPT_PAUSE and then takes the client.
    import errno

    from tornado.netutil import bind_sockets

    from bonzo.listen import ACCEPT_PAUSE, accept_on

    log_watch.allow("cannot accept connections")

    class OutOnce:
        def __init__(self, sock: socket.socket) -> None:
            self.sock, self.failed = sock, False

        def fileno(self) -> int:
            return self.sock.fileno()

        def getsockname(self) -> Any:
            return self.sock.getsockname()

        def accept(self) -> Any:
            if not self.failed:
                self.failed = True
                raise OSError(errno.EMFILE, "Too many open files")
            return self.sock.accept()

    async def main() -> tuple[bytes, list[str], float]:
        [sock] = bind_sockets(0, "127.0.0.1")
        port = sock.getsockname()[1]
        taken: list[str] = []
        counted: list[int] = []

        def callback(conn: socket.socket, address: Any) -> None:
            taken.append("session")
            conn.sendall(b"220 hi\r\n")
            conn.close()

        loop = asyncio.get_running_loop()
        stop = accept_on(OutOnce(sock), callback, 4, refusal=refusal, on_refused=counted.append)  # type: ignore[arg-type]
        started = loop.time()
        client = socket.create_connection(("127.0.0.1", port))
        client.setblocking(False)
        got = b""
        for _ in range(300):
            try:
                got = client.recv(100)
                break
            except BlockingIOError:
                await asyncio.sleep(0.01)
        waited = loop.time() - started
        stop()
        client.close()
        sock.close()
        if refusal is not None:
            assert counted == [1]
        return got, taken, waited

    got, taken, waited = asyncio.run(main())
    if refusal is not None:
        assert (got, taken) == (refusal, [])
        assert waited < ACCEPT_PAUSE / 2
    else:
        assert (got, taken) == (b"220 hi\r\n", ["session"])
        assert waited >= ACCEPT_PAUSE * 0.9
    [report] = [r for r in log_watch.records if "cannot accept" in r.getMessage()]
    assert ("new clients are answered" in report.getMessage()) == (refusal is not None)


def test_out_of_descriptors_with_no_client_waiting_is_no_failure(log_watch):
    """The accept that fills the table is followed by one that fails with
    EMFILE although nobody waits (Linux checks the table first): that is no
    failure to report and no reason to pause — the next client is refused
    at once through the reserve, not after ACCEPT_PAUSE."""
    import errno

    from tornado.netutil import bind_sockets

    from bonzo.listen import ACCEPT_PAUSE, accept_on

    log_watch.allow("cannot accept connections")

    class FillsUp:
        """The first accept takes a client and fills the table: every other
        one fails with EMFILE, but the one right after the reserve is freed."""

        def __init__(self, sock: socket.socket) -> None:
            self.sock, self.calls = sock, 0

        def fileno(self) -> int:
            return self.sock.fileno()

        def getsockname(self) -> Any:
            return self.sock.getsockname()

        def accept(self) -> Any:
            self.calls += 1
            if self.calls % 2 == 0:
                raise OSError(errno.EMFILE, "Too many open files")
            return self.sock.accept()  # BlockingIOError when nobody waits

    async def main() -> tuple[list[bytes], float, list[int]]:
        [sock] = bind_sockets(0, "127.0.0.1")
        port = sock.getsockname()[1]
        counted: list[int] = []

        def callback(conn: socket.socket, address: Any) -> None:
            conn.sendall(b"220 hi\r\n")
            conn.close()

        refusal = b"421 4.3.2 Out\r\n"
        stop = accept_on(FillsUp(sock), callback, 4, refusal=refusal, on_refused=counted.append)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        waited = 0.0
        for _ in range(2):
            started = loop.time()
            client = socket.create_connection(("127.0.0.1", port))
            client.setblocking(False)
            for _ in range(300):
                try:
                    got.append(client.recv(100))
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            waited = loop.time() - started
            client.close()
        stop()
        sock.close()
        return got, waited, counted

    got, waited, counted = asyncio.run(main())
    assert got == [b"220 hi\r\n", b"421 4.3.2 Out\r\n"] and counted == [1]
    assert waited < ACCEPT_PAUSE / 2  # the second client: refused at once
    reports = [r.getMessage() for r in log_watch.records if "cannot accept" in r.getMessage()]
    assert reports and all("waiting connections stay queued" not in m for m in reports)


def test_the_out_of_resources_refusal_is_plain_text_only_where_clients_read_it(monkeypatch):
    import ssl

    from bonzo import server as server_module
    from bonzo.hooks import PluginSet
    from bonzo.server import SMTPServer
    from bonzo.settings import ListenerSettings

    given: list[bytes | None] = []
    monkeypatch.setattr(
        server_module, "accept_on", lambda *args, refusal, **kw: given.append(refusal)
    )
    plain = socket.socket()
    tls = ListenerSettings(tls_context=ssl.create_default_context(), implicit_tls=True)
    SMTPServer(plugins=PluginSet()).add_sockets([plain])
    SMTPServer(lambda request: None).add_sockets([plain])  # the original API: no code
    SMTPServer(plugins=PluginSet(), listener=tls).add_sockets([plain])
    plain.close()
    assert given == [
        b"421 4.3.2 Service not available, out of resources; try again later\r\n",
        b"421 Service not available, out of resources; try again later\r\n",
        None,  # implicit TLS: a plain-text line would mean nothing to the client
    ]


@pytest.mark.parametrize(("batch", "first"), [(1, 1), (128, 3)])
def test_accept_batch_is_how_many_waiting_connections_one_wakeup_takes(batch, first):
    from tornado.netutil import bind_sockets

    from bonzo.hooks import PluginSet
    from bonzo.server import ACCEPT_BATCH, SMTPServer

    assert ACCEPT_BATCH == 128
    with pytest.raises(ValueError, match="accept_batch must be at least 1"):
        SMTPServer(plugins=PluginSet(), accept_batch=0)

    async def main() -> list[int]:
        server = SMTPServer(plugins=PluginSet(), accept_batch=batch)
        [sock] = bind_sockets(0, "127.0.0.1")
        port = sock.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        server.add_sockets([sock])  # the three wait in the backlog already
        seen = []
        for _ in range(1000):  # until the first wakeup has taken its share
            await asyncio.sleep(0)
            if server.connections:
                seen.append(len(server.connections))
                break
        for _ in range(100):
            if len(server.connections) == 3:
                break
            await asyncio.sleep(0.01)
        seen.append(len(server.connections))
        for c in clients:
            c.close()
        await server.shutdown(grace=0)
        return seen

    seen = asyncio.run(main())
    assert seen[0] == first and seen[-1] == 3


def test_the_last_reply_reaches_a_client_that_pipelined_past_it(start_server):
    """A client that pipelined far past the limit that ends its session gets
    every reply up to the 421: the server ends its side and reads what is
    left until the client closes, rather than close with unread input (the
    system then resets the connection, and a reset client drops the replies
    it has not read yet)."""
    errors = 2000
    server = start_server(plugin=RecordingPlugin(), max_errors=errors)
    sock = socket.socket()
    # A small window: the replies wait in the server's send queue, which a
    # close with unread input would throw away.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", server.port))
    with sock:
        sock.sendall(b"EHLO client.test\r\n" + b"MAIL FROM:<bad\r\n" * (errors + 1))
        sock.sendall(b"NOOP\r\n" * 5_000)
        time.sleep(0.5)  # the server has answered everything it will
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    replies = data.split(b"\r\n")[2:-1]  # after the greeting and EHLO's first line
    replies = [r for r in replies if not r.startswith(b"250")]
    assert replies[:errors] == [b"501 5.1.7 Bad sender address syntax"] * errors
    assert replies[errors:] == [b"421 4.7.0 Too many errors, closing connection"]
    server.wait_connections(0)


def test_a_client_that_keeps_the_connection_open_is_closed_after_the_linger(start_server):
    """The wait for the client's close after a last reply is bounded."""
    from bonzo.connection import LINGER_WAIT

    server = start_server(plugin=RecordingPlugin())
    with RawClient(server.port) as client:
        client.greet()
        client.send(b"MAIL FROM:<bad\r\n" * 21)
        started = time.monotonic()
        data = client.read_to_eof(timeout=10)  # the server's side ends: EOF
        assert data.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")
        server.wait_connections(0, timeout=LINGER_WAIT + 3)
        assert time.monotonic() - started >= LINGER_WAIT * 0.8


def test_the_wait_for_the_client_s_close_is_not_started_again(start_server):
    """A session a timeout ended, whose client then sends more: its socket
    is closed LINGER_WAIT after the server's side ended, not twice that."""
    from bonzo.connection import LINGER_WAIT

    server = start_server(plugin=RecordingPlugin(), idle_timeout=0.5)
    with RawClient(server.port) as client:
        client.greet()
        assert client.reply(timeout=5).startswith(b"421 4.4.2 ")
        ended = time.monotonic()
        time.sleep(LINGER_WAIT / 2)
        client.send(b"NOOP\r\n")  # read and dropped by the server
        server.wait_connections(0, timeout=LINGER_WAIT * 3)
        assert time.monotonic() - ended < LINGER_WAIT * 1.3


# ------------------------------------------------------- lost connections
def test_a_client_that_vanishes_is_logged_by_what_it_left_unfinished(server, log_watch):
    """Mid-message or mid-transaction at INFO ("why was this mail never
    sent?"), before any transaction at DEBUG (scanners, probes), and never
    after QUIT."""
    with RawClient(server.port) as c:
        c.greet()
        c.command("MAIL FROM:<a@example.org>")
        c.command("RCPT TO:<b@example.org>")
        assert c.command("DATA").startswith(b"354 ")
        c.send(b"Subject: half\r\n\r\nhalf a bo")
        time.sleep(0.05)
    record = log_watch.wait_for(r"lost connection in the message of DATA \(\d+ octets received\)")
    assert record.levelname == "INFO"
    with RawClient(server.port) as c:
        c.greet()
        c.command("MAIL FROM:<a@example.org>")
    record = log_watch.wait_for(r"lost connection after MAIL, in a transaction")
    assert record.levelname == "INFO"
    with RawClient(server.port) as c:
        c.greet()
    record = log_watch.wait_for(r"lost connection after EHLO \(")
    assert record.levelname == "DEBUG"
    with RawClient(server.port) as c:
        c.greet()
        assert c.command("QUIT").startswith(b"221 ")
    server.wait_connections(0)
    assert len(log_watch.matching("lost connection")) == 3

"""End to end with slow clients: idle, trickling commands, slow DATA.

Small timeouts keep these fast. The sleeps here pace what the client sends
(a slow client *is* a client that sleeps); conditions are always polled with
a deadline.
"""

from __future__ import annotations

import select
import threading
import time

import pytest
from e2e_support import RawClient

pytestmark = pytest.mark.timeout(30)

TIMEOUT_REPLY = b"421 4.4.2 Timeout, closing connection\r\n"


def test_idle_client_gets_421_and_is_closed(start_server, log_watch):
    server = start_server(idle_timeout=0.5)
    with RawClient(server.port) as client:
        client.greet()
        assert client.command(b"NOOP") == b"250 2.0.0 Ok\r\n"
        started = time.monotonic()
        assert client.read_to_eof() == TIMEOUT_REPLY
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0, elapsed
    server.wait_connections(0)
    assert len(server.plugin.disconnected) == 1
    # Logged as the session's end, not as a refusal of the last command.
    [line] = [r.getMessage() for r in log_watch.matching("Timeout, closing connection")]
    assert "] session refused by core: 421 4.4.2 Timeout, closing connection; arg=''" in line
    assert line.endswith("(idle_timeout)") and "NOOP" not in line


def test_idle_timeout_counts_from_the_last_command(start_server):
    server = start_server(idle_timeout=0.6)
    with RawClient(server.port) as client:
        client.greet()
        for _ in range(4):  # keep it alive past one idle_timeout
            time.sleep(0.25)
            assert client.command("NOOP") == b"250 2.0.0 Ok\r\n"
        started = time.monotonic()
        assert client.read_to_eof() == TIMEOUT_REPLY
        assert 0.5 <= time.monotonic() - started < 2.0


def test_idle_timeout_runs_from_the_end_of_a_slow_message(start_server):
    """The timer that fired during a slow message was set again for the
    message's longer deadline: after the 250, an idle client got its 421
    only when that one passed, not idle_timeout after the message."""
    server = start_server(idle_timeout=0.5, data_timeout=6, min_data_rate=0)
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<b@example.com>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        for _ in range(4):  # over a second of content: past one idle_timeout
            client.send(b"Subject: slow\r\n")
            time.sleep(0.3)
        client.send(b"\r\nbody\r\n.\r\n")
        assert client.reply().startswith(b"250 2.0.0 Ok")
        started = time.monotonic()
        assert client.read_to_eof() == TIMEOUT_REPLY
        assert 0.4 <= time.monotonic() - started < 2.0


def trickle(client: RawClient, data: bytes, interval: float, limit: float) -> float:
    """Send ``data`` a byte at a time until the server answers (or closes) or
    ``limit`` seconds pass; return when the first byte was sent."""
    started = time.monotonic()
    for n in range(len(data)):
        if time.monotonic() - started > limit or _readable(client):
            break
        try:
            client.send(data[n : n + 1])
        except OSError:  # the server closed the connection
            break
        time.sleep(interval)
    return started


def _readable(client: RawClient) -> bool:
    return bool(select.select([client.sock], [], [], 0)[0])


def test_command_trickled_a_byte_at_a_time_gets_421(start_server):
    server = start_server(command_timeout=0.5, idle_timeout=10)
    with RawClient(server.port) as client:
        client.greet()
        # Quiet for a moment first (well within idle_timeout), as a real
        # client between commands would be.
        time.sleep(0.6)
        started = trickle(client, b"NOOP " + b"x" * 400, interval=0.02, limit=5)
        assert client.read_to_eof() == TIMEOUT_REPLY
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0, f"closed after {elapsed:.2f}s, command_timeout is 0.5s"


def test_data_below_the_minimum_rate_gets_421(start_server):
    server = start_server(min_data_rate=2000, data_rate_window=0.5, idle_timeout=10)
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<b@example.com>").startswith(b"250")
        time.sleep(0.6)  # a pause between commands, within idle_timeout
        assert client.command("DATA").startswith(b"354")
        # About 200 octets/s: ten times too slow.
        started = trickle(client, b"Subject: slow\r\n\r\n" + b"y" * 2000, interval=0.005, limit=5)
        assert client.read_to_eof() == b"421 4.4.2 Data rate too low\r\n"
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0, f"closed after {elapsed:.2f}s, window is 0.5s"
    assert server.plugin.messages == []


def test_data_timeout_without_any_byte(start_server):
    server = start_server(data_timeout=0.5, min_data_rate=0, idle_timeout=10)
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<b@example.com>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        client.send(b"Subject: stalled\r\n")
        started = time.monotonic()
        assert client.read_to_eof() == TIMEOUT_REPLY
        assert 0.4 <= time.monotonic() - started < 2.0


def test_slow_but_steady_sender_completes(start_server):
    server = start_server(min_data_rate=1000, data_rate_window=0.3, idle_timeout=10)
    line = b"z" * 98 + b"\r\n"
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>").startswith(b"250")
        assert client.command("RCPT TO:<b@example.com>").startswith(b"250")
        assert client.command("DATA").startswith(b"354")
        # About 5000 octets/s, five times the minimum, for over a second:
        # several rate windows.
        for _ in range(60):
            client.send(line)
            time.sleep(0.02)
        client.send(b".\r\n")
        assert client.reply().startswith(b"250 2.0.0 Ok")
    (delivered,) = server.plugin.messages
    assert delivered.body == line * 60


def test_client_that_never_reads_is_dropped_after_idle_timeout(start_server):
    """A client that writes commands and never reads its replies stops the
    server reading (backpressure); it must not hold the connection forever."""
    server = start_server(idle_timeout=0.5, read_chunk_size=4096, max_junk_commands=10**9)
    client = RawClient(server.port, rcvbuf=4096)
    try:
        client.greet()
        stop = threading.Event()

        def flood() -> None:
            client.sock.settimeout(0.1)
            for _ in range(10_000):  # bounded
                if stop.is_set():
                    return
                try:
                    client.sock.send(b"HELP\r\n" * 1000)
                except TimeoutError:
                    continue
                except OSError:  # the server dropped us
                    return

        writer = threading.Thread(target=flood, daemon=True)
        writer.start()
        started = time.monotonic()
        server.wait_connections(0, timeout=5)
        elapsed = time.monotonic() - started
        stop.set()
        writer.join(5)
    finally:
        client.close()
    assert 0.4 <= elapsed < 3.0, elapsed
    assert len(server.plugin.disconnected) == 1


def test_last_reply_not_read_does_not_keep_the_connection(start_server):
    """The session ends (here: too many unknown commands) with replies the
    client never reads; the connection is closed anyway, in bounded time."""
    server = start_server(sndbuf=4096, idle_timeout=0.5, max_unknown_commands=2000, max_errors=5000)
    client = RawClient(server.port, rcvbuf=4096)
    try:
        client.greet()
        client.send(b"XYZ\r\n" * 2500)
        started = time.monotonic()
        server.wait_connections(0, timeout=5)
        elapsed = time.monotonic() - started
    finally:
        client.close()
    assert elapsed < 3.0, elapsed
    assert len(server.plugin.disconnected) == 1


def test_overlong_command_sent_in_bursts_gets_421(start_server):
    """The core discards an overlong line as it arrives (nothing is
    buffered), yet the line's deadline runs from its first byte."""
    server = start_server(command_timeout=0.5, idle_timeout=10)
    with RawClient(server.port) as client:
        client.greet()
        started = trickle(client, b"NOOP " + b"x" * 5000, interval=0.0005, limit=5)
        assert client.read_to_eof() == TIMEOUT_REPLY
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0, f"closed after {elapsed:.2f}s, command_timeout is 0.5s"


TXN = (b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.com>")


@pytest.mark.parametrize(
    "chunking, setup",
    [(False, ()), (True, ()), (True, TXN)],
    ids=["chunking-off", "no-transaction", "in-transaction"],
)
def test_a_huge_bdat_trickled_gets_421(start_server, chunking, setup):
    """BDAT's announced octets are content, whether they are refused (read
    and dropped) or kept: the DATA rate applies to them."""
    server = start_server(
        chunking=chunking, min_data_rate=1000, data_rate_window=0.5, idle_timeout=10
    )
    with RawClient(server.port) as client:
        client.greet()
        for line in setup:
            assert client.command(line).startswith(b"250")
        if chunking:
            client.send(b"BDAT 100000000\r\n")  # answered after its octets (RFC 3030)
        else:
            assert client.command("BDAT 100000000").startswith(b"502")
        started = trickle(client, b"z" * 1000, interval=0.05, limit=5)
        assert client.read_to_eof() == b"421 4.4.2 Data rate too low\r\n"
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0, f"closed after {elapsed:.2f}s, window is 0.5s"
    assert server.plugin.messages == []


def test_tiny_bdat_chunks_are_held_to_the_data_rate(start_server):
    """A message in one-octet chunks, each a complete command, never lets
    the idle time restart: between the chunks of a message the DATA rate
    applies."""
    server = start_server(min_data_rate=1000, data_rate_window=0.5, idle_timeout=10)
    with RawClient(server.port) as client:
        client.greet()
        for line in TXN:
            assert client.command(line).startswith(b"250")
        started = time.monotonic()
        replies = []
        for _ in range(100):  # bounded: one chunk every 50 ms for at most 5 s
            client.send(b"BDAT 1\r\nx")
            reply = client.reply()
            replies.append(reply)
            if not reply.startswith(b"250"):
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    assert replies[0] == b"250 2.0.0 1 octets received\r\n"
    assert replies[-1] == b"421 4.4.2 Data rate too low\r\n"
    assert 0.4 <= elapsed < 2.0, f"closed after {elapsed:.2f}s, window is 0.5s"


def test_bytes_that_complete_no_command_never_restart_the_idle_time(start_server):
    server = start_server(idle_timeout=0.6, command_timeout=0.6)
    with RawClient(server.port) as client:
        client.greet()
        started = trickle(client, b"NOOP" + b" " * 100, interval=0.05, limit=5)
        assert client.read_to_eof() == TIMEOUT_REPLY
        assert time.monotonic() - started < 2.0


def test_session_lifetime(start_server):
    server = start_server(max_session_time=0.8, idle_timeout=10)
    with RawClient(server.port) as client:
        client.greet()
        started = time.monotonic()
        for _ in range(100):  # bounded: a NOOP every 50 ms for at most 5 s
            try:
                reply = client.command("NOOP")
            except (ConnectionError, OSError):
                break
            if not reply.startswith(b"250"):
                assert reply == b"421 4.4.2 Session too long, closing connection\r\n"
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    assert 0.7 <= elapsed < 2.5, elapsed


def test_junk_commands_are_limited(start_server):
    server = start_server(max_junk_commands=5)
    with RawClient(server.port) as client:
        client.greet()
        for _ in range(5):
            assert client.command("NOOP") == b"250 2.0.0 Ok\r\n"
        assert client.command("NOOP") == (
            b"421 4.7.0 Too many commands without mail, closing connection\r\n"
        )
        assert client.read_to_eof() == b""

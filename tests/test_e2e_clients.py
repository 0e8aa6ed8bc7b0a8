"""End to end with real SMTP clients: smtplib, aiosmtplib, swaks and the example."""

from __future__ import annotations

import asyncio
import email
import email.message
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import threading
from pathlib import Path

import aiosmtplib
import pytest
from e2e_support import HOST, TIMEOUT, RawClient, wait_until

from bonzo.server import SMTPRequest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent

MESSAGE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: end to end\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that starts with a dot\r\n"
    b"Bye.\r\n"
)


def smtp_client(server) -> smtplib.SMTP:
    return smtplib.SMTP(HOST, server.port, local_hostname="client.test", timeout=TIMEOUT)


# ------------------------------------------------------------------ smtplib
def test_smtplib_sendmail_to_several_recipients(server):
    recipients = ["bob@example.com", "carol@example.com", "postmaster"]
    with smtp_client(server) as client:
        refused = client.sendmail("alice@example.com", recipients, MESSAGE)
    assert refused == {}
    wait_until(lambda: server.plugin.messages, message="the message")
    (delivered,) = server.plugin.messages
    assert delivered.mail_from == "alice@example.com"
    assert delivered.rcpt_tos == recipients
    assert delivered.helo == "client.test"
    assert delivered.esmtp
    assert delivered.mail_params == {"SIZE": str(len(MESSAGE))}
    # smtplib dot-stuffs; the server unstuffs: the body is what was given.
    assert delivered.body == MESSAGE


def test_smtplib_parses_the_ehlo_features(server):
    with smtp_client(server) as client:
        code, text = client.ehlo()
        assert code == 250
        assert text.startswith(b"bonzo.test Hello 127.0.0.1")
        features = client.esmtp_features
        for keyword in ("size", "pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes"):
            assert keyword in features, features
        assert features["size"] == str(server.server.settings.max_message_size)
        assert client.does_esmtp


def test_smtplib_smtputf8_addresses(server):
    sender = "jösé@exämple.com"
    recipients = ["ünïcode@example.com", "ascii@example.com"]
    body = "Subject: =?utf-8?q?h=C3=A9llo?=\r\n\r\nnaïve café\r\n".encode()
    with smtp_client(server) as client:
        client.sendmail(sender, recipients, body, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    wait_until(lambda: server.plugin.messages, message="the message")
    (delivered,) = server.plugin.messages
    assert delivered.mail_from == sender
    assert delivered.rcpt_tos == recipients
    assert "SMTPUTF8" in delivered.mail_params
    assert delivered.body == body


def test_smtplib_utf8_address_without_smtputf8_is_refused(server):
    with smtp_client(server) as client:
        client.ehlo()
        client.command_encoding = "utf-8"  # send it anyway, as a broken client would
        code, text = client.mail("jösé@example.com")
        assert (code, text[:5]) == (553, b"5.6.7")
        assert client.rset()[0] == 250


def test_smtplib_8bit_body(server):
    body = (
        b"Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        + "Grüße, Ωμέγα, 日本語\r\n".encode()
        + bytes(range(0x80, 0x100))
        + b"\r\n"
    )
    with smtp_client(server) as client:
        client.sendmail("a@example.com", ["b@example.com"], body, mail_options=["BODY=8BITMIME"])
    wait_until(lambda: server.plugin.messages, message="the message")
    (delivered,) = server.plugin.messages
    assert delivered.mail_params["BODY"] == "8BITMIME"
    assert delivered.body == body


def test_received_header_is_prepended_and_request_data_unchanged(start_server):
    seen: list[tuple[SMTPRequest, bytes, bytes, str]] = []

    def callback(request: SMTPRequest) -> None:
        envelope = request.envelope
        assert envelope is not None
        seen.append((request, envelope.content, envelope.body, request.message["Subject"]))
        request.finish()

    server = start_server(callback)
    text = "From: a@example.com\nSubject: trace\n\nline one\nline two"
    with smtp_client(server) as client:
        client.sendmail("a@example.com", ["b@example.com"], text)
    wait_until(lambda: seen, message="the request")
    ((request, content, body, subject),) = seen
    # What the client sent, as the original Bonzo gave it: "\n" line ends,
    # no final newline, no trace header.
    assert request.data == text
    assert subject == "trace"
    assert "Received" not in request.message
    assert request.message.get_payload() == "line one\nline two"
    # The stored message is the trace header followed by the content.
    assert body == text.replace("\n", "\r\n").encode() + b"\r\n"
    header, rest = content.split(b"\r\n", 1)
    assert header.startswith(b"Received: from client.test ([127.0.0.1])")
    assert content.endswith(body)
    received = email.message_from_bytes(content)["Received"]
    assert "for <b@example.com>" in received
    assert "with ESMTP id" in " ".join(received.split())
    assert content.count(b"Received:") == 1


# --------------------------------------------------------------- aiosmtplib
def test_aiosmtplib_send_message(server):
    message = email.message.EmailMessage()
    message["From"] = "alice@example.com"
    message["To"] = "bob@example.com, carol@example.com"
    message["Subject"] = "async"
    message.set_content("Sent with aiosmtplib.\n.hidden dot\n")

    async def send():
        return await aiosmtplib.send(
            message, hostname=HOST, port=server.port, timeout=TIMEOUT, start_tls=False
        )

    errors, reply = asyncio.run(send())
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    wait_until(lambda: server.plugin.messages, message="the message")
    (delivered,) = server.plugin.messages
    assert delivered.rcpt_tos == ["bob@example.com", "carol@example.com"]
    parsed = email.message_from_bytes(delivered.body)
    assert parsed["Subject"] == "async"
    assert parsed.get_payload() == "Sent with aiosmtplib.\r\n.hidden dot\r\n"


def test_asyncio_client_pipelined_mail_rcpt_batch(server):
    """aiosmtplib (5.x) awaits each reply and drops replies it did not ask
    for, so it cannot pipeline; an asyncio stream client writes the batch."""

    async def session():
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            greeting = await asyncio.wait_for(reader.readline(), TIMEOUT)
            assert greeting.startswith(b"220 ")
            batch = (
                b"EHLO async.test\r\n"
                b"MAIL FROM:<alice@example.com> SIZE=100\r\n"
                + b"".join(b"RCPT TO:<user%d@example.com>\r\n" % n for n in range(20))
                + b"DATA\r\n"
            )
            writer.write(batch)
            await writer.drain()
            replies = []
            while len(replies) < 23:
                line = await asyncio.wait_for(reader.readline(), TIMEOUT)
                assert line, replies
                if line[3:4] != b"-":
                    replies.append(line)
            writer.write(b"Subject: batch\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            await writer.drain()
            end = await asyncio.wait_for(reader.read(), TIMEOUT)
            return replies, end
        finally:
            writer.close()
            await writer.wait_closed()

    replies, end = asyncio.run(session())
    assert replies[0] == b"250 HELP\r\n"  # the last EHLO line
    assert replies[1] == b"250 2.1.0 Ok\r\n"
    assert replies[2:22] == [b"250 2.1.5 Ok\r\n"] * 20
    assert replies[22].startswith(b"354 ")
    assert end.startswith(b"250 2.0.0 Ok: queued as ") and end.endswith(b"221 2.0.0 Bye\r\n")
    (delivered,) = server.plugin.messages
    assert delivered.rcpt_tos == [f"user{n}@example.com" for n in range(20)]


def test_aiosmtplib_many_messages_on_one_connection(server):
    count = 60

    async def send_all():
        client = aiosmtplib.SMTP(hostname=HOST, port=server.port, timeout=TIMEOUT, start_tls=False)
        await client.connect()
        try:
            for n in range(count):
                message = email.message.EmailMessage()
                message["From"] = "alice@example.com"
                message["To"] = f"user{n}@example.com"
                message["Subject"] = f"message {n}"
                message.set_content(f"number {n}\n")
                await client.send_message(message)
        finally:
            await client.quit()

    asyncio.run(send_all())
    wait_until(lambda: len(server.plugin.messages) == count, message=f"{count} messages")
    assert [m.rcpt_tos for m in server.plugin.messages] == [
        [f"user{n}@example.com"] for n in range(count)
    ]
    assert len({m.session_id for m in server.plugin.messages}) == 1
    assert len(server.plugin.connected) == 1


# -------------------------------------------------------------------- swaks
SWAKS = shutil.which("swaks")
needs_swaks = pytest.mark.skipif(
    SWAKS is None, reason="swaks is not installed (Debian package: swaks)"
)


def run_swaks(server, *extra: str) -> subprocess.CompletedProcess[str]:
    assert SWAKS is not None
    command = [
        SWAKS,
        "--server",
        HOST,
        "--port",
        str(server.port),
        "--helo",
        "swaks.test",
        "--from",
        "sender@example.com",
        "--to",
        "rcpt1@example.com,rcpt2@example.com",
        "--header",
        "Subject: from swaks",
        "--body",
        "Body line\n.dotted line\nlast line",
        "--timeout",
        "10",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)


@needs_swaks
@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipeline"])
def test_swaks(server, pipeline):
    result = run_swaks(server, *(["--pipeline"] if pipeline else []))
    assert result.returncode == 0, result.stdout + result.stderr
    if pipeline:
        # swaks says when it pipelined (and would fail if it could not).
        assert "PIPELINING" in result.stdout
    wait_until(lambda: server.plugin.messages, message="the message")
    (delivered,) = server.plugin.messages
    assert delivered.helo == "swaks.test"
    assert delivered.mail_from == "sender@example.com"
    assert delivered.rcpt_tos == ["rcpt1@example.com", "rcpt2@example.com"]
    parsed = email.message_from_bytes(delivered.content)
    assert parsed["Subject"] == "from swaks"
    assert parsed["Received"].startswith("from swaks.test ([127.0.0.1])")
    assert b"\r\nBody line\r\n.dotted line\r\nlast line\r\n" in delivered.body


# ---------------------------------------------------------------- example
EXAMPLE_PORT = 2525


def _port_is_free(port: int) -> bool:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", port))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` has a listening TCP socket on ``port``
    (``None`` where /proc cannot tell)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            return None
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


class _Output:
    """Collects a subprocess's stdout on a thread, so reads never block the test."""

    def __init__(self, stream) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self.text += line

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@pytest.mark.timeout(30)
def test_examples_hello(log_watch):
    if not _port_is_free(EXAMPLE_PORT):
        pytest.skip(f"port {EXAMPLE_PORT}, which examples/hello.py listens on, is in use")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "hello.py")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = _Output(proc.stdout)
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                if "Address already in use" in output.text:
                    pytest.skip(f"port {EXAMPLE_PORT} was taken before hello.py could listen")
                raise AssertionError(f"hello.py exited early: {output.text}")
            owns = _listens_on(proc.pid, EXAMPLE_PORT)
            if owns is not None:
                # Linux: make sure it is our process that listens, not another.
                return owns
            try:
                with RawClient(EXAMPLE_PORT, timeout=1.0) as probe:
                    return probe.reply().startswith(b"220 Bonzo SMTP Server")
            except OSError:
                return False

        wait_until(listening, timeout=15, interval=0.05, message="hello.py to listen")
        with smtplib.SMTP(HOST, EXAMPLE_PORT, local_hostname="client.test", timeout=5) as client:
            client.sendmail(
                "alice@example.com",
                ["bob@example.com"],
                b"Subject: hello from the test\r\n\r\nIs anybody there?\r\n",
            )
        wait_until(
            lambda: "Is anybody there?" in output.text,
            timeout=5,
            message="hello.py to print the message",
        )
        assert "Subject: hello from the test" in output.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait(timeout=5)
        output.join(5)
        proc.stdout.close()
    assert "Traceback" not in output.text, output.text


def test_many_concurrent_aiosmtplib_clients(server):
    clients, per_client = 25, 3

    async def one(n: int) -> None:
        async with aiosmtplib.SMTP(
            hostname=HOST, port=server.port, timeout=TIMEOUT, start_tls=False
        ) as client:
            for m in range(per_client):
                await client.sendmail(
                    f"sender{n}@example.com",
                    [f"rcpt{n}.{m}@example.com"],
                    f"Subject: {n}.{m}\r\n\r\nfrom client {n}, message {m}\r\n",
                )

    async def all_clients() -> None:
        await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(clients))), 20)

    asyncio.run(all_clients())
    total = clients * per_client
    wait_until(lambda: len(server.plugin.messages) == total, message=f"{total} messages")
    for delivered in server.plugin.messages:
        n, m = delivered.rcpt_tos[0][4:].split("@")[0].split(".")
        assert delivered.mail_from == f"sender{n}@example.com"
        expected = f"Subject: {n}.{m}\r\n\r\nfrom client {n}, message {m}\r\n"
        assert delivered.body == expected.encode()
    server.wait_connections(0)
    assert len(server.plugin.disconnected) == clients

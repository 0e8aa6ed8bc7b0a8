"""LMTP through the real daemon: ``examples/lmtp.toml`` served by ``bonzo
serve`` on a Unix socket and a TCP port, spoken to by :mod:`smtplib` and by
a raw client that reads every per-recipient reply; Maildir delivery that
refuses one broken mailbox alone; per-listener overrides; the socket file's
life cycle."""

from __future__ import annotations

import smtplib
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import DEADLINE, Daemon, daemon_env, daemons, free_port

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = b"From: a@example.com\r\nSubject: lmtp\r\n\r\nHello over LMTP.\r\n"


def read_reply(sock: socket.socket, buf: bytearray) -> bytes:
    """One whole reply (multi-line ones kept together)."""
    while True:
        end = 0
        while True:
            nl = buf.find(b"\r\n", end)
            if nl < 0:
                break
            line = buf[end : nl + 2]
            end = nl + 2
            if line[3:4] != b"-":
                reply = bytes(buf[:end])
                del buf[:end]
                return reply
        chunk = sock.recv(65536)
        assert chunk, f"connection closed; buffered {bytes(buf)!r}"
        buf += chunk


def lmtp_session(sock: socket.socket, recipients: list[str], body: bytes = MESSAGE) -> list[bytes]:
    """LHLO, one transaction (pipelined), QUIT; returns the replies after DATA."""
    buf = bytearray()
    sock.settimeout(DEADLINE)
    assert read_reply(sock, buf).startswith(b"220 store.example.org LMTP")
    sock.sendall(b"LHLO mta.example\r\n")
    assert b"PIPELINING" in read_reply(sock, buf)
    commands = b"MAIL FROM:<a@example.com>\r\n"
    commands += b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients)
    sock.sendall(commands + b"DATA\r\n")
    rcpt_replies = [read_reply(sock, buf) for _ in range(1 + len(recipients) + 1)]
    assert rcpt_replies[-1].startswith(b"354 "), rcpt_replies
    accepted = sum(1 for r in rcpt_replies[1:-1] if r.startswith(b"250 "))
    sock.sendall(body + b".\r\n")
    replies = [read_reply(sock, buf) for _ in range(accepted)]
    sock.sendall(b"QUIT\r\n")
    assert read_reply(sock, buf).startswith(b"221 ")
    return replies


def unix_connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE)
    sock.connect(str(path))
    return sock


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Daemon, Path, int, int]]:
    """examples/lmtp.toml on free ports, plus an SMTP listener with a small
    size limit of its own."""
    lmtp_port, smtp_port = free_port(), free_port()
    text = (ROOT / "examples" / "lmtp.toml").read_text()
    text = text.replace("port = 2424", f"port = {lmtp_port}")
    text = text.replace(
        "[plugins]",
        f'[[listeners]]\naddress = "127.0.0.1"\nport = {smtp_port}\n'
        "max_message_size = 100\n\n[plugins]",
    )
    config = tmp_path / "lmtp.toml"
    config.write_text(text)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, lmtp_port)
        daemon.wait_ready()
        yield daemon, tmp_path, lmtp_port, smtp_port


def stored(root: Path, address: str) -> list[bytes]:
    local, domain = address.split("@")
    new = root / "mail" / domain / local / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def test_check_lists_the_listeners_and_their_overrides(tmp_path):
    config = tmp_path / "lmtp.toml"
    config.write_text((ROOT / "examples" / "lmtp.toml").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "bonzo", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=daemon_env(),
    )
    assert result.returncode == 0, result.stderr
    assert f"    unix:{tmp_path}/lmtp.sock: LMTP\n" in result.stdout
    assert (
        "    127.0.0.1:2424: LMTP, max_message_size = 104857600, max_connections_per_ip = 100\n"
        in result.stdout
    )


def test_lmtp_on_the_unix_socket_answers_each_recipient(store):
    daemon, root, _, _ = store
    sock_path = root / "lmtp.sock"
    assert stat.S_ISSOCK(sock_path.stat().st_mode)
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o660
    # A regular file where bob's maildir would go: his delivery fails, alone.
    (root / "mail" / "example.org").mkdir(parents=True)
    (root / "mail" / "example.org" / "bob").write_text("not a maildir")
    with unix_connect(sock_path) as sock:
        replies = lmtp_session(
            sock,
            ["alice@example.org", "bob@example.org", "nobody@elsewhere.test", "carol@example.org"],
        )
    assert len(replies) == 3  # nobody@elsewhere.test was refused at RCPT
    assert replies[0].startswith(b"250 2.0.0 <alice@example.org> Ok: queued as ")
    assert replies[1] == b"451 4.3.0 Local error in processing\r\n"
    assert replies[2].startswith(b"250 2.0.0 <carol@example.org> Ok: queued as ")
    for who in ("alice@example.org", "carol@example.org"):
        [message] = stored(root, who)
        assert message.endswith(MESSAGE)
        assert b"with LMTP id " in message
    log = daemon.log
    assert "maildir: message" in log and "not delivered to" in log
    # One refusal line per refused recipient, naming it.
    assert "451 4.3.0" in log and "bob@example.org" in log


def test_more_clients_at_once_than_the_default_limit_per_address(store):
    """Every client of the socket counts as one address, and the TCP
    listener's MTA is one address too: the example's limits, not the
    default 50, say how many of them are served at once."""
    _, root, lmtp_port, _ = store
    for connect in (
        lambda: unix_connect(root / "lmtp.sock"),
        lambda: socket.create_connection(("127.0.0.1", lmtp_port), timeout=DEADLINE),
    ):
        socks = []
        try:
            for _ in range(60):
                socks.append(connect())
            greetings = [read_reply(sock, bytearray()) for sock in socks]
        finally:
            for sock in socks:
                sock.close()
        assert [g for g in greetings if not g.startswith(b"220 ")] == []


def test_lmtp_over_tcp_with_smtplib(store):
    daemon, root, lmtp_port, _ = store
    with smtplib.LMTP("127.0.0.1", lmtp_port, local_hostname="mta.test", timeout=DEADLINE) as c:
        code, _ = c.ehlo()  # smtplib.LMTP sends LHLO
        assert code == 250 and c.does_esmtp
        assert c.sendmail("a@example.com", ["dave@example.org"], MESSAGE) == {}
    [message] = stored(root, "dave@example.org")
    assert message.endswith(MESSAGE)
    with socket.create_connection(("127.0.0.1", lmtp_port), timeout=DEADLINE) as sock:
        buf = bytearray()
        read_reply(sock, buf)
        sock.sendall(b"EHLO mta.test\r\n")
        assert (
            read_reply(sock, buf) == b"500 5.5.1 Error: this is an LMTP server, greet with LHLO\r\n"
        )


def test_each_listener_has_its_own_limits(store):
    daemon, root, lmtp_port, smtp_port = store
    big = MESSAGE + b"x" * 500 + b"\r\n"
    with smtplib.SMTP("127.0.0.1", smtp_port, local_hostname="c.test", timeout=DEADLINE) as c:
        c.ehlo()
        assert c.esmtp_features["size"] == "100"
        with pytest.raises(smtplib.SMTPSenderRefused) as info:  # SIZE= at MAIL
            c.sendmail("a@example.com", ["erin@example.org"], big)
        assert info.value.smtp_code == 552
    with socket.create_connection(("127.0.0.1", lmtp_port), timeout=DEADLINE) as sock:
        [reply] = lmtp_session(sock, ["erin@example.org"], big)
    assert reply.startswith(b"250 ")
    assert stored(root, "erin@example.org")[0].endswith(big)


def test_the_socket_file_is_removed_at_stop_and_a_stale_one_replaced(store, tmp_path):
    daemon, root, lmtp_port, _ = store
    sock_path = root / "lmtp.sock"
    config = root / "lmtp.toml"
    # A second server on the same socket path must not steal it.
    other = config.read_text().replace(f"port = {lmtp_port}", f"port = {free_port()}")
    second = root / "second.toml"
    second.write_text(other)
    result = subprocess.run(
        [sys.executable, "-m", "bonzo", "serve", "-c", str(second)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=daemon_env(),
        cwd=root,
    )
    assert result.returncode == 1
    assert f"cannot listen on unix:{sock_path}: a server is already listening there" in (
        result.stderr
    )
    with unix_connect(sock_path) as sock:
        assert sock.recv(100).startswith(b"220 ")  # the first one still serves
    assert daemon.stop() == 0
    assert not sock_path.exists()

    # A socket file nobody answers on (a server killed with SIGKILL) is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()
    assert stat.S_ISSOCK(sock_path.stat().st_mode)
    with daemons(root, daemon_env()) as start:
        again = start(config, lmtp_port)
        again.wait_ready()
        with unix_connect(sock_path) as sock:
            assert lmtp_session(sock, ["frank@example.org"])[0].startswith(b"250 ")
        again.stop()


def test_a_path_that_is_not_a_socket_is_never_replaced(tmp_path):
    (tmp_path / "lmtp.sock").write_text("precious")
    config = tmp_path / "c.toml"
    config.write_text('[[listeners]]\npath = "lmtp.sock"\nprotocol = "lmtp"\n')
    result = subprocess.run(
        [sys.executable, "-m", "bonzo", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=daemon_env(),
        cwd=tmp_path,
    )
    # A configuration error (status 2), which bonzo check reports too.
    assert result.returncode == 2
    assert "listeners[0].path:" in result.stderr
    assert "exists and is not a socket (remove it first)" in result.stderr
    assert (tmp_path / "lmtp.sock").read_text() == "precious"


def test_proxy_header_on_a_unix_socket_names_the_client(tmp_path):
    """A Unix socket listener behind a local proxy: the socket's permissions
    decide who connects (proxy_trusted, which a Unix peer's missing address
    cannot match, is refused there), and the PROXY header names the client
    everything else sees."""
    config = tmp_path / "proxy.toml"
    port = free_port()
    config.write_text(
        f"""
        [server]
        hostname = "store.example.org"

        [[listeners]]
        address = "127.0.0.1"
        port = {port}

        [[listeners]]
        path = "smtp.sock"
        proxy_protocol = true

        [plugins]
        enabled = ["recipients", "maildir"]
        [plugins.recipients]
        domains = ["example.org"]
        [plugins.maildir]
        path = "mail"
        per_recipient = true
        """.replace("\n        ", "\n")
    )
    check = subprocess.run(
        [sys.executable, "-m", "bonzo", "check", "-c", str(config)],
        capture_output=True, text=True, timeout=DEADLINE, env=daemon_env(),
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    assert (
        f"    unix:{tmp_path}/smtp.sock: SMTP, PROXY from whoever may open the socket\n"
    ) in check.stdout
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        with unix_connect(tmp_path / "smtp.sock") as sock:
            sock.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.25 40000 25\r\n")
            buf = bytearray()
            assert read_reply(sock, buf).startswith(b"220 ")
            sock.sendall(
                b"EHLO client.example\r\nMAIL FROM:<a@example.com>\r\n"
                b"RCPT TO:<gina@example.org>\r\nDATA\r\n"
            )
            replies = [read_reply(sock, buf) for _ in range(4)]
            assert replies[-1].startswith(b"354 ")
            sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
            assert read_reply(sock, buf).startswith(b"250 ")
        daemon.stop()
    [message] = stored(tmp_path, "gina@example.org")
    assert b"Received: from client.example ([198.51.100.7])" in message

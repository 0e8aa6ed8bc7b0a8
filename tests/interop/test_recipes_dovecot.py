"""The "MX in front of Dovecot" recipe (``examples/mx-dovecot.toml``) as a
real daemon in front of a private Dovecot LMTP server: a known user's
message is stored byte-exact in Dovecot's Maildir, an unknown user is
refused at RCPT (no backscatter later), a user over quota is deferred in
the queue while the others are delivered, and mail to the postmaster —
``postmaster@example.org``, which is always accepted, and the bare
``<postmaster>`` — reaches the postmaster's mailbox, never a bounce."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_support import DEADLINE, daemon_env, daemons, free_port

from .dovecot import Dovecot
from .peers import wait_until

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def body(subject: str, lines: int) -> bytes:
    head = f"From: sender@elsewhere.test\r\nTo: users@example.org\r\nSubject: {subject}\r\n\r\n"
    return head.encode() + b"Some text for the mailbox, line after line.\r\n" * lines


def test_mx_in_front_of_dovecot(tmp_path: Path, dovecot: Dovecot) -> None:
    port = free_port()
    text = (ROOT / "examples" / "mx-dovecot.toml").read_text()
    for old, new in (
        ("port = 2528", f"port = {port}"),
        ("/run/dovecot/lmtp", dovecot.socket_path),
    ):
        assert old in text, old
        text = text.replace(old, new)
    # Dovecot's test users; a long back-off keeps the deferred one queued.
    text = text.replace('path = "queue"', 'path = "queue"\nscan_interval = 1\nmin_backoff = 3600')
    # The shipped list (postmaster included), and Dovecot's third user.
    users = (ROOT / "examples" / "users.txt").read_text()
    assert "\npostmaster@example.org\n" in users
    (tmp_path / "users.txt").write_text(users + "carol@example.org\n")
    config = tmp_path / "mx-dovecot.toml"
    config.write_text(text)
    big = body("over quota", 60)  # more than bob's 1 KB quota
    small = body("fits", 2)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="mta.elsewhere.test") as c:
            c.ehlo()
            c.mail("sender@elsewhere.test")
            assert c.rcpt("alice@example.org")[0] == 250
            assert c.rcpt("bob@example.org")[0] == 250
            code, reply = c.rcpt("mallory@example.org")
            assert (code, reply[:5]) == (550, b"5.1.1")
            code, reply = c.rcpt("someone@elsewhere.test")
            assert (code, reply[:5]) == (554, b"5.7.1")  # not an open relay
            assert c.data(big)[0] == 250
            assert c.sendmail("sender@elsewhere.test", ["carol@example.org"], small) == {}
            to_postmaster = body("to the postmaster", 2)
            assert (
                c.sendmail("sender@elsewhere.test", ["postmaster@example.org"], to_postmaster) == {}
            )
            bare = body("to the bare postmaster", 2)
            assert c.sendmail("sender@elsewhere.test", ["Postmaster"], bare) == {}

        def stored(user: str, subject: str) -> list[bytes]:
            wanted = f"Subject: {subject}\r\n".encode()
            return [m for m in dovecot.messages(user) if wanted in m]

        wait_until(lambda: stored("alice", "over quota"), DEADLINE, "alice's message")
        wait_until(lambda: stored("carol", "fits"), DEADLINE, "carol's message")
        wait_until(lambda: stored("postmaster", "to the postmaster"), DEADLINE, "postmaster@")
        wait_until(lambda: stored("postmaster", "to the bare postmaster"), DEADLINE, "<postmaster>")
        [copy] = stored("alice", "over quota")
        assert copy.endswith(big)
        assert b"by mx.example.org (Bonzo)" in copy  # Bonzo's trace, kept under Dovecot's
        assert stored("bob", "over quota") == []

        def bob_deferred() -> str | None:
            listing = _queue(tmp_path, config)
            # Bob's message alone: the others delivered, and no report queued.
            return (
                listing if "bob@example.org" in listing and "-- 1 message(s)" in listing else None
            )

        listing = wait_until(bob_deferred, DEADLINE, "bob's recipient in the queue listing")
        assert "452 4.2.2" in listing and "1 deferred" in listing
        assert "alice@example.org" not in listing and "carol@example.org" not in listing
        assert "postmaster" not in listing
        assert daemon.stop() == 0


def _queue(cwd: Path, config: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bonzo", "queue", "-c", str(config), "list"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(),
    )
    assert result.returncode == 0, result.stderr
    return result.stdout

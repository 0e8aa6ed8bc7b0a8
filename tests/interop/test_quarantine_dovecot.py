"""Quarantine through the ``queue`` plugin onto a transport that delivers
by recipient: a real ``bonzo serve`` whose milter (the scripted fake) asks
for a quarantine, and whose routes and quarantine transport are a private
Dovecot LMTP server. A quarantined message reaches the quarantine mailbox
(``quarantine_recipient``) and never its own recipients' mailboxes."""

from __future__ import annotations

import email
import email.policy
import re
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest
from daemon_support import DEADLINE, daemon_env, daemons, free_port
from milter_fake import FakeMilter

from bonzo import milter as m

from .dovecot import Dovecot
from .peers import wait_until

pytestmark = pytest.mark.timeout(120)

SENDER = "sender@elsewhere.test"


def body(subject: str) -> bytes:
    head = f"From: {SENDER}\r\nTo: users@example.org\r\nSubject: {subject}\r\n\r\n"
    return head.encode() + b"A line of the suspect message.\r\n"


def config(tmp_path: Path, port: int, milter: FakeMilter, dovecot: Dovecot) -> Path:
    path = tmp_path / "bonzo.toml"
    path.write_text(f"""\
[server]
hostname = "mx.example.org"

[[listeners]]
address = "127.0.0.1"
port = {port}

[plugins]
enabled = ["milter", "recipients", "queue"]

[plugins.recipients]
domains = ["example.org"]

[[plugins.milter.milters]]
name = "scan"
socket = "{milter.spec}"

[plugins.queue]
path = "queue"
scan_interval = 1
quarantine = "mailboxes"
quarantine_recipient = "postmaster@example.org"

[plugins.queue.routes]
"example.org" = "mailboxes"

[plugins.queue.transports.mailboxes]
type = "lmtp"
path = "{dovecot.socket_path}"
""")
    return path


def stored(dovecot: Dovecot, user: str, subject: str) -> list[bytes]:
    wanted = f"Subject: {subject}\r\n".encode()
    return [message for message in dovecot.messages(user) if wanted in message]


def test_a_quarantined_message_goes_to_the_quarantine_recipient_only(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    port = free_port()
    eom = [m.QuarantineRequest("held by scan"), m.Verdict(m.R_CONTINUE)]
    with FakeMilter(end_of_message=eom) as milter, daemons(tmp_path, daemon_env()) as start:
        daemon = start(config(tmp_path, port, milter, dovecot), port)
        daemon.wait_ready()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="mta.elsewhere.test") as client:
            refused = client.sendmail(
                SENDER, ["carol@example.org", "alice@example.org"], body("suspect")
            )
            assert refused == {}
        wait_until(
            lambda: stored(dovecot, "postmaster", "suspect"), DEADLINE, "the quarantine copy"
        )
        [copy] = stored(dovecot, "postmaster", "suspect")
        assert b"\r\nX-Bonzo-Quarantine: milter: held by scan\r\n" in copy
        assert b"Delivered-To: postmaster@example.org\r\n" in copy
        assert daemon.stop() == 0
    # The queue is empty (delivered), and the recipients got nothing.
    assert not list((tmp_path / "queue" / "data").iterdir())
    assert stored(dovecot, "carol", "suspect") == []
    assert stored(dovecot, "alice", "suspect") == []
    # The copy names them (milter3 M2), and the release the queue's README
    # gives delivers it to them, past the filters.
    assert b"X-Bonzo-Quarantine-Recipients: <carol@example.org>, <alice@example.org>\r\n" in copy
    release(tmp_path, copy, dovecot)
    for user in ("carol", "alice"):
        [released] = stored(dovecot, user, "suspect")
        assert b"X-Bonzo-Quarantine: milter: held by scan\r\n" in released
        assert b"\r\n\r\nA line of the suspect message.\r\n" in released


def release(tmp_path: Path, copy: bytes, dovecot: Dovecot) -> None:
    """The release the queue's README gives: the sender from the copy's
    ``Return-Path:``, the recipients from ``X-Bonzo-Quarantine-Recipients:``,
    delivered with swaks straight to the mailbox server."""
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (.ci/run installs it)")
    path = tmp_path / "copy.eml"
    path.write_bytes(copy)
    message = email.message_from_bytes(copy, policy=email.policy.compat32)
    sender = message["Return-Path"].strip("<>")
    recipients = re.findall(r"<([^>]*)>", message["X-Bonzo-Quarantine-Recipients"])
    argv = [
        "swaks", "--protocol", "LMTP", "--socket", dovecot.socket_path,
        "--from", sender, "--to", ",".join(recipients), "--data", f"@{path}",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_quarantine_stands_when_the_milter_removes_every_recipient(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    # QUARANTINE and DELRCPT of the only recipient: the message was
    # discarded, its quarantine lost (tester milter3 M1).
    port = free_port()
    eom = [
        m.QuarantineRequest("held and removed"),
        m.RecipientChange(m.R_DELRCPT, "<carol@example.org>"),
        m.Verdict(m.R_CONTINUE),
    ]
    with FakeMilter(end_of_message=eom) as milter, daemons(tmp_path, daemon_env()) as start:
        daemon = start(config(tmp_path, port, milter, dovecot), port)
        daemon.wait_ready()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="mta.elsewhere.test") as client:
            assert client.sendmail(SENDER, ["carol@example.org"], body("removed")) == {}
        wait_until(
            lambda: stored(dovecot, "postmaster", "removed"), DEADLINE, "the quarantine copy"
        )
        [copy] = stored(dovecot, "postmaster", "removed")
        assert b"\r\nX-Bonzo-Quarantine: milter: held and removed\r\n" in copy
        assert " discarded" not in daemon.log
        assert daemon.stop() == 0
    assert stored(dovecot, "carol", "removed") == []

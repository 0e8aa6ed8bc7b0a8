"""Quarantine through the ``queue`` plugin onto a transport that delivers
by recipient: a real ``bonzo serve`` whose milter (the scripted fake) asks
for a quarantine, and whose routes and quarantine transport are a private
Dovecot LMTP server. A quarantined message reaches the quarantine mailbox
(``quarantine_recipient``) and never its own recipients' mailboxes."""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
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
    return write_config(
        tmp_path,
        port,
        milter,
        dovecot,
        'quarantine = "mailboxes"\nquarantine_recipient = "postmaster@example.org"',
    )


def write_config(
    tmp_path: Path, port: int, milter: FakeMilter, dovecot: Dovecot, queue_keys: str
) -> Path:
    """The milter, then the queue: routes to Dovecot's LMTP, and the
    quarantine as ``queue_keys`` say (TOML for the end of [plugins.queue])."""
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
{queue_keys}

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


def reload_config(
    tmp_path: Path, port: int, milter: FakeMilter, dovecot: Dovecot, quar: str
) -> Path:
    """Routes to Dovecot; the quarantine transport ``quar`` as given (its
    TOML table body, and any ``quarantine_recipient`` line)."""
    keys = f'min_backoff = 1\nmax_backoff = 1\nquarantine = "quar"\n{quar}'
    return write_config(tmp_path, port, milter, dovecot, keys)


def queue_cli(config: Path, *args: str) -> str:
    argv = [sys.executable, "-m", "bonzo", "queue", "-c", str(config), *args]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=daemon_env(), cwd=config.parent
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_queued_quarantine_never_reaches_its_recipients_after_a_reload(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    # Quarantined for its recipients in a one-folder maildir that defers;
    # a reload makes the name "quar" an LMTP transport with a
    # quarantine_recipient: the message went to carol's and alice's
    # mailboxes (tester review9 H1). It waits; back to a folder, it is kept.
    port = free_port()
    folder = tmp_path / "quar"
    one_folder = f'[plugins.queue.transports.quar]\ntype = "maildir"\npath = "{folder}"'
    by_recipient = (
        'quarantine_recipient = "postmaster@example.org"\n\n'
        f'[plugins.queue.transports.quar]\ntype = "lmtp"\npath = "{dovecot.socket_path}"'
    )
    eom = [m.QuarantineRequest("held by scan"), m.Verdict(m.R_CONTINUE)]
    with FakeMilter(end_of_message=eom) as milter, daemons(tmp_path, daemon_env()) as start:
        config = reload_config(tmp_path, port, milter, dovecot, one_folder)
        daemon = start(config, port)
        daemon.wait_ready()
        (folder / "tmp").rmdir()
        (folder / "tmp").write_text("not a directory: the folder defers")
        with smtplib.SMTP("127.0.0.1", port, local_hostname="mta.elsewhere.test") as client:
            refused = client.sendmail(
                SENDER, ["carol@example.org", "alice@example.org"], body("reloaded")
            )
            assert refused == {}
        wait_until(lambda: "Not a directory" in daemon.log, DEADLINE, "the folder to defer")
        reload_config(tmp_path, port, milter, dovecot, by_recipient)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: daemon.log.count("quarantined message not delivered: transport 'quar'") >= 2,
            DEADLINE,
            "two attempts refused",
        )
        assert stored(dovecot, "carol", "reloaded") == []
        assert stored(dovecot, "alice", "reloaded") == []
        assert stored(dovecot, "postmaster", "reloaded") == []
        listing = queue_cli(config, "list")
        assert "451 4.3.5 Quarantine transport delivers by recipient" in listing
        # Made a (working) one-folder maildir again: kept there.
        (folder / "tmp").unlink()
        (folder / "tmp").mkdir()
        reload_config(tmp_path, port, milter, dovecot, one_folder)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: list((folder / "new").iterdir()), DEADLINE, "the folder copy")
        assert daemon.stop() == 0
    assert b"X-Bonzo-Quarantine: milter: held by scan\r\n" in (
        next((folder / "new").iterdir()).read_bytes()
    )
    assert stored(dovecot, "carol", "reloaded") == []
    assert stored(dovecot, "alice", "reloaded") == []


def test_a_quarantine_copy_refused_for_good_is_held(tmp_path: Path, dovecot: Dovecot) -> None:
    # Dovecot refuses the unknown quarantine_recipient (550 5.1.1): the copy
    # was dropped with a WARNING (tester review9 H2). Held, no report to
    # the sender; `bonzo queue release` tries it again.
    port = free_port()
    wrong = (
        'quarantine_recipient = "review@example.org"\n\n'
        f'[plugins.queue.transports.quar]\ntype = "lmtp"\npath = "{dovecot.socket_path}"'
    )
    eom = [m.QuarantineRequest("held by scan"), m.Verdict(m.R_CONTINUE)]
    with FakeMilter(end_of_message=eom) as milter, daemons(tmp_path, daemon_env()) as start:
        config = reload_config(tmp_path, port, milter, dovecot, wrong)
        daemon = start(config, port)
        daemon.wait_ready()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="mta.elsewhere.test") as client:
            client.ehlo()
            client.mail(SENDER)
            assert client.rcpt("carol@example.org", ["NOTIFY=FAILURE,SUCCESS"])[0] == 250
            assert client.data(body("refused"))[0] == 250
        wait_until(lambda: "held, not bounced: 550" in daemon.log, DEADLINE, "the hold")
        assert "bounced: 550" not in daemon.log.replace("not bounced: 550", "")
        [id] = os.listdir(tmp_path / "queue" / "data")
        assert f"then `bonzo queue release {id}`" in daemon.log
        [line] = [x for x in queue_cli(config, "list").splitlines() if x.startswith(id)]
        assert line.split()[-2] == "held"
        # The sender got no report; the queue holds the copy alone.
        assert "report" not in daemon.log
        assert stored(dovecot, "carol", "refused") == []
        # Released: tried again at once (still refused here: held again).
        queue_cli(config, "release", id)
        wait_until(
            lambda: daemon.log.count("held, not bounced: 550") >= 2, DEADLINE, "a second try"
        )
        assert os.listdir(tmp_path / "queue" / "data") == [id]
        assert daemon.stop() == 0

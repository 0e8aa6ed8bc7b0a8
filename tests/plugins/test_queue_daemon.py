"""The queue in the real daemon: several workers deliver every message once,
``kill -9`` at any moment loses no message that got ``250``, and ``bonzo
queue`` manages the queue of a running or a stopped daemon."""

from __future__ import annotations

import concurrent.futures
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_support import DEADLINE, daemon_env, daemons, free_port, wait_until

CONFIG = """
[server]
hostname = "mx.example.org"
workers = {workers}

[[listeners]]
address = "127.0.0.1"
port = {port}

[plugins]
enabled = ["recipients", "queue"]

[plugins.recipients]
domains = ["example.org", "example.net"]

[plugins.queue]
path = "queue"
scan_interval = 1
min_backoff = 1
max_backoff = 2

[plugins.queue.routes]
"example.org" = {{ type = "maildir", path = "mail", per_recipient = true }}
"""


def write_config(root: Path, workers: int = 1) -> tuple[Path, int]:
    port = free_port()
    text = CONFIG.format(port=port, workers=workers)
    config = root / "bonzo.toml"
    config.write_text(text)
    return config, port


def message(n: int) -> bytes:
    head = f"From: a@example.org\r\nSubject: message {n}\r\nX-Number: {n}\r\n"
    return f"{head}\r\nBody {n}.\r\n".encode()


def delivered(root: Path, local: str = "bob") -> list[int]:
    new = root / "mail" / "example.org" / local / "new"
    if not new.is_dir():
        return []
    numbers = []
    for path in new.iterdir():
        for line in path.read_bytes().split(b"\r\n"):
            if line.startswith(b"X-Number: "):
                numbers.append(int(line[10:]))
    return sorted(numbers)


def send(port: int, n: int, rcpt: str = "bob@example.org") -> bool:
    """True if the message got 250."""
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=5) as c:
            c.sendmail("alice@example.org", [rcpt], message(n))
        return True
    except (OSError, smtplib.SMTPException):
        return False


def bonzo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bonzo", *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=daemon_env(),
        cwd=cwd,
    )


def queue_list(config: Path) -> str:
    return bonzo("queue", "-c", str(config), "list", cwd=config.parent).stdout


def test_several_workers_deliver_each_message_once(tmp_path):
    config, port = write_config(tmp_path, workers=3)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready(workers=3)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            accepted = list(pool.map(lambda n: send(port, n), range(40)))
        assert all(accepted)
        wait_until(lambda: len(delivered(tmp_path)) >= 40, what="40 deliveries")
        time.sleep(1.5)  # a second scan by every worker: still no duplicate
        assert daemon.stop() == 0
    assert delivered(tmp_path) == list(range(40))
    assert list((tmp_path / "queue" / "data").iterdir()) == []


def test_kill_9_never_loses_a_message_that_got_250(tmp_path):
    """Kill the daemon (supervisor and workers) at random moments while
    clients send and the queue delivers; restart; repeat. Every message
    answered 250 is delivered in the end (a duplicate is allowed: the
    delivery in flight at the kill may be repeated)."""
    config, port = write_config(tmp_path, workers=2)
    rng = random.Random(20261204)
    accepted: list[int] = []
    number = 0
    with daemons(tmp_path, daemon_env()) as start:
        for _ in range(6):
            daemon = start(config, port)
            daemon.wait_ready(workers=2)
            deadline = time.monotonic() + rng.uniform(0.2, 0.8)
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                futures = {}
                while time.monotonic() < deadline:
                    futures[pool.submit(send, port, number)] = number
                    number += 1
                    time.sleep(0.01)
                daemon.kill()  # SIGKILL to the whole process group
                for future, n in futures.items():
                    if future.result():
                        accepted.append(n)
        daemon = start(config, port)
        daemon.wait_ready(workers=2)
        wait_until(
            lambda: set(accepted) <= set(delivered(tmp_path)),
            timeout=30,
            what="every accepted message to be delivered",
        )
        assert daemon.stop() == 0
    got = delivered(tmp_path)
    assert set(accepted) <= set(got)
    assert len(accepted) > 20
    # Only messages answered 250 (or whose answer the kill cut off) arrive.
    assert set(got) <= set(range(number))
    assert list((tmp_path / "queue" / "tmp").iterdir()) == []


class MidData:
    """A session stopped halfway through DATA (its message's first half sent)."""

    def __init__(self, port: int, n: int) -> None:
        self.n = n
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.file = self.sock.makefile("rb")
        self.reply()
        for command in ("EHLO client.test", "MAIL FROM:<alice@example.org>",
                        "RCPT TO:<bob@example.org>", "DATA"):  # fmt: skip
            self.sock.sendall(command.encode() + b"\r\n")
            self.reply()
        self.body = message(n)
        self.sock.sendall(self.body[:20])

    def reply(self) -> bytes:
        while True:
            line = self.file.readline()
            assert line, "the server closed the connection"
            if line[3:4] != b"-":
                return line

    def finish(self) -> bytes:
        """The rest of the message and the final dot: the reply to it."""
        self.sock.sendall(self.body[20:] + b".\r\n")
        answer = self.reply()
        self.sock.sendall(b"QUIT\r\n")
        self.file.close()
        self.sock.close()
        return answer


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_fails_no_session_finishing_on_the_previous_configuration(tmp_path, workers):
    """A reload sets the queue up again in the running process: it used to
    take the previous configuration's spare new files for a crash's
    leftovers and remove them, so the next sessions to finish on it got
    ``451 4.3.0``. Each gets 250, and each message is delivered once."""
    config, port = write_config(tmp_path, workers=workers)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready(workers=workers)
        # The committers make files ready for the next messages (and drop
        # them after 5 s idle): the sessions open now find them.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert all(pool.map(lambda n: send(port, n), range(8)))
        sessions = [MidData(port, n) for n in range(100, 106)]
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: daemon.log.count("reloaded ") == workers, what="every worker to reload")
        answers = [session.finish() for session in sessions]
        assert all(a.startswith(b"250 ") for a in answers), answers
        assert send(port, 200)  # and on the new configuration
        numbers = [*range(8), *range(100, 106), 200]
        wait_until(lambda: len(delivered(tmp_path)) >= len(numbers), what="every delivery")
        assert daemon.stop() == 0
    assert delivered(tmp_path) == numbers
    assert "a crash left" not in daemon.log and "ERROR" not in daemon.log
    assert list((tmp_path / "queue" / "tmp").iterdir()) == []


def test_the_queue_command(tmp_path):
    config, port = write_config(tmp_path)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        # example.net has no route: the message waits, deferred.
        assert send(port, 1, "carol@example.net")
        assert send(port, 2, "dave@example.net")
        wait_until(lambda: "No route configured" in queue_list(config), what="deferral")
        summary = "-- 2 message(s) in " + str(tmp_path / "queue") + ": 2 deferred"
        listings: list[Any] = []

        def both_deferred() -> bool:
            # A retry every second: a listing taken during one shows the
            # message "delivering" (its claim held); the next one does not.
            listings.append(bonzo("queue", "-c", str(config), "list", cwd=tmp_path))
            return listings[-1].stdout.rstrip().endswith(summary)

        wait_until(both_deferred, what="a listing between retries")
        listing = listings[-1]
        assert listing.returncode == 0, listing.stderr
        ids = [
            line.split()[0]
            for line in listing.stdout.splitlines()
            if not line.startswith((" ", "--"))
        ]
        assert len(ids) == 2
        # A retry every second (min_backoff = 1): one attempt or more by now.
        assert re.search(r"<carol@example.net>  deferred, \d+ attempt\(s\)", listing.stdout)
        assert "451 4.3.5 No route configured" in listing.stdout

        show = bonzo("queue", "-c", str(config), "show", ids[0], cwd=tmp_path)
        assert "sender:    <alice@example.org>" in show.stdout
        assert "remote_ip: 127.0.0.1" in show.stdout

        assert bonzo("queue", "-c", str(config), "hold", ids[0], cwd=tmp_path).returncode == 0
        held = bonzo("queue", "-c", str(config), "list", "--state", "held", cwd=tmp_path)
        assert held.stdout.startswith(ids[0]) and "1 held" in held.stdout
        flush = bonzo("queue", "-c", str(config), "flush", ids[0], cwd=tmp_path)
        assert flush.returncode == 0, flush.stderr
        assert flush.stdout == f"{ids[0]}: held, not due (release it to deliver it)\n"
        recent = bonzo("queue", "-c", str(config), "list", "--older-than", "1h", cwd=tmp_path)
        assert recent.returncode == 0 and recent.stdout.startswith("--")  # none that old
        bad_age = bonzo("queue", "-c", str(config), "list", "--older-than", "bogus", cwd=tmp_path)
        assert bad_age.returncode == 2 and "Traceback" not in bad_age.stderr
        assert "argument --older-than: expected a duration" in bad_age.stderr
        assert bonzo("queue", "-c", str(config), "release", ids[0], cwd=tmp_path).returncode == 0

        # bounce: the sender (at example.org, which has a route) gets a report.
        result = bonzo("queue", "-c", str(config), "bounce", ids[0], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "report queued as" in result.stdout
        wait_until(lambda: (tmp_path / "mail" / "example.org" / "alice" / "new").is_dir()
                   and any((tmp_path / "mail" / "example.org" / "alice" / "new").iterdir()),
                   what="the report to be delivered")  # fmt: skip
        [report] = (tmp_path / "mail" / "example.org" / "alice" / "new").iterdir()
        text = report.read_text()
        assert "Final-Recipient: rfc822; carol@example.net" in text
        assert "Returned to the sender by the postmaster" in text

        assert bonzo("queue", "-c", str(config), "delete", ids[1], cwd=tmp_path).returncode == 0
        empty = bonzo("queue", "-c", str(config), "list", cwd=tmp_path)
        assert empty.stdout.strip() == f"-- 0 message(s) in {tmp_path / 'queue'}"
        missing = bonzo("queue", "-c", str(config), "show", ids[1], cwd=tmp_path)
        assert missing.returncode == 1
        assert (
            missing.stderr.strip()
            == f"bonzo queue: {ids[1]}: no such message in {tmp_path / 'queue'}"
        )
        assert daemon.stop() == 0


def test_flush_makes_a_running_daemon_try_at_once(tmp_path):
    config, port = write_config(tmp_path)
    # Long back-off and scans: only the flush can make the second attempt soon.
    config.write_text(
        config.read_text()
        .replace("scan_interval = 1", "scan_interval = 3600")
        .replace("min_backoff = 1", "min_backoff = 3600")
        .replace("max_backoff = 2", "max_backoff = 3600")
    )
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        assert send(port, 7, "erin@example.net")
        wait_until(lambda: "1 attempt(s)" in queue_list(config), what="first attempt")
        flush = bonzo("queue", "-c", str(config), "flush", cwd=tmp_path)
        assert flush.returncode == 0 and "due now" in flush.stdout
        wait_until(
            lambda: "2 attempt(s)" in queue_list(config),
            timeout=10,
            what="a second attempt after the flush",
        )
        assert daemon.stop() == 0


def test_bad_queue_configuration_stops_the_daemon_with_one_line(tmp_path):
    config, port = write_config(tmp_path)
    config.write_text(config.read_text().replace("min_backoff = 1", "min_backoff = 'soon'"))
    result = bonzo("check", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            """min_backoff: expected a duration such as 30, "30s", "5m", "4h" or "5d", got 'soon'"""
        )
    )


def test_relay_by_mx_with_a_report_delivered_to_the_sender(tmp_path, dns_stub, start_server):
    """The whole delivery side in the daemon: the message goes by MX (found
    through a DNS server on 127.0.0.1) to a downstream that takes one
    recipient and refuses the other for good; the sender, a local user,
    finds the failure report in their maildir."""
    from e2e_support import RecordingPlugin

    from bonzo import errors

    class Downstream(RecordingPlugin):
        def bonzo_rcpt(self, address):  # type: ignore[no-untyped-def]
            if address.startswith("gone@"):
                raise errors.PermanentError("No such user", 550, "5.1.1")
            return super().bonzo_rcpt()

    downstream = start_server(plugin=Downstream(), hostname="mx.dest.test")
    dns_stub.add("dest.test", "MX", "10 mx.dest.test.")
    dns_stub.add("mx.dest.test", "A", "127.0.0.1")
    config, port = write_config(tmp_path)
    text = config.read_text().replace(
        'domains = ["example.org", "example.net"]', 'domains = ["example.org", "dest.test"]'
    )
    text += f'"*" = {{ type = "mx", port = {downstream.port} }}\n'
    text += f'\n[dns]\nnameservers = ["{dns_stub.nameserver}"]\ntimeout = 2\n'
    config.write_text(text)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=5) as c:
            c.sendmail("alice@example.org", ["bob@dest.test", "gone@dest.test"], message(42))
        alice = tmp_path / "mail" / "example.org" / "alice" / "new"
        wait_until(lambda: alice.is_dir() and any(alice.iterdir()), what="the report")
        [report] = alice.iterdir()
        text = report.read_text()
        assert "Final-Recipient: rfc822; gone@dest.test" in text
        assert "Diagnostic-Code: smtp; 550 5.1.1 No such user" in text
        assert "X-Number: 42" in text  # the original comes back with it
        assert daemon.stop() == 0
    assert [m.rcpt_tos for m in downstream.plugin.messages] == [["bob@dest.test"]]
    assert ("mx.dest.test", "A", "udp") in dns_stub.queries
    assert list((tmp_path / "queue" / "data").iterdir()) == []


def test_queue_list_shows_a_message_it_cannot_read(tmp_path):
    import io

    from bonzo_plugins.queue.spool import Spool

    config, _port = write_config(tmp_path)
    spool = Spool(tmp_path / "queue")
    spool.setup()
    for id in ("GOOD1", "BAD1"):
        envelope = {
            "arrival": time.time(),
            "sender": "alice@example.org",
            "mail_params": {},
            "recipients": [
                {"address": "carol@example.net", "canonical": "carol@example.net",
                 "domain": "example.net", "params": {}},
            ],
            "session": {"remote_ip": "192.0.2.1"},
            "records": {},
        }  # fmt: skip
        spool.write(id, envelope, b"", io.BytesIO(b"Subject: x\r\n\r\nx\r\n"))
    (spool.state / "BAD1.json").write_text("{ not json")

    listing = bonzo("queue", "-c", str(config), "list", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    [bad] = [line for line in lines if line.startswith("BAD1")]
    assert bad.startswith(f"BAD1  unreadable: {spool.state / 'BAD1.json'}: bad state")
    assert any(line.startswith("GOOD1") for line in lines)
    assert lines[-1] == f"-- 2 message(s) in {spool.path}: 1 pending, 1 unreadable"
    only = bonzo("queue", "-c", str(config), "list", "--state", "unreadable", cwd=tmp_path)
    assert [line.split()[0] for line in only.stdout.splitlines()[:-2]] == ["BAD1"]
    assert only.stdout.splitlines()[-1] == "-- 1 shown"
    pending = bonzo("queue", "-c", str(config), "list", "--state", "pending", cwd=tmp_path)
    assert "BAD1" not in pending.stdout and "GOOD1" in pending.stdout


def test_mail_to_the_bare_postmaster_goes_to_the_first_local_domains_postmaster(tmp_path):
    """RFC 5321 4.5.1: ``RCPT TO:<Postmaster>`` is accepted, and it must
    reach the postmaster: the queue delivers it as ``postmaster@`` the first
    local domain, by that domain's route (here the only one: no ``"*"``),
    where it used to be routed by the domain ``""`` and never delivered."""
    config, port = write_config(tmp_path)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        assert send(port, 7, rcpt="PostMaster")
        wait_until(lambda: delivered(tmp_path, "postmaster") == [7], what="the postmaster's copy")
        wait_until(lambda: not any((tmp_path / "queue" / "data").iterdir()), what="an empty queue")
        assert "mail to <postmaster> goes to <postmaster@example.org>" in daemon.log
        assert "no route" not in daemon.log
        assert daemon.stop() == 0
    [copy] = (tmp_path / "mail" / "example.org" / "postmaster" / "new").iterdir()
    assert b"Delivered-To: postmaster@example.org\r\n" in copy.read_bytes()


def test_the_postmaster_key_routes_the_bare_postmaster_and_reports_name_it(tmp_path, start_server):
    """With ``postmaster`` set, the bare ``<postmaster>`` goes to that
    address by its domain's route (to a real downstream here); a report
    about it names the address it was delivered as and, as
    ``Original-Recipient``, what the sender wrote."""
    from e2e_support import RecordingPlugin

    from bonzo import errors

    class Downstream(RecordingPlugin):
        def bonzo_rcpt(self, address):  # type: ignore[no-untyped-def]
            if address.startswith("gone-"):
                raise errors.PermanentError("No such user", 550, "5.1.1")
            return super().bonzo_rcpt()

    downstream = start_server(plugin=Downstream(), hostname="mail.example.net")
    config, port = write_config(tmp_path)
    text = config.read_text().replace(
        "max_backoff = 2\n", 'max_backoff = 2\npostmaster = "hostmaster@example.net"\n'
    )
    route = f'{{ type = "smarthost", host = "127.0.0.1", port = {downstream.port}, tls = "none" }}'
    config.write_text(text + f'"example.net" = {route}\n')
    checked = bonzo("check", "-c", str(config), cwd=tmp_path)
    assert checked.returncode == 0 and "warning" not in checked.stdout + checked.stderr
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        assert send(port, 8, rcpt="postmaster")
        wait_until(lambda: downstream.plugin.messages, what="the downstream's copy")
        assert [m.rcpt_tos for m in downstream.plugin.messages] == [["hostmaster@example.net"]]
        assert daemon.stop() == 0
    # The same address refused downstream: the report names both addresses.
    config.write_text(
        config.read_text().replace('"hostmaster@example.net"', '"gone-pm@example.net"')
    )
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        assert send(port, 9, rcpt="Postmaster")
        alice = tmp_path / "mail" / "example.org" / "alice" / "new"
        wait_until(lambda: alice.is_dir() and any(alice.iterdir()), what="the report")
        assert daemon.stop() == 0
    [report] = alice.iterdir()
    text = report.read_text()
    assert "Original-Recipient: rfc822; Postmaster" in text
    assert "Final-Recipient: rfc822; gone-pm@example.net" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user" in text


def test_no_route_for_the_postmaster_is_named_with_its_key(tmp_path):
    """Where the postmaster's address has no route, ``bonzo check`` says so
    and names the key; the daemon keeps the message (deferred, never
    bounced) and its error names the key too."""
    config, port = write_config(tmp_path)
    config.write_text(
        config.read_text().replace(
            'domains = ["example.org", "example.net"]', 'domains = ["example.net", "example.org"]'
        )
    )
    checked = bonzo("check", "-c", str(config), cwd=tmp_path)
    assert checked.returncode == 0
    assert (
        "warning: plugins.queue: mail to <postmaster> goes to <postmaster@example.net>, and "
        "no route matches 'example.net'"
    ) in checked.stdout + checked.stderr
    assert "[plugins.queue] postmaster" in checked.stdout + checked.stderr
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        assert send(port, 10, rcpt="postmaster")
        wait_until(lambda: "no route for <postmaster@example.net>" in daemon.log, what="the error")
        assert "[plugins.queue] postmaster)" in daemon.log
        listing = queue_list(config)
        assert "postmaster@example.net" in listing and "451 4.3.5" in listing
        # What the client wrote is shown: ORCPT, among the recipient's params.
        queue_id = listing.split()[0]
        show = bonzo("queue", "-c", str(config), "show", queue_id, cwd=tmp_path)
        assert "    params: ORCPT=rfc822;postmaster" in show.stdout, show.stdout
        assert daemon.stop() == 0

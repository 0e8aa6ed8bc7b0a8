"""NOTIFY=SUCCESS end to end (RFC 3461 5.2.2, 6.2), between two real
daemons: Bonzo A queues the message and relays it to Bonzo B, which
delivers it into a maildir. The sender gets exactly one "delivered" report:
from B's queue when B offers DSN, or from A when B, with nothing to send
reports, does not offer it."""

from __future__ import annotations

import email
import smtplib
import time
from pathlib import Path

from daemon_support import DEADLINE, daemon_env, daemons, free_port, wait_until

A_CONFIG = """
[server]
hostname = "mx.a.test"

[[listeners]]
address = "127.0.0.1"
port = {port}

[plugins]
enabled = ["recipients", "queue"]

[plugins.recipients]
domains = ["a.test", "b.test"]

[plugins.queue]
path = "queue"
scan_interval = 1
min_backoff = 1
max_backoff = 2

[plugins.queue.routes]
"a.test" = {{ type = "maildir", path = "mail", per_recipient = true }}
"b.test" = {route}
"""

B_CONFIG = """
[server]
hostname = "mx.b.test"

[[listeners]]
address = "127.0.0.1"
port = {port}

[[listeners]]
address = "127.0.0.1"
port = {lmtp}
protocol = "lmtp"

[plugins]
enabled = {enabled}

[plugins.recipients]
domains = ["b.test"]

[plugins.maildir]
path = "mail"
per_recipient = true
"""

B_QUEUE = """
[plugins.queue]
path = "queue"
scan_interval = 1
min_backoff = 1
max_backoff = 2

[plugins.queue.routes]
"a.test" = {{ type = "smarthost", host = "127.0.0.1", port = {a}, tls = "none" }}
"""

MESSAGE = b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: tell me\r\n\r\nHello.\r\n"


def mailbox(root: Path, domain: str, user: str) -> list[bytes]:
    new = root / "mail" / domain / user / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def ehlo(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=DEADLINE) as c:
        return c.ehlo()[1].decode()


def relay(tmp_path: Path, *, b_queue: bool, lmtp: bool) -> tuple[list[bytes], bytes, str, str]:
    """Send alice@a.test -> bob@b.test with NOTIFY=SUCCESS through A to B;
    alice's reports, bob's message, B's EHLO reply and A's log."""
    a_root, b_root = tmp_path / "a", tmp_path / "b"
    a_root.mkdir()
    b_root.mkdir()
    a_port, b_port, b_lmtp = free_port(), free_port(), free_port()
    if lmtp:
        route = f'{{ type = "lmtp", host = "127.0.0.1", port = {b_lmtp} }}'
    else:
        route = f'{{ type = "smarthost", host = "127.0.0.1", port = {b_port}, tls = "none" }}'
    (a_root / "bonzo.toml").write_text(A_CONFIG.format(port=a_port, route=route))
    # maildir first: it delivers; the queue after it only sends reports.
    enabled = '["recipients", "maildir", "queue"]' if b_queue else '["recipients", "maildir"]'
    text = B_CONFIG.format(port=b_port, lmtp=b_lmtp, enabled=enabled)
    if b_queue:
        text += B_QUEUE.format(a=a_port)
    (b_root / "bonzo.toml").write_text(text)
    with daemons(a_root, daemon_env()) as start_a, daemons(b_root, daemon_env()) as start_b:
        b = start_b(b_root / "bonzo.toml", b_port)
        b.wait_ready()
        a = start_a(a_root / "bonzo.toml", a_port)
        a.wait_ready()
        with smtplib.SMTP("127.0.0.1", a_port, local_hostname="client.test", timeout=5) as c:
            c.sendmail(
                "alice@a.test", ["bob@b.test"], MESSAGE, rcpt_options=["NOTIFY=SUCCESS,FAILURE"]
            )
        wait_until(lambda: mailbox(a_root, "a.test", "alice"), what="the report")
        time.sleep(2)  # time for a second report, if there were one
        reports = mailbox(a_root, "a.test", "alice")
        [delivered] = mailbox(b_root, "b.test", "bob")
        offered = ehlo(b_port)
        assert a.stop() == 0 and b.stop() == 0
        return reports, delivered, offered, a.log


def dsn_fields(raw: bytes) -> tuple[dict[str, str], dict[str, str]]:
    message = email.message_from_bytes(raw)
    assert message.get_content_type() == "multipart/report"
    per_message, per_recipient = message.get_payload()[1].get_payload()
    return dict(per_message.items()), dict(per_recipient.items())


def test_the_final_server_offers_dsn_and_its_queue_reports_the_delivery(tmp_path):
    """B offers DSN (its queue sends reports), so A passes NOTIFY on and
    sends nothing itself; B's maildir delivery is reported by B's queue."""
    reports, _, offered, a_log = relay(tmp_path, b_queue=True, lmtp=False)
    assert "DSN" in offered.split("\n")
    [report] = reports
    per_message, per_recipient = dsn_fields(report)
    assert per_message["Reporting-MTA"] == "dns; mx.b.test"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@b.test"
    assert per_recipient["Action"] == "delivered"
    assert per_recipient["Status"] == "2.0.0"
    assert "delivered report" not in a_log  # A left it to B


def test_a_server_that_sends_no_reports_offers_no_dsn_so_the_relay_reports(tmp_path):
    """B (maildir alone, over LMTP) would never send a report: it does not
    offer DSN, and A reports the delivery itself."""
    reports, delivered, offered, a_log = relay(tmp_path, b_queue=False, lmtp=True)
    assert "DSN" not in offered.split("\n")
    assert b"Subject: tell me" in delivered
    [report] = reports
    per_message, per_recipient = dsn_fields(report)
    assert per_message["Reporting-MTA"] == "dns; mx.a.test"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@b.test"
    assert per_recipient["Action"] == "delivered"
    assert "delivered report for 1 recipient(s)" in a_log


def test_a_maildir_delivery_without_notify_success_gets_no_report(tmp_path):
    b_root = tmp_path / "b"
    b_root.mkdir()
    port, a_port = free_port(), free_port()
    enabled = '["recipients", "maildir", "queue"]'
    text = B_CONFIG.format(port=port, lmtp=free_port(), enabled=enabled)
    (b_root / "bonzo.toml").write_text(text + B_QUEUE.format(a=a_port))
    with daemons(b_root, daemon_env()) as start:
        b = start(b_root / "bonzo.toml", port)
        b.wait_ready()
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=5) as c:
            c.sendmail("alice@a.test", ["bob@b.test"], MESSAGE, rcpt_options=["NOTIFY=FAILURE"])
            c.sendmail("", ["bob@b.test"], MESSAGE, rcpt_options=["NOTIFY=SUCCESS"])
        wait_until(lambda: len(mailbox(b_root, "b.test", "bob")) == 2, what="the deliveries")
        time.sleep(1)
        assert b.stop() == 0
        assert "report for" not in b.log
    assert not any((b_root / "queue" / "data").iterdir())

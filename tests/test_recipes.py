"""The delivery recipes of docs/delivery.rst run as real daemons.

``examples/submission-relay.toml``: a user submits over STARTTLS with AUTH;
the message is DKIM-signed, queued, and delivered by MX — found through a
DNS server on 127.0.0.1 — to a real Bonzo standing in for the recipient's
mail host, where the signature verifies; mail for a local user lands in
its maildir. (``examples/mx-dovecot.toml`` needs Dovecot:
``tests/interop/test_recipes_dovecot.py``.)
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import dkim
import pytest
import trustme
from bonzo_plugins.dkim_sign import dns_record, load_key
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from daemon_support import DEADLINE, daemon_env, daemons, free_port, wait_until
from e2e_support import RecordingPlugin

from bonzo.session import Envelope, Session

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = (
    "From: Alice <alice@example.org>\r\nTo: bob@elsewhere.test, carol@example.org\r\n"
    "Subject: relayed\r\nDate: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
    "Message-ID: <r1@example.org>\r\n\r\nOut to the world.\r\n"
)


class Store(RecordingPlugin):
    """The recipient's mail host: keeps each message's bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.contents: list[bytes] = []

    def bonzo_deliver(self, session: Session, envelope: Envelope) -> Any:
        self.contents.append(envelope.content)
        return super().bonzo_deliver(session, envelope)


def bonzo(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bonzo", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=daemon_env(),
    )


def test_submission_server_that_relays_to_the_internet(tmp_path, dns_stub, start_server):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    (tmp_path / "dkim").mkdir()
    key_path = tmp_path / "dkim" / "example.org.s1.pem"
    key_path.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    added = bonzo(
        "adduser",
        "-f",
        "passwd",
        "--password-stdin",
        "alice",
        cwd=tmp_path,
        stdin="correct horse battery\n",
    )
    assert added.returncode == 0, added.stderr

    host = start_server(plugin=Store(), hostname="mx.elsewhere.test")
    dns_stub.add("elsewhere.test", "MX", "10 mx.elsewhere.test.")
    dns_stub.add("mx.elsewhere.test", "A", "127.0.0.1")
    port587, port465 = free_port(), free_port()
    text = (ROOT / "examples" / "submission-relay.toml").read_text()
    for old, new in (
        ("port = 2588", f"port = {port587}"),
        ("port = 2466", f"port = {port465}"),
        ("auth_failure_delay = 2.0", "auth_failure_delay = 0.1"),
        ('nameservers = ["127.0.0.1"]', f'nameservers = ["{dns_stub.nameserver}"]\ntimeout = 2'),
        ('tls = "opportunistic" }', f'tls = "opportunistic", port = {host.port} }}'),
    ):
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / "submission-relay.toml"
    config.write_text(text)
    checked = bonzo("check", "-c", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr

    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port587)
        daemon.wait_ready()
        with smtplib.SMTP("127.0.0.1", port587, local_hostname="mua.test", timeout=DEADLINE) as c:
            c.starttls(context=ctx)
            c.ehlo()
            c.login("alice", "correct horse battery")
            refused = c.sendmail(
                "alice@example.org", ["bob@elsewhere.test", "carol@example.org"], MESSAGE
            )
            assert refused == {}
        wait_until(lambda: host.plugin.contents, what="the relayed message")
        carol = tmp_path / "mail" / "example.org" / "carol" / "new"
        wait_until(lambda: carol.is_dir() and any(carol.iterdir()), what="the local copy")
        wait_until(lambda: not any((tmp_path / "queue" / "data").iterdir()), what="an empty queue")
        assert daemon.stop() == 0
    [relayed] = host.plugin.contents
    assert [m.rcpt_tos for m in host.plugin.messages] == [["bob@elsewhere.test"]]
    assert relayed.endswith(MESSAGE.encode())
    record = dns_record(load_key(key_path)).encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == b"s1._domainkey.example.org." else None

    assert dkim.DKIM(relayed, logger=logging.getLogger("test.dkimpy")).verify(dnsfunc=dnsfunc)
    [local] = carol.iterdir()
    assert local.read_bytes().endswith(MESSAGE.encode())
    assert b"DKIM-Signature:" in local.read_bytes()  # signed before it was queued
    assert ("mx.elsewhere.test", "A", "udp") in dns_stub.queries
    assert "correct horse battery" not in daemon.log


@pytest.mark.parametrize("name", ["submission-relay.toml", "mx-dovecot.toml", "inbound-mx.toml"])
def test_the_recipes_name_what_they_need(tmp_path, name):
    """Checked as shipped, each recipe names the file it misses: the
    operator's first error is a clear one."""
    result = bonzo("check", "-c", str(ROOT / "examples" / name), cwd=tmp_path)
    if name in ("mx-dovecot.toml", "inbound-mx.toml"):
        assert result.returncode == 0, result.stderr  # nothing it needs is missing
    else:
        assert result.returncode != 0
        assert "submission-relay.toml" in result.stderr
        assert "Traceback" not in result.stderr

"""DKIM signatures of Bonzo's ``dkim_sign`` plugin, verified by OpenDKIM.

A verifier written apart from dkimpy (the library the plugin signs with)
checks what the plugin makes: OpenDKIM's test mode (``opendkim -t FILE``)
verifies a message file and exits, and its ``TestPublicKeys`` option names
a file of public key records it reads instead of asking DNS, so no packet
leaves the machine and no daemon is left running. OpenDKIM reports the
best signature of a message; a message signed twice is checked once with
each key.
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import smtplib
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from bonzo_plugins.dkim_sign import DkimSignPlugin, dns_record, load_key
from bonzo_plugins.headers import HeadersPlugin
from bonzo_plugins.maildir import MaildirPlugin
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from bonzo import Accept, hookimpl, testing
from bonzo.hooks import PluginSet
from bonzo.session import Envelope

from .peers import HOST, unavailable

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: OpenDKIM interop\r\n"
    b"Date: Thu, 1 Jan 2026 10:00:00 +0000\r\n"
    b"Message-ID: <interop@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Tabs\tand  spaces, trailing ones too \t \r\n"
    b"\r\n"
    b"Caf\xc3\xa9 \xe2\x80\x94 8-bit text.\r\n"
    b"\r\n"
    b"\r\n"
)


def opendkim() -> str:
    path = shutil.which("opendkim") or "/usr/sbin/opendkim"
    if not Path(path).is_file():
        unavailable("OpenDKIM is not installed (Debian package opendkim)")
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dkim-keys")
    made = {
        "rsa": rsa.generate_private_key(65537, 2048),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }
    paths = {}
    for name, key in made.items():
        path = root / f"{name}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
        paths[name] = path
    return paths


def verify(tmp_path: Path, content: bytes, *keys: tuple[str, str, Path]) -> str:
    """OpenDKIM's verdict on ``content``, given the public keys of
    (selector, domain, key file): its report line."""
    binary = opendkim()
    work = Path(tmp_path) / f"opendkim-{random.randrange(1 << 30):x}"
    work.mkdir()
    records = work / "keys"
    records.write_text(
        "".join(f"{sel}._domainkey.{dom} {dns_record(load_key(path))}\n" for sel, dom, path in keys)
    )
    conf = work / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {records}\n")
    message = work / "message"
    message.write_bytes(content)
    done = subprocess.run(
        [binary, "-x", str(conf), "-t", str(message)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    out = (done.stdout + done.stderr).decode("utf-8", "replace")
    lines = [line for line in out.splitlines() if "verification" in line]
    assert len(lines) == 1, out
    return lines[0]


def succeeded(line: str, selector: str, domain: str) -> bool:
    return bool(re.search(rf"\(s={selector}, d={re.escape(domain)}, .*\) succeeded$", line))


def configured(**table: Any) -> DkimSignPlugin:
    plugin = DkimSignPlugin()
    plugin.bonzo_configure(config=table, app=None)
    return plugin


def signed(plugin: DkimSignPlugin, body: bytes = MESSAGE) -> bytes:
    envelope = Envelope("alice@example.org")
    envelope.rcpt_tos.append("bob@example.net")
    envelope.write(body)
    envelope.add_header("Received", "from c.test ([192.0.2.1]) by mx.test; Thu, 1 Jan 2026")
    try:
        session = testing.make_session(auth="alice")
        asyncio.run(plugin.bonzo_message(session=session, envelope=envelope))
        return envelope.content
    finally:
        envelope.close()


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
@pytest.mark.parametrize(
    "canonicalization", ["relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"]
)
def test_opendkim_verifies_the_signature(tmp_path, keys, kind, canonicalization):
    plugin = configured(
        domains={"example.org": {"selector": "s1", "key": str(keys[kind])}},
        canonicalization=canonicalization,
        expire=86400,
    )
    content = signed(plugin)
    key = ("s1", "example.org", keys[kind])
    line = verify(tmp_path, content, key)
    assert succeeded(line, "s1", "example.org"), line
    # ... and refuses a changed message.
    changed = content.replace(b"8-bit text", b"8-bit texts")
    assert "failed" in verify(tmp_path, changed, key)


def test_opendkim_verifies_both_signatures_of_a_domain(tmp_path, keys):
    plugin = configured(
        domains={
            "example.org": [
                {"selector": "ed", "key": str(keys["ed25519"])},
                {"selector": "rsa", "key": str(keys["rsa"])},
            ]
        }
    )
    content = signed(plugin)
    assert content.count(b"DKIM-Signature:") == 2
    for selector, kind in (("ed", "ed25519"), ("rsa", "rsa")):
        line = verify(tmp_path, content, (selector, "example.org", keys[kind]))
        assert succeeded(line, selector, "example.org"), line


def test_opendkim_after_the_headers_plugin_and_oversigning(tmp_path, keys):
    headers = HeadersPlugin()
    headers.bonzo_configure(config={"add": {"X-Tag": "{message_id}"}}, app=None)
    plugin = configured(
        domains={"example.org": {"selector": "s1", "key": str(keys["rsa"])}},
        headers=["From", "To", "Subject", "X-Tag"],
    )
    envelope = Envelope("alice@example.org")
    envelope.rcpt_tos.append("bob@example.net")
    envelope.write(MESSAGE)
    try:
        session = testing.make_session(auth="alice")
        headers.bonzo_message(session=session, envelope=envelope)
        asyncio.run(plugin.bonzo_message(session=session, envelope=envelope))
        content = envelope.content
    finally:
        envelope.close()
    key = ("s1", "example.org", keys["rsa"])
    assert succeeded(verify(tmp_path, content, key), "s1", "example.org")
    # An oversigned field added in transit breaks it, for OpenDKIM too.
    assert "failed" in verify(tmp_path, b"Subject: Urgent\r\n" + content, key)


class AcceptAll:
    @hookimpl
    def bonzo_rcpt(self) -> Accept:
        return Accept()


def test_opendkim_verifies_what_a_real_server_stored(tmp_path, keys, start_server):
    """smtplib -> Bonzo (headers, dkim_sign, maildir) -> the stored files."""
    maildir = MaildirPlugin()
    maildir.bonzo_configure(
        config={"path": "Maildir", "per_recipient": True}, app=SimpleNamespace(base_dir=tmp_path)
    )
    headers = HeadersPlugin()
    headers.bonzo_configure(config={"add": {"X-Queue": "{message_id}"}}, app=None)
    plugin = configured(
        domains={
            "example.org": {"selector": "ed", "key": str(keys["ed25519"])},
            "example.net": {"selector": "rsa", "key": str(keys["rsa"])},
        },
        networks=["127.0.0.1/32"],
    )
    rng = random.Random(7)
    lines = [bytes(rng.choice(b"xy z\t") for _ in range(rng.randint(0, 200))) for _ in range(9000)]
    big = (
        MESSAGE.replace(b"alice@example.org", b"carol@example.net").split(b"\r\n\r\n", 1)[0]
        + b"\r\n\r\n"
        + b"\r\n".join(lines)
        + b"\r\n\r\n\r\n"
    )
    plugins = PluginSet(timeout=30.0)
    for name, each in (
        ("rcpt", AcceptAll()),
        ("headers", headers),
        ("dkim_sign", plugin),
        ("maildir", maildir),
    ):
        plugins.register(each, name)
    server = start_server(plugins=plugins)
    with smtplib.SMTP(HOST, server.port, local_hostname="client.test", timeout=30) as client:
        assert client.sendmail("alice@example.org", ["one@example.com"], MESSAGE) == {}
        assert client.sendmail("carol@example.net", ["two@example.com"], big) == {}
    stored = {}
    for path in (tmp_path / "Maildir").glob("example.com/*/new/*"):
        stored[path.parent.parent.name] = path.read_bytes()
    assert sorted(stored) == ["one", "two"]
    assert len(stored["two"]) > 800_000
    line = verify(tmp_path, stored["one"], ("ed", "example.org", keys["ed25519"]))
    assert succeeded(line, "ed", "example.org"), line
    line = verify(tmp_path, stored["two"], ("rsa", "example.net", keys["rsa"]))
    assert succeeded(line, "rsa", "example.net"), line


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_white_space_before_a_colon_opendkim_and_the_dkim_plugin_agree(
    tmp_path, keys, dns_stub, canonicalization
):
    """RFC 5322 4.5.8's obsolete ``name WSP* ":"``: in a field the signature
    does not cover it changes nothing; in a signed field relaxed
    canonicalization deletes it and simple keeps it. Bonzo's ``dkim``
    plugin gives OpenDKIM's verdict in each case (dkimpy's parser refused
    the message). Spaces: OpenDKIM 2.11 gives no verdict at all for a tab
    before the colon (a syntax error at the end of the header)."""
    from bonzo_plugins.dkim import DkimPlugin

    plugin = configured(
        domains={"example.org": {"selector": "s1", "key": str(keys["rsa"])}},
        canonicalization=canonicalization,
    )
    content = signed(plugin)
    key = ("s1", "example.org", keys["rsa"])
    record = dns_record(load_key(keys["rsa"]))
    chunks = " ".join(f'"{record[i : i + 255]}"' for i in range(0, len(record), 255))
    dns_stub.add("s1._domainkey.example.org", "TXT", chunks)
    verifier = DkimPlugin()
    verifier.bonzo_configure(config={}, app=SimpleNamespace(dns=dns_stub.resolver()))
    unsigned = content.replace(b"\r\nSubject:", b"\r\nX-Spam-Flag : NO\r\nSubject:")
    spaced = content.replace(b"\r\nSubject:", b"\r\nSubject  :")
    expected = "pass" if canonicalization.startswith("relaxed") else "fail"
    for message, verdict in ((unsigned, "pass"), (spaced, expected)):
        assert message != content
        line = verify(tmp_path, message, key)
        assert succeeded(line, "s1", "example.org") == (verdict == "pass"), line
        envelope = Envelope("alice@example.org")
        envelope.write(message)
        try:
            asyncio.run(verifier.bonzo_message(session=testing.make_session(), envelope=envelope))
            ((result, reason),) = [(r.result, r.reason) for r in envelope.results.all("dkim")]
        finally:
            envelope.close()
        assert result == verdict, reason

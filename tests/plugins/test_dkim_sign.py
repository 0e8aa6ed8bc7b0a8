"""The ``dkim_sign`` plugin: signatures dkimpy verifies (RSA and Ed25519), what
is signed and what is not, the streamed body hash, failures, configuration,
and a real server.

Signatures are checked with dkimpy's verifier, its DNS look-ups answered
from the test's keys (no network); tests/interop/test_opendkim.py checks
them with OpenDKIM too.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import random
import re
import smtplib
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import bonzo_plugins.dkim_sign.signer as signer_module
import dkim
import pytest
import trustme
from bonzo_plugins.dkim_sign import DkimSignPlugin, dns_record, load_key, zone_line
from bonzo_plugins.dkim_sign.__main__ import main as record_main
from bonzo_plugins.dkim_sign.keys import parse_key
from bonzo_plugins.dkim_sign.signer import BodyHash, MessageSigner, message_parts
from bonzo_plugins.headers import HeadersPlugin
from bonzo_plugins.maildir import MaildirPlugin
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st
from plugin_testing import make_plugin_set, make_session, serve

from bonzo import Accept, hookimpl
from bonzo.errors import TransientError
from bonzo.session import MAX_HEADER_SECTION, Envelope, HeaderSectionTooLarge, Session
from bonzo.settings import ListenerSettings
from bonzo.tls import CertificatePair, make_server_context

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: DKIM test\r\n"
    b"Date: Thu, 1 Jan 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"X-Mailer: test\r\n"
    b"\r\n"
    b"Hello,  world \t\r\n"
    b"\r\n"
    b"A second paragraph.\r\n"
    b"\r\n"
    b"\r\n"
)

_open: list[Envelope] = []


@pytest.fixture(autouse=True)
def _close_envelopes():
    yield
    while _open:
        _open.pop().close()


# ------------------------------------------------------------------ keys
def _pem(key: Any, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _small_rsa_pem(bits: int = 512) -> bytes:
    """An RSA key shorter than the cryptography package will generate."""
    rng = random.Random(bits)

    def prime(n: int) -> int:
        while True:
            p = rng.getrandbits(n) | (1 << (n - 1)) | 1
            if all(pow(a, p - 1, p) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)):
                return p

    e = 65537
    while True:
        p, q = prime(bits // 2), prime(bits // 2)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e:
            break
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    return _pem(numbers.private_key(), serialization.PrivateFormat.TraditionalOpenSSL)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Key files of every accepted form, and some refused ones."""
    root = tmp_path_factory.mktemp("keys")
    rsa_a = rsa.generate_private_key(65537, 2048)
    rsa_b = rsa.generate_private_key(65537, 2048)
    ed_a = ed25519.Ed25519PrivateKey.generate()
    files = {
        "rsa": _pem(rsa_a, serialization.PrivateFormat.TraditionalOpenSSL),
        "rsa_pkcs8": _pem(rsa_a, serialization.PrivateFormat.PKCS8),
        "rsa_b": _pem(rsa_b, serialization.PrivateFormat.PKCS8),
        "rsa_1024": _pem(rsa.generate_private_key(65537, 1024), serialization.PrivateFormat.PKCS8),
        "ed25519": _pem(ed_a, serialization.PrivateFormat.PKCS8),
        # dkimpy's dknewkey form: the base64 of the 32-octet seed.
        "ed25519_seed": base64.b64encode(
            ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )
        + b"\n",
        "ec": _pem(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8),
        "ec_traditional": _pem(
            ec.generate_private_key(ec.SECP256R1()),
            serialization.PrivateFormat.TraditionalOpenSSL,
        ),
        "encrypted": rsa_a.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
        "public": rsa_a.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "rsa_512": _small_rsa_pem(),
        "garbage": b"this is not a key\n",
        "openssh": _pem(ed_a, serialization.PrivateFormat.OpenSSH),
    }
    paths = {}
    for name, data in files.items():
        path = root / f"{name}.pem"
        path.write_bytes(data)
        path.chmod(0o600)
        paths[name] = path
    return paths


def dns_for(*entries: tuple[str, str, Path]) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering for (selector, domain, key file)."""
    records = {
        f"{sel}._domainkey.{dom}.".encode(): dns_record(load_key(path)).encode()
        for sel, dom, path in entries
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return dnsfunc


def verify(content: bytes, dnsfunc: Callable[..., Any], index: int = 0) -> bool:
    d = dkim.DKIM(content, logger=logging.getLogger("test.dkimpy"))
    try:
        return bool(d.verify(idx=index, dnsfunc=dnsfunc))
    except dkim.DKIMException:
        return False


def signatures(content: bytes) -> list[dict[bytes, bytes]]:
    d = dkim.DKIM(content)
    return [
        dkim.util.parse_tag_value(value)
        for name, value in d.headers
        if name.lower() == b"dkim-signature"
    ]


def h_tag(sig: dict[bytes, bytes]) -> list[str]:
    return [h.decode() for h in re.split(rb"\s*:\s*", sig[b"h"])]


# -------------------------------------------------------------- helpers
def configured(app: Any = None, **table: Any) -> DkimSignPlugin:
    plugin = DkimSignPlugin()
    plugin.bonzo_configure(config=table, app=app)
    return plugin


def one(keys: dict[str, Path], name: str = "rsa", selector: str = "s1", **extra: Any) -> dict:
    return {"example.org": {"selector": selector, "key": str(keys[name]), **extra}}


def envelope_of(
    body: bytes = MESSAGE,
    mail_from: str = "alice@example.org",
    spool_threshold: int = 262144,
    received: bool = True,
) -> Envelope:
    envelope = Envelope(mail_from, spool_threshold=spool_threshold)
    envelope.rcpt_tos.append("bob@example.net")
    envelope.write(body)
    if received:
        # Bonzo adds its trace header before bonzo_message.
        envelope.add_header(
            "Received",
            "from client.example ([192.0.2.10])\r\n\tby mx.test (Bonzo) with ESMTPA id X;"
            " Thu, 1 Jan 2026 10:00:01 +0000",
        )
    _open.append(envelope)
    return envelope


def call(plugin: Any, envelope: Envelope, session: Session | None = None) -> Any:
    """Call bonzo_message as Bonzo does (on a running loop) and return its verdict."""
    session = session if session is not None else make_session(auth="alice")

    async def main() -> Any:
        result = plugin.bonzo_message(session=session, envelope=envelope)
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            return await result
        return result

    return asyncio.run(main())


def parts_of(envelope: Envelope) -> tuple[bytes, IO[bytes]]:
    """The header section and the body at its start, as the plugin signs."""
    section, body, start = message_parts(envelope)
    body.seek(start)
    return section, body


def sign(plugin: DkimSignPlugin, body: bytes = MESSAGE, **kwargs: Any) -> bytes:
    envelope = envelope_of(body, **kwargs)
    assert call(plugin, envelope) is None  # no verdict: later filters still run
    return envelope.content


# ------------------------------------------------------- RSA and Ed25519
@pytest.mark.parametrize("key", ["rsa", "rsa_pkcs8", "rsa_1024"])
def test_rsa_signature_verifies(keys, key):
    content = sign(configured(domains=one(keys, key)))
    (sig,) = signatures(content)
    assert sig[b"a"] == b"rsa-sha256"
    assert (sig[b"d"], sig[b"s"], sig[b"c"]) == (b"example.org", b"s1", b"relaxed/relaxed")
    assert b"i" not in sig and b"x" not in sig and b"l" not in sig
    assert verify(content, dns_for(("s1", "example.org", keys[key])))
    # The signature is where Bonzo puts added headers: after its Received:.
    assert content.startswith(b"Received: ")
    assert content.index(b"\r\nDKIM-Signature: ") < content.index(b"\r\nFrom: ")


@pytest.mark.parametrize("key", ["ed25519", "ed25519_seed"])
def test_ed25519_signature_verifies(keys, key):
    content = sign(configured(domains=one(keys, key, selector="ed")))
    (sig,) = signatures(content)
    assert sig[b"a"] == b"ed25519-sha256"
    assert verify(content, dns_for(("ed", "example.org", keys[key])))


def test_a_verifier_with_another_key_fails(keys):
    """The verifications above could fail: the wrong public key does."""
    content = sign(configured(domains=one(keys, "rsa")))
    assert not verify(content, dns_for(("s1", "example.org", keys["rsa_b"])))
    content = sign(configured(domains=one(keys, "ed25519")))
    assert not verify(content, dns_for(("s1", "example.org", keys["ed25519_seed"])))


def test_rsa_and_ed25519_for_one_domain(keys):
    """RFC 8463 8: sign with both, for verifiers that know only RSA."""
    domains = {
        "example.org": [
            {"selector": "ed", "key": str(keys["ed25519"])},
            {"selector": "rsa", "key": str(keys["rsa"])},
        ]
    }
    content = sign(configured(domains=domains))
    sigs = signatures(content)
    assert [s[b"s"] for s in sigs] == [b"ed", b"rsa"]
    dnsfunc = dns_for(("ed", "example.org", keys["ed25519"]), ("rsa", "example.org", keys["rsa"]))
    assert verify(content, dnsfunc, 0) and verify(content, dnsfunc, 1)
    # Neither signs the other.
    assert all("dkim-signature" not in h_tag(s) for s in sigs)


# ----------------------------------------------------- what gets signed
def test_received_is_not_signed_and_later_hops_keep_the_signature(keys):
    content = sign(configured(domains=one(keys)))
    (sig,) = signatures(content)
    assert "received" not in h_tag(sig)
    later = b"Received: from mx.test by mx2.example.net; Thu, 1 Jan 2026 10:00:02 +0000\r\n"
    dnsfunc = dns_for(("s1", "example.org", keys["rsa"]))
    assert verify(later + content, dnsfunc)
    assert not verify(later + content.replace(b"second paragraph", b"2nd paragraph"), dnsfunc)


def test_default_headers_and_oversigning(keys):
    content = sign(configured(domains=one(keys)))
    (sig,) = signatures(content)
    h = h_tag(sig)
    # Present fields once, the displayed singletons once more; absent
    # oversigned fields (Reply-To, Cc) are listed, so none can be added.
    assert h.count("from") == 2 and h.count("subject") == 2 and h.count("to") == 2
    assert h.count("reply-to") == 1 and h.count("cc") == 1
    assert "x-mailer" not in h and "content-type" not in h
    dnsfunc = dns_for(("s1", "example.org", keys["rsa"]))
    assert verify(content, dnsfunc)
    head, _, body = content.partition(b"\r\n\r\n")
    for added in (
        b"From: Mallory <ceo@example.org>",
        b"Subject: Urgent wire transfer",
        b"Cc: someone@example.com",
    ):
        assert not verify(head + b"\r\n" + added + b"\r\n\r\n" + body, dnsfunc), added
    # An unsigned field may be added in transit.
    assert verify(head + b"\r\nX-Spam-Score: 0\r\n\r\n" + body, dnsfunc)


def test_configured_headers_and_oversign(keys):
    plugin = configured(
        domains=one(keys), headers=["From", "Subject", "X-Mailer"], oversign=["From"]
    )
    content = sign(plugin)
    (sig,) = signatures(content)
    assert h_tag(sig) == ["from", "from", "subject", "x-mailer"]
    dnsfunc = dns_for(("s1", "example.org", keys["rsa"]))
    assert verify(content, dnsfunc)
    assert not verify(content.replace(b"X-Mailer: test", b"X-Mailer: other"), dnsfunc)
    assert verify(content.replace(b"To: Bob", b"To: Rob"), dnsfunc)  # To: not signed


def test_a_message_changed_by_the_headers_plugin_first_verifies(keys):
    headers = HeadersPlugin()
    headers.bonzo_configure(
        config={"add": {"X-Queue-Id": "{message_id}"}, "remove": ["X-Mailer"]}, app=None
    )
    plugin = configured(domains=one(keys), headers=["From", "Subject", "X-Queue-Id"])
    envelope = envelope_of()
    session = make_session(auth="alice")
    assert call(headers, envelope, session) is None  # listed first
    assert call(plugin, envelope, session) is None
    content = envelope.content
    assert b"X-Mailer" not in content and b"\r\nX-Queue-Id: " in content
    (sig,) = signatures(content)
    assert "x-queue-id" in h_tag(sig)
    dnsfunc = dns_for(("s1", "example.org", keys["rsa"]))
    assert verify(content, dnsfunc)
    # A change after signing is what the docs warn about: a filter listed
    # after dkim_sign that adds a signed field breaks the signature.
    envelope.add_header("X-Queue-Id", "changed")
    assert not verify(envelope.content, dnsfunc)


@pytest.mark.parametrize(
    "canonicalization", ["relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed"]
)
def test_canonicalizations(keys, canonicalization):
    plugin = configured(domains=one(keys), canonicalization=canonicalization)
    content = sign(plugin)
    (sig,) = signatures(content)
    assert sig[b"c"] == canonicalization.encode()
    assert verify(content, dns_for(("s1", "example.org", keys["rsa"])))


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_a_message_without_the_blank_line_after_its_header_verifies(keys, canonicalization):
    # A script's "Subject: ...\nbody": signed on Bonzo's split, it must be
    # delivered with that split, or no other verifier can check it.
    plugin = configured(domains=one(keys), canonicalization=canonicalization)
    sent = b"From: a@example.org\nTo: bob@example.com\nSubject: no blank line\nHello.\nSecond.\n"
    content = sign(plugin, sent)
    assert content.endswith(b"Subject: no blank line\n\r\nHello.\nSecond.\n")
    assert verify(content, dns_for(("s1", "example.org", keys["rsa"])))


def test_identity_and_expiry(keys):
    plugin = configured(domains=one(keys, identity="alice@mail.example.org"), expire=86400)
    content = sign(plugin)
    (sig,) = signatures(content)
    assert sig[b"i"] == b"alice@mail.example.org"
    assert int(sig[b"x"]) == int(sig[b"t"]) + 86400
    dnsfunc = dns_for(("s1", "example.org", keys["rsa"]))
    assert verify(content, dnsfunc)
    # A signature made two days ago that expired after one hour fails.
    assert plugin.signer is not None
    expired = MessageSigner(
        plugin.signer.domains, ["From"], [], "relaxed/relaxed", expire=3600
    ).sign(*parts_of(envelope_of(received=False)), now=time.time() - 2 * 86400)
    assert not verify(expired.fields[0] + MESSAGE, dnsfunc)


# ---------------------------------------------------- which messages
def test_several_domains_each_with_its_own_key(keys):
    domains = {
        "example.org": {"selector": "a", "key": str(keys["rsa"])},
        "Example.NET": {"selector": "b", "key": str(keys["ed25519"])},
    }
    plugin = configured(domains=domains)
    dnsfunc = dns_for(("a", "example.org", keys["rsa"]), ("b", "example.net", keys["ed25519"]))
    content = sign(plugin)
    assert [s[b"d"] for s in signatures(content)] == [b"example.org"]
    assert verify(content, dnsfunc)
    other = MESSAGE.replace(b"From: Alice <alice@example.org>", b"From: carol@EXAMPLE.net")
    content = sign(plugin, other)
    (sig,) = signatures(content)
    assert (sig[b"d"], sig[b"s"], sig[b"a"]) == (b"example.net", b"b", b"ed25519-sha256")
    assert verify(content, dnsfunc)


def test_other_domains_pass_untouched(keys, caplog):
    plugin = configured(domains=one(keys))
    envelope = envelope_of(MESSAGE.replace(b"alice@example.org", b"alice@example.com"))
    before = envelope.content
    assert call(plugin, envelope) is None
    assert envelope.content == before
    assert "no key for example.com" in caplog.text


def test_the_from_domain_decides_not_the_envelope_sender(keys):
    plugin = configured(domains=one(keys))
    # A bounce address elsewhere: still signed for the author's domain.
    content = sign(plugin, mail_from="bounces+123@lists.example.com")
    assert [s[b"d"] for s in signatures(content)] == [b"example.org"]
    # An envelope sender of ours does not make another author's message ours.
    other = MESSAGE.replace(b"alice@example.org", b"alice@example.com")
    assert signatures(sign(plugin, other, mail_from="alice@example.org")) == []


@pytest.mark.parametrize(
    ("from_field", "signed", "reason"),
    [
        (b"From: a@example.org, b@Example.ORG", True, ""),
        (b"From: =?utf-8?q?J=C3=B6rg?= <joerg@example.org>", True, ""),
        (b'From: "Alice, Team" <alice@example.org>', True, ""),
        # A final dot: the same DNS name (DMARC reads it so too).
        (b"From: alice@example.org.", True, ""),
        (b"From: Alice <alice@Example.org.>", True, ""),
        (b"From: a@example.org, b@example.com", False, "no single domain"),
        (b"From: a@example.org\r\nFrom: b@example.org", False, "2 From: fields"),
        (b"X-From: a@example.org", False, "0 From: fields"),
        (b"From: undisclosed-recipients:;", False, "no single domain"),
        (b"From: a@[192.0.2.1]", False, "address literal"),
        (b"From: a@example.org, b@[192.0.2.1]", False, "address literal"),
        (b"From: a@example.org, b@example.org..", False, "without a domain"),
        # A control octet (hidden by many readers): not a domain name, never
        # signed for the domain it looks like.
        (b"From: Alice <alice@example.org\x00>", False, "invalid domain"),
        (b"From: alice@\x1bexample.org", False, "invalid domain"),
        (b"From: Alice <alice@example.org\x7f>", False, "invalid domain"),
        # An underscore is a DNS name (not configured here: not signed).
        (b"From: Alice <alice@exa_mple.org>", False, "no key for exa_mple.org"),
        # Python's parser reads example.org alone (it drops what follows a
        # syntax error); readers show example.com: never signed.
        (b"From: alice@example.org <bob@example.com>", False, "a malformed From: field"),
        # An encoded word in a local part (RFC 2047 5 forbids it), shown by
        # some readers as bob@example.com (Mailsploit): never signed.
        (
            b"From: =?utf-8?q?bob=40example.com=00?=@example.org",
            False,
            "an encoded word in a local",
        ),
        # Malformed, but every reading names example.org alone: signed.
        (b"From: <alice@example.org> <alice@example.org>", True, ""),
        (b"From: noreply@example.org <noreply@example.org>", True, ""),
        (b'From: "=?utf-8?q?J=C3=B6rg?=" <alice@example.org>', True, ""),
        (b'From: "john@home"@example.org', True, ""),  # a quoted "@": text
        (
            b"From: =?utf-16?b?AGEAQABiAC4AYwBvAG0AAA==?=@example.org",
            False,
            "an encoded word in a local part",
        ),
        # Too long to parse (quadratic time on hostile input): not signed.
        (b"From: alice@example.org (" + b"x" * 1100 + b")", False, "too long to parse"),
        # Harmless defects, and a display name naming another domain: the
        # signature is for the address's domain.
        (b"From: a..b@example.org", True, ""),
        (b"From: =?utf-8?q?Alice?=<alice@example.org>", True, ""),
        (b'From: "bob@example.com" <alice@example.org>', True, ""),
    ],
)
def test_the_author_domain(keys, caplog, from_field, signed, reason):
    plugin = configured(domains=one(keys))
    body = MESSAGE.replace(b"From: Alice <alice@example.org>", from_field)
    content = sign(plugin, body)
    assert bool(signatures(content)) is signed
    if signed:
        assert verify(content, dns_for(("s1", "example.org", keys["rsa"])))
    else:
        assert reason in caplog.text


def test_an_internationalized_from_domain(keys):
    plugin = configured(domains={"bücher.example": {"selector": "s1", "key": str(keys["rsa"])}})
    body = MESSAGE.replace(
        b"From: Alice <alice@example.org>", "From: Jörg <jörg@BÜCHER.example>".encode()
    )
    content = sign(plugin, body)
    (sig,) = signatures(content)
    assert sig[b"d"] == b"xn--bcher-kva.example"  # d= is the A-label (RFC 8616)
    assert verify(content, dns_for(("s1", "xn--bcher-kva.example", keys["rsa"])))


@pytest.mark.parametrize("subdomains", [False, True])
def test_subdomains(keys, subdomains):
    plugin = configured(domains=one(keys, subdomains=subdomains))
    body = MESSAGE.replace(b"alice@example.org", b"alice@mail.eu.example.org")
    sigs = signatures(sign(plugin, body))
    assert [s[b"d"] for s in sigs] == ([b"example.org"] if subdomains else [])


@pytest.mark.parametrize(
    ("table", "session", "signed"),
    [
        ({}, {"auth": None}, False),
        ({}, {"auth": "alice"}, True),
        ({"sign": "authenticated"}, {"auth": None, "remote_ip": "10.1.2.3"}, False),
        ({"networks": ["10.0.0.0/8"]}, {"auth": None, "remote_ip": "10.1.2.3"}, True),
        ({"networks": ["10.0.0.0/8"]}, {"auth": None, "remote_ip": "192.0.2.1"}, False),
        ({"networks": ["10.0.0.0/8"]}, {"auth": None, "remote_ip": "::ffff:10.0.0.1"}, True),
        ({"sign": "all"}, {"auth": None}, True),
    ],
)
def test_which_sessions_are_signed(keys, table, session, signed):
    plugin = configured(domains=one(keys), **table)
    envelope = envelope_of()
    assert call(plugin, envelope, make_session(**session)) is None
    assert bool(signatures(envelope.content)) is signed


def test_no_domains_signs_nothing(caplog):
    plugin = configured()
    plugin.bonzo_startup()
    assert "no domains configured" in caplog.text
    envelope = envelope_of()
    before = envelope.content
    assert call(plugin, envelope) is None
    assert envelope.content == before


# ----------------------------------------------------- large messages
def _big_body(size: int) -> bytes:
    rng = random.Random(size)
    lines = [b"Subject: big\r\nFrom: alice@example.org\r\nTo: bob@example.net\r\n\r\n"]
    total = 0
    while total < size:
        line = bytes(rng.choice(b"ab c\t") for _ in range(rng.randint(0, 300)))
        lines.append(line + b"\r\n")
        total += len(line) + 2
    lines.append(b"\r\n" * 5)
    return b"".join(lines)


def test_a_spooled_message_is_signed_without_reading_it_whole(keys, monkeypatch):
    body = _big_body(3 << 20)
    envelope = envelope_of(body, spool_threshold=65536)
    assert envelope.spooled

    def whole(self: Envelope) -> bytes:
        raise AssertionError("the message was read whole")

    monkeypatch.setattr(Envelope, "body", property(whole))
    monkeypatch.setattr(Envelope, "content", property(whole))
    monkeypatch.setattr(signer_module, "CHUNK", 4096)  # many pieces
    assert call(configured(domains=one(keys)), envelope) is None
    monkeypatch.undo()
    content = envelope.content
    assert verify(content, dns_for(("s1", "example.org", keys["rsa"])))


def test_signing_a_large_message_takes_little_memory(keys):
    import tracemalloc

    envelope = Envelope("alice@example.org", spool_threshold=65536)
    _open.append(envelope)
    envelope.write(MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    line = b"0123456789 abcdefghij\tABCDEFGHIJ  klmnopqrst uvwxyz " * 20 + b"\r\n"
    chunk = line * (65536 // len(line))
    for _ in range((24 << 20) // len(chunk)):  # 24 MB
        envelope.write(chunk)
    assert envelope.spooled and envelope.size > 24_000_000
    signer = configured(domains=one(keys)).signer
    assert signer is not None
    tracemalloc.start()
    try:
        outcome = signer.sign(*parts_of(envelope))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(outcome.fields) == 1
    assert peak < 4 << 20, f"peak {peak} octets"
    envelope.prepend_raw(outcome.fields[0])
    assert verify(envelope.content, dns_for(("s1", "example.org", keys["rsa"])))


def test_a_header_section_too_large_refuses_the_message(keys, caplog):
    """The envelope's limit (MAX_HEADER_SECTION): the message is refused
    for good (552 5.3.4), not passed on unsigned or taken for a local fault."""
    filler = b"X-Filler: " + b"x" * 998 + b"\r\n"
    body = b"From: alice@example.org\r\n" + filler * (MAX_HEADER_SECTION // len(filler) + 1)
    envelope = envelope_of(body + b"\r\nHi\r\n")
    with pytest.raises(HeaderSectionTooLarge) as info:
        call(configured(domains=one(keys)), envelope)
    assert (info.value.status_code, info.value.enhanced_code) == (552, "5.3.4")
    assert "signing failed" not in caplog.text
    assert b"DKIM-Signature" not in envelope.header_bytes


def test_the_signed_section_is_the_one_delivered(keys):
    """A line that is no header field ends the header section for every
    reader: the signature covers the fields before it (the envelope makes
    the end plain with a blank line), never a field after it that
    another reader would take for body."""
    body = (
        b"From: alice@example.org\r\nSubject: hi\r\nnot a field\r\nTo: x@example.net\r\n\r\nHi\r\n"
    )
    content = sign(configured(domains=one(keys)), body)
    (sig,) = signatures(content)
    assert h_tag(sig).count("subject") == 2  # present once, oversigned
    assert b"Subject: hi\r\n\r\nnot a field\r\nTo: x@example.net\r\n" in content
    assert verify(content, dns_for(("s1", "example.org", keys["rsa"])))


def test_a_malformed_header_section_is_not_signed(keys, caplog):
    # A field whose name holds a space: a header for Bonzo and mail readers,
    # no field to dkimpy, whose signature would not say what it covers.
    body = b"From: alice@example.org\r\nbad name: x\r\n\r\nHi\r\n"
    assert b"DKIM-Signature" not in sign(configured(domains=one(keys)), body)
    assert "malformed header section" in caplog.text


# ------------------------------------------- the body hash, streamed
def dkimpy_body_hash(body: bytes, relaxed: bool) -> bytes:
    # dkimpy reads lines ending in CRLF or LF, and rejoins them with CRLF.
    joined = b"\r\n".join(re.split(b"\r?\n", body))
    canonical = (Relaxed if relaxed else Simple).canonicalize_body(joined)
    return hashlib.sha256(canonical).digest()


BODY_PIECES = st.lists(
    st.sampled_from([b"a", b"b c", b" ", b"\t", b"\r", b"\n", b"\r\n", b"  \t ", b"\r "]),
    max_size=40,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(body=BODY_PIECES, cuts=st.lists(st.integers(1, 9), max_size=20), relaxed=st.booleans())
def test_body_hash_matches_dkimpy(body, cuts, relaxed):
    h = BodyHash(relaxed)
    pos = 0
    for n in cuts:
        h.update(body[pos : pos + n])
        pos += n
    h.update(body[pos:])
    assert h.digest() == dkimpy_body_hash(body, relaxed)


@settings(max_examples=200, deadline=None)
@given(body=BODY_PIECES, cut=st.integers(1, 5))
def test_body_hash_with_long_runs_without_a_line_end(body, cut):
    """Past HOLD_LIMIT the held-back white space is reduced; same hash."""
    saved = signer_module.HOLD_LIMIT
    signer_module.HOLD_LIMIT = 2
    try:
        h = BodyHash(True)
        for i in range(0, len(body), cut):
            h.update(body[i : i + cut])
        assert h.digest() == dkimpy_body_hash(body, True)
    finally:
        signer_module.HOLD_LIMIT = saved


def test_body_hash_of_long_white_space_stays_bounded():
    h = BodyHash(True)
    for _ in range(64):
        h.update(b"x" + b" \t\r" * 20000)
        assert len(h._carry) <= signer_module.HOLD_LIMIT
    body = (b"x" + b" \t\r" * 20000) * 64
    assert h.digest() == dkimpy_body_hash(body, True)


def test_empty_bodies():
    for body in (b"", b"\r\n", b"\r\n\r\n\r\n"):
        for relaxed in (True, False):
            h = BodyHash(relaxed)
            h.update(body)
            assert h.digest() == dkimpy_body_hash(body, relaxed)
    # RFC 6376 3.4.3/3.4.4: CRLF in simple mode, nothing in relaxed mode.
    assert BodyHash(False).digest() == hashlib.sha256(b"\r\n").digest()
    assert BodyHash(True).digest() == hashlib.sha256(b"").digest()


# ---------------------------------------------------------- failures
@pytest.mark.expect_errors
def test_a_signing_failure_defers_by_default(keys, caplog, monkeypatch):
    plugin = configured(domains=one(keys))

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(MessageSigner, "sign", broken)
    envelope = envelope_of()
    with pytest.raises(TransientError) as info:
        call(plugin, envelope)
    assert (info.value.status_code, info.value.enhanced_code) == (451, "4.3.0")
    assert "Input/output" not in str(info.value)  # no exception text to the client
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "signing failed; deferred" in errors[0].getMessage()


@pytest.mark.expect_errors
def test_a_signing_failure_passes_unsigned_if_configured(keys, caplog, monkeypatch):
    plugin = configured(domains=one(keys), on_error="unsigned")

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(MessageSigner, "sign", broken)
    envelope = envelope_of()
    before = envelope.content
    assert call(plugin, envelope) is None
    assert envelope.content == before
    assert "signing failed; passed on unsigned" in caplog.text


def test_signing_runs_off_the_event_loop(keys, monkeypatch):
    plugin = configured(domains=one(keys))
    threads = []
    real = MessageSigner.sign

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MessageSigner, "sign", spy)
    envelope = envelope_of()
    call(plugin, envelope)
    assert threads and threads[0] is not threading.main_thread()
    assert signatures(envelope.content)


# ------------------------------------------------------ configuration
def test_keys_are_resolved_against_the_configuration_directory(keys):
    app = SimpleNamespace(base_dir=keys["rsa"].parent)
    plugin = configured(app, domains={"example.org": {"selector": "s1", "key": "rsa.pem"}})
    assert plugin.signer is not None
    (signer,) = plugin.signer.domains["example.org"][1]
    assert signer.key.path == keys["rsa"]


def test_a_domain_with_several_signatures_and_old_spellings(keys):
    plugin = configured(
        domains={
            "Example.ORG": [
                {"selector": "S1", "key": str(keys["rsa"]), "identity": ""},
                {"selector": "ed1", "key": str(keys["ed25519"]), "subdomains": True},
            ]
        },
        canonicalization="Relaxed/Simple",
        headers=["From", "from", "Subject"],
    )
    assert plugin.signer is not None
    subdomains, signers = plugin.signer.domains["example.org"]
    assert subdomains is True  # given in one of the two is enough
    assert [(s.selector, s.identity) for s in signers] == [("s1", ""), ("ed1", "")]
    assert plugin.signer.canonicalization == "relaxed/simple"
    assert plugin.signer.headers[:2] == ["from", "subject"]


BAD_CONFIGS: list[tuple[Callable[[dict[str, Path], Path], dict], str]] = [
    (
        lambda k, t: {"domains": {"example.org": {"selector": "s1", "key": str(t / "nope.pem")}}},
        r'domains\."example\.org"\.key: .*nope\.pem: cannot read the key file: No such file',
    ),
    (
        lambda k, t: {"domains": {"example.org": {"selector": "s1", "key": str(t)}}},
        r'domains\."example\.org"\.key: .*: cannot read the key file: Is a directory',
    ),
    (
        lambda k, t: {"domains": one(k, "ec")},
        r'domains\."example\.org"\.key: .*ec\.pem: not a readable RSA or Ed25519 private key',
    ),
    (
        lambda k, t: {"domains": one(k, "ec_traditional")},
        r"ec_traditional\.pem: EC PRIVATE KEY is not a DKIM key type",
    ),
    (lambda k, t: {"domains": one(k, "encrypted")}, r"encrypted\.pem: the key is encrypted"),
    (lambda k, t: {"domains": one(k, "public")}, r"public\.pem: no private key in the file"),
    (lambda k, t: {"domains": one(k, "garbage")}, r"garbage\.pem: not a private key"),
    (lambda k, t: {"domains": one(k, "openssh")}, r"openssh\.pem: an OpenSSH key; DKIM needs"),
    (lambda k, t: {"domains": one(k, "rsa_512")}, r"rsa_512\.pem: the RSA key has 512 bits"),
    (lambda k, t: {"domains": one(k, selector="s_1")}, r"selector: 's_1' is not a valid"),
    (lambda k, t: {"domains": one(k, selector="-s")}, r"selector: '-s' is not a valid"),
    (lambda k, t: {"domains": one(k, selector="a..b")}, r"selector: 'a\.\.b' is not a valid"),
    (
        lambda k, t: {"domains": one(k, selector="")},
        r'^domains\."example\.org"\.selector: expected a non-empty string',
    ),
    (
        lambda k, t: {"domains": {"example.org": {"key": str(k["rsa"])}}},
        r'domains\."example\.org"\.selector: required',
    ),
    (
        lambda k, t: {"domains": {"example.org": {"selector": "s1"}}},
        r'domains\."example\.org"\.key: required',
    ),
    (
        lambda k, t: {"domains": one(k, algorithm="rsa-sha1")},
        r'domains\."example\.org"\.algorithm: unknown key',
    ),
    (
        lambda k, t: {"domains": one(k, identity="alice@example.com")},
        r"identity: alice@example\.com is not in example\.org",
    ),
    (lambda k, t: {"domains": one(k, identity="alice")}, r"identity: 'alice' is not an identity"),
    (lambda k, t: {"domains": one(k, identity="a=b@example.org")}, r"unusable local part"),
    (lambda k, t: {"domains": one(k, subdomains="yes")}, r"subdomains: expected true or false"),
    (
        lambda k, t: {"domains": {"[192.0.2.1]": {"selector": "s1", "key": str(k["rsa"])}}},
        r'domains\."\[192\.0\.2\.1\]": not a host name',
    ),
    (
        lambda k, t: {
            "domains": {
                "example.org": {"selector": "s1", "key": str(k["rsa"])},
                "EXAMPLE.org": {"selector": "s2", "key": str(k["rsa"])},
            }
        },
        r'domains\."EXAMPLE\.org": the same domain as another entry',
    ),
    (
        lambda k, t: {
            "domains": {
                "example.org": [
                    {"selector": "s1", "key": str(k["rsa"])},
                    {"selector": "s1", "key": str(k["ed25519"])},
                ]
            }
        },
        r"the same selector twice",
    ),
    (lambda k, t: {"domains": {"example.org": []}}, r"an empty list"),
    (lambda k, t: {"domains": {"example.org": "s1"}}, r"expected a table with selector and key"),
    (lambda k, t: {"domains": ["example.org"]}, r"domains: expected a table of domains"),
    (lambda k, t: {"domain": {}}, r"^domain: unknown key \(did you mean 'domains'\?\)$"),
    (lambda k, t: {"sign": "sometimes"}, r"^sign: expected one of 'authenticated', 'all'"),
    (
        lambda k, t: {"networks": ["10.0.0.1/8"]},
        r"^networks: expected a network such as 192\.0\.2\.0/24, got '10\.0\.0\.1/8'; host bits",
    ),
    (lambda k, t: {"headers": ["Received", "From"]}, r"headers: Received must not be signed"),
    (lambda k, t: {"oversign": ["DKIM-Signature"]}, r"oversign: DKIM-Signature must not"),
    (lambda k, t: {"headers": ["From:"]}, r"headers: 'From:' is not a header field name"),
    (lambda k, t: {"headers": ["Subject"], "oversign": []}, r"headers: From must be signed"),
    (lambda k, t: {"canonicalization": "relaxed"}, r"canonicalization: expected one of"),
    (lambda k, t: {"expire": -1}, r"^expire: expected an integer >= 0, got -1$"),
    (
        lambda k, t: {"expire": 10**10},
        r"^expire: expected at most 315360000 seconds \(ten years\), got 10000000000$",
    ),
    (lambda k, t: {"expire": True}, r"^expire: expected an integer, got True$"),
    (lambda k, t: {"expire": "1d"}, r"^expire: expected an integer, got '1d'$"),
    (lambda k, t: {"on_error": "bounce"}, r"^on_error: expected one of 'defer', 'unsigned'"),
    (
        lambda k, t: {"domains": {"example.org": [{"selector": "s1", "key": str(k["rsa"])}, {}]}},
        r'^domains\."example\.org"\[1\]\.selector: required$',
    ),
    (
        lambda k, t: {
            "domains": {
                "example.org": [
                    {"selector": "s1", "key": str(k["rsa"]), "subdomains": True},
                    {"selector": "s2", "key": str(k["rsa"]), "subdomains": False},
                ]
            }
        },
        r'^domains\."example\.org"\[1\]\.subdomains: differs',
    ),
]


@pytest.mark.parametrize(("make", "message"), BAD_CONFIGS)
def test_bad_configuration_names_the_key(keys, tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        configured(**make(keys, tmp_path))


def test_errors_never_quote_the_key(keys, tmp_path):
    broken = tmp_path / "broken.pem"
    text = keys["rsa"].read_text()
    lines = text.splitlines()
    lines[5] = lines[5][:-4] + "!!!!"  # not base64 any more
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as info:
        configured(domains={"example.org": {"selector": "s1", "key": str(broken)}})
    assert "broken.pem" in str(info.value)
    for line in lines[1:-1]:
        assert line not in str(info.value)


def test_a_damaged_rsa_key_is_refused(keys):
    pem = keys["rsa"].read_bytes()  # PKCS#1: the CRT coefficient comes last
    assert parse_key(pem, keys["rsa"]).bits == 2048
    der = bytearray(base64.b64decode(b"".join(pem.splitlines()[1:-1])))
    der[-5] ^= 0x01  # one bit of the coefficient: the key still parses
    pem = b"-----BEGIN RSA PRIVATE KEY-----\n" + base64.encodebytes(bytes(der))
    pem += b"-----END RSA PRIVATE KEY-----\n"
    with pytest.raises(ValueError, match=r"damaged \(a test signature does not verify\)"):
        parse_key(pem, Path("damaged.pem"))


def test_warnings_for_a_short_or_readable_key(keys):
    """In the configuration's warnings (bonzo check lists them, prefixed
    with the plugin's table), not bare log lines outside that list."""
    keys["rsa_1024"].chmod(0o644)
    try:
        plugin = configured(domains=one(keys, "rsa_1024"))
    finally:
        keys["rsa_1024"].chmod(0o600)
    warnings = plugin.config_warnings
    assert len(warnings) == 2, warnings
    assert "1024-bit RSA key; 2048 bits is the usual size" in warnings[0]
    assert "can be read by others than its owner (chmod 600 it)" in warnings[1]
    assert configured(domains=one(keys, "rsa_1024")).config_warnings == warnings[:1]


def test_secrets_are_never_logged(keys, caplog):
    plugin = configured(domains=one(keys, "rsa"), networks=["127.0.0.0/8"])
    plugin.bonzo_startup()
    sign(plugin)
    # PKCS#1: the (public) modulus fills the first lines, the private numbers follow.
    secret_lines = keys["rsa"].read_text().splitlines()[8:-1]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "signed: d=example.org s=s1 a=rsa-sha256" in logged
    assert all(line not in logged for line in secret_lines)
    # What is logged at startup is the public record to publish.
    assert zone_line(load_key(keys["rsa"]), "s1", "example.org") in logged


# ------------------------------------------------------------ DNS record
def test_dns_records(keys, capsys):
    key = load_key(keys["rsa"])
    record = dns_record(key)
    assert record.startswith("v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA")
    line = zone_line(key, "s1", "example.org")
    assert line.startswith('s1._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=')
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == record
    ed = load_key(keys["ed25519"])
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", dns_record(ed))
    assert record_main([str(keys["ed25519"]), "ed", "Example.ORG"]) == 0
    out = capsys.readouterr().out
    assert out == zone_line(ed, "ed", "example.org") + "\n"
    assert record_main([str(keys["ec"]), "s1", "example.org"]) == 1
    assert "ec.pem: not a readable RSA or Ed25519 private key" in capsys.readouterr().err


# ------------------------------------------------- through a real server
class AcceptAll:
    @hookimpl
    def bonzo_rcpt(self) -> Accept:
        return Accept()


class Users:
    @hookimpl
    def bonzo_auth(self, username: str, password: str) -> Accept | None:
        return Accept() if (username, password) == ("alice", "secret") else None


def _stored(tmp_path: Path) -> dict[str, bytes]:
    """The stored messages by their recipient (each test sends one per recipient)."""
    messages = {}
    for path in (tmp_path / "Maildir" / "new").iterdir():
        content = path.read_bytes()
        (rcpt,) = re.findall(rb"for <([^>]+)>", content)
        messages[rcpt.decode()] = content
    return messages


def test_end_to_end_from_a_trusted_network(keys, tmp_path):
    maildir = MaildirPlugin()
    maildir.bonzo_configure(config={"path": "Maildir"}, app=SimpleNamespace(base_dir=tmp_path))
    headers = HeadersPlugin()
    headers.bonzo_configure(config={"add": {"X-Queue": "{message_id}"}}, app=None)
    plugin = configured(
        domains=one(keys, "ed25519") | {"example.net": {"selector": "s2", "key": str(keys["rsa"])}},
        networks=["127.0.0.0/8"],
    )
    big = _big_body(400_000).replace(b"From: alice@example.org", b"From: bob@example.net")
    with serve(
        ("rcpt", AcceptAll()), ("headers", headers), ("dkim_sign", plugin), ("maildir", maildir)
    ) as server:
        with server.client() as client:
            assert client.sendmail("x@example.org", ["bob@example.com"], MESSAGE) == {}
            assert client.sendmail("bounce@example.com", ["c@example.com"], big) == {}
            client.sendmail("x@example.org", ["d@example.com"], b"From: z@example.com\r\n\r\nz\r\n")
    stored = _stored(tmp_path)
    first, second, third = (
        stored["bob@example.com"],
        stored["c@example.com"],
        stored["d@example.com"],
    )
    dnsfunc = dns_for(("s1", "example.org", keys["ed25519"]), ("s2", "example.net", keys["rsa"]))
    for content, domain in ((first, b"example.org"), (second, b"example.net")):
        assert content.startswith(b"Return-Path: <")  # the maildir's, above the signature
        assert b"\r\nReceived: from client.example ([127.0.0.1])" in content
        assert [s[b"d"] for s in signatures(content)] == [domain]
        assert verify(content, dnsfunc)
    assert signatures(third) == []


def test_end_to_end_only_authenticated_sessions(keys, tmp_path, start_server):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    listener = ListenerSettings(
        tls_context=make_server_context(CertificatePair(str(cert), str(key)))
    )
    maildir = MaildirPlugin()
    maildir.bonzo_configure(config={"path": "Maildir"}, app=SimpleNamespace(base_dir=tmp_path))
    plugin = configured(domains=one(keys))  # sign = "authenticated"
    plugins = make_plugin_set(
        ("users", Users()), ("rcpt", AcceptAll()), ("dkim_sign", plugin), ("maildir", maildir)
    )
    server = start_server(plugins=plugins, listener=listener)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    for login, rcpt in ((False, "bob@example.com"), (True, "carol@example.com")):
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="c.test", timeout=10) as client:
            client.starttls(context=context)
            if login:
                client.login("alice", "secret")
            client.sendmail("alice@example.org", [rcpt], MESSAGE)
    stored = _stored(tmp_path)
    first, second = stored["bob@example.com"], stored["carol@example.com"]
    assert signatures(first) == []
    assert b"(authenticated as alice)" in second
    assert verify(second, dns_for(("s1", "example.org", keys["rsa"])))


@pytest.mark.expect_errors
def test_end_to_end_a_failure_gives_451(keys, tmp_path, monkeypatch):
    maildir = MaildirPlugin()
    maildir.bonzo_configure(config={"path": "Maildir"}, app=SimpleNamespace(base_dir=tmp_path))
    plugin = configured(domains=one(keys), sign="all")

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(MessageSigner, "sign", broken)
    with serve(("rcpt", AcceptAll()), ("dkim_sign", plugin), ("maildir", maildir)) as server:
        with server.client() as client:
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail("alice@example.org", ["bob@example.com"], MESSAGE)
    assert info.value.smtp_code == 451
    assert b"could not be signed" in info.value.smtp_error
    new = tmp_path / "Maildir" / "new"
    assert not new.exists() or list(new.iterdir()) == []  # nothing delivered unsigned


# ------------------------------------------------------------ the README
README = Path(__file__).resolve().parents[2] / "plugins" / "dkim_sign" / "README.rst"


def test_readme_gives_the_default_lists():
    from bonzo_plugins.dkim_sign import plugin as plugin_module

    text = " ".join(README.read_text("utf-8").split())
    for key, default in (
        ("headers", plugin_module.DEFAULT_HEADERS),
        ("oversign", plugin_module.DEFAULT_OVERSIGN),
    ):
        m = re.search(rf"``{key}`` List of strings; default ``\[([^\]]*)\]``", text)
        assert m, key
        assert re.findall(r'"([^"]+)"', m.group(1)) == list(default), key


def test_readme_example_configures(tmp_path):
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    text = README.read_text("utf-8")
    (block,) = re.findall(r"^\.\. code-block:: toml\n\n((?:    .*\n|\n)+)", text, re.M)
    table = tomllib.loads("\n".join(line[4:] for line in block.splitlines()))
    table = table["plugins"]["dkim_sign"]
    (tmp_path / "dkim").mkdir()
    for path in re.findall(r'key = "([^"]+)"', block):
        key = (
            ed25519.Ed25519PrivateKey.generate()
            if ".ed" in path
            else rsa.generate_private_key(65537, 2048)
        )
        (tmp_path / path).write_bytes(_pem(key, serialization.PrivateFormat.PKCS8))
        (tmp_path / path).chmod(0o600)
    plugin = configured(SimpleNamespace(base_dir=tmp_path), **table)
    assert plugin.signer is not None
    assert [
        (d, sub, [(s.selector, s.key.algorithm) for s in signers])
        for d, (sub, signers) in plugin.signer.domains.items()
    ] == [
        ("example.org", True, [("ed1", "ed25519-sha256"), ("s1", "rsa-sha256")]),
        ("example.net", False, [("s1", "rsa-sha256")]),
    ]


def test_the_example_configuration_shows_every_key():
    from bonzo_plugins.dkim_sign import plugin as plugin_module

    example = (README.parents[2] / "bonzo.toml.example").read_text("utf-8")
    start = example.index("# [plugins.dkim_sign]")
    end = example.find("\n\n", start)
    block = example[start : end if end >= 0 else None]
    shown = set(re.findall(r"^# (\w+) = ", block, re.M))
    assert shown == set(plugin_module.KEYS + plugin_module.DOMAIN_KEYS) - {"domains"}
    assert '# [plugins.dkim_sign.domains."example.org"]' in block


def test_sign_all_beside_a_listener_open_to_anyone_is_warned_about(keys):
    """sign = "all" on a server that also receives from the Internet signs
    forgeries of your own domain (the README says so; check says it now)."""
    from types import SimpleNamespace

    def app(*require_auth: bool) -> Any:
        listeners = [
            SimpleNamespace(settings=SimpleNamespace(require_auth=r)) for r in require_auth
        ]
        return SimpleNamespace(config=SimpleNamespace(listeners=listeners))

    warned = configured(app(False, True), domains=one(keys), sign="all").config_warnings
    assert len(warned) == 1 and warned[0].startswith(
        'sign = "all" signs whatever listeners[0] receive without AUTH: '
    )
    assert configured(app(True, True), domains=one(keys), sign="all").config_warnings == []
    assert configured(app(False), domains=one(keys)).config_warnings == []  # "authenticated"

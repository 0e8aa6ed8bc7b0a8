"""Helpers for the mail-authentication plugins' tests (spf, dkim, dmarc,
authres, dnsbl): sessions and envelopes carrying ``results``, and running
one hook on an event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from types import SimpleNamespace
from typing import Any, TypeVar

from plugin_testing import make_envelope

from bonzo.results import Results

T = TypeVar("T")

#: Envelopes made by :func:`envelope`, closed after each test by the
#: ``close_envelopes`` fixture (tests/plugins/conftest.py).
OPEN: list[Any] = []


def fake_session(
    remote_ip: str = "192.0.2.10", helo: str | None = "mail.example.org", auth: str | None = None
) -> Any:
    """A stand-in for :class:`bonzo.session.Session` with what the plugins
    read: ``id``, ``remote_ip``, ``helo``, ``auth`` and ``results``."""
    return SimpleNamespace(id="S1", remote_ip=remote_ip, helo=helo, auth=auth, results=Results())


def envelope(
    body: bytes = b"Subject: test\r\n\r\nHello\r\n", mail_from: str = "a@example.org"
) -> Any:
    """A real envelope (its ``results`` are the core's)."""
    env = make_envelope(body, mail_from=mail_from)
    OPEN.append(env)
    return env


def run(awaitable: Awaitable[T]) -> T:
    async def main() -> T:
        return await awaitable

    return asyncio.run(main())


def app(resolver: Any = None, hostname: str = "mx.test") -> Any:
    """An app with ``dns`` and ``settings.hostname``, as plugins see it."""
    return SimpleNamespace(dns=resolver, settings=SimpleNamespace(hostname=hostname), base_dir=None)


def example_keys(name: str) -> set[str]:
    """The keys shown in bonzo.toml.example's commented ``[plugins.NAME]``
    block (up to the next blank line or ``[plugins.OTHER]`` block)."""
    import re
    from pathlib import Path

    example = (Path(__file__).resolve().parents[2] / "bonzo.toml.example").read_text("utf-8")
    start = example.index(f"# [plugins.{name}]")
    ends = [example.find(x, start + 1) for x in ("\n\n", "\n# [plugins.", "\n#\n")]
    block = example[start : min([e for e in ends if e >= 0], default=len(example))]
    return set(re.findall(r"^# (\w+) = ", block, re.M))


# ------------------------------------------------------------------ DKIM keys
class DkimKey:
    """A signing key (RSA or Ed25519) as dkimpy signs with it, and its DNS
    record."""

    def __init__(self, kind: str = "rsa", bits: int = 2048) -> None:
        import base64

        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

        self.kind = kind
        if kind == "rsa":
            key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
            self.private = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
            public = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            self.algorithm = b"rsa-sha256"
        else:
            ed = ed25519.Ed25519PrivateKey.generate()
            seed = ed.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            self.private = base64.b64encode(seed)
            public = ed.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            self.algorithm = b"ed25519-sha256"
        self.record = f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode()}"

    def publish(self, stub: Any, selector: str, domain: str) -> None:
        """Serve the key's record at ``selector._domainkey.domain``."""
        parts = [self.record[i : i + 255] for i in range(0, len(self.record), 255)]
        stub.add(f"{selector}._domainkey.{domain}", "TXT", " ".join(f'"{p}"' for p in parts))

    def sign(self, message: bytes, selector: str, domain: str, **options: Any) -> bytes:
        """``message`` with this key's ``DKIM-Signature:`` in front."""
        import dkim

        options.setdefault("signature_algorithm", self.algorithm)
        options.setdefault("canonicalize", (b"relaxed", b"relaxed"))
        field = dkim.sign(message, selector.encode(), domain.encode(), self.private, **options)
        return bytes(field) + message

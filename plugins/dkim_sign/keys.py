"""DKIM private keys: loading, checking, and the DNS record that publishes them.

Two kinds of key are accepted, told apart by their content:

* **RSA** (``rsa-sha256``, RFC 6376 with RFC 8301's minimum of 1024 bits): a
  PEM file, PKCS#1 (``BEGIN RSA PRIVATE KEY``, from ``openssl genrsa -traditional``
  or dkimpy's ``dknewkey``) or PKCS#8 (``BEGIN PRIVATE KEY``, from
  ``openssl genpkey -algorithm RSA``).
* **Ed25519** (``ed25519-sha256``, RFC 8463): a PKCS#8 PEM file
  (``openssl genpkey -algorithm ed25519``), or the base64 of the 32-octet
  private seed on one line (dkimpy's ``dknewkey --ktype ed25519``).

Every error message names the file and says what is wrong with it; none
quotes the file's content.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dkim import crypto as dkim_crypto

try:  # PyNaCl: dkimpy's Ed25519 implementation
    import nacl.encoding
    import nacl.signing
except ImportError:  # pragma: no cover - a dependency of the distribution
    nacl = None  # type: ignore[assignment]

__all__ = ["SigningKey", "load_key", "parse_key", "dns_record", "zone_line", "KeyFileError"]

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
#: RFC 8301 3.2: signers MUST use RSA keys of at least 1024 bits.
MIN_RSA_BITS = 1024
#: ... and SHOULD use at least 2048 bits.
GOOD_RSA_BITS = 2048
#: A key file is small; anything larger is not a key.
MAX_KEY_FILE = 64 * 1024

_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)\r?\n-----END \1-----", re.DOTALL)
#: The DER prefix of an unencrypted PKCS#8 Ed25519 private key (RFC 8410 7):
#: SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING {
#: OCTET STRING (32 octets) } }; the 32-octet seed follows.
_ED25519_PKCS8 = bytes.fromhex("302e020100300506032b657004220420")


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class SigningKey:
    """A loaded private key, ready for signing.

    ``private`` is what dkimpy signs with (a dict of RSA numbers, or a PyNaCl
    ``SigningKey``); ``public`` is the ``p=`` value of the DNS record.
    """

    path: Path
    algorithm: str
    bits: int
    public: str
    private: Any = field(repr=False)

    @property
    def key_type(self) -> str:
        """``rsa`` or ``ed25519``: the ``k=`` tag of the DNS record."""
        return self.algorithm.split("-", 1)[0]


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def _der_int(n: int) -> bytes:
    octets = n.to_bytes(n.bit_length() // 8 + 1, "big")  # a leading 0: positive
    return _der(0x02, octets)


def rsa_public_der(modulus: int, exponent: int) -> bytes:
    """The DER SubjectPublicKeyInfo of an RSA public key: what ``p=`` holds
    for ``k=rsa`` (RFC 6376 3.6.1), as ``openssl rsa -pubout`` writes it."""
    algorithm = _der(0x30, bytes.fromhex("06092a864886f70d010101") + b"\x05\x00")
    key = _der(0x30, _der_int(modulus) + _der_int(exponent))
    return _der(0x30, algorithm + _der(0x03, b"\x00" + key))


def _rsa_key(path: Path, der: bytes) -> SigningKey:
    try:
        private = dkim_crypto.parse_private_key(der)
    except Exception:
        raise KeyFileError(f"{path}: not a readable RSA or Ed25519 private key") from None
    modulus = private["modulus"]
    bits = modulus.bit_length()
    if bits < MIN_RSA_BITS:
        raise KeyFileError(
            f"{path}: the RSA key has {bits} bits; DKIM needs at least {MIN_RSA_BITS} "
            f"(RFC 8301), and {GOOD_RSA_BITS} is the usual size"
        )
    # A self-test: sign a digest and check it with the public half, so that a
    # damaged key (wrong CRT numbers) fails now, not on every message.
    digest = hashlib.sha256(b"bonzo dkim_sign key check")
    try:
        signature = dkim_crypto.RSASSA_PKCS1_v1_5_sign(digest, private)
        public = {"modulus": modulus, "publicExponent": private["publicExponent"]}
        ok = dkim_crypto.RSASSA_PKCS1_v1_5_verify(digest, bytes(signature), public)
    except Exception:
        ok = False
    if not ok:
        raise KeyFileError(f"{path}: the RSA key is damaged (a test signature does not verify)")
    spki = rsa_public_der(modulus, private["publicExponent"])
    return SigningKey(path, RSA, bits, base64.b64encode(spki).decode("ascii"), private)


def _ed25519_key(path: Path, seed: bytes) -> SigningKey:
    if nacl is None:  # pragma: no cover
        raise KeyFileError(f"{path}: an Ed25519 key needs PyNaCl (pip install pynacl)")
    private = nacl.signing.SigningKey(seed)
    public = private.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode("ascii")
    return SigningKey(path, ED25519, 256, public, private)


def parse_key(data: bytes, path: Path) -> SigningKey:
    """A :class:`SigningKey` from the content of a key file; ``path`` only
    names it in errors. Raises :class:`KeyFileError`."""
    blocks = _PEM.findall(data)
    if not blocks:
        text = data.strip()
        if b"-----BEGIN" in text:
            raise KeyFileError(f"{path}: a PEM block without its END line")
        # dkimpy's own Ed25519 format: base64 of the 32-octet seed.
        if text and re.fullmatch(rb"[A-Za-z0-9+/]+={0,2}", text):
            try:
                seed = base64.b64decode(text, validate=True)
            except binascii.Error:
                seed = b""
            if len(seed) == 32:
                return _ed25519_key(path, seed)
        raise KeyFileError(
            f"{path}: not a private key (expected a PEM file, or an Ed25519 key in "
            "dkimpy's one-line base64 form)"
        )
    kinds = [kind for kind, _ in blocks]
    private = [(k, b) for k, b in blocks if k.endswith(b"PRIVATE KEY")]
    if len(private) != 1:
        found = ", ".join(k.decode("ascii", "replace") for k in kinds)
        if not private:
            raise KeyFileError(f"{path}: no private key in the file (found: {found})")
        raise KeyFileError(f"{path}: more than one private key in the file (found: {found})")
    kind, body = private[0]
    if kind == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type:" in body:
        raise KeyFileError(
            f"{path}: the key is encrypted; Bonzo needs it unencrypted "
            "(openssl pkey -in KEY -out PLAIN), readable only by Bonzo's user"
        )
    if kind == b"OPENSSH PRIVATE KEY":
        raise KeyFileError(
            f"{path}: an OpenSSH key; DKIM needs a PEM key (openssl genpkey -algorithm "
            "ed25519, or RSA)"
        )
    if kind not in (b"RSA PRIVATE KEY", b"PRIVATE KEY"):
        raise KeyFileError(
            f"{path}: {kind.decode('ascii', 'replace')} is not a DKIM key type "
            "(DKIM signs with RSA or Ed25519 private keys)"
        )
    try:
        der = base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
    except binascii.Error:
        raise KeyFileError(f"{path}: the PEM block is not valid base64") from None
    if kind == b"PRIVATE KEY" and der.startswith(_ED25519_PKCS8) and len(der) == 48:
        return _ed25519_key(path, der[len(_ED25519_PKCS8) :])
    return _rsa_key(path, der)


def load_key(path: Path) -> SigningKey:
    """Read and check the key file at ``path``. Raises :class:`KeyFileError`
    naming the file when it is missing, unreadable or not a usable key."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the key file: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path}: too large for a key file (over {MAX_KEY_FILE} octets)")
    return parse_key(data, path)


def dns_record(key: SigningKey) -> str:
    """The TXT record that publishes ``key``'s public half (RFC 6376 3.6.1,
    RFC 8463 for Ed25519): ``v=DKIM1; k=rsa; p=...``."""
    return f"v=DKIM1; k={key.key_type}; p={key.public}"


def zone_line(key: SigningKey, selector: str, domain: str) -> str:
    """The record as a zone-file line, the value cut into quoted strings of at
    most 255 octets (a DNS character-string's limit; resolvers join them)::

        s1._domainkey.example.org. IN TXT ( "v=DKIM1; k=rsa; p=MIIB..." "..." )
    """
    record = dns_record(key)
    parts = [record[i : i + 255] for i in range(0, len(record), 255)]
    quoted = " ".join(f'"{p}"' for p in parts)
    return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"

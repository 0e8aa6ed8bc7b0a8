"""SMTP AUTH (RFC 4954): SASL mechanisms and password hashing.

The mechanisms here only turn the client's base64 lines into a user name and
password (:class:`Credentials`); whether those are right is decided by the
``bonzo_auth`` hook, so any plugin can authenticate against any store.
:func:`hash_password` and :func:`verify_password` are the salted, slow
(scrypt, from the standard library) hashes of the bundled password-file
plugin and the ``bonzo adduser`` command.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from .errors import SMTPError

__all__ = [
    "Challenge",
    "Credentials",
    "Mechanism",
    "Plain",
    "Login",
    "MECHANISMS",
    "decode_response",
    "hash_password",
    "verify_password",
    "check_password_hash",
    "PasswordHashError",
    "dummy_hash",
]


class Challenge:
    """Send ``334 <base64 of data>`` and wait for the client's next line."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def encoded(self) -> str:
        """The challenge as sent on the wire."""
        return base64.b64encode(self.data).decode("ascii")


class Credentials:
    """The client's identity: ask ``bonzo_auth`` whether it is good.

    ``authzid`` is the identity to act as (PLAIN only; usually empty).
    ``repr()`` never shows the password.
    """

    __slots__ = ("username", "password", "authzid", "mechanism")

    def __init__(self, username: str, password: str, authzid: str = "", mechanism: str = ""):
        self.username = username
        self.password = password
        self.authzid = authzid
        self.mechanism = mechanism

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, mechanism={self.mechanism!r})"


def _syntax(text: str = "Invalid base64 data") -> SMTPError:
    return SMTPError(501, text, enhanced_code="5.5.2")


def decode_response(line: str) -> bytes:
    """Decode one base64 client response (``=`` is the empty response).

    Raises the ``501 5.5.2`` :class:`SMTPError` for malformed base64.
    """
    if line == "=":
        return b""
    if line and (len(line) % 4 or line[0] == "="):
        # Python 3.10's decoder lets "==" and unpadded text through.
        raise _syntax()
    try:
        return base64.b64decode(line.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _syntax() from None


def _text(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _syntax("Invalid UTF-8 in credentials") from None
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise _syntax("Control characters in credentials")
    return text


class Mechanism:
    """One SASL exchange. :meth:`start` gets the initial response (``None``
    if the client gave none); each later client line goes to :meth:`step`.
    Both return a :class:`Challenge` or :class:`Credentials`, or raise an
    :class:`SMTPError`."""

    name = ""

    def start(self, initial: bytes | None) -> Challenge | Credentials:  # pragma: no cover
        raise NotImplementedError

    def step(self, response: bytes) -> Challenge | Credentials:  # pragma: no cover
        raise NotImplementedError


class Plain(Mechanism):
    """PLAIN (RFC 4616): ``authzid NUL authcid NUL password`` in one message."""

    name = "PLAIN"

    def start(self, initial: bytes | None) -> Challenge | Credentials:
        if initial is None:
            return Challenge(b"")
        return self.step(initial)

    def step(self, response: bytes) -> Challenge | Credentials:
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise _syntax("Malformed PLAIN response")
        authzid, user, password = (_text(p) for p in parts)
        return Credentials(user, password, authzid, self.name)


class Login(Mechanism):
    """LOGIN (draft-murchison-sasl-login): user name, then password."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._user: str | None = None

    def start(self, initial: bytes | None) -> Challenge | Credentials:
        if initial is None:
            return Challenge(b"Username:")
        return self.step(initial)

    def step(self, response: bytes) -> Challenge | Credentials:
        if self._user is None:
            user = _text(response)
            if not user:
                raise _syntax("Empty user name")
            self._user = user
            return Challenge(b"Password:")
        return Credentials(self._user, _text(response), "", self.name)


#: The mechanisms Bonzo implements, by name.
MECHANISMS: dict[str, type[Mechanism]] = {"PLAIN": Plain, "LOGIN": Login}


# ------------------------------------------------------------------ passwords
class PasswordHashError(ValueError):
    """A stored hash that cannot be parsed."""


_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SCRYPT_MAXMEM = 256 * 1024 * 1024


def hash_password(
    password: str, *, n: int = _SCRYPT_N, r: int = _SCRYPT_R, p: int = _SCRYPT_P
) -> str:
    """Return a salted scrypt hash of ``password``:
    ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    return "$".join(
        [
            "scrypt",
            str(n),
            str(r),
            str(p),
            base64.b64encode(salt).decode(),
            base64.b64encode(digest).decode(),
        ]
    )


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            raise ValueError(f"unknown scheme {scheme!r}")
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(digest_b64, validate=True)
        n_, r_, p_ = int(n), int(r), int(p)
        if not (2 <= n_ <= 2**20 and 1 <= r_ <= 32 and 1 <= p_ <= 16 and expected):
            raise ValueError("scrypt parameters out of range")
        if n_ & (n_ - 1):
            raise ValueError("scrypt n must be a power of 2")
        if 128 * r_ * (n_ + p_ + 2) > _SCRYPT_MAXMEM:
            raise ValueError("scrypt parameters need too much memory")
    except (ValueError, binascii.Error) as exc:
        raise PasswordHashError(f"malformed password hash: {exc}") from None
    return n_, r_, p_, salt, expected


def check_password_hash(stored: str) -> None:
    """Raise :class:`PasswordHashError` if ``stored`` is not a
    :func:`hash_password` result (cheap: nothing is hashed). For checking a
    password file when it is read rather than at the first login."""
    _parse_hash(stored)


def verify_password(password: str, stored: str) -> bool:
    """True if ``password`` matches ``stored`` (a :func:`hash_password` result).
    Compares in constant time. Raises :class:`PasswordHashError` for a
    malformed ``stored``."""
    n_, r_, p_, salt, expected = _parse_hash(stored)
    try:
        digest = hashlib.scrypt(
            password.encode("utf-8"),
            salt=salt,
            n=n_,
            r=r_,
            p=p_,
            dklen=len(expected),
            maxmem=_SCRYPT_MAXMEM,
        )
    except ValueError as exc:  # parameters OpenSSL refuses
        raise PasswordHashError(f"malformed password hash: {exc}") from None
    return hmac.compare_digest(digest, expected)


_dummy_hash: str | None = None


def dummy_hash() -> str:
    """A hash of a random password (made once, on first use): check a password
    against it for an unknown user, so that an unknown user takes as long to
    refuse as a wrong password."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password(secrets.token_hex(16))
    return _dummy_hash

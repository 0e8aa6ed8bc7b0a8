"""bonzo.auth on its own: SASL PLAIN and LOGIN parsing, base64 responses,
password hashes."""

from __future__ import annotations

import base64

import pytest

from bonzo.auth import (
    MECHANISMS,
    Challenge,
    Credentials,
    Login,
    PasswordHashError,
    Plain,
    check_password_hash,
    decode_response,
    dummy_hash,
    hash_password,
    verify_password,
)
from bonzo.errors import SMTPError

FAST = {"n": 2**4, "r": 1, "p": 1}


def assert_501(exc: pytest.ExceptionInfo[SMTPError]) -> None:
    assert (exc.value.status_code, exc.value.enhanced_code) == (501, "5.5.2")


# ------------------------------------------------------------ base64 lines
@pytest.mark.parametrize(
    ("line", "data"),
    [
        ("=", b""),
        ("", b""),
        ("YQ==", b"a"),
        ("YWI=", b"ab"),
        ("YWJj", b"abc"),
        (base64.b64encode(bytes(range(256))).decode(), bytes(range(256))),
    ],
)
def test_decode_response(line, data):
    assert decode_response(line) == data


@pytest.mark.parametrize(
    "line",
    ["YQ", "YWJjZA", "Y Q==", "YQ==YQ==", "YQ=\u00e9", "\u00e9t\u00e9", "a*b=", "YWJj\n", "=="],
)
def test_decode_response_refuses_bad_base64(line):
    with pytest.raises(SMTPError) as exc:
        decode_response(line)
    assert_501(exc)
    assert exc.value.message == "Invalid base64 data"


# -------------------------------------------------------------------- PLAIN
def test_plain_without_initial_response_asks_with_an_empty_challenge():
    step = Plain().start(None)
    assert isinstance(step, Challenge)
    assert step.data == b"" and step.encoded() == ""


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"\0alice\0pw", ("", "alice", "pw")),
        (b"boss\0alice\0pw", ("boss", "alice", "pw")),
        (b"\0alice\0", ("", "alice", "")),
        (b"\0j\xc3\xb6rg\0p\xc3\xa4ss w\xc3\xb6rd", ("", "jörg", "päss wörd")),
        (b"\0alice\0" + b"x" * 5000, ("", "alice", "x" * 5000)),
    ],
)
def test_plain_messages(message, expected):
    for start in (True, False):
        mech = Plain()
        creds = mech.start(message) if start else mech.step(message)
        assert isinstance(creds, Credentials)
        assert (creds.authzid, creds.username, creds.password) == expected
        assert creds.mechanism == "PLAIN"


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"", "Malformed PLAIN response"),
        (b"alice", "Malformed PLAIN response"),
        (b"alice\0pw", "Malformed PLAIN response"),
        (b"\0\0pw", "Malformed PLAIN response"),  # no user name
        (b"\0alice\0pw\0extra", "Malformed PLAIN response"),
        (b"\0al\xffice\0pw", "Invalid UTF-8 in credentials"),
        (b"\0alice\0p\xc3", "Invalid UTF-8 in credentials"),
        (b"\0alice\0pw\r\nMAIL FROM:<x@y>", "Control characters in credentials"),
        (b"\0ali\x7fce\0pw", "Control characters in credentials"),
        (b"a\tz\0alice\0pw", "Control characters in credentials"),
    ],
)
def test_plain_malformed(message, why):
    with pytest.raises(SMTPError) as exc:
        Plain().start(message)
    assert_501(exc)
    assert exc.value.message == why


# -------------------------------------------------------------------- LOGIN
def test_login_two_challenges():
    mech = Login()
    first = mech.start(None)
    assert isinstance(first, Challenge)
    assert first.encoded() == base64.b64encode(b"Username:").decode() == "VXNlcm5hbWU6"
    second = mech.step(b"alice")
    assert isinstance(second, Challenge)
    assert second.encoded() == "UGFzc3dvcmQ6"  # Password:
    creds = mech.step(b"s3cret")
    assert isinstance(creds, Credentials)
    assert (creds.username, creds.password, creds.authzid, creds.mechanism) == (
        "alice",
        "s3cret",
        "",
        "LOGIN",
    )


def test_login_initial_response_is_the_user_name():
    mech = Login()
    step = mech.start(b"alice")
    assert isinstance(step, Challenge) and step.data == b"Password:"
    creds = mech.step(b"")
    assert isinstance(creds, Credentials) and creds.password == ""


@pytest.mark.parametrize(
    ("user", "why"),
    [
        (b"", "Empty user name"),
        (b"al\xffice", "Invalid UTF-8"),
        (b"alice\r\nRSET", "Control characters"),
    ],
)
def test_login_bad_user_name(user, why):
    for start in (True, False):
        mech = Login()
        with pytest.raises(SMTPError, match=why) as exc:
            if start:
                mech.start(user)
            else:
                mech.start(None)
                mech.step(user)
        assert_501(exc)


def test_login_bad_password():
    mech = Login()
    mech.start(b"alice")
    with pytest.raises(SMTPError, match="Control characters") as exc:
        mech.step(b"pw\0more")
    assert_501(exc)


def test_each_exchange_has_its_own_state():
    one, two = Login(), Login()
    one.start(b"alice")
    assert isinstance(two.start(None), Challenge)
    creds = two.step(b"bob")
    assert isinstance(creds, Challenge)  # bob still needs a password
    final = one.step(b"pw")
    assert isinstance(final, Credentials) and final.username == "alice"


def test_mechanisms():
    assert MECHANISMS == {"PLAIN": Plain, "LOGIN": Login}
    assert {cls.name for cls in MECHANISMS.values()} == {"PLAIN", "LOGIN"}


# -------------------------------------------------------------- Credentials
def test_credentials_repr_hides_the_password():
    creds = Credentials("alice", "Sup3r-Secret", "boss", "PLAIN")
    text = repr(creds)
    assert "Sup3r-Secret" not in text and "Sup3r-Secret" not in str(creds)
    assert "alice" in text and "PLAIN" in text
    assert not hasattr(creds, "__dict__")  # no stray attribute to leak either


# ------------------------------------------------------------------ hashes
def test_hash_round_trip():
    stored = hash_password("correct horse", **FAST)
    assert verify_password("correct horse", stored)
    assert not verify_password("correct horse ", stored)
    assert not verify_password("", stored)
    assert "correct horse" not in stored
    check_password_hash(stored)


def test_hash_format_and_salt():
    one = hash_password("pw", **FAST)
    two = hash_password("pw", **FAST)
    assert one != two  # a new salt each time
    scheme, n, r, p, salt, digest = one.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16", "1", "1")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(digest)) == 32


def test_default_hash_parameters():
    stored = hash_password("pw")
    assert stored.split("$")[1:4] == ["16384", "8", "1"]
    assert verify_password("pw", stored)


def test_unicode_passwords():
    stored = hash_password("päss wörd \U0001f511", **FAST)
    assert verify_password("päss wörd \U0001f511", stored)
    # Not normalised: a different code point sequence is a different password.
    assert not verify_password("pa\u0308ss wörd \U0001f511", stored)


GOOD_SALT = base64.b64encode(b"s" * 16).decode()
GOOD_DIGEST = base64.b64encode(b"d" * 32).decode()


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plaintext",
        "scrypt",
        f"bcrypt$16$1$1${GOOD_SALT}${GOOD_DIGEST}",
        f"scrypt$16$1${GOOD_SALT}${GOOD_DIGEST}",
        f"scrypt$16$1$1$1${GOOD_SALT}${GOOD_DIGEST}",
        f"scrypt$x$1$1${GOOD_SALT}${GOOD_DIGEST}",
        f"scrypt$16$1$1$!!!!${GOOD_DIGEST}",
        f"scrypt$16$1$1${GOOD_SALT}$",
        f"scrypt$16$1$1${GOOD_SALT}$not base64",
        f"scrypt$1$1$1${GOOD_SALT}${GOOD_DIGEST}",  # n too small
        f"scrypt$24$1$1${GOOD_SALT}${GOOD_DIGEST}",  # n not a power of 2
        f"scrypt${2**21}$1$1${GOOD_SALT}${GOOD_DIGEST}",
        f"scrypt$16$0$1${GOOD_SALT}${GOOD_DIGEST}",
        f"scrypt$16$1$17${GOOD_SALT}${GOOD_DIGEST}",
        f"scrypt${2**20}$32$1${GOOD_SALT}${GOOD_DIGEST}",  # 4 GiB of memory
    ],
)
def test_malformed_hash(stored):
    with pytest.raises(PasswordHashError, match="malformed password hash"):
        check_password_hash(stored)
    with pytest.raises(PasswordHashError, match="malformed password hash"):
        verify_password("pw", stored)


def test_password_hash_error_is_a_value_error():
    assert issubclass(PasswordHashError, ValueError)


def test_dummy_hash():
    stored = dummy_hash()
    assert dummy_hash() is stored  # made once
    check_password_hash(stored)
    # The same cost as a real hash made with the defaults.
    assert stored.split("$")[1:4] == ["16384", "8", "1"]
    assert not verify_password("", stored)

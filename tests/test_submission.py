"""[[listeners]] TLS and AUTH keys, ``bonzo adduser``, and the submission
recipe (examples/submission.toml) run as a real daemon with real clients.

Certificates are made by trustme; everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme
from ports import free_port

from bonzo.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 20.0
MESSAGE = "From: alice@example.org\r\nTo: bob@elsewhere.test\r\nSubject: sub\r\n\r\nHi.\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certs(tmp_path: Path, ca: trustme.CA) -> Path:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    other = ca.issue_cert("other.test")
    other.private_key_pem.write_to_path(str(tmp_path / "other-key.pem"))
    other.cert_chain_pems[0].write_to_path(str(tmp_path / "other.pem"))
    return tmp_path


def parse(text: str, base: Path):
    return parse_config(text, source="t.toml", base_dir=base)


# ------------------------------------------------------------ configuration
def test_listener_tls_keys_build_a_context(certs):
    config = parse(
        """
        [[listeners]]
        port = 2600
        tls.cert = "cert.pem"
        tls.key = "key.pem"
        tls.sni."other.test" = { cert = "other.pem", key = "other-key.pem" }
        require_tls = true
        require_auth = true
        auth_mechanisms = ["plain"]
        """,
        certs,
    )
    ls = config.listeners[0].settings
    assert isinstance(ls.tls_context, ssl.SSLContext)
    assert ls.tls_context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ls.tls_context.sni_callback is not None
    assert (ls.require_tls, ls.require_auth, ls.implicit_tls, ls.auth_plaintext) == (
        True,
        True,
        False,
        False,
    )
    assert ls.auth_mechanisms == ("PLAIN",)


def test_listener_defaults_have_no_tls(certs):
    ls = parse("[[listeners]]\nport = 2600\n", certs).listeners[0].settings
    assert ls.tls_context is None and not ls.implicit_tls
    assert ls.auth_mechanisms == ("PLAIN", "LOGIN")


@pytest.mark.parametrize(
    "body, key, fragment",
    [
        ('tls = { cert = "missing.pem", key = "key.pem" }', "listeners[0].tls", "cannot read"),
        ('tls = { cert = "other.pem", key = "key.pem" }', "listeners[0].tls", "does not match"),
        ('tls = { cert = "cert.pem" }', "listeners[0].tls.key", "PEM file"),
        (
            'tls = { cert = "cert.pem", key = "key.pem", pin = 1 }',
            "listeners[0].tls.pin",
            "unknown",
        ),
        ('tls = "cert.pem"', "listeners[0].tls", "must be a table"),
        ("implicit_tls = true", "listeners[0].implicit_tls", "certificate: set the listener's tls"),
        ("require_tls = true", "listeners[0].require_tls", "certificate: set the listener's tls"),
        (
            'tls = { cert = "key.pem", key = "cert.pem" }',
            "listeners[0].tls",
            "expected the certificate (chain) in cert and its private key in key, both PEM",
        ),
        ('require_auth = "yes"', "listeners[0].require_auth", "true or false"),
        ('auth_mechanisms = ["CRAM-MD5"]', "listeners[0].auth_mechanisms", "PLAIN"),
        ("auth_mechanisms = []", "listeners[0].auth_mechanisms", "non-empty"),
        (
            'tls = { cert = "cert.pem", key = "key.pem", '
            'sni = { "x.test" = { cert = "other.pem" } } }',
            'listeners[0].tls.sni."x.test".key',
            "PEM file",
        ),
        (
            'tls = { cert = "cert.pem", key = "key.pem", '
            'sni = { "x.test" = { cert = "other.pem", key = "key.pem" } } }',
            'listeners[0].tls.sni."x.test"',
            "does not match",
        ),
        (
            'tls = { cert = "cert.pem", key = "key.pem", '
            'sni = { "x" = { cert = "other.pem", key = "nowhere.pem" } } }',
            "listeners[0].tls.sni.x",
            "nowhere.pem",
        ),
    ],
)
def test_listener_errors_name_the_key(certs, body, key, fragment):
    with pytest.raises(ConfigError) as info:
        parse(f"[[listeners]]\nport = 2600\n{body}\n", certs)
    assert info.value.key == key
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"t.toml: {key}: ")


# -------------------------------------------------------------- the daemon


def run_bonzo(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bonzo", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def test_adduser_writes_a_private_hash_file(tmp_path):
    result = run_bonzo(
        "adduser", "-f", "passwd", "--password-stdin", "alice", cwd=tmp_path, stdin="s3cret\n"
    )
    assert result.returncode == 0, result.stderr
    assert "added alice" in result.stdout
    text = (tmp_path / "passwd").read_text()
    assert text.startswith("alice:scrypt$") and "s3cret" not in text
    assert (tmp_path / "passwd").stat().st_mode & 0o777 == 0o600
    again = run_bonzo(
        "adduser", "-f", "passwd", "--password-stdin", "alice", cwd=tmp_path, stdin="other\n"
    )
    assert "changed the password of alice" in again.stdout
    assert (tmp_path / "passwd").read_text().count("alice:") == 1
    bad = run_bonzo(
        "adduser", "-f", "passwd", "--password-stdin", "bad:name", cwd=tmp_path, stdin="x\n"
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    # A file it cannot parse, or cannot write beside: its name once, and no
    # temporary file's name.
    (tmp_path / "garbage").write_text("garbage\n")
    unparsed = run_bonzo(
        "adduser", "-f", "garbage", "--password-stdin", "bob", cwd=tmp_path, stdin="x\n"
    )
    assert unparsed.returncode == 2
    assert unparsed.stderr.strip() == "bonzo: garbage: line 1: expected user:hash"
    nowhere = run_bonzo(
        "adduser", "-f", "missing/passwd", "--password-stdin", "bob", cwd=tmp_path, stdin="x\n"
    )
    assert nowhere.returncode == 2
    assert nowhere.stderr.strip() == "bonzo: missing/passwd: No such file or directory"
    # No terminal to ask for the password (stdin not a tty): say what to do.
    blind = run_bonzo("adduser", "-f", "passwd", "bob", cwd=tmp_path, stdin="")
    assert blind.returncode == 2 and "Traceback" not in blind.stderr
    assert blind.stderr.strip() == (
        "bonzo: adduser: no terminal to ask for the password; give it on standard input "
        "with --password-stdin"
    )
    assert "bob:" not in (tmp_path / "passwd").read_text()


@pytest.fixture
def submission(certs: Path):
    """examples/submission.toml on free ports, with certificates and a user."""
    text = (ROOT / "examples" / "submission.toml").read_text()
    ports = {"2587": free_port(), "2465": free_port()}
    for old, new in ports.items():
        text = text.replace(f"port = {old}", f"port = {new}")
    text = text.replace("auth_failure_delay = 2.0", "auth_failure_delay = 0.1")
    (certs / "submission.toml").write_text(text)
    result = run_bonzo(
        "adduser", "-f", "passwd", "--password-stdin", "alice", cwd=certs, stdin="correct horse\n"
    )
    assert result.returncode == 0, result.stderr
    check = run_bonzo("check", "-c", "submission.toml", cwd=certs)
    assert check.returncode == 0, check.stderr
    log = open(certs / "daemon.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bonzo", "serve", "-c", "submission.toml"],
        cwd=certs,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + DEADLINE
        while "ready" not in (certs / "daemon.log").read_text():
            assert proc.poll() is None, (certs / "daemon.log").read_text()
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        yield certs, ports["2587"], ports["2465"], proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=DEADLINE)
        log.close()


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def test_submission_recipe_starttls_auth_and_implicit_tls(submission, ca):
    workdir, port587, port465, proc = submission
    ctx = client_context(ca)
    with smtplib.SMTP("127.0.0.1", port587, local_hostname="mua.test", timeout=DEADLINE) as c:
        c.ehlo()
        assert c.has_extn("starttls") and not c.has_extn("auth")
        code, text = c.mail("alice@example.org")
        assert (code, text[:5]) == (530, b"5.7.0")
        c.starttls(context=ctx)
        c.ehlo()
        assert "PLAIN" in c.esmtp_features["auth"] and not c.has_extn("starttls")
        code, _ = c.mail("alice@example.org")
        assert code == 530  # still needs AUTH
        c.rset()
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            c.login("alice", "wrong")
        assert info.value.smtp_code == 535
        c.login("alice", "correct horse")
        assert c.sendmail("alice@example.org", ["bob@elsewhere.test"], MESSAGE) == {}
    with smtplib.SMTP_SSL("127.0.0.1", port465, context=ctx, timeout=DEADLINE) as c:
        c.login("alice", "correct horse")
        assert c.sendmail("alice@example.org", ["carol@elsewhere.test"], MESSAGE) == {}
    stored = sorted((workdir / "outbox" / "new").iterdir())
    assert len(stored) == 2
    first = stored[0].read_bytes()
    assert re.search(rb"with ESMTPSA\r\n\t\(version=TLSv1\.[23] cipher=", first), first[:400]
    assert b"authenticated as alice" in first
    log = (workdir / "daemon.log").read_text()
    assert "correct horse" not in log and "wrong" not in log.replace("wrong password", "")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=DEADLINE) == 0


def test_swaks_submission_with_tls_and_auth(submission, ca, tmp_path):
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (.ci/run installs it)")
    workdir, port587, port465, proc = submission
    for port, mode in ((port587, "--tls"), (port465, "--tlsc")):
        result = subprocess.run(
            [
                "swaks",
                "--server",
                f"127.0.0.1:{port}",
                mode,
                "--auth",
                "LOGIN",
                "--auth-user",
                "alice",
                "--auth-password",
                "correct horse",
                "--from",
                "alice@example.org",
                "--to",
                "dave@elsewhere.test",
                "--timeout",
                "15",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "235 2.7.0" in result.stdout
    assert len(list((workdir / "outbox" / "new").iterdir())) == 2


def test_require_auth_where_auth_is_never_offered_is_warned_about(tmp_path):
    """A listener with require_auth, no certificate and no auth_plaintext
    refuses every MAIL with 530 (an MX bounces all its mail): a warning that
    says so. A plain port-25 listener beside a submission port is the usual
    setup: no warning for it."""
    from bonzo.app import MailApp
    from bonzo.config import parse_config

    (tmp_path / "authplug.py").write_text(
        "from bonzo import Accept, hookimpl\n"
        "class Plugin:\n"
        "    @hookimpl\n"
        "    def bonzo_auth(self):\n"
        "        return Accept()\n"
    )

    def warnings(listener: str) -> list[str]:
        text = (
            f"[[listeners]]\nport = 2525\n{listener}\n[plugins]\n"
            f'paths = ["{tmp_path}"]\n'
            'enabled = ["authplug:Plugin", "recipients", "discard"]\n'
            '[plugins.recipients]\ndomains = ["example.com"]\n'
        )
        return MailApp(parse_config(text, "t.toml", tmp_path)).warnings()

    assert [w for w in warnings("require_auth = true") if "listeners[0]" in w] == [
        "listeners[0] requires AUTH but never offers it (no TLS certificate, and "
        "auth_plaintext is false): every MAIL will be refused with 530; give it a "
        "certificate, or remove require_auth"
    ]
    assert not [w for w in warnings("") if "listeners[0]" in w]
    assert not [
        w for w in warnings("require_auth = true\nauth_plaintext = true") if "listeners[0]" in w
    ]


def test_a_size_limit_below_what_rfc_5321_requires_is_warned_about(tmp_path):
    """max_message_size = 10 refuses nearly every message with 552: a typo
    (a unit forgotten), since RFC 5321 4.5.3.1.7 has every server take 64K."""
    from bonzo.app import MailApp
    from bonzo.config import parse_config

    def warnings(limits: str, listener: str = "") -> list[str]:
        text = (
            f"[limits]\n{limits}\n[[listeners]]\nport = 2525\n{listener}\n[plugins]\n"
            'enabled = ["recipients", "discard"]\n[plugins.recipients]\ndomains = ["example.com"]\n'
        )
        found = MailApp(parse_config(text, "t.toml", tmp_path)).warnings()
        return [w for w in found if "max_message_size" in w]

    assert warnings("max_message_size = 10") == [
        "limits.max_message_size = 10: smaller than the 64K octets every server must take "
        "(RFC 5321 4.5.3.1.7); most mail will be refused with 552"
    ]
    assert warnings("max_message_size = 65536") == []
    assert warnings("max_message_size = 0") == []  # no limit
    assert warnings("", "max_message_size = 1000") == [
        "listeners[0].max_message_size = 1000: smaller than the 64K octets every server must "
        "take (RFC 5321 4.5.3.1.7); most mail will be refused with 552"
    ]

"""The ``passwd`` plugin: the password file, reloading, timing, and AUTH end to end."""

from __future__ import annotations

import asyncio
import os
import smtplib
import ssl
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bonzo_plugins.passwd.plugin as passwd_module
import pytest
import trustme
from bonzo_plugins.passwd import PasswdPlugin, add_user, read_password_file
from e2e_support import HOST, TIMEOUT, wait_until

from bonzo import Accept, hookimpl
from bonzo.auth import dummy_hash, hash_password, verify_password
from bonzo.errors import SMTPError
from bonzo.hooks import PluginSet
from bonzo.session import Envelope, Session
from bonzo.settings import ListenerSettings
from bonzo.tls import CertificatePair, make_server_context

pytestmark = pytest.mark.timeout(60)

# Cheap hashes keep the tests fast; the format is the same.
FAST = {"n": 2**4, "r": 1, "p": 1}


@pytest.fixture(autouse=True)
def fast_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    def fast_hash(password: str, **_: Any) -> str:
        return hash_password(password, **FAST)

    monkeypatch.setattr(passwd_module, "hash_password", fast_hash)


def configured(path: Path, app: Any = None) -> PasswdPlugin:
    plugin = PasswdPlugin()
    plugin.bonzo_configure(config={"file": str(path)}, app=app)
    return plugin


def check(plugin: PasswdPlugin, user: str, password: str) -> bool:
    return isinstance(asyncio.run(plugin.bonzo_auth(username=user, password=password)), Accept)


# ---------------------------------------------------------------- add_user
def test_add_user_creates_a_private_file(tmp_path):
    path = tmp_path / "passwd"
    assert add_user(path, "alice", "s3cret") is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (line,) = path.read_text().splitlines()
    user, _, stored = line.partition(":")
    assert user == "alice"
    assert stored.startswith("scrypt$") and "s3cret" not in line
    assert verify_password("s3cret", stored)
    assert not verify_password("S3cret", stored)
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]  # no temporary left


def test_add_user_replaces_a_user_and_keeps_the_rest(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("# staff\n\nbob:" + hash_password("bob-pw", **FAST) + "\n# end\n")
    path.chmod(0o644)
    assert add_user(path, "alice", "one") is True
    assert add_user(path, "alice", "two") is False
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# staff", ""]
    assert "# end" in lines
    assert sum(line.startswith("alice:") for line in lines) == 1
    assert sum(line.startswith("bob:") for line in lines) == 1
    users = read_password_file(path)
    assert verify_password("two", users["alice"])
    assert verify_password("bob-pw", users["bob"])
    # The group's permissions are kept, others' never: hashes are secrets.
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away takes root")
def test_add_user_as_root_keeps_the_owner_group_and_mode(tmp_path):
    """With User=bonzo the daemon reads a file root gave it; root's adduser
    must not take it back (root:root 0600)."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    path = tmp_path / "passwd"
    add_user(path, "alice", "one")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    path.chmod(0o640)
    add_user(path, "bob", "two")
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        nobody.pw_uid,
        nobody.pw_gid,
        0o640,
    )
    assert list(read_password_file(path)) == ["alice", "bob"]


def test_add_user_that_cannot_keep_the_owner_changes_nothing(tmp_path, monkeypatch):
    path = tmp_path / "passwd"
    add_user(path, "alice", "one")
    before = path.read_bytes()

    def refused(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refused)
    with pytest.raises(ValueError, match="cannot give the new file the owner and group"):
        add_user(path, "bob", "two")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]  # no temporary left


def test_add_user_through_a_symbolic_link_replaces_its_target(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    target = real / "passwd"
    add_user(target, "alice", "one")
    link = tmp_path / "passwd"
    link.symlink_to(target)
    assert add_user(link, "bob", "two") is True
    assert link.is_symlink() and link.resolve() == target
    assert list(read_password_file(target)) == ["alice", "bob"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passwd", "real"]
    assert [p.name for p in real.iterdir()] == ["passwd"]


def test_a_byte_order_mark_is_not_part_of_the_first_user(tmp_path):
    """Some editors start a UTF-8 file with a BOM: alice must still log in."""
    path = tmp_path / "passwd"
    lines = f"alice:{hash_password('pw', **FAST)}\nbob:{hash_password('pw2', **FAST)}\n"
    path.write_bytes(b"\xef\xbb\xbf" + lines.encode())
    assert list(read_password_file(path)) == ["alice", "bob"]
    assert check(configured(path), "alice", "pw")
    assert add_user(path, "alice", "new") is False
    assert list(read_password_file(path)) == ["bob", "alice"]
    assert not path.read_bytes().startswith(b"\xef\xbb\xbf")


def test_add_user_leaves_a_commented_out_user_alone(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("#alice:old entry\n")
    assert add_user(path, "alice", "pw") is True
    assert path.read_text().splitlines()[0] == "#alice:old entry"


@pytest.mark.parametrize("user", ["", "a:b", "a b", "tab\tuser", "nul\0"])
def test_add_user_refuses_bad_names(tmp_path, user):
    with pytest.raises(ValueError, match="bad user name"):
        add_user(tmp_path / "passwd", user, "pw")
    assert not (tmp_path / "passwd").exists()


def test_add_user_refuses_an_empty_password(tmp_path):
    with pytest.raises(ValueError, match="empty password"):
        add_user(tmp_path / "passwd", "alice", "")


def test_add_user_refuses_to_rewrite_a_broken_file(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("garbage\n")
    with pytest.raises(ValueError, match="line 1"):
        add_user(path, "alice", "pw")
    assert path.read_text() == "garbage\n"


# ------------------------------------------------------------ file format
@pytest.mark.parametrize(
    ("content", "line", "why"),
    [
        ("alice\n", 1, "expected user:hash"),
        ("# c\nalice:\n", 2, "expected user:hash"),
        ("alice:plaintext\n", 1, "not a bonzo password hash"),
        ("a b:scrypt$16$1$1$AAAA$AAAA\n", 1, "bad user name"),
        (
            "\n\nalice:scrypt$16$1$1$c2FsdA==$ZGlnZXN0\nalice:scrypt$16$1$1$c2FsdA==$ZGlnZXN0\n",
            4,
            "twice",
        ),
        ("alice:scrypt$16$1$1$!!!!$ZGlnZXN0\n", 1, "hash"),
        ("alice:scrypt$sixteen$1$1$c2FsdA==$ZGlnZXN0\n", 1, "hash"),
        ("alice:scrypt$16$1$1$c2FsdA==$\n", 1, "hash"),
    ],
)
def test_malformed_lines_name_the_file_and_line(tmp_path, content, line, why):
    path = tmp_path / "passwd"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"{path}: line {line}: .*{why}"):
        read_password_file(path)
    with pytest.raises(ValueError, match=f"{path}: line {line}"):
        configured(path)


def test_configuration_errors(tmp_path):
    with pytest.raises(ValueError, match="file: "):
        PasswdPlugin().bonzo_configure(config={}, app=None)
    with pytest.raises(ValueError, match="unknown"):
        PasswdPlugin().bonzo_configure(config={"file": "x", "files": "y"}, app=None)
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"file: cannot read {missing}"):
        configured(missing)
    latin = tmp_path / "latin"
    latin.write_bytes(b"\xe9l\xe8ve:x\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        configured(latin)


def test_a_file_every_user_can_read_is_warned_about(tmp_path):
    users = tmp_path / "users"
    add_user(users, "alice", "pw")
    assert configured(users).config_warnings == []  # adduser writes it 600
    users.chmod(0o640)  # a group that may read it (the daemon's): a choice
    assert configured(users).config_warnings == []
    users.chmod(0o644)
    assert configured(users).config_warnings == [
        f"file: {users} can be read by every user (chmod o-r it; bonzo adduser writes it 600)"
    ]


def test_relative_path_is_relative_to_the_configuration(tmp_path):
    add_user(tmp_path / "users", "alice", "pw")
    plugin = configured(Path("users"), app=SimpleNamespace(base_dir=tmp_path))
    assert plugin.path == tmp_path / "users"
    assert list(plugin.users) == ["alice"]


# ------------------------------------------------------------------ checks
def test_good_and_bad_passwords(tmp_path):
    path = tmp_path / "passwd"
    add_user(path, "alice", "correct horse")
    plugin = configured(path)
    assert check(plugin, "alice", "correct horse")
    assert not check(plugin, "alice", "correct horse ")
    assert not check(plugin, "Alice", "correct horse")
    assert not check(plugin, "mallory", "correct horse")


def test_unknown_user_is_checked_against_the_dummy_hash(tmp_path, monkeypatch):
    """An unknown user costs a hash check like a wrong password (no timing
    oracle): the check runs, against the dummy hash."""
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    plugin = configured(path)
    calls: list[tuple[str, str]] = []

    def spy(password: str, stored: str) -> bool:
        calls.append((password, stored))
        return verify_password(password, stored)

    monkeypatch.setattr(passwd_module, "verify_password", spy)
    assert not check(plugin, "mallory", "guess")
    assert calls == [("guess", dummy_hash())]
    calls.clear()
    assert not check(plugin, "alice", "guess")
    assert calls == [("guess", plugin.users["alice"])]


def test_reload_when_the_file_changes(tmp_path, caplog):
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    plugin = configured(path)
    assert not check(plugin, "bob", "bob-pw")
    add_user(path, "bob", "bob-pw")
    assert check(plugin, "bob", "bob-pw")
    assert any("reloaded" in r.getMessage() for r in caplog.records)
    # Removing a user takes effect too.
    path.write_text(path.read_text().replace("alice:", "#alice:"))
    assert not check(plugin, "alice", "pw")


def test_reload_sees_a_changed_password_with_coarse_timestamps(tmp_path):
    """A new hash has the same length as the old one; on a filesystem with
    coarse timestamps the file's mtime and size may not change at all."""
    path = tmp_path / "passwd"
    add_user(path, "alice", "old-password")
    plugin = configured(path)
    before = path.stat()
    add_user(path, "alice", "new-password")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert check(plugin, "alice", "new-password")
    assert not check(plugin, "alice", "old-password")


@pytest.mark.expect_errors
def test_a_broken_new_file_keeps_the_old_users(tmp_path, caplog):
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    plugin = configured(path)
    path.write_text(path.read_text() + "broken line\n")
    assert check(plugin, "alice", "pw")
    (record,) = [r for r in caplog.records if "not reloading" in r.getMessage()]
    assert "line 2" in record.getMessage()
    # Logged once, not at every AUTH.
    assert check(plugin, "alice", "pw")
    assert len([r for r in caplog.records if "not reloading" in r.getMessage()]) == 1


@pytest.mark.expect_errors
def test_a_vanished_file_keeps_the_old_users_and_says_so(tmp_path, caplog):
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    plugin = configured(path)
    saved = path.read_text()
    path.unlink()
    assert check(plugin, "alice", "pw")
    assert check(plugin, "alice", "pw")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    # Once, not at every AUTH; naming the file and what to do.
    assert errors == [
        f"passwd: cannot read {path} (No such file or directory): keeping the 1 user(s) "
        "read before; to remove every user, empty the file"
    ]
    path.write_text(saved)
    assert check(plugin, "alice", "pw")
    assert any(r.getMessage() == f"passwd: {path} is readable again" for r in caplog.records)


def test_passwords_are_checked_in_threads_of_the_plugin_s_own(tmp_path, monkeypatch):
    """A flood of AUTH attempts queues for these threads, not for the
    default executor, where maildir and the queue store mail."""
    import threading

    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    plugin = PasswdPlugin()
    plugin.bonzo_configure(config={"file": str(path), "threads": 3}, app=None)
    names: list[str] = []

    def spy(password: str, stored: str) -> bool:
        names.append(threading.current_thread().name)
        return verify_password(password, stored)

    monkeypatch.setattr(passwd_module, "verify_password", spy)

    async def flood() -> list[Any]:
        return await asyncio.gather(*(plugin.bonzo_auth("alice", "pw") for _ in range(12)))

    assert all(isinstance(r, Accept) for r in asyncio.run(flood()))
    assert len(names) == 12 and all(n.startswith("bonzo-passwd") for n in names)
    assert len(set(names)) <= 3
    plugin.bonzo_shutdown()
    assert plugin._pool is None
    with pytest.raises(ValueError, match="threads: expected an integer >= 1, got 0"):
        PasswdPlugin().bonzo_configure(config={"file": str(path), "threads": 0}, app=None)


def _checker_thread(plugin: PasswdPlugin, user: str, password: str) -> tuple[bool, int]:
    """Whether the check passed, and the thread that ran it."""
    import threading

    seen: list[int] = []
    real = passwd_module._check

    def spy(password: str, stored: str | None) -> bool:
        seen.append(threading.get_ident())
        return real(password, stored)

    passwd_module._check = spy  # type: ignore[assignment]
    try:
        ok = check(plugin, user, password)
    finally:
        passwd_module._check = real  # type: ignore[assignment]
    (ident,) = seen
    return ok, ident


def test_a_reload_keeps_the_password_threads(tmp_path):
    """A reload makes a second plugin instance and then shuts the first one
    down: the checks go on in the same threads (new threads each keep another
    16 MiB scrypt buffer in a malloc arena of their own), and the retiring
    instance's shutdown does not stop them."""
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    config = {"file": str(path), "threads": 1}
    old = PasswdPlugin()
    old.bonzo_configure(config=config, app=None)
    old.bonzo_startup()
    ok, first = _checker_thread(old, "alice", "pw")
    assert ok
    new = PasswdPlugin()  # the reloaded configuration's, started before the old retires
    new.bonzo_configure(config=config, app=None)
    new.bonzo_startup()
    old.bonzo_shutdown()
    pool = new._pool
    assert pool is not None and not pool._shutdown
    assert _checker_thread(new, "alice", "pw") == (True, first)
    assert _checker_thread(new, "alice", "wrong") == (False, first)
    # A third generation, before its first AUTH: still the same threads.
    third = PasswdPlugin()
    third.bonzo_configure(config=config, app=None)
    third.bonzo_startup()
    new.bonzo_shutdown()
    assert third._pool is pool and not pool._shutdown
    assert _checker_thread(third, "alice", "pw") == (True, first)
    # The last holder (the server stops) ends the pool.
    third.bonzo_shutdown()
    assert pool._shutdown and third._pool is None
    assert (os.getpid(), 1) not in passwd_module._pools


def test_a_new_thread_count_gets_its_own_pool_and_the_old_one_stops(tmp_path):
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    old = PasswdPlugin()
    old.bonzo_configure(config={"file": str(path), "threads": 3}, app=None)
    old.bonzo_startup()
    assert check(old, "alice", "pw")
    new = PasswdPlugin()
    new.bonzo_configure(config={"file": str(path), "threads": 4}, app=None)
    new.bonzo_startup()
    assert new._pool is not old._pool
    before = old._pool
    assert before is not None
    assert check(old, "alice", "pw")  # a session of the retiring configuration
    old.bonzo_shutdown()
    assert before._shutdown
    assert check(new, "alice", "pw")
    new.bonzo_shutdown()


def test_a_pool_of_another_process_is_not_used(tmp_path, monkeypatch):
    """After a fork the parent's pool has no threads: the worker (a pid of
    its own) makes its own, for a plugin instance it inherited too."""
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    plugin = configured(path)
    plugin.bonzo_startup()
    assert check(plugin, "alice", "pw")
    parent = plugin._pool
    parent_pid = os.getpid()
    monkeypatch.setattr(passwd_module.os, "getpid", lambda: parent_pid + 100_000)
    assert check(plugin, "alice", "pw")
    assert plugin._pool is not parent and plugin._pool_key == (parent_pid + 100_000, 2)
    fresh = configured(path)
    fresh.bonzo_startup()
    assert fresh._pool is plugin._pool
    # The parent's entry is not the child's to stop.
    fresh.bonzo_shutdown()
    plugin.bonzo_shutdown()
    assert parent is not None and not parent._shutdown


FORK_AND_AUTH = """
import asyncio, os, sys
from bonzo import Accept
from bonzo_plugins.passwd import PasswdPlugin

def make():
    plugin = PasswdPlugin()
    plugin.bonzo_configure(config={"file": sys.argv[1], "threads": 1}, app=None)
    plugin.bonzo_startup()
    return plugin

async def auth(plugin):
    # Bounded: a check queued on a pool with no threads would wait forever.
    try:
        result = await asyncio.wait_for(plugin.bonzo_auth("alice", "pw"), 10)
    except asyncio.TimeoutError:
        return "stuck"
    return "ok" if isinstance(result, Accept) else "refused"

inherited = make()
print("parent", asyncio.run(auth(inherited)), flush=True)
pid = os.fork()
if pid == 0:
    print("child-inherited", asyncio.run(auth(inherited)), flush=True)
    print("child-new", asyncio.run(auth(make())), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", asyncio.run(auth(inherited)), flush=True)
"""


def test_a_forked_worker_checks_passwords_in_threads_of_its_own(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    result = subprocess.run(
        [sys.executable, "-c", FORK_AND_AUTH, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == [
        "parent ok",
        "child-inherited ok",
        "child-new ok",
        "parent ok",
    ], result.stderr


def test_the_password_is_never_logged(tmp_path, caplog):
    path = tmp_path / "passwd"
    add_user(path, "alice", "pw")
    plugin = configured(path)
    plugin.bonzo_startup()
    secret = "Very-Secret-Pw"
    check(plugin, "alice", secret)
    check(plugin, "nobody", secret)
    add_user(path, "carol", secret)
    check(plugin, "carol", secret)
    assert caplog.records  # the startup and reload lines at least
    for record in caplog.records:
        assert secret not in record.getMessage()


# ---------------------------------------------------------------- end to end
class LocalRecipients:
    """Like the recipients plugin: local domain for all, relay once authenticated."""

    @hookimpl
    def bonzo_rcpt(self, session: Session, address: str) -> Any:
        if address.endswith("@example.com") or session.auth is not None:
            return Accept()
        raise SMTPError(554, "Relay access denied", enhanced_code="5.7.1")


class Keep:
    def __init__(self) -> None:
        self.messages: list[tuple[str | None, list[str], bytes]] = []

    @hookimpl
    def bonzo_deliver(self, session: Session, envelope: Envelope) -> Any:
        self.messages.append((session.auth, list(envelope.rcpt_tos), envelope.content))
        return Accept()


def test_smtplib_starttls_login_sendmail(tmp_path, start_server):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    path = tmp_path / "passwd"
    add_user(path, "alice", "correct horse")

    keep = Keep()
    plugins = PluginSet(timeout=TIMEOUT)
    plugins.register(configured(path), "passwd")
    plugins.register(LocalRecipients(), "recipients")
    plugins.register(keep, "keep")
    listener = ListenerSettings(
        tls_context=make_server_context(CertificatePair(str(cert), str(key)))
    )
    # smtplib's login() tries PLAIN then LOGIN: two failures per call.
    server = start_server(
        plugins=plugins,
        listener=listener,
        auth_failure_delay=0,
        max_auth_failures=5,
    )
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    message = b"Subject: passwd\r\n\r\nHi.\r\n"
    with smtplib.SMTP(HOST, server.port, local_hostname="client.test", timeout=TIMEOUT) as client:
        client.starttls(context=client_ctx)
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("alice@example.com", ["friend@elsewhere.test"], message)
        client.rset()
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login("alice", "wrong")
        assert info.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login("mallory", "correct horse")
        assert info.value.smtp_code == 535
    with smtplib.SMTP(HOST, server.port, local_hostname="client.test", timeout=TIMEOUT) as client:
        client.starttls(context=client_ctx)
        assert client.login("alice", "correct horse")[0] == 235
        client.sendmail("alice@example.com", ["friend@elsewhere.test"], message)
    wait_until(lambda: keep.messages, message="the delivery")
    ((who, rcpts, content),) = keep.messages
    assert who == "alice"
    assert rcpts == ["friend@elsewhere.test"]
    assert b"with ESMTPSA" in content and b"(authenticated as alice)" in content
    assert content.endswith(message)

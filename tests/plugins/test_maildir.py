"""The ``maildir`` plugin: durable delivery, path safety, faults, configuration."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from bonzo_plugins.maildir import MaildirPlugin
from bonzo_plugins.maildir.plugin import (
    STALE_AFTER,
    _host_part,
    envelope_lead,
    maildir_component,
    parse_tmp_name,
)
from bonzo_plugins.recipients import RecipientsPlugin
from plugin_testing import make_envelope, make_session, serve
from spellings import parametrize

from bonzo.address import Address
from bonzo.errors import SMTPError
from bonzo.hookspecs import Accept
from bonzo.session import Envelope

MESSAGE = b"Subject: hi\r\n\r\nHello\r\n"
NAME = re.compile(r"\d+\.M\d+P\d+Q\d+\.[^/,:]+,S=(\d+)")


def configured(tmp_path: Path, **table: object) -> MaildirPlugin:
    plugin = MaildirPlugin()
    plugin.bonzo_configure(config=table, app=SimpleNamespace(base_dir=tmp_path))
    return plugin


def deliver(plugin: MaildirPlugin, envelope: Envelope) -> Accept:
    return asyncio.run(plugin.bonzo_deliver(session=make_session(), envelope=envelope))


def refusal(plugin: MaildirPlugin, envelope: Envelope) -> tuple[int, str | None]:
    with pytest.raises(SMTPError) as info:
        deliver(plugin, envelope)
    return info.value.status_code, info.value.enhanced_code


def files(root: Path) -> list[Path]:
    """Every regular file under ``root``."""
    return sorted(p for p in root.rglob("*") if p.is_file())


_open: list[Envelope] = []


@pytest.fixture(autouse=True)
def _close_envelopes():
    yield
    while _open:
        _open.pop().close()


def message(rcpts: list[str] | None = None, body: bytes = b"Subject: hi\r\n\r\nHello\r\n"):
    envelope = make_envelope(body, rcpt_tos=rcpts)
    _open.append(envelope)
    envelope.prepend_raw(b"Received: from client.example ([192.0.2.10])\r\n\tby mx.test\r\n")
    return envelope


# -------------------------------------------------------------- delivery
def test_catch_all_delivery_lands_in_new_with_exact_content(tmp_path):
    plugin = configured(tmp_path)
    envelope = message()
    result = deliver(plugin, envelope)
    assert isinstance(result, Accept)
    assert result.text == f"Ok: queued as {envelope.id}"
    (path,) = files(tmp_path / "Maildir")
    assert path.parent == tmp_path / "Maildir" / "new"
    lead = envelope_lead(envelope.mail_from, envelope.rcpt_tos)
    assert lead.startswith(b"Return-Path: <") and b"\r\nDelivered-To: " in lead
    assert path.read_bytes() == lead + envelope.content
    m = NAME.fullmatch(path.name)
    assert m is not None, path.name
    assert int(m.group(1)) == len(lead + envelope.content)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for sub in ("tmp", "new", "cur"):
        assert (tmp_path / "Maildir" / sub).is_dir()
    assert not list((tmp_path / "Maildir" / "tmp").iterdir())


def test_names_are_unique(tmp_path):
    plugin = configured(tmp_path)
    for _ in range(20):
        deliver(plugin, message())
    names = [p.name for p in files(tmp_path / "Maildir")]
    assert len(set(names)) == 20


def test_absolute_path_and_file_mode(tmp_path):
    plugin = MaildirPlugin()
    plugin.bonzo_configure(config={"path": str(tmp_path / "box"), "mode": 0o640}, app=None)
    deliver(plugin, message())
    (path,) = files(tmp_path / "box")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "box" / "new").stat().st_mode) == 0o750


def test_octal_string_mode(tmp_path):
    assert configured(tmp_path, mode="0644").mode == 0o644
    assert configured(tmp_path, mode="0o660").mode == 0o660


def test_relative_path_without_app_uses_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plugin = MaildirPlugin()
    plugin.bonzo_configure(config={}, app=None)
    assert plugin.path == tmp_path / "Maildir"


def test_startup_creates_the_maildir(tmp_path):
    plugin = configured(tmp_path, path="deep/er/Maildir")
    plugin.bonzo_startup()
    for sub in ("tmp", "new", "cur"):
        assert (tmp_path / "deep/er/Maildir" / sub).is_dir()
    per = configured(tmp_path, path="users", per_recipient=True)
    per.bonzo_startup()
    assert (tmp_path / "users").is_dir()


def test_per_recipient_maildirs(tmp_path):
    plugin = configured(tmp_path, per_recipient=True)
    envelope = message(["alice@example.com", "Bob@Example.ORG", "ALICE@example.com", "postmaster"])
    deliver(plugin, envelope)
    root = tmp_path / "Maildir"
    found = files(root)
    assert [p.relative_to(root).parent for p in found] == [
        Path("_local/postmaster/new"),
        Path("example.com/alice/new"),
        Path("example.org/bob/new"),
    ]
    for path in found:
        assert path.read_bytes() == envelope.content
    # Copies after the first are hard links when the filesystem allows it.
    assert found[0].stat().st_nlink == 3


def test_per_recipient_copies_when_links_fail(tmp_path, monkeypatch):
    plugin = configured(tmp_path, per_recipient=True)

    def no_link(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    envelope = message(["a@example.com", "b@example.com"])
    deliver(plugin, envelope)
    found = files(tmp_path / "Maildir")
    assert len(found) == 2
    assert all(p.read_bytes() == envelope.content and p.stat().st_nlink == 1 for p in found)


@pytest.mark.parametrize(
    "address",
    [
        '"../../../escape"@example.com',
        '".."@example.com',
        '"."@example.com',
        '"a/../../b"@example.com',
        '"/etc/passwd"@example.com',
        "user@../../escape",
        "user@..",
        "user@a/b/../../..",
        '"\\0"@example.com',
        "x@" + "a" * 300,
        '"_local"@example.com',
    ],
)
def test_per_recipient_paths_cannot_escape(tmp_path, address):
    root = tmp_path / "inside" / "Maildir"
    plugin = MaildirPlugin()
    plugin.bonzo_configure(config={"path": str(root), "per_recipient": True}, app=None)
    folder = plugin.maildir_for(address)
    assert folder.parent.parent == root
    assert all(part not in ("", ".", "..") and "/" not in part for part in folder.parts[-2:])
    deliver(plugin, message([address]))
    (path,) = files(tmp_path)
    assert path.is_relative_to(root)
    assert path.parent == folder / "new"


def test_a_name_that_is_not_an_address_gets_no_folder(tmp_path):
    plugin = MaildirPlugin()
    plugin.bonzo_configure(config={"path": str(tmp_path), "per_recipient": True}, app=None)
    with pytest.raises(ValueError, match="not an address"):
        plugin.maildir_for("../postmaster")


def test_components_are_distinct_for_distinct_addresses():
    samples = ["a", "a%41", "a.b", "a%2Eb", ".a", "%2Ea", "a_b", "a+b", "ä", "%C3%A4", "a" * 300]
    encoded = [maildir_component(s) for s in samples]
    assert len(set(encoded)) == len(samples)
    assert maildir_component("A") == maildir_component("a")
    assert maildir_component("a_b", domain=True) != maildir_component("a%5Fb", domain=True)
    assert maildir_component("_local", domain=True) != "_local"
    assert len(maildir_component("a" * 300)) <= 200


def test_recipients_mapping_to_one_folder_get_one_copy(tmp_path):
    plugin = configured(tmp_path, per_recipient=True)
    rcpts = ["a@example.com", "A@EXAMPLE.COM", '"a"@example.com', "a@ｅｘａｍｐｌｅ。com"]
    deliver(plugin, message(rcpts))
    (path,) = files(tmp_path / "Maildir")
    assert path.parent == tmp_path / "Maildir" / "example.com" / "a" / "new"


@parametrize("spelling", "ceo", "example.com")
def test_every_spelling_is_stored_in_the_canonical_folder(tmp_path, spelling):
    plugin = configured(tmp_path, per_recipient=True)
    root = tmp_path / "Maildir"
    assert plugin.maildir_for(Address.parse(spelling)) == root / "example.com" / "ceo"
    assert plugin.maildir_for(spelling) == root / "example.com" / "ceo"
    deliver(plugin, message([spelling]))
    (path,) = files(root)
    assert path.parent == root / "example.com" / "ceo" / "new"


def test_internationalised_domains_are_stored_under_their_a_label(tmp_path):
    plugin = configured(tmp_path, per_recipient=True)
    deliver(plugin, message(["jörg@BÜCHER.example", "jörg@xn--bcher-kva.example"]))
    (path,) = files(tmp_path / "Maildir")
    assert path.relative_to(tmp_path / "Maildir").parts[:2] == (
        "xn--bcher-kva.example",
        "j%C3%B6rg",
    )


def test_folders_come_from_the_envelope_recipients(tmp_path):
    """The core's Address objects decide, not a second parse of rcpt_tos."""
    plugin = configured(tmp_path, per_recipient=True)
    envelope = message(["ceo@ｅｘａｍｐｌｅ.ｃｏｍ"])
    envelope.recipients.append(Address("ceo@ｅｘａｍｐｌｅ.ｃｏｍ", "ceo", "example.com"))
    assert plugin.targets(envelope) == [tmp_path / "Maildir" / "example.com" / "ceo"]
    envelope.recipients[0] = Address("ceo@ｅｘａｍｐｌｅ.ｃｏｍ", "other", "example.com")
    assert plugin.targets(envelope) == [tmp_path / "Maildir" / "example.com" / "other"]


def test_the_plugin_has_no_idna_of_its_own():
    source = (Path(__file__).parents[2] / "plugins" / "maildir" / "plugin.py").read_text()
    assert "idna" not in source.lower()
    assert "normalize_domain" not in source


def test_no_recipients_means_no_verdict(tmp_path):
    plugin = configured(tmp_path, per_recipient=True)
    assert deliver(plugin, message([])) is None


# --------------------------------------------------------------- durability
def test_order_is_write_fsync_rename_fsync_directory(tmp_path, monkeypatch):
    plugin = configured(tmp_path)
    plugin.bonzo_startup()
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync-{kind}")
        return real_fsync(fd)

    def rename(src, dst):
        events.append(f"rename {Path(src).parent.name}->{Path(dst).parent.name}")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    deliver(plugin, message())
    assert events == ["fsync-file", "rename tmp->new", "fsync-dir"]


def test_all_targets_are_durable_before_any_is_renamed(tmp_path, monkeypatch):
    plugin = configured(tmp_path, per_recipient=True)
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        return real_fsync(fd)

    def rename(src, dst):
        events.append("rename")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    plugin.bonzo_startup()
    envelope = message(["a@example.com", "b@example.com"])
    events.clear()
    deliver(plugin, envelope)
    first_rename = events.index("rename")
    assert "fsync-file" in events[:first_rename]
    assert events[-2:] == ["fsync-dir", "fsync-dir"]
    assert events.count("rename") == 2


# -------------------------------------------------------------------- faults
@pytest.mark.expect_errors
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_is_452_and_leaves_nothing(tmp_path, monkeypatch, caplog, code):
    plugin = configured(tmp_path)
    plugin.bonzo_startup()

    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    assert refusal(plugin, message(body=b"Subject: secret\r\n\r\nTOP-SECRET\r\n")) == (452, "4.3.1")
    assert files(tmp_path) == []
    (record,) = [
        r for r in caplog.records if r.name == "bonzo.plugins.maildir" and r.levelname == "ERROR"
    ]
    text = record.getMessage()
    assert str(tmp_path / "Maildir") in text
    assert "TOP-SECRET" not in text


@pytest.mark.expect_errors
def test_full_disk_while_writing(tmp_path, monkeypatch):
    plugin = configured(tmp_path)
    real_write_to = Envelope.write_to

    def write_to(self, fileobj, chunk_size=1 << 20):
        fileobj.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Envelope, "write_to", write_to)
    assert refusal(plugin, message()) == (452, "4.3.1")
    assert files(tmp_path) == []
    monkeypatch.setattr(Envelope, "write_to", real_write_to)
    deliver(plugin, message())
    assert len(files(tmp_path)) == 1


@pytest.mark.parametrize("per_recipient", [False, True])
def test_a_timed_out_delivery_leaves_nothing(tmp_path, monkeypatch, caplog, per_recipient):
    plugin = configured(tmp_path, per_recipient=per_recipient)
    plugin.bonzo_startup()
    real_write_to = Envelope.write_to
    release = threading.Event()

    def slow_write_to(self, fileobj, chunk_size=1 << 20):
        release.wait(5)
        return real_write_to(self, fileobj, chunk_size)

    monkeypatch.setattr(Envelope, "write_to", slow_write_to)
    envelope = message(["a@example.com", "b@example.com"])

    async def main():
        coro = plugin.bonzo_deliver(session=make_session(), envelope=envelope)
        task = asyncio.ensure_future(coro)
        done, _ = await asyncio.wait([task], timeout=0.05)
        assert not done
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    asyncio.run(main())  # returns once the executor's thread has finished
    assert files(tmp_path) == []
    assert any("cancelled" in r.getMessage() for r in caplog.records)


@pytest.mark.expect_errors
def test_path_inside_a_regular_file_is_451(tmp_path):
    plugin = MaildirPlugin()
    plugin.bonzo_configure(config={"path": str(tmp_path / "file" / "Maildir")}, app=None)
    # A file appears on the way after the configuration was checked (which
    # refuses one that is already there).
    (tmp_path / "file").write_text("not a directory")
    assert refusal(plugin, message()) == (451, "4.3.0")
    assert files(tmp_path) == [tmp_path / "file"]


@pytest.mark.expect_errors
def test_permission_denied_is_451_and_no_file(tmp_path, monkeypatch):
    plugin = configured(tmp_path)
    plugin.bonzo_startup()
    real_open = os.open

    def deny(path, flags, mode=0o777, *, dir_fd=None):
        if str(path).startswith(str(tmp_path)) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", deny)
    assert refusal(plugin, message()) == (451, "4.3.0")
    assert files(tmp_path) == []


@pytest.mark.expect_errors
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_451(tmp_path):
    plugin = configured(tmp_path)
    plugin.bonzo_startup()
    tmp_dir = tmp_path / "Maildir" / "tmp"
    tmp_dir.chmod(0o500)
    try:
        assert refusal(plugin, message()) == (451, "4.3.0")
    finally:
        tmp_dir.chmod(0o700)
    assert files(tmp_path) == []


@pytest.mark.expect_errors
def test_failure_on_a_later_target_removes_every_copy(tmp_path, monkeypatch):
    plugin = configured(tmp_path, per_recipient=True)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    assert refusal(plugin, message(["a@example.com", "b@example.com"])) == (451, "4.3.0")
    assert files(tmp_path) == []


@pytest.mark.expect_errors
def test_failed_directory_fsync_removes_the_message(tmp_path, monkeypatch):
    plugin = configured(tmp_path)
    plugin.bonzo_startup()
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert refusal(plugin, message()) == (451, "4.3.0")
    assert files(tmp_path) == []


@pytest.mark.expect_errors
def test_missing_recipient_maildir_without_create_is_451(tmp_path):
    (tmp_path / "users").mkdir()
    plugin = configured(tmp_path, path="users", per_recipient=True, create=False)
    assert refusal(plugin, message(["a@example.com"])) == (451, "4.3.0")
    assert files(tmp_path) == []


def test_existing_maildir_without_create(tmp_path):
    for sub in ("tmp", "new", "cur"):
        (tmp_path / "box" / sub).mkdir(parents=True)
    plugin = configured(tmp_path, path="box", create=False)
    deliver(plugin, message())
    assert len(files(tmp_path / "box" / "new")) == 1


# ----------------------------------------------------- stale files in tmp/
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def tmp_name(pid: int, host: str | None = None, size: int = 5) -> str:
    """A name as the plugin gives its files (see its README)."""
    host = _host_part() if host is None else host
    return f"{int(time.time())}.M123456P{pid}Q1.{host},S={size}"


def put(folder: Path, name: str, data: bytes = b"hello", age: float = 0.0) -> Path:
    path = folder / "tmp" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if age:
        then = time.time() - age
        os.utime(path, (then, then))
    return path


def test_file_names_carry_the_writers_pid_and_host(tmp_path, monkeypatch):
    plugin = configured(tmp_path)
    names = []
    real_create = MaildirPlugin._create

    def create(self, maildir, tmp):
        names.append(tmp.name)
        return real_create(self, maildir, tmp)

    monkeypatch.setattr(MaildirPlugin, "_create", create)
    deliver(plugin, message())
    (name,) = names
    assert parse_tmp_name(name) == (os.getpid(), _host_part())
    assert (tmp_path / "Maildir" / "new" / name).is_file()


@pytest.mark.parametrize(
    "host", ["mx.example.org", "a,b:c/d e", "S=1,S=2", "hôte", "x" * 300, "", "1.M2P3Q4.h,S=5"]
)
def test_the_pid_and_host_read_back_from_any_host_name(host):
    field = _host_part(host) if host else "localhost"
    name = f"1700000000.M42P4242Q7.{field},S=1234"
    assert "/" not in name and name.count(",") == 1
    assert parse_tmp_name(name) == (4242, field)


@pytest.mark.parametrize(
    "name",
    ["1.M2P3.host", "1.M2P3Q4.host", "1.M2Pabc Q4.host,S=1", "x1.M2P3Q4.host,S=1", "notes.txt"],
)
def test_foreign_names_are_not_read_as_the_plugins(name):
    assert parse_tmp_name(name) is None


def test_startup_removes_files_of_a_dead_writer(tmp_path, caplog):
    plugin = configured(tmp_path)
    stale = put(tmp_path / "Maildir", tmp_name(dead_pid()), b"x" * 1000)
    plugin.bonzo_startup()
    assert not stale.exists()
    (record,) = [r for r in caplog.records if "stale" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "removed 1 stale file(s) (1000 bytes)" in record.getMessage()


def test_startup_keeps_files_of_a_live_writer(tmp_path, caplog):
    plugin = configured(tmp_path)
    own = put(tmp_path / "Maildir", tmp_name(os.getpid()))
    init = put(tmp_path / "Maildir", tmp_name(1))
    plugin.bonzo_startup()
    assert own.exists() and init.exists()
    assert not [r for r in caplog.records if "stale" in r.getMessage()]


def test_files_of_other_hosts_and_foreign_files_are_judged_by_age(tmp_path):
    plugin = configured(tmp_path)
    maildir = tmp_path / "Maildir"
    day = 24 * 3600
    other_host = tmp_name(dead_pid(), host="elsewhere.example")
    old = [
        put(maildir, "1700000000.12345.elsewhere", age=37 * 3600),
        put(maildir, "foreign.eml", age=3 * day),
        put(maildir, "old-" + other_host, age=37 * 3600),
        put(maildir, tmp_name(os.getpid()) + "x", age=37 * 3600),
        put(maildir, tmp_name(os.getpid()), age=40 * 3600),  # even a live writer's
    ]
    fresh = [
        put(maildir, "1700000000.12345.elsewhere.fresh"),
        put(maildir, "foreign.eml.fresh", age=35 * 3600),
        put(maildir, other_host),  # a dead pid, but another host's
        put(maildir, tmp_name(0)),  # no pid to ask about
        put(maildir, tmp_name(2**40)),
    ]
    assert plugin.clean_tmp() == (len(old), 5 * len(old))
    assert [p for p in old if p.exists()] == []
    assert [p for p in fresh if not p.exists()] == []


def test_age_is_the_last_access_or_change(tmp_path):
    plugin = configured(tmp_path)
    path = put(tmp_path / "Maildir", "foreign.eml")
    now = time.time()
    os.utime(path, (now, now - STALE_AFTER - 60))  # read just now, written long ago
    assert plugin.clean_tmp() == (0, 0)
    os.utime(path, (now - STALE_AFTER - 60, now - STALE_AFTER - 60))
    assert plugin.clean_tmp() == (1, 5)


def test_every_per_recipient_folder_is_cleaned(tmp_path):
    plugin = configured(tmp_path, per_recipient=True)
    root = tmp_path / "Maildir"
    pid = dead_pid()
    stale = [
        put(root / "example.com" / "ceo", tmp_name(pid)),
        put(root / "example.org" / "bob", tmp_name(pid, size=6), b"hello!"),
        put(root / "_local" / "postmaster", tmp_name(pid)),
        put(root, tmp_name(pid)),  # left from catch-all days
    ]
    kept = [
        put(root / "example.com" / "alice", tmp_name(os.getpid())),
        put(root / "example.com" / "alice", "foreign"),
    ]
    (root / "example.com" / "alice" / "tmp" / "subdir").mkdir()
    plugin.bonzo_startup()
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert (root / "example.com" / "alice" / "tmp" / "subdir").is_dir()


def test_catch_all_mode_also_cleans_per_recipient_folders(tmp_path):
    plugin = configured(tmp_path)
    root = tmp_path / "Maildir"
    pid = dead_pid()
    stale = [put(root, tmp_name(pid)), put(root / "example.com" / "ceo", tmp_name(pid))]
    plugin.bonzo_startup()
    assert [p for p in stale if p.exists()] == []


def test_hard_links_count_once(tmp_path):
    plugin = configured(tmp_path, per_recipient=True)
    root = tmp_path / "Maildir"
    first = put(root / "example.com" / "a", tmp_name(dead_pid(), size=1000), b"x" * 1000)
    (root / "example.com" / "b" / "tmp").mkdir(parents=True)
    os.link(first, root / "example.com" / "b" / "tmp" / first.name)
    assert plugin.clean_tmp() == (2, 1000)


def test_cleaning_works_without_create(tmp_path):
    for sub in ("tmp", "new", "cur"):
        (tmp_path / "box" / sub).mkdir(parents=True)
    stale = put(tmp_path / "box", tmp_name(dead_pid()))
    configured(tmp_path, path="box", create=False).bonzo_startup()
    assert not stale.exists()


def test_a_file_that_cannot_be_removed_is_a_warning_not_a_crash(tmp_path, monkeypatch, caplog):
    plugin = configured(tmp_path)
    pid = dead_pid()
    stuck = put(tmp_path / "Maildir", tmp_name(pid, size=1))
    gone = put(tmp_path / "Maildir", tmp_name(pid, size=2))
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if Path(path) == stuck:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    plugin.bonzo_startup()
    assert stuck.exists() and not gone.exists()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(stuck) in warning.getMessage() and "Permission denied" in warning.getMessage()
    assert "removed 1 stale file(s)" in caplog.text


def test_an_unreadable_folder_is_a_warning_not_a_crash(tmp_path, monkeypatch, caplog):
    plugin = configured(tmp_path, per_recipient=True)
    root = tmp_path / "Maildir"
    pid = dead_pid()
    blocked = put(root / "example.com" / "ceo", tmp_name(pid))
    other = put(root / "example.org" / "bob", tmp_name(pid))
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == blocked.parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    plugin.bonzo_startup()
    assert blocked.exists() and not other.exists()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(blocked.parent) in warning.getMessage()


def test_a_delivery_in_progress_survives_a_restart_of_another_worker(tmp_path, monkeypatch):
    """Cleaning runs in every worker as it starts: a live writer's file stays."""
    plugin = configured(tmp_path)
    plugin.bonzo_startup()
    real_write_to = Envelope.write_to
    writing, release = threading.Event(), threading.Event()

    def slow_write_to(self, fileobj, chunk_size=1 << 20):
        writing.set()
        release.wait(10)
        return real_write_to(self, fileobj, chunk_size)

    monkeypatch.setattr(Envelope, "write_to", slow_write_to)
    envelope = message()
    thread = threading.Thread(target=deliver, args=(plugin, envelope))
    thread.start()
    try:
        assert writing.wait(10)
        assert configured(tmp_path).clean_tmp() == (0, 0)  # the other worker
    finally:
        release.set()
        thread.join(10)
    (path,) = files(tmp_path / "Maildir")
    assert path.parent.name == "new" and path.read_bytes().endswith(envelope.content)


# ------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("table", "message_re"),
    [
        ({"paht": "x"}, r"^paht: unknown key"),
        ({"path": 5}, r"^path: expected a path, got 5$"),
        ({"path": ""}, r"^path: expected a path, got ''$"),
        ({"path": "a\0b"}, r"^path: expected a path, got 'a\\x00b'$"),
        ({"quarantine": ""}, r"^quarantine: expected a path, got ''$"),
        ({"mode": ""}, r"^mode: expected an octal string such as '0640', got ''$"),
        ({"per_recipient": "yes"}, r"^per_recipient: expected true or false"),
        ({"create": 0}, r"^create: expected true or false"),
        ({"mode": "rw-r-----"}, r"^mode: expected an octal string"),
        ({"mode": 0o1777}, r"^mode: expected permission bits"),
        ({"mode": -1}, r"^mode: expected permission bits"),
        ({"mode": 0o400}, r"^mode: the owner must be able to read and write"),
        ({"mode": 0o666}, r"^mode: message files must not be world-writable"),
        ({"mode": 6.4}, r"^mode: expected an integer, got 6.4$"),
        ({"mode": True}, r"^mode: expected an integer"),
        ({"path": "missing", "create": False}, r"^path: .*missing does not exist"),
    ],
)
def test_configuration_errors_name_the_key(tmp_path, table, message_re):
    with pytest.raises(ValueError, match=message_re):
        configured(tmp_path, **table)


def test_configuration_errors_about_the_filesystem(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^path: .* exists and is not a directory"):
        configured(tmp_path, path="file")
    (tmp_path / "half" / "new").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"^path: .* is not a maildir \(no tmp, cur"):
        configured(tmp_path, path="half", create=False)
    # A file on the way: bonzo check says so, rather than startup failing.
    for key in ("path", "quarantine"):
        with pytest.raises(ValueError, match=rf"^{key}: .*file/x/Maildir cannot be created: "):
            configured(tmp_path, **{key: "file/x/Maildir"})
    if os.path.isdir("/proc/self"):
        # Nothing can be created there, even by root.
        for key in ("path", "quarantine"):
            with pytest.raises(ValueError, match=rf"^{key}: /proc/Maildir cannot be created in "):
                configured(tmp_path, **{key: "/proc/Maildir"})


def test_configure_creates_nothing(tmp_path):
    configured(tmp_path, path="a/b/Maildir")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- end to end
def recipients() -> RecipientsPlugin:
    plugin = RecipientsPlugin()
    plugin.bonzo_configure(config={"domains": ["example.com"]}, app=None)
    return plugin


def test_end_to_end_delivery(tmp_path):
    plugin = configured(tmp_path, per_recipient=True)
    body = b"Subject: e2e\r\nFrom: a@example.org\r\n\r\nHello\r\n.leading dot\r\n"
    with serve(("recipients", recipients()), ("maildir", plugin)) as server:
        with server.client() as client:
            client.ehlo()
            client.mail("a@example.org")
            client.rcpt("alice@example.com")
            client.rcpt("bob@example.com")
            code, reply = client.data(body)
    assert code == 250
    assert re.fullmatch(rb"2\.0\.0 Ok: queued as \w+", reply), reply
    found = files(tmp_path / "Maildir")
    assert [p.relative_to(tmp_path / "Maildir").parts[:2] for p in found] == [
        ("example.com", "alice"),
        ("example.com", "bob"),
    ]
    content = found[0].read_bytes()
    # Each recipient's copy says whose it is (a local delivery agent's headers).
    assert content.startswith(
        b"Return-Path: <a@example.org>\r\nDelivered-To: alice@example.com\r\n"
        b"Received: from client.example ([127.0.0.1])"
    )
    assert content.endswith(b"\r\n\r\nHello\r\n.leading dot\r\n")
    assert found[1].read_bytes() == content.replace(
        b"Delivered-To: alice@", b"Delivered-To: bob@", 1
    )


def test_end_to_end_large_message_is_intact(tmp_path):
    plugin = configured(tmp_path)
    line = b"".join(bytes([65 + i % 26]) * 76 + b"\r\n" for i in range(26))
    body = b"Subject: big\r\n\r\n" + line * (6 * 1024 * 1024 // len(line))
    assert len(body) > 5_000_000
    with serve(("recipients", recipients()), ("maildir", plugin), spool_threshold=65536) as server:
        with server.client() as client:
            assert client.sendmail("a@example.org", ["alice@example.com"], body) == {}
    (path,) = files(tmp_path / "Maildir")
    content = path.read_bytes()
    assert content.endswith(body)
    head = content[: -len(body)]
    assert head.startswith(b"Return-Path: <a@example.org>\r\nDelivered-To: alice@example.com\r\n")
    assert b"\r\nReceived: " in head and head.count(b"\r\n") == 5
    assert int(NAME.fullmatch(path.name).group(1)) == len(content)


@pytest.mark.expect_errors
def test_end_to_end_storage_fault_is_transient(tmp_path):
    plugin = MaildirPlugin()
    plugin.bonzo_configure(config={"path": str(tmp_path / "file" / "Maildir")}, app=None)
    (tmp_path / "file").write_text("x")  # in the way since the configuration was checked
    with serve(("recipients", recipients()), ("maildir", plugin)) as server:
        with server.client() as client:
            client.ehlo()
            client.mail("a@example.org")
            client.rcpt("alice@example.com")
            assert client.data(b"Subject: x\r\n\r\nx\r\n") == (
                451,
                b"4.3.0 Local error in processing",
            )
            assert client.rset()[0] == 250


def test_quarantined_messages_go_to_the_quarantine_maildir(tmp_path):
    from bonzo import Quarantine, hookimpl

    class Suspect:
        @hookimpl
        def bonzo_message(self, envelope: Envelope) -> object:
            if b"wire transfer" in envelope.body:
                return Quarantine("wire transfer")
            return None

    plugin = configured(tmp_path, per_recipient=True, quarantine="Quarantine")
    plugin.bonzo_startup()
    assert (tmp_path / "Quarantine" / "new").is_dir()
    with serve(("recipients", recipients()), ("suspect", Suspect()), ("maildir", plugin)) as server:
        with server.client() as client:
            # A client's own fields of Bonzo's names (tester review9 L1): removed.
            bad = (
                b"X-Bonzo-Quarantine-Final-Recipients: <ceo@example.org>\r\n"
                b"Subject: pay\r\nx-bonzo-quarantine: fake\r\n"
                b"X-Bonzo-Quarantine-Final-Recipients: <all@example.org>\r\n"
                b"X-Bonzo-Quarantine odd: not a field name\r\n"
                b"\r\nurgent wire transfer\r\n"
            )
            assert (
                client.sendmail("a@example.org", ["alice@example.com", "bob@example.com"], bad)
                == {}
            )
            assert (
                client.sendmail(
                    "a@example.org", ["alice@example.com"], b"Subject: ok\r\n\r\nhi\r\n"
                )
                == {}
            )
    [kept] = files(tmp_path / "Quarantine")
    content = kept.read_bytes()
    assert b"X-Bonzo-Quarantine: suspect: wire transfer\r\n" in content
    # Where it was going, for the operator who releases it (milter3 M2).
    assert b"X-Bonzo-Quarantine-Recipients: <alice@example.com>, <bob@example.com>\r\n" in content
    assert content.endswith(b"urgent wire transfer\r\n")
    assert b"ceo@" not in content and b"all@" not in content and b"fake" not in content
    assert content.lower().count(b"x-bonzo-quarantine") == 3  # Bonzo's two, the odd line
    delivered = files(tmp_path / "Maildir")
    assert [p.read_bytes().endswith(b"hi\r\n") for p in delivered] == [True]  # one copy, to alice
    assert tmp_path / "Quarantine" in plugin.maildirs()
    with pytest.raises(ValueError, match="quarantine: must differ from path"):
        configured(tmp_path, quarantine="Maildir")


def test_envelope_headers_per_copy_and_never_in_a_shared_copy(tmp_path):
    shared = configured(tmp_path / "a")
    envelope = message(["alice@example.com", "bob@example.com"])
    deliver(shared, envelope)
    (path,) = files(tmp_path / "a" / "Maildir")
    content = path.read_bytes()
    assert content.startswith(b"Return-Path: <")
    assert b"Delivered-To" not in content  # one copy for both: neither sees the other
    off = configured(tmp_path / "b", envelope_headers=False)
    deliver(off, envelope)
    (path,) = files(tmp_path / "b" / "Maildir")
    assert path.read_bytes() == envelope.content
    assert envelope_lead("a@x.test", ["b@y.test", "b@y.test"]) == (
        b"Return-Path: <a@x.test>\r\nDelivered-To: b@y.test\r\n"
    )
    assert envelope_lead("", []) == b"Return-Path: <>\r\n"
    assert envelope_lead("a\r\nX: y@x.test", ["b@y.test"]) == b""
    # The Unicode a quoted local part may hold: a line separator, a bidi override.
    assert envelope_lead('"x\u2028X-Spam-Status: No"@x.test', ["b@y.test"]) == b""
    assert envelope_lead('"a b"@x.test', ["adm\u202enimda@y.test"]) == (
        b'Return-Path: <"a b"@x.test>\r\n'
    )
    assert envelope_lead("a@x.test", ["b\u2029@y.test"]) == b"Return-Path: <a@x.test>\r\n"


# ------------------------------------------ what a review found (the hook timeout)
@pytest.mark.parametrize("per_recipient", [False, True])
def test_a_delivery_that_times_out_after_it_was_stored_leaves_no_copy(
    tmp_path, monkeypatch, caplog, per_recipient
):
    """The thread has stored the message (durably, in new/) when the hook's
    time runs out: the client is answered 451 and sends it again, so the
    stored copy is removed — no duplicate."""
    from bonzo_plugins.maildir import plugin as maildir_module

    plugin = configured(tmp_path, per_recipient=per_recipient)
    plugin.bonzo_startup()
    stored, release = threading.Event(), threading.Event()
    real_settle = maildir_module._Abort.settle

    def settle_then_stall(self, paths):
        real_settle(self, paths)
        stored.set()
        release.wait(5)  # the thread is done; its hook is still waiting

    monkeypatch.setattr(maildir_module._Abort, "settle", settle_then_stall)
    envelope = message(["a@example.com", "b@example.com"])

    async def main():
        task = asyncio.ensure_future(
            plugin.bonzo_deliver(session=make_session(), envelope=envelope)
        )
        while not stored.is_set():
            await asyncio.sleep(0.01)
        assert [p.parent.name for p in files(tmp_path)] == ["new"] * (2 if per_recipient else 1)
        task.cancel()  # the hook timeout
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    asyncio.run(main())
    assert files(tmp_path) == []
    assert "cancelled (timed out); its files are removed" in caplog.text


def test_a_missing_new_or_a_half_made_folder_is_made_again(tmp_path):
    import shutil

    plugin = configured(tmp_path)
    plugin.bonzo_startup()
    shutil.rmtree(tmp_path / "Maildir" / "new")
    deliver(plugin, message())
    assert [p.parent.name for p in files(tmp_path)] == ["new"]
    per = configured(tmp_path / "per", per_recipient=True)
    half = tmp_path / "per" / "Maildir" / "example.com" / "b"
    (half / "tmp").mkdir(parents=True)  # a disk-full left it so
    deliver(per, message(["b@example.com"]))
    assert [p.relative_to(half).parts[0] for p in files(half)] == ["new"]
    assert sorted(p.name for p in half.iterdir()) == ["cur", "new", "tmp"]


@pytest.mark.expect_errors
def test_a_failed_rename_names_both_paths(tmp_path, caplog):
    plugin = configured(tmp_path)
    plugin.bonzo_startup()
    new = tmp_path / "Maildir" / "new"
    new.rmdir()
    new.write_text("not a directory")
    assert refusal(plugin, message()) == (451, "4.3.0")
    [line] = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert "/Maildir/tmp/" in line and f" -> {new}/" in line


def test_two_spellings_of_one_mailbox_keep_delivered_to(tmp_path):
    plugin = configured(tmp_path, per_recipient=True)
    with serve(("recipients", recipients()), ("maildir", plugin)) as server:
        with server.client() as client:
            client.sendmail("a@example.org", ["one@example.com", "One@example.com"], MESSAGE)
    (path,) = files(tmp_path / "Maildir")
    assert b"\r\nDelivered-To: one@example.com\r\n" in path.read_bytes()


def test_the_stale_file_cleanup_does_not_follow_links_out_of_the_tree(tmp_path):
    plugin = configured(tmp_path, per_recipient=True)
    plugin.bonzo_startup()
    victim = tmp_path / "elsewhere"
    (victim / "tmp").mkdir(parents=True)
    precious = victim / "tmp" / "precious"
    precious.write_text("keep")
    old = time.time() - 40 * 3600
    os.utime(precious, (old, old))
    (tmp_path / "Maildir" / "example.com").mkdir()
    (tmp_path / "Maildir" / "example.com" / "victimlink").symlink_to(victim)
    (tmp_path / "Maildir" / "linked.example").symlink_to(tmp_path / "elsewhere-domain")
    assert plugin.clean_tmp() == (0, 0)
    assert precious.exists()

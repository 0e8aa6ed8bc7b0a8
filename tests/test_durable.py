"""bonzo.durable: the batch commit, removal and creation (the C ones in
``bonzo._speedups`` against the pure-Python references, on real files) and
the :class:`Committer` thread that runs them for event loops and threads."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from bonzo import durable
from bonzo.durable import Committer, _commit_files_py, _create_files_py, _remove_files_py


def c_function(name: str) -> Any:
    try:
        from bonzo import _speedups
    except ImportError:
        if os.environ.get("BONZO_EXTENSION") == "1":
            raise
        return None
    return getattr(_speedups, name)


def implementations(name: str, reference: Any) -> list[Any]:
    found = [pytest.param(reference, id="python")]
    if c_function(name) is not None:
        found.append(pytest.param(c_function(name), id="c"))
    return found


IMPLEMENTATIONS = implementations("commit_files", _commit_files_py)


def new_file(directory: Path, name: str, content: bytes = b"x") -> int:
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    return fd


@pytest.mark.parametrize("commit", IMPLEMENTATIONS)
def test_files_are_put_in_place_and_each_failure_has_its_errno(tmp_path, commit):
    tmp, data = tmp_path / "tmp", tmp_path / "data"
    tmp.mkdir()
    data.mkdir()
    (data / "taken").write_bytes(b"old")
    fds = [new_file(tmp, n, n.encode()) for n in ("a", "taken", "gone")]
    os.unlink(tmp / "gone")  # its rename fails: ENOENT
    closed = new_file(tmp, "closed")
    os.close(closed)  # its fsync fails: EBADF (no other file may get this number)
    holder = os.open(os.devnull, os.O_RDONLY)
    assert holder == closed
    os.close(holder)
    try:
        errors, dir_errors = commit(
            [*fds, closed],
            [os.fsencode(tmp / n) for n in ("a", "taken", "gone", "closed")],
            [os.fsencode(data / n) for n in ("a", "taken", "gone", "closed")],
            [os.fsencode(data), os.fsencode(tmp_path / "missing")],
        )
    finally:
        for fd in fds:
            os.close(fd)
    assert errors == [0, errno.EEXIST, errno.ENOENT, errno.EBADF]
    assert dir_errors == [0, errno.ENOENT]
    assert (data / "a").read_bytes() == b"a"
    assert (data / "taken").read_bytes() == b"old"  # never replaced
    assert sorted(p.name for p in tmp.iterdir()) == ["closed", "taken"]  # left for the caller


@pytest.mark.parametrize("commit", IMPLEMENTATIONS)
def test_bad_arguments_are_refused(commit):
    with pytest.raises((ValueError, TypeError)):
        commit([1], [b"a"], [], [])
    if commit is not _commit_files_py:
        with pytest.raises(TypeError):
            commit([1], ["a"], [b"b"], [])
        with pytest.raises(ValueError):
            commit([], [], [], [b"a\0b"])
        with pytest.raises(ValueError):
            commit([-1], [b"a"], [b"b"], [])


def test_the_committer_batches_requests_and_settles_each(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    committer = Committer()
    real = durable.commit_files
    batches: list[int] = []

    def slow(fds: Any, tmps: Any, finals: Any, dirs: Any) -> Any:
        batches.append(len(fds))
        time.sleep(0.05)  # requests pile up meanwhile
        return real(fds, tmps, finals, dirs)

    monkeypatch.setattr(durable, "commit_files", slow)

    async def main() -> list[Any]:
        waits = []
        for i in range(30):
            fd = new_file(data, f"m{i}.tmp")
            waits.append(
                (fd, committer.commit(fd, str(data / f"m{i}.tmp"), str(data / f"m{i}"), str(data)))
            )
        taken = new_file(data, "dup.tmp")
        (data / "dup").write_bytes(b"")
        waits.append(
            (taken, committer.commit(taken, str(data / "dup.tmp"), str(data / "dup"), str(data)))
        )
        waits.append((None, committer.sync(str(data))))
        results = await asyncio.gather(*(w for _, w in waits), return_exceptions=True)
        for fd, _ in waits:
            if fd is not None:
                os.close(fd)
        return results

    results = asyncio.run(main())
    assert results[:30] == [None] * 30 and results[-1] is None
    assert isinstance(results[30], FileExistsError)
    assert not (data / "dup.tmp").exists()  # a failed commit leaves nothing at its name
    assert sorted(p.name for p in data.iterdir()) == ["dup"] + sorted(f"m{i}" for i in range(30))
    # 32 requests made at once: the first batch, then everything else.
    assert len(batches) <= 3 and sum(batches) == 31
    assert committer.batches == len(batches) and committer.dir_syncs == len(batches)


def test_the_thread_ends_when_idle_and_starts_again(tmp_path):
    committer = Committer(idle=0.05)
    committer.sync_blocking(str(tmp_path))
    thread = committer._thread
    assert thread is not None and thread.is_alive()
    thread.join(5)
    assert not thread.is_alive() and committer._thread is None
    committer.sync_blocking(str(tmp_path))  # a new thread serves it
    assert committer.dir_syncs == 2
    with pytest.raises(FileNotFoundError):
        committer.sync_blocking(str(tmp_path / "missing"))


def test_a_waiter_cancelled_does_not_stop_the_batch(tmp_path, monkeypatch):
    committer = Committer()
    real = durable.commit_files

    def slow(*args: Any) -> Any:
        time.sleep(0.1)
        return real(*args)

    monkeypatch.setattr(durable, "commit_files", slow)

    async def main() -> None:
        first = committer.sync(str(tmp_path))
        second = committer.sync(str(tmp_path))
        first.cancel()
        await second

    asyncio.run(main())
    assert committer.dir_syncs >= 1


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


@pytest.mark.parametrize("remove", implementations("remove_files", _remove_files_py))
def test_files_are_removed_then_their_descriptors_closed(tmp_path, remove):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "sub").mkdir()
    fd = os.open(tmp_path / "a", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    paths = [tmp_path / "a", tmp_path / "gone", tmp_path / "sub"]
    errors = remove([os.fsencode(p) for p in paths], [fd])
    # A missing file is not an error; a directory cannot be unlinked.
    assert errors[:2] == [0, 0] and errors[2] in (errno.EISDIR, errno.EPERM)
    assert not (tmp_path / "a").exists() and (tmp_path / "sub").is_dir()
    assert not is_open(fd)
    if remove is not _remove_files_py:
        with pytest.raises(TypeError):
            remove(["a"], [])
        with pytest.raises(ValueError):
            remove([], [-1])


@pytest.mark.parametrize("create", implementations("create_files", _create_files_py))
def test_files_are_created_exclusively_with_their_mode(tmp_path, create):
    (tmp_path / "taken").write_bytes(b"old")
    paths = [tmp_path / "new", tmp_path / "taken", tmp_path / "missing" / "x"]
    fds = create([os.fsencode(p) for p in paths], 0o640)
    assert fds[1:] == [-errno.EEXIST, -errno.ENOENT]
    try:
        assert os.write(fds[0], b"hello") == 5
        assert stat.S_IMODE(os.fstat(fds[0]).st_mode) == 0o640 & ~current_umask()
        assert os.get_inheritable(fds[0]) is False
    finally:
        os.close(fds[0])
    assert (tmp_path / "new").read_bytes() == b"hello"
    assert (tmp_path / "taken").read_bytes() == b"old"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_removal_is_durable_and_drops_the_lock_after_the_unlink(tmp_path):
    (tmp_path / "m").write_bytes(b"m")
    (tmp_path / "m.json").write_bytes(b"{}")
    fd = os.open(tmp_path / "m", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    committer = Committer()

    async def main() -> None:
        await committer.remove([str(tmp_path / "m.json"), str(tmp_path / "m")], fd, str(tmp_path))

    asyncio.run(main())
    assert list(tmp_path.iterdir()) == [] and not is_open(fd)
    assert committer.dir_syncs == 1  # the removal made durable

    (tmp_path / "sub").mkdir()
    fd = os.open(tmp_path / "sub", os.O_RDONLY)

    async def failing() -> None:
        await committer.remove([str(tmp_path / "sub")], fd, str(tmp_path))

    with pytest.raises(OSError) as failed:
        asyncio.run(failing())
    assert failed.value.errno in (errno.EISDIR, errno.EPERM)
    assert failed.value.filename == str(tmp_path / "sub")
    assert not is_open(fd)  # closed all the same


def wait_for_spares(committer: Committer) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with committer._cond:
            if any(committer._spares.values()):
                return
        time.sleep(0.01)
    raise AssertionError("no spare file was made")


def test_new_files_come_ready_from_the_thread_and_are_removed_at_close(tmp_path):
    committer = Committer()
    directory, suffix = str(tmp_path), "123"
    first_fd, first = committer.new_file(directory, suffix, 0o600)
    assert first.startswith(directory + "/") and first.endswith(".123")
    os.close(first_fd)
    os.unlink(first)
    committer.sync_blocking(directory)  # a batch: the thread makes a spare after it
    wait_for_spares(committer)
    spares = {p.name for p in tmp_path.iterdir()}
    assert len(spares) == 1  # one taken, one made
    fd, path = committer.new_file(directory, suffix, 0o600)
    assert os.path.basename(path) in spares and path != first
    assert os.write(fd, b"x") == 1  # open for writing, empty
    os.close(fd)
    os.unlink(path)
    committer.sync_blocking(directory)
    wait_for_spares(committer)
    assert len(list(tmp_path.iterdir())) == 1
    committer.close()
    assert list(tmp_path.iterdir()) == []  # no spare left behind
    committer.sync_blocking(directory)  # served as before, but no more spares
    fd, path = committer.new_file(directory, suffix, 0o600)
    os.close(fd)
    os.unlink(path)
    committer.sync_blocking(directory)
    assert list(tmp_path.iterdir()) == []


def test_two_committers_never_name_two_files_alike(tmp_path):
    # A reload's new configuration has a committer beside the retiring
    # one's, in the same process and directory: with a counter each, the
    # new one's first names were the old one's spares ("File exists": 451).
    old, new = Committer(), Committer()
    directory, suffix = str(tmp_path), "123"
    try:
        fd, path = old.new_file(directory, suffix, 0o600)
        os.close(fd)
        old.sync_blocking(directory)
        wait_for_spares(old)  # the old one's spare waits in the directory
        names = {path}
        for _ in range(5):
            fd, made = new.new_file(directory, suffix, 0o600)
            os.close(fd)
            assert made not in names
            names.add(made)
        # And a name left by an earlier process with this pid is passed over.
        from bonzo import durable

        taken = tmp_path / f"new{durable._last_number + 1}.{suffix}"
        taken.touch()
        other = Committer()
        fd, made = other.new_file(directory, suffix, 0o600)
        os.close(fd)
        other.close()
        assert made not in names and made != str(taken)
    finally:
        old.close()
        new.close()


def test_an_idle_thread_removes_its_spares(tmp_path):
    committer = Committer(idle=0.05)
    fd, path = committer.new_file(str(tmp_path), "1", 0o600)
    os.close(fd)
    os.unlink(path)
    committer.sync_blocking(str(tmp_path))
    thread = committer._thread
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive()
    assert list(tmp_path.iterdir()) == []

"""bonzo.durable: the batch commit (the C one in ``bonzo._speedups`` against
the pure-Python reference, on real files) and the :class:`Committer` thread
that runs it for event loops and threads."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from bonzo import durable
from bonzo.durable import Committer, _commit_files_py


def c_commit_files() -> Any:
    try:
        from bonzo._speedups import commit_files
    except ImportError:
        if os.environ.get("BONZO_EXTENSION") == "1":
            raise
        return None
    return commit_files


IMPLEMENTATIONS = [pytest.param(_commit_files_py, id="python")]
if c_commit_files() is not None:
    IMPLEMENTATIONS.append(pytest.param(c_commit_files(), id="c"))


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

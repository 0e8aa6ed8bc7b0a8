"""Making new files durable in batches, off the event loop.

A mail server's promise (``250`` means "on disk") costs an ``fsync`` of each
new file and of the directory that names it. Done one message at a time in
a thread pool, each of those calls is a trip to a thread and back, and each
system call in the thread fights the event loop's thread for the GIL: on a
busy server the context switches cost more than the disk. A
:class:`Committer` has one thread of its own that takes every request
waiting at once as one batch: the new files' ``fsync``, their renames into
place, then one ``fsync`` per directory — in one call that runs without the
GIL (:func:`commit_files`) — and wakes each waiting event loop once per batch.

The same thread takes the other file system work that waits for the
journal while a commit runs, so that the event loop never waits for it:
removing finished files (:meth:`Committer.remove`: the unlink, and the close
of the last descriptor, which frees the inode) and creating new ones
(:meth:`Committer.new_file` hands out files the thread created after its
last batch).

Ordering is what a crash-safe spool needs: a file is renamed into place only
after its content is on disk, and a request is done only after an fsync of
its directory that began after the request was made.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Committer", "commit_files", "create_files", "fsync_dir", "remove_files"]

log = logging.getLogger("bonzo.durable")

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: str | bytes | os.PathLike[str]) -> None:
    """Blocking: make the entries of directory ``path`` durable."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit_files_py(
    fds: Sequence[int], tmps: Sequence[bytes], finals: Sequence[bytes], dirs: Sequence[bytes], /
) -> tuple[list[int], list[int]]:
    """The reference implementation of :func:`commit_files` (and the fallback)."""
    if not len(fds) == len(tmps) == len(finals):
        raise ValueError("fds, tmps and finals differ in length")
    errors = [0] * len(fds)
    for i, fd in enumerate(fds):
        try:
            os.fsync(fd)
        except OSError as exc:
            errors[i] = exc.errno or errno.EIO
    for i in range(len(fds)):
        if errors[i]:
            continue
        try:
            if os.path.lexists(finals[i]):
                errors[i] = errno.EEXIST
            else:
                os.rename(tmps[i], finals[i])
        except OSError as exc:
            errors[i] = exc.errno or errno.EIO
    dir_errors = [0] * len(dirs)
    for j, path in enumerate(dirs):
        try:
            fsync_dir(path)
        except OSError as exc:
            dir_errors[j] = exc.errno or errno.EIO
    return errors, dir_errors


def _remove_files_py(paths: Sequence[bytes], fds: Sequence[int], /) -> list[int]:
    """The reference implementation of :func:`remove_files` (and the fallback)."""
    errors = [0] * len(paths)
    for i, path in enumerate(paths):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors[i] = exc.errno or errno.EIO
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    return errors


_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _create_files_py(paths: Sequence[bytes], mode: int, /) -> list[int]:
    """The reference implementation of :func:`create_files` (and the fallback)."""
    fds = []
    for path in paths:
        try:
            fds.append(os.open(path, _NEW_FLAGS, mode))
        except OSError as exc:
            fds.append(-(exc.errno or errno.EIO))
    return fds


try:
    from ._speedups import commit_files as _commit_files
    from ._speedups import create_files as _create_files
    from ._speedups import remove_files as _remove_files
except ImportError:  # pragma: no cover - the extension is optional
    _commit_files = _commit_files_py
    _remove_files = _remove_files_py
    _create_files = _create_files_py


def commit_files(
    fds: Sequence[int], tmps: Sequence[bytes], finals: Sequence[bytes], dirs: Sequence[bytes], /
) -> tuple[list[int], list[int]]:
    """Blocking: ``fsync`` each of ``fds``; rename each ``tmps[i]`` whose
    fsync succeeded to ``finals[i]`` (refused with ``EEXIST`` if that name is
    taken); then ``fsync`` each directory of ``dirs``. Returns the ``errno``
    of each file (``0``: on disk and in place) and of each directory.

    ``bonzo._speedups.commit_files`` when the extension is built (the GIL
    released once for the whole batch), else the same in Python."""
    return _commit_files(fds, tmps, finals, dirs)


def remove_files(paths: Sequence[bytes], fds: Sequence[int], /) -> list[int]:
    """Blocking: unlink each of ``paths`` (one already gone is not an error),
    then close each of ``fds``. Returns the ``errno`` of each unlink.

    The C version releases the GIL once for the whole list."""
    return _remove_files(paths, fds)


def create_files(paths: Sequence[bytes], mode: int, /) -> list[int]:
    """Blocking: create each of ``paths`` (exclusively, write-only,
    close-on-exec, permissions ``mode``). Returns each one's descriptor, or
    minus the ``errno`` if it could not be created.

    The C version releases the GIL once for the whole list."""
    return _create_files(paths, mode)


@dataclass(eq=False)
class _Request:
    directory: bytes
    fd: int | None = None
    tmp: bytes = b""
    final: bytes = b""
    unlinks: tuple[bytes, ...] = ()
    close: int | None = None
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[None] | None = None
    done: threading.Event | None = None
    error: OSError | None = field(default=None)


class Committer:
    """One thread that makes requests durable in batches (see the module).

    The thread starts with the first request and ends after ``idle``
    seconds without one, so an unused committer holds no thread.

    :arg idle: seconds the thread waits for work before it ends.
    """

    #: Spare new files kept ready per directory, at most.
    SPARES = 64

    def __init__(self, idle: float = 5.0) -> None:
        self.idle = idle
        self._cond = threading.Condition()
        self._requests: list[_Request] = []
        # new_file's spares, by (directory, suffix, mode): created by the
        # thread, taken by callers; _wanted: how many to create next batch.
        self._spares: dict[tuple[str, str, int], list[tuple[int, str]]] = {}
        self._wanted: dict[tuple[str, str, int], int] = {}
        self._closed = False
        self._refilling = threading.Lock()
        self._thread: threading.Thread | None = None
        #: Batches done (for tests and statistics).
        self.batches = 0
        #: Directory fsyncs done.
        self.dir_syncs = 0

    # ------------------------------------------------------------ requests
    def commit(self, fd: int, tmp: str, final: str, directory: str) -> asyncio.Future[None]:
        """Make the new file ``tmp`` (open as ``fd``, written) durable under
        the name ``final`` in ``directory``. The future fails with the
        ``OSError`` of the step that failed; nothing is left at either name
        then (the caller still owns ``fd``)."""
        return self._submit(
            _Request(os.fsencode(directory), fd, os.fsencode(tmp), os.fsencode(final))
        )

    def sync(self, directory: str) -> asyncio.Future[None]:
        """Done once an ``fsync`` of ``directory`` that began after this call
        has finished (the removal or rename of an entry made durable)."""
        return self._submit(_Request(os.fsencode(directory)))

    def remove(self, paths: Sequence[str], fd: int | None, directory: str) -> asyncio.Future[None]:
        """Unlink each of ``paths`` (one already gone is not an error), then
        close ``fd`` — so a lock held on it is dropped only once the names
        are gone; done once an ``fsync`` of ``directory`` that began after
        the unlinks has finished. Fails with the ``OSError`` of an unlink
        that failed (``fd`` is closed all the same)."""
        return self._submit(
            _Request(
                os.fsencode(directory),
                unlinks=tuple(os.fsencode(p) for p in paths),
                close=fd,
            )
        )

    def new_file(self, directory: str, suffix: str, mode: int) -> tuple[int, str]:
        """A new empty file in ``directory`` (permissions ``mode``, its name
        ending in ``suffix``), open for writing: its descriptor and path.

        Taken from the files the thread created after its last batch if one
        is ready, else created here. Each file handed out asks the thread for
        another (at most :attr:`SPARES` wait per directory), so a steady
        stream of new files is created off the caller's thread. The thread
        removes the ones left when it ends."""
        key = (directory, suffix, mode)
        with self._cond:
            if not self._closed:
                self._wanted[key] = min(self._wanted.get(key, 0) + 1, self.SPARES)
            spares = self._spares.get(key)
            if spares:
                return spares.pop()
        for attempt in range(3):
            path = f"{directory}/new{_take_numbers(1) + 1}.{suffix}"
            try:
                return os.open(path, _NEW_FLAGS, mode), path
            except FileExistsError:
                # Left by an earlier process that had this pid: the next name.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Blocking: remove the spare files (see :meth:`new_file`) and make
        no more. Requests made later are served as before."""
        with self._cond:
            self._closed = True
            self._wanted = {}
        with self._refilling:  # a refill under way finishes first
            with self._cond:
                spares, self._spares = self._spares, {}
        _drop(spares)

    def sync_blocking(self, directory: str) -> None:
        """:meth:`sync` for a caller in a thread other than an event loop's."""
        request = _Request(os.fsencode(directory), done=threading.Event())
        self._enqueue(request)
        assert request.done is not None
        request.done.wait()
        if request.error is not None:
            raise request.error

    def _submit(self, request: _Request) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        request.loop = loop
        request.future = loop.create_future()
        self._enqueue(request)
        return request.future

    def _enqueue(self, request: _Request) -> None:
        with self._cond:
            self._requests.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name="bonzo-commit", daemon=True)
                self._thread.start()
            else:
                self._cond.notify()

    # -------------------------------------------------------------- thread
    def _main(self) -> None:
        while True:
            with self._cond:
                if not self._requests:
                    self._cond.wait(self.idle)
                    if not self._requests:
                        self._thread = None  # a later request starts another
                        spares, self._spares = self._spares, {}
                        break
                batch, self._requests = self._requests, []
            self._run(batch)
            self._refill()
        _drop(spares)  # an idle committer holds no files

    def _run(self, batch: list[_Request]) -> None:
        removals = [r for r in batch if r.unlinks or r.close is not None]
        if removals:
            self._remove(removals)
        files = [r for r in batch if r.fd is not None]
        dirs = list(dict.fromkeys(r.directory for r in batch))
        try:
            errors, dir_errors = commit_files(
                [r.fd for r in files if r.fd is not None],
                [r.tmp for r in files],
                [r.final for r in files],
                dirs,
            )
        except Exception:  # pragma: no cover - a bug, not an I/O error (those are errnos)
            log.exception("commit of %d file(s) failed", len(files))
            errors, dir_errors = [errno.EIO] * len(files), [errno.EIO] * len(dirs)
        self.batches += 1
        self.dir_syncs += dir_errors.count(0)
        by_dir = dict(zip(dirs, dir_errors, strict=True))
        for request, code in zip(files, errors, strict=True):
            if code:
                request.error = _error(code, request.tmp)
                _unlink(request.tmp)  # never put in place
        for request in batch:
            code = by_dir[request.directory]
            if code and request.error is None:
                request.error = _error(code, request.directory)
                if request.fd is not None:
                    _unlink(request.final)  # in place, but not durably: no copy may stay
        waiting: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
        for request in batch:
            if request.done is not None:
                request.done.set()
            elif request.loop is not None:
                waiting.setdefault(request.loop, []).append(request)
        for loop, requests in waiting.items():
            try:
                loop.call_soon_threadsafe(_settle, requests)
            except RuntimeError:  # pragma: no cover - the loop was closed meanwhile
                pass

    def _remove(self, removals: list[_Request]) -> None:
        paths = [p for r in removals for p in r.unlinks]
        fds = [r.close for r in removals if r.close is not None]
        try:
            errors = remove_files(paths, fds)
        except Exception:  # pragma: no cover - a bug, not an I/O error (those are errnos)
            log.exception("removal of %d file(s) failed", len(paths))
            errors = [errno.EIO] * len(paths)
        codes = iter(errors)
        for request in removals:
            for path in request.unlinks:
                code = next(codes)
                if code and request.error is None:
                    request.error = _error(code, path)

    def _refill(self) -> None:
        with self._refilling:
            self._refill_locked()

    def _refill_locked(self) -> None:
        with self._cond:
            wanted, self._wanted = self._wanted, {}
        start = _take_numbers(sum(wanted.values()))
        for (directory, suffix, mode), count in wanted.items():
            paths = [os.fsencode(f"{directory}/new{start + i + 1}.{suffix}") for i in range(count)]
            start += count
            try:
                fds = create_files(paths, mode)
            except Exception:  # pragma: no cover - a bug, not an I/O error (those are errnos)
                log.exception("creating %d spare file(s) failed", len(paths))
                continue
            made = [(fd, os.fsdecode(p)) for fd, p in zip(fds, paths, strict=True) if fd >= 0]
            # A failure here is not reported: new_file creates the file
            # itself then, and its caller gets the error.
            with self._cond:
                if self._closed:
                    extra = made
                else:
                    spares = self._spares.setdefault((directory, suffix, mode), [])
                    spares.extend(made)
                    extra = spares[self.SPARES :]
                    del spares[self.SPARES :]
            _drop({(directory, suffix, mode): extra})


#: The last number a spare file's name took in this process. One sequence
#: for every :class:`Committer`: at a reload the new configuration's works
#: beside the retiring one's, in the same directories, with the same pid, and
#: two counters from 1 gave the same names ("File exists": a 451).
_last_number = 0
_numbers_lock = threading.Lock()


def _take_numbers(count: int) -> int:
    """Reserve ``count`` numbers; the one before the first of them."""
    global _last_number
    with _numbers_lock:
        start = _last_number
        _last_number += count
    return start


def _drop(spares: dict[tuple[str, str, int], list[tuple[int, str]]]) -> None:
    files = [file for group in spares.values() for file in group]
    if files:
        remove_files([os.fsencode(path) for _, path in files], [fd for fd, _ in files])


def _error(code: int, path: bytes) -> OSError:
    return OSError(code, os.strerror(code), os.fsdecode(path))


def _unlink(path: bytes) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _settle(requests: list[_Request]) -> None:
    for request in requests:
        future = request.future
        if future is None or future.done():
            continue  # the waiter was cancelled
        if request.error is not None:
            future.set_exception(request.error)
        else:
            future.set_result(None)

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

__all__ = ["Committer", "commit_files", "fsync_dir"]

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


try:
    from ._speedups import commit_files as _commit_files
except ImportError:  # pragma: no cover - the extension is optional
    _commit_files = _commit_files_py


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


@dataclass(eq=False)
class _Request:
    directory: bytes
    fd: int | None = None
    tmp: bytes = b""
    final: bytes = b""
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

    def __init__(self, idle: float = 5.0) -> None:
        self.idle = idle
        self._cond = threading.Condition()
        self._requests: list[_Request] = []
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
                        return
                batch, self._requests = self._requests, []
            self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
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

"""Check AUTH credentials against a password file.

The file has one ``user:hash`` line per user (``#`` comments and blank lines
are ignored); hashes are :func:`bonzo.auth.hash_password` results, so only a
slow, salted hash of each password is ever stored. ``bonzo adduser`` writes
such lines. The file is read at startup and read again when it changes, so
users can be added without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bonzo import Accept, hookimpl
from bonzo.auth import (
    PasswordHashError,
    check_password_hash,
    dummy_hash,
    hash_password,
    verify_password,
)
from bonzo.schema import Key, Schema

__all__ = ["PasswdPlugin", "read_password_file", "add_user"]

log = logging.getLogger("bonzo.plugins.passwd")

#: The ``[plugins.passwd]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key(
        "file",
        "path",
        required=True,
        doc="The password file (``bonzo adduser`` writes it). It must exist and "
        "parse when the server starts.",
    ),
    Key(
        "threads",
        "int",
        default=2,
        minimum=1,
        maximum=64,
        doc="Password checks run at once, each in a thread of the plugin's own: a "
        "flood of AUTH attempts waits for these, and never delays the threads that "
        "store mail (a check takes tens of milliseconds of CPU, on purpose).",
    ),
)
KEYS = tuple(SCHEMA.names)


def _check_user(user: str) -> str:
    if not user or ":" in user or any(ord(c) < 33 or ord(c) == 127 for c in user):
        raise ValueError(f"bad user name {user!r}: no colon, space or control character")
    return user


def read_password_file(path: Path) -> dict[str, str]:
    """Parse a password file into ``{user: hash}``; raises :class:`ValueError`
    naming the file and line for a malformed entry."""
    users: dict[str, str] = {}
    # utf-8-sig: a byte order mark (Windows editors write one) is not part of
    # the first user's name.
    text = path.read_text("utf-8-sig")
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not stored:
            raise ValueError(f"{path}: line {lineno}: expected user:hash")
        try:
            _check_user(user)
        except ValueError as exc:
            raise ValueError(f"{path}: line {lineno}: {exc}") from None
        try:
            check_password_hash(stored)
        except PasswordHashError as exc:
            raise ValueError(f"{path}: line {lineno}: not a bonzo password hash ({exc})") from None
        if user in users:
            raise ValueError(f"{path}: line {lineno}: user {user!r} is listed twice")
        users[user] = stored
    return users


def add_user(path: Path, user: str, password: str) -> bool:
    """Add ``user`` to the password file at ``path`` (creating it, mode 0600,
    owned by the caller), or replace the user's hash; return True if the user
    was new. The file is replaced atomically, so a running server never reads
    half a file; a symbolic link is followed (its target is replaced), and
    the new file keeps the old one's owner, group and permissions (but for
    other users': none), so the server's user can still read it.

    :raises ValueError: also when the owner and group cannot be kept (not
        root, and not the file's owner): nothing is changed then."""
    _check_user(user)
    if not password:
        raise ValueError("empty password")
    # Through a symbolic link, the target is the file the server reads:
    # replace that one and keep the link. (Errors name the path given.)
    target = Path(os.path.realpath(path))
    lines: list[str] = []
    new = True
    old: os.stat_result | None = None
    if path.exists():
        read_password_file(path)  # refuse to rewrite a file we cannot parse
        old = target.stat()
        for line in path.read_text("utf-8-sig").splitlines():
            if line.partition(":")[0].strip() == user and not line.lstrip().startswith("#"):
                new = False
                continue
            lines.append(line)
    lines.append(f"{user}:{hash_password(password)}")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if old is not None:
                # As the old file: "User=bonzo" must still read it after root
                # ran adduser.
                try:
                    os.fchown(fd, old.st_uid, old.st_gid)
                except PermissionError:
                    raise ValueError(
                        "cannot give the new file the owner and group of the old one "
                        f"({old.st_uid}:{old.st_gid}); run bonzo adduser as root or as the "
                        "file's owner (nothing changed)"
                    ) from None
                # Never readable by others, whatever it was: hashes can be
                # cracked offline.
                os.fchmod(fd, stat.S_IMODE(old.st_mode) & 0o770)
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return new


def _check(password: str, stored: str | None) -> bool:
    """Check ``password`` against ``stored``, or against the dummy hash for an
    unknown user (so that it takes as long); in a worker thread, where the
    dummy hash is also made the first time."""
    return verify_password(password, stored if stored is not None else dummy_hash())


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    # The inode too: a rewrite (add_user, most editors) is a new file, and a
    # changed password is the same size, maybe within the same mtime tick.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# The password threads of this process, by (pid, threads), each with the
# number of plugin instances holding it. One pool serves every configuration
# a reload makes: scrypt's 16 MiB buffer stays in the malloc arena of the
# thread that ran it (glibc keeps it for reuse), so new threads at each
# reload would each keep another 16 MiB. Keyed by pid: a pool inherited
# through a fork has no threads in the child.
_pools: dict[tuple[int, int], tuple[ThreadPoolExecutor, int]] = {}
_pools_lock = threading.Lock()


def _acquire_pool(threads: int) -> tuple[tuple[int, int], ThreadPoolExecutor]:
    """This process's pool of ``threads`` (made if needed; its threads start
    at the first check), and one more holder of it."""
    pid = os.getpid()
    key = (pid, threads)
    with _pools_lock:
        for stale in [k for k in _pools if k[0] != pid]:
            del _pools[stale]  # the parent's, copied by a fork
        pool, holders = _pools.get(key, (None, 0))
        if pool is None:
            pool = ThreadPoolExecutor(threads, thread_name_prefix="bonzo-passwd")
        _pools[key] = (pool, holders + 1)
    return key, pool


def _release_pool(key: tuple[int, int]) -> None:
    """One holder fewer; the last one shuts the pool down (the process stops,
    or ``threads`` changed), without waiting for a check in progress."""
    with _pools_lock:
        entry = _pools.get(key)
        if entry is None or key[0] != os.getpid():
            return
        pool, holders = entry
        if holders > 1:
            _pools[key] = (pool, holders - 1)
            return
        del _pools[key]
    pool.shutdown(wait=False, cancel_futures=True)


class PasswdPlugin:
    """Accepts AUTH credentials that match the password file.

    An unknown user and a wrong password are treated alike (no opinion, so
    the client gets ``535 5.7.8`` unless another plugin vouches for it), and
    take the same time: an unknown user is checked against a dummy hash.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self.users: dict[str, str] = {}
        self.threads = 2
        self._stamp: tuple[int, ...] | None = None
        self._unreadable = False  # the file could not be read at the last AUTH
        # The process's pool (see _acquire_pool), taken at startup (so that a
        # reload's new configuration holds it before the old one lets go) or
        # at the first AUTH; its key says for which process and size.
        self._pool: ThreadPoolExecutor | None = None
        self._pool_key: tuple[int, int] | None = None

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.passwd]`` and read the file once."""
        values = SCHEMA.parse(config, app)
        path = values["file"]
        self.path = path
        self.threads = values["threads"]
        # The stamp before the read: a change in between is seen at the next AUTH.
        self._stamp = self._file_stamp()
        try:
            self.users = read_password_file(path)
        except OSError as exc:
            raise ValueError(f"file: cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"file: {path} is not UTF-8 text") from None
        #: What ``bonzo check`` should warn about: hashes anyone can read
        #: (slow to crack, but a weak password falls).
        self.config_warnings = []
        try:
            readable = os.stat(path).st_mode & 0o004
        except OSError:  # pragma: no cover - it was just read
            readable = 0
        if readable:
            self.config_warnings.append(
                f"file: {path} can be read by every user (chmod o-r it; bonzo adduser "
                "writes it 600)"
            )

    @hookimpl
    def bonzo_startup(self) -> None:
        log.info("passwd: %d user(s) in %s", len(self.users), self.path)
        self._take_pool()

    @hookimpl
    def bonzo_shutdown(self) -> None:
        # The pool goes on for the configuration that replaced this one; it
        # stops with the last holder (see _release_pool).
        if self._pool_key is not None:
            _release_pool(self._pool_key)
        self._pool = None
        self._pool_key = None

    def _take_pool(self) -> ThreadPoolExecutor:
        """The process's pool for ``threads``, held by this instance."""
        key = (os.getpid(), self.threads)
        if self._pool is None or self._pool_key != key:
            if self._pool_key is not None:
                _release_pool(self._pool_key)  # another size, or the parent's before a fork
            self._pool_key, self._pool = _acquire_pool(self.threads)
        return self._pool

    def _file_stamp(self) -> tuple[int, ...] | None:
        """The file's identity and times; ``None`` when it cannot be read."""
        assert self.path is not None
        try:
            return _stamp(self.path.stat())
        except OSError:
            return None

    def _reload_if_changed(self) -> None:
        assert self.path is not None
        try:
            stamp = _stamp(self.path.stat())
        except OSError as exc:
            if not self._unreadable:
                # Once per outage: the users read before stay (as for a file
                # that does not parse), and the operator is told.
                log.error(
                    "passwd: cannot read %s (%s): keeping the %d user(s) read before; "
                    "to remove every user, empty the file",
                    self.path,
                    exc.strerror or exc,
                    len(self.users),
                )
            self._unreadable = True
            return
        if self._unreadable:
            log.info("passwd: %s is readable again", self.path)
            self._unreadable = False
        if stamp == self._stamp:
            return
        try:
            self.users = read_password_file(self.path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            # Keep serving with the users we had; say why the new file is ignored.
            log.error("passwd: not reloading %s: %s", self.path, exc)
        else:
            log.info("passwd: reloaded %s (%d user(s))", self.path, len(self.users))
        self._stamp = stamp

    @hookimpl
    async def bonzo_auth(self, username: str, password: str) -> Accept | None:
        """Verify the password off the event loop (scrypt is deliberately slow)."""
        self._reload_if_changed()
        stored = self.users.get(username)
        loop = asyncio.get_running_loop()
        pool = self._take_pool()
        try:
            ok = await loop.run_in_executor(pool, _check, password, stored)
        except PasswordHashError as exc:
            log.error(
                "passwd: the hash of user %r in %s is malformed: %s", username, self.path, exc
            )
            return None
        if ok and stored is not None:
            return Accept()
        return None

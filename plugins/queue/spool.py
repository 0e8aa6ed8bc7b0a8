"""The queue's files: durable, crash-safe, shared by every worker process.

Layout under the queue directory (``[plugins.queue] path``)::

    tmp/     messages being written, and empty files made ready for the
             next ones (a crash leaves them; removed at start; a refused
             message's file that could not be removed then goes at a
             later scan: Spool.remove_left)
    data/    one file per queued message, written once, never changed
    state/   one file per message whose delivery has begun: per-recipient state

A **data file** is ``BONZO-QUEUE 1``, a line of JSON (the envelope: sender,
recipients with their parameters, the session facts, plugins' records) and
the message as it will be delivered (Bonzo's trace header and any headers
plugins added, then the client's content). It is written in ``tmp/``,
fsync'd, renamed into ``data/``, and the directory fsync'd — only then is
the message accepted, so a ``250`` always means "on disk". The fsyncs and
the rename go to one thread (:class:`GroupSync`, a
:class:`bonzo.durable.Committer`) that takes every message waiting at once
as one batch, with one directory fsync: concurrent sessions share that cost.
The same thread creates the next messages' files in ``tmp/`` after each
batch and removes delivered messages (the unlink, then the close that drops
the claim and frees the inode): both wait for the file system's journal
while a commit runs, which the event loop must not.

A **state file** holds what changes: each recipient's status, attempts,
next attempt and last reply, and the hold flag. It is replaced atomically
(write, fsync, rename, fsync the directory). A missing state file means
"every recipient pending since arrival". A crash between a delivery and its
state update repeats that delivery at most (a duplicate, never a loss).

**Claims.** A process delivering a message, or changing it from the
command line, holds an exclusive ``flock`` on its data file
(:meth:`Spool.claim`). The kernel drops the lock when the process dies, so a
claim never outlives a crash and a message is never delivered by two
workers at once. A message is written under its claim
(:meth:`Spool.write_claimed`): the process that accepted it can hand it,
claim and envelope, to its runner without reading it back.

**Unsaved marks.** A runner that cannot save a message's state (a full
disk) keeps its claim, the outcomes in memory, and marks the claim
(:meth:`Claim.mark_unsaved`) with a lock on a byte far past the end of the
data file (an open file description lock, Linux's ``F_OFD_SETLK``: it
needs no space, goes with the claim's descriptor, and is independent of the
``flock``). Other processes see the mark (:meth:`Spool.unsaved`): the
holder is not delivering the message, it waits to save it; and
``bonzo queue delete`` can remove it (:meth:`Spool.remove_unsaved`) under a
second byte's lock that the runner takes before each try of the save
(:meth:`Claim.saving`), so the two never overlap.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import json
import logging
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bonzo import durable
from bonzo.address import Address
from bonzo.durable import Committer, fsync_dir

from ..maildir.plugin import process_exists

log = logging.getLogger("bonzo.plugins.queue")

__all__ = [
    "Claim",
    "GroupSync",
    "QueuedMessage",
    "Recipient",
    "Spool",
    "SpoolError",
    "STATUSES",
    "fsync_dir",
    "queued_recipient",
]

MAGIC = b"BONZO-QUEUE 1\n"
#: The format of the files this version writes and reads (data: ``MAGIC``;
#: state: its ``format`` field, absent in the first files, which are the same).
FORMAT = 1
#: The envelope line of a data file is bounded: a corrupt file is refused,
#: never read into memory whole.
MAX_ENVELOPE = 16 * 1024 * 1024
#: So is a state file (a few hundred octets per recipient).
MAX_STATE = 16 * 1024 * 1024
#: The latest time (epoch seconds, the year 3000) a queue file may hold: a
#: time must be one a date can show, and ordered (never NaN).
MAX_TIME = 32503680000.0
#: Attempts per recipient a state file may count.
MAX_ATTEMPTS = 10**9
#: How queue files are opened for reading: never blocking (a FIFO), never
#: through a symbolic link.
_OPEN = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
#: Recipient statuses: waiting for a first or next attempt; done.
STATUSES = ("pending", "deferred", "delivered", "bounced")
FINAL = frozenset({"delivered", "bounced"})
_ID = re.compile(r"[0-9A-Za-z]{1,64}")
#: Seconds since its last write after which a file with content in ``tmp/``
#: that no writer holds is a refused message's, left there because it could
#: not be removed then (``tmp/`` unwritable): :meth:`Spool.remove_left`.
LEFT_AGE = 300.0

# The queue directories whose crash clean-up this process has done, by (pid,
# real path): the pid, because a worker forked after its parent set one up
# has its own files to clean. A later setup of the same directory in the same
# process (the new configuration's, at a reload) finds this process's files
# in use — the previous configuration's spare new files, a message being
# written, a state file being saved — never left by a crash.
_SET_UP: set[tuple[int, str]] = set()
_SET_UP_LOCK = threading.Lock()
#: The bytes of a data file locked as marks (see the module description):
#: far past any end, so that no lock on the content ever meets them.
_UNSAVED_BYTE = 1 << 62
_SAVING_BYTE = _UNSAVED_BYTE + 1
#: Open file description locks (Linux, 64-bit: ``struct flock`` packed
#: below); where missing, there are no marks (see :meth:`Spool.unsaved`).
_OFD = (
    getattr(fcntl, "F_OFD_SETLK", None) is not None
    and struct.calcsize("q") == 8
    and struct.calcsize("P") == 8
)


class SpoolError(Exception):
    """A queue file that cannot be read or has no valid content."""


# ------------------------------------------------------------ file contents
# A queue file is written by Bonzo, but read back after crashes, disk
# faults and operators' hands: every value is checked for its type and
# range, so that a bad file is one unreadable message (named, skipped, and
# deletable), never a stuck queue runner, a message that is never due, or
# one delivered again at every retry.


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _json(raw: bytes) -> Any:
    """``raw`` parsed as JSON without NaN or infinities; ValueError otherwise
    (also for nesting too deep to parse)."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _table(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{what}: expected an object, got {type(value).__name__}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what}: expected a string, got {type(value).__name__}")
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _address(value: Any, what: str) -> str:
    """An address (or domain) of a queue file: a string with no control
    character, which none can hold (a damaged file's CR LF would otherwise
    reach a report's header fields)."""
    text = _text(value, what)
    if _CONTROL.search(text):
        raise ValueError(f"{what}: a control character in an address")
    return text


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what}: expected true or false, got {type(value).__name__}")
    return value


def _time(value: Any, what: str) -> float:
    """A time in epoch seconds, from 1970 to :data:`MAX_TIME`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}: expected a time, got {type(value).__name__}")
    if not 0 <= value <= MAX_TIME:  # before float(): no OverflowError
        raise ValueError(f"{what}: {value!r} is out of range")
    return float(value)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ATTEMPTS:
        raise ValueError(f"{what}: expected a count, got {value!r}")
    return value


def _params(value: Any, what: str) -> dict[str, str | None]:
    params = _table(value, what)
    for k, v in params.items():
        if v is not None and not isinstance(v, str):
            raise TypeError(f"{what}.{k}: expected a string or null, got {type(v).__name__}")
    return dict(params)


def queued_recipient(
    address: Address, params: Mapping[str, str | None], postmaster: str
) -> dict[str, Any]:
    """A recipient as the queue file keeps it. The bare ``<postmaster>``
    (RFC 5321 4.5.1: this server's postmaster) becomes ``postmaster``, the
    address the ``postmaster`` key names (a local address, as Postfix
    delivers it to its own postmaster): routed by that domain and delivered
    as it; the address the client sent stays in ``ORCPT`` (RFC 3461 4.2
    lets a server add one), for reports."""
    if address.domain or not postmaster:
        return {
            "address": address.original,
            "canonical": address.canonical,
            "domain": address.domain,
            "params": params,
        }
    target = Address.parse(postmaster)
    params = dict(params)
    if not any(k.upper() == "ORCPT" for k in params):
        params["ORCPT"] = f"rfc822;{address.original}"  # letters only: valid xtext
    return {
        "address": target.original,
        "canonical": target.canonical,
        "domain": target.domain,
        "params": params,
    }


@dataclass
class Recipient:
    """One recipient of a queued message and how its delivery stands."""

    address: str
    """As the client sent it (``RCPT TO``)."""
    canonical: str
    """Canonical form (:attr:`bonzo.address.Address.canonical`): routes match on it."""
    domain: str
    """Canonical domain (``""`` for the bare ``postmaster``)."""
    params: dict[str, str | None] = field(default_factory=dict)
    """The ``RCPT`` parameters (``NOTIFY``, ``ORCPT``...)."""
    status: str = "pending"
    attempts: int = 0
    next_attempt: float = 0.0
    """When the next attempt is due (epoch seconds)."""
    reply: str = ""
    """The last reply or error, as ``"452 4.2.2 Mailbox full"``."""
    host: str = ""
    """The host (or route) that gave :attr:`reply`."""
    remote: bool = False
    """:attr:`reply` is the remote server's (see
    :attr:`Outcome.remote <bonzo_plugins.queue.outcome.Outcome.remote>`)."""
    done_at: float = 0.0
    """When it was delivered or bounced (epoch seconds)."""
    last_attempt: float = 0.0
    """When delivery to it was last tried (``0.0``: never), a report's
    ``Last-Attempt-Date``; an operator's ``bonzo queue bounce`` is no attempt."""

    @property
    def remote_mta(self) -> str:
        """:attr:`host` when :attr:`reply` is its own, else ``""``: what a
        report names as ``Remote-MTA``."""
        return self.host if self.remote else ""

    @property
    def final(self) -> bool:
        """Delivered or bounced: nothing more will be done for it."""
        return self.status in FINAL


@dataclass
class QueuedMessage:
    """A message in the queue: its envelope, its recipients' state, and its
    content on disk."""

    id: str
    arrival: float
    sender: str
    """The reverse-path as sent (``""`` for the null sender)."""
    mail_params: dict[str, str | None]
    recipients: list[Recipient]
    session: dict[str, Any]
    """Facts of the session it arrived on: ``session_id``, ``remote_ip``,
    ``helo``, ``protocol``, ``tls``, ``auth``."""
    records: dict[str, Any]
    """What plugins recorded on the session and the envelope (their JSON-able
    ``stash`` entries), under ``session`` and ``envelope``."""
    path: Path
    offset: int
    """Where the message starts in :attr:`path`."""
    size: int
    """The message's size in octets."""
    held: bool = False
    warned: bool = False
    """A delay notice was sent."""
    transport: str | None = None
    """The named transport every recipient goes to, whatever the routes say
    (a quarantined message: the plugin's ``quarantine`` key)."""
    quarantine: dict[str, Any] | None = None
    """A quarantined message's facts: ``by`` (the plugin), ``reason``,
    ``recipients`` (as the client gave them) and ``final`` (after the
    plugins' changes), and ``to``: the canonical ``quarantine_recipient`` it
    was queued for (absent for a copy kept for its own recipients); ``None``
    otherwise (and for one queued before they were kept)."""
    has_state: bool = False
    """A state file exists (it must be removed with the message)."""

    @classmethod
    def from_envelope(
        cls, id: str, env: dict[str, Any], path: Path, offset: int, size: int
    ) -> QueuedMessage:
        """The message described by the envelope ``env`` of a data file, every
        recipient pending since arrival. Raises ``ValueError``, ``KeyError``
        or ``TypeError`` for a malformed envelope (a wrong type or range
        anywhere: see :func:`_time`)."""
        env = _table(env, "envelope")
        arrival = _time(env["arrival"], "arrival")
        entries = env["recipients"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("recipients: expected a non-empty array")
        recipients = []
        for n, r in enumerate(entries):
            what = f"recipients[{n}]"
            r = _table(r, what)
            recipients.append(
                Recipient(
                    address=_address(r["address"], f"{what}.address"),
                    canonical=_address(r["canonical"], f"{what}.canonical"),
                    domain=_address(r["domain"], f"{what}.domain"),
                    params=_params(r.get("params", {}), f"{what}.params"),
                    next_attempt=arrival,
                )
            )
        transport = env.get("transport")
        quarantine = env.get("quarantine")
        return cls(
            id=id,
            arrival=arrival,
            sender=_address(env["sender"], "sender"),
            mail_params=_params(env.get("mail_params", {}), "mail_params"),
            recipients=recipients,
            session=dict(_table(env.get("session", {}), "session")),
            records=dict(_table(env.get("records", {}), "records")),
            transport=None if transport is None else _text(transport, "transport"),
            quarantine=None if quarantine is None else dict(_table(quarantine, "quarantine")),
            path=path,
            offset=offset,
            size=size,
        )

    # What bonzo_plugins.maildir's writer needs of an envelope.
    header_bytes = b""

    def open(self) -> IO[bytes]:
        """The message, as a binary file positioned at its first octet (close it)."""
        f = open(self.path, "rb")  # noqa: SIM115 - the caller closes it
        f.seek(self.offset)
        return f

    def read(self) -> bytes:
        """The whole message in memory (for small messages and tests)."""
        with self.open() as f:
            return f.read()

    def write_to(self, fileobj: IO[bytes], chunk_size: int = 1 << 20) -> int:
        """Copy the message to ``fileobj`` in chunks; return its size."""
        with self.open() as f:
            while True:
                chunk = f.read(chunk_size)
                if not chunk:
                    break
                fileobj.write(chunk)
        return self.size

    def headers(self, limit: int = 1 << 20) -> bytes:
        """The message's header section (up to the empty line), at most
        ``limit`` octets (:meth:`header_section`)."""
        return self.header_section(limit)[0]

    def header_section(self, limit: int) -> tuple[bytes, bool]:
        """The message's header section with the empty line that ends it,
        and whether it is whole. One larger than ``limit`` octets is cut
        before the first field that does not fit (a folded field is never
        split), or at the last line end when even the first does not fit:
        what is returned is always whole lines, at most ``limit`` octets."""
        with self.open() as f:
            data = f.read(limit + 4)
        end = data.find(b"\r\n\r\n")
        if end >= 0 and end + 4 <= limit:
            return data[: end + 4], True
        if end < 0 and len(data) <= limit:
            return data, True  # no body: the whole message is its header section
        # The last line end within the limit (and the header section) that
        # is followed by a new field, not a continuation line (RFC 5322
        # 2.2.3: one starting with a space or a tab).
        bound = min(limit, end + 2) if end >= 0 else limit
        at = last = data.rfind(b"\r\n", 0, bound)
        while at >= 0 and data[at + 2 : at + 3] in (b" ", b"\t"):
            at = data.rfind(b"\r\n", 0, at)
        if at < 0:
            at = last
        return (data[: at + 2] if at >= 0 else b""), False

    def quarantined_for(self, recipient: Recipient) -> bool:
        """Whether ``recipient`` is the one this quarantine copy was queued for
        (its ``quarantine_recipient``, recorded as ``to``); false for a copy
        kept for its own recipients, and for a message not quarantined."""
        to = (self.quarantine or {}).get("to")
        return isinstance(to, str) and recipient.canonical == to

    @property
    def pending(self) -> list[int]:
        """Indexes of the recipients not yet delivered or bounced."""
        return [i for i, r in enumerate(self.recipients) if not r.final]

    def due(self, now: float) -> list[int]:
        """Indexes of the recipients whose next attempt is due at ``now``."""
        return [i for i, r in enumerate(self.recipients) if not r.final and r.next_attempt <= now]

    @property
    def next_due(self) -> float | None:
        """When the next attempt for any recipient is due; ``None`` when all are done."""
        times = [r.next_attempt for r in self.recipients if not r.final]
        return min(times) if times else None


class Claim:
    """An exclusive right to deliver or change one message (an ``flock`` on
    its data file; released by :meth:`release`, or by the kernel if the
    process dies)."""

    def __init__(self, spool: Spool, id: str, fd: int) -> None:
        self.spool = spool
        self.id = id
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock

    def _mark_kind(self, fd: int) -> int:
        # A message handed over by the process that wrote it is held by the
        # descriptor it was written with, which may be write-only: the
        # kernel takes no read lock there (EBADF). A write lock is seen by
        # the other processes' tests (_locked) and keeps an operator's
        # removal out (its own write lock) just the same.
        write_only = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
        return fcntl.F_WRLCK if write_only else fcntl.F_RDLCK

    def mark_unsaved(self, unsaved: bool) -> None:
        """Mark the claim as held for a state that cannot be saved (or not
        any more): see :meth:`Spool.unsaved`. The mark only informs
        ``bonzo queue``: a fault taking it is logged, never raised (what
        the runner keeps in memory must not be lost for it)."""
        fd = self._fd
        if fd is None:
            return
        try:
            _lock(fd, self._mark_kind(fd) if unsaved else fcntl.F_UNLCK, _UNSAVED_BYTE)
        except OSError as exc:
            log.warning(
                "queue: %s: cannot mark its state unsaved for bonzo queue: %s", self.id, exc
            )

    def saving(self) -> bool:
        """Before a try of the save of a marked claim: take the lock that
        keeps :meth:`Spool.remove_unsaved` out meanwhile (drop it with
        :meth:`saved`). False while an operator's removal holds it."""
        fd = self._fd
        if fd is None:
            return True
        try:
            return _lock(fd, self._mark_kind(fd), _SAVING_BYTE)
        except OSError:
            return True  # unmarked as well (mark_unsaved): no removal can come

    def saved(self) -> None:
        """The try of the save is over (:meth:`saving`)."""
        if self._fd is not None:
            try:
                _lock(self._fd, fcntl.F_UNLCK, _SAVING_BYTE)
            except OSError:
                pass

    @property
    def gone(self) -> bool:
        """The message was removed under the claim (``bonzo queue delete``
        of an unsaved one)."""
        return self._fd is not None and os.fstat(self._fd).st_nlink == 0

    def detach(self) -> int | None:
        """Hand the descriptor (and with it the lock) to the caller, who
        closes it; :meth:`release` does nothing afterwards."""
        fd, self._fd = self._fd, None
        return fd

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class GroupSync:
    """Makes the entries of one directory durable for concurrent writers,
    sharing the work (a :class:`bonzo.durable.Committer`: one thread, one
    batch for every request waiting at once). :meth:`sync` returns once an
    fsync of the directory that *started after the call* has finished;
    N messages renamed at about the same time cost two directory fsyncs,
    not N."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dir = str(path)
        self.committer = Committer()

    @property
    def count(self) -> int:
        """Directory fsyncs done (for tests and statistics)."""
        return self.committer.dir_syncs

    async def sync(self) -> None:
        await self.committer.sync(self._dir)

    def commit(self, fd: int, tmp: str, final: str) -> asyncio.Future[None]:
        """Put the new file ``tmp`` durably in place as ``final`` (see
        :meth:`bonzo.durable.Committer.commit`)."""
        return self.committer.commit(fd, tmp, final, self._dir)

    def remove(self, paths: list[str], fd: int | None) -> asyncio.Future[None]:
        """Unlink ``paths`` and then close ``fd`` in the committer's thread
        (see :meth:`bonzo.durable.Committer.remove`); done once durable."""
        return self.committer.remove(paths, fd, self._dir)

    def close(self) -> None:
        """Blocking: remove the committer's spare new files."""
        self.committer.close()


@dataclass
class _NewFile:
    """A data file written in ``tmp/`` under its claim, not yet in place."""

    id: str
    fd: int
    tmp: str
    final: str
    line: bytes
    size: int

    def discard(self, *, placed: bool = False) -> None:
        try:
            os.unlink(self.final if placed else self.tmp)
        except OSError:
            pass
        os.close(self.fd)


class Spool:
    """The queue directory (see the module's description).

    :arg path: the queue directory (created with :meth:`setup`).
    :arg mode: permissions of the files (directories get search permission
        where the mode grants reading).
    """

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        self.tmp = path / "tmp"
        self.data = path / "data"
        self.state = path / "state"
        self._tmp = str(self.tmp)
        self._data = str(self.data)

    # ----------------------------------------------------------------- setup
    def setup(self) -> int:
        """Create the directories; remove what a crash left: files in
        ``tmp/`` (never accepted: the ``250`` comes after the rename), a
        state file's temporary copy (``state/.ID.PID.tmp``, its rename never
        came) and the state file of a message whose data file is gone (its
        removal was cut short). Returns the number of files removed.

        A file is left by a crash only if the process that wrote it (the
        pid its name ends in) is dead; at this process's first setup of the
        directory its own pid counts as dead too (this process is only
        starting: a file with its number is from an earlier one). A later
        setup of the same directory in this process (a reload) leaves this
        process's files, and state files with no message, alone: they are
        in use by the previous configuration, or being removed by it."""
        dir_mode = self.mode | ((self.mode & 0o444) >> 2)
        for d in (self.path, self.tmp, self.data, self.state):
            d.mkdir(mode=dir_mode | 0o700, parents=True, exist_ok=True)
        key = (os.getpid(), os.path.realpath(self.path))
        with _SET_UP_LOCK:
            first = key not in _SET_UP
        left = []
        for entry in os.scandir(self.tmp):
            if entry.is_file(follow_symlinks=False) and self._writer_gone(entry.name, first):
                left.append(entry.path)
        for entry in os.scandir(self.state):
            name = entry.name
            if not entry.is_file(follow_symlinks=False):
                continue
            if name.startswith(".") and name.endswith(".tmp"):
                if self._writer_gone(name[: -len(".tmp")], first):
                    left.append(entry.path)
            elif first and name.endswith(".json") and _ID.fullmatch(name[: -len(".json")]):
                if not os.path.lexists(f"{self._data}/{name[: -len('.json')]}"):
                    left.append(entry.path)
        removed = 0
        for path in left:
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
        with _SET_UP_LOCK:
            _SET_UP.add(key)
        return removed

    def remove_left(self, age: float = LEFT_AGE) -> int:
        """Blocking: remove what refused messages left in ``tmp/``: a message
        is written there under its claim and, refused (a full disk, a
        directory that cannot be written), its file is removed at once, but
        that removal fails while ``tmp/`` cannot be written, leaving the
        whole message there until :meth:`setup` at the next start. Called at
        each scan of a runner, so that it goes once the directory can be
        written again. A file is removed only if it has content (an empty
        one may be a spare made ready for the next message), its last write
        is over ``age`` seconds old, and its claim can be taken (the writer
        of a message holds it from before its first octet until the file
        leaves ``tmp/``). Returns the number of files removed."""
        removed = 0
        now = time.time()
        try:
            entries = list(os.scandir(self.tmp))
        except OSError:
            return 0
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0 or now - st.st_mtime < age:
                continue
            try:
                fd = os.open(entry.path, _OPEN)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Still the file under that name (not renamed into data/
                # meanwhile): nobody writes it, nobody will.
                if os.lstat(entry.path).st_ino != os.fstat(fd).st_ino:
                    continue
                os.unlink(entry.path)
                removed += 1
            except OSError:
                continue  # being written, or tmp/ still unwritable: the next scan
            finally:
                os.close(fd)
        return removed

    @staticmethod
    def _writer_gone(name: str, starting: bool) -> bool:
        # tmp names end in ".<pid>"; a file of a live writer (another worker
        # accepting right now) is kept.
        _, _, pid = name.rpartition(".")
        if not pid.isdigit():
            return True
        if int(pid) == os.getpid():
            # Starting, this process has written nothing yet: the file is
            # from an earlier process that had its number. Later, it is ours.
            return starting
        # A zombie (a killed worker not yet reaped) writes no more either.
        return not process_exists(int(pid))

    # ---------------------------------------------------------------- write
    def write(
        self,
        id: str,
        envelope: dict[str, Any],
        header_bytes: bytes,
        body: IO[bytes],
    ) -> Path:
        """Blocking: write a new data file (the envelope, ``header_bytes``,
        then ``body`` copied in chunks), fsync it and rename it into
        ``data/``. The caller makes the rename durable (:class:`GroupSync`
        on :attr:`data`) before telling anyone. On any error nothing is
        left behind."""
        claim, message = self.write_claimed(id, envelope, header_bytes, body)
        claim.release()
        return message.path

    def write_claimed(
        self,
        id: str,
        envelope: dict[str, Any],
        header_bytes: bytes,
        body: IO[bytes],
    ) -> tuple[Claim, QueuedMessage]:
        """Blocking: as :meth:`write`, but the file is written under its
        claim, which is returned with the message as it would be loaded (the
        pair: claim, message). On any error nothing is left behind."""
        new = self._create(id, envelope, header_bytes, body)
        errors, _ = durable.commit_files(
            [new.fd], [os.fsencode(new.tmp)], [os.fsencode(new.final)], []
        )
        if errors[0]:
            new.discard()
            raise OSError(errors[0], os.strerror(errors[0]), new.final)
        return self._handed(new)

    async def accept(
        self,
        id: str,
        envelope: dict[str, Any],
        header_bytes: bytes,
        body: IO[bytes],
        sync: GroupSync,
        *,
        in_thread: bool,
    ) -> tuple[Claim, QueuedMessage]:
        """:meth:`write_claimed` for the event loop: the file is written here
        (a small message: a few fast system calls) or, with ``in_thread``, in
        the loop's default executor (a large one); its fsync, rename and the
        directory fsync go to ``sync``'s committer, shared with every other
        message of the moment. Cancelled, it leaves no copy behind."""
        loop = asyncio.get_running_loop()
        if in_thread:
            created = loop.run_in_executor(
                None, self._create, id, envelope, header_bytes, body, sync.committer
            )
            try:
                new = await asyncio.shield(created)
            except asyncio.CancelledError:
                created.add_done_callback(_discard_created)
                raise
        else:
            new = self._create(id, envelope, header_bytes, body, sync.committer)
        placed = sync.commit(new.fd, new.tmp, new.final)
        try:
            await asyncio.shield(placed)
        except asyncio.CancelledError:
            # The client is told 4xx and sends it again: no copy may stay.
            placed.add_done_callback(lambda f: new.discard(placed=f.exception() is None))
            raise
        except BaseException:
            os.close(new.fd)  # the committer removed the file
            raise
        return self._handed(new)

    def _create(
        self,
        id: str,
        envelope: dict[str, Any],
        header_bytes: bytes,
        body: IO[bytes],
        committer: Committer | None = None,
    ) -> _NewFile:
        """Blocking: write a new data file in ``tmp/`` under its claim (the
        file from ``committer``'s spares if given: see
        :meth:`bonzo.durable.Committer.new_file`)."""
        if not _ID.fullmatch(id):
            raise ValueError(f"bad queue id {id!r}")
        # Plain strings, not Paths: this runs for every message accepted.
        final = f"{self._data}/{id}"
        line = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if b"\n" in line:  # pragma: no cover - json.dumps escapes newlines
            raise ValueError("envelope JSON must be one line")
        # tmp names end in ".<pid>" (see _writer_gone).
        if committer is not None:
            fd, tmp = committer.new_file(self._tmp, str(os.getpid()), self.mode)
        else:
            tmp = f"{self._tmp}/{id}.{os.getpid()}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(tmp, flags, self.mode)
        new = _NewFile(id, fd, tmp, final, line, len(header_bytes))
        try:
            # A new file: nobody else can hold its lock yet.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            first = body.read(1 << 20)
            new.size += len(first)
            _write_all(fd, b"".join((MAGIC, line, b"\n", header_bytes, first)))
            while first:
                chunk = body.read(1 << 20)
                if not chunk:
                    break
                new.size += len(chunk)
                _write_all(fd, chunk)
        except BaseException:
            new.discard()
            raise
        return new

    def _handed(self, new: _NewFile) -> tuple[Claim, QueuedMessage]:
        # Parsed back from the line written: exactly what load() would give.
        message = QueuedMessage.from_envelope(
            new.id,
            json.loads(new.line),
            self.data / new.id,
            len(MAGIC) + len(new.line) + 1,
            new.size,
        )
        return Claim(self, new.id, new.fd), message

    # ----------------------------------------------------------------- read
    def ids(self) -> list[str]:
        """Every queued message's id, oldest file first. Anything but a
        directory named like an id counts (a symbolic link too): :meth:`load`
        says what is wrong with it, rather than it being silently left."""
        entries = []
        for entry in os.scandir(self.data):
            if _ID.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
                try:
                    entries.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
                except FileNotFoundError:
                    continue
        return [name for _, name in sorted(entries)]

    def exists(self, id: str) -> bool:
        return _ID.fullmatch(id) is not None and (self.data / id).is_file()

    def present(self, id: str) -> bool:
        """Something is queued as ``id``, readable or not (what
        :meth:`ids` lists)."""
        if not _ID.fullmatch(id):
            return False
        try:
            return not stat.S_ISDIR(os.lstat(self.data / id).st_mode)
        except FileNotFoundError:
            return False

    def load(self, id: str) -> QueuedMessage:
        """Read a message's envelope and state (not its content). Raises
        ``FileNotFoundError`` when it is gone and :exc:`SpoolError` (naming
        the file and what is wrong) for anything else."""
        if not _ID.fullmatch(id):
            raise SpoolError(f"bad queue id {id!r}")
        path = self.data / id
        try:
            with _open_regular(path) as f:
                magic = f.read(len(MAGIC))
                if magic != MAGIC:
                    raise SpoolError(f"{path}: {_not_format(magic)}")
                line = f.readline(MAX_ENVELOPE + 1)
                if not line.endswith(b"\n"):
                    raise SpoolError(f"{path}: envelope line missing or too long")
                offset = f.tell()
                size = os.fstat(f.fileno()).st_size - offset
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise SpoolError(f"{path}: {exc.strerror or exc}") from exc
        try:
            message = QueuedMessage.from_envelope(id, _json(line), path, offset, size)
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolError(f"{path}: bad envelope: {_why(exc)}") from exc
        self._load_state(message)
        return message

    def _load_state(self, message: QueuedMessage) -> None:
        path = self.state / f"{message.id}.json"
        try:
            with _open_regular(path) as f:
                raw = f.read(MAX_STATE + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SpoolError(f"{path}: {exc.strerror or exc}") from exc
        message.has_state = True
        if len(raw) > MAX_STATE:
            raise SpoolError(f"{path}: larger than {MAX_STATE} octets: not a state file")
        try:
            state = _table(_json(raw), "state")
            version = state.get("format", FORMAT)
            if version != FORMAT:
                raise ValueError(
                    f"format {version!r}: written by another version of Bonzo "
                    f"(this one reads format {FORMAT})"
                )
            message.held = _flag(state.get("held", False), "held")
            message.warned = _flag(state.get("warned", False), "warned")
            entries = state["recipients"]
            if not isinstance(entries, list) or len(entries) != len(message.recipients):
                raise ValueError(f"recipients: expected {len(message.recipients)} entries")
            for n, (r, s) in enumerate(zip(message.recipients, entries, strict=True)):
                what = f"recipients[{n}]"
                s = _table(s, what)
                if s["status"] not in STATUSES:
                    raise ValueError(f"{what}.status: unknown status {s['status']!r}")
                r.status = s["status"]
                r.attempts = _count(s.get("attempts", 0), f"{what}.attempts")
                r.next_attempt = _time(
                    s.get("next_attempt", r.next_attempt), f"{what}.next_attempt"
                )
                r.reply = _text(s.get("reply", ""), f"{what}.reply")
                r.host = _text(s.get("host", ""), f"{what}.host")
                r.remote = _flag(s.get("remote", False), f"{what}.remote")
                r.done_at = _time(s.get("done_at", 0.0), f"{what}.done_at")
                r.last_attempt = _time(s.get("last_attempt", 0.0), f"{what}.last_attempt")
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolError(f"{path}: bad state: {_why(exc)}") from exc

    # ---------------------------------------------------------------- state
    def save_state(self, message: QueuedMessage) -> None:
        """Blocking: replace the message's state file atomically and durably."""
        self.write_state(message.id, self.state_data(message))
        message.has_state = True

    def state_data(self, message: QueuedMessage) -> bytes:
        """The content of the message's state file as it stands now (taken
        by the caller's thread, so that :meth:`write_state` can write it in
        another while the message keeps changing)."""
        state = {
            "format": FORMAT,
            "held": message.held,
            "warned": message.warned,
            "recipients": [
                {
                    "status": r.status,
                    "attempts": r.attempts,
                    "next_attempt": r.next_attempt,
                    "reply": r.reply,
                    "host": r.host,
                    "remote": r.remote,
                    "done_at": r.done_at,
                    "last_attempt": r.last_attempt,
                }
                for r in message.recipients
            ],
        }
        return json.dumps(state, separators=(",", ":")).encode("utf-8")

    def write_state(self, id: str, data: bytes) -> None:
        """Blocking: replace message ``id``'s state file with ``data``
        (:meth:`state_data`) atomically and durably."""
        final = self.state / f"{id}.json"
        tmp = self.state / f".{id}.{os.getpid()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, self.mode)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        fsync_dir(self.state)

    def paths(self, id: str, *, state: bool = True) -> list[str]:
        """The files of message ``id`` in the order :meth:`remove` removes
        them: its data, then its state file (unless ``state`` is false). In
        that order a crash in between leaves a state file with no message
        (removed at the next start), never a message without its state,
        which would have every recipient delivered again."""
        paths = [f"{self._data}/{id}"]
        if state:
            paths.append(f"{self.state}/{id}.json")
        return paths

    def remove(self, id: str) -> None:
        """Blocking: remove a message (its data, then its state), durably
        (the command line's way; the runner removes through
        :meth:`GroupSync.remove`, sharing the directory fsync)."""
        for path in self.paths(id):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except IsADirectoryError:
                # Made by hand where a file belongs (the message was
                # unreadable for it): taken away if empty, else left.
                try:
                    os.rmdir(path)
                except OSError:
                    pass
        fsync_dir(self.data)

    # ---------------------------------------------------------------- claims
    def claim(self, id: str, *, wait: float = 0.0) -> Claim | None:
        """Take the exclusive claim on a message; ``None`` if another holder
        has it (after waiting up to ``wait`` seconds) or it is gone."""
        if not _ID.fullmatch(id):
            return None
        try:
            # Non-blocking, and only the file itself: a FIFO or a symbolic
            # link in data/ is no message (load() refuses it).
            fd = os.open(self.data / id, _OPEN)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None
            raise
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.05)
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        # Removed between open and lock (delivered by its holder): gone.
        if os.fstat(fd).st_nlink == 0:
            os.close(fd)
            return None
        return Claim(self, id, fd)

    def claimed(self, id: str) -> bool:
        """Message ``id``'s claim is held right now (a runner delivering it,
        or keeping it, just accepted, for a free delivery slot): found by
        taking the claim and letting it go at once, without waiting. A
        runner that looks for it in that instant leaves it to its next
        scan, as it would a message another worker has."""
        if not _ID.fullmatch(id):
            return False
        try:
            fd = os.open(self.data / id, _OPEN)
        except OSError:
            return False  # gone, or no message (load() says why)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # the claim, if taken, goes with it
        return False

    def unsaved(self, id: str) -> bool:
        """Message ``id``'s claim is held by a runner that cannot save its
        state (:meth:`Claim.mark_unsaved`): it is not being delivered, it
        waits for the save. Always False where the marks are missing."""
        if not _OFD or not _ID.fullmatch(id):
            return False
        try:
            fd = os.open(self.data / id, _OPEN)
        except OSError:
            return False
        try:
            return _locked(fd, _UNSAVED_BYTE)
        finally:
            os.close(fd)

    def remove_unsaved(self, id: str, *, wait: float = 0.0) -> bool:
        """Blocking: remove message ``id`` (:meth:`remove`) while its runner
        waits to save its state, under the lock that keeps the runner's
        tries of the save out (:meth:`Claim.saving`; waiting up to ``wait``
        seconds for one under way). False if the message is not so marked,
        or the lock stays taken: then nothing is removed. The runner finds
        its claim :attr:`~Claim.gone` at its next try and drops what it
        kept in memory."""
        if not _OFD or not _ID.fullmatch(id):
            return False
        try:
            fd = os.open(self.data / id, (_OPEN & ~os.O_RDONLY) | os.O_RDWR)
        except OSError:
            return False
        try:
            deadline = time.monotonic() + wait
            while not _lock(fd, fcntl.F_WRLCK, _SAVING_BYTE):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
            # Marked still: its runner is between two tries, and cannot
            # start one before this lock goes with the descriptor.
            if not _locked(fd, _UNSAVED_BYTE) or os.fstat(fd).st_nlink == 0:
                return False
            self.remove(id)
            return True
        finally:
            os.close(fd)

    def iter_messages(self) -> Iterator[QueuedMessage]:
        """Every message that can be read (unreadable ones are skipped)."""
        for id in self.ids():
            try:
                yield self.load(id)
            except (FileNotFoundError, SpoolError):
                continue


def _open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading if it is a regular file (not a symbolic
    link, FIFO or device: none may hang or flood the reader); ``OSError``
    otherwise, ``FileNotFoundError`` if it is not there."""
    try:
        fd = os.open(path, _OPEN)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError("a symbolic link, not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _flock(kind: int, byte: int) -> bytes:
    """A ``struct flock`` for one byte (Linux, 64-bit: 32 octets)."""
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, byte, 1, 0)


def _lock(fd: int, kind: int, byte: int) -> bool:
    """Take (``F_RDLCK``, ``F_WRLCK``) or drop (``F_UNLCK``) an open file
    description lock on one byte of ``fd``'s file, without waiting; False if
    another holds a conflicting one. True, doing nothing, where such locks
    are missing."""
    if not _OFD:
        return True
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(kind, byte))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _locked(fd: int, byte: int) -> bool:
    """Another open file description holds a lock on ``byte`` of ``fd``'s file."""
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return bool(struct.unpack("hhqqi4x", got)[0] != fcntl.F_UNLCK)


def _not_format(magic: bytes) -> str:
    """What is wrong with a data file that does not start with :data:`MAGIC`."""
    if magic.startswith(b"BONZO-QUEUE ") and magic != MAGIC:
        return (
            f"queue file format {magic[12:].strip().decode('ascii', 'replace')!r}: written "
            f"by another version of Bonzo (this one reads format {FORMAT})"
        )
    return "not a queue file"


def _why(exc: Exception) -> str:
    """A parse error as one line (a KeyError's text is only the key)."""
    return f"missing {exc}" if isinstance(exc, KeyError) else str(exc)


def _discard_created(future: asyncio.Future[_NewFile]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().discard()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def body_of(data: bytes) -> IO[bytes]:
    """``data`` as a file (for :meth:`Spool.write` from memory)."""
    return io.BytesIO(data)

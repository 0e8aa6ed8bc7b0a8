"""Durable delivery into Maildir folders (one catch-all, or one per recipient).

A message is written to ``tmp/`` under a unique name, flushed and
``fsync``'d, renamed into ``new/``, and ``new/`` itself is ``fsync``'d; only
then is the message accepted. The file work runs in a thread of the loop's
default executor so that it never blocks other sessions.

Per-recipient folders are named after the canonical form of each recipient
(:class:`bonzo.address.Address`), the form every other bundled plugin
matches on. At startup, files left in ``tmp/`` by a writer that died (or
untouched for 36 hours) are removed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bonzo.address import Address
from bonzo.durable import fsync_dir
from bonzo.errors import TransientError
from bonzo.hookspecs import Accept, hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session

from .._config import check_creatable, envelope_recipients
from .._quarantine import add_quarantine_headers

__all__ = ["MaildirPlugin", "DeliveryAborted", "maildir_component", "parse_tmp_name"]

log = logging.getLogger("bonzo.plugins.maildir")

SUBDIRS = ("tmp", "new", "cur")
DEFAULT_MODE = 0o600
#: Errors that mean "no space": the client gets 452 4.3.1 (RFC 3463).
NO_SPACE = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)
#: Folder for the bare ``postmaster`` recipient in per-recipient mode; no
#: domain maps to it, since ``_`` is always escaped in domain folders.
LOCAL_FOLDER = "_local"

#: A file in ``tmp/`` untouched for this long is stale (the Maildir convention).
STALE_AFTER = 36 * 3600
#: The names this plugin gives its files, in ``tmp/`` and then ``new/``:
#: ``<seconds>.M<microseconds>P<pid>Q<counter>.<host>,S=<size>``. The host
#: part never contains ``,`` or ``/`` (see :func:`_host_part`), so the pid
#: and host read back from a name are the writer's.
TMP_NAME = re.compile(
    r"(?P<sec>[0-9]+)\.M(?P<usec>[0-9]+)P(?P<pid>[0-9]+)Q(?P<n>[0-9]+)"
    r"\.(?P<host>[^,/]+),S=(?P<size>[0-9]+)"
)

_SAFE_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._+=")
_SAFE_DOMAIN = _SAFE_LOCAL - {"_", "+", "="}
_MAX_COMPONENT = 200


def maildir_component(text: str, *, domain: bool = False) -> str:
    """``text`` as one safe path component: lower-cased, every octet outside a
    small alphabet written ``%XX``, a leading dot escaped, so the result is
    never empty, ``.``, ``..`` or anything containing ``/``. Distinct inputs
    give distinct components (long ones end in a hash)."""
    safe = _SAFE_DOMAIN if domain else _SAFE_LOCAL
    out = []
    for ch in text.lower():
        if ch in safe:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    result = "".join(out)
    if result.startswith("."):
        result = "%2E" + result[1:]
    if not result:
        result = "%"
    if len(result) > _MAX_COMPONENT:
        digest = hashlib.sha256(result.encode("ascii")).hexdigest()[:16]
        result = result[: _MAX_COMPONENT - 17] + "~" + digest
    return result


def _octal(value: str) -> int:
    """An octal string (``"0640"``, ``"0o640"``) as an integer."""
    try:
        return int(value.strip().removeprefix("0o"), 8)
    except ValueError:
        raise ValueError(f"mode: expected an octal string such as '0640', got {value!r}") from None


def _mode_bits(value: int) -> int:
    """The ``mode`` key's checks (a ``convert=``: the message does not name the key)."""
    if not 0 <= value <= 0o777:
        raise ValueError(f"expected permission bits (0o000 to 0o777), got {oct(value)}")
    if value & 0o600 != 0o600:
        raise ValueError(f"the owner must be able to read and write, got {oct(value)}")
    if value & 0o002:
        raise ValueError(f"message files must not be world-writable, got {oct(value)}")
    return value


def _with_octal_mode(config: Any) -> Any:
    """``config`` with a ``mode`` given as an octal string made an integer,
    so that the schema checks one form."""
    if isinstance(config, Mapping) and isinstance(config.get("mode"), str):
        return {**config, "mode": _octal(config["mode"])}
    return config


#: The ``[plugins.maildir]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("path", "path", default="Maildir",
        doc="The catch-all maildir, or the root of the per-recipient folders "
        "(the current directory is the base when Bonzo is embedded). A path "
        "that exists and is not a directory is an error."),
    Key("per_recipient", "bool", default=False,
        doc="``false``: every message goes to the one maildir at ``path``. "
        "``true``: one copy per recipient, in ``<path>/<domain>/<local part>/``."),
    Key("create", "bool", default=True,
        doc="Create missing folders (``path`` and its parents, and the ``tmp``, "
        "``new`` and ``cur`` of each maildir) at startup and when a delivery "
        "needs them; each new directory is made durable (its parent is "
        "``fsync``'d). With ``false``, ``path`` must exist when the "
        "configuration is loaded (and be a maildir, in catch-all mode), and a "
        "recipient whose folder is missing gets ``451 4.3.0``."),
    Key("envelope_headers", "bool", default=True,
        doc="Write the envelope at the top of each stored copy, as a local "
        "delivery agent does (RFC 5321 4.4): ``Return-Path: <sender>`` and, in "
        "a copy that is one recipient's (always with ``per_recipient``), "
        "``Delivered-To: <recipient>``. A copy shared by several recipients "
        "(catch-all mode) gets no ``Delivered-To:``: it would show each of them "
        "the others, Bcc recipients included. These headers are not part of "
        "what the client sent; ``false`` stores exactly that."),
    Key("quarantine", "path",
        doc="A maildir for messages a filter quarantined "
        "(:class:`bonzo.Quarantine`): with it, this plugin owns "
        ":func:`~bonzo.hookspecs.bonzo_quarantine` and stores each such message "
        "there — one copy, whatever its recipients, durably, with an "
        "``X-Bonzo-Quarantine: <plugin>: <reason>`` header added (after those the "
        "filters added) — instead of "
        "delivering it. Created at startup; it must differ from ``path``. "
        "Without it, a quarantined message gets ``451 4.3.0`` unless another "
        "plugin keeps it."),
    Key("mode", "int", default="0600", convert=_mode_bits,
        doc="Permissions of the message files (set exactly, whatever the umask): "
        "an integer (``0o640`` in TOML) or an octal string (``\"0640\"``). "
        "Directories the plugin creates get the same bits plus search "
        "permission wherever reading is allowed (``0o600`` gives ``0o700``, "
        "``0o640`` gives ``0o750``). The owner must be able to read and write; "
        "world-writable modes are refused."),
)  # fmt: skip
KEYS = tuple(SCHEMA.names)


def _where(exc: OSError, default: Path) -> str:
    """What a delivery error is about, for the log: both paths of a failed
    rename (the missing or broken ``new/`` is the second), else the file."""
    if exc.filename2:
        return f"{exc.filename} -> {exc.filename2}"
    return str(exc.filename or default)


class _Abort(threading.Event):
    """Set when the delivery hook is cancelled (it timed out: the client
    is answered ``451``) while the writing thread runs on. The thread
    removes what it wrote when it sees it set; and the files it stored
    before the hook was cancelled (:meth:`settle` passed) are removed by
    :meth:`cancel`: either way no copy stays of a message the client will
    send again."""

    def __init__(self) -> None:
        super().__init__()
        self._guard = threading.Lock()
        self._stored: list[Path] = []

    def settle(self, paths: list[Path]) -> None:
        """In the thread, once ``paths`` are durable: keep them, unless the
        hook was cancelled meanwhile (then they are removed, and
        :class:`DeliveryAborted` raised)."""
        with self._guard:
            if self.is_set():
                _unlink_all(paths)
                raise DeliveryAborted("delivery cancelled")
            self._stored = list(paths)

    def cancel(self) -> list[Path]:
        """From the cancelled hook: stop the thread; the files it had stored
        already, which the caller removes."""
        with self._guard:
            self.set()
            return self._stored


def _unlink_all(paths: Sequence[Path]) -> int:
    """Remove ``paths``; the number that were there."""
    removed = 0
    for path in paths:
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def envelope_lead(sender: str, recipients: Sequence[str]) -> bytes:
    """``Return-Path: <sender>`` and, for one recipient, ``Delivered-To:``
    (RFC 5321 4.4; as Postfix's local delivery writes them). An address
    with a character that is not printable is left out, as the
    ``Received:`` header's ``for`` clause leaves it out: a line break (which
    the core never lets through), and the Unicode ones a quoted local part
    may hold (U+2028 starts a new line for some readers, U+202E turns the
    text around)."""
    if not sender.isprintable():
        return b""
    lines = f"Return-Path: <{sender}>\r\n"
    # One mailbox however its address was spelled (folders are named in
    # lower case): ``One@`` and ``one@`` are one recipient's copy.
    distinct = list({r.lower(): r for r in reversed(recipients)}.values())
    if len(distinct) == 1 and distinct[0].isprintable():
        lines += f"Delivered-To: {distinct[0]}\r\n"
    return lines.encode("utf-8")


def _host_part(host: str | None = None) -> str:
    """The host field of file names: the host name with ``/``, ``:`` and
    ``,`` escaped as the Maildir convention does (``,`` separates the
    ``S=`` field) and anything not printable ASCII made ``_``."""
    host = host if host is not None else (socket.gethostname() or "localhost")
    host = host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
    return "".join(c if c.isascii() and c.isprintable() and c != " " else "_" for c in host)


def parse_tmp_name(name: str) -> tuple[int, str] | None:
    """The writer's ``(pid, host field)`` of a file named by this plugin, or
    ``None`` for any other name."""
    m = TMP_NAME.fullmatch(name)
    if m is None:
        return None
    return int(m.group("pid")), m.group("host")


def process_exists(pid: int) -> bool:
    """True if process ``pid`` of this host may still be running (and so
    still be writing); True also when that cannot be told."""
    if os.name != "posix" or not 0 < pid < 2**31:
        return True  # no pid to ask about: the file is judged by its age only
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, as another user
        return True
    try:  # A zombie has stopped writing for good (Linux: state "Z").
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b") ")[2][:1] != b"Z"
    except OSError:
        return True


def _subdirs(path: Path) -> list[Path]:
    """The directories in ``path``; an unreadable one is logged and skipped."""
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("maildir: cannot list %s for stale files: %s", path, exc.strerror or exc)
        return []
    # Not through a symbolic link: the cleanup stays inside the tree.
    return [Path(e.path) for e in entries if _is_dir(e, follow=False)]


def _is_dir(entry: os.DirEntry[str] | Path, *, follow: bool = True) -> bool:
    """Whether ``entry`` is a directory (following symbolic links unless
    ``follow`` is false); an error other than "no such file" is logged and
    counts as no."""
    try:
        if isinstance(entry, Path):
            return entry.is_dir() if follow else stat.S_ISDIR(entry.lstat().st_mode)
        return entry.is_dir(follow_symlinks=follow)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("maildir: cannot examine %s: %s", entry, exc.strerror or exc)
        return False


class DeliveryAborted(Exception):
    """The delivery was cancelled (the hook timed out) before it completed."""


class MaildirPlugin:
    """Delivers each message to Maildir folders and accepts it once durable."""

    #: Every recipient has a maildir: no delivery plugin after this one is
    #: ever asked (``bonzo check`` warns about one).
    decides_always = ("bonzo_deliver",)
    #: Its deliveries are final (into mailboxes): the ``queue`` plugin, when
    #: enabled, sends the "delivered" reports ``NOTIFY=SUCCESS`` asks for.
    #: Alone it sends none and does not honour DSN, so the server does not
    #: offer it (:attr:`bonzo.app.MailApp.dsn_honoured_by`).
    final_delivery = True

    def __init__(self) -> None:
        self.path = Path(os.path.abspath("Maildir"))
        self.per_recipient = False
        self.create = True
        self.mode = DEFAULT_MODE
        self.quarantine: Path | None = None
        self.envelope_headers = True
        self._host = _host_part()
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def dir_mode(self) -> int:
        """Mode of the directories this plugin creates: the file mode plus
        search permission wherever it grants read permission."""
        return self.mode | ((self.mode & 0o444) >> 2)

    # ------------------------------------------------------------ configure
    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate the ``[plugins.maildir]`` table."""
        values = SCHEMA.parse(_with_octal_mode(config), app)
        path: Path = values["path"]
        per_recipient = values["per_recipient"]
        create = values["create"]
        mode = values["mode"]
        if isinstance(mode, str):  # the declared default, not converted
            mode = _octal(mode)
        if path.exists() and not path.is_dir():
            raise ValueError(f"path: {path} exists and is not a directory")
        check_creatable("path", path)
        if not create:
            if not path.is_dir():
                raise ValueError(f"path: {path} does not exist (and create = false)")
            if not per_recipient:
                missing = [d for d in SUBDIRS if not (path / d).is_dir()]
                if missing:
                    raise ValueError(
                        f"path: {path} is not a maildir (no {', '.join(missing)}; create = false)"
                    )
        quarantine: Path | None = values["quarantine"]
        if quarantine is not None:
            if quarantine.exists() and not quarantine.is_dir():
                raise ValueError(f"quarantine: {quarantine} exists and is not a directory")
            check_creatable("quarantine", quarantine)
            if quarantine == path:
                raise ValueError("quarantine: must differ from path")
        self.path = path
        self.per_recipient = per_recipient
        self.create = create
        self.mode = mode
        self.quarantine = quarantine
        #: Whether bonzo_quarantine keeps anything (see App.warnings).
        self.quarantine_owner = quarantine is not None
        self.envelope_headers = values["envelope_headers"]

    @hookimpl
    def bonzo_startup(self) -> None:
        """Create the maildir (or the per-recipient root) before serving, so a
        permission problem stops the server instead of deferring mail; then
        remove the stale files of ``tmp/`` (:meth:`clean_tmp`)."""
        if self.create:
            if self.per_recipient:
                self._makedirs(self.path)
            else:
                self._ensure_maildir(self.path)
        if self.quarantine is not None:
            self._ensure_maildir(self.quarantine)
            log.info("maildir: quarantined messages go to %s", self.quarantine)
        log.info(
            "maildir: storing messages durably in %s%s",
            self.path,
            " (one maildir per recipient)" if self.per_recipient else "",
        )
        self.clean_tmp()

    # ------------------------------------------------------------ stale tmp
    def maildirs(self) -> list[Path]:
        """Every existing maildir this plugin writes to: ``path`` when it has
        a ``tmp/``, and each per-recipient folder ``path/<domain>/<local>``
        that has one (in catch-all mode too, except under ``path``'s own
        ``tmp``, ``new`` and ``cur``). Unreadable directories are logged and
        skipped."""
        found = [self.path] if _is_dir(self.path / "tmp") else []
        if self.quarantine is not None and _is_dir(self.quarantine / "tmp"):
            found.append(self.quarantine)
        skip = () if self.per_recipient else SUBDIRS
        for domain in _subdirs(self.path):
            if domain.name in skip:
                continue
            for local in _subdirs(domain):
                if _is_dir(local / "tmp", follow=False):
                    found.append(local)
        return found

    def stale_reason(self, name: str, st: os.stat_result, now: float) -> str | None:
        """Why the file ``name`` of a ``tmp/`` (with status ``st``) is stale, or
        ``None`` if it must be kept. Stale: untouched (neither modified nor
        read) for :data:`STALE_AFTER` seconds; or named by this plugin on this
        host by a process that no longer exists. Files of other hosts and
        other names are judged by their age only."""
        if now - max(st.st_mtime, st.st_atime) > STALE_AFTER:
            return "untouched for more than 36 hours"
        writer = parse_tmp_name(name)
        if writer is not None and writer[1] == self._host and not process_exists(writer[0]):
            return f"its writer, process {writer[0]}, no longer exists"
        return None

    def clean_tmp(self, now: float | None = None) -> tuple[int, int]:
        """Remove the stale files (:meth:`stale_reason`) from the ``tmp/`` of
        every maildir of :meth:`maildirs`; return how many files were removed
        and how many octets that freed. A file that cannot be examined or
        removed is logged as a warning and left; this never raises
        :class:`OSError`."""
        now = time.time() if now is None else now
        removed = 0
        freed: dict[tuple[int, int], int] = {}
        for maildir in self.maildirs():
            for path, st, reason in self._stale_files(maildir / "tmp", now):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue  # removed meanwhile (another worker)
                except OSError as exc:
                    log.warning(
                        "maildir: cannot remove stale file %s: %s", path, exc.strerror or exc
                    )
                    continue
                removed += 1
                freed[(st.st_dev, st.st_ino)] = st.st_size
                log.debug("maildir: removed %s (%d bytes): %s", path, st.st_size, reason)
        size = sum(freed.values())
        if removed:
            log.info(
                "maildir: removed %d stale file(s) (%d bytes) from tmp/ under %s",
                removed,
                size,
                self.path,
            )
        return removed, size

    def _stale_files(self, tmp: Path, now: float) -> Iterator[tuple[Path, os.stat_result, str]]:
        try:
            with os.scandir(tmp) as it:
                entries = list(it)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("maildir: cannot list %s for stale files: %s", tmp, exc.strerror or exc)
            return
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    continue  # never written by a delivery agent
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("maildir: cannot examine %s: %s", entry.path, exc.strerror or exc)
                continue
            reason = self.stale_reason(entry.name, st, now)
            if reason is not None:
                yield Path(entry.path), st, reason

    # -------------------------------------------------------------- targets
    def maildir_for(self, recipient: Address | str) -> Path:
        """The maildir of ``recipient`` in per-recipient mode, named after its
        canonical form (:attr:`bonzo.address.Address.canonical`, a string is
        parsed with :meth:`~bonzo.address.Address.parse`):
        ``path/<domain>/<local part>``, or ``path/_local/postmaster`` for the
        bare ``postmaster``. Always inside ``path``."""
        mailbox = recipient if isinstance(recipient, Address) else Address.parse(recipient)
        if not mailbox.domain:  # the bare "postmaster" (RFC 5321 4.5.1)
            folder = self.path / LOCAL_FOLDER / maildir_component(mailbox.local)
        else:
            domain = maildir_component(mailbox.domain, domain=True)
            folder = self.path / domain / maildir_component(mailbox.local)
        # Defence in depth: the components cannot climb, but check anyway.
        if os.path.commonpath([folder, self.path]) != str(self.path):
            raise TransientError("Local error in processing", 451, "4.3.0")
        return folder

    def targets(self, envelope: Envelope) -> list[Path]:
        """The maildirs the message goes to, each once, in recipient order."""
        if not self.per_recipient:
            return [self.path]
        try:
            recipients = envelope_recipients(envelope)
        except ValueError as exc:  # only an envelope built by hand can get here
            log.error(
                "maildir: message %s has a recipient with no canonical form: %s", envelope.id, exc
            )
            raise TransientError("Local error in processing", 451, "4.3.0") from None
        # Refused by a filter, or removed by a plugin: not delivered.
        skip = set(getattr(envelope, "refused", {})) | getattr(envelope, "removed", set())
        seen: dict[Path, None] = {}
        for i, mailbox in enumerate(recipients):
            if i not in skip:
                seen.setdefault(self.maildir_for(mailbox), None)
        return list(seen)

    def recipients_by_maildir(self, envelope: Envelope) -> dict[Path, list[int]]:
        """Per-recipient mode: each maildir the message goes to, with the
        indexes (in ``envelope.recipients``) of the recipients it serves;
        recipients already refused are left out."""
        skip = envelope.refused.keys() | envelope.removed
        groups: dict[Path, list[int]] = {}
        for i, mailbox in enumerate(envelope.recipients):
            if i not in skip:
                groups.setdefault(self.maildir_for(mailbox), []).append(i)
        return groups

    def leads(self, sender: str, groups: Mapping[Path, list[str]]) -> dict[Path, bytes]:
        """The envelope headers written at the top of each maildir's copy, as
        a local delivery agent writes them (``envelope_headers``):
        ``Return-Path:`` with the sender, and ``Delivered-To:`` with the
        recipient when the copy is one recipient's (never in a copy shared
        by several, which would show each one the others, Bcc included)."""
        if not self.envelope_headers:
            return {}
        leads = {}
        for target, recipients in groups.items():
            lead = envelope_lead(sender, recipients)
            if lead:
                leads[target] = lead
        return leads

    # ------------------------------------------------------------- delivery
    @hookimpl
    async def bonzo_deliver(self, session: Session, envelope: Envelope) -> Accept | None:
        """Write the message durably to every target maildir, then accept it.

        In an LMTP session with ``per_recipient``, each maildir is written on
        its own and a recipient whose maildir fails is refused alone
        (``452 4.2.2`` over quota, ``452 4.3.1`` disk full, ``451 4.3.0``
        otherwise); elsewhere the message is stored everywhere or nowhere
        (an SMTP client has one reply for all recipients)."""
        if self.per_recipient and session.lmtp:
            return await self._deliver_each(session, envelope)
        targets = self.targets(envelope)
        if not targets:
            return None
        if self.per_recipient:
            groups = {
                target: [envelope.recipients[i].canonical for i in idx]
                for target, idx in self.recipients_by_maildir(envelope).items()
            }
        else:
            skip = set(getattr(envelope, "refused", {})) | getattr(envelope, "removed", set())
            groups = {
                self.path: [
                    r.canonical
                    for i, r in enumerate(envelope_recipients(envelope))
                    if i not in skip
                ]
            }
        return await self._deliver_to(
            session, envelope, targets, self.leads(envelope.mail_from, groups)
        )

    @hookimpl
    async def bonzo_quarantine(
        self, session: Session, envelope: Envelope, reason: str
    ) -> Accept | None:
        """With a ``quarantine`` maildir: store the message there, durably,
        with an ``X-Bonzo-Quarantine:`` header giving the reason and
        ``X-Bonzo-Quarantine-Recipients:`` its recipients."""
        if self.quarantine is None:
            return None
        add_quarantine_headers(envelope, reason)
        leads = self.leads(envelope.mail_from, {self.quarantine: []})
        return await self._deliver_to(session, envelope, [self.quarantine], leads)

    async def _deliver_to(
        self,
        session: Session,
        envelope: Envelope,
        targets: list[Path],
        leads: Mapping[Path, bytes] | None = None,
    ) -> Accept | None:
        loop = asyncio.get_running_loop()
        abort = _Abort()

        def run() -> None:
            abort.settle(self.deliver(envelope, targets, abort, leads))

        try:
            await loop.run_in_executor(None, run)
        except asyncio.CancelledError:
            self._cancelled(session, envelope, abort)
            raise
        except OSError as exc:
            where = _where(exc, targets[0] if len(targets) == 1 else self.path)
            log.error(
                "[%s %s] maildir: message %s not delivered, %s: %s",
                session.id,
                session.remote_ip,
                envelope.id,
                where,
                exc.strerror or type(exc).__name__,
            )
            if exc.errno in NO_SPACE:
                raise TransientError("Insufficient system storage", 452, "4.3.1") from None
            raise TransientError("Local error in processing", 451, "4.3.0") from None
        return Accept(f"Ok: queued as {envelope.id}")

    async def _deliver_each(self, session: Session, envelope: Envelope) -> Accept | None:
        groups = self.recipients_by_maildir(envelope)
        if not groups:
            return None
        leads = self.leads(
            envelope.mail_from,
            {m: [envelope.recipients[i].canonical for i in idx] for m, idx in groups.items()},
        )
        loop = asyncio.get_running_loop()
        abort = _Abort()

        def run() -> dict[Path, OSError]:
            stored: list[Path] = []
            failed = self.deliver_each(envelope, list(groups), abort, leads, stored)
            abort.settle(stored)
            return failed

        try:
            failed = await loop.run_in_executor(None, run)
        except asyncio.CancelledError:
            self._cancelled(session, envelope, abort)
            raise
        for maildir, exc in failed.items():
            log.error(
                "[%s %s] maildir: message %s not delivered to %s: %s",
                session.id,
                session.remote_ip,
                envelope.id,
                _where(exc, maildir),
                exc.strerror or type(exc).__name__,
            )
            if exc.errno == getattr(errno, "EDQUOT", None):
                error = TransientError("Mailbox full", 452, "4.2.2")
            elif exc.errno in NO_SPACE:
                error = TransientError("Insufficient system storage", 452, "4.3.1")
            else:
                error = TransientError("Local error in processing", 451, "4.3.0")
            for i in groups[maildir]:
                envelope.refuse_recipient(i, error)
        return Accept(f"Ok: queued as {envelope.id}")

    def _cancelled(self, session: Session, envelope: Envelope, abort: _Abort) -> None:
        """The hook timed out (the client gets ``451``) while the thread runs
        on: it removes what it writes from now on, and what it had stored
        already is removed here, so that the client's retry makes no
        duplicate."""
        stored = abort.cancel()
        removed = _unlink_all(stored)
        if removed < len(stored):
            log.warning(
                "[%s %s] maildir: delivery of message %s timed out after %d of its files "
                "were taken from new/ by a reader: the client, answered 451, may send a "
                "duplicate",
                session.id,
                session.remote_ip,
                envelope.id,
                len(stored) - removed,
            )
        else:
            log.warning(
                "[%s %s] maildir: delivery of message %s cancelled (timed out); its "
                "files are removed",
                session.id,
                session.remote_ip,
                envelope.id,
            )

    def deliver_each(
        self,
        envelope: Envelope,
        targets: list[Path],
        abort: threading.Event | None = None,
        leads: Mapping[Path, bytes] | None = None,
        stored: list[Path] | None = None,
    ) -> dict[Path, OSError]:
        """Blocking: store the message in each of ``targets`` on its own;
        return the maildirs that failed, with their errors (the new files
        are added to ``stored`` if given). If ``abort`` is set before the
        end, every file written is removed and :class:`DeliveryAborted` is
        raised."""
        failed: dict[Path, OSError] = {}
        done: list[Path] = stored if stored is not None else []
        try:
            for maildir in targets:
                try:
                    done += self.deliver(envelope, [maildir], abort, leads)
                except DeliveryAborted:
                    raise
                except OSError as exc:
                    failed[maildir] = exc
        except BaseException:
            for path in done:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise
        return failed

    def deliver(
        self,
        envelope: Envelope,
        targets: list[Path],
        abort: threading.Event | None = None,
        leads: Mapping[Path, bytes] | None = None,
    ) -> list[Path]:
        """Blocking: store the message in each of ``targets`` (each copy
        after its lines of ``leads``, the envelope headers) and return the
        paths of the new files. On any error, or if ``abort`` is set before
        the end, nothing is left behind: the files written so far are
        removed, and the error (:class:`DeliveryAborted`) is raised."""

        def checkpoint() -> None:
            if abort is not None and abort.is_set():
                raise DeliveryAborted("delivery cancelled")

        size = len(envelope.header_bytes) + envelope.size
        leads = leads or {}
        moves: list[tuple[Path, Path]] = []
        done: list[Path] = []
        try:
            # Copies with the same envelope headers share one file (hard links).
            written: dict[bytes, Path] = {}
            for maildir in targets:
                lead = leads.get(maildir, b"")
                name = self._unique_name(size + len(lead))
                tmp, new = maildir / "tmp" / name, maildir / "new" / name
                first = written.get(lead)
                if first is not None and self._link(maildir, first, tmp):
                    moves.append((tmp, new))
                    continue
                fd = self._create(maildir, tmp)
                moves.append((tmp, new))
                self._write(fd, envelope, lead)
                written.setdefault(lead, tmp)
                checkpoint()
            for tmp, new in moves:
                try:
                    os.rename(tmp, new)
                except FileNotFoundError:
                    # new/ is gone (a crash or a hand while it was made, or
                    # removed since): made again, as tmp/ would be.
                    if not self.create or not tmp.exists():
                        raise
                    self._ensure_maildir(new.parent.parent)
                    os.rename(tmp, new)
                done.append(new)
            for new_dir in dict.fromkeys(new.parent for new in done):
                fsync_dir(new_dir)
            checkpoint()
        except BaseException as exc:
            if isinstance(exc, OSError) and exc.filename is None and moves:
                # A write error names no file: the log names the mailbox.
                exc.filename = str(moves[-1][0])
            _unlink_all([tmp for tmp, _ in moves] + done)
            raise
        return done

    def _unique_name(self, size: int) -> str:
        with self._lock:
            n = next(self._counter)
        now = time.time()
        sec, usec = int(now), int((now % 1) * 1_000_000)
        return f"{sec}.M{usec}P{os.getpid()}Q{n}.{self._host},S={size}"

    def _create(self, maildir: Path, tmp: Path) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(tmp, flags, self.mode)
        except FileNotFoundError:
            if not self.create:
                raise
            self._ensure_maildir(maildir)
            fd = os.open(tmp, flags, self.mode)
        try:
            os.fchmod(fd, self.mode)  # exactly the configured mode, whatever the umask
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _write(fd: int, envelope: Envelope, lead: bytes = b"") -> None:
        with os.fdopen(fd, "wb") as f:
            f.write(lead)
            envelope.write_to(f)
            f.flush()
            os.fsync(f.fileno())

    def _link(self, maildir: Path, source: Path, tmp: Path) -> bool:
        """Hard-link an already durable copy into ``tmp``; False if the
        filesystem won't (another device, no hard links), so a copy is written."""
        for attempt in (1, 2):
            try:
                os.link(source, tmp)
                return True
            except FileNotFoundError:
                if attempt == 2 or not self.create:
                    return False
                self._ensure_maildir(maildir)
            except OSError as exc:
                if exc.errno in NO_SPACE:
                    raise
                return False
        return False  # pragma: no cover - the loop always returns

    def _ensure_maildir(self, maildir: Path) -> None:
        self._makedirs(maildir)
        created = False
        for sub in SUBDIRS:
            created |= self._mkdir(maildir / sub)
        if created:
            fsync_dir(maildir)

    def _makedirs(self, target: Path) -> None:
        """Create ``target`` and its missing parents, each made durable."""
        missing = []
        current = target
        while not current.is_dir() and current != current.parent:
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            if self._mkdir(path):
                fsync_dir(path.parent)

    def _mkdir(self, path: Path) -> bool:
        try:
            os.mkdir(path, self.dir_mode)
        except FileExistsError:
            if not path.is_dir():
                raise
            return False
        os.chmod(path, self.dir_mode)
        return True

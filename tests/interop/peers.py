"""What the real-peer fixtures share: where a peer sends its mail, how mail
is injected into it, and what its log says became of each recipient.

A *peer* is a real mail server (Postfix, Exim) run privately by a test: its
own configuration, queue and log in a temporary directory, listening on
127.0.0.1 only, started and stopped by the test, never a system service.
Tests inject mail into the peer's own SMTP port (:meth:`Peer.send`), the peer
passes it on along its :data:`Route` (to Bonzo, by SMTP or LMTP), and
:meth:`Peer.wait` reads the peer's log until every recipient has a status::

    submission = peer.send("alice@postfix.test", ["bob@example.com"], message)
    outcome = peer.wait(submission)
    assert outcome["bob@example.com"].status == "sent"
    assert outcome["bob@example.com"].code == 250

Every wait is bounded; every process a peer starts is ended when it stops.
"""

from __future__ import annotations

import abc
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import pytest
from ports import free_port

HOST = "127.0.0.1"
#: Default bound, in seconds, for every wait of a peer (start, stop, delivery).
DEADLINE = 20.0
#: Set to ``1`` to make a missing peer a test failure instead of a skip (CI does).
REQUIRED_VARIABLE = "BONZO_INTEROP_REQUIRED"
#: Set to ``1`` to keep each peer's directory after the test (its path is logged).
KEEP_VARIABLE = "BONZO_INTEROP_KEEP"
#: Starts of a peer on a new port when another process took its port first.
PORT_ATTEMPTS = 3
#: The checkout's root (Exim's unpacked package lives under ``.ci/cache/``).
ROOT = Path(__file__).resolve().parents[2]

Status = Literal["sent", "deferred", "bounced"]
#: Statuses after which the peer no longer tries to deliver to the recipient.
FINAL: frozenset[str] = frozenset({"sent", "bounced"})


class PeerError(Exception):
    """A peer failed to start, to stop or to take a message (the message
    carries the end of its log)."""


class PortTaken(PeerError):
    """Another process listens on the port chosen for the peer."""


def unavailable(reason: str) -> NoReturn:
    """Skip the test because a peer cannot run here, or fail it when
    ``BONZO_INTEROP_REQUIRED=1`` (CI, where the peers must be installed)."""
    if os.environ.get(REQUIRED_VARIABLE) == "1":
        pytest.fail(f"{reason} ({REQUIRED_VARIABLE}=1)", pytrace=False)
    pytest.skip(reason)


def wait_until(
    predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition"
) -> Any:
    """Poll ``predicate`` every 50 ms until it returns something true; return
    that. :class:`TimeoutError` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def processes_with(argument: str) -> list[int]:
    """Ids of the running processes with ``argument`` on their command line
    (a peer's own configuration path names its processes and no others)."""
    wanted = argument.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                arguments = cmdline.read().split(b"\0")
        except OSError:
            continue
        if wanted in arguments and alive(int(entry)):
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # "pid (name) S ...": the state follows the last ")".
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, IndexError):
        return False


# ------------------------------------------------------------------ routes
@dataclass(frozen=True)
class SMTPRoute:
    """Relay everything by SMTP to one server (Postfix's ``relayhost``,
    Exim's ``manualroute`` router).

    :arg port: the server's port on :attr:`host`.
    :arg tls: require STARTTLS (Postfix ``smtp_tls_security_level =
        encrypt``, Exim ``hosts_require_tls``); the certificate is not
        verified. A server that offers no STARTTLS makes the peer defer.
    :arg implicit_tls: TLS from the first byte instead (port 465 style).
    :arg username: with :attr:`password`: authenticate (AUTH PLAIN) before
        MAIL, where the server offers AUTH.
    """

    port: int
    host: str = HOST
    tls: bool = False
    implicit_tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password, or neither")


@dataclass(frozen=True)
class LMTPRoute:
    """Deliver everything by LMTP (RFC 2033), over TCP (``port``) or a Unix
    socket (``path``): exactly one of the two."""

    port: int | None = None
    host: str = HOST
    path: str | None = None

    def __post_init__(self) -> None:
        if (self.port is None) == (self.path is None):
            raise ValueError("give port or path, not both")


Route = SMTPRoute | LMTPRoute


# ---------------------------------------------------------------- outcomes
@dataclass(frozen=True)
class Submission:
    """A message the peer took (its ``250`` to DATA)."""

    queue_id: str
    """The peer's id for the message, as in its reply and its log."""
    sender: str
    recipients: tuple[str, ...]
    reply: str
    """The peer's whole reply to the end of DATA."""


@dataclass(frozen=True)
class Delivery:
    """One delivery attempt for one recipient, as the peer logged it."""

    queue_id: str
    recipient: str
    status: Status
    """``sent``, ``deferred`` (will be tried again) or ``bounced`` (given up;
    the sender gets a DSN)."""
    reply: str
    """The remote server's reply (``"550 5.1.1 no such user"``), or the
    peer's own reason when there was none (``"Connection refused"``)."""
    code: int | None = None
    """The remote server's reply code, when the reason is one of its replies."""
    dsn: str | None = None
    """The enhanced status code: the peer's ``dsn=`` (Postfix) or the one in
    the remote reply (Exim)."""
    stage: str | None = None
    """What the remote reply answered: ``MAIL``, ``RCPT``, ``DATA``,
    ``BDAT``, ``end of data``, ``AUTH``... (``None`` if the peer did not say)."""
    relay: str | None = None
    """The host the peer delivered to, as logged."""
    line: str = field(default="", repr=False)
    """The log line this was read from."""


_REPLY_CODE = re.compile(r"^([2-5]\d\d)[ -](?:([2-5]\.\d{1,3}\.\d{1,3}) )?")


def reply_code(reply: str) -> tuple[int | None, str | None]:
    """The basic and enhanced status codes at the start of a server reply."""
    match = _REPLY_CODE.match(reply)
    if match is None:
        return None, None
    return int(match.group(1)), match.group(2)


def stage_of(command: str) -> str:
    """A short, peer-independent name for the command a reply answered
    (``"RCPT TO:<a@b>"`` and ``"RCPT TO"`` are both ``RCPT``)."""
    text = command.strip()
    if "end of data" in text.lower():
        return "end of data"
    word = text.split(None, 1)[0].upper() if text else ""
    return word.split(":", 1)[0]


# -------------------------------------------------------------------- peer
class Peer(abc.ABC):
    """A private mail server: a directory, a process and a log.

    Subclasses say how to configure, start and stop it, and how to read a
    status line of its log (:meth:`parse_line`). Use it as a context manager
    or call :meth:`start` and :meth:`stop`; the ``postfix``/``exim`` fixtures
    of ``tests/interop/conftest.py`` do that for a test.
    """

    #: Short name for messages and report sections.
    name = "peer"
    #: Pattern of the queue id in the peer's ``250`` reply to DATA.
    queued_pattern: re.Pattern[str]

    def __init__(self, route: Route | None, hostname: str, keep: bool | None = None) -> None:
        self.route = route
        #: The peer's own host name (its HELO, its Received header, and the
        #: local domain whose mail it discards).
        self.hostname = hostname
        #: The port of the peer's own SMTP server on 127.0.0.1 (for :meth:`send`).
        self.port = free_port()
        # Part of the greeting, so start() knows it reached this instance
        # and not whatever else took the port meanwhile.
        self.token = secrets.token_hex(6)
        self.keep = os.environ.get(KEEP_VARIABLE) == "1" if keep is None else keep
        # Not under pytest's 0700 temporary directories: the peer's own users
        # (postfix, Debian-exim) must reach it.
        self.directory = Path(tempfile.mkdtemp(prefix=f"bonzo-{self.name}-"))
        self.directory.chmod(0o755)
        self.proc: subprocess.Popen[bytes] | None = None
        self._output: Any = None

    # ----------------------------------------------------------- to define
    @property
    @abc.abstractmethod
    def log_path(self) -> Path:
        """The peer's log file (Postfix ``maillog_file``, Exim mainlog)."""

    @abc.abstractmethod
    def configure(self) -> None:
        """Write the configuration into :attr:`directory`."""

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The command that runs the peer in the foreground."""

    @abc.abstractmethod
    def shutdown(self, timeout: float) -> None:
        """Ask the running peer to stop (the process is waited for after)."""

    @abc.abstractmethod
    def parse_line(self, line: str) -> Delivery | None:
        """The delivery status on one log line, or ``None``."""

    @abc.abstractmethod
    def flush(self, timeout: float = DEADLINE) -> None:
        """Try every queued message again now, ignoring retry times."""

    # -------------------------------------------------------------- life
    def __enter__(self) -> Peer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def output_path(self) -> Path:
        """Where the peer process's stdout and stderr go."""
        return self.directory / "output.txt"

    def start(self, timeout: float = DEADLINE) -> Peer:
        """Configure and run the peer; return once its SMTP port greets.

        :class:`PeerError` (with its log) if it exits or does not greet in
        time. When another process took the peer's port between choosing and
        binding it (test servers of other runs start in parallel), the peer
        is started again on a new port, at most :data:`PORT_ATTEMPTS` times.
        """
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.configure()
            self._output = open(self.output_path, "wb")  # noqa: SIM115 - closed by stop()
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,  # one process group to end at stop()
            )
            try:
                wait_until(self._greets, timeout, f"{self.name} to greet on port {self.port}")
            except PortTaken as exc:
                self._end_process(timeout)
                if attempt < PORT_ATTEMPTS:
                    self.port = free_port()
                    continue
                diagnosis = self.diagnosis()
                self.stop()
                raise PeerError(f"{self.name} did not start: {exc}\n{diagnosis}") from None
            except (TimeoutError, PeerError) as exc:
                diagnosis = self.diagnosis()
                self.stop()
                raise PeerError(f"{self.name} did not start: {exc}\n{diagnosis}") from None
            self.started()
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def started(self) -> None:  # noqa: B027 - an optional hook
        """Called once the peer greets (to note process ids, say)."""

    def leftover_groups(self) -> list[int]:
        """Process groups of this peer outside the main process's own, to
        end at :meth:`stop` if they outlive it (daemons that call setsid)."""
        return []

    def _greets(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            if self._port_answers():
                raise PortTaken(f"port {self.port} was taken by another process")
            raise PeerError(f"exited with status {self.proc.returncode}")
        try:
            with socket.create_connection((HOST, self.port), timeout=2) as sock:
                sock.settimeout(2)
                greeting = sock.recv(512)
                sock.sendall(b"QUIT\r\n")
        except OSError:
            return False
        if self.token.encode() not in greeting:
            raise PortTaken(f"another server answers on port {self.port}: {greeting!r}")
        return True

    def _port_answers(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=2):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = DEADLINE) -> None:
        """Stop the peer, wait for it, end whatever of it is left, and remove
        its directory (unless kept). Safe to call twice, and on a peer that
        never started (to remove its directory)."""
        proc = self.proc
        try:
            self._end_process(timeout)
        finally:
            if self.keep and proc is not None:
                print(f"{self.name}: kept {self.directory}")
            elif not self.keep:
                shutil.rmtree(self.directory, ignore_errors=True)

    def _end_process(self, timeout: float) -> None:
        proc = self.proc
        try:
            if proc is not None:
                if proc.poll() is None:
                    try:
                        self.shutdown(timeout)
                        proc.wait(timeout)
                    except (subprocess.TimeoutExpired, PeerError):
                        pass
                # Children that outlived the main process (deliveries in
                # flight) are in its process group.
                for group in [proc.pid, *self.leftover_groups()]:
                    if group == os.getpgrp():
                        continue  # never the test's own
                    try:
                        os.killpg(group, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                proc.wait(timeout)
        finally:
            self.proc = None
            if self._output is not None:
                self._output.close()
                self._output = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------- logs
    def log(self) -> str:
        """The peer's whole log so far ("" before it wrote any)."""
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def diagnosis(self, lines: int = 200) -> str:
        """The end of the peer's log and of its output, for a failure report."""
        parts = []
        for title, path in (("log", self.log_path), ("output", self.output_path)):
            try:
                text = path.read_text("utf-8", "replace")
            except FileNotFoundError:
                continue
            tail = text.splitlines()[-lines:]
            if tail:
                parts.append(f"--- {self.name} {title} ({path}):\n" + "\n".join(tail))
        return "\n".join(parts) or f"--- {self.name}: no log"

    def deliveries(self, queue_id: str | None = None) -> list[Delivery]:
        """Every delivery status logged so far (of one message, if given),
        oldest first."""
        found = []
        for line in self.log().splitlines():
            delivery = self.parse_line(line)
            if delivery is not None and (queue_id is None or delivery.queue_id == queue_id):
                found.append(delivery)
        return found

    def wait(
        self,
        submission: Submission,
        recipients: Iterable[str] | None = None,
        *,
        final: bool = False,
        timeout: float = DEADLINE,
    ) -> dict[str, Delivery]:
        """Wait until each recipient of ``submission`` (or just
        ``recipients``) has a delivery status in the log; return the latest
        status of each, by recipient as given (addresses compare without
        regard to case).

        With ``final``, a ``deferred`` status is not enough: wait until the
        recipient is ``sent`` or ``bounced`` (after :meth:`flush`, say).
        :class:`AssertionError` with the message's log lines after ``timeout``.
        """
        wanted = list(submission.recipients if recipients is None else recipients)

        def latest() -> dict[str, Delivery] | None:
            by_address: dict[str, Delivery] = {}
            for delivery in self.deliveries(submission.queue_id):
                by_address[delivery.recipient.lower()] = delivery
            result = {}
            for address in wanted:
                found = by_address.get(address.lower())
                if found is None or (final and found.status not in FINAL):
                    return None
                result[address] = found
            return result

        what = f"{self.name} to deliver {submission.queue_id}"
        try:
            outcome: dict[str, Delivery] = wait_until(latest, timeout, what)
            return outcome
        except TimeoutError as exc:
            mine = [line for line in self.log().splitlines() if submission.queue_id in line]
            raise AssertionError(
                f"{exc}: {wanted}\n"
                + "\n".join(mine or ["(no log line names it)"])
                + "\n"
                + self.diagnosis(40)
            ) from None

    # ---------------------------------------------------------- injection
    def send(
        self,
        sender: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        mail_options: Sequence[str] = (),
        timeout: float = DEADLINE,
    ) -> Submission:
        """Inject one message into the peer's SMTP port and return its queue
        id. ``message`` must have CRLF line ends (smtplib adds the dot
        stuffing). :class:`PeerError` if the peer refuses anything."""
        with smtplib.SMTP(HOST, self.port, local_hostname="client.test", timeout=timeout) as smtp:
            code, text = smtp.ehlo()
            if code != 250:
                raise PeerError(f"{self.name} refused EHLO: {code} {text!r}")
            code, text = smtp.mail(sender, list(mail_options))
            if code != 250:
                raise PeerError(f"{self.name} refused MAIL FROM:<{sender}>: {code} {text!r}")
            for recipient in recipients:
                code, text = smtp.rcpt(recipient)
                if code not in (250, 251):
                    raise PeerError(f"{self.name} refused RCPT TO:<{recipient}>: {code} {text!r}")
            code, text = smtp.data(message)
        reply = text.decode("utf-8", "replace")
        match = self.queued_pattern.search(reply)
        if code != 250 or match is None:
            raise PeerError(f"{self.name} did not queue the message: {code} {reply!r}")
        return Submission(match.group(1), sender, tuple(recipients), f"{code} {reply}")

    def rcpt_reply(self, sender: str, recipient: str, timeout: float = DEADLINE) -> tuple[int, str]:
        """The peer's reply to ``RCPT TO:<recipient>`` (then RSET and QUIT):
        for testing a peer used as a downstream server."""
        with smtplib.SMTP(HOST, self.port, local_hostname="client.test", timeout=timeout) as smtp:
            smtp.ehlo()
            code, text = smtp.mail(sender)
            if code != 250:
                raise PeerError(f"{self.name} refused MAIL FROM:<{sender}>: {code} {text!r}")
            code, text = smtp.rcpt(recipient)
            smtp.rset()
        return code, text.decode("utf-8", "replace")

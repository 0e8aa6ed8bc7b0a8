"""A private Dovecot LMTP server for tests (``dovecot-lmtpd``).

:func:`dovecot_lmtp` writes a ``dovecot.conf`` into a temporary directory
(``base_dir``, ``state_dir``, logs, users and Maildirs all inside it),
starts ``dovecot -F`` on it with an LMTP listener on 127.0.0.1 and a Unix
socket, waits until it answers, and stops it at the end. Nothing is
installed or started system-wide; ``.ci/run`` installs the packages.

Users (a passwd-file, mail owned by ``nobody``): ``alice``, ``carol`` and
``postmaster`` with room to spare, and ``bob`` with a 1 KB quota and
``quota_full_tempfail`` (a message that does not fit gets
``452 4.2.2`` after the data). Unknown users get ``550 5.1.1`` at RCPT.
Messages are stored with CRLF line ends (``mail_save_crlf``), so a test
can compare the stored bytes with what it sent.

``dovecot_lmtp(proxy_to=port)`` makes it an LMTP *proxy* instead
(``lmtp_proxy``): every recipient is passed on by LMTP to 127.0.0.1:port,
a Bonzo under test then being Dovecot's LMTP server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ports import free_port as _free_port

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
HOST = "127.0.0.1"
USERS = {"alice": "", "bob": "userdb_quota_rule=*:storage=1K", "carol": "", "postmaster": ""}
DEADLINE = 20.0
#: Starts on a new port when another process took the chosen one first.
PORT_ATTEMPTS = 3


def available() -> bool:
    """True if Dovecot and its LMTP server are installed."""
    return os.path.exists(DOVECOT) and os.path.exists("/usr/lib/dovecot/lmtp")


@dataclass
class Dovecot:
    """A running private instance."""

    root: Path
    port: int
    socket_path: str
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""

    def messages(self, user: str) -> list[bytes]:
        """The files in ``user``'s ``new/`` Maildir folder, oldest first."""
        new = self.root / "mail" / user / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        return [p.read_bytes() for p in files]


def _config(root: Path, port: int, proxy_to: int | None = None) -> str:
    if proxy_to is not None:
        # Every user is proxied (static passdb with proxy=y): Dovecot is
        # then an LMTP client of 127.0.0.1:proxy_to.
        users = f"""\
lmtp_proxy = yes
passdb {{
  driver = static
  args = proxy=y host={HOST} port={proxy_to} protocol=lmtp nopassword=y
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={root}/mail/%u
}}
"""
    else:
        users = f"""\
auth_username_format = %Ln
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
"""
    return f"""\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
protocols = lmtp
listen = {HOST}
ssl = no
first_valid_uid = 1
mail_location = maildir:{root}/mail/%u
mail_save_crlf = yes
mail_plugins = quota
quota_full_tempfail = yes
lmtp_save_to_detail_mailbox = no
plugin {{
  quota = maildir:User quota
  quota_rule = *:storage=100M
}}
{users}service lmtp {{
  inet_listener lmtp {{
    address = {HOST}
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
"""


@contextmanager
def dovecot_lmtp(proxy_to: int | None = None) -> Iterator[Dovecot]:
    """Start a private Dovecot LMTP server (an LMTP proxy to
    127.0.0.1:``proxy_to`` if given); stop it and remove its files at the end."""
    # A short path: Dovecot's socket paths must stay under ~100 characters.
    root = Path(tempfile.mkdtemp(prefix="dv", dir="/tmp"))
    process = None
    try:
        os.chmod(root, 0o755)  # reachable by the dovecot and mail users
        for sub in ("run", "state"):
            (root / sub).mkdir()
        mail = root / "mail"
        mail.mkdir()
        os.chmod(mail, 0o1777)  # Maildirs are created as the mail user
        nobody = 65534
        (root / "users").write_text(
            "".join(
                f"{user}:{{PLAIN}}unused:{nobody}:{nobody}::{mail}/{user}::{extra}\n"
                for user, extra in USERS.items()
            )
        )
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = _free_port()
            (root / "dovecot.conf").write_text(_config(root, port, proxy_to))
            process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(root / "dovecot.conf")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            instance = Dovecot(root, port, str(root / "run" / "lmtp"), process)
            try:
                _wait_ready(instance)
                break
            except RuntimeError:
                # Another process (a test server of a parallel run) took the
                # port between choosing it and Dovecot binding it: a new one.
                _stop(process)
                process = None
                if attempt < PORT_ATTEMPTS and "Address already in use" in instance.log:
                    continue
                raise
        yield instance
    finally:
        if process is not None:
            _stop(process)
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(instance: Dovecot) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        if instance.process.poll() is not None:
            raise RuntimeError(f"dovecot exited ({instance.process.returncode}):\n{instance.log}")
        try:
            with socket.create_connection((HOST, instance.port), timeout=2) as s:
                if s.recv(512).startswith(b"220 ") and os.path.exists(instance.socket_path):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"dovecot did not start:\n{instance.log}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # the master stops its children on SIGTERM
        try:
            process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(DEADLINE)

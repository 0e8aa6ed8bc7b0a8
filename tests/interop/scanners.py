"""Private instances of the daemons the scanner plugins talk to (clamd,
rspamd, spamd, postgrey): each in a temporary directory with its own
configuration, listening on 127.0.0.1 only, started and stopped by the test
(never a system service), without network access.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .peers import free_port

#: The EICAR anti-virus test file (eicar.org): every scanner detects it.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
#: The name of the one signature of the private clamd's database.
EICAR_SIGNATURE = "Bonzo-Test-EICAR"
DEADLINE = 30.0
#: rspamd loads its whole configuration and Lua modules before it listens.
RSPAMD_DEADLINE = 120.0


def program(name: str) -> str | None:
    """The path of ``name`` on PATH or in /usr/sbin, or ``None``."""
    found = shutil.which(name)
    if found:
        return found
    path = f"/usr/sbin/{name}"
    return path if os.access(path, os.X_OK) else None


@dataclass
class Daemon:
    """A running daemon: its process, directory, port and log file."""

    process: subprocess.Popen[bytes]
    root: Path
    port: int
    log: Path

    def diagnosis(self) -> str:
        try:
            return self.log.read_text("utf-8", "replace")[-4000:]
        except OSError:
            return "(no log)"


def _wait_port(
    daemon: Daemon, probe: bytes | None, expect: bytes, what: str, limit: float = DEADLINE
) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise RuntimeError(f"{what} exited ({daemon.process.returncode}): {daemon.diagnosis()}")
        try:
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=2) as s:
                if probe is None:
                    return
                s.sendall(probe)
                if expect in s.recv(1024):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start in {limit:g}s: {daemon.diagnosis()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextmanager
def _directory(prefix: str) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    # The daemons may switch to their own user: the directory must be theirs
    # to reach (mkdtemp makes it 0700).
    root.chmod(0o755)
    try:
        yield root
    finally:
        if os.environ.get("BONZO_INTEROP_KEEP") == "1":
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _run(argv: Sequence[str], root: Path, port: int, log: Path) -> Iterator[Daemon]:
    with open(root / "stdout.log", "wb") as out:
        process = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=root
        )
    daemon = Daemon(process, root, port, log)
    try:
        yield daemon
    finally:
        _stop(process)


# ------------------------------------------------------------------- clamd
def clamd_available() -> bool:
    return program("clamd") is not None


@contextmanager
def clamd(stream_max_length: str = "1M") -> Iterator[Daemon]:
    """clamd with one signature (the EICAR test string, anywhere in any
    file), so no downloaded database is needed (no freshclam)."""
    binary = program("clamd")
    assert binary is not None
    with _directory("bonzo-clamd-") as root:
        (root / "db").mkdir()
        (root / "db" / "bonzo.ndb").write_text(f"{EICAR_SIGNATURE}:0:*:{EICAR.hex()}\n")
        port = free_port()
        log = root / "clamd.log"
        (root / "clamd.conf").write_text(
            "\n".join(
                [
                    "Foreground yes",
                    f"TCPSocket {port}",
                    "TCPAddr 127.0.0.1",
                    f"LocalSocket {root}/clamd.ctl",
                    f"DatabaseDirectory {root}/db",
                    f"LogFile {log}",
                    f"PidFile {root}/clamd.pid",
                    f"TemporaryDirectory {root}",
                    f"StreamMaxLength {stream_max_length}",
                    "SelfCheck 0",
                    "",
                ]
            )
        )
        argv = [binary, "--foreground", "-c", str(root / "clamd.conf")]
        with _run(argv, root, port, root / "stdout.log") as daemon:
            _wait_port(daemon, b"zPING\0", b"PONG", "clamd")
            yield daemon


# ------------------------------------------------------------------ rspamd
def rspamd_available() -> bool:
    return program("rspamd") is not None and Path("/etc/rspamd/rspamd.conf").exists()


#: rspamd's modules that would reach out (DNS lists, fuzzy storage, remote
#: maps) or need Redis: off, so a private instance works offline.
RSPAMD_OFF = (
    "asn",
    "dcc",
    "fuzzy_check",
    "greylist",
    "neural",
    "phishing",
    "ratelimit",
    "rbl",
    "replies",
    "url_reputation",
)


@contextmanager
def rspamd(nameserver: str) -> Iterator[Daemon]:
    """rspamd's packaged configuration with the local overrides a private
    instance needs: its normal worker (``/checkv2``) on a free port of
    127.0.0.1, the controller on another, no proxy, every DNS question to
    ``nameserver`` (``"127.0.0.1:PORT"``, a stub: nothing leaves the
    machine), modules that reach out turned off, the test patterns (GTUBE
    variants) on, and ``milter_headers`` adding ``X-Spam-Status``."""
    binary = program("rspamd")
    assert binary is not None
    with _directory("bonzo-rspamd-") as root:
        conf = root / "conf"
        for sub in ("local.d", "override.d", "db", "run", "log"):
            (conf / sub if sub.endswith(".d") else root / sub).mkdir(parents=True)
        port, controller = free_port(), free_port()
        override = conf / "override.d"
        (override / "worker-normal.inc").write_text(
            f'bind_socket = "127.0.0.1:{port}";\ncount = 1;\n'
        )
        (override / "worker-controller.inc").write_text(
            f'bind_socket = "127.0.0.1:{controller}";\ncount = 1;\n'
        )
        (override / "worker-proxy.inc").write_text(
            f'enabled = false;\nbind_socket = "127.0.0.1:{free_port()}";\n'
        )
        (override / "options.inc").write_text(
            "enable_test_patterns = true;\ndisable_monitoring = true;\n"
            f'dns {{\n  nameserver = ["{nameserver}"];\n  timeout = 0.5s;\n  retransmits = 1;\n}}\n'
        )
        log = root / "log" / "rspamd.log"
        (override / "logging.inc").write_text(
            f'type = "file";\nfilename = "{log}";\nlevel = "info";\n'
        )
        for module in RSPAMD_OFF:
            (override / f"{module}.conf").write_text("enabled = false;\n")
        (conf / "local.d" / "milter_headers.conf").write_text(
            'use = ["x-spam-status"];\nskip_local = false;\nskip_authenticated = false;\n'
        )
        argv = [binary, "-f", "-c", "/etc/rspamd/rspamd.conf"]
        for name, path in [
            ("LOCAL_CONFDIR", conf),
            ("DBDIR", root / "db"),
            ("RUNDIR", root / "run"),
            ("LOGDIR", root / "log"),
        ]:
            argv += ["--var", f"{name}={path}"]
        if os.geteuid() == 0:
            # rspamd will not run its workers as root: its own user.
            for path in [root, *root.rglob("*")]:
                shutil.chown(path, "_rspamd", "_rspamd")
            argv += ["-u", "_rspamd", "-g", "_rspamd"]
        with _run(argv, root, port, log) as daemon:
            # 10 to 20 seconds on an idle machine of two cores; more when
            # the rest of the suite runs beside it.
            _wait_port(daemon, b"GET /ping HTTP/1.0\r\n\r\n", b"pong", "rspamd", RSPAMD_DEADLINE)
            yield daemon


# ------------------------------------------------------------------- spamd
def spamd_available() -> bool:
    return program("spamd") is not None


#: SpamAssassin's GTUBE test string: scores 1000.
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@contextmanager
def spamd() -> Iterator[Daemon]:
    """spamd on a free port of 127.0.0.1 with local tests only (``--local``:
    no DNS or network tests), no per-user configuration, its home (Bayes,
    caches) and log in the temporary directory, one child."""
    binary = program("spamd")
    assert binary is not None
    with _directory("bonzo-spamd-") as root:
        home = root / "home"
        home.mkdir()
        home.chmod(0o777)  # spamd's user (nobody, when run as root) writes here
        port = free_port()
        log = root / "spamd.log"
        argv = [
            binary,
            "--local",
            f"--listen=127.0.0.1:{port}",
            "--allowed-ips=127.0.0.1",
            "--max-children=1",
            "--nouser-config",
            f"--helper-home-dir={home}",
            f"--pidfile={root}/spamd.pid",
            f"--syslog={log}",
        ]
        if os.geteuid() == 0:
            argv.append("--username=nobody")
        with _run(argv, root, port, log) as daemon:
            _wait_port(daemon, b"PING SPAMC/1.5\r\n\r\n", b"PONG", "spamd")
            yield daemon


# ---------------------------------------------------------------- postgrey
def postgrey_available() -> bool:
    return program("postgrey") is not None


@contextmanager
def postgrey(delay: int = 2) -> Iterator[Daemon]:
    """postgrey on a free port of 127.0.0.1 with its database in the
    temporary directory (a fresh one: it remembers every triplet), no
    whitelists, no auto-whitelisting, and a greylisting ``delay`` of a few
    seconds."""
    binary = program("postgrey")
    assert binary is not None
    with _directory("bonzo-postgrey-") as root:
        db = root / "db"
        db.mkdir()
        empty = root / "whitelist"
        empty.write_text("")
        port = free_port()
        argv = [
            binary,
            f"--inet=127.0.0.1:{port}",
            f"--dbdir={db}",
            f"--delay={delay}",
            f"--whitelist-clients={empty}",
            f"--whitelist-recipients={empty}",
            "--auto-whitelist-clients=0",
            "--hostname=postgrey.test",
        ]
        if os.geteuid() == 0:
            # It switches to its own user, which must own the database.
            shutil.chown(db, "postgrey", "postgrey")
        with _run(argv, root, port, root / "stdout.log") as daemon:
            _wait_port(daemon, None, b"", "postgrey")
            yield daemon

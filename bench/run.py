#!/usr/bin/env python3
"""Bonzo's benchmark: Bonzo against its peers (aiosmtpd, a bare Tornado sink,
Haraka, nodemailer's smtp-server and Postfix's smtp-sink), side by side.

    python bench/run.py            # full run, 3 interleaved repetitions (about 15 min)
    python bench/run.py --quick    # smoke run: tiny counts, each scenario once (< 60 s)
    python bench/run.py --list     # the servers and scenarios, and which can run here

Every server listens on 127.0.0.1 only and is started and stopped by this
script, fresh for every measurement. Load comes from Postfix's ``smtp-source``
(scenarios a-c) or from small Python clients here (d, e). The report is a
Markdown table on stdout; the raw numbers go to ``bench/results/*.json``.
See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
HOST = "127.0.0.1"  # all benchmark traffic stays on the loopback interface
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

SENDER = "bench@example.com"
RECIPIENT = "sink@example.com"
HELO_NAME = "bench.example"
MIB = 1024 * 1024


def find_tool(name: str) -> str | None:
    """Postfix installs its test tools in /usr/sbin, which may not be on PATH."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


# --------------------------------------------------------------------------- servers


@dataclasses.dataclass
class ServerSpec:
    """How to run one benchmark target.

    :arg command: given the port and a scratch directory (for configs, spools,
        logs), returns the argv that starts the server in the foreground on
        ``HOST:port``. The process it starts (and its descendants, for servers
        that fork workers) is what CPU and memory are read from.
    :arg available: returns ``None`` if the server can run here, else the reason.
    :arg relay: a relay (the relay scenarios): the harness starts a downstream
        smtp-sink first and ``command`` gets its port as a third argument.
    """

    name: str
    description: str
    command: Callable[..., list[str]]
    available: Callable[[], str | None] = lambda: None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    ready_timeout: float = 20.0
    relay: bool = False


# Limits raised for every Bonzo target, so that it measures speed rather than
# refusing the load: smtp-source -d sends thousands of messages on one
# connection, scenario d opens 2,000 connections from one address and
# scenario e sends 100 MiB. aiosmtpd and smtp-sink have no such limits (the
# aiosmtpd sink gets the same size limit).
BONZO_BENCH_SETTINGS = {
    "max_messages_per_connection": 1_000_000,
    "max_connections": 10_000,
    "max_connections_per_ip": 10_000,
    "max_message_size": 200 * MIB,
}


def _python_env() -> dict[str, str]:
    # Import Bonzo from this checkout, never from an installed copy.
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _bonzo_sink_command(port: int, scratch: Path) -> list[str]:
    argv = [sys.executable, str(BENCH / "servers" / "bonzo_sink.py"), "--port", str(port)]
    settings = dict(BONZO_BENCH_SETTINGS, spool_dir=str(scratch))
    for name, value in settings.items():
        argv += ["--set", f"{name}={value}"]
    return argv


def _aiosmtpd_command(port: int, scratch: Path) -> list[str]:
    return [
        sys.executable,
        str(BENCH / "servers" / "aiosmtpd_sink.py"),
        "--port",
        str(port),
        "--data-size-limit",
        str(BONZO_BENCH_SETTINGS["max_message_size"]),
    ]


def _aiosmtpd_available() -> str | None:
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        return "aiosmtpd is not installed (pip install aiosmtpd, or run bench/install.sh)"
    return None


def _smtp_sink_command(port: int, scratch: Path) -> list[str]:
    argv = [find_tool("smtp-sink") or "smtp-sink"]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]  # required when run as root
    # -m: handle up to 10,000 connections at once (default 256) for scenario d.
    return argv + ["-m", "10000", f"{HOST}:{port}", "1024"]


def _smtp_sink_available() -> str | None:
    return None if find_tool("smtp-sink") else "smtp-sink not found (run bench/install.sh)"


def _tornado_sink_command(port: int, scratch: Path) -> list[str]:
    return [
        sys.executable,
        str(BENCH / "servers" / "tornado_sink.py"),
        "--port",
        str(port),
        "--max-message-size",
        str(BONZO_BENCH_SETTINGS["max_message_size"]),
    ]


# The Node.js peers: Haraka and nodemailer's smtp-server, pinned in
# bench/package.json and bench/package-lock.json and installed by
# bench/install.sh (npm ci) into bench/node_modules, which git ignores.
NODE_MODULES = BENCH / "node_modules"
NODE_MIN_MAJOR = 20  # Haraka 3.3 and smtp-server 3.21 need Node.js >= 20
INSTALL = "run bash bench/install.sh"


def find_node() -> str | None:
    return shutil.which("node") or shutil.which("nodejs")


_NODE_VERSION: dict[str, str | None] = {}


def node_version() -> str | None:
    """``node --version`` without the ``v`` (e.g. "20.20.2"), or None."""
    if "node" not in _NODE_VERSION:
        node = find_node()
        version = None
        if node:
            try:
                done = subprocess.run([node, "--version"], capture_output=True, timeout=20)
                if done.returncode == 0:
                    version = done.stdout.decode().strip().lstrip("v")
            except (OSError, subprocess.TimeoutExpired):
                pass
        _NODE_VERSION["node"] = version
    return _NODE_VERSION["node"]


def npm_package_version(package: str) -> str | None:
    """The version of ``package`` installed in bench/node_modules, or None."""
    try:
        return str(json.loads((NODE_MODULES / package / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def npm_package_pin(package: str) -> str | None:
    """The version bench/package.json pins ``package`` to."""
    try:
        return str(json.loads((BENCH / "package.json").read_text())["dependencies"][package])
    except (OSError, ValueError, KeyError):
        return None


def _node_package_available(package: str) -> Callable[[], str | None]:
    def available() -> str | None:
        if find_node() is None:
            return f"node not found: install Node.js >= {NODE_MIN_MAJOR}, then {INSTALL}"
        version = node_version()
        try:
            major = int((version or "").split(".")[0])
        except ValueError:
            return "`node --version` failed: Node.js is not working here"
        if major < NODE_MIN_MAJOR:
            return f"node {version} is too old: {package} needs Node.js >= {NODE_MIN_MAJOR}"
        installed = npm_package_version(package)
        if installed is None:
            return f"missing: {INSTALL} ({package} is not in bench/node_modules)"
        pin = npm_package_pin(package)
        if pin is not None and installed != pin:
            return f"outdated: {INSTALL} ({package} {installed} installed, {pin} pinned)"
        return None

    return available


def _haraka_command(port: int, scratch: Path) -> list[str]:
    """A Haraka install directory in the scratch directory, from the template
    in bench/servers/haraka/ (see its config/ files for what each does)."""
    root = scratch / "haraka"
    shutil.copytree(BENCH / "servers" / "haraka", root)
    smtp_ini = root / "config" / "smtp.ini"
    text, count = re.subn(r"(?m)^listen=.*$", f"listen={HOST}:{port}", smtp_ini.read_text())
    if count != 1:
        raise RuntimeError("bench/servers/haraka/config/smtp.ini: expected one `listen=` line")
    smtp_ini.write_text(text)
    connection_ini = root / "config" / "connection.ini"
    spool = scratch / "haraka-spool"
    spool.mkdir()
    text, count = re.subn(r"(?m)^spool_dir=.*$", f"spool_dir={spool}", connection_ini.read_text())
    if count != 1:
        raise RuntimeError("bench/servers/haraka/config/connection.ini: expected one `spool_dir=`")
    connection_ini.write_text(text)
    haraka = NODE_MODULES / "Haraka" / "bin" / "haraka"
    return [find_node() or "node", str(haraka), "-c", str(root)]


def _smtp_server_command(port: int, scratch: Path) -> list[str]:
    return [
        find_node() or "node",
        str(BENCH / "servers" / "smtp_server_sink.js"),
        "--port",
        str(port),
        "--size",
        str(BONZO_BENCH_SETTINGS["max_message_size"]),
    ]


SERVER_SPECS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in [
        ServerSpec(
            "bonzo",
            "bonzo.server.SMTPServer + one discarding plugin (bench/servers/bonzo_sink.py)",
            _bonzo_sink_command,
            env=_python_env(),
        ),
        ServerSpec(
            "aiosmtpd",
            "aiosmtpd SMTP + a discarding handle_DATA (bench/servers/aiosmtpd_sink.py)",
            _aiosmtpd_command,
            available=_aiosmtpd_available,
        ),
        ServerSpec(
            "smtp-sink",
            "Postfix smtp-sink, the C reference",
            _smtp_sink_command,
            available=_smtp_sink_available,
        ),
        ServerSpec(
            "tornado-sink",
            "bare Tornado TCPServer, one read_until per line, no checks (tornado_sink.py)",
            _tornado_sink_command,
        ),
        ServerSpec(
            "haraka",
            "Haraka, one process, rcpt_to.in_host_list + queue/discard, no DNS "
            "(bench/servers/haraka)",
            _haraka_command,
            available=_node_package_available("Haraka"),
            # queue/discard drops a message only when told to.
            env={"YES_REALLY_DO_DISCARD": "1"},
        ),
        ServerSpec(
            "smtp-server",
            "nodemailer smtp-server + a draining onData (bench/servers/smtp_server_sink.js)",
            _smtp_server_command,
            available=_node_package_available("smtp-server"),
        ),
    ]
}

# ----------------------------------------------------------------------------
# The daemon: `bonzo serve -c FILE` with the configurations in bench/configs/
# (the product as operators run it; "bonzo" above is the library alone). The
# harness copies each config into the scratch directory with the listener
# port and the maildir path rewritten (see _daemon_config).
# ----------------------------------------------------------------------------


def _daemon_available() -> str | None:
    if (ROOT / "bonzo" / "__main__.py").exists() or (ROOT / "bonzo" / "cli.py").exists():
        return None
    return "`bonzo serve` does not exist yet in this checkout"


def _daemon_config(template: str, port: int, scratch: Path, downstream: int | None = None) -> Path:
    text = (BENCH / "configs" / template).read_text()
    text, count = re.subn(r"(?m)^(\s*port\s*=\s*)\d+", rf"\g<1>{port}", text)
    if count != 1:
        raise RuntimeError(f"{template}: expected exactly one listener `port = N` line")
    text = text.replace("/tmp/bonzo-bench-maildir", str(scratch / "maildir"))
    text = text.replace("/tmp/bonzo-bench-queue", str(scratch / "queue"))
    if downstream is not None:
        # The smarthost route: `host = "127.0.0.1", port = N` in an inline table.
        text, count = re.subn(
            r'(host\s*=\s*"127\.0\.0\.1",\s*port\s*=\s*)\d+', rf"\g<1>{downstream}", text
        )
        if count != 1:
            raise RuntimeError(f"{template}: expected one smarthost `host = ..., port = N`")
    path = scratch / template
    path.write_text(text)
    return path


def _daemon_command(
    template: str,
    python: str = sys.executable,
    loop: str | None = None,
    workers: int = 1,
    metrics: bool = False,
) -> Callable[..., list[str]]:
    def command(port: int, scratch: Path, downstream: int | None = None) -> list[str]:
        config = _daemon_config(template, port, scratch, downstream)
        if loop is not None:
            text = config.read_text()
            config.write_text(text.replace("[server]\n", f'[server]\nloop = "{loop}"\n', 1))
        if workers != 1:
            text = config.read_text()
            config.write_text(text.replace("[server]\n", f"[server]\nworkers = {workers}\n", 1))
        if metrics:
            with socket.socket() as s:
                s.bind((HOST, 0))
                free = s.getsockname()[1]
            with config.open("a") as f:
                f.write(f'\n[metrics]\naddress = "{HOST}"\nport = {free}\n')
        return [python, "-m", "bonzo", "serve", "-c", str(config)]

    return command


def _uvloop_available() -> str | None:
    reason = _daemon_available()
    if reason is None and importlib.util.find_spec("uvloop") is None:
        reason = "uvloop is not installed (pip install 'bonzo[uvloop]')"
    return reason


def add_baseline(python: str) -> list[str]:
    """Add ``bonzo-serve-baseline`` and ``bonzo-chain-baseline``: the same
    daemon configurations run by another interpreter, which has another
    Bonzo installed (say, the code before a change, ``pip install``-ed into a
    virtualenv), so that before and after are measured side by side in one
    run. Returns their names."""
    if not os.access(python, os.X_OK):
        raise SystemExit(f"--baseline-python: {python} is not an executable")
    names = []
    for name, template in (("bonzo-serve", "discard.toml"), ("bonzo-chain", "chain.toml")):
        spec = ServerSpec(
            f"{name}-baseline",
            f"{name} run by {python} (the Bonzo installed there)",
            _daemon_command(template, python),
            # Run from the scratch directory: never this checkout's Bonzo.
            env={"PYTHONPATH": ""},
        )
        SERVER_SPECS[spec.name] = spec
        names.append(spec.name)
    return names


DAEMON_SPECS = [
    ServerSpec(
        "bonzo-serve",
        "bonzo serve -c bench/configs/discard.toml (one discarding plugin)",
        _daemon_command("discard.toml"),
        available=_daemon_available,
        env=_python_env(),
    ),
    ServerSpec(
        "bonzo-uvloop",
        "bonzo serve -c bench/configs/discard.toml on uvloop ([server] loop)",
        _daemon_command("discard.toml", loop="uvloop"),
        available=_uvloop_available,
        env=_python_env(),
    ),
    ServerSpec(
        "bonzo-chain",
        "bonzo serve -c bench/configs/chain.toml (access, recipients, headers, discard)",
        _daemon_command("chain.toml"),
        available=_daemon_available,
        env=_python_env(),
    ),
    ServerSpec(
        "bonzo-chain-metrics",
        "bonzo-chain with [metrics] on (not run by default: name it in --servers)",
        _daemon_command("chain.toml", metrics=True),
        available=_daemon_available,
        env=_python_env(),
    ),
    ServerSpec(
        "bonzo-maildir",
        "bonzo serve -c bench/configs/maildir.toml (fsync'd maildir delivery)",
        _daemon_command("maildir.toml"),
        available=_daemon_available,
        env=_python_env(),
    ),
]
SERVER_SPECS.update((spec.name, spec) for spec in DAEMON_SPECS)

# ----------------------------------------------------------------------------
# Relays (scenarios ra, rb, rc): smtp-source -> the relay -> smtp-sink. The
# harness starts the downstream smtp-sink (see Downstream) and passes its port.
# ----------------------------------------------------------------------------

POSTFIX_MASTER_CANDIDATES = ("/usr/lib/postfix/sbin/master", "/usr/libexec/postfix/master")
POSTFIX = "/usr/sbin/postfix"


def find_postfix_master() -> str | None:
    return next((p for p in POSTFIX_MASTER_CANDIDATES if os.access(p, os.X_OK)), None)


def _queue_available() -> str | None:
    return _daemon_available() or _smtp_sink_available()


def _postfix_relay_available() -> str | None:
    if find_postfix_master() is None or not os.access(POSTFIX, os.X_OK):
        return "Postfix's master not found (run bench/install.sh: Debian package postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its master starts as root)"
    try:
        import pwd

        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user (reinstall the postfix package)"
    return _smtp_sink_available()


# Every service a relaying Postfix uses (SMTP in, cleanup, qmgr, smtp out,
# bounces, logging to a file through postlogd); chroot (5th column) off, so
# the instance's paths are the real ones.
POSTFIX_SERVICES = """\
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_relay_main_cf(top: Path, port: int, downstream: int) -> dict[str, str]:
    """``main.cf`` of the private Postfix relay in ``top`` (see bench/README.md)."""
    limits = (
        "smtpd_client_connection_count_limit",
        "smtpd_client_connection_rate_limit",
        "smtpd_client_message_rate_limit",
        "smtpd_client_recipient_rate_limit",
        "smtpd_client_new_tls_session_rate_limit",
        "smtpd_client_auth_rate_limit",
    )
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(top / "queue"),
        "data_directory": str(top / "data"),
        "maillog_file": str(top / "maillog"),
        "maillog_file_prefixes": str(top),
        "myhostname": "postfix-bench.localhost",
        "mydomain": "localhost",
        "myorigin": "$myhostname",
        # Nothing is local: every recipient is relayed to the downstream sink.
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "relayhost": f"[{HOST}]:{downstream}",
        "default_transport": "smtp",
        "relay_transport": "smtp",
        "inet_interfaces": HOST,
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_peername_lookup": "no",
        "smtp_dns_support_level": "disabled",
        "lmtp_dns_support_level": "disabled",
        "smtp_tls_security_level": "none",
        "message_size_limit": str(BONZO_BENCH_SETTINGS["max_message_size"]),
        # No per-client limits (anvil is never asked), no flow control, and
        # more smtpd processes than sessions.
        **{name: "0" for name in limits},
        "in_flow_delay": "0",
        "default_process_limit": "200",
        "smtpd_banner": "$myhostname ESMTP",
    }


def _postfix_relay_command(port: int, scratch: Path, downstream: int) -> list[str]:
    """A private Postfix instance in ``scratch/postfix``, relaying everything
    to the downstream; its master runs in the foreground as our child."""
    top = scratch / "postfix"
    etc = top / "etc"
    for sub in (top, etc, top / "queue", top / "data"):
        sub.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(top / "data", "postfix")
    main_cf = postfix_relay_main_cf(top, port, downstream)
    (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main_cf.items()))
    smtpd = f"{HOST}:{port} inet n - n - - smtpd\n"
    (etc / "master.cf").write_text(smtpd + POSTFIX_SERVICES)
    # `postfix check` creates the queue's directories with their owners; a
    # misconfiguration shows here (the master itself would fail silently).
    try:
        done = subprocess.run(
            [POSTFIX, "-c", str(etc), "check"],
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise ServerError("postfix check did not finish within 60 s") from None
    if done.returncode != 0:
        raise ServerError(f"postfix check: {done.stderr.decode(errors='replace').strip()}")
    # -s: stand-alone, in the foreground (what `postfix start-fg` runs).
    return [find_postfix_master() or "master", "-c", str(etc), "-s"]


RELAY_SPECS = [
    ServerSpec(
        "bonzo-queue",
        "bonzo serve -c bench/configs/queue.toml (durable queue, smarthost to smtp-sink)",
        _daemon_command("queue.toml"),
        available=_queue_available,
        env=_python_env(),
        relay=True,
    ),
    ServerSpec(
        "bonzo-queue-2w",
        "bonzo-queue with [server] workers = 2 (a process per core, each with a queue runner)",
        _daemon_command("queue.toml", workers=2),
        available=_queue_available,
        env=_python_env(),
        relay=True,
    ),
    ServerSpec(
        "postfix-relay",
        "private Postfix instance, fsync'd queue, relayhost = the downstream smtp-sink",
        _postfix_relay_command,
        available=_postfix_relay_available,
        relay=True,
    ),
]
SERVER_SPECS.update((spec.name, spec) for spec in RELAY_SPECS)
DEFAULT_RELAY_SERVERS = ["bonzo-queue", "postfix-relay"]

DEFAULT_SERVERS = [
    "bonzo-serve",
    "bonzo-uvloop",
    "bonzo-chain",
    "bonzo-maildir",
    "aiosmtpd",
    "tornado-sink",
    "haraka",
    "smtp-server",
    "smtp-sink",
]
OTHER_LOAD_WARNING = 0.15  # cores of foreign CPU use during measurements
BASELINE = "aiosmtpd"
RELAY_BASELINE = "postfix-relay"


class ServerError(RuntimeError):
    pass


class RunningServer:
    """One started server: readiness, CPU and memory from /proc, stop."""

    def __init__(self, spec: ServerSpec, scratch: Path) -> None:
        self.spec = spec
        self.scratch = scratch
        self.port = free_port()
        self.log_path = scratch / f"{spec.name}.log"
        env = dict(os.environ, **spec.env)
        #: A relay's downstream smtp-sink, started first.
        self.downstream = Downstream(scratch) if spec.relay else None
        try:
            if self.downstream is not None:
                argv = spec.command(self.port, scratch, self.downstream.port)
            else:
                argv = spec.command(self.port, scratch)
            self.argv = argv
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=scratch,
                    start_new_session=True,  # its own process group, stopped as one
                )
        except BaseException:
            if self.downstream is not None:
                self.downstream.stop()
            raise
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.spec.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.spec.name} exited with {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as sock:
                    greeting = sock.recv(512)
                    if greeting.startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        sock.recv(512)
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise ServerError(f"{self.spec.name} not ready after {self.spec.ready_timeout}s")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        maillog = self.scratch / "postfix" / "maillog"  # a Postfix relay logs there
        if maillog.exists():
            lines_ = maillog.read_text(errors="replace").splitlines()[-lines:]
            tail += "\n--- maillog ---\n" + "\n".join(lines_)
        return tail

    def pids(self) -> list[int]:
        """The server process and its descendants (workers of a forking daemon)."""
        return [self.proc.pid, *descendants(self.proc.pid)]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server's processes, including the
        children that have exited and been waited for (Postfix's smtpd and
        cleanup processes exit after ``max_use`` uses)."""
        return process_tree_cpu(self.proc.pid)

    def status_kib(self, key: str) -> int:
        total = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
            except OSError:
                continue
        return total

    def rss_kib(self) -> int:
        return self.status_kib("VmRSS")

    def hwm_kib(self) -> int:
        return self.status_kib("VmHWM")

    def reset_hwm(self) -> bool:
        """Reset the peak-RSS counter (Linux >= 4.0: write 5 to clear_refs)."""
        ok = True
        for pid in self.pids():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                ok = False
        return ok

    def stop(self) -> None:
        try:
            stop_group(self.proc)
        finally:
            if self.downstream is not None:
                self.downstream.stop()


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started in its own session, and its process group."""
    group = [proc.pid, *descendants(proc.pid)]
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    # What is left of it (a Postfix service finishing its work): only the
    # processes seen before, and only while they are still in its group.
    for pid in group[1:]:
        try:
            if os.getpgid(pid) == proc.pid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants, plus the children
    ``pid`` has waited for."""
    total = 0
    for i, one in enumerate([pid, *descendants(pid)]):
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        if i == 0:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime (16, 17)
    return total / CLK_TCK


class Downstream:
    """Postfix's ``smtp-sink`` as a relay's downstream, on a free port of
    127.0.0.1, counting the messages it receives (``-c``: it writes
    ``sess=N quit=N mesg=N`` to its output after each session and message)."""

    def __init__(self, scratch: Path, ready_timeout: float = 10.0) -> None:
        self.port = free_port()
        self.out_path = scratch / "downstream.out"
        argv = _smtp_sink_command(self.port, scratch)
        argv.insert(1, "-c")
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=scratch,
                start_new_session=True,
            )
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"downstream smtp-sink exited with {self.proc.returncode}")
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as sock:
                    if sock.recv(512).startswith(b"220"):
                        sock.sendall(b"QUIT\r\n")
                        sock.recv(512)
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"downstream smtp-sink not ready after {ready_timeout}s")
            time.sleep(0.05)

    def counters(self) -> dict[str, int]:
        """The last counters written: ``sess`` (sessions), ``mesg`` (messages)."""
        try:
            with open(self.out_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - 256))
                tail = f.read()
        except OSError:
            return {}
        found = re.findall(rb"sess=(\d+) quit=\d+ mesg=(\d+)", tail)
        return {"sess": int(found[-1][0]), "mesg": int(found[-1][1])} if found else {}

    def count(self) -> int:
        """Messages received so far."""
        return self.counters().get("mesg", 0)

    def wait_for(self, count: int, timeout: float) -> float:
        """Wait until ``count`` messages have arrived; return the
        ``time.perf_counter()`` at which that was seen."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.count()
            if got >= count:
                return time.perf_counter()
            if self.proc.poll() is not None:
                raise ServerError(f"downstream smtp-sink exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise ServerError(
                    f"downstream received {got} of {count} messages within {timeout:.0f}s"
                )
            time.sleep(0.005)

    def cpu_seconds(self) -> float:
        return process_tree_cpu(self.proc.pid)

    def stop(self) -> None:
        stop_group(self.proc)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------- scenarios


@dataclasses.dataclass
class Scenario:
    key: str
    title: str
    kind: str  # "source" (smtp-source), "idle" or "big"
    full: dict[str, Any]
    quick: dict[str, Any]

    def params(self, quick: bool) -> dict[str, Any]:
        return self.quick if quick else self.full

    def describe(self, quick: bool) -> str:
        params = self.params(quick)
        return self.title.format(size_mib=params.get("size", 0) // MIB, **params)


SCENARIOS = [
    Scenario(
        "a",
        "1 KB, {sessions} sessions, 1 msg/connection",
        "source",
        full={"sessions": 20, "messages": 20_000, "length": 1024, "per_conn": False},
        quick={"sessions": 20, "messages": 200, "length": 1024, "per_conn": False},
    ),
    Scenario(
        "b",
        "1 KB, {sessions} sessions, many msgs/connection",
        "source",
        full={"sessions": 20, "messages": 40_000, "length": 1024, "per_conn": True},
        quick={"sessions": 20, "messages": 400, "length": 1024, "per_conn": True},
    ),
    Scenario(
        "c",
        "1 MB, {sessions} sessions",
        "source",
        full={"sessions": 4, "messages": 400, "length": MIB, "per_conn": False},
        quick={"sessions": 4, "messages": 8, "length": MIB, "per_conn": False},
    ),
    Scenario(
        "d",
        "{connections:,} idle connections",
        "idle",
        full={"connections": 2000},
        quick={"connections": 100},
    ),
    Scenario(
        "e",
        "one {size_mib} MB message",
        "big",
        full={"size": 100 * MIB},
        quick={"size": 4 * MIB},
    ),
]
# The relay scenarios: the loads of a, b and c, through a relay (a server with
# a durable queue) to a downstream smtp-sink. Run on the relays only
# (ServerSpec.relay), as the others on the sinks only.
SCENARIOS += [
    Scenario(
        "ra",
        "relay: 1 KB, {sessions} sessions, 1 msg/connection",
        "relay",
        full={"sessions": 20, "messages": 20_000, "length": 1024, "per_conn": False},
        quick={"sessions": 10, "messages": 40, "length": 1024, "per_conn": False},
    ),
    Scenario(
        "rb",
        "relay: 1 KB, {sessions} sessions, many msgs/connection",
        "relay",
        full={"sessions": 20, "messages": 40_000, "length": 1024, "per_conn": True},
        quick={"sessions": 10, "messages": 40, "length": 1024, "per_conn": True},
    ),
    Scenario(
        "rc",
        "relay: 1 MB, {sessions} sessions",
        "relay",
        full={"sessions": 4, "messages": 400, "length": MIB, "per_conn": False},
        quick={"sessions": 4, "messages": 4, "length": MIB, "per_conn": False},
    ),
]
SCENARIO_BY_KEY = {s.key: s for s in SCENARIOS}
#: Names for several scenarios at once in --scenarios.
SCENARIO_GROUPS = {"relay": ["ra", "rb", "rc"]}
DEFAULT_SCENARIOS = ["a", "b", "c", "d", "e"]


def parse_scenarios(text: str) -> list[str]:
    """``--scenarios``: comma-separated keys or groups (``ra,rb``, ``relay``);
    a word of one-letter keys (``ab``) is those scenarios."""
    keys: list[str] = []
    for token in (t.strip() for t in text.split(",")):
        if token in SCENARIO_BY_KEY:
            keys.append(token)
        elif token in SCENARIO_GROUPS:
            keys += SCENARIO_GROUPS[token]
        elif token and all(c in SCENARIO_BY_KEY for c in token):
            keys += list(token)
        else:
            raise ValueError(f"unknown scenario {token!r}")
    return list(dict.fromkeys(keys))


def client_cpu_seconds() -> float:
    """CPU time of finished children (smtp-source) and of this process (the
    Python clients of scenarios d and e)."""
    total = 0.0
    for who in (resource.RUSAGE_CHILDREN, resource.RUSAGE_SELF):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def machine_busy_seconds() -> float:
    """CPU time spent on the whole machine, including time the hypervisor
    gave to other guests (steal), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class CPUMeter:
    """Server, client and foreign CPU time over one measurement. The foreign
    part (everything else the machine did) shows whether the run was
    disturbed."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.start = self._now()

    def _now(self) -> tuple[float, float, float, float]:
        sink = self.server.downstream.cpu_seconds() if self.server.downstream else 0.0
        return (self.server.cpu_seconds(), client_cpu_seconds(), machine_busy_seconds(), sink)

    def stop(self, elapsed: float) -> dict[str, float]:
        end = self._now()
        server, client, machine, sink = (b - a for a, b in zip(self.start, end, strict=True))
        out = {
            "server_cpu_s": server,
            "server_busy": server / elapsed,  # ~1.0: CPU-bound on one core
            "client_cpu_s": client,
            "other_load": max(0.0, machine - server - client - sink) / elapsed,  # in cores
        }
        if self.server.downstream is not None:
            out["downstream_cpu_s"] = sink
        return out


def smtp_source(
    server: RunningServer, params: dict[str, Any], messages: int, timeout: float
) -> float:
    """Run smtp-source against the server; returns the wall time. Raises on any
    failure (smtp-source exits non-zero on the first unexpected reply)."""
    argv = [find_tool("smtp-source") or "smtp-source"]
    if params["per_conn"]:
        argv.append("-d")  # keep the connection for the next message
    argv += [
        "-s", str(params["sessions"]),
        "-m", str(messages),
        "-l", str(params["length"]),
        "-f", SENDER,
        "-t", RECIPIENT,
        "-M", HELO_NAME,
        f"{HOST}:{server.port}",
    ]  # fmt: skip
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ServerError(f"smtp-source did not finish within {timeout:.0f}s") from None
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or done.stderr.strip():
        raise ServerError(
            f"smtp-source exited {done.returncode}: {done.stderr.decode(errors='replace').strip()}"
            f"\n--- server log ---\n{server.log_tail()}"
        )
    return elapsed


def run_source(server: RunningServer, params: dict[str, Any], quick: bool) -> dict[str, Any]:
    warmup = max(params["sessions"], min(200, params["messages"] // 10))
    timeout = 60.0 if quick else 300.0
    smtp_source(server, params, warmup, timeout)
    server.reset_hwm()
    rss0 = server.rss_kib()
    meter = CPUMeter(server)
    elapsed = smtp_source(server, params, params["messages"], timeout)
    cpu = meter.stop(elapsed)
    messages = params["messages"]
    return {
        "messages": messages,
        "elapsed_s": elapsed,
        "msgs_per_s": messages / elapsed,
        "cpu_per_msg_s": cpu["server_cpu_s"] / messages,
        **cpu,
        "peak_delta_kib": server.hwm_kib() - rss0,
    }


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return
        except (ValueError, OSError):
            raise ServerError(
                f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors needed"
            ) from None
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def open_idle_connections(port: int, count: int, deadline: float) -> list[socket.socket]:
    """Open ``count`` connections that read the greeting and then idle.

    Connections are opened in batches, each batch waiting for its greetings,
    so the listen backlog never overflows."""
    opened: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        for start in range(0, count, 100):
            pending: dict[socket.socket, bytes] = {}
            for _ in range(min(100, count - start)):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                opened.append(sock)
                sock.setblocking(False)
                sock.connect_ex((HOST, port))
                sel.register(sock, selectors.EVENT_READ)
                pending[sock] = b""
            while pending:
                if time.monotonic() > deadline:
                    raise ServerError(f"{len(pending)} connections got no greeting in time")
                for key, _ in sel.select(timeout=1.0):
                    sock = key.fileobj  # type: ignore[assignment]
                    data = sock.recv(1024)
                    if not data:
                        raise ServerError("server closed an idle connection before its greeting")
                    buf = pending[sock] + data
                    if b"\n" in buf:
                        if not buf.startswith(b"220"):
                            raise ServerError(f"unexpected greeting: {buf[:80]!r}")
                        sel.unregister(sock)
                        del pending[sock]
                    else:
                        pending[sock] = buf
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    finally:
        sel.close()
    return opened


def run_idle(server: RunningServer, params: dict[str, Any], quick: bool) -> dict[str, Any]:
    count = params["connections"]
    # Warm up with one whole session, so lazily created state is there.
    smtp_session(server.port, 1024, deadline=time.monotonic() + 30)
    time.sleep(0.2)
    rss0 = server.rss_kib()
    socks = open_idle_connections(server.port, count, time.monotonic() + (30 if quick else 120))
    try:
        time.sleep(1.0)  # let the server settle (timers armed, buffers allocated)
        rss1 = server.rss_kib()
    finally:
        for sock in socks:
            sock.close()
    return {
        "connections": count,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_conn": (rss1 - rss0) / count,
    }


class SMTPClientError(ServerError):
    pass


class LineReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def reply(self) -> tuple[int, bytes]:
        """Read one (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise SMTPClientError("connection closed while waiting for a reply")
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"\n".join(lines)


def body_blocks(size: int) -> Iterator[bytes]:
    """About ``size`` octets of message body as 78-character lines, in blocks
    of 64 KiB made once (so the client never holds the message)."""
    line = b"x" * 76 + b"\r\n"
    block = line * (65536 // len(line))
    sent = 0
    while sent + len(block) <= size:
        yield block
        sent += len(block)
    rest = (size - sent) // len(line)
    if rest:
        yield line * rest


def smtp_session(port: int, size: int, deadline: float) -> float:
    """Send one message of about ``size`` octets over raw SMTP; returns the
    time from the start of the content to the reply to the final dot."""
    with socket.create_connection((HOST, port), timeout=60) as sock:
        reader = LineReader(sock)

        def expect(command: bytes | None, code: int) -> None:
            if time.monotonic() > deadline:
                raise SMTPClientError("deadline passed")
            if command is not None:
                sock.sendall(command)
            got, text = reader.reply()
            if got != code:
                raise SMTPClientError(f"{command!r}: expected {code}, got {text!r}")

        expect(None, 220)
        expect(b"EHLO " + HELO_NAME.encode() + b"\r\n", 250)
        expect(f"MAIL FROM:<{SENDER}>\r\n".encode(), 250)
        expect(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), 250)
        expect(b"DATA\r\n", 354)
        start = time.perf_counter()
        sock.sendall(f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: big\r\n\r\n".encode())
        for block in body_blocks(size):
            if time.monotonic() > deadline:
                raise SMTPClientError("deadline passed while sending the message")
            sock.sendall(block)
        expect(b".\r\n", 250)
        elapsed = time.perf_counter() - start
        expect(b"QUIT\r\n", 221)
        return elapsed


def run_big(server: RunningServer, params: dict[str, Any], quick: bool) -> dict[str, Any]:
    size = params["size"]
    smtp_session(server.port, 256 * 1024, deadline=time.monotonic() + 30)  # warm-up
    time.sleep(0.2)
    reset = server.reset_hwm()
    rss0 = server.rss_kib()
    meter = CPUMeter(server)
    elapsed = smtp_session(server.port, size, deadline=time.monotonic() + (60 if quick else 300))
    cpu = meter.stop(elapsed)
    return {
        "size": size,
        "elapsed_s": elapsed,
        "mib_per_s": size / MIB / elapsed,
        "cpu_per_msg_s": cpu["server_cpu_s"],
        **cpu,
        "peak_delta_kib": server.hwm_kib() - rss0,
        "hwm_reset": reset,
    }


def run_relay(server: RunningServer, params: dict[str, Any], quick: bool) -> dict[str, Any]:
    """smtp-source into the relay, then wait until the downstream sink has
    received every message. Accepted: messages / smtp-source's time.
    Delivered: messages / time from the start until the last one arrived
    downstream. Server CPU is counted over the latter (queue runner and
    delivery included)."""
    downstream = server.downstream
    assert downstream is not None
    warmup = max(params["sessions"], min(200, params["messages"] // 10))
    timeout = 60.0 if quick else 300.0
    before = downstream.count()
    smtp_source(server, params, warmup, timeout)
    downstream.wait_for(before + warmup, timeout)
    time.sleep(0.2)  # let the queue settle (state files removed, connections idle)
    server.reset_hwm()
    rss0 = server.rss_kib()
    start_count = downstream.count()
    start_sessions = downstream.counters().get("sess", 0)
    messages = params["messages"]
    meter = CPUMeter(server)
    start = time.perf_counter()
    accepted = smtp_source(server, params, messages, timeout)
    at_accept = downstream.count() - start_count
    done = downstream.wait_for(start_count + messages, timeout)
    delivered = done - start
    cpu = meter.stop(delivered)
    time.sleep(0.2)  # a message delivered twice would show now
    extra = downstream.count() - start_count - messages
    # Sessions the relay opened to the sink (connection reuse).
    sessions = downstream.counters().get("sess", 0) - start_sessions
    return {
        "messages": messages,
        "elapsed_s": accepted,
        "msgs_per_s": messages / accepted,
        "delivered_s": delivered,
        "delivered_per_s": messages / delivered,
        # How far delivery lagged: messages still queued when the last was accepted.
        "queued_at_accept": messages - at_accept,
        "drain_s": max(0.0, delivered - accepted),
        "extra_deliveries": extra,
        "downstream_sessions": sessions,
        "cpu_per_msg_s": cpu["server_cpu_s"] / messages,
        **cpu,
        "peak_delta_kib": server.hwm_kib() - rss0,
    }


RUNNERS = {"source": run_source, "idle": run_idle, "big": run_big, "relay": run_relay}


# --------------------------------------------------------------------------- report


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(
    cells: list[dict[str, Any]], servers: list[str], scenarios: list[Scenario], quick: bool
) -> list[dict[str, Any]]:
    """One row per scenario and server: medians, and the median of the
    per-repetition ratios to the baseline measured in the same repetition."""
    rows = []
    by_key: dict[tuple[str, str, int], dict[str, Any]] = {
        (c["scenario"], c["server"], c["rep"]): c for c in cells
    }
    for scenario in scenarios:
        relay = scenario.kind == "relay"
        metric = {"source": "msgs_per_s", "idle": None, "big": "mib_per_s", "relay": "msgs_per_s"}[
            scenario.kind
        ]
        memory = {
            "source": "peak_delta_kib",
            "idle": "kib_per_conn",
            "big": "peak_delta_kib",
            "relay": "peak_delta_kib",
        }[scenario.kind]
        baseline = RELAY_BASELINE if relay else BASELINE
        for server in servers:
            if SERVER_SPECS[server].relay != relay:
                continue  # relays run the relay scenarios only, sinks the others
            mine = [c for c in cells if c["scenario"] == scenario.key and c["server"] == server]
            ok = [c for c in mine if "error" not in c]
            row: dict[str, Any] = {
                "scenario": scenario.key,
                "title": scenario.describe(quick),
                "server": server,
                "runs": len(mine),
                "failed": len(mine) - len(ok),
                "errors": [c["error"] for c in mine if "error" in c],
            }
            extra = ("delivered_per_s", "drain_s") if relay else ()
            for name in (metric, memory, "cpu_per_msg_s", *extra):
                if name and ok and name in ok[0]:
                    values = [c[name] for c in ok]
                    row[name] = median(values)
                    row[name + "_all"] = values
            pairs = [("ratio", metric), ("memory_ratio", memory)]
            if relay:
                pairs.append(("delivered_ratio", "delivered_per_s"))
            for name, key in pairs:
                if key is None or (
                    key == "peak_delta_kib" and scenario.kind in ("source", "relay")
                ):
                    continue  # peaks of small runs are too small to compare
                ratios = []
                for c in ok:
                    base = by_key.get((scenario.key, baseline, c["rep"]))
                    if base and "error" not in base and base.get(key):
                        ratios.append(c[key] / base[key])
                if ratios:
                    row[name] = median(ratios)
            rows.append(row)
    return rows


def fmt_num(value: float, digits: int = 3) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.005 else "<0.01"


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_mem(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB" if abs(kib) >= 1024 else f"{kib:.0f} KiB"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    other = meta.get("other_load")
    warning = (
        [
            f"**The machine was not idle**: other processes (or other guests) used {other:.2f} "
            "cores on average while messages were measured, so absolute rates are unreliable; "
            "ratios from the same run less so, CPU per message least.",
            "",
        ]
        if other is not None and other > OTHER_LOAD_WARNING
        else []
    )
    found = meta["machine"].get("versions") or {}
    versions = (
        ["Versions: " + ", ".join(f"{name} {found[name]}" for name in sorted(found)) + ".", ""]
        if found
        else []
    )
    relay_rows = [row for row in rows if row["scenario"] in RELAY_KEYS]
    rows = [row for row in rows if row["scenario"] not in RELAY_KEYS]
    sinks = bool(rows) or not relay_rows
    out = [
        f"### Bonzo benchmark ({meta['mode']}, {meta['repeat']} interleaved run(s), medians)",
        "",
        f"Machine: {meta['machine']['nproc']} × {meta['machine']['cpu']}, "
        f"Linux {meta['machine']['kernel']}, Python {meta['machine']['python']}; "
        f"Bonzo's DATA scan in {'C' if meta['machine'].get('bonzo_speedups') else 'Python'}; "
        "load generator and server share these cores. "
        + (
            f"× {BASELINE}: median of per-run ratios (throughput: higher is better; "
            "memory: lower is better); throughput is the median (min–max)."
            if sinks
            else "Rates are medians (min–max)."
        ),
        "",
        *versions,
        *warning,
    ]
    if sinks:
        out += [
            f"| scenario | server | throughput | × {BASELINE} | server CPU/msg "
            f"| server memory | mem × {BASELINE} |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
    for row in rows:
        cells = [f"{row['scenario']}. {row['title']}", row["server"]]
        if row["failed"] and row["failed"] == row["runs"]:
            out.append("| " + " | ".join(cells + ["FAILED", "", "", "", ""]) + " |")
            continue
        for key, unit in (("msgs_per_s", "msg/s"), ("mib_per_s", "MiB/s")):
            if key in row:
                text = f"{fmt_num(row[key])} {unit}"
                values = row[key + "_all"]
                if len(values) > 1:  # the spread shows how noisy the machine was
                    text += f" ({fmt_num(min(values))}–{fmt_num(max(values))})"
                cells.append(text)
                break
        else:
            cells.append("—")
        cells.append(fmt_ratio(row["ratio"]) if "ratio" in row else "—")
        cells.append(fmt_time(row["cpu_per_msg_s"]) if "cpu_per_msg_s" in row else "—")
        if "kib_per_conn" in row:
            cells.append(f"{row['kib_per_conn']:.1f} KiB/conn")
        elif "peak_delta_kib" in row:
            cells.append("peak +" + fmt_mem(row["peak_delta_kib"]))
        else:
            cells.append("—")
        cells.append(fmt_ratio(row["memory_ratio"]) if "memory_ratio" in row else "—")
        if row["failed"]:
            cells[-1] += f" ({row['failed']} of {row['runs']} runs FAILED)"
        out.append("| " + " | ".join(cells) + " |")
    if relay_rows:
        out += (["", *relay_table(relay_rows)]) if rows else relay_table(relay_rows)
    skipped = meta.get("skipped") or {}
    if skipped:
        out += ["", "Not run (cannot run on this machine):", ""]
        out += [f"- `{name}`: {reason}" for name, reason in skipped.items()]
    return "\n".join(out)


RELAY_KEYS = frozenset(s.key for s in SCENARIOS if s.kind == "relay")


def _rate(row: dict[str, Any], key: str) -> str:
    text = f"{fmt_num(row[key])} msg/s"
    values = row[key + "_all"]
    if len(values) > 1:
        text += f" ({fmt_num(min(values))}–{fmt_num(max(values))})"
    return text


def relay_table(rows: list[dict[str, Any]]) -> list[str]:
    """The relay scenarios' table: accepted and delivered rates, each with
    its ratio to Postfix's from the same repetition."""
    out = [
        f"Relay (smtp-source → server → smtp-sink; × {RELAY_BASELINE}: median of per-run "
        "ratios; delivered: until the sink had every message):",
        "",
        f"| scenario | server | accepted | × {RELAY_BASELINE} | delivered | × {RELAY_BASELINE} "
        "| server CPU/msg | drain after last 250 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [f"{row['scenario']}. {row['title']}", row["server"]]
        if row["failed"] and row["failed"] == row["runs"]:
            out.append("| " + " | ".join(cells + ["FAILED"] + [""] * 5) + " |")
            continue
        cells.append(_rate(row, "msgs_per_s") if "msgs_per_s" in row else "—")
        cells.append(fmt_ratio(row["ratio"]) if "ratio" in row else "—")
        cells.append(_rate(row, "delivered_per_s") if "delivered_per_s" in row else "—")
        cells.append(fmt_ratio(row["delivered_ratio"]) if "delivered_ratio" in row else "—")
        cells.append(fmt_time(row["cpu_per_msg_s"]) if "cpu_per_msg_s" in row else "—")
        cells.append(fmt_time(row["drain_s"]) if "drain_s" in row else "—")
        if row["failed"]:
            cells[-1] += f" ({row['failed']} of {row['runs']} runs FAILED)"
        out.append("| " + " | ".join(cells) + " |")
    return out


def _has_speedups() -> bool:
    if os.environ.get("BONZO_NO_EXTENSION"):  # the servers inherit it
        return False
    try:
        return importlib.util.find_spec("bonzo._speedups") is not None
    except ImportError:  # no bonzo at all: its servers will say so
        return False


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {}
    try:
        import aiosmtpd

        versions["aiosmtpd"] = aiosmtpd.__version__
    except ImportError:
        pass
    try:
        import tornado

        versions["tornado"] = tornado.version
    except ImportError:
        pass
    if node_version():  # the Node.js peers' versions only where they can run
        versions["node"] = node_version() or ""
        for package in ("Haraka", "smtp-server"):
            installed = npm_package_version(package)
            if installed:
                versions[package] = installed
    try:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "postfix"], capture_output=True, timeout=10
        )
        if done.returncode == 0:
            versions["postfix"] = done.stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                timeout=10,
            )
            .stdout.decode()
            .strip()
        )
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "bonzo_commit": commit,
        # The servers run on this interpreter: the same import decides there.
        "bonzo_speedups": _has_speedups(),
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Bonzo benchmark (see bench/README.md)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny counts, once")
    parser.add_argument("--repeat", type=int, help="interleaved repetitions (default 3; quick 1)")
    parser.add_argument("--servers", help=f"comma-separated (default {','.join(DEFAULT_SERVERS)})")
    parser.add_argument(
        "--scenarios",
        help="comma-separated keys or 'relay' (= ra,rb,rc); default: a,b,c,d,e",
    )
    parser.add_argument(
        "--results", type=Path, default=BENCH / "results", help="directory for the JSON results"
    )
    parser.add_argument("--list", action="store_true", help="list servers and scenarios")
    parser.add_argument(
        "--baseline-python",
        metavar="PYTHON",
        help="also run bonzo-serve and bonzo-chain with this interpreter's installed Bonzo "
        "(e.g. a virtualenv holding the code before a change), as *-baseline",
    )
    args = parser.parse_args(argv)
    baseline = add_baseline(args.baseline_python) if args.baseline_python else []

    if args.list:
        for spec in SERVER_SPECS.values():
            reason = spec.available()
            print(
                f"{spec.name:14} {'ok' if reason is None else 'n/a: ' + reason}\n"
                f"{'':14} {spec.description}"
            )
        for sc in SCENARIOS:
            print(f"{sc.key}. {sc.describe(False)}: {sc.full} (quick: {sc.quick})")
        return 0

    try:
        keys = parse_scenarios(args.scenarios) if args.scenarios else list(DEFAULT_SCENARIOS)
    except ValueError as exc:
        parser.error(f"{exc} in {args.scenarios!r}; see --list")
    scenarios = [SCENARIO_BY_KEY[k] for k in keys]
    if args.servers:
        names = args.servers.split(",")
    else:  # the sinks for the sink scenarios, the relays for the relay ones
        names = list(DEFAULT_SERVERS) if any(s.kind != "relay" for s in scenarios) else []
        names += DEFAULT_RELAY_SERVERS if any(s.kind == "relay" for s in scenarios) else []
    names += [n for n in baseline if n not in names]
    unknown = [n for n in names if n not in SERVER_SPECS]
    if unknown:
        parser.error(f"unknown server(s): {', '.join(unknown)}; see --list")
    repeat = args.repeat or (1 if args.quick else 3)
    if not 1 <= repeat <= 20:
        parser.error("--repeat must be between 1 and 20")

    if any(s.kind in ("source", "relay") for s in scenarios) and not find_tool("smtp-source"):
        print(
            "smtp-source not found: run bench/install.sh (Debian package postfix)", file=sys.stderr
        )
        return 2
    servers = []
    skipped: dict[str, str] = {}  # name -> why it cannot run here; noted in the report
    for name in names:
        reason = SERVER_SPECS[name].available()
        if reason is None:
            servers.append(name)
        else:
            skipped[name] = reason
            print(f"skipping {name}: {reason}", file=sys.stderr)
    if not servers:
        print("no server can run here", file=sys.stderr)
        return 2

    idle = max(s.params(args.quick).get("connections", 0) for s in scenarios)
    raise_nofile(idle + 1024)  # inherited by the servers too

    meta = {
        "mode": "quick" if args.quick else "full",
        "repeat": repeat,
        "servers": servers,
        "skipped": skipped,
        "scenarios": {s.key: s.params(args.quick) for s in scenarios},
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": os.getloadavg(),
    }
    cells: list[dict[str, Any]] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bonzo-bench-") as tmp:
        # Reachable by the users peers drop to (smtp-sink: nobody; Postfix).
        os.chmod(tmp, 0o711)
        for rep in range(repeat):
            for scenario in scenarios:
                params = scenario.params(args.quick)
                fit = [n for n in servers if SERVER_SPECS[n].relay == (scenario.kind == "relay")]
                if not fit:
                    continue
                # Rotate the order each repetition so no server always goes first.
                shift = (rep + SCENARIOS.index(scenario)) % len(fit)
                for name in fit[shift:] + fit[:shift]:
                    scratch = Path(tmp) / f"{rep}-{scenario.key}-{name}"
                    scratch.mkdir()
                    os.chmod(scratch, 0o777)  # smtp-sink drops to nobody
                    cell: dict[str, Any] = {"rep": rep, "scenario": scenario.key, "server": name}
                    t0 = time.monotonic()
                    server = None
                    try:
                        server = RunningServer(SERVER_SPECS[name], scratch)
                        cell.update(RUNNERS[scenario.kind](server, params, args.quick))
                    except (ServerError, OSError) as exc:
                        cell["error"] = f"{type(exc).__name__}: {exc}"
                    finally:
                        if server is not None:
                            server.stop()
                    cell["wall_s"] = time.monotonic() - t0
                    cells.append(cell)
                    status = cell.get("error", "ok")
                    print(
                        f"[{time.monotonic() - began:6.1f}s] run {rep + 1}/{repeat} "
                        f"{scenario.key:2} {name:13} {status.splitlines()[0]}",
                        file=sys.stderr,
                        flush=True,
                    )

    rows = summarize(cells, servers, scenarios, args.quick)
    meta["elapsed_s"] = time.monotonic() - began
    meta["loadavg_end"] = os.getloadavg()
    loads = [c["other_load"] for c in cells if "other_load" in c]
    meta["other_load"] = statistics.mean(loads) if loads else None
    # The JSON first: a closed stdout (| head) must not lose the results.
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.results / f"{stamp}-{meta['mode']}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows, "cells": cells}, indent=2))
    print(markdown(rows, meta), flush=True)
    print(f"\nJSON: {path} ({meta['elapsed_s']:.0f} s)", file=sys.stderr)
    failed = [c for c in cells if "error" in c]
    for cell in failed:
        print(
            f"FAILED run {cell['rep'] + 1} {cell['scenario']} {cell['server']}: {cell['error']}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

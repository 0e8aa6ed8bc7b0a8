"""The ``bonzo`` daemon, run for real: ``python -m bonzo`` in a subprocess,
configured by TOML files in a temporary directory, with local plugins named
by dotted path (``plugins.paths``), and mail sent over 127.0.0.1 only.

Every wait is bounded (polling with a deadline, subprocess timeouts) and the
fixture kills whatever a test left running.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_support import DEADLINE, Daemon, daemon_env, daemons, free_port, wait_until
from protocol_helpers import c_scan_data

from bonzo import version
from bonzo.app import installed_plugins

STORE = "daemonplug:Store"
MESSAGE = "From: a@example.org\r\nTo: b@example.org\r\nSubject: daemon test\r\n\r\nHello.\r\n"

PLUGIN_SOURCE = '''
"""Local plugins for the daemon tests; each message is written as a file."""

import asyncio
import json
import os
import time
from pathlib import Path

from bonzo import Accept, errors, hookimpl


class Store:
    def bonzo_configure(self, config):
        if "out" not in config:
            raise ValueError("out: required")
        self.out = Path(config["out"])
        self.delay = float(config.get("delay", 0))
        self.block = float(config.get("block", 0))

    def bonzo_rcpt(self, address):
        return Accept()

    async def bonzo_deliver(self, envelope):
        if envelope.rcpt_tos[0].startswith("slow"):
            (self.out / f"{envelope.id}.delivering").write_text(str(os.getpid()))
            await asyncio.sleep(self.delay)
        if self.block:
            time.sleep(self.block)  # blocks this worker: the next client goes to another
        record = {
            "pid": os.getpid(),
            "loop": type(asyncio.get_running_loop()).__module__,
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "content": envelope.content.decode("utf-8", "replace"),
        }
        tmp = self.out / f".{envelope.id}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.out / f"{envelope.id}.json")
        return Accept()


class Stubborn(Store):
    """Delivers to slow@ in a retry loop that swallows everything, its own
    cancellation included (a bare except around a backend that never answers)."""

    async def bonzo_deliver(self, envelope):
        (self.out / f"{envelope.id}.delivering").write_text(str(os.getpid()))
        while True:
            try:
                await asyncio.sleep(3600)
            except BaseException:
                pass


class Lingering(Stubborn):
    """Stubborn, and its disconnect observer too (the session's cleanup)."""

    async def bonzo_disconnect(self):
        while True:
            try:
                await asyncio.sleep(3600)
            except BaseException:
                pass


class Early:
    @hookimpl(tryfirst=True)
    def bonzo_rcpt(self, address):
        return None

    def bonzo_connect(self, session):
        return None


class BadConfig:
    def bonzo_configure(self, config):
        raise ValueError("colour: must be red or blue")


class ExitsInConfigure:
    def bonzo_configure(self, config):
        raise SystemExit(0)  # a plugin calling sys.exit(): a fault, not success


class ExitsInInit:
    def __init__(self):
        raise SystemExit(0)


class SubjectPolicy:
    """Refuses by the decoded Subject, as docs/plugins.rst shows: what the
    sender wrote reaches the refusal's log message, or its reply."""

    def bonzo_message(self, envelope):
        subject = str(envelope.message.get("Subject", ""))
        if subject.startswith("lottery"):
            raise errors.SMTPError(
                550, "Message refused", "refused subject %s", subject, enhanced_code="5.7.1"
            )
        if subject.startswith("prize"):
            raise errors.PermanentError(550, f"Subject not allowed: {subject}", "5.7.1")
        if subject.startswith("fault"):
            # A plugin's own fault, its text holding what the sender wrote.
            raise ValueError(f"bad subject: {subject}")


class LibraryTimeout(BaseException):
    """As gevent's Timeout: a library's BaseException."""


class TimesOutInConfigure:
    def bonzo_configure(self, config):
        raise LibraryTimeout("directory did not answer")


class GeneratorConfigure:
    def bonzo_configure(self, config):
        if "limit" not in config:
            raise ValueError("limit: required")  # never checked: a leftover yield
        yield


class WrongArgument:
    def bonzo_rcpt(self, recipient):
        return Accept()


class BadInit:
    def __init__(self):
        raise RuntimeError("needs a database")

    def bonzo_rcpt(self):
        return Accept()


class FailsAtStartup:
    def bonzo_startup(self):
        raise RuntimeError("database unreachable")


class DiesAtStartup:
    def bonzo_startup(self):
        os._exit(7)


class FailsWhileMarked:
    """Fails to start while the file ``marker`` exists (a fault that clears)."""

    def bonzo_configure(self, config):
        self.marker = Path(config["marker"])

    def bonzo_startup(self):
        if self.marker.exists():
            raise RuntimeError("database unreachable")


class Marked(Store):
    """Store, and leave a mark when the plugins' shutdown hooks run."""

    def bonzo_shutdown(self):
        (self.out / f"shutdown-{os.getpid()}").write_text("")


class Lifecycle:
    """Journals its startups and shutdowns in out/lifecycle.txt; its HELO
    blocks the event loop for ``block`` seconds, after leaving out/blocking;
    its startup takes ``start`` seconds, after leaving out/starting."""

    def bonzo_configure(self, config):
        self.out = Path(config["out"])
        self.block = float(config.get("block", 3.0))
        self.start = float(config.get("start", 0.1))

    def event(self, what):
        with open(self.out / "lifecycle.txt", "a") as f:
            f.write(f"{what} {os.getpid()}\\n")

    async def bonzo_startup(self):
        (self.out / "starting").write_text("")
        await asyncio.sleep(self.start)  # as a pool or a thread that opens
        self.event("startup")

    def bonzo_shutdown(self):
        self.event("shutdown")

    def bonzo_helo(self):
        (self.out / "blocking").write_text("")
        time.sleep(self.block)


class SlowConfigure:
    """Its configuration takes ``sleep`` seconds (a directory read at
    start), after leaving out/configuring."""

    def bonzo_configure(self, config):
        (Path(config["out"]) / "configuring").write_text("")
        time.sleep(float(config.get("sleep", 1.0)))


class SlowFork:
    """Holds the supervisor between its first fork() and recording the child
    (an os.register_at_fork callback), after leaving the file out/forked."""

    def bonzo_configure(self, config):
        out = Path(config["out"])
        forks = []

        def after_fork_in_parent():
            forks.append(1)
            if len(forks) == 1:
                (out / "forked").write_text("")
                time.sleep(float(config.get("sleep", 2.0)))

        os.register_at_fork(after_in_parent=after_fork_in_parent)
'''


# ---------------------------------------------------------------- helpers
@pytest.fixture
def env() -> dict[str, str]:
    """The environment of the subprocesses: this checkout's bonzo first."""
    return daemon_env()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "daemonplug.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "out").mkdir()
    return tmp_path


def write_config(
    workdir: Path,
    port: int,
    enabled: list[str] | None = None,
    *,
    workers: int = 1,
    store: str = "",
    extra: str = "",
    name: str = "bonzo.toml",
) -> Path:
    enabled = [STORE] if enabled is None else enabled
    names = ", ".join(f'"{n}"' for n in enabled)
    text = textwrap.dedent(
        f"""\
        [server]
        hostname = "mx.daemon.test"
        workers = {workers}
        shutdown_grace = 10.0

        [[listeners]]
        address = "127.0.0.1"
        port = {port}

        [logging]
        level = "info"

        [plugins]
        enabled = [{names}]
        paths = ["plugins"]
        timeout = 15.0
        """
    )
    if STORE in enabled:
        text += f'\n[plugins."{STORE}"]\nout = "{workdir / "out"}"\n{store}'
    path = workdir / name
    path.write_text(text + extra)
    return path


def bonzo(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 60, preexec_fn: Any = None
) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "bonzo", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        preexec_fn=preexec_fn,
    )


@pytest.fixture
def serve(workdir: Path, env: dict[str, str]) -> Iterator[Any]:
    """Start ``bonzo serve -c CONFIG``; whatever is left running at the end is killed."""
    with daemons(workdir, env, workdir / "out") as start:
        yield start


def send(port: int, rcpt: str = "b@example.org", message: str = MESSAGE) -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=DEADLINE) as c:
        return c.sendmail("a@example.org", [rcpt], message)


def one_line_error(result: Any, *fragments: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------- one-shot commands
def test_version(workdir, env):
    result = bonzo("version", env=env, cwd=workdir)
    assert result.returncode == 0
    assert result.stdout == f"bonzo {version}\n"
    assert result.stderr == ""


def test_no_command_prints_help_and_exits_2(workdir, env):
    result = bonzo(env=env, cwd=workdir)
    assert result.returncode == 2
    assert "serve" in result.stderr and "check" in result.stderr
    assert bonzo("frobnicate", env=env, cwd=workdir).returncode == 2


def test_check_ok(workdir, env):
    port = free_port()
    config = write_config(workdir, port)
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{config}: OK",
        "  listeners:",
        f"    127.0.0.1:{port}: SMTP",
        "  workers: 1",
        f"  plugins: {STORE}",
        "  dsn: not offered: no enabled plugin sends the reports (honours_dsn); 'queue' does",
        "  dns: off",
        "  metrics: off",
    ]
    assert result.stderr == ""


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_addresses_are_written_in_brackets(workdir, env):
    # "http://::1:9090/metrics" is no URL (RFC 3986 writes the host [::1]).
    port, metrics = free_port(), free_port()
    config = write_config(workdir, port)
    text = config.read_text().replace('address = "127.0.0.1"', 'address = "::1"')
    config.write_text(text + f'\n[metrics]\naddress = "::1"\nport = {metrics}\n')
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert f"    [::1]:{port}: SMTP\n" in result.stdout
    assert f"  metrics: http://[::1]:{metrics}/metrics and /health\n" in result.stdout
    log = workdir / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bonzo", "serve", "-c", str(config)],
            env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: "ready (pid" in log.read_text(), what="the daemon to be ready")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(DEADLINE)
    text = log.read_text()
    assert f"metrics on http://[::1]:{metrics}/metrics and /health" in text
    assert f"listening on [::1]:{port} with 1 worker(s)" in text


def test_check_warns_about_a_server_that_takes_no_mail(workdir, env):
    config = write_config(workdir, free_port(), enabled=[])
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0
    assert "plugins: none" in result.stdout
    assert "warning: no enabled plugin accepts recipients" in result.stdout
    assert "warning: no enabled plugin delivers messages" in result.stdout


def test_check_warns_about_a_plugin_path_that_is_no_directory(workdir, env):
    config = write_config(workdir, free_port())
    config.write_text(
        config.read_text().replace('paths = ["plugins"]', 'paths = ["plugins", "nope"]')
    )
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert (
        f"warning: plugins.paths[1]: {workdir / 'nope'} does not exist: no plugin is found there"
    ) in result.stdout
    assert "plugins.paths[0]" not in result.stdout


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize(
    "case, fragments",
    [
        ("bad value", ["limits.max_recipients: must be at least 100"]),
        ("unknown key", ["server.colour: unknown key"]),
        ("invalid toml", ["invalid TOML"]),
        ("missing env", ["plugins.daemonplug:Store.out: environment variable"]),
        ("configure raises", ["plugins.daemonplug:BadConfig: colour: must be red or blue"]),
        ("wrong argument", ["plugins.enabled: plugin 'daemonplug:WrongArgument'", "recipient"]),
        ("missing module", ["plugins.enabled: plugin 'nosuchmodule:Plugin': cannot import"]),
        ("missing class", ["plugins.enabled: plugin 'daemonplug:Nope'", "has no 'Nope'"]),
        ("failing class", ["plugin 'daemonplug:BadInit': creating BadInit failed", "database"]),
        (
            "configure exits",
            ["plugins.daemonplug:ExitsInConfigure: configuration failed: SystemExit(0)"],
        ),
        ("init exits", ["plugin 'daemonplug:ExitsInInit': creating ExitsInInit failed"]),
        (
            "configure times out",
            [
                "plugins.daemonplug:TimesOutInConfigure: configuration failed: "
                "LibraryTimeout('directory did not answer')"
            ],
        ),
        (
            "generator hook",
            [
                "plugins.enabled: plugin 'daemonplug:GeneratorConfigure': bonzo_configure is a "
                "generator (it has a yield), so its body would never run"
            ],
        ),
    ],
)
def test_configuration_errors_exit_2_with_one_line(workdir, env, command, case, fragments):
    port = free_port()
    enabled = {
        "configure raises": [STORE, "daemonplug:BadConfig"],
        "wrong argument": ["daemonplug:WrongArgument"],
        "missing module": ["nosuchmodule:Plugin"],
        "missing class": ["daemonplug:Nope"],
        "failing class": ["daemonplug:BadInit"],
        "configure exits": [STORE, "daemonplug:ExitsInConfigure"],
        "init exits": ["daemonplug:ExitsInInit"],
        "configure times out": [STORE, "daemonplug:TimesOutInConfigure"],
        "generator hook": [STORE, "daemonplug:GeneratorConfigure"],
    }.get(case)
    config = write_config(workdir, port, enabled)
    text = config.read_text()
    if case == "bad value":
        text += "\n[limits]\nmax_recipients = 5\n"
    elif case == "unknown key":
        text = text.replace("[server]\n", '[server]\ncolour = "red"\n')
    elif case == "invalid toml":
        text += "\n[limits\n"
    elif case == "missing env":
        text = text.replace('out = "', 'out = { "$env" = "BONZO_DAEMON_TEST_UNSET" }\n# "')
    config.write_text(text)
    env.pop("BONZO_DAEMON_TEST_UNSET", None)
    result = bonzo(command, "-c", str(config), env=env, cwd=workdir)
    line = one_line_error(result, *fragments)
    assert line.startswith(f"bonzo: {config}: "), line
    assert result.stdout == ""
    if command == "serve":
        # Found before anything listens.
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_missing_config_file(workdir, env):
    missing = workdir / "nope.toml"
    result = bonzo("check", "-c", str(missing), env=env, cwd=workdir)
    assert one_line_error(result) == f"bonzo: {missing}: no such file"


def on_a_terminal(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int | None, str]:
    """Run ``python -m bonzo ARGS`` with a pseudo-terminal as its controlling
    terminal and stdin/stdout/stderr, as an operator would; return its exit
    status (None if it was still running after 15 s: killed) and output."""
    import fcntl
    import pty
    import select
    import termios

    main, side = pty.openpty()

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "bonzo", *args],
        env=env,
        cwd=cwd,
        stdin=side,
        stdout=side,
        stderr=side,
        preexec_fn=take_terminal,
    )
    os.close(side)
    output = b""
    deadline = time.monotonic() + 15
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([main], [], [], 0.1)[0]:
                try:
                    output += os.read(main, 4096)
                except OSError:  # the child closed the terminal
                    proc.wait(DEADLINE)
        status = proc.poll()
        if status is None:
            proc.kill()
            proc.wait(DEADLINE)
        while select.select([main], [], [], 0)[0]:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(main)
    return status, output.decode(errors="replace")


@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_key_with_a_pass_phrase_is_a_one_line_error_never_a_prompt(workdir, env, command):
    """OpenSSL asks for a key's pass phrase on the terminal: bonzo must not
    wait there (nor, without a terminal, die with a traceback naming no file)."""
    import trustme
    from cryptography.hazmat.primitives import serialization

    leaf = trustme.CA().issue_cert("mx.daemon.test")
    leaf.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    (workdir / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    config = write_config(workdir, free_port())
    text = config.read_text().replace(
        "\n\n[logging]", '\ntls = { cert = "cert.pem", key = "key.pem" }\n\n[logging]'
    )
    config.write_text(text)
    expected = (
        f"bonzo: {config}: listeners[0].tls: key {workdir / 'key.pem'} is encrypted with a "
        "pass phrase; Bonzo needs it unencrypted"
    )
    assert one_line_error(bonzo(command, "-c", str(config), env=env, cwd=workdir)) == expected
    status, output = on_a_terminal([command, "-c", str(config)], env, workdir)
    assert (status, output.strip()) == (2, expected)


def test_unknown_plugin_name_lists_the_installed_plugins(workdir, env):
    config = write_config(workdir, free_port(), ["nosuchplugin"])
    result = bonzo("serve", "-c", str(config), env=env, cwd=workdir)
    known = ", ".join(sorted(installed_plugins())) or "none"
    one_line_error(
        result,
        f"bonzo: {config}: plugins.enabled:",
        f"plugin 'nosuchplugin' is not installed (installed plugins: {known}; "
        f"for {sys.executable})",
    )


def test_a_misspelt_plugin_name_gets_a_suggestion(workdir, env):
    config = write_config(workdir, free_port(), ["recipents"])
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    known = ", ".join(sorted(installed_plugins()))
    one_line_error(
        result,
        f"bonzo: {config}: plugins.enabled:",
        f"plugin 'recipents' is not installed (did you mean 'recipients'? installed plugins: "
        f"{known}; for {sys.executable})",
    )


def test_a_plugin_name_two_distributions_declare_is_refused_naming_both(workdir, env):
    # A third-party distribution declares "recipients" too: whichever came
    # last used to replace Bonzo's own, silently.
    site = workdir / "site"
    (site / "impostor").mkdir(parents=True)
    (site / "impostor" / "__init__.py").write_text(
        "class Impostor:\n    def bonzo_rcpt(self):\n        return None\n"
    )
    (site / "bonzo_impostor-1.0.dist-info").mkdir()
    (site / "bonzo_impostor-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: bonzo-impostor\nVersion: 1.0\n"
    )
    (site / "bonzo_impostor-1.0.dist-info" / "entry_points.txt").write_text(
        "[bonzo.plugins]\nrecipients = impostor:Impostor\n"
    )
    env = {**env, "PYTHONPATH": f"{env['PYTHONPATH']}:{site}"}  # found after Bonzo
    ours = "bonzo_plugins.recipients:RecipientsPlugin"
    table = '\n[plugins.recipients]\ndomains = ["example.org"]\n'
    config = write_config(workdir, free_port(), ["recipients", STORE], extra=table)
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    one_line_error(
        result,
        f"bonzo: {config}: plugins.enabled: plugin 'recipients' is declared by more than one "
        f"installed distribution: bonzo {version} ({ours}) and bonzo-impostor 1.0 "
        f"(impostor:Impostor); enable the one you mean by its dotted path "
        f'(e.g. "{ours}", with its table [plugins."{ours}"]), or uninstall the other',
    )
    listed = bonzo("plugins", "-c", str(config), env=env, cwd=workdir)
    assert listed.returncode == 2
    rows = [line.split() for line in listed.stdout.splitlines() if line.startswith("  recip")]
    assert rows == [
        ["recipients", "bonzo", version, "ambiguous", ours],
        ["recipients", "bonzo-impostor", "1.0", "ambiguous", "impostor:Impostor"],
    ]
    assert "warning: plugin 'recipients' is declared by more than one" in listed.stdout
    # Named by its dotted path, Bonzo's own is meant.
    table = f'\n[plugins."{ours}"]\ndomains = ["example.org"]\n'
    config = write_config(workdir, free_port(), [ours, STORE], extra=table)
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    # Found first, the impostor is named first, but the example is Bonzo's own.
    env = {**env, "PYTHONPATH": f"{site}:{env['PYTHONPATH']}"}
    config = write_config(workdir, free_port(), ["recipients", STORE], extra=table.replace(
        f'"{ours}"', "recipients"))  # fmt: skip
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 2
    assert "bonzo-impostor 1.0 (impostor:Impostor) and bonzo " in result.stderr
    assert f'(e.g. "{ours}", with its table [plugins."{ours}"])' in result.stderr


def test_check_warns_about_a_table_for_a_plugin_that_takes_none(workdir, env):
    """daemonplug:Early has no bonzo_configure: its table would be ignored."""
    extra = '\n[plugins."daemonplug:Early"]\nfoo = 1\n'
    config = write_config(workdir, free_port(), [STORE, "daemonplug:Early"], extra=extra)
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert (
        "  warning: plugins.daemonplug:Early: the table is there but the plugin takes no "
        "configuration (it has no bonzo_configure hook): its keys are ignored"
    ) in result.stdout.splitlines()


def test_plugins_lists_enabled_plugins_hooks_and_effective_order(workdir, env):
    config = write_config(workdir, free_port(), [STORE, "daemonplug:Early"])
    result = bonzo("plugins", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Installed plugins (entry-point group bonzo.plugins):" in out
    for name in installed_plugins():
        assert f"  {name} " in out
    # Aligned columns: the entry point starts at the same place on each line.
    listed = out.split("Installed plugins (entry-point group bonzo.plugins):\n")[1]
    rows = [line for line in listed.splitlines() if line.startswith("  ")]
    rows = rows[: len(installed_plugins())]
    assert len({row.index("bonzo_plugins.") for row in rows}) == 1, rows
    assert f"Enabled by dotted path:\n  {STORE}\n  daemonplug:Early\n" in out
    assert (
        "Enabled plugins and their hooks:\n"
        f"  {STORE}: bonzo_configure, bonzo_deliver, bonzo_rcpt\n"
        "  daemonplug:Early: bonzo_connect, bonzo_rcpt\n"
    ) in out
    order = out.split("Effective order per hook:\n", 1)[1].splitlines()
    # Early's tryfirst puts it before Store, although it is enabled after it.
    assert f"  bonzo_rcpt: daemonplug:Early -> {STORE}" in order
    assert f"  bonzo_deliver: {STORE}" in order
    assert "  bonzo_connect: daemonplug:Early" in order
    assert not any("bonzo_helo" in line for line in order)  # nobody implements it
    assert "warning" not in out


# ------------------------------------------------------------------- serve
def test_serve_delivers_mail_from_smtplib_and_swaks_and_stops_on_sigterm(workdir, serve):
    port = free_port()
    daemon = serve(write_config(workdir, port), port)
    daemon.wait_ready()
    log = daemon.log
    assert f"listening on 127.0.0.1:{port} with 1 worker(s); plugins in order: {STORE}" in log
    assert "(tryfirst/trylast)" not in log  # no hook's order moved

    assert send(port, "smtplib@example.org") == {}
    if shutil.which("swaks"):
        swaks = subprocess.run(
            [
                "swaks",
                "--server",
                f"127.0.0.1:{port}",
                "--helo",
                "swaks.test",
                "--from",
                "sender@example.org",
                "--to",
                "swaks@example.org",
                "--timeout",
                "15",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert swaks.returncode == 0, swaks.stdout + swaks.stderr
        assert "<-  250" in swaks.stdout
    records = wait_until(
        lambda: (
            daemon.records()
            if len(daemon.records()) == (2 if shutil.which("swaks") else 1)
            else None
        ),
        what="the deliveries",
    )
    by_rcpt = {r["to"][0]: r for r in records}
    smtplib_record = by_rcpt["smtplib@example.org"]
    assert smtplib_record["from"] == "a@example.org"
    assert smtplib_record["pid"] == daemon.proc.pid
    assert "Subject: daemon test" in smtplib_record["content"]
    assert smtplib_record["content"].startswith("Received: from client.test")
    assert "by mx.daemon.test (Bonzo)" in smtplib_record["content"]
    if shutil.which("swaks"):
        assert by_rcpt["swaks@example.org"]["from"] == "sender@example.org"

    assert daemon.stop() == 0
    assert "stopped" in daemon.log
    assert "Traceback" not in daemon.log


PYTHON_SCAN_NOTICE = "message content is scanned in pure Python"


@pytest.mark.parametrize("no_extension", ["", "1"])
def test_startup_log_says_when_content_is_scanned_in_python(workdir, env, serve, no_extension):
    built = c_scan_data() is not None
    env["BONZO_NO_EXTENSION"] = no_extension
    port = free_port()
    daemon = serve(write_config(workdir, port), port)
    daemon.wait_ready()
    # Either scan takes the mail alike.
    # smtplib stuffs the dot; the server must take it off again.
    assert send(port, "scan@example.org", MESSAGE + ".dot\r\n") == {}
    (record,) = wait_until(lambda: daemon.records() or None, what="the delivery")
    assert record["content"].endswith("\r\n.dot\r\n")
    assert daemon.stop() == 0
    assert (PYTHON_SCAN_NOTICE in daemon.log) == (no_extension == "1" or not built)


def test_startup_log_names_a_hook_whose_order_a_tryfirst_moved(workdir, env, serve):
    port = free_port()
    daemon = serve(write_config(workdir, port, [STORE, "daemonplug:Early"]), port)
    daemon.wait_ready()
    assert daemon.stop() == 0
    assert f"plugins in order: {STORE}, daemonplug:Early" in daemon.log
    # The first verdict wins, so the operator is told where it is not theirs.
    lines = [line for line in daemon.log.splitlines() if "(tryfirst/trylast)" in line]
    assert len(lines) == 1, lines
    assert (
        f"bonzo_rcpt runs in the order daemonplug:Early -> {STORE} (tryfirst/trylast)" in lines[0]
    )


def test_swaks_is_installed_for_the_end_to_end_test():
    if not shutil.which("swaks"):
        pytest.skip("swaks is not installed (apt-get install swaks): its part of the test is off")


def test_sigterm_lets_a_message_in_flight_finish(workdir, serve):
    port = free_port()
    daemon = serve(write_config(workdir, port, store="delay = 2.0\n"), port)
    daemon.wait_ready()

    # An idle session: told 421 when the server stops.
    idle = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    idle.recv(512)
    idle.sendall(b"EHLO idle.test\r\n")
    idle_reply = b""
    while not idle_reply.endswith(b"HELP\r\n"):
        idle_reply += idle.recv(4096)

    result: dict[str, Any] = {}

    def client() -> None:
        try:
            c = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=DEADLINE)
            result["sendmail"] = c.sendmail("a@example.org", ["slow@example.org"], MESSAGE)
            # The server is stopping: after the 250 it says goodbye itself.
            result["quit"] = c.docmd("QUIT")
            c.close()
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=client)
    thread.start()
    wait_until(lambda: list(daemon.out.glob("*.delivering")), what="delivery to start")
    daemon.proc.send_signal(signal.SIGTERM)

    thread.join(DEADLINE)
    assert not thread.is_alive()
    # Answered 250 after SIGTERM, then 421 instead of a next command.
    assert result == {"sendmail": {}, "quit": (421, b"4.3.2 Server shutting down")}
    assert [r["to"] for r in daemon.records()] == [["slow@example.org"]]
    assert daemon.proc.wait(timeout=DEADLINE) == 0

    idle.settimeout(DEADLINE)
    rest = idle.recv(512)
    idle.close()
    assert rest.startswith(b"421 4.3.2"), rest
    log = daemon.log
    assert "stopping: no new connections" in log
    assert "stopped" in log
    # Nothing listens any more.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_two_workers_serve_mail_and_stop_cleanly(workdir, serve):
    port = free_port()
    daemon = serve(write_config(workdir, port, workers=2, store="block = 0.3\n"), port)
    daemon.wait_ready(workers=2)
    assert f"listening on 127.0.0.1:{port} with 2 worker(s)" in daemon.log

    pids: set[int] = set()
    deadline = time.monotonic() + 40
    errors: list[Exception] = []
    while len(pids) < 2 and time.monotonic() < deadline:
        # Four clients at once: while one worker is busy, the other accepts.
        threads = []
        for _ in range(4):

            def client() -> None:
                try:
                    send(port)
                except Exception as exc:
                    errors.append(exc)

            threads.append(threading.Thread(target=client))
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        pids = {r["pid"] for r in daemon.records()}
    assert not errors
    assert len(pids) == 2, f"only worker(s) {pids} delivered"
    assert daemon.proc.pid not in pids  # the workers are the supervisor's children

    assert daemon.stop() == 0
    for pid in pids:
        wait_until(lambda pid=pid: not _alive(pid), what=f"worker {pid} to exit")
    assert daemon.log.count("stopped") == 2
    assert "restarting" not in daemon.log


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def _sessions(pid: int, port: int) -> int:
    """Established TCP connections on local ``port`` that process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "01" and int(local.split(":")[1], 16) == port and inode in inodes:
            count += 1
    return count


def test_two_workers_share_a_burst_of_long_sessions_evenly(workdir, serve):
    # Without the share the first worker to wake took most of a burst (a
    # 7/13 split of 20 was common), and kept it for the sessions' life.
    port = free_port()
    daemon = serve(write_config(workdir, port, workers=2), port)
    daemon.wait_ready(workers=2)
    workers = _children(daemon.proc.pid)
    assert len(workers) == 2
    for _ in range(3):
        wait_until(
            lambda: all(_sessions(pid, port) == 0 for pid in workers),
            what="no session left",
        )
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        for c in clients:
            c.settimeout(DEADLINE)
            assert c.recv(512).startswith(b"220 ")
        counts = [_sessions(pid, port) for pid in workers]
        assert sum(counts) == 40 and max(counts) - min(counts) <= 2, counts
        for c in clients:
            c.close()
    assert daemon.stop() == 0


def test_a_worker_that_cannot_run_is_killed_after_the_forced_stop(workdir, serve):
    # A stopped worker (SIGSTOP, or stuck outside Python) cannot end the
    # forced stop by itself: the supervisor kills it, names it, and exits.
    port = free_port()
    config = write_config(workdir, port, workers=2)
    config.write_text(config.read_text().replace("shutdown_grace = 10.0", "shutdown_grace = 1.0"))
    daemon = serve(config, port)
    daemon.wait_ready(workers=2)
    workers = _children(daemon.proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGSTOP)
    try:
        daemon.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping the workers gracefully" in daemon.log, what="the stop")
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=DEADLINE) == 0
        assert time.monotonic() - started < 15.0
    finally:
        try:
            os.kill(workers[0], signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert re.search(
        rf"worker \d \(pid {workers[0]}\) has not stopped 6s after the forced stop: killed",
        daemon.log,
    ), daemon.log


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_uvloop(workdir, serve, workers):
    pytest.importorskip("uvloop", reason="pip install 'bonzo[uvloop]'")
    port = free_port()
    config = write_config(workdir, port, workers=workers)
    config.write_text(config.read_text().replace("[server]\n", '[server]\nloop = "uvloop"\n'))
    daemon = serve(config, port)
    daemon.wait_ready(workers=workers)
    assert send(port) == {}
    (record,) = wait_until(lambda: daemon.records() or None, what="the delivery")
    assert record["to"] == ["b@example.org"]
    # The worker really runs on uvloop (the Store plugin records the loop's type).
    assert record["loop"].startswith("uvloop")
    assert f"with {workers} worker(s) on uvloop; plugins in order" in daemon.log
    assert daemon.stop() == 0


def test_a_worker_that_dies_is_replaced(workdir, serve):
    port = free_port()
    daemon = serve(write_config(workdir, port, workers=2), port)
    daemon.wait_ready(workers=2)
    assert send(port) == {}
    [victim] = {r["pid"] for r in daemon.records()}
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: "restarting" in daemon.log, what="the supervisor to notice")
    assert f"(pid {victim}) exited with status -9; restarting" in daemon.log
    wait_until(lambda: daemon.log.count("ready (pid") == 3, what="a new worker")
    for _ in range(4):
        assert send(port) == {}
    pids = [r["pid"] for r in daemon.records()]
    assert len(pids) == 5 and pids.count(victim) == 1
    # SIGINT (Ctrl-C) stops it as gracefully as SIGTERM.
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(timeout=DEADLINE) == 0
    assert daemon.log.count("stopped") == 2


def test_workers_that_keep_dying_make_the_supervisor_give_up(workdir, serve):
    port = free_port()
    plugins = [STORE, "daemonplug:DiesAtStartup"]
    daemon = serve(write_config(workdir, port, plugins, workers=2), port)
    assert daemon.proc.wait(timeout=DEADLINE) == 1
    log = daemon.log
    assert "exited with status 7; restarting" in log
    assert "workers keep dying (21 restarts in a minute); giving up" in log
    assert log.count("restarting") == 21


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is no longer running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def test_bind_failure_exits_1_with_a_clear_message(workdir, serve):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        daemon = serve(write_config(workdir, port), port)
        assert daemon.proc.wait(timeout=DEADLINE) == 1
    log = daemon.log
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("workers", [1, 2])
def test_startup_failure_exits_1_naming_the_plugin(workdir, serve, workers):
    port = free_port()
    plugins = [STORE, "daemonplug:FailsAtStartup"]
    daemon = serve(write_config(workdir, port, plugins, workers=workers), port)
    assert daemon.proc.wait(timeout=DEADLINE) == 1
    log = daemon.log
    assert "startup failed: plugin 'daemonplug:FailsAtStartup'" in log
    assert "database unreachable" in log
    # One line for the operator: the traceback only at debug level.
    assert "Traceback" not in log
    # A worker that cannot start is not restarted over and over: it would only fail again.
    assert log.count("startup failed") <= workers
    assert "restarting" not in log


@pytest.mark.parametrize("workers", [1, 2])
def test_with_a_log_file_the_reason_startup_failed_reaches_stderr_too(workdir, env, workers):
    """With [logging] file set, the ERROR line that ends startup went to the
    file alone: the terminal, or the process manager's journal, saw a silent
    exit status 1. Once the daemon is ready, errors go to the file only."""
    port = free_port()
    config = write_config(workdir, port, [STORE, "daemonplug:FailsAtStartup"], workers=workers)
    logfile = workdir / "bonzo.log"
    config.write_text(
        config.read_text().replace('level = "info"', f'level = "info"\nfile = "{logfile}"')
    )
    done = bonzo("serve", "-c", str(config), env=env, cwd=workdir, timeout=DEADLINE)
    assert done.returncode == 1
    assert "bonzo: startup failed: plugin 'daemonplug:FailsAtStartup'" in done.stderr
    assert "database unreachable" in done.stderr
    assert "INFO" not in done.stderr and "Traceback" not in done.stderr
    assert "database unreachable" in logfile.read_text()  # the log has it as before
    # An address in use: the supervisor's own start.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        config.write_text(config.read_text().replace(f"port = {port}", f"port = {taken}"))
        done = bonzo("serve", "-c", str(config), env=env, cwd=workdir, timeout=DEADLINE)
    assert done.returncode == 1
    assert f"bonzo: cannot listen on 127.0.0.1:{taken}: Address already in use" in done.stderr


def test_with_a_log_file_errors_after_startup_stay_in_the_file(workdir, serve):
    port = free_port()
    config = write_config(workdir, port)
    logfile = workdir / "bonzo.log"
    config.write_text(
        config.read_text().replace('level = "info"', f'level = "info"\nfile = "{logfile}"')
    )
    daemon = serve(config, port)
    wait_until(lambda: logfile.exists() and "ready (pid" in logfile.read_text())
    # A reload onto a configuration that cannot load: an ERROR, once serving.
    config.write_text(config.read_text() + "\n[nonsense]\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "nonsense" in logfile.read_text(), what="the reload's error")
    assert daemon.stop() == 0
    assert "ERROR" in logfile.read_text()
    assert daemon.log == ""  # nothing on stdout/stderr: the file has it all


# A worker whose loop is closing gets a signal in the one window asyncio leaves
# open: its wakeup pipe already closed, its handlers not yet removed (the
# supervisor's stop request to a worker that is exiting anyway; CI saw it once).
SIGNAL_WHILE_CLOSING = """
import asyncio.selector_events, os, signal, sys
from bonzo.app import MailApp
from bonzo.cli import _RELOAD_REQUEST, _run_worker
from bonzo.config import load_config

close_pipe = asyncio.selector_events.BaseSelectorEventLoop._close_self_pipe

def close_and_signal(loop):
    close_pipe(loop)
    for sig in (signal.SIGUSR2, signal.SIGUSR1, signal.SIGHUP, _RELOAD_REQUEST):
        os.kill(os.getpid(), sig)

asyncio.selector_events.BaseSelectorEventLoop._close_self_pipe = close_and_signal
sys.exit(_run_worker(MailApp(load_config(sys.argv[1])), [], supervisor=os.getppid()))
"""


def test_a_signal_while_a_worker_exits_prints_no_traceback(workdir, env):
    config = write_config(workdir, free_port(), [STORE, "daemonplug:FailsAtStartup"])
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_CLOSING, str(config)],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert "startup failed: plugin 'daemonplug:FailsAtStartup'" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Exception ignored" not in done.stderr
    # The signals were ignored: the worker ended with its own status.
    assert done.returncode == 3, done.stderr


def test_an_unwritable_log_file_is_a_configuration_error(workdir, env):
    config = write_config(workdir, free_port(), extra="")
    text = config.read_text().replace(
        'level = "info"', 'level = "info"\nfile = "no/such/dir/b.log"'
    )
    config.write_text(text)
    result = bonzo("serve", "-c", str(config), env=env, cwd=workdir)
    one_line_error(result, f"bonzo: {config}: logging.file: cannot open", "no/such/dir/b.log")
    # bonzo check finds it too, before anyone runs serve.
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    one_line_error(result, f"bonzo: {config}: logging.file: cannot open", "no such directory")


# ---------------------------------------------------- signals and the supervisor


def ready_pids(daemon: Daemon) -> list[int]:
    """The pids of the workers (or the single process) that logged ``ready``."""
    return [int(m) for m in re.findall(r"ready \(pid (\d+)\)", daemon.log)]


def plugin_table(workdir: Path, plugin: str, settings: str = "") -> str:
    return f'\n[plugins."{plugin}"]\nout = "{workdir / "out"}"\n{settings}'


def slow_client(port: int, result: dict[str, Any]) -> threading.Thread:
    """A client sending one message to slow@example.org (whose delivery the
    Store plugin delays), in a thread; the outcome lands in ``result``."""

    def client() -> None:
        try:
            c = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=DEADLINE)
            try:
                result["sendmail"] = c.sendmail("a@example.org", ["slow@example.org"], MESSAGE)
            finally:
                c.close()  # no QUIT: a server that is stopping answers it 421
        except Exception as exc:  # reported by the test's assertions
            result["error"] = exc

    thread = threading.Thread(target=client)
    thread.start()
    return thread


def test_a_sigterm_while_the_supervisor_forks_still_stops_every_worker(workdir, serve):
    # The SlowFork plugin holds the supervisor right after its first fork(),
    # before it has recorded the child: the SIGTERM sent then used to stop
    # nobody (the child was unknown, the second worker was started anyway),
    # and the supervisor waited for them forever.
    port = free_port()
    plugins = [STORE, "daemonplug:SlowFork"]
    extra = plugin_table(workdir, "daemonplug:SlowFork")
    daemon = serve(write_config(workdir, port, plugins, workers=2, extra=extra), port)
    wait_until(lambda: (workdir / "out" / "forked").exists(), what="the first fork")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=DEADLINE) == 0
    assert daemon.log.count("stopped") == 2
    for pid in ready_pids(daemon):
        wait_until(lambda pid=pid: not _alive(pid), what=f"worker {pid} to exit")


@pytest.mark.parametrize(
    "workers, signum",
    [(1, signal.SIGTERM), (1, signal.SIGINT), (2, signal.SIGTERM), (2, signal.SIGINT)],
)
def test_a_second_stop_signal_forces_the_stop(workdir, serve, workers, signum):
    port = free_port()
    # Graceful, the stop would wait a minute for the message in flight.
    extra = plugin_table(workdir, "daemonplug:Marked", "delay = 60.0\n")
    config = write_config(workdir, port, ["daemonplug:Marked"], workers=workers, extra=extra)
    text = config.read_text().replace("shutdown_grace = 10.0", "shutdown_grace = 60.0")
    config.write_text(text.replace("timeout = 15.0", "timeout = 120.0"))
    daemon = serve(config, port)
    daemon.wait_ready(workers=workers)
    workers_pids = ready_pids(daemon)

    result: dict[str, Any] = {}
    thread = slow_client(port, result)
    [delivering] = wait_until(
        lambda: list(daemon.out.glob("*.delivering")), what="delivery to start"
    )
    busy = int(delivering.read_text())
    daemon.proc.send_signal(signum)
    wait_until(
        lambda: daemon.log.count("stopping: no new connections") == workers,
        what="the graceful stop to begin",
    )
    time.sleep(0.5)
    assert daemon.proc.poll() is None  # waiting for the message in flight
    started = time.monotonic()
    daemon.proc.send_signal(signum)
    assert daemon.proc.wait(timeout=DEADLINE) == 0
    assert time.monotonic() - started < 5.0

    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert "sendmail" not in result  # cut off: never answered 250
    assert daemon.records() == []
    log = daemon.log
    name = signal.Signals(signum).name
    if workers == 1:
        assert f"[{busy}] bonzo.daemon: second {name}: forcing the stop" in log
    else:  # the supervisor passes it on to the workers (as SIGUSR1)
        assert f"[{daemon.proc.pid}] bonzo.daemon: second {name}: forcing the stop" in log
        assert f"[{busy}] bonzo.daemon: the supervisor's second stop: forcing the stop" in log
    # The plugins' shutdown hooks still ran, in every worker.
    marks = sorted(int(p.name.split("-")[1]) for p in daemon.out.glob("shutdown-*"))
    assert marks == sorted(workers_pids)
    assert log.count("stopped") == workers


def _stopping_while_delivering(
    workdir: Path, serve: Any, plugin: str, grace: float
) -> tuple[Daemon, threading.Thread, dict[str, Any]]:
    """A daemon whose ``plugin`` (with a 120 s hook time limit) is delivering
    a client's message, SIGTERM sent: the daemon, the client's thread and
    its result."""
    port = free_port()
    extra = plugin_table(workdir, plugin)
    config = write_config(workdir, port, [plugin], extra=extra)
    text = config.read_text().replace("shutdown_grace = 10.0", f"shutdown_grace = {grace}")
    config.write_text(text.replace("timeout = 15.0", "timeout = 120.0"))
    daemon = serve(config, port)
    daemon.wait_ready()
    result: dict[str, Any] = {}
    thread = slow_client(port, result)
    wait_until(lambda: list(daemon.out.glob("*.delivering")), what="delivery to start")
    daemon.proc.send_signal(signal.SIGTERM)
    return daemon, thread, result


def test_a_second_sigterm_ends_a_plugin_call_that_ignores_its_cancellation(workdir, serve):
    daemon, thread, result = _stopping_while_delivering(
        workdir, serve, "daemonplug:Stubborn", grace=1.0
    )
    # The grace period ends; the plugin call goes on (bounded by its timeout).
    wait_until(lambda: "waiting for 1 session(s)" in daemon.log, what="the wait for the plugin")
    assert "a second SIGTERM forces the stop" in daemon.log
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=DEADLINE) == 0
    assert time.monotonic() - started < 5.0
    thread.join(DEADLINE)
    assert "sendmail" not in result
    log = daemon.log
    assert "plugin 'daemonplug:Stubborn' (bonzo_deliver) ignored its cancellation" in log
    assert log.count("a second SIGTERM forces the stop") == 1  # not once it was forced
    assert "stopped" in log


def test_a_forced_stop_that_does_not_end_exits_after_a_bound(workdir, serve):
    # The session's cleanup (its disconnect observer, with the full hook
    # time limit) still runs after the forced stop: Bonzo exits anyway.
    daemon, thread, _ = _stopping_while_delivering(
        workdir, serve, "daemonplug:Lingering", grace=60.0
    )
    wait_until(lambda: "stopping: no new connections" in daemon.log, what="the stop to begin")
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=DEADLINE) == 0
    assert 4.0 < time.monotonic() - started < 10.0
    thread.join(DEADLINE)
    # (The greeting check of wait_ready lingers too, in its cleanup.)
    over = r"ERROR .* the forced stop is not over after 5s \(\d session\(s\) left\): exiting now"
    assert re.search(over, daemon.log)


def test_a_hook_that_ignores_its_time_limit_is_answered_451_and_bonzo_still_stops(workdir, serve):
    port = free_port()
    extra = plugin_table(workdir, "daemonplug:Stubborn")
    config = write_config(workdir, port, ["daemonplug:Stubborn"], extra=extra)
    config.write_text(config.read_text().replace("timeout = 15.0", "timeout = 0.5"))
    daemon = serve(config, port)
    daemon.wait_ready()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=DEADLINE) as c:
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail("a@example.org", ["slow@example.org"], MESSAGE)
        assert info.value.smtp_code == 451
        assert time.monotonic() - started < 5.0
        assert c.noop()[0] == 250  # the session goes on
    assert "(bonzo_deliver): no answer within 0.5s (its time limit), and it ignored" in daemon.log
    # The abandoned call, still held, does not keep the process from ending.
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=DEADLINE) == 0
    assert "stopped" in daemon.log


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "systemd"])
def test_a_stop_signal_reaching_every_process_stops_gracefully(workdir, serve, signum):
    # Ctrl-C signals the whole process group, and so does systemd's default
    # KillMode=control-group with SIGTERM: the workers get the signal and the
    # supervisor's request; that is one stop, not two.
    port = free_port()
    daemon = serve(write_config(workdir, port, workers=2, store="delay = 2.0\n"), port)
    daemon.wait_ready(workers=2)
    result: dict[str, Any] = {}
    thread = slow_client(port, result)
    wait_until(lambda: list(daemon.out.glob("*.delivering")), what="delivery to start")
    os.killpg(daemon.proc.pid, signum)
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert result == {"sendmail": {}}
    assert [r["to"] for r in daemon.records()] == [["slow@example.org"]]
    assert daemon.proc.wait(timeout=DEADLINE) == 0
    assert "forcing" not in daemon.log
    assert daemon.log.count("stopped") == 2
    last = daemon.log.strip().splitlines()[-1]
    assert last.endswith("every worker has ended: the supervisor exits with status 0")


def test_a_workers_own_sigterm_after_the_supervisors_request_is_the_same_stop(workdir, serve):
    # The order a group's SIGTERM and the supervisor's request reach a worker
    # in is the kernel's (a worker with both pending gets SIGUSR2 first).
    port = free_port()
    daemon = serve(write_config(workdir, port, workers=2, store="delay = 2.0\n"), port)
    daemon.wait_ready(workers=2)
    workers = ready_pids(daemon)
    result: dict[str, Any] = {}
    thread = slow_client(port, result)
    wait_until(lambda: list(daemon.out.glob("*.delivering")), what="delivery to start")
    daemon.proc.send_signal(signal.SIGTERM)  # the supervisor asks its workers
    wait_until(
        lambda: daemon.log.count("stopping: no new connections") == 2, what="both workers to stop"
    )
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):  # the idle one may be gone
            os.kill(pid, signal.SIGTERM)
    thread.join(DEADLINE)
    assert result == {"sendmail": {}}
    assert daemon.proc.wait(timeout=DEADLINE) == 0
    assert "forcing" not in daemon.log
    assert "SIGTERM: already stopping (the supervisor asked first)" in daemon.log


@pytest.mark.expect_errors
@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_that_fails_says_why_in_the_log_file(workdir, serve, workers):
    # With several workers its exception went with os._exit(): the log said
    # only "exited with status 1; restarting", over and over; with one, it
    # went to stderr alone, never to the [logging] file.
    port = free_port()
    prelude = (
        "def _fails(*args, **kwargs):\n    raise RuntimeError('the worker broke')\n"
        "bonzo.cli._run_worker = _fails"
    )
    config = write_config(workdir, port, workers=workers)
    config.write_text(
        config.read_text().replace('level = "info"', 'level = "info"\nfile = "b.log"')
    )
    daemon = serve(config, port, prelude)
    assert daemon.proc.wait(timeout=DEADLINE) == 1
    log = (workdir / "b.log").read_text()
    assert "RuntimeError: the worker broke" in log
    if workers == 1:
        assert re.search(r"CRITICAL .* bonzo serve failed", log)
    else:
        assert re.search(r"CRITICAL .* worker [01] \(pid \d+\) failed", log)
        assert "workers keep dying" in log


@pytest.mark.parametrize("pdeathsig", [True, False], ids=["prctl", "polling"])
def test_workers_die_with_their_supervisor(workdir, serve, pdeathsig):
    port = free_port()
    config = write_config(workdir, port, workers=2)
    # Without prctl(PR_SET_PDEATHSIG), the workers notice by checking their parent.
    prelude = "" if pdeathsig else "bonzo.cli._parent_death_signal = lambda: None"
    daemon = serve(config, port, prelude)
    daemon.wait_ready(workers=2)
    workers = ready_pids(daemon)
    assert len(workers) == 2 and daemon.proc.pid not in workers

    daemon.proc.kill()
    daemon.proc.wait(timeout=DEADLINE)
    for pid in workers:
        wait_until(lambda pid=pid: not _alive(pid), timeout=5.0, what=f"worker {pid} to exit")
    assert daemon.log.count(f"the supervisor (pid {daemon.proc.pid}) is gone: stopping") == 2

    # The port is free again: a new daemon starts and serves.
    again = serve(config, port)
    again.wait_ready(workers=2)
    assert send(port) == {}
    assert again.stop() == 0


def test_a_new_daemon_starts_while_the_workers_of_a_killed_supervisor_finish(workdir, serve, env):
    """kill -9 of the supervisor: its workers let go of what a new daemon
    needs at once — the SMTP port, the pid file's lock and the metrics port —
    while they finish their messages; `bonzo reload` no longer finds the
    old daemon."""
    port, metrics_port = free_port(), free_port()
    extra = f'\n[metrics]\naddress = "127.0.0.1"\nport = {metrics_port}\n'
    # The delivery outlasts the new daemon's start, even on a loaded machine.
    config = write_config(workdir, port, workers=2, store="delay = 8.0\n", extra=extra)
    config.write_text(config.read_text().replace("workers = 2", 'workers = 2\npid_file = "b.pid"'))
    daemon = serve(config, port)
    daemon.wait_ready(workers=2)
    workers = ready_pids(daemon)
    result: dict[str, Any] = {}
    thread = slow_client(port, result)
    wait_until(lambda: list(daemon.out.glob("*.delivering")), what="delivery to start")

    daemon.proc.kill()
    daemon.proc.wait(timeout=DEADLINE)
    wait_until(lambda: daemon.log.count("is gone: stopping") == 2, what="the workers to notice")
    assert any(_alive(pid) for pid in workers)  # one still delivers
    stale = bonzo("reload", "-c", str(config), env=env, cwd=workdir)
    assert stale.returncode == 1 and "no bonzo daemon holds it" in stale.stderr, stale.stderr
    again = serve(config, port)
    again.wait_ready(workers=2)
    assert any(_alive(pid) for pid in workers)  # started before the old worker was done
    thread.join(DEADLINE)
    assert result == {"sendmail": {}}  # the message in flight was finished, not lost
    assert send(port) == {}
    assert again.stop() == 0


def test_a_worker_checks_that_its_supervisor_is_still_its_parent():
    from bonzo.cli import _watch_supervisor

    async def watch(supervisor: int, timeout: float) -> list[str]:
        calls: list[str] = []
        try:
            await asyncio.wait_for(
                _watch_supervisor(supervisor, lambda: calls.append("gone"), interval=0.01),
                timeout,
            )
        except asyncio.TimeoutError:
            calls.append("still watching")
        return calls

    assert asyncio.run(watch(os.getppid(), 0.2)) == ["still watching"]
    assert asyncio.run(watch(os.getpid(), DEADLINE)) == ["gone"]  # not its own parent


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_and_a_message_in_flight_finishes_on_the_old_configuration(
    workdir, serve, workers
):
    """SIGHUP: the configuration is read and checked again; new sessions get
    the new one (here: a header plugin added), while a message in flight
    finishes on the old; a configuration that does not load is logged and
    the running one kept. With several workers, each reloads."""
    port = free_port()
    config = write_config(workdir, port, workers=workers, store="delay = 2.0\n")
    daemon = serve(config, port)
    daemon.wait_ready(workers=workers)
    result: dict[str, Any] = {}
    thread = slow_client(port, result)
    wait_until(lambda: list(daemon.out.glob("*.delivering")), what="delivery to start")
    two = write_config(
        workdir,
        port,
        enabled=["headers", STORE],
        workers=workers,
        store="delay = 2.0\n",
        extra='\n[plugins.headers]\nadd = { "X-Config" = "two" }\n',
        name="two.toml",
    )
    config.write_text(two.read_text())
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.log.count("reloaded ") == workers, what="every worker to reload")
    thread.join(DEADLINE)
    assert not thread.is_alive()
    assert result == {"sendmail": {}}
    [slow] = daemon.records()
    assert "X-Config" not in slow["content"]  # it began on the old configuration
    assert send(port, "after@example.org") == {}
    [after] = [r for r in daemon.records() if r["to"] == ["after@example.org"]]
    assert "X-Config: two\r\n" in after["content"]

    config.write_text("this is [not TOML")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: "still running the previous configuration" in daemon.log,
        what="the refused reload",
    )
    assert send(port, "still@example.org") == {}
    [still] = [r for r in daemon.records() if r["to"] == ["still@example.org"]]
    assert "X-Config: two\r\n" in still["content"]
    assert daemon.stop() == 0
    assert "restarting" not in daemon.log and "Traceback" not in daemon.log


def auth_config(workdir: Path, port: int, workers: int = 1) -> Path:
    """A configuration with AUTH (passwd, alice:pw) in plaintext on 127.0.0.1."""
    from bonzo.auth import hash_password

    (workdir / "passwd").write_text(f"alice:{hash_password('pw')}\n")
    extra = '\n[plugins.passwd]\nfile = "passwd"\n'
    config = write_config(workdir, port, enabled=["passwd", STORE], workers=workers, extra=extra)
    text = config.read_text().replace(f"port = {port}\n", f"port = {port}\nauth_plaintext = true\n")
    config.write_text(text)
    return config


def auth_and_send(port: int, rcpt: str = "b@example.org") -> None:
    """A wrong password, then the right one, and a message to ``rcpt``."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=DEADLINE) as c:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login("alice", "wrong")
        assert c.login("alice", "pw")[0] == 235
        assert c.sendmail("alice@example.org", [rcpt], MESSAGE) == {}


def test_reloads_keep_the_password_threads_of_a_worker(workdir, serve):
    """AUTH after each of several reloads runs in the threads it ran in
    before: each new thread that runs scrypt keeps its 16 MiB buffer in a
    malloc arena of its own (RSS grew ~16 MB per reload)."""
    port = free_port()
    config = auth_config(workdir, port)
    daemon = serve(config, port)
    daemon.wait_ready()
    (pid,) = map(int, re.findall(r"ready \(pid (\d+)\)", daemon.log))

    def tasks() -> set[str]:
        return set(os.listdir(f"/proc/{pid}/task"))

    auth_and_send(port)
    before = tasks()
    stopped = "the previous configuration has stopped"
    for n in range(1, 4):
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda n=n: daemon.log.count(stopped) == n, what=f"reload {n}")
        auth_and_send(port)
        assert tasks() <= before, f"new threads after reload {n}"
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log


def test_a_session_the_reload_outlasts_is_told_to_connect_again(workdir, serve):
    """Sessions still on the previous configuration shutdown_grace seconds
    after a reload are ended: the server goes on, so their 421 says to
    connect again (it said "Server shutting down"). A stop still says that."""
    port = free_port()
    config = write_config(workdir, port)
    config.write_text(config.read_text().replace("shutdown_grace = 10.0", "shutdown_grace = 0.5"))
    daemon = serve(config, port)
    daemon.wait_ready()

    def idle_session() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        assert s.recv(512).startswith(b"220 ")
        s.sendall(b"EHLO client.test\r\n")
        assert s.recv(4096).startswith(b"250")
        return s

    with idle_session() as s:
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "the previous configuration has stopped" in daemon.log)
        assert s.recv(512) == b"421 4.3.2 Configuration reloaded, please connect again\r\n"
    with idle_session() as s:
        daemon.proc.send_signal(signal.SIGTERM)
        assert s.recv(512) == b"421 4.3.2 Server shutting down\r\n"
    assert daemon.proc.wait(timeout=DEADLINE) == 0


def test_auth_works_after_reloads_and_worker_restarts(workdir, serve):
    """The password threads outlive a configuration but not a process: a
    worker the supervisor starts again (a fork) checks passwords in threads
    of its own, after reloads too."""
    port = free_port()
    config = auth_config(workdir, port, workers=2)
    daemon = serve(config, port)
    daemon.wait_ready(workers=2)
    stopped = "the previous configuration has stopped"
    for n in range(1, 3):
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda n=n: daemon.log.count(stopped) == 2 * n, what=f"reload {n}")
        auth_and_send(port)
    first = {int(p) for p in re.findall(r"ready \(pid (\d+)\)", daemon.log)}
    for n, victim in enumerate(sorted(first), 3):
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda n=n: daemon.log.count("ready (pid") == n, what="a new worker")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.log.count(stopped) == 6, what="the last reload")
    for _ in range(4):
        auth_and_send(port, "restarted@example.org")
    pids = {r["pid"] for r in daemon.records() if r["to"] == ["restarted@example.org"]}
    assert pids and not pids & first
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log


def _hold_the_loop(daemon: Daemon) -> threading.Thread:
    """A client whose EHLO the Lifecycle plugin answers after blocking the
    event loop of the process that took it: the signals sent meanwhile are
    handled in one loop iteration once it is free."""
    (daemon.out / "blocking").unlink(missing_ok=True)

    def client() -> None:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=DEADLINE) as c:
            c.ehlo("client.test")

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    wait_until(lambda: (daemon.out / "blocking").exists(), what="the loop to be held")
    return thread


def _lifecycle(workdir: Path) -> list[str]:
    events = (workdir / "out" / "lifecycle.txt").read_text().split()
    return [e for e in events if not e.isdigit()]


def test_two_sighups_in_one_loop_iteration_make_two_reloads_in_turn(workdir, serve):
    """Two SIGHUPs the event loop takes together (here it is held by a
    plugin; any stall, or two reload requests at once, does it): the first
    reloads, the second reloads again once it has ended (the file may have
    changed since the first read it). Two reloads at once would both take
    the running configuration's sockets: one fails, and its started plugins
    (a queue runner) went on running."""
    port = free_port()
    table = f'\n[plugins."daemonplug:Lifecycle"]\nout = "{workdir / "out"}"\n'
    config = write_config(workdir, port, enabled=["daemonplug:Lifecycle", STORE], extra=table)
    daemon = serve(config, port)
    daemon.wait_ready()
    thread = _hold_the_loop(daemon)
    daemon.proc.send_signal(signal.SIGHUP)
    time.sleep(0.3)  # two deliveries, not one pending signal
    daemon.proc.send_signal(signal.SIGHUP)
    thread.join(DEADLINE)
    assert not thread.is_alive()
    stopped = "the previous configuration has stopped"
    wait_until(lambda: daemon.log.count(stopped) == 2, what="both previous configurations to stop")
    assert "SIGHUP: a reload is under way; reloading again once it ends" in daemon.log
    assert send(port) == {}
    assert daemon.stop() == 0
    log = daemon.log
    assert log.count("SIGHUP: reloading the configuration") == 2
    assert log.count("reloaded ") == 2
    assert "added twice" not in log and "never retrieved" not in log
    assert "Traceback" not in log and "ERROR" not in log
    # Every configuration started was shut down: no plugin left running.
    events = _lifecycle(workdir)
    assert events.count("startup") == events.count("shutdown") == 3


def test_a_sighup_while_the_server_starts_reloads_once_it_serves(workdir, serve):
    """A SIGHUP while the plugins start (a worker the supervisor has just
    started gets it too) waits for the server to serve, then reloads: a
    reload then would race the start for the listening sockets."""
    port = free_port()
    out = workdir / "out"
    table = f'\n[plugins."daemonplug:Lifecycle"]\nout = "{out}"\nstart = 1.0\n'
    config = write_config(workdir, port, enabled=["daemonplug:Lifecycle", STORE], extra=table)
    daemon = serve(config, port)
    wait_until(lambda: (out / "starting").exists(), what="the plugins to start")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_ready()
    wait_until(lambda: "reloaded " in daemon.log, what="the reload")
    assert "SIGHUP: still starting; reloading once serving" in daemon.log
    assert send(port) == {}
    assert daemon.stop() == 0
    log = daemon.log
    assert log.count("reloaded ") == 1
    assert "Traceback" not in log and "ERROR" not in log
    assert _lifecycle(workdir) == ["startup", "startup", "shutdown", "shutdown"]


def test_a_sighup_while_the_workers_reload_waits_for_their_reports(workdir, serve):
    """A second SIGHUP that reaches the supervisor before every worker has
    reported on the reload is not passed on then (its report on the first
    would count for the second, and workers started later would run a
    configuration the others never took), but once they have reported."""
    port = free_port()
    table = f'\n[plugins."daemonplug:Lifecycle"]\nout = "{workdir / "out"}"\n'
    enabled = ["daemonplug:Lifecycle", STORE]
    config = write_config(workdir, port, enabled=enabled, workers=2, extra=table)
    daemon = serve(config, port)
    daemon.wait_ready(workers=2)
    thread = _hold_the_loop(daemon)  # one worker's loop: it cannot reload yet
    daemon.proc.send_signal(signal.SIGHUP)
    checking = "SIGHUP: checking the configuration before the workers reload it"
    wait_until(lambda: checking in daemon.log, what="the supervisor to take the reload")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "the workers are still reloading" in daemon.log, what="the second SIGHUP")
    assert "reloading again once they have" in daemon.log
    thread.join(DEADLINE)
    assert not thread.is_alive()
    wait_until(lambda: daemon.log.count("reloaded ") == 4, what="each worker to reload twice")
    assert daemon.stop() == 0
    log = daemon.log
    assert log.count(checking) == 2
    assert log.count("SIGHUP: reloading the configuration") == 4  # twice in each worker
    assert "under way" not in log
    assert "Traceback" not in log and "ERROR" not in log
    assert _lifecycle(workdir).count("startup") == 6
    assert _lifecycle(workdir).count("shutdown") == 6


def test_files_changed_while_the_workers_reload_are_warned_about(workdir, serve):
    """Each worker reads the files again after the supervisor's check: a
    change in between (a renewal copying them) left workers on different
    versions, each saying "reloaded", unwarned."""
    port = free_port()
    table = f'\n[plugins."daemonplug:Lifecycle"]\nout = "{workdir / "out"}"\nblock = 2.0\n'
    enabled = ["daemonplug:Lifecycle", STORE]
    config = write_config(workdir, port, enabled=enabled, workers=2, extra=table)
    daemon = serve(config, port)
    daemon.wait_ready(workers=2)
    thread = _hold_the_loop(daemon)  # one worker reads the file late
    daemon.proc.send_signal(signal.SIGHUP)
    # The other worker has reloaded: the supervisor's check is over.
    wait_until(lambda: daemon.log.count("reloaded /") == 1, what="one worker to reload")
    config.write_text(config.read_text().replace("block = 2.0", "block = 2.5"))
    thread.join(DEADLINE)
    wait_until(lambda: daemon.log.count("reloaded /") == 2, what="both workers to reload")
    wait_until(lambda: "changed while the workers read" in daemon.log, what="the warning")
    assert (
        f"reload: {config} or its certificate files changed while the workers read them again: "
        "workers may run different versions; reload again once the files are complete"
    ) in daemon.log
    assert daemon.stop() == 0


def test_a_pending_sighup_goes_on_when_a_worker_never_reports(workdir, serve):
    """A SIGHUP held for the workers' reports waits no longer than the
    limit: past it, the supervisor reloads as asked, naming the worker that
    did not report (it waited for the next signal, however long)."""
    port = free_port()
    table = f'\n[plugins."daemonplug:Lifecycle"]\nout = "{workdir / "out"}"\nblock = 6.0\n'
    enabled = ["daemonplug:Lifecycle", STORE]
    config = write_config(workdir, port, enabled=enabled, workers=2, extra=table)
    daemon = serve(config, port, "bonzo.cli._RELOAD_REPORT_LIMIT = 1.0")
    daemon.wait_ready(workers=2)
    thread = _hold_the_loop(daemon)  # one worker cannot report for 6 s
    daemon.proc.send_signal(signal.SIGHUP)
    checking = "SIGHUP: checking the configuration before the workers reload it"
    wait_until(lambda: checking in daemon.log, what="the supervisor to take the reload")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "the workers are still reloading" in daemon.log, what="the second SIGHUP")
    late = "have not reported on the reload in 1s; reloading again as asked"
    wait_until(lambda: late in daemon.log, what="the limit to pass")
    assert thread.is_alive()  # the worker is still held: the limit, not its report
    assert daemon.log.count(checking) == 2
    thread.join(DEADLINE)
    assert not thread.is_alive()
    wait_until(lambda: daemon.log.count("reloaded ") == 4, what="each worker to reload twice")
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log and "ERROR" not in daemon.log


@pytest.mark.skipif(not hasattr(signal, "SIGRTMIN"), reason="no real-time signals here")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_sighup_sent_to_one_worker_reloads_every_worker(workdir, serve, loop):
    """``kill -HUP`` of one worker's pid (found with ps): that worker alone
    reloaded, and the two served different configurations, unlogged. It is
    passed to the supervisor, which reloads them all."""
    port = free_port()
    table = f'\n[plugins."daemonplug:Lifecycle"]\nout = "{workdir / "out"}"\n'
    enabled = ["daemonplug:Lifecycle", STORE]
    config = write_config(workdir, port, enabled=enabled, workers=2, extra=table)
    if loop == "uvloop":
        pytest.importorskip("uvloop", reason="pip install 'bonzo[uvloop]'")
        config.write_text(config.read_text().replace("[server]\n", '[server]\nloop = "uvloop"\n'))
    daemon = serve(config, port)
    daemon.wait_ready(workers=2)
    pids = ready_pids(daemon)
    assert len(pids) == 2 and daemon.proc.pid not in pids
    os.kill(pids[0], signal.SIGHUP)
    wait_until(lambda: daemon.log.count("reloaded ") == 2, what="both workers to reload")
    log = daemon.log
    assert (
        f"SIGHUP sent to this worker (pid {pids[0]}): passed to the supervisor "
        f"(pid {daemon.proc.pid}), which reloads every worker"
    ) in log
    assert log.count("SIGHUP: checking the configuration before the workers reload it") == 1
    assert log.count("SIGHUP: reloading the configuration") == 2
    assert send(port) == {}
    assert daemon.stop() == 0
    assert "changed while the workers read" not in daemon.log  # the files did not
    assert "Traceback" not in daemon.log and "ERROR" not in daemon.log
    assert _lifecycle(workdir).count("startup") == 4


def test_a_reload_logs_the_warnings_a_start_logs(workdir, serve):
    """A file cut short before its [plugins] table: at a start "no enabled
    plugin accepts recipients" is logged; a reload of it said nothing, and
    every RCPT got 550 (a bounce for every sender)."""
    port = free_port()
    config = write_config(workdir, port)
    daemon = serve(config, port)
    daemon.wait_ready()
    text = config.read_text()
    cut = text[: text.index("[plugins]")]
    config.write_text(cut.replace("workers = 1", 'workers = 1\npid_file = "other.pid"'))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded " in daemon.log, what="the reload")
    log = daemon.log
    assert "reload: no enabled plugin accepts recipients (bonzo_rcpt)" in log
    assert "reload: server.pid_file takes effect at a restart" in log
    assert "new sessions on the new configuration (plugins in order: none)" in log
    assert daemon.stop() == 0


def test_a_sighup_while_the_configuration_loads_is_logged_not_fatal(workdir, serve):
    """SIGHUP's default action ended the daemon, unlogged, while its plugins
    were configured (and systemd takes a death by SIGHUP for a clean exit)."""
    port = free_port()
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    table = f'\n[plugins."daemonplug:SlowConfigure"]\nout = "{out}"\n'
    config = write_config(workdir, port, enabled=["daemonplug:SlowConfigure", STORE], extra=table)
    daemon = serve(config, port)
    wait_until(lambda: (out / "configuring").exists(), what="the configuration to load")
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_ready()
    assert daemon.proc.poll() is None
    assert "SIGHUP: not serving yet, nothing to reload; ignored" in daemon.log
    assert send(port) == {}
    assert daemon.stop() == 0


def test_the_connection_limits_count_the_sessions_a_reload_left_running(workdir, serve):
    """The sessions still open on the previous configuration count toward
    the new one's limits: each reload gave a client a fresh quota beside
    what it held (48 sessions from one address with a limit of 5)."""
    port = free_port()
    config = write_config(workdir, port, extra="\n[limits]\nmax_connections_per_ip = 2\n")
    daemon = serve(config, port)
    daemon.wait_ready()

    def connect() -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        return sock, sock.recv(512)

    held = [connect(), connect()]
    try:
        assert all(greeting.startswith(b"220 ") for _, greeting in held)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded " in daemon.log, what="the reload")
        extra, greeting = connect()
        extra.close()
        assert greeting.startswith(b"421 4.7.0 Too many connections from your address")
        # One of the old sessions ends: its place is free again.
        held.pop()[0].close()

        def third() -> bool:
            sock, greeting = connect()
            sock.close()
            return greeting.startswith(b"220 ")

        wait_until(third, what="the freed place")
    finally:
        for sock, _ in held:
            sock.close()
    assert daemon.stop() == 0


def test_a_stop_while_a_reload_retires_tells_its_sessions_the_server_stops(workdir, serve):
    # Not "Configuration reloaded, please connect again": nobody will answer.
    port = free_port()
    daemon = serve(write_config(workdir, port), port)
    daemon.wait_ready()
    idle = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    try:
        assert idle.recv(512).startswith(b"220 ")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded " in daemon.log, what="the reload")
        daemon.proc.send_signal(signal.SIGTERM)
        said = b""
        while not said.endswith(b"\r\n"):
            chunk = idle.recv(512)
            if not chunk:
                break
            said += chunk
        assert said == b"421 4.3.2 Server shutting down\r\n"
    finally:
        idle.close()
    assert daemon.proc.wait(DEADLINE) == 0


def test_a_stop_during_a_reload_stops_the_new_configuration_too(workdir, serve):
    """SIGTERM while a reload's plugins start: the stop waits for that
    reload, then stops every configuration; the new one was left serving,
    its plugins never shut down (a queue runner cut at exit)."""
    port = free_port()
    out = workdir / "out"
    table = f'\n[plugins."daemonplug:Lifecycle"]\nout = "{out}"\nstart = 1.5\n'
    config = write_config(workdir, port, enabled=["daemonplug:Lifecycle", STORE], extra=table)
    daemon = serve(config, port)
    daemon.wait_ready()
    (out / "starting").unlink()
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: (out / "starting").exists(), what="the reload's plugins to start")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=DEADLINE) == 0
    log = daemon.log
    assert "stopping: the reload under way ends first" in log
    assert "Traceback" not in log and "ERROR" not in log
    assert _lifecycle(workdir) == ["startup", "startup", "shutdown", "shutdown"]


SHARED_SOURCE = """
\"\"\"A journal plugin enabled as a module or as an instance: the same object in
every configuration of the process that enables it.\"\"\"

from pathlib import Path

from bonzo import Accept


class Journal:
    def __init__(self):
        self.file = None

    def bonzo_configure(self, config):
        self.out = Path(config["out"])

    def event(self, what):
        with open(self.out / "events.txt", "a") as f:
            f.write(what + "\\n")

    def bonzo_startup(self):
        self.event("startup" if self.file is None else "startup while started")
        self.file = open(self.out / "journal.txt", "a")

    def bonzo_reload(self):
        self.event("reload")

    def bonzo_shutdown(self):
        self.event("shutdown")
        self.file.close()

    def bonzo_rcpt(self):
        return Accept()

    def bonzo_deliver(self, envelope):
        self.file.write(envelope.rcpt_tos[0] + "\\n")
        self.file.flush()
        return Accept()


JOURNAL = Journal()
_module = Journal()
bonzo_configure = _module.bonzo_configure
bonzo_startup = _module.bonzo_startup
bonzo_reload = _module.bonzo_reload
bonzo_shutdown = _module.bonzo_shutdown
bonzo_rcpt = _module.bonzo_rcpt
bonzo_deliver = _module.bonzo_deliver
"""


@pytest.mark.parametrize("name", ["sharedplug.journal", "sharedplug.journal:JOURNAL"])
def test_a_reload_leaves_a_module_or_instance_plugin_running_for_the_new_configuration(
    workdir, serve, name
):
    """A plugin enabled as a module or an instance is the same object in the
    configuration a reload retires and in the new one: it is not started
    again, and the retiring one does not shut it down under the new one's
    feet; it is shut down when the last configuration enabling it stops."""
    (workdir / "plugins" / "sharedplug").mkdir()
    (workdir / "plugins" / "sharedplug" / "__init__.py").write_text("")
    (workdir / "plugins" / "sharedplug" / "journal.py").write_text(SHARED_SOURCE)
    port = free_port()
    table = f'\n[plugins."{name}"]\nout = "{workdir / "out"}"\n'
    config = write_config(workdir, port, enabled=[name], extra=table)
    daemon = serve(config, port)
    daemon.wait_ready()
    assert send(port, "one@example.org") == {}
    stopped = "the previous configuration has stopped"

    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: stopped in daemon.log, what="the previous configuration to stop")
    assert send(port, "two@example.org") == {}  # its journal is still open
    events = workdir / "out" / "events.txt"
    assert events.read_text().split("\n") == ["startup", "reload", ""]

    # A configuration without it: the retiring one was the last to enable it.
    write_config(workdir, port)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: daemon.log.count(stopped) == 2, what="the previous configuration to stop")
    assert events.read_text().split("\n") == ["startup", "reload", "shutdown", ""]
    assert send(port, "three@example.org") == {}
    assert daemon.stop() == 0
    journal = (workdir / "out" / "journal.txt").read_text()
    assert journal == "one@example.org\ntwo@example.org\n"
    assert [r["to"] for r in daemon.records()] == [["three@example.org"]]
    assert events.read_text().split("\n") == ["startup", "reload", "shutdown", ""]
    assert "Traceback" not in daemon.log


TAG_SOURCE = """
\"\"\"A module plugin keeping its configuration in module state.\"\"\"

tag = None


def bonzo_configure(config):
    global tag
    tag = config["tag"]


def bonzo_message(envelope):
    envelope.add_header("X-Tag", tag)
"""


def test_a_failed_reload_gives_a_module_plugin_its_running_configuration_back(workdir, serve):
    """A plugin enabled as a module is configured by a reload before the
    reload fails (here at a later plugin's table): it gets the running
    configuration's table again, so sessions go on as configured."""
    (workdir / "plugins" / "tagplug").mkdir()
    (workdir / "plugins" / "tagplug" / "__init__.py").write_text("")
    (workdir / "plugins" / "tagplug" / "tag.py").write_text(TAG_SOURCE)
    port = free_port()
    enabled = ["tagplug.tag", "headers", STORE]
    table = '\n[plugins."tagplug.tag"]\ntag = "%s"\n'
    config = write_config(workdir, port, enabled, extra=table % "one")
    daemon = serve(config, port)
    daemon.wait_ready()
    write_config(
        workdir,
        port,
        enabled,
        extra=table % "two" + "[plugins.headers]\nadd = 5\n",
    )
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: "still running the previous configuration" in daemon.log,
        what="the refused reload",
    )
    assert "plugins.headers" in daemon.log
    assert "plugin(s) 'tagplug.tag' configured again with the running configuration" in daemon.log
    assert send(port) == {}
    [record] = daemon.records()
    assert "X-Tag: one\r\n" in record["content"]
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log


def test_a_reload_says_that_logging_changes_wait_for_a_restart(workdir, serve):
    port = free_port()
    config = write_config(workdir, port)
    daemon = serve(config, port)
    daemon.wait_ready()
    config.write_text(config.read_text().replace('level = "info"', 'level = "warning"'))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded " in daemon.log, what="the reload")
    assert "reload: [logging] takes effect at a restart" in daemon.log
    assert send(port) == {}
    wait_until(lambda: daemon.records() or None, what="the delivery")
    assert daemon.stop() == 0
    assert "INFO" in daemon.log.split("takes effect at a restart", 1)[1]  # still info


def test_a_reload_warns_once_about_workers_compared_with_what_runs(workdir, serve):
    """The supervisor warns (not each worker too), and against the workers
    running: after workers = 3 and back to 2, the two running are no
    change."""
    port = free_port()
    config = write_config(workdir, port, workers=2)
    daemon = serve(config, port)
    daemon.wait_ready(workers=2)
    warning = "reload: server.workers and server.loop take effect at a restart"
    for workers, warnings in ((3, 1), (2, 1)):
        text = re.sub(r"workers = \d", f"workers = {workers}", config.read_text())
        config.write_text(text)
        reloads = daemon.log.count("reloaded ")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda r=reloads: daemon.log.count("reloaded ") == r + 2, what="the reload")
        assert daemon.log.count(warning) == warnings
    assert send(port) == {}
    assert daemon.stop() == 0


@pytest.mark.parametrize("reports", [True, False], ids=["reported", "unreported"])
def test_a_reload_the_workers_refused_never_stops_a_restarted_worker(workdir, serve, reports):
    """A reload whose plugins fail to start is refused by the workers (they
    keep the previous configuration); a worker that dies later is started on
    the previous configuration too, instead of failing on the refused one
    and stopping the whole server: at once when the workers' reports came
    (the supervisor hears of the refusal), or after failing on the new one
    when they did not (a worker that died before reporting, a platform
    without real-time signals)."""
    port = free_port()
    config = write_config(workdir, port, workers=2)
    daemon = serve(config, port, "" if reports else "bonzo.cli._RELOAD_REPORTS = None")
    daemon.wait_ready(workers=2)
    assert send(port) == {}
    [victim] = {r["pid"] for r in daemon.records()}
    two = write_config(workdir, port, [STORE, "daemonplug:FailsAtStartup"], workers=2,
                       name="two.toml")  # fmt: skip
    config.write_text(two.read_text())
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: daemon.log.count("the new configuration failed to start") == 2,
        what="both workers to refuse the reload",
    )
    if reports:
        wait_until(
            lambda: "workers started from now on run the previous one" in daemon.log,
            what="the supervisor to hear of it",
        )
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: daemon.log.count("ready (pid") == 3, what="a new worker")
    fallback = "failed to start on the reloaded configuration; starting it on the previous"
    assert (fallback in daemon.log) is not reports
    for n in range(4):
        assert send(port, f"after{n}@example.org") == {}
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0


def test_a_worker_started_after_a_refused_reload_runs_what_the_others_run(workdir, serve):
    """The workers tell the supervisor whether they took a reload: after one
    they all refused, a worker started later runs the previous configuration
    like the others, even when the new one's plugins would start by then."""
    port = free_port()
    config = write_config(workdir, port, workers=2)
    daemon = serve(config, port)
    daemon.wait_ready(workers=2)
    marker = workdir / "down"
    marker.write_text("")
    two = write_config(
        workdir,
        port,
        ["headers", "daemonplug:FailsWhileMarked", STORE],
        workers=2,
        extra=(
            '\n[plugins.headers]\nadd = { "X-Config" = "two" }\n'
            f'\n[plugins."daemonplug:FailsWhileMarked"]\nmarker = "{marker}"\n'
        ),
        name="two.toml",
    )
    config.write_text(two.read_text())
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: daemon.log.count("the new configuration failed to start") == 2,
        what="both workers to refuse the reload",
    )
    wait_until(
        lambda: (
            "refused the reloaded configuration; workers started from now on run the "
            "previous one" in daemon.log
        ),
        what="the supervisor to hear of it",
    )
    # And what came of it, once every worker has reported.
    wait_until(
        lambda: (
            "reload: every worker refused the new configuration; all still run the "
            "previous one" in daemon.log
        ),
        what="the supervisor's summary",
    )
    marker.unlink()  # the new configuration would start now
    for pid in ready_pids(daemon):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: daemon.log.count("ready (pid") == 4, what="two new workers")
    for n in range(4):
        assert send(port, f"after{n}@example.org") == {}
    records = [r for r in daemon.records() if r["to"][0].startswith("after")]
    assert len(records) == 4
    assert not any("X-Config" in r["content"] for r in records)
    assert "run the previous configuration and the others the new one" not in daemon.log

    # Reloaded again once the fault is gone, every worker takes it.
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: daemon.log.count("new sessions on the new configuration") == 2,
        what="both workers to reload",
    )
    assert send(port, "later@example.org") == {}
    [later] = [r for r in daemon.records() if r["to"] == ["later@example.org"]]
    assert "X-Config: two\r\n" in later["content"]
    assert daemon.stop() == 0


def test_bonzo_reload_signals_the_daemon_of_the_pid_file(workdir, serve, env):
    port = free_port()
    config = write_config(workdir, port)
    config.write_text(config.read_text().replace("workers = 1", 'workers = 1\npid_file = "b.pid"'))
    daemon = serve(config, port)
    daemon.wait_ready()
    # What the reload will run with is checked here: its warnings shown now,
    # not only in the daemon's log.
    config.write_text(config.read_text() + "\n[limits]\nmax_message_size = 1000\n")
    result = bonzo("reload", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert f"reload requested: pid {daemon.proc.pid}" in result.stdout
    assert "warning: limits.max_message_size = 1000" in result.stdout
    wait_until(lambda: "reloaded " in daemon.log, what="the reload")
    # Listeners cannot change by a reload: the running ones are kept, and why is logged.
    config.write_text(config.read_text().replace(f"port = {port}", f"port = {free_port()}"))
    assert bonzo("reload", "-c", str(config), env=env, cwd=workdir).returncode == 0
    wait_until(lambda: "listeners changed" in daemon.log, what="the refused reload")
    assert send(port) == {}
    assert daemon.stop() == 0
    stale = bonzo("reload", "-c", str(config), env=env, cwd=workdir)
    assert stale.returncode == 1 and "no such file" in stale.stderr
    # A pid file no daemon holds names nobody to signal, even a live process.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (workdir / "b.pid").write_text(f"{sleeper.pid}\n")
        reused = bonzo("reload", "-c", str(config), env=env, cwd=workdir)
        assert reused.returncode == 1
        assert f"no bonzo daemon holds it (stale; pid {sleeper.pid} not signalled)" in reused.stderr
        time.sleep(0.2)
        assert sleeper.poll() is None  # not hung up
    finally:
        sleeper.kill()
        sleeper.wait()
    no_pid = write_config(workdir, port, name="nopid.toml")
    one_line_error(bonzo("reload", "-c", str(no_pid), env=env, cwd=workdir), "server.pid_file")


def test_check_warns_when_no_plugin_can_accept_a_recipient(workdir, env):
    """``access`` and ``maildir``: access only refuses at RCPT, so every
    recipient would be refused; bonzo check says so."""
    config = write_config(workdir, free_port(), enabled=["access", "maildir"])
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert (
        "warning: no enabled plugin can accept a recipient: 'access' only refuse at RCPT"
    ) in result.stdout


def test_check_warns_about_configurations_that_cannot_deliver(workdir, env):
    """The queue example of docs/delivery.rst without its tables: recipients
    with no domains (and no plugin to authenticate), dkim_sign with no
    domains, an "mx" route with DNS off, and a table for an installed
    plugin that is not enabled. Each is a warning after the summary; serve
    logs the same warnings."""
    port = free_port()
    config = write_config(
        workdir,
        port,
        enabled=["recipients", "dkim_sign", "queue", "log"],
        extra=f'\n[plugins.queue]\npath = "{workdir / "queue"}"\n\n[plugins.passwd]\nfile = "x"\n',
    )
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    summary, _, warnings = result.stdout.partition("  warning: ")
    assert summary.startswith(f"{config}: OK")
    assert warnings, result.stdout
    lines = ("  warning: " + warnings).splitlines()
    expected = [
        "  warning: plugins.passwd: the table is there but the plugin is not enabled",
        "  warning: plugins.recipients: no domains, addresses, file or relay_networks (and no "
        "plugin that authenticates clients): every recipient but postmaster will be refused",
        "  warning: plugins.dkim_sign: no domains configured: nothing will be signed",
        '  warning: plugins.queue: a route of type "mx" needs DNS, which is off ([dns] is not '
        "configured): every message on it will be deferred (and bounced once too old)",
    ]
    assert lines[: len(expected)] == expected, lines
    # With an authenticating plugin, relaying for authenticated sessions is
    # a way to accept mail: no warning about recipients then.
    (workdir / "passwd").write_text("")
    with_auth = write_config(
        workdir,
        port,
        enabled=["passwd", "recipients", "maildir"],
        extra='\n[plugins.passwd]\nfile = "passwd"\n',
        name="auth.toml",
    )
    result = bonzo("check", "-c", str(with_auth), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "plugins.recipients" not in result.stdout


def test_check_warns_about_a_backend_slower_than_the_hook_time_limit(workdir, env):
    """A scanner whose own timeout is not below its hook time limit: the
    limit would end the hook first (451 4.3.0, a plugin failure) and its
    on_error would not apply. [plugins] timeout is 15 here."""
    milter = (
        '\n[[plugins.milter.milters]]\nname = "m{n}"\nsocket = "inet:{port}@127.0.0.1"\n'
        "connect_timeout = 2\ncommand_timeout = 2\ncontent_timeout = 10\n"
    )
    extra = (
        "\n[plugins.timeouts]\nmilter = {limit}\n"
        '\n[plugins.recipients]\ndomains = ["example.org"]\n'
        "\n[plugins.clamav]\nport = 9\ntimeout = 10\n"
        '\n[plugins.rspamd]\nurl = "http://127.0.0.1:9"\ntimeout = 15\n'
        + milter.format(n=1, port=9)
        + milter.format(n=2, port=10)
    )
    enabled = ["recipients", "clamav", "rspamd", "milter", "maildir"]
    for limit, milter_warned in ((25, False), (20, True)):
        config = write_config(
            workdir, free_port(), enabled=enabled, extra=extra.format(limit=limit)
        )
        result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
        assert result.returncode == 0, result.stderr
        warnings = [line for line in result.stdout.splitlines() if "backend may take" in line]
        expected = [
            "  warning: plugins.rspamd: its backend may take 15s, the plugin's hook time limit "
            "is 15s ([plugins] timeout or timeouts.rspamd): a slow backend ends the hook "
            "first, as a plugin failure (451 4.3.0), and the plugin's own setting for a slow "
            "backend does not apply; lower its timeout or raise the limit"
        ]
        if milter_warned:
            expected.append(
                "  warning: plugins.milter: its backend may take 20s, the plugin's hook time "
                "limit is 20s ([plugins] timeout or timeouts.milter): a slow backend ends the "
                "hook first, as a plugin failure (451 4.3.0), and the plugin's own setting for "
                "a slow backend does not apply; lower its timeout or raise the limit"
            )
        assert warnings == expected, result.stdout


def test_check_warns_when_quarantined_mail_has_no_keeper(workdir, env):
    """dmarc quarantines by default (on_quarantine); maildir without its
    quarantine key keeps nothing: each such message would be deferred."""
    maildir = f'\n[plugins.maildir]\npath = "{workdir / "mail"}"\n'
    base = '\n[plugins.recipients]\ndomains = ["example.org"]\n' + maildir
    warning = (
        "  warning: plugins.dmarc: it will quarantine some messages, but no enabled plugin "
        "keeps quarantined mail (bonzo_quarantine): each will be deferred (451 4.3.0) until it "
        "expires at the client; set the quarantine key of maildir or queue"
    )
    enabled = ["recipients", "dmarc", "maildir"]
    cases = [
        (base, True),
        (base + f'quarantine = "{workdir / "quarantine"}"\n', False),
        (base + '\n[plugins.dmarc]\non_quarantine = "tag"\non_reject = "reject"\n', False),
    ]
    for i, (extra, warned) in enumerate(cases):
        config = write_config(workdir, free_port(), enabled=enabled, extra=extra, name=f"q{i}.toml")
        result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
        assert result.returncode == 0, result.stderr
        assert (warning in result.stdout.splitlines()) is warned, result.stdout


def test_check_warns_that_the_queue_after_maildir_never_delivers(workdir, env):
    """maildir delivers every message it is given: a queue after it gets none."""
    extra = (
        '\n[plugins.recipients]\ndomains = ["example.org"]\n'
        f'\n[plugins.maildir]\npath = "{workdir / "mail"}"\n'
        f'\n[plugins.queue]\npath = "{workdir / "queue"}"\n'
    )
    warning = (
        "  warning: plugins.enabled: the bonzo_deliver of 'queue' never runs: 'maildir' "
        "decides every bonzo_deliver and runs before it; list 'queue' before 'maildir'"
    )
    for i, enabled in enumerate(
        (["recipients", "maildir", "queue"], ["recipients", "queue", "maildir"])
    ):
        config = write_config(workdir, free_port(), enabled=enabled, extra=extra, name=f"m{i}.toml")
        result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
        assert result.returncode == 0, result.stderr
        assert (warning in result.stdout.splitlines()) is (i == 0), result.stdout


@pytest.mark.parametrize("stage", ["connect", "rcpt"])
def test_a_hook_a_plugin_leaves_idle_is_not_warned_about(workdir, env, stage):
    """dnsbl after recipients: its bonzo_rcpt "never runs", but with stage =
    "connect" it does nothing there, and the warning was false."""
    extra = (
        '\n[plugins.recipients]\ndomains = ["example.org"]\n'
        f'\n[plugins.dnsbl]\nstage = "{stage}"\n'
        '[[plugins.dnsbl.zones]]\nzone = "zen.example"\n'
        f'\n[plugins.maildir]\npath = "{workdir / "mail"}"\n'
    )
    config = write_config(
        workdir, free_port(), enabled=["recipients", "dnsbl", "maildir"], extra=extra
    )
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    warned = "the bonzo_rcpt of 'dnsbl' never runs" in result.stdout
    assert warned is (stage == "rcpt"), result.stdout


def test_check_warns_about_plugins_out_of_order_at_the_message(workdir, env):
    """dkim_sign before headers (which may change what was signed), authres
    before dmarc (whose result it writes): one warning each; the documented
    orders give none."""
    extra = (
        '\n[plugins.recipients]\ndomains = ["example.org"]\n'
        f'\n[plugins.maildir]\npath = "{workdir / "mail"}"\n'
        f'quarantine = "{workdir / "quarantine"}"\n'
    )
    cases = [
        (
            ["recipients", "dkim", "authres", "dmarc", "dkim_sign", "headers", "maildir"],
            [
                "  warning: plugins.enabled: 'authres' runs before 'dmarc' at the message, but "
                "it writes dmarc's result into Authentication-Results; list 'authres' after "
                "'dmarc'",
                "  warning: plugins.enabled: 'dkim_sign' runs before 'headers' at the message, "
                "but headers may change the message after it is signed, which breaks the "
                "signature; list 'dkim_sign' after 'headers'",
            ],
        ),
        (["recipients", "dkim", "dmarc", "authres", "headers", "dkim_sign", "maildir"], []),
        # spf records its results at HELO and MAIL: where it is listed does
        # not matter to dmarc and authres at the message.
        (["recipients", "dkim", "dmarc", "authres", "spf", "maildir"], []),
    ]
    for i, (enabled, expected) in enumerate(cases):
        config = write_config(
            workdir, free_port(), enabled=enabled, extra=extra, name=f"order{i}.toml"
        )
        result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
        assert result.returncode == 0, result.stderr
        found = [line for line in result.stdout.splitlines() if "at the message" in line]
        assert found == expected, result.stdout


def test_check_warns_about_a_plugin_that_never_runs(workdir, env):
    """``access`` listed after ``recipients``, which answers every RCPT: its
    RCPT rules can never apply, and ``bonzo check`` says so."""
    port = free_port()
    config = workdir / "shadow.toml"
    config.write_text(
        f"""
[[listeners]]
address = "127.0.0.1"
port = {port}

[plugins]
enabled = ["recipients", "access", "maildir"]

[plugins.recipients]
domains = ["example.org"]

[[plugins.access.rules]]
stage = "rcpt"
match = "*@example.org"
action = "deny"
"""
    )
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert (
        "warning: plugins.enabled: the bonzo_rcpt of 'access' never runs: 'recipients' "
        "decides every bonzo_rcpt and runs before it; list 'access' before 'recipients'"
    ) in result.stdout
    config.write_text(
        config.read_text().replace('["recipients", "access",', '["access", "recipients",')
    )
    result = bonzo("check", "-c", str(config), env=env, cwd=workdir)
    assert "never runs" not in result.stdout


def test_json_logs_carry_the_session_and_message_ids(workdir, serve):
    port = free_port()
    config = write_config(workdir, port)
    config.write_text(
        config.read_text().replace('level = "info"', 'level = "info"\nformat = "json"')
    )
    daemon = serve(config, port)
    daemon.wait_ready()
    assert send(port) == {}
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=DEADLINE) as c:
        assert c.docmd("MAIL FROM:<a@example.org>")[0] == 503  # before HELO: refused
    wait_until(lambda: "refused by" in daemon.log, what="the refusal's line")
    # An idle session when the server stops: its 421 is logged by the stop,
    # outside the session's task, and still carries its id.
    idle = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    idle.recv(512)
    idle.sendall(b"EHLO idle.test\r\n")
    wait_until(lambda: b"HELP" in idle.recv(4096), what="the EHLO reply")
    assert daemon.stop() == 0
    idle.close()
    lines = [json.loads(line) for line in daemon.log.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "pid", "message"} <= set(line) for line in lines)
    [accepted] = [line for line in lines if line["logger"] == "tornado.access"]
    assert accepted["message_id"] in accepted["message"]  # "id=<message id>"
    assert accepted["session"] == accepted["message"].split()[0]
    [refusal, stop] = [line for line in lines if "refused by" in line["message"]]
    assert refusal["session"] != accepted["session"] and "message_id" not in refusal
    assert refusal["time"].endswith("Z")
    assert "421 4.3.2 Server shutting down" in stop["message"]
    assert stop["session"] == stop["message"][1:].split()[0]  # "[ID 127.0.0.1] ..."


#: The start of a line of the text log.
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \[\d+\] \S+: ")


def _subject_policy_daemon(workdir: Path, serve: Any, form: str) -> tuple[int, Daemon]:
    """A ready daemon with the SubjectPolicy plugin, logging in ``form``."""
    port = free_port()
    config = write_config(workdir, port, ["daemonplug:SubjectPolicy", STORE])
    if form == "json":
        config.write_text(
            config.read_text().replace('level = "info"', 'level = "info"\nformat = "json"')
        )
    daemon = serve(config, port)
    daemon.wait_ready()
    return port, daemon


def _send_subject(port: int, subject: str) -> smtplib.SMTPDataError:
    """Send a message with ``subject`` (RFC 2047-encoded); the refusal."""
    encoded = base64.b64encode(subject.encode()).decode()
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(port, message=f"Subject: =?utf-8?b?{encoded}?=\r\n\r\nHello.\r\n")
    return refused.value


@pytest.mark.parametrize("form", ["text", "json"])
def test_a_sender_cannot_forge_log_lines_through_a_plugin_s_refusal(workdir, serve, form):
    """A refusal's log line carries the plugin's log message and reply text,
    filled with what the sender wrote (a decoded Subject): a line break or
    another control character there is escaped, and every record stays one
    line (as str.splitlines() sees lines: U+2028, NEL and the rest)."""
    port, daemon = _subject_policy_daemon(workdir, serve, form)
    forged = "2026-12-06 00:00:00,000 INFO [1] tornado.access: FORGED"
    separators = {"\r\n": r"\r\n", "\u2028": r"\u2028", "\x85": r"\x85", "\x1e": r"\x1e"}
    for subject in ("lottery", "prize"):
        for separator in separators:
            assert _send_subject(port, f"{subject}{separator}{forged}").smtp_code == 550
    assert daemon.stop() == 0
    lines = daemon.log.splitlines()
    if form == "json":
        messages = [json.loads(line)["message"] for line in lines]
    else:
        start = TEXT_LINE
        assert all(start.match(line) and not line.startswith(forged[:23]) for line in lines), lines
        messages = [start.sub("", line, count=1) for line in lines]
    refusals = [m for m in messages if "refused by daemonplug:SubjectPolicy" in m]
    assert len(refusals) == 2 * len(separators)
    for message, shown in zip(refusals, [*separators.values()] * 2, strict=True):
        if message.startswith("550 refused subject lottery"):
            assert message.startswith(f"550 refused subject lottery{shown}{forged} [")
            assert message.endswith(" 550 5.7.1 Message refused; arg=''")
        else:
            reply = "prize\\r / " if shown == r"\r\n" else f"prize{shown}"
            assert f": 550 5.7.1 Subject not allowed: {reply}{forged}; arg=''" in message


@pytest.mark.parametrize("form", ["text", "json"])
def test_a_sender_cannot_forge_log_lines_through_a_plugin_s_fault(workdir, serve, form):
    """A plugin's exception is logged with its text and traceback, whose
    last line repeats the text: a line break there is escaped too (the
    forged line matched the fail2ban filter of docs/tls-auth.rst)."""
    port, daemon = _subject_policy_daemon(workdir, serve, form)
    forged = "2026-12-06 00:00:00,000 WARNING [1] tornado.general: [6B17 203.0.113.99] FORGED"
    for separator in ("\r\n", "\n", "\u2028", "\x1e"):
        refused = _send_subject(port, f"fault{separator}{forged}")
        assert refused.smtp_code == 451
        assert b"bad subject" not in refused.smtp_error
    assert daemon.stop() == 0
    lines = daemon.log.splitlines()
    assert not [line for line in lines if line.startswith(forged[:10])], lines
    if form == "json":
        records = [json.loads(line) for line in lines]
        faults = [r for r in records if "Uncaught exception" in r["message"]]
        assert len(faults) == 4
        assert all(r["exception"].endswith(forged) for r in faults)
        assert all(forged in r["message"] for r in faults)
        return
    start = TEXT_LINE
    for line in lines:
        # A log line, or a line of a traceback.
        assert start.match(line) or line.startswith(("Traceback ", "  ", "ValueError: ")), line
    faults = [line for line in lines if "Uncaught exception" in line]
    last = [line for line in lines if line.startswith("ValueError: ")]
    shown = [r"\r\n", r"\n", r"\u2028", r"\x1e"]
    assert [line.endswith(f"(bonzo_message): bad subject: fault{s}{forged}") for line, s in
            zip(faults, shown, strict=True)] == [True] * 4  # fmt: skip
    assert last == [f"ValueError: bad subject: fault{s}{forged}" for s in shown]


def test_a_json_log_record_is_one_line_whatever_its_text():
    # JSON escapes the ASCII controls itself, not NEL, U+2028 or U+2029.
    from bonzo.cli import JSONFormatter

    text = "a\u2028b\x85c\u2029d\r\ne\x1ef \u00e9"
    record = logging.LogRecord("bonzo.test", logging.ERROR, __file__, 1, text, None, None)
    line = JSONFormatter().format(record)
    assert line.splitlines() == [line]
    assert json.loads(line)["message"] == text


def test_a_pid_file_serve_cannot_make_is_a_configuration_error(workdir, env):
    """Where the check cannot tell (root may write in /proc, the kernel says
    no), bonzo serve exits 2 with one line naming the file and key: a
    systemd unit does not restart it for ever."""
    port = free_port()
    config = write_config(workdir, port)
    config.write_text(
        config.read_text().replace("workers = 1", 'workers = 1\npid_file = "/proc/bonzo-t.pid"')
    )
    if bonzo("check", "-c", str(config), env=env, cwd=workdir).returncode != 0:
        pytest.skip("the check already refuses it here (not root)")
    result = bonzo("serve", "-c", str(config), env=env, cwd=workdir)
    line = one_line_error(result, str(config), "server.pid_file: cannot write /proc/bonzo-t.pid")
    assert line.startswith("bonzo: ")


def test_a_pid_file_fault_that_may_pass_is_no_configuration_error(tmp_path, monkeypatch):
    """A full /run (ENOSPC writing the pid) is a runtime failure, which the
    systemd unit restarts (status 1), not the configuration's mistake
    (status 2, never restarted); the empty file is not left behind."""
    import errno

    from bonzo import cli

    path = str(tmp_path / "bonzo.pid")

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli.os, "pwrite", full)
    with pytest.raises(cli._PidFileProblem) as problem:
        cli._write_pid_file(path)
    assert not problem.value.mistake
    assert str(problem.value) == f"cannot write {path}: No space left on device"
    assert not os.path.exists(path)
    with pytest.raises(cli._PidFileProblem) as problem:
        cli._write_pid_file(str(tmp_path / "missing" / "bonzo.pid"))
    assert problem.value.mistake


def test_pid_file_and_readiness_to_systemd(workdir, env):
    """``[server] pid_file`` holds the main process's id while it runs, and
    a second daemon on the same file is refused; with ``NOTIFY_SOCKET`` set,
    each worker reports READY=1 (naming the main pid) and STOPPING=1, as a
    ``Type=notify`` unit with ``NotifyAccess=all`` expects."""
    port = free_port()
    config = write_config(workdir, port, workers=2)
    config.write_text(
        config.read_text().replace("workers = 2", 'workers = 2\npid_file = "bonzo.pid"')
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify.sock"))
    notify.settimeout(DEADLINE)
    with notify, daemons(workdir, {**env, "NOTIFY_SOCKET": str(workdir / "notify.sock")}) as start:
        daemon = start(config, port)
        daemon.wait_ready(workers=2)
        main = daemon.proc.pid
        assert (workdir / "bonzo.pid").read_text() == f"{main}\n"
        states = [notify.recv(4096).decode() for _ in range(2)]
        assert states == [f"READY=1\nMAINPID={main}"] * 2
        second = bonzo("serve", "-c", str(config), env=env, cwd=workdir)
        assert second.returncode == 1
        assert f"server.pid_file: {workdir / 'bonzo.pid'}: pid {main} is running" in second.stderr
        assert daemon.stop() == 0
        assert notify.recv(4096) == b"STOPPING=1"
    assert not (workdir / "bonzo.pid").exists()
    # A file left behind is replaced, with a warning: the daemon holds its
    # pid file locked, so a file nobody holds is stale even when its number
    # now belongs to a live process (here this test's own: after a crash or
    # a reboot, numbers are reused).
    for stale in (999999999, os.getpid()):
        (workdir / "bonzo.pid").write_text(f"{stale}\n")
        with daemons(workdir, env) as start:
            daemon = start(config, port)
            daemon.wait_ready(workers=2)
            assert (workdir / "bonzo.pid").read_text() == f"{daemon.proc.pid}\n"
            assert f"named pid {stale}, which no bonzo daemon holds; replaced" in daemon.log
            assert daemon.stop() == 0


def test_config_command_prints_the_effective_configuration(workdir, env):
    port = free_port()
    config = write_config(workdir, port, extra='\n[plugins.extra]\npassword = { "$env" = "PW" }\n')
    result = bonzo("config", "-c", str(config), env={**env, "PW": "hunter2"}, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# {config}: the effective configuration (secrets redacted)")
    assert "hunter2" not in result.stdout
    assert 'password = "<secret from $env PW>"' in result.stdout
    # The same in the core's own tables, whose values are shown as read.
    hidden = write_config(workdir, port, name="hidden.toml")
    hidden.write_text(
        hidden.read_text().replace('hostname = "mx.daemon.test"', 'hostname = { "$env" = "HN" }')
    )
    shown = bonzo("config", "-c", str(hidden), env={**env, "HN": "mx.secret.test"}, cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    assert "mx.secret.test" not in shown.stdout
    assert 'hostname = "<secret from $env HN>"' in shown.stdout
    assert "max_message_size = " in result.stdout and "idle_timeout = " in result.stdout
    bad = write_config(workdir, port, extra="\n[limits]\nmax_recipients = -1\n", name="bad.toml")
    one_line_error(bonzo("config", "-c", str(bad), env=env, cwd=workdir), "limits.max_recipients")


def test_serve_listen_overrides_the_listeners(workdir, env):
    port, other = free_port(), free_port()
    config = write_config(workdir, port)  # its port is not used
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bonzo",
            "serve",
            "-c",
            str(config),
            "--listen",
            f"127.0.0.1:{other}",
        ],
        env=env,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: _port_open(other), what="the --listen port")
        assert not _port_open(port)
        assert send(other) == {}
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=DEADLINE)[0].decode()
    assert f"listening on 127.0.0.1:{other} with 1 worker(s)" in out
    bad = bonzo("serve", "-c", str(config), "--listen", "localhost:25", env=env, cwd=workdir)
    one_line_error(bad, "bonzo: --listen: 'localhost:25': expected an IP address and a port")
    twice = ["--listen", f"127.0.0.1:{other}"] * 2
    bad = bonzo("serve", "-c", str(config), *twice, env=env, cwd=workdir)
    one_line_error(bad, f"--listen[1]: 127.0.0.1:{other} overlaps --listen[0]")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_plugins_doc_prints_a_plugins_documentation(workdir, env):
    result = bonzo("plugins", "--doc", "maildir", env=env, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("``maildir``: durable delivery into Maildir folders")
    assert "``envelope_headers``" in result.stdout  # the whole README, keys included
    assert "KEYS" not in result.stdout  # not the markers around the generated list
    (workdir / "plugins" / "documented.py").write_text(
        'class Plugin:\n    """Refuses nothing; documents itself."""\n\n'
        "    def bonzo_helo(self):\n        return None\n"
    )
    local = bonzo(
        "plugins",
        "--doc",
        "documented:Plugin",
        env={**env, "PYTHONPATH": f"{workdir / 'plugins'}:{env['PYTHONPATH']}"},
        cwd=workdir,
    )
    assert local.stdout == "Refuses nothing; documents itself.\n", local.stderr
    # No class docstring: the module's.
    (workdir / "plugins" / "moduledoc.py").write_text(
        '"""Delivers into a directory."""\n\n\nclass Plugin:\n'
        "    def bonzo_helo(self):\n        return None\n"
    )
    by_module = bonzo(
        "plugins",
        "--doc",
        "moduledoc:Plugin",
        env={**env, "PYTHONPATH": f"{workdir / 'plugins'}:{env['PYTHONPATH']}"},
        cwd=workdir,
    )
    assert by_module.stdout == "Delivers into a directory.\n", by_module.stderr
    missing = bonzo("plugins", "--doc", "nope", env=env, cwd=workdir)
    assert missing.returncode == 2 and "'nope' is not installed" in missing.stderr
    # With -c, the configuration's [plugins] paths are searched, as serve does.
    config = write_config(workdir, free_port())
    enabled = bonzo("plugins", "-c", str(config), "--doc", STORE, env=env, cwd=Path("/"))
    assert enabled.stdout.startswith("Local plugins for the daemon tests"), enabled.stderr


# ------------------------------------------------------------- descriptors
def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_the_daemon_refuses_new_clients_then_recovers(workdir, serve):
    # A hard limit of 48 open files and 80 clients: accept() fails with
    # EMFILE while the listening socket stays ready. The daemon must not spin
    # (it used to: 100% CPU and a traceback per try, 250,000 lines in 8 s);
    # the clients it has no room for get 421 at once (through a descriptor
    # kept in reserve) so that they try another MX host; it says what to do
    # once, and serves again when clients leave.
    port = free_port()
    config = write_config(workdir, port)
    prelude = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))"
    daemon = serve(config, port, prelude=prelude)
    daemon.wait_ready()
    assert (
        "[limits] max_connections = 1000 may need 2064 open files per process, but the limit "
        "is 48 (hard limit 48)" in daemon.log
    )
    clients = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(80)]
    try:
        first = [c.recv(200) for c in clients]
        refused = b"421 4.3.2 Service not available, out of resources; try again later\r\n"
        greeted = [line for line in first if line.startswith(b"220 ")]
        assert len(greeted) >= 20 and first.count(refused) >= 20
        assert len(greeted) + first.count(refused) == 80
        wait_until(lambda: "cannot accept connections" in daemon.log, what="the EMFILE report")
        before = _cpu_seconds(daemon.proc.pid)
        time.sleep(2.0)
        assert _cpu_seconds(daemon.proc.pid) - before < 0.6  # not spinning (2 s of a core)
        [line] = [line for line in daemon.log.splitlines() if "cannot accept" in line]
        assert f"cannot accept connections on 127.0.0.1:{port}: Too many open files" in line
        assert "this process may open 48 descriptors" in line
        assert "new clients are answered '421 4.3.2 Service not available" in line
        assert "Traceback" not in daemon.log
        # One more while the sessions hold the descriptors: answered at once
        # (refused, or served if a descriptor the daemon used for something
        # else meanwhile came back), never left waiting.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as late:
            answer = late.recv(200)
            assert answer == refused or answer.startswith(b"220 "), answer
    finally:
        for client in clients:
            client.close()
    # The descriptors come back as the sessions end: new clients are served.
    wait_until(lambda: _greeted(port), what="a greeting after the clients left")
    assert send(port) == {}
    assert daemon.stop() == 0


def _greeted(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(100).startswith(b"220 ")
    except OSError:
        return False


def test_the_soft_descriptor_limit_is_raised_for_max_connections(workdir, serve):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2064:
        pytest.skip(f"the hard limit here ({hard}) is below what the test asks for")
    port = free_port()
    config = write_config(workdir, port)
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (48, {hard}))"
    daemon = serve(config, port, prelude=prelude)
    daemon.wait_ready()
    assert "limit on open files raised from 48 to 2064 for [limits] max_connections = 1000" in (
        daemon.log
    )
    assert Path(f"/proc/{daemon.proc.pid}/limits").read_text().count(" 2064 ") == 1
    assert daemon.stop() == 0


def test_the_descriptor_limit_counts_the_queue_s_own_files(workdir, serve):
    """The queue keeps up to 512 message files open for their first attempt,
    and a few per delivery: the limit raised for max_connections alone left
    them no room (a soak test ran out with a handful of sessions: 451s,
    unsaved delivery states, 421 at connect)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2896:
        pytest.skip(f"the hard limit here ({hard}) is below what the test asks for")
    port = free_port()
    config = write_config(
        workdir,
        port,
        enabled=["recipients", "queue"],
        extra=f'\n[plugins.recipients]\ndomains = ["example.org"]\n'
        f'\n[plugins.queue]\npath = "{workdir / "queue"}"\n',
    )
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (48, {hard}))"
    daemon = serve(config, port, prelude=prelude)
    daemon.wait_ready()
    # 1000 sessions x 2 + 64, and for the queue 512 + 3 x max_deliveries (20)
    # + 20 idle connections of its one SMTP transport (the "*" mx route).
    assert (
        "limit on open files raised from 48 to 2656 for [limits] max_connections = 1000 "
        "and 592 of the plugins' own"
    ) in daemon.log
    # A reload to more deliveries raises it again (it stayed as at start).
    config.write_text(config.read_text() + "max_deliveries = 100\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reloaded " in daemon.log, what="the reload")
    assert (
        "limit on open files raised from 2656 to 2896 for [limits] max_connections = 1000 "
        "and 832 of the plugins' own"
    ) in daemon.log
    assert Path(f"/proc/{daemon.proc.pid}/limits").read_text().count(" 2896 ") == 1
    assert daemon.stop() == 0


def test_check_warns_when_the_hard_descriptor_limit_is_too_low(workdir, env):
    import resource

    port = free_port()
    config = write_config(workdir, port)

    def check(limits: tuple[int, int]) -> str:
        def low() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)

        result = bonzo("check", "-c", str(config), env=env, cwd=workdir, preexec_fn=low)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert check((100, 100)).splitlines()[-1] == (
        "  warning: [limits] max_connections = 1000 may need 2064 open files per process, but "
        "the limit is 100 (hard limit 100): raise it (LimitNOFILE= in a systemd unit, ulimit "
        "-n) or lower max_connections; clients beyond it are answered 421 4.3.2"
    )
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= 2064:
        # A low soft limit alone is no problem: bonzo serve raises it.
        assert "open files" not in check((100, hard))


def _reply(f: Any) -> bytes:
    line = f.readline()
    while line[3:4] == b"-":
        line = f.readline()
    return line


def test_a_client_keeping_its_socket_full_does_not_hold_the_other_sessions(workdir, serve):
    """A read the socket answers at once does not go back to the event loop:
    a client streaming content faster than it is processed (bare LF line
    ends, the costliest) held every other session of the process until its
    last octet (a NOOP waited 4.5 s behind 150 MiB). The session now lets the
    others run after each 10 ms of such reads."""
    port = free_port()
    daemon = serve(write_config(workdir, port), port)
    daemon.wait_ready()
    streamer = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    other = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    fs, fo = streamer.makefile("rb"), other.makefile("rb")
    with streamer, other, fs, fo:
        _reply(fs)
        for command in (b"EHLO a.test", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.org>",
                        b"DATA"):  # fmt: skip
            streamer.sendall(command + b"\r\n")
            assert _reply(fs)[:1] in (b"2", b"3")
        _reply(fo)
        other.sendall(b"EHLO b.test\r\n")
        _reply(fo)
        ended: list[float] = []

        def stream() -> None:
            chunk = b"\n" * 65536
            for _ in range(200 * 16):  # 200 MiB, over the size limit: refused at the end
                streamer.sendall(chunk)
            streamer.sendall(b"\r\n.\r\n")
            _reply(fs)
            ended.append(time.monotonic())

        thread = threading.Thread(target=stream, daemon=True)
        started = time.monotonic()
        thread.start()
        time.sleep(0.3)
        waits = []
        # Fewer NOOPs than max_junk_commands (100), however long the stream.
        while thread.is_alive() and len(waits) < 60:
            sent = time.monotonic()
            other.sendall(b"NOOP\r\n")
            assert _reply(fo).startswith(b"250")
            waits.append(time.monotonic() - sent)
            time.sleep(0.03)
        thread.join(DEADLINE)
        assert ended, "the stream did not end"
    # The other session was answered while the stream went on, promptly.
    assert ended[0] - started > 2.0, "the stream was too short to tell"
    assert len(waits) >= 5
    assert max(waits) < 1.0, waits
    assert daemon.stop() == 0

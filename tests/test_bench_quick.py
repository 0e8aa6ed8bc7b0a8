"""The benchmark harness keeps working: ``python bench/run.py --quick`` runs
every scenario against every server and reports a row for each.

This checks the harness, not speed. CI installs smtp-source, Haraka and
smtp-server with bench/install.sh; elsewhere the quick run is skipped without
smtp-source, and the Node.js peers are left out of it (with a note in the
report, and a skipped test here saying why) when Node.js or the packages are
missing.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bonzo.app import MailApp
from bonzo.config import load_config

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"
SCENARIOS = "abcde"
SERVERS = [
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
# Run when they can: Node.js >= 20 and bench/node_modules (bench/install.sh),
# and when uvloop is installed (the test extra has it).
OPTIONAL_SERVERS = ["haraka", "smtp-server", "bonzo-uvloop"]


def have(tool: str) -> bool:
    return bool(shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/local/sbin"))


def load_run() -> Any:
    """bench/run.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("bonzo_bench_run", RUN)
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = run  # dataclasses look the module up
    try:
        spec.loader.exec_module(run)
    finally:
        del sys.modules[spec.name]
    return run


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    not have("smtp-source"), reason="Postfix's smtp-source not installed (run bench/install.sh)"
)
def test_opcode_count_runs_both_servers() -> None:
    """bench/opcodes.py counts bytecode per message for Bonzo and the sink;
    Bonzo's own modules show up in its report, and the counts are per message
    (of the order of thousands, not the total)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "opcodes.py"), "--messages", "40", "--top", "3"],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    totals = dict(re.findall(r"^(\S+): ([\d,]+) instructions per message$", done.stdout, re.M))
    assert set(totals) == {"bonzo-serve", "tornado-sink"}, done.stdout
    for name, total in totals.items():
        assert 500 < int(total.replace(",", "")) < 100_000, (name, done.stdout)
    bonzo = done.stdout.split("tornado-sink:")[0]
    assert "bonzo/protocol.py" in bonzo and "bonzo/connection.py" in bonzo, done.stdout


@pytest.mark.timeout(240)
@pytest.mark.skipif(
    not (have("smtp-source") and have("smtp-sink")),
    reason="Postfix's smtp-source/smtp-sink not installed (run bench/install.sh)",
)
def test_quick_run(tmp_path: Path) -> None:
    pytest.importorskip("aiosmtpd")
    run = load_run()
    assert run.DEFAULT_SERVERS == SERVERS
    missing = {name: run.SERVER_SPECS[name].available() for name in OPTIONAL_SERVERS}
    missing = {name: reason for name, reason in missing.items() if reason is not None}
    servers = [name for name in SERVERS if name not in missing]
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| [a-e]\. ", line)]
    seen = {(line[2], line.split("|")[2].strip()) for line in rows}
    assert seen == {(s, server) for s in SCENARIOS for server in servers}, done.stdout
    assert len(rows) == len(SCENARIOS) * len(servers)
    assert "FAILED" not in done.stdout
    # A peer that cannot run here is named under the table, with the reason.
    for name, reason in missing.items():
        assert f"- `{name}`: {reason}" in done.stdout, done.stdout
    # Every row has a measurement, and aiosmtpd is the 1.00 baseline.
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert any(re.search(r"\d", c) for c in cells[2:]), line
        if cells[1] == "aiosmtpd":
            assert "1.00" in cells, line
    results = list(tmp_path.glob("*-quick.json"))
    assert len(results) == 1


@pytest.mark.parametrize("name", OPTIONAL_SERVERS)
def test_node_peer_can_run(name: str) -> None:
    """Says, as a skip reason, why a Node.js peer is left out of the quick run
    (and of a full run) on this machine."""
    reason = load_run().SERVER_SPECS[name].available()
    if reason is not None:
        pytest.skip(f"{name} is not benchmarked here: {reason}")


def test_unavailable_server_is_noted_in_the_report() -> None:
    run = load_run()
    meta = {
        "mode": "quick",
        "repeat": 1,
        "machine": {"nproc": 2, "cpu": "cpu", "kernel": "k", "python": "3", "versions": {}},
        "skipped": {"haraka": "missing: run bash bench/install.sh"},
    }
    report = run.markdown([], meta)
    assert "- `haraka`: missing: run bash bench/install.sh" in report


def test_haraka_config_is_local_and_quiet(tmp_path: Path) -> None:
    """The Haraka install directory the harness writes listens on 127.0.0.1
    only, runs one process, keeps its spool in the scratch directory and loads
    no plugin that resolves names or delivers mail."""
    argv = load_run().SERVER_SPECS["haraka"].command(2999, tmp_path)
    root = Path(argv[argv.index("-c") + 1])
    assert root.is_relative_to(tmp_path)
    config = root / "config"
    smtp_ini = (config / "smtp.ini").read_text()
    assert re.findall(r"(?m)^listen=.*$", smtp_ini) == ["listen=127.0.0.1:2999"]
    assert re.findall(r"(?m)^nodes=.*$", smtp_ini) == ["nodes=0"]
    assert not re.search(r"(?m)^(user|group)=", smtp_ini)
    spool = re.findall(r"(?m)^spool_dir=(.*)$", (config / "connection.ini").read_text())
    assert spool == [str(tmp_path / "haraka-spool")]
    plugins = [
        line.strip()
        for line in (config / "plugins").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert plugins == ["bench_rdns", "rcpt_to.in_host_list", "queue/discard"]
    assert (root / "plugins" / "bench_rdns.js").exists()
    assert (config / "host_list").read_text().split() == ["example.com"]


def test_daemon_configs_parse_and_take_a_port(tmp_path: Path) -> None:
    """The best-guess daemon configs are valid TOML, and the harness can
    point their one listener at a port of its choosing."""
    run = load_run()
    for spec in run.DAEMON_SPECS:
        argv = spec.command(2999, tmp_path)
        config = tomllib.loads(Path(argv[-1]).read_text())
        assert [(lis["address"], lis["port"]) for lis in config["listeners"]] == [
            ("127.0.0.1", 2999)
        ]
        assert "/tmp/bonzo-bench-maildir" not in Path(argv[-1]).read_text()
        # And they are valid Bonzo configurations, with installed plugins.
        loaded = load_config(argv[-1])
        assert loaded.listeners[0].port == 2999
        MailApp(loaded)


RELAY_SCENARIOS = ["ra", "rb", "rc"]
RELAY_SERVERS = ["bonzo-queue", "postfix-relay"]


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    not (have("smtp-source") and have("smtp-sink")),
    reason="Postfix's smtp-source/smtp-sink not installed (run bench/install.sh)",
)
def test_quick_relay_run(tmp_path: Path) -> None:
    """The relay scenarios: smtp-source → relay → smtp-sink, every message
    counted at the sink; Postfix's relay is left out (and named) where its
    master cannot run."""
    run = load_run()
    assert run.DEFAULT_RELAY_SERVERS == RELAY_SERVERS
    missing = {name: run.SERVER_SPECS[name].available() for name in RELAY_SERVERS}
    missing = {name: reason for name, reason in missing.items() if reason is not None}
    if "bonzo-queue" in missing:
        pytest.skip(f"bonzo-queue cannot run here: {missing['bonzo-queue']}")
    servers = [name for name in RELAY_SERVERS if name not in missing]
    done = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--scenarios", "relay", "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| r[abc]\. ", line)]
    seen = {(line.split(".")[0][2:], line.split("|")[2].strip()) for line in rows}
    assert seen == {(s, server) for s in RELAY_SCENARIOS for server in servers}, done.stdout
    assert "FAILED" not in done.stdout
    for name, reason in missing.items():
        assert f"- `{name}`: {reason}" in done.stdout, done.stdout
    # Only the relays ran (no sink table), and Postfix is the 1.00 baseline.
    assert not re.search(r"(?m)^\| [a-e]\. ", done.stdout), done.stdout
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert re.match(r"[\d,.]+ msg/s", cells[2]) and re.match(r"[\d,.]+ msg/s", cells[4]), line
        if cells[1] == "postfix-relay":
            assert cells[3] == cells[5] == "1.00", line
    # The sink received every message once: nothing lost, nothing doubled.
    results = list(tmp_path.glob("*-quick.json"))
    assert len(results) == 1
    cells = json.loads(results[0].read_text())["cells"]
    assert len(cells) == len(RELAY_SCENARIOS) * len(servers)
    for cell in cells:
        assert cell["extra_deliveries"] == 0, cell
        assert cell["delivered_s"] >= cell["elapsed_s"] > 0, cell


def test_relay_configs(tmp_path: Path) -> None:
    """bonzo-queue's configuration is valid, queues in the scratch directory
    and relays to the downstream's port on 127.0.0.1; Postfix's relays to it
    too, resolves no names and listens on 127.0.0.1 only."""
    run = load_run()
    argv = run.SERVER_SPECS["bonzo-queue"].command(2999, tmp_path, 3001)
    text = Path(argv[-1]).read_text()
    config = tomllib.loads(text)
    assert [(lis["address"], lis["port"]) for lis in config["listeners"]] == [("127.0.0.1", 2999)]
    queue = config["plugins"]["queue"]
    assert queue["path"] == str(tmp_path / "queue")
    assert queue["routes"] == {
        "*": {"type": "smarthost", "host": "127.0.0.1", "port": 3001, "tls": "none"}
    }
    loaded = load_config(argv[-1])
    assert loaded.listeners[0].port == 2999
    MailApp(loaded)
    main = run.postfix_relay_main_cf(tmp_path, 2999, 3001)
    assert main["relayhost"] == "[127.0.0.1]:3001"
    assert main["mydestination"] == ""
    assert main["smtp_dns_support_level"] == "disabled"
    assert main["inet_interfaces"] == "127.0.0.1"
    assert main["mynetworks"] == "127.0.0.0/8"
    assert all(
        str(v).startswith(str(tmp_path)) for k, v in main.items() if k.endswith("_directory")
    )


def test_scenario_selection() -> None:
    run = load_run()
    assert run.parse_scenarios("ab") == ["a", "b"]
    assert run.parse_scenarios("ra,rb") == ["ra", "rb"]
    assert run.parse_scenarios("relay") == ["ra", "rb", "rc"]
    assert run.parse_scenarios("c,relay,c") == ["c", "ra", "rb", "rc"]
    with pytest.raises(ValueError, match="'rz'"):
        run.parse_scenarios("rz")

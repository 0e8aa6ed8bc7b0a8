"""The benchmark harness keeps working: ``python bench/run.py --quick`` runs
every scenario against every server and reports a row for each.

This checks the harness, not speed. CI installs smtp-source with
bench/install.sh; elsewhere the test is skipped without it.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
SERVERS = ["bonzo-serve", "bonzo-chain", "bonzo-maildir", "aiosmtpd", "smtp-sink"]


def have(tool: str) -> bool:
    return bool(shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/local/sbin"))


@pytest.mark.timeout(240)
@pytest.mark.skipif(
    not (have("smtp-source") and have("smtp-sink")),
    reason="Postfix's smtp-source/smtp-sink not installed (run bench/install.sh)",
)
def test_quick_run(tmp_path: Path) -> None:
    pytest.importorskip("aiosmtpd")
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
    assert seen == {(s, server) for s in SCENARIOS for server in SERVERS}, done.stdout
    assert len(rows) == len(SCENARIOS) * len(SERVERS)
    assert "FAILED" not in done.stdout
    # Every row has a measurement, and aiosmtpd is the 1.00 baseline.
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert any(re.search(r"\d", c) for c in cells[2:]), line
        if cells[1] == "aiosmtpd":
            assert "1.00" in cells, line
    results = list(tmp_path.glob("*-quick.json"))
    assert len(results) == 1


def test_daemon_configs_parse_and_take_a_port(tmp_path: Path) -> None:
    """The best-guess daemon configs are valid TOML, and the harness can
    point their one listener at a port of its choosing."""
    spec = importlib.util.spec_from_file_location("bonzo_bench_run", RUN)
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = run  # dataclasses look the module up
    try:
        spec.loader.exec_module(run)
    finally:
        del sys.modules[spec.name]
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

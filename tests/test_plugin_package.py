"""The example third-party plugin package (examples/plugin_package): it
installs like any package, its entry point makes Bonzo find it, its own tests
pass against the installed copy, and the daemon runs it.

It is installed with ``pip install --target`` into a temporary directory, so
the test changes nothing outside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "plugin_package"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    target = tmp_path_factory.mktemp("site")
    # Build from a copy: building writes egg-info next to the sources.
    source = tmp_path_factory.mktemp("src") / "plugin_package"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "bonzo_tagger" / "__init__.py").exists()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(target), str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def test_the_readme_says_how_to_enable_it():
    readme = (PACKAGE / "README.md").read_text()
    assert 'enabled = ["recipients", "tagger", "maildir"]' in readme
    assert "[plugins.tagger]" in readme


def test_its_own_tests_pass_against_the_installed_copy(installed, tmp_path):
    tests = PACKAGE / "tests" / "test_tagger.py"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", str(tests)],
        env=installed,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 passed" in result.stdout


def test_bonzo_finds_it_by_its_entry_point(installed, tmp_path):
    config = tmp_path / "bonzo.toml"
    config.write_text(
        "[[listeners]]\nport = 2525\n"
        '[plugins]\nenabled = ["recipients", "tagger", "maildir"]\n'
        '[plugins.recipients]\ndomains = ["example.com"]\n'
        '[plugins.tagger]\nkeywords = ["invoice"]\n'
        '[plugins.maildir]\npath = "Maildir"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "bonzo", "plugins", "-c", str(config)],
        env=installed,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.strip().startswith("tagger"))
    assert "bonzo-tagger 1.0.0" in line and "enabled #2" in line
    assert "tagger: bonzo_configure, bonzo_message" in result.stdout
    assert "bonzo_message: tagger" in result.stdout
    bad = config.read_text().replace('keywords = ["invoice"]', 'keywords = "invoice"')
    config.write_text(bad)
    check = subprocess.run(
        [sys.executable, "-m", "bonzo", "check", "-c", str(config)],
        env=installed,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 2
    assert "plugins.tagger: keywords: expected a list" in check.stderr

"""The scanner plugins' documentation and configuration: entry points,
README keys and examples, and the commented block of bonzo.toml.example."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from bonzo_plugins import _docs

from bonzo.hooks import PluginSet

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
#: Each scanner plugin and the hook it decides in.
SCANNERS = {
    "clamav": "bonzo_message",
    "rspamd": "bonzo_message",
    "spamassassin": "bonzo_message",
    "policy": "bonzo_rcpt",
}


def entry_point(name: str) -> type:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    value = data["project"]["entry-points"]["bonzo.plugins"][name]
    module, _, attr = value.partition(":")
    assert module == f"bonzo_plugins.{name}"
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("name", SCANNERS)
def test_entry_point_registers(name):
    plugin_set = PluginSet()
    plugin_set.register(entry_point(name)(), name)
    hooks = set(plugin_set.hooks_of(name))
    assert {"bonzo_configure", SCANNERS[name]} <= hooks


@pytest.mark.parametrize("name", SCANNERS)
def test_readme_documents_every_key_and_its_example_configures(name):
    module = importlib.import_module(f"bonzo_plugins.{name}.plugin")
    text = (ROOT / "plugins" / name / "README.rst").read_text("utf-8")
    # The keys' reference is generated from the schema, and up to date.
    assert _docs.render(name) in text
    for key in module.KEYS:
        assert re.search(rf"^``{key}``\n    \S", text, re.M), f"{name}: {key} undocumented"
    blocks = re.findall(r"^\.\. code-block:: toml\n\n((?:   .*\n|\n)+)", text, re.M)
    assert blocks
    for block in blocks:
        table = tomllib.loads("\n".join(line[3:] for line in block.splitlines()))
        entry_point(name)().bonzo_configure(
            config=table["plugins"][name], app=SimpleNamespace(base_dir=ROOT)
        )


@pytest.mark.parametrize("name", SCANNERS)
def test_the_example_configuration_shows_every_key(name):
    module = importlib.import_module(f"bonzo_plugins.{name}.plugin")
    example = (ROOT / "bonzo.toml.example").read_text("utf-8")
    start = example.index(f"# [plugins.{name}]")
    end = example.find("\n\n", start)
    block = example[start : end if end >= 0 else None]
    shown = re.findall(r"^# (\w+) = ", block, re.M)
    assert set(shown) == set(module.KEYS)
    lines = [line[2:] for line in block.splitlines()]
    table = tomllib.loads("\n".join(lines))["plugins"][name]
    # Either socket or host/port: the example shows both, commented out.
    table.pop("socket", None)
    entry_point(name)().bonzo_configure(config=table, app=SimpleNamespace(base_dir=ROOT))

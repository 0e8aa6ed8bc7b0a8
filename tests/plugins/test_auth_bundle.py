"""The mail-authentication plugins as bundled plugins: entry points, packages,
and the TOML examples of their READMEs."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from test_bundle import ROOT, entry_points, load, toml_blocks

from bonzo.hooks import PluginSet

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

AUTH_PLUGINS = ("spf", "dkim", "dmarc", "authres", "dnsbl")


@pytest.mark.parametrize("name", AUTH_PLUGINS)
def test_entry_point_and_package(name):
    value = entry_points()[name]
    assert value.startswith(f"bonzo_plugins.{name}:")
    plugin_set = PluginSet()
    plugin_set.register(load(value)(), name)
    assert "bonzo_configure" in plugin_set.hooks_of(name)
    data = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    assert f"bonzo_plugins.{name}" in data["tool"]["setuptools"]["packages"]


@pytest.mark.parametrize("name", AUTH_PLUGINS)
def test_readme_examples_configure(name, tmp_path):
    blocks = toml_blocks((ROOT / "plugins" / name / "README.rst").read_text("utf-8"))
    assert blocks, f"{name}: no TOML example"
    for block in blocks:
        table = tomllib.loads(block)["plugins"][name]
        load(entry_points()[name])().bonzo_configure(
            config=table, app=SimpleNamespace(base_dir=tmp_path)
        )

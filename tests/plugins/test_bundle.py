"""The bundled plugins as a whole: entry points, documentation, loading by Bonzo."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from bonzo_plugins import _docs
from plugin_testing import serve

from bonzo.hooks import PluginSet

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ("recipients", "access", "maildir", "headers", "log")
#: Plugins whose README the tests below check too.
DOCUMENTED = (*PLUGINS, "ratelimit", "greylist")


def entry_points() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    return data["project"]["entry-points"]["bonzo.plugins"]


def load(value: str) -> type:
    module, _, attr = value.partition(":")
    return getattr(importlib.import_module(module), attr)


def toml_blocks(text: str) -> list[str]:
    """The bodies of the ``.. code-block:: toml`` directives of a reST text."""
    blocks = []
    for m in re.finditer(r"^\.\. code-block:: toml\n\n((?:    .*\n|\n)+)", text, re.M):
        lines = [line[4:] for line in m.group(1).splitlines()]
        blocks.append("\n".join(lines))
    return blocks


@pytest.mark.parametrize("name", DOCUMENTED)
def test_entry_point_names_a_class_that_registers(name):
    value = entry_points()[name]
    assert value.startswith(f"bonzo_plugins.{name}:")
    cls = load(value)
    assert isinstance(cls, type) and cls.__name__.endswith("Plugin")
    plugin_set = PluginSet()
    plugin_set.register(cls(), name)
    assert "bonzo_configure" in plugin_set.hooks_of(name)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_readme_documents_every_key(name):
    module = importlib.import_module(f"bonzo_plugins.{name}.plugin")
    text = (ROOT / "plugins" / name / "README.rst").read_text("utf-8")
    if _docs.BEGIN in text:
        # Generated from the plugin's SCHEMA: the block must be current.
        assert _docs.render(name) in text, f"{name}: run python -m bonzo_plugins._docs"
        return
    keys = list(module.KEYS) + list(getattr(module, "RULE_KEYS", ()))
    # A README generated from SCHEMA is checked by tests/test_schema.py; a
    # hand-written one has the ``key`` / *type* form.
    form = r"^\s*``{}``\n" if getattr(module, "SCHEMA", None) is not None else r"^\s*``{}``\n\s+\*"
    for key in keys:
        assert re.search(form.format(key), text, re.M), f"{name}: {key} undocumented"


@pytest.mark.parametrize("name", DOCUMENTED)
def test_readme_examples_configure(name, tmp_path):
    text = (ROOT / "plugins" / name / "README.rst").read_text("utf-8")
    blocks = toml_blocks(text)
    assert blocks, f"{name}: no TOML example"
    cls = load(entry_points()[name])
    for block in blocks:
        table = tomllib.loads(block)["plugins"][name]
        if "file" in table:
            (tmp_path / table["file"]).write_text("example.com\n", encoding="utf-8")
        cls().bonzo_configure(config=table, app=SimpleNamespace(base_dir=tmp_path))


def test_all_five_together_end_to_end(tmp_path):
    """The order a typical configuration uses, through a real server."""
    tables = {
        "access": {"rules": [{"stage": "mail", "match": "*@spam.example", "action": "deny"}]},
        "recipients": {"domains": ["example.com"]},
        "headers": {"add": {"X-Session": "{session_id}"}, "trace": True},
        "maildir": {"path": "Maildir", "per_recipient": True},
        "log": {},
    }
    plugins = []
    for name, table in tables.items():
        plugin = load(entry_points()[name])()
        plugin.bonzo_configure(config=table, app=SimpleNamespace(base_dir=tmp_path))
        plugins.append((name, plugin))
    with serve(*plugins) as server, server.client() as client:
        client.ehlo()
        assert client.mail("joe@spam.example")[0] == 554
        assert (
            client.sendmail("a@example.org", ["alice@example.com"], b"Subject: x\r\n\r\nx\r\n")
            == {}
        )
    (path,) = (tmp_path / "Maildir" / "example.com" / "alice" / "new").iterdir()
    content = path.read_bytes()
    assert content.startswith(
        b"Return-Path: <a@example.org>\r\nDelivered-To: alice@example.com\r\n"
    )
    assert b"\r\nReceived: " in content
    assert b"\r\nX-Session: " in content and b"\r\nX-Bonzo-Plugin: headers\r\n" in content


# ------------------------------------------------- through Bonzo's own loader
def _installed() -> bool:
    try:
        from bonzo.app import installed_plugins
    except ImportError:  # pragma: no cover
        return False
    return set(PLUGINS) <= set(installed_plugins())


needs_install = pytest.mark.skipif(
    not _installed(), reason="the bonzo distribution (entry points) is not installed"
)


@needs_install
def test_mail_app_loads_and_configures_the_plugins(tmp_path):
    from bonzo.app import MailApp
    from bonzo.config import parse_config

    (tmp_path / "rcpt.txt").write_text("alice@example.com\n", encoding="utf-8")
    text = """
[plugins]
enabled = ["access", "recipients", "headers", "maildir", "log"]

[plugins.recipients]
file = "rcpt.txt"

[plugins.maildir]
path = "store"

[plugins.log]
level = "debug"
"""
    app = MailApp(parse_config(text, "test.toml", tmp_path))
    maildir = app.plugins.get("maildir")
    assert maildir.path == tmp_path / "store"  # relative to the config file's directory
    assert app.plugins.get("recipients").users == {"example.com": {"alice"}}


@needs_install
def test_mail_app_reports_a_plugin_configuration_error(tmp_path):
    from bonzo.app import MailApp
    from bonzo.config import ConfigError, parse_config

    text = '[plugins]\nenabled = ["recipients"]\n[plugins.recipients]\ndomains = 5\n'
    with pytest.raises(ConfigError, match=r"plugins\.recipients.*domains: expected a list"):
        MailApp(parse_config(text, "test.toml", tmp_path))


@needs_install
def test_the_shipped_default_configuration_is_valid(tmp_path, monkeypatch):
    from bonzo.app import MailApp
    from bonzo.config import load_config

    monkeypatch.chdir(tmp_path)
    app = MailApp(load_config(None))
    assert list(tmp_path.iterdir()) == []  # loading creates nothing
    assert app.warnings() == []


def test_every_bundled_plugin_package_is_in_the_distribution():
    """A plain (non-editable) install ships only the packages pyproject lists."""
    import sys
    from pathlib import Path

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    root = Path(__file__).resolve().parents[2]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {"bonzo", "bonzo_plugins"} | {
        f"bonzo_plugins.{p.parent.name}" for p in (root / "plugins").glob("*/__init__.py")
    }
    assert on_disk <= listed, sorted(on_disk - listed)


@pytest.mark.parametrize(
    ("name", "table", "backend"),
    [
        ("clamav", {}, "127.0.0.1:3310"),
        ("spamassassin", {"socket": "/run/spamd.sock"}, "unix:/run/spamd.sock"),
        ("policy", {"host": "::1", "port": 10023}, "[::1]:10023"),
        ("rspamd", {"url": "http://u:secret@127.0.0.1:11333"}, "http://127.0.0.1:11333/checkv2"),
    ],
)
def test_plugins_with_a_backend_name_it_for_their_timeouts(name, table, backend):
    # A hook that runs out of time names it (bonzo.hooks.HookTimeout); never
    # with a password.
    plugin = importlib.import_module(f"bonzo_plugins.{name}.plugin")
    cls = next(
        getattr(plugin, n) for n in dir(plugin) if n.endswith("Plugin") and n.lower() != "plugin"
    )
    instance = cls()
    instance.bonzo_configure(config=table, app=SimpleNamespace(base_dir="."))
    assert instance.backend == backend


def test_the_milter_plugin_names_every_milter_it_asks():
    from bonzo_plugins.milter import MilterPlugin

    plugin = MilterPlugin()
    plugin.bonzo_configure(
        config={
            "milters": [
                {"name": "dkim", "socket": "inet:8891@127.0.0.1"},
                {"name": "clam", "socket": "unix:/run/clamav-milter.sock"},
            ]
        },
        app=SimpleNamespace(base_dir="."),
    )
    assert plugin.backend == "dkim at inet:8891@127.0.0.1, clam at unix:/run/clamav-milter.sock"

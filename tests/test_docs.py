"""The documentation builds without warnings and covers the code.

Like datasette's ``test_docs.py``: a setting, a public name or an example
that is not documented or not tested fails the suite, so the docs cannot
silently fall behind the code.
"""

from __future__ import annotations

import argparse
import doctest
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

import bonzo
from bonzo import cli, config, hookspecs
from bonzo.settings import SMTPSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TESTS = ROOT / "tests"
EXAMPLES = ROOT / "examples"
# ``from __future__ import annotations`` leaves a name in every module.
FUTURE_FEATURE = type(importlib.import_module("__future__").annotations)


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the HTML docs (warnings are errors) and return the output directory."""
    pytest.importorskip("sphinx", reason="Sphinx is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("html")
    doctrees = tmp_path_factory.mktemp("doctrees")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    cmd += ["-d", str(doctrees), str(DOCS), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout}\n{result.stderr}"
    return out


def ids_in(*pages: Path) -> set[str]:
    ids: set[str] = set()
    for page in pages:
        ids |= set(re.findall(r'\bid="([^"]+)"', page.read_text(encoding="utf-8")))
    return ids


def inventory(html: Path) -> dict[tuple[str, str], str]:
    """The objects of the build (``objects.inv``): (role, name) -> page#anchor."""
    data = (html / "objects.inv").read_bytes()
    header_end = 0
    for _ in range(4):  # four lines of text, then zlib-compressed lines
        header_end = data.index(b"\n", header_end) + 1
    found = {}
    pattern = re.compile(r"(.+?)\s+(\S+:\S+)\s+(-?\d+)\s+(\S*)\s+(.*)")
    for line in zlib.decompress(data[header_end:]).decode("utf-8").splitlines():
        m = pattern.fullmatch(line)
        if m:
            name, role, _, uri, _ = m.groups()
            found[(role, name)] = uri.replace("$", name.lower())
    return found


def on_page(inv: dict[tuple[str, str], str], role: str, name: str, page: str) -> bool:
    uri = inv.get((role, name))
    return uri is not None and uri.split("#", 1)[0] == page


def section_of(page_html: str, anchor: str) -> str:
    """The HTML of the section whose id (or a label inside it) is ``anchor``,
    up to its first subsection."""
    start = page_html.find(f'id="{anchor}"')
    if start < 0:
        return ""
    ends = [i for i in (page_html.find(tag, start) for tag in ("<section", "</section>")) if i > 0]
    return page_html[start : min(ends) if ends else len(page_html)]


def bonzo_modules() -> list[str]:
    names = ["bonzo"]
    for info in pkgutil.iter_modules(bonzo.__path__):
        if not info.name.startswith("_"):
            names.append(f"bonzo.{info.name}")
    return names


def public_names(module_name: str) -> list[str]:
    """``__all__``, or else the public names a module defines (not imports)."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and not isinstance(value, FUTURE_FEATURE)
        and getattr(value, "__module__", module_name) == module_name
    ]


def test_docs_build_without_warnings(html: Path) -> None:
    pages = ("index", "quickstart", "original-api", "protocol", "settings", "changelog")
    for page in pages + ("configuration", "daemon", "plugins"):
        assert (html / f"{page}.html").is_file(), page


def test_every_setting_is_documented(html: Path) -> None:
    ids = ids_in(html / "settings.html")
    prefix = "bonzo.settings.SMTPSettings."
    missing = [name for name in SMTPSettings.field_names() if prefix + name not in ids]
    assert not missing, f"settings missing from settings.html: {missing}"


def test_every_public_name_is_in_the_api_reference(html: Path) -> None:
    # SMTPSettings itself is documented on the settings page, linked from api/settings.
    ids = ids_in(*sorted((html / "api").glob("*.html")), html / "settings.html")
    missing = []
    for module_name in bonzo_modules():
        if f"module-{module_name}" not in ids:
            missing.append(f"module {module_name}")
        module = importlib.import_module(module_name)
        for name in public_names(module_name):
            obj = getattr(module, name)
            # A re-exported class or function is documented where it is defined.
            home = obj.__module__ if inspect.isclass(obj) or inspect.isfunction(obj) else None
            if f"{home or module_name}.{name}" not in ids:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"not in the API reference (docs/api/): {missing}"


def hook_names() -> list[str]:
    return sorted(name for name in vars(hookspecs) if name.startswith("bonzo_"))


def test_every_hook_has_its_section_in_the_plugins_page(html: Path) -> None:
    """One section per hook in the hook reference: its label ``hook-<name>``,
    its signature and docstring (with the version it appeared in) and an
    example."""
    inv = inventory(html)
    page = (html / "plugins.html").read_text(encoding="utf-8")
    assert hook_names(), "bonzo.hookspecs defines no hook"
    problems = []
    for hook in hook_names():
        if not on_page(inv, "py:function", f"bonzo.hookspecs.{hook}", "plugins.html"):
            problems.append(f"{hook}: no signature (autofunction) on plugins.html")
        label = inv.get(("std:label", f"hook-{hook}"), "")
        if not label.startswith("plugins.html#"):
            problems.append(f"{hook}: no section labelled hook-{hook} on plugins.html")
            continue
        body = section_of(page, label.split("#", 1)[1])
        for what, needle in (
            ("signature", f'id="bonzo.hookspecs.{hook}"'),
            ("versionadded", 'class="versionadded"'),
            ("Python example", 'class="highlight-python'),
        ):
            if needle not in body:
                problems.append(f"{hook}: its section has no {what}")
    assert not problems, "hook reference incomplete:\n" + "\n".join(problems)


def test_the_hook_kinds_table_lists_every_hook_of_its_kind() -> None:
    """The plugins page's table of hook kinds names the same hooks as
    DECISION_HOOKS, OBSERVER_HOOKS and the synchronous ones, which it says
    code can read."""
    text = (DOCS / "plugins.rst").read_text(encoding="utf-8")
    table = text.split("There are three kinds of hooks:", 1)[1].split("The lists are also", 1)[0]
    rows = re.split(r"\n   \* - ", table)
    found = {
        row.split("\n", 1)[0].strip("* "): set(re.findall(r":func:`(bonzo_\w+)`", row))
        for row in rows[2:]
    }
    assert found == {
        "Decision": set(hookspecs.DECISION_HOOKS),
        "Observer": set(hookspecs.OBSERVER_HOOKS),
        "Synchronous set-up and mapping": {"bonzo_configure", "bonzo_exception"},
    }
    assert set().union(*found.values()) == set(hook_names())


def config_tables_and_keys() -> tuple[set[str], set[str]]:
    """Every table and every dotted key that bonzo.config accepts."""
    tables = set(config.TOP_LEVEL_KEYS) | {"plugins.<name>"}
    keys = {f"{section}.{name}" for name, section in config.SETTING_SECTIONS.items()}
    keys |= {f"{section}.{key}" for section, extra in config.EXTRA_KEYS.items() for key in extra}
    keys |= {f"listeners.{key}" for key in config.LISTENER_KEYS}
    keys |= {f"listeners.tls.{key}" for key in config.TLS_KEYS}
    keys |= {f"logging.{key}" for key in config.LOGGING_KEYS}
    keys |= {f"plugins.{key}" for key in config.PLUGINS_KEYS}
    keys |= {f"dns.{key}" for key in config.DNS_KEYS}
    keys |= {f"redis.{key}" for key in config.REDIS_KEYS}
    keys |= {f"metrics.{key}" for key in config.METRICS_KEYS}
    return tables, keys


def test_every_configuration_key_is_documented(html: Path) -> None:
    inv = inventory(html)
    tables, keys = config_tables_and_keys()
    missing = [
        f"[{t}]"
        for t in sorted(tables)
        if not on_page(inv, "std:tomltable", t, "configuration.html")
    ]
    missing += [k for k in sorted(keys) if not on_page(inv, "std:tomlkey", k, "configuration.html")]
    assert not missing, f"not described on configuration.html (.. tomlkey::): {missing}"
    documented = {name for role, name in inv if role == "std:tomlkey"}
    assert not documented - keys, (
        f"documented keys bonzo.config does not accept: {documented - keys}"
    )


def cli_commands() -> dict[str, list[str]]:
    """``bonzo <command>`` -> its options and positional arguments (not -h/--help)."""

    def arguments(parser: argparse.ArgumentParser) -> list[str]:
        out = []
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            out += action.option_strings or [action.metavar or action.dest]
        return out

    parser = cli._parser()
    commands = {"bonzo": arguments(parser)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[f"bonzo {name}"] = arguments(sub)
    return commands


def test_every_command_and_option_is_documented(html: Path) -> None:
    inv = inventory(html)
    commands = cli_commands()
    assert len(commands) > 1, "bonzo has no subcommands?"
    missing = []
    for command, options in commands.items():
        if command != "bonzo" and not on_page(inv, "std:clicommand", command, "daemon.html"):
            missing.append(command)
        program = command.replace(" ", "-")
        for option in options:
            if not on_page(inv, "std:cmdoption", f"{program}.{option}", "daemon.html"):
                missing.append(f"{command} {option}")
    assert not missing, f"not described on daemon.html (.. clicommand::/.. option::): {missing}"


def test_every_bundled_plugin_has_a_section(html: Path) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    bundled = pyproject["project"]["entry-points"]["bonzo.plugins"]
    inv = inventory(html)
    missing = [
        n for n in sorted(bundled) if not on_page(inv, "std:label", f"plugin-{n}", "plugins.html")
    ]
    assert not missing, f"bundled plugins without a section (.. bonzo-bundled-plugin::): {missing}"


def test_every_example_is_used_by_a_test() -> None:
    this = Path(__file__).resolve()
    tests_text = "\n".join(
        path.read_text(encoding="utf-8") for path in TESTS.rglob("*.py") if path.resolve() != this
    )
    examples = sorted(
        p for p in EXAMPLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert examples, "examples/ is empty"
    untested = [str(p.relative_to(ROOT)) for p in examples if p.name not in tests_text]
    assert not untested, f"examples no test refers to: {untested}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.rst")))
def test_doctests_in_docs(page: str) -> None:
    """Every ``>>>`` snippet in the docs runs and prints what the page says."""
    result = doctest.testfile(
        str(DOCS / page),
        module_relative=False,
        optionflags=doctest.ELLIPSIS,
        raise_on_error=False,
        verbose=False,
    )
    assert result.failed == 0, f"{result.failed} doctest(s) failed in docs/{page}"

"""The documentation builds without warnings and covers the code.

Like datasette's ``test_docs.py``: a setting, a public name or an example
that is not documented or not tested fails the suite, so the docs cannot
silently fall behind the code.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bonzo
from bonzo.settings import SMTPSettings

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
    for page in ("index", "quickstart", "original-api", "protocol", "settings", "changelog"):
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

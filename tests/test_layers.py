"""The package is a strict stack: each module imports only the modules below
it (the order of the API reference, docs/api/index.rst), never a private
name of another module, and there is no import circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import bonzo

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(bonzo.__file__).parent


def stack() -> list[str]:
    """Module names in the order of the API reference's table of contents."""
    text = (ROOT / "docs" / "api" / "index.rst").read_text()
    return [name for name in re.findall(r"^   (\w+)$", text, re.M) if name != "bonzo"]


def bonzo_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) for every ``from .x import ...`` that
    runs (imports made only for type checking are left out)."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in ast.walk(node):
                typing_only.add(id(inner))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in typing_only:
            names = [alias.name for alias in node.names]
            if node.module is None:
                # "from . import x": a module of the package, or a name of the
                # package itself (version).
                for name in names:
                    module = name if (PACKAGE / f"{name}.py").exists() else "bonzo"
                    found.append((module, [], node.lineno))
            else:
                found.append((node.module, names, node.lineno))
    return found


def test_the_reference_lists_every_module():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert set(stack()) == modules


def test_each_module_imports_only_modules_below_it():
    order = stack()
    problems = []
    for position, name in enumerate(order):
        for module, _, line in bonzo_imports(PACKAGE / f"{name}.py"):
            if module in ("bonzo", "_speedups"):
                continue  # the package's own names (version); the C leaf module
            if module not in order[:position]:
                problems.append(f"bonzo/{name}.py:{line} imports {module}, which is not below it")
    assert problems == []


def test_no_private_name_is_imported_across_modules():
    problems = []
    for path in PACKAGE.glob("*.py"):
        for module, names, line in bonzo_imports(path):
            for imported in names:
                if imported.startswith("_"):
                    problems.append(f"bonzo/{path.name}:{line} imports {module}.{imported}")
    assert problems == []


def test_plugins_never_get_the_connection():
    """Plugins see sessions and envelopes: nothing puts the connection where
    a plugin can reach it."""
    for path in PACKAGE.glob("*.py"):
        assert '"bonzo.connection"' not in path.read_text(), path

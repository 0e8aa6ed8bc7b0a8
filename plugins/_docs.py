"""Keep each bundled plugin's README in step with its declared keys.

Every plugin's ``README.rst`` holds the reference of its table between two
comment lines, generated from the plugin's :class:`bonzo.schema.Schema`
(``SCHEMA`` in its ``plugin`` module)::

    .. BEGIN KEYS (generated from SCHEMA by python -m bonzo_plugins._docs)
    ...
    .. END KEYS

``python -m bonzo_plugins._docs`` rewrites those blocks; ``--check`` only
says which are out of date (exit status 1). Tests run the check.

Private to ``bonzo_plugins``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["BEGIN", "END", "plugins_with_schema", "render", "update"]

BEGIN = ".. BEGIN KEYS (generated from SCHEMA by python -m bonzo_plugins._docs)"
END = ".. END KEYS"
HERE = Path(__file__).resolve().parent


def plugins_with_schema() -> list[str]:
    """The bundled plugins whose ``plugin`` module declares ``SCHEMA``."""
    names = []
    for path in sorted(HERE.glob("*/plugin.py")):
        module = importlib.import_module(f"{__package__}.{path.parent.name}.plugin")
        if getattr(module, "SCHEMA", None) is not None:
            names.append(path.parent.name)
    return names


def render(name: str) -> str:
    """The generated block of plugin ``name``, markers included."""
    module = importlib.import_module(f"{__package__}.{name}.plugin")
    return f"{BEGIN}\n\n{module.SCHEMA.rst()}\n{END}"


def update(name: str, write: bool) -> bool:
    """Whether the README of ``name`` is up to date; rewrite it if ``write``.
    Raises :class:`ValueError` when the README has no (or broken) markers."""
    path = HERE / name / "README.rst"
    text = path.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no {BEGIN!r} ... {END!r} block")
    new = text[:start] + render(name) + text[end + len(END) :]
    if new == text:
        return True
    if write:
        path.write_text(new, encoding="utf-8")
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bonzo_plugins._docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale READMEs")
    parser.add_argument("names", nargs="*", help="plugins (default: every one with a SCHEMA)")
    args = parser.parse_args(argv)
    stale = []
    for name in args.names or plugins_with_schema():
        try:
            if not update(name, write=not args.check):
                stale.append(name)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
    for name in stale:
        print(f"{name}: README {'out of date' if args.check else 'rewritten'}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

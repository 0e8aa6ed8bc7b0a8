"""Sphinx configuration for the Bonzo documentation.

The build must work off-line: no theme, extension or inventory is fetched
from the network. ``sphinx-build -W --keep-going -b html docs docs/_build/html``
is run by CI and by ``tests/test_docs.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Document the checkout these docs belong to, not some other installed copy.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "_ext"))

import bonzo  # noqa: E402

project = "Bonzo"
author = "The Bonzo developers"
copyright = "2013-2017 Jorge Puente Sarrín; the Bonzo developers"
version = ".".join(map(str, bonzo.version_tuple[:2]))
release = bonzo.version

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "bonzo_settings",
    "bonzo_config",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_static_path: list[str] = []
html_theme = "alabaster"
html_title = f"Bonzo {release}"


autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"show-inheritance": True}

# Intersphinx never downloads: an inventory is used only when its file is
# present in docs/_inventories/ (e.g. copied from a local Python or Tornado
# documentation build). Without them, references to the standard library and
# Tornado are rendered as plain text, which is not a warning.
_INVENTORIES = {
    "python": "https://docs.python.org/3",
    "tornado": "https://www.tornadoweb.org/en/stable",
    "pluggy": "https://pluggy.readthedocs.io/en/stable",
}
intersphinx_mapping = {
    name: (url, str(HERE / "_inventories" / f"{name}.inv"))
    for name, url in _INVENTORIES.items()
    if (HERE / "_inventories" / f"{name}.inv").is_file()
}
intersphinx_timeout = 1

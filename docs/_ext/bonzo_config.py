"""A Sphinx extension for the configuration, daemon and plugin pages.

Object types, so that every key, table and command has an anchor, an index
entry and a cross-reference role (``:tomlkey:`limits.max_recipients```):

``.. tomltable:: limits``
    A table of ``bonzo.toml``.
``.. tomlkey:: limits.max_recipients``
    A key, named with its table as in Bonzo's error messages.
``.. clicommand:: bonzo serve``
    A subcommand of the ``bonzo`` program (its options use the standard
    ``.. program::`` and ``.. option::`` directives).

Directives that read the code, so that the pages cannot go stale:

``.. bonzo-config-keys:: limits``
    One ``tomlkey`` per :class:`~bonzo.settings.SMTPSettings` field that
    :data:`bonzo.config.SETTING_SECTIONS` puts in that table, with the TOML
    type, the default and the description of the setting (its docstring).
    A field without a docstring fails the build (``-W``).
``.. bonzo-bundled-plugin:: maildir``
    The section of one bundled plugin: ``plugins/<name>/README.rst`` when it
    exists, else a short section made from the plugin's docstrings, so that a
    README written later appears without editing the page.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

if sys.version_info >= (3, 11):  # pragma: no cover - depends on the interpreter
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from bonzo_settings import settings_fields

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PLUGINS_DIR = ROOT / "plugins"

#: How a Python annotation of a setting reads in TOML terms.
TOML_TYPES = {
    "int": "integer",
    "float": "number (integer or float)",
    "str": "string",
    "bool": "boolean",
    "str | None": "string",
}


def toml_literal(value: Any) -> str:
    """``value`` written as TOML, for a default."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def describe_toml_default(f: dataclasses.Field[Any]) -> str:
    if f.default is None:
        return "not set"
    if f.default is not dataclasses.MISSING:
        return f"``{toml_literal(f.default)}``"
    factory = f.default_factory
    if factory is not dataclasses.MISSING:
        module = factory.__module__.lstrip("_")
        return f"computed at startup (``{module}.{factory.__qualname__}()``)"
    return "*(required)*"


def bundled_entry_points() -> dict[str, str]:
    """The ``bonzo.plugins`` entry points that pyproject.toml declares, by name."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    return dict(data["project"]["entry-points"]["bonzo.plugins"])


class ConfigKeysDirective(SphinxDirective):
    """``.. bonzo-config-keys:: <table>``: the SMTPSettings-backed keys of a table."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        config = importlib.import_module("bonzo.config")
        table = self.arguments[0]
        _, fields, docs = settings_fields()
        by_name = {f.name: f for f in fields}
        names = [name for name, section in config.SETTING_SECTIONS.items() if section == table]
        if not names:
            logger.warning("no setting belongs to table [%s]", table, location=self.get_location())
        lines: list[str] = []
        for name in names:
            f = by_name.get(name)
            if f is None:
                logger.warning(
                    "SETTING_SECTIONS names %s, which is not an SMTPSettings field",
                    name,
                    location=self.get_location(),
                )
                continue
            doc = docs.get(name) or []
            if not "".join(doc).strip():
                logger.warning(
                    "bonzo.settings.SMTPSettings.%s has no docstring",
                    name,
                    location=self.get_location(),
                )
            type_ = TOML_TYPES.get(str(f.type), f"``{f.type}``")
            lines += [
                f".. tomlkey:: {table}.{name}",
                "",
                f"   :Type: {type_}",
                f"   :Default: {describe_toml_default(f)}",
                f"   :Setting: :attr:`~bonzo.settings.SMTPSettings.{name}`",
                "",
            ]
            for line in doc:
                lines.append(f"   {self._rewrite(line, config.SETTING_SECTIONS)}" if line else "")
            lines.append("")
        container = nodes.container()
        content = StringList(lines, source=f"<bonzo.config [{table}] keys>")
        nested_parse_with_titles(self.state, content, container)
        return container.children

    @staticmethod
    def _rewrite(line: str, sections: dict[str, str]) -> str:
        # A reference to a sibling setting becomes a reference to its key.
        def key(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in sections:
                return f":tomlkey:`{sections[name]}.{name}`"
            return match.group(0)

        line = line.replace("``None`` gives", "Not set, it is")  # no None in TOML
        return re.sub(r":attr:`~?(?:bonzo\.settings\.SMTPSettings\.)?(\w+)`", key, line)


class BundledPluginDirective(SphinxDirective):
    """``.. bonzo-bundled-plugin:: <name>``: the README of a bundled plugin."""

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        location = self.get_location()
        entry_points = bundled_entry_points()
        if name not in entry_points:
            logger.warning(
                "%s is not a bundled plugin (entry points: %s)",
                name,
                ", ".join(sorted(entry_points)),
                location=location,
            )
            return []
        readme = PLUGINS_DIR / name / "README.rst"
        lines = [f".. _plugin-{name}:", ""]
        if readme.is_file():
            self.env.note_dependency(str(readme))
            here = Path(self.env.doc2path(self.env.docname)).parent
            lines.append(f".. include:: {Path(os.path.relpath(readme, here)).as_posix()}")
        else:
            logger.info("plugins/%s/README.rst does not exist: using the docstrings", name)
            lines += self._from_docstrings(name, entry_points[name])
        container = nodes.container()
        source, _ = self.get_source_info()
        nested_parse_with_titles(self.state, StringList(lines, source=source), container)
        return container.children

    @staticmethod
    def _from_docstrings(name: str, entry_point: str) -> list[str]:
        module_name, _, class_name = entry_point.partition(":")
        package = module_name.split(".", 1)[1] if "." in module_name else module_name
        source = PLUGINS_DIR / package / "plugin.py"
        tree = ast.parse(source.read_text("utf-8"))
        class_doc = next(
            (
                ast.get_docstring(node) or ""
                for node in tree.body
                if isinstance(node, ast.ClassDef) and node.name == class_name
            ),
            "",
        )
        title = f"``{name}``"
        lines = [title, "^" * len(title), ""]
        lines += (ast.get_docstring(tree) or "").splitlines() + [""]
        lines += class_doc.splitlines() + [""]
        lines += [f"Entry point: ``{entry_point}``. Its configuration table is"]
        lines += [f"``[plugins.{name}]``; see ``bonzo.toml.example``.", ""]
        return lines


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("bonzo_settings")
    app.add_object_type(
        "tomltable",
        "tomltable",
        indextemplate="pair: %s; configuration table",
        objname="configuration table",
    )
    app.add_object_type(
        "tomlkey",
        "tomlkey",
        indextemplate="pair: %s; configuration key",
        objname="configuration key",
    )
    app.add_object_type(
        "clicommand",
        "clicommand",
        indextemplate="pair: %s; command",
        objname="bonzo command",
    )
    app.add_directive("bonzo-config-keys", ConfigKeysDirective)
    app.add_directive("bonzo-bundled-plugin", BundledPluginDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

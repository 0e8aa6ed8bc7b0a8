"""A Sphinx extension that documents every :class:`bonzo.settings.SMTPSettings` field.

The fields, their types and defaults come from the dataclass itself and their
descriptions from the docstring under each field, so the settings page can
never go stale: a new field appears on it without anyone editing the docs, and
a field without a docstring fails the build (``-W``).

``.. bonzo-settings::`` emits one ``py:attribute`` per field; put it in the
content of ``.. autoclass:: SMTPSettings`` so that the attributes belong to the
class. With the ``:table:`` flag it emits a summary table (name, type,
default) linking to them instead.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

logger = logging.getLogger(__name__)

MODULE = "bonzo.settings"
CLASS = "SMTPSettings"


def describe_default(f: dataclasses.Field[Any]) -> str:
    """The default of a field as reST inline text."""
    if f.default is not dataclasses.MISSING:
        return f"``{f.default!r}``"
    factory = f.default_factory
    if factory is not dataclasses.MISSING:
        module = factory.__module__
        qualname = getattr(factory, "__qualname__", repr(factory))
        public = module.lstrip("_")
        if public != module and getattr(importlib.import_module(public), qualname, None) is factory:
            module = public  # _socket.gethostname is socket.gethostname
        name = f"{module}.{qualname}"
        return f"computed when the settings are created: ``{name}()``"
    return "*(required)*"


def settings_fields() -> tuple[type, list[dataclasses.Field[Any]], dict[str, list[str]]]:
    module = importlib.import_module(MODULE)
    cls = getattr(module, CLASS)
    analyzer = ModuleAnalyzer.for_module(MODULE)
    docs = {
        attr: list(lines)
        for (owner, attr), lines in analyzer.find_attr_docs().items()
        if owner == CLASS
    }
    return cls, list(dataclasses.fields(cls)), docs


class BonzoSettingsDirective(SphinxDirective):
    has_content = False
    option_spec = {"table": lambda arg: True}

    def run(self) -> list[nodes.Node]:
        _, fields, docs = settings_fields()
        location = self.get_location()
        lines: list[str] = []
        if "table" in self.options:
            lines += [
                ".. list-table::",
                "   :header-rows: 1",
                "   :widths: 30 20 50",
                "",
                "   * - Setting",
                "     - Type",
                "     - Default",
            ]
            for f in fields:
                lines += [
                    f"   * - :attr:`~{MODULE}.{CLASS}.{f.name}`",
                    f"     - ``{f.type}``",
                    f"     - {describe_default(f)}",
                ]
        else:
            for f in fields:
                doc = docs.get(f.name)
                if not doc or not "".join(doc).strip():
                    logger.warning(
                        "%s.%s.%s has no docstring", MODULE, CLASS, f.name, location=location
                    )
                    doc = []
                lines += [
                    f".. py:attribute:: {f.name}",
                    f"   :type: {f.type}",
                    "",
                    f"   Default: {describe_default(f)}.",
                    "",
                ]
                lines += [f"   {line}" if line else "" for line in doc]
                lines.append("")
        container = nodes.container()
        content = StringList(lines, source=f"<{MODULE}.{CLASS} fields>")
        nested_parse_with_titles(self.state, content, container)
        return container.children


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("bonzo-settings", BonzoSettingsDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}

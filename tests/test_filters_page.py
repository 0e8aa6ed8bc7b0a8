"""Every configuration on the Filters page (docs/filters.rst) loads and
configures its plugins, as ``bonzo check`` would — the page's examples are
runnable as shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bonzo.app import MailApp
from bonzo.config import parse_config

PAGE = Path(__file__).resolve().parents[1] / "docs" / "filters.rst"


def toml_blocks() -> list[str]:
    text = PAGE.read_text("utf-8")
    blocks = re.findall(r"\.\. code-block:: toml\n\n((?:   .*\n|\n)+)", text)
    return [re.sub(r"^   ", "", b, flags=re.M) for b in blocks]


def test_the_page_has_one_configuration_per_plugin():
    enabled = [re.search(r"enabled = \[(.*)\]", b).group(1) for b in toml_blocks()]
    for plugin in (
        "dnsbl", "spf", "dkim", "dmarc", "authres", "milter",
        "clamav", "rspamd", "spamassassin", "policy",
    ):  # fmt: skip
        assert any(f'"{plugin}"' in e for e in enabled), plugin


@pytest.mark.parametrize("block", toml_blocks())
def test_each_configuration_configures(block, tmp_path):
    config = parse_config(block, source="filters.rst", base_dir=tmp_path)
    app = MailApp(config)
    assert [name for name in config.plugins.enabled if not app.plugins.hooks_of(name)] == []
    assert not any("can accept" in w or "never runs" in w for w in app.warnings())
    # A backend that may outlast its plugin's hook time limit (the milter
    # example: two milters, 30 s each) would end the hook first.
    assert not [w for w in app.warnings() if "hook time limit" in w]

"""The discard plugin: no keys; every message accepted and dropped."""

from __future__ import annotations

import pytest
from bonzo_plugins.discard.plugin import SCHEMA, DiscardPlugin

from bonzo import Accept


def test_it_takes_no_keys():
    plugin = DiscardPlugin()
    plugin.bonzo_configure(None)
    plugin.bonzo_configure({})
    assert SCHEMA.names == []
    with pytest.raises(ValueError, match=r"^path: unknown key \(this table takes no keys\)$"):
        plugin.bonzo_configure({"path": "x"})
    with pytest.raises(ValueError, match=r"^expected a table, got 3$"):
        plugin.bonzo_configure(3)  # type: ignore[arg-type]


def test_every_message_is_accepted_and_dropped():
    verdict = DiscardPlugin().bonzo_deliver()
    assert isinstance(verdict, Accept)
    assert verdict.text == "Ok: discarded"

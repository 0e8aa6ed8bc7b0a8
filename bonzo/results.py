"""What each filter found, kept on the session and the message.

A filter records its finding with :meth:`Results.add` — ``spf=pass``,
``dkim=fail`` with the reason, ``dnsbl=listed`` with the zones — and later
plugins read it: ``dmarc`` reads ``spf`` and ``dkim``, ``authres`` writes
them all into one ``Authentication-Results`` header, a scoring plugin sums
the ``score`` details. ``session.results`` holds what concerns the
connection (the client's address, its HELO name); ``envelope.results`` what
concerns one message. Bonzo logs :meth:`Results.summary` of both on the
line of each message it accepts or refuses at the end of data.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Result", "Results"]

_WORD = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
#: Results kept per session or message: a plugin that records in a loop
#: cannot grow memory without bound.
MAX_RESULTS = 1000
_JSON = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Result:
    """One finding of one plugin."""

    plugin: str
    """Who found it (``"spf"``, ``"dkim"``, ``"milter"``...)."""
    result: str
    """A lower-case word: ``pass``, ``fail``, ``softfail``, ``neutral``,
    ``none``, ``temperror``, ``permerror``, ``skip``, ``error``,
    ``listed``..."""
    reason: str = ""
    """Why, for people (one line)."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """Facts for other plugins (JSON values: ``domain``, ``score``...)."""

    def __str__(self) -> str:
        if self.reason:
            # Quoted as a log field: a reason holding a client's text (its
            # HELO name) must not end the quotes and forge a result.
            reason = self.reason.replace("\\", "\\\\").replace('"', '\\"')
            return f'{self.plugin}={self.result}("{reason}")'
        return f"{self.plugin}={self.result}"


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    if depth > 8:
        raise ValueError(f"{where}: nested too deeply")
    if isinstance(value, _JSON):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_json(item, where, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings")
            _check_json(item, where, depth + 1)
        return
    raise ValueError(f"{where}: {type(value).__name__} is not a JSON value")


class Results:
    """The findings recorded so far, in the order they were made."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[Result] = []

    def add(self, plugin: str, result: str, reason: str = "", **details: Any) -> Result:
        """Record ``plugin``'s finding and return it. A plugin may record
        several (one per DKIM signature, say).

        Raises :class:`ValueError` for a name or result that is not a
        lower-case word, or details that are not JSON values.
        """
        if not isinstance(plugin, str) or not _WORD.fullmatch(plugin):
            raise ValueError(f"plugin name must be a lower-case word, not {plugin!r}")
        if not isinstance(result, str) or not _WORD.fullmatch(result):
            raise ValueError(f"result must be a lower-case word, not {result!r}")
        if not isinstance(reason, str):
            raise ValueError(f"reason must be a string, not {type(reason).__name__}")
        _check_json(details, f"{plugin} details")
        if len(self._items) >= MAX_RESULTS:
            raise ValueError(f"more than {MAX_RESULTS} results recorded")
        # One line, printable: a reason ends up in logs and headers.
        reason = " ".join("".join(c if c.isprintable() else " " for c in reason).split())
        item = Result(plugin, result, reason[:500], dict(details))
        self._items.append(item)
        return item

    def get(self, plugin: str) -> Result | None:
        """The last finding of ``plugin``, or ``None``."""
        for item in reversed(self._items):
            if item.plugin == plugin:
                return item
        return None

    def __getitem__(self, plugin: str) -> Result:
        """``results["dnsbl"]``: the last finding of ``plugin``;
        :class:`KeyError` when it recorded none (:meth:`get` gives ``None``)."""
        found = self.get(plugin)
        if found is None:
            raise KeyError(plugin)
        return found

    def all(self, plugin: str | None = None) -> list[Result]:
        """Every finding (of ``plugin``, if given), oldest first."""
        if plugin is None:
            return list(self._items)
        return [item for item in self._items if item.plugin == plugin]

    def summary(self) -> str:
        """``spf=pass dkim=fail("body hash mismatch")``: one line for a log."""
        return " ".join(str(item) for item in self._items)

    def __iter__(self) -> Iterator[Result]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, plugin: object) -> bool:
        return any(item.plugin == plugin for item in self._items)

    def __repr__(self) -> str:
        return f"Results({self.summary()!r})"

"""Take responsibility for every message by dropping it.

For tests, benchmarks and sink servers only: a client told ``250`` by this
plugin believes its message was delivered. It says so loudly at startup.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bonzo import Accept, hookimpl
from bonzo.schema import Schema

__all__ = ["DiscardPlugin"]

log = logging.getLogger("bonzo.plugins.discard")

_ACCEPT = Accept("Ok: discarded")
#: The ``[plugins.discard]`` table (:mod:`bonzo.schema`): no keys.
SCHEMA = Schema()
KEYS = tuple(SCHEMA.names)


class DiscardPlugin:
    """Delivers every message to nowhere (``250 Ok: discarded``)."""

    #: Gives a verdict on every call of these hooks (``bonzo check`` warns
    #: about plugins listed after it for them: they would never run).
    decides_always = ("bonzo_deliver",)

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None) -> None:
        """Refuse any key: there are none."""
        SCHEMA.parse(config)

    @hookimpl
    def bonzo_startup(self) -> None:
        log.warning("discard: every accepted message is thrown away (test/benchmark use only)")

    @hookimpl(trylast=True)
    def bonzo_deliver(self) -> Accept:
        return _ACCEPT

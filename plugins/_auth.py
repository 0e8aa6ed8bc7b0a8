"""Helpers the mail-authentication plugins (spf, dkim, dmarc, authres, dnsbl)
share: reading their policy keys, reaching the shared resolver, and making
text from the sender's DNS or message safe for replies, logs and headers.

Private to ``bonzo_plugins``; third-party plugins should not import it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any

from bonzo.settings import finite_number

from ._config import describe

__all__ = [
    "sanitize",
    "unshown",
    "get_choice",
    "get_seconds",
    "get_int",
    "resolver_of",
    "dns_enabled",
]


def sanitize(text: str, limit: int = 200) -> str:
    """``text`` as one line of printable ASCII, at most ``limit`` characters.

    Text from the sender's DNS (an SPF explanation, a DNS list's TXT record)
    or from a message goes into SMTP replies, logs and header fields, where
    a CR, LF or control character could inject lines."""
    cleaned = "".join(c if " " <= c <= "~" else " " for c in text).strip()
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


#: Character categories a reader may not show: control and format characters
#: (U+200E, the direction isolates, tag characters), separators, unassigned,
#: private-use and surrogate code points.
_UNSHOWN = frozenset(("Cc", "Cf", "Cn", "Co", "Cs", "Zs", "Zl", "Zp"))


def unshown(char: str) -> bool:
    """Whether a reader may not show ``char`` (white space included): text
    from a message that holds one may look like other text (``bank.example``
    followed by a NUL or a U+200E reads as ``bank.example``)."""
    return char.isspace() or unicodedata.category(char) in _UNSHOWN


def get_choice(config: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    """``config[key]``, one of ``choices``."""
    value = config.get(key, default)
    if value not in choices:
        raise ValueError(f"{key}: expected one of {', '.join(choices)}, got {describe(value)}")
    return str(value)


def get_seconds(config: Mapping[str, Any], key: str, default: float, high: float) -> float:
    """``config[key]`` as a number of seconds in (0, ``high``]."""
    value = config.get(key, default)
    if not finite_number(value) or not 0 < value <= high:
        raise ValueError(
            f"{key}: expected a number of seconds in (0, {high:g}], got {describe(value)}"
        )
    return float(value)


def get_int(config: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    """``config[key]`` as an integer in [``low``, ``high``]."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key}: expected an integer {low}..{high}, got {describe(value)}")
    return value


def resolver_of(app: Any) -> Any:
    """The process's resolver (``app.dns``), or ``None`` without one (an app
    built by hand, a test)."""
    return getattr(app, "dns", None) if app is not None else None


def dns_enabled(resolver: Any) -> bool:
    """Whether ``resolver`` will send queries (``[dns]`` names nameservers)."""
    if resolver is None:
        return False
    settings = getattr(resolver, "settings", None)
    return bool(getattr(settings, "enabled", False))

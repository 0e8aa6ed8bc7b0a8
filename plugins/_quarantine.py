"""The headers a quarantined message is kept with, by the ``maildir`` and
``queue`` plugins: why it was quarantined, and its envelope recipients, so
that an operator can find where it was going and release it.

Private to ``bonzo_plugins``.
"""

from __future__ import annotations

import unicodedata
from typing import Any

__all__ = ["add_quarantine_headers", "quarantine_recipients", "address_list"]

#: What an address written as is must not hold: what separates the list
#: (``,``), ends or comments an address (``<>;()``), quotes, white space and
#: controls. Such an address is written xtext-encoded instead.
_SPECIAL = frozenset(',<>;()"\\ \t')


def _plain(address: str, utf8: bool) -> bool:
    if not address or not address.isprintable() or not _SPECIAL.isdisjoint(address):
        return False
    if address.isascii():
        return True
    # Non-ASCII only in an SMTPUTF8 message (RFC 6532), and never an
    # invisible or direction-changing character.
    return utf8 and not any(unicodedata.category(c) in ("Cf", "Co", "Cs") for c in address)


def _xtext(address: str) -> str:
    """RFC 3461 xtext with every octet that is not plain ASCII (and ``+``,
    ``=`` and the list's separators) as ``+XX``: a decoder of xtext gives
    the address back."""
    out = []
    for octet in address.encode("utf-8", "surrogateescape"):
        char = chr(octet)
        if 0x21 <= octet <= 0x7E and char not in _SPECIAL and char not in "+=":
            out.append(char)
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


def address_list(addresses: list[str], utf8: bool = False) -> str:
    """``<a@example.org>, <b@example.org>`` folded into lines of about 78
    characters (a header value); an address that is not plain (a quoted
    local part with a space, a comma, a quote; anything not printable) is
    written ``xtext:<...>`` (RFC 3461 xtext), so that no address can end
    the header or start another. ``none`` for no address."""
    entries = [f"<{a}>" if _plain(a, utf8) else f"xtext:<{_xtext(a)}>" for a in addresses]
    if not entries:
        return "none"
    lines: list[str] = []
    line = ""
    for entry in entries:
        if line and len(line) + len(entry) + 2 > 76:
            lines.append(line + ",")
            line = entry
        else:
            line = f"{line}, {entry}" if line else entry
    lines.append(line)
    return "\r\n\t".join(lines)


def quarantine_recipients(envelope: Any) -> tuple[list[str], list[str]]:
    """The recipients the client gave (those not refused, in ``RCPT``
    order), and those the message would have been delivered to after the
    plugins' changes (removed ones left out, added ones in)."""
    refused, added = envelope.refused, envelope.added
    given = [
        r.original for i, r in enumerate(envelope.recipients) if i not in refused and i not in added
    ]
    final = [envelope.recipients[i].original for i in envelope.remaining_indexes]
    return given, final


def add_quarantine_headers(envelope: Any, reason: str) -> dict[str, Any]:
    """Add to a quarantined message (after the fields the filters added)
    ``X-Bonzo-Quarantine: <plugin>:
    <reason>``, ``X-Bonzo-Quarantine-Recipients:`` (the recipients the
    client gave) and, when plugins changed them,
    ``X-Bonzo-Quarantine-Final-Recipients:`` (what delivery would have
    used: ``none`` when every one was removed). Returns the same facts as a
    record (``by``, ``reason``, ``recipients``, ``final``) for a queue file.

    Any ``X-Bonzo-Quarantine*`` field already in the message (the client's)
    is removed first: it would pass for Bonzo's."""
    counts: dict[str, int] = {}
    for name, _ in envelope.headers():
        if name.lower().startswith("x-bonzo-quarantine"):
            counts[name.lower()] = counts.get(name.lower(), 0) + 1
    for name, count in counts.items():
        for _ in range(count):
            try:
                envelope.delete_header(name)  # the first left, each time
            except ValueError:
                # No field name ("X-Bonzo-Quarantine x"): no such field to
                # a reader either.
                break
    envelope.add_header("X-Bonzo-Quarantine", f"{envelope.quarantined_by}: {reason}")
    given, final = quarantine_recipients(envelope)
    utf8 = "SMTPUTF8" in envelope.mail_params
    envelope.add_header("X-Bonzo-Quarantine-Recipients", address_list(given, utf8))
    if final != given:
        envelope.add_header("X-Bonzo-Quarantine-Final-Recipients", address_list(final, utf8))
    return {
        "by": envelope.quarantined_by,
        "reason": reason,
        "recipients": given,
        "final": final,
    }

"""Mail addresses in one canonical form, beside the form the client sent.

Policy that compares addresses as the client spelled them can be bypassed by
spelling: ``ceo@ｅｘａｍｐｌｅ.ｃｏｍ`` (full-width letters), ``ceo@example。com``
(an ideographic full stop), ``ceo@exam<soft hyphen>ple.com`` and
``"ceo"@example.com`` all reach the mailbox ``ceo@example.com``. The protocol
core therefore gives every plugin an :class:`Address` for each sender and
recipient, whose :attr:`~Address.canonical` form is the one to match, store
and count on:

- the domain goes through the IDNA mapping of UTS #46 (non-transitional,
  STD3 rules, via the ``idna`` package) and is written in lower-case ASCII
  (A-labels, ``xn--...``); address literals are normalised with
  :mod:`ipaddress`, and an IPv4-mapped IPv6 literal
  (``[IPv6:::ffff:192.0.2.1]``) is written as the IPv4 literal
  (``[192.0.2.1]``) of the host it reaches;
- the local part is unquoted where quoting is not needed (``"ceo"`` →
  ``ceo``; ``"a b"`` stays quoted, with only the escapes it needs), and
  non-ASCII local parts are in Unicode normal form C. Its case is kept: only
  the receiving system knows whether ``Ceo`` and ``ceo`` differ (RFC 5321
  2.4); plugins that fold case do it themselves;
- ``postmaster`` without a domain is ``postmaster`` in any case.

:attr:`~Address.original` keeps what the client sent, for replies, logs and
the original Bonzo API.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna

__all__ = ["Address", "canonical_domain", "canonical_local", "NULL_SENDER"]

# RFC 5321 4.1.2 atext, plus non-ASCII (RFC 6531 3.3), as dot-atoms.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_ASCII_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
)
# What no ASCII domain may hold: a control character or white space (a name
# read from a header field must never be looked up as the one it shows once
# the octet is hidden). Anything else printable is a DNS name (RFC 2181 11:
# an underscore, a label starting with a hyphen), looked up as written.
_NOT_IN_DOMAIN = re.compile(r"[^\x21-\x7e]")
_QUOTED_PAIR = re.compile(r"\\(.)")


def canonical_domain(domain: str) -> str:
    """The canonical form of a domain or address literal.

    Raises :class:`ValueError` for an ASCII domain with a control
    character, white space or an empty label (so that a name read from a
    header field is never looked up as the one it shows once the octet is
    hidden; ``_`` and other printable characters are DNS names), when
    a non-ASCII domain has no IDNA form (a code point UTS #46 forbids, an
    empty label, a label that maps to ``@``) and for an address literal that
    is not one of RFC 5321 4.1.3 (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``
    without a zone index, or ``[tag:content]``).
    """
    if domain[:1] == "[":
        return _canonical_literal(domain)
    if domain.isascii():
        # (A final dot is the root: "example.org." is a name.)
        if _NOT_IN_DOMAIN.search(domain) or "" in domain.split(".")[:-1] or not domain:
            raise ValueError(f"not a domain name: {domain!r}")
        return domain.lower()
    try:
        encoded = idna.encode(domain, uts46=True, std3_rules=True, transitional=False)
    except idna.IDNAError as exc:
        raise ValueError(f"domain has no IDNA form: {exc}") from None
    ascii_domain = encoded.decode("ascii").lower()
    if not _ASCII_DOMAIN.fullmatch(ascii_domain):  # pragma: no cover - idna checks labels
        raise ValueError("domain has no IDNA form")
    return ascii_domain


# RFC 5321 4.1.3: Standardized-tag ":" 1*dcontent.
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?:[\x21-\x5a\x5e-\x7e]+")


def _canonical_literal(literal: str) -> str:
    """An RFC 5321 4.1.3 address literal, normalised; :class:`ValueError`
    for anything else: a zone index (``[IPv6:fe80::1%eth0]``), an IPv6
    address without the ``IPv6:`` tag (``[::1]``), an ``IPv6:`` tag on
    something else (``[IPv6:1.2.3.4]``), ``[300.1.1.1]``, ``[foo]``."""
    if not literal.endswith("]"):
        raise ValueError(f"not an address literal: {literal!r}")
    inner = literal[1:-1]
    if inner[:5].upper() == "IPV6:":
        try:
            address = ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise ValueError(f"not an IPv6 address literal: {literal!r}") from None
        if address.scope_id is not None:
            # An interface of this host, not an address on the Internet.
            raise ValueError(f"an IPv6 zone index in an address literal: {literal!r}")
        # An IPv4-mapped address (::ffff:a.b.c.d) reaches the IPv4 host: its
        # canonical form is that host's literal, so that a rule or a budget
        # for [a.b.c.d] holds for both spellings.
        if address.ipv4_mapped is not None:
            return f"[{address.ipv4_mapped}]"
        return f"[IPv6:{address.compressed}]"
    if ":" not in inner:
        try:
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            raise ValueError(f"not an IPv4 address literal: {literal!r}") from None
    if _GENERAL_LITERAL.fullmatch(inner):
        # A general address literal (tag:content): as sent.
        return literal
    raise ValueError(f"not an address literal (RFC 5321 4.1.3): {literal!r}")


def canonical_local(local: str) -> str:
    """The canonical form of a local part (see the module docs)."""
    quoted = local[:1] == '"'
    text = _QUOTED_PAIR.sub(r"\1", local[1:-1]) if quoted else local
    changed = False
    if not text.isascii():
        # NFC first: it can make quoting needless ("<" + U+0338 is U+226E)
        # or needed (U+037E is ";"), so the form is decided after it, and
        # the canonical form of a canonical form is itself.
        normal = unicodedata.normalize("NFC", text)
        changed, text = normal != text, normal
    if (quoted or changed) and _DOT_ATOM.fullmatch(text) is None:
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        text = f'"{escaped}"'
    return text


@dataclass(frozen=True, slots=True)
class Address:
    """A sender or recipient: what the client sent and its canonical form.

    ``str(address)`` is :attr:`canonical`.
    """

    original: str
    """The mailbox as the client sent it, without angle brackets or source
    route (``""`` for the null sender)."""

    local: str
    """The canonical local part (``""`` for the null sender)."""

    domain: str
    """The canonical domain: lower-case ASCII, IDNA A-labels (``""`` for the
    null sender and for ``postmaster`` without a domain)."""

    @classmethod
    def parse(cls, original: str) -> Address:
        """Build the address of a mailbox that has already passed the syntax
        checks of :func:`bonzo.protocol.parse_path` (``local@domain``,
        ``postmaster``, or ``""``): it does not check them again (use
        :func:`bonzo.protocol.parse_address` for an address a person
        wrote). Raises :class:`ValueError` for a domain with no IDNA form,
        an address literal that is not RFC 5321's (see
        :func:`canonical_domain`) and a string with no ``@`` other than
        ``postmaster``."""
        if not original:
            return NULL_SENDER
        at = original.rfind("@")
        if at < 0:  # <postmaster> (RFC 5321 4.5.1), case-insensitive
            if not (original.isascii() and original.lower() == "postmaster"):
                raise ValueError(f"not an address (no @): {original!r}")
            return cls(original, "postmaster", "")
        local = original[:at]
        domain = original[at + 1 :]
        # The usual case costs two checks and a lower().
        if local[:1] != '"' and local.isascii() and domain.isascii() and domain[:1] != "[":
            return cls(original, local, domain.lower())
        return cls(original, canonical_local(local), canonical_domain(domain))

    @property
    def canonical(self) -> str:
        """``local@domain`` in canonical form (``""`` for the null sender,
        ``postmaster`` for the bare postmaster address)."""
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"

    @property
    def is_null(self) -> bool:
        """True for the null reverse-path ``<>``."""
        return not self.original

    def __str__(self) -> str:
        return self.canonical


#: The null reverse-path, ``MAIL FROM:<>``.
NULL_SENDER = Address("", "", "")

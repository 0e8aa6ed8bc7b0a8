"""DMARC policy records, their discovery and the Organizational Domain by the
DNS Tree Walk of RFC 9989 (DMARCbis), on Bonzo's resolver.

RFC 7489 found the Organizational Domain with a public suffix list; RFC
9989 replaces the list with a walk up the DNS tree that reads the ``psd``
tag domain owners publish. The walk (:func:`targets`) queries
``_dmarc.<name>`` for the name itself, then — if it has eight labels or
more — for its seven rightmost labels, then one label fewer at a time, down
to the top-level domain: at most eight queries.

- **Policy discovery**: the first valid record on the walk of the author
  domain is the policy (at the domain itself, ``p``; above it, ``sp`` if
  given, else ``p``).
- **Organizational Domain** of a name: walking from it, a record with
  ``psd=n`` makes its domain the Organizational Domain; a record with
  ``psd=y`` makes the name one label below that domain the Organizational
  Domain (the name itself, when the record is its own); without either, the
  domain of the last (shortest) record found; with no record at all, the
  name itself.

One :class:`Discovery` caches the records it reads, so that the author
domain and every identifier aligned with it share their lookups.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from bonzo.dns import DNSError

__all__ = ["Record", "parse_record", "targets", "Discovery", "MAX_LABELS"]

#: Names longer than this many labels are cut to it by the walk (RFC 9989).
MAX_LABELS = 7
_VERSION = re.compile(r"v\s*=\s*DMARC1\s*(?:;|$)")
POLICIES = ("none", "quarantine", "reject")


@dataclass(frozen=True)
class Record:
    """The tags of one DMARC record that this plugin uses."""

    domain: str
    p: str = "none"
    sp: str | None = None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    testing: bool = False
    psd: str = "u"


def parse_record(domain: str, text: str) -> Record | None:
    """The record of ``text`` (a TXT record at ``_dmarc.domain``), or
    ``None`` if it is not a DMARC record.

    Tags are ``name=value`` separated by ``;``, ``v=DMARC1`` first. Unknown
    tags, and tags with a value out of their range, are ignored (RFC 9989);
    a missing or unusable ``p`` counts as ``none``."""
    if not _VERSION.match(text):
        return None
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    values: dict[str, Any] = {}
    p = tags.get("p", "").lower()
    values["p"] = p if p in POLICIES else "none"
    sp = tags.get("sp", "").lower()
    if sp in POLICIES:
        values["sp"] = sp
    for key in ("adkim", "aspf"):
        mode = tags.get(key, "r").lower()
        values[key] = mode if mode in ("r", "s") else "r"
    pct = tags.get("pct", "100")
    if pct.isdigit() and 0 <= int(pct) <= 100:
        values["pct"] = int(pct)
    values["testing"] = tags.get("t", "n").lower() == "y"
    psd = tags.get("psd", "u").lower()
    values["psd"] = psd if psd in ("y", "n", "u") else "u"
    return Record(domain, **values)


def targets(domain: str) -> list[str]:
    """The names the RFC 9989 tree walk asks about, in order."""
    labels = [label for label in domain.lower().rstrip(".").split(".") if label]
    names = [".".join(labels)] if labels else []
    while len(labels) > 1:
        labels = labels[-MAX_LABELS:] if len(labels) > MAX_LABELS else labels[1:]
        names.append(".".join(labels))
    return names


class Discovery:
    """Records read through ``resolver`` (a :class:`bonzo.dns.Resolver`),
    cached for one message: each name is asked once, even by evaluations
    running at once. Lookups raise :class:`bonzo.dns.DNSError` when
    temporary (a DMARC ``temperror``), for every caller of that name."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        # The lookup of each name, in flight or done: evaluations run at
        # once (one per author domain) share it instead of each asking.
        self._cache: dict[str, asyncio.Future[Record | None]] = {}
        #: Names asked about, in order (for logs and tests).
        self.asked: list[str] = []

    async def record(self, domain: str) -> Record | None:
        """The one valid DMARC record of ``domain``, or ``None`` (none, or
        several: RFC 7489 6.6.3 discards them all)."""
        lookup = self._cache.get(domain)
        if lookup is None:
            self.asked.append(domain)
            lookup = asyncio.ensure_future(self._read(domain))
            # Retrieved here so that a failure no caller waits for any more
            # is not logged as "never retrieved".
            lookup.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._cache[domain] = lookup
        # Shielded: one caller cancelled must not cancel the others' lookup.
        return await asyncio.shield(lookup)

    async def _read(self, domain: str) -> Record | None:
        try:
            texts = await self.resolver.txt(f"_dmarc.{domain}")
        except DNSError as exc:
            if exc.temporary:
                raise
            texts = []
        found = [parse_record(domain, t.decode("utf-8", "replace")) for t in texts]
        records = [r for r in found if r is not None]
        return records[0] if len(records) == 1 else None

    async def policy(self, domain: str) -> Record | None:
        """The policy record for the author domain ``domain``."""
        for name in targets(domain):
            record = await self.record(name)
            if record is not None:
                return record
        return None

    async def organizational_domain(self, domain: str) -> str:
        """The Organizational Domain of ``domain`` (see the module docs)."""
        domain = domain.lower().rstrip(".")
        last = None
        for name in targets(domain):
            record = await self.record(name)
            if record is None:
                continue
            if record.psd == "n":
                return name
            if record.psd == "y":
                if name == domain:
                    return domain
                keep = name.count(".") + 2
                return ".".join(domain.split(".")[-keep:])
            last = name
        return last or domain

    async def aligned(self, identifier: str, author: str, mode: str) -> bool:
        """Whether ``identifier`` (an SPF or DKIM domain) is aligned with
        the ``author`` domain: the same name (``mode`` ``"s"``), or the same
        Organizational Domain (``"r"``)."""
        identifier = identifier.lower().rstrip(".")
        if identifier == author:
            return True
        if mode == "s":
            return False
        return await self.organizational_domain(identifier) == (
            await self.organizational_domain(author)
        )

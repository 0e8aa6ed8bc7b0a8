"""DNS block and allow lists (RFC 5782) for the client's address, at connect.

Each configured zone is asked about the client's address (IPv4 octets or
IPv6 nibbles, reversed, in front of the zone) through Bonzo's resolver, all
at once; a zone that answers with an address counted by its ``answers``
adds its ``weight`` to the client's score (allow lists have negative
weights). The outcome goes on ``session.results`` as ``dnsbl`` — with the
score and each listing — for later plugins; a score at or above
``threshold`` refuses the client (at connect, or at ``MAIL``/``RCPT``),
with the list's TXT text, sanitized, in the reply; or only tags it.

See ``README.rst`` in this directory for the configuration.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bonzo.dns import DNSError
from bonzo.errors import PermanentError
from bonzo.hookspecs import hookimpl
from bonzo.session import Session

from .._auth import dns_enabled, get_choice, get_seconds, resolver_of, sanitize
from .._config import (
    IPNetwork,
    as_table,
    check_keys,
    client_address,
    describe,
    get_bool,
    get_str,
    in_networks,
    parse_network,
)

__all__ = ["DnsblPlugin", "KEYS", "ZONE_KEYS", "Zone", "query_name"]

log = logging.getLogger("bonzo.plugins.dnsbl")

KEYS = ("zones", "threshold", "action", "stage", "timeout", "skip_networks", "reply_text")
ZONE_KEYS = ("zone", "weight", "answers", "ipv6", "txt")
STAGES = ("connect", "mail", "rcpt")
OFF_REASON = "DNS lookups are off ([dns] nameservers)"
#: Answers in 127.0.0.0/8 count by default (RFC 5782 2.3) — but not
#: 127.255.255.0/24, which large lists answer to say "your resolver is
#: refused", not "listed".
DEFAULT_ANSWERS = (ipaddress.ip_network("127.0.0.0/8"),)
ERROR_ANSWERS = ipaddress.ip_network("127.255.255.0/24")
_ZONE = re.compile(
    r"(?=.{1,200}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


@dataclass(frozen=True)
class Zone:
    """One list."""

    zone: str
    weight: float = 1.0
    answers: tuple[IPNetwork, ...] = DEFAULT_ANSWERS
    ipv6: bool = True
    txt: bool = True

    def counts(self, answer: str) -> bool:
        """Whether an A record ``answer`` is a listing."""
        try:
            address = ipaddress.ip_address(answer)
        except ValueError:
            return False
        if self.answers is DEFAULT_ANSWERS and address in ERROR_ANSWERS:
            return False
        return any(address in net for net in self.answers if net.version == address.version)


def query_name(address: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    """The name asked of ``zone`` about ``address`` (RFC 5782 2.1, 2.4):
    ``4.3.2.1.zone`` for 1.2.3.4, 32 reversed nibbles for IPv6."""
    pointer = address.reverse_pointer
    suffix = ".in-addr.arpa" if address.version == 4 else ".ip6.arpa"
    return pointer[: -len(suffix)] + "." + zone


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key}: expected a number, got {describe(value)}")
    return float(value)


def _zone(entry: Any, index: int) -> Zone:
    where = f"zones[{index}]"
    if isinstance(entry, str):
        entry = {"zone": entry}
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a zone name or a table, got {describe(entry)}")
    check_keys(entry, ZONE_KEYS, where)
    name = entry.get("zone")
    if not isinstance(name, str) or not _ZONE.fullmatch(name.strip().rstrip(".")):
        raise ValueError(f"{where}.zone: {describe(name)} is not a DNS zone name")
    answers: tuple[IPNetwork, ...] = DEFAULT_ANSWERS
    if "answers" in entry:
        raw = entry["answers"]
        if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
            raise ValueError(f"{where}.answers: expected a list of addresses or networks")
        answers = tuple(parse_network(a, f"{where}.answers") for a in raw)
    ipv6 = get_bool(entry, "ipv6", True)
    txt = get_bool(entry, "txt", True)
    weight = _number(entry.get("weight", 1.0), f"{where}.weight")
    return Zone(name.strip().rstrip(".").lower(), weight, answers, ipv6, txt)


class DnsblPlugin:
    """Scores the client by DNS lists at connect."""

    #: Never accepts (it refuses or has no opinion): see ``bonzo check``.
    accepts = ()

    def __init__(self) -> None:
        self.zones: list[Zone] = []
        self.threshold = 1.0
        self.reject = True
        self.stage = "connect"
        self.timeout = 5.0
        self.skip_networks: list[IPNetwork] = []
        self.reply_text = "Client {ip} refused: listed by {zone}"
        self.resolver: Any = None

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.dnsbl]``."""
        table = as_table(config)
        check_keys(table, KEYS)
        zones = table.get("zones", [])
        if not isinstance(zones, list):
            raise ValueError(f"zones: expected a list of zones, got {describe(zones)}")
        self.zones = [_zone(entry, i) for i, entry in enumerate(zones)]
        names = [z.zone for z in self.zones]
        if len(set(names)) != len(names):
            raise ValueError("zones: the same zone twice")
        self.threshold = _number(table.get("threshold", 1.0), "threshold")
        if self.threshold <= 0:
            raise ValueError("threshold: must be above 0 (allow lists have negative weights)")
        self.reject = get_choice(table, "action", "reject", ("reject", "tag")) == "reject"
        self.stage = get_choice(table, "stage", "connect", STAGES)
        self.timeout = get_seconds(table, "timeout", 5.0, 60.0)
        self.skip_networks = [
            parse_network(n, "skip_networks") for n in table.get("skip_networks", [])
        ]
        text = get_str(table, "reply_text", self.reply_text)
        try:
            text.format(ip="192.0.2.1", zone="x.example", text="t")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"reply_text: {exc!r}: only {{ip}}, {{zone}} and {{text}} may be used"
            ) from None
        self.reply_text = text
        self.resolver = resolver_of(app)

    @hookimpl
    def bonzo_startup(self) -> None:
        if not self.zones:
            log.warning("dnsbl: no zones configured: nothing is checked")
        elif not dns_enabled(self.resolver):
            log.warning("dnsbl: DNS lookups are off: no list is asked (set [dns])")

    # ------------------------------------------------------------- lookups
    async def _ask(
        self, zone: Zone, address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> dict[str, Any] | None:
        name = query_name(address, zone.zone)
        try:
            answers = await self.resolver.a(name)
        except DNSError as exc:
            if exc.temporary:
                log.info("dnsbl: %s: %s (not counted)", zone.zone, exc)
            return None
        listed = [a for a in answers if zone.counts(a)]
        if not listed:
            return None
        text = ""
        if zone.txt:
            try:
                texts = await self.resolver.txt(name)
                text = sanitize(texts[0].decode("utf-8", "replace"), 150) if texts else ""
            except DNSError:
                text = ""
        return {"zone": zone.zone, "weight": zone.weight, "answer": listed[0], "text": text}

    async def check(self, remote_ip: str) -> tuple[str, str, dict[str, Any]]:
        """The client's result, reason and details (see the module docs)."""
        address = client_address(remote_ip)
        if address is None:
            return "none", "not an IP client", {}
        if not dns_enabled(self.resolver):
            return "none", OFF_REASON, {}
        zones = [z for z in self.zones if z.ipv6 or address.version == 4]
        try:
            found = await asyncio.wait_for(
                asyncio.gather(*(self._ask(z, address) for z in zones)), self.timeout
            )
        except asyncio.TimeoutError:
            return "none", f"no answer from the lists in {self.timeout:g}s", {}
        listings = [f for f in found if f is not None]
        score = sum(f["weight"] for f in listings)
        details = {"score": score, "threshold": self.threshold, "listings": listings}
        if score >= self.threshold:
            worst = max(listings, key=lambda f: f["weight"])
            reason = f"listed by {worst['zone']}" + (f": {worst['text']}" if worst["text"] else "")
            return "listed", reason, details
        if listings:
            names = ", ".join(f"{f['zone']} ({f['weight']:g})" for f in listings)
            return "pass", f"score {score:g} below {self.threshold:g}: {names}", details
        return "pass", "not listed", details

    # --------------------------------------------------------------- hooks
    def _refusal(self, session: Session) -> PermanentError | None:
        result = session.results.get("dnsbl")
        if not self.reject or result is None or result.result != "listed":
            return None
        listings = result.details.get("listings", [])
        worst = max(listings, key=lambda f: f["weight"]) if listings else {}
        text = self.reply_text.format(
            ip=session.remote_ip, zone=worst.get("zone", "?"), text=worst.get("text", "")
        )
        if worst.get("text") and "{text}" not in self.reply_text:
            text += f" ({worst['text']})"
        return PermanentError(sanitize(text, 300), 554, "5.7.1")

    @hookimpl
    async def bonzo_connect(self, session: Session) -> None:
        """Ask the lists; refuse here with ``stage = "connect"``."""
        if not self.zones or in_networks(session.remote_ip, self.skip_networks):
            return None
        result, reason, details = await self.check(session.remote_ip)
        session.results.add("dnsbl", result, reason, **details)
        log.info("dnsbl: session %s: %s: %s (%s)", session.id, session.remote_ip, result, reason)
        if self.stage == "connect":
            error = self._refusal(session)
            if error is not None:
                raise error
        return None

    @hookimpl
    def bonzo_mail(self, session: Session) -> None:
        """Refuse here with ``stage = "mail"``."""
        if self.stage == "mail":
            error = self._refusal(session)
            if error is not None:
                raise error
        return None

    @hookimpl
    def bonzo_rcpt(self, session: Session) -> None:
        """Refuse here with ``stage = "rcpt"``."""
        if self.stage == "rcpt":
            error = self._refusal(session)
            if error is not None:
                raise error
        return None

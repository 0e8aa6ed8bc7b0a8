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
from bonzo.schema import Key, Schema
from bonzo.session import Session

from .._auth import dns_enabled, resolver_of, sanitize
from .._config import IPNetwork, client_address, describe, in_networks

__all__ = ["DnsblPlugin", "KEYS", "ZONE_KEYS", "Zone", "query_name"]

log = logging.getLogger("bonzo.plugins.dnsbl")

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


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


def _above_zero(value: float) -> float:
    # ``not value > 0`` also refuses NaN.
    if not value > 0 or not math.isfinite(value):
        raise ValueError(
            f"expected a number above 0 (allow lists have negative weights), got {value!r}"
        )
    return value


def _positive_seconds(value: float) -> float:
    if not value > 0:
        raise ValueError(f"expected more than 0 seconds, got {value!r}")
    return value


def _zone_name(value: str) -> str:
    name = value.strip().rstrip(".")
    if not _ZONE.fullmatch(name):
        raise ValueError(f"{describe(value)} is not a DNS zone name")
    return name.lower()


def _answers(value: list[IPNetwork]) -> tuple[IPNetwork, ...]:
    if not value:
        raise ValueError("expected at least one address or network")
    return tuple(value)


def _reply_text(text: str) -> str:
    try:
        text.format(ip="192.0.2.1", zone="x.example", text="t")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{exc!r}: only {{ip}}, {{zone}} and {{text}} may be used") from None
    return text


def _distinct_zones(values: dict[str, Any]) -> None:
    seen: set[str] = set()
    for i, entry in enumerate(values["zones"]):
        if entry["zone"] in seen:
            raise ValueError(f"zones[{i}].zone: {entry['zone']!r} is given twice")
        seen.add(entry["zone"])


#: The keys of each table of ``zones``.
ZONE_SCHEMA = Schema(
    Key("zone", "str", required=True, convert=_zone_name,
        doc="The list's DNS zone (a trailing dot is ignored)."),
    Key("weight", "float", default=1.0, convert=_finite,
        doc="Added to the score when the list has the client; negative for an "
        "allow list."),
    Key("answers", "networks", convert=_answers,
        doc="The A records (addresses or networks) that count as a listing, for "
        "lists whose answers mean different things; not empty. Without it, any "
        "address in ``127.0.0.0/8`` except those in ``127.255.255.0/24`` (the "
        "answers large lists give to say that the resolver is refused, RFC 5782 2.3)."),
    Key("ipv6", "bool", default=True, doc="Ask this list about IPv6 clients too."),
    Key("txt", "bool", default=True, doc="Read the list's TXT record for the reply."),
)  # fmt: skip
#: The ``[plugins.dnsbl]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("zones", "tables", default=[], schema=ZONE_SCHEMA,
        doc="The lists. An entry may also be a zone name alone: "
        "``\"bl.example.net\"`` is short for ``{ zone = \"bl.example.net\" }`` "
        "(weight 1). A zone may be given once."),
    Key("threshold", "float", default=1.0, convert=_above_zero,
        doc="The score at which a client is ``listed``; above 0."),
    Key("action", "choice", default="reject", choices=("reject", "tag"),
        doc="Refuse a listed client, or only record the result."),
    Key("stage", "choice", default="connect", choices=STAGES,
        doc="When a listed client is refused."),
    Key("timeout", "duration", default=5.0, maximum=60, convert=_positive_seconds,
        doc="How long all the lookups of one client may take; more than 0, at "
        "most 60 seconds. Then the zones that have not answered count as not "
        "listing the client; the others' answers stand."),
    Key("skip_networks", "networks", default=[],
        doc="Client networks never checked (your own hosts)."),
    Key("reply_text", "str", default="Client {ip} refused: listed by {zone}",
        convert=_reply_text,
        doc="The refusal's text; ``{ip}``, ``{zone}`` and ``{text}`` (the list's "
        "TXT) are replaced. Without ``{text}``, the list's text follows in "
        "parentheses."),
    check=_distinct_zones,
)  # fmt: skip
KEYS = tuple(SCHEMA.names)
ZONE_KEYS = tuple(ZONE_SCHEMA.names)


def _zone_tables(config: Any) -> Any:
    """``config`` with each bare zone name in ``zones`` as a table."""
    if isinstance(config, Mapping) and isinstance(config.get("zones"), list):
        zones = [{"zone": z} if isinstance(z, str) else z for z in config["zones"]]
        config = {**config, "zones": zones}
    return config


class DnsblPlugin:
    """Scores the client by DNS lists at connect."""

    #: Never accepts (it refuses or has no opinion): see ``bonzo check``.
    accepts = ()

    @property
    def idle_hooks(self) -> tuple[str, ...]:
        """The refusal hooks of the stages other than ``stage``: they do
        nothing (``bonzo check`` does not warn that they never run)."""
        return {
            "connect": ("bonzo_mail", "bonzo_rcpt"),
            "mail": ("bonzo_rcpt",),
        }.get(self.stage, ())

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
        values = SCHEMA.parse(_zone_tables(config), app)
        self.zones = [
            Zone(
                z["zone"],
                z["weight"],
                DEFAULT_ANSWERS if z["answers"] is None else z["answers"],
                z["ipv6"],
                z["txt"],
            )
            for z in values["zones"]
        ]
        self.threshold = values["threshold"]
        self.reject = values["action"] == "reject"
        self.stage = values["stage"]
        self.timeout = values["timeout"]
        self.skip_networks = values["skip_networks"]
        self.reply_text = values["reply_text"]
        self.resolver = resolver_of(app)

    @hookimpl
    def bonzo_startup(self) -> None:
        if not self.zones:
            log.warning("dnsbl: no zones configured: nothing is checked")
        elif not dns_enabled(self.resolver):
            log.warning("dnsbl: DNS lookups are off: no list is asked (set [dns])")

    # ------------------------------------------------------------- lookups
    async def _ask(
        self,
        zone: Zone,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address,
        found: dict[str, dict[str, Any]],
        answered: set[str],
        failed: dict[str, str],
    ) -> None:
        """Ask ``zone``; mark it ``answered`` once its A lookup is over (and
        ``failed``, with the error, when that lookup failed temporarily), and
        put its listing in ``found`` before the TXT lookup: the reason text
        is optional, and a TXT lookup cut short by the deadline must not take
        the listing with it."""
        name = query_name(address, zone.zone)
        try:
            answers = await self.resolver.a(name)
        except DNSError as exc:
            answered.add(zone.zone)
            if exc.temporary:
                failed[zone.zone] = sanitize(str(exc), 150)
                log.info("dnsbl: %s: %s (not counted)", zone.zone, exc)
            return
        answered.add(zone.zone)
        listed = [a for a in answers if zone.counts(a)]
        if not listed:
            return
        listing = {"zone": zone.zone, "weight": zone.weight, "answer": listed[0], "text": ""}
        found[zone.zone] = listing
        if zone.txt:
            try:
                texts = await self.resolver.txt(name)
            except DNSError:
                return
            listing["text"] = sanitize(texts[0].decode("utf-8", "replace"), 150) if texts else ""

    async def _ask_all(
        self, zones: list[Zone], address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> tuple[list[dict[str, Any]], list[str], dict[str, str]]:
        """Ask every zone at once for at most ``timeout``: the listings found
        (in zone order), the zones whose lookup had not ended by then, and
        the zones whose lookup failed (SERVFAIL, REFUSED, resolver down),
        with the error. Each zone stands alone: one that is slow or fails is
        "not listed", the others' answers count."""
        if not zones:  # asyncio.wait refuses an empty set
            return [], [], {}
        found: dict[str, dict[str, Any]] = {}
        answered: set[str] = set()
        failed: dict[str, str] = {}
        tasks = [
            asyncio.ensure_future(self._ask(z, address, found, answered, failed)) for z in zones
        ]
        try:
            done, pending = await asyncio.wait(tasks, timeout=self.timeout)
        finally:
            # At the deadline, or if the session ends meanwhile: stop what is
            # left, and wait for it to be stopped (no task outlives the check).
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # an unexpected fault is the hook's, as before
        unanswered = [z.zone for z in zones if z.zone not in answered]
        failures = {z.zone: failed[z.zone] for z in zones if z.zone in failed}
        return [found[z.zone] for z in zones if z.zone in found], unanswered, failures

    async def check(self, remote_ip: str) -> tuple[str, str, dict[str, Any]]:
        """The client's result, reason and details (see the module docs)."""
        address = client_address(remote_ip)
        if address is None:
            return "none", "not an IP client", {}
        if not dns_enabled(self.resolver):
            return "none", OFF_REASON, {}
        zones = [z for z in self.zones if z.ipv6 or address.version == 4]
        listings, unanswered, failed = await self._ask_all(zones, address)
        late = ""
        if unanswered:
            late = f"no answer in {self.timeout:g}s from {', '.join(unanswered)}"
            log.info("dnsbl: %s: %s (not counted)", remote_ip, late)
        if zones and len(unanswered) + len(failed) == len(zones):
            # No list could be asked: nothing is known, which is not "not
            # listed" (a later plugin must not read a clean pass).
            if not failed:
                return "none", f"no answer from the lists in {self.timeout:g}s", {}
            said = [f"{zone}: {error}" for zone, error in failed.items()]
            reason = "no list could be asked: " + "; ".join(said + ([late] if late else []))
            return "none", sanitize(reason, 300), {"unanswered": unanswered, "failed": failed}
        problems = [late] if late else []
        if failed:
            problems.append("lookup failed for " + ", ".join(failed))
        score = sum(f["weight"] for f in listings)
        details: dict[str, Any] = {
            "score": score,
            "threshold": self.threshold,
            "listings": listings,
            "unanswered": unanswered,
            "failed": failed,
        }
        late = f"; {'; '.join(problems)}" if problems else ""
        if score >= self.threshold:
            worst = max(listings, key=lambda f: f["weight"])
            reason = f"listed by {worst['zone']}" + (f": {worst['text']}" if worst["text"] else "")
            return "listed", reason + late, details
        if listings:
            names = ", ".join(f"{f['zone']} ({f['weight']:g})" for f in listings)
            return "pass", f"score {score:g} below {self.threshold:g}: {names}{late}", details
        return "pass", "not listed" + late, details

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

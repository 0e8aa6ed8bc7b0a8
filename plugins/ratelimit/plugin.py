"""Rate limits per client network, sender, recipient domain and user."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bonzo.address import Address
from bonzo.hookspecs import hookimpl
from bonzo.session import Envelope, Session
from bonzo.store import MemoryStore, Store, StoreError

from .._config import (
    StoreFailures,
    as_table,
    check_keys,
    client_network,
    describe,
    get_prefix,
    get_str,
    in_networks,
    parse_duration,
    parse_network,
)
from ..access.plugin import Reply, parse_reply

__all__ = ["RateLimitPlugin", "Rule", "KEYS", "RULE_KEYS"]

log = logging.getLogger("bonzo.plugins.ratelimit")

KEYS = ("rules", "reply", "ipv4_prefix", "ipv6_prefix", "on_store_error", "exempt_networks")
RULE_KEYS = ("key", "stage", "limit", "window", "reply", "name")
#: What each key is counted on, and the stages where it is known.
STAGES_OF = {
    "client": ("connect", "mail", "rcpt"),
    "sender": ("mail", "rcpt"),
    "user": ("mail", "rcpt"),
    "rcpt_domain": ("rcpt",),
}
STAGES = ("connect", "mail", "rcpt")
ON_STORE_ERROR = ("accept", "tempfail")
DEFAULT_REPLY = "451 4.7.1 Rate limit exceeded, try again later"
#: The reply when the store fails and on_store_error is "tempfail".
STORE_ERROR_REPLY = Reply(451, "4.3.0", "Temporary local problem, try again later")
MAX_LIMIT = 10_000_000


@dataclass(frozen=True)
class Rule:
    """One ``[[plugins.ratelimit.rules]]`` entry."""

    index: int
    name: str
    key: str
    stage: str
    limit: int
    window: float
    reply: Reply


def _rule(index: int, entry: Any, default: Reply) -> Rule:
    where = f"rules[{index}]"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a table, got {describe(entry)}")
    check_keys(entry, RULE_KEYS, where)
    for required in ("key", "stage", "limit", "window"):
        if required not in entry:
            raise ValueError(f"{where}.{required}: missing (required)")
    key = entry["key"]
    if key not in STAGES_OF:
        raise ValueError(
            f"{where}.key: expected one of {', '.join(STAGES_OF)}, got {describe(key)}"
        )
    stage = entry["stage"]
    if stage not in STAGES_OF[key]:
        raise ValueError(
            f"{where}.stage: a {key} limit applies at {', '.join(STAGES_OF[key])}, "
            f"not {describe(stage)}"
        )
    limit = entry["limit"]
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ValueError(
            f"{where}.limit: expected an integer 1..{MAX_LIMIT}, got {describe(limit)}"
        )
    window = parse_duration(entry["window"], f"{where}.window")
    reply = parse_reply(entry["reply"], f"{where}.reply") if "reply" in entry else default
    name = entry.get("name", f"{key}-{stage}-{limit}-{window:g}")
    if not isinstance(name, str) or not name or not name.isprintable() or len(name) > 100:
        raise ValueError(f"{where}.name: expected a short printable string, got {describe(name)}")
    return Rule(index, name, key, stage, limit, window, reply)


class RateLimitPlugin:
    """Counts connections, transactions and recipients per client network,
    sender, recipient domain and authenticated user in sliding windows
    (``app.store``), and refuses what goes over a rule's limit.

    List it before the plugins that accept recipients (``recipients``).
    """

    #: Never accepts (it refuses or has no opinion): see ``bonzo check``.
    accepts = ()

    #: Its state is in ``app.store``: per worker without ``[redis] url``
    #: (``bonzo check`` warns when there are several workers).
    shared_state = True

    def __init__(self) -> None:
        self.rules: dict[str, list[Rule]] = {stage: [] for stage in STAGES}
        self.ipv4_prefix = 32
        self.ipv6_prefix = 64
        self.on_store_error = "accept"
        self.exempt: tuple[Any, ...] = ()
        self.store: Store = MemoryStore()
        self.failures = StoreFailures(log, "ratelimit")

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate the ``[plugins.ratelimit]`` table; use ``app.store``."""
        table = as_table(config)
        check_keys(table, KEYS)
        default = parse_reply(get_str(table, "reply", DEFAULT_REPLY), "reply")
        entries = table.get("rules", [])
        if not isinstance(entries, list):
            raise ValueError(f"rules: expected an array of tables, got {describe(entries)}")
        rules: dict[str, list[Rule]] = {stage: [] for stage in STAGES}
        names: set[str] = set()
        for index, entry in enumerate(entries):
            rule = _rule(index, entry, default)
            if rule.name in names:
                raise ValueError(f"rules[{index}].name: {rule.name!r} is used by an earlier rule")
            names.add(rule.name)
            rules[rule.stage].append(rule)
        on_error = table.get("on_store_error", "accept")
        if on_error not in ON_STORE_ERROR:
            raise ValueError(
                f"on_store_error: expected one of {', '.join(ON_STORE_ERROR)}, "
                f"got {describe(on_error)}"
            )
        exempt = table.get("exempt_networks", [])
        if not isinstance(exempt, list) or not all(isinstance(n, str) for n in exempt):
            raise ValueError(
                f"exempt_networks: expected a list of networks, got {describe(exempt)}"
            )
        self.exempt = tuple(parse_network(n, "exempt_networks") for n in exempt)
        self.ipv4_prefix = get_prefix(table, "ipv4_prefix", 32, 32)
        self.ipv6_prefix = get_prefix(table, "ipv6_prefix", 64, 128)
        self.on_store_error = on_error
        self.rules = rules
        store = getattr(app, "store", None)
        self.store = store if isinstance(store, Store) else MemoryStore()

    def value(
        self, rule: Rule, session: Session, sender: Address | None, rcpt: Address | None
    ) -> str | None:
        """What ``rule`` counts on in this command, or ``None`` when it does
        not apply (no authenticated user)."""
        if rule.key == "client":
            return client_network(session.remote_ip, self.ipv4_prefix, self.ipv6_prefix)
        if rule.key == "user":
            return session.auth
        if rule.key == "sender":
            if sender is None:
                return None
            return sender.canonical.lower() or "<>"
        assert rcpt is not None
        return rcpt.domain.lower() if rcpt.domain else None

    async def check(
        self,
        stage: str,
        session: Session,
        sender: Address | None = None,
        rcpt: Address | None = None,
    ) -> None:
        """Count this command against the rules of ``stage``; raise the
        rule's reply for the first one over its limit."""
        rules = self.rules[stage]
        if not rules:
            return
        if self.exempt and in_networks(session.remote_ip, self.exempt):
            return
        for rule in rules:
            value = self.value(rule, session, sender, rcpt)
            if value is None:
                continue
            try:
                hit = await self.store.hit(
                    f"ratelimit:{rule.name}:{value}", rule.limit, rule.window
                )
            except StoreError as exc:
                if self.on_store_error == "tempfail":
                    self.failures.report(exc, f"{stage} refused with 451 (on_store_error)")
                    raise STORE_ERROR_REPLY.error() from None
                self.failures.report(exc, f"{stage} allowed without limits (on_store_error)")
                return
            if not hit.allowed:
                log.info(
                    "[%s %s] ratelimit: %s %s over %s: more than %d per %gs",
                    session.id,
                    session.remote_ip,
                    rule.key,
                    ascii(value),
                    rule.name,
                    rule.limit,
                    rule.window,
                )
                raise rule.reply.error()

    @hookimpl
    async def bonzo_connect(self, session: Session) -> None:
        """Rules of stage ``connect``."""
        await self.check("connect", session)

    @hookimpl
    async def bonzo_mail(self, session: Session, envelope: Envelope, mailbox: Address) -> None:
        """Rules of stage ``mail``."""
        await self.check("mail", session, sender=mailbox)

    @hookimpl
    async def bonzo_rcpt(self, session: Session, envelope: Envelope, mailbox: Address) -> None:
        """Rules of stage ``rcpt``, once per recipient."""
        await self.check("rcpt", session, sender=envelope.sender, rcpt=mailbox)

"""Rate limits per client network, sender, recipient domain and user."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bonzo.address import Address
from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session
from bonzo.store import MemoryStore, Store, StoreError

from .._config import StoreFailures, client_network, describe, in_networks, store_group
from ..access.plugin import Reply, parse_reply

__all__ = ["RateLimitPlugin", "Rule", "KEYS", "RULE_KEYS"]

log = logging.getLogger("bonzo.plugins.ratelimit")

#: What each key is counted on, and the stages where it is known.
STAGES_OF = {
    "client": ("connect", "auth", "mail", "rcpt"),
    "sender": ("mail", "rcpt"),
    "user": ("mail", "rcpt"),
    "rcpt_domain": ("rcpt",),
}
STAGES = ("connect", "auth", "mail", "rcpt")
ON_STORE_ERROR = ("accept", "tempfail")
DEFAULT_REPLY = "451 4.7.1 Rate limit exceeded, try again later"
#: The reply of an ``auth`` rule without its own: Postfix's for
#: smtpd_client_auth_rate_limit is ``450 4.7.1`` too. Temporary, and the
#: same whatever the password: it is sent before any plugin checks one.
AUTH_REPLY = "450 4.7.1 Too many AUTH commands, try again later"
#: The reply when the store fails and on_store_error is "tempfail".
STORE_ERROR_REPLY = Reply(451, "4.3.0", "Temporary local problem, try again later")
MAX_LIMIT = 10_000_000
#: The shortest ``window``, in seconds.
MIN_WINDOW = 0.001


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


def _reply(value: str) -> str:
    """``value`` if it is a reply (checked by the ``access`` plugin's parser)."""
    try:
        parse_reply(value, "")
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix(": ")) from None
    return value


def _window(value: float) -> float:
    # ``not value > 0`` also refuses NaN.
    if not value > 0:
        raise ValueError(f"expected a positive duration, got {value!r}")
    return value


def _name(value: str) -> str:
    if not value.isprintable() or len(value) > 100:
        raise ValueError(f"expected a short printable string, got {describe(value)}")
    return value


def _stage_fits_key(rule: dict[str, Any]) -> None:
    stages = STAGES_OF[rule["key"]]
    if rule["stage"] not in stages:
        raise ValueError(
            f"stage: a {rule['key']} limit applies at {', '.join(stages)}, "
            f"not {describe(rule['stage'])}"
        )
    if rule["stage"] == "auth" and rule["reply"] is not None:
        if parse_reply(rule["reply"], "reply").code >= 500:
            # A 5xx would count as a failed password (max_auth_failures) and
            # tell a client with the right password to give up for good.
            raise ValueError(f"reply: an auth limit's reply must be 4xx, not {rule['reply']!r}")


#: The keys of each ``[[plugins.ratelimit.rules]]`` table.
RULE_SCHEMA = Schema(
    Key("key", "choice", required=True, choices=tuple(STAGES_OF),
        doc="What is counted: the client's network, the sender, the "
        "authenticated user or the recipient's domain."),
    Key("stage", "choice", required=True, choices=STAGES,
        doc="Where it is counted (see the table above for which fit each key)."),
    Key("limit", "int", required=True, minimum=1, maximum=MAX_LIMIT,
        doc=f"The events allowed in a window, 1 to {MAX_LIMIT}."),
    # At least 1 ms: Redis expires keys to the millisecond, and a far smaller
    # window overflows the slot number (now / window) to infinity.
    Key("window", "duration", required=True, minimum=MIN_WINDOW, maximum=10 * 365 * 86400,
        convert=_window,
        doc="The sliding window, at least one millisecond (0.001) and at most ten years."),
    Key("reply", "str", convert=_reply,
        doc="The reply of this rule, as ``reply`` below; without it, that one "
        f"(at ``auth``: ``\"{AUTH_REPLY}\"``; an ``auth`` rule's reply must be "
        "``4xx``)."),
    Key("name", "str", convert=_name,
        doc="Names the rule in log lines and in the store's keys (printable, at "
        "most 100 characters); default ``\"<key>-<stage>-<limit>-<window>\"``. "
        "Two rules may not share a name; rules that keep their name keep their "
        "counts across a restart (with Redis)."),
    check=_stage_fits_key,
)  # fmt: skip
#: The ``[plugins.ratelimit]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("rules", "tables", default=[], schema=RULE_SCHEMA,
        doc="The limits, written as ``[[plugins.ratelimit.rules]]`` tables. With "
        "none, nothing is limited, and ``bonzo check`` says so."),
    Key("reply", "str", default=DEFAULT_REPLY, convert=_reply,
        doc="The reply to an excess, written ``\"<code> [<enhanced code>] "
        "[<text>]\"`` (``4xx`` or ``5xx``; a temporary ``4xx`` is what rate "
        "limits should give)."),
    Key("ipv4_prefix", "int", default=32, minimum=1, maximum=32,
        doc="The IPv4 clients that count as one ``client``, 1 to 32 (``24``: a "
        "whole /24)."),
    Key("ipv6_prefix", "int", default=64, minimum=1, maximum=128,
        doc="The IPv6 clients that count as one ``client``, 1 to 128. A single host "
        "usually has a whole /64, so counting per address would let it dodge "
        "any limit."),
    Key("on_store_error", "choice", default="accept", choices=ON_STORE_ERROR,
        doc="What to do when the store fails (see above)."),
    Key("exempt_networks", "networks", default=[],
        doc="Client networks no rule counts (your own relays, monitoring)."),
)  # fmt: skip
KEYS = tuple(SCHEMA.names)
RULE_KEYS = tuple(RULE_SCHEMA.names)


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
        values = SCHEMA.parse(config, app)
        default = parse_reply(values["reply"], "reply")
        auth_default = parse_reply(AUTH_REPLY, "reply")
        rules: dict[str, list[Rule]] = {stage: [] for stage in STAGES}
        names: set[str] = set()
        for index, entry in enumerate(values["rules"]):
            key, stage, limit, window = (entry[k] for k in ("key", "stage", "limit", "window"))
            if entry["reply"] is not None:
                reply = parse_reply(entry["reply"], "reply")
            else:
                reply = auth_default if stage == "auth" else default
            name = entry["name"] or f"{key}-{stage}-{limit}-{window:g}"
            if name in names:
                raise ValueError(f"rules[{index}].name: {name!r} is used by an earlier rule")
            names.add(name)
            rules[stage].append(Rule(index, name, key, stage, limit, window, reply))
        self.exempt = tuple(values["exempt_networks"])
        self.ipv4_prefix = values["ipv4_prefix"]
        self.ipv6_prefix = values["ipv6_prefix"]
        self.on_store_error = values["on_store_error"]
        self.rules = rules
        #: What ``bonzo check`` should warn about.
        self.config_warnings = (
            [] if values["rules"] else ["no rules configured: nothing is limited"]
        )
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
        group = store_group(session.remote_ip)  # a flood's counters go first
        for rule in rules:
            value = self.value(rule, session, sender, rcpt)
            if value is None:
                continue
            try:
                hit = await self.store.hit(
                    f"ratelimit:{rule.name}:{value}", rule.limit, rule.window, group=group
                )
            except StoreError as exc:
                if self.on_store_error == "tempfail":
                    self.failures.report(
                        exc, f"{stage} refused with 451 (on_store_error)", "tempfail"
                    )
                    raise STORE_ERROR_REPLY.error() from None
                self.failures.report(
                    exc, f"{stage} allowed without limits (on_store_error)", "accept"
                )
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

    # tryfirst: before any plugin checks the password, so that a client over
    # the limit tests none (whatever the order of ``enabled``).
    @hookimpl(tryfirst=True)
    async def bonzo_auth(self, session: Session) -> None:
        """Rules of stage ``auth``: each AUTH exchange that reaches the
        credential check counts, right or wrong (as Postfix's
        smtpd_client_auth_rate_limit); one over the limit is refused with a
        ``4xx`` before any password is checked. Never accepts."""
        await self.check("auth", session)

    @hookimpl
    async def bonzo_mail(self, session: Session, envelope: Envelope, mailbox: Address) -> None:
        """Rules of stage ``mail``."""
        await self.check("mail", session, sender=mailbox)

    @hookimpl
    async def bonzo_rcpt(self, session: Session, envelope: Envelope, mailbox: Address) -> None:
        """Rules of stage ``rcpt``, once per recipient."""
        await self.check("rcpt", session, sender=envelope.sender, rcpt=mailbox)

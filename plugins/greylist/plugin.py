"""Greylisting: the first attempt of each (client network, sender,
recipient) triplet is refused for a while; a real mail server retries."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from bonzo.address import Address
from bonzo.errors import SMTPError
from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session
from bonzo.store import MemoryStore, Store, StoreError

from .._config import (
    StoreFailures,
    client_network,
    config_domain,
    describe,
    in_networks,
    store_group,
)

__all__ = ["GreylistPlugin", "KEYS", "triplet_key"]

log = logging.getLogger("bonzo.plugins.greylist")

ON_STORE_ERROR = ("accept", "tempfail")
DEFAULT_REPLY = "Greylisted: please try again in {seconds} seconds"
#: The longest duration a key takes.
TEN_YEARS = 10 * 365 * 86400


def _positive(value: float) -> float:
    # ``not value > 0`` also refuses NaN.
    if not value > 0:
        raise ValueError(f"expected a positive duration, got {value!r}")
    return value


def _domains(values: list[str]) -> frozenset[str]:
    domains = set()
    for domain in values:
        try:
            domains.add(config_domain(domain))
        except ValueError as exc:
            raise ValueError(f"{describe(domain)}: {exc}") from None
    return frozenset(domains)


def _reply(reply: str) -> str:
    if len(reply) > 400 or not reply.isprintable():
        raise ValueError("expected printable text of at most 400 characters")
    try:
        reply.format(seconds=1)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"only {{seconds}} may be filled in: {exc!r}") from None
    return reply


def _retry_possible(values: dict[str, Any]) -> None:
    if values["pending_expiry"] <= values["delay"]:
        raise ValueError(
            f"pending_expiry: must be longer than delay ({values['delay']:g}s), or no retry "
            "could ever pass"
        )


def _duration(name: str, default: float, doc: str) -> Key:
    return Key(name, "duration", default=default, maximum=TEN_YEARS, convert=_positive,
               doc=doc + " More than 0, at most ten years.")  # fmt: skip


#: The ``[plugins.greylist]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    _duration("delay", 300.0,
              "How long a new triplet must wait before a retry passes."),
    _duration("pending_expiry", 86400.0,
              "An unconfirmed triplet is forgotten after this (one day by "
              "default; a retry later starts again); longer than ``delay``."),
    _duration("confirmed_expiry", 35 * 86400.0,
              "A confirmed triplet is forgotten after this long unused (35 days "
              "by default)."),
    Key("ipv4_prefix", "int", default=24, minimum=1, maximum=32,
        doc="The IPv4 addresses that count as one client, 1 to 32."),
    Key("ipv6_prefix", "int", default=64, minimum=1, maximum=128,
        doc="The IPv6 addresses that count as one client, 1 to 128."),
    Key("allow_networks", "networks", default=[],
        doc="Client networks never greylisted."),
    Key("allow_domains", "strings", default=[], convert=_domains,
        doc="Recipient domains never greylisted."),
    Key("skip_authenticated", "bool", default=True,
        doc="Authenticated sessions are never greylisted."),
    Key("reply", "str", default=DEFAULT_REPLY, convert=_reply,
        doc="The text of the ``451 4.7.1`` reply (printable, at most 400 "
        "characters); ``{seconds}`` is the time left."),
    Key("on_store_error", "choice", default="accept", choices=ON_STORE_ERROR,
        doc="What to do when the store fails (see above)."),
    check=_retry_possible,
)  # fmt: skip
KEYS = tuple(SCHEMA.names)


def triplet_key(network: str, sender: str, recipient: str) -> str:
    """The store key of a triplet: a digest, so that keys have one short
    length whatever the addresses, and the store holds no address."""
    digest = hashlib.blake2b(
        "\0".join((network, sender, recipient)).encode("utf-8", "surrogatepass"), digest_size=16
    )
    return "greylist:" + digest.hexdigest()


class GreylistPlugin:
    """Refuses the first ``RCPT`` of each new triplet with ``451 4.7.1`` and
    the time to wait; accepts a retry after ``delay`` (gives no verdict: the
    next plugin decides), and remembers the confirmed triplet.

    List it before the plugins that accept recipients (``recipients``).
    """

    #: Never accepts (it refuses or has no opinion): see ``bonzo check``.
    accepts = ()

    #: Its state is in ``app.store``: per worker without ``[redis] url``
    #: (``bonzo check`` warns when there are several workers).
    shared_state = True

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.delay = 300.0
        self.pending_expiry = 86400.0
        self.confirmed_expiry = 35 * 86400.0
        self.ipv4_prefix = 24
        self.ipv6_prefix = 64
        self.allow_networks: tuple[Any, ...] = ()
        self.allow_domains: frozenset[str] = frozenset()
        self.skip_authenticated = True
        self.reply = DEFAULT_REPLY
        self.on_store_error = "accept"
        self.store: Store = MemoryStore()
        self.failures = StoreFailures(log, "greylist")

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate the ``[plugins.greylist]`` table; use ``app.store``."""
        values = SCHEMA.parse(config, app)
        self.delay = values["delay"]
        self.pending_expiry = values["pending_expiry"]
        self.confirmed_expiry = values["confirmed_expiry"]
        self.ipv4_prefix = values["ipv4_prefix"]
        self.ipv6_prefix = values["ipv6_prefix"]
        self.allow_networks = tuple(values["allow_networks"])
        # The default (an empty list) is not converted.
        self.allow_domains = frozenset(values["allow_domains"])
        self.skip_authenticated = values["skip_authenticated"]
        self.reply = values["reply"]
        self.on_store_error = values["on_store_error"]
        store = getattr(app, "store", None)
        self.store = store if isinstance(store, Store) else MemoryStore()

    def exempt(self, session: Session, rcpt: Address) -> bool:
        """True if this recipient is never greylisted (allow lists, AUTH)."""
        if self.skip_authenticated and session.auth is not None:
            return True
        if rcpt.domain and rcpt.domain.lower() in self.allow_domains:
            return True
        return bool(self.allow_networks) and in_networks(session.remote_ip, self.allow_networks)

    async def wait(self, session: Session, sender: Address, rcpt: Address) -> float:
        """Seconds the client must still wait for this triplet (``0``: it may
        pass); records the first attempt and confirms a retry."""
        network = client_network(session.remote_ip, self.ipv4_prefix, self.ipv6_prefix)
        key = triplet_key(network, sender.canonical.lower(), rcpt.canonical.lower())
        now = self.clock()
        # For an in-memory store that is full: a flood of made-up triplets
        # from one network pushes out that network's own entries, and the
        # triplets that passed (keep) outlast pending ones.
        group = store_group(session.remote_ip)
        # Bounded: a first write that another node won is read back once.
        for _ in range(2):
            value = await self.store.get(key)
            if value is None:
                if await self.store.set(
                    # Whole seconds, rounded down: rounded to the nearest,
                    # a retry just past the delay could be told to wait more.
                    key,
                    f"p:{math.floor(now)}",
                    self.pending_expiry,
                    only_new=True,
                    group=group,
                ):
                    return self.delay
                continue
            state, _, first = value.partition(":")
            try:
                first_seen = float(first)
            except ValueError:
                first_seen = now  # a damaged entry counts as a first attempt
                state = "p"
            if state == "c":
                # Refresh: a triplet in use stays confirmed.
                await self.store.set(key, value, self.confirmed_expiry, group=group, keep=True)
                return 0.0
            left = first_seen + self.delay - now
            if left > 0:
                return left
            await self.store.set(
                key, f"c:{first_seen:.0f}", self.confirmed_expiry, group=group, keep=True
            )
            log.info(
                "[%s %s] greylist: passed after %.0fs: %s -> %s",
                session.id,
                session.remote_ip,
                now - first_seen,
                ascii(sender.canonical),
                ascii(rcpt.canonical),
            )
            return 0.0
        return self.delay

    @hookimpl
    async def bonzo_rcpt(self, session: Session, envelope: Envelope, mailbox: Address) -> None:
        """Greylist each recipient (no verdict when it may pass)."""
        if self.exempt(session, mailbox):
            return
        try:
            left = await self.wait(session, envelope.sender, mailbox)
        except StoreError as exc:
            if self.on_store_error == "tempfail":
                self.failures.report(exc, "recipient refused with 451 (on_store_error)", "tempfail")
                raise SMTPError(
                    451, "Temporary local problem, try again later", enhanced_code="4.3.0"
                ) from None
            self.failures.report(exc, "recipient not greylisted (on_store_error)", "accept")
            return
        if left > 0:
            seconds = max(1, math.ceil(left))
            log.info(
                "[%s %s] greylist: %s -> %s: retry in %ds",
                session.id,
                session.remote_ip,
                ascii(envelope.sender.canonical),
                ascii(mailbox.canonical),
                seconds,
            )
            raise SMTPError(451, self.reply.format(seconds=seconds), enhanced_code="4.7.1")

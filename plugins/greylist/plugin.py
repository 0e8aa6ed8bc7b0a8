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
from bonzo.session import Envelope, Session
from bonzo.store import MemoryStore, Store, StoreError

from .._config import (
    StoreFailures,
    as_table,
    check_keys,
    client_network,
    config_domain,
    describe,
    get_bool,
    get_prefix,
    get_str,
    get_str_list,
    in_networks,
    parse_duration,
    parse_network,
)

__all__ = ["GreylistPlugin", "KEYS", "triplet_key"]

log = logging.getLogger("bonzo.plugins.greylist")

KEYS = (
    "delay",
    "pending_expiry",
    "confirmed_expiry",
    "ipv4_prefix",
    "ipv6_prefix",
    "allow_networks",
    "allow_domains",
    "skip_authenticated",
    "reply",
    "on_store_error",
)
ON_STORE_ERROR = ("accept", "tempfail")
DEFAULT_REPLY = "Greylisted: please try again in {seconds} seconds"


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
        table = as_table(config)
        check_keys(table, KEYS)
        delay = parse_duration(table.get("delay", 300), "delay")
        pending = parse_duration(table.get("pending_expiry", "1d"), "pending_expiry")
        confirmed = parse_duration(table.get("confirmed_expiry", "35d"), "confirmed_expiry")
        if pending <= delay:
            raise ValueError(
                f"pending_expiry: must be longer than delay ({delay:g}s), or no retry "
                "could ever pass"
            )
        reply = get_str(table, "reply", DEFAULT_REPLY)
        if len(reply) > 400 or not reply.isprintable():
            raise ValueError("reply: expected printable text of at most 400 characters")
        try:
            reply.format(seconds=1)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"reply: only {{seconds}} may be filled in: {exc!r}") from None
        on_error = table.get("on_store_error", "accept")
        if on_error not in ON_STORE_ERROR:
            raise ValueError(
                f"on_store_error: expected one of {', '.join(ON_STORE_ERROR)}, "
                f"got {describe(on_error)}"
            )
        networks = tuple(
            parse_network(n, "allow_networks") for n in get_str_list(table, "allow_networks")
        )
        domains = []
        for domain in get_str_list(table, "allow_domains"):
            try:
                domains.append(config_domain(domain))
            except ValueError as exc:
                raise ValueError(f"allow_domains: {describe(domain)}: {exc}") from None
        self.delay, self.pending_expiry, self.confirmed_expiry = delay, pending, confirmed
        self.ipv4_prefix = get_prefix(table, "ipv4_prefix", 24, 32)
        self.ipv6_prefix = get_prefix(table, "ipv6_prefix", 64, 128)
        self.allow_networks = networks
        self.allow_domains = frozenset(domains)
        self.skip_authenticated = get_bool(table, "skip_authenticated", True)
        self.reply = reply
        self.on_store_error = on_error
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
        # Bounded: a first write that another node won is read back once.
        for _ in range(2):
            value = await self.store.get(key)
            if value is None:
                if await self.store.set(key, f"p:{now:.0f}", self.pending_expiry, only_new=True):
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
                await self.store.set(key, value, self.confirmed_expiry)
                return 0.0
            left = first_seen + self.delay - now
            if left > 0:
                return left
            await self.store.set(key, f"c:{first_seen:.0f}", self.confirmed_expiry)
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
                self.failures.report(exc, "recipient refused with 451 (on_store_error)")
                raise SMTPError(
                    451, "Temporary local problem, try again later", enhanced_code="4.3.0"
                ) from None
            self.failures.report(exc, "recipient not greylisted (on_store_error)")
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

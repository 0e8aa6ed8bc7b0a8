"""Which recipients this server accepts: local domains and users, and relaying."""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from bonzo.address import Address, canonical_local
from bonzo.errors import PermanentError
from bonzo.hookspecs import Accept, hookimpl
from bonzo.session import Session

from .._config import (
    IPNetwork,
    as_table,
    check_keys,
    config_domain,
    describe,
    get_bool,
    get_str,
    get_str_list,
    in_networks,
    parse_network,
    resolve_path,
)

__all__ = ["RecipientsPlugin"]

log = logging.getLogger("bonzo.plugins.recipients")

KEYS = ("domains", "addresses", "file", "relay_networks", "relay_authenticated")

#: A canonical domain is lower-case ASCII (internationalised labels as A-labels).
_LABEL = r"[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")
#: Characters that route mail onwards from a local part: the percent hack
#: (user%host@relay), bang paths (host!user@relay) and a second @.
_ROUTING = frozenset("%!@")


def _routed(local: str) -> bool:
    """True if ``local`` has a routing character, also in a compatibility
    spelling (full-width ``％``, ``！``, ``＠``...) that a next hop could fold."""
    if any(c in _ROUTING for c in local):
        return True
    return not local.isascii() and any(c in _ROUTING for c in unicodedata.normalize("NFKC", local))


def _check_domain(domain: str, where: str) -> str:
    """A configured domain in canonical form (:func:`bonzo.address.canonical_domain`),
    or raise ValueError naming ``where``."""
    try:
        norm = config_domain(domain)
    except ValueError:
        norm = ""
    if not (_DOMAIN.fullmatch(norm) or _LITERAL.fullmatch(norm)) or len(norm) > 255:
        raise ValueError(f"{where}: {describe(domain)} is not a valid domain")
    return norm


def _check_address(address: str, where: str) -> tuple[str, str]:
    """Split a configured address into (canonical local part, lower-cased;
    canonical domain)."""
    at = address.rfind("@")
    local = address[:at]
    if at <= 0 or not local or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in local):
        raise ValueError(f"{where}: {describe(address)} is not a valid address")
    if len(local.encode("utf-8")) > 64:
        raise ValueError(f"{where}: {describe(address)} has a local part over 64 octets")
    return canonical_local(local).lower(), _check_domain(address[at + 1 :], where)


class RecipientsPlugin:
    """Accepts recipients at local domains, and relaying for trusted sessions.

    It answers every recipient, so list it after any other plugin that
    should get a say on RCPT.
    """

    #: Gives a verdict on every call of these hooks (``bonzo check`` warns
    #: about plugins listed after it for them: they would never run).
    decides_always = ("bonzo_rcpt",)

    def __init__(self) -> None:
        #: Local domains where any user is accepted.
        self.domains: set[str] = set()
        #: Local domains restricted to listed users: domain -> local parts.
        self.users: dict[str, set[str]] = {}
        self.relay_networks: list[IPNetwork] = []
        self.relay_authenticated = True

    # ------------------------------------------------------------ configure
    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate the ``[plugins.recipients]`` table and load the lists."""
        table = as_table(config)
        check_keys(table, KEYS)
        domains: set[str] = set()
        users: dict[str, set[str]] = {}

        def add(entry: str, where: str) -> None:
            if "@" in entry:
                local, domain = _check_address(entry, where)
                users.setdefault(domain, set()).add(local)
            elif entry.lower() != "postmaster":  # always accepted anyway
                domains.add(_check_domain(entry, where))

        for domain in get_str_list(table, "domains"):
            domains.add(_check_domain(domain, "domains"))
        for address in get_str_list(table, "addresses"):
            if "@" not in address:
                raise ValueError(f"addresses: {describe(address)} is not a full address")
            add(address, "addresses")
        if "file" in table:
            name = get_str(table, "file", "")
            path = resolve_path(name, app)
            for lineno, entry in _read_list(path):
                add(entry, f"file: {path}: line {lineno}")
        networks = [
            parse_network(n, "relay_networks") for n in get_str_list(table, "relay_networks")
        ]
        relay_authenticated = get_bool(table, "relay_authenticated", True)
        for net in networks:
            if net.prefixlen == 0:
                log.warning("recipients: relay_networks %s lets every client relay", net)
        # A domain with listed users accepts only them, even when it is also
        # listed in `domains`.
        self.domains = domains - set(users)
        self.users = users
        self.relay_networks = networks
        self.relay_authenticated = relay_authenticated

    @hookimpl
    def bonzo_startup(self) -> None:
        """Say in the log what mail this server accepts."""
        local = sorted(self.domains | set(self.users))
        listed = sum(len(u) for u in self.users.values())
        log.info(
            "recipients: accepting mail for %s%s; relaying for %s",
            ", ".join(local) or "no domain (postmaster only)",
            f" ({listed} listed address(es))" if listed else "",
            ", ".join(
                [str(n) for n in self.relay_networks]
                + (["authenticated sessions"] if self.relay_authenticated else [])
            )
            or "nobody",
        )

    # ------------------------------------------------------------------ RCPT
    def is_local(self, domain: str) -> bool:
        """True if ``domain`` (in any spelling: case, Unicode or ``xn--`` form,
        trailing dot) is a local domain."""
        try:
            norm = config_domain(domain)
        except ValueError:
            return False
        return norm in self.domains or norm in self.users

    def may_relay(self, session: Session) -> bool:
        """True if this session may send to non-local domains."""
        if self.relay_authenticated and session.auth:
            return True
        return in_networks(session.remote_ip, self.relay_networks)

    @hookimpl
    def bonzo_rcpt(self, session: Session, mailbox: Address) -> Accept:
        """Accept a local recipient or an allowed relay; refuse anything else.

        Decides on the canonical address (``mailbox``), never on the text as
        sent, so every spelling of an address gets the same verdict."""
        if not mailbox.domain:
            if mailbox.original.lower() == "postmaster":  # RFC 5321 4.5.1, any case
                return Accept()
            raise PermanentError("Bad recipient address syntax", 550, "5.1.3")
        local, domain = mailbox.local, mailbox.domain
        routed = _routed(local)
        if domain in self.users:
            if local.lower() in self.users[domain] or local.lower() == "postmaster":
                return Accept()
            raise PermanentError("User unknown", 550, "5.1.1")
        if domain in self.domains:
            if local.lower() == "postmaster":
                return Accept()
            if routed:
                raise _relay_denied()
            return Accept()
        if routed or not self.may_relay(session):
            raise _relay_denied()
        return Accept()


def _relay_denied() -> PermanentError:
    return PermanentError("Relay access denied", 554, "5.7.1")


def _read_list(path: Any) -> Iterable[tuple[int, str]]:
    """The entries of a recipients file as (line number, entry) pairs."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"file: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"file: {path} is not UTF-8 text: {exc.reason}") from None
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 1 and not words[1].startswith("#"):
            raise ValueError(
                f"file: {path}: line {lineno}: one address or domain per line, "
                f"got {describe(line.strip())}"
            )
        entries.append((lineno, words[0]))
    return entries

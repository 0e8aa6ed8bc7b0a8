"""Which recipients this server accepts: local domains and users, and relaying."""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

from bonzo.address import Address, canonical_local
from bonzo.errors import PermanentError
from bonzo.hookspecs import Accept, hookimpl
from bonzo.proxy import whole_families
from bonzo.schema import Key, Schema
from bonzo.session import Session

from .._config import (
    IPNetwork,
    config_domain,
    describe,
    domain_name,
    domain_names,
    in_networks,
)

__all__ = ["RecipientsPlugin"]

log = logging.getLogger("bonzo.plugins.recipients")

#: Characters that route mail onwards from a local part: the percent hack
#: (user%host@relay), bang paths (host!user@relay) and a second @.
_ROUTING = frozenset("%!@")


def _routed(local: str) -> bool:
    """True if ``local`` has a routing character, also in a compatibility
    spelling (full-width ``％``, ``！``, ``＠``...) that a next hop could fold."""
    if any(c in _ROUTING for c in local):
        return True
    return not local.isascii() and any(c in _ROUTING for c in unicodedata.normalize("NFKC", local))


def _address(address: str) -> tuple[str, str]:
    """Split a configured address into (canonical local part, lower-cased;
    canonical domain); the :class:`ValueError` does not name the key."""
    at = address.rfind("@")
    local = address[:at]
    if at <= 0 or not local or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in local):
        raise ValueError(f"{describe(address)} is not a valid address")
    if len(local.encode("utf-8")) > 64:
        raise ValueError(f"{describe(address)} has a local part over 64 octets")
    return canonical_local(local).lower(), domain_name(address[at + 1 :])


def _addresses(addresses: list[str]) -> list[tuple[str, str]]:
    """The ``addresses`` key: full addresses only, split by :func:`_address`."""
    split = []
    for address in addresses:
        if "@" not in address:
            raise ValueError(f"{describe(address)} is not a full address")
        split.append(_address(address))
    return split


#: The ``[plugins.recipients]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("domains", "strings", default=[], convert=domain_names,
        doc="Local domains (a domain name, or an address literal such as "
        "``\"[192.0.2.1]\"``): any user there is accepted."),
    Key("addresses", "strings", default=[], convert=_addresses,
        doc="Full addresses (``user@domain``). Their domains are local and accept "
        "only the listed users (and ``postmaster``), even when also listed in "
        "``domains``."),
    Key("file", "path",
        doc="A text file read when the configuration is loaded: one address or "
        "domain per line; a line whose first word starts with ``#`` is a "
        "comment, a word starting with ``#`` after the entry starts a comment, "
        "blank lines are ignored. Its entries add to ``domains`` and "
        "``addresses``. A relative path is relative to the configuration file's "
        "directory (the current directory when Bonzo is embedded). A missing or "
        "unreadable file, or a bad line, is a configuration error naming the "
        "line. Reload (``bonzo reload``, ``SIGHUP``) or restart Bonzo to read a "
        "changed file."),
    Key("relay_networks", "networks", default=[],
        doc="Client networks that may relay, in CIDR notation, IPv4 or IPv6 "
        "(``\"192.0.2.0/24\"``, ``\"2001:db8::/32\"``); a bare address means "
        "that host only. Host bits must be zero. A client connecting over IPv6 "
        "with an IPv4-mapped address (``::ffff:192.0.2.1``) matches the IPv4 "
        "network. A network of every address (``0.0.0.0/0``, ``::/0``, or networks "
        "that together hold them) makes an open relay; it is accepted with a "
        "warning in the log."),
    Key("relay_authenticated", "bool", default=True,
        doc="Whether an authenticated session (AUTH) may relay."),
)  # fmt: skip
KEYS = tuple(SCHEMA.names)


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
        #: Every local domain, in the order of the configuration: ``domains``,
        #: then those of ``addresses``, then the ``file``'s. The first is
        #: where the ``queue`` plugin sends mail for the bare ``<postmaster>``.
        self.local_domains: list[str] = []
        self.relay_networks: list[IPNetwork] = []
        self.relay_authenticated = True
        self.auth_available = True
        #: What ``bonzo check`` should warn about (set by bonzo_configure).
        self.config_warnings: list[str] = []

    # ------------------------------------------------------------ configure
    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate the ``[plugins.recipients]`` table and load the lists."""
        values = SCHEMA.parse(config, app)
        domains: set[str] = set(values["domains"])
        # A dict as an ordered set: the order of the configuration.
        ordered: dict[str, None] = dict.fromkeys(values["domains"])
        users: dict[str, set[str]] = {}
        for local, domain in values["addresses"]:
            users.setdefault(domain, set()).add(local)
            ordered[domain] = None
        path = values["file"]
        if path is not None:
            for lineno, entry in _read_list(path):
                try:
                    if "@" in entry:
                        local, domain = _address(entry)
                        users.setdefault(domain, set()).add(local)
                        ordered[domain] = None
                    elif entry.lower() != "postmaster":  # always accepted anyway
                        domain = domain_name(entry)
                        domains.add(domain)
                        ordered[domain] = None
                except ValueError as exc:
                    raise ValueError(f"file: {path}: line {lineno}: {exc}") from None
        networks: list[IPNetwork] = values["relay_networks"]
        relay_authenticated = values["relay_authenticated"]
        for net in networks:
            if net.prefixlen == 0:
                log.warning("recipients: relay_networks %s lets every client relay", net)
        for family, same in whole_families(networks):
            log.warning(
                "recipients: relay_networks %s hold every %s address together: "
                "they let every client relay",
                " ".join(str(n) for n in same),
                family,
            )
        # A domain with listed users accepts only them, even when it is also
        # listed in `domains`.
        self.domains = domains - set(users)
        self.users = users
        self.local_domains = list(ordered)
        self.relay_networks = networks
        self.relay_authenticated = relay_authenticated
        # Whether a client can authenticate at all (some plugin checks
        # credentials): relaying for authenticated sessions means nothing
        # otherwise.
        plugins = getattr(app, "plugins", None)
        self.auth_available = plugins is None or bool(plugins.checks_credentials())
        self.config_warnings: list[str] = []
        if not (domains or users or networks or (relay_authenticated and self.auth_available)):
            self.config_warnings.append(
                "no domains, addresses, file or relay_networks (and no plugin that "
                "authenticates clients): every recipient but postmaster will be refused"
            )

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
                + (
                    ["authenticated sessions"]
                    if self.relay_authenticated and self.auth_available
                    else []
                )
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

"""Small helpers the bundled plugins share (their tables are declared with
:mod:`bonzo.schema`): configured domains in canonical form, client
addresses, durations given on the command line.

Mail addresses are never normalised here: the protocol core gives each
plugin a :class:`bonzo.address.Address` whose ``canonical`` form is the one
to match and store on, and configured domains go through the same
:func:`bonzo.address.canonical_domain`, so that configuration and traffic
compare in one form.

Private to ``bonzo_plugins``; third-party plugins should not import it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bonzo import metrics
from bonzo.address import Address, canonical_domain
from bonzo.proxy import client_address, client_network, network

__all__ = [
    "as_table",
    "DOTS",
    "config_domain",
    "domain_name",
    "domain_names",
    "envelope_recipients",
    "parse_network",
    "client_address",
    "in_networks",
    "describe",
    "parse_duration",
    "client_network",
    "store_group",
    "StoreFailures",
]

#: The full stops that separate domain labels (UTS #46 maps the last three
#: to the first): ASCII, ideographic, full-width and half-width ideographic.
DOTS = ".\u3002\uff0e\uff61"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


#: The networks whose clients' store keys form one group (see
#: :meth:`bonzo.store.Store.set`): wide enough that one sender cannot spread
#: a flood over many groups (an IPv6 site commonly has a /48), narrow enough
#: that a flood's group is rarely a legitimate sender's.
STORE_GROUP_IPV4 = 24
STORE_GROUP_IPV6 = 48


def store_group(ip: str) -> str:
    """The store group of the keys a client at ``ip`` makes: its /24 or /48."""
    return client_network(ip, STORE_GROUP_IPV4, STORE_GROUP_IPV6)


def describe(value: Any, limit: int = 60) -> str:
    """A short ``repr`` of a configuration value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_table(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The plugin's table (``None`` counts as empty); anything else is an error."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ValueError(f"expected a table, got {describe(config)}")
    return config


def config_domain(domain: str) -> str:
    """A configured domain in the canonical form of :mod:`bonzo.address`
    (IDNA/UTS 46 mapping, lower-case A-labels, normalised address literals),
    without surrounding spaces or a trailing dot, so that it compares equal to
    :attr:`bonzo.address.Address.domain` of every spelling of it.

    Raises :class:`ValueError` when the domain has no IDNA form, or is no
    DNS name a configuration means: each label letters, digits, ``-`` and
    ``_`` (a ``*``, a ``,`` or a space would match nothing, silently).
    """
    norm = canonical_domain(domain.strip().rstrip(DOTS))
    if norm[:1] != "[" and not _CONFIG_DOMAIN.fullmatch(norm):
        raise ValueError(f"not a domain name: {domain.strip()!r}")
    return norm


#: A canonical domain is lower-case ASCII (internationalised labels as A-labels).
_LABEL = r"[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
#: A configured domain: such labels, ``_`` allowed too (service names such as
#: ``_dmarc``; RFC 2181 11 allows more, no configuration needs it).
_CONFIG_LABEL = r"[a-z0-9_](?:[a-z0-9_\-]*[a-z0-9_])?"
_CONFIG_DOMAIN = re.compile(rf"(?:{_CONFIG_LABEL}\.)*{_CONFIG_LABEL}")
_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")


def domain_name(domain: str) -> str:
    """A configured mail domain (a host name, or an address literal such as
    ``[192.0.2.1]``) in the canonical form of :func:`config_domain`.

    Raises :class:`ValueError` (``'x' is not a valid domain``, without a key:
    a :class:`bonzo.schema.Key` ``convert=`` prefixes it) for one with no IDNA
    form, no host-name syntax (no wildcards, no empty labels, no ``@``) or
    over 255 characters.
    """
    try:
        norm = config_domain(domain)
    except ValueError:
        norm = ""
    if not (_DOMAIN.fullmatch(norm) or _LITERAL.fullmatch(norm)) or len(norm) > 255:
        raise ValueError(f"{describe(domain)} is not a valid domain")
    return norm


def domain_names(domains: list[str]) -> list[str]:
    """:func:`domain_name` of each; for ``Key(..., "strings", convert=domain_names)``."""
    return [domain_name(d) for d in domains]


def envelope_recipients(envelope: Any) -> list[Address]:
    """The envelope's recipients as :class:`~bonzo.address.Address` objects,
    in the order of ``rcpt_tos``.

    The core fills ``envelope.recipients`` beside ``envelope.rcpt_tos``; an
    envelope built by hand (the original API, a test, an embedding
    application) may have only ``rcpt_tos``, and then each is parsed here
    with the same :meth:`Address.parse`, so the canonical form never depends
    on who built the envelope. Raises :class:`ValueError` for a recipient
    whose domain has no IDNA form (the core refuses those at ``RCPT``).
    """
    recipients = list(getattr(envelope, "recipients", None) or ())
    if len(recipients) == len(envelope.rcpt_tos):
        return recipients
    return [Address.parse(rcpt) for rcpt in envelope.rcpt_tos]


def check_creatable(key: str, path: Path) -> None:
    """Raise :exc:`ValueError` (naming ``key``) when the directory ``path``
    cannot be used: it does not exist and cannot be made (what is on the way
    to it is not a directory, or nothing can be created there: a read-only
    or virtual file system, no permission), or it exists and nothing can be
    created in it. ``bonzo check`` then says so, instead of the daemon
    failing at startup (exit status 1, which a process manager restarts).

    The test creates an empty directory where the first one would go and
    removes it at once: permissions alone do not tell (root may write
    anywhere but in ``/proc`` or on a read-only mount)."""
    where = path
    if not path.exists():
        for ancestor in path.parents:
            if ancestor.exists():
                if not ancestor.is_dir():
                    raise ValueError(
                        f"{key}: {path} cannot be created: {ancestor} is not a directory"
                    )
                where = ancestor
                break
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bonzo-check-", dir=where))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if where == path:
            raise ValueError(f"{key}: nothing can be created in {path}: {reason}") from None
        raise ValueError(f"{key}: {path} cannot be created in {where}: {reason}") from None


def local_address(value: str) -> str:
    """A ``source_address``: an IP address (of this machine) to connect
    from, as ``192.0.2.10`` or ``2001:db8::10`` (no zone index: the socket
    is bound by name lookup, which does not take one). Raises
    :class:`ValueError`."""
    if "%" in value:
        raise ValueError(f"{describe(value)}: a zone index (%...) is not supported")
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise ValueError(
            f"expected an IP address such as 192.0.2.10 or 2001:db8::10, got {describe(value)}"
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # An IPv6 socket cannot be bound to it (every connection failed).
        raise ValueError(
            f"{describe(value)} is an IPv4-mapped address, which no socket can connect "
            f'from: write "{address.ipv4_mapped}"'
        )
    return str(address)


def parse_network(value: str, key: str) -> IPNetwork:
    """A CIDR string (or a bare address, meaning a single host) as a network.

    Host bits must be zero (``10.0.0.1/8`` is refused as a probable typo); an
    IPv4-mapped network is IPv4 (clients are matched so); a zone index is
    refused (:func:`bonzo.proxy.network`).
    """
    try:
        return network(value)
    except ValueError as exc:
        raise ValueError(f"{key}: {describe(value)} is not a valid network: {exc}") from None


def in_networks(remote_ip: str, networks: Iterable[IPNetwork]) -> bool:
    """True if the client's address is in one of ``networks``."""
    address = client_address(remote_ip)
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in networks)


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any, key: str, *, zero: bool = False) -> float:
    """A positive duration (or zero, with ``zero``): seconds as a number,
    or a string such as ``"30s"``, ``"5m"``, ``"4h"``, ``"5d"``."""
    seconds: float
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected a duration such as 300 or '5m', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f"{key}: expected a duration such as 300 or '5m', got {describe(value)}")
    if not (0 <= seconds if zero else 0 < seconds) or not seconds < 10 * 365 * 86400:
        raise ValueError(
            f"{key}: expected a positive duration under ten years, got {describe(value)}"
        )
    return seconds


class StoreFailures:
    """Logs a plugin's failures to reach its store (``app.store``) at
    ``WARNING``: the first at once, then at most one line per ``interval``
    seconds saying how many were not logged, so that an outage of Redis
    does not flood the log with one line per SMTP command. Every failure
    is counted in the metrics, when they are on
    (``bonzo_store_failures_total``), the unlogged ones included."""

    def __init__(self, log: logging.Logger, plugin: str, interval: float = 60.0) -> None:
        self.log = log
        self.plugin = plugin
        self.interval = interval
        self._next = 0.0
        self._quiet = 0

    def report(self, error: Exception, outcome: str, action: str) -> None:
        """Log ``error`` and what the plugin did (``outcome``, a phrase for
        the log; ``action``, its ``on_store_error``: ``accept`` or
        ``tempfail``)."""
        counter = metrics.active
        if counter is not None:
            counter.store_failure(self.plugin, action)
        now = time.monotonic()
        if now < self._next:
            self._quiet += 1
            return
        more = f" ({self._quiet} more since the last line)" if self._quiet else ""
        self.log.warning("%s: %s; %s%s", self.plugin, error, outcome, more)
        self._quiet = 0
        self._next = now + self.interval

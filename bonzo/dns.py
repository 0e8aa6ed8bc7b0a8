"""DNS lookups through one configured resolver: MX routing, and the records
filters need.

Every DNS lookup Bonzo or a plugin makes goes through one :class:`Resolver`
per process, built from the ``[dns]`` table of the configuration
(:class:`DNSSettings`) and reachable by plugins as ``app.dns``. It wraps
`dnspython <https://www.dnspython.org/>`_'s asynchronous stub resolver and
asks only the nameservers the operator named.

**DNS is off unless configured.** With no ``nameservers`` and no
``system = true``, no resolver is built and every lookup raises
:class:`DNSDisabled` — never a silent fallback to ``/etc/resolv.conf``. So
the default configuration and the test suite send no packet off the machine.

Results and errors are typed so that callers can act on them:

- :class:`DNSTemporaryError` (SERVFAIL, REFUSED, no answer in time
  (:class:`DNSTimeout`), a network error, an answer truncated even over
  TCP, DNS switched off): try again
  later — the delivery side defers (``4xx``);
- :class:`DNSPermanentError`: the name does not exist (:class:`NXDomain`),
  has no record of that type (:class:`NoData`), cannot be a DNS name
  (:class:`BadName`), or, from :meth:`Resolver.resolve_mx`, does not accept
  mail (:class:`NullMX`) or has no reachable mail host
  (:class:`NoAddress`) — the delivery side bounces (``5xx``).

Each error carries the RFC 3463 status a bounce or deferral should report
(:attr:`DNSError.enhanced_code`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import io
import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from .address import canonical_domain
from .errors import PermanentError, SMTPError, TransientError
from .settings import SettingError, finite_number, spelled

__all__ = [
    "Resolver",
    "DNSSettings",
    "Answer",
    "MXHost",
    "MXResult",
    "DNSError",
    "DNSTemporaryError",
    "DNSTimeout",
    "DNSDisabled",
    "DNSPermanentError",
    "NXDomain",
    "NoData",
    "BadName",
    "NullMX",
    "NoAddress",
    "parse_nameserver",
    "format_nameserver",
    "dns_name",
    "ADDRESS_FAMILIES",
    "DISABLED_MESSAGE",
    "MAX_CACHE_BYTES",
    "answer_cost",
]

#: The values of :attr:`DNSSettings.address_families`, and the record type
#: each looks up.
ADDRESS_FAMILIES = {"ipv6": "AAAA", "ipv4": "A"}

#: What every lookup says while DNS is off.
DISABLED_MESSAGE = "DNS lookups are off: set [dns] nameservers"

#: The largest :attr:`DNSSettings.cache_max_bytes`: 64 GiB.
MAX_CACHE_BYTES = 1 << 36

# UTS #46 treats these as label separators, like ".".
_IDNA_DOTS = ("\u3002", "\uff0e", "\uff61")


# ---------------------------------------------------------------- errors
class DNSError(Exception):
    """A lookup that gave no usable answer.

    ``str()`` is a one-line message that names the query and is safe to log
    or put in a DSN (it holds names and response codes, never packet data).

    :arg message: the message.
    :arg name: the name asked for (A-labels, no final dot), if any.
    :arg rdtype: the record type asked for (``"MX"``), if any.
    """

    #: True when the same lookup may succeed later (defer, ``4xx``); false
    #: when it will not (bounce, ``5xx``).
    temporary: bool = True
    #: The RFC 3463 status code a deferral or bounce should report.
    enhanced_code: str = "4.4.3"

    def __init__(self, message: str, name: str = "", rdtype: str = "") -> None:
        super().__init__(message)
        self.name = name
        self.rdtype = rdtype

    def smtp_error(self, text: str | None = None) -> SMTPError:
        """The reply for an SMTP client whose command depended on this lookup:
        a :class:`~bonzo.errors.TransientError` (``451``) or
        :class:`~bonzo.errors.PermanentError` (``550``) with
        :attr:`enhanced_code` and ``text`` (default: this error's message)."""
        message = str(self) if text is None else text
        if self.temporary:
            return TransientError(message, 451, self.enhanced_code)
        return PermanentError(message, 550, self.enhanced_code)


class DNSTemporaryError(DNSError):
    """No answer now: SERVFAIL, REFUSED, a network error, a malformed
    response. Try again later."""

    temporary = True
    enhanced_code = "4.4.3"  # directory server failure


class DNSTimeout(DNSTemporaryError):
    """No nameserver answered in time: ``timeout`` × ``attempts`` × the
    number of nameservers at most, or the caller's shorter ``lifetime``."""


class DNSDisabled(DNSTemporaryError):
    """DNS lookups are off (no ``[dns] nameservers``): a local configuration
    fault, so temporary — mail waits until the operator fixes it."""

    enhanced_code = "4.3.5"  # system incorrectly configured

    def __init__(self, name: str = "", rdtype: str = "") -> None:
        super().__init__(DISABLED_MESSAGE, name, rdtype)


class DNSPermanentError(DNSError):
    """An answer that will not change by asking again."""

    temporary = False
    enhanced_code = "5.4.4"  # unable to route


class NXDomain(DNSPermanentError):
    """The name does not exist (rcode NXDOMAIN)."""

    enhanced_code = "5.1.2"  # bad destination system address


class NoData(DNSPermanentError):
    """The name exists but has no record of the type asked for."""


class BadName(DNSPermanentError):
    """The text cannot be a DNS name: empty, a label over 63 octets, over
    255 octets in all, no IDNA form, or an unusable address literal."""

    enhanced_code = "5.1.2"


class NullMX(DNSPermanentError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""

    enhanced_code = "5.1.10"  # recipient address has null MX (RFC 7505)


class NoAddress(DNSPermanentError):
    """No mail host of the domain has an address: the MX hosts (or, without
    MX records, the domain itself) have no A or AAAA record."""


# -------------------------------------------------------------- settings
def parse_nameserver(text: str, default_port: int = 53) -> tuple[str, int]:
    """Parse a nameserver: an IP address with an optional port.

    ``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"``, ``"[::1]"`` and
    ``"[::1]:5353"`` are accepted; the port defaults to ``default_port``.
    Host names are refused: finding them would need DNS. Returns
    ``(address, port)`` with the address in its compressed form; raises
    :class:`ValueError` with a message for the operator.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"must be an IP address with an optional :port, not {text!r}")
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ] after an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected :port after ]")
            port = _port(rest[1:], text)
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        if text.count(":") == 1:
            host, _, port_text = text.partition(":")
            port = _port(port_text, text)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{text!r} is not an IP address (with an optional :port; write an IPv6 "
                'address with a port as "[::1]:5353"; host names are not allowed)'
            ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ValueError(f"{text!r}: IPv6 zone indexes are not supported")
    return address.compressed, port


def _port(text: str, whole: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{whole!r}: the port must be 1..65535, not {text!r}")
    return int(text)


def format_nameserver(address: str, port: int) -> str:
    """The inverse of :func:`parse_nameserver`: ``127.0.0.1:53``, ``[::1]:5353``."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _int_in(value: Any, low: int, high: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high


def _seconds_in(value: Any, high: float) -> bool:
    return finite_number(value) and 0 < value <= high


@dataclass(frozen=True)
class DNSSettings:
    """The ``[dns]`` table: which nameservers to ask and how.

    Every field is validated when the object is made (a
    :class:`~bonzo.settings.SettingError` naming the field). The defaults
    leave DNS off.
    """

    #: Nameservers to ask, in order: IP addresses with an optional port
    #: (``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"[::1]:5353"``). Empty
    #: (and ``system`` false): DNS is off.
    nameservers: tuple[str, ...] = ()
    #: The port of the nameservers that name none (and of the system's).
    port: int = 53
    #: Ask the nameservers of :attr:`resolv_conf` (the system's) instead of
    #: :attr:`nameservers`. Its search list and options are not used.
    system: bool = False
    #: The file read when :attr:`system` is true.
    resolv_conf: str = "/etc/resolv.conf"
    #: Seconds to wait for one nameserver's answer to one query.
    timeout: float = 5.0
    #: How many times each nameserver is tried for one query before the
    #: lookup fails as a :class:`DNSTimeout`.
    attempts: int = 2
    #: Ask every query over TCP. Otherwise UDP, and a truncated UDP answer
    #: is asked again over TCP (RFC 7766).
    tcp: bool = False
    #: Answers kept in memory (least recently used go first); ``0``: none.
    cache_size: int = 1000
    #: Memory in octets the cached answers may take in all, by an estimate
    #: on the high side (:func:`answer_cost`); an answer above it is not
    #: cached. ``0``: no cache.
    cache_max_bytes: int = 8_388_608
    #: Longest time, in seconds, an answer stays cached, whatever its TTL.
    cache_max_ttl: float = 300.0
    #: MX hosts whose addresses one :meth:`Resolver.resolve_mx` looks up
    #: (the most preferred first).
    max_mx_hosts: int = 10
    #: Addresses one :meth:`Resolver.resolve_mx` returns in all, like
    #: Postfix's ``smtp_mx_address_limit``.
    max_mx_addresses: int = 10
    #: Which addresses :meth:`Resolver.resolve_mx` looks up for each host,
    #: in the order to try them: ``"ipv6"`` (AAAA) and/or ``"ipv4"`` (A).
    address_families: tuple[str, ...] = ("ipv6", "ipv4")

    def __post_init__(self) -> None:
        # Lists are accepted (from TOML) and kept as tuples.
        servers: Any = self.nameservers
        if isinstance(servers, str) or not isinstance(servers, (list, tuple)):
            raise SettingError("nameservers", f"must be a list of strings, not {spelled(servers)}")
        object.__setattr__(self, "nameservers", tuple(servers))
        if not _int_in(self.port, 1, 65535):
            raise SettingError("port", f"must be an integer 1..65535, not {spelled(self.port)}")
        for entry in self.nameservers:
            try:
                parse_nameserver(entry, self.port)
            except ValueError as exc:
                raise SettingError("nameservers", str(exc)) from None
        if not isinstance(self.system, bool):
            raise SettingError("system", f"must be true or false, not {spelled(self.system)}")
        if self.system and self.nameservers:
            raise SettingError(
                "system",
                "cannot be used with nameservers: name the nameservers, or use the system's",
            )
        if (
            not isinstance(self.resolv_conf, str)
            or not self.resolv_conf
            or "\0" in self.resolv_conf
        ):
            raise SettingError(
                "resolv_conf", f"must be a non-empty path, not {spelled(self.resolv_conf)}"
            )
        if not _seconds_in(self.timeout, 300):
            raise SettingError(
                "timeout", f"must be a number of seconds in (0, 300], not {spelled(self.timeout)}"
            )
        if not _int_in(self.attempts, 1, 10):
            raise SettingError(
                "attempts", f"must be an integer 1..10, not {spelled(self.attempts)}"
            )
        if not isinstance(self.tcp, bool):
            raise SettingError("tcp", f"must be true or false, not {spelled(self.tcp)}")
        if not _int_in(self.cache_size, 0, 1_000_000):
            raise SettingError(
                "cache_size", f"must be an integer 0..1000000, not {spelled(self.cache_size)}"
            )
        if not _int_in(self.cache_max_bytes, 0, MAX_CACHE_BYTES):
            raise SettingError(
                "cache_max_bytes",
                f"must be an integer 0..{MAX_CACHE_BYTES}, not {spelled(self.cache_max_bytes)}",
            )
        if not _seconds_in(self.cache_max_ttl, 604800):
            raise SettingError(
                "cache_max_ttl",
                f"must be a number of seconds in (0, 604800], not {spelled(self.cache_max_ttl)}",
            )
        if not _int_in(self.max_mx_hosts, 1, 100):
            raise SettingError(
                "max_mx_hosts", f"must be an integer 1..100, not {spelled(self.max_mx_hosts)}"
            )
        if not _int_in(self.max_mx_addresses, 1, 100):
            raise SettingError(
                "max_mx_addresses",
                f"must be an integer 1..100, not {spelled(self.max_mx_addresses)}",
            )
        families: Any = self.address_families
        if (
            isinstance(families, str)
            or not isinstance(families, (list, tuple))
            or not families
            or not all(isinstance(f, str) and f in ADDRESS_FAMILIES for f in families)
            or len(set(families)) != len(families)
        ):
            raise SettingError(
                "address_families",
                f'must be a list of "ipv6" and/or "ipv4", each once, not {spelled(families)}',
            )
        object.__setattr__(self, "address_families", tuple(families))

    @classmethod
    def field_names(cls) -> list[str]:
        """Every field, in order (the keys of the ``[dns]`` table)."""
        return [f.name for f in fields(cls)]

    @property
    def enabled(self) -> bool:
        """Whether lookups are on: nameservers named, or the system's asked for."""
        return bool(self.nameservers) or self.system

    @property
    def servers(self) -> list[tuple[str, int]]:
        """:attr:`nameservers` as ``(address, port)`` pairs."""
        return [parse_nameserver(entry, self.port) for entry in self.nameservers]


# --------------------------------------------------------------- results
@dataclass(frozen=True)
class Answer:
    """The records found for one query."""

    #: The name asked for (A-labels, lower case, no final dot).
    name: str
    #: The record type asked for, e.g. ``"TXT"``.
    rdtype: str
    #: The name the records belong to, after any CNAME (equal to :attr:`name`
    #: without one).
    canonical_name: str
    #: The records' TTL in seconds.
    ttl: int
    #: The records, as dnspython ``Rdata`` objects (``.address`` of an A
    #: record, ``.strings`` of a TXT record, ...), in the order received.
    records: tuple[Any, ...]


@dataclass(frozen=True)
class MXHost:
    """One mail host of a domain, with the addresses to try."""

    #: The host name (lower case, no final dot), or the address literal.
    name: str
    #: Its MX preference (``0`` for an implicit MX or an address literal).
    preference: int
    #: Its addresses in the order to try (per :attr:`DNSSettings.address_families`).
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class MXResult:
    """Where to deliver mail for a domain (:meth:`Resolver.resolve_mx`)."""

    #: The domain, in A-labels.
    domain: str
    #: The hosts to try, in order, each with at least one address.
    hosts: tuple[MXHost, ...]
    #: True when the domain has no MX records and is its own mail host
    #: (RFC 5321 5.1), or is an address literal.
    implicit: bool = False
    #: Lookups that failed on the way: every failure of a host left out of
    #: :attr:`hosts` for want of an address, and the temporary failures of
    #: the hosts kept (which may lack some addresses).
    errors: tuple[DNSError, ...] = ()
    #: True when :attr:`DNSSettings.max_mx_hosts` or
    #: :attr:`~DNSSettings.max_mx_addresses` left hosts or addresses out.
    capped: bool = False

    @property
    def addresses(self) -> list[tuple[str, str]]:
        """Every ``(host, address)`` pair, in the order to try them."""
        return [(host.name, address) for host in self.hosts for address in host.addresses]


# ----------------------------------------------------------------- names
def dns_name(text: str | bytes) -> dns.name.Name:
    """The absolute DNS name for ``text``: a host or domain name, with or
    without a final dot, in A-labels or U-labels (each non-ASCII label goes
    through IDNA, as :func:`bonzo.address.canonical_domain` does; ASCII
    labels, such as ``_dmarc``, are kept as they are, in lower case; one
    with a control character is refused).

    Labels are taken literally: a backslash is not an escape. Raises
    :class:`BadName`.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise BadName(f"not a DNS name: {text!r}") from None
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise BadName(f"not a DNS name: {text!r}")
    if not name.isascii():
        for dot in _IDNA_DOTS:
            name = name.replace(dot, ".")
    labels = []
    for label in name.split("."):
        if not label.isascii():
            try:
                # One label at a time (never an address literal here).
                label = canonical_domain(label) if label[:1] != "[" else ""
                encoded = label.encode("ascii")
            except (ValueError, UnicodeError) as exc:
                raise BadName(f"not a DNS name: {text!r} ({exc})") from None
            if not encoded:
                raise BadName(f"not a DNS name: {text!r}")
            labels.append(encoded)
        elif not label.isprintable():
            # DNS would carry the octets, but no host or record is named so:
            # a name read from a message must not be asked for as another.
            # (A space is printable: SPF macros may expand to one, RFC 7208
            # 7.1, and its test suite looks such a name up.)
            raise BadName(f"not a DNS name: {text!r} (a control character)")
        else:
            labels.append(label.lower().encode("ascii"))
    try:
        return dns.name.Name([*labels, b""])
    except dns.exception.DNSException as exc:
        raise BadName(f"not a DNS name: {text!r} ({_describe(exc)})") from None


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _describe(exc: BaseException) -> str:
    # dnspython's messages are sentences ending with a full stop.
    return (str(exc) or type(exc).__name__).rstrip(".")


#: What one cached answer is counted for beyond its records: the key, the
#: answer object and the header kept of its response (measured: about 1.6 KB).
ENTRY_COST = 2048
#: What each record is counted for beyond its wire form (dnspython's objects;
#: a record with a name in it, such as MX, is the largest).
RECORD_COST = 320
#: What each character-string of a TXT record is counted for beyond its
#: octets (one bytes object each).
STRING_COST = 48


def answer_cost(answer: dns.resolver.Answer) -> int:
    """An estimate, on the high side, of the memory in octets a cached
    ``answer`` takes: :data:`ENTRY_COST`, plus for its records their wire
    length, :data:`RECORD_COST` each and :data:`STRING_COST` per TXT
    string. Python keeps a record in several times its wire size (tens of
    times for a TXT record of many short strings), so the wire length alone
    would undercount."""
    rrset = answer.rrset
    if rrset is None:
        return ENTRY_COST
    wire = io.BytesIO()
    rrset.to_wire(wire)
    cost = ENTRY_COST + len(wire.getvalue()) + RECORD_COST * len(rrset)
    if rrset.rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
        cost += STRING_COST * sum(len(r.strings) for r in rrset)
    return cost


def _slim(answer: dns.resolver.Answer) -> dns.resolver.Answer:
    """A copy of ``answer`` for the cache, without what no one reads back:
    the response's sections (an NXDOMAIN or no-data answer could carry
    64 KB of authority records) and the CNAMEs followed. dnspython reads only
    the response's rcode and question from a cached answer."""
    response = answer.response
    header = dns.message.QueryMessage(id=response.id)
    header.flags = response.flags
    header.question = list(response.question)
    slim: dns.resolver.Answer = object.__new__(dns.resolver.Answer)
    slim.__dict__.update(answer.__dict__)
    slim.response = header
    chained = answer.chaining_result
    slim.chaining_result = dns.message.ChainingResult(
        chained.canonical_name, chained.answer, chained.minimum_ttl, []
    )
    return slim


class _Cache(dns.resolver.CacheBase):
    """dnspython's answer cache, least recently used first out, bounded by
    entries (``max_entries``) and by their estimated memory
    (``max_bytes``, :func:`answer_cost`); no answer is kept longer than
    ``max_ttl``, nor an answer alone above ``max_bytes``, nor a truncated
    one."""

    def __init__(self, max_entries: int, max_bytes: int, max_ttl: float) -> None:
        super().__init__()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        #: Estimated octets held (the sum of the entries' costs).
        self.size = 0
        self._data: OrderedDict[Any, tuple[dns.resolver.Answer, int]] = OrderedDict()

    @property
    def entries(self) -> int:
        """How many answers are kept."""
        return len(self._data)

    def get(self, key: Any) -> dns.resolver.Answer | None:
        with self.lock:
            entry = self._data.get(key)
            if entry is None:
                self.statistics.misses += 1
                return None
            answer, cost = entry
            if answer.expiration <= time.time():
                del self._data[key]
                self.size -= cost
                self.statistics.misses += 1
                return None
            self._data.move_to_end(key)
            self.statistics.hits += 1
            return answer

    def put(self, key: Any, value: dns.resolver.Answer) -> None:
        # TC over TCP: a partial answer, never to be served again (dnspython
        # caches it before Bonzo can refuse it).
        if value.response.flags & dns.flags.TC:
            return
        cost = answer_cost(value)
        slim = _slim(value)
        slim.expiration = min(value.expiration, time.time() + self.max_ttl)
        with self.lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.size -= old[1]
            if cost > self.max_bytes:
                return
            while self._data and (
                len(self._data) >= self.max_entries or self.size + cost > self.max_bytes
            ):
                _, (_, dropped) = self._data.popitem(last=False)
                self.size -= dropped
            self._data[key] = (slim, cost)
            self.size += cost

    def flush(self, key: Any = None) -> None:
        with self.lock:
            if key is None:
                self._data.clear()
                self.size = 0
            else:
                old = self._data.pop(key, None)
                if old is not None:
                    self.size -= old[1]


class _Flight:
    """A lookup in flight, and how many callers wait for it."""

    def __init__(self, task: asyncio.Task[Answer | DNSError]) -> None:
        self.task = task
        self.waiters = 0


class _ShortPauses:
    """dnspython's asynchronous backend, with the pause it makes between two
    rounds of queries (0.1 s, doubling, up to 2 s) capped at ``cap``
    seconds, so that the pauses take at most half of one ``timeout`` in
    all and every nameserver is asked ``attempts`` times within the
    lifetime (the last round may miss it on a busy machine). Everything else
    is the default backend's."""

    def __init__(self, cap: float) -> None:
        self._cap = cap

    def __getattr__(self, name: str) -> Any:
        return getattr(dns.asyncbackend.get_default_backend(), name)

    async def sleep(self, seconds: float) -> None:
        backend: Any = dns.asyncbackend.get_default_backend()
        await backend.sleep(min(seconds, self._cap))


# -------------------------------------------------------------- resolver
class Resolver:
    """The process's DNS resolver, built from :class:`DNSSettings`.

    :arg settings: the ``[dns]`` settings (default: DNS off).
    :arg shuffle: shuffles, in place, a list of MX hosts of equal preference
        (default :func:`random.shuffle`); tests pass a seeded
        ``random.Random(1).shuffle`` or a no-op for a fixed order.

    Building it reads no file and sends nothing, except that
    ``system = true`` reads :attr:`DNSSettings.resolv_conf` (a problem is a
    :class:`~bonzo.settings.SettingError` for ``resolv_conf``). Lookups are
    coroutines run on the event loop.

    >>> import asyncio
    >>> resolver = Resolver()  # the default: off
    >>> asyncio.run(resolver.resolve_mx("example.org"))
    Traceback (most recent call last):
      ...
    bonzo.dns.DNSDisabled: DNS lookups are off: set [dns] nameservers
    """

    def __init__(
        self,
        settings: DNSSettings | None = None,
        *,
        shuffle: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else DNSSettings()
        self._shuffle = shuffle if shuffle is not None else random.shuffle
        #: ``(address, port)`` of each nameserver asked, in order.
        self.servers: list[tuple[str, int]] = []
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._flights: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], _Flight] = {}
        self._backend: Any = _ShortPauses(self.settings.timeout / (2 * self.settings.attempts))
        if self.settings.enabled:
            self._resolver = self._build()

    def _build(self) -> dns.asyncresolver.Resolver:
        s = self.settings
        # configure=False: never read /etc/resolv.conf behind the operator's back.
        resolver = dns.asyncresolver.Resolver(configure=False)
        if s.system:
            try:
                resolver.read_resolv_conf(s.resolv_conf)
            except (OSError, dns.exception.DNSException) as exc:
                raise SettingError(
                    "resolv_conf", f"no nameserver found in {s.resolv_conf}: {_describe(exc)}"
                ) from None
            addresses = [str(n) for n in resolver.nameservers]
            self.servers = []
            for address in addresses:
                try:
                    self.servers.append(parse_nameserver(address, s.port))
                except ValueError as exc:
                    raise SettingError("resolv_conf", f"{s.resolv_conf}: {exc}") from None
            # Its search list, rotation and options are the C library's business.
            resolver.reset()
        else:
            self.servers = s.servers
        resolver.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in self.servers]
        resolver.domain = dns.name.root
        resolver.search = []
        resolver.use_search_by_default = False
        resolver.timeout = float(s.timeout)
        # dnspython asks the nameservers in turn until the lifetime is over:
        # "attempts" rounds. Its pauses between rounds are short
        # (_ShortPauses) and count in this bound, which _lookup enforces.
        resolver.lifetime = s.timeout * s.attempts * len(self.servers)
        # EDNS0 with the 1232-octet payload of DNS Flag Day 2020: no IP
        # fragmentation; larger answers come truncated and are asked over TCP.
        resolver.use_edns(0, 0, 1232)
        resolver.cache = (
            _Cache(s.cache_size, s.cache_max_bytes, s.cache_max_ttl)
            if s.cache_size and s.cache_max_bytes
            else None
        )
        return resolver

    @property
    def enabled(self) -> bool:
        """Whether lookups are on (otherwise each raises :class:`DNSDisabled`)."""
        return self._resolver is not None

    def describe(self) -> str:
        """One line for ``bonzo check`` and the log: the nameservers and the
        timing, or ``off``."""
        if self._resolver is None:
            return "off"
        s = self.settings
        servers = ", ".join(format_nameserver(a, p) for a, p in self.servers)
        facts = [f"timeout {s.timeout:g} s x {s.attempts}"]
        if s.tcp:
            facts.append("TCP")
        if s.cache_size and s.cache_max_bytes:
            facts.append(f"cache {s.cache_size} ({s.cache_max_bytes / 1048576:g} MiB)")
        else:
            facts.append("no cache")
        source = f" (from {s.resolv_conf})" if s.system else ""
        return f"{servers}{source}; {', '.join(facts)}"

    def flush_cache(self) -> None:
        """Forget every cached answer."""
        if self._resolver is not None and self._resolver.cache is not None:
            self._resolver.cache.flush()

    # -------------------------------------------------------------- queries
    async def query(
        self, name: str | bytes, rdtype: str, *, lifetime: float | None = None
    ) -> Answer:
        """Look up the records of type ``rdtype`` (``"A"``, ``"MX"``,
        ``"TXT"``...) of ``name`` (see :func:`dns_name`; no search list is
        applied).

        :arg lifetime: at most this many seconds in all; never more than
            the settings allow (``timeout`` × ``attempts`` × nameservers),
            which is the default.
        :returns: an :class:`Answer` with at least one record.
        :raises NXDomain: the name does not exist.
        :raises NoData: it has no record of this type.
        :raises DNSTemporaryError: SERVFAIL, REFUSED, a timeout
            (:class:`DNSTimeout`), a network error, an answer truncated
            over TCP, or DNS is off (:class:`DNSDisabled`).
        :raises BadName: ``name`` is not a DNS name.
        :raises ValueError: ``rdtype`` is not a record type one may query.
        """
        try:
            kind = dns.rdatatype.RdataType.make(rdtype)
        except dns.exception.DNSException:
            raise ValueError(f"unknown DNS record type {rdtype!r}") from None
        if dns.rdatatype.is_metatype(kind):
            raise ValueError(f"{rdtype!r} is not a record type one may query")
        if self._resolver is None:
            raise DNSDisabled(str(name), dns.rdatatype.to_text(kind))
        return await self._query(dns_name(name), kind, lifetime)

    async def _query(
        self, qname: dns.name.Name, kind: dns.rdatatype.RdataType, lifetime: float | None
    ) -> Answer:
        """The answer to one question. Identical questions asked while one
        is in flight share its lookup (as a caching resolver answers them
        once); each caller waits at most its own ``lifetime``, and the
        lookup is stopped when no caller waits for it any more."""
        resolver = self._resolver
        name = _text(qname)
        rdtype = dns.rdatatype.to_text(kind)
        if resolver is None:
            raise DNSDisabled(name, rdtype)
        wait = resolver.lifetime
        if lifetime is not None:
            # A library's own timeout must not stretch the operator's bound.
            wait = min(lifetime, wait)
        key = (qname, kind)
        loop = asyncio.get_running_loop()
        flight = self._flights.get(key)
        if flight is None or flight.task.done() or flight.task.get_loop() is not loop:
            flight = _Flight(loop.create_task(self._lookup(qname, kind)))
            self._flights[key] = flight
            flight.task.add_done_callback(lambda task: self._landed(key, task))
        flight.waiters += 1
        try:
            outcome = await asyncio.wait_for(asyncio.shield(flight.task), wait)
        except asyncio.TimeoutError:
            raise DNSTimeout(f"{name}/{rdtype}: no answer in time", name, rdtype) from None
        finally:
            flight.waiters -= 1
            if not flight.waiters and not flight.task.done():
                # Nobody waits any more: stop it, and let the next caller
                # start afresh rather than join a lookup being cancelled.
                flight.task.cancel()
                self._landed(key, flight.task)
        if isinstance(outcome, DNSError):
            # A copy each: one exception object raised in several tasks
            # would share (and grow) its traceback.
            raise copy.copy(outcome)
        return outcome

    def _landed(self, key: tuple[dns.name.Name, dns.rdatatype.RdataType], task: Any) -> None:
        flight = self._flights.get(key)
        if flight is not None and flight.task is task:
            del self._flights[key]

    async def _lookup(
        self, qname: dns.name.Name, kind: dns.rdatatype.RdataType
    ) -> Answer | DNSError:
        """Ask the nameservers: the answer, or the error to raise (returned,
        so that a lookup no one waits for any more logs nothing)."""
        resolver = self._resolver
        assert resolver is not None
        name = _text(qname)
        rdtype = dns.rdatatype.to_text(kind)
        what = f"{name}/{rdtype}"
        bound = resolver.lifetime
        try:
            # dnspython checks its lifetime only between queries, after a
            # pause: the bound holds only if enforced here as well.
            answer = await asyncio.wait_for(
                resolver.resolve(
                    qname,
                    kind,
                    tcp=self.settings.tcp,
                    search=False,
                    lifetime=bound,
                    backend=self._backend,
                ),
                bound,
            )
        except dns.resolver.NXDOMAIN:
            return NXDomain(f"{name}: no such domain (NXDOMAIN)", name, rdtype)
        except dns.resolver.NoAnswer as exc:
            if _truncated(exc.kwargs.get("response")):
                return _truncated_error(what, name, rdtype)
            return NoData(f"{name}: no {rdtype} record", name, rdtype)
        except (dns.exception.Timeout, asyncio.TimeoutError):
            return DNSTimeout(f"{what}: no answer in time", name, rdtype)
        except dns.resolver.NoNameservers as exc:
            return DNSTemporaryError(
                f"{what}: no nameserver answered ({_failures(exc)})", name, rdtype
            )
        except dns.resolver.YXDOMAIN:
            return BadName(f"{what}: name too long after DNAME (YXDOMAIN)", name, rdtype)
        except (dns.exception.DNSException, OSError, EOFError) as exc:
            return DNSTemporaryError(f"{what}: {_describe(exc)}", name, rdtype)
        if _truncated(answer.response):
            return _truncated_error(what, name, rdtype)
        rrset = answer.rrset
        assert rrset is not None  # raise_on_no_answer
        return Answer(
            name=name,
            rdtype=rdtype,
            canonical_name=_text(rrset.name),
            ttl=int(rrset.ttl),
            records=tuple(rrset),
        )

    async def a(self, name: str | bytes) -> list[str]:
        """The IPv4 addresses of ``name`` (A records); raises as :meth:`query`."""
        answer = await self.query(name, "A")
        return [r.address for r in answer.records]

    async def aaaa(self, name: str | bytes) -> list[str]:
        """The IPv6 addresses of ``name`` (AAAA records); raises as :meth:`query`."""
        answer = await self.query(name, "AAAA")
        return [r.address for r in answer.records]

    async def txt(self, name: str | bytes) -> list[bytes]:
        """The TXT records of ``name``, each with its strings joined (as SPF,
        DKIM and DMARC read them); raises as :meth:`query`."""
        answer = await self.query(name, "TXT")
        return [b"".join(r.strings) for r in answer.records]

    async def ptr(self, ip: str) -> list[str]:
        """The names of an IPv4 or IPv6 address (PTR records, lower case, no
        final dot); raises as :meth:`query`, and :class:`ValueError` for a
        string that is not an IP address."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"not an IP address: {ip!r}") from None
        if self._resolver is None:
            raise DNSDisabled(str(address), "PTR")
        qname = dns.reversename.from_address(address.compressed)
        answer = await self._query(qname, dns.rdatatype.PTR, None)
        return [_text(r.target) for r in answer.records]

    async def addresses(
        self, name: str | bytes, families: Sequence[str] | None = None
    ) -> list[str]:
        """The addresses of ``name``: AAAA and A records, looked up at once,
        in the order of ``families`` (default: the settings'
        ``address_families``). An answer for one family is enough; with none,
        raises the temporary error if there was one, else :class:`NXDomain`
        or :class:`NoData`."""
        if self._resolver is None:
            raise DNSDisabled(str(name), "A")
        qname = dns_name(name)
        found, errors = await self._addresses(qname, self._families(families))
        if not found:
            raise _worst(errors)
        return found

    def _families(self, families: Sequence[str] | None) -> tuple[str, ...]:
        if families is None:
            return self.settings.address_families
        chosen = tuple(dict.fromkeys(families))
        if not chosen or any(f not in ADDRESS_FAMILIES for f in chosen):
            raise ValueError(f'families must be "ipv6" and/or "ipv4", not {families!r}')
        return chosen

    async def _addresses(
        self, qname: dns.name.Name, families: tuple[str, ...]
    ) -> tuple[list[str], list[DNSError]]:
        kinds = [dns.rdatatype.RdataType.make(ADDRESS_FAMILIES[f]) for f in families]
        results = await asyncio.gather(
            *(self._query(qname, kind, None) for kind in kinds), return_exceptions=True
        )
        found: list[str] = []
        errors: list[DNSError] = []
        for result in results:
            if isinstance(result, Answer):
                found += [r.address for r in result.records if r.address not in found]
            elif isinstance(result, DNSError):
                errors.append(result)
            else:  # pragma: no cover - a bug, not an answer
                raise result
        return found, errors

    # ----------------------------------------------------------------- MX
    async def resolve_mx(self, domain: str, *, families: Sequence[str] | None = None) -> MXResult:
        """Where to deliver mail for ``domain``, following RFC 5321 section 5.1.

        - ``domain`` may be in U-labels (it goes through IDNA) or an address
          literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``, RFC 5321 4.1.3;
          no zone index), which is its own single host.
        - The MX records are sorted by preference, lowest first; hosts of
          equal preference are shuffled (RFC 5321 5.1: spread the load),
          with the resolver's ``shuffle``, from name order (so a no-op
          shuffle keeps them in name order). A host listed twice keeps its
          lowest preference.
        - No MX record (no data): the domain is its own mail host, an
          *implicit MX* with preference 0.
        - A single MX record whose host is ``.`` is a *null MX* (RFC 7505):
          :class:`NullMX`. A ``.`` among real hosts is ignored.
        - CNAMEs are followed as dnspython follows them (in the nameserver's
          answer).
        - Then the addresses of each host: the families of ``families``
          (default: the settings' ``address_families``) in that order, for at
          most ``max_mx_hosts`` hosts, at most ``max_mx_addresses`` in all, an
          address seen before skipped. Hosts with no address are left out
          (their errors are in :attr:`MXResult.errors`).

        :raises NXDomain: the domain does not exist.
        :raises NullMX: it accepts no mail.
        :raises NoAddress: no host has an address, and every lookup that
            failed failed permanently.
        :raises DNSTemporaryError: the MX lookup failed temporarily, or no
            host has an address and some lookup failed temporarily; or DNS
            is off (:class:`DNSDisabled`).
        :raises BadName: ``domain`` is not a domain name.
        """
        s = self.settings
        families_ = self._families(families)
        literal = _literal(domain)
        if literal is not None:
            return MXResult(domain, (MXHost(domain, 0, (literal,)),), implicit=True)
        qname = dns_name(domain)
        name = _text(qname)
        if self._resolver is None:
            raise DNSDisabled(name, "MX")
        try:
            answer = await self._query(qname, dns.rdatatype.MX, None)
            records = [(int(r.preference), r.exchange) for r in answer.records]
        except NoData:
            records = []
        implicit = not records
        if implicit:
            hosts = [(0, qname)]
        else:
            real = [(p, x) for p, x in records if x != dns.name.root]
            if not real:
                raise NullMX(f"{name} accepts no mail (null MX, RFC 7505)", name, "MX")
            hosts = self._order(real)
        capped = len(hosts) > s.max_mx_hosts
        hosts = hosts[: s.max_mx_hosts]
        lookups = await asyncio.gather(*(self._addresses(x, families_) for _, x in hosts))
        out: list[MXHost] = []
        errors: list[DNSError] = []
        seen: set[str] = set()
        unusable = False
        budget = s.max_mx_addresses
        for (preference, exchange), (found, failed) in zip(hosts, lookups, strict=True):
            usable = [d for d in map(_destination, found) if d is not None]
            unusable = unusable or len(usable) < len(found)
            # (An A record and the same address mapped in AAAA are one.)
            found = list(dict.fromkeys(usable))
            # "No AAAA record" beside an A record is normal: only failures
            # that cost a host or may have cost it some addresses are kept.
            errors += failed if not found else [e for e in failed if e.temporary]
            fresh = [a for a in found if a not in seen]
            if len(fresh) > budget:
                capped = True
                fresh = fresh[:budget]
            if fresh:
                seen.update(fresh)
                budget -= len(fresh)
                out.append(MXHost(_text(exchange), preference, tuple(fresh)))
        if not out:
            temporary = [e for e in errors if e.temporary]
            if temporary:
                raise DNSTemporaryError(
                    f"{name}: no mail host address found for now ({temporary[0]})", name, "MX"
                )
            if unusable:
                raise NoAddress(
                    f"{name}: no mail host has a usable address (only the unspecified one)",
                    name,
                    "MX",
                )
            if implicit:
                raise NoAddress(f"{name}: no MX, A or AAAA record", name, "MX")
            raise NoAddress(f"{name}: no MX host has an address", name, "MX")
        return MXResult(name, tuple(out), implicit, tuple(errors), capped)

    def _order(
        self, records: Iterable[tuple[int, dns.name.Name]]
    ) -> list[tuple[int, dns.name.Name]]:
        best: dict[dns.name.Name, int] = {}
        for preference, exchange in records:
            if exchange not in best or preference < best[exchange]:
                best[exchange] = preference
        groups: dict[int, list[dns.name.Name]] = {}
        for exchange, preference in best.items():
            groups.setdefault(preference, []).append(exchange)
        ordered = []
        for preference in sorted(groups):
            # Sorted first, so that a seeded shuffle gives the same order
            # whatever order the nameserver sent the records in.
            group = sorted(groups[preference])
            if len(group) > 1:
                self._shuffle(group)
            ordered += [(preference, exchange) for exchange in group]
        return ordered

    # ------------------------------------------- callbacks for mail libraries
    async def dkim_txt(self, name: str | bytes, timeout: float = 5) -> bytes | None:
        """A DNS function for dkimpy's asynchronous verifier (its ``dnsfunc``:
        ``dkim.asyncsupport.verify_async(message, dnsfunc=app.dns.dkim_txt)``):
        the first TXT record of ``name`` with its strings joined, or ``None``
        when there is none. Temporary failures raise
        :class:`DNSTemporaryError` (a DKIM ``temperror``)."""
        try:
            answer = await self.query(name, "TXT", lifetime=timeout)
        except (NXDomain, NoData, BadName):
            return None
        return b"".join(answer.records[0].strings)

    def blocking_lookup(
        self, loop: asyncio.AbstractEventLoop
    ) -> Callable[..., list[tuple[tuple[str, str], Any]]]:
        """A blocking DNS function in pyspf's ``DNSLookup`` form, for code
        run in a worker thread (``loop.run_in_executor``) while ``loop`` runs
        this resolver's lookups::

            lookup = app.dns.blocking_lookup(asyncio.get_running_loop())
            lookup("example.org", "TXT")  # in the thread
            # -> [(("example.org", "TXT"), (b"v=spf1 -all",)), ...]

        ``lookup(name, qtype, strict=True, timeout=30)`` returns
        ``[((name, qtype), value), ...]``: an address for ``A``/``AAAA``,
        ``(preference, host)`` for ``MX``, a host name for ``PTR``, the tuple
        of strings for ``TXT``/``SPF``; ``[]`` when there is none. A
        temporary failure raises :class:`DNSTemporaryError` (pyspf's
        ``TempError``). Calling it on the loop's own thread raises
        :class:`RuntimeError` (it would wait for itself).
        """

        def lookup(
            name: str, qtype: str, strict: Any = True, timeout: float = 30
        ) -> list[tuple[tuple[str, str], Any]]:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                raise RuntimeError("blocking_lookup called on the event loop's own thread")
            future = asyncio.run_coroutine_threadsafe(self._pyspf(name, qtype, timeout), loop)
            try:
                return future.result(timeout + 1.0)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise DNSTimeout(f"{name}/{qtype}: no answer in time", name, qtype) from None

        return lookup

    async def _pyspf(
        self, name: str, qtype: str, timeout: float
    ) -> list[tuple[tuple[str, str], Any]]:
        key = (name[:-1] if name.endswith(".") else name, qtype.upper())
        try:
            answer = await self.query(name, key[1], lifetime=timeout)
        except (NXDomain, NoData, BadName):
            return []
        values: list[Any] = []
        for r in answer.records:
            if key[1] in ("A", "AAAA"):
                values.append(r.address)
            elif key[1] == "MX":
                values.append((int(r.preference), _text(r.exchange)))
            elif key[1] in ("PTR", "CNAME"):
                values.append(_text(r.target))
            elif key[1] in ("TXT", "SPF"):
                values.append(tuple(r.strings))
            else:
                values.append(r.to_text())
        return [(key, value) for value in values]


def _literal(domain: str) -> str | None:
    """The address of an address literal domain; ``None`` for a name.

    Only RFC 5321 4.1.3's address literals are addresses: ``[a.b.c.d]`` and
    ``[IPv6:...]`` without a zone index; anything else (``[::1]``,
    ``[IPv6:1.2.3.4]``, ``[IPv6:fe80::1%eth0]``, ``[tag:content]``) is
    :class:`BadName`."""
    if not domain.startswith("["):
        return None
    try:
        canonical = canonical_domain(domain)
    except ValueError as exc:
        raise BadName(str(exc)) from None
    inner = canonical[1:-1]
    try:
        if inner.startswith("IPv6:"):
            address = ipaddress.IPv6Address(inner[5:]).compressed
        else:
            address = ipaddress.IPv4Address(inner).compressed
    except ValueError:
        raise BadName(f"not a usable address literal: {domain!r}") from None
    usable = _destination(address)
    if usable is None:
        raise BadName(f"not a usable address literal: {domain!r} (the unspecified address)")
    return usable


def _destination(address: str) -> str | None:
    """``address`` as a place to connect to: ``None`` for the unspecified
    address (``0.0.0.0``, ``::``: no destination, RFC 4291 2.5.2 -- a
    connection to it reaches this host), an IPv4-mapped one as IPv4 (as an
    address literal of it is)."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # (then checked as the IPv4 address it is)
    if ip.is_unspecified:
        return None
    return str(ip)


def _truncated(response: Any) -> bool:
    """Whether a response that dnspython accepted has TC set. Over UDP it
    asks again over TCP, so this one came over TCP: it did not fit even
    there, or the server is broken. Either way it is not the whole RRset."""
    return response is not None and bool(response.flags & dns.flags.TC)


def _truncated_error(what: str, name: str, rdtype: str) -> DNSTemporaryError:
    return DNSTemporaryError(f"{what}: truncated answer over TCP", name, rdtype)


def _failures(exc: dns.resolver.NoNameservers) -> str:
    """What each nameserver said, from dnspython's NoNameservers."""
    said = []
    for error in exc.kwargs.get("errors", [])[:4]:
        server, _tcp, port, problem = error[0], error[1], error[2], error[3]
        what = f"answered {problem}" if isinstance(problem, str) else _describe(problem)
        # dnspython names a nameserver "Do53:ADDRESS@PORT".
        address = str(server).removeprefix("Do53:").rsplit("@", 1)[0]
        said.append(f"{format_nameserver(address, port)}: {what}")
    return "; ".join(dict.fromkeys(said)) or "no nameserver left"


def _worst(errors: list[DNSError]) -> DNSError:
    """The error to report when no lookup found anything: a temporary one if
    any (asking later may help), else NXDOMAIN if every lookup said so."""
    for error in errors:
        if error.temporary:
            return error
    if errors and all(isinstance(e, NXDomain) for e in errors):
        return errors[0]
    return next((e for e in errors if isinstance(e, NoData)), errors[0])

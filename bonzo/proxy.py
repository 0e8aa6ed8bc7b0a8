"""What a front-end says about the client it passes on: the PROXY protocol
header (HAProxy's, versions 1 and 2) and the attributes of Postfix's
``XCLIENT`` command, parsed with no I/O.

A load balancer that relays TCP connections (HAProxy, nginx's ``stream``
module, cloud load balancers) hides the client: Bonzo sees the balancer's
address. With the PROXY protocol the balancer sends, before anything else on
the connection, a header naming the client's address and port and the
address it connected to; version 2 adds typed fields (TLVs) such as the TLS
facts of a connection the balancer decrypted. :class:`ProxyParser` takes the
octets the connection received, in pieces of any size, and returns the
:class:`ProxyHeader` once it is complete, with the octets that followed it
(SMTP, or the TLS handshake of an implicit-TLS listener) untouched in
:attr:`ProxyParser.rest`. Anything that is not a valid header raises
:class:`ProxyError`, whose text is safe to log (never the raw octets).

A mail filter or proxy that speaks SMTP itself says who its client was with
``XCLIENT`` instead (:func:`parse_xclient`).

The facts here come from HAProxy's ``proxy-protocol.txt`` (revision
2020/03/05) and Postfix's ``XCLIENT_README``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from . import dsn

__all__ = [
    "ProxyError",
    "ProxyParser",
    "ProxyHeader",
    "ProxyTLVs",
    "ProxySSL",
    "parse_header",
    "crc32c",
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "MAX_LENGTH",
    "TLV_ALPN",
    "TLV_AUTHORITY",
    "TLV_CRC32C",
    "TLV_NOOP",
    "TLV_UNIQUE_ID",
    "TLV_SSL",
    "TLV_NETNS",
    "IPNetwork",
    "parse_networks",
    "address_in",
    "client_address",
    "client_network",
    "unmapped",
    "network",
    "whole_families",
    "XClientError",
    "XCLIENT_ATTRIBUTES",
    "parse_xclient",
    "xtext_decode",
]

#: An IPv4 or IPv6 network.
IPNetwork: TypeAlias = "ipaddress.IPv4Network | ipaddress.IPv6Network"

#: Longest version 1 header, ``PROXY`` to CRLF included.
V1_MAX_LENGTH = 107
#: The twelve octets a version 2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Default bound on a whole version 2 header (16 fixed octets, the
#: addresses and the TLVs). The protocol allows 65,551; what proxies send
#: (addresses, TLS facts, a unique id of at most 128 octets, a server name)
#: is a few hundred, and a bound keeps the memory a connection may hold
#: before it is even greeted small.
MAX_LENGTH = 4096

#: TLV types of version 2 (``PP2_TYPE_*``).
TLV_ALPN = 0x01
TLV_AUTHORITY = 0x02
TLV_CRC32C = 0x03
TLV_NOOP = 0x04
TLV_UNIQUE_ID = 0x05
TLV_SSL = 0x20
TLV_NETNS = 0x30
# Sub-TLVs of TLV_SSL (PP2_SUBTYPE_SSL_*).
_SSL_VERSION = 0x21
_SSL_CN = 0x22
_SSL_CIPHER = 0x23
_SSL_SIG_ALG = 0x24
_SSL_KEY_ALG = 0x25

_V1_PREFIX = b"PROXY "
_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_FAMILIES = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
_TRANSPORTS = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
#: Octets of the address block of each family.
_ADDRESS_LENGTH = {"UNSPEC": 0, "INET": 12, "INET6": 36, "UNIX": 216}
_UNIX_PATH = 108
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_IPV4_TEXT = re.compile(rb"[0-9.]{7,15}")
_IPV6_TEXT = re.compile(rb"[0-9A-Fa-f:.]{2,45}")


class ProxyError(ValueError):
    """The octets are not a valid PROXY protocol header. ``str()`` is a
    one-line reason for the log, with any octets it quotes escaped."""


def _excerpt(data: bytes | bytearray) -> str:
    """The first octets of ``data``, escaped, to say what came instead."""
    return ascii(bytes(data[:16]))


# ---------------------------------------------------------------- CRC32c
def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes | bytearray) -> int:
    """The CRC-32C (Castagnoli) of ``data``, as version 2's ``PP2_TYPE_CRC32C``
    carries it (RFC 3720 B.4)."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for octet in data:
        crc = table[(crc ^ octet) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ------------------------------------------------------------------ TLVs
def _ascii(value: bytes, what: str) -> str:
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError(f"{what} is not ASCII") from None
    if not text.isprintable():
        raise ProxyError(f"{what} has control characters")
    return text


def _utf8(value: bytes, what: str) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProxyError(f"{what} is not UTF-8") from None
    if not text.isprintable():
        raise ProxyError(f"{what} has control characters")
    return text


def _split_tlvs(block: bytes, what: str) -> list[tuple[int, bytes]]:
    """``type, value`` pairs of a TLV block; each must fit in it."""
    out = []
    i, end = 0, len(block)
    while i < end:  # each turn consumes at least 3 octets
        if end - i < 3:
            raise ProxyError(f"{what}: truncated TLV at offset {i}")
        kind = block[i]
        length = int.from_bytes(block[i + 1 : i + 3], "big")
        if i + 3 + length > end:
            raise ProxyError(f"{what}: TLV 0x{kind:02x} of {length} octets overruns the header")
        out.append((kind, block[i + 3 : i + 3 + length]))
        i += 3 + length
    return out


def _informational(
    decode: Callable[[bytes, str], str], value: bytes, what: str, problems: list[str]
) -> str | None:
    """``decode(value, what)``, or ``None`` with the reason added to
    ``problems``: a TLV that only informs never makes the header invalid."""
    try:
        return decode(value, what)
    except ProxyError as exc:
        problems.append(str(exc))
        return None


@dataclass(frozen=True, slots=True)
class ProxySSL:
    """The ``PP2_TYPE_SSL`` TLV: what the proxy knows of the TLS connection
    it terminated for the client."""

    client: int
    """Bit field: ``0x01`` the client connected over TLS, ``0x02`` it
    presented a certificate on this connection, ``0x04`` in this TLS
    session (perhaps on an earlier, resumed connection)."""
    verify: int
    """``0`` when the client presented a certificate and it was verified."""
    version: str | None = None
    """The TLS version (``"TLSv1.3"``)."""
    cn: str | None = None
    """The common name of the client certificate's subject."""
    cipher: str | None = None
    """The cipher suite (``"TLS_AES_256_GCM_SHA384"``)."""
    sig_alg: str | None = None
    """The algorithm that signed the client certificate."""
    key_alg: str | None = None
    """The algorithm of the client certificate's key."""
    tlvs: tuple[tuple[int, bytes], ...] = ()
    """Every sub-TLV as ``(type, value)``, known or not, in order."""
    problems: tuple[str, ...] = ()
    """Why a known sub-TLV was left out (its attribute ``None``, its octets
    still in :attr:`tlvs`): ``"SSL client CN is not UTF-8"``..."""

    @property
    def tls(self) -> bool:
        """True when the client used TLS to the proxy."""
        return bool(self.client & 0x01)

    @property
    def verified(self) -> bool:
        """True when the client presented a certificate the proxy verified."""
        return bool(self.client & 0x06) and self.verify == 0

    @classmethod
    def parse(cls, value: bytes) -> ProxySSL:
        """Decode the value of a ``PP2_TYPE_SSL`` TLV. A known sub-TLV whose
        text is not printable (the client's certificate supplies some of
        them) is left out and named in :attr:`problems`; a value too short
        or whose sub-TLVs overrun it raises :class:`ProxyError`."""
        if len(value) < 5:
            raise ProxyError("SSL TLV shorter than 5 octets")
        subs = _split_tlvs(value[5:], "SSL TLV")
        known: dict[int, str | None] = {}
        problems: list[str] = []
        for kind, sub in subs:
            if kind in known:
                continue
            if kind == _SSL_CN:
                known[kind] = _informational(_utf8, sub, "SSL client CN", problems)
            elif kind in (_SSL_VERSION, _SSL_CIPHER, _SSL_SIG_ALG, _SSL_KEY_ALG):
                what = f"SSL sub-TLV 0x{kind:02x}"
                known[kind] = _informational(_ascii, sub, what, problems)
        return cls(
            client=value[0],
            verify=int.from_bytes(value[1:5], "big"),
            version=known.get(_SSL_VERSION),
            cn=known.get(_SSL_CN),
            cipher=known.get(_SSL_CIPHER),
            sig_alg=known.get(_SSL_SIG_ALG),
            key_alg=known.get(_SSL_KEY_ALG),
            tlvs=tuple(subs),
            problems=tuple(problems),
        )


class ProxyTLVs(Mapping[int, bytes]):
    """The TLVs of a version 2 header: a read-only mapping from type to value
    (the first value of a type sent twice), :attr:`raw` for all of them in
    order, and the known types decoded and checked.

    >>> tlvs = ProxyTLVs([(TLV_AUTHORITY, b"mx.example.org"), (0xE0, b"x")])
    >>> tlvs.authority, tlvs[0xE0], len(tlvs)
    ('mx.example.org', b'x', 2)

    Only the checksum (``PP2_TYPE_CRC32C``) vouches for the header; the
    other known types only inform, and some carry what the client chose (the
    server name it asked for, its certificate's subject). A malformed one is
    left out — its attribute ``None``, its octets still in the mapping and
    :attr:`raw` — and the reason goes in :attr:`problems`, so that a client
    cannot make its proxy's header invalid:

    >>> tlvs = ProxyTLVs([(TLV_AUTHORITY, b"mx\\x01example.org")])
    >>> tlvs.authority, tlvs[TLV_AUTHORITY], tlvs.problems
    (None, b'mx\\x01example.org', ('authority TLV has control characters',))

    :raises ProxyError: for a ``PP2_TYPE_CRC32C`` value that is not 4 octets.

    .. versionchanged:: 0.2
       A malformed informational TLV no longer raises :class:`ProxyError`.
    """

    __slots__ = (
        "raw",
        "_first",
        "alpn",
        "authority",
        "crc32c",
        "unique_id",
        "ssl",
        "netns",
        "problems",
    )

    def __init__(self, raw: Iterable[tuple[int, bytes]] = ()) -> None:
        #: Every TLV as ``(type, value)``, in the order sent (``NOOP`` too).
        self.raw: tuple[tuple[int, bytes], ...] = tuple((int(k), bytes(v)) for k, v in raw)
        first: dict[int, bytes] = {}
        for kind, value in self.raw:
            if not 0 <= kind <= 255 or len(value) > 65535:
                raise ValueError(f"TLV 0x{kind:x}: a type is 0..255, a value 65535 octets")
            first.setdefault(kind, value)
        self._first = first
        problems: list[str] = []
        #: ``PP2_TYPE_ALPN``: the application protocol the client chose over
        #: TLS with the proxy (octets, e.g. ``b"smtp"``), or ``None``.
        self.alpn: bytes | None = first.get(TLV_ALPN)
        #: ``PP2_TYPE_AUTHORITY``: the host name the client asked for (TLS
        #: SNI), or ``None`` (also when it is not printable UTF-8).
        self.authority: str | None = None
        if TLV_AUTHORITY in first:
            self.authority = _informational(_utf8, first[TLV_AUTHORITY], "authority TLV", problems)
        #: ``PP2_TYPE_CRC32C``: the checksum the header carried (already
        #: verified by the parser), or ``None``.
        self.crc32c: int | None = None
        if TLV_CRC32C in first:
            if len(first[TLV_CRC32C]) != 4:
                raise ProxyError("CRC32C TLV is not 4 octets")
            self.crc32c = int.from_bytes(first[TLV_CRC32C], "big")
        #: ``PP2_TYPE_UNIQUE_ID``: the proxy's id of the connection, or
        #: ``None`` (also when longer than the 128 octets allowed).
        self.unique_id: bytes | None = first.get(TLV_UNIQUE_ID)
        if self.unique_id is not None and len(self.unique_id) > 128:
            self.unique_id = None
            problems.append("unique-id TLV longer than 128 octets")
        #: ``PP2_TYPE_SSL`` decoded (:class:`ProxySSL`), or ``None`` (also
        #: when too short, or its sub-TLVs overrun it). A sub-TLV left out
        #: is named in :attr:`ProxySSL.problems` and in :attr:`problems`.
        self.ssl: ProxySSL | None = None
        if TLV_SSL in first:
            try:
                self.ssl = ProxySSL.parse(first[TLV_SSL])
            except ProxyError as exc:
                problems.append(str(exc))
            else:
                problems += self.ssl.problems
        #: ``PP2_TYPE_NETNS``: the network namespace the proxy accepted the
        #: connection in, or ``None`` (also when it is not printable ASCII).
        self.netns: str | None = None
        if TLV_NETNS in first:
            self.netns = _informational(_ascii, first[TLV_NETNS], "netns TLV", problems)
        #: Why known TLVs were left out, one short reason each (octets it
        #: quotes escaped); empty when none was.
        self.problems: tuple[str, ...] = tuple(problems)

    def __getitem__(self, kind: int) -> bytes:
        return self._first[kind]

    def __iter__(self) -> Iterator[int]:
        return iter(self._first)

    def __len__(self) -> int:
        return len(self._first)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ProxyTLVs):
            return self.raw == other.raw
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"ProxyTLVs({list(self.raw)!r})"


# ---------------------------------------------------------------- header
@dataclass(frozen=True)
class ProxyHeader:
    """A complete PROXY protocol header.

    For a ``PROXY`` command over TCP/IPv4 or IPv6 (:attr:`carries_addresses`)
    the source is the client and the destination the address it connected
    to (at the proxy). Otherwise — a ``LOCAL`` command (the proxy's own
    health check), version 1's ``UNKNOWN``, family ``UNSPEC`` or ``UNIX`` —
    the connection's own addresses are the ones to use.
    """

    version: int
    """``1`` (text) or ``2`` (binary)."""
    command: str = "PROXY"
    """``"PROXY"`` (a relayed connection) or ``"LOCAL"`` (version 2 only)."""
    family: str = "INET"
    """``"INET"``, ``"INET6"``, ``"UNIX"`` or ``"UNSPEC"`` (version 1's
    ``TCP4``, ``TCP6`` and ``UNKNOWN`` give ``INET``, ``INET6`` and
    ``UNSPEC``; a ``LOCAL`` command gives ``UNSPEC``)."""
    transport: str = "STREAM"
    """``"STREAM"``, ``"DGRAM"`` or ``"UNSPEC"``."""
    source: str = ""
    """The client's IP address (canonical text), or a Unix socket path;
    ``""`` when not given. An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``,
    the IPv4 client of a proxy listening on both IPv4 and IPv6) is given as
    the IPv4 address (``192.0.2.1``), the family staying ``"INET6"``."""
    source_port: int = 0
    destination: str = ""
    """The address the client connected to, like :attr:`source`."""
    destination_port: int = 0
    tlvs: ProxyTLVs = field(default_factory=ProxyTLVs)
    """Version 2's TLVs (empty for version 1)."""
    length: int = field(default=0, compare=False)
    """Octets the header took on the connection."""

    @property
    def carries_addresses(self) -> bool:
        """True when the header names the client's IP address and port (a
        ``PROXY`` command for ``INET`` or ``INET6``)."""
        return self.command == "PROXY" and self.family in ("INET", "INET6")

    def to_bytes(self) -> bytes:
        """Encode the header in its :attr:`version` (a CRC32C TLV, if there
        is one, gets the right checksum). For tests and for software that
        sends PROXY headers; raises :class:`ValueError` for what the
        version cannot say."""
        if self.version == 1:
            return self._v1()
        if self.version == 2:
            return self._v2()
        raise ValueError(f"no PROXY protocol version {self.version!r}")

    def _v1(self) -> bytes:
        if self.command != "PROXY" or self.tlvs:
            raise ValueError("version 1 has no LOCAL command and no TLVs")
        if self.family == "UNSPEC":
            return b"PROXY UNKNOWN\r\n"
        name = {"INET": "TCP4", "INET6": "TCP6"}.get(self.family)
        if name is None or self.transport != "STREAM":
            raise ValueError(f"version 1 cannot carry {self.family}/{self.transport}")
        source = _encoded_ip(self.family, self.source)
        destination = _encoded_ip(self.family, self.destination)
        line = (
            f"PROXY {name} {source} {destination} "
            f"{_port_value(self.source_port)} {_port_value(self.destination_port)}\r\n"
        )
        return line.encode("ascii")

    def _v2(self) -> bytes:
        command = {v: k for k, v in _COMMANDS.items()}[self.command]
        family = {v: k for k, v in _FAMILIES.items()}[self.family]
        transport = {v: k for k, v in _TRANSPORTS.items()}[self.transport]
        if self.command == "LOCAL":
            if self.family != "UNSPEC" or self.tlvs:
                raise ValueError("a LOCAL header is encoded with family UNSPEC and no TLVs")
            return V2_SIGNATURE + bytes([0x20, (family << 4) | transport, 0, 0])
        if self.family in ("INET", "INET6"):
            addresses = (
                _encoded_ip(self.family, self.source).packed
                + _encoded_ip(self.family, self.destination).packed
                + _port_value(self.source_port).to_bytes(2, "big")
                + _port_value(self.destination_port).to_bytes(2, "big")
            )
        elif self.family == "UNIX":
            addresses = _unix_path(self.source) + _unix_path(self.destination)
        else:
            addresses = b""
        tlvs = bytearray()
        crc_at = -1
        for kind, value in self.tlvs.raw:
            if kind == TLV_CRC32C and crc_at < 0:
                crc_at = 16 + len(addresses) + len(tlvs) + 3
                value = b"\0\0\0\0"
            tlvs += bytes([kind]) + len(value).to_bytes(2, "big") + value
        length = len(addresses) + len(tlvs)
        if length > 65535:
            raise ValueError("a version 2 header holds at most 65535 octets after its first 16")
        head = V2_SIGNATURE + bytes([0x20 | command, (family << 4) | transport])
        out = bytearray(head + length.to_bytes(2, "big") + addresses + tlvs)
        if crc_at >= 0:
            out[crc_at : crc_at + 4] = crc32c(out).to_bytes(4, "big")
        return bytes(out)


def _ip(family: str, text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == "INET":
        return ipaddress.IPv4Address(text)
    return ipaddress.IPv6Address(text)


def _encoded_ip(family: str, text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address to encode: an IPv4 address in an ``INET6`` header is
    written IPv4-mapped, as the parser gives such an address back."""
    if family == "INET6" and ":" not in text:
        return ipaddress.IPv6Address("::ffff:" + text)
    return _ip(family, text)


def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``address`` as the session's text: an IPv4-mapped IPv6 address as its
    IPv4 address (Python 3.11 writes ``::ffff:127.0.0.2`` as
    ``::ffff:7f00:2``, which logs, the ``Received:`` header and plugins would
    take for an IPv6 client)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _port_value(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"a port is 0..65535, not {port!r}")
    return port


def _unix_path(path: str) -> bytes:
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > _UNIX_PATH or b"\0" in raw:
        raise ValueError(f"a Unix socket path is at most {_UNIX_PATH} octets, without NUL")
    return raw.ljust(_UNIX_PATH, b"\0")


# ---------------------------------------------------------------- parsing
def parse_header(
    data: bytes | bytearray, max_length: int = MAX_LENGTH
) -> tuple[ProxyHeader, int] | None:
    """Parse the PROXY header at the start of ``data``.

    Returns ``(header, octets it took)``, or ``None`` when ``data`` is a
    valid beginning that needs more octets. Octets after the header are
    never looked at. Raises :class:`ProxyError` as soon as ``data`` cannot
    begin a valid header (so a client that speaks SMTP at once is found
    without waiting for a timeout), and for a version 2 header longer than
    ``max_length``.
    """
    if not data:
        return None
    first = data[0]
    if first == 0x50:  # "P"
        return _parse_v1(data)
    if first == 0x0D:
        return _parse_v2(data, max_length)
    raise ProxyError(f"not a PROXY header: {_excerpt(data)}")


def _parse_v1(data: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    n = min(len(data), len(_V1_PREFIX))
    if data[:n] != _V1_PREFIX[:n]:
        raise ProxyError(f"not a PROXY header: {_excerpt(data)}")
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        head = data[:V1_MAX_LENGTH]
        # A line feed or a control character can never be part of a valid
        # line: say so now rather than at the length limit or the timeout.
        body = head[:-1] if head.endswith(b"\r") else head
        if any(c < 0x20 or c > 0x7E for c in body):
            raise ProxyError("version 1 header with a control character or no CRLF")
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyError(f"version 1 header longer than {V1_MAX_LENGTH} octets")
        return None
    line = bytes(data[len(_V1_PREFIX) : end])
    if any(c < 0x20 or c > 0x7E for c in line):
        raise ProxyError("version 1 header with a control character")
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        # The rest of the line, whatever it says, is to be ignored.
        return ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", length=end + 2), end + 2
    parts = line.split(b" ")
    if len(parts) != 5:
        raise ProxyError("version 1 header is not 'PROXY TCP4|TCP6 src dst sport dport'")
    name, source, destination, sport, dport = parts
    if name == b"TCP4":
        family = "INET"
    elif name == b"TCP6":
        family = "INET6"
    else:
        raise ProxyError(f"version 1 header with unknown protocol {ascii(name[:16])}")
    return (
        ProxyHeader(
            1,
            "PROXY",
            family,
            "STREAM",
            _v1_address(family, source),
            _v1_port(sport),
            _v1_address(family, destination),
            _v1_port(dport),
            length=end + 2,
        ),
        end + 2,
    )


def _v1_address(family: str, text: bytes) -> str:
    pattern = _IPV4_TEXT if family == "INET" else _IPV6_TEXT
    if pattern.fullmatch(text):
        try:
            return _text(_ip(family, text.decode("ascii")))
        except ValueError:
            pass
    want = "IPv4" if family == "INET" else "IPv6"
    raise ProxyError(f"version 1 header with a bad {want} address {ascii(text[:48])}")


def _v1_port(text: bytes) -> int:
    if _PORT.fullmatch(text) and int(text) <= 65535:
        return int(text)
    raise ProxyError(f"version 1 header with a bad port {ascii(text[:8])}")


def _parse_v2(data: bytes | bytearray, max_length: int) -> tuple[ProxyHeader, int] | None:
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] != V2_SIGNATURE[:n]:
        raise ProxyError(f"not a PROXY header: {_excerpt(data)}")
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyError(f"version 2 signature with version {version}")
    if command not in _COMMANDS:
        raise ProxyError(f"version 2 header with unknown command 0x{command:x}")
    family, transport = data[13] >> 4, data[13] & 0x0F
    if family not in _FAMILIES or transport not in _TRANSPORTS:
        raise ProxyError(f"version 2 header with unknown family/transport 0x{data[13]:02x}")
    total = 16 + int.from_bytes(data[14:16], "big")
    if total > max_length:
        raise ProxyError(f"version 2 header of {total} octets (limit {max_length})")
    if len(data) < total:
        return None
    if _COMMANDS[command] == "LOCAL":
        # The receiver uses the connection's own addresses and discards the
        # rest of the block, family included.
        return ProxyHeader(2, "LOCAL", "UNSPEC", "UNSPEC", length=total), total
    fam = _FAMILIES[family]
    block = bytes(data[16:total])
    size = _ADDRESS_LENGTH[fam]
    if len(block) < size:
        raise ProxyError(f"version 2 {fam} header with {len(block)} octets for its addresses")
    source = destination = ""
    sport = dport = 0
    if fam == "INET":
        source = str(ipaddress.IPv4Address(block[0:4]))
        destination = str(ipaddress.IPv4Address(block[4:8]))
        sport, dport = int.from_bytes(block[8:10], "big"), int.from_bytes(block[10:12], "big")
    elif fam == "INET6":
        source = _text(ipaddress.IPv6Address(block[0:16]))
        destination = _text(ipaddress.IPv6Address(block[16:32]))
        sport, dport = int.from_bytes(block[32:34], "big"), int.from_bytes(block[34:36], "big")
    elif fam == "UNIX":
        source = _path_text(block[:_UNIX_PATH])
        destination = _path_text(block[_UNIX_PATH:size])
    tlvs = ProxyTLVs(_split_tlvs(block[size:], "version 2 header"))
    if tlvs.crc32c is not None:
        _check_crc(data[:total], 16 + size, tlvs.crc32c)
    header = ProxyHeader(
        2,
        "PROXY",
        fam,
        _TRANSPORTS[transport],
        source,
        sport,
        destination,
        dport,
        tlvs,
        length=total,
    )
    return header, total


def _path_text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _check_crc(header: bytes | bytearray, start: int, expected: int) -> None:
    """Verify the checksum: the CRC32C of the whole header with the first
    CRC32C TLV's value zeroed."""
    copy = bytearray(header)
    i = start
    while True:  # the TLVs were checked already: this finds the first CRC32C
        kind, length = copy[i], int.from_bytes(copy[i + 1 : i + 3], "big")
        if kind == TLV_CRC32C:
            copy[i + 3 : i + 7] = b"\0\0\0\0"
            break
        i += 3 + length
    if crc32c(copy) != expected:
        raise ProxyError("version 2 header with a wrong CRC32C checksum")


class ProxyParser:
    """Reads one PROXY header from a connection's first octets.

    Feed it what the socket gives, in pieces of any size, until
    :meth:`feed` returns the :class:`ProxyHeader`; the octets received after
    the header are then in :attr:`rest`, to be handed on unchanged::

        parser = ProxyParser()
        while (header := parser.feed(await read())) is None:
            pass
        smtp.receive_data(parser.rest)

    It holds at most the header and the piece that completed it.

    :arg max_length: the longest version 2 header accepted (default
        :data:`MAX_LENGTH`).
    :raises ProxyError: from :meth:`feed`, as soon as the octets cannot be
        a header.
    """

    __slots__ = ("max_length", "header", "rest", "_buf")

    def __init__(self, max_length: int = MAX_LENGTH) -> None:
        self.max_length = max_length
        #: The header, once complete.
        self.header: ProxyHeader | None = None
        #: The octets that followed the header, once it is complete.
        self.rest = b""
        self._buf = bytearray()

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Take ``data``; return the header once complete, else ``None``."""
        if self.header is not None:
            raise RuntimeError("the PROXY header is complete: hand the octets on")
        self._buf += data
        result = parse_header(self._buf, self.max_length)
        if result is None:
            return None
        header, length = result
        self.rest = bytes(self._buf[length:])
        self._buf = bytearray()
        self.header = header
        return header


# ------------------------------------------------------------- networks
def parse_networks(value: Any) -> tuple[IPNetwork, ...]:
    """``value`` (a list of CIDR strings, or networks) as networks; a bare
    address is that one host, and host bits must be zero (``10.0.0.1/8`` is
    refused as a probable typo). Raises :class:`ValueError` naming the item.

    >>> parse_networks(["127.0.0.0/8", "::1"])
    (IPv4Network('127.0.0.0/8'), IPv6Network('::1/128'))
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"must be a list of networks like '127.0.0.0/8', not {value!r}")
    out: list[IPNetwork] = []
    for i, item in enumerate(value):
        if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            out.append(unmapped(item))
            continue
        if not isinstance(item, str):
            raise ValueError(f"item {i} must be a network string, not {item!r}")
        try:
            out.append(network(item))
        except ValueError as exc:
            raise ValueError(f"item {i}, {item!r}, is not a network: {exc}") from None
    return tuple(out)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def network(text: str) -> IPNetwork:
    """The network a configuration writes as ``text`` (CIDR, or a bare
    address: that one host), strict (host bits after the prefix must be
    zero), an IPv4-mapped one as IPv4 (:func:`unmapped`). A zone index
    (``fe80::1%eth0``) is refused: networks are matched without one, so it
    would silently trust the same address on every link. Raises
    :class:`ValueError`."""
    if "%" in text:
        raise ValueError("a zone index (%...) is not supported")
    return unmapped(ipaddress.ip_network(text.strip(), strict=True))


def whole_families(networks: Iterable[IPNetwork]) -> list[tuple[str, list[IPNetwork]]]:
    """The address families (``"IPv4"``, ``"IPv6"``) of which ``networks``
    hold every address together though none holds them alone (``::/1`` and
    ``8000::/1``), each with its networks of that family: a list that trusts
    everyone, written so that a check for ``/0`` misses it."""
    nets = list(networks)
    out = []
    for version, family in ((4, "IPv4"), (6, "IPv6")):
        same = [n for n in nets if n.version == version]
        if all(n.prefixlen for n in same) and any(
            not c.prefixlen
            for c in ipaddress.collapse_addresses(same)  # type: ignore[type-var]
        ):
            out.append((family, same))
    return out


def unmapped(network: IPNetwork) -> IPNetwork:
    """``network`` as IPv4 when it is a network of IPv4-mapped IPv6
    addresses (``::ffff:127.0.0.0/104`` is ``127.0.0.0/8``): a client's
    mapped address is matched as IPv4 (:func:`address_in`), so a mapped
    network in a configuration would otherwise match nothing."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        if network.subnet_of(_MAPPED):
            base = int(network.network_address) & 0xFFFFFFFF
            return ipaddress.IPv4Network((base, network.prefixlen - 96))
    return network


def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address for network matching and counting, or ``None``
    if ``ip`` is not an address. An IPv4-mapped IPv6 address
    (``::ffff:192.0.2.1``) counts as IPv4; brackets and a zone index
    (``fe80::1%eth0``) are ignored."""
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_in(ip: str, networks: Iterable[IPNetwork]) -> bool:
    """True when the IP address ``ip`` is in one of ``networks``
    (:func:`client_address`); something that is not an address is in no
    network."""
    address = client_address(ip)
    if address is None:
        return False
    return any(address.version == net.version and address in net for net in networks)


def client_network(ip: str, ipv4_prefix: int = 32, ipv6_prefix: int = 128) -> str:
    """The network of the client at ``ip`` in CIDR form (``192.0.2.0/24``,
    ``2001:db8:1:2::/64``): its address (:func:`client_address`) with the host
    bits cleared, so that the hosts of one network count as one client; a
    full-length prefix gives the bare address. Something that is not an
    address is returned as it is (it still names one client)."""
    address = client_address(ip)
    if address is None:
        return ip
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    if prefix >= address.max_prefixlen:
        return str(address)
    return str(ipaddress.ip_network((address, prefix), strict=False))


# ---------------------------------------------------------------- XCLIENT
#: The ``XCLIENT`` attributes Bonzo takes, as advertised in EHLO.
XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN", "DESTADDR", "DESTPORT")

_HOSTNAME = re.compile(r"[\x21-\x7e]{1,255}")


class XClientError(ValueError):
    """An ``XCLIENT`` command that does not parse; ``str()`` is the text of
    the ``501 5.5.4`` reply."""


def xtext_decode(text: str) -> str:
    """Decode an ``XCLIENT`` attribute value: RFC 3461 xtext
    (:func:`bonzo.dsn.xtext_decode`) whose octets are read as UTF-8 (a login
    name may be non-ASCII). Raises :class:`ValueError`."""
    try:
        return dsn.xtext_decode(text).encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("xtext that is not UTF-8") from None


def _xclient_address(value: str) -> str:
    text = value[5:] if value[:5].upper() == "IPV6:" else value
    if "%" in text:
        # ipaddress takes a zone index of any characters (CR, LF, ESC in
        # xtext): never part of a client's address.
        raise XClientError("bad address")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise XClientError("bad address") from None
    if value[:5].upper() == "IPV6:" and address.version != 6:
        raise XClientError("bad address")
    return _text(address)


def _xclient_value(name: str, value: str) -> str:
    if name in ("ADDR", "DESTADDR"):
        return _xclient_address(value)
    if name in ("PORT", "DESTPORT"):
        if not (value.isascii() and value.isdigit()) or len(value) > 5 or int(value) > 65535:
            raise XClientError("bad port")
        return str(int(value))
    if name == "PROTO":
        proto = value.upper() if value.isascii() else ""
        # LMTP: what an LMTP proxy (Dovecot's) in front of an LMTP
        # listener says.
        if proto not in ("SMTP", "ESMTP", "LMTP"):
            raise XClientError("must be SMTP, ESMTP or LMTP")
        return proto
    if name in ("NAME", "HELO"):
        if not _HOSTNAME.fullmatch(value):
            raise XClientError("bad host name")
        return value
    # LOGIN: any printable text.
    if not value or len(value) > 255 or not value.isprintable():
        raise XClientError("bad login name")
    return value


def parse_xclient(arg: str) -> dict[str, str | None]:
    """Parse the argument of ``XCLIENT`` (Postfix's extension):
    ``name=value`` pairs separated by spaces, each value in xtext.

    Returns the attributes given, by upper-case name, each checked and
    normalised (an ``ADDR`` of ``IPV6:2001:db8::1`` gives ``2001:db8::1``,
    an IPv4-mapped ``::ffff:192.0.2.1`` gives ``192.0.2.1``, a ``PORT`` its
    decimal value, ``PROTO`` upper case); ``[UNAVAILABLE]``
    (the front-end does not know), or ``[TEMPUNAVAIL]`` for ``NAME``, gives
    ``None``. An
    attribute given twice keeps its last value.

    :raises XClientError: with the reply text (Postfix's wording).
    """
    if not arg.strip(" "):
        raise XClientError("Syntax: XCLIENT attribute=value...")
    out: dict[str, str | None] = {}
    for item in arg.split(" "):
        if not item:
            continue
        name, eq, raw = item.partition("=")
        key = name.upper() if name.isascii() else ""
        if not eq or key not in XCLIENT_ATTRIBUTES:
            raise XClientError(f"Bad XCLIENT attribute name: {ascii(name[:32])[1:-1]}")
        try:
            value = xtext_decode(raw)
        except ValueError:
            raise XClientError(f"Bad XCLIENT {key} syntax: bad xtext") from None
        # "[TEMPUNAVAIL]": a DNS lookup of the name failed for now.
        if value == "[UNAVAILABLE]" or (key == "NAME" and value == "[TEMPUNAVAIL]"):
            out[key] = None
            continue
        try:
            out[key] = _xclient_value(key, value)
        except XClientError as exc:
            raise XClientError(f"Bad XCLIENT {key} syntax: {exc}") from None
    return out

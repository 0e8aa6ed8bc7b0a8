"""The PROXY protocol parser and the XCLIENT attribute parser (bonzo.proxy),
and XCLIENT in the protocol core: bytes in, results out, no sockets.

Hypothesis properties: any split of a valid header parses the same; an
encoded header parses back to itself; random octets raise nothing but
ProxyError and never make the parser take octets past the header.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from protocol_helpers import EHLO, EHLO_REPLY, MAIL, Client

from bonzo.protocol import XClient
from bonzo.proxy import (
    MAX_LENGTH,
    TLV_ALPN,
    TLV_AUTHORITY,
    TLV_CRC32C,
    TLV_NETNS,
    TLV_NOOP,
    TLV_SSL,
    TLV_UNIQUE_ID,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    XCLIENT_ATTRIBUTES,
    ProxyError,
    ProxyHeader,
    ProxyParser,
    ProxySSL,
    ProxyTLVs,
    XClientError,
    address_in,
    crc32c,
    parse_header,
    parse_networks,
    parse_xclient,
    xtext_decode,
)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

with warnings.catch_warnings():  # see test_protocol_props.py
    warnings.simplefilter("ignore")
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # pragma: no cover
        pass


def v2(command: int, family: int, block: bytes) -> bytes:
    """A version 2 header with the given command, family/transport octet and block."""
    return V2_SIGNATURE + bytes([0x20 | command, family]) + len(block).to_bytes(2, "big") + block


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


INET_BLOCK = bytes([192, 0, 2, 1, 198, 51, 100, 25]) + (40000).to_bytes(2, "big") + b"\x00\x19"


def parsed(data: bytes) -> ProxyHeader:
    result = parse_header(data)
    assert result is not None
    header, length = result
    assert length == header.length
    return header


# ------------------------------------------------------------- version 1
def test_v1_tcp4():
    data = b"PROXY TCP4 192.0.2.1 198.51.100.25 40000 25\r\nEHLO x\r\n"
    header, length = parse_header(data)
    assert length == data.index(b"EHLO")
    assert header == ProxyHeader(
        1, "PROXY", "INET", "STREAM", "192.0.2.1", 40000, "198.51.100.25", 25
    )
    assert header.carries_addresses
    assert not header.tlvs


def test_v1_tcp6_is_canonical():
    header = parsed(b"PROXY TCP6 2001:DB8:0:0::1 ::1 1 65535\r\n")
    assert (header.family, header.source, header.destination) == ("INET6", "2001:db8::1", "::1")
    assert (header.source_port, header.destination_port) == (1, 65535)


@pytest.mark.parametrize(
    "line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"]
)
def test_v1_unknown_uses_the_connection_addresses(line):
    header = parsed(line)
    assert header.family == "UNSPEC" and not header.carries_addresses
    assert header.source == "" and header.length == len(line)


def test_v1_longest_header_is_107_octets():
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(line) == V1_MAX_LENGTH
    assert parsed(line).length == V1_MAX_LENGTH
    with pytest.raises(ProxyError, match="longer than 107"):
        parse_header(line[:-2] + b"x\r\n")
    # Found at 107 octets, whatever follows.
    with pytest.raises(ProxyError, match="longer than 107"):
        parse_header(b"PROXY UNKNOWN " + b"x" * 93)
    assert parse_header(b"PROXY UNKNOWN " + b"x" * 92) is None


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"EHLO client.example\r\n", "not a PROXY header: b'EHLO client.exam'"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY header"),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not 'PROXY TCP4|TCP6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "not 'PROXY TCP4|TCP6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "not 'PROXY TCP4|TCP6"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol b'TCP5'"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad IPv4 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.888 1 2\r\n", "bad IPv4 address"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad IPv4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad IPv6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "control character or no CRLF"),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "control character"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\r\n", "control character"),
    ],
)
def test_v1_errors(data, fragment):
    with pytest.raises(ProxyError) as info:
        parse_header(data)
    assert fragment in str(info.value)


@pytest.mark.parametrize("data", [b"P", b"PROXY", b"PROXY ", b"PROXY TCP4 1.2.3.4 ", b"PROXY X\r"])
def test_v1_beginnings_need_more(data):
    assert parse_header(data) is None


def test_an_error_never_quotes_raw_octets():
    with pytest.raises(ProxyError) as info:
        parse_header(b"\x1b[31mEVIL\r\n\x00")
    text = str(info.value)
    assert "\x1b" not in text and "\\x1b" in text and text.isprintable()


# ------------------------------------------------------------- version 2
def test_v2_inet():
    data = v2(1, 0x11, INET_BLOCK) + b"EHLO x\r\n"
    header, length = parse_header(data)
    assert length == 16 + 12
    assert header == ProxyHeader(
        2, "PROXY", "INET", "STREAM", "192.0.2.1", 40000, "198.51.100.25", 25
    )


def test_v2_inet6():
    block = ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("::1").packed
    header = parsed(v2(1, 0x21, block + b"\x01\x00\x00\x19"))
    assert (header.family, header.source, header.source_port) == ("INET6", "2001:db8::7", 256)
    assert (header.destination, header.destination_port) == ("::1", 25)
    assert header.carries_addresses


def test_ipv4_mapped_addresses_are_given_as_ipv4():
    # HAProxy bound to [::]:25 v4v6 names its IPv4 clients so; Python would
    # write ::ffff:127.0.0.2 as ::ffff:7f00:2.
    header = parsed(b"PROXY TCP6 ::ffff:127.0.0.2 ::ffff:127.0.0.1 40000 25\r\n")
    assert (header.family, header.source, header.destination) == ("INET6", "127.0.0.2", "127.0.0.1")
    block = (
        ipaddress.IPv6Address("::ffff:192.0.2.1").packed
        + ipaddress.IPv6Address("2001:db8::25").packed
        + b"\x9c\x40\x00\x19"
    )
    header = parsed(v2(1, 0x21, block))
    assert (header.source, header.destination) == ("192.0.2.1", "2001:db8::25")
    # Encoded again, such an address is written IPv4-mapped.
    assert header.to_bytes() == v2(1, 0x21, block)
    v1 = ProxyHeader(1, "PROXY", "INET6", "STREAM", "127.0.0.2", 1, "::1", 25).to_bytes()
    # (Python 3.13 writes it ::ffff:127.0.0.2, older ones ::ffff:7f00:2.)
    word, family, source, rest = v1.split(b" ", 3)
    assert (word, family, rest) == (b"PROXY", b"TCP6", b"::1 1 25\r\n")
    assert ipaddress.IPv6Address(source.decode()) == ipaddress.IPv6Address("::ffff:127.0.0.2")
    assert parsed(v1).source == "127.0.0.2"
    # An IPv4 address under TCP6 is still refused.
    with pytest.raises(ProxyError, match="bad IPv6 address"):
        parse_header(b"PROXY TCP6 127.0.0.2 ::1 1 25\r\n")


def test_v2_unix_and_unspec_carry_no_client_address():
    block = b"/run/client.sock".ljust(108, b"\0") + b"/run/bonzo.sock".ljust(108, b"\0")
    header = parsed(v2(1, 0x31, block))
    assert (header.family, header.source, header.destination) == (
        "UNIX",
        "/run/client.sock",
        "/run/bonzo.sock",
    )
    assert not header.carries_addresses
    header = parsed(v2(1, 0x00, tlv(TLV_AUTHORITY, b"mx.example.org")))
    assert header.family == "UNSPEC" and not header.carries_addresses
    assert header.tlvs.authority == "mx.example.org"


def test_v2_local_discards_its_block():
    # A health check: whatever the block says, the connection's addresses stand.
    header = parsed(v2(0, 0x11, INET_BLOCK + b"\xff\xff"))
    assert (header.command, header.family, header.source) == ("LOCAL", "UNSPEC", "")
    assert not header.carries_addresses and header.length == 16 + 14


def test_v2_tlvs():
    ssl_value = (
        b"\x07\x00\x00\x00\x00"
        + tlv(0x21, b"TLSv1.3")
        + tlv(0x22, "Jürgen".encode())
        + tlv(0x23, b"TLS_AES_256_GCM_SHA384")
        + tlv(0x24, b"SHA256")
        + tlv(0x25, b"RSA2048")
    )
    block = (
        INET_BLOCK
        + tlv(TLV_ALPN, b"smtp")
        + tlv(TLV_AUTHORITY, b"mx.example.org")
        + tlv(TLV_NOOP, b"\0\0\0")
        + tlv(TLV_UNIQUE_ID, b"x" * 128)
        + tlv(TLV_SSL, ssl_value)
        + tlv(TLV_NETNS, b"blue")
        + tlv(0xE0, b"\x00custom")
        + tlv(TLV_AUTHORITY, b"second.example")
    )
    tlvs = parsed(v2(1, 0x11, block)).tlvs
    assert tlvs.alpn == b"smtp" and tlvs.authority == "mx.example.org"
    assert tlvs.unique_id == b"x" * 128 and tlvs.netns == "blue"
    assert tlvs[0xE0] == b"\x00custom" and tlvs.get(0xE1) is None
    assert tlvs[TLV_AUTHORITY] == b"mx.example.org"  # the first of a type
    assert [k for k, _ in tlvs.raw].count(TLV_AUTHORITY) == 2
    assert len(tlvs) == 7 and set(tlvs) == {1, 2, 4, 5, 0x20, 0x30, 0xE0}
    ssl = tlvs.ssl
    assert ssl == ProxySSL(
        client=7,
        verify=0,
        version="TLSv1.3",
        cn="Jürgen",
        cipher="TLS_AES_256_GCM_SHA384",
        sig_alg="SHA256",
        key_alg="RSA2048",
        tlvs=ssl.tlvs,
    )
    assert ssl.tls and ssl.verified and len(ssl.tlvs) == 5
    unverified = ProxySSL.parse(b"\x01\x00\x00\x00\x01")
    assert unverified.tls and not unverified.verified and unverified.version is None


def test_v2_crc32c_is_checked():
    assert crc32c(b"123456789") == 0xE3069283  # the RFC 3720 check value
    header = ProxyHeader(
        2, source="192.0.2.1", destination="198.51.100.25", destination_port=25,
        tlvs=ProxyTLVs([(TLV_ALPN, b"smtp"), (TLV_CRC32C, b"\0\0\0\0")]),
    )  # fmt: skip
    data = header.to_bytes()
    good = parsed(data)
    assert good.tlvs.crc32c == int.from_bytes(data[-4:], "big")
    broken = bytearray(data)
    broken[-1] ^= 1
    with pytest.raises(ProxyError, match="wrong CRC32C"):
        parse_header(bytes(broken))
    # A changed address is caught too.
    broken = bytearray(data)
    broken[16] ^= 1
    with pytest.raises(ProxyError, match="wrong CRC32C"):
        parse_header(bytes(broken))


@pytest.mark.parametrize(
    "data, fragment",
    [
        (V2_SIGNATURE[:5] + b"X", "not a PROXY header"),
        (V2_SIGNATURE + b"\x11\x11\x00\x00", "with version 1"),
        (V2_SIGNATURE + b"\x22\x11\x00\x00", "unknown command 0x2"),
        (V2_SIGNATURE + b"\x21\x41\x00\x00", "unknown family/transport 0x41"),
        (V2_SIGNATURE + b"\x21\x13\x00\x00", "unknown family/transport 0x13"),
        (V2_SIGNATURE + b"\x21\x11\x10\x00", f"of 4112 octets (limit {MAX_LENGTH})"),
        (v2(1, 0x11, INET_BLOCK[:11]), "with 11 octets for its addresses"),
        (v2(1, 0x21, INET_BLOCK), "INET6 header with 12 octets"),
        (v2(1, 0x11, INET_BLOCK + b"\x01\x00"), "truncated TLV"),
        (v2(1, 0x11, INET_BLOCK + b"\x01\x00\x05abc"), "TLV 0x01 of 5 octets overruns"),
        (v2(1, 0x11, INET_BLOCK + tlv(TLV_CRC32C, b"\0\0\0")), "CRC32C TLV is not 4"),
    ],
)
def test_v2_errors(data, fragment):
    with pytest.raises(ProxyError) as info:
        parse_header(data)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "item, attribute, problem",
    [
        # What the client chose: the server name it asked for (TLS SNI)...
        (tlv(TLV_AUTHORITY, b"mx\xfftest"), "authority", "authority TLV is not UTF-8"),
        (tlv(TLV_AUTHORITY, b"mx\x01test"), "authority", "authority TLV has control characters"),
        (tlv(TLV_AUTHORITY, b"a\nb"), "authority", "authority TLV has control characters"),
        # ...and the proxy's own facts, malformed, are no reason either.
        (tlv(TLV_UNIQUE_ID, b"x" * 129), "unique_id", "unique-id TLV longer than 128 octets"),
        (tlv(TLV_SSL, b"\x01\x00"), "ssl", "SSL TLV shorter than 5 octets"),
        (tlv(TLV_SSL, b"\x01\0\0\0\0" + b"\x21\x00"), "ssl", "SSL TLV: truncated TLV"),
        (tlv(TLV_NETNS, "é".encode()), "netns", "netns TLV is not ASCII"),
        (tlv(TLV_NETNS, b"blue\x1b"), "netns", "netns TLV has control characters"),
    ],
)
def test_a_malformed_informational_tlv_is_left_out(item, attribute, problem):
    header = parsed(v2(1, 0x11, INET_BLOCK + item + tlv(TLV_ALPN, b"smtp")))
    assert (header.source, header.source_port) == ("192.0.2.1", 40000)
    tlvs = header.tlvs
    assert getattr(tlvs, attribute) is None and tlvs.alpn == b"smtp"
    assert len(tlvs.problems) == 1 and tlvs.problems[0].startswith(problem)
    assert tlvs[item[0]] == item[3:]  # the octets stay, for a plugin that wants them
    assert all(p.isprintable() and p.isascii() for p in tlvs.problems)


def test_a_malformed_ssl_sub_tlv_is_left_out():
    # The client's certificate supplies the CN, and the algorithms: one that
    # is not printable leaves the rest of the SSL facts in place.
    ssl_value = (
        b"\x07\x00\x00\x00\x00"
        + tlv(0x21, b"TLSv1.3")
        + tlv(0x22, b"bad\xffcn")
        + tlv(0x22, b"second")
        + tlv(0x24, "SHA256é".encode())
    )
    tlvs = parsed(v2(1, 0x11, INET_BLOCK + tlv(TLV_SSL, ssl_value))).tlvs
    ssl = tlvs.ssl
    assert ssl is not None and ssl.version == "TLSv1.3" and ssl.verified
    assert (ssl.cn, ssl.sig_alg) == (None, None)  # the first CN counts, as for every type
    assert ssl.problems == ("SSL client CN is not UTF-8", "SSL sub-TLV 0x24 is not ASCII")
    assert tlvs.problems == ssl.problems
    assert len(ssl.tlvs) == 4


def test_v2_a_long_header_is_refused_before_it_arrives():
    # The length field says too much: refused with 16 octets in hand.
    with pytest.raises(ProxyError):
        parse_header(V2_SIGNATURE + b"\x21\x11\xff\xff")
    assert parse_header(V2_SIGNATURE + b"\x21\x11\x0f\xf0", max_length=65551) is None


@pytest.mark.parametrize("n", range(1, 16))
def test_v2_beginnings_need_more(n):
    assert parse_header(v2(1, 0x11, INET_BLOCK)[:n]) is None


# ------------------------------------------------------------ the parser
def test_parser_hands_on_what_follows():
    parser = ProxyParser()
    assert parser.feed(b"PROXY TCP4 192.0.2.1 ") is None
    assert parser.rest == b"" and parser.header is None
    header = parser.feed(b"198.51.100.25 40000 25\r\n\x16\x03\x01TLS hello")
    assert header is not None and parser.header is header
    assert parser.rest == b"\x16\x03\x01TLS hello"
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


def test_parser_error_at_once():
    with pytest.raises(ProxyError):
        ProxyParser().feed(b"EHLO")


# ------------------------------------------------------------- encoding
def test_encoding_errors():
    with pytest.raises(ValueError):
        ProxyHeader(1, "LOCAL", "UNSPEC").to_bytes()
    with pytest.raises(ValueError):
        ProxyHeader(1, family="UNIX").to_bytes()
    with pytest.raises(ValueError):
        ProxyHeader(1, source="::1", destination="::1").to_bytes()
    with pytest.raises(ValueError):
        ProxyHeader(2, source="1.2.3.4", destination="1.2.3.4", source_port=70000).to_bytes()
    with pytest.raises(ValueError):
        ProxyHeader(3).to_bytes()
    with pytest.raises(ValueError):
        ProxyHeader(2, family="UNIX", source="x" * 109).to_bytes()
    assert ProxyHeader(1, family="UNSPEC").to_bytes() == b"PROXY UNKNOWN\r\n"


# ------------------------------------------------------------ properties
PORTS = st.integers(0, 65535)


def ip_pair(version: int) -> st.SearchStrategy[tuple[str, str]]:
    return st.tuples(st.ip_addresses(v=version).map(str), st.ip_addresses(v=version).map(str))


@st.composite
def ssl_values(draw: st.DrawFn) -> bytes:
    subs = draw(
        st.lists(
            st.one_of(
                st.tuples(
                    st.sampled_from([0x21, 0x23, 0x24, 0x25]), st.text("ABCTLSv1.3_-", max_size=20)
                ),
                st.tuples(
                    st.just(0x22), st.text(st.characters(categories=["L", "N"]), max_size=20)
                ),
            ),
            max_size=4,
        )
    )
    head = bytes([draw(st.integers(0, 7))]) + draw(st.binary(min_size=4, max_size=4))
    return head + b"".join(tlv(k, v.encode()) for k, v in subs)


TLV_ITEMS = st.one_of(
    st.tuples(st.just(TLV_ALPN), st.binary(max_size=16)),
    st.tuples(
        st.just(TLV_AUTHORITY),
        st.text(st.characters(categories=["L", "N", "P"]), max_size=30).map(str.encode),
    ),
    st.tuples(st.just(TLV_CRC32C), st.just(b"\0\0\0\0")),
    st.tuples(st.just(TLV_NOOP), st.binary(max_size=8)),
    st.tuples(st.just(TLV_UNIQUE_ID), st.binary(max_size=128)),
    st.tuples(st.just(TLV_SSL), ssl_values()),
    st.tuples(st.just(TLV_NETNS), st.text("abc-_0", max_size=10).map(str.encode)),
    st.tuples(st.integers(0xE0, 0xFF), st.binary(max_size=40)),
)


@st.composite
def headers(draw: st.DrawFn) -> ProxyHeader:
    version = draw(st.sampled_from([1, 2]))
    if version == 1:
        family = draw(st.sampled_from(["INET", "INET6", "UNSPEC"]))
        if family == "UNSPEC":
            return ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC")
        source, destination = draw(ip_pair(4 if family == "INET" else 6))
        return ProxyHeader(
            1, "PROXY", family, "STREAM", source, draw(PORTS), destination, draw(PORTS)
        )
    if draw(st.booleans()) and draw(st.booleans()):
        return ProxyHeader(2, "LOCAL", "UNSPEC", "UNSPEC")
    family = draw(st.sampled_from(["INET", "INET6", "UNIX", "UNSPEC"]))
    transport = draw(st.sampled_from(["STREAM", "DGRAM", "UNSPEC"]))
    tlvs = ProxyTLVs(draw(st.lists(TLV_ITEMS, max_size=6)))
    if family in ("INET", "INET6"):
        source, destination = draw(ip_pair(4 if family == "INET" else 6))
        sport, dport = draw(PORTS), draw(PORTS)
    elif family == "UNIX":
        paths = st.binary(max_size=108).filter(lambda b: b"\0" not in b)
        source, destination = (
            p.decode("utf-8", "surrogateescape") for p in draw(st.tuples(paths, paths))
        )
        sport = dport = 0
    else:
        source = destination = ""
        sport = dport = 0
    return ProxyHeader(2, "PROXY", family, transport, source, sport, destination, dport, tlvs)


def unmapped_text(ip: str) -> str:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped) if mapped is not None else ip


@PROPS
@given(headers(), st.binary(max_size=40))
def test_encoding_then_parsing_gives_the_header_back(header, tail):
    data = header.to_bytes()
    result = parse_header(data + tail)
    assert result is not None
    back, length = result
    assert length == len(data) == back.length
    # The checksum is computed when encoding: compare the encodings, and
    # everything else field by field.
    assert back.to_bytes() == data
    if header.family in ("INET", "INET6"):
        # An IPv4-mapped address comes back as IPv4.
        header = dataclasses.replace(
            header,
            source=unmapped_text(header.source),
            destination=unmapped_text(header.destination),
        )
    if TLV_CRC32C not in header.tlvs:
        assert back == header
    else:
        assert back.tlvs.crc32c == int.from_bytes(back.tlvs[TLV_CRC32C], "big")
        assert (back.source, back.destination_port) == (header.source, header.destination_port)


@PROPS
@given(headers(), st.binary(max_size=40), st.data())
def test_any_split_parses_the_same(header, tail, data):
    stream = header.to_bytes() + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = ProxyParser()
    result = None
    start = 0
    for end in [*cuts, len(stream)]:
        result = parser.feed(stream[start:end])
        start = end
        if result is not None:
            break
    assert result is not None
    expected, length = parse_header(stream)
    assert result == expected and result.to_bytes() == header.to_bytes()
    # Everything after the header is handed on, in order, untouched.
    assert parser.rest + stream[start:] == tail


PREFIXES = st.sampled_from(
    [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY UNKNOWN", V2_SIGNATURE, V2_SIGNATURE + b"\x21"]
)


@PROPS
@given(PREFIXES, st.binary(max_size=300))
def test_random_octets_raise_nothing_but_proxy_error(prefix, noise):
    data = prefix + noise
    try:
        result = parse_header(data)
    except ProxyError as exc:
        assert str(exc).isprintable()
        return
    if result is not None:
        header, length = result
        assert 0 < length <= len(data) and header.length == length
        # What follows the header is not part of it: the same header comes
        # from the header's octets alone.
        assert parse_header(data[:length]) == result


@PROPS
@given(headers(), st.integers(0, 10_000), st.integers(1, 255), st.binary(max_size=20))
def test_a_damaged_header_never_takes_more_than_it_says(header, where, xor, tail):
    data = bytearray(header.to_bytes())
    data[where % len(data)] ^= xor
    try:
        result = parse_header(bytes(data) + tail)
    except ProxyError:
        return
    if result is not None:
        assert result[1] <= len(data) + len(tail)
        assert parse_header(bytes(data + tail)[: result[1]]) == result


# --------------------------------------------------------------- networks
def test_parse_networks_and_address_in():
    nets = parse_networks(["127.0.0.0/8", "2001:db8::/32", " 192.0.2.7 "])
    assert address_in("127.1.2.3", nets) and address_in("192.0.2.7", nets)
    assert address_in("::ffff:127.0.0.1", nets)  # IPv4-mapped counts as IPv4
    assert address_in("2001:db8::1", nets) and address_in("2001:db8::1%eth0", nets)
    assert not address_in("192.0.2.8", nets) and not address_in("::1", nets)
    assert not address_in("0.0.0.0", nets) and not address_in("not an ip", nets)
    assert not address_in("127.0.0.1", ())


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("127.0.0.0/8", "must be a list"),
        (5, "must be a list"),
        ([5], "item 0 must be a network string"),
        (["127.0.0.0/8", "10.0.0.1/8"], "item 1, '10.0.0.1/8', is not a network: "),
        (["example.org"], "is not a network"),
        (["300.0.0.0/8"], "is not a network"),
    ],
)
def test_parse_networks_errors(value, fragment):
    with pytest.raises(ValueError) as info:
        parse_networks(value)
    assert fragment in str(info.value)


# ---------------------------------------------------------------- XCLIENT
def test_xtext():
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    assert xtext_decode("J+C3+BCrgen") == "Jürgen"
    assert xtext_decode("") == ""
    # Lower-case hex digits are read (as for DSN parameters: unambiguous).
    assert xtext_decode("a+2b") == "a+"
    for bad in ("a+2", "a=b", "a b", "é", "+FF"):
        with pytest.raises(ValueError):
            xtext_decode(bad)


def test_parse_xclient():
    attrs = parse_xclient(
        "addr=IPV6:2001:DB8::1 PORT=00025 NAME=client.example.org PROTO=esmtp "
        "HELO=[UNAVAILABLE] LOGIN=j+C3+BCrgen DESTADDR=192.0.2.25 DESTPORT=587"
    )
    assert attrs == {
        "ADDR": "2001:db8::1",
        "PORT": "25",
        "NAME": "client.example.org",
        "PROTO": "ESMTP",
        "HELO": None,
        "LOGIN": "jürgen",
        "DESTADDR": "192.0.2.25",
        "DESTPORT": "587",
    }
    assert parse_xclient("NAME=[TEMPUNAVAIL]  ADDR=192.0.2.1 ADDR=192.0.2.2") == {
        "NAME": None,
        "ADDR": "192.0.2.2",
    }
    assert set(XCLIENT_ATTRIBUTES) >= set(attrs)


def test_parse_xclient_gives_an_ipv4_mapped_address_as_ipv4():
    assert parse_xclient("ADDR=::ffff:127.0.0.2 DESTADDR=IPV6:::FFFF:192.0.2.25") == {
        "ADDR": "127.0.0.2",
        "DESTADDR": "192.0.2.25",
    }
    assert parse_xclient("ADDR=::ffff:7f00:2")["ADDR"] == "127.0.0.2"


@pytest.mark.parametrize(
    "arg, text",
    [
        ("", "Syntax: XCLIENT attribute=value..."),
        ("FOO=1", "Bad XCLIENT attribute name: FOO"),
        ("ADDR", "Bad XCLIENT attribute name: ADDR"),
        ("ADDR=999.1.1.1", "Bad XCLIENT ADDR syntax: bad address"),
        ("ADDR=IPV6:192.0.2.1", "Bad XCLIENT ADDR syntax: bad address"),
        # A zone index would take any characters, CR and LF included (xtext).
        ("ADDR=::1%+0D+0A250+20fake", "Bad XCLIENT ADDR syntax: bad address"),
        ("ADDR=IPV6:fe80::1%eth0", "Bad XCLIENT ADDR syntax: bad address"),
        ("DESTADDR=::1%x+1B[31m", "Bad XCLIENT DESTADDR syntax: bad address"),
        ("ADDR=", "Bad XCLIENT ADDR syntax"),
        ("PORT=65536", "Bad XCLIENT PORT syntax: bad port"),
        ("DESTPORT=-1", "Bad XCLIENT DESTPORT syntax"),
        ("PROTO=UUCP", "Bad XCLIENT PROTO syntax: must be SMTP, ESMTP or LMTP"),
        ("HELO=a+20b", "Bad XCLIENT HELO syntax: bad host name"),
        ("LOGIN=a+0Ab", "Bad XCLIENT LOGIN syntax: bad login name"),
        ("LOGIN=a+2", "Bad XCLIENT LOGIN syntax: bad xtext"),
        ("ADDR=[TEMPUNAVAIL]", "Bad XCLIENT ADDR syntax"),
        ("N\u00c4ME=x", "Bad XCLIENT attribute name: N\\xc4ME"),
    ],
)
def test_parse_xclient_errors(arg, text):
    with pytest.raises(XClientError) as info:
        parse_xclient(arg)
    assert str(info.value).startswith(text)


# ------------------------------------------------------ XCLIENT in the core
def trusted_client() -> Client:
    client = Client()
    client.proto.xclient_allowed = True
    return client


def test_xclient_is_advertised_only_to_a_trusted_client():
    assert Client().send(EHLO) == EHLO_REPLY
    reply = trusted_client().send(EHLO)
    assert reply.startswith(EHLO_REPLY.replace(b"250 HELP", b"250-HELP"))
    assert reply.endswith(b"\r\n250 XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT\r\n")


def test_xclient_from_an_untrusted_client():
    client = Client()
    assert client.send(EHLO, b"XCLIENT ADDR=192.0.2.9\r\n").endswith(
        b"550 5.7.0 Error: insufficient authorization\r\n"
    )
    assert client.events == [client.events[0]]  # the EHLO only
    assert client.refusals[-1][:3] == ("XCLIENT", 550, "5.7.0")


def test_xclient_syntax_and_order():
    client = trusted_client()
    client.send(EHLO)
    assert client.send(b"XCLIENT FOO=bar\r\n") == b"501 5.5.4 Bad XCLIENT attribute name: FOO\r\n"
    assert client.send(b"XCLIENT\r\n") == b"501 5.5.4 Syntax: XCLIENT attribute=value...\r\n"
    client.send(MAIL)
    assert client.send(b"XCLIENT ADDR=192.0.2.9\r\n") == (
        b"503 5.5.1 Error: MAIL transaction in progress\r\n"
    )


def test_accepted_xclient_starts_the_session_over():
    client = trusted_client()
    client.send(EHLO)
    reply = client.send(b"XCLIENT ADDR=192.0.2.9 LOGIN=alice HELO=c.example\r\n")
    assert reply == b"220 mx.example.org ESMTP\r\n"
    event = client.events[-1]
    assert isinstance(event, XClient)
    assert event.attributes == {"ADDR": "192.0.2.9", "LOGIN": "alice", "HELO": "c.example"}
    proto = client.proto
    assert proto.helo is None and not proto.esmtp and proto.authenticated == "alice"
    # The client must say EHLO again.
    assert client.send(MAIL) == b"503 5.5.1 Error: need HELO command\r\n"
    assert client.send(EHLO).startswith(b"250-mx.example.org Hello")
    assert client.send(b"XCLIENT LOGIN=[UNAVAILABLE]\r\n") == b"220 mx.example.org ESMTP\r\n"
    assert proto.authenticated is None

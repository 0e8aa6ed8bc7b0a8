"""Property tests of the sans-IO SMTP core (hypothesis).

(a) Any input gives one reply per complete command line, or a clean close,
    and never an exception.
(b) How the bytes are cut into receive_data() calls changes nothing.
(c) Dot-stuffed message bodies round-trip exactly.
(d) parse_path round-trips valid paths and raises nothing but AddressError.
"""

from __future__ import annotations

import re
import warnings

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from protocol_helpers import (
    DATA,
    EHLO,
    TXN,
    Client,
    default_decision,
    dot_stuff,
    split_replies,
)

from bonzo.address import Address, canonical_domain
from bonzo.errors import SMTPError
from bonzo.protocol import (
    AddressError,
    Data,
    MessageComplete,
    parse_address,
    parse_domain,
    parse_path,
)

# Every test here runs with the C DATA scan and with the pure-Python one.
pytestmark = pytest.mark.usefixtures("scan_implementation")

PROPS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# When a test fails, hypothesis imports libcst to write a patch, and libcst
# raises a DeprecationWarning on import; with warnings as errors that turns
# the failure report into an INTERNALERROR. Import it once here, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # pragma: no cover - libcst not installed
        pass

MODES = st.sampled_from(["normalize", "reject", "allow"])

COMMANDS = [
    b"EHLO c.example",
    b"HELO c.example",
    b"ehlo",
    b"MAIL FROM:<a@example.org>",
    b"MAIL FROM:<>",
    b"MAIL FROM:<a@example.org> SIZE=10 BODY=8BITMIME",
    b"MAIL FROM:<\xc3\xa9@example.org> SMTPUTF8",
    b"MAIL FROM:<a@example.org> FOO=1",
    b"RCPT TO:<b@example.net>",
    b"RCPT TO:<postmaster>",
    b"RCPT TO:<@r.example:b@example.net>",
    b"RCPT TO:<\xc3\xa9@example.net>",
    b"DATA",
    b"DATA x",
    b"RSET",
    b"NOOP",
    b"NOOP x",
    b"VRFY x",
    b"HELP",
    b"QUIT",
    b"XFOO bar",
    b"",
    b"   ",
    b"\xff",
    b"NOOP \x00",
    b"MAIL FROM:<a@example.org>" + b" " * 700,
    b"NOOP " + b"x" * 3000,
]

REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")


def _no_bdat(line: bytes) -> bytes:
    # BDAT makes the core swallow the announced octets; keep it out of the
    # one-reply-per-line count (it has tests of its own).
    return b"X" + line if line.lstrip(b" ")[:4].upper() == b"BDAT" else line


command_lines = st.lists(
    st.one_of(
        st.sampled_from(COMMANDS),
        st.binary(max_size=40).map(lambda b: _no_bdat(b.replace(b"\n", b""))),
    ),
    max_size=40,
)


def _refuse_data(proto, event):
    if isinstance(event, Data):
        return SMTPError(554, "No data today", enhanced_code="5.3.0")
    return default_decision(proto, event)


def _well_formed(replies: bytes) -> None:
    assert REPLY_LINE.sub(b"", replies) == b"", replies


# ----------------------------------------------------------------------- (a)
@PROPS
@given(lines=command_lines, endings=st.lists(st.sampled_from([b"\r\n", b"\n"])), mode=MODES)
def test_one_reply_per_command_line_or_a_clean_close(lines, endings, mode):
    client = Client(decide=_refuse_data, bare_newline=mode)
    for n, line in enumerate(lines):
        ending = endings[n % len(endings)] if endings else b"\r\n"
        replies = client.send(line + ending)
        _well_formed(replies)
        if client.closed:
            assert len(split_replies(replies)) == 1
            assert replies[:3] in (b"221", b"421")
            assert client.send(b"NOOP\r\n") == b""
            return
        assert len(split_replies(replies)) == 1, (line, replies)
    # A partial last line is never answered.
    assert client.send(b"NOOP") == b""


chunky_bytes = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"\r\n",
                b"\r",
                b"\n",
                b".",
                b"\r\n.\r\n",
                b"\r\n..",
                b"a",
                b" ",
                b"x" * 700,
                b"y" * 1100,
                b"\xff",
                b"\x00",
                b"EHLO c\r\n",
                b"MAIL FROM:<a@example.org>\r\n",
                b"RCPT TO:<b@example.net>\r\n",
                b"DATA\r\n",
                b"RSET\r\n",
                b"BDAT 4\r\n",
            ]
        ),
        st.binary(max_size=20),
    ),
    max_size=60,
).map(b"".join)

OPENINGS = st.sampled_from(
    [b"", EHLO, EHLO + TXN] + [EHLO + TXN + DATA] * 3 + [b"HELO c\r\n" + TXN + DATA] * 2
)
ENDS = st.sampled_from([b"\r\n.\r\n", b"\r\n.\r\n", b".\r\n", b"\n.\n", b""])


def _cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _run(pieces: list[bytes], **settings_: object) -> tuple[bytes, Client]:
    client = Client(**settings_)
    out = b""
    for piece in pieces:
        replies = client.send(piece)
        _well_formed(replies)
        if client.closed:
            assert client.send(b"NOOP\r\n") == b""
        out += replies
    return out, client


def _outcome(client: Client) -> tuple:
    events = [
        (MessageComplete, e.error and e.error.status_code) if isinstance(e, MessageComplete) else e
        for e in client.events
    ]
    accepted = [m for m, e in zip(client.messages, client.message_errors, strict=True) if e is None]
    return events, accepted, client.closed


LIMITS = st.fixed_dictionaries(
    {
        "bare_newline": MODES,
        "max_message_size": st.sampled_from([0, 30, 3000]),
        "max_data_line": st.sampled_from([1000, 8192]),
        "max_errors": st.sampled_from([5, 20]),
        "max_unknown_commands": st.sampled_from([2, 10]),
    }
)


# ------------------------------------------------------------------- (a)+(b)
@settings(PROPS, max_examples=1000)
@given(
    opening=OPENINGS,
    body=chunky_bytes,
    end=ENDS,
    tail=chunky_bytes,
    points=st.lists(st.integers(min_value=0), max_size=12),
    limits=LIMITS,
)
def test_chunking_changes_nothing(opening, body, end, tail, points, limits):
    stream = opening + body + end + tail
    whole, ref = _run([stream], **limits)
    cut, client = _run(_cut(stream, points), **limits)
    assert cut == whole
    assert _outcome(client) == _outcome(ref)
    bytewise, client = _run([stream[i : i + 1] for i in range(len(stream))], **limits)
    assert bytewise == whole
    assert _outcome(client) == _outcome(ref)


@PROPS
@given(data=st.binary(max_size=400), points=st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_in_data_never_raise(data, points):
    whole, ref = _run([EHLO + TXN + DATA + data])
    cut, client = _run(_cut(EHLO + TXN + DATA + data, points))
    assert cut == whole
    assert _outcome(client) == _outcome(ref)


# ----------------------------------------------------------------------- (c)
body_lines = st.lists(
    st.one_of(
        st.sampled_from([b"", b".", b"..", b".x", b". ", b"From x", b"..\x00."]),
        st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    ),
    max_size=40,
)


@PROPS
@given(lines=body_lines, points=st.lists(st.integers(min_value=0), max_size=10))
def test_dot_stuffed_bodies_round_trip(lines, points):
    body = b"".join(line + b"\r\n" for line in lines)
    stream = EHLO + TXN + DATA + dot_stuff(body) + b".\r\nNOOP\r\n"
    replies, client = _run(_cut(stream, points))
    assert client.messages == [body]
    assert client.message_errors == [None]
    assert replies.endswith(b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n")


# ----------------------------------------------------------------------- (d)
ATEXT = "abcXYZ0189!#$%&'*+/=?^_`{|}~-"
atom = st.text(alphabet=ATEXT, min_size=1, max_size=10)
dot_atom = st.lists(atom, min_size=1, max_size=4).map(".".join)
quoted = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
)
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
domain = st.one_of(
    st.lists(label, min_size=1, max_size=4).map(".".join),
    # Address literals as RFC 5321 4.1.3 has them (others are refused).
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip}]"),
    st.from_regex(r"\[x-[a-z0-9]{1,6}:[0-9a-f:.]{1,12}\]", fullmatch=True),
)
param = st.one_of(
    st.tuples(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,8}", fullmatch=True), st.none()),
    st.tuples(
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,8}", fullmatch=True),
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1).filter(
            lambda v: "=" not in v
        ),
    ),
)


@PROPS
@given(
    local=st.one_of(dot_atom, quoted),
    dom=domain,
    params=st.lists(param, max_size=4, unique_by=lambda kv: kv[0].upper()),
    brackets=st.booleans(),
    sender=st.booleans(),
)
def test_parse_path_round_trips(local, dom, params, brackets, sender):
    address = f"{local}@{dom}"
    if len(local) > 64 or len(address) + 2 > 256:
        return
    if not brackets and (local.startswith('"') or " " in address):
        brackets = True  # only the bracketed form can carry a quoted local part
    text = f"<{address}>" if brackets else address
    text += "".join(f" {k}={v}" if v is not None else f" {k}" for k, v in params)
    got, got_params = parse_path(text, sender=sender)
    assert got.original == address
    assert got_params == {k.upper(): v for k, v in params}
    # The canonical form is a fixed point: parsing it gives it back.
    canonical = got.canonical
    again, _ = parse_path(f"<{canonical}>", sender=sender)
    assert again.canonical == canonical
    assert got.domain.isascii()
    assert got.domain.startswith("[") or got.domain == got.domain.lower()


@PROPS
@given(text=st.text(max_size=80), sender=st.booleans(), utf8=st.booleans())
def test_parse_path_raises_only_address_error(text, sender, utf8):
    try:
        address, params = parse_path(text, sender=sender, smtputf8=utf8)
    except AddressError as exc:
        assert 500 <= exc.reply.status_code < 600
        assert exc.reply.enhanced_code
    else:
        original = address.original
        assert isinstance(original, str) and isinstance(params, dict)
        assert original or sender
        assert len(original.encode()) <= 254
        assert utf8 or original.isascii()
        # Whatever was accepted has a canonical form, with an ASCII domain.
        assert address.domain.isascii()


@PROPS
@given(text=st.text(alphabet='<>@":\\ ,.aZ9[]=\x00é', max_size=40), sender=st.booleans())
def test_parse_path_on_punctuation_soup(text, sender):
    try:
        parse_path(text, sender=sender, smtputf8=True)
    except AddressError as exc:
        assert exc.reply.status_code in (501, 553, 555)


# An address or domain a person wrote in a table is checked as a client's is.
@PROPS
@given(local=st.one_of(dot_atom, quoted), dom=domain)
def test_parse_address_agrees_with_rcpt(local, dom):
    address = f"{local}@{dom}"
    try:
        expected, _ = parse_path(f"<{address}>", sender=False, smtputf8=True)
    except AddressError:
        with pytest.raises(ValueError):
            parse_address(address)
        return
    got = parse_address(f"  {address} ")
    assert got.canonical == expected.canonical
    assert parse_domain(dom) == expected.domain


@PROPS
@given(text=st.text(max_size=60))
def test_parse_address_and_domain_raise_only_value_error(text):
    for check in (parse_address, parse_domain):
        try:
            found = check(text)
        except ValueError as exc:
            assert repr(text) in str(exc) or "got" in str(exc)
        else:
            assert isinstance(found, Address) or (isinstance(found, str) and found.isascii())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("bob", "not a valid address: 'bob'"),
        ("alice@@example.com", "not a valid address: 'alice@@example.com'"),
        ("<a@example.com>", "without angle brackets"),
        ("", "expected an address such as user@example.org, got ''"),
        ("a" * 65 + "@example.com", "not a valid address (local part too long)"),
    ],
)
def test_parse_address_says_what_is_wrong(text, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_address(text)


def test_address_parse_takes_no_bare_name_for_postmaster():
    # It trusts its input, but a name without @ is only ever postmaster.
    assert Address.parse("PostMaster").canonical == "postmaster"
    with pytest.raises(ValueError, match="no @"):
        Address.parse("bob")


@pytest.mark.parametrize(
    "literal",
    ["[IPv6:::ffff:192.0.2.1]", "[ipv6:::FFFF:c000:201]", "[IPv6:0:0:0:0:0:ffff:192.0.2.1]"],
)
def test_an_ipv4_mapped_literal_is_the_ipv4_literal(literal):
    # The host it reaches is 192.0.2.1: a rule or a budget for [192.0.2.1]
    # must hold for this spelling too.
    address, _ = parse_path(f"<x@{literal}>", sender=False)
    assert (address.domain, address.original) == ("[192.0.2.1]", f"x@{literal}")
    assert canonical_domain(literal) == "[192.0.2.1]"
    # Other IPv6 literals, the IPv4-compatible form included, stay IPv6.
    assert canonical_domain("[IPv6:::192.0.2.1]") == "[IPv6:::c000:201]"
    assert canonical_domain("[IPv6:64:ff9b::192.0.2.1]") == "[IPv6:64:ff9b::c000:201]"


BAD_LITERALS = [
    "[IPv6:fe80::1%eth0]",  # a zone index: an interface of this host
    "[::1]",  # an IPv6 address without the IPv6: tag
    "[IPv6:1.2.3.4]",  # the IPv6: tag on an IPv4 address
    "[IPv6:zz]",
    "[300.1.1.1]",
    "[1.2.3]",
    "[foo]",
    "[]",
]


@pytest.mark.parametrize("literal", BAD_LITERALS)
def test_only_rfc5321_address_literals_are_domains(literal):
    """RFC 5321 4.1.3 only: a parsed address, a configured domain or a
    delivery address never carries another literal (the protocol core
    refused these at RCPT already; Address.parse and parse_domain did not)."""
    with pytest.raises(ValueError, match="literal"):
        canonical_domain(literal)
    with pytest.raises(ValueError, match="literal"):
        Address.parse(f"u@{literal}")
    with pytest.raises(ValueError, match="^not a valid domain"):
        parse_domain(literal)
    with pytest.raises(AddressError) as info:
        parse_path(f"<u@{literal}>", sender=False)
    assert info.value.reply.status_code == 501
    # Those RFC 5321 has stay.
    assert canonical_domain("[IPv6:FE80::1]") == "[IPv6:fe80::1]"
    assert canonical_domain("[x-tag:any:thing]") == "[x-tag:any:thing]"


@pytest.mark.parametrize(
    "domain",
    ["example.org\x00", "\x00example.org", "exa\x01mple.org", "example.org\x7f",
     "\x1bexample.org", "example.org\x00.other.test", "exa mple.org", "exa\tmple.org",
     "example..org", ".example.org", ".", "example.org\n", ""],
)  # fmt: skip
def test_an_ascii_domain_holds_no_control_character_or_empty_label(domain):
    """A domain read from a header field with a control octet in it is no
    domain, never the name it looks like once the octet is hidden."""
    with pytest.raises(ValueError, match="not a domain name"):
        canonical_domain(domain)


@pytest.mark.parametrize(
    "domain", ["Mail-1.Example.ORG", "x_y.Example.org", "-www.example.org", "www-.example.org",
               "_mail.example.org", "example.org."],
)  # fmt: skip
def test_other_printable_ascii_domains_are_dns_names(domain):
    # RFC 2181 11: a subdomain spelled so is still one of its parent's (a
    # DMARC policy's sp= covers it); refusing it let mail past the policy.
    assert canonical_domain(domain) == domain.lower()


# Domains as people (and attackers) spell them: any mix of case, full-width
# forms, ideographic full stops and soft hyphens maps to one canonical domain.
_FULLWIDTH = {c: chr(ord(c) + 0xFEE0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"}


@PROPS
@given(
    labels=st.lists(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), min_size=2, max_size=4),
    data=st.data(),
)
def test_domain_spellings_share_one_canonical_form(labels, data):
    plain = ".".join(labels)
    spelled = []
    for i, label in enumerate(labels):
        chars = []
        for ch in label:
            kind = data.draw(st.sampled_from(["same", "upper", "full", "shy"]))
            if kind == "upper":
                ch = ch.upper()
            elif kind == "full":
                ch = _FULLWIDTH[ch]
            elif kind == "shy":
                ch = ch + "\u00ad"
            chars.append(ch)
        spelled.append("".join(chars))
        if i < len(labels) - 1:
            spelled.append(data.draw(st.sampled_from([".", "\u3002", "\uff0e"])))
    address, _ = parse_path(f"<ceo@{''.join(spelled)}>", sender=False, smtputf8=True)
    assert address.canonical == f"ceo@{plain}"


@PROPS
@example(local="a<\u0338b", quote=True)  # NFC: U+226E, no quotes needed
@example(local="a\u037eb", quote=False)  # NFC: ";", quotes needed
@example(local="a\u1fefb", quote=False)  # NFC: "`"
@given(
    local=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x2FFF, exclude_characters='"\\'),
        min_size=1,
        max_size=12,
    ),
    quote=st.booleans(),
)
def test_a_canonical_address_is_valid_and_its_own_canonical_form(local, quote):
    """NFC can make quoting needless ("<" + U+0338) or needed (U+037E is
    ";"): the canonical form is decided after it, is itself an address the
    core accepts, and canonicalising it again changes nothing."""
    text = f'"{local}"' if quote else local
    try:
        address, _ = parse_path(f"<{text}@example.com>", sender=False, smtputf8=True)
    except AddressError:
        return
    again, _ = parse_path(f"<{address.canonical}>", sender=False, smtputf8=True)
    assert again.canonical == address.canonical

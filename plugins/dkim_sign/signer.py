"""Signing one message: its header section, its body hash, the signature.

dkimpy signs a message it holds whole in memory. Only the header section
needs to be in memory, though: the body enters a signature only as its hash
(the ``bh=`` tag, RFC 6376 3.7). So this module takes the header section
as the envelope splits it (:func:`message_parts`: the fields every other
filter and the delivered message see), hashes the body in pieces as it
streams from the envelope's spool (:class:`BodyHash`, the body
canonicalizations of RFC 6376 3.4.3 and 3.4.4, giving the same octets as
dkimpy's), and hands the header section, the tags and the key to dkimpy,
which canonicalizes the header fields and computes the signature. A 100 MB
message costs the memory of its header section and one read buffer.

Everything here is blocking (file reads, hashing, RSA): the plugin runs it
in a thread.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.policy
import email.utils
import hashlib
import inspect
import logging
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from email import errors
from typing import IO, Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import HASH_ALGORITHMS

from bonzo.address import canonical_domain
from bonzo.session import MAX_HEADER_SECTION as _MAX_HEADER_SECTION
from bonzo.session import Envelope

from .._auth import unshown
from .._config import DOTS
from .keys import SigningKey

__all__ = [
    "BodyHash",
    "Signer",
    "MessageSigner",
    "Outcome",
    "MAX_HEADER_SECTION",
    "message_parts",
    "Authors",
    "author_domains",
    "from_domain",
]

#: The largest client header section read (the envelope's own limit): a
#: message with a larger one is refused (``552 5.3.4``) by the first reader.
MAX_HEADER_SECTION = _MAX_HEADER_SECTION
#: The most octets of ``From:`` field values that are parsed as address
#: lists, for a whole message (Python's parser takes time that grows with
#: the square of the length on hostile input: some 0.1 s for 1 KiB, 15 s
#: for 16 KiB). A field past it is only scanned (:data:`MAX_SCAN`), and
#: has a problem: never a DMARC pass, never signed.
MAX_FROM = 1024
#: The most octets of ``From:`` field values scanned leniently for domains,
#: for a whole message (the header section's own limit: in practice all).
MAX_SCAN = _MAX_HEADER_SECTION
#: The most distinct ``@`` tokens the lenient scan examines in a message,
#: and the most it meets in all: past them the message has a problem (and
#: more author domains than any DMARC evaluation looks up).
MAX_CANDIDATES = 200
MAX_TOKENS = 5000
#: The longest domain name (RFC 1035 2.3.4, without the final dot).
_MAX_NAME = 253
#: Read size for the body (each piece is copied a few times while hashed).
CHUNK = 1 << 18
#: In relaxed mode, white space and CRs at the end of a piece of body without
#: a line end are held back (they may still be stripped); past this many
#: octets the held-back part is reduced (see :meth:`BodyHash._reduce`).
HOLD_LIMIT = 4096

_EOL = re.compile(rb"\r?\n")
_SPACES = re.compile(rb"  +")
_TAB_TO_SPACE = bytes.maketrans(b"\t", b" ")
_WSP = re.compile(rb"[\t ]+")
_CRLF_RUN = 1 << 16

#: dkimpy's own logger (its debug output would show header contents).
_dkimpy_log = logging.getLogger("bonzo.plugins.dkim_sign.dkimpy")


class BodyHash:
    """The SHA-256 of a message body under DKIM body canonicalization
    (``relaxed`` or ``simple``), fed in pieces of any size with
    :meth:`update`.

    Line ends are ``CRLF`` or a bare ``LF`` (counted as ``CRLF``, as dkimpy
    and receivers do). Empty lines at the end are held back until content
    follows them, so memory stays bounded whatever the body.
    """

    def __init__(self, relaxed: bool) -> None:
        self.relaxed = relaxed
        self._hash = hashlib.sha256()
        self._carry = b""
        self._empty = 0  # CRLFs held back: empty lines at the end so far
        self._content = False  # anything but empty lines hashed
        self._done = False

    def update(self, data: bytes) -> None:
        """Add the next octets of the body."""
        if not data:
            return
        data = self._carry + data if self._carry else data
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            # The tail after the last LF may still change: a CR there may be
            # the first half of a CRLF, and (relaxed) white space before a
            # line end is dropped. Hold back what could.
            tail_start = len(data.rstrip(b" \t\r")) if self.relaxed else len(data)
            if not self.relaxed and data.endswith(b"\r"):
                tail_start -= 1
            cut = max(cut, tail_start)
        self._carry = data[cut:]
        if cut:
            self._process(data[:cut])
        if len(self._carry) > HOLD_LIMIT:
            self._reduce()

    def _reduce(self) -> None:
        """Shrink a long held-back run of white space and CRs (relaxed mode,
        a line without a line end): runs of white space count as one space,
        and a CR followed by something other than LF is final."""
        carry = _WSP.sub(b" ", self._carry)
        last = carry.rfind(b"\r", 0, len(carry) - 1)
        if last >= 0:
            self._process(carry[: last + 1])
            carry = carry[last + 1 :]
        self._carry = carry

    def _process(self, block: bytes) -> None:
        """Hash ``block``, which ends at a point no later octet can change."""
        if block.count(b"\n") != block.count(b"\r\n"):
            block = _EOL.sub(b"\r\n", block)  # a bare LF
        if self.relaxed:
            # RFC 6376 3.4.4: white space runs become one space, and none is
            # left before a line end. (In this order, and with C-speed
            # fast paths for the usual body without tabs or double spaces.)
            if b"\t" in block:
                block = block.translate(_TAB_TO_SPACE)
            if b"  " in block:
                block = _SPACES.sub(b" ", block)
            if b" \r\n" in block:
                block = block.replace(b" \r\n", b"\r\n")
        # Every LF now follows a CR: the CRLFs at the end are those after the
        # last CR CR (or the start), if the block ends with LF.
        pairs = 0
        if block.endswith(b"\n"):
            tail = block[len(block.rstrip(b"\r\n")) :]
            pairs = len(tail[tail.rfind(b"\r\r") + 1 :]) // 2
        head = len(block) - 2 * pairs
        if head:
            self._flush_empty()
            self._hash.update(block[:head] if pairs else block)
            self._content = True
        self._empty += pairs

    def _flush_empty(self) -> None:
        while self._empty:
            n = min(self._empty, _CRLF_RUN)
            self._hash.update(b"\r\n" * n)
            self._empty -= n

    def digest(self) -> bytes:
        """The hash of the whole body (call once, after the last update)."""
        if not self._done:
            if self._carry:
                self._process(self._carry)
                self._carry = b""
            # RFC 6376 3.4.3/3.4.4: empty lines at the end are ignored, a
            # last line gets its CRLF; an empty body is CRLF in simple mode
            # and nothing in relaxed mode.
            if self._content or not self.relaxed:
                self._hash.update(b"\r\n")
            self._done = True
        return self._hash.digest()


def message_parts(envelope: Envelope) -> tuple[bytes, IO[bytes], int]:
    """The header section of ``envelope`` as it will be delivered (the
    fields Bonzo and plugins added, then the client's as
    :meth:`~bonzo.session.Envelope.client_header_section` reads them, without
    the blank line), its content file and the offset in it where the body
    starts. Call it on the event loop (it may rewrite the content, making
    the end of the section plain), then read the body in a thread from
    that offset. Raises :class:`~bonzo.session.HeaderSectionTooLarge` for a
    client header section over :data:`MAX_HEADER_SECTION` octets."""
    section, start = envelope.client_header_section()
    return envelope.header_bytes + section, envelope.open_body(), start


#: A final dot after an address's domain, before what may follow an address
#: (``>``, ``,``, ``;``, a comment, the end): Python's address parser reads
#: ``a@example.org.`` as an address without a domain.
_FINAL_DOT = re.compile(r"(@[^\s<>,;:@()\[\]\"\\]+?)\.(?=\s*(?:[>,;(]|$))")


@dataclass(frozen=True)
class Authors:
    """The author domains of a message (:func:`author_domains`)."""

    #: How many ``From:`` fields it has.
    fields: int
    #: Every domain a reader may be shown as an author's, canonical, without
    #: a final dot, in the order found: those of the addresses the fields
    #: parse to first, then those only the lenient scan found (an address in
    #: a display name or comment, text a malformed field leaves over).
    domains: tuple[str, ...]
    #: Why an address (or a field) could not be read, if one could not.
    problem: str = ""
    #: The domains of the addresses the fields parse to (a part of
    #: ``domains``): the one a signature may be made for.
    addressed: tuple[str, ...] = ()


#: Defects of Python's address parser that leave every address whole: a
#: local part that is no dot-atom (``a..b@example.org``, which some carriers
#: handed out), an encoded word not followed by a space. Any other
#: :class:`~email.errors.InvalidHeaderDefect` may mean text was dropped
#: (it stops at the first syntax error and keeps only that defect): the
#: field then has a problem.
_HARMLESS_DEFECTS = frozenset(
    {
        "local-part is not dot-atom, quoted-string, or obs-local-part",
        "invalid repeated '.'",
        "Invalid leading '.' in local part",
        "Invalid trailing '.' in local part",
        "missing trailing whitespace after encoded-word",
        "whitespace inside encoded word",
    }
)
#: What may follow an ``@`` in the lenient scan: anything up to white space
#: or a character an address cannot hold there.
_AT_TOKEN = re.compile(r"@[ \t]*([^\s<>,;:@()\[\]\"\\]{1,%d})" % (_MAX_NAME + 3))
#: The longest host name at the start of a token (letters of any script).
_HOST_LIKE = re.compile(r"[\w-]+(?:[.\u3002\uff0e\uff61][\w-]+)*")
#: The same, ASCII only (a reader that cannot show the rest).
_HOST_ASCII = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?\s]*)\?=")
_CHARSET = re.compile(r"[A-Za-z0-9_.:+-]{1,40}")
#: An encoded word in a local part (RFC 2047 5 forbids it): one followed,
#: without white space or a delimiter, by the "@" of an address.
_ENCODED_LOCAL = re.compile(r"=\?[^?\s]{1,64}\?[bBqQ]\?[^?\s]*\?=[^\s<>,;:\"()@]*@")
#: The codecs an encoded word is decoded with: the character sets of mail
#: (Python's names). Others (``punycode``, ``idna``, ``unicode_escape``...)
#: are no character set a reader knows, and some take time growing with the
#: square of the length: their text is read as UTF-8.
_MAIL_CHARSETS = (
    "utf-8", "utf-16", "utf-32", "ascii", "iso8859-", "cp", "koi8-", "mac-", "latin",
    "gb2312", "gbk", "gb18030", "big5", "hz", "shift_jis", "euc_", "iso2022_", "johab",
    "tis-620", "ptcp154", "utf-7",
)  # fmt: skip


def _mail_codec(charset: str) -> str | None:
    """Python's codec for an encoded word's ``charset``, if it is one of
    mail's."""
    if not _CHARSET.fullmatch(charset):
        return None
    try:
        name = codecs.lookup(charset).name
    except LookupError:
        return None
    return name if name.startswith(_MAIL_CHARSETS) else None


def _decoded_words(text: str) -> str:
    """The text of the RFC 2047 encoded words in ``text``, as a reader shows
    them: adjacent ones (only white space between) joined, others apart."""
    runs: list[str] = []
    end = -1
    for match in _ENCODED_WORD.finditer(text):
        charset, kind, data = match.groups()
        octets = data.encode("ascii", "replace")
        try:
            if kind in "bB":
                octets = binascii.a2b_base64(octets + b"=" * (-len(octets) % 4))
            else:
                octets = binascii.a2b_qp(octets, header=True)
        except (binascii.Error, ValueError):
            continue
        codec = _mail_codec(charset.split("*", 1)[0])
        word = ""
        if codec in ("utf-16", "utf-32") and not octets.startswith(
            (b"\xfe\xff", b"\xff\xfe", b"\x00\x00\xfe\xff", b"\xff\xfe\x00\x00")
        ):
            # No byte-order mark: big-endian says RFC 2781 4.3, Python reads
            # little-endian; a reader may do either: both are scanned.
            word = " ".join(octets.decode(f"{codec}-{order}", "replace") for order in ("be", "le"))
        elif codec is not None:
            try:
                word = octets.decode(codec, "replace")
            except (LookupError, UnicodeError, ValueError, TypeError):
                word = ""
        word = word or octets.decode("utf-8", "replace")
        if runs and not text[end : match.start()].strip():
            runs[-1] += word
        else:
            runs.append(word)
        end = match.end()
    return " ".join(runs)


class _Scan:
    """The lenient scan of a message's ``From:`` fields: every domain after
    an ``@`` a reader may show, within :data:`MAX_SCAN` octets and
    :data:`MAX_CANDIDATES` tokens (hostile input: linear work)."""

    def __init__(self) -> None:
        #: Every domain found, in the order found.
        self.domains: list[str] = []
        self.budget = MAX_SCAN
        self.seen: dict[str, list[str]] = {}
        # A token's forms in any script (not the ASCII-only start of an IDN,
        # which names no other domain than the IDN's own).
        self.main: dict[str, list[str]] = {}
        self.tokens = 0
        self.full = False

    def add(self, token: str) -> list[str]:
        """The domains a reader may show for ``token`` (the text after an
        ``@``): cut at or without a character it may not show, the host name
        it starts with, in any script or in ASCII only."""
        self.tokens += 1
        if self.tokens > MAX_TOKENS:
            self.full = True
        known = self.seen.get(token)
        if known is not None or self.full:
            return known or []
        if len(self.seen) >= MAX_CANDIDATES:
            self.full = True
            return []
        found: list[str] = []
        main: list[str] = []
        self.seen[token] = found
        self.main[token] = main
        cut = next((i for i, c in enumerate(token) if unshown(c)), len(token))
        forms = {token[:cut]}
        if cut < len(token):
            forms.add("".join(c for c in token if not unshown(c)))
        for form in forms:
            for pattern in (_HOST_LIKE, _HOST_ASCII):
                match = pattern.match(form)
                if match is None:
                    continue
                try:
                    domain = canonical_domain(match.group().rstrip(DOTS))
                except ValueError:
                    continue
                # A longer name is no DNS name (and may be cut short here).
                if len(domain) > _MAX_NAME:
                    continue
                if pattern is _HOST_LIKE and domain not in main:
                    main.append(domain)
                if domain not in found:
                    found.append(domain)
                    if domain not in self.domains:
                        self.domains.append(domain)
        return found

    def main_forms(self, token: str) -> list[str]:
        """The forms of ``token`` (after :meth:`add`) in any script: the
        domains it names, where :meth:`add` adds what a reader showing
        ASCII only may make of them."""
        return self.main.get(token, [])

    def text(self, text: str) -> tuple[list[str], list[str]]:
        """The domains a reader may be shown in ``text`` (a field's value,
        or what is left of the budget), and those of them it names
        (:meth:`main_forms`)."""
        text = text[: self.budget]
        self.budget -= len(text)
        sources = [text]
        if "\\" in text:
            # alice@bank\.example is shown as alice@bank.example.
            sources.append(_QUOTED_PAIR.sub(r"\1", text))
        if "=?" in text:
            # An encoded word's text is shown decoded (as a display name,
            # or as the whole field when it is all there is): an address in
            # it is one a reader is shown as the author's.
            sources.append(_decoded_words(text))
        for source in list(sources):
            if not source.isascii():
                # A full-width or small commercial at (U+FF20, U+FE6B) is an
                # "@" to the eye: NFKC makes it one.
                folded = unicodedata.normalize("NFKC", source)
                if folded != source:
                    sources.append(folded)
        shown: list[str] = []
        named: list[str] = []
        for source in sources:
            for match in _AT_TOKEN.finditer(source):
                token = match.group(1)
                shown.extend(d for d in self.add(token) if d not in shown)
                named.extend(d for d in self.main_forms(token) if d not in named)
                if self.full:
                    return shown, named
        return shown, named


_getaddresses: Any = email.utils.getaddresses
#: Python 3.13 (and security releases before it) parse strictly by default,
#: giving nothing for a malformed field: the lenient reading is the one
#: wanted here (what older readers show).
_LEGACY_KWARGS = (
    {"strict": False} if "strict" in inspect.signature(_getaddresses).parameters else {}
)


def _legacy_domains(text: str) -> list[str]:
    """The domains of the addresses ``email.utils.getaddresses`` (the
    legacy parser, lenient in other ways) reads in ``text``."""
    try:
        pairs = _getaddresses([text], **_LEGACY_KWARGS)
    except Exception:  # RecursionError on nested comments, among others
        return []
    return [address.rpartition("@")[2] for _, address in pairs if "@" in address]


def _field_domains(text: str, scan: _Scan) -> tuple[list[str], str, bool, list[str], list[str]]:
    """The domains of the addresses in one ``From:`` field's value (unfolded,
    at most :data:`MAX_FROM` characters); why some address could not be read
    ("" if all could); whether the field does not parse cleanly (a reader
    may read it otherwise); and the domains other readings of it give (the
    legacy parser's, a domain that is no host name cut short), all forms and
    the names alone (:meth:`_Scan.main_forms`)."""
    text = _FINAL_DOT.sub(r"\1", text)
    try:
        header: Any = email.policy.default.header_factory("From", text)
        addresses = list(header.addresses)
        defects = list(header.defects)
    except Exception:  # the parser has raised on odd input before
        return [], "an unparsable From: field", True, [], []
    domains: list[str] = []
    problem = ""
    other: list[str] = []
    other_named: list[str] = []
    for address in addresses:
        domain = address.domain
        # "example.org." is the DNS name "example.org" (an IDN's final dot
        # may be any of UTS #46's).
        if domain and domain[-1] in DOTS:
            domain = domain[:-1]
        if not domain:
            problem = problem or "an address without a domain in the From: field"
        elif domain.startswith("["):
            problem = problem or "an address literal in the From: field"
        else:
            try:
                canonical = canonical_domain(domain)
            except ValueError:
                canonical = ""
            if canonical and _HOST_LIKE.fullmatch(canonical):
                domains.append(canonical)
            else:
                # Not a host name (a character a reader may not show, or
                # one no DNS name holds: "good.example=?x?"): the domains a
                # reader may show are those a policy must be applied for
                # (the message still has a problem: never signed, never a
                # DMARC pass).
                problem = problem or "an invalid domain in the From: field"
                other.extend(scan.add(domain))
                other_named.extend(scan.main_forms(domain))
    # Does it parse cleanly? The parser drops what follows a syntax error
    # ("bob@evil.example <alice@bank.example>" is read as bob@evil.example
    # alone), noting it only as a defect; it decodes an encoded word in a
    # local part, which RFC 2047 5 forbids ("=?utf-8?q?alice=40bank.example
    # =00?=@evil.example", shown by some readers as alice@bank.example: the
    # Mailsploit attack); the legacy parser reads some fields otherwise.
    if "=?" in text and _ENCODED_LOCAL.search(text):
        # What it hides is the reader's to decode (in which byte order, up
        # to which NUL): no reading of the field can be trusted.
        problem = problem or "an encoded word in a local part of the From: field"
    doubtful = any(
        isinstance(d, errors.NonPrintableDefect)
        or (isinstance(d, errors.InvalidHeaderDefect) and str(d) not in _HARMLESS_DEFECTS)
        for d in defects
    ) or any(any(unshown(c) for c in a.username or "") for a in addresses)
    for domain in _legacy_domains(text):
        shown = scan.add(domain)
        try:
            canonical = canonical_domain(domain.rstrip(DOTS))
        except ValueError:
            canonical = ""
        if canonical not in domains:
            doubtful = True
            other.extend(shown)
            other_named.extend(scan.main_forms(domain))
    return domains, problem, doubtful, other, other_named


def author_domains(headers: Sequence[Sequence[bytes]]) -> Authors:
    """Every domain that the message's ``From:`` fields name (all of them:
    RFC 5322 3.6 allows one, but a reader may show any); and, for a field
    that does not parse cleanly and that a reader may show with another
    domain, every domain a lenient scan of it finds (RFC 7489 6.6.1: the
    strictest policy of a domain the reader may be shown applies; such a
    field has a problem: never a DMARC pass, never signed)."""
    values = [value for name, value in headers if name.lower() == b"from"]
    domains: list[str] = []
    shown_too: list[str] = []
    problem = ""
    scan = _Scan()
    parsed = 0
    for raw in values:
        text = _EOL.sub(b"", raw).decode("utf-8", "replace").strip()
        shown, shown_named = scan.text(text)
        if parsed + len(text) > MAX_FROM:
            # Parsing it would take too long (see MAX_FROM); its domains are
            # those the scan finds.
            problem = problem or "a From: field too long to parse"
            shown_too.extend(shown)
            continue
        parsed += len(text)
        found, why, doubtful, other, other_named = _field_domains(text, scan)
        domains.extend(d for d in found if d not in domains)
        if why:
            problem = problem or why
            shown_too.extend(shown + other)
        elif doubtful and any(d not in found for d in shown_named + other_named):
            # Read otherwise, it names another domain: no reading can be
            # trusted. A field every reading gives the same domains
            # ("noreply@example.org <noreply@example.org>", an encoded word
            # in a quoted display name: common) is judged by them.
            problem = problem or "a malformed From: field"
            shown_too.extend(shown + other)
    if scan.full:
        # The scan stopped: what it did not read may name others.
        problem = problem or "too many addresses in the From: field"
        shown_too.extend(scan.domains)
    addressed = tuple(domains)
    domains.extend(d for d in shown_too if d not in domains)
    return Authors(len(values), tuple(domains), problem, addressed)


def from_domain(headers: Sequence[Sequence[bytes]]) -> tuple[str | None, str]:
    """The domain of the message's author: of the one address in its one
    ``From:`` field, in canonical form, without a final dot (``None`` and a
    reason otherwise).

    Several addresses are allowed when they share one domain. A message with
    no ``From:``, or several (RFC 5322 3.6 allows one), has no author domain
    a DKIM signature could stand for (DMARC, RFC 7489 6.6.1); nor has a
    field that does not parse cleanly. A domain found only in a display name
    or comment does not stop signing: the signature vouches for the
    address's domain alone.
    """
    authors = author_domains(headers)
    if authors.fields != 1:
        return None, f"{authors.fields} From: fields"
    if authors.problem:
        return None, authors.problem
    if len(authors.addressed) != 1:
        return None, "no single domain in the From: field"
    return authors.addressed[0], ""


@dataclass(frozen=True)
class Signer:
    """One signature to add: a key, and the tags that go with it."""

    domain: str
    selector: str
    key: SigningKey
    identity: str = ""


@dataclass
class Outcome:
    """What :meth:`MessageSigner.sign` did: the header fields to add (each a
    complete ``DKIM-Signature:`` field ending in CRLF) and the signatures
    made, or the reason nothing was signed."""

    fields: list[bytes]
    signed: list[Signer]
    reason: str = ""
    author: str | None = None


class MessageSigner:
    """Signs messages per the plugin's configuration (all of it immutable, so
    several threads may sign at once)."""

    def __init__(
        self,
        domains: dict[str, tuple[bool, list[Signer]]],
        headers: Sequence[str],
        oversign: Sequence[str],
        canonicalization: str,
        expire: int,
    ) -> None:
        #: Signing domain -> (applies to its subdomains, its signatures).
        self.domains = domains
        self.headers = [h.lower() for h in headers]
        for name in oversign:
            if name.lower() not in self.headers:
                self.headers.append(name.lower())
        self.oversign = frozenset(h.lower() for h in oversign)
        self.canonicalization = canonicalization
        self.body_relaxed = canonicalization.split("/")[1] == "relaxed"
        self.expire = expire

    def signers_for(self, domain: str) -> list[Signer]:
        """The signatures for a message from ``domain``: its own, or those of
        the nearest parent domain configured with ``subdomains``."""
        entry = self.domains.get(domain)
        if entry is not None:
            return entry[1]
        labels = domain.split(".")
        for i in range(1, len(labels) - 1):
            entry = self.domains.get(".".join(labels[i:]))
            if entry is not None and entry[0]:
                return entry[1]
        return []

    def include_headers(self, headers: Sequence[Sequence[bytes]]) -> list[bytes]:
        """The ``h=`` list: each configured field once per instance in the
        message, and the oversigned ones once more (an instance added later
        then breaks the signature)."""
        counts = Counter(name.lower().decode("ascii", "replace") for name, _ in headers)
        names: list[bytes] = []
        for name in self.headers:
            n = counts.get(name, 0) + (1 if name in self.oversign else 0)
            names += [name.encode("ascii")] * n
        return names

    def sign(self, section: bytes, body: IO[bytes], now: float | None = None) -> Outcome:
        """Sign the message whose header section is ``section`` (every field,
        without the blank line after them) and whose body is read from
        ``body``'s current position on (see :func:`message_parts`).
        Blocking; raises on a local fault (an unreadable spool)."""
        try:
            message = dkim.DKIM(section + b"\r\n", logger=_dkimpy_log)
        except dkim.MessageFormatError:
            return Outcome([], [], "a malformed header section")
        except IndexError:  # a continuation line first
            return Outcome([], [], "a malformed header section")
        headers = message.headers
        author, why = from_domain(headers)
        if author is None:
            return Outcome([], [], why)
        signers = self.signers_for(author)
        if not signers:
            return Outcome([], [], "", author)
        body_hash = BodyHash(self.body_relaxed)
        while True:
            chunk = body.read(CHUNK)
            if not chunk:
                break
            body_hash.update(chunk)
        bh = base64.b64encode(body_hash.digest())
        include = self.include_headers(headers)
        policy = CanonicalizationPolicy.from_c_value(self.canonicalization.encode("ascii"))
        stamp = int(time.time() if now is None else now)
        fields = [self._sign_one(message, s, include, policy, bh, stamp) for s in signers]
        return Outcome(fields, list(signers), "", author)

    def _sign_one(
        self,
        message: dkim.DKIM,
        signer: Signer,
        include: list[bytes],
        policy: CanonicalizationPolicy,
        bh: bytes,
        stamp: int,
    ) -> bytes:
        algorithm = signer.key.algorithm.encode("ascii")
        tags = [
            (b"v", b"1"),
            (b"a", algorithm),
            (b"c", self.canonicalization.encode("ascii")),
            (b"d", signer.domain.encode("ascii")),
        ]
        if signer.identity:
            tags.append((b"i", signer.identity.encode("utf-8")))
        tags += [(b"s", signer.selector.encode("ascii")), (b"t", str(stamp).encode("ascii"))]
        if self.expire:
            tags.append((b"x", str(stamp + self.expire).encode("ascii")))
        tags += [
            (b"h", b" : ".join(include)),
            (b"bh", bh),
            # A placeholder long enough to put b= on a line of its own when
            # folded, so that the real value does not refold the tags before.
            (b"b", b"0" * 60),
        ]
        # dkimpy's signing core (DKIM.sign without its body pass): the
        # header fields are canonicalized, hashed with the new field and
        # signed by dkimpy.
        message.signature_algorithm = algorithm
        message.hasher = HASH_ALGORITHMS[algorithm]
        value = message.gen_header(tags, include, policy, b"DKIM-Signature", signer.key.private)
        return b"DKIM-Signature: " + bytes(value)

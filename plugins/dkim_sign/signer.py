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
import email.policy
import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
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
#: The longest ``From:`` field value that is parsed for its domain.
MAX_FROM = 16384
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


def _shown_domains(domain: str) -> list[str]:
    """The domains a reader may show for ``domain``, which holds characters
    it may not show: with those removed, and cut at the first of them (a
    reader that stops at a NUL). Only the valid ones."""
    cut = next((i for i, c in enumerate(domain) if unshown(c)), len(domain))
    out = []
    for shown in ("".join(c for c in domain if not unshown(c)), domain[:cut]):
        shown = shown.rstrip(DOTS)
        try:
            canonical = canonical_domain(shown) if shown else ""
        except ValueError:
            continue
        if canonical and canonical not in out:
            out.append(canonical)
    return out


@dataclass(frozen=True)
class Authors:
    """The author domains of a message (:func:`author_domains`)."""

    #: How many ``From:`` fields it has.
    fields: int
    #: The distinct domains of the addresses that could be read, canonical,
    #: without a final dot, in the order written.
    domains: tuple[str, ...]
    #: Why an address (or a field) could not be read, if one could not.
    problem: str = ""


def _field_domains(raw: bytes) -> tuple[list[str], str]:
    """The domains of the addresses in one ``From:`` field's value, and why
    some address could not be read ("" if all could)."""
    if len(raw) > MAX_FROM:
        return [], "a From: field too long to parse"
    text = _EOL.sub(b"", raw).decode("utf-8", "replace").strip()
    text = _FINAL_DOT.sub(r"\1", text)
    try:
        header: Any = email.policy.default.header_factory("From", text)
        found = [a.domain for a in header.addresses]
    except Exception:  # the parser has raised on odd input before
        return [], "an unparsable From: field"
    domains: list[str] = []
    problem = ""
    for domain in found:
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
                domains.append(canonical_domain(domain))
            except ValueError:
                problem = problem or "an invalid domain in the From: field"
                # A character a reader may not show: the domains it may
                # show are those a policy must be applied for (the message
                # still has a problem: never signed, never a DMARC pass).
                domains.extend(_shown_domains(domain))
    return domains, problem


def author_domains(headers: Sequence[Sequence[bytes]]) -> Authors:
    """Every domain that the message's ``From:`` fields name (all of them:
    RFC 5322 3.6 allows one, but a reader may show any)."""
    values = [value for name, value in headers if name.lower() == b"from"]
    domains: list[str] = []
    problem = ""
    for raw in values:
        found, why = _field_domains(raw)
        problem = problem or why
        domains.extend(d for d in found if d not in domains)
    return Authors(len(values), tuple(domains), problem)


def from_domain(headers: Sequence[Sequence[bytes]]) -> tuple[str | None, str]:
    """The domain of the message's author: of the one address in its one
    ``From:`` field, in canonical form, without a final dot (``None`` and a
    reason otherwise).

    Several addresses are allowed when they share one domain. A message with
    no ``From:``, or several (RFC 5322 3.6 allows one), has no author domain
    a DKIM signature could stand for (DMARC, RFC 7489 6.6.1).
    """
    authors = author_domains(headers)
    if authors.fields != 1:
        return None, f"{authors.fields} From: fields"
    if authors.problem:
        return None, authors.problem
    if len(authors.domains) != 1:
        return None, "no single domain in the From: field"
    return authors.domains[0], ""


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

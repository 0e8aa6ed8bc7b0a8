"""DKIM verification (RFC 6376) of a spooled message, in bounded memory, with
every key looked up through Bonzo's resolver.

dkimpy verifies a message it holds whole in memory, and its asynchronous
verifier needs aiodns (a second resolver). Instead, verification is split in
three steps, so that neither the whole message nor a second resolver is
needed, and the event loop never hashes:

1. :func:`prepare` (blocking: run it in a thread) takes the header section
   as the envelope splits it (at most :data:`MAX_HEADER_SECTION` octets
   from the client), lets dkimpy parse and
   validate each ``DKIM-Signature:`` field (at most ``max_signatures``), and
   streams the body once through the body hash of each canonicalization the
   signatures use (:class:`bonzo_plugins.dkim_sign.signer.BodyHash`: the same
   octets as dkimpy's, in pieces);
2. the plugin looks the keys up (``selector._domainkey.domain`` TXT) on the
   event loop with :meth:`bonzo.dns.Resolver.dkim_txt`, all at once;
3. :func:`finish` (blocking) compares each body hash with ``bh=`` and has
   dkimpy check the header hash and the signature with the key
   (``dkim.evaluate_pk`` and ``DKIM.verify_sig_process``, with ``bh=``
   already checked).

A message of any size costs its header section and one read buffer.

ARC (RFC 8617) is verified in the same three steps, with the whole message
in memory (dkimpy's ARC verifier reads it so): :func:`arc_prepare`
(blocking) parses the chain and names the keys it needs (each seal's and
the newest message signature's, at most :data:`MAX_ARC_SETS` sets); the
plugin looks them up on the event loop; :func:`arc_finish` (blocking) runs
dkimpy's verification with a DNS function that only reads those answers.
No thread ever waits for DNS.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import InvalidTagValueList, parse_tag_value

from bonzo.dns import DNSError

from .._auth import sanitize
from ..dkim_sign.signer import CHUNK, MAX_HEADER_SECTION, BodyHash

__all__ = [
    "Signature",
    "Prepared",
    "prepare",
    "finish",
    "split_message",
    "MAX_HEADER_SECTION",
    "ArcChain",
    "arc_prepare",
    "arc_finish",
    "MAX_ARC_SETS",
]

#: dkimpy's logger for this plugin (its debug output shows header contents;
#: its errors are turned into results here, not logged).
_dkimpy_log = logging.getLogger("bonzo.plugins.dkim.dkimpy")
_dkimpy_log.addHandler(logging.NullHandler())
_dkimpy_log.propagate = False

_TAG = re.compile(rb"(?:^|;)\s*([ds])\s*=\s*([^;]*)")
#: Algorithms accepted (RFC 8301 forbids rsa-sha1; RFC 8463 adds Ed25519).
ALGORITHMS = (b"rsa-sha256", b"ed25519-sha256")
#: The most ARC sets a chain may have (RFC 8617 4.2.1.1: ``i=`` is 1 to 50);
#: a longer chain fails without any lookup.
MAX_ARC_SETS = 50
#: ARC's results in dkimpy (``CV_Pass``...), as words.
_ARC = {b"pass": "pass", b"fail": "fail", b"none": "none"}


@dataclass
class Signature:
    """One ``DKIM-Signature:`` field and what became of it."""

    index: int
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    #: Set once decided: ``pass``, ``fail``, ``neutral``, ``policy``,
    #: ``temperror``, ``permerror`` (RFC 8601 2.7.1).
    result: str = ""
    reason: str = ""
    sig: dict[bytes, bytes] = field(default_factory=dict)
    include_headers: list[bytes] = field(default_factory=list)
    header: tuple[bytes, bytes] = (b"", b"")
    body_canon: str = "simple"
    #: The key record's text, filled in by the caller (``None``: no key).
    key: bytes | None = None

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def decide(self, result: str, reason: str) -> None:
        self.result, self.reason = result, sanitize(reason)


@dataclass
class Prepared:
    """What :func:`prepare` found."""

    signatures: list[Signature]
    #: ``DKIM-Signature:`` fields beyond ``max_signatures``, not checked.
    skipped: int = 0
    #: Set when the message cannot be checked at all (the header section).
    problem: str = ""
    message: Any = None
    body_hashes: dict[str, bytes] = field(default_factory=dict)


def _text(value: bytes) -> str:
    return sanitize(value.decode("ascii", "replace"), 255)


def _tags(header_value: bytes) -> tuple[str, str]:
    """``d=`` and ``s=`` of a field dkimpy could not parse (for the result)."""
    found = {m.group(1): m.group(2).strip() for m in _TAG.finditer(header_value[:4096])}
    return _text(found.get(b"d", b"")).lower(), _text(found.get(b"s", b""))


class _Name(bytes):
    """A field name as written, with any white space before its colon (RFC
    5322 4.5.8's obsolete ``field-name *WSP ":"``, e.g. ``X-Spam-Flag :``):
    dkimpy hashes it as written under simple header canonicalization (RFC
    6376 3.4.1: no change), and compares it (``h=``) and writes it under
    relaxed canonicalization (3.4.2: WSP before the colon deleted) through
    :meth:`lower`, which drops that white space, as OpenDKIM does."""

    def lower(self) -> bytes:
        return bytes(self).rstrip(b" \t").lower()


def _fields(section: bytes) -> list[list[bytes]] | None:
    """The ``[name, value]`` pairs of the header section ``section`` as
    dkimpy keeps them (each value with its folded lines, every line ending
    in CRLF), split as Bonzo's envelope splits it
    (:meth:`bonzo.session.Envelope.client_header_section`): dkimpy's own
    parser refuses a whole message for one field with white space before
    its colon, and skips a ``From :`` line as an mbox separator. ``None``
    for a line that is not part of a field (the envelope never gives one)."""
    lines = re.split(rb"\r?\n", section)
    if lines and not lines[-1]:
        lines.pop()
    headers: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not headers:
                return None
            headers[-1][1] += line + b"\r\n"
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name.strip(b" \t"):
            return None
        headers.append([_Name(name), value + b"\r\n"])
    return headers


def split_message(content: bytes) -> tuple[list[list[bytes]], bytes] | None:
    """A whole message as dkimpy keeps it (``headers``, ``body``; see
    :func:`_fields`), or ``None`` for a header section with a line that is
    not part of a field (dkimpy's own parser is then left to judge it)."""
    lines = re.split(rb"\r?\n", content)
    end = lines.index(b"") if b"" in lines else len(lines)
    headers = _fields(b"\r\n".join(lines[:end]))
    if headers is None:
        return None
    return headers, b"\r\n".join(lines[end + 1 :])


def prepare(section: bytes, body: IO[bytes], max_signatures: int) -> Prepared:
    """Parse the header section ``section`` (every field, without the blank
    line after them) and hash the body read from ``body``'s current position
    on (see :func:`bonzo_plugins.dkim_sign.signer.message_parts`); see the
    module docs. Blocking."""
    headers = _fields(section)
    if headers is None:
        return Prepared([], problem="a malformed header section")
    message = dkim.DKIM(b"", logger=_dkimpy_log)
    message.headers = headers
    fields = [(n, v) for n, v in message.headers if n.lower() == b"dkim-signature"]
    prepared = Prepared([], skipped=max(0, len(fields) - max_signatures), message=message)
    canons: set[str] = set()
    for index, (_name, value) in enumerate(fields[:max_signatures]):
        signature = Signature(index)
        prepared.signatures.append(signature)
        signature.domain, signature.selector = _tags(value)
        try:
            parsed = message.verify_headerprep(index)
        except dkim.DKIMException as exc:
            signature.decide("permerror", f"malformed signature: {exc}")
            continue
        assert parsed
        sig, include_headers, sigheaders = parsed
        signature.sig, signature.include_headers = sig, include_headers
        signature.header = sigheaders[index]
        signature.domain = _text(sig[b"d"]).lower()
        signature.selector = _text(sig[b"s"])
        signature.algorithm = _text(sig[b"a"])
        if sig[b"a"] not in ALGORITHMS:
            signature.decide("policy", f"algorithm {signature.algorithm} not accepted (RFC 8301)")
            continue
        if b"l" in sig:
            # A body length limit lets anyone append to a signed message.
            signature.decide("policy", "l= (body length limit) not accepted")
            continue
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except dkim.DKIMException as exc:
            signature.decide("permerror", f"bad c= tag: {exc}")
            continue
        signature.body_canon = (
            "relaxed" if policy.body_algorithm.__name__ == "Relaxed" else "simple"
        )
        canons.add(signature.body_canon)
    if canons:
        hashes = {canon: BodyHash(canon == "relaxed") for canon in canons}
        while True:
            chunk = body.read(CHUNK)
            if not chunk:
                break
            for body_hash in hashes.values():
                body_hash.update(chunk)
        prepared.body_hashes = {canon: h.digest() for canon, h in hashes.items()}
    return prepared


def finish(prepared: Prepared, min_key_bits: int) -> None:
    """Decide every signature still open, with its ``key`` filled in (see
    the module docs). Blocking."""
    message = prepared.message
    for signature in prepared.signatures:
        if signature.result:
            continue
        sig = signature.sig
        try:
            expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
        except (binascii.Error, ValueError):
            signature.decide("permerror", "bh= is not base64")
            continue
        if prepared.body_hashes.get(signature.body_canon) != expected:
            signature.decide("fail", "body hash mismatch")
            continue
        name = signature.key_name.encode("ascii", "replace") + b"."
        if _revoked(signature.key):
            # RFC 6376 3.6.1: an empty p= is a revoked key; 6.1.2 says so.
            signature.decide("permerror", f"key {signature.key_name}: revoked (empty p=)")
            continue
        try:
            pk, bits, ktag, seqtlsrpt = dkim.evaluate_pk(name, signature.key)
        except (dkim.DKIMException, binascii.Error, ValueError) as exc:
            signature.decide("permerror", f"key {signature.key_name}: {exc}")
            continue
        message.pk, message.keysize, message.ktag, message.seqtlsrpt = pk, bits, ktag, seqtlsrpt
        message.minkey = min_key_bits
        without_bh = {k: v for k, v in sig.items() if k != b"bh"}
        try:
            good = message.verify_sig_process(
                without_bh, list(signature.include_headers), signature.header, None
            )
        except dkim.KeyFormatError as exc:
            signature.decide("policy", str(exc))
            continue
        except dkim.DKIMException as exc:
            signature.decide("permerror", str(exc))
            continue
        if good:
            signature.decide("pass", f"{ktag.decode('ascii', 'replace')} {bits} bits")
        else:
            signature.decide("fail", "signature did not verify")


def _revoked(record: bytes) -> bool:
    """Whether the key record has an empty ``p=`` tag (a revoked key)."""
    try:
        tags = parse_tag_value(record)
    except Exception:
        return False  # malformed: evaluate_pk says how
    return tags.get(b"p", None) == b""


# ------------------------------------------------------------------- ARC
@dataclass
class ArcChain:
    """What :func:`arc_prepare` found: the result when already decided,
    else dkimpy's ARC verifier holding the message and the key names
    (``selector._domainkey.domain.``, as dkimpy asks for them) to look up."""

    result: str = ""
    reason: str = ""
    arc: Any = None
    key_names: list[bytes] = field(default_factory=list)


def _key_name(value: bytes) -> bytes | None:
    """The key name of an ARC field's (relaxed) value, as dkimpy builds it
    (``DomainSigner.verify_sig``); ``None`` if it has no ``d=``/``s=``
    (dkimpy then fails the chain itself)."""
    try:
        tags: dict[bytes, bytes] = parse_tag_value(value)
    except InvalidTagValueList:
        return None
    if b"d" not in tags or b"s" not in tags:
        return None
    return tags[b"s"] + b"._domainkey." + tags[b"d"] + b"."


def arc_prepare(content: bytes, min_key_bits: int) -> ArcChain:
    """Parse the ARC chain of the whole message ``content`` and name the
    keys its verification needs: each ``ARC-Seal:``'s (one per instance)
    and the newest ``ARC-Message-Signature:``'s (older ones do not count,
    RFC 8617 5.2), so at most :data:`MAX_ARC_SETS` + 1. Blocking."""
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[:end]
    if b"\narc-seal:" not in b"\n" + head.lower():
        return ArcChain("none", "no ARC set")
    try:
        split = split_message(content)
        if split is None:
            # dkimpy's own parser judges a section Bonzo cannot split.
            arc = dkim.ARC(content, logger=_dkimpy_log, minkey=min_key_bits)
        else:
            # The fields as Bonzo splits them (dkimpy's parser refuses a
            # message for one "X-Spam-Flag : NO").
            arc = dkim.ARC(None, logger=_dkimpy_log, minkey=min_key_bits)
            arc.headers, arc.body = split
        newest, fields = arc.sorted_arc_headers()
    except Exception as exc:  # dkimpy raises many kinds on a hostile message
        return _arc_failure(exc)
    if newest > MAX_ARC_SETS:
        return ArcChain("fail", f"more than {MAX_ARC_SETS} ARC sets (RFC 8617)")
    seals: dict[int, bytes] = {}
    signature: bytes | None = None
    for instance, (name, value) in fields:  # newest first
        kind = name.lower()
        if kind == b"arc-seal":
            seals.setdefault(instance, value)
        elif kind == b"arc-message-signature" and instance == newest and signature is None:
            signature = value
    values = [signature, *seals.values()] if signature is not None else list(seals.values())
    names = [n for n in map(_key_name, values) if n is not None]
    return ArcChain(arc=arc, key_names=list(dict.fromkeys(names)))


def _arc_failure(exc: Exception) -> ArcChain:
    if isinstance(exc, DNSError):
        return ArcChain("fail", f"key lookup failed: {exc}")
    if isinstance(exc, dkim.DKIMException):  # as dkim.arc_verify reports it
        return ArcChain("fail", str(exc))
    return ArcChain("fail", f"{type(exc).__name__}: {exc}")


def arc_finish(chain: ArcChain, keys: Mapping[bytes, bytes | None | DNSError]) -> tuple[str, str]:
    """The chain's validation (RFC 8617 5.2), ``pass``, ``fail`` or ``none``,
    and why, with dkimpy's verifier given ``keys`` (the answers for
    ``chain.key_names``) as its only DNS: a key not among them has no
    record. Blocking, but never waits for DNS."""
    if chain.result:
        return chain.result, chain.reason

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        key = keys.get(name.encode("ascii", "replace") if isinstance(name, str) else name)
        if isinstance(key, DNSError):
            raise key
        return key

    try:
        cv, _results, reason = chain.arc.verify(dnsfunc=dnsfunc)
    except Exception as exc:  # dkimpy raises many kinds on a hostile chain
        failed = _arc_failure(exc)
        return failed.result, failed.reason
    return _ARC.get(cv, "fail"), str(reason or "")

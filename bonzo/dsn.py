"""Delivery Status Notification requests (RFC 3461): the DSN parameters of
MAIL and RCPT, decoded and checked.

A client that asks for DSNs adds ``RET=FULL|HDRS`` and ``ENVID=<xtext>`` to
MAIL, and ``NOTIFY=NEVER|SUCCESS,FAILURE,DELAY`` and
``ORCPT=<addr-type>;<xtext>`` to RCPT. When the ``DSN`` extension is offered
(:attr:`SMTPSettings.dsn <bonzo.settings.SMTPSettings.dsn>`), the protocol
core checks them with :func:`mail_dsn` and :func:`recipient_dsn` (a bad
value is ``501 5.5.4``) and the envelope keeps what they say as
:class:`MailDSN` (:attr:`Envelope.dsn <bonzo.session.Envelope.dsn>`) and one
:class:`RecipientDSN` per recipient (:attr:`Envelope.rcpt_dsn
<bonzo.session.Envelope.rcpt_dsn>`), for plugins and for the delivery side.
The parameters as the client wrote them stay in ``mail_params`` and
``rcpt_params``: a relay passes those on unchanged (RFC 3461 5.2.1).

Bonzo itself sends no DSN; a delivery plugin that bounces or reports uses
:meth:`RecipientDSN.wants` to follow the client's request.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "MailDSN",
    "RecipientDSN",
    "OriginalRecipient",
    "DSNError",
    "xtext_canonical",
    "xtext_decode",
    "xtext_encode",
    "mail_dsn",
    "recipient_dsn",
    "NOTIFY_KEYWORDS",
    "MAX_ENVID",
    "MAX_ORCPT",
    "NO_MAIL_DSN",
    "NO_RECIPIENT_DSN",
]

#: The keywords of ``NOTIFY`` (RFC 3461 4.1).
NOTIFY_KEYWORDS = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})
#: Longest ``ENVID``, in characters once decoded (RFC 3461 4.4).
MAX_ENVID = 100
#: Longest ``ORCPT`` value, ``addr-type;xtext`` as sent (RFC 3461 4.2).
MAX_ORCPT = 500

# xtext: xchar is "!".."~" but "+" and "="; hexchar is "+" and two hex
# digits (RFC 3461 4). Lower-case digits are read too: decoding them is
# unambiguous, and refusing them would only bounce mail.
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-Fa-f]{2})")
# What a decoded ENVID or ORCPT address may hold: printable US-ASCII and
# space (RFC 3461 4.2, 4.4). A decoded control character (``+0D+0A``) could
# otherwise reach a header or a log line.
_PRINTABLE = re.compile(r"[ -~]*")
# What RFC 6533's QUCHAR leaves out of printable text: space, "+" and "=".
_NOT_UNITEXT = re.compile(r"[ +=]")
# addr-type is an RFC 822 atom: CHARs but specials, space and controls.
_ATOM = re.compile(r"[!#-'*+\-/-9=?A-Z^-~]+")
# Octets written as themselves by xtext_encode.
_XCHAR = re.compile(r"[^!-*,-<>-~]")


class DSNError(ValueError):
    """A DSN parameter that breaks RFC 3461; ``str()`` is the reply text."""


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 xtext (``"a+2Bb"`` → ``"a+b"``); raise
    :exc:`DSNError` if ``text`` is not xtext.

    Each ``+XX`` gives the octet ``XX``; the result is read as Latin-1, so
    every octet is one character and the caller decides which are allowed.
    """
    if not _XTEXT.fullmatch(text):
        raise DSNError("not xtext")
    if "+" not in text:
        return text
    return _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), text)


def xtext_canonical(text: str) -> str:
    """``text`` (xtext, as a client sent it) with its ``+XX`` escapes in the
    upper case RFC 3461 4 spells them (``"a+2bb"`` → ``"a+2Bb"``): the same
    value, which a strict server takes. Anything else is left as it is."""
    if "+" not in text:
        return text
    return _HEXCHAR.sub(lambda m: "+" + m.group(1).upper(), text)


def xtext_encode(text: str) -> str:
    """Encode ``text`` (US-ASCII) as xtext: ``+``, ``=``, space, controls
    and anything outside ``!``..``~`` become ``+XX``. Raises
    :exc:`DSNError` for a character above U+00FF."""
    if any(ord(ch) > 0xFF for ch in text):
        raise DSNError("xtext holds octets: characters above U+00FF cannot be encoded")
    return _XCHAR.sub(lambda m: f"+{ord(m.group()):02X}", text)


@dataclass(frozen=True, slots=True)
class MailDSN:
    """The DSN parameters of MAIL: ``RET`` and ``ENVID``. An empty record
    (both ``None``) when the client gave neither."""

    ret: str | None = None
    """``"FULL"`` (return the whole message in a failure report) or
    ``"HDRS"`` (only its headers), upper-cased; ``None`` when not given
    (the MTA chooses)."""

    envid: str | None = None
    """The envelope identifier, decoded from xtext; ``None`` when not given.
    Printable US-ASCII, at most :data:`MAX_ENVID` characters."""

    def __bool__(self) -> bool:
        return self.ret is not None or self.envid is not None


@dataclass(frozen=True, slots=True)
class OriginalRecipient:
    """The ``ORCPT`` of a recipient: the address the sender first used."""

    addr_type: str
    """The address type as sent, e.g. ``"rfc822"`` (compare it without
    regard to case; it is kept as sent for relaying)."""

    address: str
    """The address, decoded from xtext: printable text, UTF-8 where the
    client wrote UTF-8 octets (``+C3+B6``) or, with SMTPUTF8 and the
    ``utf-8`` type, raw UTF-8 (RFC 6533); ``\\x{...}`` escapes are kept."""


@dataclass(frozen=True, slots=True)
class RecipientDSN:
    """The DSN parameters of one RCPT: ``NOTIFY`` and ``ORCPT``."""

    notify: frozenset[str] | None = None
    """The ``NOTIFY`` keywords, upper-cased: ``{"NEVER"}`` or a non-empty
    subset of ``{"SUCCESS", "FAILURE", "DELAY"}``; ``None`` when not given
    (RFC 3461 says: treat as ``FAILURE`` or ``FAILURE,DELAY``)."""

    orcpt: OriginalRecipient | None = None
    """The original recipient, or ``None`` when not given."""

    def wants(self, kind: str) -> bool:
        """Whether the sender asked for (or allowed) a DSN of ``kind``:
        ``"success"``, ``"failure"`` or ``"delay"`` (any case).

        Follows RFC 3461 5.2: without ``NOTIFY`` a failure is reported, a
        delay may be, a success is not; ``NEVER`` gives none. A message
        from the null sender (``MAIL FROM:<>``) never gets a DSN, whatever
        this says (RFC 3461 5.2): check the envelope's sender too.
        """
        key = kind.upper()
        if key not in ("SUCCESS", "FAILURE", "DELAY"):
            raise ValueError(f"kind must be success, failure or delay, not {kind!r}")
        if self.notify is None:
            return key != "SUCCESS"
        return key in self.notify

    def __bool__(self) -> bool:
        return self.notify is not None or self.orcpt is not None


#: The record of a MAIL without DSN parameters.
NO_MAIL_DSN = MailDSN()
#: The record of a RCPT without DSN parameters.
NO_RECIPIENT_DSN = RecipientDSN()


def mail_dsn(params: Mapping[str, str | None]) -> MailDSN:
    """The :class:`MailDSN` of MAIL parameters (keywords upper-cased, as
    :func:`bonzo.protocol.parse_path` gives them); other keywords are
    ignored. Raises :exc:`DSNError` for a bad ``RET`` or ``ENVID``."""
    ret = params.get("RET")
    envid = params.get("ENVID")
    if "RET" in params:
        # ASCII only (RFC 3461 4.3): Unicode upper() makes "hdrſ" HDRS.
        if ret is None or not ret.isascii() or ret.upper() not in ("FULL", "HDRS"):
            raise DSNError("Bad RET parameter (FULL or HDRS)")
        ret = ret.upper()
    if "ENVID" in params:
        if not envid:
            raise DSNError("Bad ENVID parameter")
        try:
            envid = xtext_decode(envid)
        except DSNError:
            raise DSNError("Bad ENVID parameter: not xtext") from None
        if len(envid) > MAX_ENVID or not _PRINTABLE.fullmatch(envid):
            raise DSNError("Bad ENVID parameter")
    if ret is None and envid is None:
        return NO_MAIL_DSN
    return MailDSN(ret, envid)


def recipient_dsn(params: Mapping[str, str | None], *, smtputf8: bool = False) -> RecipientDSN:
    """The :class:`RecipientDSN` of RCPT parameters (keywords upper-cased);
    other keywords are ignored. Raises :exc:`DSNError` for a bad ``NOTIFY``
    or ``ORCPT``. ``smtputf8``: the transaction declared SMTPUTF8, so an
    ``ORCPT`` of the ``utf-8`` type may be raw UTF-8 (RFC 6533 3)."""
    notify: frozenset[str] | None = None
    orcpt: OriginalRecipient | None = None
    if "NOTIFY" in params:
        notify = _notify(params["NOTIFY"])
    if "ORCPT" in params:
        orcpt = _orcpt(params["ORCPT"], smtputf8)
    if notify is None and orcpt is None:
        return NO_RECIPIENT_DSN
    return RecipientDSN(notify, orcpt)


def _notify(value: str | None) -> frozenset[str]:
    if not value or not value.isascii():  # ASCII keywords only (RFC 3461 4.1)
        raise DSNError("Bad NOTIFY parameter")
    # A keyword given twice means it once: RFC 3461's grammar does not
    # forbid it, and Postfix accepts it.
    keywords = frozenset(value.upper().split(","))
    if not keywords <= NOTIFY_KEYWORDS:
        raise DSNError("Bad NOTIFY parameter (NEVER, or SUCCESS, FAILURE, DELAY)")
    if "NEVER" in keywords and len(keywords) > 1:
        raise DSNError("Bad NOTIFY parameter: NEVER must appear alone")
    return keywords


def _orcpt(value: str | None, smtputf8: bool = False) -> OriginalRecipient:
    if not value or len(value) > MAX_ORCPT:
        raise DSNError("Bad ORCPT parameter")
    addr_type, semicolon, encoded = value.partition(";")
    if not semicolon or not encoded or not _ATOM.fullmatch(addr_type):
        raise DSNError("Bad ORCPT parameter (addr-type;xtext)")
    utf8_type = addr_type.lower() == "utf-8"
    if encoded.isascii():
        try:
            address = xtext_decode(encoded)
        except DSNError:
            raise DSNError("Bad ORCPT parameter: not xtext") from None
        if not _PRINTABLE.fullmatch(address):
            # Octets written as +XX: Postfix's client gives a UTF-8
            # recipient's address so (rfc822;j+C3+B6rg@...). Taken as the
            # UTF-8 text they spell; anything else is refused.
            try:
                address = address.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                raise DSNError("Bad ORCPT parameter: not UTF-8") from None
            if not address.isprintable():
                raise DSNError("Bad ORCPT parameter")
    else:
        # RFC 6533 3: utf-8-addr-unitext, the raw UTF-8 form, with SMTPUTF8
        # only; "+" and "=" are written \x{2B}, \x{3D} there, not xtext.
        if not (smtputf8 and utf8_type):
            raise DSNError("Bad ORCPT parameter: raw UTF-8 needs SMTPUTF8 and the utf-8 type")
        if not encoded.isprintable() or _NOT_UNITEXT.search(encoded):
            raise DSNError("Bad ORCPT parameter: not a utf-8 address (RFC 6533)")
        address = encoded
    if utf8_type and not _utf8_addr(address):
        raise DSNError("Bad ORCPT parameter: not a utf-8 address (RFC 6533)")
    return OriginalRecipient(addr_type, address)


_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _utf8_addr(text: str) -> bool:
    """Whether ``text`` is an RFC 6533 ``utf-8-addr-xtext``: each ``\\x{HEX}``
    names a Unicode scalar value that is not a control character, and no
    other backslash appears."""
    for match in _UTF8_ESCAPE.finditer(text):
        point = int(match.group(1), 16)
        if point < 0x20 or 0x7F <= point < 0xA0 or 0xD800 <= point <= 0xDFFF or point > 0x10FFFF:
            return False
    return "\\" not in _UTF8_ESCAPE.sub("", text)

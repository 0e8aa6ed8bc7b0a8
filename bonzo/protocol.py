"""The SMTP protocol as a state machine with no I/O.

:class:`SMTPProtocol` takes the bytes a client sends (:meth:`~SMTPProtocol.receive_data`)
and hands back, one at a time, what needs the caller's attention
(:meth:`~SMTPProtocol.next_event`): an :class:`Event` to answer with
:meth:`~SMTPProtocol.accept` or :meth:`~SMTPProtocol.reject`, a
:class:`DataChunk` of message content to store, or one of three states —
:data:`NEED_DATA` (read more), :data:`PAUSED` (send what
:meth:`~SMTPProtocol.data_to_send` returns and wait until the client has
taken it) and :data:`CLOSED` (send it, then close). It knows nothing of
sockets, Tornado or plugins (the h11 model), which is what makes it testable
byte for byte and fast: every complete line in a chunk is split in one pass,
and the replies to a pipelined batch come out together.

Everything that needs no policy is answered here: syntax errors, bad command
order, limits, NOOP, HELP, VRFY, QUIT. Only the commands a policy may refuse
(HELO/EHLO, MAIL, RCPT, DATA, RSET, STARTTLS, AUTH, the end of a message and
unknown verbs) surface as events.

Every reply after the greeting carries an RFC 3463 enhanced status code
(RFC 2034 4: "regardless of whether or not EHLO is employed"), except the
HELO/EHLO reply itself. The original Bonzo API's sessions
(``legacy_replies=True``) keep that version's texts, without codes, until the
client says EHLO.

Verbs, ESMTP keywords and SASL mechanism names are compared as ASCII only:
``ſTARTTLS`` is not STARTTLS (``"ſ".upper() == "S"`` in Python), and a
non-ASCII verb is an unknown command.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeAlias

from .address import NULL_SENDER, Address, canonical_domain
from .dsn import (
    NO_MAIL_DSN,
    NO_RECIPIENT_DSN,
    DSNError,
    MailDSN,
    RecipientDSN,
    mail_dsn,
    recipient_dsn,
)
from .errors import SMTPError, default_enhanced_code, enhanced_code_problem
from .proxy import XCLIENT_ATTRIBUTES, XClientError, parse_xclient
from .settings import EXTENSION_ALLOWANCE, SMTPSettings

__all__ = [
    "SMTPProtocol",
    "Policy",
    "Event",
    "Helo",
    "Mail",
    "Rcpt",
    "Data",
    "Reset",
    "Unknown",
    "StartTLS",
    "Auth",
    "AuthResponse",
    "DataChunk",
    "MessageComplete",
    "XClient",
    "NeedData",
    "Paused",
    "Closed",
    "NEED_DATA",
    "PAUSED",
    "CLOSED",
    "NextEvent",
    "Refusal",
    "format_reply",
    "parse_path",
    "parse_address",
    "parse_domain",
    "AddressError",
    "data_scan_in_c",
    "SMALL_CHUNK",
]


class AddressError(ValueError):
    """A mailbox or path that does not parse; ``reply`` is what to answer."""

    def __init__(self, reply: SMTPError) -> None:
        super().__init__(reply.message)
        self.reply = reply


class NeedData:
    """The type of :data:`NEED_DATA`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


class Paused:
    """The type of :data:`PAUSED`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PAUSED"


class Closed:
    """The type of :data:`CLOSED`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CLOSED"


#: :meth:`SMTPProtocol.next_event` needs more input.
NEED_DATA: Final = NeedData()
#: More than ``max_write_backlog`` octets of replies are waiting: send them
#: and wait until the client has read them before asking for the next event
#: (h11's PAUSED). A client that pipelines without reading never makes the
#: server hold more than that.
PAUSED: Final = Paused()
#: The session is over: send what :meth:`SMTPProtocol.data_to_send` returns,
#: then close.
CLOSED: Final = Closed()


class Event:
    """Base class of the events that need an :meth:`~SMTPProtocol.accept` or
    :meth:`~SMTPProtocol.reject`. Events are immutable."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Helo(Event):
    """``HELO`` or ``EHLO`` (``esmtp`` is true for EHLO)."""

    name: str
    esmtp: bool


@dataclass(frozen=True, slots=True)
class Mail(Event):
    """``MAIL FROM``: ``mailbox`` is the sender (:attr:`Address.original
    <bonzo.address.Address.original>` is ``""`` for the null sender);
    ``params`` maps upper-cased ESMTP keywords to their value (``None`` for a
    bare keyword); ``dsn`` holds the checked DSN parameters (RFC 3461)."""

    mailbox: Address
    params: Mapping[str, str | None]
    dsn: MailDSN = NO_MAIL_DSN

    @property
    def address(self) -> str:
        """The sender as the client sent it."""
        return self.mailbox.original


@dataclass(frozen=True, slots=True)
class Rcpt(Event):
    """``RCPT TO``: ``mailbox`` is the recipient, ``params`` as for
    :class:`Mail`, ``dsn`` its checked DSN parameters (RFC 3461)."""

    mailbox: Address
    params: Mapping[str, str | None]
    dsn: RecipientDSN = NO_RECIPIENT_DSN

    @property
    def address(self) -> str:
        """The recipient as the client sent it."""
        return self.mailbox.original


@dataclass(frozen=True, slots=True)
class Data(Event):
    """``DATA``; accepting it answers ``354`` and starts reading the message.

    With ``chunked`` true it is the first ``BDAT`` of a transaction
    (RFC 3030): accepting it starts reading the chunk, with no reply of its
    own; rejecting it ends the transaction, and the refusal is the reply to
    the chunk once its octets have been read and dropped."""

    chunked: bool = False


@dataclass(frozen=True, slots=True)
class Reset(Event):
    """``RSET``; accepting it ends the transaction. It cannot be rejected:
    RSET always succeeds (RFC 5321 4.1.1.5)."""


@dataclass(frozen=True, slots=True)
class Unknown(Event):
    """A verb the core does not implement: ``verb`` upper-cased (ASCII),
    ``sent`` exactly as the client wrote it."""

    verb: str
    arg: str
    sent: str = ""


@dataclass(frozen=True, slots=True)
class StartTLS(Event):
    """``STARTTLS``; accepting it answers ``220`` and drops any input the
    client pipelined after it. The caller then does the TLS handshake and
    calls :meth:`SMTPProtocol.tls_started`."""


@dataclass(frozen=True, slots=True)
class Auth(Event):
    """``AUTH mechanism [initial-response]`` (``initial`` is the base64 text,
    ``"="`` for an empty response, ``None`` if absent). Answer with
    :meth:`SMTPProtocol.auth_challenge`, :meth:`SMTPProtocol.auth_success`
    or :meth:`SMTPProtocol.reject`. ``repr()`` hides the response."""

    mechanism: str
    initial: str | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    """The client's base64 answer to a ``334`` challenge (``*`` never gets
    here: the core answers it, cancelling the exchange). ``repr()`` hides it."""

    line: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class DataChunk:
    """A piece of message content, dot-unstuffed and with line ends handled;
    needs no answer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageComplete(Event):
    """The final dot arrived (or the ``BDAT ... LAST`` chunk has been read).
    ``data`` is the last piece of content. If ``error`` is set the message
    broke a limit and must be rejected with it; otherwise accept it
    (``250``) or reject it. A failed ``BDAT`` chunk also ends its message
    this way, with ``error`` set."""

    data: bytes = field(repr=False)
    error: SMTPError | None = None


@dataclass(frozen=True, slots=True)
class XClient(Event):
    """``XCLIENT`` from a trusted front-end (Postfix's extension), its
    attributes parsed (:func:`bonzo.proxy.parse_xclient`: by name, ``None``
    for "unavailable"). The caller puts the new client in place; accepting
    it starts the session over (no HELO, no AUTH but a ``LOGIN`` given and
    no failed attempt counted, no transaction) and answers with the
    listener's ``220`` greeting."""

    attributes: Mapping[str, str | None]


#: What :meth:`SMTPProtocol.next_event` returns.
NextEvent: TypeAlias = (
    Helo
    | Mail
    | Rcpt
    | Data
    | Reset
    | Unknown
    | StartTLS
    | Auth
    | AuthResponse
    | MessageComplete
    | XClient
    | DataChunk
    | NeedData
    | Paused
    | Closed
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A ``4xx``/``5xx`` reply the core queued, for the log (see
    :class:`SMTPProtocol`'s ``on_refusal``)."""

    stage: str
    """The command's verb, ``"message"`` after the final dot, ``"connect"``
    before the first command, ``"session"`` when the server ended the
    session unprompted (a timeout, a shutdown)."""
    code: int
    enhanced: str
    text: str
    arg: str
    """The command's argument (never an AUTH secret: only the mechanism)."""
    by: str = "core"
    """Who decided: ``"core"`` or the plugin :meth:`SMTPProtocol.reject` was
    told of."""
    log_message: str | None = None
    """The error's ``log_message``, with its arguments."""
    limit: str | None = None
    """The limit or timeout that was hit, if any."""
    auth_failure: bool = False
    """A failed AUTH (counted towards ``max_auth_failures``): its log line
    is the one a fail2ban filter matches."""


@dataclass(frozen=True, slots=True)
class Policy:
    """What a listener allows, given to :class:`SMTPProtocol` at construction."""

    tls_active: bool = False
    """The session is encrypted from the start (implicit TLS)."""

    starttls: bool = False
    """STARTTLS may be offered (the listener has a certificate)."""

    require_tls: bool = False
    """Refuse MAIL with ``530 5.7.0`` until TLS is active."""

    require_auth: bool = False
    """Refuse MAIL with ``530 5.7.0`` until the client has authenticated."""

    auth_mechanisms: tuple[str, ...] = ()
    """SASL mechanisms that may be offered (empty: no AUTH at all)."""

    auth_plaintext: bool = False
    """Offer AUTH on a connection without TLS."""

    legacy_replies: bool = False
    """The original Bonzo API's texts, without enhanced codes, in sessions
    that have not said EHLO."""


def _ascii_upper(text: str) -> str:
    """``text`` with only its ASCII letters upper-cased.

    ``str.upper()`` maps ``ſ`` to ``S`` and ``ı`` to ``I``, so ``ſTARTTLS``
    would match STARTTLS: every keyword comparison goes through this.
    """
    if text.isascii():
        return text.upper()
    return text.encode("utf-8", "surrogatepass").upper().decode("utf-8", "surrogatepass")


# C0 controls, DEL and the C1 controls (U+0080-U+009F, valid UTF-8 but still
# control characters that must not reach a header or a log line).
_CTL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# RFC 5321 4.1.2 atext plus "." for dot-atoms; non-ASCII allowed for SMTPUTF8.
_LOCAL_DOT_ATOM = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+"
    r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]+)*"
)
_QUOTED_LOCAL = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*"
    r"[A-Za-z0-9\u0080-\U0010ffff])?\.)*"
    r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]*"
    r"[A-Za-z0-9\u0080-\U0010ffff])?"
)
# The usual all-ASCII forms, tried first: same language, a much cheaper regex.
_ASCII_LOCAL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+)*"
)
_ASCII_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
)
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")
# RFC 5321 4.1.3: a General-address-literal is Standardized-tag ":" dcontent.
_GENERAL_LITERAL = re.compile(
    r"\[[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?:[\x21-\x5a\x5e-\x7e]+\]"
)
# The usual path, <dot-atom@ascii-domain> with no parameters, in one match.
_SIMPLE_PATH = re.compile(
    r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+)*)@"
    r"((?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)>"
)
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")


def _crlf_lines(block: bytes) -> bytes:
    """``block`` with each CRLF, bare CR and bare LF made one CRLF (CR CR LF
    is two line ends). Three C-speed passes: a regular expression's
    substitution costs a Python-level call per line end, 50 times the CPU
    per octet on content made of line ends (a client sending them to hold
    the worker)."""
    return block.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


_SIZE_VALUE = re.compile(r"[0-9]{1,20}")

# Limits a message can break, by the rank that decides which one is reported.
_RANK_SIZE = 1
_RANK_BARE = 2
_RANK_LINE = 3


#: The limit each of those replies reports, for the refusal's log line.
_DATA_LIMITS = {552: "max_message_size", 500: "max_data_line", 550: "bare_newline"}


def _data_error(rank: int) -> SMTPError:
    if rank == _RANK_LINE:
        return SMTPError(500, "Line too long", enhanced_code="5.5.2")
    if rank == _RANK_BARE:
        return SMTPError(550, "Bare LF or CR in message content", enhanced_code="5.5.2")
    return SMTPError(552, "Message size exceeds fixed maximum message size", enhanced_code="5.3.4")


#: The longest name HELO or EHLO takes (a domain's limit, RFC 5321 4.5.3.1.2).
_MAX_HELO_NAME = 255
#: A chunk smaller than this that is not the LAST counts as a junk command:
#: each BDAT costs the server far more than its few octets cost the client,
#: so a message in thousands of tiny chunks would pin a core. Clients chunk
#: by their buffer size (kilobytes); a few small chunks in a message are fine.
SMALL_CHUNK = 512
_COMMANDS_HELP = "EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"


_REPLY_CACHE: dict[tuple[int, Any, str | None, bool], bytes] = {}
_REPLY_CACHE_SIZE = 512


# Facts that scan_data reports about the content lines it went over.
SCAN_DOTS: Final = 1  # a line at a line start begins with a dot (to unstuff)
SCAN_BARE: Final = 2  # a CR not followed by LF, or an LF not preceded by CR
SCAN_LONG: Final = 4  # a line longer than max_line octets, LF included


def _has_long_line(buf: bytes | bytearray, start: int, end: int, limit: int) -> bool:
    """True if a line of ``buf[start:end]`` (lines end in LF; the range ends
    with one) is longer than ``limit`` octets, LF included.

    Every window of ``limit`` octets starting at a line start must hold an
    LF; jumping to the last LF of each window checks that in about
    ``(end - start) / limit`` C-speed searches instead of one Python step per line.
    """
    pos = start
    while end - pos > limit:
        nl = buf.rfind(b"\n", pos, pos + limit)
        if nl < 0:
            return True
        pos = nl + 1
    return False


def _scan_data_py(
    buf: bytes | bytearray, start: int, line_start: bool, max_line: int
) -> tuple[int, int, int]:
    """Scan message content in ``buf`` from ``start``, line by line.

    Returns ``(end, cut, flags)``: ``end`` is the index of the dot of the
    final ``.CRLF`` line (found only at a line start: after CRLF, or at
    ``start`` when ``line_start``), or -1; ``cut`` is where the complete
    lines before it end (``end`` if found, else just past the last LF); and
    ``flags`` holds the ``SCAN_*`` facts about the lines in ``[start, cut)``.

    This is the reference implementation; ``bonzo._speedups.scan_data`` does
    the same in one pass of C. Here each fact is one C-speed search or count
    over the whole range rather than a Python step per line.
    """
    if line_start and buf[start : start + 3] == b".\r\n":
        return start, start, 0
    # One search finds both the final dot and, usually, that no line starts
    # with a dot (nothing to unstuff); a second one runs only past a stuffed dot.
    first = buf.find(b"\r\n.", start)
    end = first
    if end >= 0 and buf[end + 3 : end + 5] != b"\r\n":
        end = buf.find(b"\r\n.\r\n", end + 1)
    if end >= 0:
        end += 2
        cut = end
    else:
        last = buf.rfind(b"\n", start)
        cut = last + 1 if last >= 0 else start
    flags = 0
    if cut == start:
        return end, cut, flags
    if (line_start and buf[start] == 46) or 0 <= first < cut - 2:  # 46: "."
        flags |= SCAN_DOTS
    if cut - start > max_line and _has_long_line(buf, start, cut, max_line):
        flags |= SCAN_LONG
    crlf = buf.count(b"\r\n", start, cut)
    if buf.count(b"\n", start, cut) != crlf or buf.count(b"\r", start, cut) != crlf:
        flags |= SCAN_BARE
    return end, cut, flags


_scan_data: Callable[[bytes | bytearray, int, bool, int], tuple[int, int, int]] = _scan_data_py
# BONZO_NO_EXTENSION (any non-empty value) keeps the Python scan even when the
# C module is built: to compare the two, or to rule the C one out.
if not os.environ.get("BONZO_NO_EXTENSION"):
    try:
        from ._speedups import scan_data as _scan_data
    except ImportError:  # not built: the same in Python
        pass


def data_scan_in_c() -> bool:
    """True when message content is scanned by the C module
    ``bonzo._speedups`` (built at install time when a C compiler is present),
    False when by the pure-Python scan; both give the same results."""
    return _scan_data is not _scan_data_py


def format_reply(
    code: int, text: str | list[str], enhanced: str | None, esmtp: bool, utf8: bool = False
) -> bytes:
    """Return the wire form of a reply: ``code[-| ][enhanced ]text`` per line.

    The enhanced code is written only when ``esmtp`` is true and the code is a
    2xx/4xx/5xx. Control characters in ``text`` are replaced, and so is every
    non-ASCII character unless ``utf8`` is true (a reply is US-ASCII, RFC
    5321 4.2; UTF-8 only in a transaction the client declared ``SMTPUTF8``,
    RFC 6531 3.7.4.2). Each line is cut so that it stays within 512 octets
    (RFC 5321 4.5.3.1.5).
    """
    if utf8:
        # Rare (SMTPUTF8 transactions only): never cached, so that the
        # cache holds the US-ASCII form of each text.
        return _format_reply(code, text, enhanced, esmtp, True)
    if type(text) is str:
        # Most replies are a few fixed texts: format each once. The cache is
        # bounded, so texts that vary (queue ids) just miss it.
        key = (code, text, enhanced, esmtp)
        wire = _REPLY_CACHE.get(key)
        if wire is None:
            wire = _format_reply(code, text, enhanced, esmtp)
            if len(_REPLY_CACHE) < _REPLY_CACHE_SIZE:
                _REPLY_CACHE[key] = wire
        return wire
    if len(text) <= 32:
        # Multi-line replies (EHLO) repeat too; same bounded cache.
        lines = tuple(text)
        key2 = (code, lines, enhanced, esmtp)
        wire = _REPLY_CACHE.get(key2)
        if wire is None:
            wire = _format_reply(code, list(lines), enhanced, esmtp)
            if len(_REPLY_CACHE) < _REPLY_CACHE_SIZE:
                _REPLY_CACHE[key2] = wire
        return wire
    return _format_reply(code, text, enhanced, esmtp)


def _format_reply(
    code: int, text: str | list[str], enhanced: str | None, esmtp: bool, utf8: bool = False
) -> bytes:
    lines = text.split("\n") if isinstance(text, str) else list(text)
    prefix_enh = ""
    if esmtp and code // 100 in (2, 4, 5):
        if enhanced and enhanced_code_problem(code, enhanced) is not None:
            # Checked where errors are made; one changed afterwards (or a
            # reply built by hand) must still not break the reply line.
            enhanced = None
        prefix_enh = (enhanced or default_enhanced_code(code)) + " "
    out = []
    last = len(lines) - 1
    for n, line in enumerate(lines):
        if _CTL.search(line):
            line = _CTL.sub("?", line)
        if not utf8 and not line.isascii():
            # A plugin's text, a configured reply, a DNS answer (an SPF
            # explanation): a client that did not ask for UTF-8 may fail on it.
            line = _NON_ASCII.sub("?", line)
        sep = " " if n == last else "-"
        wire = f"{code}{sep}{prefix_enh}{line}"
        encoded = wire.encode("utf-8", "replace")
        if len(encoded) > 510:
            encoded = encoded[:510].decode("utf-8", "ignore").encode("utf-8")
        out.append(encoded + b"\r\n")
    return b"".join(out)


def _addr_error(code: int, enhanced: str, text: str) -> AddressError:
    return AddressError(SMTPError(code, text, enhanced_code=enhanced))


def parse_path(
    arg: str, *, sender: bool, smtputf8: bool | None = False
) -> tuple[Address, dict[str, str | None]]:
    """Parse the argument of ``MAIL FROM:`` / ``RCPT TO:`` after the colon.

    Returns the mailbox as an :class:`~bonzo.address.Address` (with
    :attr:`~bonzo.address.Address.original` ``""`` for the null
    reverse-path) and the ESMTP parameters, keywords upper-cased. Lenient
    like most servers: the angle brackets may be missing when there are no
    parameters, and a source route (``<@a,@b:user@c>``) is accepted and
    dropped (RFC 5321 4.1.1.3, C). A non-ASCII address needs ``smtputf8``
    true, or ``None`` and an ``SMTPUTF8`` parameter on the same command
    (``MAIL``, RFC 6531 3.4).
    Raises :class:`AddressError` carrying the reply to give.
    """
    simple = _SIMPLE_PATH.fullmatch(arg)
    if simple is not None and len(arg) <= 256 and simple.end(1) - 1 <= 64:
        # The same checks as below, all passed in one match.
        local, domain = simple.group(1, 2)
        return Address(arg[1:-1], local, domain.lower()), {}
    enh = "5.1.7" if sender else "5.1.3"
    what = "sender" if sender else "recipient"
    arg = arg.strip(" ")
    if arg.startswith("<"):
        end = _closing_bracket(arg)
        if end < 0:
            raise _addr_error(501, enh, f"Bad {what} address syntax")
        path = arg[1:end]
        rest = arg[end + 1 :]
        if rest and not rest.startswith(" "):
            raise _addr_error(501, enh, f"Bad {what} address syntax")
    else:
        path, _, rest = arg.partition(" ")
    params = _parse_params(rest)
    if smtputf8 is None:
        smtputf8 = "SMTPUTF8" in params
    if not path:
        if sender and arg.startswith("<"):
            return NULL_SENDER, params
        raise _addr_error(501, enh, f"Bad {what} address syntax")
    # The limit is on the whole path, route and brackets included, in octets.
    if len(path.encode("utf-8", "surrogatepass")) + 2 > 256:
        raise _addr_error(501, enh, "Path too long")
    if path.startswith("@"):
        # Source route: RFC 5321 says accept it and ignore the route.
        colon = path.find(":")
        if colon < 0 or not _is_route(path[:colon]):
            raise _addr_error(501, enh, f"Bad {what} address syntax")
        path = path[colon + 1 :]
    if not path.isascii() and not smtputf8:
        raise _addr_error(553, "5.6.7", f"Non-ASCII {what} address requires SMTPUTF8")
    if not sender and path.isascii() and path.lower() == "postmaster":
        return Address.parse(path), params
    at = path.rfind("@")
    if at <= 0 or at == len(path) - 1:
        raise _addr_error(501, enh, f"Bad {what} address syntax")
    local, domain = path[:at], path[at + 1 :]
    if len(local.encode("utf-8", "surrogatepass")) > 64:
        raise _addr_error(501, enh, "Local part too long")
    if len(domain.encode("utf-8", "surrogatepass")) > 255:
        raise _addr_error(501, enh, "Domain too long")
    if not (
        (
            _ASCII_LOCAL.fullmatch(local)
            or _LOCAL_DOT_ATOM.fullmatch(local)
            or _QUOTED_LOCAL.fullmatch(local)
        )
        and (
            _ASCII_DOMAIN.fullmatch(domain) or _DOMAIN.fullmatch(domain) or _address_literal(domain)
        )
    ):
        raise _addr_error(501, enh, f"Bad {what} address syntax")
    try:
        return Address.parse(path), params
    except ValueError:  # a domain with no IDNA form
        raise _addr_error(501, enh, f"Bad {what} address syntax") from None


def _address_literal(domain: str) -> bool:
    """Whether ``domain`` is an address literal of RFC 5321 4.1.3: four
    decimal octets, ``IPv6:`` and an IPv6 address, or a tag, a colon and
    its content (not ``[300.1.1.1]``, ``[1.2.3]`` or ``[foo]``)."""
    if not _ADDRESS_LITERAL.fullmatch(domain):
        return False
    inner = domain[1:-1]
    try:
        if inner[:5].upper() == "IPV6:":
            ipaddress.IPv6Address(inner[5:])
            return "%" not in inner  # no zone index in a literal
        if ":" not in inner:
            ipaddress.IPv4Address(inner)
            return True
    except ValueError:
        return False
    return _GENERAL_LITERAL.fullmatch(domain) is not None


def parse_address(text: str) -> Address:
    """An address a person wrote — in a configuration file, a plugin's
    table — checked as a client's ``RCPT TO`` is (``local@domain`` or
    ``postmaster``; UTF-8 allowed; no angle brackets, no source route).
    Returns its :class:`~bonzo.address.Address`, whose
    :attr:`~bonzo.address.Address.canonical` form is the one to match on.
    Raises :class:`ValueError` saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected an address such as user@example.org, got {text!r}")
    path = text.strip()
    if path[:1] in ("<", "@") or path.endswith(">"):
        raise ValueError(f"write the address without angle brackets or route: {text!r}")
    try:
        address, params = parse_path(f"<{path}>", sender=False, smtputf8=True)
    except AddressError as exc:
        reason = exc.reply.message
        why = "" if "syntax" in reason else f" ({reason.lower()})"
        raise ValueError(f"not a valid address{why}: {text!r}") from None
    if params:  # pragma: no cover - a path in brackets has no parameters
        raise ValueError(f"not a valid address: {text!r}")
    return address


def parse_domain(text: str) -> str:
    """A domain a person wrote (a configuration file, a plugin's table), in
    canonical form: lower-case ASCII, IDNA A-labels (``bücher.example`` →
    ``xn--bcher-kva.example``), or a normalised address literal
    (``[192.0.2.1]``). Raises :class:`ValueError` saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected a domain such as example.org, got {text!r}")
    domain = text.strip()
    if len(domain.encode("utf-8", "surrogatepass")) > 255:
        raise ValueError(f"not a valid domain (too long): {text!r}")
    if not (
        _ASCII_DOMAIN.fullmatch(domain)
        or _DOMAIN.fullmatch(domain)
        or _ADDRESS_LITERAL.fullmatch(domain)
    ):
        raise ValueError(f"not a valid domain: {text!r}")
    try:
        return canonical_domain(domain)
    except ValueError as exc:
        raise ValueError(f"not a valid domain ({exc}): {text!r}") from None


def _is_route(route: str) -> bool:
    """True for an RFC 5321 A-d-l: ``@domain`` hops separated by commas."""
    for hop in route.split(","):
        domain = hop[1:]
        if hop[:1] != "@" or not (_DOMAIN.fullmatch(domain) or _address_literal(domain)):
            return False
    return True


def _closing_bracket(arg: str) -> int:
    """Index of the ``>`` closing a path, honouring quoted local parts."""
    if '"' not in arg:
        return arg.find(">", 1)
    quoted = False
    escaped = False
    for i in range(1, len(arg)):
        ch = arg[i]
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def _parse_params(rest: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in rest.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(key) or (eq and not value):
            raise AddressError(SMTPError(501, "Bad parameter syntax", enhanced_code="5.5.4"))
        key = key.upper()
        if key in params:
            raise AddressError(SMTPError(501, f"Duplicate parameter {key}", enhanced_code="5.5.4"))
        params[key] = value if eq else None
    return params


_COMMAND = 0
_DATA = 1
_DISCARD_BDAT = 2
_CLOSED = 3
_AUTH = 4
_TLS_WAIT = 5
_BDAT = 6

# What follows a BDAT chunk that is read only to be dropped (RFC 3030 2: the
# reply comes once its octets have been read).
_AFTER_ERROR = 0  # a core error: counted and logged then
_AFTER_WRITE = 1  # a plugin's refusal, already counted and logged: write it
_AFTER_MESSAGE = 2  # the end of the transaction's message: MessageComplete(error)

#: A command's handler: called with the protocol and the argument text;
#: returns an :class:`Event`, ``None`` (answered already) or :data:`CLOSED`.
VerbHandler: TypeAlias = Callable[["SMTPProtocol", str], Any]


class SMTPProtocol:
    """One SMTP session, as a state machine with no I/O.

    :arg SMTPSettings settings: limits and behaviour.
    :arg str remote_ip: the client's address, for the HELO reply.
    :arg Policy policy: what the listener allows (TLS, AUTH, legacy texts).
    :arg on_refusal: called with a :class:`Refusal` for every ``4xx``/``5xx``
        reply; the connection logs it.

    The caller loops: feed what the socket gives to :meth:`receive_data`,
    call :meth:`next_event` until it returns :data:`NEED_DATA` (read more),
    :data:`PAUSED` (send, wait for the client to read, go on) or
    :data:`CLOSED` (send and close), answer each :class:`Event` with
    :meth:`accept` or :meth:`reject`, store :class:`DataChunk` contents, and
    write out :meth:`data_to_send`.

    The verbs it knows are the class's :attr:`VERBS` table, shared by every
    instance until :meth:`add_verb` gives one instance a copy of its own; a
    subclass (LMTP) extends the table it inherits.
    """

    #: Handlers by upper-case ASCII verb (filled in below the class).
    VERBS: ClassVar[dict[str, VerbHandler]] = {}
    #: The protocol's name: ``"SMTP"``, or ``"LMTP"`` for
    #: :class:`bonzo.lmtp.LMTPProtocol`.
    name: ClassVar[str] = "SMTP"

    def __init__(
        self,
        settings: SMTPSettings,
        remote_ip: str = "",
        policy: Policy | None = None,
        *,
        on_refusal: Callable[[Refusal], None] | None = None,
    ) -> None:
        policy = policy if policy is not None else Policy()
        self.settings = settings
        self.remote_ip = remote_ip
        self.policy = policy
        #: The verb table of this session (see :meth:`add_verb`).
        self.verbs: dict[str, VerbHandler] = type(self).VERBS
        #: Called with a :class:`Refusal` for every ``4xx``/``5xx`` reply
        #: (``None``: nobody); the ``on_refusal`` argument.
        self.on_refusal = on_refusal
        #: The HELO/EHLO name once accepted, else ``None``.
        self.helo: str | None = None
        #: True once the client has said EHLO.
        self.esmtp = False
        #: The sender of the open transaction, ``None`` outside one.
        self.mail_from: Address | None = None
        #: The transaction's MAIL parameters.
        self.mail_params: Mapping[str, str | None] = {}
        #: Recipients accepted in the open transaction.
        self.rcpt_count = 0
        self._rcpt_overshoot = 0
        #: Messages accepted on this connection.
        self.messages = 0
        #: Error replies given so far (counts toward ``max_errors``).
        self.errors = 0
        #: Unknown commands so far (counts toward ``max_unknown_commands``).
        self.unknown_commands = 0
        #: Commands that did no mail work since the last accepted message
        #: (counts toward ``max_junk_commands``).
        self.junk_commands = 0
        #: Size of the message being received, after unstuffing.
        self.data_size = 0
        #: Notes about the session for the log, e.g. ``"bare_lf"``.
        self.notes: set[str] = set()
        #: True when the session is encrypted (after STARTTLS, or implicit TLS).
        self.tls_active = policy.tls_active
        #: Facts about the TLS session (:func:`bonzo.tls.tls_facts`), set by
        #: the driver once a handshake succeeded.
        self.tls_info: dict[str, Any] | None = None
        #: AUTH mechanisms that may be offered (empty: no AUTH at all).
        self.auth_mechanisms = policy.auth_mechanisms
        #: The authenticated identity, once AUTH succeeded.
        self.authenticated: str | None = None
        #: The SASL mechanism it authenticated with (``None`` for an identity
        #: a trusted front end gave through XCLIENT).
        self.auth_mechanism: str | None = None
        #: Failed AUTH attempts so far.
        self.auth_failures = 0
        #: The client may use ``XCLIENT`` (a trusted front-end): it is
        #: advertised and accepted (the connection sets this).
        self.xclient_allowed = False
        #: The verb of the command being answered, for logs (``"connect"``
        #: before the first command, ``"message"`` after the final dot).
        self.stage = "connect"
        self._arg = ""
        self._state = _COMMAND
        self._buf = bytearray()
        self._pos = 0
        self._out: list[bytes] = []
        self._out_size = 0
        self._pending: Event | None = None
        self._discarding_line = False
        self._discarding_auth = False
        #: The first octets (after blanks, up to 5) of an overlong line being
        #: discarded: whether it is a BDAT command, however it arrives.
        self._discard_head = b""
        # DATA state. _line_start: the next octet starts a line for framing
        # (after CRLF: only CRLF.CRLF ends the data); _unstuff_start: it
        # starts a line for dot-unstuffing (also after a bare LF when bare
        # line ends are normalised, as a client that sends LF lines stuffs).
        self._line_start = True
        self._unstuff_start = True
        self._data_error: SMTPError | None = None
        self._data_rank = 0
        # BDAT state (RFC 3030). _bdat_left: octets of the current chunk
        # still to read; _bdat_last: it is the LAST one; _bdat_chunk: its
        # size; _bdat_after: what to answer once a dropped chunk is read;
        # _bdat_started: the transaction's message is coming in chunks;
        # _bdat_total: chunk octets announced in it (the size limit);
        # _bdat_binary: BODY=BINARYMIME, kept octet for octet;
        # _bdat_cr: a CR held back at the end of a read, which may be half of
        # a CRLF; _bdat_line: octets of the line that has not ended yet.
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_chunk = 0
        self._bdat_after: tuple[int, SMTPError] | None = None
        # The BDAT command being answered said LAST; and the message ended
        # (refused) at a chunk that was not the LAST one: LMTP then gives
        # one reply, not one per recipient (RFC 2033 4.2 with RFC 3030 2).
        self._chunk_last = False
        self._ended_before_last = False
        self._bdat_started = False
        self._bdat_total = 0
        self._bdat_binary = False
        self._bdat_cr = False
        self._bdat_line = 0
        self._bare_mode = settings.bare_newline
        self._max_line = settings.max_command_line
        self._max_mail_line = settings.max_command_line + EXTENSION_ALLOWANCE
        self._backlog = settings.max_write_backlog

    def add_verb(self, verb: str, handler: VerbHandler) -> None:
        """Handle ``verb`` (ASCII, any case) with ``handler(protocol, arg)``
        in this session only; the class's table is copied on first use."""
        if not verb.isascii() or not verb.isalnum():
            raise ValueError(f"a verb is ASCII letters and digits, not {verb!r}")
        if self.verbs is type(self).VERBS:
            self.verbs = dict(self.verbs)
        self.verbs[verb.upper()] = handler

    # ------------------------------------------------------------------ I/O
    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the client."""
        if self._state == _CLOSED:
            return
        if self._pos:
            # bytearray deletes from the front in O(1) (it moves its start).
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def data_to_send(self) -> bytes:
        """Return (and forget) the replies produced so far, as one block."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        return data

    @property
    def pending_output(self) -> int:
        """Number of reply octets waiting in :meth:`data_to_send`."""
        return self._out_size

    @property
    def buffered(self) -> int:
        """Octets received but not yet consumed."""
        return len(self._buf) - self._pos

    @property
    def in_data(self) -> bool:
        """True while message content is being received (after DATA, or
        while a BDAT chunk is read)."""
        return self._state == _DATA or self._state == _BDAT

    @property
    def receiving_content(self) -> bool:
        """True while a message is on its way: octets of content arrive
        (DATA, a BDAT chunk being read or dropped), or between the chunks of
        a BDAT message. The DATA timeouts apply then rather than the command
        ones, so a message sent in tiny chunks is held to the DATA rate, and
        a shutdown lets it finish."""
        state = self._state
        return (
            state == _DATA
            or state == _BDAT
            or state == _DISCARD_BDAT
            or (state == _COMMAND and self._bdat_started)
        )

    @property
    def in_transaction(self) -> bool:
        """True between an accepted MAIL and the end of its message or RSET."""
        return self.mail_from is not None

    @property
    def closed(self) -> bool:
        """True once the session is over."""
        return self._state == _CLOSED

    @property
    def pending_event(self) -> Event | None:
        """The event waiting for :meth:`accept` or :meth:`reject`, if any."""
        return self._pending

    @property
    def partial_line(self) -> bool:
        """True when part of a command line has arrived but not its end, also
        while an overlong line is being discarded."""
        return (self._state == _COMMAND or self._state == _AUTH) and (
            self._discarding_line or len(self._buf) > self._pos
        )

    @property
    def enhanced_codes(self) -> bool:
        """True when replies carry RFC 3463 codes (always, except in a
        ``legacy_replies`` session that has not said EHLO)."""
        return self.esmtp or not self.policy.legacy_replies

    # --------------------------------------------------------------- replies
    # Every reply goes through _queue and every command line through
    # _handle_line, called as methods of the instance: bonzo.metrics counts
    # them by wrapping both on the instances of a server with metrics on
    # (Metrics.watch), so that a server without metrics pays nothing.
    def _queue(self, wire: bytes) -> None:
        self._out.append(wire)
        self._out_size += len(wire)

    def reply(
        self,
        code: int,
        text: str | list[str],
        enhanced: str | None = None,
        legacy: str | None = None,
    ) -> None:
        """Queue a reply; ``legacy`` is the text for a ``legacy_replies``
        session that has not said EHLO (default: ``text``)."""
        if self.esmtp or not self.policy.legacy_replies:
            self._queue(format_reply(code, text, enhanced, True, "SMTPUTF8" in self.mail_params))
        else:
            # The original API's texts, as that version sent them: a verb it
            # does not know is echoed as the client sent it, UTF-8 included.
            self._queue(format_reply(code, text if legacy is None else legacy, None, False, True))

    def send_greeting(self, text: str | None = None) -> None:
        """Queue the ``220`` greeting (``text`` defaults to the settings' banner)."""
        self._queue(format_reply(220, text or self.settings.greeting, None, False))

    def refuse(
        self,
        error: SMTPError,
        *,
        by: str = "core",
        close: bool = False,
        limit: str | None = None,
    ) -> None:
        """Answer outside any event (a refused connection) with ``error``;
        ends the session when ``close`` is true or the code is 421. ``limit``
        names the limit that refused it, for the log."""
        self._refused(
            error.status_code, error.enhanced_code, error.message, by, error.log_text(), limit
        )
        self._write_error(error)
        if close or error.status_code == 421:
            self._close()

    def close(
        self,
        code: int = 421,
        text: str = "Service closing transmission channel",
        enhanced: str = "4.4.2",
        *,
        limit: str | None = None,
        unprompted: bool = False,
    ) -> None:
        """Queue a final reply (``421`` by default) and end the session;
        ``limit`` names the limit or timeout that ended it, for the log. With
        ``unprompted`` (a timeout, a shutdown: not an answer to a command),
        the log's stage is ``"session"`` rather than the last command. An
        event still pending is abandoned: answering it later does nothing."""
        if self._state == _CLOSED:
            return
        if unprompted:
            self.stage, self._arg = "session", ""
        if code >= 400:
            self._refused(code, enhanced, text, "core", None, limit)
        self.reply(code, text, enhanced)
        self._close()

    def _close(self) -> None:
        self._state = _CLOSED
        self._pending = None
        self._buf.clear()
        self._pos = 0

    def _write_error(self, error: SMTPError) -> None:
        enhanced = self.enhanced_codes  # a property: read once
        utf8 = not enhanced or "SMTPUTF8" in self.mail_params
        self._queue(
            format_reply(error.status_code, error.message, error.enhanced_code, enhanced, utf8)
        )

    def _refused(
        self,
        code: int,
        enhanced: str | None,
        text: str,
        by: str,
        log_message: str | None,
        limit: str | None,
        auth_failure: bool = False,
    ) -> None:
        if self.on_refusal is not None:
            self.on_refusal(
                Refusal(
                    self.stage,
                    code,
                    enhanced or default_enhanced_code(code),
                    text,
                    self._arg,
                    by,
                    log_message,
                    limit,
                    auth_failure,
                )
            )

    def _error(
        self,
        code: int,
        enhanced: str,
        text: str,
        legacy: str | None = None,
        limit: str | None = None,
    ) -> None:
        """Reply with an error to a command, counting it against ``max_errors``
        (``limit``: the limit that refused, for the log line)."""
        self.errors += 1
        if self.errors > self.settings.max_errors:
            self.close(421, "Too many errors, closing connection", "4.7.0", limit="max_errors")
            return
        self._refused(code, enhanced, text, "core", None, limit)
        self.reply(code, text, enhanced, legacy)

    def _junk(self) -> bool:
        """Count a command that does no mail work; False (and the session is
        closed) past ``max_junk_commands``."""
        self.junk_commands += 1
        if self.junk_commands > self.settings.max_junk_commands:
            self.close(
                421, "Too many commands without mail, closing connection", "4.7.0",
                limit="max_junk_commands",
            )  # fmt: skip
            return False
        return True

    # ------------------------------------------------------------ decisions
    def accept(
        self, text: str | list[str] | None = None, *, extensions: list[str] | None = None
    ) -> None:
        """Accept the pending event with its usual positive reply.

        :arg text: replaces the default reply text.
        :arg extensions: for EHLO, the keywords to advertise (default
            :meth:`ehlo_keywords`).

        Does nothing once the session is closed (a shutdown or a timeout may
        close it while a plugin decides).
        """
        event = self._pending
        if event is None:
            if self._state == _CLOSED:
                return
            raise RuntimeError("accept() without a pending event")
        kind = type(event)
        if kind is MessageComplete and event.error is not None:  # type: ignore[attr-defined]
            # Refuse before forgetting the event: it must still be rejected.
            raise RuntimeError("a message that broke a limit cannot be accepted")
        self._pending = None
        # The commands of every message first (events are never subclassed).
        if kind is Rcpt:
            self.rcpt_count += 1
            self.reply(250, text or "Ok", "2.1.5")
        elif kind is Mail:
            self.mail_from = event.mailbox  # type: ignore[attr-defined]
            self.mail_params = event.params  # type: ignore[attr-defined]
            self.rcpt_count = self._rcpt_overshoot = 0
            self.reply(250, text or "Ok", "2.1.0")
        elif kind is Data:
            self._data_error = None
            self._data_rank = 0
            self.data_size = 0
            if event.chunked:  # type: ignore[attr-defined]
                # The first BDAT: read its chunk; the reply comes after it.
                self._bdat_started = True
                body = self.mail_params.get("BODY") or ""
                self._bdat_binary = _ascii_upper(body) == "BINARYMIME"
                self._state = _BDAT
            else:
                self._state = _DATA
                self._line_start = self._unstuff_start = True
                self.reply(354, text or "End data with <CR><LF>.<CR><LF>")
        elif kind is MessageComplete:
            self.messages += 1
            self.junk_commands = 0
            self._reset_transaction()
            self.reply(250, text or "Ok", "2.0.0")
        elif kind is Helo:
            self._reset_transaction()
            self.helo = event.name  # type: ignore[attr-defined]
            self.esmtp = event.esmtp  # type: ignore[attr-defined]
            # The client's address, or (a Unix socket: none) the name it gave.
            who = self.remote_ip if self.remote_ip != "0.0.0.0" else self.helo
            if self.esmtp:
                keywords = self.ehlo_keywords() if extensions is None else extensions
                first = text if isinstance(text, str) else f"{self.settings.hostname} Hello {who}"
                self._queue(format_reply(250, [first, *keywords], None, False))
            else:
                # RFC 5321 4.1.1.1: "250 SP Domain"; the original API's texts
                # greeted without its name.
                name = "" if self.policy.legacy_replies else f"{self.settings.hostname} "
                self._queue(format_reply(250, text or f"{name}Hello {who}", None, False))
        elif kind is Reset:
            self._reset_transaction()
            self.reply(250, text or "Ok", "2.0.0")
        elif kind is StartTLS:
            self.reply(220, text or "Ready to start TLS", "2.0.0")
            if self._pos < len(self._buf):
                # RFC 3207 5 / CVE-2011-0411: plaintext pipelined after
                # STARTTLS must never run inside the TLS session.
                self.notes.add("starttls_pipelined")
            self._buf.clear()
            self._pos = 0
            self._state = _TLS_WAIT
        elif kind is Auth or kind is AuthResponse:
            self._pending = event
            raise RuntimeError("answer AUTH with auth_challenge(), auth_success() or reject()")
        elif kind is XClient:
            # As after connecting (Postfix): the client says EHLO again, and
            # has had no AUTH attempt of its own yet.
            self._reset_transaction()
            self.helo = None
            self.esmtp = False
            self.authenticated = event.attributes.get("LOGIN")  # type: ignore[attr-defined]
            self.auth_mechanism = None
            self.auth_failures = 0
            if isinstance(text, list):
                self._queue(format_reply(220, text, None, False))
            else:
                # The listener's greeting (an LMTP one says LMTP).
                self.send_greeting(text or None)
        else:
            self.reply(250, text or "Ok", "2.0.0")

    def reject(
        self,
        error: SMTPError,
        *,
        by: str = "core",
        close: bool = False,
        limit: str | None = None,
        auth_failure: bool = False,
    ) -> None:
        """Answer the pending event with ``error``; the state does not change
        (except that a finished message ends its transaction). Ends the
        session when ``close`` is true, ``error.close`` is set or the code is
        421. ``by`` names who decided, ``limit`` the limit that refused it,
        for the log. A ``535`` to ``AUTH``, or any ``5xx`` with
        ``auth_failure`` (credentials a plugin refused in its own words),
        counts towards ``max_auth_failures``. Does nothing once the session
        is closed."""
        event = self._pending
        if event is None:
            if self._state == _CLOSED:
                return
            raise RuntimeError("reject() without a pending event")
        if type(event) is Reset:
            raise RuntimeError("RSET cannot be rejected")
        self._pending = None
        code = error.status_code
        note = error.log_text()
        failed = False  # a failed AUTH, counted
        if type(event) is MessageComplete:
            if limit is None and error is event.error:
                limit = _DATA_LIMITS.get(code)  # the limit the core found broken
            self._reset_transaction()
        elif type(event) is Auth or type(event) is AuthResponse:
            self._state = _COMMAND
            if code == 535 or (auth_failure and code >= 500):
                failed = True
                self.auth_failures += 1
                if self.auth_failures >= self.settings.max_auth_failures:
                    self._refused(code, error.enhanced_code, error.message, by, note, None, True)
                    self._write_error(error)
                    self.close(
                        421, "Too many authentication failures", "4.7.0",
                        limit="max_auth_failures",
                    )  # fmt: skip
                    return
        if close or error.close or code == 421:
            if code >= 400:  # not a plugin's 221 (a verb of its own that quits)
                self._refused(code, error.enhanced_code, error.message, by, note, limit)
            self._write_error(error)
            self._close()
            return
        if type(event) is Unknown and code < 400 and not self._junk():
            # A verb a plugin answered with a 2xx/3xx does no mail work: like
            # NOOP it must not hold a slot forever.
            return
        if type(event) is Unknown and (code == 500 or code == 502):
            # "Not recognized"; a verb a plugin implements (any other reply)
            # is not an unknown command.
            self.unknown_commands += 1
            if self.unknown_commands > self.settings.max_unknown_commands:
                self.close(
                    421, "Too many unknown commands, closing connection", "4.7.0",
                    limit="max_unknown_commands",
                )  # fmt: skip
                return
        if code >= 400:
            self.errors += 1
            if self.errors > self.settings.max_errors:
                if failed:
                    # Its own line all the same: a fail2ban filter counts
                    # failed AUTHs from those, whatever ends the session.
                    self._refused(code, error.enhanced_code, error.message, by, note, None, True)
                self.close(421, "Too many errors, closing connection", "4.7.0", limit="max_errors")
                return
            self._refused(code, error.enhanced_code, error.message, by, note, limit, failed)
        if type(event) is Data and event.chunked:
            # A refused first BDAT ends the transaction (so that no later
            # chunk can make a message without this one), and is answered
            # once its chunk has been read (RFC 3030 2).
            self._reset_transaction()
            self._skip_chunk(_AFTER_WRITE, error)
            return
        self._write_error(error)

    def ehlo_keywords(self) -> list[str]:
        """The EHLO keywords the core implements, in advertising order."""
        size = self.settings.max_message_size
        keywords = ["PIPELINING", f"SIZE {size}" if size else "SIZE", "8BITMIME"]
        if self.settings.smtputf8:
            keywords.append("SMTPUTF8")
        keywords.append("ENHANCEDSTATUSCODES")
        settings = self.settings
        if settings.chunking:
            keywords.append("CHUNKING")
            if settings.binarymime:
                keywords.append("BINARYMIME")
        if settings.dsn:
            keywords.append("DSN")
        if settings.advertise_limits:
            keywords.append(
                f"LIMITS RCPTMAX={settings.max_recipients}"
                f" MAILMAX={settings.max_messages_per_connection}"
            )
        keywords.append("HELP")
        if self.policy.starttls and not self.tls_active:
            keywords.append("STARTTLS")
        if self.auth_offered:
            keywords.append("AUTH " + " ".join(self.auth_mechanisms))
        if self.xclient_allowed:
            keywords.append("XCLIENT " + " ".join(XCLIENT_ATTRIBUTES))
        return keywords

    @property
    def auth_offered(self) -> bool:
        """True when AUTH may be used now: mechanisms exist, the connection is
        encrypted (or plaintext AUTH is allowed) and nobody has logged in."""
        return bool(
            self.auth_mechanisms
            and (self.tls_active or self.policy.auth_plaintext)
            and self.authenticated is None
        )

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: forget everything the
        client said before it (RFC 3207 4.2) and wait for a new EHLO."""
        if self._state != _TLS_WAIT:
            raise RuntimeError("tls_started() without an accepted STARTTLS")
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self.authenticated = self.auth_mechanism = None
        self._reset_transaction()
        self._state = _COMMAND

    def auth_challenge(self, challenge: str) -> None:
        """Answer the pending AUTH step with ``334 <challenge>`` (base64) and
        read the client's next line as an :class:`AuthResponse`."""
        if not isinstance(self._pending, (Auth, AuthResponse)):
            if self._state == _CLOSED:
                return
            raise RuntimeError("auth_challenge() without a pending AUTH")
        self._pending = None
        self._queue(f"334 {challenge}\r\n".encode("ascii"))
        self._state = _AUTH

    def auth_success(self, identity: str, mechanism: str | None = None) -> None:
        """The credentials are good: ``235 2.7.0``; the session acts as
        ``identity``, authenticated with SASL ``mechanism``."""
        if not isinstance(self._pending, (Auth, AuthResponse)):
            if self._state == _CLOSED:
                return
            raise RuntimeError("auth_success() without a pending AUTH")
        self._pending = None
        self._state = _COMMAND
        self.authenticated = identity
        self.auth_mechanism = mechanism
        self.reply(235, "Authentication successful", "2.7.0")

    def _reset_transaction(self) -> None:
        self.mail_from = None
        self.mail_params = {}
        self.rcpt_count = self._rcpt_overshoot = 0
        self._ended_before_last = False
        if self._bdat_started or self._bdat_total:
            self._bdat_started = False
            self._bdat_total = 0
            self._bdat_binary = False
            self._bdat_cr = False
            self._bdat_line = 0

    # --------------------------------------------------------------- events
    def next_event(self) -> NextEvent:
        """Return the next :class:`Event`, a :class:`DataChunk`,
        :data:`NEED_DATA`, :data:`PAUSED` or :data:`CLOSED`.

        Lines that need no decision are answered on the way. Raises
        :class:`RuntimeError` if the previous event is still unanswered.
        """
        if self._pending is not None:
            raise RuntimeError(f"{self._pending!r} has not been accepted or rejected")
        backlog = self._backlog
        while True:
            if self._out_size > backlog:
                return PAUSED
            state = self._state
            if state == _COMMAND:
                event = self._next_command()
            elif state == _DATA:
                return self._next_data()  # type: ignore[no-any-return]
            elif state == _BDAT:
                event = self._next_bdat()
            elif state == _DISCARD_BDAT:
                event = self._discard_bdat()
            elif state == _AUTH:
                event = self._next_auth_line()
            elif state == _TLS_WAIT:
                raise RuntimeError("STARTTLS accepted: do the handshake, then tls_started()")
            else:
                return CLOSED
            if event is not None:
                if isinstance(event, Event):
                    self._pending = event
                return event  # type: ignore[no-any-return]

    def _next_command(self) -> Any:
        buf = self._buf
        pos = self._pos
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if len(buf) - pos > self._max_partial_line():
                # Keep nothing of an overlong line; answer once it ends, as
                # _handle_line would have answered it whole.
                if not self._discarding_line:
                    self._discarding_auth = bool(self.auth_mechanisms) and (
                        buf[pos : pos + 5].upper() == b"AUTH "
                    )
                    self._discard_head = b""
                if len(self._discard_head) < 5:
                    self._note_discarded(bytes(buf[pos:]))
                self._discarding_line = True
                self._pos = len(buf)
            return NEED_DATA
        self._pos = nl + 1
        if self._discarding_line:
            self._discarding_line = False
            self.stage, self._arg = "AUTH" if self._discarding_auth else "?", ""
            if len(self._discard_head) < 5:
                self._note_discarded(bytes(buf[pos : nl + 1]))
            head, self._discard_head = self._discard_head, b""
            if _is_bdat(head):
                return self._bad_bdat_line()
            if self._discarding_auth:
                self._auth_line_too_long()
            else:
                self._error(
                    500, "5.5.2", "Line too long", "Error: line too long", limit="max_command_line"
                )
            return None
        if nl > pos and buf[nl - 1] == 13:  # CRLF
            return self._handle_line(bytes(buf[pos : nl - 1]))
        self.notes.add("bare_lf")
        return self._handle_line(bytes(buf[pos:nl]), bare_lf=True)

    def _note_discarded(self, segment: bytes) -> None:
        """Keep the first non-blank octets of a line being discarded (up to
        5: enough to tell a BDAT command)."""
        head = self._discard_head
        if not head:
            segment = segment.lstrip(b" \t")
        self._discard_head = head + segment[: 5 - len(head)]

    def _max_partial_line(self) -> int:
        if self.auth_mechanisms:
            return max(self._max_mail_line, self.settings.max_auth_line)
        return self._max_mail_line

    def _next_auth_line(self) -> Any:
        buf = self._buf
        pos = self._pos
        nl = buf.find(b"\n", pos)
        limit = self.settings.max_auth_line
        if nl < 0:
            if len(buf) - pos > limit:
                self._discarding_line = True
                self._pos = len(buf)
            return NEED_DATA
        self._pos = nl + 1
        self._state = _COMMAND
        self.stage, self._arg = "AUTH", ""
        end = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
        if self._discarding_line or end - pos + 2 > limit:
            self._discarding_line = False
            self._auth_line_too_long()
            return None
        line = bytes(buf[pos:end]).decode("ascii", "replace").strip(" ")
        if line == "*":
            self._error(501, "5.0.0", "Authentication cancelled")
            return None
        return AuthResponse(line)

    def _handle_line(self, raw: bytes, bare_lf: bool = False) -> Any:
        length = len(raw) + 2
        if length > self._max_line:
            head = raw[:5].upper()
            if head == b"AUTH " and self.auth_mechanisms:
                if length > self.settings.max_auth_line:
                    self.stage, self._arg = "AUTH", ""
                    self._auth_line_too_long()
                    return None
            elif length > self._max_mail_line or head not in (b"MAIL ", b"RCPT "):
                return self._refuse_line(
                    raw, 500, "Line too long", "Error: line too long", limit="max_command_line"
                )
        # After the length check, so that an overlong line gets the same
        # reply whether it was discarded while arriving or seen whole.
        if bare_lf and self._bare_mode == "reject":
            return self._refuse_line(raw, 500, "Bare LF received, lines must end with CRLF")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._refuse_line(raw, 500, "Error: bad UTF-8 syntax")
        if not line.isprintable() and _CTL.search(line):
            return self._refuse_line(raw, 501, "Syntax error: control characters are not allowed")
        line = line.strip(" ")
        verb, _, arg = line.partition(" ")
        arg = arg.strip(" ")
        key = verb.upper() if verb.isascii() else ""
        self.stage = key or "?"
        # Never an AUTH secret in a log line: only the mechanism.
        self._arg = arg if key != "AUTH" else arg.partition(" ")[0]
        if not line:
            self._error(500, "5.5.2", "Error: bad syntax")
            return None
        handler = self.verbs.get(key) if key else None
        if handler is None:
            if _is_bdat(raw):
                # "BDAT" then a Unicode space or a sign (``BDAT\u00a061``):
                # a front end splitting on any space reads a chunk size, so
                # the chunk must not be run as commands here either.
                self.stage, self._arg = _safe_verb(raw), ""
                return self._bad_bdat_line()
            if not key:
                # A non-ASCII verb never reaches a plugin: no verb is spelled so.
                self._unknown_verb(verb)
                return None
            if len(key) > 12 or not key.isalpha() or not (verb.isupper() or verb.islower()):
                # No verb is spelled so (digits, mixed case): perhaps the
                # base64 credentials of an AUTH that was refused, or sent
                # without waiting for its prompt. Never in a log line.
                self.stage = "?"
            # Nor the argument of a verb the core does not know: a client
            # whose BDAT count was off sends the rest of a line as one, such
            # as "H PLAIN <credentials>" (Postfix does not log them either).
            # A plugin that implements the verb gets it in the event.
            self._arg = ""
            return Unknown(key, arg, verb)
        return handler(self, arg)

    def _refuse_line(
        self,
        raw: bytes,
        code: int,
        text: str,
        legacy: str | None = None,
        limit: str | None = None,
    ) -> Any:
        """Refuse a command line that failed the checks every line goes
        through (``5.5.2``), its verb escaped for the log; a BDAT line closes
        the session instead (:meth:`_bad_bdat_line`)."""
        self.stage, self._arg = _safe_verb(raw), ""
        if _is_bdat(raw):
            return self._bad_bdat_line()
        self._error(code, "5.5.2", text, legacy, limit)
        return None

    def _bad_bdat_line(self) -> Any:
        """A BDAT command line refused before its size was read: the chunk
        that follows cannot be skipped, and reading it as commands would
        run whatever it holds (a second envelope past the filters). Close,
        as for a BDAT without a size (RFC 3030 2)."""
        self.close(421, "Bad BDAT command, closing connection", "4.7.0", limit="BDAT syntax")
        return CLOSED

    def _unknown_verb(self, verb: str) -> None:
        self.unknown_commands += 1
        if self.unknown_commands > self.settings.max_unknown_commands:
            self.close(
                421, "Too many unknown commands, closing connection", "4.7.0",
                limit="max_unknown_commands",
            )  # fmt: skip
        elif self.enhanced_codes:
            self._error(500, "5.5.2", "Error: command not recognized")
        else:
            self._error(502, "5.5.1", f'Error: command "{verb}" not implemented')

    # ---------------------------------------------------------------- verbs
    def _cmd_helo(self, arg: str) -> Any:
        return self._greet(arg, False)

    def _cmd_ehlo(self, arg: str) -> Any:
        return self._greet(arg, True)

    def _greet(self, arg: str, esmtp: bool) -> Any:
        verb = "EHLO" if esmtp else "HELO"
        if not arg:
            self._error(501, "5.5.4", f"Syntax: {verb} hostname")
            return None
        if not arg.isascii():
            # SMTPUTF8 is declared per message, at MAIL (RFC 6531 3.4): it
            # cannot cover the name given before it, which stays ASCII (an
            # IDN in its A-label form).
            why = "hostname must be ASCII (an internationalized name in its xn-- form)"
            self._error(501, "5.5.4", f"The {verb} {why}")
            return None
        if len(arg) > _MAX_HELO_NAME:
            # RFC 5321 4.5.3.1.2: no domain is longer; nothing would show it
            # whole (the trace header cuts it), plugins would judge it whole.
            self._error(501, "5.5.4", f"The {verb} hostname is too long")
            return None
        if not esmtp and self.helo and not self.esmtp and self.policy.legacy_replies:
            # The original Bonzo refused a repeated HELO; kept for its API.
            # EHLO, and anything after EHLO, resets (RFC 5321 4.1.4).
            self._error(503, "5.5.1", "Duplicate HELO/EHLO")
            return None
        if self.helo is not None and not self._junk():
            return None
        return Helo(arg, esmtp)

    def _cmd_mail(self, arg: str) -> Any:
        if not self.helo:
            self._error(503, "5.5.1", "Error: need HELO command")
            return None
        if self.mail_from is not None:
            self._error(503, "5.5.1", "Error: nested MAIL command")
            return None
        if _ascii_upper(arg[:5]) != "FROM:" or not arg[5:].strip(" "):
            self._error(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return None
        if self.policy.require_tls and not self.tls_active:
            self._error(530, "5.7.0", "Must issue a STARTTLS command first")
            return None
        if self.policy.require_auth and self.authenticated is None:
            self._error(530, "5.7.0", "Authentication required")
            return None
        if self.messages >= self.settings.max_messages_per_connection:
            self._error(452, "4.5.3", "Too many messages for this connection")
            return None
        try:
            # The SMTPUTF8 parameter decides whether the address may be UTF-8
            # (RFC 6531 3.4): read from the parsed parameters, never sniffed
            # from the line, where a value such as AUTH=<> holds a ">".
            mailbox, params = parse_path(
                arg[5:], sender=True, smtputf8=None if self.settings.smtputf8 else False
            )
        except AddressError as exc:
            self._reject_now(exc.reply)
            return None
        if not params:
            return Mail(mailbox, params)
        problem = self._check_mail_params(params)
        if problem is not None:
            self._reject_now(problem, "max_message_size" if problem.status_code == 552 else None)
            return None
        dsn = NO_MAIL_DSN
        if "RET" in params or "ENVID" in params:  # only when DSN is offered
            try:
                dsn = mail_dsn(params)
            except DSNError as exc:
                self._reject_now(SMTPError(501, str(exc), enhanced_code="5.5.4"))
                return None
        return Mail(mailbox, params, dsn)

    def _check_mail_params(self, params: dict[str, str | None]) -> SMTPError | None:
        if params and not self.esmtp:
            return SMTPError(555, "MAIL parameters need EHLO", enhanced_code="5.5.4")
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not _SIZE_VALUE.fullmatch(value):
                    return SMTPError(501, "Bad SIZE parameter", enhanced_code="5.5.4")
                limit = self.settings.max_message_size
                if limit and int(value) > limit:
                    return SMTPError(
                        552,
                        "Message size exceeds fixed maximum message size",
                        enhanced_code="5.3.4",
                    )
            elif key == "BODY":
                body = _ascii_upper(value) if value is not None else ""
                if (
                    body != "7BIT"
                    and body != "8BITMIME"
                    and not (
                        body == "BINARYMIME" and self.settings.chunking and self.settings.binarymime
                    )
                ):
                    return SMTPError(501, "Bad BODY parameter", enhanced_code="5.5.4")
            elif (key == "RET" or key == "ENVID") and self.settings.dsn:
                pass  # checked by mail_dsn()
            elif key == "SMTPUTF8" and self.settings.smtputf8:
                if value is not None:
                    return SMTPError(501, "SMTPUTF8 takes no value", enhanced_code="5.5.4")
            elif (
                key == "AUTH"
                and self.auth_mechanisms
                and (self.tls_active or self.policy.auth_plaintext)
            ):
                # RFC 4954 5: the original submitter; accepted and not trusted,
                # where the EHLO reply offered AUTH (not before STARTTLS).
                if value is None:
                    return SMTPError(501, "Bad AUTH parameter", enhanced_code="5.5.4")
            else:
                return SMTPError(555, f"Unsupported parameter {key}", enhanced_code="5.5.4")
        return None

    def _cmd_rcpt(self, arg: str) -> Any:
        if self.mail_from is None:
            self._error(503, "5.5.1", "Error: need MAIL command")
            return None
        if _ascii_upper(arg[:3]) != "TO:" or not arg[3:].strip(" "):
            self._error(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return None
        limit = self.settings.max_recipients
        if self.rcpt_count >= limit:
            # A client that pipelines its recipients (RFC 2920) sends them all
            # before it reads a reply, and sends the rest in a new transaction
            # (RFC 5321 4.5.3.1.10): as many again are answered without
            # counting as errors, so the message it is sending is not lost to
            # max_errors (as Postfix's smtpd_recipient_overshoot_limit).
            self._rcpt_overshoot += 1
            if self._rcpt_overshoot > limit:
                self._error(452, "4.5.3", "Too many recipients", limit="max_recipients")
            else:
                self._refused(452, "4.5.3", "Too many recipients", "core", None, "max_recipients")
                self.reply(452, "Too many recipients", "4.5.3")
            return None
        try:
            mailbox, params = parse_path(
                arg[3:], sender=False, smtputf8="SMTPUTF8" in self.mail_params
            )
        except AddressError as exc:
            self._reject_now(exc.reply)
            return None
        if not params:
            return Rcpt(mailbox, params)
        dsn_params = self.settings.dsn and self.esmtp
        for key in params:
            if not (dsn_params and (key == "NOTIFY" or key == "ORCPT")):
                self._reject_now(
                    SMTPError(555, f"Unsupported parameter {key}", enhanced_code="5.5.4")
                )
                return None
        try:
            dsn = recipient_dsn(params, smtputf8="SMTPUTF8" in self.mail_params)
        except DSNError as exc:
            self._reject_now(SMTPError(501, str(exc), enhanced_code="5.5.4"))
            return None
        return Rcpt(mailbox, params, dsn)

    def _cmd_data(self, arg: str) -> Any:
        if not self.rcpt_count:
            self._error(503, "5.5.1", "Error: need RCPT command")
            return None
        if self._bdat_started:
            # RFC 3030 2: DATA and BDAT are never mixed in one transaction.
            self._error(503, "5.5.1", "Error: DATA after BDAT")
            return None
        body = self.mail_params.get("BODY")
        if body and _ascii_upper(body) == "BINARYMIME":
            # RFC 3030 3: binary content needs BDAT's octet counts.
            self._error(503, "5.5.1", "Error: BODY=BINARYMIME needs BDAT")
            return None
        if arg:
            self._error(501, "5.5.4", "Syntax: DATA")
            return None
        return Data()

    def _cmd_rset(self, arg: str) -> Any:
        if arg:
            self._error(501, "5.5.4", "Syntax: RSET")
            return None
        if not self._junk():
            return None
        return Reset()

    def _cmd_noop(self, arg: str) -> Any:
        if arg and self.policy.legacy_replies and not self.esmtp:
            # Original Bonzo behaviour for its API; RFC 5321 4.1.1.9 says the
            # argument should be ignored, which every other session does.
            self._error(501, "5.5.4", "Syntax: NOOP")
            return None
        if self._junk():
            self.reply(250, "Ok", "2.0.0")
        return None

    def _cmd_quit(self, arg: str) -> Any:
        self.reply(221, "Bye", "2.0.0")
        self._close()
        return CLOSED

    def _cmd_vrfy(self, arg: str) -> Any:
        if not arg:
            self._error(501, "5.5.4", "Syntax: VRFY <address>")
            return None
        if self._junk():
            self.reply(
                252, "Cannot VRFY user, but will accept message and attempt delivery", "2.0.0"
            )
        return None

    def _cmd_help(self, arg: str) -> Any:
        if self._junk():
            self.reply(
                214,
                "Supported commands: " + " ".join(self._usable_verbs()),
                "2.0.0",
                legacy=f"Supported commands: {_COMMANDS_HELP}",  # the original's list
            )
        return None

    def _usable_verbs(self) -> list[str]:
        """The verbs of this session's table that a client may use now, in
        the table's order (BDAT, STARTTLS, AUTH and XCLIENT only when they
        are offered)."""
        offered = {
            "BDAT": self.settings.chunking,
            "STARTTLS": self.policy.starttls and not self.tls_active,
            "AUTH": self.auth_offered,
            "XCLIENT": self.xclient_allowed,
        }
        return [verb for verb in self.verbs if offered.get(verb, True)]

    def _cmd_starttls(self, arg: str) -> Any:
        if not self.policy.starttls and not self.tls_active:
            self._error(
                502,
                "5.5.1",
                "Error: STARTTLS not available",
                legacy='Error: command "STARTTLS" not implemented',
            )
            return None
        if arg:
            self._error(501, "5.5.4", "Syntax: STARTTLS")
            return None
        if self.tls_active:
            self._error(554, "5.5.1", "Error: TLS already active")
            return None
        return StartTLS()

    def _cmd_auth(self, arg: str) -> Any:
        if not self.auth_mechanisms:
            self._error(
                502,
                "5.5.1",
                "Error: AUTH not available",
                legacy='Error: command "AUTH" not implemented',
            )
            return None
        if not self.esmtp:
            self._error(503, "5.5.1", "Error: send EHLO first")
            return None
        if self.authenticated is not None:
            self._error(503, "5.5.1", "Error: already authenticated")
            return None
        if self.mail_from is not None:
            self._error(503, "5.5.1", "Error: AUTH not allowed during a mail transaction")
            return None
        if not (self.tls_active or self.policy.auth_plaintext):
            self._error(538, "5.7.11", "Encryption required for requested authentication mechanism")
            return None
        mechanism, _, initial = arg.partition(" ")
        mechanism = _ascii_upper(mechanism)
        initial = initial.strip(" ")
        if not mechanism or " " in initial:
            self._error(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return None
        if mechanism not in self.auth_mechanisms:
            self._error(504, "5.5.4", "Unrecognized authentication type")
            return None
        return Auth(mechanism, initial or None)

    def _cmd_xclient(self, arg: str) -> Any:
        # Postfix's replies: 550 for a client not allowed, 503 in a
        # transaction, 501 for bad syntax.
        if not self.xclient_allowed:
            self._error(550, "5.7.0", "Error: insufficient authorization")
            return None
        if self.mail_from is not None:
            self._error(503, "5.5.1", "Error: MAIL transaction in progress")
            return None
        try:
            attributes = parse_xclient(arg)
        except XClientError as exc:
            self._error(501, "5.5.4", str(exc))
            return None
        return XClient(attributes)

    def _cmd_bdat(self, arg: str) -> Any:
        size, _, rest = arg.partition(" ")
        if not _SIZE_VALUE.fullmatch(size):
            # Without a size the chunk cannot be skipped: its octets would
            # be read as commands (RFC 3030 2). Close rather than guess.
            self.close(421, "Bad BDAT command, closing connection", "4.7.0", limit="BDAT syntax")
            return CLOSED
        count = int(size)
        self._bdat_left = count
        if not (self.settings.chunking and self.esmtp):
            # CHUNKING is not offered: refuse, and read and drop the
            # announced octets so that they are never run as commands.
            self._state = _DISCARD_BDAT
            self._error(502, "5.5.1", "Error: CHUNKING not supported")
            return None
        rest = rest.strip(" ")
        last = _ascii_upper(rest) == "LAST"
        self._chunk_last = last
        # Every refusal is given once the chunk has been read (RFC 3030 2).
        # One inside a transaction ends it: the client must not send more
        # chunks, and those it pipelined get 503 (need MAIL).
        if rest and not last:
            error = SMTPError(501, "Syntax: BDAT count [LAST]", enhanced_code="5.5.4")
            return self._skip_chunk(_AFTER_MESSAGE if self.mail_from else _AFTER_ERROR, error)
        if self.mail_from is None:
            error = SMTPError(503, "Error: need MAIL command", enhanced_code="5.5.1")
            return self._skip_chunk(_AFTER_ERROR, error)
        if not self.rcpt_count:
            error = SMTPError(503, "Error: need RCPT command", enhanced_code="5.5.1")
            return self._skip_chunk(_AFTER_MESSAGE, error)
        limit = self.settings.max_message_size
        if limit and self._bdat_total + count > limit:
            # RFC 1870 6.3 with RFC 3030: known before the chunk arrives, so
            # none of it is kept; answered once it has been read.
            error = _data_error(_RANK_SIZE)
            return self._skip_chunk(_AFTER_MESSAGE, error)
        if count < SMALL_CHUNK and not last and not self._junk():
            return None  # closed: "BDAT 0" (or 1) over and over does no mail work
        self._bdat_last = last
        self._bdat_chunk = count
        self._bdat_total += count
        if not self._bdat_started:
            # The transaction's first chunk: the same decision as DATA.
            return Data(chunked=True)
        self._state = _BDAT
        return None

    def _skip_chunk(self, after: int, error: SMTPError) -> None:
        """Read and drop the chunk of the current BDAT (``_bdat_left``
        octets), then answer ``error`` as ``after`` says."""
        self._bdat_after = (after, error)
        self._state = _DISCARD_BDAT
        return None

    def _discard_bdat(self) -> Any:
        available = len(self._buf) - self._pos
        take = min(available, self._bdat_left)
        self._pos += take
        self._bdat_left -= take
        if self._bdat_left:
            return NEED_DATA
        if self._state == _DISCARD_BDAT:
            self._state = _COMMAND
        after = self._bdat_after
        if after is None:
            return None  # answered already (CHUNKING not offered)
        self._bdat_after = None
        kind, error = after
        if kind == _AFTER_ERROR:
            self._reject_now(error)
            return None
        if kind == _AFTER_WRITE:
            self._write_error(error)
            return None
        # The refusal is logged with the BDAT command that caused it.
        self._ended_before_last = not self._chunk_last
        return MessageComplete(b"", error)

    # ----------------------------------------------------------------- BDAT
    def _next_bdat(self) -> Any:
        """Hand over the content of the chunk being read; at its end, answer
        it (``250``) or, for the LAST one or one that broke a rule, end the
        message with :class:`MessageComplete`."""
        left = self._bdat_left
        if left:
            buf = self._buf
            pos = self._pos
            take = min(len(buf) - pos, left)
            if not take:
                return NEED_DATA
            self._pos = pos + take
            left = self._bdat_left = left - take
            data = self._chunk_content(bytes(buf[pos : pos + take]), False)
            if data:
                return DataChunk(data)
            if left:
                return NEED_DATA
        self._state = _COMMAND
        last = self._bdat_last
        tail = self._chunk_content(b"", True) if last and self._bdat_cr else b""
        error = self._data_error
        if error is None and not last:
            self.reply(250, f"{self._bdat_chunk} octets received", "2.0.0")
            return None
        # The message ends here: complete (LAST), or refused at the chunk
        # where it broke a rule rather than after the LAST one, so that the
        # client stops sending (RFC 3030 2).
        self._data_error = None
        self._data_rank = 0
        self.stage, self._arg = "message", ""
        self._ended_before_last = not last
        return MessageComplete(tail, error)

    def _chunk_content(self, block: bytes, final: bool) -> bytes:
        """Check and keep a piece of BDAT content, as it arrives.

        BINARYMIME content is kept as it is (RFC 3030 3: every bit of every
        octet). Other content is text in canonical form, CRLF line ends
        (RFC 3030 2): ``bare_newline`` and ``max_data_line`` apply as to
        DATA, but nothing is unstuffed and nothing ends the message. A CR
        last in a read is held back until the next octet shows whether it is
        half of a CRLF (``final``: it is not). The errors are ranked as for
        DATA, so that the one reported does not depend on how the octets
        were cut into reads.
        """
        if self._bdat_binary:
            return self._count(block)
        if self._bdat_cr:
            block = b"\r" + block
            self._bdat_cr = False
        if not final and block[-1:] == b"\r":
            block = block[:-1]
            self._bdat_cr = True
        if not block or self._data_rank == _RANK_LINE:
            return b""  # nothing outranks a long line
        mode = self._bare_mode
        if mode != "allow":
            crlf = block.count(b"\r\n")
            if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
                self.notes.add("bare_lf_data")
                if mode == "normalize":
                    block = _crlf_lines(block)
                else:
                    self._set_data_error(_RANK_BARE)
        if self._long_line(block):
            self._set_data_error(_RANK_LINE)
        if self._data_rank:
            return b""
        return self._count(block)

    def _long_line(self, block: bytes) -> bool:
        """True if ``block``, read after the ``_bdat_line`` octets of a line
        not ended yet, holds or starts a line longer than ``max_data_line``
        (LF included); keeps ``_bdat_line`` up to date."""
        limit = self.settings.max_data_line
        carry = self._bdat_line
        first = block.find(b"\n")
        if first < 0:
            self._bdat_line = carry + len(block)
            return self._bdat_line > limit
        last = block.rfind(b"\n")
        self._bdat_line = len(block) - last - 1
        return (
            carry + first + 1 > limit
            or (last > first and _has_long_line(block, first + 1, last + 1, limit))
            or self._bdat_line > limit
        )

    def _auth_line_too_long(self) -> None:
        self._error(500, "5.5.6", "Authentication exchange line is too long", limit="max_auth_line")

    def _reject_now(self, error: SMTPError, limit: str | None = None) -> None:
        self._error(error.status_code, error.enhanced_code or "", error.message, limit=limit)

    # ----------------------------------------------------------------- DATA
    def _next_data(self) -> Any:
        buf = self._buf
        pos = self._pos
        max_line = self.settings.max_data_line
        end, cut, flags = _scan_data(buf, pos, self._line_start, max_line)
        if end >= 0:
            self._pos = end + 3
            self._state = _COMMAND
            data = self._process_block(bytes(buf[pos:end]), flags) if end > pos else b""
            error = self._data_error
            self._data_error = None
            self._data_rank = 0
            self.stage, self._arg = "message", ""
            event = MessageComplete(data, error)
            self._pending = event
            return event
        # Hand over every complete line, whatever ends it: cutting only at
        # CRLF would buffer bare-LF content without bound. A cut after a bare
        # LF is not a line start for the final dot.
        if cut == pos:
            if len(buf) - pos <= max_line:
                return NEED_DATA
            if self._bare_mode == "normalize":
                # A bare CR ends a line too when line ends are normalised
                # (the CR last in the buffer may be half of a CRLF: wait).
                cr = buf.rfind(b"\r", pos, len(buf) - 1)
                if cr >= 0:
                    cut = cr + 1
                    flags = SCAN_BARE
            if cut == pos:
                self._set_data_error(_RANK_LINE)
                # Keep the last octet: it may be the CR of the line's CRLF.
                self._pos = len(buf) - 1
                self._line_start = self._unstuff_start = False
                return NEED_DATA
        self._pos = cut
        data = self._process_block(bytes(buf[pos:cut]), flags)
        if data:
            return DataChunk(data)
        return NEED_DATA if self._pos >= len(buf) else self._next_data()

    def _set_data_error(self, rank: int) -> None:
        # Errors are ranked (long line > bare LF/CR > size) and the highest
        # found is reported, so that the reply does not depend on how the
        # bytes were cut into reads.
        if rank > self._data_rank:
            self._data_rank = rank
            self._data_error = _data_error(rank)

    def _process_block(self, block: bytes, flags: int) -> bytes:
        """Unstuff, check and normalise complete lines of content, given the
        facts :func:`_scan_data` found in them."""
        unstuff = self._unstuff_start
        ends_crlf = block[-2:] == b"\r\n"
        self._line_start = ends_crlf
        self._unstuff_start = ends_crlf
        rank = self._data_rank
        if rank == _RANK_LINE:
            return b""  # nothing outranks it: just look for the final dot
        bare = flags & SCAN_BARE and self._bare_mode != "allow"
        if bare:
            self.notes.add("bare_lf_data")
            if self._bare_mode == "normalize":
                return self._normalize(block, unstuff)
        # (A line after a bare LF, in normalize mode, is unstuffed too: a
        # leading dot the scan did not flag.)
        stuffed = unstuff and block[:1] == b"."
        if stuffed:
            block = block[1:]
        if flags & SCAN_DOTS:
            stuffed = True
            block = block.replace(b"\r\n.", b"\r\n")
        if flags & SCAN_LONG and (
            # The scan measured the wire form; RFC 5321 4.5.3.1.6 does not
            # count the dot added for transparency (BDAT has none to count).
            not stuffed or _has_long_line(block, 0, len(block), self.settings.max_data_line)
        ):
            self._set_data_error(_RANK_LINE)
            return b""
        if bare:  # reject mode
            self._set_data_error(_RANK_BARE)
            return b""
        if rank:
            return b""  # a lower-ranked error only needs the checks above
        return self._count(block)

    def _normalize(self, block: bytes, unstuff: bool) -> bytes:
        """Content with bare LF or CR, in ``normalize`` mode: each of CRLF, LF
        and CR ends a line (for ``max_data_line`` too), a line after a bare LF
        is unstuffed like one after CRLF (a client that sends LF line ends,
        such as :mod:`smtplib` given bytes, stuffs dots after each LF), and
        the lines are stored with CRLF."""
        self._unstuff_start = block[-1:] == b"\n"
        # Unstuffed first: the dot added for transparency is no part of the
        # line's length (RFC 5321 4.5.3.1.6).
        if unstuff and block[:1] == b".":
            block = block[1:]
        block = block.replace(b"\n.", b"\n")
        limit = self.settings.max_data_line - 2
        if len(block) > limit:
            # Each line, its end made one LF: at most limit + 1 octets.
            lf = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if _has_long_line(lf, 0, len(lf), limit + 1):
                self._set_data_error(_RANK_LINE)
                return b""
        if self._data_rank:
            return b""
        return self._count(_crlf_lines(block))

    def _count(self, block: bytes) -> bytes:
        self.data_size += len(block)
        limit = self.settings.max_message_size
        if limit and self.data_size > limit:
            self._set_data_error(_RANK_SIZE)
            return b""
        return block


def _safe_verb(raw: bytes) -> str:
    """The verb of a line that could not be decoded, for the log: printable
    ASCII as it is, every other octet as ``\\xNN`` (a control character
    must never reach a log line raw)."""
    verb = raw[:16].partition(b" ")[0].upper()
    return "".join(chr(b) if 0x20 < b < 0x7F else f"\\x{b:02x}" for b in verb) or "?"


def _is_bdat(raw: bytes) -> bool:
    """Whether a command line (or its first octets) is a BDAT command:
    after any spaces or tabs (the core takes the verb after spaces),
    ``BDAT`` in any case, then the end or anything but a letter or digit."""
    raw = raw.lstrip(b" \t")
    return raw[:4].upper() == b"BDAT" and (len(raw) == 4 or not raw[4:5].isalnum())


# The commands the core knows, by verb.
SMTPProtocol.VERBS = {
    "HELO": SMTPProtocol._cmd_helo,
    "EHLO": SMTPProtocol._cmd_ehlo,
    "MAIL": SMTPProtocol._cmd_mail,
    "RCPT": SMTPProtocol._cmd_rcpt,
    "DATA": SMTPProtocol._cmd_data,
    "RSET": SMTPProtocol._cmd_rset,
    "NOOP": SMTPProtocol._cmd_noop,
    "QUIT": SMTPProtocol._cmd_quit,
    "VRFY": SMTPProtocol._cmd_vrfy,
    "HELP": SMTPProtocol._cmd_help,
    "BDAT": SMTPProtocol._cmd_bdat,
    "STARTTLS": SMTPProtocol._cmd_starttls,
    "AUTH": SMTPProtocol._cmd_auth,
    "XCLIENT": SMTPProtocol._cmd_xclient,
}

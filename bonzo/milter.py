"""A client for the Sendmail milter protocol (version 6): codec and async client.

A *milter* (mail filter) is a separate process that an MTA asks about each
stage of an SMTP session — connect, HELO, MAIL, RCPT, DATA, headers, body,
end of message — and that answers with a verdict and, at the end of the
message, with changes (headers, body, recipients, sender). OpenDKIM,
OpenDMARC, clamav-milter and rspamd's milter proxy speak it.

The module has two layers:

* a **sans-IO codec**: ``encode_*`` functions build the commands an MTA sends
  (:func:`encode_optneg`, :func:`encode_connect`, ... :func:`encode_quit`),
  :class:`FrameDecoder` splits a byte stream into frames with a bounded size,
  and :func:`decode_response` turns a milter's frame into a typed
  :data:`Response`. The reverse direction (:func:`decode_command`,
  :func:`encode_response`) exists for test peers and for round-trip tests.
* :class:`MilterClient`, an asyncio client for one milter connection (TCP
  ``inet:port@host`` or a Unix socket ``unix:/path``, as Postfix writes
  them; :func:`parse_socket`), with a timeout for each stage.

Wire format (public descriptions of libmilter's ``mfdef.h``): each frame is a
32-bit big-endian length, counting the command byte and the data, then the
command byte, then the data. Strings are NUL-terminated. Every frame we read
is bounded (:data:`MAX_FRAME`), so a hostile milter cannot make us allocate
more than that per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

__all__ = [
    "MilterError",
    "MilterProtocolError",
    "MilterTimeout",
    "MilterUnavailable",
    "SocketSpec",
    "parse_socket",
    "FrameDecoder",
    "Verdict",
    "ReplyCode",
    "HeaderChange",
    "RecipientChange",
    "ChangeSender",
    "ReplaceBody",
    "QuarantineRequest",
    "OptionReply",
    "SymbolList",
    "Response",
    "Command",
    "Outcome",
    "MilterClient",
    "encode_frame",
    "encode_optneg",
    "encode_connect",
    "encode_helo",
    "encode_mail",
    "encode_rcpt",
    "encode_data",
    "encode_header",
    "encode_eoh",
    "encode_body",
    "encode_eob",
    "encode_abort",
    "encode_quit",
    "encode_quit_nc",
    "encode_macro",
    "encode_unknown",
    "encode_response",
    "decode_command",
    "decode_response",
    "split_frame",
]

#: The protocol version this client speaks.
VERSION = 6
#: The largest body chunk in one BODY command (libmilter's ``MILTER_CHUNK_SIZE``).
CHUNK_SIZE = 65535
#: The largest frame we accept from a milter (command byte + data). Body
#: replacements and header values come in frames of at most ``CHUNK_SIZE``
#: data octets unless bigger sizes are negotiated, which we never offer.
MAX_FRAME = CHUNK_SIZE + 1024
#: The most modifications one end of message may carry, and their total size
#: in memory (a body replacement given to a sink does not count).
MAX_CHANGES = 10000
MAX_CHANGE_BYTES = 8 << 20

# ----------------------------------------------------------- commands (MTA→)
C_ABORT = b"A"
C_BODY = b"B"
C_CONNECT = b"C"
C_MACRO = b"D"
C_EOB = b"E"
C_HELO = b"H"
C_QUIT_NC = b"K"
C_HEADER = b"L"
C_MAIL = b"M"
C_EOH = b"N"
C_OPTNEG = b"O"
C_QUIT = b"Q"
C_RCPT = b"R"
C_DATA = b"T"
C_UNKNOWN = b"U"
COMMANDS = frozenset(
    (C_ABORT, C_BODY, C_CONNECT, C_MACRO, C_EOB, C_HELO, C_QUIT_NC, C_HEADER, C_MAIL, C_EOH)
    + (C_OPTNEG, C_QUIT, C_RCPT, C_DATA, C_UNKNOWN)
)

# ---------------------------------------------------------- responses (→MTA)
R_ADDRCPT = b"+"
R_DELRCPT = b"-"
R_ADDRCPT_PAR = b"2"
R_SHUTDOWN = b"4"
R_ACCEPT = b"a"
R_REPLBODY = b"b"
R_CONTINUE = b"c"
R_DISCARD = b"d"
R_CHGFROM = b"e"
R_CONN_FAIL = b"f"
R_ADDHEADER = b"h"
R_INSHEADER = b"i"
R_SETSYMLIST = b"l"
R_CHGHEADER = b"m"
R_PROGRESS = b"p"
R_QUARANTINE = b"q"
R_REJECT = b"r"
R_SKIP = b"s"
R_TEMPFAIL = b"t"
R_REPLYCODE = b"y"
R_OPTNEG = b"O"
#: Responses that carry no data.
SIMPLE_RESPONSES = frozenset(
    (R_ACCEPT, R_CONTINUE, R_DISCARD, R_REJECT, R_TEMPFAIL, R_SKIP, R_PROGRESS)
    + (R_SHUTDOWN, R_CONN_FAIL)
)

# ------------------------------------------------ actions the milter may take
F_ADDHDRS = 0x01
F_CHGBODY = 0x02
F_ADDRCPT = 0x04
F_DELRCPT = 0x08
F_CHGHDRS = 0x10
F_QUARANTINE = 0x20
F_CHGFROM = 0x40
F_ADDRCPT_PAR = 0x80
F_SETSYMLIST = 0x100
#: Every action this client can apply.
ALL_ACTIONS = 0x1FF

# ------------------------------------------------------------ protocol flags
P_NOCONNECT = 0x1
P_NOHELO = 0x2
P_NOMAIL = 0x4
P_NORCPT = 0x8
P_NOBODY = 0x10
P_NOHDRS = 0x20
P_NOEOH = 0x40
P_NR_HDR = 0x80
P_NOUNKNOWN = 0x100
P_NODATA = 0x200
P_SKIP = 0x400
P_RCPT_REJ = 0x800
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NR_DATA = 0x10000
P_NR_UNKN = 0x20000
P_NR_EOH = 0x40000
P_NR_BODY = 0x80000
P_HDR_LEADSPC = 0x100000
#: What this client offers: every step may be skipped or left without reply,
#: SKIP and leading spaces are understood. Not offered: ``RCPT_REJ`` (we
#: only show recipients that reach the filter) and bigger data sizes.
ALL_PROTOCOL = 0x1FFFFF & ~P_RCPT_REJ

# -------------------------------------------------- macro stages (SETSYMLIST)
M_CONNECT = 0
M_HELO = 1
M_ENVFROM = 2
M_ENVRCPT = 3
M_DATA = 4
M_EOM = 5
M_EOH = 6
#: The command whose macros each stage's symbol list names.
STAGE_COMMANDS = {
    M_CONNECT: C_CONNECT,
    M_HELO: C_HELO,
    M_ENVFROM: C_MAIL,
    M_ENVRCPT: C_RCPT,
    M_DATA: C_DATA,
    M_EOM: C_EOB,
    M_EOH: C_EOH,
}

# Address families of CONNECT.
FAMILY_UNKNOWN = "U"
FAMILY_UNIX = "L"
FAMILY_INET = "4"
FAMILY_INET6 = "6"
FAMILIES = (FAMILY_UNKNOWN, FAMILY_UNIX, FAMILY_INET, FAMILY_INET6)

_LENGTH = struct.Struct(">I")
_WORD = struct.Struct(">I")
_PORT = struct.Struct(">H")
#: Strings go over the wire as UTF-8; undecodable octets survive a round trip.
_ENC = ("utf-8", "surrogateescape")


class MilterError(Exception):
    """Talking to a milter failed (the plugin applies its ``default_action``)."""


class MilterProtocolError(MilterError):
    """The milter broke the protocol: a malformed, oversized or unexpected frame."""


class MilterTimeout(MilterError):
    """The milter did not answer within the stage's timeout."""


class MilterUnavailable(MilterError):
    """The milter could not be reached, or closed the connection."""


# ------------------------------------------------------------------- sockets
@dataclass(frozen=True)
class SocketSpec:
    """Where a milter listens: ``family`` ``"inet"``/``"inet6"`` with
    ``host`` and ``port``, or ``"unix"`` with ``path``."""

    family: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        return f"{self.family}:{self.port}@{self.host}"


def parse_socket(text: str) -> SocketSpec:
    """Parse a milter socket as Postfix and Sendmail write it:
    ``inet:PORT@HOST``, ``inet6:PORT@HOST``, ``unix:/path`` (also
    ``local:/path``), or ``inet:HOST:PORT``. A Unix socket path must be
    absolute. Raises :class:`ValueError`."""
    kind, sep, rest = text.strip().partition(":")
    kind = kind.lower()
    if not sep or not rest:
        raise ValueError(f"{text!r} is not a milter socket (inet:port@host or unix:/path)")
    if kind in ("unix", "local"):
        if not rest.startswith("/") or "\0" in rest:
            raise ValueError(f"{text!r}: a Unix socket needs an absolute path")
        return SocketSpec("unix", path=rest)
    if kind not in ("inet", "inet6"):
        raise ValueError(f"{text!r}: unknown socket type {kind!r} (inet, inet6 or unix)")
    if "@" in rest:
        port_text, _, host = rest.partition("@")
    else:
        host, _, port_text = rest.rpartition(":")
    host = host.strip()
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"{text!r}: unbalanced brackets around the host")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: expected {kind}:PORT@HOST with a port from 1 to 65535")
    return SocketSpec(kind, host=host, port=int(port_text))


# ------------------------------------------------------------------- framing
def encode_frame(code: bytes, data: bytes = b"") -> bytes:
    """One frame: the length (command byte included), the command, the data."""
    if len(code) != 1:
        raise ValueError(f"a command is one octet, not {code!r}")
    return _LENGTH.pack(len(data) + 1) + code + data


class FrameDecoder:
    """Split a byte stream into ``(code, data)`` frames.

    :arg max_frame: the largest frame (command byte + data) accepted; a
        longer announced length raises :class:`MilterProtocolError` at once,
        before anything is buffered for it.

    Memory stays below ``max_frame`` plus one read's worth of octets.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Add received octets; return the frames they complete."""
        self._buffer += data
        frames: list[tuple[bytes, bytes]] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def needed(self) -> int:
        """How many more octets the next frame needs (at least 1)."""
        buf = self._buffer
        if len(buf) < 4:
            return 4 - len(buf)
        length: int = _LENGTH.unpack_from(buf)[0]
        return max(1, 4 + length - len(buf))

    def _next(self) -> tuple[bytes, bytes] | None:
        buf = self._buffer
        if len(buf) < 4:
            return None
        (length,) = _LENGTH.unpack_from(buf)
        if length == 0:
            raise MilterProtocolError("a frame of length 0")
        if length > self.max_frame:
            raise MilterProtocolError(f"a frame of {length} octets (at most {self.max_frame})")
        if len(buf) < 4 + length:
            return None
        code = bytes(buf[4:5])
        data = bytes(buf[5 : 4 + length])
        del buf[: 4 + length]
        return code, data

    @property
    def pending(self) -> int:
        """Octets received but not yet part of a complete frame."""
        return len(self._buffer)


def split_frame(frame: bytes) -> tuple[bytes, bytes]:
    """The ``(code, data)`` of exactly one whole frame; :class:`MilterProtocolError`
    for anything else (truncated, trailing octets, bad length)."""
    decoder = FrameDecoder(max_frame=max(len(frame), 1))
    frames = decoder.feed(frame)
    if len(frames) != 1 or decoder.pending:
        raise MilterProtocolError("not exactly one frame")
    return frames[0]


# ------------------------------------------------------------ string helpers
def _cstr(text: str | bytes) -> bytes:
    raw = text if isinstance(text, bytes) else text.encode(*_ENC)
    if b"\0" in raw:
        raise ValueError("a milter string cannot contain NUL")
    return raw + b"\0"


def _strings(data: bytes, what: str) -> list[str]:
    """NUL-terminated strings filling ``data`` exactly."""
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"{what}: strings not NUL-terminated")
    return [part.decode(*_ENC) for part in data[:-1].split(b"\0")]


def _nstrings(data: bytes, n: int, what: str) -> list[str]:
    parts = _strings(data, what)
    if len(parts) != n:
        raise MilterProtocolError(f"{what}: expected {n} strings, got {len(parts)}")
    return parts


def _word(data: bytes, what: str) -> tuple[int, bytes]:
    if len(data) < 4:
        raise MilterProtocolError(f"{what}: truncated")
    return _WORD.unpack_from(data)[0], data[4:]


# ------------------------------------------------------- commands: encoding
def encode_optneg(
    version: int = VERSION, actions: int = ALL_ACTIONS, protocol: int = ALL_PROTOCOL
) -> bytes:
    """OPTNEG: the version we speak, the actions we allow, the protocol steps
    we can leave out."""
    return encode_frame(C_OPTNEG, struct.pack(">III", version, actions, protocol))


def encode_connect(hostname: str, family: str, port: int = 0, address: str = "") -> bytes:
    """CONNECT: the client's host name (``[address]`` when unknown), its
    address family (:data:`FAMILIES`), port and address; the family ``"U"``
    (unknown) carries neither."""
    if family not in FAMILIES:
        raise ValueError(f"unknown address family {family!r}")
    data = _cstr(hostname) + family.encode("ascii")
    if family != FAMILY_UNKNOWN:
        data += _PORT.pack(port) + _cstr(address)
    return encode_frame(C_CONNECT, data)


def encode_helo(name: str) -> bytes:
    """HELO: the name the client gave in HELO or EHLO."""
    return encode_frame(C_HELO, _cstr(name))


def _with_args(code: bytes, address: str, args: Iterable[str]) -> bytes:
    return encode_frame(code, _cstr(address) + b"".join(_cstr(a) for a in args))


def encode_mail(sender: str, args: Iterable[str] = ()) -> bytes:
    """MAIL: the sender (``<address>``, as sent) and each ESMTP argument
    (``"SIZE=100"``)."""
    return _with_args(C_MAIL, sender, args)


def encode_rcpt(recipient: str, args: Iterable[str] = ()) -> bytes:
    """RCPT: the recipient (``<address>``) and each ESMTP argument."""
    return _with_args(C_RCPT, recipient, args)


def encode_data() -> bytes:
    """DATA: the client sent DATA (or its first BDAT)."""
    return encode_frame(C_DATA)


def encode_header(name: str, value: str) -> bytes:
    """HEADER: one header field (folded lines joined by ``\\n``)."""
    return encode_frame(C_HEADER, _cstr(name) + _cstr(value))


def encode_eoh() -> bytes:
    """EOH: the end of the header section."""
    return encode_frame(C_EOH)


def encode_body(chunk: bytes) -> bytes:
    """BODY: one piece of the body, at most :data:`CHUNK_SIZE` octets."""
    if len(chunk) > CHUNK_SIZE:
        raise ValueError(f"a body chunk is at most {CHUNK_SIZE} octets")
    return encode_frame(C_BODY, chunk)


def encode_eob(chunk: bytes = b"") -> bytes:
    """EOB: the end of the message (with an optional last body piece)."""
    if len(chunk) > CHUNK_SIZE:
        raise ValueError(f"a body chunk is at most {CHUNK_SIZE} octets")
    return encode_frame(C_EOB, chunk)


def encode_abort() -> bytes:
    """ABORT: forget the current message; the connection stays."""
    return encode_frame(C_ABORT)


def encode_quit() -> bytes:
    """QUIT: the session is over; the milter closes the connection."""
    return encode_frame(C_QUIT)


def encode_quit_nc() -> bytes:
    """QUIT_NC: the session is over but a new one follows on this connection."""
    return encode_frame(C_QUIT_NC)


def encode_unknown(line: str) -> bytes:
    """UNKNOWN: a command the MTA does not know (the whole line)."""
    return encode_frame(C_UNKNOWN, _cstr(line))


def encode_macro(command: bytes, macros: Mapping[str, str]) -> bytes:
    """MACRO: the values of macros (``{"j": "mx.example", "{auth_authen}":
    "alice"}``) for the command ``command`` that follows."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    data = command + b"".join(_cstr(k) + _cstr(v) for k, v in macros.items())
    return encode_frame(C_MACRO, data)


# -------------------------------------------------------- commands: decoding
@dataclass(frozen=True)
class Command:
    """A command as a milter receives it (:func:`decode_command`).

    ``args`` by command: OPTNEG ``(version, actions, protocol)``; CONNECT
    ``(hostname, family, port, address)``; HELO ``(name,)``; MAIL and RCPT
    ``(address, *esmtp_args)``; HEADER ``(name, value)``; BODY and EOB
    ``(data,)``; MACRO ``(command, {name: value})``; UNKNOWN ``(line,)``;
    the others ``()``.
    """

    code: bytes
    args: tuple[object, ...] = ()


def decode_command(code: bytes, data: bytes) -> Command:
    """Decode one MTA→milter frame (for test peers); :class:`MilterProtocolError`
    for anything malformed."""
    what = f"command {code!r}"
    if code == C_OPTNEG:
        if len(data) != 12:
            raise MilterProtocolError(f"{what}: expected 12 octets")
        return Command(code, struct.unpack(">III", data))
    if code == C_CONNECT:
        host, sep, rest = data.partition(b"\0")
        if not sep or not rest:
            raise MilterProtocolError(f"{what}: truncated")
        family = rest[:1].decode("ascii", "replace")
        if family not in FAMILIES:
            raise MilterProtocolError(f"{what}: unknown family {family!r}")
        if family == FAMILY_UNKNOWN:
            if len(rest) != 1:
                raise MilterProtocolError(f"{what}: data after the unknown family")
            return Command(code, (host.decode(*_ENC), family, 0, ""))
        if len(rest) < 3:
            raise MilterProtocolError(f"{what}: truncated")
        (port,) = _PORT.unpack_from(rest, 1)
        (address,) = _nstrings(rest[3:], 1, what)
        return Command(code, (host.decode(*_ENC), family, port, address))
    if code in (C_HELO, C_UNKNOWN):
        return Command(code, tuple(_nstrings(data, 1, what)))
    if code in (C_MAIL, C_RCPT):
        return Command(code, tuple(_strings(data, what)))
    if code == C_HEADER:
        return Command(code, tuple(_nstrings(data, 2, what)))
    if code in (C_BODY, C_EOB):
        return Command(code, (data,))
    if code == C_MACRO:
        if not data or data[:1] not in COMMANDS:
            raise MilterProtocolError(f"{what}: unknown command")
        pairs = _strings(data[1:], what) if len(data) > 1 else []
        if len(pairs) % 2:
            raise MilterProtocolError(f"{what}: a macro without a value")
        return Command(code, (data[:1], dict(zip(pairs[::2], pairs[1::2], strict=True))))
    if code in (C_ABORT, C_QUIT, C_QUIT_NC, C_DATA, C_EOH):
        if data:
            raise MilterProtocolError(f"{what}: unexpected data")
        return Command(code)
    raise MilterProtocolError(f"unknown command {code!r}")


# ------------------------------------------------------------------ responses
@dataclass(frozen=True)
class Verdict:
    """A response without data: ``ACCEPT``, ``CONTINUE``, ``DISCARD``,
    ``REJECT``, ``TEMPFAIL``, ``SKIP``, ``PROGRESS``, ``SHUTDOWN``,
    ``CONN_FAIL`` (``code`` is the response's octet, e.g. :data:`R_REJECT`)."""

    code: bytes

    @property
    def name(self) -> str:
        return _NAMES.get(self.code, repr(self.code))


@dataclass(frozen=True)
class ReplyCode:
    """``REPLYCODE``: the milter's own SMTP reply (``code`` 4xx/5xx; ``text``
    as sent, possibly multi-line with CRLF between lines)."""

    code: int
    text: str

    @property
    def name(self) -> str:
        return "replycode"


@dataclass(frozen=True)
class HeaderChange:
    """``ADDHEADER`` (``index`` is ``None``), ``INSHEADER`` (``index`` 0 is
    the top) or ``CHGHEADER`` (``index`` counts from 1 among the fields of
    that name; an empty value deletes)."""

    code: bytes
    name: str
    value: str
    index: int | None = None

    @property
    def action(self) -> str:
        return _NAMES[self.code]


@dataclass(frozen=True)
class RecipientChange:
    """``ADDRCPT``, ``ADDRCPT_PAR`` (with ESMTP ``args``) or ``DELRCPT``."""

    code: bytes
    address: str
    args: str = ""

    @property
    def action(self) -> str:
        return _NAMES[self.code]


@dataclass(frozen=True)
class ChangeSender:
    """``CHGFROM``: a new envelope sender, with optional ESMTP ``args``."""

    address: str
    args: str = ""
    action = "chgfrom"


@dataclass(frozen=True)
class ReplaceBody:
    """``REPLBODY``: one piece of the new body (pieces concatenate)."""

    data: bytes
    action = "replbody"


@dataclass(frozen=True)
class QuarantineRequest:
    """``QUARANTINE``: put the message on hold, with a reason."""

    reason: str
    action = "quarantine"


@dataclass(frozen=True)
class SymbolList:
    """``SETSYMLIST``: the macros the milter wants at ``stage`` (``M_*``)."""

    stage: int
    macros: tuple[str, ...]


@dataclass(frozen=True)
class OptionReply:
    """The milter's answer to OPTNEG: its version, the actions it will take,
    the protocol steps it wants left out, and the macros it wants per stage."""

    version: int
    actions: int
    protocol: int
    symbols: dict[int, tuple[str, ...]] = field(default_factory=dict)


#: Any response a milter sends (what :func:`decode_response` returns).
Response = (
    Verdict
    | ReplyCode
    | HeaderChange
    | RecipientChange
    | ChangeSender
    | ReplaceBody
    | QuarantineRequest
    | SymbolList
    | OptionReply
)
#: Modifications: allowed only in reply to the end of the message.
MODIFICATIONS = (HeaderChange, RecipientChange, ChangeSender, ReplaceBody, QuarantineRequest)

_NAMES = {
    R_ACCEPT: "accept",
    R_CONTINUE: "continue",
    R_DISCARD: "discard",
    R_REJECT: "reject",
    R_TEMPFAIL: "tempfail",
    R_SKIP: "skip",
    R_PROGRESS: "progress",
    R_SHUTDOWN: "shutdown",
    R_CONN_FAIL: "conn_fail",
    R_ADDHEADER: "addheader",
    R_INSHEADER: "insheader",
    R_CHGHEADER: "chgheader",
    R_ADDRCPT: "addrcpt",
    R_ADDRCPT_PAR: "addrcpt_par",
    R_DELRCPT: "delrcpt",
}
_REPLY = re.compile(r"([45][0-9][0-9])(?:[ -](.*))?", re.S)


def _symbols(data: bytes, what: str) -> dict[int, tuple[str, ...]]:
    out: dict[int, tuple[str, ...]] = {}
    while data:
        stage, data = _word(data, what)
        text, sep, data = data.partition(b"\0")
        if not sep:
            raise MilterProtocolError(f"{what}: macro list not NUL-terminated")
        if stage not in STAGE_COMMANDS:
            raise MilterProtocolError(f"{what}: unknown macro stage {stage}")
        out[stage] = tuple(text.decode(*_ENC).split())
    return out


def decode_response(code: bytes, data: bytes) -> Response:
    """Decode one milter→MTA frame; :class:`MilterProtocolError` for an
    unknown response or malformed data."""
    what = f"response {code!r}"
    if code in SIMPLE_RESPONSES:
        if data:
            raise MilterProtocolError(f"{what}: unexpected data")
        return Verdict(code)
    if code == R_REPLYCODE:
        (text,) = _nstrings(data, 1, what)
        m = _REPLY.fullmatch(text)
        if not m:
            raise MilterProtocolError(f"{what}: not a 4xx/5xx reply")
        return ReplyCode(int(m.group(1)), m.group(2) or "")
    if code == R_ADDHEADER:
        name, value = _nstrings(data, 2, what)
        return HeaderChange(code, name, value)
    if code in (R_INSHEADER, R_CHGHEADER):
        index, rest = _word(data, what)
        name, value = _nstrings(rest, 2, what)
        return HeaderChange(code, name, value, index)
    if code in (R_ADDRCPT, R_DELRCPT):
        (address,) = _nstrings(data, 1, what)
        return RecipientChange(code, address)
    if code == R_ADDRCPT_PAR:
        parts = _strings(data, what)
        if len(parts) not in (1, 2):
            raise MilterProtocolError(f"{what}: expected 1 or 2 strings")
        return RecipientChange(code, parts[0], parts[1] if len(parts) == 2 else "")
    if code == R_CHGFROM:
        parts = _strings(data, what)
        if len(parts) not in (1, 2):
            raise MilterProtocolError(f"{what}: expected 1 or 2 strings")
        return ChangeSender(parts[0], parts[1] if len(parts) == 2 else "")
    if code == R_REPLBODY:
        return ReplaceBody(data)
    if code == R_QUARANTINE:
        (reason,) = _nstrings(data, 1, what)
        return QuarantineRequest(reason)
    if code == R_SETSYMLIST:
        symbols = _symbols(data, what)
        if len(symbols) != 1:
            raise MilterProtocolError(f"{what}: expected one stage")
        ((stage, macros),) = symbols.items()
        return SymbolList(stage, macros)
    if code == R_OPTNEG:
        if len(data) < 12:
            raise MilterProtocolError(f"{what}: truncated")
        version, actions, protocol = struct.unpack_from(">III", data)
        return OptionReply(version, actions, protocol, _symbols(data[12:], what))
    raise MilterProtocolError(f"unknown response {code!r}")


def encode_response(response: Response) -> bytes:
    """Encode a response as a milter sends it (for test peers)."""
    r = response
    if isinstance(r, Verdict):
        return encode_frame(r.code)
    if isinstance(r, ReplyCode):
        return encode_frame(R_REPLYCODE, _cstr(f"{r.code} {r.text}" if r.text else str(r.code)))
    if isinstance(r, HeaderChange):
        data = _cstr(r.name) + _cstr(r.value)
        if r.code != R_ADDHEADER:
            data = _WORD.pack(r.index or 0) + data
        return encode_frame(r.code, data)
    if isinstance(r, RecipientChange):
        data = _cstr(r.address) + (_cstr(r.args) if r.code == R_ADDRCPT_PAR and r.args else b"")
        return encode_frame(r.code, data)
    if isinstance(r, ChangeSender):
        return encode_frame(R_CHGFROM, _cstr(r.address) + (_cstr(r.args) if r.args else b""))
    if isinstance(r, ReplaceBody):
        return encode_frame(R_REPLBODY, r.data)
    if isinstance(r, QuarantineRequest):
        return encode_frame(R_QUARANTINE, _cstr(r.reason))
    if isinstance(r, SymbolList):
        return encode_frame(R_SETSYMLIST, _WORD.pack(r.stage) + _cstr(" ".join(r.macros)))
    data = struct.pack(">III", r.version, r.actions, r.protocol)
    for stage, macros in r.symbols.items():
        data += _WORD.pack(stage) + _cstr(" ".join(macros))
    return encode_frame(R_OPTNEG, data)


# --------------------------------------------------------------------- client
@dataclass
class Outcome:
    """What a milter said about one stage: the final ``verdict`` (a
    :class:`Verdict` or :class:`ReplyCode`; ``None`` when the stage was
    skipped or needs no reply) and, at the end of the message, the
    modifications it asked for, in order."""

    verdict: Verdict | ReplyCode | None = None
    changes: list[
        HeaderChange | RecipientChange | ChangeSender | ReplaceBody | QuarantineRequest
    ] = field(default_factory=list)

    @property
    def action(self) -> str:
        """``"continue"`` (also when there was no reply), ``"accept"``,
        ``"reject"``, ``"tempfail"``, ``"discard"``, ``"replycode"``,
        ``"skip"``."""
        return "continue" if self.verdict is None else self.verdict.name


#: Replies that end a stage.
_FINAL = frozenset((R_ACCEPT, R_CONTINUE, R_DISCARD, R_REJECT, R_TEMPFAIL, R_SKIP))
#: For each command: the flag that leaves it out, the flag that leaves it
#: without a reply.
_STEP_FLAGS = {
    C_CONNECT: (P_NOCONNECT, P_NR_CONN),
    C_HELO: (P_NOHELO, P_NR_HELO),
    C_MAIL: (P_NOMAIL, P_NR_MAIL),
    C_RCPT: (P_NORCPT, P_NR_RCPT),
    C_DATA: (P_NODATA, P_NR_DATA),
    C_HEADER: (P_NOHDRS, P_NR_HDR),
    C_EOH: (P_NOEOH, P_NR_EOH),
    C_BODY: (P_NOBODY, P_NR_BODY),
    C_UNKNOWN: (P_NOUNKNOWN, P_NR_UNKN),
}
_MACRO_STAGE = {cmd: stage for stage, cmd in STAGE_COMMANDS.items()}


class MilterClient:
    """One connection to one milter, for one SMTP session at a time.

    Call :meth:`open` (connect and negotiate), then the stage methods in
    SMTP order — :meth:`connect`, :meth:`helo`, :meth:`mail`, :meth:`rcpt`,
    :meth:`data`, :meth:`message` — :meth:`abort` to drop a transaction,
    and :meth:`quit`/:meth:`close` at the end. Each stage returns an
    :class:`Outcome`; a stage the milter asked to leave out returns an
    empty one without traffic.

    :arg connect_timeout: for connecting and option negotiation.
    :arg command_timeout: for each reply to a command before the message.
    :arg content_timeout: for the whole exchange of one message: its header
        fields, its body and the verdict at its end (a ``PROGRESS`` from the
        milter does not extend it), so that one message costs at most this
        however many pieces it is sent in.
    :arg actions: the actions offered (:data:`ALL_ACTIONS`).
    :arg protocol: the protocol flags offered (:data:`ALL_PROTOCOL`).

    Every error is a :class:`MilterError`; after one the connection is
    closed and the client unusable. So it is after a stage was cancelled
    (a hook time limit, a stop): the milter's answer to it would be taken
    for the answer to the next command.
    """

    def __init__(
        self,
        spec: SocketSpec,
        *,
        connect_timeout: float = 10.0,
        command_timeout: float = 10.0,
        content_timeout: float = 30.0,
        actions: int = ALL_ACTIONS,
        protocol: int = ALL_PROTOCOL,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self.spec = spec
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.content_timeout = content_timeout
        self.offered_actions = actions
        self.offered_protocol = protocol
        self.max_frame = max_frame
        #: The milter's answer to option negotiation, once open.
        self.options: OptionReply | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = FrameDecoder(max_frame)
        self._frames: list[tuple[bytes, bytes]] = []
        self.closed = False
        #: True from MAIL until the verdict on the end of the message or an
        #: ABORT: the milter has a transaction open.
        self.in_transaction = False
        #: While a message is exchanged: when its content_timeout ends.
        self._deadline: float | None = None

    # ----------------------------------------------------------- lifecycle
    async def open(self) -> OptionReply:
        """Connect and negotiate options; return the milter's options."""
        try:
            if self.spec.family == "unix":
                conn = asyncio.open_unix_connection(self.spec.path, limit=1 << 16)
            else:
                conn = asyncio.open_connection(self.spec.host, self.spec.port, limit=1 << 16)
            self._reader, self._writer = await asyncio.wait_for(conn, self.connect_timeout)
        except asyncio.CancelledError:
            self.close()
            raise
        except (TimeoutError, asyncio.TimeoutError):
            self.close()
            raise MilterTimeout(
                f"{self.spec}: no connection within {self.connect_timeout}s"
            ) from None
        except OSError as exc:
            self.close()
            raise MilterUnavailable(f"{self.spec}: {exc.strerror or exc}") from None
        self._send(encode_optneg(VERSION, self.offered_actions, self.offered_protocol))
        reply = await self._read_one(self.connect_timeout)
        if not isinstance(reply, OptionReply):
            self.close()
            raise MilterProtocolError(f"{self.spec}: answered OPTNEG with {reply!r}")
        if not 2 <= reply.version <= VERSION:
            self.close()
            raise MilterProtocolError(f"{self.spec}: unsupported milter version {reply.version}")
        if reply.actions & ~self.offered_actions or reply.protocol & ~self.offered_protocol:
            self.close()
            raise MilterProtocolError(
                f"{self.spec}: asks for actions {reply.actions:#x}/protocol {reply.protocol:#x} "
                f"beyond those offered ({self.offered_actions:#x}/{self.offered_protocol:#x})"
            )
        self.options = reply
        return reply

    def wants(self, command: bytes) -> bool:
        """Whether the milter takes ``command`` (it did not ask to leave it out)."""
        flags = _STEP_FLAGS.get(command)
        return flags is None or self.options is None or not self.options.protocol & flags[0]

    def allows(self, action: int) -> bool:
        """Whether the milter declared the action ``action`` (``F_*``)."""
        return self.options is not None and bool(self.options.actions & action)

    def close(self) -> None:
        """Close the connection at once (no QUIT)."""
        self.closed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()

    async def quit(self) -> None:
        """Send QUIT and close; never raises."""
        if self._writer is not None and not self.closed:
            with contextlib.suppress(Exception):
                self._send(encode_quit())
                await asyncio.wait_for(self._writer.drain(), 1.0)
        self.close()

    # -------------------------------------------------------------- stages
    async def connect(
        self, hostname: str, family: str, port: int, address: str, macros: Mapping[str, str]
    ) -> Outcome:
        """CONNECT with the client's name, family, port and address."""
        return await self._step(C_CONNECT, encode_connect(hostname, family, port, address), macros)

    async def helo(self, name: str, macros: Mapping[str, str]) -> Outcome:
        """HELO/EHLO with the client's name."""
        return await self._step(C_HELO, encode_helo(name), macros)

    async def mail(self, sender: str, args: Iterable[str], macros: Mapping[str, str]) -> Outcome:
        """MAIL with the sender (``<address>``) and its ESMTP arguments."""
        self.in_transaction = True
        return await self._step(C_MAIL, encode_mail(sender, args), macros)

    async def rcpt(self, recipient: str, args: Iterable[str], macros: Mapping[str, str]) -> Outcome:
        """RCPT with one recipient (``<address>``) and its ESMTP arguments."""
        return await self._step(C_RCPT, encode_rcpt(recipient, args), macros)

    async def data(self, macros: Mapping[str, str]) -> Outcome:
        """DATA."""
        return await self._step(C_DATA, encode_data(), macros)

    async def message(
        self,
        headers: Iterable[tuple[str, str]],
        body: Iterable[bytes] | AsyncIterator[bytes],
        macros: Mapping[str, str],
        eom_macros: Mapping[str, str] | None = None,
        body_sink: Callable[[bytes], object] | None = None,
    ) -> Outcome:
        """Send the header fields, the end of the headers, the body in
        :data:`CHUNK_SIZE` pieces and the end of the message; return the
        verdict with the modifications.

        ``headers`` are ``(name, value)`` with the value as it follows the
        colon (leading space included) and ``\n`` between folded lines;
        the leading white space is removed unless the milter negotiated
        :data:`P_HDR_LEADSPC`. ``macros`` (the end-of-headers macros, filtered
        by the milter's :data:`M_EOH` symbol list) go with each header and
        with the end of the headers, as Postfix sends them; ``eom_macros``
        with the end of the message. ``body_sink``, if given, receives each piece
        of a body replacement instead of the outcome keeping it in memory
        (the outcome then holds one empty :class:`ReplaceBody` in its place).

        A verdict other than ``CONTINUE`` to a header, the end of the
        headers or a body piece ends the exchange early with that verdict
        (``SKIP`` jumps to the end of the message).
        """
        self._deadline = time.monotonic() + self.content_timeout
        try:
            return await self._message(headers, body, macros, eom_macros, body_sink)
        finally:
            self._deadline = None

    async def _message(
        self,
        headers: Iterable[tuple[str, str]],
        body: Iterable[bytes] | AsyncIterator[bytes],
        macros: Mapping[str, str],
        eom_macros: Mapping[str, str] | None,
        body_sink: Callable[[bytes], object] | None,
    ) -> Outcome:
        leadspc = self.options is not None and bool(self.options.protocol & P_HDR_LEADSPC)
        if self.wants(C_HEADER):
            for name, value in headers:
                sent = value if leadspc else value.lstrip(" \t")
                # The end-of-headers macros go with each header too, filtered
                # by the same symbol list, as Postfix sends them (milter8.c):
                # a milter that reads macros at HEADER finds them there.
                outcome = await self._step(
                    C_HEADER, encode_header(name, sent), macros, content=True, stage=C_EOH
                )
                if outcome.action != "continue":
                    return outcome
        if self.wants(C_EOH):
            # ... and with EOH, where libmilter takes them (it drops macros
            # sent for a header).
            outcome = await self._step(C_EOH, encode_eoh(), macros, content=True)
            if outcome.action != "continue":
                return outcome
        if self.wants(C_BODY):
            async for chunk in _chunks(body):
                outcome = await self._step(C_BODY, encode_body(chunk), {}, content=True)
                if outcome.action == "skip":
                    break
                if outcome.action != "continue":
                    return outcome
        return await self._end_of_message(eom_macros or {}, body_sink)

    async def abort(self) -> None:
        """ABORT the current transaction (no reply)."""
        self.in_transaction = False
        await self._write(encode_abort(), self.command_timeout)

    # ------------------------------------------------------------ internal
    def _check_open(self) -> None:
        if self.closed or self._writer is None or self.options is None:
            raise MilterUnavailable(f"{self.spec}: not connected")

    async def _step(
        self,
        command: bytes,
        frame: bytes,
        macros: Mapping[str, str],
        *,
        content: bool = False,
        stage: bytes | None = None,
    ) -> Outcome:
        """Send ``command`` (``frame``) after its ``macros``, filtered by the
        symbol list of the stage of ``stage`` (default: ``command``)."""
        self._check_open()
        if not self.wants(command):
            return Outcome()
        limit = self.content_timeout if content else self.command_timeout
        out = self._macros(command, macros, stage) + frame
        await self._write(out, self._within(limit))
        assert self.options is not None
        flags = _STEP_FLAGS.get(command)
        if flags is not None and self.options.protocol & flags[1]:
            return Outcome()
        reply = await self._read_final(limit, command)
        if isinstance(reply, Verdict) and reply.code == R_SKIP and command != C_BODY:
            self.close()
            raise MilterProtocolError(f"{self.spec}: SKIP in reply to {command!r}")
        if (
            isinstance(reply, Verdict)
            and reply.code == R_SKIP
            and not (self.options.protocol & P_SKIP)
        ):
            self.close()
            raise MilterProtocolError(f"{self.spec}: SKIP without negotiating it")
        return Outcome(reply)

    async def _end_of_message(
        self, macros: Mapping[str, str], body_sink: Callable[[bytes], object] | None
    ) -> Outcome:
        await self._write(
            self._macros(C_EOB, macros) + encode_eob(), self._within(self.content_timeout)
        )
        outcome = Outcome()
        kept = 0  # octets of modifications held in memory
        replaced = False
        assert self.options is not None
        while True:
            reply = await self._read_one(self._within(self.content_timeout))
            if isinstance(reply, Verdict) and reply.code == R_PROGRESS:
                continue
            if isinstance(reply, ReplaceBody) and body_sink is not None:
                body_sink(reply.data)
                if not replaced:
                    replaced = True
                    outcome.changes.append(ReplaceBody(b""))
                continue
            if isinstance(reply, MODIFICATIONS):
                needed = _action_flag(reply)
                if not self.options.actions & needed:
                    # Postfix and Sendmail refuse it too: the milter said at
                    # negotiation it would not, and the operator may rely on it.
                    self.close()
                    raise MilterProtocolError(
                        f"{self.spec}: {reply.action} without declaring it at negotiation "
                        f"(actions {self.options.actions:#x})"
                    )
                kept += 64 + _size(reply)
                if len(outcome.changes) >= MAX_CHANGES or kept > MAX_CHANGE_BYTES:
                    self.close()
                    raise MilterProtocolError(f"{self.spec}: too many modifications")
                outcome.changes.append(reply)
                continue
            if isinstance(reply, ReplyCode) or (
                isinstance(reply, Verdict) and reply.code in _FINAL and reply.code != R_SKIP
            ):
                outcome.verdict = reply
                self.in_transaction = False
                return outcome
            self.close()
            raise MilterProtocolError(f"{self.spec}: unexpected {reply!r} at end of message")

    def _within(self, timeout: float) -> float:
        """``timeout``, cut to what is left of the message's content_timeout
        while a message is exchanged; :class:`MilterTimeout` once nothing is."""
        if self._deadline is None:
            return timeout
        left = self._deadline - time.monotonic()
        if left <= 0:
            self.close()
            raise self._timeout(timeout)
        return min(timeout, left)

    def _timeout(self, timeout: float) -> MilterTimeout:
        """The error for a wait of ``timeout`` seconds that ran out."""
        if self._deadline is not None and time.monotonic() >= self._deadline - 0.01:
            return MilterTimeout(
                f"{self.spec}: no verdict on the message within its content_timeout "
                f"({self.content_timeout:g}s)"
            )
        return MilterTimeout(f"{self.spec}: no reply within {timeout:.3g}s")

    def _macros(
        self, command: bytes, macros: Mapping[str, str], stage: bytes | None = None
    ) -> bytes:
        """The MACRO frame for ``command``: ``macros``, only those the
        milter's symbol list for the stage of ``stage`` (default:
        ``command``) names if it sent one. The list can only narrow what
        Bonzo sends at that stage, never add a macro."""
        if not macros:
            return b""
        assert self.options is not None
        wanted = self.options.symbols.get(_MACRO_STAGE.get(stage or command, -1))
        if wanted is not None:
            # The milter named the macros it wants at this stage (v6).
            names = set(wanted) | {m.strip("{}") for m in wanted}
            macros = {k: v for k, v in macros.items() if k in names or k.strip("{}") in names}
        return encode_macro(command, macros) if macros else b""

    def _send(self, data: bytes) -> None:
        if self._writer is None:
            raise MilterUnavailable(f"{self.spec}: not connected")
        self._writer.write(data)

    async def _write(self, data: bytes, timeout: float) -> None:
        self._check_open()
        assert self._writer is not None
        try:
            self._writer.write(data)
            await asyncio.wait_for(self._writer.drain(), timeout)
        except asyncio.CancelledError:
            self.close()
            raise
        except (TimeoutError, asyncio.TimeoutError):
            self.close()
            raise MilterTimeout(f"{self.spec}: could not send within {timeout:.3g}s") from None
        except (OSError, RuntimeError) as exc:
            self.close()
            raise MilterUnavailable(f"{self.spec}: connection lost: {exc}") from None

    async def _read_final(self, timeout: float, command: bytes) -> Verdict | ReplyCode:
        # PROGRESS starts the timeout again, but not for ever (and within a
        # message, not past its content_timeout).
        deadline = time.monotonic() + 4 * timeout
        while True:
            remaining = min(self._within(timeout), deadline - time.monotonic())
            if remaining <= 0:
                self.close()
                raise MilterTimeout(f"{self.spec}: no reply to {command!r} in time")
            try:
                reply = await self._read_one(remaining)
            except MilterTimeout:
                now = time.monotonic()
                if self._deadline is not None and now >= self._deadline - 0.01:
                    # The message's content_timeout ran out first (however
                    # little of it this command had left): say that.
                    raise self._timeout(timeout) from None
                if now >= deadline - 0.01:
                    # Cut by the PROGRESS bound, not by a silence of
                    # ``timeout``: say which (the slice left is no limit).
                    raise MilterTimeout(
                        f"{self.spec}: no final reply to {command!r} within {4 * timeout:g}s "
                        "(PROGRESS extends the wait to 4 times the command's timeout)"
                    ) from None
                raise
            if isinstance(reply, Verdict) and reply.code == R_PROGRESS:
                continue
            if isinstance(reply, ReplyCode) or (
                isinstance(reply, Verdict) and reply.code in _FINAL
            ):
                return reply
            self.close()
            raise MilterProtocolError(f"{self.spec}: unexpected {reply!r} in reply to {command!r}")

    async def _read_one(self, timeout: float) -> Response:
        """The next response; shutdown and connection failure count as the
        milter going away."""
        reader = self._reader
        if reader is None:
            raise MilterUnavailable(f"{self.spec}: not connected")

        async def fill() -> None:
            while not self._frames:
                data = await reader.read(min(self._decoder.needed(), 1 << 16))
                if not data:
                    raise MilterUnavailable(f"{self.spec}: the milter closed the connection")
                self._frames.extend(self._decoder.feed(data))

        try:
            if not self._frames:
                await asyncio.wait_for(fill(), timeout)
        except asyncio.CancelledError:
            self.close()
            raise
        except (TimeoutError, asyncio.TimeoutError):
            self.close()
            raise self._timeout(timeout) from None
        except MilterError:
            self.close()
            raise
        except (OSError, RuntimeError) as exc:
            self.close()
            raise MilterUnavailable(f"{self.spec}: connection lost: {exc}") from None
        code, data = self._frames.pop(0)
        try:
            reply = decode_response(code, data)
        except MilterProtocolError as exc:
            self.close()
            raise MilterProtocolError(f"{self.spec}: {exc}") from None
        if isinstance(reply, Verdict) and reply.code in (R_SHUTDOWN, R_CONN_FAIL):
            self.close()
            raise MilterUnavailable(f"{self.spec}: the milter ended the session ({reply.name})")
        return reply


async def _chunks(body: Iterable[bytes] | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Re-cut ``body`` into pieces of at most :data:`CHUNK_SIZE` octets."""
    if isinstance(body, AsyncIterator):
        async for piece in body:
            for chunk in _cut(piece):
                yield chunk
    else:
        for piece in body:
            for chunk in _cut(piece):
                yield chunk


def _action_flag(change: Response) -> int:
    """The action (``F_*``) a milter must have declared to send ``change``
    (as libmilter's ``smfi_*`` functions require it)."""
    if isinstance(change, HeaderChange):
        return F_CHGHDRS if change.code == R_CHGHEADER else F_ADDHDRS
    if isinstance(change, RecipientChange):
        return {R_ADDRCPT: F_ADDRCPT, R_ADDRCPT_PAR: F_ADDRCPT_PAR}.get(change.code, F_DELRCPT)
    if isinstance(change, ChangeSender):
        return F_CHGFROM
    if isinstance(change, ReplaceBody):
        return F_CHGBODY
    return F_QUARANTINE


def _size(change: Response) -> int:
    if isinstance(change, ReplaceBody):
        return len(change.data)
    if isinstance(change, HeaderChange):
        return len(change.name) + len(change.value)
    if isinstance(change, (RecipientChange, ChangeSender)):
        return len(change.address) + len(change.args)
    if isinstance(change, QuarantineRequest):
        return len(change.reason)
    return 0


def _cut(piece: bytes) -> Iterator[bytes]:
    for i in range(0, len(piece), CHUNK_SIZE):
        yield piece[i : i + CHUNK_SIZE]

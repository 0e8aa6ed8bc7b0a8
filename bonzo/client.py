"""Outbound SMTP and LMTP: hand one message to one server, with a result
for every recipient.

The delivery side of Bonzo (a queue's ``smarthost``, ``mx`` and ``lmtp``
routes, a ``forward`` plugin) needs one thing from a client: give this
message from this sender to these recipients on that host, and say, per
recipient, whether it was **delivered**, **deferred** (try again later) or
**refused** (bounce), with the server's reply and the stage it came at::

    from bonzo.client import ClientSettings, deliver

    result = await deliver(
        "192.0.2.25", 25,
        sender="alice@example.org",
        recipients=["bob@example.net", "carol@example.net"],
        message=b"Subject: hi\\r\\n\\r\\nHello.\\r\\n",
        settings=ClientSettings(helo_name="mx.example.org", tls_policy="verify",
                                tls_name="mx.example.net"),
    )
    for r in result.recipients:
        print(r.recipient, r.status, r.stage, r.code, r.enhanced_code, r.text)

A queue runner that sends several messages to one destination keeps the
connection: :func:`connect` returns a :class:`ClientConnection` whose
:meth:`~ClientConnection.send` may be called again (an ``RSET`` first, which
also proves the connection still works) until :meth:`~ClientConnection.quit`.
A relay that repeats its own client's commands as they arrive (the
``forward`` plugin) uses the same connection step by step:
:meth:`~ClientConnection.mail`, :meth:`~ClientConnection.rcpt`,
:meth:`~ClientConnection.data`, :meth:`~ClientConnection.rset`, each
returning the server's :class:`Reply`.

How the two protocols are carried:

- **SMTP** goes through aiosmtplib: its connection (over a socket this
  module connects, so that the connect and greeting timeouts differ and the
  source address can be chosen), implicit TLS, STARTTLS (with its defence
  against plaintext injected before the handshake), ``AUTH PLAIN`` and
  ``AUTH LOGIN``, and its bounded reply reader (8,192 octets a line, 32,768
  a reply). Three things it lacks are covered here: the message is written
  **streaming** (dot-stuffed chunk by chunk over its transport, waiting for
  the transport to drain, so a spooled message of any size is never read
  into memory — its ``data()`` takes the whole message as one ``bytes``);
  the envelope commands are formatted here (with ``SIZE``, ``BODY``,
  ``SMTPUTF8`` and the DSN parameters); and every reply is classified per
  recipient. Once the session is set up (greeting, ``EHLO``, ``STARTTLS``,
  ``AUTH``), every reply is read by a reader of Bonzo's own put on
  aiosmtplib's transport (below), pipelined or not: aiosmtplib keeps a
  reply that came unasked and gives it to the next command, and takes a
  multiline reply's code from its last line. (The replies while the session
  is set up are still read by aiosmtplib, so a server whose greeting is
  ``554-no`` then ``220 ok`` is taken at its last line, where a reply of
  mixed codes later is a protocol error; aiosmtplib gives no hold on the
  greeting before it reads it.)
- **BINARYMIME** (RFC 3030): ``send(..., binary=True)`` sends the content
  as it is in one ``BDAT <size> LAST``, to a server that offers
  ``CHUNKING`` and ``BINARYMIME`` (any other refuses every recipient,
  ``554 5.6.3``: binary content is never converted).
- **LMTP** (RFC 2033), which aiosmtplib cannot speak (no ``LHLO``), is
  written here on a Tornado :class:`~tornado.iostream.IOStream` over TCP or a
  Unix socket, with the same bounds on replies: after the message it reads
  **one reply per accepted recipient**, which is the point of LMTP.

**Replies**: every reply is owed by something written — one per command,
one per reply the message is due (from the ``DATA`` on, so that one the
server sends with the ``354`` is heard as early) — and anything else (a
reply nobody asked for, a ``250`` with the ``354``, one more after the
message) means the conversation is out of step: the recipients still
open are deferred, and the connection is not used again. A line that is
not ``NNN``, ``NNN-text`` or ``NNN text``, or a multiline reply whose codes
differ, is a protocol error (deferred), never a ``250``.

**Pipelining (RFC 2920)**: to a server that offers ``PIPELINING`` (SMTP or
LMTP: Dovecot's does),
:meth:`~ClientConnection.send` writes the envelope as one group — ``RSET``
on a connection used before, ``MAIL``, every ``RCPT``, ``DATA`` — and then
reads the replies in order, so a message costs two round trips (the group,
the content) instead of four plus one per recipient (as Postfix's client
does). aiosmtplib can have only one reply in flight (its reader drops what
arrives while no read is pending), so the transport's protocol is Bonzo's
reader, which keeps every reply, however the server's packets fall, with
the same bounds as LMTP's; the transport (socket, TLS, flow control)
stays aiosmtplib's. Each reply decides what it
would decide one command at a time: a refused ``MAIL`` stands for every
recipient; a ``354`` after every ``RCPT`` was refused gets an empty message
(RFC 2920 3.1), never the content; a reply that arrives before the content
is all written ends the content and stands unless it claims delivery; more
replies than the group asked for mean the conversation is out of step, and
the connection is not reused. A failed ``RSET`` at the head of the group
raises :class:`ClientError` as an unpipelined one does (no reply to
anything of the message was seen, so a pool sends it again on a new
connection). Over LMTP the group is written on the Tornado stream, which
is read as data comes into the same kind of reader (one reply per
accepted recipient after the message: the group owes one per ``RCPT``,
struck off for each refused, so those the server sends with the ``354``
are heard as early however the packets fall).
:attr:`ClientSettings.pipelining` turns it off; the stepwise API sends one
command at a time.

Timeouts are per stage with the defaults of RFC 5321 4.5.3.2 (see
:class:`ClientSettings`); a timeout, a lost connection or a reply that does
not parse defers every recipient still open and closes the connection.
Under :data:`deadline` (the queue's ``delivery_timeout``) no wait lasts
past it, and the results already in stand.
Replies longer or with more lines than the limits are such protocol errors,
so a hostile server cannot make the client buffer without bound.

.. versionadded:: 0.2
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import enum
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, Union, cast

import aiosmtplib
from tornado.iostream import IOStream, StreamClosedError

from .dsn import xtext_canonical
from .settings import finite_number

__all__ = [
    "deadline",
    "sendable",
    "recipient_problem",
    "options_problem",
    "Stage",
    "Status",
    "Reply",
    "Recipient",
    "RecipientResult",
    "DeliveryResult",
    "ClientError",
    "ClientSettings",
    "ca_file_context",
    "ClientConnection",
    "SMTPConnection",
    "LMTPConnection",
    "MessageSource",
    "CRLFLines",
    "DotStuffer",
    "TLS_POLICIES",
    "has_8bit",
    "server_label",
    "connect",
    "deliver",
]

log = logging.getLogger("bonzo.client")


class Stage(str, enum.Enum):
    """Where in the conversation an outcome was decided."""

    CONNECT = "connect"
    """Opening the connection (TCP or Unix socket; the handshake of implicit TLS)."""
    GREETING = "greeting"
    """Waiting for the server's ``220``."""
    EHLO = "ehlo"
    """``EHLO`` (or the ``HELO`` fallback; ``LHLO`` for LMTP)."""
    STARTTLS = "starttls"
    """The ``STARTTLS`` command and its handshake, or a TLS policy not met."""
    AUTH = "auth"
    """``AUTH``."""
    MAIL = "mail"
    """``MAIL FROM`` (and the checks made before it: size, SMTPUTF8, 8BITMIME)."""
    RCPT = "rcpt"
    """``RCPT TO``."""
    DATA = "data"
    """The ``DATA`` command and sending the message."""
    END = "end"
    """The reply (LMTP: the replies) after the final dot."""

    def __str__(self) -> str:
        return self.value


class Status(str, enum.Enum):
    """What became of one recipient."""

    DELIVERED = "delivered"
    """The server took responsibility for the message (``250`` after the dot)."""
    DEFERRED = "deferred"
    """Try again later: a ``4xx`` reply, or a failure of the connection."""
    REFUSED = "refused"
    """Permanent: a ``5xx`` reply (or a local check that will not change)."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Reply:
    """One server reply, or one the client made up for a local failure.

    ``str(reply)`` is ``"550 5.1.1 text"`` (lines joined with ``"; "``).
    """

    code: int
    """The three-digit reply code."""
    enhanced_code: str = ""
    """RFC 3463 code such as ``"5.1.1"`` (``""`` when the server gave none)."""
    text: str = ""
    """The text, without code and enhanced code; lines joined with ``"\\n"``.
    Control characters are replaced by ``?``, so the text is safe to log."""
    remote: bool = True
    """False when the client made this reply up (a timeout, a lost
    connection, a TLS policy not met, a local check)."""

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")

    def __str__(self) -> str:
        head = f"{self.code} {self.enhanced_code}".rstrip()
        text = "; ".join(self.lines)
        return f"{head} {text}" if text else head


@dataclass(frozen=True)
class Recipient:
    """A recipient with its DSN parameters (RFC 3461)."""

    address: str
    """The mailbox, ``local@domain`` (no angle brackets)."""
    notify: str | None = None
    """``NOTIFY``: ``"NEVER"`` or a comma list of ``SUCCESS``, ``FAILURE``,
    ``DELAY`` (any case; spaces are dropped). Anything else, a control
    character included, is a :class:`ValueError` before a command is sent."""
    orcpt: str | None = None
    """``ORCPT`` as received, e.g. ``"rfc822;bob@example.net"`` (xtext-encoded)."""

    @classmethod
    def from_params(cls, address: str, params: dict[str, str | None]) -> Recipient:
        """Build one from an address and the RCPT parameters a server
        recorded (:attr:`bonzo.session.Envelope.rcpt_params`)."""
        return cls(address, params.get("NOTIFY"), params.get("ORCPT"))


@dataclass(frozen=True)
class RecipientResult:
    """The outcome for one recipient."""

    recipient: Recipient
    status: Status
    stage: Stage
    reply: Reply
    after_accepted: bool = False
    """Refused at ``RCPT`` after the server had accepted another recipient
    of the same transaction (see :attr:`too_many`).

    .. versionadded:: 0.2"""

    @property
    def address(self) -> str:
        return self.recipient.address

    @property
    def code(self) -> int:
        return self.reply.code

    @property
    def enhanced_code(self) -> str:
        return self.reply.enhanced_code

    @property
    def text(self) -> str:
        return self.reply.text

    @property
    def delivered(self) -> bool:
        return self.status is Status.DELIVERED

    @property
    def too_many(self) -> bool:
        """The server took no more recipients in this transaction (``452
        4.5.3``, a ``552`` to ``RCPT``, or a ``452`` with no enhanced code
        after it had accepted one: RFC 5321 4.5.3.1.10's reply, as Exim
        gives it): the rest go in another one."""
        if self.stage is not Stage.RCPT:
            return False
        code, enhanced = self.reply.code, self.reply.enhanced_code
        if code == 552 or enhanced[1:] == ".5.3":
            return True
        # Before any recipient was taken, a bare 452 is as likely the
        # server's storage ("insufficient system storage"): the back-off.
        return code == 452 and not enhanced and self.after_accepted

    @property
    def deferred(self) -> bool:
        return self.status is Status.DEFERRED

    @property
    def refused(self) -> bool:
        return self.status is Status.REFUSED

    def __str__(self) -> str:
        return f"<{self.address}> {self.status} at {self.stage}: {self.reply}"


@dataclass
class DeliveryResult:
    """The outcome of one message: one :class:`RecipientResult` per
    recipient, in the order given."""

    recipients: list[RecipientResult]
    server: str = ""
    """Who answered, as :func:`server_label` names it."""
    dsn: bool = False
    """The server offered DSN, so ``NOTIFY``/``ORCPT``/``RET``/``ENVID`` were
    passed on; when False, a queue owes the sender the "relayed" notices
    that RFC 3461 4.3 asks for ``NOTIFY=SUCCESS``."""

    @property
    def delivered(self) -> list[RecipientResult]:
        return [r for r in self.recipients if r.status is Status.DELIVERED]

    @property
    def deferred(self) -> list[RecipientResult]:
        return [r for r in self.recipients if r.status is Status.DEFERRED]

    @property
    def refused(self) -> list[RecipientResult]:
        return [r for r in self.recipients if r.status is Status.REFUSED]

    @classmethod
    def failed(
        cls, recipients: Sequence[str | Recipient], error: ClientError, server: str = ""
    ) -> DeliveryResult:
        """Every recipient deferred by a connection-level ``error``."""
        return cls(
            [
                RecipientResult(_recipient(r), Status.DEFERRED, error.stage, error.reply)
                for r in recipients
            ],
            server,
        )


class ClientError(Exception):
    """The connection failed or could not be set up: nothing was decided for
    any recipient.

    Raised by :func:`connect` (connect, greeting, EHLO, STARTTLS or AUTH
    failed, or a TLS policy was not met) and by
    :meth:`ClientConnection.send` on a connection that is closed or whose
    ``RSET`` failed, before anything of the message was sent. The caller
    defers the message (:meth:`DeliveryResult.failed`), tries another
    host, or opens a new connection.

    Failures at these stages defer even when the server gave a ``5xx``
    (``554`` greeting, ``535`` AUTH), as Postfix does: they concern this
    client and host, not the message; :attr:`permanent` tells a caller that
    wants to treat them otherwise.
    """

    def __init__(self, stage: Stage, reply: Reply) -> None:
        super().__init__(f"{stage}: {reply}")
        self.stage = stage
        self.reply = reply

    @property
    def permanent(self) -> bool:
        """The server answered with a ``5xx``."""
        return self.reply.remote and 500 <= self.reply.code <= 599


class _SettleReply(Protocol):
    """How :meth:`Client._transact` records a server's reply for a recipient
    (``after_accepted``: see :attr:`RecipientResult.after_accepted`)."""

    def __call__(self, i: int, stage: Stage, reply: Reply, after_accepted: bool = False) -> None:
        pass


class _Broken(Exception):
    """The connection cannot go on (internal: becomes deferrals or a ClientError)."""

    def __init__(self, stage: Stage, reply: Reply) -> None:
        super().__init__(str(reply))
        self.stage = stage
        self.reply = reply


#: The TLS policies of :attr:`ClientSettings.tls_policy`.
TLS_POLICIES = ("none", "opportunistic", "require", "verify")


@dataclass
class ClientSettings:
    """How to talk to the server. Times are in seconds; the defaults are
    RFC 5321 4.5.3.2's where it gives one, Postfix's otherwise."""

    helo_name: str = field(default_factory=socket.gethostname)
    """Name given in ``EHLO``/``HELO``/``LHLO`` (default: the machine's host
    name, without a DNS lookup). Give the name the source address's PTR
    record points to: receivers check it."""

    source_address: str | None = None
    """Local IP address to connect from (multi-homed hosts); ``None``: the
    system's choice."""

    tls_policy: str = "opportunistic"
    """``"opportunistic"``: STARTTLS when offered, without checking the
    certificate; a failed handshake is retried once in plaintext on a new
    connection (as Postfix's ``may`` level). ``"require"``: STARTTLS or
    defer, certificate not checked (Postfix's ``encrypt``). ``"verify"``:
    STARTTLS and a certificate valid for :attr:`tls_name` under
    :attr:`tls_context`'s trust, or defer. ``"none"``: never STARTTLS.
    With :attr:`implicit_tls`, ``verify`` checks and the others only
    encrypt. LMTP connections support ``none`` and ``opportunistic`` only
    (they never start TLS)."""

    implicit_tls: bool = False
    """TLS from the first byte (port 465, RFC 8314)."""

    tls_name: str | None = None
    """Server name for SNI and certificate checks (default: the host
    connected to)."""

    tls_context: ssl.SSLContext | None = None
    """Context for the ``verify`` policy (default: the system's trust
    store); it must check certificates and host names."""

    username: str | None = None
    """Authenticate as this user (``AUTH PLAIN``, else ``AUTH LOGIN``)."""

    password: str | None = dataclasses.field(default=None, repr=False)
    """The secret for :attr:`username`."""

    auth_plaintext: bool = False
    """Send credentials over a connection that is not encrypted (off by
    default: the client defers rather than expose a password)."""

    own_names: tuple[str, ...] = ()
    """This server's own names. An SMTP server whose greeting or ``EHLO``
    reply names itself with one of them is this server: the mail would loop
    (an MX record pointing back here), so :func:`connect` fails with
    ``451 4.4.6`` (as Postfix's "loops back to myself"), a local reply."""

    connect_timeout: float = 30.0
    """Time to open the connection (Postfix's ``smtp_connect_timeout``)."""
    greeting_timeout: float = 300.0
    """Wait for the ``220`` greeting (RFC 5321 4.5.3.2.1: 5 minutes)."""
    helo_timeout: float = 300.0
    """Wait for the reply to ``EHLO``/``HELO``/``LHLO`` (Postfix: 300 s)."""
    starttls_timeout: float = 300.0
    """Wait for the reply to ``STARTTLS``, and again for the handshake."""
    auth_timeout: float = 300.0
    """Wait for each reply during ``AUTH``."""
    mail_timeout: float = 300.0
    """Wait for the reply to ``MAIL`` (RFC 5321 4.5.3.2.2: 5 minutes)."""
    rcpt_timeout: float = 300.0
    """Wait for the reply to each ``RCPT`` (4.5.3.2.3: 5 minutes)."""
    data_timeout: float = 120.0
    """Wait for the ``354`` after ``DATA`` (4.5.3.2.4: 2 minutes)."""
    data_block_timeout: float = 180.0
    """Time to send each chunk of the message (4.5.3.2.5: 3 minutes)."""
    data_end_timeout: float = 600.0
    """Wait for the reply after the final dot, and for each LMTP reply
    (4.5.3.2.6: 10 minutes)."""
    rset_timeout: float = 20.0
    """Wait for the reply to ``RSET`` (Postfix's ``smtp_rset_timeout``)."""
    quit_timeout: float = 20.0
    """Wait for the reply to ``QUIT``."""

    pipelining: bool = True
    """Send each message's envelope as one group (RFC 2920) to an SMTP or
    LMTP server that offers ``PIPELINING``: ``RSET`` (on a connection used
    before), ``MAIL``, every ``RCPT`` and ``DATA`` in one write, then the
    replies in order. A message then costs two round trips instead of four
    plus one per recipient. ``False``: one command at a time. (The stepwise
    API, :meth:`ClientConnection.mail` and the rest, is never pipelined.)"""

    max_reply_line: int = 8192
    """Longest reply line accepted (LMTP; aiosmtplib's own cap for SMTP is
    the same); longer is a protocol error. RFC 5321 4.5.3.1.5 allows 512."""
    max_reply_lines: int = 100
    """Most lines in one reply; more is a protocol error."""
    chunk_size: int = 65536
    """Octets of the message read and sent at a time."""

    def __post_init__(self) -> None:
        if self.tls_policy not in TLS_POLICIES:
            raise ValueError(
                f"tls_policy must be one of {', '.join(TLS_POLICIES)}, not {self.tls_policy!r}"
            )
        if not _is_word(self.helo_name):
            raise ValueError(
                f"helo_name must be printable ASCII without spaces: {self.helo_name!r}"
            )
        if self.tls_name is not None and not _is_word(self.tls_name):
            raise ValueError(f"tls_name must be printable ASCII without spaces: {self.tls_name!r}")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        ctx = self.tls_context
        if ctx is not None and (ctx.verify_mode != ssl.CERT_REQUIRED or not ctx.check_hostname):
            raise ValueError("tls_context must verify certificates and host names")
        for f in dataclasses.fields(self):
            if f.name.endswith("_timeout"):
                value = getattr(self, f.name)
                if not _positive(value):
                    raise ValueError(
                        f"{f.name} must be a positive number of seconds, not {value!r}"
                    )
        if not isinstance(self.own_names, tuple) or not all(map(_is_word, self.own_names)):
            raise ValueError(f"own_names must be a tuple of host names, not {self.own_names!r}")
        for name, minimum in (("max_reply_line", 512), ("max_reply_lines", 1), ("chunk_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")

    def replace(self, **changes: Any) -> ClientSettings:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def _positive(value: object) -> bool:
    return finite_number(value) and value > 0  # type: ignore[operator]


def _is_word(text: object) -> bool:
    return (
        isinstance(text, str)
        and bool(text)
        and text.isascii()
        and text.isprintable()
        and (" " not in text)
    )


# ------------------------------------------------------------------ replies
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: +|$)")
#: The event loop's time (``loop.time()``) by which a delivery made in this
#: context must end, or ``None``: the queue's runner sets it to its
#: ``delivery_timeout``. A connection's :meth:`~ClientConnection.send` and
#: :meth:`~ClientConnection.data` wait for no reply, and no drain, past it:
#: what has not come by then is timed out as at any stage (the recipients
#: still open are deferred), and the results already in stand — an LMTP
#: recipient's ``250`` is kept, not lost with the others' wait.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "bonzo_client_deadline", default=None
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: What a reply's text may not keep: C0 and C1 controls, and the lone
#: surrogates that stand for octets that are not UTF-8 (unprintable, and
#: a log file's encoder refuses them).
_UNSAFE_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _reply(code: int, lines: Sequence[str]) -> Reply:
    """Build a :class:`Reply` from a code and its lines of text (enhanced
    codes are taken off every line that has one of the code's class)."""
    enhanced = ""
    texts = []
    for i, line in enumerate(lines):
        match = _ENHANCED.match(line)
        if match and int(match.group(1)) == code // 100:
            if i == 0:
                enhanced = ".".join(match.groups())
            line = line[match.end() :]
        texts.append(_UNSAFE_TEXT.sub("?", line.strip()))
    return Reply(code, enhanced, "\n".join(texts))


def _local(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, text, remote=False)


def _parse_extensions(reply: Reply) -> dict[str, str]:
    """EHLO/LHLO keywords (upper-case) and their parameters; the first line
    is the server's name."""
    found: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            found[keyword.upper()] = params.strip()
    return found


# ---------------------------------------------------------------- messages
class MessageSource(Protocol):
    """A message held as added headers plus a body file, as
    :class:`bonzo.session.Envelope` holds it (the body may be spooled to
    disk: it is read in chunks, never whole)."""

    @property
    def header_bytes(self) -> bytes: ...

    def open_body(self) -> IO[bytes]: ...


#: What :meth:`ClientConnection.send` takes as the message: its bytes, a
#: binary file read from its current position (a spooled message), or a
#: :class:`MessageSource`. Line ends should be CRLF; bare LF and CR are sent
#: as CRLF.
Message = Union[bytes, bytearray, memoryview, IO[bytes], MessageSource]  # noqa: UP007


class _Content:
    """The message to send: optional leading bytes and an optional file."""

    def __init__(self, message: Message) -> None:
        self.head = b""
        self.body: IO[bytes] | None = None
        if isinstance(message, (bytes, bytearray, memoryview)):
            self.head = bytes(message)
        elif hasattr(message, "open_body") and hasattr(message, "header_bytes"):
            source = cast(MessageSource, message)
            self.head = bytes(source.header_bytes)
            self.body = source.open_body()
        elif hasattr(message, "read") and hasattr(message, "seek"):
            self.body = message
        else:
            raise TypeError(f"cannot send {type(message).__name__} as a message")
        self.start = 0
        body_size = 0
        if self.body is not None:
            self.start = self.body.tell()
            body_size = self.body.seek(0, io.SEEK_END) - self.start
            self.body.seek(self.start)
        self.size = len(self.head) + body_size

    def chunks(self, size: int) -> Iterator[bytes]:
        """The content in chunks of at most ``size`` octets (from the start)."""
        head = self.head
        for i in range(0, len(head), size):
            yield head[i : i + size]
        body = self.body
        if body is not None:
            body.seek(self.start)
            while True:
                block = body.read(size)
                if not block:
                    break
                yield block

    def eightbit(self, size: int) -> bool:
        """True if any octet is outside ASCII (read in chunks)."""
        return any(not chunk.isascii() for chunk in self.chunks(size))


def has_8bit(message: Message, chunk_size: int = 1 << 16) -> bool:
    """True if ``message`` (see :data:`Message`: a file is read from its
    current position, in chunks, and left where it was) has an octet
    outside ASCII: what decides whether it needs ``8BITMIME`` (or, with UTF-8
    headers, ``SMTPUTF8``) at the server, whatever it was declared."""
    content = _Content(message)
    try:
        return content.eightbit(chunk_size)
    finally:
        if content.body is not None:
            content.body.seek(content.start)


class CRLFLines:
    """Turn content fed in chunks of any size into CRLF lines, streaming: bare
    LF and bare CR become CRLF (:func:`crlf_lines`), and a last line without
    a line end gets one. At most one octet (a CR that may start a CRLF split
    between chunks) is held back. What :class:`DotStuffer` sends, and how
    :meth:`bonzo.session.Envelope.replace_body` stores a new body."""

    __slots__ = ("_cr", "line_start")

    def __init__(self) -> None:
        self._cr = False
        #: Whether the next octet fed starts a line.
        self.line_start = True

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data[-1:] == b"\r":
            data = data[:-1]
            self._cr = True
        if not data:
            return b""
        crlf = data.count(b"\r\n")
        if crlf != data.count(b"\n") or crlf != data.count(b"\r"):
            data = crlf_lines(data)
        self.line_start = data[-1:] == b"\n"
        return data

    def finish(self) -> bytes:
        """The rest: the CRLF of a CR held back, or of an unended last line."""
        held, self._cr = self._cr, False
        if held or not self.line_start:
            self.line_start = True
            return b"\r\n"
        return b""


class DotStuffer:
    """Encode message content for ``DATA``, streaming (RFC 5321 4.5.2).

    :meth:`feed` takes the content in chunks of any size and returns what to
    send for each; :meth:`finish` returns the rest and the terminating
    ``.``. Bare LF and bare CR become CRLF (relayed content never carries
    them, and a bare LF before a dot must not hide a terminator:
    :class:`CRLFLines`); a line starting with ``.`` gets a second one; the
    content is ended with CRLF if it does not end with one.
    """

    __slots__ = ("_lines",)

    def __init__(self) -> None:
        self._lines = CRLFLines()

    def feed(self, data: bytes) -> bytes:
        line_start = self._lines.line_start
        data = self._lines.feed(data)
        if b"\n." in data:
            data = data.replace(b"\n.", b"\n..")
        if line_start and data[:1] == b".":
            data = b"." + data
        return data

    def finish(self) -> bytes:
        return self._lines.finish() + b".\r\n"


def crlf_lines(data: bytes) -> bytes:
    """``data`` with every line end (CRLF, bare LF, bare CR) as CRLF: as the
    client sends content, and as :meth:`bonzo.session.Envelope.replace_body`
    stores a new body, so that later filters see what is sent.

    Three passes of :meth:`bytes.replace` (a regular expression's ``sub``
    made one object per line first: some 90 times the input's size for
    short lines)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _stuffed(content: _Content, size: int) -> Iterator[bytes]:
    stuffer = DotStuffer()
    for chunk in content.chunks(size):
        out = stuffer.feed(chunk)
        if out:
            yield out
    yield stuffer.finish()


def _recipient(value: str | Recipient) -> Recipient:
    return value if isinstance(value, Recipient) else Recipient(value)


_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
_NOTIFY_TEXT = re.compile(r"[A-Za-z, ]+")


def _unquoted_rest(address: str) -> str:
    """``address`` after its quoted local part (``"x>y"@example.org`` gives
    ``@example.org``), or the whole address when it has none (or an
    unterminated one)."""
    if not address.startswith('"'):
        return address
    i = 1
    while i < len(address):
        if address[i] == "\\":
            i += 2
        elif address[i] == '"':
            return address[i + 1 :]
        else:
            i += 1
    return address


def _check_mailbox(address: str, what: str) -> None:
    # "<" and ">" would end the path in the command line, except inside a
    # quoted local part (RFC 5321 4.1.2), which a server may have accepted.
    if not isinstance(address, str) or _CONTROL.search(address):
        raise ValueError(f"bad {what} address {address!r}")
    rest = _unquoted_rest(address)
    if "<" in rest or ">" in rest:
        raise ValueError(f"bad {what} address {address!r}")
    if len(address.encode("utf-8")) > 254:
        raise ValueError(f"{what} address too long: {address!r}")


def sendable(address: str) -> bool:
    """True if ``address`` can be put in a ``MAIL`` or ``RCPT`` command
    (what :meth:`ClientConnection.send` refuses with :class:`ValueError`
    otherwise): no control character, no ``<``/``>`` outside a quoted
    local part, at most 254 octets.

    .. versionadded:: 0.2
    """
    try:
        _check_mailbox(address, "")
    except ValueError:
        return False
    return True


def recipient_problem(recipient: Recipient) -> str | None:
    """What :meth:`ClientConnection.send` would refuse about ``recipient``
    (its address, ``NOTIFY`` or ``ORCPT``) as a short text, or None.

    .. versionadded:: 0.2
    """
    try:
        _check_recipient(recipient)
    except ValueError as exc:
        return str(exc)
    return None


def options_problem(ret: str | None, envid: str | None) -> str | None:
    """What :meth:`ClientConnection.send` would refuse about its ``ret`` and
    ``envid`` arguments as a short text, or None.

    .. versionadded:: 0.2
    """
    try:
        _check_mail_options(ret, envid)
    except ValueError as exc:
        return str(exc)
    return None


def _check_xtext(value: str, what: str) -> None:
    if not value or not value.isprintable() or " " in value or len(value) > 500:
        raise ValueError(f"bad {what} {value!r}")


def _check_mail_options(ret: str | None, envid: str | None) -> None:
    if ret is not None and ret.upper() not in ("FULL", "HDRS"):
        raise ValueError(f"bad RET {ret!r}")
    if envid is not None:
        _check_xtext(envid, "ENVID")


def _check_recipient(r: Recipient) -> None:
    _check_mailbox(r.address, "recipient")
    if not r.address:
        raise ValueError("a recipient address cannot be empty")
    if r.notify is not None:
        # Only letters, commas and spaces (which the RCPT line drops): a CR,
        # LF or other control character, which str.strip() would hide here,
        # must not reach the command line.
        if not isinstance(r.notify, str) or not _NOTIFY_TEXT.fullmatch(r.notify):
            raise ValueError(f"bad NOTIFY {r.notify!r}")
        words = {w.strip(" ").upper() for w in r.notify.split(",")}
        if words != {"NEVER"} and not words <= _NOTIFY:
            raise ValueError(f"bad NOTIFY {r.notify!r}")
    if r.orcpt is not None:
        _check_xtext(r.orcpt, "ORCPT")


# ------------------------------------------------------------- connections
#: Seconds the reply to ``QUIT`` is awaited when the TLS policy refuses a
#: server (no STARTTLS): the delivery attempt (and its slot) waits for it,
#: so briefly -- a server answers QUIT at once.
QUIT_REFUSED_TIMEOUT = 2.0

_ENCRYPT_ONLY: ssl.SSLContext | None = None
_SYSTEM_TRUST: ssl.SSLContext | None = None


def _encrypt_only_context() -> ssl.SSLContext:
    """One shared client context that encrypts without checking the
    certificate (the ``opportunistic`` and ``require`` policies)."""
    global _ENCRYPT_ONLY
    if _ENCRYPT_ONLY is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _ENCRYPT_ONLY = ctx
    return _ENCRYPT_ONLY


def ca_file_context(path: str) -> ssl.SSLContext:
    """A context for the ``verify`` policy (:attr:`ClientSettings.tls_context`)
    that trusts the CA certificates in the PEM file ``path`` and nothing
    else (not the system's store). Read now: build it again to see a changed
    file. Raises :class:`ValueError` naming the file when it cannot be read
    or holds no certificate."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        # With a cafile, the system's store is not loaded: only this file.
        ctx = ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise ValueError(f"{path} holds no usable PEM certificate ({reason})") from None
    if not ctx.cert_store_stats().get("x509"):
        raise ValueError(f"{path} holds no PEM certificate")
    return ctx


def reload_system_trust() -> None:
    """Read the system's CA store again, at the next connection that
    verifies a certificate with it (a reload: updated ``ca-certificates``)."""
    global _SYSTEM_TRUST
    _SYSTEM_TRUST = None


def _verify_context(settings: ClientSettings) -> ssl.SSLContext:
    global _SYSTEM_TRUST
    if settings.tls_context is not None:
        return settings.tls_context
    if _SYSTEM_TRUST is None:
        _SYSTEM_TRUST = ssl.create_default_context()
    return _SYSTEM_TRUST


def server_label(
    host: str | None, port: int | None, path: str | None = None, name: str | None = None
) -> str:
    """How logs, results and reports name a server: ``unix:path``;
    ``host:port`` (``[address]:port`` for an IPv6 address); or, when the
    connection goes to an address on behalf of a named host (an MX host, a
    ``tls_name``), ``name[address]:port`` as Postfix writes it."""
    if path is not None:
        return f"unix:{path}"
    where = f"[{host}]" if host is not None and ":" in host else str(host)
    if name and name != host and not _literal_of(name, host):
        where = f"{name}{where}" if where.startswith("[") else f"{name}[{where}]"
    return f"{where}:{port}"


def _literal_of(name: str, host: str | None) -> bool:
    """Whether ``name`` is the address literal of ``host`` (``[192.0.2.1]``,
    ``[IPv6:2001:db8::1]``: a recipient domain that is an address), which
    would name the address twice."""
    if host is None or not (name.startswith("[") and name.endswith("]")):
        return False
    inner = name[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return ipaddress.ip_address(inner) == ipaddress.ip_address(host)
    except ValueError:
        return False


async def _open_socket(
    host: str | None, port: int, path: str | None, settings: ClientSettings
) -> socket.socket:
    """A connected non-blocking socket to ``host:port`` (each address in
    turn) or to the Unix socket ``path``; :class:`_Broken` at CONNECT."""
    loop = asyncio.get_running_loop()
    where = server_label(host, port, path)
    timeout = settings.connect_timeout
    if path is not None:
        targets: list[tuple[int, Any]] = [(int(socket.AF_UNIX), path)]
    else:
        family = socket.AF_UNSPEC
        if settings.source_address is not None:
            family = socket.AF_INET6 if ":" in settings.source_address else socket.AF_INET
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM), timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise _Broken(
                Stage.CONNECT, _local(451, "4.4.4", f"cannot resolve {host}: {_why(exc)}")
            ) from None
        targets = [(info[0], info[4]) for info in infos]
    problem = "no address"
    for kind, address in targets:
        sock = socket.socket(kind, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if settings.source_address is not None and kind != socket.AF_UNIX:
                sock.bind((settings.source_address, 0))
            await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            problem = _why(exc)
            continue
        except BaseException:
            sock.close()
            raise
        if kind != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise _Broken(Stage.CONNECT, _local(451, "4.4.1", f"connect to {where} failed: {problem}"))


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        # OpenSSL's reason ("certificate has expired", "Hostname mismatch,
        # ...", "unable to get local issuer certificate") tells a lapsed
        # certificate, a wrong tls_name and a missing CA apart; the bare
        # reason (CERTIFICATE_VERIFY_FAILED) does not.
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and str(exc):
        # Raised by Python itself, with no errno: its message is the reason
        # ("AF_UNIX path too long").
        return str(exc)
    return type(exc).__name__


def _timed_out(stage: Stage) -> Reply:
    return _local(451, "4.4.2", f"timed out waiting for the server ({stage})")


def _lost(stage: Stage) -> Reply:
    return _local(451, "4.4.2", f"lost connection with the server ({stage})")


def _garbled(stage: Stage, what: str) -> Reply:
    return _local(451, "4.5.0", f"protocol error from the server ({stage}): {what}")


def _classified(stage: Stage, reply: Reply, ok: tuple[int, ...]) -> Reply:
    """``reply`` if it is one of ``ok`` or a 4xx/5xx other than ``421``;
    otherwise the connection cannot go on (:class:`_Broken`)."""
    if reply.code == 421:
        # The server is closing the connection (RFC 5321 3.8).
        raise _Broken(stage, reply)
    if reply.code not in ok and not 400 <= reply.code <= 599:
        raise _Broken(stage, _garbled(stage, f"unexpected reply {reply.code}"))
    return reply


class ClientConnection:
    """An open SMTP or LMTP connection to one server, ready for messages.

    Made by :func:`connect`. :meth:`send` delivers one message and may be
    called again for the next (one at a time); :meth:`mail`, :meth:`rcpt`,
    :meth:`data` and :meth:`rset` do the same one command at a time, for a
    relay that learns the envelope as its own client sends it;
    :meth:`quit` ends politely, :meth:`close` at once. ``async with`` quits
    at the end.
    """

    #: ``"SMTP"`` or ``"LMTP"``.
    protocol = "SMTP"

    def __init__(self, server: str, settings: ClientSettings) -> None:
        #: Who this talks to, as :func:`server_label` names it.
        self.server = server
        self.settings = settings
        #: The greeting (after :func:`connect`).
        self.greeting: Reply | None = None
        #: EHLO/LHLO keywords (upper-case) and their parameters; empty after HELO.
        self.extensions: dict[str, str] = {}
        #: ``True`` once the connection is encrypted.
        self.tls = False
        #: ``True`` when the certificate was checked (``verify`` policy).
        self.tls_verified = False
        #: The TLS version and cipher (``"TLSv1.3"``, ``"TLS_AES_256_GCM_SHA384"``)
        #: once encrypted; empty otherwise.
        self.tls_version = ""
        self.tls_cipher = ""
        #: ``True`` after a successful ``AUTH``.
        self.authenticated = False
        #: Messages for which ``MAIL`` was sent on this connection.
        self.transactions = 0
        self._utf8_mail = False  # the open transaction declared SMTPUTF8
        self._alive = True
        self._busy = False
        # No transaction since the connection opened or the last RSET: the
        # next MAIL needs no RSET first.
        self._clean = True
        # The stepwise API (mail/rcpt/data): MAIL accepted and no DATA yet,
        # whether it declared SMTPUTF8, and the recipients accepted since.
        self._in_mail = False
        self._mail_utf8 = False
        self._accepted = 0

    # The backend. Once a connection is set up, every reply is read by its
    # _ReplyReader (``_replies``), which owes one reply per command line
    # written and one per reply the message is due, and refuses anything
    # else: a reply nobody asked for is never taken for the next command's
    # (a stray "250" for the message's), and a malformed one never counts.
    # A subclass writes (``_write``) and waits for its transport to drain.
    _replies: _ReplyReader | None = None
    _early = False  # the stepwise data(): answered before the final dot

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    async def _drain(self) -> None:
        """Wait (``data_block_timeout``) until what was written has gone."""

    def _shutdown(self, abort: bool) -> None:
        raise NotImplementedError

    @staticmethod
    def _within(timeout: float) -> float:
        """``timeout``, cut to what is left before :data:`deadline`."""
        end = deadline.get()
        if end is None:
            return timeout
        return max(min(timeout, end - asyncio.get_running_loop().time()), 0.001)

    def _in_step(self) -> bool:
        replies = self._replies
        return replies is not None and replies.idle and not replies.lost

    async def _command(self, stage: Stage, line: bytes, timeout: float) -> Reply:
        replies = self._replies
        if replies is None:
            raise _Broken(stage, _lost(stage))
        replies.in_step(stage)
        self._group_write(line + b"\r\n")
        return await replies.reply(stage, self._within(timeout))

    async def _send_data(self, content: _Content) -> None:
        """The message (its replies owed already: :meth:`_data_command`),
        sent until its end or until the server answers early (:attr:`_early`)."""
        self._early = await self._group_content(content, 0)

    async def _read_reply(self, stage: Stage, timeout: float) -> Reply:
        reply = await self._group_reply(stage, timeout)
        if self._early:
            # Answered before the final dot (RFC 5321 4.1.1.4 says after):
            # the reply stands unless it claims delivery, and the
            # conversation is out of step, so the connection ends.
            if reply.code == 250:
                raise _Broken(stage, _garbled(stage, "250 before the end of the message"))
            self.close()
        return reply

    def _pipelines(self) -> bool:
        """Whether :meth:`send` sends the envelope as one group (RFC 2920)."""
        return self.settings.pipelining and self.supports("PIPELINING")

    # A transaction: entered around it; write without waiting (``replies``:
    # how many replies that is owed, one per line by default), the next
    # reply, the message content (True if the server answered before its
    # end and the rest was not sent).
    @contextlib.contextmanager
    def _grouping(self) -> Iterator[None]:
        replies = self._replies
        if replies is None:
            raise _Broken(Stage.MAIL, _lost(Stage.MAIL))
        replies.in_step(Stage.MAIL)
        try:
            yield
        finally:
            if not replies.idle:
                # More than the transaction's replies: out of step, not reusable.
                self.close()

    def _group_write(self, data: bytes, replies: int | None = None) -> None:
        reader = self._replies
        if reader is None or reader.lost:
            raise _Broken(Stage.MAIL, _lost(Stage.MAIL))
        reader.owed += data.count(b"\n") if replies is None else replies
        self._write(data)

    async def _group_reply(self, stage: Stage, timeout: float) -> Reply:
        reader = self._replies
        if reader is None:
            raise _Broken(stage, _lost(stage))
        return await reader.reply(stage, self._within(timeout))

    async def _group_content(
        self, content: _Content, replies: int = 1, *, raw: bool = False
    ) -> bool:
        reader = self._replies
        if reader is None:
            raise _Broken(Stage.DATA, _lost(Stage.DATA))
        reader.owed += replies
        size = self.settings.chunk_size
        for chunk in content.chunks(size) if raw else _stuffed(content, size):
            if reader.replies or reader.lost or reader.error is not None:
                return True
            self._write(chunk)
            await self._drain()
        return False

    async def _transact(
        self,
        rcpts: list[Recipient],
        pending: list[int],
        mail: bytes,
        content: _Content,
        settle: Callable[[int, Status, Stage, Reply], None],
        settle_reply: _SettleReply,
        pipelined: bool,
        binary: bool = False,
    ) -> None:
        """The transaction of :meth:`send` once the local checks passed:
        ``MAIL``, the ``RCPT`` of every recipient in ``pending``, ``DATA``,
        the message, then the reply (LMTP: one per accepted recipient).

        ``pipelined`` (RFC 2920): ``RSET`` if the connection was used,
        ``MAIL``, every ``RCPT`` and ``DATA`` go in one write and the
        replies are read in order; every reply decides what it would decide
        one command at a time. A failed ``RSET`` raises :class:`ClientError`
        (no reply to anything of this message was seen, so it may be sent
        again on a new connection); a lost or garbled conversation raises
        :class:`_Broken`."""
        settings = self.settings
        lmtp = self.protocol == "LMTP"
        # Pipelined over LMTP, a reply after the message is owed for each
        # RCPT the server may accept: struck off as each refusal is read.
        owes_each = pipelined and lmtp and not binary
        with self._grouping():
            if pipelined:
                reset = not self._clean
                commands = [b"RSET"] if reset else []
                commands.append(mail)
                commands += [self._rcpt_line(rcpts[i]) for i in pending]
                if not binary:
                    commands.append(b"DATA")
                self._clean = False
                # The replies to the message are owed from the DATA on, so
                # that one the server sends early (with the 354, in the same
                # packet as the group's replies) is heard as such: SMTP's one,
                # LMTP's one per recipient (how many is not known yet).
                extra = 0 if binary else len(pending) if lmtp else 1
                self._group_write(b"\r\n".join(commands) + b"\r\n", replies=len(commands) + extra)
                if reset:
                    await self._reset(self._group_reply(Stage.MAIL, settings.rset_timeout))
            self.transactions += 1
            self._clean = False

            read = self._group_reply

            async def ask(stage: Stage, line: bytes, timeout: float, ok: tuple[int, ...]) -> Reply:
                # Pipelined, the command went with the group: only its reply is read.
                if pipelined:
                    return _classified(stage, await read(stage, timeout), ok)
                return await self._checked(stage, line, timeout, ok)

            reply = await ask(Stage.MAIL, mail, settings.mail_timeout, (250,))
            sender_ok = reply.code == 250
            if not sender_ok:
                for i in pending:
                    settle_reply(i, Stage.MAIL, reply)
                if not pipelined:
                    return
            accepted = []
            reader = self._replies
            assert reader is not None
            for i in pending:
                line = self._rcpt_line(rcpts[i])
                reply = await ask(Stage.RCPT, line, settings.rcpt_timeout, (250, 251))
                if sender_ok and reply.code in (250, 251):
                    accepted.append(i)
                    continue
                if owes_each:
                    reader.owed -= 1  # no reply after the message for this one
                if sender_ok:
                    settle_reply(i, Stage.RCPT, reply, bool(accepted))
                # else "no valid sender" or the like: MAIL's reply stands
            if not accepted and (not pipelined or binary):
                return
            groups = [[i] for i in accepted] if self.protocol == "LMTP" else [accepted]
            if binary:
                # One chunk, as it is (RFC 3030): the size, then the octets.
                self._group_write(f"BDAT {content.size} LAST\r\n".encode("ascii"), replies=0)
                early = await self._group_content(content, len(groups), raw=True)
                await self._final_replies(groups, early, settle, settle_reply)
                return
            # The replies to the message are owed from the DATA on, so that
            # one the server sends early (with the 354) is heard as such.
            if pipelined:
                # (Owed with the group: SMTP's one, LMTP's one per accepted RCPT.)
                reply = _classified(
                    Stage.DATA, await read(Stage.DATA, settings.data_timeout), (354,)
                )
                if reply.code != 354:
                    reader.owed -= len(groups)
            else:
                reply = await self._data_command(len(groups))
            if not accepted:
                if reply.code == 354:
                    # DATA taken with no recipient (RFC 2920 3.1): end it with
                    # no content; whatever the server says to that, nobody gets
                    # it (an LMTP server owes no reply then: it has no recipient).
                    self._group_write(b".\r\n", replies=0)
                    if not lmtp:
                        await read(Stage.END, settings.data_end_timeout)
                return
            if reply.code != 354:
                for i in accepted:
                    settle_reply(i, Stage.DATA, reply)
                return
            # SMTP: one reply for all; LMTP: one per accepted recipient, in order.
            early = await self._group_content(content, 0)
            await self._final_replies(groups, early, settle, settle_reply)

    async def _data_command(self, replies: int) -> Reply:
        """``DATA`` alone, the ``replies`` to the message owed with it (so
        that one the server sends with the ``354`` is heard as early), and
        no longer owed when the answer is not ``354``."""
        stage = Stage.DATA
        reader = self._replies
        if reader is None:
            raise _Broken(stage, _lost(stage))
        reader.in_step(stage)
        self._group_write(b"DATA\r\n", replies=1 + replies)
        reply = await reader.reply(stage, self._within(self.settings.data_timeout))
        if reply.code != 354:
            reader.owed -= replies
        return _classified(stage, reply, (354,))

    async def _final_replies(
        self,
        groups: list[list[int]],
        early: bool,
        settle: Callable[[int, Status, Stage, Reply], None],
        settle_reply: _SettleReply,
    ) -> None:
        """The replies after the message: one per group of recipients (SMTP:
        one for all; LMTP: one per accepted recipient, in order)."""
        settings = self.settings
        for group in groups:
            reply = await self._group_reply(Stage.END, settings.data_end_timeout)
            if reply.code != 250 and not 400 <= reply.code <= 599:
                raise _Broken(Stage.END, _garbled(Stage.END, f"unexpected reply {reply.code}"))
            if early:
                # Answered before the final dot: the reply stands unless
                # it claims delivery; the conversation is out of step, so
                # the connection ends.
                if reply.code == 250:
                    raise _Broken(
                        Stage.END, _garbled(Stage.END, "250 before the end of the message")
                    )
                self.close()
            for i in group:
                if reply.code == 250:
                    settle(i, Status.DELIVERED, Stage.END, reply)
                else:
                    settle_reply(i, Stage.END, reply)
            if reply.code == 421:
                # Closing: the LMTP replies still owed will not come.
                raise _Broken(Stage.END, reply)

    # ---------------------------------------------------------- public
    @property
    def usable(self) -> bool:
        """True while the connection can take another message."""
        return self._alive

    def supports(self, keyword: str) -> bool:
        """True if the server announced the extension ``keyword``."""
        return keyword.upper() in self.extensions

    @property
    def size_limit(self) -> int:
        """The server's ``SIZE`` limit (0: none announced, or a value that
        is no number of octets: not ASCII digits, or more than 20 of them)."""
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isascii() and value.isdigit() and len(value) <= 20 else 0

    @property
    def tls_summary(self) -> str:
        """How the connection is protected, for a log line: ``TLSv1.3
        TLS_AES_256_GCM_SHA384 verified`` (or ``not verified``), or ``none``."""
        if not self.tls:
            return "none"
        head = " ".join(part for part in (self.tls_version, self.tls_cipher) if part) or "TLS"
        return f"{head} {'verified' if self.tls_verified else 'not verified'}"

    def close(self) -> None:
        """Close at once: no ``QUIT``, nothing more sent."""
        self._alive = False
        self._shutdown(abort=True)

    async def quit(self) -> None:
        """Send ``QUIT``, wait for its reply, close (for TLS, with the
        ``close_notify`` exchange), all within :attr:`ClientSettings.quit_timeout`.
        Never raises."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.quit_timeout
        if self._alive:
            try:
                await self._command(Stage.END, b"QUIT", self.settings.quit_timeout)
            except (_Broken, OSError):
                pass
        self._alive = False
        await self._close_gracefully(max(deadline - loop.time(), 0.001))

    async def _close_gracefully(self, timeout: float) -> None:
        self._shutdown(abort=False)

    async def __aenter__(self) -> ClientConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.quit()

    def _broken(self, exc: _Broken) -> None:
        log.debug("%s %s: %s", self.protocol, self.server, exc.reply)
        self._alive = False
        # Abort: a server that stopped reading must not keep the socket (and
        # whatever of the message is still buffered) open.
        self._shutdown(abort=True)

    async def _checked(
        self, stage: Stage, line: bytes, timeout: float, ok: tuple[int, ...]
    ) -> Reply:
        """Run a command; a reply outside ``ok`` and not 4xx/5xx, or a
        ``421`` (the server is closing), breaks the connection."""
        return _classified(stage, await self._command(stage, line, timeout), ok)

    async def send(
        self,
        sender: str,
        recipients: Sequence[str | Recipient],
        message: Message,
        *,
        smtputf8: bool | None = None,
        eightbit: bool | None = None,
        ret: str | None = None,
        envid: str | None = None,
        binary: bool = False,
    ) -> DeliveryResult:
        """Deliver one message; return a result for every recipient.

        :arg sender: the reverse-path (``""`` for the null sender).
        :arg recipients: addresses or :class:`Recipient` objects.
        :arg message: see :data:`Message`; a file is read from its current
            position to its end, in chunks, and left where it was found.
        :arg smtputf8: the message needs SMTPUTF8 (RFC 6531: it came with
            the ``SMTPUTF8`` parameter). ``None``: only if an address is
            not ASCII. Without SMTPUTF8 at the server, a non-ASCII sender or
            ``smtputf8=True`` refuses every recipient (``553 5.6.7``); a
            non-ASCII recipient refuses only that one.
        :arg eightbit: the content has 8-bit octets (``BODY=8BITMIME``).
            ``None``: scan it (in chunks). Without 8BITMIME at the server,
            8-bit content is refused (``554 5.6.3``; no 7-bit conversion).
        :arg ret: DSN ``RET`` (``FULL``/``HDRS``), passed when the server
            offers DSN, as are ``envid`` and the recipients' ``NOTIFY`` and
            ``ORCPT``.
        :arg binary: the content is ``BODY=BINARYMIME`` (RFC 3030): it is
            sent as it is, in one ``BDAT <size> LAST``, never converted; a
            server that does not offer ``CHUNKING`` and ``BINARYMIME``
            refuses every recipient (``554 5.6.3``).

        Server replies and failures after ``MAIL`` was sent become results
        (a lost connection defers every recipient still open); this raises
        :class:`ClientError` only when the connection is closed or its
        ``RSET`` fails, before anything of this message was sent, and
        :class:`ValueError` for a malformed address or parameter.
        """
        rcpts = [_recipient(r) for r in recipients]
        _check_mailbox(sender, "sender")
        for r in rcpts:
            _check_recipient(r)
        _check_mail_options(ret, envid)
        content = _Content(message)
        with self._one_at_a_time("send()"):
            try:
                return await self._send(
                    rcpts, sender, content, smtputf8, eightbit, ret, envid, binary
                )
            finally:
                if content.body is not None:
                    content.body.seek(content.start)

    # ------------------------------------------------- shared by both APIs
    @contextlib.contextmanager
    def _one_at_a_time(self, what: str) -> Iterator[None]:
        if self._busy:
            raise RuntimeError(f"{what}: another command is running on this connection")
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    async def _begin(self, reset: bool = True) -> None:
        """Before a new MAIL: the connection must be open, and a connection
        that had a transaction is reset (which also proves it still works),
        unless ``reset`` is false (the caller sends the ``RSET`` in its
        pipelined group). Raises :class:`ClientError`: nothing of the new
        message was sent."""
        if not self._alive:
            raise ClientError(Stage.MAIL, _local(451, "4.4.2", "the connection is closed"))
        self._in_mail = False
        self._accepted = 0
        if self._clean or not reset:
            return
        await self._reset(self._command(Stage.MAIL, b"RSET", self.settings.rset_timeout))
        self._clean = True

    async def _reset(self, answer: Awaitable[Reply]) -> None:
        """Take the reply to an ``RSET`` (``answer``); if it is not ``250``
        or does not come, close the connection and raise
        :class:`ClientError`: nothing of the next message was accepted."""
        try:
            reply = _classified(Stage.MAIL, await answer, (250,))
        except _Broken as exc:
            self._broken(exc)
            raise ClientError(exc.stage, exc.reply) from None
        if reply.code != 250:
            self.close()
            raise ClientError(Stage.MAIL, reply)

    def _refusal(self, needs_utf8: bool, size: int, eightbit: bool) -> Reply | None:
        """What the server cannot take, known without a round trip: the
        local refusal for every recipient, or ``None``."""
        if needs_utf8 and not self.supports("SMTPUTF8"):
            return _local(553, "5.6.7", "the server does not support SMTPUTF8")
        limit = self.size_limit
        if limit and size > limit:
            return _local(552, "5.3.4", f"message size {size} exceeds the server's limit {limit}")
        if eightbit and not self.supports("8BITMIME"):
            return _local(
                554,
                "5.6.3",
                "the message has 8-bit content and the server does not support 8BITMIME",
            )
        return None

    def _mail_line(
        self,
        sender: str,
        size: int | None,
        eightbit: bool,
        needs_utf8: bool,
        ret: str | None,
        envid: str | None,
        binary: bool = False,
    ) -> bytes:
        """``MAIL FROM`` with the parameters the server offers and the
        message needs (DSN's only when the server offers DSN)."""
        dsn = self.supports("DSN")
        self._utf8_mail = needs_utf8
        params = []
        if size is not None and (self.size_limit or self.supports("SIZE")):
            params.append(f"SIZE={size}")
        if binary:
            params.append("BODY=BINARYMIME")
        elif eightbit:
            params.append("BODY=8BITMIME")
        if needs_utf8:
            params.append("SMTPUTF8")
        if dsn and ret is not None:
            params.append(f"RET={ret.upper()}")
        if dsn and envid is not None:
            params.append(f"ENVID={xtext_canonical(envid)}")
        return " ".join([f"MAIL FROM:<{sender}>", *params]).encode("utf-8")

    def _rcpt_line(self, r: Recipient) -> bytes:
        line = f"RCPT TO:<{r.address}>"
        if self.supports("DSN"):
            if r.notify is not None:
                # Each keyword once, in the order given: a server that
                # refuses a repeat (as RFC 3461's list implies) must not
                # refuse a recipient Bonzo accepted with one.
                words = r.notify.upper().replace(" ", "").split(",")
                line += f" NOTIFY={','.join(dict.fromkeys(words))}"
            if r.orcpt is not None:
                orcpt = xtext_canonical(r.orcpt)
                if not (orcpt.isascii() or self._utf8_mail):
                    # RFC 6533's raw UTF-8 form, downgraded to its escapes
                    # for a transaction without SMTPUTF8.
                    orcpt = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in orcpt)
                # Escapes can take it past RFC 3461's 500 characters: then
                # left out (it is informational) rather than the recipient
                # refused for it.
                if len(orcpt) <= 500:
                    line += f" ORCPT={orcpt}"
        return line.encode("utf-8")

    async def _mail(self, line: bytes) -> Reply:
        self.transactions += 1
        self._clean = False
        return await self._checked(Stage.MAIL, line, self.settings.mail_timeout, (250,))

    async def _rcpt(self, r: Recipient) -> Reply:
        return await self._checked(
            Stage.RCPT, self._rcpt_line(r), self.settings.rcpt_timeout, (250, 251)
        )

    async def _message(self, content: _Content, replies: int) -> Reply:
        """``DATA`` and, on ``354``, the message (``replies`` replies then
        due): the reply to ``DATA`` when it is not ``354``, else the
        ``354``, the message having been sent."""
        reply = await self._data_command(replies)
        if reply.code == 354:
            await self._send_data(content)
        return reply

    async def _end_reply(self) -> Reply:
        """One reply after the final dot (LMTP: one of several)."""
        reply = await self._read_reply(Stage.END, self.settings.data_end_timeout)
        if reply.code != 250 and not 400 <= reply.code <= 599:
            raise _Broken(Stage.END, _garbled(Stage.END, f"unexpected reply {reply.code}"))
        return reply

    async def _send(
        self,
        rcpts: list[Recipient],
        sender: str,
        content: _Content,
        smtputf8: bool | None,
        eightbit: bool | None,
        ret: str | None,
        envid: str | None,
        binary: bool = False,
    ) -> DeliveryResult:
        settings = self.settings
        pipelined = self._pipelines()
        await self._begin(reset=not pipelined)

        results: list[RecipientResult | None] = [None] * len(rcpts)
        outcome = DeliveryResult([], self.server, self.supports("DSN"))

        def settle(
            i: int, status: Status, stage: Stage, reply: Reply, after_accepted: bool = False
        ) -> None:
            results[i] = RecipientResult(rcpts[i], status, stage, reply, after_accepted)

        def settle_reply(i: int, stage: Stage, reply: Reply, after_accepted: bool = False) -> None:
            status = Status.DEFERRED if reply.code < 500 else Status.REFUSED
            if stage is Stage.RCPT and reply.code == 552:
                # "Too many recipients" as some servers say it: RFC 5321
                # 4.5.3.1.10 asks clients to treat it as temporary.
                status = Status.DEFERRED
            settle(i, status, stage, reply, after_accepted)

        def finish() -> DeliveryResult:
            outcome.recipients = [r for r in results if r is not None]
            return outcome

        def refuse_all(why: Reply) -> DeliveryResult:
            for i in range(len(rcpts)):
                settle(i, Status.REFUSED, Stage.MAIL, why)
            return finish()

        # Checks that need no round trip: the server cannot take it as it is.
        utf8 = self.supports("SMTPUTF8")
        needs_utf8 = bool(smtputf8) or not sender.isascii()
        why = self._refusal(needs_utf8, 0, False)
        if why is not None:
            return refuse_all(why)
        if not utf8:
            why = _local(553, "5.6.7", "the server does not support SMTPUTF8")
            for i, r in enumerate(rcpts):
                if not r.address.isascii():
                    settle(i, Status.REFUSED, Stage.RCPT, why)
        # (Without SMTPUTF8 the UTF-8 recipients were refused just above.)
        needs_utf8 = needs_utf8 or (utf8 and any(not r.address.isascii() for r in rcpts))
        why = self._refusal(False, content.size, False)
        if why is not None:
            return refuse_all(why)
        if binary and not (self.supports("CHUNKING") and self.supports("BINARYMIME")):
            return refuse_all(
                _local(
                    554,
                    "5.6.3",
                    "the message is BINARYMIME and the server does not take it "
                    "(CHUNKING and BINARYMIME)",
                )
            )
        if binary:
            eightbit = False  # BODY=BINARYMIME says it
        elif eightbit is None:
            eightbit = content.eightbit(settings.chunk_size)
        why = self._refusal(False, 0, eightbit)
        if why is not None:
            return refuse_all(why)
        pending = [i for i in range(len(rcpts)) if results[i] is None]
        if not pending:
            return finish()

        mail = self._mail_line(sender, content.size, eightbit, needs_utf8, ret, envid, binary)
        try:
            await self._transact(
                rcpts, pending, mail, content, settle, settle_reply, pipelined, binary
            )
        except _Broken as exc:
            self._broken(exc)
            for i in range(len(rcpts)):
                if results[i] is None:
                    settle(i, Status.DEFERRED, exc.stage, exc.reply)
        return finish()

    # ------------------------------------------------------ stepwise API
    async def mail(
        self,
        sender: str,
        *,
        size: int | None = None,
        smtputf8: bool | None = None,
        eightbit: bool = False,
        ret: str | None = None,
        envid: str | None = None,
    ) -> Reply:
        """Start a transaction step by step: ``MAIL FROM``, for a caller
        that learns the recipients and the message one at a time (a relay
        during its own client's session). Then :meth:`rcpt` for each
        recipient and :meth:`data`, or :meth:`rset`.

        :arg size: the message's size if known (``SIZE=``, RFC 1870; more
            than the server's limit is refused here, ``552 5.3.4``).
        :arg smtputf8: the transaction needs SMTPUTF8 (``None``: only for a
            non-ASCII sender); a UTF-8 recipient needs it declared here.
        :arg eightbit: the content will have 8-bit octets
            (``BODY=8BITMIME``); it is not scanned.
        :arg ret: as for :meth:`send`, with ``envid``.

        Returns the server's reply (``250``, a ``4xx`` or ``5xx``), a local
        refusal (``remote`` False: ``553 5.6.7``, ``552 5.3.4``,
        ``554 5.6.3``, as :meth:`send`), or a made-up ``451 4.4.x`` when the
        connection failed (it is then closed: :attr:`usable` is False). A
        connection used before is reset first; like :meth:`send`, this
        raises :class:`ClientError` when it is closed or that ``RSET``
        fails, and :class:`ValueError` for a malformed argument.

        .. versionadded:: 0.2
        """
        _check_mailbox(sender, "sender")
        _check_mail_options(ret, envid)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"bad size {size!r}")
        with self._one_at_a_time("mail()"):
            await self._begin()
            needs_utf8 = bool(smtputf8) or not sender.isascii()
            why = self._refusal(needs_utf8, size or 0, eightbit)
            if why is not None:
                return why
            line = self._mail_line(sender, size, eightbit, needs_utf8, ret, envid)
            try:
                reply = await self._mail(line)
            except _Broken as exc:
                self._broken(exc)
                return exc.reply
            self._in_mail = reply.code == 250
            self._mail_utf8 = needs_utf8
            return reply

    async def rcpt(self, recipient: str | Recipient) -> Reply:
        """``RCPT TO`` after :meth:`mail` was accepted: the server's reply
        (``250``/``251``, ``4xx``, ``5xx``), a local ``553 5.6.7`` for a
        UTF-8 address when :meth:`mail` did not declare SMTPUTF8, or a
        made-up ``451 4.4.x`` (or the server's ``421``) when the connection
        failed (it is then closed). Raises :class:`RuntimeError` when no
        ``MAIL`` is open and :class:`ValueError` for a malformed address.

        .. versionadded:: 0.2
        """
        r = _recipient(recipient)
        _check_recipient(r)
        with self._one_at_a_time("rcpt()"):
            if not self._in_mail:
                raise RuntimeError("rcpt() needs a MAIL the server accepted")
            if not r.address.isascii() and not self._mail_utf8:
                if not self.supports("SMTPUTF8"):
                    # The usual cause (a relay whose downstream lacks it): say so.
                    return _local(553, "5.6.7", "the server does not support SMTPUTF8")
                return _local(553, "5.6.7", "the transaction was not started with SMTPUTF8")
            try:
                reply = await self._rcpt(r)
            except _Broken as exc:
                self._in_mail = False
                self._broken(exc)
                return exc.reply
            if reply.code in (250, 251):
                self._accepted += 1
            return reply

    async def data(self, message: Message) -> list[Reply]:
        """Send the message after at least one :meth:`rcpt` was accepted;
        return the replies after the final dot: one for SMTP, one per
        accepted recipient (in order) for LMTP. A refused ``DATA`` is the
        only reply (the message is not sent); a failed connection gives a
        made-up ``451 4.4.x`` (or ``421``) for every reply still owed, and
        is closed. The message is streamed as by :meth:`send`; the
        transaction is over either way.

        .. versionadded:: 0.2
        """
        content = _Content(message)
        with self._one_at_a_time("data()"):
            if not self._in_mail or not self._accepted:
                raise RuntimeError("data() needs a recipient the server accepted")
            self._in_mail = False
            owed = self._accepted if self.protocol == "LMTP" else 1
            replies: list[Reply] = []
            try:
                reply = await self._message(content, owed)
                if reply.code != 354:
                    return [reply]
                while len(replies) < owed:
                    reply = await self._end_reply()
                    replies.append(reply)
                    if reply.code == 421:
                        raise _Broken(Stage.END, reply)
            except _Broken as exc:
                self._broken(exc)
                replies += [exc.reply] * (owed - len(replies))
            finally:
                if content.body is not None:
                    content.body.seek(content.start)
            return replies

    async def rset(self) -> Reply:
        """``RSET``: end the transaction. Returns the server's reply, or a
        made-up ``451 4.4.2`` when the connection failed or was closed;
        a reply other than ``250`` closes the connection. Never raises
        :class:`ClientError`.

        .. versionadded:: 0.2
        """
        with self._one_at_a_time("rset()"):
            self._in_mail = False
            self._accepted = 0
            if not self._alive:
                return _local(451, "4.4.2", "the connection is closed")
            try:
                reply = await self._checked(Stage.MAIL, b"RSET", self.settings.rset_timeout, (250,))
            except _Broken as exc:
                self._broken(exc)
                return exc.reply
            if reply.code == 250:
                self._clean = True
            else:
                self.close()
            return reply


# ------------------------------------------------------------------- SMTP
class _ReplyReader(asyncio.Protocol):
    """The replies to a pipelined group (RFC 2920), read in place of
    aiosmtplib, which cannot have more than one reply in flight.

    :meth:`SMTPConnection._grouping` installs it on the transport
    (``set_protocol``) for one transaction and puts aiosmtplib's protocol
    back afterwards: the transport keeps the socket, TLS and flow control,
    and the connection events are passed on to aiosmtplib's protocol, so it
    knows when the connection is gone. Replies are parsed as they arrive
    (none is dropped, however the server's packets fall) within the same
    bounds as LMTP's: ``max_line`` octets a line, ``max_lines`` lines."""

    def __init__(
        self, inner: asyncio.Protocol | None, max_line: int, max_lines: int, owed: int = 1
    ) -> None:
        self._inner = inner
        self._max_line = max_line
        self._max_lines = max_lines
        self._buf = bytearray()
        self._code: int | None = None
        self._lines: list[str] = []
        self._wake = asyncio.Event()
        #: Complete replies not yet taken, in order.
        self.replies: deque[Reply] = deque()
        #: Why what the server sent is not SMTP (then nothing more is read).
        self.error: str | None = None
        #: The server closed the connection (or it was lost).
        self.lost = False
        #: Replies still owed: one per command line written, and one for the
        #: message. More is an error — a reply nobody asked for would be
        #: taken for the next command's (a stray ``250`` for the message's) —
        #: and a server that floods replies cannot make the client keep them.
        self.owed = owed

    @property
    def idle(self) -> bool:
        """Nothing received that was not taken, and no reply still owed: the
        conversation is in step."""
        return (
            not self._buf
            and not self.replies
            and self._code is None
            and self.error is None
            and self.owed == 0
        )

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        buf = self._buf
        buf += data
        while self.error is None:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > self._max_line:
                    self.error = "a reply line too long"
                break
            if nl >= self._max_line:
                self.error = "a reply line too long"
                break
            line = bytes(buf[:nl]).rstrip(b"\r")
            del buf[: nl + 1]
            self._line(line)
        self._wake.set()

    def _line(self, line: bytes) -> None:
        head, sep = line[:3], line[3:4]
        if not (head.isdigit() and sep in (b"", b" ", b"-")):
            self.error = "a reply that is not SMTP"
            return
        code = int(head)
        if self._code is None:
            if not 200 <= code <= 599:
                self.error = f"reply code {code}"
                return
            self._code = code
        elif code != self._code:
            self.error = "reply codes differ between lines"
            return
        if len(self._lines) >= self._max_lines:
            self.error = f"a reply of over {len(self._lines)} lines"
            return
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if sep != b"-":
            if self.owed <= 0:
                self.error = "more replies than commands"
                return
            self.owed -= 1
            self.replies.append(_reply(code, self._lines))
            self._code, self._lines = None, []

    def eof_received(self) -> bool:
        self.lost = True
        self._wake.set()
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake.set()
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def in_step(self, stage: Stage) -> None:
        """Raise :class:`_Broken` unless the conversation is in step: nothing
        received that no command asked for, and the connection open."""
        if self.error is not None:
            raise _Broken(stage, _garbled(stage, self.error))
        if self.lost and self.owed:
            raise _Broken(stage, _lost(stage))
        if not self.idle:
            why = "a reply no command asked for" if self.replies or self._buf else "a reply owed"
            raise _Broken(stage, _garbled(stage, why))
        if self.lost:
            raise _Broken(stage, _lost(stage))

    async def reply(self, stage: Stage, timeout: float) -> Reply:
        """The next reply, within ``timeout`` seconds; raises :class:`_Broken`
        when it does not come, or is not SMTP."""
        if self.replies:
            return self.replies.popleft()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.replies:
            if self.error is not None:
                raise _Broken(stage, _garbled(stage, self.error))
            if self.lost:
                raise _Broken(stage, _lost(stage))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                raise _Broken(stage, _timed_out(stage)) from None
        return self.replies.popleft()


class _FlowControl:
    """Lets the client wait until a protocol's transport has drained, with
    only the asyncio protocol callbacks (``pause_writing``/``resume_writing``
    /``connection_lost``) wrapped on the one protocol object."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        self.ready = asyncio.Event()
        self.ready.set()
        #: Set when the transport has closed (the socket is released).
        self.closed = asyncio.Event()
        pause, resume, lost = (
            protocol.pause_writing,
            protocol.resume_writing,
            (protocol.connection_lost),
        )

        def on_pause() -> None:
            self.ready.clear()
            pause()

        def on_resume() -> None:
            self.ready.set()
            resume()

        def on_lost(exc: Exception | None) -> None:
            self.ready.set()
            self.closed.set()
            lost(exc)

        protocol.pause_writing = on_pause  # type: ignore[method-assign]
        protocol.resume_writing = on_resume  # type: ignore[method-assign]
        protocol.connection_lost = on_lost  # type: ignore[method-assign]


class SMTPConnection(ClientConnection):
    """SMTP through aiosmtplib (see the module's description)."""

    protocol = "SMTP"

    def __init__(self, server: str, settings: ClientSettings) -> None:
        super().__init__(server, settings)
        self._smtp: aiosmtplib.SMTP | None = None
        self._flow: _FlowControl | None = None
        self._transport: asyncio.WriteTransport | None = None

    @property
    def usable(self) -> bool:
        """True while the connection can take another message (and the
        server has not closed it)."""
        smtp = self._smtp
        transport = smtp.transport if smtp is not None else None
        return (
            self._alive
            and transport is not None
            and not transport.is_closing()
            and (self._replies is None or self._in_step())
        )

    def _take_replies(self) -> None:
        """From here on (the session set up: greeting, EHLO, STARTTLS,
        AUTH), every reply is read by a :class:`_ReplyReader` put on
        aiosmtplib's transport in place of its protocol, to which it passes
        the connection events. aiosmtplib keeps a reply that came unasked
        in its buffer and gives it to the next command (a ``250`` that came
        with the ``354`` became the reply to the message), and takes the
        last line's code as a multiline reply's."""
        smtp = self._smtp
        transport = cast(asyncio.WriteTransport, smtp.transport) if smtp is not None else None
        inner = smtp.protocol if smtp is not None else None
        if transport is None or inner is None or transport.is_closing():
            raise _Broken(Stage.EHLO, _lost(Stage.EHLO))
        # (aiosmtplib's buffer: what came after the last reply it read.)
        if getattr(inner, "_buffer", b""):
            raise _Broken(Stage.EHLO, _garbled(Stage.EHLO, "a reply no command asked for"))
        settings = self.settings
        reader = _ReplyReader(inner, settings.max_reply_line, settings.max_reply_lines, owed=0)
        transport.set_protocol(reader)
        self._transport = transport
        self._replies = reader

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise _Broken(Stage.DATA, _lost(Stage.DATA))
        transport.write(data)

    async def _drain(self) -> None:
        flow = self._flow
        if flow is not None and not flow.ready.is_set():
            try:
                await asyncio.wait_for(
                    flow.ready.wait(), self._within(self.settings.data_block_timeout)
                )
            except asyncio.TimeoutError:
                raise _Broken(Stage.DATA, _timed_out(Stage.DATA)) from None

    async def _close_gracefully(self, timeout: float) -> None:
        # A TLS transport closes after the close_notify exchange, in later
        # turns of the loop: wait for it, so that the socket is not left
        # open (and leaked) if the loop ends next; abort if it takes too long.
        smtp, flow = self._smtp, self._flow
        if smtp is None or flow is None or smtp.transport is None:
            self._shutdown(abort=False)
            return
        transport = smtp.transport
        transport.close()
        try:
            await asyncio.wait_for(flow.closed.wait(), timeout)
        except asyncio.TimeoutError:
            transport.abort()  # type: ignore[attr-defined]
        self._shutdown(abort=False)

    def _note_tls(self) -> None:
        smtp = self._smtp
        transport = smtp.transport if smtp is not None else None
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        if tls is not None:
            self.tls_version = tls.version() or ""
            cipher = tls.cipher()
            self.tls_cipher = cipher[0] if cipher else ""

    async def _quit_refused(self, exc: _Broken) -> None:
        """End a healthy plaintext session the TLS policy refuses: ``QUIT``
        (RFC 5321 4.1.1.10; the server logs a client that quit, not a lost
        connection), its reply awaited at most :data:`QUIT_REFUSED_TIMEOUT`
        seconds, then close."""
        log.debug("%s %s: %s", self.protocol, self.server, exc.reply)
        self._alive = False
        timeout = min(self.settings.quit_timeout, QUIT_REFUSED_TIMEOUT)
        try:
            try:
                await self._execute(Stage.END, b"QUIT", self._within(timeout))
            except _Broken:
                pass
            await self._close_gracefully(timeout)
        except BaseException:
            # Cancelled meanwhile (a stop): the socket must not stay open.
            self._shutdown(abort=True)
            raise

    def _shutdown(self, abort: bool) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            if abort and smtp.transport is not None:
                smtp.transport.abort()  # type: ignore[attr-defined]
            smtp.close()

    async def _open(
        self, host: str | None, port: int, path: str | None, tls_name: str | None
    ) -> None:
        settings = self.settings
        sock = await _open_socket(host, port, path, settings)
        context: ssl.SSLContext | None = None
        if settings.implicit_tls:
            verify = settings.tls_policy == "verify"
            context = _verify_context(settings) if verify else _encrypt_only_context()
        smtp = aiosmtplib.SMTP(
            hostname=tls_name,
            local_hostname=settings.helo_name,
            timeout=settings.greeting_timeout,
            use_tls=settings.implicit_tls,
            start_tls=False,
            tls_context=context,
            sock=sock,
        )
        self._smtp = smtp
        try:
            response = await smtp.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise _Broken(Stage.GREETING, _reply(exc.code, exc.message.split("\n"))) from None
        except aiosmtplib.SMTPConnectTimeoutError:
            raise _Broken(Stage.GREETING, _timed_out(Stage.GREETING)) from None
        except aiosmtplib.SMTPConnectError as exc:
            cause = exc.__cause__
            if (
                isinstance(cause, ssl.SSLError)
                or settings.implicit_tls
                and not isinstance(cause, aiosmtplib.SMTPServerDisconnected)
            ):
                raise _Broken(
                    Stage.CONNECT,
                    _local(
                        451, "4.7.5", f"TLS handshake failed ({self.server}): {_why(cause or exc)}"
                    ),
                ) from None
            raise _Broken(Stage.GREETING, _lost(Stage.GREETING)) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _Broken(Stage.GREETING, _garbled(Stage.GREETING, exc.message)) from None
        except (ssl.SSLError, OSError) as exc:
            raise _Broken(
                Stage.CONNECT,
                _local(451, "4.7.5", f"TLS handshake failed ({self.server}): {_why(exc)}"),
            ) from None
        assert smtp.protocol is not None
        self._flow = _FlowControl(smtp.protocol)
        self.greeting = _reply(response.code, response.message.split("\n"))
        self._check_loop(self.greeting)
        if settings.implicit_tls:
            self.tls = True
            self.tls_verified = settings.tls_policy == "verify"
            self._note_tls()
        await self._hello()
        if not self.tls and settings.tls_policy != "none":
            await self._starttls(tls_name)
        if settings.username is not None:
            await self._auth()
        self._take_replies()

    def _check_loop(self, reply: Reply) -> None:
        names = self.settings.own_names
        first = reply.text.split("\n", 1)[0].split(" ", 1)[0].rstrip(".").lower()
        if names and first in {n.rstrip(".").lower() for n in names}:
            raise _Broken(
                Stage.GREETING,
                _local(451, "4.4.6", f"{self.server} is this server ({first}): mail loops back"),
            )

    async def _hello(self) -> None:
        """EHLO, and HELO if the server refuses EHLO with a 5xx."""
        smtp = self._smtp
        assert smtp is not None
        name = self.settings.helo_name.encode("ascii")
        timeout = self.settings.helo_timeout
        response = await self._execute(Stage.EHLO, b"EHLO " + name, timeout)
        reply = self._checked_reply(Stage.EHLO, response, (250,))
        if reply.code == 250:
            self._check_loop(reply)
            self.extensions = _parse_extensions(reply)
            # aiosmtplib's starttls() needs to know what EHLO said.
            smtp.last_ehlo_response = response
            return
        if reply.code < 500:
            raise _Broken(Stage.EHLO, reply)
        response = await self._execute(Stage.EHLO, b"HELO " + name, timeout)
        reply = self._checked_reply(Stage.EHLO, response, (250,))
        if reply.code != 250:
            raise _Broken(Stage.EHLO, reply)
        self._check_loop(reply)
        self.extensions = {}
        smtp.last_helo_response = response

    async def _starttls(self, tls_name: str | None) -> None:
        settings = self.settings
        policy = settings.tls_policy
        smtp = self._smtp
        assert smtp is not None
        if not self.supports("STARTTLS"):
            if policy == "opportunistic":
                return
            raise _PolicyRefused(
                Stage.STARTTLS,
                _local(451, "4.7.4", "TLS is required, but the server does not offer STARTTLS"),
            )
        verify = policy == "verify"
        context = _verify_context(settings) if verify else _encrypt_only_context()
        try:
            await smtp.starttls(
                server_hostname=tls_name, tls_context=context, timeout=settings.starttls_timeout
            )
        except aiosmtplib.SMTPResponseException as exc:
            reply = _reply(exc.code, exc.message.split("\n"))
            if exc.code == 421 or not 400 <= exc.code <= 599:
                raise _Broken(Stage.STARTTLS, reply) from None
            if policy == "opportunistic":
                # Still in plaintext (RFC 3207 4): go on without TLS.
                log.info("%s: STARTTLS refused (%s), going on without TLS", self.server, reply)
                return
            raise _PolicyRefused(Stage.STARTTLS, reply) from None
        # Anything else failed the attempt at TLS: the opportunistic policy
        # tries again in plaintext (see connect()).
        except aiosmtplib.SMTPTimeoutError:
            raise _HandshakeFailed(Stage.STARTTLS, _timed_out(Stage.STARTTLS)) from None
        except aiosmtplib.SMTPServerDisconnected:
            raise _HandshakeFailed(Stage.STARTTLS, _lost(Stage.STARTTLS)) from None
        except (ssl.SSLError, OSError, aiosmtplib.SMTPException) as exc:
            # The alert OpenSSL prepared (unknown_ca, bad_certificate) does
            # not reach the server: asyncio's SSL protocol force-closes the
            # transport without sending it (CPython gh-98078, fixed in later
            # Pythons); nothing here can still send it.
            raise _HandshakeFailed(
                Stage.STARTTLS,
                _local(451, "4.7.5", f"TLS handshake failed ({self.server}): {_why(exc)}"),
            ) from None
        self.tls = True
        self.tls_verified = verify
        self._note_tls()
        # RFC 3207 4.2: forget what the server said before TLS, ask again.
        self.extensions = {}
        await self._hello()

    async def _auth(self) -> None:
        settings = self.settings
        smtp = self._smtp
        assert smtp is not None and settings.username is not None
        assert settings.password is not None
        if not self.tls and not settings.auth_plaintext:
            raise _PolicyRefused(
                Stage.AUTH,
                _local(451, "4.7.0", "will not send credentials over a connection without TLS"),
            )
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            method = smtp.auth_plain
        elif "LOGIN" in mechanisms:
            method = smtp.auth_login
        else:
            raise _Broken(
                Stage.AUTH, _local(451, "4.7.0", "the server offers no AUTH PLAIN or LOGIN")
            )
        # One attempt, one mechanism: a second try with the same secret
        # would only count as a second failure at the server.
        try:
            await method(settings.username, settings.password, timeout=settings.auth_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            raise _Broken(Stage.AUTH, _reply(exc.code, exc.message.split("\n"))) from None
        except aiosmtplib.SMTPTimeoutError:
            raise _Broken(Stage.AUTH, _timed_out(Stage.AUTH)) from None
        except (aiosmtplib.SMTPServerDisconnected, OSError):
            raise _Broken(Stage.AUTH, _lost(Stage.AUTH)) from None
        self.authenticated = True

    async def _command(self, stage: Stage, line: bytes, timeout: float) -> Reply:
        if self._replies is not None:
            return await super()._command(stage, line, timeout)
        return self._parsed(stage, await self._execute(stage, line, timeout))

    async def _execute(self, stage: Stage, line: bytes, timeout: float) -> aiosmtplib.SMTPResponse:
        smtp = self._smtp
        if smtp is None:
            raise _Broken(stage, _lost(stage))
        try:
            return await smtp.execute_command(line, timeout=timeout)
        except aiosmtplib.SMTPTimeoutError:
            raise _Broken(stage, _timed_out(stage)) from None
        except aiosmtplib.SMTPServerDisconnected:
            raise _Broken(stage, _lost(stage)) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _Broken(stage, _garbled(stage, exc.message)) from None
        except OSError:
            raise _Broken(stage, _lost(stage)) from None

    def _checked_reply(
        self, stage: Stage, response: aiosmtplib.SMTPResponse, ok: tuple[int, ...]
    ) -> Reply:
        return _classified(stage, self._parsed(stage, response), ok)

    def _parsed(self, stage: Stage, response: aiosmtplib.SMTPResponse) -> Reply:
        lines = response.message.split("\n")
        if not 200 <= response.code <= 599:
            raise _Broken(stage, _garbled(stage, f"reply code {response.code}"))
        if len(lines) > self.settings.max_reply_lines:
            raise _Broken(stage, _garbled(stage, f"a reply of {len(lines)} lines"))
        return _reply(response.code, lines)


class _PolicyRefused(_Broken):
    """The TLS policy refuses to go on over a plaintext session that is
    still healthy (no STARTTLS offered, STARTTLS refused, credentials not to
    be sent in plaintext): ended with ``QUIT`` rather than dropped."""


class _HandshakeFailed(_Broken):
    """STARTTLS was tried and failed without a reply: handshake, timeout or
    lost connection (the connection is unusable)."""


# ------------------------------------------------------------------- LMTP
class LMTPConnection(ClientConnection):
    """LMTP (RFC 2033) on a Tornado IOStream: ``LHLO``, the envelope, the
    message, then one reply per accepted recipient. No STARTTLS or AUTH:
    LMTP is the last, local hop. What the server sends is read as it
    comes, into the connection's :class:`_ReplyReader` (one reply owed per
    command, per accepted recipient after the message)."""

    protocol = "LMTP"

    def __init__(self, server: str, settings: ClientSettings) -> None:
        super().__init__(server, settings)
        self._stream: IOStream | None = None
        self._pump: asyncio.Future[None] | None = None
        self._last_write: asyncio.Future[None] | None = None

    @property
    def usable(self) -> bool:
        stream = self._stream
        return self._alive and stream is not None and not stream.closed() and self._in_step()

    def _shutdown(self, abort: bool) -> None:
        # Tornado's close() drops what is still buffered either way.
        stream, self._stream = self._stream, None
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
        if stream is not None:
            stream.close()

    async def _open(self, host: str | None, port: int, path: str | None) -> None:
        sock = await _open_socket(host, port, path, self.settings)
        stream = self._stream = IOStream(sock)
        settings = self.settings
        # One reply owed: the greeting.
        reader = _ReplyReader(None, settings.max_reply_line, settings.max_reply_lines, owed=1)
        self._replies = reader
        self._pump = asyncio.ensure_future(_pump(stream, reader))
        self.greeting = await reader.reply(Stage.GREETING, settings.greeting_timeout)
        if self.greeting.code != 220:
            raise _Broken(Stage.GREETING, self.greeting)
        name = settings.helo_name.encode("ascii")
        reply = await self._checked(Stage.EHLO, b"LHLO " + name, settings.helo_timeout, (250,))
        if reply.code != 250:
            raise _Broken(Stage.EHLO, reply)
        self.extensions = _parse_extensions(reply)

    def _write(self, data: bytes) -> None:
        stream = self._stream
        if stream is None or stream.closed():
            raise _Broken(Stage.DATA, _lost(Stage.DATA))
        try:
            self._last_write = stream.write(data)
        except StreamClosedError:
            raise _Broken(Stage.DATA, _lost(Stage.DATA)) from None

    async def _drain(self) -> None:
        written, self._last_write = self._last_write, None
        if written is None:
            return
        try:
            await asyncio.wait_for(written, self._within(self.settings.data_block_timeout))
        except asyncio.TimeoutError:
            raise _Broken(Stage.DATA, _timed_out(Stage.DATA)) from None
        except (StreamClosedError, OSError):
            raise _Broken(Stage.DATA, _lost(Stage.DATA)) from None


async def _pump(stream: IOStream, reader: _ReplyReader) -> None:
    """Feed what ``stream`` receives to ``reader`` until it closes, or sends
    what is not SMTP (then nothing more is read)."""
    try:
        while reader.error is None:
            reader.data_received(await stream.read_bytes(65536, partial=True))
    except (StreamClosedError, OSError):
        pass
    finally:
        reader.connection_lost(None)


# -------------------------------------------------------------- entry points
def _default_port(protocol: str, settings: ClientSettings) -> int:
    if protocol == "lmtp":
        return 24
    return 465 if settings.implicit_tls else 25


async def connect(
    host: str | None = None,
    port: int | None = None,
    *,
    path: str | None = None,
    protocol: str = "smtp",
    settings: ClientSettings | None = None,
) -> ClientConnection:
    """Open a connection ready for :meth:`~ClientConnection.send`.

    :arg host: IP address or host name (a name is resolved by the system);
        or ``path`` for a Unix socket instead.
    :arg port: default 25 (465 with implicit TLS; 24 for LMTP).
    :arg protocol: ``"smtp"`` or ``"lmtp"``.

    SMTP: connect, greeting, ``EHLO`` (``HELO`` if EHLO is refused),
    STARTTLS as :attr:`ClientSettings.tls_policy` says (then ``EHLO``
    again), ``AUTH`` if credentials are set. Raises :class:`ClientError`
    when any of it fails; the connection is then closed.
    """
    settings = settings or ClientSettings()
    if (host is None) == (path is None):
        raise ValueError("give a host or a Unix socket path, not both or neither")
    if protocol == "lmtp":
        if settings.tls_policy in ("require", "verify") or settings.implicit_tls:
            raise ValueError("LMTP connections do not use TLS")
        if settings.username is not None:
            raise ValueError("LMTP connections do not authenticate")
        port = _default_port(protocol, settings) if port is None else port
        server = server_label(host, port, path)
        lmtp = LMTPConnection(server, settings)
        try:
            await lmtp._open(host, port, path)
        except _Broken as exc:
            lmtp._broken(exc)
            raise ClientError(exc.stage, exc.reply) from None
        except BaseException:
            lmtp.close()
            raise
        return lmtp
    if protocol != "smtp":
        raise ValueError(f"protocol must be 'smtp' or 'lmtp', not {protocol!r}")
    if port is None:
        port = _default_port(protocol, settings)
    server = server_label(host, port, path, settings.tls_name)
    tls_name = settings.tls_name or host
    if settings.tls_policy == "verify" and not tls_name:
        raise ValueError("the verify policy needs a tls_name")
    attempt = settings
    for _ in range(2):
        smtp = SMTPConnection(server, attempt)
        try:
            await smtp._open(host, port, path, tls_name)
        except _HandshakeFailed as exc:
            smtp._broken(exc)
            if attempt.tls_policy != "opportunistic":
                raise ClientError(exc.stage, exc.reply) from None
            # As Postfix's "may" level: plaintext beats no delivery.
            log.info("%s: %s; retrying without TLS", server, exc.reply)
            attempt = settings.replace(tls_policy="none")
            continue
        except _PolicyRefused as exc:
            await smtp._quit_refused(exc)
            raise ClientError(exc.stage, exc.reply) from None
        except _Broken as exc:
            smtp._broken(exc)
            await asyncio.sleep(0)  # the aborted transport closes its socket in the next turn
            raise ClientError(exc.stage, exc.reply) from None
        except BaseException:
            smtp.close()
            raise
        return smtp
    raise AssertionError("unreachable")  # pragma: no cover


async def deliver(
    host: str | None = None,
    port: int | None = None,
    *,
    sender: str,
    recipients: Sequence[str | Recipient],
    message: Message,
    path: str | None = None,
    protocol: str = "smtp",
    settings: ClientSettings | None = None,
    **options: Any,
) -> DeliveryResult:
    """Connect, send one message, quit: a result for every recipient, never
    a :class:`ClientError` (a connection that fails defers them all).

    ``options`` are :meth:`ClientConnection.send`'s keywords
    (``smtputf8``, ``eightbit``, ``ret``, ``envid``, ``binary``).
    """
    if port is None:
        port = _default_port(protocol, settings or ClientSettings())
    server = server_label(host, port, path, (settings or ClientSettings()).tls_name)
    try:
        conn = await connect(host, port, path=path, protocol=protocol, settings=settings)
    except ClientError as exc:
        return DeliveryResult.failed(recipients, exc, server)
    try:
        return await conn.send(sender, recipients, message, **options)
    except ClientError as exc:
        return DeliveryResult.failed(recipients, exc, conn.server)
    finally:
        await conn.quit()

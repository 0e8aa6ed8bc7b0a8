"""What a session and a transaction know: :class:`Session` and :class:`Envelope`.

A :class:`Session` lives as long as the connection; an :class:`Envelope` from
MAIL to the end of its message (or RSET). Handlers and plugins read them and
keep their own per-connection or per-transaction data in ``stash``; the core
updates them itself after each accepted command.
"""

from __future__ import annotations

import contextvars
import datetime
import email.policy
import io
import itertools
import os
import re
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.header import Header
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime
from typing import IO, Any

from tornado.log import gen_log

from .address import Address
from .client import CRLFLines
from .dsn import MailDSN, RecipientDSN, mail_dsn, recipient_dsn
from .errors import SMTPError
from .protocol import AddressError, SMTPProtocol, parse_address, parse_path
from .proxy import ProxyHeader
from .results import Results
from .settings import SMTPSettings, host_port

__all__ = [
    "Session",
    "Envelope",
    "Change",
    "HeaderSectionTooLarge",
    "MAX_HEADER_SECTION",
    "current_plugin",
    "log_escape",
    "current_session_id",
    "current_message_id",
    "new_session_id",
    "received_header",
    "safe_text",
    "with_keyword",
]

_counter = itertools.count(1)
# getpid() is a system call on current glibc, and ids are made twice per
# message: keep the pid, and refresh it in a forked worker. Fixed width (a
# Linux pid is at most 2**22), so that the pid and the counter after it
# cannot be read two ways: pid 0x100 with count 0x12 and pid 0x1001 with
# count 0x2 would otherwise give the same id.
_pid_hex = f"{os.getpid():06x}"


def _refresh_pid() -> None:
    global _pid_hex
    _pid_hex = f"{os.getpid():06x}"


os.register_at_fork(after_in_child=_refresh_pid)
#: MAIL parameters about the content, which a change of sender keeps.
_CONTENT_PARAMS = frozenset(("BODY", "SMTPUTF8"))
#: RFC 5322 2.2: printable ASCII except the colon.
_HEADER_NAME = re.compile(r"[!-9;-~]+")
#: The longest client header section the message-change methods will parse
#: (memory stays bounded for any message; RFC 5322 sets no limit).
MAX_HEADER_SECTION = 1 << 20
_WSP = (b" ", b"\t")
_WSP_OCTETS = (32, 9)


class HeaderSectionTooLarge(SMTPError):
    """The client's header section is longer than Bonzo parses
    (:data:`MAX_HEADER_SECTION`): raised by every :class:`Envelope` method
    that reads or edits the headers. Raised from a hook it refuses the
    message for good (``552 5.3.4``): a retry would fail the same way."""

    def __init__(self) -> None:
        super().__init__(
            552,
            "Message header section too large",
            "the header section is over %d octets (MAX_HEADER_SECTION), the most Bonzo parses",
            MAX_HEADER_SECTION,
            enhanced_code="5.3.4",
        )


#: The plugin whose hook is running (set by :mod:`bonzo.hooks` around each
#: call), so that changes to a message are recorded with their author.
current_plugin: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "bonzo_current_plugin", default=None
)


#: The id of the session (and of the message) whose work is running — set
#: by the session loop and the dispatcher — so that every log line can carry
#: them (``[logging] format = "json"``).
current_session_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "bonzo_session_id", default=None
)
#: The id of the message whose transaction is open (see :data:`current_session_id`).
current_message_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "bonzo_message_id", default=None
)


@dataclass(frozen=True)
class Change:
    """One change a plugin made to a message (:attr:`Envelope.changes`)."""

    plugin: str
    """Who made it (``"core"`` outside any hook)."""
    action: str
    """``add_header``, ``insert_header``, ``change_header``,
    ``delete_header``, ``remove_header``, ``replace_body``,
    ``change_sender``, ``add_recipient`` or ``remove_recipient``."""
    detail: str
    """What, in a few words (a header's name, an address; never a body)."""


#: Longest line of a header, in octets without the CRLF (RFC 5322 2.1.1).
MAX_HEADER_LINE = 998


def _field_name(line: bytes) -> bytes | None:
    """The name of the header field that ``line`` (a header line or block)
    starts, as written, or ``None`` for a line without a colon. White space
    before the colon is not part of it: RFC 5322 4.5.8's obsolete
    ``field-name *WSP ":"``, which section 4 says a parser must accept (and
    which mail readers and filters read as the field of that name)."""
    name, colon, _ = line.partition(b":")
    return name.strip(b" \t") if colon else None


def _field_key(block: bytes) -> bytes:
    """The lower-case name of the field ``block`` starts (``b""`` for none),
    as header names are compared."""
    return (_field_name(block) or b"").lower()


def _octets(text: str) -> bytes:
    """``text`` as UTF-8, with octets :meth:`Envelope.headers` escaped (an
    undecodable octet read as a lone surrogate) written back as they were."""
    return text.encode("utf-8", "surrogateescape")


def _format_header(name: str, value: str, utf8: bool = True) -> bytes:
    """``name: value`` as a header block ending in CRLF; :class:`ValueError`
    for a bad name, a line break that is not folding, or a line longer than
    :data:`MAX_HEADER_LINE` octets with no space to fold it at. Without
    ``utf8`` (a message not sent with SMTPUTF8), a value that is not ASCII
    is written as RFC 2047 encoded words, the only form such a message may
    carry it in -- unless it holds octets that are not UTF-8 (as
    :meth:`Envelope.headers` escapes them, say a client's raw Latin-1
    subject given back with a tag): their character set is unknown, so the
    value is written with those octets as they were."""
    if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"bad header name {name!r}")
    if not isinstance(value, str):
        raise ValueError(f"header {name}: the value must be a string")
    lines = value.replace("\r\n", "\n").split("\n")
    if any(not line or line[0] not in " \t" for line in lines[1:]):
        raise ValueError(f"header {name} has a line break that is not folding")
    if "\r" in value.replace("\r\n", "") or "\0" in value:
        raise ValueError(f"header {name} has a control character")
    if not utf8 and not value.isascii() and not _ESCAPED.search(value):
        # Unfolded (the line breaks dropped, the spaces after them kept).
        lines = Header("".join(lines), "utf-8", header_name=name).encode(linesep="\n").split("\n")
    lines[0] = f"{name}: {lines[0]}"
    out: list[str] = []
    for line in lines:
        out.extend(_fold(name, line))
    return _octets("\r\n".join(out) + "\r\n")


#: An octet that is not UTF-8, as ``surrogateescape`` decoding writes it.
_ESCAPED = re.compile("[\udc80-\udcff]")


def _field_pair(block: bytes) -> tuple[str, str]:
    """``(name, value)`` of a header block as :meth:`Envelope.headers`
    gives it."""
    name = _field_name(block) or b""
    text = block.partition(b":")[2].decode("utf-8", "surrogateescape")
    return name.decode("utf-8", "surrogateescape"), text.strip(" \t\r\n")


def _fold(name: str, line: str) -> list[str]:
    """``line`` cut before spaces or tabs into lines of at most
    :data:`MAX_HEADER_LINE` octets (folding, RFC 5322 2.2.3: unfolding gives
    the same value)."""
    out = []
    data = _octets(line)  # once per line: this runs for every trace header
    given = len(data)
    while len(data) > MAX_HEADER_LINE:
        # (A character cut in two at the end decodes to escapes, after any
        # space: the cut below falls before them.)
        head = data[: MAX_HEADER_LINE + 1].decode("utf-8", "surrogateescape")
        cut = max(head.rfind(" ", 1), head.rfind("\t", 1))
        if cut <= 0 or not line[:cut].strip():
            raise ValueError(
                f"header {name} has a line of {given} octets with no space to fold "
                f"it at (at most {MAX_HEADER_LINE})"
            )
        out.append(line[:cut])
        line = line[cut:]
        data = _octets(line)
    out.append(line)
    return out


def _mailbox(address: str, *, sender: bool) -> Address:
    """``address`` checked as the path of ``MAIL``/``RCPT`` would be."""
    if not isinstance(address, str) or "<" in address or ">" in address:
        raise ValueError(f"bad address {address!r}")
    try:
        mailbox, params = parse_path(f"<{address}>", sender=sender, smtputf8=True)
    except AddressError as exc:
        raise ValueError(f"bad address {address!r}: {exc}") from None
    if not sender and not mailbox.original:
        raise ValueError("a recipient cannot be the null address")
    return mailbox


def _printable(text: str) -> str:
    return text if text.isprintable() else ascii(text)[1:-1]


def new_session_id() -> str:
    """Return a short id, unique within this host and process run, for logs
    and the ``Received:`` header."""
    return f"{int(time.time()):x}{_pid_hex}{next(_counter):x}".upper()


class Session:
    """One client connection, as plugins see it.

    What the protocol knows (HELO name, ESMTP, TLS, the authenticated
    identity, messages accepted) is read from the session's protocol core
    (:class:`~bonzo.protocol.SMTPProtocol`), the single source of truth:
    these attributes are views and cannot be set. Tests that need a session
    in a given state build one with :func:`bonzo.testing.make_session`.

    .. attribute:: id

       Unique id of the session, used in logs and trace headers.

    .. attribute:: remote_ip

       The client's IP address (``"0.0.0.0"`` on a Unix socket). Behind a
       proxy that sends the PROXY protocol, or after ``XCLIENT`` from a
       trusted front-end, this is the address they name, not the
       connection's (:attr:`peer_ip`): every limit, plugin, log line and
       the ``Received:`` header use it (:doc:`/proxy`).

    .. attribute:: remote_port

       The client's port.

    .. attribute:: local_ip

       The server address the client connected to (behind a proxy, the
       proxy's address that the client connected to, if it says).

    .. attribute:: local_port

       The server port the client connected to.

    .. attribute:: peer_ip

       The IP address of the other end of the connection: the client's own,
       or the proxy's or front-end's when :attr:`remote_ip` came from them.

       .. versionadded:: 0.2

    .. attribute:: peer_port

       The port of the other end of the connection.

       .. versionadded:: 0.2

    .. attribute:: proxy

       The :class:`~bonzo.proxy.ProxyHeader` the connection started with on
       a listener with ``proxy_protocol`` (its ``tlvs`` hold what a version
       2 header added: the TLS facts of a connection the proxy decrypted,
       the server name asked for, the proxy's connection id), else ``None``.

       .. versionadded:: 0.2

    .. attribute:: xclient

       The attributes of the last accepted ``XCLIENT`` command, by name
       (``"NAME"``, ``"ADDR"``, ``"HELO"``, ...; ``None`` where the front-end
       said ``[UNAVAILABLE]``), else ``None``.

       .. versionadded:: 0.2

    .. attribute:: stash

       A dict where plugins keep per-connection data, by their own key
       (kept when ``XCLIENT`` names a new client); a key starting with ``_``
       is transient (see :ref:`plugin-state`).

    .. attribute:: results

       What filters found about the connection (the client's address, its
       HELO name): a :class:`~bonzo.results.Results`; a new, empty one when
       ``XCLIENT`` names a new client.

       .. versionadded:: 0.2

    .. attribute:: started

       When the client connected (:func:`time.time`).
    """

    __slots__ = (
        "id",
        "remote_ip",
        "remote_port",
        "local_ip",
        "local_port",
        "peer_ip",
        "peer_port",
        "proxy",
        "xclient",
        "stash",
        "results",
        "started",
        "_core",
    )

    def __init__(
        self,
        remote_ip: str,
        remote_port: int = 0,
        local_ip: str = "",
        local_port: int = 0,
        session_id: str | None = None,
        *,
        core: SMTPProtocol | None = None,
    ) -> None:
        self.id = session_id or new_session_id()
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.local_ip = local_ip
        self.local_port = local_port
        self.peer_ip = remote_ip
        self.peer_port = remote_port
        self.proxy: ProxyHeader | None = None
        self.xclient: dict[str, str | None] | None = None
        self.stash: dict[str, Any] = {}
        self.results = Results()
        self.started = time.time()
        self._core = core if core is not None else SMTPProtocol(_STANDALONE, remote_ip)

    @property
    def helo(self) -> str | None:
        """The HELO/EHLO name once accepted, else ``None``."""
        return self._core.helo

    @property
    def esmtp(self) -> bool:
        """True once the client has said EHLO."""
        return self._core.esmtp

    @property
    def tls(self) -> dict[str, Any] | None:
        """Facts about the TLS session (:func:`bonzo.tls.tls_facts`) when TLS
        is active, else ``None``."""
        core = self._core
        return core.tls_info if core.tls_active else None

    @property
    def auth(self) -> str | None:
        """The authenticated identity, or ``None``."""
        return self._core.authenticated

    @property
    def auth_mechanism(self) -> str | None:
        """The SASL mechanism the client authenticated with (``"PLAIN"``,
        ``"LOGIN"``), or ``None`` (not authenticated, or an identity given
        by a trusted front end through XCLIENT).

        .. versionadded:: 0.2
        """
        return self._core.auth_mechanism

    @property
    def messages(self) -> int:
        """Messages accepted on this connection so far."""
        return self._core.messages

    @property
    def protocol(self) -> str:
        """The session's ``with`` keyword for the ``Received:`` header
        (RFC 3848): ``SMTP``, ``ESMTP``, ``ESMTPS``, ``ESMTPA``, ``ESMTPSA``,
        or in an LMTP session ``LMTP``, ``LMTPS``, ``LMTPA``, ``LMTPSA``.
        A message sent with ``SMTPUTF8`` uses :func:`with_keyword`."""
        core = self._core
        if core.name == "LMTP":
            return _suffixed("LMTP", core)
        if not core.esmtp:
            return "SMTP"
        return _suffixed("ESMTP", core)

    @property
    def lmtp(self) -> bool:
        """True in an LMTP session (a listener with ``protocol = "lmtp"``)."""
        return self._core.name == "LMTP"

    def __repr__(self) -> str:
        where = host_port(self.remote_ip, self.remote_port)
        return f"<Session {self.id} {where} helo={self.helo!r}>"


def _suffixed(base: str, core: SMTPProtocol) -> str:
    if core.tls_active:
        base += "S"
    if core.authenticated is not None:
        base += "A"
    return base


def with_keyword(session: Session, envelope: Envelope) -> str:
    """The ``with`` keyword of a message's ``Received:`` header: the
    session's :attr:`~Session.protocol`, or for a message sent with the
    ``SMTPUTF8`` parameter ``UTF8SMTP``, ``UTF8SMTPS``, ``UTF8SMTPA`` or
    ``UTF8SMTPSA`` (``UTF8LMTP``... in an LMTP session; RFC 6531 4.3)."""
    if "SMTPUTF8" in envelope.mail_params:
        core = session._core
        return _suffixed("UTF8LMTP" if core.name == "LMTP" else "UTF8SMTP", core)
    return session.protocol


#: Settings of the protocol core behind a :class:`Session` built on its own
#: (in a test): only the default limits matter there.
_STANDALONE = SMTPSettings(hostname="localhost")


#: What one chunk of message content held in memory costs beyond its octets
#: (a bytes object's header and its slot in the list, rounded up), counted
#: against ``spool_threshold``.
CHUNK_COST = 64


class _Spool:
    """Message content: a list of chunks in memory, rolled over to an
    unlinked temporary file once it passes ``threshold`` octets.

    Lighter than :class:`tempfile.SpooledTemporaryFile` for the many small
    messages (no buffer object, no copy per write); just as bounded.
    """

    __slots__ = ("_chunks", "_file", "size", "_held", "_threshold", "_dir")

    def __init__(self, threshold: int, directory: str | None) -> None:
        self._chunks: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0
        #: The memory the chunks take, each counted with its object's cost.
        self._held = 0
        self._threshold = threshold
        self._dir = directory

    def write(self, data: bytes) -> int:
        if not data:
            return 0
        if self._file is not None:
            self._file.write(data)
        else:
            self._chunks.append(data)
            # Each chunk costs its object too: a message sent as BDAT chunks
            # of an octet or two would otherwise hold some 40 times its
            # size in memory below the threshold.
            self._held += len(data) + CHUNK_COST
            if self._held > self._threshold:
                self._roll()
        self.size += len(data)
        return len(data)

    def writelines(self, lines: list[bytes]) -> None:
        for line in lines:
            self.write(line)

    def _roll(self) -> None:
        # Unlinked at once (Linux): nothing is left behind, whatever happens.
        spool = tempfile.TemporaryFile(dir=self._dir)
        try:
            spool.writelines(self._chunks)
        except BaseException:
            spool.close()
            raise
        self._file = spool
        self._chunks = []
        self._held = 0

    @property
    def rolled(self) -> bool:
        return self._file is not None

    def read_all(self) -> bytes:
        if self._file is not None:
            self._file.seek(0)
            return self._file.read()
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def open(self) -> IO[bytes]:
        if self._file is not None:
            self._file.seek(0)
            return self._file
        return io.BytesIO(self.read_all())

    def close(self) -> None:
        """Drop the content; never raises. Closing the file flushes what its
        buffer holds, which fails again after a write failed for a full disk;
        the content is being thrown away, so that second failure is not news."""
        file, self._file = self._file, None
        self._chunks = []
        if file is not None:
            try:
                file.close()
            except OSError:
                pass


class Envelope:
    """One mail transaction: sender, recipients and, after DATA, the message.

    The message content is kept in memory up to a threshold and spooled to an
    unlinked temporary file past it, so memory stays bounded for any size.
    Headers added with :meth:`add_header` (the ``Received:`` trace header
    first) are kept apart and put in front of the content when it is read.

    Bonzo builds one per ``MAIL``. A test (or an application calling a
    plugin's hooks itself) builds one as ``Envelope(sender,
    rcpt_tos=[...])``: each recipient is checked
    (:func:`~bonzo.protocol.parse_address`) and added with
    :meth:`add_recipient`; more are added the same way (appending to
    :attr:`rcpt_tos` alone leaves :attr:`recipients` without them).
    """

    # Set only once the header section is parsed (class default: nothing
    # per message for the many that nobody parses): whether the section is
    # over MAX_HEADER_SECTION.
    _oversized = False

    def __init__(
        self,
        mail_from: str,
        mail_params: Mapping[str, str | None] | None = None,
        *,
        spool_threshold: int = 262144,
        spool_dir: str | None = None,
        sender: Address | None = None,
        dsn: MailDSN | None = None,
        rcpt_tos: Iterable[str] = (),
        receiving: bool = False,
    ) -> None:
        # A session's envelope (receiving): the content is still to come, and
        # header edits and a new body asked for before it wait for it
        # (end_content) rather than apply to an empty message.
        self._content_pending = receiving
        #: The reverse-path (``""`` for the null sender), as the client sent it.
        self.mail_from = mail_from
        #: The sender as an :class:`~bonzo.address.Address` (canonical form
        #: beside the original).
        self.sender: Address = sender if sender is not None else Address.parse(mail_from)
        #: The accepted recipients as :class:`~bonzo.address.Address` objects,
        #: in the order of :attr:`rcpt_tos`.
        self.recipients: list[Address] = []
        #: MAIL parameters (keywords upper-cased).
        self.mail_params: dict[str, str | None] = dict(mail_params or {})
        #: Accepted recipients, in order.
        self.rcpt_tos: list[str] = []
        #: RCPT parameters, one dict per accepted recipient.
        self.rcpt_params: list[dict[str, str | None]] = []
        #: The DSN parameters of MAIL (RFC 3461), checked and decoded: an
        #: empty :class:`~bonzo.dsn.MailDSN` when the client gave none.
        self.dsn: MailDSN = dsn if dsn is not None else mail_dsn(self.mail_params)
        #: The DSN parameters of each accepted recipient, in the order of
        #: :attr:`rcpt_tos` (an empty :class:`~bonzo.dsn.RecipientDSN` for a
        #: recipient without them).
        self.rcpt_dsn: list[RecipientDSN] = []
        #: True when the content came in ``BDAT`` chunks (RFC 3030) rather
        #: than after ``DATA``; ``mail_params["BODY"]`` says whether it is
        #: ``BINARYMIME`` (binary, kept octet for octet).
        self.chunked = False
        #: Per-transaction data for plugins.
        self.stash: dict[str, Any] = {}
        #: What filters found about this message (:class:`~bonzo.results.Results`).
        self.results = Results()
        #: The plugin that discarded the message (a :class:`~bonzo.hookspecs.Discard`
        #: verdict), else ``None``.
        self.discarded: str | None = None
        #: Why the message was quarantined (a :class:`~bonzo.hookspecs.Quarantine`
        #: verdict), else ``None``; :attr:`quarantined_by` names the plugin.
        self.quarantined: str | None = None
        self.quarantined_by: str | None = None
        #: The plugin whose :func:`~bonzo.hookspecs.bonzo_deliver` (or
        #: ``bonzo_quarantine``) verdict accepted the message, once accepted
        #: (for the ``bonzo_accepted`` observers); else ``None``.
        self.delivered_by: str | None = None
        #: Id of the message, for logs and replies.
        self.id = new_session_id()
        self._headers: list[bytes] = []
        #: The block add_trace put on top (found again by identity).
        self._trace: bytes | None = None
        self._spool: _Spool | None = None
        self._spool_threshold = spool_threshold
        self._spool_dir = spool_dir
        self._size = 0
        self._message: EmailMessage | None = None
        #: Recipients the message was refused (or deferred) for, by their
        #: index in :attr:`recipients`; see :meth:`refuse_recipient`.
        self.refused: dict[int, SMTPError] = {}
        #: Who refused each of :attr:`refused`: the plugin that called
        #: :meth:`refuse_recipient`, or ``"core"``.
        self.refused_by: dict[int, str] = {}
        #: Indexes in :attr:`recipients` a plugin removed
        #: (:meth:`remove_recipient`): not delivered, reported to the client
        #: as accepted.
        self.removed: set[int] = set()
        #: Indexes in :attr:`recipients` a plugin added
        #: (:meth:`add_recipient_address`): delivered, never answered for.
        self.added: set[int] = set()
        #: The changes plugins made, in order (:class:`Change`).
        self.changes: list[Change] = []
        # Header edits and a new body, applied together on the next read.
        self._edits: list[tuple[str, Any, Any, bytes | None]] = []
        # The client's header blocks as received, kept when a change to
        # them is first applied (see received_headers()).
        self._received: list[bytes] | None = None
        self._new_body: _Spool | None = None
        for rcpt in rcpt_tos:
            self.add_recipient(parse_address(rcpt), {})

    def refuse_recipient(self, recipient: Address | int, error: SMTPError) -> None:
        """Refuse (``5xx``) or defer (``4xx``) the message for one recipient
        — ``recipient`` is one of :attr:`recipients`, or its index there —
        while it is delivered to the others. For a filter in
        ``bonzo_message`` (one user's policy) or a delivery plugin in
        ``bonzo_deliver`` (one mailbox over quota).

        An LMTP client gets each recipient's own reply after the message. An
        SMTP client gets one reply for the message: see
        :ref:`per-recipient results <per-recipient>` for how it is chosen.
        Refusing the same recipient again keeps the first error. Raises
        :class:`ValueError` for a recipient that is not in :attr:`recipients`
        and :class:`TypeError` unless ``error`` is an ``SMTPError`` with a
        ``4xx``/``5xx`` code.
        """
        if not isinstance(error, SMTPError) or not 400 <= error.status_code <= 599:
            raise TypeError(f"refuse_recipient() needs a 4xx/5xx SMTPError, not {error!r}")
        if isinstance(recipient, int) and not isinstance(recipient, bool):
            if not 0 <= recipient < len(self.recipients):
                raise ValueError(f"no recipient number {recipient}")
            indexes = [recipient]
        else:
            # Identity first: the same address given twice is two recipients,
            # and the plugin names the one it iterated over.
            indexes = [i for i, r in enumerate(self.recipients) if r is recipient]
            if not indexes:
                indexes = [i for i, r in enumerate(self.recipients) if r == recipient]
            if not indexes:
                raise ValueError(f"{recipient!r} is not a recipient of message {self.id}")
        by = current_plugin.get() or "core"
        for i in indexes:
            if i not in self.refused:
                self.refused[i] = error
                self.refused_by[i] = by

    @property
    def remaining_recipients(self) -> list[Address]:
        """The recipients the message is still to be delivered to: all of
        :attr:`recipients` but those refused with :meth:`refuse_recipient`
        or removed with :meth:`remove_recipient`. A delivery plugin
        delivers to these."""
        if not self.refused and not self.removed:
            return list(self.recipients)
        return [self.recipients[i] for i in self.remaining_indexes]

    @property
    def remaining_indexes(self) -> list[int]:
        """The indexes in :attr:`recipients` (and :attr:`rcpt_params`,
        :attr:`rcpt_dsn`) of :attr:`remaining_recipients`."""
        skip = self.refused.keys() | self.removed
        return [i for i in range(len(self.recipients)) if i not in skip]

    def add_recipient(
        self,
        mailbox: Address,
        params: Mapping[str, str | None],
        dsn: RecipientDSN | None = None,
    ) -> None:
        """Record an accepted recipient (Bonzo does this after RCPT). ``dsn``
        defaults to the DSN parameters read from ``params``
        (:func:`bonzo.dsn.recipient_dsn`, which raises
        :exc:`~bonzo.dsn.DSNError` for bad ones)."""
        if dsn is None:
            dsn = recipient_dsn(params, smtputf8="SMTPUTF8" in self.mail_params)
        self.rcpt_tos.append(mailbox.original)
        self.rcpt_params.append(dict(params))
        self.recipients.append(mailbox)
        self.rcpt_dsn.append(dsn)

    # ------------------------------------------------------------- changes
    def _record(self, action: str, detail: str) -> None:
        plugin = current_plugin.get()
        if plugin is None:
            return  # Bonzo's own doing (the trace header), not a plugin's change
        change = Change(plugin, action, detail)
        self.changes.append(change)
        gen_log.info("message %s: %s %s: %s", self.id, plugin, action, _printable(detail))

    def add_recipient_address(
        self, address: str, params: Mapping[str, str | None] | None = None
    ) -> Address:
        """Add a recipient the client did not give (a milter's ``ADDRCPT``,
        an archive copy): it is delivered with the others; no reply is owed
        for it, and it is nobody the client sent the message to: if every
        recipient the client gave is refused, the message is refused and
        not delivered to this one either (:ref:`per-recipient results
        <per-recipient>`). Returns its :class:`~bonzo.address.Address`; raises
        :class:`ValueError` for a malformed address or DSN parameter."""
        mailbox = _mailbox(address, sender=False)
        try:
            self.add_recipient(mailbox, params or {})
        except Exception as exc:  # DSNError: a bad NOTIFY/ORCPT
            raise ValueError(f"bad recipient parameters for <{address}>: {exc}") from None
        self.added.add(len(self.recipients) - 1)
        self._record("add_recipient", f"<{mailbox.original}>")
        return mailbox

    def remove_recipient(self, address: str | Address) -> int:
        """Deliver nothing to ``address`` (compared in canonical form); the
        client is still told it was accepted. Returns how many recipients
        matched (0 when none did: not an error, as milters expect)."""
        wanted = address if isinstance(address, Address) else Address.parse(address)
        count = 0
        for i, r in enumerate(self.recipients):
            if r.canonical == wanted.canonical and i not in self.removed:
                self.removed.add(i)
                count += 1
        if count:
            self._record("remove_recipient", f"<{wanted.original}>")
        return count

    def change_sender(self, address: str, params: Mapping[str, str | None] | None = None) -> None:
        """Make ``address`` (``""``: the null sender) the reverse-path the
        message is delivered with; ``params``, when given, replace the
        ``MAIL`` parameters that concern the sender (``RET``, ``ENVID``,
        ``AUTH``, ...). ``BODY`` and ``SMTPUTF8`` describe the content, not
        the sender: they stay as the client gave them, whatever ``params``
        say (a message with UTF-8 headers must keep ``SMTPUTF8`` on its way
        on).

        :raises ValueError: a malformed address or ``RET``/``ENVID``; the
            envelope is left as it was."""
        mailbox = _mailbox(address, sender=True)
        if params is not None:
            kept = {k: v for k, v in self.mail_params.items() if k in _CONTENT_PARAMS}
            new = {k.upper(): v for k, v in params.items() if k.upper() not in _CONTENT_PARAMS}
            new.update(kept)
            dsn = mail_dsn(new)  # before any change: a refusal leaves all as it was
            self.mail_params = new
            self.dsn = dsn
        self.sender = mailbox
        self.mail_from = mailbox.original
        self._record("change_sender", f"<{mailbox.original}>")

    def insert_header(self, index: int, name: str, value: str) -> None:
        """Insert ``name: value`` at position ``index`` of the header section
        (0: the very top, above the trace header once there is one -- before
        ``DATA`` is accepted, the trace header Bonzo adds then goes above
        it; a position past the end: after the last header)."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"bad header position {index!r}")
        raw = _format_header(name, value, "SMTPUTF8" in self.mail_params)
        self._edits.append(("insert", index, None, raw))
        self._message = None  # the parsed message is read again, with the edit
        self._record("insert_header", f"{name} at {index}")

    def change_header(self, name: str, value: str | None, occurrence: int = 1) -> None:
        """Replace the value of the ``occurrence``-th ``name`` header
        (counted from 1, case-insensitive, in the whole header section); a
        ``value`` of ``None`` deletes it. If there are fewer, a value is
        added after the last header (as milters' ``CHGHEADER``)."""
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"bad header name {name!r}")
        if isinstance(occurrence, bool) or not isinstance(occurrence, int) or occurrence < 1:
            raise ValueError(f"bad header occurrence {occurrence!r}")
        raw = None if value is None else _format_header(name, value, "SMTPUTF8" in self.mail_params)
        self._edits.append(("change", name.lower().encode("ascii"), occurrence, raw))
        self._message = None
        self._record("change_header" if value is not None else "delete_header", name)

    def delete_header(self, name: str, occurrence: int = 1) -> None:
        """Delete the ``occurrence``-th ``name`` header (see :meth:`change_header`)."""
        self.change_header(name, None, occurrence)

    def replace_body(self, data: bytes | IO[bytes]) -> None:
        """Make ``data`` (bytes, or a binary file read to its end in chunks)
        the body: everything after the header section. The body is stored as
        it will be delivered: bare LF and bare CR become CRLF, and a last
        line without a line end gets CRLF (what :mod:`bonzo.client` sends, and
        what a later filter, a DKIM signer, must see), except in a
        ``BODY=BINARYMIME`` message, whose content is kept octet for octet.
        Raises :class:`ValueError` for anything else (a ``str``, a file opened
        in text mode)."""
        binary = isinstance(data, (bytes, bytearray, memoryview))
        if not binary and not callable(getattr(data, "read", None)):
            raise ValueError(
                f"replace_body() takes bytes or a binary file, not {type(data).__name__}"
            )
        lines = None
        if (self.mail_params.get("BODY") or "").upper() != "BINARYMIME":
            lines = CRLFLines()
        new = _Spool(self._spool_threshold, self._spool_dir)
        try:
            if binary:
                # In pieces, as a file is read: what a piece becomes is
                # bounded (at most twice its size), whatever the body's.
                view = memoryview(data).cast("B")  # type: ignore[arg-type]
                for start in range(0, len(view), 1 << 20):
                    chunk = bytes(view[start : start + (1 << 20)])
                    new.write(lines.feed(chunk) if lines is not None else chunk)
            else:
                while chunk := data.read(1 << 20):  # type: ignore[union-attr]
                    if not isinstance(chunk, (bytes, bytearray)):
                        raise ValueError(
                            "replace_body() takes a binary file; this one gave "
                            f"{type(chunk).__name__} (open it in 'rb' mode)"
                        )
                    chunk = bytes(chunk)
                    new.write(lines.feed(chunk) if lines is not None else chunk)
            if lines is not None:
                new.write(lines.finish())
        except BaseException:
            new.close()
            raise
        if self._new_body is not None:
            self._new_body.close()
        self._new_body = new
        self._edits.append(("body", None, None, None))
        self._message = None
        self._record("replace_body", f"{new.size} octets")

    def headers(self) -> list[tuple[str, str]]:
        """The header section as it will be delivered (added headers, then
        the client's, with every change applied): ``(name, value)`` pairs in
        order, the value without the leading space and final line break,
        folded lines kept (``"\\r\\n\\t..."``), decoded as UTF-8 (undecodable
        octets escaped). The client's section ends at its first line that
        is not a header field; if that line is not the blank line, a blank
        line is inserted before it, so that every reader of the message ends
        the section there too. Raises
        :class:`HeaderSectionTooLarge` for a client header section over
        :data:`MAX_HEADER_SECTION`."""
        self._apply_changes()
        blocks = list(self._headers)
        if self._spool is not None:
            blocks += self._client_header_section()[0]
        return [_field_pair(block) for block in blocks]

    def received_headers(self) -> list[tuple[str, str]]:
        """The client's header fields as they arrived, before any plugin's
        change, read as :meth:`headers` reads them (without the fields
        Bonzo or a plugin added). For a plugin that must tell the fields
        that came with the message from those a plugin (a milter) of this
        server added or changed: ``authres`` removes only forged
        ``Authentication-Results:`` fields that came with the message.
        Raises :class:`HeaderSectionTooLarge` as :meth:`headers` does."""
        self._apply_changes()
        if self._received is None:
            # Nothing changed the client's part yet: it is as received.
            if self._spool is None:
                return []
            return [_field_pair(block) for block in self._client_header_section()[0]]
        return [_field_pair(block) for block in self._received]

    def client_header_section(self) -> tuple[bytes, int]:
        """The client's header section as :meth:`headers` reads it -- its
        fields with their folded lines, without the blank line that ends
        it -- and the offset in :meth:`open_body`'s content at which the
        body starts. For readers of the raw octets (a DKIM verifier or
        signer): reading the section this way, not to the first blank line,
        they see the fields every other filter and the delivered message
        see. Raises :class:`HeaderSectionTooLarge` as :meth:`headers`
        does."""
        self._apply_changes()
        if self._spool is None:
            return b"", 0
        blocks, _blank, start = self._client_header_section()
        return b"".join(blocks), start

    def _client_header_section(self) -> tuple[list[bytes], bytes, int]:
        """The client's header blocks (each with its folded lines), the blank
        line after them (``b""`` if none), and where the body starts. Only
        the last block can lack a line ending: a message sent with ``BDAT``
        may end inside its last header line.

        The section ends at the first line that is not a header field (a
        folded line with no field before it is none either). If that line
        is not the blank line, one is inserted before it, as Postfix's
        cleanup does, so that every reader (an IMAP server, Sieve, a DKIM
        verifier) splits the message where Bonzo's methods did. Raises
        :class:`HeaderSectionTooLarge` past :data:`MAX_HEADER_SECTION`."""
        assert self._spool is not None
        if self._oversized:
            raise HeaderSectionTooLarge()
        src = self._spool.open()
        src.seek(0)
        blocks: list[bytes] = []
        total = 0
        while True:
            line = src.readline(65536)
            # A longer line is read whole (up to the limit), so that a piece
            # of it is never taken for a block of its own.
            while line and line[-1:] != b"\n" and total + len(line) <= MAX_HEADER_SECTION:
                more = src.readline(65536)
                if not more:
                    break
                line += more
            total += len(line)
            if total > MAX_HEADER_SECTION:
                # Every later read fails the same way, without reading again;
                # and the message is refused for every recipient, so that a
                # caller that catches the error cannot let it through with
                # its headers unread.
                self._oversized = True
                error = HeaderSectionTooLarge()
                for i in range(len(self.recipients)):
                    self.refuse_recipient(i, error)
                raise error
            if not line:
                return blocks, b"", total
            if line in (b"\r\n", b"\n"):
                return blocks, line, total
            if line[:1] in _WSP:
                if blocks:
                    blocks[-1] += line
                    continue
            elif b":" in line:
                blocks.append(line)
                continue
            # Not a header: the body starts here, and no blank line was sent.
            # Readers that read on to the blank line (an IMAP server, Sieve)
            # or refuse a section without one (a DKIM verifier) would split
            # the message elsewhere than Bonzo's methods and its signer did:
            # the blank line goes in, as Postfix's cleanup puts it.
            start = total - len(line)
            self._insert_blank_line(start)
            return blocks, b"\r\n", start + 2

    def _section_to_change(self) -> tuple[list[bytes], bytes, int]:
        """:meth:`_client_header_section`, about to be changed: the blocks
        as received are kept first (:meth:`received_headers`)."""
        section = self._client_header_section()
        if self._received is None:
            self._received = list(section[0])
        return section

    def _insert_blank_line(self, at: int) -> None:
        """Make the content's octet ``at`` the start of the body, after a
        blank line (see :meth:`_client_header_section`)."""
        assert self._spool is not None
        src = self._spool.open()
        src.seek(0)
        self._rewrite([src.read(at), b"\r\n"], at)  # (at is within the header section)
        gen_log.info(
            "message %s: the header section ends at a line that is not a header field "
            "and no blank line: a blank line was inserted before that line",
            self.id,
        )

    def _rewrite(self, head: list[bytes], start: int) -> None:
        """Replace the content by ``head`` followed by the content from octet
        ``start`` on, copied in chunks (a spooled message of any size)."""
        assert self._spool is not None
        new = _Spool(self._spool_threshold, self._spool_dir)
        try:
            new.writelines(head)
            src = self._spool.open()
            src.seek(start)
            shutil.copyfileobj(src, new, 1 << 20)
        except BaseException:
            new.close()
            raise
        self._spool.close()
        self._spool = new
        self._size = new.size
        self._message = None

    def end_content(self) -> None:
        """The content is complete (the session calls this at the end of the
        message, before ``bonzo_message``): the header edits and new body
        plugins asked for before it apply from now on. An envelope made
        without ``receiving=True`` never waits."""
        self._content_pending = False

    def _apply_changes(self) -> None:
        """Apply the pending header edits and the new body in one pass: the
        spool is rewritten only if the client's part changed. Nothing while
        the content is still to come (:meth:`end_content`)."""
        if self._content_pending:
            return
        edits, self._edits = self._edits, []
        if not edits:
            return
        new_body, self._new_body = self._new_body, None
        items: list[tuple[bool, bytes]] = [(False, b) for b in self._headers]
        client: list[bytes] = []
        blank, start = b"", 0
        if self._spool is not None:
            client, blank, start = self._section_to_change()
            items += [(True, b) for b in client]
        for kind, key, occurrence, raw in edits:
            if kind == "remove":  # every one (remove_header before the content)
                items = [item for item in items if _field_key(item[1]) != key]
            elif kind == "insert":
                position = min(key, len(items))
                # Below a client's header it joins the client's section; else
                # it is one of the added headers.
                in_client = position > 0 and items[position - 1][0]
                assert raw is not None
                items.insert(position, (in_client, raw))
            elif kind == "change":
                seen = 0
                for i, (origin, block) in enumerate(items):
                    if _field_key(block) == key:
                        seen += 1
                        if seen == occurrence:
                            if raw is None:
                                del items[i]
                            else:
                                # The header keeps its own spelling of the name.
                                name = block.split(b":", 1)[0]
                                items[i] = (origin, name + b":" + raw.split(b":", 1)[1])
                            break
                else:
                    if raw is not None:
                        items.append((bool(items) and items[-1][0], raw))
        # The client's last field may lack its CRLF (BDAT): whatever now
        # follows it -- a field, or the blank line before a new body --
        # starts a line of its own (RFC 5322 2.2), never glued to its value.
        for i, (origin, block) in enumerate(items):
            if origin and block[-1:] != b"\n" and (i + 1 < len(items) or new_body is not None):
                items[i] = (origin, block + b"\r\n")
        added = []
        i = 0
        while i < len(items) and not items[i][0]:
            added.append(items[i][1])
            i += 1
        client_after = [block for _, block in items[i:]]
        self._headers = added
        self._message = None
        if new_body is None:
            if client_after != client:
                # (Only a client part changes: there is content.)
                self._rewrite([*client_after, blank], start)
            return
        out = _Spool(self._spool_threshold, self._spool_dir)
        try:
            out.writelines(client_after)
            out.write(blank or b"\r\n")
            shutil.copyfileobj(new_body.open(), out, 1 << 20)
        except BaseException:
            out.close()
            raise
        finally:
            new_body.close()
        if self._spool is not None:
            self._spool.close()
        self._spool = out
        self._size = out.size

    # ----------------------------------------------------------- content in
    def write(self, data: bytes) -> None:
        """Append message content (already unstuffed, CRLF line ends).

        Content whose first line starts with white space gets a blank line
        in front: that line would otherwise fold into the header above it
        (the trace header), so the content is all body."""
        if self._spool is None:
            if not data:
                return  # the first octet decides, below
            self._spool = _Spool(self._spool_threshold, self._spool_dir)
            if data[0] in _WSP_OCTETS:
                self._spool.write(b"\r\n")
                self._size = 2
        self._spool.write(data)
        self._size += len(data)

    def add_header(self, name: str, value: str) -> None:
        """Put ``name: value`` in front of the message (after earlier ones).

        Raises :class:`ValueError` for a bad name, a value with a line break
        not followed by whitespace (which would start a new header), or a
        line longer than 998 octets with no space to fold it at (a longer
        one is folded). A value that is not ASCII is written as RFC 2047
        encoded words unless the message came with ``SMTPUTF8``.
        """
        raw = _format_header(name, value, "SMTPUTF8" in self.mail_params)
        if self._edits:
            # After the pending edits, at the end of the added headers.
            self._apply_changes()
        self.prepend_raw(raw)
        self._record("add_header", name)

    def prepend_raw(self, header: str | bytes) -> None:
        """Add an already formatted header block (ending in CRLF), after the
        trace header and the headers added before it."""
        raw = header.encode("utf-8") if isinstance(header, str) else header
        self._headers.append(raw)
        self._message = None

    def add_trace(self, header: str | bytes) -> None:
        """Put an already formatted trace header block (``Received:``,
        ending in CRLF) at the very top of the message, above the headers
        plugins added before it (RFC 5321 4.4: a relay adds its trace in
        front of what it received). Bonzo adds its own when DATA or the
        first BDAT is accepted."""
        raw = header.encode("utf-8") if isinstance(header, str) else header
        # Pending edits stay pending (before the content they are meant for
        # the client's header, which is not here yet); the positions of
        # pending inserts count from the top, which moves down by one.
        if self._edits:
            self._edits = [
                (kind, key + 1, occurrence, block)
                if kind == "insert"
                else (kind, key, occurrence, block)
                for kind, key, occurrence, block in self._edits
            ]
        self._headers.insert(0, raw)
        self._trace = raw
        self._message = None

    def trace_index(self) -> int | None:
        """The position in :meth:`headers` of the trace header :meth:`add_trace`
        put on top last (Bonzo's own ``Received:``), or ``None``: not added
        yet, or a plugin changed or deleted it. A milter counts
        ``Received:`` fields from the one after it, as for Sendmail and
        Postfix."""
        self._apply_changes()
        for i, block in enumerate(self._headers):
            if block is self._trace:
                return i
        return None

    # ---------------------------------------------------------- content out
    @property
    def size(self) -> int:
        """Size of the content received from the client (with any changes
        plugins made to it), in octets."""
        self._apply_changes()
        return self._size

    @property
    def spooled(self) -> bool:
        """True if the content went to a temporary file."""
        return self._spool is not None and self._spool.rolled

    @property
    def header_bytes(self) -> bytes:
        """The headers added by the server and plugins, trace header first."""
        self._apply_changes()
        return b"".join(self._headers)

    @property
    def body(self) -> bytes:
        """The client's content (unstuffed), without the added headers, as
        earlier plugins left it: their changes to its header fields
        (:meth:`change_header`, :meth:`remove_header`, ...) and a body from
        :meth:`replace_body` are in it. To keep the content as it arrived,
        copy it in a plugin that runs first."""
        self._apply_changes()
        if self._spool is None:
            return b""
        return self._spool.read_all()

    @property
    def content(self) -> bytes:
        """The whole message: added headers, then the client's content.

        This reads it all into memory; use :meth:`write_to` for large messages.
        """
        return self.header_bytes + self.body

    def open_body(self) -> IO[bytes]:
        """Return the content file (:attr:`body`, with earlier plugins'
        changes) positioned at the start (do not close it)."""
        self._apply_changes()
        if self._spool is None:
            return io.BytesIO()
        return self._spool.open()

    def write_to(self, fileobj: IO[bytes], chunk_size: int = 1 << 20) -> int:
        """Write the whole message to ``fileobj`` in chunks; return its size."""
        head = self.header_bytes
        fileobj.write(head)
        body = self.open_body()
        shutil.copyfileobj(body, fileobj, chunk_size)
        return len(head) + self._size

    @property
    def message(self) -> EmailMessage:
        """The message parsed with :mod:`email` (modern policy), on first use.
        Raises :class:`HeaderSectionTooLarge` as :meth:`headers` does."""
        if self._message is None:
            self._apply_changes()
            if self._spool is not None:
                # Where the header section ends is made plain in the content
                # first, so that this parse agrees with every other reader.
                self._client_header_section()
            parser = BytesParser(policy=email.policy.default)
            self._message = parser.parsebytes(self.content)
        assert self._message is not None
        return self._message

    def remove_header(self, name: str) -> int:
        """Remove every ``name`` header (case-insensitive, with its folded
        continuation lines) from the client's header section and from the
        headers added so far; return how many were removed. Names are matched
        as :meth:`headers` reads them: ``X-Spam-Flag : yes`` (white space
        before the colon, obsolete but still in use) is an ``X-Spam-Flag``.

        The body after the header section is copied as is, in chunks, so this
        works for spooled messages of any size. Raises
        :class:`HeaderSectionTooLarge` as :meth:`headers` does. Before the
        content of the session's message is complete, the removal waits for
        it, after the changes asked for before it, and ``0`` is returned.
        """
        wanted = name.lower().encode("ascii", "replace")
        if self._content_pending:
            self._edits.append(("remove", wanted, None, None))
            self._record("remove_header", name)
            return 0
        self._apply_changes()
        blocks: list[bytes] = []
        blank, start = b"", 0
        if self._spool is not None:
            # The section as headers() reads it: what it lists is what goes.
            blocks, blank, start = self._section_to_change()
        kept_added = [b for b in self._headers if _field_key(b) != wanted]
        removed = len(self._headers) - len(kept_added)
        self._headers = kept_added
        kept = [b for b in blocks if _field_key(b) != wanted]
        if len(kept) < len(blocks):
            removed += len(blocks) - len(kept)
            self._rewrite([*kept, blank], start)
        self._message = None
        if removed:
            self._record("remove_header", name)
        return removed

    def close(self) -> None:
        """Drop the content (removing any temporary file)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        if self._new_body is not None:
            self._new_body.close()
            self._new_body = None
        self._edits = []

    def __repr__(self) -> str:
        return (
            f"<Envelope {self.id} from={self.mail_from!r} to={self.rcpt_tos!r} size={self._size}>"
        )


_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


# What separates the fields of a log line, beside what is not printable.
_LOG_SEPARATORS = frozenset(' \\<>,"=')


def log_escape(text: str | None, limit: int = 512) -> str:
    """Client-supplied ``text`` made safe for one log line: every character
    that is not printable (CR, LF, other controls, Unicode line separators,
    bidirectional overrides) or that separates fields (space, ``\\``,
    ``<``, ``>``, ``,``, ``"``, ``=``) is written as a ``\\xNN``/``\\uNNNN``
    escape, so a client can neither end the line nor forge another field.
    Longer than ``limit`` characters is cut, with ``...``; ``None`` is ``-``."""
    if text is None:
        return "-"
    if text.isprintable() and _LOG_SEPARATORS.isdisjoint(text) and len(text) <= limit:
        return text
    out = []
    for ch in text[:limit]:
        if ch.isprintable() and ch not in _LOG_SEPARATORS:
            out.append(ch)
        elif ord(ch) <= 0xFF:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    if len(text) > limit:
        out.append("...")
    return "".join(out)


def one_line(text: str) -> str:
    """A plugin's reply or log text (which may hold what a client sent: a
    decoded Subject, an address) made safe for a log line, kept readable:
    every character that is not printable (CR, LF, other controls, U+2028
    and the other line and paragraph separators, bidirectional overrides)
    is written as its ``\\xNN``/``\\uNNNN`` escape, so that the text can
    neither end the line nor begin a forged one; spaces, letters of any
    script and backslashes are kept as they are."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def exception_text(exc: BaseException) -> str:
    """``str(exc)`` for one log line (:func:`one_line`); the exception's
    type when it has no text, a placeholder when it cannot be made a
    string."""
    try:
        said = str(exc)
    except Exception:
        return f"<{type(exc).__name__} that cannot be shown>"
    # An exception with no text (KeyboardInterrupt(), CancelledError()): its type.
    return one_line(said) if said else type(exc).__name__


def safe_text(text: str, limit: int = 255) -> str:
    """Client-supplied text made safe for a header or a log line: at most
    ``limit`` characters, each outside ``[A-Za-z0-9.-_:[]]`` replaced by ``?``."""
    return _UNSAFE.sub("?", text[:limit])


_date_cache: tuple[int, str] = (-1, "")


def _date(when: float) -> str:
    """RFC 5322 date of ``when`` in local time, formatted once per second."""
    global _date_cache
    second = int(when)
    if _date_cache[0] != second:
        stamp = format_datetime(datetime.datetime.fromtimestamp(second).astimezone())
        _date_cache = (second, stamp)
    return _date_cache[1]


# What a recipient in the trace header's "for" clause must not hold: the
# characters that end or comment a clause (a quoted local part may hold
# them, and a parser that splits on ";" would read a forged date), and
# invisible or direction-changing Unicode (format characters).
_NOT_IN_FOR = re.compile(r'[;()<>"\\\s\x00-\x1f\x7f]')


def _plain_for(address: str) -> bool:
    if _NOT_IN_FOR.search(address):
        return False
    # Per character only for the rare non-ASCII address (once per message).
    return address.isascii() or not any(
        unicodedata.category(c) in ("Cf", "Cc", "Zl", "Zp", "Co", "Cs") for c in address
    )


def received_header(
    session: Session, envelope: Envelope, hostname: str, when: float | None = None
) -> str:
    """Return the ``Received:`` trace header for a message (RFC 5321 4.4).

    Client-supplied text (the HELO name) is reduced to a safe alphabet so it
    cannot inject header lines or comments. The client's address follows the
    name, unless there is none (``0.0.0.0``: a Unix socket). The recipient
    is named only when there is exactly one, so a copy does not reveal the
    others.
    """
    ip = session.remote_ip
    helo = safe_text(session.helo or "unknown")
    keyword = with_keyword(session, envelope)
    if ip == "0.0.0.0":
        # No client address (a Unix socket, XCLIENT's [UNAVAILABLE]): the
        # bare name (RFC 5321 4.4 Extended-Domain), claiming no address.
        parts = [f"Received: from {helo}"]
    else:
        literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
        parts = [f"Received: from {helo} ({literal})"]
    with_ = f"\tby {hostname} (Bonzo) with {keyword} id {envelope.id}"
    tls = session.tls
    if tls:
        version = safe_text(str(tls.get("version", "")), 32)
        cipher = safe_text(str(tls.get("cipher", "")), 64)
        with_ = (
            f"\tby {hostname} (Bonzo) with {keyword}\r\n"
            f"\t(version={version} cipher={cipher})\r\n\tid {envelope.id}"
        )
    if session.auth:
        with_ += f"\r\n\t(authenticated as {safe_text(session.auth, 128)})"
    parts.append(with_)
    stamp = _date(when or time.time())
    # An address in the header must be ASCII, or UTF-8 in an SMTPUTF8 message
    # (RFC 6532); the parser has refused control characters in it already.
    rcpts = envelope.rcpt_tos
    if (
        len(rcpts) == 1
        and (rcpts[0].isascii() or "SMTPUTF8" in envelope.mail_params)
        and _plain_for(rcpts[0])
    ):
        parts.append(f"\tfor <{rcpts[0]}>; {stamp}")
    else:
        parts[-1] += f"; {stamp}"
    return "\r\n".join(parts) + "\r\n"

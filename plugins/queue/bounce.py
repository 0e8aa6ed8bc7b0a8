"""Delivery status notifications (RFC 3464): the bounce a sender gets.

:func:`build_report` writes one ``multipart/report; report-type=
delivery-status`` message for one batch of recipients of one queued
message: a human-readable part, the ``message/delivery-status`` part (the
per-message fields, then one block per recipient) and the original message
(``message/rfc822``, in a failure report) or, in a delay notice or a
success report (RFC 3461 4.3), when the sender asked for headers only
(``RET=HDRS``), the message is larger than the size limit or it is not text
(binary content cannot go in a report, which is sent ``BODY=8BITMIME``), its
header section (``text/rfc822-headers``), no larger than the size limit
either. Where the fields hold UTF-8 (an internationalized address) the
report part is ``message/global-delivery-status``, and a returned header
section in UTF-8 is ``message/global`` or ``message/global-headers`` (RFC
6533). The DSN parameters of RFC 3461 are honoured: ``NOTIFY``
(:func:`wants_report`), ``RET``, ``ENVID`` and ``ORCPT``, read with
:mod:`bonzo.dsn`.

The parts are assembled as bytes, so that the original message is returned
exactly as it was received; every line is 8-bit text of at most 998 octets.
The header fields are formatted with the standard library's
:mod:`email.utils`. The result parses with :mod:`email` as a
``multipart/report`` whose second part holds one per-message and one
per-recipient block of fields.
"""

from __future__ import annotations

import datetime
import re
import secrets
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import format_datetime, localtime

from bonzo.dsn import (
    NO_MAIL_DSN,
    NO_RECIPIENT_DSN,
    DSNError,
    MailDSN,
    RecipientDSN,
    mail_dsn,
    recipient_dsn,
)
from bonzo.errors import enhanced_code_problem

from .spool import QueuedMessage, Recipient

__all__ = ["ReportLine", "build_report", "seven_bit", "wants_report", "ACTIONS"]

#: The ``Action`` values this module writes (RFC 3464 2.3.3).
ACTIONS = ("failed", "delayed", "delivered", "relayed")

_TEXT = {
    "failed": (
        "Undelivered Mail Returned to Sender",
        "Your message could not be delivered to the recipient(s) below. This is a\r\n"
        "permanent error; the message will not be tried again.",
    ),
    "delayed": (
        "Delayed Mail (still being retried)",
        "Your message has not been delivered yet to the recipient(s) below. It is\r\n"
        "still being tried; you will be told if it cannot be delivered in the end.\r\n"
        "You do not need to send it again.",
    ),
    "delivered": (
        "Successful Mail Delivery Report",
        "Your message was delivered to the recipient(s) below, as you asked to be told.",
    ),
    "relayed": (
        "Successful Mail Delivery Report",
        "Your message was handed on to the recipient(s) below, to a system that does\r\n"
        "not send delivery reports of its own.",
    ),
}


@dataclass
class ReportLine:
    """One recipient's entry in a report."""

    recipient: Recipient
    action: str
    """``failed``, ``delayed``, ``delivered`` or ``relayed``."""
    status: str
    """The enhanced status code (``5.1.1``)."""
    diagnostic: str = ""
    """The reply (``550 5.1.1 No such user``): the remote server's, or the
    one made here for a failure decided here."""
    remote_mta: str = ""
    """The host whose own reply :attr:`diagnostic` is; ``""`` when the
    failure was decided here (the report then names no ``Remote-MTA`` and
    gives the diagnostic as ``X-Bonzo``, not ``smtp``, RFC 3464 2.3.6)."""
    will_retry_until: float = 0.0
    """For ``delayed``: when the message expires."""
    note: str = ""
    """Why this server gave up, when not for the reply itself (``message
    expired after 5d``): said after the diagnostic in the human-readable
    part only, never in ``Diagnostic-Code``, which holds no more than what
    the server said (RFC 3464 2.3.6)."""


_KINDS = {"failed": "failure", "delayed": "delay", "delivered": "success", "relayed": "success"}
_DEFAULT_STATUS = {"failed": "5.0.0", "delayed": "4.0.0", "delivered": "2.0.0", "relayed": "2.0.0"}


def _recipient_dsn(recipient: Recipient) -> RecipientDSN:
    try:
        # Checked at RCPT, raw UTF-8 against the transaction's SMTPUTF8:
        # read back as the most it could be.
        return recipient_dsn(recipient.params, smtputf8=True)
    except DSNError:  # checked at RCPT; a message queued otherwise may lack checks
        return NO_RECIPIENT_DSN


def _mail_dsn(message: QueuedMessage) -> MailDSN:
    try:
        return mail_dsn(message.mail_params)
    except DSNError:
        return NO_MAIL_DSN


def wants_report(recipient: Recipient, action: str) -> bool:
    """Whether ``recipient``'s ``NOTIFY`` parameter asks for a report of
    ``action`` (:meth:`bonzo.dsn.RecipientDSN.wants`): without ``NOTIFY``,
    failures and delays are reported, successes are not."""
    return _recipient_dsn(recipient).wants(_KINDS[action])


def _address_field(address: str) -> str:
    """An address type and address for a DSN field (RFC 3464 2.3.2, RFC 6533)."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address}"


def _original_recipient(recipient: Recipient) -> str | None:
    orcpt = _recipient_dsn(recipient).orcpt
    if orcpt is None:
        return None
    if not orcpt.address.isascii() and orcpt.addr_type.lower() == "rfc822":
        # Given as UTF-8 octets in xtext (Postfix does): a UTF-8 address is
        # the utf-8 type's in a report (RFC 6533 3).
        return f"utf-8; {orcpt.address}"
    return f"{orcpt.addr_type}; {orcpt.address}"


def _clean(text: str, limit: int = 900) -> str:
    """One header-safe line of at most ``limit`` octets in UTF-8 (a report's
    lines must stay within 998): no line breaks or control characters."""
    text = "".join(c if c.isprintable() else " " for c in text)
    # Cut by octets; a character cut in half is dropped.
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _mta_name(server: str) -> str:
    """A ``Remote-MTA`` value (RFC 3464 2.3.5) for a server as the client
    names it (:func:`bonzo.client.server_label`): the host name, or the
    address when there is none, without the port (``dns;
    mx.example.net`` for ``mx.example.net[192.0.2.1]:25``); a Unix socket is
    ``x-unix; path``."""
    if server.startswith("unix:"):
        return f"x-unix; {server[5:]}"
    host, colon, port = server.rpartition(":")
    if colon and port.isdigit() and (":" not in host or host.endswith("]")):
        server = host  # "host:port", "[v6]:port", "name[address]:port"
    if server.endswith("]") and not server.startswith("["):
        server = server[: server.index("[")]  # the name of name[address]
    return f"dns; {server}"


def _date(when: float) -> str:
    return format_datetime(localtime(datetime.datetime.fromtimestamp(when, datetime.timezone.utc)))


#: The longest line (octets, before its CRLF) text may have (RFC 5321
#: 4.5.3.1.6, RFC 6152): a report is sent as 8-bit text, never binary.
MAX_LINE = 998


def not_text(data: bytes) -> str | None:
    """Why ``data`` cannot be sent as 8-bit text (RFC 6152: no NUL, CR and
    LF only as CRLF, lines of at most :data:`MAX_LINE` octets), or ``None``
    when it can."""
    if b"\0" in data:
        return "it holds NUL octets"
    lines = data.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        return "it holds a bare CR or LF"
    if any(len(line) > MAX_LINE for line in lines):
        return f"it has lines longer than {MAX_LINE} octets"
    return None


def _as_text(section: bytes) -> tuple[bytes, bool]:
    """A header section made fit to be sent as 8-bit text: NULs and bare CR
    and LF become spaces, lines are cut to :data:`MAX_LINE` octets. Also
    whether anything was changed (a client sending ``BDAT`` is held to no
    line rules)."""
    if not_text(section) is None:
        return section, False
    lines = section.split(b"\r\n")
    for n, line in enumerate(lines):
        line = line.replace(b"\0", b" ").replace(b"\r", b" ").replace(b"\n", b" ")
        lines[n] = line[:MAX_LINE]
    return b"\r\n".join(lines), True


@dataclass
class _Returned:
    """The third part of a report: the message, or its header section."""

    description: str
    content_type: str
    content: bytes
    note: str = ""
    """Why less than the message is returned, for the human-readable part."""


def _returned(message: QueuedMessage, full: bool, size_limit: int) -> _Returned:
    """What a report returns of ``message``: all of it when ``full`` and it
    can go whole — no larger than ``size_limit`` octets and text (a report is
    sent ``BODY=8BITMIME``: binary content would be refused on the way, and
    a report, from the null sender, lost) — else its header section, at
    most ``size_limit`` octets."""
    why = ""
    if full and message.size > size_limit:
        why = f"it is larger than the {size_limit} octets a report may carry"
    elif full:
        if (message.mail_params.get("BODY") or "").upper() == "BINARYMIME":
            why = "it was sent as binary content (BODY=BINARYMIME)"
        else:
            content = message.read()
            problem = not_text(content)
            if problem is None:
                # A header section in UTF-8 (an SMTPUTF8 message) is
                # returned as message/global (RFC 6532 3.7, RFC 6533 6.3).
                plain = content.partition(b"\r\n\r\n")[0].isascii()
                return _Returned(
                    "Undelivered Message", f"message/{'rfc822' if plain else 'global'}", content
                )
            why = problem
    headers, whole = message.header_section(size_limit)
    headers, changed = _as_text(headers)
    notes = []
    if why:
        notes.append(
            f"Only the header section of your message is returned: {why}, "
            "which a report cannot carry."
        )
    if not whole:
        notes.append(
            f"The header section is cut short: only its first {len(headers)} octets are returned."
        )
    if changed:
        notes.append(
            "Control characters and overlong lines of the header section have been replaced or cut."
        )
    return _Returned(
        "Message Headers",
        "text/rfc822-headers" if headers.isascii() else "message/global-headers",
        headers,
        " ".join(notes),
    )


_BOUNDARY = re.compile(rb'boundary="([^"\r\n]{1,70})"')
_NO_8BIT_NOTE = (
    "The server your mail goes to does not take 8-bit content (8BITMIME), so "
    "this report is sent in a 7-bit form"
)
_GLOBAL_STATUS = (
    b"\r\nContent-Type: message/global-delivery-status\r\nContent-Transfer-Encoding: 8bit\r\n"
)


def seven_bit(report: bytes) -> bytes | None:
    """A report made by :func:`build_report` that holds 8-bit octets, made
    so that it goes to a server without ``8BITMIME`` (RFC 6152), which
    refused it: a whole returned message becomes its header section
    (``text/rfc822-headers``), and UTF-8 in the report's own parts (a
    server's reply, an address) becomes ``\\x{HEX}`` escapes, the form RFC
    6533 3 gives for downgrading (a ``message/global-delivery-status`` part
    becomes a ``message/delivery-status`` one); a returned header section
    in UTF-8 is left out; a note says why. ``None`` when ``report`` is 7-bit
    already."""
    if report.isascii():
        return None
    found = _BOUNDARY.search(report.partition(b"\r\n\r\n")[0])
    if found is None:
        return None
    dash = b"--" + found.group(1)
    end = report.rfind(b"\r\n" + dash + b"--\r\n")
    start = report.rfind(b"\r\n" + dash + b"\r\n", 0, end) + 2  # the returned part
    text_end = report.find(b"\r\n" + dash + b"\r\nContent-Description: Delivery report\r\n")
    if end < 0 or start < 2 or not 0 <= text_end < start:
        return None
    part_head, _, content = report[start:end].partition(b"\r\n\r\n")
    whole = b"\r\nContent-Description: Undelivered Message\r\n" in part_head + b"\r\n"
    fields = content.partition(b"\r\n\r\n")[0] if whole else content
    if not fields.endswith(b"\r\n"):
        fields += b"\r\n"  # each field with its CRLF
    # A header section in UTF-8 has no faithful 7-bit form: the report goes
    # without it (the returned part is optional, RFC 6522 3).
    returned = fields.isascii()
    own = report[:start].decode("utf-8", "replace")
    escaped = not own.isascii()
    note = _NO_8BIT_NOTE
    if not returned:
        note += ", without your message: its header section holds characters beyond ASCII"
    elif whole:
        note += ", without your message: only its header section is returned"
    if escaped:
        note += ", and the characters beyond ASCII in it are written as \\x{HEX}"
    lines = "".join(f"\r\n{line}" for line in ["", *textwrap.wrap(note + ".", 76)])
    own = own[:text_end] + lines + own[text_end:]
    before = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in own).encode("ascii")
    before = before.replace(_GLOBAL_STATUS, b"\r\nContent-Type: message/delivery-status\r\n")
    # Bonzo's own part headers (at line starts): 7-bit now.
    before = before.replace(
        b"\r\nContent-Transfer-Encoding: 8bit\r\n", b"\r\nContent-Transfer-Encoding: 7bit\r\n"
    )
    if not returned:
        return before + dash + b"--\r\n"
    return (
        before
        + dash
        + b"\r\nContent-Description: Message Headers\r\n"
        + b"Content-Type: text/rfc822-headers\r\n"
        + b"Content-Transfer-Encoding: 7bit\r\n\r\n"
        + fields
        + b"\r\n"  # the delimiter's own CRLF (RFC 2046 5.1.1)
        + dash
        + b"--\r\n"
    )


def build_report(
    message: QueuedMessage,
    lines: Sequence[ReportLine],
    hostname: str,
    *,
    size_limit: int = 50_000,
    now: float | None = None,
) -> bytes:
    """The report for ``lines`` (all with the same kind of action) about
    ``message``, addressed to its sender, as the bytes of a message."""
    now = time.time() if now is None else now
    action = lines[0].action
    dsn = _mail_dsn(message)
    # RET applies to failures only (RFC 3461 4.3): a report with none (a
    # delay notice, a success report) carries the headers; RET=HDRS asks
    # for them.
    full = dsn.ret != "HDRS" and action == "failed"
    returned = _returned(message, full, size_limit)
    subject, intro = _TEXT[action]
    # RFC 2046 5.1.1: at most 70 characters. The random part makes it
    # unique (it cannot occur in the returned message but by chance, one in
    # 2**96); the host name, of any length, stays out.
    boundary = f"{message.id[:40]}.{secrets.token_hex(12)}"
    sender = message.sender
    out: list[str] = [
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{message.id}.{secrets.token_hex(6)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at host {hostname}.",
        "",
        intro,
        "",
    ]
    # The top-level and the notification's Content-Transfer-Encoding.
    own_labels = [i for i, text in enumerate(out) if text.startswith("Content-Transfer-Encoding:")]
    for line in lines:
        what = f"<{line.recipient.address}>"
        if line.diagnostic:
            what += f": {line.diagnostic}"
        if line.note:
            what += f" ({line.note})"
        out.append(_clean(what, MAX_LINE))
    if returned.note:
        out += ["", *textwrap.wrap(returned.note, 76)]
    out += ["", f"--{boundary}", "Content-Description: Delivery report"]
    status_at = len(out)
    out += ["", f"Reporting-MTA: dns; {hostname}"]
    if dsn.envid:
        out.append(f"Original-Envelope-Id: {_clean(dsn.envid, 100)}")
    out.append(f"Arrival-Date: {_date(message.arrival)}")
    for line in lines:
        out.append("")
        original = _original_recipient(line.recipient)
        if original:
            out.append(f"Original-Recipient: {_clean(original)}")
        out.append(f"Final-Recipient: {_address_field(line.recipient.address)}")
        out.append(f"Action: {line.action}")
        # A reply without an enhanced code still needs a valid Status
        # (RFC 3464 2.3.4: class.subject.detail): the class's "other".
        status = _DEFAULT_STATUS.get(line.action, "5.0.0")
        if enhanced_code_problem(int(status[0]) * 100, line.status) is None:
            status = line.status
        out.append(f"Status: {status}")
        if line.remote_mta:
            out.append(f"Remote-MTA: {_mta_name(_clean(line.remote_mta, 255))}")
        if line.diagnostic:
            # "smtp" only for a reply a server gave (RFC 3464 2.3.6).
            kind = "smtp" if line.remote_mta else "X-Bonzo"
            out.append(f"Diagnostic-Code: {kind}; {_clean(line.diagnostic)}")
        r = line.recipient
        # The last real attempt (RFC 3464 2.3.7); none, no field. A state
        # written before last_attempt was kept: its finishing time.
        tried = r.last_attempt or (r.attempts and (r.done_at or now))
        if tried:
            out.append(f"Last-Attempt-Date: {_date(tried)}")
        if line.action == "delayed" and line.will_retry_until:
            out.append(f"Will-Retry-Until: {_date(line.will_retry_until)}")
    out.append("")
    # RFC 6533 6: fields holding UTF-8 (an address, a reply) go in the
    # global form of the part, where they may be raw UTF-8.
    fields_ascii = all(line.isascii() for line in out[status_at:])
    if fields_ascii:
        out.insert(status_at, "Content-Type: message/delivery-status")
    else:
        # Raw UTF-8: labelled, or it would be 7bit by default (RFC 2045 6.1).
        out[status_at:status_at] = [
            "Content-Type: message/global-delivery-status",
            "Content-Transfer-Encoding: 8bit",
        ]
    # A report all in ASCII says so (RFC 2045 6.2: 8bit claims octets
    # above 127); a server without 8BITMIME then sees no 8-bit label.
    encoding = "8bit"
    if returned.content.isascii() and all(line.isascii() for line in out):
        encoding = "7bit"
        out[own_labels[0]] = out[own_labels[1]] = "Content-Transfer-Encoding: 7bit"
    head = "\r\n".join(out).encode("utf-8") + b"\r\n"
    part = (
        f"--{boundary}\r\n"
        f"Content-Description: {returned.description}\r\n"
        f"Content-Type: {returned.content_type}\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode("ascii") + returned.content
    if not part.endswith(b"\r\n"):
        part += b"\r\n"
    return head + part + f"--{boundary}--\r\n".encode("ascii")

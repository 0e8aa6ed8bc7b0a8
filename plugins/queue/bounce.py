"""Delivery status notifications (RFC 3464): the bounce a sender gets.

:func:`build_report` writes one ``multipart/report; report-type=
delivery-status`` message for one batch of recipients of one queued
message: a human-readable part, the ``message/delivery-status`` part (the
per-message fields, then one block per recipient) and the original message
(``message/rfc822``) or, when the sender asked for headers only (``RET=HDRS``)
or the message is larger than the size limit, its header section
(``text/rfc822-headers``). Where the fields hold UTF-8 (an internationalized
address) the report part is ``message/global-delivery-status``, and a
returned header section in UTF-8 is ``message/global`` or
``message/global-headers`` (RFC 6533). The DSN parameters of RFC 3461 are honoured:
``NOTIFY`` (:func:`wants_report`), ``RET``, ``ENVID`` and ``ORCPT``, read with :mod:`bonzo.dsn`.

The parts are assembled as bytes, so that the original message is returned
exactly as it was received; the header fields are formatted with the
standard library's :mod:`email.utils`. The result parses with
:mod:`email` as a ``multipart/report`` whose second part holds one
per-message and one per-recipient block of fields.
"""

from __future__ import annotations

import datetime
import secrets
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

__all__ = ["ReportLine", "build_report", "wants_report", "ACTIONS"]

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


_KINDS = {"failed": "failure", "delayed": "delay", "delivered": "success", "relayed": "success"}
_DEFAULT_STATUS = {"failed": "5.0.0", "delayed": "4.0.0", "delivered": "2.0.0", "relayed": "2.0.0"}


def _recipient_dsn(recipient: Recipient) -> RecipientDSN:
    try:
        return recipient_dsn(recipient.params)
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
    return f"{orcpt.addr_type}; {orcpt.address}"


def _clean(text: str, limit: int = 900) -> str:
    """One header-safe line: no line breaks or control characters."""
    text = "".join(c if c.isprintable() else " " for c in text)
    return text[:limit]


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
    subject, intro = _TEXT[action]
    boundary = f"{message.id}.{secrets.token_hex(8)}/{_clean(hostname, 200)}"
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
    for line in lines:
        what = f"<{line.recipient.address}>"
        if line.diagnostic:
            what += f": {_clean(line.diagnostic)}"
        out.append(what)
    out += ["", f"--{boundary}", "Content-Description: Delivery report"]
    status_at = len(out)
    out += ["", f"Reporting-MTA: dns; {hostname}"]
    dsn = _mail_dsn(message)
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
    kind = "delivery-status" if fields_ascii else "global-delivery-status"
    out.insert(status_at, f"Content-Type: message/{kind}")
    head = "\r\n".join(out).encode("utf-8") + b"\r\n"
    full = dsn.ret != "HDRS"
    if action in ("delivered", "relayed"):
        full = False  # a success report carries the headers only
    headers = message.headers()
    # A header section in UTF-8 (an SMTPUTF8 message) is returned as
    # message/global or message/global-headers (RFC 6532 3.7, RFC 6533 6.3).
    plain = headers.isascii()
    if full and message.size <= size_limit:
        part = (
            f"--{boundary}\r\n"
            "Content-Description: Undelivered Message\r\n"
            f"Content-Type: message/{'rfc822' if plain else 'global'}\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode("ascii") + message.read()
    else:
        part = (
            f"--{boundary}\r\n"
            "Content-Description: Message Headers\r\n"
            f"Content-Type: {'text/rfc822-headers' if plain else 'message/global-headers'}\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
        ).encode("ascii") + headers
    if not part.endswith(b"\r\n"):
        part += b"\r\n"
    return head + part + f"--{boundary}--\r\n".encode("ascii")

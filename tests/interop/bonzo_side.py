"""Bonzo's side of the interop tests: a recording plugin that refuses chosen
recipients and knows one user, the messages the peers relay, and a check that
what Bonzo stored is what was injected plus the peer's trace header."""

from __future__ import annotations

import re
from typing import Any

from e2e_support import Delivered, RecordingPlugin

from bonzo import Accept
from bonzo.errors import SMTPError
from bonzo.session import Envelope, Session

USER = "relay-user"
PASSWORD = "correct horse battery staple"

#: RCPT replies of :class:`Target` by local part; every other recipient is accepted.
REFUSALS = {
    "reject": (550, "5.1.1", "No such user here"),
    "later": (451, "4.3.0", "Try again later"),
}
#: Recipients :class:`Target` refuses after the message, by local part, with
#: ``envelope.refuse_recipient``: over LMTP each gets its own reply.
DELIVERY_REFUSALS = {
    "full": (452, "4.2.2", "Mailbox full"),
    "broken": (554, "5.2.1", "Mailbox disabled"),
}

# One header field, folded lines included, at the start of the bytes.
_TRACE = re.compile(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*")


class Target(RecordingPlugin):
    """Records every message like :class:`RecordingPlugin`; refuses the
    recipients named in :data:`REFUSALS` at RCPT and those in
    :data:`DELIVERY_REFUSALS` after the message; accepts :data:`USER` with
    :data:`PASSWORD` for AUTH; notes each delivering session's HELO, TLS,
    login and protocol, and the recipients delivered to, in :attr:`sessions`."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: list[dict[str, Any]] = []
        #: The refusals in force (a test may change them between attempts).
        self.refusals = dict(REFUSALS)
        self.delivery_refusals = dict(DELIVERY_REFUSALS)
        #: Each RCPT's decoded DSN parameters, as the hook was given them.
        self.rcpt_dsn: list[Any] = []

    def bonzo_rcpt(self, address: str, dsn: Any) -> Any:  # type: ignore[override] # by name
        self.rcpt_dsn.append(dsn)
        refusal = self.refusals.get(address.split("@", 1)[0].lower())
        if refusal is not None:
            code, enhanced, text = refusal
            raise SMTPError(code, text, enhanced_code=enhanced)
        return Accept()

    def bonzo_auth(self, username: str, password: str) -> Any:
        return Accept() if (username, password) == (USER, PASSWORD) else None

    def bonzo_deliver(self, session: Session, envelope: Envelope) -> Any:
        for mailbox in envelope.recipients:
            refusal = self.delivery_refusals.get(mailbox.local.lower())
            if refusal is not None:
                code, enhanced, text = refusal
                envelope.refuse_recipient(mailbox, SMTPError(code, text, enhanced_code=enhanced))
        facts = {"helo": session.helo, "tls": session.tls, "auth": session.auth}
        facts["protocol"] = session.protocol
        facts["remote_ip"] = session.remote_ip
        facts["delivered_to"] = [m.original for m in envelope.remaining_recipients]
        self.sessions.append(facts)
        return super().bonzo_deliver(session, envelope)


def message(subject: str, body: bytes, sender: str = "alice@peer.test") -> bytes:
    """A complete message (Date and Message-ID included, so the peer adds
    no header but its trace), CRLF line ends."""
    head = (
        f"From: <{sender}>\r\nTo: <bob@example.com>\r\nSubject: {subject}\r\n"
        "Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@interop.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return head.encode() + body


#: Messages whose bytes must arrive unchanged (name → message).
CORPUS: dict[str, bytes] = {
    "ascii": message("ascii", b"Hello from a real MTA.\r\n"),
    "eight bit": message("eight bit", "Grüße, ça va? Ελληνικά.\r\n".encode()),
    "dots": message("dots", b".\r\n..\r\n.leading dot\r\n..two dots\r\nend\r\n"),
    "long line": message("long line", b"x" * 998 + b"\r\n" + b"y" * 997 + b"\r\n"),
    "large": message("large", b"".join(b"%07d " % i + b"z" * 70 + b"\r\n" for i in range(4000))),
}


def split_trace(stored: bytes, original: bytes) -> bytes:
    """What the peer put in front of ``original`` in ``stored``; assert that
    it is exactly one ``Received:`` header and that the rest is unchanged."""
    assert stored.endswith(original), "the message was changed on the way"
    prefix = stored[: len(stored) - len(original)]
    trace = _TRACE.match(prefix)
    assert trace is not None and trace.end() == len(prefix), prefix[:500]
    return prefix


def by_subject(messages: list[Delivered]) -> dict[str, Delivered]:
    """The recorded messages by their Subject header."""
    found = {}
    for delivered in messages:
        body = delivered.body or b""
        match = re.search(rb"^Subject: ([^\r\n]*)", body, re.M)
        assert match is not None, body[:300]
        found[match.group(1).decode()] = delivered
    return found

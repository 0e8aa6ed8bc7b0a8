"""What a delivery attempt gives for each recipient, and what a transport is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .spool import QueuedMessage, Recipient

__all__ = ["Outcome", "Transport", "cut_text", "MAX_TEXT_LINE", "MAX_TEXT_LINES"]

#: What is kept of a reply's text, for each recipient (in the queue's state,
#: its log lines and its reports): at most this many lines of this many
#: characters. RFC 5321 4.5.3.1.5 allows 512 octets a reply line; a hostile
#: server may send 100 lines of 8 KB, which the client reads.
MAX_TEXT_LINE = 400
MAX_TEXT_LINES = 5


def cut_text(text: str) -> str:
    """``text`` within :data:`MAX_TEXT_LINES` lines of :data:`MAX_TEXT_LINE`
    characters, saying where it was cut (``[cut]``, ``[N more lines cut]``)."""
    if len(text) <= MAX_TEXT_LINE and "\n" not in text:
        return text
    lines = text.split("\n")
    kept = [
        line if len(line) <= MAX_TEXT_LINE else f"{line[:MAX_TEXT_LINE]} [cut]"
        for line in lines[:MAX_TEXT_LINES]
    ]
    if len(lines) > MAX_TEXT_LINES:
        kept.append(f"[{len(lines) - MAX_TEXT_LINES} more lines cut]")
    return "\n".join(kept)


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient in one attempt."""

    status: str
    """``delivered``, ``deferred`` (try again later) or ``failed`` (for good)."""
    code: int
    enhanced: str
    text: str
    """The reply's text, cut to :data:`MAX_TEXT_LINES` lines of
    :data:`MAX_TEXT_LINE` characters (:func:`cut_text`)."""
    host: str = ""
    """Who answered: a host name, a socket path, a maildir."""
    dsn_downstream: bool = False
    """The downstream took over the DSN request (it offered ``DSN``): no
    success report is due from here."""
    relayed: bool = False
    """Handed to another mail system rather than into a mailbox (a success
    report says ``relayed``)."""
    remote: bool = False
    """The reply is the remote server's own (:attr:`host` answered it): a
    report names that host as ``Remote-MTA`` and gives the reply as an
    ``smtp`` diagnostic. False for what was decided here (no route, DNS,
    a timeout, a refused connection, a mailbox write)."""
    too_many: bool = False
    """A deferral because the server took no more recipients in that
    transaction (:attr:`bonzo.client.RecipientResult.too_many`): tried
    again at once, in a new transaction, when others were delivered in this
    one."""
    tls: str = ""
    """How the delivery's connection was protected, for the log
    (:attr:`bonzo.client.ClientConnection.tls_summary`); empty where no SMTP
    connection was used."""
    attempted: bool = True
    """A delivery was tried (false for the operator's ``bonzo queue
    bounce``): counted in the recipient's attempts and its last attempt time."""
    never_expires: bool = False
    """A deferral that is the operator's to fix, not the sender's (no route
    for the recipient): the message is kept past ``lifetime``, never bounced."""

    def __post_init__(self) -> None:
        # Whatever made it (a transport, a server's reply), the text kept is
        # bounded (cut_text).
        object.__setattr__(self, "text", cut_text(self.text))

    @property
    def reply(self) -> str:
        """The reply as one line: code, enhanced code (when there is one), text."""
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)

    @classmethod
    def deferred(cls, code: int, enhanced: str, text: str, host: str = "") -> Outcome:
        return cls("deferred", code, enhanced, text, host)


class Transport(Protocol):
    """Delivers messages for one route."""

    #: The route's type, for logs and reports (``"maildir"``).
    kind: str
    #: True for a final delivery (a mailbox); false for a relay, whose
    #: success report says ``relayed``.
    final: bool
    #: Whether each recipient gets the message where it reads its mail (an
    #: LMTP or SMTP server, a maildir per recipient), as opposed to one place
    #: for all (a one-folder maildir, ``discard``): a quarantined message
    #: then needs a recipient of its own (``quarantine_recipient``).
    by_recipient: bool

    def destination(self, recipient: Recipient) -> str:
        """Which recipients go together (one connection, one concurrency limit)."""

    async def deliver(
        self, message: QueuedMessage, recipients: Sequence[Recipient]
    ) -> list[Outcome]:
        """Deliver ``message`` to ``recipients``; one outcome each, in order."""

    async def close(self) -> None:
        """Release connections and other resources."""

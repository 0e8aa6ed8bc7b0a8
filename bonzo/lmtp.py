"""LMTP (RFC 2033) as a state machine with no I/O.

LMTP is SMTP for the last hop, from an MTA to the mailbox store: the same
commands, except that the client greets with ``LHLO`` (``HELO`` and ``EHLO``
are refused), and after the message — the final dot, or the last ``BDAT``
chunk — the server gives **one reply per accepted recipient**, in the order
of the ``RCPT`` commands, so that a message can be delivered to some
mailboxes and refused or deferred for others without a bounce.

:class:`LMTPProtocol` is :class:`~bonzo.protocol.SMTPProtocol` with those
changes; a listener with ``protocol = "lmtp"`` uses it. Everything else —
limits, pipelining, STARTTLS, AUTH, the events — is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .errors import SMTPError
from .protocol import Helo, MessageComplete, Policy, Rcpt, Refusal, SMTPProtocol
from .settings import SMTPSettings

__all__ = ["LMTPProtocol", "RecipientReply"]

#: One recipient's outcome for :meth:`LMTPProtocol.answer_recipients`: an
#: error reply, or the text of a ``250`` (``None``: the default text).
RecipientReply = SMTPError | str | None


class LMTPProtocol(SMTPProtocol):
    """One LMTP session (see the module's description).

    Answering the end of a message:

    - :meth:`accept` gives every accepted recipient a ``250``;
    - :meth:`reject` gives every one of them the same error;
    - :meth:`answer_recipients` gives each its own reply.
    """

    name = "LMTP"

    def __init__(
        self,
        settings: SMTPSettings,
        remote_ip: str = "",
        policy: Policy | None = None,
        *,
        on_refusal: Callable[[Refusal], None] | None = None,
    ) -> None:
        super().__init__(settings, remote_ip, policy, on_refusal=on_refusal)
        #: The accepted recipients of the open transaction, as sent (the
        #: argument of a per-recipient refusal's log line).
        self.recipients: list[str] = []

    def send_greeting(self, text: str | None = None) -> None:
        """Queue the ``220`` greeting: ``text``, else the configured banner,
        else ``"<hostname> LMTP"``."""
        settings = self.settings
        if text is None and settings.banner is None:
            text = f"{settings.hostname} LMTP"
        super().send_greeting(text)

    # --------------------------------------------------------------- verbs
    def _cmd_lhlo(self, arg: str) -> Helo | None:
        if not arg or not arg.isascii():
            self._error(501, "5.5.4", "Syntax: LHLO hostname")
            return None
        if self.helo is not None and not self._junk():
            return None
        return Helo(arg, True)

    def _cmd_not_lmtp(self, arg: str) -> None:
        self._error(500, "5.5.1", "Error: this is an LMTP server, greet with LHLO")

    def _usable_verbs(self) -> list[str]:
        # HELO and EHLO are in the table only to refuse: not usable.
        return [v for v in super()._usable_verbs() if v not in ("HELO", "EHLO")]

    def _cmd_mail_lmtp(self, arg: str) -> object:
        if not self.helo:
            self._error(503, "5.5.1", "Error: need LHLO command")
            return None
        return self._cmd_mail(arg)

    # ------------------------------------------------------------ decisions
    def accept(
        self, text: str | list[str] | None = None, *, extensions: list[str] | None = None
    ) -> None:
        """As :meth:`SMTPProtocol.accept`; the end of a message is answered
        with one ``250`` per accepted recipient."""
        event = self._pending
        if type(event) is MessageComplete and event.error is None:
            reply = text if isinstance(text, str) else None
            self.answer_recipients([reply] * self.rcpt_count)
            return
        rcpt = event.mailbox.original if type(event) is Rcpt else None
        super().accept(text, extensions=extensions)
        if rcpt is not None:
            if self.rcpt_count == 1:
                self.recipients.clear()  # the first of a new transaction
            self.recipients.append(rcpt)

    def reject(
        self,
        error: SMTPError,
        *,
        by: str = "core",
        close: bool = False,
        limit: str | None = None,
        auth_failure: bool = False,
    ) -> None:
        """As :meth:`SMTPProtocol.reject`; the end of a message is answered
        with ``error`` once per accepted recipient — but a ``BDAT`` chunk
        refused before the ``LAST`` one, or one with no recipient accepted,
        gets the one reply its command is due (RFC 3030 2)."""
        if (
            type(self._pending) is not MessageComplete
            or not self.rcpt_count
            or self._ended_before_last
        ):
            super().reject(error, by=by, close=close, limit=limit, auth_failure=auth_failure)
            return
        self.answer_recipients([error] * self.rcpt_count, by=by)
        if close or error.close or error.status_code == 421:
            self._close()

    def answer_recipients(
        self, replies: Sequence[RecipientReply], *, by: str | Sequence[str] = "core"
    ) -> None:
        """Answer the pending end of a message with one reply per accepted
        recipient, in ``RCPT`` order: an :class:`~bonzo.errors.SMTPError`
        refuses (or defers) the message for that recipient, a string or
        ``None`` delivers it (``250 2.0.0`` with that text, or ``Ok``).

        Each refusal is reported to ``on_refusal`` with the recipient as its
        argument and ``by`` as who decided (one name for all, or one per
        reply); none counts toward ``max_errors`` (the client did nothing
        wrong). Does nothing once the session is closed.
        """
        event = self._pending
        if event is None:
            if self.closed:
                return
            raise RuntimeError("answer_recipients() without a pending message")
        if type(event) is not MessageComplete:
            raise RuntimeError(f"answer_recipients() answers a message, not {event!r}")
        if len(replies) != self.rcpt_count:
            raise ValueError(f"{len(replies)} replies for {self.rcpt_count} accepted recipient(s)")
        deciders = [by] * len(replies) if isinstance(by, str) else list(by)
        if len(deciders) != len(replies):
            raise ValueError(f"{len(deciders)} deciders (by) for {len(replies)} replies")
        if event.error is not None and not all(isinstance(r, SMTPError) for r in replies):
            raise RuntimeError("a message that broke a limit cannot be accepted")
        self._pending = None
        names = self.recipients
        delivered = False
        for i, reply in enumerate(replies):
            if isinstance(reply, SMTPError):
                self._arg = names[i] if i < len(names) else ""
                # Logged and queued; a 421 closes once every reply is queued.
                self.refuse(reply, by=deciders[i])
            else:
                delivered = True
                self.reply(250, reply or "Ok", "2.0.0")
        self._arg = ""
        if delivered:
            self.messages += 1
            self.junk_commands = 0
        self._reset_transaction()


# SMTP's verbs, with LHLO instead of HELO and EHLO. (The handlers take an
# LMTPProtocol; the table's type names the base class.)
_VERBS: dict[str, Any] = {
    **SMTPProtocol.VERBS,
    "LHLO": LMTPProtocol._cmd_lhlo,
    "HELO": LMTPProtocol._cmd_not_lmtp,
    "EHLO": LMTPProtocol._cmd_not_lmtp,
    "MAIL": LMTPProtocol._cmd_mail_lmtp,
}
LMTPProtocol.VERBS = _VERBS

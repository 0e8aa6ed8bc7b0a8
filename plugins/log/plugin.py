"""One log line per accepted message: who sent what to whom, never the content."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session, log_escape

from .._config import as_table, envelope_recipients

__all__ = ["LogPlugin", "escape"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: The ``[plugins.log]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key(
        "level",
        "choice",
        default="info",
        choices=tuple(LEVELS),
        doc="The level of the line (any case). The line is written only if the "
        "logging configuration lets that level through.",
    ),
)
KEYS = tuple(SCHEMA.names)

#: Client-supplied text made safe for the line (Bonzo's own log lines use
#: the same escaping).
escape = log_escape


class LogPlugin:
    """Logs each accepted message's envelope on ``bonzo.plugins.log``."""

    def __init__(self) -> None:
        self.logger = logging.getLogger("bonzo.plugins.log")
        self.level = logging.INFO

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate the ``[plugins.log]`` table."""
        table = dict(as_table(config))
        if isinstance(table.get("level"), str):
            table["level"] = table["level"].lower()  # any case, as [logging] level
        self.level = LEVELS[SCHEMA.parse(table, app)["level"]]

    def format(self, session: Session, envelope: Envelope) -> str:
        """The log line for an accepted message.

        ``from`` and ``to`` are the canonical addresses (the form the other
        bundled plugins match and store on); ``sent_from`` and ``sent_to``
        follow them, with the addresses as the client spelled them, only
        when some spelling differs from its canonical form."""
        sender = envelope.sender
        try:
            recipients = envelope_recipients(envelope)
        except ValueError:  # pragma: no cover - the core refuses such recipients
            recipients = []
        every = [r.canonical for r in recipients] or list(envelope.rcpt_tos)
        refused = getattr(envelope, "refused", {})
        removed = getattr(envelope, "removed", set())
        # Delivered to: not refused one by one, not removed by a plugin.
        kept = [i for i in range(len(every)) if i not in refused and i not in removed]
        canonical = [every[i] for i in kept]
        spelled = [envelope.rcpt_tos[i] for i in kept]
        line = (
            f"accepted session={escape(session.id)} ip={escape(session.remote_ip)}"
            f" helo={escape(session.helo, 255)} from=<{escape(sender.canonical)}>"
        )
        if sender.canonical != envelope.mail_from:
            line += f" sent_from=<{escape(envelope.mail_from)}>"
        line += " to=" + ",".join(f"<{escape(r)}>" for r in canonical)
        if canonical != spelled:
            line += " sent_to=" + ",".join(f"<{escape(r)}>" for r in spelled)
        line += f" nrcpt={len(kept)}"
        for name, which in (("refused", sorted(refused)), ("removed", sorted(removed))):
            if which:
                line += f" {name}=" + ",".join(f"<{escape(every[i])}>" for i in which)
        line += f" size={envelope.size} id={escape(envelope.id)}"
        msgid = _message_id(envelope)
        if msgid:
            # What a user who complains quotes: the line is found by it.
            line += f" msgid=<{escape(msgid, 255)}>"
        if envelope.quarantined is not None:
            # Kept in the quarantine, not delivered to the recipients.
            line += (
                f" quarantined_by={escape(envelope.quarantined_by, 100)}"
                f" reason={escape(envelope.quarantined, 255)}"
            )
        return line

    @hookimpl
    def bonzo_accepted(self, session: Session, envelope: Envelope) -> None:
        """Log the envelope and size of the message just accepted."""
        if self.logger.isEnabledFor(self.level):
            self.logger.log(self.level, "%s", self.format(session, envelope))


def _message_id(envelope: Envelope) -> str | None:
    """The message's ``Message-ID:`` field as it is delivered (the first
    one), or ``None``: none, or a header section too large to read."""
    try:
        headers = envelope.headers()
    except Exception:  # HeaderSectionTooLarge: the line goes without it
        return None
    for name, value in headers:
        if name.lower() == "message-id":
            text = " ".join(value.split())
            if text.startswith("<") and text.endswith(">"):
                text = text[1:-1]  # the line writes it in <>, as from= and to=
            return text or None
    return None

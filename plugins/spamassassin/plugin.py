"""Messages checked by SpamAssassin's spamd: its verdict, score and
``X-Spam-*`` headers; messages scoring ``reject_score`` or more refused.

See ``README.rst`` in this directory for the configuration.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from bonzo.errors import SMTPError
from bonzo.hookspecs import hookimpl
from bonzo.session import Envelope, Session

from .._config import as_table, check_keys, describe, get_bool, get_str
from .._scan import (
    Endpoint,
    ScanError,
    add_header,
    get_endpoint,
    get_on_error,
    get_seconds,
    get_size,
    message_chunks,
    record,
    tempfail,
    too_large,
)
from .client import spamd_request

__all__ = ["SpamassassinPlugin", "KEYS"]

log = logging.getLogger("bonzo.plugins.spamassassin")

KEYS = (
    "host",
    "port",
    "socket",
    "connect_timeout",
    "timeout",
    "max_size",
    "on_error",
    "user",
    "reject_score",
    "headers",
)
DEFAULT_PORT = 783
#: spamc's default: larger messages are not sent.
DEFAULT_MAX_SIZE = 500 * 1024
CHUNK_SIZE = 64 * 1024
#: The X-Spam-* headers a client may have put in to look checked: removed
#: before SpamAssassin's own are added.
SPAM_HEADERS = (
    "X-Spam-Flag",
    "X-Spam-Status",
    "X-Spam-Level",
    "X-Spam-Checker-Version",
    "X-Spam-Report",
)


def _score(table: Mapping[str, Any], key: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: expected a score (a number), got {describe(value)}")
    return float(value)


class SpamassassinPlugin:
    """Checks each message with spamd in :func:`~bonzo.hookspecs.bonzo_message`."""

    def __init__(self) -> None:
        self.endpoint = Endpoint(port=DEFAULT_PORT)
        self.connect_timeout = 5.0
        self.timeout = 30.0
        self.max_size = DEFAULT_MAX_SIZE
        self.accept_on_error = False
        self.user = ""
        self.reject_score = 0.0
        self.headers = True

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.spamassassin]``."""
        table = as_table(config)
        check_keys(table, KEYS)
        self.endpoint = get_endpoint(table, DEFAULT_PORT)
        self.connect_timeout = get_seconds(table, "connect_timeout", 5.0, 300)
        self.timeout = get_seconds(table, "timeout", 30.0)
        self.max_size = get_size(table, "max_size", DEFAULT_MAX_SIZE)
        self.accept_on_error = get_on_error(table)
        user = get_str(table, "user", "", empty=True).strip()
        if user and not re.fullmatch(r"[A-Za-z0-9_.@+-]{1,64}", user):
            raise ValueError(f"user: {describe(user)} is not a user name spamd accepts")
        self.user = user
        self.reject_score = _score(table, "reject_score", 0.0)
        if self.reject_score < 0:
            raise ValueError("reject_score: must be 0 (never refuse) or a positive score")
        self.headers = get_bool(table, "headers", True)

    @hookimpl
    async def bonzo_message(self, session: Session, envelope: Envelope) -> None:
        """Check the message; refuse it (``554 5.7.1``) at ``reject_score``,
        else add SpamAssassin's headers (see the README)."""
        if too_large(envelope, "spamassassin", self.max_size, log):
            return None
        try:
            reply = await spamd_request(
                self.endpoint,
                len(envelope.header_bytes) + envelope.size,
                message_chunks(envelope, CHUNK_SIZE),
                command="HEADERS" if self.headers else "CHECK",
                user=self.user,
                timeout=self.timeout,
                connect_timeout=self.connect_timeout,
            )
        except ScanError as exc:
            record(envelope, "spamassassin", "error", str(exc))
            if self.accept_on_error:
                log.warning(
                    "spamassassin: message %s (session %s) passed unchecked "
                    "(on_error = accept): %s",
                    envelope.id,
                    session.id,
                    exc,
                )
                return None
            log.warning(
                "spamassassin: message %s (session %s) deferred: %s",
                envelope.id,
                session.id,
                exc,
            )
            raise tempfail("spam filter unavailable") from None
        refuse = self.reject_score > 0 and reply.score >= self.reject_score
        result = "reject" if refuse else "spam" if reply.spam else "pass"
        record(
            envelope,
            "spamassassin",
            result,
            "spam" if reply.spam else "ham",
            score=reply.score,
            threshold=reply.threshold,
            tests=reply.tests,
        )
        log.info(
            "spamassassin: message %s (session %s): %s, score %.1f/%.1f",
            envelope.id,
            session.id,
            result,
            reply.score,
            reply.threshold,
        )
        if refuse:
            raise SMTPError(554, "Message refused as spam", enhanced_code="5.7.1")
        if self.headers:
            names = dict.fromkeys([*SPAM_HEADERS, *(n for n, _ in reply.headers)])
            for name in names:
                envelope.remove_header(name)
            for name, value in reply.headers:
                try:
                    add_header(envelope, name, value)
                except ValueError:
                    log.debug("spamassassin: header %s from spamd not added", name)
        return None

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
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session

from .._config import describe
from .._scan import (
    ENDPOINT_EXCLUSIVE,
    Endpoint,
    ScanError,
    add_header,
    endpoint_keys,
    endpoint_of,
    max_size_key,
    message_chunks,
    on_error_key,
    parse_blank_ok,
    record,
    tempfail,
    timeout_keys,
    too_large,
)
from .client import spamd_request

__all__ = ["SpamassassinPlugin", "KEYS"]

log = logging.getLogger("bonzo.plugins.spamassassin")

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


def _user(value: str) -> str:
    user = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.@+-]{1,64}", user):
        raise ValueError(f"{describe(user)} is not a user name spamd accepts")
    return user


#: The ``[plugins.spamassassin]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    *endpoint_keys(
        DEFAULT_PORT,
        socket="The path of spamd's Unix socket (spamd ``--socketpath``). Give "
        "either ``socket`` or ``host`` and ``port``.",
        host="spamd's address (``--listen``).",
        port="spamd's TCP port, 1 to 65535.",
    ),
    *timeout_keys(
        30.0,
        "How long the whole check may take. Keep it below the plugin's hook "
        "timeout (``[plugins] timeout``, 60 seconds by default).",
    ),
    max_size_key(
        DEFAULT_MAX_SIZE,
        "The largest message sent (512000 is ``\"500K\"``, ``spamc``'s "
        "default); K, M and G are powers of 1024. Larger messages go on "
        "unchecked.",
    ),
    on_error_key(
        "``\"tempfail\"`` defers the message when spamd gives no answer "
        "(``451 4.7.1``); ``\"accept\"`` lets it through."
    ),
    Key("user", "str", default="", convert=_user,
        doc="Sent as ``User:`` so that spamd applies that user's preferences "
        "(with ``--virtual-config-dir`` or SQL preferences): up to 64 letters, "
        "digits and ``_.@+-``. ``\"\"`` sends none."),
    Key("reject_score", "float", default=0.0, minimum=0,
        doc="Refuse messages scoring this or more; ``0`` never refuses (the "
        "message is only tagged). A value well above spamd's threshold "
        "(``required_score``, 5 by default), such as 15, refuses only what is "
        "surely spam."),
    Key("headers", "bool", default=True,
        doc="Add SpamAssassin's ``X-Spam-*`` headers. ``false`` asks spamd only "
        "for its verdict (``CHECK``) and leaves the message as it is."),
    exclusive=ENDPOINT_EXCLUSIVE,
)  # fmt: skip
KEYS = tuple(SCHEMA.names)


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
        values = parse_blank_ok(SCHEMA, config, app, blank=("user",))
        self.endpoint = endpoint_of(values)
        self.connect_timeout = values["connect_timeout"]
        self.timeout = values["timeout"]
        #: The longest one hook call waits for the daemon (checked against the
        #: hook time limit by ``bonzo check``).
        self.backend_timeout = self.timeout
        self.backend = str(self.endpoint)  # named when a hook runs out of time
        self.max_size = values["max_size"]
        self.accept_on_error = values["on_error"] == "accept"
        self.user = values["user"]
        self.reject_score = values["reject_score"]
        self.headers = values["headers"]

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

"""Messages scanned by clamd; a virus is refused with its signature's name.

See ``README.rst`` in this directory for the configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bonzo.errors import SMTPError
from bonzo.hookspecs import hookimpl
from bonzo.session import Envelope, Session

from .._config import as_table, check_keys
from .._scan import (
    Endpoint,
    ScanError,
    get_endpoint,
    get_on_error,
    get_seconds,
    get_size,
    message_chunks,
    record,
    sanitize,
    tempfail,
    too_large,
)
from .client import instream

__all__ = ["ClamavPlugin", "KEYS"]

log = logging.getLogger("bonzo.plugins.clamav")

KEYS = ("host", "port", "socket", "connect_timeout", "timeout", "max_size", "on_error")
#: clamd's port (clamd.conf ``TCPSocket``) when none is configured.
DEFAULT_PORT = 3310
#: Debian's clamd.conf sets ``StreamMaxLength 25M``.
DEFAULT_MAX_SIZE = 25 * 1024 * 1024
#: Octets read from the spool and sent to clamd at a time.
CHUNK_SIZE = 64 * 1024


class ClamavPlugin:
    """Scans each message with clamd in :func:`~bonzo.hookspecs.bonzo_message`."""

    def __init__(self) -> None:
        self.endpoint = Endpoint(port=DEFAULT_PORT)
        self.connect_timeout = 5.0
        self.timeout = 30.0
        self.max_size = DEFAULT_MAX_SIZE
        self.accept_on_error = False

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.clamav]``."""
        table = as_table(config)
        check_keys(table, KEYS)
        self.endpoint = get_endpoint(table, DEFAULT_PORT)
        self.connect_timeout = get_seconds(table, "connect_timeout", 5.0, 300)
        self.timeout = get_seconds(table, "timeout", 30.0)
        self.max_size = get_size(table, "max_size", DEFAULT_MAX_SIZE)
        self.accept_on_error = get_on_error(table)

    @hookimpl
    async def bonzo_message(self, session: Session, envelope: Envelope) -> None:
        """Scan the message; refuse it (``554 5.7.1``) if clamd finds
        something, answer ``451 4.7.1`` if clamd cannot say (unless
        ``on_error = "accept"``)."""
        if too_large(envelope, "clamav", self.max_size, log):
            return None
        try:
            reply = await instream(
                self.endpoint,
                message_chunks(envelope, CHUNK_SIZE),
                timeout=self.timeout,
                connect_timeout=self.connect_timeout,
            )
        except ScanError as exc:
            record(envelope, "clamav", "error", str(exc))
            if self.accept_on_error:
                log.warning(
                    "clamav: message %s (session %s) passed unscanned (on_error = accept): %s",
                    envelope.id,
                    session.id,
                    exc,
                )
                return None
            log.warning(
                "clamav: message %s (session %s) deferred: %s", envelope.id, session.id, exc
            )
            raise tempfail("virus scanner unavailable") from None
        if reply.signature is None:
            record(envelope, "clamav", "pass")
            return None
        signature = sanitize(reply.signature)
        record(envelope, "clamav", "fail", "virus found", signature=signature)
        log.info("clamav: message %s (session %s): %s found", envelope.id, session.id, signature)
        raise SMTPError(554, f"Message refused: virus found ({signature})", enhanced_code="5.7.1")

"""Messages scanned by clamd; a virus is refused with its signature's name.

See ``README.rst`` in this directory for the configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from bonzo.errors import SMTPError
from bonzo.hookspecs import hookimpl
from bonzo.schema import Schema
from bonzo.session import Envelope, Session

from .._scan import (
    ENDPOINT_EXCLUSIVE,
    Endpoint,
    ScanError,
    endpoint_keys,
    endpoint_of,
    max_size_key,
    message_chunks,
    on_error_key,
    record,
    sanitize,
    tempfail,
    timeout_keys,
    too_large,
)
from .client import instream

__all__ = ["ClamavPlugin", "KEYS"]

log = logging.getLogger("bonzo.plugins.clamav")

#: clamd's port (clamd.conf ``TCPSocket``) when none is configured.
DEFAULT_PORT = 3310
#: Debian's clamd.conf sets ``StreamMaxLength 25M``.
DEFAULT_MAX_SIZE = 25 * 1024 * 1024
#: The ``[plugins.clamav]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    *endpoint_keys(
        DEFAULT_PORT,
        socket="The path of clamd's Unix socket (clamd.conf ``LocalSocket``, "
        "``/run/clamav/clamd.ctl`` on Debian). Bonzo's user must be allowed to "
        "connect to it. Give either ``socket`` or ``host`` and ``port``.",
        host="clamd's address (clamd.conf ``TCPAddr``), when it listens on TCP.",
        port="clamd's TCP port (clamd.conf ``TCPSocket``), 1 to 65535.",
    ),
    *timeout_keys(
        30.0,
        "How long the whole scan may take, connecting and sending included. Keep "
        "it below the plugin's hook timeout (``[plugins] timeout``, 60 seconds by "
        "default), and the client's patience after the final dot (RFC 5321 asks "
        "clients to wait 10 minutes).",
    ),
    max_size_key(
        DEFAULT_MAX_SIZE,
        'The largest message sent to clamd (26214400 is ``"25M"``, the '
        "``StreamMaxLength`` of Debian's clamd.conf); K, M and G are powers of "
        "1024, as in clamd.conf. Larger messages are not scanned (see above).",
    ),
    on_error_key(
        'What happens when clamd gives no verdict: ``"tempfail"`` defers the '
        'message (``451 4.7.1``); ``"accept"`` lets it through unscanned.'
    ),
    exclusive=ENDPOINT_EXCLUSIVE,
)
KEYS = tuple(SCHEMA.names)
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
        values = SCHEMA.parse(config, app)
        self.endpoint = endpoint_of(values)
        self.connect_timeout = values["connect_timeout"]
        self.timeout = values["timeout"]
        #: The longest one hook call waits for the daemon (checked against the
        #: hook time limit by ``bonzo check``).
        self.backend_timeout = self.timeout
        self.backend = str(self.endpoint)  # named when a hook runs out of time
        self.max_size = values["max_size"]
        self.accept_on_error = values["on_error"] == "accept"

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

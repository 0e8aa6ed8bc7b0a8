"""One log line per connection when it closes, however it ended."""

import logging
import time

from bonzo import hookimpl

log = logging.getLogger("bonzo.plugins.connections")


class ConnectionLog:
    @hookimpl
    def bonzo_disconnect(self, session):
        log.info(
            "closed session=%s ip=%s messages=%d duration=%.1fs",
            session.id,
            session.remote_ip,
            session.messages,
            time.time() - session.started,
        )

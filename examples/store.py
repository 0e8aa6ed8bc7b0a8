"""A session handler: accept mail for local domains only and store each message.

Usage: ``python examples/store.py DIRECTORY``. Messages for other domains are
refused with ``550 5.7.1``, so the server is not an open relay. Each accepted
message is written to ``DIRECTORY/<id>.eml`` and made durable (file and
directory fsync'd) before the client is told ``250``.
"""

import os
import sys

from tornado.ioloop import IOLoop

from bonzo.connection import SessionHandler
from bonzo.errors import PermanentError
from bonzo.server import SMTPServer
from bonzo.settings import SMTPSettings

LOCAL_DOMAINS = {"example.org", "localhost"}


class StoreHandler(SessionHandler):
    def __init__(self, directory):
        self.directory = directory

    def on_rcpt(self, session, envelope, address, params):
        domain = address.rpartition("@")[2].lower()
        if address.lower() != "postmaster" and domain not in LOCAL_DOMAINS:
            raise PermanentError("Relay access denied", 554, "5.7.1")

    def on_message(self, session, envelope):
        path = os.path.join(self.directory, envelope.id + ".eml")
        with open(path + ".tmp", "wb") as f:
            envelope.write_to(f)  # the Received: header, then the message
            f.flush()
            os.fsync(f.fileno())
        os.rename(path + ".tmp", path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return f"Ok: stored as {envelope.id}"


if __name__ == "__main__":
    settings = SMTPSettings(max_message_size=10 * 1024 * 1024)
    server = SMTPServer(handler=StoreHandler(sys.argv[1]), settings=settings)
    server.listen(2525, "127.0.0.1")
    IOLoop.current().start()

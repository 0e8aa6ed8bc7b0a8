"""A plugin that accepts mail for local domains only and stores each message.

Usage: ``python examples/store.py DIRECTORY``. Messages for other domains are
refused with ``554 5.7.1 Relay access denied``, so the server is not an
open relay. Each accepted message is written to ``DIRECTORY/<id>.eml`` and
made durable (file and directory fsync'd) before the client is told
``250``.
"""

import os
import sys

from tornado.ioloop import IOLoop

from bonzo import Accept
from bonzo.errors import PermanentError
from bonzo.hooks import PluginSet
from bonzo.server import SMTPServer
from bonzo.settings import SMTPSettings

LOCAL_DOMAINS = {"example.org", "localhost"}


class StorePlugin:
    def __init__(self, directory):
        self.directory = directory

    def bonzo_rcpt(self, mailbox):
        # mailbox.domain is the canonical (lower-case, IDNA) domain: match on it.
        if mailbox.canonical != "postmaster" and mailbox.domain not in LOCAL_DOMAINS:
            raise PermanentError(554, "Relay access denied", "5.7.1")
        return Accept()

    def bonzo_deliver(self, envelope):
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
        return Accept(f"Ok: stored as {envelope.id}")


def make_server(directory):
    plugins = PluginSet()
    plugins.register(StorePlugin(directory), "store")
    settings = SMTPSettings(max_message_size=10 * 1024 * 1024)
    return SMTPServer(plugins=plugins, settings=settings)


if __name__ == "__main__":
    server = make_server(sys.argv[1])
    server.listen(2525, "127.0.0.1")
    IOLoop.current().start()

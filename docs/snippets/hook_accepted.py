"""Count accepted messages per sender domain (an observer: it cannot refuse)."""

import collections

from bonzo import hookimpl


class SenderCounts:
    def __init__(self):
        self.messages = collections.Counter()

    @hookimpl
    def bonzo_accepted(self, envelope):
        domain = envelope.mail_from.rpartition("@")[2].lower() or "<>"
        self.messages[domain] += 1

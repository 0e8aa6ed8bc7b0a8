"""Refuse the senders listed in the plugin's own configuration table."""

from bonzo import errors, hookimpl
from bonzo.schema import Key, Schema

SCHEMA = Schema(Key("senders", "addresses", default=[], doc="Senders to refuse."))


class SenderBlocklist:
    def __init__(self):
        self.senders = set()

    @hookimpl
    def bonzo_configure(self, config):
        values = SCHEMA.parse(config)  # a ValueError names the key
        # Canonical forms, so that no spelling gets past; case folded too,
        # since a blocklist treats Spammer@ and spammer@ alike.
        self.senders = {address.canonical.lower() for address in values["senders"]}

    @hookimpl
    def bonzo_mail(self, mailbox):
        if mailbox.canonical.lower() in self.senders:
            raise errors.PermanentError(550, "Sender refused", "5.7.1")

"""Refuse the senders listed in the plugin's own configuration table."""

from bonzo import errors, hookimpl


class SenderBlocklist:
    def __init__(self):
        self.senders = set()

    @hookimpl
    def bonzo_configure(self, config):
        for key in config:
            if key != "senders":
                raise ValueError(f"{key}: unknown key (known: senders)")
        senders = config.get("senders", [])
        if not isinstance(senders, list) or not all(isinstance(s, str) for s in senders):
            raise ValueError(f"senders: expected a list of addresses, got {senders!r}")
        self.senders = {s.lower() for s in senders}

    @hookimpl
    def bonzo_mail(self, address):
        if address.lower() in self.senders:
            raise errors.PermanentError(550, "Sender refused", "5.7.1")

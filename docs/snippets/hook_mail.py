"""Refuse senders at listed domains; never refuse the null sender."""

from bonzo import errors, hookimpl


class SenderDomains:
    def __init__(self, refused=("spam.example",)):
        self.refused = {domain.lower() for domain in refused}

    @hookimpl
    def bonzo_mail(self, envelope, address, params):
        if address == "":
            return None  # a bounce (MAIL FROM:<>): always let it in
        if address.rpartition("@")[2].lower() in self.refused:
            raise errors.PermanentError("Sender domain refused", 550, "5.7.1")
        # Per-message state goes in envelope.stash, under our own key.
        envelope.stash["sender_domains"] = {"declared_size": params.get("SIZE")}

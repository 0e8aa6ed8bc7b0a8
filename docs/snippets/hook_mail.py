"""Refuse senders at listed domains; never refuse the null sender."""

from bonzo import errors, hookimpl
from bonzo.address import canonical_domain


class SenderDomains:
    def __init__(self, refused=("spam.example",)):
        self.refused = {canonical_domain(domain) for domain in refused}

    @hookimpl
    def bonzo_mail(self, envelope, mailbox, params):
        if mailbox.is_null:
            return None  # a bounce (MAIL FROM:<>): always let it in
        if mailbox.domain in self.refused:  # canonical: no spelling gets past
            raise errors.PermanentError(550, "Sender domain refused", "5.7.1")
        # Per-message state goes in envelope.stash, under our own key.
        envelope.stash["sender_domains"] = {"declared_size": params.get("SIZE")}

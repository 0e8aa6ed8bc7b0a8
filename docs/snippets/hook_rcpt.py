"""Own the mailboxes of one domain: accept its users, refuse unknown ones."""

from bonzo import Accept, errors, hookimpl
from bonzo.address import canonical_domain


class LocalMailboxes:
    def __init__(self, domain="example.org", users=("alice", "bob")):
        # Configured names in the same canonical form as the addresses.
        self.domain = canonical_domain(domain)
        self.users = {user.lower() for user in users} | {"postmaster"}

    @hookimpl
    def bonzo_rcpt(self, mailbox):
        # Match on the canonical form: "bob@EXAMPLE.org", "bob@example。org"
        # and '"bob"@example.org' are all bob@example.org.
        if mailbox.domain != self.domain:
            return None  # not ours: another plugin may accept it, else 550 5.7.1
        if mailbox.local.lower() in self.users:
            return Accept()  # ours: Bonzo adds it to the envelope
        raise errors.PermanentError(550, "User unknown", "5.1.1")

"""Own the mailboxes of one domain: accept its users, refuse unknown ones."""

from bonzo import Accept, errors, hookimpl


class LocalMailboxes:
    def __init__(self, domain="example.org", users=("alice", "bob")):
        self.domain = domain.lower()
        self.users = {user.lower() for user in users} | {"postmaster"}

    @hookimpl
    def bonzo_rcpt(self, address):
        local, _, domain = address.rpartition("@")
        if domain.lower() != self.domain:
            return None  # not ours: another plugin may accept it, else 550 5.7.1
        if local.lower() in self.users:
            return Accept()  # ours: Bonzo adds it to envelope.rcpt_tos
        raise errors.PermanentError("User unknown", 550, "5.1.1")

"""My first Bonzo plugin: no mail for noreply@ addresses, a header on the rest."""

from bonzo import errors, hookimpl


class FirstPlugin:
    @hookimpl
    def bonzo_rcpt(self, mailbox):
        # mailbox is the recipient in canonical form: "noreply"@example.com
        # and noreply@EXAMPLE.com are the same address as noreply@example.com.
        if mailbox.local.lower() == "noreply":
            raise errors.PermanentError(550, "This address does not receive mail", "5.1.1")
        # Returning None means "no opinion": the next plugin (recipients) decides.

    @hookimpl
    def bonzo_message(self, session, envelope):
        envelope.add_header("X-First-Plugin", f"seen from {session.remote_ip}")

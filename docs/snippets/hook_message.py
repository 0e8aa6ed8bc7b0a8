"""A content filter: refuse messages without a From: header, tag the others."""

from bonzo import errors, hookimpl


class RequireFrom:
    @hookimpl
    def bonzo_message(self, envelope):
        if envelope.message["From"] is None:  # RFC 5322 3.6: From: is required
            raise errors.PermanentError(550, "Message has no From: header", "5.6.0")
        envelope.add_header("X-From-Checked", "yes")

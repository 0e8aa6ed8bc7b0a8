"""A bounce (null sender) goes to one recipient; refuse one sent to several."""

from bonzo import errors, hookimpl


class OneRecipientBounces:
    @hookimpl
    def bonzo_data(self, envelope):
        if envelope.mail_from == "" and len(envelope.rcpt_tos) > 1:
            raise errors.PermanentError(550, "A bounce has exactly one recipient", "5.7.1")

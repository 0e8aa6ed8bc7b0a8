"""Relay every message to one downstream server and answer with its verdicts."""

from bonzo import Accept
from bonzo.client import ClientSettings, Recipient, RecipientResult, deliver
from bonzo.errors import PermanentError, SMTPError, TransientError


def as_error(outcome: RecipientResult) -> SMTPError:
    """The downstream's refusal, as the error to give our own client."""
    text = outcome.text or "Refused downstream"
    code, enhanced = outcome.code, outcome.enhanced_code or None
    if outcome.deferred:
        # A 5xx can defer (a greeting of 554, say): our client must retry.
        if code // 100 != 4:
            code, enhanced = 451, "4.4.0"
        return TransientError(text, code, enhanced)
    return PermanentError(text, code, enhanced)


class RelayPlugin:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.settings = ClientSettings(helo_name="relay.example.net")

    def bonzo_rcpt(self, address):
        return Accept()

    async def bonzo_deliver(self, envelope):
        todo = [i for i in range(len(envelope.recipients)) if i not in envelope.refused]
        result = await deliver(
            self.host,
            self.port,
            sender=envelope.mail_from,
            recipients=[
                Recipient.from_params(envelope.rcpt_tos[i], envelope.rcpt_params[i]) for i in todo
            ],
            message=envelope,  # headers added here, then the (maybe spooled) body
            settings=self.settings,
            smtputf8="SMTPUTF8" in envelope.mail_params,
            eightbit=(envelope.mail_params.get("BODY") or "").upper() == "8BITMIME",
        )
        for i, outcome in zip(todo, result.recipients, strict=True):
            if not outcome.delivered:
                envelope.refuse_recipient(i, as_error(outcome))
        return Accept()

"""Refuse senders whose domain cannot receive mail (no such domain, no mail
host with an address, or a null MX), as Postfix's reject_unknown_sender_domain
does; a failed lookup defers instead."""

from bonzo import errors, hookimpl
from bonzo.dns import DNSError


class SenderMailHost:
    @hookimpl
    def bonzo_configure(self, app):
        if app is None or not app.dns.enabled:
            raise ValueError("needs DNS: set [dns] nameservers")
        self.dns = app.dns  # the one resolver of the process

    @hookimpl
    async def bonzo_mail(self, mailbox):
        if mailbox.is_null or not mailbox.domain:
            return None  # bounces and <postmaster> are always let in
        try:
            await self.dns.resolve_mx(mailbox.domain)
        except DNSError as exc:
            if exc.temporary:  # SERVFAIL, a timeout...: the client tries again later
                raise errors.TransientError(451, "Sender domain lookup failed", "4.4.3") from None
            # NXDomain, NoAddress, NullMX: it will not change by asking again.
            raise errors.PermanentError(550, "Sender domain accepts no mail", "5.1.8") from None
        return None

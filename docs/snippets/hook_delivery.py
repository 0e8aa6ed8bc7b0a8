"""Delivery policy for the queue: VIP mail through its own transport, no
bounces to no-reply senders, and a count of what became of each recipient."""

from collections import Counter

from bonzo import Accept, hookimpl


class DeliveryPolicy:
    def __init__(self, vip_domains=("board.example.org",)):
        self.vip_domains = set(vip_domains)
        self.outcomes = Counter()

    @hookimpl
    def bonzo_route(self, recipient):
        # A transport named in [plugins.queue.transports]; None: the route table.
        return "vip" if recipient.domain in self.vip_domains else None

    @hookimpl
    def bonzo_bounce(self, message):
        if message.sender.startswith("noreply@"):
            return Accept()  # taken over: nobody reads these
        return None

    @hookimpl
    def bonzo_delivered(self, recipients):
        self.outcomes["delivered"] += len(recipients)

    @hookimpl
    def bonzo_deferred(self, recipients):
        self.outcomes["deferred"] += len(recipients)

    @hookimpl
    def bonzo_bounced(self, recipients):
        self.outcomes["bounced"] += len(recipients)

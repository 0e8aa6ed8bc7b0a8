"""Refuse clients from listed networks before the greeting."""

import ipaddress

from bonzo import errors, hookimpl


class NetworkGate:
    def __init__(self, blocked=("192.0.2.0/24", "2001:db8::/32")):
        self.blocked = [ipaddress.ip_network(net) for net in blocked]

    @hookimpl
    def bonzo_connect(self, session):
        client = ipaddress.ip_address(session.remote_ip)
        if any(client in net for net in self.blocked):
            # Sent instead of the greeting; then Bonzo closes the connection.
            raise errors.PermanentError(554, "Your network is not welcome here", "5.7.1")
        # None: no opinion. The greeting is "220 <hostname> ESMTP".

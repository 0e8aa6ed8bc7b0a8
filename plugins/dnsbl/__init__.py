"""The ``dnsbl`` plugin: DNS block and allow lists (RFC 5782) for the
client's address at connect, with weights and a threshold; results on
``session.results``.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import DnsblPlugin, Zone, query_name

__all__ = ["DnsblPlugin", "Zone", "query_name"]

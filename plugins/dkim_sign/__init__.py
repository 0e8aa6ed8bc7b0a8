"""The ``dkim_sign`` plugin: outbound DKIM signing (RFC 6376, RFC 8463) with dkimpy.

See ``README.rst`` in this directory for its configuration.
:func:`dns_record` and :func:`zone_line` give the DNS record that publishes
a key (also ``python3 -m bonzo_plugins.dkim_sign KEYFILE SELECTOR DOMAIN``).
"""

from .keys import dns_record, load_key, zone_line
from .plugin import DkimSignPlugin

__all__ = ["DkimSignPlugin", "dns_record", "load_key", "zone_line"]

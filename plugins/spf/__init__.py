"""The ``spf`` plugin: SPF (RFC 7208) for the HELO and MAIL FROM identities,
with pyspf on Bonzo's resolver.

See ``README.rst`` in this directory for its configuration.
"""

from .evaluate import SPFOutcome, check_host
from .plugin import SpfPlugin

__all__ = ["SpfPlugin", "SPFOutcome", "check_host"]

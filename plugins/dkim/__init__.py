"""The ``dkim`` plugin: DKIM verification (RFC 6376) of received messages,
one result per signature, in bounded memory, on Bonzo's resolver; ARC
(RFC 8617) verification as a result.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import DkimPlugin

__all__ = ["DkimPlugin"]

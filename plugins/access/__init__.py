"""The ``access`` plugin: allow/deny rules by network, HELO name, sender, recipient.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import AccessPlugin

__all__ = ["AccessPlugin"]

"""The ``recipients`` plugin: local domains and users, and who may relay.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import RecipientsPlugin

__all__ = ["RecipientsPlugin"]

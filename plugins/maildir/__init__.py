"""The ``maildir`` plugin: durable delivery into Maildir folders.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import MaildirPlugin

__all__ = ["MaildirPlugin"]

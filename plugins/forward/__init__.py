"""The ``forward`` plugin: pass each message to one downstream SMTP server
during the client's session, and answer the client with its verdicts.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import ForwardPlugin

__all__ = ["ForwardPlugin"]

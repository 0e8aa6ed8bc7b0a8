"""The ``log`` plugin: one log line per accepted message.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import LogPlugin

__all__ = ["LogPlugin"]

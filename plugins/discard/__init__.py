"""The ``discard`` plugin: accept every message and throw it away.

See ``README.rst`` in this directory.
"""

from .plugin import DiscardPlugin

__all__ = ["DiscardPlugin"]

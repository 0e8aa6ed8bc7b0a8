"""The ``headers`` plugin: add and remove message headers.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import HeadersPlugin

__all__ = ["HeadersPlugin"]

"""The ``queue`` plugin: a durable queue that delivers by route, retries and bounces.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import QueuePlugin

__all__ = ["QueuePlugin"]

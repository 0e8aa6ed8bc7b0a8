"""The ``ratelimit`` plugin: limits per client network, sender, recipient
domain and authenticated user, at connect, AUTH, MAIL and RCPT, in sliding
windows.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import RateLimitPlugin

__all__ = ["RateLimitPlugin"]

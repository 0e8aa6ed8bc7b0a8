"""The ``greylist`` plugin: a temporary refusal for the first attempt of each
(client network, sender, recipient) triplet.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import GreylistPlugin

__all__ = ["GreylistPlugin"]

"""The ``milter`` plugin: ask milters (OpenDKIM, OpenDMARC, clamav-milter,
rspamd's milter proxy, ...) about each stage of a session, with the Sendmail
milter protocol (version 6, :mod:`bonzo.milter`).

See ``README.rst`` in this directory for the configuration and the mapping
of each milter stage and action to what Bonzo does.
"""

from .plugin import MilterPlugin

__all__ = ["MilterPlugin"]

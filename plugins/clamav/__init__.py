"""The ``clamav`` plugin: messages scanned by clamd (INSTREAM)."""

from .client import ClamdReply, instream
from .plugin import ClamavPlugin

__all__ = ["ClamavPlugin", "ClamdReply", "instream"]

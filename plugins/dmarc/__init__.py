"""The ``dmarc`` plugin: DMARC (RFC 7489) with the Organizational Domain by the
DNS Tree Walk of RFC 9989, enforcing the domain's policy as the operator
chooses (reject, quarantine or tag). Reports are not sent.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import DmarcPlugin
from .policy import Discovery, Record, parse_record, targets

__all__ = ["DmarcPlugin", "Discovery", "Record", "parse_record", "targets"]

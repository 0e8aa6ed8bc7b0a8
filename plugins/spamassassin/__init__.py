"""The ``spamassassin`` plugin: messages checked by SpamAssassin's spamd."""

from .client import SpamdReply, parse_reply, spamd_request
from .plugin import SpamassassinPlugin

__all__ = ["SpamassassinPlugin", "SpamdReply", "parse_reply", "spamd_request"]

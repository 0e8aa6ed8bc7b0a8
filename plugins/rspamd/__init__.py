"""The ``rspamd`` plugin: messages checked by rspamd (HTTP ``/checkv2``)."""

from .plugin import RspamdPlugin, RspamdReply, parse_reply

__all__ = ["RspamdPlugin", "RspamdReply", "parse_reply"]

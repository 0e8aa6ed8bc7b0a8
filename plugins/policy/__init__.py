"""The ``policy`` plugin: a Postfix policy-delegation client (postgrey, ...)."""

from .client import PolicyAction, parse_action, policy_request
from .plugin import PolicyPlugin

__all__ = ["PolicyAction", "PolicyPlugin", "parse_action", "policy_request"]

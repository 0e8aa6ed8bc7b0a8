"""The Postfix policy delegation protocol (Postfix's SMTPD_POLICY_README),
client side, on asyncio: written here, the protocol is a few lines.

A request is ``name=value`` lines ending with an empty line; the server
answers ``action=...`` and an empty line (other attributes are ignored, as
Postfix does). One connection carries one request here (postgrey and most
policy servers also keep a connection for several).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .._scan import Endpoint, ScanError, close_stream, open_stream

__all__ = ["MAX_ANSWER", "PolicyAction", "encode_request", "parse_action", "policy_request"]

#: The longest answer read (Postfix's own limit on an attribute is larger,
#: but an action is one short line).
MAX_ANSWER = 8192
_ACTION = re.compile(r"([A-Za-z_]+|[45]\d\d)(?:[ \t]+(.*))?", re.S)


@dataclass(frozen=True)
class PolicyAction:
    """The server's ``action``: its ``verb`` (upper-case, such as ``DUNNO``,
    ``REJECT``, ``450``) and the ``text`` after it (``""`` when none)."""

    verb: str
    text: str


def _value(value: str) -> str:
    # A value must stay on its line: no line break, no NUL.
    return "".join(c if c not in "\r\n\0" else "?" for c in value)


def encode_request(attributes: Mapping[str, str]) -> bytes:
    """A request: one ``name=value`` line per attribute, then an empty line."""
    lines = [f"{name}={_value(value)}\n" for name, value in attributes.items()]
    return ("".join(lines) + "\n").encode("utf-8", "replace")


def parse_action(raw: bytes) -> PolicyAction:
    """The action of a server's answer; :class:`ScanError` when there is
    none or it does not parse."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ScanError("the policy server's answer is not UTF-8") from None
    action = None
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line:
            break
        name, sep, value = line.partition("=")
        if not sep:
            raise ScanError(
                f"the policy server answered a line that is no attribute: {line[:80]!r}"
            )
        if name.strip().lower() == "action":
            action = value.strip()
    if not action:
        raise ScanError("the policy server's answer has no action")
    m = _ACTION.fullmatch(action)
    if m is None:
        raise ScanError(f"the policy server's action does not parse: {action[:80]!r}")
    return PolicyAction(m.group(1).upper(), (m.group(2) or "").strip())


async def _exchange(
    endpoint: Endpoint, attributes: Mapping[str, str], connect_timeout: float
) -> PolicyAction:
    reader, writer = await open_stream(endpoint, connect_timeout)
    try:
        writer.write(encode_request(attributes))
        await writer.drain()
        data = b""
        while b"\n\n" not in data.replace(b"\r\n", b"\n"):
            piece = await reader.read(MAX_ANSWER)
            if not piece:
                if not data:
                    raise ScanError("the policy server closed the connection without an answer")
                raise ScanError("the policy server's answer ends early")
            data += piece
            if len(data) > MAX_ANSWER:
                raise ScanError(f"the policy server's answer is longer than {MAX_ANSWER} octets")
        return parse_action(data)
    except (ConnectionError, OSError) as exc:
        raise ScanError(f"{endpoint}: connection lost: {exc}") from None
    finally:
        await close_stream(writer)


async def policy_request(
    endpoint: Endpoint,
    attributes: Mapping[str, str],
    *,
    timeout: float,
    connect_timeout: float = 5.0,
) -> PolicyAction:
    """Ask the policy server at ``endpoint`` about ``attributes`` and return
    its action, within ``timeout`` seconds in all. Raises :class:`ScanError`."""
    try:
        return await asyncio.wait_for(_exchange(endpoint, attributes, connect_timeout), timeout)
    except asyncio.TimeoutError:
        raise ScanError(f"{endpoint}: no answer within {timeout:g}s") from None

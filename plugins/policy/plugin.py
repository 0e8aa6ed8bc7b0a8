"""A Postfix policy-delegation client: one request per ``RCPT``, the
server's action mapped to Bonzo's reply.

See ``README.rst`` in this directory for the configuration and the table
of actions.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from bonzo.address import Address
from bonzo.errors import SMTPError
from bonzo.hookspecs import Discard, Quarantine, hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session

from .._scan import (
    ENDPOINT_EXCLUSIVE,
    Endpoint,
    ScanError,
    add_header,
    endpoint_keys,
    endpoint_of,
    on_error_key,
    record,
    tempfail,
    timeout_keys,
)
from .client import PolicyAction, policy_request

__all__ = ["PolicyPlugin", "KEYS", "request_attributes", "reply_for"]

log = logging.getLogger("bonzo.plugins.policy")

#: postgrey's port (``--inet=10023``).
DEFAULT_PORT = 10023
#: Where the plugin keeps what it must do at the end of the message.
STASH = "policy"
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?:[ \t]+(.*))?", re.S)
_HEADER = re.compile(r"([!-9;-~]{1,76}):[ \t]*(.*)", re.S)
#: Actions that leave the decision to the plugins after this one.
NEUTRAL = ("OK", "DUNNO", "DEFER_IF_REJECT")
#: The most results the plugin records for one message.
MAX_RESULTS = 100
#: Postfix actions Bonzo has no counterpart for: logged, then like DUNNO.
UNSUPPORTED = ("REDIRECT", "FILTER", "BCC", "DELAY")


def _attributes(table: dict[str, Any]) -> dict[str, str]:
    for name, value in table.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name) or not isinstance(value, str):
            raise ValueError(f".{name}: expected a lower-case name and a string value")
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f".{name}: the value must be one line")
    return table


#: The ``[plugins.policy]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    *endpoint_keys(
        DEFAULT_PORT,
        socket="The path of the server's Unix socket (postgrey ``--unix=PATH``). "
        "Give either ``socket`` or ``host`` and ``port``.",
        host="The server's address.",
        port="The server's TCP port (10023 is postgrey's), 1 to 65535.",
    ),
    *timeout_keys(
        10.0,
        "How long one request may take. It is spent for each ``RCPT``; keep it "
        "well below the plugin's hook timeout.",
    ),
    on_error_key(
        "``\"tempfail\"`` defers the recipient when the server gives no answer "
        "(``451 4.7.1``); ``\"accept\"`` passes it on to the next plugin."
    ),
    Key("attributes", "table", default={}, convert=_attributes,
        doc="More attributes to send with every request, such as "
        "``{ policy_context = \"inbound\" }`` (Postfix's ``policy_context``): "
        "lower-case names (letters, digits, ``_``) and one-line string values."),
    exclusive=ENDPOINT_EXCLUSIVE,
)  # fmt: skip
KEYS = tuple(SCHEMA.names)


def _text(value: str, limit: int = 200) -> str:
    """Printable ASCII, for a reply line."""
    text = "".join(c if " " <= c <= "~" else "?" for c in value)
    return " ".join(text.split())[:limit]


def reply_for(action: PolicyAction, default_code: int, default_enhanced: str) -> SMTPError:
    """The SMTP reply of a refusing action: ``REJECT``/``DEFER`` with
    Postfix's codes, or ``4NN``/``5NN`` with the server's (and an enhanced
    code when the text starts with one of the same class)."""
    code = int(action.verb) if action.verb.isdigit() else default_code
    text = _text(action.text)
    enhanced = default_enhanced if str(code)[0] == default_enhanced[0] else f"{str(code)[0]}.7.1"
    m = _ENHANCED.fullmatch(text)
    if m and m.group(1) == str(code)[0]:
        enhanced = f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"
        text = (m.group(4) or "").strip()
    if not text:
        text = "Access denied" if code >= 500 else "Try again later"
    return SMTPError(code, text, enhanced_code=enhanced)


def request_attributes(
    session: Session,
    envelope: Envelope,
    recipient: str,
    extra: Mapping[str, str],
) -> dict[str, str]:
    """The attributes of one ``RCPT`` request, as Postfix's smtpd sends them
    (those Bonzo knows; ``client_name`` is ``unknown``: Bonzo does no reverse
    lookup here)."""
    tls = session.tls or {}
    attributes = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP" if session.esmtp else "SMTP",
        "client_address": session.remote_ip,
        "client_name": "unknown",
        "reverse_client_name": "unknown",
        "helo_name": session.helo or "",
        "sender": envelope.mail_from,
        "recipient": recipient,
        "recipient_count": str(len(envelope.rcpt_tos)),
        "queue_id": envelope.id,
        "instance": f"{session.id}.{envelope.id}",
        "size": str(envelope.mail_params.get("SIZE") or 0),
        "sasl_method": "",
        "sasl_username": session.auth or "",
        "sasl_sender": "",
        "encryption_protocol": str(tls.get("version") or ""),
        "encryption_cipher": str(tls.get("cipher") or ""),
        "encryption_keysize": str(tls.get("bits") or ""),
        "server_address": session.local_ip or "",
        "server_port": str(session.local_port or ""),
    }
    attributes.update(extra)
    return attributes


class PolicyPlugin:
    """Asks a policy server about each recipient in
    :func:`~bonzo.hookspecs.bonzo_rcpt`."""

    #: Never accepts a recipient (DUNNO and OK let the next plugin decide).
    accepts = ()

    def __init__(self) -> None:
        self.endpoint = Endpoint(port=DEFAULT_PORT)
        self.connect_timeout = 5.0
        self.timeout = 10.0
        self.accept_on_error = False
        self.attributes: dict[str, str] = {}

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.policy]``."""
        values = SCHEMA.parse(config, app)
        self.endpoint = endpoint_of(values)
        self.connect_timeout = values["connect_timeout"]
        self.timeout = values["timeout"]
        #: The longest one hook call waits for the daemon (checked against the
        #: hook time limit by ``bonzo check``).
        self.backend_timeout = self.timeout
        self.backend = str(self.endpoint)  # named when a hook runs out of time
        self.accept_on_error = values["on_error"] == "accept"
        self.attributes = dict(values["attributes"])

    @hookimpl
    async def bonzo_rcpt(
        self,
        session: Session,
        envelope: Envelope,
        address: str,
        params: dict[str, Any],
        mailbox: Address,
        dsn: Any,
    ) -> Any:
        """Ask about this recipient; refuse, defer or note what the server
        says (see the README); no verdict otherwise."""
        attributes = request_attributes(session, envelope, mailbox.original, self.attributes)
        try:
            action = await policy_request(
                self.endpoint,
                attributes,
                timeout=self.timeout,
                connect_timeout=self.connect_timeout,
            )
        except ScanError as exc:
            self.note(envelope, "error", str(exc), recipient=mailbox.original)
            if self.accept_on_error:
                log.warning(
                    "policy: session %s, %s: no answer, passed on (on_error = accept): %s",
                    session.id,
                    mailbox.original,
                    exc,
                )
                return None
            log.warning("policy: session %s, %s: deferred: %s", session.id, mailbox.original, exc)
            raise tempfail("policy service unavailable") from None
        return self.act(session, envelope, mailbox.original, action)

    @staticmethod
    def note(envelope: Envelope, result: str, reason: str, **details: Any) -> None:
        """Record a result: every refusal and note, a pass once per message,
        and at most :data:`MAX_RESULTS` in all (a client may send many
        recipients)."""
        mine = envelope.results.all("policy")
        if len(mine) >= MAX_RESULTS or (result == "pass" and mine):
            return
        record(envelope, "policy", result, reason, **details)

    def act(
        self, session: Session, envelope: Envelope, recipient: str, action: PolicyAction
    ) -> Any:
        """Apply ``action`` to the recipient (see the README's table)."""
        verb, text = action.verb, _text(action.text)
        details = {"recipient": recipient, "action": f"{verb} {text}".strip()}
        log.debug("policy: session %s, %s: %s %s", session.id, recipient, verb, text)
        if verb in NEUTRAL:
            self.note(envelope, "pass", verb.lower(), **details)
            return None
        if verb == "REJECT" or (verb.isdigit() and verb[0] == "5"):
            self.note(envelope, "reject", text, **details)
            raise reply_for(action, 554, "5.7.1")
        if verb in ("DEFER", "DEFER_IF_PERMIT") or (verb.isdigit() and verb[0] == "4"):
            self.note(envelope, "defer", text, **details)
            raise reply_for(action, 450, "4.7.1")
        later = envelope.stash.setdefault(STASH, {"headers": [], "verdict": None})
        if verb == "PREPEND":
            m = _HEADER.fullmatch(action.text.strip())
            if m is None or any(c in m.group(2) for c in "\r\n\0"):
                log.warning("policy: PREPEND without a usable header: %r", action.text[:80])
            elif (m.group(1), m.group(2)) not in later["headers"]:
                # One header for the message, however many recipients asked.
                later["headers"].append((m.group(1), m.group(2)))
            self.note(envelope, "pass", "prepend", **details)
            return None
        if verb in ("DISCARD", "HOLD"):
            later["verdict"] = (verb, text)
            self.note(envelope, verb.lower(), text, **details)
            return None
        if verb in ("WARN", "INFO"):
            log.log(
                logging.WARNING if verb == "WARN" else logging.INFO,
                "policy: session %s, %s: %s",
                session.id,
                recipient,
                text,
            )
            self.note(envelope, "pass", verb.lower(), **details)
            return None
        if verb in UNSUPPORTED:
            log.warning("policy: action %s is not supported by Bonzo: ignored", verb)
            self.note(envelope, "pass", "unsupported", **details)
            return None
        # Postfix answers "451 4.3.5 Server configuration error" here.
        self.note(envelope, "error", f"unknown action {verb}", **details)
        log.warning("policy: session %s: unknown action %r", session.id, verb)
        if self.accept_on_error:
            return None
        raise tempfail("policy service error")

    @hookimpl
    def bonzo_message(self, session: Session, envelope: Envelope) -> Any:
        """Add the headers the server asked for (``PREPEND``) and discard or
        quarantine the message if it said ``DISCARD`` or ``HOLD``."""
        later = envelope.stash.get(STASH)
        if not later:
            return None
        for name, value in later["headers"]:
            try:
                add_header(envelope, name, value)
            except ValueError:
                log.warning("policy: header %s not added", name)
        verdict = later["verdict"]
        if verdict is None:
            return None
        verb, text = verdict
        if verb == "DISCARD":
            return Discard()
        return Quarantine(f"policy service: HOLD {text}".strip())

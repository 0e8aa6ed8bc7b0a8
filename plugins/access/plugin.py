"""Allow/deny rules on the client's network, HELO name, sender and recipients."""

from __future__ import annotations

import fnmatch
import logging
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bonzo.address import Address, canonical_domain, canonical_local
from bonzo.errors import SMTPError
from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Session

from .._config import (
    DOTS,
    IPNetwork,
    client_address,
    config_domain,
    describe,
    parse_network,
)

__all__ = ["AccessPlugin", "Reply", "Rule", "canonical_pattern", "parse_reply"]

log = logging.getLogger("bonzo.plugins.access")

STAGES = ("connect", "helo", "mail", "rcpt")
ACTIONS = ("allow", "deny")
DEFAULT_REPLY = "554 5.7.1 Access denied"

_LOOKS_ENHANCED = re.compile(r"[0-9]+\.[0-9.]*(?:\s|$)")
_REPLY = re.compile(r"(\d{3})(?: ([0-9]\.[0-9]{1,3}\.[0-9]{1,3}))?(?: (.*))?", re.DOTALL)
_GLOB = frozenset("*?[")
_LABEL_SEPARATOR = re.compile(f"[{DOTS}]")


@dataclass(frozen=True)
class Reply:
    """A parsed reply such as ``554 5.7.1 Access denied``."""

    code: int
    enhanced: str | None
    text: str

    def error(self) -> SMTPError:
        """The :class:`SMTPError` that gives this reply."""
        return SMTPError(self.code, self.text, enhanced_code=self.enhanced)


def _reply(value: str) -> Reply:
    """Parse ``"<4xx|5xx> [<enhanced code>] [text]"`` (a ``convert=``: the
    :class:`ValueError` does not name the key)."""
    m = _REPLY.fullmatch(value.strip())
    if m is None:
        raise ValueError(f"{describe(value)} is not a reply like '554 5.7.1 Access denied'")
    code, enhanced, text = int(m.group(1)), m.group(2), (m.group(3) or "").strip()
    if not 400 <= code <= 599:
        raise ValueError(f"the code must be 4xx or 5xx, got {code}")
    if enhanced is not None and enhanced[0] != str(code)[0]:
        raise ValueError(f"enhanced code {enhanced} does not match the code {code}")
    if enhanced is None and _LOOKS_ENHANCED.match(text):
        raise ValueError(f"{describe(value)} is not a reply: bad enhanced code")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("the text must not contain control characters")
    if len(text) > 400:
        raise ValueError("the text is longer than 400 characters")
    return Reply(code, enhanced, text or "Access denied")


def parse_reply(value: Any, where: str) -> Reply:
    """Parse ``"<4xx|5xx> [<enhanced code>] [text]"``; raise ValueError naming ``where``."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {describe(value)}")
    try:
        return _reply(value)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _patterns(items: list[str]) -> list[str]:
    if not items:
        raise ValueError("expected a string or a non-empty list of strings, got []")
    return items


def _reply_of_deny_only(rule: dict[str, Any]) -> None:
    if rule["reply"] is not None and rule["action"] != "deny":
        raise ValueError("reply: only a deny rule has a reply")


#: The keys of each ``[[plugins.access.rules]]`` table.
RULE = Schema(
    Key("stage", "choice", required=True, choices=STAGES,
        doc="The stage whose value is matched (see above)."),
    Key("match", "strings", required=True, convert=_patterns,
        doc="What to match: a network, a glob or an ``re:`` regex, as the stage "
        "wants (see above); a single string, or a non-empty list whose "
        "patterns the rule matches if any does. An empty pattern is an error "
        "(the null sender is ``<>``)."),
    Key("action", "choice", required=True, choices=ACTIONS,
        doc="``deny`` refuses the command; ``allow`` stops this stage's rules "
        "without a verdict."),
    Key("reply", "str", convert=_reply,
        doc="For ``deny`` rules only: the reply, written "
        "``\"<code> [<enhanced code>] [<text>]\"``, e.g. "
        "``\"554 5.7.1 Access denied\"`` or ``\"450 4.7.1 Try again later\"``. "
        "The code must be ``4xx`` or ``5xx`` and the enhanced code (RFC 3463) "
        "of the same class; the text is printable, on one line, at most 400 "
        "characters. Default: ``default_reply``."),
    check=_reply_of_deny_only,
)  # fmt: skip
#: The ``[plugins.access]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("rules", "tables", default=[], schema=RULE,
        doc="The rules, written as ``[[plugins.access.rules]]`` tables, tried in "
        "order within each stage."),
    Key("default_reply", "str", default=DEFAULT_REPLY, convert=_reply,
        doc="The reply of ``deny`` rules that have none."),
)  # fmt: skip
KEYS = tuple(SCHEMA.names)
RULE_KEYS = tuple(RULE.names)


def _one_or_many(config: Any) -> Any:
    """``config`` with each rule's single ``match`` string as a list of one,
    so that the schema checks one form."""
    if not isinstance(config, Mapping) or not isinstance(config.get("rules"), list):
        return config
    rules = [
        {**rule, "match": [rule["match"]]}
        if isinstance(rule, Mapping) and isinstance(rule.get("match"), str)
        else rule
        for rule in config["rules"]
    ]
    return {**config, "rules": rules}


@dataclass(frozen=True)
class Rule:
    """One ``[[plugins.access.rules]]`` entry, compiled."""

    index: int
    stage: str
    action: str
    reply: Reply | None
    networks: tuple[IPNetwork, ...] = ()
    patterns: tuple[re.Pattern[str], ...] = ()

    def matches(self, value: str) -> bool:
        """True if the client's address (connect) or ``value`` matches the rule.

        At ``mail`` and ``rcpt`` ``value`` is the canonical address
        (:attr:`bonzo.address.Address.canonical`). Patterns match without
        regard to case: ``value`` and its lower-case form are both tried, so a
        rule matches every address that the ``maildir`` plugin would store in
        the same folder (it folds local parts with :meth:`str.lower`).
        """
        if self.stage == "connect":
            address = client_address(value)
            return address is not None and any(
                address.version == n.version and address in n for n in self.networks
            )
        folded = value.lower()
        if folded == value:
            return any(p.fullmatch(value) for p in self.patterns)
        return any(p.fullmatch(value) or p.fullmatch(folded) for p in self.patterns)


def _canonical_glob_domain(domain: str, pattern: str, where: str) -> str:
    """The domain part of an address glob in canonical form: the whole domain
    when it has no wildcard, else each label that has none. A final dot is
    dropped either way (canonical domains have none)."""
    if not any(c in _GLOB for c in domain):
        try:
            return config_domain(domain)
        except ValueError as exc:
            raise ValueError(f"{where}: {describe(pattern)}: {exc}") from None
    labels = []
    # As config_domain does for a domain without wildcards.
    for label in _LABEL_SEPARATOR.split(domain.rstrip(DOTS)):
        if any(c in _GLOB for c in label):
            if not label.isascii():
                raise ValueError(
                    f"{where}: {describe(pattern)}: a domain label with both a wildcard and "
                    "non-ASCII characters cannot match the canonical (xn--) form of a domain; "
                    "write the label without the wildcard, or in its xn-- form"
                )
            labels.append(label.lower())
        elif label:
            try:
                labels.append(canonical_domain(label))
            except ValueError as exc:
                raise ValueError(f"{where}: {describe(pattern)}: {exc}") from None
        else:
            labels.append(label)
    return ".".join(labels)


def canonical_pattern(pattern: str, where: str = "match") -> str:
    """A ``mail``/``rcpt`` glob rewritten in the canonical form of addresses
    (:mod:`bonzo.address`), so that it matches every spelling of the
    addresses it names: the local part (before the last ``@``) unquoted where
    quoting is not needed and in Unicode normal form C; the domain through the
    IDNA/UTS 46 mapping in lower-case A-labels, whole when it has no wildcard,
    else label by label (labels with a wildcard must then be ASCII).

    ``'"ceo"@ＥＸＡＭＰＬＥ。com'`` becomes ``'ceo@example.com'`` and
    ``'*@*.bücher.example'`` becomes ``'*@*.xn--bcher-kva.example'``. A
    pattern without ``@`` is only put in normal form C. Raises
    :class:`ValueError` naming ``where`` for a domain with no IDNA form.
    """
    at = pattern.rfind("@")
    if at < 0:
        return unicodedata.normalize("NFC", pattern)
    local, domain = pattern[:at], pattern[at + 1 :]
    if (len(local) >= 2 and local[0] == local[-1] == '"') or not local.startswith('"'):
        local = canonical_local(local)  # a quoted string, or no quotes at all
    return f"{local}@{_canonical_glob_domain(domain, pattern, where)}"


def _bare_name(name: str) -> str:
    """A HELO name or glob without its final dot (``evil.example.`` is the
    fully qualified spelling of ``evil.example``); ``.`` stays as it is."""
    return name[:-1] if name.endswith(".") and len(name) > 1 else name


def _compile_pattern(pattern: str, stage: str, where: str) -> re.Pattern[str]:
    if pattern.startswith("re:"):
        if stage in ("mail", "rcpt") and not pattern.isascii():
            log.warning(
                "access: %s: the regular expression %s has non-ASCII characters; it is "
                "matched against canonical addresses, whose domains are lower-case ASCII "
                "(xn--... for internationalised names)",
                where,
                ascii(pattern),
            )
        try:
            return re.compile(pattern[3:], re.IGNORECASE)
        except re.error as exc:
            raise ValueError(
                f"{where}: bad regular expression {describe(pattern)}: {exc}"
            ) from None
    if pattern == "<>":  # the null sender
        return re.compile("")
    if stage in ("mail", "rcpt"):
        pattern = canonical_pattern(pattern, where)
    elif stage == "helo":
        pattern = _bare_name(pattern)  # matched against names without theirs
    return re.compile(fnmatch.translate(pattern.lower()), re.IGNORECASE)


def _compile_rule(index: int, entry: Mapping[str, Any], default: Reply) -> Rule:
    """A parsed rule (``RULE``) compiled: its patterns or networks."""
    where = f"rules[{index}]"
    stage, action, items = entry["stage"], entry["action"], entry["match"]
    reply: Reply | None = entry["reply"]
    if reply is None and action == "deny":
        reply = default
    if stage == "connect":
        networks = tuple(parse_network(i, f"{where}.match") for i in items)
        return Rule(index, stage, action, reply, networks=networks)
    patterns = tuple(_compile_pattern(i, stage, f"{where}.match") for i in items)
    return Rule(index, stage, action, reply, patterns=patterns)


class AccessPlugin:
    """Applies the first matching allow/deny rule of each stage.

    ``allow`` gives no verdict (the next plugin decides, and a recipient
    still needs an owner such as ``recipients``); ``deny`` refuses with the
    rule's reply.
    """

    #: The decision hooks where it can accept: none (it refuses or has no
    #: opinion), so ``bonzo check`` warns when no other plugin can accept.
    accepts = ()

    def __init__(self) -> None:
        self.rules: dict[str, list[Rule]] = {stage: [] for stage in STAGES}
        self.default_reply = parse_reply(DEFAULT_REPLY, "default_reply")

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate the ``[plugins.access]`` table and compile its rules."""
        values = SCHEMA.parse(_one_or_many(config), app)
        default = values["default_reply"]
        if not isinstance(default, Reply):  # the declared default, not converted
            default = _reply(default)
        rules: dict[str, list[Rule]] = {stage: [] for stage in STAGES}
        for index, entry in enumerate(values["rules"]):
            rule = _compile_rule(index, entry, default)
            rules[rule.stage].append(rule)
        self.rules = rules
        self.default_reply = default

    def check(self, session: Session, stage: str, value: str, sent: str | None = None) -> None:
        """Apply the rules of ``stage`` to ``value`` (the canonical address at
        ``mail`` and ``rcpt``): return on allow or no match, raise the rule's
        :class:`SMTPError` on deny. ``sent`` is the value as the client spelled
        it, for the log."""
        for rule in self.rules[stage]:
            if not rule.matches(value):
                continue
            if rule.action == "allow":
                return
            assert rule.reply is not None
            log.info(
                "[%s %s] %s %s%s denied by rules[%d]",
                session.id,
                session.remote_ip,
                stage,
                ascii(value),
                f" (sent as {ascii(sent)})" if sent is not None and sent != value else "",
                rule.index,
            )
            raise rule.reply.error()

    @hookimpl
    def bonzo_connect(self, session: Session) -> None:
        """Rules of stage ``connect`` on the client's address."""
        self.check(session, "connect", session.remote_ip)

    @hookimpl
    def bonzo_helo(self, session: Session, name: str) -> None:
        """Rules of stage ``helo`` on the HELO/EHLO name, without its final
        dot (``evil.example.`` is the fully qualified ``evil.example``)."""
        self.check(session, "helo", _bare_name(name), name)

    @hookimpl
    def bonzo_mail(self, session: Session, mailbox: Address) -> None:
        """Rules of stage ``mail`` on the sender's canonical address (``""``
        for the null sender)."""
        self.check(session, "mail", mailbox.canonical, mailbox.original)

    @hookimpl
    def bonzo_rcpt(self, session: Session, mailbox: Address) -> None:
        """Rules of stage ``rcpt`` on each recipient's canonical address."""
        self.check(session, "rcpt", mailbox.canonical, mailbox.original)

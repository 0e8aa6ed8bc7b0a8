"""DMARC (RFC 7489, with the RFC 9989 tree walk): does SPF or DKIM vouch for
the author's domain, and what does the domain ask for when neither does?

In :func:`~bonzo.hookspecs.bonzo_message`, after ``spf`` and ``dkim``
recorded their results, the plugin finds the ``From:`` domain, its policy
(:mod:`.policy`), and whether an SPF ``pass`` (its ``domain``) or a DKIM
``pass`` (its ``d=``) is aligned with it. The outcome is recorded as
``dmarc`` on ``envelope.results``; when DMARC fails, the domain's policy
(after ``pct`` and ``t``) is enforced as the operator chose: refused
(``550 5.7.1``), quarantined (:class:`bonzo.Quarantine`) or only tagged.
Reports (``rua``/``ruf``) are not sent.

See ``README.rst`` in this directory for the configuration.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import dkim

from bonzo import Quarantine
from bonzo.dns import DNSError
from bonzo.errors import PermanentError, TransientError
from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session

from .._auth import dns_enabled, resolver_of, sanitize
from ..dkim_sign.signer import MAX_HEADER_SECTION, from_domain, read_header_section
from .policy import Discovery, Record

__all__ = ["DmarcPlugin", "KEYS", "Evaluation"]

log = logging.getLogger("bonzo.plugins.dmarc")

ENFORCE = ("reject", "quarantine", "tag")
#: The ``[plugins.dmarc]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("on_reject", "choice", default="reject", choices=ENFORCE,
        doc="What to do with a message whose disposition is ``reject``: refuse "
        "it (``550 5.7.1``), quarantine it, or only tag it (record the result)."),
    Key("on_quarantine", "choice", default="quarantine", choices=ENFORCE,
        doc="The same for the disposition ``quarantine``."),
    Key("on_temperror", "choice", default="tag", choices=("tempfail", "tag"),
        doc="When the policy could not be looked up: defer (``451 4.4.3``) or "
        "only tag."),
    Key("skip_authenticated", "bool", default=True,
        doc="Do not judge sessions that authenticated."),
)  # fmt: skip
KEYS = tuple(SCHEMA.names)
OFF_REASON = "DNS lookups are off ([dns] nameservers)"
#: One step less strict, for ``pct`` sampling and ``t=y`` (RFC 7489 6.6.4,
#: RFC 9989).
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


class Evaluation:
    """The outcome of DMARC for one message."""

    def __init__(self, result: str, reason: str, author: str = "") -> None:
        self.result = result
        self.reason = reason
        self.author = author
        self.record: Record | None = None
        self.policy = "none"
        self.disposition = "none"
        self.org_domain = ""
        self.spf_aligned = False
        self.dkim_aligned = False

    def details(self) -> dict[str, Any]:
        return {
            "domain": self.author,
            "policy": self.policy,
            "disposition": self.disposition,
            "org_domain": self.org_domain,
            "record_domain": self.record.domain if self.record else "",
            "spf_aligned": self.spf_aligned,
            "dkim_aligned": self.dkim_aligned,
        }


def _author(header_bytes: bytes, content: Any) -> tuple[str | None, str]:
    """The ``From:`` domain of the message (blocking: reads the header section)."""
    section = read_header_section(content, MAX_HEADER_SECTION - len(header_bytes))
    if section is None:
        return None, f"a header section over {MAX_HEADER_SECTION} octets"
    try:
        parsed = dkim.DKIM(header_bytes + section + b"\r\n")
    except (dkim.MessageFormatError, IndexError):
        return None, "a malformed header section"
    return from_domain(parsed.headers)


class DmarcPlugin:
    """Evaluates and enforces DMARC."""

    #: Plugins to run before this one at the message (``bonzo check`` warns
    #: otherwise), and why.
    runs_after = {"spf": "it reads spf's result", "dkim": "it reads dkim's result"}

    def __init__(self) -> None:
        self.on_reject = "reject"
        self.on_quarantine = "quarantine"
        self.on_temperror = "tag"
        self.skip_authenticated = True
        self.resolver: Any = None
        #: Draws a number in [0, 1) for ``pct`` sampling (tests replace it).
        self.random: Callable[[], float] = random.random

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.dmarc]``."""
        values = SCHEMA.parse(config, app)
        self.on_reject = values["on_reject"]
        self.on_quarantine = values["on_quarantine"]
        #: Some messages will be quarantined: a plugin must keep them (see
        #: App.warnings).
        self.may_quarantine = "quarantine" in (self.on_reject, self.on_quarantine)
        self.on_temperror = values["on_temperror"]
        self.skip_authenticated = values["skip_authenticated"]
        self.resolver = resolver_of(app)

    @hookimpl
    def bonzo_startup(self) -> None:
        if not dns_enabled(self.resolver):
            log.warning("dmarc: DNS lookups are off: every DMARC result will be none (set [dns])")

    # ------------------------------------------------------------ evaluate
    async def evaluate(self, envelope: Envelope) -> Evaluation:
        """DMARC for ``envelope``, from the ``spf`` and ``dkim`` results
        recorded on it."""
        loop = asyncio.get_running_loop()
        author, why = await loop.run_in_executor(
            None, _author, envelope.header_bytes, envelope.open_body()
        )
        if author is None:
            # RFC 7489 6.6.1: no single author domain, nothing to evaluate.
            return Evaluation("permerror", f"no author domain: {why}")
        if not dns_enabled(self.resolver):
            return Evaluation("none", OFF_REASON, author)
        discovery = Discovery(self.resolver)
        outcome = Evaluation("none", "", author)
        try:
            record = await discovery.policy(author)
            if record is None:
                outcome.reason = f"{author} publishes no DMARC policy"
                return outcome
            outcome.record = record
            outcome.org_domain = await discovery.organizational_domain(author)
            spf = [
                str(r.details.get("domain", ""))
                for r in envelope.results.all("spf")
                if r.result == "pass"
            ]
            dkim_ = [
                str(r.details.get("domain", ""))
                for r in envelope.results.all("dkim")
                if r.result == "pass"
            ]
            for domain in spf:
                if domain and await discovery.aligned(domain, author, record.aspf):
                    outcome.spf_aligned = True
                    break
            for domain in dkim_:
                if domain and await discovery.aligned(domain, author, record.adkim):
                    outcome.dkim_aligned = True
                    break
            # A check that could not be made here (DNS timed out) for an
            # aligned domain might have passed: no verdict on it.
            unsure = []
            if not (outcome.spf_aligned or outcome.dkim_aligned):
                for kind, mode in (("spf", record.aspf), ("dkim", record.adkim)):
                    for r in envelope.results.all(kind):
                        domain = str(r.details.get("domain", ""))
                        if (
                            r.result == "temperror"
                            and domain
                            and await discovery.aligned(domain, author, mode)
                        ):
                            unsure.append(f"{kind.upper()} for {domain}")
                            break
        except DNSError as exc:
            outcome.result, outcome.reason = "temperror", f"DNS: {exc}"
            return outcome
        policy = record.p if record.domain == author else (record.sp or record.p)
        outcome.policy = policy
        if outcome.spf_aligned or outcome.dkim_aligned:
            outcome.result = "pass"
            which = [
                n for n, ok in (("SPF", outcome.spf_aligned), ("DKIM", outcome.dkim_aligned)) if ok
            ]
            outcome.reason = f"{' and '.join(which)} aligned with {author}"
            return outcome
        if unsure:
            # RFC 7489 6.6.2: the Mail Receiver may defer rather than apply
            # the policy when a check failed for a temporary reason.
            outcome.result = "temperror"
            outcome.reason = f"no aligned pass; temporary error in {' and '.join(unsure)}"
            return outcome
        outcome.result = "fail"
        outcome.reason = f"neither SPF nor DKIM aligned with {author} (p={policy})"
        disposition = policy
        if record.testing:
            disposition = _WEAKER[disposition]
        if record.pct < 100 and self.random() * 100 >= record.pct:
            disposition = _WEAKER[disposition]
        outcome.disposition = disposition
        return outcome

    # ----------------------------------------------------------------- hook
    @hookimpl
    async def bonzo_message(self, session: Session, envelope: Envelope) -> Any:
        """Record ``dmarc`` and enforce the policy as configured."""
        if self.skip_authenticated and session.auth is not None:
            return None
        outcome = await self.evaluate(envelope)
        envelope.results.add("dmarc", outcome.result, outcome.reason, **outcome.details())
        log.info(
            "dmarc: message %s: %s for %s (%s; disposition %s)",
            envelope.id,
            outcome.result,
            outcome.author or "-",
            outcome.reason,
            outcome.disposition,
        )
        if outcome.result == "temperror" and self.on_temperror == "tempfail":
            raise TransientError(
                "DMARC policy of the author's domain could not be looked up, try again later",
                451,
                "4.4.3",
            )
        if outcome.result != "fail" or outcome.disposition == "none":
            return None
        action = self.on_reject if outcome.disposition == "reject" else self.on_quarantine
        domain = sanitize(outcome.author, 100)
        if action == "reject":
            raise PermanentError(
                f"DMARC policy of {domain} rejects this message "
                "(neither SPF nor DKIM aligned with the From: domain)",
                550,
                "5.7.1",
            )
        if action == "quarantine":
            return Quarantine(f"DMARC: {outcome.reason}; policy {outcome.disposition}")
        return None

"""DMARC (RFC 7489, with the RFC 9989 tree walk): does SPF or DKIM vouch for
the author's domain, and what does the domain ask for when neither does?

In :func:`~bonzo.hookspecs.bonzo_message`, after ``spf`` and ``dkim``
recorded their results, the plugin finds the ``From:`` domain, its policy
(:mod:`.policy`), and whether an SPF ``pass`` (its ``domain``) or a DKIM
``pass`` (its ``d=``) is aligned with it. A ``From:`` naming several domains
(or a message with several ``From:`` fields) is evaluated for each, and the
strictest outcome counts (RFC 7489 6.6.1); so is every other domain a reader
may be shown in the field (a lenient scan: see ``README.rst``). The outcome is recorded as
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

from bonzo import Quarantine
from bonzo.dns import DNSError
from bonzo.errors import PermanentError, TransientError
from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session

from .._auth import dns_enabled, resolver_of, sanitize
from ..dkim_sign.signer import Authors, author_domains
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
        doc="When the policy could not be looked up, or an aligned SPF or DKIM check "
        "could not be made (a DNS failure): defer (``451 4.4.3``, saying which) or "
        "only tag."),
    Key("skip_authenticated", "bool", default=True,
        doc="Do not judge sessions that authenticated."),
    Key("on_no_author", "choice", default="tag", choices=ENFORCE,
        doc="What to do with a message whose ``From:`` field gives no usable author "
        "domain (no ``From:`` at all, no domain in it, an address a reader may "
        "show otherwise, or a field that does not parse cleanly), which no policy "
        "can be applied to, or none a pass holds for: refuse it (``550 5.7.1``), "
        "quarantine it, or only tag it (``dmarc=permerror``)."),
)  # fmt: skip
KEYS = tuple(SCHEMA.names)
OFF_REASON = "DNS lookups are off ([dns] nameservers)"
#: One step less strict, for ``pct`` sampling and ``t=y`` (RFC 7489 6.6.4,
#: RFC 9989).
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
#: The most author domains evaluated for one message: each costs DNS
#: queries, and a From: field naming hundreds must not make us send them
#: (DMARCbis 11.5 asks for a limit).
MAX_AUTHORS = 10


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
        #: Every author domain of the message (``author`` is the one whose
        #: outcome counts).
        self.authors: tuple[str, ...] = (author,) if author else ()
        #: Why the ``From:`` field gives no usable author domain (or one of
        #: its addresses none), if it does not.
        self.unusable_from = ""
        #: The checks (``"SPF"``, ``"DKIM"``) a temperror came from, when the
        #: policy was found but an aligned check could not be made.
        self.unsure_checks: tuple[str, ...] = ()

    @property
    def severity(self) -> int:
        """How strict the outcome is, to pick the one that counts among an
        evaluation per author domain (RFC 7489 6.6.1: the most strict
        policy among the checks that fail). A temperror ranks above a
        ``fail`` that is not enforced: its domain might ask for more."""
        if self.result == "fail":
            return {"reject": 5, "quarantine": 4}.get(self.disposition, 2)
        return {"temperror": 3, "none": 1, "pass": 0}.get(self.result, 1)

    def details(self) -> dict[str, Any]:
        return {
            "domain": self.author,
            "authors": list(self.authors),
            "policy": self.policy,
            "disposition": self.disposition,
            "org_domain": self.org_domain,
            "record_domain": self.record.domain if self.record else "",
            "spf_aligned": self.spf_aligned,
            "dkim_aligned": self.dkim_aligned,
        }


def _authors(envelope: Envelope) -> Authors:
    """The ``From:`` domains of the message, from its header fields as the
    envelope reads them (:meth:`~bonzo.session.Envelope.headers`): the
    fields every other filter and the delivered message see, obsolete
    spellings (``From :``) and odd lines included, so that no spelling
    another parser refuses leaves a policy unapplied."""
    fields = [
        (name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        for name, value in envelope.headers()
        if name.lower() == "from"
    ]
    return author_domains(fields)


class DmarcPlugin:
    """Evaluates and enforces DMARC."""

    #: Plugins to run before this one at the message (``bonzo check`` warns
    #: otherwise), and why.
    # Not spf: its result is recorded at MAIL, before any message hook runs.
    runs_after = {"dkim": "it reads dkim's result"}

    def __init__(self) -> None:
        self.on_reject = "reject"
        self.on_quarantine = "quarantine"
        self.on_temperror = "tag"
        self.skip_authenticated = True
        self.on_no_author = "tag"
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
        self.may_quarantine = "quarantine" in (
            self.on_reject,
            self.on_quarantine,
            values["on_no_author"],
        )
        self.on_temperror = values["on_temperror"]
        self.skip_authenticated = values["skip_authenticated"]
        self.on_no_author = values["on_no_author"]
        self.resolver = resolver_of(app)

    @hookimpl
    def bonzo_startup(self) -> None:
        if not dns_enabled(self.resolver):
            log.warning("dmarc: DNS lookups are off: every DMARC result will be none (set [dns])")

    # ------------------------------------------------------------ evaluate
    async def evaluate(self, envelope: Envelope) -> Evaluation:
        """DMARC for ``envelope``, from the ``spf`` and ``dkim`` results
        recorded on it: an evaluation per author domain, of which the most
        strict counts."""
        authors = _authors(envelope)
        domains = authors.domains
        if not domains:
            # RFC 7489 6.6.1: no author domain, nothing to evaluate.
            why = authors.problem or (
                "no From: field" if not authors.fields else "no domain in the From: field"
            )
            evaluation = Evaluation("permerror", f"no author domain: {why}")
            evaluation.unusable_from = why
            return evaluation
        if not dns_enabled(self.resolver):
            outcome = Evaluation("none", OFF_REASON, domains[0])
        elif len(domains) > MAX_AUTHORS:
            # Evaluating some would let a domain past the limit escape its
            # policy: the message is handled as the strictest policy would.
            outcome = Evaluation(
                "permerror",
                f"{len(domains)} author domains in From: (at most {MAX_AUTHORS} are evaluated)",
                domains[0],
            )
            outcome.policy = outcome.disposition = "reject"
        else:
            discovery = Discovery(self.resolver)
            outcomes = await asyncio.gather(
                *(self._evaluate_one(envelope, discovery, d) for d in domains)
            )
            # The first of the strictest: max() keeps the first among equals.
            outcome = max(outcomes, key=lambda o: o.severity)
        outcome.authors = domains
        outcome.unusable_from = authors.problem or ""
        notes = []
        if authors.fields > 1:
            notes.append(f"{authors.fields} From: fields")
        if 1 < len(domains) <= MAX_AUTHORS:
            notes.append(f"author domains {', '.join(domains)}")
        if authors.problem and outcome.result in ("pass", "none") and dns_enabled(self.resolver):
            # An author address with no usable domain (ceo@bank.example
            # followed by a control octet, which a reader may not show) was
            # not evaluated: no pass or none holds for the message; only a
            # fail of another author domain is stricter.
            outcome.reason = f"{authors.problem}; {outcome.result} otherwise: {outcome.reason}"
            outcome.result = "permerror"
        elif authors.problem:
            notes.append(authors.problem)
        if notes:
            outcome.reason += "; " + "; ".join(notes)
        return outcome

    async def _evaluate_one(
        self, envelope: Envelope, discovery: Discovery, author: str
    ) -> Evaluation:
        """DMARC for the author domain ``author``."""
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
            unsure: list[tuple[str, str]] = []  # (check, domain)
            if not (outcome.spf_aligned or outcome.dkim_aligned):
                for kind, mode in (("spf", record.aspf), ("dkim", record.adkim)):
                    for r in envelope.results.all(kind):
                        domain = str(r.details.get("domain", ""))
                        if (
                            r.result == "temperror"
                            and domain
                            and await discovery.aligned(domain, author, mode)
                        ):
                            unsure.append((kind.upper(), domain))
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
            said = " and ".join(f"{check} for {domain}" for check, domain in unsure)
            outcome.reason = f"no aligned pass; temporary error in {said}"
            outcome.unsure_checks = tuple(check for check, _ in unsure)
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
            # Say which lookup failed: the sender's operator checks that record.
            if outcome.unsure_checks:
                what = " and ".join(outcome.unsure_checks)
                text = f"{what} of the author's domain could not be checked, try again later"
            else:
                text = "DMARC policy of the author's domain could not be looked up, try again later"
            raise TransientError(text, 451, "4.4.3")
        if outcome.result not in ("fail", "permerror") or outcome.disposition == "none":
            return self._no_author(outcome)
        action = self.on_reject if outcome.disposition == "reject" else self.on_quarantine
        domain = sanitize(outcome.author, 100)
        if action == "reject":
            if outcome.result == "permerror":
                raise PermanentError(
                    f"DMARC: too many author domains in the From: field (over {MAX_AUTHORS})",
                    550,
                    "5.7.1",
                )
            raise PermanentError(
                f"DMARC policy of {domain} rejects this message "
                "(neither SPF nor DKIM aligned with the From: domain)",
                550,
                "5.7.1",
            )
        if action == "quarantine":
            return Quarantine(f"DMARC: {outcome.reason}; policy {outcome.disposition}")
        return self._no_author(outcome)

    def _no_author(self, outcome: Evaluation) -> Any:
        """Apply ``on_no_author`` when the ``From:`` field gave no usable
        author domain (RFC 7489 6.6.1: such a message may be refused) and no
        policy was enforced."""
        if not outcome.unusable_from or self.on_no_author == "tag":
            return None
        if self.on_no_author == "reject":
            raise PermanentError("DMARC: no usable author domain in the From: field", 550, "5.7.1")
        return Quarantine(f"DMARC: no usable author domain: {outcome.unusable_from}")

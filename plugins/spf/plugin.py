"""SPF (RFC 7208): is the client allowed to send for the sender's domain?

Checked at ``MAIL`` for the MAIL FROM identity, and at ``HELO``/``EHLO``
for the HELO identity; a null sender (``MAIL FROM:<>``, bounces) is judged
by the HELO identity (RFC 7208 2.3). The evaluation is pyspf's, in a thread
of the plugin's own pool (``threads``), with every DNS query going through
Bonzo's resolver (``app.dns``) (:mod:`.evaluate`).

Results go on ``session.results`` (HELO identity) and ``envelope.results``
(the message's identity) as ``spf``, with ``domain`` and ``identity``
details, for ``dmarc`` and ``authres`` to read. What to do with a
``fail``, ``softfail``, ``permerror`` or ``temperror`` is the operator's
choice: refuse (``550 5.7.23``/``5.7.24``), defer (``451 4.7.24``), or
only record it (``tag``). A ``temperror`` (DNS failed) is never refused for
good: its "reject" is ``451 4.4.3`` (RFC 7208 8.6).

A check that could not be made because the plugin's threads were busy (it
got no thread in its ``timeout``, or too late to finish) is this server's
fault, not the domain's ``temperror``: no result is recorded for it, and at
``MAIL`` the answer is ``451 4.3.0`` whatever the policy keys say, so that
no overload lets a message through unjudged. Each client (an IPv4 address,
an IPv6 ``/64``) has at most ``threads_per_client`` checks in the pool at
once.

See ``README.rst`` in this directory for the configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bonzo.address import Address
from bonzo.errors import PermanentError, SMTPError, TransientError
from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session

from .._auth import dns_enabled, resolver_of, sanitize
from .._config import (
    IPNetwork,
    client_address,
    client_network,
    in_networks,
)
from .evaluate import ClientShares, NotChecked, SPFOutcome, check_host, make_pool

__all__ = ["SpfPlugin", "KEYS", "ACTIONS", "received_spf"]

log = logging.getLogger("bonzo.plugins.spf")

ACTIONS = ("reject", "tempfail", "tag")
#: The prefix length of an IPv6 client for ``threads_per_client``: a host or
#: home network gets a whole /64 and could take a fresh address per check.
CLIENT_IPV6_PREFIX = 64


def _check_share(values: dict[str, Any]) -> None:
    share = values["threads_per_client"]
    if share is not None and share > values["threads"]:
        raise ValueError(
            f"threads_per_client: must be at most threads ({values['threads']}), got {share}"
        )


def default_share(threads: int) -> int:
    """``threads_per_client`` when not given: a quarter of ``threads``, at
    least 1."""
    return max(1, threads // 4)


#: The ``[plugins.spf]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("on_fail", "choice", default="tag", choices=ACTIONS,
        doc="What to do with the result ``fail`` (of the MAIL FROM identity, or "
        "the HELO identity): refuse (``550 5.7.23``), tempfail (``451 4.7.24``) "
        "or only record it."),
    Key("on_softfail", "choice", default="tag", choices=ACTIONS,
        doc="The same for ``softfail``."),
    Key("on_permerror", "choice", default="tag", choices=ACTIONS,
        doc="The same for ``permerror`` (a broken SPF record; refused with "
        "``550 5.7.24``)."),
    Key("on_temperror", "choice", default="tag", choices=ACTIONS,
        doc="The same for ``temperror`` (DNS failed); a DNS failure is never "
        "refused for good: ``reject`` answers ``451 4.4.3`` (RFC 7208 8.6)."),
    Key("helo", "bool", default=True, doc="Check the HELO identity at HELO/EHLO."),
    Key("received_spf", "bool", default=False,
        doc="Add a ``Received-SPF:`` field (RFC 7208 9.1) with the message's "
        "result. The ``authres`` plugin's ``Authentication-Results:`` field says "
        "the same in the newer form."),
    Key("timeout", "duration", default=20.0, minimum=0.001, maximum=300.0,
        doc="How long one SPF check may take in all, the waits for the client's "
        "turn (``threads_per_client``) and a free thread (``threads``) included "
        "(RFC 7208 4.6.4 asks for at least 20 seconds); then ``temperror``, unless "
        "the waits took more than half of it: then the check counts as not made "
        "(this server's overload, ``451 4.3.0`` at ``MAIL``)."),
    Key("threads", "int", default=16, minimum=1, maximum=256,
        doc="SPF checks run at once, each in a thread of the plugin's own (pyspf "
        "waits for its DNS answers in it): checks beyond wait for a thread, within "
        "their ``timeout``. Senders whose DNS is slow hold these threads only, never "
        "those that other plugins hash and store mail in."),
    Key("threads_per_client", "int", minimum=1, maximum=256,
        doc="The most SPF checks one client (an IPv4 address, or an IPv6 ``/64``) "
        "has in the plugin's pool at once, running or waiting for a thread; its "
        "further checks wait for one of its own to end (within their ``timeout``), "
        "so that no client can take every thread. Default: a quarter of "
        "``threads`` (at least 1); at most ``threads``."),
    Key("skip_authenticated", "bool", default=True,
        doc="Do not check sessions that authenticated."),
    Key("skip_networks", "networks", default=[],
        doc="Client networks (CIDR) not checked, such as your own relays."),
    check=_check_share,
)  # fmt: skip
KEYS = tuple(SCHEMA.names)
#: The results a policy key acts on, and the status of a refusal: RFC 7372's
#: for a 550; a temperror is a DNS fault, which may go away, so its refusal is
#: a 451 with RFC 7208 8.6's 4.4.3.
ACTED_ON = {
    "fail": "5.7.23",
    "softfail": "5.7.23",
    "permerror": "5.7.24",
    "temperror": "4.4.3",
}
OFF_REASON = "DNS lookups are off ([dns] nameservers)"


def _quote(value: str) -> str:
    """A quoted-string (RFC 5322) of printable ASCII."""
    text = sanitize(value, 255).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def received_spf(result: str, details: Mapping[str, Any], receiver: str) -> str:
    """The value of a ``Received-SPF:`` field (RFC 7208 9.1) for a result
    recorded by this plugin: the result, a comment, then ``key=value``
    pairs (values from the client are quoted and sanitized)."""
    ip = str(details.get("client_ip", ""))
    domain = str(details.get("domain", ""))
    if result == "pass":
        comment = f"{receiver}: domain of {domain} designates {ip} as permitted sender"
    elif result in ("fail", "softfail"):
        comment = f"{receiver}: domain of {domain} does not designate {ip} as permitted sender"
    elif result == "none":
        comment = f"{receiver}: {domain or 'the sender'} publishes no SPF record"
    else:
        comment = f"{receiver}: {result} for {domain or 'the sender'}"
    pairs = [
        f"client-ip={ip}",
        f"envelope-from={_quote(str(details.get('sender', '')))}",
        f"helo={_quote(str(details.get('helo', '')))}",
        f"receiver={receiver}",
        f"identity={details.get('identity', 'mailfrom')}",
    ]
    mechanism = str(details.get("mechanism", ""))
    if mechanism:
        key = "problem" if result in ("permerror", "temperror") else "mechanism"
        pairs.append(f"{key}={_quote(mechanism)}")
    comment = sanitize(comment).replace("(", "[").replace(")", "]")
    return f"{result} ({comment}) " + "; ".join(pairs)


class SpfPlugin:
    """Checks SPF for the HELO and MAIL FROM identities."""

    def __init__(self) -> None:
        self.actions = dict.fromkeys(ACTED_ON, "tag")
        self.check_helo = True
        self.add_header = False
        self.timeout = 20.0
        self.threads = 16
        self.threads_per_client = default_share(self.threads)
        self._shares = ClientShares(self.threads_per_client)
        # Made in each worker process, on first use (not across a fork).
        self._pool: ThreadPoolExecutor | None = None
        self.skip_authenticated = True
        self.skip_networks: list[IPNetwork] = []
        self.resolver: Any = None
        self.receiver = "localhost"

    # ---------------------------------------------------------------- config
    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.spf]``."""
        values = SCHEMA.parse(config, app)
        self.actions = {r: values[f"on_{r}"] for r in ACTED_ON}
        self.check_helo = values["helo"]
        self.add_header = values["received_spf"]
        self.timeout = float(values["timeout"])
        self.threads = values["threads"]
        share = values["threads_per_client"]
        self.threads_per_client = share if share is not None else default_share(self.threads)
        self._shares = ClientShares(self.threads_per_client)
        self.skip_authenticated = values["skip_authenticated"]
        self.skip_networks = values["skip_networks"]
        self.resolver = resolver_of(app)
        settings = getattr(app, "settings", None)
        self.receiver = sanitize(getattr(settings, "hostname", None) or "localhost", 255)

    @hookimpl
    def bonzo_startup(self) -> None:
        if not dns_enabled(self.resolver):
            log.warning("spf: DNS lookups are off: every SPF result will be none (set [dns])")

    @hookimpl
    def bonzo_shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------ checking
    def _skipped(self, session: Session) -> bool:
        if self.skip_authenticated and session.auth is not None:
            return True
        return bool(self.skip_networks) and in_networks(session.remote_ip, self.skip_networks)

    async def _check(self, session: Session, sender: str, helo: str) -> SPFOutcome:
        """The check of one identity; raises :class:`NotChecked` when the
        plugin's threads left it no time (overload here)."""
        address = client_address(session.remote_ip)
        identity = "mailfrom" if sender else "helo"
        domain = sender.rpartition("@")[2] if sender else helo
        if address is None:
            return SPFOutcome("none", identity, domain, sender, "not an IP client")
        if not dns_enabled(self.resolver):
            return SPFOutcome("none", identity, domain, sender, OFF_REASON)
        if self._pool is None:
            self._pool = make_pool(self.threads)
        return await check_host(
            self.resolver,
            address.compressed,
            sender,
            helo,
            receiver=self.receiver,
            timeout=self.timeout,
            executor=self._pool,
            shares=self._shares,
            client=client_network(address.compressed, 32, CLIENT_IPV6_PREFIX),
        )

    def _overloaded(self, session: Session, what: str, error: NotChecked, then: str) -> None:
        """Log a check not made for want of a thread: the operator's to
        tune (``threads``, ``threads_per_client``), or an attack."""
        if error.busy == "client":
            busy = (
                f"this client's other checks held its share (threads_per_client = "
                f"{self.threads_per_client})"
            )
        else:
            busy = f"every one of the plugin's threads (threads = {self.threads}) was busy"
        log.warning(
            "spf: session %s: %s: SPF check not made, local overload of the spf plugin: %s; %s; %s",
            session.id,
            what,
            busy,
            error.describe(),
            then,
        )

    def _record(self, results: Any, outcome: SPFOutcome, session: Session, helo: str) -> None:
        results.add(
            "spf",
            outcome.result,
            outcome.reason,
            domain=outcome.domain,
            identity=outcome.identity,
            sender=outcome.sender,
            client_ip=session.remote_ip,
            helo=helo,
            mechanism=outcome.mechanism,
        )

    def _verdict(self, outcome: SPFOutcome, session: Session) -> SMTPError | None:
        action = self.actions.get(outcome.result, "tag")
        if action == "tag":
            return None
        domain = sanitize(outcome.domain, 100)
        # The HELO identity decides alone (or for <>): say it is the HELO
        # name, which the sender may not think of as an address it used.
        which = "HELO name " if outcome.identity == "helo" else ""
        if outcome.result in ("fail", "softfail"):
            text = (
                f"SPF {outcome.result}: {which}{domain} does not allow {session.remote_ip} "
                "to send for it"
            )
            if outcome.explanation and outcome.result == "fail":
                text += f" ({sanitize(outcome.explanation, 150)})"
        else:
            text = (
                f"SPF {outcome.result} for {which}{domain}: the domain's SPF policy cannot be used"
            )
        if action == "tempfail":
            return TransientError(text, 451, "4.7.24")
        if outcome.result == "temperror":
            return TransientError(text, 451, ACTED_ON["temperror"])
        return PermanentError(text, 550, ACTED_ON[outcome.result])

    @hookimpl
    async def bonzo_helo(self, session: Session, name: str, esmtp: bool) -> None:
        """Check the HELO identity; the result goes on ``session.results``."""
        if not self.check_helo or self._skipped(session):
            return None
        try:
            outcome = await self._check(session, "", name)
        except NotChecked as error:
            # No result: a null sender's MAIL checks the HELO identity again.
            self._overloaded(session, f"HELO {sanitize(name, 100)}", error, "no result recorded")
            return None
        self._record(session.results, outcome, session, name)
        log.info("spf: session %s: HELO %s: %s", session.id, outcome.result, outcome.reason)
        return None

    def _helo_result(self, session: Session, helo: str) -> SPFOutcome | None:
        for result in reversed(session.results.all("spf")):
            details = result.details
            if details.get("identity") == "helo" and details.get("helo") == helo:
                return SPFOutcome(
                    result.result,
                    "helo",
                    str(details.get("domain", "")),
                    str(details.get("sender", "")),
                    str(details.get("mechanism", "")),
                )
        return None

    @hookimpl
    async def bonzo_mail(
        self,
        session: Session,
        envelope: Envelope,
        address: str,
        params: dict[str, Any],
        mailbox: Address,
    ) -> None:
        """Check the MAIL FROM identity (or, for ``<>``, the HELO identity);
        refuse per the policy keys."""
        if self._skipped(session):
            return None
        helo = session.helo or ""
        helo_outcome = self._helo_result(session, helo) if self.check_helo else None
        if helo_outcome is not None and helo_outcome.result == "fail":
            # RFC 7208 2.3: a conclusive HELO result may decide on its own.
            error = self._verdict(helo_outcome, session)
            if error is not None:
                self._record(envelope.results, helo_outcome, session, helo)
                raise error
        sender = address if address and "@" in address else ""
        if not sender and helo_outcome is not None:
            outcome = helo_outcome
        else:
            try:
                outcome = await self._check(session, sender, helo)
            except NotChecked as error:
                # Never the domain's temperror (which dmarc may let through
                # and on_temperror may tag): this server could not judge.
                what = f"MAIL FROM <{sanitize(address, 100)}>"
                self._overloaded(session, what, error, "answered 451 4.3.0")
                raise TransientError(
                    "SPF check could not be made now, try again later", 451, "4.3.0"
                ) from None
        self._record(envelope.results, outcome, session, helo)
        log.info(
            "spf: session %s: MAIL FROM <%s>: %s (%s)",
            session.id,
            sanitize(address, 100),
            outcome.result,
            outcome.reason,
        )
        error = self._verdict(outcome, session)
        if error is not None:
            raise error
        return None

    @hookimpl
    def bonzo_message(self, session: Session, envelope: Envelope) -> None:
        """Add ``Received-SPF:`` (``received_spf = true``)."""
        if not self.add_header:
            return None
        result = envelope.results.get("spf")
        if result is not None:
            envelope.add_header(
                "Received-SPF", received_spf(result.result, result.details, self.receiver)
            )
        return None

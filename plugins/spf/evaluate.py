"""SPF evaluation (RFC 7208 ``check_host()``) with pyspf, on Bonzo's resolver.

pyspf is blocking and does its DNS through one module-level function,
``spf.DNSLookup``. This module replaces that function, once, at import,
with :func:`_lookup`, which asks the lookup function installed for the
current thread — :meth:`bonzo.dns.Resolver.blocking_lookup`, handing each
query to the event loop's resolver while pyspf waits in a worker thread. A
thread with no lookup function installed gets a ``temperror``: pyspf never
falls back to the system's resolver, even when another library in the
process calls it.

:func:`check_host` is the asynchronous entry point.
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

with warnings.catch_warnings():
    # pyspf's source has invalid escape sequences in a docstring: compiled
    # without a cached .pyc, Python warns (an error where warnings are).
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", SyntaxWarning)
    import spf  # pyspf

from bonzo.dns import DNSError

from .._auth import sanitize

__all__ = ["SPFOutcome", "check_host", "RESULTS"]

#: The results of RFC 7208 section 2.6.
RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")

Lookup = Callable[..., list[tuple[tuple[str, str], Any]]]

_current = threading.local()


def _lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> Any:
    """pyspf's ``DNSLookup``: the installed lookup function, with Bonzo's
    temporary DNS errors turned into pyspf's ``TempError``."""
    lookup: Lookup | None = getattr(_current, "lookup", None)
    if lookup is None:
        raise spf.TempError("DNS: no resolver for this thread (Bonzo asks its own only)")
    try:
        return lookup(name, qtype, strict, timeout)
    except DNSError as exc:
        # Permanent errors come back as "no records" from blocking_lookup;
        # anything raised here is temporary (SERVFAIL, timeout, DNS off).
        raise spf.TempError(f"DNS {exc}") from None


spf.DNSLookup = _lookup


@dataclass(frozen=True)
class SPFOutcome:
    """The result of one ``check_host()``."""

    result: str
    """One of :data:`RESULTS`."""
    identity: str
    """``"mailfrom"`` or ``"helo"`` (RFC 7208 2.3, 2.4)."""
    domain: str
    """The domain whose policy was asked (of the sender, or the HELO name)."""
    sender: str
    """The ``<sender>`` of ``check_host()``: the MAIL FROM address, or
    ``postmaster@`` the HELO name."""
    mechanism: str = ""
    """The mechanism or problem that decided, for the header's comment."""
    explanation: str = ""
    """The domain's explanation (``exp=``) for a ``fail``, or pyspf's text;
    sanitized."""

    @property
    def reason(self) -> str:
        """One line for logs and results."""
        what = self.mechanism or self.explanation
        return sanitize(f"{self.domain}: {what}" if what else self.domain)


class _Query(spf.query):  # type: ignore[misc]
    """pyspf's query, with RFC 7208 5.5's rule for the names of a ``ptr``
    mechanism (and the ``%{p}`` macro): a name whose address lookup fails is
    skipped and the search goes on. pyspf lets the error end the check as
    ``temperror`` (its own test driver never produces one there)."""

    def validated_ptrs(self) -> list[str]:
        names = self.dns_ptr(self.i)[: spf.MAX_PTR]
        valid = []
        for name in names:
            try:
                addresses = self.dns_a(name, self.A)
            except spf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                valid.append(name)
        return valid


def _evaluate(
    lookup: Lookup, ip: str, sender: str, helo: str, receiver: str, querytime: float, explain: str
) -> SPFOutcome:
    _current.lookup = lookup
    try:
        query = _Query(i=ip, s=sender, h=helo, receiver=receiver, querytime=querytime)
        if explain:
            query.set_default_explanation(explain)
        result, _code, explanation = query.check()
    finally:
        _current.lookup = None
    domain = query.o or ""
    mechanism = getattr(query, "mechanism", None) or ""
    if result == "permerror" and getattr(query, "perm_error", None) is not None:
        mechanism = str(query.perm_error.msg)
    return SPFOutcome(
        result=result if result in RESULTS else "permerror",
        identity=query.ident,
        domain=domain,
        sender=query.s,
        mechanism=sanitize(str(mechanism)),
        explanation=sanitize(str(explanation or "")),
    )


async def check_host(
    resolver: Any,
    ip: str,
    sender: str,
    helo: str,
    *,
    receiver: str = "unknown",
    timeout: float = 20.0,
    explanation: str = "",
) -> SPFOutcome:
    """Evaluate SPF for a client at ``ip`` sending as ``sender`` (empty: the
    HELO identity, ``postmaster@helo``, RFC 7208 2.3) after ``HELO helo``.

    pyspf runs in a thread of the loop's default executor; its DNS queries
    go to ``resolver`` (a :class:`bonzo.dns.Resolver`) on this loop. The
    whole evaluation is bounded by ``timeout`` seconds (RFC 7208 4.6.4
    suggests at least 20), after which the result is ``temperror``; the ten
    DNS-mechanism and two void-lookup limits of RFC 7208 4.6.4 are pyspf's.
    ``explanation`` replaces pyspf's default explanation (tests use it).
    """
    loop = asyncio.get_running_loop()
    lookup = resolver.blocking_lookup(loop)
    return await loop.run_in_executor(
        None, _evaluate, lookup, ip, sender, helo, receiver, timeout, explanation
    )

"""SPF evaluation (RFC 7208 ``check_host()``) with pyspf, on Bonzo's resolver.

pyspf is blocking and does its DNS through one module-level function,
``spf.DNSLookup``. This module replaces that function, once, at import,
with :func:`_lookup`, which asks the lookup function installed for the
current thread — :meth:`bonzo.dns.Resolver.blocking_lookup`, handing each
query to the event loop's resolver while pyspf waits in a worker thread. A
thread with no lookup function installed gets a ``temperror``: pyspf never
falls back to the system's resolver, even when another library in the
process calls it.

:func:`check_host` is the asynchronous entry point. It runs pyspf in a
pool of threads for SPF alone, so that senders whose DNS is slow hold SPF
threads, never the event loop's default executor (DKIM hashing, maildir and
spool writes); and it counts the wait for a thread in the check's time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import threading
import time
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

__all__ = ["SPFOutcome", "check_host", "make_pool", "RESULTS", "DEFAULT_THREADS"]

#: The results of RFC 7208 section 2.6.
RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")

Lookup = Callable[..., list[tuple[tuple[str, str], Any]]]

_current = threading.local()


def _lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> Any:
    """pyspf's ``DNSLookup``: the installed lookup function, with Bonzo's
    temporary DNS errors turned into pyspf's ``TempError``, and no query
    past the check's deadline (the caller has answered ``temperror`` by
    then: the thread must be freed, not kept waiting on DNS)."""
    lookup: Lookup | None = getattr(_current, "lookup", None)
    if lookup is None:
        raise spf.TempError("DNS: no resolver for this thread (Bonzo asks its own only)")
    left = getattr(_current, "deadline", math.inf) - time.monotonic()
    if left <= 0:
        raise spf.TempError("DNS: the SPF check ran out of time")
    timeout = min(timeout, left)
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


def _late(sender: str, helo: str, timeout: float) -> SPFOutcome:
    """The ``temperror`` of a check not done within ``timeout``."""
    identity = "mailfrom" if sender else "helo"
    domain = sender.rpartition("@")[2] if sender else helo
    return SPFOutcome(
        "temperror",
        identity,
        sanitize(domain),
        sanitize(sender or f"postmaster@{helo}"),
        f"SPF check not done in {timeout:g}s",
    )


def _evaluate(
    lookup: Lookup,
    ip: str,
    sender: str,
    helo: str,
    receiver: str,
    deadline: float,
    explain: str,
    timeout: float,
) -> SPFOutcome:
    querytime = deadline - time.monotonic()
    if querytime <= 0:  # it waited for a thread all its time
        return _late(sender, helo, timeout)
    _current.lookup = lookup
    _current.deadline = deadline
    try:
        query = _Query(i=ip, s=sender, h=helo, receiver=receiver, querytime=querytime)
        if explain:
            query.set_default_explanation(explain)
        result, _code, explanation = query.check()
    finally:
        _current.lookup = None
        _current.deadline = math.inf
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


#: Threads of the pool :func:`check_host` uses when given none.
DEFAULT_THREADS = 16
_shared: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_shared_lock = threading.Lock()


def make_pool(threads: int = DEFAULT_THREADS) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of ``threads`` for SPF checks (pyspf blocks a thread while its
    DNS queries wait)."""
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="bonzo-spf")


def _shared_pool() -> concurrent.futures.ThreadPoolExecutor:
    # One per process: a pool made before a fork has no threads after it.
    with _shared_lock:
        pool = _shared.get(os.getpid())
        if pool is None:
            pool = _shared[os.getpid()] = make_pool()
        return pool


async def check_host(
    resolver: Any,
    ip: str,
    sender: str,
    helo: str,
    *,
    receiver: str = "unknown",
    timeout: float = 20.0,
    explanation: str = "",
    executor: concurrent.futures.Executor | None = None,
) -> SPFOutcome:
    """Evaluate SPF for a client at ``ip`` sending as ``sender`` (empty: the
    HELO identity, ``postmaster@helo``, RFC 7208 2.3) after ``HELO helo``.

    pyspf runs in a thread of ``executor`` (default: a pool of
    :data:`DEFAULT_THREADS` for SPF alone, never the loop's default
    executor, which other plugins' thread work needs); its DNS queries go
    to ``resolver`` (a :class:`bonzo.dns.Resolver`) on this loop. The whole
    evaluation, the wait for a free thread included, is bounded by
    ``timeout`` seconds (RFC 7208 4.6.4 suggests at least 20), after which
    the result is ``temperror`` and the thread's next DNS query fails at
    once; the ten DNS-mechanism and two void-lookup limits of RFC 7208
    4.6.4 are pyspf's. ``explanation`` replaces pyspf's default explanation
    (tests use it).
    """
    loop = asyncio.get_running_loop()
    lookup = resolver.blocking_lookup(loop)
    deadline = time.monotonic() + timeout
    pool = executor if executor is not None else _shared_pool()
    job = loop.run_in_executor(
        pool, _evaluate, lookup, ip, sender, helo, receiver, deadline, explanation, timeout
    )
    try:
        # Cancelled at the deadline: a job still queued never runs; one
        # running stops at its next DNS query (_lookup).
        return await asyncio.wait_for(job, timeout)
    except asyncio.TimeoutError:
        return _late(sender, helo, timeout)

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
:class:`ClientShares` limits the checks one client has in that pool at once,
so that one client cannot take every thread; a check that could not get a
thread in time raises :class:`NotChecked`: a local fault, which says nothing
about the sender's domain (never its ``temperror``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

with warnings.catch_warnings():
    # pyspf's source has invalid escape sequences in a docstring: compiled
    # without a cached .pyc, Python warns (an error where warnings are).
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", SyntaxWarning)
    import spf  # pyspf

from bonzo.dns import DNSError

from .._auth import sanitize

__all__ = [
    "SPFOutcome",
    "check_host",
    "make_pool",
    "ClientShares",
    "NotChecked",
    "RESULTS",
    "DEFAULT_THREADS",
]

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


class NotChecked(Exception):
    """The check could not be made here in its ``timeout``: it waited for its
    client's turn (:class:`ClientShares`) and a thread of the pool so long
    that it never ran, or that it ended in ``temperror`` after more than
    half its ``timeout`` had gone in waiting (the wait may be what cut it
    short). A local fault, this server's overload: it says nothing about
    the sender's domain, so it is never that domain's ``temperror`` (which
    ``dmarc`` may let through); the caller defers (``451 4.3.0``)."""

    def __init__(self, timeout: float, share_wait: float, pool_wait: float, ran: bool) -> None:
        #: The check's ``timeout``.
        self.timeout = timeout
        # (Clocks read in two threads may differ by a hair: never below 0.)
        #: Seconds it waited for its client's turn.
        self.share_wait = max(share_wait, 0.0)
        #: Seconds it then waited for a free thread.
        self.pool_wait = max(pool_wait, 0.0)
        #: Whether it got a thread at all (and then ended in ``temperror``).
        self.ran = ran
        super().__init__(self.describe())

    @property
    def busy(self) -> str:
        """What it waited for longest: ``"client"`` (its client's other
        checks) or ``"pool"`` (every thread busy)."""
        return "client" if self.share_wait > self.pool_wait else "pool"

    def describe(self) -> str:
        """How long it waited for what, for the log."""
        waits = (
            f"{self.share_wait:.1f}s for the client's turn and "
            f"{self.pool_wait:.1f}s for a free thread"
        )
        if self.ran:
            return (
                f"it waited {waits}, more than half its timeout ({self.timeout:g}s), "
                "then ran out of time"
            )
        return f"it waited {waits} and never ran in its timeout ({self.timeout:g}s)"


class _Run:
    """When a check's thread took it up (written in that thread, read on the
    loop)."""

    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started: float | None = None


def _evaluate(
    lookup: Lookup,
    ip: str,
    sender: str,
    helo: str,
    receiver: str,
    deadline: float,
    explain: str,
    run: _Run,
) -> SPFOutcome | None:
    """pyspf's check in this thread; ``None`` if it got the thread past its
    deadline."""
    run.started = time.monotonic()
    querytime = deadline - run.started
    if querytime <= 0:  # it waited for a thread all its time
        return None
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


@dataclass
class _Share:
    """One client's checks in the pool, and its checks waiting for their turn."""

    running: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class ClientShares:
    """At most ``limit`` checks of one client in the pool at once (running,
    or queued for a free thread); the client's further checks wait, first
    come first served, for one of its own to end, not for the pool, so one
    client cannot take every thread. A check keeps its place until its
    thread is done with it (or it is taken off the pool's queue unstarted),
    not until its caller stops waiting for it.

    A client is a string: the caller's grouping (the spf plugin's is an IPv4
    address, or an IPv6 address's ``/64``). The state lives on the event
    loop's thread. Nothing here bounds the number of waiters: each is one
    check of one session, waiting at most until its deadline, and a
    session makes one check at a time; the server's connection limits
    (``max_connections_per_ip``, ``max_connections``) bound the sessions.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a client's share must be at least 1, not {limit}")
        self.limit = limit
        self._shares: dict[str, _Share] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def running(self, client: str) -> int:
        """The checks ``client`` has in the pool now."""
        share = self._shares.get(client)
        return share.running if share is not None else 0

    def __len__(self) -> int:
        """The clients with a check in the pool or waiting."""
        return len(self._shares)

    async def acquire(self, client: str, deadline: float) -> bool:
        """Wait, until ``deadline`` (:func:`time.monotonic`) at most, for a
        place of ``client`` in the pool: ``True`` when it has one (give it
        back with :meth:`release`), ``False`` when the deadline came
        first."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # The threads of an earlier loop (a worker forked after start,
            # tests) can no longer give their places back on it.
            self._loop, self._shares = loop, {}
        share = self._shares.setdefault(client, _Share())
        if share.running < self.limit and not share.waiting:
            share.running += 1
            return True
        turn: asyncio.Future[None] = loop.create_future()
        share.waiting.append(turn)
        try:
            await asyncio.wait_for(turn, max(0.0, deadline - time.monotonic()))
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                # The place came just as the wait ended: pass it on.
                self.release(client)
            else:
                turn.cancel()
                if turn in share.waiting:
                    share.waiting.remove(turn)
                if share.running <= 0 and not share.waiting:
                    self._shares.pop(client, None)
            if isinstance(exc, asyncio.TimeoutError):
                return False
            raise
        return True

    def release(self, client: str) -> None:
        """Give a place of ``client`` back: to its first check waiting, or
        to the pool. On the loop's thread."""
        share = self._shares.get(client)
        if share is None:
            return  # taken on an earlier loop
        while share.waiting:
            turn = share.waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the place passes on: running unchanged
                return
        share.running -= 1
        if share.running <= 0:
            del self._shares[client]

    def release_threadsafe(self, loop: asyncio.AbstractEventLoop, client: str) -> None:
        """:meth:`release` from a pool thread, for a place taken on ``loop``."""
        try:
            loop.call_soon_threadsafe(self._release_on, loop, client)
        except RuntimeError:
            pass  # the loop is closed: its places went with it

    def _release_on(self, loop: asyncio.AbstractEventLoop, client: str) -> None:
        if loop is self._loop:
            self.release(client)


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
    shares: ClientShares | None = None,
    client: str = "",
) -> SPFOutcome:
    """Evaluate SPF for a client at ``ip`` sending as ``sender`` (empty: the
    HELO identity, ``postmaster@helo``, RFC 7208 2.3) after ``HELO helo``.

    pyspf runs in a thread of ``executor`` (default: a pool of
    :data:`DEFAULT_THREADS` for SPF alone, never the loop's default
    executor, which other plugins' thread work needs); its DNS queries go
    to ``resolver`` (a :class:`bonzo.dns.Resolver`) on this loop. With
    ``shares``, the check first waits for a place of ``client`` in the pool
    (:class:`ClientShares`). The whole evaluation, the waits for a place and
    a thread included, is bounded by ``timeout`` seconds (RFC 7208 4.6.4
    suggests at least 20), after which the result is ``temperror`` and the
    thread's next DNS query fails at once; the ten DNS-mechanism and two
    void-lookup limits of RFC 7208 4.6.4 are pyspf's. ``explanation``
    replaces pyspf's default explanation (tests use it).

    Raises :class:`NotChecked` when the waits left the check no thread in
    its time, or when it ended in ``temperror`` after waiting more than half
    its time: that ``temperror`` would be this server's, not the domain's.
    """
    loop = asyncio.get_running_loop()
    lookup = resolver.blocking_lookup(loop)
    queued = time.monotonic()
    deadline = queued + timeout
    if shares is not None and not await shares.acquire(client, deadline):
        raise NotChecked(timeout, time.monotonic() - queued, 0.0, ran=False)
    turn = time.monotonic()
    pool = executor if executor is not None else _shared_pool()
    run = _Run()
    try:
        submitted = pool.submit(
            _evaluate, lookup, ip, sender, helo, receiver, deadline, explanation, run
        )
    except BaseException:
        if shares is not None:
            shares.release(client)
        raise
    if shares is not None:
        # The place is the thread's until it is done with the check (or the
        # check leaves the queue unstarted), however the wait below ends.
        submitted.add_done_callback(lambda _: shares.release_threadsafe(loop, client))
    job = asyncio.wrap_future(submitted, loop=loop)
    outcome: SPFOutcome | None
    try:
        # Cancelled at the deadline: a job still queued never runs; one
        # running stops at its next DNS query (_lookup).
        outcome = await asyncio.wait_for(job, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        outcome = _late(sender, helo, timeout)
    started = run.started
    if outcome is None or started is None or started >= deadline:
        end = min(started or deadline, deadline)
        raise NotChecked(timeout, turn - queued, end - turn, ran=False)
    if outcome.result == "temperror" and started - queued > timeout / 2:
        raise NotChecked(timeout, turn - queued, started - turn, ran=True)
    return outcome

"""The queue runner: delivers due messages, retries, expires and bounces.

Every worker process runs one runner over the shared queue directory. A
runner takes a message only with its claim (:meth:`Spool.claim`), so no
message is delivered by two workers at once, and a worker that dies drops
its claims with it. A message accepted by a worker is tried at once by
that worker's runner (:meth:`Runner.kick`); the others are found by a scan
of the queue every ``scan_interval`` seconds.

One attempt at a message, under its claim:

1. its due recipients are grouped by transport and destination (a
   plugin's :func:`bonzo_route` first, then the route table) and each
   group is delivered, groups concurrently, at most ``per_destination``
   deliveries per destination and ``max_deliveries`` in all;
2. each recipient is delivered, refused for good (``5xx``: bounced) or
   deferred (``4xx``, or no answer): a deferred recipient is tried again
   after a back-off that doubles from ``min_backoff`` up to ``max_backoff``,
   and bounced once the message is older than ``lifetime``;
3. as each group ends, its outcomes are settled: the reports are queued —
   one for its recipients that failed, one for those delivered that asked
   for it (``NOTIFY=SUCCESS``) — never to the null sender, and the state is
   saved, or the message removed once every recipient is done (groups that
   end together share the reports and the write);
4. once all groups have ended, one delay notice (``delay_warning``).

A report is queued before the state that records its recipients is saved:
a crash in between repeats what was delivered since the last save (and the
report), it never loses one. A stop cancels the deliveries still in flight
after its grace and saves what the others settled, so that only the
deliveries in flight can be repeated. A state that cannot be saved (a full
disk) is kept in memory and saved again after a back-off, the message's
claim held meanwhile: no recipient is delivered twice by this process. The
claim is marked so (:meth:`Claim.mark_unsaved`) for ``bonzo queue``, whose
``delete`` may remove the message between two tries of the save.
"""

from __future__ import annotations

import asyncio
import heapq
import io
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bonzo import metrics
from bonzo.address import Address
from bonzo.client import deadline as client_deadline
from bonzo.hooks import CANCEL_GRACE, PluginFailure, PluginSet, Refused, stop_task
from bonzo.session import current_message_id, current_session_id, log_escape, new_session_id

from .bounce import ReportLine, build_report, seven_bit, wants_report
from .routes import Outcome, RouteTable
from .spool import Claim, GroupSync, QueuedMessage, Recipient, Spool, SpoolError, queued_recipient

__all__ = ["Runner", "RunnerSettings", "backoff"]

log = logging.getLogger("bonzo.plugins.queue")

#: Messages handed over by acceptance (:meth:`Runner.kick`) kept waiting
#: for their first attempt with their claims (an open descriptor each).
MAX_HANDED = 512

#: How often the runner measures how busy its event loop is (seconds); the
#: share of that time above which deliveries start yielding, and the one
#: below which they stop (apart, so that the lighter load of yielding does
#: not end it at once). Low on purpose: with 75% a loaded relay could settle
#: with deliveries at full speed and each loop about 58% busy, never
#: yielding, and small-mail acceptance fell to 0.63-0.91x Postfix's in the
#: runs that did (bench/run.py --scenarios rb, two workers).
BUSY_INTERVAL = 0.1
BUSY_SHARE = 0.5
IDLE_SHARE = 0.3
#: Mail accepted this recently (seconds) means the worker is accepting.
ACCEPTING_WINDOW = 0.5
#: Past this many accepted messages waiting for their first attempt,
#: delivery no longer yields to acceptance (Postfix's active queue limit).
MAX_YIELD_BACKLOG = 20_000

#: Messages up to this size are written (accepted mail, reports) by the
#: event loop's thread: a few fast system calls, cheaper than a trip to a
#: thread (the file itself comes ready from the committer's thread).
INLINE_SIZE = 256 * 1024

#: The states the queue's messages are counted in (``bonzo_queue_messages``):
#: never tried yet, tried and waiting for the next attempt, held.
QUEUE_STATES = ("new", "deferred", "held")


#: Seconds past ``delivery_timeout`` a transport's delivery may take before
#: it is cancelled (Bonzo's client ends by the deadline itself).
DEADLINE_GRACE = 5.0

#: Seconds a stopping runner waits for the last save of a cancelled
#: attempt's state (a disk that hangs must not hold the stop for ever).
LAST_SAVE_TIMEOUT = 10.0

#: Seconds a stopping runner waits for a cancelled attempt to end: its
#: hooks are let go within CANCEL_GRACE, its last save within
#: LAST_SAVE_TIMEOUT; one still running then is left behind.
STOP_LIMIT = LAST_SAVE_TIMEOUT + CANCEL_GRACE + 2.0

#: Seconds between a retiring runner's looks for a poke (``bonzo queue``).
RETIRED_POKE_INTERVAL = 1.0


@dataclass
class RunnerSettings:
    """The runner's tunables (``[plugins.queue]`` keys of the same names)."""

    hostname: str = "localhost"
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    lifetime: float = 5 * 86400.0
    delay_warning: float = 0.0
    scan_interval: float = 30.0
    max_deliveries: int = 20
    per_destination: int = 5
    busy_deliveries: int = 2
    bounce_size_limit: int = 50_000
    delivery_timeout: float = 600.0
    postmaster: str = ""
    """The address the bare ``<postmaster>`` is queued as (the plugin's
    :meth:`~bonzo_plugins.queue.plugin.QueuePlugin.postmaster`); ``""``:
    kept bare."""


def backoff(attempts: int, settings: RunnerSettings) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt."""
    delay = settings.min_backoff * (2 ** max(0, attempts - 1))
    return float(min(delay, settings.max_backoff))


@dataclass(eq=False)
class _Progress:
    """What an attempt at a message has settled and what of it is durable
    yet: outcomes are applied to :attr:`message` as they come in, and
    :meth:`Runner._write` queues the reports, tells the observers and saves
    the state (or removes the message) behind them."""

    message: QueuedMessage
    claim: Claim
    #: Reports not yet queued (their lines), oldest first: one queued is
    #: taken off, so that it is never queued twice.
    reports: list[list[ReportLine]] = field(default_factory=list)
    #: Observer calls not yet made: (hook, recipients).
    observed: list[tuple[str, list[Recipient]]] = field(default_factory=list)
    #: Recipients deferred in this attempt (for the delay notice).
    deferred: list[Recipient] = field(default_factory=list)
    #: Of those, the ones whose deferral never expires (``id()``s): the
    #: operator's to fix, so the delay notice promises no end.
    endless: set[int] = field(default_factory=set)
    #: While the attempt's groups are delivering: the outcomes that end a
    #: recipient for good, applied together once every group has ended, so
    #: that the sender gets one failure report per attempt, not one per
    #: destination. Until then they are neither applied nor saved: a crash
    #: tries those recipients again (nothing was delivered to them).
    ending: dict[int, Outcome] | None = None
    #: The queue ids of the reports queued.
    queued: list[str] = field(default_factory=list)
    #: Changes applied to the message, and how many of them are saved.
    changes: int = 0
    saved: int = 0
    removed: bool = False
    #: Why the last write failed (None: it did not).
    error: Exception | None = None
    #: The task writing (:meth:`Runner._write`); one at a time.
    writer: asyncio.Task[None] | None = None

    @property
    def unsaved(self) -> bool:
        """Something settled is not durable yet."""
        return bool(self.reports or self.observed) or (
            not self.removed and self.saved != self.changes
        )


async def _all_or(
    tasks: Iterable[asyncio.Future[Any]],
    event: asyncio.Event | None,
    timeout: float | None,
    poke: tuple[float, Callable[[], None]] | None = None,
) -> None:
    """Wait until every one of ``tasks`` is done, ``event`` is set or
    ``timeout`` seconds have passed (``None``: no limit). ``poke``: an
    interval and a function called at least that often while waiting."""
    waiting = {task for task in tasks if not task.done()}
    if not waiting or (event is not None and event.is_set()):
        return
    woken = asyncio.ensure_future(event.wait()) if event is not None else None
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        # Each turn one at least ends (a task, the event, the deadline) or a
        # poke interval passes: a bounded loop (with neither a deadline nor
        # an event, bounded by the tasks' own limits, as any wait for them).
        while waiting and not (woken is not None and woken.done()):
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return
            wait = left if poke is None else poke[0] if left is None else min(left, poke[0])
            done, _ = await asyncio.wait(
                [*waiting, *([woken] if woken is not None else [])],
                timeout=wait,
                return_when=asyncio.FIRST_COMPLETED,
            )
            waiting -= done
            if poke is not None:
                poke[1]()
            elif not done:
                return
    finally:
        if woken is not None:
            woken.cancel()


class Runner:
    """Delivers the messages of a :class:`Spool` (see the module description).

    :arg spool: the queue.
    :arg sync: the :class:`GroupSync` of ``spool.data`` (shared with acceptance).
    :arg routes: the configured routes.
    :arg plugins: the hooks to ask (:func:`bonzo_route`, the outcome observers).
    :arg settings: :class:`RunnerSettings`.
    :arg clock: the time (tests replace it to travel in time).
    """

    def __init__(
        self,
        spool: Spool,
        sync: GroupSync,
        routes: RouteTable,
        plugins: PluginSet | None,
        settings: RunnerSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.sync = sync
        self.routes = routes
        self.plugins = plugins
        self.settings = settings
        self.clock = clock
        self._wake = asyncio.Event()
        self._kicked: list[str] = []
        #: Messages this process just wrote, handed over with their claim
        #: (:meth:`kick`): their first attempt needs no trip to the disk.
        self._handed: dict[str, tuple[Claim, QueuedMessage]] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(settings.max_deliveries)
        #: Deliveries under way, by destination (only destinations with some:
        #: a relay meets countless domains, and none may cost memory for good).
        self._active: dict[str, int] = {}
        # Messages that found a destination at its per_destination limit, by
        # destination, in the order they came (a dict as an ordered set: the
        # first to wait is the first woken, so none can wait for ever behind
        # newer ones): each is tried again when a delivery there ends (or at
        # a scan once the destination has room), holding neither a slot nor
        # its claim meanwhile.
        self._busy: dict[str, dict[str, None]] = {}
        # Due while their attempt was still ending (see _run).
        self._again: set[str] = set()
        # A parked message's other recipients' next due time (None: none), so
        # that a scan need not revive it while its destination stays busy.
        self._parked: dict[str, float | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._slow_scan_warned = False  # once per runner: see _run
        #: Set by :meth:`stop`, and for a moment by a poke (``bonzo queue``):
        #: ends the waits between the tries of a state's save, so that a
        #: save is tried again at once when the operator freed space.
        self._retry_saves = asyncio.Event()
        # The server stops: a save that fails is given up (its attempt is
        # repeated at the next start). Not while a reload retires the
        # runner: the message stays held, or the new runner would repeat
        # the attempt at once.
        self._saves_end = False
        # The runner's file work (claim, read, remove) gets threads of its
        # own: in the loop's default executor it would wait behind every
        # accepting session's write and fsync, and delivery would starve
        # while mail arrives.
        self._executor = ThreadPoolExecutor(4, thread_name_prefix="bonzo-queue-runner")
        #: When each known message is next due (refreshed by scans).
        self._due: dict[str, float] = {}
        #: The same as a heap of (due, id), for the next due message in
        #: O(log n); an entry whose time no longer matches ``_due`` is stale
        #: and dropped when it comes up.
        self._heap: list[tuple[float, str]] = []
        #: Messages by state at the last scan (:data:`QUEUE_STATES`).
        self.depth: dict[str, int] = dict.fromkeys(QUEUE_STATES, 0)
        self._flush_mtime: float | None = None
        #: Accepted here, not yet attempted (for the yield's backlog bound).
        self._first: set[str] = set()
        self._accepted_at = -1e9
        #: True while deliveries yield to acceptance (:meth:`_measure`).
        self.yielding = False
        self._monitor: asyncio.TimerHandle | None = None
        self._cpu = (0.0, 0.0)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _measure(self) -> None:
        """Every :data:`BUSY_INTERVAL` while mail comes in: the share of the time this event
        loop's thread was busy (running, or ready to run and waiting for a
        CPU: not waiting for events). Deliveries yield to acceptance once
        that share is over :data:`BUSY_SHARE` until it falls under
        :data:`IDLE_SHARE`, while mail was accepted in the last
        :data:`ACCEPTING_WINDOW` and fewer than :data:`MAX_YIELD_BACKLOG`
        accepted messages wait."""
        wall, busy = time.monotonic(), _busy_time()
        share = (busy - self._cpu[1]) / max(wall - self._cpu[0], 1e-6)
        self._cpu = (wall, busy)
        yielding = (
            share > (IDLE_SHARE if self.yielding else BUSY_SHARE)
            and wall - self._accepted_at < ACCEPTING_WINDOW
            and len(self._first) < MAX_YIELD_BACKLOG
        )
        if yielding != self.yielding:
            self.yielding = yielding
            log.debug(
                "queue: %s (event loop busy %.0f%%, %d message(s) not yet tried)",
                "deliveries yield to acceptance" if yielding else "deliveries at full speed",
                share * 100,
                len(self._first),
            )
            if not yielding:
                self._wake.set()
        if self._stopping or not (yielding or wall - self._accepted_at < ACCEPTING_WINDOW):
            self._monitor = None  # no mail coming in: no timer (accepted() starts it)
        else:
            self._monitor = asyncio.get_running_loop().call_later(BUSY_INTERVAL, self._measure)

    def accepted(self) -> None:
        """Tell the runner that its worker accepted a message (now); the
        measure of how busy the loop is runs while mail comes in."""
        self._accepted_at = time.monotonic()
        if (
            self._monitor is None
            and not self._stopping
            and self.settings.busy_deliveries < self.settings.max_deliveries
        ):
            self._cpu = (self._accepted_at, _busy_time())
            self._monitor = asyncio.get_running_loop().call_later(BUSY_INTERVAL, self._measure)

    async def stop(
        self,
        grace: float = 30.0,
        stop_requested: asyncio.Event | None = None,
        forced: asyncio.Event | None = None,
    ) -> None:
        """Stop scanning; let deliveries in flight finish for ``grace``
        seconds, then cancel them (they are tried again later; what the
        attempt's other deliveries settled is saved first). An attempt that
        has not ended :data:`STOP_LIMIT` seconds after its cancellation (a
        transport or plugin ignoring it) is left behind, so that the stop
        always ends.

        With ``stop_requested`` not set (a reload retires this runner), the
        deliveries in flight run to their end -- each is bounded by its own
        time limits, and its claims keep the new configuration's runner off
        its messages: cancelled, a delivery whose final dot the next server
        had taken would be made again -- until ``stop_requested`` is set
        (the server stops); ``grace`` counts from then. So do the saves of
        states that failed (:meth:`_make_durable`, the message held), each
        given up only after one more try once the server stops. Once
        ``forced`` is set (a second ``SIGTERM``), the deliveries are
        cancelled at once."""
        self._stopping = True
        retiring = stop_requested is not None and not stop_requested.is_set()
        if not retiring:
            self._end_saves()
        self._wake.set()
        if self._monitor is not None:
            self._monitor.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        inflight = dict(self._inflight)
        if inflight and retiring:
            log.info(
                "queue: the configuration was replaced: %d attempt(s) in flight finish first",
                len(inflight),
            )
            await _all_or(
                inflight.values(), stop_requested, None, (RETIRED_POKE_INTERVAL, self._poke_saves)
            )
        self._end_saves()
        if inflight:
            await _all_or(inflight.values(), forced, grace)
            pending = {task for task in inflight.values() if not task.done()}
            why = (
                "at a forced stop"
                if forced is not None and forced.is_set()
                else (f"after {grace:g} s")
            )
            for id, task in inflight.items():
                if task in pending:
                    log.warning(
                        "queue: stopping: attempt at %s still running %s, cancelled; "
                        "its deliveries in flight are tried again at the next start",
                        id,
                        why,
                    )
                    # Marked as a stop: a plugin's hook in it that ignores
                    # the cancellation is let go after CANCEL_GRACE.
                    stop_task(task)
            if pending:
                _, left = await asyncio.wait(pending, timeout=STOP_LIMIT)
                for id, task in inflight.items():
                    if task in left:
                        log.error(
                            "queue: stopping: attempt at %s did not end %g s after it was "
                            "cancelled: left behind; its deliveries in flight are tried "
                            "again at the next start",
                            id,
                            STOP_LIMIT,
                        )
        await self.routes.close()
        self._release_handed()
        self._executor.shutdown(wait=False)

    def _poke_saves(self) -> None:
        """``bonzo queue`` was run (space freed?): a held save is tried now."""
        if self._flushed():
            self._retry_saves.set()
            self._retry_saves.clear()

    def _end_saves(self) -> None:
        """The server stops: each held save is tried once more, then given up."""
        self._saves_end = True
        self._retry_saves.set()

    def kick(
        self, id: str | None = None, handed: tuple[Claim, QueuedMessage] | None = None
    ) -> None:
        """Try ``id`` now (a message just accepted), or rescan the queue.

        ``handed``: the message's claim and envelope as the writer has them
        (:meth:`Spool.accept`); the runner owns the claim from then
        on. At most :data:`MAX_HANDED` are kept waiting so (a descriptor
        each); beyond, the claim is released and the message read back when
        its turn comes."""
        if id is not None:
            self._kicked.append(id)
            self._first.add(id)
            if handed is not None:
                if self._stopping or len(self._handed) >= MAX_HANDED:
                    handed[0].release()
                else:
                    old = self._handed.pop(id, None)
                    if old is not None:  # pragma: no cover - ids are unique
                        old[0].release()
                    self._handed[id] = handed
        else:
            self._due.clear()
            self._heap.clear()
        self._wake.set()

    def _release_handed(self) -> None:
        handed, self._handed = self._handed, {}
        for claim, _ in handed.values():
            claim.release()

    def _set_due(self, id: str, when: float) -> None:
        self._due[id] = when
        heapq.heappush(self._heap, (when, id))

    def _next_due(self) -> tuple[float, str] | None:
        """The earliest (due, id) that is current, stale heap entries dropped."""
        heap = self._heap
        while heap:
            when, id = heap[0]
            if self._due.get(id) == when:
                return when, id
            heapq.heappop(heap)
        return None

    # ------------------------------------------------------------ scheduling
    def _flushed(self) -> bool:
        """True when ``bonzo queue flush`` touched the queue's ``flush`` file
        since the last look."""
        try:
            mtime = (self.spool.path / "flush").stat().st_mtime
        except OSError:
            mtime = 0.0  # never flushed
        if mtime == self._flush_mtime:
            return False
        first = self._flush_mtime is None  # the time it had at start
        self._flush_mtime = mtime
        return not first

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_scan = 0.0
        self._flushed()
        while not self._stopping:
            now = self.clock()
            if self._flushed():
                next_scan = 0.0
                # Wakes the waiters without staying set (stop() sets it for good).
                self._retry_saves.set()
                self._retry_saves.clear()
                # ``bonzo queue`` pokes before it claims a message (hold,
                # delete, bounce, flush): the claims kept for messages not yet
                # tried are let go, or the command would wait for a free
                # delivery slot and fail. They are read back from the disk,
                # with what the command changed, when their turn comes.
                if self._handed:
                    log.debug(
                        "queue: poked; %d claim(s) of untried messages let go", len(self._handed)
                    )
                    self._release_handed()
            if now >= next_scan:
                started = time.monotonic()
                try:
                    await loop.run_in_executor(self._executor, self._scan)
                except OSError as exc:
                    log.error("queue: cannot scan %s: %s", self.spool.data, exc)
                except Exception:
                    # Never the end of the runner: the mail accepted from now
                    # on is delivered whatever one scan met.
                    log.error("queue: scanning %s failed", self.spool.data, exc_info=True)
                else:
                    if metrics.active is not None:
                        metrics.active.queue_depth(self.depth)
                    # A message removed before its first attempt (bonzo
                    # queue delete) no longer counts as waiting.
                    self._first.intersection_update(self._due)
                    self._keep_parked()
                    # A message handed over while the scan listed the
                    # directory may be missing from it: its claim is held
                    # here, so it must not wait for the next scan.
                    for id in self._handed:
                        if id not in self._due and id not in self._inflight:
                            self._set_due(id, 0.0)
                # From the scan's end, and at least four of its durations
                # later: no delivery starts while a scan runs, and one over a
                # queue so long that it outlasts scan_interval would
                # otherwise follow another at once (a few deliveries a
                # second with 68,000 messages and scan_interval = 5).
                took = time.monotonic() - started
                next_scan = self.clock() + max(self.settings.scan_interval, 4 * took)
                if took > self.settings.scan_interval and not self._slow_scan_warned:
                    self._slow_scan_warned = True
                    log.warning(
                        "queue: scanning %d message(s) took %.1f s, more than scan_interval "
                        "(%g s): the next scans come %.0f s apart",
                        sum(self.depth.values()),
                        took,
                        self.settings.scan_interval,
                        4 * took,
                    )
            for id in self._kicked:
                self._set_due(id, 0.0)
            self._kicked.clear()
            # Connections left idle for idle_timeout are closed (the loop
            # turns at least once a second).
            self.routes.expire()
            now = self.clock()
            # At most a second: a flush from the command line is seen quickly.
            wait = min(next_scan - now, 1.0)
            # Start due messages, the earliest first, while a delivery slot is
            # free; a finished attempt wakes this loop for the next. The cost
            # is O(log n) per message, however long the queue.
            # While the worker is busy accepting mail, fewer deliveries at
            # once: acceptance takes precedence (as in Postfix, where the
            # queue grows under a burst and drains after it).
            limit = self.settings.busy_deliveries if self.yielding else self.settings.max_deliveries
            while len(self._inflight) < limit:
                first = self._next_due()
                if first is None:
                    break
                when, id = first
                if when > now:
                    wait = min(wait, when - now)
                    break
                heapq.heappop(self._heap)
                if id not in self._inflight:
                    self._start(id)
                else:
                    # In flight: its attempt sets its next due time -- unless
                    # it already has (it parked itself, and a delivery that
                    # ended there woke it before its task was done): looked
                    # at again once it is done, or the wake-up is lost until
                    # the next scan.
                    self._again.add(id)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, wait))
            except asyncio.TimeoutError:
                pass

    def _scan(self) -> None:
        """Refresh the due times of every message, and remove what refused
        messages left in ``tmp/`` (in a thread)."""
        left = self.spool.remove_left()
        if left:
            log.info(
                "queue: removed %d partly written file(s) of refused messages from %s",
                left,
                self.spool.tmp,
            )
        due: dict[str, float] = {}
        depth = dict.fromkeys(QUEUE_STATES, 0)
        for id in self.spool.ids():
            try:
                message = self.spool.load(id)
            except FileNotFoundError:
                continue  # delivered or removed meanwhile
            except Exception as exc:
                # A SpoolError names the file; anything else is a fault, but
                # of this message only: the others are still scheduled.
                log.error(
                    "queue: skipping unreadable message %s: %s",
                    id,
                    exc,
                    exc_info=not isinstance(exc, SpoolError),
                )
                continue
            if message.held:
                depth["held"] += 1
                continue
            when = message.next_due
            if when is not None:
                due[id] = when
                tried = any(r.attempts for r in message.recipients)
                depth["deferred" if tried else "new"] += 1
        heap = [(when, id) for id, when in due.items()]
        heapq.heapify(heap)
        # Plain assignments: the loop thread reads them after this returns.
        self._due, self._heap = due, heap
        self.depth = depth

    def _start(self, id: str) -> None:
        self._first.discard(id)
        task = asyncio.get_running_loop().create_task(self._attempt_guarded(id))
        self._inflight[id] = task
        task.add_done_callback(lambda _: self._finished(id))

    def _finished(self, id: str) -> None:
        self._inflight.pop(id, None)
        if id in self._again:
            self._again.discard(id)
            when = self._due.get(id)
            if when is not None:
                self._set_due(id, when)
        self._wake.set()

    async def _attempt_guarded(self, id: str) -> None:
        # Its own task, its own copy of the context: every line the attempt
        # logs carries the message's id in a JSON log (as the accepting
        # session's lines do), and no session's id, whichever task kicked it.
        current_session_id.set(None)
        current_message_id.set(id)
        try:
            async with self._slots:
                await self.attempt(id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.error("queue: attempt at message %s failed", id, exc_info=True)
            # Look at it again after the shortest back-off, not in a busy loop.
            self._set_due(id, self.clock() + self.settings.min_backoff)

    # --------------------------------------------------------------- attempt
    async def attempt(self, id: str) -> None:
        """One delivery attempt at message ``id`` (see the module description)."""
        loop = asyncio.get_running_loop()
        claimed = self._handed.pop(id, None)
        if claimed is None:
            claimed = await loop.run_in_executor(self._executor, self._claim_and_load, id)
        if claimed is None:
            self._due.pop(id, None)  # another worker has it, or it is gone
            return
        claim, message = claimed
        self._unpark(id)
        progress = _Progress(message, claim)
        try:
            now = self.clock()
            due = message.due(now)
            if message.held or not due:
                nxt = message.next_due
                if nxt is None or message.held:
                    self._due.pop(id, None)
                else:
                    self._set_due(id, nxt)
                return
            try:
                busy = await self._deliver(message, due, progress)
            except asyncio.CancelledError:
                await self._last_save(progress)
                raise
            self._delay_notice(progress)
            if not await self._make_durable(progress):
                return  # stopping with the state unsaved: see _make_durable
            if progress.removed:
                self._due.pop(id, None)
                log.info("queue: %s done", id)
                return
            if message.held:
                self._due.pop(id, None)  # a quarantine copy kept: until released
                return
            nxt = message.next_due
            assert nxt is not None  # (not removed: some recipient is pending)
            if busy and all(self._at_limit(d) for d in busy):
                # Not tried for the recipients at a busy destination (no
                # attempt counted): woken when a delivery there ends.
                # Its other recipients keep their own due time.
                parked = {i for idx in busy.values() for i in idx}
                rest = [
                    message.recipients[i].next_attempt for i in message.pending if i not in parked
                ]
                other = self._parked[id] = min(rest) if rest else None
                if other is None:
                    self._due.pop(id, None)
                else:
                    self._set_due(id, other)
                for destination in busy:
                    self._busy.setdefault(destination, {})[id] = None
            else:
                # (A busy destination that is free again ended a delivery
                # while this attempt ran: its wake-up found this message in
                # flight, so it is due again now rather than parked.)
                self._set_due(id, nxt)
        finally:
            # (Already released by a removal: then nothing to do.)
            progress.claim.release()

    async def _make_durable(self, progress: _Progress) -> bool:
        """Once every delivery of the attempt has ended: write what is left
        (:meth:`_write`). While that fails, the outcomes stay in memory and
        the message under its claim, in flight for the scheduler, so that
        nothing settled is delivered again; the claim is marked meanwhile
        (:meth:`Claim.mark_unsaved`: ``bonzo queue`` tells why it cannot
        have the message, and ``bonzo queue delete`` can remove it). The
        write is tried again after a back-off (``min_backoff`` doubling up
        to ``max_backoff``), at once when the server stops (then given up)
        or the runner is poked (``bonzo queue``; a runner a reload retires
        keeps trying, and holding the message, until the server stops).
        False if it stops with the state unsaved, or the operator removed
        the message meanwhile."""
        id = progress.message.id
        failures = 0
        # The back-off doubles with the tries its own end started, not with
        # those a poke started: each `bonzo queue` command while the disk is
        # full would otherwise push the next try towards max_backoff.
        steps = 0
        poked = False
        # The last group's write just failed: no second try at once.
        error, progress.error = progress.error, None
        while True:
            if error is None or (self._stopping and not failures):
                claim = progress.claim
                if failures and not claim.saving():
                    # ``bonzo queue delete`` is removing it right now.
                    await asyncio.sleep(0.05)
                    continue
                try:
                    if claim.gone:
                        log.warning(
                            "queue: %s deleted by the operator while its delivery state could "
                            "not be saved: what its last attempt settled is dropped",
                            id,
                        )
                        return False
                    await asyncio.shield(self._writing(progress))
                except asyncio.CancelledError:
                    await self._last_save(progress)
                    raise
                except Exception as exc:
                    error = exc
                else:
                    if failures:
                        progress.claim.mark_unsaved(False)
                        log.warning(
                            "queue: %s: delivery state saved after %d failed tries; "
                            "deliveries resume",
                            id,
                            failures,
                        )
                    return True
                finally:
                    claim.saved()
            failures += 1
            progress.claim.mark_unsaved(True)
            if self._saves_end:
                log.error(
                    "queue: %s: stopping with the delivery state not saved (%s): "
                    "the last attempt is repeated at the next start",
                    id,
                    _reason(error),
                )
                return False
            if not poked:
                steps += 1
            wait = backoff(steps, self.settings)
            log.error(
                "queue: %s: cannot save the delivery state (%s); its outcomes are kept "
                "in memory and its deliveries held until it is saved: next try in %s",
                id,
                _reason(error),
                _age(wait),
                exc_info=(type(error), error, error.__traceback__)
                if not isinstance(error, OSError)
                else None,
            )
            error = None
            poked = False
            try:
                await asyncio.wait_for(self._retry_saves.wait(), wait)
                poked = True
            except asyncio.TimeoutError:
                pass
            except asyncio.CancelledError:
                await self._last_save(progress)
                raise

    async def _last_save(self, progress: _Progress) -> None:
        """The attempt is cancelled (the runner stops): make what it settled
        durable before giving up, so that only the deliveries that were in
        flight are repeated."""
        if not progress.unsaved:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._writing(progress)), LAST_SAVE_TIMEOUT)
        except Exception as exc:
            log.error(
                "queue: %s: stopping with the delivery state not saved (%s): "
                "the last attempt is repeated at the next start",
                progress.message.id,
                _reason(exc),
            )

    def _writing(self, progress: _Progress) -> asyncio.Task[None]:
        """The task that writes what ``progress`` settled: the one under way
        (which takes what came in meanwhile before it ends), or a new one."""
        task = progress.writer
        if task is None or task.done():
            task = progress.writer = asyncio.get_running_loop().create_task(self._write(progress))
        return task

    async def _write(self, progress: _Progress) -> None:
        """Queue the reports, tell the observers, then save the state (or
        remove the message once every recipient is done), until nothing
        settled is left unwritten. Each report leaves the list once queued
        (never queued twice); the state is taken after the last report is
        queued, with no wait in between, so that a recipient saved as
        bounced always has its report queued."""
        message = progress.message
        while progress.unsaved:
            # The reports first: an observer of bonzo_bounced is told once
            # the sender's report is queued (or a plugin took it over). What
            # came in while an observer ran is reported before the state is
            # taken.
            while progress.reports or progress.observed:
                while progress.reports:
                    id = await self._report(message, progress.reports[0])
                    del progress.reports[0]
                    if id:
                        progress.queued.append(id)
                if progress.observed:
                    hook, who = progress.observed.pop(0)
                    if self.plugins is not None:
                        await self.plugins.observe(hook, (message, who))
            if message.next_due is None:
                await self._remove(progress)
                return
            if progress.saved == progress.changes:
                continue  # (observers or reports came in meanwhile)
            changes = progress.changes
            data = self.spool.state_data(message)
            # Set first: a state file renamed into place before a failure
            # must go with the message.
            message.has_state = True
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.spool.write_state, message.id, data
            )
            progress.saved = changes

    def _claim_and_load(self, id: str) -> tuple[Claim, QueuedMessage] | None:
        """Blocking: claim message ``id`` and read it (one trip to a thread)."""
        claim = self.spool.claim(id)
        if claim is None:
            return None
        try:
            return claim, self.spool.load(id)
        except BaseException:
            claim.release()
            raise

    async def _remove(self, progress: _Progress) -> None:
        """Remove a finished message and release its claim, in the committer's
        thread (:meth:`GroupSync.remove`): the unlinks, then the close that
        drops the claim and frees the inode, wait for the file system's
        journal, and the directory fsync that makes the removal durable is
        shared with the other removals and acceptances of the moment."""
        message = progress.message
        paths = self.spool.paths(message.id, state=message.has_state)
        try:
            await self.sync.remove(paths, progress.claim.detach())
        except Exception:
            # The claim went with the removal that failed: take it again
            # while the message is there, or another worker could deliver
            # it from its old state.
            loop = asyncio.get_running_loop()
            claim = await loop.run_in_executor(self._executor, self.spool.claim, message.id)
            if claim is not None:
                progress.claim = claim
            elif not self.spool.present(message.id):
                progress.removed = True  # its data file is gone: so is the message
            raise
        progress.removed = True

    async def give_up(
        self, id: str, reason: str, wait: float = 10.0, *, claim: Claim | None = None
    ) -> str | None:
        """Bounce every undelivered recipient of message ``id`` now (``bonzo
        queue bounce``): the sender gets a failure report saying ``reason``
        and the message leaves the queue. Returns the report's queue id
        (``""`` if no report was due), or ``None`` if the message could not
        be claimed within ``wait`` seconds. ``claim``: the message's claim,
        taken by the caller (released here)."""
        loop = asyncio.get_running_loop()
        handed = self._handed.pop(id, None)
        if handed is not None:
            claim, message = handed
        elif claim is None:
            claimed = await loop.run_in_executor(
                self._executor, lambda: self.spool.claim(id, wait=wait)
            )
            if claimed is None:
                return None
            claim = claimed
        progress: _Progress | None = None
        try:
            if handed is None:
                message = await loop.run_in_executor(self._executor, self.spool.load, id)
            progress = _Progress(message, claim)
            outcomes = {
                i: Outcome("failed", 550, "5.0.0", reason, "postmaster", attempted=False)
                for i in message.pending
            }
            self._apply(progress, outcomes)
            await self._writing(progress)
            self._due.pop(id, None)
            return progress.queued[0] if progress.queued else ""
        finally:
            (progress.claim if progress is not None else claim).release()

    def _free(self, destination: str) -> None:
        """A delivery to ``destination`` ended: wake one message waiting for it."""
        waiting = self._busy.get(destination)
        if waiting:
            id = next(iter(waiting))
            self._unpark(id)
            self._set_due(id, 0.0)
            self._wake.set()

    def _at_limit(self, destination: str) -> bool:
        """``per_destination`` deliveries to ``destination`` are under way."""
        return self._active.get(destination, 0) >= self.settings.per_destination

    def _unpark(self, id: str) -> None:
        """``id`` is being tried: it no longer waits for any destination (a
        wake-up there must go to a message that does)."""
        self._parked.pop(id, None)
        for destination in [d for d, waiting in self._busy.items() if id in waiting]:
            waiting = self._busy[destination]
            del waiting[id]
            if not waiting:
                del self._busy[destination]

    def _keep_parked(self) -> None:
        """After a scan: a message parked for a destination that is still at
        its limit stays parked (a delivery there ends and wakes it), due only
        when its other recipients are; one whose destination has room again
        keeps the scan's due time (the net under a lost wake-up). Messages
        that left the queue are forgotten."""
        due = self._due
        for destination in list(self._busy):
            waiting = self._busy[destination] = {
                id: None for id in self._busy[destination] if id in due
            }
            if not waiting:
                del self._busy[destination]
                continue
            if not self._at_limit(destination):
                continue
            for id in waiting:
                other = self._parked.get(id)
                if other is None:
                    due.pop(id, None)
                else:
                    self._set_due(id, other)
        still: set[str] = set().union(*self._busy.values())
        for id in [id for id in self._parked if id not in still]:
            del self._parked[id]

    async def _deliver(
        self, message: QueuedMessage, due: list[int], progress: _Progress
    ) -> dict[str, list[int]]:
        """Deliver to the ``due`` recipients, each group's outcomes applied
        and written (:meth:`_settled`) as soon as the group ends. Returns
        the destinations not tried because ``per_destination`` deliveries to
        them were under way, with their recipients (who get no outcome: a
        busy destination must not hold the slots other destinations need)."""
        groups: dict[tuple[int, str], tuple[Any, list[int]]] = {}
        outcomes: dict[int, Outcome] = {}
        busy: dict[str, list[int]] = {}
        postmaster = self.settings.postmaster
        for i in due:
            recipient = message.recipients[i]
            if postmaster and not recipient.domain and recipient.address.lower() == "postmaster":
                # Queued bare by an older version (it then waited for ever).
                _to_postmaster(recipient, postmaster)
            transport = await self._route(message, recipient)
            if transport is None and message.transport is not None:
                # Quarantined, bound to a transport a reload took away: the
                # routes are not the problem. Kept, as for a missing route.
                if not outcomes:
                    # It is bound to the name: setting quarantine to another
                    # transport does not move it.
                    log.error(
                        "queue: %s: quarantined message: transport %r is not configured "
                        "(a reload removed or renamed it?): add a transport named %r back "
                        "to [plugins.queue.transports] (a one-folder maildir will do), "
                        "then run `bonzo queue flush`; the message waits",
                        message.id,
                        message.transport,
                        message.transport,
                    )
                outcomes[i] = Outcome(
                    "deferred",
                    451,
                    "4.3.5",
                    "Quarantine transport not configured",
                    "queue",
                    never_expires=True,
                )
                continue
            if (
                transport is not None
                and message.transport is not None
                and _by_recipient(transport)
                and not message.quarantined_for(recipient)
            ):
                # Quarantined for its own recipients (a one-folder maildir
                # quarantine, or queued by an older version), and the name
                # now delivers by recipient (a reload): it would reach their
                # mailboxes. Kept, never delivered there.
                if not outcomes:
                    log.error(
                        "queue: %s: quarantined message not delivered: transport %r now "
                        "delivers to each recipient (%s), and the message is not recorded "
                        "as queued for a quarantine_recipient (queued for its own "
                        "recipients, or by an earlier version): it could reach their "
                        "mailboxes. Make %r a one-folder maildir and run `bonzo queue "
                        "flush`, or save it (`bonzo queue show %s`) and `bonzo queue "
                        "delete %s`; the message waits",
                        message.id,
                        message.transport,
                        transport.kind,
                        message.transport,
                        message.id,
                        message.id,
                    )
                outcomes[i] = Outcome(
                    "deferred",
                    451,
                    "4.3.5",
                    "Quarantine transport delivers by recipient",
                    "queue",
                    never_expires=True,
                )
                continue
            if transport is None:
                # A configuration mistake, not the sender's: keep the mail.
                is_postmaster = bool(postmaster) and recipient.canonical == _canonical(postmaster)
                log.error(
                    "queue: %s: no route for <%s> (domain %r): add one to "
                    '[plugins.queue.routes], or a "*" route%s',
                    message.id,
                    log_escape(recipient.address),
                    recipient.domain,
                    " (this is where mail to the bare <postmaster> goes: "
                    "[plugins.queue] postmaster)"
                    if is_postmaster
                    else "",
                )
                outcomes[i] = Outcome(
                    "deferred", 451, "4.3.5", "No route configured", "queue", never_expires=True
                )
                continue
            key = (id(transport), transport.destination(recipient))
            groups.setdefault(key, (transport, []))[1].append(i)
        if outcomes:
            # Written with the first group's outcomes (or once all end).
            self._apply(progress, outcomes)

        async def one(transport: Any, destination: str, idx: list[int]) -> None:
            recipients = [message.recipients[i] for i in idx]
            active = self._active
            if self._at_limit(destination):
                busy.setdefault(destination, []).extend(idx)
                return
            active[destination] = active.get(destination, 0) + 1
            limit = self.settings.delivery_timeout
            # Bonzo's client ends the transaction by the deadline itself,
            # keeping the replies already in (an LMTP recipient's 250); the
            # wait_for is for a transport that does not.
            token = client_deadline.set(asyncio.get_running_loop().time() + limit)
            try:
                try:
                    results = await asyncio.wait_for(
                        transport.deliver(message, recipients), limit + DEADLINE_GRACE
                    )
                finally:
                    client_deadline.reset(token)
                    left = active[destination] - 1
                    if left:
                        active[destination] = left
                    else:
                        del active[destination]
                if len(results) != len(idx):
                    raise RuntimeError(
                        f"{transport.kind} gave {len(results)} outcomes for {len(idx)} recipients"
                    )
            except asyncio.TimeoutError:
                results = [Outcome.deferred(451, "4.4.2", "Delivery timed out", destination)] * len(
                    idx
                )
            except Exception as exc:
                log.error(
                    "queue: %s delivery of %s to %s failed: %s",
                    transport.kind,
                    message.id,
                    destination,
                    exc,
                    exc_info=True,
                )
                results = [Outcome.deferred(451, "4.3.0", "Local error", destination)] * len(idx)
            finally:
                self._free(destination)
            await self._settled(progress, dict(zip(idx, results, strict=True)))

        progress.ending = {}
        try:
            await asyncio.gather(
                *(one(transport, key[1], idx) for key, (transport, idx) in groups.items())
            )
        finally:
            ending, progress.ending = progress.ending, None
        if ending:
            self._apply(progress, ending)
        return busy

    async def _settled(self, progress: _Progress, outcomes: dict[int, Outcome]) -> None:
        """A group's delivery ended: apply its outcomes at once (in memory:
        nothing the destination answered is lost to a cancellation from
        here on) and write them. A write that fails is tried again by the
        next group to end, and after the last by :meth:`_make_durable`.
        Outcomes that end a recipient for good wait for the last group
        (:attr:`_Progress.ending`)."""
        ending = progress.ending
        if ending is not None:
            now = self.clock()
            for i in [i for i, o in outcomes.items() if self._final(progress.message, o, now)]:
                ending[i] = outcomes.pop(i)
        if outcomes:
            self._apply(progress, outcomes)
        elif progress.error is None:
            return  # nothing to write
        # (else an earlier group's write failed: this group's end tries again.)
        try:
            # Shielded: a stop that cancels the other deliveries lets the
            # write of this one's outcomes finish.
            await asyncio.shield(self._writing(progress))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            progress.error = exc  # logged once tried again (or by _make_durable)
        else:
            if progress.error is not None:
                log.warning(
                    "queue: %s: delivery state saved after a failed try (%s)",
                    progress.message.id,
                    _reason(progress.error),
                )
                progress.error = None

    async def _route(self, message: QueuedMessage, recipient: Recipient) -> Any:
        if message.transport is not None:
            # Quarantined: the operator's transport, whatever plugins or routes say.
            return self.routes.named.get(message.transport)
        if self.plugins is not None and self.plugins.calls["bonzo_route"]:
            try:
                verdict = await self.plugins.decide("bonzo_route", (message, recipient))
            except (Refused, PluginFailure) as exc:
                log.error("queue: bonzo_route failed for %s: %s", recipient.address, exc)
                verdict = None
            if verdict is not None:
                transport = self.routes.named.get(verdict[1])
                if transport is not None:
                    return transport
                log.error(
                    "queue: plugin %r chose route %r, which is not configured; "
                    "using the route table",
                    verdict[0],
                    verdict[1],
                )
        return self.routes.route(recipient)

    def _expired(self, message: QueuedMessage, outcome: Outcome, now: float) -> bool:
        """``message`` has outlived its lifetime for ``outcome``'s recipient
        (one the operator must fix never does)."""
        return now - message.arrival >= self.settings.lifetime and not outcome.never_expires

    def _final(self, message: QueuedMessage, outcome: Outcome, now: float) -> bool:
        """``outcome`` ends its recipient without a delivery: refused for
        good, or past the message's lifetime (see :meth:`_apply`)."""
        return outcome.status == "failed" or (
            outcome.status != "delivered" and self._expired(message, outcome, now)
        )

    def _apply(self, progress: _Progress, outcomes: dict[int, Outcome]) -> None:
        """Apply the outcomes to the recipients (in memory) and log them;
        leave the reports and the observers' calls to :meth:`_write`."""
        message = progress.message
        now = self.clock()
        settings = self.settings
        delivered: list[Recipient] = []
        deferred: list[Recipient] = []
        bounced: list[ReportLine] = []
        success: list[ReportLine] = []
        some_delivered = any(o.status == "delivered" for o in outcomes.values())
        tls_of: dict[int, str] = {}  # id(recipient) -> how its delivery was protected
        next_round: list[Recipient] = []  # past the server's limit per transaction
        # A quarantine copy is never lost nor reported to the sender (NOTIFY=NEVER
        # whatever its parameters): refused for good, or past its lifetime,
        # it is held for the operator.
        quarantined = message.transport is not None
        kept: list[Recipient] = []
        for i, outcome in outcomes.items():
            r = message.recipients[i]
            expired = self._expired(message, outcome, now)
            # The server's limit per transaction (RFC 3463 X.5.3) is no
            # failure: the rest go in the next transaction now, and that
            # round is no attempt (it would grow the back-off of a later
            # real deferral, and read as one in `bonzo queue show`).
            again = (
                outcome.too_many and some_delivered and outcome.status == "deferred" and not expired
            )
            if outcome.attempted and not again:
                r.attempts += 1
                r.last_attempt = now
            r.reply = outcome.reply
            r.host = outcome.host
            r.remote = outcome.remote
            if outcome.status == "delivered":
                r.status = "delivered"
                r.done_at = now
                delivered.append(r)
                tls_of[id(r)] = outcome.tls
                action = "relayed" if outcome.relayed else "delivered"
                if not quarantined and wants_report(r, action) and not outcome.dsn_downstream:
                    success.append(
                        ReportLine(r, action, outcome.enhanced, outcome.reply, r.remote_mta)
                    )
            elif quarantined and (outcome.status == "failed" or expired):
                r.status = "deferred"
                r.next_attempt = now  # due again as soon as it is released
                message.held = True
                kept.append(r)
            elif outcome.status == "failed" or expired:
                r.status = "bounced"
                r.done_at = now
                expired = outcome.status != "failed"
                status = "4.4.7" if expired and outcome.enhanced[:1] != "5" else outcome.enhanced
                if status[:1] != "5":
                    status = "5" + status[1:]
                # The reply stays as the server gave it (a report's
                # Diagnostic-Code); the expiry is said beside it.
                note = f"message expired after {_age(now - message.arrival)}" if expired else ""
                bounced.append(
                    ReportLine(r, "failed", status, outcome.reply, r.remote_mta, note=note)
                )
            elif again:
                r.status = "deferred"
                r.next_attempt = now
                next_round.append(r)
            else:
                r.status = "deferred"
                r.next_attempt = now + backoff(r.attempts, settings)
                deferred.append(r)
                if outcome.never_expires:
                    progress.endless.add(id(r))
        for r in delivered:
            tls = tls_of.get(id(r), "")
            log.info(
                "queue: %s to=<%s> delivered: %s (%s)%s",
                message.id,
                log_escape(r.address),
                _one_line(r.reply),
                r.host,
                f" tls={tls}" if tls else "",
            )
        for r in deferred:
            log.info(
                "queue: %s to=<%s> deferred: %s (%s); next attempt in %s",
                message.id,
                log_escape(r.address),
                _one_line(r.reply),
                r.host,
                _age(r.next_attempt - now),
            )
        for r in next_round:
            log.info(
                "queue: %s to=<%s> not taken in this transaction: %s (%s); next transaction now",
                message.id,
                log_escape(r.address),
                _one_line(r.reply),
                r.host,
            )
        for line in bounced:
            log.warning(
                "queue: %s to=<%s> bounced: %s%s (%s)",
                message.id,
                log_escape(line.recipient.address),
                _one_line(line.diagnostic),
                f" ({line.note})" if line.note else "",
                line.recipient.host,
            )
        for r in kept:
            log.error(
                "queue: %s: quarantine copy to=<%s> held, not bounced: %s (%s)%s. Fix what "
                "refused it (the quarantine_recipient, the transport %r, the mailbox), then "
                "`bonzo queue release %s`",
                message.id,
                log_escape(r.address),
                _one_line(r.reply),
                r.host,
                " (past its lifetime)" if r.reply[:1] != "5" else "",
                message.transport,
                message.id,
            )
        for lines in ([b for b in bounced if wants_report(b.recipient, "failed")], success):
            if lines:
                progress.reports.append(lines)
        progress.deferred.extend(deferred)
        progress.changes += 1
        if metrics.active is not None:
            metrics.active.queue_outcomes(len(delivered), len(deferred), len(bounced))
        if self.plugins is not None:
            for hook, who in (
                ("bonzo_delivered", delivered),
                ("bonzo_deferred", deferred),
                ("bonzo_bounced", [b.recipient for b in bounced]),
            ):
                if who:
                    progress.observed.append((hook, who))

    def _delay_notice(self, progress: _Progress) -> None:
        """Once every delivery of the attempt has ended: the delay notice
        (``delay_warning``), once per message, about the recipients still
        deferred."""
        message, settings, now = progress.message, self.settings, self.clock()
        deferred = [r for r in progress.deferred if r.status == "deferred"]
        if (
            settings.delay_warning
            and message.transport is None  # a quarantine copy: never a report
            and not message.warned
            and deferred
            and now - message.arrival >= settings.delay_warning
        ):
            until = message.arrival + settings.lifetime
            lines = [
                ReportLine(
                    r, "delayed", _transient(r.reply), r.reply, r.remote_mta,
                    will_retry_until=0.0 if id(r) in progress.endless else until,
                )
                for r in deferred
                if wants_report(r, "delayed")
            ]  # fmt: skip
            if lines:
                progress.reports.append(lines)
            message.warned = True
            progress.changes += 1

    async def _report(self, message: QueuedMessage, lines: Sequence[ReportLine]) -> str:
        """Queue one report about ``lines`` to the message's sender; return its
        queue id (``""`` when none was queued)."""
        if not lines:
            return ""
        if message.sender == "":
            again = await self._report_in_7bit(message, lines)
            if again:
                return again
            log.warning(
                "queue: %s: not reporting %s for %s to the null sender",
                message.id,
                lines[0].action,
                ", ".join(f"<{line.recipient.address}>" for line in lines),
            )
            return ""
        recipients = [line.recipient for line in lines]
        if self.plugins is not None and self.plugins.calls["bonzo_bounce"]:
            try:
                verdict = await self.plugins.decide("bonzo_bounce", (message, recipients))
            except (Refused, PluginFailure) as exc:
                log.error("queue: bonzo_bounce failed for %s: %s", message.id, exc)
                verdict = None
            if verdict is not None:
                log.info(
                    "queue: %s: report (%s) taken over by plugin %r",
                    message.id,
                    lines[0].action,
                    verdict[0],
                )
                return ""
        report = build_report(
            message,
            lines,
            self.settings.hostname,
            size_limit=self.settings.bounce_size_limit,
            now=self.clock(),
        )
        id = await self.inject(report, sender="", recipients=[message.sender],
                               session={"protocol": "report", "about": message.id})  # fmt: skip
        log.info(
            "queue: %s: %s report for %d recipient(s) queued as %s",
            message.id,
            lines[0].action,
            len(lines),
            id,
        )
        return id

    async def _report_in_7bit(self, message: QueuedMessage, lines: Sequence[ReportLine]) -> str:
        """A report of ours with 8-bit content (a returned message, a
        server's UTF-8 reply), refused here because the sender's server does
        not take it (``554 5.6.3``, RFC 6152): queue its 7-bit form
        (:func:`~.bounce.seven_bit`) to those recipients, rather than lose it
        (it is from the null sender: nobody would hear of it). Its queue id,
        or ``""``."""
        if message.session.get("protocol") != "report" or lines[0].action != "failed":
            return ""
        refused = [
            line.recipient.address
            for line in lines
            if line.status == "5.6.3" and not line.recipient.remote_mta
        ]
        if not refused:
            return ""
        loop = asyncio.get_running_loop()
        content = await loop.run_in_executor(self._executor, message.read)
        seven = seven_bit(content)
        if seven is None:
            return ""
        about = message.session.get("about", message.id)
        id = await self.inject(seven, sender="", recipients=refused,
                               session={"protocol": "report", "about": about})  # fmt: skip
        log.info(
            "queue: %s: report refused for %s (the server does not take 8-bit content): "
            "queued again in 7-bit form as %s",
            message.id,
            ", ".join(f"<{log_escape(a)}>" for a in refused),
            id,
        )
        return id

    async def report(self, message: QueuedMessage, lines: Sequence[ReportLine]) -> str:
        """Queue one report about ``lines`` to ``message``'s sender, as after an
        attempt (for a delivery made outside the queue); its queue id, or ``""``."""
        return await self._report(message, lines)

    async def inject(
        self,
        content: bytes,
        *,
        sender: str,
        recipients: list[str],
        session: dict[str, Any] | None = None,
        mail_params: dict[str, str | None] | None = None,
    ) -> str:
        """Queue a message made here (a report): durable before this returns."""
        id = new_session_id()
        rcpts = []
        for address in recipients:
            try:
                parsed = Address.parse(address)
                rcpts.append(
                    {"address": address, "canonical": parsed.canonical, "domain": parsed.domain}
                )
            except ValueError:
                rcpts.append({"address": address, "canonical": address, "domain": ""})
        if mail_params is None:
            mail_params = {}
            # A report is text (build_report returns binary originals as
            # their header section): 8BITMIME covers it, BINARYMIME never.
            if not content.isascii():
                mail_params["BODY"] = "8BITMIME"
            # An address in UTF-8 (a report to the sender of an SMTPUTF8
            # message: in the envelope and its To: field) needs SMTPUTF8
            # (RFC 6531 3.2); UTF-8 only inside the report's parts does not.
            head = content.partition(b"\r\n\r\n")[0]
            if not (sender.isascii() and all(a.isascii() for a in recipients) and head.isascii()):
                mail_params["SMTPUTF8"] = None
        envelope = {
            "arrival": self.clock(),
            "sender": sender,
            "mail_params": mail_params,
            "recipients": rcpts,
            "session": session or {},
            "records": {},
        }
        handed = await self.spool.accept(
            id, envelope, b"", io.BytesIO(content), self.sync, in_thread=len(content) > INLINE_SIZE
        )
        self.kick(id, handed)
        return id


def _by_recipient(transport: Any) -> bool:
    """Whether ``transport`` delivers to each recipient on its own
    (:attr:`.outcome.Transport.by_recipient`; one that does not say counts
    as one)."""
    return bool(getattr(transport, "by_recipient", True))


def _to_postmaster(recipient: Recipient, postmaster: str) -> None:
    """Make a recipient queued as the bare ``<postmaster>`` the address it
    is delivered as (:func:`~.spool.queued_recipient`), in memory."""
    record = queued_recipient(Address.parse(recipient.address), recipient.params, postmaster)
    recipient.address = record["address"]
    recipient.canonical = record["canonical"]
    recipient.domain = record["domain"]
    recipient.params = record["params"]


def _canonical(address: str) -> str:
    try:
        return Address.parse(address).canonical
    except ValueError:
        return address


def _busy_time() -> float:
    """Seconds the calling thread has been running or waiting for a CPU
    (Linux's per-thread scheduler statistics: on a machine shared with other
    busy processes a saturated loop runs less than all the time, but it is
    never idle); where those are missing, the thread's CPU time."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            running, waiting = f.read().split()[:2]
        return (int(running) + int(waiting)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


def _reason(exc: BaseException) -> str:
    """An error as a log line says it: an OSError's text and file name."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _transient(reply: str) -> str:
    parts = reply.split(" ")
    if len(parts) > 1 and parts[1][:2] == "4.":
        return parts[1]
    return "4.0.0"


def _one_line(text: str) -> str:
    """A server's reply (its lines joined by newlines) as one log line: what
    a server says can neither end the line nor forge another one."""
    text = text.replace("\n", " | ")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


#: The units of :func:`_age`, largest first.
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def _age(seconds: float) -> str:
    """A duration in its two largest units (``2m30s``, ``1h6m``, ``5d``): a
    lifetime of 150 s is not "2m"."""
    left = max(0, int(seconds))
    parts: list[str] = []
    for name, size in _UNITS:
        if parts or left >= size or size == 1:
            count, left = divmod(left, size)
            if count or not parts:
                parts.append(f"{count}{name}")
            if len(parts) == 2 or parts and not count:
                break
    return "".join(parts)

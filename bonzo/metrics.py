"""Prometheus metrics and the ``/health`` endpoint (the ``[metrics]`` table).

Off unless ``[metrics] port`` is set. Then ``bonzo serve`` makes a private
directory for prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, removed at exit), every worker counts into
it, and one process answers HTTP on ``[metrics] address``/``port``:
``/metrics`` (the sum over every worker) and ``/health``.

Counting is cheap on purpose. Writing a multiprocess value costs a few
microseconds (a lock and an ``mmap`` write), more than Bonzo spends on a
command, so the per-command counts (commands, replies, hook latencies) go
into plain dictionaries of the process and are added to the shared values
once a second (:data:`FLUSH_INTERVAL`) and before each scrape: a scrape may
miss the last second of the other workers. With metrics off, nothing is
counted and nothing on the per-command path looks: the session's protocol
core and the plugins' hook functions are wrapped only when metrics are on
(:meth:`Metrics.watch`, :meth:`Metrics.time_hooks`); per connection and per
message, one test of :data:`active` remains.

Labels take values from bounded sets only — verbs the server knows, plugin
names, hook names, reply classes — never a client's address, a name or a
verb a client made up (those count as ``"other"``).

The metrics are listed in the operations guide (``docs/operations.rst``).
"""

from __future__ import annotations

import asyncio
import fcntl
import inspect
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .listen import accept_on

if TYPE_CHECKING:  # pragma: no cover
    from .connection import SMTPConnection
    from .hooks import PluginSet
    from .protocol import Refusal, SMTPProtocol

__all__ = [
    "Metrics",
    "MetricsServer",
    "active",
    "FLUSH_INTERVAL",
    "HTTP_IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "HOOK_BUCKETS",
    "MULTIPROC_ENV",
    "make_multiprocess_dir",
    "remove_abandoned_dirs",
    "remove_multiprocess_dir",
    "mark_process_dead",
]

#: The process's :class:`Metrics` while metrics are on, else ``None``: the
#: one thing the code outside this module tests (per connection, per
#: message, per plugin fault), and what a plugin counts through.
active: Metrics | None = None

log = logging.getLogger("bonzo.metrics")

#: Seconds between two flushes of the process's counts into the shared values.
FLUSH_INTERVAL = 1.0

#: The default of ``[metrics] max_connections``: HTTP connections the metrics
#: listener keeps open at most (a scraper and a health checker or two need
#: one each).
MAX_CONNECTIONS = 16

#: Seconds an HTTP connection of the metrics listener may stay idle, or take
#: to send a request's headers: a scrape takes milliseconds.
HTTP_IDLE_TIMEOUT = 10.0

#: Seconds between two log lines about connections closed for the cap.
_CAP_LOG_INTERVAL = 60.0

#: Upper bounds, in seconds, of the hook latency histogram's buckets.
HOOK_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

#: The environment variable prometheus-client's multiprocess mode reads.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Stages that are not verbs.
_STAGES = frozenset({"connect", "message"})
#: TLS versions a session can have (anything else counts as ``"other"``).
_TLS_VERSIONS = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})
_CLASSES = {50: "2xx", 51: "3xx", 52: "4xx", 53: "5xx"}  # the first octet of a reply
_INF = float("inf")
_BOUNDS = (*HOOK_BUCKETS, _INF)


_DIR_PREFIX = "bonzo-metrics-"
# Held (flock) by the daemon that made the directory, and by its workers,
# which inherit the descriptor: the kernel lets go when the last of them is
# gone, however it ended, so a lock anyone can take marks a directory left
# behind (a supervisor killed with SIGKILL cannot remove its own).
_LOCK_NAME = ".lock"
_held_locks: dict[str, int] = {}


def make_multiprocess_dir() -> str:
    """Create a private directory for the multiprocess values in the
    temporary directory and point :data:`MULTIPROC_ENV` at it (before
    prometheus-client is imported). The directory holds a lock for as long
    as this process or a process forked from it runs; directories of this
    user whose lock no process holds any more (a daemon killed with
    SIGKILL) are removed first, and logged."""
    base = tempfile.gettempdir()
    left = remove_abandoned_dirs(base)
    if left:
        log.info("metrics: removed %d directory(ies) a stopped daemon left in %s", len(left), base)
    path = tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=base)
    # Locked under another name, then renamed: a daemon sweeping meanwhile
    # never sees an unlocked ".lock" in a directory still in use.
    fresh = os.path.join(path, _LOCK_NAME + ".new")
    fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(fresh, os.path.join(path, _LOCK_NAME))
    _held_locks[path] = fd
    os.environ[MULTIPROC_ENV] = path
    return path


def remove_abandoned_dirs(base: str) -> list[str]:
    """Remove the directories of :func:`make_multiprocess_dir` in ``base``
    that belong to this user and whose lock no process holds; return them.
    A directory without the lock (being made, or made by an older Bonzo)
    is left alone."""
    removed: list[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        if not name.startswith(_DIR_PREFIX):
            continue
        path = os.path.join(base, name)
        try:
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
                continue
            fd = os.open(os.path.join(path, _LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # in use
        else:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def remove_multiprocess_dir(path: str) -> None:
    """Remove the directory of :func:`make_multiprocess_dir`."""
    shutil.rmtree(path, ignore_errors=True)
    fd = _held_locks.pop(path, None)
    if fd is not None:
        os.close(fd)
    if os.environ.get(MULTIPROC_ENV) == path:
        del os.environ[MULTIPROC_ENV]


def mark_process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (its open connections) from the sum."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Metrics:
    """The metrics of one process.

    :arg registry: where the metrics are registered (default: a new
        :class:`prometheus_client.CollectorRegistry`). In multiprocess mode
        every process writes to the shared directory whatever the registry;
        :meth:`exposition` reads them all.
    :arg plugins: the plugin names that may be a label (others: ``"other"``).
    """

    def __init__(self, registry: Any = None, plugins: Iterable[str] = ()) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.plugin_names = frozenset(plugins) | {"core"}
        r = self.registry
        self.c_connections_open = Gauge(
            "bonzo_connections_open",
            "Client connections open now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.c_connections = Counter(
            "bonzo_connections", "Client connections accepted.", registry=r
        )
        self.c_refused = Counter(
            "bonzo_connections_refused",
            "Connections refused before any command, by reason.",
            ["reason"],
            registry=r,
        )
        self.c_commands = Counter(
            "bonzo_commands", "Command lines received, by verb.", ["verb"], registry=r
        )
        self.c_replies = Counter(
            "bonzo_replies",
            "Replies sent, by stage and reply class.",
            ["stage", "code_class"],
            registry=r,
        )
        self.c_refusals = Counter(
            "bonzo_refusals",
            "4xx/5xx replies, by who decided (a plugin or the core), stage and class.",
            ["plugin", "stage", "code_class"],
            registry=r,
        )
        self.c_hook_seconds = Histogram(
            "bonzo_hook_duration_seconds",
            "Time a plugin's hook implementation took, awaiting included.",
            ["plugin", "hook"],
            buckets=HOOK_BUCKETS,
            registry=r,
        )
        self.c_failures = Counter(
            "bonzo_plugin_failures",
            "Plugin faults (an exception, a bad return value) and timeouts.",
            ["plugin", "hook", "kind"],
            registry=r,
        )
        self.c_messages = Counter(
            "bonzo_messages_accepted",
            "Messages answered 250, by disposition.",
            ["disposition"],
            registry=r,
        )
        self.c_bytes = Counter(
            "bonzo_messages_accepted_bytes",
            "Octets of the messages answered 250.",
            registry=r,
        )
        self.c_tls = Counter(
            "bonzo_tls_sessions", "Sessions that ended under TLS, by version.", ["version"],
            registry=r,
        )  # fmt: skip
        self.c_queue = Gauge(
            "bonzo_queue_messages",
            "Messages in the queue by state, as of a runner's last scan.",
            ["state"],
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.c_deliveries = Counter(
            "bonzo_queue_deliveries",
            "Outcomes of the queue's delivery attempts, per recipient.",
            ["outcome"],
            registry=r,
        )
        self.c_store_failures = Counter(
            "bonzo_store_failures",
            "Calls to the shared store ([redis]) that failed, by the plugin that "
            "made them and what it did then (its on_store_error).",
            ["plugin", "action"],
            registry=r,
        )
        # The process's counts since the last flush (see the module description).
        self.open = 0
        self._open_flushed: int | None = None
        self.connections = 0
        self.refused: dict[str, int] = {}
        self.commands: dict[str, int] = {}
        self.replies: dict[tuple[str, int], int] = {}
        self.refusals: dict[tuple[str, str, int], int] = {}
        self.hooks: dict[tuple[str, str], list[float]] = {}
        self.failures: dict[tuple[str, str, str], int] = {}
        self.messages: dict[str, int] = {}
        self.bytes = 0
        self.tls: dict[str, int] = {}
        self.deliveries: dict[str, int] = {}
        self.store_failures: dict[tuple[str, str], int] = {}
        self._children: dict[Any, Any] = {}
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ lifecycle
    def install(self, plugins: PluginSet | None = None) -> Metrics:
        """Make this the process's :data:`active` metrics; with ``plugins``,
        time their hooks (:meth:`time_hooks`). Returns ``self``."""
        global active
        active = self
        if plugins is not None:
            self.plugin_names = self.plugin_names | frozenset(plugins.names)
            self.time_hooks(plugins)
        return self

    def uninstall(self) -> None:
        """Flush, stop the flush timer, and stop being :data:`active`."""
        global active
        self.stop_flushing()
        self.flush()
        if active is self:
            active = None

    def start_flushing(self, interval: float = FLUSH_INTERVAL) -> None:
        """Flush every ``interval`` seconds on the running event loop."""
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.flush()
            self._timer = loop.call_later(interval, tick)

        self._timer = loop.call_later(interval, tick)

    def stop_flushing(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------ counting
    def watch(self, core: SMTPProtocol) -> None:
        """Count the commands, replies and refusals of one session's protocol
        core, by wrapping its line handler, reply queue and refusal callback
        (so that a session of a server without metrics does no such work)."""
        commands, replies, refusals = self.commands, self.replies, self.refusals
        verbs = core.verbs
        names = self.plugin_names
        # The wrappers become attributes of the core: they reach it through a
        # weak reference and its class's functions, not its bound methods, so
        # that they make no reference cycle (the session is freed by
        # reference counting as soon as it ends).
        weak_core = weakref.ref(core)
        handle_line = type(core)._handle_line
        queue = type(core)._queue
        on_refusal = core.on_refusal
        refused = self.refused

        def counted_line(raw: bytes, bare_lf: bool = False) -> Any:
            core = weak_core()
            assert core is not None  # it is the core calling
            result = handle_line(core, raw, bare_lf)
            verb = core.stage
            if verb not in verbs:
                verb = "other"
            commands[verb] = commands.get(verb, 0) + 1
            return result

        def counted_reply(wire: bytes) -> None:
            core = weak_core()
            assert core is not None
            queue(core, wire)
            stage = core.stage
            if stage not in verbs and stage not in _STAGES:
                stage = "other"
            key = (stage, wire[0])
            replies[key] = replies.get(key, 0) + 1

        def counted_refusal(refusal: Refusal) -> None:
            if on_refusal is not None:
                on_refusal(refusal)
            by = refusal.by if refusal.by in names else "other"
            stage = refusal.stage
            if stage not in verbs and stage not in _STAGES:
                stage = "other"
            key = (by, stage, refusal.code // 100)
            refusals[key] = refusals.get(key, 0) + 1
            if stage == "connect" and by != "core":
                refused["plugin"] = refused.get("plugin", 0) + 1

        core._handle_line = counted_line  # type: ignore[method-assign]
        core._queue = counted_reply  # type: ignore[method-assign]
        core.on_refusal = counted_refusal

    def time_hooks(self, plugins: PluginSet) -> None:
        """Time every hook implementation of ``plugins`` (wraps each
        resolved call; calls resolved later are not timed)."""
        for hook, calls in plugins.calls.items():
            for call in calls:
                if getattr(call.function, "_bonzo_timed", False):
                    continue
                entry = self.hooks.setdefault((call.plugin, hook), [0.0] * (len(_BOUNDS) + 1))
                call.function = _timed(call.function, entry)

    def connection_opened(self, connection: SMTPConnection, limit: str | None) -> None:
        """A connection was accepted (``limit``: the limit that refuses it)."""
        self.open += 1
        self.connections += 1
        if limit is not None:
            self.refused[limit] = self.refused.get(limit, 0) + 1
        self.watch(connection.protocol)

    def connection_refused(self, reason: str) -> None:
        """A connection was refused after it was accepted: a PROXY header
        named a client over its limit, or the header was not believed, bad
        or missing (``"proxy"``)."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def connection_closed(self, connection: SMTPConnection) -> None:
        self.open -= 1
        info = connection.protocol.tls_info
        if info:
            version = info.get("version") or ""
            version = version if version in _TLS_VERSIONS else "other"
            self.tls[version] = self.tls.get(version, 0) + 1

    def message_accepted(self, size: int, disposition: str) -> None:
        """A message was answered ``250``: ``delivered``, ``quarantined``
        or ``discarded``."""
        self.messages[disposition] = self.messages.get(disposition, 0) + 1
        self.bytes += size

    def plugin_failure(self, plugin: str, hook: str, error: BaseException) -> None:
        """A plugin failed (``kind`` ``timeout`` or ``error``)."""
        kind = "timeout" if isinstance(error, TimeoutError) else "error"
        key = (plugin if plugin in self.plugin_names else "other", hook, kind)
        self.failures[key] = self.failures.get(key, 0) + 1

    def queue_outcomes(self, delivered: int, deferred: int, bounced: int) -> None:
        """Recipients delivered, deferred and bounced by one queue attempt."""
        d = self.deliveries
        for outcome, n in (("delivered", delivered), ("deferred", deferred), ("bounced", bounced)):
            if n:
                d[outcome] = d.get(outcome, 0) + n

    def store_failure(self, plugin: str, action: str) -> None:
        """A call of ``plugin`` to the shared store failed; it then did
        ``action``: ``accept`` (went on without the store) or ``tempfail``
        (answered ``451``)."""
        key = (plugin if plugin in self.plugin_names else "other", action)
        self.store_failures[key] = self.store_failures.get(key, 0) + 1

    def queue_depth(self, counts: dict[str, int]) -> None:
        """The queue's messages by state (written at once: it is rare)."""
        for state, n in counts.items():
            self.c_queue.labels(state).set(n)

    # ------------------------------------------------------------ flushing
    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels) if labels else metric
        return child

    def flush(self) -> None:
        """Add the process's counts since the last flush to the shared values."""
        child = self._child
        if self.open != self._open_flushed:
            self.c_connections_open.set(self.open)
            self._open_flushed = self.open
        if self.connections:
            self.c_connections.inc(self.connections)
            self.connections = 0
        if self.bytes:
            self.c_bytes.inc(self.bytes)
            self.bytes = 0
        for metric, counts in (
            (self.c_refused, self.refused),
            (self.c_commands, self.commands),
            (self.c_messages, self.messages),
            (self.c_tls, self.tls),
            (self.c_deliveries, self.deliveries),
        ):
            if counts:
                for label, n in counts.items():
                    child(metric, label).inc(n)
                counts.clear()
        if self.replies:
            for (stage, first), n in self.replies.items():
                child(self.c_replies, stage, _CLASSES.get(first, "other")).inc(n)
            self.replies.clear()
        if self.refusals:
            for (by, stage, cls), n in self.refusals.items():
                child(self.c_refusals, by, stage, f"{cls}xx").inc(n)
            self.refusals.clear()
        for metric, pairs in (
            (self.c_failures, self.failures),
            (self.c_store_failures, self.store_failures),
        ):
            if pairs:
                for labels, n in pairs.items():
                    child(metric, *labels).inc(n)
                pairs.clear()
        for (plugin, hook), entry in self.hooks.items():
            total = entry[-1]
            if not total and not any(entry[:-1]):
                continue
            histogram = child(self.c_hook_seconds, plugin, hook)
            # The histogram's own per-bucket values (what observe() adds to):
            # one write per bucket that moved, not one per observation.
            for i in range(len(_BOUNDS)):
                moved = entry[i]
                if moved:
                    histogram._buckets[i].inc(moved)
                    entry[i] = 0.0
            histogram._sum.inc(total)
            entry[-1] = 0.0

    def exposition(self) -> bytes:
        """The text exposition of every process's metrics (this one's
        flushed first)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        self.flush()
        if not self.multiprocess:
            return bytes(generate_latest(self.registry))
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(registry))


def _timed(function: Callable[..., Any], entry: list[Any]) -> Callable[..., Any]:
    """``function`` counting the time of each call (awaiting its result
    included) into ``entry``: per-bucket counts, then the sum."""
    from time import perf_counter

    from .hookspecs import Accept

    isawaitable = inspect.isawaitable
    bounds = _BOUNDS

    async def awaited(result: Any, start: float) -> Any:
        try:
            return await result
        finally:
            elapsed = perf_counter() - start
            entry[bisect_left(bounds, elapsed)] += 1
            entry[-1] += elapsed

    def timed(*args: Any) -> Any:
        start = perf_counter()
        try:
            result = function(*args)
        except BaseException:
            elapsed = perf_counter() - start
            entry[bisect_left(bounds, elapsed)] += 1
            entry[-1] += elapsed
            raise
        if result is not None and type(result) is not Accept and isawaitable(result):
            return awaited(result, start)
        elapsed = perf_counter() - start
        entry[bisect_left(bounds, elapsed)] += 1
        entry[-1] += elapsed
        return result

    timed._bonzo_timed = True  # type: ignore[attr-defined]
    timed.__name__ = getattr(function, "__name__", "hook")
    timed.__wrapped__ = function  # type: ignore[attr-defined]
    return timed


class MetricsServer:
    """The HTTP listener: ``GET <path>`` (the exposition) and ``GET /health``.

    :arg metrics: the process's :class:`Metrics`.
    :arg path: where the exposition is (``[metrics] path``).
    :arg max_connections: HTTP connections kept open at most
        (``[metrics] max_connections``): accepting one more closes the
        oldest, so that the listener never holds more descriptors than that
        (those of the SMTP sessions of the same process are not its to take).

    ``/health`` answers ``200`` with ``{"status": "ok"}`` while the server
    serves, and ``503`` with ``{"status": "stopping"}`` once :attr:`stopping`
    is set (a graceful stop began).
    """

    def __init__(
        self, metrics: Metrics, path: str = "/metrics", max_connections: int = MAX_CONNECTIONS
    ) -> None:
        from tornado.httpserver import HTTPServer
        from tornado.web import Application, RequestHandler

        owner = self
        #: True once the server is stopping: ``/health`` answers 503.
        self.stopping = False
        self._stops: list[Callable[[], None]] = []
        self._sockets: list[socket.socket] = []
        self.max_connections = max_connections
        # The streams accepted, oldest first (closed ones are dropped as new
        # ones come).
        self._streams: list[Any] = []
        self._capped = 0  # connections closed for the cap since the last log line
        self._capped_logged = -_CAP_LOG_INTERVAL

        class Exposition(RequestHandler):
            def get(self) -> None:
                from prometheus_client import CONTENT_TYPE_LATEST

                self.set_header("Content-Type", CONTENT_TYPE_LATEST)
                self.write(metrics.exposition())

        class Health(RequestHandler):
            def get(self) -> None:
                status = "stopping" if owner.stopping else "ok"
                self.set_status(503 if owner.stopping else 200)
                self.set_header("Content-Type", "application/json")
                self.set_header("Cache-Control", "no-store")
                self.write(json.dumps({"status": status, "pid": os.getpid()}) + "\n")

        app = Application(
            [(_literal(path), Exposition), (r"/health", Health)],
            # Scrapes are not mail: nothing on the access log.
            log_function=lambda handler: None,
        )
        # Requests are a GET line and a few headers: small bounds for the rest.
        # The idle timeout is also the time allowed for a request's headers.
        self.http = HTTPServer(
            app,
            xheaders=False,
            idle_connection_timeout=HTTP_IDLE_TIMEOUT,
            max_header_size=16384,
            max_body_size=4096,
            body_timeout=10,
        )

    def add_sockets(self, sockets: list[socket.socket]) -> None:
        """Serve on ``sockets`` (listening), with the SMTP listeners' accept
        loop (:func:`bonzo.listen.accept_on`): out of descriptors, a scrape
        waits in the listen queue instead of making the loop spin."""
        from tornado.iostream import IOStream

        http = self.http

        def serve(connection: socket.socket, address: Any) -> None:
            self._make_room()
            stream = IOStream(
                connection,
                max_buffer_size=http.max_buffer_size,
                read_chunk_size=http.read_chunk_size,
            )
            self._streams.append(stream)
            http.handle_stream(stream, address)

        for sock in sockets:
            self._stops.append(accept_on(sock, serve, 16))
            self._sockets.append(sock)

    def _make_room(self) -> None:
        """Close the oldest connections until one more fits the cap. The
        oldest rather than the new one: idle connections held open by
        someone must not lock the scraper and the health checker out."""
        streams = [s for s in self._streams if not s.closed()]
        while len(streams) >= self.max_connections:
            streams.pop(0).close()
            self._capped += 1
        self._streams = streams
        if self._capped:
            now = time.monotonic()
            if now - self._capped_logged >= _CAP_LOG_INTERVAL:
                log.warning(
                    "metrics: %d connection(s) closed to stay within [metrics] "
                    "max_connections = %d since the last report",
                    self._capped,
                    self.max_connections,
                )
                self._capped, self._capped_logged = 0, now

    def stop_listening(self) -> None:
        """Stop accepting and close the listening sockets (as Tornado's
        ``stop()`` does); connections already open are served."""
        stops, self._stops = self._stops, []
        for stop in stops:
            stop()
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    async def close(self) -> None:
        """:meth:`stop_listening`, then close the connections."""
        self.stop_listening()
        self.http.stop()
        await self.http.close_all_connections()


def _literal(path: str) -> str:
    """A Tornado route pattern matching exactly ``path``."""
    import re

    return re.escape(path)

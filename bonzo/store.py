"""Shared state for plugins: counters and short-lived entries with expiry.

Rate limits and greylisting must remember what clients did, and when several
Bonzo processes (workers, machines) serve one domain they must remember it
together. :class:`Store` is the small interface such plugins use
(``app.store``): a sliding-window counter (:meth:`Store.hit`) and keys with a
time to live (:meth:`Store.get`, :meth:`Store.set`, :meth:`Store.delete`).

Two implementations, chosen by the ``[redis]`` table (:class:`StoreSettings`):

* :class:`MemoryStore` (no ``url``): in this process only, bounded by
  expiry and a cap on the number of keys (what a flood from one place made
  goes first: see :class:`MemoryStore`).
* :class:`RedisStore` (``url`` set): on a Redis server through redis-py's
  asyncio client (the optional ``redis`` extra), shared by every process
  that names the same server.

Every failure to reach the shared state raises :class:`StoreError`; the
plugin decides what that means (its documented failure mode), never the
client-facing code, so a local fault is never a permanent (5xx) reply.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .settings import SettingError, positive_seconds, spelled

__all__ = [
    "StoreSettings",
    "Store",
    "StoreError",
    "Hit",
    "MemoryStore",
    "RedisStore",
    "open_store",
    "redis_available",
]

log = logging.getLogger("bonzo.store")

#: URL schemes redis-py accepts: plain TCP, TLS, and a Unix socket.
REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_available() -> bool:
    """True if redis-py is installed (``pip install 'bonzo[redis]'``)."""
    return importlib.util.find_spec("redis") is not None


@dataclass(frozen=True)
class StoreSettings:
    """The ``[redis]`` table: where shared state lives.

    Every field is validated when the object is made (a
    :class:`~bonzo.settings.SettingError` naming the field). The defaults
    keep state in each process (:class:`MemoryStore`).
    """

    #: The Redis server, e.g. ``"redis://127.0.0.1:6379/0"``,
    #: ``"rediss://user@redis.example:6380/0"`` (TLS) or
    #: ``"unix:///run/redis/redis.sock?db=0"``. Empty: state stays in each
    #: process.
    url: str = ""
    #: A password that the URL does not hold (give it with ``$env`` or
    #: ``$file`` to keep it out of the file).
    password: str = ""
    #: Seconds to wait for a connection to Redis.
    connect_timeout: float = 1.0
    #: Seconds to wait for one command's answer. Plugins ask Redis while a
    #: client waits for a reply: keep this short.
    timeout: float = 1.0
    #: Seconds during which, after a failure to reach Redis, every call fails
    #: at once instead of waiting for its timeouts again.
    retry_interval: float = 5.0
    #: Connections to Redis each process keeps at most.
    max_connections: int = 50
    #: Put in front of every key, so that several clusters (or other
    #: programs) can share one Redis database.
    key_prefix: str = "bonzo:"
    #: Keys :class:`MemoryStore` keeps at most (when :attr:`url` is empty);
    #: the least recently used go first.
    memory_max_keys: int = 100_000

    @classmethod
    def field_names(cls) -> list[str]:
        """The names of the fields, in order (the keys of ``[redis]``)."""
        return [f.name for f in fields(cls)]

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise SettingError("url", f"must be a string, not {spelled(self.url)}")
        if self.url:
            try:
                parts = urlsplit(self.url)
            except ValueError as exc:  # "Invalid IPv6 URL": an unclosed bracket
                raise SettingError("url", f"{exc}: {safe_url(self.url)}") from None
            if parts.scheme not in REDIS_SCHEMES:
                raise SettingError(
                    "url",
                    f"must start with redis://, rediss:// or unix://, not {safe_url(self.url)}",
                )
            try:
                parts.port  # noqa: B018 - raises for a bad port
            except ValueError:
                raise SettingError("url", f"has a bad port: {safe_url(self.url)}") from None
            if parts.scheme != "unix" and not parts.hostname:
                raise SettingError("url", f"names no host: {safe_url(self.url)}")
            if parts.scheme == "unix" and not parts.path:
                raise SettingError("url", f"names no socket path: {safe_url(self.url)}")
            # redis-py reads the database number from the path (redis://h/2)
            # or the query (db=2), and fails at the first use on any other.
            dbs = [] if parts.scheme == "unix" else [parts.path.strip("/")]
            dbs += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k == "db"]
            if any(db and not (db.isascii() and db.isdigit()) for db in dbs):
                raise SettingError(
                    "url", f"has a bad database number (not 0, 1, 2...): {safe_url(self.url)}"
                )
            if not redis_available():
                raise SettingError("url", "redis-py is not installed (pip install 'bonzo[redis]')")
            if parts.scheme != "unix" and parts.port == 0:
                raise SettingError("url", f"has a bad port (0): {safe_url(self.url)}")
            for name, _ in parse_qsl(parts.query, keep_blank_values=True):
                instead = _SET_BY_BONZO.get(name)
                if instead is not None:
                    raise SettingError("url", f"sets {name}: {instead}: {safe_url(self.url)}")
        if not isinstance(self.password, str):
            raise SettingError("password", "must be a string")
        if self.password and self.url:
            parts = urlsplit(self.url)
            named = [k for k, _ in parse_qsl(parts.query) if k == "password"]
            if parts.password or named:
                raise SettingError("password", "the url holds a password too: give it in one place")
        for name in ("connect_timeout", "timeout", "retry_interval"):
            value = getattr(self, name)
            if not positive_seconds(value):
                raise SettingError(
                    name, f"must be a positive number of seconds, not {spelled(value)}"
                )
        for name, low, high in (("max_connections", 1, 10_000), ("memory_max_keys", 1, 10**8)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise SettingError(name, f"must be an integer {low}..{high}, not {spelled(value)}")
        if not isinstance(self.key_prefix, str) or len(self.key_prefix) > 100:
            raise SettingError("key_prefix", "must be a string of at most 100 characters")
        if self.url:
            self._check_client()

    def client_options(self) -> dict[str, Any]:
        """The arguments Bonzo gives redis-py's ``Redis.from_url`` besides
        the URL (whose options redis-py adds)."""
        options: dict[str, Any] = {
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": self.timeout,
            "max_connections": self.max_connections,
            "decode_responses": True,
            # A failed command is reported at once; the store's own
            # retry_interval decides when to try again.
            "retry_on_timeout": False,
            # RESP2 whatever redis-py's default (RESP3 from some version on):
            # the answers' shapes, and servers or proxies without RESP3.
            "protocol": 2,
        }
        if self.password:
            options["password"] = self.password
        return options

    def _check_client(self) -> None:
        """Make (without connecting) the connection redis-py would make, so
        that a URL option it does not know, a bad value, or a TLS file that
        cannot be read fails here and not at every use."""
        import redis.asyncio
        from redis.exceptions import RedisError

        parts = urlsplit(self.url)
        try:
            pool = redis.asyncio.ConnectionPool.from_url(self.url, **self.client_options())
            connection = pool.make_connection()  # type: ignore[no-untyped-call]
        except (TypeError, ValueError, RedisError) as exc:
            raise SettingError("url", f"{self._masked(exc)}: {safe_url(self.url)}") from None
        if parts.scheme != "rediss":
            return
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        for name in _TLS_FILES:
            path = options.get(name)
            if path and not os.access(path, os.R_OK):
                why = "no such file" if not os.path.exists(path) else "not readable"
                raise SettingError("url", f"{name}: {path}: {why}: {safe_url(self.url)}")
        context = getattr(connection, "ssl_context", None)  # (redis-py's, not public)
        if context is None:
            return
        try:
            context.get()  # reads the CA and certificate files
        except (OSError, ValueError, RedisError) as exc:
            raise SettingError(
                "url",
                f"its TLS options make no TLS context ({self._masked(exc)}): {safe_url(self.url)}",
            ) from None

    def _masked(self, exc: BaseException) -> str:
        """``exc`` for a message, never with a password in it."""
        text = f"{type(exc).__name__}: {exc}"
        parts = urlsplit(self.url)
        secrets = [self.password, parts.password or ""]
        secrets += [v for k, v in parse_qsl(parts.query) if "pass" in k.lower()]
        for secret in secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    @property
    def enabled(self) -> bool:
        """True when state is shared on Redis."""
        return bool(self.url)

    @property
    def where(self) -> str:
        """The server for log lines, without any password."""
        return safe_url(self.url) if self.url else "memory"


# URL options that would override what the [redis] table says, or what
# Bonzo relies on: refused, with what to do instead.
_SET_BY_BONZO = {
    "socket_timeout": "set [redis] timeout instead",
    "socket_connect_timeout": "set [redis] connect_timeout instead",
    "timeout": "set [redis] timeout instead",
    "max_connections": "set [redis] max_connections instead",
    "retry_on_timeout": "Bonzo sets it (a failure is retried after [redis] retry_interval)",
    "decode_responses": "Bonzo sets it",
    "protocol": "Bonzo speaks RESP2",
}
# URL options naming a file the TLS context reads (redis-py's names).
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ca_path")


def _safe_query(query: str) -> str:
    """``query`` with the value of every parameter whose name (decoded: redis-py
    reads ``p%61ssword`` as ``password``) holds ``pass`` shown as ``***``."""
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        name, equals, _ = parts[i].partition("=")
        if equals and "pass" in unquote(name).lower():
            parts[i] = f"{name}=***"
    return "".join(parts)


def safe_url(url: str) -> str:
    """``url`` without its password (in the authority or the query), for
    messages and ``bonzo config``."""
    scheme, colon, rest = url.partition(":")
    if not colon:
        scheme, rest = "", url
    slashes = rest[: len(rest) - len(rest.lstrip("/"))]
    rest = rest[len(slashes) :]
    if "@" in rest:
        # The password is all between the first ":" and the last "@" (one
        # may hold "/", "?" or "#", which a URL parser takes for the end of
        # the authority; a mistyped "redis:/" has no authority at all):
        # hidden by the "@", not by a parse.
        userinfo, _, rest = rest.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        shown = f"{user}:***@" if has_password and not any(c in user for c in "/?#") else "***@"
        return f"{scheme}{colon}{slashes}{shown}{_safe_after_authority(rest)}"
    return f"{scheme}{colon}{slashes}{_safe_after_authority(rest)}"


def _safe_after_authority(rest: str) -> str:
    head, mark, query = rest.partition("?")
    return head + mark + _safe_query(query)


class StoreError(Exception):
    """The shared state could not be read or written (Redis down, slow or
    refusing). The message is for the log, never for the client."""


@dataclass(frozen=True)
class Hit:
    """What :meth:`Store.hit` found."""

    #: True if the event was within the limit (and was counted).
    allowed: bool
    #: The events in the window counting this one, whether or not it was
    #: allowed (an estimate: see :meth:`Store.hit`).
    count: float


class Store:
    """The interface plugins use for shared state (``app.store``).

    Keys are strings, put after :attr:`StoreSettings.key_prefix`; plugins
    start theirs with their own name (``"ratelimit:..."``).
    """

    #: ``"memory"`` or ``"redis"``.
    kind = "store"

    async def hit(self, key: str, limit: int, window: float, *, group: str = "") -> Hit:
        """Count one event of ``key`` in a sliding window of ``window``
        seconds, unless ``limit`` events are already in it. ``group``: who
        made the key, for :class:`MemoryStore`'s choice of what to forget
        when it is full (see :meth:`set`).

        The window slides by the sliding-window-counter method: the events of
        the current fixed window of ``window`` seconds plus those of the
        previous one, weighted by how much of it the sliding window still
        covers. Memory per key is two counters whatever the limit; the count
        assumes the previous window's events were spread evenly. An event
        over the limit is not counted, so a client that keeps trying is let
        in again as the window slides.
        """
        raise NotImplementedError

    async def get(self, key: str) -> str | None:
        """The value of ``key``, or ``None`` if it is not set (or expired)."""
        raise NotImplementedError

    async def set(
        self,
        key: str,
        value: str,
        ttl: float,
        *,
        only_new: bool = False,
        group: str = "",
        keep: bool = False,
    ) -> bool:
        """Set ``key`` to ``value`` for ``ttl`` seconds. With ``only_new``,
        only if it is not set (two nodes seeing the same thing first agree
        on one value). Returns whether it was set.

        For a store with a cap on its keys (:class:`MemoryStore`):
        ``group`` names who made the key (such as the client's network):
        when full, the store forgets a key of the group holding the most,
        so that one client's flood pushes out its own keys, not everyone's;
        a key set with ``keep`` (a greylist triplet that passed) is
        forgotten before the others only when such keys fill more than half
        the cap. Redis ignores both."""
        raise NotImplementedError

    async def delete(self, key: str) -> None:
        """Forget ``key``."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections (the server is stopping)."""


class _Groups:
    """Keys by group, each group's least recently used first, and the groups
    by size: finding a key of the largest group takes constant time."""

    def __init__(self) -> None:
        self.members: dict[str, OrderedDict[str, None]] = {}
        # size -> the groups of that size (a dict as an ordered set).
        self.by_size: dict[int, dict[str, None]] = {}
        self.largest = 0
        self.count = 0  # keys in every group

    def add(self, group: str, key: str) -> None:
        """Put ``key`` in ``group`` as its most recently used key."""
        keys = self.members.get(group)
        if keys is None:
            keys = self.members[group] = OrderedDict()
        if key in keys:
            keys.move_to_end(key)
            return
        keys[key] = None
        self.count += 1
        self._resized(group, len(keys) - 1, len(keys))

    def touch(self, group: str, key: str) -> None:
        self.members[group].move_to_end(key)

    def remove(self, group: str, key: str) -> None:
        keys = self.members[group]
        del keys[key]
        if not keys:
            del self.members[group]
        self.count -= 1
        self._resized(group, len(keys) + 1, len(keys))

    def _resized(self, group: str, old: int, new: int) -> None:
        if old:
            bucket = self.by_size[old]
            del bucket[group]
            if not bucket:
                del self.by_size[old]
        if new:
            self.by_size.setdefault(new, {})[group] = None
        if new > self.largest:
            self.largest = new
        elif old == self.largest and old not in self.by_size:
            self.largest = new  # sizes move by one: none is between

    def victim(self) -> str | None:
        """The least recently used key of a largest group, if any."""
        if not self.largest:
            return None
        group = next(iter(self.by_size[self.largest]))
        return next(iter(self.members[group]))


class MemoryStore(Store):
    """State in this process only: each worker process has its own.

    :arg max_keys: keys kept at most. Past it, one key is forgotten (a
        limit then starts again from zero for it, a greylist triplet is new
        again): the least recently used key of the group (see
        :meth:`Store.set`) that holds the most keys, among the keys not set
        with ``keep`` -- or among those set with ``keep`` once they fill
        more than half the cap (or nothing else is left). A flood of new
        keys from one network thus pushes out its own, while the entries of
        other clients stay, and a flood from many networks cannot push out
        the greylist triplets that passed.
    :arg clock: the wall clock (:func:`time.time`); tests pass their own.
    """

    kind = "memory"

    def __init__(self, max_keys: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self.max_keys = max_keys
        self.clock = clock
        # key -> (expires at, value, group, keep); a counter's value is
        # (slot, current, previous).
        self._data: dict[str, tuple[float, Any, str, bool]] = {}
        self._groups = _Groups()  # the keys set without keep
        self._kept = _Groups()  # the keys set with keep

    @property
    def size(self) -> int:
        """The keys held now (expired ones included until they are dropped)."""
        return len(self._data)

    def _lookup(self, key: str, now: float) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            self._drop(key)
            return None
        (self._kept if entry[3] else self._groups).touch(entry[2], key)
        return entry[1]

    def _drop(self, key: str) -> None:
        entry = self._data.pop(key, None)
        if entry is not None:
            (self._kept if entry[3] else self._groups).remove(entry[2], key)

    def _store(self, key: str, expires: float, value: Any, group: str, keep: bool) -> None:
        old = self._data.get(key)
        if old is not None and (old[2], old[3]) != (group, keep):
            self._drop(key)
        self._data[key] = (expires, value, group, keep)
        (self._kept if keep else self._groups).add(group, key)
        while len(self._data) > self.max_keys:
            # The kept keys are safe from the others up to half the cap, and
            # the others always have the other half: neither a flood of new
            # keys nor one of kept keys can take all the room.
            kept_first = self._kept.count > self.max_keys // 2
            victim = (
                (self._kept.victim() if kept_first else None)
                or self._groups.victim()
                or self._kept.victim()
            )
            assert victim is not None  # there are keys
            self._drop(victim)

    async def hit(self, key: str, limit: int, window: float, *, group: str = "") -> Hit:
        now = self.clock()
        slot = math.floor(now / window)
        weight = 1.0 - (now / window - slot)
        current = previous = 0
        entry = self._lookup(key, now)
        if entry is not None:
            last_slot, last_count, last_previous = entry
            if last_slot == slot:
                current, previous = last_count, last_previous
            elif last_slot == slot - 1:
                previous = last_count
        count = previous * weight + current
        if count + 1 > limit:
            return Hit(False, count + 1)
        self._store(key, (slot + 2) * window, (slot, current + 1, previous), group, False)
        return Hit(True, count + 1)

    async def get(self, key: str) -> str | None:
        value = self._lookup(key, self.clock())
        return value if isinstance(value, str) else None

    async def set(
        self,
        key: str,
        value: str,
        ttl: float,
        *,
        only_new: bool = False,
        group: str = "",
        keep: bool = False,
    ) -> bool:
        now = self.clock()
        if only_new and self._lookup(key, now) is not None:
            return False
        self._store(key, now + ttl, value, group, keep)
        return True

    async def delete(self, key: str) -> None:
        self._drop(key)


# KEYS[1]: the current window's counter, KEYS[2]: the previous one's.
# ARGV[1]: the previous window's weight, ARGV[2]: the limit, ARGV[3]: the
# counter's lifetime in milliseconds. One script, so that two nodes counting
# at once cannot both take the last place. Floats go back as strings (Redis
# would truncate a Lua number to an integer).
_HIT_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
local count = previous * tonumber(ARGV[1]) + current
if count + 1 > tonumber(ARGV[2]) then
  return {0, tostring(count + 1)}
end
current = redis.call('INCR', KEYS[1])
if current == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {1, tostring(previous * tonumber(ARGV[1]) + current)}
"""


class RedisStore(Store):
    """State on a Redis server (redis-py's asyncio client), shared by every
    Bonzo process that names it.

    The client is made on first use, in the event loop of the process that
    uses it (workers fork after the configuration is read). After a failure
    to reach Redis, calls fail at once for
    :attr:`StoreSettings.retry_interval` seconds instead of each waiting for
    the timeouts.

    At most :attr:`StoreSettings.max_connections` calls run at once; the
    others wait for one of them to end, for up to
    :attr:`StoreSettings.timeout` seconds. A call that waited in vain fails,
    but does not count as Redis being unreachable: a busy process is not a
    down Redis.
    """

    kind = "redis"

    def __init__(self, settings: StoreSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self._client: Any = None
        self._script: Any = None
        # One permit per connection the pool may open: made with the client,
        # in the event loop that uses it.
        self._slots: asyncio.Semaphore | None = None
        self._down_until = 0.0
        # Why the last call failed ("ConnectionError", "AuthenticationError"),
        # for the calls that fail fast until retry_interval has passed.
        self._down_why = ""

    def _redis(self) -> Any:
        if self._client is None:
            import redis.asyncio

            s = self.settings
            self._client = redis.asyncio.Redis.from_url(s.url, **s.client_options())
            self._script = self._client.register_script(_HIT_SCRIPT)
            self._slots = asyncio.Semaphore(s.max_connections)
        return self._client

    def _check_up(self) -> None:
        if time.monotonic() < self._down_until:
            raise StoreError(
                f"Redis at {self.settings.where} failed ({self._down_why}); not retried yet"
            )

    async def _call(self, what: str, operation: Callable[[Any], Any]) -> Any:
        self._check_up()
        try:
            client = self._redis()
        except Exception as exc:
            # Checked when the configuration was read; never a traceback per
            # command if redis-py still refuses (a fault of this host: 4xx).
            raise StoreError(
                f"Redis at {self.settings.where}: {what} failed: no client "
                f"({self.settings._masked(exc)})"
            ) from None
        slots = self._slots
        assert slots is not None
        s = self.settings
        # redis-py's asyncio pool does not wait when all its connections are
        # in use: it raises MaxConnectionsError at once. A burst of sessions
        # must queue for a connection instead (bounded by the timeout).
        try:
            await asyncio.wait_for(slots.acquire(), s.timeout)
        except asyncio.TimeoutError:
            # Not Redis's fault: the store stays usable for the next call.
            raise StoreError(
                f"Redis at {s.where}: {what} failed: no free connection within {s.timeout:g}s "
                f"(all [redis] max_connections = {s.max_connections} in use)"
            ) from None
        try:
            self._check_up()  # it failed while this call waited: fail fast too
            result = await operation(client)
            if self._down_why:
                # One line per outage and process: the warnings about it are
                # rate-limited, so the end would go unseen.
                log.info("Redis at %s answers again", s.where)
                self._down_why = ""
                self._down_until = 0.0  # it answered: no reason to fail fast
            return result
        except StoreError:
            raise
        except Exception as exc:
            from redis.exceptions import MaxConnectionsError

            # redis-py's ConnectionError/TimeoutError/ResponseError, and
            # OSError from below it: all mean no answer we can use. A full
            # pool (which the permits should prevent) is a local limit.
            if not isinstance(exc, MaxConnectionsError):
                self._down_until = time.monotonic() + s.retry_interval
                self._down_why = type(exc).__name__
            raise StoreError(
                f"Redis at {s.where}: {what} failed: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            slots.release()

    def _key(self, key: str) -> str:
        return self.settings.key_prefix + key

    async def hit(self, key: str, limit: int, window: float, *, group: str = "") -> Hit:
        now = self.clock()
        slot = math.floor(now / window)
        weight = 1.0 - (now / window - slot)
        full = self._key(key)
        keys = [f"{full}:{slot}", f"{full}:{slot - 1}"]
        args = [repr(weight), str(limit), str(max(1, math.ceil(2 * window * 1000)))]

        async def run(client: Any) -> Any:
            return await self._script(keys=keys, args=args, client=client)

        allowed, count = await self._call("counting", run)
        return Hit(bool(int(allowed)), float(count))

    async def get(self, key: str) -> str | None:
        full = self._key(key)
        value = await self._call("reading", lambda client: client.get(full))
        return None if value is None else str(value)

    async def set(
        self,
        key: str,
        value: str,
        ttl: float,
        *,
        only_new: bool = False,
        group: str = "",
        keep: bool = False,
    ) -> bool:
        # group and keep: Redis's own memory policy decides (maxmemory).
        full = self._key(key)
        px = max(1, math.ceil(ttl * 1000))
        done = await self._call(
            "writing", lambda client: client.set(full, value, px=px, nx=only_new)
        )
        return bool(done)

    async def delete(self, key: str) -> None:
        full = self._key(key)
        await self._call("deleting", lambda client: client.delete(full))

    async def close(self) -> None:
        client, self._client = self._client, None
        self._slots = None
        if client is not None:
            try:
                await client.aclose()
            except Exception as exc:  # pragma: no cover - closing a broken pool
                log.debug("closing the Redis client: %r", exc)


def open_store(settings: StoreSettings) -> Store:
    """The store the ``[redis]`` table asks for: :class:`RedisStore` when
    :attr:`~StoreSettings.url` is set, else :class:`MemoryStore`."""
    if settings.enabled:
        return RedisStore(settings)
    return MemoryStore(settings.memory_max_keys)

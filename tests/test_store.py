"""bonzo.store: the in-process store, the [redis] settings and app.store.

The Redis store against a real redis-server: tests/interop/test_redis.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bonzo.app import MailApp
from bonzo.config import REDIS_KEYS, ConfigError, parse_config
from bonzo.settings import SettingError
from bonzo.store import MemoryStore, RedisStore, StoreSettings, open_store, safe_url


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def test_a_window_allows_the_limit_then_refuses():
    clock = Clock()
    store = MemoryStore(clock=clock)

    async def go():
        hits = [await store.hit("k", 3, 60) for _ in range(5)]
        return [h.allowed for h in hits], hits[2].count

    allowed, third = run(go())
    assert allowed == [True, True, True, False, False]
    assert third == 3


def test_the_window_slides():
    """Events of the previous window count by how much of it still overlaps."""
    clock = Clock(600.0)  # the start of a window of 60 s
    store = MemoryStore(clock=clock)

    async def go():
        for _ in range(4):
            assert (await store.hit("k", 4, 60)).allowed
        assert not (await store.hit("k", 4, 60)).allowed
        clock.now = 660.0 + 15  # a quarter into the next window: 4 * 0.75 = 3 counted
        first = await store.hit("k", 4, 60)
        second = await store.hit("k", 4, 60)
        clock.now = 780.0 + 1  # two windows after the last event: nothing counted
        later = [await store.hit("k", 4, 60) for _ in range(4)]
        return first, second, later

    first, second, later = run(go())
    assert first.allowed and first.count == pytest.approx(4.0)
    assert not second.allowed
    assert all(h.allowed for h in later)


def test_keys_are_independent():
    store = MemoryStore(clock=Clock())

    async def go():
        assert (await store.hit("a", 1, 60)).allowed
        assert not (await store.hit("a", 1, 60)).allowed
        return (await store.hit("b", 1, 60)).allowed

    assert run(go())


def test_values_expire_and_only_new_does_not_overwrite():
    clock = Clock()
    store = MemoryStore(clock=clock)

    async def go():
        assert await store.set("k", "one", 10)
        assert not await store.set("k", "two", 10, only_new=True)
        assert await store.get("k") == "one"
        clock.now += 10.5
        assert await store.get("k") is None
        assert await store.set("k", "three", 10, only_new=True)
        value = await store.get("k")
        await store.delete("k")
        return value, await store.get("k")

    assert run(go()) == ("three", None)


def test_memory_is_bounded_least_recently_used_first():
    store = MemoryStore(max_keys=100, clock=Clock())

    async def go():
        await store.set("keep", "v", 1000)
        for i in range(1000):
            await store.hit(f"client-{i}", 5, 60)
            if i % 10 == 0:
                assert await store.get("keep") == "v"  # used: kept
        return store.size, await store.get("keep"), await store.get("client-0")

    size, kept, first = run(go())
    assert size == 100
    assert kept == "v"
    assert first is None


def test_open_store_follows_the_settings():
    assert isinstance(open_store(StoreSettings()), MemoryStore)
    assert open_store(StoreSettings(memory_max_keys=7)).max_keys == 7  # type: ignore[attr-defined]
    assert isinstance(open_store(StoreSettings(url="redis://127.0.0.1:1/0")), RedisStore)


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ('url = "http://x/"', "redis.url", "must start with redis://"),
        ('url = "redis://:secret@/0"', "redis.url", "names no host"),
        ('url = "redis://h:99999/0"', "redis.url", "bad port"),
        ('url = "redis://[::1:6379/0"', "redis.url", "Invalid IPv6 URL"),
        ("url = 5", "redis.url", "must be a string"),
        ("timeout = 0", "redis.timeout", "positive number"),
        ('connect_timeout = "1"', "redis.connect_timeout", "positive number"),
        ("retry_interval = -1", "redis.retry_interval", "positive number"),
        ("max_connections = 0", "redis.max_connections", "integer 1..10000"),
        ("memory_max_keys = true", "redis.memory_max_keys", "integer"),
        ("key_prefix = 1", "redis.key_prefix", "string"),
        ("password = 1", "redis.password", "string"),
        ("colour = 1", "redis.colour", "unknown key"),
    ],
)
def test_bad_redis_keys_name_the_file_and_key(table, key, message):
    with pytest.raises(ConfigError) as info:
        parse_config(f"[redis]\n{table}\n", "site.toml")
    assert str(info.value).startswith(f"site.toml: {key}: ")
    assert message in str(info.value)


def test_a_password_in_an_unparsable_url_never_reaches_a_message():
    with pytest.raises(SettingError) as info:
        StoreSettings(url="redis://:hunter2@[::1/0")
    assert "hunter2" not in str(info.value)
    assert "redis://:***@[::1/0" in str(info.value)


@pytest.mark.parametrize(
    "url", ["redis://h/abc", "redis://h:6379/0x1", "rediss://h/1?db=two", "unix:///r.sock?db=x"]
)
def test_a_bad_database_number_is_a_configuration_error(url):
    # redis-py failed at the first use, each call a plugin fault.
    with pytest.raises(SettingError, match="bad database number"):
        StoreSettings(url=url)


def test_good_database_numbers():
    for url in ("redis://h", "redis://h/", "redis://h/15", "redis://h?db=3", "unix:///r.sock?db=0"):
        assert StoreSettings(url=url).url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # redis-py passed what it does not know on, and failed at every use.
        ("redis://h/0?foo=bar", "unexpected keyword argument 'foo'"),
        ("rediss://h/0?ssl_ca_cert=/ca.pem", "unexpected keyword argument 'ssl_ca_cert'"),
        ("rediss://h/0?ssl_cert_reqs=bogus", "Invalid SSL Certificate Requirements Flag"),
        ("redis://h/0?health_check_interval=1s", "Invalid value for 'health_check_interval'"),
        ("redis://h:0/0", "bad port (0)"),
        # Options that would override the [redis] table: refused, saying which key.
        ("redis://h/0?socket_timeout=30", "sets socket_timeout: set [redis] timeout instead"),
        ("redis://h/0?socket_connect_timeout=9", "set [redis] connect_timeout instead"),
        ("redis://h/0?max_connections=2", "set [redis] max_connections instead"),
        ("redis://h/0?decode_responses=false", "sets decode_responses: Bonzo sets it"),
        ("redis://h/0?protocol=3", "Bonzo speaks RESP2"),
        (
            "rediss://h/0?ssl_ca_certs=/nonexistent/ca.pem",
            "ssl_ca_certs: /nonexistent/ca.pem: no such file",
        ),
    ],
)
def test_url_options_are_checked_when_the_configuration_is_read(url, message):
    """bonzo check, not every later command, tells what redis-py will refuse."""
    with pytest.raises(ConfigError) as info:
        parse_config(f'[redis]\nurl = "{url}"\n', "site.toml")
    assert str(info.value).startswith("site.toml: redis.url: ")
    assert message in str(info.value)


def test_tls_files_of_the_url_are_read_when_the_configuration_is(tmp_path: Path):
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert = ca.issue_cert("redis.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    base = "rediss://redis.test:6380/0?ssl_ca_certs=" + str(tmp_path / "ca.pem")
    assert StoreSettings(url=base).enabled
    assert StoreSettings(url=f"{base}&ssl_certfile={tmp_path / 'client.pem'}").enabled
    with pytest.raises(SettingError, match=r"its TLS options make no TLS context \(SSLError"):
        StoreSettings(url=f"{base}&ssl_certfile={tmp_path / 'bad.pem'}")


def test_a_password_in_both_places_is_refused_and_never_shown():
    with pytest.raises(SettingError, match="give it in one place") as info:
        StoreSettings(url="redis://:hunter2@h/0", password="hunter3")
    assert info.value.setting == "password"
    with pytest.raises(SettingError, match="give it in one place"):
        StoreSettings(url="redis://h/0?password=hunter2", password="hunter3")
    # An unknown option's message never carries a password.
    for url in ("redis://:hunter2@h/0?foo=1", "redis://h/0?password=hunter2&foo=1"):
        with pytest.raises(SettingError) as info:
            StoreSettings(url=url)
        assert "hunter2" not in str(info.value), info.value


def test_a_client_redis_py_refuses_is_a_store_error(monkeypatch):
    """Checked at configuration time; should redis-py still refuse, each call
    is a StoreError (the plugins' on_store_error), not a traceback."""
    import redis.asyncio

    from bonzo.store import StoreError

    def refuse(*args, **kwargs):
        raise ValueError("no")

    store = RedisStore(StoreSettings(url="redis://127.0.0.1:1/0"))
    monkeypatch.setattr(redis.asyncio.Redis, "from_url", refuse)
    with pytest.raises(StoreError, match=r"no client \(ValueError: no\)"):
        run(store.get("k"))


def test_a_password_in_the_url_never_reaches_a_message():
    with pytest.raises(SettingError) as info:
        StoreSettings(url="redis://:hunter2@h:x/0")
    assert "hunter2" not in str(info.value.detail)
    assert StoreSettings(url="redis://u:hunter2@h:6379/0").where == "redis://u:***@h:6379/0"
    # redis-py takes it from the query too.
    for url, shown in [
        ("redis://h:6379/0?password=hunter2", "redis://h:6379/0?password=***"),
        ("redis://h/0?db=1&Password=hunter2&x=1", "redis://h/0?db=1&Password=***&x=1"),
        ("unix:///run/r.sock?db=0&password=hunter2", "unix:///run/r.sock?db=0&password=***"),
        ("redis://u:hunter2@h/0?password=hunter2", "redis://u:***@h/0?password=***"),
        ("redis://h/0", "redis://h/0"),
    ]:
        assert safe_url(url) == shown
        if "Password" not in url:  # (an option redis-py does not know)
            assert StoreSettings(url=url).where == shown
    assert "hunter2" not in safe_url("redis://[::1/0?password=hunter2")
    # A password with "/", "?" or "#" (base64), which a URL parser takes for
    # the end of the authority; a percent-encoded parameter name.
    for url in ("redis://:hun/ter2@h:6379/0", "redis://:hun?ter2@h/0", "redis://:hun#ter2@h/0",
                "redis://u:a/b@h/0?p%61ssword=hunter2"):  # fmt: skip
        shown = safe_url(url)
        assert "hun" not in shown and "ter2" not in shown and "a/b" not in shown, shown
    assert safe_url("redis://:hun/ter2@h:6379/0") == "redis://:***@h:6379/0"
    # No "//" (a mistyped "redis:/"): hidden all the same.
    assert safe_url("redis:/:hunter2@127.0.0.1:6379/0") == "redis:/:***@127.0.0.1:6379/0"
    assert "ter" not in safe_url("unix:/path?password=hun//ter2@c")


def test_secrets_come_from_env_and_file(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TEST_REDIS_URL", "redis://10.0.0.1:6380/2")
    (tmp_path / "pw").write_text("s3cret\n")
    config = parse_config(
        '[redis]\nurl = { "$env" = "TEST_REDIS_URL" }\npassword = { "$file" = "pw" }\n',
        "site.toml",
        tmp_path,
    )
    assert config.redis.url == "redis://10.0.0.1:6380/2"
    assert config.redis.password == "s3cret"
    assert config.redis.enabled


def test_app_store_is_built_from_the_redis_table(tmp_path: Path):
    app = MailApp(parse_config("[redis]\nmemory_max_keys = 5\n", "t.toml", tmp_path))
    assert isinstance(app.store, MemoryStore) and app.store.max_keys == 5
    app = MailApp(parse_config('[redis]\nurl = "redis://127.0.0.1:1/0"\n', "t.toml", tmp_path))
    assert isinstance(app.store, RedisStore)


def test_every_redis_key_is_in_the_example_with_its_default():
    import re
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    text = (Path(__file__).resolve().parent.parent / "bonzo.toml.example").read_text()
    start = re.search(r"^# \[redis\]$", text, re.M)
    assert start
    section = text[start.end() : text.index("\n[plugins]\n")]
    defaults = StoreSettings()
    for name in REDIS_KEYS:
        found = re.search(rf"^# {name} = (.*)$", section, re.M)
        assert found, name
        if name in ("url", "password"):
            continue  # samples
        assert tomllib.loads(f"v = {found.group(1)}")["v"] == getattr(defaults, name), name
    assert not parse_config(text).redis.enabled


def test_a_down_redis_fails_fast_after_the_first_failure():
    """Nothing listens on the port: StoreError, then at once for retry_interval."""
    import socket
    import time

    from bonzo.store import StoreError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = RedisStore(StoreSettings(url=f"redis://127.0.0.1:{port}/0", retry_interval=30))

    async def go():
        with pytest.raises(StoreError, match="failed"):
            await store.get("k")
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"failed \(ConnectionError\); not retried yet"):
            await store.hit("k", 1, 60)
        elapsed = time.monotonic() - started
        await store.close()
        return elapsed

    assert run(go()) < 0.1


def test_check_warns_when_workers_do_not_share_a_plugins_state(tmp_path: Path):
    plugin = "bonzo_plugins.ratelimit:RateLimitPlugin"
    text = (
        f'[server]\nworkers = 4\n[plugins]\nenabled = ["{plugin}", "recipients", "discard"]\n'
        '[plugins.recipients]\ndomains = ["example.com"]\n'
        f'[[plugins."{plugin}".rules]]\nkey = "client"\nstage = "connect"\nlimit = 5\nwindow = 60\n'
    )
    warnings = MailApp(parse_config(text, "t.toml", tmp_path)).warnings()
    assert warnings == [
        f"plugins.enabled: {plugin!r} keeps its state in app.store, which is each worker's "
        "own without [redis] url (server.workers = 4): set [redis] url, or server.workers = 1"
    ]
    shared = text + '[redis]\nurl = "redis://127.0.0.1:6379/0"\n'
    assert MailApp(parse_config(shared, "t.toml", tmp_path)).warnings() == []
    one = text.replace("workers = 4", "workers = 1")
    assert MailApp(parse_config(one, "t.toml", tmp_path)).warnings() == []


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=5),
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=40), st.sampled_from("abc")), max_size=60
    ),
)
def test_property_no_window_ever_holds_more_than_the_limit(limit, steps):
    """Whatever the timing, a key never gets more than the limit within one
    fixed window (the sliding count only adds the previous window's weight),
    while no key is evicted (three keys, room for three)."""
    window = 60.0
    clock = Clock(0.0)
    store = MemoryStore(max_keys=3, clock=clock)
    allowed: dict[tuple[str, int], int] = {}

    async def go() -> None:
        for gap, key in steps:
            clock.now += gap
            hit = await store.hit(key, limit, window)
            assert hit.count > 0
            if hit.allowed:
                slot = (key, int(clock.now // window))
                allowed[slot] = allowed.get(slot, 0) + 1
            assert store.size <= 3

    run(go())
    assert all(n <= limit for n in allowed.values())


RELOADED = """
[[listeners]]
address = "127.0.0.1"
port = {port}
[plugins]
enabled = ["ratelimit", "greylist", "recipients", "discard"]
[plugins.recipients]
domains = ["example.com"]
[[plugins.ratelimit.rules]]
key = "sender"
stage = "mail"
limit = 3
window = "1h"
"""


def test_a_reload_keeps_the_store_when_the_redis_table_is_unchanged(tmp_path: Path):
    """The in-memory greylist and rate-limit state survives a reload; the
    store is closed once, when the last application using it stops."""
    import socket

    from bonzo.cli import _reloaded_app
    from bonzo.config import load_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "bonzo.toml"
    path.write_text(RELOADED.format(port=port))
    old = MailApp(load_config(str(path)))
    old.bind()
    closed: list[object] = []

    async def go() -> None:
        store = old.store
        real_close = store.close

        async def close() -> None:
            closed.append(store)
            await real_close()

        store.close = close  # type: ignore[method-assign]
        await old.start()
        await store.set("greylist:pending", "p:1", 600)
        new = _reloaded_app(old)
        assert new is not None and new.store is store
        for name in ("ratelimit", "greylist"):
            assert new.plugins.get(name).store is store
        assert await new.store.get("greylist:pending") == "p:1"
        old.release_sockets()
        await new.start()
        await old.stop()
        assert closed == []  # the new configuration still uses it
        await new.stop()
        assert closed == [store]

        # Another [redis] table: another store.
        path.write_text(RELOADED.format(port=port) + "[redis]\nmemory_max_keys = 10\n")
        other = _reloaded_app(new)
        assert other is not None and other.store is not store
        assert other.plugins.get("greylist").store is other.store

    try:
        run(go())
    finally:
        for _, socks in old._bound:
            for sock in socks:
                sock.close()


def test_a_full_store_forgets_a_key_of_the_largest_group_first():
    store = MemoryStore(max_keys=10, clock=Clock())

    async def go() -> None:
        await store.set("mine", "v", 1000, group="192.0.2.0/24")
        await store.hit("count", 5, 60, group="198.51.100.0/24")
        for i in range(100):
            await store.set(f"junk{i}", "v", 1000, group="203.0.113.0/24")
        assert store.size == 10
        assert await store.get("mine") == "v"
        assert (await store.hit("count", 5, 60, group="198.51.100.0/24")).count == 2
        assert await store.get("junk99") == "v" and await store.get("junk0") is None

    run(go())


def test_kept_keys_outlast_the_others_up_to_half_the_cap():
    store = MemoryStore(max_keys=10, clock=Clock())

    async def go() -> None:
        for i in range(3):
            await store.set(f"kept{i}", "c", 1000, group=f"g{i}", keep=True)
        for i in range(100):  # one group each: no group is larger
            await store.set(f"new{i}", "p", 1000, group=f"n{i}")
        assert [await store.get(f"kept{i}") for i in range(3)] == ["c"] * 3
        # Kept keys cannot push out everything else either: past half the
        # cap, they go first.
        for i in range(100):
            await store.set(f"more{i}", "c", 1000, group=f"m{i}", keep=True)
        others = [await store.get(f"new{i}") for i in range(100)]
        assert sum(v is not None for v in others) >= 4
        assert store.size == 10

    run(go())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["set", "keep", "hit", "get", "delete"]),
            st.integers(0, 12),
            st.sampled_from(["", "a", "b", "c"]),
            st.floats(min_value=0, max_value=5),
        ),
        max_size=80,
    )
)
def test_property_the_groups_stay_consistent_and_bounded(steps):
    """Whatever is set, touched, expired and deleted: at most max_keys keys,
    and the group bookkeeping matches the keys held."""
    clock = Clock(0.0)
    store = MemoryStore(max_keys=5, clock=clock)

    async def go() -> None:
        for op, n, group, gap in steps:
            clock.now += gap
            key = f"k{n}"
            if op in ("set", "keep"):
                await store.set(key, "v", 3, group=group, keep=op == "keep")
            elif op == "hit":
                await store.hit("counter-" + key, 3, 2, group=group)
            elif op == "get":
                await store.get(key)
            else:
                await store.delete(key if n % 2 else "counter-" + key)
            assert store.size <= 5
            for tier, keep in ((store._groups, False), (store._kept, True)):
                held = {k for k, e in store._data.items() if e[3] == keep}
                members = {k for keys in tier.members.values() for k in keys}
                assert members == held and tier.count == len(held)
                sizes = {g: len(keys) for g, keys in tier.members.items()}
                assert tier.largest == max(sizes.values(), default=0)
                for size, groups in tier.by_size.items():
                    assert all(sizes[g] == size for g in groups)

    run(go())

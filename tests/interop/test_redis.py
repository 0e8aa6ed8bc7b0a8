"""Shared state on a real Redis (Debian's ``redis-server``, a private
instance per test): :class:`bonzo.store.RedisStore`, the ratelimit and
greylist plugins on it, and two Bonzo daemons sharing one Redis — a rate
limit holds across both, and with Redis killed they fail open as
documented."""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from daemon_support import daemon_env, daemons, free_port, wait_until

from bonzo.address import Address
from bonzo.errors import SMTPError
from bonzo.store import RedisStore, StoreError, StoreSettings, redis_available
from bonzo.testing import make_session

from .peers import unavailable
from .redis_peer import RedisServer, redis_binary

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def redis_dir(tmp_path: Path) -> Path:
    if redis_binary() is None:
        unavailable("redis-server is not installed (Debian package redis-server)")
    if not redis_available():
        unavailable("redis-py is not installed (pip install 'bonzo[redis]')")
    return tmp_path


@pytest.fixture
def redis_server(redis_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(redis_dir).start()
    try:
        yield server
    finally:
        server.stop()


def store(server: RedisServer, **settings: object) -> RedisStore:
    return RedisStore(StoreSettings(url=server.url, **settings))  # type: ignore[arg-type]


def test_two_nodes_share_one_window(redis_server: RedisServer) -> None:
    async def go() -> list[bool]:
        a, b = store(redis_server), store(redis_server)
        try:
            out = []
            for i in range(7):
                hit = await (a if i % 2 else b).hit("ratelimit:test:192.0.2.1", 5, 60)
                out.append(hit.allowed)
            # Another key has its own window.
            out.append((await a.hit("ratelimit:test:192.0.2.2", 5, 60)).allowed)
            return out
        finally:
            await a.close()
            await b.close()

    assert asyncio.run(go()) == [True] * 5 + [False, False, True]


def test_the_window_slides_on_redis(redis_server: RedisServer) -> None:
    """The same counter arithmetic as MemoryStore, with the clock of the
    calling node."""
    now = [6000.0]  # the start of a window of 60 s

    async def go() -> list[bool]:
        s = RedisStore(StoreSettings(url=redis_server.url), clock=lambda: now[0])
        try:
            out = [(await s.hit("k", 4, 60)).allowed for _ in range(5)]
            now[0] = 6060.0 + 15  # 4 * 0.75 = 3 still counted
            out += [(await s.hit("k", 4, 60)).allowed for _ in range(2)]
            now[0] = 6180.0 + 1
            out.append((await s.hit("k", 4, 60)).allowed)
            return out
        finally:
            await s.close()

    assert asyncio.run(go()) == [True, True, True, True, False, True, False, True]


def test_values_expire_and_the_first_writer_wins(redis_server: RedisServer) -> None:
    async def go() -> None:
        a, b = store(redis_server), store(redis_server)
        try:
            assert await a.set("g", "p:1", 0.3, only_new=True)
            assert not await b.set("g", "p:2", 10, only_new=True)
            assert await b.get("g") == "p:1"
            await asyncio.sleep(0.5)
            assert await a.get("g") is None
            await a.set("g", "c:1", 10)
            await b.delete("g")
            assert await a.get("g") is None
        finally:
            await a.close()
            await b.close()

    asyncio.run(go())


def test_the_store_speaks_resp2(redis_server: RedisServer) -> None:
    """Whatever redis-py's default: the answers' shapes the store reads, and
    servers or proxies without RESP3 (docs: protocol is Bonzo's to set)."""

    async def go() -> dict[str, str]:
        s = store(redis_server)
        try:
            assert await s.set("k", "v", 10)
            return await s._redis().client_info()  # type: ignore[no-any-return]
        finally:
            await s.close()

    info = asyncio.run(go())
    assert info["resp"] == "2", info


def test_the_key_prefix_keeps_clusters_apart(redis_server: RedisServer) -> None:
    async def go() -> tuple[str | None, str | None]:
        one = store(redis_server, key_prefix="one:")
        two = store(redis_server, key_prefix="two:")
        try:
            await one.set("k", "v", 10)
            return await one.get("k"), await two.get("k")
        finally:
            await one.close()
            await two.close()

    assert asyncio.run(go()) == ("v", None)


def test_a_password_from_the_settings(redis_dir: Path) -> None:
    server = RedisServer(redis_dir, password="t0p-secret").start()
    try:

        async def go() -> None:
            without = store(server)
            with pytest.raises(StoreError) as info:
                await without.get("k")
            assert "t0p-secret" not in str(info.value)
            # The calls that fail fast meanwhile say why (not "unreachable").
            with pytest.raises(StoreError, match=r"failed \(AuthenticationError\); not retried"):
                await without.get("k")
            await without.close()
            wrong = store(server, password="wrong")
            with pytest.raises(StoreError, match="AuthenticationError"):
                await wrong.get("k")
            await wrong.close()
            # In the query, as redis-py takes it: shown without it.
            query = RedisStore(StoreSettings(url=f"{server.url}?password=t0p-secret"))
            assert await query.set("k3", "v", 10)
            assert "t0p-secret" not in query.settings.where
            await query.close()
            good = store(server, password="t0p-secret")
            assert await good.set("k", "v", 10)
            assert await good.get("k") == "v"
            await good.close()

        asyncio.run(go())
    finally:
        server.stop()


def test_killed_redis_is_a_store_error_then_it_recovers(
    redis_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="bonzo.store")
    first = RedisServer(redis_dir).start()
    again = RedisServer(redis_dir, port=first.port)

    async def go() -> None:
        s = store(first, retry_interval=0.5, timeout=0.5, connect_timeout=0.5)
        try:
            assert (await s.hit("k", 10, 60)).allowed
            first.kill()
            with pytest.raises(StoreError):
                await s.hit("k", 10, 60)
            started = time.monotonic()
            with pytest.raises(StoreError, match="not retried yet"):
                await s.get("k")
            assert time.monotonic() - started < 0.1  # fails fast, no timeout
            assert "answers again" not in caplog.text
            again.start()
            await asyncio.sleep(0.6)
            assert await s.set("k2", "v", 10)
            assert await s.get("k2") == "v"
            # The end of the outage is logged, once.
            assert caplog.text.count(f"Redis at {first.url} answers again") == 1
        finally:
            await s.close()

    try:
        asyncio.run(go())
    finally:
        first.stop()
        again.stop()


def test_rediss_with_a_private_ca(redis_dir: Path) -> None:
    """TLS to Redis (docs/configuration.rst, redis.url): the URL's
    ssl_ca_certs trusts a private CA; without it the system's CAs do not,
    and the call is a StoreError naming the certificate problem."""
    import ssl

    import trustme

    ca = trustme.CA()
    chain = redis_dir / "redis.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(chain))
    ca_file = redis_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    server = RedisServer(redis_dir, tls=(chain, ca_file, client)).start()
    url = f"rediss://127.0.0.1:{server.port}/0"

    async def go() -> None:
        trusted = RedisStore(StoreSettings(url=f"{url}?ssl_ca_certs={ca_file}"))
        untrusted = RedisStore(StoreSettings(url=url))
        try:
            assert await trusted.set("k", "v", 10)
            assert await trusted.get("k") == "v"
            with pytest.raises(StoreError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusted.get("k")
        finally:
            await trusted.close()
            await untrusted.close()

    try:
        asyncio.run(go())
    finally:
        server.stop()


def test_the_plugins_on_redis(redis_server: RedisServer) -> None:
    from bonzo_plugins.greylist import GreylistPlugin
    from bonzo_plugins.ratelimit import RateLimitPlugin

    async def go() -> None:
        shared = store(redis_server)
        try:
            app = SimpleNamespace(store=shared)
            limit = RateLimitPlugin()
            limit.bonzo_configure(
                {"rules": [{"key": "rcpt_domain", "stage": "rcpt", "limit": 2, "window": 60}]},
                app,
            )
            session = make_session("192.0.2.1")
            envelope = SimpleNamespace(sender=Address.parse("a@example.net"))
            rcpt = Address.parse("u@example.com")
            await limit.bonzo_rcpt(session, envelope, rcpt)
            await limit.bonzo_rcpt(session, envelope, rcpt)
            with pytest.raises(SMTPError) as info:
                await limit.bonzo_rcpt(session, envelope, rcpt)
            assert (info.value.status_code, info.value.enhanced_code) == (451, "4.7.1")

            now = [1_000_000.0]
            grey = [GreylistPlugin(clock=lambda: now[0]) for _ in range(2)]  # two nodes
            for plugin in grey:
                plugin.bonzo_configure({"delay": 60}, app)
            with pytest.raises(SMTPError, match="60 seconds"):
                await grey[0].bonzo_rcpt(session, envelope, rcpt)
            now[0] += 30
            with pytest.raises(SMTPError, match="30 seconds"):
                await grey[1].bonzo_rcpt(session, envelope, rcpt)  # the other node knows
            now[0] += 31
            await grey[1].bonzo_rcpt(session, envelope, rcpt)
            await grey[0].bonzo_rcpt(session, envelope, rcpt)
        finally:
            await shared.close()

    asyncio.run(go())


# ------------------------------------------------ two daemons, one Redis
RATELIMIT = "bonzo_plugins.ratelimit:RateLimitPlugin"
LIMIT = 3


def node_config(path: Path, port: int, redis_url: str, name: str) -> Path:
    path.write_text(
        f"""
[server]
hostname = "{name}.test"

[[listeners]]
address = "127.0.0.1"
port = {port}

[redis]
url = "{redis_url}"
timeout = 0.5
connect_timeout = 0.5
retry_interval = 1.0

[plugins]
enabled = ["{RATELIMIT}", "recipients", "discard"]

[plugins."{RATELIMIT}"]
reply = "451 4.7.1 Too many connections from your network"
[[plugins."{RATELIMIT}".rules]]
key = "client"
stage = "connect"
limit = {LIMIT}
window = "1h"

[plugins.recipients]
domains = ["example.com"]
""",
        encoding="utf-8",
    )
    return path


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(10)
        line = s.recv(512)
        if line.startswith(b"220 "):
            s.sendall(b"QUIT\r\n")
        return line


def test_two_daemons_share_a_rate_limit_and_fail_open_without_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    ports = [free_port(), free_port()]
    with daemons(tmp_path, daemon_env()) as start:
        nodes = []
        for i, port in enumerate(ports):
            config = node_config(tmp_path / f"node{i}.toml", port, redis_server.url, f"node{i}")
            nodes.append(start(config, port))
        for node in nodes:
            node.wait_ready()  # its probe connection counts: one per daemon
        # The LIMIT-th connection of 127.0.0.1, then the next on the other daemon.
        assert LIMIT == 3
        assert greeting(ports[0]).startswith(b"220 node0.test")
        refused = greeting(ports[1])
        # The rule's 451, sent as 421: only 421 or 554 may stand in for a greeting.
        assert refused.startswith(b"421 4.7.1 Too many connections from your network"), refused
        assert greeting(ports[0]).startswith(b"421 4.7.1")
        wait_until(lambda: "ratelimit: client '127.0.0.1' over" in nodes[1].log)

        # Redis gone: both daemons let clients in (on_store_error = "accept")
        # and log a WARNING, and never answer 5xx.
        redis_server.kill()
        for port in ports:
            assert greeting(port).startswith(b"220 ")
        for node in nodes:
            wait_until(lambda node=node: "WARNING" in node.log and "counting failed" in node.log)
            assert "allowed without limits (on_store_error)" in node.log
        with smtplib.SMTP("127.0.0.1", ports[1], timeout=10) as client:
            assert (
                client.sendmail("a@example.net", ["u@example.com"], b"Subject: x\r\n\r\nx\r\n")
                == {}
            )
        for node in nodes:
            assert node.stop() == 0


def test_the_plugins_failure_modes_with_redis_killed(redis_dir: Path) -> None:
    """Default: both let the command through; ``tempfail``: 451 4.3.0. Each
    failed call is counted in the metrics, by plugin and action, the ones
    the log leaves out included."""
    from bonzo_plugins.greylist import GreylistPlugin
    from bonzo_plugins.ratelimit import RateLimitPlugin
    from prometheus_client import CollectorRegistry

    from bonzo.metrics import Metrics

    server = RedisServer(redis_dir).start()
    counted = Metrics(CollectorRegistry(), plugins=["ratelimit", "greylist"]).install()

    def failures(plugin: str, action: str) -> float:
        counted.flush()
        found = counted.registry.get_sample_value(
            "bonzo_store_failures_total", {"plugin": plugin, "action": action}
        )
        return found or 0.0

    async def go() -> None:
        shared = RedisStore(StoreSettings(url=server.url, timeout=0.5, connect_timeout=0.5))
        app = SimpleNamespace(store=shared)
        rule = {"key": "client", "stage": "connect", "limit": 1, "window": 60}
        session = make_session("192.0.2.1")
        envelope = SimpleNamespace(sender=Address.parse("a@example.net"))
        rcpt = Address.parse("u@example.com")
        try:
            fail_open = RateLimitPlugin()
            fail_open.bonzo_configure({"rules": [rule]}, app)
            closed = RateLimitPlugin()
            closed.bonzo_configure({"rules": [rule], "on_store_error": "tempfail"}, app)
            grey_open, grey_closed = GreylistPlugin(), GreylistPlugin()
            grey_open.bonzo_configure({}, app)
            grey_closed.bonzo_configure({"on_store_error": "tempfail"}, app)
            await fail_open.bonzo_connect(session)
            assert failures("ratelimit", "accept") == 0
            server.kill()
            for _ in range(3):
                await fail_open.bonzo_connect(session)  # over the limit, but let through
                await grey_open.bonzo_rcpt(session, envelope, rcpt)  # not greylisted
            assert failures("ratelimit", "accept") == 3
            assert failures("greylist", "accept") == 3
            for call in (
                closed.bonzo_connect(session),
                grey_closed.bonzo_rcpt(session, envelope, rcpt),
            ):
                with pytest.raises(SMTPError) as info:
                    await call
                assert (info.value.status_code, info.value.enhanced_code) == (451, "4.3.0")
                assert "Redis" not in str(info.value.message)
            assert failures("ratelimit", "tempfail") == 1
            assert failures("greylist", "tempfail") == 1
        finally:
            await shared.close()

    try:
        asyncio.run(go())
    finally:
        counted.uninstall()
        server.stop()


def test_a_burst_beyond_max_connections_waits_and_redis_stays_up(
    redis_server: RedisServer,
) -> None:
    """More calls at once than ``max_connections``: they queue for a
    connection (redis-py's pool would refuse them), and nothing marks the
    healthy Redis down."""

    async def go() -> list[object]:
        s = store(redis_server, max_connections=3)
        try:

            async def one(i: int) -> object:
                try:
                    return (await s.hit(f"burst:{i}", 10, 60)).allowed
                except StoreError as exc:
                    return str(exc)

            results = await asyncio.gather(*(one(i) for i in range(60)))
            results.append(await s.set("after", "v", 10))
            return list(results)
        finally:
            await s.close()

    assert asyncio.run(go()) == [True] * 61


def test_no_free_connection_in_time_fails_that_call_only(redis_server: RedisServer) -> None:
    """A call that waits ``timeout`` for a connection in vain fails, but the
    store does not take Redis for down: the next call goes through."""

    async def go() -> None:
        s = store(redis_server, max_connections=1, timeout=0.3, retry_interval=30)
        try:
            assert await s.set("k", "v", 10)
            # The only connection busy for longer than the timeout.
            holder = asyncio.ensure_future(s._call("holding", lambda c: asyncio.sleep(0.6)))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"no free connection within 0\.3s"):
                await s.get("k")
            assert 0.25 < time.monotonic() - started < 0.55
            await holder
            assert await s.get("k") == "v"  # not "unreachable (not retried yet)"
        finally:
            await s.close()

    asyncio.run(go())


# ------------------------------------ AUTH attempts, two daemons, one Redis
AUTH_LIMIT = 4


def auth_node_config(path: Path, port: int, redis_url: str, workers: int) -> Path:
    path.write_text(
        f"""
[server]
hostname = "auth{port}.test"
workers = {workers}

[limits]
auth_failure_delay = 0.0

[[listeners]]
address = "127.0.0.1"
port = {port}
auth_plaintext = true

[redis]
url = "{redis_url}"

[plugins]
enabled = ["passwd", "recipients", "discard", "{RATELIMIT}"]

[plugins.passwd]
file = "{path.parent / "passwd"}"

[plugins."{RATELIMIT}"]
[[plugins."{RATELIMIT}".rules]]
key = "client"
stage = "auth"
limit = {AUTH_LIMIT}
window = "1h"

[plugins.recipients]
domains = ["example.com"]
""",
        encoding="utf-8",
    )
    return path


def auth_reply(port: int, password: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        blob = base64.b64encode(f"\0alice\0{password}".encode()).decode()
        return client.docmd("AUTH", "PLAIN " + blob)


def test_auth_attempts_are_limited_per_client_across_daemons_and_workers(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The tester's brute force: a new session per guess starts
    max_auth_failures over, but an ``auth`` rule counts the client's AUTH
    attempts on Redis, across two daemons (one with two workers): past the
    limit even the right password gets ``450 4.7.1`` and is not checked;
    each wrong guess is one WARNING line a fail2ban filter matches."""
    from bonzo_plugins.passwd import add_user

    add_user(tmp_path / "passwd", "alice", "S3cretPassw0rd!")
    ports = [free_port(), free_port()]
    with daemons(tmp_path, daemon_env()) as start:
        nodes = []
        for i, port in enumerate(ports):
            config = auth_node_config(tmp_path / f"auth{i}.toml", port, redis_server.url, 2 - i)
            nodes.append(start(config, port))
        nodes[0].wait_ready(workers=2)
        nodes[1].wait_ready()
        assert auth_reply(ports[0], "S3cretPassw0rd!")[0] == 235
        codes = [auth_reply(ports[i % 2], f"guess{i}")[0] for i in range(AUTH_LIMIT - 1)]
        assert codes == [535] * (AUTH_LIMIT - 1)
        # The limit is reached: the right password, on either daemon, is refused
        # unchecked, with a temporary reply that says nothing of it.
        for port in ports:
            assert auth_reply(port, "S3cretPassw0rd!") == (
                450,
                b"4.7.1 Too many AUTH commands, try again later",
            )
        wait_until(lambda: "ratelimit: client '127.0.0.1' over client-auth-4-3600" in nodes[1].log)
        logs = nodes[0].log + nodes[1].log
        failures = re.findall(
            r"WARNING \[\d+\] tornado\.general: \[\w+ 127\.0\.0\.1\] AUTH PLAIN failed for "
            r"'alice': no plugin accepted \(asked: passwd\): 535 5\.7\.8 "
            r"Authentication credentials invalid\n",
            logs,
        )
        assert len(failures) == AUTH_LIMIT - 1, logs
        assert "S3cretPassw0rd!" not in logs and "guess" not in logs
        for node in nodes:
            assert node.stop() == 0

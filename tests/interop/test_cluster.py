"""Several machines' worth of Bonzo: three daemons on 127.0.0.2, 127.0.0.3
and 127.0.0.4 behind one HAProxy (PROXY protocol v2, health checks),
sharing one Redis. A rate limit holds across the cluster; a node killed
with ``kill -9`` leaves the others serving; the real client address (the
client connects from 127.0.0.5) reaches every node's logs. The deployment
is docs/scaling.rst's."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import DEADLINE, daemon_env, daemons

from .haproxy import haproxy_binary, running_haproxy
from .peers import unavailable, wait_until
from .redis_peer import RedisServer, redis_binary

pytestmark = pytest.mark.timeout(180)

NODES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
CLIENT = "127.0.0.5"
LIMIT = 5
RATELIMIT = "bonzo_plugins.ratelimit:RateLimitPlugin"
#: Health checks (with a PROXY header, as the nodes require) every 200 ms.
CHECKS = "check check-send-proxy inter 200ms fall 1 rise 1"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    if redis_binary() is None:
        unavailable("redis-server is not installed (.ci/run installs it)")
    if haproxy_binary() is None:
        unavailable("haproxy is not installed (.ci/run installs it)")
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def free_port_on_every_node() -> int:
    """A port free on all three node addresses (each node listens on its own)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((NODES[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in NODES[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no common free port")


def node_config(path: Path, address: str, port: int, redis_url: str) -> Path:
    path.write_text(
        f"""
[server]
hostname = "node-{address.rsplit(".", 1)[1]}.test"

[[listeners]]
address = "{address}"
port = {port}
proxy_protocol = true
proxy_trusted = ["127.0.0.1/32"]

[redis]
url = "{redis_url}"
timeout = 0.5

[plugins]
enabled = ["{RATELIMIT}", "recipients", "discard"]

[plugins."{RATELIMIT}"]
[[plugins."{RATELIMIT}".rules]]
key = "client"
stage = "connect"
limit = {LIMIT}
window = "1h"

[plugins.recipients]
domains = ["example.com"]
"""
    )
    return path


def greet(port: int, client: str = CLIENT) -> bytes:
    """The greeting a client on ``client`` gets through HAProxy."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(client, 0)) as s:
        line = s.makefile("rb").readline()
        if line.startswith(b"220 "):
            s.sendall(b"QUIT\r\n")
        return line


def test_three_nodes_behind_haproxy_share_one_rate_limit(
    tmp_path: Path, redis: RedisServer
) -> None:
    port = free_port_on_every_node()
    servers = "\n".join(
        f"    server n{i} {host}:{port} send-proxy-v2 {CHECKS}" for i, host in enumerate(NODES)
    )
    text = f"""global
    nbthread 1
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
frontend fe_smtp
    bind 127.0.0.1:{{port}}
    default_backend be_smtp
backend be_smtp
    balance roundrobin
{servers}
"""
    frontend_port = free_port_on_every_node()
    with daemons(tmp_path, daemon_env()) as start:
        nodes = []
        for i, host in enumerate(NODES):
            config = node_config(tmp_path / f"node{i}.toml", host, port, redis.url)
            nodes.append(start(config, port))
        for node in nodes:
            wait_until(lambda node=node: "ready (pid" in node.log, DEADLINE, "a node")
        with running_haproxy(tmp_path, text=text.replace("{port}", str(frontend_port))) as lb:
            # Health checks count as connections of 127.0.0.1, not of the client.
            answers = [greet(frontend_port) for _ in range(LIMIT + 3)]
            # The rule's 451 comes as 421: only 421 or 554 stand in for a greeting.
            assert [a[:3] for a in answers] == [b"220"] * LIMIT + [b"421"] * 3, answers
            served_by = {a.split()[1] for a in answers[:LIMIT]}
            assert len(served_by) >= 2  # round robin: the limit held across nodes
            for node in nodes:
                wait_until(lambda node=node: CLIENT in node.log, DEADLINE, "the client's address")
            # One node dies: the others serve every new client (127.0.0.6 has
            # its own limit), HAProxy's checks take the dead one out.
            os.killpg(nodes[0].proc.pid, signal.SIGKILL)
            nodes[0].proc.wait(timeout=DEADLINE)
            wait_until(lambda: "n0 is DOWN" in lb.log, DEADLINE, "HAProxy to see n0 down")
            after = [greet(frontend_port, "127.0.0.6") for _ in range(4)]
            assert all(a.startswith(b"220 ") for a in after), after
            assert {a.split()[1] for a in after} <= {b"node-3.test", b"node-4.test"}
        for node in nodes[1:]:
            assert node.stop() == 0

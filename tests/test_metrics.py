"""bonzo.metrics: what each counter counts, through SessionTester (no socket),
a real SMTPServer (connections, TLS-less), the [metrics] table, and the cost
of metrics off."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import smtplib
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import weakref

import pytest

pytest.importorskip("prometheus_client")

from e2e_support import TIMEOUT, wait_until  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bonzo import errors, metrics  # noqa: E402
from bonzo.config import ConfigError, parse_config  # noqa: E402
from bonzo.hooks import PluginSet  # noqa: E402
from bonzo.hookspecs import Accept  # noqa: E402
from bonzo.metrics import Metrics, MetricsServer  # noqa: E402
from bonzo.protocol import NEED_DATA, SMTPProtocol  # noqa: E402
from bonzo.server import SMTPServer  # noqa: E402
from bonzo.settings import ListenerSettings, SMTPSettings  # noqa: E402
from bonzo.testing import SessionTester  # noqa: E402


class Owner:
    """Accepts every recipient but nobody@, delivers every message."""

    def bonzo_rcpt(self, address):
        if address.startswith("nobody@"):
            raise errors.SMTPError(550, "No such user", enhanced_code="5.1.1")
        return Accept()

    async def bonzo_deliver(self, envelope):
        await asyncio.sleep(0)
        return Accept()


class Broken:
    def bonzo_helo(self, name):
        if name == "boom.example":
            raise RuntimeError("broken on purpose")


class Slow:
    async def bonzo_mail(self, address):
        if address.startswith("slow@"):
            await asyncio.sleep(5)


SETTINGS = SMTPSettings(hostname="bonzo.test")


def plugin_set() -> PluginSet:
    plugins = PluginSet(timeout=5.0)
    plugins.register(Broken(), "broken")
    plugins.register(Slow(), "slow", timeout=0.05)
    plugins.register(Owner(), "owner")
    return plugins


@pytest.fixture
def counted():
    """A Metrics of its own registry, active for the test, and its plugins."""
    plugins = plugin_set()
    m = Metrics(registry=CollectorRegistry()).install(plugins)
    try:
        yield m, plugins
    finally:
        m.uninstall()
    assert metrics.active is None


def value(m: Metrics, name: str, **labels: str) -> float:
    m.flush()
    found = m.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


@pytest.mark.expect_errors
def test_session_counters_commands_replies_refusals_hooks_failures_messages(counted):
    m, plugins = counted

    async def session() -> bytes:
        tester = SessionTester(plugins)
        m.watch(tester.core)
        await tester.connect()
        return await tester.send(
            b"EHLO client.example\r\n"
            b"MAIL FROM:<a@example.org>\r\n"
            b"RCPT TO:<b@example.org>\r\n"
            b"RCPT TO:<nobody@example.org>\r\n"
            b"DATA\r\n"
            b"Subject: hi\r\n\r\nbody\r\n.\r\n"
            b"FROB\r\n"
            b"HELO boom.example\r\n"
            b"MAIL FROM:<slow@example.org>\r\n"
            b"NOOP\r\n"
            b"QUIT\r\n"
        )

    replies = asyncio.run(session())
    assert b"250 2.0.0 Ok: queued" in replies and b"550 5.1.1" in replies
    assert value(m, "bonzo_commands_total", verb="MAIL") == 2
    assert value(m, "bonzo_commands_total", verb="RCPT") == 2
    assert value(m, "bonzo_commands_total", verb="NOOP") == 1
    # A verb the client made up is never a label of its own.
    assert value(m, "bonzo_commands_total", verb="other") == 1
    assert value(m, "bonzo_commands_total", verb="FROB") == 0
    assert value(m, "bonzo_replies_total", stage="connect", code_class="2xx") == 1
    assert value(m, "bonzo_replies_total", stage="RCPT", code_class="2xx") == 1
    assert value(m, "bonzo_replies_total", stage="RCPT", code_class="5xx") == 1
    assert value(m, "bonzo_replies_total", stage="DATA", code_class="3xx") == 1
    assert value(m, "bonzo_replies_total", stage="message", code_class="2xx") == 1
    assert value(m, "bonzo_replies_total", stage="other", code_class="5xx") == 1
    # Who refused: the owner plugin at RCPT, the core for the unknown verb,
    # the faults (4xx) charged to the plugins that failed.
    assert value(m, "bonzo_refusals_total", plugin="owner", stage="RCPT", code_class="5xx") == 1
    assert value(m, "bonzo_refusals_total", plugin="core", stage="other", code_class="5xx") == 1
    assert value(m, "bonzo_refusals_total", plugin="broken", stage="HELO", code_class="4xx") == 1
    assert value(m, "bonzo_refusals_total", plugin="slow", stage="MAIL", code_class="4xx") == 1
    failures = "bonzo_plugin_failures_total"
    assert value(m, failures, plugin="broken", hook="bonzo_helo", kind="error") == 1
    assert value(m, failures, plugin="slow", hook="bonzo_mail", kind="timeout") == 1
    assert value(m, "bonzo_messages_accepted_total", disposition="delivered") == 1
    assert value(m, "bonzo_messages_accepted_bytes_total") == len(b"Subject: hi\r\n\r\nbody\r\n")
    # Every hook call is timed, the awaited ones with their wait.
    assert value(m, "bonzo_hook_duration_seconds_count", plugin="owner", hook="bonzo_rcpt") == 2
    assert value(m, "bonzo_hook_duration_seconds_count", plugin="owner", hook="bonzo_deliver") == 1
    assert value(m, "bonzo_hook_duration_seconds_count", plugin="slow", hook="bonzo_mail") == 2
    slow = value(m, "bonzo_hook_duration_seconds_sum", plugin="slow", hook="bonzo_mail")
    assert 0.04 < slow < 2.0
    fast = value(
        m, "bonzo_hook_duration_seconds_bucket", plugin="owner", hook="bonzo_rcpt", le="0.01"
    )
    assert fast == 2


def test_flush_adds_only_what_is_new(counted):
    m, plugins = counted

    async def session() -> None:
        tester = SessionTester(plugins)
        m.watch(tester.core)
        await tester.connect()
        await tester.send(b"NOOP\r\n")
        m.flush()
        await tester.send(b"NOOP\r\nNOOP\r\n")

    asyncio.run(session())
    assert value(m, "bonzo_commands_total", verb="NOOP") == 3
    assert value(m, "bonzo_commands_total", verb="NOOP") == 3


def test_a_watched_core_is_freed_without_the_cycle_collector(counted):
    """The wrappers metrics puts on a core make no reference cycle: the
    core (and its session) is freed by reference counting once dropped."""
    m, _ = counted
    refused = []
    gc.collect()
    gc.disable()
    try:
        core = SMTPProtocol(SETTINGS, "192.0.2.1", on_refusal=refused.append)
        m.watch(core)
        core.receive_data(b"NOOP\r\nMAIL FROM:<a@example.org>\r\n")
        assert core.next_event() is NEED_DATA  # NOOP answered, MAIL refused
        assert core.data_to_send().startswith(b"250 ")
        weak = weakref.ref(core)
        del core
        assert weak() is None
    finally:
        gc.enable()
    # Counting still works, and the callback still runs.
    assert value(m, "bonzo_commands_total", verb="NOOP") == 1
    assert value(m, "bonzo_commands_total", verb="MAIL") == 1
    assert [r.code for r in refused] == [503]


def test_metrics_off_leaves_the_session_and_the_plugins_alone():
    plugins = plugin_set()
    functions = {hook: [c.function for c in calls] for hook, calls in plugins.calls.items()}
    assert metrics.active is None
    tester = SessionTester(plugins)
    core = tester.core
    # Nothing wrapped: the class's own methods run.
    assert core._handle_line.__func__ is SMTPProtocol._handle_line  # type: ignore[attr-defined]
    assert core._queue.__func__ is SMTPProtocol._queue  # type: ignore[attr-defined]
    assert {h: [c.function for c in calls] for h, calls in plugins.calls.items()} == functions


def test_server_connections_open_total_refused_by_limit(counted):
    m, plugins = counted

    async def main() -> tuple[float, float, float]:
        from tornado.netutil import bind_sockets

        server = SMTPServer(plugins=plugins, max_connections=1)
        sock = bind_sockets(0, "127.0.0.1")[0]
        port = sock.getsockname()[1]
        server.add_sockets([sock])
        loop = asyncio.get_running_loop()

        def client() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as first:
                first.ehlo("client.example")
                # The second is over max_connections: 421 at once.
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=10):
                        pass
                except smtplib.SMTPConnectError as exc:
                    refused = exc.smtp_code
                return refused, first.noop()[1]

        refused, _ = await loop.run_in_executor(None, client)
        assert refused == 421
        for _ in range(200):
            if not server.connections:
                break
            await asyncio.sleep(0.01)
        open_now = value(m, "bonzo_connections_open")
        server.stop()
        return (
            open_now,
            value(m, "bonzo_connections_total"),
            value(m, "bonzo_connections_refused_total", reason="max_connections"),
        )

    open_now, total, refused = asyncio.run(main())
    assert (open_now, total, refused) == (0, 2, 1)


def test_plugin_refusal_at_connect_counts_as_refused_connection():
    class NoThanks:
        def bonzo_connect(self):
            raise errors.SMTPError(554, "Go away", enhanced_code="5.7.1")

    plugins = PluginSet()
    plugins.register(NoThanks(), "nothanks")
    m = Metrics(registry=CollectorRegistry()).install(plugins)
    try:
        tester = SessionTester(plugins)
        m.watch(tester.core)
        assert asyncio.run(tester.connect()).startswith(b"554")
        assert value(m, "bonzo_connections_refused_total", reason="plugin") == 1
        labels = {"plugin": "nothanks", "stage": "connect", "code_class": "5xx"}
        assert value(m, "bonzo_refusals_total", **labels) == 1
    finally:
        m.uninstall()


def test_connections_closed_for_proxy_reasons_count_as_refused(counted, start_server, log_watch):
    # A balancer that sends no header, or from an address not trusted, is
    # seen on the dashboard, not only in the log.
    m, plugins = counted
    listener = ListenerSettings(proxy_protocol=True, proxy_trusted=["127.0.0.1/32"])
    server = start_server(plugins=plugins, listener=listener, proxy_timeout=0.3)
    for source, data in (
        ("127.0.0.2", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 25\r\n"),  # not trusted
        ("127.0.0.1", b"EHLO client.example\r\n"),  # no header
        ("127.0.0.1", b""),  # nothing in time
        ("127.0.0.1", b"PROXY TCP4 192.0.2.1 192.0.2.2 1 25\r\nQUIT\r\n"),  # served
    ):
        with socket.create_connection(
            server.address, timeout=TIMEOUT, source_address=(source, 0)
        ) as s:
            s.sendall(data)
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:  # closed with the octets unread
                pass
    wait_until(lambda: len(log_watch.matching("closed without greeting")) == 3, message="3 lines")
    server.wait_connections(0)
    assert value(m, "bonzo_connections_refused_total", reason="proxy") == 3
    assert value(m, "bonzo_connections_total") == 4
    assert value(m, "bonzo_replies_total", stage="connect", code_class="2xx") == 1


def test_queue_and_tls_counters():
    m = Metrics(registry=CollectorRegistry())
    m.queue_outcomes(2, 1, 0)
    m.queue_outcomes(0, 0, 3)
    m.queue_depth({"new": 4, "deferred": 2, "held": 0})
    assert value(m, "bonzo_queue_deliveries_total", outcome="delivered") == 2
    assert value(m, "bonzo_queue_deliveries_total", outcome="deferred") == 1
    assert value(m, "bonzo_queue_deliveries_total", outcome="bounced") == 3
    assert value(m, "bonzo_queue_messages", state="new") == 4
    assert value(m, "bonzo_queue_messages", state="deferred") == 2

    class Conn:
        def __init__(self, version: str) -> None:
            self.protocol = type("Core", (), {"tls_info": {"version": version}})()

    m.open = 2
    m.connection_closed(Conn("TLSv1.3"))
    m.connection_closed(Conn("SSLv2-or-anything"))
    assert value(m, "bonzo_tls_sessions_total", version="TLSv1.3") == 1
    assert value(m, "bonzo_tls_sessions_total", version="other") == 1
    assert value(m, "bonzo_connections_open") == 0


def test_store_failures_by_plugin_and_action(caplog):
    """StoreFailures counts every failure (the log has one line a minute);
    a plugin not named when the metrics were made counts as "other"."""
    from bonzo_plugins._config import StoreFailures

    m = Metrics(registry=CollectorRegistry(), plugins=["ratelimit"]).install()
    try:
        failures = StoreFailures(logging.getLogger("test.store"), "ratelimit")
        for _ in range(3):
            failures.report(OSError("Redis down"), "allowed", "accept")
        failures.report(OSError("Redis down"), "refused", "tempfail")
        StoreFailures(logging.getLogger("test.store"), "mine").report(
            OSError("x"), "allowed", "accept"
        )
        assert value(m, "bonzo_store_failures_total", plugin="ratelimit", action="accept") == 3
        assert value(m, "bonzo_store_failures_total", plugin="ratelimit", action="tempfail") == 1
        assert value(m, "bonzo_store_failures_total", plugin="other", action="accept") == 1
    finally:
        m.uninstall()
    assert [r.getMessage() for r in caplog.records].count(
        "ratelimit: Redis down; allowed"
    ) == 1  # the log line stays rate-limited


def test_http_listener_metrics_and_health():
    m = Metrics(registry=CollectorRegistry())
    m.commands["NOOP"] = 5

    async def main() -> list[tuple[int, bytes]]:
        from tornado.netutil import bind_sockets

        server = MetricsServer(m, "/custom/metrics")
        sock = bind_sockets(0, "127.0.0.1")[0]
        port = sock.getsockname()[1]
        server.add_sockets([sock])
        loop = asyncio.get_running_loop()

        def get(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        out = [await loop.run_in_executor(None, get, p) for p in ("/custom/metrics", "/health")]
        out.append(await loop.run_in_executor(None, get, "/metrics"))
        server.stopping = True
        out.append(await loop.run_in_executor(None, get, "/health"))
        await server.close()
        assert sock.fileno() == -1  # the listening socket is closed with the server
        return out

    (mcode, body), (hcode, health), (other, _), (scode, stopping) = asyncio.run(main())
    assert mcode == 200 and b'bonzo_commands_total{verb="NOOP"} 5.0' in body
    assert hcode == 200 and b'"status": "ok"' in health
    assert other == 404
    assert scode == 503 and b'"status": "stopping"' in stopping


def test_metrics_config_table():
    assert not parse_config("").metrics.enabled
    assert not parse_config("[metrics]\n").metrics.enabled
    config = parse_config('[metrics]\naddress = "::1"\nport = 9125\npath = "/m"\n')
    assert config.metrics.enabled
    assert (config.metrics.address, config.metrics.port, config.metrics.path) == ("::1", 9125, "/m")
    for text, key, message in (
        ("[metrics]\nport = 0\n", "metrics.port", "1..65535"),
        ("[metrics]\nport = true\n", "metrics.port", "1..65535"),
        ('[metrics]\naddress = "example.org"\nport = 1\n', "metrics.address", "IP address"),
        ('[metrics]\npath = "metrics"\n', "metrics.path", "URL path"),
        ('[metrics]\npath = "/a b"\n', "metrics.path", "URL path"),
        ('[metrics]\npath = "/health"\n', "metrics.path", "health"),
        ("[metrics]\nprot = 1\n", "metrics.prot", "unknown key"),
        ("metrics = 1\n", "metrics", "must be a table"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(text, source="bonzo.toml")
        assert str(info.value).startswith(f"bonzo.toml: {key}: "), str(info.value)
        assert message in str(info.value)


def test_starttls_session_counted_by_version(counted, tmp_path):
    trustme = pytest.importorskip("trustme")
    import ssl

    from bonzo.settings import ListenerSettings
    from bonzo.tls import CertificatePair, make_server_context

    m, plugins = counted
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    listener = ListenerSettings(
        tls_context=make_server_context(CertificatePair(str(cert), str(key)))
    )
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def main() -> str:
        from tornado.netutil import bind_sockets

        server = SMTPServer(plugins=plugins, listener=listener)
        sock = bind_sockets(0, "127.0.0.1")[0]
        port = sock.getsockname()[1]
        server.add_sockets([sock])

        def client() -> str:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.starttls(context=client_ctx)
                smtp.sendmail("a@example.org", ["b@example.org"], b"Subject: tls\r\n\r\nhi\r\n")
                return str(smtp.sock.version())

        version = await asyncio.get_running_loop().run_in_executor(None, client)
        for _ in range(200):
            if not server.connections:
                break
            await asyncio.sleep(0.01)
        server.stop()
        return version

    version = asyncio.run(main())
    assert version in ("TLSv1.2", "TLSv1.3")
    assert value(m, "bonzo_tls_sessions_total", version=version) == 1
    assert value(m, "bonzo_commands_total", verb="STARTTLS") == 1
    assert value(m, "bonzo_messages_accepted_total", disposition="delivered") == 1


def test_a_port_without_prometheus_client_is_a_configuration_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "prometheus_client" else real(name, *a),
    )
    assert not parse_config("[metrics]\n").metrics.enabled  # off: not needed
    with pytest.raises(ConfigError, match=r"metrics\.port: prometheus-client is not installed"):
        parse_config("[metrics]\nport = 9125\n", source="bonzo.toml")


def test_the_http_listener_keeps_at_most_max_connections_open(monkeypatch):
    """Idle connections beyond the cap close the oldest (the listener never
    holds more descriptors than that: worker 0's SMTP sessions need them),
    the health check still answers, and an idle connection is closed after
    the idle timeout."""
    import os
    import socket

    monkeypatch.setattr(metrics, "HTTP_IDLE_TIMEOUT", 1.0)
    m = Metrics(registry=CollectorRegistry())

    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def main() -> tuple[int, int, bytes, float]:
        from tornado.netutil import bind_sockets

        server = MetricsServer(m, max_connections=3)
        sock = bind_sockets(0, "127.0.0.1")[0]
        port = sock.getsockname()[1]
        server.add_sockets([sock])
        loop = asyncio.get_running_loop()
        before = open_descriptors()
        idle = []
        for _ in range(20):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.append(c)
            await asyncio.sleep(0.01)  # accepted, one at a time
        await asyncio.sleep(0.2)
        held = open_descriptors() - before - len(idle)  # the server's side

        def get() -> tuple[int, bytes]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
                return r.status, r.read()

        status, body = await loop.run_in_executor(None, get)
        # The newest idle connection is closed by the idle timeout.
        newest = idle[-1]
        newest.setblocking(False)
        started = loop.time()
        while loop.time() - started < 5:
            try:
                if newest.recv(1) == b"":
                    break
            except BlockingIOError:
                await asyncio.sleep(0.05)
        waited = loop.time() - started
        for c in idle:
            c.close()
        await server.close()
        return held, status, body, waited

    held, status, body, waited = asyncio.run(main())
    assert held <= 3
    assert status == 200 and b'"status": "ok"' in body
    assert waited < 3


def test_metrics_max_connections_setting_and_descriptor_budget():
    from bonzo.cli import _descriptor_warning, _metrics_connections
    from bonzo.config import MetricsConfig

    assert MetricsConfig().max_connections == metrics.MAX_CONNECTIONS
    config = parse_config("[metrics]\nport = 9125\nmax_connections = 4\n")
    assert config.metrics.max_connections == 4 and _metrics_connections(config) == 4
    assert _metrics_connections(parse_config("[metrics]\nmax_connections = 4\n")) == 0  # off
    for value in ("0", "1001", "true", '"8"'):
        with pytest.raises(ConfigError) as info:
            parse_config(f"[metrics]\nmax_connections = {value}\n", source="bonzo.toml")
        message = "bonzo.toml: metrics.max_connections: must be an integer 1..1000"
        assert str(info.value).startswith(message)
    # Worker 0's descriptors are budgeted for the metrics connections too.
    assert _descriptor_warning(100, 264, 264) is None
    assert _descriptor_warning(100, 264, 264, 16) is not None


# ---------------------------------------------------- the multiprocess directory
def test_only_directories_no_process_holds_are_removed(tmp_path, monkeypatch):
    """The lock in a directory is held while its daemon (or a worker forked
    from it) runs; one nobody holds is left over, whatever else is there."""
    monkeypatch.setattr(metrics.tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    live = metrics.make_multiprocess_dir()
    try:
        assert live.startswith(str(tmp_path / "bonzo-metrics-"))
        assert os.environ[metrics.MULTIPROC_ENV] == live
        # Others' and older shapes are never touched: no lock file, a file, a
        # symbolic link to a directory whose lock nobody holds.
        (tmp_path / "bonzo-metrics-nolock").mkdir()
        (tmp_path / "bonzo-metrics-file").write_text("x")
        target = tmp_path / "elsewhere"
        target.mkdir()
        (target / ".lock").write_text("")
        (tmp_path / "bonzo-metrics-link").symlink_to(target)
        assert metrics.remove_abandoned_dirs(str(tmp_path)) == []

        # What SIGKILL leaves: the directory, its lock no longer held.
        dead = metrics.make_multiprocess_dir()
        os.close(metrics._held_locks.pop(dead))
        assert metrics.remove_abandoned_dirs(str(tmp_path)) == [dead]
        assert not os.path.exists(dead)
        assert os.path.isdir(live) and (tmp_path / "bonzo-metrics-nolock").is_dir()
        assert (target / ".lock").exists()
    finally:
        metrics.remove_multiprocess_dir(live)
    assert not os.path.exists(live)


def test_a_worker_keeps_the_directory_in_use(tmp_path, monkeypatch):
    """A worker holds the descriptor it inherited (here passed to a child
    process): the directory stays while it runs, the daemon gone."""
    monkeypatch.setattr(metrics.tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    path = metrics.make_multiprocess_dir()
    fd = metrics._held_locks.pop(path)
    worker = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        pass_fds=(fd,),
    )
    try:
        os.close(fd)
        assert metrics.remove_abandoned_dirs(str(tmp_path)) == []
        assert os.path.isdir(path)
    finally:
        assert worker.stdin is not None
        worker.stdin.close()
        worker.wait(timeout=TIMEOUT)
    assert metrics.remove_abandoned_dirs(str(tmp_path)) == [path]

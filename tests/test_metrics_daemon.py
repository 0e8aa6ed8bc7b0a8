"""[metrics] in the real daemon: two workers count into one multiprocess
directory, worker 0 answers /metrics with the sum and /health; the directory
is removed at exit."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")

from daemon_support import DEADLINE, daemon_env, daemons, free_port, wait_until  # noqa: E402
from metrics_support import get, sample, send, write_config  # noqa: E402

from bonzo.metrics import FLUSH_INTERVAL  # noqa: E402


def test_two_workers_counted_together_and_health(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, port, metrics_port, workers=2)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready(workers=2)
        status, body = get(metrics_port, "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        # One worker is busy delivering block@'s message: the other three
        # messages go to the other worker.
        blocked = threading.Thread(target=send, args=(port, "block@example.org"))
        blocked.start()
        time.sleep(0.5)
        for _ in range(3):
            send(port)
        blocked.join(timeout=30)
        assert not blocked.is_alive()
        pids = set(re.findall(r"\[(\d+)\] tornado\.access: \S+ 127\.0\.0\.1 from=", daemon.log))
        assert len(pids) == 2, daemon.log

        def scraped() -> str | None:
            status, text = get(metrics_port, "/metrics")
            assert status == 200
            delivered = 'disposition="delivered"'
            done = sample(text, "bonzo_messages_accepted_total", delivered) == 4
            return text if done and sample(text, "bonzo_connections_open") == 0 else None

        # Each worker adds its counts within a second (FLUSH_INTERVAL).
        wait_until(scraped, what="4 messages and no open connection in the metrics")
        # Then every worker's last counts: nothing happens meanwhile.
        time.sleep(2 * FLUSH_INTERVAL + 0.2)
        status, text = get(metrics_port, "/metrics")
        assert status == 200
        assert sample(text, "bonzo_messages_accepted_total", 'disposition="delivered"') == 4
        assert sample(text, "bonzo_connections_open") == 0
        assert sample(text, "bonzo_commands_total", 'verb="MAIL"') == 4
        assert sample(text, "bonzo_commands_total", 'verb="QUIT"') >= 4
        assert sample(text, "bonzo_replies_total", 'code_class="2xx",stage="message"') == 4
        assert sample(text, "bonzo_connections_total") >= 5  # wait_ready's too
        assert sample(text, "bonzo_messages_accepted_bytes_total") >= 4 * 60
        count = sample(
            text,
            "bonzo_hook_duration_seconds_count",
            'hook="bonzo_deliver",plugin="metricsplug:Sink"',
        )
        assert count == 4
        slow = sample(
            text,
            "bonzo_hook_duration_seconds_bucket",
            'hook="bonzo_deliver",le="1.0",plugin="metricsplug:Sink"',
        )
        assert slow == 3  # block@'s took 1.5 s
        assert get(metrics_port, "/nothing")[0] == 404
        found = re.search(r"multiprocess directory (\S+)", daemon.log)
        assert found, daemon.log
        directory = Path(found.group(1))
        assert list(directory.glob("*.db"))
        assert daemon.stop() == 0
    assert not directory.exists()


def test_health_is_503_while_a_graceful_stop_waits_for_a_message(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, port, metrics_port, workers=1)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        assert get(metrics_port, "/health")[0] == 200
        client = smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE)
        try:
            client.ehlo("client.example")
            client.mail("a@example.org")
            client.rcpt("b@example.org")
            assert client.docmd("DATA")[0] == 354
            client.send(b"Subject: in flight\r\n\r\n")  # the message is not over
            daemon.proc.send_signal(signal.SIGTERM)

            def stopping() -> bool:
                status, body = get(metrics_port, "/health")
                return status == 503 and json.loads(body)["status"] == "stopping"

            wait_until(stopping, what="/health to say 503 stopping")

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()
                except ConnectionRefusedError:
                    return True
                return False

            # As docs/operations.rst says: no drain period, the SMTP listener
            # closes as /health turns 503 (a client goes to another MX at once).
            wait_until(refused, timeout=2.0, what="new SMTP connections to be refused")
            assert stopping()
            client.send(b"Hello.\r\n.\r\n")
            assert client.getreply()[0] == 250
            # After the message the session ends (421): the server is stopping.
        finally:
            client.close()
        assert daemon.proc.wait(timeout=DEADLINE) == 0


def test_a_killed_worker_stops_counting_as_open(tmp_path: Path) -> None:
    """SIGKILL to worker 0 (the one answering /health): the supervisor
    starts another that takes the metrics socket over, and the dead worker's
    connections no longer count as open (mark_process_dead)."""
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, port, metrics_port, workers=2)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready(workers=2)
        first = json.loads(get(metrics_port, "/health")[1])["pid"]
        clients = []
        try:
            for _ in range(6):
                client = smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE)
                client.ehlo("client.example")
                clients.append(client)

            def open_now(n: int) -> Callable[[], bool]:
                return lambda: (
                    sample(get(metrics_port, "/metrics")[1], "bonzo_connections_open") == n
                )

            wait_until(open_now(6), what="6 open connections in the metrics")
            os.kill(first, signal.SIGKILL)

            def replaced() -> int | None:
                try:
                    status, body = get(metrics_port, "/health")
                except OSError:
                    return None
                pid = json.loads(body)["pid"]
                return pid if status == 200 and pid != first else None

            wait_until(replaced, what="a new worker 0")
            alive = 0
            for client in clients:
                try:
                    alive += client.noop()[0] == 250
                except (smtplib.SMTPException, OSError):
                    pass
            wait_until(open_now(alive), what=f"{alive} open connections in the metrics")
        finally:
            for client in clients:
                try:
                    client.close()
                except OSError:
                    pass
        assert daemon.stop() == 0


def test_the_directory_a_killed_daemon_left_is_removed_by_the_next(tmp_path: Path) -> None:
    """kill -9 of the supervisor leaves its multiprocess directory; the next
    daemon removes it, says so, and leaves the directory of a daemon that
    still runs alone."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**daemon_env(), "TMPDIR": str(temp)}

    def directory_of(daemon) -> Path:
        found = re.search(r"multiprocess directory (\S+)", daemon.log)
        assert found, daemon.log
        return Path(found.group(1))

    with daemons(tmp_path, env) as start:
        configs = []
        for n in range(3):
            workdir = tmp_path / f"d{n}"
            workdir.mkdir()
            port = free_port()
            configs.append((write_config(workdir, port, free_port(), workers=2), port))
        killed = start(*configs[0])
        killed.wait_ready(workers=2)
        left = directory_of(killed)
        assert left.parent == temp
        workers = [int(p) for p in re.findall(r"ready \(pid (\d+)\)", killed.log)]
        killed.proc.kill()
        killed.proc.wait(timeout=DEADLINE)
        wait_until(
            lambda: not any(_running(pid) for pid in workers),
            what="the killed daemon's workers to exit",
        )
        assert left.is_dir()

        second = start(*configs[1])
        second.wait_ready(workers=2)
        assert "metrics: removed 1 directory(ies) a stopped daemon left in" in second.log
        assert not left.exists()
        third = start(*configs[2])
        third.wait_ready(workers=2)
        assert "removed" not in third.log
        assert directory_of(second).is_dir() and directory_of(third).is_dir()
        send(configs[1][1])  # the second still counts
        assert second.stop() == 0 and third.stop() == 0
    assert list(temp.iterdir()) == []


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


def test_metrics_port_in_use_stops_the_start(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = write_config(tmp_path, port, busy.getsockname()[1], workers=1)
        with daemons(tmp_path, daemon_env()) as start:
            daemon = start(config, port)
            assert daemon.proc.wait(timeout=DEADLINE) == 1
            assert "metrics: cannot listen on 127.0.0.1:" in daemon.log


def test_default_configuration_keeps_metrics_off() -> None:
    from bonzo.config import load_config

    assert not load_config(None).metrics.enabled


def test_check_shows_where_the_metrics_are(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = write_config(tmp_path, free_port(), 9125, workers=1)
    result = subprocess.run(
        [sys.executable, "-m", "bonzo", "check", "-c", str(config)],
        env=daemon_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, result.stderr
    assert "  metrics: http://127.0.0.1:9125/metrics and /health" in result.stdout.splitlines()


def test_reload_keeps_the_metrics_and_times_the_new_plugins(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, port, metrics_port, workers=1)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        send(port)
        # A new port in the file: logged, and kept for the running daemon.
        config.write_text(config.read_text().replace(str(metrics_port), str(free_port())))
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in daemon.log, what="the reload")
        assert "reload: [metrics] takes effect at a restart" in daemon.log
        send(port)
        labels = 'hook="bonzo_deliver",plugin="metricsplug:Sink"'

        def both() -> bool:
            text = get(metrics_port, "/metrics")[1]
            return sample(text, "bonzo_hook_duration_seconds_count", labels) == 2

        # The second message went to the new plugins: timed too.
        wait_until(both, what="both deliveries timed")
        assert daemon.stop() == 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_scrape_while_out_of_descriptors_waits_without_spinning(tmp_path: Path) -> None:
    # The metrics endpoint has the SMTP listeners' accept loop: with every
    # descriptor taken by SMTP clients, a scrape waits in the listen queue
    # (it used to make the loop spin, a traceback per try), and is answered
    # once clients leave.
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, port, metrics_port, workers=1)
    # Every client is let in (none refused, which would free descriptors).
    config.write_text(config.read_text() + "\n[limits]\nmax_connections_per_ip = 1000\n")
    prelude = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))"
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port, prelude=prelude)
        daemon.wait_ready()
        assert get(metrics_port, "/health")[0] == 200
        clients = [
            socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(100)
        ]
        try:
            wait_until(lambda: "cannot accept connections" in daemon.log, what="the EMFILE report")
            scrape = socket.create_connection(("127.0.0.1", metrics_port), timeout=DEADLINE)
            scrape.sendall(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
            wait_until(
                lambda: f"cannot accept connections on 127.0.0.1:{metrics_port}" in daemon.log,
                what="the metrics listener's report",
            )
            before = _cpu_seconds(daemon.proc.pid)
            time.sleep(2.0)
            assert _cpu_seconds(daemon.proc.pid) - before < 0.6  # not spinning
            assert "Traceback" not in daemon.log
        finally:
            for client in clients:
                client.close()
        with scrape:
            answer = scrape.recv(200)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert daemon.stop() == 0

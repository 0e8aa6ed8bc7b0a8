"""[metrics] in the real daemon: two workers count into one multiprocess
directory, worker 0 answers /metrics with the sum and /health; the directory
is removed at exit."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")

from daemon_support import daemon_env, daemons, free_port, wait_until  # noqa: E402
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

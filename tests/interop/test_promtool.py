"""``promtool check metrics`` (Debian package prometheus) passes on what a
real daemon's /metrics serves after some mail: it parses, and Prometheus's
naming lint finds nothing (a lint finding is exit status 3, a broken
exposition 1)."""

from __future__ import annotations

import shutil
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")

from daemon_support import DEADLINE, daemon_env, daemons, free_port, wait_until  # noqa: E402
from metrics_support import get, sample, send, write_config  # noqa: E402

from bonzo.metrics import FLUSH_INTERVAL  # noqa: E402

from .peers import unavailable  # noqa: E402


def test_promtool_checks_the_scraped_metrics(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool is not installed (Debian package prometheus)")
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, port, metrics_port, workers=2)
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready(workers=2)
        send(port)
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            send(port, "nobody")  # no domain: refused at RCPT (a refusals sample)

        def scraped() -> str | None:
            text = get(metrics_port, "/metrics")[1]
            delivered = sample(text, "bonzo_messages_accepted_total", 'disposition="delivered"')
            return text if delivered else None

        wait_until(scraped, what="a message in the metrics")
        # Then every worker's last counts (the refusal may be the other's).
        time.sleep(2 * FLUSH_INTERVAL + 0.2)
        text = get(metrics_port, "/metrics")[1]
        assert daemon.stop() == 0
    assert "bonzo_hook_duration_seconds_bucket" in text
    assert "bonzo_refusals_total{" in text
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=DEADLINE,
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()

"""Helpers for the tests that scrape a real daemon's metrics: a daemon with
``[metrics]`` on, a local plugin that accepts everything (and blocks its
worker for a while for ``block@`` recipients, so that the next client goes
to another worker), mail sent with smtplib and pages read with urllib, on
127.0.0.1 only, every wait bounded."""

from __future__ import annotations

import re
import smtplib
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

from daemon_support import DEADLINE

PLUGIN = """
import time

from bonzo import Accept


class Sink:
    def bonzo_rcpt(self, address):
        return Accept()

    def bonzo_deliver(self, envelope):
        if envelope.rcpt_tos[0].startswith("block@"):
            time.sleep(1.5)  # this worker takes no client meanwhile
        return Accept()
"""

MESSAGE = "From: a@example.org\r\nTo: b@example.org\r\nSubject: metrics\r\n\r\nHello.\r\n"


def write_config(workdir: Path, port: int, metrics_port: int, workers: int) -> Path:
    """A configuration with the Sink plugin and [metrics] on ``metrics_port``."""
    (workdir / "metricsplug.py").write_text(PLUGIN)
    config = workdir / "bonzo.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            hostname = "mx.test"
            workers = {workers}
            shutdown_grace = 5

            [[listeners]]
            address = "127.0.0.1"
            port = {port}

            [metrics]
            address = "127.0.0.1"
            port = {metrics_port}

            [plugins]
            paths = ["."]
            enabled = ["metricsplug:Sink"]
            """
        )
    )
    return config


def send(port: int, rcpt: str = "b@example.org") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
        client.sendmail("a@example.org", [rcpt], MESSAGE)


def get(port: int, path: str) -> tuple[int, str]:
    """Status and text of ``GET path``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=DEADLINE) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of a text exposition (0 when absent)."""
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0

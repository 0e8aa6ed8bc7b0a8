#!/usr/bin/env python3
"""What [metrics] costs per message, in-process: a four-plugin chain driven
through bonzo.testing.SessionTester (no socket, so only Bonzo's own work is
measured), metrics off and on, in CPU time.

    python bench/metrics_micro.py off
    python bench/metrics_micro.py on

Prints the median and the minimum of 15 runs of 2000 one-recipient 1 KB
messages on one session. Run "off" with another checkout's bonzo first on
PYTHONPATH to compare with the code before a change.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from bonzo.hooks import PluginSet
from bonzo.hookspecs import Accept
from bonzo.settings import SMTPSettings
from bonzo.testing import SessionTester

TRANSACTION = (
    b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
    b"Subject: x\r\n\r\n" + b"x" * 900 + b"\r\n.\r\n"
)


class Access:
    def bonzo_connect(self) -> None:
        return None

    def bonzo_mail(self, address: str) -> None:
        return None

    def bonzo_rcpt(self, address: str) -> None:
        return None


class Recipients:
    def bonzo_rcpt(self, address: str) -> Accept:
        return Accept()


class Headers:
    def bonzo_data(self) -> None:
        return None

    def bonzo_message(self, envelope: object) -> None:
        return None


class Deliver:
    def bonzo_deliver(self, envelope: object) -> Accept:
        return Accept()


async def per_message(metrics_on: bool, count: int) -> float:
    """CPU microseconds per message."""
    plugins = PluginSet()
    for i, plugin in enumerate((Access(), Recipients(), Headers(), Deliver())):
        plugins.register(plugin, f"p{i}")
    counter = None
    if metrics_on:
        from prometheus_client import CollectorRegistry

        from bonzo.metrics import Metrics

        counter = Metrics(registry=CollectorRegistry()).install(plugins)
    settings = SMTPSettings(hostname="bench.test", max_messages_per_connection=10**6)
    tester = SessionTester(plugins, settings=settings)
    if counter is not None:
        counter.watch(tester.core)
    await tester.connect()
    await tester.send(b"EHLO client.example\r\n")
    assert b"250 2.0.0" in await tester.send(TRANSACTION)
    for _ in range(200):
        await tester.send(TRANSACTION)
    start = time.process_time()
    for _ in range(count):
        await tester.send(TRANSACTION)
    elapsed = time.process_time() - start
    if counter is not None:
        counter.uninstall()
    return elapsed / count * 1e6


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] not in ("on", "off"):
        raise SystemExit("usage: metrics_micro.py on|off")
    logging.disable(logging.CRITICAL)
    runs = sorted(asyncio.run(per_message(sys.argv[1] == "on", 2000)) for _ in range(15))
    print(f"metrics {sys.argv[1]}: {runs[7]:.1f} µs/message median, {runs[0]:.1f} min (CPU)")


if __name__ == "__main__":
    main()

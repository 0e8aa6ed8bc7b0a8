"""A reload while the queue waits for a slow next server's reply to the
final dot: the previous configuration's deliveries finish, and nothing is
delivered twice (Postfix's ``smtp-sink``, answering the dot after 14 s --
past the fixed 10 s after which such deliveries used to be cancelled and
made again by the new configuration's runner, and past the queue's hook
time limit, which used to cut the wait for them)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import daemon_env, daemons, free_port, wait_until

from .peers import unavailable
from .test_client_sink import SINK, Sink

pytestmark = pytest.mark.timeout(120)

DOT_DELAY = 14

CONFIG = """
[server]
hostname = "mx.test"
shutdown_grace = 2

[[listeners]]
address = "127.0.0.1"
port = {port}

[plugins]
enabled = ["recipients", "queue"]
# Shorter than the wait for the deliveries in flight: the queue's shutdown
# bounds its own time, the hook limit does not cut it.
timeouts = {{ queue = 5 }}

[plugins.recipients]
domains = ["example.net"]

[plugins.queue]
path = "queue"
scan_interval = 1
min_backoff = 1
max_backoff = 2

[plugins.queue.routes]
"*" = {{ type = "smarthost", host = "127.0.0.1", port = {sink}, tls = "none" }}
"""


@pytest.fixture
def dumps() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sink", dir="/tmp"))
    try:
        os.chmod(path, 0o777)  # smtp-sink writes as nobody
        yield path
    finally:
        shutil.rmtree(path)


def received(dumps: Path) -> Counter[str]:
    ids: Counter[str] = Counter()
    for path in dumps.rglob("*"):
        if path.is_file():
            ids.update(m.decode() for m in re.findall(rb"Message-ID: <([^>]+)>", path.read_bytes()))
    return ids


def test_a_reload_while_deliveries_wait_for_the_dot_reply_delivers_each_once(tmp_path, dumps):
    if not shutil.which(SINK):
        unavailable("Postfix's smtp-sink is not installed (.ci/run installs Postfix)")
    sink = Sink("-d", f"{dumps}/%M.", "-W", f".:{DOT_DELAY}")
    try:
        port = free_port()
        config = tmp_path / "bonzo.toml"
        config.write_text(CONFIG.format(port=port, sink=sink.port))
        with daemons(tmp_path, daemon_env()) as start:
            daemon = start(config, port)
            daemon.wait_ready()
            for n in range(3):
                with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as c:
                    c.sendmail(
                        "a@example.org",
                        ["b@example.net"],
                        f"Message-ID: <r{n}@test>\r\nSubject: {n}\r\n\r\nbody\r\n",
                    )
            time.sleep(2)  # each is tried at once: all three wait for the dot reply
            daemon.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "reloaded" in daemon.log, what="the reload")
            # The previous configuration stops once its deliveries have
            # ended (each answered after DOT_DELAY), not when a limit cut
            # the wait for them: a stop right then leaves nothing queued.
            wait_until(
                lambda: "the previous configuration has stopped" in daemon.log,
                timeout=DOT_DELAY + 15,
                what="the previous configuration to stop",
            )
            assert daemon.stop() == 0
            assert list((tmp_path / "queue" / "data").iterdir()) == [], daemon.log
            wait_until(
                lambda: sum(received(dumps).values()) >= 3, timeout=5, what="three deliveries"
            )
        log = daemon.log
    finally:
        sink.stop()
    assert received(dumps) == Counter({"r0@test": 1, "r1@test": 1, "r2@test": 1}), log
    assert "in flight finish first" in log
    assert "cancelled" not in log

"""Session and message ids: unique within a process, and within each forked
worker (the pid in them is refreshed after a fork)."""

from __future__ import annotations

import subprocess
import sys

from bonzo.session import new_session_id

FORK_AND_PRINT = """
import os
from bonzo.session import new_session_id
parent = new_session_id()
pid = os.fork()
if pid == 0:
    print(os.getpid(), new_session_id(), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print(os.getpid(), parent, flush=True)
"""


def test_ids_are_unique_in_a_process():
    ids = [new_session_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(i.isalnum() and i == i.upper() for i in ids)


def test_a_forked_worker_puts_its_own_pid_in_its_ids():
    result = subprocess.run(
        [sys.executable, "-c", FORK_AND_PRINT], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    (child_pid, child_id), (parent_pid, parent_id) = (
        line.split() for line in result.stdout.splitlines()
    )
    assert child_pid != parent_pid
    # Both counters are at 1 or 2: the ids differ by the pid in them.
    assert f"{int(child_pid):X}" in child_id
    assert f"{int(parent_pid):X}" in parent_id
    assert child_id != parent_id


def test_the_pid_and_the_counter_cannot_be_read_two_ways(monkeypatch):
    import itertools

    import bonzo.session as session_module

    made = []
    for pid, count in ((0x100, 0x12), (0x1001, 0x2)):
        monkeypatch.setattr(session_module, "_pid_hex", f"{pid:06x}")
        monkeypatch.setattr(session_module, "_counter", itertools.count(count))
        monkeypatch.setattr(session_module.time, "time", lambda: 1_800_000_000.0)
        made.append(new_session_id())
    assert made[0] != made[1]

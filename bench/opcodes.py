#!/usr/bin/env python3
"""Bytecode instructions per message: Bonzo against the bare Tornado sink.

    python bench/opcodes.py                      # bonzo-serve and tornado-sink, scenario b
    python bench/opcodes.py --scenario a --messages 2000 --top 30

Time per message moves with the machine and its load; the number of Python
bytecode instructions a server executes per message does not (it moves only
with the code and, a little, with how reads happen to batch). Each server runs
under a tracer that counts the instructions of every function (CPython's
``f_trace_opcodes``, roughly 50 times slower, so the count is all it is good
for), is warmed up with 200 messages from ``smtp-source``, then counts while
``smtp-source`` sends ``--messages`` more. The report gives the total per
message and per source file, and the functions that execute the most.

Use it to compare code (two checkouts, the same command) and to see where a
server's interpreted work goes; the time figures come from ``bench/run.py``.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402  (bench/run.py: its configurations and helpers)

START = signal.SIGUSR2 if not hasattr(signal, "SIGPWR") else signal.SIGPWR
WARMUP = 200


# ------------------------------------------------------------------ the child
def _child(out: str, argv: list[str]) -> None:
    """Run a server (``-m module ...`` or ``script ...``) and count, from the
    START signal until it exits, the instructions executed per function."""
    import runpy

    counts: collections.Counter[tuple[str, int, str]] = collections.Counter()

    def opcode(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
        return opcode

    def call(frame: FrameType, event: str, arg: Any) -> Any:
        # A "call" is also a coroutine resumed: every frame gets traced.
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return opcode

    def start(signum: int, frame: Any) -> None:
        sys.settrace(call)

    def dump() -> None:
        sys.settrace(None)
        rows = [[f, line, name, n] for (f, line, name), n in counts.items()]
        Path(out).write_text(json.dumps(rows))

    import atexit

    signal.signal(START, start)
    atexit.register(dump)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


# ----------------------------------------------------------------- the parent
def _server_argv(server: str, port: int, scratch: Path) -> list[str]:
    if server == "bonzo-serve":
        config = run._daemon_config("discard.toml", port, scratch)
        return ["-m", "bonzo", "serve", "-c", str(config)]
    if server == "tornado-sink":
        return [str(BENCH / "servers" / "tornado_sink.py"), "--port", str(port)]
    raise SystemExit(f"opcodes.py: unknown server {server!r} (bonzo-serve, tornado-sink)")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((run.HOST, port)) == 0


def _send(port: int, messages: int, per_connection: bool, smtp_source: str) -> None:
    argv = [smtp_source, *(["-d"] if per_connection else [])]
    argv += ["-s", "20", "-m", str(messages), "-l", "1024", "-f", run.SENDER, "-t", run.RECIPIENT]
    argv += ["-M", run.HELO_NAME, f"{run.HOST}:{port}"]
    done = subprocess.run(argv, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or done.stderr.strip():
        raise SystemExit(f"smtp-source failed: {done.stderr.decode(errors='replace').strip()}")


def measure(server: str, scenario: str, messages: int, smtp_source: str) -> dict[str, int]:
    """Instructions per function (``file:line name``) over ``messages`` messages."""
    with tempfile.TemporaryDirectory(prefix="bonzo-opcodes-") as tmp:
        scratch = Path(tmp)
        port = run.free_port()
        out = scratch / "counts.json"
        argv = [sys.executable, __file__, "--child", str(out), "--"]
        argv += _server_argv(server, port, scratch)
        log = (scratch / "server.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
        try:
            deadline = time.monotonic() + 60
            while not _listening(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"{server} did not start: {(scratch / 'server.log').read_text()}"
                    )
                time.sleep(0.1)
            per_connection = scenario == "b"
            _send(port, WARMUP, per_connection, smtp_source)
            proc.send_signal(START)
            time.sleep(0.2)
            _send(port, messages, per_connection, smtp_source)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        if not out.exists():
            raise SystemExit(f"{server} left no counts: {(scratch / 'server.log').read_text()}")
        rows = json.loads(out.read_text())
    return {f"{_short(f)}:{line} {name}": n for f, line, name, n in rows}


def _short(path: str) -> str:
    for prefix in sorted({str(run.ROOT) + "/", *(p + "/" for p in sys.path if p)}, key=len)[::-1]:
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def report(name: str, counts: dict[str, int], messages: int, top: int) -> None:
    total = sum(counts.values())
    print(f"\n{name}: {total / messages:,.0f} instructions per message")
    files: collections.Counter[str] = collections.Counter()
    for key, n in counts.items():
        files[key.rsplit(":", 1)[0]] += n
    for path, n in files.most_common(12):
        print(f"  {n / messages:8,.0f}  {path}")
    print(f"  top {top} functions:")
    for key, n in collections.Counter(counts).most_common(top):
        print(f"  {n / messages:8,.0f}  {key}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--servers", default="bonzo-serve,tornado-sink", help="comma-separated (default: both)"
    )
    parser.add_argument("--scenario", choices=["a", "b"], default="b",
                        help="a: one message per connection; b: many (default)")  # fmt: skip
    parser.add_argument(
        "--messages", type=int, default=1000, help="counted messages (default 1000)"
    )
    parser.add_argument("--top", type=int, default=15, help="functions listed per server")
    args = parser.parse_args()
    smtp_source = run.find_tool("smtp-source")
    if smtp_source is None:
        raise SystemExit("opcodes.py needs Postfix's smtp-source (bash bench/install.sh)")
    if args.messages < 1:
        raise SystemExit("--messages must be at least 1")
    print(f"scenario {args.scenario}, {args.messages} messages of 1 KB, 20 sessions, "
          f"Python {sys.version.split()[0]}")  # fmt: skip
    for server in args.servers.split(","):
        counts = measure(server.strip(), args.scenario, args.messages, smtp_source)
        report(server.strip(), counts, args.messages, args.top)


if __name__ == "__main__":
    main()

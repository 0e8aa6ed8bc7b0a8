"""Bonzo as a discarding sink, for the benchmark.

Runs :class:`bonzo.server.SMTPServer` with one plugin that accepts every
recipient and throws each message away, on 127.0.0.1:PORT: the library
without the daemon. It imports Bonzo from this checkout (not from an
installed copy), so it measures the code next to it.

Settings come from ``--set NAME=VALUE`` flags (any field of
:class:`~bonzo.settings.SMTPSettings`; the value is converted to the field's
type), e.g.::

    python bench/servers/bonzo_sink.py --port 2525 --set max_connections=5000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bonzo.hooks import PluginSet  # noqa: E402
from bonzo.hookspecs import Accept  # noqa: E402
from bonzo.server import SMTPServer  # noqa: E402
from bonzo.settings import SMTPSettings  # noqa: E402


class DiscardPlugin:
    """Accepts every recipient and drops each message."""

    def bonzo_rcpt(self) -> Accept:
        return Accept()

    def bonzo_deliver(self) -> Accept:
        return Accept()


def parse_setting(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(SMTPSettings)}
    if not sep or name not in fields:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with a setting name: {text!r}")
    default = getattr(SMTPSettings(hostname="x"), name)
    value: Any
    if isinstance(default, bool):
        value = raw.lower() in ("1", "true", "yes", "on")
    elif isinstance(default, int):
        value = int(raw)
    elif isinstance(default, float):
        value = float(raw)
    elif raw.lower() == "none":
        value = None
    else:
        value = raw
    return name, value


async def main(args: argparse.Namespace) -> None:
    changes = dict(args.set)
    changes.setdefault("hostname", "bonzo-sink.localhost")
    settings = SMTPSettings(**changes)
    plugins = PluginSet()
    plugins.register(DiscardPlugin(), "discard")
    server = SMTPServer(plugins=plugins, settings=settings)
    server.listen(args.port, address=args.host, backlog=args.backlog)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bonzo_sink listening on {args.host}:{args.port}", flush=True)
    await stop.wait()
    server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument(
        "--set",
        action="append",
        type=parse_setting,
        default=[],
        metavar="NAME=VALUE",
        help="an SMTPSettings field",
    )
    asyncio.run(main(parser.parse_args()))

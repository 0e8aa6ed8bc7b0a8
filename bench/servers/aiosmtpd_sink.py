"""aiosmtpd as a discarding sink, for the benchmark (the Python peer we compare to).

Plain asyncio ``create_server`` with aiosmtpd's :class:`~aiosmtpd.smtp.SMTP`
protocol and a handler whose ``handle_DATA`` drops the message; every
recipient is accepted (aiosmtpd's default without ``handle_RCPT``).
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiosmtpd.smtp import SMTP


class DiscardHandler:
    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
        return "250 OK"


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    handler = DiscardHandler()

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname="aiosmtpd-sink.localhost",  # no getfqdn() lookup
            data_size_limit=args.data_size_limit or None,
        )

    server = await loop.create_server(factory, host=args.host, port=args.port, backlog=args.backlog)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"aiosmtpd_sink listening on {args.host}:{args.port}", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument(
        "--data-size-limit", type=int, default=33554432, help="aiosmtpd's data_size_limit (0: none)"
    )
    asyncio.run(main(parser.parse_args()))

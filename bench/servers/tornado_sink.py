"""The bare Tornado read-loop sink: the reference Bonzo's CPU per message is held to.

A :class:`tornado.tcpserver.TCPServer` whose per-connection coroutine does one
``IOStream.read_until(b"\\r\\n")`` per command line and answers with
``stream.write``, with no checks at all: greeting 220, EHLO/HELO 250,
DATA 354 then one ``read_until(b"\\r\\n.\\r\\n")`` for the whole message
(dropped) and 250, QUIT 221 and close, anything else 250. It parses nothing,
keeps no state, never dot-unstuffs and accepts every sender and recipient.
This is the "bare Tornado sink (one read_until per line, no checks)" of the
design notes: the least a Tornado SMTP server can do per message, so a real
server on Tornado can at best match its cost.

The read buffer and the message read are bounded by 200 MiB, the size limit
every server in the benchmark gets, so the 1 MB and 100 MB scenarios fit.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpserver import TCPServer

MIB = 1024 * 1024


class SinkServer(TCPServer):
    def __init__(self, max_message_size: int) -> None:
        # The read buffer must hold a whole message plus its terminator.
        super().__init__(max_buffer_size=max_message_size + MIB)
        self.max_message_size = max_message_size

    async def handle_stream(self, stream: IOStream, address: tuple[str, int]) -> None:
        write = stream.write
        read_until = stream.read_until
        limit = self.max_message_size + 5  # the message and "\r\n.\r\n"
        try:
            write(b"220 tornado-sink.localhost ESMTP\r\n")
            while True:
                line = await read_until(b"\r\n")
                verb = line[:4].upper()
                if verb == b"DATA":
                    write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    await read_until(b"\r\n.\r\n", max_bytes=limit)
                    write(b"250 OK\r\n")
                elif verb == b"EHLO" or verb == b"HELO":
                    write(b"250 tornado-sink.localhost\r\n")
                elif verb == b"QUIT":
                    await write(b"221 Bye\r\n")
                    stream.close()
                    return
                else:  # MAIL, RCPT, RSET, NOOP and anything else
                    write(b"250 OK\r\n")
        except StreamClosedError:
            pass


async def main(args: argparse.Namespace) -> None:
    server = SinkServer(args.max_message_size)
    server.listen(args.port, address=args.host, backlog=args.backlog)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"tornado_sink listening on {args.host}:{args.port}", flush=True)
    await stop.wait()
    server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument(
        "--max-message-size", type=int, default=200 * MIB, help="bytes (default 200 MiB)"
    )
    asyncio.run(main(parser.parse_args()))

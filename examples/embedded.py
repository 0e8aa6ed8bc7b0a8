"""Run Bonzo inside your own asyncio program, with an in-process plugin.

The configuration comes from a TOML string and a plugin object defined here
is added after the configured plugins. Run it, then send it mail:

    python examples/embedded.py
    swaks --server 127.0.0.1:2526 --to someone@example.com

Set BONZO_EXAMPLE_PORT to use another port. Stop it with Ctrl-C.
"""

import asyncio
import os
import signal

from bonzo import Accept
from bonzo.app import MailApp
from bonzo.config import parse_config

PORT = int(os.environ.get("BONZO_EXAMPLE_PORT", "2526"))

CONFIG = f"""
[[listeners]]
address = "127.0.0.1"
port = {PORT}

[plugins]
enabled = ["recipients"]

[plugins.recipients]
domains = ["example.com"]
"""


class PrintSubjects:
    """Takes every message by printing its subject.

    Returning Accept from bonzo_deliver tells the client "250: it is mine now".
    This program is done with a message once it is printed; a real store must
    make the message durable before accepting it (see the maildir plugin).
    """

    def __init__(self) -> None:
        self.count = 0

    def bonzo_deliver(self, envelope):
        self.count += 1
        print(
            f"message {self.count} from <{envelope.mail_from}>: {envelope.message['Subject']}",
            flush=True,
        )
        return Accept()


async def main() -> None:
    app = MailApp(parse_config(CONFIG), extra_plugins=[("print", PrintSubjects())])
    await app.start()
    print(f"listening on 127.0.0.1:{PORT}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()
    print("stopped", flush=True)


if __name__ == "__main__":
    asyncio.run(main())

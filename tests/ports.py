"""Free TCP ports for tests, one implementation for every test module.

Asking the kernel for port 0 and closing the socket leaves the port free but
not reserved: under load the kernel may hand the same port to the next call,
and a test that starts two listeners on "two" free ports then fails with a
duplicate listener. This process never hands out a port twice.
"""

from __future__ import annotations

import socket

_GIVEN: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` that nothing listens on now and that no earlier
    call in this process returned."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        with socket.socket(family) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if (host, port) not in _GIVEN:
            _GIVEN.add((host, port))
            return port
    raise RuntimeError(f"no port of {host} not handed out before, after 200 tries")

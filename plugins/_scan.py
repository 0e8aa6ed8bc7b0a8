"""What the scanner plugins (``clamav``, ``rspamd``, ``spamassassin``,
``policy``) share: where their daemon listens, time limits, what to do when
it fails, and recording a result on the transaction.

Private to ``bonzo_plugins``; third-party plugins should not import it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from bonzo.errors import SMTPError

from ._config import describe, get_str

__all__ = [
    "Endpoint",
    "add_header",
    "remove_header",
    "set_header",
    "ON_ERROR",
    "ScanError",
    "body_chunks",
    "close_stream",
    "get_endpoint",
    "get_seconds",
    "get_size",
    "get_on_error",
    "message_chunks",
    "open_stream",
    "record",
    "sanitize",
    "tempfail",
]

#: What a scanner plugin does when its daemon cannot answer: ``tempfail``
#: (fail closed: ``451 4.7.1``, the client keeps the message and retries)
#: or ``accept`` (let the message through unscanned, with an ``error``
#: result recorded).
ON_ERROR = ("tempfail", "accept")


class ScanError(Exception):
    """The daemon could not give an answer: unreachable, too slow, or an
    answer that is not one. The text is for the log, never for the client."""


@dataclass(frozen=True)
class Endpoint:
    """Where a daemon listens: a Unix socket ``path``, or ``host``:``port``."""

    host: str = "127.0.0.1"
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def get_seconds(table: Mapping[str, Any], key: str, default: float, high: float = 3600) -> float:
    """``table[key]`` as a positive number of seconds, at most ``high``."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: expected a number of seconds, got {describe(value)}")
    if not 0 < value <= high:
        raise ValueError(f"{key}: must be more than 0 and at most {high:g} seconds")
    return float(value)


_SIZE = re.compile(r"(\d+)\s*([KMG]?)(?:i?B)?", re.I)


def get_size(table: Mapping[str, Any], key: str, default: int) -> int:
    """``table[key]`` as a number of octets: an integer, or a string such as
    ``"25M"`` (K, M and G are powers of 1024, as in clamd's configuration)."""
    value = table.get(key, default)
    if isinstance(value, str):
        m = _SIZE.fullmatch(value.strip())
        if m is None:
            raise ValueError(f'{key}: expected a size such as 26214400 or "25M", got {value!r}')
        value = int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key}: expected a positive number of octets, got {describe(value)}")
    return value


def get_on_error(table: Mapping[str, Any]) -> bool:
    """``on_error``: True for ``"accept"`` (pass the message unscanned)."""
    value = get_str(table, "on_error", "tempfail")
    if value not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {', '.join(ON_ERROR)}, got {describe(value)}")
    return value == "accept"


def get_endpoint(table: Mapping[str, Any], default_port: int) -> Endpoint:
    """The daemon's address from ``socket`` (a Unix socket's path) or
    ``host`` and ``port`` (default ``127.0.0.1`` and ``default_port``)."""
    if "socket" in table:
        if "host" in table or "port" in table:
            raise ValueError("socket: give either socket or host and port, not both")
        return Endpoint(path=get_str(table, "socket", ""))
    host = get_str(table, "host", "127.0.0.1").strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = table.get("port", default_port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port: expected a TCP port number, got {describe(port)}")
    return Endpoint(host=host, port=port)


async def open_stream(
    endpoint: Endpoint, timeout: float, limit: int = 65536
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``endpoint`` within ``timeout`` seconds. ``limit`` bounds
    what one ``readline``/``readuntil`` may buffer. Raises :class:`ScanError`."""
    try:
        if endpoint.path is not None:
            connect = asyncio.open_unix_connection(endpoint.path, limit=limit)
        else:
            connect = asyncio.open_connection(endpoint.host, endpoint.port, limit=limit)
        return await asyncio.wait_for(connect, timeout)
    except asyncio.TimeoutError:
        raise ScanError(f"{endpoint}: no connection within {timeout:g}s") from None
    except OSError as exc:
        raise ScanError(f"{endpoint}: cannot connect: {exc.strerror or exc}") from None


async def close_stream(writer: asyncio.StreamWriter) -> None:
    """Close a connection without waiting on a peer that does not answer."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except Exception:  # noqa: S110 - closing: nothing more to do
        pass


def body_chunks(body: IO[bytes], chunk_size: int) -> Iterator[bytes]:
    """The rest of ``body`` in pieces of at most ``chunk_size`` octets.

    Reads from the envelope's spool (memory, or a local temporary file the
    kernel has in its cache), so a read does not hold up the event loop.
    """
    while True:
        chunk = body.read(chunk_size)
        if not chunk:
            return
        yield chunk


async def message_chunks(envelope: Any, chunk_size: int) -> AsyncIterator[bytes]:
    """The whole message (added headers, then the client's content) in
    pieces of at most ``chunk_size`` octets, never all in memory at once."""
    head = envelope.header_bytes
    for i in range(0, len(head), chunk_size):
        yield head[i : i + chunk_size]
    for chunk in body_chunks(envelope.open_body(), chunk_size):
        yield chunk
        await asyncio.sleep(0)


_UNSAFE = re.compile(r"[^A-Za-z0-9._:/+\-]")


def sanitize(text: str, limit: int = 100) -> str:
    """A name from a daemon (a virus signature, a symbol) made safe for a
    reply line, a header or a log: at most ``limit`` characters, anything but
    letters, digits and ``._:/+-`` replaced by ``?``."""
    return _UNSAFE.sub("?", text[:limit])


def record(envelope: Any, plugin: str, result: str, reason: str = "", **details: Any) -> None:
    """Record a result on the transaction (``envelope.results``)."""
    envelope.results.add(plugin, result, reason, **details)


def too_large(envelope: Any, plugin: str, max_size: int, log: Any) -> bool:
    """Whether the message is over ``max_size`` and so not sent to the
    daemon (a part of a message is no verdict on it): logged, and recorded
    as the result ``skip``."""
    size = len(envelope.header_bytes) + envelope.size
    if size <= max_size:
        return False
    log.info(
        "%s: message %s not checked: %d octets, more than max_size %d",
        plugin,
        envelope.id,
        size,
        max_size,
    )
    record(envelope, plugin, "skip", "too large", size=size)
    return True


def tempfail(what: str) -> SMTPError:
    """The fail-closed reply when a scanner cannot give its answer."""
    return SMTPError(
        451, f"Message could not be checked ({what}), try again later", enhanced_code="4.7.1"
    )


# Message changes, through the envelope's change API (recorded with the
# plugin's name, applied once before delivery).
def set_header(envelope: Any, name: str, value: str) -> None:
    """Give the first ``name`` header the value ``value`` (adding it when
    the message has none); other ``name`` headers are deleted."""
    count = envelope_header_count(envelope, name)
    envelope.change_header(name, value)
    for _ in range(count - 1):
        envelope.delete_header(name, 2)


def envelope_header_count(envelope: Any, name: str) -> int:
    """How many ``name`` headers the message has now."""
    wanted = name.lower()
    return sum(1 for n, _ in envelope.headers() if n.lower() == wanted)


def add_header(envelope: Any, name: str, value: str, index: int | None = None) -> None:
    """Add ``name: value`` in front of the message, or at position ``index``
    of the header section (0: the very top)."""
    if index is None:
        envelope.add_header(name, value)
    else:
        envelope.insert_header(index, name, value)


def remove_header(envelope: Any, name: str, occurrence: int = 0) -> int:
    """Delete the ``occurrence``-th ``name`` header (from 1; negative: from
    the last), or every one with 0. Returns how many were deleted."""
    if occurrence == 0:
        return int(envelope.remove_header(name))
    count = envelope_header_count(envelope, name)
    if occurrence < 0:
        occurrence = count + 1 + occurrence
    if not 1 <= occurrence <= count:
        return 0
    envelope.delete_header(name, occurrence)
    return 1

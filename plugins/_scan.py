"""What the scanner plugins (``clamav``, ``rspamd``, ``spamassassin``,
``policy``) share: where their daemon listens, time limits, what to do when
it fails, and recording a result on the transaction.

Private to ``bonzo_plugins``; third-party plugins should not import it.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from bonzo.errors import SMTPError
from bonzo.schema import Key, Schema

__all__ = [
    "Endpoint",
    "add_header",
    "remove_header",
    "set_header",
    "ON_ERROR",
    "ScanError",
    "body_chunks",
    "close_stream",
    "ENDPOINT_EXCLUSIVE",
    "endpoint_keys",
    "endpoint_of",
    "max_size_key",
    "on_error_key",
    "parse_blank_ok",
    "timeout_keys",
    "message_chunks",
    "open_socket",
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


def _more_than_zero(value: float) -> float:
    # ``not value > 0`` also refuses NaN.
    if not value > 0:
        raise ValueError(f"expected more than 0 seconds, got {value!r}")
    return value


def _host(value: str) -> str:
    """A host name or address, without spaces or the brackets of ``[::1]``."""
    host = value.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def endpoint_keys(default_port: int, *, socket: str, host: str, port: str) -> tuple[Key, ...]:
    """The ``socket``, ``host`` and ``port`` keys of a daemon's address,
    documented by ``socket``, ``host`` and ``port``; declare the schema with
    ``exclusive=ENDPOINT_EXCLUSIVE`` and read the address with
    :func:`endpoint_of`."""
    return (
        Key("socket", "str", doc=socket),
        Key("host", "str", default="127.0.0.1", convert=_host, doc=host),
        Key("port", "int", default=default_port, minimum=1, maximum=65535, doc=port),
    )


#: A Unix socket, or a host and port: not both.
ENDPOINT_EXCLUSIVE = (("socket", "host"), ("socket", "port"))


def endpoint_of(values: Mapping[str, Any]) -> Endpoint:
    """The address from the parsed keys of :func:`endpoint_keys`."""
    if values["socket"] is not None:
        return Endpoint(path=values["socket"])
    return Endpoint(host=values["host"], port=values["port"])


def timeout_keys(default: float, doc: str) -> tuple[Key, ...]:
    """``connect_timeout`` (5 seconds, at most 300) and ``timeout``
    (``default`` seconds, at most an hour, documented by ``doc``)."""
    return (
        Key("connect_timeout", "duration", default=5.0, maximum=300, convert=_more_than_zero,
            doc="How long to wait for the connection; more than 0, at most 300 seconds."),
        Key("timeout", "duration", default=default, maximum=3600, convert=_more_than_zero,
            doc=doc + " More than 0, at most 3600 seconds."),
    )  # fmt: skip


def max_size_key(default: int, doc: str) -> Key:
    """``max_size``: the largest message sent to the daemon, in octets."""
    return Key("max_size", "size", default=default, minimum=1, doc=doc)


def on_error_key(doc: str) -> Key:
    """``on_error``: one of :data:`ON_ERROR`, ``"tempfail"`` by default;
    ``values["on_error"] == "accept"`` lets mail through unscanned."""
    return Key("on_error", "choice", default="tempfail", choices=ON_ERROR, doc=doc)


def parse_blank_ok(
    schema: Schema, config: Mapping[str, Any] | None, app: Any, blank: tuple[str, ...]
) -> dict[str, Any]:
    """``schema.parse(config, app)``, but the string keys in ``blank`` may
    also be given as ``""`` (or spaces), which gives ``""``: for settings
    where an empty string means "none" (a ``str`` key must not be empty)."""
    if not isinstance(config, Mapping):
        return schema.parse(config, app)
    empty = [k for k in blank if isinstance(config.get(k), str) and not config[k].strip()]
    values = schema.parse({k: v for k, v in config.items() if k not in empty}, app)
    values.update(dict.fromkeys(empty, ""))
    return values


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


async def open_socket(endpoint: Endpoint, timeout: float) -> socket.socket:
    """A non-blocking socket connected to ``endpoint`` within ``timeout``
    seconds, for the event loop's ``sock_*`` calls: unlike a stream, a write
    that fails leaves what the peer sent before it closed there to read.
    Raises :class:`ScanError`."""
    loop = asyncio.get_running_loop()

    async def connect() -> socket.socket:
        if endpoint.path is not None:
            targets: list[tuple[int, Any]] = [(socket.AF_UNIX, endpoint.path)]
        else:
            infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
            targets = [(family, address) for family, _, _, _, address in infos]
        error: OSError = OSError(f"no address for {endpoint.host}")
        for family, address in targets:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                if family != socket.AF_UNIX:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, address)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error

    try:
        return await asyncio.wait_for(connect(), timeout)
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
    as the result ``skip``. Called before a scan, it first makes the end of
    the header section plain in the content
    (:meth:`~bonzo.session.Envelope.client_header_section`), so that the
    daemon scans the octets that will be delivered, split where every other
    reader splits them."""
    envelope.client_header_section()
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

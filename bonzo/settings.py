"""Protocol and connection settings, with the defaults Bonzo ships.

One :class:`SMTPSettings` object configures the protocol core, the connection
driver and the server. Every field is a documented, validated setting; the
TOML ``[limits]`` and ``[server]`` tables of the daemon map onto these names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any

from .proxy import IPNetwork, parse_networks

__all__ = [
    "SMTPSettings",
    "ListenerSettings",
    "SettingError",
    "BARE_NEWLINE_MODES",
    "PROTOCOLS",
    "finite_number",
    "path_too_long",
    "spelled",
    "host_port",
    "positive_seconds",
]

BARE_NEWLINE_MODES = ("normalize", "reject", "allow")

#: Extra octets a MAIL or RCPT line may carry for ESMTP parameters
#: (SIZE=, BODY=, SMTPUTF8, AUTH=, RET=, ENVID=, NOTIFY=, ORCPT=): RFC 1870
#: allows +26, RFC 6531 +10, RFC 4954 +500, RFC 3461 more; 512 covers them.
EXTENSION_ALLOWANCE = 512


class SettingError(ValueError):
    """An invalid setting; ``setting`` is its name."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting} {message}")
        self.setting = setting
        self.detail = message


@dataclass
class SMTPSettings:
    """Limits, timeouts and protocol behaviour of an SMTP server.

    All sizes are in octets and all times in seconds. Invalid values raise
    :class:`ValueError` naming the setting.
    """

    hostname: str = field(default_factory=socket.gethostname)
    """Name the server gives in the EHLO reply and the ``Received:`` header
    (default: the machine's host name, without any DNS lookup)."""

    banner: str | None = None
    """Text of the ``220`` greeting. ``None`` gives ``"<hostname> ESMTP"``
    (no version, so the software version is not disclosed)."""

    max_command_line: int = 512
    """Longest command line, CRLF included (RFC 5321 4.5.3.1.4); MAIL and RCPT
    lines may be 512 octets longer for ESMTP parameters. Longer lines get
    ``500 5.5.2`` and the session continues."""

    max_auth_line: int = 12288
    """Longest AUTH response line (RFC 4954); longer gets ``500 5.5.6``."""

    max_message_size: int = 33554432
    """Largest message accepted, advertised in ``SIZE``. A declared ``SIZE=``
    over it gets ``552 5.3.4`` at MAIL; a larger body is read to the end and
    answered ``552 5.3.4`` after the final dot. ``0`` means no limit; at
    most 2**63 - 1. Under 64K octets (what RFC 5321 4.5.3.1.7 has every
    server take) ``bonzo check`` warns."""

    max_data_line: int = 8192
    """Longest line inside a message, CRLF included (a dot added for
    transparency in DATA is not counted, RFC 5321 4.5.3.1.6); a message
    with a longer line is read to the end and refused with ``500 5.5.2``."""

    max_recipients: int = 1000
    """Recipients per message (never below 100, RFC 5321 4.5.3.1.8); more get
    ``452 4.5.3``. As many again are refused without counting towards
    ``max_errors`` (a pipelining client sends them all before it reads a
    reply, then the rest in a new transaction); past that, each counts."""

    max_messages_per_connection: int = 100
    """Messages accepted on one connection; a further MAIL gets ``452 4.5.3``."""

    max_unknown_commands: int = 10
    """Unknown commands per session before ``421 4.7.0`` and close."""

    max_errors: int = 20
    """Error replies (4xx/5xx to commands) per session before ``421 4.7.0`` and close."""

    max_junk_commands: int = 100
    """Commands that do no mail work (NOOP, RSET, VRFY, HELP, HELO/EHLO
    repeated without a new TLS session, a BDAT chunk of fewer than
    :data:`~bonzo.protocol.SMALL_CHUNK` octets that is not LAST, and a verb a
    plugin answers through ``bonzo_unknown_command`` with a ``2xx``/``3xx``)
    allowed between two accepted messages;
    one more gets ``421 4.7.0`` and close (Postfix's
    ``smtpd_junk_command_limit``). Without it a client could hold a
    connection slot forever with NOOPs."""

    max_connections: int = 1000
    """Concurrent connections per server; one more gets ``421 4.7.0`` and is
    closed. On an implicit-TLS listener that reply comes after the TLS
    handshake: past 32 refused clients waiting for theirs, the next are
    closed at once, without one."""

    max_connections_per_ip: int = 50
    """Concurrent connections from one client address; more get ``421 4.7.0``.
    An IPv6 client counts by its network of :attr:`ipv6_prefix_length` bits.
    The clients of a Unix socket (local processes, with no address) are not
    counted: :attr:`max_connections` holds them.

    .. versionchanged:: 0.2
       Unix-socket clients no longer count as one address (``0.0.0.0``)."""

    ipv6_prefix_length: int = 64
    """How many leading bits of an IPv6 address make one client, for the
    per-client count of :attr:`max_connections_per_ip` (an IPv4 address, or
    an IPv4-mapped IPv6 one, is one client by itself). One host or home
    network is given a whole ``/64`` (RFC 6177; a subnet is never smaller,
    RFC 7421), so a client holding one could open unlimited connections,
    each from a fresh address, were each ``/128`` counted alone. 64
    counts one such network as one client; Postfix's
    ``smtpd_client_ipv6_prefix_length`` defaults to 84, which leaves such a
    client 2^20 groups, each allowed the whole limit. Between 1 and 128; 128
    counts each address apart.

    .. versionadded:: 0.2"""

    idle_timeout: float = 300.0
    """Time to wait for the next command (RFC 5321 4.5.3.2.7); then ``421 4.4.2``."""

    command_timeout: float = 300.0
    """Time a single command line may take to arrive, however it trickles in;
    then ``421 4.4.2``."""

    data_timeout: float = 180.0
    """Time without any byte during DATA (RFC 5321 4.5.3.2.6); then ``421 4.4.2``."""

    min_data_rate: int = 500
    """Minimum DATA rate in octets per second, measured over each
    :attr:`data_rate_window`; a slower client gets ``421 4.4.2``. ``0`` disables."""

    data_rate_window: float = 30.0
    """Length of the window over which :attr:`min_data_rate` is measured."""

    handler_timeout: float = 60.0
    """Time a request callback of the original API may take to call
    ``finish()``; then ``451 4.3.0``. Plugins have their own timeout (the
    ``[plugins]`` table's ``timeout``)."""

    max_session_time: float = 0.0
    """Longest a session may last, in seconds, whatever it does; then
    ``421 4.4.2`` and close at the next point where the server waits for the
    client. ``0`` (the default) means no limit: the junk-command, error and
    message limits with the timeouts already bound a session; set it (an
    hour, say) on a server exposed to abusive clients.

    .. versionadded:: 0.2"""

    shutdown_grace: float = 30.0
    """On shutdown, time messages in flight get to finish before connections
    close; then the ``queue`` plugin's deliveries in flight get as long."""

    spool_threshold: int = 262144
    """Message bodies larger than this are spooled to a temporary file rather
    than kept in memory. Each piece of content held counts 64 octets more
    than its size (its object's cost), so a message sent in tiny ``BDAT``
    chunks goes to the file as soon, in memory, as one sent whole."""

    spool_dir: str | None = None
    """Directory for spooled bodies (default: the system temporary directory).
    In a configuration file it must be an existing directory Bonzo can write
    in (``bonzo check`` says so otherwise); relative to the file."""

    bare_newline: str = "normalize"
    """What to do with a bare LF or CR in message content: ``normalize`` (treat
    it as a line end and store CRLF), ``reject`` (``550 5.5.2`` after the data)
    or ``allow`` (store verbatim). In no mode does a bare LF or CR end DATA."""

    smtputf8: bool = True
    """Offer SMTPUTF8 (RFC 6531): UTF-8 addresses with the ``SMTPUTF8`` parameter."""

    chunking: bool = True
    """Offer CHUNKING (RFC 3030): a client may send the message in ``BDAT``
    chunks of announced size instead of with ``DATA`` (see
    :doc:`/chunking`). ``false`` refuses ``BDAT`` with ``502 5.5.1`` (its
    octets are still read and dropped, never run as commands).

    .. versionadded:: 0.2"""

    binarymime: bool = True
    """Offer BINARYMIME (RFC 3030) with CHUNKING: ``MAIL ... BODY=BINARYMIME``
    announces binary content, which must come by ``BDAT`` and is kept octet
    for octet (no line-end or line-length rules). Turn it off when the mail
    is relayed to servers that may not take binary content. Has no effect
    without :attr:`chunking`.

    .. versionadded:: 0.2"""

    dsn: bool = True
    """Offer DSN (RFC 3461): the ``RET``/``ENVID`` parameters of MAIL and
    ``NOTIFY``/``ORCPT`` of RCPT are checked and kept on the envelope for
    the delivery side (see :doc:`/dsn`). ``false`` refuses them with
    ``555 5.5.4``. A server (:class:`~bonzo.app.MailApp`) offers DSN only
    when an enabled plugin honours it (sends the reports, as ``queue``
    does): with none, it is not offered whatever this says, and ``bonzo
    check`` says so.

    .. versionadded:: 0.2"""

    advertise_limits: bool = True
    """Advertise ``LIMITS RCPTMAX=<max_recipients>
    MAILMAX=<max_messages_per_connection>`` (RFC 9422), so that a client
    can split its recipients and messages before it meets the limits.

    .. versionadded:: 0.2"""

    tls_handshake_timeout: float = 30.0
    """Time the TLS handshake (STARTTLS or implicit TLS) may take."""

    proxy_timeout: float = 10.0
    """On a listener with :attr:`ListenerSettings.proxy_protocol`, time the
    proxy has to send the whole PROXY header after connecting (the role of
    Postfix's ``smtpd_upstream_proxy_timeout``); then the connection is
    closed without a greeting.

    .. versionadded:: 0.2"""

    max_auth_failures: int = 3
    """Failed AUTH attempts per session; the last one is followed by
    ``421 4.7.0`` and close."""

    auth_failure_delay: float = 1.0
    """Seconds to wait before answering a failed AUTH, to slow password guessing."""

    read_chunk_size: int = 65536
    """Octets read from the socket at a time (at most 16 MiB)."""

    max_write_backlog: int = 262144
    """Replies buffered for a client that does not read, before the server
    stops reading its commands until the backlog drains."""

    def __post_init__(self) -> None:
        positive_ints = (
            "max_command_line",
            "max_auth_line",
            "max_data_line",
            "max_recipients",
            "max_messages_per_connection",
            "max_unknown_commands",
            "max_errors",
            "max_junk_commands",
            "max_connections",
            "max_connections_per_ip",
            "spool_threshold",
            "read_chunk_size",
            "max_write_backlog",
            "max_auth_failures",
        )
        for name in positive_ints:
            _check_int(name, getattr(self, name), minimum=1)
        if self.read_chunk_size > MAX_READ_CHUNK:
            # Each read allocates a buffer of this size.
            raise SettingError(
                "read_chunk_size", f"is capped at {MAX_READ_CHUNK}, not {self.read_chunk_size}"
            )
        _check_int("ipv6_prefix_length", self.ipv6_prefix_length, minimum=1)
        if self.ipv6_prefix_length > 128:
            raise SettingError(
                "ipv6_prefix_length", f"must be at most 128 (bits), not {self.ipv6_prefix_length}"
            )
        _check_int("max_message_size", self.max_message_size, minimum=0)
        if self.max_message_size > MAX_MESSAGE_SIZE:
            # Advertised in SIZE, at most 20 digits (RFC 1870); TOML's own
            # integers end here.
            raise SettingError(
                "max_message_size",
                f"must be at most {MAX_MESSAGE_SIZE} (2**63 - 1), not {self.max_message_size}",
            )
        _check_int("min_data_rate", self.min_data_rate, minimum=0)
        for name in (
            "idle_timeout",
            "command_timeout",
            "data_timeout",
            "data_rate_window",
            "handler_timeout",
            "shutdown_grace",
            "tls_handshake_timeout",
            "proxy_timeout",
        ):
            value = getattr(self, name)
            if not finite_number(value) or value <= 0:
                raise SettingError(
                    name, f"must be a positive number of seconds, not {spelled(value)}"
                )
        if self.max_command_line < 512:
            raise SettingError(
                "max_command_line", f"must be at least 512 (RFC 5321), not {self.max_command_line}"
            )
        if self.max_command_line > 2048:
            raise SettingError(
                "max_command_line", f"is capped at 2048, not {self.max_command_line}"
            )
        if self.max_recipients < 100:
            raise SettingError(
                "max_recipients", f"must be at least 100 (RFC 5321), not {self.max_recipients}"
            )
        if self.max_data_line < 1000:
            raise SettingError(
                "max_data_line", f"must be at least 1000 (RFC 5321), not {self.max_data_line}"
            )
        lifetime = self.max_session_time
        if not finite_number(lifetime) or lifetime < 0:
            raise SettingError(
                "max_session_time", f"must be a number of seconds >= 0, not {spelled(lifetime)}"
            )
        delay = self.auth_failure_delay
        if not finite_number(delay) or delay < 0:
            raise SettingError("auth_failure_delay", f"must be a number >= 0, not {spelled(delay)}")
        for name in ("smtputf8", "chunking", "binarymime", "dsn", "advertise_limits"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise SettingError(name, f"must be true or false, not {spelled(value)}")
        if self.spool_dir is not None and not isinstance(self.spool_dir, str):
            raise SettingError(
                "spool_dir", f"must be a directory path, not {spelled(self.spool_dir)}"
            )
        if self.bare_newline not in BARE_NEWLINE_MODES:
            raise SettingError(
                "bare_newline",
                f"must be one of {', '.join(BARE_NEWLINE_MODES)}, not {spelled(self.bare_newline)}",
            )
        if not isinstance(self.hostname, str) or not _printable(self.hostname) or not self.hostname:
            raise SettingError(
                "hostname", f"must be printable ASCII without spaces: {spelled(self.hostname)}"
            )
        if self.banner is not None and (
            not isinstance(self.banner, str) or not _printable(self.banner.replace(" ", ""))
        ):
            raise SettingError("banner", f"must be printable ASCII: {spelled(self.banner)}")

    @property
    def greeting(self) -> str:
        """The text after ``220`` in the greeting."""
        return self.banner if self.banner is not None else f"{self.hostname} ESMTP"

    def replace(self, **changes: Any) -> SMTPSettings:
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every setting, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]


def finite_number(value: object) -> bool:
    """True for an int or float (not a bool) that is finite and that
    ``float()`` can take: NaN and infinity would silently disable a timeout
    or a limit, and TOML integers have no size limit (``10**400`` makes
    ``float()`` and :func:`math.isfinite` raise ``OverflowError``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int):
        return -sys.float_info.max <= value <= sys.float_info.max
    return math.isfinite(value)


#: The largest ``read_chunk_size``: 16 MiB.
MAX_READ_CHUNK = 16 * 1024 * 1024

#: A file name (one component of a path) and a whole path may be this long,
#: in octets (Linux's NAME_MAX; PATH_MAX less the final NUL): checked when a
#: configuration is loaded rather than failing when the file is opened.
NAME_MAX = 255
PATH_MAX = 4095


def path_too_long(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is too long to use, or ``None``."""
    raw = os.fsencode(path)
    if len(raw) > PATH_MAX:
        return f"{len(raw)} octets: longer than a path may be ({PATH_MAX})"
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        return f"a name of {len(longest)} octets in it: longer than a file name may be ({NAME_MAX})"
    return None


def host_port(host: str, port: int | str) -> str:
    """``host:port`` as logs, messages and URLs write it: an IPv6 address in
    brackets (``[::1]:2525``, RFC 3986), where its colons would run into the
    port's."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def spelled(value: Any) -> str:
    """``value`` as a TOML file spells it, for an error message (``true``,
    not Python's ``True``; strings in double quotes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(spelled(v) for v in value) + "]"
    if isinstance(value, int) and len(str(abs(value))) > 30:
        return f"a number of {len(str(abs(value)))} digits"
    return repr(value)


def positive_seconds(value: Any) -> bool:
    """True for a positive, finite number of seconds."""
    return finite_number(value) and value > 0


#: The largest ``max_message_size``: TOML's largest integer, 19 digits in
#: ``SIZE`` (RFC 1870 allows 20).
MAX_MESSAGE_SIZE = 2**63 - 1


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingError(name, f"must be an integer >= {minimum}, not {spelled(value)}")


def _printable(text: str) -> bool:
    return text.isascii() and text.isprintable() and " " not in text


#: The protocols a listener may speak.
PROTOCOLS = ("smtp", "lmtp")


@dataclass
class ListenerSettings:
    """What differs from one listening socket to another: TLS and AUTH policy.

    The ``[[listeners]]`` tables of the daemon map onto these fields.
    """

    tls_context: ssl.SSLContext | None = None
    """Server TLS context (see :func:`bonzo.tls.make_server_context`); with
    it, STARTTLS is offered, or, with :attr:`implicit_tls`, every connection
    starts with a TLS handshake."""

    implicit_tls: bool = False
    """TLS from the first byte (the port 465 "submissions" style, RFC 8314)."""

    require_tls: bool = False
    """Refuse MAIL with ``530 5.7.0`` until the session is encrypted."""

    require_auth: bool = False
    """Refuse MAIL with ``530 5.7.0`` until the client has authenticated (a
    submission listener)."""

    auth_plaintext: bool = False
    """Offer AUTH on a connection that is not encrypted (passwords in clear
    text: only for testing or a trusted network)."""

    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    """SASL mechanisms offered when a plugin checks credentials in
    ``bonzo_auth``."""

    proxy_protocol: bool = False
    """Every connection starts with a PROXY protocol header (version 1 or
    2, HAProxy's) from a proxy in :attr:`proxy_trusted`, naming the real
    client; that client's address is then the session's (see
    :doc:`/proxy`). Needs :attr:`proxy_trusted`.

    .. versionadded:: 0.2"""

    proxy_trusted: tuple[IPNetwork, ...] = ()
    """The networks the proxies connect from (CIDR strings or
    :mod:`ipaddress` networks; a bare address is one host). A connection
    from anywhere else is closed without a greeting. Not on a
    :attr:`unix_socket` listener.

    .. versionadded:: 0.2"""

    unix_socket: bool = False
    """The listener is a Unix socket (a ``path`` listener). Its peers have no
    address: who may connect — and, with :attr:`proxy_protocol`, name the
    client in a PROXY header — is decided by the socket file's permissions
    and ownership, so :attr:`proxy_trusted` is neither needed nor allowed.

    .. versionadded:: 0.2"""

    xclient_trusted: tuple[IPNetwork, ...] = ()
    """The networks of the front-ends (mail filters, proxies) allowed to
    use ``XCLIENT`` to say who their client is (see :doc:`/proxy`). Empty:
    nobody (``XCLIENT`` gets ``550 5.7.0``). A front-end's own connections
    do not count for ``max_connections_per_ip``. On a :attr:`unix_socket`
    listener only with :attr:`proxy_protocol`.

    .. versionadded:: 0.2"""

    protocol: str = "smtp"
    """``"smtp"``, or ``"lmtp"`` for LMTP (RFC 2033; :mod:`bonzo.lmtp`)."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise SettingError(
                "protocol", f"must be one of {', '.join(PROTOCOLS)}, not {spelled(self.protocol)}"
            )
        for name in ("proxy_trusted", "xclient_trusted"):
            try:
                setattr(self, name, parse_networks(getattr(self, name)))
            except ValueError as exc:
                raise SettingError(name, str(exc)) from None
        if not isinstance(self.proxy_protocol, bool):
            raise SettingError(
                "proxy_protocol", f"must be true or false, not {spelled(self.proxy_protocol)}"
            )
        if self.unix_socket and self.proxy_trusted:
            raise SettingError(
                "proxy_trusted",
                "a Unix socket listener (path) has no peer address to check against it: who "
                "may connect, and so send a PROXY header, is decided by the socket file's "
                "permissions (the listener's mode) and ownership; remove proxy_trusted",
            )
        if self.proxy_protocol and not self.proxy_trusted and not self.unix_socket:
            raise SettingError(
                "proxy_trusted", "must list the networks of the proxies (proxy_protocol is on)"
            )
        if self.proxy_trusted and not self.proxy_protocol:
            raise SettingError("proxy_trusted", "is set but proxy_protocol is not on")
        if self.unix_socket and self.xclient_trusted and not self.proxy_protocol:
            raise SettingError(
                "xclient_trusted",
                "a Unix socket listener (path) has no peer address to check against it, so "
                "no front-end could ever use XCLIENT; it applies there only with "
                "proxy_protocol (to the client a PROXY header names)",
            )
        if self.implicit_tls and self.tls_context is None:
            raise SettingError("implicit_tls", "needs a TLS certificate: set the listener's tls")
        if self.require_tls and self.tls_context is None:
            raise SettingError("require_tls", "needs a TLS certificate: set the listener's tls")
        from .auth import MECHANISMS

        for mech in self.auth_mechanisms:
            if mech not in MECHANISMS:
                raise SettingError(
                    "auth_mechanisms",
                    f"unknown mechanism {mech!r} (known: {', '.join(MECHANISMS)})",
                )

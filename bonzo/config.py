"""The ``bonzo.toml`` configuration: read, validated, and turned into objects.

Every problem is a :class:`ConfigError` whose message names the file and the
dotted key (``bonzo.toml: limits.max_recipients: must be at least 100``), and
is found before anything listens. ``bonzo.toml.example`` at the root of the
source tree documents every key; the same file is embedded as the default
configuration (``bonzo serve`` with no ``-c``).

Secrets need not be written in the file: anywhere in the configuration, a
table ``{ "$env" = "NAME" }`` is replaced by the environment variable
``NAME`` and ``{ "$file" = "/path" }`` by the contents of that file (without
its final newline). Relative paths, here and in every path setting, are
taken from the configuration file's directory.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .auth import MECHANISMS
from .dns import DNSSettings, parse_nameserver
from .settings import (
    PROTOCOLS,
    ListenerSettings,
    SettingError,
    SMTPSettings,
    host_port,
    path_too_long,
    positive_seconds,
    spelled,
)
from .store import StoreSettings, safe_url
from .tls import CertificatePair, TLSError, make_server_context

if sys.version_info >= (3, 11):  # pragma: no cover - depends on the interpreter
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Config",
    "ConfigError",
    "ListenerConfig",
    "LoggingConfig",
    "PluginsConfig",
    "load_config",
    "parse_config",
    "default_config_text",
    "SETTING_SECTIONS",
    "TOP_LEVEL_KEYS",
    "LISTENER_KEYS",
    "LISTENER_OVERRIDES",
    "TLS_KEYS",
    "DNS_KEYS",
    "REDIS_KEYS",
    "METRICS_KEYS",
    "MetricsConfig",
]

#: Which table of the file holds each :class:`~bonzo.settings.SMTPSettings` field.
SETTING_SECTIONS: dict[str, str] = {
    "hostname": "server",
    "banner": "server",
    "shutdown_grace": "server",
    "spool_threshold": "server",
    "spool_dir": "server",
    "bare_newline": "protocol",
    "smtputf8": "protocol",
    "chunking": "protocol",
    "binarymime": "protocol",
    "dsn": "protocol",
    "advertise_limits": "protocol",
    "max_command_line": "limits",
    "max_auth_line": "limits",
    "max_message_size": "limits",
    "max_data_line": "limits",
    "max_recipients": "limits",
    "max_messages_per_connection": "limits",
    "max_unknown_commands": "limits",
    "max_errors": "limits",
    "max_junk_commands": "limits",
    "max_session_time": "limits",
    "max_connections": "limits",
    "max_connections_per_ip": "limits",
    "ipv6_prefix_length": "limits",
    "idle_timeout": "limits",
    "command_timeout": "limits",
    "data_timeout": "limits",
    "min_data_rate": "limits",
    "data_rate_window": "limits",
    "handler_timeout": "limits",
    "tls_handshake_timeout": "limits",
    "proxy_timeout": "limits",
    "max_auth_failures": "limits",
    "auth_failure_delay": "limits",
    "read_chunk_size": "limits",
    "max_write_backlog": "limits",
}

#: Keys of each table that are not SMTPSettings fields.
EXTRA_KEYS: dict[str, tuple[str, ...]] = {
    "server": ("workers", "loop", "pid_file"),
    "protocol": (),
    "limits": (),
}
LISTENER_KEYS = (
    "address",
    "port",
    "path",
    "mode",
    "protocol",
    "tls",
    "implicit_tls",
    "require_tls",
    "require_auth",
    "auth_plaintext",
    "auth_mechanisms",
    "proxy_protocol",
    "proxy_trusted",
    "xclient_trusted",
)
#: The ``[protocol]`` and ``[limits]`` keys a ``[[listeners]]`` table may
#: override for its own connections.
LISTENER_OVERRIDES = tuple(k for k, s in SETTING_SECTIONS.items() if s in ("protocol", "limits"))
#: A name an ``sni`` entry may have: a host name (ASCII, as clients send
#: it), or ``*.`` and one.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"  # "_": clients send it
_SNI_NAME = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?")


def _sni_problem(name: str) -> str | None:
    """Why clients never ask for ``name`` in SNI, or None."""
    if not _SNI_NAME.fullmatch(name):
        return (
            "letters, digits, hyphens, underscores and dots, or *. then those; an "
            "internationalized name in its xn-- form"
        )
    bare = name.rstrip(".")
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:
        return "an IP address, which clients never send as a name (RFC 6066 3)"
    if len(bare.removeprefix("*.")) > 253:
        return "longer than a name may be (253 octets)"
    return None


#: Keys of a listener's ``tls`` table, and of each of its ``sni`` entries.
TLS_KEYS = ("cert", "key", "sni")
SNI_KEYS = ("cert", "key")
LOGGING_KEYS = ("level", "access_log", "file", "format")
PLUGINS_KEYS = ("enabled", "timeout", "timeouts", "paths")
#: Keys of the ``[dns]`` table: the fields of :class:`~bonzo.dns.DNSSettings`.
DNS_KEYS = tuple(DNSSettings.field_names())
#: Keys of the ``[redis]`` table: the fields of :class:`~bonzo.store.StoreSettings`.
REDIS_KEYS = tuple(StoreSettings.field_names())
#: Keys of the ``[metrics]`` table.
METRICS_KEYS = ("address", "port", "path", "max_connections")
#: The tables allowed at the top level of the file.
TOP_LEVEL_KEYS = (
    "server",
    "protocol",
    "limits",
    "listeners",
    "logging",
    "dns",
    "redis",
    "metrics",
    "plugins",
)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(Exception):
    """A configuration problem; ``str()`` is the one-line message for the operator.

    :arg source: the file name (or ``"<default>"``).
    :arg key: the dotted key, e.g. ``"limits.max_recipients"``.

    A plugin's ``bonzo_configure`` raises it as
    ``ConfigError(key="threshold", message="must be positive")`` (the key
    within its own table; Bonzo adds the file and ``plugins.<name>.``) or
    ``ConfigError("threshold: must be positive")`` (the message alone).
    """

    def __init__(self, source: str = "", key: str = "", message: str = "") -> None:
        if not key and not message:
            source, message = "", source  # ConfigError("the message")
        self.source = source
        self.key = key
        self.message = message
        where = "".join(f"{part}: " for part in (source, key) if part)
        # One line for the operator, whatever a key or value in the file holds.
        super().__init__("".join(c if c.isprintable() else ascii(c)[1:-1] for c in where + message))


@dataclass
class ListenerConfig:
    """One ``[[listeners]]`` entry: where to accept connections, and its TLS
    and AUTH policy (:attr:`settings`)."""

    address: str = "127.0.0.1"
    port: int = 2525
    settings: ListenerSettings = field(default_factory=ListenerSettings)
    #: A Unix socket's path (then :attr:`address` and :attr:`port` are unused).
    path: str | None = None
    #: The Unix socket's permission bits.
    mode: int = 0o660
    #: The ``[protocol]``/``[limits]`` keys this listener overrides.
    overrides: dict[str, Any] = field(default_factory=dict)
    #: The settings of this listener's sessions, the server's with
    #: :attr:`overrides` applied; ``None`` when it overrides nothing.
    smtp_settings: SMTPSettings | None = None
    #: The certificate files of its ``tls`` table, by configuration key
    #: (``listeners[0].tls``, ``listeners[0].tls.sni."mx.example"``): for the
    #: expiry warnings, which are found when they are asked for.
    tls_files: dict[str, CertificatePair] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """Where it listens, for messages: ``address:port`` (``[::1]:25``) or
        ``unix:path``."""
        if self.path is not None:
            return f"unix:{self.path}"
        return host_port(self.address or "*", self.port)


@dataclass
class LoggingConfig:
    """The ``[logging]`` table."""

    level: str = "info"
    access_log: bool = True
    file: str | None = None
    format: str = "text"


@dataclass
class MetricsConfig:
    """The ``[metrics]`` table: the Prometheus and health listener
    (:mod:`bonzo.metrics`); off while :attr:`port` is ``None``."""

    address: str = "127.0.0.1"
    port: int | None = None
    path: str = "/metrics"
    #: HTTP connections the listener keeps open at most (in worker 0, which
    #: serves SMTP too): one more closes the oldest.
    max_connections: int = 16

    @property
    def enabled(self) -> bool:
        """True when metrics are on (a port is set)."""
        return self.port is not None


@dataclass
class PluginsConfig:
    """The ``[plugins]`` table: which plugins run, in which order, with which settings."""

    enabled: list[str] = field(default_factory=list)
    timeout: float = 60.0
    timeouts: dict[str, float] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Config:
    """A validated configuration."""

    source: str
    base_dir: Path
    settings: SMTPSettings
    listeners: list[ListenerConfig]
    workers: int = 1
    #: The event loop: ``"asyncio"`` (the standard library's) or ``"uvloop"``.
    loop: str = "asyncio"
    #: Where ``bonzo serve`` writes its process id (``None``: nowhere).
    pid_file: str | None = None
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    #: The ``[dns]`` table (default: DNS off).
    dns: DNSSettings = field(default_factory=DNSSettings)
    #: The ``[redis]`` table (default: state in each process).
    redis: StoreSettings = field(default_factory=StoreSettings)
    #: The ``[metrics]`` table (default: metrics off).
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def error(self, key: str, message: str) -> ConfigError:
        """A :class:`ConfigError` for ``key`` of this configuration."""
        return ConfigError(self.source, key, message)


def default_config_text() -> str:
    """The embedded default configuration (identical to ``bonzo.toml.example``)."""
    return resources.files("bonzo").joinpath("default.toml").read_text("utf-8")


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a configuration file; ``None`` gives the embedded default
    (with paths relative to the current directory)."""
    if path is None:
        return parse_config(default_config_text(), source="<default>", base_dir=Path.cwd())
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), "", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), "", f"cannot read: {exc}") from None
    return parse_config(text, source=str(p), base_dir=p.resolve().parent)


def parse_config(text: str, source: str = "<string>", base_dir: Path | None = None) -> Config:
    """Parse and validate configuration text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"invalid TOML: {exc}") from None
    base_dir = base_dir or Path.cwd()
    data = _resolve_secrets(data, source, "", base_dir)
    return _build(data, source, base_dir)


def _resolve_secrets(value: Any, source: str, key: str, base_dir: Path) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and ("$env" in value or "$file" in value):
            kind, ref = next(iter(value.items()))
            if not isinstance(ref, str) or not ref:
                raise ConfigError(source, key, f"{kind} needs a non-empty string")
            if kind == "$env":
                if ref not in os.environ:
                    raise ConfigError(source, key, f"environment variable {ref!r} is not set")
                return os.environ[ref]
            path = _path(ref, source, key, base_dir)
            try:
                return Path(path).read_text("utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(source, key, f"cannot read secret file {ref!r}: {exc}") from None
        return {
            k: _resolve_secrets(v, source, f"{key}.{k}" if key else k, base_dir)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_resolve_secrets(v, source, f"{key}[{i}]", base_dir) for i, v in enumerate(value)]
    return value


def _path(value: Any, source: str, key: str, base_dir: Path) -> str:
    """``value`` as an absolute path, relative ones taken from ``base_dir``
    (the configuration file's directory)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(source, key, f"must be a non-empty path string, not {spelled(value)}")
    if "\0" in value:
        raise ConfigError(source, key, f"must not contain a NUL character: {value!r}")
    path = str((base_dir / value).resolve())
    too_long = path_too_long(path)
    if too_long:
        raise ConfigError(source, key, f"{path[:80]}...: {too_long}")
    return path


#: The longest path a Unix socket may have, in octets (``sun_path``, 108 on
#: Linux, less the final NUL).
SOCKET_PATH_MAX = 107


def _file_to_make(
    value: Any, source: str, key: str, base_dir: Path, *, socket: bool = False
) -> str:
    """:func:`_path` for a file Bonzo creates when it starts (a pid file, a
    Unix socket): its directory must exist, and what is there already must
    be a file Bonzo may replace (a socket for a ``socket``), so that ``bonzo
    check`` finds the mistake rather than ``bonzo serve``."""
    path = _path(value, source, key, base_dir)
    if socket and len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise ConfigError(
            source,
            key,
            f"{path}: {len(os.fsencode(path))} octets, longer than a Unix socket's path may be "
            f"({SOCKET_PATH_MAX}): choose a shorter one",
        )
    parent = Path(path).parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise ConfigError(source, key, f"cannot create {path}: {parent} {why}")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ConfigError(source, key, f"cannot use {path}: {exc.strerror}") from None
    if mode is not None and socket and not stat.S_ISSOCK(mode):
        raise ConfigError(source, key, f"{path} exists and is not a socket (remove it first)")
    if mode is not None and not socket and not stat.S_ISREG(mode):
        raise ConfigError(source, key, f"{path} exists and is not a regular file")
    # Checked as the user running the check, who is the one to run the
    # daemon: a file the daemon cannot make is a mistake in the file, not a
    # fault worth restarting for (exit status 2, not 1).
    if mode is None or socket:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(source, key, f"cannot create {path}: {parent} is not writable")
    elif not os.access(path, os.W_OK):
        raise ConfigError(source, key, f"cannot write {path}: permission denied")
    return path


def _directory(value: Any, source: str, key: str, base_dir: Path) -> str:
    """:func:`_path` for a directory Bonzo writes in but does not create."""
    path = _path(value, source, key, base_dir)
    if not os.path.isdir(path):
        why = "is not a directory" if os.path.exists(path) else "does not exist"
        raise ConfigError(source, key, f"{path} {why}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(source, key, f"{path} is not writable")
    return path


def _table(data: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(source, name, f"must be a table, not {_type(value)}")
    return value


def _type(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _build(data: dict[str, Any], source: str, base_dir: Path) -> Config:
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                source, key, f"unknown table (expected one of {', '.join(TOP_LEVEL_KEYS)})"
            )
    kwargs: dict[str, Any] = {}
    workers = 1
    loop = "asyncio"
    pid_file = None
    for section in ("server", "protocol", "limits"):
        table = _table(data, section, source)
        allowed = [k for k, s in SETTING_SECTIONS.items() if s == section]
        allowed += EXTRA_KEYS[section]
        for key, value in table.items():
            if key not in allowed:
                raise ConfigError(
                    source,
                    f"{section}.{key}",
                    f"unknown key (allowed in [{section}]: {', '.join(sorted(allowed))})",
                )
            if key == "workers":
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
                    raise ConfigError(
                        source, "server.workers", f"must be an integer 1..256, not {spelled(value)}"
                    )
                workers = value
            elif key == "loop":
                loop = _event_loop(value, source)
            elif key == "pid_file":
                pid_file = _file_to_make(value, source, "server.pid_file", base_dir)
            elif key == "spool_dir":
                kwargs[key] = _directory(value, source, "server.spool_dir", base_dir)
            else:
                kwargs[key] = value
    try:
        settings = SMTPSettings(**kwargs)
    except SettingError as exc:
        key = f"{SETTING_SECTIONS.get(exc.setting, 'server')}.{exc.setting}"
        raise ConfigError(source, key, exc.detail) from None
    except TypeError as exc:  # pragma: no cover - keys are checked above
        raise ConfigError(source, "", str(exc)) from None
    listeners = _listeners(data.get("listeners"), source, base_dir)
    metrics = _metrics(_table(data, "metrics", source), source)
    check_metrics_port(metrics, listeners, source)
    for i, listener in enumerate(listeners):
        if listener.overrides:
            key = f"listeners[{i}]"
            listener.smtp_settings = _overridden(settings, listener.overrides, source, key)
    logging_config = _logging(_table(data, "logging", source), source, base_dir)
    _one_use_per_file(
        source,
        [("server.pid_file", pid_file), ("logging.file", logging_config.file)]
        + [(f"listeners[{i}].path", lc.path) for i, lc in enumerate(listeners)],
    )
    return Config(
        source=source,
        base_dir=base_dir,
        settings=settings,
        listeners=listeners,
        workers=workers,
        loop=loop,
        pid_file=pid_file,
        logging=logging_config,
        plugins=_plugins(_table(data, "plugins", source), source, base_dir),
        dns=_dns(_table(data, "dns", source), source, base_dir),
        redis=_redis(_table(data, "redis", source), source),
        metrics=metrics,
    )


def _one_use_per_file(source: str, files: list[tuple[str, str | None]]) -> None:
    """Refuse two of the files Bonzo writes at start (the pid file, the log
    file, the Unix sockets) at one path: the second would replace, truncate
    or refuse the first."""
    seen: dict[str, str] = {}
    for key, path in files:
        if path is None:
            continue
        if path in seen:
            raise ConfigError(source, key, f"{path} is also {seen[path]}: each needs its own file")
        seen[path] = key


#: The event loops ``[server] loop`` may name.
EVENT_LOOPS = ("asyncio", "uvloop")


def _event_loop(value: Any, source: str) -> str:
    if value not in EVENT_LOOPS:
        raise ConfigError(
            source, "server.loop", f"must be one of {', '.join(EVENT_LOOPS)}, not {spelled(value)}"
        )
    if value == "uvloop":
        _check_uvloop(source)
    return str(value)


#: The oldest uvloop Bonzo runs on (the ``uvloop`` extra's bound; 0.17,
#: Debian 12's, has no ``uvloop.run``).
UVLOOP_MIN = (0, 19)


def _check_uvloop(source: str) -> None:
    """Import uvloop as the daemon will, so that a missing, broken or too old
    one is a configuration error (``bonzo check``, status 2) rather than a
    traceback in each worker once the ports are bound."""
    if importlib.util.find_spec("uvloop") is None:
        raise ConfigError(
            source, "server.loop", "uvloop is not installed (pip install 'bonzo[uvloop]')"
        )
    try:
        import uvloop
    except Exception as exc:  # e.g. built for another Python
        raise ConfigError(
            source, "server.loop", f"uvloop cannot be imported ({type(exc).__name__}: {exc})"
        ) from None
    version = str(getattr(uvloop, "__version__", "0"))
    # "0.19.0", "0.19rc1": the leading digits of the first two parts.
    numbers = tuple(int("0" + re.sub(r"\D.*", "", n)) for n in version.split(".")[:2])
    if numbers < UVLOOP_MIN or not callable(getattr(uvloop, "run", None)):
        wanted = ".".join(map(str, UVLOOP_MIN))
        raise ConfigError(
            source,
            "server.loop",
            f"uvloop {version} is too old: Bonzo needs {wanted} or later "
            "(pip install 'bonzo[uvloop]')",
        )


def _bool(item: dict[str, Any], name: str, source: str, key: str) -> bool:
    value = item.get(name, False)
    if not isinstance(value, bool):
        raise ConfigError(source, f"{key}.{name}", f"must be true or false, not {spelled(value)}")
    return value


def _sni_key(listener: str, name: str) -> str:
    """The key of a server name's pair as TOML spells it:
    ``listeners[0].tls.sni."mx2.example.org"`` (a name with dots is quoted,
    or it would read as nested tables)."""
    bare = re.fullmatch(r"[A-Za-z0-9_-]+", name) is not None
    return f"{listener}.tls.sni.{name}" if bare else f'{listener}.tls.sni."{name}"'


def _pair(
    table: Any, source: str, key: str, base_dir: Path, allowed: tuple[str, ...]
) -> CertificatePair:
    if not isinstance(table, dict):
        raise ConfigError(source, key, f"must be a table with cert and key, not {_type(table)}")
    for k in table:
        if k not in allowed:
            raise ConfigError(source, f"{key}.{k}", f"unknown key (allowed: {', '.join(allowed)})")
    paths = []
    for k in ("cert", "key"):
        value = table.get(k)
        if not isinstance(value, str) or not value or "\0" in value:
            raise ConfigError(source, f"{key}.{k}", "must be the path of a PEM file")
        paths.append(str(base_dir / value))
    return CertificatePair(paths[0], paths[1])


def _listener_settings(
    item: dict[str, Any],
    source: str,
    key: str,
    base_dir: Path,
    files: dict[str, CertificatePair],
    *,
    unix: bool = False,
) -> ListenerSettings:
    """The listener's settings; its certificate files go into ``files``."""
    context = None
    tls = item.get("tls")
    if tls is not None:
        default = _pair(tls, source, f"{key}.tls", base_dir, TLS_KEYS)
        sni_table = tls.get("sni", {})
        if not isinstance(sni_table, dict):
            raise ConfigError(source, f"{key}.tls.sni", "must be a table of name = {cert, key}")
        for name in sni_table:
            problem = _sni_problem(name)
            if problem is not None:
                raise ConfigError(
                    source, f"{key}.tls.sni", f"{name!r} is not a host name a client can ask for "
                    f"({problem})",
                )  # fmt: skip
        sni = {
            name: _pair(pair, source, _sni_key(key, name), base_dir, SNI_KEYS)
            for name, pair in sni_table.items()
        }
        try:
            context = make_server_context(default, sni)
        except TLSError as exc:
            where = f"{key}.tls" if exc.sni is None else _sni_key(key, exc.sni)
            raise ConfigError(source, where, str(exc)) from None
        files[f"{key}.tls"] = default
        files.update((_sni_key(key, name), pair) for name, pair in sni.items())
    mechanisms = item.get("auth_mechanisms", ["PLAIN", "LOGIN"])
    if (
        not isinstance(mechanisms, list)
        or not mechanisms
        or not all(isinstance(m, str) and m.upper() in MECHANISMS for m in mechanisms)
    ):
        raise ConfigError(
            source,
            f"{key}.auth_mechanisms",
            f"must be a non-empty list of {', '.join(MECHANISMS)}, not {spelled(mechanisms)}",
        )
    flags = {
        name: _bool(item, name, source, key)
        for name in (
            "implicit_tls",
            "require_tls",
            "require_auth",
            "auth_plaintext",
            "proxy_protocol",
        )
    }
    try:
        return ListenerSettings(
            tls_context=context,
            auth_mechanisms=tuple(dict.fromkeys(m.upper() for m in mechanisms)),
            protocol=item.get("protocol", "smtp"),
            **flags,
            # Lists of networks, checked by ListenerSettings.
            proxy_trusted=item.get("proxy_trusted", ()),
            xclient_trusted=item.get("xclient_trusted", ()),
            unix_socket=unix,
        )
    except SettingError as exc:
        raise ConfigError(source, f"{key}.{exc.setting}", exc.detail) from None


def _overridden(
    settings: SMTPSettings, overrides: dict[str, Any], source: str, key: str
) -> SMTPSettings:
    """The server's settings with a listener's overrides, validated alike."""
    if not overrides:
        return settings
    try:
        return settings.replace(**overrides)
    except SettingError as exc:
        raise ConfigError(source, f"{key}.{exc.setting}", exc.detail) from None


def _listeners(value: Any, source: str, base_dir: Path) -> list[ListenerConfig]:
    if value is None:
        return [ListenerConfig()]
    if not isinstance(value, list) or not value:
        raise ConfigError(
            source, "listeners", "must be a non-empty array of tables ([[listeners]])"
        )
    out = []
    seen: set[tuple[str, int | None]] = set()
    for i, item in enumerate(value):
        key = f"listeners[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(source, key, f"must be a table, not {_type(item)}")
        for k in item:
            if k not in LISTENER_KEYS and k not in LISTENER_OVERRIDES:
                raise ConfigError(
                    source,
                    f"{key}.{k}",
                    f"unknown key (allowed: {', '.join(LISTENER_KEYS)}, "
                    "and any key of [protocol] and [limits])",
                )
        overrides = {k: v for k, v in item.items() if k in LISTENER_OVERRIDES}
        protocol = item.get("protocol", "smtp")
        if protocol not in PROTOCOLS:
            raise ConfigError(
                source,
                f"{key}.protocol",
                f"must be one of {', '.join(map(spelled, PROTOCOLS))}, not {spelled(protocol)}",
            )
        if "path" in item:
            for k in ("address", "port", "tls", "implicit_tls", "require_tls"):
                if k in item:
                    raise ConfigError(
                        source, f"{key}.{k}", "a Unix socket listener (path) has no " + k
                    )
            path = _file_to_make(item["path"], source, f"{key}.path", base_dir, socket=True)
            if (path, None) in seen:
                raise ConfigError(source, key, f"duplicate listener unix:{path}")
            seen.add((path, None))
            mode = item.get("mode", 0o660)
            if isinstance(mode, str) and re.fullmatch(r"(?:0o?)?[0-7]{3}", mode):
                # "0o660" too: what `bonzo config` prints reads back.
                mode = mode.replace("o", "")
                mode = int(mode, 8)
            if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
                raise ConfigError(
                    source,
                    f"{key}.mode",
                    f'must be permission bits such as 0o660 or "0660", not {spelled(mode)}',
                )
            files: dict[str, CertificatePair] = {}
            settings = _listener_settings(item, source, key, base_dir, files, unix=True)
            out.append(
                ListenerConfig(
                    address="", port=0, settings=settings, path=path, mode=mode,
                    overrides=overrides, tls_files=files,
                )
            )  # fmt: skip
            continue
        if "mode" in item:
            raise ConfigError(
                source, f"{key}.mode", "only a Unix socket listener (path) has a mode"
            )
        address = item.get("address", "127.0.0.1")
        port = item.get("port", 2525)
        if not isinstance(address, str):
            raise ConfigError(source, f"{key}.address", f"must be a string, not {_type(address)}")
        if address not in ("", "localhost"):
            bindable(address, source, f"{key}.address")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(
                source, f"{key}.port", f"must be an integer 0..65535, not {spelled(port)}"
            )
        if (address, port) in seen and port:
            raise ConfigError(source, key, f"duplicate listener {host_port(address, port)}")
        seen.add((address, port))
        files = {}
        settings = _listener_settings(item, source, key, base_dir, files)
        out.append(
            ListenerConfig(
                address=address, port=port, settings=settings, overrides=overrides,
                tls_files=files,
            )
        )  # fmt: skip
    check_listeners(out, source, "listeners")
    return out


def _endpoints(address: str) -> set[tuple[int, str]]:
    """The (IP version, address) pairs a TCP listener on ``address`` binds:
    ``""`` every address of both versions (``"*"``), ``"localhost"`` the
    loopback ones (Tornado binds each address the name resolves to)."""
    if address == "":
        return {(4, "*"), (6, "*")}
    if address == "localhost":
        return {(4, "127.0.0.1"), (6, "::1")}
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        return {(ip.version, "*")}
    return {(ip.version, str(ip))}


def overlapping(a: str, b: str) -> bool:
    """Whether TCP listeners on addresses ``a`` and ``b`` (as the
    configuration writes them), on one port, would take the same socket:
    the same address, or a wildcard and an address of its IP version."""
    return any(
        va == vb and (ia == ib or "*" in (ia, ib))
        for va, ia in _endpoints(a)
        for vb, ib in _endpoints(b)
    )


def _binds(listener: ListenerConfig, address: str, port: int) -> bool:
    """Whether TCP ``listener`` takes the socket of ``address``:``port``."""
    return (
        listener.path is None and listener.port == port and overlapping(address, listener.address)
    )


def check_listeners(listeners: list[ListenerConfig], source: str, name: str) -> None:
    """Refuse two TCP listeners that would bind the same address and port
    (``bonzo serve`` would fail with "Address already in use"); ``name`` is
    how a listener is named in the message (``listeners`` or ``--listen``)."""
    for i, one in enumerate(listeners):
        if one.path is not None or not one.port:
            continue
        for j, other in enumerate(listeners[:i]):
            if _binds(other, one.address, one.port):
                raise ConfigError(
                    source,
                    f"{name}[{i}]",
                    f"{one.where} overlaps {name}[{j}] ({other.where}): both cannot listen",
                )


def check_metrics_port(
    metrics: MetricsConfig, listeners: list[ListenerConfig], source: str, name: str = "listeners"
) -> None:
    """Refuse a ``[metrics]`` port that an SMTP listener binds too."""
    if metrics.port is None:
        return
    for i, listener in enumerate(listeners):
        if _binds(listener, metrics.address, metrics.port):
            raise ConfigError(
                source,
                "metrics.port",
                f"{host_port(metrics.address, metrics.port)} is {name}[{i}]'s too "
                f"({listener.where})",
            )


def _logging(table: dict[str, Any], source: str, base_dir: Path) -> LoggingConfig:
    for k in table:
        if k not in LOGGING_KEYS:
            raise ConfigError(
                source, f"logging.{k}", f"unknown key (allowed: {', '.join(LOGGING_KEYS)})"
            )
    level = table.get("level", "info")
    if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
        raise ConfigError(
            source, "logging.level", f"must be one of {', '.join(LOG_LEVELS)}, not {spelled(level)}"
        )
    access = table.get("access_log", True)
    if not isinstance(access, bool):
        raise ConfigError(
            source, "logging.access_log", f"must be true or false, not {spelled(access)}"
        )
    file = table.get("file")
    if file is not None:
        file = _path(file, source, "logging.file", base_dir)
    fmt = table.get("format", "text")
    if fmt not in ("text", "json"):
        raise ConfigError(source, "logging.format", f'must be "text" or "json", not {spelled(fmt)}')
    return LoggingConfig(level=level.lower(), access_log=access, file=file, format=fmt)


def _ip_address(value: Any, source: str, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(source, key, f"must be a string, not {_type(value)}")
    if value not in ("", "localhost"):
        bindable(value, source, key)
    return value


def bindable(value: str, source: str, key: str) -> None:
    """Refuse what is no IP address, or one no socket can listen on."""
    if "%" in value:
        # ipaddress takes it, but the listener binds by name lookup, which
        # does not: refused here rather than at the start.
        raise ConfigError(source, key, f"{spelled(value)}: a zone index (%...) is not supported")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(
            source, key, f'must be an IP address (or "" for all), not {spelled(value)}'
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # IPv6 sockets listen IPv6-only: a mapped address cannot be bound.
        raise ConfigError(
            source,
            key,
            f"{value} is an IPv4-mapped address, which no socket can listen on: "
            f'write "{address.ipv4_mapped}"',
        )


def _metrics(table: dict[str, Any], source: str) -> MetricsConfig:
    for k in table:
        if k not in METRICS_KEYS:
            raise ConfigError(
                source, f"metrics.{k}", f"unknown key (allowed: {', '.join(METRICS_KEYS)})"
            )
    address = _ip_address(table.get("address", "127.0.0.1"), source, "metrics.address")
    port = table.get("port")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535
    ):
        raise ConfigError(
            source, "metrics.port", f"must be an integer 1..65535, not {spelled(port)}"
        )
    path = table.get("path", "/metrics")
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or len(path) > 200
        or not re.fullmatch(r"/[A-Za-z0-9._~/-]*", path)
    ):
        raise ConfigError(
            source,
            "metrics.path",
            f'must be a URL path such as "/metrics" (letters, digits, ._~-/), not {spelled(path)}',
        )
    if path == "/health":
        raise ConfigError(source, "metrics.path", "/health is the health endpoint")
    cap = table.get("max_connections", MetricsConfig.max_connections)
    if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= 1000:
        raise ConfigError(
            source, "metrics.max_connections", f"must be an integer 1..1000, not {spelled(cap)}"
        )
    if port is not None and importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(
            source,
            "metrics.port",
            "prometheus-client is not installed (pip install 'bonzo[metrics]')",
        )
    return MetricsConfig(address=address, port=port, path=path, max_connections=cap)


def _dns(table: dict[str, Any], source: str, base_dir: Path) -> DNSSettings:
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in DNS_KEYS:
            raise ConfigError(source, f"dns.{key}", f"unknown key (allowed: {', '.join(DNS_KEYS)})")
        values[key] = value
    servers = values.get("nameservers", [])
    if not isinstance(servers, list):
        raise ConfigError(
            source, "dns.nameservers", f"must be an array of IP addresses, not {_type(servers)}"
        )
    for i, entry in enumerate(servers):
        try:
            parse_nameserver(entry)
        except ValueError as exc:
            raise ConfigError(source, f"dns.nameservers[{i}]", str(exc)) from None
    values["nameservers"] = tuple(servers)
    families = values.get("address_families")
    if isinstance(families, list):
        values["address_families"] = tuple(families)
    if "resolv_conf" in values:
        values["resolv_conf"] = _path(values["resolv_conf"], source, "dns.resolv_conf", base_dir)
    try:
        return DNSSettings(**values)
    except SettingError as exc:
        raise ConfigError(source, f"dns.{exc.setting}", exc.detail) from None


def _redis(table: dict[str, Any], source: str) -> StoreSettings:
    for key in table:
        if key not in REDIS_KEYS:
            raise ConfigError(
                source, f"redis.{key}", f"unknown key (allowed: {', '.join(REDIS_KEYS)})"
            )
    try:
        return StoreSettings(**table)
    except SettingError as exc:
        raise ConfigError(source, f"redis.{exc.setting}", exc.detail) from None


def _plugins(table: dict[str, Any], source: str, base_dir: Path) -> PluginsConfig:
    config = PluginsConfig()
    enabled = table.get("enabled", [])
    if not isinstance(enabled, list) or not all(isinstance(n, str) and n for n in enabled):
        raise ConfigError(source, "plugins.enabled", "must be an array of plugin names")
    if len(set(enabled)) != len(enabled):
        dup = next(n for n in enabled if enabled.count(n) > 1)
        raise ConfigError(source, "plugins.enabled", f"plugin {dup!r} is listed twice")
    config.enabled = list(enabled)
    timeout = table.get("timeout", 60.0)
    if not positive_seconds(timeout):
        raise ConfigError(
            source, "plugins.timeout", f"must be a positive number, not {spelled(timeout)}"
        )
    config.timeout = float(timeout)
    timeouts = table.get("timeouts", {})
    if not isinstance(timeouts, dict):
        raise ConfigError(source, "plugins.timeouts", "must be a table of plugin = seconds")
    for name, value in timeouts.items():
        if name not in enabled:
            raise ConfigError(source, f"plugins.timeouts.{name}", "names no enabled plugin")
        if not positive_seconds(value):
            raise ConfigError(
                source,
                f"plugins.timeouts.{name}",
                f"must be a positive number, not {spelled(value)}",
            )
        config.timeouts[name] = float(value)
    paths = table.get("paths", [])
    if not isinstance(paths, list):
        raise ConfigError(source, "plugins.paths", "must be an array of directory paths")
    config.paths = [_path(p, source, f"plugins.paths[{i}]", base_dir) for i, p in enumerate(paths)]
    for key, value in table.items():
        if key in PLUGINS_KEYS:
            continue
        if not isinstance(value, dict):
            allowed = ", ".join(PLUGINS_KEYS)
            why = (
                "must be a table ([plugins.NAME]), not an array of tables ([[plugins.NAME]])"
                if isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
                else f"unknown key (allowed: {allowed}, or a [plugins.<name>] table)"
            )
            raise ConfigError(source, f"plugins.{key}", why)
        config.tables[key] = value
    return config


#: Keys whose values are never printed by :func:`effective_config`.
_SECRET_KEY = re.compile(r"pass(word)?|secret|token|credential", re.I)


def _redacted(value: Any, key: str = "") -> Any:
    """``value`` with secrets replaced: ``{ "$env" = ... }``/``{ "$file" = ... }``
    references by what they name, values of password-like keys entirely."""
    if isinstance(value, dict):
        if len(value) == 1 and ("$env" in value or "$file" in value):
            kind, ref = next(iter(value.items()))
            return f"<secret from {kind} {ref}>"
        return {k: _redacted(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v, key) for v in value]
    if _SECRET_KEY.search(key) and isinstance(value, str) and value:
        return "<redacted>"  # an empty one is no secret, and must read back empty
    return value


def _absolute(pair: dict[str, Any], base_dir: Path) -> dict[str, str]:
    """The ``cert`` and ``key`` paths of a TLS table, made absolute."""
    return {
        k: str((base_dir / v).resolve())
        for k in ("cert", "key")
        if isinstance(v := pair.get(k), str) and v
    }


def _toml_value(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_toml_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _toml_value(v) for k, v in value.items() if v is not None}
    if isinstance(value, Path):
        return str(value)
    return value


def read_raw(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The TOML of a configuration file (or of the embedded default) as
    written, secrets unread; call after :func:`load_config` succeeded."""
    text = default_config_text() if path is None else Path(path).read_text("utf-8")
    data: dict[str, Any] = tomllib.loads(text)
    return data


def effective_config(config: Config, raw: dict[str, Any]) -> dict[str, Any]:
    """The configuration as Bonzo runs it — every key of the core's tables
    with its default filled in — for ``bonzo config``. ``raw`` is the file's
    TOML before secrets were read: listener and plugin tables come from it
    as written, with secrets redacted (:func:`_redacted`)."""
    sections: dict[str, dict[str, Any]] = {"server": {}, "protocol": {}, "limits": {}}
    for f in dataclasses.fields(config.settings):
        sections[SETTING_SECTIONS[f.name]][f.name] = getattr(config.settings, f.name)
    sections["server"].update(workers=config.workers, loop=config.loop, pid_file=config.pid_file)
    listeners = []
    raw_listeners = raw.get("listeners") or [{}]
    for listener, table in zip(config.listeners, raw_listeners, strict=True):
        entry: dict[str, Any] = {}
        if listener.path is not None:
            entry.update(path=listener.path, mode=f"0o{listener.mode:03o}")
        else:
            entry.update(address=listener.address, port=listener.port)
        entry.update({k: v for k, v in table.items() if k not in entry})
        tls = entry.get("tls")
        if isinstance(tls, dict):
            # Absolute, as the other paths of the core's tables: the output
            # may be saved in another directory.
            entry["tls"] = tls = {**tls, **_absolute(tls, config.base_dir)}
            if isinstance(tls.get("sni"), dict):
                tls["sni"] = {
                    name: {**pair, **_absolute(pair, config.base_dir)}
                    if isinstance(pair, dict)
                    else pair
                    for name, pair in tls["sni"].items()
                }
        listeners.append(_redacted(entry))
    plugins: dict[str, Any] = {
        "enabled": config.plugins.enabled,
        "timeout": config.plugins.timeout,
        "timeouts": config.plugins.timeouts,
        "paths": config.plugins.paths,
    }
    raw_plugins = raw.get("plugins", {}) if isinstance(raw.get("plugins"), dict) else {}
    for name, table in raw_plugins.items():
        if isinstance(table, dict) and name not in plugins:
            plugins[name] = _redacted(table)
    out: dict[str, Any] = {
        **sections,
        "listeners": listeners,
        "logging": dataclasses.asdict(config.logging),
        "dns": dataclasses.asdict(config.dns),
        "metrics": dataclasses.asdict(config.metrics),
        "redis": {
            **dataclasses.asdict(config.redis),
            "url": safe_url(config.redis.url) if config.redis.url else "",
        },
        "plugins": plugins,
    }
    # The core's tables show the values read; a value that came from
    # { "$env" = ... } or { "$file" = ... }, or under a password-like key,
    # is shown redacted as in the other tables.
    for name, table in out.items():
        given = raw.get(name)
        if name in ("listeners", "plugins") or not isinstance(given, dict):
            continue
        for key, value in given.items():
            shown = _redacted(value, key)
            if key in table and shown != value:
                table[key] = shown
    return {k: _toml_value(v) for k, v in out.items()}

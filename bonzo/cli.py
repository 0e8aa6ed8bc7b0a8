"""The ``bonzo`` command: run the daemon, check a configuration, list plugins.

``bonzo serve [-c FILE]``
    Run in the foreground until SIGTERM or SIGINT (graceful stop; a second
    one forces it); SIGHUP reloads the configuration. With no ``-c``, the
    embedded default configuration (``bonzo.toml.example``) runs.
``bonzo check [-c FILE]``
    Validate the configuration and load every enabled plugin; exit 0 if all
    is well, 2 with a one-line message naming the file and key otherwise.
``bonzo plugins [-c FILE]``
    Installed and enabled plugins, their versions, the hooks each implements
    and the effective order of every hook.
``bonzo version``
    Print the version.

Exit status: 0 on success, 1 when the server fails at run time (e.g. the
port is in use), 2 for a bad command line or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import version
from .config import ConfigError, check_metrics_port, load_config
from .listen import socket_name
from .protocol import data_scan_in_c
from .session import current_message_id, current_session_id, one_line
from .settings import host_port, spelled

__all__ = ["main"]

log = logging.getLogger("bonzo.daemon")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bonzo`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"bonzo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover - interactive only
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bonzo", description="Bonzo, the programmable SMTP server."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    for name, func, text in (
        ("serve", _serve, "run the server in the foreground"),
        ("check", _check, "validate the configuration and its plugins"),
        ("plugins", _plugins, "list installed and enabled plugins and hook order"),
        ("config", _config, "print the effective configuration, defaults filled in"),
        ("reload", _reload, "have the running daemon reload its configuration (server.pid_file)"),
    ):
        p = add(name, func, text)
        p.add_argument(
            "-c",
            "--config",
            metavar="FILE",
            help="configuration file (default: the embedded default, bonzo.toml.example)",
        )
    sub.choices["plugins"].add_argument(
        "--doc", metavar="NAME", help="print the documentation of plugin NAME and exit"
    )
    serve = sub.choices["serve"]
    serve.add_argument(
        "--listen",
        action="append",
        metavar="ADDR:PORT",
        help="listen here instead of the configuration's [[listeners]] (plain SMTP; "
        "may be repeated), e.g. 127.0.0.1:2525 or [::1]:2525",
    )
    p = add("adduser", _adduser, "add a user to a password file (for the passwd plugin)")
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="the password file")
    p.add_argument("user", help="the user name (no colon, space or control character)")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input instead of prompting",
    )
    add("version", _version, "print the version")
    _add_plugin_commands(sub, add)
    return parser


#: The entry-point group where plugins add commands (``bonzo queue``): each
#: entry is a function called with ``add(name, func, help)``, which returns
#: the new command's :class:`argparse.ArgumentParser`; ``func(args)``
#: returns the exit status.
COMMANDS_GROUP = "bonzo.commands"


def _add_plugin_commands(sub: Any, add: Any) -> None:
    from importlib import metadata

    for entry in sorted(metadata.entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        if entry.name in sub.choices:
            print(
                f"bonzo: command {entry.name!r} of {entry.value} is ignored: the name is taken",
                file=sys.stderr,
            )
            continue
        try:
            entry.load()(add)
        except Exception as exc:
            print(
                f"bonzo: command {entry.name!r} ({entry.value}) cannot be loaded: {exc}",
                file=sys.stderr,
            )


def _adduser(args: argparse.Namespace) -> int:
    import getpass
    from pathlib import Path

    from bonzo_plugins.passwd import add_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif not sys.stdin.isatty():
        print(
            "bonzo: adduser: no terminal to ask for the password; give it on standard input "
            "with --password-stdin",
            file=sys.stderr,
        )
        return 2
    else:
        password = getpass.getpass(f"Password for {args.user}: ")
        if password != getpass.getpass("Again: "):
            print("bonzo: the passwords differ; nothing changed", file=sys.stderr)
            return 2
    try:
        new = add_user(Path(args.file), args.user, password)
    except OSError as exc:
        # Not the temporary file's name: the one the operator gave.
        print(f"bonzo: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        text = str(exc)
        where = "" if text.startswith(f"{args.file}:") else f"{args.file}: "
        print(f"bonzo: {where}{text}", file=sys.stderr)
        return 2
    print(f"{'added' if new else 'changed the password of'} {args.user} in {args.file}")
    return 0


def _version(args: argparse.Namespace) -> int:
    print(f"bonzo {version}")
    return 0


def _load_app(args: argparse.Namespace) -> Any:
    from .app import MailApp

    config = load_config(args.config)
    return MailApp(config)


def _check_log_file(config: Any) -> None:
    """The error ``bonzo serve`` would stop on if :tomlkey:`logging.file`
    cannot be opened for appending (checked without creating it)."""
    path = config.logging.file
    if path is None:
        return
    target = path if os.path.exists(path) else os.path.dirname(path) or "."
    if os.path.isdir(path):
        raise config.error("logging.file", f"cannot open {path}: is a directory")
    if not os.path.isdir(os.path.dirname(path) or "."):
        raise config.error("logging.file", f"cannot open {path}: no such directory")
    if not os.access(target, os.W_OK):
        raise config.error("logging.file", f"cannot open {path}: permission denied")


def _check(args: argparse.Namespace) -> int:
    app = _load_app(args)
    config = app.config
    _check_log_file(config)
    print(f"{config.source}: OK")
    print("  listeners:")
    for listener in config.listeners:
        facts = [listener.settings.protocol.upper()]
        ls = listener.settings
        if ls.implicit_tls:
            facts.append("implicit TLS")
        elif ls.tls_context is not None:
            facts.append("STARTTLS")
        if ls.require_tls:
            facts.append("requires TLS")
        if ls.require_auth:
            facts.append("requires AUTH")
        if ls.proxy_protocol and ls.unix_socket:
            facts.append("PROXY from whoever may open the socket")
        elif ls.proxy_protocol:
            facts.append("PROXY from " + " ".join(str(n) for n in ls.proxy_trusted))
        if ls.xclient_trusted:
            facts.append("XCLIENT from " + " ".join(str(n) for n in ls.xclient_trusted))
        facts += [f"{k} = {spelled(v)}" for k, v in listener.overrides.items()]
        print(f"    {listener.where}: {', '.join(facts)}")
    print(f"  workers: {config.workers}")
    print(f"  plugins: {', '.join(config.plugins.enabled) or 'none'}")
    print(f"  dsn: {app.describe_dsn()}")
    print(f"  dns: {app.dns.describe()}")
    m = config.metrics
    where = (
        f"http://{host_port(m.address or '*', m.port)}{m.path} and /health" if m.enabled else "off"
    )
    print(f"  metrics: {where}")
    for warning in app.warnings():
        print(f"  warning: {warning}")
    limits = _descriptor_limits()
    if limits is not None:
        # What `bonzo serve` will have, after raising its soft limit.
        soft, hard = limits
        http = _metrics_connections(config)
        own = app.plugins.open_files()
        need = _descriptors_needed(config.settings.max_connections, http, own)
        soft = _raised_soft(soft, hard, need)
        warning = _descriptor_warning(config.settings.max_connections, soft, hard, http, own)
        if warning is not None:
            print(f"  warning: {warning}")
    return 0


def _reload(args: argparse.Namespace) -> int:
    """``bonzo reload``: check the configuration here (an error is shown
    now, not only in the daemon's log), then send ``SIGHUP`` to the daemon
    named by its ``server.pid_file``."""
    app = _load_app(args)
    config = app.config
    if config.pid_file is None:
        raise config.error("server.pid_file", "not set: bonzo reload finds the daemon by it")
    try:
        pid, held = _read_pid_file(config.pid_file)
        if not held:
            # No daemon holds the file: the number in it may be any process's
            # by now, so it is not signalled.
            print(
                f"bonzo: reload: {config.pid_file}: no bonzo daemon holds it (stale; pid {pid} "
                "not signalled)",
                file=sys.stderr,
            )
            return 1
        os.kill(pid, signal.SIGHUP)
    except FileNotFoundError:
        print(
            f"bonzo: reload: {config.pid_file}: no such file (is bonzo running?)", file=sys.stderr
        )
        return 1
    except ValueError:
        print(f"bonzo: reload: {config.pid_file}: not a process id", file=sys.stderr)
        return 1
    except ProcessLookupError:
        print(f"bonzo: reload: pid {pid} is not running (stale {config.pid_file})", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"bonzo: reload: pid {pid}: permission denied", file=sys.stderr)
        return 1
    for warning in app.warnings():
        print(f"warning: {warning}")
    print(f"reload requested: pid {pid} (its log says when it has reloaded)")
    return 0


def _config(args: argparse.Namespace) -> int:
    """``bonzo config``: the configuration as it would run, as TOML, with
    every default filled in and secrets redacted."""
    import tomli_w

    from .config import effective_config, read_raw

    config = load_config(args.config)
    # The name as a TOML string spells it: a newline in it would end the comment.
    source = spelled(config.source)[1:-1]
    sys.stdout.write(f"# {source}: the effective configuration (secrets redacted)\n")
    sys.stdout.write(tomli_w.dumps(effective_config(config, read_raw(args.config))))
    return 0


def _plugin_doc(name: str) -> int:
    """``bonzo plugins --doc NAME``: the plugin's README (beside its module,
    as the bundled plugins ship it), else its docstring, else its module's,
    else its distribution's summary."""
    import importlib
    import inspect

    from .app import installed_plugins, resolve_plugin

    installed = installed_plugins()
    try:
        plugin = resolve_plugin(name, installed)
    except LookupError as exc:
        print(f"bonzo: plugins --doc: {exc} (see bonzo plugins)", file=sys.stderr)
        return 2
    module_name = str(getattr(plugin, "__module__", None) or getattr(plugin, "__name__", ""))
    package = module_name.rpartition(".")[0] if "." in module_name else module_name
    for candidate in (module_name, package):
        try:
            module = importlib.import_module(candidate)
        except ImportError:
            continue
        where = getattr(module, "__file__", None)
        if where:
            readme = os.path.join(os.path.dirname(where), "README.rst")
            if os.path.isfile(readme):
                with open(readme, encoding="utf-8") as f:
                    # reST comment lines (the markers around generated key
                    # lists) are for tools, not for the reader.
                    text = re.sub(r"(?m)^\.\. (BEGIN|END) KEYS.*\n\n?", "", f.read())
                sys.stdout.write(text)
                return 0
    doc = inspect.getdoc(plugin) or inspect.getdoc(type(plugin))
    if doc and type(plugin).__module__ != "builtins":
        print(doc)
        return 0
    home = sys.modules.get(module_name)
    doc = inspect.getdoc(home) if home is not None else None
    if doc:
        print(doc)
        return 0
    if name in installed:
        from importlib import metadata

        try:
            summary = metadata.metadata(installed[name].distribution)["Summary"]
        except (metadata.PackageNotFoundError, KeyError):
            summary = None
        if summary:
            print(summary)
            return 0
    print(f"bonzo: plugins --doc: plugin {name!r} has no documentation", file=sys.stderr)
    return 1


def _plugins(args: argparse.Namespace) -> int:
    from .app import MailApp, add_plugin_paths, installed_plugins
    from .hooks import hook_names

    if args.doc is not None:
        if args.config is not None:
            # A plugin the configuration enables by dotted path is found
            # where `bonzo serve` finds it.
            add_plugin_paths(load_config(args.config))
        return _plugin_doc(args.doc)
    config = load_config(args.config)
    add_plugin_paths(config)
    installed = installed_plugins()
    enabled = config.plugins.enabled
    print("Installed plugins (entry-point group bonzo.plugins):")
    # Columns as wide as their longest entry (third-party names vary).
    rows = []
    for name in sorted(installed):
        info = installed[name]
        state = f"enabled #{enabled.index(name) + 1}" if name in enabled else "not enabled"
        if info.clashes:
            state = "ambiguous"  # declared by several distributions: one row each
        for each in (info, *info.clashes):
            rows.append((name, f"{each.distribution} {each.version}", state, each.value))
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        print("  " + "  ".join(cells) + "  " + row[3])
    for name in sorted(installed):
        ambiguity = installed[name].ambiguity()
        if ambiguity is not None:
            print(f"warning: {ambiguity}")
    # Enabling an ambiguous name is the configuration error (after the list).
    app = MailApp(config)
    local = [n for n in enabled if n not in installed]
    if local:
        print("Enabled by dotted path:")
        for name in local:
            print(f"  {name}")
    print("Enabled plugins and their hooks:")
    for name in enabled:
        print(f"  {name}: {', '.join(app.plugins.hooks_of(name)) or '(no hooks)'}")
    print("Effective order per hook:")
    for hook in hook_names():
        calls = app.plugins.calls[hook]
        if calls:
            print(f"  {hook}: {' -> '.join(c.plugin for c in calls)}")
    for warning in app.warnings():
        print(f"warning: {warning}")
    return 0


# ------------------------------------------------------------------- serve
class JSONFormatter(logging.Formatter):
    """One JSON object per line (``[logging] format = "json"``): ``time``
    (ISO 8601, UTC), ``level``, ``logger``, ``pid``, ``message``, and
    ``session`` and ``message_id`` on every line logged while a session
    (and one of its messages) is being served; ``exception`` with the
    traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        session, message = current_session_id.get(), current_message_id.get()
        if session is not None:
            line["session"] = session
        if message is not None:
            line["message_id"] = message
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        text = json.dumps(line, ensure_ascii=False)
        if not text.isascii():
            # JSON escapes the ASCII controls but leaves NEL, U+2028 and
            # U+2029, which line readers (str.splitlines(), JavaScript's)
            # take for line ends: a record must stay one line.
            text = text.replace("\x85", "\\u0085")
            text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        return text


#: The text log's line (``[logging] format = "text"``).
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """The text log (``[logging] format = "text"``): :data:`TEXT_FORMAT`,
    with every record's message kept to its line and every exception's text
    to the traceback's last line. Line breaks and other controls in them are
    escaped (:func:`bonzo.session.one_line`): a plugin's message or
    exception may hold what a client sent (a decoded ``Subject``), which
    must not begin a forged line of its own — one that a log watcher such as
    fail2ban would act on."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return one_line(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        for exc in _exception_chain(ei[1]):
            try:
                said = str(exc)
            except Exception:
                continue
            if said.isprintable():
                continue
            # The traceback's last line for it, as the traceback module writes it.
            kind = type(exc).__qualname__
            module = type(exc).__module__
            if module not in ("__main__", "builtins"):
                kind = f"{module}.{kind}"
            text = text.replace(f"{kind}: {said}", f"{kind}: {one_line(said)}")
        return text


def _exception_chain(exc: BaseException | None, limit: int = 100) -> list[BaseException]:
    """``exc`` and the exceptions its traceback shows: causes, contexts and
    a group's members (at most ``limit``)."""
    found: list[BaseException] = []
    todo = [exc]
    while todo and len(found) < limit:
        one = todo.pop()
        if one is None or any(one is seen for seen in found):
            continue
        found.append(one)
        todo += [one.__cause__, one.__context__]
        members = getattr(one, "exceptions", ())  # an exception group's
        if isinstance(members, (tuple, list)):
            todo += [m for m in members if isinstance(m, BaseException)]
    return found


class _StartupErrors(logging.StreamHandler):  # type: ignore[type-arg]
    """While ``bonzo serve`` starts, its ``ERROR`` lines go to standard
    error too when the log goes to a file: the reason it exits with status 1
    (an address in use, a plugin's startup) reaches the terminal or the
    process manager's journal, not only a file nobody is looking at."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setLevel(logging.ERROR)
        self.setFormatter(TextFormatter("bonzo: %(message)s"))


def startup_done() -> None:
    """The daemon serves: its errors go to the log file alone from now on."""
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _StartupErrors)]


def setup_logging(config: Any, startup: bool = False) -> None:
    """Send the process's log where the configuration's ``[logging]`` table
    says, as ``bonzo serve`` writes it (also what ``bonzo queue`` logs its
    changes through, into the daemon's log). With ``startup`` and a log
    file, ``ERROR`` lines go to standard error too until
    :func:`startup_done`. Raises :exc:`ConfigError` if
    :tomlkey:`logging.file` cannot be opened."""
    level = getattr(logging, config.logging.level.upper())
    handler: logging.Handler
    if config.logging.file:
        try:
            handler = logging.FileHandler(config.logging.file)
        except OSError as exc:
            raise config.error(
                "logging.file", f"cannot open {config.logging.file}: {exc.strerror or exc}"
            ) from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    if config.logging.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if startup and config.logging.file:
        root.addHandler(_StartupErrors())
    root.setLevel(level)
    logging.getLogger("tornado.access").setLevel(
        level if config.logging.access_log else logging.WARNING
    )


def _listen_override(values: list[str]) -> list[Any]:
    """``--listen`` values as plain SMTP listeners; :class:`ConfigError`
    naming the option for a bad one."""
    import ipaddress

    from .config import ListenerConfig, bindable, check_listeners

    listeners = []
    for value in values:
        host, sep, port = value.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        host = host[1:-1] if bracketed else host
        try:
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("expected ADDR:PORT")
            # An IPv6 address in brackets, as the docs write it: without
            # them, which colon ends the address is a guess.
            if ":" in host and not bracketed:
                raise ValueError("IPv6 without brackets")
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            raise ConfigError(
                "--listen",
                "",
                f"{value!r}: expected an IP address and a port, e.g. 127.0.0.1:2525 or [::1]:2525",
            ) from None
        bindable(host, "--listen", "")
        listeners.append(ListenerConfig(address=host, port=int(port)))
    check_listeners(listeners, "--listen", "--listen")
    return listeners


def _serve(args: argparse.Namespace) -> int:
    # First of all: SIGHUP's default action ends the process, unlogged (a
    # reload asked while the configuration and the plugins load), and a
    # death by SIGHUP is a clean exit to systemd's Restart=on-failure.
    signal.signal(signal.SIGHUP, _log_sighup)  # until the workers can reload
    config = load_config(args.config)
    if args.listen:
        config.listeners = _listen_override(args.listen)
        check_metrics_port(config.metrics, config.listeners, config.source, "--listen")
    setup_logging(config, startup=True)
    from .app import MailApp

    metrics_dir = None
    if config.metrics.enabled:
        from .metrics import make_multiprocess_dir

        # Before anything imports prometheus_client (a plugin may): its
        # multiprocess mode is chosen when it is imported.
        metrics_dir = make_multiprocess_dir()
    main_pid = os.getpid()
    try:
        app = MailApp(config)
        app.listen_override = args.listen  # re-applied by a reload
        return _serve_app(app)
    finally:
        if metrics_dir is not None and os.getpid() == main_pid:
            from .metrics import remove_multiprocess_dir

            remove_multiprocess_dir(metrics_dir)


def _serve_app(app: Any) -> int:
    config = app.config
    if config.source == "<default>":
        log.info(
            "No -c given: running the embedded default configuration (bonzo.toml.example); "
            "paths are relative to %s",
            config.base_dir,
        )
    for warning in app.warnings():
        log.warning("%s", warning)
    _raise_descriptor_limit(
        config.settings.max_connections, _metrics_connections(config), app.plugins.open_files()
    )
    main_pid = os.getpid()
    if config.pid_file is not None:
        try:
            _write_pid_file(config.pid_file)
        except _PidFileProblem as exc:
            if exc.mistake:
                # A file no daemon can make there: the configuration's
                # mistake (status 2, which the systemd unit does not restart).
                raise config.error("server.pid_file", str(exc)) from None
            # Another daemon runs, or a fault that may pass (a full /run).
            log.error("server.pid_file: %s", exc)
            return 1
    try:
        sockets = app.bind()
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        _remove_pid_file(config.pid_file, main_pid)
        return 1
    metrics_sockets: list[Any] = []
    if config.metrics.enabled:
        from tornado.netutil import bind_sockets

        m = config.metrics
        try:
            metrics_sockets = bind_sockets(m.port, m.address or None, backlog=128)
        except OSError as exc:
            log.error(
                "metrics: cannot listen on %s: %s", host_port(m.address, m.port), exc.strerror
            )
            for s in sockets:
                s.close()
            app.remove_unix_sockets()
            _remove_pid_file(config.pid_file, main_pid)
            return 1
        log.info(
            "metrics on http://%s%s and /health; multiprocess directory %s",
            host_port(m.address or "*", m.port),
            m.path,
            os.environ.get("PROMETHEUS_MULTIPROC_DIR", "?"),
        )
    where = ", ".join(socket_name(s) for s in sockets)
    log.info(
        "bonzo %s listening on %s with %d worker(s)%s; plugins in order: %s",
        version,
        where,
        config.workers,
        " on uvloop" if config.loop == "uvloop" else "",
        ", ".join(config.plugins.enabled) or "none",
    )
    for hook, names in app.plugins.reordered().items():
        # The line above gives the operator's order; tryfirst/trylast can
        # change it for a hook, and the first verdict wins: say where.
        log.info("%s runs in the order %s (tryfirst/trylast)", hook, " -> ".join(names))
    if not data_scan_in_c():
        log.info(
            "message content is scanned in pure Python (bonzo._speedups is not built, or "
            "BONZO_NO_EXTENSION is set): about ten times more CPU per megabyte than in C"
        )
    try:
        if config.workers == 1:
            try:
                code = 1 if _run_worker(app, sockets, metrics_sockets=metrics_sockets) else 0
            except Exception:
                # Into the log (a [logging] file), not only onto stderr.
                log.critical("bonzo serve failed", exc_info=True)
                raise
        else:
            code = _supervise(app, sockets, config.workers, metrics_sockets)
    finally:
        if os.getpid() == main_pid:  # not in a worker that returns here
            app.remove_unix_sockets()
            for s in metrics_sockets:
                s.close()
            _remove_pid_file(config.pid_file, main_pid)
    from .hooks import abandoned_calls

    if abandoned_calls():
        # Plugin calls that ignored their cancellation are still held: the
        # interpreter's exit would close them without an event loop, where
        # one that swallows every exception loops for ever.
        _exit_now(code)
    return code


#: How long a forced stop (the second SIGTERM) may take before the process
#: exits anyway: each plugin call in flight ends or is abandoned within
#: CANCEL_GRACE of its cancellation, then sessions clean up.
FORCED_STOP_LIMIT = 5.0


def _exit_now(code: int) -> NoReturn:
    """Exit at once (:func:`os._exit`), the logs flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


#: Descriptors a worker may need per connection it serves (the socket, and a
#: spool file or an outbound connection for some), and beside them.
_DESCRIPTORS_PER_CONNECTION = 2
_DESCRIPTORS_SPARE = 64


def _descriptor_limits() -> tuple[int, int] | None:
    """This process's (soft, hard) limit on open descriptors, ``-1`` for
    unlimited; ``None`` where there is no such limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        return None
    infinity = resource.RLIM_INFINITY
    return (-1 if soft == infinity else soft), (-1 if hard == infinity else hard)


def _descriptors_needed(max_connections: int, metrics: int = 0, plugins: int = 0) -> int:
    """Descriptors a worker may need for ``max_connections`` sessions, and
    worker 0 for ``metrics`` connections of the metrics listener besides,
    with ``plugins`` more that plugins may hold (:meth:`PluginSet.open_files
    <bonzo.hooks.PluginSet.open_files>`: the queue's message files)."""
    return max_connections * _DESCRIPTORS_PER_CONNECTION + _DESCRIPTORS_SPARE + metrics + plugins


def _metrics_connections(config: Any) -> int:
    """The metrics listener's connections at most (``0``: metrics off)."""
    return int(config.metrics.max_connections) if config.metrics.enabled else 0


def _raised_soft(soft: int, hard: int, need: int) -> int:
    """The soft limit ``bonzo serve`` sets: ``need`` if ``soft`` (``-1``:
    unlimited) is below it, within ``hard``; else ``soft`` as it is."""
    if 0 <= soft < need:
        return need if hard < 0 else max(soft, min(need, hard))
    return soft


def _descriptor_warning(
    max_connections: int, soft: int, hard: int, metrics: int = 0, plugins: int = 0
) -> str | None:
    """The warning when ``soft`` (``-1``: unlimited) is below what
    ``max_connections`` sessions (and ``metrics`` connections, and the
    ``plugins``' own files) may need."""
    need = _descriptors_needed(max_connections, metrics, plugins)
    if soft < 0 or soft >= need:
        return None
    besides = f" (with {plugins} for the plugins' own files)" if plugins else ""
    return (
        f"[limits] max_connections = {max_connections} may need {need} open files per process"
        f"{besides}, "
        f"but the limit is {soft} (hard limit {'unlimited' if hard < 0 else hard}): raise it "
        "(LimitNOFILE= in a systemd unit, ulimit -n) or lower max_connections; clients beyond "
        "it are answered 421 4.3.2"
    )


def _raise_descriptor_limit(
    max_connections: int, metrics: int = 0, plugins: int = 0, *, quiet: bool = False
) -> None:
    """Raise this process's soft limit on open descriptors (inherited by its
    workers) to what ``max_connections`` sessions may need, within the hard
    limit (as systemd advises a service that polls with epoll), and warn
    when the hard limit is too low: a worker out of descriptors cannot
    accept, spool or deliver."""
    limits = _descriptor_limits()
    if limits is None:  # pragma: no cover - not POSIX
        return
    import resource

    soft, hard = limits
    target = _raised_soft(soft, hard, _descriptors_needed(max_connections, metrics, plugins))
    if target != soft:
        try:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (target, resource.RLIM_INFINITY if hard < 0 else hard)
            )
        except (OSError, ValueError) as exc:
            if not quiet:
                log.warning("cannot raise the limit on open files from %d: %s", soft, exc)
        else:
            if not quiet:
                log.info(
                    "limit on open files raised from %d to %d for [limits] max_connections = %d%s",
                    soft,
                    target,
                    max_connections,
                    f" and {plugins} of the plugins' own" if plugins else "",
                )
            soft = target
    warning = _descriptor_warning(max_connections, soft, hard, metrics, plugins)
    if warning is not None and not quiet:
        log.warning("%s", warning)


# The running daemon holds an exclusive lock (flock) on its pid file, as
# Postfix's master does: a pid file that no process holds is stale, whatever
# process has its number now (after a crash, a kill -9 or a reboot, numbers
# are reused). The descriptor stays open for the daemon's life; its workers
# share it, so the lock lasts while any of them runs.
_pid_lock: int | None = None


def _pid_in(fd: int) -> int:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else 0


def _read_pid_file(path: str) -> tuple[int, bool]:
    """The process id in ``path`` and whether a running daemon holds the
    file. Raises :exc:`FileNotFoundError`, or :exc:`ValueError` when it does
    not hold a number."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = _pid_in(fd)
        if pid <= 0:
            raise ValueError(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return pid, True
        return pid, False
    finally:
        os.close(fd)


#: What makes a pid file impossible to create whatever the moment: the
#: configuration's mistake (exit status 2). Other faults (a full disk, an
#: I/O error, no locks left) may pass: a runtime failure (1), restarted.
_PID_FILE_MISTAKES = frozenset(
    (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
     errno.ELOOP, errno.ENAMETOOLONG)
)  # fmt: skip


class _PidFileProblem(Exception):
    """Why the pid file cannot be taken; ``mistake``: the configuration's."""

    def __init__(self, text: str, mistake: bool = False) -> None:
        super().__init__(text)
        self.mistake = mistake


def _write_pid_file(path: str) -> None:
    """Write this process's id to ``path`` and hold the file locked until
    :func:`_remove_pid_file`; :exc:`_PidFileProblem` if a running daemon
    holds it or it cannot be written (nothing is left behind)."""
    global _pid_lock
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _PidFileProblem(
            f"cannot write {path}: {exc.strerror or exc}", exc.errno in _PID_FILE_MISTAKES
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _pid_in(fd)
        os.close(fd)
        raise _PidFileProblem(
            f"{path}: pid {holder} is running (is bonzo already running?)"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise _PidFileProblem(f"cannot lock {path}: {exc.strerror or exc}") from None
    try:
        old = _pid_in(fd)
        if old > 0 and old != os.getpid():
            log.warning(
                "server.pid_file: %s named pid %d, which no bonzo daemon holds; replaced", path, old
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError as exc:
        # Held by nobody else (the lock is this process's): an empty or
        # stale file is of no use to anyone.
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)
        raise _PidFileProblem(
            f"cannot write {path}: {exc.strerror or exc}", exc.errno in _PID_FILE_MISTAKES
        ) from None
    if _pid_lock is not None:
        os.close(_pid_lock)
    _pid_lock = fd


def _release_pid_lock() -> None:
    """Close this process's share of the pid file's lock, leaving the file:
    a worker whose supervisor is gone, so that a new daemon may take it."""
    global _pid_lock
    if _pid_lock is not None:
        os.close(_pid_lock)
        _pid_lock = None


def _remove_pid_file(path: str | None, pid: int) -> None:
    """Remove ``path`` if it still names ``pid`` (never another daemon's),
    then let go of its lock."""
    global _pid_lock
    if path is None:
        return
    try:
        with open(path, encoding="ascii") as f:
            if f.read().strip() == str(pid):
                os.unlink(path)
    except OSError:
        pass
    if _pid_lock is not None:
        os.close(_pid_lock)
        _pid_lock = None


def sd_notify(state: str) -> bool:
    """Tell systemd ``state`` (``READY=1``, ``STOPPING=1``) through the
    socket ``$NOTIFY_SOCKET`` names, if any (``Type=notify`` units; with
    worker processes, ``NotifyAccess=all``, as each worker reports itself
    ready). Returns whether it was sent; never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.warning("sd_notify: %s: %s", address, exc.strerror or exc)
        return False
    return True


def _reloaded_app(old: Any, *, warn: bool = True) -> Any:
    """The application of the configuration file ``old`` was loaded from,
    read and checked again, its plugins configured, serving ``old``'s
    sockets — or ``None`` after logging why it cannot replace ``old`` (the
    running configuration is kept). What takes effect at a restart only
    keeps its running value, with a warning unless ``warn`` is false (a
    worker: its supervisor warns once for all)."""
    from .app import MailApp
    from .client import reload_system_trust
    from .hooks import PluginError

    source = old.config.source
    try:
        config = load_config(None if source == "<default>" else source)
        override = getattr(old, "listen_override", None)
        if override:
            config.listeners = _listen_override(override)
        # The same [redis] table: the same store, so that a reload keeps the
        # rate-limit counts and greylist entries of an in-memory store (and
        # the connection pool of a Redis one).
        same_store = config.redis == old.config.redis
        new = MailApp(config, store=old.store if same_store else None)
        new.listen_override = override
        new.adopt_sockets(old)
    except (ConfigError, PluginError, ValueError) as exc:
        log.error("reload: %s; still running the previous configuration", exc)
        return None
    except Exception as exc:
        log.error("reload failed: %r; still running the previous configuration", exc)
        return None
    # Compared with what runs (kept through every reload), never with the
    # file loaded last: after workers = 3 and back, 2 still run, unwarned.
    if config.workers != old.config.workers or config.loop != old.config.loop:
        if warn:
            log.warning("reload: server.workers and server.loop take effect at a restart")
        config.workers, config.loop = old.config.workers, old.config.loop
    if config.metrics != old.config.metrics:
        if warn:
            log.warning("reload: [metrics] takes effect at a restart")
        # The listener, the multiprocess directory and the counting stay.
        config.metrics = old.config.metrics
    if config.pid_file != old.config.pid_file:
        # The running daemon's file stays where it is (bonzo reload and
        # bonzo stop find it there).
        if warn:
            log.warning("reload: server.pid_file takes effect at a restart")
        config.pid_file = old.config.pid_file
    if config.logging != old.config.logging:
        # Logging is set up once per process, before the workers fork.
        if warn:
            log.warning("reload: [logging] takes effect at a restart")
        config.logging = old.config.logging
    # The system's CA store, read once per process for the delivery's
    # "verify" TLS policy, is read again (updated ca-certificates).
    reload_system_trust()
    # More sessions or deliveries may need more open files: the limit is
    # raised in this process (each worker its own; the supervisor's for
    # the workers it starts later), said once.
    _raise_descriptor_limit(
        config.settings.max_connections,
        _metrics_connections(config),
        new.plugins.open_files(),
        quiet=not warn,
    )
    if warn:
        # Warned, not refused: an expired certificate is usually a renewal
        # that has not happened yet (or is minutes away), and refusing the
        # reload (or, at start-up, refusing to start) would take the other
        # changes, or all mail, down with it while clients that do not check
        # the certificate (most MTAs) still deliver.
        # Every warning a start gives (certificates, a configuration where
        # every recipient is refused, ...): a reload is when a mistake in the
        # file comes in.
        for warning in new.warnings():
            log.warning("reload: %s", warning)
    return new


def _files_digest(config: Any) -> bytes:
    """A digest of the configuration file and the listeners' certificate and
    key files as they are now (an unreadable one counts as its error)."""
    digest = hashlib.sha256()
    paths = [] if config.source == "<default>" else [config.source]
    for listener in config.listeners:
        for pair in listener.tls_files.values():
            paths += [pair.cert, pair.key]
    for path in paths:
        digest.update(os.fsencode(path) + b"\0")
        try:
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        except OSError as exc:
            digest.update(f"error {exc.errno}".encode())
    return digest.digest()


def _configure_shared_again(app: Any) -> None:
    """After a reload that did not replace ``app``: its shared plugins (see
    :meth:`~bonzo.app.MailApp.configure_shared_again`) may hold the new
    configuration's values; they get the running one's back."""
    try:
        app.configure_shared_again()
    except Exception as exc:
        log.error("reload: configuring the shared plugins again failed: %s", exc)


#: Exit status of a worker whose plugins failed to start: the supervisor
#: stops the server instead of restarting it (it would only fail again).
_STARTUP_FAILED = 3

#: The signals a worker sends its supervisor after a reload: it runs the new
#: configuration, or it refused it and kept the previous one. Real-time
#: signals queue (two workers' reports are two signals) and carry the
#: sender's pid. ``None`` where the platform has none: no reports.
_RELOAD_REPORTS: tuple[int, int] | None = (
    (signal.SIGRTMIN, signal.SIGRTMIN + 1) if hasattr(signal, "SIGRTMIN") else None
)

#: The supervisor's "reload" request to its workers. Not SIGHUP, which a
#: worker then takes as sent by someone else (``kill -HUP`` of one worker's
#: pid) and passes to the supervisor, so that every worker reloads, not that
#: one alone. SIGHUP where the platform has no real-time signals.
_RELOAD_REQUEST: int = signal.SIGRTMIN + 2 if _RELOAD_REPORTS is not None else signal.SIGHUP

#: How long the supervisor waits for every worker's report on a reload
#: before it passes another SIGHUP on (a worker that never reports must not
#: stop reloads for good).
_RELOAD_REPORT_LIMIT = 60.0

#: Logged when SIGHUP arrives before the server is ready to reload.
_SIGHUP_IGNORED = "SIGHUP: not serving yet, nothing to reload; ignored"

#: How often a worker checks that its supervisor is still its parent: the
#: fallback where the kernel cannot signal it (no ``PR_SET_PDEATHSIG``).
_SUPERVISOR_CHECK_INTERVAL = 1.0


def _log_sighup(*args: Any) -> None:
    log.warning(_SIGHUP_IGNORED)


def _run_worker(
    app: Any,
    sockets: list[Any],
    supervisor: int | None = None,
    mask: set[int | signal.Signals] | None = None,
    metrics_sockets: list[Any] | None = None,
    slot: int | None = None,
) -> int:
    """Serve until a stop signal; return the exit status.

    The first SIGTERM (or SIGINT) stops gracefully, a second one forces the
    stop (:meth:`MailApp.force_stop`); SIGHUP reloads the configuration
    (and, in a worker, reports to the supervisor whether it took it). A worker
    forked by the supervisor gets its pid as ``supervisor`` and the signal
    mask to restore once its handlers are in place as ``mask`` (the
    supervisor forks with these signals blocked). Such a worker ignores
    SIGINT, which Ctrl-C sends to the whole process group, and takes the
    supervisor's requests as their own signals: SIGUSR2 "stop gracefully"
    (under systemd's default ``KillMode=control-group`` a worker gets
    systemd's SIGTERM *and* the supervisor's request for the same stop, in
    either order: only a second SIGTERM of its own forces the stop),
    SIGUSR1 "force the stop" and :data:`_RELOAD_REQUEST` "reload"; a SIGHUP
    of its own it passes to the supervisor, which reloads every worker.
    It stops when its supervisor is gone.

    With ``[metrics]`` on, the worker counts (:mod:`bonzo.metrics`); the
    one given ``metrics_sockets`` also answers the metrics and health
    requests on them. ``slot`` is the worker's number, its place in the
    supervisor's :class:`~bonzo.server.WorkerShare` (``app.share``)."""

    current = app  # the application serving new sessions
    retiring: list[Any] = []  # the ones a reload replaced, ending their sessions

    async def run() -> int:
        nonlocal current
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        requests = 0
        signalled = 0  # this process's own stop signals (not the supervisor's requests)
        forced = False
        stop_begun = False
        reloading = False
        reload_task: asyncio.Future[None] | None = None  # the reload under way
        serving = False  # app started: a SIGHUP before reloads once it is
        pending = False  # a SIGHUP came while starting, or while reloading

        counter: Any = None  # the process's Metrics, once metrics are on
        http: Any = None  # its MetricsServer, in the worker that answers scrapes

        def report(accepted: bool) -> None:
            # Tells the supervisor which configuration a worker it starts
            # later should run (see _supervise).
            if supervisor is None or _RELOAD_REPORTS is None or requests:
                return
            try:
                os.kill(supervisor, _RELOAD_REPORTS[0 if accepted else 1])
            except ProcessLookupError:  # pragma: no cover - gone: this worker stops
                pass

        async def reload() -> None:
            nonlocal reloading, pending
            old = current
            try:
                await replace(old)
            except Exception:  # a bug: logged here, not as an unretrieved task exception
                log.exception("reload failed")
            finally:
                reloading = False
                # Reported once the flag is down: a SIGHUP the supervisor
                # passes on after every report finds no reload under way.
                report(current is not old)
            if pending:
                # A SIGHUP came meanwhile: the file may have changed since
                # this reload read it.
                pending = False
                on_reload()

        async def replace(old: Any) -> None:
            nonlocal current
            new = _reloaded_app(old, warn=supervisor is None)
            if new is None or requests:
                _configure_shared_again(old)
                return
            old.release_sockets()
            try:
                await new.start()
            except Exception as exc:
                log.error("reload: the new configuration failed to start: %s; "
                          "still running the previous one", exc)  # fmt: skip
                old.reattach_sockets()
                _configure_shared_again(old)
                return
            current = new
            retiring.append(old)
            if counter is not None:
                counter.install(new.plugins)  # time the new plugins' hooks
            sessions = sum(len(s.connections) for s in old.servers)
            log.info(
                "reloaded %s: new sessions on the new configuration (plugins in order: %s); "
                "%d session(s) finish on the previous one",
                new.config.source,
                ", ".join(new.config.plugins.enabled) or "none",
                sessions,
            )
            await new.plugins.call_observers("bonzo_reload", new)
            background(retire(old))

        async def retire(old: Any) -> None:
            try:
                await old.retire()
            except Exception:
                log.exception("the previous configuration failed to stop")
                return
            finally:
                if old in retiring:
                    retiring.remove(old)
            log.info("the previous configuration has stopped: its sessions ended")

        tasks: set[asyncio.Future[None]] = set()

        def background(coro: Any) -> asyncio.Future[None]:
            # A reference until done: the loop keeps only a weak one.
            task: asyncio.Future[None] = asyncio.ensure_future(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return task

        def on_reload() -> None:
            nonlocal reloading, pending, reload_task
            if requests or stop_begun:
                return
            if not serving:
                # Still starting: reloading the configuration that is not
                # serving yet would race its start for the sockets.
                log.info("SIGHUP: still starting; reloading once serving")
                pending = True
                return
            if reloading:
                # One at a time (two at once raced for the sockets); the
                # file may have changed since this one read it: once more
                # after it, however many came.
                if not pending:
                    log.info("SIGHUP: a reload is under way; reloading again once it ends")
                pending = True
                return
            # Set here, not when the task first runs: a second SIGHUP
            # handled in this same loop iteration must see it.
            reloading = True
            log.info("SIGHUP: reloading the configuration")
            reload_task = background(reload())

        first = ""  # why the stop began

        def request_stop(why: str) -> None:
            nonlocal requests, forced, first
            requests += 1
            if requests == 1:
                first = why
                stopping.set()
            elif requests == 2:
                log.warning("%s: forcing the stop", why)
                forced = True
                loop.call_later(FORCED_STOP_LIMIT, give_up)
                if stop_begun:
                    for a in (current, *retiring):
                        a.force_stop()

        def give_up() -> None:
            # A forced stop ends every plugin call within CANCEL_GRACE; what
            # still runs now would keep the process up for ever.
            left = sum(len(s.connections) for a in (current, *retiring) for s in a.servers)
            log.error(
                "the forced stop is not over after %gs (%d session(s) left): exiting now",
                FORCED_STOP_LIMIT,
                left,
            )
            if supervisor is None:  # else the supervisor owns these
                app.remove_unix_sockets()
                _remove_pid_file(app.config.pid_file, os.getpid())
            _exit_now(0)

        def supervisor_gone() -> bool:
            if supervisor is None or os.getppid() == supervisor:
                return False
            if requests == 0:
                log.warning("the supervisor (pid %d) is gone: stopping", supervisor)
                # What the supervisor held for the whole server a new
                # `bonzo serve` needs at once, not when this worker's last
                # message is done: the pid file's lock (each worker shares
                # it) and the metrics port. The SMTP listeners close as the
                # stop begins.
                _release_pid_lock()
                if http is not None:
                    http.stop_listening()
                for sock in metrics_sockets or ():
                    sock.close()
                request_stop("supervisor gone")
            return True

        def on_stop_signal(signum: int) -> None:
            nonlocal signalled
            # The kernel's SIGTERM when the supervisor died (PR_SET_PDEATHSIG).
            if requests == 0 and supervisor_gone():
                return
            name = signal.Signals(signum).name
            signalled += 1
            if signalled == 1 and requests:
                # The supervisor's request (or its departure) came first:
                # systemd signals the whole group, and the kernel hands a
                # worker that has both pending the lower-numbered SIGUSR2
                # first. The same stop.
                gone = first == "supervisor gone"
                log.info(
                    "%s: already stopping (%s)",
                    name,
                    "the supervisor is gone" if gone else "the supervisor asked first",
                )
                return
            request_stop(f"second {name}" if requests else name)

        def on_graceful_request() -> None:
            if requests == 0:
                request_stop("the supervisor's stop")

        def on_force_request() -> None:
            while not forced:
                request_stop("the supervisor's second stop")

        def pass_sighup(supervisor: int) -> None:
            # Reloaded alone, this worker would serve another configuration
            # (other certificates) than the others, and nothing would say so.
            log.info(
                "SIGHUP sent to this worker (pid %d): passed to the supervisor (pid %d), "
                "which reloads every worker",
                os.getpid(),
                supervisor,
            )
            try:
                os.kill(supervisor, signal.SIGHUP)
            except ProcessLookupError:  # pragma: no cover - gone: this worker stops
                pass

        handled: list[int] = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        loop.add_signal_handler(signal.SIGTERM, on_stop_signal, signal.SIGTERM)
        if supervisor is None:
            loop.add_signal_handler(signal.SIGINT, on_stop_signal, signal.SIGINT)
            loop.add_signal_handler(signal.SIGHUP, on_reload)
        else:
            loop.add_signal_handler(signal.SIGINT, lambda: None)
            loop.add_signal_handler(signal.SIGUSR2, on_graceful_request)
            loop.add_signal_handler(signal.SIGUSR1, on_force_request)
            handled += [signal.SIGUSR2, signal.SIGUSR1]
            if _RELOAD_REQUEST == signal.SIGHUP:
                loop.add_signal_handler(signal.SIGHUP, on_reload)
            else:
                loop.add_signal_handler(_RELOAD_REQUEST, on_reload)
                loop.add_signal_handler(signal.SIGHUP, pass_sighup, supervisor)
                handled.append(_RELOAD_REQUEST)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        watch = None
        if supervisor is not None:
            watch = asyncio.ensure_future(_watch_supervisor(supervisor, supervisor_gone))
        if app.config.metrics.enabled:
            from .metrics import Metrics, MetricsServer

            counter = Metrics().install(app.plugins)
        try:
            try:
                await app.start()
            except Exception as exc:
                # One line for the operator (the plugin and its error); the
                # traceback, for the plugin's author, at debug level.
                log.error("startup failed: %s", exc)
                log.debug("startup failure", exc_info=True)
                return _STARTUP_FAILED
            if counter is not None:
                counter.start_flushing()
                if metrics_sockets and not requests:
                    m = app.config.metrics
                    http = MetricsServer(counter, m.path, m.max_connections)
                    http.add_sockets(metrics_sockets)
            if app.share is not None and slot is not None:
                app.share.start(slot)  # the other workers may leave connections to it now
            log.info("ready (pid %d)", os.getpid())
            startup_done()
            serving = True
            if pending:
                pending = False
                on_reload()
            sd_notify(f"READY=1\nMAINPID={supervisor or os.getpid()}")
            await stopping.wait()
            sd_notify("STOPPING=1")
            log.info("stopping: no new connections; finishing messages in flight")
            if http is not None:
                http.stopping = True
            stop_begun = True
            if app.share is not None:
                app.share.stop()  # the other workers take every new connection
            if reload_task is not None and not reload_task.done():
                # Its new configuration may start serving yet: stopped with
                # the others below, not left running (its plugins would
                # never get bonzo_shutdown). Bounded by the plugins' limits.
                log.info("stopping: the reload under way ends first")
                await asyncio.wait([reload_task])
            apps = [current, *retiring]
            stopped = asyncio.ensure_future(asyncio.gather(*(a.stop() for a in apps)))
            if forced:  # forced before there was anything to force
                for a in apps:
                    a.force_stop()
            await stopped
            log.info("stopped")
            return 0
        finally:
            if watch is not None:
                watch.cancel()
            if counter is not None:
                counter.uninstall()
            if http is not None:
                await http.close()
            # A worker keeps ignoring Ctrl-C's SIGINT: the supervisor stops it.
            _release_signals(loop, handled, ending=(signal.SIGTERM,) if supervisor else None)

    if app.config.loop == "uvloop":
        import uvloop

        return int(uvloop.run(run()))
    return asyncio.run(run())


def _release_signals(
    loop: asyncio.AbstractEventLoop,
    signals: list[int],
    ending: tuple[int, ...] | None = None,
) -> None:
    """Take ``signals`` back from ``loop`` while it is still open, for a
    process that has stopped serving and is about to exit.

    asyncio's own cleanup closes the loop's wakeup pipe *before* it removes
    the handlers, so a signal in between (the supervisor's stop request to
    a worker that is exiting anyway) was reported on stderr as an "Exception
    ignored" traceback. Released here, the ``ending`` signals (SIGTERM and
    SIGINT unless given) end the process as they would any other: the stop
    is done, and a teardown that hangs can still be ended. The others
    (SIGHUP, the supervisor's requests) are ignored."""
    if ending is None:
        ending = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_DFL if sig in ending else signal.SIG_IGN)


async def _watch_supervisor(
    supervisor: int, gone: Callable[[], object], interval: float = _SUPERVISOR_CHECK_INTERVAL
) -> None:
    """Call ``gone()`` once this process's parent is no longer ``supervisor``
    (it died and the process was re-parented), checking every ``interval``
    seconds."""
    while os.getppid() == supervisor:
        await asyncio.sleep(interval)
    gone()


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a function that makes the kernel send SIGTERM to the calling
    process when its parent dies (``prctl(PR_SET_PDEATHSIG)``), resolved
    before forking for a worker to call right after; ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):  # pragma: no cover - Linux CI
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - no prctl in libc
        return None
    pr_set_pdeathsig = 1

    def set_parent_death_signal() -> None:
        zero = ctypes.c_ulong(0)
        sig = ctypes.c_ulong(signal.SIGTERM)
        if prctl(ctypes.c_int(pr_set_pdeathsig), sig, zero, zero, zero) != 0:  # pragma: no cover
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))

    return set_parent_death_signal


def _supervise(
    app: Any, sockets: list[Any], workers: int, metrics_sockets: list[Any] | None = None
) -> int:
    """Fork ``workers`` processes that share the listening sockets; restart
    any that dies unexpectedly; pass SIGTERM/SIGINT on to them (the first as
    SIGUSR2, a graceful stop; the second as SIGUSR1, to force it); on SIGHUP
    check the configuration and ask every worker to reload
    (:data:`_RELOAD_REQUEST`). The workers report
    whether they took the reload (:data:`_RELOAD_REPORTS`), so that a worker
    started later runs what they run.

    The supervisor keeps SIGTERM, SIGINT, SIGHUP, SIGCHLD and the reports
    blocked and takes them one at a time (:func:`signal.sigwaitinfo`, which
    names a report's sender): a signal is never
    handled in the middle of a fork, so every worker is recorded before a
    stop can be passed on, and none is started once the stop began.

    Worker 0 (and the worker that replaces it) answers the metrics requests
    on ``metrics_sockets``, which stay bound here: a restarted worker 0
    takes them over, and a scrape meanwhile waits in the backlog. The
    supervisor has no event loop to serve them (it waits in
    :func:`signal.sigwait`), and a thread here would be forked with every
    restarted worker."""
    supervisor = os.getpid()
    die_with_parent = _parent_death_signal()
    from .server import WorkerShare

    share = app.share = WorkerShare(workers)
    children: dict[int, int] = {}
    stops = 0  # stop requests so far: 1 is graceful, 2 forces the stop
    signals = 0  # stop signals received
    restarts: list[float] = []
    status = 0
    waited: set[int] = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
    if _RELOAD_REPORTS is not None:
        waited |= set(_RELOAD_REPORTS)
    # A SIGCHLD that is caught (rather than ignored by default) is sure to
    # stay pending while blocked, until sigwait() takes it.
    signal.signal(signal.SIGCHLD, _ignore)
    # The requests to workers too, so that a worker inherits them blocked
    # and takes none before its handlers are in place (their default action
    # would kill it).
    mask = signal.pthread_sigmask(
        signal.SIG_BLOCK, waited | {signal.SIGUSR1, signal.SIGUSR2, _RELOAD_REQUEST}
    )

    # What each reloaded configuration replaced: a worker that cannot start
    # on one (its plugins' startup failed, as it did in the workers at the
    # reload, which kept the previous one) is started on what it replaced.
    # One level: the configuration before the last reload.
    replaced: dict[Any, Any] = {}
    spawned_with: dict[int, Any] = {}
    # The workers whose report on the last reload has not come yet, and
    # those that refused it.
    reporting: set[int] = set()
    refused: list[int] = []
    reload_sent = 0.0  # when the last reload was passed on to the workers
    # The configuration the last reload checked, and _files_digest of it then.
    checked: tuple[Any, bytes] | None = None
    hup_pending = False  # a SIGHUP came while the workers were reloading

    def spawn(slot: int) -> None:
        spawned_with[slot] = app
        pid = os.fork()
        if pid == 0:  # the worker, with the supervisor's signals still blocked
            code = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                if die_with_parent is not None:
                    die_with_parent()
                if os.getppid() != supervisor:  # it died before prctl() above
                    os._exit(0)
                mine = metrics_sockets if slot == 0 else None
                for s in metrics_sockets or ():
                    if mine is None:
                        s.close()
                code = _run_worker(app, sockets, supervisor, mask, mine, slot)
            except BaseException:
                # os._exit() below drops any exception unseen: say why this
                # worker ends (the supervisor only sees its status).
                log.critical("worker %d (pid %d) failed", slot, os.getpid(), exc_info=True)
            finally:
                os._exit(code)
        children[pid] = slot

    forced_at: float | None = None  # when the stop was forced

    def stop(signum: int | None = None) -> None:
        nonlocal stops, forced_at
        stops += 1
        name = signal.Signals(signum).name if signum is not None else ""
        if stops == 1:
            if name:
                log.info("%s: stopping the workers gracefully", name)
            # No worker will be started again: let the port go as soon as
            # the workers close theirs.
            for s in sockets:
                s.close()
        elif stops == 2:
            log.warning("%s: forcing the stop", f"second {name}" if signals > 1 else name)
            forced_at = time.monotonic()
        else:
            log.info("%s: the stop is already forced", name)
            return
        request = signal.SIGUSR2 if stops == 1 else signal.SIGUSR1
        for pid in children:
            try:
                os.kill(pid, request)
            except ProcessLookupError:  # pragma: no cover - exited, not yet reaped
                pass

    def reap() -> None:
        nonlocal status, app
        while children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # pragma: no cover - reaped elsewhere
                children.clear()
                return
            if pid == 0:
                return
            if pid not in children:  # pragma: no cover - not a worker
                continue
            slot = children.pop(pid)
            share.gone(slot)
            reporting.discard(slot)
            code = os.waitstatus_to_exitcode(wait_status)
            if metrics_sockets:
                from .metrics import mark_process_dead

                # Its open connections no longer count.
                mark_process_dead(pid)
            if stops:
                continue
            if code == _STARTUP_FAILED:
                older = replaced.pop(spawned_with.get(slot), None)
                if older is not None:
                    log.error(
                        "worker %d (pid %d) failed to start on the reloaded configuration; "
                        "starting it on the previous one, which the workers kept",
                        slot,
                        pid,
                    )
                    app = older
                    spawn(slot)
                    continue
                log.error("worker %d (pid %d) failed to start; stopping", slot, pid)
                stop()
                status = 1
                continue
            log.error("worker %d (pid %d) exited with status %d; restarting", slot, pid, code)
            now = time.monotonic()
            restarts[:] = [t for t in restarts if now - t < 60] + [now]
            if len(restarts) > 10 * workers:
                log.error("workers keep dying (%d restarts in a minute); giving up", len(restarts))
                stop()
                status = 1
                continue
            spawn(slot)

    def reported(pid: int, accepted: bool) -> None:
        nonlocal app, checked
        slot = children.get(pid)
        if stops or slot not in reporting:
            return  # not a worker, or not a report on the last reload
        reporting.discard(slot)
        if not accepted:
            refused.append(slot)
            if app in replaced:
                # The workers that refused it run the previous configuration:
                # so will those started from now on.
                log.warning(
                    "worker %d (pid %d) refused the reloaded configuration; workers "
                    "started from now on run the previous one",
                    slot,
                    pid,
                )
                app = replaced[app]
        if not reporting and refused and len(refused) < len(children):
            log.warning(
                "after the reload, worker(s) %s run the previous configuration and the "
                "others the new one: fix the new configuration's plugins and reload again",
                ", ".join(str(n) for n in sorted(refused)),
            )
        elif not reporting and refused:
            # Each worker's own line says why; this one says what came of it.
            log.error(
                "reload: every worker refused the new configuration; all still run the previous one"
            )
        if not reporting and checked is not None and not refused:
            # Each worker read the files again after the check here: changed
            # meanwhile (a renewal copying them), workers may run different
            # versions, each having said "reloaded".
            config, digest = checked
            checked = None
            if _files_digest(config) != digest:
                log.warning(
                    "reload: %s or its certificate files changed while the workers read them "
                    "again: workers may run different versions; reload again once the files "
                    "are complete",
                    config.source,
                )

    def reload_workers() -> None:
        nonlocal app, reload_sent, checked
        log.info("SIGHUP: checking the configuration before the workers reload it")
        new = _reloaded_app(app)
        if new is None:
            return
        # What was checked: compared once every worker has read it again.
        checked = (new.config, _files_digest(new.config))
        replaced.clear()
        replaced[new] = app
        app = new  # workers started from now on run it, unless one refuses it
        refused.clear()
        reporting.clear()
        if _RELOAD_REPORTS is not None:
            reporting.update(children.values())
        reload_sent = time.monotonic()
        for pid in children:
            try:
                os.kill(pid, _RELOAD_REQUEST)
            except ProcessLookupError:  # pragma: no cover - exited, not yet reaped
                pass

    for slot in range(workers):
        spawn(slot)
    # Each worker says why it could not start (to standard error too, until
    # it is ready); the supervisor's own start is over.
    startup_done()
    while children:
        if forced_at is not None and hasattr(signal, "sigtimedwait"):
            # A worker ends a forced stop within FORCED_STOP_LIMIT by itself,
            # unless it cannot run at all (stopped, or stuck outside Python):
            # then it is killed here, and named.
            left = forced_at + FORCED_STOP_LIMIT + 1.0 - time.monotonic()
            got = signal.sigtimedwait(waited, max(left, 0.0))
            if got is None:
                for pid, slot in children.items():
                    log.error(
                        "worker %d (pid %d) has not stopped %gs after the forced stop: killed",
                        slot,
                        pid,
                        FORCED_STOP_LIMIT + 1.0,
                    )
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:  # pragma: no cover - exited, not yet reaped
                        pass
                forced_at = None  # killed: now they are reaped as ever
                continue
            signum, sender = got.si_signo, got.si_pid
        elif _RELOAD_REPORTS is None:
            signum, sender = signal.sigwait(waited), 0
        elif hup_pending and reporting:
            # A SIGHUP waits for the workers' reports, but no longer than the
            # limit: one that never reports must not hold the reload asked.
            left = reload_sent + _RELOAD_REPORT_LIMIT - time.monotonic()
            got = signal.sigtimedwait(waited, max(left, 0.0))
            if got is None:
                log.warning(
                    "worker(s) %s have not reported on the reload in %gs; reloading again as asked",
                    ", ".join(str(n) for n in sorted(reporting)),
                    _RELOAD_REPORT_LIMIT,
                )
                hup_pending = False
                reload_workers()
                continue
            signum, sender = got.si_signo, got.si_pid
        else:
            info = signal.sigwaitinfo(waited)
            signum, sender = info.si_signo, info.si_pid
        if signum == signal.SIGCHLD:
            reap()
        elif _RELOAD_REPORTS is not None and signum in _RELOAD_REPORTS:
            reported(sender, signum == _RELOAD_REPORTS[0])
        elif signum == signal.SIGHUP:
            if stops:
                continue
            if reporting and time.monotonic() - reload_sent < _RELOAD_REPORT_LIMIT:
                # Not passed on while a worker still reloads: its report on
                # the last reload would count for this one, and workers
                # started later would run a configuration the others never
                # took. Once they have reported, one more reload (the file
                # may have changed since), however many came.
                if not hup_pending:
                    log.info(
                        "SIGHUP: the workers are still reloading (worker(s) %s have not "
                        "reported); reloading again once they have",
                        ", ".join(str(n) for n in sorted(reporting)),
                    )
                hup_pending = True
                continue
            hup_pending = False
            reload_workers()
        else:
            signals += 1
            stop(signum)
        if hup_pending and not reporting and not stops:
            hup_pending = False
            reload_workers()
    # The signals stay blocked: the process exits now, with this status, even
    # if one more SIGTERM arrives.
    for s in sockets:
        s.close()
    # The last line of a stop: the workers' own end before it.
    log.info("every worker has ended: the supervisor exits with status %d", status)
    return status


def _ignore(signum: int, frame: Any) -> None:
    """A signal handler that does nothing (see :func:`_supervise`)."""

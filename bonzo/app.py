"""A configured mail server: plugins, settings and listeners together.

:class:`MailApp` turns a :class:`~bonzo.config.Config` into a running
server: it finds and registers the enabled plugins in the configured order
(entry points of the ``bonzo.plugins`` group, or dotted paths), hands each its
``[plugins.<name>]`` table, runs their startup hooks, and serves
:class:`~bonzo.server.SMTPServer` per listener, all deciding through the
same :class:`~bonzo.hooks.PluginSet`.
"""

from __future__ import annotations

import asyncio
import difflib
import errno
import importlib
import importlib.machinery
import inspect
import logging
import os
import socket
import stat
import sys
import sysconfig
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, ListenerConfig, load_config
from .dns import Resolver
from .hooks import PluginError, PluginSet, offered_settings, passes_through
from .hookspecs import DECISION_HOOKS
from .proxy import whole_families
from .server import ACCEPT_BATCH, ConnectionCount, SMTPServer, WorkerShare
from .settings import ListenerSettings, SettingError
from .store import Store, open_store
from .tls import certificate_warnings, key_file_warnings

__all__ = ["MailApp", "InstalledPlugin", "installed_plugins", "resolve_plugin", "ENTRY_POINT_GROUP"]

#: The entry-point group where plugins (bundled and third-party) are found.
ENTRY_POINT_GROUP = "bonzo.plugins"

log = logging.getLogger("bonzo.app")


def raised_at(exc: BaseException) -> str:
    """`` (at FILE:LINE)``: where in a plugin's code ``exc`` was raised, the
    innermost frame outside Python's own library ("" if none), so that
    the author of a plugin whose import or configuration failed finds the
    line without a traceback."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<frozen ", _STDLIB))
    ]
    if not frames or frames[-1].filename.startswith(_OWN):
        return ""  # Bonzo's own code (the call of the hook): nothing to point at
    return f" (at {frames[-1].filename}:{frames[-1].lineno})"


_OWN = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: Python's own library: a plugin's call into it failed at the plugin's line.
_STDLIB = os.path.join(sysconfig.get_paths()["stdlib"], "")


@dataclass
class InstalledPlugin:
    """A plugin found through the ``bonzo.plugins`` entry-point group.
    ``clashes`` holds the entry points of the same name that other installed
    distributions declare: such a name is ambiguous, and enabling it is a
    configuration error (:meth:`ambiguity`)."""

    name: str
    value: str
    distribution: str
    version: str
    entry_point: Any = None
    clashes: list[InstalledPlugin] = field(default_factory=list)

    @property
    def origin(self) -> str:
        """Where it comes from: ``distribution version (entry point)``."""
        return f"{self.distribution} {self.version} ({self.value})"

    def ambiguity(self) -> str | None:
        """Why enabling this name is refused (it is declared by more than
        one distribution, each named), or ``None`` if it is not."""
        if not self.clashes:
            return None
        each = [self, *self.clashes]
        # The example is Bonzo's own plugin where one of them is: the other
        # may be a package that took its name by mistake (or on purpose).
        example = next((p for p in each if p.distribution.lower() == "bonzo"), self)
        return (
            f"plugin {self.name!r} is declared by more than one installed distribution: "
            f"{', '.join(p.origin for p in each[:-1])} and {each[-1].origin}; enable the one "
            f'you mean by its dotted path (e.g. "{example.value}", with its table '
            f'[plugins."{example.value}"]), or uninstall the other'
        )


def installed_plugins() -> dict[str, InstalledPlugin]:
    """Every plugin installed in the ``bonzo.plugins`` group, by name. A name
    that more than one distribution declares is kept with every one of them
    (:attr:`InstalledPlugin.clashes`), never silently replaced."""
    found: dict[str, InstalledPlugin] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        plugin = InstalledPlugin(
            ep.name,
            ep.value,
            dist.metadata["Name"] if dist is not None else "?",
            dist.version if dist is not None else "?",
            ep,
        )
        first = found.setdefault(ep.name, plugin)
        if first is not plugin and (first.distribution, first.value) != (
            plugin.distribution,
            plugin.value,
        ):
            first.clashes.append(plugin)
    return found


def _shadowed_file(module_name: str, imported: str | None, paths: Sequence[str]) -> str:
    """``; <file> is not the one imported ...`` when a file of that module
    name in ``paths`` (``[plugins] paths``) lost to another module of the
    name (Python's own ``queue``, ``email``: they come first); "" otherwise."""
    top = module_name.split(".")[0]
    for path in paths:
        for candidate in (os.path.join(path, f"{top}.py"), os.path.join(path, top)):
            if os.path.exists(candidate) and not (
                imported and os.path.abspath(imported).startswith(os.path.abspath(candidate))
            ):
                return (
                    f"; {candidate} is not the one imported: another module named {top!r} "
                    "comes first (rename the file)"
                )
    return ""


def shadowing_modules(paths: Sequence[str]) -> list[str]:
    """Warnings for the modules in ``paths`` (``name.py`` or a package
    directory) named like a module found elsewhere — Python's own or an
    installed one: put first on the import path, a local ``dkim.py`` is
    what the bundled ``dkim`` plugin imports as dkimpy, and a local
    ``queue.py`` is never imported (the standard library's comes first)."""
    out = []
    others = [p for p in sys.path if p and p not in paths and os.path.abspath(p) not in paths]
    for i, path in enumerate(paths):
        try:
            entries = sorted(os.listdir(path))
        except OSError:
            continue
        for entry in entries:
            full = os.path.join(path, entry)
            if entry.endswith(".py"):
                top = entry[:-3]
            elif os.path.isfile(os.path.join(full, "__init__.py")):
                top = entry
            else:
                continue
            if not top.isidentifier():
                continue
            if top in sys.builtin_module_names:
                where = "a module built into Python"
            else:
                try:
                    spec = importlib.machinery.PathFinder.find_spec(top, others)
                except (ImportError, ValueError):
                    spec = None
                if spec is None or not spec.origin:
                    continue
                mine = full if entry.endswith(".py") else os.path.join(full, "__init__.py")
                if os.path.realpath(spec.origin) == os.path.realpath(mine):
                    continue  # the same file, found another way (an editable install)
                where = spec.origin
            out.append(
                f"plugins.paths[{i}]: {full} is named like the module {top!r} ({where}): "
                "whichever comes first on the import path is the one every import of "
                f"{top!r} gets, Bonzo's plugins' too; rename the file"
            )
    return out


def add_plugin_paths(config: Config) -> None:
    """Put the directories of ``[plugins] paths`` at the front of the import
    path (each once), where the plugins enabled by dotted path are found."""
    for path in config.plugins.paths:
        if path not in sys.path:
            sys.path.insert(0, path)


def _instantiate(obj: Any) -> Any:
    # A class is instantiated once per configuration; a module or object is
    # used as is, so it is the same in every configuration (see _RUNNING).
    return obj() if inspect.isclass(obj) else obj


#: The plugin objects of the started applications of this process, by
#: ``id()``: the object (kept alive, so that its id stays its own) and how
#: many started applications have it. A plugin enabled as a module or an
#: instance is one object in the configuration a reload retires and in the
#: new one: it is started once, when the first starts, and shut down once,
#: when the last has stopped -- never under the feet of the other.
_RUNNING: dict[int, tuple[object, int]] = {}

#: The least ``max_message_size`` not warned about: RFC 5321 4.5.3.1.7's
#: minimum maximum size of a message's content, 64K octets.
MIN_MESSAGE_SIZE = 65536


def _small_size(key: str, size: int) -> str:
    return (
        f"{key} = {size}: smaller than the 64K octets every server must take "
        "(RFC 5321 4.5.3.1.7); most mail will be refused with 552"
    )


#: The text of the ``421 4.3.2`` that ends the sessions a reload's previous
#: configuration still has ``shutdown_grace`` seconds later: the server
#: goes on, so the client is told to connect again, not that it stops.
RETIRED_TEXT = "Configuration reloaded, please connect again"

#: The same for the stores (``app.store``) of the started applications: a
#: reload that leaves ``[redis]`` as it was shares the running store, which
#: is closed when the last application using it stops.
_STORES: dict[int, tuple[object, int]] = {}


def _hold(plugin: object, table: dict[int, tuple[object, int]] = _RUNNING) -> None:
    _, count = table.get(id(plugin), (plugin, 0))
    table[id(plugin)] = (plugin, count + 1)


def _release(plugin: object, table: dict[int, tuple[object, int]] = _RUNNING) -> bool:
    """Drop one application's hold on ``plugin``; True if it was the last."""
    _, count = table[id(plugin)]
    if count > 1:
        table[id(plugin)] = (plugin, count - 1)
        return False
    del table[id(plugin)]
    return True


def resolve_plugin(name: str, installed: dict[str, InstalledPlugin] | None = None) -> Any:
    """Return the plugin object for ``name``: an installed entry point, or a
    dotted path (``package.module`` or ``package.module:attribute``). Raises
    :class:`LookupError` with a helpful message."""
    return _resolve(name, installed)[0]


def _resolve(
    name: str, installed: dict[str, InstalledPlugin] | None, paths: Sequence[str] = ()
) -> tuple[Any, bool]:
    """:func:`resolve_plugin`'s object, and whether it is shared: a module
    or an object used as is (the same in every configuration), not an
    instance made for this one. ``paths``, the configuration's ``[plugins]
    paths``, are named in errors that concern them."""
    installed = installed_plugins() if installed is None else installed
    if name in installed:
        ambiguity = installed[name].ambiguity()
        if ambiguity is not None:
            raise LookupError(ambiguity)
        ep = installed[name].entry_point
        try:
            loaded = ep.load()
            return _instantiate(loaded), not inspect.isclass(loaded)
        except BaseException as exc:  # the plugin's code: its fault (see passes_through)
            if passes_through(exc):
                raise
            log.debug("plugin %r (%s) failed to load", name, ep.value, exc_info=exc)
            raise LookupError(
                f"plugin {name!r} ({ep.value}) failed to load: {exc!r}{raised_at(exc)}"
            ) from exc
    if "." in name or ":" in name:
        module_name, _, attr = name.partition(":")
        if module_name.endswith(".py") or "/" in module_name:
            # "./rules.py:Policy": a file name where a module's is wanted.
            stem = os.path.splitext(os.path.basename(module_name))[0]
            raise LookupError(
                f"plugin {name!r}: {module_name} is a file name; name the module "
                f'("{stem}:{attr or "Plugin"}") and put its directory in plugins.paths'
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            log.debug("plugin %r: importing %s failed", name, module_name, exc_info=exc)
            if exc.name != module_name:
                at = raised_at(exc)  # found, but it failed
            else:
                # Where it was to be found: a directory that is not there.
                missing = [p for p in paths if not os.path.isdir(p)]
                at = (
                    f" (plugins.paths has {missing[0]}, which is not a directory)"
                    if missing
                    else ""
                )
            raise LookupError(f"plugin {name!r}: cannot import {module_name}: {exc}{at}") from exc
        except BaseException as exc:
            if passes_through(exc):
                raise
            log.debug("plugin %r: importing %s failed", name, module_name, exc_info=exc)
            raise LookupError(
                f"plugin {name!r}: importing {module_name} failed: {exc!r}{raised_at(exc)}"
            ) from exc
        if not attr:
            return module, True
        try:
            obj = module
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            where = getattr(module, "__file__", None)
            said = f"{module_name} ({where})" if where else module_name
            hint = _shadowed_file(module_name, where, paths)
            raise LookupError(f"plugin {name!r}: {said} has no {attr!r}{hint}") from None
        try:
            return _instantiate(obj), not inspect.isclass(obj)
        except BaseException as exc:
            if passes_through(exc):
                raise
            log.debug("plugin %r: creating %s failed", name, attr, exc_info=exc)
            raise LookupError(
                f"plugin {name!r}: creating {attr} failed: {exc!r}{raised_at(exc)}"
            ) from exc
    known = ", ".join(sorted(installed)) or "none"
    close = difflib.get_close_matches(name, sorted(installed), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    # The interpreter too: a plugin pip-installed into another environment
    # (a virtualenv whose python is not the one running bonzo) is not seen.
    raise LookupError(
        f"plugin {name!r} is not installed ({hint}installed plugins: {known}; for {sys.executable})"
    )


class MailApp:
    """A mail server built from a configuration.

    :arg config: a :class:`~bonzo.config.Config` (default: the embedded one).
    :arg extra_plugins: plugin objects to run after the configured ones, as
        ``(name, object)`` pairs or bare objects (named after their class).
    :arg store: the :attr:`store` to use instead of one built from the
        ``[redis]`` table (a reload passes the running configuration's, so
        that rate-limit and greylist state survive it).

    .. attribute:: base_dir

       Directory against which plugins resolve relative paths (the config
       file's directory).

    .. attribute:: dns

       The process's :class:`~bonzo.dns.Resolver`, built from the ``[dns]``
       table: every plugin that looks something up in DNS uses this one
       (:doc:`/dns`). Its lookups raise :class:`~bonzo.dns.DNSDisabled` while
       ``[dns]`` names no nameserver.

    .. attribute:: store

       The process's shared state, a :class:`~bonzo.store.Store` built from
       the ``[redis]`` table: a :class:`~bonzo.store.RedisStore` when
       ``[redis] url`` is set (every node naming that server shares it), else
       a :class:`~bonzo.store.MemoryStore` of this process
       (:doc:`/scaling`). Rate limits and greylisting keep their state here.
       It is closed when the last started application using it stops.
    """

    def __init__(
        self,
        config: Config | None = None,
        extra_plugins: Iterable[Any] = (),
        *,
        store: Store | None = None,
    ) -> None:
        self.config = config if config is not None else load_config(None)
        self.settings = self.config.settings
        self.base_dir: Path = self.config.base_dir
        self.plugins = PluginSet(timeout=self.config.plugins.timeout)
        try:
            self.dns = Resolver(self.config.dns)
        except SettingError as exc:
            raise self.config.error(f"dns.{exc.setting}", exc.detail) from None
        # Before the plugins are configured: they take app.store then.
        self.store = store if store is not None else open_store(self.config.redis)
        self.server: SMTPServer | None = None
        #: ``bonzo serve --listen`` values that replaced the listeners (a
        #: reload applies them again).
        self.listen_override: list[str] | None = None
        #: One server per listener, once started.
        self.servers: list[SMTPServer] = []
        #: Set by the daemon's supervisor before it forks the workers (which
        #: then share the connections evenly); ``None`` in one process.
        self.share: WorkerShare | None = None
        self._bound: list[tuple[ListenerConfig, list[socket.socket]]] = []
        # The configuration a reload replaced (adopt_sockets): its servers'
        # connections count toward this one's limits.
        self._replaced: MailApp | None = None
        self._unix_paths: list[str] = []
        self._extra = list(extra_plugins)
        # The enabled plugins that are modules or objects used as is (see
        # configure_shared_again).
        self._shared: list[str] = []
        # Probable mistakes found while loading, for warnings().
        self._notes: list[str] = []
        self._started = False
        #: True once a reload replaced this configuration and it finishes
        #: what it has (:meth:`retire`).
        self.retiring = False
        # The text of the 421 its sessions get when they are ended (None:
        # the connection's default, "Server shutting down").
        self._stop_text: str | None = None
        # Set when the server stops (not for a reload's retirement), made
        # in the loop that runs the server.
        self._stop_requested: asyncio.Event | None = None
        self._stop_done: asyncio.Event | None = None
        self._stop_forced: asyncio.Event | None = None
        self._load_plugins()

    # ---------------------------------------------------------------- plugins
    def _load_plugins(self) -> None:
        config = self.config
        pc = config.plugins
        add_plugin_paths(config)
        installed = installed_plugins()
        for name in pc.enabled:
            try:
                obj, shared = _resolve(name, installed, pc.paths)
            except LookupError as exc:
                raise config.error("plugins.enabled", str(exc)) from None
            if shared:
                self._shared.append(name)
            try:
                self.plugins.register(obj, name, timeout=pc.timeouts.get(name))
            except PluginError as exc:
                raise config.error("plugins.enabled", str(exc)) from None
        for item in self._extra:
            name, obj = item if isinstance(item, tuple) else (type(item).__name__, item)
            try:
                self.plugins.register(obj, name)
            except PluginError as exc:
                raise config.error("", str(exc)) from None
        configured = {c.plugin for c in self.plugins.calls["bonzo_configure"]}
        for name in pc.tables:
            if name in pc.enabled and name not in configured:
                self._notes.append(
                    f"plugins.{name}: the table is there but the plugin takes no configuration "
                    "(it has no bonzo_configure hook): its keys are ignored"
                )
            if name not in pc.enabled:
                if name in installed:
                    self._notes.append(
                        f"plugins.{name}: the table is there but the plugin is not enabled"
                    )
                else:
                    raise config.error(
                        f"plugins.{name}",
                        "table for a plugin that is neither enabled nor installed: enable "
                        "it, or remove the table",
                    )
        self._configure()
        for name in pc.enabled:
            problem = self.plugins.declaration_problem(name)
            if problem is not None:
                raise config.error(f"plugins.{name}", problem)
        for name in pc.enabled:
            plugin = self.plugins.get(name)
            if not self.plugins.hooks_of(name) and plugin is not None:
                log.warning("plugin %r implements no hook", name)

    def _configure(self, only: Sequence[str] | None = None) -> None:
        """Run the plugins' ``bonzo_configure`` hooks (those of the plugins
        named in ``only``, if given) with their tables."""
        config = self.config
        for call in self.plugins.calls["bonzo_configure"]:
            if only is not None and call.plugin not in only:
                continue
            table = config.plugins.tables.get(call.plugin, {})
            args = (table, self)
            where = f"plugins.{call.plugin}"
            try:
                call.function(*[args[i] for i in call.indexes])
            except (ValueError, TypeError, KeyError, ConfigError) as exc:
                # For the plugin's author: the traceback (the operator's
                # line names the table; a TypeError or KeyError may be a bug).
                log.debug("plugin %r: bonzo_configure failed", call.plugin, exc_info=exc)
                if isinstance(exc, ConfigError):
                    message = exc.message
                    if exc.key:
                        prefix = f"{where}."
                        where = exc.key if exc.key.startswith(prefix) else prefix + exc.key
                elif type(exc) is KeyError and len(exc.args) == 1:
                    # str(KeyError) is just the quoted key.
                    message = f"missing key {exc.args[0]!r}{raised_at(exc)}"
                elif isinstance(exc, ValueError):
                    message = str(exc)  # the plugin's own words about its table
                else:
                    message = f"{exc}{raised_at(exc)}"
                raise config.error(where, message) from None
            except BaseException as exc:
                # sys.exit() (or a library's BaseException) in a plugin must
                # not end `bonzo check` or `bonzo serve` with status 0, or a
                # traceback: it is a fault (but for what passes_through).
                if passes_through(exc):
                    raise
                log.debug("plugin %r: bonzo_configure failed", call.plugin, exc_info=exc)
                raise config.error(
                    where, f"configuration failed: {exc!r}{raised_at(exc)}"
                ) from None

    def configure_shared_again(self) -> None:
        """Run ``bonzo_configure`` again, with this configuration's tables,
        for the plugins enabled as a module or an object used as is: the
        same object in every configuration, which a reload that failed (or
        was given up) configured with the new tables while this
        configuration still serves. Plugins made from a class have an
        instance of their own and are left alone."""
        if self._shared:
            log.info(
                "reload given up: plugin(s) %s configured again with the running configuration",
                ", ".join(repr(n) for n in self._shared),
            )
            self._configure(self._shared)

    @property
    def dsn_honoured_by(self) -> list[str]:
        """The enabled plugins that honour DSN requests (RFC 3461): those
        whose ``honours_dsn`` attribute is true, as the ``queue`` plugin's,
        which sends the reports (for ``maildir``'s deliveries too). DSN is
        offered only when there is one (:tomlkey:`protocol.dsn`): a server
        that never sends a report must not take ``NOTIFY=SUCCESS`` from an
        upstream that then leaves the success notice to it."""
        return self.plugins.honouring_dsn()

    def describe_dsn(self) -> str:
        """Whether DSN is offered and why, for ``bonzo check``."""
        if not self.settings.dsn and not any(
            listener.smtp_settings is not None and listener.smtp_settings.dsn
            for listener in self.config.listeners
        ):
            return "off (protocol.dsn = false)"
        honoured = self.dsn_honoured_by
        if honoured:
            # A plugin's dsn_caveat says how far its promise goes.
            said = ", ".join(repr(n) for n in honoured)
            for name in honoured:
                caveat = getattr(self.plugins.get(name), "dsn_caveat", None)
                if isinstance(caveat, str):
                    said += f"; {name}: {caveat}"
            return f"offered (reports sent by {said})"
        return "not offered: no enabled plugin sends the reports (honours_dsn); 'queue' does"

    def _unkept_quarantine(self) -> list[str]:
        """Plugins that say they will quarantine messages (``may_quarantine``
        true) while no enabled plugin keeps quarantined mail: each such
        message would be answered ``451 4.3.0``. An implementation of
        ``bonzo_quarantine`` keeps mail unless its plugin's
        ``quarantine_owner`` is false (``maildir`` and ``queue`` without
        their ``quarantine`` key)."""
        plugins = self.plugins
        names = [
            n
            for n in self.config.plugins.enabled
            if getattr(plugins.get(n), "may_quarantine", False) is True
        ]
        if not names:
            return []
        for call in plugins.calls["bonzo_quarantine"]:
            if getattr(plugins.get(call.plugin), "quarantine_owner", True) is not False:
                return []
        return [
            f"plugins.{name}: it will quarantine some messages, but no enabled plugin keeps "
            "quarantined mail (bonzo_quarantine): each will be deferred (451 4.3.0) until it "
            "expires at the client; set the quarantine key of maildir or queue"
            for name in names
        ]

    def _out_of_order(self) -> list[str]:
        """A plugin that runs before one it should follow at the message: its
        ``runs_after`` attribute maps the names of such plugins to why."""
        out = []
        order = [c.plugin for c in self.plugins.calls["bonzo_message"]]
        for i, name in enumerate(order):
            wanted = getattr(self.plugins.get(name), "runs_after", None)
            if not isinstance(wanted, dict):
                continue
            for other in order[i + 1 :]:
                why = wanted.get(other)
                if isinstance(why, str):
                    out.append(
                        f"plugins.enabled: {name!r} runs before {other!r} at the message, but "
                        f"{why}; list {name!r} after {other!r}"
                    )
        return out

    def _slow_backends(self) -> list[str]:
        """A plugin whose backend may take as long as the plugin's hook time
        limit (its ``backend_timeout`` attribute, seconds): the limit would
        end the hook first, as a plugin failure (``451 4.3.0``), and the
        plugin's own choice for a slow backend (``on_error``,
        ``default_action``) would not apply."""
        out = []
        plugins = self.plugins
        for name in self.config.plugins.enabled:
            wait = getattr(plugins.get(name), "backend_timeout", None)
            if isinstance(wait, bool) or not isinstance(wait, (int, float)):
                continue
            limit = plugins.timeouts.get(name, plugins.timeout)
            if wait >= limit:
                out.append(
                    f"plugins.{name}: its backend may take {wait:g}s, the plugin's hook time "
                    f"limit is {limit:g}s ([plugins] timeout or timeouts.{name}): a slow "
                    "backend ends the hook first, as a plugin failure (451 4.3.0), and the "
                    "plugin's own setting for a slow backend does not apply; lower its "
                    "timeout or raise the limit"
                )
        return out

    def certificate_warnings(self) -> list[str]:
        """The listeners' server certificates that have expired, expire within
        :data:`bonzo.tls.EXPIRY_WARNING_DAYS` days, or are not valid yet, and
        their key files that every user can read (read now, not when the
        configuration was loaded: a reload logs them, as a renewal is when
        they change)."""
        # One line per problem: the same files on several listeners (25,
        # 465 and 587, say) give one warning naming every key.
        keys: dict[str, list[str]] = {}
        for listener in self.config.listeners:
            for key, pair in listener.tls_files.items():
                for warning in certificate_warnings(pair) + key_file_warnings(pair):
                    keys.setdefault(warning, []).append(key)
        return [f"{', '.join(where)}: {warning}" for warning, where in keys.items()]

    def warnings(self) -> list[str]:
        """Problems that do not stop the server but probably are mistakes:
        the server's own findings, and each plugin's ``config_warnings``
        (a list of strings a plugin may set in ``bonzo_configure``)."""
        out = list(self._notes)
        for i, path in enumerate(self.config.plugins.paths):
            if not os.path.isdir(path):
                # Harmless until a plugin is looked for there, which then
                # fails to import: say where the mistake is first.
                why = "is not a directory" if os.path.exists(path) else "does not exist"
                out.append(f"plugins.paths[{i}]: {path} {why}: no plugin is found there")
        out.extend(shadowing_modules(self.config.plugins.paths))
        for name in self.plugins.names:
            found = getattr(self.plugins.get(name), "config_warnings", None)
            if isinstance(found, (list, tuple)):
                out.extend(f"plugins.{name}: {w}" for w in found if isinstance(w, str))
        calls = self.plugins.calls
        if not calls["bonzo_rcpt"]:
            out.append(
                "no enabled plugin accepts recipients (bonzo_rcpt): every recipient will be "
                "refused; enable e.g. 'recipients'"
            )
        elif not any(self.plugins.can_accept(c.plugin, "bonzo_rcpt") for c in calls["bonzo_rcpt"]):
            names = ", ".join(repr(c.plugin) for c in calls["bonzo_rcpt"])
            out.append(
                f"no enabled plugin can accept a recipient: {names} only refuse at RCPT, so "
                "every recipient will be refused; enable e.g. 'recipients'"
            )
        out.extend(self.certificate_warnings())
        size = self.settings.max_message_size
        if 0 < size < MIN_MESSAGE_SIZE:
            out.append(_small_size("limits.max_message_size", size))
        for i, listener in enumerate(self.config.listeners):
            ls = listener.settings
            out.extend(_open_trust(i, listener.where, ls))
            override = listener.overrides.get("max_message_size")
            if isinstance(override, int) and 0 < override < MIN_MESSAGE_SIZE:
                out.append(_small_size(f"listeners[{i}].max_message_size", override))
            if ls.require_auth and not self.plugins.checks_credentials():
                out.append(
                    f"listeners[{i}] requires AUTH but no enabled plugin checks credentials "
                    "(bonzo_auth): every MAIL will be refused; enable e.g. 'passwd'"
                )
            elif ls.require_auth and ls.tls_context is None and not ls.auth_plaintext:
                # AUTH needs TLS there, and there is none: a listener that
                # refuses every sender (an MX bounces all its mail). Without
                # require_auth it is the usual port-25 MX: nothing to say.
                out.append(
                    f"listeners[{i}] requires AUTH but never offers it (no TLS certificate, "
                    "and auth_plaintext is false): every MAIL will be refused with 530; "
                    "give it a certificate, or remove require_auth"
                )
        if not calls["bonzo_deliver"]:
            out.append(
                "no enabled plugin delivers messages (bonzo_deliver): every message will be "
                "answered 451; enable e.g. 'maildir'"
            )
        out.extend(self._shadowed())
        out.extend(self._out_of_order())
        out.extend(self._slow_backends())
        out.extend(self._unkept_quarantine())
        workers = self.config.workers
        if workers > 1 and not self.config.redis.enabled:
            for name in self.config.plugins.enabled:
                if getattr(self.plugins.get(name), "shared_state", False) is True:
                    out.append(
                        f"plugins.enabled: {name!r} keeps its state in app.store, which is "
                        f"each worker's own without [redis] url (server.workers = {workers}): "
                        "set [redis] url, or server.workers = 1"
                    )
        return out

    def _shadowed(self) -> list[str]:
        """Decision hooks that can never run: an earlier plugin declares (with
        a ``decides_always`` attribute) that it gives a verdict every time."""
        out = []
        for hook in DECISION_HOOKS:
            decider = None
            marks = {
                impl.plugin_name: "tryfirst" if impl.tryfirst else "trylast" if impl.trylast else ""
                for impl in getattr(self.plugins.manager.hook, hook).get_hookimpls()
            }
            for call in self.plugins.calls[hook]:
                idle = getattr(self.plugins.get(call.plugin), "idle_hooks", ())
                if isinstance(idle, (tuple, list, set, frozenset)) and hook in idle:
                    continue  # configured to do nothing there: nothing is lost
                if decider is not None:
                    problem = (
                        f"plugins.enabled: the {hook} of {call.plugin!r} never runs: "
                        f"{decider!r} decides every {hook} and runs before it"
                    )
                    # A trylast here or a tryfirst there keeps the order
                    # whatever the list says: only removing it helps.
                    moved = [
                        f"{mark} on {name!r}"
                        for name, mark in ((call.plugin, "trylast"), (decider, "tryfirst"))
                        if marks.get(name) == mark
                    ]
                    if moved:
                        out.append(f"{problem} ({', '.join(moved)}); remove the mark")
                    else:
                        out.append(f"{problem}; list {call.plugin!r} before {decider!r}")
                    continue
                always = getattr(self.plugins.get(call.plugin), "decides_always", ())
                if isinstance(always, (tuple, list, set, frozenset)) and hook in always:
                    decider = call.plugin
        return out

    # ---------------------------------------------------------------- running
    def bind(self) -> list[socket.socket]:
        """Bind the listening sockets of every listener (before forking
        workers); :meth:`start` then serves them, each with its listener's
        TLS and AUTH policy."""
        from tornado.netutil import bind_sockets

        bound: list[tuple[ListenerConfig, list[socket.socket]]] = []
        for listener in self.config.listeners:
            try:
                if listener.path is not None:
                    socks = [_bind_unix(listener.path, listener.mode)]
                    self._unix_paths.append(listener.path)
                else:
                    socks = bind_sockets(listener.port, listener.address or None, backlog=1024)
            except OSError as exc:
                for _, done in bound:
                    for s in done:
                        s.close()
                self.remove_unix_sockets()
                raise OSError(
                    exc.errno, f"cannot listen on {listener.where}: {exc.strerror or exc}"
                ) from None
            bound.append((listener, socks))
        self._bound = bound
        return [s for _, socks in bound for s in socks]

    def remove_unix_sockets(self) -> None:
        """Remove the files of the Unix sockets :meth:`bind` made (when the
        server has stopped, in the process that bound them)."""
        for path in self._unix_paths:
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass
        self._unix_paths = []

    async def start(self, sockets: Sequence[socket.socket] | None = None) -> SMTPServer:
        """Run the plugins' startup hooks and start serving: the sockets of
        :meth:`bind` (bound now if it was not called), or ``sockets`` given
        here, which are served with the first listener's policy. Returns the
        first listener's server; :attr:`servers` has them all. When serving
        fails once the plugins started, they get ``bonzo_shutdown`` (those
        another started application has excepted) before the error is
        raised."""
        if self._started:
            raise RuntimeError("MailApp already started")
        self._stop_done = self._stop_requested = self._stop_forced = None
        self.retiring = False
        # Plugins start before anything listens: a plugin that cannot start
        # must not leave a bound socket (or a half-started server) behind.
        # One still running for another application (the configuration a
        # reload replaces) is started already: its startup again would
        # replace what it opened while that one's sessions use it.
        running = [n for n in self.plugins.names if id(self.plugins.get(n)) in _RUNNING]
        for name in running:
            log.info(
                "plugin %r is the same object in the running configuration, already "
                "started: bonzo_startup not run again",
                name,
            )
        try:
            await self._start_plugins(running)
        except BaseException:
            await self._close_unshared_store()
            raise
        try:
            self._serve(sockets)
        except BaseException:
            # Started plugins must not outlive a start that did not happen
            # (a reload's queue runner would go on delivering on the routes
            # it replaced); the sockets go back to whoever owns them.
            for server in self.servers:
                server.release_sockets()
            self.servers = []
            self.server = None
            # As at a stop: every plugin but those another application runs.
            log.info("startup failed after the plugins started: running their shutdown hooks")
            await self.plugins.call_observers("bonzo_shutdown", self, skip=running)
            await self._close_unshared_store()
            raise
        self._started = True
        for name in self.plugins.names:
            _hold(self.plugins.get(name))
        _hold(self.store, _STORES)
        return self.servers[0]

    async def _close_unshared_store(self) -> None:
        """A start failed: close the store (a Redis pool its plugins may have
        opened) unless a running application shares it (a reload that kept
        ``[redis]``), whose sessions still use it."""
        if id(self.store) in _STORES:
            return
        try:
            await self.store.close()
        except Exception as exc:  # the start's own error is the one to raise
            log.warning("startup failed: closing the store failed too: %s", exc)

    def _serve(self, sockets: Sequence[socket.socket] | None) -> None:
        """Make the servers and have them accept on their sockets (see
        :meth:`start`)."""
        if sockets is not None:
            groups = [(self.config.listeners[0], list(sockets))]
        else:
            if not self._bound:
                self.bind()
            groups = self._bound
        # A reload's servers count on from those they replace (whose
        # sessions finish meanwhile): the limits hold for both together.
        before = self._replaced.servers if self._replaced is not None else []
        self._replaced = None  # no chain of every configuration ever reloaded
        count = before[0].count if before else None
        if count is None or count.ipv6_prefix_length != self.settings.ipv6_prefix_length:
            count = ConnectionCount(ipv6_prefix_length=self.settings.ipv6_prefix_length)
        count.max_connections = self.settings.max_connections
        count.max_connections_per_ip = self.settings.max_connections_per_ip
        for i, (listener, socks) in enumerate(groups):
            server = SMTPServer(
                plugins=self.plugins,
                settings=offered_settings(listener.smtp_settings or self.settings, self.plugins),
                listener=listener.settings,
                count=count,
                # Workers share the sockets: one connection at a time each,
                # spread evenly by the share.
                accept_batch=1 if self.share is not None else ACCEPT_BATCH,
                share=self.share,
            )
            if i < len(before):
                server.continue_counts(before[i])
            self.servers.append(server)  # released again if a later one fails
            server.add_sockets(socks)
        self.server = self.servers[0]

    async def _start_plugins(self, running: list[str]) -> None:
        """Run ``bonzo_startup`` of each plugin but those ``running``, in
        order. When one fails, those started before it get ``bonzo_shutdown``
        before the failure is raised: what they opened must not outlive a
        start that did not happen (a reload that fails leaves the running
        configuration serving; repeated, it would pile up pools and files)."""
        names = self.plugins.names
        started: list[str] = []
        try:
            for call in self.plugins.calls["bonzo_startup"]:
                if call.plugin in running:
                    continue
                others = [n for n in names if n != call.plugin]
                await self.plugins.call_observers("bonzo_startup", self, strict=True, skip=others)
                started.append(call.plugin)
        except BaseException:  # a plugin failed, or the start was cancelled
            if started:
                log.info("startup failed: shutting down the plugins started: %s", started)
                others = [n for n in names if n not in started]
                await self.plugins.call_observers("bonzo_shutdown", self, skip=others)
            raise

    def adopt_sockets(self, old: MailApp) -> None:
        """Serve the listening sockets ``old`` bound (a reload: the same
        listeners, in the same order). Raises :class:`ValueError` naming the
        difference when the listeners changed (a restart is needed)."""
        before = [listener.where for listener, _ in old._bound]
        after = [listener.where for listener in self.config.listeners]
        if before != after:
            raise ValueError(
                f"listeners changed ({', '.join(before)} -> {', '.join(after)}): "
                "restart bonzo to apply"
            )
        self._bound = [
            (listener, socks)
            for listener, (_, socks) in zip(self.config.listeners, old._bound, strict=True)
        ]
        self.share = old.share
        self._replaced = old

    def release_sockets(self) -> None:
        """Stop accepting new connections, keeping the sockets open for the
        configuration that replaces this one; sessions go on (see
        :meth:`retire`)."""
        for server in self.servers:
            server.release_sockets()

    def reattach_sockets(self) -> None:
        """Accept again on the sockets :meth:`release_sockets` let go (a
        reload whose new configuration failed to start). A socket that
        cannot be taken back (another configuration of this process accepts
        on it) is logged and left to that one."""
        for server, (listener, socks) in zip(self.servers, self._bound, strict=False):
            for sock in socks:
                try:
                    server.add_sockets([sock])
                except (ValueError, OSError) as exc:
                    log.error(
                        "reload: listener %s: could not accept on it again: %s",
                        listener.where,
                        exc,
                    )

    async def retire(self) -> None:
        """After a reload: let the sessions of this configuration end by
        themselves for up to ``shutdown_grace`` seconds, then stop as
        :meth:`stop` does (``421`` to those still waiting, messages in
        flight finished) and run the plugins' shutdown hooks."""
        self.retiring = True
        # The server goes on: the client should just connect again.
        self._stop_text = RETIRED_TEXT
        tasks = [c.task for s in self.servers for c in s.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.shutdown_grace)
        await self._stop_once(None)

    @property
    def stop_requested(self) -> asyncio.Event:
        """Set when the server stops (``SIGTERM``, or the end of a test
        server), as opposed to a reload retiring this configuration: a
        plugin's ``bonzo_shutdown`` that lets work in flight finish after a
        reload (the ``queue``'s deliveries) waits for it, and cuts that
        work to ``shutdown_grace`` seconds once it is set."""
        if self._stop_requested is None:
            self._stop_requested = asyncio.Event()
        return self._stop_requested

    @property
    def stop_forced(self) -> asyncio.Event:
        """Set by :meth:`force_stop` (a second ``SIGTERM``): work a plugin's
        ``bonzo_shutdown`` still waits for is to be cut at once."""
        if self._stop_forced is None:
            self._stop_forced = asyncio.Event()
        return self._stop_forced

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully (see :meth:`SMTPServer.shutdown`), then run the
        plugins' shutdown hooks -- but not those of a plugin object another
        started application of this process still has (a module or an
        instance the configuration that replaced this one enables too): the
        last to stop shuts it down.

        Called while a reload retires this configuration, it sets
        :attr:`stop_requested` and waits for that retirement to end."""
        self.stop_requested.set()
        # The server stops: its sessions are told so, not to connect again
        # (unless the retirement has told them already).
        self._stop_text = None
        await self._stop_once(grace)

    async def _stop_once(self, grace: float | None) -> None:
        if self._stop_done is not None:
            await self._stop_done.wait()
            return
        self._stop_done = asyncio.Event()
        try:
            await self._stop(grace)
        finally:
            self._stop_done.set()

    async def _stop(self, grace: float | None) -> None:
        if self.servers:
            text = self._stop_text
            await asyncio.gather(*(server.shutdown(grace, text) for server in self.servers))
            self.servers = []
            self.server = None
        if self._started:
            self._started = False
            names = self.plugins.names
            shared = [n for n in names if not _release(self.plugins.get(n))]
            await self.plugins.call_observers("bonzo_shutdown", self, skip=shared)
            # A store the configuration that replaced this one shares stays open.
            if _release(self.store, _STORES):
                await self.store.close()

    def force_stop(self) -> None:
        """Stop at once (a second SIGTERM while :meth:`stop` waits): every
        session is cancelled, plugin calls included; :meth:`stop` then
        returns promptly and still runs the plugins' shutdown hooks."""
        self.stop_requested.set()
        self.stop_forced.set()
        for server in self.servers:
            server.force_stop()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (address, port) pairs being served, once started (a Unix
        socket is ``(path, 0)``)."""
        out = []
        for server in self.servers:
            for sock in server._sockets.values():
                name = sock.getsockname()
                out.append((name, 0) if isinstance(name, str) else (name[0], name[1]))
        return out


def _open_trust(index: int, where: str, listener: ListenerSettings) -> list[str]:
    """Warnings for a trust list of listener ``index`` (at ``where``) that
    holds every address (``0.0.0.0/0``, ``::/0``, or networks that together
    cover one of them): anyone may then name any client, and with ``XCLIENT
    LOGIN`` be anyone (``bonzo check``)."""
    out = []
    effects = {
        "proxy_trusted": "lets any client send a PROXY header and name any client address",
        "xclient_trusted": "lets any client use XCLIENT: name any client address and, with "
        "LOGIN, relay as any authenticated user",
    }
    for key, effect in effects.items():
        nets = getattr(listener, key)
        for net in nets:
            if net.prefixlen == 0:
                out.append(f"listeners[{index}].{key} ({where}): {net} {effect}")
        for family, same in whole_families(nets):
            listed = " ".join(str(n) for n in same)
            out.append(
                f"listeners[{index}].{key} ({where}): {listed} hold every {family} "
                f"address together: that {effect}"
            )
    return out


def _bind_unix(path: str, mode: int) -> socket.socket:
    """Bind a listening Unix socket at ``path`` with permissions ``mode``.

    A socket file left by a server that is gone is replaced; one that a
    running server answers on is not (``EADDRINUSE``), nor is a file that is
    not a socket (``EEXIST``)."""
    from tornado.netutil import bind_unix_socket

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except OSError:
            pass  # nobody listens: a stale file, which bind_unix_socket replaces
        else:
            raise OSError(errno.EADDRINUSE, "a server is already listening there")
        finally:
            probe.close()
    return bind_unix_socket(path, mode=mode, backlog=1024)

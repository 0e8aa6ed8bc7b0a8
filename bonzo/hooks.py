"""Running plugins: registration, validation and the hook runner.

:class:`PluginSet` holds the plugins of one server in the operator's order,
validates them at registration (unknown hook names, wrong argument names,
parameters that would get nothing, hook wrappers) and resolves, once, the
call list of every hook. Its two runners are all the session layer uses:
:meth:`PluginSet.decide` for decision hooks (the first verdict wins) and
:meth:`PluginSet.observe` for observer hooks (every implementation runs).
Each implementation may be a plain function or return an awaitable; each is
awaited in turn, within its plugin's timeout, and what goes wrong is
reported as :class:`Refused` (a plugin said no) or :class:`PluginFailure`
(a plugin broke), which :func:`bonzo.dispatch.error_reply` turns into the
reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import functools
import inspect
import math
import signal
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Generator, Iterable, Sequence
from typing import Any

import pluggy
from tornado.log import app_log

from . import errors, hookspecs, metrics
from .hookspecs import (
    DECISION_HOOKS,
    FILTER_HOOKS,
    OBSERVER_HOOKS,
    OWNER_HOOKS,
    Accept,
    Discard,
    Quarantine,
)
from .session import current_plugin, exception_text
from .settings import SMTPSettings, positive_seconds

__all__ = [
    "PluginSet",
    "PluginError",
    "HookCall",
    "Refused",
    "PluginFailure",
    "HookTimeout",
    "CANCEL_GRACE",
    "abandoned_calls",
    "stop_task",
    "hook_names",
    "offered_settings",
    "HOOK_ARGS",
]

#: Arguments every hook spec declares, by hook name.
HOOK_ARGS: dict[str, tuple[str, ...]] = {}
for _name in dir(hookspecs):
    if _name.startswith("bonzo_"):
        HOOK_ARGS[_name] = tuple(inspect.signature(getattr(hookspecs, _name)).parameters)

_SYNC_ONLY = ("bonzo_configure", "bonzo_exception")


class Refused(Exception):
    """A plugin refused: it raised an :class:`~bonzo.errors.SMTPError` with a
    ``4xx``/``5xx`` code, which is the reply (never changed)."""

    def __init__(self, plugin: str, hook: str, error: errors.SMTPError) -> None:
        super().__init__(f"plugin {plugin!r} refused in {hook}: {error}")
        self.plugin = plugin
        self.hook = hook
        self.error = error


class HookTimeout(TimeoutError):
    """A hook call ran past its plugin's time limit (``[plugins] timeout``
    or its ``timeouts`` entry) and was cancelled. Its failure is logged in
    one line (the traceback would show only the hook runner), naming the
    plugin's backend when the plugin has a ``backend`` attribute (a string:
    where it sends its questions, e.g. ``127.0.0.1:3310``)."""


class PluginFailure(Exception):
    """A plugin failed: an exception that is not an error reply, a timeout,
    or a return value of the wrong type. The client gets a ``4xx``."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        super().__init__(f"plugin {plugin!r} failed in {hook}: {error!r}")
        self.plugin = plugin
        self.hook = hook
        self.error = error


class PluginError(Exception):
    """A plugin cannot be registered or configured; the message names it."""


class HookCall:
    """One implementation of one hook, resolved for fast calls."""

    __slots__ = ("plugin", "function", "indexes", "timeout")

    def __init__(self, plugin: str, function: Any, indexes: tuple[int, ...], timeout: float):
        self.plugin = plugin
        self.function = function
        self.indexes = indexes
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<HookCall {self.plugin}.{getattr(self.function, '__name__', '?')}>"


class _Manager(pluggy.PluginManager):
    """A pluggy manager that also takes undecorated functions named
    ``bonzo_*`` as hook implementations, so a forgotten ``@hookimpl`` does not
    silently disable a hook."""

    def parse_hookimpl_opts(self, plugin: object, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("bonzo_"):
            method = getattr(plugin, name, None)
            if callable(method) and not inspect.isclass(method):
                return {}
        return opts


class PluginSet:
    """The plugins of one server, in the operator's order.

    :arg timeout: default time limit for one async hook call, in seconds.
    """

    def __init__(self, timeout: float = 60.0) -> None:
        if not positive_seconds(timeout):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.manager = _Manager("bonzo")
        self.manager.add_hookspecs(hookspecs)
        self.timeout = timeout
        self.names: list[str] = []
        self.timeouts: dict[str, float] = {}
        #: Every hook's implementations in call order, resolved at each
        #: registration (never per call).
        self.calls: dict[str, list[HookCall]] = self._resolve()
        self._credentials_for: dict[str, list[HookCall]] | None = None
        self._credentials = False

    def register(self, plugin: object, name: str, *, timeout: float | None = None) -> None:
        """Add ``plugin`` (a module or an object with hook methods) after those
        already registered. Raises :class:`PluginError` naming the plugin for an
        unknown hook, a wrong argument name, a hook wrapper, or a generator."""
        if name in self.names:
            raise PluginError(f"plugin {name!r} is registered twice")
        if timeout is not None and not positive_seconds(timeout):
            raise PluginError(f"plugin {name!r}: timeout must be a positive number of seconds")
        problem = _attribute_problem(plugin)
        if problem is not None:
            raise PluginError(f"plugin {name!r}: {problem}")
        try:
            self.manager.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            # pluggy validates while registering and leaves what it added so
            # far behind: undo it, so a refused plugin leaves no trace (a later
            # call list would otherwise name a plugin that is not in the set).
            if self.manager.get_plugin(name) is plugin:
                self.manager.unregister(name=name)
            detail = _wrong_parameter(plugin) or " ".join(str(exc).split())
            raise PluginError(f"plugin {name!r}: {detail}") from None
        for impl in self._impls_of(name):
            hook = getattr(impl.function, "__name__", "?")
            hook_name = _hook_name(self.manager, impl)
            if impl.hookwrapper or impl.wrapper:
                self.manager.unregister(name=name)
                raise PluginError(
                    f"plugin {name!r}: {hook_name} is a hook wrapper; Bonzo awaits hooks one at "
                    "a time and does not support wrappers"
                )
            if hook_name in _SYNC_ONLY and inspect.iscoroutinefunction(impl.function):
                self.manager.unregister(name=name)
                # The function's own name, where it differs (a hookimpl
                # with specname=...), helps to find it.
                where = f" ({hook})" if hook != hook_name else ""
                raise PluginError(f"plugin {name!r}: {hook_name} must not be async{where}")
            kind = _generator_kind(impl.function)
            if kind is not None:
                # A leftover `yield` (pluggy's wrapper idiom is a generator):
                # calling it would make a generator and never run its body.
                self.manager.unregister(name=name)
                raise PluginError(
                    f"plugin {name!r}: {hook_name} is {kind} (it has a yield), so its body "
                    "would never run; a hook must return its answer"
                )
            problem = _signature_problem(impl, hook_name)
            if problem is not None:
                self.manager.unregister(name=name)
                raise PluginError(f"plugin {name!r}: {hook_name} {problem}")
        pending = [
            hook
            for hook, caller in vars(self.manager.hook).items()
            if isinstance(caller, pluggy.HookCaller)
            and not caller.has_spec()
            and any(i.plugin_name == name for i in caller.get_hookimpls())
        ]
        if pending:
            self.manager.unregister(name=name)
            close = [
                f"{hook}: did you mean {match[0]}?"
                for hook in sorted(pending)
                if (match := difflib.get_close_matches(hook, list(HOOK_ARGS), n=1))
            ]
            hint = f"; {'; '.join(close)}" if close else ""
            raise PluginError(
                f"plugin {name!r}: unknown hook(s) {', '.join(sorted(pending))}{hint}"
                f" (known: {', '.join(sorted(HOOK_ARGS))})"
            )
        self.names.append(name)
        if timeout is not None:
            self.timeouts[name] = timeout
        self.calls = self._resolve()

    def _impls_of(self, name: str) -> list[pluggy.HookImpl]:
        plugin = self.manager.get_plugin(name)
        out: list[pluggy.HookImpl] = []
        for caller in self.manager.get_hookcallers(plugin) or []:
            out.extend(i for i in caller.get_hookimpls() if i.plugin_name == name)
        return out

    def get(self, name: str) -> object:
        """The registered plugin object called ``name``."""
        return self.manager.get_plugin(name)

    def declaration_problem(self, name: str) -> str | None:
        """What is wrong with the declarations of plugin ``name`` (read when
        they are used, so checked once it is configured): ``accepts``,
        ``decides_always`` and ``idle_hooks`` tuples of hook names, ``runs_after`` a dict of
        plugin name to why, ``open_files`` a non-negative int,
        ``backend_timeout`` a number of seconds, ``config_warnings`` a list
        of strings. A wrong type was ignored without a word (``accepts =
        ("bonzo_rcpt")``, a string for the missing comma). ``None`` if
        none."""
        plugin = self.get(name)
        for attr in ("accepts", "decides_always", "idle_hooks"):
            value = getattr(plugin, attr, None)
            if value is None:
                continue
            if isinstance(value, str):
                return (
                    f"{attr} must be a tuple of hook names, not a string (a missing comma? "
                    f"({value!r},))"
                )
            if not isinstance(value, (tuple, list, set, frozenset)):
                return f"{attr} must be a tuple of hook names, not {type(value).__name__}"
            unknown = [h for h in value if h not in HOOK_ARGS]
            if unknown:
                return f"{attr} names {unknown[0]!r}, which is not a hook"
        value = getattr(plugin, "runs_after", None)
        if value is not None and not (
            isinstance(value, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        ):
            return f"runs_after must be a dict of plugin name to why, not {type(value).__name__}"
        value = getattr(plugin, "open_files", None)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            return f"open_files must be a non-negative int, not {value!r}"
        value = getattr(plugin, "backend_timeout", None)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
        ):
            return f"backend_timeout must be a positive number of seconds, not {value!r}"
        value = getattr(plugin, "config_warnings", None)
        if value is not None and not (
            isinstance(value, (list, tuple)) and all(isinstance(w, str) for w in value)
        ):
            return "config_warnings must be a list of strings"
        return None

    def can_accept(self, name: str, hook: str) -> bool:
        """Whether plugin ``name`` may give a positive verdict in ``hook``
        (its ``accepts`` attribute, a tuple of hooks, says; without one, it
        may)."""
        accepts = getattr(self.get(name), "accepts", None)
        if not isinstance(accepts, (tuple, list, set, frozenset)):
            return True
        return hook in accepts

    def open_files(self) -> int:
        """The descriptors the plugins may hold open at once in a process,
        beside those of the sessions: the sum of their ``open_files``
        attributes (a non-negative int; the ``queue`` plugin's counts the
        message files it keeps and its deliveries). ``bonzo serve`` raises
        its limit on open files by as much."""
        total = 0
        for name in self.names:
            value = getattr(self.get(name), "open_files", 0)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                total += value
        return total

    def credential_checkers(self) -> list[str]:
        """The plugins that implement :func:`~bonzo.hookspecs.bonzo_auth` and
        may accept there (:meth:`can_accept`), in call order: ``ratelimit``
        only refuses there."""
        return [
            c.plugin for c in self.calls["bonzo_auth"] if self.can_accept(c.plugin, "bonzo_auth")
        ]

    def checks_credentials(self) -> bool:
        """Whether some plugin may accept AUTH credentials
        (:meth:`credential_checkers`): AUTH is offered only then, so a plugin
        that only refuses there does not make it offered."""
        # Asked at every connection: worked out once per set of hook calls.
        calls = self.calls
        if self._credentials_for is not calls:
            self._credentials = bool(self.credential_checkers())
            self._credentials_for = calls
        return self._credentials

    def honouring_dsn(self) -> list[str]:
        """The plugins that honour DSN requests (RFC 3461): those whose
        ``honours_dsn`` attribute is true (``queue``, ``forward``). A server
        offers DSN only when there is one (:func:`offered_settings`)."""
        return [n for n in self.names if getattr(self.get(n), "honours_dsn", False) is True]

    def _resolve(self) -> dict[str, list[HookCall]]:
        order = {name: i for i, name in enumerate(self.names)}
        calls: dict[str, list[HookCall]] = {}
        for hook, spec_args in HOOK_ARGS.items():
            caller = getattr(self.manager.hook, hook)
            impls = sorted(
                caller.get_hookimpls(),
                key=lambda i: (0 if i.tryfirst else 2 if i.trylast else 1, order[i.plugin_name]),
            )
            calls[hook] = [
                HookCall(
                    impl.plugin_name,
                    impl.function,
                    # An argument with a default is passed too (pluggy would
                    # leave it out); register() checked every name.
                    tuple(spec_args.index(a) for a in impl.argnames + impl.kwargnames),
                    math.inf
                    if hook == "bonzo_shutdown" and _bounds_own_shutdown(impl.plugin)
                    else self.timeouts.get(impl.plugin_name, self.timeout),
                )
                for impl in impls
            ]
        return calls

    def reordered(self) -> dict[str, list[str]]:
        """The hooks whose call order is not the operator's order (a
        ``tryfirst`` or ``trylast`` implementation moved one), each with its
        plugins in the order they run."""
        order = {name: i for i, name in enumerate(self.names)}
        out: dict[str, list[str]] = {}
        for hook, calls in self.calls.items():
            names = [c.plugin for c in calls]
            if names != sorted(names, key=order.__getitem__):
                out[hook] = names
        return out

    def hooks_of(self, name: str) -> list[str]:
        """The hooks plugin ``name`` implements."""
        return sorted({_hook_name(self.manager, i) for i in self._impls_of(name)})

    # --------------------------------------------------------------- calls
    def call_sync(self, hook: str, *args: Any) -> list[tuple[str, Any]]:
        """Call every implementation of a sync hook (configure); return
        (plugin, result) pairs. Exceptions propagate as :class:`PluginError`,
        naming the plugin."""
        results = []
        for call in self.calls[hook]:
            try:
                result = call.function(*[args[i] for i in call.indexes])
                if isinstance(result, _GENERATORS):
                    raise TypeError(_GENERATOR_RESULT)
            except BaseException as exc:
                if passes_through(exc):
                    raise
                raise PluginError(f"plugin {call.plugin!r}: {exc!r}") from exc
            results.append((call.plugin, result))
        return results

    async def call_observers(
        self,
        hook: str,
        *args: Any,
        session: Any = None,
        strict: bool = False,
        skip: Collection[str] = (),
    ) -> None:
        """Run every implementation of a lifecycle hook (startup, shutdown),
        but those of the plugins named in ``skip``. Failures are logged and
        the next one runs; with ``strict`` the first failure is raised as
        :class:`PluginError`."""
        calls = [c for c in self.calls[hook] if c.plugin not in skip] if skip else None
        try:
            await self.observe(hook, args, session, strict=strict, calls=calls)
        except PluginFailure as failure:
            raise PluginError(
                f"plugin {failure.plugin!r} failed in {hook}: {failure.error}"
            ) from failure.error

    async def decide(
        self,
        hook: str,
        args: tuple[Any, ...],
        on_quarantine: Callable[[str, Any], None] | None = None,
    ) -> tuple[str, Any] | None:
        """Run decision ``hook`` with the spec's arguments ``args``: the first
        implementation that returns something other than ``None`` decides.

        Returns ``(plugin, verdict)`` — an :class:`~bonzo.hookspecs.Accept`,
        a reply string, or (unknown commands) a reply tuple — or ``None``
        when nobody had an opinion. With ``on_quarantine``, a
        :class:`~bonzo.hookspecs.Quarantine` does not stop the chain: it is
        passed to ``on_quarantine(plugin, verdict)`` and the next plugin is
        asked. Raises :class:`Refused` when a plugin
        raised an error reply and :class:`PluginFailure` when one failed.
        """
        for call in self.calls[hook]:
            # Changes the plugin makes to the message are recorded as its own.
            token = current_plugin.set(call.plugin)
            try:
                started = _clock()
                result = call.function(*[args[i] for i in call.indexes])
                if (
                    result is not None
                    and type(result) is not Accept
                    and inspect.isawaitable(result)
                ):
                    result = await _bounded(call, hook, result)
                elif _clock() - started > call.timeout:
                    _warn_blocked(call, hook, _clock() - started)
            except errors.SMTPError as exc:
                raise _refusal(call, hook, exc) from None
            except BaseException as exc:
                if passes_through(exc):
                    raise
                raise PluginFailure(call.plugin, hook, exc) from exc
            finally:
                current_plugin.reset(token)
            if result is not None:
                verdict = _verdict(call, hook, result)
                if on_quarantine is not None and type(verdict) is Quarantine:
                    # Recorded at once, and the next plugins still run.
                    on_quarantine(call.plugin, verdict)
                    continue
                return call.plugin, verdict
        return None

    async def observe(
        self,
        hook: str,
        args: tuple[Any, ...],
        session: Any = None,
        *,
        strict: bool = False,
        calls: list[HookCall] | None = None,
    ) -> None:
        """Run every implementation of observer ``hook`` (or those of
        ``calls``), in order. A failure is logged (naming the plugin) and the
        next implementation runs; with ``strict`` it is raised as
        :class:`PluginFailure` instead."""
        for call in self.calls[hook] if calls is None else calls:
            token = current_plugin.set(call.plugin)
            try:
                started = _clock()
                result = call.function(*[args[i] for i in call.indexes])
                if result is not None and inspect.isawaitable(result):
                    await _bounded(call, hook, result)
                else:
                    if _clock() - started > call.timeout:
                        _warn_blocked(call, hook, _clock() - started)
                    if isinstance(result, _GENERATORS):
                        raise TypeError(_GENERATOR_RESULT)
            except BaseException as exc:
                if passes_through(exc):
                    raise
                if strict:
                    raise PluginFailure(call.plugin, hook, exc) from exc
                log_plugin_failure(session, hook, call.plugin, exc)
            finally:
                current_plugin.reset(token)


_clock = time.monotonic


def offered_settings(settings: SMTPSettings, plugins: PluginSet) -> SMTPSettings:
    """``settings`` as a server of ``plugins`` applies them: DSN
    (:tomlkey:`protocol.dsn`) is not offered when no plugin honours it
    (:meth:`PluginSet.honouring_dsn`), since nobody would send the reports
    an upstream then leaves to this server. The daemon and the test servers
    of :mod:`bonzo.testing` both go through it."""
    if settings.dsn and not plugins.honouring_dsn():
        return dataclasses.replace(settings, dsn=False)
    return settings


def _bounds_own_shutdown(plugin: object) -> bool:
    """A plugin whose ``bounds_own_shutdown`` attribute is true: its
    ``bonzo_shutdown`` bounds its own time (the ``queue``'s lets deliveries
    in flight end after a reload, each within its own limits), and the hook
    time limit does not cut it."""
    return getattr(plugin, "bounds_own_shutdown", False) is True


def _warn_blocked(call: HookCall, hook: str, seconds: float) -> None:
    """A call ran past its plugin's time limit without giving the event
    loop a turn (a plain function, or a coroutine that never waited): no
    timer could stop it, and its result stands (what it did, a delivery
    say, is done), but it held up every session of its process: say so."""
    app_log.warning("plugin %r (%s) %s", call.plugin, hook, _blocked(call, seconds))


# A generator returned by a hook its registration could not tell was one (a
# decorator hid it): a fault, not a result silently dropped.
_GENERATORS = (types.GeneratorType, types.AsyncGeneratorType)
_GENERATOR_RESULT = "returned a generator (a yield in the hook?): its body never ran"


def _generator_kind(function: Any) -> str | None:
    """``"a generator"`` or ``"an async generator"`` if ``function`` is one
    (but a ``@types.coroutine`` one: its generator is an awaitable), also
    behind a decorator that kept it as ``__wrapped__`` (functools.wraps)."""
    try:
        function = inspect.unwrap(function)
    except ValueError:  # a __wrapped__ cycle: judged as it is
        pass
    if inspect.isasyncgenfunction(function):
        return "an async generator"
    if not inspect.isgeneratorfunction(function):
        return None
    # Unwrapped as inspect does: a method's function, a partial's.
    while inspect.ismethod(function):
        function = function.__func__
    while isinstance(function, functools.partial):
        function = function.func
    flags = getattr(getattr(function, "__code__", None), "co_flags", 0)
    return None if flags & inspect.CO_ITERABLE_COROUTINE else "a generator"


def _attribute_problem(plugin: object) -> str | None:
    """A ``bonzo_``-like attribute of ``plugin`` that would never work as a
    hook, said before pluggy sees it: a name with capitals (never called),
    a callable that is not a function or method (pluggy stops on it with an
    assertion), or a method whose first parameter is one of its hook's
    arguments (``self`` forgotten: every call a fault). ``None`` if none."""
    for attr in dir(plugin):
        if not attr.lower().startswith("bonzo_"):
            continue
        try:
            value = getattr(plugin, attr)
        except Exception:
            continue  # a property that fails: not a hook
        if not callable(value) or inspect.isclass(value):
            continue
        if not attr.startswith("bonzo_"):
            return f"{attr}: hook names are lower case ({attr.lower()}); this one is never called"
        if not inspect.isroutine(value):
            return (
                f"{attr} is a {type(value).__name__} object, not a function or method: define "
                "it with def (or async def)"
            )
        spec = HOOK_ARGS.get(attr)
        if spec and inspect.ismethod(value) and value.__self__ is plugin:
            try:
                first = next(iter(inspect.signature(value.__func__).parameters), None)
            except (TypeError, ValueError):
                continue
            if first in spec:
                return (
                    f"{attr}: its first parameter is {first!r}, one of the hook's arguments: "
                    f"a method takes self first (def {attr}(self, {first}, ...))"
                )
    return None


def _wrong_parameter(plugin: object) -> str | None:
    """The first hook method of ``plugin`` with a parameter its hook does not
    have, said for people (pluggy's message names the plugin again and
    lists no arguments), with the closest argument name; ``None`` if none."""
    for hook, spec_args in HOOK_ARGS.items():
        method = getattr(plugin, hook, None)
        if method is None:
            continue
        try:
            parameters = inspect.signature(method).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in parameters:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in spec_args:
                if p.default is not p.empty:
                    continue  # pluggy passes nothing for it: allowed
                return f"{hook} {_not_an_argument(p.name, spec_args)}"
    return None


def _not_an_argument(name: str, spec_args: Sequence[str]) -> str:
    """Says that a hook has a parameter ``name`` its spec does not, with the
    spec's arguments and the closest of them."""
    close = difflib.get_close_matches(name, spec_args, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    known = ", ".join(spec_args)
    return f"has the parameter {name!r}, which is not one of its arguments ({known}){hint}"


def _signature_problem(impl: pluggy.HookImpl, hook: str) -> str | None:
    """What is wrong with the parameters of ``impl`` for ``hook``, if
    anything. Hooks are called with the arguments they name, so every
    parameter must be one of the spec's, by name; one with a default gets
    the argument too. ``*args``, ``**kwargs`` and keyword-only parameters
    would silently receive nothing, so they are refused."""
    spec_args = HOOK_ARGS.get(hook)
    if spec_args is None:
        return None  # an unknown hook: reported by the caller
    try:
        parameters = inspect.signature(impl.function).parameters.values()
    except (TypeError, ValueError):
        return None  # no signature to read (a builtin): pluggy's check stands
    known = ", ".join(spec_args)
    for p in parameters:
        if p.kind is p.VAR_POSITIONAL or p.kind is p.VAR_KEYWORD:
            return (
                f"takes {'*' if p.kind is p.VAR_POSITIONAL else '**'}{p.name}; name the "
                f"arguments it needs instead (of: {known})"
            )
        if p.kind is p.KEYWORD_ONLY:
            return (
                f"has the keyword-only parameter {p.name!r}, which would get nothing; "
                f"make it a plain parameter (of: {known})"
            )
        if p.name not in spec_args and p.name in impl.kwargnames:
            return _not_an_argument(p.name, spec_args)
    return None


def _refusal(call: HookCall, hook: str, exc: errors.SMTPError) -> Exception:
    if exc.status_code >= 400:
        return Refused(call.plugin, hook, exc)
    # A "rejection" with a 2xx/3xx code would tell the client that all is
    # well (for a message: that it was delivered): fail closed.
    return PluginFailure(
        call.plugin,
        hook,
        ValueError(f"raised an SMTPError with non-error code {exc.status_code}"),
    )


def _verdict(call: HookCall, hook: str, result: Any) -> Any:
    """Check a non-None return value of a decision hook."""
    kind = type(result)
    if hook == "bonzo_route":
        # A route's name, nothing else: an Accept would be taken for one.
        if kind is str:
            return result
        raise PluginFailure(
            call.plugin,
            hook,
            TypeError(f"returned {kind.__name__}; expected a route name (str) or None"),
        )
    if kind is Accept:
        return result
    if hook == "bonzo_auth":
        # Only Accept authenticates: a stray truthy value must not let a
        # client in.
        raise PluginFailure(
            call.plugin,
            hook,
            TypeError(f"returned {kind.__name__}; expected Accept or None"),
        )
    if kind is str:
        return result
    if kind is Discard or kind is Quarantine:
        if hook in FILTER_HOOKS:
            return result
        raise PluginFailure(
            call.plugin,
            hook,
            TypeError(
                f"returned {kind.__name__}, which is a verdict only for {', '.join(FILTER_HOOKS)}"
            ),
        )
    if hook == "bonzo_unknown_command" and isinstance(result, tuple):
        problem = _reply_tuple_problem(result)
        if problem is None:
            return result
        raise PluginFailure(call.plugin, hook, ValueError(problem))
    if isinstance(result, BaseException):
        # A refusal returned instead of raised: say so (it is a fault, 451).
        raise PluginFailure(
            call.plugin,
            hook,
            TypeError(f"returned {kind.__name__} instead of raising it (raise it to refuse)"),
        )
    raise PluginFailure(
        call.plugin,
        hook,
        TypeError(f"returned {kind.__name__}; expected Accept, str or None"),
    )


def _reply_tuple_problem(reply: tuple[Any, ...]) -> str | None:
    """Why ``reply`` is not a valid ``(code, text)`` or ``(code, enhanced,
    text)`` answer to an unknown command, or ``None`` if it is."""
    if len(reply) not in (2, 3):
        return f"returned a tuple of {len(reply)} items; expected (code, [enhanced,] text)"
    code, text = reply[0], reply[-1]
    if isinstance(code, bool) or not isinstance(code, int) or code // 100 not in (2, 4, 5):
        return f"returned reply code {code!r}; expected an int 200..599 (not 3xx)"
    lines = isinstance(text, list) and text and all(isinstance(t, str) for t in text)
    if not isinstance(text, str) and not lines:
        return (
            f"returned reply text of type {type(text).__name__}; expected str "
            "(or a list of str, one per line)"
        )
    if len(reply) == 3:
        enhanced = reply[1]
        if enhanced is not None:
            problem = errors.enhanced_code_problem(code, enhanced)
            if problem is not None:
                return "returned an " + problem
    return None


def passes_through(exc: BaseException) -> bool:
    """Whether ``exc``, raised out of a plugin's code, is not the plugin's
    fault but must go on up. Anything else a plugin raises is its fault,
    whatever its class: ``SystemExit`` (a plugin calling ``sys.exit()`` must
    not stop the server), a library's ``Timeout(BaseException)``,
    ``GreenletExit``, a ``KeyboardInterrupt`` a library raised itself.

    What goes on up:

    - an ``asyncio.CancelledError`` while the running task is being stopped
      (:func:`_stopping`): the session's end (the server's forced stop),
      not the plugin's doing;
    - ``GeneratorExit``: Python closing the coroutine that runs the hook (its
      task dropped). Made a failure, it would make ``close()`` raise instead
      of closing; a plugin has no reason to raise it itself;
    - a ``KeyboardInterrupt`` that may be the user's Ctrl-C: Python raises
      one only in the main thread, and only with its own SIGINT handler
      installed (``bonzo check``, a loop run by ``IOLoop.start()``). Under
      ``bonzo serve`` the event loop takes SIGINT (``asyncio.run()``'s own
      handler cancels the main task instead), and
      :class:`~bonzo.testing.PluginTestServer` runs its loop in a thread of
      its own: there a ``KeyboardInterrupt`` is the plugin's.

    Only asked when a hook raised: the calls themselves pay nothing.
    """
    if isinstance(exc, asyncio.CancelledError):
        return _stopping()
    if isinstance(exc, KeyboardInterrupt):
        return (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        )
    return isinstance(exc, GeneratorExit)


def _stopping() -> bool:
    """Whether the running task has been asked to stop (cancelled), so that a
    CancelledError is the stop, not a plugin's fault. Python 3.10 cannot
    tell the two apart: there every CancelledError stops the session."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop (bonzo_configure): no session to stop
        return False
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


def _no_answer(call: HookCall, abandoned: bool = False) -> str:
    """The message of a hook's timeout; it names the plugin's backend (its
    ``backend`` attribute, a string such as ``127.0.0.1:3310``), if any."""
    backend = getattr(getattr(call.function, "__self__", None), "backend", None)
    where = f"; its backend: {backend}" if isinstance(backend, str) and backend else ""
    text = f"no answer within {call.timeout}s (its time limit{where})"
    if abandoned:
        text += (
            f", and it ignored its cancellation: abandoned {CANCEL_GRACE:g}s later "
            "(a plugin must let asyncio.CancelledError through)"
        )
    return text


def _blocked(call: HookCall, seconds: float) -> str:
    """The message of a hook call that ran past its time limit without
    giving the event loop a turn."""
    return (
        f"blocked the event loop for {seconds:.1f}s, past its time limit of {call.timeout}s "
        "(blocking work belongs in a thread: asyncio.to_thread)"
    )


#: How long a cancelled hook call (its time limit over, or its session
#: stopped) may take to end before it is abandoned: time enough to close a
#: connection, not to wait for an answer.
CANCEL_GRACE = 1.0

#: Abandoned hook calls that went on waiting even when closed, kept so that
#: they are not closed again by the garbage collector (see :func:`_abandon`);
#: past this many, the oldest is let go.
_ABANDONED_KEPT = 64
_abandoned: deque[Any] = deque(maxlen=_ABANDONED_KEPT)


def abandoned_calls() -> int:
    """How many abandoned hook calls are kept (see :data:`CANCEL_GRACE`). A
    process holding any ends with :func:`os._exit`: at the interpreter's
    exit, with no event loop left, closing one could loop for ever."""
    return len(_abandoned)


if sys.version_info >= (3, 11):

    def _uncancel(task: asyncio.Task[Any]) -> None:
        task.uncancel()

else:  # pragma: no cover - Python 3.10 does not count cancellations

    def _uncancel(task: asyncio.Task[Any]) -> None:
        pass


#: Tasks cancelled to stop them (:func:`stop_task`).
_STOPPED: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()


def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel a session's ``task`` to stop it (a forced stop). A hook call it
    is in gets the cancellation, and one that goes on after it is abandoned
    :data:`CANCEL_GRACE` seconds later. Any other cancellation a hook call
    sees is the plugin's own business (its own ``asyncio.timeout()`` or
    ``wait_for()`` cancel the task on Python 3.12+ and take it back), never
    taken for a stop, however long the plugin's clean-up takes."""
    _STOPPED.add(task)
    task.cancel()


class _Limit:
    """A deadline of one hook call: when it passes, the call's task is
    cancelled and ``over`` tells the runner that the cancellation is its own."""

    __slots__ = ("task", "over")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.over = False

    def expire(self) -> None:
        self.over = True
        self.task.cancel()


@types.coroutine
def _bounded(call: HookCall, hook: str, awaitable: Awaitable[Any]) -> Generator[Any, Any, Any]:
    """Await a hook's result within the plugin's timeout. The call is driven
    here step by step, in the session's task (no extra task, and no timer for
    a call that never waits), so that a call which ignores its cancellation
    can be let go (see :func:`_cancelled`). A TimeoutError the plugin raised
    itself is left as it is."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    steps: Any
    try:
        steps = awaitable.__await__()
    except AttributeError:  # a generator-based coroutine is its own steps
        steps = awaitable
    try:
        signal = steps.send(None)
    except StopIteration as done:
        if loop.time() - start > call.timeout:
            # It never waited: it blocked the loop (and every session of the
            # process) past its limit, which no timer could stop. Its result
            # stands (a delivery may have been made), but say so.
            _warn_blocked(call, hook, loop.time() - start)
        return done.value
    task = asyncio.current_task(loop)
    if task is None:  # as asyncio.timeout(): the limit cancels a task
        raise RuntimeError("a hook's awaitable must be awaited in an asyncio task")
    limit = _Limit(task)
    # No limit (math.inf): no timer, which the loop could not schedule.
    timer = loop.call_at(start + call.timeout, limit.expire) if call.timeout < math.inf else None
    try:
        while True:
            try:
                value = yield signal
            except GeneratorExit:
                _close(steps, awaitable)
                raise
            except asyncio.CancelledError as exc:
                if limit.over or task in _STOPPED:
                    if timer is not None:
                        timer.cancel()
                    return (yield from _cancelled(call, hook, awaitable, steps, exc, limit))
                try:  # a future of the plugin's own was cancelled: its business
                    signal = steps.throw(exc)
                except StopIteration as done:
                    return done.value
            except BaseException as exc:  # what the awaited future raised: the plugin's
                try:
                    signal = steps.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    signal = steps.send(value)
                except StopIteration as done:
                    return done.value
    finally:
        if timer is not None:
            timer.cancel()


def _cancelled(
    call: HookCall,
    hook: str,
    awaitable: Awaitable[Any],
    steps: Any,
    cancel: asyncio.CancelledError,
    limit: _Limit,
) -> Generator[Any, Any, Any]:
    """The rest of a hook call whose task was cancelled: by the call's time
    limit (``limit.over``), or to stop the session. The plugin gets the
    cancellation and :data:`CANCEL_GRACE` seconds to end; one that is still
    waiting then is abandoned (logged as an error: it ignored its
    cancellation). A time limit gives :class:`HookTimeout`, a stop the
    CancelledError, whatever the plugin did with it."""
    task = limit.task
    timed_out = limit.over
    if timed_out:
        # The time limit's own cancellation is taken back; one from
        # elsewhere (a forced stop at the same moment) stands.
        _uncancel(task)
        stopping = task in _STOPPED
    else:
        stopping = True
    grace = _Limit(task)
    timer = asyncio.get_running_loop().call_later(CANCEL_GRACE, grace.expire)
    thrown: BaseException | None = cancel
    value: Any = None
    result: Any = None
    failure: BaseException | None = None
    try:
        while True:
            try:
                signal = steps.send(value) if thrown is None else steps.throw(thrown)
            except StopIteration as done:
                result = done.value
                break
            except BaseException as exc:
                failure = exc
                break
            try:
                value = yield signal
                thrown = None
            except GeneratorExit:
                _close(steps, awaitable)
                raise
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    if grace.over:
                        _uncancel(task)
                        stopping = stopping or task in _STOPPED
                        _abandon(call, hook, awaitable, steps, stopping)
                        failure = HookTimeout(_no_answer(call, abandoned=True))
                        break
                    stopping = stopping or task in _STOPPED
                thrown = exc
    finally:
        timer.cancel()
    if stopping:
        raise cancel
    if isinstance(failure, HookTimeout):
        raise failure
    if failure is None:
        return result
    if timed_out and isinstance(failure, (asyncio.CancelledError, TimeoutError)):
        raise HookTimeout(_no_answer(call)) from None
    raise failure


def _abandon(
    call: HookCall, hook: str, awaitable: Awaitable[Any], steps: Any, stopping: bool
) -> None:
    """Let go of a hook call that did not end within :data:`CANCEL_GRACE`
    of its cancellation (a retry loop with ``except BaseException``, say)."""
    if stopping:  # a time limit's failure is logged with the reply it gives
        app_log.error(
            "plugin %r (%s) ignored its cancellation (its session is being stopped): abandoned "
            "after %gs; a plugin must let asyncio.CancelledError through",
            call.plugin,
            hook,
            CANCEL_GRACE,
        )
    _close(steps, awaitable)


def _close(steps: Any, awaitable: Awaitable[Any]) -> None:
    """Close a hook call's coroutine. One that swallows even that and waits
    again is kept (:data:`_abandoned`): were the garbage collector to close it
    at the interpreter's exit, with no event loop, it could loop for ever."""
    try:
        steps.close()
    except BaseException:  # noqa: BLE001 - whatever it does, it is let go
        pass
    if getattr(awaitable, "cr_frame", None) is not None or (
        getattr(awaitable, "gi_frame", None) is not None
    ):
        _abandoned.append(awaitable)


def _ehlo_line(keyword: Any) -> bool:
    return (
        isinstance(keyword, str)
        and keyword[:1].isalnum()
        and keyword.isascii()
        and keyword.isprintable()
    )


def _hook_name(manager: pluggy.PluginManager, impl: pluggy.HookImpl) -> str:
    for name, caller in vars(manager.hook).items():
        if isinstance(caller, pluggy.HookCaller) and impl in caller.get_hookimpls():
            return name
    return "?"


#: Hooks whose arguments include a secret (the client's password): the text
#: of a fault there may repeat it (``int(password)``, ``KeyError(password)``).
_SECRET_HOOKS = frozenset({"bonzo_auth"})


def _without_text(exc: BaseException) -> BaseException | None:
    """A stand-in for ``exc``: its type and traceback (the frames), but no
    arguments, chained exceptions or notes, so a log shows where it failed
    and nothing the values held. ``None`` if the type cannot be made so."""
    cls = type(exc)
    try:
        blank = cls.__new__(cls)
        str(blank)  # a __str__ needing what __init__ would have set
    except Exception:
        return None
    return blank.with_traceback(exc.__traceback__)


def log_plugin_failure(session: Any, hook: str, plugin: str, exc: BaseException) -> None:
    """Log a plugin's failure with its traceback on ``tornado.application``,
    the way the original Bonzo logged an uncaught exception. For a hook that
    is given a password, an exception the plugin raised is logged by its type
    and traceback only: its text (and any chained one's) may hold the
    password."""
    if metrics.active is not None:
        metrics.active.plugin_failure(plugin, hook, exc)
    where = f" [{session.id} {session.remote_ip}]" if session is not None else ""
    # What the plugin raised has a traceback; an error never raised is
    # Bonzo's own words about a return value, with no secret in them.
    if hook in _SECRET_HOOKS and exc.__traceback__ is not None and type(exc) is not HookTimeout:
        blank = _without_text(exc)
        app_log.error(
            "Uncaught exception%s in plugin %r (%s): %s (its text is not logged: it may "
            "hold the password)",
            where,
            plugin,
            hook,
            type(exc).__name__,
            exc_info=None if blank is None else (type(exc), blank, exc.__traceback__),
        )
        return
    app_log.error(
        "Uncaught exception%s in plugin %r (%s): %s",
        where,
        plugin,
        hook,
        exception_text(exc),  # may hold a client's text: one line
        # A time limit's traceback shows only the hook runner.
        exc_info=None if type(exc) is HookTimeout else (type(exc), exc, exc.__traceback__),
    )


def hook_names() -> Iterable[str]:
    """Every hook name, sorted."""
    return sorted(HOOK_ARGS)


# Every decision hook and observer hook must have a spec; checked at import.
assert set(DECISION_HOOKS) | set(OBSERVER_HOOKS) <= set(HOOK_ARGS)
assert set(OWNER_HOOKS) <= set(DECISION_HOOKS)

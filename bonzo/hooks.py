"""Running plugins: registration, validation and dispatch of the hooks.

:class:`PluginSet` holds the plugins of one server in the operator's order,
validates them at registration (unknown hook names, wrong argument names,
hook wrappers) and resolves, once, the call list of every hook.
:class:`PluginHandler` is the :class:`~bonzo.connection.SessionHandler` that
turns each SMTP command into the hook calls described in
:mod:`bonzo.hookspecs`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable
from typing import Any

import pluggy
from tornado.log import app_log

from . import errors, hookspecs
from .config import positive_seconds
from .connection import SessionHandler
from .hookspecs import DECISION_HOOKS, OBSERVER_HOOKS, OWNER_HOOKS, Accept
from .session import Envelope, Session

__all__ = ["PluginSet", "PluginHandler", "PluginError", "HookCall"]

#: Arguments every hook spec declares, by hook name.
HOOK_ARGS: dict[str, tuple[str, ...]] = {}
for _name in dir(hookspecs):
    if _name.startswith("bonzo_"):
        HOOK_ARGS[_name] = tuple(inspect.signature(getattr(hookspecs, _name)).parameters)

_SYNC_ONLY = ("bonzo_configure", "bonzo_exception")


class PluginError(Exception):
    """A plugin cannot be registered or configured; the message names it."""


class HookCall:
    """One implementation of one hook, resolved for fast calls."""

    __slots__ = ("plugin", "function", "indexes", "timeout", "is_async")

    def __init__(self, plugin: str, function: Any, indexes: tuple[int, ...], timeout: float):
        self.plugin = plugin
        self.function = function
        self.indexes = indexes
        self.timeout = timeout
        self.is_async = inspect.iscoroutinefunction(function)

    def __repr__(self) -> str:
        return f"<HookCall {self.plugin}.{getattr(self.function, '__name__', '?')}>"


class _Failure(Exception):
    """A plugin failed unexpectedly (exception or timeout) while running a hook."""

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        super().__init__(f"plugin {plugin!r} failed in {hook}: {error!r}")
        self.plugin = plugin
        self.hook = hook
        self.error = error


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
        self._calls: dict[str, list[HookCall]] | None = None

    def register(self, plugin: object, name: str, *, timeout: float | None = None) -> None:
        """Add ``plugin`` (a module or an object with hook methods) after those
        already registered. Raises :class:`PluginError` naming the plugin for an
        unknown hook, a wrong argument name, or a hook wrapper."""
        if name in self.names:
            raise PluginError(f"plugin {name!r} is registered twice")
        if timeout is not None and not positive_seconds(timeout):
            raise PluginError(f"plugin {name!r}: timeout must be a positive number of seconds")
        try:
            self.manager.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            # pluggy validates while registering and leaves what it added so
            # far behind: undo it, so a refused plugin leaves no trace (a later
            # call list would otherwise name a plugin that is not in the set).
            if self.manager.get_plugin(name) is plugin:
                self.manager.unregister(name=name)
            detail = " ".join(str(exc).split())
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
                raise PluginError(f"plugin {name!r}: {hook_name} must not be async ({hook})")
        pending = [
            hook
            for hook, caller in vars(self.manager.hook).items()
            if isinstance(caller, pluggy.HookCaller)
            and not caller.has_spec()
            and any(i.plugin_name == name for i in caller.get_hookimpls())
        ]
        if pending:
            self.manager.unregister(name=name)
            raise PluginError(
                f"plugin {name!r}: unknown hook(s) {', '.join(sorted(pending))}"
                f" (known: {', '.join(sorted(HOOK_ARGS))})"
            )
        self.names.append(name)
        if timeout is not None:
            self.timeouts[name] = timeout
        self._calls = None

    def _impls_of(self, name: str) -> list[pluggy.HookImpl]:
        plugin = self.manager.get_plugin(name)
        out: list[pluggy.HookImpl] = []
        for caller in self.manager.get_hookcallers(plugin) or []:
            out.extend(i for i in caller.get_hookimpls() if i.plugin_name == name)
        return out

    def get(self, name: str) -> object:
        """The registered plugin object called ``name``."""
        return self.manager.get_plugin(name)

    @property
    def calls(self) -> dict[str, list[HookCall]]:
        """Every hook's implementations in call order (resolved once)."""
        if self._calls is None:
            self._calls = self._resolve()
        return self._calls

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
                    tuple(spec_args.index(a) for a in impl.argnames),
                    self.timeouts.get(impl.plugin_name, self.timeout),
                )
                for impl in impls
            ]
        return calls

    def hooks_of(self, name: str) -> list[str]:
        """The hooks plugin ``name`` implements."""
        return sorted({_hook_name(self.manager, i) for i in self._impls_of(name)})

    # --------------------------------------------------------------- calls
    def call_sync(self, hook: str, *args: Any) -> list[tuple[str, Any]]:
        """Call every implementation of a sync hook; return (plugin, result) pairs.
        Exceptions propagate (wrapped in :class:`PluginError`, naming the plugin)."""
        results = []
        for call in self.calls[hook]:
            try:
                result = call.function(*[args[i] for i in call.indexes])
            except Exception as exc:
                raise PluginError(f"plugin {call.plugin!r}: {exc}") from exc
            results.append((call.plugin, result))
        return results

    async def call_observers(
        self, hook: str, *args: Any, session: Session | None = None, strict: bool = False
    ) -> None:
        """Run every implementation of an observer hook. Failures are logged
        and the next one runs; with ``strict`` the first failure is raised."""
        for call in self.calls[hook]:
            try:
                await _invoke(call, args)
            except Exception as exc:
                if strict:
                    raise PluginError(f"plugin {call.plugin!r} failed in {hook}: {exc}") from exc
                _log_failure(session, hook, call.plugin, exc)

    async def decide(self, hook: str, *args: Any) -> Any:
        """Run a decision hook: the first verdict wins. Returns the
        :class:`Accept` or reply string, or ``None`` when nobody had an
        opinion. ``SMTPError`` from a plugin propagates as the reply;
        anything else raises :class:`_Failure`."""
        for call in self.calls[hook]:
            try:
                result = await _invoke(call, args)
            except errors.SMTPError as exc:
                if exc.status_code >= 400:
                    raise
                # A "rejection" with a 2xx/3xx code would tell the client that
                # all is well (for a message: that it was delivered): fail closed.
                raise _Failure(
                    call.plugin,
                    hook,
                    ValueError(f"raised an SMTPError with non-error code {exc.status_code}"),
                ) from exc
            except Exception as exc:
                raise _Failure(call.plugin, hook, exc) from exc
            if result is None:
                continue
            if isinstance(result, (Accept, str)):
                return result
            if hook == "bonzo_unknown_command" and isinstance(result, tuple):
                problem = _reply_tuple_problem(result)
                if problem is None:
                    return result
                raise _Failure(call.plugin, hook, ValueError(problem))
            raise _Failure(
                call.plugin,
                hook,
                TypeError(f"returned {type(result).__name__}; expected Accept, str or None"),
            )
        return None


def _reply_tuple_problem(reply: tuple[Any, ...]) -> str | None:
    """Why ``reply`` is not a valid ``(code, text)`` or ``(code, enhanced,
    text)`` answer to an unknown command, or ``None`` if it is."""
    if len(reply) not in (2, 3):
        return f"returned a tuple of {len(reply)} items; expected (code, [enhanced,] text)"
    code, text = reply[0], reply[-1]
    if isinstance(code, bool) or not isinstance(code, int) or code // 100 not in (2, 4, 5):
        return f"returned reply code {code!r}; expected an int 200..599 (not 3xx)"
    if not isinstance(text, str):
        return f"returned reply text of type {type(text).__name__}; expected str"
    if len(reply) == 3:
        enhanced = reply[1]
        if enhanced is not None and (not isinstance(enhanced, str) or enhanced[:1] != str(code)[0]):
            return f"returned enhanced code {enhanced!r}, which does not match {code}"
    return None


async def _invoke(call: HookCall, args: tuple[Any, ...]) -> Any:
    result = call.function(*[args[i] for i in call.indexes])
    if result is not None and inspect.isawaitable(result):
        try:
            result = await asyncio.wait_for(_await(result), timeout=call.timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no answer within {call.timeout}s") from None
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


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


def _log_failure(session: Session | None, hook: str, plugin: str, exc: BaseException) -> None:
    where = f" [{session.id} {session.remote_ip}]" if session is not None else ""
    # "Uncaught exception" first, as the original Bonzo logged it.
    app_log.error(
        "Uncaught exception%s in plugin %r (%s): %s",
        where,
        plugin,
        hook,
        exc,
        exc_info=(type(exc), exc, exc.__traceback__),
    )


class PluginHandler(SessionHandler):
    """Answers every SMTP command by running the plugins' hooks.

    The connection-level ``handler_timeout`` does not apply here: each async
    hook call has its own timeout (the plugin's, else the set's default).
    """

    handles_timeouts = True

    def __init__(self, plugins: PluginSet) -> None:
        self.plugins = plugins

    async def _decide(self, session: Session | None, hook: str, *args: Any) -> Any:
        try:
            return await self.plugins.decide(hook, *args)
        except _Failure as failure:
            _log_failure(session, hook, failure.plugin, failure.error)
            raise self._map_exception(session, failure) from None

    def _map_exception(self, session: Session | None, failure: _Failure) -> errors.SMTPError:
        for call in self.plugins.calls["bonzo_exception"]:
            args = (session, failure.error, failure.hook, failure.plugin)
            try:
                reply = call.function(*[args[i] for i in call.indexes])
            except Exception as exc:
                _log_failure(session, "bonzo_exception", call.plugin, exc)
                continue
            if isinstance(reply, errors.SMTPError) and reply.status_code >= 400:
                return reply
            if reply is not None:
                # Anything but an error reply (a 2xx would tell the client
                # that all is well) is ignored: fail closed.
                app_log.error(
                    "Plugin %r returned %r from bonzo_exception; expected a 4xx/5xx "
                    "SMTPError or None",
                    call.plugin,
                    reply,
                )
        return errors.InternalConfusion()

    @staticmethod
    def _text(verdict: Any) -> str | None:
        if isinstance(verdict, Accept):
            return verdict.text
        return verdict if isinstance(verdict, str) else None

    async def on_connect(self, session: Session) -> Any:
        return self._text(await self._decide(session, "bonzo_connect", session))

    async def on_helo(self, session: Session, name: str, esmtp: bool) -> Any:
        return self._text(await self._decide(session, "bonzo_helo", session, name, esmtp))

    async def ehlo_keywords(self, session: Session, keywords: list[str]) -> Any:
        await self.plugins.call_observers("bonzo_ehlo_keywords", session, keywords, session=session)
        # An EHLO line is "keyword [params]" in printable ASCII (RFC 5321
        # 4.1.1.1); anything else (a non-string, a line break) would break the
        # reply for every client, so it is dropped and logged.
        good = [k for k in keywords if _ehlo_line(k)]
        if len(good) != len(keywords):
            app_log.error(
                "[%s %s] bonzo_ehlo_keywords: dropped invalid keyword(s) %r",
                session.id,
                session.remote_ip,
                [k for k in keywords if not _ehlo_line(k)],
            )
        return good

    async def on_mail(self, session: Session, envelope: Envelope) -> Any:
        return self._text(
            await self._decide(
                session, "bonzo_mail", session, envelope, envelope.mail_from, envelope.mail_params
            )
        )

    async def on_rcpt(
        self, session: Session, envelope: Envelope, address: str, params: dict[str, str | None]
    ) -> Any:
        verdict = await self._decide(session, "bonzo_rcpt", session, envelope, address, params)
        if verdict is None:
            raise errors.PermanentError("Recipient address rejected", 550, "5.7.1")
        return self._text(verdict)

    async def on_data(self, session: Session, envelope: Envelope) -> Any:
        return self._text(await self._decide(session, "bonzo_data", session, envelope))

    async def on_message(self, session: Session, envelope: Envelope) -> Any:
        await self._decide(session, "bonzo_message", session, envelope)
        verdict = await self._decide(session, "bonzo_deliver", session, envelope)
        if verdict is None:
            app_log.error(
                "[%s %s] No plugin delivered message %s (enable a delivery plugin such as "
                "maildir); answered 451",
                session.id,
                session.remote_ip,
                envelope.id,
            )
            raise errors.TransientError("Message not accepted, try again later", 451, "4.3.0")
        return self._text(verdict)

    async def on_accepted(self, session: Session, envelope: Envelope) -> Any:
        await self.plugins.call_observers("bonzo_accepted", session, envelope, session=session)

    async def on_reset(self, session: Session) -> Any:
        await self.plugins.call_observers("bonzo_rset", session, session=session)

    async def on_unknown(self, session: Session, verb: str, arg: str) -> Any:
        verdict = await self._decide(session, "bonzo_unknown_command", session, verb, arg)
        if isinstance(verdict, tuple):
            return verdict
        if verdict is not None:
            return (250, self._text(verdict) or "Ok")
        return None

    @property
    def auth_available(self) -> bool:  # type: ignore[override]
        """True when some plugin implements ``bonzo_auth``."""
        return bool(self.plugins.calls["bonzo_auth"])

    async def on_auth(self, session: Session, credentials: Any) -> Any:
        try:
            verdict = await self.plugins.decide(
                "bonzo_auth",
                session,
                credentials.mechanism,
                credentials.username,
                credentials.password,
                credentials.authzid,
            )
        except _Failure as failure:
            _log_failure(session, "bonzo_auth", failure.plugin, failure.error)
            raise errors.TransientError("Temporary authentication failure", 454, "4.7.0") from None
        return verdict is not None

    async def on_disconnect(self, session: Session) -> Any:
        await self.plugins.call_observers("bonzo_disconnect", session, session=session)


def hook_names() -> Iterable[str]:
    """Every hook name, sorted."""
    return sorted(HOOK_ARGS)


# Every decision hook and observer hook must have a spec; checked at import.
assert set(DECISION_HOOKS) | set(OBSERVER_HOOKS) <= set(HOOK_ARGS)
assert set(OWNER_HOOKS) <= set(DECISION_HOOKS)

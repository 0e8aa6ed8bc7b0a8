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
from .address import Address
from .config import positive_seconds
from .connection import SessionHandler, _as_future
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

    __slots__ = ("plugin", "function", "indexes", "timeout")

    def __init__(self, plugin: str, function: Any, indexes: tuple[int, ...], timeout: float):
        self.plugin = plugin
        self.function = function
        self.indexes = indexes
        self.timeout = timeout

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

    def observe(self, hook: str, *args: Any, session: Session | None = None) -> Any:
        """Run an observer hook from the connection path: ``None`` when every
        implementation was synchronous (nothing to wait for), else an awaitable
        that runs the rest, one at a time. Failures are logged."""
        calls = (self._calls or self.calls)[hook]
        for i, call in enumerate(calls):
            try:
                result = call.function(*[args[j] for j in call.indexes])
            except Exception as exc:
                _log_failure(session, hook, call.plugin, exc)
                continue
            if result is not None and inspect.isawaitable(result):
                return self._observe_from(hook, args, i, result, session)
        return None

    async def _observe_from(
        self, hook: str, args: tuple[Any, ...], index: int, pending: Any, session: Session | None
    ) -> None:
        calls = self.calls[hook]
        try:
            await _bounded(calls[index], pending)
        except Exception as exc:
            _log_failure(session, hook, calls[index].plugin, exc)
        for call in calls[index + 1 :]:
            try:
                await _invoke(call, args)
            except Exception as exc:
                _log_failure(session, hook, call.plugin, exc)

    def decide(self, hook: str, *args: Any) -> Any:
        """Run a decision hook: the first verdict wins.

        Returns the :class:`Accept` or reply string, ``None`` when nobody had
        an opinion, or, as soon as an implementation is asynchronous, an
        awaitable of one of those (so a chain of plain functions costs no
        coroutine). ``SMTPError`` from a plugin propagates as the reply;
        anything else raises :class:`_Failure`.
        """
        calls = (self._calls or self.calls)[hook]
        for i, call in enumerate(calls):
            try:
                result = call.function(*[args[j] for j in call.indexes])
            except Exception as exc:
                raise _failure(call, hook, exc) from exc
            if result is None:
                continue
            kind = type(result)
            if kind is Accept or kind is str:
                return result
            if inspect.isawaitable(result):
                return self._decide_from(hook, args, i, result)
            return _verdict(call, hook, result)
        return None

    async def _decide_from(self, hook: str, args: tuple[Any, ...], index: int, pending: Any) -> Any:
        calls = self.calls[hook]
        call = calls[index]
        try:
            result = await _bounded(call, pending)
        except Exception as exc:
            raise _failure(call, hook, exc) from exc
        if result is not None:
            return _verdict(call, hook, result)
        for call in calls[index + 1 :]:
            try:
                result = await _invoke(call, args)
            except Exception as exc:
                raise _failure(call, hook, exc) from exc
            if result is not None:
                return _verdict(call, hook, result)
        return None


def _failure(call: HookCall, hook: str, exc: BaseException) -> Exception:
    """What to raise for an exception from a decision hook: an error reply
    (4xx/5xx SMTPError) as is, anything else as a :class:`_Failure`."""
    if isinstance(exc, errors.SMTPError):
        if exc.status_code >= 400:
            return exc
        # A "rejection" with a 2xx/3xx code would tell the client that all is
        # well (for a message: that it was delivered): fail closed.
        return _Failure(
            call.plugin,
            hook,
            ValueError(f"raised an SMTPError with non-error code {exc.status_code}"),
        )
    return _Failure(call.plugin, hook, exc)


def _verdict(call: HookCall, hook: str, result: Any) -> Any:
    """Check a non-None return value of a decision hook."""
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
        result = await _bounded(call, result)
    return result


async def _bounded(call: HookCall, awaitable: Any) -> Any:
    """Await a hook's result within the plugin's timeout."""
    try:
        return await asyncio.wait_for(_as_future(awaitable), timeout=call.timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"no answer within {call.timeout}s") from None


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

    def _decide(self, session: Session | None, hook: str, then: Any, *args: Any) -> Any:
        """Run decision ``hook`` and pass its verdict to ``then``; returns
        ``then``'s result, or an awaitable of it if a plugin was async."""
        try:
            verdict = self.plugins.decide(hook, *args)
        except _Failure as failure:
            raise self._fail(session, failure) from None
        if verdict is not None and type(verdict) is not Accept and inspect.isawaitable(verdict):
            return self._decide_later(session, verdict, then)
        return then(verdict)

    async def _decide_later(self, session: Session | None, pending: Any, then: Any) -> Any:
        try:
            verdict = await pending
        except _Failure as failure:
            raise self._fail(session, failure) from None
        return then(verdict)

    def _fail(self, session: Session | None, failure: _Failure) -> errors.SMTPError:
        _log_failure(session, failure.hook, failure.plugin, failure.error)
        return self._map_exception(session, failure)

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

    def on_connect(self, session: Session) -> Any:
        return self._decide(session, "bonzo_connect", self._text, session)

    def on_helo(self, session: Session, name: str, esmtp: bool) -> Any:
        return self._decide(session, "bonzo_helo", self._text, session, name, esmtp)

    def ehlo_keywords(self, session: Session, keywords: list[str]) -> Any:
        pending = self.plugins.observe("bonzo_ehlo_keywords", session, keywords, session=session)
        if pending is not None:
            return self._keywords_later(session, keywords, pending)
        return self._check_keywords(session, keywords)

    async def _keywords_later(self, session: Session, keywords: list[str], pending: Any) -> Any:
        await pending
        return self._check_keywords(session, keywords)

    @staticmethod
    def _check_keywords(session: Session, keywords: list[str]) -> list[str]:
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

    def on_mail(self, session: Session, envelope: Envelope) -> Any:
        return self._decide(
            session,
            "bonzo_mail",
            self._text,
            session,
            envelope,
            envelope.mail_from,
            envelope.mail_params,
            envelope.sender,
        )

    def on_rcpt(
        self, session: Session, envelope: Envelope, address: str, params: dict[str, str | None]
    ) -> Any:
        mailbox = Address.parse(address)
        return self._decide(
            session, "bonzo_rcpt", _owned_recipient, session, envelope, address, params, mailbox
        )

    def on_data(self, session: Session, envelope: Envelope) -> Any:
        return self._decide(session, "bonzo_data", self._text, session, envelope)

    def on_message(self, session: Session, envelope: Envelope) -> Any:
        filtered = self._decide(session, "bonzo_message", _ignore, session, envelope)
        if filtered is not None:  # a filter was async: deliver after it
            return self._deliver_later(session, envelope, filtered)
        return self._deliver(session, envelope)

    async def _deliver_later(self, session: Session, envelope: Envelope, filtered: Any) -> Any:
        await filtered
        result = self._deliver(session, envelope)
        if result is not None and inspect.isawaitable(result):
            result = await result
        return result

    def _deliver(self, session: Session, envelope: Envelope) -> Any:
        def delivered(verdict: Any) -> str | None:
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

        return self._decide(session, "bonzo_deliver", delivered, session, envelope)

    def on_accepted(self, session: Session, envelope: Envelope) -> Any:
        return self.plugins.observe("bonzo_accepted", session, envelope, session=session)

    def on_reset(self, session: Session) -> Any:
        return self.plugins.observe("bonzo_rset", session, session=session)

    def on_unknown(self, session: Session, verb: str, arg: str) -> Any:
        return self._decide(
            session, "bonzo_unknown_command", self._unknown_reply, session, verb, arg
        )

    def _unknown_reply(self, verdict: Any) -> Any:
        if isinstance(verdict, tuple):
            return verdict
        if verdict is not None:
            return (250, self._text(verdict) or "Ok")
        return None

    @property
    def auth_available(self) -> bool:  # type: ignore[override]
        """True when some plugin implements ``bonzo_auth``."""
        return bool(self.plugins.calls["bonzo_auth"])

    def on_auth(self, session: Session, credentials: Any) -> Any:
        # A fault while checking credentials is a temporary AUTH failure
        # (454 4.7.0, RFC 4954), not a generic 451.
        try:
            verdict = self.plugins.decide(
                "bonzo_auth",
                session,
                credentials.mechanism,
                credentials.username,
                credentials.password,
                credentials.authzid,
            )
        except _Failure as failure:
            _log_failure(session, failure.hook, failure.plugin, failure.error)
            raise _auth_fault() from None
        if verdict is not None and type(verdict) is not Accept and inspect.isawaitable(verdict):
            return self._auth_later(session, verdict)
        return verdict is not None

    async def _auth_later(self, session: Session, pending: Any) -> bool:
        try:
            verdict = await pending
        except _Failure as failure:
            _log_failure(session, failure.hook, failure.plugin, failure.error)
            raise _auth_fault() from None
        return verdict is not None

    def on_disconnect(self, session: Session) -> Any:
        return self.plugins.observe("bonzo_disconnect", session, session=session)


def _ignore(verdict: Any) -> None:
    return None


def _owned_recipient(verdict: Any) -> str | None:
    if verdict is None:
        raise errors.PermanentError("Recipient address rejected", 550, "5.7.1")
    return PluginHandler._text(verdict)


def _auth_fault() -> errors.SMTPError:
    return errors.TransientError("Temporary authentication failure", 454, "4.7.0")


def hook_names() -> Iterable[str]:
    """Every hook name, sorted."""
    return sorted(HOOK_ARGS)


# Every decision hook and observer hook must have a spec; checked at import.
assert set(DECISION_HOOKS) | set(OBSERVER_HOOKS) <= set(HOOK_ARGS)
assert set(OWNER_HOOKS) <= set(DECISION_HOOKS)

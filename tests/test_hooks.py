"""The hook contract of :mod:`bonzo.hookspecs`, hook by hook.

Inline plugins (classes with ``bonzo_*`` methods) run on a fresh
:class:`~bonzo.hooks.PluginSet`, either behind a real
:class:`~bonzo.server.SMTPServer` on 127.0.0.1 (driven with smtplib or a raw
socket from the test thread while the server runs in a thread of its own) or
with :class:`~bonzo.testing.SessionTester` (SMTP bytes through the protocol
core and the dispatcher, no socket) where that is clearer.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import queue
import re
import signal
import smtplib
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
from e2e_support import RawClient, ServerThread, wait_until

from bonzo import errors, hooks, hookspecs
from bonzo.address import Address
from bonzo.app import MailApp
from bonzo.config import ConfigError, parse_config
from bonzo.hooks import HOOK_ARGS, PluginError, PluginFailure, PluginSet
from bonzo.hookspecs import DECISION_HOOKS, OBSERVER_HOOKS, OWNER_HOOKS, Accept, hookimpl
from bonzo.session import Envelope, Session
from bonzo.settings import ListenerSettings, SMTPSettings
from bonzo.testing import SessionTester

MESSAGE = "From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"
DEADLINE = 5.0


# ---------------------------------------------------------------- helpers
def plugin_set(*plugins: Any, timeout: float = 5.0) -> PluginSet:
    """A fresh PluginSet with ``(name, plugin)`` or ``(name, plugin, timeout)``
    items registered in order."""
    ps = PluginSet(timeout=timeout)
    for item in plugins:
        name, obj, *rest = item
        ps.register(obj, name, timeout=rest[0] if rest else None)
    return ps


class Owner:
    """Accepts every recipient and delivers into ``self.delivered``."""

    def __init__(self) -> None:
        self.delivered: list[bytes] = []

    def bonzo_rcpt(self, address):
        return Accept()

    def bonzo_deliver(self, envelope):
        self.delivered.append(envelope.content)
        return Accept()


@pytest.fixture
def serve(start_server: Any) -> Any:
    """``serve(plugin_set, **settings)``: an SMTPServer deciding with the
    plugin set on 127.0.0.1 (stopped after the test)."""

    def start(
        plugins: PluginSet, listener: ListenerSettings | None = None, **settings: Any
    ) -> ServerThread:
        settings.setdefault("hostname", "mx.test")
        return start_server(plugins=plugins, settings=SMTPSettings(**settings), listener=listener)

    return start


def smtp(server: ServerThread) -> smtplib.SMTP:
    return smtplib.SMTP(*server.address, local_hostname="client.test", timeout=DEADLINE)


def raw(server: ServerThread) -> RawClient:
    return RawClient(server.port, timeout=DEADLINE)


def run(result: Any) -> Any:
    """The outcome of a call: its value, or what its awaitable gives."""
    if inspect.isawaitable(result):

        async def wait() -> Any:
            return await result

        return asyncio.run(wait())
    return result


def converse(plugins: PluginSet, *chunks: bytes) -> list[bytes]:
    """Greeting and replies to each chunk, through a SessionTester."""

    async def talk() -> list[bytes]:
        tester = SessionTester(plugins)
        replies = [await tester.connect()]
        for chunk in chunks:
            replies.append(await tester.send(chunk))
        await tester.close()
        return replies

    return asyncio.run(talk())


EHLO = b"EHLO client.test\r\n"
FULL = EHLO + b"MAIL FROM:<x@example.org>\r\nRCPT TO:<y@example.org>\r\nDATA\r\nhi\r\n.\r\n"


def failures(log_watch: Any, plugin: str, hook: str) -> list[logging.LogRecord]:
    """The ERROR records (with traceback) of ``plugin`` failing in ``hook``;
    declares them expected to the suite's ``log_watch``."""
    pattern = re.escape(f"in plugin {plugin!r} ({hook})")
    log_watch.allow(pattern)
    return [
        r
        for r in log_watch.matching(pattern)
        if r.levelno >= logging.ERROR and r.exc_info is not None
    ]


def session() -> Session:
    return Session("127.0.0.1", 12345)


# ----------------------------------------------------------- registration
def test_operator_order_is_registration_order():
    calls: list[str] = []

    class P:
        def __init__(self, name: str) -> None:
            self.name = name

        def bonzo_mail(self):
            calls.append(self.name)

    ps = plugin_set(("first", P("first")), ("second", P("second")), ("third", P("third")))
    assert [c.plugin for c in ps.calls["bonzo_mail"]] == ["first", "second", "third"]
    run(ps.decide("bonzo_mail", (session(), Envelope("a@b"), "a@b", {}, Address.parse("a@b"))))
    assert calls == ["first", "second", "third"]


def test_tryfirst_and_trylast_move_an_implementation():
    class Last:
        @hookimpl(trylast=True)
        def bonzo_mail(self):
            pass

    class Plain:
        def bonzo_mail(self):
            pass

    class First:
        @hookimpl(tryfirst=True)
        def bonzo_mail(self):
            pass

    class AlsoFirst:
        @hookimpl(tryfirst=True)
        def bonzo_mail(self):
            pass

    ps = plugin_set(
        ("last", Last()), ("plain", Plain()), ("first", First()), ("alsofirst", AlsoFirst())
    )
    # Among the tryfirst ones the operator's order still holds.
    assert [c.plugin for c in ps.calls["bonzo_mail"]] == ["first", "alsofirst", "plain", "last"]
    # What the daemon reports at start: only the hooks whose order moved.
    assert ps.reordered() == {"bonzo_mail": ["first", "alsofirst", "plain", "last"]}
    assert plugin_set(("plain", Plain()), ("last", Last())).reordered() == {}


def test_call_lists_are_resolved_once_and_again_after_a_registration():
    class P:
        def bonzo_rset(self):
            pass

    ps = plugin_set(("a", P()))
    first = ps.calls
    assert ps.calls is first
    ps.register(P(), "b")
    assert [c.plugin for c in ps.calls["bonzo_rset"]] == ["a", "b"]


def test_undecorated_bonzo_functions_are_picked_up():
    module = types.ModuleType("undecorated_plugin")

    def bonzo_rcpt(address):
        return Accept()

    module.bonzo_rcpt = bonzo_rcpt  # type: ignore[attr-defined]

    class Obj:
        def bonzo_helo(self, name):
            pass

        bonzo_not_a_hook = "a string attribute is not an implementation"

    ps = plugin_set(("mod", module), ("obj", Obj()))
    assert ps.hooks_of("mod") == ["bonzo_rcpt"]
    assert ps.hooks_of("obj") == ["bonzo_helo"]


def test_keyword_subset_arguments_in_any_order(serve):
    seen: dict[str, Any] = {}

    class P:
        def bonzo_helo(self, esmtp, name):
            seen["helo"] = (esmtp, name)

        def bonzo_mail(self, params, address):
            seen["mail"] = (params, address)

        def bonzo_rcpt(self, address, envelope, session, params):
            seen["rcpt"] = (address, envelope.mail_from, session.remote_ip, params)
            return Accept()

        def bonzo_data(self):
            seen["data"] = True

    srv = serve(plugin_set(("p", P())))
    with raw(srv) as c:
        c.reply()
        assert c.command("EHLO client.test").startswith(b"250-")
        assert c.command("MAIL FROM:<a@example.org> BODY=8BITMIME").startswith(b"250")
        assert c.command("RCPT TO:<b@example.org>").startswith(b"250")
        assert c.command("DATA").startswith(b"354")
    assert seen["helo"] == (True, "client.test")
    assert seen["mail"] == ({"BODY": "8BITMIME"}, "a@example.org")
    assert seen["rcpt"] == ("b@example.org", "a@example.org", "127.0.0.1", {})
    assert seen["data"] is True


def test_registration_refuses_an_unknown_hook_name():
    class Typo:
        def bonzo_recpt(self, address):
            pass

    ps = PluginSet()
    with pytest.raises(PluginError, match=r"plugin 'typo'.*unknown hook.*bonzo_recpt") as info:
        ps.register(Typo(), "typo")
    assert "unknown hook(s) bonzo_recpt; bonzo_recpt: did you mean bonzo_rcpt? (known: " in str(
        info.value
    )

    class Decorated:
        @hookimpl
        def on_rcpt(self, address):
            pass

    with pytest.raises(PluginError, match=r"plugin 'decorated'.*unknown hook.*on_rcpt"):
        ps.register(Decorated(), "decorated")
    assert ps.names == []


def _tagged(self, mailbox, tag="x"):
    return None


class _CallableObject:
    def __call__(self, mailbox):
        return None


class _CaseTypo:
    def Bonzo_mail(self, address):
        pass

    def bonzo_rcpt(self, mailbox):
        pass


class _Partial:
    bonzo_rcpt = functools.partialmethod(_tagged, tag="y")


class _Instance:
    bonzo_rcpt = _CallableObject()


class _NoSelf:
    def bonzo_rcpt(mailbox):  # noqa: N805 - the mistake under test
        pass


@pytest.mark.parametrize(
    "plugin, message",
    [
        (_CaseTypo(), "Bonzo_mail: hook names are lower case (bonzo_mail); this one is never "
         "called"),
        (_Partial(), "bonzo_rcpt is a partial object, not a function or method: define it "
         "with def"),
        (_Instance(), "bonzo_rcpt is a _CallableObject object, not a function or method"),
        (_NoSelf(), "bonzo_rcpt: its first parameter is 'mailbox', one of the hook's arguments: "
         "a method takes self first (def bonzo_rcpt(self, mailbox, ...))"),
    ],
    ids=["capitals", "partialmethod", "callable object", "no self"],
)  # fmt: skip
def test_registration_refuses_hooks_that_would_never_work(plugin, message):
    # A callable that is not a function stopped `bonzo check` with pluggy's
    # AssertionError; the others registered and never worked.
    ps = PluginSet()
    with pytest.raises(PluginError) as info:
        ps.register(plugin, "p")
    assert str(info.value).startswith(f"plugin 'p': {message}")
    assert ps.names == []


def test_registration_refuses_a_wrong_argument_name():
    class Wrong:
        def bonzo_mail(self, address):
            pass

        def bonzo_rcpt(self, recipient):
            pass

    ps = PluginSet()
    with pytest.raises(PluginError, match=r"plugin 'wrong'.*bonzo_rcpt.*recipient"):
        ps.register(Wrong(), "wrong")
    # A refused plugin leaves nothing behind: the set keeps working and the
    # name can be used again.
    assert ps.names == []
    assert ps.calls["bonzo_mail"] == []
    ps.register(Owner(), "wrong")
    assert [c.plugin for c in ps.calls["bonzo_rcpt"]] == ["wrong"]


def test_an_argument_with_a_default_is_passed_too(serve):
    seen: dict[str, Any] = {}

    class P:
        def bonzo_rcpt(self, mailbox, session=None, envelope=None):
            seen["rcpt"] = (mailbox.canonical, session.remote_ip, envelope.mail_from)
            return Accept()

    srv = serve(plugin_set(("p", P())))
    with raw(srv) as c:
        c.reply()
        assert c.command("EHLO client.test").startswith(b"250-")
        assert c.command("MAIL FROM:<a@example.org>").startswith(b"250")
        assert c.command("RCPT TO:<B@Example.ORG>").startswith(b"250")
    assert seen["rcpt"] == ("B@example.org", "127.0.0.1", "a@example.org")


class TypoDefault:
    def bonzo_rcpt(self, mailbox, sesion=None):
        return Accept()


class Typo:
    def bonzo_rcpt(self, adress):
        return Accept()


class KeywordOnly:
    def bonzo_rcpt(self, *, mailbox):
        return Accept()


class VarKeyword:
    def bonzo_rcpt(self, **kwargs):
        return Accept()


class VarPositional:
    def bonzo_rcpt(self, *args):
        return Accept()


@pytest.mark.parametrize(
    "plugin, message",
    [
        (
            TypoDefault,
            r"bonzo_rcpt has the parameter 'sesion', which is not one of its arguments "
            r"\(session, envelope, address, params, mailbox, dsn\); did you mean 'session'\?$",
        ),
        (
            Typo,
            r"bonzo_rcpt has the parameter 'adress', which is not one of its arguments "
            r"\(session, envelope, address, params, mailbox, dsn\); did you mean 'address'\?$",
        ),
        (KeywordOnly, r"bonzo_rcpt has the keyword-only parameter 'mailbox'"),
        (VarKeyword, r"bonzo_rcpt takes \*\*kwargs"),
        (VarPositional, r"bonzo_rcpt takes \*args"),
    ],
)
def test_registration_refuses_parameters_that_would_get_nothing(plugin, message):
    # Each of these would register and then silently receive nothing (or
    # fail at every call): refused at once, naming the plugin and the hook.
    ps = PluginSet()
    with pytest.raises(PluginError, match=r"plugin 'p': " + message):
        ps.register(plugin(), "p")
    assert ps.names == []
    assert ps.calls["bonzo_rcpt"] == []


@pytest.mark.parametrize("option", ["hookwrapper", "wrapper"])
def test_registration_refuses_hook_wrappers(option):
    class Wrapper:
        @hookimpl(**{option: True})
        def bonzo_rcpt(self, address):
            yield

    ps = PluginSet()
    with pytest.raises(PluginError, match=r"plugin 'wrapping'.*bonzo_rcpt.*wrapper"):
        ps.register(Wrapper(), "wrapping")
    assert ps.names == []
    assert ps.calls["bonzo_rcpt"] == []


class GeneratorRcpt:
    def bonzo_rcpt(self, address):
        yield Accept()  # a leftover yield: the hook would return a generator


class AsyncGeneratorHelo:
    async def bonzo_helo(self, name):
        if name.endswith(".invalid"):
            yield None


class GeneratorAccepted:
    def bonzo_accepted(self, envelope):
        yield  # its body (the journal write) would never run


class AsyncGeneratorDisconnect:
    async def bonzo_disconnect(self):
        await asyncio.sleep(0)
        yield


class GeneratorConfigure:
    def bonzo_configure(self, config):
        if "limit" not in config:
            raise ValueError("limit: required")  # would never be checked
        yield


class GeneratorStartup:
    def bonzo_startup(self, app):
        yield


@pytest.mark.parametrize(
    "plugin, hook, kind",
    [
        (GeneratorRcpt, "bonzo_rcpt", "a generator"),
        (AsyncGeneratorHelo, "bonzo_helo", "an async generator"),
        (GeneratorAccepted, "bonzo_accepted", "a generator"),
        (AsyncGeneratorDisconnect, "bonzo_disconnect", "an async generator"),
        (GeneratorConfigure, "bonzo_configure", "a generator"),
        (GeneratorStartup, "bonzo_startup", "a generator"),
    ],
)
def test_registration_refuses_generators(plugin, hook, kind):
    # A decision hook would fail at every call; an observer, configure or
    # startup would silently never run its body.
    ps = PluginSet()
    with pytest.raises(PluginError) as info:
        ps.register(plugin(), "gen")
    assert str(info.value) == (
        f"plugin 'gen': {hook} is {kind} (it has a yield), so its body would never run; "
        "a hook must return its answer"
    )
    assert ps.names == []
    assert ps.calls[hook] == []
    module = types.ModuleType("generator_plugin")

    def bonzo_rcpt(address):
        yield Accept()

    module.bonzo_rcpt = bonzo_rcpt  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match="'module': bonzo_rcpt is a generator"):
        ps.register(module, "module")


def _logged(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)

    return wrapper


def _hidden_accepted(function):
    def bonzo_accepted(self, envelope):  # no functools.wraps: nothing says a generator is inside
        return function(self, envelope)

    return bonzo_accepted


def _hidden_configure(function):
    def bonzo_configure(self, config):
        return function(self, config)

    return bonzo_configure


def test_a_generator_behind_a_decorator_is_refused_or_a_fault(caplog, log_watch):
    """Behind functools.wraps, registration sees the generator; behind a
    decorator that hides it, the generator returned is a fault, logged,
    never a result silently dropped."""

    class Wrapped:
        @_logged
        def bonzo_accepted(self, envelope):
            yield

    with pytest.raises(PluginError, match="bonzo_accepted is a generator"):
        PluginSet().register(Wrapped(), "wrapped")

    class Hidden:
        @_hidden_accepted
        def bonzo_accepted(self, envelope):
            yield

        @_hidden_configure
        def bonzo_configure(self, config):
            yield

    ps = PluginSet()
    ps.register(Hidden(), "hidden")
    log_watch.allow(r"in plugin 'hidden' \(bonzo_accepted\): returned a generator")
    asyncio.run(ps.observe("bonzo_accepted", (None, None)))
    assert "returned a generator (a yield in the hook?)" in caplog.text
    assert "'hidden'" in caplog.text
    with pytest.raises(PluginError, match="plugin 'hidden'.*returned a generator"):
        ps.call_sync("bonzo_configure", {})


def test_a_generator_based_coroutine_is_an_awaitable_not_a_generator(serve):
    class OldStyle:
        @types.coroutine
        def bonzo_rcpt(self, address):
            yield from asyncio.sleep(0).__await__()
            return Accept() if address.startswith("b") else None

    srv = serve(plugin_set(("old", OldStyle())))
    with smtp(srv) as c:
        c.ehlo()
        c.mail("a@example.org")
        assert c.rcpt("b@example.org") == (250, b"2.1.5 Ok")


def test_a_generator_configure_fails_the_configuration(plugin_module):
    plugin_module.GeneratorConfigure = GeneratorConfigure
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config(app_config("GeneratorConfigure"), source="t.toml"))
    assert str(info.value) == (
        "t.toml: plugins.enabled: plugin 'bonzo_hooktest_plugins:GeneratorConfigure': "
        "bonzo_configure is a generator (it has a yield), so its body would never run; a hook "
        "must return its answer"
    )


@pytest.mark.parametrize("hook", ["bonzo_configure", "bonzo_exception"])
def test_registration_refuses_async_sync_only_hooks(hook):
    class AsyncConfigure:
        async def bonzo_configure(self, config):
            pass

    class AsyncException:
        async def bonzo_exception(self, error):
            pass

    plugin = AsyncConfigure() if hook == "bonzo_configure" else AsyncException()
    ps = PluginSet()
    with pytest.raises(PluginError, match=rf"plugin 'asyncplug'.*{hook} must not be async"):
        ps.register(plugin, "asyncplug")
    assert ps.names == []
    assert ps.calls[hook] == []


def test_registration_refuses_a_name_twice_and_bad_timeouts():
    ps = plugin_set(("p", Owner()))
    with pytest.raises(PluginError, match="'p' is registered twice"):
        ps.register(Owner(), "p")
    for bad in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(PluginError, match="timeout"):
            ps.register(Owner(), "q", timeout=bad)
    with pytest.raises(ValueError, match="timeout"):
        PluginSet(timeout=0)


def test_every_hook_spec_is_documented_and_classified():
    for name in HOOK_ARGS:
        spec = getattr(hookspecs, name)
        assert spec.__doc__ and "versionadded" in spec.__doc__, name
    classified = set(DECISION_HOOKS) | set(OBSERVER_HOOKS) | {"bonzo_configure", "bonzo_exception"}
    assert classified == set(HOOK_ARGS)
    assert set(OWNER_HOOKS) == {"bonzo_rcpt", "bonzo_deliver", "bonzo_quarantine"}


# ------------------------------------------------------ sync/async, order
def test_sync_and_async_implementations_are_awaited_one_at_a_time():
    log: list[str] = []

    class AsyncA:
        async def bonzo_mail(self):
            log.append("a start")
            await asyncio.sleep(0.02)
            log.append("a end")

        async def bonzo_accepted(self):
            log.append("accepted a start")
            await asyncio.sleep(0.02)
            log.append("accepted a end")

    class SyncB:
        def bonzo_mail(self):
            log.append("b")

        def bonzo_accepted(self):
            log.append("accepted b")

    class AwaitableC:
        # A plain function returning an awaitable (not a coroutine function).
        def bonzo_mail(self):
            log.append("c called")

            async def later():
                await asyncio.sleep(0.01)
                log.append("c end")

            return later()

        def bonzo_accepted(self):
            future = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.01, future.set_result, None)
            log.append("accepted c")
            return future

    ps = plugin_set(("a", AsyncA()), ("b", SyncB()), ("c", AwaitableC()), ("owner", Owner()))

    async def both_sessions():
        # Two sessions at once: each one's chain still runs one at a time.
        one, two = SessionTester(ps), SessionTester(ps)
        await one.connect()
        await two.connect()
        await one.send(FULL)
        assert log[-1] == "accepted c"
        await asyncio.gather(two.send(EHLO), asyncio.sleep(0))

    run(both_sessions())
    assert log == [
        "a start",
        "a end",
        "b",
        "c called",
        "c end",
        "accepted a start",
        "accepted a end",
        "accepted b",
        "accepted c",
    ]


def test_an_async_verdict_is_awaited_before_the_reply(serve):
    class Slow:
        async def bonzo_rcpt(self, address):
            await asyncio.sleep(0.05)
            if address.startswith("yes"):
                return Accept("Slowly accepted")

    srv = serve(plugin_set(("slow", Slow())))
    with smtp(srv) as c:
        c.ehlo()
        c.mail("a@example.org")
        assert c.rcpt("yes@example.org") == (250, b"2.1.5 Slowly accepted")
        assert c.rcpt("no@example.org") == (550, b"5.7.1 Recipient address rejected")


# --------------------------------------------------------- decision hooks
def test_decision_hooks_stop_at_the_first_verdict(serve):
    log: list[str] = []

    def plugin(name: str, verdict: Any) -> object:
        class P:
            def bonzo_mail(self, address):
                log.append(name)
                if isinstance(verdict, Exception):
                    raise verdict
                return verdict

        return P()

    for verdict, expected in [
        (Accept(), (250, b"2.1.0 Ok")),
        (Accept("Sender fine"), (250, b"2.1.0 Sender fine")),
        ("Sender ok, really", (250, b"2.1.0 Sender ok, really")),
        (errors.PermanentError("Sender refused", 550, "5.7.1"), (550, b"5.7.1 Sender refused")),
    ]:
        log.clear()
        ps = plugin_set(
            ("none", plugin("none", None)),
            ("decider", plugin("decider", verdict)),
            ("never", plugin("never", Accept("never"))),
        )
        srv = serve(ps)
        with smtp(srv) as c:
            c.ehlo()
            assert c.mail("a@example.org") == expected
        assert log == ["none", "decider"], verdict


def test_non_owner_hooks_accept_when_nobody_has_an_opinion(serve):
    class NoOpinion:
        def bonzo_connect(self):
            pass

        def bonzo_helo(self):
            pass

        def bonzo_mail(self):
            pass

        def bonzo_data(self):
            pass

        def bonzo_message(self):
            pass

        def bonzo_rcpt(self, address):
            return Accept() if address.startswith("ok") else None

        def bonzo_deliver(self):
            return Accept()

    srv = serve(plugin_set(("p", NoOpinion())))
    with smtp(srv) as c:
        assert c.ehlo()[0] == 250
        assert c.sendmail("a@example.org", ["ok@example.org"], MESSAGE) == {}


def test_rcpt_needs_an_owner(serve):
    class NoOpinion:
        def bonzo_rcpt(self, address):
            return None

    for ps in (plugin_set(), plugin_set(("p", NoOpinion()))):
        srv = serve(ps)
        with smtp(srv) as c:
            c.ehlo()
            assert c.mail("a@example.org")[0] == 250
            assert c.rcpt("b@example.org") == (550, b"5.7.1 Recipient address rejected")
            c.rset()
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                c.sendmail("a@example.org", ["b@example.org"], MESSAGE)


def test_rcpt_rejection_and_accepted_recipients_reach_the_envelope(serve):
    class Picky:
        def bonzo_rcpt(self, address):
            if address.startswith("full"):
                raise errors.TransientError("Mailbox full", 452, "4.2.2")
            if address.startswith("ok"):
                return "Recipient ok"

        def bonzo_deliver(self, envelope):
            self.rcpts = list(envelope.rcpt_tos)
            return Accept()

    picky = Picky()
    srv = serve(plugin_set(("picky", picky)))
    with smtp(srv) as c:
        c.ehlo()
        c.mail("a@example.org")
        assert c.rcpt("ok1@example.org") == (250, b"2.1.5 Recipient ok")
        assert c.rcpt("full@example.org") == (452, b"4.2.2 Mailbox full")
        assert c.rcpt("nobody@example.org")[0] == 550
        assert c.rcpt("ok2@example.org")[0] == 250
        c.data(MESSAGE)
    assert picky.rcpts == ["ok1@example.org", "ok2@example.org"]


def test_deliver_needs_an_owner(log_watch, serve):
    class OnlyRcpt:
        def bonzo_rcpt(self):
            return Accept()

    class NoOpinion:
        def bonzo_deliver(self):
            return None

    for ps in (
        plugin_set(("rcpt", OnlyRcpt())),
        plugin_set(("rcpt", OnlyRcpt()), ("nope", NoOpinion())),
    ):
        srv = serve(ps)
        with smtp(srv) as c:
            c.ehlo()
            with pytest.raises(smtplib.SMTPDataError) as info:
                c.sendmail("a@example.org", ["b@example.org"], MESSAGE)
            assert (info.value.smtp_code, info.value.smtp_error[:5]) == (451, b"4.3.0")
    log_watch.allow("No plugin delivered")
    assert log_watch.matching(r"No plugin delivered message \w+ .*answered 451")


def test_deliver_first_acceptance_wins_and_its_text_is_the_reply(serve):
    calls: list[str] = []

    class Store:
        def __init__(self, name: str, verdict: Any) -> None:
            self.name, self.verdict = name, verdict

        def bonzo_deliver(self, envelope):
            calls.append(self.name)
            if isinstance(self.verdict, Exception):
                raise self.verdict
            return self.verdict

    class Rcpt:
        def bonzo_rcpt(self):
            return Accept()

    ps = plugin_set(
        ("rcpt", Rcpt()),
        ("skip", Store("skip", None)),
        ("store", Store("store", Accept("Stored as 42"))),
        ("never", Store("never", Accept())),
    )
    srv = serve(ps)
    with raw(srv) as c:
        c.reply()
        c.command("EHLO client.test")
        c.command("MAIL FROM:<a@example.org>")
        c.command("RCPT TO:<b@example.org>")
        c.command("DATA")
        assert c.command(MESSAGE.encode() + b".") == b"250 2.0.0 Stored as 42\r\n"
    assert calls == ["skip", "store"]

    calls.clear()
    ps = plugin_set(
        ("rcpt", Rcpt()),
        ("disk", Store("disk", errors.TransientError("Disk full", 452, "4.3.1"))),
        ("never", Store("never", Accept())),
    )
    srv = serve(ps)
    with smtp(srv) as c:
        c.ehlo()
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail("a@example.org", ["b@example.org"], MESSAGE)
        assert (info.value.smtp_code, info.value.smtp_error) == (452, b"4.3.1 Disk full")
    assert calls == ["disk"]


def test_connect_can_replace_the_greeting(serve):
    class Quiet:
        def bonzo_connect(self, session):
            return None

    class Greeter:
        def bonzo_connect(self, session):
            return f"Welcome {session.remote_ip}"

    srv = serve(plugin_set(("quiet", Quiet()), ("greeter", Greeter())))
    with raw(srv) as c:
        assert c.reply() == b"220 Welcome 127.0.0.1\r\n"
    srv = serve(plugin_set(("quiet", Quiet())))
    with raw(srv) as c:
        assert c.reply() == b"220 mx.test ESMTP\r\n"


def test_connect_rejection_closes_the_connection_after_its_reply(serve):
    seen: list[str] = []

    class Refuse:
        def bonzo_connect(self, session):
            raise errors.PermanentError("No service for you", 554, "5.7.1")

    class Watch:
        def bonzo_helo(self):
            seen.append("helo")

        def bonzo_disconnect(self, session):
            seen.append("disconnect")

    srv = serve(plugin_set(("refuse", Refuse()), ("watch", Watch())))
    with raw(srv) as c:
        assert c.reply() == b"554 5.7.1 No service for you\r\n"
        assert c.read_to_eof() == b""
        wait_until(lambda: seen == ["disconnect"])


SHARED_REFUSAL = errors.TransientError("Slow down", 451, "4.7.1")


@pytest.mark.parametrize(
    "raised, sent",
    [
        (SHARED_REFUSAL, b"421 4.7.1 Slow down\r\n"),
        (errors.PermanentError("Go away", 550, "5.7.1"), b"554 5.7.1 Go away\r\n"),
        (errors.SMTPError(421, "Busy", enhanced_code="4.3.2"), b"421 4.3.2 Busy\r\n"),
        (errors.SMTPError(554, "No"), b"554 5.0.0 No\r\n"),
    ],
    ids=["451", "550", "421", "554"],
)
def test_only_421_or_554_stands_in_for_the_greeting(serve, raised, sent):
    # RFC 5321 3.1, 4.3.2: a client that gets "451" as its first line sees
    # a broken server, not a refusal.
    class Refuse:
        def bonzo_connect(self, session):
            raise raised

    srv = serve(plugin_set(("refuse", Refuse())))
    with raw(srv) as c:
        assert c.reply() == sent
        assert c.read_to_eof() == b""
    # The plugin's own object is not changed (it may be shared).
    assert (SHARED_REFUSAL.status_code, SHARED_REFUSAL.close) == (451, False)


def test_helo_and_ehlo_rejections(serve):
    class NoHelo:
        def bonzo_helo(self, name, esmtp):
            if name == "bad.test":
                raise errors.PermanentError(f"Bad {'EHLO' if esmtp else 'HELO'}", 550, "5.7.1")
            if name == "nice.test":
                return Accept("Nice to meet you")

    srv = serve(plugin_set(("nohelo", NoHelo())))
    with raw(srv) as c:
        c.reply()
        assert c.command("HELO bad.test") == b"550 5.7.1 Bad HELO\r\n"
        assert c.command("EHLO bad.test") == b"550 5.7.1 Bad EHLO\r\n"
        assert c.command("MAIL FROM:<a@example.org>").startswith(b"503")
        assert c.command("HELO nice.test") == b"250 Nice to meet you\r\n"
        ehlo = c.command("EHLO nice.test")
        assert ehlo.startswith(b"250-Nice to meet you\r\n")


def test_mail_rejection(serve):
    class NoSpam:
        def bonzo_mail(self, address, params):
            if address.endswith("@spam.test"):
                raise errors.PermanentError("Sender refused", 550, "5.7.1")
            if params.get("SIZE") == "999":
                raise errors.TransientError("Try later", 451, "4.7.1")

    srv = serve(plugin_set(("nospam", NoSpam()), ("owner", Owner())))
    with smtp(srv) as c:
        c.ehlo()
        assert c.mail("x@spam.test") == (550, b"5.7.1 Sender refused")
        assert c.mail("x@ok.test", ["SIZE=999"]) == (451, b"4.7.1 Try later")
        assert c.mail("") == (250, b"2.1.0 Ok")


def test_data_rejection_and_text(serve):
    class Gate:
        def __init__(self) -> None:
            self.envelopes: list[list[str]] = []

        def bonzo_data(self, session, envelope):
            self.envelopes.append(list(envelope.rcpt_tos))
            if "late@example.org" in envelope.rcpt_tos:
                raise errors.TransientError("Not now", 451, "4.7.1")
            return "Go ahead"

    gate = Gate()
    srv = serve(plugin_set(("owner", Owner()), ("gate", gate)))
    with raw(srv) as c:
        c.reply()
        c.command("EHLO client.test")
        c.command("MAIL FROM:<a@example.org>")
        c.command("RCPT TO:<late@example.org>")
        assert c.command("DATA") == b"451 4.7.1 Not now\r\n"
        assert c.command("RSET").startswith(b"250")
        c.command("MAIL FROM:<a@example.org>")
        c.command("RCPT TO:<b@example.org>")
        assert c.command("DATA") == b"354 Go ahead\r\n"
    assert gate.envelopes == [["late@example.org"], ["b@example.org"]]


def test_message_filters_run_in_order_and_can_refuse(serve):
    calls: list[str] = []

    class Filter:
        def __init__(self, name: str) -> None:
            self.name = name

        def bonzo_message(self, envelope):
            calls.append(self.name)
            if b"SPAM" in envelope.content:
                raise errors.PermanentError("Spam refused", 554, "5.7.1")

    owner = Owner()
    ps = plugin_set(("rcpt", owner), ("f1", Filter("f1")), ("f2", Filter("f2")))
    srv = serve(ps)
    with smtp(srv) as c:
        c.ehlo()
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail("a@example.org", ["b@example.org"], "Subject: SPAM\r\n\r\nbuy\r\n")
        assert (info.value.smtp_code, info.value.smtp_error) == (554, b"5.7.1 Spam refused")
        assert c.sendmail("a@example.org", ["b@example.org"], MESSAGE) == {}
    assert calls == ["f1", "f1", "f2"]
    assert len(owner.delivered) == 1


def test_message_accept_skips_the_remaining_filters_but_not_delivery(serve):
    calls: list[str] = []

    class Whitelist:
        def bonzo_message(self, envelope):
            calls.append("whitelist")
            return Accept()

    class Filter:
        def bonzo_message(self, envelope):
            calls.append("filter")

    owner = Owner()
    ps = plugin_set(("owner", owner), ("whitelist", Whitelist()), ("filter", Filter()))
    srv = serve(ps)
    with smtp(srv) as c:
        c.ehlo()
        assert c.sendmail("a@example.org", ["b@example.org"], MESSAGE) == {}
    assert calls == ["whitelist"]
    assert len(owner.delivered) == 1


def test_message_hook_adds_headers_that_the_deliverer_sees(serve):
    class Tagger:
        def bonzo_message(self, session, envelope):
            envelope.add_header("X-Tag", f"tagged {session.remote_ip}")
            envelope.stash["tagger"] = "seen"

    class Store:
        def bonzo_rcpt(self):
            return Accept()

        def bonzo_deliver(self, envelope):
            self.message = envelope.message
            self.content = envelope.content
            self.stash = dict(envelope.stash)
            return Accept()

    store = Store()
    srv = serve(plugin_set(("tagger", Tagger()), ("store", store)))
    with smtp(srv) as c:
        c.ehlo()
        c.sendmail("a@example.org", ["b@example.org"], MESSAGE)
    assert store.message["X-Tag"] == "tagged 127.0.0.1"
    assert store.message["Subject"] == "hi"
    # The trace header comes first, then the plugin's, then the client's content.
    assert store.content.startswith(b"Received: ")
    assert b"\r\nX-Tag: tagged 127.0.0.1\r\nFrom: a@example.org\r\n" in store.content
    assert store.stash == {"tagger": "seen"}


# ------------------------------------------------------------ fail closed
def test_unexpected_exception_answers_451_names_the_plugin_and_leaks_nothing(log_watch, serve):
    class Broken:
        def bonzo_mail(self, address):
            raise RuntimeError("database password is hunter2")

    srv = serve(plugin_set(("broken", Broken())))
    with raw(srv) as c:
        c.reply()
        c.command("EHLO client.test")
        reply = c.command("MAIL FROM:<a@example.org>")
    assert reply == b"451 4.3.0 Internal confusion\r\n"
    assert b"hunter2" not in reply
    records = failures(log_watch, "broken", "bonzo_mail")
    assert len(records) == 1
    assert "hunter2" in records[0].getMessage()
    assert records[0].exc_info[0] is RuntimeError


@pytest.mark.parametrize(
    "hook, failing_step, reply",
    [
        # A fault at connect is no greeting: 421, and the connection closes.
        (
            "bonzo_connect",
            0,
            b"421 4.3.0 Service not available, closing transmission channel\r\n",
        ),
        # Enhanced status codes even before EHLO (RFC 2034 4).
        ("bonzo_helo", 1, b"451 4.3.0 Internal confusion\r\n"),
        ("bonzo_data", 4, b"451 4.3.0 Internal confusion\r\n"),
        ("bonzo_message", 5, b"451 4.3.0 Internal confusion\r\n"),
    ],
)
def test_unexpected_exception_in_any_decision_hook_answers_451(
    hook, failing_step, reply, log_watch, serve
):
    class Broken:
        pass

    def boom(self):
        raise KeyError("secret-key")

    setattr(Broken, hook, boom)
    owner = Owner()
    steps = ["EHLO client.test", "MAIL FROM:<a@example.org>", "RCPT TO:<b@x.test>", "DATA"]
    steps.append(MESSAGE + ".")
    srv = serve(plugin_set(("owner", owner), ("broken", Broken())))
    with raw(srv) as c:
        replies = [c.reply()] + [c.command(line) for line in steps[:failing_step]]
        if hook == "bonzo_connect":
            assert c.read_to_eof() == b""
    assert replies[-1] == reply
    assert all(r[:1] in b"23" for r in replies[:-1])
    assert b"secret-key" not in b"".join(replies)
    assert failures(log_watch, "broken", hook)
    assert owner.delivered == []


def test_wrong_return_type_answers_451(log_watch, serve):
    class Wrong:
        def bonzo_rcpt(self, address):
            return 42 if address.startswith("int") else True

    srv = serve(plugin_set(("wrong", Wrong())))
    with smtp(srv) as c:
        c.ehlo()
        c.mail("a@example.org")
        assert c.rcpt("int@example.org") == (451, b"4.3.0 Internal confusion")
        assert c.rcpt("bool@example.org") == (451, b"4.3.0 Internal confusion")
    records = failures(log_watch, "wrong", "bonzo_rcpt")
    assert len(records) == 2
    assert "returned int" in records[0].getMessage()


def test_a_raised_non_error_reply_fails_closed(log_watch, serve):
    """Raising an SMTPError is a rejection: a 2xx code there must not tell
    the client that a message nobody stored was delivered."""

    class Liar:
        def bonzo_rcpt(self):
            return Accept()

        def bonzo_deliver(self):
            raise errors.SMTPError(250, "Sure, delivered")

    srv = serve(plugin_set(("liar", Liar())))
    with smtp(srv) as c:
        c.ehlo()
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail("a@example.org", ["b@example.org"], MESSAGE)
        assert info.value.smtp_code == 451
    assert failures(log_watch, "liar", "bonzo_deliver")


def test_async_timeout_per_plugin_answers_451(log_watch, serve):
    class Slow:
        async def bonzo_rcpt(self, address):
            await asyncio.sleep(30)

    class Patient:
        async def bonzo_rcpt(self, address):
            await asyncio.sleep(0.3)  # longer than slow's limit, within its own
            return Accept()

    ps = plugin_set(("patient", Patient()), ("slow", Slow(), 0.1), timeout=5.0)
    assert [c.timeout for c in ps.calls["bonzo_rcpt"]] == [5.0, 0.1]
    srv = serve(ps)
    with smtp(srv) as c:
        c.ehlo()
        c.mail("a@example.org")
        assert c.rcpt("b@example.org") == (250, b"2.1.5 Ok")

    ps = plugin_set(("slow", Slow(), 0.1), ("patient", Patient()), timeout=5.0)
    srv = serve(ps)
    with smtp(srv) as c:
        c.ehlo()
        c.mail("a@example.org")
        started = time.monotonic()
        assert c.rcpt("b@example.org") == (451, b"4.3.0 Internal confusion")
        assert time.monotonic() - started < 3
    # One line, no traceback: it would show only the hook runner.
    log_watch.allow(re.escape("in plugin 'slow' (bonzo_rcpt)"))
    [record] = log_watch.matching(re.escape("in plugin 'slow' (bonzo_rcpt)"))
    assert record.levelno == logging.ERROR and record.exc_info is None
    assert record.getMessage().endswith(": no answer within 0.1s (its time limit)")
    assert failures(log_watch, "slow", "bonzo_rcpt") == []


def test_a_hook_out_of_time_names_the_plugin_s_backend(log_watch):
    class Scanner:
        backend = "127.0.0.1:3310"

        async def bonzo_rcpt(self, address):
            await asyncio.sleep(5)

    ps = plugin_set(("scanner", Scanner(), 0.1), timeout=5.0)
    replies = converse(ps, EHLO, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
    assert replies[-1].endswith(b"451 4.3.0 Internal confusion\r\n")
    log_watch.allow(re.escape("in plugin 'scanner' (bonzo_rcpt)"))
    [record] = log_watch.matching(re.escape("in plugin 'scanner' (bonzo_rcpt)"))
    assert record.getMessage().endswith(
        ": no answer within 0.1s (its time limit; its backend: 127.0.0.1:3310)"
    )


@pytest.mark.parametrize("kind", ["async", "plain"])
def test_a_hook_that_blocks_the_loop_past_its_limit_is_named(log_watch, kind):
    # Neither can be stopped while it blocks the loop, and what it did (a
    # delivery, say) is done: its verdict stands, but the block is logged.
    class BlockingAsync:
        async def bonzo_rcpt(self, address):
            time.sleep(0.3)
            return Accept()

    class BlockingPlain:
        def bonzo_rcpt(self, address):
            time.sleep(0.3)
            return Accept()

    plugin = BlockingAsync() if kind == "async" else BlockingPlain()
    ps = plugin_set(("blocking", plugin, 0.1), timeout=5.0)
    replies = converse(ps, EHLO, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
    assert replies[-1].endswith(b"250 2.1.5 Ok\r\n")
    [record] = log_watch.matching(
        re.escape("plugin 'blocking' (bonzo_rcpt) blocked the event loop")
    )
    assert record.levelno == logging.WARNING
    assert re.search(
        r"blocked the event loop for 0\.\ds, past its time limit of 0\.1s \(blocking work "
        r"belongs in a thread: asyncio.to_thread\)$",
        record.getMessage(),
    ), record.getMessage()


def test_a_timeout_error_the_plugin_raises_is_its_own(log_watch):
    # Only the plugin's time limit running out reads "no answer within";
    # the plugin's own TimeoutError (its LDAP server's, say) keeps its text.
    class Directory:
        async def bonzo_rcpt(self, address):
            raise TimeoutError("directory server timed out after 0.01s")

    ps = plugin_set(("directory", Directory()), timeout=5.0)
    replies = converse(ps, EHLO, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
    assert replies[-1].endswith(b"451 4.3.0 Internal confusion\r\n")
    record = failures(log_watch, "directory", "bonzo_rcpt")[0]
    assert "directory server timed out" in record.getMessage()
    assert "no answer within" not in record.getMessage()


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 cannot tell a task's cancellation apart"
)
def test_a_cancelled_error_from_a_plugin_is_its_failure_not_the_end_of_the_session(
    log_watch, serve
):
    class Cancelling:
        async def bonzo_rcpt(self, address):
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future  # a cancelled operation of the plugin's own

        def bonzo_rset(self):
            raise asyncio.CancelledError()

    srv = serve(plugin_set(("cancelling", Cancelling())))
    with raw(srv) as c:
        c.reply()
        # Pipelined: the replies before the failure are not lost either.
        c.send(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
        ehlo, mail, rcpt = c.replies(3)
        assert ehlo.startswith(b"250-") and mail.startswith(b"250 ")
        assert rcpt == b"451 4.3.0 Internal confusion\r\n"
        assert c.command("RSET") == b"250 2.0.0 Ok\r\n"  # an observer: logged only
        assert c.command("NOOP") == b"250 2.0.0 Ok\r\n"
    assert failures(log_watch, "cancelling", "bonzo_rcpt")[0].exc_info[0] is asyncio.CancelledError
    assert failures(log_watch, "cancelling", "bonzo_rset")


def test_system_exit_in_a_hook_is_a_failure_and_the_server_keeps_serving(log_watch, serve):
    class Exiting:
        def bonzo_rcpt(self, address):
            raise SystemExit(3)

        def bonzo_rset(self):
            sys.exit("observer")

    srv = serve(plugin_set(("exiting", Exiting())))
    for _ in range(2):
        with smtp(srv) as c:
            c.ehlo()
            c.mail("a@example.org")
            assert c.rcpt("b@example.org") == (451, b"4.3.0 Internal confusion")
            assert c.rset()[0] == 250
    assert len(failures(log_watch, "exiting", "bonzo_rcpt")) == 2
    assert len(failures(log_watch, "exiting", "bonzo_rset")) == 2


class LibraryTimeout(BaseException):
    """As gevent's or eventlet's Timeout: a library's BaseException."""


class GreenletExit(BaseException):
    """As greenlet's GreenletExit."""


@pytest.mark.parametrize("error", [KeyboardInterrupt, LibraryTimeout, GreenletExit])
def test_any_base_exception_a_plugin_raises_is_its_fault(log_watch, serve, error):
    # The server's loop runs in a thread of its own, as under bonzo serve it
    # runs with SIGINT taken by the loop: a KeyboardInterrupt there is the
    # plugin's, and none of these may end the session, let alone the server.
    class Fragile:
        def bonzo_rcpt(self, address):
            if address.startswith("fail"):
                raise error("backend timed out")

        async def bonzo_data(self):
            await asyncio.sleep(0)
            raise error("async backend timed out")

        def bonzo_rset(self):
            raise error("observer")

    srv = serve(plugin_set(("fragile", Fragile()), ("owner", Owner())))
    with smtp(srv) as idle:
        idle.ehlo()
        for _ in range(2):
            with smtp(srv) as c:
                c.ehlo()
                c.mail("a@example.org")
                assert c.rcpt("fail@example.org") == (451, b"4.3.0 Internal confusion")
                assert c.rset()[0] == 250  # an observer: logged only
                c.mail("a@example.org")
                assert c.rcpt("b@example.org")[0] == 250
                assert c.docmd("DATA") == (451, b"4.3.0 Internal confusion")
                assert c.noop()[0] == 250
        assert idle.noop()[0] == 250  # another session never noticed
    for hook in ("bonzo_rcpt", "bonzo_data", "bonzo_rset"):
        records = failures(log_watch, "fragile", hook)
        assert len(records) == 2 and records[0].exc_info[0] is error, hook


def test_a_keyboard_interrupt_that_may_be_ctrl_c_goes_on_up(log_watch):
    """In the main thread with Python's own SIGINT handler a KeyboardInterrupt
    may be the user's Ctrl-C: it is not swallowed as a plugin's fault. With
    SIGINT handled otherwise (bonzo serve's loop takes it) it is the plugin's."""

    class Interrupted:
        def bonzo_mail(self):
            raise KeyboardInterrupt

        async def bonzo_rset(self):
            await asyncio.sleep(0)
            raise KeyboardInterrupt

    ps = plugin_set(("interrupted", Interrupted()))
    mail = tuple(None for _ in HOOK_ARGS["bonzo_mail"])
    rset = tuple(None for _ in HOOK_ARGS["bonzo_rset"])
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    loop = asyncio.new_event_loop()  # no handler of its own, unlike asyncio.run()
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(ps.decide("bonzo_mail", mail))
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(ps.observe("bonzo_rset", rset))
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        with pytest.raises(PluginFailure) as info:
            loop.run_until_complete(ps.decide("bonzo_mail", mail))
        assert type(info.value.error) is KeyboardInterrupt
        loop.run_until_complete(ps.observe("bonzo_rset", rset))
    finally:
        loop.close()
        signal.signal(signal.SIGINT, previous)
    assert failures(log_watch, "interrupted", "bonzo_rset")


def test_closing_a_hook_call_is_not_taken_for_a_fault(log_watch):
    # GeneratorExit is Python closing the coroutine (its task dropped): made
    # a PluginFailure, close() would raise instead of closing.
    closed: list[str] = []

    class Waits:
        async def bonzo_rcpt(self, address):
            try:
                await asyncio.sleep(30)
            finally:
                closed.append(address)

    ps = plugin_set(("waits", Waits()))
    args = tuple("b@example.org" if a == "address" else None for a in HOOK_ARGS["bonzo_rcpt"])

    async def main() -> None:
        call = ps.decide("bonzo_rcpt", args)
        call.send(None)  # now waiting in the plugin
        call.close()

    asyncio.run(main())
    assert closed == ["b@example.org"]
    assert log_watch.matching("waits") == []


def test_base_exceptions_in_the_lifecycle_hooks_are_the_plugin_s_faults(plugin_module, log_watch):
    class FailsToConfigure:
        def bonzo_configure(self, config):
            raise LibraryTimeout("directory did not answer")

    class FailsToStart:
        def bonzo_startup(self):
            raise GreenletExit("killed")

    class FailsToStop:
        def bonzo_shutdown(self):
            raise LibraryTimeout("pool did not close")

    class Stops:
        def __init__(self) -> None:
            self.stopped = False

        def bonzo_shutdown(self):
            self.stopped = True

    class Maps:
        def bonzo_exception(self):
            raise LibraryTimeout("mapper")

    class FailsToLoad:
        def __init__(self) -> None:
            raise LibraryTimeout("license server did not answer")

    plugin_module.FailsToConfigure = FailsToConfigure
    plugin_module.FailsToLoad = FailsToLoad
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config(app_config("FailsToConfigure"), source="t.toml"))
    assert str(info.value) == (
        "t.toml: plugins.bonzo_hooktest_plugins:FailsToConfigure: configuration failed: "
        "LibraryTimeout('directory did not answer') "
        f"(at {__file__}:{FailsToConfigure.bonzo_configure.__code__.co_firstlineno + 1})"
    )
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config(app_config("FailsToLoad"), source="t.toml"))
    assert str(info.value).endswith(
        "creating FailsToLoad failed: LibraryTimeout('license server did not answer') "
        f"(at {__file__}:{FailsToLoad.__init__.__code__.co_firstlineno + 1})"
    )
    ps = plugin_set(("fails", FailsToStart()))
    with pytest.raises(PluginError, match=r"'fails' failed in bonzo_startup: killed"):
        run(ps.call_observers("bonzo_startup", None, strict=True))
    stops = Stops()
    ps = plugin_set(("fails", FailsToStop()), ("stops", stops))
    run(ps.call_observers("bonzo_shutdown", None))
    assert stops.stopped
    assert failures(log_watch, "fails", "bonzo_shutdown")

    class Broken:
        def bonzo_mail(self):
            raise ValueError("oops")

    ps = plugin_set(("broken", Broken()), ("maps", Maps()))
    replies = converse(ps, EHLO, b"MAIL FROM:<a@example.org>\r\n")
    assert replies[-1] == b"451 4.3.0 Internal confusion\r\n"
    assert failures(log_watch, "maps", "bonzo_exception")
    assert failures(log_watch, "broken", "bonzo_mail")


class IgnoresCancellation:
    """An async bonzo_rcpt in a retry loop that swallows its cancellation
    (``except asyncio.CancelledError: continue``), as plugins do by mistake;
    being closed ends it."""

    def __init__(self) -> None:
        self.cancellations = 0

    async def bonzo_rcpt(self, address):
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancellations += 1


def test_a_hook_that_ignores_its_cancellation_is_abandoned_and_answered_451(
    log_watch, serve, monkeypatch
):
    monkeypatch.setattr(hooks, "CANCEL_GRACE", 0.2)
    plugin = IgnoresCancellation()
    srv = serve(plugin_set(("stubborn", plugin, 0.1)))
    with smtp(srv) as c:
        c.ehlo()
        c.mail("a@example.org")
        started = time.monotonic()
        assert c.rcpt("b@example.org") == (451, b"4.3.0 Internal confusion")
        assert time.monotonic() - started < 3
        assert c.noop()[0] == 250  # the session goes on
        assert c.rcpt("c@example.org")[0] == 451  # and the next call is bounded too
    assert plugin.cancellations == 2
    assert hooks.abandoned_calls() == 0  # closing it ended it: nothing is kept
    log_watch.allow(re.escape("in plugin 'stubborn' (bonzo_rcpt)"))
    records = log_watch.matching(re.escape("in plugin 'stubborn' (bonzo_rcpt)"))
    assert len(records) == 2
    assert records[0].levelno == logging.ERROR and records[0].getMessage().endswith(
        ": no answer within 0.1s (its time limit), and it ignored its cancellation: "
        "abandoned 0.2s later (a plugin must let asyncio.CancelledError through)"
    )


def test_a_hook_may_finish_its_cleanup_after_its_time_limit(log_watch):
    closed: list[str] = []

    class Tidy:
        async def bonzo_rcpt(self, address):
            try:
                await asyncio.sleep(30)
            finally:
                await asyncio.sleep(0.05)  # closing its connection, within the grace
                closed.append(address)

    ps = plugin_set(("tidy", Tidy(), 0.1))
    replies = converse(ps, EHLO, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n")
    assert replies[-1].endswith(b"451 4.3.0 Internal confusion\r\n")
    assert closed == ["b@example.org"]
    log_watch.allow(re.escape("in plugin 'tidy' (bonzo_rcpt)"))
    [record] = log_watch.matching(re.escape("in plugin 'tidy' (bonzo_rcpt)"))
    assert record.getMessage().endswith(": no answer within 0.1s (its time limit)")


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Python 3.10 cannot tell a task's cancellation apart"
)
def test_a_future_of_the_plugin_cancelled_while_it_waits_is_its_failure(log_watch):
    class Pool:
        async def bonzo_rcpt(self, address):
            future = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.05, future.cancel)  # its pool gave up
            await future

    ps = plugin_set(("pool", Pool()))
    replies = converse(
        ps, EHLO, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n", b"NOOP\r\n"
    )
    assert replies[-2].endswith(b"451 4.3.0 Internal confusion\r\n")
    assert replies[-1] == b"250 2.0.0 Ok\r\n"
    assert failures(log_watch, "pool", "bonzo_rcpt")[0].exc_info[0] is asyncio.CancelledError


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11")
@pytest.mark.parametrize("where", ["after", "inside"])
def test_a_plugin_s_own_timeout_is_not_taken_for_a_stop(monkeypatch, where):
    """asyncio.timeout() (and wait_for() on Python 3.12+) cancels the task
    and takes the cancellation back when it ends: a plugin whose own time
    limit expires, which then waits some more (in its clean-up inside the
    limit, or after it) for longer than CANCEL_GRACE, answers as it likes."""
    monkeypatch.setattr(hooks, "CANCEL_GRACE", 0.1)

    class OwnLimit:
        async def bonzo_rcpt(self, address):
            try:
                async with asyncio.timeout(0.05):
                    try:
                        await asyncio.sleep(10)
                    finally:
                        if where == "inside":
                            await asyncio.sleep(0.3)  # closing its connection
            except TimeoutError:
                await asyncio.sleep(0.3)  # asks its fallback
                return Accept()

    ps = plugin_set(("own", OwnLimit(), 5.0))
    replies = converse(
        ps, EHLO, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n", b"NOOP\r\n"
    )
    assert replies[-2].endswith(b"250 2.1.5 Ok\r\n"), replies
    assert replies[-1] == b"250 2.0.0 Ok\r\n"


def test_a_stopped_session_abandons_a_hook_that_ignores_its_cancellation(log_watch, monkeypatch):
    monkeypatch.setattr(hooks, "CANCEL_GRACE", 0.2)
    plugin = IgnoresCancellation()
    ps = plugin_set(("stubborn", plugin))
    args = tuple(None for _ in HOOK_ARGS["bonzo_rcpt"])

    async def stop_while_it_waits() -> float:
        task = asyncio.ensure_future(ps.decide("bonzo_rcpt", args))
        await asyncio.sleep(0.05)
        hooks.stop_task(task)  # as SMTPServer.force_stop does
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, DEADLINE)
        return time.monotonic() - started

    assert asyncio.run(stop_while_it_waits()) < 2
    assert plugin.cancellations == 1
    log_watch.allow(re.escape("plugin 'stubborn' (bonzo_rcpt) ignored its cancellation"))
    [record] = log_watch.matching(re.escape("plugin 'stubborn' (bonzo_rcpt) ignored"))
    assert record.levelno == logging.ERROR
    assert "(its session is being stopped): abandoned after 0.2s" in record.getMessage()


def test_a_hook_that_swallows_even_being_closed_is_kept_not_collected(log_watch, monkeypatch):
    # Were it closed by the garbage collector at the interpreter's exit,
    # with no event loop, a plugin swallowing every exception would loop for
    # ever: Bonzo keeps it (and the daemon ends with os._exit).
    monkeypatch.setattr(hooks, "CANCEL_GRACE", 0.1)
    swallowed: list[str] = []

    class Stubborn:
        async def bonzo_rcpt(self, address):
            while True:
                try:
                    await asyncio.sleep(30)
                except BaseException as exc:
                    swallowed.append(type(exc).__name__)
                    if len(swallowed) > 2:  # ends at last, for this test's own cleanup
                        raise

    ps = plugin_set(("stubborn", Stubborn(), 0.1))
    kept = hooks.abandoned_calls()

    async def talk() -> bytes:
        tester = SessionTester(ps)
        await tester.connect()
        await tester.send(EHLO + b"MAIL FROM:<a@example.org>\r\n")
        reply = await tester.send(b"RCPT TO:<b@example.org>\r\n")
        assert hooks.abandoned_calls() == kept + 1
        hooks._abandoned.pop().close()  # the third exception: it ends
        await tester.close()
        return reply

    assert asyncio.run(talk()) == b"451 4.3.0 Internal confusion\r\n"
    assert swallowed == ["CancelledError", "GeneratorExit", "GeneratorExit"]
    log_watch.allow(re.escape("in plugin 'stubborn' (bonzo_rcpt)"))


def test_the_set_default_timeout_applies_without_a_plugin_timeout(log_watch):
    class Slow:
        async def bonzo_mail(self):
            await asyncio.sleep(30)

    ps = plugin_set(("slow", Slow()), timeout=0.1)
    replies = converse(ps, EHLO, b"MAIL FROM:<a@example.org>\r\n")
    assert replies[-1] == b"451 4.3.0 Internal confusion\r\n"
    log_watch.allow(re.escape("in plugin 'slow' (bonzo_mail)"))
    [record] = log_watch.matching(re.escape("in plugin 'slow' (bonzo_mail)"))
    assert record.getMessage().endswith(": no answer within 0.1s (its time limit)")


# ---------------------------------------------------------- bonzo_exception
def test_bonzo_exception_can_change_the_reply(log_watch, serve):
    seen: list[tuple[Any, ...]] = []

    class Broken:
        def bonzo_mail(self):
            raise ValueError("oops")

    class Declines:
        def bonzo_exception(self, hook):
            seen.append(("declines", hook))
            return None

    class BrokenMapper:
        def bonzo_exception(self):
            raise RuntimeError("mapper broke")

    class Mapper:
        def bonzo_exception(self, session, error, hook, plugin):
            seen.append(("mapper", type(session).__name__, type(error).__name__, hook, plugin))
            return errors.TransientError("Policy service unavailable", 454, "4.7.0")

    class Never:
        def bonzo_exception(self):
            seen.append(("never",))

    ps = plugin_set(
        ("broken", Broken()),
        ("declines", Declines()),
        ("brokenmapper", BrokenMapper()),
        ("mapper", Mapper()),
        ("never", Never()),
    )
    srv = serve(ps)
    with smtp(srv) as c:
        c.ehlo()
        assert c.mail("a@example.org") == (454, b"4.7.0 Policy service unavailable")
    assert seen == [
        ("declines", "bonzo_mail"),
        ("mapper", "Session", "ValueError", "bonzo_mail", "broken"),
    ]
    assert failures(log_watch, "brokenmapper", "bonzo_exception")
    assert failures(log_watch, "broken", "bonzo_mail")


def test_bonzo_exception_cannot_turn_a_fault_into_success(log_watch):
    class Broken:
        def bonzo_mail(self):
            raise ValueError("oops")

    class Optimist:
        def bonzo_exception(self):
            return errors.SMTPError(250, "All good")

    ps = plugin_set(("broken", Broken()), ("optimist", Optimist()))
    replies = converse(ps, EHLO, b"MAIL FROM:<a@example.org>\r\n")
    assert replies[-1] == b"451 4.3.0 Internal confusion\r\n"
    assert failures(log_watch, "broken", "bonzo_mail")
    log_watch.allow("Plugin 'optimist' returned")
    assert log_watch.matching(r"Plugin 'optimist' returned .* from bonzo_exception")


# ------------------------------------------------------- unknown commands
def test_unknown_command_lets_a_plugin_implement_a_verb(serve):
    calls: list[tuple[str, str]] = []

    class Other:
        def bonzo_unknown_command(self, verb, arg):
            calls.append((verb, arg))

    class XFoo:
        def bonzo_unknown_command(self, session, verb, arg):
            if verb == "XFOO":
                return (250, f"foo {arg} for {session.remote_ip}")
            if verb == "XBAR":
                return (250, "2.1.0", "bar")
            if verb == "XDENY":
                raise errors.PermanentError("Denied", 554, "5.7.1")
            if verb == "XOK":
                return Accept("fine")

    srv = serve(plugin_set(("other", Other()), ("xfoo", XFoo())))
    with raw(srv) as c:
        c.reply()
        c.command("EHLO client.test")
        assert c.command("XFOO some args") == b"250 2.0.0 foo some args for 127.0.0.1\r\n"
        assert c.command("xbar") == b"250 2.1.0 bar\r\n"
        assert c.command("XDENY") == b"554 5.7.1 Denied\r\n"
        assert c.command("XOK") == b"250 2.0.0 fine\r\n"
        assert c.command("XNOPE") == b"500 5.5.2 Error: command not recognized\r\n"
    assert calls == [("XFOO", "some args"), ("XBAR", ""), ("XDENY", ""), ("XOK", ""), ("XNOPE", "")]


def test_a_plugin_s_221_closes_and_its_reply_may_have_lines(serve, log_watch):
    class Verbs:
        def bonzo_unknown_command(self, verb):
            if verb == "XLINES":
                return (250, "2.0.0", ["first", "second"])
            if verb == "LOGOUT":
                return (221, "2.0.0", "Bye")

    srv = serve(plugin_set(("verbs", Verbs())))
    with raw(srv) as c:
        c.reply()
        c.command("EHLO client.test")
        assert c.command("XLINES") == b"250-2.0.0 first\r\n250 2.0.0 second\r\n"
        assert c.command("LOGOUT") == b"221 2.0.0 Bye\r\n"
        # 221 is "closing transmission channel" (RFC 5321 4.2.2), as after QUIT.
        assert c.read_to_eof() == b""
    # Not a refusal: no "refused" line for it.
    assert not [r for r in log_watch.records if "refused by verbs" in r.getMessage()]


def test_unknown_command_nobody_handles_is_500_and_bad_tuples_451(log_watch, serve):
    class Bad:
        def bonzo_unknown_command(self, verb):
            return {
                "XONE": (250,),
                "XCODE": (999, "x"),
                "XENH": (250, "5.0.0", "x"),
                "XCRLF": (550, "5.1.1\r\n250 2.0.0", "x"),
            }.get(verb)

    srv = serve(plugin_set())
    with raw(srv) as c:
        c.reply()
        c.command("EHLO client.test")
        assert c.command("XFOO") == b"500 5.5.2 Error: command not recognized\r\n"
        # SMTP's own verbs the core leaves to plugins: "not implemented".
        for verb in ("EXPN staff", "expn", "TURN", "SEND FROM:<a@b.c>", "SOML", "SAML"):
            assert c.command(verb) == b"502 5.5.1 Error: command not implemented\r\n", verb
    srv = serve(plugin_set(("bad", Bad())))
    with raw(srv) as c:
        c.reply()
        c.command("EHLO client.test")
        for verb in ("XONE", "XCODE", "XENH", "XCRLF"):
            assert c.command(verb) == b"451 4.3.0 Internal confusion\r\n", verb
    assert len(failures(log_watch, "bad", "bonzo_unknown_command")) == 4


def test_a_plugin_implemented_verb_is_not_an_unknown_command(serve):
    class XFoo:
        def bonzo_unknown_command(self, verb):
            if verb == "XFOO":
                return (250, "foo")

    srv = serve(plugin_set(("xfoo", XFoo())), max_unknown_commands=2, max_junk_commands=6)
    with raw(srv) as c:
        c.reply()
        c.command("EHLO client.test")
        for _ in range(5):
            assert c.command("XFOO") == b"250 2.0.0 foo\r\n"
        # It does no mail work, so it counts as a junk command, as NOOP does.
        assert c.command("NOOP") == b"250 2.0.0 Ok\r\n"
        assert c.command("XFOO") == (
            b"421 4.7.0 Too many commands without mail, closing connection\r\n"
        )


# ------------------------------------------------------------------ auth
def auth_server(serve: Any, *plugins: Any) -> ServerThread:
    # AUTH in clear text is for tests only: this server listens on 127.0.0.1.
    listener = ListenerSettings(auth_plaintext=True)
    return serve(plugin_set(*plugins), listener=listener, auth_failure_delay=0.0)


def test_auth_first_verdict_wins_and_sees_the_credentials(serve):
    seen: list[tuple[Any, ...]] = []

    class Abstains:
        def bonzo_auth(self, username):
            seen.append(("abstains", username))

    class Directory:
        async def bonzo_auth(self, session, mechanism, username, password, authzid):
            seen.append(("directory", session.remote_ip, mechanism, username, password, authzid))
            if (username, password) == ("alice", "s3cret"):
                return Accept()

    class Never:
        def bonzo_auth(self):
            seen.append(("never",))

    srv = auth_server(serve, ("abstains", Abstains()), ("dir", Directory()), ("never", Never()))
    with smtp(srv) as c:
        c.ehlo()
        assert c.has_extn("auth")
        assert c.login("alice", "s3cret") == (235, b"2.7.0 Authentication successful")
    assert seen[:2] == [
        ("abstains", "alice"),
        ("directory", "127.0.0.1", "PLAIN", "alice", "s3cret", ""),
    ]
    assert ("never",) not in seen


def test_auth_fault_is_454_whatever_bonzo_exception_maps_it_to(serve, log_watch):
    seen = []

    class Down:
        def bonzo_auth(self, username):
            raise ConnectionError("ldap down")

    class Mapper:
        def bonzo_exception(self, error, hook):
            seen.append(hook)
            return errors.PermanentError("Mapped", 554, "5.3.0")

        def bonzo_mail(self, address):
            raise RuntimeError("mail fault")

    with smtp(auth_server(serve, ("down", Down()), ("mapper", Mapper()))) as c:
        c.ehlo()
        # A backend that is down must not become a permanent refusal.
        code, text = c.docmd("AUTH", "PLAIN AGFsaWNlAHA=")  # \0alice\0p
        assert (code, text) == (454, b"4.7.0 Temporary authentication failure")
        # The mapping still applies elsewhere.
        assert c.docmd("MAIL", "FROM:<a@example.org>") == (554, b"5.3.0 Mapped")
    assert seen == ["bonzo_mail"]
    assert len(failures(log_watch, "down", "bonzo_auth")) == 1
    assert len(failures(log_watch, "mapper", "bonzo_mail")) == 1


def test_auth_nobody_vouching_is_535(serve):
    class Directory:
        def bonzo_auth(self, username, password):
            return None

    with smtp(auth_server(serve, ("dir", Directory()))) as c:
        c.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            c.login("alice", "wrong")
        assert info.value.smtp_code == 535
        assert info.value.smtp_error.startswith(b"5.7.8")


def test_auth_errors_temporary_failure_and_no_auth_without_a_plugin(serve, log_watch):
    class Down:
        def bonzo_auth(self, username):
            if username == "locked":
                raise errors.PermanentError("Account disabled", 535, "5.7.8")
            raise ConnectionError("ldap down, password hunter2")

    with smtp(auth_server(serve, ("down", Down()))) as c:
        c.ehlo()
        code, text = c.docmd("AUTH", "PLAIN AGxvY2tlZABw")  # \0locked\0p
        assert (code, text) == (535, b"5.7.8 Account disabled")
        code, text = c.docmd("AUTH", "PLAIN AGFsaWNlAHA=")  # \0alice\0p
        assert (code, text) == (454, b"4.7.0 Temporary authentication failure")
    assert failures(log_watch, "down", "bonzo_auth")[0].exc_info[0] is ConnectionError
    with smtp(auth_server(serve, ("owner", Owner()))) as c:
        c.ehlo()
        assert not c.has_extn("auth")


# ----------------------------------------------------------- observers
def test_ehlo_keywords_can_add_and_remove_keywords(log_watch, serve):
    class AddXFoo:
        def bonzo_ehlo_keywords(self, keywords):
            keywords.append("XFOO")

    class Broken:
        def bonzo_ehlo_keywords(self):
            raise RuntimeError("observer broke")

    class NoPipelining:
        def bonzo_ehlo_keywords(self, session, keywords):
            self.seen = list(keywords)
            keywords.remove("PIPELINING")

    nopipe = NoPipelining()
    ps = plugin_set(("add", AddXFoo()), ("broken", Broken()), ("nopipe", nopipe))
    srv = serve(ps)
    with smtp(srv) as c:
        code, _ = c.ehlo()
        assert code == 250
        assert c.has_extn("xfoo")
        assert not c.has_extn("pipelining")
        assert c.has_extn("size")
    assert "XFOO" in nopipe.seen  # in order: the later plugin sees the earlier one's change
    assert failures(log_watch, "broken", "bonzo_ehlo_keywords")


def test_a_fault_with_no_text_is_named_by_its_type(log_watch, serve):
    class Silent:
        def bonzo_helo(self):
            raise KeyboardInterrupt()  # a library's, with no text

    with raw(serve(plugin_set(("silent", Silent())))) as c:
        c.reply()
        assert c.command("EHLO client.test").startswith(b"451 4.3.0")
    [record] = failures(log_watch, "silent", "bonzo_helo")
    assert record.getMessage().endswith("in plugin 'silent' (bonzo_helo): KeyboardInterrupt")


def test_a_refusal_returned_instead_of_raised_says_so(log_watch, serve):
    class Returns:
        def bonzo_mail(self):
            return errors.PermanentError("No", 550, "5.7.1")  # meant: raise

    with raw(serve(plugin_set(("returns", Returns())))) as c:
        c.reply()
        c.command("EHLO client.test")
        assert c.command("MAIL FROM:<a@example.org>").startswith(b"451 4.3.0")
    [record] = failures(log_watch, "returns", "bonzo_mail")
    assert record.getMessage().endswith(
        "(bonzo_mail): returned PermanentError instead of raising it (raise it to refuse)"
    )


def test_invalid_ehlo_keywords_are_dropped_not_sent(log_watch, serve):
    class Junk:
        def bonzo_ehlo_keywords(self, keywords):
            # The last: a reply line over RFC 5321's 512 octets.
            keywords += [5, "XOK", "BAD\r\n250 INJECTED", "", "-DASH", "X" + "L" * 506]
            keywords.append("X" * 506)  # 512 with "250-" and CRLF: fine

    with raw(serve(plugin_set(("junk", Junk())))) as c:
        c.reply()
        reply = c.command("EHLO client.test")
    assert reply.endswith(b"250-HELP\r\n250-XOK\r\n250 " + b"X" * 506 + b"\r\n")
    assert b"INJECTED" not in reply and b"L" * 506 not in reply
    log_watch.allow("bonzo_ehlo_keywords: dropped invalid keyword")
    [record] = log_watch.matching("dropped invalid keyword")
    assert "[5, 'BAD\\r\\n250 INJECTED', '', '-DASH', 'XLLL" in record.getMessage()


def test_accepted_observers_all_run_after_the_250(log_watch, serve):
    log: list[Any] = []

    class Broken:
        def bonzo_accepted(self):
            log.append("broken")
            raise RuntimeError("observer broke")

    class Watch:
        async def bonzo_accepted(self, session, envelope):
            log.append(("watch", envelope.mail_from, list(envelope.rcpt_tos)))

    class Refuser:
        def bonzo_deliver(self, envelope):
            if b"refuse" in envelope.content:
                raise errors.TransientError("Not now")

    ps = plugin_set(("refuser", Refuser()), ("owner", Owner()), ("broken", Broken()))
    ps.register(Watch(), "watch")
    srv = serve(ps)
    with smtp(srv) as c:
        c.ehlo()
        assert c.sendmail("a@example.org", ["b@example.org"], MESSAGE) == {}
        wait_until(lambda: len(log) == 2)
        with pytest.raises(smtplib.SMTPDataError):
            c.sendmail("a@example.org", ["b@example.org"], "Subject: refuse\r\n\r\nx\r\n")
        c.noop()
    assert log == ["broken", ("watch", "a@example.org", ["b@example.org"])]
    assert failures(log_watch, "broken", "bonzo_accepted")


def test_rset_observers_all_run(log_watch, serve):
    log: list[str] = []

    class Broken:
        def bonzo_rset(self):
            log.append("broken")
            raise RuntimeError("observer broke")

    class Watch:
        async def bonzo_rset(self, session):
            log.append(f"watch {session.remote_ip}")

    srv = serve(plugin_set(("broken", Broken()), ("watch", Watch())))
    with raw(srv) as c:
        c.reply()
        c.command("EHLO client.test")
        c.command("MAIL FROM:<a@example.org>")
        assert c.command("RSET") == b"250 2.0.0 Ok\r\n"
        assert c.command("MAIL FROM:<a@example.org>").startswith(b"250")
    assert log == ["broken", "watch 127.0.0.1"]
    assert failures(log_watch, "broken", "bonzo_rset")


def test_the_rset_reply_goes_before_the_observers_run(serve):
    # "Called: after Bonzo has answered RSET with 250": a slow observer
    # (a database write) must not hold the reply.
    release = threading.Event()
    seen: list[str] = []

    class Slow:
        async def bonzo_rset(self):
            seen.append("called")
            while not release.is_set():
                await asyncio.sleep(0.01)

    srv = serve(plugin_set(("slow", Slow())))
    with raw(srv) as c:
        c.reply()
        c.command("EHLO client.test")
        try:
            # The observer waits for release, set only after this reply came.
            assert c.command("RSET", timeout=5) == b"250 2.0.0 Ok\r\n"
            wait_until(lambda: seen == ["called"], message="the observer to run")
        finally:
            release.set()
        assert c.command("NOOP").startswith(b"250")


def test_disconnect_observers_all_run(log_watch, serve):
    log: list[str] = []

    class Broken:
        def bonzo_disconnect(self):
            log.append("broken")
            raise RuntimeError("observer broke")

    class Watch:
        async def bonzo_disconnect(self, session):
            await asyncio.sleep(0)
            log.append(f"watch {session.helo}")

    srv = serve(plugin_set(("broken", Broken()), ("watch", Watch())))
    with smtp(srv) as c:
        c.ehlo()
    wait_until(lambda: len(log) == 2)
    # An abrupt close (no QUIT) is a disconnect too.
    with raw(srv) as c:
        c.reply()
    wait_until(lambda: len(log) == 4)
    assert log == ["broken", "watch client.test", "broken", "watch None"]
    assert len(failures(log_watch, "broken", "bonzo_disconnect")) == 2


def test_observer_failures_are_logged_and_the_rest_run_without_a_socket(log_watch):
    log: list[str] = []

    class Broken:
        def bonzo_rset(self):
            raise RuntimeError("first")

    class Watch:
        def bonzo_rset(self):
            log.append("watch")

    replies = converse(plugin_set(("broken", Broken()), ("watch", Watch())), EHLO + b"RSET\r\n")
    assert replies[-1].endswith(b"250 2.0.0 Ok\r\n")
    assert log == ["watch"]
    assert failures(log_watch, "broken", "bonzo_rset")


# ------------------------------------------- lifecycle: configure, startup
@pytest.fixture
def plugin_module(monkeypatch):
    """A module in sys.modules whose classes the tests enable by dotted path."""
    module = types.ModuleType("bonzo_hooktest_plugins")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def app_config(*names: str, extra: str = "", listen: bool = False) -> str:
    enabled = ", ".join(f'"bonzo_hooktest_plugins:{n}"' for n in names)
    text = f"[plugins]\nenabled = [{enabled}]\n"
    if listen:
        text = '[[listeners]]\naddress = "127.0.0.1"\nport = 0\n\n' + text
    return text + extra


def test_configure_receives_its_own_table_with_secrets_resolved(plugin_module, monkeypatch):
    monkeypatch.setenv("BONZO_HOOKTEST_SECRET", "s3cret")
    received: dict[str, Any] = {}

    class WithTable:
        def bonzo_configure(self, config, app):
            received["with"] = (dict(config), app)

    class WithoutTable:
        def bonzo_configure(self, config):
            received["without"] = config

    plugin_module.WithTable = WithTable
    plugin_module.WithoutTable = WithoutTable
    extra = (
        '[plugins."bonzo_hooktest_plugins:WithTable"]\n'
        'user = "me"\npassword = { "$env" = "BONZO_HOOKTEST_SECRET" }\n'
    )
    app = MailApp(parse_config(app_config("WithTable", "WithoutTable", extra=extra)))
    assert received["with"] == ({"user": "me", "password": "s3cret"}, app)
    assert received["without"] == {}


def test_configure_value_error_names_the_plugin_table(plugin_module):
    class Strict:
        def bonzo_configure(self, config):
            raise ValueError("path: must be a directory")

    plugin_module.Strict = Strict
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config(app_config("Strict"), source="test.toml"))
    assert str(info.value) == (
        "test.toml: plugins.bonzo_hooktest_plugins:Strict: path: must be a directory"
    )


def test_configure_must_be_sync_names_the_plugin(plugin_module):
    class AsyncConfigure:
        async def bonzo_configure(self, config):
            pass

    plugin_module.AsyncConfigure = AsyncConfigure
    with pytest.raises(
        ConfigError, match="AsyncConfigure.*bonzo_configure must not be async"
    ) as info:
        MailApp(parse_config(app_config("AsyncConfigure")))
    assert str(info.value).endswith("bonzo_configure must not be async")  # said once


def test_a_missing_key_in_configure_is_named_so(plugin_module):
    class NeedsThreshold:
        def bonzo_configure(self, config):
            self.threshold = config["threshold"]

    plugin_module.NeedsThreshold = NeedsThreshold
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config(app_config("NeedsThreshold"), source="t.toml"))
    # Where: the KeyError may be a bug in the plugin rather than its table.
    assert str(info.value).endswith(
        "plugins.bonzo_hooktest_plugins:NeedsThreshold: missing key 'threshold' "
        f"(at {__file__}:{NeedsThreshold.bonzo_configure.__code__.co_firstlineno + 1})"
    ), str(info.value)


def test_a_plugin_s_config_error_names_its_key(plugin_module, caplog):
    class ByKey:
        def bonzo_configure(self, config):
            raise ConfigError(key="threshold", message="must be positive")

    class ByMessage:
        def bonzo_configure(self, config):
            raise ConfigError("threshold: must be positive")

    class Buggy:
        def bonzo_configure(self, config):
            return len(config["limits"])

    plugin_module.ByKey, plugin_module.ByMessage, plugin_module.Buggy = ByKey, ByMessage, Buggy
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config(app_config("ByKey"), source="t.toml"))
    assert (
        str(info.value)
        == "t.toml: plugins.bonzo_hooktest_plugins:ByKey.threshold: must be positive"
    )
    assert info.value.key == "plugins.bonzo_hooktest_plugins:ByKey.threshold"
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config(app_config("ByMessage"), source="t.toml"))
    assert str(info.value) == (
        "t.toml: plugins.bonzo_hooktest_plugins:ByMessage: threshold: must be positive"
    )
    extra = '\n[plugins."bonzo_hooktest_plugins:Buggy"]\nlimits = 3\n'
    with caplog.at_level(logging.DEBUG, logger="bonzo.app"):
        with pytest.raises(ConfigError) as info:
            MailApp(parse_config(app_config("Buggy", extra=extra), source="t.toml"))
    line = Buggy.bonzo_configure.__code__.co_firstlineno + 1
    assert str(info.value) == (
        "t.toml: plugins.bonzo_hooktest_plugins:Buggy: object of type 'int' has no len() "
        f"(at {__file__}:{line})"
    )
    # The traceback, for the plugin's author, at debug level.
    [record] = [r for r in caplog.records if "Buggy': bonzo_configure failed" in r.getMessage()]
    assert record.levelno == logging.DEBUG and record.exc_info is not None


def test_startup_and_shutdown_run_in_order_around_serving(plugin_module, log_watch, serve):
    log: list[str] = []

    class First:
        async def bonzo_startup(self, app):
            await asyncio.sleep(0.01)
            log.append(f"startup first {app.server is None}")

        def bonzo_shutdown(self):
            log.append("shutdown first")
            raise RuntimeError("close failed")

    class Second:
        def bonzo_startup(self):
            log.append("startup second")

        async def bonzo_shutdown(self, app):
            log.append(f"shutdown second {app.server is None}")

    plugin_module.First = First
    plugin_module.Second = Second
    app = MailApp(parse_config(app_config("First", "Second", listen=True)))

    async def serve() -> None:
        await app.start()
        log.append("serving")
        [(address, port)] = app.addresses
        reader, writer = await asyncio.open_connection(address, port)
        log.append((await reader.readline()).decode().split()[0])
        writer.close()
        await writer.wait_closed()
        await app.stop(grace=1)

    run(serve())
    assert log == [
        "startup first True",
        "startup second",
        "serving",
        "220",
        "shutdown first",
        "shutdown second True",
    ]
    assert failures(log_watch, "bonzo_hooktest_plugins:First", "bonzo_shutdown")


@pytest.mark.parametrize("last", ["new", "old"])
def test_a_plugin_object_two_configurations_share_starts_once_and_stops_once(plugin_module, last):
    # A reload: the new configuration starts while the old one still runs.
    # An instance (or a module) is the same object in both; a class gets an
    # instance in each.
    log: list[str] = []

    class Shared:
        def bonzo_startup(self):
            log.append("startup shared")

        def bonzo_shutdown(self):
            log.append("shutdown shared")

    class Own:
        def bonzo_startup(self, app):
            log.append(f"startup own {app.settings.hostname}")

        def bonzo_shutdown(self, app):
            log.append(f"shutdown own {app.settings.hostname}")

    plugin_module.SHARED = Shared()
    plugin_module.Own = Own

    def app(hostname: str) -> MailApp:
        config = app_config("SHARED", "Own", listen=True)
        return MailApp(parse_config(f'[server]\nhostname = "{hostname}"\n' + config))

    old, new = app("old.test"), app("new.test")

    async def reload() -> None:
        await old.start()
        await new.start()
        first, second = (old, new) if last == "new" else (new, old)
        await first.stop(grace=1)
        log.append("one stopped")
        await second.stop(grace=1)
        # Started again later (a configuration that enables it again).
        again = app("again.test")
        await again.start()
        await again.stop(grace=1)

    run(reload())
    stopped_first = "old.test" if last == "new" else "new.test"
    stopped_last = "new.test" if last == "new" else "old.test"
    assert log == [
        "startup shared",
        "startup own old.test",
        "startup own new.test",  # not "startup shared" again
        f"shutdown own {stopped_first}",  # not "shutdown shared": the other has it
        "one stopped",
        "shutdown shared",  # the last to stop: in the plugins' order, as ever
        f"shutdown own {stopped_last}",
        "startup shared",
        "startup own again.test",
        "shutdown shared",
        "shutdown own again.test",
    ]


def test_startup_failure_stops_the_server_naming_the_plugin(plugin_module):
    log: list[str] = []

    class Fails:
        def bonzo_startup(self):
            raise OSError("database unreachable")

    class Later:
        def bonzo_startup(self):
            log.append("later")

    plugin_module.Fails = Fails
    plugin_module.Later = Later
    app = MailApp(parse_config(app_config("Fails", "Later", listen=True)))

    async def start() -> None:
        with pytest.raises(PluginError, match=r"Fails.*bonzo_startup.*database unreachable"):
            await app.start()

    run(start())
    assert app.server is None
    assert log == []


def test_a_failed_startup_shuts_down_the_plugins_it_started(plugin_module):
    # What an earlier plugin opened must not outlive a start that failed (a
    # reload onto a broken configuration, tried again and again).
    log: list[str] = []

    class Opens:
        def bonzo_startup(self):
            log.append("open")

        def bonzo_shutdown(self):
            log.append("close")

    class Fails:
        def bonzo_startup(self):
            raise OSError("database unreachable")

        def bonzo_shutdown(self):
            log.append("close fails")  # never started: never shut down

    class Later:
        def bonzo_startup(self):
            log.append("later")

        def bonzo_shutdown(self):
            log.append("close later")

    plugin_module.Opens = Opens
    plugin_module.Fails = Fails
    plugin_module.Later = Later
    app = MailApp(parse_config(app_config("Opens", "Fails", "Later", listen=True)))

    async def closed() -> None:  # its store too (a Redis pool a plugin opened)
        log.append("store closed")

    app.store.close = closed  # type: ignore[method-assign]

    async def start() -> None:
        with pytest.raises(PluginError, match=r"Fails.*bonzo_startup.*database unreachable"):
            await app.start()

    run(start())
    assert app.server is None
    assert log == ["open", "close", "store closed"]


def test_a_start_that_fails_once_the_plugins_started_shuts_them_down(plugin_module, log_watch):
    """Serving can fail after the plugins' startup: here two reloads at once
    hand the running configuration's sockets to two new ones, and the second
    finds them taken (``fd ... added twice``). Its plugins get
    bonzo_shutdown before the error is raised (a queue runner would go on
    delivering on routes nobody runs), and the running configuration taking
    back sockets another one serves is logged, not raised: every
    configuration still stops cleanly."""
    log: list[str] = []

    class Opens:
        def bonzo_startup(self, app):
            log.append(f"open {app.settings.hostname}")

        def bonzo_shutdown(self, app):
            log.append(f"close {app.settings.hostname}")

    plugin_module.Opens = Opens

    def app(hostname: str) -> MailApp:
        config = app_config("Opens", listen=True)
        return MailApp(parse_config(f'[server]\nhostname = "{hostname}"\n' + config))

    log_watch.allow("could not accept on it again")

    async def race() -> None:
        old = app("old.test")
        await old.start()
        [(host, port)] = old.addresses
        first, second = app("first.test"), app("second.test")

        async def closed() -> None:
            log.append("store of second.test closed")

        second.store.close = closed  # type: ignore[method-assign]
        first.adopt_sockets(old)
        second.adopt_sockets(old)
        old.release_sockets()
        await first.start()
        with pytest.raises(ValueError, match="added twice"):
            await second.start()
        assert second.server is None and second.servers == []
        assert log[-2:] == ["close second.test", "store of second.test closed"]
        old.reattach_sockets()  # first serves them: logged, not raised
        assert first.addresses == [(host, port)]

        def ehlo() -> tuple[int, bytes]:
            with smtplib.SMTP(host, port, local_hostname="client.test", timeout=10) as client:
                return client.ehlo()

        code, banner = await asyncio.to_thread(ehlo)
        assert code == 250 and banner.startswith(b"first.test")
        await first.stop(grace=1)
        await old.stop(grace=1)

    run(race())
    assert log == [
        "open old.test",
        "open first.test",
        "open second.test",
        "close second.test",
        "store of second.test closed",
        "close first.test",
        "close old.test",
    ]
    assert any("could not accept on it again" in r.getMessage() for r in log_watch.records)


# ------------------------------------------------------------- delivery
@pytest.mark.expect_errors
def test_delivery_hooks_follow_the_decision_and_observer_rules(caplog):
    """The queue's hooks: bonzo_route and bonzo_bounce decide (first verdict
    wins, a wrong type is a plugin fault), the outcome observers all run."""
    seen: list[str] = []

    class First:
        @hookimpl
        def bonzo_route(self, recipient):
            return None if recipient == "b@x" else "special"

        @hookimpl
        def bonzo_bounce(self, message, recipients):
            return Accept() if message == "take" else None

        @hookimpl
        def bonzo_delivered(self, message, recipients):
            raise RuntimeError("observer bug")

        @hookimpl
        def bonzo_deferred(self, recipients):
            seen.append(f"deferred {recipients}")

        @hookimpl
        def bonzo_bounced(self, message):
            seen.append(f"bounced {message}")

    class Second:
        @hookimpl
        def bonzo_route(self):
            return 42  # not a route name

        @hookimpl
        def bonzo_delivered(self, recipients):
            seen.append(f"delivered {recipients}")

    plugins = plugin_set(("First", First()), ("Second", Second()))

    async def main() -> None:
        assert await plugins.decide("bonzo_route", ("m", "a@x")) == ("First", "special")
        with pytest.raises(PluginFailure, match="returned int"):
            await plugins.decide("bonzo_route", ("m", "b@x"))
        verdict = await plugins.decide("bonzo_bounce", ("take", ["a@x"]))
        assert verdict is not None and verdict[0] == "First"
        assert await plugins.decide("bonzo_bounce", ("keep", ["a@x"])) is None
        await plugins.observe("bonzo_delivered", ("m", ["a@x"]))
        await plugins.observe("bonzo_deferred", ("m", ["b@x"]))
        await plugins.observe("bonzo_bounced", ("m", ["c@x"]))

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert seen == ["delivered ['a@x']", "deferred ['b@x']", "bounced m"]
    assert "in plugin 'First' (bonzo_delivered): observer bug" in caplog.text


def test_quarantine_hook_gets_the_reason_and_may_be_async():
    got: list[tuple[str, str | None]] = []

    class Filter:
        def bonzo_rcpt(self) -> Any:
            return hookspecs.Quarantine("first")

        def bonzo_message(self) -> Any:
            return hookspecs.Quarantine("second")  # the first reason is kept

    class Keeper:
        async def bonzo_quarantine(self, reason: str, envelope: Envelope) -> Any:
            await asyncio.sleep(0)
            got.append((reason, envelope.quarantined_by))
            return Accept()

    plugins = PluginSet()
    plugins.register(Filter(), "filter")
    plugins.register(Keeper(), "keeper")
    tester = SessionTester(plugins)

    async def main() -> bytes:
        await tester.connect()
        return await tester.send(
            b"HELO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nhi\r\n.\r\n"
        )

    assert asyncio.run(main()).splitlines()[-1].startswith(b"250")
    assert got == [("first", "filter")]


@pytest.mark.expect_errors
def test_reload_hook_runs_on_every_plugin_and_a_failure_is_only_logged(caplog):
    seen: list[str] = []

    class Broken:
        def bonzo_reload(self):
            raise RuntimeError("cannot reopen")

    class Fine:
        async def bonzo_reload(self, app):
            await asyncio.sleep(0)
            seen.append(type(app).__name__)

    plugins = PluginSet()
    plugins.register(Broken(), "broken")
    plugins.register(Fine(), "fine")

    class App:
        pass

    asyncio.run(plugins.call_observers("bonzo_reload", App()))
    assert seen == ["App"]
    assert "cannot reopen" in caplog.text and "broken" in caplog.text


@pytest.mark.expect_errors
def test_a_shutdown_that_bounds_its_own_time_is_not_cut_by_the_hook_limit(caplog):
    """The queue's shutdown lets deliveries in flight end after a reload,
    which may take longer than the hook time limit: cut there, its wait was
    cancelled and the deliveries made again at the next start."""
    ended: list[str] = []

    class Slow:
        async def bonzo_shutdown(self):
            await asyncio.sleep(0.3)
            ended.append(type(self).__name__)

    class OwnBound(Slow):
        bounds_own_shutdown = True

    plugins = PluginSet(timeout=0.1)
    plugins.register(Slow(), "slow")
    plugins.register(OwnBound(), "own")
    assert [c.timeout for c in plugins.calls["bonzo_shutdown"]] == [0.1, math.inf]
    assert all(c.timeout == 0.1 for c in plugins.calls["bonzo_helo"])  # only shutdown
    asyncio.run(plugins.call_observers("bonzo_shutdown", object()))
    assert ended == ["OwnBound"]
    assert "'slow' (bonzo_shutdown)" in caplog.text and "'own'" not in caplog.text


# ------------------------------------------------------------- coverage
def test_every_hook_has_an_implementation_tested_here():
    source = Path(__file__).read_text("utf-8")
    hooks = [name for name, _ in inspect.getmembers(hookspecs) if name.startswith("bonzo_")]
    assert set(hooks) == set(HOOK_ARGS)
    missing = [h for h in hooks if not re.search(rf"def {h}\(", source)]
    assert not missing, f"hooks without a test implementation here: {missing}"


def test_a_refusal_after_the_data_is_logged_with_the_message_id(serve):
    """JSON logs put ``message_id`` on the lines of a message: the refusal
    after the final dot is one (the transaction is over by then)."""
    from bonzo.session import current_message_id, current_session_id

    class Refuses:
        def bonzo_rcpt(self):
            return Accept()

        def bonzo_message(self, envelope):
            seen["id"] = envelope.id
            raise errors.PermanentError("Content refused", 554, "5.7.0")

    seen: dict[str, str] = {}
    lines: list[tuple[str, str | None, str | None]] = []

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append((record.getMessage(), current_session_id.get(), current_message_id.get()))

    handler = Record()
    logging.getLogger("tornado.general").addHandler(handler)
    try:
        with smtp(serve(plugin_set(("refuses", Refuses())))) as c:
            c.ehlo()
            with pytest.raises(smtplib.SMTPDataError):
                c.sendmail("a@example.org", ["b@example.org"], b"Subject: x\r\n\r\nx\r\n")
            c.docmd("MAIL", "FROM:<>")
            c.docmd("RCPT", "TO:<bad address>")
    finally:
        logging.getLogger("tornado.general").removeHandler(handler)
    [message] = [line for line in lines if "message refused by refuses" in line[0]]
    assert message[2] == seen["id"] and message[1] is not None
    [later] = [line for line in lines if "RCPT refused by core" in line[0]]
    assert later[2] != seen["id"]  # the next transaction's lines are its own


LATE_PLUGIN = """
from bonzo import errors, hookimpl


class Late:
    @hookimpl(trylast=True)
    def bonzo_rcpt(self, mailbox):
        raise errors.PermanentError(550, "blocked", "5.7.1")


class Early:
    decides_always = ("bonzo_rcpt",)

    @hookimpl(tryfirst=True)
    def bonzo_rcpt(self, mailbox):
        return None
"""


@pytest.mark.parametrize(
    "enabled, warning",
    [
        (
            ["recipients", "access"],
            "the bonzo_rcpt of 'access' never runs: 'recipients' decides every bonzo_rcpt "
            "and runs before it; list 'access' before 'recipients'",
        ),
        (
            # Listed after it, but listing it first would not help: the mark would.
            ["recipients", "late:Late"],
            "the bonzo_rcpt of 'late:Late' never runs: 'recipients' decides every bonzo_rcpt "
            "and runs before it (trylast on 'late:Late'); remove the mark",
        ),
        (
            ["late:Early", "access"],
            "the bonzo_rcpt of 'access' never runs: 'late:Early' decides every bonzo_rcpt "
            "and runs before it (tryfirst on 'late:Early'); remove the mark",
        ),
        (
            # Listed first, but its mark moves it after the plugin that decides.
            ["late:Late", "recipients"],
            "the bonzo_rcpt of 'late:Late' never runs: 'recipients' decides every bonzo_rcpt "
            "and runs before it (trylast on 'late:Late'); remove the mark",
        ),
        (
            ["access", "late:Early"],
            "the bonzo_rcpt of 'access' never runs: 'late:Early' decides every bonzo_rcpt "
            "and runs before it (tryfirst on 'late:Early'); remove the mark",
        ),
    ],
)
def test_the_warning_about_a_hook_that_never_runs_names_the_cause(tmp_path, enabled, warning):
    (tmp_path / "late.py").write_text(LATE_PLUGIN)
    names = ", ".join(f'"{name}"' for name in enabled)
    config = parse_config(
        f'[plugins]\nenabled = [{names}]\npaths = ["{tmp_path}"]\n'
        '[plugins.recipients]\ndomains = ["example.org"]\n',
        source="t.toml",
        base_dir=tmp_path,
    )
    app = MailApp(config)
    assert f"plugins.enabled: {warning}" in app.warnings(), app.warnings()


@pytest.mark.parametrize(
    "attribute, value, message",
    [
        ("accepts", "bonzo_rcpt", "accepts must be a tuple of hook names, not a string (a "
         "missing comma? ('bonzo_rcpt',))"),
        ("decides_always", ("bonzo_rcpt", "bonzo_recpt"), "decides_always names 'bonzo_recpt', "
         "which is not a hook"),
        ("runs_after", ["tagger"], "runs_after must be a dict of plugin name to why, not list"),
        ("open_files", "many", "open_files must be a non-negative int, not 'many'"),
        ("backend_timeout", -1, "backend_timeout must be a positive number of seconds, not -1"),
        ("config_warnings", "one", "config_warnings must be a list of strings"),
    ],
)  # fmt: skip
def test_a_declaration_of_the_wrong_type_is_a_configuration_error(
    plugin_module, attribute, value, message
):
    # Each was ignored without a word: accepts = ("bonzo_rcpt") said the
    # plugin may accept anywhere.
    class Declares:
        def bonzo_configure(self, config):
            setattr(self, attribute, value)

        def bonzo_rcpt(self):
            return None

    plugin_module.Declares = Declares
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config(app_config("Declares"), source="t.toml"))
    assert str(info.value) == f"t.toml: plugins.bonzo_hooktest_plugins:Declares: {message}"


def test_a_plugin_module_that_fails_to_import_says_where(tmp_path, monkeypatch):
    # The plugin's file was found; what it imports is missing, or it raises.
    (tmp_path / "hooktest_needs_dep.py").write_text("\n\nimport hooktest_not_installed\n")
    (tmp_path / "hooktest_raises.py").write_text("X = 1\nraise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for module, line, what in (
        ("hooktest_needs_dep", 3, "cannot import hooktest_needs_dep: No module named "
         "'hooktest_not_installed'"),
        ("hooktest_raises", 2, "importing hooktest_raises failed: RuntimeError('boom')"),
    ):  # fmt: skip
        config = f'[plugins]\nenabled = ["{module}:Plugin"]\n'
        with pytest.raises(ConfigError) as info:
            MailApp(parse_config(config, source="t.toml"))
        assert str(info.value).endswith(f"{what} (at {tmp_path / module}.py:{line})")
    # A module that is not there at all: nothing to point at.
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config('[plugins]\nenabled = ["hooktest_nowhere:P"]\n', source="t.toml"))
    assert str(info.value).endswith(
        "cannot import hooktest_nowhere: No module named 'hooktest_nowhere'"
    )


def test_a_local_module_named_like_another_is_warned_about(tmp_path, monkeypatch):
    # A local dkim.py is what the bundled dkim plugin then imports as
    # dkimpy; a local queue.py is never imported (the standard library's
    # comes first), and the error said the class was missing from a file
    # that has it.
    for module in ("queue", "hooktest_mine"):
        (tmp_path / f"{module}.py").write_text(
            "class Policy:\n    def bonzo_rcpt(self):\n        pass\n"
        )
    paths = f'[plugins]\npaths = ["{tmp_path}"]\n'
    monkeypatch.setattr(sys, "path", list(sys.path))  # no queue.py left first on it
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config(paths + 'enabled = ["queue:Policy"]\n', source="t.toml"))
    assert str(info.value).endswith(
        f"queue ({queue.__file__}) has no 'Policy'; {tmp_path}/queue.py is not the one "
        "imported: another module named 'queue' comes first (rename the file)"
    )
    app = MailApp(parse_config(paths + 'enabled = ["hooktest_mine:Policy"]\n', source="t.toml"))
    found = [w for w in app.warnings() if w.startswith("plugins.paths[0]")]
    assert found == [
        f"plugins.paths[0]: {tmp_path}/queue.py is named like the module 'queue' "
        f"({queue.__file__}): whichever comes first on the import path is the one every "
        "import of 'queue' gets, Bonzo's plugins' too; rename the file"
    ]


def test_plugin_name_mistakes_say_what_to_do(tmp_path):
    # A file name where a module name goes; a module looked for in a
    # directory that is not there; a table left for a plugin removed.
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config('[plugins]\nenabled = ["./rules.py:Policy"]\n', source="t.toml"))
    assert str(info.value).endswith(
        "plugin './rules.py:Policy': ./rules.py is a file name; name the module "
        '("rules:Policy") and put its directory in plugins.paths'
    )
    gone = tmp_path / "nowhere"
    config = f'[plugins]\npaths = ["{gone}"]\nenabled = ["hooktest_gone:Policy"]\n'
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config(config, source="t.toml"))
    assert str(info.value).endswith(
        f"No module named 'hooktest_gone' (plugins.paths has {gone}, which is not a directory)"
    )
    with pytest.raises(ConfigError) as info:
        MailApp(parse_config('[plugins."hooktest_old:P"]\nx = 1\n', source="t.toml"))
    assert str(info.value) == (
        "t.toml: plugins.hooktest_old:P: table for a plugin that is neither enabled nor "
        "installed: enable it, or remove the table"
    )

"""The ratelimit plugin with the in-process store (Redis: tests/interop/test_redis.py)."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from types import SimpleNamespace
from typing import Any

import pytest
from bonzo_plugins.ratelimit import RateLimitPlugin
from plugin_testing import make_envelope, make_session, serve

from bonzo.address import Address
from bonzo.errors import SMTPError
from bonzo.store import Hit, MemoryStore, Store, StoreError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def configure(table: dict[str, Any], store: Store | None = None) -> RateLimitPlugin:
    plugin = RateLimitPlugin()
    plugin.bonzo_configure(
        config=table, app=SimpleNamespace(store=MemoryStore() if store is None else store)
    )
    return plugin


def rule(key: str, stage: str, limit: int, window: Any = 60, **extra: Any) -> dict[str, Any]:
    return {"key": key, "stage": stage, "limit": limit, "window": window, **extra}


def recipients() -> tuple[str, Any]:
    from bonzo.hookspecs import hookimpl

    class Plugin:
        @hookimpl
        def bonzo_rcpt(self, session: Any, envelope: Any, mailbox: Any) -> Any:
            from bonzo.hookspecs import Accept

            return Accept()

    return ("recipients", Plugin())


def test_connections_over_the_limit_get_421_and_one_log_line(caplog):
    plugin = configure({"rules": [rule("client", "connect", 2, "1m")]})
    with serve(("ratelimit", plugin)) as server:
        for _ in range(2):
            with server.client() as client:
                assert client.noop()[0] == 250
        with pytest.raises(smtplib.SMTPConnectError) as info:
            server.client()
    # The rule's 451, sent as 421: only 421 or 554 may stand in for the greeting.
    assert info.value.smtp_code == 421
    assert b"4.7.1 Rate limit exceeded" in info.value.smtp_error
    lines = [r.getMessage() for r in caplog.records if r.name == "bonzo.plugins.ratelimit"]
    assert len(lines) == 1
    assert "client '127.0.0.1' over client-connect-2-60: more than 2 per 60s" in lines[0]


def test_recipients_per_domain_and_messages_per_sender():
    plugin = configure(
        {
            "reply": "451 4.7.1 Slow down",
            "rules": [
                rule("rcpt_domain", "rcpt", 2, reply="452 4.5.3 Too many for that domain"),
                rule("sender", "mail", 2, "1h"),
            ],
        }
    )
    with serve(("ratelimit", plugin), recipients()) as server, server.client() as client:
        client.ehlo()
        assert client.mail("a@example.net")[0] == 250
        codes = [client.rcpt(f"u{i}@example.com")[0] for i in range(3)]
        assert codes == [250, 250, 452]
        assert client.rcpt("u@example.org")[0] == 250  # another domain
        client.rset()
        assert client.mail("A@Example.NET")[0] == 250  # the same sender, spelled otherwise
        client.rset()
        code, text = client.mail("a@example.net")
        assert (code, text) == (451, b"4.7.1 Slow down")
        assert client.mail("b@example.net")[0] == 250


def test_ipv6_clients_count_by_their_64_and_ipv4_by_the_configured_prefix():
    plugin = configure({"ipv4_prefix": 24, "rules": [rule("client", "mail", 1)]})
    sender = Address.parse("a@example.net")

    async def go() -> list[bool]:
        out = []
        for ip in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:3::1", "192.0.2.1",
                   "192.0.2.200", "::ffff:192.0.2.7", "198.51.100.1"):  # fmt: skip
            try:
                await plugin.check("mail", make_session(ip), sender=sender)
                out.append(True)
            except SMTPError:
                out.append(False)
        return out

    assert asyncio.run(go()) == [True, False, True, True, False, False, True]


def test_user_limits_count_only_authenticated_sessions():
    plugin = configure({"rules": [rule("user", "mail", 1)]})
    sender = Address.parse("a@example.net")

    async def go() -> list[bool]:
        out = []
        for auth in (None, None, "alice", "alice", "bob"):
            try:
                await plugin.check("mail", make_session(auth=auth), sender=sender)
                out.append(True)
            except SMTPError:
                out.append(False)
        return out

    assert asyncio.run(go()) == [True, True, True, False, True]


def test_the_null_sender_is_one_sender():
    plugin = configure({"rules": [rule("sender", "rcpt", 1)]})
    envelope = make_envelope(mail_from="")

    async def go() -> None:
        await plugin.bonzo_rcpt(make_session(), envelope, Address.parse("x@example.com"))
        with pytest.raises(SMTPError):
            await plugin.bonzo_rcpt(make_session(), envelope, Address.parse("y@example.com"))

    asyncio.run(go())


def test_exempt_networks_are_not_counted():
    plugin = configure(
        {"exempt_networks": ["192.0.2.0/24"], "rules": [rule("client", "connect", 1)]}
    )

    async def go() -> None:
        for _ in range(5):
            await plugin.bonzo_connect(make_session("192.0.2.9"))
        await plugin.bonzo_connect(make_session("198.51.100.1"))
        with pytest.raises(SMTPError):
            await plugin.bonzo_connect(make_session("198.51.100.1"))

    asyncio.run(go())


def test_the_window_slides_with_the_store_clock():
    clock = Clock()
    plugin = configure({"rules": [rule("client", "connect", 2, "10s")]}, MemoryStore(clock=clock))

    async def attempt() -> bool:
        try:
            await plugin.bonzo_connect(make_session())
        except SMTPError:
            return False
        return True

    async def go() -> list[bool]:
        out = [await attempt(), await attempt(), await attempt()]
        clock.now += 25  # two windows on
        out.append(await attempt())
        return out

    assert asyncio.run(go()) == [True, True, False, True]


class BrokenStore(Store):
    async def hit(self, key: str, limit: int, window: float, *, group: str = "") -> Hit:
        raise StoreError("Redis at redis://127.0.0.1:1/0: counting failed: ConnectionError")


def test_a_store_failure_fails_open_with_a_warning(caplog):
    plugin = configure({"rules": [rule("client", "connect", 1)]}, BrokenStore())

    async def go() -> None:
        for _ in range(3):
            await plugin.bonzo_connect(make_session())

    asyncio.run(go())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one line, not one per connection
    assert "counting failed" in warnings[0].getMessage()
    assert "allowed without limits" in warnings[0].getMessage()


def test_a_store_failure_can_tempfail_instead():
    plugin = configure(
        {"on_store_error": "tempfail", "rules": [rule("client", "connect", 1)]}, BrokenStore()
    )
    with pytest.raises(SMTPError) as info:
        asyncio.run(plugin.bonzo_connect(make_session()))
    assert info.value.status_code == 451
    assert "Redis" not in str(info.value.message)  # no local detail to the client


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rules": [rule("sender", "connect", 1)]}, "rules[0].stage: a sender limit applies"),
        ({"rules": [rule("rcpt_domain", "mail", 1)]}, "rules[0].stage"),
        ({"rules": [rule("host", "mail", 1)]}, "rules[0].key: expected one of"),
        ({"rules": [rule("client", "mail", 0)]}, "rules[0].limit"),
        ({"rules": [rule("client", "mail", True)]}, "rules[0].limit"),
        ({"rules": [rule("client", "mail", 1, "soon")]}, "rules[0].window"),
        ({"rules": [rule("client", "mail", 1, 0)]}, "rules[0].window"),
        ({"rules": [rule("client", "mail", 1, 1e-300)]}, "rules[0].window: expected a number >="),
        ({"rules": [rule("client", "mail", 1, 0.0009)]}, "rules[0].window: expected a number >="),
        ({"rules": [{"key": "client", "stage": "mail", "limit": 1}]}, "rules[0].window: required"),
        ({"rules": [rule("client", "data", 1)]}, "rules[0].stage: expected one of 'connect'"),
        ({"rules": [rule("client", "mail", 1, "5y")]}, "rules[0].window: expected a duration"),
        ({"rules": [rule("client", "mail", 1, name="a\tb")]}, "rules[0].name: expected a short"),
        ({"rules": [rule("client", "mail", 10_000_001)]}, "rules[0].limit: expected an integer <="),
        ({"rules": ["client"]}, "rules[0]: expected a table, got 'client'"),
        ({"reply": "250 fine"}, "reply: the code must be 4xx or 5xx, got 250"),
        ({"rules": [rule("client", "mail", 1, colour=1)]}, "rules[0].colour: unknown key"),
        ({"rules": [rule("client", "mail", 1, reply="250 ok")]}, "rules[0].reply"),
        ({"rules": [rule("client", "mail", 1), rule("client", "mail", 1)]}, "rules[1].name"),
        ({"rules": {}}, "rules: expected an array"),
        ({"ipv6_prefix": 129}, "ipv6_prefix"),
        ({"ipv4_prefix": 0}, "ipv4_prefix"),
        ({"on_store_error": "reject"}, "on_store_error"),
        ({"exempt_networks": ["10.0.0.1/8"]}, "exempt_networks"),
        ({"colour": 1}, "colour: unknown key"),
    ],
)
def test_bad_configuration_is_refused(table, message):
    with pytest.raises(ValueError) as info:
        configure(table)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_rule_names_and_replies():
    plugin = configure(
        {
            "reply": "451 4.7.1 Slow down",
            "rules": [
                rule("client", "connect", 5, "1m"),
                rule("sender", "rcpt", 9, 60, name="senders", reply="550 5.7.1 No more"),
            ],
        }
    )
    first, second = plugin.rules["connect"][0], plugin.rules["rcpt"][0]
    assert (first.name, first.window, first.reply.text) == (
        "client-connect-5-60",
        60.0,
        "Slow down",
    )
    assert (second.name, second.reply.code, second.reply.text) == ("senders", 550, "No more")

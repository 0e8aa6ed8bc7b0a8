"""The greylist plugin with the in-process store (Redis: tests/interop/test_redis.py)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from bonzo_plugins.greylist import GreylistPlugin
from plugin_testing import make_envelope, make_session, serve

from bonzo.address import Address
from bonzo.errors import SMTPError
from bonzo.hookspecs import Accept, hookimpl
from bonzo.store import MemoryStore, Store, StoreError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def configure(table: dict[str, Any], clock: Clock, store: Store | None = None) -> GreylistPlugin:
    plugin = GreylistPlugin(clock=clock)
    store = MemoryStore(clock=clock) if store is None else store
    plugin.bonzo_configure(config=table, app=SimpleNamespace(store=store))
    return plugin


def attempt(
    plugin: GreylistPlugin,
    ip: str = "192.0.2.10",
    sender: str = "a@example.net",
    rcpt: str = "u@example.com",
    auth: str | None = None,
) -> str | None:
    """``None`` when the recipient passes, else the reply text."""

    async def go() -> str | None:
        try:
            await plugin.bonzo_rcpt(
                make_session(ip, auth=auth), make_envelope(mail_from=sender), Address.parse(rcpt)
            )
        except SMTPError as exc:
            assert exc.status_code == 451
            return f"{exc.enhanced_code} {exc.message}"
        return None

    return asyncio.run(go())


def test_the_first_attempt_waits_the_delay_then_passes_and_is_remembered():
    clock = Clock()
    plugin = configure({"delay": "5m"}, clock)
    assert attempt(plugin) == "4.7.1 Greylisted: please try again in 300 seconds"
    clock.now += 100
    assert attempt(plugin) == "4.7.1 Greylisted: please try again in 200 seconds"
    clock.now += 200
    assert attempt(plugin) is None
    clock.now += 20 * 86400  # confirmed: kept for 35 days, refreshed on use
    assert attempt(plugin) is None
    clock.now += 30 * 86400
    assert attempt(plugin) is None
    clock.now += 36 * 86400  # unused past confirmed_expiry: forgotten
    assert attempt(plugin) is not None


def test_a_retry_is_never_told_to_wait_longer_than_the_delay():
    # The first attempt's time was kept rounded to the nearest second: at
    # x.6 s a retry at once was told 3 seconds for a delay of 2, and one
    # just past the delay was refused.
    clock = Clock()
    clock.now += 0.6
    plugin = configure({"delay": 2}, clock)
    assert attempt(plugin) == "4.7.1 Greylisted: please try again in 2 seconds"
    clock.now += 0.1
    assert attempt(plugin) == "4.7.1 Greylisted: please try again in 2 seconds"
    clock.now += 1.95
    assert attempt(plugin) is None


def test_the_triplet_is_network_sender_recipient():
    clock = Clock()
    plugin = configure({"delay": 60}, clock)
    assert attempt(plugin, ip="192.0.2.10") is not None
    clock.now += 61
    assert attempt(plugin, ip="192.0.2.77") is None  # the same /24
    assert attempt(plugin, ip="2001:db8::1") is not None
    clock.now += 61
    assert attempt(plugin, ip="2001:db8::ffff:1") is None  # the same /64
    assert attempt(plugin, sender="b@example.net") is not None
    assert attempt(plugin, rcpt="v@example.com") is not None
    assert attempt(plugin, sender="A@EXAMPLE.NET") is None  # one address, spelled otherwise


def test_an_unconfirmed_entry_expires():
    clock = Clock()
    plugin = configure({"delay": 60, "pending_expiry": "1h"}, clock)
    assert attempt(plugin) is not None
    clock.now += 3601
    assert attempt(plugin) == "4.7.1 Greylisted: please try again in 60 seconds"


def test_allow_lists_and_authenticated_sessions_skip():
    clock = Clock()
    plugin = configure(
        {"allow_networks": ["198.51.100.0/24"], "allow_domains": ["ＥＸＡＭＰＬＥ.org"]}, clock
    )
    assert attempt(plugin, ip="198.51.100.5") is None
    assert attempt(plugin, rcpt="x@example.org") is None
    assert attempt(plugin, auth="alice") is None
    assert attempt(plugin) is not None
    plugin = configure({"skip_authenticated": False}, clock)
    assert attempt(plugin, auth="alice") is not None


def test_a_custom_reply_and_prefixes(caplog):
    clock = Clock()
    plugin = configure({"reply": "Come back in {seconds}s", "ipv4_prefix": 32, "delay": 10}, clock)
    assert attempt(plugin, ip="192.0.2.1") == "4.7.1 Come back in 10s"
    clock.now += 11
    assert attempt(plugin, ip="192.0.2.2") is not None  # /32: another client
    assert attempt(plugin, ip="192.0.2.1") is None
    lines = [r.getMessage() for r in caplog.records if r.name == "bonzo.plugins.greylist"]
    assert "retry in 10s" in lines[0] and "'a@example.net' -> 'u@example.com'" in lines[0]
    assert "passed after 11s" in lines[-1]


class BrokenStore(Store):
    async def get(self, key: str) -> str | None:
        raise StoreError("Redis at redis://127.0.0.1:1/0: reading failed: ConnectionError")


def test_a_store_failure_lets_mail_through_with_a_warning(caplog):
    plugin = configure({}, Clock(), BrokenStore())
    assert attempt(plugin) is None
    assert attempt(plugin) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not greylisted" in warnings[0]


def test_a_store_failure_can_tempfail():
    plugin = configure({"on_store_error": "tempfail"}, Clock(), BrokenStore())
    assert attempt(plugin) == "4.3.0 Temporary local problem, try again later"


def test_through_a_real_server():
    class Recipients:
        @hookimpl
        def bonzo_rcpt(self, session: Any, envelope: Any, mailbox: Any) -> Any:
            return Accept()

    clock = Clock()
    plugin = configure({"delay": 30}, clock)
    with serve(("greylist", plugin), ("recipients", Recipients())) as server:
        with server.client() as client:
            client.ehlo()
            client.mail("a@example.net")
            code, text = client.rcpt("u@example.com")
        assert (code, text) == (451, b"4.7.1 Greylisted: please try again in 30 seconds")
        clock.now += 31
        with server.client() as client:
            client.ehlo()
            client.mail("a@example.net")
            assert client.rcpt("u@example.com")[0] == 250


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"delay": 600, "pending_expiry": 300}, "pending_expiry: must be longer than delay"),
        ({"delay": "later"}, "delay: expected a duration"),
        ({"confirmed_expiry": -1}, "confirmed_expiry"),
        ({"reply": "wait {minutes}"}, "reply: only {seconds}"),
        ({"reply": "a\nb"}, "reply: expected printable"),
        ({"allow_networks": ["192.0.2.1/24"]}, "allow_networks"),
        ({"allow_domains": ["\u2488.example"]}, "allow_domains: "),
        ({"allow_domains": "example.org"}, "allow_domains: expected a list"),
        ({"allow_domains": ["ok.example", ""]}, "allow_domains: expected a list of non-empty"),
        ({"delay": 0}, "delay: expected a positive duration, got 0.0"),
        ({"pending_expiry": "11000d"}, "pending_expiry: expected a number <= "),
        ({"reply": "x" * 401}, "reply: expected printable text of at most 400"),
        ({"skip_authenticated": 1}, "skip_authenticated"),
        ({"ipv4_prefix": 33}, "ipv4_prefix"),
        ({"on_store_error": "reject"}, "on_store_error"),
        ({"colour": 1}, "colour: unknown key"),
    ],
)
def test_bad_configuration_is_refused(table, message):
    with pytest.raises(ValueError) as info:
        configure(table, Clock())
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_configuration_values():
    plugin = configure(
        {"delay": "1m", "pending_expiry": "2h", "allow_domains": ["Example.ORG."]}, Clock()
    )
    assert (plugin.delay, plugin.pending_expiry, plugin.confirmed_expiry) == (60, 7200, 35 * 86400)
    assert plugin.allow_domains == frozenset({"example.org"})
    assert configure({}, Clock()).allow_domains == frozenset()


def test_a_flood_of_made_up_triplets_does_not_push_out_other_clients_entries():
    """The in-memory store is full of one network's junk triplets: the
    pending entry of another client and a triplet that passed stay, so that
    both retries pass (the store stays within its cap)."""
    clock = Clock()
    store = MemoryStore(max_keys=1000, clock=clock)
    plugin = configure({"delay": 60}, clock, store)
    assert attempt(plugin, ip="192.0.2.10", rcpt="confirmed@example.com") is not None
    clock.now += 61
    assert attempt(plugin, ip="192.0.2.10", rcpt="confirmed@example.com") is None
    assert attempt(plugin, ip="198.51.100.7", sender="real@example.org") is not None

    async def flood() -> None:
        envelope = make_envelope(mail_from="x@spam.example")
        for i in range(3000):
            session = make_session(f"203.0.113.{i % 250}")
            with pytest.raises(SMTPError):
                await plugin.bonzo_rcpt(session, envelope, Address.parse(f"r{i}@example.com"))

    asyncio.run(flood())
    assert store.size == 1000
    clock.now += 61
    assert attempt(plugin, ip="198.51.100.7", sender="real@example.org") is None
    assert attempt(plugin, ip="192.0.2.10", rcpt="confirmed@example.com") is None


def test_a_flood_from_many_networks_leaves_the_triplets_that_passed():
    clock = Clock()
    store = MemoryStore(max_keys=1000, clock=clock)
    plugin = configure({"delay": 60}, clock, store)
    for n in range(5):
        assert attempt(plugin, ip=f"192.0.2.{n}", rcpt=f"u{n}@example.com") is not None
    clock.now += 61
    for n in range(5):
        assert attempt(plugin, ip=f"192.0.2.{n}", rcpt=f"u{n}@example.com") is None

    async def flood() -> None:
        envelope = make_envelope(mail_from="x@spam.example")
        for i in range(3000):  # a network of its own for each
            session = make_session(f"10.{i // 250}.{i % 250}.1")
            with pytest.raises(SMTPError):
                await plugin.bonzo_rcpt(session, envelope, Address.parse("r@example.com"))

    asyncio.run(flood())
    for n in range(5):
        assert attempt(plugin, ip=f"192.0.2.{n}", rcpt=f"u{n}@example.com") is None

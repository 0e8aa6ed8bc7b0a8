"""The spf plugin: identities, policy keys, results, Received-SPF, DNS off.

The DNS stub serves the records; the RFC 7208 suite is in test_spf_suite.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from auth_testing import app, envelope, example_keys, fake_session, run
from bonzo_plugins.dmarc import DmarcPlugin
from bonzo_plugins.spf import SpfPlugin
from bonzo_plugins.spf.evaluate import NotChecked, SPFOutcome
from bonzo_plugins.spf.plugin import KEYS, received_spf

from bonzo.address import Address
from bonzo.errors import PermanentError, TransientError

README = Path(__file__).resolve().parents[2] / "plugins" / "spf" / "README.rst"


def configured(resolver=None, **table) -> SpfPlugin:
    plugin = SpfPlugin()
    plugin.bonzo_configure(config=table, app=app(resolver))
    return plugin


def mail(plugin, session, sender, env=None):
    env = env if env is not None else envelope(mail_from=sender)
    mailbox = Address.parse(sender) if sender else None
    run(
        plugin.bonzo_mail(session=session, envelope=env, address=sender, params={}, mailbox=mailbox)
    )
    return env


@pytest.fixture
def zone(dns_stub):
    dns_stub.add("example.org", "TXT", '"v=spf1 ip4:192.0.2.0/24 -all"')
    dns_stub.add("soft.example", "TXT", '"v=spf1 ~all"')
    dns_stub.add("broken.example", "TXT", '"v=spf1 ip4:300.1.1.1 -all"')
    dns_stub.add("exp.example", "TXT", '"v=spf1 -all exp=why.exp.example"')
    dns_stub.add("why.exp.example", "TXT", '"%{i} is not one of our\\010servers"')
    dns_stub.add("mail.example.org", "TXT", '"v=spf1 a -all"')
    dns_stub.add("mail.example.org", "A", "192.0.2.10")
    dns_stub.fault("down.example", "servfail")
    dns_stub.fault("slow.example", "timeout")
    return dns_stub


def test_pass_recorded_with_details(zone):
    plugin = configured(zone.resolver())
    session = fake_session()
    env = mail(plugin, session, "alice@example.org")
    (result,) = env.results.all("spf")
    assert result.result == "pass"
    assert result.details["domain"] == "example.org"
    assert result.details["identity"] == "mailfrom"
    assert result.details["client_ip"] == "192.0.2.10"
    assert ("example.org", "TXT", "udp") in zone.queries


def test_fail_is_only_tagged_by_default(zone):
    plugin = configured(zone.resolver())
    env = mail(plugin, fake_session("198.51.100.7"), "alice@example.org")
    assert env.results.get("spf").result == "fail"


@pytest.mark.parametrize(
    ("sender", "key", "action", "code", "enhanced"),
    [
        ("alice@example.org", "on_fail", "reject", 550, "5.7.23"),
        ("alice@example.org", "on_fail", "tempfail", 451, "4.7.24"),
        ("bob@soft.example", "on_softfail", "reject", 550, "5.7.23"),
        ("bob@broken.example", "on_permerror", "reject", 550, "5.7.24"),
        ("bob@down.example", "on_temperror", "tempfail", 451, "4.7.24"),
        # A DNS failure is never refused for good (RFC 7208 8.6).
        ("bob@down.example", "on_temperror", "reject", 451, "4.4.3"),
        ("bob@slow.example", "on_temperror", "reject", 451, "4.4.3"),
    ],
)
def test_policy_keys(zone, sender, key, action, code, enhanced):
    plugin = configured(zone.resolver(), **{key: action})
    session = fake_session("198.51.100.7")
    env = envelope(mail_from=sender)
    with pytest.raises((PermanentError, TransientError)) as info:
        mail(plugin, session, sender, env)
    assert info.value.status_code == code
    assert info.value.enhanced_code == enhanced
    assert env.results.get("spf").result == key.removeprefix("on_")
    assert "HELO name" not in info.value.message  # the MAIL FROM identity


def test_other_results_pass_whatever_the_policy(zone):
    plugin = configured(
        zone.resolver(),
        on_fail="reject",
        on_softfail="reject",
        on_permerror="reject",
        on_temperror="reject",
    )
    env = mail(plugin, fake_session(), "alice@example.org")
    assert env.results.get("spf").result == "pass"
    env = mail(plugin, fake_session("198.51.100.7"), "x@nospf.example")
    assert env.results.get("spf").result == "none"


def test_explanation_is_sanitized_in_the_reply(zone):
    plugin = configured(zone.resolver(), on_fail="reject")
    with pytest.raises(PermanentError) as info:
        mail(plugin, fake_session("198.51.100.7"), "x@exp.example")
    text = str(info.value.args) + repr(info.value.message)
    assert "198.51.100.7 is not one of our servers" in info.value.message
    assert "\n" not in text and "\x08" not in info.value.message


def test_helo_identity_on_the_session_and_null_sender(zone):
    plugin = configured(zone.resolver())
    session = fake_session("192.0.2.10", helo="mail.example.org")
    run(plugin.bonzo_helo(session=session, name="mail.example.org", esmtp=True))
    (helo,) = session.results.all("spf")
    assert (helo.result, helo.details["identity"]) == ("pass", "helo")
    asked = len(zone.queries)
    env = mail(plugin, session, "")
    result = env.results.get("spf")
    assert (result.result, result.details["identity"]) == ("pass", "helo")
    assert result.details["domain"] == "mail.example.org"
    assert len(zone.queries) == asked  # the HELO result is reused, not asked again


def test_helo_fail_refuses_at_mail_when_fail_is_rejected(zone):
    plugin = configured(zone.resolver(), on_fail="reject")
    session = fake_session("198.51.100.7", helo="mail.example.org")
    run(plugin.bonzo_helo(session=session, name="mail.example.org", esmtp=True))
    assert session.results.get("spf").result == "fail"
    with pytest.raises(PermanentError) as info:
        mail(plugin, session, "alice@elsewhere.example")
    assert info.value.enhanced_code == "5.7.23"
    # The reply says it was the HELO name: the sender used another at MAIL.
    assert info.value.message == (
        "SPF fail: HELO name mail.example.org does not allow 198.51.100.7 to send for it"
    )


def test_dns_off_gives_none_without_verdict(zone):
    plugin = configured(None, on_fail="reject", on_temperror="reject")
    env = mail(plugin, fake_session("198.51.100.7"), "alice@example.org")
    result = env.results.get("spf")
    assert result.result == "none" and "DNS lookups are off" in result.reason
    assert zone.queries == []


def test_authenticated_and_networks_are_skipped(zone):
    plugin = configured(zone.resolver(), on_fail="reject", skip_networks=["198.51.100.0/24"])
    env = mail(plugin, fake_session("203.0.113.5", auth="alice"), "alice@example.org")
    assert "spf" not in env.results
    env = mail(plugin, fake_session("198.51.100.7"), "alice@example.org")
    assert "spf" not in env.results
    assert zone.queries == []


def test_received_spf_header(zone):
    plugin = configured(zone.resolver(), received_spf=True)
    session = fake_session()
    env = mail(plugin, session, "alice@example.org")
    plugin.bonzo_message(session=session, envelope=env)
    header = env.header_bytes.decode()
    m = re.search(r"Received-SPF: (.*)\r\n", header)
    assert m, header
    assert m.group(1).startswith("pass (mx.test: domain of example.org designates 192.0.2.10")
    assert 'envelope-from="alice@example.org"' in m.group(1)
    assert "identity=mailfrom" in m.group(1) and "receiver=mx.test" in m.group(1)


def test_received_spf_quotes_what_the_client_sent():
    value = received_spf(
        "fail",
        {"client_ip": "192.0.2.1", "domain": "x.example", "sender": 'a"b\r\n@x', "helo": "(x)"},
        "mx.test",
    )
    assert "\r" not in value and "\n" not in value
    assert 'envelope-from="a\\"b  @x"' in value and 'helo="(x)"' in value


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"on_fail": "drop"}, "on_fail: expected one of"),
        ({"timeout": 0}, "timeout"),
        ({"threads": 0}, "threads"),
        ({"threads": 257}, "threads"),
        ({"threads_per_client": 0}, "threads_per_client"),
        ({"threads": 2, "threads_per_client": 3}, "threads_per_client: must be at most"),
        ({"helo": "yes"}, "helo: expected true or false"),
        ({"skip_networks": ["10.0.0.1/8"]}, "skip_networks"),
        ({"nope": 1}, "nope: unknown key"),
    ],
)
def test_bad_configuration(table, message):
    with pytest.raises(ValueError, match=message):
        configured(None, **table)


def test_the_example_configuration_shows_every_key():
    assert example_keys("spf") == set(KEYS)


def test_slow_senders_hold_only_the_plugins_threads_and_the_timeout_counts_queueing(zone):
    """Checks stalled on slow DNS (cheap for a sender to cause) fill the
    plugin's own ``threads``, never the loop's default executor (DKIM
    hashing, maildir and spool writes); a check waiting for a thread still
    ends at its ``timeout``, as not made here (never the domain's
    temperror); and the stalled checks free their threads at their
    deadline, not at the resolver's."""
    plugin = configured(zone.resolver(timeout=3.0), threads=2, timeout=0.6)
    client = fake_session(remote_ip="192.0.2.1")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        # A small default executor, as on a 2-core machine (6 threads there).
        loop.set_default_executor(ThreadPoolExecutor(2))
        start = time.monotonic()
        slow = [
            asyncio.ensure_future(
                plugin._check(fake_session(f"198.51.100.{i}"), "x@slow.example", "h.example")
            )
            for i in range(4)
        ]
        await asyncio.sleep(0.1)
        probe = await loop.run_in_executor(None, time.monotonic)
        assert probe - start < 1.5  # the default executor is free (else ~3 s)
        plugin.timeout = 0.3
        queued = time.monotonic()
        with pytest.raises(NotChecked) as info:
            await plugin._check(client, "a@example.org", "h.example")
        assert not info.value.ran and info.value.busy == "pool"
        assert time.monotonic() - queued < 1.5  # (the resolver takes 3 s)
        results = await asyncio.gather(*slow, return_exceptions=True)
        # Two ran, out of time on DNS: the domain's temperror. Two never
        # got a thread: not made.
        ran = [o.result for o in results if isinstance(o, SPFOutcome)]
        assert ran == ["temperror", "temperror"], results
        assert sum(isinstance(o, NotChecked) for o in results) == 2, results
        assert time.monotonic() - start < 2.5  # not the resolver's 3 s
        # The threads are free again: a check whose DNS answers passes.
        plugin.timeout = 5.0
        outcome = await plugin._check(client, "a@example.org", "h.example")
        assert outcome.result == "pass"

    try:
        run(scenario())
    finally:
        plugin.bonzo_shutdown()
    assert plugin._pool is None


# ------------------------------------------------- overload of the plugin
def spoof(author: str = "ceo@good.example") -> bytes:
    return f"From: {author}\r\nTo: bob@example.com\r\nSubject: pay\r\n\r\nNow\r\n".encode()


@pytest.fixture
def spoofed(zone):
    """good.example allows no one and asks for p=reject; the attacker's HELO
    name never answers (as in the audit's spfdos set-up)."""
    zone.add("good.example", "TXT", '"v=spf1 -all"')
    zone.add("_dmarc.good.example", "TXT", '"v=DMARC1; p=reject"')
    zone.fault("slow.attacker.example", "timeout")
    return zone


def test_a_check_the_busy_pool_left_no_time_is_deferred_never_a_dmarc_temperror(spoofed, caplog):
    """Clients whose HELO names never answer keep every thread busy; a
    spoofed message from a p=reject domain then gets 451 4.3.0 at MAIL
    (before the fix: spf=temperror, which DMARC's default on_temperror =
    "tag" delivered)."""
    resolver = spoofed.resolver(timeout=5.0)
    plugin = configured(resolver, threads=2)
    dmarc = DmarcPlugin()
    dmarc.bonzo_configure(config={}, app=app(resolver))

    async def deliver(session) -> Any:
        """MAIL, then (if taken) DMARC at the end of DATA: the verdict."""
        env = envelope(spoof(), mail_from="ceo@good.example")
        mailbox = Address.parse("ceo@good.example")
        await plugin.bonzo_mail(
            session=session, envelope=env, address="ceo@good.example", params={}, mailbox=mailbox
        )
        return env, await dmarc.bonzo_message(session=session, envelope=env)

    async def scenario() -> None:
        # Without the flood: refused by good.example's policy.
        with pytest.raises(PermanentError) as info:
            await deliver(fake_session("192.0.2.99", helo="client.test"))
        assert info.value.status_code == 550
        plugin.timeout = 2.0
        flood = [
            asyncio.ensure_future(
                plugin.bonzo_helo(
                    session=fake_session(f"198.51.100.{i}", helo="slow.attacker.example"),
                    name="slow.attacker.example",
                    esmtp=True,
                )
            )
            for i in range(1, 5)
        ]
        await asyncio.sleep(0.2)
        plugin.timeout = 0.5
        session = fake_session("192.0.2.99", helo="client.test")
        started = time.monotonic()
        with pytest.raises(TransientError) as info:
            verdict = await deliver(session)
            pytest.fail(f"the spoof was taken: {verdict}")
        assert (info.value.status_code, info.value.enhanced_code) == (451, "4.3.0")
        assert "try again later" in info.value.message
        assert time.monotonic() - started < 1.5
        await asyncio.gather(*flood)

    try:
        with caplog.at_level("WARNING", logger="bonzo.plugins.spf"):
            run(scenario())
    finally:
        plugin.bonzo_shutdown()
    (warning,) = [r.getMessage() for r in caplog.records if "MAIL FROM" in r.getMessage()]
    assert "local overload of the spf plugin" in warning
    assert "(threads = 2)" in warning and "answered 451 4.3.0" in warning
    # The two HELO checks that got no thread recorded nothing.
    helo_warnings = [r for r in caplog.records if "HELO slow.attacker.example" in r.getMessage()]
    assert len(helo_warnings) == 2


def test_a_temperror_after_waiting_most_of_the_timeout_is_not_the_domain_s(spoofed):
    """A check that got its thread with less than half its timeout left and
    then ran out of time on DNS: the wait may be what cut it short, so it
    was not made here; with most of its time its own, the same slow DNS is
    the domain's temperror."""
    plugin = configured(spoofed.resolver(timeout=5.0), threads=1)

    async def waited(hold: float) -> Any:
        plugin.timeout = hold
        blocker = asyncio.ensure_future(
            plugin._check(fake_session("198.51.100.1"), "x@slow.example", "h.example")
        )
        await asyncio.sleep(0.05)
        plugin.timeout = 1.0
        try:
            return await plugin._check(fake_session("192.0.2.1"), "x@slow.example", "h.example")
        except NotChecked as exc:
            return exc
        finally:
            await blocker

    async def scenario() -> None:
        late = await waited(0.7)  # a thread at ~0.7 s of 1 s
        assert isinstance(late, NotChecked) and late.ran, late
        assert late.busy == "pool" and late.pool_wait > 0.5
        early = await waited(0.3)  # a thread at ~0.3 s of 1 s
        assert isinstance(early, SPFOutcome), early
        assert early.result == "temperror"

    try:
        run(scenario())
    finally:
        plugin.bonzo_shutdown()


async def given_back(plugin, within: float = 3.0) -> None:
    """Wait until every client's places are given back (their threads were
    done with their checks), ``within`` seconds at most."""
    deadline = time.monotonic() + within
    while len(plugin._shares) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(plugin._shares) == 0


def test_one_client_holds_at_most_its_share_of_the_threads(zone):
    """One client (one address) with many checks whose DNS never answers has
    at most threads_per_client of them in the pool; its others wait for its
    own turn (and end as not made); another client's check runs at once."""
    plugin = configured(zone.resolver(timeout=5.0), threads=4, threads_per_client=2)
    for i in range(6):  # distinct names: the resolver shares a query in flight
        zone.fault(f"slow{i}.example", "timeout")

    def asked() -> int:
        return len([q for q in zone.queries if q[0].startswith("slow")])

    async def scenario() -> None:
        plugin.timeout = 1.5
        hog = [
            asyncio.ensure_future(
                plugin._check(fake_session("198.51.100.7"), f"x@slow{i}.example", "h.example")
            )
            for i in range(6)
        ]
        # Until its two running checks have asked the DNS (a loaded CI may
        # take longer than a fixed pause), bounded.
        for _ in range(100):
            await asyncio.sleep(0.05)
            if asked() >= 2:
                break
        assert plugin._shares.running("198.51.100.7") == 2
        assert asked() == 2  # only two of its checks ever ran
        started = time.monotonic()
        outcome = await plugin._check(fake_session("192.0.2.1"), "a@example.org", "h.example")
        assert outcome.result == "pass"
        assert time.monotonic() - started < 0.5
        await asyncio.sleep(0.5)  # 1 s into its checks' 1.5 s: still two
        assert plugin._shares.running("198.51.100.7") == 2 and asked() == 2
        results = await asyncio.gather(*hog, return_exceptions=True)
        assert [o.result for o in results if isinstance(o, SPFOutcome)] == ["temperror"] * 2
        waited = [o for o in results if isinstance(o, NotChecked)]
        assert len(waited) == 4 and {o.busy for o in waited} == {"client"}
        await given_back(plugin)  # nothing left behind

    try:
        run(scenario())
    finally:
        plugin.bonzo_shutdown()


def test_an_ipv6_client_is_its_slash_64(zone, caplog):
    """Addresses of one /64 share one client's places; another /64 is
    another client. A place is the thread's until it is done with the
    check, even when the session that asked stops waiting."""
    plugin = configured(zone.resolver(timeout=5.0), threads=4, threads_per_client=1)

    async def scenario() -> None:
        plugin.timeout = 1.0
        first = asyncio.ensure_future(
            plugin._check(fake_session("2001:db8:1:2::1"), "x@slow.example", "h.example")
        )
        await asyncio.sleep(0.2)
        first.cancel()  # the session went away: its check still runs
        await asyncio.sleep(0.05)
        assert plugin._shares.running("2001:db8:1:2::/64") == 1
        plugin.timeout = 0.3
        with pytest.raises(TransientError) as info:
            await plugin.bonzo_mail(
                session=fake_session("2001:db8:1:2::99"),
                envelope=envelope(mail_from="a@example.org"),
                address="a@example.org",
                params={},
                mailbox=Address.parse("a@example.org"),
            )
        assert (info.value.status_code, info.value.enhanced_code) == (451, "4.3.0")
        plugin.timeout = 2.0
        started = time.monotonic()
        outcome = await plugin._check(fake_session("2001:db8:1:3::1"), "a@example.org", "h")
        assert outcome.result == "fail"  # another /64 (not listed), checked at once
        assert time.monotonic() - started < 0.5
        assert plugin._shares.running("2001:db8:1:2::/64") == 1  # still held meanwhile
        await given_back(plugin)  # when the thread was done with it

    try:
        with caplog.at_level("WARNING", logger="bonzo.plugins.spf"):
            run(scenario())
    finally:
        plugin.bonzo_shutdown()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "MAIL FROM <a@example.org>: SPF check not made, local overload" in warning
    assert "(threads_per_client = 1)" in warning and "answered 451 4.3.0" in warning


def test_a_helo_check_not_made_records_nothing_and_a_null_sender_is_checked_at_mail(zone):
    """At HELO, a check the busy pool left no time for records no result
    (and refuses nothing); the null sender's MAIL then checks the HELO
    identity itself."""
    plugin = configured(zone.resolver(timeout=5.0), threads=1)
    session = fake_session("192.0.2.10", helo="mail.example.org")

    async def scenario() -> Any:
        plugin.timeout = 1.0
        blocker = asyncio.ensure_future(
            plugin._check(fake_session("198.51.100.1"), "x@slow.example", "h.example")
        )
        await asyncio.sleep(0.05)
        plugin.timeout = 0.3
        await plugin.bonzo_helo(session=session, name="mail.example.org", esmtp=True)
        assert "spf" not in session.results
        await blocker
        plugin.timeout = 5.0
        env = envelope(mail_from="")
        await plugin.bonzo_mail(session=session, envelope=env, address="", params={}, mailbox=None)
        return env.results.get("spf")

    try:
        result = run(scenario())
    finally:
        plugin.bonzo_shutdown()
    assert (result.result, result.details["identity"]) == ("pass", "helo")


def test_threads_per_client_defaults_to_a_quarter_of_threads():
    assert configured(None).threads_per_client == 4
    assert configured(None, threads=3).threads_per_client == 1
    assert configured(None, threads=40, threads_per_client=40).threads_per_client == 40
    with pytest.raises(ValueError, match=r"^threads_per_client: must be at most threads \(16\)"):
        configured(None, threads_per_client=17)


def test_a_wait_is_never_negative_in_the_log():
    # time.monotonic() read in the check's thread and on the loop: a hair
    # apart, a wait came out as "-0.0s".
    error = NotChecked(20.0, -0.00001, -0.00002, ran=False)
    assert error.share_wait == error.pool_wait == 0.0
    assert "-" not in error.describe()

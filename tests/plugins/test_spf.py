"""The spf plugin: identities, policy keys, results, Received-SPF, DNS off.

The DNS stub serves the records; the RFC 7208 suite is in test_spf_suite.py.
"""

from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from auth_testing import app, envelope, example_keys, fake_session, run
from bonzo_plugins.spf import SpfPlugin
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
    assert info.value.enhanced_code == "5.7.23" and "mail.example.org" in info.value.message


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
    ends at its ``timeout``, as temperror; and the stalled checks free
    their threads at their deadline, not at the resolver's."""
    plugin = configured(zone.resolver(timeout=3.0), threads=2, timeout=0.6)
    slow_client = fake_session(remote_ip="198.51.100.7")
    client = fake_session(remote_ip="192.0.2.1")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        # A small default executor, as on a 2-core machine (6 threads there).
        loop.set_default_executor(ThreadPoolExecutor(2))
        start = time.monotonic()
        slow = [
            asyncio.ensure_future(plugin._check(slow_client, "x@slow.example", "h.example"))
            for _ in range(4)
        ]
        await asyncio.sleep(0.1)
        probe = await loop.run_in_executor(None, time.monotonic)
        assert probe - start < 1.5  # the default executor is free (else ~3 s)
        plugin.timeout = 0.3
        queued = time.monotonic()
        outcome = await plugin._check(client, "a@example.org", "h.example")
        assert outcome.result == "temperror" and "not done in 0.3s" in outcome.mechanism
        assert time.monotonic() - queued < 1.5  # (the resolver takes 3 s)
        results = await asyncio.gather(*slow)
        assert {o.result for o in results} == {"temperror"}
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

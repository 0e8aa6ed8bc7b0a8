"""The dnsbl plugin: reversed names (IPv4, IPv6), weights and threshold,
allow lists, the TXT text in the reply, stages; lists served by the DNS
stub."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from auth_testing import app, example_keys, fake_session, run
from bonzo_plugins.dnsbl import DnsblPlugin, query_name
from bonzo_plugins.dnsbl.plugin import DEFAULT_ANSWERS, KEYS, ZONE_KEYS

from bonzo.dns import Resolver
from bonzo.errors import PermanentError


def configured(resolver=None, **table) -> DnsblPlugin:
    plugin = DnsblPlugin()
    plugin.bonzo_configure(config=table, app=app(resolver))
    return plugin


def connect(plugin, ip="192.0.2.99"):
    session = fake_session(ip)
    run(plugin.bonzo_connect(session=session))
    return session


def test_query_names():
    assert query_name(ipaddress.ip_address("192.0.2.99"), "bl.example") == "99.2.0.192.bl.example"
    name = query_name(ipaddress.ip_address("2001:db8::1"), "bl.example")
    assert name == "1.0.0.0" + ".0" * 20 + ".8.b.d.0.1.0.0.2.bl.example"


@pytest.fixture
def lists(dns_stub):
    dns_stub.add("99.2.0.192.bl.example", "A", "127.0.0.2")
    dns_stub.add(
        "99.2.0.192.bl.example", "TXT", '"Listed\\013\\010Injected: see https://bl.example/99"'
    )
    dns_stub.add("99.2.0.192.weak.example", "A", "127.0.0.4")
    dns_stub.add("99.2.0.192.allow.example", "A", "127.0.0.10")
    dns_stub.add("98.2.0.192.weak.example", "A", "127.0.0.4")
    dns_stub.add("97.2.0.192.bl.example", "A", "127.255.255.254")  # "resolver refused"
    dns_stub.add("1.0.0.0" + ".0" * 20 + ".8.b.d.0.1.0.0.2.bl.example", "A", "127.0.0.2")
    return dns_stub


def test_listed_client_refused_at_connect_with_the_sanitized_text(lists):
    plugin = configured(lists.resolver(), zones=["bl.example"])
    with pytest.raises(PermanentError) as info:
        connect(plugin)
    assert (info.value.status_code, info.value.enhanced_code) == (554, "5.7.1")
    text = info.value.message
    assert "192.0.2.99" in text and "bl.example" in text and "https://bl.example/99" in text
    assert "\r" not in text and "\n" not in text


def test_results_for_later_plugins_and_ipv6(lists):
    plugin = configured(lists.resolver(), zones=["bl.example"], action="tag")
    session = connect(plugin, "2001:db8::1")
    result = session.results.get("dnsbl")
    assert result.result == "listed" and result.details["score"] == 1.0
    assert result.details["listings"][0]["zone"] == "bl.example"
    session = connect(plugin, "192.0.2.1")
    assert session.results.get("dnsbl").result == "pass"


def test_weights_threshold_and_allow_lists(lists):
    zones = [
        {"zone": "weak.example", "weight": 0.5},
        {"zone": "bl.example", "weight": 1},
        {"zone": "allow.example", "weight": -10, "txt": False},
    ]
    plugin = configured(lists.resolver(), zones=zones, threshold=1.5)
    session = connect(plugin, "192.0.2.98")  # weak only: 0.5
    assert session.results.get("dnsbl").result == "pass"
    assert "score 0.5 below 1.5" in session.results.get("dnsbl").reason
    session = connect(plugin, "192.0.2.99")  # 0.5 + 1 - 10: allowed
    assert session.results.get("dnsbl").details["score"] == -8.5
    no_allow = configured(lists.resolver(), zones=zones[:2], threshold=1.5)
    with pytest.raises(PermanentError):
        connect(no_allow, "192.0.2.99")


def test_answers_filter_and_error_codes(lists):
    plugin = configured(lists.resolver(), zones=["bl.example"])
    session = connect(plugin, "192.0.2.97")  # 127.255.255.254 is not a listing
    assert session.results.get("dnsbl").result == "pass"
    only4 = configured(lists.resolver(), zones=[{"zone": "weak.example", "answers": ["127.0.0.2"]}])
    assert connect(only4, "192.0.2.98").results.get("dnsbl").result == "pass"


def test_refusal_at_mail_or_rcpt_instead(lists):
    plugin = configured(lists.resolver(), zones=["bl.example"], stage="rcpt")
    session = connect(plugin)
    assert session.results.get("dnsbl").result == "listed"
    plugin.bonzo_mail(session=session)
    with pytest.raises(PermanentError):
        plugin.bonzo_rcpt(session=session)


def test_dns_failures_are_not_listings(lists):
    """A list whose lookup fails lists no one; with another list's answer
    the result stands, naming the failure."""
    lists.fault("99.2.0.192.bl.example", "servfail")
    plugin = configured(lists.resolver(), zones=["bl.example", "clean.example"])
    result = connect(plugin).results.get("dnsbl")
    assert result.result == "pass" and result.details["failed"].keys() == {"bl.example"}
    assert "SERVFAIL" in result.details["failed"]["bl.example"]
    assert result.reason == "not listed; lookup failed for bl.example"


@pytest.mark.parametrize("down", [False, True])
def test_no_list_asked_is_none_not_a_pass(lists, down):
    """Every list failing (SERVFAIL), or the resolver down, is not "not
    listed": nothing is known (README: none when nothing could be asked)."""
    lists.fault(None, "servfail")
    resolver = lists.resolver()
    if down:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        resolver = Resolver(lists.settings(nameservers=(f"127.0.0.1:{port}",)))
    plugin = configured(resolver, zones=["bl.example", "other.example"])
    result = connect(plugin).results.get("dnsbl")
    assert result.result == "none", result
    assert result.reason.startswith("no list could be asked: bl.example: ")
    assert result.details["failed"].keys() == {"bl.example", "other.example"}


def test_a_slow_list_loses_only_its_own_answer(lists, caplog):
    """At the deadline the zones that answered count; the others are "not
    listed", named in the reason and the log."""
    lists.fault("99.2.0.192.dead.example", "timeout")
    plugin = configured(lists.resolver(), zones=["bl.example", "dead.example"], timeout=0.3)
    with pytest.raises(PermanentError) as info:
        connect(plugin)
    assert "listed by bl.example" in info.value.message
    plugin = configured(
        lists.resolver(), zones=["bl.example", "dead.example"], timeout=0.3, action="tag"
    )
    result = connect(plugin).results.get("dnsbl")
    assert result.result == "listed" and result.details["unanswered"] == ["dead.example"]
    assert [f["zone"] for f in result.details["listings"]] == ["bl.example"]
    assert "no answer in 0.3s from dead.example" in result.reason
    assert "no answer in 0.3s from dead.example" in caplog.text
    # Nobody answered: nothing is known.
    result = connect(configured(lists.resolver(), zones=["dead.example"], timeout=0.3))
    assert result.results.get("dnsbl").result == "none"


def test_the_txt_lookup_cannot_lose_the_listing(lists):
    lists.fault("99.2.0.192.bl.example", "timeout", "TXT")
    plugin = configured(lists.resolver(), zones=["bl.example"], timeout=0.3, action="tag")
    result = connect(plugin).results.get("dnsbl")
    assert result.result == "listed" and result.details["unanswered"] == []
    assert result.details["listings"][0]["text"] == ""
    # A TXT lookup that fails outright neither.
    lists.fault("99.2.0.192.bl.example", "servfail", "TXT")
    assert connect(plugin).results.get("dnsbl").result == "listed"


def test_no_zone_for_the_address_family(lists):
    plugin = configured(lists.resolver(), zones=[{"zone": "bl.example", "ipv6": False}])
    result = connect(plugin, "2001:db8::1").results.get("dnsbl")
    assert (result.result, result.reason) == ("pass", "not listed")


def test_dns_off_and_skipped_networks(lists):
    session = connect(configured(None, zones=["bl.example"]))
    result = session.results.get("dnsbl")
    assert result.result == "none" and "DNS lookups are off" in result.reason
    plugin = configured(lists.resolver(), zones=["bl.example"], skip_networks=["192.0.2.0/24"])
    assert "dnsbl" not in connect(plugin).results
    assert lists.queries == []


@pytest.mark.parametrize(
    ("table", "text"),
    [
        ({"zones": ["not a zone"]}, "^zones\\[0\\].zone: 'not a zone' is not a DNS zone name$"),
        ({"zones": [{"zone": "a.example", "weight": "x"}]}, "^zones\\[0\\].weight: expected a"),
        ({"zones": [{"zone": "a.example", "weight": float("inf")}]}, "^zones\\[0\\].weight"),
        ({"zones": ["a.example", "A.example."]}, "^zones\\[1\\].zone: 'a.example' is given twice$"),
        ({"zones": [{"weight": 2}]}, "^zones\\[0\\].zone: required$"),
        ({"zones": [5]}, "^zones\\[0\\]: expected a table, got 5$"),
        ({"zones": "a.example"}, "^zones: expected an array of tables"),
        ({"zones": [{"zone": "a.example", "answers": []}]}, "^zones\\[0\\].answers: expected at"),
        (
            {"zones": [{"zone": "a.example", "answers": ["127.0.0.1/8"]}]},
            "^zones\\[0\\].answers: expected a network .*; host bits set$",
        ),
        ({"threshold": 0}, "^threshold: expected a number above 0"),
        ({"stage": "data"}, "^stage: expected one of 'connect', 'mail', 'rcpt', got 'data'$"),
        ({"timeout": 61}, "^timeout: expected a number <= 60"),
        ({"reply_text": "{nope}"}, "^reply_text: KeyError\\('nope'\\): only"),
        ({"zones": [{"zone": "a.example", "colour": 1}]}, "^zones\\[0\\].colour: unknown key"),
    ],
)
def test_bad_configuration(table, text):
    with pytest.raises(ValueError, match=text):
        configured(None, **table)


def test_zone_entries():
    plugin = configured(
        None,
        zones=["BL.example.", {"zone": "allow.example", "weight": -5, "answers": ["127.0.0.2"]}],
    )
    bl, allow = plugin.zones
    assert (bl.zone, bl.weight, bl.ipv6, bl.txt) == ("bl.example", 1.0, True, True)
    assert bl.answers is DEFAULT_ANSWERS and not bl.counts("127.255.255.254")
    assert (allow.weight, allow.counts("127.0.0.2"), allow.counts("127.0.0.3")) == (-5, True, False)


def test_the_example_configuration_shows_every_key():
    assert example_keys("dnsbl") == set(KEYS + ZONE_KEYS) - {"zones"}

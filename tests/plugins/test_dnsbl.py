"""The dnsbl plugin: reversed names (IPv4, IPv6), weights and threshold,
allow lists, the TXT text in the reply, stages; lists served by the DNS
stub."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from auth_testing import app, example_keys, fake_session, run
from bonzo_plugins.dnsbl import DnsblPlugin, query_name
from bonzo_plugins.dnsbl.plugin import KEYS, ZONE_KEYS

from bonzo.errors import PermanentError

README = Path(__file__).resolve().parents[2] / "plugins" / "dnsbl" / "README.rst"


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
    lists.fault(None, "servfail")
    plugin = configured(lists.resolver(), zones=["bl.example"])
    assert connect(plugin).results.get("dnsbl").result == "pass"


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
        ({"zones": ["not a zone"]}, "zone"),
        ({"zones": [{"zone": "a.example", "weight": "x"}]}, "weight"),
        ({"zones": ["a.example", "a.example"]}, "same zone"),
        ({"threshold": 0}, "threshold"),
        ({"stage": "data"}, "stage"),
        ({"reply_text": "{nope}"}, "reply_text"),
        ({"zones": [{"zone": "a.example", "colour": 1}]}, "colour"),
    ],
)
def test_bad_configuration(table, text):
    with pytest.raises(ValueError, match=text):
        configured(None, **table)


def test_readme_documents_every_key():
    text = README.read_text("utf-8")
    for key in KEYS + ZONE_KEYS:
        assert re.search(rf"^\s*``{key}``\n\s+\*", text, re.M), key


def test_the_example_configuration_shows_every_key():
    assert example_keys("dnsbl") == set(KEYS + ZONE_KEYS) - {"zones"}

"""The ``access`` plugin: allow/deny rules per stage, replies, configuration."""

from __future__ import annotations

import smtplib
import socket

import pytest
from bonzo_plugins.access import AccessPlugin
from bonzo_plugins.recipients import RecipientsPlugin
from plugin_testing import TIMEOUT, make_session, serve
from spellings import parametrize, spellings

from bonzo.address import Address
from bonzo.errors import SMTPError


def configured(rules: list[dict[str, object]], **table: object) -> AccessPlugin:
    plugin = AccessPlugin()
    plugin.bonzo_configure(config={"rules": rules, **table}, app=None)
    return plugin


def outcome(plugin: AccessPlugin, stage: str, value: str, **session: object):
    """None when allowed (no verdict), else (code, enhanced code, text)."""
    s = make_session(**session)
    try:
        if stage == "connect":
            s.remote_ip = value
            result = plugin.bonzo_connect(session=s)
        elif stage == "helo":
            result = plugin.bonzo_helo(session=s, name=value)
        elif stage == "mail":
            result = plugin.bonzo_mail(session=s, mailbox=Address.parse(value))
        else:
            result = plugin.bonzo_rcpt(session=s, mailbox=Address.parse(value))
    except SMTPError as exc:
        return exc.status_code, exc.enhanced_code, exc.message
    assert result is None
    return None


DENIED = (554, "5.7.1", "Access denied")


# -------------------------------------------------------------- connect
def test_connect_deny_by_network():
    plugin = configured([{"stage": "connect", "match": "198.51.100.0/24", "action": "deny"}])
    assert outcome(plugin, "connect", "198.51.100.7") == DENIED
    assert outcome(plugin, "connect", "::ffff:198.51.100.7") == DENIED
    assert outcome(plugin, "connect", "198.51.101.7") is None
    assert outcome(plugin, "connect", "2001:db8::1") is None


def test_a_rule_written_ipv4_mapped_matches_the_ipv4_client():
    # Clients are matched as IPv4 (a dual-stack listener or proxy names
    # them ::ffff:a.b.c.d); a rule written so matched nobody.
    plugin = configured(
        [
            {
                "stage": "connect",
                "match": ["::ffff:10.0.0.0/104", "::ffff:192.0.2.66"],
                "action": "deny",
            }
        ]
    )
    for client in ("10.1.2.3", "::ffff:10.1.2.3", "192.0.2.66", "::ffff:192.0.2.66"):
        assert outcome(plugin, "connect", client) == DENIED, client
    assert outcome(plugin, "connect", "192.0.2.67") is None


def test_connect_ipv6_and_list_of_networks():
    plugin = configured(
        [{"stage": "connect", "match": ["2001:db8::/32", "192.0.2.1"], "action": "deny"}]
    )
    assert outcome(plugin, "connect", "2001:db8:1::5") == DENIED
    assert outcome(plugin, "connect", "192.0.2.1") == DENIED
    assert outcome(plugin, "connect", "192.0.2.2") is None


def test_first_matching_rule_wins_and_allow_stops():
    plugin = configured(
        [
            {"stage": "connect", "match": "10.1.0.0/16", "action": "allow"},
            {"stage": "connect", "match": "10.0.0.0/8", "action": "deny"},
        ]
    )
    assert outcome(plugin, "connect", "10.1.2.3") is None
    assert outcome(plugin, "connect", "10.2.2.3") == DENIED


def test_rules_of_other_stages_do_not_apply():
    plugin = configured([{"stage": "mail", "match": "*", "action": "deny"}])
    assert outcome(plugin, "connect", "10.0.0.1") is None
    assert outcome(plugin, "helo", "anything") is None
    assert outcome(plugin, "rcpt", "a@example.com") is None
    assert outcome(plugin, "mail", "a@example.com") == DENIED


# ----------------------------------------------------------------- globs
def test_helo_glob_is_case_insensitive_and_whole():
    plugin = configured([{"stage": "helo", "match": "*.dynamic.example", "action": "deny"}])
    assert outcome(plugin, "helo", "host1.DYNAMIC.example") == DENIED
    assert outcome(plugin, "helo", "dynamic.example") is None
    assert outcome(plugin, "helo", "host1.dynamic.example.org") is None
    # The fully qualified spelling, with its final dot, is the same name.
    assert outcome(plugin, "helo", "host1.dynamic.example.") == DENIED
    exact = configured([{"stage": "helo", "match": "evil.example", "action": "deny"}])
    assert outcome(exact, "helo", "EVIL.example.") == DENIED
    assert outcome(exact, "helo", ".") is None


def test_a_helo_glob_with_a_final_dot_matches_both_spellings():
    # The README calls "evil.example." the fully qualified spelling of
    # "evil.example": as a rule it must match, not silently never.
    plugin = configured(
        [
            {"stage": "helo", "match": "evil.example.", "action": "deny"},
            {"stage": "helo", "match": "*.Dynamic.example.", "action": "deny"},
            {"stage": "helo", "match": r"re:literal\.example\.", "action": "deny"},
        ]
    )
    for name in ("evil.example", "EVIL.example.", "host.dynamic.example", "h.dynamic.example."):
        assert outcome(plugin, "helo", name) == DENIED, name
    assert outcome(plugin, "helo", "evil.example.org") is None
    # A regex is used as written: names are matched without their final dot.
    assert outcome(plugin, "helo", "literal.example.") is None


def test_sender_glob_and_null_sender():
    plugin = configured(
        [
            {"stage": "mail", "match": "<>", "action": "deny", "reply": "550 5.7.1 No bounces"},
            {"stage": "mail", "match": "*@spam.example", "action": "deny"},
        ]
    )
    assert outcome(plugin, "mail", "") == (550, "5.7.1", "No bounces")
    assert outcome(plugin, "mail", "Joe@SPAM.example") == DENIED
    assert outcome(plugin, "mail", "joe@spam.example.org") is None
    assert outcome(plugin, "mail", "joe@example.org") is None


def test_recipient_allow_gives_no_verdict():
    plugin = configured(
        [
            {"stage": "rcpt", "match": "postmaster@*", "action": "allow"},
            {"stage": "rcpt", "match": "*@example.com", "action": "deny"},
        ]
    )
    assert outcome(plugin, "rcpt", "postmaster@example.com") is None
    assert outcome(plugin, "rcpt", "alice@example.com") == DENIED


# ---------------------------------------------------------------- regexes
def test_regex_matches_the_whole_value_case_insensitively():
    plugin = configured([{"stage": "helo", "match": r"re:\d+-\d+-\d+-\d+\..*", "action": "deny"}])
    assert outcome(plugin, "helo", "1-2-3-4.ISP.example") == DENIED
    assert outcome(plugin, "helo", "x1-2-3-4.isp.example") is None
    plugin = configured([{"stage": "mail", "match": "re:.*@Example\\.org", "action": "deny"}])
    assert outcome(plugin, "mail", "a@example.ORG") == DENIED
    assert outcome(plugin, "mail", "a@example.org.evil") is None


# ------------------------------------------------------- canonical matching
@parametrize("spelling", "ceo", "example.com")
def test_recipient_rule_holds_for_every_spelling(spelling):
    plugin = configured([{"stage": "rcpt", "match": "ceo@example.com", "action": "deny"}])
    assert outcome(plugin, "rcpt", spelling) == DENIED
    assert outcome(plugin, "rcpt", spelling.replace("ceo", "cfo")) is None


@parametrize("spelling", "ceo", "example.com")
def test_sender_address_rule_holds_for_every_spelling(spelling):
    plugin = configured([{"stage": "mail", "match": "ceo@example.com", "action": "deny"}])
    assert outcome(plugin, "mail", spelling) == DENIED


@parametrize("spelling", "joe", "spam.example")
def test_sender_domain_glob_holds_for_every_spelling(spelling):
    plugin = configured([{"stage": "mail", "match": "*@spam.example", "action": "deny"}])
    assert outcome(plugin, "mail", spelling) == DENIED
    assert outcome(plugin, "mail", spelling.upper()) == DENIED


@parametrize("spelling", "joe", "spam.example")
def test_subdomain_glob_holds_for_every_spelling(spelling):
    plugin = configured([{"stage": "mail", "match": "*@*.example", "action": "deny"}])
    assert outcome(plugin, "mail", spelling) == DENIED
    assert outcome(plugin, "mail", "joe@example") is None


@pytest.mark.parametrize(
    ("pattern", "sender"),
    [
        ("*@*.spam.example.", "joe@a.SPAM.example"),
        ("*@*.spam.example\u3002", "joe@a.spam.example"),  # an ideographic full stop
        ("*@sp?m.example.", "joe@spam.example"),
    ],
)
def test_a_wildcard_domain_glob_with_a_final_dot_matches(pattern, sender):
    # As "*@spam.example." is "*@spam.example": the final dot is dropped.
    plugin = configured([{"stage": "mail", "match": pattern, "action": "deny"}])
    assert outcome(plugin, "mail", sender) == DENIED
    assert outcome(plugin, "mail", sender + ".org") is None


@parametrize("pattern", "ceo", "example.com")
def test_patterns_are_canonicalised_at_configure_time(pattern):
    plugin = configured([{"stage": "rcpt", "match": pattern, "action": "deny"}])
    for spelling in [
        "ceo@example.com",
        "CEO@EXAMPLE.COM",
        *spellings("ceo", "example.com").values(),
    ]:
        assert outcome(plugin, "rcpt", spelling) == DENIED, spelling
    assert outcome(plugin, "rcpt", "cfo@example.com") is None


def test_allow_rules_match_the_canonical_form_too():
    plugin = configured(
        [
            {"stage": "rcpt", "match": '"postmaster"@ＥＸＡＭＰＬＥ。com', "action": "allow"},
            {"stage": "rcpt", "match": "*@example.com", "action": "deny"},
        ]
    )
    assert outcome(plugin, "rcpt", "postmaster@exa\u00admple.com") is None
    assert outcome(plugin, "rcpt", "alice@ｅｘａｍｐｌｅ.ｃｏｍ") == DENIED


def test_internationalised_domains_in_globs():
    plugin = configured([{"stage": "rcpt", "match": "*@*.bücher.example", "action": "deny"}])
    assert plugin.rules["rcpt"][0].patterns[0].fullmatch("a@shop.xn--bcher-kva.example")
    assert outcome(plugin, "rcpt", "a@shop.BÜCHER.example") == DENIED
    assert outcome(plugin, "rcpt", "a@shop.xn--bcher-kva.example") == DENIED
    assert outcome(plugin, "rcpt", "a@shop.bucher.example") is None


def test_a_wildcard_in_a_non_ascii_domain_label_is_refused():
    with pytest.raises(ValueError, match=r"^rules\[0\]\.match: .*wildcard and non-ASCII"):
        configured([{"stage": "rcpt", "match": "*@bü*.example", "action": "deny"}])
    with pytest.raises(ValueError, match=r"^rules\[0\]\.match: .*no IDNA form"):
        configured([{"stage": "rcpt", "match": "a@\u00ad.example", "action": "deny"}])


def test_regex_is_matched_against_the_canonical_address(caplog):
    plugin = configured(
        [{"stage": "rcpt", "match": r"re:ceo@xn--bcher-kva\.example", "action": "deny"}]
    )
    assert outcome(plugin, "rcpt", '"ceo"@BÜCHER。example') == DENIED
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    configured([{"stage": "rcpt", "match": r"re:.*@bücher\.example", "action": "deny"}])
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "rules[0].match" in warning.getMessage() and "canonical" in warning.getMessage()


def test_helo_rules_are_unchanged_by_canonicalisation():
    plugin = configured([{"stage": "helo", "match": "*.Example.COM", "action": "deny"}])
    assert outcome(plugin, "helo", "host.EXAMPLE.com") == DENIED
    assert outcome(plugin, "helo", "host.example.org") is None


def test_denial_log_shows_both_forms(caplog):
    plugin = configured([{"stage": "rcpt", "match": "ceo@example.com", "action": "deny"}])
    assert outcome(plugin, "rcpt", "ceo@ｅｘａｍｐｌｅ.ｃｏｍ") == DENIED
    (record,) = [r for r in caplog.records if r.name == "bonzo.plugins.access"]
    message = record.getMessage()
    assert "rcpt 'ceo@example.com' (sent as 'ceo@\\uff45" in message


# ----------------------------------------------------------------- replies
def test_custom_and_default_replies():
    plugin = configured(
        [
            {"stage": "helo", "match": "a", "action": "deny", "reply": "421 4.7.0 Try later"},
            {"stage": "helo", "match": "b", "action": "deny", "reply": "550 Go away"},
            {"stage": "helo", "match": "c", "action": "deny", "reply": "550"},
            {"stage": "helo", "match": "d", "action": "deny"},
        ],
        default_reply="550 5.7.0 Not welcome here",
    )
    assert outcome(plugin, "helo", "a") == (421, "4.7.0", "Try later")
    assert outcome(plugin, "helo", "b") == (550, None, "Go away")
    assert outcome(plugin, "helo", "c") == (550, None, "Access denied")
    assert outcome(plugin, "helo", "d") == (550, "5.7.0", "Not welcome here")


def test_no_rules_means_no_opinion():
    plugin = AccessPlugin()
    plugin.bonzo_configure(config={}, app=None)
    for stage, value in (
        ("connect", "192.0.2.1"),
        ("helo", "192.0.2.1"),
        ("mail", "a@192.0.2.1"),
        ("rcpt", "postmaster"),
    ):
        assert outcome(plugin, stage, value) is None


def test_denial_is_logged_without_breaking_the_line(caplog):
    plugin = configured([{"stage": "helo", "match": "*", "action": "deny"}])
    assert outcome(plugin, "helo", "evil\r\nforged line") == DENIED
    (record,) = [r for r in caplog.records if r.name == "bonzo.plugins.access"]
    assert "\n" not in record.getMessage() and "\r" not in record.getMessage()
    assert "rules[0]" in record.getMessage()


# ------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rule": []}, r"^rule: unknown key"),
        ({"rules": {}}, r"^rules: expected an array of tables"),
        ({"rules": [5]}, r"^rules\[0\]: expected a table"),
        ({"rules": [{"stage": "mail", "action": "deny"}]}, r"^rules\[0\]\.match: required$"),
        ({"rules": [{"match": "*", "action": "deny"}]}, r"^rules\[0\]\.stage: required$"),
        ({"rules": [{"stage": "mail", "match": "*"}]}, r"^rules\[0\]\.action: required$"),
        (
            {"rules": [{"stage": "data", "match": "*", "action": "deny"}]},
            r"^rules\[0\]\.stage: expected one of 'connect', 'helo', 'mail', 'rcpt', got 'data'$",
        ),
        (
            {"rules": [{"stage": "mail", "match": "*", "action": "reject"}]},
            r"^rules\[0\]\.action: expected one of 'allow', 'deny', got 'reject'$",
        ),
        (
            {"rules": [{"stage": "mail", "match": "*", "action": "deny", "replay": "x"}]},
            r"^rules\[0\]\.replay: unknown key",
        ),
        (
            {"rules": [{"stage": "mail", "match": 5, "action": "deny"}]},
            r"^rules\[0\]\.match: expected a list of non-empty strings, got 5$",
        ),
        (
            {"rules": [{"stage": "mail", "match": [], "action": "deny"}]},
            r"^rules\[0\]\.match: expected a string or a non-empty list",
        ),
        (
            {"rules": [{"stage": "mail", "match": "", "action": "deny"}]},
            r"^rules\[0\]\.match: expected a list of non-empty strings, got \[''\]$",
        ),
        (
            {"rules": [{"stage": "mail", "match": ["<>", ""], "action": "deny"}]},
            r"^rules\[0\]\.match: expected a list of non-empty strings",
        ),
        (
            {"rules": [{"stage": "connect", "match": "*.example", "action": "deny"}]},
            r"^rules\[0\]\.match: '\*\.example' is not a valid network",
        ),
        (
            {"rules": [{"stage": "connect", "match": "10.0.0.1/8", "action": "deny"}]},
            r"^rules\[0\]\.match: '10\.0\.0\.1/8' is not a valid network",
        ),
        (
            {"rules": [{"stage": "helo", "match": "re:(", "action": "deny"}]},
            r"^rules\[0\]\.match: bad regular expression",
        ),
        (
            {"rules": [{"stage": "helo", "match": "x", "action": "allow", "reply": "550 x"}]},
            r"^rules\[0\]\.reply: only a deny rule has a reply",
        ),
        (
            {"rules": [{"stage": "helo", "match": "x", "action": "deny", "reply": "250 Ok"}]},
            r"^rules\[0\]\.reply: the code must be 4xx or 5xx",
        ),
        (
            {"rules": [{"stage": "helo", "match": "x", "action": "deny", "reply": "550 4.7.1 x"}]},
            r"^rules\[0\]\.reply: enhanced code 4\.7\.1 does not match the code 550",
        ),
        (
            {"rules": [{"stage": "helo", "match": "x", "action": "deny", "reply": "55 x"}]},
            r"^rules\[0\]\.reply: '55 x' is not a reply",
        ),
        (
            {"rules": [{"stage": "helo", "match": "x", "action": "deny", "reply": 550}]},
            r"^rules\[0\]\.reply: expected a non-empty string, got 550$",
        ),
        (
            {"rules": [{"stage": "helo", "match": "x", "action": "deny", "reply": "550 a\nb"}]},
            r"^rules\[0\]\.reply: the text must not contain control characters",
        ),
        ({"default_reply": "250 fine"}, r"^default_reply: the code must be 4xx or 5xx"),
        ({"default_reply": 554}, r"^default_reply: expected a non-empty string, got 554$"),
        ({"default_reply": "554 5.7.1.1 x"}, r"^default_reply: .* is not a reply"),
    ],
)
def test_configuration_errors_name_the_key(table, message):
    with pytest.raises(ValueError, match=message):
        AccessPlugin().bonzo_configure(config=table, app=None)


def test_a_later_rule_error_is_named_by_its_index():
    rules = [
        {"stage": "mail", "match": "*", "action": "allow"},
        {"stage": "mail", "match": "*", "action": "maybe"},
    ]
    with pytest.raises(ValueError, match=r"^rules\[1\]\.action"):
        configured(rules)


# ------------------------------------------------------------- end to end
def recipients() -> RecipientsPlugin:
    plugin = RecipientsPlugin()
    plugin.bonzo_configure(config={"domains": ["example.com"]}, app=None)
    return plugin


def test_end_to_end_connect_deny_closes_the_connection():
    plugin = configured(
        [
            {
                "stage": "connect",
                "match": "127.0.0.0/8",
                "action": "deny",
                "reply": "554 5.7.1 No service for you",
            }
        ]
    )
    with serve(("access", plugin), ("recipients", recipients())) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            data = b""
            while True:  # bounded by the socket timeout and the server closing
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"554 ")
        assert b"No service for you" in data


def test_end_to_end_stages():
    plugin = configured(
        [
            {"stage": "helo", "match": "bad.example", "action": "deny", "reply": "550 5.7.1 Bad"},
            {"stage": "mail", "match": "*@spam.example", "action": "deny"},
            {"stage": "rcpt", "match": "blocked@example.com", "action": "deny"},
            {"stage": "rcpt", "match": "*@elsewhere.net", "action": "allow"},
        ]
    )
    with serve(("access", plugin), ("recipients", recipients())) as server:
        with server.client(helo="bad.example") as client:
            # Enhanced codes before EHLO succeeds too (RFC 2034 4).
            assert client.ehlo() == (550, b"5.7.1 Bad")
        with server.client() as client:
            assert client.ehlo()[0] == 250
            assert client.mail("joe@spam.example") == (554, b"5.7.1 Access denied")
            assert client.mail("joe@example.org")[0] == 250
            assert client.rcpt("blocked@example.com") == (554, b"5.7.1 Access denied")
            assert client.rcpt("alice@example.com")[0] == 250
            # allowed by access, but no recipient owner accepts it: still refused
            assert client.rcpt("friend@elsewhere.net") == (554, b"5.7.1 Relay access denied")


def utf8_client(server):
    """An smtplib client that sends UTF-8 commands, after EHLO."""
    client = server.client()
    assert client.ehlo()[0] == 250 and client.has_extn("smtputf8")
    client.command_encoding = "utf-8"
    return client


def test_end_to_end_sender_spellings_are_denied():
    plugin = configured([{"stage": "mail", "match": "*@spam.example", "action": "deny"}])
    with serve(("access", plugin), ("recipients", recipients())) as server:
        with utf8_client(server) as client:
            for spelling in spellings("joe", "spam.example").values():
                reply = client.docmd(f"MAIL FROM:<{spelling}> SMTPUTF8")
                assert reply == (554, b"5.7.1 Access denied"), spelling
            assert client.docmd("MAIL FROM:<joe@example.org> SMTPUTF8")[0] == 250


def test_end_to_end_allowed_connection_gets_the_greeting():
    plugin = configured([{"stage": "connect", "match": "192.0.2.0/24", "action": "deny"}])
    with serve(("access", plugin), ("recipients", recipients())) as server:
        with server.client() as client:
            assert client.noop()[0] == 250
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            with server.client() as client:
                client.sendmail("a@example.org", ["b@elsewhere.net"], b"x\r\n")

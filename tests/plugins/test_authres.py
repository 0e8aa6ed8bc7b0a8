"""The authres plugin: one Authentication-Results field from the recorded
results, values made safe, forged fields with our authserv-id removed."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import authres
import pytest
from auth_testing import app, envelope, example_keys, fake_session, run
from bonzo_plugins.authres import AuthresPlugin, authserv_id_of
from bonzo_plugins.authres.plugin import KEYS
from bonzo_plugins.maildir import MaildirPlugin
from bonzo_plugins.recipients import RecipientsPlugin
from hypothesis import given
from hypothesis import strategies as st
from plugin_testing import serve

from bonzo.session import MAX_HEADER_SECTION

README = Path(__file__).resolve().parents[2] / "plugins" / "authres" / "README.rst"
MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello\r\n"


def configured(**table) -> AuthresPlugin:
    plugin = AuthresPlugin()
    plugin.bonzo_configure(config=table, app=app())
    return plugin


def field_of(env) -> str:
    head = env.header_bytes.decode()
    m = re.search(r"Authentication-Results: ((?:.*\r\n)(?:[ \t].*\r\n)*)", head)
    assert m, head
    return m.group(1)


def test_one_field_with_every_result():
    plugin = configured()
    session = fake_session()
    session.results.add("spf", "pass", "", identity="helo", helo="mail.example.org")
    env = envelope(MESSAGE)
    env.results.add("spf", "pass", "example.org: ip4", identity="mailfrom", sender="a@example.org")
    env.results.add("dkim", "pass", "rsa 2048 bits", domain="example.org", selector="s1")
    env.results.add("dkim", "fail", "body hash mismatch", domain="other.example", selector="x")
    env.results.add("dmarc", "pass", "DKIM aligned", domain="example.org", policy="reject")
    env.results.add("arc", "none", "no ARC set")
    run(plugin.bonzo_message(session=session, envelope=env))
    value = field_of(env)
    assert env.header_bytes.decode().count("Authentication-Results:") == 1
    assert value.startswith("mx.test;\r\n\t")
    parsed = authres.AuthenticationResultsHeader.parse_value(value.replace("\r\n", ""))
    assert parsed.authserv_id == "mx.test"
    got = [(r.method, r.result) for r in parsed.results]
    assert got == [
        ("spf", "pass"),
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dkim", "fail"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ]
    assert "smtp.helo=mail.example.org" in value and "smtp.mailfrom=a@example.org" in value
    assert "header.d=other.example header.s=x" in value
    assert "header.from=example.org policy.dmarc=reject" in value


def test_no_results_is_none_and_reasons_can_be_left_out():
    env = envelope(MESSAGE)
    run(configured(authserv_id="auth.example").bonzo_message(session=fake_session(), envelope=env))
    assert field_of(env) == "auth.example; none\r\n"
    env = envelope(MESSAGE)
    env.results.add("dkim", "fail", "body hash mismatch", domain="example.org", selector="s1")
    run(configured(reasons=False).bonzo_message(session=fake_session(), envelope=env))
    assert "reason" not in field_of(env)


def test_a_temperror_s_reason_stays_in_the_log():
    # Its reason names this server's resolvers and their answers.
    env = envelope(MESSAGE)
    env.results.add(
        "spf", "temperror", "no nameserver answered (10.0.0.53:53: answered SERVFAIL)",
        identity="mailfrom", sender="a@example.org",
    )  # fmt: skip
    run(configured().bonzo_message(session=fake_session(), envelope=env))
    value = field_of(env)
    assert "10.0.0.53" not in value and "SERVFAIL" not in value
    parsed = authres.AuthenticationResultsHeader.parse_value(value.replace("\r\n", ""))
    [result] = parsed.results
    assert (result.method, result.result) == ("spf", "temperror")
    assert result.reason == "temporary error, details in the server log"


def test_values_from_the_client_are_made_safe():
    env = envelope(MESSAGE)
    session = fake_session()
    env.results.add(
        "spf", "fail", 'evil\r\n"x"; y', identity="mailfrom", sender='a;b"c d@example.org'
    )
    env.results.add("dkim", "permerror", "bad\x00", domain="ex ample;", selector="s")
    run(configured().bonzo_message(session=session, envelope=env))
    value = field_of(env)
    parsed = authres.AuthenticationResultsHeader.parse_value(value.replace("\r\n", ""))
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "fail"),
        ("dkim", "permerror"),
    ]
    assert "\x00" not in value and value.count("\r\n") == 3
    # A ";" in a client's value: an address keeps its domain (RFC 8601 2.3
    # allows leaving out the local part), other text gets ",".
    assert "smtp.mailfrom=@example.org" in value
    assert 'header.d="ex ample,"' in value
    # A reader that splits on ";" without minding quotes sees no more results.
    assert [part.split()[0] for part in value.split(";")[1:]] == ["spf=fail", "dkim=permerror"]
    # Nor does a HELO name.
    env = envelope(MESSAGE)
    env.results.add("spf", "none", "x", identity="helo", helo='x"y;dkim=pass')
    run(configured().bonzo_message(session=session, envelope=env))
    value = field_of(env)
    assert [part.split()[0] for part in value.split(";")[1:]] == ["spf=none"]
    assert 'smtp.helo="x\\"y,dkim=pass"' in value


def parsed_results(value: str) -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """The field's results as the authres parser reads them: method, result
    and properties."""
    parsed = authres.AuthenticationResultsHeader.parse_value(value.replace("\r\n", ""))
    return [
        (r.method, r.result, [(p.type, p.name, p.value) for p in r.properties])
        for r in parsed.results
    ]


def test_reasons_with_an_at_sign_cannot_add_results(dns_stub):
    """authres writes a value with an "@" bare: a reason from the sender's
    DNS or from a DKIM-Signature would end its result and start others."""
    from bonzo_plugins.dkim import DkimPlugin
    from bonzo_plugins.spf import SpfPlugin

    dns_stub.add("evil.test", "TXT", '"v=spf1 include:x@y;dkim=pass;x.evil.test -all"')
    spf = SpfPlugin()
    spf.bonzo_configure(config={}, app=app(dns_stub.resolver()))
    dkim = DkimPlugin()
    dkim.bonzo_configure(config={}, app=app(dns_stub.resolver()))
    signature = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=evil.test; s=s1; "
        b"i=x@paypal.com header.d=paypal.com; h=from; bh=AAAA; b=AAAA\r\n"
    )
    session = fake_session()
    env = envelope(signature + b"From: a@evil.test\r\n\r\nx\r\n", mail_from="a@evil.test")
    run(spf.bonzo_mail(session=session, envelope=env, address="a@evil.test", params={},
                       mailbox=None))  # fmt: skip
    run(dkim.bonzo_message(session=session, envelope=env))
    assert "@" in env.results.get("spf").reason and "@" in env.results.get("dkim").reason
    run(configured().bonzo_message(session=session, envelope=env))
    value = field_of(env)
    assert parsed_results(value) == [
        ("spf", "permerror", [("smtp", "mailfrom", "a@evil.test")]),
        ("dkim", "permerror", [("header", "d", "evil.test"), ("header", "s", "s1")]),
    ]
    # Nor does a reader that splits on ";" without minding quotes see more.
    assert [part.split()[0] for part in value.split(";")[1:]] == ["spf=permerror", "dkim=permerror"]
    assert 'reason="evil.test: No valid SPF record for included domain: x@y,dkim=pass,' in value


def test_authserv_id_of():
    assert authserv_id_of(b" mx.test; spf=pass smtp.mailfrom=a.example") == "mx.test"
    assert authserv_id_of(b" (comment) MX.Test 1; none") == "mx.test"
    assert authserv_id_of(b" mx.test; garbage ((") == "mx.test"
    assert authserv_id_of(b"   ") is None
    # A quoted-string names the same service as its token (RFC 8601 2.2), and
    # a final dot the same host.
    assert authserv_id_of(b' "MX.test"; dkim=pass header.d=bank.example') == "mx.test"
    assert authserv_id_of(b' (c) "mx.\\test" 1; none') == "mx.test"
    assert authserv_id_of(b" mx.test.; none") == "mx.test"


@given(st.binary(max_size=300))
def test_authserv_id_of_never_raises(value):
    found = authserv_id_of(value)
    assert found is None or isinstance(found, str)


@pytest.mark.parametrize(
    ("table", "text"),
    [({"authserv_id": "a b"}, "authserv_id"), ({"reasons": "no"}, "reasons"), ({"x": 1}, "x")],
)
def test_bad_configuration(table, text):
    with pytest.raises(ValueError, match=text):
        configured(**table)


def test_the_example_configuration_shows_every_key():
    assert example_keys("authres") == set(KEYS)


def test_forged_fields_with_our_id_are_removed_and_others_kept():
    forged = (
        b"Authentication-Results: other.example; spf=pass smtp.mailfrom=a.example\r\n"
        b"Authentication-Results: mx.test;\r\n\tdkim=pass header.d=bank.example\r\n"
        b"authentication-results: MX.TEST; dmarc=pass\r\n"
        b'Authentication-Results: "mx.test"; dkim=pass header.d=quoted.example\r\n'
        b"Authentication-Results: mx.test.; dkim=pass header.d=dotted.example\r\n"
    )
    env = envelope(forged + MESSAGE)
    run(configured().bonzo_message(session=fake_session(), envelope=env))
    content = env.content
    assert b"header.d=bank.example" not in content and b"dmarc=pass" not in content
    assert b"quoted.example" not in content and b"dotted.example" not in content
    assert b"other.example; spf=pass" in content
    assert content.count(b"Authentication-Results: mx.test;") == 1  # ours
    env = envelope(forged + MESSAGE)
    run(configured(remove_forged=False).bonzo_message(session=fake_session(), envelope=env))
    assert b"header.d=bank.example" in env.content


def test_a_forged_id_with_hidden_characters_is_ours():
    """``mx.test`` with a NUL (or DEL, ESC, a zero-width space) in or
    around it reads as ``mx.test`` where those are dropped or not shown: a
    second field under our id, unless removed."""
    ids = [b"mx.test\x00", b"\x00mx.test", b"mx.\x7ftest", b"\x1bmx.test",
           b"mx.test\xe2\x80\x8b", b"mx.test\x01 1"]  # fmt: skip
    for forged_id in ids:
        assert authserv_id_of(b" " + forged_id + b"; dkim=pass") == "mx.test", forged_id
    forged = b"".join(
        b"Authentication-Results: %s; dkim=pass header.d=bank%d.example\r\n" % (forged_id, i)
        for i, forged_id in enumerate(ids)
    )
    env = envelope(forged + MESSAGE)
    run(configured().bonzo_message(session=fake_session(), envelope=env))
    assert b"bank" not in env.content
    assert env.content.count(b"Authentication-Results:") == 1  # ours


def test_fields_a_plugin_of_this_server_added_are_kept():
    """Only the fields that came with the message are removed: a milter of
    this server (OpenDKIM's AuthservID is the host name by default) adds
    its own under our id, above or among the client's fields."""
    forged = (
        b"Authentication-Results: mx.test; dkim=pass header.d=forged1.example\r\n"
        b"Received: from a by b; today\r\n"
        b"Authentication-Results: mx.test; dkim=pass header.d=forged2.example\r\n"
    )
    env = envelope(forged + MESSAGE)
    env.insert_header(0, "Authentication-Results", "mx.test; dkim=pass header.d=milter0.example")
    # Below the client's first field: it joins the client's section.
    env.insert_header(3, "Authentication-Results", "mx.test; dkim=pass header.d=milter3.example")
    env.add_header("Authentication-Results", "mx.test; dkim=pass header.d=added.example")
    # A field identical to a forged one: one of the two goes, one stays.
    env.add_header("Authentication-Results", "mx.test; dkim=pass header.d=forged2.example")
    env.change_header("Subject", "changed")
    run(configured().bonzo_message(session=fake_session(), envelope=env))
    content = env.content
    assert b"forged1" not in content and content.count(b"forged2") == 1
    for kept in (b"milter0", b"milter3", b"added.example"):
        assert kept in content
    assert b"Received: from a by b" in content


def test_a_header_section_too_large_to_parse_is_refused_for_good(tmp_path, caplog):
    # Over MAX_HEADER_SECTION (RFC 5322 sets no limit; far under the size
    # limit): once a 451 with a traceback, at every retry; now one permanent
    # refusal and one log line naming the limit.
    recipients = RecipientsPlugin()
    recipients.bonzo_configure(config={"domains": ["example.com"]}, app=None)
    maildir = MaildirPlugin()
    maildir.bonzo_configure(config={"path": str(tmp_path / "Maildir")}, app=None)
    pad = b"".join(b"X-Pad-%d: " % i + b"a" * 900 + b"\r\n" for i in range(1200))
    plugins = (("recipients", recipients), ("authres", configured()), ("maildir", maildir))
    with caplog.at_level(logging.INFO), serve(*plugins) as server, server.client() as client:
        client.ehlo()
        client.mail("a@example.org")
        client.rcpt("alice@example.com")
        assert client.data(pad + MESSAGE) == (552, b"5.3.4 Message header section too large")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing delivered
    assert not any(r.exc_info for r in caplog.records)
    assert "Uncaught exception" not in caplog.text
    (line,) = [r.getMessage() for r in caplog.records if "header section" in r.getMessage()]
    assert f"over {MAX_HEADER_SECTION} octets (MAX_HEADER_SECTION)" in line
    assert "refused by authres: 552 5.3.4" in line

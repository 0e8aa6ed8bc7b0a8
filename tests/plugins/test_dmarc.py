"""The dmarc plugin: records, the RFC 9989 tree walk, alignment, policy and
its enforcement; the DNS stub serves the records."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from auth_testing import app, envelope, example_keys, fake_session, run
from bonzo_plugins.dmarc import Discovery, DmarcPlugin, parse_record, targets
from bonzo_plugins.dmarc.plugin import KEYS, MAX_AUTHORS
from hypothesis import given
from hypothesis import strategies as st

from bonzo.dns import DNSTemporaryError, NXDomain
from bonzo.errors import PermanentError, TransientError

README = Path(__file__).resolve().parents[2] / "plugins" / "dmarc" / "README.rst"


def message(author: str = "alice@example.org") -> bytes:
    return f"From: {author}\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nHello\r\n".encode()


def configured(resolver=None, **table) -> DmarcPlugin:
    plugin = DmarcPlugin()
    plugin.bonzo_configure(config=table, app=app(resolver))
    return plugin


def evaluate(plugin, author="alice@example.org", spf=None, dkim=(), auth=None):
    env = envelope(message(author))
    if spf is not None:
        env.results.add("spf", spf[0], "", domain=spf[1], identity="mailfrom")
    for result, domain in dkim:
        env.results.add("dkim", result, "", domain=domain, selector="s1")
    verdict = run(plugin.bonzo_message(session=fake_session(auth=auth), envelope=env))
    return env, verdict


# ------------------------------------------------------------- the records
def test_parse_record():
    record = parse_record(
        "example.org", "v=DMARC1; p=reject; sp=quarantine; adkim=s; pct=50; t=y; psd=n; x=1"
    )
    assert record is not None
    assert (record.p, record.sp, record.adkim, record.aspf) == ("reject", "quarantine", "s", "r")
    assert (record.pct, record.testing, record.psd) == (50, True, "n")
    assert parse_record("x", "v=spf1 -all") is None
    assert parse_record("x", "v=DMARC1; p=bogus; pct=500").p == "none"
    assert parse_record("x", "v=DMARC1; p=bogus; pct=500").pct == 100


def test_tree_walk_targets():
    assert targets("a.mail.example.com") == [
        "a.mail.example.com",
        "mail.example.com",
        "example.com",
        "com",
    ]
    long = "a.b.c.d.e.f.g.h.i.example"  # ten labels: then seven, then one less
    walk = targets(long)
    assert walk[1] == "d.e.f.g.h.i.example"
    assert walk[-1] == "example" and len(walk) == 8


def test_organizational_domain_by_the_walk(dns_stub):
    dns_stub.add("_dmarc.example.org", "TXT", '"v=DMARC1; p=reject"')
    dns_stub.add("_dmarc.psd.example", "TXT", '"v=DMARC1; p=none; psd=y"')
    dns_stub.add("_dmarc.corp.example", "TXT", '"v=DMARC1; p=none; psd=n"')
    dns_stub.add("_dmarc.org", "TXT", '"v=DMARC1; p=none"')  # no psd: keep walking
    discovery = Discovery(dns_stub.resolver())
    assert run(discovery.organizational_domain("a.b.example.org")) == "org"
    assert run(discovery.organizational_domain("a.b.shop.psd.example")) == "shop.psd.example"
    assert run(discovery.organizational_domain("x.y.corp.example")) == "corp.example"
    assert run(discovery.organizational_domain("nothing.invalid")) == "nothing.invalid"
    assert run(discovery.organizational_domain("psd.example")) == "psd.example"
    # Each name is asked once per message, however often it is needed.
    assert len(discovery.asked) == len(set(discovery.asked))


def test_several_records_count_as_none(dns_stub):
    dns_stub.add("_dmarc.example.org", "TXT", '"v=DMARC1; p=reject"')
    dns_stub.add("_dmarc.example.org", "TXT", '"v=DMARC1; p=none"')
    assert run(Discovery(dns_stub.resolver()).policy("example.org")) is None


# ------------------------------------------------------------- evaluation
@pytest.fixture
def zone(dns_stub):
    dns_stub.add("_dmarc.example.org", "TXT", '"v=DMARC1; p=reject; sp=quarantine"')
    dns_stub.add("_dmarc.strict.example", "TXT", '"v=DMARC1; p=reject; adkim=s; aspf=s"')
    dns_stub.add("_dmarc.none.example", "TXT", '"v=DMARC1; p=none"')
    dns_stub.add("_dmarc.test.example", "TXT", '"v=DMARC1; p=reject; t=y"')
    dns_stub.add("_dmarc.half.example", "TXT", '"v=DMARC1; p=reject; pct=50"')
    return dns_stub


def test_pass_by_spf_or_dkim_with_relaxed_alignment(zone):
    plugin = configured(zone.resolver())
    env, verdict = evaluate(plugin, spf=("pass", "bounces.example.org"))
    result = env.results.get("dmarc")
    assert (result.result, verdict) == ("pass", None)
    assert result.details["spf_aligned"] and not result.details["dkim_aligned"]
    env, _ = evaluate(plugin, "bob@mail.example.org", dkim=[("pass", "example.org")])
    assert env.results.get("dmarc").result == "pass"
    assert env.results.get("dmarc").details["org_domain"] == "example.org"


def test_fail_is_rejected_with_550_5_7_1(zone):
    plugin = configured(zone.resolver())
    with pytest.raises(PermanentError) as info:
        evaluate(plugin, spf=("pass", "evil.example"), dkim=[("fail", "example.org")])
    assert (info.value.status_code, info.value.enhanced_code) == (550, "5.7.1")
    assert "example.org" in info.value.message


def test_strict_alignment(zone):
    plugin = configured(zone.resolver(), on_reject="tag")
    env, _ = evaluate(plugin, "a@strict.example", dkim=[("pass", "mail.strict.example")])
    assert env.results.get("dmarc").result == "fail"
    env, _ = evaluate(plugin, "a@strict.example", dkim=[("pass", "strict.example")])
    assert env.results.get("dmarc").result == "pass"


def test_subdomain_policy_and_quarantine(zone):
    plugin = configured(zone.resolver())
    env, verdict = evaluate(plugin, "a@sub.example.org")
    result = env.results.get("dmarc")
    assert (result.result, result.details["policy"], result.details["disposition"]) == (
        "fail",
        "quarantine",
        "quarantine",
    )
    assert type(verdict).__name__ == "Quarantine"


@pytest.mark.parametrize(
    ("on_reject", "expected"), [("quarantine", "Quarantine"), ("tag", "NoneType")]
)
def test_the_operator_chooses_the_enforcement(zone, on_reject, expected):
    plugin = configured(zone.resolver(), on_reject=on_reject)
    _env, verdict = evaluate(plugin)
    assert type(verdict).__name__ == expected


def test_testing_flag_and_pct_weaken_the_policy(zone):
    plugin = configured(zone.resolver())
    env, verdict = evaluate(plugin, "a@test.example")
    assert env.results.get("dmarc").details["disposition"] == "quarantine"
    plugin.random = lambda: 0.9  # outside the 50 %: one step weaker
    env, _ = evaluate(plugin, "a@half.example")
    assert env.results.get("dmarc").details["disposition"] == "quarantine"
    plugin.random = lambda: 0.1
    with pytest.raises(PermanentError):
        evaluate(plugin, "a@half.example")


def test_none_without_policy_and_p_none_is_never_enforced(zone):
    plugin = configured(zone.resolver())
    env, verdict = evaluate(plugin, "a@nopolicy.example")
    assert (env.results.get("dmarc").result, verdict) == ("none", None)
    env, verdict = evaluate(plugin, "a@none.example")
    assert (env.results.get("dmarc").result, verdict) == ("fail", None)


def test_temperror(zone):
    zone.fault("_dmarc.example.org", "servfail")
    env, verdict = evaluate(configured(zone.resolver()))
    assert (env.results.get("dmarc").result, verdict) == ("temperror", None)
    with pytest.raises(TransientError) as info:
        evaluate(configured(zone.resolver(), on_temperror="tempfail"))
    assert info.value.status_code == 451
    assert info.value.message == (
        "DMARC policy of the author's domain could not be looked up, try again later"
    )


def test_a_temporary_spf_or_dkim_error_on_an_aligned_domain_is_no_fail(zone):
    """The DKIM key or the SPF record could not be fetched here: the check
    might have passed, so the result is temperror (on_temperror decides),
    never a 550 for a local fault."""
    plugin = configured(zone.resolver())
    for spf, dkim in (
        (("pass", "evil.example"), [("temperror", "example.org")]),
        (("temperror", "example.org"), []),
        (("temperror", "bounces.example.org"), [("fail", "example.org")]),  # relaxed: aligned
    ):
        env, verdict = evaluate(plugin, spf=spf, dkim=dkim)
        result = env.results.get("dmarc")
        assert (result.result, verdict) == ("temperror", None), result.reason
        assert "temporary error in" in result.reason
    with pytest.raises(TransientError) as info:
        evaluate(configured(zone.resolver(), on_temperror="tempfail"),
                 dkim=[("temperror", "example.org")])  # fmt: skip
    # The policy was found: the reply names the check that could not be made.
    assert info.value.message == (
        "DKIM of the author's domain could not be checked, try again later"
    )
    # A temporary error for a domain that could never align changes nothing.
    with pytest.raises(PermanentError):
        evaluate(plugin, spf=("temperror", "evil.example"), dkim=[("temperror", "other.example")])
    # Nor does one beside an aligned pass.
    env, _ = evaluate(plugin, spf=("temperror", "example.org"), dkim=[("pass", "example.org")])
    assert env.results.get("dmarc").result == "pass"


def test_no_author_domain_and_dns_off_and_authenticated(zone):
    plugin = configured(zone.resolver())
    for author in ("undisclosed-recipients:;", "a@[192.0.2.1]"):
        env, verdict = evaluate(plugin, author)
        result = env.results.get("dmarc")
        assert (result.result, verdict) == ("permerror", None), author
        assert result.reason.startswith("no author domain")
    env, verdict = evaluate(configured(None))
    result = env.results.get("dmarc")
    assert (result.result, verdict) == ("none", None) and "DNS lookups are off" in result.reason
    env, verdict = evaluate(plugin, auth="alice")
    assert "dmarc" not in env.results and verdict is None


@pytest.mark.parametrize(
    "author",
    [
        None,  # no From: field at all
        "undisclosed-recipients:;",
        "a@[192.0.2.1]",
        "a@nopolicy.example, ceo@\x00",
    ],
)
def test_on_no_author_refuses_or_quarantines_a_from_without_a_usable_domain(zone, author):
    """RFC 7489 6.6.1: no policy can be applied to such a message; the
    operator may refuse it. The default only tags it (above)."""
    from bonzo import Quarantine

    def judge(plugin):
        text = message(author or "x").decode()
        if author is None:
            text = text.replace("From: x\r\n", "")
        env = envelope(text.encode())
        env.results.add("spf", "pass", "", domain="nopolicy.example", identity="mailfrom")
        return run(plugin.bonzo_message(session=fake_session(), envelope=env)), env

    verdict, env = judge(configured(zone.resolver()))
    assert verdict is None and env.results.get("dmarc").result == "permerror"
    with pytest.raises(PermanentError) as info:
        judge(configured(zone.resolver(), on_no_author="reject"))
    assert (info.value.status_code, info.value.enhanced_code) == (550, "5.7.1")
    assert info.value.message == "DMARC: no usable author domain in the From: field"
    # With DNS off too: the fault is in the message, not in a lookup.
    with pytest.raises(PermanentError):
        judge(configured(None, on_no_author="reject"))
    plugin = configured(zone.resolver(), on_no_author="quarantine")
    assert plugin.may_quarantine
    verdict, _ = judge(plugin)
    assert isinstance(verdict, Quarantine) and "no usable author domain" in verdict.reason


def test_on_no_author_leaves_usable_authors_alone(zone):
    plugin = configured(zone.resolver(), on_no_author="reject")
    env, verdict = evaluate(plugin, "a@nopolicy.example")
    assert (env.results.get("dmarc").result, verdict) == ("none", None)
    # A policy enforced for another author domain comes first.
    with pytest.raises(PermanentError) as info:
        evaluate(plugin, "a@example.org, ceo@\x00", spf=("pass", "evil.example"))
    assert "DMARC policy of example.org" in info.value.message


def test_a_final_dot_names_the_same_domain(zone):
    plugin = configured(zone.resolver())
    for author in ("a@example.org.", "Bank <a@Example.ORG.>", "a@example.org. (x)"):
        with pytest.raises(PermanentError) as info:
            evaluate(plugin, author)
        assert "example.org" in info.value.message
    env, verdict = evaluate(plugin, "Bank <a@example.org.>", dkim=[("pass", "example.org")])
    result = env.results.get("dmarc")
    assert (result.result, result.details["domain"], verdict) == ("pass", "example.org", None)


@pytest.mark.parametrize(
    "author",
    [
        "a@example.org\r\nthis line is no header field\r\nX-After: 1",
        "a@example.org\r\nbad name: a space in the field name",
        "a@example.org\r\n From here on a continuation",
    ],
)
def test_a_header_section_another_parser_refuses_is_still_evaluated(zone, author):
    """The author is read from the fields as the envelope reads them (the
    fields the delivered message shows), not by a stricter parser that
    would give up and leave p=reject unapplied."""
    with pytest.raises(PermanentError) as info:
        evaluate(configured(zone.resolver()), author, spf=("pass", "evil.example"))
    assert "DMARC policy of example.org" in info.value.message


CONTROL_AUTHORS = [
    "CEO <ceo@example.org\x00>",
    "ceo@example.org\x00",
    "CEO <ceo@\x00example.org>",
    "CEO <ceo@example.org\x01>",
    "CEO <ceo@example.org\x7f>",
    "CEO <ceo@\x1bexample.org>",
    "CEO <ceo@example.org\x00.none.example>",  # a reader that stops at the NUL
    # Unicode format characters a reader does not show either.
    "CEO <ceo@example.org\u200e>",
    "CEO <ceo@\u2066example.org\u2069>",
    "CEO <ceo@example.org\U000e0041>",
]


@pytest.mark.parametrize("author", CONTROL_AUTHORS)
def test_a_control_octet_in_the_author_domain_gets_the_shown_domain_s_policy(zone, author):
    """``example.org`` + NUL (hidden by many readers) was looked up as is
    (``_dmarc.example.org\\000``: no such name) and the message got
    ``none`` past example.org's p=reject. The domain a reader shows is the
    one whose policy applies; the name with the octet is never looked up."""
    plugin = configured(zone.resolver())
    with pytest.raises(PermanentError) as info:
        evaluate(plugin, author, spf=("pass", "evil.example"))
    assert "DMARC policy of example.org" in info.value.message
    assert not [q for q in zone.queries if "\\" in q[0]], zone.queries


@pytest.mark.parametrize(
    "author",
    ["a@nopolicy.example, ceo@example.org\x00", "ceo@\x00example.org, a@nopolicy.example"],
)
def test_an_unusable_author_beside_others_is_still_evaluated(zone, author):
    """The other author domains are evaluated, and so is the one the
    unusable address shows: example.org's p=reject applies."""
    plugin = configured(zone.resolver())
    with pytest.raises(PermanentError):
        evaluate(plugin, author, spf=("pass", "nopolicy.example"))


@pytest.mark.parametrize(
    "author", ["ceo@x_y.example.org", "ceo@-www.example.org", "ceo@_mail.example.org"]
)
def test_a_subdomain_that_is_no_host_name_gets_its_parent_s_policy(zone, author):
    """A DNS name all the same (RFC 2181 11): refusing it as no domain let
    the message past example.org's policy as permerror."""
    env, verdict = evaluate(configured(zone.resolver()), author, spf=("pass", "evil.example"))
    result = env.results.get("dmarc")
    assert result.result == "fail" and result.details["policy"] == "quarantine"  # sp=
    assert verdict is not None


def test_an_author_domain_no_reader_could_show_is_permerror(zone):
    """Nothing usable is left once the control octets are gone: no pass or
    none holds for the message."""
    env, verdict = evaluate(
        configured(zone.resolver()),
        "a@nopolicy.example, ceo@\x00",
        spf=("pass", "nopolicy.example"),
    )
    result = env.results.get("dmarc")
    assert result.result == "permerror" and verdict is None


def test_an_obsolete_from_spelling_is_the_from_field(zone):
    """``From :`` (white space before the colon, RFC 5322 4.5.8) is read by
    mail readers as the From field: its domain's policy applies."""
    env = envelope(b"From : a@example.org\r\nSubject: hi\r\n\r\nHello\r\n")
    with pytest.raises(PermanentError) as info:
        run(configured(zone.resolver()).bonzo_message(session=fake_session(), envelope=env))
    assert "DMARC policy of example.org" in info.value.message


@pytest.mark.parametrize(
    "author",
    [
        "a@nopolicy.example, b@example.org",
        "b@example.org, a@nopolicy.example",
        "a@nopolicy.example\r\nFrom: b@example.org",  # two From: fields
        "a@nopolicy.example, x@[192.0.2.1], b@example.org",  # one not evaluated beside
        "Team: a@nopolicy.example, b@example.org.;",
    ],
)
def test_every_author_domain_is_evaluated(zone, author):
    """RFC 7489 6.6.1: each domain of the From: field(s) is an author
    domain; the strictest policy among those that fail applies."""
    with pytest.raises(PermanentError) as info:
        evaluate(configured(zone.resolver()), author, spf=("pass", "nopolicy.example"))
    assert "DMARC policy of example.org" in info.value.message
    env, _ = evaluate(configured(zone.resolver(), on_reject="tag"), author)
    result = env.results.get("dmarc")
    assert (result.result, result.details["domain"]) == ("fail", "example.org")
    assert set(result.details["authors"]) == {"nopolicy.example", "example.org"}
    if "From:" in author:
        assert "2 From: fields" in result.reason


#: From: fields Python's parser misreads (it drops what follows a syntax
#: error, or cuts a domain at a backslash), or that hold no address but show
#: ceo@example.org: example.org's p=reject applies all the same.
SHOWN_AUTHORS = [
    "bob@nopolicy.example <ceo@example.org>",
    "<bob@nopolicy.example> <ceo@example.org>",
    "bob@nopolicy.example;<ceo@example.org>",
    "Alice <bob@nopolicy.example> <ceo@example.org>",
    "bob@nopolicy.example:ceo@example.org",
    "bob@nopolicy.example <ceo@example.org",
    "ceo@example\\.org",
    "=?utf-8?b?Y2VvQGV4YW1wbGUub3Jn?=",  # only an encoded word: ceo@example.org
    # Too long to parse: scanned all the same.
    "ceo@example.org" + "".join("\r\n (" + "x" * 70 + ")" for _ in range(30)),
]


@pytest.mark.parametrize("author", SHOWN_AUTHORS)
def test_every_domain_a_reader_may_be_shown_is_evaluated(zone, author):
    """A pass for the address Python's parser reads (SPF aligned with
    nopolicy.example) let ceo@example.org, which readers show, past
    example.org's p=reject."""
    with pytest.raises(PermanentError) as info:
        evaluate(configured(zone.resolver()), author, spf=("pass", "nopolicy.example"))
    assert "DMARC policy of example.org" in info.value.message
    env, _ = evaluate(configured(zone.resolver(), on_reject="tag"), author,
                      spf=("pass", "nopolicy.example"))  # fmt: skip
    result = env.results.get("dmarc")
    assert (result.result, result.details["domain"]) == ("fail", "example.org")


@pytest.mark.parametrize(
    "author",
    [
        '"ceo@example.org" <bob@nopolicy.example>',
        "=?utf-8?b?Y2VvQGV4YW1wbGUub3Jn?= <bob@nopolicy.example>",
        "bob@nopolicy.example (ceo@example.org)",
    ],
)
def test_an_address_in_the_display_name_of_a_clean_field_is_text(zone, author):
    """A well-formed field names its author by its address: one quoted in
    its display name or comment is text (a ticket system's "alice@..."
    <tickets@service.example>), left to content filters."""
    env, verdict = evaluate(configured(zone.resolver()), author, spf=("pass", "nopolicy.example"))
    result = env.results.get("dmarc")
    assert result.details["authors"] == ["nopolicy.example"]
    assert verdict is None


def test_a_malformed_from_naming_another_domain_is_never_a_pass(zone):
    """Aligned with the domain the parser reads, but the field does not
    parse cleanly and another reading names another domain: a reader may
    show either, so no pass holds (on_no_author decides)."""
    author = "a@example.org <b@nopolicy.example>"
    env, verdict = evaluate(configured(zone.resolver()), author, dkim=[("pass", "example.org")])
    result = env.results.get("dmarc")
    assert (result.result, verdict) == ("permerror", None)
    assert "a malformed From: field" in result.reason
    with pytest.raises(PermanentError) as info:
        evaluate(configured(zone.resolver(), on_no_author="reject"), author,
                 dkim=[("pass", "example.org")])  # fmt: skip
    assert info.value.message == "DMARC: no usable author domain in the From: field"
    # Defects that leave every address whole are no problem, nor a malformed
    # field every reading of which names the same domain (common).
    for author in ("a..b@example.org", "=?utf-8?q?A?=<a@example.org>",
                   "a@example.org <b@example.org>", "noreply@example.org <noreply@example.org>",
                   '"=?utf-8?q?J=C3=B6rg?=" <a@example.org>'):  # fmt: skip
        env, verdict = evaluate(configured(zone.resolver(), on_no_author="reject"), author,
                                dkim=[("pass", "example.org")])  # fmt: skip
        assert (env.results.get("dmarc").result, verdict) == ("pass", None), author


def test_the_strictest_outcome_counts(zone):
    plugin = configured(zone.resolver())
    # quarantine (sp of example.org) is stricter than a failing p=none.
    env, verdict = evaluate(plugin, "a@none.example, b@sub.example.org")
    result = env.results.get("dmarc")
    assert type(verdict).__name__ == "Quarantine"
    assert (result.details["domain"], result.details["disposition"]) == (
        "sub.example.org",
        "quarantine",
    )
    assert "author domains none.example, sub.example.org" in result.reason
    # Every domain aligned: pass; one without a policy: none (no verdict).
    env, verdict = evaluate(plugin, "a@example.org, b@mail.example.org",
                            dkim=[("pass", "example.org")])  # fmt: skip
    assert (env.results.get("dmarc").result, verdict) == ("pass", None)
    env, verdict = evaluate(plugin, "a@example.org, b@nopolicy.example",
                            dkim=[("pass", "example.org")])  # fmt: skip
    assert (env.results.get("dmarc").result, verdict) == ("none", None)
    # A domain whose policy could not be read might ask for more than a
    # failing p=none: temperror, and on_temperror decides.
    zone.fault("_dmarc.example.org", "servfail")
    env, verdict = evaluate(plugin, "a@none.example, b@example.org")
    assert (env.results.get("dmarc").result, verdict) == ("temperror", None)
    with pytest.raises(TransientError):
        evaluate(configured(zone.resolver(), on_temperror="tempfail"),
                 "a@none.example, b@example.org")  # fmt: skip
    # ... but not more than a failing p=reject.
    with pytest.raises(PermanentError):
        evaluate(plugin, "a@example.org, b@strict.example")


def test_too_many_author_domains_are_not_looked_up(zone):
    author = ", ".join(f"a@d{i}.example" for i in range(MAX_AUTHORS + 1))
    with pytest.raises(PermanentError) as info:
        evaluate(configured(zone.resolver()), author)
    assert "too many author domains" in info.value.message
    env, verdict = evaluate(configured(zone.resolver(), on_reject="tag"), author)
    result = env.results.get("dmarc")
    assert (result.result, result.details["disposition"], verdict) == ("permerror", "reject", None)
    assert zone.queries == []
    # At the limit, each is asked.
    author = ", ".join(f"a@d{i}.example" for i in range(MAX_AUTHORS - 1)) + ", b@example.org"
    with pytest.raises(PermanentError):
        evaluate(configured(zone.resolver()), author)


@pytest.mark.parametrize(
    ("table", "text"),
    [({"on_reject": "drop"}, "on_reject"), ({"on_temperror": "reject"}, "on_temperror")],
)
def test_bad_configuration(table, text):
    with pytest.raises(ValueError, match=text):
        configured(None, **table)


def test_the_example_configuration_shows_every_key():
    assert example_keys("dmarc") == set(KEYS)


@given(st.text(max_size=300))
def test_parse_record_never_raises(text):
    record = parse_record("example.org", "v=DMARC1;" + text)
    assert record is not None
    assert record.p in ("none", "quarantine", "reject") and 0 <= record.pct <= 100
    assert record.adkim in ("r", "s") and record.psd in ("y", "n", "u")


@given(st.lists(st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True), min_size=1, max_size=20))
def test_tree_walk_is_bounded(labels):
    walk = targets(".".join(labels))
    assert 1 <= len(walk) <= 8
    assert walk[0] == ".".join(labels) and walk[-1] == labels[-1]
    assert all(a.endswith(b) for a, b in zip(walk, walk[1:], strict=False))


class _CountingResolver:
    """Answers TXT lookups after a pause, counting them; one name fails."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def txt(self, name: str) -> list[bytes]:
        self.asked.append(name)
        await asyncio.sleep(0.05)
        if name == "_dmarc.broken.example":
            raise DNSTemporaryError("SERVFAIL", name, "TXT")
        if name == "_dmarc.example.com":
            return [b"v=DMARC1; p=reject"]
        raise NXDomain("no such domain", name, "TXT")


def test_author_domains_evaluated_at_once_share_their_lookups():
    """Discovery's evaluations run together (asyncio.gather): each name is
    asked once, not once per author domain."""
    resolver = _CountingResolver()
    discovery = Discovery(resolver)

    async def together() -> list[Any]:
        return await asyncio.gather(
            *(discovery.policy(d) for d in ("a.example.com", "b.example.com", "c.example.com"))
        )

    assert [r.p for r in run(together())] == ["reject"] * 3
    assert resolver.asked.count("_dmarc.example.com") == 1
    assert sorted(resolver.asked) == sorted(set(resolver.asked))

    async def failing() -> list[Any]:
        return await asyncio.gather(
            *(discovery.policy("x.broken.example") for _ in range(3)), return_exceptions=True
        )

    assert all(isinstance(e, DNSTemporaryError) for e in run(failing()))
    assert resolver.asked.count("_dmarc.broken.example") == 1

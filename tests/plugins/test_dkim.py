"""The dkim plugin: one result per signature, keys through the DNS stub,
bounded memory, the signature cap, ARC."""

from __future__ import annotations

from pathlib import Path

import pytest
from auth_testing import DkimKey, app, envelope, example_keys, fake_session, run
from bonzo_plugins.dkim import DkimPlugin
from bonzo_plugins.dkim.plugin import KEYS

README = Path(__file__).resolve().parents[2] / "plugins" / "dkim" / "README.rst"

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: hello\r\n"
    b"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n\r\nsee you.\r\n"
)


@pytest.fixture(scope="module")
def rsa() -> DkimKey:
    return DkimKey("rsa")


@pytest.fixture(scope="module")
def ed() -> DkimKey:
    return DkimKey("ed25519")


def configured(resolver=None, **table) -> DkimPlugin:
    plugin = DkimPlugin()
    plugin.bonzo_configure(config=table, app=app(resolver))
    return plugin


def check(plugin: DkimPlugin, message: bytes) -> list:
    env = envelope(message)
    run(plugin.bonzo_message(session=fake_session(), envelope=env))
    return [(r.result, r.reason, dict(r.details)) for r in env.results.all("dkim")]


def test_rsa_and_ed25519_pass(dns_stub, rsa, ed):
    rsa.publish(dns_stub, "s1", "example.org")
    ed.publish(dns_stub, "ed", "example.org")
    signed = ed.sign(rsa.sign(MESSAGE, "s1", "example.org"), "ed", "example.org")
    results = check(configured(dns_stub.resolver()), signed)
    assert [(r, d["domain"], d["selector"]) for r, _, d in results] == [
        ("pass", "example.org", "ed"),
        ("pass", "example.org", "s1"),
    ]
    assert results[1][2]["algorithm"] == "rsa-sha256"


@pytest.mark.parametrize("canon", [b"simple", b"relaxed"])
def test_changed_body_or_header_fails(dns_stub, rsa, canon):
    rsa.publish(dns_stub, "s1", "example.org")
    signed = rsa.sign(MESSAGE, "s1", "example.org", canonicalize=(canon, canon))
    plugin = configured(dns_stub.resolver())
    assert check(plugin, signed)[0][0] == "pass"
    ((result, reason, _),) = check(plugin, signed.replace(b"see you", b"send money"))
    assert (result, reason) == ("fail", "body hash mismatch")
    ((result, reason, _),) = check(plugin, signed.replace(b"Subject: hello", b"Subject: HELLO"))
    assert (result, reason) == ("fail", "signature did not verify")


@pytest.mark.parametrize("canon", [b"simple", b"relaxed"])
@pytest.mark.parametrize(
    "where", ["append", "prepend", "received"], ids=["appended", "prepended", "received"]
)
def test_a_field_with_white_space_before_its_colon_keeps_the_signature(dns_stub, rsa, canon, where):
    """RFC 5322 4.5.8's ``name WSP* ":"`` in a field the signature does not
    cover leaves it valid (OpenDKIM agrees); dkimpy's own parser refused
    the whole section (permerror for every signature)."""
    rsa.publish(dns_stub, "s1", "example.org")
    signed = rsa.sign(MESSAGE, "s1", "example.org", canonicalize=(canon, canon))
    head, _, body = signed.partition(b"\r\n\r\n")
    head = {
        "append": head + b"\r\nX-Spam-Flag : NO",
        "prepend": b"X-Spam-Flag\t: NO\r\n" + head,
        "received": b"Received : from old.relay\r\n\tby mx; today\r\n" + head,
    }[where]
    message = head + b"\r\n\r\n" + body
    plugin = configured(dns_stub.resolver())
    ((result, reason, details),) = check(plugin, message)
    assert (result, details["domain"]) == ("pass", "example.org"), reason


def test_white_space_before_the_colon_of_a_signed_field(dns_stub, rsa):
    """Relaxed header canonicalization deletes it (RFC 6376 3.4.2): the
    signature holds; simple keeps every octet (3.4.1): it does not."""
    rsa.publish(dns_stub, "s1", "example.org")
    plugin = configured(dns_stub.resolver())
    for canon, expected in ((b"relaxed", "pass"), (b"simple", "fail")):
        signed = rsa.sign(MESSAGE, "s1", "example.org", canonicalize=(canon, b"simple"))
        spaced = signed.replace(b"\r\nSubject: hello", b"\r\nSubject \t: hello")
        assert spaced != signed
        ((result, _, _),) = check(plugin, spaced)
        assert result == expected, canon


def test_no_signature_with_an_obsolete_field_name_is_none(dns_stub):
    plugin = configured(dns_stub.resolver())
    odd = b"Authentication-Results : mx.example.com; dkim=pass\r\nFrom : x@example.org\r\n"
    assert check(plugin, odd + MESSAGE) == [("none", "no signature", {})]


def test_key_problems(dns_stub, rsa):
    signed = rsa.sign(MESSAGE, "s1", "example.org")
    plugin = configured(dns_stub.resolver())
    ((result, reason, _),) = check(plugin, signed)
    assert result == "permerror" and "s1._domainkey.example.org" in reason
    dns_stub.fault("s1._domainkey.example.org", "servfail")
    ((result, _, _),) = check(plugin, signed)
    assert result == "temperror"
    dns_stub.clear_faults()
    dns_stub.add("s1._domainkey.example.org", "TXT", '"v=DKIM1; k=rsa; p=notbase64!"')
    ((result, _, _),) = check(plugin, signed)
    assert result == "permerror"
    # An empty p= is a revoked key (RFC 6376 3.6.1), not an unparsable one.
    dns_stub.clear_faults()
    dns_stub.add("s2._domainkey.example.org", "TXT", '"v=DKIM1; k=rsa; p="')
    ((result, reason, _),) = check(plugin, rsa.sign(MESSAGE, "s2", "example.org"))
    assert (result, reason) == ("permerror", "key s2._domainkey.example.org: revoked (empty p=)")


def test_weak_and_unsafe_signatures_are_policy(dns_stub, rsa):
    small = DkimKey("rsa", 1024)
    small.publish(dns_stub, "small", "example.org")
    rsa.publish(dns_stub, "s1", "example.org")
    plugin = configured(dns_stub.resolver(), min_key_bits=2048)
    ((result, reason, _),) = check(plugin, small.sign(MESSAGE, "small", "example.org"))
    assert result == "policy" and "too small" in reason
    ((result, reason, _),) = check(plugin, rsa.sign(MESSAGE, "s1", "example.org", length=True))
    assert result == "policy" and "l=" in reason
    sha1 = rsa.sign(MESSAGE, "s1", "example.org", signature_algorithm=b"rsa-sha1")
    ((result, reason, _),) = check(plugin, sha1)
    assert result == "policy" and "RFC 8301" in reason


def test_no_signature_and_malformed_signature(dns_stub):
    plugin = configured(dns_stub.resolver())
    assert check(plugin, MESSAGE) == [("none", "no signature", {})]
    bad = b"DKIM-Signature: v=1; d=example.org; s=s1; garbage\r\n" + MESSAGE
    ((result, _, details),) = check(plugin, bad)
    assert result == "permerror" and details["domain"] == "example.org"
    assert dns_stub.queries == []


def test_the_result_is_for_the_section_every_reader_sees(dns_stub, rsa):
    """The section ends at its first line that is no header field, as the
    envelope reads it (and makes plain with a blank line), even where
    dkimpy alone would skip the line (an mbox ``From`` line) and verify the
    fields after it."""
    rsa.publish(dns_stub, "s1", "example.org")
    signed = rsa.sign(MESSAGE, "s1", "example.org")
    assert check(configured(dns_stub.resolver()), signed)[0][0] == "pass"
    injected = signed.replace(b"To: bob", b"From mbox line\r\nTo: bob", 1)
    env = envelope(injected)
    run(configured(dns_stub.resolver()).bonzo_message(session=fake_session(), envelope=env))
    assert env.results.get("dkim").result == "fail"
    assert b"\r\n\r\nFrom mbox line\r\nTo: bob" in env.body


def test_max_signatures_caps_the_work(dns_stub, rsa):
    rsa.publish(dns_stub, "s1", "example.org")
    signed = MESSAGE
    for _ in range(7):
        signed = rsa.sign(signed, "s1", "example.org")
    results = check(configured(dns_stub.resolver(), max_signatures=3), signed)
    assert len(results) == 3
    assert len(dns_stub.asked("TXT")) == 1  # one lookup per key


def test_dns_off_is_none(rsa):
    plugin = configured(None)
    ((result, reason, _),) = check(plugin, rsa.sign(MESSAGE, "s1", "example.org"))
    assert result == "none" and "DNS lookups are off" in reason


def test_a_large_spooled_message_is_streamed(dns_stub, rsa):
    rsa.publish(dns_stub, "s1", "example.org")
    body = b"".join(b"line %d of a long message   \r\n" % i for i in range(150_000))
    signed = rsa.sign(MESSAGE + body, "s1", "example.org")
    env = envelope(signed)
    assert env.spooled  # on disk: read in pieces, not whole
    run(configured(dns_stub.resolver()).bonzo_message(session=fake_session(), envelope=env))
    assert env.results.get("dkim").result == "pass"


def test_arc_result(dns_stub, rsa):
    import dkim

    rsa.publish(dns_stub, "arc", "lists.example")
    message = b"Authentication-Results: lists.example; dkim=none\r\n" + MESSAGE
    fields = dkim.arc_sign(message, b"arc", b"lists.example", rsa.private, b"lists.example")
    sealed = b"".join(fields) + message
    plugin = configured(dns_stub.resolver(), arc=True)
    env = envelope(sealed)
    run(plugin.bonzo_message(session=fake_session(), envelope=env))
    assert env.results.get("arc").result == "pass"
    env = envelope(sealed.replace(b"see you", b"send money"))
    run(plugin.bonzo_message(session=fake_session(), envelope=env))
    assert env.results.get("arc").result == "fail"
    # A field with white space before its colon (RFC 5322 4.5.8) the seal
    # does not cover: dkimpy's parser refused the whole message.
    env = envelope(b"X-Spam-Flag : NO\r\n" + sealed)
    run(plugin.bonzo_message(session=fake_session(), envelope=env))
    assert env.results.get("arc").result == "pass", env.results.get("arc").reason
    env = envelope(MESSAGE)
    run(plugin.bonzo_message(session=fake_session(), envelope=env))
    assert env.results.get("arc").result == "none"
    small = configured(dns_stub.resolver(), arc=True, arc_max_size=1024)
    env = envelope(sealed)
    run(small.bonzo_message(session=fake_session(), envelope=env))
    assert env.results.get("arc").result == "none"


def arc_sealed(rsa: DkimKey, domain: str, message: bytes = MESSAGE, selector: str = "arc") -> bytes:
    """``message`` with one more ARC set, sealed by ``domain``."""
    import dkim

    hop = f"Authentication-Results: {domain}; arc=pass; dkim=none\r\n".encode()
    if b"ARC-Seal:" not in message:
        hop = hop.replace(b"arc=pass; ", b"")
    message = hop + message
    return (
        b"".join(
            dkim.arc_sign(message, selector.encode(), domain.encode(), rsa.private, domain.encode())
        )
        + message
    )


def arc_result(dns_stub, sealed):
    """The ``arc`` result of the plugin (``arc = true``) for ``sealed``."""
    env = envelope(sealed)
    run(
        configured(dns_stub.resolver(), arc=True).bonzo_message(
            session=fake_session(), envelope=env
        )
    )
    return env.results.get("arc")


def test_a_chain_of_two_arc_sets_passes_with_one_lookup_per_seal(dns_stub, rsa):
    rsa.publish(dns_stub, "arc", "lists.example")
    rsa.publish(dns_stub, "hop", "forward.example")
    sealed = arc_sealed(rsa, "forward.example", arc_sealed(rsa, "lists.example"), "hop")
    result = arc_result(dns_stub, sealed)
    assert result.result == "pass", result.reason
    assert sorted(dns_stub.asked("TXT")) == [
        "arc._domainkey.lists.example",
        "hop._domainkey.forward.example",
    ]


def test_an_older_message_signature_key_is_never_looked_up(dns_stub, rsa):
    """Only the newest ARC-Message-Signature counts (RFC 8617 5.2): the key
    of an older one is not looked up, so its DNS never answering does not
    fail a valid chain (it made the whole chain ``fail`` before)."""
    import dkim

    class SealedWithAnotherKey(dkim.ARC):
        """Seals with selector ``seal``, signs the message with ``old``."""

        def gen_header(self, fields, include_headers, canon, name, pk, standardize=False):
            if name == b"ARC-Seal":
                fields = [(k, b"seal" if k == b"s" else v) for k, v in fields]
            return super().gen_header(fields, include_headers, canon, name, pk, standardize)

    rsa.publish(dns_stub, "seal", "lists.example")
    rsa.publish(dns_stub, "hop", "forward.example")
    dns_stub.fault("old._domainkey.lists.example", "timeout")
    first = b"Authentication-Results: lists.example; dkim=none\r\n" + MESSAGE
    arc = SealedWithAnotherKey(first, logger=None)
    signed = arc.sign(b"old", b"lists.example", rsa.private, b"lists.example", [b"from", b"to"])
    sealed = arc_sealed(rsa, "forward.example", b"".join(signed) + first, "hop")
    result = arc_result(dns_stub, sealed)
    assert result.result == "pass", result.reason
    assert sorted(dns_stub.asked("TXT")) == [
        "hop._domainkey.forward.example",
        "seal._domainkey.lists.example",
    ]


def test_more_than_50_arc_sets_fail_without_a_lookup(dns_stub):
    """RFC 8617 allows i= 1 to 50: a longer chain costs no DNS query."""
    fake = (
        b"ARC-Seal: i=51; a=rsa-sha256; cv=pass; d=slow.example; s=s1; b=AAAA\r\n"
        b"ARC-Message-Signature: i=51; a=rsa-sha256; c=relaxed/relaxed; d=slow.example;"
        b" s=s2; h=from:to:subject; bh=AAAA; b=AAAA\r\n"
        b"ARC-Authentication-Results: i=51; slow.example; spf=pass\r\n"
    )
    env = envelope(fake + MESSAGE)
    run(
        configured(dns_stub.resolver(), arc=True).bonzo_message(
            session=fake_session(), envelope=env
        )
    )
    arc = env.results.get("arc")
    assert (arc.result, arc.reason) == ("fail", "more than 50 ARC sets (RFC 8617)")
    assert dns_stub.queries == []


def test_arc_keys_whose_dns_never_answers_hold_no_thread(dns_stub, rsa, tmp_path):
    """ARC keys are looked up on the event loop before dkimpy runs in a
    thread of the loop's default executor (which also writes every maildir
    and spool): a sender whose DNS never answers delays no one else's
    delivery, even with that executor down to one thread."""
    import asyncio
    import time
    from concurrent.futures import ThreadPoolExecutor

    from bonzo_plugins.maildir import MaildirPlugin
    from plugin_testing import make_envelope, make_session

    dns_stub.fault("arc._domainkey.slow.example", "timeout")
    hostile = envelope(arc_sealed(rsa, "slow.example"))
    plain = make_envelope(b"Subject: plain\r\n\r\nHello\r\n")
    plugin = configured(dns_stub.resolver(timeout=3.0), arc=True, timeout=3.0)
    maildir = MaildirPlugin()
    maildir.bonzo_configure(config={"path": str(tmp_path / "Maildir")}, app=None)
    maildir.bonzo_startup()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        checking = asyncio.create_task(
            plugin.bonzo_message(session=fake_session(), envelope=hostile)
        )
        deadline = time.monotonic() + 5
        while "arc._domainkey.slow.example" not in dns_stub.asked("TXT"):
            assert time.monotonic() < deadline and not checking.done()
            await asyncio.sleep(0.01)
        start = time.monotonic()
        await maildir.bonzo_deliver(session=make_session(), envelope=plain)
        took = time.monotonic() - start
        await checking
        return took

    try:
        took = run(main())
    finally:
        plain.close()
    assert took < 1.0
    assert len(list((tmp_path / "Maildir" / "new").iterdir())) == 1
    arc = hostile.results.get("arc")
    assert arc.result == "fail" and "key lookup failed" in arc.reason, arc.reason


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"max_signatures": 0}, "max_signatures"),
        ({"min_key_bits": 100}, "min_key_bits"),
        ({"arc": 1}, "arc: expected true or false"),
        ({"what": 1}, "what: unknown key"),
    ],
)
def test_bad_configuration(table, message):
    with pytest.raises(ValueError, match=message):
        configured(None, **table)


def test_the_example_configuration_shows_every_key():
    assert example_keys("dkim") == set(KEYS)


def test_verification_memory_is_bounded(rsa, tmp_path):
    """A 20 MB message is verified with a few MB of memory: the body is
    hashed in pieces from the spool, never read whole."""
    import tracemalloc

    from bonzo_plugins.dkim.verify import prepare

    body = b"".join(b"line %07d of a long message\r\n" % i for i in range(650_000))
    signed = rsa.sign(MESSAGE + body, "s1", "example.org")
    path = tmp_path / "message"
    path.write_bytes(signed)
    end = signed.index(b"\r\n\r\n")
    del body, signed
    with path.open("rb") as content:
        section = content.read(end)
        content.seek(len(section) + 4)
        tracemalloc.start()
        try:
            prepared = prepare(section, content, 5)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert path.stat().st_size > 20_000_000
    assert prepared.body_hashes and prepared.signatures[0].result == ""
    assert peak < 4_000_000, peak

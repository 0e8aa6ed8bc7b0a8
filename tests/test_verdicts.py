"""Verdicts beyond accept and reject (Discard, Quarantine) and per-plugin
results, through the real dispatcher (SessionTester: the protocol core and
the dispatcher a connection uses, with no socket)."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bonzo import Accept, Discard, Quarantine, hookimpl
from bonzo.hooks import PluginSet
from bonzo.results import Result, Results
from bonzo.testing import SessionTester

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello\r\n.\r\n"


class Owner:
    """Accepts every recipient, keeps what it delivers or quarantines."""

    def __init__(self) -> None:
        self.delivered: list[bytes] = []
        self.quarantined: list[tuple[str, bytes]] = []
        self.accepted = 0

    @hookimpl
    def bonzo_rcpt(self) -> Any:
        return Accept()

    @hookimpl
    def bonzo_deliver(self, envelope: Any) -> Any:
        self.delivered.append(envelope.content)
        return Accept()

    @hookimpl
    def bonzo_accepted(self) -> None:
        self.accepted += 1


class Keeper:
    @hookimpl
    def bonzo_quarantine(self, envelope: Any, reason: str) -> Any:
        owner.quarantined.append((reason, envelope.content))
        return Accept("Ok: kept")


owner = Owner()


def run_session(*plugins: tuple[str, Any], script: bytes = b"") -> tuple[bytes, SessionTester]:
    global owner
    owner = Owner()
    plugin_set = PluginSet()
    for name, plugin in plugins:
        plugin_set.register(plugin, name)
    plugin_set.register(owner, "owner")
    tester = SessionTester(plugin_set)

    async def main() -> bytes:
        greeting = await tester.connect()
        if not greeting.startswith(b"220"):
            return greeting
        return await tester.send(
            script
            or b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
            + MESSAGE
        )

    return asyncio.run(main()), tester


@pytest.mark.parametrize("hook", ["bonzo_mail", "bonzo_rcpt", "bonzo_data", "bonzo_message"])
def test_discard_from_any_filter_stage_answers_250_and_delivers_nothing(hook, caplog):
    class Discarder:
        pass

    setattr(Discarder, hook, hookimpl(lambda self: Discard()))
    with caplog.at_level(logging.INFO, "tornado.access"):
        replies, _ = run_session(("virus", Discarder()))
    assert replies.splitlines()[-1].startswith(b"250 2.0.0")
    assert owner.delivered == [] and owner.quarantined == []
    assert owner.accepted == 0  # nobody has it
    assert "by=virus discarded" in caplog.text


@pytest.mark.parametrize("hook", ["bonzo_mail", "bonzo_rcpt", "bonzo_data", "bonzo_message"])
def test_quarantine_goes_to_the_quarantine_owner_after_the_filters(hook, caplog):
    class Suspect:
        pass

    setattr(Suspect, hook, hookimpl(lambda self: Quarantine("looks   like\nphishing")))
    later: list[str] = []

    class Later:
        @hookimpl
        def bonzo_message(self, envelope: Any) -> None:
            later.append(envelope.quarantined)
            envelope.add_header("X-Checked", "yes")

    with caplog.at_level(logging.INFO, "tornado.access"):
        replies, _ = run_session(("suspect", Suspect()), ("later", Later()), ("keeper", Keeper()))
    assert replies.splitlines()[-1] == b"250 2.0.0 Ok: kept"
    assert owner.delivered == []
    [(reason, content)] = owner.quarantined
    assert reason == "looks like phishing"
    assert later == ["looks like phishing"]  # the filters after still ran
    assert b"X-Checked: yes\r\n" in content
    assert "quarantined by suspect (looks like phishing)" in caplog.text
    assert owner.accepted == 1


@pytest.mark.parametrize(
    "first, second, outcome",
    [
        (("bonzo_message", "quarantine"), ("bonzo_message", "discard"), "quarantined"),
        (("bonzo_rcpt", "quarantine"), ("bonzo_message", "discard"), "quarantined"),
        (("bonzo_mail", "discard"), ("bonzo_message", "quarantine"), "discarded"),
        (("bonzo_message", "discard"), ("bonzo_message", "quarantine"), "discarded"),
    ],
)
def test_the_first_discard_or_quarantine_decides(first, second, outcome, caplog):
    # docs/plugins.rst: "The first filter to give one decides".
    verdicts = {"quarantine": lambda self: Quarantine("suspect"), "discard": lambda self: Discard()}

    class First:
        pass

    class Second:
        pass

    setattr(First, first[0], hookimpl(verdicts[first[1]]))
    setattr(Second, second[0], hookimpl(verdicts[second[1]]))
    with caplog.at_level(logging.INFO, "tornado.access"):
        replies, _ = run_session(("first", First()), ("second", Second()), ("keeper", Keeper()))
    assert replies.splitlines()[-1].startswith(b"250 2.0.0")
    assert owner.delivered == []
    if outcome == "quarantined":
        assert [reason for reason, _ in owner.quarantined] == ["suspect"]
        assert "quarantined by first (suspect)" in caplog.text
    else:
        assert owner.quarantined == []
        assert "by=first discarded" in caplog.text


@pytest.mark.expect_errors
def test_quarantine_without_an_owner_is_451_never_a_delivery(caplog):
    class Suspect:
        @hookimpl
        def bonzo_message(self) -> Any:
            return Quarantine("spam score 12")

    replies, _ = run_session(("suspect", Suspect()))
    assert replies.splitlines()[-1].startswith(b"451 4.3.0")
    assert owner.delivered == []
    assert "No plugin quarantined message" in caplog.text
    assert "spam score 12" in caplog.text


@pytest.mark.expect_errors
@pytest.mark.parametrize("hook", ["bonzo_connect", "bonzo_helo", "bonzo_deliver"])
def test_discard_is_refused_where_it_means_nothing(hook, caplog):
    class Wrong:
        pass

    setattr(Wrong, hook, hookimpl(lambda self: Discard()))
    replies, tester = run_session(("wrong", Wrong()))
    assert (b"421 4.3.0" if hook == "bonzo_connect" else b"451 4.3.0") in replies
    assert "which is a verdict only for" in caplog.text
    assert owner.delivered == []


def test_quarantine_needs_a_reason():
    with pytest.raises(ValueError):
        Quarantine("  ")


# ---------------------------------------------------------------- results
def test_results_are_kept_read_by_later_plugins_and_logged(caplog):
    seen: list[str] = []

    class Checks:
        @hookimpl
        def bonzo_connect(self, session: Any) -> None:
            session.results.add("dnsbl", "none")

        @hookimpl
        def bonzo_message(self, envelope: Any) -> None:
            envelope.results.add("spf", "pass", domain="example.org")
            envelope.results.add("dkim", "fail", "body hash\r\nmismatch", domain="example.org")
            envelope.results.add("dkim", "pass", domain="mailer.test")

    class Score:
        @hookimpl
        def bonzo_message(self, session: Any, envelope: Any) -> None:
            found = envelope.results
            seen.append(found.get("spf").result)
            seen.append(",".join(r.result for r in found.all("dkim")))
            seen.append(session.results.get("dnsbl").result)

    with caplog.at_level(logging.INFO, "tornado.access"):
        run_session(("checks", Checks()), ("score", Score()))
    assert seen == ["pass", "fail,pass", "none"]
    assert 'results=[dnsbl=none spf=pass dkim=fail("body hash mismatch") dkim=pass]' in caplog.text


def test_results_of_a_refused_message_are_logged(caplog):
    from bonzo import errors

    class Av:
        @hookimpl
        def bonzo_message(self, envelope: Any) -> None:
            envelope.results.add("clamav", "fail", "Eicar-Signature", signature="Eicar")
            raise errors.PermanentError("Virus found", 554, "5.7.1")

    with caplog.at_level(logging.INFO, "tornado.access"):
        replies, _ = run_session(("av", Av()))
    assert replies.splitlines()[-1] == b"554 5.7.1 Virus found"
    assert 'refused 554 by=av results=[clamav=fail("Eicar-Signature")]' in caplog.text


def test_results_api():
    results = Results()
    first = results.add("spf", "pass", domain="example.org")
    assert first == Result("spf", "pass", "", {"domain": "example.org"})
    assert "spf" in results and "dkim" not in results and len(results) == 1
    assert results.get("dkim") is None
    assert results["spf"] is first  # as docs/filters.rst reads a finding
    with pytest.raises(KeyError):
        results["dkim"]
    assert [r.plugin for r in results] == ["spf"]
    for bad in (("SPF", "pass"), ("spf", "Pass"), ("spf", ""), ("s p f", "pass")):
        with pytest.raises(ValueError):
            results.add(*bad)
    with pytest.raises(ValueError, match="JSON"):
        results.add("spf", "pass", when=object())


@given(st.text(max_size=2000))
def test_a_reason_is_always_one_bounded_printable_line(reason):
    item = Results().add("x", "fail", reason)
    assert len(item.reason) <= 500
    assert item.reason.isprintable()
    assert "\n" not in str(item) and "\r" not in str(item)


@given(st.text(max_size=200))
def test_a_reason_in_the_log_cannot_end_its_quotes(reason):
    """A reason may hold a client's text (its HELO name): in the log's
    ``results=[...]`` it stays inside its own quotes, so it cannot forge a
    result (``x") dmarc=pass("forged``)."""
    text = str(Results().add("spf", "none", reason))
    assert text.startswith('spf=none("') or text == "spf=none"
    if text != "spf=none":
        inner = text[len('spf=none("') : -2]
        assert text.endswith('")')
        # Every quote inside is escaped: the first unescaped one ends it.
        assert re.fullmatch(r'(?:[^"\\]|\\.)*', inner)


def test_a_forged_result_in_a_reason_stays_one_result():
    text = str(Results().add("spf", "none", 'x") dmarc=pass("forged'))
    assert text == 'spf=none("x\\") dmarc=pass(\\"forged")'


class UnicodeRefusal:
    """Refuses every recipient with a reply text that is not US-ASCII."""

    @hookimpl(tryfirst=True)
    def bonzo_rcpt(self) -> Any:
        from bonzo.errors import PermanentError

        raise PermanentError("Adresse ung\u00fcltig \u2014 unbekannt", 550, "5.1.1")


@pytest.mark.parametrize(
    ("mail", "reply"),
    [
        # A reply is US-ASCII (RFC 5321 4.2): one "?" per other character.
        (b"MAIL FROM:<a@example.org>", b"550 5.1.1 Adresse ung?ltig ? unbekannt\r\n"),
        # The client declared SMTPUTF8 for the transaction (RFC 6531 3.7.4.2).
        (
            b"MAIL FROM:<a@example.org> SMTPUTF8",
            "550 5.1.1 Adresse ung\u00fcltig \u2014 unbekannt\r\n".encode(),
        ),
    ],
)
def test_a_plugins_non_ascii_reply_text_is_utf8_only_for_smtputf8(mail, reply):
    script = b"EHLO c.test\r\n" + mail + b"\r\nRCPT TO:<b@example.net>\r\n"
    out, _ = run_session(("unicode", UnicodeRefusal()), script=script)
    assert out.endswith(reply), out

"""The headers a quarantined message is kept with (``maildir`` and
``queue``): its recipients, written so that no address can end the header
or start another (tester milter3 M2)."""

from __future__ import annotations

import email
import email.policy
import re

from bonzo_plugins._quarantine import add_quarantine_headers, address_list

from bonzo.session import Envelope

# A quoted local part may hold what ends an address in a header.
ODD = '"x>, <evil@example.org"@example.org'


def xtext_decode(text: str) -> str:
    return (
        re.sub(r"\+([0-9A-F]{2})", lambda m: bytes([int(m[1], 16)]).decode("latin-1"), text)
        .encode("latin-1")
        .decode("utf-8")
    )


def quarantined(rcpts: list[str], mail_params: dict[str, str | None] | None = None) -> Envelope:
    envelope = Envelope("sender@example.net", mail_params, rcpt_tos=rcpts)
    envelope.write(b"Subject: test\r\n\r\nHello\r\n")
    envelope.quarantined_by = "milter"
    return envelope


def fields(envelope: Envelope) -> list[tuple[str, str]]:
    message = email.message_from_bytes(envelope.content, policy=email.policy.compat32)
    return [(k, re.sub(r"\r?\n[ \t]", " ", v)) for k, v in message.items()]


def test_the_recipients_are_recorded_and_odd_ones_escaped():
    envelope = quarantined(["bob@example.org", ODD, "carol+tag@example.org"])
    facts = add_quarantine_headers(envelope, "held")
    got = fields(envelope)
    assert [k for k, _ in got] == ["X-Bonzo-Quarantine", "X-Bonzo-Quarantine-Recipients", "Subject"]
    value = got[1][1]
    assert value.startswith("<bob@example.org>, xtext:<")
    assert value.endswith(", <carol+tag@example.org>")
    [encoded] = re.findall(r"xtext:<([^>]*)>", value)
    assert "<" not in encoded and "," not in encoded and " " not in encoded
    assert xtext_decode(encoded) == ODD
    assert facts == {
        "by": "milter",
        "reason": "held",
        "recipients": ["bob@example.org", ODD, "carol+tag@example.org"],
        "final": ["bob@example.org", ODD, "carol+tag@example.org"],
    }


def test_changed_recipients_are_recorded_too():
    envelope = quarantined(["bob@example.org", "carol@example.org"])
    envelope.remove_recipient("bob@example.org")
    envelope.add_recipient_address("archive@example.org")
    add_quarantine_headers(envelope, "held")
    got = dict(fields(envelope))
    assert got["X-Bonzo-Quarantine-Recipients"] == "<bob@example.org>, <carol@example.org>"
    assert got["X-Bonzo-Quarantine-Final-Recipients"] == (
        "<carol@example.org>, <archive@example.org>"
    )
    everyone = quarantined(["bob@example.org"])
    everyone.remove_recipient("bob@example.org")
    add_quarantine_headers(everyone, "held")
    assert dict(fields(everyone))["X-Bonzo-Quarantine-Final-Recipients"] == "none"


def test_a_long_list_is_folded_and_unicode_kept_only_with_smtputf8():
    many = [f"user{n}@example.org" for n in range(40)]
    value = address_list(many)
    lines = value.split("\r\n\t")
    assert len(lines) > 5 and all(len(line) <= 78 for line in lines)
    assert re.findall(r"<([^>]*)>", value) == many
    assert address_list(["jöran@example.org"], utf8=True) == "<jöran@example.org>"
    assert address_list(["jöran@example.org"]) == "xtext:<j+C3+B6ran@example.org>"
    # Invisible or line-ending characters are never written as they are.
    assert address_list(['"a\u2028b"@example.org'], utf8=True).isascii()
    assert address_list(['"a\u202eb"@example.org'], utf8=True).isascii()
    assert address_list([]) == "none"

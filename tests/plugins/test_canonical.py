"""Policy bypass by spelling, end to end: the bundled plugins match and store
on the canonical form of addresses, through a real server.

A rule denying ``ceo@example.com`` must hold for ``ceo@ｅｘａｍｐｌｅ.ｃｏｍ``,
``ceo@example。com``, ``ceo@exa<soft hyphen>mple.com`` and
``"ceo"@example.com``, which the ``maildir`` plugin would store in
``example.com/ceo/``; an allowed spelling of another mailbox is stored in its
canonical folder.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
from bonzo_plugins.access import AccessPlugin
from bonzo_plugins.log import LogPlugin
from bonzo_plugins.maildir import MaildirPlugin
from bonzo_plugins.recipients import RecipientsPlugin
from plugin_testing import RunningServer, serve
from spellings import parametrize, spellings

BODY = b"Subject: spelled\r\n\r\nHello\r\n"
DENIED = (554, b"5.7.1 Access denied")


def plugins(tmp_path: Path) -> list[tuple[str, object]]:
    tables = {
        "access": (
            AccessPlugin(),
            {
                "rules": [
                    {"stage": "mail", "match": "*@spam.example", "action": "deny"},
                    {"stage": "rcpt", "match": "ceo@example.com", "action": "deny"},
                ]
            },
        ),
        "recipients": (RecipientsPlugin(), {"domains": ["example.com"]}),
        "maildir": (MaildirPlugin(), {"path": str(tmp_path / "Maildir"), "per_recipient": True}),
        "log": (LogPlugin(), {}),
    }
    for plugin, table in tables.values():
        plugin.bonzo_configure(config=table, app=None)
    return [(name, plugin) for name, (plugin, _) in tables.items()]


def utf8_client(server: RunningServer) -> smtplib.SMTP:
    """An smtplib client after EHLO that sends its commands in UTF-8 (the
    addresses are written by hand: smtplib's own quoting would unquote
    ``"ceo"`` itself)."""
    client = server.client()
    assert client.ehlo()[0] == 250 and client.has_extn("smtputf8")
    client.command_encoding = "utf-8"
    return client


def stored(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_a_recipient_deny_rule_holds_for_every_spelling(tmp_path):
    root = tmp_path / "Maildir"
    denied = ["ceo@example.com", "CEO@Example.com", *spellings("ceo", "example.com").values()]
    with serve(*plugins(tmp_path)) as server, utf8_client(server) as client:
        for spelling in denied:
            assert client.docmd("MAIL FROM:<a@example.org> SMTPUTF8")[0] == 250
            assert client.docmd(f"RCPT TO:<{spelling}>") == DENIED, spelling
            # The message still goes to the other recipient: not to ceo.
            assert client.docmd("RCPT TO:<alice@example.com>")[0] == 250
            assert client.data(BODY)[0] == 250
    assert not (root / "example.com" / "ceo").exists()
    assert [p.parts[:3] for p in stored(root)] == [("example.com", "alice", "new")] * len(denied)


def test_a_sender_deny_rule_holds_for_every_spelling(tmp_path):
    with serve(*plugins(tmp_path)) as server, utf8_client(server) as client:
        for spelling in ["joe@SPAM.example", *spellings("joe", "spam.example").values()]:
            assert client.docmd(f"MAIL FROM:<{spelling}> SMTPUTF8") == DENIED, spelling
        assert client.docmd("MAIL FROM:<joe@example.org> SMTPUTF8")[0] == 250
    assert stored(tmp_path / "Maildir") == []


@parametrize("spelling", "alice", "example.com")
def test_an_allowed_spelling_is_stored_in_the_canonical_folder(tmp_path, caplog, spelling):
    root = tmp_path / "Maildir"
    with serve(*plugins(tmp_path)) as server, utf8_client(server) as client:
        assert client.docmd("MAIL FROM:<a@exa\u00admple.org> SMTPUTF8")[0] == 250
        assert client.docmd(f"RCPT TO:<{spelling}>")[0] == 250
        assert client.data(BODY)[0] == 250
    (path,) = stored(root)
    assert path.parts[:3] == ("example.com", "alice", "new")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "bonzo.plugins.log"]
    assert " from=<a@example.org> sent_from=<a@exa\\xadmple.org> " in line
    assert " to=<alice@example.com> sent_to=<" in line


def test_a_rule_for_an_ipv4_literal_holds_for_its_ipv4_mapped_spelling(tmp_path):
    # [IPv6:::ffff:192.0.2.1] reaches the host 192.0.2.1; its canonical form
    # is [192.0.2.1], so a rule written for that literal denies it too.
    access = AccessPlugin()
    rule = {"stage": "rcpt", "match": r"re:.*@\[192\.0\.2\.1\]", "action": "deny"}
    access.bonzo_configure(config={"rules": [rule]}, app=None)
    recipients = RecipientsPlugin()
    recipients.bonzo_configure(config={"domains": ["[192.0.2.1]", "example.com"]}, app=None)
    with serve(("access", access), ("recipients", recipients)) as server:
        with server.client() as client:
            assert client.ehlo()[0] == 250
            assert client.mail("a@example.org")[0] == 250
            for spelling in (
                "x@[192.0.2.1]",
                "x@[IPv6:::ffff:192.0.2.1]",
                "x@[IPv6:::FFFF:c000:201]",
            ):
                assert client.docmd(f"RCPT TO:<{spelling}>") == DENIED, spelling
            assert client.rcpt("alice@example.com")[0] == 250


@pytest.mark.parametrize(
    "value",
    ["*.bank.example", "mx*.example.com", "a.example,b.example", "a b.example", "-x.example"],
)
def test_a_configured_domain_that_would_match_nothing_is_refused(value):
    # Each passed bonzo check and silently matched nothing (a TLS policy for
    # "*.bank.example" never applied).
    from bonzo_plugins._config import config_domain

    with pytest.raises(ValueError, match="not a domain name"):
        config_domain(value)


@pytest.mark.parametrize(
    "value", ["_dmarc.example.org", "x_y.example.org", "Example.ORG.", "[192.0.2.1]"]
)
def test_a_configured_domain_may_have_underscores(value):
    from bonzo_plugins._config import config_domain

    assert config_domain(value) == value.lower().rstrip(".")

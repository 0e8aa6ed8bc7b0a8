"""The ratelimit plugin with the in-process store (Redis: tests/interop/test_redis.py)."""

from __future__ import annotations

import asyncio
import base64
import logging
import smtplib
from types import SimpleNamespace
from typing import Any

import pytest
from bonzo_plugins.ratelimit import RateLimitPlugin
from plugin_testing import make_envelope, make_plugin_set, make_session, serve

from bonzo.address import Address
from bonzo.errors import SMTPError
from bonzo.hookspecs import Accept, hookimpl
from bonzo.settings import ListenerSettings
from bonzo.store import Hit, MemoryStore, Store, StoreError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def configure(table: dict[str, Any], store: Store | None = None) -> RateLimitPlugin:
    plugin = RateLimitPlugin()
    plugin.bonzo_configure(
        config=table, app=SimpleNamespace(store=MemoryStore() if store is None else store)
    )
    return plugin


def rule(key: str, stage: str, limit: int, window: Any = 60, **extra: Any) -> dict[str, Any]:
    return {"key": key, "stage": stage, "limit": limit, "window": window, **extra}


def recipients() -> tuple[str, Any]:
    from bonzo.hookspecs import hookimpl

    class Plugin:
        @hookimpl
        def bonzo_rcpt(self, session: Any, envelope: Any, mailbox: Any) -> Any:
            from bonzo.hookspecs import Accept

            return Accept()

    return ("recipients", Plugin())


def test_connections_over_the_limit_get_421_and_one_log_line(caplog):
    plugin = configure({"rules": [rule("client", "connect", 2, "1m")]})
    with serve(("ratelimit", plugin)) as server:
        for _ in range(2):
            with server.client() as client:
                assert client.noop()[0] == 250
        with pytest.raises(smtplib.SMTPConnectError) as info:
            server.client()
    # The rule's 451, sent as 421: only 421 or 554 may stand in for the greeting.
    assert info.value.smtp_code == 421
    assert b"4.7.1 Rate limit exceeded" in info.value.smtp_error
    lines = [r.getMessage() for r in caplog.records if r.name == "bonzo.plugins.ratelimit"]
    assert len(lines) == 1
    assert "client '127.0.0.1' over client-connect-2-60: more than 2 per 60s" in lines[0]


def test_recipients_per_domain_and_messages_per_sender():
    plugin = configure(
        {
            "reply": "451 4.7.1 Slow down",
            "rules": [
                rule("rcpt_domain", "rcpt", 2, reply="452 4.5.3 Too many for that domain"),
                rule("sender", "mail", 2, "1h"),
            ],
        }
    )
    with serve(("ratelimit", plugin), recipients()) as server, server.client() as client:
        client.ehlo()
        assert client.mail("a@example.net")[0] == 250
        codes = [client.rcpt(f"u{i}@example.com")[0] for i in range(3)]
        assert codes == [250, 250, 452]
        assert client.rcpt("u@example.org")[0] == 250  # another domain
        client.rset()
        assert client.mail("A@Example.NET")[0] == 250  # the same sender, spelled otherwise
        client.rset()
        code, text = client.mail("a@example.net")
        assert (code, text) == (451, b"4.7.1 Slow down")
        assert client.mail("b@example.net")[0] == 250


def test_ipv6_clients_count_by_their_64_and_ipv4_by_the_configured_prefix():
    plugin = configure({"ipv4_prefix": 24, "rules": [rule("client", "mail", 1)]})
    sender = Address.parse("a@example.net")

    async def go() -> list[bool]:
        out = []
        for ip in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:3::1", "192.0.2.1",
                   "192.0.2.200", "::ffff:192.0.2.7", "198.51.100.1"):  # fmt: skip
            try:
                await plugin.check("mail", make_session(ip), sender=sender)
                out.append(True)
            except SMTPError:
                out.append(False)
        return out

    assert asyncio.run(go()) == [True, False, True, True, False, False, True]


def test_user_limits_count_only_authenticated_sessions():
    plugin = configure({"rules": [rule("user", "mail", 1)]})
    sender = Address.parse("a@example.net")

    async def go() -> list[bool]:
        out = []
        for auth in (None, None, "alice", "alice", "bob"):
            try:
                await plugin.check("mail", make_session(auth=auth), sender=sender)
                out.append(True)
            except SMTPError:
                out.append(False)
        return out

    assert asyncio.run(go()) == [True, True, True, False, True]


def test_the_null_sender_is_one_sender():
    plugin = configure({"rules": [rule("sender", "rcpt", 1)]})
    envelope = make_envelope(mail_from="")

    async def go() -> None:
        await plugin.bonzo_rcpt(make_session(), envelope, Address.parse("x@example.com"))
        with pytest.raises(SMTPError):
            await plugin.bonzo_rcpt(make_session(), envelope, Address.parse("y@example.com"))

    asyncio.run(go())


def test_exempt_networks_are_not_counted():
    plugin = configure(
        {"exempt_networks": ["192.0.2.0/24"], "rules": [rule("client", "connect", 1)]}
    )

    async def go() -> None:
        for _ in range(5):
            await plugin.bonzo_connect(make_session("192.0.2.9"))
        await plugin.bonzo_connect(make_session("198.51.100.1"))
        with pytest.raises(SMTPError):
            await plugin.bonzo_connect(make_session("198.51.100.1"))

    asyncio.run(go())


def test_the_window_slides_with_the_store_clock():
    clock = Clock()
    plugin = configure({"rules": [rule("client", "connect", 2, "10s")]}, MemoryStore(clock=clock))

    async def attempt() -> bool:
        try:
            await plugin.bonzo_connect(make_session())
        except SMTPError:
            return False
        return True

    async def go() -> list[bool]:
        out = [await attempt(), await attempt(), await attempt()]
        clock.now += 25  # two windows on
        out.append(await attempt())
        return out

    assert asyncio.run(go()) == [True, True, False, True]


class BrokenStore(Store):
    async def hit(self, key: str, limit: int, window: float, *, group: str = "") -> Hit:
        raise StoreError("Redis at redis://127.0.0.1:1/0: counting failed: ConnectionError")


def test_no_rules_is_warned_about():
    assert configure({}).config_warnings == ["no rules configured: nothing is limited"]
    assert configure({"rules": [rule("client", "connect", 1)]}).config_warnings == []


def test_a_store_failure_fails_open_with_a_warning(caplog):
    plugin = configure({"rules": [rule("client", "connect", 1)]}, BrokenStore())

    async def go() -> None:
        for _ in range(3):
            await plugin.bonzo_connect(make_session())

    asyncio.run(go())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one line, not one per connection
    assert "counting failed" in warnings[0].getMessage()
    assert "allowed without limits" in warnings[0].getMessage()


def test_a_store_failure_can_tempfail_instead():
    plugin = configure(
        {"on_store_error": "tempfail", "rules": [rule("client", "connect", 1)]}, BrokenStore()
    )
    with pytest.raises(SMTPError) as info:
        asyncio.run(plugin.bonzo_connect(make_session()))
    assert info.value.status_code == 451
    assert "Redis" not in str(info.value.message)  # no local detail to the client


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rules": [rule("sender", "connect", 1)]}, "rules[0].stage: a sender limit applies"),
        ({"rules": [rule("user", "auth", 1)]}, "rules[0].stage: a user limit applies at mail"),
        ({"rules": [rule("sender", "auth", 1)]}, "rules[0].stage: a sender limit applies"),
        (
            {"rules": [rule("client", "auth", 1, reply="535 5.7.8 No")]},
            "rules[0].reply: an auth limit's reply must be 4xx",
        ),
        ({"rules": [rule("rcpt_domain", "mail", 1)]}, "rules[0].stage"),
        ({"rules": [rule("host", "mail", 1)]}, "rules[0].key: expected one of"),
        ({"rules": [rule("client", "mail", 0)]}, "rules[0].limit"),
        ({"rules": [rule("client", "mail", True)]}, "rules[0].limit"),
        ({"rules": [rule("client", "mail", 1, "soon")]}, "rules[0].window"),
        ({"rules": [rule("client", "mail", 1, 0)]}, "rules[0].window"),
        ({"rules": [rule("client", "mail", 1, 1e-300)]}, "rules[0].window: expected a number >="),
        ({"rules": [rule("client", "mail", 1, 0.0009)]}, "rules[0].window: expected a number >="),
        ({"rules": [{"key": "client", "stage": "mail", "limit": 1}]}, "rules[0].window: required"),
        ({"rules": [rule("client", "data", 1)]}, "rules[0].stage: expected one of 'connect'"),
        ({"rules": [rule("client", "mail", 1, "5y")]}, "rules[0].window: expected a duration"),
        ({"rules": [rule("client", "mail", 1, name="a\tb")]}, "rules[0].name: expected a short"),
        ({"rules": [rule("client", "mail", 10_000_001)]}, "rules[0].limit: expected an integer <="),
        ({"rules": ["client"]}, "rules[0]: expected a table, got 'client'"),
        ({"reply": "250 fine"}, "reply: the code must be 4xx or 5xx, got 250"),
        ({"rules": [rule("client", "mail", 1, colour=1)]}, "rules[0].colour: unknown key"),
        ({"rules": [rule("client", "mail", 1, reply="250 ok")]}, "rules[0].reply"),
        ({"rules": [rule("client", "mail", 1), rule("client", "mail", 1)]}, "rules[1].name"),
        ({"rules": {}}, "rules: expected an array"),
        ({"ipv6_prefix": 129}, "ipv6_prefix"),
        ({"ipv4_prefix": 0}, "ipv4_prefix"),
        ({"on_store_error": "reject"}, "on_store_error"),
        ({"exempt_networks": ["10.0.0.1/8"]}, "exempt_networks"),
        ({"colour": 1}, "colour: unknown key"),
    ],
)
def test_bad_configuration_is_refused(table, message):
    with pytest.raises(ValueError) as info:
        configure(table)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_rule_names_and_replies():
    plugin = configure(
        {
            "reply": "451 4.7.1 Slow down",
            "rules": [
                rule("client", "connect", 5, "1m"),
                rule("sender", "rcpt", 9, 60, name="senders", reply="550 5.7.1 No more"),
            ],
        }
    )
    first, second = plugin.rules["connect"][0], plugin.rules["rcpt"][0]
    assert (first.name, first.window, first.reply.text) == (
        "client-connect-5-60",
        60.0,
        "Slow down",
    )
    assert (second.name, second.reply.code, second.reply.text) == ("senders", 550, "No more")


class Passwords:
    """A credential checker that notes every password it is asked about."""

    def __init__(self) -> None:
        self.checked: list[str] = []

    @hookimpl
    def bonzo_auth(self, username: str, password: str) -> Any:
        self.checked.append(password)
        return Accept() if (username, password) == ("alice", "right") else None


def auth_line(client: smtplib.SMTP, password: str) -> tuple[int, bytes]:
    blob = base64.b64encode(f"\0alice\0{password}".encode()).decode()
    return client.docmd("AUTH", "PLAIN " + blob)


def test_auth_attempts_over_the_limit_get_450_before_any_password_check(caplog):
    """An ``auth`` rule counts AUTH attempts per client across sessions,
    right or wrong; over it the client gets Postfix's 450 4.7.1 — before
    any plugin checks the password (ratelimit runs first at AUTH, even
    listed last), so the right one is refused the same as a wrong one."""
    caplog.set_level(logging.INFO)
    plugin = configure({"reply": "554 5.7.1 Other limits", "rules": [rule("client", "auth", 3)]})
    passwords = Passwords()
    with serve(
        ("passwords", passwords),
        recipients(),
        ("ratelimit", plugin),
        listener=ListenerSettings(auth_plaintext=True),
        auth_failure_delay=0,
        max_auth_failures=2,
    ) as server:
        # Each session may fail twice (max_auth_failures); reconnecting
        # used to start the count over.
        with server.client() as client:
            client.ehlo()
            assert auth_line(client, "guess1")[0] == 535
            assert auth_line(client, "right")[0] == 235
        with server.client() as client:
            client.ehlo()
            assert auth_line(client, "guess2")[0] == 535
            code, text = auth_line(client, "right")
            assert (code, text) == (450, b"4.7.1 Too many AUTH commands, try again later")
            assert auth_line(client, "guess3")[0] == 450
            # A 4xx is not a failed password: the session stays open.
            assert client.noop()[0] == 250
    assert passwords.checked == ["guess1", "right", "guess2"]
    lines = [r.getMessage() for r in caplog.records if r.name == "bonzo.plugins.ratelimit"]
    assert len(lines) == 2
    assert "client '127.0.0.1' over client-auth-3-60: more than 3 per 60s" in lines[0]


def test_a_rate_limit_alone_does_not_offer_auth():
    """ratelimit implements bonzo_auth only to refuse: without a plugin that
    checks credentials, AUTH is still not offered."""
    plugin = configure({"rules": [rule("client", "auth", 3)]})
    with (
        serve(
            ("ratelimit", plugin), recipients(), listener=ListenerSettings(auth_plaintext=True)
        ) as server,
        server.client() as client,
    ):
        assert client.ehlo()[0] == 250
        assert not client.has_extn("auth")
    checker = make_plugin_set(("ratelimit", configure({})), ("passwords", Passwords()))
    assert checker.credential_checkers() == ["passwords"]
    assert checker.checks_credentials()
    assert not make_plugin_set(("ratelimit", configure({}))).checks_credentials()


def test_auth_rules_reply_and_exemptions():
    plugin = configure(
        {
            "exempt_networks": ["192.0.2.0/24"],
            "rules": [
                rule("client", "auth", 1, "1h"),
                rule("client", "auth", 5, "1d", name="daily", reply="421 4.7.0 Go away"),
            ],
        }
    )
    first, second = plugin.rules["auth"]
    assert (first.name, first.reply.code, first.reply.enhanced) == (
        "client-auth-1-3600",
        450,
        "4.7.1",
    )
    assert (second.reply.code, second.reply.text) == (421, "Go away")

    async def go() -> list[int]:
        codes = []
        for ip in ("192.0.2.9", "192.0.2.9", "198.51.100.1", "198.51.100.1"):
            try:
                await plugin.bonzo_auth(make_session(remote_ip=ip))
                codes.append(0)
            except SMTPError as exc:
                codes.append(exc.status_code)
        return codes

    assert asyncio.run(go()) == [0, 0, 0, 450]


def test_bonzo_check_does_not_take_ratelimit_for_a_credential_checker(tmp_path):
    """With ratelimit the only bonzo_auth plugin, a listener that requires
    AUTH is still one where nobody can authenticate: the warning stays."""
    from bonzo.app import MailApp
    from bonzo.config import parse_config

    text = (
        '[[listeners]]\nport = 2525\nrequire_auth = true\n[plugins]\nenabled = ["ratelimit", '
        '"recipients", "discard"]\n[plugins.recipients]\ndomains = ["example.com"]\n'
        '[[plugins.ratelimit.rules]]\nkey = "client"\nstage = "auth"\nlimit = 5\nwindow = 60\n'
    )
    warnings = MailApp(parse_config(text, "t.toml", tmp_path)).warnings()
    assert any("requires AUTH but no enabled plugin checks credentials" in w for w in warnings)
    assert not any("AUTH is not offered there" in w for w in warnings)
    # Nor does recipients count on authenticated clients to relay for.
    bare = text.replace('domains = ["example.com"]', "relay_authenticated = true")
    warnings = MailApp(parse_config(bare, "t.toml", tmp_path)).warnings()
    assert any("and no plugin that authenticates clients" in w for w in warnings), warnings

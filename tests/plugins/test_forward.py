"""The ``forward`` plugin end to end: smtplib → Bonzo with ``forward`` → a
real Bonzo downstream that refuses chosen senders and recipients. The
Postfix downstream is in ``tests/interop/test_forward_postfix.py``."""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trustme
from bonzo_plugins.forward import ForwardPlugin
from bonzo_plugins.forward.plugin import KEYS
from bonzo_plugins.passwd import add_user
from bonzo_plugins.recipients import RecipientsPlugin
from daemon_support import free_port
from e2e_support import RecordingPlugin

from bonzo import Accept
from bonzo.errors import PermanentError, TransientError
from bonzo.hooks import PluginSet
from bonzo.session import Envelope
from bonzo.settings import ListenerSettings, SMTPSettings
from bonzo.tls import CertificatePair, make_server_context

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: alice@example.org\r\nSubject: forwarded\r\n\r\nThrough the gateway.\r\n.dot\r\n"


class Downstream(RecordingPlugin):
    """Refuses by local part: sender ``blocked``/``busy`` at MAIL,
    recipient ``gone`` (550 5.1.1) and ``later`` (450 4.2.0) at RCPT,
    sender ``reject-data``/``defer-data`` after the message. Records RSETs."""

    def __init__(self) -> None:
        super().__init__()
        self.rsets = 0
        self.params: list[dict[str, Any]] = []

    def bonzo_mail(self, session: Any, envelope: Any, address: str, params: Any) -> Any:
        self.senders.append(address)
        self.params.append(dict(params))
        local = address.split("@")[0]
        if local == "blocked":
            raise PermanentError("Sender blocked here", 550, "5.7.1")
        if local == "busy":
            raise TransientError("Sender rate limited", 451, "4.7.1")

    def bonzo_rcpt(self, mailbox: Any) -> Any:  # type: ignore[override] # a hook, by name
        if mailbox.local == "gone":
            raise PermanentError("No such user", 550, "5.1.1")
        if mailbox.local == "later":
            raise TransientError("Greylisted, try later", 450, "4.2.0")
        return Accept()

    def bonzo_deliver(self, session: Any, envelope: Envelope) -> Any:
        local = envelope.sender.local
        if local == "reject-data":
            raise PermanentError("Content refused", 554, "5.7.0")
        if local == "defer-data":
            raise TransientError("Scanner unavailable", 451, "4.3.0")
        return super().bonzo_deliver(session, envelope)

    def bonzo_rset(self) -> None:
        self.rsets += 1


def app() -> SimpleNamespace:
    return SimpleNamespace(base_dir=None, settings=SimpleNamespace(hostname="gw.test"))


def forward(port: int, **table: Any) -> ForwardPlugin:
    plugin = ForwardPlugin()
    plugin.bonzo_configure(
        {"host": "127.0.0.1", "port": port, "command_timeout": 5, **table}, app()
    )
    return plugin


@pytest.fixture
def downstream(start_server):
    return start_server(plugin=Downstream(), hostname="mx.dest.test")


@pytest.fixture
def gateway(start_server, downstream):
    """``start_server`` for the front Bonzo with ``forward`` (and ``plugins``
    before it) to ``downstream``."""

    def start(*before: tuple[str, Any], listener: Any = None, **table: Any) -> Any:
        plugins = PluginSet(timeout=20.0)
        for name, plugin in before:
            plugins.register(plugin, name)
        plugin = forward(downstream.port, **table)
        plugins.register(plugin, "forward")
        options: dict[str, Any] = {"hostname": "gw.test"}
        if listener is not None:
            options["listener"] = listener
        server = start_server(plugins=plugins, **options)
        server.forward = plugin
        return server

    return start


def connect(server: Any) -> smtplib.SMTP:
    client = smtplib.SMTP(server.host, server.port, local_hostname="client.test", timeout=10)
    client.ehlo()
    return client


def wait_for(condition: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ----------------------------------------------------------------- verdicts
def test_an_accepted_message_arrives_byte_exact(gateway, downstream):
    front = gateway()
    with connect(front) as client:
        assert client.mail("alice@example.org", ["SIZE=%d" % len(MESSAGE)])[0] == 250
        assert client.rcpt("bob@dest.test")[0] == 250
        code, text = client.data(MESSAGE)
    assert code == 250 and b"forwarded: " in text, (code, text)
    (got,) = downstream.plugin.messages
    assert (got.mail_from, got.rcpt_tos) == ("alice@example.org", ["bob@dest.test"])
    # The gateway's own trace header, then the client's content octet for octet
    # (the dot-stuffed line too).
    assert got.body is not None and got.body.endswith(MESSAGE)
    head = got.body[: -len(MESSAGE)]
    assert head.startswith(b"Received: ") and b"by gw.test" in head
    assert head.count(b"Received: ") == 1
    assert got.helo == "gw.test"
    assert downstream.plugin.params[0]["SIZE"] == str(len(MESSAGE))


@pytest.mark.parametrize("offers_dsn", [True, False])
def test_a_success_notice_the_downstream_will_not_send_is_logged(start_server, caplog, offers_dsn):
    # RFC 3461 5.2.2 wants a "relayed" notice from the relay when the next
    # server lacks DSN; forward has no queue to send one: it says so.
    settings = SMTPSettings(hostname="mx.dest.test", dsn=offers_dsn)
    downstream = start_server(plugin=Downstream(), settings=settings)
    plugins = PluginSet(timeout=20.0)
    plugins.register(forward(downstream.port), "forward")
    front = start_server(plugins=plugins, hostname="gw.test")
    with connect(front) as client:
        assert client.has_extn("dsn")
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt("bob@dest.test", ["NOTIFY=SUCCESS,FAILURE"])[0] == 250
        assert client.rcpt("carol@dest.test", ["NOTIFY=FAILURE"])[0] == 250
        assert client.data(MESSAGE)[0] == 250
    assert len(downstream.plugin.messages) == 1
    lines = [r.getMessage() for r in caplog.records if "does not offer DSN" in r.getMessage()]
    if offers_dsn:
        assert lines == []
        return
    [line] = lines
    assert "no success notice for <bob@dest.test>, though the sender asked" in line
    assert "carol" not in line


def test_rcpt_verdicts_are_passed_back_per_recipient(gateway, downstream):
    front = gateway()
    with connect(front) as client:
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt("gone@dest.test") == (550, b"5.1.1 No such user")
        assert client.rcpt("later@dest.test") == (450, b"4.2.0 Greylisted, try later")
        assert client.rcpt("bob@dest.test")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    assert [m.rcpt_tos for m in downstream.plugin.messages] == [["bob@dest.test"]]


def test_mail_refusals_are_passed_back(gateway):
    front = gateway()
    with connect(front) as client:
        assert client.mail("blocked@example.org") == (550, b"5.7.1 Sender blocked here")
        assert client.mail("busy@example.org") == (451, b"4.7.1 Sender rate limited")
        # The same session goes on: the next transaction is forwarded.
        assert client.sendmail("alice@example.org", ["bob@dest.test"], MESSAGE) == {}


@pytest.mark.parametrize(
    "sender, reply",
    [
        ("reject-data@example.org", (554, b"5.7.0 Content refused")),
        ("defer-data@example.org", (451, b"4.3.0 Scanner unavailable")),
    ],
)
def test_end_of_data_verdicts_are_passed_back(gateway, downstream, sender, reply):
    front = gateway()
    with connect(front) as client:
        assert client.mail(sender)[0] == 250
        assert client.rcpt("bob@dest.test")[0] == 250
        assert client.data(MESSAGE) == reply
        # And the next message on the same session still goes through.
        assert client.sendmail("alice@example.org", ["carol@dest.test"], MESSAGE) == {}
    assert [m.rcpt_tos for m in downstream.plugin.messages] == [["carol@dest.test"]]


def test_a_downstream_that_is_down_gives_451_never_5xx(start_server):
    port = free_port()
    plugins = PluginSet(timeout=20.0)
    plugins.register(forward(port), "forward")
    front = start_server(plugins=plugins, hostname="gw.test")
    with connect(front) as client:
        code, text = client.mail("alice@example.org")
        assert (code, text) == (451, b"4.4.1 Downstream server unavailable, try again later")
        # Nothing of the failure (address, errno text) reaches the client.
        assert b"127.0.0.1" not in text and b"refused" not in text.lower()
        assert client.noop()[0] == 250


def test_a_downstream_that_stalls_gives_451(start_server):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    try:
        plugins = PluginSet(timeout=20.0)
        plugins.register(forward(listener.getsockname()[1], command_timeout=0.5), "forward")
        front = start_server(plugins=plugins, hostname="gw.test")
        with connect(front) as client:
            code, text = client.mail("alice@example.org")  # never greeted
            assert (code, text) == (451, b"4.4.2 Downstream server unavailable, try again later")
    finally:
        listener.close()


def test_a_tls_policy_not_met_gives_451(gateway, downstream):
    front = gateway(tls="require")  # the downstream offers no STARTTLS
    with connect(front) as client:
        code, text = client.mail("alice@example.org")
    assert (code, text) == (451, b"4.7.4 Downstream server unavailable, try again later")
    assert downstream.plugin.senders == []


class Authenticating(Downstream):
    def __init__(self) -> None:
        super().__init__()
        self.auth: list[Any] = []

    def bonzo_auth(self, username: str, password: str) -> Any:
        return Accept() if (username, password) == ("gw", "s3cret pass") else None

    def bonzo_deliver(self, session: Any, envelope: Envelope) -> Any:
        self.auth.append((session.auth, bool(session.tls)))
        return super().bonzo_deliver(session, envelope)


@pytest.mark.parametrize("password", ["s3cret pass", "wrong"])
def test_starttls_and_auth_downstream(start_server, password):
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    with leaf.cert_chain_pems[0].tempfile() as cert, leaf.private_key_pem.tempfile() as key:
        context = make_server_context(CertificatePair(cert, key))
    plugin = Authenticating()
    down = start_server(
        plugin=plugin, listener=ListenerSettings(tls_context=context), auth_failure_delay=0
    )
    plugins = PluginSet(timeout=20.0)
    table = {"tls": "require", "username": "gw", "password": password}
    plugins.register(forward(down.port, **table), "forward")
    front = start_server(plugins=plugins, hostname="gw.test")
    with connect(front) as client:
        if password == "wrong":
            # The downstream's 535 concerns the gateway, not the message: retry.
            assert client.mail("alice@example.org") == (
                451,
                b"4.4.1 Downstream server unavailable, try again later",
            )
            return
        assert client.sendmail("alice@example.org", ["bob@dest.test"], MESSAGE) == {}
    assert plugin.auth == [("gw", True)]


def test_a_downstream_that_is_this_server_is_a_loop(start_server):
    itself = start_server(plugin=Downstream(), hostname="gw.test")  # greets as gw.test
    plugins = PluginSet(timeout=20.0)
    plugins.register(forward(itself.port), "forward")
    front = start_server(plugins=plugins, hostname="gw.test")
    with connect(front) as client:
        assert client.mail("alice@example.org") == (
            451,
            b"4.4.6 Downstream server unavailable, try again later",
        )
    assert itself.plugin.senders == []


# ------------------------------------------------------- connection lifetime
def test_rset_resets_and_disconnect_quits_the_downstream(gateway, downstream):
    front = gateway()
    with connect(front) as client:
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt("bob@dest.test")[0] == 250
        assert client.rset()[0] == 250
        assert wait_for(lambda: downstream.plugin.rsets == 1)
        # One connection for the session: the next transaction reuses it.
        assert client.sendmail("alice@example.org", ["carol@dest.test"], MESSAGE) == {}
        assert len(downstream.plugin.connected) == 1
        assert downstream.plugin.disconnected == []
        assert front.forward.links
    assert wait_for(lambda: len(downstream.plugin.disconnected) == 1)
    assert [m.rcpt_tos for m in downstream.plugin.messages] == [["carol@dest.test"]]
    assert wait_for(lambda: not front.forward.links)


def test_a_dropped_client_closes_the_downstream(gateway, downstream):
    front = gateway()
    client = connect(front)
    assert client.mail("alice@example.org")[0] == 250
    assert wait_for(lambda: len(downstream.plugin.connected) == 1)
    client.close()  # no QUIT
    assert wait_for(lambda: len(downstream.plugin.disconnected) == 1)
    assert downstream.plugin.messages == []


def test_sessions_get_one_downstream_connection_each(gateway, downstream):
    front = gateway()
    clients = [connect(front) for _ in range(3)]
    try:
        for client in clients:
            assert client.mail("alice@example.org")[0] == 250
        assert wait_for(lambda: len(downstream.plugin.connected) == 3)
        assert len(front.forward.links) == 3
    finally:
        for client in clients:
            client.quit()
    assert wait_for(lambda: len(downstream.plugin.disconnected) == 3)


# ------------------------------------------------------- recipients at DATA
def test_without_check_rcpt_recipients_are_asked_at_the_end_and_lmtp_tells_each(
    gateway, downstream
):
    rcpts = RecipientsPlugin()
    rcpts.bonzo_configure({"domains": ["dest.test"]}, app())
    front = gateway(("recipients", rcpts), listener=ListenerSettings(protocol="lmtp"),
                    check_rcpt=False)  # fmt: skip
    with smtplib.LMTP(front.host, front.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("alice@example.org")[0] == 250
        for rcpt in ("bob@dest.test", "gone@dest.test", "later@dest.test"):
            assert client.rcpt(rcpt)[0] == 250  # not asked downstream yet
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(MESSAGE + b".\r\n")
        replies = [client.getreply() for _ in range(3)]
    assert [r[0] for r in replies] == [250, 550, 450]
    assert replies[1][1] == b"5.1.1 No such user"
    assert replies[2][1] == b"4.2.0 Greylisted, try later"
    assert [m.rcpt_tos for m in downstream.plugin.messages] == [["bob@dest.test"]]


def test_a_recipient_a_filter_refused_is_not_forwarded(gateway, downstream):
    class Filter:
        def bonzo_message(self, envelope: Envelope) -> None:
            for r in envelope.recipients:
                if r.local == "carol":
                    envelope.refuse_recipient(r, PermanentError("Not for carol", 550, "5.7.1"))

    front = gateway(("filter", Filter()))
    with connect(front) as client:
        refused = client.sendmail(
            "alice@example.org", ["bob@dest.test", "carol@dest.test"], MESSAGE
        )
        assert refused == {}  # SMTP: one reply, 250 as bob got it
    # Carol was accepted downstream at RCPT: the transaction was started again.
    assert [m.rcpt_tos for m in downstream.plugin.messages] == [["bob@dest.test"]]


def test_changes_filters_make_are_forwarded(gateway, downstream):
    """A filter changes the sender, removes one recipient, adds another and
    edits a header: the downstream gets the message as changed."""

    class Rewriter:
        def bonzo_message(self, envelope: Envelope) -> None:
            envelope.change_sender("srs0=x@example.org")
            envelope.remove_recipient("carol@dest.test")
            envelope.add_recipient_address("archive@dest.test")
            envelope.change_header("Subject", "[checked]")

    front = gateway(("rewriter", Rewriter()))
    with connect(front) as client:
        assert (
            client.sendmail("alice@example.org", ["bob@dest.test", "carol@dest.test"], MESSAGE)
            == {}
        )
    [got] = downstream.plugin.messages
    assert got.mail_from == "srs0=x@example.org"
    assert got.rcpt_tos == ["bob@dest.test", "archive@dest.test"]
    assert got.body is not None and b"Subject: [checked]\r\n" in got.body


def test_binarymime_is_not_offered(gateway):
    front = gateway()
    with connect(front) as client:
        assert "binarymime" not in client.esmtp_features


# ------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    "table, message",
    [
        ({}, "host: required"),
        ({"host": "127.0.0.1", "port": 0}, "port: expected an integer"),
        ({"host": "127.0.0.1", "tls": "maybe"}, "tls: expected one of"),
        ({"host": "127.0.0.1", "check_rcpt": "yes"}, "check_rcpt: expected true or false"),
        ({"host": "127.0.0.1", "command_timeout": 0}, r"command_timeout: expected a number >= "),
        ({"host": "127.0.0.1", "password": "p"}, "^username: required with password$"),
        ({"host": " "}, r"^host: expected a non-empty string, got ' '$"),
        ({"host": "127.0.0.1", "username": "u"}, "password: required with username"),
        ({"host": "127.0.0.1", "hots": "x"}, "hots: unknown key"),
        ({"host": "127.0.0.1", "tls_name": 5}, "tls_name: expected a non-empty string"),
        ({"host": "127.0.0.1", "source_address": "[::1"}, "^source_address: expected an IP"),
        ({"host": "127.0.0.1", "source_address": "mx.local"}, "^source_address: expected an IP"),
    ],
)
def test_bad_configuration_names_the_key(table, message):
    with pytest.raises(ValueError, match=message):
        ForwardPlugin().bonzo_configure(table, app())


def test_check_rcpt_false_is_warned_about():
    # A recipient the downstream refuses after the message is lost to the
    # client (only logged): bonzo check says so.
    plugin = ForwardPlugin()
    plugin.bonzo_configure({"host": "127.0.0.1"}, app())
    assert plugin.config_warnings == []
    plugin.bonzo_configure({"host": "127.0.0.1", "check_rcpt": False}, app())
    [warning] = plugin.config_warnings
    assert warning.startswith("check_rcpt = false: a recipient the downstream refuses after")
    assert "keep check_rcpt = true, or relay through the queue plugin" in warning


def test_config_file_errors_name_file_and_key_and_refuse_a_second_delivery_plugin(
    tmp_path, monkeypatch
):
    from bonzo.app import MailApp
    from bonzo.config import ConfigError, parse_config

    name = "bonzo_plugins.forward:ForwardPlugin"
    monkeypatch.setenv("FORWARD_SECRET", "s3cret")
    text = f"""
[plugins]
enabled = ["{name}"]
[plugins."{name}"]
host = "127.0.0.1"
username = "gw"
password = {{ "$env" = "FORWARD_SECRET" }}
"""
    app_ = MailApp(parse_config(text, "gw.toml", tmp_path))
    plugin = app_.plugins.get(name)
    assert isinstance(plugin, ForwardPlugin)
    assert plugin.settings is not None and plugin.settings.password == "s3cret"
    bad = text.replace('host = "127.0.0.1"', 'host = "127.0.0.1"\nport = "25"')
    with pytest.raises(ConfigError, match=r"gw\.toml.*forward.*port: expected an integer"):
        MailApp(parse_config(bad, "gw.toml", tmp_path))
    both = text.replace(
        f'enabled = ["{name}"]', f'enabled = ["bonzo_plugins.queue:QueuePlugin", "{name}"]'
    )
    with pytest.raises(ConfigError, match=r"must be the only delivery plugin.*queue"):
        MailApp(parse_config(both, "gw.toml", tmp_path))


# ------------------------------------------------------------ documentation
ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_example_configures():
    text = (ROOT / "plugins" / "forward" / "README.rst").read_text("utf-8")
    blocks = re.findall(r"^\.\. code-block:: toml\n\n((?:    .*\n|\n)+)", text, re.M)
    assert blocks
    for block in blocks:
        table = tomllib.loads(textwrap.dedent(block))["plugins"]["forward"]
        ForwardPlugin().bonzo_configure(table, app())


def test_the_example_configuration_shows_every_key():
    text = (ROOT / "bonzo.toml.example").read_text("utf-8")
    start = text.index("# [plugins.forward]")
    block = text[start : text.index("#\n", start)]
    table = tomllib.loads("\n".join(line[2:] for line in block.splitlines()))
    assert sorted(table["plugins"]["forward"]) == sorted(KEYS)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    entry = pyproject["project"]["entry-points"]["bonzo.plugins"]["forward"]
    assert entry == "bonzo_plugins.forward:ForwardPlugin"


# ------------------------------------------------ what a review found (forward)
class RefusesLater(Downstream):
    """Accepts ``full@`` on the first connection only (a mailbox that filled
    meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.connections = 0

    def bonzo_connect(self, session: Any) -> Any:
        self.connections += 1
        return super().bonzo_connect(session)

    def bonzo_rcpt(self, mailbox: Any) -> Any:  # type: ignore[override] # a hook, by name
        if mailbox.local == "full" and self.connections > 1:
            raise PermanentError("Mailbox full", 552, "5.2.2")
        return super().bonzo_rcpt(mailbox)


def test_a_recipient_accepted_at_rcpt_and_refused_after_a_reconnect_defers_the_message(
    start_server, caplog
):
    """The downstream closes the idle link while the client is slow to send
    DATA; in the new transaction it refuses a recipient the client was
    already told 250 for: the message is deferred, never answered 250
    without that recipient."""
    down = start_server(plugin=RefusesLater(), hostname="mx.dest.test", idle_timeout=0.5)
    plugins = PluginSet(timeout=20.0)
    plugins.register(forward(down.port), "forward")
    front = start_server(plugins=plugins, hostname="gw.test")
    with connect(front) as client:
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt("full@dest.test")[0] == 250
        assert client.rcpt("ok@dest.test")[0] == 250
        time.sleep(1.0)  # the downstream drops the idle link
        code, text = client.data(MESSAGE)
    assert (code, text.split()[0]) == (451, b"4.4.2"), (code, text)
    assert down.plugin.messages == []
    assert "full@dest.test, accepted at RCPT, refused in a new downstream transaction" in (
        caplog.text
    )


class WantsTLS(Downstream):
    def bonzo_mail(self, session: Any, envelope: Any, address: str, params: Any) -> Any:
        raise PermanentError("Must issue a STARTTLS command first", 530, "5.7.0")


def test_a_downstream_that_wants_tls_or_auth_of_the_gateway_is_a_4xx(start_server):
    down = start_server(plugin=WantsTLS(), hostname="mx.dest.test")
    plugins = PluginSet(timeout=20.0)
    plugins.register(forward(down.port, tls="none"), "forward")
    front = start_server(plugins=plugins, hostname="gw.test")
    with connect(front) as client:
        code, text = client.mail("alice@example.org")
    assert (code, text.split()[0]) == (451, b"4.4.1"), (code, text)


def test_with_check_rcpt_a_plugin_after_forward_is_reported(tmp_path):
    from bonzo.app import MailApp
    from bonzo.config import parse_config

    text = textwrap.dedent(
        """\
        [[listeners]]
        port = 0
        [plugins]
        enabled = ["forward", "recipients"]
        [plugins.forward]
        host = "127.0.0.1"
        [plugins.recipients]
        domains = ["dest.test"]
        """
    )
    warnings = MailApp(parse_config(text, source="bonzo.toml", base_dir=tmp_path)).warnings()
    assert any(
        "the bonzo_rcpt of 'recipients' never runs: 'forward' decides every bonzo_rcpt" in w
        for w in warnings
    ), warnings


OPEN_RELAY = "username is set, check_rcpt = true, no plugin before forward decides recipients"


@pytest.mark.parametrize(
    ("enabled", "extra", "warned"),
    [
        (["forward"], "", True),
        # The listener's own clients must authenticate: no open relay.
        (["passwd", "forward"], "require_auth = true\nauth_plaintext = true\n", False),
        # This server decides recipients before the downstream does.
        (["access", "forward"], "", False),
        (["recipients", "forward"], "", False),
        # After forward, a plugin is never asked about a recipient.
        (["forward", "access"], "", True),
    ],
    ids=["alone", "require_auth", "access_before", "recipients_before", "access_after"],
)
def test_a_gateway_with_credentials_and_no_local_recipient_decision_is_warned_about(
    tmp_path, enabled, extra, warned
):
    """The downstream sees the gateway authenticated and relays anywhere:
    any client of the gateway could send to any domain. bonzo check says so."""
    from bonzo.app import MailApp
    from bonzo.config import parse_config

    add_user(tmp_path / "passwd", "alice", "pw")
    names = ", ".join(f'"{name}"' for name in enabled)
    text = textwrap.dedent(
        f"""\
        [[listeners]]
        port = 0
        {extra}
        [plugins]
        enabled = [{names}]
        [plugins.forward]
        host = "127.0.0.1"
        username = "gateway"
        password = "gw-secret"
        [plugins.recipients]
        domains = ["dest.test"]
        [plugins.passwd]
        file = "passwd"
        [[plugins.access.rules]]
        stage = "rcpt"
        match = "*@dest.test"
        action = "allow"
        """
    )
    for name in ("recipients", "passwd", "access"):
        if name not in enabled:
            text = _without_table(text, name)
    warnings = MailApp(parse_config(text, source="bonzo.toml", base_dir=tmp_path)).warnings()
    found = [w for w in warnings if OPEN_RELAY in w]
    assert bool(found) is warned, warnings
    if warned:
        assert found[0].startswith("plugins.forward: ")
        assert "set require_auth = true on every listener" in found[0]
    # Without credentials the downstream decides as for anyone: no warning.
    plain = text.replace('username = "gateway"\npassword = "gw-secret"\n', "")
    warnings = MailApp(parse_config(plain, source="bonzo.toml", base_dir=tmp_path)).warnings()
    assert not [w for w in warnings if OPEN_RELAY in w]


def _without_table(text: str, name: str) -> str:
    """``text`` without the ``[plugins.NAME]`` / ``[[plugins.NAME.rules]]`` table."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("["):
            skipping = line.strip("[]\n").startswith(f"plugins.{name}")
        if not skipping:
            out.append(line)
    return "".join(out)


def test_a_message_over_the_downstreams_size_is_refused_before_data_declared_or_not(
    start_server,
):
    down = start_server(plugin=Downstream(), hostname="mx.dest.test", max_message_size=1000)
    plugins = PluginSet(timeout=20.0)
    plugins.register(forward(down.port), "forward")
    front = start_server(plugins=plugins, hostname="gw.test")
    big = MESSAGE + b"x" * 1200 + b"\r\n"
    with connect(front) as client:
        assert client.mail("alice@example.org")[0] == 250  # no SIZE= declared
        assert client.rcpt("bob@dest.test")[0] == 250
        code, text = client.data(big)
    assert (code, text.split()[0]) == (552, b"5.3.4"), (code, text)
    assert b"exceeds the downstream server's limit 1000" in text
    assert down.plugin.messages == []


class Scripted:
    """A downstream on 127.0.0.1 that says what it is told, in a thread (the
    test's client is blocking): ``greeting``, then ``replies[verb]`` or
    ``250`` to each command (EHLO gets ``ehlo``). Every socket wait is
    bounded; :meth:`close` ends it."""

    def __init__(self, greeting: bytes, ehlo: bytes, replies: dict[str, bytes]) -> None:
        self.greeting, self.ehlo, self.replies = greeting, ehlo, replies
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.commands: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                conn, _ = self.listener.accept()
                with conn, conn.makefile("rb") as lines:
                    conn.settimeout(10)
                    conn.sendall(self.greeting)
                    for line in lines:
                        verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
                        self.commands.append(verb)
                        if verb == "QUIT":
                            conn.sendall(b"221 bye\r\n")
                            break
                        default = self.ehlo if verb == "EHLO" else b"250 ok\r\n"
                        conn.sendall(self.replies.get(verb, default))
        except OSError:
            pass  # closed, or timed out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.listener.close()
        self.thread.join(15)


SECRET_EHLO = b"250-fake.test\r\n250-STARTTLS\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n"
CREDENTIALS = {"tls": "none", "username": "gw", "password": "pw", "auth_plaintext": True}


@pytest.mark.parametrize(
    ("greeting", "replies", "table"),
    [
        (b"450 4.3.2 internal: backend db07.corp.example down\r\n", {}, {}),
        (b"554 5.7.1 internal: db07.corp.example says no\r\n", {}, {}),
        (b"220 fake.test\r\n",
         {"STARTTLS": b"454 4.7.0 TLS not available: /etc/ssl/internal.pem unreadable\r\n"},
         {"tls": "require"}),
        (b"220 fake.test\r\n",
         {"AUTH": b"454 4.7.0 Temporary failure: ldap://internal.example timeout\r\n"},
         CREDENTIALS),
        (b"220 fake.test\r\n", {"AUTH": b"334 internal.example-challenge\r\n"}, CREDENTIALS),
    ],
    ids=["greeting-450", "greeting-554", "starttls-454", "auth-454", "auth-334"],
)  # fmt: skip
def test_a_refusal_during_setup_gives_the_fixed_451_and_logs_the_detail(
    start_server, caplog, greeting, replies, table
):
    down = Scripted(greeting, SECRET_EHLO, replies)
    try:
        plugins = PluginSet(timeout=20.0)
        plugins.register(forward(down.port, **table), "forward")
        front = start_server(plugins=plugins, hostname="gw.test")
        with connect(front) as client:
            code, text = client.mail("alice@example.org")
    finally:
        down.close()
    assert code == 451 and text.endswith(b" Downstream server unavailable, try again later")
    assert text.split()[0] in (b"4.4.1", b"4.5.0"), text
    assert b"internal" not in text
    # The detail is for the operator only.
    assert "internal" in caplog.text


def test_the_first_rcpt_after_the_downstream_dropped_an_idle_transaction_reconnects(
    start_server,
):
    """The downstream times the link out between the client's MAIL and its
    first RCPT: nothing of the transaction was accepted there, so it is
    started again on a new connection, and that recipient is asked."""
    down = start_server(plugin=Downstream(), hostname="mx.dest.test", idle_timeout=0.5)
    plugins = PluginSet(timeout=20.0)
    plugins.register(forward(down.port), "forward")
    front = start_server(plugins=plugins, hostname="gw.test")
    with connect(front) as client:
        assert client.mail("alice@example.org")[0] == 250
        time.sleep(1.0)  # the downstream drops the idle link (421)
        assert client.rcpt("one@dest.test")[0] == 250
        assert client.rcpt("two@dest.test")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    [message] = down.plugin.messages
    assert message.rcpt_tos == ["one@dest.test", "two@dest.test"]

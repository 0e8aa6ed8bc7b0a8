"""The plugin examples of the documentation (``docs/snippets/``) do what the docs say.

Each snippet is imported as it is shown and run against a real server on
127.0.0.1: a :class:`~bonzo.hooks.PluginSet` with the snippet's plugin (and
an in-memory owner of RCPT and delivery after it) behind an
:class:`~bonzo.server.SMTPServer` with a :class:`~bonzo.hooks.PluginSet`,
or a whole :class:`~bonzo.app.MailApp` for the hooks only the application
calls (configure, startup, shutdown). The server runs on an event loop in a
thread of its own; the test talks to it with :mod:`smtplib`.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import logging
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bonzo_plugins.queue.routes import DiscardTransport, Outcome, RouteTable
from bonzo_plugins.queue.runner import Runner, RunnerSettings
from bonzo_plugins.queue.spool import GroupSync, Spool
from daemon_support import daemon_env, daemons, free_port
from e2e_support import RawClient
from tornado.testing import bind_unused_port

from bonzo import Accept
from bonzo.address import Address
from bonzo.app import MailApp
from bonzo.auth import hash_password
from bonzo.config import ConfigError, parse_config
from bonzo.hooks import PluginSet
from bonzo.server import SMTPServer
from bonzo.session import Envelope
from bonzo.settings import ListenerSettings, SMTPSettings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SNIPPETS = DOCS / "snippets"
DEADLINE = 10.0
# How a plugin's fault is logged: the plugin's name and the hook, in some order.
FAILURE = r"(?i)\bplugin '%s'.*\b%s\b.*: "
MESSAGE = "From: alice@example.net\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture(autouse=True)
def snippets_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SNIPPETS))


def snippet(name: str) -> Any:
    """Import ``docs/snippets/<name>.py`` afresh."""
    sys.modules.pop(name, None)
    return importlib.import_module(name)


class Owner:
    """Accepts every recipient and keeps every message, after the snippet's plugin."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []

    def bonzo_rcpt(self, address):
        return Accept()

    def bonzo_deliver(self, envelope):
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return Accept()


class Loop:
    """An asyncio event loop running in a thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="docs-snippet-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE)

    def close(self) -> None:
        async def drain() -> None:
            # Let the sessions finish their cleanup (disconnect hooks).
            for _ in range(200):
                if not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                    return
                await asyncio.sleep(0.01)

        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()


class Served:
    """Plugins behind a real SMTPServer on 127.0.0.1."""

    def __init__(self, *plugins: tuple[str, object], timeout: float = 5.0, **listener: Any) -> None:
        self.plugins = PluginSet(timeout=timeout)
        for name, plugin in plugins:
            self.plugins.register(plugin, name)
        self.loop = Loop()

        async def start() -> None:
            sock, self.port = bind_unused_port()
            self.server = SMTPServer(
                plugins=self.plugins,
                settings=SMTPSettings(hostname="mx.test", auth_failure_delay=0.1),
                listener=ListenerSettings(**listener),
            )
            self.server.add_sockets([sock])

        self.loop.run(start())

    def smtp(self, helo: str = "client.example") -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname=helo, timeout=DEADLINE)

    def close(self) -> None:
        self.loop.run(self.server.shutdown(1.0))
        self.loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    running: list[Served] = []

    def start(*plugins: tuple[str, object], **kwargs: Any) -> Served:
        served = Served(*plugins, **kwargs)
        running.append(served)
        return served

    yield start
    for served in running:
        served.close()


def reply(result: tuple[int, bytes]) -> str:
    code, text = result
    return f"{code} {text.decode()}"


# ------------------------------------------------------------- quickstart
def test_first_plugin(serve: Callable[..., Served]) -> None:
    owner = Owner()
    srv = serve(("first", snippet("first_plugin").FirstPlugin()), ("owner", owner))
    with srv.smtp() as client:
        client.ehlo()
        client.mail("alice@example.net")
        for spelling in ("noreply@example.com", '"noreply"@example.com', "NoReply@EXAMPLE.com"):
            assert reply(client.rcpt(spelling)) == "550 5.1.1 This address does not receive mail"
        assert client.rcpt("bob@example.com")[0] == 250
        client.data(MESSAGE)
    ((_, rcpts, content),) = owner.messages
    assert rcpts == ["bob@example.com"]
    assert b"X-First-Plugin: seen from 127.0.0.1\r\n" in content


def test_first_plugin_configuration(tmp_path: Path) -> None:
    """The quickstart's bonzo.toml loads (with the bundled plugins installed)."""
    pytest.importorskip("bonzo_plugins", reason="the bundled plugins are not installed")
    text = (SNIPPETS / "first_plugin.toml").read_text()
    config = parse_config(text, source="bonzo.toml", base_dir=SNIPPETS)
    assert config.plugins.enabled == ["first_plugin:FirstPlugin", "recipients", "maildir"]
    app = MailApp(config)
    assert app.plugins.hooks_of("first_plugin:FirstPlugin") == ["bonzo_message", "bonzo_rcpt"]
    assert app.warnings() == []


# -------------------------------------------------------------- lifecycle
def mail_app(tmp_path: Path, enabled: str, table: str, *extra: Any) -> MailApp:
    """A MailApp on an unused port whose only configured plugin is a snippet,
    named by dotted path and found through ``[plugins] paths``."""
    text = f"""
[[listeners]]
address = "127.0.0.1"
port = 0

[plugins]
paths = [{str(SNIPPETS)!r}]
enabled = [{enabled!r}]

[plugins.{enabled!r}]
{table}
"""
    return MailApp(parse_config(text, source="bonzo.toml", base_dir=tmp_path), extra)


def test_configure_reads_and_checks_its_table(tmp_path: Path) -> None:
    app = mail_app(tmp_path, "hook_configure:SenderBlocklist", 'senders = ["Spammer@example.net"]')
    assert app.plugins.get("hook_configure:SenderBlocklist").senders == {"spammer@example.net"}
    with pytest.raises(ConfigError) as info:
        mail_app(tmp_path, "hook_configure:SenderBlocklist", 'senders = "spammer@example.net"')
    assert str(info.value) == (
        "bonzo.toml: plugins.hook_configure:SenderBlocklist: senders: expected a list of "
        "addresses, got 'spammer@example.net'"
    )
    with pytest.raises(ConfigError, match=r": plugins\.[^ ]+: sender: unknown key"):
        mail_app(tmp_path, "hook_configure:SenderBlocklist", "sender = []")
    with pytest.raises(ConfigError) as info:
        mail_app(tmp_path, "hook_configure:SenderBlocklist", 'senders = ["a@example.net", "bob"]')
    assert str(info.value).endswith("senders[1]: not a valid address: 'bob'")


def test_configure_plugin_refuses_listed_senders(serve: Callable[..., Served]) -> None:
    plugin = snippet("hook_configure").SenderBlocklist()
    plugin.bonzo_configure(config={"senders": ["spammer@example.net"]})
    srv = serve(("blocklist", plugin), ("owner", Owner()))
    with srv.smtp() as client:
        client.ehlo()
        assert reply(client.mail("SPAMMER@example.net")) == "550 5.7.1 Sender refused"
        # No spelling of the address gets past: full-width letters, quoting.
        client.rset()
        assert client.mail('"spammer"@ｅｘａｍｐｌｅ.net', ["SMTPUTF8"])[0] == 550
        client.rset()
        assert client.mail("alice@example.net")[0] == 250


def test_startup_and_shutdown_open_and_close_the_journal(tmp_path: Path) -> None:
    owner = Owner()
    app = mail_app(tmp_path, "hook_startup:Journal", 'path = "journal.log"', ("owner", owner))
    journal = app.plugins.get("hook_startup:Journal")
    assert journal.path == tmp_path / "journal.log" and journal.file is None
    loop = Loop()
    try:
        loop.run(app.start())
        assert not journal.file.closed
        ((_, port),) = app.addresses
        with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
            client.sendmail("alice@example.net", ["bob@example.org", "carol@example.org"], MESSAGE)
        loop.run(app.plugins.call_observers("bonzo_reload", app))
        loop.run(app.stop())
    finally:
        loop.close()
    assert journal.file.closed
    assert re.fullmatch(
        r"\w+ from=<alice@example\.net> to=2\n# configuration reloaded\n", journal.path.read_text()
    )


def test_a_startup_failure_stops_the_server(tmp_path: Path) -> None:
    app = mail_app(tmp_path, "hook_startup:Journal", 'path = "no/such/directory/journal.log"')
    sockets = app.bind()  # as bonzo serve does; start() does not close them when it fails
    loop = Loop()
    try:
        with pytest.raises(Exception, match="Journal.*failed in bonzo_startup"):
            loop.run(app.start())
        assert app.server is None
    finally:
        loop.close()
        for sock in sockets:
            sock.close()


# ------------------------------------------------------------- connection
def test_connect_refuses_blocked_networks(serve: Callable[..., Served]) -> None:
    gate = snippet("hook_connect").NetworkGate
    srv = serve(("gate", gate(blocked=["127.0.0.0/8"])))
    with pytest.raises(smtplib.SMTPConnectError) as info:
        srv.smtp()
    assert (info.value.smtp_code, info.value.smtp_error) == (
        554,
        b"5.7.1 Your network is not welcome here",
    )
    other = serve(("gate", gate()))
    client = smtplib.SMTP(timeout=DEADLINE)
    assert client.connect("127.0.0.1", other.port) == (220, b"mx.test ESMTP")
    client.quit()


def test_helo_needs_a_fully_qualified_name(serve: Callable[..., Served]) -> None:
    srv = serve(("helo", snippet("hook_helo").RequireFqdnHelo()))
    with srv.smtp(helo="localhost") as client:
        # Enhanced status codes even before EHLO succeeds (RFC 2034 4).
        assert reply(client.ehlo()) == (
            "504 5.5.2 Helo command rejected: need fully-qualified hostname"
        )
        assert client.helo("[127.0.0.1]")[0] == 250
        assert client.ehlo("mail.example.net")[0] == 250


def test_ehlo_keywords_and_unknown_command(serve: Callable[..., Served]) -> None:
    srv = serve(("clock", snippet("hook_unknown_command").ClockExtension()))
    with srv.smtp() as client:
        assert reply(client.docmd("XCLOCK")) == "503 5.5.1 Say EHLO first"
        code, text = client.ehlo()
        keywords = text.decode().splitlines()[1:]
        assert "XCLOCK" in keywords and "HELP" not in keywords and "PIPELINING" in keywords
        code, text = client.docmd("XCLOCK")
        assert code == 250
        assert re.fullmatch(rb"2\.0\.0 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", text)
        assert reply(client.docmd("XCLOCK", "now")) == "501 5.5.4 Syntax: XCLOCK"
        assert reply(client.docmd("XFROB")) == "500 5.5.2 Error: command not recognized"


def test_auth_checks_the_users_hashes(serve: Callable[..., Served]) -> None:
    users = snippet("hook_auth").StaticUsers({"alice": hash_password("correct horse")})

    class Who:
        def bonzo_mail(self, session):
            return f"Ok, {session.auth}"

    # AUTH is offered only on an encrypted connection unless the listener allows
    # plaintext AUTH, as here for the test.
    srv = serve(("users", users), ("who", Who()), auth_plaintext=True)
    with srv.smtp() as client:
        client.ehlo()
        assert client.has_extn("auth") and "PLAIN" in client.esmtp_features["auth"]
        for user, password in (("alice", "wrong"), ("mallory", "correct horse")):
            client.user, client.password = user, password
            with pytest.raises(smtplib.SMTPAuthenticationError) as info:
                client.auth("PLAIN", client.auth_plain)
            assert info.value.smtp_code == 535
            assert info.value.smtp_error == b"5.7.8 Authentication credentials invalid"
        assert client.login("alice", "correct horse")[0] == 235
        assert reply(client.mail("alice@example.org")) == "250 2.1.0 Ok, alice"
    plain = serve(("users", users))
    with plain.smtp() as client:
        client.ehlo()
        assert not client.has_extn("auth")


# ------------------------------------------------------------ transaction
def test_mail_refuses_listed_domains_but_never_bounces(serve: Callable[..., Served]) -> None:
    owner = Owner()

    class Peek:
        def bonzo_data(self, envelope):
            self.stash = dict(envelope.stash)

    peek = Peek()
    srv = serve(("senders", snippet("hook_mail").SenderDomains()), ("peek", peek), ("owner", owner))
    with srv.smtp() as client:
        client.ehlo()
        assert reply(client.mail("joe@SPAM.example")) == "550 5.7.1 Sender domain refused"
        assert client.mail("", ["SIZE=100"])[0] == 250
        client.rset()
        assert client.mail("alice@example.net", ["SIZE=200"])[0] == 250
        client.rcpt("bob@example.org")
        client.data(MESSAGE)
    assert peek.stash == {"sender_domains": {"declared_size": "200"}}
    assert [m[0] for m in owner.messages] == ["alice@example.net"]


def test_rcpt_owns_its_mailboxes(serve: Callable[..., Served]) -> None:
    delivered: list[list[str]] = []

    class Deliver:
        def bonzo_deliver(self, envelope):
            delivered.append(list(envelope.rcpt_tos))
            return Accept()

    srv = serve(("mailboxes", snippet("hook_rcpt").LocalMailboxes()), ("deliver", Deliver()))
    with srv.smtp() as client:
        client.ehlo()
        client.mail("sender@example.net")
        assert client.rcpt("Alice@example.org")[0] == 250
        assert client.rcpt("postmaster@example.org")[0] == 250
        assert reply(client.rcpt("carol@example.org")) == "550 5.1.1 User unknown"
        assert reply(client.rcpt("alice@example.com")) == ("550 5.7.1 Recipient address rejected")
        client.data(MESSAGE)
    assert delivered == [["Alice@example.org", "postmaster@example.org"]]


def test_data_refuses_bounces_to_several_recipients(serve: Callable[..., Served]) -> None:
    owner = Owner()
    srv = serve(("bounces", snippet("hook_data").OneRecipientBounces()), ("owner", owner))
    with srv.smtp() as client:
        client.ehlo()
        client.mail("")
        client.rcpt("a@example.org")
        client.rcpt("b@example.org")
        assert reply(client.docmd("DATA")) == "550 5.7.1 A bounce has exactly one recipient"
        client.rset()
        client.sendmail("", ["a@example.org"], MESSAGE)
        client.sendmail("alice@example.net", ["a@example.org", "b@example.org"], MESSAGE)
    assert len(owner.messages) == 2


def test_message_filter(serve: Callable[..., Served]) -> None:
    owner = Owner()
    srv = serve(("from", snippet("hook_message").RequireFrom()), ("owner", owner))
    with srv.smtp() as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@example.net", ["b@example.org"], "Subject: no From\r\n\r\nHi\r\n")
        assert (info.value.smtp_code, info.value.smtp_error) == (
            550,
            b"5.6.0 Message has no From: header",
        )
        client.sendmail("a@example.net", ["b@example.org"], MESSAGE)
    ((_, _, content),) = owner.messages
    assert content.startswith(b"Received: ")
    assert b"\r\nX-From-Checked: yes\r\nFrom: alice@example.net\r\n" in content


def test_quarantine_and_discard(serve: Callable[..., Served], tmp_path: Path) -> None:
    module = snippet("hook_quarantine")

    class Scanner:
        def bonzo_message(self, envelope: Any) -> None:
            if b"EICAR" in envelope.body:
                envelope.results.add("clamav", "fail", "Eicar-Test-Signature")

    owner = Owner()
    srv = serve(
        ("scanner", Scanner()),
        ("suspicious", module.Suspicious()),
        ("owner", owner),
        ("quarantine", module.QuarantineDirectory(tmp_path)),
    )
    with srv.smtp() as client:
        client.ehlo()
        wire = "Subject: URGENT wire transfer\r\n\r\nPay now.\r\n"
        assert client.sendmail("a@example.net", ["b@example.org"], wire) == {}
        virus = "Subject: hi\r\n\r\nEICAR\r\n"
        assert client.sendmail("a@example.net", ["b@example.org"], virus) == {}
        assert client.sendmail("a@example.net", ["b@example.org"], MESSAGE) == {}
    [kept] = tmp_path.iterdir()
    assert kept.read_bytes().startswith(b"X-Quarantine-Reason: wire transfer subject\r\n")
    assert [content for _, _, content in owner.messages if b"EICAR" in content] == []
    assert len(owner.messages) == 1  # only the ordinary message was delivered


def test_deliver_stores_durably_and_fails_closed(
    serve: Callable[..., Served], tmp_path: Path, log_watch: Any
) -> None:
    log_watch.allow(FAILURE % ("directory", "bonzo_deliver"))

    class Recipients:
        def bonzo_rcpt(self):
            return Accept()

    deliver = snippet("hook_deliver").DirectoryDelivery
    srv = serve(("recipients", Recipients()), ("directory", deliver(tmp_path)))
    with srv.smtp() as client:
        client.ehlo()
        client.mail("alice@example.net")
        client.rcpt("bob@example.org")
        code, text = client.data(MESSAGE)
    assert code == 250
    (stored,) = tmp_path.iterdir()
    assert text == f"2.0.0 Ok: stored as {stored.name}".encode()
    assert stored.read_bytes().startswith(b"Received: ")
    assert stored.read_bytes().endswith(MESSAGE.encode())

    broken = serve(("recipients", Recipients()), ("directory", deliver(tmp_path / "missing")))
    with broken.smtp() as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("alice@example.net", ["bob@example.org"], MESSAGE)
    assert (info.value.smtp_code, info.value.smtp_error) == (451, b"4.3.0 Internal confusion")
    assert log_watch.matching(FAILURE % ("directory", "bonzo_deliver") + ".*No such file")
    assert list(tmp_path.iterdir()) == [stored]


def test_deliver_answers_452_when_the_disk_is_full(
    serve: Callable[..., Served], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = snippet("hook_deliver")

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    class Recipients:
        def bonzo_rcpt(self):
            return Accept()

    monkeypatch.setattr(module.os, "fsync", full)
    srv = serve(("recipients", Recipients()), ("directory", module.DirectoryDelivery(tmp_path)))
    with srv.smtp() as client:
        client.ehlo()
        client.mail("alice@example.net")
        client.rcpt("bob@example.org")
        assert reply(client.data(MESSAGE)) == "452 4.3.1 Insufficient storage"
    assert list(tmp_path.iterdir()) == []


def test_accepted_counts_after_the_250(serve: Callable[..., Served]) -> None:
    counts = snippet("hook_accepted").SenderCounts()
    srv = serve(("owner", Owner()), ("counts", counts))
    with srv.smtp() as client:
        client.sendmail("alice@Example.NET", ["b@example.org"], MESSAGE)
        client.sendmail("", ["b@example.org"], MESSAGE)
        client.sendmail("carol@example.net", ["b@example.org"], MESSAGE)
    srv.close()
    srv.close = lambda: None  # type: ignore[method-assign]
    assert counts.messages == {"example.net": 2, "<>": 1}


def test_rset_limit(serve: Callable[..., Served]) -> None:
    srv = serve(("rsets", snippet("hook_rset").RsetLimit(limit=2)), ("owner", Owner()))
    with srv.smtp() as client:
        client.ehlo()
        for _ in range(2):
            assert client.rset()[0] == 250
        assert client.mail("alice@example.net")[0] == 250
        assert client.rset()[0] == 250
        assert reply(client.docmd("MAIL FROM:<alice@example.net>")) == (
            "421 4.7.0 Too many RSET commands"
        )
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def test_disconnect_logs_every_connection(
    serve: Callable[..., Served], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bonzo.plugins.connections")
    srv = serve(("owner", Owner()), ("connections", snippet("hook_disconnect").ConnectionLog()))
    with srv.smtp() as client:
        client.sendmail("alice@example.net", ["b@example.org"], MESSAGE)
    srv.smtp().close()  # a client that just hangs up
    srv.close()
    srv.close = lambda: None  # type: ignore[method-assign]
    lines = [r.getMessage() for r in caplog.records if r.name == "bonzo.plugins.connections"]
    assert len(lines) == 2
    assert all(
        re.fullmatch(
            r"closed session=\w+ ip=127\.0\.0\.1 messages=[01] "
            r"duration=\d+\.\ds",
            line,
        )
        for line in lines
    )
    assert sorted(line.split()[3] for line in lines) == ["messages=0", "messages=1"]


def test_exception_maps_a_directory_outage(serve: Callable[..., Served], log_watch: Any) -> None:
    log_watch.allow(FAILURE % ("lookup", "bonzo_(mail|rcpt)"))

    class DirectoryLookup:
        def bonzo_mail(self, address):
            if address == "down@example.net":
                raise ConnectionError("directory server unreachable")

        def bonzo_rcpt(self, address):
            raise ConnectionError("directory server unreachable")

    srv = serve(
        ("outage", snippet("hook_exception").DirectoryOutage()), ("lookup", DirectoryLookup())
    )
    with srv.smtp() as client:
        client.ehlo()
        assert reply(client.mail("down@example.net")) == "451 4.3.0 Internal confusion"
        assert client.mail("alice@example.net")[0] == 250
        assert reply(client.rcpt("bob@example.org")) == (
            "451 4.4.3 Directory unavailable, try again later"
        )
    # Both faults are logged with the plugin's name and traceback; neither text reached
    # the client (the replies above are exact).
    for hook in ("bonzo_mail", "bonzo_rcpt"):
        (record,) = log_watch.matching(FAILURE % ("lookup", hook) + "directory server unreachable")
        assert record.exc_info is not None


# ---------------------------------------------------------------- testing
def test_the_plugin_testing_example(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests shown in "Testing a plugin" pass against examples/plugin_package."""
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "plugin_package" / "src"))
    sys.modules.pop("bonzo_tagger", None)
    module = snippet("test_tagger")
    tagger = ROOT / "examples" / "plugin_package" / "src" / "bonzo_tagger" / "__init__.py"
    assert Path(sys.modules["bonzo_tagger"].__file__) == tagger
    tests = [value for name, value in vars(module).items() if name.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()


def test_the_auth_plugin_testing_example() -> None:
    """The tests of an AUTH plugin shown in "Testing a plugin" pass: AUTH end
    to end through PluginTestServer with a listener that offers it."""
    module = snippet("test_auth_plugin")
    tests = [value for name, value in vars(module).items() if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:
        test()


# --------------------------------------------------- examples shown in the docs
def literal_block_after(page: str, marker: str) -> list[str]:
    """The lines of the indented literal block that follows ``marker`` in a page."""
    text = (DOCS / page).read_text("utf-8")
    start = text.index("::\n", text.index(marker)) + 3
    lines = text[start:].splitlines()
    block = []
    for line in lines:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return [line for line in block if line]


def test_compose_example_checks_as_the_daemon_page_shows() -> None:
    pytest.importorskip("bonzo_plugins", reason="the bundled plugins are not installed")
    shown = literal_block_after("daemon.rst", "It exits with status 0 and a\nsummary")
    command = shown[0].removeprefix("$ ").split()
    assert command == ["bonzo", "check", "-c", "examples/compose.toml"]
    result = subprocess.run(
        [sys.executable, "-m", "bonzo", *command[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    expected = shown[1 : shown.index(next(line for line in shown[1:] if line.startswith("$")))]
    assert result.stdout.splitlines() == expected


def test_embedded_example_runs_as_shown(tmp_path: Path) -> None:
    """examples/embedded.py (shown on the bonzo.app page) serves and stops."""
    pytest.importorskip("bonzo_plugins", reason="the bundled plugins are not installed")
    sock, port = bind_unused_port()
    sock.close()
    env = {**os.environ, "BONZO_EXAMPLE_PORT": str(port), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "embedded.py")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"listening on 127.0.0.1:{port}\n"
        with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
            client.sendmail("alice@example.net", ["bob@example.com"], MESSAGE)
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("alice@example.net", ["bob@example.org"], MESSAGE)
        assert proc.stdout.readline() == "message 1 from <alice@example.net>: hi\n"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline() == "stopped\n"
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# ------------------------------------------------------- chunking and DSN
def snippet_config(tmp_path: Path, name: str, port: int) -> Path:
    """``docs/snippets/<name>`` as ``tmp_path/bonzo.toml``, on ``port``."""
    text = (SNIPPETS / name).read_text("utf-8")
    assert "port = 2525" in text
    config = tmp_path / "bonzo.toml"
    config.write_text(text.replace("port = 2525", f"port = {port}"), "utf-8")
    return config


def test_chunking_configuration_takes_mail_in_bdat_chunks(tmp_path: Path) -> None:
    """docs/chunking.rst's bonzo.toml, served by the real daemon, spoken to
    with BDAT on a raw socket (no Python client has BDAT)."""
    pytest.importorskip("bonzo_plugins", reason="the bundled plugins are not installed")
    port = free_port()
    config = snippet_config(tmp_path, "chunking.toml", port)
    body = b"Subject: chunks\r\n\r\n" + b"line\r\n" * 2000
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        with RawClient(port, timeout=DEADLINE) as client:
            keywords = client.greet().split(b"\r\n")
            assert b"250-CHUNKING" in keywords and b"250-BINARYMIME" not in keywords
            assert client.command("MAIL FROM:<a@example.net> BODY=BINARYMIME")[:3] == b"501"
            client.send(
                b"MAIL FROM:<alice@example.net>\r\nRCPT TO:<bob@example.com>\r\n"
                + b"BDAT 5000\r\n"
                + body[:5000]
                + b"BDAT %d LAST\r\n" % (len(body) - 5000)
                + body[5000:]
            )
            replies = client.replies(4)
            assert replies[2] == b"250 2.0.0 5000 octets received\r\n"
            assert replies[3].startswith(b"250 2.0.0 Ok: queued as ")
        assert daemon.stop() == 0
    (stored,) = (tmp_path / "Maildir" / "new").iterdir()
    content = stored.read_bytes()
    assert content.endswith(body)
    assert b"Received: from client.test" in content


def test_dsn_report_writes_what_plugins_read(tmp_path: Path) -> None:
    plugin = snippet("dsn_report").DSNReport()
    plugin.bonzo_configure(config={"file": str(tmp_path / "dsn.jsonl")})
    envelope = Envelope("alice@example.net", {"RET": "HDRS", "ENVID": "QQ+2B1"})
    envelope.add_recipient(
        Address.parse("bob@example.com"), {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;bob@example.com"}
    )
    envelope.add_recipient(Address.parse("carol@example.com"), {})
    plugin.bonzo_accepted(envelope=envelope)
    (line,) = (tmp_path / "dsn.jsonl").read_text().splitlines()
    assert json.loads(line) == {
        "id": envelope.id,
        "ret": "HDRS",
        "envid": "QQ+1",
        "recipients": [
            {
                "to": "bob@example.com",
                "notify": ["SUCCESS"],
                "orcpt": ["rfc822", "bob@example.com"],
                "report_success": True,
                "report_failure": False,
            },
            {
                "to": "carol@example.com",
                "notify": None,
                "orcpt": None,
                "report_success": False,
                "report_failure": True,
            },
        ],
    }


def test_dsn_configuration_keeps_the_requests_beside_the_mail(tmp_path: Path) -> None:
    """docs/dsn.rst's bonzo.toml and plugin, served by the real daemon,
    with smtplib's DSN options."""
    pytest.importorskip("bonzo_plugins", reason="the bundled plugins are not installed")
    port = free_port()
    config = snippet_config(tmp_path, "dsn.toml", port)
    (tmp_path / "dsn_report.py").write_text((SNIPPETS / "dsn_report.py").read_text())
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(config, port)
        daemon.wait_ready()
        with smtplib.SMTP("127.0.0.1", port, timeout=DEADLINE) as client:
            client.sendmail(
                "alice@example.net",
                ["bob@example.com"],
                MESSAGE,
                mail_options=["RET=FULL", "ENVID=abc+2Bdef"],
                rcpt_options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;Bob@example.com"],
            )
            client.sendmail("", ["carol@example.com"], MESSAGE, rcpt_options=["NOTIFY=NEVER"])
        assert daemon.stop() == 0
    first, second = [json.loads(line) for line in (tmp_path / "dsn.jsonl").read_text().splitlines()]
    assert (first["ret"], first["envid"]) == ("FULL", "abc+def")
    assert first["recipients"] == [
        {
            "to": "bob@example.com",
            "notify": ["DELAY", "FAILURE"],
            "orcpt": ["rfc822", "Bob@example.com"],
            "report_success": False,
            "report_failure": True,
        }
    ]
    assert second["recipients"][0]["notify"] == ["NEVER"]
    assert not second["recipients"][0]["report_failure"]
    assert len(list((tmp_path / "Maildir" / "new").iterdir())) == 2


# ---------------------------------------------------------------- coverage
def test_every_snippet_is_shown_and_tested() -> None:
    """A snippet no page includes, or no test here imports, fails."""
    pages = "\n".join(p.read_text("utf-8") for p in DOCS.rglob("*.rst"))
    this = Path(__file__).read_text("utf-8")
    snippets = sorted(p for p in SNIPPETS.iterdir() if p.suffix in (".py", ".toml"))
    assert snippets
    unshown = [p.name for p in snippets if f"snippets/{p.name}" not in pages]
    untested = [p.name for p in snippets if not re.search(rf"[\"']{p.stem}[\"':.]", this)]
    assert not unshown, f"snippets no page includes: {unshown}"
    assert not untested, f"snippets no test uses: {untested}"


# ------------------------------------------------------------ delivery hooks
def test_hook_delivery_routes_counts_and_drops_noreply_bounces(tmp_path) -> None:
    class Refusing(DiscardTransport):
        async def deliver(self, message, recipients):
            return [Outcome("failed", 550, "5.1.1", "No such user", "mx.test") for _ in recipients]

    policy = snippet("hook_delivery").DeliveryPolicy()
    plugins = PluginSet()
    plugins.register(policy, "policy")
    spool = Spool(tmp_path / "q")
    spool.setup()
    routes = RouteTable({}, {}, None)
    vip = DiscardTransport()
    routes.named["vip"] = vip
    routes.default = Refusing()
    runner = Runner(spool, GroupSync(spool.data), routes, plugins, RunnerSettings())

    def queue(id: str, sender: str, *rcpts: str) -> None:
        recipients = [{"address": r, "canonical": r, "domain": r.partition("@")[2]} for r in rcpts]
        envelope = {"arrival": 0.0, "sender": sender, "recipients": recipients}
        spool.write(id, envelope, b"", io.BytesIO(b"Subject: x\r\n\r\nx\r\n"))

    queue("A1", "noreply@example.com", "ceo@board.example.org", "nobody@example.net")
    queue("A2", "alice@example.com", "nobody@example.net")

    async def main() -> None:
        await runner.attempt("A1")
        await runner.attempt("A2")

    asyncio.run(main())
    assert policy.outcomes == {"delivered": 1, "bounced": 2}
    # The no-reply sender gets no report; alice does.
    reports = [m for m in spool.iter_messages() if m.sender == ""]
    assert [[r.address for r in m.recipients] for m in reports] == [["alice@example.com"]]


# -------------------------------------------------------------------- dns
def dns_app(tmp_path: Path, dns_table: str) -> MailApp:
    """A MailApp on an unused port running the DNS snippet, then an owner."""
    text = f"""
[[listeners]]
address = "127.0.0.1"
port = 0

{dns_table}

[plugins]
paths = [{str(SNIPPETS)!r}]
enabled = ["dns_sender_domain:SenderMailHost"]
"""
    config = parse_config(text, source="bonzo.toml", base_dir=tmp_path)
    return MailApp(config, [("owner", Owner())])


def test_dns_sender_domain_needs_dns(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        dns_app(tmp_path, "")
    assert str(info.value) == (
        "bonzo.toml: plugins.dns_sender_domain:SenderMailHost: needs DNS: set [dns] nameservers"
    )


def test_dns_sender_domain_refuses_domains_without_mail_hosts(tmp_path: Path, dns_stub) -> None:
    dns_stub.add("example.org", "MX", "10 mx.example.org.")
    dns_stub.add("mx.example.org", "A", "192.0.2.1")
    dns_stub.add("plain.example", "AAAA", "2001:db8::25")  # an implicit MX
    dns_stub.add("nomail.example", "MX", "0 .")
    dns_stub.fault("broken.example", "servfail")
    app = dns_app(tmp_path, f'[dns]\nnameservers = ["{dns_stub.nameserver}"]\ntimeout = 1\n')
    loop = Loop()
    try:
        loop.run(app.start())
        port = app.addresses[0][1]
        replies = []
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=DEADLINE) as c:
            c.ehlo()
            for sender in (
                "alice@example.org",
                "bob@plain.example",
                "joe@nowhere.example",
                "joe@nomail.example",
                "joe@broken.example",
                "",
            ):
                replies.append(reply(c.mail(sender)))
                c.rset()
        assert replies == [
            "250 2.1.0 Ok",
            "250 2.1.0 Ok",
            "550 5.1.8 Sender domain accepts no mail",
            "550 5.1.8 Sender domain accepts no mail",
            "451 4.4.3 Sender domain lookup failed",
            "250 2.1.0 Ok",
        ]
        # The null sender was not looked up.
        assert sorted(set(dns_stub.asked("MX"))) == [
            "broken.example",
            "example.org",
            "nomail.example",
            "nowhere.example",
            "plain.example",
        ]
    finally:
        loop.run(app.stop(1.0))
        loop.close()


# ----------------------------------------------------------- outbound client
class Downstream:
    """The relay's downstream: refuses ``unknown``, defers ``later``, keeps the rest."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []

    def bonzo_rcpt(self, mailbox):
        from bonzo.errors import PermanentError, TransientError

        if mailbox.local == "unknown":
            raise PermanentError("No such user here", 550, "5.1.1")
        if mailbox.local == "later":
            raise TransientError("Greylisted, try later", 450, "4.2.0")
        return Accept()

    def bonzo_deliver(self, envelope):
        self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return Accept()


def test_client_relay(serve: Callable[..., Served], start_server: Any) -> None:
    from bonzo.client import ClientSettings, deliver

    downstream = start_server(plugin=Downstream())
    relay = snippet("client_relay").RelayPlugin("127.0.0.1", downstream.port)
    front = serve(("relay", relay), protocol="lmtp")
    rcpts = ["ok@example.org", "unknown@example.org", "later@example.org"]
    result = asyncio.run(
        deliver(
            "127.0.0.1",
            front.port,
            protocol="lmtp",
            sender="alice@example.net",
            recipients=rcpts,
            message=MESSAGE.encode(),
            settings=ClientSettings(helo_name="client.example"),
        )
    )
    # Each recipient gets the downstream's verdict, through the relay.
    assert [(r.status.value, r.code, r.enhanced_code) for r in result.recipients] == [
        ("delivered", 250, "2.0.0"),
        ("refused", 550, "5.1.1"),
        ("deferred", 450, "4.2.0"),
    ]
    assert [r.text for r in result.recipients[1:]] == ["No such user here", "Greylisted, try later"]
    ((to, content),) = downstream.plugin.messages
    assert to == ["ok@example.org"]
    # The downstream's trace header, the relay's, then the message as sent.
    assert content.startswith(b"Received: from relay.example.net")
    assert b"\r\nReceived: from client.example" in content
    assert content.endswith(MESSAGE.encode())

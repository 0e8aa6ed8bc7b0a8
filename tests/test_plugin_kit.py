"""The plugin author's kit: PluginTestServer (a real app, any client address
and HELO, capture modes, logs) and the pytest fixtures of
bonzo.pytest_plugin — used here as an author would."""

from __future__ import annotations

import inspect
import logging
import re
import smtplib
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from bonzo import Accept, errors, hookimpl
from bonzo.settings import ListenerSettings
from bonzo.testing import PluginTestServer

MESSAGE = "Subject: kit\r\n\r\nHello\r\n"


def test_the_docstring_example_runs():
    doc = inspect.getdoc(PluginTestServer) or ""
    code = textwrap.dedent(re.search(r"::\n\n((?:    .*\n|\n)+)", doc + "\n").group(1))
    namespace: dict[str, object] = {}
    exec(compile(code, "PluginTestServer docstring", "exec"), namespace)
    assert "server" in namespace  # it ran to the end, asserts included


def test_plugins_get_a_real_app_with_a_base_directory(tmp_path):
    seen: dict[str, object] = {}

    class Reads:
        @hookimpl
        def bonzo_configure(self, config, app):
            seen["file"] = (app.base_dir / config["file"]).read_text()
            seen["dns"] = app.dns.describe()

        @hookimpl
        def bonzo_startup(self, app):
            seen["store"] = type(app.store).__name__

    (tmp_path / "list.txt").write_text("alice\n")
    with PluginTestServer(
        ("reads", Reads()), config={"reads": {"file": "list.txt"}}, base_dir=tmp_path
    ):
        pass
    assert seen == {"file": "alice\n", "dns": "off", "store": "MemoryStore"}
    with PluginTestServer() as server:
        temporary = server.base_dir
        assert temporary.is_dir()
    assert not temporary.exists()  # removed at the end


def test_a_failing_configure_or_startup_leaves_nothing_behind(monkeypatch):
    # Run with -W error: a temporary directory left to the garbage collector,
    # a loop thread still running or a log handler left on the root logger
    # would each fail this test or a later one.
    made: list[Path] = []
    real = PluginTestServer._setup

    def setup(self: PluginTestServer, *args: object) -> None:
        made.append(Path(self._tmp.name))  # type: ignore[union-attr]
        real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(PluginTestServer, "_setup", setup)

    class Picky:
        @hookimpl
        def bonzo_configure(self, config, app):
            if "blocked" not in config:
                raise ValueError("blocked: required")

    class Broken:
        @hookimpl
        def bonzo_startup(self, app):
            raise RuntimeError("database unreachable")

    handlers = list(logging.getLogger().handlers)
    with pytest.raises(ValueError, match="blocked: required"):
        PluginTestServer(("picky", Picky()), config={"picky": {"blockd": []}})
    with pytest.raises(Exception, match="database unreachable"):
        with PluginTestServer(("broken", Broken())):
            pass  # pragma: no cover - never reached
    assert len(made) == 2 and not any(path.exists() for path in made)
    assert logging.getLogger().handlers == handlers
    assert not [t for t in threading.enumerate() if "run_forever" in t.name]


def test_client_address_and_helo_seen_by_plugins():
    seen: list[tuple[str, str | None]] = []

    class Watch:
        @hookimpl
        def bonzo_mail(self, session):
            seen.append((session.remote_ip, session.helo))

    with PluginTestServer(("watch", Watch())) as server:
        for ip in ("198.51.100.7", "2001:db8::5"):
            with server.client(remote_ip=ip, helo="mx.sender.example") as client:
                assert client.sendmail("a@example.org", ["b@example.com"], MESSAGE) == {}
        with server.client() as client:  # no address given: the real one
            client.sendmail("a@example.org", ["b@example.com"], MESSAGE)
    assert seen == [
        ("198.51.100.7", "mx.sender.example"),
        ("2001:db8::5", "mx.sender.example"),
        ("127.0.0.1", "client.example"),
    ]
    assert server.sessions[0] == ("198.51.100.7", "mx.sender.example")


class Users:
    """An AUTH plugin checking its own table of users."""

    @hookimpl
    def bonzo_configure(self, config):
        self.passwords = dict(config["passwords"])

    @hookimpl
    def bonzo_auth(self, username, password):
        return Accept() if self.passwords.get(username) == password else None


def test_an_auth_plugin_is_tested_end_to_end_with_the_listener_s_options():
    seen: list[tuple[str, str | None]] = []

    class Who:
        @hookimpl
        def bonzo_mail(self, session):
            seen.append((session.remote_ip, session.auth))

    config = {"users": {"passwords": {"alice": "s3cret"}}}
    listener = ListenerSettings(auth_plaintext=True, require_auth=True)
    with PluginTestServer(
        ("users", Users()), ("who", Who()), config=config, listener=listener, auth_failure_delay=0
    ) as server:
        assert server.listener is listener
        # Both ports serve the listener's options (the PROXY one too).
        for remote_ip in (None, "203.0.113.9"):
            with server.client(remote_ip=remote_ip) as client:
                client.ehlo()
                assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
                assert client.mail("a@example.org")[0] == 530  # require_auth
                with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                    client.login("alice", "wrong")
                assert refused.value.smtp_code == 535
                assert client.login("alice", "s3cret") == (235, b"2.7.0 Authentication successful")
                assert client.sendmail("a@example.org", ["b@example.com"], MESSAGE) == {}
    assert seen == [("127.0.0.1", "alice"), ("203.0.113.9", "alice")]
    assert len(server.messages) == 2
    # By default the ports are plain SMTP: no AUTH without TLS.
    with PluginTestServer(("users", Users()), config=config) as server:
        with server.client() as client:
            client.ehlo()
            assert not client.has_extn("auth")


def test_listener_options_go_in_listener():
    with pytest.raises(TypeError, match=r"auth_plaintext: a listener option.*listener="):
        PluginTestServer(auth_plaintext=True)
    with pytest.raises(TypeError, match="listener must be a ListenerSettings"):
        PluginTestServer(listener={"auth_plaintext": True})
    with pytest.raises(ValueError, match="no unix_socket or proxy_protocol"):
        PluginTestServer(listener=ListenerSettings(unix_socket=True))


def test_capture_modes():
    class Owner:
        @hookimpl
        def bonzo_rcpt(self, address):
            if address.startswith("nobody@"):
                raise errors.PermanentError(550, "No such user", "5.1.1")
            return Accept()

    class Delivers:
        def __init__(self) -> None:
            self.got: list[str] = []

        @hookimpl
        def bonzo_deliver(self, envelope):
            self.got.append(envelope.mail_from)
            return Accept()

    # "delivery": the plugin under test owns recipients, the server keeps mail.
    with PluginTestServer(("owner", Owner()), capture="delivery") as server:
        with server.client() as client:
            refused = client.sendmail(
                "a@example.org", ["b@example.com", "nobody@x.example"], MESSAGE
            )
    assert list(refused) == ["nobody@x.example"] and len(server.messages) == 1
    # "recipients": the server accepts recipients, the plugin delivers.
    delivers = Delivers()
    with PluginTestServer(("store", delivers), capture="recipients") as server:
        with server.client() as client:
            client.sendmail("a@example.org", ["anyone@example.com"], MESSAGE)
    assert delivers.got == ["a@example.org"] and server.messages == []
    # False: nothing added, so a recipient nobody owns is refused.
    with PluginTestServer(capture=False) as server:
        with server.client() as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("a@example.org", ["b@example.com"], MESSAGE)
    with pytest.raises(ValueError, match="capture must be"):
        PluginTestServer(capture="everything")


def test_logs_are_kept():
    class Noisy:
        @hookimpl
        def bonzo_helo(self, name):
            logging.getLogger("my.plugin").warning("hello from %s", name)

    with PluginTestServer(("noisy", Noisy())) as server:
        with server.client(helo="loud.example") as client:
            client.sendmail("a@example.org", ["b@example.com"], MESSAGE)
    assert "WARNING my.plugin: hello from loud.example" in server.log_text
    assert any(r.name == "tornado.access" for r in server.logs)  # Bonzo's own line


OUTSIDE_PYTEST = """
import logging
from bonzo import hookimpl
from bonzo.testing import PluginTestServer

class Chatty:
    @hookimpl
    def bonzo_mail(self, address):
        logging.getLogger("chatty").info("info from the plugin: %s", address)

with PluginTestServer(("chatty", Chatty())) as server:
    with server.client() as client:
        client.ehlo()
        client.mail("a@example.org")
        print(client.rcpt("nobody")[0])
        client.rcpt("b@example.com")
        print(client.data(b"Subject: x\\r\\n\\r\\nhi\\r\\n")[0])
print(logging.getLevelName(logging.getLogger().level))
print(server.log_text)
"""


def test_logs_keep_info_lines_without_any_logging_set_up():
    # A plain script (no pytest to lower the root logger's level): the access
    # line, a refusal's line and a plugin's info are kept all the same.
    done = subprocess.run(
        [sys.executable, "-c", OUTSIDE_PYTEST], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    rcpt, data, level, *lines = done.stdout.splitlines()
    assert (rcpt, data, level) == ("501", "250", "WARNING")  # the level restored
    assert "INFO chatty: info from the plugin: a@example.org" in lines
    assert any(line.startswith("INFO tornado.access: ") for line in lines), lines
    assert any("refused by" in line and "<nobody>" in line for line in lines), lines
    assert done.stderr == ""


def test_envelopes_list_the_recipients_the_message_was_delivered_to():
    class Picky:
        @hookimpl
        def bonzo_message(self, envelope):
            for rcpt in envelope.recipients:
                if rcpt.local == "nospam":
                    envelope.refuse_recipient(rcpt, errors.PermanentError(550, "No", "5.7.1"))
                elif rcpt.local == "gone":
                    envelope.remove_recipient(rcpt)

    with PluginTestServer(("picky", Picky())) as server:
        with server.client() as client:
            to = ["a@example.com", "nospam@example.com", "gone@example.com", "b@example.com"]
            client.sendmail("s@example.org", to, MESSAGE)
    assert server.envelopes == [("s@example.org", ["a@example.com", "b@example.com"])]


def test_the_pytest_fixtures(bonzo_server, bonzo_session):
    class Night:
        @hookimpl
        def bonzo_helo(self, name):
            if "night" in name:
                raise errors.PermanentError(550, "Not at night", "5.7.1")

    server = bonzo_server(("night", Night()))
    with server.client(helo="night.example") as client:
        assert client.helo()[0] == 550
    session = bonzo_session("203.0.113.1", helo="day.example", auth="alice")
    assert (session.remote_ip, session.helo, session.auth) == (
        "203.0.113.1",
        "day.example",
        "alice",
    )
    assert Path(server.base_dir).is_dir()  # still running: stopped after the test

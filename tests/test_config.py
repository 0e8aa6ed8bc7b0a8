"""The ``bonzo.toml`` configuration: every table and key, its default, and
every way to get it wrong (a :class:`ConfigError` naming the file and the
dotted key)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bonzo.config import (
    DNS_KEYS,
    EXTRA_KEYS,
    LISTENER_KEYS,
    LOGGING_KEYS,
    METRICS_KEYS,
    PLUGINS_KEYS,
    REDIS_KEYS,
    SETTING_SECTIONS,
    TOP_LEVEL_KEYS,
    Config,
    ConfigError,
    ListenerConfig,
    LoggingConfig,
    PluginsConfig,
    default_config_text,
    load_config,
    parse_config,
)
from bonzo.dns import DNSSettings
from bonzo.settings import SMTPSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "bonzo.toml.example"
SOURCE = "conf/bonzo.toml"


def parse(text: str, base_dir: Path | None = None) -> Config:
    return parse_config(text, source=SOURCE, base_dir=base_dir or Path("/srv/bonzo"))


def error(text: str, base_dir: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, base_dir)
    return info.value


def assert_error(text: str, key: str, *fragments: str, base_dir: Path | None = None) -> None:
    exc = error(text, base_dir)
    assert (exc.source, exc.key) == (SOURCE, key), str(exc)
    message = str(exc)
    assert message.startswith(f"{SOURCE}: {key}: " if key else f"{SOURCE}: "), message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def toml_value(value: Any) -> str:
    """A tiny TOML writer for the values these tests use (inline forms only)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are TOML's, except that TOML wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def table(section: str, **values: Any) -> str:
    return f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())


# ------------------------------------------------------------ defaults
def test_an_empty_file_gives_every_default():
    config = parse("")
    assert config.source == SOURCE
    assert config.base_dir == Path("/srv/bonzo")
    assert config.settings == SMTPSettings()
    assert config.listeners == [ListenerConfig("127.0.0.1", 2525)]
    assert config.workers == 1
    assert config.logging == LoggingConfig(level="info", access_log=True, file=None)
    assert config.plugins == PluginsConfig(
        enabled=[], timeout=60.0, timeouts={}, paths=[], tables={}
    )


def test_empty_tables_give_the_defaults_too():
    text = "".join(f"[{name}]\n" for name in TOP_LEVEL_KEYS if name != "listeners")
    config = parse(text)
    assert config.settings == SMTPSettings()
    assert config.plugins == PluginsConfig()
    assert config.logging == LoggingConfig()


# ------------------------------------------- [server] [protocol] [limits]
#: For every SMTPSettings field: a valid non-default value, and bad ones.
SETTING_CASES: dict[str, tuple[Any, list[Any]]] = {
    "hostname": ("mx.example.org", [5, "has space", "", "h\u00e9"]),
    "banner": ("mx.example.org ESMTP ready", [5, "caf\u00e9", ["a"]]),
    "shutdown_grace": (2.5, [0, -1.0, "30", True]),
    "tls_handshake_timeout": (5.0, [0, -1.0, "30", True]),
    "proxy_timeout": (2.5, [0, -1.0, "10", True, float("nan")]),
    "max_auth_failures": (5, [0, 1.5, "3", True]),
    "auth_failure_delay": (0.0, [-1.0, "1", True]),
    "spool_threshold": (1024, [0, 1.5, "1024", True]),
    "spool_dir": ("/tmp", [5, "", ["a"], "/nonexistent/spool"]),
    "bare_newline": ("reject", ["strip", 1, True]),
    "smtputf8": (False, ["yes", 1, 0]),
    "chunking": (False, ["no", 0, [True]]),
    "binarymime": (False, ["off", 1]),
    "dsn": (False, ["false", 0]),
    "advertise_limits": (False, ["true", 1]),
    "max_command_line": (1024, [511, 2049, 512.0, True, "512"]),
    "max_auth_line": (1000, [0, -5, "x"]),
    "max_message_size": (0, [-1, "big", 1.5, 2**63, 99999999999999999999999]),
    "max_data_line": (1000, [999, "x"]),
    "max_recipients": (100, [99, 0, "x"]),
    "max_messages_per_connection": (5, [0, "5"]),
    "max_unknown_commands": (3, [0, 2.0]),
    "max_errors": (3, [0, False]),
    "max_junk_commands": (5, [0, 1.5, "many"]),
    "max_session_time": (3600.0, [-1, "long", float("inf")]),
    "max_connections": (10, [0, -1]),
    "max_connections_per_ip": (2, [0, [2]]),
    "ipv6_prefix_length": (48, [0, 129, 64.0, "64", True]),
    "idle_timeout": (10, [0, -1, "10", True]),
    "command_timeout": (2.5, [0, "x"]),
    "data_timeout": (60.0, [0.0, {"a": 1}]),
    "min_data_rate": (0, [-1, 1.5]),
    "data_rate_window": (5.0, [0, "5"]),
    "handler_timeout": (1, [-0.5, "x"]),
    "read_chunk_size": (4096, [0, 1.0]),
    "max_write_backlog": (4096, [0, "1"]),
}


def test_every_setting_has_cases_and_a_section():
    assert set(SETTING_CASES) == set(SMTPSettings.field_names())
    assert set(SETTING_SECTIONS) == set(SMTPSettings.field_names())
    assert set(SETTING_SECTIONS.values()) == {"server", "protocol", "limits"}


@pytest.mark.parametrize("name", sorted(SETTING_CASES))
def test_each_setting_is_read_from_its_table(name):
    good, _ = SETTING_CASES[name]
    section = SETTING_SECTIONS[name]
    config = parse(table(section, **{name: good}))
    assert getattr(config.settings, name) == good
    # Everything else keeps its default.
    changed = {
        f.name
        for f in dataclasses.fields(SMTPSettings)
        if getattr(config.settings, f.name) != getattr(SMTPSettings(), f.name)
    }
    assert changed == {name}


@pytest.mark.parametrize(
    "name, bad", [(name, bad) for name, (_, bads) in sorted(SETTING_CASES.items()) for bad in bads]
)
def test_each_bad_setting_names_the_file_and_dotted_key(name, bad):
    section = SETTING_SECTIONS[name]
    assert_error(table(section, **{name: bad}), f"{section}.{name}")


@pytest.mark.parametrize("name", sorted(SETTING_CASES))
def test_a_setting_in_the_wrong_table_is_an_unknown_key(name):
    section = SETTING_SECTIONS[name]
    other = "limits" if section != "limits" else "server"
    good, _ = SETTING_CASES[name]
    assert_error(table(other, **{name: good}), f"{other}.{name}", "unknown key", f"[{other}]")


@pytest.mark.parametrize("section", ["server", "protocol", "limits", "logging", "plugins"])
def test_unknown_keys_in_each_table(section):
    key = "logging" if section == "plugins" else "plugins"
    message = "unknown key"
    assert_error(table(section, **{"no_such_key": 1}), f"{section}.no_such_key", message)
    assert_error(table(section, **{key: 1}), f"{section}.{key}", message)


def test_unknown_top_level_keys_and_tables():
    assert_error("[tls]\n", "tls", "unknown table", ", ".join(TOP_LEVEL_KEYS))
    assert_error("hostname = 'mx'\n", "hostname", "unknown table")


@pytest.mark.parametrize("section", ["server", "protocol", "limits", "logging", "plugins"])
def test_a_table_that_is_not_a_table(section):
    assert_error(f"{section} = 5\n", section, "must be a table, not an integer")
    assert_error(f"{section} = [1]\n", section, "must be a table, not an array")


def test_workers():
    assert parse(table("server", workers=4)).workers == 4
    assert parse(table("server", workers=256)).workers == 256
    for bad in (0, 257, -1, "2", True, 1.5):
        assert_error(table("server", workers=bad), "server.workers", "1..256")


def test_event_loop(monkeypatch):
    assert parse("").loop == "asyncio"
    assert parse(table("server", loop="asyncio")).loop == "asyncio"
    for bad in ("tokio", 1, True, "UVLOOP"):
        assert_error(table("server", loop=bad), "server.loop", "asyncio, uvloop")
    if importlib.util.find_spec("uvloop") is not None:
        assert parse(table("server", loop="uvloop")).loop == "uvloop"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "uvloop" else real_find_spec(name, *a),
    )
    assert_error(
        table("server", loop="uvloop"), "server.loop", "uvloop is not installed", "bonzo[uvloop]"
    )


def test_an_old_or_broken_uvloop_is_a_configuration_error(monkeypatch):
    # Debian 12's uvloop 0.17 has no uvloop.run: each worker died with a
    # traceback once the ports were bound, and `bonzo check` said OK.
    import importlib.machinery
    import types

    old = types.ModuleType("uvloop")
    old.__spec__ = importlib.machinery.ModuleSpec("uvloop", None)
    old.__version__ = "0.17.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "uvloop", old)
    assert_error(
        table("server", loop="uvloop"), "server.loop", "uvloop 0.17.0 is too old", "0.19 or later"
    )
    old.__version__ = "0.21.0"  # type: ignore[attr-defined]  # but no run(): broken
    assert_error(table("server", loop="uvloop"), "server.loop", "uvloop 0.21.0 is too old")
    old.run = lambda main: None  # type: ignore[attr-defined]
    assert parse(table("server", loop="uvloop")).loop == "uvloop"


def test_spool_dir_is_resolved_against_the_file(tmp_path):
    (tmp_path / "spool").mkdir()
    config = parse(table("server", spool_dir="spool"), base_dir=tmp_path)
    assert config.settings.spool_dir == str(tmp_path / "spool")
    config = parse(table("server", spool_dir=str(tmp_path)), base_dir=Path("/"))
    assert config.settings.spool_dir == str(tmp_path)
    assert_error(table("server", spool_dir="a\0b"), "server.spool_dir", "NUL")


def test_spool_dir_must_be_an_existing_directory(tmp_path):
    # Found by bonzo check, not by the first large message (451 each time).
    (tmp_path / "file").write_text("")
    problem = error(table("server", spool_dir="missing"), base_dir=tmp_path)
    assert str(problem) == f"{SOURCE}: server.spool_dir: {tmp_path}/missing does not exist"
    problem = error(table("server", spool_dir="file"), base_dir=tmp_path)
    assert str(problem) == f"{SOURCE}: server.spool_dir: {tmp_path}/file is not a directory"


def test_files_bonzo_makes_must_not_be_something_else(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    problem = error(table("server", pid_file="dir"), base_dir=tmp_path)
    assert str(problem).endswith(
        f"server.pid_file: {tmp_path}/dir exists and is not a regular file"
    )
    assert parse(table("server", pid_file="file"), base_dir=tmp_path).pid_file  # a stale one
    problem = error('[[listeners]]\npath = "file"\n', base_dir=tmp_path)
    assert str(problem).endswith(
        f"listeners[0].path: {tmp_path}/file exists and is not a socket (remove it first)"
    )


def test_files_bonzo_makes_need_a_directory_it_may_write(tmp_path, monkeypatch):
    """Checked as the user running the check (root may write anywhere: the
    check's answer is faked for one path)."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "old.pid").write_text("1\n")
    real = os.access
    denied = {str(tmp_path / "ro"), str(tmp_path / "ro" / "old.pid")}
    monkeypatch.setattr(os, "access", lambda p, m: str(p) not in denied and real(p, m))
    problem = error(table("server", pid_file="ro/bonzo.pid"), base_dir=tmp_path)
    assert str(problem).endswith(
        f"server.pid_file: cannot create {tmp_path}/ro/bonzo.pid: {tmp_path}/ro is not writable"
    )
    problem = error(table("server", pid_file="ro/old.pid"), base_dir=tmp_path)
    assert str(problem).endswith(
        f"server.pid_file: cannot write {tmp_path}/ro/old.pid: permission denied"
    )
    problem = error('[[listeners]]\npath = "ro/lmtp.sock"\n', base_dir=tmp_path)
    assert str(problem).endswith(f"{tmp_path}/ro is not writable")


# ------------------------------------------------------------ listeners
def test_several_listeners():
    text = (
        '[[listeners]]\naddress = "127.0.0.1"\nport = 25\n'
        '[[listeners]]\naddress = "::1"\nport = 25\n'
        '[[listeners]]\naddress = ""\nport = 587\n'
        '[[listeners]]\naddress = "localhost"\n'
        "[[listeners]]\nport = 2526\n"
    )
    assert parse(text).listeners == [
        ListenerConfig("127.0.0.1", 25),
        ListenerConfig("::1", 25),
        ListenerConfig("", 587),
        ListenerConfig("localhost", 2525),
        ListenerConfig("127.0.0.1", 2526),
    ]


def test_duplicate_listeners():
    text = '[[listeners]]\naddress = "127.0.0.1"\nport = 25\n' * 2
    assert_error(text, "listeners[1]", "duplicate listener 127.0.0.1:25")
    # An IPv6 address in brackets, where its colons would run into the port's.
    text = '[[listeners]]\naddress = "::1"\nport = 25\n' * 2
    assert_error(text, "listeners[1]", "duplicate listener [::1]:25")
    assert ListenerConfig("::1", 25).where == "[::1]:25"
    assert ListenerConfig("", 25).where == "*:25"
    # Port 0 asks for any free port: two of them are not duplicates.
    text = '[[listeners]]\naddress = "127.0.0.1"\nport = 0\n' * 2
    assert len(parse(text).listeners) == 2


def listeners_on(*addresses: str, port: int = 25) -> str:
    return "".join(f'[[listeners]]\naddress = "{a}"\nport = {port}\n' for a in addresses)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("127.0.0.1", "localhost"),
        ("", "::1"),
        ("", "127.0.0.1"),
        ("0.0.0.0", "192.0.2.1"),
        ("::", "::1"),
        ("::1", "0:0:0:0:0:0:0:1"),  # one address, two spellings
    ],
)
def test_listeners_that_would_bind_the_same_socket_are_refused(first, second):
    """Found by bonzo check, not by bonzo serve failing with "Address
    already in use" (status 1, which a process manager restarts)."""
    shown = f"[{second}]" if ":" in second else second or "*"
    assert_error(listeners_on(first, second), "listeners[1]", f"{shown}:25 overlaps listeners[0] (")


def test_listeners_on_one_port_that_do_not_overlap_are_fine():
    # Tornado binds IPv6 sockets IPv6-only: the two wildcards coexist.
    for pair in (("0.0.0.0", "::"), ("127.0.0.1", "::1"), ("127.0.0.1", "127.0.0.2")):
        assert len(parse(listeners_on(*pair)).listeners) == 2


def test_the_metrics_port_must_not_be_a_listeners():
    text = listeners_on("127.0.0.1", "::1", port=9100) + "[metrics]\nport = 9100\n"
    assert_error(text, "metrics.port", "127.0.0.1:9100 is listeners[0]'s too")
    text = listeners_on("::1", port=9100) + "[metrics]\nport = 9100\n"
    assert parse(text).metrics.port == 9100  # 127.0.0.1 and ::1 do not overlap


@pytest.mark.parametrize(
    "entry, key, fragment",
    [
        ({"address": "example.com"}, "listeners[0].address", "must be an IP address"),
        ({"address": "999.1.1.1"}, "listeners[0].address", "must be an IP address"),
        ({"address": "127.0.0.1:25"}, "listeners[0].address", "must be an IP address"),
        ({"address": 127}, "listeners[0].address", "must be a string"),
        ({"port": -1}, "listeners[0].port", "0..65535"),
        ({"port": 65536}, "listeners[0].port", "0..65535"),
        ({"port": "25"}, "listeners[0].port", "0..65535"),
        ({"port": True}, "listeners[0].port", "0..65535"),
        ({"port": 25.0}, "listeners[0].port", "0..65535"),
        ({"host": "127.0.0.1"}, "listeners[0].host", "unknown key"),
    ],
)
def test_bad_listeners(entry, key, fragment):
    assert_error(f"listeners = [{toml_value(entry)}]\n", key, fragment)


def test_values_in_messages_are_spelled_as_in_toml():
    assert_error(table("server", workers=True), "server.workers", "1..256, not true")
    assert_error(table("logging", level="loud"), "logging.level", 'not "loud"')


def test_files_made_at_start_need_their_directory(tmp_path):
    # bonzo check finds these, naming the key; serve would fail (status 1).
    (tmp_path / "file").write_text("x")
    for where, why in (("missing/dir", "does not exist"), ("file", "is not a directory")):
        assert_error(
            table("server", pid_file=f"{where}/bonzo.pid"),
            "server.pid_file",
            f"cannot create {tmp_path / where / 'bonzo.pid'}: {tmp_path / where} {why}",
            base_dir=tmp_path,
        )
        assert_error(
            f"listeners = [{toml_value({'path': f'{where}/lmtp.sock'})}]\n",
            "listeners[0].path",
            f"{tmp_path / where} {why}",
            base_dir=tmp_path,
        )
    assert parse(table("server", pid_file="bonzo.pid"), tmp_path).pid_file == str(
        tmp_path / "bonzo.pid"
    )


def test_listeners_must_be_a_non_empty_array_of_tables():
    assert_error("listeners = []\n", "listeners", "non-empty array of tables")
    assert_error("[listeners]\nport = 25\n", "listeners", "non-empty array of tables")
    assert_error("listeners = [25]\n", "listeners[0]", "must be a table")


# -------------------------------------------------------------- logging
def test_logging(tmp_path):
    config = parse(
        table("logging", level="DEBUG", access_log=False, file="log/bonzo.log"), tmp_path
    )
    assert config.logging == LoggingConfig("debug", False, str(tmp_path / "log" / "bonzo.log"))
    for level in ("debug", "info", "warning", "error", "critical"):
        assert parse(table("logging", level=level)).logging.level == level
    assert parse(table("logging", file="/var/log/b.log")).logging.file == "/var/log/b.log"


@pytest.mark.parametrize(
    "key, bad, fragment",
    [
        ("level", "verbose", "must be one of debug, info, warning, error, critical"),
        ("level", 10, "must be one of"),
        ("access_log", "yes", "true or false"),
        ("access_log", 1, "true or false"),
        ("file", 5, "path"),
        ("file", "", "path"),
        ("file", "a\0b", "NUL"),
    ],
)
def test_bad_logging(key, bad, fragment):
    assert_error(table("logging", **{key: bad}), f"logging.{key}", fragment)


# -------------------------------------------------------------- plugins
def test_plugins_enabled_order_tables_and_timeouts():
    text = (
        table(
            "plugins",
            enabled=["zeta", "alpha", "pkg.mod:Plugin"],
            timeout=30,
            timeouts={"alpha": 5, "pkg.mod:Plugin": 0.5},
        )
        + table("plugins.zeta", path="Maildir", nested={"a": [1, 2]})
        + table('plugins."pkg.mod:Plugin"', x=1)
    )
    plugins = parse(text).plugins
    assert plugins.enabled == ["zeta", "alpha", "pkg.mod:Plugin"]
    assert plugins.timeout == 30.0 and isinstance(plugins.timeout, float)
    assert plugins.timeouts == {"alpha": 5.0, "pkg.mod:Plugin": 0.5}
    assert plugins.tables == {
        "zeta": {"path": "Maildir", "nested": {"a": [1, 2]}},
        "pkg.mod:Plugin": {"x": 1},
    }


@pytest.mark.parametrize(
    "values, key, fragment",
    [
        ({"enabled": "maildir"}, "plugins.enabled", "array of plugin names"),
        ({"enabled": ["maildir", 5]}, "plugins.enabled", "array of plugin names"),
        ({"enabled": [""]}, "plugins.enabled", "array of plugin names"),
        ({"enabled": ["log", "maildir", "log"]}, "plugins.enabled", "'log' is listed twice"),
        ({"timeout": 0}, "plugins.timeout", "positive number"),
        ({"timeout": -1}, "plugins.timeout", "positive number"),
        ({"timeout": "60"}, "plugins.timeout", "positive number"),
        ({"timeout": True}, "plugins.timeout", "positive number"),
        ({"timeout": float("nan")}, "plugins.timeout", "positive number"),
        ({"timeout": float("inf")}, "plugins.timeout", "positive number"),
        ({"timeouts": 5}, "plugins.timeouts", "table of plugin = seconds"),
        ({"enabled": ["log"], "timeouts": {"maildir": 5}}, "plugins.timeouts.maildir", "enabled"),
        ({"timeouts": {"log": 5}}, "plugins.timeouts.log", "names no enabled plugin"),
        ({"enabled": ["log"], "timeouts": {"log": 0}}, "plugins.timeouts.log", "positive"),
        ({"enabled": ["log"], "timeouts": {"log": "5"}}, "plugins.timeouts.log", "positive"),
        ({"enabled": ["log"], "timeouts": {"log": math.inf}}, "plugins.timeouts.log", "positive"),
        ({"paths": "plugins"}, "plugins.paths", "array of directory paths"),
        ({"paths": ["ok", 5]}, "plugins.paths[1]", "path"),
        ({"paths": ["a\0b"]}, "plugins.paths[0]", "NUL"),
        ({"maildir": 5}, "plugins.maildir", "unknown key"),
    ],
)
def test_bad_plugins(values, key, fragment):
    assert_error(table("plugins", **values), key, fragment)


def test_plugin_paths_are_resolved_against_the_file(tmp_path):
    conf = tmp_path / "etc" / "bonzo.toml"
    conf.parent.mkdir()
    conf.write_text(table("plugins", paths=["local", "../shared", "/opt/bonzo-plugins"]))
    config = load_config(conf)
    assert config.source == str(conf)
    assert config.base_dir == conf.parent
    assert config.plugins.paths == [
        str(tmp_path / "etc" / "local"),
        str(tmp_path / "shared"),
        "/opt/bonzo-plugins",
    ]


# -------------------------------------------------------------- secrets
def test_env_secrets_anywhere(monkeypatch):
    monkeypatch.setenv("BONZO_TEST_HOST", "mx.secret.example")
    monkeypatch.setenv("BONZO_TEST_PASSWORD", "hunter2")
    monkeypatch.setenv("BONZO_TEST_ADDRESS", "::1")
    monkeypatch.setenv("BONZO_TEST_EMPTY", "")
    text = (
        '[server]\nhostname = { "$env" = "BONZO_TEST_HOST" }\n'
        '[[listeners]]\naddress = { "$env" = "BONZO_TEST_ADDRESS" }\n'
        '[plugins]\nenabled = ["auth"]\n'
        "[plugins.auth]\n"
        'password = { "$env" = "BONZO_TEST_PASSWORD" }\n'
        'list = ["a", { "$env" = "BONZO_TEST_PASSWORD" }]\n'
        'nested = { deep = { "$env" = "BONZO_TEST_PASSWORD" } }\n'
        'empty = { "$env" = "BONZO_TEST_EMPTY" }\n'
    )
    config = parse(text)
    assert config.settings.hostname == "mx.secret.example"
    assert config.listeners[0].address == "::1"
    assert config.plugins.tables["auth"] == {
        "password": "hunter2",
        "list": ["a", "hunter2"],
        "nested": {"deep": "hunter2"},
        "empty": "",
    }


def test_env_secret_not_set(monkeypatch):
    monkeypatch.delenv("BONZO_TEST_UNSET", raising=False)
    text = '[plugins.auth]\npassword = { "$env" = "BONZO_TEST_UNSET" }\n'
    assert_error(text, "plugins.auth.password", "environment variable 'BONZO_TEST_UNSET'")
    text = '[plugins]\nenabled = [{ "$env" = "BONZO_TEST_UNSET" }]\n'
    assert_error(text, "plugins.enabled[0]", "not set")


def test_file_secrets(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "password").write_text("s3cret\n")
    (tmp_path / "multi").write_text("line one\nline two\r\n\n")
    text = (
        "[plugins.auth]\n"
        f'absolute = {{ "$file" = {toml_value(str(tmp_path / "secrets" / "password"))} }}\n'
        'relative = { "$file" = "secrets/password" }\n'
        'multi = { "$file" = "multi" }\n'
    )
    conf = tmp_path / "bonzo.toml"
    conf.write_text(text)
    assert load_config(conf).plugins.tables["auth"] == {
        "absolute": "s3cret",
        # Relative paths are taken from the configuration file's directory.
        "relative": "s3cret",
        "multi": "line one\nline two",
    }


@pytest.mark.parametrize(
    "ref, fragment",
    [
        ("missing", "cannot read secret file 'missing'"),
        ("adirectory", "cannot read secret file"),
        ("latin1", "cannot read secret file"),
        ("", "$file needs a non-empty string"),
        (5, "$file needs a non-empty string"),
        ("a\0b", "NUL"),
    ],
)
def test_file_secret_errors(tmp_path, ref, fragment):
    (tmp_path / "adirectory").mkdir()
    (tmp_path / "latin1").write_bytes(b"caf\xe9\n")
    text = f'[server]\nbanner = {{ "$file" = {toml_value(ref)} }}\n'
    assert_error(text, "server.banner", fragment, base_dir=tmp_path)


def test_env_secret_errors():
    assert_error('[server]\nbanner = { "$env" = "" }\n', "server.banner", "$env needs a non-empty")
    assert_error('[server]\nbanner = { "$env" = 1 }\n', "server.banner", "$env needs a non-empty")


def test_a_secret_table_with_other_keys_is_an_ordinary_table():
    text = '[plugins.auth]\npassword = { "$env" = "HOME", other = 1 }\n'
    assert parse(text).plugins.tables["auth"]["password"] == {"$env": "HOME", "other": 1}


# ----------------------------------------------------- files and sources
def test_load_config_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(missing))}: no such file$"):
        load_config(missing)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}: cannot read"):
        load_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: invalid TOML"):
        load_config(bad)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(binary)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(table("limits", max_recipients=5))
    with pytest.raises(ConfigError) as info:
        load_config(wrong)
    assert (
        str(info.value) == f"{wrong}: limits.max_recipients: must be at least 100 (RFC 5321), not 5"
    )


def test_the_example_is_the_embedded_default_and_parses():
    example = EXAMPLE.read_bytes()
    assert example == (ROOT / "bonzo" / "default.toml").read_bytes()
    assert default_config_text().encode("utf-8") == example
    config = load_config(EXAMPLE)
    assert config.listeners == [ListenerConfig("127.0.0.1", 2525)]
    assert config.plugins.enabled
    default = load_config(None)
    assert default.source == "<default>"
    assert default.base_dir == Path.cwd()
    assert default.plugins == config.plugins


def documented_keys() -> dict[str, set[str]]:
    """Keys shown (set or commented out) under each ``[table]`` of the example."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in EXAMPLE.read_text("utf-8").splitlines():
        header = re.match(r"^#?\s*\[\[?([\w.\"]+)\]\]?\s*$", line)
        if header:
            section = header.group(1)
            keys.setdefault(section, set())
            continue
        key = re.match(r"^#?\s?(\w+)\s*=", line)
        if key and section:
            keys[section].add(key.group(1))
    return keys


def test_every_key_is_documented_in_the_example_under_its_table():
    documented = documented_keys()
    for name in SMTPSettings.field_names():
        section = SETTING_SECTIONS[name]
        assert name in documented.get(section, set()), f"{section}.{name} is not documented"
    for section, extras in EXTRA_KEYS.items():
        for name in extras:
            assert name in documented[section], f"{section}.{name} is not documented"
    assert set(LISTENER_KEYS) <= documented["listeners"]
    assert set(LOGGING_KEYS) <= documented["logging"]
    assert set(PLUGINS_KEYS) <= documented["plugins"]
    assert set(DNS_KEYS) <= documented["dns"]
    assert set(REDIS_KEYS) <= documented["redis"]
    assert set(METRICS_KEYS) <= documented["metrics"]
    assert set(TOP_LEVEL_KEYS) <= set(documented)


def test_every_default_in_the_example_is_the_real_default():
    """A commented-out ``# key = value`` line shows the default value."""
    text = EXAMPLE.read_text("utf-8")
    defaults = SMTPSettings()
    for name in SMTPSettings.field_names():
        found = re.search(rf"^# {name} = (.*)$", text, re.MULTILINE)
        assert found, name
        if name in ("hostname", "banner", "spool_dir"):
            continue  # their defaults depend on the machine; the example shows a sample
        value = tomllib.loads(f"v = {found.group(1)}")["v"]
        assert value == getattr(defaults, name), name


def test_the_example_shows_dns_off_with_every_default():
    """The [dns] table is commented out (DNS stays off), and each of its
    commented-out keys shows the default, except the sample nameservers."""
    text = EXAMPLE.read_text("utf-8")
    assert re.search(r"^\[dns\]", text, re.MULTILINE) is None
    assert re.search(r"^# \[dns\]$", text, re.MULTILINE)
    defaults = DNSSettings()
    for name in DNS_KEYS:
        found = re.search(rf"^# {name} = (.*)$", text, re.MULTILINE)
        assert found, name
        if name == "nameservers":
            continue
        value = tomllib.loads(f"v = {found.group(1)}")["v"]
        if isinstance(value, list):
            value = tuple(value)
        assert value == getattr(defaults, name), name
    assert not parse(text).dns.enabled


# ---------------------------------------------------- property: no crash
SECRET_DIR_FILES = {"secret.txt": b"value\n", "binary": b"\xff\x00"}
PLUGIN_NAMES = ["maildir", "log", "pkg.mod:Plugin"]


def scalars() -> st.SearchStrategy[Any]:
    """Anything TOML can hold in a leaf."""
    return st.one_of(
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
    )


def plausible() -> st.SearchStrategy[Any]:
    """Leaves of the right kind for most keys, so that documents get past the
    type checks into the deeper validation."""
    return st.one_of(
        st.integers(min_value=0, max_value=70000),
        st.sampled_from([1, 100, 512, 1000, 2048, 65535]),
        st.floats(min_value=0.001, max_value=1e6),
        st.sampled_from(["127.0.0.1", "::1", "", "localhost", "info", "DEBUG", "reject", "x"]),
        st.sampled_from(["spool", "a\0b", "mx.example.org", "has space"]),
    )


def secret_refs() -> st.SearchStrategy[Any]:
    # $file names stay inside the test's own directory (no "/"), so a random
    # path can never name a device or a real file of the machine.
    names = st.one_of(st.sampled_from([*SECRET_DIR_FILES, "missing", ".", ""]), st.text("ab."))
    return st.one_of(
        st.fixed_dictionaries({"$env": st.sampled_from(["HOME", "BONZO_NOT_SET_X", "", 5])}),
        st.fixed_dictionaries({"$file": st.one_of(names, st.just(5))}),
    )


def values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(plausible(), plausible(), scalars(), secret_refs())
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.text(max_size=6), children, max_size=3),
        ),
        max_leaves=6,
    )


def keyed(keys: list[str], value: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Tables of mostly known keys (now and then an unknown one)."""
    key = st.one_of(st.sampled_from(keys), st.sampled_from(keys), st.text(max_size=6))
    return st.dictionaries(key, value, max_size=4)


def documents() -> st.SearchStrategy[dict[str, Any]]:
    value = st.one_of(plausible(), plausible(), values())
    tables: dict[str, st.SearchStrategy[Any]] = {
        section: keyed([k for k, s in SETTING_SECTIONS.items() if s == section] + [*extra], value)
        for section, extra in EXTRA_KEYS.items()
    }
    tables["logging"] = keyed(list(LOGGING_KEYS), value)
    tables["metrics"] = keyed(list(METRICS_KEYS), value)
    names = st.lists(st.sampled_from(PLUGIN_NAMES), max_size=3)
    tables["plugins"] = st.fixed_dictionaries(
        {},
        optional={
            "enabled": st.one_of(names, values()),
            "timeout": value,
            "timeouts": st.one_of(st.dictionaries(st.sampled_from(PLUGIN_NAMES), value), values()),
            "paths": st.one_of(st.lists(value, max_size=2), values()),
            "maildir": st.one_of(st.dictionaries(st.text(max_size=4), values()), values()),
        },
    )
    tables["listeners"] = st.one_of(
        st.lists(keyed(list(LISTENER_KEYS), value), min_size=1, max_size=3), values()
    )
    document = st.fixed_dictionaries(
        {}, optional={name: st.one_of(t, t, t, values()) for name, t in tables.items()}
    )
    unknown = st.one_of(st.just({}), st.just({}), st.dictionaries(st.text(), values(), max_size=1))
    return st.tuples(document, unknown).map(lambda pair: {**pair[0], **pair[1]})


@pytest.fixture(scope="module")
def secret_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("secrets")
    for name, data in SECRET_DIR_FILES.items():
        (directory / name).write_bytes(data)
    return directory


# On a failure hypothesis imports libcst to suggest a patch, which warns on import.
@pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict:DeprecationWarning")
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents())
def test_parse_config_raises_nothing_but_config_error(document, secret_dir):
    text = "".join(f"{toml_value(k)} = {toml_value(v)}\n" for k, v in document.items())
    tomllib.loads(text)  # the writer makes valid TOML, so parse_config goes past it
    try:
        config = parse_config(text, source="fuzz.toml", base_dir=secret_dir)
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml: ")
        assert str(exc).isprintable()  # one line for the operator, whatever the input
    else:
        assert isinstance(config.settings, SMTPSettings)
        assert config.listeners and 1 <= config.workers <= 256
        assert 0 < config.plugins.timeout < math.inf


def test_the_effective_configuration_is_complete_redacted_and_loads_back(tmp_path, monkeypatch):
    """What ``bonzo config`` prints: every core key with its default, the
    secrets replaced, and a file that loads into the same configuration."""
    import tomli_w

    from bonzo.config import SETTING_SECTIONS, effective_config, load_config, read_raw

    monkeypatch.setenv("RELAY_PASSWORD", "hunter2")
    (tmp_path / "secret").write_text("s3cret\n")
    source = tmp_path / "bonzo.toml"
    source.write_text(
        EXAMPLE.read_text()
        + '\n[plugins.extra]\npassword = { "$env" = "RELAY_PASSWORD" }\n'
        + 'token = { "$file" = "secret" }\napi_secret = "plain"\n'
    )
    config = load_config(source)
    effective = effective_config(config, read_raw(source))
    text = tomli_w.dumps(effective)
    assert "hunter2" not in text and "s3cret" not in text and "plain" not in text
    assert effective["plugins"]["extra"] == {
        "password": "<secret from $env RELAY_PASSWORD>",
        "token": "<secret from $file secret>",
        "api_secret": "<redacted>",
    }
    for name, section in SETTING_SECTIONS.items():
        if getattr(config.settings, name) is not None:
            assert name in effective[section], name
    assert effective["server"]["workers"] == 1 and effective["dns"]["timeout"] == 5.0
    again = tmp_path / "again.toml"
    again.write_text(text)
    reloaded = load_config(again)
    assert reloaded.settings == config.settings
    assert reloaded.dns == config.dns and reloaded.logging == config.logging
    assert [x.where for x in reloaded.listeners] == [x.where for x in config.listeners]
    assert reloaded.plugins.enabled == config.plugins.enabled


def test_the_effective_configuration_of_every_core_table_loads_back_elsewhere(tmp_path):
    """A Unix listener's mode, a TLS listener with relative certificate
    paths, [metrics] and [redis]: the printed file, saved in another
    directory, loads into the same configuration."""
    import tomli_w
    import trustme

    from bonzo.config import effective_config, load_config, read_raw

    pytest.importorskip("redis")
    site = tmp_path / "site"
    site.mkdir()
    cert = trustme.CA().issue_cert("mx.example.test")
    cert.cert_chain_pems[0].write_to_path(str(site / "cert.pem"))
    cert.private_key_pem.write_to_path(str(site / "key.pem"))
    source = site / "bonzo.toml"
    source.write_text(
        '[[listeners]]\npath = "bonzo.sock"\nmode = "0640"\n\n'
        '[[listeners]]\naddress = "127.0.0.1"\nport = 2465\nimplicit_tls = true\n'
        'tls = { cert = "cert.pem", key = "key.pem" }\n\n'
        '[metrics]\nport = 9125\n\n[redis]\nurl = "redis://127.0.0.1:6379/2"\n'
    )
    config = load_config(source)
    text = tomli_w.dumps(effective_config(config, read_raw(source)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "bonzo.toml").write_text(text)
    again = load_config(elsewhere / "bonzo.toml")
    assert [x.mode for x in again.listeners if x.path] == [0o640]
    assert again.listeners[1].settings.tls_context is not None
    assert again.metrics == config.metrics and again.metrics.port == 9125
    assert again.redis == config.redis


def test_a_password_in_the_redis_url_is_not_printed(tmp_path):
    from bonzo.config import effective_config, read_raw

    pytest.importorskip("redis")
    source = tmp_path / "bonzo.toml"
    source.write_text('[redis]\nurl = "redis://:hunter2@127.0.0.1:6379/2"\n')
    effective = effective_config(load_config(source), read_raw(source))
    assert effective["redis"]["url"] == "redis://:***@127.0.0.1:6379/2"


# ------------------------------------------- what a fuzzer found (review)
BIG = 10**400  # TOML integers have no size limit


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (f"[limits]\nidle_timeout = {BIG}\n", "limits.idle_timeout"),
        (f"[server]\nshutdown_grace = {BIG}\n", "server.shutdown_grace"),
        (f"[limits]\nmax_session_time = {BIG}\n", "limits.max_session_time"),
        (f"[[listeners]]\ndata_timeout = {BIG}\n", "listeners[0].data_timeout"),
        (f"[plugins]\ntimeout = {BIG}\n", "plugins.timeout"),
        (f'[plugins]\nenabled = ["log"]\ntimeouts = {{ log = {BIG} }}\n', "plugins.timeouts.log"),
        (f"[dns]\ntimeout = {BIG}\n", "dns.timeout"),
        (f"[dns]\ncache_max_ttl = {BIG}\n", "dns.cache_max_ttl"),
    ],
)
def test_a_huge_integer_is_a_config_error_naming_the_key(text, key):
    assert_error(text, key)
    assert "a number of 401 digits" in str(error(text)) or key.startswith("plugins.")


@pytest.mark.parametrize("kind", ["int", "float", "duration", "size"])
def test_a_plugin_key_with_a_huge_integer_is_an_error_naming_it(kind):
    from bonzo.schema import Key

    with pytest.raises(ValueError, match="^n: expected a finite number"):
        Key("n", kind).parse(BIG, None)


def test_a_plugin_path_is_checked_for_a_home_and_its_length(tmp_path):
    from bonzo.schema import Key

    with pytest.raises(ValueError, match=r"^p: .*no such user's home"):
        Key("p", "path").parse("~no_such_user_xyz/file", tmp_path)
    with pytest.raises(ValueError, match=r"^p: a name of 300 octets in it: longer than a file"):
        Key("p", "path").parse("a" * 300, tmp_path)
    with pytest.raises(ValueError, match=r"^p: 50\d\d octets: longer than a path may be"):
        Key("p", "path").parse("/".join(["d" * 200] * 25), tmp_path)


@pytest.mark.parametrize("value", [True, 0, 2130706433])
def test_plugin_networks_are_strings(value):
    from bonzo.schema import Key

    with pytest.raises(ValueError, match="^n: expected a network such as 192.0.2.0/24"):
        Key("n", "networks").parse([value], None)


def test_ipv4_mapped_networks_match_as_the_ipv4_clients_they_are():
    """A client's mapped address is matched as IPv4, so a mapped network
    (``xclient_trusted``, ``relay_networks``...) is taken as IPv4 too."""
    import ipaddress

    from bonzo.proxy import address_in, parse_networks
    from bonzo.schema import Key

    assert parse_networks(["::ffff:127.0.0.1", "::ffff:10.0.0.0/104", "::1"]) == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    networks = Key("n", "networks").parse(["::ffff:192.0.2.0/120"], None)
    assert networks == [ipaddress.ip_network("192.0.2.0/24")]
    assert address_in("192.0.2.7", networks) and address_in("::ffff:192.0.2.7", networks)
    config = parse('[[listeners]]\nxclient_trusted = ["::ffff:127.0.0.1"]\n')
    assert address_in("127.0.0.1", config.listeners[0].settings.xclient_trusted)


@pytest.mark.parametrize("text", ["fe80::2%eth7", "fe80::/64%eth0", "fe80::1%1"])
def test_a_network_with_a_zone_index_is_refused_everywhere(text):
    # Matched without its zone, it would trust the same address on every link.
    from bonzo_plugins._config import parse_network

    from bonzo.proxy import parse_networks
    from bonzo.schema import Key

    with pytest.raises(ValueError, match=r"zone index"):
        parse_networks([text])
    with pytest.raises(ValueError, match=r"^n: .*a zone index \(%\.\.\.\) is not supported"):
        Key("n", "networks").parse([text], None)
    with pytest.raises(ValueError, match=r"zone index"):
        parse_network(text, "access.rules[0].match")
    with pytest.raises(ConfigError, match=r"xclient_trusted.*zone index"):
        parse(f'[[listeners]]\nxclient_trusted = ["{text}"]\n')


@pytest.mark.parametrize("mode", [0, 0o77, 0o7, 0o660])
def test_bonzo_config_prints_a_socket_mode_that_loads_back(tmp_path, mode):
    import tomli_w

    from bonzo.config import effective_config, read_raw

    source = tmp_path / "bonzo.toml"
    source.write_text(f'[[listeners]]\npath = "s.sock"\nmode = {mode}\n')
    out = tmp_path / "out.toml"
    out.write_text(tomli_w.dumps(effective_config(load_config(source), read_raw(source))))
    assert load_config(out).listeners[0].mode == mode


@pytest.mark.parametrize("where", ["[[listeners]]\naddress", "[metrics]\naddress"])
def test_an_ipv4_mapped_address_to_listen_on_is_refused(where):
    key = "listeners[0].address" if "listeners" in where else "metrics.address"
    text = f'{where} = "::ffff:127.0.0.1"\nport = 2526\n'
    assert_error(text, key, "IPv4-mapped address, which no socket can listen on", '"127.0.0.1"')


def test_a_unix_socket_path_longer_than_the_system_takes_is_refused(tmp_path):
    assert_error(
        f'[[listeners]]\npath = "{"s" * 120}"\n',
        "listeners[0].path",
        "longer than a Unix socket's path may be (107)",
        base_dir=tmp_path,
    )


@pytest.mark.parametrize(
    ("text", "key", "other"),
    [
        ('[server]\npid_file = "x.sock"\n[[listeners]]\npath = "x.sock"\n', "listeners[0].path",
         "server.pid_file"),
        ('[logging]\nfile = "x.sock"\n[[listeners]]\npath = "x.sock"\n', "listeners[0].path",
         "logging.file"),
        ('[server]\npid_file = "bonzo.log"\n[logging]\nfile = "bonzo.log"\n', "logging.file",
         "server.pid_file"),
    ],
)  # fmt: skip
def test_the_files_bonzo_writes_at_start_are_distinct(tmp_path, text, key, other):
    assert_error(text, key, f"is also {other}: each needs its own file", base_dir=tmp_path)


def test_a_file_name_too_long_for_the_system_is_found_by_check(tmp_path):
    assert_error(
        f'[logging]\nfile = "{"a" * 300}"\n',
        "logging.file",
        "a name of 300 octets in it: longer than a file name may be (255)",
        base_dir=tmp_path,
    )


def test_read_chunk_size_is_capped():
    assert parse("[limits]\nread_chunk_size = 16777216\n").settings.read_chunk_size == 1 << 24
    assert_error(
        "[limits]\nread_chunk_size = 4611686018427387904\n",
        "limits.read_chunk_size",
        "is capped at 16777216",
    )


def test_an_array_of_tables_for_a_plugin_says_it_must_be_a_table():
    assert_error(
        "[[plugins.maildir]]\npath = 'x'\n",
        "plugins.maildir",
        "must be a table ([plugins.NAME]), not an array of tables ([[plugins.NAME]])",
    )


def test_an_empty_password_reads_back_empty(tmp_path):
    from bonzo.config import effective_config, read_raw

    source = tmp_path / "bonzo.toml"
    source.write_text('[redis]\nurl = "redis://127.0.0.1:6379/0"\npassword = ""\n')
    printed = effective_config(load_config(source), read_raw(source))
    assert printed["redis"]["password"] == ""
    source.write_text('[redis]\nurl = "redis://127.0.0.1:6379/0"\npassword = "hunter2"\n')
    assert effective_config(load_config(source), read_raw(source))["redis"]["password"] == (
        "<redacted>"
    )


@pytest.mark.parametrize(
    ("text", "key", "shown"),
    [
        ("[limits]\nmax_connections = false\n", "limits.max_connections", "not false"),
        ("[limits]\nidle_timeout = true\n", "limits.idle_timeout", "not true"),
        ('[protocol]\nsmtputf8 = "yes"\n', "protocol.smtputf8", 'not "yes"'),
        ("[dns]\ntcp = 1\n", "dns.tcp", "not 1"),
        ("[redis]\nurl = false\n", "redis.url", "not false"),
    ],
)
def test_setting_values_in_messages_are_spelled_as_in_toml(text, key, shown):
    assert_error(text, key, shown)
    assert "False" not in str(error(text)) and "True" not in str(error(text))


@pytest.mark.parametrize(
    "name",
    ["a b!", "b\u00fccher.example", "*.", "-x.example", "a..b", "192.0.2.1", ("a" * 60 + ".") * 5],
)
def test_an_sni_name_no_client_can_ask_for_is_refused(tmp_path, name):
    import trustme

    cert = trustme.CA().issue_cert("mx.example.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    pair = '{ cert = "cert.pem", key = "key.pem" }'
    text = (
        '[[listeners]]\naddress = "127.0.0.1"\nport = 2465\n'
        f'tls = {{ cert = "cert.pem", key = "key.pem", sni = {{ "{name}" = {pair}, '
        f'"*.example.org" = {pair}, "xn--bcher-kva.example" = {pair}, "mx_2.test" = {pair} }} }}\n'
    )
    problem = error(text, base_dir=tmp_path)
    assert f"listeners[0].tls.sni: {name!r} is not a host name a client can ask for" in str(problem)
    good = text.replace(f'"{name}" = {pair}, ', "")
    assert parse(good, base_dir=tmp_path).listeners[0].settings.tls_context is not None


@pytest.mark.parametrize(
    "value, message",
    [
        ("::1:2525", "expected an IP address and a port, e.g. 127.0.0.1:2525 or [::1]:2525"),
        (
            "[::ffff:127.0.0.1]:2525",
            'IPv4-mapped address, which no socket can listen on: write "127.0.0.1"',
        ),
        ("[::1%lo]:2525", "a zone index (%...) is not supported"),
    ],
)
def test_listen_takes_what_the_listeners_table_takes(value, message):
    # --listen was checked less than [[listeners]]: these passed, then the
    # bind failed (or guessed where an unbracketed IPv6 address ends).
    from bonzo.cli import _listen_override

    with pytest.raises(ConfigError) as info:
        _listen_override([value])
    assert message in str(info.value)
    assert _listen_override(["[::1]:2525"])[0].address == "::1"


def test_a_listener_address_with_a_zone_index_is_refused_when_read():
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.address.*zone index"):
        parse('[[listeners]]\naddress = "::1%lo"\n')


@pytest.mark.parametrize("value", ["::1%lo", "fe80::1%eth0"])
def test_a_source_address_with_a_zone_index_is_refused_when_read(value):
    # It passed bonzo check, then every connection failed ("Unknown error -2").
    from bonzo_plugins._config import local_address

    with pytest.raises(ValueError, match=r"zone index"):
        local_address(value)
    assert local_address(" ::1 ") == "::1"
    with pytest.raises(ValueError, match=r'IPv4-mapped address.*write "127.0.0.1"'):
        local_address("::ffff:127.0.0.1")

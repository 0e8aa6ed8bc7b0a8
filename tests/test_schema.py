"""bonzo.schema: a plugin table declared once — checked, converted, with
one-line errors naming the key, and documented from the declaration."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bonzo.schema import Key, Schema

SCHEMA = Schema(
    Key("path", "path", default="journal.log", doc="The journal file."),
    Key("level", "choice", default="info", choices=("info", "debug"), doc="How much."),
    Key("max_lines", "int", default=1000, minimum=1, maximum=10**6, doc="Lines kept."),
    Key("every", "duration", default="5m"),
    Key("networks", "networks", default=[]),
    Key("trusted", "network"),
    Key("tags", "strings", default=["a"]),
    Key("verbose", "bool", default=False),
    Key("ratio", "float", default=0.5, minimum=0, maximum=1),
    Key("password", "secret", required=True),
    Key("extra", "table", default={}),
)


def test_values_are_checked_converted_and_defaulted(tmp_path):
    values = SCHEMA.parse(
        {"password": "s3cret", "networks": ["192.0.2.0/24"], "every": "2h", "ratio": 1},
        SimpleNamespace(base_dir=tmp_path),
    )
    assert values["path"] == tmp_path / "journal.log"  # relative to the configuration
    assert values["every"] == 7200.0 and values["max_lines"] == 1000
    assert values["networks"] == [ipaddress.ip_network("192.0.2.0/24")]
    assert values["trusted"] is None and values["ratio"] == 1.0
    assert values["level"] == "info" and values["tags"] == ["a"] and values["verbose"] is False


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"pasword": "x"}, r"^pasword: unknown key \(did you mean 'password'\?\)$"),
        ({"colour": "x", "password": "x"}, r"^colour: unknown key \(known: path, level, "),
        ({}, r"^password: required$"),
        ({"password": ""}, r"^password: expected a non-empty string, got a value$"),
        ({"password": "x", "max_lines": 0}, r"^max_lines: expected an integer >= 1, got 0$"),
        ({"password": "x", "max_lines": True}, r"^max_lines: expected an integer, got True$"),
        ({"password": "x", "every": "soon"}, r"^every: expected a duration such as 30"),
        (
            {"password": "x", "level": "loud"},
            r"^level: expected one of 'info', 'debug', got 'loud'$",
        ),
        ({"password": "x", "networks": "192.0.2.0/24"}, r"^networks: expected a list of networks"),
        ({"password": "x", "trusted": "nowhere"}, r"^trusted: expected a network such as"),
        ({"password": "x", "verbose": "yes"}, r"^verbose: expected true or false, got 'yes'$"),
        ({"password": "x", "ratio": 2}, r"^ratio: expected a number <= 1, got 2$"),
        ({"password": "x", "tags": ["", "b"]}, r"^tags: expected a list of non-empty strings"),
        ({"password": "x", "extra": 3}, r"^extra: expected a table, got 3$"),
    ],
)
def test_errors_are_one_line_naming_the_key(table, message):
    with pytest.raises(ValueError, match=message) as info:
        SCHEMA.parse(table)
    assert "\n" not in str(info.value)
    assert "s3cret" not in str(info.value)


def test_a_secret_is_never_shown():
    with pytest.raises(ValueError) as info:
        Schema(Key("token", "secret")).parse({"token": 12345})
    assert "12345" not in str(info.value)


def test_a_bad_declaration_is_refused():
    with pytest.raises(ValueError, match="unknown kind"):
        Key("x", "colour")
    with pytest.raises(ValueError, match="needs choices"):
        Key("x", "choice")
    with pytest.raises(ValueError, match="declared twice: x"):
        Schema(Key("x"), Key("x"))


def test_documentation_comes_from_the_declaration():
    text = SCHEMA.rst()
    assert text.startswith("``path``\n    *string (a path, relative to the configuration file)*,")
    assert "*default ``1000``*. Lines kept." in text
    assert "``password``\n    *string (best given as" in text and "*required*" in text
    example = SCHEMA.toml("plugins.journal")
    assert example.splitlines()[0] == "# [plugins.journal]"
    assert '# password = { "$env" = "NAME" }' in example
    assert set(re.findall(r"^# (\w+) = ", example, re.M)) == set(SCHEMA.names)


@pytest.mark.parametrize("plugin", ["log", "passwd", "spf", "dkim", "dmarc", "authres"])
def test_the_bundled_plugins_on_it_document_every_key(plugin):
    import importlib

    module = importlib.import_module(f"bonzo_plugins.{plugin}.plugin")
    text = (Path(__file__).parents[1] / "plugins" / plugin / "README.rst").read_text()
    assert module.KEYS == tuple(module.SCHEMA.names)
    for name in module.SCHEMA.names:
        assert f"``{name}``" in text
    if plugin != "passwd":  # its file is required
        assert set(module.SCHEMA.parse({})) == set(module.SCHEMA.names)  # defaults valid


@given(st.integers(0, 10**6), st.sampled_from(["", "s", "m", "h", "d"]))
def test_durations(number, unit):
    value = Schema(Key("t", "duration")).parse({"t": f"{number}{unit}"})["t"]
    assert value == number * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


@given(st.text(min_size=1, max_size=20))
def test_any_unknown_key_is_an_error_naming_it(name):
    if name in SCHEMA.names:
        return
    with pytest.raises(ValueError) as info:
        SCHEMA.parse({name: 1, "password": "x"})
    assert str(info.value).startswith(f"{name}: unknown key")

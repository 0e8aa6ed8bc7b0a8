"""bonzo.schema: a plugin table declared once — checked, converted, with
one-line errors naming the key, and documented from the declaration."""

from __future__ import annotations

import ipaddress
import math
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
    assert text.startswith("``path``\n    String (a path, relative to the configuration file);")
    flat = " ".join(text.split())
    # The bounds a value is checked against are documented with it.
    assert "``max_lines`` Integer; from 1 to 1000000; default ``1000``. Lines kept." in flat
    assert "``ratio`` Number; from 0 to 1; default ``0.5``." in flat
    assert "at least" not in flat and "at most" not in flat
    one_sided = " ".join(
        Schema(Key("a", "int", minimum=1), Key("b", "duration", maximum=60)).rst().split()
    )
    assert "Integer; at least 1." in one_sided and "; at most 60." in one_sided
    assert "``password``\n    String (best given as" in text and "; required." in text
    example = SCHEMA.toml("plugins.journal")
    assert example.splitlines()[0] == "# [plugins.journal]"
    assert '# password = { "$env" = "NAME" }' in example
    assert set(re.findall(r"^# (\w+) = ", example, re.M)) == set(SCHEMA.names)


#: The bundled plugins declared with bonzo.schema (every one, in the end).
ON_SCHEMA = [
    "access",
    "authres",
    "clamav",
    "discard",
    "dkim",
    "dkim_sign",
    "dmarc",
    "dnsbl",
    "forward",
    "greylist",
    "headers",
    "log",
    "maildir",
    "milter",
    "passwd",
    "policy",
    "queue",
    "ratelimit",
    "recipients",
    "rspamd",
    "spamassassin",
    "spf",
]


@pytest.mark.parametrize("plugin", ON_SCHEMA)
def test_the_bundled_plugins_on_it_document_every_key(plugin):
    import importlib

    module = importlib.import_module(f"bonzo_plugins.{plugin}.plugin")
    text = (Path(__file__).parents[1] / "plugins" / plugin / "README.rst").read_text()
    assert module.KEYS == tuple(module.SCHEMA.names)
    for name in module.SCHEMA.names:
        assert f"``{name}``" in text
    if not any(key.required for key in module.SCHEMA.keys):
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


RULE = Schema(
    Key("match", required=True, doc="What to match."),
    Key("action", "choice", default="deny", choices=("allow", "deny")),
)
NESTED = Schema(
    Key("rules", "tables", default=[], schema=RULE, doc="The rules."),
    Key("server", "table", default={}, schema=Schema(Key("port", "int", default=25))),
    Key("transports", "table", default={}, each=Schema(Key("host", required=True))),
    Key("max_size", "size", default="25M", minimum=1),
    Key("socket", "path"),
    Key("host", default="127.0.0.1"),
    Key("username"),
    Key("password", "secret"),
    Key("domain", convert=lambda v: v.lower() if "." in v else _bad("not a domain")),
    exclusive=[("socket", "host")],
    together=[("username", "password")],
)


def _bad(message):
    raise ValueError(message)


def test_nested_tables_sizes_and_conversions():
    values = NESTED.parse(
        {
            "rules": [{"match": "a"}, {"match": "b", "action": "allow"}],
            "server": {"port": 2525},
            "transports": {"relay": {"host": "smtp.example"}},
            "max_size": "512K",
            "domain": "Example.ORG",
        }
    )
    assert values["rules"] == [{"match": "a", "action": "deny"}, {"match": "b", "action": "allow"}]
    assert values["server"] == {"port": 2525}
    assert values["transports"] == {"relay": {"host": "smtp.example"}}
    assert values["max_size"] == 512 * 1024 and values["domain"] == "example.org"
    assert NESTED.parse({})["max_size"] == 25 * 1024 * 1024  # a default written as in a file


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rules": {}}, r"^rules: expected an array of tables, got \{\}$"),
        ({"rules": [{"match": "a"}, 3]}, r"^rules\[1\]: expected a table, got 3$"),
        ({"rules": [{"match": "a"}, {}]}, r"^rules\[1\]\.match: required$"),
        ({"rules": [{"match": "a", "acton": "x"}]}, r"^rules\[0\]\.acton: unknown key \(did you"),
        ({"server": {"port": "x"}}, r"^server\.port: expected an integer, got 'x'$"),
        ({"transports": {"a b": {}}}, r'^transports\."a b"\.host: required$'),
        ({"transports": {"relay": 1}}, r"^transports\.relay: expected a table, got 1$"),
        ({"max_size": "lots"}, r'^max_size: expected a size such as 26214400 or "25M"'),
        ({"max_size": 0}, r"^max_size: expected a size >= 1, got 0$"),
        ({"max_size": 1.5}, r"^max_size: expected an integer, got 1.5$"),
        ({"socket": "/run/s", "host": "h"}, r"^host: give socket or host, not socket and host$"),
        ({"username": "u"}, r"^password: required with username$"),
        ({"domain": "nodots"}, r"^domain: not a domain$"),
    ],
)
def test_nested_errors_name_the_whole_path(table, message):
    with pytest.raises(ValueError, match=message):
        NESTED.parse(table)


@given(st.integers(0, 2**20), st.sampled_from(["", "K", "M", "G", "k", "MB", "KiB"]))
def test_sizes(number, unit):
    value = Schema(Key("s", "size")).parse({"s": f"{number}{unit}"})["s"]
    factor = 1024 ** " KMG".index((unit[:1] or " ").upper())
    assert value == number * factor


def test_nested_documentation_is_indented_under_its_key():
    text = NESTED.rst()
    assert "``rules``\n    Array of tables, each with the keys below" in text
    assert "\n    ``match``\n        String; required. What to match." in text
    flat = " ".join(text.split())
    assert "At most one of ``socket``, ``host``. ``username`` and ``password`` go together." in flat
    assert all(len(line) <= 76 for line in text.splitlines())


def test_bad_nested_declarations_are_refused():
    with pytest.raises(ValueError, match="tables need a schema"):
        Key("x", "tables")
    with pytest.raises(ValueError, match="only a table or tables have a schema"):
        Key("x", "str", schema=RULE)
    with pytest.raises(ValueError, match="must name declared keys"):
        Schema(Key("a"), exclusive=[("a", "b")])


def test_every_plugin_readme_has_its_generated_keys():
    from bonzo_plugins import _docs

    assert sorted(_docs.plugins_with_schema()) == ON_SCHEMA
    # Every bundled plugin declares its table.
    here = Path(__file__).parents[1] / "plugins"
    assert ON_SCHEMA == sorted(p.parent.name for p in here.glob("*/plugin.py"))
    for name in ON_SCHEMA:
        # Stale: run python -m bonzo_plugins._docs
        assert _docs.update(name, write=False), f"{name}: README keys out of date"


def test_bounds_and_table_defaults_read_as_written():
    big = Schema(Key("expire", "int", maximum=10 * 365 * 86400), Key("r", "float", minimum=0.5))
    with pytest.raises(ValueError, match=r"^expire: expected an integer <= 315360000, got "):
        big.parse({"expire": 10**10})
    with pytest.raises(ValueError, match=r"^r: expected a number >= 0.5, got 0$"):
        big.parse({"r": 0})
    # nan passes every comparison; neither it nor inf is a timeout or a score.
    unbounded = Schema(Key("t", "duration", minimum=0.001, maximum=60), Key("s", "float"))
    for table in ({"t": math.nan}, {"t": math.inf}, {"s": math.nan}, {"s": -math.inf}):
        with pytest.raises(ValueError, match=r"^[ts]: expected a finite number, got "):
            unbounded.parse(table)
    routes = Schema(Key("routes", "table", default={"*": {"type": "mx"}}))
    assert '``{ "*" = { type = "mx" } }``' in routes.rst()
    assert Schema().rst() == "The table has no keys.\n"


def test_a_table_without_keys_says_so():
    with pytest.raises(ValueError, match=r"^foo: unknown key \(this table takes no keys\)$"):
        Schema().parse({"foo": 1}, SimpleNamespace(base_dir="."))


def test_addresses_and_domains_are_checked_and_canonical():
    schema = Schema(
        Key("one", "address"),
        Key("many", "addresses", default=[]),
        Key("domain", "domain"),
        Key("domains", "domains", default=[]),
    )
    got = schema.parse(
        {
            "one": '"ceo"@Example.COM',
            "many": ["a@ｅｘａｍｐｌｅ.org", "Postmaster"],
            "domain": "Bücher.example",
            "domains": ["example。com", "[192.0.2.1]"],
        }
    )
    assert got["one"].canonical == "ceo@example.com"
    assert [a.canonical for a in got["many"]] == ["a@example.org", "postmaster"]
    assert got["domain"] == "xn--bcher-kva.example"
    assert got["domains"] == ["example.com", "[192.0.2.1]"]
    for table, message in [
        ({"one": "bob"}, "one: not a valid address: 'bob'"),
        ({"many": "a@example.org"}, "many: expected a list of addresses, got 'a@example.org'"),
        ({"many": ["a@example.org", 7]}, "many[1]: expected an address such as "),
        ({"domains": ["ok.example", "bad domain"]}, "domains[1]: not a valid domain: 'bad domain'"),
        ({"domain": "@x"}, "domain: not a valid domain: '@x'"),
    ]:
        with pytest.raises(ValueError) as info:
            schema.parse(table)
        assert str(info.value).startswith(message), str(info.value)
    text = " ".join(schema.rst().split())
    assert "``many`` List of addresses; default ``[]``." in text
    assert "``one`` String (an address, e.g. ``user@example.org``)." in text

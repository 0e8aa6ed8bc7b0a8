"""The configuration keys of the PROXY protocol and XCLIENT: each read into
ListenerSettings / SMTPSettings, and every bad value refused with a
ConfigError naming the file and the dotted key."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_support import daemon_env
from test_config import assert_error, parse, table, toml_value

from bonzo.settings import ListenerSettings


def listener(**keys: object) -> str:
    return "[[listeners]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())


def test_defaults():
    config = parse("")
    assert config.settings.proxy_timeout == 10.0
    ls = config.listeners[0].settings
    assert (ls.proxy_protocol, ls.proxy_trusted, ls.xclient_trusted) == (False, (), ())


def test_keys_are_read():
    text = table("limits", proxy_timeout=2.5) + listener(
        port=25,
        proxy_protocol=True,
        proxy_trusted=["127.0.0.0/8", "::1", "2001:db8::/32"],
        xclient_trusted=["192.0.2.25"],
    )
    config = parse(text)
    assert config.settings.proxy_timeout == 2.5
    ls = config.listeners[0].settings
    assert ls.proxy_protocol is True
    assert ls.proxy_trusted == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert ls.xclient_trusted == (ipaddress.ip_network("192.0.2.25/32"),)


def test_xclient_without_proxy_protocol():
    ls = parse(listener(xclient_trusted=["127.0.0.1"])).listeners[0].settings
    assert not ls.proxy_protocol and ls.xclient_trusted


@pytest.mark.parametrize(
    "keys, key, fragment",
    [
        ({"proxy_protocol": "yes"}, "proxy_protocol", 'must be true or false, not "yes"'),
        ({"proxy_protocol": 1}, "proxy_protocol", "must be true or false"),
        ({"proxy_protocol": True}, "proxy_trusted", "must list the networks of the proxies"),
        (
            {"proxy_protocol": True, "proxy_trusted": []},
            "proxy_trusted",
            "must list the networks of the proxies",
        ),
        ({"proxy_trusted": ["127.0.0.1"]}, "proxy_trusted", "proxy_protocol is not on"),
        (
            {"proxy_protocol": True, "proxy_trusted": "127.0.0.0/8"},
            "proxy_trusted",
            "must be a list of networks like '127.0.0.0/8', not '127.0.0.0/8'",
        ),
        (
            {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8", "10.0.0.1/8"]},
            "proxy_trusted",
            "item 1, '10.0.0.1/8', is not a network: 10.0.0.1/8 has host bits set",
        ),
        (
            {"proxy_protocol": True, "proxy_trusted": ["haproxy.example"]},
            "proxy_trusted",
            "item 0, 'haproxy.example', is not a network",
        ),
        (
            {"proxy_protocol": True, "proxy_trusted": [8]},
            "proxy_trusted",
            "item 0 must be a network string, not 8",
        ),
        ({"xclient_trusted": "127.0.0.1"}, "xclient_trusted", "must be a list of networks"),
        ({"xclient_trusted": ["127.0.0.1/33"]}, "xclient_trusted", "is not a network"),
        ({"xclient_trusted": [["127.0.0.1"]]}, "xclient_trusted", "must be a network string"),
        ({"xclient_trusted": {"a": 1}}, "xclient_trusted", "must be a list of networks"),
    ],
)
def test_bad_listener_keys(keys, key, fragment):
    assert_error(listener(**keys), f"listeners[0].{key}", fragment)


@pytest.mark.parametrize("bad", [0, -1, "10", True, float("inf"), float("nan")])
def test_bad_proxy_timeout(bad):
    assert_error(table("limits", proxy_timeout=bad), "limits.proxy_timeout", "positive number")


def test_the_second_listener_is_named():
    text = listener(port=25) + listener(port=26, proxy_protocol=True)
    assert_error(text, "listeners[1].proxy_trusted", "must list the networks")


def test_a_unix_socket_listener_refuses_proxy_trusted(tmp_path):
    # Its peers have no address: the list would be ignored, and any local
    # process believed whatever client it named.
    text = listener(port=25) + listener(
        path="smtp.sock", proxy_protocol=True, proxy_trusted=["10.0.0.5"]
    )
    assert_error(
        text,
        "listeners[1].proxy_trusted",
        "a Unix socket listener (path) has no peer address to check against it",
        "the socket file's permissions (the listener's mode) and ownership",
        base_dir=tmp_path,
    )


def test_a_unix_socket_listener_takes_proxy_protocol_alone(tmp_path):
    ls = parse(listener(path="smtp.sock", proxy_protocol=True), tmp_path).listeners[0].settings
    assert (ls.proxy_protocol, ls.proxy_trusted, ls.unix_socket) == (True, (), True)
    assert (
        parse(listener(port=25, xclient_trusted=["::1"])).listeners[0].settings.unix_socket is False
    )


def test_listener_settings_take_networks_or_strings():
    net = ipaddress.ip_network("10.0.0.0/8")
    ls = ListenerSettings(proxy_protocol=True, proxy_trusted=(net, "192.0.2.0/24"))
    assert ls.proxy_trusted == (net, ipaddress.ip_network("192.0.2.0/24"))


def test_a_unix_socket_listener_refuses_xclient_trusted_without_proxy_protocol(tmp_path):
    # Its peers have no address: no front-end could ever match the list.
    text = listener(path="smtp.sock", xclient_trusted=["127.0.0.1"])
    assert_error(
        text,
        "listeners[0].xclient_trusted",
        "a Unix socket listener (path) has no peer address to check against it",
        "only with proxy_protocol",
        base_dir=tmp_path,
    )
    # Behind a PROXY header the list applies to the client it names.
    text = listener(path="smtp.sock", proxy_protocol=True, xclient_trusted=["10.0.0.0/8"])
    ls = parse(text, tmp_path).listeners[0].settings
    assert ls.unix_socket and ls.xclient_trusted


# -------------------------------------------------------------- bonzo check
def bonzo_check(tmp_path: Path, listeners: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "bonzo.toml"
    config.write_text(
        '[server]\nhostname = "mx.test"\n\n'
        + listeners
        + '\n[plugins]\nenabled = ["recipients", "maildir"]\n\n'
        + '[plugins.recipients]\ndomains = ["example.org"]\n\n'
        + f'[plugins.maildir]\npath = "{tmp_path / "Maildir"}"\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "bonzo", "check", "-c", str(config)],
        env=daemon_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_check_warns_about_trust_lists_that_hold_every_address(tmp_path):
    result = bonzo_check(
        tmp_path,
        listener(address="127.0.0.1", port=2525, xclient_trusted=["0.0.0.0/0", "::/0"])
        + listener(
            address="127.0.0.1",
            port=2526,
            proxy_protocol=True,
            proxy_trusted=["::ffff:0.0.0.0/96"],  # all of IPv4, written mapped
            xclient_trusted=["10.0.0.0/8"],
        ),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "    127.0.0.1:2526: SMTP, PROXY from 0.0.0.0/0, XCLIENT from 10.0.0.0/8" in lines
    assert [line for line in lines if "_trusted" in line] == [
        "  warning: listeners[0].xclient_trusted (127.0.0.1:2525): 0.0.0.0/0 lets any client "
        "use XCLIENT: name any client address and, with LOGIN, relay as any authenticated user",
        "  warning: listeners[0].xclient_trusted (127.0.0.1:2525): ::/0 lets any client use "
        "XCLIENT: name any client address and, with LOGIN, relay as any authenticated user",
        "  warning: listeners[1].proxy_trusted (127.0.0.1:2526): 0.0.0.0/0 lets any client "
        "send a PROXY header and name any client address",
    ]


def test_check_warns_about_trust_lists_that_hold_every_address_together(tmp_path):
    result = bonzo_check(
        tmp_path,
        listener(
            address="127.0.0.1",
            port=2525,
            xclient_trusted=["0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8", "2001:db8::/32"],
        ),
    )
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if "_trusted" in line] == [
        "  warning: listeners[0].xclient_trusted (127.0.0.1:2525): 0.0.0.0/1 128.0.0.0/1 "
        "10.0.0.0/8 hold every IPv4 address together: that lets any client use XCLIENT: name "
        "any client address and, with LOGIN, relay as any authenticated user",
    ]


def test_check_refuses_xclient_trusted_on_a_unix_socket_listener(tmp_path):
    result = bonzo_check(tmp_path, listener(path="smtp.sock", xclient_trusted=["127.0.0.1"]))
    assert result.returncode == 2, result.stdout
    [line] = result.stderr.strip().splitlines()
    assert "listeners[0].xclient_trusted: a Unix socket listener (path)" in line
    assert "Traceback" not in result.stderr

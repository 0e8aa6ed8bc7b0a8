"""The clamav plugin against a private clamd (Debian's clamav-daemon) with
a one-signature database: EICAR refused, a clean message accepted, a
message past clamd's StreamMaxLength and a stopped clamd deferred."""

from __future__ import annotations

import base64
import logging
import smtplib
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from bonzo_plugins.clamav import ClamavPlugin

from bonzo import Accept, hookimpl
from bonzo.hooks import PluginSet

from .peers import free_port, unavailable
from .scanners import EICAR, EICAR_SIGNATURE, Daemon, clamd, clamd_available


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    if not clamd_available():
        unavailable("clamd is not installed (.ci/run installs clamav-daemon)")
    with clamd() as instance:
        yield instance


class Store:
    def __init__(self) -> None:
        self.delivered: list[bytes] = []

    @hookimpl
    def bonzo_rcpt(self, session, envelope, address):
        return Accept()

    @hookimpl
    def bonzo_deliver(self, session, envelope):
        self.delivered.append(envelope.content)
        return Accept()


def chain(*plugins: tuple[str, object]) -> PluginSet:
    plugin_set = PluginSet(timeout=60.0)
    for name, p in plugins:
        plugin_set.register(p, name)
    return plugin_set


def plugin(**table) -> ClamavPlugin:
    p = ClamavPlugin()
    p.bonzo_configure(config=table, app=SimpleNamespace(base_dir="."))
    return p


ATTACHED = (
    b"From: a@example.org\r\nSubject: see attached\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
    b"--b1\r\nContent-Type: text/plain\r\n\r\nthe file\r\n"
    b"--b1\r\nContent-Type: application/octet-stream\r\n"
    b'Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename="t.com"\r\n'
    b"\r\n" + base64.b64encode(EICAR) + b"\r\n--b1--\r\n"
)


def test_eicar_refused_clean_accepted(start_server, daemon):
    store = Store()
    server = start_server(plugins=chain(("clamav", plugin(port=daemon.port)), ("store", store)))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@example.org", ["b@example.com"], ATTACHED)
        assert info.value.smtp_code == 554
        assert info.value.smtp_error.startswith(b"5.7.1 ")
        assert EICAR_SIGNATURE.encode() in info.value.smtp_error
        clean = b"Subject: hello\r\n\r\n" + b"nothing to see here\r\n" * 5000
        assert client.sendmail("a@example.org", ["b@example.com"], clean) == {}
    assert len(store.delivered) == 1 and store.delivered[0].endswith(clean)


def test_unix_socket(start_server, daemon):
    store = Store()
    path = str(daemon.root / "clamd.ctl")
    server = start_server(plugins=chain(("clamav", plugin(socket=path)), ("store", store)))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@example.org", ["b@example.com"], b"Subject: x\r\n\r\n" + EICAR)
    assert info.value.smtp_code == 554


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_past_stream_max_length_deferred_or_skipped(start_server, daemon, transport, caplog):
    """clamd's StreamMaxLength is 1M here: max_size above it makes clamd
    stop with an error (451), logged with clamd's answer over either
    transport (over a Unix socket it was a bare "Broken pipe"); max_size
    below it skips the scan."""
    big = b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1500
    store = Store()
    where = (
        {"socket": str(daemon.root / "clamd.ctl")} if transport == "unix" else {"port": daemon.port}
    )
    too_high = plugin(**where, max_size="10M")
    server = start_server(plugins=chain(("clamav", too_high), ("store", store)))
    with caplog.at_level(logging.WARNING, "bonzo.plugins.clamav"):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail("a@example.org", ["b@example.com"], big)
    assert info.value.smtp_code == 451 and info.value.smtp_error.startswith(b"4.7.1 ")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "bonzo.plugins.clamav"]
    assert line.endswith(
        f"deferred: {too_high.endpoint}: clamd: INSTREAM size limit exceeded. ERROR"
        " (StreamMaxLength in clamd.conf is below the plugin's max_size)"
    )
    matched = plugin(**where, max_size="1M")
    server = start_server(plugins=chain(("clamav", matched), ("store", store)))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        assert client.sendmail("a@example.org", ["b@example.com"], big) == {}


def test_clamd_down_deferred(start_server):
    store = Store()
    server = start_server(plugins=chain(("clamav", plugin(port=free_port())), ("store", store)))
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPDataError) as info:
            client.sendmail("a@example.org", ["b@example.com"], b"Subject: x\r\n\r\nx\r\n")
    assert info.value.smtp_code == 451 and info.value.smtp_error.startswith(b"4.7.1 ")
    assert store.delivered == []

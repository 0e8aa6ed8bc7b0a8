"""PROXY protocol and XCLIENT end to end: a real server on 127.0.0.1, raw
sockets sending headers (good, bad, none), smtplib sending XCLIENT.

The client a proxy or front-end names must be what everything sees: the
plugins (at connect and later), the EHLO reply, the Received header, the
per-client connection limit and the log lines. The connection's own peer
stays in ``session.peer_ip``.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from typing import Any

import pytest
import trustme
from bonzo_plugins.access import AccessPlugin
from e2e_support import TIMEOUT, RawClient, RecordingPlugin, wait_until

from bonzo.hooks import PluginSet
from bonzo.hookspecs import Accept
from bonzo.proxy import TLV_AUTHORITY, TLV_SSL, TLV_UNIQUE_ID, ProxyHeader, ProxyTLVs
from bonzo.server import client_of
from bonzo.session import Envelope, Session
from bonzo.settings import ListenerSettings
from bonzo.tls import CertificatePair, make_server_context

MESSAGE = b"Subject: hi\r\n\r\nHello.\r\n"


def snapshot(session: Session) -> dict[str, Any]:
    return {
        "remote_ip": session.remote_ip,
        "remote_port": session.remote_port,
        "local_ip": session.local_ip,
        "local_port": session.local_port,
        "peer_ip": session.peer_ip,
        "proxy": session.proxy,
        "xclient": session.xclient,
        "auth": session.auth,
        "helo": session.helo,
        "tls": session.tls,
    }


class Seen(RecordingPlugin):
    """Records what the session looked like at connect and at delivery."""

    def __init__(self) -> None:
        super().__init__()
        self.at_connect: list[dict[str, Any]] = []
        self.at_deliver: list[dict[str, Any]] = []

    def bonzo_connect(self, session: Session) -> Any:
        self.at_connect.append(snapshot(session))
        return super().bonzo_connect(session)

    def bonzo_deliver(self, session: Session, envelope: Envelope) -> Any:
        self.at_deliver.append(snapshot(session))
        return super().bonzo_deliver(session, envelope)


def proxied(**options: Any) -> ListenerSettings:
    options.setdefault("proxy_trusted", ["127.0.0.0/8"])
    return ListenerSettings(proxy_protocol=True, **options)


def v1(source: str, port: int = 40001, dest: str = "198.51.100.25", dport: int = 25) -> bytes:
    family = "INET6" if ":" in source else "INET"
    return ProxyHeader(1, "PROXY", family, "STREAM", source, port, dest, dport).to_bytes()


def send_message(c: RawClient) -> None:
    assert c.command("MAIL FROM:<a@example.org>").startswith(b"250")
    assert c.command("RCPT TO:<b@example.net>").startswith(b"250")
    assert c.command("DATA").startswith(b"354")
    assert c.command(MESSAGE + b".").startswith(b"250")


# ------------------------------------------------------------------ PROXY
def test_the_proxied_client_is_what_everything_sees(start_server, log_watch):
    plugin = Seen()
    server = start_server(plugin=plugin, listener=proxied())
    with RawClient(server.port) as c:
        c.send(v1("192.0.2.7"))
        ehlo = c.greet()
        assert b"Hello 192.0.2.7\r\n" in ehlo
        assert c.command("NOSUCH").startswith(b"500")
        send_message(c)
        c.command("QUIT")
    wait_until(lambda: plugin.disconnected, message="disconnect")
    seen = plugin.at_connect[0]
    assert seen == plugin.at_deliver[0] | {"helo": None}
    assert (seen["remote_ip"], seen["remote_port"]) == ("192.0.2.7", 40001)
    assert (seen["local_ip"], seen["local_port"]) == ("198.51.100.25", 25)
    assert seen["peer_ip"] == "127.0.0.1"
    assert seen["proxy"].version == 1 and seen["proxy"].source == "192.0.2.7"
    received = plugin.messages[0].header_bytes
    assert received.startswith(b"Received: from client.test ([192.0.2.7])")
    # Log lines name the client, not the proxy.
    assert log_watch.matching(r"\[\w+ 192\.0\.2\.7\] NOSUCH refused by core")
    assert log_watch.matching(r" 192\.0\.2\.7 from=<a@example\.org>", "tornado.access")


def test_v2_tlvs_and_commands_in_the_same_segment(start_server):
    plugin = Seen()
    server = start_server(plugin=plugin, listener=proxied())
    tlvs = ProxyTLVs(
        [
            (TLV_AUTHORITY, b"mx.example.org"),
            (TLV_UNIQUE_ID, b"conn-42"),
            (TLV_SSL, b"\x01\x00\x00\x00\x00\x21\x00\x07TLSv1.3"),
        ]
    )
    header = ProxyHeader(2, "PROXY", "INET6", "STREAM", "2001:db8::5", 1234, "::1", 25, tlvs)
    with RawClient(server.port) as c:
        # A proxy may send the client's first bytes with the header.
        c.send(header.to_bytes() + b"EHLO client.test\r\n")
        assert c.reply().startswith(b"220 ")
        assert c.reply().startswith(b"250-bonzo.test Hello 2001:db8::5\r\n")
        send_message(c)
    wait_until(lambda: plugin.disconnected, message="disconnect")
    seen = plugin.at_deliver[0]
    assert seen["remote_ip"] == "2001:db8::5" and seen["peer_ip"] == "127.0.0.1"
    got = seen["proxy"].tlvs
    assert got.authority == "mx.example.org" and got.unique_id == b"conn-42"
    assert got.ssl.tls and got.ssl.version == "TLSv1.3"
    assert plugin.messages[0].header_bytes.startswith(
        b"Received: from client.test ([IPv6:2001:db8::5])"
    )


@pytest.mark.parametrize(
    "header",
    [
        ProxyHeader(2, "LOCAL", "UNSPEC", "UNSPEC").to_bytes(),
        b"PROXY UNKNOWN\r\n",
    ],
)
def test_local_and_unknown_keep_the_connection_addresses(start_server, header):
    plugin = Seen()
    server = start_server(plugin=plugin, listener=proxied())
    with RawClient(server.port) as c:
        c.send(header)
        c.greet()
        c.command("QUIT")
    seen = plugin.at_connect[0]
    assert seen["remote_ip"] == seen["peer_ip"] == "127.0.0.1"
    assert seen["proxy"] is not None and not seen["proxy"].carries_addresses


def closed_without_greeting(c: RawClient, timeout: float = TIMEOUT) -> None:
    assert c.read_to_eof(timeout) == b""


def test_untrusted_source_is_closed_without_greeting(start_server, log_watch):
    plugin = Seen()
    server = start_server(plugin=plugin, listener=proxied(proxy_trusted=["192.0.2.0/24"]))
    with RawClient(server.port) as c:
        port = c.sock.getsockname()[1]
        c.send(v1("192.0.2.7"))
        closed_without_greeting(c)
    record = log_watch.wait_for(rf"127\.0\.0\.1:{port}\] closed without greeting: source not in")
    assert record.levelname == "WARNING"
    server.wait_connections(0)
    assert plugin.connected == [] and plugin.disconnected == []


def test_a_unix_peer_is_never_in_proxy_trusted(start_server, log_watch, tmp_path):
    # Through the API (the configuration refuses the combination): a peer
    # of a Unix socket has no address, so no list can vouch for it.
    plugin = Seen()
    path = str(tmp_path / "p.sock")
    start_server(plugin=plugin, listener=proxied(proxy_trusted=["10.0.0.5"]), unix_path=path)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(TIMEOUT)
        s.connect(path)
        try:
            # The server may close before the header is sent (a loaded machine).
            s.sendall(v1("198.51.100.7"))
            greeting = s.recv(512)
        except (ConnectionResetError, BrokenPipeError):  # closed with the header unread
            greeting = b""
        assert greeting == b""
    log_watch.wait_for(r"closed without greeting: source not in proxy_trusted")
    assert plugin.connected == []


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"EHLO client.test\r\n", r"not a PROXY header: b'EHLO client\.test'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "bad port b'99999'"),
        (b"PROXY \x1b[2J\x07\r\n", "control character"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x00", "signature with version 1"),
    ],
)
def test_malformed_header_is_closed_without_greeting(start_server, log_watch, data, reason):
    plugin = Seen()
    server = start_server(plugin=plugin, listener=proxied())
    with RawClient(server.port) as c:
        c.send(data)
        closed_without_greeting(c)
    record = log_watch.wait_for(r"\] closed without greeting: bad PROXY header: .*" + reason)
    assert record.levelname == "WARNING"
    message = record.getMessage()
    assert message.isprintable() and "\x1b" not in message
    assert len(log_watch.matching("closed without greeting")) == 1
    server.wait_connections(0)
    assert plugin.connected == []


def test_v2_with_a_wrong_family_after_the_length(start_server, log_watch):
    server = start_server(listener=proxied())
    with RawClient(server.port) as c:
        c.send(b"\r\n\r\n\x00\r\nQUIT\n\x21\x51\x00\x00")
        closed_without_greeting(c)
    log_watch.wait_for(r"unknown family/transport 0x51")


def test_no_header_in_time(start_server, log_watch):
    plugin = Seen()
    server = start_server(plugin=plugin, listener=proxied(), proxy_timeout=0.3)
    started = time.monotonic()
    with RawClient(server.port) as c:
        c.send(b"PROXY TCP4 ")  # a start, and nothing more
        closed_without_greeting(c)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 3
    record = log_watch.wait_for(r"closed without greeting: no PROXY header within 0\.3s")
    assert record.levelname == "WARNING"
    assert plugin.connected == []


def test_a_health_check_that_connects_and_closes_is_quiet(start_server, log_watch):
    server = start_server(listener=proxied())
    socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT).close()
    log_watch.wait_for(r"closed before the end of the PROXY header")
    server.wait_connections(0)
    assert not [r for r in log_watch.records if r.levelname == "WARNING"]


def test_shutdown_closes_a_connection_still_waiting_for_its_header(start_server):
    plugin = Seen()
    server = start_server(plugin=plugin, listener=proxied())
    with RawClient(server.port) as c:
        server.wait_connections(1)
        started = time.monotonic()
        server.run(server.server.shutdown(grace=30))
        assert time.monotonic() - started < 3
        closed_without_greeting(c)
    assert plugin.connected == [] and plugin.disconnected == []


def test_the_per_client_limit_counts_proxied_addresses(start_server, log_watch):
    server = start_server(listener=proxied(), max_connections_per_ip=1)
    first = RawClient(server.port)
    try:
        first.send(v1("192.0.2.1"))
        first.greet(None)
        with RawClient(server.port) as second:
            second.send(v1("192.0.2.1"))
            assert second.reply() == b"421 4.7.0 Too many connections from your address\r\n"
            closed_without_greeting(second)
        # Another client through the same proxy (the same peer) is welcome.
        with RawClient(server.port) as other:
            other.send(v1("192.0.2.2"))
            other.greet(None)
            other.command("QUIT")
        log_watch.wait_for(
            r"\[\w+ 192\.0\.2\.1\] connect refused by core: 421 4\.7\.0 Too many connections "
            r"from your address; arg='' \(max_connections_per_ip; via 127\.0\.0\.1\)"
        )
    finally:
        first.close()
    server.wait_connections(0)
    assert server.call(lambda: (server.server.count.total, dict(server.server.count.per_ip))) == (
        0,
        {},
    )
    with RawClient(server.port) as again:
        again.send(v1("192.0.2.1"))
        again.greet(None)


V6 = "2001:db8::25"  # the proxy's own address, for IPv6 headers


def test_an_ipv6_client_counts_by_its_network(start_server, log_watch):
    # One host or home network holds a whole /64: counted per address, it
    # would take a fresh one for each connection and never meet the limit.
    server = start_server(listener=proxied(), max_connections_per_ip=1)
    first = RawClient(server.port)
    mapped = RawClient(server.port)
    try:
        first.send(v1("2001:db8:1:2::10", dest=V6))
        first.greet(None)
        with RawClient(server.port) as second:
            second.send(v1("2001:db8:1:2:aaaa::99", dest=V6))  # the same /64
            assert second.reply() == b"421 4.7.0 Too many connections from your address\r\n"
        with RawClient(server.port) as neighbour:
            neighbour.send(v1("2001:db8:1:3::10", dest=V6))  # the next /64: another client
            neighbour.greet(None)
            neighbour.command("QUIT")
        # An IPv4 client written as IPv4-mapped IPv6 is that IPv4 client.
        mapped.send(v1("192.0.2.1"))
        mapped.greet(None)
        with RawClient(server.port) as again:
            again.send(v1("::ffff:192.0.2.1", dest=V6))
            assert again.reply() == b"421 4.7.0 Too many connections from your address\r\n"
        counted = server.call(lambda: dict(server.server.count.per_ip))
        assert counted == {"2001:db8:1:2::/64": 1, "192.0.2.1": 1}
    finally:
        first.close()
        mapped.close()
    server.wait_connections(0)
    assert server.call(lambda: dict(server.server.count.per_ip)) == {}


def test_ipv6_prefix_length_sets_how_much_of_an_address_is_one_client(start_server):
    server = start_server(listener=proxied(), max_connections_per_ip=1, ipv6_prefix_length=128)
    with RawClient(server.port) as first, RawClient(server.port) as second:
        first.send(v1("2001:db8:1:2::10", dest=V6))
        first.greet(None)
        second.send(v1("2001:db8:1:2::11", dest=V6))  # counted apart at /128
        second.greet(None)
    assert client_of("2001:db8:1:2:3:4:5:6", 48) == "2001:db8:1::/48"
    assert client_of("2001:db8::1", 128) == "2001:db8::1"
    assert client_of("::ffff:10.0.0.1", 64) == "10.0.0.1"
    assert client_of("10.0.0.1", 64) == "10.0.0.1"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, CertificatePair]:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test")
    tmp = tmp_path_factory.mktemp("certs")
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    return ca, CertificatePair(str(tmp / "cert.pem"), str(tmp / "key.pem"))


def test_implicit_tls_starts_after_the_header(start_server, certs):
    ca, pair = certs
    plugin = Seen()
    listener = proxied(tls_context=make_server_context(pair), implicit_tls=True)
    server = start_server(plugin=plugin, listener=listener)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    raw.sendall(v1("192.0.2.9"))
    tls = context.wrap_socket(raw, server_hostname="mx.test")
    client = smtplib.SMTP(local_hostname="client.test", timeout=TIMEOUT)
    client.sock = tls
    try:
        code, _ = client.getreply()
        assert code == 220
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        client.quit()
    finally:
        client.close()
    wait_until(lambda: plugin.disconnected, message="disconnect")
    seen = plugin.at_deliver[0]
    assert seen["remote_ip"] == "192.0.2.9" and seen["tls"]["version"].startswith("TLSv1.")
    header = plugin.messages[0].header_bytes
    assert header.startswith(b"Received: from client.test ([192.0.2.9])") and b"ESMTPS" in header


def test_xclient_trust_uses_the_proxied_address(start_server):
    server = start_server(listener=proxied(xclient_trusted=["10.0.0.0/8"]))
    for source, offered in (("10.1.2.3", True), ("192.0.2.1", False)):
        with RawClient(server.port) as c:
            c.send(v1(source))
            assert (b"XCLIENT" in c.greet()) is offered


# ---------------------------------------------------------------- XCLIENT
def smtp(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="filter.test", timeout=TIMEOUT)


def test_xclient_from_a_trusted_front_end(start_server, log_watch):
    plugin = Seen()
    listener = ListenerSettings(xclient_trusted=["127.0.0.0/8"])
    server = start_server(plugin=plugin, listener=listener)
    with smtp(server.port) as client:
        client.ehlo()
        assert client.esmtp_features["xclient"] == (
            "NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT"
        )
        code, text = client.docmd(
            "XCLIENT", "ADDR=192.0.2.7 PORT=4567 NAME=client.example LOGIN=alice HELO=orig.test"
        )
        assert (code, text) == (220, b"bonzo.test ESMTP")
        code, text = client.ehlo("orig.test")
        assert code == 250 and text.startswith(b"bonzo.test Hello 192.0.2.7\n")
        assert "xclient" not in client.esmtp_features  # 192.0.2.7 is not trusted
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    wait_until(lambda: plugin.disconnected, message="disconnect")
    first, second = plugin.at_connect
    assert first["remote_ip"] == "127.0.0.1" and first["xclient"] is None
    assert (second["remote_ip"], second["remote_port"], second["peer_ip"]) == (
        "192.0.2.7",
        4567,
        "127.0.0.1",
    )
    seen = plugin.at_deliver[0]
    assert seen["auth"] == "alice" and seen["helo"] == "orig.test"
    assert seen["xclient"] == {
        "ADDR": "192.0.2.7",
        "PORT": "4567",
        "NAME": "client.example",
        "LOGIN": "alice",
        "HELO": "orig.test",
    }
    header = plugin.messages[0].header_bytes
    assert header.startswith(b"Received: from orig.test ([192.0.2.7])")
    assert b"(authenticated as alice)" in header and b"ESMTPA" in header
    assert len(plugin.disconnected) == 1
    log_watch.wait_for(r"\[\w+ 192\.0\.2\.7\] XCLIENT from 127\.0\.0\.1:\d+: client 192\.0\.2\.7")


@pytest.mark.parametrize("trusted", [(), ["192.0.2.0/24"]])
def test_xclient_from_an_untrusted_client(start_server, trusted):
    plugin = Seen()
    server = start_server(plugin=plugin, listener=ListenerSettings(xclient_trusted=trusted))
    with smtp(server.port) as client:
        client.ehlo()
        assert "xclient" not in client.esmtp_features
        assert client.docmd("XCLIENT", "ADDR=192.0.2.7") == (
            550,
            b"5.7.0 Error: insufficient authorization",
        )
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    wait_until(lambda: plugin.disconnected, message="disconnect")
    assert plugin.at_deliver[0]["remote_ip"] == "127.0.0.1"
    assert len(plugin.at_connect) == 1


def test_xclient_bad_syntax(start_server):
    server = start_server(listener=ListenerSettings(xclient_trusted=["127.0.0.1/32"]))
    with smtp(server.port) as client:
        client.ehlo()
        assert client.docmd("XCLIENT", "ADDR=192.0.2.999") == (
            501,
            b"5.5.4 Bad XCLIENT ADDR syntax: bad address",
        )
        assert client.docmd("XCLIENT", "COLOR=blue")[0] == 501
        assert client.docmd("XCLIENT", "LOGIN=a+zz")[0] == 501
        assert client.noop()[0] == 250


def test_xclient_naming_a_client_the_access_rules_refuse(start_server):
    access = AccessPlugin()
    access.bonzo_configure(
        {"rules": [{"stage": "connect", "match": "192.0.2.66", "action": "deny"}]}, None
    )
    plugin = Seen()
    plugins = PluginSet(timeout=TIMEOUT)
    plugins.register(access, "access")
    plugins.register(plugin, "seen")
    listener = ListenerSettings(xclient_trusted=["127.0.0.0/8"])
    server = start_server(plugins=plugins, listener=listener)
    with RawClient(server.port) as c:
        c.greet()
        assert c.command("XCLIENT ADDR=192.0.2.66") == b"554 5.7.1 Access denied\r\n"
        assert c.read_to_eof() == b""
    with RawClient(server.port) as c:
        c.greet()
        assert c.command("XCLIENT ADDR=192.0.2.67").startswith(b"220 ")
        assert c.command("EHLO x").startswith(b"250-bonzo.test Hello 192.0.2.67\r\n")


def test_xclient_moves_the_per_client_count(start_server, log_watch):
    listener = ListenerSettings(xclient_trusted=["127.0.0.0/8"])
    server = start_server(listener=listener, max_connections_per_ip=1)
    with RawClient(server.port) as first:
        first.greet()
        assert first.command("XCLIENT ADDR=192.0.2.1").startswith(b"220 ")
        # 127.0.0.1 holds no connection now: another front-end connection is welcome.
        with RawClient(server.port) as second:
            second.greet()
            assert second.command("XCLIENT ADDR=192.0.2.1") == (
                b"421 4.7.0 Too many connections from your address\r\n"
            )
            assert second.read_to_eof() == b""
        log_watch.wait_for(
            r"\[\w+ 192\.0\.2\.1\] XCLIENT refused by core: 421 4\.7\.0 Too many connections "
            r"from your address; arg='ADDR=192\.0\.2\.1' "
            r"\(max_connections_per_ip; via 127\.0\.0\.1\)"
        )
        # The refused one is counted until its client has closed too.
        wait_until(
            lambda: server.call(lambda: dict(server.server.count.per_ip)) == {"192.0.2.1": 1},
            message="the refused connection gone",
        )
    server.wait_connections(0)
    assert server.call(lambda: server.server.count.total) == 0


def test_xclient_in_a_transaction(start_server):
    server = start_server(listener=ListenerSettings(xclient_trusted=["127.0.0.0/8"]))
    with RawClient(server.port) as c:
        c.greet()
        assert c.command("MAIL FROM:<a@example.org>").startswith(b"250")
        assert c.command("XCLIENT ADDR=192.0.2.1") == (
            b"503 5.5.1 Error: MAIL transaction in progress\r\n"
        )


class FrontEndFindings(Seen):
    """Keeps a connection-long mark in the stash, and records what the
    session's results and stash held at MAIL."""

    def __init__(self) -> None:
        super().__init__()
        self.at_mail: list[tuple[list[str], dict[str, Any]]] = []

    def bonzo_connect(self, session: Session) -> Any:
        session.stash.setdefault("first_seen", session.remote_ip)
        return super().bonzo_connect(session)

    def bonzo_mail(self, session: Session, envelope: Envelope) -> Any:
        self.at_mail.append(([str(r) for r in session.results], dict(session.stash)))
        return super().bonzo_mail(session, envelope)


def test_xclient_forgets_what_plugins_found_about_the_front_end(start_server, dns_stub):
    # The front-end (127.0.0.1) is listed; the client it names is in the
    # list's skip_networks: dnsbl has no verdict on the client, and must not
    # find the front-end's as if it were the client's.
    from types import SimpleNamespace

    from bonzo_plugins.dnsbl import DnsblPlugin

    dns_stub.add("1.0.0.127.bl.example", "A", "127.0.0.2")
    dnsbl = DnsblPlugin()
    app = SimpleNamespace(
        dns=dns_stub.resolver(), settings=SimpleNamespace(hostname="bonzo.test"), base_dir=None
    )
    dnsbl.bonzo_configure(
        config={"zones": ["bl.example"], "stage": "mail", "skip_networks": ["192.0.2.0/24"]},
        app=app,
    )
    plugin = FrontEndFindings()
    plugins = PluginSet(timeout=TIMEOUT)
    plugins.register(dnsbl, "dnsbl")
    plugins.register(plugin, "seen")
    listener = ListenerSettings(xclient_trusted=["127.0.0.0/8"])
    server = start_server(plugins=plugins, listener=listener)
    with RawClient(server.port) as c:
        c.greet("filter.test")
        # The front-end itself is judged, as any client.
        assert c.command("MAIL FROM:<a@example.org>").startswith(b"554 5.7.1")
        assert c.command("XCLIENT ADDR=192.0.2.5").startswith(b"220 ")
        c.command("EHLO client.test")
        send_message(c)
        c.command("QUIT")
    wait_until(lambda: plugin.disconnected, message="disconnect")
    [client] = plugin.at_mail  # the front-end's MAIL was refused by dnsbl first
    assert client[0] == []  # nothing found about 192.0.2.5
    # The stash is the connection's: plugins keep their resources there, and
    # start their per-client data over in bonzo_connect, which ran again.
    assert client[1] == {"first_seen": "127.0.0.1"}
    assert [s["remote_ip"] for s in plugin.at_connect] == ["127.0.0.1", "192.0.2.5"]


def test_xclient_after_starttls_keeps_the_tls_and_forgets_auth_failures(start_server, certs):
    ca, pair = certs

    class Passwords(Seen):
        def bonzo_auth(self, password: str) -> Any:
            return Accept() if password == "right" else None

    plugin = Passwords()
    listener = ListenerSettings(
        xclient_trusted=["127.0.0.0/8"], tls_context=make_server_context(pair)
    )
    server = start_server(
        plugin=plugin, listener=listener, max_auth_failures=2, auth_failure_delay=0
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False  # the certificate is for mx.test
    with smtplib.SMTP("127.0.0.1", server.port, timeout=TIMEOUT) as client:
        client.starttls(context=context)
        client.ehlo("filter.test")
        # The front-end's own failed attempt is not the client's.
        assert client.docmd("AUTH", "PLAIN AGEAd3Jvbmc=")[0] == 535  # a / wrong
        assert client.docmd("XCLIENT", "ADDR=192.0.2.5")[0] == 220
        client.ehlo("client.test")
        assert client.docmd("AUTH", "PLAIN AGEAd3Jvbmc=")[0] == 535
        assert client.docmd("AUTH", "PLAIN AGEAcmlnaHQ=")[0] == 235  # a / right
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    wait_until(lambda: plugin.disconnected, message="disconnect")
    seen = plugin.at_deliver[0]
    assert seen["remote_ip"] == "192.0.2.5" and seen["auth"] == "a"
    assert seen["tls"]["version"].startswith("TLSv1.")
    assert b"ESMTPSA" in plugin.messages[0].header_bytes


# ------------------------------------------------------- what the client sends
def test_a_bad_server_name_from_the_client_does_not_refuse_it(start_server, log_watch):
    # A TLS-terminating proxy passes the client's SNI on as it came: octets
    # that are not printable UTF-8 are the client's doing, not a bad header.
    plugin = Seen()
    server = start_server(plugin=plugin, listener=proxied())
    tlvs = ProxyTLVs([(TLV_AUTHORITY, b"mx\x01te\xffst"), (TLV_UNIQUE_ID, b"conn-7")])
    header = ProxyHeader(2, "PROXY", "INET", "STREAM", "192.0.2.7", 1234, "198.51.100.25", 25, tlvs)
    with RawClient(server.port) as c:
        c.send(header.to_bytes())
        assert b"Hello 192.0.2.7\r\n" in c.greet()
        c.command("QUIT")
    wait_until(lambda: plugin.disconnected, message="disconnect")
    got = plugin.at_connect[0]["proxy"].tlvs
    assert got.authority is None and got[TLV_AUTHORITY] == b"mx\x01te\xffst"
    assert got.unique_id == b"conn-7"
    record = log_watch.wait_for(
        r"\[\w+ 192\.0\.2\.7\] PROXY v2 header from 127\.0\.0\.1:\d+: TLV left out: "
        r"authority TLV is not UTF-8$"
    )
    assert record.levelname == "INFO"
    assert not [r for r in log_watch.records if r.levelname == "WARNING"]


def test_an_ipv4_mapped_client_is_an_ipv4_client(start_server, log_watch):
    plugin = Seen()
    listener = proxied(xclient_trusted=["198.51.100.0/24"])
    server = start_server(plugin=plugin, listener=listener)
    with RawClient(server.port) as c:
        c.send(v1("::ffff:127.0.0.2", dest="::ffff:127.0.0.1"))
        assert b"Hello 127.0.0.2\r\n" in c.greet()
        send_message(c)
    with RawClient(server.port) as c:
        c.send(v1("::ffff:198.51.100.9", dest="::ffff:127.0.0.1"))
        c.greet()
        assert c.command("XCLIENT ADDR=::ffff:192.0.2.44").startswith(b"220 ")
        assert b"Hello 192.0.2.44\r\n" in c.command("EHLO client.test")
        send_message(c)
    wait_until(lambda: len(plugin.disconnected) == 2, message="two sessions")
    first, second = plugin.at_deliver
    assert (first["remote_ip"], first["local_ip"]) == ("127.0.0.2", "127.0.0.1")
    assert first["proxy"].family == "INET6"
    assert second["remote_ip"] == "192.0.2.44" and second["xclient"]["ADDR"] == "192.0.2.44"
    received = [m.header_bytes for m in plugin.messages]
    assert received[0].startswith(b"Received: from client.test ([127.0.0.2])")
    assert received[1].startswith(b"Received: from client.test ([192.0.2.44])")
    assert log_watch.matching(r"\[\w+ 127\.0\.0\.2\] PROXY v1 PROXY INET6 from 127\.0\.0\.1")


def test_mail_on_a_session_whose_header_named_no_client_is_logged(start_server, log_watch):
    # HAProxy sends LOCAL (v2) or UNKNOWN (v1) for its health checks, and
    # also for a client it took on a Unix socket: that one is judged as
    # the proxy. A health check sends no MAIL; a relayed client does.
    plugin = Seen()
    server = start_server(plugin=plugin, listener=proxied())
    local = ProxyHeader(2, "LOCAL", "UNSPEC", "UNSPEC").to_bytes()
    with RawClient(server.port) as c:  # a health check (option smtpchk)
        c.send(local)
        c.greet()
        c.command("QUIT")
    for header in (local, b"PROXY UNKNOWN\r\n"):
        with RawClient(server.port) as c:
            c.send(header)
            c.greet()
            send_message(c)
            send_message(c)
            c.command("QUIT")
    wait_until(lambda: len(plugin.disconnected) == 3, message="three sessions")
    lines = log_watch.matching(r"mail from a client the PROXY header did not name")
    assert [r.getMessage().split("] ", 1)[1] for r in lines] == [
        "mail from a client the PROXY header did not name (v2 LOCAL UNSPEC): "
        "it has the proxy's own address",
        "mail from a client the PROXY header did not name (v1 PROXY UNSPEC): "
        "it has the proxy's own address",
    ]
    assert all(r.levelname == "INFO" for r in lines)


def test_unix_socket_peers_are_named_by_the_socket(start_server, log_watch, tmp_path):
    path = str(tmp_path / "p.sock")
    listener = proxied(proxy_trusted=[], unix_socket=True)
    start_server(listener=listener, unix_path=path, proxy_timeout=0.3)
    for data in (b"EHLO x\r\n", b""):  # not a header; nothing in time
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(TIMEOUT)
            s.connect(path)
            s.sendall(data)
            try:
                assert s.recv(512) == b""
            except ConnectionResetError:  # closed with the octets unread
                pass
    lines = [
        log_watch.wait_for(r"closed without greeting: bad PROXY header"),
        log_watch.wait_for(r"closed without greeting: no PROXY header within 0\.3s"),
    ]
    for record in lines:
        assert f" unix:{path}] closed without greeting" in record.getMessage()
    assert not log_watch.matching(r"0\.0\.0\.0:0")


def test_unix_socket_clients_are_counted_only_when_a_header_names_them(start_server, tmp_path):
    """A Unix socket's own peers (PROXY UNKNOWN names nobody) are not held to
    max_connections_per_ip; a client a header names is, as on TCP."""
    path = str(tmp_path / "p.sock")
    listener = proxied(proxy_trusted=[], unix_socket=True)
    server = start_server(listener=listener, unix_path=path, max_connections_per_ip=1)
    headers = [b"PROXY UNKNOWN\r\n"] * 2 + [v1("192.0.2.1")] * 2
    socks = []
    replies = []
    try:
        for header in headers:
            s = socket.socket(socket.AF_UNIX)
            socks.append(s)
            s.settimeout(TIMEOUT)
            s.connect(path)
            s.sendall(header)
            replies.append(s.recv(512))
        per_ip = server.call(lambda: dict(server.server.count.per_ip))
    finally:
        for s in socks:
            s.close()
    assert [r[:4] for r in replies] == [b"220 "] * 3 + [b"421 "], replies
    assert replies[3] == b"421 4.7.0 Too many connections from your address\r\n"
    assert per_ip == {"192.0.2.1": 1}


# ------------------------------------------------------------ the front-end
def test_a_trusted_front_end_is_not_held_to_the_per_client_limit(start_server, log_watch):
    # A content filter relays many clients: each is counted once XCLIENT
    # names it, the filter itself never.
    listener = ListenerSettings(xclient_trusted=["127.0.0.1/32"])
    server = start_server(listener=listener, max_connections_per_ip=2)
    filters = [RawClient(server.port) for _ in range(4)]
    try:
        for n, c in enumerate(filters):
            c.greet("filter.test")
            assert c.command(f"XCLIENT ADDR=192.0.2.{n % 2 + 1}").startswith(b"220 ")
        # Clients .1 and .2 have two connections each: a third is refused.
        with RawClient(server.port) as c:
            c.greet("filter.test")
            assert c.command("XCLIENT ADDR=192.0.2.1") == (
                b"421 4.7.0 Too many connections from your address\r\n"
            )
        counted = server.call(lambda: dict(server.server.count.per_ip))
        assert counted == {"192.0.2.1": 2, "192.0.2.2": 2}
        # A connection that has not named its client yet counts in the
        # total only.
        with RawClient(server.port) as c:
            c.greet("filter.test")
            assert server.call(lambda: server.server.count.total) == 5
            assert server.call(lambda: dict(server.server.count.per_ip)) == counted
    finally:
        for c in filters:
            c.close()
    server.wait_connections(0)
    assert server.call(lambda: (server.server.count.total, dict(server.server.count.per_ip))) == (
        0,
        {},
    )


def test_a_front_end_behind_a_proxy_is_not_counted_either(start_server):
    listener = proxied(xclient_trusted=["10.0.0.0/8"])
    server = start_server(listener=listener, max_connections_per_ip=1)
    with RawClient(server.port) as first, RawClient(server.port) as second:
        for c in (first, second):
            c.send(v1("10.0.0.25"))
            c.greet("filter.test")
        assert server.call(lambda: dict(server.server.count.per_ip)) == {}
        assert server.call(lambda: server.server.count.total) == 2
        assert first.command("XCLIENT ADDR=192.0.2.1").startswith(b"220 ")
        assert server.call(lambda: dict(server.server.count.per_ip)) == {"192.0.2.1": 1}
        assert second.command("XCLIENT ADDR=192.0.2.1").startswith(b"421 4.7.0")


def test_the_greeting_after_xclient_on_an_lmtp_listener_says_lmtp(start_server):
    listener = ListenerSettings(protocol="lmtp", xclient_trusted=["127.0.0.0/8"])
    server = start_server(listener=listener)
    with RawClient(server.port) as c:
        assert c.reply() == b"220 bonzo.test LMTP\r\n"
        assert c.command("LHLO filter.test").startswith(b"250-")
        assert c.command("XCLIENT ADDR=192.0.2.1") == b"220 bonzo.test LMTP\r\n"
        assert c.command("LHLO client.test").startswith(b"250-bonzo.test Hello 192.0.2.1\r\n")

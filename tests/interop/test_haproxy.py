"""Bonzo behind a real HAProxy (Debian's package) speaking the PROXY protocol.

HAProxy relays TCP from smtplib clients to a Bonzo listener with
``proxy_protocol``; it connects to Bonzo from 127.0.0.7 (``source``), the
only address in ``proxy_trusted``, and the clients connect from other
loopback addresses (127.0.0.2 to .6), so the client Bonzo sees can only be
right if it came from the header. Checked: the session, the plugins, the
Received header and the per-client limit see the client; version 2's TLVs
(unique id, CRC32C, the TLS facts of a connection HAProxy decrypted, ALPN,
the server name); implicit TLS that HAProxy passes through; health checks
that send a LOCAL header (and, before a TLS handshake, are DEBUG lines); IPv6
clients.
"""

from __future__ import annotations

import logging
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from bonzo_plugins.access import AccessPlugin
from daemon_support import daemon_env, daemons
from e2e_support import TIMEOUT, RecordingPlugin, ServerThread, wait_until

from bonzo.hooks import PluginSet
from bonzo.session import Envelope, Session
from bonzo.settings import ListenerSettings
from bonzo.tls import CertificatePair, make_server_context

from .haproxy import (
    Frontend,
    HAProxy,
    free_port,
    haproxy_binary,
    ipv6_loopback,
    running_haproxy,
)

pytestmark = [
    pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed"),
    pytest.mark.timeout(90),
]

ROOT = Path(__file__).resolve().parents[2]
#: HAProxy connects to Bonzo from this address (the only trusted one).
PROXY_SOURCE = "127.0.0.7"
MESSAGE = b"Subject: via HAProxy\r\n\r\nHello.\r\n"


class Seen(RecordingPlugin):
    """Records what the session looked like at connect and at delivery."""

    def __init__(self) -> None:
        super().__init__()
        self.at_connect: list[dict[str, Any]] = []
        self.at_deliver: list[dict[str, Any]] = []

    @staticmethod
    def snapshot(session: Session) -> dict[str, Any]:
        return {
            "remote_ip": session.remote_ip,
            "remote_port": session.remote_port,
            "local_ip": session.local_ip,
            "local_port": session.local_port,
            "peer_ip": session.peer_ip,
            "proxy": session.proxy,
            "tls": session.tls,
        }

    def bonzo_connect(self, session: Session) -> Any:
        self.at_connect.append(self.snapshot(session))
        return super().bonzo_connect(session)

    def bonzo_deliver(self, session: Session, envelope: Envelope) -> Any:
        self.at_deliver.append(self.snapshot(session))
        return super().bonzo_deliver(session, envelope)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cert = ca.issue_cert("mx.test", "127.0.0.1", "::1")
    tmp = tmp_path_factory.mktemp("haproxy-certs")
    paths = {"cert": tmp / "cert.pem", "key": tmp / "key.pem", "both": tmp / "both.pem"}
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths["both"]))
    return {name: str(path) for name, path in paths.items()}


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[..., HAProxy]]:
    """``haproxy(frontend, ...)`` starts a private HAProxy; stopped at the end."""
    stack: list[Any] = []

    def start(*frontends: Frontend) -> HAProxy:
        manager = running_haproxy(tmp_path, list(frontends))
        stack.append(manager)
        return manager.__enter__()

    yield start
    for manager in reversed(stack):
        manager.__exit__(None, None, None)


def bonzo(start_server: Callable[..., ServerThread], plugin: Any = None, **options: Any):
    listener = options.pop("listener", {})
    settings = ListenerSettings(proxy_protocol=True, proxy_trusted=[PROXY_SOURCE], **listener)
    if isinstance(plugin, PluginSet):
        return start_server(plugins=plugin, listener=settings, **options)
    return start_server(plugin=plugin or Seen(), listener=settings, **options)


def server_line(server: ServerThread, options: str) -> tuple[tuple[str, int], str]:
    return (server.host, server.port), f"{options} source {PROXY_SOURCE}"


def connect(port: int, source: str, host: str = "127.0.0.1") -> smtplib.SMTP:
    return smtplib.SMTP(
        host, port, local_hostname="client.test", timeout=TIMEOUT, source_address=(source, 0)
    )


def tls_connect(
    port: int, source: str, context: ssl.SSLContext, server_hostname: str = "mx.test"
) -> smtplib.SMTP:
    """smtplib over TLS from the first byte, with SNI (which smtplib does not
    send for an IP address)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0))
    client = smtplib.SMTP(local_hostname="client.test", timeout=TIMEOUT)
    client.sock = context.wrap_socket(raw, server_hostname=server_hostname)
    code, text = client.getreply()
    assert code == 220, text
    return client


def send(client: smtplib.SMTP, to: str = "b@example.net") -> tuple[str, int]:
    """Send one message; return the client's own address."""
    here = client.sock.getsockname()
    client.sendmail("a@example.org", [to], MESSAGE)
    client.quit()
    return here[0], here[1]


@pytest.mark.parametrize("version", [1, 2])
def test_the_client_behind_haproxy_is_the_session_client(start_server, haproxy, version):
    plugin = Seen()
    server = bonzo(start_server, plugin)
    backend, options = server_line(
        server, "send-proxy" if version == 1 else "send-proxy-v2 proxy-v2-options unique-id,crc32c"
    )
    front = Frontend("smtp", backend, options, frontend_lines=["unique-id-format id-%ci-%cp"])
    proxy = haproxy(front)
    ip, port = send(connect(proxy.ports["smtp"], "127.0.0.5"))
    assert ip == "127.0.0.5"
    wait_until(lambda: plugin.disconnected, message="the session to end")
    seen = plugin.at_connect[0]
    assert (seen["remote_ip"], seen["remote_port"]) == ("127.0.0.5", port)
    assert (seen["local_ip"], seen["local_port"]) == ("127.0.0.1", proxy.ports["smtp"])
    assert seen["peer_ip"] == PROXY_SOURCE
    assert plugin.at_deliver[0] == seen
    header = seen["proxy"]
    assert header.version == version and header.command == "PROXY" and header.family == "INET"
    if version == 2:
        assert header.tlvs.unique_id == f"id-127.0.0.5-{port}".encode()
        assert header.tlvs.crc32c is not None  # and it was right, or no session
    received = plugin.messages[0].header_bytes
    assert received.startswith(b"Received: from client.test ([127.0.0.5])")


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("options", ["send-proxy", "send-proxy-v2"])
def test_an_ipv6_client(start_server, haproxy, options):
    plugin = Seen()
    server = bonzo(start_server, plugin)
    backend, line = server_line(server, options)
    proxy = haproxy(Frontend("v6", backend, line, bind_host="::1"))
    send(connect(proxy.ports["v6"], "::1", host="::1"))
    wait_until(lambda: plugin.messages, message="the message")
    seen = plugin.at_deliver[0]
    assert seen["remote_ip"] == "::1" and seen["peer_ip"] == PROXY_SOURCE
    assert seen["proxy"].family == "INET6"
    assert plugin.messages[0].header_bytes.startswith(b"Received: from client.test ([IPv6:::1])")


def test_tls_terminated_by_haproxy_shows_in_the_tlvs(start_server, haproxy, ca, certs):
    plugin = Seen()
    server = bonzo(start_server, plugin)
    options = "send-proxy-v2 proxy-v2-options ssl,cert-cn,ssl-cipher,authority,crc32c"
    backend, line = server_line(server, options)
    proxy = haproxy(
        Frontend("tls", backend, line, bind_options=f"ssl crt {certs['both']} alpn smtp")
    )
    context = client_context(ca)
    context.set_alpn_protocols(["smtp"])
    client = tls_connect(proxy.ports["tls"], "127.0.0.4", context)
    version, cipher = client.sock.version(), client.sock.cipher()[0]
    send(client)
    wait_until(lambda: plugin.messages, message="the message")
    seen = plugin.at_deliver[0]
    assert seen["remote_ip"] == "127.0.0.4"
    assert seen["tls"] is None  # Bonzo's own connection is plain
    tlvs = seen["proxy"].tlvs
    assert tlvs.authority == "mx.test" and tlvs.alpn == b"smtp"
    assert tlvs.ssl is not None and tlvs.ssl.tls and not tlvs.ssl.verified
    assert (tlvs.ssl.version, tlvs.ssl.cipher) == (version, cipher)


def implicit_tls(certs: dict[str, str]) -> dict[str, Any]:
    """A listener's TLS-from-the-first-byte settings with the test certificate."""
    pair = CertificatePair(certs["cert"], certs["key"])
    return {"tls_context": make_server_context(pair), "implicit_tls": True}


def test_implicit_tls_passed_through_haproxy(start_server, haproxy, ca, certs):
    plugin = Seen()
    server = bonzo(start_server, plugin, listener=implicit_tls(certs))
    backend, line = server_line(server, "send-proxy-v2")
    proxy = haproxy(Frontend("smtps", backend, line))
    client = tls_connect(proxy.ports["smtps"], "127.0.0.3", client_context(ca))
    send(client)
    wait_until(lambda: plugin.messages, message="the message")
    seen = plugin.at_deliver[0]
    assert seen["remote_ip"] == "127.0.0.3" and seen["peer_ip"] == PROXY_SOURCE
    assert seen["tls"]["version"].startswith("TLSv1.") and seen["tls"]["sni"] == "mx.test"
    received = plugin.messages[0].header_bytes
    assert received.startswith(b"Received: from client.test ([127.0.0.3])")
    assert b"ESMTPS" in received


def test_the_per_client_limit_counts_the_clients_not_haproxy(start_server, haproxy):
    server = bonzo(start_server, max_connections_per_ip=2)
    backend, line = server_line(server, "send-proxy-v2")
    port = haproxy(Frontend("smtp", backend, line)).ports["smtp"]
    held = [connect(port, "127.0.0.2"), connect(port, "127.0.0.2")]
    try:
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            connect(port, "127.0.0.2")
        assert refused.value.smtp_code == 421
        assert refused.value.smtp_error == b"4.7.0 Too many connections from your address"
        # Three connections from HAProxy's one address so far: others pass.
        other = connect(port, "127.0.0.3")
        assert other.noop()[0] == 250
        other.quit()
    finally:
        for client in held:
            client.quit()


def test_the_access_plugin_judges_the_client(start_server, haproxy):
    access = AccessPlugin()
    rules = [{"stage": "connect", "match": "127.0.0.6", "action": "deny"}]
    access.bonzo_configure({"rules": rules}, None)
    plugin = Seen()
    plugins = PluginSet(timeout=TIMEOUT)
    plugins.register(access, "access")
    plugins.register(plugin, "seen")
    server = bonzo(start_server, plugins)
    backend, line = server_line(server, "send-proxy")
    port = haproxy(Frontend("smtp", backend, line)).ports["smtp"]
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        connect(port, "127.0.0.6")
    assert (refused.value.smtp_code, refused.value.smtp_error) == (554, b"5.7.1 Access denied")
    send(connect(port, "127.0.0.5"))
    wait_until(lambda: plugin.messages, message="the message")
    assert [s["remote_ip"] for s in plugin.at_connect] == ["127.0.0.5"]


@pytest.mark.parametrize("options", ["send-proxy", "send-proxy-v2"])
def test_health_checks_with_the_header(start_server, haproxy, log_watch, options):
    plugin = Seen()
    server = bonzo(start_server, plugin)
    backend, line = server_line(server, f"{options} check check-send-proxy inter 200ms")
    haproxy(Frontend("smtp", backend, line))
    wait_until(lambda: len(plugin.at_connect) >= 2, timeout=10, message="two health checks")
    for seen in plugin.at_connect:
        # HAProxy's checks name HAProxy itself (version 1) or send LOCAL
        # (version 2, the connection's own addresses stand).
        assert seen["remote_ip"] == seen["peer_ip"] == PROXY_SOURCE
        header = seen["proxy"]
        if options == "send-proxy":
            assert (header.version, header.source) == (1, PROXY_SOURCE)
        else:
            assert (header.version, header.command) == (2, "LOCAL")
    time.sleep(0.3)
    assert not [r for r in log_watch.records if r.levelname == "WARNING"]


def test_health_checks_of_an_implicit_tls_port_are_debug_lines(
    start_server, haproxy, log_watch, certs, ca
):
    # With check-send-proxy, HAProxy's TCP check sends the header and closes
    # without a ClientHello, every few seconds on every port it watches: not
    # a failed handshake, not worth an INFO line each time. (A plain check
    # resets the connection before Bonzo accepts it: nothing to log.)
    plugin = Seen()
    server = bonzo(start_server, plugin, listener=implicit_tls(certs))
    backend, line = server_line(server, "send-proxy-v2 check check-send-proxy inter 200ms")
    proxy = haproxy(Frontend("smtps", backend, line))

    def closed_before() -> list[logging.LogRecord]:
        return [r for r in log_watch.records if "closed the connection before" in r.getMessage()]

    wait_until(lambda: len(closed_before()) >= 2, timeout=10, message="two health checks")
    assert {r.levelno for r in closed_before()} == {logging.DEBUG}
    # A real client of the same port is served.
    send(tls_connect(proxy.ports["smtps"], "127.0.0.3", client_context(ca)))
    wait_until(lambda: plugin.messages, message="the message")
    noisy = [
        r.getMessage()
        for r in log_watch.records
        if r.levelno >= logging.INFO and "TLS" in r.getMessage()
    ]
    assert noisy == []


def stored(maildir: Path, count: int) -> list[bytes]:
    """The messages in ``maildir``/new once there are ``count`` of them."""
    new = maildir / "new"
    wait_until(
        lambda: new.is_dir() and len(list(new.iterdir())) >= count, message=f"{count} message(s)"
    )
    return [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)]


def test_the_documented_configuration(tmp_path):
    """examples/proxy/bonzo.toml run by ``bonzo serve`` behind
    examples/proxy/haproxy.cfg run by HAProxy, on free ports."""
    front, proxied, filtered = free_port(), free_port(), free_port()
    config = (ROOT / "examples" / "proxy" / "bonzo.toml").read_text()
    config = config.replace("2526", str(proxied)).replace("2527", str(filtered))
    (tmp_path / "bonzo.toml").write_text(config)
    cfg = (ROOT / "examples" / "proxy" / "haproxy.cfg").read_text()
    cfg = cfg.replace("2525", str(front)).replace("2526", str(proxied))
    with daemons(tmp_path, daemon_env()) as start:
        daemon = start(tmp_path / "bonzo.toml", filtered)
        daemon.wait_ready()
        with running_haproxy(tmp_path, text=cfg):
            # Through HAProxy: the client's address, not HAProxy's.
            send(connect(front, "127.0.0.5"), "b@example.org")
            [first] = stored(tmp_path / "Maildir", 1)
            assert b"Received: from client.test ([127.0.0.5])" in first
            # Through the content filter's port, with XCLIENT.
            with smtplib.SMTP("127.0.0.1", filtered, timeout=TIMEOUT) as client:
                client.ehlo("filter.test")
                assert "xclient" in client.esmtp_features
                code, text = client.docmd("XCLIENT", "ADDR=192.0.2.1")
                assert (code, text) == (554, b"5.7.1 Access denied")  # the access rule
            with smtplib.SMTP("127.0.0.1", filtered, timeout=TIMEOUT) as client:
                client.ehlo("filter.test")
                assert client.docmd("XCLIENT", "ADDR=198.51.100.1 LOGIN=alice")[0] == 220
                client.ehlo("client.test")
                client.sendmail("a@example.net", ["b@example.org"], MESSAGE)
            second = stored(tmp_path / "Maildir", 2)[1]
            assert b"Received: from client.test ([198.51.100.1])" in second
            assert b"(authenticated as alice)" in second
        assert daemon.stop() == 0
    assert "WARNING" not in daemon.log, daemon.log


def test_a_client_sending_a_bad_server_name_is_still_served(start_server, haproxy, ca, certs):
    # HAProxy terminates TLS and passes the server name the client asked
    # for (SNI) on as it came, control characters included: the client is
    # served, the name left out, and the log blames neither the proxy nor
    # the header.
    plugin = Seen()
    server = bonzo(start_server, plugin)
    backend, line = server_line(server, "send-proxy-v2 proxy-v2-options ssl,authority,crc32c")
    proxy = haproxy(Frontend("tls", backend, line, bind_options=f"ssl crt {certs['both']}"))
    context = client_context(ca)
    context.check_hostname = False  # the name asked for is not the certificate's
    send(tls_connect(proxy.ports["tls"], "127.0.0.4", context, server_hostname="mx\x01test"))
    wait_until(lambda: plugin.messages, message="the message")
    seen = plugin.at_deliver[0]
    assert seen["remote_ip"] == "127.0.0.4"
    tlvs = seen["proxy"].tlvs
    assert tlvs.authority is None and tlvs[0x02] == b"mx\x01test"
    assert tlvs.ssl is not None and tlvs.ssl.tls
    assert tlvs.problems == ("authority TLV has control characters",)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("options", ["send-proxy", "send-proxy-v2"])
def test_an_ipv4_client_of_a_dual_stack_haproxy(start_server, haproxy, options):
    # Bound to [::] with v4v6, HAProxy names an IPv4 client by its
    # IPv4-mapped IPv6 address: it is the IPv4 client.
    plugin = Seen()
    server = bonzo(start_server, plugin)
    backend, line = server_line(server, options)
    proxy = haproxy(Frontend("dual", backend, line, bind_host="::", bind_options="v4v6"))
    send(connect(proxy.ports["dual"], "127.0.0.2"))
    wait_until(lambda: plugin.messages, message="the message")
    seen = plugin.at_deliver[0]
    assert seen["remote_ip"] == "127.0.0.2" and seen["local_ip"] == "127.0.0.1"
    assert seen["proxy"].family == "INET6"
    assert plugin.messages[0].header_bytes.startswith(b"Received: from client.test ([127.0.0.2])")


@pytest.mark.parametrize("options", ["send-proxy", "send-proxy-v2"])
def test_a_client_of_a_unix_socket_bind_is_the_proxy_itself(
    start_server, haproxy, log_watch, socket_dir, options
):
    # HAProxy has no address to name for a client of its Unix socket: it
    # sends UNKNOWN (v1) or LOCAL (v2), as for its health checks, and the
    # client has HAProxy's own address (docs/proxy.rst, Security). Its mail
    # is logged as such.
    plugin = Seen()
    server = bonzo(start_server, plugin)
    backend, line = server_line(server, options)
    path = str(socket_dir / "haproxy.sock")
    haproxy(Frontend("unix", backend, line, bind_path=path))
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(TIMEOUT)
        raw.connect(path)
        client = smtplib.SMTP(local_hostname="client.test", timeout=TIMEOUT)
        client.sock = raw
        assert client.getreply()[0] == 220
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        client.quit()
    wait_until(lambda: plugin.messages, message="the message")
    seen = plugin.at_deliver[0]
    assert seen["remote_ip"] == seen["peer_ip"] == PROXY_SOURCE
    assert not seen["proxy"].carries_addresses
    record = log_watch.wait_for(
        rf"\[\w+ {PROXY_SOURCE}\] mail from a client the PROXY header did not name"
    )
    assert record.levelname == "INFO"


def test_a_unix_socket_listener_names_the_socket_in_its_log(
    start_server, haproxy, log_watch, socket_dir
):
    # HAProxy on the same machine, to a Unix socket listener, but without
    # send-proxy: the warning names the socket, not "0.0.0.0:0".
    path = str(socket_dir / "bonzo.sock")
    listener = ListenerSettings(proxy_protocol=True, unix_socket=True)
    start_server(plugin=Seen(), listener=listener, unix_path=path, proxy_timeout=0.5)
    proxy = haproxy(Frontend("plain", path, ""))
    with pytest.raises(smtplib.SMTPServerDisconnected):
        connect(proxy.ports["plain"], "127.0.0.5")
    record = log_watch.wait_for(
        rf"\[\w+ unix:{re.escape(path)}\] closed without greeting: no PROXY header within 0\.5s"
    )
    assert record.levelname == "WARNING"

"""STARTTLS, implicit TLS and AUTH, end to end (issue #4).

Every server listens on 127.0.0.1; certificates come from a throwaway trustme
CA made for this module. Clients are real: smtplib, aiosmtplib, swaks,
``openssl s_client`` and raw sockets wrapped in TLS after ``220``. Every
wait and every subprocess is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import logging
import os
import re
import select
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiosmtplib
import pytest
import trustme
from e2e_support import HOST, TIMEOUT, RawClient, RecordingPlugin, wait_until

from bonzo import Accept, hookimpl
from bonzo.auth import Credentials
from bonzo.errors import SMTPError
from bonzo.hooks import PluginSet
from bonzo.protocol import NEED_DATA, Auth, Policy, SMTPProtocol
from bonzo.session import Envelope, Session
from bonzo.settings import ListenerSettings, SMTPSettings
from bonzo.tls import CertificatePair, TLSError, make_server_context

pytestmark = pytest.mark.timeout(60)

USER = "alice"
PASSWORD = "correct horse battery staple"
MESSAGE = b"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: tls\r\n\r\nHello.\r\n"


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


PLAIN_OK = b64(f"\0{USER}\0{PASSWORD}")


# ----------------------------------------------------------- certificates
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertificatePair]:
    """Certificate/key files: the default one (127.0.0.1, localhost) and one
    each for one.test, two.test and *.wild.test (for SNI)."""
    base = tmp_path_factory.mktemp("certs")
    names = {
        "default": ("127.0.0.1", "localhost", "default.test"),
        "one": ("one.test",),
        "two": ("two.test",),
        "wild": ("*.wild.test",),
    }
    pairs = {}
    for label, hosts in names.items():
        leaf = ca.issue_cert(*hosts)
        cert, key = base / f"{label}.crt", base / f"{label}.key"
        cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        pairs[label] = CertificatePair(str(cert), str(key))
    return pairs


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts the test CA and checks host names."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def context(certs: dict[str, CertificatePair], sni: bool = False) -> ssl.SSLContext:
    extra = {"one.test": certs["one"], "two.test": certs["two"], "*.wild.test": certs["wild"]}
    return make_server_context(certs["default"], extra if sni else None)


def tls_listener(certs: dict[str, CertificatePair], **options: Any) -> ListenerSettings:
    sni = options.pop("sni", False)
    return ListenerSettings(tls_context=context(certs, sni), **options)


# ---------------------------------------------------------------- handlers
class AuthHandler(RecordingPlugin):
    """Records like RecordingPlugin; knows one user; notes what the session
    looked like (auth, TLS facts, Received protocol) for every message."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        super().__init__()
        self.users = {USER: PASSWORD} if users is None else users
        self.credentials: list[Credentials] = []
        self.facts: list[dict[str, Any]] = []
        self.tls_at_helo: list[dict[str, Any] | None] = []

    def bonzo_helo(self, session: Session) -> Any:
        self.tls_at_helo.append(session.tls)

    def bonzo_auth(
        self, session: Session, mechanism: str, username: str, password: str, authzid: str
    ) -> Any:
        self.credentials.append(Credentials(username, password, authzid, mechanism))
        return Accept() if self.users.get(username) == password else None

    def bonzo_deliver(self, session: Session, envelope: Envelope) -> Any:
        self.facts.append({"auth": session.auth, "tls": session.tls, "protocol": session.protocol})
        return super().bonzo_deliver(session, envelope)


def start_auth_server(start_server: Any, listener: ListenerSettings, **settings: Any) -> Any:
    settings.setdefault("auth_failure_delay", 0)
    return start_server(plugin=AuthHandler(), listener=listener, **settings)


# ------------------------------------------------------------------ clients
def starttls(
    client: RawClient, ctx: ssl.SSLContext, server_hostname: str | None = HOST
) -> ssl.SSLSocket:
    """STARTTLS on a raw client, then the handshake over the same socket."""
    reply = client.command("STARTTLS")
    assert reply == b"220 2.0.0 Ready to start TLS\r\n", reply
    # Nothing may follow the 220 in plaintext.
    assert client.buffer == b""
    tls = ctx.wrap_socket(client.sock, server_hostname=server_hostname)
    client.sock = tls
    return tls


def handshake_over(sock: socket.socket, ctx: ssl.SSLContext) -> ssl.SSLObject:
    """A client handshake through memory BIOs: the socket stays a plain one
    that the RawClient closes, whatever happens (wrap_socket can leave an
    unclosed SSLSocket behind when the peer has already reset)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=HOST)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake") from None
            incoming.write(data)
    sock.sendall(outgoing.read())
    return tls


def ehlo_keywords(reply: bytes) -> list[str]:
    lines = reply.decode().split("\r\n")[1:-1]
    return [line[4:] for line in lines]


def smtp(server: Any, **kwargs: Any) -> smtplib.SMTP:
    return smtplib.SMTP(HOST, server.port, local_hostname="client.test", timeout=TIMEOUT, **kwargs)


def tls_client(server: Any, ctx: ssl.SSLContext, ehlo: bool = True) -> RawClient:
    client = RawClient(server.port)
    client.greet()
    starttls(client, ctx)
    if ehlo:
        client.command("EHLO client.test")
    return client


# ================================================================ STARTTLS
def test_starttls_is_not_offered_without_a_certificate(start_server):
    server = start_server(plugin=AuthHandler())
    with RawClient(server.port) as client:
        keywords = ehlo_keywords(client.greet())
        assert "STARTTLS" not in keywords
        # No TLS and no plaintext AUTH allowed: AUTH is not offered either.
        assert not [k for k in keywords if k.startswith("AUTH")]
        assert client.command("STARTTLS") == b"502 5.5.1 Error: STARTTLS not available\r\n"
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"538 5.7.11 ")


def test_starttls_offered_then_not_after_tls(start_server, certs, client_ctx, log_watch):
    server = start_auth_server(start_server, tls_listener(certs))
    with RawClient(server.port) as client:
        keywords = ehlo_keywords(client.greet())
        assert "STARTTLS" in keywords
        assert not [k for k in keywords if k.startswith("AUTH")]
        tls = starttls(client, client_ctx)
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # The operator can see it at debug level, with what was agreed.
        record = log_watch.wait_for(rf"\] TLS established: {tls.version()} {tls.cipher()[0]}$")
        assert record.levelname == "DEBUG"
        keywords = ehlo_keywords(client.command("EHLO client.test"))
        assert "STARTTLS" not in keywords
        assert "AUTH PLAIN LOGIN" in keywords
        assert client.command("STARTTLS") == b"554 5.5.1 Error: TLS already active\r\n"
        assert client.command("NOOP") == b"250 2.0.0 Ok\r\n"


def test_starttls_with_an_argument_is_a_syntax_error(start_server, certs, client_ctx):
    server = start_auth_server(start_server, tls_listener(certs))
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("STARTTLS now") == b"501 5.5.4 Syntax: STARTTLS\r\n"
        # Still plaintext and still usable; a proper STARTTLS works.
        starttls(client, client_ctx)
        assert client.command("EHLO client.test").startswith(b"250-")


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "implicit"])
def test_tls_1_1_is_refused_with_an_alert(start_server, certs, log_watch, implicit_tls):
    """The refusal is a protocol_version alert (RFC 8446 6.2), not a bare
    close the client can only call an unexpected EOF."""
    server = start_auth_server(start_server, tls_listener(certs, implicit_tls=implicit_tls))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is, on purpose
        try:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = ssl.TLSVersion.TLSv1_1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        except (ValueError, ssl.SSLError):  # pragma: no cover - depends on OpenSSL
            pytest.skip("this OpenSSL cannot offer TLS 1.1")
    with RawClient(server.port) as client:
        with pytest.raises(ssl.SSLError) as refused:
            if implicit_tls:
                handshake_over(client.sock, ctx)
            else:
                client.greet()
                starttls(client, ctx)
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value
    server.wait_connections(0)
    log_watch.wait_for("TLS handshake failed")
    # Logged once, with the session id; nothing from Tornado's own streams.
    failed = log_watch.matching("TLS handshake failed")
    assert len(failed) == 1
    assert re.match(r"\[\w+ 127\.0\.0\.1\] TLS handshake failed: ", failed[0].getMessage())
    assert not log_watch.matching("SSL Error")


def _client_hello(name: bytes) -> bytes:
    """A real ClientHello asking for the server name ``name`` (same length
    as a name Python agrees to send, patched in place)."""
    placeholder = b"q" * (len(name) - len(b".example")) + b".example"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=placeholder.decode())
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello.count(placeholder) == 1
    return hello.replace(placeholder, name)


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "implicit"])
def test_a_server_name_that_is_not_ascii_fails_quietly(
    start_server, certs, log_watch, monkeypatch, implicit_tls
):
    """Python decodes the SNI name as ASCII before the context's callback
    and writes the error with a traceback to stderr (sys.unraisablehook),
    once per connection: outside the log, whatever its file or format. Now
    only the session's one line says what happened."""
    seen: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)  # what was there before
    server = start_auth_server(start_server, tls_listener(certs, implicit_tls=implicit_tls))
    with RawClient(server.port) as client:
        if not implicit_tls:
            client.greet()
            assert client.command("STARTTLS").startswith(b"220 ")
        client.sock.sendall(_client_hello(b"\xff" * 10 + b".example"))
        alert = client.sock.recv(64)
    assert alert[:1] == b"\x15"  # a TLS alert, then the end
    failed = log_watch.wait_for("TLS handshake failed")
    assert failed.getMessage().endswith(
        "TLS handshake failed: the server name it asked for (SNI) is not ASCII"
    )
    assert seen == []
    # Any other unraisable error still reaches the hook that was there.
    sys.unraisablehook(SimpleNamespace(exc_value=ValueError("x"), exc_traceback=None, object=None))
    assert len(seen) == 1


def test_a_connection_closed_before_any_handshake_is_a_debug_line(start_server, certs, log_watch):
    """A load balancer's health check (HAProxy's every 2 s) connects to an
    implicit-TLS port and closes: one INFO line each time was 43,000 a day.
    A client that began its ClientHello and left still gets its INFO line."""
    server = start_auth_server(start_server, tls_listener(certs, implicit_tls=True))
    with RawClient(server.port):
        pass
    before = log_watch.wait_for("closed the connection before the TLS handshake")
    assert before.levelname == "DEBUG"
    with RawClient(server.port) as client:
        client.sock.sendall(_client_hello(b"q" * 10 + b".example")[:40])
    during = log_watch.wait_for("closed the connection during the TLS handshake")
    assert during.levelname == "INFO"
    assert len(log_watch.matching("closed the connection")) == 2


def test_everything_before_starttls_is_forgotten(start_server, certs, client_ctx):
    server = start_auth_server(start_server, tls_listener(certs, auth_plaintext=True))
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"235 2.7.0 ")
        assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250 ")
        starttls(client, client_ctx)
        # HELO/EHLO forgotten: MAIL needs a new EHLO (and so the old
        # transaction is gone too).
        assert client.command("MAIL FROM:<alice@example.com>") == (
            b"503 5.5.1 Error: need HELO command\r\n"
        )
        keywords = ehlo_keywords(client.command("EHLO client.test"))
        # AUTH forgotten: offered again, and MAIL is not nested.
        assert "AUTH PLAIN LOGIN" in keywords
        assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250 2.1.0")
        assert client.command("RCPT TO:<bob@example.com>").startswith(b"250 2.1.5")
        assert client.command("DATA").startswith(b"354 ")
        assert client.command(MESSAGE + b".").startswith(b"250 2.0.0")
        assert client.command("QUIT").startswith(b"221 ")
    (facts,) = server.plugin.facts
    assert facts["auth"] is None
    assert facts["protocol"] == "ESMTPS"
    (delivered,) = server.plugin.messages
    assert b"with ESMTPS\r\n" in delivered.header_bytes


# ------------------------------------------------- CVE-2011-0411 injection
@pytest.mark.parametrize(
    "pipelined",
    [
        b"RSET\r\n",
        b"EHLO evil.test\r\nMAIL FROM:<x@y.test>\r\n",
        b"MAIL FROM:<x@y.test>\r\nRCPT TO:<victim@example.com>\r\n",
    ],
)
def test_plaintext_pipelined_after_starttls_is_never_run(
    start_server, certs, client_ctx, log_watch, pipelined
):
    server = start_auth_server(start_server, tls_listener(certs))
    with RawClient(server.port) as client:
        client.greet()
        client.send(b"STARTTLS\r\n" + pipelined)  # one write, one packet
        assert client.reply() == b"220 2.0.0 Ready to start TLS\r\n"
        assert client.buffer == b""
        client.sock = client_ctx.wrap_socket(client.sock, server_hostname=HOST)
        # The first reply inside TLS answers our own first command: had the
        # injected EHLO run, MAIL would get 250 (or 503 nested).
        assert client.command("MAIL FROM:<me@example.com>") == (
            b"503 5.5.1 Error: need HELO command\r\n"
        )
        assert client.command("HELP").startswith(b"214 ")
        assert client.command("EHLO client.test").startswith(b"250-")
        assert client.command("MAIL FROM:<me@example.com>").startswith(b"250 2.1.0")
        assert client.command("QUIT").startswith(b"221 ")
    assert server.plugin.senders == ["me@example.com"]
    log_watch.wait_for("discarded plaintext pipelined after STARTTLS")


@pytest.mark.parametrize("read_chunk_size", [65536, 1024])
def test_a_flood_after_starttls_closes_the_connection(
    start_server, certs, client_ctx, read_chunk_size
):
    server = start_auth_server(start_server, tls_listener(certs), read_chunk_size=read_chunk_size)
    flood = b"MAIL FROM:<x@y.test>\r\n" * 8000  # 176,000 octets: several reads
    with RawClient(server.port) as client:
        client.greet()
        client.send(b"STARTTLS\r\n" + flood)
        # Either the 220 arrives (and the handshake then fails on the
        # plaintext) or the connection is gone: never a reply to MAIL.
        try:
            reply = client.reply()
        except ConnectionError:
            reply = b""
        assert reply in (b"220 2.0.0 Ready to start TLS\r\n", b"")
        assert client.buffer == b""
        with pytest.raises((ssl.SSLError, OSError)):
            handshake_over(client.sock, client_ctx)
    server.wait_connections(0)
    assert server.plugin.senders == []


def test_handshake_timeout_after_starttls(start_server, certs, log_watch):
    server = start_auth_server(start_server, tls_listener(certs), tls_handshake_timeout=0.3)
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("STARTTLS").startswith(b"220 ")
        started = time.monotonic()
        assert client.read_to_eof(timeout=5) == b""  # no plaintext reply either
        assert 0.25 <= time.monotonic() - started < 3
    server.wait_connections(0)
    log_watch.wait_for("TLS handshake timed out")
    assert len(server.plugin.disconnected) == 1


def test_garbage_instead_of_a_handshake_closes(start_server, certs, log_watch):
    server = start_auth_server(start_server, tls_listener(certs))
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("STARTTLS").startswith(b"220 ")
        client.send(b"EHLO this is not a ClientHello\r\n" * 4)
        assert client.read_to_eof() == b""
    server.wait_connections(0)
    log_watch.wait_for("TLS handshake failed")


def test_a_broken_tls_record_after_the_handshake_closes_with_one_info_line(
    start_server, certs, client_ctx, log_watch
):
    # A client can break TLS at will (a bad record, a renegotiation): its
    # fault, so no ERROR with a traceback (log_watch fails on one), one line.
    server = start_auth_server(start_server, tls_listener(certs))
    # TLS 1.2: nothing (no session ticket) follows the handshake unasked.
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("STARTTLS").startswith(b"220 ")
        handshake_over(client.sock, client_ctx)
        # An application-data record whose content cannot decrypt.
        client.sock.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
        # The server says so (an alert record: bad_record_mac) before it closes.
        assert client.read_to_eof()[:3] == b"\x15\x03\x03"
    server.wait_connections(0)
    line = log_watch.wait_for("TLS error, connection closed")
    assert line.levelname == "INFO"
    assert not log_watch.matching("Unexpected error in session")


def test_client_gone_during_the_handshake(start_server, certs):
    server = start_auth_server(start_server, tls_listener(certs))
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("STARTTLS").startswith(b"220 ")
    server.wait_connections(0)
    assert len(server.plugin.disconnected) == 1


# ------------------------------------------------------------- real clients
def test_smtplib_starttls_login_sendmail(start_server, certs, client_ctx):
    server = start_auth_server(start_server, tls_listener(certs))
    with smtp(server) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")
        code, _ = client.starttls(context=client_ctx)
        assert code == 220
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        assert client.login(USER, PASSWORD)[0] == 235
        assert client.sendmail("alice@example.com", ["bob@example.com"], MESSAGE) == {}
    wait_until(lambda: server.plugin.messages, message="the message")
    (facts,) = server.plugin.facts
    assert facts["auth"] == USER
    assert facts["protocol"] == "ESMTPSA"
    tls = facts["tls"]
    assert tls["version"] in ("TLSv1.2", "TLSv1.3")
    assert tls["cipher"] and tls["bits"] >= 128
    assert tls["sni"] is None  # no SNI for an IP address
    (delivered,) = server.plugin.messages
    header = delivered.header_bytes.decode()
    assert "with ESMTPSA" in header
    assert f"(version={tls['version']} cipher={tls['cipher']})" in header
    assert f"(authenticated as {USER})" in header
    assert delivered.body == MESSAGE
    (credentials,) = server.plugin.credentials
    assert credentials.mechanism == "PLAIN"


def test_smtplib_auth_login_two_challenges(start_server, certs, client_ctx):
    server = start_auth_server(start_server, tls_listener(certs))
    with smtp(server) as client:
        client.starttls(context=client_ctx)
        client.ehlo()
        client.user, client.password = USER, PASSWORD
        code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235
    (credentials,) = server.plugin.credentials
    assert (credentials.mechanism, credentials.username) == ("LOGIN", USER)


def test_smtplib_wrong_password(start_server, certs, client_ctx):
    server = start_auth_server(start_server, tls_listener(certs))
    with smtp(server) as client:
        client.starttls(context=client_ctx)
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login(USER, "wrong")
    # smtplib tries PLAIN, then LOGIN: both refused alike.
    assert info.value.smtp_code == 535
    assert info.value.smtp_error == b"5.7.8 Authentication credentials invalid"


def test_aiosmtplib_starttls_login(start_server, certs, client_ctx):
    server = start_auth_server(start_server, tls_listener(certs))

    async def main() -> None:
        client = aiosmtplib.SMTP(
            hostname=HOST, port=server.port, tls_context=client_ctx, start_tls=False
        )
        async with client:
            await client.starttls()
            await client.login(USER, PASSWORD)
            await client.sendmail("alice@example.com", ["bob@example.com"], MESSAGE)
            assert client.transport is not None
            sock = client.transport.get_extra_info("socket")
        # The client's TLS shutdown ends when the server closes the connection
        # after QUIT; wait for it, or the loop would end with the socket open.
        for _ in range(int(TIMEOUT / 0.01)):
            if sock.fileno() == -1:
                break
            await asyncio.sleep(0.01)
        assert sock.fileno() == -1, "the server did not close the TLS connection after QUIT"

    asyncio.run(asyncio.wait_for(main(), TIMEOUT + TIMEOUT))
    wait_until(lambda: server.plugin.messages, message="the message")
    assert server.plugin.facts[0]["protocol"] == "ESMTPSA"


# ------------------------------------------------------------ swaks, openssl
SWAKS = shutil.which("swaks")
OPENSSL = shutil.which("openssl")
needs_swaks = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")


def run_swaks(port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    assert SWAKS is not None
    command = [
        SWAKS,
        "--server",
        HOST,
        "--port",
        str(port),
        "--helo",
        "swaks.test",
        "--from",
        "alice@example.com",
        "--to",
        "bob@example.com",
        "--body",
        "Body line\n.dotted line",
        "--timeout",
        "10",
        *extra,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


@needs_swaks
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("mode", ["--tls", "--tlsc"])
def test_swaks_tls_and_auth(start_server, certs, mechanism, mode):
    implicit = mode == "--tlsc"
    server = start_auth_server(start_server, tls_listener(certs, implicit_tls=implicit))
    auth = ["--auth", mechanism, "--auth-user", USER, "--auth-password", PASSWORD]
    result = run_swaks(server.port, mode, *auth)
    assert result.returncode == 0, result.stdout + result.stderr
    if not implicit:
        assert "<-  220 2.0.0 Ready to start TLS" in result.stdout
    assert "235 2.7.0 Authentication successful" in result.stdout
    wait_until(lambda: server.plugin.messages, message="the message")
    (facts,) = server.plugin.facts
    assert facts["auth"] == USER and facts["protocol"] == "ESMTPSA"
    (credentials,) = server.plugin.credentials
    assert credentials.mechanism == mechanism


@needs_swaks
def test_swaks_wrong_password_fails(start_server, certs):
    server = start_auth_server(start_server, tls_listener(certs))
    auth = ["--auth", "PLAIN", "--auth-user", USER, "--auth-password", "nope"]
    result = run_swaks(server.port, "--tls", *auth)
    assert result.returncode != 0
    assert "535 5.7.8 Authentication credentials invalid" in result.stdout
    assert server.plugin.messages == []


def run_s_client(args: list[str], script: bytes) -> str:
    """Run ``openssl s_client`` with ``script`` as its input; the session must
    end cleanly: the server closes TLS with a close_notify, so s_client
    exits 0 and reports no "unexpected eof"."""
    assert OPENSSL is not None
    command = [OPENSSL, "s_client", *args, "-quiet", "-crlf", "-verify_quiet"]
    result = subprocess.run(command, input=script, capture_output=True, timeout=30, check=False)
    out = result.stdout.decode("utf-8", "replace")
    err = result.stderr.decode("utf-8", "replace")
    assert "unexpected eof" not in err, err
    assert result.returncode == 0, (result.returncode, out, err)
    return out


def s_client_script() -> bytes:
    lines = [
        "EHLO openssl.test",
        f"AUTH PLAIN {PLAIN_OK}",
        "MAIL FROM:<alice@example.com>",
        "RCPT TO:<bob@example.com>",
        "DATA",
        "Subject: s_client",
        "",
        "hello",
        ".",
        "QUIT",
    ]
    return "\n".join(lines).encode() + b"\n"


@needs_openssl
def test_openssl_s_client_starttls(start_server, certs, ca, tmp_path):
    server = start_auth_server(start_server, tls_listener(certs))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    args = ["-connect", f"{HOST}:{server.port}", "-starttls", "smtp", "-CAfile", str(ca_file)]
    out = run_s_client(args, s_client_script())
    assert "235 2.7.0 Authentication successful" in out, out
    assert "250 2.0.0 Ok: queued as" in out, out
    assert "221 2.0.0 Bye" in out, out
    wait_until(lambda: server.plugin.messages, message="the message")
    assert server.plugin.facts[0]["protocol"] == "ESMTPSA"


@needs_openssl
def test_openssl_s_client_implicit_tls(start_server, certs, ca, tmp_path):
    server = start_auth_server(start_server, tls_listener(certs, implicit_tls=True))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    args = ["-connect", f"{HOST}:{server.port}", "-CAfile", str(ca_file)]
    out = run_s_client(args, s_client_script())
    assert out.startswith("220 "), out
    assert "235 2.7.0 Authentication successful" in out, out
    assert "221 2.0.0 Bye" in out, out
    wait_until(lambda: server.plugin.messages, message="the message")
    assert server.plugin.facts[0]["protocol"] == "ESMTPSA"


# ------------------------------------------------------------ require_tls
def test_require_tls_refuses_mail_before_starttls(start_server, certs, client_ctx):
    server = start_auth_server(start_server, tls_listener(certs, require_tls=True))
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("MAIL FROM:<alice@example.com>") == (
            b"530 5.7.0 Must issue a STARTTLS command first\r\n"
        )
        starttls(client, client_ctx)
        client.command("EHLO client.test")
        assert client.command("MAIL FROM:<alice@example.com>").startswith(b"250 2.1.0")
    assert server.plugin.senders == ["alice@example.com"]


def test_require_auth_refuses_mail_before_auth(start_server, certs, client_ctx):
    # The submission profile: TLS first, then AUTH, then mail.
    listener = tls_listener(certs, require_tls=True, require_auth=True)
    server = start_auth_server(start_server, listener)
    with tls_client(server, client_ctx) as client:
        assert client.command("MAIL FROM:<alice@example.com>") == (
            b"530 5.7.0 Authentication required\r\n"
        )
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"235 ")
        reply = client.command("MAIL FROM:<alice@example.com> AUTH=<>")
        assert reply.startswith(b"250 2.1.0")
    assert server.plugin.senders == ["alice@example.com"]


def test_smtplib_submission_profile(start_server, certs, client_ctx):
    listener = tls_listener(certs, require_tls=True, require_auth=True)
    server = start_auth_server(start_server, listener)
    with smtp(server) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as info:
            client.sendmail("alice@example.com", ["bob@example.com"], MESSAGE)
        assert info.value.smtp_code == 530
    with smtp(server) as client:
        client.starttls(context=client_ctx)
        client.login(USER, PASSWORD)
        client.sendmail("alice@example.com", ["bob@example.com"], MESSAGE)
    wait_until(lambda: server.plugin.messages, message="the message")


# ===================================================================== AUTH
@pytest.fixture
def plain_auth_server(start_server):
    """AUTH allowed without TLS (auth_plaintext), to test the exchange itself."""
    return start_auth_server(start_server, ListenerSettings(auth_plaintext=True))


def authed_client(server: Any) -> RawClient:
    client = RawClient(server.port)
    client.greet()
    return client


def test_auth_plain_with_initial_response(plain_auth_server):
    with authed_client(plain_auth_server) as client:
        assert client.command("AUTH PLAIN " + PLAIN_OK) == (
            b"235 2.7.0 Authentication successful\r\n"
        )
        # After success: AUTH no longer offered and refused.
        keywords = ehlo_keywords(client.command("EHLO client.test"))
        assert not [k for k in keywords if k.startswith("AUTH")]
        assert client.command("AUTH PLAIN " + PLAIN_OK) == (
            b"503 5.5.1 Error: already authenticated\r\n"
        )
    (credentials,) = plain_auth_server.plugin.credentials
    assert (credentials.username, credentials.password, credentials.authzid) == (
        USER,
        PASSWORD,
        "",
    )


def test_auth_plain_with_another_authzid_fails_unless_a_plugin_allows_it(plain_auth_server):
    """RFC 4616 2: acting as someone else needs the server's consent; a
    plugin that only vouches for the password does not give it."""
    with authed_client(plain_auth_server) as client:
        blob = b64(f"boss\0{USER}\0{PASSWORD}")
        assert client.command("auth plain " + blob) == (
            b"535 5.7.8 Authentication credentials invalid\r\n"
        )
        same = b64(f"{USER}\0{USER}\0{PASSWORD}")
        assert client.command("auth plain " + same).startswith(b"235 2.7.0 ")
    first, second = plain_auth_server.plugin.credentials
    assert first.authzid == "boss" and second.authzid == USER


def test_a_plugin_may_let_a_user_act_as_another(start_server, certs, client_ctx):
    class Delegation(AuthHandler):
        def bonzo_auth(self, username, password, authzid):
            if (username, password) == (USER, PASSWORD) and authzid in ("", USER, "boss"):
                return Accept(authzid=authzid or None)
            return None

    plugin = Delegation()
    server = start_server(plugin=plugin, listener=tls_listener(certs), auth_failure_delay=0)
    with tls_client(server, client_ctx) as client:
        blob = b64(f"boss\0{USER}\0{PASSWORD}")
        assert client.command("AUTH PLAIN " + blob).startswith(b"235 2.7.0 ")
        assert client.command("MAIL FROM:<boss@example.com>").startswith(b"250 ")
        assert client.command("RCPT TO:<someone@example.com>").startswith(b"250 ")
        assert client.command("DATA").startswith(b"354 ")
        client.send(b"Subject: on behalf\r\n\r\nhi\r\n.\r\n")
        assert client.reply().startswith(b"250 ")
    wait_until(lambda: plugin.facts, message="the delivery")
    assert plugin.facts[0]["auth"] == "boss"


@pytest.mark.parametrize("verdict", ["yes", True, 1, "Ok"])
def test_only_accept_authenticates(start_server, certs, client_ctx, log_watch, verdict):
    """A truthy value that is not Accept is a plugin fault, never a login."""

    class Sloppy(AuthHandler):
        def bonzo_auth(self):
            return verdict

    server = start_server(plugin=Sloppy(), listener=tls_listener(certs), auth_failure_delay=0)
    with tls_client(server, client_ctx) as client:
        assert client.command("AUTH PLAIN " + PLAIN_OK) == (
            b"454 4.7.0 Temporary authentication failure\r\n"
        )
        # Not authenticated: AUTH may be tried again.
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"454 ")
    log_watch.wait_for(r"in plugin 'Sloppy' \(bonzo_auth\): returned \w+; expected Accept")


def test_auth_plain_without_initial_response(plain_auth_server):
    with authed_client(plain_auth_server) as client:
        assert client.command("AUTH PLAIN") == b"334 \r\n"
        assert client.command(PLAIN_OK) == b"235 2.7.0 Authentication successful\r\n"


def test_auth_login_two_challenges(plain_auth_server):
    with authed_client(plain_auth_server) as client:
        assert client.command("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"  # Username:
        assert client.command(b64(USER)) == b"334 UGFzc3dvcmQ6\r\n"  # Password:
        assert client.command(b64(PASSWORD)) == b"235 2.7.0 Authentication successful\r\n"
    (credentials,) = plain_auth_server.plugin.credentials
    assert (credentials.mechanism, credentials.username) == ("LOGIN", USER)


def test_auth_login_with_initial_response(plain_auth_server):
    with authed_client(plain_auth_server) as client:
        assert client.command("AUTH LOGIN " + b64(USER)) == b"334 UGFzc3dvcmQ6\r\n"
        assert client.command(b64(PASSWORD)).startswith(b"235 ")


def test_auth_pipelined_lines_are_the_exchange(plain_auth_server):
    with authed_client(plain_auth_server) as client:
        client.send(f"AUTH LOGIN\r\n{b64(USER)}\r\n{b64(PASSWORD)}\r\nNOOP\r\n".encode())
        assert client.replies(4) == [
            b"334 VXNlcm5hbWU6\r\n",
            b"334 UGFzc3dvcmQ6\r\n",
            b"235 2.7.0 Authentication successful\r\n",
            b"250 2.0.0 Ok\r\n",
        ]


def test_auth_empty_initial_response(plain_auth_server):
    with authed_client(plain_auth_server) as client:
        # "=" is an empty initial response: for PLAIN that is malformed.
        assert client.command("AUTH PLAIN =") == b"501 5.5.2 Malformed PLAIN response\r\n"
        assert client.command("AUTH LOGIN =") == b"501 5.5.2 Empty user name\r\n"
        # The empty response to a challenge, too.
        assert client.command("AUTH PLAIN") == b"334 \r\n"
        assert client.command("=") == b"501 5.5.2 Malformed PLAIN response\r\n"
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"235 ")
    assert len(plain_auth_server.plugin.credentials) == 1


@pytest.mark.parametrize("start", ["AUTH PLAIN", "AUTH LOGIN", "AUTH LOGIN " + b64(USER)])
def test_auth_star_cancels(plain_auth_server, start):
    with authed_client(plain_auth_server) as client:
        assert client.command(start).startswith(b"334 ")
        assert client.command("*") == b"501 5.0.0 Authentication cancelled\r\n"
        # Back to commands; a new AUTH works.
        assert client.command("NOOP") == b"250 2.0.0 Ok\r\n"
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"235 ")
    assert [c.username for c in plain_auth_server.plugin.credentials] == [USER]


@pytest.mark.parametrize("bad", ["not*base64", "YWJj=ZGVm", "YWJjZA", "\u00e9t\u00e9"])
def test_auth_bad_base64(plain_auth_server, bad):
    with authed_client(plain_auth_server) as client:
        assert client.command("AUTH PLAIN " + bad) == b"501 5.5.2 Invalid base64 data\r\n"
        assert client.command("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
        assert client.command(bad) == b"501 5.5.2 Invalid base64 data\r\n"
        assert client.command("NOOP") == b"250 2.0.0 Ok\r\n"
    assert plain_auth_server.plugin.credentials == []


def test_auth_syntax_and_unknown_mechanism(plain_auth_server):
    with authed_client(plain_auth_server) as client:
        assert client.command("AUTH CRAM-MD5") == b"504 5.5.4 Unrecognized authentication type\r\n"
        assert client.command("AUTH") == b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
        assert client.command("AUTH PLAIN a b").startswith(b"501 5.5.4 ")


def test_auth_needs_ehlo(plain_auth_server):
    with RawClient(plain_auth_server.port) as client:
        client.greet(ehlo=None)
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"503 ")
        client.command("HELO client.test")
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"503 ")


def test_auth_refused_during_a_transaction(plain_auth_server):
    with authed_client(plain_auth_server) as client:
        assert client.command("MAIL FROM:<a@example.com>").startswith(b"250 ")
        assert client.command("AUTH PLAIN " + PLAIN_OK) == (
            b"503 5.5.1 Error: AUTH not allowed during a mail transaction\r\n"
        )
        assert client.command("RSET").startswith(b"250 ")
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"235 ")


def test_mail_auth_parameter(plain_auth_server):
    with authed_client(plain_auth_server) as client:
        client.command("AUTH PLAIN " + PLAIN_OK)
        assert client.command("MAIL FROM:<a@example.com> AUTH=a@example.com").startswith(b"250 ")
        client.command("RSET")
        assert client.command("MAIL FROM:<a@example.com> AUTH").startswith(b"501 5.5.4 ")


def test_auth_line_limit(plain_auth_server):
    with authed_client(plain_auth_server) as client:
        # A line of exactly 12,288 octets (CRLF included) is read and judged.
        head = "AUTH PLAIN "
        body = "A" * (12288 - len(head) - 2)
        body = body[: len(body) // 4 * 4]
        line = head + body + "=" * (12288 - 2 - len(head) - len(body))
        assert len(line) + 2 == 12288
        reply = client.command(line)
        assert reply.startswith(b"501 5.5.2 "), reply  # bad content, not too long
        assert client.command("AUTH PLAIN " + "A" * 12288) == (
            b"500 5.5.6 Authentication exchange line is too long\r\n"
        )
        # The same limit for a response to a challenge.
        assert client.command("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
        assert client.command("A" * 12288) == (
            b"500 5.5.6 Authentication exchange line is too long\r\n"
        )
        assert client.command("AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
        user = b64(USER)
        padded = " " * (12288 - 2 - len(user)) + user  # long but within the limit
        assert client.command(padded) == b"334 UGFzc3dvcmQ6\r\n"
        assert client.command(b64(PASSWORD)).startswith(b"235 ")


@pytest.mark.parametrize("start", [b"", b"AUTH LOGIN\r\n"])
def test_an_overlong_line_trickled_in_is_bounded_by_command_timeout(start_server, start):
    server = start_auth_server(
        start_server, ListenerSettings(auth_plaintext=True), command_timeout=0.5
    )
    with RawClient(server.port) as client:
        client.greet()
        if start:
            assert client.command(start.strip()).startswith(b"334 ")
        # Past the 12,288-octet limit: the rest of the line is read and dropped.
        started = time.monotonic()
        client.send(b"AUTH PLAIN " + b"A" * 13000)
        deadline = started + 5
        while time.monotonic() < deadline:
            try:
                client.send(b"A")
            except OSError:
                break
            if select.select([client.sock], [], [], 0.05)[0]:
                break
        assert client.read_to_eof() == b"421 4.4.2 Timeout, closing connection\r\n"
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0, elapsed


def test_overlong_auth_line_split_across_reads_gets_the_same_reply():
    settings = SMTPSettings(hostname="bonzo.test")
    replies = []
    for cut in (None, 6000, 12289, 12500):
        proto = SMTPProtocol(settings, "192.0.2.1")
        proto.auth_mechanisms = ("PLAIN", "LOGIN")
        proto.auth_plaintext = True
        proto.receive_data(b"EHLO x\r\n")
        event = proto.next_event()
        proto.accept()
        proto.data_to_send()
        line = b"AUTH PLAIN " + b"A" * 13000 + b"\r\n"
        pieces = [line] if cut is None else [line[:cut], line[cut:]]
        for piece in pieces:
            proto.receive_data(piece)
            event = proto.next_event()
        assert event is NEED_DATA
        replies.append(proto.data_to_send())
    assert replies == [b"500 5.5.6 Authentication exchange line is too long\r\n"] * 4


def test_auth_not_offered_and_refused_without_tls(start_server, certs):
    server = start_auth_server(start_server, tls_listener(certs))
    with RawClient(server.port) as client:
        keywords = ehlo_keywords(client.greet())
        assert not [k for k in keywords if k.startswith("AUTH")]
        assert client.command("AUTH PLAIN " + PLAIN_OK) == (
            b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
        )
        assert client.command("AUTH LOGIN").startswith(b"538 5.7.11 ")
    assert server.plugin.credentials == []


def test_auth_mechanisms_of_the_listener(start_server, certs, client_ctx):
    listener = tls_listener(certs, auth_mechanisms=("PLAIN",))
    server = start_auth_server(start_server, listener)
    with tls_client(server, client_ctx, ehlo=False) as client:
        assert "AUTH PLAIN" in ehlo_keywords(client.command("EHLO client.test"))
        assert client.command("AUTH LOGIN").startswith(b"504 5.5.4 ")
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"235 ")


def test_auth_not_offered_without_an_auth_handler(start_server, certs, client_ctx):
    server = start_server(listener=tls_listener(certs))  # RecordingPlugin: no on_auth
    with tls_client(server, client_ctx, ehlo=False) as client:
        keywords = ehlo_keywords(client.command("EHLO client.test"))
        assert not [k for k in keywords if k.startswith("AUTH")]
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"502 5.5.1 ")


def test_unknown_user_and_wrong_password_get_the_same_reply(start_server, certs, client_ctx):
    server = start_auth_server(start_server, tls_listener(certs))
    with tls_client(server, client_ctx) as client:
        wrong = client.command("AUTH PLAIN " + b64(f"\0{USER}\0nope"))
        unknown = client.command("AUTH PLAIN " + b64(f"\0mallory\0{PASSWORD}"))
    assert wrong == unknown == b"535 5.7.8 Authentication credentials invalid\r\n"


def test_failure_budget_and_delay(start_server, certs, client_ctx):
    delay = 0.3
    server = start_server(
        plugin=AuthHandler(),
        listener=tls_listener(certs),
        max_auth_failures=3,
        auth_failure_delay=delay,
    )
    with tls_client(server, client_ctx) as client:
        started = time.monotonic()
        assert client.command("AUTH PLAIN " + b64("\0alice\0one")).startswith(b"535 5.7.8 ")
        first = time.monotonic() - started
        # A cancelled exchange or a syntax error is not a failure to count.
        client.command("AUTH LOGIN")
        assert client.command("*").startswith(b"501 ")
        started = time.monotonic()
        client.command("AUTH LOGIN")
        client.command(b64(USER))
        assert client.command(b64("two")).startswith(b"535 5.7.8 ")
        second = time.monotonic() - started
        started = time.monotonic()
        client.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'three')}\r\n".encode())
        last = client.read_to_eof()
        third = time.monotonic() - started
    assert last == (
        b"535 5.7.8 Authentication credentials invalid\r\n"
        b"421 4.7.0 Too many authentication failures\r\n"
    )
    for elapsed in (first, second, third):
        assert delay * 0.9 <= elapsed < delay + 2.0, (first, second, third)
    server.wait_connections(0)


def test_the_failure_delay_does_not_hold_up_other_sessions(start_server, certs, client_ctx):
    server = start_server(
        plugin=AuthHandler(), listener=tls_listener(certs), auth_failure_delay=1.0
    )
    with tls_client(server, client_ctx) as slow, tls_client(server, client_ctx) as other:
        slow.send(f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'bad')}\r\n".encode())
        started = time.monotonic()
        assert other.command("AUTH PLAIN " + PLAIN_OK).startswith(b"235 ")
        assert time.monotonic() - started < 0.5
        assert slow.reply().startswith(b"535 ")


def test_success_after_failures_resets_nothing_but_works(start_server, certs, client_ctx):
    server = start_auth_server(start_server, tls_listener(certs), max_auth_failures=3)
    with tls_client(server, client_ctx) as client:
        for _ in range(2):
            assert client.command("AUTH PLAIN " + b64("\0alice\0x")).startswith(b"535 ")
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"235 ")
        assert client.command("MAIL FROM:<a@example.com>").startswith(b"250 ")


class FaultyAuth(AuthHandler):
    def bonzo_auth(self) -> Any:
        raise RuntimeError("the user database is down")


def test_plugin_fault_is_454(start_server, certs, client_ctx, log_watch):
    log_watch.allow("Uncaught exception")
    server = start_server(plugin=FaultyAuth(), listener=tls_listener(certs))
    with tls_client(server, client_ctx) as client:
        assert client.command("AUTH PLAIN " + PLAIN_OK) == (
            b"454 4.7.0 Temporary authentication failure\r\n"
        )
        # Not a failure of the client's: the session goes on.
        assert client.command("NOOP") == b"250 2.0.0 Ok\r\n"
    log_watch.wait_for("Uncaught exception")


class RefusingAuth(AuthHandler):
    def bonzo_auth(self) -> Any:
        raise SMTPError(535, "Account locked", enhanced_code="5.7.8")


def test_plugin_may_refuse_with_its_own_reply(start_server, certs, client_ctx):
    server = start_server(plugin=RefusingAuth(), listener=tls_listener(certs), auth_failure_delay=0)
    with tls_client(server, client_ctx) as client:
        assert client.command("AUTH PLAIN " + PLAIN_OK) == b"535 5.7.8 Account locked\r\n"


class RefusingWith(AuthHandler):
    """Refuses every user but alice's wrong passwords in its own words."""

    def __init__(self, error: SMTPError) -> None:
        super().__init__()
        self.error = error

    def bonzo_auth(
        self, session: Session, mechanism: str, username: str, password: str, authzid: str
    ) -> Any:
        if username == USER and password != PASSWORD:
            raise self.error
        return super().bonzo_auth(session, mechanism, username, password, authzid)


@pytest.mark.parametrize(
    "refusal",
    [
        SMTPError(535, "Authentication credentials invalid", enhanced_code="5.7.8"),
        SMTPError(554, "Account locked", enhanced_code="5.7.1"),
    ],
    ids=["535", "554"],
)
def test_a_plugin_refusal_is_delayed_and_counted_like_the_core_one(
    start_server, certs, client_ctx, refusal
):
    """Whoever refuses the credentials, the answer waits auth_failure_delay
    (a faster one would tell who refused, and speed up guessing) and counts
    towards max_auth_failures."""
    delay = 0.3
    server = start_server(
        plugin=RefusingWith(refusal),
        listener=tls_listener(certs),
        max_auth_failures=3,
        auth_failure_delay=delay,
    )
    expected = f"{refusal.status_code} {refusal.enhanced_code} {refusal.message}\r\n".encode()
    with tls_client(server, client_ctx) as client:
        times = []
        for _ in range(2):
            started = time.monotonic()
            assert client.command("AUTH PLAIN " + b64(f"\0{USER}\0wrong")) == expected
            times.append(time.monotonic() - started)
        started = time.monotonic()
        # The core's own refusal (an unknown user) counts as well.
        assert client.command("AUTH PLAIN " + b64("\0nobody\0x")).startswith(b"535 5.7.8 ")
        times.append(time.monotonic() - started)
        last = client.read_to_eof()
    assert last == b"421 4.7.0 Too many authentication failures\r\n"
    for elapsed in times:
        assert delay * 0.9 <= elapsed < delay + 2.0, times


def test_a_plugin_refusal_with_a_4xx_is_not_a_failure(start_server, certs, client_ctx):
    """A temporary fault is not the client's guess: not counted (and not delayed)."""
    refusal = SMTPError(454, "Directory unavailable", enhanced_code="4.7.0")
    server = start_server(
        plugin=RefusingWith(refusal),
        listener=tls_listener(certs),
        max_auth_failures=2,
        auth_failure_delay=5.0,
    )
    with tls_client(server, client_ctx) as client:
        started = time.monotonic()
        for _ in range(3):
            assert client.command("AUTH PLAIN " + b64(f"\0{USER}\0wrong")) == (
                b"454 4.7.0 Directory unavailable\r\n"
            )
        assert time.monotonic() - started < 3
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"235 ")


# --------------------------------------------------- plugins (bonzo_auth)
class AsyncAuthPlugin:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    @hookimpl
    async def bonzo_auth(self, session: Session, mechanism: str, username: str, password: str):
        await asyncio.sleep(0.01)
        self.calls.append((session.id, mechanism, username))
        return Accept() if (username, password) == (USER, PASSWORD) else None


class BrokenAuthPlugin:
    @hookimpl
    def bonzo_auth(self, username: str) -> Any:
        raise RuntimeError("LDAP is unreachable")


class RelayPlugin:
    """Recipients-like: local domain for everyone, anywhere once authenticated."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, dict[str, Any] | None]] = []

    @hookimpl
    def bonzo_rcpt(self, session: Session, address: str) -> Any:
        if address.endswith("@example.com") or session.auth is not None:
            return Accept()
        raise SMTPError(554, "Relay access denied", enhanced_code="5.7.1")

    @hookimpl
    def bonzo_deliver(self, session: Session, envelope: Envelope) -> Any:
        self.seen.append((session.auth, session.tls))
        return Accept()


def plugin_set_of(*plugins: tuple[str, object]) -> PluginSet:
    plugin_set = PluginSet(timeout=TIMEOUT)
    for name, plugin in plugins:
        plugin_set.register(plugin, name)
    return plugin_set


def test_async_bonzo_auth_plugin_and_session_auth(start_server, certs, client_ctx):
    auth, relay = AsyncAuthPlugin(), RelayPlugin()
    server = start_server(
        plugins=plugin_set_of(("auth", auth), ("relay", relay)),
        listener=tls_listener(certs),
        auth_failure_delay=0,
    )
    with smtp(server) as client:
        client.starttls(context=client_ctx)
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@example.com", ["someone@elsewhere.test"], MESSAGE)
        client.rset()
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(USER, "wrong")
        client.login(USER, PASSWORD)
        client.sendmail("a@example.com", ["someone@elsewhere.test"], MESSAGE)
    wait_until(lambda: relay.seen, message="the delivery")
    ((who, tls),) = relay.seen
    assert who == USER
    assert tls is not None and tls["version"]
    assert [c[1:] for c in auth.calls][-1] == ("PLAIN", USER)


def test_plugin_that_raises_gives_454(start_server, certs, client_ctx, log_watch):
    log_watch.allow("Uncaught exception")
    server = start_server(
        plugins=plugin_set_of(("broken", BrokenAuthPlugin())), listener=tls_listener(certs)
    )
    with tls_client(server, client_ctx) as client:
        assert client.command("AUTH PLAIN " + PLAIN_OK) == (
            b"454 4.7.0 Temporary authentication failure\r\n"
        )
        assert client.command("NOOP").startswith(b"250 ")
    # The type, not the text: a bonzo_auth fault's text may hold the password.
    line = log_watch.wait_for(r"in plugin 'broken' \(bonzo_auth\): RuntimeError")
    assert "LDAP is unreachable" not in line.getMessage()


class SlowAuthPlugin:
    @hookimpl
    async def bonzo_auth(self, username: str) -> Any:
        await asyncio.sleep(30)


def test_a_plugin_that_times_out_gives_454(start_server, certs, client_ctx, log_watch):
    log_watch.allow("bonzo_auth")
    plugin_set = PluginSet(timeout=0.3)
    plugin_set.register(SlowAuthPlugin(), "slow")
    server = start_server(plugins=plugin_set, listener=tls_listener(certs))
    with tls_client(server, client_ctx) as client:
        started = time.monotonic()
        assert client.command("AUTH PLAIN " + PLAIN_OK) == (
            b"454 4.7.0 Temporary authentication failure\r\n"
        )
        assert time.monotonic() - started < 3
        assert client.command("NOOP").startswith(b"250 ")


def test_without_an_auth_plugin_auth_is_not_offered(start_server, certs, client_ctx):
    server = start_server(
        plugins=plugin_set_of(("relay", RelayPlugin())), listener=tls_listener(certs)
    )
    with tls_client(server, client_ctx, ehlo=False) as client:
        keywords = ehlo_keywords(client.command("EHLO client.test"))
        assert not [k for k in keywords if k.startswith("AUTH")]


# ----------------------------------------------------------------- secrets
@pytest.fixture
def all_records() -> Iterator[list[logging.LogRecord]]:
    """Every log record of every logger, at DEBUG."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    handler = Keep(logging.DEBUG)
    saved = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)


def test_secrets_never_logged(start_server, certs, client_ctx, all_records, log_watch):
    log_watch.allow("Uncaught exception")
    secret = "Sup3r-Secret-Passw0rd"
    auth = AsyncAuthPlugin()
    server = start_server(
        plugins=plugin_set_of(("auth", auth), ("relay", RelayPlugin())),
        listener=tls_listener(certs),
        auth_failure_delay=0,
        max_auth_failures=10,
    )
    secrets = [
        secret,
        b64(secret),
        b64(f"\0{USER}\0{secret}"),
        b64(f"\0nobody\0{secret}"),
        PASSWORD,
        b64(PASSWORD),
        PLAIN_OK,
    ]
    with tls_client(server, client_ctx) as client:
        assert client.command("AUTH PLAIN " + b64(f"\0{USER}\0{secret}")).startswith(b"535")
        assert client.command("AUTH PLAIN " + b64(f"\0nobody\0{secret}")).startswith(b"535")
        client.command("AUTH LOGIN")
        client.command(b64(USER))
        assert client.command(b64(secret)).startswith(b"535")
        # Malformed and cancelled exchanges.
        assert client.command("AUTH PLAIN " + b64(secret)).startswith(b"501")
        client.command("AUTH PLAIN")
        assert client.command(b64(f"{secret}\0\0")).startswith(b"501")
        assert client.command("AUTH PLAIN " + b64(secret) + "!").startswith(b"501")
        # A secret sent where a command is expected (a confused client).
        assert client.command(b64(secret)).startswith(b"500")
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"235")
        assert client.command("QUIT").startswith(b"221")
    server.wait_connections(0)
    assert any("authenticated as" in r.getMessage() for r in all_records)
    for record in all_records:
        text = record.getMessage() + repr(record.args) + str(record.exc_text or "")
        for value in secrets:
            assert value not in text, (record.name, text)


def test_a_long_user_name_is_cut_in_the_log(start_server, certs, client_ctx, all_records):
    """Each failure logs the user name: one as long as the AUTH line allows
    (some 9 KB, three times a session) is cut to 256 characters."""
    server = start_server(
        plugins=plugin_set_of(("auth", AsyncAuthPlugin()), ("relay", RelayPlugin())),
        listener=tls_listener(certs),
        auth_failure_delay=0,
    )
    name = "u" * 6000
    with tls_client(server, client_ctx) as client:
        assert client.command("AUTH PLAIN " + b64(f"\0{name}\0x")).startswith(b"535 5.7.8 ")
        assert client.command("QUIT").startswith(b"221")
    server.wait_connections(0)
    [line] = [r.getMessage() for r in all_records if "AUTH PLAIN failed for" in r.getMessage()]
    assert f"failed for '{'u' * 256}...'" in line and len(line) < 512


def test_each_auth_failure_is_one_warning_line_naming_who_refused(
    start_server, certs, client_ctx, all_records
):
    """One WARNING line per failure, the session id and the client's
    address first (a fail2ban filter's anchor), then what failed and who
    refused: the plugin that raised, the one that accepted but would not
    let the user act as another, or no plugin at all (naming those
    asked). Never the password."""

    class Delegation(AuthHandler):
        def bonzo_auth(self, username, password, authzid):
            if username == "locked":
                raise SMTPError(554, "Account locked", enhanced_code="5.7.1")
            if (username, password) == (USER, PASSWORD):
                return Accept()
            return None

    server = start_server(
        plugins=plugin_set_of(("directory", Delegation()), ("relay", RelayPlugin())),
        listener=tls_listener(certs),
        auth_failure_delay=0,
        max_auth_failures=5,
    )
    with tls_client(server, client_ctx) as client:
        assert client.command("AUTH PLAIN " + b64(f"\0{USER}\0wrong-pw")).startswith(b"535 ")
        assert client.command("AUTH PLAIN " + b64("\0locked\0wrong-pw")).startswith(b"554 ")
        blob = b64(f"boss\0{USER}\0{PASSWORD}")
        assert client.command("AUTH PLAIN " + blob).startswith(b"535 ")
        assert client.command("QUIT").startswith(b"221")
    server.wait_connections(0)
    lines = [
        r.getMessage()
        for r in all_records
        if r.levelno == logging.WARNING and " failed for " in r.getMessage()
    ]
    session = r"^\[\w+ 127\.0\.0\.1\] "
    assert len(lines) == 3, lines
    assert re.fullmatch(
        session + r"AUTH PLAIN failed for 'alice': no plugin accepted \(asked: directory\): "
        r"535 5\.7\.8 Authentication credentials invalid",
        lines[0],
    ), lines[0]
    assert re.fullmatch(
        session + r"AUTH PLAIN failed for 'locked': refused by directory: "
        r"554 5\.7\.1 Account locked",
        lines[1],
    ), lines[1]
    assert re.fullmatch(
        session + r"AUTH PLAIN failed for 'alice': directory accepted, but it may not act as "
        r"'boss': 535 5\.7\.8 Authentication credentials invalid",
        lines[2],
    ), lines[2]
    text = "".join(r.getMessage() for r in all_records)
    assert "wrong-pw" not in text and PASSWORD not in text
    assert "refused by core: 535" not in text


def test_a_failed_auth_that_passes_max_errors_still_gets_its_line(
    start_server, certs, client_ctx, all_records
):
    """The failure that takes a session past ``max_errors`` closes it (421)
    instead of its own reply: its WARNING line is written all the same, or a
    fail2ban filter would never see a guesser who makes one other error per
    session."""
    server = start_server(
        plugins=plugin_set_of(("auth", AsyncAuthPlugin()), ("relay", RelayPlugin())),
        listener=tls_listener(certs),
        auth_failure_delay=0,
        max_errors=1,
        max_auth_failures=5,
    )
    with tls_client(server, client_ctx) as client:
        assert client.command("RCPT TO:<a@example.com>").startswith(b"503 ")
        assert client.command("AUTH PLAIN " + b64(f"\0{USER}\0wrong-pw")).startswith(b"421 4.7.0")
    server.wait_connections(0)
    lines = [
        r.getMessage()
        for r in all_records
        if r.levelno == logging.WARNING and " failed for " in r.getMessage()
    ]
    assert len(lines) == 1, lines
    assert re.fullmatch(
        r"\[\w+ 127\.0\.0\.1\] AUTH PLAIN failed for 'alice': .*: "
        r"535 5\.7\.8 Authentication credentials invalid",
        lines[0],
    ), lines[0]
    assert "wrong-pw" not in "".join(r.getMessage() for r in all_records)


class LeakyAuthPlugin:
    """Faults whose text holds the password, as careless plugin code makes."""

    def __init__(self) -> None:
        self.pins = {USER: 1234}

    @hookimpl
    async def bonzo_auth(self, username: str, password: str) -> Any:
        if username == "pin":
            return int(password)  # ValueError: invalid literal ... 'the password'
        if username == "lookup":
            return {}[password]  # KeyError('the password')
        try:
            raise LookupError(f"no hash for {username}:{password}")
        except LookupError as exc:
            raise RuntimeError(f"backend said: {exc}") from exc


def test_a_faulty_auth_plugin_never_logs_the_password(
    start_server, certs, client_ctx, all_records, log_watch
):
    """docs/tls-auth.rst: passwords never reach a log. A bonzo_auth fault is
    logged with its type, the plugin and where it happened, without the
    exception's text (nor any chained one's)."""
    log_watch.allow("Uncaught exception")
    secret = "Tr0ub4dor-Secret-77"
    server = start_server(
        plugins=plugin_set_of(("leaky", LeakyAuthPlugin())), listener=tls_listener(certs)
    )
    with tls_client(server, client_ctx) as client:
        for user in ("pin", "lookup", USER):
            assert client.command("AUTH PLAIN " + b64(f"\0{user}\0{secret}")) == (
                b"454 4.7.0 Temporary authentication failure\r\n"
            )
        client.command("AUTH LOGIN")
        client.command(b64("pin"))
        assert client.command(b64(secret)).startswith(b"454 ")
    server.wait_connections(0)
    formatter = logging.Formatter("%(message)s")
    texts = [formatter.format(record) + repr(record.args) for record in all_records]
    faults = [text for text in texts if "Uncaught exception" in text]
    assert len(faults) == 4, texts
    assert "in plugin 'leaky' (bonzo_auth): ValueError" in faults[0]
    assert "in plugin 'leaky' (bonzo_auth): KeyError" in faults[1]
    assert "in plugin 'leaky' (bonzo_auth): RuntimeError" in faults[2]
    # Where it happened is still there, for the plugin's author.
    assert f'File "{__file__}", line ' in faults[0] and ", in bonzo_auth" in faults[0]
    for text in texts:
        for value in (secret, b64(secret), b64(f"\0pin\0{secret}"), b64(f"\0{USER}\0{secret}")):
            assert value not in text, text


# ---------------------------------------------------------------------- SNI
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("one.test", "one.test"),
        ("two.test", "two.test"),
        ("ONE.test", "one.test"),
        ("mx.wild.test", "*.wild.test"),
        ("unknown.test", "default.test"),
        (None, "default.test"),
    ],
)
def test_sni_selects_the_certificate(start_server, certs, ca, name, expected):
    server = start_auth_server(start_server, tls_listener(certs, sni=True))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False  # the default certificate is not for the name asked
    with RawClient(server.port) as client:
        client.greet()
        tls = starttls(client, ctx, server_hostname=name)
        sans = {value for kind, value in tls.getpeercert()["subjectAltName"]}
        assert expected in sans, sans
        client.command("EHLO client.test")
        client.command("QUIT")
    wait_until(lambda: server.plugin.disconnected, message="the disconnect")
    (tls_facts,) = [t for t in server.plugin.tls_at_helo if t is not None]
    assert tls_facts["sni"] == (name.lower() if name else None)


def test_sni_name_recorded_without_extra_certificates(start_server, certs, client_ctx):
    server = start_auth_server(start_server, tls_listener(certs))
    with RawClient(server.port) as client:
        client.greet()
        starttls(client, client_ctx, server_hostname="localhost")
        client.command("EHLO client.test")
        client.command("QUIT")
    wait_until(lambda: server.plugin.disconnected, message="the disconnect")
    (tls_facts,) = [t for t in server.plugin.tls_at_helo if t is not None]
    assert tls_facts["sni"] == "localhost"


# ------------------------------------------------------------ implicit TLS
def test_implicit_tls_handshake_before_greeting(start_server, certs, client_ctx):
    server = start_auth_server(start_server, tls_listener(certs, implicit_tls=True))
    with smtplib.SMTP_SSL(
        HOST, server.port, local_hostname="client.test", timeout=TIMEOUT, context=client_ctx
    ) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.has_extn("auth")
        assert client.docmd("STARTTLS") == (554, b"5.5.1 Error: TLS already active")
        client.login(USER, PASSWORD)
        client.sendmail("alice@example.com", ["bob@example.com"], MESSAGE)
    wait_until(lambda: server.plugin.messages, message="the message")
    (facts,) = server.plugin.facts
    assert facts["protocol"] == "ESMTPSA"
    assert facts["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert server.plugin.tls_at_helo[0] is not None  # known before EHLO


def test_implicit_tls_plaintext_client_gets_no_greeting(start_server, certs, log_watch):
    server = start_auth_server(
        start_server, tls_listener(certs, implicit_tls=True), tls_handshake_timeout=0.3
    )
    with RawClient(server.port) as client:
        started = time.monotonic()
        assert client.read_to_eof(timeout=5) == b""
        assert 0.25 <= time.monotonic() - started < 3
    with RawClient(server.port) as client:
        client.send(b"EHLO client.test\r\n")
        assert client.read_to_eof(timeout=5) == b""
    server.wait_connections(0)
    log_watch.wait_for("TLS handshake timed out")
    assert server.plugin.connected == []  # on_connect only after the handshake


def test_implicit_tls_over_the_connection_limit(start_server, certs, client_ctx):
    server = start_auth_server(
        start_server,
        tls_listener(certs, implicit_tls=True),
        max_connections=1,
        tls_handshake_timeout=0.5,
    )
    with RawClient(server.port) as first:
        first.sock = client_ctx.wrap_socket(first.sock, server_hostname=HOST)
        first.greet()
        server.wait_connections(1)
        # Over the limit, a TLS client gets its 421 inside TLS...
        with RawClient(server.port) as second:
            second.sock = client_ctx.wrap_socket(second.sock, server_hostname=HOST)
            assert second.read_to_eof() == (b"421 4.7.0 Too many connections, try again later\r\n")
        # ...and one that never starts TLS is not kept open.
        with RawClient(server.port) as idle:
            started = time.monotonic()
            assert idle.read_to_eof(timeout=5) == b""
            assert time.monotonic() - started < 3
        assert first.command("NOOP").startswith(b"250 ")


def test_refused_implicit_tls_clients_that_never_start_tls_are_bounded(start_server, certs):
    """Over the limit, a 421 on an implicit-TLS listener waits for a TLS
    handshake; at most REFUSING_MAX refused clients wait at once, and the
    others are closed at once: idle sockets cannot pile up descriptors."""
    from bonzo.server import REFUSING_MAX

    server = start_auth_server(
        start_server, tls_listener(certs, implicit_tls=True), max_connections=1,
        tls_handshake_timeout=30.0,
    )  # fmt: skip
    holder = socket.create_connection((HOST, server.port))
    server.wait_connections(1)
    idle = [socket.create_connection((HOST, server.port)) for _ in range(REFUSING_MAX + 20)]
    try:
        deadline = time.monotonic() + 5.0
        closed: set[socket.socket] = set()
        while len(closed) < 20 and time.monotonic() < deadline:
            ready, _, _ = select.select([s for s in idle if s not in closed], [], [], 0.5)
            closed.update(s for s in ready if s.recv(1) == b"")
        assert len(closed) >= 20  # the others wait for their handshake
        assert server.server.refusing <= REFUSING_MAX
    finally:
        for sock in [holder, *idle]:
            sock.close()


def test_implicit_tls_require_auth(start_server, certs, client_ctx):
    listener = tls_listener(certs, implicit_tls=True, require_auth=True)
    server = start_auth_server(start_server, listener)
    with RawClient(server.port) as client:
        client.sock = client_ctx.wrap_socket(client.sock, server_hostname=HOST)
        client.greet()
        assert client.command("MAIL FROM:<a@example.com>").startswith(b"530 5.7.0 ")
        assert client.command("AUTH PLAIN " + PLAIN_OK).startswith(b"235 ")
        assert client.command("MAIL FROM:<a@example.com>").startswith(b"250 ")


# ---------------------------------------------------------- TLS unit tests
def test_unreadable_certificate_file(tmp_path, certs):
    missing = tmp_path / "nope.crt"
    with pytest.raises(TLSError, match=f"cannot read {missing}"):
        make_server_context(CertificatePair(str(missing), certs["default"].key))
    with pytest.raises(TLSError, match="cannot read .*nope.key"):
        make_server_context(CertificatePair(certs["default"].cert, str(tmp_path / "nope.key")))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_certificate_without_permission(tmp_path, certs):
    locked = tmp_path / "locked.key"
    locked.write_bytes(Path(certs["default"].key).read_bytes())
    locked.chmod(0)
    with pytest.raises(TLSError, match="cannot read .*locked.key: Permission denied"):
        make_server_context(CertificatePair(certs["default"].cert, str(locked)))


def test_mismatched_certificate_and_key(certs):
    pair = CertificatePair(certs["one"].cert, certs["two"].key)
    with pytest.raises(TLSError, match=r"key .*two\.key does not match certificate .*one\.crt"):
        make_server_context(pair)


def test_mismatched_pair_for_an_sni_name(certs):
    with pytest.raises(TLSError, match="does not match"):
        make_server_context(
            certs["default"], {"one.test": CertificatePair(certs["one"].cert, certs["two"].key)}
        )


def test_a_key_of_another_kind_than_the_certificate_is_a_mismatch(tmp_path, certs):
    """An RSA key with an ECDSA certificate: OpenSSL says
    NO_CERTIFICATE_ASSIGNED, which the error no longer passes on as is."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509 import load_pem_x509_certificate

    cert = load_pem_x509_certificate(Path(certs["default"].cert).read_bytes())
    other = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        else ec.generate_private_key(ec.SECP256R1())
    )
    key = tmp_path / "other.key"
    key.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(TLSError) as info:
        make_server_context(CertificatePair(certs["default"].cert, str(key)))
    assert str(info.value) == f"key {key} does not match certificate {certs['default'].cert}"


def test_a_key_file_every_user_can_read_is_warned_about(tmp_path, certs):
    from bonzo.app import MailApp
    from bonzo.config import parse_config

    key = tmp_path / "server.key"
    key.write_bytes(Path(certs["default"].key).read_bytes())
    key.chmod(0o640)  # a group such as ssl-cert may read it: a choice
    text = (
        f'[[listeners]]\nport = 2525\ntls = {{ cert = "{certs["default"].cert}", key = "{key}" }}\n'
        '[plugins]\nenabled = ["recipients", "discard"]\n'
        '[plugins.recipients]\ndomains = ["example.com"]\n'
    )

    def key_warnings() -> list[str]:
        app = MailApp(parse_config(text, "t.toml", tmp_path))
        return [w for w in app.warnings() if "key file" in w]

    assert key_warnings() == []
    key.chmod(0o644)
    expected = f"listeners[0].tls: the key file {key} can be read by every user (chmod o-r it)"
    assert key_warnings() == [expected]
    # What a reload logs (a renewal often writes the key anew, 0644).
    app = MailApp(parse_config(text, "t.toml", tmp_path))
    assert app.certificate_warnings() == [expected]


def test_a_certificate_file_cut_inside_its_chain_is_refused(tmp_path):
    """A renewal caught half written: OpenSSL loaded the complete server
    certificate, ignored a cut-off intermediate after it, and the server sent
    its certificate alone (28 of 725 cut points in a test of every one)."""
    root = trustme.CA()
    leaf = root.create_child_ca().issue_cert("mx.example.test")
    chain = b"".join(pem.bytes() for pem in leaf.cert_chain_pems)
    key = tmp_path / "key.pem"
    key.write_bytes(leaf.private_key_pem.bytes())
    cert = tmp_path / "cert.pem"
    cert.write_bytes(chain)
    make_server_context(CertificatePair(str(cert), str(key)))  # whole: fine
    second = chain.index(b"-----BEGIN CERTIFICATE-----", 1)
    cuts = [second + n for n in (1, 5, 10, 15, 26, 27, 28, 40)]
    cuts += list(range(second + 28, len(chain) - 1, 97)) + [len(chain) - 10, len(chain) - 2]
    for cut in cuts:
        cert.write_bytes(chain[:cut])
        with pytest.raises(TLSError, match=re.escape(f"certificate {cert}")):
            make_server_context(CertificatePair(str(cert), str(key)))
    cert.write_bytes(chain[:second] + b"-----BEGIN CERT")
    with pytest.raises(TLSError) as info:
        make_server_context(CertificatePair(str(cert), str(key)))
    assert str(info.value) == (
        f"certificate {cert} ends inside a PEM block (a file being written, or cut short): "
        "the certificates after the last complete one would not be sent"
    )


def test_not_a_certificate(tmp_path, certs):
    junk = tmp_path / "junk.crt"
    junk.write_text("this is not PEM\n")
    with pytest.raises(TLSError, match=f"cannot load certificate {junk}"):
        make_server_context(CertificatePair(str(junk), certs["default"].key))


def encrypted_copy(key: str, dest: Path) -> Path:
    """``key`` written to ``dest`` encrypted with a pass phrase."""
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
    dest.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return dest


def test_a_key_with_a_pass_phrase_is_refused_without_prompting(tmp_path, certs):
    """OpenSSL would ask for the pass phrase on the terminal (and block a
    daemon, even at a reload) or fail with a bare OSError naming no file."""
    key = encrypted_copy(certs["default"].key, tmp_path / "enc.key")
    with pytest.raises(TLSError) as info:
        make_server_context(CertificatePair(certs["default"].cert, str(key)))
    assert str(info.value) == (
        f"key {key} is encrypted with a pass phrase; Bonzo needs it unencrypted"
    )
    with pytest.raises(TLSError, match="enc.key is encrypted"):
        make_server_context(
            certs["default"], {"one.test": CertificatePair(certs["one"].cert, str(key))}
        )


def test_an_os_error_while_loading_names_the_files(monkeypatch, certs):
    class Failing(ssl.SSLContext):
        def load_cert_chain(self, *args: Any, **kwargs: Any) -> None:
            raise OSError(22, "Invalid argument")

    import types

    import bonzo.tls

    # Only bonzo.tls sees the failing class: ssl's own code names SSLContext.
    fake = types.ModuleType("ssl")
    fake.__dict__.update(ssl.__dict__)
    fake.SSLContext = Failing  # type: ignore[attr-defined]
    monkeypatch.setattr(bonzo.tls, "ssl", fake)
    pair = certs["default"]
    with pytest.raises(TLSError) as info:
        make_server_context(pair)
    assert str(info.value) == (
        f"cannot load certificate {pair.cert} with key {pair.key}: Invalid argument"
    )


def test_server_context_refuses_old_tls(certs):
    ctx = make_server_context(certs["default"])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_listener_settings_need_a_certificate():
    with pytest.raises(ValueError, match="implicit_tls"):
        ListenerSettings(implicit_tls=True)
    with pytest.raises(ValueError, match="require_tls"):
        ListenerSettings(require_tls=True)
    with pytest.raises(ValueError, match="unknown mechanism 'CRAM-MD5'"):
        ListenerSettings(auth_mechanisms=("CRAM-MD5",))


def test_protocol_auth_event_shape():
    policy = Policy(auth_mechanisms=("PLAIN",), auth_plaintext=True)
    proto = SMTPProtocol(SMTPSettings(hostname="bonzo.test"), "192.0.2.1", policy)
    proto.receive_data(b"EHLO x\r\nAUTH plain =\r\n")
    proto.next_event()
    proto.accept()
    assert proto.next_event() == Auth("PLAIN", "=")


def test_protocol_counts_refused_credentials_whatever_the_code():
    """A 535 counts towards max_auth_failures; another 5xx only when the
    caller says it refuses credentials (a 501 for a cancel does not)."""
    policy = Policy(auth_mechanisms=("PLAIN",), auth_plaintext=True)
    settings = SMTPSettings(hostname="bonzo.test", max_auth_failures=3)
    proto = SMTPProtocol(settings, "192.0.2.1", policy)
    proto.receive_data(b"EHLO x\r\n")
    proto.next_event()
    proto.accept()
    answers = [
        (SMTPError(501, "Cancelled", enhanced_code="5.0.0"), False),
        (SMTPError(554, "Account locked", enhanced_code="5.7.1"), True),
        (SMTPError(454, "Try later", enhanced_code="4.7.0"), True),
        (SMTPError(535, "No", enhanced_code="5.7.8"), False),
    ]
    for error, refused in answers:
        proto.receive_data(b"AUTH PLAIN =\r\n")
        assert type(proto.next_event()) is Auth
        proto.reject(error, auth_failure=refused)
    assert proto.auth_failures == 2
    proto.data_to_send()
    proto.receive_data(b"AUTH PLAIN =\r\n")
    proto.next_event()
    proto.reject(SMTPError(554, "Account locked", enhanced_code="5.7.1"), auth_failure=True)
    assert proto.data_to_send().endswith(b"421 4.7.0 Too many authentication failures\r\n")


@pytest.mark.parametrize("how", ["quit", "shutdown", "timeout"])
def test_tls_sessions_end_with_a_close_notify(start_server, certs, client_ctx, how):
    """The last reply is flushed, then TLS is closed properly: a client that
    treats a missing close_notify as an error (suppress_ragged_eofs=False,
    like openssl s_client or Exim) sees a clean end."""
    server = start_auth_server(start_server, tls_listener(certs), idle_timeout=0.5)
    with RawClient(server.port) as client:
        client.greet()
        assert client.command("STARTTLS").startswith(b"220 ")
        tls = client_ctx.wrap_socket(client.sock, server_hostname=HOST, suppress_ragged_eofs=False)
        client.sock = tls
        assert client.command("EHLO client.test").startswith(b"250")
        if how == "quit":
            tls.sendall(b"QUIT\r\n")
            expected = b"221 2.0.0 Bye\r\n"
        elif how == "shutdown":
            server.submit(server.server.shutdown(1.0))
            expected = b"421 4.3.2 Server shutting down\r\n"
        else:
            expected = b"421 4.4.2 Timeout, closing connection\r\n"
        data = b""
        for _ in range(100):  # bounded
            chunk = tls.recv(4096)  # raises SSLEOFError without a close_notify
            if not chunk:
                break
            data += chunk
        assert data == expected


def test_a_finished_tls_and_auth_session_is_freed_at_once(start_server, certs, client_ctx):
    """STARTTLS, AUTH and a message leave no reference cycle behind either:
    the session is freed when it ends, not by the cycle collector."""
    server = start_auth_server(start_server, tls_listener(certs))
    gc.collect()
    gc.disable()
    try:
        with smtp(server) as client:
            client.starttls(context=client_ctx)
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.login(USER, "wrong")  # a refusal: the core's callback runs
            client.login(USER, PASSWORD)
            (connection,) = wait_until(lambda: list(server.server.connections))
            ref = weakref.ref(connection)
            del connection
            client.sendmail("alice@example.com", ["bob@example.com"], b"Subject: x\r\n\r\nbody\r\n")
        wait_until(lambda: ref() is None, message="the session freed")
        assert len(server.plugin.messages) == 1
    finally:
        gc.enable()

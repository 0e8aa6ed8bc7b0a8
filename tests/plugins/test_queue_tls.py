"""The queue's outbound TLS against Bonzo's own TLS listener: ``verify``
with a private CA (``tls_ca_file``), read again by each configuration (a
reload), and the reason a certificate is refused kept in the state and the
report. Certificates are made by trustme; everything talks to 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from bonzo_plugins.forward.plugin import ForwardPlugin
from bonzo_plugins.queue.routes import RouteTable
from test_queue_routes import App, attempt_all, make, queue, reports, states

from bonzo.settings import ListenerSettings
from bonzo.tls import CertificatePair, make_server_context


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_downstream(start_server: Any, ca: trustme.CA, tmp_path: Path) -> Any:
    """Bonzo with STARTTLS and a certificate for mx.test from ``ca``."""
    leaf = ca.issue_cert("mx.test")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    context = make_server_context(CertificatePair(str(cert), str(key)))
    from test_queue_routes import Picky

    return start_server(
        plugin=Picky(), hostname="mx.dest.test", listener=ListenerSettings(tls_context=context)
    )


def route(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": "smarthost",
        "host": "127.0.0.1",
        "port": port,
        "tls": "verify",
        "tls_name": "mx.test",
        **extra,
    }


def test_verify_trusts_the_ca_file_and_rereads_it_with_each_configuration(
    tmp_path, ca, tls_downstream
):
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    spool, runner = make(tmp_path, {"*": route(tls_downstream.port, tls_ca_file="ca.pem")})
    queue(spool, "C1", "bob@dest.test")
    asyncio.run(attempt_all(runner, "C1"))
    assert "C1" not in spool.ids()
    assert [m.rcpt_tos for m in tls_downstream.plugin.messages] == [["bob@dest.test"]]

    # The file now holds another CA only: a new configuration (a reload)
    # reads it again, and the certificate is no longer trusted.
    (tmp_path / "ca.pem").write_bytes(trustme.CA().cert_pem.bytes())
    spool, runner = make(tmp_path, {"*": route(tls_downstream.port, tls_ca_file="ca.pem")})
    queue(spool, "C2", "bob@dest.test")
    asyncio.run(attempt_all(runner, "C2"))
    [(status, reply)] = states(spool, "C2")
    assert status == "deferred" and reply.startswith("451 4.7.5")
    assert "unable to get local issuer certificate" in reply
    assert len(tls_downstream.plugin.messages) == 1


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"tls_name": "nomatch.test"}, "Hostname mismatch, certificate is not valid for "
         "'nomatch.test'."),
        ({}, "unable to get local issuer certificate"),
    ],
)  # fmt: skip
def test_the_reason_a_certificate_is_refused_is_kept_in_state_log_and_report(
    tmp_path, ca, tls_downstream, caplog, extra, reason
):
    if "tls_name" in extra:
        (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    else:
        (tmp_path / "ca.pem").write_bytes(trustme.CA().cert_pem.bytes())
    spool, runner = make(tmp_path, {"*": route(tls_downstream.port, tls_ca_file="ca.pem", **extra)})
    name = extra.get("tls_name", "mx.test")
    text = (
        f"451 4.7.5 TLS handshake failed ({name}[127.0.0.1]:{tls_downstream.port}): "
        f"certificate verification failed: {reason}"
    )
    queue(spool, "V1", "bob@dest.test")
    with caplog.at_level(logging.INFO):
        asyncio.run(attempt_all(runner, "V1"))
    [(status, reply)] = states(spool, "V1")
    assert (status, reply) == ("deferred", text)
    assert any(text in r.getMessage() for r in caplog.records)
    # Older than the queue's lifetime: bounced, the report saying why.
    envelope = {
        "arrival": time.time() - 6 * 86400,
        "sender": "alice@example.org",
        "recipients": [
            {
                "address": "b@dest.test",
                "canonical": "b@dest.test",
                "domain": "dest.test",
                "params": {},
            }
        ],
    }
    spool.write("V2", envelope, b"", io.BytesIO(b"Subject: old\r\n\r\nold\r\n"))
    asyncio.run(attempt_all(runner, "V2"))
    assert "V2" not in spool.ids()
    [report] = reports(spool)
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", report)
    assert b"Diagnostic-Code: X-Bonzo; " + text.encode() in unfolded
    assert tls_downstream.plugin.messages == []


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "cannot read {path}: No such file or directory"),
        (b"", "{path} holds no usable PEM certificate"),
        (b"not a certificate\n", "{path} holds no usable PEM certificate"),
        ("dir", "cannot read {path}: Is a directory"),
    ],
)
def test_an_unusable_ca_file_is_a_configuration_error_naming_file_and_key(tmp_path, content, why):
    path = tmp_path / "ca.pem"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    message = why.format(path=path)
    with pytest.raises(ValueError, match="^" + re.escape(f'routes."*".tls_ca_file: {message}')):
        RouteTable({"*": route(25, tls_ca_file="ca.pem")}, {}, App(tmp_path))
    with pytest.raises(
        ValueError, match="^" + re.escape(f"transports.bank.tls_ca_file: {message}")
    ):
        RouteTable({}, {"bank": {"type": "mx", "tls_ca_file": str(path)}}, App(tmp_path))
    with pytest.raises(ValueError, match="^" + re.escape(f"tls_ca_file: {message}")):
        ForwardPlugin().bonzo_configure(
            {"host": "127.0.0.1", "tls": "verify", "tls_ca_file": str(path)}, _forward_app()
        )


def test_a_ca_file_with_a_policy_that_never_verifies_is_a_configuration_error(tmp_path, ca):
    """The CAs serve only ``verify``: with another policy they were read,
    then unused, and mail went to any certificate with no word said."""
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    for policy in ("require", "opportunistic", "none"):
        with pytest.raises(ValueError) as info:
            RouteTable({"*": route(25, tls_ca_file="ca.pem", tls=policy)}, {}, App(tmp_path))
        assert str(info.value) == (
            f'routes."*".tls_ca_file: used only with tls = "verify", and tls is {policy!r} '
            'here: set tls = "verify" (or remove tls_ca_file)'
        )
    with pytest.raises(ValueError, match=r"^transports\.bank\.tls_ca_file: used only with"):
        RouteTable({}, {"bank": {"type": "mx", "tls_ca_file": "ca.pem"}}, App(tmp_path))
    with pytest.raises(ValueError, match=r'^tls_ca_file: used only with tls = "verify"'):
        ForwardPlugin().bonzo_configure(
            {"host": "127.0.0.1", "tls": "require", "tls_ca_file": str(tmp_path / "ca.pem")},
            _forward_app(),
        )


def test_credentials_with_tls_none_are_a_configuration_error(tmp_path):
    """The client never sends a password in the clear unless told to: with
    tls = "none" every delivery was deferred, then bounced, after a check
    that said OK. Implicit TLS or auth_plaintext make it a working setup."""
    creds = {"username": "relay", "password": "pw"}
    message = (
        'AUTH needs TLS, and tls is "none" here, so every delivery would be deferred: '
        'set tls = "require" or "verify" (or auth_plaintext = true to send the password '
        "unencrypted)"
    )
    smarthost = {"type": "smarthost", "host": "127.0.0.1", "tls": "none", **creds}
    with pytest.raises(ValueError) as info:
        RouteTable({}, {"relay": smarthost}, App(tmp_path))
    assert str(info.value) == f"transports.relay.username: {message}"
    with pytest.raises(ValueError) as info:
        ForwardPlugin().bonzo_configure(
            {"host": "127.0.0.1", "tls": "none", **creds}, _forward_app()
        )
    assert str(info.value) == f"username: {message}"
    for fine in ({"auth_plaintext": True}, {"implicit_tls": True}, {"tls": "require"}):
        RouteTable({}, {"relay": {**smarthost, **fine}}, App(tmp_path))


def _forward_app() -> Any:
    from test_forward import app

    return app()


def test_an_mx_transport_uses_the_ca_file_for_its_tls_policies(tmp_path, ca):
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    table = RouteTable(
        {"*": {"type": "mx", "tls_ca_file": "ca.pem", "tls_policies": {"bank.test": "verify"}}},
        {},
        App(tmp_path),
    )
    mx = table.default
    assert mx.settings.tls_context is not None
    assert mx.policies["bank.test"].tls_context is mx.settings.tls_context
    stats = mx.settings.tls_context.cert_store_stats()
    assert stats["x509_ca"] == 1  # the file's CA only, not the system's store


def test_the_delivered_line_says_how_the_connection_was_protected(
    tmp_path, ca, tls_downstream, start_server, caplog
):
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    plain = start_server(hostname="plain.test")
    routes = {
        "verified.test": route(tls_downstream.port, tls_ca_file="ca.pem"),
        "encrypted.test": route(tls_downstream.port, tls="require"),
        "clear.test": {"type": "smarthost", "host": "127.0.0.1", "port": plain.port},
    }
    spool, runner = make(tmp_path, routes)
    for n, domain in enumerate(routes):
        queue(spool, f"L{n}", f"bob@{domain}")
    with caplog.at_level(logging.INFO, logger="bonzo"):
        asyncio.run(attempt_all(runner, "L0", "L1", "L2"))
    assert spool.ids() == []
    lines = {
        m.group(1): m.group(2)
        for r in caplog.records
        if (m := re.search(r"to=<bob@([\w.]+)> delivered: .* tls=(.*)$", r.getMessage()))
    }
    assert re.fullmatch(r"TLSv1\.[23] \S+ verified", lines["verified.test"])
    assert re.fullmatch(r"TLSv1\.[23] \S+ not verified", lines["encrypted.test"])
    assert lines["clear.test"] == "none"


def test_an_mx_route_verifies_its_hosts_against_the_ca_file(tmp_path, ca, dns_stub):
    """``mx`` with ``tls_policies`` verify: the MX host's name (mx.test) is
    checked against the certificate, under the file's CA."""
    from bonzo.dns import Resolver

    leaf = ca.issue_cert("mx.test")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem.bytes())
    from e2e_support import ServerThread
    from test_queue_routes import Picky

    context = make_server_context(CertificatePair(str(cert), str(key)))
    server = ServerThread(
        plugin=Picky(), hostname="mx.dest.test", listener=ListenerSettings(tls_context=context)
    ).start()
    try:
        dns_stub.add("bank.test", "MX", "10 mx.test.")
        dns_stub.add("mx.test", "A", "127.0.0.1")
        dns_stub.add("wrong.test", "MX", "10 wrongmx.test.")
        dns_stub.add("wrongmx.test", "A", "127.0.0.1")
        mx = {
            "type": "mx",
            "port": server.port,
            "tls_ca_file": "ca.pem",
            "tls_policies": {"bank.test": "verify", "wrong.test": "verify"},
        }
        spool, runner = make(tmp_path, {"*": mx}, Resolver(dns_stub.settings()))
        queue(spool, "X1", "bob@bank.test")
        queue(spool, "X2", "bob@wrong.test")
        asyncio.run(attempt_all(runner, "X1", "X2"))
        assert "X1" not in spool.ids()
        [(status, reply)] = states(spool, "X2")
        assert status == "deferred"
        assert reply == (
            f"451 4.7.5 TLS handshake failed (wrongmx.test[127.0.0.1]:{server.port}): "
            "certificate verification failed: Hostname mismatch, certificate is not valid "
            "for 'wrongmx.test'."
        )
        assert [m.rcpt_tos for m in server.plugin.messages] == [["bob@bank.test"]]
    finally:
        server.stop()

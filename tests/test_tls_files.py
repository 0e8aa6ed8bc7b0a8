"""Listener certificate files that load but are wrong: a chain in the wrong
order (a clear error) and dates that have passed or are near (warnings from
``bonzo check``, at start-up and at a reload).

Certificates are made by trustme; nothing goes over the network.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from ports import free_port

from bonzo.app import MailApp
from bonzo.config import ConfigError, load_config, parse_config
from bonzo.tls import CertificatePair, TLSError, certificate_warnings, make_server_context

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture(scope="module")
def intermediate() -> trustme.CA:
    return trustme.CA().create_child_ca()


def write_leaf(
    ca: trustme.CA, base: Path, name: str, *, reverse: bool = False, **dates: datetime.datetime
) -> CertificatePair:
    """Leaf and intermediate in ``name``.pem (the intermediate first when
    ``reverse``), the key in ``name``.key."""
    leaf = ca.issue_cert("mx.test", common_name="mx.test", **dates)  # type: ignore[arg-type]
    pems = [p.bytes() for p in leaf.cert_chain_pems[:2]]
    cert, key = base / f"{name}.pem", base / f"{name}.key"
    cert.write_bytes(b"".join(reversed(pems) if reverse else pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return CertificatePair(str(cert), str(key))


def test_a_chain_in_the_wrong_order_is_named_as_such(tmp_path, intermediate):
    pair = write_leaf(intermediate, tmp_path, "bad", reverse=True)
    with pytest.raises(TLSError) as info:
        make_server_context(pair)
    assert str(info.value) == (
        f"certificate {pair.cert}: the first certificate is not the one for key {pair.key} "
        "(certificate 2 of the file is); the server certificate must come first, then the "
        "intermediates"
    )
    # The configuration error names the key; a right order loads.
    with pytest.raises(ConfigError) as config_error:
        parse_config(
            '[[listeners]]\nport = 2600\ntls = { cert = "bad.pem", key = "bad.key" }\n',
            source="t.toml",
            base_dir=tmp_path,
        )
    assert config_error.value.key == "listeners[0].tls"
    assert "the server certificate must come first" in str(config_error.value)
    make_server_context(write_leaf(intermediate, tmp_path, "good"))


def test_a_key_of_no_certificate_in_the_file_is_still_a_mismatch(tmp_path, intermediate):
    pair = write_leaf(intermediate, tmp_path, "one", reverse=True)
    other = write_leaf(intermediate, tmp_path, "two")
    with pytest.raises(TLSError, match=r"^key .*two\.key does not match certificate .*one\.pem$"):
        make_server_context(CertificatePair(pair.cert, other.key))


def test_certificate_date_warnings(tmp_path, intermediate):
    day = datetime.timedelta(days=1)
    expired = write_leaf(
        intermediate, tmp_path, "old", not_before=NOW - 90 * day, not_after=NOW - day
    )
    soon = write_leaf(
        intermediate, tmp_path, "soon", not_after=NOW + 5 * day + datetime.timedelta(hours=1)
    )
    later = write_leaf(intermediate, tmp_path, "later", not_before=NOW + 2 * day)
    fine = write_leaf(intermediate, tmp_path, "fine", not_after=NOW + 60 * day)
    for pair in (expired, soon, later, fine):
        make_server_context(pair)  # all of them load
    (warning,) = certificate_warnings(expired)
    when = (NOW - day).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert warning == (
        f"certificate {expired.cert} (CN=mx.test) expired on {when}: clients that check it "
        "will refuse it; renew it"
    )
    (warning,) = certificate_warnings(soon)
    assert warning.startswith(f"certificate {soon.cert} (CN=mx.test) expires on ")
    assert "(in 5 day(s)); renew it" in warning
    (warning,) = certificate_warnings(later)
    assert "is not valid before" in warning
    assert certificate_warnings(fine) == []
    assert certificate_warnings(CertificatePair(str(tmp_path / "missing.pem"), fine.key)) == []


def _chain_with_an_expired_intermediate(base: Path) -> CertificatePair:
    """Leaf (valid) then intermediate (expired yesterday), made with
    ``cryptography`` (trustme sets no intermediate's dates)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def cert(subject, issuer, key, signer, start, end, ca):
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    day = datetime.timedelta(days=1)
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    mid = cert("Mid CA", "Root CA", mid_key, root_key, NOW - 400 * day, NOW - day, True)
    leaf = cert("mx.test", "Mid CA", leaf_key, mid_key, NOW - 30 * day, NOW + 60 * day, False)
    pem = serialization.Encoding.PEM
    path, key = base / "chain.pem", base / "chain.key"
    path.write_bytes(leaf.public_bytes(pem) + mid.public_bytes(pem))
    key.write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return CertificatePair(str(path), str(key))


def test_an_expired_intermediate_is_warned_about(tmp_path):
    """Every client that verifies refuses the chain as it would an expired
    server certificate: the first one alone was read."""
    pair = _chain_with_an_expired_intermediate(tmp_path)
    make_server_context(pair)  # it loads
    (warning,) = certificate_warnings(pair)
    assert warning.startswith(f"intermediate certificate 2 of {pair.cert} (CN=Mid CA) expired on ")


def test_a_certificate_expiring_within_a_day_says_hours(tmp_path, intermediate):
    # Now, not NOW (the module's import): the suite may run for half an hour.
    now = datetime.datetime.now(datetime.timezone.utc)
    soon = write_leaf(
        intermediate, tmp_path, "hours", not_after=now + datetime.timedelta(hours=5, minutes=30)
    )
    (warning,) = certificate_warnings(soon)
    assert "(in 5 hour(s)); renew it" in warning


CONFIG = """\
[[listeners]]
address = "127.0.0.1"
port = {port}

[listeners.tls]
cert = "cert.pem"
key = "key.pem"
sni."mx2.test" = {{ cert = "mx2.pem", key = "mx2.key" }}

[plugins]
enabled = ["recipients", "maildir"]

[plugins.recipients]
domains = ["example.test"]

[plugins.maildir]
path = "mail"
"""


def test_check_and_reload_warn_about_an_expired_certificate(tmp_path, intermediate, caplog):
    day = datetime.timedelta(days=1)
    good = write_leaf(intermediate, tmp_path, "good")
    for cert, key in (("cert.pem", "key.pem"), ("mx2.pem", "mx2.key")):
        (tmp_path / cert).write_bytes(Path(good.cert).read_bytes())
        (tmp_path / key).write_bytes(Path(good.key).read_bytes())
        (tmp_path / key).chmod(0o600)  # as keys are kept: only the date is wrong here
    config = tmp_path / "bonzo.toml"
    config.write_text(CONFIG.format(port=free_port()))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)

    def check() -> str:
        result = subprocess.run(
            [sys.executable, "-m", "bonzo", "check", "-c", str(config)],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "certificate" not in check()
    old = MailApp(load_config(str(config)))
    old.bind()
    try:
        # The renewal puts last year's certificate in place.
        expired = write_leaf(intermediate, tmp_path, "exp", not_after=NOW - day)
        (tmp_path / "mx2.pem").write_bytes(Path(expired.cert).read_bytes())
        (tmp_path / "mx2.key").write_bytes(Path(expired.key).read_bytes())
        out = check()
        assert f'  warning: listeners[0].tls.sni."mx2.test": certificate {tmp_path}/mx2.pem' in out
        assert "expired on" in out

        from bonzo.cli import _reloaded_app

        with caplog.at_level(logging.WARNING, logger="bonzo"):
            new = _reloaded_app(old)
        assert new is not None  # warned, not refused
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1
        assert warned[0].startswith(
            f'reload: listeners[0].tls.sni."mx2.test": certificate {tmp_path}/mx2.pem (CN=mx.test) '
            "expired on "
        )
        new.release_sockets()
    finally:
        for _, socks in old._bound:
            for sock in socks:
                sock.close()


def test_a_reload_reads_the_system_ca_store_again(tmp_path, monkeypatch, caplog):
    """The delivery's ``verify`` policy trusts the system's CA store, read
    once per process: an updated store (ca-certificates) went unseen until a
    restart. A reload reads it again."""
    from bonzo import client
    from bonzo.app import MailApp
    from bonzo.cli import _reloaded_app
    from bonzo.client import ClientSettings
    from bonzo.config import load_config

    first, second = trustme.CA(), trustme.CA()
    store = tmp_path / "store.pem"
    store.write_bytes(first.cert_pem.bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(store))
    monkeypatch.setattr(client, "_SYSTEM_TRUST", None)

    def trusted() -> bytes:
        ctx = client._verify_context(ClientSettings())
        return b"".join(ssl.DER_cert_to_PEM_cert(der).encode() for der in ctx.get_ca_certs(True))

    assert trusted() == first.cert_pem.bytes()
    store.write_bytes(second.cert_pem.bytes())  # the store updated
    assert trusted() == first.cert_pem.bytes()  # read once
    config = tmp_path / "bonzo.toml"
    config.write_text(
        f'[[listeners]]\naddress = "127.0.0.1"\nport = {free_port()}\n'
        '[plugins]\nenabled = ["recipients"]\n[plugins.recipients]\ndomains = ["example.org"]\n'
    )
    old = MailApp(load_config(str(config)))
    old.bind()
    try:
        new = _reloaded_app(old)
        assert new is not None
        assert trusted() == second.cert_pem.bytes()
        new.release_sockets()
    finally:
        for _, socks in old._bound:
            for sock in socks:
                sock.close()


def test_files_shared_by_listeners_give_one_warning_naming_every_key(tmp_path, intermediate):
    # Ports 25, 465 and 587 with the one certificate: one line per problem.
    soon = write_leaf(intermediate, tmp_path, "soon", not_after=NOW + datetime.timedelta(days=3))
    Path(soon.key).chmod(0o644)
    listeners = "".join(
        f'[[listeners]]\naddress = "127.0.0.1"\nport = {free_port()}\n'
        f'tls = {{ cert = "soon.pem", key = "soon.key" }}\n\n'
        for _ in range(3)
    )
    config = parse_config(
        listeners + '[plugins]\nenabled = ["recipients"]\n[plugins.recipients]\n'
        'domains = ["example.test"]\n',
        source="t.toml",
        base_dir=tmp_path,
    )
    warnings = MailApp(config).certificate_warnings()
    assert len(warnings) == 2, warnings
    expiring, readable = warnings
    keys = "listeners[0].tls, listeners[1].tls, listeners[2].tls: "
    assert expiring.startswith(keys + f"certificate {tmp_path}/soon.pem (CN=mx.test) expires on ")
    assert readable.startswith(keys + f"the key file {tmp_path}/soon.key can be read by every user")


def test_a_certificate_that_did_not_issue_the_one_before_it_is_warned_about(tmp_path, intermediate):
    # Both server certificates of a dual RSA + ECDSA setup in one file, both
    # keys in the other: OpenSSL serves the first with the second as a bogus
    # intermediate, which every verifying client refuses; it loaded silently.
    first = write_leaf(intermediate, tmp_path, "first")
    other = trustme.CA().issue_cert("mx.test")
    both = tmp_path / "both.pem"
    leaf_only = Path(first.cert).read_bytes().split(b"-----END CERTIFICATE-----")[0]
    both.write_bytes(leaf_only + b"-----END CERTIFICATE-----\n" + other.cert_chain_pems[0].bytes())
    pair = CertificatePair(str(both), first.key)
    make_server_context(pair)  # it loads
    assert certificate_warnings(pair) == [
        f"certificate 2 of {both} did not issue certificate 1 before it: clients that check "
        "the chain will refuse it (one server certificate per file, followed by its "
        "intermediates in order)"
    ]
    assert certificate_warnings(first) == []  # leaf then its intermediate: fine

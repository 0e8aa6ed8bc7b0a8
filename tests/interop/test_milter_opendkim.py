"""The ``milter`` plugin against a real OpenDKIM run as a milter.

Each test starts a private ``opendkim`` daemon (foreground, its own
configuration, key and ``TestPublicKeys`` file in a temporary directory,
``Socket inet:PORT@127.0.0.1``, no syslog, no DNS: public keys come from the
file) and stops it at the end. Bonzo (``start_server``) runs the plugin in
front of a plugin that keeps what would be delivered:

* **signing** (``Mode s``): a message from an internal client (127.0.0.1 is
  in OpenDKIM's default ``InternalHosts``) comes out with the
  ``DKIM-Signature:`` field OpenDKIM inserted (``INSHEADER``), and dkimpy
  verifies it — with relaxed and with simple canonicalization, so the
  header fields and body Bonzo sent are exactly those delivered; also
  after a (fake) milter that replaces the body with bare LF or CR line
  ends: the signature verifies on the content as it is relayed;
* **verifying** (``Mode v``): OpenDKIM adds its ``Authentication-Results:``
  field: ``dkim=pass`` for a message signed with dkimpy, ``dkim=fail``
  when the body was changed after signing.
"""

from __future__ import annotations

import email.policy
import re
import shutil
import smtplib
from collections.abc import Callable, Iterator
from email.parser import BytesParser
from pathlib import Path

import dkim
import pytest
from bonzo_plugins.dkim_sign import dns_record, load_key
from bonzo_plugins.milter import MilterPlugin
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from milter_fake import FakeMilter

from bonzo import milter as m
from bonzo.client import DotStuffer
from bonzo.hooks import PluginSet

from .milters import Daemon, Keep, through_bonzo
from .peers import HOST, free_port, unavailable

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: milter interop\r\n"
    b"Date: Thu, 1 Jan 2026 10:00:00 +0000\r\n"
    b"Message-ID: <milter@example.org>\r\n"
    b"X-Folded: one\r\n"
    b"\ttwo  three\r\n"
    b"\r\n"
    b"Tabs\tand  spaces, trailing ones too \t \r\n"
    b"\r\n"
)


def opendkim_binary() -> str:
    path = shutil.which("opendkim") or "/usr/sbin/opendkim"
    if not Path(path).is_file():
        unavailable("OpenDKIM is not installed (Debian package opendkim)")
    return path


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("milter-dkim") / "s1.pem"
    private = rsa.generate_private_key(65537, 2048)
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


class OpenDKIM(Daemon):
    """A private ``opendkim -f`` listening on 127.0.0.1."""

    def __init__(self, directory: Path, key: Path, mode: str, canonicalization: str) -> None:
        directory.mkdir()
        records = directory / "keys"
        records.write_text(f"s1._domainkey.example.org {dns_record(load_key(key))}\n")
        # Mail from an internal host is signed, from others verified: the
        # test client (127.0.0.1) is internal only when signing.
        internal = directory / "internal"
        internal.write_text("127.0.0.1\n" if "s" in mode else "192.0.2.1\n")
        port = free_port()
        self.conf = directory / "opendkim.conf"
        self.conf.write_text(
            "Syslog no\n"
            "Background no\n"
            f"Socket inet:{port}@{HOST}\n"
            f"Mode {mode}\n"
            "Domain example.org\n"
            f"KeyFile {key}\n"
            "Selector s1\n"
            f"Canonicalization {canonicalization}\n"
            f"TestPublicKeys {records}\n"
            # The key lives under /tmp, which others can write to.
            "RequireSafeKeys false\n"
            "AuthservID bonzo.test\n"
            f"InternalHosts {internal}\n"
            f"PidFile {directory / 'pid'}\n"
        )
        argv = [opendkim_binary(), "-f", "-x", str(self.conf)]
        super().__init__("opendkim", argv, port, directory / "opendkim.log")


@pytest.fixture
def opendkim(tmp_path: Path, key: Path) -> Iterator[Callable[..., OpenDKIM]]:
    started: list[OpenDKIM] = []

    def start(mode: str, canonicalization: str = "relaxed/relaxed") -> OpenDKIM:
        daemon = OpenDKIM(tmp_path / f"opendkim{len(started)}", key, mode, canonicalization)
        started.append(daemon)
        return daemon.start()

    try:
        yield start
    finally:
        for daemon in started:
            daemon.stop()


def run(
    start_server: Callable[..., object], daemon: OpenDKIM, *messages: bytes, authres: object = None
) -> list[bytes]:
    after = [(authres, "authres")] if authres is not None else []
    outcomes = through_bonzo(start_server, "opendkim", daemon.port, *messages, after=after)
    assert all(isinstance(o, bytes) for o in outcomes), outcomes
    return outcomes  # type: ignore[return-value]


def dns_for(key: Path) -> Callable[..., bytes]:
    record = dns_record(load_key(key)).encode()

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        assert name.rstrip(b".") == b"s1._domainkey.example.org", name
        return record

    return dnsfunc


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_opendkim_signs_through_the_milter(start_server, opendkim, key, canonicalization):
    daemon = opendkim("s", canonicalization)
    big = MESSAGE + b"".join(
        b"line %d of a body longer than one milter chunk\r\n" % i for i in range(4000)
    )
    delivered = run(start_server, daemon, MESSAGE, big)
    for content in delivered:
        head = content.split(b"\r\n\r\n", 1)[0]
        assert head.count(b"DKIM-Signature:") == 1, head
        # OpenDKIM inserts it at index 0 (INSHEADER): above Bonzo's Received:.
        assert content.startswith(b"DKIM-Signature: v=1;"), head
        assert f"c={canonicalization};".encode() in content
        assert dkim.verify(content, dnsfunc=dns_for(key)), content[:2000]
        # ... and a changed body no longer verifies.
        assert not dkim.verify(content.replace(b"Tabs", b"Tabz"), dnsfunc=dns_for(key))
    assert len(delivered[1]) > 4 * 65535 / 2


def _signed(key: Path) -> bytes:
    """MESSAGE signed for example.org (relaxed/relaxed) with ``key``."""
    signature = dkim.sign(
        MESSAGE,
        b"s1",
        b"example.org",
        key.read_bytes(),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"From", b"To", b"Subject", b"Date", b"Message-ID"],
    )
    return signature + MESSAGE


def test_opendkim_verifies_through_the_milter(start_server, opendkim, key):
    daemon = opendkim("v")
    signed = _signed(key)
    good, bad = run(start_server, daemon, signed, signed.replace(b"Tabs", b"Tabz"))
    for content, verdict in ((good, "dkim=pass"), (bad, "dkim=fail")):
        message = BytesParser(policy=email.policy.default).parsebytes(content)
        (results,) = message.get_all("Authentication-Results")
        assert str(results).startswith("bonzo.test;"), results
        assert verdict in str(results) and "header.d=example.org" in str(results), results


def test_authres_keeps_the_field_opendkim_adds_under_the_same_id(start_server, opendkim, key):
    """OpenDKIM's ``AuthservID`` is the host name by default, which is
    also ``authres``' default id: ``authres`` after the milter removes the
    forged field that came with the message under that id, not the one
    OpenDKIM (a milter of this server) just added."""
    from types import SimpleNamespace

    from bonzo_plugins.authres import AuthresPlugin

    authres = AuthresPlugin()
    authres.bonzo_configure(
        config={}, app=SimpleNamespace(settings=SimpleNamespace(hostname="bonzo.test"))
    )
    daemon = opendkim("v")
    forged = b"Authentication-Results: bonzo.test; dkim=pass header.d=forged.example\r\n"
    (content,) = run(start_server, daemon, forged + _signed(key), authres=authres)
    message = BytesParser(policy=email.policy.default).parsebytes(content)
    fields = [str(f) for f in message.get_all("Authentication-Results")]
    assert not [f for f in fields if "forged.example" in f], fields
    # OpenDKIM's (it reports the key size) and authres' own (no result: none).
    assert len(fields) == 2, fields
    assert any("dkim=pass (2048-bit key)" in f for f in fields), fields
    assert "bonzo.test; none" in fields, fields


# What a body-replacing milter (a disclaimer or footer milter in Python or
# Perl) sends: LF lines, a bare CR, and a CRLF split between two REPLBODY
# frames. Each list is one replacement, one REPLBODY per piece.
REPLACEMENTS = [
    [b"Hello Bob,\n\nBody rewritten by a disclaimer milter.\n--\nDisclaimer.\n"],
    [b"line one\nline two\r\nline three\rnot a line end\r", b"\nlast\n"],
    [b"no line end at the end"],
]


@pytest.mark.parametrize("canonicalization", ["relaxed/relaxed", "simple/simple"])
def test_opendkim_after_a_body_replacing_milter_signs_what_is_relayed(
    start_server, opendkim, key, canonicalization
):
    """OpenDKIM after a milter whose REPLBODY has bare LF or CR line ends
    signs the body as it is relayed: Bonzo stores the replacement with CRLF
    lines, which the next milter sees and :mod:`bonzo.client` sends."""
    pending = list(REPLACEMENTS)

    def replace(command: m.Command, session: object) -> object:
        if command.code != m.C_EOB:
            return None
        pieces = pending.pop(0)
        return [*(m.ReplaceBody(p) for p in pieces), m.Verdict(m.R_CONTINUE)]

    daemon = opendkim("s", canonicalization)
    with FakeMilter(replace) as replacer:
        plugin = MilterPlugin()
        plugin.bonzo_configure(
            config={
                "milters": [
                    {"name": "replacer", "socket": replacer.spec},
                    {"name": "opendkim", "socket": f"inet:{daemon.port}@{HOST}"},
                ]
            },
            app=None,
        )
        keep = Keep()
        plugins = PluginSet(timeout=60.0)
        plugins.register(plugin, "milter")
        plugins.register(keep, "keep")
        server = start_server(plugins=plugins)

        with smtplib.SMTP(HOST, server.port, local_hostname="client.test", timeout=60) as client:
            for _ in REPLACEMENTS:
                assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
    assert len(keep.messages) == len(REPLACEMENTS)
    for content, pieces in zip(keep.messages, REPLACEMENTS, strict=True):
        head, _, body = content.partition(b"\r\n\r\n")
        assert head.count(b"DKIM-Signature:") == 1, head
        # What the far end gets: the content as bonzo.client sends it
        # (CRLF lines, dot-stuffed), unstuffed.
        stuffer = DotStuffer()
        wire = stuffer.feed(content) + stuffer.finish()
        relayed = wire.removesuffix(b".\r\n").replace(b"\r\n..", b"\r\n.")
        assert dkim.verify(relayed, dnsfunc=dns_for(key)), relayed
        # ... which is what was stored, and what OpenDKIM was shown.
        assert relayed == content
        expected = re.sub(rb"\r\n|\r|\n", b"\r\n", b"".join(pieces))
        expected += b"" if expected.endswith(b"\r\n") else b"\r\n"
        assert body == expected

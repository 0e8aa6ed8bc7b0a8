"""Fixtures for the tests with real peers.

* ``postfix`` / ``exim``: factories. ``postfix(route, **options)`` starts a
  private :class:`~interop.postfix.Postfix` (``exim(...)`` an
  :class:`~interop.exim.Exim`) and returns it; every instance a test started
  is stopped after it. A peer that cannot run here skips the test, or fails
  it when ``BONZO_INTEROP_REQUIRED=1`` (as in CI).
* ``dovecot``: a private Dovecot LMTP server (:mod:`interop.dovecot`), one per
  test module.
* ``socket_dir``: a directory for a Unix socket the peers can reach.
* ``certificate``: a certificate for 127.0.0.1 from a throwaway CA, and
  ``tls_listener``: Bonzo listener settings that offer STARTTLS with it.
* A failed test's report has a section with the log of each peer it started.

``start_server`` (Bonzo in a thread) comes from ``tests/conftest.py``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from bonzo.settings import ListenerSettings
from bonzo.tls import CertificatePair, make_server_context

from . import exim as exim_peer
from . import postfix as postfix_peer
from .dovecot import Dovecot, available, dovecot_lmtp
from .peers import Peer, Route, unavailable

PEERS = pytest.StashKey[list[Peer]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for peer in item.stash.get(PEERS, []):
            report.sections.append((f"{peer.name} log", peer.diagnosis()))
    return report


def _factory(request: pytest.FixtureRequest, make: Callable[..., Peer]) -> Iterator[Any]:
    started: list[Peer] = []

    def start(route: Route | None = None, **options: Any) -> Peer:
        peer = make(route, **options)
        started.append(peer)
        request.node.stash.setdefault(PEERS, []).append(peer)
        return peer.start()

    try:
        yield start
    finally:
        for peer in reversed(started):
            peer.stop()


@pytest.fixture
def postfix(request: pytest.FixtureRequest) -> Iterator[Callable[..., postfix_peer.Postfix]]:
    reason = postfix_peer.unavailable_reason()
    if reason is not None:
        unavailable(reason)
    yield from _factory(request, postfix_peer.Postfix)


@pytest.fixture
def exim(request: pytest.FixtureRequest) -> Iterator[Callable[..., exim_peer.Exim]]:
    reason = exim_peer.unavailable_reason()
    if reason is not None:
        unavailable(reason)
    yield from _factory(request, exim_peer.Exim)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A fresh directory for a Unix socket that the peers' own users
    (``postfix``, ``Debian-exim``) can reach, unlike pytest's ``tmp_path``."""
    path = Path(tempfile.mkdtemp(prefix="bonzo-sock-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> CertificatePair:
    """A certificate and key for 127.0.0.1 and localhost (not verified by the
    peers: ``encrypt``, not ``verify``)."""
    base = tmp_path_factory.mktemp("interop-certs")
    leaf = trustme.CA().issue_cert("127.0.0.1", "localhost")
    cert, key = base / "server.crt", base / "server.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return CertificatePair(str(cert), str(key))


@pytest.fixture
def tls_listener(certificate: CertificatePair) -> Callable[..., ListenerSettings]:
    """``tls_listener(**options)``: listener settings with STARTTLS."""

    def make(**options: Any) -> ListenerSettings:
        return ListenerSettings(tls_context=make_server_context(certificate), **options)

    return make


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    if not available():
        unavailable("dovecot-lmtpd is not installed (.ci/run installs it)")
    with dovecot_lmtp() as instance:
        yield instance

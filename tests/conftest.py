"""Fixtures shared by the test suite.

* ``log_watch`` (autouse): fails a test that makes the ``tornado``, ``bonzo``
  or ``asyncio`` loggers emit an ERROR record it did not declare with
  ``log_watch.allow(pattern)`` or ``log_watch.wait_for(pattern)``.
* ``start_server``: starts an :class:`~bonzo.server.SMTPServer` on an unused
  port of 127.0.0.1, in a background thread with its own event loop, and
  stops it after the test. ``start_server(plugin=..., **settings)`` (one
  plugin object), ``start_server(plugins=PluginSet, **settings)`` or
  ``start_server(request_callback, **settings)``; with none, a
  :class:`~e2e_support.RecordingPlugin` collects the delivered messages in
  ``server.plugin.messages``.
* ``server``: ``start_server()`` with the default settings.
* ``dns_stub``: a :class:`~dns_stub.DNSStub` DNS server on 127.0.0.1 with
  an empty zone (``dns_stub.add(name, type, rdata)``), stopped after the
  test; ``dns_stub.resolver()`` is a :class:`~bonzo.dns.Resolver` asking it.
* ``scan_implementation``: runs a module's tests once with the C DATA scan
  (``bonzo._speedups``) and once with the pure-Python one; a module opts in
  with ``pytestmark = pytest.mark.usefixtures("scan_implementation")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dns_stub import DNSStub
from e2e_support import LogWatch, ServerThread
from protocol_helpers import c_scan_data

import bonzo.protocol


@pytest.fixture(autouse=True)
def log_watch(request: pytest.FixtureRequest) -> Iterator[LogWatch]:
    """Fail a test that logs an ERROR it did not allow (``log_watch.allow(...)``)
    or that is not marked ``expect_errors``."""
    watch = LogWatch()
    watch.install()
    try:
        yield watch
    finally:
        watch.uninstall()
    if request.node.get_closest_marker("expect_errors"):
        return
    unexpected = watch.unexpected()
    if unexpected:
        lines = "\n".join(f"  {r.name} {r.levelname}: {r.getMessage()}" for r in unexpected[:20])
        pytest.fail(f"unexpected ERROR log records:\n{lines}", pytrace=False)


@pytest.fixture
def start_server(log_watch: LogWatch) -> Iterator[Callable[..., ServerThread]]:
    servers: list[ServerThread] = []

    def start(request_callback: Callable[..., Any] | None = None, **options: Any) -> ServerThread:
        if "settings" not in options:
            options.setdefault("hostname", "bonzo.test")
        thread = ServerThread(request_callback, **options)
        servers.append(thread)
        return thread.start()

    yield start
    errors = []
    for thread in reversed(servers):
        try:
            thread.stop()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    return start_server()


@pytest.fixture
def dns_stub() -> Iterator[DNSStub]:
    with DNSStub() as stub:
        yield stub


@pytest.fixture(scope="module", params=["c", "python"])
def scan_implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    saved = bonzo.protocol._scan_data
    if request.param == "c":
        scan_data = c_scan_data()
        if scan_data is None:
            pytest.skip("bonzo._speedups is not built")
        bonzo.protocol._scan_data = scan_data
    else:
        bonzo.protocol._scan_data = bonzo.protocol._scan_data_py
    try:
        yield request.param
    finally:
        bonzo.protocol._scan_data = saved

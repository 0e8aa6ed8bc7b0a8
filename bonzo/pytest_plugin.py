"""Pytest fixtures for plugin authors, registered with pytest (the
``pytest11`` entry point) when Bonzo is installed:

``bonzo_server``
    A factory: ``bonzo_server(*plugins, **options)`` starts a
    :class:`~bonzo.testing.PluginTestServer` with those plugins and options
    and returns it; every server it started is stopped after the test::

        def test_refuses_the_night(bonzo_server):
            server = bonzo_server(("night", NoNightMail()))
            with server.client(helo="night.example") as client:
                assert client.helo()[0] == 550

``bonzo_session``
    A factory for :func:`~bonzo.testing.make_session`, to call a hook
    directly with a session in a given state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .session import Session
from .testing import PluginTestServer, make_session

__all__ = ["bonzo_server", "bonzo_session"]


@pytest.fixture
def bonzo_server() -> Iterator[Callable[..., PluginTestServer]]:
    """Start :class:`~bonzo.testing.PluginTestServer` instances; each is
    stopped (its plugins shut down) after the test."""
    started: list[PluginTestServer] = []

    def start(*plugins: Any, **options: Any) -> PluginTestServer:
        server = PluginTestServer(*plugins, **options).start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def bonzo_session() -> Callable[..., Session]:
    """:func:`~bonzo.testing.make_session`, as a fixture."""
    return make_session

"""bonzo.testing: AsyncSMTPTestCase starts a server per test and cleans up after it."""

from __future__ import annotations

import unittest

from bonzo.hooks import PluginSet
from bonzo.server import SMTPServer
from bonzo.testing import AsyncSMTPTestCase


def test_teardown_runs_session_cleanup_for_connections_left_open():
    disconnected = []

    class Watch:
        async def bonzo_disconnect(self, session):
            disconnected.append(session.id)

    plugins = PluginSet()
    plugins.register(Watch(), "watch")

    class LeftOpen(AsyncSMTPTestCase):
        def get_request_callback(self):
            return None

        def get_smtp_server(self):
            return SMTPServer(plugins=plugins)

        def test_left_open(self):
            self.connect()
            self.stream.write(b"EHLO client.test\r\n")
            assert self.read_response().startswith(b"250-")
            self.servers_connections = len(self.smtp_server.connections)
            # The test ends with the connection still open.

    case = LeftOpen("test_left_open")
    result = unittest.TestResult()
    case.run(result)
    assert result.wasSuccessful(), result.errors + result.failures
    assert case.servers_connections == 1
    # tearDown closed the session and let it run bonzo_disconnect.
    assert len(disconnected) == 1
    assert not case.smtp_server.connections

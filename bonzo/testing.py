"""Unit testing support for asynchronous code.

:class:`AsyncSMTPTestCase` starts an :class:`~bonzo.server.SMTPServer` on an
unused port of 127.0.0.1 for each test and offers small helpers to talk SMTP
to it.
"""

from __future__ import annotations

import socket
from typing import Any

from tornado.escape import utf8
from tornado.iostream import IOStream
from tornado.testing import AsyncTestCase, bind_unused_port, get_async_test_timeout

from .server import SMTPServer

__all__ = ["AsyncSMTPTestCase"]


class AsyncSMTPTestCase(AsyncTestCase):
    """A test case that starts up an SMTP server.

    Subclasses must override :meth:`get_request_callback`, which returns a
    :class:`~bonzo.server.SMTPServer` callback to be tested.
    """

    def setUp(self) -> None:
        super().setUp()
        sock, port = bind_unused_port()
        self.__port = port
        self._request_callback = self.get_request_callback()
        self.smtp_server = self.get_smtp_server()
        self.smtp_server.add_sockets([sock])

    def get_smtp_server(self) -> SMTPServer:
        """Returns the :class:`~bonzo.server.SMTPServer` used by the test.
        Override it to test a server built another way."""
        return SMTPServer(self._request_callback, **self.get_smtpserver_options())

    def get_request_callback(self) -> Any:
        """Should be overridden by subclasses to return a
        :class:`~bonzo.server.SMTPServer` callback."""
        raise NotImplementedError()

    def get_smtpserver_options(self) -> dict[str, Any]:
        """May be overridden by subclasses to return additional keyword
        arguments for the server (settings such as ``max_message_size``)."""
        return {}

    def get_smtp_port(self) -> int:
        """Returns the port used by the server. A new port is chosen for each test."""
        return self.__port

    def connect(self, read_response: bool = True) -> None:
        """Open a connection to the server as ``self.stream``.

        :arg bool read_response: read (and discard) the greeting at once.
        """
        self.stream = IOStream(socket.socket())
        self.io_loop.run_sync(lambda: self.stream.connect(("127.0.0.1", self.get_smtp_port())))
        if read_response:
            self.read_response()

    def read_response(self) -> bytes:
        """Read one whole reply (every line of a multi-line one) and return it."""

        async def read() -> bytes:
            lines = []
            while True:
                line = await self.stream.read_until(b"\r\n", max_bytes=4096)
                lines.append(line)
                if line[3:4] != b"-":
                    return b"".join(lines)

        reply: bytes = self.io_loop.run_sync(read, timeout=get_async_test_timeout())
        return reply

    def send_mail(self, hostname: str, mail: str, rcpt: list[str], data: str) -> bytes:
        """Sends a coherent sequence of commands to send a message. Returns
        the reply to the end of the ``DATA`` command."""
        self.stream.write(utf8("HELO %s\r\n" % hostname))
        self.read_response()
        self.stream.write(utf8("MAIL FROM:%s\r\n" % mail))
        self.read_response()
        for address in rcpt:
            self.stream.write(utf8("RCPT TO:%s\r\n" % address))
            self.read_response()
        self.stream.write(b"DATA\r\n")
        self.read_response()
        self.stream.write(utf8("%s\r\n.\r\n" % data))
        return self.read_response()

    def close(self) -> None:
        """Closes the stream."""
        self.stream.close()
        del self.stream

    def tearDown(self) -> None:
        self.smtp_server.stop()
        for connection in list(self.smtp_server.connections):
            connection.close()
        # Let the sessions see the close and finish their cleanup.
        self.io_loop.run_sync(lambda: None)
        super().tearDown()

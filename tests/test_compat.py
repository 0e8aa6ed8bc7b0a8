"""The original Bonzo API, reply texts and behaviour, checked byte for byte."""

from __future__ import annotations

import asyncio
import email
import time

import pytest
from tornado import gen
from tornado.testing import ExpectLog

from bonzo import errors, version
from bonzo.hooks import CANCEL_GRACE
from bonzo.smtp import Application, RequestHandler
from bonzo.testing import AsyncSMTPTestCase


class LegacyRepliesTest(AsyncSMTPTestCase):
    def get_request_callback(self):
        def request_callback(request):
            request.finish()

        return request_callback

    def exchange(self, line: bytes) -> bytes:
        self.stream.write(line + b"\r\n")
        return self.read_response()

    def test_greeting_names_the_version(self):
        self.connect(read_response=False)
        assert self.read_response() == f"220 Bonzo SMTP Server {version}\r\n".encode()
        self.close()

    def test_unknown_verbs_are_not_implemented(self):
        self.connect()
        # The verb is echoed exactly as the client sent it, as in Bonzo 0.1.
        for verb in (b"BADCOMMAND", b"unknown", b"Bonzo", b"xFoo bar"):
            assert (
                self.exchange(verb)
                == b'502 Error: command "' + verb.split(b" ")[0] + b'" not implemented\r\n'
            )
        self.close()

    def test_empty_lines_are_bad_syntax(self):
        self.connect()
        for line in (b"", b"  "):
            assert self.exchange(line) == b"500 Error: bad syntax\r\n"
        self.close()

    def test_helo_and_its_errors(self):
        self.connect()
        assert self.exchange(b"HELO") == b"501 Syntax: HELO hostname\r\n"
        assert self.exchange(b"HELO Client name") == b"250 Hello 127.0.0.1\r\n"
        assert self.exchange(b"HELO Client name") == b"503 Duplicate HELO/EHLO\r\n"
        self.close()

    def test_noop_rset_quit(self):
        self.connect()
        assert self.exchange(b"NOOP") == b"250 Ok\r\n"
        assert self.exchange(b"NOOP args") == b"501 Syntax: NOOP\r\n"
        assert self.exchange(b"RSET") == b"250 Ok\r\n"
        assert self.exchange(b"RSET args") == b"501 Syntax: RSET\r\n"
        assert self.exchange(b"QUIT") == b"221 Bye\r\n"
        self.close()

    def test_mail_sequence_errors(self):
        self.connect()
        assert self.exchange(b"MAIL FROM:mail@example.com") == b"503 Error: need HELO command\r\n"
        assert self.exchange(b"RCPT TO:mail@example.com") == b"503 Error: need MAIL command\r\n"
        assert self.exchange(b"DATA") == b"503 Error: need RCPT command\r\n"
        self.exchange(b"HELO NameClient")
        assert self.exchange(b"MAIL FROM:") == b"501 Syntax: MAIL FROM:<address>\r\n"
        assert self.exchange(b"MAIL FROM:mail@example.com") == b"250 Ok\r\n"
        assert (
            self.exchange(b"MAIL FROM:other@example.com") == b"503 Error: nested MAIL command\r\n"
        )
        assert self.exchange(b"DATA") == b"503 Error: need RCPT command\r\n"
        assert self.exchange(b"RCPT TO:") == b"501 Syntax: RCPT TO:<address>\r\n"
        assert self.exchange(b"RCPT TO:mail@example.com") == b"250 Ok\r\n"
        assert self.exchange(b"RCPT TO:<mail@example.com>") == b"250 Ok\r\n"
        assert self.exchange(b"DATA args") == b"501 Syntax: DATA\r\n"
        assert self.exchange(b"DATA") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
        assert self.exchange(b"This is a message\r\n.") == b"250 Ok\r\n"
        self.close()


class RequestObjectTest(AsyncSMTPTestCase):
    def get_request_callback(self):
        def request_callback(request):
            self.seen = request
            request.finish()

        return request_callback

    def test_request_carries_the_envelope_and_data(self):
        self.connect()
        reply = self.send_mail(
            "client",
            "mail@example.com",
            ["mail@example.com", "<another@example.com>"],
            "This is a message.",
        )
        assert reply == b"250 Ok\r\n"
        assert self.seen.hostname == "client"
        assert self.seen.mail == "mail@example.com"
        assert self.seen.rcpt == ["mail@example.com", "another@example.com"]
        assert self.seen.data == "This is a message."
        assert (
            self.seen.message.as_string()
            == email.message_from_string("This is a message.").as_string()
        )
        assert self.seen.envelope.content.startswith(b"Received: from client ([127.0.0.1])")
        self.close()


class CallbackErrorsTest(AsyncSMTPTestCase):
    def get_request_callback(self):
        def request_callback(request):
            kind = request.rcpt[0].split("@")[0]
            if kind == "boom":
                raise Exception("This is a custom exception")
            if kind == "full":
                raise errors.SMTPError(452, "Insufficient system storage")
            raise errors.SMTPError(452, "Insufficient system storage", "custom %s", "log text")

        return request_callback

    def test_exception_is_451_and_logged(self):
        self.connect()
        with ExpectLog("tornado.application", "Uncaught exception"):
            reply = self.send_mail("client", "a@example.com", ["boom@example.com"], "hi")
        assert reply == b"451 Internal confusion\r\n"
        self.close()

    def test_smtp_error_is_the_reply(self):
        self.connect()
        reply = self.send_mail("client", "a@example.com", ["full@example.com"], "hi")
        assert reply == b"452 Insufficient system storage\r\n"
        self.close()

    def test_log_message_is_logged_not_sent(self):
        self.connect()
        # As Bonzo 0.1 logged it: "<code> <log_message % args>" first, on
        # tornado.general; the session's details come after.
        with ExpectLog("tornado.general", r"^452 custom log text \[\w+ 127\.0\.0\.1\] "):
            reply = self.send_mail("client", "a@example.com", ["log@example.com"], "hi")
        assert reply == b"452 Insufficient system storage\r\n"
        self.close()


class HandlerTest(AsyncSMTPTestCase):
    def get_request_callback(self):
        test = self

        class Handler(RequestHandler):
            @gen.coroutine
            def helper(self):
                return self.settings["answer"]

            @gen.coroutine
            def data(self):
                mode = self.request.rcpt[0].split("@")[0]
                if mode == "true":
                    return True
                if mode == "twice":
                    self.finish()
                    self.finish()
                test.result = yield self.helper()

        return Application(Handler, answer=42)

    def test_coroutine_data(self):
        self.connect()
        assert self.send_mail("c", "a@example.com", ["ok@example.com"], "hi") == b"250 Ok\r\n"
        assert self.result == 42
        self.close()

    def test_data_returning_a_value_is_an_error(self):
        self.connect()
        with ExpectLog("tornado.application", "Uncaught exception"):
            assert self.send_mail("c", "a@example.com", ["true@example.com"], "hi") == (
                b"451 Internal confusion\r\n"
            )
        self.close()

    def test_finish_twice_still_answers_250(self):
        self.connect()
        with ExpectLog("tornado.application", "Uncaught exception"):
            assert (
                self.send_mail("c", "a@example.com", ["twice@example.com"], "hi") == b"250 Ok\r\n"
            )
        self.close()


def test_request_repr_is_the_original_one():
    from bonzo.server import SMTPRequest

    request = SMTPRequest(
        None, "127.0.0.1", "DATA", hostname="client", mail="a@b", rcpt=["a@b", "c@d"]
    )
    assert (
        str(request)
        == repr(request)
        == (
            "SMTPRequest (remote_ip='127.0.0.1', hostname='client', mail='a@b', "
            "rcpt='['a@b', 'c@d']')"
        )
    )


def test_version_literal_matches_the_tuple():
    import bonzo

    assert bonzo.__version__ == bonzo.version == bonzo.get_version_string()
    assert bonzo.version.startswith(".".join(str(p) for p in bonzo.version_tuple[:3]))


def test_errors_take_the_code_first_and_still_the_text_first():
    from bonzo.errors import PermanentError, SMTPError, TransientError

    for error in (PermanentError(554, "No", "5.7.1"), PermanentError("No", 554, "5.7.1")):
        assert (error.status_code, error.message, error.enhanced_code) == (554, "No", "5.7.1")
    assert TransientError(450, "Later").status_code == 450
    assert TransientError("Later").status_code == 451
    assert PermanentError().message == "Rejected"
    assert PermanentError(["one", "two"], 550).lines == ["one", "two"]
    seed = SMTPError(550, "No", "client %s", "192.0.2.1")  # the original order
    assert str(seed) == "SMTP 550: No (client 192.0.2.1)"
    for bad in ((550, 551), (True, "x"), ("a", "b")):
        with pytest.raises(TypeError):
            PermanentError(*bad)
    with pytest.raises(ValueError, match="5xx"):
        PermanentError(451, "x")


@pytest.mark.parametrize(
    "enhanced",
    ["5.1.1\r\n250 2.1.5 Ok", "5", "5.1", "5.1.1 extra", "5.1.1\n", "5.1.1000", "5.a.1", "", 511],
)
def test_an_enhanced_code_that_is_not_rfc_3463_is_refused(enhanced):
    # Written into the reply line as it is: a line break in it would be a
    # forged second reply, and anything else a malformed one.
    from bonzo.errors import PermanentError, SMTPError

    with pytest.raises(ValueError, match="not an RFC 3463 code"):
        PermanentError(550, "Refused", enhanced)
    with pytest.raises(ValueError, match="not an RFC 3463 code"):
        SMTPError(550, "Refused", enhanced_code=enhanced)


def test_an_error_repr_shows_the_reply():
    # Log lines show errors by repr ("returned ... from bonzo_exception").
    from bonzo.errors import PermanentError, SMTPError

    assert repr(PermanentError(550, "Refused", "5.7.1")) == (
        "PermanentError(550, 'Refused', enhanced_code='5.7.1')"
    )
    assert repr(SMTPError(452, "Full")) == "SMTPError(452, 'Full')"


def test_an_enhanced_code_of_another_class_is_refused():
    from bonzo.errors import SMTPError, TransientError

    with pytest.raises(ValueError, match="does not match status 451"):
        TransientError(451, "Later", "5.7.1")
    assert SMTPError(553, "No", enhanced_code="5.1.10").enhanced_code == "5.1.10"


def test_a_reply_never_writes_a_malformed_enhanced_code():
    # One changed after the error was made still cannot break the line.
    from bonzo.protocol import format_reply

    wire = format_reply(550, "Refused", "5.1.1\r\n250 2.1.5 Ok", True)
    assert wire == b"550 5.0.0 Refused\r\n"
    assert format_reply(550, "Refused", "5.1.1", True) == b"550 5.1.1 Refused\r\n"


class ConnectionCloseTest(AsyncSMTPTestCase):
    """``on_connection_close``: told as soon as the client goes away while
    the handler works (not when the handler ends, nor at the hook's time
    limit), once; the reply is still written (the client may have shut its
    side only). And the test case's tearDown does not wait for a handler
    that never finishes."""

    def get_request_callback(self):
        test = self
        test.events = []
        test.release = asyncio.Event()

        class Handler(RequestHandler):
            async def data(self):
                test.events.append("data")
                if self.request.rcpt[0].startswith("never"):
                    await asyncio.sleep(3600)
                await asyncio.wait_for(test.release.wait(), 10)
                test.events.append("done")

            def on_connection_close(self):
                test.events.append("closed")
                test.release.set()

        return Application(Handler)

    def _send_and_leave(self, rcpt: str) -> None:
        self.connect()
        self.stream.write(b"HELO c\r\nMAIL FROM:<a@example.com>\r\n")
        self.read_response()
        self.read_response()
        self.stream.write(b"RCPT TO:<%s>\r\nDATA\r\n" % rcpt.encode())
        self.read_response()
        self.read_response()
        self.stream.write(b"hi\r\n.\r\n")
        self._until("data", 2.0)
        self.close()

    def _until(self, event: str, seconds: float) -> None:
        """Wait (bounded) until the handler recorded ``event``."""

        async def wait() -> None:
            for _ in range(int(seconds / 0.01)):
                if event in self.events:
                    return
                await asyncio.sleep(0.01)

        self.io_loop.run_sync(wait)

    def test_the_handler_is_told_when_the_client_goes_away(self):
        begun = time.monotonic()
        self._send_and_leave("a@example.com")
        self._until("done", 5.0)
        # Told while the handler waited (it waits for exactly that), once.
        assert self.events == ["data", "closed", "done"]
        assert time.monotonic() - begun < 5

    def test_teardown_does_not_wait_for_a_handler_that_never_finishes(self):
        self._send_and_leave("never@example.com")
        begun = time.monotonic()
        self.io_loop.run_sync(self.smtp_server.close_all_connections)
        assert time.monotonic() - begun < CANCEL_GRACE + 3
        assert self.smtp_server.connections == set() or not any(
            c.task is not None and not c.task.done() for c in self.smtp_server.connections
        )

"""bonzo.client: outbound SMTP and LMTP, with a result per recipient.

Three kinds of peer, all on 127.0.0.1: a real Bonzo server (in a thread,
plugins refusing, deferring and recording; STARTTLS, implicit TLS and AUTH
with a throwaway trustme CA; its LMTP listener); scripted asyncio servers
for the replies and faults a real daemon does not give (huge or endless
replies, garbage, silence, a connection dropped mid-DATA); and the
streaming encoder alone, with Hypothesis. The Dovecot and Postfix
smtp-sink tests are in ``tests/interop/``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import ssl
from typing import Any

import pytest
import trustme
from client_support import (
    EHLO,
    HOST,
    Fake,
    RecordingFile,
    deliver_through,
    read_message,
    run,
    serve,
    unstuff,
)
from e2e_support import RecordingPlugin
from hypothesis import example, given
from hypothesis import strategies as st

from bonzo import Accept
from bonzo.client import (
    ClientError,
    ClientSettings,
    DeliveryResult,
    DotStuffer,
    Recipient,
    Reply,
    Stage,
    Status,
    connect,
    deliver,
    server_label,
)
from bonzo.errors import PermanentError, TransientError
from bonzo.session import Envelope
from bonzo.settings import ListenerSettings
from bonzo.tls import CertificatePair, make_server_context

pytestmark = pytest.mark.timeout(60)

USER = "relay"
PASSWORD = "s3cret relay password"
MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"


def settings(**changes: Any) -> ClientSettings:
    """Client settings for tests: short timeouts, a fixed HELO name."""
    base: dict[str, Any] = {"helo_name": "client.test"}
    for name in ("connect", "greeting", "helo", "starttls", "auth", "mail", "rcpt", "data"):
        base[f"{name}_timeout"] = 5.0
    base.update(data_block_timeout=5.0, data_end_timeout=5.0, rset_timeout=5.0, quit_timeout=2.0)
    base.update(changes)
    return ClientSettings(**base)


def statuses(result: DeliveryResult) -> list[tuple[str, str, str, int, str]]:
    return [
        (r.address, r.status.value, r.stage.value, r.code, r.enhanced_code)
        for r in result.recipients
    ]


# ---------------------------------------------------------------- plugins
class Policy(RecordingPlugin):
    """Records like RecordingPlugin; refuses or defers by local part:
    sender ``blocked``/``busy`` at MAIL, recipient ``unknown``/``later`` at
    RCPT, sender ``reject-data``/``defer-data`` after the message; in LMTP,
    recipients ``full``/``gone`` get their own replies after the message."""

    def __init__(self) -> None:
        super().__init__()
        self.params: list[dict[str, Any]] = []
        self.remote_ips: list[str] = []
        self.auth: list[str | None] = []
        self.tls: list[Any] = []

    def bonzo_mail(self, session: Any, envelope: Any, address: str, params: dict[str, Any]) -> Any:
        self.senders.append(address)
        self.params.append(dict(params))
        local = address.split("@")[0]
        if local == "blocked":
            raise PermanentError("Sender blocked", 550, "5.7.1")
        if local == "busy":
            raise TransientError("Sender busy", 451, "4.7.1")

    def bonzo_rcpt(self, mailbox: Any) -> Any:
        if mailbox.local == "unknown":
            raise PermanentError("No such user here", 550, "5.1.1")
        if mailbox.local == "later":
            raise TransientError("Greylisted, try later", 450, "4.2.0")
        if mailbox.local == "crowd":
            # "Too many recipients" as some servers give it (a 552).
            raise PermanentError("Too many recipients", 552, "5.5.3")
        if mailbox.local == "limit":
            raise TransientError("Too many recipients", 452, "4.5.3")
        return Accept()

    def bonzo_deliver(self, session: Any, envelope: Envelope) -> Any:
        self.remote_ips.append(session.remote_ip)
        self.auth.append(session.auth)
        self.tls.append(session.tls)
        local = envelope.sender.local
        if local == "reject-data":
            raise PermanentError("Content refused", 554, "5.7.0")
        if local == "defer-data":
            raise TransientError("Scanner unavailable", 451, "4.3.0")
        for r in envelope.recipients:
            if r.local == "full":
                envelope.refuse_recipient(r, TransientError("Mailbox full", 452, "4.2.2"))
            elif r.local == "gone":
                envelope.refuse_recipient(r, PermanentError("Mailbox gone", 550, "5.1.1"))
        return super().bonzo_deliver(session, envelope)

    def bonzo_auth(self, username: str, password: str) -> Any:
        return Accept() if (username, password) == (USER, PASSWORD) else None


# ----------------------------------------------------------- certificates
@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    base = tmp_path_factory.mktemp("client-certs")
    leaf = ca.issue_cert("127.0.0.1", "localhost", "mx.bonzo.test")
    cert, key = base / "server.crt", base / "server.key"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return make_server_context(CertificatePair(str(cert), str(key)))


@pytest.fixture(scope="module")
def trust(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts the test CA only and checks names."""
    ctx = ssl.create_default_context(cafile=None, capath=None, cadata=None)
    ctx.load_verify_locations(cadata=ca.cert_pem.bytes().decode())
    return ctx


@pytest.fixture
def policy_server(start_server: Any) -> Any:
    return start_server(plugin=Policy())


def deliver_to(server: Any, rcpts: list[str]) -> DeliveryResult:
    """MESSAGE from alice@example.org to ``rcpts`` through ``server``."""
    return run(
        deliver(
            HOST,
            server.port,
            sender="alice@example.org",
            recipients=rcpts,
            message=MESSAGE,
            settings=settings(),
        )  # fmt: skip
    )


# ======================================================= per-recipient results
def test_every_outcome_per_recipient_from_a_real_server(policy_server):
    rcpts = ["ok1@example.net", "unknown@example.net", "later@example.net", "ok2@example.net"]
    result = deliver_to(policy_server, rcpts)
    assert statuses(result) == [
        ("ok1@example.net", "delivered", "end", 250, "2.0.0"),
        ("unknown@example.net", "refused", "rcpt", 550, "5.1.1"),
        ("later@example.net", "deferred", "rcpt", 450, "4.2.0"),
        ("ok2@example.net", "delivered", "end", 250, "2.0.0"),
    ]
    assert result.recipients[1].text == "No such user here"
    assert result.recipients[1].reply.remote
    assert [r.address for r in result.delivered] == ["ok1@example.net", "ok2@example.net"]
    assert len(result.refused) == len(result.deferred) == 1
    assert result.server == f"{HOST}:{policy_server.port}"
    (got,) = policy_server.plugin.messages
    assert got.rcpt_tos == ["ok1@example.net", "ok2@example.net"]
    assert got.body == MESSAGE
    assert got.helo == "client.test"
    # No 8-bit content, no SMTPUTF8: only SIZE is declared.
    assert policy_server.plugin.params == [{"SIZE": str(len(MESSAGE))}]


def test_too_many_recipients_is_a_deferral_even_as_552(policy_server):
    """RFC 5321 4.5.3.1.10: a 552 to RCPT is read as temporary; both forms
    say the server took no more recipients in this transaction."""
    rcpts = ["ok1@example.net", "crowd@example.net", "limit@example.net", "unknown@example.net"]
    result = deliver_to(policy_server, rcpts)
    assert statuses(result) == [
        ("ok1@example.net", "delivered", "end", 250, "2.0.0"),
        ("crowd@example.net", "deferred", "rcpt", 552, "5.5.3"),
        ("limit@example.net", "deferred", "rcpt", 452, "4.5.3"),
        ("unknown@example.net", "refused", "rcpt", 550, "5.1.1"),
    ]
    assert [r.too_many for r in result.recipients] == [False, True, True, False]


def rcpt_limit(limit: int, reply: bytes) -> Any:
    """A ``RCPT`` action for :class:`Fake`: ``250`` to the first ``limit``
    recipients, ``reply`` to the others."""
    count = 0

    async def action(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes):
        nonlocal count
        count += 1
        writer.write(b"250 2.1.5 Ok\r\n" if count <= limit else reply)

    return action


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(
    "limit, reply, too_many",
    [
        (2, b"452 too many recipients\r\n", True),  # Exim's recipients_max
        (2, b"452 4.5.3 Too many recipients\r\n", True),
        (2, b"452 4.2.2 Mailbox full\r\n", False),  # another fault, said so
        (0, b"452 too many recipients\r\n", False),  # none taken: maybe its disk
        (0, b"452 4.5.3 Too many recipients\r\n", True),
    ],
)
def test_a_bare_452_after_an_accepted_recipient_is_too_many(limit, reply, too_many, pipelining):
    """RFC 5321 4.5.3.1.10: ``452`` is the reply for too many recipients,
    and its enhanced code optional (Exim sends none): after the server took
    one, a bare 452 says the rest go in a new transaction. Before any, it
    may as well be a full disk (``452 Insufficient system storage``)."""
    ehlo = EHLO if pipelining else EHLO.replace(b"250-PIPELINING\r\n", b"")
    fake = Fake(ehlo=ehlo, replies={"RCPT": rcpt_limit(limit, reply)})
    rcpts = [f"k{i}@example.net" for i in range(4)]
    result = run(deliver_through(fake, rcpts, MESSAGE, settings()))
    code = int(reply[:3])
    assert [(r.status, r.code) for r in result.recipients] == [
        *[(Status.DELIVERED, 250)] * limit,
        *[(Status.DEFERRED, code)] * (4 - limit),
    ]
    assert [r.too_many for r in result.recipients] == [False] * limit + [too_many] * (4 - limit)


@pytest.mark.parametrize(
    "sender, status, stage, code",
    [
        ("blocked@example.org", "refused", "mail", 550),
        ("busy@example.org", "deferred", "mail", 451),
        ("reject-data@example.org", "refused", "end", 554),
        ("defer-data@example.org", "deferred", "end", 451),
    ],
)
def test_sender_and_message_refusals_apply_to_every_recipient(
    policy_server, sender, status, stage, code
):
    result = run(
        deliver(
            HOST,
            policy_server.port,
            sender=sender,
            recipients=["a@example.net", "unknown@example.net", "b@example.net"],
            message=MESSAGE,
            settings=settings(),
        )
    )
    got = statuses(result)
    if stage == "mail":
        assert {(s, st_, c) for _, s, st_, c, _ in got} == {(status, stage, code)}
    else:
        # The RCPT refusal stays; the end-of-data verdict applies to the rest.
        assert got[1][1:4] == ("refused", "rcpt", 550)
        assert {(s, st_, c) for _, s, st_, c, _ in (got[0], got[2])} == {(status, stage, code)}
    assert policy_server.plugin.messages == []


def test_a_connection_to_an_address_for_a_named_host_is_named_both_ways(policy_server):
    # As an MX delivery connects: to an address, on behalf of a host name.
    result = run(
        deliver(
            HOST,
            policy_server.port,
            sender="alice@example.org",
            recipients=["ok1@example.net"],
            message=MESSAGE,
            settings=settings(tls_name="mx.example.net"),
        )
    )
    assert result.server == f"mx.example.net[{HOST}]:{policy_server.port}"


@pytest.mark.parametrize(
    "args, label",
    [
        (("192.0.2.1", 25), "192.0.2.1:25"),
        (("2001:db8::1", 25), "[2001:db8::1]:25"),
        (("192.0.2.1", 25, None, "mx.example.net"), "mx.example.net[192.0.2.1]:25"),
        (("2001:db8::1", 25, None, "mx.example.net"), "mx.example.net[2001:db8::1]:25"),
        (("relay.example", 587, None, "relay.example"), "relay.example:587"),
        ((None, None, "/run/lmtp"), "unix:/run/lmtp"),
        # A recipient at an address literal: the address once, not twice.
        (("127.0.0.1", 25, None, "[127.0.0.1]"), "127.0.0.1:25"),
        (("2001:db8::1", 25, None, "[IPv6:2001:0DB8::1]"), "[2001:db8::1]:25"),
        (("192.0.2.1", 25, None, "[192.0.2.2]"), "[192.0.2.2][192.0.2.1]:25"),
    ],
)
def test_server_labels(args, label):
    assert server_label(*args) == label


def test_no_recipient_accepted_sends_no_data_and_the_connection_goes_on(policy_server):
    async def main() -> tuple[DeliveryResult, DeliveryResult]:
        async with await connect(HOST, policy_server.port, settings=settings()) as conn:
            first = await conn.send("a@example.org", ["unknown@example.net"], MESSAGE)
            assert conn.usable
            second = await conn.send("a@example.org", ["ok@example.net"], MESSAGE)
            return first, second

    first, second = run(main())
    assert statuses(first) == [("unknown@example.net", "refused", "rcpt", 550, "5.1.1")]
    assert second.recipients[0].delivered
    assert len(policy_server.plugin.messages) == 1


def test_connection_reuse_sends_two_messages_on_one_session(policy_server):
    async def main() -> list[DeliveryResult]:
        conn = await connect(HOST, policy_server.port, settings=settings())
        try:
            return [
                await conn.send("a@example.org", ["one@example.net"], b"Subject: 1\r\n\r\none\r\n"),
                await conn.send("a@example.org", ["two@example.net"], b"Subject: 2\r\n\r\ntwo\r\n"),
            ]
        finally:
            await conn.quit()
            assert not conn.usable

    results = run(main())
    assert [r.recipients[0].status for r in results] == [Status.DELIVERED] * 2
    messages = policy_server.plugin.messages
    assert [m.body for m in messages] == [
        b"Subject: 1\r\n\r\none\r\n",
        b"Subject: 2\r\n\r\ntwo\r\n",
    ]
    assert messages[0].session_id == messages[1].session_id
    assert len(policy_server.plugin.connected) == 1


# ======================================================== the stepwise API
def test_stepwise_transaction_against_a_real_server(policy_server):
    async def main() -> list[Any]:
        conn = await connect(HOST, policy_server.port, settings=settings())
        try:
            with pytest.raises(RuntimeError):
                await conn.rcpt("bob@example.net")  # no MAIL yet
            got = [await conn.mail("alice@example.org", size=len(MESSAGE))]
            for rcpt in ("unknown@example.net", "later@example.net", "bob@example.net"):
                got.append(await conn.rcpt(rcpt))
            got.append(await conn.data(MESSAGE))
            # The next transaction: RSET first (the server sees it), then MAIL.
            got.append(await conn.mail("blocked@example.org"))
            got.append(await conn.mail("alice@example.org"))
            got.append(await conn.rcpt(Recipient("carol@example.net")))
            got.append(await conn.rset())
            with pytest.raises(RuntimeError):
                await conn.data(MESSAGE)  # the transaction is over
            assert conn.usable and conn.transactions == 3
            return got
        finally:
            await conn.quit()

    got = run(main())
    (end,) = got.pop(4)
    assert (end.code, end.enhanced_code, end.remote) == (250, "2.0.0", True)
    assert end.text.startswith("Ok: queued as ")
    assert [str(r) for r in got] == [
        "250 2.1.0 Ok",
        "550 5.1.1 No such user here",
        "450 4.2.0 Greylisted, try later",
        "250 2.1.5 Ok",
        "550 5.7.1 Sender blocked",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "250 2.0.0 Ok",
    ]
    (message,) = policy_server.plugin.messages
    assert (message.mail_from, message.rcpt_tos, message.body) == (
        "alice@example.org",
        ["bob@example.net"],
        MESSAGE,
    )
    assert policy_server.plugin.params[0] == {"SIZE": str(len(MESSAGE))}
    assert policy_server.plugin.senders == [
        "alice@example.org",
        "blocked@example.org",
        "alice@example.org",
    ]
    assert len(policy_server.plugin.connected) == 1


def test_stepwise_data_replies_smtp_and_lmtp(start_server, policy_server):
    lmtp = start_server(plugin=Policy(), listener=ListenerSettings(protocol="lmtp"))

    async def main() -> tuple[list[Reply], list[Reply]]:
        async with await connect(HOST, policy_server.port, settings=settings()) as conn:
            assert (await conn.mail("reject-data@example.org")).code == 250
            assert (await conn.rcpt("bob@example.net")).code == 250
            refused = await conn.data(MESSAGE)
        async with await connect(HOST, lmtp.port, protocol="lmtp", settings=settings()) as conn:
            assert (await conn.mail("alice@example.org")).code == 250
            for rcpt in ("ok@example.net", "unknown@example.net", "full@example.net"):
                await conn.rcpt(rcpt)
            each = await conn.data(MESSAGE)
        return refused, each

    refused, each = run(main())
    assert [str(r) for r in refused] == ["554 5.7.0 Content refused"]
    # LMTP: one reply per accepted recipient, in order.
    assert [(r.code, r.enhanced_code) for r in each] == [(250, "2.0.0"), (452, "4.2.2")]
    assert each[1].text == "Mailbox full"


def test_stepwise_local_refusals_send_nothing():
    ehlo = b"250-fake.test\r\n250 SIZE 100\r\n"  # no SMTPUTF8, no 8BITMIME
    fake = Fake(ehlo=ehlo)

    async def main() -> list[Reply]:
        async with serve(fake) as port:
            async with await connect(HOST, port, settings=settings()) as conn:
                got = [
                    await conn.mail("j\u00f6rg@example.org"),
                    await conn.mail("a@example.org", size=101),
                    await conn.mail("a@example.org", eightbit=True),
                    await conn.mail("a@example.org", size=100),
                    await conn.rcpt("b\u00fc@example.net"),
                    await conn.rcpt("b@example.net"),
                ]
                return got

    got = run(main())
    assert [(r.code, r.enhanced_code, r.remote) for r in got] == [
        (553, "5.6.7", False),
        (552, "5.3.4", False),
        (554, "5.6.3", False),
        (250, "2.0.0", True),
        (553, "5.6.7", False),
        (250, "2.0.0", True),
    ]
    assert [c for c in fake.commands if c.startswith(("MAIL", "RCPT"))] == [
        "MAIL FROM:<a@example.org> SIZE=100",
        "RCPT TO:<b@example.net>",
    ]


def test_stepwise_a_lost_connection_is_a_reply_then_an_error():
    fake = Fake(replies={"RCPT": b"421 4.3.2 Shutting down\r\n"})

    async def main() -> None:
        async with serve(fake) as port:
            conn = await connect(HOST, port, settings=settings())
            assert (await conn.mail("a@x.test")).code == 250
            reply = await conn.rcpt("b@y.test")
            assert (reply.code, reply.enhanced_code, reply.remote) == (421, "4.3.2", True)
            assert not conn.usable
            reset = await conn.rset()
            assert (reset.code, reset.remote) == (451, False)
            with pytest.raises(ClientError):
                await conn.mail("a@x.test")
            await conn.quit()

    run(main())


def test_a_closed_connection_raises_before_sending(policy_server):
    async def main() -> None:
        conn = await connect(HOST, policy_server.port, settings=settings())
        await conn.quit()
        with pytest.raises(ClientError) as info:
            await conn.send("a@example.org", ["b@example.net"], MESSAGE)
        assert info.value.stage is Stage.MAIL
        assert not info.value.reply.remote

    run(main())


def test_refused_connection_defers_everyone_at_connect():
    with socket_port() as port:
        result = run(
            deliver(
                HOST,
                port,
                sender="a@x.test",
                recipients=["b@y.test", "c@y.test"],
                message=MESSAGE,
                settings=settings(),
            )
        )
    assert statuses(result) == [
        ("b@y.test", "deferred", "connect", 451, "4.4.1"),
        ("c@y.test", "deferred", "connect", 451, "4.4.1"),
    ]
    assert "refused" in result.recipients[0].text
    assert not result.recipients[0].reply.remote


def test_a_socket_path_too_long_says_so_at_connect(tmp_path):
    """Python refuses it with an OSError that has no errno: its message is
    the reason given, not "OSError"."""
    path = str(tmp_path / ("a" * 120 + ".sock"))
    result = run(
        deliver(
            path=path,
            protocol="lmtp",
            sender="a@x.test",
            recipients=["b@y.test"],
            message=MESSAGE,
            settings=settings(),
        )
    )
    assert statuses(result) == [("b@y.test", "deferred", "connect", 451, "4.4.1")]
    assert result.recipients[0].text.endswith(" failed: AF_UNIX path too long")


def test_a_server_that_greets_with_our_own_name_is_a_loop(start_server):
    server = start_server(hostname="mx.example.org")

    async def main() -> ClientError:
        with pytest.raises(ClientError) as info:
            await connect(HOST, server.port, settings=settings(own_names=("MX.example.org.",)))
        # Another name: an ordinary connection.
        conn = await connect(HOST, server.port, settings=settings(own_names=("other.example",)))
        await conn.quit()
        return info.value

    error = run(main())
    reply = error.reply
    assert (reply.code, reply.enhanced_code, reply.remote) == (451, "4.4.6", False)
    assert "loops back" in reply.text and not error.permanent
    with pytest.raises(ValueError, match="own_names"):
        ClientSettings(own_names=["a list"])  # type: ignore[arg-type]


class socket_port:
    """A port on 127.0.0.1 that nothing listens on."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind((HOST, 0))  # bound, never listening: connections are refused
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_source_address_binding(policy_server):
    result = run(
        deliver(
            HOST,
            policy_server.port,
            sender="a@example.org",
            recipients=["b@example.net"],
            message=MESSAGE,
            settings=settings(source_address="127.0.0.2"),
        )
    )
    assert result.recipients[0].delivered
    assert policy_server.plugin.remote_ips == ["127.0.0.2"]


# ============================================================ message sources
def test_a_large_spooled_message_is_streamed_in_chunks(policy_server, tmp_path):
    # 5 MB with lines that start with dots: read in chunks, stuffed on the way.
    line = b".leading dot and some text to fill the line up to a fair length....\r\n"
    body = b"Subject: big\r\n\r\n" + line * (5_000_000 // len(line))
    path = tmp_path / "spooled.eml"
    path.write_bytes(body)
    with open(path, "rb", buffering=0) as raw:
        source = RecordingFile(raw)
        result = run(
            deliver(
                HOST,
                policy_server.port,
                sender="a@example.org",
                recipients=["b@example.net"],
                message=source,
                settings=settings(chunk_size=65536),
                eightbit=False,
            )
        )
        assert source.largest_read <= 65536
        assert source.tell() == 0  # left where it was found
    assert result.recipients[0].delivered
    (got,) = policy_server.plugin.messages
    assert got.size == len(body)
    assert got.digest == hashlib.sha256(body).hexdigest()
    assert got.spooled


def test_an_envelope_is_a_message_source(policy_server):
    envelope = Envelope("a@example.org", spool_threshold=16)
    envelope.write(b"Subject: spooled\r\n\r\n" + b"x" * 100 + b"\r\n")
    envelope.add_header("Received", "from somewhere")
    assert envelope.spooled
    result = run(
        deliver(
            HOST,
            policy_server.port,
            sender="a@example.org",
            recipients=["b@example.net"],
            message=envelope,
            settings=settings(),
        )
    )
    assert result.recipients[0].delivered
    (got,) = policy_server.plugin.messages
    assert got.body == envelope.content
    envelope.close()


def test_bare_newlines_are_sent_as_crlf(policy_server):
    run(
        deliver(
            HOST,
            policy_server.port,
            sender="a@example.org",
            recipients=["b@example.net"],
            message=b"Subject: lf\n\n.one\rtwo\nthree",
            settings=settings(),
        )
    )
    (got,) = policy_server.plugin.messages
    assert got.body == b"Subject: lf\r\n\r\n.one\r\ntwo\r\nthree\r\n"


# ===================================================== SMTPUTF8, 8BITMIME, SIZE
def test_smtputf8_and_8bitmime_are_declared_when_needed(policy_server):
    body = "Subject: café\r\n\r\nnaïve\r\n".encode()
    result = run(
        deliver(
            HOST,
            policy_server.port,
            sender="a@example.org",
            recipients=["josé@exämple.net"],
            message=body,
            settings=settings(),
        )
    )
    assert result.recipients[0].delivered
    assert policy_server.plugin.params == [
        {"SIZE": str(len(body)), "BODY": "8BITMIME", "SMTPUTF8": None}
    ]
    (got,) = policy_server.plugin.messages
    assert got.rcpt_tos == ["josé@exämple.net"]
    assert got.body == body


def test_without_smtputf8_only_the_utf8_recipients_are_refused(start_server):
    server = start_server(plugin=Policy(), smtputf8=False)
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@example.org",
            recipients=["josé@example.net", "jose@example.net"],
            message=MESSAGE,
            settings=settings(),
        )
    )
    assert statuses(result) == [
        ("josé@example.net", "refused", "rcpt", 553, "5.6.7"),
        ("jose@example.net", "delivered", "end", 250, "2.0.0"),
    ]
    assert result.recipients[0].text == "the server does not support SMTPUTF8"
    assert not result.recipients[0].reply.remote
    assert server.plugin.messages[0].rcpt_tos == ["jose@example.net"]

    # A UTF-8 sender, or a message that came with SMTPUTF8: nobody.
    for sender, flag in (("josé@example.org", None), ("a@example.org", True)):
        result = run(
            deliver(
                HOST,
                server.port,
                sender=sender,
                recipients=["jose@example.net"],
                message=MESSAGE,
                settings=settings(),
                smtputf8=flag,
            )
        )
        assert statuses(result) == [("jose@example.net", "refused", "mail", 553, "5.6.7")]
    assert len(server.plugin.messages) == 1


class No8BitMIME(Policy):
    def bonzo_ehlo_keywords(self, keywords: list[str]) -> None:
        keywords.remove("8BITMIME")


def test_8bit_content_is_refused_without_8bitmime(start_server):
    server = start_server(plugin=No8BitMIME())
    body = "Subject: x\r\n\r\nnaïve\r\n".encode()
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@example.org",
            recipients=["b@example.net", "c@example.net"],
            message=body,
            settings=settings(),
        )
    )
    assert statuses(result) == [
        ("b@example.net", "refused", "mail", 554, "5.6.3"),
        ("c@example.net", "refused", "mail", 554, "5.6.3"),
    ]
    assert server.plugin.senders == []  # never sent MAIL
    # 7-bit content goes through, without BODY=.
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@example.org",
            recipients=["b@example.net"],
            message=MESSAGE,
            settings=settings(),
        )
    )
    assert result.recipients[0].delivered
    assert "BODY" not in server.plugin.params[0]


def test_a_message_over_the_servers_size_is_refused_without_sending(start_server):
    server = start_server(plugin=Policy(), max_message_size=1000)
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@example.org",
            recipients=["b@example.net"],
            message=b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n",
            settings=settings(),
        )
    )
    (r,) = result.recipients
    assert (r.status, r.stage, r.code, r.enhanced_code) == (
        Status.REFUSED,
        Stage.MAIL,
        552,
        "5.3.4",
    )
    assert "exceeds the server's limit 1000" in r.text
    assert server.plugin.senders == []


# ============================================================== TLS and AUTH
def test_opportunistic_tls_is_used_when_offered(start_server, server_ctx):
    server = start_server(plugin=Policy(), listener=ListenerSettings(tls_context=server_ctx))

    async def main() -> None:
        async with await connect(HOST, server.port, settings=settings()) as conn:
            assert conn.tls and not conn.tls_verified
            assert "STARTTLS" not in conn.extensions  # asked again after TLS
            result = await conn.send("a@example.org", ["b@example.net"], MESSAGE)
            assert result.recipients[0].delivered

    run(main())
    assert server.plugin.tls[0]["version"] in ("TLSv1.2", "TLSv1.3")
    assert server.plugin.messages[0].helo == "client.test"


def test_opportunistic_tls_goes_plain_without_starttls(policy_server):
    async def main() -> None:
        async with await connect(HOST, policy_server.port, settings=settings()) as conn:
            assert not conn.tls
            assert (await conn.send("a@x.test", ["b@y.test"], MESSAGE)).recipients[0].delivered

    run(main())
    assert policy_server.plugin.tls == [None]


def test_require_tls_defers_when_the_server_offers_no_starttls(policy_server):
    result = run(
        deliver(
            HOST,
            policy_server.port,
            sender="a@x.test",
            recipients=["b@y.test"],
            message=MESSAGE,
            settings=settings(tls_policy="require"),
        )
    )
    (r,) = result.recipients
    assert (r.status, r.stage, r.code, r.enhanced_code) == (
        Status.DEFERRED,
        Stage.STARTTLS,
        451,
        "4.7.4",
    )
    assert policy_server.plugin.senders == []


def test_verify_accepts_a_good_certificate_and_defers_a_wrong_name(start_server, server_ctx, trust):
    server = start_server(plugin=Policy(), listener=ListenerSettings(tls_context=server_ctx))

    async def good() -> None:
        s = settings(tls_policy="verify", tls_context=trust, tls_name="mx.bonzo.test")
        async with await connect(HOST, server.port, settings=s) as conn:
            assert conn.tls and conn.tls_verified
            assert (await conn.send("a@x.test", ["b@y.test"], MESSAGE)).recipients[0].delivered

    run(good())
    for extra in ({"tls_context": trust, "tls_name": "wrong.test"}, {"tls_name": "mx.bonzo.test"}):
        # A name the certificate does not carry; the system trust store,
        # which does not know the test CA.
        result = run(
            deliver(
                HOST,
                server.port,
                sender="a@x.test",
                recipients=["b@y.test"],
                message=MESSAGE,
                settings=settings(tls_policy="verify", **extra),
            )
        )
        (r,) = result.recipients
        assert (r.status, r.stage, r.enhanced_code) == (Status.DEFERRED, Stage.STARTTLS, "4.7.5")
        assert "certificate" in r.text.lower()
    assert len(server.plugin.messages) == 1


def test_implicit_tls(start_server, server_ctx, trust):
    listener = ListenerSettings(tls_context=server_ctx, implicit_tls=True)
    server = start_server(plugin=Policy(), listener=listener)
    s = settings(implicit_tls=True, tls_policy="verify", tls_context=trust, tls_name="localhost")
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@x.test",
            recipients=["b@y.test"],
            message=MESSAGE,
            settings=s,
        )
    )
    assert result.recipients[0].delivered
    assert server.plugin.tls[0] is not None
    # Without trust in the CA: the handshake fails at connect.
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@x.test",
            recipients=["b@y.test"],
            message=MESSAGE,
            settings=s.replace(tls_context=None),
        )
    )
    assert statuses(result) == [("b@y.test", "deferred", "connect", 451, "4.7.5")]


@pytest.mark.parametrize("mechanisms", [("PLAIN", "LOGIN"), ("LOGIN",)])
def test_auth_success(start_server, server_ctx, mechanisms):
    listener = ListenerSettings(tls_context=server_ctx, auth_mechanisms=mechanisms)
    server = start_server(plugin=Policy(), listener=listener, auth_failure_delay=0)

    async def main() -> None:
        s = settings(tls_policy="require", username=USER, password=PASSWORD)
        async with await connect(HOST, server.port, settings=s) as conn:
            assert conn.authenticated
            assert (await conn.send("a@x.test", ["b@y.test"], MESSAGE)).recipients[0].delivered

    run(main())
    assert server.plugin.auth == [USER]


def test_auth_failure_is_a_connection_error(start_server, server_ctx):
    listener = ListenerSettings(tls_context=server_ctx)
    server = start_server(plugin=Policy(), listener=listener, auth_failure_delay=0)

    async def main() -> None:
        with pytest.raises(ClientError) as info:
            await connect(HOST, server.port, settings=settings(username=USER, password="wrong"))
        assert info.value.stage is Stage.AUTH
        assert (info.value.reply.code, info.value.reply.enhanced_code) == (535, "5.7.8")
        assert info.value.permanent

    run(main())
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@x.test",
            recipients=["b@y.test"],
            message=MESSAGE,
            settings=settings(username=USER, password="wrong"),
        )
    )
    # A 5xx at AUTH defers (like Postfix): the relay's problem, not the message's.
    assert statuses(result) == [("b@y.test", "deferred", "auth", 535, "5.7.8")]
    assert server.plugin.senders == []


def test_credentials_are_never_sent_without_tls(start_server, server_ctx):
    # The server offers AUTH in plaintext; the client will not use it.
    listener = ListenerSettings(tls_context=server_ctx, auth_plaintext=True)
    plugin = Policy()
    server = start_server(plugin=plugin, listener=listener, auth_failure_delay=0)
    s = settings(tls_policy="none", username=USER, password=PASSWORD)
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@x.test",
            recipients=["b@y.test"],
            message=MESSAGE,
            settings=s,
        )
    )
    assert statuses(result) == [("b@y.test", "deferred", "auth", 451, "4.7.0")]
    # Unless told to.
    result = run(
        deliver(
            HOST,
            server.port,
            sender="a@x.test",
            recipients=["b@y.test"],
            message=MESSAGE,
            settings=s.replace(auth_plaintext=True),
        )
    )
    assert result.recipients[0].delivered
    assert plugin.auth == [USER]


# ===================================================================== LMTP
def test_lmtp_gives_one_result_per_recipient(start_server):
    server = start_server(plugin=Policy(), listener=ListenerSettings(protocol="lmtp"))
    rcpts = ["ok@example.net", "full@example.net", "unknown@example.net", "gone@example.net"]

    async def main() -> DeliveryResult:
        async with await connect(HOST, server.port, protocol="lmtp", settings=settings()) as conn:
            assert conn.protocol == "LMTP"
            assert "PIPELINING" in conn.extensions
            first = await conn.send("a@example.org", rcpts, MESSAGE)
            second = await conn.send("a@example.org", ["again@example.net"], MESSAGE)
            assert second.recipients[0].delivered
            return first

    result = run(main())
    assert statuses(result) == [
        ("ok@example.net", "delivered", "end", 250, "2.0.0"),
        ("full@example.net", "deferred", "end", 452, "4.2.2"),
        ("unknown@example.net", "refused", "rcpt", 550, "5.1.1"),
        ("gone@example.net", "refused", "end", 550, "5.1.1"),
    ]
    assert result.recipients[1].text == "Mailbox full"
    assert [m.body for m in server.plugin.messages] == [MESSAGE, MESSAGE]


def test_lmtp_refuses_tls_and_auth_settings():
    for bad in (settings(tls_policy="require"), settings(username="u", password="p")):
        with pytest.raises(ValueError):
            run(connect(HOST, 24, protocol="lmtp", settings=bad))


# ========================================================= scripted servers
def test_helo_fallback_when_ehlo_is_refused():
    fake = Fake(replies={"EHLO": b"502 5.5.1 EHLO not implemented\r\n"})

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            return await deliver(
                HOST,
                port,
                sender="a@x.test",
                recipients=["b@y.test"],
                message=MESSAGE,
                settings=settings(),
            )

    result = run(main())
    assert result.recipients[0].delivered
    assert fake.commands[:3] == ["EHLO client.test", "HELO client.test", "MAIL FROM:<a@x.test>"]
    assert unstuff(fake.messages[0]) == MESSAGE


def test_dsn_parameters_are_passed_when_offered():
    fake = Fake(ehlo=EHLO.replace(b"250 SIZE", b"250-DSN\r\n250 SIZE"))
    rcpts = [
        Recipient("b@y.test", notify="SUCCESS,FAILURE", orcpt="rfc822;B@y.test"),
        Recipient.from_params("c@y.test", {"NOTIFY": "NEVER"}),
        # Accepted from a client with a keyword twice: passed on with it once.
        Recipient.from_params("d@y.test", {"NOTIFY": "failure,FAILURE,Delay"}),
        # xtext's hex in the upper case RFC 3461 requires, the same value.
        Recipient("e@y.test", orcpt="rfc822;e+2be@y.test"),
    ]

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            return await deliver(
                HOST,
                port,
                sender="a@x.test",
                recipients=rcpts,
                message=MESSAGE,
                settings=settings(),
                ret="hdrs",
                envid="QQ+2b314159",
            )

    result = run(main())
    assert result.dsn
    assert fake.commands[1:6] == [
        f"MAIL FROM:<a@x.test> SIZE={len(MESSAGE)} RET=HDRS ENVID=QQ+2B314159",
        "RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B@y.test",
        "RCPT TO:<c@y.test> NOTIFY=NEVER",
        "RCPT TO:<d@y.test> NOTIFY=FAILURE,DELAY",
        "RCPT TO:<e@y.test> ORCPT=rfc822;e+2Be@y.test",
    ]


@pytest.mark.parametrize("offers_utf8", [True, False])
def test_a_raw_utf8_orcpt_is_escaped_without_smtputf8(offers_utf8):
    """RFC 6533's raw UTF-8 ORCPT goes as it is with SMTPUTF8, as its
    ``\\x{...}`` form in a transaction without (an ASCII recipient here)."""
    extensions = b"250-DSN\r\n250-SMTPUTF8\r\n" if offers_utf8 else b"250-DSN\r\n"
    fake = Fake(ehlo=EHLO.replace(b"250 SIZE", extensions + b"250 SIZE"))
    orcpt = "utf-8;j\u00f6rg\u20ac@y.test"

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            return await deliver(
                HOST,
                port,
                sender="a@x.test",
                recipients=[Recipient("b@y.test", orcpt=orcpt)],
                message=MESSAGE,
                settings=settings(),
                smtputf8=offers_utf8,
            )

    assert len(run(main()).delivered) == 1
    [rcpt] = [c for c in fake.commands if c.startswith("RCPT")]
    if offers_utf8:
        assert rcpt == f"RCPT TO:<b@y.test> ORCPT={orcpt}"
    else:
        assert rcpt == "RCPT TO:<b@y.test> ORCPT=utf-8;j\\x{F6}rg\\x{20AC}@y.test"


def test_an_orcpt_its_escapes_make_too_long_is_left_out():
    """86 UTF-8 characters become 576 as ``\\x{...}`` escapes, past RFC 3461's
    500: the ORCPT is left out, the recipient is not refused for it."""
    fake = Fake(ehlo=EHLO.replace(b"250 SIZE", b"250-DSN\r\n250 SIZE"))
    orcpt = "utf-8;" + "\u00f6" * 86 + "@y.test"

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            return await deliver(
                HOST,
                port,
                sender="a@x.test",
                recipients=[Recipient("b@y.test", notify="FAILURE", orcpt=orcpt)],
                message=MESSAGE,
                settings=settings(),
            )

    assert len(run(main()).delivered) == 1
    [rcpt] = [c for c in fake.commands if c.startswith("RCPT")]
    assert rcpt == "RCPT TO:<b@y.test> NOTIFY=FAILURE"


def test_dsn_parameters_are_dropped_when_not_offered():
    fake = Fake()

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            return await deliver(
                HOST,
                port,
                sender="",
                recipients=[Recipient("b@y.test", notify="NEVER")],
                message=MESSAGE,
                settings=settings(),
                ret="FULL",
            )

    result = run(main())
    assert not result.dsn
    assert fake.commands[1:3] == [f"MAIL FROM:<> SIZE={len(MESSAGE)}", "RCPT TO:<b@y.test>"]


async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes) -> None:
    writer.transport.abort()


def test_a_server_that_drops_the_connection_mid_data_defers_everyone():
    async def drop_mid_data(reader: Any, writer: Any, line: bytes) -> None:
        writer.write(b"354 go ahead\r\n")
        await reader.readexactly(100_000)
        writer.transport.abort()

    fake = Fake(replies={"DATA": drop_mid_data})

    async def main() -> tuple[DeliveryResult, bool]:
        async with serve(fake) as port:
            conn = await connect(HOST, port, settings=settings())
            result = await conn.send(
                "a@x.test",
                ["b@y.test", "c@y.test"],
                b"Subject: big\r\n\r\n" + b"x" * 5_000_000 + b"\r\n",
            )
            usable = conn.usable
            with pytest.raises(ClientError):
                await conn.send("a@x.test", ["b@y.test"], MESSAGE)
            return result, usable

    result, usable = run(main())
    assert not usable
    assert {(r.status, r.code, r.enhanced_code) for r in result.recipients} == {
        (Status.DEFERRED, 451, "4.4.2")
    }
    assert {r.stage for r in result.recipients} <= {Stage.DATA, Stage.END}


def test_421_at_rcpt_defers_that_recipient_and_the_rest():
    replies: list[bytes] = [b"250 2.1.5 Ok\r\n", b"421 4.3.2 Shutting down\r\n"]

    async def rcpt(reader: Any, writer: Any, line: bytes) -> None:
        if replies:
            writer.write(replies.pop(0))
        if not replies:
            writer.close()  # a server that said 421 reads no more

    fake = Fake(replies={"RCPT": rcpt})

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            return await deliver(
                HOST,
                port,
                sender="a@x.test",
                recipients=["b@y.test", "c@y.test", "d@y.test"],
                message=MESSAGE,
                settings=settings(),
            )

    result = run(main())
    assert statuses(result) == [
        ("b@y.test", "deferred", "rcpt", 421, "4.3.2"),
        ("c@y.test", "deferred", "rcpt", 421, "4.3.2"),
        ("d@y.test", "deferred", "rcpt", 421, "4.3.2"),
    ]
    assert result.recipients[1].reply.remote
    assert "DATA" not in fake.commands


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_a_server_that_never_greets_times_out(protocol):
    fake = Fake(greeting=None)

    async def main() -> None:
        async with serve(fake) as port:
            with pytest.raises(ClientError) as info:
                await connect(
                    HOST, port, protocol=protocol, settings=settings(greeting_timeout=0.3)
                )
            assert info.value.stage is Stage.GREETING
            assert (info.value.reply.code, info.value.reply.enhanced_code) == (451, "4.4.2")
            assert "timed out" in info.value.reply.text

    run(main())


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_a_server_that_never_answers_the_final_dot_defers(protocol):
    async def stall(reader: Any, writer: Any, line: bytes) -> None:
        writer.write(b"354 go ahead\r\n")
        await read_message(reader)
        await reader.read()  # no reply; wait for the client to give up

    fake = Fake(replies={"DATA": stall})

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            return await deliver(
                HOST,
                port,
                sender="a@x.test",
                recipients=["b@y.test"],
                message=MESSAGE,
                protocol=protocol,
                settings=settings(data_end_timeout=0.3),
            )

    assert statuses(run(main())) == [("b@y.test", "deferred", "end", 451, "4.4.2")]


def test_a_greeting_of_554_is_a_connection_error():
    fake = Fake(greeting=b"554 5.7.1 No SMTP service for you\r\n")

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            return await deliver(
                HOST,
                port,
                sender="a@x.test",
                recipients=["b@y.test"],
                message=MESSAGE,
                settings=settings(),
            )

    result = run(main())
    assert statuses(result) == [("b@y.test", "deferred", "greeting", 554, "5.7.1")]
    assert result.recipients[0].text == "No SMTP service for you"


def test_starttls_refused_under_opportunistic_goes_on_in_plaintext():
    fake = Fake(
        ehlo=EHLO.replace(b"250 SIZE", b"250-STARTTLS\r\n250 SIZE"),
        replies={"STARTTLS": b"454 4.7.0 TLS not available now\r\n"},
    )

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            return await deliver(
                HOST,
                port,
                sender="a@x.test",
                recipients=["b@y.test"],
                message=MESSAGE,
                settings=settings(),
            )

    assert run(main()).recipients[0].delivered
    assert fake.connections == 1
    assert fake.commands[:3] == [
        "EHLO client.test",
        "STARTTLS",
        f"MAIL FROM:<a@x.test> SIZE={len(MESSAGE)}",
    ]


def test_a_failed_handshake_under_opportunistic_retries_without_tls():
    async def bad_tls(reader: Any, writer: Any, line: bytes) -> None:
        writer.write(b"220 2.0.0 Go ahead\r\n")
        await writer.drain()
        await reader.read(1)  # the ClientHello arrives...
        writer.write(b"this is not TLS\r\n" * 10)  # ...and gets garbage
        await writer.drain()
        writer.transport.abort()

    fake = Fake(
        ehlo=EHLO.replace(b"250 SIZE", b"250-STARTTLS\r\n250 SIZE"), replies={"STARTTLS": bad_tls}
    )

    async def main() -> tuple[DeliveryResult, DeliveryResult]:
        async with serve(fake) as port:
            opportunistic = await deliver(
                HOST,
                port,
                sender="a@x.test",
                recipients=["b@y.test"],
                message=MESSAGE,
                settings=settings(),
            )
            required = await deliver(
                HOST,
                port,
                sender="a@x.test",
                recipients=["b@y.test"],
                message=MESSAGE,
                settings=settings(tls_policy="require"),
            )
            return opportunistic, required

    opportunistic, required = run(main())
    assert opportunistic.recipients[0].delivered
    assert statuses(required) == [("b@y.test", "deferred", "starttls", 451, "4.7.5")]
    assert fake.connections == 3  # the failed one, the plaintext retry, the required one
    assert len(fake.messages) == 1


# ============================================== hostile replies: bounded reads
async def endless(reader: Any, writer: Any, line: bytes) -> None:
    for _ in range(100_000):
        writer.write(b"250-more and more and more\r\n")
        await writer.drain()


async def huge_line(reader: Any, writer: Any, line: bytes) -> None:
    writer.write(b"250 " + b"x" * 1_000_000 + b"\r\n")
    await writer.drain()


HOSTILE = [
    (endless, "protocol error"),
    (huge_line, "protocol error"),
    (b"hello there\r\n", "protocol error"),
    (b"999 what\r\n", "protocol error"),
    (b"354 not now\r\n", "unexpected reply 354"),
]


@pytest.mark.parametrize(
    "protocol, reply, why",
    [("smtp", *case) for case in HOSTILE]
    + [("lmtp", *case) for case in HOSTILE]
    # aiosmtplib takes the last line's code; the LMTP reader insists they agree.
    + [("lmtp", b"250-one\r\n550 two\r\n", "reply codes differ")],
)
def test_hostile_replies_at_rcpt_defer_and_close(protocol, reply, why):
    fake = Fake(replies={"RCPT": reply})

    async def main() -> tuple[DeliveryResult, bool]:
        async with serve(fake) as port:
            conn = await connect(HOST, port, protocol=protocol, settings=settings())
            result = await conn.send("a@x.test", ["b@y.test", "c@y.test"], MESSAGE)
            return result, conn.usable

    result, usable = run(main())
    assert not usable
    assert statuses(result) == [
        ("b@y.test", "deferred", "rcpt", 451, "4.5.0"),
        ("c@y.test", "deferred", "rcpt", 451, "4.5.0"),
    ]
    assert why in result.recipients[0].text
    assert fake.messages == []


def test_a_reply_with_too_many_lines_is_refused():
    fake = Fake(ehlo=b"".join(b"250-X%d\r\n" % i for i in range(50)) + b"250 SIZE\r\n")

    async def main() -> None:
        async with serve(fake) as port:
            for protocol in ("smtp", "lmtp"):
                with pytest.raises(ClientError) as info:
                    await connect(
                        HOST, port, protocol=protocol, settings=settings(max_reply_lines=20)
                    )
                assert info.value.stage is Stage.EHLO
                assert "lines" in info.value.reply.text

    run(main())


def test_reply_text_is_made_safe():
    fake = Fake(replies={"RCPT": b"550 5.1.1 bad\x1b[31m user\x00 \r\n"})

    async def main() -> DeliveryResult:
        async with serve(fake) as port:
            return await deliver(
                HOST,
                port,
                protocol="lmtp",
                sender="a@x.test",
                recipients=["b@y.test"],
                message=MESSAGE,
                settings=settings(),
            )

    (r,) = run(main()).recipients
    assert r.text == "bad?[31m user?"
    assert str(r.reply) == "550 5.1.1 bad?[31m user?"


# ================================================================ the encoder
def normalized(content: bytes) -> bytes:
    """``content`` with CRLF line ends only, ending with CRLF unless empty."""
    text = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def reference(content: bytes) -> bytes:
    """What DATA must carry for ``content``, computed the simple way."""
    lines = normalized(content).split(b"\r\n")
    return b"\r\n".join(b"." + line if line[:1] == b"." else line for line in lines) + b".\r\n"


@given(
    st.lists(
        st.binary(max_size=40) | st.sampled_from([b".", b"\r", b"\n", b"\r\n.", b"\r\n"]),
        max_size=30,
    )
)
def test_dot_stuffing_is_the_same_for_any_chunking(chunks):
    stuffer = DotStuffer()
    out = b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()
    content = b"".join(chunks)
    assert out == reference(content)
    # Nothing ends the data early, and unstuffing gives the CRLF content back.
    assert out.count(b"\r\n.\r\n") + out.startswith(b".\r\n") == 1
    assert unstuff(out) == normalized(content)


def test_dot_stuffing_examples():
    stuffer = DotStuffer()
    assert stuffer.feed(b".a\r\n.") + stuffer.feed(b"b\r") + stuffer.feed(b"\n") == (
        b"..a\r\n..b\r\n"
    )
    assert stuffer.finish() == b".\r\n"
    assert DotStuffer().finish() == b".\r\n"
    stuffer = DotStuffer()
    assert stuffer.feed(b"x\r") + stuffer.finish() == b"x\r\n.\r\n"


# ================================================================= settings
@pytest.mark.parametrize(
    "changes",
    [
        {"tls_policy": "sometimes"},
        {"helo_name": "two words"},
        {"helo_name": ""},
        {"username": "u"},
        {"rcpt_timeout": 0},
        {"data_end_timeout": float("nan")},
        {"max_reply_line": 100},
        {"max_reply_lines": 0},
        {"tls_context": ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)},  # checks nothing
    ],
)
def test_bad_settings_are_refused(changes):
    with pytest.raises(ValueError):
        ClientSettings(**changes)


def test_settings_keep_the_password_out_of_repr():
    s = ClientSettings(username="u", password="hunter2")
    assert "hunter2" not in repr(s)
    assert s.replace(rcpt_timeout=1).password == "hunter2"


@pytest.mark.parametrize(
    "sender, recipient, kwargs",
    [
        ("a@x.test\r\nRCPT TO:<evil@x>", "b@y.test", {}),
        ("a@x.test", "b@y.test>", {}),
        ("a@x.test", "", {}),
        ("a@x.test", Recipient("b@y.test", notify="SOMETIMES"), {}),
        ("a@x.test", Recipient("b@y.test", orcpt="rfc822;a b"), {}),
        ("a@x.test", "b@y.test", {"ret": "ALL"}),
        ("a@x.test", "b@y.test", {"envid": "a\x00b"}),
    ],
)
def test_malformed_envelopes_are_refused_before_anything_is_sent(sender, recipient, kwargs):
    fake = Fake()

    async def main() -> None:
        async with serve(fake) as port:
            conn = await connect(HOST, port, settings=settings())
            with pytest.raises(ValueError):
                await conn.send(sender, [recipient], MESSAGE, **kwargs)
            assert conn.usable
            await conn.quit()

    run(main())
    assert fake.commands == ["EHLO client.test", "QUIT"]


def test_reply_str():
    assert str(Reply(250, "2.0.0", "Ok\nqueued")) == "250 2.0.0 Ok; queued"
    assert str(Reply(421)) == "421"


def test_message_type_errors():
    async def main() -> None:
        fake = Fake()
        async with serve(fake) as port:
            conn = await connect(HOST, port, settings=settings())
            with pytest.raises(TypeError):
                await conn.send("a@x.test", ["b@y.test"], 42)  # type: ignore[arg-type]
            result = await conn.send("a@x.test", ["b@y.test"], io.BytesIO(b"x"))
            assert result.recipients[0].delivered
            await conn.quit()

    run(main())


def test_a_server_that_stops_reading_mid_data_times_out():
    stalled = asyncio.Event()

    async def stop_reading(reader: Any, writer: Any, line: bytes) -> None:
        writer.write(b"354 go ahead\r\n")
        await writer.drain()
        stalled.set()
        await asyncio.sleep(3)  # read nothing: the client's writes back up
        await reader.read()

    fake = Fake(replies={"DATA": stop_reading})

    async def main() -> tuple[DeliveryResult, float]:
        async with serve(fake) as port:
            conn = await connect(HOST, port, settings=settings(data_block_timeout=0.5))
            start = asyncio.get_running_loop().time()
            body = b"Subject: big\r\n\r\n" + b"x" * 20_000_000 + b"\r\n"
            result = await conn.send("a@x.test", ["b@y.test"], body)
            assert not conn.usable
            return result, asyncio.get_running_loop().time() - start

    result, took = run(main())
    assert statuses(result) == [("b@y.test", "deferred", "data", 451, "4.4.2")]
    assert "timed out" in result.recipients[0].text
    assert took < 3
    assert stalled.is_set()


def test_one_send_at_a_time():
    async def slow_rcpt(reader: Any, writer: Any, line: bytes) -> None:
        await asyncio.sleep(0.3)
        writer.write(b"250 2.1.5 Ok\r\n")

    fake = Fake(replies={"RCPT": slow_rcpt})

    async def main() -> None:
        async with serve(fake) as port:
            async with await connect(HOST, port, settings=settings()) as conn:
                first = asyncio.ensure_future(conn.send("a@x.test", ["b@y.test"], MESSAGE))
                await asyncio.sleep(0.05)
                with pytest.raises(RuntimeError):
                    await conn.send("a@x.test", ["c@y.test"], MESSAGE)
                assert (await first).recipients[0].delivered

    run(main())
    assert [c for c in fake.commands if c.startswith("RCPT")] == ["RCPT TO:<b@y.test>"]


@given(
    st.integers(200, 599),
    st.lists(
        st.text(max_size=60) | st.from_regex(r"[245]\.\d{1,3}\.\d{1,3} [ -~]{0,20}"),
        min_size=1,
        max_size=5,
    ),
)
@example(550, ["5.\u0661.\u0661 other digits are not an enhanced code"])
def test_any_reply_text_parses_safely(code, lines):
    from bonzo.client import _reply
    from bonzo.errors import enhanced_code_problem

    reply = _reply(code, lines)
    assert reply.code == code
    assert len(reply.lines) == len(lines)
    assert not re.search(r"[\x00-\x1f\x7f]", reply.text.replace("\n", ""))
    if reply.enhanced_code:
        # One a refusal can carry on as it is (ASCII digits only: "\d" would
        # also take other scripts' digits).
        assert enhanced_code_problem(code, reply.enhanced_code) is None
        assert lines[0].startswith(reply.enhanced_code)


def test_has_8bit_reads_any_message_and_leaves_a_file_where_it_was():
    from bonzo.client import has_8bit
    from bonzo.session import Envelope

    assert not has_8bit(b"Subject: plain\r\n\r\nHello.\r\n")
    assert has_8bit("Subject: caf\u00e9\r\n".encode())
    f = io.BytesIO(b"\xe9 skipped\r\nplain after\r\n")
    f.seek(3)
    assert not has_8bit(f, chunk_size=4)
    assert f.tell() == 3
    envelope = Envelope("a@example.org", rcpt_tos=["b@example.net"])
    envelope.write(b"Subject: x\r\n\r\nplain\r\n")
    assert not has_8bit(envelope)
    envelope.close()
    eight = Envelope("a@example.org", rcpt_tos=["b@example.net"])
    eight.write("Subject: x\r\n\r\n\u00e9t\u00e9\r\n".encode())
    assert has_8bit(eight)
    eight.close()

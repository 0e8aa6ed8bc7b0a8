"""A private Exim relays into a real Bonzo server: bytes intact, Bonzo's
refusals turned into bounces and deferrals, STARTTLS and implicit TLS with
AUTH, and LMTP (TCP and a Unix socket) with a result per recipient. And Exim
uses CHUNKING (BDAT) where it is offered: with a private Postfix as the
server."""

from __future__ import annotations

import re

import pytest

from bonzo.settings import ListenerSettings

from .bonzo_side import CORPUS, PASSWORD, USER, Target, by_subject, split_trace
from .exim import Exim, parse_status
from .peers import LMTPRoute, SMTPRoute, wait_until

pytestmark = pytest.mark.timeout(60)

SENDER = "alice@exim.test"  # Exim's own domain: its DSNs end there


def test_relayed_messages_arrive_byte_for_byte(start_server, exim):
    bonzo = start_server(plugin=Target(), hostname="bonzo.test")
    peer = exim(SMTPRoute(port=bonzo.port))
    recipients = ["bob@example.com", "carol@example.com", "dave@example.org"]
    submissions = {}
    for name, original in CORPUS.items():
        options = ["BODY=8BITMIME"] if name == "eight bit" else []
        rcpts = recipients if name == "ascii" else recipients[:1]
        submissions[name] = peer.send(SENDER, rcpts, original, mail_options=options)
    for name, submission in submissions.items():
        for recipient, delivery in peer.wait(submission).items():
            assert (delivery.status, delivery.code) == ("sent", 250), (name, recipient, delivery)
            assert delivery.relay is not None and delivery.relay.startswith("127.0.0.1 ")

    plugin = bonzo.plugin
    wait_until(lambda: len(plugin.messages) == len(CORPUS), what="every message in Bonzo")
    stored = by_subject(plugin.messages)
    assert sorted(stored) == sorted(CORPUS)
    for name, original in CORPUS.items():
        delivered = stored[name]
        trace = split_trace(delivered.body, original)
        queue_id = submissions[name].queue_id
        assert re.search(rb"by exim\.test with esmtp \(Exim [\d.]+\)", trace), trace
        assert queue_id.encode() in trace
        assert delivered.mail_from == SENDER
        assert delivered.helo == "exim.test" and delivered.esmtp
        assert delivered.header_bytes.startswith(b"Received: from exim.test ")
    assert sorted(stored["ascii"].rcpt_tos) == sorted(recipients)
    # Exim passes 8-bit bodies on as they are, without BODY=8BITMIME.
    assert stored["eight bit"].mail_params.get("BODY") is None


def test_bonzo_550_bounces_and_451_defers(start_server, exim):
    bonzo = start_server(plugin=Target(), hostname="bonzo.test")
    peer = exim(SMTPRoute(port=bonzo.port))
    recipients = ["bob@example.com", "reject@example.com", "later@example.com"]
    submission = peer.send(SENDER, recipients, CORPUS["ascii"])
    outcome = peer.wait(submission)

    ok, bounced, deferred = (outcome[r] for r in recipients)
    assert (ok.status, ok.code) == ("sent", 250)
    assert (bounced.status, bounced.code, bounced.dsn) == ("bounced", 550, "5.1.1")
    assert bounced.stage == "RCPT" and bounced.reply == "550 5.1.1 No such user here"
    assert (deferred.status, deferred.code, deferred.dsn) == ("deferred", 451, "4.3.0")
    assert deferred.stage == "RCPT" and deferred.reply == "451 4.3.0 Try again later"
    wait_until(lambda: bonzo.plugin.messages, what="the message in Bonzo")
    assert [m.rcpt_tos for m in bonzo.plugin.messages] == [["bob@example.com"]]
    # Exim's DSN to the sender went to its own (discarding) domain.
    assert wait_until(
        lambda: [d for d in peer.deliveries() if d.recipient == SENDER and d.status == "sent"],
        what="the DSN to the sender",
    )


def test_deferred_mail_is_delivered_by_flush_once_bonzo_takes_it(start_server, exim):
    target = Target()
    bonzo = start_server(plugin=target, hostname="bonzo.test")
    peer = exim(SMTPRoute(port=bonzo.port))
    submission = peer.send(SENDER, ["later@example.com"], CORPUS["ascii"])
    assert peer.wait(submission)["later@example.com"].status == "deferred"
    target.refusals.clear()
    peer.flush()
    delivery = peer.wait(submission, final=True)["later@example.com"]
    assert (delivery.status, delivery.code) == ("sent", 250)
    wait_until(lambda: target.messages, what="the message in Bonzo")


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit-tls"])
def test_tls_and_auth(start_server, exim, tls_listener, implicit):
    target = Target()
    bonzo = start_server(
        plugin=target,
        hostname="bonzo.test",
        listener=tls_listener(implicit_tls=implicit, require_tls=True, require_auth=True),
        auth_failure_delay=0,
    )
    route = SMTPRoute(bonzo.port, tls=True, implicit_tls=implicit, username=USER, password=PASSWORD)
    peer = exim(route)
    submission = peer.send(
        SENDER, ["bob@example.com"], CORPUS["eight bit"], mail_options=["BODY=8BITMIME"]
    )
    delivery = peer.wait(submission)["bob@example.com"]
    assert delivery.code == 250, delivery.line
    # Exim logs the TLS version and cipher (X=), an unverified certificate
    # (CV=no: "encrypt", not "verify"), the authenticator it used (A=) and
    # that it sent the message with CHUNKING (K).
    assert re.search(r" X=TLS1\.[23]:\S+ CV=no A=client_plain K C=", delivery.line), delivery.line
    wait_until(lambda: target.messages, what="the message in Bonzo")
    split_trace(target.messages[0].body, CORPUS["eight bit"])
    (session,) = target.sessions
    assert session["auth"] == USER and session["protocol"] == "ESMTPSA"
    assert session["tls"] is not None


def test_wrong_password_defers(start_server, exim, tls_listener):
    bonzo = start_server(
        plugin=Target(),
        hostname="bonzo.test",
        listener=tls_listener(require_tls=True, require_auth=True),
        auth_failure_delay=0,
    )
    peer = exim(SMTPRoute(port=bonzo.port, tls=True, username=USER, password="wrong"))
    submission = peer.send(SENDER, ["bob@example.com"], CORPUS["ascii"])
    delivery = peer.wait(submission)["bob@example.com"]
    assert delivery.status == "deferred", delivery
    assert delivery.reply == "authentication required but authentication attempt(s) failed"
    # Bonzo's refusal is on the line before.
    assert re.search(r"client_plain authenticator failed .* 535 5\.7\.8 ", peer.log())
    assert bonzo.plugin.messages == []


def test_exim_sends_bdat_to_bonzo_and_every_byte_arrives(start_server, exim):
    """Bonzo offers CHUNKING: Exim sends every message with BDAT, and each
    arrives byte for byte, with the same envelope and trace as by DATA."""
    chunked: list[bool] = []

    class Chunked(Target):
        def bonzo_deliver(self, session, envelope):  # type: ignore[no-untyped-def]
            chunked.append(envelope.chunked)
            return super().bonzo_deliver(session, envelope)

    bonzo = start_server(plugin=Chunked(), hostname="bonzo.test")
    peer = exim(SMTPRoute(port=bonzo.port))
    submissions = {
        name: peer.send(SENDER, ["bob@example.com"], original) for name, original in CORPUS.items()
    }
    for name, submission in submissions.items():
        assert peer.wait(submission)["bob@example.com"].code == 250, name
    wait_until(lambda: len(bonzo.plugin.messages) == len(CORPUS), what="every message in Bonzo")
    assert chunked == [True] * len(CORPUS)
    stored = by_subject(bonzo.plugin.messages)
    for name, original in CORPUS.items():
        split_trace(stored[name].body, original)  # raises unless byte for byte
        assert stored[name].header_bytes.startswith(b"Received: from exim.test ")


def test_exim_sends_bdat_to_a_server_that_offers_chunking(exim, postfix):
    # The fixture's own check, against Postfix's smtpd (which offers CHUNKING).
    downstream = postfix(accept_domains=["mx.test"])
    peer = exim(SMTPRoute(port=downstream.port))
    submission = peer.send(SENDER, ["someone@mx.test"], CORPUS["dots"])
    assert peer.wait(submission)["someone@mx.test"].code == 250
    found = wait_until(
        lambda: re.search(r"disconnect from \S+ ehlo=1 mail=1 rcpt=1 bdat=1", downstream.log()),
        what="Postfix to log a BDAT session",
    )
    assert found


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        (LMTPRoute(port=2424), ["driver = smtp", "protocol = lmtp", "port = 2424"]),
        (
            LMTPRoute(path="/run/bonzo/lmtp.sock"),
            ["driver = lmtp", "socket = /run/bonzo/lmtp.sock"],
        ),
        (SMTPRoute(port=25, implicit_tls=True), ["protocol = smtps", "port = 25"]),
    ],
)
def test_routes_configure_the_transport(route, expected):
    # The transport each route gets (each is also run against Bonzo above).
    peer = Exim(route)
    try:
        config = peer.config()
    finally:
        peer.stop()
    transport = config.split("begin transports\n", 1)[1].split("\n\n", 1)[0]
    lines = {line.strip() for line in transport.splitlines()[1:]}
    assert lines >= set(expected)


def test_secrets_are_escaped_for_exim():
    peer = Exim(SMTPRoute(port=25, username="u^x", password="p$a\\s^s"))
    try:
        config = peer.config()
    finally:
        peer.stop()
    assert "client_send = ^u^^x^p\\$a\\\\s^^s\n" in config


def test_mainlog_lines_are_parsed():
    sent = parse_status(
        "2026-12-04 22:31:51 1xZbol-0000mZ-01 => b@example.com R=outgoing T=outgoing"
        ' H=127.0.0.1 [127.0.0.1]:2525 C="250 2.0.0 Ok: queued as \\"X\\""'
    )
    assert sent is not None and (sent.status, sent.code, sent.dsn) == ("sent", 250, "2.0.0")
    assert (
        sent.reply == '250 2.0.0 Ok: queued as "X"' and sent.relay == "127.0.0.1 [127.0.0.1]:2525"
    )
    more = parse_status(
        "2026-12-04 22:31:51 1xZbol-0000mZ-01 -> c@example.com R=outgoing T=outgoing"
        ' H=127.0.0.1 [127.0.0.1]:2525 C="250 Ok"'
    )
    assert more is not None and (more.recipient, more.status, more.code) == (
        "c@example.com",
        "sent",
        250,
    )
    bounced = parse_status(
        "2026-12-04 22:31:51 1xZbol-0000mZ-01 ** r@example.com R=outgoing T=outgoing"
        " H=127.0.0.1 [127.0.0.1]:2525: SMTP error from remote mail server after"
        " RCPT TO:<r@example.com>: 550 5.1.1 No such user here"
    )
    assert bounced is not None
    assert (bounced.status, bounced.code, bounced.dsn, bounced.stage) == (
        "bounced",
        550,
        "5.1.1",
        "RCPT",
    )
    refused = parse_status(
        "2026-12-04 22:31:51 1xZbol-0000mZ-01 == b@example.com R=outgoing T=outgoing"
        " defer (111): Connection refused"
    )
    assert refused is not None and (refused.status, refused.code) == ("deferred", None)
    assert refused.reply == "Connection refused"
    assert parse_status("2026-12-04 22:31:51 1xZbol-0000mZ-01 Completed") is None
    discarded = parse_status(
        "2026-12-04 22:37:25 1xZbu9-00068V-0H => :blackhole: <alice@exim.test> R=local_discard"
    )
    assert discarded is not None and (discarded.recipient, discarded.status, discarded.code) == (
        "alice@exim.test",
        "sent",
        None,
    )


@pytest.mark.parametrize("transport", ["inet", "unix"])
def test_lmtp_gives_each_recipient_its_own_result(start_server, exim, socket_dir, transport):
    target = Target()
    options = {"plugin": target, "hostname": "bonzo.test"}
    options["listener"] = ListenerSettings(protocol="lmtp")
    if transport == "unix":
        path = str(socket_dir / "lmtp.sock")
        start_server(unix_path=path, **options)
        route = LMTPRoute(path=path)
    else:
        route = LMTPRoute(port=start_server(**options).port)
    peer = exim(route)
    recipients = ["bob@example.com", "full@example.com", "broken@example.com", "reject@example.com"]
    submission = peer.send(SENDER, recipients, CORPUS["dots"])
    outcome = peer.wait(submission)

    bob, full, broken, reject = (outcome[r] for r in recipients)
    # Exim's smtp transport (protocol = lmtp, over TCP) uses CHUNKING, which
    # Bonzo offers: the per-recipient replies follow the last BDAT. Its lmtp
    # driver (the Unix socket) sends DATA.
    end = "BDAT" if transport == "inet" else "end of data"
    assert (bob.status, bob.code) == ("sent", 250)
    assert (full.status, full.reply, full.stage) == ("deferred", "452 4.2.2 Mailbox full", end)
    assert (broken.status, broken.reply, broken.stage) == (
        "bounced",
        "554 5.2.1 Mailbox disabled",
        end,
    )
    assert (reject.status, reject.code, reject.stage) == ("bounced", 550, "RCPT")
    # One message for the three recipients Bonzo took at RCPT, delivered to bob alone.
    wait_until(lambda: target.messages, what="the message in Bonzo")
    (delivered,) = target.messages
    assert sorted(delivered.rcpt_tos) == sorted(recipients[:3])
    split_trace(delivered.body, CORPUS["dots"])
    (session,) = target.sessions
    assert session["delivered_to"] == ["bob@example.com"]
    assert session["protocol"] == "LMTP" and session["helo"] == "exim.test"

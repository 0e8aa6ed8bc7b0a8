"""A private Postfix relays into a real Bonzo server: bytes intact, Bonzo's
refusals turned into bounces and deferrals, STARTTLS and implicit TLS with
AUTH, and LMTP (TCP and a Unix socket) with a result per recipient. And
Postfix as a downstream server that refuses chosen recipients."""

from __future__ import annotations

import re
import socket
import threading
from typing import Any

import pytest

from bonzo.errors import SMTPError
from bonzo.session import Envelope
from bonzo.settings import ListenerSettings

from .bonzo_side import CORPUS, PASSWORD, USER, Target, by_subject, split_trace
from .peers import HOST, LMTPRoute, SMTPRoute, unavailable, wait_until
from .postfix import Postfix, parse_status, unavailable_reason

pytestmark = pytest.mark.timeout(60)

SENDER = "alice@postfix.test"  # Postfix's own domain: its DSNs end there


def test_relayed_messages_arrive_byte_for_byte(start_server, postfix):
    bonzo = start_server(plugin=Target(), hostname="bonzo.test")
    peer = postfix(SMTPRoute(port=bonzo.port))
    recipients = ["bob@example.com", "carol@example.com", "dave@example.org"]
    submissions = {}
    for name, original in CORPUS.items():
        options = ["BODY=8BITMIME"] if name == "eight bit" else []
        rcpts = recipients if name == "ascii" else recipients[:1]
        submissions[name] = peer.send(SENDER, rcpts, original, mail_options=options)
    for name, submission in submissions.items():
        outcome = peer.wait(submission)
        for recipient, delivery in outcome.items():
            assert (delivery.status, delivery.code) == ("sent", 250), (name, recipient, delivery)
            assert delivery.relay.startswith("127.0.0.1[127.0.0.1]:")  # type: ignore[union-attr]

    plugin = bonzo.plugin
    wait_until(lambda: len(plugin.messages) == len(CORPUS), what="every message in Bonzo")
    stored = by_subject(plugin.messages)
    assert sorted(stored) == sorted(CORPUS)
    for name, original in CORPUS.items():
        delivered = stored[name]
        trace = split_trace(delivered.body, original)
        # Postfix's own trace header names it and the queue id it gave.
        queue_id = submissions[name].queue_id
        assert re.search(rb"by postfix\.test \(Postfix\) with ESMTP id " + queue_id.encode(), trace)
        assert delivered.mail_from == SENDER
        assert delivered.helo == "postfix.test" and delivered.esmtp
        # Bonzo's Received header goes in front of what Postfix sent.
        assert delivered.header_bytes.startswith(b"Received: from postfix.test ")
    assert stored["ascii"].rcpt_tos == recipients
    assert stored["eight bit"].mail_params.get("BODY") == "8BITMIME"


@pytest.mark.parametrize("greets", [True, False], ids=["squatter greets", "squatter silent"])
def test_peer_starts_on_a_new_port_when_another_process_took_its_port(greets):
    # The flake this guards against: test servers of parallel runs bind
    # ports between the harness choosing one for Postfix and Postfix binding it.
    reason = unavailable_reason()
    if reason is not None:
        unavailable(reason)
    peer = Postfix()
    taken = peer.port
    with socket.create_server((HOST, taken)) as squatter:
        squatter.settimeout(0.2)
        done = threading.Event()

        def answer() -> None:
            while not done.is_set():
                try:
                    conn, _ = squatter.accept()
                except OSError:
                    continue
                with conn:
                    conn.sendall(b"220 squatter ESMTP\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        if greets:
            thread.start()
        try:
            peer.start()
            assert peer.port != taken
            with socket.create_connection((HOST, peer.port), timeout=5) as sock:
                assert peer.token.encode() in sock.recv(512)
        finally:
            done.set()
            peer.stop()
            if greets:
                thread.join(5)


def test_bonzo_550_bounces_and_451_defers(start_server, postfix):
    bonzo = start_server(plugin=Target(), hostname="bonzo.test")
    peer = postfix(SMTPRoute(port=bonzo.port))
    recipients = ["bob@example.com", "reject@example.com", "later@example.com"]
    submission = peer.send(SENDER, recipients, CORPUS["ascii"])
    outcome = peer.wait(submission)

    ok, bounced, deferred = (outcome[r] for r in recipients)
    assert (ok.status, ok.code) == ("sent", 250)
    assert (bounced.status, bounced.code, bounced.dsn) == ("bounced", 550, "5.1.1")
    assert bounced.stage == "RCPT"
    assert bounced.reply == "550 5.1.1 No such user here"
    assert (deferred.status, deferred.code, deferred.dsn) == ("deferred", 451, "4.3.0")
    assert deferred.stage == "RCPT" and deferred.reply == "451 4.3.0 Try again later"
    # Only the accepted recipient got the message.
    wait_until(lambda: bonzo.plugin.messages, what="the message in Bonzo")
    assert [m.rcpt_tos for m in bonzo.plugin.messages] == [["bob@example.com"]]
    # The bounce went to the sender, in Postfix's own (discarding) domain.
    assert wait_until(
        lambda: [d for d in peer.deliveries() if d.recipient == SENDER and d.status == "sent"],
        what="the DSN to the sender",
    )


def test_deferred_mail_is_delivered_by_flush_once_bonzo_takes_it(start_server, postfix):
    target = Target()
    bonzo = start_server(plugin=target, hostname="bonzo.test")
    peer = postfix(SMTPRoute(port=bonzo.port))
    submission = peer.send(SENDER, ["later@example.com"], CORPUS["ascii"])
    assert peer.wait(submission)["later@example.com"].status == "deferred"
    target.refusals.clear()
    peer.flush()
    delivery = peer.wait(submission, final=True)["later@example.com"]
    assert (delivery.status, delivery.code) == ("sent", 250)
    wait_until(lambda: target.messages, what="the message in Bonzo")


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit-tls"])
def test_tls_and_auth(start_server, postfix, tls_listener, implicit):
    target = Target()
    bonzo = start_server(
        plugin=target,
        hostname="bonzo.test",
        listener=tls_listener(implicit_tls=implicit, require_tls=True, require_auth=True),
        auth_failure_delay=0,
    )
    route = SMTPRoute(bonzo.port, tls=True, implicit_tls=implicit, username=USER, password=PASSWORD)
    peer = postfix(route)
    submission = peer.send(
        SENDER, ["bob@example.com"], CORPUS["eight bit"], mail_options=["BODY=8BITMIME"]
    )
    assert peer.wait(submission)["bob@example.com"].code == 250
    wait_until(lambda: target.messages, what="the message in Bonzo")
    split_trace(target.messages[0].body, CORPUS["eight bit"])
    (session,) = target.sessions
    assert session["auth"] == USER and session["protocol"] == "ESMTPSA"
    assert session["tls"] is not None and session["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert re.search(r"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+", peer.log())


def test_utf8_mail_from_an_authenticating_postfix_is_taken(start_server, postfix, tls_listener):
    """An authenticated Postfix sends ``SMTPUTF8 AUTH=<>`` on MAIL and a UTF-8
    recipient's ``ORCPT`` as UTF-8 octets in xtext: both are taken."""
    target = Target()
    bonzo = start_server(
        plugin=target,
        hostname="bonzo.test",
        listener=tls_listener(require_tls=True, require_auth=True),
        auth_failure_delay=0,
    )
    route = SMTPRoute(bonzo.port, tls=True, username=USER, password=PASSWORD)
    peer = postfix(route, main={"smtp_send_dummy_mail_auth": "yes"})
    sender, recipient = "j\u00f6rg@postfix.test", "bj\u00f6rn@b\u00fccher.example"
    message = f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: utf8\r\n\r\nHej.\r\n"
    submission = peer.send(
        sender, [recipient], message.encode(), mail_options=["SMTPUTF8", "BODY=8BITMIME"]
    )
    delivery = peer.wait(submission)[recipient]
    assert (delivery.status, delivery.code) == ("sent", 250), delivery
    wait_until(lambda: target.messages, what="the message in Bonzo")
    [stored] = target.messages
    assert stored.mail_from == sender and stored.rcpt_tos == [recipient]
    assert stored.mail_params.get("AUTH") == "<>" and "SMTPUTF8" in stored.mail_params
    [dsn] = target.rcpt_dsn
    assert (dsn.orcpt.addr_type, dsn.orcpt.address) == ("rfc822", recipient)


def test_wrong_password_defers(start_server, postfix, tls_listener):
    bonzo = start_server(
        plugin=Target(),
        hostname="bonzo.test",
        listener=tls_listener(require_tls=True, require_auth=True),
        auth_failure_delay=0,
    )
    peer = postfix(SMTPRoute(port=bonzo.port, tls=True, username=USER, password="wrong"))
    submission = peer.send(SENDER, ["bob@example.com"], CORPUS["ascii"])
    delivery = peer.wait(submission)["bob@example.com"]
    assert delivery.status == "deferred"
    assert "SASL authentication failed" in delivery.reply and "535 5.7.8" in delivery.reply
    assert bonzo.plugin.messages == []


def test_postfix_as_a_downstream_refuses_chosen_recipients(postfix):
    peer = postfix(
        accept_domains=["mx.test"],
        recipient_access={"busy@mx.test": "450 4.2.1 Busy", "gone@mx.test": "550 5.1.1 Gone"},
    )
    code, text = peer.rcpt_reply(SENDER, "busy@mx.test")
    assert (code, text) == (450, "4.2.1 <busy@mx.test>: Recipient address rejected: Busy")
    code, text = peer.rcpt_reply(SENDER, "gone@mx.test")
    assert (code, text) == (550, "5.1.1 <gone@mx.test>: Recipient address rejected: Gone")
    submission = peer.send(SENDER, ["someone@mx.test"], CORPUS["ascii"])
    delivery = peer.wait(submission)["someone@mx.test"]
    assert (delivery.status, delivery.relay) == ("sent", "none")
    # Without a route, other domains are refused at once.
    code, text = peer.rcpt_reply(SENDER, "x@elsewhere.test")
    assert code == 550 and text.endswith("no route configured in this test")


def test_status_lines_are_parsed():
    line = (
        "Dec 04 22:27:49 postfix postfix/smtp[29554]: 804EC172150: to=<b@example.com>,"
        " relay=127.0.0.1[127.0.0.1]:2525, delay=0.1, delays=0.01/0/0.05/0.04, dsn=5.1.1,"
        " status=bounced (host 127.0.0.1[127.0.0.1] said: 550 5.1.1 No such user here"
        " (in reply to RCPT TO command))"
    )
    delivery = parse_status(line)
    assert delivery is not None
    assert (delivery.queue_id, delivery.recipient, delivery.status) == (
        "804EC172150",
        "b@example.com",
        "bounced",
    )
    assert (delivery.code, delivery.dsn, delivery.stage) == (550, "5.1.1", "RCPT")
    assert delivery.reply == "550 5.1.1 No such user here"
    lmtp = parse_status(
        "Dec 04 22:27:49 postfix postfix/lmtp[1]: ABC: to=<f@example.com>, relay=postfix.test"
        "[/tmp/l.sock], delay=0, delays=0/0/0/0, dsn=4.2.2, status=deferred (host postfix.test"
        "[/tmp/l.sock] said: 452 4.2.2 mailbox full (in reply to end of DATA command))"
    )
    assert lmtp is not None and (lmtp.code, lmtp.stage) == (452, "end of data")
    assert parse_status("Dec 04 22:27:49 postfix postfix/qmgr[1]: ABC: removed") is None


@pytest.mark.parametrize("transport", ["inet", "unix"])
def test_lmtp_gives_each_recipient_its_own_result(start_server, postfix, socket_dir, transport):
    target = Target()
    options = {"plugin": target, "hostname": "bonzo.test"}
    options["listener"] = ListenerSettings(protocol="lmtp")
    if transport == "unix":
        path = str(socket_dir / "lmtp.sock")
        start_server(unix_path=path, **options)
        route = LMTPRoute(path=path)
    else:
        route = LMTPRoute(port=start_server(**options).port)
    peer = postfix(route)
    recipients = ["bob@example.com", "full@example.com", "broken@example.com", "reject@example.com"]
    submission = peer.send(SENDER, recipients, CORPUS["dots"])
    outcome = peer.wait(submission)

    bob, full, broken, reject = (outcome[r] for r in recipients)
    assert (bob.status, bob.code) == ("sent", 250)
    assert (full.status, full.reply, full.stage) == (
        "deferred",
        "452 4.2.2 Mailbox full",
        "end of data",
    )
    assert (broken.status, broken.reply, broken.stage) == (
        "bounced",
        "554 5.2.1 Mailbox disabled",
        "end of data",
    )
    assert (reject.status, reject.code, reject.stage) == ("bounced", 550, "RCPT")
    # One message for the three recipients Bonzo took at RCPT, delivered to bob alone.
    wait_until(lambda: target.messages, what="the message in Bonzo")
    (delivered,) = target.messages
    assert sorted(delivered.rcpt_tos) == sorted(recipients[:3])
    split_trace(delivered.body, CORPUS["dots"])
    (session,) = target.sessions
    assert session["delivered_to"] == ["bob@example.com"]
    assert session["protocol"] == "LMTP" and session["helo"] == "postfix.test"


class ArchivingTarget(Target):
    """:class:`Target` with an always-bcc: a copy for the archive added at
    the first RCPT (so it comes before the client's recipients), refused
    after the message; then the whole message is deferred."""

    def bonzo_rcpt(self, envelope: Envelope, address: str, dsn: Any) -> Any:  # type: ignore[override] # by name
        if not envelope.added:
            envelope.add_recipient_address("archive@example.com")
        return super().bonzo_rcpt(address, dsn)

    def bonzo_message(self, envelope: Envelope) -> None:
        for i in envelope.added:
            envelope.refuse_recipient(i, SMTPError(550, "Archive disabled", enhanced_code="5.2.1"))
        raise SMTPError(451, "Try again later", enhanced_code="4.3.0")


def test_lmtp_a_copy_added_at_rcpt_does_not_bounce_a_deferred_recipient(start_server, postfix):
    """The copy is owed no reply: Postfix defers both recipients, bouncing
    none with the copy's 550."""
    target = ArchivingTarget()
    bonzo = start_server(
        plugin=target, hostname="bonzo.test", listener=ListenerSettings(protocol="lmtp")
    )
    peer = postfix(LMTPRoute(port=bonzo.port))
    recipients = ["bob@example.com", "carol@example.com"]
    outcome = peer.wait(peer.send(SENDER, recipients, CORPUS["ascii"]))
    for recipient in recipients:
        delivery = outcome[recipient]
        assert (delivery.status, delivery.reply, delivery.stage) == (
            "deferred",
            "451 4.3.0 Try again later",
            "end of data",
        ), recipient
    assert target.messages == []

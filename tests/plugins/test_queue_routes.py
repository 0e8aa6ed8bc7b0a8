"""The queue's network routes against real servers: ``smarthost`` and ``mx``
to a real Bonzo (the ``mx`` hosts found through a DNS server on
127.0.0.1), ``lmtp`` to Bonzo's LMTP listener. Postfix and Dovecot as
downstreams are in ``tests/interop/test_queue_downstreams.py``."""

from __future__ import annotations

import asyncio
import io
import re
import time
from pathlib import Path
from typing import Any

import pytest
from bonzo_plugins.queue.routes import RouteTable
from bonzo_plugins.queue.runner import Runner, RunnerSettings
from bonzo_plugins.queue.spool import GroupSync, Spool
from daemon_support import free_port
from e2e_support import RecordingPlugin, ServerThread

from bonzo import errors
from bonzo.dns import Resolver
from bonzo.settings import ListenerSettings

BODY = b"From: alice@example.org\r\nSubject: routed\r\n\r\nThrough the queue.\r\n.dot\r\n"


class App:
    def __init__(self, base: Path, dns: Resolver | None = None) -> None:
        self.base_dir = base
        self.dns = dns

        class _Settings:
            hostname = "relay.test"

        self.settings = _Settings()


class Picky(RecordingPlugin):
    """Refuses ``gone@`` for good and ``later@`` for now, at RCPT."""

    def bonzo_rcpt(self, address: str) -> Any:  # type: ignore[override] # a hook, by name
        local = address.split("@")[0]
        if local == "gone":
            raise errors.PermanentError("No such user", 550, "5.1.1")
        if local == "later":
            raise errors.TransientError("Try later", 451, "4.3.0")
        return super().bonzo_rcpt()


def make(tmp_path: Path, routes: dict[str, Any], dns: Resolver | None = None):
    spool = Spool(tmp_path / "q")
    spool.setup()
    table = RouteTable(routes, {}, App(tmp_path, dns))
    table.start()
    runner = Runner(
        spool, GroupSync(spool.data), table, None, RunnerSettings(hostname="relay.test")
    )
    return spool, runner


def queue(
    spool: Spool, id: str, *rcpts: str, sender: str = "alice@example.org", **params: Any
) -> None:
    recipients = [
        {"address": r, "canonical": r, "domain": r.partition("@")[2], "params": dict(params)}
        for r in rcpts
    ]
    envelope = {"arrival": time.time(), "sender": sender, "recipients": recipients}
    spool.write(id, envelope, b"", io.BytesIO(BODY))


def states(spool: Spool, id: str) -> list[tuple[str, str]]:
    return [(r.status, r.reply) for r in spool.load(id).recipients]


def reports(spool: Spool) -> list[bytes]:
    return [m.read() for m in spool.iter_messages() if m.sender == ""]


async def attempt_all(runner: Runner, *ids: str) -> None:
    for id in ids:
        await runner.attempt(id)
    await runner.routes.close()


@pytest.fixture
def downstream(start_server):
    return start_server(plugin=Picky(), hostname="mx.dest.test")


def test_smarthost_per_recipient_outcomes_and_one_connection(tmp_path, downstream):
    spool, runner = make(
        tmp_path, {"*": {"type": "smarthost", "host": "127.0.0.1", "port": downstream.port}}
    )
    queue(spool, "S1", "bob@dest.test", "gone@dest.test", "later@dest.test")
    queue(spool, "S2", "carol@dest.test")
    asyncio.run(attempt_all(runner, "S1", "S2"))
    assert states(spool, "S1")[2][0] == "deferred"
    assert states(spool, "S1")[2][1] == "451 4.3.0 Try later"
    assert "S2" not in spool.ids()
    plugin = downstream.plugin
    assert [m.rcpt_tos for m in plugin.messages] == [["bob@dest.test"], ["carol@dest.test"]]
    assert plugin.messages[0].body == BODY  # the dot-stuffed line arrives as sent
    # Both messages over one connection (RSET between).
    assert len({m.session_id for m in plugin.messages}) == 1
    [report] = reports(spool)
    assert b"Final-Recipient: rfc822; gone@dest.test" in report
    assert b"Diagnostic-Code: smtp; 550 5.1.1 No such user" in report
    assert b"Remote-MTA: dns; 127.0.0.1\r\n" in report  # no port (RFC 3464 2.3.5)


def test_a_downstream_that_is_down_defers_then_gets_it(tmp_path):
    port = free_port()
    spool, runner = make(tmp_path, {"*": {"type": "smarthost", "host": "127.0.0.1", "port": port}})
    queue(spool, "D1", "bob@dest.test")
    asyncio.run(attempt_all(runner, "D1"))
    [(status, reply)] = states(spool, "D1")
    assert status == "deferred" and reply.startswith("4")
    server = ServerThread(plugin=RecordingPlugin(), port=port, hostname="mx.dest.test").start()
    try:
        message = spool.load("D1")
        message.recipients[0].next_attempt = 0
        spool.save_state(message)
        asyncio.run(attempt_all(runner, "D1"))
        assert spool.ids() == []
        assert [m.rcpt_tos for m in server.plugin.messages] == [["bob@dest.test"]]
    finally:
        server.stop()


def test_require_tls_against_a_server_without_starttls_defers(tmp_path, downstream):
    route = {"type": "smarthost", "host": "127.0.0.1", "port": downstream.port, "tls": "require"}
    spool, runner = make(tmp_path, {"*": route})
    queue(spool, "T1", "bob@dest.test")
    asyncio.run(attempt_all(runner, "T1"))
    [(status, reply)] = states(spool, "T1")
    assert status == "deferred" and "STARTTLS" in reply
    assert downstream.plugin.messages == []


def test_lmtp_route_to_bonzo_lmtp(tmp_path, start_server):
    store = start_server(plugin=Picky(), listener=ListenerSettings(protocol="lmtp"))
    spool, runner = make(tmp_path, {"*": {"type": "lmtp", "host": "127.0.0.1", "port": store.port}})
    queue(spool, "L1", "bob@dest.test", "gone@dest.test")
    asyncio.run(attempt_all(runner, "L1"))
    assert "L1" not in spool.ids()
    assert [m.rcpt_tos for m in store.plugin.messages] == [["bob@dest.test"]]
    [report] = reports(spool)
    assert b"Final-Recipient: rfc822; gone@dest.test" in report


def test_lmtp_route_over_a_unix_socket(tmp_path, start_server):
    path = str(tmp_path / "lmtp.sock")
    store = start_server(plugin=Picky(), listener=ListenerSettings(protocol="lmtp"), unix_path=path)
    spool, runner = make(tmp_path, {"*": {"type": "lmtp", "path": path}})
    queue(spool, "U1", "bob@dest.test")
    asyncio.run(attempt_all(runner, "U1"))
    assert spool.ids() == []
    assert store.plugin.messages[0].body == BODY


def test_mx_route_finds_the_mail_host_in_dns(tmp_path, downstream, dns_stub):
    dns_stub.add("dest.test", "MX", "10 mx1.dest.test.")
    dns_stub.add("dest.test", "MX", "20 mx2.dest.test.")
    dns_stub.add("mx1.dest.test", "A", "127.0.0.9")  # nobody listens there
    dns_stub.add("mx2.dest.test", "A", "127.0.0.1")
    dns_stub.add("null.test", "MX", "0 .")
    dns_stub.fault("broken.test", "servfail")
    resolver = Resolver(dns_stub.settings())
    route = {"type": "mx", "port": downstream.port, "connect_timeout": 2}
    spool, runner = make(tmp_path, {"*": route}, resolver)
    queue(spool, "M1", "bob@dest.test")
    queue(spool, "M2", "x@null.test")
    queue(spool, "M3", "x@nowhere.test")
    queue(spool, "M4", "x@broken.test")
    asyncio.run(attempt_all(runner, "M1", "M2", "M3", "M4"))
    # mx1 did not answer: mx2 got it.
    assert [m.rcpt_tos for m in downstream.plugin.messages] == [["bob@dest.test"]]
    assert spool.load("M4").recipients[0].status == "deferred"
    bounced = b"".join(reports(spool))
    assert b"Final-Recipient: rfc822; x@null.test" in bounced
    assert b"Status: 5.1.10" in bounced  # null MX (RFC 7505)
    assert b"Final-Recipient: rfc822; x@nowhere.test" in bounced
    for id in ("M1", "M2", "M3"):
        assert id not in spool.ids()


def test_an_mx_that_is_this_server_is_a_loop_not_a_delivery(tmp_path, dns_stub, start_server):
    """The domain's MX points back here (a server greeting with our own
    name, relay.test): deferred as a loop, nothing sent to it."""
    itself = start_server(plugin=Picky(), hostname="Relay.Test")
    dns_stub.add("loop.test", "MX", "10 mx.loop.test.")
    dns_stub.add("mx.loop.test", "A", "127.0.0.1")
    route = {"type": "mx", "port": itself.port}
    spool, runner = make(tmp_path, {"*": route}, Resolver(dns_stub.settings()))
    queue(spool, "L1", "bob@loop.test")
    asyncio.run(attempt_all(runner, "L1"))
    [(status, reply)] = states(spool, "L1")
    assert status == "deferred" and reply.startswith("451 4.4.6"), reply
    assert "loops back" in reply
    assert itself.plugin.senders == []  # never got as far as MAIL


def test_mx_route_with_dns_off_defers(tmp_path):
    spool, runner = make(tmp_path, {"*": {"type": "mx"}}, Resolver(None))
    queue(spool, "O1", "bob@dest.test")
    asyncio.run(attempt_all(runner, "O1"))
    [(status, reply)] = states(spool, "O1")
    assert status == "deferred" and reply.startswith("451 4.3.5") and "DNS" in reply


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"type": "smarthost"}, 'routes."*".host: required'),
        ({"type": "smarthost", "host": "h", "port": 0}, 'routes."*".port: expected an integer'),
        ({"type": "smarthost", "host": "h", "tls": "maybe"}, 'routes."*".tls: expected one of'),
        ({"type": "smarthost", "host": "h", "username": "u"}, "password: required with username"),
        ({"type": "smarthost", "host": "h", "password": "p"}, "username: required with password"),
        ({"type": "smarthost", "host": "h", "idle_timeout": -1}, "idle_timeout: expected a"),
        ({"type": "lmtp"}, 'routes."*".host: give host (and port) or path'),
        ({"type": "lmtp", "host": "h", "path": "/p"}, "path: give host or path, not host and"),
        ({"type": "mx", "tls_policies": {"x.test": "sometimes"}}, 'tls_policies."x.test": '),
        ({"type": "mx", "connect_timeout": 0}, "connect_timeout: expected a positive duration"),
        ({"type": "mx", "colour": "blue"}, 'routes."*".colour: unknown key'),
    ],
)
def test_bad_route_names_the_key(tmp_path, route, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RouteTable({"*": route}, {}, App(tmp_path))


def test_an_empty_route_pattern_is_refused_naming_the_postmaster_key(tmp_path):
    """``""`` once matched the bare ``<postmaster>`` (undocumented); that
    recipient is now queued with a domain, so the pattern would match
    nothing: refused, saying where such mail goes."""
    with pytest.raises(ValueError, match=re.escape('routes."": an empty domain matches no')):
        RouteTable({"": {"type": "discard"}, "*": {"type": "discard"}}, {}, App(tmp_path))
    with pytest.raises(ValueError, match=re.escape("[plugins.queue] postmaster")):
        RouteTable({" ": {"type": "discard"}}, {}, App(tmp_path))


def test_an_lmtp_socket_path_longer_than_the_system_allows_is_refused(tmp_path):
    """Such a path fails every connect: refused as a listener's is, naming
    the key and the limit."""
    longest = "/" + "a" * 106  # 107 octets
    assert (
        RouteTable({"*": {"type": "lmtp", "path": longest}}, {}, App(tmp_path)).default.path
        == longest
    )
    too_long = longest + "\u00e9"  # 109 octets: counted in octets, not characters
    why = f"{too_long}: 109 octets, longer than a Unix socket's path may be (107)"
    with pytest.raises(ValueError, match="^" + re.escape(f'routes."*".path: {why}')):
        RouteTable({"*": {"type": "lmtp", "path": too_long}}, {}, App(tmp_path))
    with pytest.raises(ValueError, match="^" + re.escape(f"transports.store.path: {why}")):
        RouteTable({}, {"store": {"type": "lmtp", "path": too_long}}, App(tmp_path))


def test_routes_and_transports_are_parsed_by_their_type(tmp_path):
    table = RouteTable(
        {
            "*.Example.ORG": "relay",
            "example.net": {"type": "lmtp", "path": "lmtp.sock", "pipelining": False},
            "bank.example": {
                "type": "mx",
                "tls_policies": {"BANK.example": "verify"},
                "connect_timeout": "1m",
            },
            "*": {"type": "maildir", "path": "mail", "mode": "0640"},
        },
        {"relay": {"type": "smarthost", "host": "h", "implicit_tls": True}},
        App(tmp_path),
    )
    relay = table.named["relay"]
    assert table.suffixes == [(".example.org", relay)]
    assert relay.port == 465 and relay.settings.implicit_tls and relay.pool.idle_timeout == 30.0
    lmtp = table.exact["example.net"]
    assert lmtp.path == str(tmp_path / "lmtp.sock")  # relative to the configuration
    assert not lmtp.settings.pipelining and relay.settings.pipelining  # on unless turned off
    mx = table.exact["bank.example"]
    assert mx.port == 25 and mx.settings.connect_timeout == 60.0
    assert mx.policies["bank.example"].tls_policy == "verify"
    assert mx.settings.pipelining and mx.policies["bank.example"].pipelining
    assert table.default.writer.path == tmp_path / "mail" and table.default.writer.mode == 0o640


def test_a_maildir_transport_names_its_key_on_a_file_system_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^transports\.store\.path: .* is not a directory$"):
        RouteTable({}, {"store": {"type": "maildir", "path": "file"}}, App(tmp_path))


def test_every_line_of_an_attempt_carries_the_message_id_not_a_session(tmp_path, caplog):
    """A JSON log gives each line the session and message ids of the
    context: an attempt's lines (delivered, deferred, bounced) carry the
    queued message's id, and not the id of the session whose task kicked it."""
    import logging

    from bonzo.session import current_message_id, current_session_id

    spool, runner = make(tmp_path, {"*": {"type": "discard"}})
    queue(spool, "M1", "bob@dest.test")
    seen: list[tuple[str, str | None, str | None]] = []

    class Ids(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), current_session_id.get(), current_message_id.get()))

    caplog.set_level(logging.INFO, logger="bonzo.plugins.queue")
    handler = Ids()
    logging.getLogger("bonzo.plugins.queue").addHandler(handler)

    async def go() -> None:
        current_session_id.set("SESSION1")  # a session's task kicks the runner
        current_message_id.set("OTHER")
        runner._start("M1")
        task = runner._inflight["M1"]
        await asyncio.wait_for(task, 10)
        await runner.routes.close()
        assert (current_session_id.get(), current_message_id.get()) == ("SESSION1", "OTHER")

    try:
        asyncio.run(go())
    finally:
        logging.getLogger("bonzo.plugins.queue").removeHandler(handler)
    lines = [line for line in seen if "M1" in line[0]]
    assert any("delivered" in message for message, _, _ in lines), seen
    assert all((session, message_id) == (None, "M1") for _, session, message_id in lines), lines

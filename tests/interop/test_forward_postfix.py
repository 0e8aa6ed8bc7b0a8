"""The ``forward`` plugin in front of a private Postfix: a recipient
Postfix tempfails (``450``) and one it refuses (``550``) through an access
map are answered so at ``RCPT``, with Postfix's own text; the accepted one
gets the message, which Postfix takes (``250`` after its ``250``). A
Postfix that does not offer DSN gets a NOTIFY=SUCCESS no one will honour:
that is logged."""

from __future__ import annotations

import smtplib
from types import SimpleNamespace

import pytest
from bonzo_plugins.forward import ForwardPlugin

from bonzo.hooks import PluginSet

from .peers import wait_until

pytestmark = pytest.mark.timeout(60)

MESSAGE = (
    b"From: alice@example.org\r\nTo: ok@mx.test\r\nSubject: through the gateway\r\n\r\n"
    b"Forwarded to Postfix.\r\n.dot\r\n"
)


def test_forward_to_postfix_passes_its_verdicts_back(start_server, postfix):
    downstream = postfix(
        accept_domains=["mx.test"],
        recipient_access={"busy@mx.test": "450 4.2.1 Busy", "gone@mx.test": "550 5.1.1 Gone"},
    )
    plugin = ForwardPlugin()
    plugin.bonzo_configure(
        {"host": "127.0.0.1", "port": downstream.port, "tls": "none", "command_timeout": 20},
        SimpleNamespace(base_dir=None, settings=SimpleNamespace(hostname="gw.test")),
    )
    plugins = PluginSet(timeout=30.0)
    plugins.register(plugin, "forward")
    front = start_server(plugins=plugins, hostname="gw.test")
    with smtplib.SMTP(front.host, front.port, local_hostname="client.test", timeout=30) as client:
        client.ehlo()
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt("busy@mx.test") == (
            450,
            b"4.2.1 <busy@mx.test>: Recipient address rejected: Busy",
        )
        assert client.rcpt("gone@mx.test") == (
            550,
            b"5.1.1 <gone@mx.test>: Recipient address rejected: Gone",
        )
        assert client.rcpt("ok@mx.test")[0] == 250
        code, text = client.data(MESSAGE)
    assert code == 250, text
    # Postfix's own reply is in the text: "Ok: <id> forwarded: 2.0.0 Ok: queued as <qid>".
    assert b"forwarded: Ok: queued as " in text
    queue_id = text.rsplit(b" ", 1)[1].decode()
    deliveries = wait_until(
        lambda: [d for d in downstream.deliveries() if d.recipient == "ok@mx.test"],
        what="Postfix's delivery of ok@mx.test",
    )
    assert deliveries[0].queue_id == queue_id
    assert not [d for d in downstream.deliveries() if d.recipient != "ok@mx.test"]


@pytest.mark.parametrize("offers_dsn", [True, False])
def test_a_success_notice_postfix_will_not_send_is_logged(
    start_server, postfix, caplog, offers_dsn
):
    # A Postfix that offers DSN takes NOTIFY=SUCCESS on (no warning); one
    # that does not (smtpd_discard_ehlo_keywords) drops it, and nobody sends
    # the "relayed" notice RFC 3461 5.2.2 wants: forward says so.
    main = {} if offers_dsn else {"smtpd_discard_ehlo_keywords": "dsn"}
    downstream = postfix(accept_domains=["mx.test"], main=main)
    plugin = ForwardPlugin()
    plugin.bonzo_configure(
        {"host": "127.0.0.1", "port": downstream.port, "tls": "none", "command_timeout": 20},
        SimpleNamespace(base_dir=None, settings=SimpleNamespace(hostname="gw.test")),
    )
    plugins = PluginSet(timeout=30.0)
    plugins.register(plugin, "forward")
    front = start_server(plugins=plugins, hostname="gw.test")
    with smtplib.SMTP(front.host, front.port, local_hostname="client.test", timeout=30) as client:
        client.ehlo()
        assert client.mail("alice@example.org")[0] == 250
        assert client.rcpt("ok@mx.test", ["NOTIFY=SUCCESS"])[0] == 250
        code, text = client.data(MESSAGE)
    assert code == 250, text
    lines = [r.getMessage() for r in caplog.records if "does not offer DSN" in r.getMessage()]
    if offers_dsn:
        assert lines == []
    else:
        [line] = lines
        assert "no success notice for <ok@mx.test>" in line

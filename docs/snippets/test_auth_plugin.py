"""Tests of the StaticUsers AUTH plugin (hook_auth.py), run with pytest."""

import smtplib

import pytest
from hook_auth import StaticUsers

from bonzo.auth import hash_password
from bonzo.settings import ListenerSettings
from bonzo.testing import PluginTestServer

# AUTH is offered only on an encrypted connection, unless the listener allows
# it in clear text: fine for a test on 127.0.0.1.
LISTENER = ListenerSettings(auth_plaintext=True)
USERS = {"alice": hash_password("correct horse")}


def test_a_user_logs_in_and_sends():
    with PluginTestServer(("users", StaticUsers(USERS)), listener=LISTENER) as server:
        with server.client() as client:
            assert client.login("alice", "correct horse")[0] == 235
            client.sendmail("alice@example.org", ["bob@example.com"], "Subject: hi\r\n\r\nHi\r\n")
    assert server.envelopes == [("alice@example.org", ["bob@example.com"])]


def test_a_wrong_password_is_refused():
    users = ("users", StaticUsers(USERS))
    with PluginTestServer(users, listener=LISTENER, auth_failure_delay=0) as server:
        with server.client() as client, pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login("alice", "wrong")
    assert info.value.smtp_code == 535

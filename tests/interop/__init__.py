"""Interoperability tests with real software as Bonzo's peers — mail servers
(Postfix, Exim) and proxies (HAProxy) — each a private instance started and
stopped by the test, listening on 127.0.0.0/8 only. Not run on the secondary
Pythons (.ci/run ignores this directory there).

``peers`` holds what they share (routes, injection, log statuses),
``postfix`` and ``exim`` one peer each, ``bonzo_side`` Bonzo's side; the
fixtures are in ``conftest.py``. ``dovecot`` runs a private Dovecot LMTP
server for the outbound client's tests (``test_client_*``, which also use
Postfix's ``smtp-sink``). ``python3 -m interop`` (run in ``tests/``)
starts one peer by hand.
"""

"""Interoperability tests with real mail servers (Postfix, Exim) as Bonzo's
peers, each a private instance started and stopped by the test.

``peers`` holds what they share (routes, injection, log statuses),
``postfix`` and ``exim`` one peer each, ``bonzo_side`` Bonzo's side; the
fixtures are in ``conftest.py``. ``python3 -m interop`` (run in ``tests/``)
starts one peer by hand.
"""

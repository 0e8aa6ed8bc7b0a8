"""Fixtures shared by the bundled plugins' tests."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _no_unexpected_errors(caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest):
    """Fail a test that logs an ERROR it did not expect (mark it ``expect_errors``)."""
    caplog.set_level(logging.DEBUG)
    yield
    if request.node.get_closest_marker("expect_errors"):
        return
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, "unexpected errors logged: " + "; ".join(r.getMessage() for r in errors)


@pytest.fixture(autouse=True)
def _close_auth_envelopes():
    """Close the envelopes the mail-authentication tests made (their spools)."""
    yield
    from auth_testing import OPEN

    while OPEN:
        OPEN.pop().close()

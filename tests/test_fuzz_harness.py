"""The fuzzing harness (fuzz/protocol.py) runs without atheris: its seeds
and random inputs pass through the protocol core with every invariant held,
and its invariant checks catch what they are for."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PATH = Path(__file__).resolve().parent.parent / "fuzz" / "protocol.py"
spec = importlib.util.spec_from_file_location("fuzz_protocol", PATH)
assert spec is not None and spec.loader is not None
harness = importlib.util.module_from_spec(spec)
sys.modules["fuzz_protocol"] = harness
spec.loader.exec_module(harness)


@pytest.mark.parametrize("seed", harness.seeds())
def test_every_seed_runs_clean(seed):
    harness.one(seed)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(min_size=4, max_size=8),
    st.lists(
        st.sampled_from(
            [
                b"EHLO a\r\n",
                b"LHLO a\r\n",
                b"MAIL FROM:<a@b>\r\n",
                b"RCPT TO:<c@d>\r\n",
                b"DATA\r\n",
                b"BDAT 5\r\n",
                b"BDAT 0 LAST\r\n",
                b"x\r\n",
                b"x\ny\r",
                b".\r\n",
                b"\r\n.\r\n",
                b"RSET\r\n",
                b"HELP\r\n",
                b"NOOP\r\n",
                b"STARTTLS\r\n",
                b"AUTH PLAIN =\r\n",
                b"QUIT\r\n",
            ]
        ),
        max_size=30,
    ),
)
def test_random_sessions_keep_every_invariant(setup, commands):
    text = b"".join(commands)
    framed = b"".join(
        bytes([len(text[i : i + 50]) - 1]) + text[i : i + 50] for i in range(0, len(text), 50)
    )
    harness.one(setup[:4] + framed)


def test_the_checks_catch_what_they_are_for():
    assert harness.REPLIES.fullmatch(b"250 ok\r\n250-a\r\n250 b\r\n")
    assert not harness.REPLIES.fullmatch(b"250 ok\r\n250 cut")
    assert not harness.REPLIES.fullmatch(b"250 ok\n")
    assert not harness.REPLIES.fullmatch(b"ok\r\n")
    for bare in (b"a\nb", b"a\rb", b"a\r\r\nb", b"\n"):
        assert harness.BARE.search(bare), bare
    assert not harness.BARE.search(b"a\r\nb\r\n")

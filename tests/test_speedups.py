"""The C DATA scan (``bonzo._speedups.scan_data``) against the pure-Python
reference (``bonzo.protocol._scan_data_py``): the same ``(end, cut, flags)``
for every input.

CI builds the extension (``BONZO_EXTENSION=1``), so there a missing module
fails; elsewhere the C half is skipped and Bonzo runs on the Python scan.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_helpers import ScanData, c_scan_data

from bonzo.protocol import SCAN_BARE, SCAN_DOTS, SCAN_LONG, _scan_data_py

c_scan = c_scan_data()
needs_c = pytest.mark.skipif(c_scan is None, reason="bonzo._speedups is not built")
IMPLEMENTATIONS = [pytest.param(_scan_data_py, id="python")]
if c_scan is not None:
    IMPLEMENTATIONS.append(pytest.param(c_scan, id="c"))


@pytest.mark.parametrize("scan", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("data", "start", "line_start", "expected"),
    [
        # The final dot at once, after CRLF lines, and not after a bare LF.
        (b".\r\n", 0, True, (0, 0, 0)),
        (b"a\r\nb\r\n.\r\nQUIT\r\n", 0, True, (6, 6, 0)),
        (b"a\n.\r\n", 0, True, (-1, 5, SCAN_BARE)),
        # Not a line start: the dot is content.
        (b".\r\n", 0, False, (-1, 3, 0)),
        # A stuffed dot, first line and later lines; the incomplete tail stays.
        (b"..x\r\n", 0, True, (-1, 5, SCAN_DOTS)),
        (b"x\r\n..y\r\n.\r", 0, True, (-1, 8, SCAN_DOTS)),
        (b"x\r\n.", 0, True, (-1, 3, 0)),
        # Bare CR inside a CRLF line, bare LF, an empty bare-LF line.
        (b"a\rb\r\n", 0, True, (-1, 5, SCAN_BARE)),
        (b"\n", 0, True, (-1, 1, SCAN_BARE)),
        # Long lines: the LF counts.
        (b"abcd\r\n", 0, True, (-1, 6, 0)),
        (b"abcde\r\n", 0, True, (-1, 7, SCAN_LONG)),
        # From an offset, as the connection's buffer is scanned.
        (b"junk\r\n.\r\n", 6, True, (6, 6, 0)),
        (b"junk", 4, True, (-1, 4, 0)),
    ],
)
def test_scan_examples(scan: ScanData, data, start, line_start, expected):
    # max_line 6: "abcd\r\n" fits, "abcde\r\n" does not.
    assert scan(data, start, line_start, 6) == expected
    assert scan(bytearray(data), start, line_start, 6) == expected


content = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"..", b"a", b"xyz", b".\r\n"]), max_size=40
).map(b"".join)


@needs_c
@settings(max_examples=2000, deadline=None)
@given(
    data=content, start=st.integers(0, 60), line_start=st.booleans(), max_line=st.integers(1, 12)
)
def test_c_scan_equals_python_scan(data, start, line_start, max_line):
    start = min(start, len(data))
    buf = bytearray(data)
    assert c_scan(buf, start, line_start, max_line) == _scan_data_py(
        buf, start, line_start, max_line
    )


@needs_c
def test_c_scan_refuses_a_start_out_of_range():
    with pytest.raises(ValueError, match="start is out of range"):
        c_scan(b"abc", 4, True, 10)
    with pytest.raises(ValueError, match="start is out of range"):
        c_scan(b"abc", -1, True, 10)
    with pytest.raises(TypeError):
        c_scan("text", 0, True, 10)


def test_protocol_uses_the_c_scan_when_built():
    import bonzo.protocol

    if c_scan is None:
        assert bonzo.protocol._scan_data is _scan_data_py
    else:
        assert bonzo.protocol._scan_data is c_scan

"""The ``milter`` plugin against a real clamav-milter (with a real clamd).

The test starts a private ``clamd`` (foreground, TCP on 127.0.0.1) whose
database is one signature of our own that matches the EICAR test string,
so nothing is downloaded, and a private ``clamav-milter`` that asks it
about each message (``OnInfected Reject`` with a ``RejectMsg`` naming the
virus, so the milter answers with its own ``REPLYCODE``; ``AddHeader``
makes it add ``X-Virus-Status:`` through ``ADDHEADER``). Both are stopped
at the end.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .milters import Daemon, through_bonzo
from .peers import HOST, free_port, unavailable

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
HEADERS = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: clamav-milter interop\r\n"
    b"\r\n"
)


def binary(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not Path(path).is_file():
        unavailable(f"{name} is not installed (Debian packages clamav-daemon, clamav-milter)")
    return path


@pytest.fixture
def clamav_milter(tmp_path: Path) -> Iterator[Daemon]:
    clamd_bin, milter_bin = binary("clamd"), binary("clamav-milter")
    db = tmp_path / "db"
    db.mkdir()
    # Name:target type (0, any):offset (*, anywhere):hex of the bytes to find.
    (db / "bonzo-test.ndb").write_text(
        "Bonzo-Test-Eicar:0:*:" + b"EICAR-STANDARD-ANTIVIRUS-TEST-FILE".hex() + "\n"
    )
    clamd_port, milter_port = free_port(), free_port()
    (tmp_path / "clamd.conf").write_text(
        "Foreground yes\n"
        f"LogFile {tmp_path / 'clamd.log'}\n"
        f"DatabaseDirectory {db}\n"
        f"TCPSocket {clamd_port}\n"
        f"TCPAddr {HOST}\n"
        f"PidFile {tmp_path / 'clamd.pid'}\n"
    )
    (tmp_path / "milter.conf").write_text(
        "Foreground yes\n"
        f"MilterSocket inet:{milter_port}@{HOST}\n"
        f"ClamdSocket tcp:{HOST}:{clamd_port}\n"
        f"LogFile {tmp_path / 'milter.log'}\n"
        f"PidFile {tmp_path / 'milter.pid'}\n"
        "OnInfected Reject\n"
        'RejectMsg "Virus found: %v"\n'
        "OnClean Accept\n"
        "AddHeader Replace\n"
    )
    clamd = Daemon(
        "clamd", [clamd_bin, "-c", str(tmp_path / "clamd.conf")], clamd_port, tmp_path / "clamd.out"
    )
    milter = Daemon(
        "clamav-milter",
        [milter_bin, "-c", str(tmp_path / "milter.conf")],
        milter_port,
        tmp_path / "milter.out",
    )
    try:
        clamd.start(60)
        yield milter.start(30)
    finally:
        milter.stop()
        clamd.stop()


def test_clamav_milter_passes_clean_mail_and_refuses_a_virus(start_server, clamav_milter):
    clean = HEADERS + b"Nothing to see here.\r\n"
    infected = HEADERS + b"Attached:\r\n" + EICAR + b"\r\n"
    big_clean = HEADERS + b"".join(b"clean line %d\r\n" % i for i in range(20000))
    delivered, refused, big = through_bonzo(
        start_server, "clamav", clamav_milter.port, clean, infected, big_clean, content_timeout=30
    )
    assert isinstance(delivered, bytes) and isinstance(big, bytes)
    for content in (delivered, big):
        head = content.split(b"\r\n\r\n", 1)[0]
        assert b"\r\nX-Virus-Status: Clean\r\n" in head + b"\r\n", head
        assert b"X-Virus-Scanned: clamav-milter" in head
    assert delivered.endswith(b"\r\n\r\nNothing to see here.\r\n")
    # The milter's own reply (REPLYCODE), with the signature's name.
    code, text = refused  # type: ignore[misc]
    assert 500 <= code <= 599, refused
    assert b"Virus found: Bonzo-Test-Eicar" in text, refused

"""The ``queue`` plugin: its files, its runner (retries, expiry, reports,
claims), the reports themselves, and acceptance through the plugin hooks.

The runner is driven with a clock the tests move, so a five-day lifetime
takes no time. Transports here are the bundled ``maildir`` and ``discard``
ones and, for outcomes a local transport cannot produce on demand (a 5xx,
a 4xx then a 250), a scripted one."""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import errno
import io
import itertools
import json
import logging
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from email.utils import format_datetime, localtime
from pathlib import Path
from typing import Any

import pytest
from bonzo_plugins.queue import QueuePlugin
from bonzo_plugins.queue.bounce import ReportLine, build_report, wants_report
from bonzo_plugins.queue.plugin import parse_duration
from bonzo_plugins.queue.routes import DiscardTransport, Outcome, RouteTable
from bonzo_plugins.queue.runner import Runner, RunnerSettings, backoff
from bonzo_plugins.queue.spool import GroupSync, Recipient, Spool, SpoolError

from bonzo import Accept, errors, hookimpl
from bonzo.config import parse_config
from bonzo.hooks import PluginSet
from bonzo.testing import SessionTester

BODY = b"From: alice@example.org\r\nSubject: queued\r\n\r\nHello through the queue.\r\n"


class App:
    """What plugins get as ``app`` (a base directory, settings, plugins)."""

    def __init__(self, base: Path, plugins: PluginSet | None = None) -> None:
        self.base_dir = base
        self.plugins = plugins

        class _Settings:
            hostname = "mx.test"

        self.settings = _Settings()


def envelope(sender: str = "alice@example.org", *rcpts: str, **params: Any) -> dict[str, Any]:
    recipients = []
    for r in rcpts or ("bob@example.net",):
        local, _, domain = r.partition("@")
        recipients.append(
            {"address": r, "canonical": r.lower(), "domain": domain.lower(), "params": params}
        )
    return {
        "arrival": 1_000_000.0,
        "sender": sender,
        "mail_params": {},
        "recipients": recipients,
        "session": {"remote_ip": "192.0.2.1"},
        "records": {},
    }


def queued(spool: Spool, id: str, env: dict[str, Any], body: bytes = BODY) -> None:
    spool.write(id, env, b"", io.BytesIO(body))


# ------------------------------------------------------------------- spool
def test_a_message_is_stored_and_read_back_exactly(tmp_path):
    spool = Spool(tmp_path / "q")
    spool.setup()
    env = envelope("alice@example.org", "bob@example.net", "Carol@Example.NET", NOTIFY="FAILURE")
    spool.write("ABC1", env, b"Received: by test\r\n", io.BytesIO(BODY))
    message = spool.load("ABC1")
    assert message.read() == b"Received: by test\r\n" + BODY
    assert message.size == len(b"Received: by test\r\n" + BODY)
    assert [r.address for r in message.recipients] == ["bob@example.net", "Carol@Example.NET"]
    assert message.recipients[1].params == {"NOTIFY": "FAILURE"}
    assert [r.status for r in message.recipients] == ["pending", "pending"]
    assert message.due(1_000_000.0) == [0, 1]
    assert spool.ids() == ["ABC1"]
    assert oct(os.stat(spool.data / "ABC1").st_mode & 0o777) == "0o600"
    assert list(spool.tmp.iterdir()) == []


def test_state_is_saved_atomically_and_removed_with_the_message(tmp_path):
    spool = Spool(tmp_path / "q")
    spool.setup()
    queued(spool, "M1", envelope("a@example.org", "b@example.net", "c@example.net"))
    message = spool.load("M1")
    message.recipients[0].status = "delivered"
    message.recipients[1].status = "deferred"
    message.recipients[1].attempts = 2
    message.recipients[1].next_attempt = 5.0
    message.recipients[1].reply = "452 4.2.2 Mailbox full"
    message.held = True
    spool.save_state(message)
    again = spool.load("M1")
    assert [r.status for r in again.recipients] == ["delivered", "deferred"]
    assert again.recipients[1].reply == "452 4.2.2 Mailbox full"
    assert again.held and again.pending == [1] and again.next_due == 5.0
    assert [p.name for p in spool.state.iterdir()] == ["M1.json"]
    spool.remove("M1")
    assert spool.ids() == [] and list(spool.state.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"garbage", "not a queue file"),
        (b"BONZO-QUEUE 1\n{not json}\nbody", "bad envelope"),
        (b"BONZO-QUEUE 1\n{}\nbody", "bad envelope"),
        (b"BONZO-QUEUE 1\nno end of line", "envelope line missing"),
    ],
)
def test_a_corrupt_file_is_an_error_not_a_crash(tmp_path, content, problem):
    spool = Spool(tmp_path / "q")
    spool.setup()
    (spool.data / "BAD").write_bytes(content)
    with pytest.raises(SpoolError, match=problem):
        spool.load("BAD")
    assert list(spool.iter_messages()) == []


def test_setup_removes_what_a_dead_writer_left(tmp_path):
    spool = Spool(tmp_path / "q")
    spool.setup()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (spool.tmp / f"X1.{dead.stdout.strip()}").write_bytes(b"partial")
    (spool.tmp / f"X2.{os.getppid()}").write_bytes(b"a live writer's")
    assert spool.setup() == 1
    assert [p.name for p in spool.tmp.iterdir()] == [f"X2.{os.getppid()}"]


def test_a_claim_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path):
    spool = Spool(tmp_path / "q")
    spool.setup()
    queued(spool, "C1", envelope())
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fcntl, os, sys, time
                fd = os.open({str(spool.data / "C1")!r}, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("held", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert spool.claim("C1") is None
        assert spool.claim("C1", wait=0.2) is None
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    claim = spool.claim("C1", wait=5)
    assert claim is not None
    assert spool.claim("C1") is None  # also within one process
    claim.release()
    again = spool.claim("C1")
    assert again is not None
    again.release()
    assert spool.claim("nope") is None and spool.claim("../etc") is None


def test_group_sync_shares_directory_fsyncs(tmp_path):
    spool = Spool(tmp_path / "q")
    spool.setup()
    sync = GroupSync(spool.data)

    async def main() -> None:
        await asyncio.gather(*(sync.sync() for _ in range(50)))

    asyncio.run(main())
    # Every caller waited for an fsync that began after it asked; 50 callers
    # at once need two, not fifty.
    assert 1 <= sync.count <= 2


def test_group_sync_shares_fsyncs_between_threads_and_reports_a_failure(tmp_path, monkeypatch):
    import threading
    import time

    from bonzo import durable

    spool = Spool(tmp_path / "q")
    spool.setup()
    sync = GroupSync(spool.data)
    real = durable.commit_files

    def slow(*args: Any) -> Any:
        time.sleep(0.05)  # the others arrive while this batch runs
        return real(*args)

    monkeypatch.setattr(durable, "commit_files", slow)
    barrier = threading.Barrier(20)
    served: list[float] = []

    def writer() -> None:
        barrier.wait()
        sync.committer.sync_blocking(str(spool.data))
        served.append(time.monotonic())

    threads = [threading.Thread(target=writer) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(served) == 20 and 1 <= sync.count <= 2

    calls = []

    def broken(fds: Any, tmps: Any, finals: Any, dirs: Any) -> Any:
        calls.append(dirs)
        if len(calls) == 1:
            return [], [errno.EIO] * len(dirs)
        return real(fds, tmps, finals, dirs)

    monkeypatch.setattr(durable, "commit_files", broken)
    with pytest.raises(OSError, match="Input/output error"):
        sync.committer.sync_blocking(str(spool.data))
    sync.committer.sync_blocking(str(spool.data))  # the next request gets its own fsync
    assert len(calls) == 2


def test_a_message_written_under_its_claim_is_handed_over_as_loaded(tmp_path):
    spool = Spool(tmp_path / "q")
    spool.setup()
    sync = GroupSync(spool.data)
    env = envelope("alice@example.org", "bob@example.net", NOTIFY="FAILURE")
    env["records"] = {"session": {"spf": ["pass", 1]}, "envelope": {}}
    claim, message = asyncio.run(
        spool.accept("W1", env, b"Received: x\r\n", io.BytesIO(BODY), sync, in_thread=False)
    )
    assert sync.count == 1  # durable before the caller hears of it
    assert spool.claim("W1") is None  # held by the writer
    loaded = spool.load("W1")
    assert message == loaded  # exactly what reading it back gives
    assert message.read() == b"Received: x\r\n" + BODY and not message.has_state
    claim.release()
    again = spool.claim("W1")
    assert again is not None
    again.release()


@pytest.mark.expect_errors
@pytest.mark.parametrize("where", ["loop", "loop, large"])
def test_a_failed_directory_fsync_leaves_no_copy(tmp_path, monkeypatch, where):
    from bonzo import durable

    spool = Spool(tmp_path / "q")
    spool.setup()
    real = durable.commit_files

    def broken(fds: Any, tmps: Any, finals: Any, dirs: Any) -> Any:
        errors, _ = real(fds, tmps, finals, [])
        return errors, [errno.EIO] * len(dirs)

    monkeypatch.setattr(durable, "commit_files", broken)
    with pytest.raises(OSError, match="Input/output error"):

        async def main() -> None:
            sync = GroupSync(spool.data)
            try:
                await spool.accept("F1", envelope(), b"", io.BytesIO(BODY),
                                   sync, in_thread="large" in where)  # fmt: skip
            finally:
                sync.close()  # as the plugin at shutdown: the spare new files go

        asyncio.run(main())
    # The client is told 4xx and sends it again: no copy may be delivered.
    assert list(spool.tmp.iterdir()) == [] and list(spool.data.iterdir()) == []


def test_a_cancelled_acceptance_leaves_no_copy(tmp_path, monkeypatch):
    import time

    from bonzo import durable

    spool = Spool(tmp_path / "q")
    spool.setup()
    real = durable.commit_files

    def slow(*args: Any) -> Any:
        time.sleep(0.2)
        return real(*args)

    monkeypatch.setattr(durable, "commit_files", slow)

    async def main() -> None:
        sync = GroupSync(spool.data)
        for in_thread in (False, True):
            task = asyncio.ensure_future(
                spool.accept(
                    f"C{int(in_thread)}",
                    envelope(),
                    b"",
                    io.BytesIO(BODY),
                    sync,
                    in_thread=in_thread,
                )  # fmt: skip
            )
            await asyncio.sleep(0.05)
            task.cancel()  # the hook's time ran out
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.sleep(0.6)  # the commits finish, then are undone
        sync.close()  # as the plugin at shutdown: the spare new files go

    asyncio.run(main())
    assert list(spool.tmp.iterdir()) == [] and list(spool.data.iterdir()) == []


# ----------------------------------------------------------------- reports
def report_message(tmp_path: Path, **mail_params: str) -> Any:
    spool = Spool(tmp_path / "q")
    spool.setup()
    env = envelope("alice@example.org", "bob@example.net", "carol@example.net",
                   ORCPT="rfc822;Bob+2BX@example.net")  # fmt: skip
    env["mail_params"] = mail_params
    queued(spool, "R1", env)
    return spool.load("R1")


def test_a_failure_report_is_rfc3464(tmp_path):
    message = report_message(tmp_path, ENVID="QQ+2B1")
    line = ReportLine(message.recipients[0], "failed", "5.1.1",
                      "550 5.1.1 No such user", "mx.example.net")  # fmt: skip
    raw = build_report(message, [line], "mx.test", now=1_000_100.0)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert b"\r\nTo: <alice@example.org>\r\n" in raw
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    human, status, original = parsed.get_payload()
    assert "550 5.1.1 No such user" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert per_message["Original-Envelope-Id"] == "QQ+1"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_recipient["Original-Recipient"] == "rfc822; Bob+X@example.net"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.example.net"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert original.get_content_type() == "message/rfc822"
    # The original comes back byte for byte.
    assert raw.endswith(BODY + b"--" + raw.rsplit(b"--", 2)[1] + b"--\r\n")
    assert BODY in raw
    # All ASCII: labelled 7bit, the message and each of its parts.
    assert [parsed["Content-Transfer-Encoding"], human["Content-Transfer-Encoding"],
            original["Content-Transfer-Encoding"]] == ["7bit"] * 3  # fmt: skip
    assert b"8bit" not in raw


def test_a_report_about_a_utf8_address_uses_the_global_types(tmp_path):
    """RFC 6533: UTF-8 in the fields (utf-8 address type, raw) only in a
    message/global-delivery-status part; a returned header section in
    UTF-8 as message/global, or message/global-headers."""
    spool = Spool(tmp_path / "q")
    spool.setup()
    body = "From: jösé@example.org\r\nSubject: hé\r\n\r\nBody.\r\n".encode()
    queued(spool, "U1", envelope("jösé@example.org", "permü@dest.test"), body)
    message = spool.load("U1")
    line = ReportLine(message.recipients[0], "failed", "5.1.1",
                      "550 5.1.1 no such user permü@dest.test", "mx.example.net")  # fmt: skip
    raw = build_report(message, [line], "mx.test", now=1_000_100.0)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_param("report-type") == "delivery-status"
    _, status, original = parsed.get_payload()
    assert status.get_content_type() == "message/global-delivery-status"
    # Raw UTF-8, so labelled 8bit (7bit is the default, RFC 2045 6.1).
    assert status["Content-Transfer-Encoding"] == "8bit"
    assert parsed["Content-Transfer-Encoding"] == original["Content-Transfer-Encoding"] == "8bit"
    assert b"Final-Recipient: utf-8; perm\xc3\xbc@dest.test\r\n" in raw
    assert original.get_content_type() == "message/global"
    assert raw.endswith(body + b"--" + raw.rsplit(b"--", 2)[1] + b"--\r\n")
    # Too large to return whole; its header section fits.
    headers_only = build_report(message, [line], "mx.test", size_limit=len(body) - 1)
    assert b"Content-Type: message/global-headers\r\n" in headers_only
    # All ASCII: the RFC 3464 types, as before.
    plain = report_message(tmp_path / "p")
    raw = build_report(plain, [ReportLine(plain.recipients[0], "failed", "5.1.1", "550 no", "h")],
                       "mx.test")  # fmt: skip
    assert b"Content-Type: message/delivery-status\r\n" in raw
    assert b"Content-Type: message/rfc822\r\n" in raw


def test_the_7bit_form_of_a_report_whose_returned_headers_hold_utf8_leaves_them_out(tmp_path):
    """A report to a server without 8BITMIME (seven_bit): a header section in
    UTF-8 has no faithful 7-bit form, so the report goes without it (RFC 6522
    3: the returned part is optional) rather than not at all."""
    from bonzo_plugins.queue.bounce import seven_bit

    spool = Spool(tmp_path / "q")
    spool.setup()
    body = "From: a@example.org\r\nSubject: h\u00e9\r\n\r\nBody.\r\n".encode()
    queued(spool, "U2", envelope("a@example.org", "perm\u00fc@dest.test"), body)
    message = spool.load("U2")
    line = ReportLine(message.recipients[0], "failed", "5.1.1", "550 5.1.1 no such user", "h")
    raw = build_report(message, [line], "mx.test", now=1_000_100.0)
    seven = seven_bit(raw)
    assert seven is not None and seven.isascii()
    parsed = email.message_from_bytes(seven, policy=email.policy.default)
    assert not parsed.defects
    kinds = [p.get_content_type() for p in parsed.get_payload()]
    assert kinds == ["text/plain", "message/delivery-status"]
    text = parsed.get_payload()[0].get_content()
    assert "its header section holds characters beyond ASCII" in " ".join(text.split())
    assert b"Final-Recipient: utf-8; perm\\x{FC}@dest.test\r\n" in seven
    assert b"Subject: h" not in seven
    assert seven_bit(seven) is None  # 7-bit already


@pytest.mark.parametrize(
    "orcpt, shown",
    [
        # Postfix's form: UTF-8 octets in xtext, rfc822 type.
        ("rfc822;j+C3+B6rg@b+C3+BCcher.example", "utf-8; jörg@bücher.example"),
        # RFC 6533's raw form, read back from a queue file.
        ("utf-8;jörg@bücher.example", "utf-8; jörg@bücher.example"),
    ],
)
def test_a_utf8_original_recipient_is_reported_as_a_utf8_address(tmp_path, orcpt, shown):
    spool = Spool(tmp_path / "q")
    spool.setup()
    env = envelope("alice@example.org", "jörg@xn--bcher-kva.example", ORCPT=orcpt,
                   NOTIFY="SUCCESS,FAILURE")  # fmt: skip
    env["mail_params"] = {"SMTPUTF8": None}
    queued(spool, "U2", env)
    message = spool.load("U2")
    assert wants_report(message.recipients[0], "delivered")  # NOTIFY read, not dropped
    line = ReportLine(message.recipients[0], "failed", "5.1.1", "550 no", "mx.example.net")
    raw = build_report(message, [line], "mx.test", now=1_000_100.0)
    assert f"\r\nOriginal-Recipient: {shown}\r\n".encode() in raw
    assert b"Content-Type: message/global-delivery-status\r\n" in raw


@pytest.mark.parametrize(
    "action, given, shown",
    [("failed", "5", "5.0.0"), ("failed", "", "5.0.0"), ("delayed", "", "4.0.0"),
     ("delivered", "", "2.0.0"), ("failed", "5.1.1", "5.1.1")],
)  # fmt: skip
def test_a_report_status_is_always_class_subject_detail(tmp_path, action, given, shown):
    # A downstream reply without an enhanced code ("550 no such user here")
    # still gives an RFC 3464 Status, the class's "other".
    message = report_message(tmp_path)
    line = ReportLine(message.recipients[0], action, given, "550 no such user here", "mx.test")
    raw = build_report(message, [line], "mx.test", now=1_000_100.0)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    per_recipient = parsed.get_payload()[1].get_payload()[1]
    assert per_recipient["Status"] == shown


def test_an_outcome_reply_without_an_enhanced_code_has_no_double_space():
    from bonzo_plugins.queue.outcome import Outcome

    assert Outcome("failed", 550, "", "no such user").reply == "550 no such user"
    assert Outcome("failed", 550, "5.1.1", "no").reply == "550 5.1.1 no"


def test_headers_only_for_ret_hdrs_and_for_large_messages(tmp_path):
    message = report_message(tmp_path, RET="HDRS")
    line = ReportLine(message.recipients[0], "failed", "5.1.1", "550 5.1.1 No", "h")
    raw = build_report(message, [line], "mx.test")
    parts = email.message_from_bytes(raw, policy=email.policy.default).get_payload()
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert b"Hello through the queue" not in raw and b"Subject: queued" in raw
    message = report_message(tmp_path / "b")
    raw = build_report(message, [line], "mx.test", size_limit=10)
    assert b"Hello through the queue" not in raw


def _report_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n")[:-1]


@pytest.mark.parametrize(
    ("body", "params", "why"),
    [
        (b"Subject: bin\r\n\r\nok\r\n", {"BODY": "binarymime"}, b"BODY=BINARYMIME"),
        (b"Subject: bin\r\n\r\n" + b"A" * 20000 + b"\r\n", {}, b"longer than 998"),
        (b"Subject: bin\r\n\r\n" + b"A" * 998 + b"\r\n\x00\r\n", {}, b"NUL"),
        (b"Subject: bin\r\n\r\nbare\nlf\r\n", {"BODY": "8BITMIME"}, b"bare CR or LF"),
        (b"Subject: bin\r\n\r\nbare\rcr\r\n", {}, b"bare CR or LF"),
    ],
    ids=["binarymime", "long-line", "nul", "bare-lf", "bare-cr"],
)
def test_a_message_that_is_not_text_comes_back_as_its_headers(tmp_path, body, params, why):
    """A report is sent BODY=8BITMIME (runner.inject): a binary original
    (BINARYMIME, NULs, bare CR/LF, lines over 998 octets, RFC 5321
    4.5.3.1.6, RFC 6152) would be refused on the way and, the report having
    the null sender, lost. Only its header section is returned, and the
    human-readable part says why."""
    spool = Spool(tmp_path / "q")
    spool.setup()
    env = envelope()
    env["mail_params"] = params
    queued(spool, "B1", env, body)
    message = spool.load("B1")
    line = ReportLine(message.recipients[0], "failed", "5.6.3", "554 5.6.3 no binary", "h")
    raw = build_report(message, [line], "mx.test")
    human, _, returned = email.message_from_bytes(raw, policy=email.policy.default).get_payload()
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Subject: bin\r\n" in raw and body.partition(b"\r\n\r\n")[2] not in raw
    assert "Only the header section of your message is returned" in human.get_content()
    assert why in raw.replace(b"\r\n", b" ")
    assert b"\x00" not in raw
    assert all(len(x) <= 998 and b"\r" not in x and b"\n" not in x for x in _report_lines(raw))
    # The same message as text is returned whole.
    text = b"Subject: txt\r\n\r\n" + b"A" * 998 + b"\r\n\xc3\xa9\r\n"
    queued(spool, "T1", envelope(), text)
    message = spool.load("T1")
    raw = build_report(message, [ReportLine(message.recipients[0], "failed", "5.1.1")], "mx.test")
    assert raw.endswith(text + b"--" + raw.rsplit(b"--", 2)[1] + b"--\r\n")
    assert b"Only the header section" not in raw


def test_a_header_section_that_is_not_text_is_made_so(tmp_path):
    # BDAT holds a client to no line rules, in the header section either.
    spool = Spool(tmp_path / "q")
    spool.setup()
    env = envelope()
    env["mail_params"] = {"BODY": "BINARYMIME"}
    queued(spool, "H1", env, b"Subject: a\x00b\r\nX-Long: " + b"x" * 3000 + b"\r\n\r\nbody\r\n")
    message = spool.load("H1")
    raw = build_report(message, [ReportLine(message.recipients[0], "failed", "5.6.3")], "mx.test")
    assert b"Subject: a b\r\nX-Long: " + b"x" * 990 + b"\r\n" in raw
    assert b"\x00" not in raw and all(len(x) <= 998 for x in _report_lines(raw))
    assert b"replaced or cut" in raw


def test_bounce_size_limit_bounds_a_returned_header_section(tmp_path):
    """The header section returned in place of a message is no larger than
    bounce_size_limit either, and cut before a whole field (a folded one
    too), never in the middle of a line."""
    spool = Spool(tmp_path / "q")
    spool.setup()
    pad = b"".join(b"X-Pad-%04d: %s\r\n\t%s\r\n" % (i, b"p" * 400, b"q" * 500) for i in range(900))
    body = b"From: alice@example.org\r\nSubject: big headers\r\n" + pad + b"\r\nbody\r\n"
    env = envelope()
    env["mail_params"] = {"RET": "HDRS"}
    queued(spool, "L1", env, body)
    message = spool.load("L1")
    line = ReportLine(message.recipients[0], "failed", "5.1.1", "550 5.1.1 No", "h")
    raw = build_report(message, [line], "mx.test", size_limit=10_000)
    assert len(raw) < 10_000 + 4_000
    human, _, returned = email.message_from_bytes(raw, policy=email.policy.default).get_payload()
    section = raw.split(b"Content-Transfer-Encoding: 7bit\r\n\r\n")[-1].rsplit(b"--", 2)[0]
    assert 9_000 < len(section) <= 10_000
    assert body.startswith(section)
    assert section.endswith(b"q" * 500 + b"\r\n")  # after a whole folded field
    assert f"only its first {len(section)} octets" in human.get_content().replace("\n", " ")
    # A first field longer than the limit: cut at a line end all the same.
    section, whole = message.header_section(100)
    assert (section, whole) == (b"From: alice@example.org\r\nSubject: big headers\r\n", False)
    assert message.header_section(10) == (b"", False)
    # One that fits, with the empty line that ends it.
    assert message.header_section(len(body)) == (body[: body.index(b"\r\n\r\n") + 4], True)


def test_the_report_boundary_is_at_most_70_characters(tmp_path):
    """RFC 2046 5.1.1, whatever the host name's length."""
    message = report_message(tmp_path)
    line = ReportLine(message.recipients[0], "failed", "5.1.1", "550 5.1.1 No", "h")
    host = "ip-172-31-22-108.eu-west-1.compute.internal." + "a" * 60
    parsed = email.message_from_bytes(build_report(message, [line], host))
    assert len(parsed.get_boundary()) <= 70
    message.id = "X" * 64  # the longest queue id
    parsed = email.message_from_bytes(build_report(message, [line], host))
    assert len(parsed.get_boundary()) <= 70
    assert len(parsed.get_payload()) == 3


def test_report_lines_stay_within_998_octets_in_utf8(tmp_path):
    message = report_message(tmp_path)
    line = ReportLine(message.recipients[0], "failed", "5.1.1", "550 5.1.1 " + "\u00e9" * 900, "h")
    raw = build_report(message, [line], "mx.test")
    assert all(len(x) <= 998 for x in _report_lines(raw))
    raw.decode("utf-8")  # no character cut in half


@pytest.mark.parametrize(
    ("notify", "action", "wanted"),
    [
        (None, "failed", True),
        (None, "delayed", True),
        (None, "delivered", False),
        ("NEVER", "failed", False),
        ("SUCCESS", "delivered", True),
        ("SUCCESS", "relayed", True),
        ("SUCCESS", "failed", False),
        ("FAILURE,DELAY", "delayed", True),
        ("failure", "failed", True),
    ],
)
def test_notify_decides_which_reports_are_sent(notify, action, wanted):
    params = {} if notify is None else {"NOTIFY": notify}
    recipient = Recipient("b@example.net", "b@example.net", "example.net", params)
    assert wants_report(recipient, action) is wanted


# ------------------------------------------------------------------ runner
class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Scripted:
    """Outcomes given in advance, per recipient address (a downstream's
    replies, for the runner's logic; real downstreams are in the interop
    and delivery tests)."""

    kind = "scripted"
    final = False

    def __init__(self, script: dict[str, list[Outcome]]) -> None:
        self.script = script
        self.calls: list[list[str]] = []

    def destination(self, recipient: Recipient) -> str:
        return recipient.domain

    async def deliver(self, message: Any, recipients: Sequence[Recipient]) -> list[Outcome]:
        self.calls.append([r.address for r in recipients])
        return [self.script[r.address].pop(0) for r in recipients]

    async def close(self) -> None:
        pass


class StallsS0(Scripted):
    """Delivers every recipient (``OK``), but the delivery of message ``S0``
    waits for :attr:`release`; :attr:`started` lists the attempts by id."""

    def __init__(self) -> None:
        super().__init__({})
        self.release = asyncio.Event()
        self.started: list[str] = []

    async def deliver(self, message: Any, recipients: Sequence[Recipient]) -> list[Outcome]:
        self.started.append(message.id)
        if message.id == "S0":
            await self.release.wait()
        return [OK for _ in recipients]


# Replies the downstream server gave (remote), as the SMTP transport makes them.
OK = Outcome("delivered", 250, "2.0.0", "Ok", "mx.example.net", relayed=True, remote=True)
DEFER = Outcome("deferred", 451, "4.3.0", "Try later", "mx.example.net", remote=True)
GONE = Outcome("failed", 550, "5.1.1", "No such user", "mx.example.net", remote=True)
# Decided here: no server answered (a DNS failure, as the mx route makes it).
NO_DOMAIN = Outcome("failed", 550, "5.1.2", "example.net: no such domain", "example.net")
LOCAL_DEFER = Outcome.deferred(451, "4.4.4", "No mail host could be reached", "dns")


def make_runner(tmp_path: Path, transport: Any, plugins: PluginSet | None = None, **settings: Any):
    spool = Spool(tmp_path / "q")
    spool.setup()
    routes = RouteTable({}, {}, App(tmp_path))
    routes.default = transport
    clock = Clock()
    runner = Runner(spool, GroupSync(spool.data), routes, plugins,
                    RunnerSettings(hostname="mx.test", **settings), clock=clock)  # fmt: skip
    return spool, runner, clock


def reports(spool: Spool) -> list[Any]:
    out = []
    for message in spool.iter_messages():
        if message.sender == "":
            out.append(message)
    return out


def final_recipients(report: Any) -> list[str]:
    """The ``Final-Recipient`` fields of a queued report, in order."""
    parsed = email.message_from_bytes(report.read(), policy=email.policy.default)
    return [p["Final-Recipient"] for p in parsed.get_payload()[1].get_payload()[1:]]


def test_delivered_messages_leave_the_queue(tmp_path):
    transport = Scripted({"bob@example.net": [OK]})
    spool, runner, clock = make_runner(tmp_path, transport)
    queued(spool, "D1", envelope())
    asyncio.run(runner.attempt("D1"))
    assert transport.calls == [["bob@example.net"]]
    assert spool.ids() == []


def test_a_bare_postmaster_queued_by_an_earlier_version_goes_to_the_postmaster(tmp_path):
    """A message queued with the bare ``<postmaster>`` (domain ``""``, which
    no route matched: it waited for ever) is delivered as the postmaster's
    address, with ``ORCPT`` naming what the client wrote."""

    class Recording(Scripted):
        seen: list[Recipient] = []

        async def deliver(self, message: Any, recipients: Sequence[Recipient]) -> list[Outcome]:
            self.seen.extend(recipients)
            return await super().deliver(message, recipients)

    transport = Recording({"postmaster@example.org": [OK]})
    spool, runner, clock = make_runner(tmp_path, transport, postmaster="postmaster@example.org")
    env = envelope()
    env["recipients"] = [
        {"address": "PostMaster", "canonical": "postmaster", "domain": "", "params": {}}
    ]
    queued(spool, "P1", env)
    asyncio.run(runner.attempt("P1"))
    assert transport.calls == [["postmaster@example.org"]]
    [seen] = transport.seen
    assert (seen.canonical, seen.domain) == ("postmaster@example.org", "example.org")
    assert seen.params == {"ORCPT": "rfc822;PostMaster"}
    assert spool.ids() == []


def test_deferred_recipients_back_off_then_are_delivered(tmp_path):
    transport = Scripted({"bob@example.net": [DEFER, DEFER, OK], "eve@example.net": [OK]})
    spool, runner, clock = make_runner(tmp_path, transport, min_backoff=300, max_backoff=500)
    queued(spool, "D2", envelope("a@example.org", "bob@example.net", "eve@example.net"))

    async def main() -> None:
        await runner.attempt("D2")
        message = spool.load("D2")
        assert [r.status for r in message.recipients] == ["deferred", "delivered"]
        assert message.recipients[0].next_attempt == clock.now + 300
        await runner.attempt("D2")  # not due yet: nothing happens
        assert len(transport.calls) == 1
        clock.now += 300
        await runner.attempt("D2")
        assert spool.load("D2").recipients[0].next_attempt == clock.now + 500  # capped
        clock.now += 500
        await runner.attempt("D2")

    asyncio.run(main())
    # The delivered recipient is never tried again.
    assert transport.calls == [
        ["bob@example.net", "eve@example.net"],
        ["bob@example.net"],
        ["bob@example.net"],
    ]
    assert spool.ids() == []


TOO_MANY = Outcome("deferred", 452, "4.5.3", "Too many recipients", "mx.example.net",
                   remote=True, too_many=True)  # fmt: skip


def test_recipients_past_the_servers_limit_go_in_a_new_transaction_at_once(tmp_path, caplog):
    """A server that takes only so many recipients per transaction (452
    4.5.3, or 552 as RFC 5321 4.5.3.1.10 tells clients to read it): the
    rest are tried again at once, not after a back-off, and never bounced."""
    transport = Scripted(
        {"a@example.net": [OK], "b@example.net": [OK], "c@example.net": [TOO_MANY, OK]}
    )
    spool, runner, clock = make_runner(tmp_path, transport, min_backoff=300)
    queued(spool, "T1", envelope("s@example.org", "a@example.net", "b@example.net",
                                 "c@example.net"))  # fmt: skip

    async def main() -> None:
        await runner.attempt("T1")
        c = spool.load("T1").recipients[2]
        assert c.next_attempt == clock.now
        # No attempt: the round does not grow a later back-off.
        assert c.attempts == 0 and c.reply == "452 4.5.3 Too many recipients"
        await runner.attempt("T1")  # due now: the clock has not moved

    with caplog.at_level(logging.INFO, logger="bonzo.plugins.queue"):
        asyncio.run(main())
    assert transport.calls == [["a@example.net", "b@example.net", "c@example.net"],
                               ["c@example.net"]]  # fmt: skip
    assert spool.ids() == [] and reports(spool) == []
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "T1 to=<c@example.net> not taken in this transaction: 452 4.5.3" in text
    assert "deferred" not in text
    # A real deferral after such a round backs off as after a first attempt.
    transport = Scripted({"e@example.net": [OK], "f@example.net": [TOO_MANY, DEFER]})
    spool, runner, clock = make_runner(tmp_path / "3", transport, min_backoff=300)
    queued(spool, "T3", envelope("s@example.org", "e@example.net", "f@example.net"))

    async def twice() -> None:
        await runner.attempt("T3")
        await runner.attempt("T3")

    asyncio.run(twice())
    f = spool.load("T3").recipients[1]
    assert (f.attempts, f.next_attempt) == (1, clock.now + 300)
    # Refused at the first recipient, it is an ordinary deferral (no loop).
    transport = Scripted({"d@example.net": [TOO_MANY]})
    spool, runner, clock = make_runner(tmp_path / "2", transport, min_backoff=300)
    queued(spool, "T2", envelope("s@example.org", "d@example.net"))
    asyncio.run(runner.attempt("T2"))
    assert spool.load("T2").recipients[0].next_attempt == clock.now + 300


def test_an_operators_bounce_is_no_attempt_in_the_report(tmp_path):
    """bonzo queue bounce (Runner.give_up): Last-Attempt-Date is the last
    real attempt, and absent for a recipient never tried (RFC 3464 2.3.7)."""
    transport = Scripted({"bob@example.net": [DEFER]})
    spool, runner, clock = make_runner(tmp_path, transport, min_backoff=300)
    queued(spool, "G1", envelope("a@example.org", "bob@example.net", "carol@example.net"))
    message = spool.load("G1")
    message.recipients[1].status = "deferred"  # carol: not due before the bounce
    message.recipients[1].next_attempt = 2e9
    spool.save_state(message)
    clock.now = 1_000_050.0
    asyncio.run(runner.attempt("G1"))
    assert transport.calls == [["bob@example.net"]]
    clock.now = 1_000_900.0
    assert asyncio.run(runner.give_up("G1", "Removed by the postmaster")) not in (None, "")
    [report] = reports(spool)
    parsed = email.message_from_bytes(report.read(), policy=email.policy.default)
    bob, carol = parsed.get_payload()[1].get_payload()[1:]
    tried = datetime.datetime.fromtimestamp(1_000_050.0, datetime.timezone.utc)
    assert bob["Last-Attempt-Date"] == format_datetime(localtime(tried))
    assert carol["Last-Attempt-Date"] is None
    assert "Removed by the postmaster" in carol["Diagnostic-Code"]


def test_backoff_doubles_up_to_the_maximum():
    settings = RunnerSettings(min_backoff=300, max_backoff=4000)
    assert [backoff(n, settings) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]


def test_a_refusal_bounces_with_one_report_per_attempt(tmp_path):
    transport = Scripted(
        {"bob@example.net": [GONE], "carol@example.net": [GONE], "dan@example.net": [OK]}
    )
    spool, runner, clock = make_runner(tmp_path, transport)
    queued(spool, "B1", envelope("alice@example.org", "bob@example.net", "carol@example.net",
                                 "dan@example.net"))  # fmt: skip
    asyncio.run(runner.attempt("B1"))
    assert "B1" not in spool.ids()
    [report] = reports(spool)
    assert [r.address for r in report.recipients] == ["alice@example.org"]
    assert final_recipients(report) == ["rfc822; bob@example.net", "rfc822; carol@example.net"]


def test_failures_at_several_destinations_make_one_report_per_attempt(tmp_path):
    """A recipient whose domain does not exist fails at once, another's server
    refuses later, a third is delivered in between: the sender gets one
    failure report naming both, as from Postfix (one per destination before)."""

    class Staggered(Scripted):
        def destination(self, recipient: Recipient) -> str:
            return recipient.domain

        async def deliver(self, message: Any, recipients: Sequence[Recipient]) -> list[Outcome]:
            delay = {"example.com": 0.0, "example.org": 0.05, "example.net": 0.1}
            await asyncio.sleep(delay[recipients[0].domain])
            return await super().deliver(message, recipients)

    transport = Staggered(
        {"a@example.com": [NO_DOMAIN], "b@example.org": [OK], "c@example.net": [GONE]}
    )
    spool, runner, clock = make_runner(tmp_path, transport)
    queued(spool, "M1", envelope("s@example.org", "a@example.com", "b@example.org",
                                 "c@example.net"))  # fmt: skip
    asyncio.run(runner.attempt("M1"))
    assert "M1" not in spool.ids()
    [report] = reports(spool)
    assert final_recipients(report) == ["rfc822; a@example.com", "rfc822; c@example.net"]


def test_a_failure_held_for_the_attempts_report_is_tried_again_after_a_stop(tmp_path):
    """A stop while other destinations still deliver: the refused recipient
    is neither saved as bounced nor reported (its report would have gone
    with the attempt's), so the next attempt tries it again; the delivered
    one is saved as delivered (never delivered twice)."""

    class Stalls(Scripted):
        started = asyncio.Event()

        async def deliver(self, message: Any, recipients: Sequence[Recipient]) -> list[Outcome]:
            if recipients[0].domain == "example.net":
                self.started.set()
                await asyncio.sleep(60)
            return await super().deliver(message, recipients)

    transport = Stalls({"a@example.com": [GONE], "b@example.org": [OK]})
    spool, runner, clock = make_runner(tmp_path, transport)
    queued(spool, "M2", envelope("s@example.org", "a@example.com", "b@example.org",
                                 "c@example.net"))  # fmt: skip

    async def main() -> None:
        task = asyncio.ensure_future(runner.attempt("M2"))
        await asyncio.wait_for(transport.started.wait(), 5)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert reports(spool) == []
    a, b, c = spool.load("M2").recipients
    assert (a.status, b.status, c.status) == ("pending", "delivered", "pending")


def test_a_failed_write_is_tried_again_by_the_next_group_even_if_its_failures_wait(
    tmp_path, caplog
):
    """An early group's state write fails once (the disk full for a moment);
    the next group's outcomes are all failures, held for the attempt's one
    report: its end still tries the write again at once, rather than leave it
    to min_backoff with the message held."""

    class Staggered(Scripted):
        async def deliver(self, message: Any, recipients: Sequence[Recipient]) -> list[Outcome]:
            await asyncio.sleep({"example.com": 0.0, "example.net": 0.2}[recipients[0].domain])
            return await super().deliver(message, recipients)

    transport = Staggered({"a@example.com": [OK], "c@example.net": [GONE]})
    spool, runner, clock = make_runner(tmp_path, transport, min_backoff=30)
    queued(spool, "W1", envelope("s@example.org", "a@example.com", "c@example.net"))
    real, fails = spool.write_state, [1]

    def flaky(*args: Any) -> Any:
        if fails:
            fails.pop()
            raise OSError(28, "No space left on device")
        return real(*args)

    spool.write_state = flaky  # type: ignore[method-assign]

    async def main() -> None:
        await asyncio.wait_for(runner.attempt("W1"), 10)

    asyncio.run(main())
    assert "W1" not in spool.ids()
    assert len(reports(spool)) == 1
    assert "delivery state saved after a failed try" in caplog.text
    assert "cannot save the delivery state" not in caplog.text


def test_a_report_to_a_utf8_sender_is_sent_with_smtputf8(tmp_path):
    """RFC 6531 3.2: the report's envelope and To: field hold the sender's
    UTF-8 address, so it is declared SMTPUTF8 (without, the client would
    not send it and the report would be lost); UTF-8 only inside the
    report's parts (a returned message/global) needs 8BITMIME alone."""
    from bonzo_plugins.queue.transports import _send_options

    transport = Scripted({"bob@example.net": [GONE], "carol@example.net": [GONE]})
    spool, runner, clock = make_runner(tmp_path, transport)
    queued(spool, "G1", envelope("jösé@example.org", "bob@example.net"))
    utf8_body = "From: jösé@example.org\r\nSubject: hé\r\n\r\nBody.\r\n".encode()
    queued(spool, "G2", envelope("alice@example.org", "carol@example.net"), utf8_body)
    asyncio.run(runner.attempt("G1"))
    asyncio.run(runner.attempt("G2"))
    by_sender = {r.recipients[0].address: r for r in reports(spool)}
    to_utf8 = by_sender["jösé@example.org"]
    assert to_utf8.mail_params == {"BODY": "8BITMIME", "SMTPUTF8": None}
    assert _send_options(to_utf8)["smtputf8"] is True
    to_ascii = by_sender["alice@example.org"]
    assert b"message/global" in to_ascii.read()
    assert to_ascii.mail_params == {"BODY": "8BITMIME"}
    assert _send_options(to_ascii)["smtputf8"] is None


def test_no_report_to_the_null_sender_and_none_for_notify_never(tmp_path, caplog):
    transport = Scripted({"bob@example.net": [GONE], "carol@example.net": [GONE]})
    spool, runner, clock = make_runner(tmp_path, transport)
    queued(spool, "N1", envelope("", "bob@example.net"))
    queued(spool, "N2", envelope("a@example.org", "carol@example.net", NOTIFY="NEVER"))
    asyncio.run(runner.attempt("N1"))
    asyncio.run(runner.attempt("N2"))
    assert spool.ids() == []
    assert "not reporting failed for <bob@example.net> to the null sender" in caplog.text


def test_a_message_that_outlives_its_lifetime_bounces(tmp_path):
    transport = Scripted({"bob@example.net": [DEFER] * 10})
    spool, runner, clock = make_runner(tmp_path, transport, min_backoff=3600,
                                       max_backoff=86400, lifetime=2 * 86400)  # fmt: skip
    queued(spool, "E1", envelope())

    async def main() -> int:
        attempts = 0
        while "E1" in spool.ids() and attempts < 10:
            due = spool.load("E1").next_due
            assert due is not None
            clock.now = max(clock.now, due)
            await runner.attempt("E1")
            attempts += 1
        return attempts

    attempts = asyncio.run(main())
    assert attempts < 10 and "E1" not in spool.ids()
    [report] = reports(spool)
    text = report.read().decode()
    assert "Status: 4.4.7" not in text  # a bounce's status is permanent
    assert "Status: 5.4.7" in text and "message expired after" in text


def test_an_expiry_bounce_quotes_the_servers_reply_as_it_was(tmp_path, caplog):
    """RFC 3464 2.3.6: ``Diagnostic-Code: smtp;`` is what the server said;
    that the message expired is said in the human-readable part and the
    log, with its age as it is (150 s is "2m30s", not "2m")."""
    transport = Scripted({"bob@example.net": [DEFER, DEFER]})
    spool, runner, clock = make_runner(tmp_path, transport, min_backoff=60, lifetime=150)
    queued(spool, "E2", envelope())

    async def main() -> None:
        await runner.attempt("E2")
        clock.now += 150
        await runner.attempt("E2")

    asyncio.run(main())
    [report] = reports(spool)
    text = report.read().decode()
    assert "\r\nDiagnostic-Code: smtp; 451 4.3.0 Try later\r\n" in text
    assert "Status: 5.4.7" in text and "Remote-MTA: dns; mx.example.net" in text
    assert "<bob@example.net>: 451 4.3.0 Try later (message expired after 2m30s)\r\n" in text
    assert (
        "E2 to=<bob@example.net> bounced: 451 4.3.0 Try later (message expired after 2m30s) "
        "(mx.example.net)"
    ) in caplog.text


@pytest.mark.parametrize(
    "seconds, shown",
    [(0, "0s"), (59, "59s"), (119, "1m59s"), (120, "2m"), (150, "2m30s"), (4000, "1h6m"),
     (7200, "2h"), (86399, "23h59m"), (5 * 86400, "5d"), (2 * 86400 + 5 * 3600, "2d5h")],
)  # fmt: skip
def test_ages_are_said_in_their_two_largest_units(seconds, shown):
    from bonzo_plugins.queue.runner import _age

    assert _age(seconds) == shown


def test_one_delay_notice_when_delay_warning_is_set(tmp_path):
    transport = Scripted({"bob@example.net": [DEFER] * 5})
    spool, runner, clock = make_runner(tmp_path, transport, min_backoff=3600,
                                       delay_warning=3 * 3600)  # fmt: skip
    queued(spool, "W1", envelope())

    async def main() -> None:
        for _ in range(4):
            await runner.attempt("W1")
            clock.now += 4000

    asyncio.run(main())
    [notice] = reports(spool)
    text = notice.read().decode()
    assert "Subject: Delayed Mail (still being retried)" in text
    assert "Action: delayed" in text and "Will-Retry-Until:" in text
    assert spool.load("W1").warned
    # Nothing failed: the headers come back, not the message (RFC 3461 4.3).
    assert "Content-Type: text/rfc822-headers" in text and "message/rfc822" not in text
    assert "Subject: queued" in text and "Hello through the queue." not in text


def test_a_success_report_when_asked(tmp_path):
    transport = Scripted({"bob@example.net": [OK]})
    spool, runner, clock = make_runner(tmp_path, transport)
    queued(spool, "S1", envelope("alice@example.org", "bob@example.net", NOTIFY="SUCCESS"))
    asyncio.run(runner.attempt("S1"))
    [report] = reports(spool)
    text = report.read().decode()
    assert "Action: relayed" in text and "Hello through the queue" not in text


def test_hooks_choose_routes_take_over_reports_and_observe(tmp_path):
    events: list[tuple[str, list[str]]] = []
    special = Scripted({"vip@example.net": [OK]})

    class Policy:
        @hookimpl
        def bonzo_route(self, recipient):
            return "special" if recipient.address.startswith("vip") else None

        @hookimpl
        def bonzo_bounce(self, message, recipients):
            events.append(("bounce", [r.address for r in recipients]))
            return Accept()

        @hookimpl
        def bonzo_delivered(self, recipients):
            events.append(("delivered", [r.address for r in recipients]))

        @hookimpl
        def bonzo_bounced(self, recipients):
            events.append(("bounced", [r.address for r in recipients]))

    plugins = PluginSet()
    plugins.register(Policy(), "policy")
    default = Scripted({"bob@example.net": [GONE]})
    spool, runner, clock = make_runner(tmp_path, default, plugins)
    runner.routes.named["special"] = special
    queued(spool, "H1", envelope("alice@example.org", "vip@example.net", "bob@example.net"))
    asyncio.run(runner.attempt("H1"))
    assert special.calls == [["vip@example.net"]] and default.calls == [["bob@example.net"]]
    assert ("bounce", ["bob@example.net"]) in events
    assert ("delivered", ["vip@example.net"]) in events
    assert ("bounced", ["bob@example.net"]) in events
    # bonzo_bounced is told once the report is queued or taken over.
    assert events.index(("bounce", ["bob@example.net"])) < events.index(
        ("bounced", ["bob@example.net"])
    )
    assert reports(spool) == []  # the plugin took the report over


def test_bounced_observers_run_once_the_report_is_queued(tmp_path):
    seen: list[int] = []
    spool_box: list[Any] = []

    class Watch:
        @hookimpl
        def bonzo_bounced(self, recipients):
            seen.append(len(reports(spool_box[0])))

    plugins = PluginSet()
    plugins.register(Watch(), "watch")
    default = Scripted({"bob@example.net": [GONE]})
    spool, runner, clock = make_runner(tmp_path, default, plugins)
    spool_box.append(spool)
    queued(spool, "H2", envelope("alice@example.org", "bob@example.net"))
    asyncio.run(runner.attempt("H2"))
    assert seen == [1]  # "The sender's report is queued already"


@pytest.mark.expect_errors
@pytest.mark.parametrize("result", [Accept("special"), 42])
def test_a_route_that_is_no_name_is_a_plugin_fault(tmp_path, caplog, result):
    # An Accept was taken for a route name; the error said Accept was allowed.
    class Policy:
        @hookimpl
        def bonzo_route(self, recipient):
            return result

    plugins = PluginSet()
    plugins.register(Policy(), "policy")
    default = Scripted({"vip@example.net": [OK]})
    spool, runner, clock = make_runner(tmp_path, default, plugins)
    runner.routes.named["special"] = Scripted({})
    queued(spool, "R1", envelope("alice@example.org", "vip@example.net"))
    asyncio.run(runner.attempt("R1"))
    assert default.calls == [["vip@example.net"]]  # the route table
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        f"returned {type(result).__name__}; expected a route name (str) or None" in m
        for m in messages
    ), messages
    assert not any("not configured" in m for m in messages)


def test_a_stalled_destination_does_not_hold_the_slots_others_need(tmp_path):
    # per_destination deliveries hang at slow.test; the rest of the slots
    # stay free for other destinations, and the messages waiting for
    # slow.test go when a delivery there ends (without an attempt counted).
    release = asyncio.Event()
    started: list[str] = []

    class Stalling(Scripted):
        async def deliver(self, message, recipients):
            started.append(message.id)
            if recipients[0].domain == "slow.test":
                await release.wait()
            return [OK for _ in recipients]

    spool, runner, clock = make_runner(
        tmp_path, Stalling({}), max_deliveries=4, per_destination=2, scan_interval=3600
    )
    for i in range(6):
        queued(spool, f"S{i}", envelope("a@example.org", f"u{i}@slow.test"))

    async def main() -> None:
        runner.start()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(started) >= 2:
                break
        assert len(started) == 2 and all(id.startswith("S") for id in started)
        queued(spool, "F1", envelope("a@example.org", "v@fast.test"))
        runner.kick("F1")
        for _ in range(200):
            await asyncio.sleep(0.01)
            if "F1" not in spool.ids():
                break
        assert "F1" not in spool.ids()  # delivered while slow.test stalls
        waiting = [id for id in spool.ids() if id.startswith("S")]
        assert len(waiting) == 6
        # Nothing counted as an attempt for the messages that waited.
        assert sum(r.attempts for id in waiting for r in spool.load(id).recipients) == 0
        release.set()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if not spool.ids():
                break
        await runner.stop(grace=1)

    asyncio.run(main())
    assert spool.ids() == []
    assert sorted(started) == ["F1"] + [f"S{i}" for i in range(6)]


async def _until(check: Any, seconds: float = 3.0) -> bool:
    for _ in range(int(seconds / 0.01)):
        if check():
            return True
        await asyncio.sleep(0.01)
    return bool(check())


def test_a_wake_up_during_the_message_s_own_attempt_is_not_lost(tmp_path):
    # M goes to slow.test (busy: S0 stalls there, per_destination = 1) and
    # to mid.test (slow to answer). S0 ends while M's attempt still runs at
    # mid.test, so the wake-up for slow.test finds M in flight; M must be
    # tried again as soon as its attempt ends, not at the next scan (an hour).
    slow, mid = asyncio.Event(), asyncio.Event()
    calls: list[tuple[str, str]] = []

    class Timed(Scripted):
        async def deliver(self, message, recipients):
            calls.append((message.id, recipients[0].domain))
            if message.id == "S0":
                await slow.wait()
            elif recipients[0].domain == "mid.test":
                await mid.wait()
            return [OK for _ in recipients]

    spool, runner, clock = make_runner(
        tmp_path, Timed({}), max_deliveries=4, per_destination=1, scan_interval=3600
    )
    queued(spool, "S0", envelope("a@example.org", "x@slow.test"))

    async def main() -> None:
        runner.start()
        assert await _until(lambda: calls == [("S0", "slow.test")])
        queued(spool, "M1", envelope("a@example.org", "y@slow.test", "z@mid.test"))
        runner.kick("M1")
        assert await _until(lambda: ("M1", "mid.test") in calls)
        slow.set()  # S0 ends: the wake-up for slow.test finds M1 in flight
        assert await _until(lambda: "S0" not in spool.ids())
        await asyncio.sleep(0.1)
        mid.set()
        assert await _until(lambda: "M1" not in spool.ids()), "M1 waited for the next scan"
        await runner.stop(grace=1)

    asyncio.run(main())
    assert ("M1", "slow.test") in calls


def test_a_scan_leaves_messages_parked_while_their_destination_is_at_its_limit(
    tmp_path, monkeypatch
):
    # 20 messages wait for slow.test, where the one allowed delivery stalls.
    # Scans (forced by pokes) neither claim nor read them again: each delivery
    # there that ends wakes one. They all go once it frees up.
    transport = StallsS0()
    release, started = transport.release, transport.started

    spool, runner, clock = make_runner(
        tmp_path, transport, max_deliveries=4, per_destination=1, scan_interval=3600
    )
    queued(spool, "S0", envelope("a@example.org", "x@slow.test"))
    claims: list[str] = []
    real_claim = runner._claim_and_load
    monkeypatch.setattr(
        runner, "_claim_and_load", lambda id: (claims.append(id), real_claim(id))[1]
    )

    async def main() -> None:
        runner.start()
        assert await _until(lambda: started == ["S0"])
        for i in range(1, 21):
            queued(spool, f"P{i:02}", envelope("a@example.org", f"u{i}@slow.test"))
        (spool.path / "flush").touch()  # a scan finds them: each tried once, parked
        assert await _until(lambda: sum(len(w) for w in runner._busy.values()) == 20)
        claims.clear()
        for _ in range(3):
            await asyncio.sleep(1.1)  # mtime granularity on some file systems
            (spool.path / "flush").touch()
        await asyncio.sleep(1.1)
        assert claims == []  # no scan revived them
        release.set()
        assert await _until(lambda: not spool.ids(), seconds=10)
        await runner.stop(grace=1)

    asyncio.run(main())
    assert sorted(started) == sorted(["S0"] + [f"P{i:02}" for i in range(1, 21)])


def test_a_parked_message_s_other_recipients_keep_their_own_due_time(tmp_path):
    # M waits for slow.test (busy); its recipient at later.test was deferred
    # and is tried again when its back-off ends, while slow.test stays busy.
    release = asyncio.Event()
    calls: list[tuple[str, str]] = []

    class Mixed(Scripted):
        async def deliver(self, message, recipients):
            calls.append((message.id, recipients[0].domain))
            if message.id == "S0":
                await release.wait()
            if recipients[0].domain == "later.test":
                return [DEFER for _ in recipients]
            return [OK for _ in recipients]

    spool, runner, clock = make_runner(
        tmp_path, Mixed({}), per_destination=1, scan_interval=3600, min_backoff=300
    )
    queued(spool, "S0", envelope("a@example.org", "x@slow.test"))

    async def main() -> None:
        runner.start()
        assert await _until(lambda: calls == [("S0", "slow.test")])
        queued(spool, "M1", envelope("a@example.org", "y@slow.test", "z@later.test"))
        runner.kick("M1")
        assert await _until(lambda: calls.count(("M1", "later.test")) == 1)
        clock.now += 301
        assert await _until(lambda: calls.count(("M1", "later.test")) == 2)
        assert ("M1", "slow.test") not in calls  # still parked for slow.test
        release.set()
        assert await _until(lambda: ("M1", "slow.test") in calls)
        await runner.stop(grace=1)

    asyncio.run(main())


def test_a_delivery_cancelled_at_stop_is_logged_and_kept(tmp_path, caplog):
    started = asyncio.Event()

    class Stalled(Scripted):
        async def deliver(self, message, recipients):
            started.set()
            await asyncio.sleep(3600)
            return [OK for _ in recipients]

    spool, runner, clock = make_runner(tmp_path, Stalled({}), scan_interval=3600)
    queued(spool, "C1", envelope())

    async def main() -> None:
        runner.start()
        await asyncio.wait_for(started.wait(), 5)
        await runner.stop(grace=0.2)

    with caplog.at_level(logging.WARNING, logger="bonzo.plugins.queue"):
        asyncio.run(main())
    assert spool.ids() == ["C1"]  # kept for the next start
    [record] = [r for r in caplog.records if "stopping" in r.getMessage()]
    assert record.getMessage() == (
        "queue: stopping: attempt at C1 still running after 0.2 s, cancelled; "
        "its deliveries in flight are tried again at the next start"
    )


@pytest.mark.expect_errors
def test_a_stop_lets_go_of_a_hook_that_ignores_its_cancellation(tmp_path, caplog):
    """The stop cancels an attempt as a stop (hooks.stop_task): a plugin's
    hook in it that ignores the cancellation is let go after CANCEL_GRACE,
    not waited for (here 30 s more)."""
    from bonzo.hooks import CANCEL_GRACE

    started = asyncio.Event()

    class Stubborn:
        @hookimpl
        async def bonzo_route(self, recipient):
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(30)  # ignores it

    plugins = PluginSet(timeout=3600)
    plugins.register(Stubborn(), "stubborn")
    spool, runner, clock = make_runner(tmp_path, Scripted({}), plugins, scan_interval=3600)
    queued(spool, "R1", envelope())

    async def main() -> float:
        runner.start()
        await asyncio.wait_for(started.wait(), 5)
        begun = time.monotonic()
        await runner.stop(grace=0.2)
        return time.monotonic() - begun

    with caplog.at_level(logging.WARNING):
        took = asyncio.run(main())
    assert took < 0.2 + CANCEL_GRACE + 3, took
    assert spool.ids() == ["R1"]  # kept for the next start
    assert "ignored its cancellation" in caplog.text


@pytest.mark.expect_errors
def test_a_stop_leaves_an_attempt_behind_that_does_not_end(tmp_path, caplog, monkeypatch):
    """A transport that ignores its cancellation cannot hold the stop: after
    STOP_LIMIT it is left behind, with an ERROR line naming the message."""
    import bonzo_plugins.queue.runner as runner_module

    monkeypatch.setattr(runner_module, "STOP_LIMIT", 0.3)
    started = asyncio.Event()

    class Deaf(Scripted):
        async def deliver(self, message, recipients):
            started.set()
            for _ in range(3):  # bounded: the test's loop ends
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    pass
            return [OK for _ in recipients]

    spool, runner, clock = make_runner(tmp_path, Deaf({}), scan_interval=3600)
    queued(spool, "L1", envelope())

    async def main() -> float:
        runner.start()
        await asyncio.wait_for(started.wait(), 5)
        begun = time.monotonic()
        await runner.stop(grace=0.1)
        took = time.monotonic() - begun
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()  # the test's own clean-up of what was left behind
        return took

    with caplog.at_level(logging.WARNING, logger="bonzo.plugins.queue"):
        took = asyncio.run(main())
    assert took < 3, took
    assert "queue: stopping: attempt at L1 did not end 0.3 s after it was cancelled" in caplog.text


class ByLocalPart(Scripted):
    """``ok*`` delivered, ``temp*`` deferred, ``perm*`` refused, anyone else
    (a report's recipient) delivered; ``slow*`` delivered once
    :attr:`release` is set. Destinations by domain, as the others."""

    def __init__(self) -> None:
        super().__init__({})
        self.release = asyncio.Event()
        self.slow_started = asyncio.Event()

    async def deliver(self, message: Any, recipients: Sequence[Recipient]) -> list[Outcome]:
        self.calls.append([r.address for r in recipients])
        if any(r.address.startswith("slow") for r in recipients):
            self.slow_started.set()
            await self.release.wait()
        replies = {"temp": DEFER, "perm": GONE}
        return [replies.get(r.address[:4], OK) for r in recipients]


@pytest.mark.expect_errors
def test_a_state_that_cannot_be_saved_is_kept_and_nothing_delivered_again(tmp_path, caplog):
    """The state file cannot be written (here a directory where its
    temporary copy goes, as with a full disk: the same failed write): the
    attempt's outcomes stay in memory, the save alone is tried again with a
    back-off, and the message is neither delivered again nor reported again
    until it is saved, then it goes on from the saved state."""
    transport = ByLocalPart()
    spool, runner, clock = make_runner(
        tmp_path, transport, min_backoff=0.05, max_backoff=0.2, scan_interval=0.1,
        lifetime=1e10,
    )  # fmt: skip
    runner.clock = time.time
    queued(spool, "F1", envelope("alice@example.org", "ok@example.net", "temp@example.net",
                                 "perm@example.net"))  # fmt: skip
    blocker = spool.state / f".F1.{os.getpid()}.tmp"
    blocker.mkdir()

    def text() -> str:
        return "\n".join(r.getMessage() for r in caplog.records)

    async def main() -> None:
        runner.start()
        assert await _until(lambda: text().count("F1: cannot save the delivery state") >= 4)
        # Every failure said what and why; the deliveries held meanwhile.
        assert transport.calls == [["ok@example.net", "temp@example.net", "perm@example.net"],
                                   ["alice@example.org"]]  # fmt: skip
        assert "F1" in runner._inflight  # still under its claim
        assert spool.claim("F1") is None
        blocker.rmdir()
        assert await _until(lambda: (spool.state / "F1.json").exists())
        # Deferred recipients go on from the saved state, temp@ alone.
        assert await _until(lambda: len(transport.calls) >= 3)
        await runner.stop(grace=1)

    with caplog.at_level(logging.INFO, logger="bonzo.plugins.queue"):
        asyncio.run(main())
    assert [c for c in transport.calls if "ok@example.net" in c] == [
        ["ok@example.net", "temp@example.net", "perm@example.net"]
    ]
    assert transport.calls.count(["alice@example.org"]) == 1  # one failure report, once
    assert set(map(tuple, transport.calls[2:])) == {("temp@example.net",)}
    states = {r.address: r for r in spool.load("F1").recipients}
    assert states["ok@example.net"].status == "delivered"
    assert states["perm@example.net"].status == "bounced"
    assert states["temp@example.net"].status == "deferred"
    assert states["temp@example.net"].attempts >= 2  # the first attempt counted too
    assert "its outcomes are kept in memory and its deliveries held" in text()
    assert "F1: delivery state saved after" in text()


def test_after_a_reload_deliveries_in_flight_finish_uncancelled(tmp_path, caplog):
    """A reload retires the runner with its deliveries in flight: cancelled
    after a fixed 10 s, a delivery whose final dot the next server had
    taken (a slow content filter there) was made again by the new runner --
    every message of a reload twice. They now run to their end; only a
    stop of the server (stop_requested) cuts them, to the grace."""
    transport = ByLocalPart()
    spool, runner, clock = make_runner(tmp_path, transport, scan_interval=3600)
    queued(spool, "R1", envelope("a@example.org", "slow@slow.test"))

    async def main() -> None:
        requested = asyncio.Event()
        runner.start()
        await asyncio.wait_for(transport.slow_started.wait(), 5)
        stopping = asyncio.ensure_future(runner.stop(grace=0.05, stop_requested=requested))
        await asyncio.sleep(0.3)  # six times the grace: not cancelled
        assert not stopping.done()
        transport.release.set()
        await asyncio.wait_for(stopping, 5)

    with caplog.at_level(logging.INFO, logger="bonzo.plugins.queue"):
        asyncio.run(main())
    assert spool.ids() == []  # delivered, once
    assert transport.calls == [["slow@slow.test"]]
    assert "1 attempt(s) in flight finish first" in caplog.text
    assert "cancelled" not in caplog.text


@pytest.mark.expect_errors
@pytest.mark.parametrize("then", ["space freed", "server stopped"])
def test_a_reload_keeps_a_message_whose_state_cannot_be_saved_held(tmp_path, caplog, then):
    """A runner a reload retires gave up at once the save of a state it
    could not write (a full disk), logging that the attempt would be
    repeated "at the next start", and let the message go: the new
    configuration's runner then made that attempt again at once, from the
    state on disk. It now keeps trying, holding the message (a poke from
    ``bonzo queue`` has it try at once), until the save succeeds; only a
    stop of the server ends that, after one more try."""
    transport = ByLocalPart()
    spool, runner, clock = make_runner(
        tmp_path, transport, min_backoff=3600, max_backoff=3600, scan_interval=3600,
        lifetime=1e10,
    )  # fmt: skip
    runner.clock = time.time
    queued(spool, "F2", envelope("alice@example.org", "ok@example.net", "temp@example.net"))
    blocker = spool.state / f".F2.{os.getpid()}.tmp"
    blocker.mkdir()

    def text() -> str:
        return "\n".join(r.getMessage() for r in caplog.records)

    async def main() -> None:
        requested = asyncio.Event()
        runner.start()
        assert await _until(lambda: "F2: cannot save the delivery state" in text())
        stopping = asyncio.ensure_future(runner.stop(grace=0.1, stop_requested=requested))
        await asyncio.sleep(0.5)
        assert not stopping.done()
        assert spool.claim("F2") is None and spool.unsaved("F2")  # held still
        if then == "space freed":
            blocker.rmdir()
            (spool.path / "flush").touch()  # bonzo queue's poke: no back-off
        else:
            requested.set()
        await asyncio.wait_for(stopping, 5)

    with caplog.at_level(logging.INFO, logger="bonzo.plugins.queue"):
        asyncio.run(main())
    assert transport.calls == [["ok@example.net", "temp@example.net"]]
    if then == "space freed":
        assert "F2: delivery state saved after 1 failed tries" in text()
        states = [r.status for r in spool.load("F2").recipients]
        assert states == ["delivered", "deferred"]
        assert "stopping with the delivery state not saved" not in text()
    else:
        assert "F2: stopping with the delivery state not saved" in text()
        assert "the last attempt is repeated at the next start" in text()


def test_a_stop_during_a_reload_s_retirement_cuts_to_the_grace(tmp_path, caplog):
    transport = ByLocalPart()
    spool, runner, clock = make_runner(tmp_path, transport, scan_interval=3600)
    queued(spool, "R2", envelope("a@example.org", "slow@slow.test"))

    async def main() -> None:
        requested = asyncio.Event()
        runner.start()
        await asyncio.wait_for(transport.slow_started.wait(), 5)
        stopping = asyncio.ensure_future(runner.stop(grace=0.1, stop_requested=requested))
        await asyncio.sleep(0.2)
        assert not stopping.done()
        requested.set()
        await asyncio.wait_for(stopping, 5)

    with caplog.at_level(logging.INFO, logger="bonzo.plugins.queue"):
        asyncio.run(main())
    assert [r.status for r in spool.load("R2").recipients] == ["pending"]
    assert "still running after 0.1 s, cancelled" in caplog.text


def test_a_forced_stop_cancels_deliveries_in_flight_at_once(tmp_path, caplog):
    """A second SIGTERM: the grace is not waited for (the process exits a
    few seconds later whatever runs), what settled is saved."""
    transport = ByLocalPart()
    spool, runner, clock = make_runner(tmp_path, transport, scan_interval=3600)
    queued(spool, "R3", envelope("a@example.org", "ok@fast.test", "slow@slow.test"))

    async def main() -> float:
        requested, forced = asyncio.Event(), asyncio.Event()
        requested.set()
        runner.start()
        await asyncio.wait_for(transport.slow_started.wait(), 5)
        stopping = asyncio.ensure_future(runner.stop(30, requested, forced))
        await asyncio.sleep(0.1)
        assert not stopping.done()
        began = time.monotonic()
        forced.set()
        await asyncio.wait_for(stopping, 5)
        return time.monotonic() - began

    with caplog.at_level(logging.INFO, logger="bonzo.plugins.queue"):
        took = asyncio.run(main())
    assert took < 3  # not the 30 s grace
    on_disk = {r.address: r.status for r in spool.load("R3").recipients}
    assert on_disk == {"ok@fast.test": "delivered", "slow@slow.test": "pending"}
    assert "still running at a forced stop, cancelled" in caplog.text


def test_the_app_tells_a_stop_from_a_reload_s_retirement(tmp_path):
    """MailApp.stop_requested: unset while a reload retires the
    configuration, set by a stop (which then waits for the retirement)."""
    from bonzo.app import MailApp
    from bonzo.config import parse_config

    text = '[[listeners]]\naddress = "127.0.0.1"\nport = 0\n[plugins]\nenabled = []\n'
    seen = []

    class Watch:
        @hookimpl
        async def bonzo_shutdown(self, app):
            seen.append(app.stop_requested.is_set())
            await asyncio.wait_for(app.stop_requested.wait(), 5)

    async def main() -> None:
        app = MailApp(parse_config(text, source="bonzo.toml", base_dir=tmp_path), [Watch()])
        await app.start()
        retiring = asyncio.ensure_future(app.retire())
        await asyncio.sleep(0.1)
        assert app.retiring and not retiring.done() and seen == [False]
        await asyncio.wait_for(app.stop(), 5)  # sets it, waits for the retirement
        assert retiring.done() and not app.stop_forced.is_set()
        app2 = MailApp(parse_config(text, source="bonzo.toml", base_dir=tmp_path), [Watch()])
        await app2.start()
        await asyncio.wait_for(app2.stop(), 5)

    asyncio.run(main())
    assert seen == [False, True]


class Jittery(Scripted):
    """Delivers every recipient after a short, varied wait."""

    def __init__(self) -> None:
        super().__init__({})
        self.rng = random.Random(8)

    async def deliver(self, message: Any, recipients: Sequence[Recipient]) -> list[Outcome]:
        self.calls.append([r.address for r in recipients])
        await asyncio.sleep(self.rng.uniform(0, 0.004))
        return [OK for _ in recipients]


def test_a_wake_up_reaching_a_message_whose_attempt_is_ending_is_kept(tmp_path):
    """A message parked for a busy destination (per_destination) and woken
    by a delivery there that ended before its own attempt's task was done
    was dropped as "in flight" and waited for the next scan (a tester saw
    1 to 9 of 40 flushed messages left for a minute). Every message is now
    delivered without a scan."""
    transport = Jittery()
    spool, runner, clock = make_runner(
        tmp_path, transport, max_deliveries=20, per_destination=2, scan_interval=3600
    )
    runner.clock = time.time
    for n in range(150):
        queued(spool, f"J{n}", envelope("a@example.org", f"r{n}@busy.test"))

    async def main() -> None:
        runner.start()
        assert await _until(lambda: not spool.ids(), 20), spool.ids()
        await runner.stop(grace=1)

    asyncio.run(main())
    assert sorted(c[0] for c in transport.calls) == sorted(f"r{n}@busy.test" for n in range(150))


def test_a_stop_keeps_what_the_finished_destinations_delivered(tmp_path, caplog):
    """One destination answers, another is slow: the first one's outcome is
    saved as soon as it is in (a crash from then on does not repeat it), and
    a stop that cancels the slow delivery after its grace keeps it: the next
    start tries the slow destination alone."""
    transport = ByLocalPart()
    spool, runner, clock = make_runner(tmp_path, transport, scan_interval=3600)
    queued(spool, "M1", envelope("a@example.org", "ok@fast.test", "slow@slow.test"))

    async def main() -> None:
        runner.start()
        await asyncio.wait_for(transport.slow_started.wait(), 5)
        assert await _until(lambda: (spool.state / "M1.json").exists())
        # Durable while the slow delivery is still in flight (kill -9 here).
        on_disk = {r.address: r.status for r in spool.load("M1").recipients}
        assert on_disk == {"ok@fast.test": "delivered", "slow@slow.test": "pending"}
        await runner.stop(grace=0.2)

    asyncio.run(main())
    on_disk = {r.address: r.status for r in spool.load("M1").recipients}
    assert on_disk == {"ok@fast.test": "delivered", "slow@slow.test": "pending"}
    # The next start (or reload): the slow destination alone.
    transport.release.set()
    spool, runner, clock = make_runner(tmp_path, transport)
    asyncio.run(runner.attempt("M1"))
    assert spool.ids() == []
    assert [c for c in transport.calls if "ok@fast.test" in c] == [["ok@fast.test"]]
    assert transport.calls.count(["slow@slow.test"]) == 2


def test_the_runner_keeps_nothing_per_destination_once_deliveries_end(tmp_path):
    # A relay meets countless domains: nothing may stay in memory per
    # destination (it kept a semaphore for every domain ever seen).
    transport = Scripted({f"u@d{i}.test": [OK] for i in range(50)})
    spool, runner, clock = make_runner(tmp_path, transport, max_deliveries=8, per_destination=1)
    for i in range(50):
        queued(spool, f"N{i:02}", envelope("a@example.org", f"u@d{i}.test"))

    async def main() -> None:
        runner.start()
        assert await _until(lambda: not spool.ids(), seconds=10)
        await runner.stop(grace=1)

    asyncio.run(main())
    assert len(transport.calls) == 50
    assert runner._active == {} and runner._busy == {} and runner._parked == {}


def test_messages_waiting_for_a_destination_go_first_come_first_served(tmp_path):
    transport = StallsS0()
    release, started = transport.release, transport.started

    spool, runner, clock = make_runner(tmp_path, transport, per_destination=1)
    queued(spool, "S0", envelope("a@example.org", "x@slow.test"))
    order = ["W9", "W3", "W7", "W1", "W5"]  # not the ids' order

    async def main() -> None:
        runner.start()
        assert await _until(lambda: started == ["S0"])
        for n, id in enumerate(order, 1):
            queued(spool, id, envelope("a@example.org", f"{id}@slow.test"))
            runner.kick(id)
            assert await _until(lambda n=n: sum(len(w) for w in runner._busy.values()) == n)
        release.set()
        assert await _until(lambda: not spool.ids(), seconds=10)
        await runner.stop(grace=1)

    asyncio.run(main())
    assert started == ["S0", *order]


def test_idle_pooled_connections_are_closed_after_idle_timeout(tmp_path, monkeypatch):
    from bonzo_plugins.queue import transports

    class Conn:
        usable = True
        quits = 0

        async def quit(self):
            Conn.quits += 1

    now = [100.0]
    monkeypatch.setattr(transports.time, "monotonic", lambda: now[0])

    async def main() -> None:
        pool = transports.ConnectionPool(idle_timeout=5)
        pool.give("a.test", Conn())
        pool.give("b.test", Conn())
        now[0] += 4
        assert pool.expire() == 0
        now[0] += 1
        assert pool.expire() == 2
        await pool.close()  # waits for the QUITs under way

    asyncio.run(main())
    assert Conn.quits == 2

    # The runner asks every transport that pools connections, all the time.
    expired: list[float] = []

    class Pooling(Scripted):
        def expire(self):
            expired.append(time.monotonic())
            return 0

    pooling = Pooling({})
    spool, runner, clock = make_runner(tmp_path, pooling)
    runner.routes.transports.append(pooling)

    async def run() -> None:
        runner.start()
        await asyncio.sleep(0.3)
        await runner.stop(grace=1)

    monkeypatch.undo()
    asyncio.run(run())
    assert expired


def test_a_pool_keeps_at_most_max_idle_connections(monkeypatch):
    """One idle connection per destination was kept for idle_timeout: many
    destinations, many descriptors (30 with max_deliveries = 1). Past
    max_idle the one idle longest is closed."""
    from bonzo_plugins.queue import transports

    quits: list[str] = []

    class Conn:
        usable = True

        def __init__(self, name: str) -> None:
            self.name = name

        async def quit(self) -> None:
            quits.append(self.name)

    now = [100.0]
    monkeypatch.setattr(transports.time, "monotonic", lambda: now[0])

    async def main() -> None:
        pool = transports.ConnectionPool(idle_timeout=30, max_idle=3)
        for i in range(5):
            pool.give(f"d{i}.test", Conn(f"c{i}"))
            now[0] += 1
        await asyncio.sleep(0)
        assert pool.take("d0.test") is None and pool.take("d1.test") is None
        assert pool.take("d4.test").name == "c4"
        await pool.close()

    asyncio.run(main())
    assert quits[:2] == ["c0", "c1"]


def test_two_runners_never_deliver_one_message_twice(tmp_path):
    delivered: list[str] = []

    class Slow(Scripted):
        async def deliver(self, message, recipients):
            delivered.append(message.id)
            await asyncio.sleep(0.2)
            return [OK for _ in recipients]

    spool, first, clock = make_runner(tmp_path, Slow({}))
    second = Runner(spool, GroupSync(spool.data), first.routes, None, first.settings, clock=clock)
    for i in range(5):
        queued(spool, f"T{i}", envelope())

    async def main() -> None:
        await asyncio.gather(*(r.attempt(f"T{i}") for i in range(5) for r in (first, second)))

    asyncio.run(main())
    assert sorted(delivered) == [f"T{i}" for i in range(5)]
    assert spool.ids() == []


def test_maildir_route_delivers_each_mailbox(tmp_path):
    routes = RouteTable(
        {"example.net": {"type": "maildir", "path": "boxes", "per_recipient": True}}, {},
        App(tmp_path),
    )  # fmt: skip
    routes.start()
    spool = Spool(tmp_path / "q")
    spool.setup()
    runner = Runner(spool, GroupSync(spool.data), routes, None, RunnerSettings())
    queued(spool, "L1", envelope("a@example.org", "bob@example.net", "Eve@Example.net"))
    asyncio.run(runner.attempt("L1"))
    for who, rcpt in (("bob", "bob@example.net"), ("eve", "eve@example.net")):
        [stored] = (tmp_path / "boxes" / "example.net" / who / "new").iterdir()
        lead = f"Return-Path: <a@example.org>\r\nDelivered-To: {rcpt}\r\n".encode()
        assert stored.read_bytes() == lead + BODY
    assert spool.ids() == []


@pytest.mark.expect_errors
def test_without_a_routes_table_everything_goes_by_mx(tmp_path):
    queue = QueuePlugin()
    queue.bonzo_configure({"path": "q"}, App(tmp_path))
    assert queue.routes is not None
    [transport] = queue.routes.transports
    assert transport.kind == "mx"
    queue.bonzo_configure({"path": "q", "routes": {"x.test": {"type": "discard"}}}, App(tmp_path))
    assert [t.kind for t in queue.routes.transports] == ["discard"]  # no implicit "*"


@pytest.mark.expect_errors
def test_a_quarantine_transport_gone_is_named(tmp_path, caplog):
    # A reload removed or renamed the transport a queued quarantined message
    # is bound to: it was logged as "no route for <bob@example.net>", though
    # example.net has one (tester milter3 L3).
    spool, runner, clock = make_runner(tmp_path, DiscardTransport())
    queued(spool, "Q1", {**envelope("alice@example.org", "b@example.net", "c@example.net"),
                         "transport": "quar"})  # fmt: skip
    asyncio.run(runner.attempt("Q1"))
    message = spool.load("Q1")
    assert [r.status for r in message.recipients] == ["deferred", "deferred"]
    assert message.recipients[0].reply == "451 4.3.5 Quarantine transport not configured"
    assert "no route" not in caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        "queue: Q1: quarantined message: transport 'quar' is not configured (a reload "
        "removed or renamed it?): add a transport named 'quar' back to "
        "[plugins.queue.transports] (a one-folder maildir will do), then run "
        "`bonzo queue flush`; the message waits"
    ]
    clock.now += runner.settings.lifetime + runner.settings.max_backoff
    asyncio.run(runner.attempt("Q1"))
    assert spool.load("Q1").recipients[0].status == "deferred"  # never bounced
    assert reports(spool) == []


@pytest.mark.expect_errors
@pytest.mark.parametrize(
    "quarantine",
    [None, {"by": "milter", "reason": "held", "recipients": ["b@example.net"], "final": []}],
)
def test_a_quarantined_message_for_its_own_recipients_never_goes_by_recipient(
    tmp_path, caplog, quarantine
):
    # Queued for its own recipients (a one-folder maildir quarantine, or by
    # an older version: no facts), then a reload made its transport one that
    # delivers by recipient: it went to their mailboxes (tester review9 H1).
    spool, runner, clock = make_runner(tmp_path, DiscardTransport())
    quar = Scripted({"b@example.net": [OK] * 3, "c@example.net": [OK] * 3})
    runner.routes.named["quar"] = quar
    env = {**envelope("alice@example.org", "b@example.net", "c@example.net"), "transport": "quar"}
    if quarantine is not None:
        env["quarantine"] = quarantine
    queued(spool, "Q2", env)
    asyncio.run(runner.attempt("Q2"))
    assert quar.calls == []
    message = spool.load("Q2")
    assert [r.status for r in message.recipients] == ["deferred", "deferred"]
    assert message.recipients[0].reply == "451 4.3.5 Quarantine transport delivers by recipient"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        "queue: Q2: quarantined message not delivered: transport 'quar' now delivers to "
        "each recipient (scripted), and the message is not recorded as queued for a "
        "quarantine_recipient (queued for its own recipients, or by an earlier version): "
        "it could reach their mailboxes. Make 'quar' a one-folder maildir and run `bonzo "
        "queue flush`, or save it (`bonzo queue show Q2`) and `bonzo queue delete Q2`; the "
        "message waits"
    ]
    clock.now += runner.settings.lifetime + runner.settings.max_backoff
    asyncio.run(runner.attempt("Q2"))
    assert quar.calls == []
    assert [r.status for r in spool.load("Q2").recipients] == ["deferred", "deferred"]
    assert reports(spool) == []
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 2  # once per attempt
    # A one-folder maildir of that name again: delivered there.
    folder = RouteTable({}, {"quar": {"type": "maildir", "path": "quar"}}, App(tmp_path))
    folder.start()
    runner.routes.named["quar"] = folder.named["quar"]
    clock.now += runner.settings.max_backoff
    asyncio.run(runner.attempt("Q2"))
    assert spool.ids() == []
    assert len(list((tmp_path / "quar" / "new").iterdir())) == 1


def test_a_quarantine_copy_goes_to_its_own_recipient_by_recipient(tmp_path):
    spool, runner, clock = make_runner(tmp_path, DiscardTransport())
    quar = Scripted({"Review@example.org": [OK]})
    runner.routes.named["quar"] = quar
    facts = {"by": "m", "reason": "r", "recipients": ["b@example.net"], "final": []}
    env = {**envelope("alice@example.org", "Review@example.org"), "transport": "quar",
           "quarantine": {**facts, "to": "review@example.org"}}  # fmt: skip
    queued(spool, "Q3", env)
    asyncio.run(runner.attempt("Q3"))
    assert quar.calls == [["Review@example.org"]]
    assert spool.ids() == []


@pytest.mark.expect_errors
@pytest.mark.parametrize("failure", ["refused", "expired"])
def test_a_quarantine_copy_refused_for_good_is_held_never_bounced(tmp_path, caplog, failure):
    # A 550 for the quarantine_recipient, a review relay's 554: the copy was
    # dropped with a WARNING (tester review9 H2). Held, for the operator.
    refusal = Outcome("failed", 550, "5.1.1", "User unknown", "lmtp.test")
    later = Outcome("deferred", 451, "4.2.0", "Try later", "lmtp.test")
    quar = Scripted({"review@example.org": [refusal if failure == "refused" else later, OK]})
    spool, runner, clock = make_runner(tmp_path, DiscardTransport())
    runner.routes.named["quar"] = quar
    env = {**envelope("alice@example.org", "review@example.org", NOTIFY="FAILURE,DELAY"),
           "transport": "quar", "quarantine": {"to": "review@example.org"}}  # fmt: skip
    queued(spool, "Q4", env)
    if failure == "expired":
        clock.now += runner.settings.lifetime
    asyncio.run(runner.attempt("Q4"))
    message = spool.load("Q4")
    assert message.held
    assert message.recipients[0].status == "deferred"
    assert reports(spool) == []
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error.startswith(
        "queue: Q4: quarantine copy to=<review@example.org> held, not bounced: "
    )
    assert error.endswith(
        "Fix what refused it (the quarantine_recipient, the transport 'quar', the "
        "mailbox), then `bonzo queue release Q4`"
    )
    assert "to=<review@example.org> bounced" not in caplog.text
    asyncio.run(runner.attempt("Q4"))  # held: not tried
    assert len(quar.calls) == 1
    message.held = False  # what `bonzo queue release` does
    claim = spool.claim("Q4")
    spool.save_state(message)
    claim.release()
    asyncio.run(runner.attempt("Q4"))
    assert len(quar.calls) == 2
    assert spool.ids() == []
    assert reports(spool) == []


def test_a_quarantine_copy_is_never_reported(tmp_path):
    # NOTIFY=SUCCESS on a quarantined message queued for its recipients (an
    # older version, or parameters kept): no "delivered" report to the
    # sender about the operator's copy (tester review9 M1).
    spool, runner, clock = make_runner(tmp_path, DiscardTransport())
    folder = RouteTable({}, {"quar": {"type": "maildir", "path": "quar"}}, App(tmp_path))
    folder.start()
    runner.routes.named["quar"] = folder.named["quar"]
    env = {**envelope("alice@example.org", "b@example.net", NOTIFY="SUCCESS"),
           "transport": "quar"}  # fmt: skip
    queued(spool, "Q5", env)
    asyncio.run(runner.attempt("Q5"))
    assert spool.ids() == []
    assert len(list((tmp_path / "quar" / "new").iterdir())) == 1


@pytest.mark.expect_errors
def test_no_route_defers_never_bounces(tmp_path, caplog):
    spool, runner, clock = make_runner(tmp_path, None)
    queued(spool, "X1", envelope())
    asyncio.run(runner.attempt("X1"))
    message = spool.load("X1")
    assert message.recipients[0].status == "deferred"
    assert message.recipients[0].reply == "451 4.3.5 No route configured"
    assert reports(spool) == []
    assert "no route for <bob@example.net>" in caplog.text
    # Past the message's lifetime too: the operator's mistake, not the sender's.
    clock.now += runner.settings.lifetime + runner.settings.max_backoff
    asyncio.run(runner.attempt("X1"))
    assert spool.load("X1").recipients[0].status == "deferred"
    assert reports(spool) == []


@pytest.mark.expect_errors  # the "no route" error
def test_a_delay_notice_promises_no_end_for_a_deferral_that_never_expires(tmp_path):
    # No route (the operator's to fix) is kept past the lifetime: its delay
    # notice gave a Will-Retry-Until that passed with the message still queued.
    transport = Scripted({"c@example.org": [DEFER]})
    spool, runner, clock = make_runner(tmp_path, None, delay_warning=60)
    runner.routes.exact["example.org"] = transport
    queued(spool, "X2", envelope("s@example.org", "b@example.net", "c@example.org"))
    clock.now += 120
    asyncio.run(runner.attempt("X2"))
    [notice] = reports(spool)
    parsed = email.message_from_bytes(notice.read(), policy=email.policy.default)
    b, c = parsed.get_payload()[1].get_payload()[1:]
    assert (b["Final-Recipient"], b["Status"]) == ("rfc822; b@example.net", "4.3.5")
    assert b["Will-Retry-Until"] is None
    assert c["Final-Recipient"] == "rfc822; c@example.org" and c["Will-Retry-Until"]


# ---------------------------------------------------- acceptance (plugin)
def queue_session(tmp_path: Path, table: dict[str, Any] | None = None):
    plugins = PluginSet()

    class Rcpt:
        @hookimpl
        def bonzo_rcpt(self):
            return Accept()

    plugins.register(Rcpt(), "rcpt")
    queue = QueuePlugin()
    plugins.register(queue, "queue")
    table = table or {"path": "q", "routes": {"*": {"type": "discard"}}}
    queue.bonzo_configure(table, App(tmp_path, plugins))
    return plugins, queue


def quarantining_session(tmp_path: Path, table: dict[str, Any], reason: str):
    """:func:`queue_session` with a plugin that quarantines every message."""
    from bonzo import Quarantine

    plugins, queue = queue_session(tmp_path, table)

    class Suspect:
        @hookimpl
        def bonzo_message(self):
            return Quarantine(reason)

    plugins.register(Suspect(), "suspect")  # bonzo_message: before any delivery anyway
    return plugins, queue


def record_accepts(queue: QueuePlugin, records: list[Any]) -> None:
    """Put in ``records`` the envelopes (queue-file records) the started
    queue's spool accepts from now on."""
    assert queue.spool is not None
    spool = queue.spool
    original = spool.accept

    async def keep(*args: Any, **kwargs: Any) -> Any:
        records.append(args[1])
        return await original(*args, **kwargs)

    spool.accept = keep  # type: ignore[method-assign]


async def send(
    tester: SessionTester, body: bytes = BODY, rcpts: Sequence[str] = ("b@example.net",)
) -> bytes:
    await tester.connect()
    await tester.send(b"EHLO c\r\nMAIL FROM:<alice@example.org> BODY=8BITMIME\r\n")
    for r in rcpts:
        await tester.send(f"RCPT TO:<{r}>\r\n".encode())
    await tester.send(b"DATA\r\n")
    return await tester.send(body + b".\r\n")


async def drained(queue: QueuePlugin, seconds: float) -> None:
    """Wait (at most ``seconds``) until ``queue``'s spool is empty."""
    assert queue.spool is not None
    for _ in range(int(seconds / 0.02)):
        if not queue.spool.ids():
            return
        await asyncio.sleep(0.02)


def test_accepted_means_on_disk_then_delivered(tmp_path):
    plugins, queue = queue_session(tmp_path)

    async def main() -> tuple[bytes, list[str], bytes]:
        await queue.bonzo_startup(App(tmp_path, plugins))
        assert queue.runner is not None
        tester = SessionTester(plugins)
        reply = await send(tester)
        assert queue.spool is not None
        ids = queue.spool.ids()
        stored = queue.spool.load(ids[0]).read() if ids else b""
        await drained(queue, 2)
        left = queue.spool.ids()
        await queue.bonzo_shutdown()
        return reply, left, stored

    reply, left, stored = asyncio.run(main())
    assert reply.startswith(b"250 2.0.0 Ok: queued as ")
    assert stored.endswith(BODY) and stored.startswith(b"Received: from c ([192.0.2.1])")
    assert left == []  # delivered (discarded) at once by this worker's runner


def test_a_message_queued_for_some_recipients_is_delivered_when_the_client_got_a_deferral(
    tmp_path, monkeypatch
):
    # A filter defers one recipient: the SMTP client gets 451 (one reply for
    # the message) and bonzo_accepted never runs, but the copy queued for the
    # other recipient must still go, without waiting for a restart.
    import bonzo_plugins.queue.plugin as queue_module

    monkeypatch.setattr(queue_module, "_TOLD_WAIT", 0.05)
    plugins, queue = queue_session(tmp_path)

    class DeferOne:
        @hookimpl
        def bonzo_message(self, envelope):
            for i, rcpt in enumerate(envelope.rcpt_tos):
                if rcpt.startswith("later"):
                    envelope.refuse_recipient(i, errors.TransientError("Try later", 451, "4.7.1"))

    plugins.register(DeferOne(), "defer_one")

    async def main() -> tuple[bytes, list[str], list[str]]:
        await queue.bonzo_startup(App(tmp_path, plugins))
        assert queue.spool is not None and queue.runner is not None
        reply = await send(SessionTester(plugins), rcpts=("now@example.net", "later@example.net"))
        queued = queue.spool.ids()
        await drained(queue, 4)
        left = queue.spool.ids()
        await queue.bonzo_shutdown()
        return reply, queued, left

    reply, queued, left = asyncio.run(main())
    assert reply == b"451 4.7.1 Try later\r\n"
    assert len(queued) == 1  # stored for now@ before the reply
    assert left == []  # and delivered (discarded by the route) soon after


def test_a_message_accepted_here_is_delivered_without_reading_it_back(tmp_path, monkeypatch):
    plugins, queue = queue_session(tmp_path)
    loads: list[str] = []
    real_load = Spool.load

    def counting(self: Spool, id: str) -> Any:
        loads.append(id)
        return real_load(self, id)

    monkeypatch.setattr(Spool, "load", counting)
    from bonzo import durable

    unlinked: list[str] = []
    real_remove = durable.remove_files

    def recording(paths: Any, fds: Any) -> Any:  # the committer's removals
        unlinked.extend(os.fsdecode(p) for p in paths)
        return real_remove(paths, fds)

    monkeypatch.setattr(durable, "remove_files", recording)

    async def main() -> list[str]:
        await queue.bonzo_startup(App(tmp_path, plugins))
        assert queue.spool is not None and queue.runner is not None
        for _ in range(3):
            assert (await send(SessionTester(plugins))).startswith(b"250 2.0.0")
        await drained(queue, 2)
        left = queue.spool.ids()
        await queue.bonzo_shutdown()
        return left

    assert asyncio.run(main()) == []
    assert loads == []  # handed over with its claim, not read back
    # Removed without looking for a state file it never had.
    assert sum("/data/" in p for p in unlinked) == 3
    assert not any("/state/" in p for p in unlinked)


def test_handed_over_claims_are_bounded_and_released_at_stop(tmp_path, monkeypatch):
    import bonzo_plugins.queue.runner as runner_module

    monkeypatch.setattr(runner_module, "MAX_HANDED", 4)
    transport = Scripted({})
    spool, runner, clock = make_runner(tmp_path, transport, max_deliveries=1)
    handed = [spool.write_claimed(f"H{i}", envelope(), b"", io.BytesIO(BODY)) for i in range(6)]
    for i, pair in enumerate(handed):
        runner.kick(f"H{i}", pair)  # not started: the runner's loop is not running
    # Four kept (MAX_HANDED), the others' claims released at once.
    free = [spool.claim(f"H{i}") for i in range(6)]
    assert [c is None for c in free] == [True, True, True, True, False, False]
    for c in free:
        if c is not None:
            c.release()
    asyncio.run(runner.stop(grace=0))
    for i in range(6):
        claim = spool.claim(f"H{i}")
        assert claim is not None, i
        claim.release()


def test_a_poke_lets_go_of_the_claims_of_untried_messages(tmp_path):
    # Every delivery slot is taken by a stalled delivery: the message handed
    # over at acceptance waits for a slot with its claim held. ``bonzo queue``
    # (hold, delete, bounce, flush) pokes before it claims; the runner lets
    # go at once, and the message is still delivered later, read back.
    transport = StallsS0()
    release, started = transport.release, transport.started

    spool, runner, clock = make_runner(tmp_path, transport, max_deliveries=1)
    queued(spool, "S0", envelope())

    async def main() -> None:
        runner.start()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if started:
                break
        assert started == ["S0"]
        runner.kick("H1", spool.write_claimed("H1", envelope(), b"", io.BytesIO(BODY)))
        await asyncio.sleep(0.2)
        assert spool.claim("H1") is None  # held by the runner, waiting for the slot
        (spool.path / "flush").touch()  # what the command line does first
        claim = None
        for _ in range(300):
            await asyncio.sleep(0.01)
            claim = spool.claim("H1")
            if claim is not None:
                break
        assert claim is not None, "the runner kept the claim of an untried message"
        claim.release()
        release.set()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if not spool.ids():
                break
        await runner.stop(grace=1)

    asyncio.run(main())
    assert spool.ids() == []
    assert started == ["S0", "H1"]


def test_a_quarantined_message_goes_to_the_quarantine_transport_only(tmp_path):
    table = {
        "path": "q",
        "routes": {"*": {"type": "maildir", "path": "mail"}},
        "transports": {"review": {"type": "maildir", "path": "review"}},
        "quarantine": "review",
    }
    plugins, queue = quarantining_session(tmp_path, table, "score 9.5")

    forged = b"X-Bonzo-Quarantine-Final-Recipients: <forged@example.org>\r\n" + BODY

    async def main() -> bytes:
        await queue.bonzo_startup(App(tmp_path, plugins))
        reply = await send(SessionTester(plugins), forged)
        assert queue.spool is not None
        await drained(queue, 4)
        await queue.bonzo_shutdown()
        return reply

    assert asyncio.run(main()).startswith(b"250 2.0.0")
    [kept] = list((tmp_path / "review" / "new").iterdir())
    content = kept.read_bytes()
    assert b"X-Bonzo-Quarantine: suspect: score 9.5\r\n" in content
    # The client's own field of that name is gone (tester review9 L1).
    assert b"forged" not in content
    assert content.count(b"X-Bonzo-Quarantine-Final-Recipients") == 0
    mail = tmp_path / "mail" / "new"
    assert not mail.exists() or not any(mail.iterdir())  # nothing to the recipients
    with pytest.raises(ValueError, match="quarantine: no transport named 'nope'"):
        QueuePlugin().bonzo_configure({**table, "quarantine": "nope"}, App(tmp_path))


@pytest.mark.parametrize(
    ("transport", "kind"),
    [
        ({"type": "lmtp", "host": "127.0.0.1", "port": 24}, 'of type "lmtp"'),
        ({"type": "smarthost", "host": "relay.example.net"}, 'of type "smarthost"'),
        ({"type": "mx"}, 'of type "mx"'),
        ({"type": "maildir", "path": "review", "per_recipient": True}, "with per_recipient"),
    ],
)
def test_a_quarantine_transport_that_delivers_by_recipient_needs_a_recipient(
    tmp_path, transport, kind
):
    # Without one, the quarantined message would go to its own recipients'
    # mailboxes on that transport (tester milter3 H1).
    table = {
        "path": "q",
        "routes": {"*": {"type": "discard"}},
        "transports": {"review": transport},
        "quarantine": "review",
    }
    with pytest.raises(ValueError, match=r"^quarantine_recipient: required with quarantine = "):
        QueuePlugin().bonzo_configure(table, App(tmp_path))
    with pytest.raises(ValueError, match=re.escape(kind)):
        QueuePlugin().bonzo_configure(table, App(tmp_path))
    plugin = QueuePlugin()
    plugin.bonzo_configure({**table, "quarantine_recipient": "review@example.org"}, App(tmp_path))
    assert plugin.quarantine_recipient is not None
    assert plugin.quarantine_recipient.original == "review@example.org"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"quarantine": None, "quarantine_recipient": "r@example.org"}, "set without quarantine"),
        ({"quarantine_recipient": "postmaster"}, "needs a domain"),
    ],
)
def test_quarantine_recipient_errors(tmp_path, change, error):
    table = {
        "path": "q",
        "transports": {"review": {"type": "maildir", "path": "review"}},
        "quarantine": "review",
        **change,
    }
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(ValueError, match=rf"^quarantine_recipient: .*{error}"):
        QueuePlugin().bonzo_configure(table, App(tmp_path))


def test_a_quarantined_message_goes_to_the_quarantine_recipient_alone(tmp_path):
    table = {
        "path": "q",
        "routes": {"*": {"type": "maildir", "path": "mail", "per_recipient": True}},
        "transports": {"review": {"type": "maildir", "path": "mail", "per_recipient": True}},
        "quarantine": "review",
        "quarantine_recipient": "Quarantine@Example.org",
    }
    plugins, queue = quarantining_session(tmp_path, table, "score 9.5")
    records: list[Any] = []

    async def main() -> bytes:
        await queue.bonzo_startup(App(tmp_path, plugins))
        record_accepts(queue, records)
        reply = await send(SessionTester(plugins), rcpts=["b@example.net", "c@example.org"])
        await drained(queue, 4)
        await queue.bonzo_shutdown()
        return reply

    assert asyncio.run(main()).startswith(b"250 2.0.0")
    [record] = records
    assert [(r["address"], r["params"]) for r in record["recipients"]] == [
        ("Quarantine@Example.org", {"NOTIFY": "NEVER"})
    ]
    assert record["quarantine"]["to"] == "Quarantine@example.org"  # canonical
    [kept] = list((tmp_path / "mail" / "example.org" / "quarantine" / "new").iterdir())
    assert b"X-Bonzo-Quarantine: suspect: score 9.5\r\n" in kept.read_bytes()
    assert sorted(p.name for p in (tmp_path / "mail").iterdir()) == ["example.org"]
    assert [p.name for p in (tmp_path / "mail" / "example.org").iterdir()] == ["quarantine"]


@pytest.mark.parametrize("recipient", [None, "review@example.org"])
def test_a_quarantine_stands_when_plugins_removed_every_recipient(tmp_path, recipient):
    # A milter's QUARANTINE and DELRCPT of every recipient: kept, not
    # discarded (tester milter3 M1); without a quarantine_recipient, in the
    # one folder for the recipients the client gave.
    from bonzo import Quarantine

    table = {
        "path": "q",
        "routes": {"*": {"type": "maildir", "path": "mail"}},
        "transports": {"review": {"type": "maildir", "path": "review"}},
        "quarantine": "review",
    }
    if recipient is not None:
        table["quarantine_recipient"] = recipient
    plugins, queue = queue_session(tmp_path, table)

    class Suspect:
        @hookimpl
        def bonzo_message(self, envelope):
            for r in list(envelope.recipients):
                envelope.remove_recipient(r)
            return Quarantine("held")

    plugins.register(Suspect(), "suspect")

    async def main() -> bytes:
        await queue.bonzo_startup(App(tmp_path, plugins))
        reply = await send(SessionTester(plugins), rcpts=["b@example.net"])
        await drained(queue, 4)
        await queue.bonzo_shutdown()
        return reply

    assert asyncio.run(main()).startswith(b"250 2.0.0 Ok: queued as")
    [kept] = list((tmp_path / "review" / "new").iterdir())
    content = kept.read_bytes()
    assert b"X-Bonzo-Quarantine: suspect: held\r\n" in content
    # For the quarantine_recipient, its Delivered-To; kept for the client's
    # recipients, none of theirs (the released copy would be a loop there).
    lead = "Return-Path: <alice@example.org>\r\n"
    if recipient is not None:
        lead += f"Delivered-To: {recipient}\r\n"
    assert content.startswith(lead.encode())
    assert content.count(b"Delivered-To:") == (recipient is not None)


def test_a_quarantine_copy_in_one_folder_names_no_recipient_as_delivered_to(tmp_path):
    # It is the reviewer's copy: a Delivered-To for its recipient would make
    # the released copy a forwarding loop at that recipient's Postfix.
    folder = RouteTable({}, {"quar": {"type": "maildir", "path": "quar"}}, App(tmp_path))
    folder.start()
    spool, runner, clock = make_runner(tmp_path, folder.named["quar"])
    runner.routes.named["quar"] = folder.named["quar"]
    queued(spool, "Q4", {**envelope("alice@example.org", "b@example.net"), "transport": "quar"})
    queued(spool, "Q5", envelope("alice@example.org", "b@example.net"))  # not quarantined
    asyncio.run(runner.attempt("Q4"))
    [copy] = (tmp_path / "quar" / "new").iterdir()
    assert copy.read_bytes().startswith(b"Return-Path: <alice@example.org>\r\n")
    assert b"Delivered-To:" not in copy.read_bytes()
    asyncio.run(runner.attempt("Q5"))
    [other] = [p for p in (tmp_path / "quar" / "new").iterdir() if p != copy]
    lead = b"Return-Path: <alice@example.org>\r\nDelivered-To: b@example.net\r\n"
    assert other.read_bytes().startswith(lead)


def test_a_one_folder_quarantine_copy_is_queued_with_notify_never(tmp_path):
    # The client's NOTIFY=SUCCESS got the sender "Action: delivered" for a
    # quarantined message (tester review9 M1); its ORCPT is kept.
    table = {
        "path": "q",
        "routes": {"*": {"type": "discard"}},
        "transports": {"review": {"type": "maildir", "path": "review"}},
        "quarantine": "review",
    }
    plugins, queue = quarantining_session(tmp_path, table, "held")
    records: list[Any] = []

    async def main() -> bytes:
        await queue.bonzo_startup(App(tmp_path, plugins))
        record_accepts(queue, records)
        tester = SessionTester(plugins)
        await tester.connect()
        await tester.send(b"EHLO c\r\nMAIL FROM:<alice@example.org>\r\n")
        await tester.send(b"RCPT TO:<b@example.net> NOTIFY=SUCCESS ORCPT=rfc822;b@example.net\r\n")
        await tester.send(b"DATA\r\n")
        reply = await tester.send(BODY + b".\r\n")
        await drained(queue, 4)
        await queue.bonzo_shutdown()
        return reply

    assert asyncio.run(main()).startswith(b"250 2.0.0")
    [record] = records
    [params] = [r["params"] for r in record["recipients"]]
    assert params["NOTIFY"] == "NEVER"
    assert params["ORCPT"] == "rfc822;b@example.net"
    assert "to" not in record["quarantine"]


def test_the_envelope_is_kept_with_the_message(tmp_path):
    plugins, queue = queue_session(
        tmp_path, {"path": "q", "routes": {"x.test": {"type": "discard"}}}
    )

    async def main() -> Any:
        await queue.bonzo_startup(App(tmp_path, plugins))
        await send(SessionTester(plugins), rcpts=["b@example.net", "c@Example.NET"])
        assert queue.spool is not None
        message = queue.spool.load(queue.spool.ids()[0])
        await queue.bonzo_shutdown()
        return message

    message = asyncio.run(main())
    assert message.sender == "alice@example.org"
    assert message.mail_params == {"BODY": "8BITMIME"}
    assert [(r.address, r.domain) for r in message.recipients] == [
        ("b@example.net", "example.net"),
        ("c@Example.NET", "example.net"),
    ]
    assert message.session["remote_ip"] == "192.0.2.1" and message.session["helo"] == "c"


@pytest.mark.expect_errors
@pytest.mark.parametrize(
    ("code", "reply"), [(errno.ENOSPC, b"452 4.3.1"), (errno.EIO, b"451 4.3.0")]
)
def test_a_storage_fault_is_4xx_and_leaves_nothing(tmp_path, monkeypatch, code, reply):
    from bonzo import durable

    plugins, queue = queue_session(tmp_path)
    real_fsync = os.fsync
    # The reference implementation: its fsync calls can be made to fail.
    monkeypatch.setattr(durable, "commit_files", durable._commit_files_py)

    def failing(fd: int) -> None:
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(tmp_path / "q" / "tmp")):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    async def main() -> bytes:
        await queue.bonzo_startup(App(tmp_path, plugins))
        monkeypatch.setattr(os, "fsync", failing)
        answer = await send(SessionTester(plugins))
        monkeypatch.setattr(os, "fsync", real_fsync)
        await queue.bonzo_shutdown()
        return answer

    answer = asyncio.run(main())
    assert answer.startswith(reply)
    assert list((tmp_path / "q" / "tmp").iterdir()) == []
    assert list((tmp_path / "q" / "data").iterdir()) == []


def test_a_looping_message_is_refused(tmp_path):
    plugins, queue = queue_session(tmp_path, {"path": "q", "max_hops": 3,
                                              "routes": {"*": {"type": "discard"}}})  # fmt: skip
    body = b"Received: a\r\nReceived: b\r\nReceived: c\r\n" + BODY

    async def main() -> bytes:
        await queue.bonzo_startup(App(tmp_path, plugins))
        answer = await send(SessionTester(plugins), body)
        await queue.bonzo_shutdown()
        return answer

    assert asyncio.run(main()).startswith(b"554 5.4.6 Too many hops (4): mail loop")


# ------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"bogus": 1}, r"^bogus: unknown key \(known: path, mode, "),
        ({"lifetime": "forever"}, r"^lifetime: expected a duration"),
        ({"lifetime": 0}, r"^lifetime: expected a positive duration"),
        ({"lifetime": "3650d"}, r"^lifetime: expected a positive duration under ten years"),
        ({"delay_warning": -1}, r"^delay_warning: expected a positive duration"),
        ({"min_backoff": 600, "max_backoff": 300}, "max_backoff: 300s is less than min_backoff"),
        ({"max_deliveries": 0}, r"^max_deliveries: expected an integer >= 1, got 0$"),
        ({"mode": "0644x"}, r"^mode: expected an octal string"),
        ({"mode": 0o666}, r"^mode: the owner must read and write, and nobody else write"),
        ({"path": ""}, r"^path: expected a path"),
        ({"routes": {"*": {"type": "pigeon"}}}, r'^routes\."\*"\.type: expected one of mx, '),
        ({"routes": {"*": {"port": 25}}}, r'^routes\."\*"\.type: required \(one of mx, '),
        ({"routes": {"*": "nope"}}, r'^routes\."\*": no transport named \'nope\''),
        ({"routes": {"*": 3}}, r'^routes\."\*": expected a table with a type or a transport'),
        (
            {"routes": {"*": {"type": "maildir", "path": "m", "colour": 1}}},
            r'^routes\."\*"\.colour: unknown key',
        ),
        (
            {"transports": {"relay": {"type": "smarthost", "host": "h", "port": 0}}},
            r"^transports\.relay\.port: expected an integer >= 1, got 0$",
        ),
        (
            {"transports": {"relay": {"type": "mx", "helo_name": "a b"}}},
            r"^transports\.relay\.helo_name: expected printable ASCII without spaces",
        ),
        (
            {"transports": {"in": {"type": "lmtp", "path": "s", "colour": 1}}},
            r"^transports\.in\.colour: unknown key \(known: type, host, port, path, ",
        ),
        ({"transports": {"t": {"type": "discard"}}, "quarantine": ""}, r"^quarantine: expected"),
        (
            {"transports": {"out": {"type": "mx", "source_address": "10.0.0.300"}}},
            r"^transports\.out\.source_address: expected an IP address",
        ),
    ],
)
def test_bad_configuration_names_the_key(tmp_path, table, message):
    with pytest.raises(ValueError, match=message):
        QueuePlugin().bonzo_configure(table, App(tmp_path))


def test_a_queue_path_that_cannot_be_created_is_a_configuration_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"^path: .*/file/q cannot be created: .*/file is not a"):
        QueuePlugin().bonzo_configure({"path": "file/q"}, App(tmp_path))
    with pytest.raises(ValueError, match=r"^path: .*/file exists and is not a directory$"):
        QueuePlugin().bonzo_configure({"path": "file"}, App(tmp_path))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_queue_path_where_nothing_can_be_created_is_a_configuration_error(tmp_path):
    """A directory that exists but takes no new entry (/proc; a read-only
    mount): bonzo check passed it, then the daemon exited with status 1 at
    startup, naming neither the file nor the key."""
    with pytest.raises(ValueError) as info:
        QueuePlugin().bonzo_configure({"path": "/proc/queue"}, App(tmp_path))
    assert str(info.value) == (
        "path: /proc/queue cannot be created in /proc: No such file or directory"
    )
    with pytest.raises(ValueError, match=r"^path: nothing can be created in /proc/self: "):
        QueuePlugin().bonzo_configure({"path": "/proc/self"}, App(tmp_path))
    # A path that can be made is fine, and the test leaves nothing behind.
    QueuePlugin().bonzo_configure({"path": "a/b/queue"}, App(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), ("30s", 30.0), ("5m", 300.0), ("4h", 14400.0), ("5d", 432000.0), ("1.5h", 5400.0)],
)
def test_durations(value, seconds):
    assert parse_duration(value, "k") == seconds


def test_route_patterns_most_specific_first(tmp_path):
    routes = RouteTable(
        {
            "example.org": {"type": "discard"},
            "*.example.org": {"type": "discard"},
            "*.b.example.org": {"type": "discard"},
            "*": {"type": "discard"},
        },
        {},
        App(tmp_path),
    )

    def which(domain: str) -> int:
        transport = routes.route(Recipient("x@" + domain, "x@" + domain, domain))
        return routes.transports.index(transport)

    assert which("example.org") == 0
    assert which("a.example.org") == 1
    assert which("x.b.example.org") == 2
    assert which("elsewhere.test") == 3


def test_json_round_trip_of_state_file(tmp_path):
    spool = Spool(tmp_path / "q")
    spool.setup()
    queued(spool, "J1", envelope())
    message = spool.load("J1")
    spool.save_state(message)
    state = json.loads((spool.state / "J1.json").read_text())
    assert state["recipients"][0]["status"] == "pending"


def test_a_delivery_that_takes_too_long_is_deferred(tmp_path):
    class Stuck(Scripted):
        async def deliver(self, message, recipients):
            await asyncio.sleep(30)
            return [OK for _ in recipients]

    spool, runner, clock = make_runner(tmp_path, Stuck({}), delivery_timeout=0.1)
    queued(spool, "Z1", envelope())
    asyncio.run(runner.attempt("Z1"))
    recipient = spool.load("Z1").recipients[0]
    assert (recipient.status, recipient.reply) == ("deferred", "451 4.4.2 Delivery timed out")


def test_the_example_configuration_shows_every_key_and_configures(tmp_path, monkeypatch):
    """bonzo.toml.example's queue block names every key of the plugin and of
    each route type, and, uncommented, is a configuration the plugin takes."""
    import re

    from bonzo_plugins.queue.plugin import KEYS
    from bonzo_plugins.queue.transports import LMTPTransport, MXTransport, SmarthostTransport

    example = (Path(__file__).parents[2] / "bonzo.toml.example").read_text("utf-8")
    start = example.index("# [plugins.queue]")
    end = example.find("\n\n", start)
    block = example[start : end if end >= 0 else None]
    shown = set(re.findall(r"^# (\w+) = ", block, re.M))
    shown |= set(re.findall(r"[{,] (\w+) = ", block))  # keys inside inline tables
    every = set(KEYS) - {"routes", "transports"}
    for transport in (SmarthostTransport, LMTPTransport, MXTransport):
        every |= set(transport.KEYS)
    every |= {"per_recipient"}  # the maildir route's own key
    assert every - shown == set()
    text = "\n".join(line[2:] for line in block.splitlines() if line.startswith("# "))
    monkeypatch.setenv("RELAY_PASSWORD", "s3cret")
    # The relay's tls_ca_file, read when the plugin is configured.
    import trustme

    (tmp_path / "ca.pem").write_bytes(trustme.CA().cert_pem.bytes())
    config = parse_config('[plugins]\nenabled = ["queue"]\n' + text, "example", tmp_path)
    table = config.plugins.tables["queue"]
    assert table["transports"]["relay"]["password"] == "s3cret"
    plugin = QueuePlugin()
    plugin.bonzo_configure(table, App(tmp_path))
    assert plugin.routes is not None and len(plugin.routes.transports) == 5
    assert plugin.quarantine == "review"
    assert plugin.settings.lifetime == 5 * 86400


class Counting:
    """Delivers everything after a short wait, counting deliveries at once."""

    kind = "counting"
    final = False

    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.now = 0
        self.most = 0

    def destination(self, recipient: Recipient) -> str:
        return recipient.domain

    async def deliver(self, message: Any, recipients: Sequence[Recipient]) -> list[Outcome]:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.002)
        finally:
            self.now -= 1
        self.delivered.append(message.id)
        return [OK for _ in recipients]


def test_runner_drains_a_backlog_and_new_mail_within_its_limits(tmp_path):
    """A queue found at start and messages kicked while it drains are all
    delivered once, never more than max_deliveries at a time."""
    transport = Counting()
    spool, runner, clock = make_runner(tmp_path, transport, max_deliveries=4, per_destination=4)
    for i in range(60):
        queued(spool, f"B{i}", envelope())

    async def main() -> None:
        runner.start()
        await asyncio.sleep(0.01)
        for i in range(20):  # arriving while the backlog drains
            queued(spool, f"N{i}", envelope())
            runner.kick(f"N{i}")
        for _ in range(1000):  # at most 10 s
            if not spool.ids() and not runner._inflight:
                break
            await asyncio.sleep(0.01)
        await runner.stop()

    asyncio.run(main())
    assert spool.ids() == []
    assert sorted(transport.delivered) == sorted(
        [f"B{i}" for i in range(60)] + [f"N{i}" for i in range(20)]
    )
    assert 1 <= transport.most <= 4


def test_metrics_count_outcomes_per_recipient_and_the_depth_by_state(tmp_path):
    prometheus = pytest.importorskip("prometheus_client")
    from bonzo.metrics import Metrics

    transport = Scripted(
        {
            "bob@example.net": [DEFER],
            "eve@example.net": [OK],
            "gone@example.net": [GONE],
            "new@example.net": [OK],
            "alice@example.org": [OK],  # the bounce report
        }
    )
    spool, runner, clock = make_runner(tmp_path, transport)
    queued(spool, "M1", envelope("alice@example.org", "bob@example.net", "eve@example.net",
                                 "gone@example.net"))  # fmt: skip
    registry = prometheus.CollectorRegistry()
    counter = Metrics(registry=registry).install()

    def value(name: str, **labels: str) -> float:
        counter.flush()
        return registry.get_sample_value(name, labels) or 0.0

    async def main() -> None:
        await runner.attempt("M1")  # one of each outcome; the report is queued
        queued(spool, "M2", envelope("a@example.org", "new@example.net"))
        runner.start()  # scans at once: M1 deferred; M2 and the report new
        for _ in range(500):
            if spool.ids() == ["M1"]:
                break
            await asyncio.sleep(0.01)
        await runner.stop()

    try:
        asyncio.run(main())
    finally:
        counter.uninstall()
    assert spool.ids() == ["M1"]
    assert value("bonzo_queue_deliveries_total", outcome="delivered") == 3
    assert value("bonzo_queue_deliveries_total", outcome="deferred") == 1
    assert value("bonzo_queue_deliveries_total", outcome="bounced") == 1
    assert value("bonzo_queue_messages", state="deferred") == 1
    assert value("bonzo_queue_messages", state="new") == 2
    assert value("bonzo_queue_messages", state="held") == 0


@pytest.mark.parametrize("accepting", [True, False])
def test_deliveries_yield_to_acceptance_while_the_loop_is_busy(tmp_path, accepting):
    """While the worker's loop is busy and mail is being accepted, at most
    busy_deliveries run at once; a loop busy without acceptance (a backlog
    draining) delivers max_deliveries at once; when the load eases, the
    runner says so and drains at full speed."""
    import time

    transport = Counting()
    spool, runner, clock = make_runner(
        tmp_path, transport, max_deliveries=8, per_destination=8, busy_deliveries=2
    )
    seen: dict[str, Any] = {}

    async def main() -> None:
        runner.start()
        seen["timer at start"] = runner._monitor
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # a burst of work on the loop's thread
            if accepting:
                runner.accepted()
            spin = time.perf_counter() + 0.005
            while time.perf_counter() < spin:
                pass
            ready = runner.yielding or not accepting
            if ready and "kicked" not in seen and time.monotonic() > end - 0.7:
                for i in range(40):
                    queued(spool, f"Y{i}", envelope())
                    runner.kick(f"Y{i}")
                seen["kicked"] = runner.yielding
                transport.most = transport.now
            await asyncio.sleep(0)
        seen["busy"] = transport.most
        for _ in range(100):  # the load has eased: full speed again
            if not runner.yielding:
                break
            await asyncio.sleep(0.02)
        for _ in range(500):
            if not spool.ids() and not runner._inflight:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.8)  # past the acceptance window
        seen["timer after"] = runner._monitor
        await runner.stop()

    asyncio.run(main())
    assert spool.ids() == [] and len(transport.delivered) == 40
    # The loop is measured only while mail comes in: no timer when idle.
    assert seen["timer at start"] is None and seen["timer after"] is None
    assert seen["kicked"] is accepting
    if accepting:
        assert seen["busy"] <= 2  # acceptance first
    else:
        assert 2 < seen["busy"] <= 8  # nothing to yield to
    assert not runner.yielding


def _per_recipient(report: Any) -> list[Any]:
    parsed = email.message_from_bytes(report.read(), policy=email.policy.default)
    return list(parsed.get_payload()[1].get_payload()[1:])


def test_a_report_names_a_remote_mta_only_for_its_own_reply(tmp_path):
    # RFC 3464 2.3.5/2.3.6: Remote-MTA and an "smtp" diagnostic only when a
    # server answered; a failure decided here names no host.
    transport = Scripted({"bob@example.net": [GONE], "carol@example.net": [NO_DOMAIN]})
    spool, runner, clock = make_runner(tmp_path, transport)
    queued(spool, "M1", envelope("alice@example.org", "bob@example.net", "carol@example.net"))
    asyncio.run(runner.attempt("M1"))
    [report] = reports(spool)
    bob, carol = _per_recipient(report)
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == "X-Bonzo; 550 5.1.2 example.net: no such domain"


@pytest.mark.parametrize(
    "server, field",
    [
        ("mx.example.net[192.0.2.1]:25", "dns; mx.example.net"),
        ("192.0.2.7:2525", "dns; 192.0.2.7"),
        ("[2001:db8::1]:25", "dns; [2001:db8::1]"),
        ("mx[2001:db8::1]:25", "dns; mx"),
        ("unix:/run/dovecot/lmtp", "x-unix; /run/dovecot/lmtp"),
        ("relay.example", "dns; relay.example"),
    ],
)
def test_remote_mta_is_a_host_name_without_the_port(tmp_path, server, field):
    # RFC 3464 2.3.5: "dns; " is followed by a host name, not host:port.
    gone = Outcome("failed", 550, "5.1.1", "No such user", server, remote=True)
    transport = Scripted({"bob@example.net": [gone]})
    spool, runner, clock = make_runner(tmp_path, transport)
    queued(spool, "R1", envelope())
    asyncio.run(runner.attempt("R1"))
    [report] = reports(spool)
    [bob] = _per_recipient(report)
    assert bob["Remote-MTA"] == field


def test_a_delay_notice_keeps_whose_reply_it_was_across_attempts(tmp_path):
    # The notice is built from the recipients' saved state, not the outcome.
    transport = Scripted({"bob@example.net": [DEFER] * 3, "carol@example.net": [LOCAL_DEFER] * 3})
    spool, runner, clock = make_runner(tmp_path, transport, min_backoff=3600,
                                       delay_warning=2 * 3600)  # fmt: skip
    queued(spool, "W2", envelope("alice@example.org", "bob@example.net", "carol@example.net"))

    async def main() -> None:
        for _ in range(3):
            await runner.attempt("W2")
            clock.now += 4000

    asyncio.run(main())
    assert [r.remote for r in spool.load("W2").recipients] == [True, False]
    [notice] = reports(spool)
    bob, carol = _per_recipient(notice)
    assert bob["Action"] == carol["Action"] == "delayed"
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert bob["Diagnostic-Code"] == "smtp; 451 4.3.0 Try later"
    assert carol["Remote-MTA"] is None
    assert carol["Diagnostic-Code"] == "X-Bonzo; 451 4.4.4 No mail host could be reached"


def test_a_success_report_for_a_local_delivery_names_no_remote_mta(tmp_path):
    stored = Outcome("delivered", 250, "2.0.0", "Delivered", str(tmp_path / "Maildir"))
    transport = Scripted({"bob@example.net": [stored]})
    spool, runner, clock = make_runner(tmp_path, transport)
    queued(spool, "S2", envelope("alice@example.org", "bob@example.net", NOTIFY="SUCCESS"))
    asyncio.run(runner.attempt("S2"))
    [report] = reports(spool)
    [bob] = _per_recipient(report)
    assert bob["Remote-MTA"] is None
    assert bob["Diagnostic-Code"] == "X-Bonzo; 250 2.0.0 Delivered"


def test_the_queue_command_says_when_a_message_it_waited_for_has_left(tmp_path):
    """bonzo queue bounce/delete/hold wait for a message being delivered;
    if the delivery ends it, the command says so, not "being delivered"."""
    from bonzo_plugins.queue.cli import Busy, Problem, _claim

    spool = Spool(tmp_path / "q")
    spool.setup()
    queued(spool, "L1", envelope())
    held = spool.claim("L1")
    assert held is not None
    with pytest.raises(Busy, match="L1: being delivered right now"):
        _claim(spool, "L1", 0.1)
    spool.remove("L1")
    with pytest.raises(Problem) as raised:
        _claim(spool, "L1", 0.1)
    assert str(raised.value) == "L1: it left the queue meanwhile (delivered or bounced)"
    held.release()


def test_stash_entries_json_cannot_hold_are_left_out_and_named_once(caplog):
    from bonzo_plugins.queue import plugin as queue_plugin

    # "_live": a transient key (a plugin's live objects): left out, no warning.
    stash = {"score": 4.5, "tags": ["a"], "seen": {1, 2}, "when": object(), "_live": object()}
    with caplog.at_level(logging.WARNING, logger="bonzo.plugins.queue"):
        assert queue_plugin._jsonable(stash, "envelope") == {"score": 4.5, "tags": ["a"]}
        assert queue_plugin._jsonable(stash, "envelope") == {"score": 4.5, "tags": ["a"]}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per key, not one per message
    assert "envelope.stash['seen'] (set) is not a JSON value" in warnings[0]
    assert "envelope.stash['when'] (object)" in warnings[1]


@pytest.mark.parametrize(
    "recipients, warned",
    [
        ('relay_networks = ["127.0.0.0/8"]', True),  # no local domain: the hostname
        ('domains = ["example.org"]', False),
        # The hostname is a local domain: no fallback, no warning.
        ('domains = ["mx.example.test"]', False),
    ],
)
def test_check_warns_when_the_postmaster_falls_back_to_the_hostname(tmp_path, recipients, warned):
    # postmaster@<hostname> is most often routed by MX back to this server:
    # it loops back, and after lifetime bounces to a sender anyone may forge.
    from bonzo.app import MailApp

    text = (
        '[server]\nhostname = "mx.example.test"\n'
        '[plugins]\nenabled = ["recipients", "queue"]\n'
        f"[plugins.recipients]\n{recipients}\n"
        f'[plugins.queue]\npath = "{tmp_path / "q"}"\n'
        '[plugins.queue.routes]\n"*" = { type = "mx" }\n'
    )
    warnings = MailApp(parse_config(text, "bonzo.toml", tmp_path)).warnings()
    found = [w for w in warnings if "goes to <postmaster@mx.example.test> (no local domain" in w]
    assert bool(found) is warned, warnings
    if warned:
        assert "set [plugins.queue] postmaster" in found[0]


def test_a_scan_longer_than_scan_interval_spaces_the_next_ones_out(tmp_path, caplog):
    """No delivery starts while a scan runs, and the next scan was due
    scan_interval after the last one *began*: a queue long enough that a
    scan outlasts scan_interval was scanned back to back, deliveries
    starting only in the gaps (a few a second with 68,000 messages). The
    next scan now comes at least four scans' time after the end of one."""
    transport = Scripted({})
    spool, runner, clock = make_runner(tmp_path, transport, scan_interval=0.05)
    runner.clock = time.time
    scans = []
    real_scan = runner._scan

    def slow_scan() -> None:
        scans.append(time.monotonic())
        time.sleep(0.2)
        real_scan()

    runner._scan = slow_scan  # type: ignore[method-assign]

    async def main() -> None:
        runner.start()
        await asyncio.sleep(1.5)
        await runner.stop(grace=0.1)

    with caplog.at_level(logging.WARNING, logger="bonzo.plugins.queue"):
        asyncio.run(main())
    assert 1 <= len(scans) <= 3, scans  # back to back: 6 or 7
    gaps = [b - a for a, b in itertools.pairwise(scans)]
    assert all(gap >= 0.2 + 0.8 - 0.05 for gap in gaps), gaps
    [warning] = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    expected = r"more than scan_interval \(0\.05 s\): the next scans come \d+ s apart"
    assert re.search(expected, warning), warning

"""The queue's files after crashes, disk faults and operators' hands: one bad
file is one unreadable message — named, skipped by the runner, listed and
deletable by ``bonzo queue`` — never a stopped runner, a message that is
never due, a duplicate delivery, a hang or a traceback."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from bonzo_plugins.queue.routes import DiscardTransport, Outcome, RouteTable
from bonzo_plugins.queue.runner import Runner, RunnerSettings
from bonzo_plugins.queue.spool import MAX_STATE, GroupSync, Spool, SpoolError
from daemon_support import daemon_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BODY = b"Subject: x\r\n\r\nhello\r\n"
DEFERRED_NAN = b'{"recipients":[{"status":"deferred","attempts":1,"next_attempt":NaN}]}'


class App:
    def __init__(self, base: Path) -> None:
        self.base_dir = base
        self.plugins = None

        class _Settings:
            hostname = "mx.test"

        self.settings = _Settings()


def env(**over: Any) -> dict[str, Any]:
    e = {
        "arrival": time.time() - 60,
        "sender": "alice@example.org",
        "mail_params": {},
        "recipients": [
            {
                "address": "bob@example.net",
                "canonical": "bob@example.net",
                "domain": "example.net",
                "params": {},
            }
        ],
        "session": {},
        "records": {},
    }
    e.update(over)
    return e


def make_spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "q")
    spool.setup()
    return spool


def setup_at_start(spool: Spool) -> int:
    """:meth:`Spool.setup` as at a start: in a new process (a later setup
    in this one is a reload's, which leaves a message's state alone)."""
    code = (
        "from pathlib import Path; from bonzo_plugins.queue.spool import Spool; "
        f"print(Spool(Path({str(spool.path)!r})).setup())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=daemon_env(), check=True)  # fmt: skip
    return int(done.stdout)


def write(spool: Spool, id: str, envelope: dict[str, Any] | None = None) -> None:
    spool.write(id, envelope or env(), b"", io.BytesIO(BODY))


def raw_envelope(spool: Spool, id: str, old: bytes, new: bytes) -> None:
    """Edit the envelope line of a data file in place (write() refuses what
    a damaged file holds)."""
    path = spool.data / id
    raw = path.read_bytes()
    assert old in raw
    path.write_bytes(raw.replace(old, new, 1))


class Counting(DiscardTransport):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def deliver(self, message: Any, recipients: Sequence[Any]) -> list[Outcome]:
        self.calls.append(message.id)
        return await super().deliver(message, recipients)


def make_runner(tmp_path: Path, spool: Spool, transport: Any, **kw: Any) -> Runner:
    routes = RouteTable({}, {}, App(tmp_path))
    routes.default = transport
    return Runner(
        spool,
        GroupSync(spool.data),
        routes,
        None,
        RunnerSettings(hostname="mx.test", scan_interval=0.2, **kw),
    )


def only_skips(caplog: pytest.LogCaptureFixture, *ids: str) -> None:
    """The errors logged are the runner's skips of messages ``ids``, nothing else."""
    errors = {r.getMessage().split(":", 2)[1] for r in caplog.records if r.levelname == "ERROR"}
    assert errors == {f" skipping unreadable message {id}" for id in ids}
    assert "Traceback" not in caplog.text


def run_for(runner: Runner, seconds: float, done: Callable[[], bool]) -> None:
    """Run the real runner loop until ``done()`` or ``seconds``; fail if its
    task ended on its own."""

    async def main() -> None:
        runner.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not done():
            await asyncio.sleep(0.05)
        task = runner._task
        assert task is not None and not task.done(), "the runner's task ended"
        await runner.stop(grace=1)

    asyncio.run(main())


def cli(spool: Spool, tmp_path: Path, *args: str, timeout: float = 60, logging: str = "") -> Any:
    config = tmp_path / "bonzo.toml"
    config.write_text(
        logging
        + textwrap.dedent(
            f"""\
            [plugins]
            enabled = ["queue"]
            [plugins.queue]
            path = "{spool.path}"
            [plugins.queue.routes]
            "*" = {{ type = "discard" }}
            """
        )
    )
    return subprocess.run(
        [sys.executable, "-m", "bonzo", "queue", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=daemon_env(),
        cwd=tmp_path,
    )


# ------------------------------------------------------------------ runner
STATE_KILLERS = {
    "array": b"[]",
    "null": b"null",
    "number": b"1",
    "attempts-1e400": b'{"recipients":[{"status":"deferred","attempts":1e400}]}',
    "next-10**400": b'{"recipients":[{"status":"deferred","next_attempt":1' + b"0" * 400 + b"}]}",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "next-nan": DEFERRED_NAN,
}


@pytest.mark.expect_errors  # the runner's skips, checked by only_skips()
@pytest.mark.parametrize("content", STATE_KILLERS.values(), ids=STATE_KILLERS.keys())
def test_one_bad_state_file_never_stops_the_runner(tmp_path, content, caplog):
    spool = make_spool(tmp_path)
    write(spool, "BAD")
    write(spool, "GOOD")
    (spool.state / "BAD.json").write_bytes(content)
    transport = Counting()
    run_for(make_runner(tmp_path, spool, transport), 5.0, lambda: "GOOD" in transport.calls)
    assert transport.calls == ["GOOD"]
    assert "BAD.json: bad state: " in caplog.text
    only_skips(caplog, "BAD")


@pytest.mark.expect_errors  # the runner's skips, checked by only_skips()
@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"arrival":12345.0', b'"arrival":1' + b"0" * 400),
        (b'"arrival":12345.0', b'"arrival":NaN'),
        (b'"arrival":12345.0', b'"arrival":Infinity'),
        (b'"arrival":12345.0', b'"arrival":-1e12'),
        (b'"address":"bob@example.net"', b'"address":12345'),
        (b'"sender":"alice@example.org"', b'"sender":["alice@example.org"]'),
        (b'"params":{}', b'"params":{"NOTIFY":1}'),
        # A damaged file's CR LF in an address would reach a report's fields.
        (b'"address":"bob@example.net"', b'"address":"bob@example.net\\r\\nX-Injected: 1"'),
        (b'"sender":"alice@example.org"', b'"sender":"alice@example.org\\u0000"'),
    ],
    ids=[
        "arrival-huge",
        "arrival-nan",
        "arrival-inf",
        "arrival-negative",
        "address-number",
        "sender-array",
        "param-number",
        "address-crlf",
        "sender-nul",
    ],  # fmt: skip
)
def test_a_bad_envelope_is_unreadable_not_stuck_or_delivered_again(tmp_path, old, new, caplog):
    """A value of the wrong type or range: not a message never due (NaN),
    nor one delivered at every retry because its state cannot be saved."""
    spool = make_spool(tmp_path)
    write(spool, "BAD", env(arrival=12345.0))
    raw_envelope(spool, "BAD", old, new)
    write(spool, "GOOD")
    with pytest.raises(SpoolError, match=r"/data/BAD: bad envelope: "):
        spool.load("BAD")
    transport = Counting()
    runner = make_runner(tmp_path, spool, transport, min_backoff=0.2, max_backoff=0.2)
    run_for(runner, 1.5, lambda: False)
    assert transport.calls == ["GOOD"]
    only_skips(caplog, "BAD")


@pytest.mark.expect_errors  # the runner's skips, checked by only_skips()
@pytest.mark.parametrize("kind", ["directory", "symlink-loop", "fifo", "symlink"])
def test_a_state_path_that_is_no_file_is_one_unreadable_message(tmp_path, kind, caplog):
    spool = make_spool(tmp_path)
    write(spool, "BAD")
    write(spool, "GOOD")
    path = spool.state / "BAD.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink-loop":
        path.symlink_to("BAD.json")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        (tmp_path / "elsewhere.json").write_text('{"recipients":[{"status":"pending"}]}')
        path.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(SpoolError, match=r"BAD\.json: (not a regular file|a symbolic link)"):
        spool.load("BAD")
    transport = Counting()
    run_for(make_runner(tmp_path, spool, transport), 5.0, lambda: "GOOD" in transport.calls)
    assert transport.calls == ["GOOD"]


@pytest.mark.expect_errors  # the runner's skips, checked by only_skips()
def test_a_nan_due_time_never_hides_a_due_message(tmp_path, caplog):
    spool = make_spool(tmp_path)
    now = time.time()
    for n, id in enumerate(["N0", "DUE", "LATER", "N3"]):
        write(spool, id)
        os.utime(spool.data / id, (now - 100 + n, now - 100 + n))  # the scan's order
    for id in ("N0", "N3"):
        (spool.state / f"{id}.json").write_bytes(DEFERRED_NAN)
    later = {"recipients": [{"status": "deferred", "attempts": 1, "next_attempt": now + 3600}]}
    (spool.state / "LATER.json").write_text(json.dumps(later))
    transport = Counting()
    run_for(make_runner(tmp_path, spool, transport), 5.0, lambda: "DUE" in transport.calls)
    assert transport.calls == ["DUE"]
    only_skips(caplog, "N0", "N3")


def test_a_huge_state_file_is_refused_unread(tmp_path):
    spool = make_spool(tmp_path)
    write(spool, "M")
    with open(spool.state / "M.json", "wb") as f:
        f.truncate(400 * 1024 * 1024)  # sparse: no disk used
    code = textwrap.dedent(
        f"""\
        import re
        from pathlib import Path
        from bonzo_plugins.queue.spool import Spool, SpoolError
        try:
            Spool(Path({str(spool.path)!r})).load("M")
        except SpoolError as exc:
            print(exc)
        # VmHWM, not ru_maxrss: that one keeps the forking parent's peak.
        status = Path("/proc/self/status").read_text()
        print(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=daemon_env()
    )
    error, peak = out.stdout.strip().splitlines()
    assert error.endswith(f"M.json: larger than {MAX_STATE} octets: not a state file")
    assert int(peak) < 100 * 1024  # KiB: the 400 MB were never read


# ------------------------------------------------------------- the parser
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=12,
)
recipient_state = st.fixed_dictionaries(
    {"status": st.sampled_from(["pending", "deferred", "delivered", "bounced"]) | json_values},
    optional={
        k: json_values
        for k in ("attempts", "next_attempt", "reply", "host", "remote", "done_at", "last_attempt")
    },
)
state_docs = json_values | st.fixed_dictionaries(
    {"recipients": st.lists(recipient_state, min_size=1, max_size=1) | json_values},
    optional={"held": json_values, "warned": json_values, "format": json_values},
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=state_docs)
def test_any_state_file_loads_usable_or_is_a_spool_error_naming_it(tmp_path_factory, doc):
    spool = make_spool(tmp_path_factory.mktemp("p"))
    write(spool, "M")
    (spool.state / "M.json").write_text(json.dumps(doc))
    try:
        message = spool.load("M")
    except SpoolError as exc:
        assert "/state/M.json: " in str(exc)
        return
    for r in message.recipients:
        assert isinstance(r.attempts, int) and isinstance(r.reply, str)
        for t in (r.next_attempt, r.done_at, r.last_attempt):
            assert isinstance(t, float) and 0 <= t < 1e11  # ordered, and a date can show it
    assert isinstance(message.held, bool) and isinstance(message.warned, bool)


envelope_values = st.fixed_dictionaries(
    {k: json_values for k in ("arrival", "sender", "recipients")},
    optional={k: json_values for k in ("mail_params", "session", "records", "transport")},
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=json_values | envelope_values)
def test_any_envelope_loads_usable_or_is_a_spool_error_naming_it(tmp_path_factory, doc):
    spool = make_spool(tmp_path_factory.mktemp("p"))
    line = json.dumps(doc).encode()
    (spool.data / "M").write_bytes(b"BONZO-QUEUE 1\n" + line + b"\n" + BODY)
    try:
        message = spool.load("M")
    except SpoolError as exc:
        assert "/data/M: " in str(exc)
        return
    assert isinstance(message.sender, str) and message.recipients
    assert 0 <= message.arrival < 1e11
    for r in message.recipients:
        assert all(isinstance(x, str) for x in (r.address, r.canonical, r.domain))


# ------------------------------------------------------- crash leftovers
def test_setup_removes_a_state_copy_and_a_state_whose_message_is_gone(tmp_path):
    spool = make_spool(tmp_path)
    write(spool, "M")
    code = textwrap.dedent(
        f"""\
        import os
        from pathlib import Path
        from bonzo_plugins.queue.spool import Spool
        spool = Spool(Path({str(spool.path)!r}))
        message = spool.load("M")
        os.rename = lambda *a: os._exit(9)  # the power cut before the rename
        spool.save_state(message)
        """
    )
    subprocess.run([sys.executable, "-c", code], timeout=60, env=daemon_env())
    [left] = [p.name for p in spool.state.iterdir()]
    assert left.startswith(".M.") and left.endswith(".tmp")
    (spool.state / "GONE.json").write_text('{"recipients":[]}')  # its data was removed
    (spool.state / f".N.{os.getppid()}.tmp").write_text("")  # a live writer's
    assert setup_at_start(spool) == 2
    assert [p.name for p in spool.state.iterdir()] == [f".N.{os.getppid()}.tmp"]


def test_a_second_setup_in_this_process_leaves_what_it_holds(tmp_path):
    """A reload sets the queue up again in the same process, while the
    previous configuration still accepts: its committer's spare new files,
    a message being written and a state file being saved carry this
    process's number but are in use, not left by a crash (removing the spare
    made the next message fail with 451). At the process's first setup a
    file with its number is from an earlier process; a dead process's files
    go at every setup."""
    path = tmp_path / "q"
    (path / "tmp").mkdir(parents=True)
    (path / "tmp" / f"X.{os.getpid()}").write_bytes(b"an earlier process with this pid")
    spool = Spool(path)
    assert spool.setup() == 1 and list(spool.tmp.iterdir()) == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    sync = GroupSync(spool.data)

    async def accept(id: str) -> None:
        claim, _ = await spool.accept(id, env(), b"", io.BytesIO(BODY), sync, in_thread=False)
        claim.release()

    async def main() -> None:
        await accept("A")  # the committer makes a spare ready for the next one
        deadline = time.monotonic() + 10
        while not [p for p in spool.tmp.iterdir() if p.name.startswith("new")]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        writing = spool._create("B", env(), b"", io.BytesIO(BODY))  # not yet committed
        saving = spool.state / f".A.{os.getpid()}.tmp"
        saving.write_text("")
        (spool.tmp / f"Y.{dead}").write_bytes(b"partial")
        (spool.state / f".A.{dead}.tmp").write_text("")
        (spool.state / "C.json").write_text("{}")  # being removed: its data file went first
        kept = sorted(p.name for p in (*spool.tmp.iterdir(), *spool.state.iterdir()))
        # The new configuration's spool: only the dead process's files go.
        assert await asyncio.to_thread(Spool(path).setup) == 2
        assert sorted(p.name for p in (*spool.tmp.iterdir(), *spool.state.iterdir())) == [
            n for n in kept if dead not in n
        ]
        assert saving.exists()
        await accept("D")  # into the spare
        await sync.commit(writing.fd, writing.tmp, writing.final)  # the write ends
        spool._handed(writing)[0].release()
        await asyncio.to_thread(sync.close)

    asyncio.run(main())
    assert sorted(spool.ids()) == ["A", "B", "D"]


def test_a_crash_while_removing_a_finished_message_delivers_nobody_again(tmp_path):
    """The data file goes first: a crash before the state file's unlink
    leaves a state file with no message (removed at the next start), never
    a message whose recipients, delivered long ago, all look pending."""
    spool = make_spool(tmp_path)
    e = env()
    e["recipients"].append(
        {
            "address": "carol@example.net",
            "canonical": "carol@example.net",
            "domain": "example.net",
            "params": {},
        }
    )
    write(spool, "M", e)
    message = spool.load("M")
    message.recipients[0].status = "delivered"  # at an earlier attempt
    message.recipients[1].status = "deferred"
    spool.save_state(message)
    # The last recipient is delivered now; the process dies at the second unlink.
    code = textwrap.dedent(
        f"""\
        import asyncio, os
        from pathlib import Path
        from bonzo import durable
        from bonzo_plugins.queue.spool import Spool, GroupSync
        from bonzo_plugins.queue.routes import DiscardTransport, RouteTable
        from bonzo_plugins.queue.runner import Runner, RunnerSettings
        real, unlinked = os.unlink, []
        def unlink(path, *args, **kwargs):
            if unlinked:
                os._exit(9)
            unlinked.append(path)
            return real(path, *args, **kwargs)
        os.unlink = unlink
        durable._remove_files = durable._remove_files_py  # the C one cannot be patched
        class A:
            base_dir = Path(".")
            plugins = None
        spool = Spool(Path({str(spool.path)!r}))
        routes = RouteTable({{}}, {{}}, A())
        routes.default = DiscardTransport()
        runner = Runner(spool, GroupSync(spool.data), routes, None, RunnerSettings())
        asyncio.run(runner.attempt("M"))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], timeout=60, env=daemon_env())
    assert done.returncode == 9
    assert spool.ids() == [] and [p.name for p in spool.state.iterdir()] == ["M.json"]
    assert setup_at_start(spool) == 1 and list(spool.state.iterdir()) == []


# ------------------------------------------------------------------ the CLI
CLI_CASES = {
    "state-array": ("state", b"[]"),
    "state-next-nan": ("state", DEFERRED_NAN),
    "state-next-1e300": (
        "state",
        b'{"recipients":[{"status":"deferred","attempts":1,"next_attempt":1e300}]}',
    ),
    "state-empty": ("state", b""),
    "state-directory": ("state-dir", b""),
    "state-fifo": ("state-fifo", b""),
    "state-newer": ("state", b'{"format":2,"recipients":[{"status":"pending"}]}'),
    "arrival-inf": ("data", b'"arrival":Infinity'),
    "arrival-negative": ("data", b'"arrival":-1e12'),
    "data-newer": ("magic", b"BONZO-QUEUE 2\n"),
    "data-symlink": ("symlink", b""),
    "data-fifo": ("fifo", b""),
}


def test_bonzo_queue_shows_a_message_being_delivered_as_delivering(tmp_path):
    """A runner delivering a message holds its claim: ``list`` and ``show``
    say ``delivering`` (they said ``pending``), and their probe of the claim
    never keeps it."""
    spool = make_spool(tmp_path)
    write(spool, "M")
    write(spool, "N")
    claim = spool.claim("M")  # as a runner delivering it
    assert claim is not None
    try:
        listed = cli(spool, tmp_path, "list")
        assert listed.returncode == 0, listed.stderr
        lines = [x.split() for x in listed.stdout.splitlines() if x[:3] in ("M  ", "N  ")]
        assert {x[0]: x[4] for x in lines} == {"M": "delivering", "N": "pending"}
        assert listed.stdout.endswith(": 1 pending, 1 delivering\n")
        only = cli(spool, tmp_path, "list", "--state", "delivering")
        assert [x[:3] for x in only.stdout.splitlines() if x[:3] in ("M  ", "N  ")] == ["M  "]
        shown = cli(spool, tmp_path, "show", "M")
        assert "state:     delivering\n           a daemon is delivering it right now" in (
            shown.stdout
        )
    finally:
        claim.release()
    assert "state:     pending\n" in cli(spool, tmp_path, "show", "M").stdout
    # The commands let every claim go: a runner takes them at once.
    for id in ("M", "N"):
        taken = spool.claim(id)
        assert taken is not None
        taken.release()


@pytest.mark.parametrize("case", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_bonzo_queue_lists_and_deletes_an_unreadable_message(tmp_path, case):
    spool = make_spool(tmp_path)
    kind, value = case
    write(spool, "M", env(arrival=12345.0))
    write(spool, "OK")
    data, state = spool.data / "M", spool.state / "M.json"
    if kind == "state":
        state.write_bytes(value)
    elif kind == "state-dir":
        state.mkdir()
    elif kind == "state-fifo":
        os.mkfifo(state)
    elif kind == "data":
        raw_envelope(spool, "M", b'"arrival":12345.0', value)
    elif kind == "magic":
        data.write_bytes(value + data.read_bytes().split(b"\n", 1)[1])
    elif kind == "symlink":
        data.rename(tmp_path / "outside")
        data.symlink_to(tmp_path / "outside")
    else:
        data.unlink()
        os.mkfifo(data)
    listed = cli(spool, tmp_path, "list", timeout=30)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert "\nOK  " in "\n" + listed.stdout
    [line] = [x for x in listed.stdout.splitlines() if x.startswith("M  ")]
    assert line.startswith("M  unreadable: ") and str(spool.path) in line
    if b"format" in value or kind == "magic":
        assert "written by another version of Bonzo (this one reads format 1)" in line
    flushed = cli(spool, tmp_path, "flush", timeout=30)
    # Not made due: the whole-queue flush says so, in its exit status too.
    assert flushed.returncode == 1 and "Traceback" not in flushed.stderr
    # (With no [logging] file, the change of OK is logged to standard error too.)
    [problem] = [x for x in flushed.stderr.splitlines() if x.startswith("bonzo queue: ")]
    assert problem.startswith(f"bonzo queue: {spool.path}/") and "/M" in problem
    assert "OK: due now" in flushed.stdout
    bounced = cli(spool, tmp_path, "bounce", "M", timeout=30)
    assert bounced.returncode != 0 and "Traceback" not in bounced.stderr
    assert "cannot bounce an unreadable message: repair or delete it" in bounced.stderr
    deleted = cli(spool, tmp_path, "delete", "M", timeout=30)
    assert deleted.returncode == 0, deleted.stderr
    assert not os.path.lexists(data) and not os.path.lexists(state)
    assert spool.ids() == ["OK"]
    assert (tmp_path / "outside").exists() or kind != "symlink"  # the link went, not its target


def test_flush_makes_a_message_due_now(tmp_path):
    spool = make_spool(tmp_path)
    write(spool, "M")
    due = time.time() + 3600
    later = {"recipients": [{"status": "deferred", "attempts": 3, "next_attempt": due}]}
    (spool.state / "M.json").write_text(json.dumps(later))
    assert cli(spool, tmp_path, "flush", "M").stdout.strip() == "M: due now"
    assert spool.load("M").due(time.time()) == [0]


def test_a_whole_queue_flush_skips_the_messages_being_delivered_at_once(tmp_path):
    # Three messages "being delivered" (their claims held here, as a runner
    # holds them) and one waiting: the flush made the waiting one due and
    # skipped the others after one short wait for all of them, not
    # CLAIM_WAIT (10 s) for each in turn; none of them is an error.
    spool = make_spool(tmp_path)
    later = {"recipients": [{"status": "deferred", "attempts": 3, "next_attempt": 4e9}]}
    for id in ("A", "B", "C", "W"):
        write(spool, id)
        (spool.state / f"{id}.json").write_text(json.dumps(later))
    claims = [spool.claim(id) for id in ("A", "B", "C")]
    try:
        started = time.monotonic()
        flushed = cli(spool, tmp_path, "flush")
        took = time.monotonic() - started
    finally:
        for claim in claims:
            assert claim is not None
            claim.release()
    assert flushed.returncode == 0, flushed.stderr
    assert took < 8, took
    lines = flushed.stdout.splitlines()
    assert "W: due now" in lines
    for id in ("A", "B", "C"):
        assert f"{id}: being delivered right now: skipped" in lines
        assert spool.load(id).due(time.time()) == []
    assert spool.load("W").due(time.time()) == [0]


class Deferring(DiscardTransport):
    """Every recipient deferred, as by a server that is down."""

    async def deliver(self, message: Any, recipients: Sequence[Any]) -> list[Outcome]:
        return [Outcome.deferred(451, "4.4.1", "Connection refused", "mx.test")] * len(recipients)


@pytest.mark.expect_errors
def test_a_message_whose_state_cannot_be_saved_is_named_so_and_can_be_deleted(tmp_path, caplog):
    # Its state cannot be saved (a directory where the temporary copy goes:
    # the same failed write as a full disk), so its runner holds its claim.
    # The command line said "being delivered right now" after 10 s and
    # could delete nothing: it names the state at once, and delete, what
    # frees space, removes it; a poke retries the save of the others.
    spool = make_spool(tmp_path)
    for id in ("F", "G"):
        write(spool, id)
        (spool.state / f".{id}.{os.getpid()}.tmp").mkdir()
    runner = make_runner(tmp_path, spool, Deferring(), min_backoff=600, max_backoff=600)

    def text() -> str:
        return "\n".join(r.getMessage() for r in caplog.records)

    async def until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not done():
            assert time.monotonic() < deadline, text()
            await asyncio.sleep(0.05)

    async def main() -> None:
        runner.start()
        await until(lambda: all(f"{id}: cannot save the delivery state" in text() for id in "FG"))
        listed = await asyncio.to_thread(cli, spool, tmp_path, "list")
        assert listed.returncode == 0, listed.stderr
        assert [x.split()[4] for x in listed.stdout.splitlines() if x[:3] in ("F  ", "G  ")] == [
            "unsaved",
            "unsaved",
        ]
        assert listed.stdout.endswith(": 2 unsaved\n")
        for action in ("hold", "bounce", "flush"):
            started = time.monotonic()
            done = await asyncio.to_thread(cli, spool, tmp_path, action, "F")
            assert done.returncode == 1 and time.monotonic() - started < 8
            assert done.stderr.startswith("bonzo queue: F: its delivery state cannot be saved")
        flushed = await asyncio.to_thread(cli, spool, tmp_path, "flush")
        assert flushed.returncode == 1 and flushed.stderr.count("cannot be saved") == 2
        deleted = await asyncio.to_thread(cli, spool, tmp_path, "delete", "F")
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout == "F: deleted (its delivery state could not be saved)\n"
        assert not spool.present("F") and spool.ids() == ["G"]
        # The runner let it go at its next try (the command's poke).
        await until(lambda: "F" not in runner._inflight)
        assert "queue: F deleted by the operator while its delivery state" in text()
        (spool.state / f".G.{os.getpid()}.tmp").rmdir()  # space freed
        # The documented recovery: its flush has the daemon try the save
        # again at once (not 600 s later) and waits for it, then flushes.
        flushed = await asyncio.to_thread(cli, spool, tmp_path, "flush", "G")
        assert flushed.returncode == 0, flushed.stderr
        assert flushed.stdout == "G: due now\n"
        assert "G: delivery state saved after" in text()
        await runner.stop(grace=1)

    asyncio.run(main())
    assert spool.load("G").recipients[0].status == "deferred"
    assert spool.claim("G") is not None  # let go
    errors = {r.getMessage()[:40] for r in caplog.records if r.levelname == "ERROR"}
    assert errors == {
        "queue: F: cannot save the delivery state",
        "queue: G: cannot save the delivery state",
    }


class BobOnly(DiscardTransport):
    """Delivers to bob, defers everyone else."""

    def __init__(self) -> None:
        self.delivered: list[str] = []

    async def deliver(self, message: Any, recipients: Sequence[Any]) -> list[Outcome]:
        out = []
        for r in recipients:
            if r.address == "bob@example.net":
                self.delivered.append(r.address)
                out.append(Outcome("delivered", 250, "2.0.0", "ok", "test"))
            else:
                out.append(Outcome.deferred(451, "4.4.1", "Connection refused", "mx.test"))
        return out


@pytest.mark.expect_errors
def test_a_handed_message_whose_state_cannot_be_saved_keeps_its_outcomes(tmp_path, caplog):
    # The process that accepted the message hands its claim over with the
    # descriptor it wrote the file with (write-only): marking it unsaved
    # took a read lock there, the kernel refused it (EBADF), the attempt
    # failed with what it had settled, and the next delivered every
    # recipient again. Marked, the operator sees it, nothing is redone.
    spool = make_spool(tmp_path)
    transport = BobOnly()
    runner = make_runner(tmp_path, spool, transport, min_backoff=600, max_backoff=600)
    two = env()
    carol = dict(two["recipients"][0], address="carol@example.net", canonical="carol@example.net")
    two["recipients"].append(carol)

    def text() -> str:
        return "\n".join(r.getMessage() for r in caplog.records)

    async def main() -> None:
        runner.start()
        handed = spool.write_claimed("H", two, b"", io.BytesIO(BODY))
        (spool.state / f".H.{os.getpid()}.tmp").mkdir()  # the save fails, as on a full disk
        runner.kick("H", handed)
        deadline = time.monotonic() + 20
        while "H: cannot save the delivery state" not in text():
            assert time.monotonic() < deadline, text()
            await asyncio.sleep(0.05)
        listed = await asyncio.to_thread(cli, spool, tmp_path, "list")
        assert [x.split()[4] for x in listed.stdout.splitlines() if x.startswith("H  ")] == [
            "unsaved"
        ]
        (spool.state / f".H.{os.getpid()}.tmp").rmdir()
        (spool.path / "flush").touch()
        while "H: delivery state saved after" not in text():
            assert time.monotonic() < deadline, text()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # scans that would deliver it again
        await runner.stop(grace=1)

    asyncio.run(main())
    assert transport.delivered == ["bob@example.net"]  # once
    assert "attempt at message H failed" not in text()
    assert [r.status for r in spool.load("H").recipients] == ["delivered", "deferred"]


@pytest.mark.expect_errors
def test_pokes_do_not_push_the_save_back_off_towards_its_maximum(tmp_path, caplog):
    # Each `bonzo queue` command pokes the runner, which tries the held
    # save again at once; with the disk still full, each such failure
    # doubled the wait (five commands: "next try in 40m"). The back-off
    # grows with the tries its own end starts only.
    spool = make_spool(tmp_path)
    write(spool, "F")
    (spool.state / f".F.{os.getpid()}.tmp").mkdir()
    runner = make_runner(tmp_path, spool, Deferring(), min_backoff=30, max_backoff=3600)

    def failures() -> list[str]:
        return [
            r.getMessage().rsplit("next try in ", 1)[1]
            for r in caplog.records
            if "F: cannot save the delivery state" in r.getMessage()
        ]

    async def main() -> None:
        runner.start()
        deadline = time.monotonic() + 20
        for pokes in range(5):
            while len(failures()) <= pokes:
                assert time.monotonic() < deadline, failures()
                await asyncio.sleep(0.05)
            (spool.path / "flush").touch()  # what every bonzo queue command does
        while len(failures()) < 6:
            assert time.monotonic() < deadline, failures()
            await asyncio.sleep(0.05)
        await runner.stop(grace=1)

    asyncio.run(main())
    assert failures()[:6] == ["30s"] * 6


def test_the_operators_changes_are_in_the_daemons_log(tmp_path):
    # Logged through the configuration's [logging], as the daemon logs, with
    # the message's id: the log told nothing of a message deleted.
    log = tmp_path / "serve.log"
    log.write_text("2026-12-06 21:00:00,000 INFO [1] bonzo.daemon: the daemon's line\n")
    conf = f'[logging]\nfile = "{log}"\n'
    spool = make_spool(tmp_path)
    for id in ("D", "H", "B"):
        write(spool, id)
    for args in (("delete", "D"), ("hold", "H"), ("release", "H"), ("flush", "H"), ("bounce", "B")):
        done = cli(spool, tmp_path, *args, logging=conf)
        assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = log.read_text().splitlines()
    assert lines[0].endswith("the daemon's line")  # appended to, not replaced
    said = [line.split(" bonzo.plugins.queue: ", 1)[1] for line in lines[1:]]
    assert said[:4] == [
        "queue: D deleted by the operator (bonzo queue delete)",
        "queue: H held by the operator (bonzo queue hold)",
        "queue: H released by the operator (bonzo queue release)",
        "queue: H made due now by the operator (bonzo queue flush)",
    ]
    assert " WARNING " in lines[1] and " INFO " in lines[2]
    # The bounce: the recipient's line as the runner logs it, the report's,
    # and the operator's.
    assert said[4] == (
        "queue: B to=<bob@example.net> bounced: 550 5.0.0 Returned to the sender by the "
        "postmaster (postmaster)"
    )
    [report] = [id for id in spool.ids() if id != "H"]
    assert said[5:] == [
        f"queue: B: failed report for 1 recipient(s) queued as {report}",
        f"queue: B bounced by the operator (bonzo queue bounce); report queued as {report}",
    ]


def test_a_change_that_changes_nothing_is_said_and_not_logged(tmp_path):
    log = tmp_path / "serve.log"
    log.write_text("")
    conf = f'[logging]\nfile = "{log}"\n'
    spool = make_spool(tmp_path)
    write(spool, "H")
    assert cli(spool, tmp_path, "release", "H", logging=conf).stdout == "H: not held\n"
    assert cli(spool, tmp_path, "hold", "H", logging=conf).stdout == "H: held\n"
    assert cli(spool, tmp_path, "hold", "H", logging=conf).stdout == "H: held already\n"
    assert log.read_text().count("by the operator") == 1


def test_the_command_never_makes_the_daemons_log_file(tmp_path):
    # Run as root, it would make it root's: the daemon could not open it.
    spool = make_spool(tmp_path)
    write(spool, "D")
    log = tmp_path / "gone.log"
    done = cli(spool, tmp_path, "delete", "D", logging=f'[logging]\nfile = "{log}"\n')
    assert done.returncode == 0 and done.stdout == "D: deleted\n"
    assert f"warning: {log} does not exist (the daemon makes it)" in done.stderr
    assert "queue: D deleted by the operator" in done.stderr
    assert not log.exists()


def test_a_log_file_the_command_cannot_open_does_not_stop_a_change(tmp_path):
    spool = make_spool(tmp_path)
    write(spool, "D")
    conf = f'[logging]\nfile = "{tmp_path}"\n'  # a directory
    done = cli(spool, tmp_path, "delete", "D", logging=conf)
    assert done.returncode == 0 and done.stdout == "D: deleted\n"
    first, second = done.stderr.splitlines()
    assert first.startswith("bonzo queue: warning: ") and "logging to standard error" in first
    assert " WARNING " in second
    assert second.endswith(
        " bonzo.plugins.queue: queue: D deleted by the operator (bonzo queue delete)"
    )


def test_a_refused_messages_file_left_in_tmp_goes_at_a_later_scan(tmp_path, caplog):
    # A refused message's file that could not be removed then (tmp/ not
    # writable) stayed until the next start: the runner's scan removes it,
    # but never a file being written (its claim is held), an empty one (a
    # spare made ready for the next message) or one written just now.
    spool = make_spool(tmp_path)
    old = time.time() - 3600

    def left(name: str, content: bytes, when: float = old) -> Path:
        path = spool.tmp / name
        path.write_bytes(content)
        os.utime(path, (when, when))
        return path

    refused = left("new4.123", b"BONZO-QUEUE 1\n{}\nSubject: refused\r\n\r\n")
    written = left("new5.123", b"BONZO-QUEUE 1\n")
    spare = left("new6.123", b"")
    fresh = left("new7.123", b"BONZO-QUEUE 1\n", time.time())
    fd = os.open(written, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        runner = make_runner(tmp_path, spool, Counting())
        run_for(runner, 10, lambda: not refused.exists())
    finally:
        os.close(fd)
    assert not refused.exists()
    assert written.exists() and spare.exists() and fresh.exists()
    assert "queue: removed 1 partly written file(s) of refused messages" in caplog.text


def test_a_bounce_whose_report_cannot_be_queued_changes_nothing_and_says_so(tmp_path):
    spool = make_spool(tmp_path)
    write(spool, "B")
    spool.tmp.rmdir()
    spool.tmp.write_bytes(b"")  # where the report is written: it cannot be
    done = cli(spool, tmp_path, "bounce", "B")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.endswith("bonzo queue: B: cannot bounce it: Not a directory\n")
    assert "queue: B not bounced (bonzo queue bounce): Not a directory; nothing changed" in (
        done.stderr
    )
    assert spool.ids() == ["B"] and spool.load("B").recipients[0].status == "pending"


def test_list_and_show_say_a_message_is_quarantined(tmp_path):
    # They showed an ordinary message: no sign of the quarantine, nor of the
    # transport it is bound to, nor of its recipients (tester milter3 M2).
    spool = make_spool(tmp_path)
    quarantine = {
        "by": "milter",
        "reason": "held by m1\u2028forged",
        "recipients": ["bob@example.org", "carol@example.org"],
        "final": [],
    }
    review = {
        "address": "review@example.org",
        "canonical": "review@example.org",
        "domain": "example.org",
        "params": {"NOTIFY": "NEVER"},
    }
    write(spool, "Q", env(transport="review", quarantine=quarantine, recipients=[review]))
    write(spool, "N")
    listed = cli(spool, tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Q  "))
    assert lines[at + 1] == (
        "    quarantined (transport 'review'): milter: held by m1\\u2028forged"
    )
    assert lines[at + 2].startswith("    <review@example.org>  pending")
    assert "quarantined" not in "\n".join(line for line in lines if not line.startswith(("Q", " ")))
    shown = cli(spool, tmp_path, "show", "Q").stdout
    assert (
        "quarantine: quarantined (transport 'review'): milter: held by m1\\u2028forged\n"
        "    for: <bob@example.org>, <carol@example.org>\n"
        "    after changes: none\n"
    ) in shown
    assert "quarantine" not in cli(spool, tmp_path, "show", "N").stdout


def test_a_quarantine_copy_is_never_bounced_by_the_operator(tmp_path):
    """`bonzo queue bounce` on a quarantine copy said "bounced" and exited 0,
    but the runner held the copy instead (it is never returned to its
    sender): the command now refuses and says what to do."""
    spool = make_spool(tmp_path)
    review = {
        "address": "review@example.org",
        "canonical": "review@example.org",
        "domain": "example.org",
        "params": {"NOTIFY": "NEVER"},
    }
    quarantine = {"by": "milter", "reason": "virus", "recipients": ["bob@example.org"],
                  "final": ["bob@example.org"], "to": "review@example.org"}  # fmt: skip
    write(spool, "Q", env(transport="review", quarantine=quarantine, recipients=[review]))
    done = cli(spool, tmp_path, "bounce", "Q")
    assert done.returncode == 1, done.stdout
    assert done.stderr.endswith(
        "bonzo queue: Q: a quarantined message is never returned to its sender: "
        "`bonzo queue delete Q` drops it, `bonzo queue release Q` tries its quarantine "
        "delivery again\n"
    ), done.stderr
    assert spool.ids() == ["Q"] and spool.load("Q").recipients[0].status == "pending"

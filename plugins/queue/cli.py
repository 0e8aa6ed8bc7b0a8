"""``bonzo queue``: look at and act on the queue, whether the daemon runs or not.

Every change takes the message's claim first (the lock a runner holds while
it delivers), waiting a few seconds for a delivery in flight to finish, so
the command and the daemon never work on one message at once. Before it
claims, the command pokes running daemons (the queue's ``flush`` file), which
makes them look at the queue at once and let go of the claims they keep for
messages accepted but not yet tried (they wait for a free delivery slot),
and try again at once the saves of states that failed. A claim held for a
state that cannot be saved is marked (:meth:`Claim.mark_unsaved`): the
command says so instead of waiting, and ``delete`` removes such a message.
Each change is logged through the configuration's ``[logging]``, into the
daemon's log.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import sys
import time
from collections import Counter
from typing import Any

from bonzo.cli import setup_logging
from bonzo.config import Config, ConfigError, load_config
from bonzo.session import one_line

from .plugin import QueuePlugin, parse_duration
from .runner import Runner, log
from .spool import Claim, GroupSync, QueuedMessage, Spool, SpoolError

__all__ = ["register"]

#: The states ``list`` gives a message, in the order of its counts.
STATES = ("pending", "deferred", "delivering", "held", "unsaved", "unreadable")
#: Seconds to wait for a runner to finish with a message before giving up.
CLAIM_WAIT = 10.0
#: Seconds a whole-queue flush waits, for all of them together, for the
#: messages a daemon holds (see _flush).
FLUSH_WAIT = 2.0


def register(add: Any) -> None:
    """Add ``bonzo queue`` to the ``bonzo`` command (entry point of the
    ``bonzo.commands`` group)."""
    parser = add("queue", run, "list and manage the messages of the queue plugin")
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="configuration file (default: the embedded default, bonzo.toml.example)",
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="list queued messages, and counts by state")
    ls.add_argument(
        "--state",
        choices=STATES,
        help="only these",
    )
    ls.add_argument("--domain", help="only messages with a recipient at this domain")
    ls.add_argument(
        "--older-than",
        metavar="AGE",
        type=_age,
        help="only messages older than AGE (5m, 4h)",
    )
    sub.add_parser(
        "show", help="show a message's envelope and each recipient's state and parameters"
    ).add_argument("id")
    sub.add_parser("flush", help="try a message (or every message) now").add_argument(
        "id", nargs="?"
    )
    sub.add_parser("hold", help="stop delivering a message until released").add_argument("id")
    sub.add_parser("release", help="deliver a held message again").add_argument("id")
    sub.add_parser("delete", help="remove a message without telling its sender").add_argument("id")
    sub.add_parser(
        "bounce", help="give up on a message: its sender gets a failure report"
    ).add_argument("id")


def _age(text: str) -> float:
    """``--older-than``'s value in seconds; a usage error otherwise."""
    try:
        return float(parse_duration(text, "--older-than"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--older-than: ")) from None


class Problem(Exception):
    """A one-line error for the operator (exit status 1)."""


#: The actions that change the queue: each change is logged (see _log_to).
CHANGES = ("flush", "hold", "release", "delete", "bounce")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        plugin = _plugin(config)
        if args.action in CHANGES:
            _log_to(config)
        assert plugin.spool is not None
        if not plugin.spool.data.is_dir():
            raise Problem(f"{plugin.spool.path}: no queue here (the daemon creates it at start)")
        action = {
            "list": _list,
            "show": _show,
            "flush": _flush,
            "hold": _hold,
            "release": _release,
            "delete": _delete,
            "bounce": _bounce,
        }[args.action]
        return action(plugin, args)
    except Problem as exc:
        print(f"bonzo queue: {exc}", file=sys.stderr)
        return 1


def _log_to(config: Config) -> None:
    """Log the changes where the daemon logs (the configuration's
    ``[logging]``: its file, else this command's standard error), in its
    format, so that whoever reads the daemon's log learns what became of a
    message an operator deleted, bounced, held, released or flushed. A log
    file this command cannot open (another user's) is no reason to refuse
    the change: it is said, and the lines go to standard error."""
    path = config.logging.file
    if path and not os.path.exists(path):
        # The daemon makes its log file, owned by its user: this command (run
        # as root, say) must not make it first, as the daemon could not open
        # it at its next start. The lines go to standard error meanwhile.
        print(
            f"bonzo queue: warning: {path} does not exist (the daemon makes it); "
            "logging to standard error",
            file=sys.stderr,
        )
        config.logging.file = None
    try:
        setup_logging(config)
    except ConfigError as exc:
        print(f"bonzo queue: warning: {exc}; logging to standard error", file=sys.stderr)
        config.logging.file = None
        setup_logging(config)
    # Not the event loop's own chatter, at debug level, in the daemon's log.
    logging.getLogger("asyncio").setLevel(max(logging.getLogger().level, logging.INFO))


def _plugin(config: Config) -> QueuePlugin:
    if "queue" not in config.plugins.enabled:
        raise ConfigError(config.source, "plugins.enabled", "the queue plugin is not enabled")

    class App:
        base_dir = config.base_dir
        settings = config.settings
        plugins = None

    plugin = QueuePlugin()
    try:
        plugin.bonzo_configure(config.plugins.tables.get("queue", {}), App())
    except ValueError as exc:
        raise ConfigError(config.source, "plugins.queue", str(exc)) from None
    return plugin


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch).isoformat(sep=" ", timespec="seconds")


def _state(message: QueuedMessage, spool: Spool) -> str:
    if spool.unsaved(message.id):
        # A daemon holds it with a newer state in memory than the one on
        # disk (shown): see UNSAVED.
        return "unsaved"
    if message.held:
        return "held"
    if spool.claimed(message.id):
        # A daemon has it in hand (or a command changes it): the state on
        # disk (shown) is the one from before this attempt.
        return "delivering"
    if any(r.status == "deferred" for r in message.recipients):
        return "deferred"
    return "pending"


def _quarantined(message: QueuedMessage) -> str:
    """``quarantined (transport 'review'): milter: reason``: a quarantined
    message goes to that transport alone, whatever the routes say."""
    text = f"quarantined (transport {message.transport!r})"
    facts = message.quarantine or {}
    if facts.get("by") or facts.get("reason"):
        text += f": {one_line(str(facts.get('by')))}: {one_line(str(facts.get('reason')))}"
    return text


def _list(plugin: QueuePlugin, args: argparse.Namespace) -> int:
    spool = plugin.spool
    assert spool is not None
    now = datetime.datetime.now().timestamp()
    older = args.older_than
    counts: Counter[str] = Counter()
    shown = 0
    for id in spool.ids():
        try:
            message = spool.load(id)
        except FileNotFoundError:
            continue  # delivered or removed meanwhile
        except SpoolError as exc:
            # Listed, never hidden: the runner skips it (logging it on each
            # scan) until an operator repairs or deletes it.
            counts["unreadable"] += 1
            if args.state in (None, "unreadable") and not args.domain and older is None:
                shown += 1
                print(f"{id}  unreadable: {exc}")
            continue
        state = _state(message, spool)
        counts[state] += 1
        if args.state and state != args.state:
            continue
        if args.domain and not any(r.domain == args.domain.lower() for r in message.recipients):
            continue
        if older is not None and now - message.arrival < older:
            continue
        shown += 1
        sender = message.sender or "(null sender)"
        print(f"{message.id}  {_when(message.arrival)}  {message.size:>9}  {state:<10}  <{sender}>")
        if state == "unsaved":
            print("    (its delivery state cannot be saved: shown is the state last saved)")
        if message.transport is not None:
            print(f"    {_quarantined(message)}")
        for r in message.recipients:
            if r.final:
                continue
            line = f"    <{r.address}>  {r.status}"
            if r.attempts:
                line += f", {r.attempts} attempt(s), next {_when(r.next_attempt)}: {r.reply}"
            print(line)
    total = sum(counts.values())
    summary = ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s])
    print(f"-- {total} message(s) in {spool.path}" + (f": {summary}" if summary else ""))
    if shown != total:
        print(f"-- {shown} shown")
    return 0


def _load(spool: Spool, id: str) -> QueuedMessage:
    try:
        return spool.load(id)
    except FileNotFoundError:
        raise Problem(f"{id}: no such message in {spool.path}") from None
    except SpoolError as exc:
        raise Problem(str(exc)) from None


def _show(plugin: QueuePlugin, args: argparse.Namespace) -> int:
    assert plugin.spool is not None
    message = _load(plugin.spool, args.id)
    print(f"id:        {message.id}")
    print(f"arrival:   {_when(message.arrival)}")
    print(f"size:      {message.size}")
    print(f"sender:    <{message.sender}>")
    if message.mail_params:
        params = " ".join(k if v is None else f"{k}={v}" for k, v in message.mail_params.items())
        print(f"params:    {params}")
    state = _state(message, plugin.spool)
    print(f"state:     {state}")
    if state == "unsaved":
        print(f"           {UNSAVED}; shown is the state last saved")
    elif state == "delivering":
        print(f"           {DELIVERING}")
    if message.transport is not None:
        print(f"quarantine: {_quarantined(message)}")
        facts = message.quarantine or {}
        for key, label in (("recipients", "for"), ("final", "after changes")):
            if key == "final" and facts.get("final") == facts.get("recipients"):
                continue
            addresses = facts.get(key)
            if isinstance(addresses, list):
                listed = ", ".join(f"<{one_line(str(a))}>" for a in addresses) or "none"
                print(f"    {label}: {listed}")
    for key in ("session_id", "remote_ip", "helo", "protocol", "auth"):
        if message.session.get(key):
            print(f"{key + ':':<10} {message.session[key]}")
    for r in message.recipients:
        print(f"recipient: <{r.address}>  {r.status}  attempts={r.attempts}")
        if r.params:
            # NOTIFY, and ORCPT: what the client wrote (a bare <postmaster>).
            params = " ".join(k if v is None else f"{k}={v}" for k, v in r.params.items())
            print(f"    params: {params}")
        if r.reply:
            print(f"    last:  {r.reply} ({r.host})")
        if not r.final and r.attempts:
            print(f"    next:  {_when(r.next_attempt)}")
    return 0


class Busy(Problem):
    """The message's claim is held by another process (a daemon delivering
    it) past the wait."""


class Unsaved(Problem):
    """A daemon holds the message for a state it cannot save (a full disk),
    past the wait for its try of the save a poke starts."""


#: How long a command waits for the try of a held save its poke starts
#: (after space was freed, that try succeeds and the daemon lets go).
UNSAVED_WAIT = 2.0

#: What ``show`` says of a message whose claim a daemon holds.
DELIVERING = (
    "a daemon is delivering it right now (or, just accepted, about to); shown is the "
    "state from before this attempt"
)

#: Why a message held for its unsaved state cannot be changed.
UNSAVED = (
    "its delivery state cannot be saved (see the daemon's log: a full disk?), and the "
    "daemon holds it with what its last attempt settled until it can; "
    "only delete can take it now (free space, then flush to resume)"
)


def _claim(spool: Spool, id: str, wait: float, unsaved_wait: float = UNSAVED_WAIT) -> Claim:
    """Message ``id``'s claim, waiting up to ``wait`` seconds for a delivery
    in flight (``unsaved_wait`` for one held for a state that cannot be
    saved, whose save the command's poke has tried again); otherwise the
    :exc:`Problem` that says why not: gone (its delivery ended meanwhile),
    held for a state that cannot be saved (:exc:`Unsaved`), or still being
    delivered (:exc:`Busy`)."""
    now = time.monotonic()
    deadline, unsaved_deadline = now + wait, now + unsaved_wait
    while True:
        claim = spool.claim(id)
        if claim is not None:
            return claim
        if not spool.exists(id):
            raise Problem(f"{id}: it left the queue meanwhile (delivered or bounced)")
        now = time.monotonic()
        if spool.unsaved(id):
            if now >= unsaved_deadline:
                raise Unsaved(f"{id}: {UNSAVED}")
        elif now >= deadline:
            raise Busy(f"{id}: being delivered right now; try again in a moment")
        time.sleep(0.05)


def _change(
    plugin: QueuePlugin,
    id: str,
    what: str,
    change: Any,
    *,
    poke: bool = True,
    wait: float = CLAIM_WAIT,
    unsaved_wait: float = UNSAVED_WAIT,
    action: str,
) -> None:
    """Claim message ``id`` (waiting up to ``wait`` seconds), apply
    ``change`` and save its state, then print ``what`` and log it as done
    by ``bonzo queue <action>``. ``change`` returns ``False`` to save
    nothing, or a text to print instead of ``what`` when it changed
    nothing (nothing saved, nothing logged)."""
    spool = plugin.spool
    assert spool is not None
    if not spool.present(id):
        raise Problem(f"{id}: no such message in {spool.path}")
    _load(spool, id)  # an unreadable one is named with what is wrong with it
    if poke:
        _poke(spool)
    with _claim(spool, id, wait, unsaved_wait):
        message = _load(spool, id)
        done = change(message)
        if done is None or done is True:
            try:
                spool.save_state(message)
            except OSError as exc:
                raise Problem(f"{id}: cannot save its state: {exc.strerror or exc}") from None
            _logged(id, "made due now" if action == "flush" else what, action)
    print(f"{id}: {done if isinstance(done, str) else what}")


def _logged(id: str, what: str, action: str, level: int = logging.INFO, more: str = "") -> None:
    """Log a change as the runner logs what becomes of a message: ``queue:
    ID <what> by the operator (bonzo queue <action>)<more>``."""
    log.log(level, "queue: %s %s by the operator (bonzo queue %s)%s", id, what, action, more)


def _poke(spool: Spool) -> None:
    """Make running daemons look at the queue now, letting go of the claims
    they keep for messages not yet tried."""
    (spool.path / "flush").touch()


def _flush(plugin: QueuePlugin, args: argparse.Namespace) -> int:
    spool = plugin.spool
    assert spool is not None
    now = datetime.datetime.now().timestamp()

    def due_now(message: QueuedMessage) -> str | None:
        if message.held:
            return "held, not due (release it to deliver it)"
        for r in message.recipients:
            if not r.final:
                r.next_attempt = min(r.next_attempt, now)
        return None

    if args.id:
        _change(plugin, args.id, "due now", due_now, action="flush")
        _poke(spool)
        return 0
    # The whole queue. A message whose claim a daemon holds is in an attempt
    # right now (or waits, just poked, for its first one): it needs no flush,
    # and waiting CLAIM_WAIT for each in turn would add up to minutes with
    # max_deliveries attempts in flight per worker. So the others are made
    # due first, then those are tried again together for FLUSH_WAIT at most
    # (enough for the claims the poke makes runners let go) and skipped.
    _poke(spool)
    failed = 0

    def flushed(id: str) -> bool:
        """Make ``id`` due now; False if a daemon holds it. A problem is
        printed and counted, unless the message left the queue meanwhile
        (delivered: nothing to flush)."""
        nonlocal failed
        try:
            _change(
                plugin,
                id,
                "due now",
                due_now,
                poke=False,
                wait=0.0,
                unsaved_wait=0.0,
                action="flush",
            )
        except (Busy, Unsaved):
            # Tried again below: an unsaved one may be saved by the try the
            # poke started (space was freed), then it is the daemon's again.
            return False
        except Problem as exc:
            if spool.present(id):
                failed += 1
                print(f"bonzo queue: {exc}", file=sys.stderr)
        return True

    busy = [id for id in spool.ids() if not flushed(id)]
    deadline = time.monotonic() + max(FLUSH_WAIT, UNSAVED_WAIT)
    while busy and time.monotonic() < deadline:
        time.sleep(0.05)
        busy = [id for id in busy if not flushed(id)]
    for id in busy:
        if spool.unsaved(id):
            failed += 1
            print(f"bonzo queue: {id}: {UNSAVED}", file=sys.stderr)
        else:
            print(f"{id}: being delivered right now: skipped")
    _poke(spool)
    return 1 if failed else 0


def _hold(plugin: QueuePlugin, args: argparse.Namespace) -> int:
    def hold(message: QueuedMessage) -> str | None:
        if message.held:
            return "held already"  # nothing changed: nothing saved or logged
        message.held = True
        return None

    _change(plugin, args.id, "held", hold, action="hold")
    return 0


def _release(plugin: QueuePlugin, args: argparse.Namespace) -> int:
    assert plugin.spool is not None

    def release(message: QueuedMessage) -> str | None:
        if not message.held:
            return "not held"  # nothing changed: nothing saved or logged
        message.held = False
        return None

    _change(plugin, args.id, "released", release, action="release")
    _poke(plugin.spool)
    return 0


def _delete(plugin: QueuePlugin, args: argparse.Namespace) -> int:
    spool = plugin.spool
    assert spool is not None
    # An unreadable message too (``list`` shows it): that is what deleting
    # is for when it cannot be repaired.
    if not spool.present(args.id):
        raise Problem(f"{args.id}: no such message in {spool.path}")
    if not spool.exists(args.id) or (spool.data / args.id).is_symlink():
        # Not a file a process can claim, nor one any will deliver.
        spool.remove(args.id)
        _logged(args.id, "deleted", "delete", logging.WARNING, " (it was no queue file)")
        print(f"{args.id}: deleted (it was no queue file)")
        return 0
    _poke(spool)
    try:
        claim = _claim(spool, args.id, CLAIM_WAIT)
    except Busy:
        raise
    except Problem:
        # Held by a daemon that cannot save its state (a full disk): this is
        # when space must be freed, so it is removed under the daemon's
        # claim, between two of its tries of the save (Spool.remove_unsaved).
        if not spool.unsaved(args.id):
            raise
        if spool.remove_unsaved(args.id, wait=CLAIM_WAIT):
            _poke(spool)  # its daemon drops what it kept now, not at its next try
            why = " (its delivery state could not be saved)"
            _logged(args.id, "deleted", "delete", logging.WARNING, why)
            print(f"{args.id}: deleted{why}")
            return 0
        # Saved meanwhile, its mark gone: claimed as any other (or why not).
        claim = _claim(spool, args.id, CLAIM_WAIT)
    with claim:
        spool.remove(args.id)
    _logged(args.id, "deleted", "delete", logging.WARNING)
    print(f"{args.id}: deleted")
    return 0


def _bounce(plugin: QueuePlugin, args: argparse.Namespace) -> int:
    spool, routes = plugin.spool, plugin.routes
    assert spool is not None and routes is not None
    try:
        message = _load(spool, args.id)
    except Problem as exc:
        if not spool.present(args.id):
            raise
        raise Problem(f"{exc}; cannot bounce an unreadable message: repair or delete it") from None
    if message.transport is not None:
        # A quarantine copy is never returned to its sender (it may carry
        # what was quarantined): the runner would hold it instead.
        raise Problem(
            f"{args.id}: a quarantined message is never returned to its sender: "
            f"`bonzo queue delete {args.id}` drops it, `bonzo queue release {args.id}` "
            "tries its quarantine delivery again"
        )
    _poke(spool)
    claim = _claim(spool, args.id, CLAIM_WAIT)

    async def main() -> str | None:
        sync = GroupSync(spool.data)
        runner = Runner(spool, sync, routes, None, plugin.settings)
        try:
            return await runner.give_up(
                args.id, "Returned to the sender by the postmaster", claim=claim
            )
        finally:
            sync.close()

    try:
        report = asyncio.run(main())
    except OSError as exc:
        # The recipients' "bounced" lines are logged already: this says
        # that none of it was kept.
        log.warning(
            "queue: %s not bounced (bonzo queue bounce): %s; nothing changed",
            args.id,
            exc.strerror or exc,
        )
        raise Problem(f"{args.id}: cannot bounce it: {exc.strerror or exc}") from None
    if report is None:  # pragma: no cover - give_up had the claim
        raise Problem(f"{args.id}: it left the queue meanwhile (delivered or bounced)")
    queued = f"; report queued as {report}" if report else ""
    _logged(args.id, "bounced", "bounce", logging.WARNING, queued)
    print(f"{args.id}: bounced{queued}")
    _poke(spool)
    return 0

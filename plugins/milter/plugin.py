"""Milters in the filter chain: each SMTP stage is passed on to every
configured milter (:mod:`bonzo.milter`), and what they answer becomes
Bonzo's verdict and message changes.

One connection per milter and SMTP session, opened in
:func:`~bonzo.hookspecs.bonzo_connect` and closed (``QUIT``) in
:func:`~bonzo.hookspecs.bonzo_disconnect`. Milters are asked in the order
configured; the first one that does not say ``continue`` decides. See
``README.rst`` in this directory for the mapping of stages and actions.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from bonzo import Discard, Quarantine
from bonzo import milter as m
from bonzo.dsn import xtext_decode
from bonzo.errors import PermanentError, SMTPError, TransientError
from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session

from .._config import describe

__all__ = ["MilterPlugin", "MilterConfig", "KEYS", "MILTER_KEYS", "reply_error"]

log = logging.getLogger("bonzo.plugins.milter")

DEFAULT_ACTIONS = ("tempfail", "accept")
#: The session's milter connections: live objects, so a transient stash
#: key ("_"): the queue leaves it out of its files without a warning.
STASH = "_milter"
#: The longest header field (octets, name and value) a milter is shown: a
#: milter frame holds at most 64 KiB. A message with a longer one is refused
#: (a milter shown part of a field would judge or sign other content than
#: what is delivered).
MAX_FIELD = 60000
#: A replacement body is spooled to disk past this size, and refused past
#: ``MAX_BODY``.
SPOOL_BODY = 1 << 20
MAX_BODY = 256 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MACRO = re.compile(r"[A-Za-z_]|\{[A-Za-z0-9_]{1,40}\}")
_HEADER_NAME = re.compile(r"[!-9;-~]{1,200}")
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})")


@dataclass(frozen=True)
class MilterConfig:
    """One ``[[plugins.milter.milters]]`` entry, checked."""

    name: str
    socket: m.SocketSpec
    connect_timeout: float = 10.0
    command_timeout: float = 10.0
    content_timeout: float = 30.0
    default_action: str = "tempfail"
    macros: dict[str, str] = field(default_factory=dict)


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"letters, digits, '_', '.', '-' (got {describe(value)})")
    return value


def _positive(value: float) -> float:
    # The kind allows 0; a timeout of nothing would fail every milter.
    if value <= 0:
        raise ValueError(f"expected seconds (0 < s <= 3600), got {describe(value)}")
    return float(value)


def _macros(macros: dict[str, Any]) -> dict[str, str]:
    for key, value in macros.items():
        if not _MACRO.fullmatch(key):
            raise ValueError(
                f'."{key}": a macro name is one letter or {{name}}, such as '
                '"j" or "{daemon_name}"'
            )
        if not isinstance(value, str) or "\0" in value:
            raise ValueError(f'."{key}": expected a string, got {describe(value)}')
    return macros


def _auth_author(session: Session, params: Mapping[str, Any]) -> str | None:
    """``{auth_author}``: the ``MAIL`` ``AUTH=`` submitter (RFC 4954 5),
    xtext-decoded, as Postfix gives it -- only from an authenticated client
    (from anyone else it is not to be trusted, nor passed on), never ``<>``."""
    value = params.get("AUTH")
    if not session.auth or not isinstance(value, str) or value == "<>":
        return None
    try:
        author = xtext_decode(value)
    except ValueError:
        return None
    # A macro is a C string: a NUL would cut it (or a control code confuse).
    return author if author.isprintable() else None


def _unique(milters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = [entry["name"] for entry in milters]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"[{i}].name: {name!r} is used twice")
    return milters


def _timeout(name: str, default: float, doc: str) -> Key:
    return Key(name, "duration", default=default, minimum=0, maximum=3600,
               convert=_positive, doc=doc)  # fmt: skip


#: One ``[[plugins.milter.milters]]`` entry.
MILTER = Schema(
    Key("name", required=True, convert=_name,
        doc="The milter's name in logs and results (letters, digits, ``_``, "
        "``.``, ``-``; unique)."),
    Key("socket", required=True, convert=m.parse_socket,
        doc="Where the milter listens, as Postfix writes it: "
        '``"inet:PORT@HOST"`` (also ``"inet:HOST:PORT"``), ``"inet6:PORT@HOST"`` '
        'or ``"unix:/absolute/path"``.'),
    _timeout("connect_timeout", 10.0,
             "Seconds to connect and negotiate options (more than 0, at most 3600)."),
    _timeout("command_timeout", 10.0,
             "Seconds to wait for the answer to each command before the message "
             "(connect, HELO, MAIL, RCPT, DATA). More than 0, at most 3600."),
    _timeout("content_timeout", 30.0,
             "Seconds for the whole message with this milter: its header fields, "
             "its body and the verdict at its end (a ``PROGRESS`` answer does not "
             "extend it), however many pieces it is sent in; more than 0, at most "
             "3600. Keep "
             "the plugin's hook timeout (``[plugins] timeout``) above the sum "
             "over the milters, so that a slow milter's ``default_action`` applies."),
    Key("default_action", "choice", default="tempfail", choices=DEFAULT_ACTIONS,
        doc="What a fault of this milter does: ``\"tempfail\"`` (``451 4.7.1``) "
        "or ``\"accept\"`` (go on without it)."),
    Key("macros", "table", default={}, convert=_macros,
        doc="More macros to send at connect, by name (a letter or ``{name}``), "
        'each a string: ``{ "{daemon_name}" = "mx-in", "j" = "mx.example.org" }``; '
        "they replace Bonzo's values of the same name."),
)  # fmt: skip
#: The ``[plugins.milter]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("milters", "tables", default=[], schema=MILTER, convert=_unique,
        doc="The milters, in the order they are asked "
        "(``[[plugins.milter.milters]]``). With none, nothing is filtered (a "
        "warning is logged at start-up)."),
)  # fmt: skip
KEYS = tuple(SCHEMA.names)
MILTER_KEYS = tuple(MILTER.names)
#: ``test_bundle`` checks the README documents these too.
RULE_KEYS = MILTER_KEYS


# ------------------------------------------------------------------ replies
def _clean(text: str, limit: int = 200) -> str:
    """Milter text made safe for an SMTP reply: printable ASCII, bounded."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit]).strip()


def reply_error(reply: m.ReplyCode) -> SMTPError:
    """The :class:`SMTPError` for a milter's ``REPLYCODE``: its 4xx/5xx code,
    the enhanced code if the first line has one of the same class, and the
    text of each line (``NNN-`` prefixes removed), sanitised and bounded."""
    code = reply.code
    lines = []
    enhanced = None
    text = reply.text.replace("\r\n", "\n").rstrip("\n")  # a final CRLF ends, adds no line
    for n, raw in enumerate(text.split("\n")[:10]):
        line = raw
        if n and re.match(r"[0-9]{3}[ -]", line):
            line = line[4:]
        found = _ENHANCED.match(line)
        if found:
            if n == 0 and found.group(1) == str(code)[0]:
                enhanced = found.group(0)
            line = line[found.end() :]
        lines.append(_clean(line) or "Refused by a filter")
    if not lines:
        lines = ["Refused by a filter"]
    if enhanced is None:
        enhanced = "4.7.1" if code < 500 else "5.7.1"
    error_class = TransientError if code < 500 else PermanentError
    return error_class("\n".join(lines), code, enhanced)


def _reject() -> SMTPError:
    return PermanentError("Refused by a content filter", 550, "5.7.1")


def _tempfail() -> SMTPError:
    return TransientError("Try again later (content filter)", 451, "4.7.1")


def _unavailable() -> SMTPError:
    return TransientError("Service unavailable, try again later (content filter)", 451, "4.7.1")


# ------------------------------------------------------------- session state
@dataclass
class _Milter:
    """One milter's state in one session."""

    config: MilterConfig
    client: m.MilterClient | None = None
    #: ``None``, ``"failed"`` (fault, default_action tempfail), or ``"done"``
    #: (accepted the session, or failed with default_action accept).
    session_state: str | None = None
    #: True once the milter accepted the current message (asked no more about it).
    message_done: bool = False


@dataclass
class _State:
    milters: list[_Milter]
    #: A milter asked to discard every message of the session.
    discard_session: str | None = None


def _state(session: Session) -> _State | None:
    state = session.stash.get(STASH)
    return state if isinstance(state, _State) else None


def _record(
    target: Any, result: str, name: str, action: str, reason: str = "", **details: Any
) -> None:
    """``results.add("milter", ...)`` where the core has per-plugin results."""
    results = getattr(target, "results", None)
    if results is None:
        return
    try:
        results.add("milter", result, reason, milter=name, action=action, **details)
    except ValueError as exc:  # too many results: the verdict still stands
        log.warning("milter %s: result not recorded: %s", name, exc)


def _bracketed(address: str) -> str:
    return address if address.startswith("<") else f"<{address}>"


def _esmtp_args(params: Mapping[str, Any]) -> list[str]:
    return [k if v is None or v is True else f"{k}={v}" for k, v in params.items()]


def _unbracketed(address: str) -> str:
    return address.strip().removeprefix("<").removesuffix(">")


def _parse_args(args: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for word in args.split():
        key, sep, value = word.partition("=")
        out[key.upper()] = value if sep else None
    return out


def _family(ip: str) -> str:
    if ip in ("", "0.0.0.0"):
        return m.FAMILY_UNKNOWN
    return m.FAMILY_INET6 if ":" in ip else m.FAMILY_INET


# ------------------------------------------------------------ header reading
def _blocks(head: bytes) -> Iterator[bytes]:
    """The header fields of ``head`` (header lines only, as
    :meth:`~bonzo.session.Envelope.client_header_section` gives them), each
    with its folded lines."""
    start = 0
    pos = 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        end = len(head) if end < 0 else end + 1
        if pos > start and head[pos : pos + 1] not in (b" ", b"\t"):
            yield head[start:pos]
            start = pos
        pos = end
    if start < len(head):
        yield head[start:]


#: Bonzo's own ``Received:`` among the names a milter's changes follow.
_OWN_TRACE = "\0own received"


def _fields(head: bytes) -> Iterator[tuple[str, str]]:
    """Each field of ``head`` as ``(name, value)`` for the milter: the name
    as the envelope reads it (white space before the colon is not part of
    it, RFC 5322 4.5.8), the value as after the colon with ``\n`` between
    folded lines."""
    for block in _blocks(head):
        name, _, value = block.partition(b":")
        text = value.replace(b"\r\n", b"\n").rstrip(b"\n")
        yield (
            name.strip(b" \t").decode("utf-8", "surrogateescape"),
            text.decode("utf-8", "surrogateescape"),
        )


def _header_lines(envelope: Envelope) -> tuple[bytes, IO[bytes]]:
    """The message's header section as it will be delivered (the fields
    Bonzo and plugins added, then the client's, split as the envelope splits
    it, so that a milter is shown the fields every other reader sees) and
    its content file positioned at the start of the body. Raises
    :class:`~bonzo.session.HeaderSectionTooLarge` as the envelope does."""
    section, start = envelope.client_header_section()
    body = envelope.open_body()
    body.seek(start)
    return envelope.header_bytes + section, body


def _unshowable(head: bytes) -> SMTPError | None:
    """Why the header section ``head`` cannot be shown to a milter whole
    (``None`` if it can): the milter would judge, or sign, other content
    than what is delivered."""
    if b"\0" in head:
        # The milter protocol carries a field as a C string: a NUL would cut
        # it. Malformed (RFC 5322 3.2.0).
        return PermanentError(554, "Header field contains a NUL octet", "5.6.0")
    if len(head) > MAX_FIELD and any(len(b) > MAX_FIELD for b in _blocks(head)):
        return PermanentError(
            552, f"Header field too long to be filtered (at most {MAX_FIELD} octets)", "5.3.4"
        )
    return None


def _body_chunks(body: IO[bytes]) -> Iterator[bytes]:
    while True:
        chunk = body.read(m.CHUNK_SIZE)
        if not chunk:
            return
        yield chunk


class _BodySink:
    """A replacement body, spooled to disk past :data:`SPOOL_BODY`, bounded."""

    def __init__(self) -> None:
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(SPOOL_BODY)  # noqa: SIM115
        self.size = 0

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_BODY:
            raise m.MilterProtocolError(f"a replacement body over {MAX_BODY} octets")
        self.file.write(data)


# -------------------------------------------------------------------- plugin
class MilterPlugin:
    """Passes each stage to the configured milters and applies their answers."""

    #: The decision hooks where it can accept: none (it refuses or has no
    #: opinion), so ``bonzo check`` warns when no other plugin can accept.
    accepts = ()

    def __init__(self) -> None:
        self.milters: list[MilterConfig] = []
        self.hostname = "localhost"

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.milter]`` and its ``[[plugins.milter.milters]]``."""
        values = SCHEMA.parse(config, app)
        # A copy of each table of macros: the default ``{}`` is shared.
        milters = [
            MilterConfig(**{**entry, "macros": dict(entry["macros"])})
            for entry in values["milters"]
        ]
        self.milters = milters
        #: What one hook call may wait for the milters, each in turn: the
        #: content answers of every milter at the end of a message, or each
        #: one's connection and first answer at connect (checked against the
        #: hook time limit by ``bonzo check``).
        self.backend_timeout = max(
            sum(c.content_timeout for c in milters),
            sum(c.connect_timeout + c.command_timeout for c in milters),
        )
        # Named when a hook runs out of time.
        self.backend = ", ".join(f"{c.name} at {c.socket}" for c in milters)
        settings = getattr(app, "settings", None)
        self.hostname = getattr(settings, "hostname", None) or "localhost"

    @hookimpl
    def bonzo_startup(self) -> None:
        """Say which milters are asked."""
        if not self.milters:
            log.warning("milter: no milters configured: nothing is filtered")
        for c in self.milters:
            log.info("milter: %s at %s (default_action %s)", c.name, c.socket, c.default_action)

    # ------------------------------------------------------------- helpers
    def _macros(self, c: MilterConfig, values: Mapping[str, Any]) -> dict[str, str]:
        return {k: str(v) for k, v in values.items() if v is not None}

    async def _fail(
        self, session: Session, mi: _Milter, exc: Exception, stage: str, envelope: Envelope | None
    ) -> None:
        """A milter failed: log, close, apply its ``default_action``."""
        c = mi.config
        if mi.client is not None:
            mi.client.close()
        action = c.default_action
        # At connect the core sends a 4xx as 421 (the only 4xx a greeting
        # may be, RFC 5321 3.1): the log says what the client got.
        code = "421" if stage == "connect" else "451"
        log.warning(
            "[%s %s] milter %s failed at %s: %s; %s",
            session.id,
            session.remote_ip,
            c.name,
            stage,
            exc,
            f"answered {code} 4.7.1 (default_action tempfail)"
            if action == "tempfail"
            else "ignored for this session (default_action accept)",
        )
        _record(
            envelope if envelope is not None else session,
            "error",
            c.name,
            action,
            str(exc)[:200],
            stage=stage,
        )
        if action == "tempfail":
            mi.session_state = "failed"
            raise _unavailable()
        mi.session_state = "done"

    async def _ask_each(
        self,
        session: Session,
        envelope: Envelope,
        state: _State,
        stage: str,
        ask: Callable[[_Milter, m.MilterClient], Awaitable[Any]],
        *,
        message: bool = True,
    ) -> Any:
        """``ask`` each active milter in turn (``message``: only those still
        in the message); a failure is handled as ``on_error`` says, and the
        first verdict that decides is returned."""
        for mi in self._active(state, message=message):
            assert mi.client is not None
            try:
                outcome = await ask(mi, mi.client)
            except m.MilterError as exc:
                await self._fail(session, mi, exc, stage, envelope)
                continue
            verdict = self._verdict(session, mi, outcome, stage, envelope, message=True)
            if verdict is not None:
                return verdict
        return None

    def _active(self, state: _State, *, message: bool) -> Iterator[_Milter]:
        for mi in state.milters:
            if mi.session_state == "failed":
                raise _unavailable()
            if mi.session_state == "done" or (message and mi.message_done):
                continue
            yield mi

    def _verdict(
        self,
        session: Session,
        mi: _Milter,
        outcome: m.Outcome,
        stage: str,
        target: Any,
        *,
        message: bool,
    ) -> Any:
        """Turn a milter's verdict at a stage into Bonzo's (``None``: no opinion)."""
        action = outcome.action
        c = mi.config
        if action == "continue":
            return None
        if action != "accept":
            log.info(
                "[%s %s] milter %s at %s: %s", session.id, session.remote_ip, c.name, stage, action
            )
        verdict = outcome.verdict
        if action == "accept":
            if message:
                mi.message_done = True
            else:
                mi.session_state = "done"
            if stage != "end of message":  # recorded with the changes there
                _record(target, "pass", c.name, action, stage=stage)
            return None
        if isinstance(verdict, m.ReplyCode):
            error = reply_error(verdict)
            _record(
                target,
                "reject" if verdict.code >= 500 else "tempfail",
                c.name,
                action,
                error.message[:200],
                stage=stage,
                code=verdict.code,
            )
            raise error
        if action == "reject":
            _record(target, "reject", c.name, action, stage=stage)
            raise _reject()
        if action == "tempfail":
            _record(target, "tempfail", c.name, action, stage=stage)
            raise _tempfail()
        if action == "discard":
            _record(target, "discard", c.name, action, stage=stage)
            return self._discard(session, c.name, message=message)
        return None

    def _discard(self, session: Session, name: str, *, message: bool) -> Any:
        if not message:
            state = _state(session)
            if state is not None:
                state.discard_session = name
            return None
        return Discard(f"discarded by milter {name}")

    # -------------------------------------------------------------- stages
    @hookimpl
    async def bonzo_connect(self, session: Session) -> Any:
        """Open a connection to each milter, negotiate, send CONNECT."""
        # After XCLIENT this runs again for the client it names: the
        # milters start over with a new session.
        await self._quit_all(session)
        state = _State([_Milter(c) for c in self.milters])
        session.stash[STASH] = state
        ip = session.remote_ip
        for mi in state.milters:
            c = mi.config
            client = m.MilterClient(
                c.socket,
                connect_timeout=c.connect_timeout,
                command_timeout=c.command_timeout,
                content_timeout=c.content_timeout,
            )
            mi.client = client
            macros = {
                "j": self.hostname,
                # Postfix's default ($myhostname): milters (rspamd) take it
                # as the authserv-id of the results they add.
                "{daemon_name}": self.hostname,
                "v": "Bonzo",
                "_": f"[{ip}] [{ip}]",
                "{client_addr}": ip,
                "{client_port}": str(session.remote_port),
                "{client_name}": f"[{ip}]",
                "{if_addr}": session.local_ip or None,
                "{if_port}": str(session.local_port) if session.local_port else None,
                # Postfix's name for the same (its default connect macros).
                "{daemon_addr}": session.local_ip or None,
            }
            macros.update(c.macros)
            family = _family(ip)
            try:
                await client.open()
                outcome = await client.connect(
                    f"[{ip}]", family, session.remote_port, ip, self._macros(c, macros)
                )
            except m.MilterError as exc:
                await self._fail(session, mi, exc, "connect", None)
                continue
            verdict = self._verdict(session, mi, outcome, "connect", session, message=False)
            if verdict is not None:  # pragma: no cover - connect verdicts raise or pass
                return verdict
        return None

    @hookimpl
    async def bonzo_helo(self, session: Session, name: str) -> Any:
        """HELO/EHLO to each milter."""
        state = _state(session)
        if state is None:
            return None
        tls = session.tls or {}
        macros = {
            "{tls_version}": tls.get("version"),
            "{cipher}": tls.get("cipher"),
            "{cipher_bits}": tls.get("bits"),
        }
        for mi in self._active(state, message=False):
            assert mi.client is not None
            try:
                if mi.client.in_transaction:  # HELO ends a transaction
                    await mi.client.abort()
                outcome = await mi.client.helo(name, self._macros(mi.config, macros))
            except m.MilterError as exc:
                await self._fail(session, mi, exc, "helo", None)
                continue
            self._verdict(session, mi, outcome, "helo", session, message=False)
        return None

    @hookimpl
    async def bonzo_mail(
        self, session: Session, envelope: Envelope, address: str, params: dict[str, Any]
    ) -> Any:
        """MAIL to each milter (after ABORT of an unfinished transaction)."""
        state = _state(session)
        if state is None:
            return None
        macros = {
            "i": envelope.id,
            "{mail_addr}": address,
            "{mail_mailer}": "smtp",
            "{auth_type}": session.auth_mechanism if session.auth else None,
            "{auth_authen}": session.auth,
            "{auth_author}": _auth_author(session, params),
            "{tls_version}": (session.tls or {}).get("version"),
        }

        async def mail(mi: _Milter, client: m.MilterClient) -> Any:
            mi.message_done = False  # asked about this message
            if client.in_transaction:
                await client.abort()
            return await client.mail(
                _bracketed(address), _esmtp_args(params), self._macros(mi.config, macros)
            )

        # A milter after one that decides here (a DISCARD) is sent no MAIL,
        # so nothing else of this message either.
        for mi in state.milters:
            mi.message_done = True
        verdict = await self._ask_each(session, envelope, state, "mail", mail, message=False)
        if verdict is not None:
            return verdict
        if state.discard_session is not None:
            return self._discard(session, state.discard_session, message=True)
        return None

    @hookimpl
    async def bonzo_rcpt(
        self, session: Session, envelope: Envelope, address: str, params: dict[str, Any]
    ) -> Any:
        """RCPT to each milter: a refusal refuses this recipient; otherwise no
        opinion, so the plugin that owns recipients decides."""
        state = _state(session)
        if state is None:
            return None
        domain = address.rpartition("@")[2]
        macros = {"{rcpt_addr}": address, "{rcpt_host}": domain, "{rcpt_mailer}": "smtp"}
        return await self._ask_each(
            session,
            envelope,
            state,
            "rcpt",
            lambda mi, client: client.rcpt(
                _bracketed(address), _esmtp_args(params), self._macros(mi.config, macros)
            ),
        )

    @hookimpl
    async def bonzo_data(self, session: Session, envelope: Envelope) -> Any:
        """DATA to each milter."""
        state = _state(session)
        if state is None:
            return None
        return await self._ask_each(
            session,
            envelope,
            state,
            "data",
            lambda mi, client: client.data(self._macros(mi.config, {"i": envelope.id})),
        )

    @hookimpl
    async def bonzo_message(self, session: Session, envelope: Envelope) -> Any:
        """Headers, end of headers, body and end of message to each milter in
        turn (each sees the changes of those before it); apply the changes."""
        state = _state(session)
        if state is None:
            return None
        quarantine: str | None = None
        for mi in self._active(state, message=True):
            assert mi.client is not None
            c = mi.config
            head, body = _header_lines(envelope)
            problem = _unshowable(head)
            if problem is not None:
                log.info(
                    "[%s %s] milter %s: %s; refused",
                    session.id,
                    session.remote_ip,
                    c.name,
                    problem.message,
                )
                _record(envelope, "reject", c.name, "none", problem.message)
                raise problem
            sink = _BodySink()
            try:
                outcome = await mi.client.message(
                    _fields(head),
                    _body_chunks(body),
                    self._macros(c, {"i": envelope.id}),
                    self._macros(c, {"i": envelope.id}),
                    body_sink=sink,
                )
            except m.MilterError as exc:
                sink.file.close()
                await self._fail(session, mi, exc, "end of message", envelope)
                continue
            try:
                verdict = self._verdict(
                    session, mi, outcome, "end of message", envelope, message=True
                )
                if verdict is not None:
                    if quarantine is not None and isinstance(verdict, Discard):
                        # The first of Discard and Quarantine decides, as
                        # between plugins: an earlier milter's stands.
                        return Quarantine(quarantine)
                    return verdict
                reason = self._apply(session, envelope, mi, outcome, sink)
            finally:
                sink.file.close()
            _record(
                envelope,
                "quarantine" if reason is not None else "pass",
                c.name,
                outcome.action,
                changes=len(outcome.changes),
            )
            if reason is not None and quarantine is None:
                quarantine = reason
        if quarantine is not None:
            return Quarantine(quarantine)
        return None

    def _apply(
        self, session: Session, envelope: Envelope, mi: _Milter, outcome: m.Outcome, sink: _BodySink
    ) -> str | None:
        """Apply the modifications of one milter; return a quarantine reason."""
        c = mi.config
        client = mi.client
        assert client is not None and client.options is not None
        leadspc = bool(client.options.protocol & m.P_HDR_LEADSPC)
        quarantine = None
        names: list[str] | None = None  # the header names, as the changes go
        for change in outcome.changes:
            try:
                if isinstance(change, m.HeaderChange):
                    if names is None:
                        names = [n.lower() for n, _ in envelope.headers()]
                        own = envelope.trace_index()
                        if own is not None and names[own] == "received":
                            names[own] = _OWN_TRACE
                    self._header(envelope, change, leadspc, names)
                elif isinstance(change, m.QuarantineRequest):
                    quarantine = _clean(change.reason) or f"milter {c.name}"
                elif isinstance(change, m.ReplaceBody):
                    sink.file.seek(0)
                    envelope.replace_body(sink.file)
                elif isinstance(change, m.RecipientChange):
                    address = _unbracketed(change.address)
                    if change.code == m.R_DELRCPT:
                        envelope.remove_recipient(address)
                    else:
                        params = _parse_args(change.args) or None
                        envelope.add_recipient_address(address, params)
                elif isinstance(change, m.ChangeSender):
                    params = _parse_args(change.args) or None
                    envelope.change_sender(_unbracketed(change.address), params)
            except ValueError as exc:
                # The envelope refused it (a malformed name, value or
                # address): the rest still applies.
                log.warning(
                    "[%s %s] milter %s: %s refused: %s",
                    session.id,
                    session.remote_ip,
                    c.name,
                    type(change).__name__,
                    exc,
                )
        return quarantine

    def _header(
        self, envelope: Envelope, change: m.HeaderChange, leadspc: bool, names: list[str]
    ) -> None:
        """Apply one header change; ``names`` (the header section's names,
        lower-case) follows, so that ``ADDHEADER`` knows where the end is."""
        name, value = change.name, change.value
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"bad header name {name[:40]!r}")
        if leadspc and value[:1] in (" ", "\t"):
            value = value[1:]  # the core writes "name: value"
        key = name.lower()
        if change.code == m.R_CHGHEADER:
            # An empty value deletes; index 0 means the first, as for Sendmail.
            # Bonzo's own Received: is not counted (it is _OWN_TRACE here):
            # Sendmail and Postfix count from the field after their own.
            occurrence = max(change.index or 0, 1)
            found = [i for i, n in enumerate(names) if n == key]
            if len(found) >= occurrence:
                target = found[occurrence - 1]
                # The envelope counts every field of the name, ours too.
                same = (key, _OWN_TRACE) if key == "received" else (key,)
                nth = sum(1 for n in names[: target + 1] if n in same)
                envelope.change_header(name, value or None, nth)
                if not value:
                    del names[target]
            elif value:
                # A missing field is added at the end.
                envelope.insert_header(len(names), name, value)
                names.append(key)
        elif change.code == m.R_INSHEADER:
            index = min(change.index or 0, len(names))
            envelope.insert_header(index, name, value)
            names.insert(index, key)
        else:  # ADDHEADER: after the last field
            envelope.insert_header(len(names), name, value)
            names.append(key)

    # ------------------------------------------------------------ the end
    @hookimpl
    async def bonzo_rset(self, session: Session) -> None:
        """RSET: ABORT the milters' transactions."""
        await self._abort(session)

    async def _abort(self, session: Session) -> None:
        state = _state(session)
        if state is None:
            return
        for mi in state.milters:
            if mi.client is not None and mi.client.in_transaction and not mi.client.closed:
                try:
                    await mi.client.abort()
                except m.MilterError as exc:
                    log.info("milter %s: abort failed: %s", mi.config.name, exc)

    @hookimpl
    async def bonzo_disconnect(self, session: Session) -> None:
        """QUIT and close every milter connection of the session."""
        await self._quit_all(session)

    async def _quit_all(self, session: Session) -> None:
        state = session.stash.pop(STASH, None)
        if not isinstance(state, _State):
            return
        for mi in state.milters:
            if mi.client is not None:
                await mi.client.quit()

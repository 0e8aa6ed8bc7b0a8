"""Messages checked by rspamd over HTTP (``POST /checkv2``); rspamd's action
becomes the reply, its header changes and rewritten subject are applied.

Tornado's :class:`~tornado.httpclient.AsyncHTTPClient` sends the request,
the message streamed from its spool (``body_producer``), and reads the
answer with a bound on its size. See ``README.rst`` in this directory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.header import Header
from typing import Any
from urllib.parse import urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httputil import HTTPHeaders

from bonzo.errors import SMTPError
from bonzo.hookspecs import Discard, Quarantine, hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session
from bonzo.settings import finite_number

from .._config import describe
from .._scan import (
    ScanError,
    add_header,
    body_chunks,
    max_size_key,
    on_error_key,
    parse_blank_ok,
    record,
    remove_header,
    set_header,
    tempfail,
    timeout_keys,
    too_large,
)

__all__ = ["RspamdPlugin", "RspamdReply", "KEYS", "ACTIONS", "parse_reply"]

log = logging.getLogger("bonzo.plugins.rspamd")

#: rspamd's actions, mildest first (``quarantine`` and ``discard`` are
#: rspamd's since 1.9: set the message aside, or drop it with a 250).
ACTIONS = (
    "no action",
    "greylist",
    "add header",
    "rewrite subject",
    "soft reject",
    "quarantine",
    "reject",
    "discard",
)
#: The largest answer read from rspamd (its symbols with their options).
MAX_REPLY = 1 << 20
#: Requests to rspamd at once from one worker process (Tornado's shared
#: client allows 10; more wait in its queue, within ``timeout``).
MAX_CONNECTIONS = 100
#: Header changes applied from one answer at most.
MAX_CHANGES = 50
CHUNK_SIZE = 64 * 1024
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")


def _url(value: str) -> str:
    """rspamd's address as the URL of its ``/checkv2``."""
    url = value.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is no number 0..65535
    except ValueError:
        parts = None  # type: ignore[assignment]
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f'expected rspamd\'s address such as "http://127.0.0.1:11333", got {describe(url)}'
        )
    if parts.query or parts.fragment:
        raise ValueError("no query or fragment (the plugin adds /checkv2)")
    return url if parts.path.endswith("/checkv2") else url + "/checkv2"


def _spam_header(value: str) -> str:
    name = value.strip()
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"{describe(name)} is not a header name")
    return name


def _settings_id(value: str) -> str:
    settings_id = value.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", settings_id):
        raise ValueError(f"{describe(settings_id)} is not a settings id")
    return settings_id


#: The ``[plugins.rspamd]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("url", "str", default="http://127.0.0.1:11333", convert=_url,
        doc="rspamd's normal worker (``worker-normal.inc`` ``bind_socket``): an "
        "``http://`` or ``https://`` URL without query or fragment. "
        "``/checkv2`` is added unless the path already ends with it. "
        "``https://`` works through a TLS proxy."),
    *timeout_keys(
        20.0,
        "How long the whole request may take (rspamd's own ``task_timeout`` is "
        "8 seconds). Keep it below the plugin's hook timeout "
        "(``[plugins] timeout``, 60 seconds by default).",
    ),
    max_size_key(
        50 * 1024 * 1024,
        "The largest message sent to rspamd (52428800 is ``\"50M\"``); K, M "
        "and G are powers of 1024. Larger ones go on unchecked.",
    ),
    on_error_key(
        "``\"tempfail\"`` defers the message when rspamd gives no answer "
        "(``451 4.7.1``); ``\"accept\"`` lets it through."
    ),
    Key("greylist", "bool", default=True,
        doc="Whether rspamd's ``greylist`` action defers the message (see above)."),
    Key("spam_header", "str", default="X-Spam", convert=_spam_header,
        doc="The header set to ``Yes`` for the ``add header`` action (any "
        "earlier one is replaced); ``\"\"``: none."),
    Key("settings_id", "str", default="", convert=_settings_id,
        doc="Sent as ``Settings-ID`` to choose one of rspamd's settings "
        "(``settings.conf``), such as a set for outbound mail: up to 100 "
        "letters, digits and ``_.-``. ``\"\"`` sends none."),
)  # fmt: skip
KEYS = tuple(SCHEMA.names)


@dataclass(frozen=True)
class RspamdReply:
    """What Bonzo uses of rspamd's answer."""

    action: str
    score: float
    required_score: float
    symbols: list[str] = field(default_factory=list)
    #: ``messages.smtp_message``: the text rspamd asks to be sent to the
    #: client (sanitised), or "".
    smtp_message: str = ""
    #: The rewritten ``Subject:`` for ``rewrite subject``, or ``None``.
    subject: str | None = None
    #: ``milter.add_headers`` as ``(name, value, order)``.
    add_headers: list[tuple[str, str, int | None]] = field(default_factory=list)
    #: ``milter.remove_headers`` as ``(name, occurrence)`` (0: every one).
    remove_headers: list[tuple[str, int]] = field(default_factory=list)


def _text(value: Any, limit: int = 200) -> str:
    """Printable ASCII of at most ``limit`` characters: what may go into a
    reply line."""
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in str(value))
    return text[:limit].strip()


def _header_value(value: str) -> str | None:
    """A header value from rspamd, or ``None`` when it could start a new
    header (a line break not followed by white space) or has a NUL."""
    if len(value) > 8192 or "\0" in value:
        return None
    lines = value.replace("\r\n", "\n").split("\n")
    if any(not line or line[0] not in " \t" for line in lines[1:]) or "\r" in value:
        return None
    return value


def _number(value: Any, what: str) -> float:
    if not finite_number(value):
        raise ScanError(f"rspamd's answer has no usable {what}: {describe(value)}")
    return float(value)


def parse_reply(data: bytes) -> RspamdReply:
    """rspamd's JSON answer to ``/checkv2``; :class:`ScanError` for
    anything that is not one."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ScanError("rspamd's answer is not JSON") from None
    if not isinstance(doc, dict):
        raise ScanError("rspamd's answer is not a JSON object")
    action = doc.get("action")
    if action not in ACTIONS:
        raise ScanError(f"rspamd's answer has no known action: {describe(action)}")
    score = _number(doc.get("score", 0.0), "score")
    required = _number(doc.get("required_score", 0.0), "required_score")
    symbols = doc.get("symbols")
    names = sorted(str(k)[:64] for k in symbols)[:100] if isinstance(symbols, dict) else []
    messages = doc.get("messages")
    smtp_message = ""
    if isinstance(messages, dict) and isinstance(messages.get("smtp_message"), str):
        smtp_message = _text(messages["smtp_message"])
    subject = doc.get("subject")
    if not isinstance(subject, str) or _header_value(subject) is None:
        subject = None
    adds: list[tuple[str, str, int | None]] = []
    removes: list[tuple[str, int]] = []
    milter = doc.get("milter")
    if isinstance(milter, dict):
        adds = _adds(milter.get("add_headers"))
        removes = _removes(milter.get("remove_headers"))
    return RspamdReply(action, score, required, names, smtp_message, subject, adds, removes)


def _adds(table: Any) -> list[tuple[str, str, int | None]]:
    # {"Name": "value"}, {"Name": {"value": "v", "order": 0}}, or a list of
    # either for several headers of one name.
    out: list[tuple[str, str, int | None]] = []
    if not isinstance(table, dict):
        return out
    for name, spec in table.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            continue
        for item in spec if isinstance(spec, list) else [spec]:
            order = None
            if isinstance(item, dict):
                raw_order = item.get("order")
                if isinstance(raw_order, int) and not isinstance(raw_order, bool):
                    order = raw_order if raw_order >= 0 else None
                item = item.get("value")
            if isinstance(item, str) and _header_value(item) is not None:
                out.append((name, item, order))
    return out[:MAX_CHANGES]


def _removes(table: Any) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    if not isinstance(table, dict):
        return out
    for name, occurrence in table.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            continue
        if isinstance(occurrence, bool) or not isinstance(occurrence, int):
            occurrence = 0
        out.append((name, occurrence))
    return out[:MAX_CHANGES]


def request_headers(session: Session, envelope: Envelope, settings_id: str = "") -> HTTPHeaders:
    """The envelope as rspamd's request headers (its protocol: ``IP``,
    ``Helo``, ``From``, one ``Rcpt`` per recipient, ``Queue-Id``, ``User``,
    ``TLS-Cipher``, ``TLS-Version``, ``Settings-ID``)."""
    headers = HTTPHeaders()
    headers["IP"] = session.remote_ip
    if session.helo:
        headers["Helo"] = _text(session.helo, 255)
    headers["From"] = _text(envelope.mail_from, 512) or "<>"
    for rcpt in envelope.rcpt_tos:
        headers.add("Rcpt", _text(rcpt, 512))
    headers["Queue-Id"] = envelope.id
    if session.auth:
        headers["User"] = _text(session.auth, 255)
    tls = session.tls
    if tls:
        if tls.get("cipher"):
            headers["TLS-Cipher"] = _text(tls["cipher"], 100)
        if tls.get("version"):
            headers["TLS-Version"] = _text(tls["version"], 100)
    if settings_id:
        headers["Settings-ID"] = settings_id
    return headers


class RspamdPlugin:
    """Checks each message with rspamd in :func:`~bonzo.hookspecs.bonzo_message`."""

    def __init__(self) -> None:
        self.url = "http://127.0.0.1:11333/checkv2"
        self.backend = self.url
        self.connect_timeout = 5.0
        self.timeout = 20.0
        self.max_size = 50 * 1024 * 1024
        self.accept_on_error = False
        self.greylist = True
        self.spam_header = "X-Spam"
        self.settings_id = ""
        # One HTTP client per event loop (tests run several loops; a worker
        # process has one).
        self._clients: weakref.WeakKeyDictionary[Any, AsyncHTTPClient] = weakref.WeakKeyDictionary()

    def client(self) -> AsyncHTTPClient:
        """This event loop's HTTP client for rspamd."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = AsyncHTTPClient(force_instance=True, max_clients=MAX_CONNECTIONS)
            self._clients[loop] = client
        return client

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.rspamd]``."""
        values = parse_blank_ok(SCHEMA, config, app, blank=("spam_header", "settings_id"))
        # A default is not converted; _url of a converted URL is the same URL.
        self.url = _url(values["url"])
        self.connect_timeout = values["connect_timeout"]
        self.timeout = values["timeout"]
        #: The longest one hook call waits for rspamd (checked against the
        #: hook time limit by ``bonzo check``).
        self.backend_timeout = self.timeout
        # Named when a hook runs out of time: without any user:password@.
        parts = urlsplit(self.url)
        self.backend = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
        self.max_size = values["max_size"]
        self.accept_on_error = values["on_error"] == "accept"
        self.greylist = values["greylist"]
        self.spam_header = values["spam_header"]
        self.settings_id = values["settings_id"]

    async def check(self, session: Session, envelope: Envelope) -> RspamdReply:
        """Ask rspamd about the message; :class:`ScanError` if it cannot say."""
        head = envelope.header_bytes
        headers = request_headers(session, envelope, self.settings_id)
        headers["Content-Length"] = str(len(head) + envelope.size)

        async def produce(write: Any) -> None:
            if head:
                await write(head)
            for chunk in body_chunks(envelope.open_body(), CHUNK_SIZE):
                await write(chunk)

        received: list[bytes] = []
        size = 0

        def collect(chunk: bytes) -> None:
            # Past the bound the rest is dropped (an exception here would
            # be logged by Tornado as uncaught); the time limit ends it.
            nonlocal size
            size += len(chunk)
            if size <= MAX_REPLY:
                received.append(chunk)

        request = HTTPRequest(
            self.url,
            method="POST",
            headers=headers,
            body_producer=produce,
            streaming_callback=collect,
            connect_timeout=self.connect_timeout,
            request_timeout=self.timeout,
            follow_redirects=False,
            decompress_response=False,
            user_agent="Bonzo",
        )
        # Named in the log without any user:password@ of the URL.
        where = self.backend
        try:
            await self.client().fetch(request)
        except HTTPClientError as exc:
            if exc.code == 599:
                raise ScanError(f"{where}: {exc.message or 'no answer'}") from None
            raise ScanError(f"{where}: HTTP {exc.code}") from None
        except OSError as exc:
            raise ScanError(f"{where}: {exc.strerror or exc}") from None
        except Exception as exc:
            # An answer Tornado cannot read as HTTP (a header section that
            # never ends, a bad status line: HTTPInputError and the like) is
            # no answer either. CancelledError is no Exception: it passes.
            detail = _text(f"{type(exc).__name__}: {exc}")
            raise ScanError(f"{where}: no HTTP answer that can be read ({detail})") from None
        if size > MAX_REPLY:
            raise ScanError(f"rspamd's answer is longer than {MAX_REPLY} octets")
        return parse_reply(b"".join(received))

    @hookimpl
    async def bonzo_message(
        self, session: Session, envelope: Envelope
    ) -> Quarantine | Discard | None:
        """Check the message and act on rspamd's action (see the README)."""
        if too_large(envelope, "rspamd", self.max_size, log):
            return None
        try:
            reply = await self.check(session, envelope)
        except ScanError as exc:
            record(envelope, "rspamd", "error", str(exc))
            if self.accept_on_error:
                log.warning(
                    "rspamd: message %s (session %s) passed unchecked (on_error = accept): %s",
                    envelope.id,
                    session.id,
                    exc,
                )
                return None
            log.warning(
                "rspamd: message %s (session %s) deferred: %s", envelope.id, session.id, exc
            )
            raise tempfail("spam filter unavailable") from None
        action = reply.action
        if action == "greylist" and not self.greylist:
            action = "no action"
        result = "pass" if action == "no action" else action.replace(" ", "_")
        record(
            envelope,
            "rspamd",
            result,
            reply.action,
            score=reply.score,
            required_score=reply.required_score,
            symbols=reply.symbols,
        )
        log.info(
            "rspamd: message %s (session %s): %s, score %.2f/%.2f",
            envelope.id,
            session.id,
            reply.action,
            reply.score,
            reply.required_score,
        )
        if action == "reject":
            raise SMTPError(
                554, reply.smtp_message or "Message refused as spam", enhanced_code="5.7.1"
            )
        if action in ("soft reject", "greylist"):
            raise SMTPError(451, reply.smtp_message or "Try again later", enhanced_code="4.7.1")
        if action == "discard":
            # Dropped with a 250: changes to a message nobody gets are moot.
            return Discard()
        self.apply(envelope, reply, action)
        if action == "quarantine":
            # rspamd's headers go with it, so the quarantine shows the score.
            return Quarantine(f"rspamd: score {reply.score:.2f}/{reply.required_score:.2f}")
        return None

    def apply(self, envelope: Envelope, reply: RspamdReply, action: str) -> None:
        """rspamd's header changes, then what the action asks for. A change
        the envelope refuses (a line too long to fold) is skipped and
        logged: the message still goes on, as rspamd's verdict stands. A
        header section too long to parse refuses the message
        (:class:`~bonzo.session.HeaderSectionTooLarge`)."""
        for name, occurrence in reply.remove_headers:
            try:
                remove_header(envelope, name, occurrence)
            except ValueError as exc:
                log.warning("rspamd: message %s: header %s not removed: %s", envelope.id, name, exc)
        for name, value, order in reply.add_headers:
            try:
                add_header(envelope, name, value, order)
            except ValueError as exc:
                log.warning("rspamd: message %s: header %s not added: %s", envelope.id, name, exc)
        if action == "add header" and self.spam_header:
            try:
                set_header(envelope, self.spam_header, "Yes")
            except ValueError as exc:
                log.warning(
                    "rspamd: message %s: header %s not set: %s", envelope.id, self.spam_header, exc
                )
        if action == "rewrite subject" and reply.subject is not None:
            self.rewrite_subject(envelope, reply.subject)

    def rewrite_subject(self, envelope: Envelope, subject: str) -> None:
        """Make ``subject`` the message's ``Subject:``. rspamd answers with
        the decoded subject, so a sender's run of adjacent RFC 2047 encoded
        words comes back as one word too long for a header line: such words
        are encoded again, the only way to fold them (the text a reader
        sees is the same)."""
        try:
            set_header(envelope, "Subject", subject)
            return
        except ValueError as exc:
            error = exc
        try:
            foldable = _foldable(subject)
            if foldable != subject:
                set_header(envelope, "Subject", foldable)
                log.info(
                    "rspamd: message %s: the rewritten Subject has words longer than %d "
                    "octets, written as RFC 2047 encoded words to fold it",
                    envelope.id,
                    LONG_WORD,
                )
                return
        except ValueError as exc:  # UnicodeEncodeError too (a lone surrogate)
            error = exc
        log.warning("rspamd: message %s: Subject not rewritten: %s", envelope.id, error)


#: The longest word of a rewritten subject left as it is when the subject
#: cannot be folded otherwise (RFC 5322 2.1.1: lines SHOULD be at most 78).
LONG_WORD = 78


def _foldable(value: str) -> str:
    """``value`` with each word longer than :data:`LONG_WORD` octets written
    as RFC 2047 encoded words (adjacent ones, which decode to the word: the
    white space between them is not part of the text), on lines of their
    own so that the header can be folded between them."""
    parts = re.split(r"(\s+)", value)
    for i, part in enumerate(parts):
        if len(part.encode()) > LONG_WORD and not part.isspace():
            parts[i] = Header(part, "utf-8").encode(linesep="\n")
    return "".join(parts)

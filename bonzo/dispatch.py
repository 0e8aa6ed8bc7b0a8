"""What each SMTP event asks the plugins, and how the answer becomes a reply.

The session loop (:mod:`bonzo.connection`) reads bytes, feeds the protocol
core and hands every event that needs a decision to
:meth:`Dispatcher.handle`. The dispatcher asks the plugins through the hook
runner (:meth:`bonzo.hooks.PluginSet.decide` / ``observe``), then applies
the verdict in one place (:meth:`Dispatcher._apply`) to the core, the
envelope and — through the core, which the :class:`~bonzo.session.Session`
is a view of — the session.

Anything that goes wrong on the way, at any stage, becomes a reply through
one function, :func:`error_reply`: a plugin's refusal as it raised it (never
changed), a plugin's fault or timeout as ``451 4.3.0`` (or what a
``bonzo_exception`` hook maps it to), a full disk as ``452 4.3.1``, a fault
while checking credentials as ``454 4.7.0``, a fault at connect as ``421``
(which closes); a ``2xx``/``3xx`` "refusal" counts as a fault. The reply's
log line is written once, by the connection, when the core queues it.

The dispatcher does no I/O: ``send`` (given by the connection) writes what
the core has queued, so that the ``250`` for a message is on its way before
the ``bonzo_accepted`` observers run.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from typing import Any

from tornado.log import access_log, app_log, gen_log

from . import errors, metrics
from .auth import MECHANISMS, Challenge, Mechanism, decode_response
from .hooks import PluginFailure, PluginSet, Refused, log_plugin_failure, passes_through
from .hookspecs import Accept, Discard, Quarantine
from .lmtp import LMTPProtocol
from .protocol import (
    Auth,
    AuthResponse,
    Data,
    Event,
    Helo,
    Mail,
    MessageComplete,
    Rcpt,
    Reset,
    SMTPProtocol,
    Unknown,
)
from .proxy import ProxyHeader
from .results import Results
from .session import (
    Envelope,
    Session,
    current_message_id,
    exception_text,
    log_escape,
    one_line,
    received_header,
)
from .settings import SMTPSettings

__all__ = ["Dispatcher", "error_reply", "greeting_refusal", "storage_error_reply"]

#: Verbs of RFC 5321 (and of RFC 821) that the core leaves to plugins: with
#: no plugin to answer, ``502 5.5.1`` ("command not implemented", RFC 5321
#: 4.2.4) rather than ``500`` ("command unrecognized"): the command exists
#: but is not offered here (Sendmail and Postfix answer ``EXPN`` with 502).
NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "SEND", "SOML", "SAML"})


_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def storage_error_reply(exc: BaseException) -> errors.SMTPError:
    """The reply to a storage fault: ``452 4.3.1`` for a full disk or quota
    (RFC 3463 "mail system full"), else ``451 4.3.0``."""
    for error in (exc, exc.__cause__):
        if isinstance(error, OSError) and error.errno in _FULL_DISK:
            return errors.SMTPError(452, "Insufficient system storage", enhanced_code="4.3.1")
    return errors.InternalConfusion()


def greeting_refusal(reply: errors.SMTPError) -> errors.SMTPError:
    """``reply`` as the refusal of a connection: a client may get only
    ``421`` or ``554`` instead of the greeting (RFC 5321 3.1, 4.3.2), so
    another ``4xx`` becomes ``421`` and another ``5xx`` ``554``, text and
    enhanced code kept. A new object: a plugin's error is never changed."""
    code = reply.status_code
    if code == 421 or code == 554:
        return reply
    return errors.SMTPError(
        421 if code < 500 else 554,
        reply.message,
        reply.log_message,
        *reply.args,
        enhanced_code=reply.enhanced_code,
        close=True,
    )


def error_reply(
    exc: BaseException, stage: str, session: Session | None, plugins: PluginSet
) -> tuple[errors.SMTPError, str]:
    """Turn any exception raised while answering ``stage`` into the reply to
    give and who decided it (a plugin's name, or ``"core"``). Logs faults
    with their traceback; never changes the exception.

    - a plugin's refusal (:class:`~bonzo.hooks.Refused`) or an error reply
      raised by the core: that reply, as it is;
    - a plugin's fault (:class:`~bonzo.hooks.PluginFailure`): what the first
      ``bonzo_exception`` hook maps it to, if any (never at AUTH);
    - a full disk: ``452 4.3.1``; at AUTH: ``454 4.7.0``; at connect:
      ``421 4.3.0`` (no greeting, the connection closes); anything else:
      ``451 4.3.0``.
    """
    if isinstance(exc, Refused):
        return exc.error, exc.plugin
    if isinstance(exc, errors.SMTPError) and exc.status_code >= 400:
        return exc, "core"
    if isinstance(exc, PluginFailure):
        plugin: str | None = exc.plugin
        hook, error = exc.hook, exc.error
        log_plugin_failure(session, hook, exc.plugin, error)
        # An AUTH fault is always 454 (a credential backend that is down must
        # not become a permanent refusal): bonzo_exception is not asked.
        mapped = None if stage == "AUTH" else _mapped(plugins, session, error, hook, exc.plugin)
        if mapped is not None:
            return mapped, exc.plugin
    else:
        plugin, error = None, exc
        where = f" [{session.id} {session.remote_ip}]" if session is not None else ""
        app_log.error(
            "Uncaught exception%s (%s): %s",
            where,
            stage,
            exception_text(exc),
            exc_info=(type(exc), exc, exc.__traceback__),
        )
    by = plugin or "core"
    reply = storage_error_reply(error)
    if reply.status_code == 452:
        return reply, by
    if stage == "AUTH":
        return errors.TransientError("Temporary authentication failure", 454, "4.7.0"), by
    if stage == "connect":
        # A local fault: 451 is no greeting; 421 is (RFC 5321 3.1, 4.2.5).
        text = "Service not available, closing transmission channel"
        return errors.SMTPError(421, text, enhanced_code="4.3.0"), by
    return reply, by


def _mapped(
    plugins: PluginSet, session: Session | None, error: BaseException, hook: str, plugin: str
) -> errors.SMTPError | None:
    """The first ``bonzo_exception`` hook's error reply for a plugin fault."""
    for call in plugins.calls["bonzo_exception"]:
        args = (session, error, hook, plugin)
        try:
            reply = call.function(*[args[i] for i in call.indexes])
        except BaseException as exc:
            if passes_through(exc):
                raise
            log_plugin_failure(session, "bonzo_exception", call.plugin, exc)
            continue
        if isinstance(reply, errors.SMTPError) and reply.status_code >= 400:
            return reply
        if reply is not None:
            # Anything but an error reply (a 2xx would tell the client that
            # all is well) is ignored: fail closed.
            app_log.error(
                "Plugin %r returned %r from bonzo_exception; expected a 4xx/5xx SMTPError or None",
                call.plugin,
                reply,
            )
    return None


def _text(verdict: tuple[str, Any] | None) -> str | None:
    """The reply text a positive verdict gives, if any."""
    if verdict is None:
        return None
    value = verdict[1]
    if type(value) in (Accept, Discard, Quarantine):
        return value.text  # type: ignore[no-any-return]
    return value if type(value) is str else None


def _owed(envelope: Envelope) -> list[int]:
    """The indexes in ``envelope.recipients`` of the client's own recipients,
    in ``RCPT`` order: those owed an LMTP reply. A plugin may add a copy at
    any point (in ``bonzo_rcpt`` it lands before the client's recipient), so
    the client's are not simply the first ones."""
    added = envelope.added
    return [i for i in range(len(envelope.recipients)) if i not in added]


def _all_refused(envelope: Envelope) -> bool:
    """True when the message is refused for every recipient the client gave
    (those a plugin added, owed no reply, do not count)."""
    refused, added = envelope.refused, envelope.added
    return all(i in refused or i in added for i in range(len(envelope.recipients)))


def _mark(envelope: Envelope, verdict: tuple[str, Any] | None) -> None:
    """Record a Discard or Quarantine verdict on the envelope: the first
    filter to give either decides (a later Discard does not undo an earlier
    Quarantine, nor a later Quarantine an earlier Discard), and the first
    Quarantine reason is kept."""
    if verdict is None:
        return
    plugin, value = verdict
    kind = type(value)
    if kind is Discard and envelope.discarded is None and envelope.quarantined is None:
        envelope.discarded = plugin
    elif kind is Quarantine and envelope.quarantined is None and envelope.discarded is None:
        envelope.quarantined = value.reason
        envelope.quarantined_by = plugin


def _results(session: Session, envelope: Envelope | None) -> str:
    """`` results=[...]`` for a message's log line ('' when nothing was found)."""
    parts = [session.results.summary()]
    if envelope is not None:
        parts.append(envelope.results.summary())
    found = " ".join(p for p in parts if p)
    return f" results=[{found}]" if found else ""


#: The longest EHLO keyword line: "250-" and CRLF around it make a reply
#: line of 512 octets, RFC 5321 4.5.3.1.5's limit.
_MAX_EHLO_LINE = 512 - 6


def _ehlo_line(keyword: Any) -> bool:
    return (
        isinstance(keyword, str)
        and keyword[:1].isalnum()
        and keyword.isascii()
        and keyword.isprintable()
        and len(keyword) <= _MAX_EHLO_LINE
    )


class Dispatcher:
    """Answers the events of one session by asking the plugins.

    :arg core: the session's protocol core.
    :arg session: the session plugins see (a view of ``core``).
    :arg plugins: the :class:`~bonzo.hooks.PluginSet` to ask.
    :arg settings: the server's settings.
    :arg send: writes what the core has queued (no waiting).
    """

    __slots__ = (
        "core",
        "session",
        "plugins",
        "settings",
        "envelope",
        "send",
        "_sasl",
        "_stored",
        "_unnamed_told",
    )

    def __init__(
        self,
        core: SMTPProtocol,
        session: Session,
        plugins: PluginSet,
        settings: SMTPSettings,
        send: Callable[[], None],
    ) -> None:
        self.core = core
        self.session = session
        self.plugins = plugins
        self.settings = settings
        self.send = send
        #: The open transaction's envelope, from MAIL to its end.
        self.envelope: Envelope | None = None
        self._sasl: Mechanism | None = None
        # Why storing the content failed, if it did (answered after the dot).
        self._stored: OSError | None = None
        # The log was told that this session's PROXY header named no client.
        self._unnamed_told = False

    # ------------------------------------------------------------ entry points
    async def connect(self) -> None:
        """Ask ``bonzo_connect``; queue the greeting, or the refusal that
        closes the connection."""
        try:
            verdict = await self.plugins.decide("bonzo_connect", (self.session,))
        except Exception as exc:
            reply, by = error_reply(exc, "connect", self.session, self.plugins)
            self.core.refuse(greeting_refusal(reply), by=by, close=True)
            return
        self.core.send_greeting(_text(verdict))

    async def reconnect(self) -> None:
        """After ``XCLIENT`` (the pending event) named a new client: drop any
        envelope and what plugins found about the front-end
        (``session.results``), ask ``bonzo_connect`` again, and answer with
        the greeting, or with the refusal, which closes the connection."""
        self.end_transaction()
        # A filter that skips the new client (skip_networks, an XCLIENT
        # LOGIN) must not find the front-end's verdict as the client's.
        self.session.results = Results()
        try:
            verdict = await self.plugins.decide("bonzo_connect", (self.session,))
        except Exception as exc:
            reply, by = error_reply(exc, "connect", self.session, self.plugins)
            self.core.reject(greeting_refusal(reply), by=by, close=True)
            return
        self.core.accept(_text(verdict))

    async def handle(self, event: Event) -> None:
        """Answer ``event``: ask the plugins, then apply the verdict (or the
        refusal) to the core, the session and the envelope."""
        kind = type(event)
        if kind is Auth or kind is AuthResponse:
            await self._auth(event)
            return
        try:
            verdict = await self._ask(event)
        except Exception as exc:
            self._refuse(event, exc)
            return
        finished = self._apply(event, verdict)
        if finished is not None:
            try:
                # The message is someone's responsibility now, whatever happens
                # to the connection: the observers run even if it was closed.
                await self.plugins.observe("bonzo_accepted", (self.session, finished), self.session)
            finally:
                finished.close()
        elif kind is Reset and self.plugins.calls["bonzo_rset"]:
            self.send()  # the 250 on its way first: a slow observer must not hold it
            await self.plugins.observe("bonzo_rset", (self.session,), self.session)

    def store(self, data: bytes) -> None:
        """Append message content to the envelope. A storage fault (the spool
        directory gone, the disk full) is logged at once and answered after
        the final dot; the rest of the content is read and dropped, so the
        session stays in step and usable."""
        envelope = self.envelope
        if envelope is None or self._stored is not None:
            return
        try:
            envelope.write(data)
        except OSError as exc:
            self._stored = exc
            gen_log.error(
                "[%s %s] storing message %s failed: %s",
                self.session.id,
                self.session.remote_ip,
                envelope.id,
                exc,
            )

    def end_transaction(self) -> None:
        """Drop the envelope (and its spooled content), if any."""
        envelope, self.envelope = self.envelope, None
        self._stored = None
        current_message_id.set(None)
        if envelope is not None:
            envelope.close()

    # -------------------------------------------------------------- questions
    async def _ask(self, event: Event) -> Any:
        """Ask the plugins about ``event``; return what :meth:`_apply` needs.
        Raises the refusal or fault."""
        plugins = self.plugins
        session = self.session
        kind = type(event)
        if kind is Rcpt:
            verdict = await plugins.decide(
                "bonzo_rcpt",
                (session, self.envelope, event.address, event.params, event.mailbox, event.dsn),  # type: ignore[attr-defined]
            )
            if verdict is None:
                # Recipients need an owner: nobody accepted, nobody relays.
                raise errors.PermanentError("Recipient address rejected", 550, "5.7.1")
            return verdict
        if kind is Mail:
            proxy = session.proxy
            if proxy is not None and not self._unnamed_told and not proxy.carries_addresses:
                self._tell_unnamed(proxy)
            envelope = Envelope(
                event.address,  # type: ignore[attr-defined]
                event.params,  # type: ignore[attr-defined]
                spool_threshold=self.settings.spool_threshold,
                spool_dir=self.settings.spool_dir,
                sender=event.mailbox,  # type: ignore[attr-defined]
                dsn=event.dsn,  # type: ignore[attr-defined]
                receiving=True,
            )
            verdict = await plugins.decide(
                "bonzo_mail",
                (session, envelope, event.address, event.params, event.mailbox),  # type: ignore[attr-defined]
            )
            return verdict, envelope
        if kind is Data:
            assert self.envelope is not None
            # DATA or the first BDAT chunk (RFC 3030): the same message path.
            self.envelope.chunked = event.chunked  # type: ignore[attr-defined]
            return await plugins.decide("bonzo_data", (session, self.envelope))
        if kind is MessageComplete:
            return await self._message(event)  # type: ignore[arg-type]
        if kind is Helo:
            verdict = await plugins.decide(
                "bonzo_helo",
                (session, event.name, event.esmtp),  # type: ignore[attr-defined]
            )
            if not event.esmtp:  # type: ignore[attr-defined]
                return verdict, None
            keywords = self.core.ehlo_keywords()
            await plugins.observe("bonzo_ehlo_keywords", (session, keywords), session)
            return verdict, self._checked_keywords(keywords)
        if kind is Reset:
            return None
        if kind is Unknown:
            return await plugins.decide(
                "bonzo_unknown_command",
                (session, event.verb, event.arg),  # type: ignore[attr-defined]
            )
        raise AssertionError(f"unexpected event {event!r}")  # pragma: no cover

    def _tell_unnamed(self, proxy: ProxyHeader) -> None:
        """A session whose PROXY header named no client sends mail: say so
        once. HAProxy sends such a header (LOCAL, UNKNOWN) for its health
        checks, which send no MAIL, but also for clients it relays from a
        Unix socket: those are then judged as the proxy itself."""
        self._unnamed_told = True
        session = self.session
        if session.xclient is not None:
            return  # XCLIENT has named the client since
        gen_log.info(
            "[%s %s] mail from a client the PROXY header did not name (v%d %s %s): "
            "it has the proxy's own address",
            session.id,
            session.remote_ip,
            proxy.version,
            proxy.command,
            proxy.family,
        )

    async def _message(self, event: MessageComplete) -> Any:
        if event.data:
            self.store(event.data)
        if event.error is not None:
            raise event.error  # a limit the message broke, found by the core
        if self._stored is not None:
            raise _StorageFault(self._stored)
        session, envelope = self.session, self.envelope
        assert envelope is not None
        envelope.end_content()
        # A quarantine lets the later content filters run (and add their
        # headers); the first one's reason is kept.
        verdict = await self.plugins.decide(
            "bonzo_message",
            (session, envelope),
            lambda plugin, value: _mark(envelope, (plugin, value)),
        )
        _mark(envelope, verdict)
        if envelope.refused and (
            not envelope.remaining_recipients or (envelope.added and _all_refused(envelope))
        ):
            # The filters refused it for every recipient the client gave: it
            # is refused, so a copy a plugin added (an archive) goes nowhere.
            return None
        if envelope.discarded is not None:
            return envelope.discarded, Discard()
        if envelope.quarantined is not None:
            # Before the check below: a quarantine stands even when plugins
            # removed every recipient (a milter's QUARANTINE and DELRCPT),
            # as it does against a later Discard.
            verdict = await self.plugins.decide(
                "bonzo_quarantine", (session, envelope, envelope.quarantined)
            )
            if verdict is None:
                app_log.error(
                    "[%s %s] No plugin quarantined message %s (quarantined by %s: %s; set "
                    "the quarantine key of the maildir or queue plugin); answered 451",
                    session.id,
                    session.remote_ip,
                    envelope.id,
                    envelope.quarantined_by,
                    envelope.quarantined,
                )
                raise errors.TransientError("Message not accepted, try again later", 451, "4.3.0")
            return verdict
        if not envelope.remaining_recipients:
            # Plugins removed every recipient: nothing to deliver, nothing
            # refused (as Postfix's cleanup drops such a message).
            envelope.discarded = envelope.changes[-1].plugin if envelope.changes else "core"
            return envelope.discarded, Discard()
        verdict = await self.plugins.decide("bonzo_deliver", (session, envelope))
        if verdict is None:
            app_log.error(
                "[%s %s] No plugin delivered message %s (enable a delivery plugin such as "
                "maildir); answered 451",
                session.id,
                session.remote_ip,
                envelope.id,
            )
            raise errors.TransientError("Message not accepted, try again later", 451, "4.3.0")
        return verdict

    def _checked_keywords(self, keywords: list[str]) -> list[str]:
        # An EHLO line is "keyword [params]" in printable ASCII (RFC 5321
        # 4.1.1.1), a reply line at most 512 octets long (4.5.3.1.5); anything
        # else (a non-string, a line break) would break the reply for every
        # client, so it is dropped and logged.
        good = [k for k in keywords if _ehlo_line(k)]
        if len(good) != len(keywords):
            app_log.error(
                "[%s %s] bonzo_ehlo_keywords: dropped invalid keyword(s) %r",
                self.session.id,
                self.session.remote_ip,
                [k for k in keywords if not _ehlo_line(k)],
            )
        return good

    # ---------------------------------------------------------------- answers
    def _apply(self, event: Event, answer: Any) -> Envelope | None:
        """Apply a positive verdict: the one place where an accepted command
        changes the envelope and the core (and so the session). Returns the
        envelope of a message just accepted (for its observers)."""
        core = self.core
        kind = type(event)
        if kind is Rcpt:
            assert self.envelope is not None
            _mark(self.envelope, answer)
            self.envelope.add_recipient(event.mailbox, event.params, event.dsn)  # type: ignore[attr-defined]
            core.accept(_text(answer))
        elif kind is Mail:
            verdict, envelope = answer
            self.end_transaction()
            _mark(envelope, verdict)
            self.envelope = envelope
            current_message_id.set(envelope.id)
            core.accept(_text(verdict))
        elif kind is Data:
            envelope = self.envelope
            assert envelope is not None
            _mark(envelope, answer)
            envelope.add_trace(received_header(self.session, envelope, self.settings.hostname))
            core.accept(_text(answer))
        elif kind is MessageComplete:
            return self._accepted(answer)
        elif kind is Helo:
            verdict, keywords = answer
            self.end_transaction()
            core.accept(_text(verdict), extensions=keywords)
        elif kind is Reset:
            self.end_transaction()
            core.accept()
        elif kind is Unknown:
            reply, by = self._unknown_reply(event, answer)  # type: ignore[arg-type]
            core.reject(reply, by=by)
        return None

    def _accepted(self, verdict: tuple[str, Any] | None) -> Envelope | None:
        """Answer a message that was delivered (``verdict``) or refused for
        every recipient one by one (``None``). Returns the envelope if
        somebody got the message and the client was told so."""
        envelope = self.envelope
        assert envelope is not None
        session, core = self.session, self.core
        by = verdict[0] if verdict is not None else "core"
        envelope.delivered_by = verdict[0] if verdict is not None else None
        text = _text(verdict)
        if text is None and core.enhanced_codes:
            text = "Ok: queued as " + envelope.id
        refused = envelope.refused
        if isinstance(core, LMTPProtocol):
            # One reply per recipient, each naming its recipient (as Dovecot
            # and Cyrus do), so that the client's log says who got what.
            answered = _owed(envelope)
            core.answer_recipients(
                [refused.get(i) or f"<{envelope.rcpt_tos[i]}> {text}" for i in answered],
                by=[envelope.refused_by.get(i, by) for i in answered],
            )
        elif not refused:
            core.accept(text)
        else:
            found = self._one_reply(envelope)
            if found is not None:
                self.end_transaction()
                core.reject(found[0], by=found[1])
                return None
            core.accept(text)
        self.envelope = None
        if len(refused) == len(envelope.recipients) or (
            verdict is None and envelope.added and _all_refused(envelope)
        ):
            envelope.close()
            return None  # nobody got it
        self.send()
        discarded = verdict is not None and type(verdict[1]) is Discard
        if discarded:
            by += " discarded"
        elif envelope.quarantined is not None:
            by += f" quarantined by {envelope.quarantined_by} ({envelope.quarantined})"
        counter = metrics.active
        if counter is not None:
            counter.message_accepted(
                envelope.size,
                "discarded"
                if discarded
                else "quarantined"
                if envelope.quarantined is not None
                else "delivered",
            )
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s from=<%s> to=%d size=%d id=%s by=%s%s%s",
                session.id,
                session.remote_ip,
                log_escape(envelope.mail_from),
                # Those it goes to: not the refused, not those a plugin
                # removed (a milter's DELRCPT), with those added.
                len(envelope.remaining_indexes)
                if refused or envelope.removed
                else len(envelope.recipients),
                envelope.size,
                envelope.id,
                by,
                f" refused={len(refused)}" if refused else "",
                _results(session, envelope),
            )
        if discarded:
            envelope.close()
            return None  # nobody has it: no bonzo_accepted
        return envelope

    def _one_reply(self, envelope: Envelope) -> tuple[errors.SMTPError, str] | None:
        """An SMTP client's one reply to a message refused for some of its
        recipients, with the plugin that refused (``None``: ``250``).
        Nobody got it: the first deferral, else the first refusal. Some got
        it and some are deferred: the first deferral — the client sends it
        again to every recipient, and a duplicate is better than a loss.
        Some got it and the rest are refused for good: ``250`` — the client
        cannot be told which, and is not (an LMTP client is). Only the
        client's recipients count: no reply is owed for one a plugin added."""
        refused, added = envelope.refused, envelope.added
        names = [envelope.rcpt_tos[i] for i in sorted(refused)]
        delivered = len(envelope.recipients) - len(refused)
        order = sorted(i for i in refused if i not in added) if added else sorted(refused)
        if not order:
            app_log.warning(
                "[%s %s] message %s was not delivered to %s, added by a plugin; answered "
                "250: the client's recipients got it",
                self.session.id,
                self.session.remote_ip,
                envelope.id,
                ", ".join(f"<{log_escape(n)}>" for n in names),
            )
            return None
        deferred = [i for i in order if refused[i].status_code < 500]
        chosen = (deferred or order)[0]
        first = refused[chosen], envelope.refused_by.get(chosen, "core")
        if len(order) == len(envelope.recipients) - len(added):
            return first  # nobody the client gave got it
        error = first[0]
        app_log.warning(
            "[%s %s] message %s was delivered to %d recipient(s) but not to %s "
            "(first: %d %s %s); %s",
            self.session.id,
            self.session.remote_ip,
            envelope.id,
            delivered,
            ", ".join(f"<{log_escape(n)}>" for n in names),
            error.status_code,
            error.enhanced_code,
            one_line(error.message.replace("\n", " / ")),  # a plugin's, as in a refusal's line
            "answered the deferral: the client will send it again to every recipient"
            if deferred
            else "answered 250: an SMTP client cannot be told of a refusal per recipient",
        )
        return first if deferred else None

    def _unknown_reply(
        self, event: Unknown, verdict: tuple[str, Any] | None
    ) -> tuple[errors.SMTPError, str]:
        if verdict is None:
            if self.core.enhanced_codes:
                if event.verb in NOT_IMPLEMENTED:
                    error = errors.SMTPError(
                        502, "Error: command not implemented", enhanced_code="5.5.1"
                    )
                else:
                    error = errors.SMTPError(
                        500, "Error: command not recognized", enhanced_code="5.5.2"
                    )
            else:
                error = errors.NotImplementedCommand(event.sent or event.verb)
            return error, "core"
        plugin, value = verdict
        if isinstance(value, tuple):
            code, *rest = value
            enhanced = rest[0] if len(rest) == 2 else None
            # 221 "closing transmission channel" (RFC 5321 4.2.2): a verb of
            # the plugin's own that ends the session, as QUIT does.
            reply = errors.SMTPError(code, rest[-1], enhanced_code=enhanced, close=code == 221)
            return reply, plugin
        return errors.SMTPError(250, _text(verdict) or "Ok", enhanced_code="2.0.0"), plugin

    def _refuse(self, event: Event, exc: BaseException) -> None:
        """Answer ``event`` with the reply for ``exc``."""
        core = self.core
        if isinstance(exc, _StorageFault):
            reply, by = storage_error_reply(exc.error), "core"
        else:
            reply, by = error_reply(exc, core.stage, self.session, self.plugins)
        kind = type(event)
        if kind is MessageComplete or (kind is Data and event.chunked):  # type: ignore[attr-defined]
            # The message is over (a refused first BDAT ends its transaction).
            envelope = self.envelope
            found = (
                _results(self.session, envelope)
                if envelope is not None and access_log.isEnabledFor(logging.INFO)
                else ""
            )
            if found and envelope is not None:
                # What the filters found, beside the refusal's own line.
                access_log.info(
                    "%s %s from=<%s> id=%s refused %d by=%s%s",
                    self.session.id,
                    self.session.remote_ip,
                    log_escape(envelope.mail_from),
                    envelope.id,
                    reply.status_code,
                    by,
                    found,
                )
            refused = envelope.refused if envelope is not None else {}
            deciders = envelope.refused_by if envelope is not None else {}
            self.end_transaction()
            # The refusal's log line is the message's: its id on it (JSON logs).
            current_message_id.set(envelope.id if envelope is not None else None)
            try:
                if refused and isinstance(core, LMTPProtocol):
                    assert envelope is not None
                    # The recipients refused one by one keep their own reply;
                    # a copy a plugin added is owed none, wherever it is.
                    answered = _owed(envelope)
                    core.answer_recipients(
                        [refused.get(i, reply) for i in answered],
                        by=[deciders.get(i, by) for i in answered],
                    )
                else:
                    core.reject(reply, by=by)
            finally:
                current_message_id.set(None)
            return
        core.reject(reply, by=by)

    # ------------------------------------------------------------------- AUTH
    async def _auth(self, event: Event) -> None:
        core, session = self.core, self.session
        try:
            if type(event) is Auth:
                self._sasl = MECHANISMS[event.mechanism]()
                initial = event.initial
                step = self._sasl.start(None if initial is None else decode_response(initial))
            else:
                assert self._sasl is not None
                step = self._sasl.step(decode_response(event.line))  # type: ignore[attr-defined]
        except errors.SMTPError as exc:
            self._sasl = None
            core.reject(exc)
            return
        if isinstance(step, Challenge):
            core.auth_challenge(step.encoded())
            return
        self._sasl = None
        try:
            verdict = await self.plugins.decide(
                "bonzo_auth",
                (session, step.mechanism, step.username, step.password, step.authzid),
            )
        except Exception as exc:
            reply, by = error_reply(exc, "AUTH", session, self.plugins)
            if reply.status_code >= 500:
                # A plugin's own refusal is a failure like the core's 535:
                # delayed the same (no faster answer to tell them apart, no
                # faster guessing) and counted. A 4xx is a fault, not a guess.
                await asyncio.sleep(self.settings.auth_failure_delay)
                why = f"refused by {by}"
                if reply.log_text():
                    why += f" ({reply.log_text()})"
                failure = errors.SMTPError(
                    reply.status_code,
                    reply.message,
                    "AUTH %s failed for %r: %s",
                    step.mechanism,
                    _cut(step.username),
                    why,
                    enhanced_code=reply.enhanced_code,
                    close=reply.close,
                )
                core.reject(failure, by=by, auth_failure=True)
            else:
                core.reject(reply, by=by)
            return
        identity = step.username
        by = "core"
        if verdict is None:
            asked = ", ".join(self.plugins.credential_checkers()) or "none"
            problem = f"no plugin accepted (asked: {asked})"
        else:
            accept = verdict[1]
            if step.authzid in ("", step.username):
                problem = ""
            elif accept.authzid == step.authzid:
                identity, problem = step.authzid, ""
            else:
                by = verdict[0]
                problem = f"{by} accepted, but it may not act as {_cut(step.authzid)!r}"
        if not problem:
            core.auth_success(identity, step.mechanism)
            gen_log.info(
                "[%s %s] authenticated as %r (%s, by %s)",
                session.id,
                session.remote_ip,
                identity,
                step.mechanism,
                verdict[0] if verdict else "?",
            )
            return
        # Slow down guessing: the reply (and so the next try) waits.
        await asyncio.sleep(self.settings.auth_failure_delay)
        core.reject(
            errors.SMTPError(
                535,
                "Authentication credentials invalid",
                "AUTH %s failed for %r: %s",
                step.mechanism,
                _cut(step.username),
                problem,
                enhanced_code="5.7.8",
            ),
            by=by,
        )


def _cut(name: str, limit: int = 256) -> str:
    """A client-supplied name for a log line, at most ``limit`` characters
    (then ``...``): a user name may be as long as the AUTH line allows, and
    each failure is logged."""
    return name if len(name) <= limit else name[:limit] + "..."


class _StorageFault(Exception):
    """Storing the content failed (already logged); answered after the dot."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error

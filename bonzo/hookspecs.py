"""The plugin contract: every hook Bonzo calls, with its exact semantics.

Plugins implement hooks by name with :data:`hookimpl`::

    from bonzo import Accept, errors, hookimpl

    @hookimpl
    def bonzo_rcpt(session, mailbox):
        if mailbox.domain == "example.org":  # the canonical form
            return Accept()
        # None: no opinion, the next plugin decides

Rules shared by every hook:

- **Arguments by name.** An implementation names only the arguments it
  needs, in any order, as plain parameters (one with a default gets the
  argument too); new arguments may be added in later versions without
  breaking it. Naming an argument the hook does not have, ``*args``,
  ``**kwargs`` or a keyword-only parameter is an error at startup.
- **Order** is the order of ``enabled`` in the ``[plugins]`` table of the
  configuration (``tryfirst``/``trylast`` move an implementation to the front
  or back). ``bonzo plugins`` prints the effective order of every hook.
- **Sync or async.** Any implementation but configure and exception may be
  ``def`` or ``async def`` (or return any awaitable); Bonzo awaits each one
  before calling the next, within the plugin's timeout. Hook wrappers and
  generators (a ``yield`` in the body) are refused at startup.
- **Decision hooks** (connect, helo, mail, rcpt, data, message, deliver,
  quarantine, unknown_command, auth, and the delivery side's route and
  bounce): raising a :class:`bonzo.errors.SMTPError` (``4xx``
  or ``5xx``) rejects with that reply and stops the chain; returning :class:`Accept` (or a string,
  the reply text) accepts and stops it; returning ``None`` asks the next
  plugin. When every plugin says ``None`` the command is accepted, except for
  **rcpt**, **deliver** and **quarantine**, which need an owner: a recipient nobody accepts is
  refused (``550 5.7.1``), a message nobody delivers is not answered ``250``
  (``451 4.3.0``). An empty configuration is therefore never an open relay and
  never loses mail.
- **Observer hooks** (startup, shutdown, reload, ehlo_keywords, accepted,
  rset, disconnect, and the delivery side's delivered, deferred and
  bounced): every implementation runs; an exception in one is logged and
  the others still run (except startup, where it stops the server).
- **Fail closed.** An exception that is not an ``SMTPError`` (or is one with
  a ``2xx``/``3xx`` code), whatever its class (``SystemExit``, a library's
  ``BaseException``), a timeout, or a return value of the wrong type answers ``451 4.3.0`` (via
  :func:`bonzo_exception`), is logged with the plugin's name and traceback,
  and never reaches the client.
- **State.** Keep per-connection data in ``session.stash`` and per-message
  data in ``envelope.stash``, under your plugin's name (``_`` in front for
  what is transient: a live connection, which the queue then does not try
  to keep); never in globals.
  Bonzo updates the envelope itself after each accepted command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .address import Address
    from .dsn import RecipientDSN
    from .errors import SMTPError
    from .session import Envelope, Session

__all__ = [
    "hookspec",
    "hookimpl",
    "Accept",
    "Discard",
    "Quarantine",
    "DECISION_HOOKS",
    "OBSERVER_HOOKS",
    "OWNER_HOOKS",
    "DELIVERY_HOOKS",
]

hookspec = pluggy.HookspecMarker("bonzo")
#: Decorator marking a function or method as a hook implementation.
hookimpl = pluggy.HookimplMarker("bonzo")


class Accept:
    """A positive verdict from a decision hook.

    :arg str text: the reply text (the code is the command's usual ``2xx``);
        ``None`` keeps the default text.
    :arg str authzid: for :func:`bonzo_auth` only: the authorization identity
        the client asked to act as, when it differs from the user name and
        this plugin allows it (RFC 4616 2). Without it such a request fails.

    .. versionchanged:: 0.2
       Added ``authzid``.
    """

    __slots__ = ("text", "authzid")

    def __init__(self, text: str | None = None, *, authzid: str | None = None) -> None:
        self.text = text
        self.authzid = authzid

    def __repr__(self) -> str:
        if self.authzid is not None:
            return f"Accept({self.text!r}, authzid={self.authzid!r})"
        return f"Accept({self.text!r})"


class Discard:
    """A verdict that throws the message away: the transaction goes on as
    if accepted, the client gets ``250`` after the data, and nothing is
    delivered (no :func:`bonzo_deliver`, no :func:`bonzo_accepted`). The
    log line of the message names the plugin.

    Returned from :func:`bonzo_mail`, :func:`bonzo_rcpt`, :func:`bonzo_data`
    or :func:`bonzo_message` (at RCPT it also accepts the recipient).
    Discarding is for mail known to be unwanted where a refusal would help
    its sender (a virus, confirmed spam); prefer refusing.

    :arg str text: the reply text of the command it answers.

    .. versionadded:: 0.2
    """

    __slots__ = ("text",)

    def __init__(self, text: str | None = None) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Discard({self.text!r})"


class Quarantine:
    """A verdict that sets the message aside: the filters still run, then
    instead of :func:`bonzo_deliver` Bonzo calls :func:`bonzo_quarantine`,
    whose owner (the ``maildir`` or ``queue`` plugin with a ``quarantine``
    key) keeps it where the operator looks at such mail. The client gets
    ``250``; if no plugin quarantines it, ``451 4.3.0`` (it is never lost
    and never delivered as usual). ``envelope.quarantined`` holds the
    reason.

    Returned from :func:`bonzo_mail`, :func:`bonzo_rcpt`, :func:`bonzo_data`
    or :func:`bonzo_message` (at RCPT it also accepts the recipient).

    :arg str reason: why, for the log and the quarantine.

    .. versionadded:: 0.2
    """

    __slots__ = ("reason", "text")

    def __init__(self, reason: str, text: str | None = None) -> None:
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError("Quarantine needs a reason")
        self.reason = " ".join(reason.split())[:500]
        self.text = text

    def __repr__(self) -> str:
        return f"Quarantine({self.reason!r})"


#: Hooks whose verdict may be :class:`Discard` or :class:`Quarantine`.
FILTER_HOOKS = ("bonzo_mail", "bonzo_rcpt", "bonzo_data", "bonzo_message")

#: Hooks whose first verdict decides.
DECISION_HOOKS = (
    "bonzo_connect",
    "bonzo_helo",
    "bonzo_mail",
    "bonzo_rcpt",
    "bonzo_data",
    "bonzo_message",
    "bonzo_deliver",
    "bonzo_quarantine",
    "bonzo_unknown_command",
    "bonzo_auth",
    "bonzo_route",
    "bonzo_bounce",
)
#: Decision hooks where "no opinion" from every plugin means refusal.
OWNER_HOOKS = ("bonzo_rcpt", "bonzo_deliver", "bonzo_quarantine")
#: Hooks where every implementation runs.
OBSERVER_HOOKS = (
    "bonzo_startup",
    "bonzo_shutdown",
    "bonzo_reload",
    "bonzo_ehlo_keywords",
    "bonzo_accepted",
    "bonzo_rset",
    "bonzo_disconnect",
    "bonzo_delivered",
    "bonzo_deferred",
    "bonzo_bounced",
)
#: Hooks of the delivery side (the ``queue`` plugin calls them, outside any
#: session): decision hooks ``bonzo_route`` and ``bonzo_bounce``, and the
#: outcome observers.
DELIVERY_HOOKS = (
    "bonzo_route",
    "bonzo_bounce",
    "bonzo_delivered",
    "bonzo_deferred",
    "bonzo_bounced",
)


# ------------------------------------------------------------------ lifecycle
@hookspec
def bonzo_configure(config: dict[str, Any], app: Any) -> None:
    """Receive this plugin's own ``[plugins.<name>]`` table, before anything listens.

    Sync only. Validate it here: raise :class:`ValueError` with a message
    naming the key (``ValueError("threshold: must be positive")``), or
    ``bonzo.config.ConfigError(key="threshold", message="must be
    positive")``, and ``bonzo serve``/``bonzo check`` stop with that message,
    the file and the table name. Secrets given as ``{"$env" = "NAME"}`` or
    ``{"$file" = "/path"}`` arrive already resolved.

    :arg config: the plugin's table (empty dict if there is none).
    :arg app: the :class:`bonzo.app.MailApp` (in tests,
        :class:`bonzo.testing.PluginApp`, which has the same parts);
        ``app.dns`` is the process's DNS resolver (:class:`bonzo.dns.Resolver`),
        ``app.base_dir`` the directory relative paths are taken from.

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_startup(app: Any) -> None:
    """The server is starting, in each worker process; may be async (open a
    database pool here). An exception stops the server with the plugin's name
    (the plugins started before it get :func:`bonzo_shutdown`).

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_shutdown(app: Any) -> None:
    """The server is stopping, after the last session ended; may be async
    (close pools here). Exceptions are logged.

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_reload(app: Any) -> None:
    """The configuration was reloaded (``SIGHUP``, ``bonzo reload``) and this
    plugin belongs to the new one: it was configured and started as at
    startup and serves new sessions from now on, while the old
    configuration's plugins finish their sessions and are shut down. An
    observer; may be async. A plugin enabled as a module or an instance (not
    a class) is the same object in both configurations: it is configured
    again, not started again, and shut down once, when the last
    configuration that enables it stops.

    .. versionadded:: 0.2
    """


# ----------------------------------------------------------------- connection
@hookspec
def bonzo_connect(session: Session) -> Any:
    """A client connected (decision). Raise to refuse it: the reply is sent
    and the connection closed. Only ``421`` and ``554`` may stand in for the
    greeting (RFC 5321 3.1, 4.3.2): another ``4xx`` is sent as ``421`` and
    another ``5xx`` as ``554``, with its text and enhanced code. Return a
    string to replace the greeting text.

    Behind a proxy that sends the PROXY protocol, this runs once the header
    has named the client (``session.remote_ip`` is the client's). After
    ``XCLIENT`` from a trusted front-end it runs again, for the client that
    command named, with ``session.results`` emptied of what was found about
    the front-end (``session.stash`` and TLS are the connection's and stay;
    see :doc:`/proxy`).

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_helo(session: Session, name: str, esmtp: bool) -> Any:
    """HELO (``esmtp`` false) or EHLO with the client's ``name`` (decision).

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_ehlo_keywords(session: Session, keywords: list[str]) -> None:
    """Change the EHLO keyword list in place (observer): append an extension a
    plugin implements (with :func:`bonzo_unknown_command`), or remove one.

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_unknown_command(session: Session, verb: str, arg: str) -> Any:
    """A verb the core does not implement (decision). Return
    ``(code, text)`` or ``(code, enhanced_code, text)`` to answer it (a
    ``2xx``, ``4xx`` or ``5xx`` code; a malformed tuple answers ``451 4.3.0``),
    :class:`Accept` for ``250``, raise an ``SMTPError``, or return ``None``
    (``500 5.5.2`` if nobody handles it; ``502 5.5.1`` for ``EXPN``, ``TURN``,
    ``SEND``, ``SOML`` and ``SAML``).

    .. versionadded:: 0.2
    """


# ---------------------------------------------------------------- transaction
@hookspec
def bonzo_mail(
    session: Session, envelope: Envelope, address: str, params: dict[str, Any], mailbox: Address
) -> Any:
    """MAIL FROM (decision). ``address`` is the sender as the client sent it
    (``""`` for the null sender); ``mailbox`` is the same as an
    :class:`~bonzo.address.Address`, whose ``canonical`` form is the one to
    match policy on; ``params`` holds the ESMTP parameters, keywords
    upper-cased.

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_rcpt(
    session: Session,
    envelope: Envelope,
    address: str,
    params: dict[str, Any],
    mailbox: Address,
    dsn: RecipientDSN,
) -> Any:
    """RCPT TO (decision, **needs an owner**): some plugin must return
    :class:`Accept`, or the recipient is refused with ``550 5.7.1``. Accepted
    recipients are added to ``envelope.rcpt_tos`` (as sent) and
    ``envelope.recipients`` (as :class:`~bonzo.address.Address`) by Bonzo.
    ``mailbox`` is ``address`` as an :class:`~bonzo.address.Address`: match
    and store on its ``canonical`` form, never on the text as sent. ``dsn``
    is the recipient's checked ``NOTIFY``/``ORCPT`` (a
    :class:`~bonzo.dsn.RecipientDSN`, empty without them); Bonzo keeps it in
    ``envelope.rcpt_dsn`` once the recipient is accepted. RFC 3461 5.1 says
    a recipient must not be refused for its DSN parameters.

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_data(session: Session, envelope: Envelope) -> Any:
    """DATA, before the ``354`` (decision).

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_message(session: Session, envelope: Envelope) -> Any:
    """The whole message has arrived; content filters run here, in order, before
    any delivery (decision). Raise to refuse it; add headers with
    ``envelope.add_header()``; return :class:`Accept` to skip the remaining
    filters. ``envelope.content`` / ``envelope.message`` give the message.
    To refuse it for some recipients only, call
    :meth:`envelope.refuse_recipient() <bonzo.session.Envelope.refuse_recipient>`.

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_deliver(session: Session, envelope: Envelope) -> Any:
    """Store or hand on the message (decision, **needs an owner**). Return
    :class:`Accept` only once the message is durable (fsync'd) or accepted
    downstream: the client then gets ``250``. If no plugin accepts, the client
    gets ``451 4.3.0`` and keeps the message. A storage error should raise a
    ``4xx`` :class:`~bonzo.errors.SMTPError` (``452 4.3.1`` for a full disk).

    Deliver to ``envelope.remaining_recipients``; to refuse or defer the
    message for one recipient while delivering it to the others, call
    :meth:`envelope.refuse_recipient() <bonzo.session.Envelope.refuse_recipient>`
    (an LMTP client gets one reply per recipient; see :ref:`per-recipient`).

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_quarantine(session: Session, envelope: Envelope, reason: str) -> Any:
    """Keep a message a filter quarantined (:class:`Quarantine`), instead of
    delivering it (decision, **needs an owner**): as :func:`bonzo_deliver`,
    return :class:`Accept` once it is durable. If no plugin does, the client
    gets ``451 4.3.0`` and keeps the message.

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_auth(session: Session, mechanism: str, username: str, password: str, authzid: str) -> Any:
    """Check AUTH credentials (decision). Return :class:`Accept` if
    ``username``/``password`` are good; ``None`` if this plugin cannot vouch
    for them (when nobody accepts, the client gets ``535 5.7.8`` — the same
    reply for an unknown user and a wrong password). Only :class:`Accept`
    authenticates: any other return value is a plugin fault (``454 4.7.0``).
    Raise an ``SMTPError`` for another reply (``454 4.7.0`` for a temporary
    failure); an unexpected exception or timeout also gives ``454 4.7.0``.
    May be async (LDAP, SQL, HTTP). AUTH is offered only when some plugin
    that may accept implements this hook: one whose ``accepts`` attribute
    leaves ``bonzo_auth`` out (``ratelimit``, which only refuses before
    the check) does not count. Never log ``password``.

    When the client asks to act as someone else (PLAIN's ``authzid`` is
    neither ``""`` nor ``username``), ``Accept()`` is not enough: the
    session is authenticated only if the plugin returns
    ``Accept(authzid=authzid)``, saying that ``username`` may act as
    ``authzid`` (RFC 4616 2); the session then acts as ``authzid``.
    Otherwise the client gets ``535 5.7.8``.

    :arg mechanism: ``"PLAIN"`` or ``"LOGIN"``.
    :arg authzid: the identity to act as (PLAIN), usually ``""``.

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_accepted(session: Session, envelope: Envelope) -> None:
    """The client has been answered ``250`` for the message (observer).

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_rset(session: Session) -> None:
    """RSET: the transaction was discarded (observer).

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_disconnect(session: Session) -> None:
    """The connection closed, for whatever reason (observer).

    .. versionadded:: 0.2
    """


# ------------------------------------------------------------------- delivery
@hookspec
def bonzo_route(message: Any, recipient: Any) -> Any:
    """Choose how one recipient of a queued message leaves (decision; called
    by the ``queue`` plugin before each attempt). Return the name of a
    transport of ``[plugins.queue.transports]`` to use it, or ``None`` for
    the route table (``[plugins.queue.routes]``). A name that is not
    configured is logged and the route table is used; any other result
    (an :class:`Accept` too) is a plugin fault, logged, and the route table
    is used.

    :arg message: the :class:`bonzo_plugins.queue.spool.QueuedMessage`.
    :arg recipient: the :class:`bonzo_plugins.queue.spool.Recipient`
        (``canonical``, ``domain``, ``params``).

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_bounce(message: Any, recipients: list[Any]) -> Any:
    """A delivery report (a bounce, a delay notice or a success report) is
    about to be queued for the sender of ``message`` about ``recipients``
    (decision). Return :class:`Accept` to take it over — the standard report
    is then not sent (the plugin sent its own, or suppresses it); ``None``
    lets it go.

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_delivered(message: Any, recipients: list[Any]) -> None:
    """The queue delivered ``message`` to ``recipients`` (observer);
    ``recipient.reply`` and ``recipient.host`` say who took it.

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_deferred(message: Any, recipients: list[Any]) -> None:
    """An attempt failed temporarily for ``recipients`` (observer);
    ``recipient.next_attempt`` says when the next one is.

    .. versionadded:: 0.2
    """


@hookspec
def bonzo_bounced(message: Any, recipients: list[Any]) -> None:
    """The queue gave up on ``recipients`` (a permanent refusal, or the
    message expired) (observer). The sender's report is queued already
    (unless :func:`bonzo_bounce` took it over).

    .. versionadded:: 0.2
    """


@hookspec(firstresult=True)
def bonzo_exception(
    session: Session | None, error: BaseException, hook: str, plugin: str | None
) -> SMTPError | None:
    """Map an unexpected exception to a reply (first result wins; sync only).

    Called when a plugin (``plugin``, in ``hook``) raised something other than
    an ``SMTPError`` or timed out. Return an ``SMTPError`` with a ``4xx`` or
    ``5xx`` code to send instead of the default ``451 4.3.0`` (anything else is
    logged and ignored); a ``5xx`` here turns a local fault into a
    permanent refusal, so think twice. Not called for a fault in
    :func:`bonzo_auth`, which is always ``454 4.7.0``.

    .. versionadded:: 0.2
    """

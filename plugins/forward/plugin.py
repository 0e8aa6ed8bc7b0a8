"""The ``forward`` plugin: a filtering gateway's relay, in the session.

Each client session gets at most one connection to the configured
downstream server (:class:`Link`, in ``session.stash["_forward"]``), opened
at the client's ``MAIL``. The client's commands are repeated downstream
with :mod:`bonzo.client`'s stepwise API (:meth:`~bonzo.client.ClientConnection.mail`,
:meth:`~bonzo.client.ClientConnection.rcpt`,
:meth:`~bonzo.client.ClientConnection.data`,
:meth:`~bonzo.client.ClientConnection.rset`), and each downstream reply
becomes the client's: ``250`` for the message only after the downstream's
``250``. The connection is reset with the client's ``RSET`` and closed with
``QUIT`` when the client's session ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from bonzo import client
from bonzo.client import ClientConnection, ClientError, Reply, Stage
from bonzo.errors import PermanentError, SMTPError, TransientError
from bonzo.hookspecs import Accept, hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session, log_escape
from bonzo.settings import host_port

from .._client import client_settings
from .._config import local_address

__all__ = ["ForwardPlugin", "Link", "KEYS", "downstream_error"]

log = logging.getLogger("bonzo.plugins.forward")

#: The ``[plugins.forward]`` table (:mod:`bonzo.schema`). The timeouts are
#: shorter than a queue's (RFC 5321's are for a client that can wait): the
#: client is waiting, and within the plugin's hook timeout.
SCHEMA = Schema(
    Key("host", required=True,
        doc="The downstream server's name or address (a name is resolved by the "
        "system)."),
    Key("port", "int", minimum=1, maximum=65535,
        doc="Default ``25`` (``465`` with ``implicit_tls``)."),
    Key("tls", "choice", default="opportunistic", choices=client.TLS_POLICIES,
        doc="``\"opportunistic\"``: ``STARTTLS`` when offered, without checking "
        "the certificate (plaintext if the handshake fails); ``\"require\"``: "
        "``STARTTLS`` or ``451``; ``\"verify\"``: ``STARTTLS`` and a certificate "
        "valid for ``tls_name``; ``\"none\"``: never."),
    Key("implicit_tls", "bool", default=False, doc="TLS from the first octet (port 465)."),
    Key("tls_name", doc="The name for SNI and the ``verify`` check; default ``host``."),
    Key("tls_ca_file", "path",
        doc="A PEM file of CA certificates that ``verify`` trusts instead of the "
        "system's store (OpenSSL's default paths; ``SSL_CERT_FILE``/``SSL_CERT_DIR``). "
        "Read at start-up and at each reload; a missing, unreadable or empty file is "
        "a configuration error, as is the key with a ``tls`` other than ``verify``."),
    Key("username",
        doc="Authenticate as this user (``AUTH PLAIN``, else ``LOGIN``); only over "
        "TLS unless ``auth_plaintext``. With ``tls = \"none\"`` (and no "
        "``implicit_tls``) it is a configuration error unless ``auth_plaintext`` is "
        "true: no message could ever be forwarded."),
    Key("password", "secret",
        doc="The password of ``username`` (:ref:`config-secrets`)."),
    Key("auth_plaintext", "bool", default=False,
        doc="Send the credentials over a connection that is not encrypted."),
    Key("helo_name", doc="The name given in ``EHLO``; default the server's ``hostname``."),
    Key("source_address", convert=local_address,
        doc="The local IP address to connect from (default: the system's choice)."),
    Key("check_rcpt", "bool", default=True,
        doc="Ask the downstream about each recipient at ``RCPT``. With ``false`` "
        "another plugin (``recipients``) must accept the recipients, and the "
        "downstream is asked about them after the message."),
    Key("connect_timeout", "duration", default=10.0, minimum=0.001,
        doc="How long to wait for the connection to the downstream server."),
    Key("command_timeout", "duration", default=30.0, minimum=0.001,
        doc="Each downstream reply, and sending each chunk of the message."),
    Key("data_end_timeout", "duration", default=50.0, minimum=0.001,
        doc="The downstream's reply after the final dot."),
    together=[("username", "password")],
)  # fmt: skip
KEYS = tuple(SCHEMA.names)
#: The keys :func:`.._client.client_settings` reads.
_CLIENT_KEYS = (
    "tls",
    "tls_ca_file",
    "implicit_tls",
    "tls_name",
    "username",
    "password",
    "auth_plaintext",
    "helo_name",
    "source_address",
)

#: Replies longer than this (per line, and in lines) are cut before they
#: reach the client (RFC 5321 4.5.3.1.5 allows 512 octets a reply line).
MAX_LINE = 400
MAX_LINES = 10

_UNAVAILABLE = "Downstream server unavailable, try again later"
_SETUP = (Stage.CONNECT, Stage.GREETING, Stage.EHLO, Stage.STARTTLS, Stage.AUTH)


def _safe_text(reply: Reply, default: str) -> list[str]:
    """The reply's lines, printable ASCII, bounded (the client module has
    already replaced control characters)."""
    lines = [
        line.encode("ascii", "replace").decode("ascii")[:MAX_LINE]
        for line in reply.text.split("\n")[:MAX_LINES]
    ]
    return lines if any(line.strip() for line in lines) else [default]


def downstream_error(reply: Reply, stage: Stage | None = None) -> SMTPError:
    """The error to give the client for a downstream refusal ``reply``.

    - a ``4xx``/``5xx`` the downstream server gave: its code, enhanced code
      and text (``421``, the server closing, becomes ``451``: this server
      is not closing);
    - any reply while setting the connection up (a ``450`` or ``554``
      greeting, a ``454`` to ``STARTTLS`` under a TLS policy, a ``454`` or
      ``535`` for the relay's credentials) and a ``530`` at any step:
      ``451 4.4.1`` and the fixed text — the downstream refuses this
      gateway, not the message, so the client retries rather than bounce,
      and the downstream's text (host names, paths) stays in the log;
    - a failure of the connection (refused, timed out, lost, a TLS policy
      not met): ``451`` with its enhanced code and a fixed text (the detail
      is logged, never sent);
    - what the downstream cannot take, found without asking it (a UTF-8
      address without SMTPUTF8, a message over its SIZE): that ``5xx``.
    """
    code, enhanced = reply.code, reply.enhanced_code or None
    if not reply.remote:
        if code >= 500:
            return PermanentError(_safe_text(reply, "Refused downstream"), code, enhanced)
        return TransientError(_UNAVAILABLE, 451, enhanced or "4.4.1")
    if stage in _SETUP or code == 530:
        # 530 (RFC 3207, RFC 4954): the downstream wants TLS or AUTH of this
        # gateway: about the gateway, not the message.
        return TransientError(_UNAVAILABLE, 451, "4.4.1")
    if code >= 500:
        return PermanentError(_safe_text(reply, "Refused downstream"), code, enhanced)
    if code == 421 or not 400 <= code <= 499:
        code = 451
        if enhanced is not None and not enhanced.startswith("4."):
            enhanced = None
    return TransientError(_safe_text(reply, "Deferred downstream"), code, enhanced)


class Link:
    """One client session's connection to the downstream server, and where
    its transaction stands."""

    __slots__ = ("session_id", "conn", "envelope", "accepted", "sender", "promised")

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        #: The connection (``None`` until the first ``MAIL``, or after a failure).
        self.conn: ClientConnection | None = None
        #: The id of the client's envelope whose ``MAIL`` the downstream
        #: accepted, while that transaction is open there.
        self.envelope: str | None = None
        #: The recipients (as the client sent them) the downstream accepted
        #: in that transaction, in order.
        self.accepted: list[str] = []
        #: The reverse-path that transaction was opened with.
        self.sender: str | None = None
        #: The client's envelope id and the recipients it was answered
        #: ``250`` for at ``RCPT`` (on the downstream's word): kept across a
        #: new downstream transaction for the same message.
        self.promised: tuple[str | None, set[str]] = (None, set())

    def promise(self, envelope_id: str, address: str) -> None:
        if self.promised[0] != envelope_id:
            self.promised = (envelope_id, set())
        self.promised[1].add(address)

    def was_promised(self, envelope_id: str, address: str) -> bool:
        return self.promised[0] == envelope_id and address in self.promised[1]

    def drop(self) -> None:
        """Forget the connection, closing it at once (its state is unknown)."""
        conn, self.conn = self.conn, None
        self.envelope = None
        self.accepted = []
        if conn is not None:
            conn.close()


def _fitted(options: dict[str, Any], conn: ClientConnection) -> dict[str, Any]:
    """The ``MAIL`` options for a downstream that lacks ``8BITMIME`` or
    ``SMTPUTF8``: the declaration is left out (the content is not here yet;
    :func:`_content_problem` checks it before ``DATA``), so that a message
    that does not need the extension is not refused for declaring it (RFC
    6152 3, RFC 6531 3.2). A UTF-8 sender still needs ``SMTPUTF8``."""
    fitted = dict(options)
    if fitted["eightbit"] and not conn.supports("8BITMIME"):
        fitted["eightbit"] = False
    if fitted["smtputf8"] and not conn.supports("SMTPUTF8"):
        fitted["smtputf8"] = None
    return fitted


def _content_problem(conn: ClientConnection, envelope: Envelope) -> SMTPError | None:
    """What the downstream cannot take, known before ``DATA``: 8-bit content
    without its ``8BITMIME`` (declared or not: there is no conversion to
    7 bits), or a message declared ``SMTPUTF8`` with UTF-8 in its header
    fields (RFC 6532; UTF-8 in the body needs only ``8BITMIME``) without its
    ``SMTPUTF8``; or a message over the downstream's ``SIZE`` (declared or
    not). ``None`` when it can."""
    limit = conn.size_limit
    size = len(envelope.header_bytes) + envelope.size
    if limit and size > limit:
        return PermanentError(
            f"Message size {size} exceeds the downstream server's limit {limit}", 552, "5.3.4"
        )
    utf8 = "SMTPUTF8" in envelope.mail_params and not conn.supports("SMTPUTF8")
    if utf8 and not all(f"{name}:{value}".isascii() for name, value in envelope.headers()):
        return PermanentError(
            "The message needs SMTPUTF8 and the downstream server does not support it",
            553,
            "5.6.7",
        )
    if conn.supports("8BITMIME"):
        return None
    if not client.has_8bit(envelope):
        return None
    return PermanentError(
        "The message has 8-bit content and the downstream server does not support 8BITMIME",
        554,
        "5.6.3",
    )


class ForwardPlugin:
    """Forward each message to one downstream SMTP server during the
    session (see the plugin's README)."""

    #: The DSN parameters go on to the downstream server, in the session,
    #: and it sends the reports: the server offers DSN
    #: (:attr:`bonzo.app.MailApp.dsn_honoured_by`).
    honours_dsn = True
    #: What ``bonzo check`` adds to "reports sent by 'forward'".
    dsn_caveat = (
        "its downstream's; one without DSN ignores NOTIFY, RET and ENVID, "
        "and a NOTIFY=SUCCESS gets no notice"
    )

    def __init__(self) -> None:
        self.host = ""
        self.port = 25
        self.check_rcpt = True
        self.settings: client.ClientSettings | None = None
        #: Open links by session id (closed at disconnect or shutdown).
        self.links: dict[str, Link] = {}

    # ------------------------------------------------------------ configure
    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.forward]``; refuse a second delivery plugin."""
        values = SCHEMA.parse(config, app)
        timeouts: dict[str, Any] = {
            "connect_timeout": float(values["connect_timeout"]),
            "data_end_timeout": float(values["data_end_timeout"]),
        }
        command = float(values["command_timeout"])
        for step in ("greeting", "helo", "starttls", "auth", "mail", "rcpt", "data", "rset"):
            timeouts[f"{step}_timeout"] = command
        timeouts["data_block_timeout"] = command
        timeouts["quit_timeout"] = min(command, 10.0)
        self.check_rcpt = values["check_rcpt"]
        # With check_rcpt every RCPT gets the downstream's verdict: a plugin
        # listed after this one is never asked (bonzo check says so).
        self.decides_always: tuple[str, ...] = ("bonzo_rcpt",) if self.check_rcpt else ()
        #: Shown by ``bonzo check`` and at ``bonzo serve``.
        self.config_warnings = (
            []
            if self.check_rcpt
            else [
                "check_rcpt = false: a recipient the downstream refuses after the client "
                "was told 250 for it gets nothing and nobody is told (SMTP cannot refuse one "
                "recipient after the message, and this plugin queues no bounce; it is only "
                "logged); keep check_rcpt = true, or relay through the queue plugin"
            ]
        )
        if (
            values["username"] is not None
            and self.check_rcpt
            and not _recipients_checked(app, self)
        ):
            self.config_warnings.append(
                "username is set, check_rcpt = true, no plugin before forward decides "
                "recipients and some listener does not require AUTH: the downstream, which "
                "sees this gateway authenticated, decides every recipient and may relay "
                "anywhere -- an open relay for every client of this server; set "
                "require_auth = true on every listener, or list a plugin that decides "
                "recipients before 'forward' ('access' with rcpt rules for your domains, "
                "or 'recipients')"
            )
        self.port = values["port"] or (465 if values["implicit_tls"] else 25)
        self.host = values["host"].strip()
        given = {k: values[k] for k in _CLIENT_KEYS if values[k] is not None}
        # A downstream that is this server (a gateway forwarding to itself)
        # is refused as a loop: 451 4.4.6, not a message going round.
        self.settings = client_settings(given, app, "", loops=True, **timeouts)
        _only_delivery_plugin(app, self)

    # ------------------------------------------------------------- lifecycle
    @hookimpl
    async def bonzo_shutdown(self) -> None:
        """Close every downstream connection still open."""
        links, self.links = self.links, {}
        await asyncio.gather(*(_quit(link) for link in links.values()))

    @hookimpl
    def bonzo_ehlo_keywords(self, keywords: list[str]) -> None:
        """Withdraw ``BINARYMIME``: the message goes on after ``DATA``,
        which cannot carry binary content."""
        keywords[:] = [k for k in keywords if k.split(" ", 1)[0].upper() != "BINARYMIME"]

    # ----------------------------------------------------------- transaction
    @hookimpl
    async def bonzo_mail(self, session: Session, envelope: Envelope) -> None:
        """Open the downstream transaction (connecting first if needed): its
        refusal is the client's ``MAIL`` reply."""
        link = self._link(session)
        await self._start(link, envelope)

    @hookimpl
    async def bonzo_rcpt(
        self, session: Session, envelope: Envelope, address: str, params: dict[str, Any]
    ) -> Accept | None:
        """With ``check_rcpt``: ask the downstream server; accept what it
        accepts, refuse with its reply what it refuses."""
        if not self.check_rcpt:
            return None
        link = self._link(session)
        conn = link.conn
        stale = conn is None or not conn.usable
        if link.envelope != envelope.id or (stale and not link.accepted):
            # A connection the downstream dropped before it accepted anything
            # of this transaction (its idle timeout between MAIL and the
            # first RCPT) loses nothing: start the transaction again, once.
            await self._start(link, envelope)
        reply = await self._rcpt(link, address, params)
        if reply.code in (250, 251):
            link.promise(envelope.id, address)
            return Accept()
        raise downstream_error(reply, Stage.RCPT)

    @hookimpl
    async def bonzo_deliver(self, session: Session, envelope: Envelope) -> Accept | None:
        """Send the message downstream; ``250`` only after the downstream's
        ``250``, its ``4xx``/``5xx`` otherwise. Recipients not yet asked
        (``check_rcpt = false``) are asked now; one the downstream refuses
        is refused alone (:meth:`~bonzo.session.Envelope.refuse_recipient`)."""
        link = self._link(session)
        # Not refused by a filter, not removed by one; recipients a filter
        # added are asked now.
        todo = envelope.remaining_indexes
        if not todo:
            return None
        wanted = [envelope.rcpt_tos[i] for i in todo]
        if link.envelope == envelope.id and (
            not _within(link.accepted, wanted) or link.sender != envelope.mail_from
        ):
            # The downstream holds a recipient this message no longer goes
            # to, or a filter changed the sender: start the transaction again.
            link.envelope = None
        if link.envelope != envelope.id or link.conn is None or not link.conn.usable:
            await self._start(link, envelope)
        conn = link.conn
        assert conn is not None
        have = list(link.accepted)
        errors: list[SMTPError] = []
        broken: list[tuple[str, Reply]] = []
        for i in todo:
            address = envelope.rcpt_tos[i]
            if address in have:
                have.remove(address)
                continue
            reply = await self._rcpt(link, address, envelope.rcpt_params[i])
            if reply.code not in (250, 251):
                if link.was_promised(envelope.id, address):
                    # Answered 250 at RCPT, now refused in a new downstream
                    # transaction: it cannot be refused alone after the
                    # message (one reply for all), nor dropped.
                    broken.append((address, reply))
                    continue
                error = downstream_error(reply, Stage.RCPT)
                errors.append(error)
                envelope.refuse_recipient(i, error)
        if broken:
            link.drop()
            address, reply = broken[0]
            log.warning(
                "[%s %s] forward: %s, accepted at RCPT, refused in a new downstream "
                "transaction (%s %s): the message is deferred",
                session.id,
                session.remote_ip,
                log_escape(address),
                reply.code,
                reply.enhanced_code,
            )
            raise TransientError(
                "A recipient accepted before is refused downstream now; try again later",
                451,
                "4.4.2",
            )
        if not link.accepted:
            # Nobody to send it to: the first deferral, else the first refusal.
            link.envelope = None
            raise min(errors, key=lambda e: e.status_code // 100)
        link.envelope = None
        link.accepted = []
        problem = _content_problem(conn, envelope)
        if problem is not None:
            link.drop()  # MAIL and RCPT were sent: end that transaction with the connection
            raise problem
        try:
            replies = await conn.data(envelope)
        except BaseException:
            link.drop()
            raise
        reply = replies[0]
        if reply.code == 250:
            if not conn.supports("DSN"):
                self._no_success_notice(session, conn, envelope)
            text = _safe_text(reply, "Ok")[0]
            return Accept(f"Ok: {envelope.id} forwarded: {text}"[:MAX_LINE])
        if not conn.usable:
            log.info(
                "[%s %s] forward: %s at the end of data: %s",
                session.id,
                session.remote_ip,
                conn.server,
                reply,
            )
        raise downstream_error(reply, Stage.END)

    @hookimpl
    async def bonzo_rset(self, session: Session) -> None:
        """End the downstream transaction too."""
        link = self.links.get(session.id)
        if link is None or link.conn is None or link.envelope is None:
            return
        link.envelope = None
        link.accepted = []
        try:
            reply = await link.conn.rset()
        except BaseException:
            link.drop()
            raise
        if reply.code != 250:
            link.drop()

    @hookimpl
    async def bonzo_disconnect(self, session: Session) -> None:
        """Close the downstream connection with ``QUIT``."""
        link = self.links.pop(session.id, None)
        session.stash.pop("_forward", None)
        if link is not None:
            await _quit(link)

    # -------------------------------------------------------------- helpers
    def _no_success_notice(
        self, session: Session, conn: ClientConnection, envelope: Envelope
    ) -> None:
        """The downstream took a message whose sender asked for a success
        notice (``NOTIFY=SUCCESS``) without offering DSN: RFC 3461 5.2.2 wants
        a "relayed" notice, which nobody sends here (no queue). Say so."""
        asked = [
            envelope.rcpt_tos[i]
            for i in envelope.remaining_indexes
            if "SUCCESS" in (envelope.rcpt_params[i].get("NOTIFY") or "").upper()
        ]
        if asked:
            log.warning(
                "[%s %s] forward: %s does not offer DSN: no success notice for %s, "
                "though the sender asked for one (NOTIFY=SUCCESS); relay through the "
                "queue plugin's smarthost route to have one sent",
                session.id,
                session.remote_ip,
                conn.server,
                ", ".join(f"<{log_escape(a)}>" for a in asked),
            )

    def _link(self, session: Session) -> Link:
        link = self.links.get(session.id)
        if link is None:
            link = self.links[session.id] = Link(session.id)
            session.stash["_forward"] = link
        return link

    async def _connect(self, link: Link, session: Session | None = None) -> ClientConnection:
        assert self.settings is not None
        try:
            conn = await client.connect(self.host, self.port, settings=self.settings)
        except ClientError as exc:
            log.warning(
                "[%s] forward: %s not available at %s: %s",
                link.session_id,
                host_port(self.host, self.port),
                exc.stage,
                exc.reply,
            )
            raise downstream_error(exc.reply, exc.stage) from None
        link.conn = conn
        return conn

    async def _start(self, link: Link, envelope: Envelope) -> None:
        """``MAIL`` downstream for ``envelope`` (connecting, or reconnecting
        once when a kept connection has gone stale); raises the client's
        error when the downstream does not accept it."""
        link.envelope = None
        link.accepted = []
        params = envelope.mail_params
        body = (params.get("BODY") or "").upper()
        if body == "BINARYMIME":
            # Not offered (bonzo_ehlo_keywords): DATA cannot carry it on.
            raise PermanentError("BODY=BINARYMIME cannot be forwarded", 555, "5.5.4")
        size = params.get("SIZE")
        options: dict[str, Any] = {
            "size": int(size) if size is not None and size.isdigit() else None,
            "smtputf8": "SMTPUTF8" in params,
            "eightbit": body == "8BITMIME",
            "ret": params.get("RET"),
            "envid": params.get("ENVID"),
        }
        try:
            for attempt in range(2):
                conn = link.conn
                fresh = conn is None or not conn.usable
                if fresh:
                    if conn is not None:
                        conn.close()
                    conn = await self._connect(link)
                assert conn is not None
                try:
                    link.sender = envelope.mail_from
                    reply = await conn.mail(envelope.mail_from, **_fitted(options, conn))
                except ClientError:
                    # A kept connection that no longer works: once more, anew.
                    conn.close()
                    link.conn = None
                    if fresh or attempt:
                        raise TransientError(_UNAVAILABLE, 451, "4.4.1") from None
                    continue
                break
        except (asyncio.CancelledError, Exception) as exc:
            if not isinstance(exc, SMTPError):
                link.drop()
            raise
        if reply.code == 250:
            link.envelope = envelope.id
            return
        if not conn.usable:
            link.drop()
        raise downstream_error(reply, Stage.MAIL)

    async def _rcpt(self, link: Link, address: str, params: Mapping[str, Any]) -> Reply:
        conn = link.conn
        if conn is None or not conn.usable:
            link.drop()
            raise TransientError(_UNAVAILABLE, 451, "4.4.2")
        recipient = client.Recipient(address, params.get("NOTIFY"), params.get("ORCPT"))
        try:
            reply = await conn.rcpt(recipient)
        except BaseException:
            link.drop()
            raise
        if reply.code in (250, 251):
            link.accepted.append(address)
        elif not conn.usable:
            link.drop()
        return reply


def _within(accepted: list[str], wanted: list[str]) -> bool:
    """Every one of ``accepted`` is still in ``wanted`` (as many times)."""
    rest = list(wanted)
    for address in accepted:
        if address not in rest:
            return False
        rest.remove(address)
    return True


async def _quit(link: Link) -> None:
    conn, link.conn = link.conn, None
    link.envelope = None
    if conn is not None:
        await conn.quit()


def _recipients_checked(app: Any, me: ForwardPlugin) -> bool:
    """Whether this server decides who may send where before the downstream
    does: a plugin with ``bonzo_rcpt`` runs before ``forward`` (``recipients``,
    ``access``...), or every listener requires AUTH. ``True`` when that cannot
    be told (no application: a plugin made by hand)."""
    plugins = getattr(app, "plugins", None)
    listeners = getattr(getattr(app, "config", None), "listeners", None)
    if plugins is None or listeners is None:
        return True
    if listeners and all(listener.settings.require_auth for listener in listeners):
        return True
    first = plugins.calls.get("bonzo_rcpt")
    return bool(first) and plugins.get(first[0].plugin) is not me


def _only_delivery_plugin(app: Any, me: ForwardPlugin) -> None:
    """``forward`` answers the client with the downstream's verdict, so no
    other enabled plugin may deliver (the first to accept would win)."""
    config = getattr(app, "config", None)
    plugins = getattr(app, "plugins", None)
    enabled = getattr(getattr(config, "plugins", None), "enabled", None)
    if plugins is None or not enabled:
        return
    others = [
        name
        for name in enabled
        if plugins.get(name) is not me and "bonzo_deliver" in plugins.hooks_of(name)
    ]
    if others:
        raise ValueError(
            "forward hands each message on during the session and must be the only "
            f"delivery plugin; also enabled: {', '.join(others)} (remove it from "
            "[plugins] enabled)"
        )

"""One ``Authentication-Results:`` field (RFC 8601) for what ``spf``,
``dkim``, ``dmarc`` (and ARC) found, under this server's authserv-id; and
the removal of fields a sender forged with that id.

The fields are built with the `authres <https://pypi.org/project/authres/>`_
library from the results on ``session.results`` and ``envelope.results``;
every value that came from the client or from DNS is reduced to a safe
token, a domain or a quoted string first (authres writes values as given).

See ``README.rst`` in this directory for the configuration.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import authres
import authres.arc
import authres.dmarc

from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session

from .._auth import sanitize, unshown

__all__ = ["AuthresPlugin", "KEYS", "authserv_id_of"]

log = logging.getLogger("bonzo.plugins.authres")

#: The ``[plugins.authres]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("authserv_id", "str",
        doc="The name the field is written under, and whose forged fields are "
        "removed; default: the server's hostname (``[server] hostname``). A host "
        "name: letters, digits, ``.``, ``-``, ``_``."),
    Key("remove_forged", "bool", default=True,
        doc="Delete ``Authentication-Results:`` fields carrying ``authserv_id`` "
        "that arrived with the message."),
    Key("reasons", "bool", default=True,
        doc='Write each result\'s reason (``reason="..."``).'),
)  # fmt: skip
KEYS = tuple(SCHEMA.names)
FIELD = "Authentication-Results"
#: A value authres may write as is: a token, or an address or domain of
#: token characters (RFC 8601 2.2 pvalue, RFC 2045 token).
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]{1,255}")
_ID = re.compile(r"[A-Za-z0-9.\-_]{1,255}")


def _quoted(text: str) -> str:
    """``text`` as an RFC 5322 quoted-string (``\\`` and ``"`` escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pvalue(value: Any) -> str:
    """``value`` as a property value: its printable ASCII, which authres
    quotes when it is not a token — except a value with an ``@``, which it
    writes as is (an address): that one is quoted here unless it is made of
    token characters. A ``;`` (a client's quoted local part, a HELO name)
    goes, as in reasons, for the readers that split the field on ``;``
    without minding quotes: an address keeps only its domain (``@domain``,
    RFC 8601 2.3 allows leaving out the local part), other text gets
    ``,``."""
    text = sanitize(str(value), 255)
    if ";" in text:
        local, at, domain = text.rpartition("@")
        text = at + domain if at and ";" not in domain else text.replace(";", ",")
    if _TOKEN.fullmatch(text) or "@" not in text:
        return text
    return _quoted(text)


def _reason(result: Any) -> str | None:
    """``result``'s reason as an RFC 8601 ``value``: printable ASCII, which
    authres quotes when it is not a token. It writes any value with an ``@``
    as is, though an ``@`` is never part of a token (RFC 2045 tspecials) and
    a reason is not an address: such a reason is quoted here, or a reason
    from the sender's DNS (``include:x@y;dkim=pass``) would end the result
    and start forged ones. A reason is prose: its ``;`` become ``,`` too, for
    the readers that split the field on ``;`` without minding quotes.

    A ``temperror`` says only that: its reason names this server's own
    resolvers and their answers (``127.0.0.1:53: answered SERVFAIL``), which
    belong in the log, not in a header the recipient reads and forwards."""
    if result.result == "temperror":
        return "temporary error, details in the server log"
    text = sanitize(result.reason, 120).replace(";", ",")
    if not text:
        return None
    return _quoted(text) if "@" in text else text


def same_id(authserv_id: str) -> str:
    """An authserv-id in the form compared: lower case, without a final dot
    (``MX.Example.org.`` names the host ``mx.example.org`` names)."""
    return authserv_id.lower().rstrip(".")


def authserv_id_of(value: bytes) -> str | None:
    """The authserv-id of an ``Authentication-Results:`` field's value (as
    :func:`same_id` writes it), or ``None`` if it has none that parses. A
    quoted-string is the same id as the token it quotes (RFC 8601 2.2: a
    "value" of RFC 2045). Control and invisible characters are removed
    first: ``mx.example.com`` followed by a NUL is our id to a reader that
    drops or hides the NUL."""
    # (The field's own spaces and folding stay: they separate its parts.)
    text = "".join(c for c in value.decode("utf-8", "replace") if c in " \t\r\n" or not unshown(c))
    try:
        return same_id(str(authres.AuthenticationResultsHeader.parse_value(text).authserv_id))
    except Exception:  # authres raises several kinds on a malformed field
        # The id is the first word, before any version and the first ";".
        text = re.sub(r"\([^()]*\)", " ", text).lstrip()
        quoted = re.match(r'"((?:[^"\\]|\\.)*)"', text)
        if quoted is not None:
            return same_id(re.sub(r"\\(.)", r"\1", quoted.group(1)))
        words = text.split(";", 1)[0].split()
        return same_id(words[0]) if words else None


class AuthresPlugin:
    """Writes the results of the authentication plugins into one
    ``Authentication-Results:`` field."""

    #: Plugins to run before this one at the message (``bonzo check`` warns
    #: otherwise), and why.
    # Not spf: its results are recorded at HELO and MAIL, before any message
    # hook runs.
    runs_after = {
        name: f"it writes {name}'s result into Authentication-Results" for name in ("dkim", "dmarc")
    }

    def __init__(self) -> None:
        self.authserv_id = "localhost"
        self.remove_forged = True
        self.reasons = True

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.authres]``."""
        values = SCHEMA.parse(config, app)
        settings = getattr(app, "settings", None) if app is not None else None
        value = values["authserv_id"] or getattr(settings, "hostname", None) or "localhost"
        if not _ID.fullmatch(value):
            raise ValueError(
                f"authserv_id: {value!r} is not a usable id (a host name: letters, digits, "
                "'.', '-', '_')"
            )
        self.authserv_id = value
        self.remove_forged = values["remove_forged"]
        self.reasons = values["reasons"]

    # -------------------------------------------------------------- build
    def results(self, session: Session, envelope: Envelope) -> list[Any]:
        """The authres result objects for the recorded results."""
        out: list[Any] = []
        reason = _reason if self.reasons else (lambda _r: None)
        spf = envelope.results.all("spf")
        helo = [r for r in session.results.all("spf") if r.details.get("identity") == "helo"]
        if helo and not any(r.details.get("identity") == "helo" for r in spf):
            last = helo[-1]
            out.append(
                authres.SPFAuthenticationResult(
                    result=last.result,
                    reason=reason(last),
                    smtp_helo=_pvalue(last.details.get("helo", "")),
                )
            )
        for r in spf:
            if r.details.get("identity") == "helo":
                out.append(
                    authres.SPFAuthenticationResult(
                        result=r.result,
                        reason=reason(r),
                        smtp_helo=_pvalue(r.details.get("helo", "")),
                    )
                )
            else:
                out.append(
                    authres.SPFAuthenticationResult(
                        result=r.result,
                        reason=reason(r),
                        smtp_mailfrom=_pvalue(r.details.get("sender") or r.details.get("domain")),
                    )
                )
        for r in envelope.results.all("dkim"):
            out.append(
                authres.DKIMAuthenticationResult(
                    result=r.result,
                    reason=reason(r),
                    header_d=_pvalue(r.details["domain"]) if r.details.get("domain") else None,
                    header_s=_pvalue(r.details["selector"]) if r.details.get("selector") else None,
                )
            )
        for r in envelope.results.all("dmarc"):
            domain = r.details.get("domain")
            out.append(
                authres.dmarc.DMARCAuthenticationResult(
                    result=r.result,
                    reason=reason(r),
                    header_from=_pvalue(domain) if domain else None,
                    policy=_pvalue(r.details["policy"]) if domain else None,
                )
            )
        for r in envelope.results.all("arc"):
            out.append(authres.arc.ARCAuthenticationResult(result=r.result, reason=reason(r)))
        return out

    def value(self, session: Session, envelope: Envelope) -> str:
        """The field's value: the authserv-id, then each result on a line of
        its own (folded), or ``none``."""
        results = self.results(session, envelope)
        if not results:
            return f"{self.authserv_id}; none"
        return f"{self.authserv_id};\r\n\t" + ";\r\n\t".join(str(r) for r in results)

    # ----------------------------------------------------------- forged
    def _ours(self, name: str, value: str) -> bool:
        return name.lower() == "authentication-results" and authserv_id_of(
            value.encode("utf-8", "surrogateescape")
        ) == same_id(self.authserv_id)

    async def remove(self, envelope: Envelope) -> int:
        """Delete the ``Authentication-Results:`` fields that carry our
        authserv-id and came with the message (RFC 8601 5: a sender may
        have forged them); those a plugin of this server added (a milter
        such as OpenDKIM, whose default id is the host name) stay."""
        loop = asyncio.get_running_loop()
        # headers() applies earlier plugins' changes (a spool rewrite): off
        # the loop.
        fields, received = await loop.run_in_executor(
            None, lambda: (envelope.headers(), envelope.received_headers())
        )
        # The client's fields are matched by content; they are the last
        # fields (below the added ones): matched from the end.
        left = Counter(pair for pair in received if self._ours(*pair))
        count = sum(1 for name, _ in fields if name.lower() == "authentication-results")
        occurrence = count + 1
        forged = []
        for name, value in reversed(fields):
            if name.lower() == "authentication-results":
                occurrence -= 1
                if left[(name, value)] > 0 and self._ours(name, value):
                    left[(name, value)] -= 1
                    forged.append(occurrence)
        # Last first (forged is in that order), so that the occurrence
        # numbers of the others hold.
        for number in forged:
            envelope.delete_header(FIELD, number)
        return len(forged)

    @hookimpl
    async def bonzo_message(self, session: Session, envelope: Envelope) -> None:
        """Remove forged fields, then add ours."""
        if self.remove_forged:
            removed = await self.remove(envelope)
            if removed:
                log.info(
                    "authres: message %s: removed %d Authentication-Results field(s) "
                    "claiming to be ours (%s)",
                    envelope.id,
                    removed,
                    self.authserv_id,
                )
        envelope.add_header(FIELD, self.value(session, envelope))
        return None

"""Outbound DKIM signing (RFC 6376) with dkimpy, by the author's domain.

The plugin signs in :func:`~bonzo.hookspecs.bonzo_message`, after the
content filters listed before it and before any delivery plugin takes the
message, and adds the ``DKIM-Signature:`` field(s) in front of the message
with :meth:`Envelope.prepend_raw() <bonzo.session.Envelope.prepend_raw>`.
All the work (reading a spooled message, hashing, RSA) runs in a thread of
the loop's default executor, so the event loop never waits for it.

See ``README.rst`` in this directory for the configuration.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from bonzo.errors import TransientError
from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, HeaderSectionTooLarge, Session

from .._config import IPNetwork, config_domain, describe, in_networks
from .keys import GOOD_RSA_BITS, KeyFileError, load_key, zone_line
from .signer import MessageSigner, Outcome, Signer, message_parts

__all__ = ["DkimSignPlugin", "DEFAULT_HEADERS", "DEFAULT_OVERSIGN", "NEVER_SIGNED"]

log = logging.getLogger("bonzo.plugins.dkim_sign")

#: Signed when present (RFC 6376 5.4.1's list, with Message-ID and the MIME
#: fields): what a reader sees and what makes the message what it is.
DEFAULT_HEADERS = (
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-Disposition",
    "Sender",
    "Resent-Date",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
    "Resent-Message-ID",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
)
#: Signed once more than present, so that an instance added in transit
#: breaks the signature (RFC 6376 8.15): the fields a reader is shown, each
#: allowed once by RFC 5322 3.6. A second ``From:`` or ``Subject:`` added
#: below a signed one would otherwise be shown by some readers while the
#: signature still verified.
DEFAULT_OVERSIGN = ("From", "Reply-To", "Subject", "Date", "To", "Cc", "Message-ID")
#: Fields never signed: trace fields change on the way (RFC 6376 5.4), a
#: ``Bcc:`` is removed, and one signature never covers another.
NEVER_SIGNED = (
    "received",
    "return-path",
    "dkim-signature",
    "bcc",
    "resent-bcc",
    "arc-seal",
    "arc-message-signature",
    "arc-authentication-results",
)
CANONICALIZATIONS = ("relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed")
SIGN_MODES = ("authenticated", "all")
ON_ERROR = ("defer", "unsigned")
#: A signature's lifetime is at most this (ten years), to catch a typo.
MAX_EXPIRE = 10 * 365 * 86400

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")
#: The local part of ``i=``: dot-atom text (RFC 5322 3.2.3) but ``=``, which
#: would start an escape in the tag's dkim-quoted-printable (RFC 6376 3.5).
_IDENTITY_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/?^_`{|}~.-]{0,64}")


def _header_names(names: list[str]) -> list[str]:
    """Field names checked, each once (the first spelling kept)."""
    seen: set[str] = set()
    out = []
    for name in names:
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(
                f"{describe(name)} is not a header field name (printable ASCII "
                "without ':' or spaces, at most 76 characters)"
            )
        lower = name.lower()
        if lower in NEVER_SIGNED:
            raise ValueError(
                f"{name} must not be signed (trace fields change in transit, "
                "Bcc: is removed, and one signature does not cover another)"
            )
        if lower not in seen:
            seen.add(lower)
            out.append(name)
    return out


def _canonicalization(value: str) -> str:
    lower = value.lower()
    if lower not in CANONICALIZATIONS:
        raise ValueError(
            f"expected one of {', '.join(CANONICALIZATIONS)} (header/body), got {describe(value)}"
        )
    return lower


def _domain_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"domains: {describe(name)} is not a domain name")
    try:
        domain = config_domain(name)
    except ValueError as exc:
        raise ValueError(f'domains."{name}": not a valid domain name: {exc}') from None
    if domain.startswith("[") or not all(re.fullmatch(_LABEL, x) for x in domain.split(".")):
        raise ValueError(f'domains."{name}": not a host name a DKIM key can be published under')
    return domain


def _selector(value: Any, where: str, domain: str) -> str:
    where = f"{where}.selector" if where else "selector"
    if not isinstance(value, str) or not value:
        raise ValueError(f'{where}: required, a DNS label such as "s1"')
    if not _SELECTOR.fullmatch(value) or len(f"{value}._domainkey.{domain}") > 253:
        raise ValueError(
            f"{where}: {describe(value)} is not a valid selector (DNS labels of "
            "letters, digits and hyphens, separated by dots)"
        )
    return value.lower()


def _identity(value: Any, where: str, domain: str) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or "@" not in value:
        raise ValueError(
            f"{where}.identity: {describe(value)} is not an identity such as "
            f'"@{domain}" or "user@{domain}"'
        )
    local, _, host = value.rpartition("@")
    if not _IDENTITY_LOCAL.fullmatch(local):
        raise ValueError(f"{where}.identity: {describe(value)}: unusable local part")
    try:
        host = config_domain(host)
    except ValueError:
        raise ValueError(f"{where}.identity: {describe(value)}: invalid domain") from None
    if host != domain and not host.endswith("." + domain):
        # RFC 6376 3.5: i= is in d= or one of its subdomains.
        raise ValueError(f"{where}.identity: {value} is not in {domain} or one of its subdomains")
    return f"{local}@{host}"


def _load(path: Path, where: str, warnings: list[str]) -> Any:
    """The key at ``path``; what is worth a warning (a short RSA key, a file
    others can read) is added to ``warnings``, which ``bonzo check``, the
    start list with the configuration's other warnings."""
    try:
        key = load_key(path)
    except KeyFileError as exc:
        raise ValueError(f"{where}.key: {exc}") from None
    if key.algorithm.startswith("rsa") and key.bits < GOOD_RSA_BITS:
        warnings.append(
            f"{where}: {path} is a {key.bits}-bit RSA key; {GOOD_RSA_BITS} bits is the "
            "usual size (RFC 8301)"
        )
    try:
        mode = os.stat(path).st_mode
    except OSError:  # pragma: no cover - it was just read
        mode = 0
    if mode & 0o077:
        warnings.append(
            f"{where}: the key file {path} can be read by others than its owner (chmod 600 it)"
        )
    return key


#: Each signature of a domain (``[plugins.dkim_sign.domains."example.org"]``).
SIGNATURE = Schema(
    Key("selector", required=True,
        doc="The selector (DNS labels of letters, digits and hyphens, such as "
        '``"s1"`` or ``"2026-01"``).'),
    Key("key", "path", required=True,
        doc="The private key file (PEM: RSA, or Ed25519 also in dkimpy's form)."),
    Key("identity", default="",
        doc='The ``i=`` tag, such as ``"@mail.example.org"`` or '
        '``"alerts@example.org"``: an address (the local part may be empty) in '
        "the signing domain or a subdomain of it. Empty: no ``i=`` (it then "
        "means ``@`` the domain). Receivers rarely look at it."),
    Key("subdomains", "bool",
        doc="Also sign messages from subdomains of the domain (``From: "
        "x@eu.example.org`` with ``example.org``'s key), which DMARC's relaxed "
        "alignment accepts; default ``false``. A subdomain with an entry of its "
        "own uses that one. With several signatures, giving it in one is "
        "enough; where given twice, it must not differ."),
)  # fmt: skip


class _DomainsKey(Key):
    """``domains``: a table of domains, each a signature table or an array of
    them — a shape no kind of :mod:`bonzo.schema` has, so parsed here. A
    domain's entries are checked together (one ``subdomains``, distinct
    selectors); the key files are read in ``bonzo_configure``."""

    @property
    def type_text(self) -> str:
        return "table of domains, each a table with the keys below or an array of such tables"

    def parse(self, value: Any, base_dir: Path | None) -> Any:
        if not isinstance(value, Mapping):
            raise ValueError(f"domains: expected a table of domains, got {describe(value)}")
        domains: dict[str, dict[str, Any]] = {}
        for name, entry in value.items():
            domain = _domain_name(name)
            where = f'domains."{name}"'
            entries = entry if isinstance(entry, list) else [entry]
            if not entries:
                raise ValueError(f"{where}: an empty list (give a selector and a key)")
            subdomains: bool | None = None
            signatures = []
            for i, item in enumerate(entries):
                at = f"{where}[{i}]" if isinstance(entry, list) else where
                if not isinstance(item, Mapping):
                    raise ValueError(
                        f"{at}: expected a table with selector and key, got {describe(item)}"
                    )
                if item.get("identity") == "":  # the default, said out loud
                    item = {k: v for k, v in item.items() if k != "identity"}
                try:
                    values = SIGNATURE.parse(item, base_dir=base_dir)
                except ValueError as exc:
                    raise ValueError(f"{at}.{exc}") from None
                sub = values.pop("subdomains")
                if sub is not None:
                    if subdomains is not None and sub != subdomains:
                        raise ValueError(
                            f"{at}.subdomains: differs from the domain's other signatures"
                        )
                    subdomains = sub
                values["selector"] = _selector(values["selector"], at, domain)
                values["identity"] = _identity(values["identity"], at, domain)
                values["where"] = at  # for the key file's errors
                signatures.append(values)
            selectors = [v["selector"] for v in signatures]
            if len(set(selectors)) != len(selectors):
                raise ValueError(f"{where}: the same selector twice")
            if domain in domains:
                raise ValueError(f"{where}: the same domain as another entry")
            domains[domain] = {"subdomains": bool(subdomains), "signatures": signatures}
        return domains


def _expire(seconds: int) -> int:
    if seconds > MAX_EXPIRE:
        raise ValueError(f"expected at most {MAX_EXPIRE} seconds (ten years), got {seconds}")
    return seconds


def _from_signed(values: dict[str, Any]) -> None:
    if "from" not in {h.lower() for h in values["headers"] + values["oversign"]}:
        raise ValueError("headers: From must be signed (RFC 6376 5.4)")


#: The ``[plugins.dkim_sign]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    _DomainsKey("domains", "table", default={}, each=SIGNATURE,
        doc="The signing domains, by name. A domain given as an array of tables "
        '(``[[plugins.dkim_sign.domains."example.org"]]``) is signed with '
        "several keys, each adding its own signature. Domains are compared in "
        "canonical form (case, IDNA). With no domains, nothing is signed (a "
        "warning is logged at start-up)."),
    Key("sign", "choice", default="authenticated", choices=SIGN_MODES,
        doc='Whose messages are signed: ``"authenticated"`` (sessions that '
        'authenticated, and clients in ``networks``) or ``"all"`` (every '
        "session; see above)."),
    Key("networks", "networks", default=[],
        doc="Client networks (CIDR, or single addresses) whose messages are "
        "signed as if authenticated."),
    Key("headers", "strings", default=list(DEFAULT_HEADERS), convert=_header_names,
        doc="The header fields signed when present (any case). ``From`` must be "
        "signed (here or in ``oversign``)."),
    Key("oversign", "strings", default=list(DEFAULT_OVERSIGN), convert=_header_names,
        doc="The fields signed once more than present, so that none can be "
        "added; ``[]`` for none."),
    Key("canonicalization", default="relaxed/relaxed", convert=_canonicalization,
        doc="Header/body canonicalization: " + ", ".join(f'``"{c}"``' for c in CANONICALIZATIONS)
        + " (any case). ``relaxed`` survives the changes of white space and line "
        "folding that relays make; ``simple`` does not."),
    # No maximum= here: bonzo.schema shows a large bound as 3.1536e+08.
    Key("expire", "int", default=0, minimum=0, convert=_expire,
        doc="Seconds a signature is valid for (its ``x=`` tag, ``t=`` plus "
        f"this), at most {MAX_EXPIRE} (ten years); ``0`` for no ``x=``. Verifiers "
        "treat an expired signature as none, so leave room for delivery "
        "retries (days, not hours)."),
    Key("on_error", "choice", default="defer", choices=ON_ERROR,
        doc='What to do with a message whose signing failed: ``"defer"`` '
        '(``451 4.3.0``) or ``"unsigned"`` (pass it on).'),
    check=_from_signed,
    notes="A bad domain, selector, identity or header field name, or an unusable "
    "key file, is a configuration error that names the key.",
)  # fmt: skip
KEYS = tuple(SCHEMA.names)
DOMAIN_KEYS = tuple(SIGNATURE.names)


class DkimSignPlugin:
    """Adds DKIM signatures to the messages of the configured domains."""

    #: Plugins to run before this one at the message (``bonzo check`` warns
    #: otherwise), and why.
    runs_after = {
        name: f"{name} may change the message after it is signed, which breaks the signature"
        for name in ("headers", "rspamd", "spamassassin", "milter")
    }

    def __init__(self) -> None:
        self.signer: MessageSigner | None = None
        self.sign_all = False
        self.networks: list[IPNetwork] = []
        self.defer = True

    # ---------------------------------------------------------------- config
    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.dkim_sign]`` and load every key."""
        values = SCHEMA.parse(config, app)
        domains: dict[str, tuple[bool, list[Signer]]] = {}
        warnings: list[str] = []
        for domain, entry in values["domains"].items():
            signers = [
                Signer(
                    domain, sig["selector"], _load(sig["key"], sig["where"], warnings),
                    sig["identity"],
                )
                for sig in entry["signatures"]
            ]  # fmt: skip
            domains[domain] = (entry["subdomains"], signers)
        headers, oversign = values["headers"], values["oversign"]
        canonicalization, expire = values["canonicalization"], values["expire"]
        sign, networks, on_error = values["sign"], values["networks"], values["on_error"]
        self.signer = MessageSigner(domains, headers, oversign, canonicalization, expire)
        #: What ``bonzo check`` should warn about.
        self.config_warnings = (
            warnings if domains else ["no domains configured: nothing will be signed"]
        )
        if sign == "all" and domains:
            open_ports = [
                f"listeners[{i}]"
                for i, listener in enumerate(getattr(getattr(app, "config", None), "listeners", ()))
                if not getattr(getattr(listener, "settings", None), "require_auth", True)
            ]
            if open_ports:
                # A stranger's mail "From:" one of these domains would pass
                # DKIM and DMARC with this server's signature.
                self.config_warnings.append(
                    f'sign = "all" signs whatever {", ".join(open_ports)} receive without AUTH: '
                    "a stranger's message claiming one of your domains gets your signature; "
                    'use sign = "authenticated" (with networks for hosts you relay for) '
                    "unless nothing but your own mail arrives there"
                )
        self.sign_all = sign == "all"
        self.networks = networks
        self.defer = on_error == "defer"

    @hookimpl
    def bonzo_startup(self) -> None:
        """Log each signing key and the DNS record that publishes it."""
        signer = self.signer
        if signer is None or not signer.domains:
            log.warning("dkim_sign: no domains configured: nothing will be signed")
            return
        for domain, (subdomains, signers) in signer.domains.items():
            for s in signers:
                log.info(
                    "dkim_sign: %s%s: selector %s, %s (%d bits) from %s; DNS: %s",
                    domain,
                    " and subdomains" if subdomains else "",
                    s.selector,
                    s.key.algorithm,
                    s.key.bits,
                    s.key.path,
                    zone_line(s.key, s.selector, domain),
                )

    # -------------------------------------------------------------- messages
    def applies(self, session: Session) -> bool:
        """Whether messages of ``session`` are signed at all: every session
        with ``sign = "all"``; else authenticated ones and those from
        ``networks``."""
        if self.sign_all or session.auth is not None:
            return True
        return bool(self.networks) and in_networks(session.remote_ip, self.networks)

    def _sign(self, section: bytes, body: IO[bytes], start: int) -> Outcome:
        assert self.signer is not None
        body.seek(start)
        return self.signer.sign(section, body)

    @hookimpl
    async def bonzo_message(self, session: Session, envelope: Envelope) -> None:
        """Sign the message if its author's domain has a key; no verdict, so
        later filters still run (they must not change the message)."""
        if self.signer is None or not self.signer.domains or not self.applies(session):
            return None
        loop = asyncio.get_running_loop()
        try:
            parts = message_parts(envelope)
            outcome = await loop.run_in_executor(None, self._sign, *parts)
        except HeaderSectionTooLarge:
            raise  # the message is refused (552 5.3.4), not a local fault
        except Exception:
            log.error(
                "dkim_sign: message %s (session %s): signing failed; %s",
                envelope.id,
                session.id,
                "deferred (on_error = defer)" if self.defer else "passed on unsigned",
                exc_info=True,
            )
            if self.defer:
                raise TransientError(
                    "Local error: the message could not be signed, try again later",
                    451,
                    "4.3.0",
                ) from None
            return None
        if outcome.reason:
            log.info("dkim_sign: message %s not signed: %s", envelope.id, outcome.reason)
            return None
        if not outcome.fields:
            log.debug("dkim_sign: message %s: no key for %s", envelope.id, outcome.author)
            return None
        for field in outcome.fields:
            envelope.prepend_raw(field)
        for s in outcome.signed:
            log.info(
                "dkim_sign: message %s signed: d=%s s=%s a=%s",
                envelope.id,
                s.domain,
                s.selector,
                s.key.algorithm,
            )
        return None

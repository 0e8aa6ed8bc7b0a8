"""TLS for listeners: server contexts, certificates chosen by SNI, and the
facts about a TLS session that plugins and the ``Received:`` header see.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

__all__ = ["TLSError", "CertificatePair", "make_server_context", "tls_facts"]


#: Where the SNI callback leaves the server name on the TLS socket.
_SNI_ATTR = "_bonzo_sni"


class TLSError(ValueError):
    """A certificate or key that cannot be used; the message says which file and why."""


class CertificatePair:
    """A certificate chain file and its private key file."""

    __slots__ = ("cert", "key")

    def __init__(self, cert: str, key: str) -> None:
        self.cert = cert
        self.key = key

    def __repr__(self) -> str:
        return f"CertificatePair(cert={self.cert!r}, key={self.key!r})"


def _context(pair: CertificatePair) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Mail clients rarely present certificates; ask for one without requiring
    # it would make some clients fail, so client certificates are not requested.
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    for path in (pair.cert, pair.key):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TLSError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        ctx.load_cert_chain(pair.cert, pair.key)
    except ssl.SSLError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        if "KEY_VALUES_MISMATCH" in str(reason).upper():
            raise TLSError(f"key {pair.key} does not match certificate {pair.cert}") from None
        raise TLSError(
            f"cannot load certificate {pair.cert} with key {pair.key}: {reason}"
        ) from None
    return ctx


def make_server_context(
    default: CertificatePair, sni: Mapping[str, CertificatePair] | None = None
) -> ssl.SSLContext:
    """Build the server context of a listener: TLS 1.2 or newer, ``default``
    certificate, and for each server name in ``sni`` (``"mail.example.org"``
    or ``"*.example.org"``) the certificate to present when the client asks
    for that name. Raises :class:`TLSError` for an unreadable or mismatched
    certificate/key."""
    ctx = _context(default)
    by_name = {name.lower().rstrip("."): _context(pair) for name, pair in (sni or {}).items()}

    def choose(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
        if not name:
            return
        name = name.lower().rstrip(".")
        # On the server side ``server_hostname`` stays None: keep the name
        # the client asked for, for tls_facts().
        setattr(sock, _SNI_ATTR, name)
        if not by_name:
            return
        chosen = by_name.get(name)
        if chosen is None and "." in name:
            chosen = by_name.get("*." + name.split(".", 1)[1])
        if chosen is not None:
            sock.context = chosen

    ctx.sni_callback = choose
    return ctx


def tls_facts(obj: ssl.SSLSocket | ssl.SSLObject | Any) -> dict[str, Any]:
    """What plugins see of an established TLS session: ``version``,
    ``cipher``, ``bits``, ``sni`` (the name the client asked for, if any) and
    ``peer_cert`` (the client's certificate as a dict, if it sent one)."""
    cipher = obj.cipher() or ("", "", 0)
    facts: dict[str, Any] = {
        "version": obj.version() or "",
        "cipher": cipher[0],
        "bits": cipher[2],
        "sni": getattr(obj, _SNI_ATTR, None) or getattr(obj, "server_hostname", None),
        "peer_cert": None,
    }
    try:
        facts["peer_cert"] = obj.getpeercert() or None
    except (ValueError, ssl.SSLError):  # pragma: no cover - no handshake yet
        pass
    return facts

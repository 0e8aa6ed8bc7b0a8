"""TLS for listeners: server contexts, certificates chosen by SNI, the TLS
layer a connection runs over its one stream, and the facts about a TLS
session that plugins and the ``Received:`` header see.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "TLSError",
    "CertificatePair",
    "make_server_context",
    "certificate_warnings",
    "key_file_warnings",
    "SNI_FAILED",
    "EXPIRY_WARNING_DAYS",
    "tls_facts",
    "TLSLayer",
]

#: A server certificate that expires within this many days is warned about
#: (by ``bonzo check``, at start-up and at a reload): two weeks leave time to
#: renew by hand when an automatic renewal (certbot renews 30 days ahead)
#: has silently failed.
EXPIRY_WARNING_DAYS = 14

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


#: Where the SNI callback leaves the server name on the TLS socket.
_SNI_ATTR = "_bonzo_sni"

log = logging.getLogger("bonzo.tls")

#: The reason OpenSSL gives for a handshake the server-name callback ended:
#: Python could not read the name the client asked for (see
#: :func:`_quiet_sni_errors`). The session's log line says that instead.
SNI_FAILED = "CALLBACK_FAILED"


def _quiet_sni_errors() -> None:
    """Keep a client's unreadable server name out of standard error.

    Python decodes the name a ClientHello asks for (SNI) as ASCII before it
    calls the context's ``sni_callback``, which every listener has (to
    record the name, and to choose an SNI certificate). Any client can send
    a name that is not ASCII: Python then writes the ``UnicodeDecodeError``
    with a traceback to standard error through :data:`sys.unraisablehook`
    (outside the log, its file and its JSON format, once per connection)
    and fails the handshake, which the session logs once anyway. This
    wraps the hook, once per process, to turn that one case into a debug
    line; anything else goes to the hook it replaced."""
    previous = sys.unraisablehook
    if getattr(previous, "_bonzo_sni_filter", False):
        return

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (
            isinstance(exc, UnicodeDecodeError)
            and isinstance(unraisable.object, bytes)
            and tb is not None
            and tb.tb_frame.f_code.co_name == "do_handshake"
            and tb.tb_frame.f_code.co_filename == ssl.__file__
        ):
            log.debug(
                "TLS: a client asked for a server name that is not ASCII: %r",
                unraisable.object[:80],
            )
            return
        previous(unraisable)

    hook._bonzo_sni_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class TLSError(ValueError):
    """A certificate or key that cannot be used; the message says which file
    and why, :attr:`sni` which server name's pair it is (``None``: the
    default pair)."""

    sni: str | None = None


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
    # No renegotiation: a client-started one costs the server CPU for free
    # (and the TLS layer below writes only between records of its own).
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    for path in (pair.cert, pair.key):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TLSError(f"cannot read {path}: {exc.strerror or exc}") from None
    _check_complete(pair.cert)

    def no_pass_phrase() -> bytes:
        # Called only for an encrypted key. Without a callback OpenSSL would
        # prompt on the terminal (and block the daemon, even at a reload) or,
        # with no terminal, fail with an OSError naming nothing.
        raise TLSError(
            f"key {pair.key} is encrypted with a pass phrase; Bonzo needs it unencrypted"
        )

    try:
        ctx.load_cert_chain(pair.cert, pair.key, password=no_pass_phrase)
    except ssl.SSLError as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        # OpenSSL says NO_CERTIFICATE_ASSIGNED for a key of another kind
        # than the certificate's (RSA for an ECDSA certificate), which sent
        # operators looking at the certificate: a mismatch too.
        if any(
            r in str(reason).upper() for r in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED")
        ):
            later = _matching_later_certificate(pair)
            if later:
                raise TLSError(
                    f"certificate {pair.cert}: the first certificate is not the one for key "
                    f"{pair.key} (certificate {later} of the file is); the server certificate "
                    "must come first, then the intermediates"
                ) from None
            raise TLSError(f"key {pair.key} does not match certificate {pair.cert}") from None
        if "PEM" in str(reason).upper():
            # OpenSSL's "PEM lib": a file that is not what its key says (the
            # key given as the certificate, say), or not PEM at all.
            raise TLSError(
                f"cannot load certificate {pair.cert} with key {pair.key}: expected the "
                "certificate (chain) in cert and its private key in key, both PEM"
            ) from None
        raise TLSError(
            f"cannot load certificate {pair.cert} with key {pair.key}: {reason}"
        ) from None
    except OSError as exc:
        # ssl raises a bare OSError (EINVAL, no file name) for some files it
        # cannot use; say which.
        raise TLSError(
            f"cannot load certificate {pair.cert} with key {pair.key}: "
            f"{exc.strerror or exc.__class__.__name__}"
        ) from None
    return ctx


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)


def _check_complete(path: str) -> None:
    """Refuse a certificate file that ends inside a PEM block: a renewal
    caught half written (or a file cut short). OpenSSL reads the complete
    certificates before the cut and ignores the rest, so the server would
    present its certificate without the intermediates after it, and every
    client that verifies would refuse it."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return  # make_server_context says why
    end = 0
    for match in _PEM_BLOCK.finditer(data):
        end = match.end()
    rest = data[end:].strip()
    if rest.startswith(b"-") or b"-----BEGIN" in rest:
        raise TLSError(
            f"certificate {path} ends inside a PEM block (a file being written, or cut "
            "short): the certificates after the last complete one would not be sent"
        )


def _matching_later_certificate(pair: CertificatePair) -> int:
    """The position (2, 3, ...) of the first certificate after the first one in
    ``pair.cert`` that ``pair.key`` belongs to, or 0: tells a chain in the
    wrong order (``cat intermediate.pem cert.pem``) from a wrong key."""
    try:
        with open(pair.cert, "rb") as f:
            blocks = _PEM_CERT.findall(f.read())
    except OSError:
        return 0
    for n, block in enumerate(blocks[1:], start=2):
        # load_cert_chain reads files only: each candidate in a file of its own.
        fd, path = tempfile.mkstemp(suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(block + b"\n")
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(path, pair.key)
        except (ssl.SSLError, OSError, TypeError, ValueError):
            continue
        finally:
            os.unlink(path)
        return n
    return 0


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.DOTALL
)


def _decoded_chain(path: str) -> list[dict[str, Any] | None]:
    """Each certificate of the PEM file ``path`` as the stdlib decodes it
    (``None`` for one it cannot), in file order; empty if unreadable."""
    try:
        with open(path, "rb") as f:
            blocks = _PEM_CERTIFICATE.findall(f.read(1 << 20))
    except OSError:
        return []
    out: list[dict[str, Any] | None] = []
    for block in blocks[:16]:
        # The stdlib's only parser of a certificate reads a file (private,
        # but in every CPython since 3.2); without it no warning, no crash.
        with tempfile.NamedTemporaryFile(suffix=".pem") as one:
            one.write(block + b"\n")
            one.flush()
            try:
                out.append(ssl._ssl._test_decode_cert(one.name))  # type: ignore[attr-defined]
            except Exception:
                out.append(None)
    return out


def key_file_warnings(pair: CertificatePair) -> list[str]:
    """A private key file anyone on the machine can read (mode ``o+r``;
    a group that may read it, as Debian's ``ssl-cert``, is a choice)."""
    try:
        mode = os.stat(pair.key).st_mode
    except OSError:
        return []  # make_server_context's to report
    if mode & 0o004:
        return [f"the key file {pair.key} can be read by every user (chmod o-r it)"]
    return []


def certificate_warnings(
    pair: CertificatePair, *, now: float | None = None, days: int = EXPIRY_WARNING_DAYS
) -> list[str]:
    """What is wrong with the dates of the certificates of ``pair.cert`` --
    the server certificate and the intermediates after it (an expired
    intermediate fails every client that verifies, as its own would):
    expired, expiring within ``days`` days, or not valid yet; and a
    certificate that did not issue the one before it. Empty when the
    certificates are fine or cannot be read (an unusable file is
    :func:`make_server_context`'s to report)."""
    now = time.time() if now is None else now
    out = []
    chain = _decoded_chain(pair.cert)
    for index, decoded in enumerate(chain):
        if decoded is None:
            continue
        issued = chain[index - 1] if index else None
        if issued is not None and issued.get("issuer") != decoded.get("subject"):
            # Not the next link: clients that verify cannot build the chain.
            # (Two server certificates in one file, an RSA and an ECDSA one,
            # serve the first with the second as a bogus intermediate.)
            out.append(
                f"certificate {index + 1} of {pair.cert} did not issue certificate {index} "
                "before it: clients that check the chain will refuse it (one server "
                "certificate per file, followed by its intermediates in order)"
            )
        try:
            not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
            not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        except Exception:
            continue
        names = [v for rdn in decoded.get("subject", ()) for k, v in rdn if k == "commonName"]
        which = (
            f"certificate {pair.cert}"
            if index == 0
            else (f"intermediate certificate {index + 1} of {pair.cert}")
        )
        what = which + "".join(f" (CN={name})" for name in names[:1])
        day = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_after))
        if not_after <= now:
            out.append(f"{what} expired on {day}: clients that check it will refuse it; renew it")
        elif not_before > now:
            start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_before))
            out.append(f"{what} is not valid before {start}: clients that check it will refuse it")
        elif not_after - now < days * 86400:
            left = not_after - now
            if left >= 86400:
                within = f"{int(left // 86400)} day(s)"
            elif left >= 3600:
                within = f"{int(left // 3600)} hour(s)"
            else:
                within = "less than an hour"
            out.append(f"{what} expires on {day} (in {within}); renew it")
    return out


def make_server_context(
    default: CertificatePair, sni: Mapping[str, CertificatePair] | None = None
) -> ssl.SSLContext:
    """Build the server context of a listener: TLS 1.2 or newer, ``default``
    certificate, and for each server name in ``sni`` (``"mail.example.org"``
    or ``"*.example.org"``) the certificate to present when the client asks
    for that name. Raises :class:`TLSError` for an unreadable or mismatched
    certificate/key."""
    ctx = _context(default)
    by_name = {}
    for name, pair in (sni or {}).items():
        try:
            by_name[name.lower().rstrip(".")] = _context(pair)
        except TLSError as exc:
            exc.sni = name
            raise

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
    _quiet_sni_errors()
    return ctx


def tls_facts(obj: ssl.SSLSocket | ssl.SSLObject | Any) -> dict[str, Any]:
    """What plugins see of an established TLS session: ``version``,
    ``cipher``, ``bits``, ``sni`` (the name the client asked for, if any) and
    ``peer_cert`` (the client's certificate as a dict, if it sent one:
    Bonzo's own server contexts never ask for one, so there it is ``None``)."""
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


class TLSLayer:
    """Server-side TLS as a transform, with no I/O: ciphertext from the client
    in (:meth:`receive`), plaintext out; plaintext to send in
    (:meth:`send`), ciphertext out (:meth:`data_to_send`).

    A connection keeps its one :class:`tornado.iostream.IOStream` from accept
    to close and runs TLS through this layer (over :class:`ssl.MemoryBIO`,
    as asyncio does), instead of swapping the stream for an
    :class:`~tornado.iostream.SSLIOStream` at STARTTLS. So nothing buffered
    is lost or replayed at the switch, a handshake that stalls is closed by
    the connection's own timer, a failed handshake is reported once (with
    the session id), and the session ends with a TLS ``close_notify``
    (:meth:`close`), which clients such as ``openssl s_client`` and Exim
    expect.

    :raises ssl.SSLError: from :meth:`receive` for a failed handshake or a
        broken record; the connection is then over.
    """

    __slots__ = ("_incoming", "_outgoing", "_tls", "handshake_done", "peer_closed")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        #: True once the handshake has completed.
        self.handshake_done = False
        #: True once the client has sent its ``close_notify``.
        self.peer_closed = False

    def receive(self, data: bytes) -> bytes:
        """Take ``data`` from the client; return the plaintext it completes
        (``b""`` while the handshake runs or a record is incomplete). Check
        :meth:`data_to_send` afterwards: the handshake answers, and TLS 1.3
        sends session tickets after it."""
        self._incoming.write(data)
        tls = self._tls
        if not self.handshake_done:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.handshake_done = True
        chunks = []
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def send(self, data: bytes) -> None:
        """Encrypt ``data``; the records are then in :meth:`data_to_send`."""
        view = memoryview(data)
        while view:
            written = self._tls.write(view)
            view = view[written:]

    def data_to_send(self) -> bytes:
        """Return (and forget) the ciphertext waiting to go to the client."""
        return self._outgoing.read()

    def close(self) -> bytes:
        """Start the TLS shutdown: return the ``close_notify`` alert to send
        (``b""`` if the handshake never completed). The client's own alert is
        not waited for (RFC 8446 6.1 allows closing after sending ours)."""
        if not self.handshake_done:
            return b""
        try:
            self._tls.unwrap()
        except (ssl.SSLError, OSError):
            pass  # SSLWantReadError: our alert is written, the peer's is not in
        return self._outgoing.read()

    def facts(self) -> dict[str, Any]:
        """:func:`tls_facts` of this session."""
        return tls_facts(self._tls)

"""A private Exim 4 for interoperability tests.

Debian will not install Exim beside Postfix (both are the system's
``mail-transport-agent``), so ``.ci/run`` unpacks the ``exim4-daemon-light``
package into ``.ci/cache/exim/`` and installs its libraries and the
``Debian-exim`` user; :func:`exim_binary` finds that binary (or
``$BONZO_EXIM``, or an installed ``exim4``).

An instance is one temporary directory: ``exim.conf``, ``spool/`` and
``log/mainlog``. The daemon runs in the foreground (``-bdf``), listens on one
port of 127.0.0.1 for injection, does no DNS or ident lookups, and passes
everything on along its route with a ``manualroute`` router (``self = send``,
the transport's ``allow_localhost``): SMTP (``hosts_require_tls``,
``protocol = smtps``, AUTH PLAIN from ``client_send``) or LMTP (the smtp
transport's ``protocol = lmtp`` over TCP, the ``lmtp`` transport on a Unix
socket). ``hosts_try_chunking`` keeps its default, so Exim sends BDAT to a
server that offers CHUNKING. Mail for its own host name (``exim.test``) is
discarded (``:blackhole:``), where the DSNs of bounced mail go when the
sender is there::

    with Exim(SMTPRoute(port=bonzo_port)) as exim:
        sub = exim.send("me@exim.test", ["you@example.com"], message)
        assert exim.wait(sub)["you@example.com"].status == "sent"

Each instance has its own spool, so its retry database starts empty.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .peers import (
    DEADLINE,
    ROOT,
    Delivery,
    LMTPRoute,
    Peer,
    PeerError,
    Route,
    SMTPRoute,
    processes_with,
    reply_code,
    stage_of,
)

USER = "Debian-exim"
#: Where ``.ci/run`` unpacks the package.
CACHED_BINARY = ROOT / ".ci" / "cache" / "exim" / "usr" / "sbin" / "exim4"

# "2026-12-04 22:45:01 1tAbCd-000Ab1-Xy => rcpt <orig> R=... T=... ..."
_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? (?:[-+]\d{4} )?(?:\[\d+\] )?"
    r"(?P<id>[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}) "
    r"(?P<flag>=>|->|\*\*|==) (?P<rcpt>\S+)(?: <(?P<orig>[^>]+)>)? (?P<rest>.*)$"
)
_SMTP_ERROR = re.compile(
    r"SMTP error from remote (?:mail server|server) after (?P<cmd>.+?): (?P<reply>[2-5]\d\d\b.*)$"
)
_LMTP_ERROR = re.compile(r"LMTP error after (?P<cmd>.+?): (?P<reply>[2-5]\d\d\b.*)$")
_CONFIRMATION = re.compile(r' C="(?P<reply>(?:[^"\\]|\\.)*)"')
_HOST = re.compile(r" H=(?P<host>\S+(?: \[[^\]]+\](?::\d+)?)?)")
_STATUSES = {"=>": "sent", "->": "sent", "**": "bounced", "==": "deferred"}


def exim_binary() -> str | None:
    """The Exim binary to run: ``$BONZO_EXIM``, the one ``.ci/run``
    unpacked, or an installed one."""
    candidates = [os.environ.get("BONZO_EXIM"), str(CACHED_BINARY)]
    candidates += [shutil.which("exim4"), shutil.which("exim")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why a private Exim cannot run here, or ``None`` when it can."""
    binary = exim_binary()
    if binary is None:
        return f"Exim is not unpacked in {CACHED_BINARY.parent.parent.parent} (run bash .ci/run)"
    if os.geteuid() != 0:
        return "a private Exim needs root (it runs deliveries as Debian-exim)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"there is no {USER} user (bash .ci/run adds it)"
    try:
        result = subprocess.run(
            [binary, "-C", "/dev/null", "-bV"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=DEADLINE,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{binary} does not run: {exc}"
    if result.returncode != 0 or b"Exim version" not in result.stdout:
        # A missing library, typically (.ci/run installs them).
        output = (result.stdout + result.stderr).decode(errors="replace").strip()
        return f"{binary} -bV failed ({result.returncode}): {output[-300:]}"
    return None


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def parse_status(line: str) -> Delivery | None:
    """A delivery status from one line of Exim's mainlog, or ``None``.

    ``=>`` and ``->`` (more recipients of the same delivery) are ``sent``,
    ``==`` ``deferred``, ``**`` ``bounced``. Blackholed local mail is
    ``sent`` with no code.
    """
    match = _LINE.match(line)
    if match is None:
        return None
    rest = match["rest"]
    status = _STATUSES[match["flag"]]
    reply, stage = rest, None
    error = _SMTP_ERROR.search(rest) or _LMTP_ERROR.search(rest)
    confirmation = _CONFIRMATION.search(rest)
    if error is not None:
        reply, stage = error["reply"], stage_of(error["cmd"])
        if error.re is _LMTP_ERROR and stage == "DATA":
            # The smtp transport's LMTP mode says "after DATA" for the
            # per-recipient replies that follow the final dot.
            stage = "end of data"
    elif confirmation is not None:
        reply = _unquote(confirmation["reply"])
    elif status != "sent":
        # "defer (111): Connection refused", "...: retry time not reached".
        reply = rest.split(": ", 1)[1] if ": " in rest else rest
    code, dsn = reply_code(reply)
    host = _HOST.search(rest)
    return Delivery(
        queue_id=match["id"],
        # "=> :blackhole: <a@b>", "=> final <original>": the address the
        # message was sent to is the one in brackets.
        recipient=match["orig"] or match["rcpt"],
        status=status,  # type: ignore[arg-type]
        reply=reply,
        code=code,
        dsn=dsn,
        stage=stage,
        relay=host["host"] if host else None,
        line=line,
    )


def _expansion_literal(text: str) -> str:
    """``text`` as a literal in an Exim string expansion (and one line)."""
    if "\n" in text or "\r" in text:
        raise ValueError("no line breaks in Exim settings")
    return re.sub(r"([\\$])", r"\\\1", text)


class Exim(Peer):
    """A private Exim: SMTP in on :attr:`port`, out along ``route``.

    :arg route: where mail for other domains goes (``None``: nowhere; it
        bounces as unroutable).
    :arg hostname: ``primary_hostname``; mail for it is discarded.
    :arg accept_domains: more domains whose mail is accepted and discarded.
    :arg transport_options: more options for the outgoing transport, one
        ``name = value`` line each (``hosts_try_chunking =`` turns CHUNKING off).
    :arg main: more main-section lines, added after the instance's own.
    :arg binary: the Exim to run (default: :func:`exim_binary`).
    :arg keep: keep the directory after :meth:`stop` (default:
        ``BONZO_INTEROP_KEEP=1``).
    """

    name = "exim"
    queued_pattern = re.compile(r"\bid=(\S+)")

    def __init__(
        self,
        route: Route | None = None,
        *,
        hostname: str = "exim.test",
        accept_domains: Sequence[str] = (),
        transport_options: Sequence[str] = (),
        main: Sequence[str] = (),
        binary: str | None = None,
        keep: bool | None = None,
    ) -> None:
        super().__init__(route, hostname, keep)
        #: The Exim binary (:func:`exim_binary`; a missing one fails at start).
        self.binary = binary or exim_binary() or "/usr/sbin/exim4"
        self.accept_domains = tuple(accept_domains)
        self.transport_options = tuple(transport_options)
        self.extra_main = tuple(main)
        self.config_path = self.directory / "exim.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "log" / "mainlog"

    # ------------------------------------------------------- configuration
    def config(self) -> str:
        """The text of this instance's configuration file."""
        top = self.directory
        local = " : ".join([self.hostname, *self.accept_domains])
        main = [
            f"exim_path = {self.binary}",
            f"exim_user = {USER}",
            f"exim_group = {USER}",
            f"primary_hostname = {self.hostname}",
            f"qualify_domain = {self.hostname}",
            f"spool_directory = {top / 'spool'}",
            f"log_file_path = {top / 'log'}/%slog",
            f"pid_file_path = {top / 'exim.pid'}",
            f"daemon_smtp_ports = {self.port}",
            "local_interfaces = <; 127.0.0.1",
            f"smtp_banner = $smtp_active_hostname ESMTP instance {self.token}",
            # No reverse DNS or ident lookups of clients, no TLS offered.
            "host_lookup =",
            "rfc1413_hosts =",
            "tls_advertise_hosts =",
            "keep_environment =",
            "log_selector = +smtp_confirmation +received_recipients +outgoing_port"
            " +tls_certificate_verified",
            f"domainlist local_domains = {local}",
            "acl_smtp_rcpt = acl_rcpt",
            *self.extra_main,
        ]
        transport = ["driver = smtp", "allow_localhost", "hosts_try_dane ="]
        router = ["driver = manualroute", "domains = ! +local_domains", "transport = outgoing"]
        authenticators: list[str] = []
        route = self.route
        if isinstance(route, SMTPRoute):
            router += [f"route_list = * {route.host}", "self = send"]
            transport.append(f"port = {route.port}")
            if route.implicit_tls:
                transport.append("protocol = smtps")
            elif route.tls:
                transport.append("hosts_require_tls = *")
            if route.username is not None:
                assert route.password is not None
                transport.append("hosts_require_auth = *")
                secret = "^".join(
                    _expansion_literal(part).replace("^", "^^")
                    for part in ("", route.username, route.password)
                )
                authenticators = [
                    "client_plain:",
                    "  driver = plaintext",
                    "  public_name = PLAIN",
                    f"  client_send = {secret}",
                ]
        elif isinstance(route, LMTPRoute) and route.path is None:
            router += [f"route_list = * {route.host}", "self = send"]
            transport += ["protocol = lmtp", f"port = {route.port}"]
        elif isinstance(route, LMTPRoute):
            router = ["driver = accept", "domains = ! +local_domains", "transport = outgoing"]
            # A local transport takes one recipient a time unless batched.
            transport = ["driver = lmtp", f"socket = {route.path}", f"user = {USER}"]
            transport.append("batch_max = 100")
        else:
            router = ["driver = redirect", "domains = ! +local_domains", "allow_fail"]
            router.append("data = :fail: no route configured in this test")
        transport += list(self.transport_options)
        sections = [
            "\n".join(main),
            "begin acl\nacl_rcpt:\n  accept",
            "begin routers\n"
            "local_discard:\n  driver = redirect\n  domains = +local_domains\n"
            "  data = :blackhole:\n"
            "outgoing:\n" + "".join(f"  {line}\n" for line in router) + "  no_more",
            "begin transports\noutgoing:\n" + "\n".join(f"  {line}" for line in transport),
            "begin retry\n*  *  F,2h,15m; G,16h,1h,1.5; F,4d,6h",
            "begin authenticators\n" + "\n".join(authenticators),
        ]
        return "# A private Exim for one of Bonzo's interop tests.\n" + "\n\n".join(sections) + "\n"

    def configure(self) -> None:
        for sub in ("spool", "log"):
            path = self.directory / sub
            path.mkdir(mode=0o750, exist_ok=True)
            # The daemon's receiving and delivery processes run as Debian-exim.
            shutil.chown(path, USER, USER)
        self.config_path.write_text(self.config())

    # ---------------------------------------------------------------- run
    def exim(self, *args: str) -> list[str]:
        """The command line of this Exim binary with this configuration."""
        return [self.binary, "-C", str(self.config_path), *args]

    def command(self) -> list[str]:
        return self.exim("-bdf")

    def shutdown(self, timeout: float) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def leftover_groups(self) -> list[int]:
        # Delivery processes re-run the binary with "-C <our config>"; one
        # that made itself a group of its own is found that way.
        groups = set()
        for pid in processes_with(str(self.config_path)):
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        return sorted(groups)

    def flush(self, timeout: float = DEADLINE) -> None:
        """``exim -qff``: one queue run now, frozen messages and retry times
        ignored (in the foreground: done when it returns)."""
        result = subprocess.run(
            self.exim("-qff"),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            start_new_session=True,  # its deliveries: not in the test's process group
        )
        if result.returncode != 0:
            raise PeerError(f"exim -qff: {result.returncode} {result.stderr!r}")

    def parse_line(self, line: str) -> Delivery | None:
        return parse_status(line)

"""A private Postfix instance for interoperability tests.

Everything lives in one temporary directory: ``etc/`` (``main.cf``,
``master.cf``, maps), ``queue/``, ``data/`` and ``maillog`` (Postfix logs to
that file through ``postlogd``: no syslog needed). It listens on one port of
127.0.0.1, does no DNS lookups (``smtp_dns_support_level = disabled``, no
peer-name lookups), runs no service chrooted, and passes mail on along its
route: ``relayhost = [127.0.0.1]:PORT`` for :class:`~peers.SMTPRoute`
(STARTTLS with ``smtp_tls_security_level = encrypt``, SASL from a password
map), ``lmtp:inet:`` or ``lmtp:unix:`` for :class:`~peers.LMTPRoute`.

Mail for its own host name (``postfix.test``) and for ``accept_domains`` is
accepted and thrown away (``discard``): use a sender there, and the DSNs
Postfix sends for bounced recipients end there instead of at the route.
``recipient_access`` refuses chosen recipients at RCPT, for a Postfix used as
a downstream server::

    with Postfix(SMTPRoute(port=bonzo_port)) as postfix:
        sub = postfix.send("me@postfix.test", ["you@example.com"], message)
        assert postfix.wait(sub)["you@example.com"].status == "sent"

Postfix's master must start as root; :func:`unavailable_reason` says why an
instance cannot run here.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .peers import DEADLINE, Delivery, LMTPRoute, Peer, PeerError, Route, SMTPRoute, alive, stage_of

POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"

# master.cf: every service Postfix needs for SMTP in, relay/LMTP/discard out,
# bounces and logging; chroot (5th column) off everywhere, so the instance's
# paths are the real ones.
MASTER_SERVICES = """\
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
lmtp      unix  - - n - - lmtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

# "QUEUEID: to=<rcpt>, [orig_to=<...>,] relay=..., ..., dsn=X.Y.Z, status=word (text)"
_STATUS = re.compile(
    r"postfix/(?P<agent>[\w-]+)\[\d+\]: (?P<qid>[0-9A-Za-z]+): to=<(?P<rcpt>[^>]*)>,"
    r".*? relay=(?P<relay>[^,]*),.*? dsn=(?P<dsn>[245]\.\d{1,3}\.\d{1,3}),"
    r" status=(?P<status>sent|deferred|bounced) \((?P<text>.*)\)$"
)
# "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 text (in reply to RCPT TO command)"
_SAID = re.compile(r"^host \S+ said: (?P<reply>.*?)(?: \(in reply to (?P<stage>.+) command\))?$")


def unavailable_reason() -> str | None:
    """Why a private Postfix cannot run here, or ``None`` when it can."""
    if not os.path.exists(POSTFIX):
        return "Postfix is not installed (bash .ci/run installs it)"
    if os.geteuid() != 0:
        return "a private Postfix needs root (its master starts as root)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user (reinstall the postfix package)"
    return None


def parse_status(line: str) -> Delivery | None:
    """A delivery status from one line of Postfix's log, or ``None``."""
    match = _STATUS.search(line)
    if match is None:
        return None
    text = match["text"]
    code = stage = None
    reply = text
    said = _SAID.match(text)
    if said is not None:
        reply = said["reply"]
        stage = stage_of(said["stage"]) if said["stage"] else None
    if match["status"] == "sent" or said is not None:
        # "sent" quotes the server's final reply (or the discard reason).
        found = re.match(r"([2-5]\d\d)\b", reply)
        code = int(found.group(1)) if found else None
    return Delivery(
        queue_id=match["qid"],
        recipient=match["rcpt"],
        status=match["status"],  # type: ignore[arg-type]
        reply=reply,
        code=code,
        dsn=match["dsn"],
        stage=stage,
        relay=match["relay"],
        line=line,
    )


class Postfix(Peer):
    """A private Postfix: SMTP in on :attr:`port`, out along ``route``.

    :arg route: where mail for other domains goes (``None``: nowhere; such
        recipients are refused at RCPT with ``550 5.3.0 ... no route``).
    :arg hostname: ``myhostname``; mail for it is discarded.
    :arg accept_domains: more domains whose mail is accepted and discarded
        (Postfix as the final destination).
    :arg recipient_access: address (or domain) → access action at RCPT,
        such as ``"450 4.2.1 Try later"`` or ``"550 5.1.1 No such user"``.
    :arg main: more ``main.cf`` parameters; they override the instance's.
    :arg keep: keep the directory after :meth:`stop` (default:
        ``BONZO_INTEROP_KEEP=1``).
    """

    name = "postfix"
    queued_pattern = re.compile(r"queued as ([0-9A-Za-z]+)")

    def __init__(
        self,
        route: Route | None = None,
        *,
        hostname: str = "postfix.test",
        accept_domains: Sequence[str] = (),
        recipient_access: Mapping[str, str] | None = None,
        main: Mapping[str, str] | None = None,
        keep: bool | None = None,
    ) -> None:
        super().__init__(route, hostname, keep)
        self.accept_domains = tuple(accept_domains)
        self.recipient_access = dict(recipient_access or {})
        self.extra_main = dict(main or {})
        self.config_directory = self.directory / "etc"
        #: The master daemon's process id, once started.
        self.master_pid: int | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "maillog"

    # ------------------------------------------------------- configuration
    def main_cf(self) -> dict[str, str]:
        """The ``main.cf`` parameters of this instance."""
        etc, top = self.config_directory, self.directory
        destinations = ", ".join(["$myhostname", *self.accept_domains])
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(top / "queue"),
            "data_directory": str(top / "data"),
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(top),
            "myhostname": self.hostname,
            "mydomain": self.hostname,
            "myorigin": "$myhostname",
            "mydestination": destinations,
            # Local mail is thrown away: no mailboxes, no aliases, no users.
            "local_transport": "discard:local",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_banner": f"$myhostname ESMTP instance {self.token}",
            "smtpd_peername_lookup": "no",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtp_tls_loglevel": "1",
            "relayhost": "",
            "default_transport": "error:5.3.0 no route configured in this test",
        }
        if self.recipient_access:
            params["smtpd_recipient_restrictions"] = (
                f"check_recipient_access texthash:{etc / 'recipient_access'}"
            )
        route = self.route
        if isinstance(route, SMTPRoute):
            params["relayhost"] = f"[{route.host}]:{route.port}"
            params["default_transport"] = "smtp"
            if route.tls or route.implicit_tls:
                params["smtp_tls_security_level"] = "encrypt"
            if route.implicit_tls:
                params["smtp_tls_wrappermode"] = "yes"
            if route.username is not None:
                params["smtp_sasl_auth_enable"] = "yes"
                params["smtp_sasl_password_maps"] = f"texthash:{etc / 'sasl_passwd'}"
                # The default also forbids plaintext mechanisms; PLAIN is the
                # one every server has.
                params["smtp_sasl_security_options"] = "noanonymous"
                params["smtp_sasl_tls_security_options"] = "noanonymous"
                params["smtp_sasl_mechanism_filter"] = "plain, login"
        elif isinstance(route, LMTPRoute):
            if route.path is not None:
                transport = f"lmtp:unix:{route.path}"
            else:
                transport = f"lmtp:inet:[{route.host}]:{route.port}"
            params["default_transport"] = transport
            params["relay_transport"] = transport
        params.update(self.extra_main)
        return params

    def master_cf(self) -> str:
        """The ``master.cf`` of this instance: its SMTP port and the services."""
        return f"{self.port_address} inet n - n - - smtpd\n" + MASTER_SERVICES

    @property
    def port_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def configure(self) -> None:
        etc = self.config_directory
        for sub in ("etc", "queue", "data"):
            (self.directory / sub).mkdir(mode=0o755, exist_ok=True)
        # Postfix creates the queue's subdirectories at start; the data
        # directory (TLS session cache, ...) belongs to its mail owner.
        shutil.chown(self.directory / "data", "postfix")
        text = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        (etc / "main.cf").write_text(text)
        (etc / "master.cf").write_text(self.master_cf())
        if self.recipient_access:
            lines = "".join(f"{key} {value}\n" for key, value in self.recipient_access.items())
            (etc / "recipient_access").write_text(lines)
        route = self.route
        if isinstance(route, SMTPRoute) and route.username is not None:
            secret = etc / "sasl_passwd"
            secret.write_text(f"[{route.host}]:{route.port} {route.username}:{route.password}\n")
            # Read by the smtp client, which runs as the postfix user.
            shutil.chown(secret, "root", "postfix")
            secret.chmod(0o640)

    # ---------------------------------------------------------------- run
    def command(self) -> list[str]:
        # start-fg: the master stays our child's child (not a daemon), in our
        # process group, after the same checks as "postfix start".
        return [POSTFIX, "-c", str(self.config_directory), "start-fg"]

    def started(self) -> None:
        pid_file = self.directory / "queue" / "pid" / "master.pid"
        self.master_pid = int(pid_file.read_text().strip())

    def leftover_groups(self) -> list[int]:
        # The master calls setsid(): its group (it and its services) is not
        # the group of the start-fg script we started.
        pid = self.master_pid
        return [pid] if pid is not None and alive(pid) else []

    def shutdown(self, timeout: float) -> None:
        result = subprocess.run(
            [POSTFIX, "-c", str(self.config_directory), "stop"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise PeerError(f"postfix stop: {result.returncode} {result.stderr!r}")

    def flush(self, timeout: float = DEADLINE) -> None:
        """``postqueue -f``: try the deferred mail again now."""
        result = subprocess.run(
            [POSTQUEUE, "-c", str(self.config_directory), "-f"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise PeerError(f"postqueue -f: {result.returncode} {result.stderr!r}")

    def parse_line(self, line: str) -> Delivery | None:
        return parse_status(line)

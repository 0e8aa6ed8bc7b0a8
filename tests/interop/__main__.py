"""Run one private peer by hand, as the tests do (as root, in ``tests/``)::

    python3 -m interop postfix --smtp 2525              # relay to 127.0.0.1:2525
    python3 -m interop exim --smtp 2525 --tls --user u --password p
    python3 -m interop postfix --lmtp 2424              # or --lmtp-socket PATH

It prints the peer's own SMTP port, directory and log, then runs until
Ctrl-C (or ``--seconds``) and stops it. Inject mail with swaks or smtplib
into the printed port; watch the log.
"""

from __future__ import annotations

import argparse
import sys
import time

from .exim import Exim
from .exim import unavailable_reason as exim_unavailable
from .peers import LMTPRoute, Route, SMTPRoute
from .postfix import Postfix
from .postfix import unavailable_reason as postfix_unavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m interop", description=__doc__.split("\n")[0])
    parser.add_argument("peer", choices=["postfix", "exim"])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--smtp", type=int, metavar="PORT", help="relay by SMTP to 127.0.0.1:PORT")
    where.add_argument("--lmtp", type=int, metavar="PORT", help="deliver by LMTP to 127.0.0.1:PORT")
    where.add_argument("--lmtp-socket", metavar="PATH", help="deliver by LMTP to a Unix socket")
    parser.add_argument("--tls", action="store_true", help="require STARTTLS (with --smtp)")
    parser.add_argument("--implicit-tls", action="store_true", help="TLS on connect (with --smtp)")
    parser.add_argument("--user", help="AUTH PLAIN as this user (with --smtp and --password)")
    parser.add_argument("--password")
    parser.add_argument("--seconds", type=float, default=3600, help="stop after this long")
    parser.add_argument("--keep", action="store_true", help="keep the directory afterwards")
    args = parser.parse_args(argv)

    route: Route | None = None
    if args.smtp is not None:
        route = SMTPRoute(
            args.smtp,
            tls=args.tls,
            implicit_tls=args.implicit_tls,
            username=args.user,
            password=args.password,
        )
    elif args.lmtp is not None:
        route = LMTPRoute(port=args.lmtp)
    elif args.lmtp_socket is not None:
        route = LMTPRoute(path=args.lmtp_socket)

    reason = postfix_unavailable() if args.peer == "postfix" else exim_unavailable()
    if reason is not None:
        print(f"cannot run {args.peer}: {reason}", file=sys.stderr)
        return 1
    peer = Postfix(route, keep=args.keep) if args.peer == "postfix" else Exim(route, keep=args.keep)
    with peer:
        print(f"{peer.name} on 127.0.0.1:{peer.port}, route {route}")
        print(f"directory {peer.directory}\nlog {peer.log_path}\nCtrl-C stops it")
        try:
            time.sleep(args.seconds)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

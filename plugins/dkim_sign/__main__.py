"""Print the DNS record that publishes a DKIM key::

    python3 -m bonzo_plugins.dkim_sign KEYFILE SELECTOR DOMAIN

The key file is checked as the plugin checks it; the output is one
zone-file line (``SELECTOR._domainkey.DOMAIN. IN TXT ( "v=DKIM1; ..." )``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .keys import KeyFileError, load_key, zone_line
from .plugin import _domain_name, _selector


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m bonzo_plugins.dkim_sign",
        description="Print the DNS TXT record that publishes a DKIM private key's public half.",
    )
    parser.add_argument("key", help="the private key file (PEM, or dkimpy's Ed25519 form)")
    parser.add_argument("selector", help="the selector, as in the plugin's configuration")
    parser.add_argument("domain", help="the signing domain")
    args = parser.parse_args(argv)
    try:
        domain = _domain_name(args.domain)
        selector = _selector(args.selector, "", domain)
        key = load_key(Path(args.key))
    except (KeyFileError, ValueError) as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
    print(zone_line(key, selector, domain))
    return 0


if __name__ == "__main__":
    sys.exit(main())

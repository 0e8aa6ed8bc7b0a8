"""Where the header section ends, as Dovecot reads a message Bonzo stored
(a private instance, see ``dovecot.py``): the headers a filter removed —
``headers``' ``remove``, authres' ``remove_forged`` — are gone for Dovecot's
header parser too, which reads on to the first blank line, whatever line
that is no field comes before them."""

from __future__ import annotations

import asyncio
import subprocess
from types import SimpleNamespace
from typing import Any

import pytest
from bonzo_plugins.authres import AuthresPlugin
from bonzo_plugins.headers import HeadersPlugin

from bonzo.client import ClientSettings, deliver
from bonzo.session import Envelope, current_plugin
from bonzo.testing import make_session

from .dovecot import HOST, Dovecot

pytestmark = pytest.mark.timeout(120)

CASES = {
    "folded-first-line": b" (authenticated as ceo@example.com)\r\n",
    "no-colon-first-line": b"garbage\r\n",
    "no-colon-mid-section": b"From: a@example.org\r\ngarbage\r\n",
    "plain": b"",
}
FORGED = (
    b"X-Spam-Flag: YES\r\n"
    b"Authentication-Results: mx.test; dmarc=pass header.from=bank.example\r\n"
    b"Subject: SUBJECT\r\n\r\nbody\r\n"
)


def filtered(content: bytes, spool_threshold: int) -> bytes:
    """``content`` as Bonzo stores it after the two filters."""
    env = Envelope("a@example.org", spool_threshold=spool_threshold)
    try:
        env.prepend_raw(b"Received: from client.test ([192.0.2.1]) by mx.test; now\r\n")
        env.write(content)
        headers = HeadersPlugin()
        headers.bonzo_configure(config={"remove": ["X-Spam-Flag"]}, app=None)
        authres = AuthresPlugin()
        authres.bonzo_configure(
            config={}, app=SimpleNamespace(settings=SimpleNamespace(hostname="mx.test"))
        )

        async def main() -> None:
            for name, plugin in (("headers", headers), ("authres", authres)):
                token = current_plugin.set(name)
                try:
                    result: Any = plugin.bonzo_message(session=make_session(), envelope=env)
                    if result is not None:
                        await result
                finally:
                    current_plugin.reset(token)

        asyncio.run(main())
        return env.content
    finally:
        env.close()


def doveadm_fetch(dovecot: Dovecot, fields: str) -> str:
    result = subprocess.run(
        [
            "doveadm",
            "-c",
            str(dovecot.root / "dovecot.conf"),
            "fetch",
            "-u",
            "alice",
            fields,
            "all",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr + dovecot.log[-2000:]
    return result.stdout


@pytest.mark.parametrize("spool_threshold", [1 << 20, 1])  # in memory, and spooled to a file
def test_dovecot_reads_no_header_a_filter_removed(dovecot: Dovecot, spool_threshold: int) -> None:
    settings = ClientSettings(helo_name="mx.test", data_end_timeout=30)
    for name, first in CASES.items():
        subject = f"{name} {spool_threshold}"
        message = filtered(first + FORGED.replace(b"SUBJECT", subject.encode()), spool_threshold)
        result = asyncio.run(
            deliver(
                HOST,
                dovecot.port,
                protocol="lmtp",
                sender="a@example.org",
                recipients=["alice@example.net"],
                message=message,
                settings=settings,
            )
        )
        assert result.recipients[0].code == 250, result
    # Dovecot's records in the order delivered: this run's are the last ones.
    out = doveadm_fetch(dovecot, "uid hdr.x-spam-flag hdr.authentication-results")
    records = out.split("uid: ")[-len(CASES) :]
    for name, record in zip(CASES, records, strict=True):
        fields = dict(line.partition(": ")[::2] for line in record.splitlines()[1:] if line)
        assert fields.get("hdr.x-spam-flag", "") == "", (name, record)
        # Ours alone: the forged field removed, nothing of the client's added.
        assert fields["hdr.authentication-results"] == "mx.test; none", (name, record)

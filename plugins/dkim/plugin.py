"""DKIM verification (RFC 6376) of received messages, and ARC (RFC 8617) as
a result.

In :func:`~bonzo.hookspecs.bonzo_message`, each ``DKIM-Signature:`` field
(at most ``max_signatures``) is checked and recorded on
``envelope.results`` as ``dkim`` with its ``domain`` and ``selector``; the
plugin never refuses a message (``dmarc`` decides with these results). The
reading and hashing run in a worker thread, in bounded memory
(:mod:`.verify`); the keys are looked up on the event loop through Bonzo's
resolver (``app.dns``). ARC keys too: they are looked up before dkimpy
verifies the chain in a thread, so that no thread waits for a sender's DNS.

See ``README.rst`` in this directory for the configuration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from bonzo.dns import DNSError
from bonzo.hookspecs import hookimpl
from bonzo.schema import Key, Schema
from bonzo.session import Envelope, Session

from .._auth import dns_enabled, resolver_of, sanitize
from ..dkim_sign.signer import message_parts
from .verify import Prepared, arc_finish, arc_prepare, finish, prepare

__all__ = ["DkimPlugin", "KEYS", "OFF_REASON"]

log = logging.getLogger("bonzo.plugins.dkim")
_dkimpy_log = logging.getLogger("bonzo.plugins.dkim.dkimpy")


class _Findings(logging.Filter):
    """dkimpy logs what it finds in a message (a body hash mismatch...) at
    ERROR; for this server that is a result, not a fault: at most INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_dkimpy_log.addFilter(_Findings())

#: The ``[plugins.dkim]`` table (:mod:`bonzo.schema`).
SCHEMA = Schema(
    Key("max_signatures", "int", default=5, minimum=1, maximum=50,
        doc="Signatures (``DKIM-Signature:`` fields) checked per message, top "
        "first."),
    Key("min_key_bits", "int", default=1024, minimum=512, maximum=8192,
        doc="The shortest RSA key accepted (RFC 8301: verifiers must accept 1024 "
        "to 4096 bits); a shorter one gives ``policy``."),
    Key("timeout", "duration", default=5.0, minimum=0.001, maximum=60.0,
        doc="How long to wait for one key lookup (the ``[dns]`` bounds apply "
        "too)."),
    Key("arc", "bool", default=False, doc="Also verify the ARC chain (an ``arc`` result)."),
    Key("arc_max_size", "int", default=10 << 20, minimum=1024, maximum=1 << 30,
        doc="The largest message (octets; 10 MiB by default) whose ARC chain is "
        "verified (it is read into memory); a larger one gets ``arc=none``."),
)  # fmt: skip
KEYS = tuple(SCHEMA.names)
OFF_REASON = "DNS lookups are off ([dns] nameservers)"
_Name = TypeVar("_Name", str, bytes)


class DkimPlugin:
    """Verifies DKIM signatures (and ARC sets) of each message."""

    def __init__(self) -> None:
        self.max_signatures = 5
        self.min_key_bits = 1024
        self.timeout = 5.0
        self.arc = False
        self.arc_max_size = 10 << 20
        self.resolver: Any = None

    @hookimpl
    def bonzo_configure(self, config: Mapping[str, Any] | None, app: Any) -> None:
        """Validate ``[plugins.dkim]``."""
        values = SCHEMA.parse(config, app)
        self.max_signatures = values["max_signatures"]
        self.min_key_bits = values["min_key_bits"]
        self.timeout = float(values["timeout"])
        self.arc = values["arc"]
        self.arc_max_size = values["arc_max_size"]
        self.resolver = resolver_of(app)

    @hookimpl
    def bonzo_startup(self) -> None:
        if not dns_enabled(self.resolver):
            log.warning("dkim: DNS lookups are off: no signature can be verified (set [dns])")

    # ---------------------------------------------------------------- DKIM
    async def _key(self, name: str | bytes) -> bytes | None | DNSError:
        try:
            return await self.resolver.dkim_txt(name, self.timeout)  # type: ignore[no-any-return]
        except DNSError as exc:
            return exc

    async def _keys(self, names: Iterable[_Name]) -> dict[_Name, bytes | None | DNSError]:
        """The key record (or the failure) of each of ``names``, looked up on
        the event loop: one lookup per key, all at once."""
        unique = sorted(set(names))
        found = await asyncio.gather(*(self._key(n) for n in unique))
        return dict(zip(unique, found, strict=True))

    async def verify(self, envelope: Envelope) -> Prepared:
        """Check the signatures of ``envelope`` (see the module docs)."""
        loop = asyncio.get_running_loop()
        section, body, start = message_parts(envelope)

        def prepare_from_start() -> Prepared:
            body.seek(start)
            return prepare(section, body, self.max_signatures)

        prepared = await loop.run_in_executor(None, prepare_from_start)
        open_ = [s for s in prepared.signatures if not s.result]
        if not open_:
            return prepared
        keys = await self._keys(s.key_name for s in open_)
        for signature in open_:
            key = keys[signature.key_name]
            if isinstance(key, DNSError):
                signature.decide(
                    "temperror" if key.temporary else "permerror",
                    f"key {signature.key_name}: {key}",
                )
            elif key is None:
                signature.decide("permerror", f"no key at {signature.key_name}")
            else:
                signature.key = key
        await loop.run_in_executor(None, finish, prepared, self.min_key_bits)
        return prepared

    # ----------------------------------------------------------------- ARC
    async def verify_arc(self, envelope: Envelope) -> tuple[str, str]:
        """The ARC chain's validation (RFC 8617 5.2): ``pass``, ``fail`` or
        ``none``, and why. The chain is parsed and checked in a thread, its
        keys looked up on the event loop in between (:mod:`.verify`)."""
        if envelope.size + len(envelope.header_bytes) > self.arc_max_size:
            return "none", f"not checked: message over arc_max_size ({self.arc_max_size} octets)"
        loop = asyncio.get_running_loop()
        chain = await loop.run_in_executor(
            None, lambda: arc_prepare(envelope.content, self.min_key_bits)
        )
        if chain.result:
            return chain.result, chain.reason
        keys = await self._keys(chain.key_names)
        return await loop.run_in_executor(None, arc_finish, chain, keys)

    # --------------------------------------------------------------- hook
    @hookimpl
    async def bonzo_message(self, session: Session, envelope: Envelope) -> None:
        """Record one ``dkim`` result per signature (and ``arc``); never a
        verdict."""
        results = envelope.results
        if not dns_enabled(self.resolver):
            results.add("dkim", "none", OFF_REASON)
            if self.arc:
                results.add("arc", "none", OFF_REASON)
            return None
        prepared = await self.verify(envelope)
        if prepared.problem:
            results.add("dkim", "permerror", prepared.problem)
        elif not prepared.signatures:
            results.add("dkim", "none", "no signature")
        for s in prepared.signatures:
            results.add(
                "dkim",
                s.result,
                s.reason,
                domain=s.domain,
                selector=s.selector,
                algorithm=s.algorithm,
            )
            log.info(
                "dkim: message %s: d=%s s=%s: %s (%s)",
                envelope.id,
                s.domain,
                s.selector,
                s.result,
                s.reason,
            )
        if prepared.skipped:
            log.info(
                "dkim: message %s: %d more signature(s) not checked (max_signatures = %d)",
                envelope.id,
                prepared.skipped,
                self.max_signatures,
            )
        if self.arc:
            result, reason = await self.verify_arc(envelope)
            results.add("arc", result, sanitize(reason))
            log.info("dkim: message %s: arc=%s (%s)", envelope.id, result, sanitize(reason))
        return None

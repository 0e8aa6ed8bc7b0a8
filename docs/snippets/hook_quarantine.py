"""Set aside messages from first-time senders with a suspicious subject;
throw away those an earlier scanner found a virus in."""

import asyncio
import os
from pathlib import Path

from bonzo import Accept, Discard, Quarantine, hookimpl


class Suspicious:
    @hookimpl
    def bonzo_message(self, envelope):
        scan = envelope.results.get("clamav")
        if scan is not None and scan.result == "fail":
            return Discard()
        subject = envelope.message.get("Subject", "")
        if "urgent wire transfer" in subject.lower():
            envelope.results.add("suspicious", "quarantine", "wire transfer subject")
            return Quarantine("wire transfer subject")
        return None


class QuarantineDirectory:
    """Owner of bonzo_quarantine: one durable file per message."""

    def __init__(self, directory):
        self.directory = Path(directory)

    def _store(self, envelope, reason):
        path = self.directory / f"{envelope.id}.eml"
        with open(path, "xb") as f:
            f.write(f"X-Quarantine-Reason: {reason}\r\n".encode())
            envelope.write_to(f)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @hookimpl
    async def bonzo_quarantine(self, envelope, reason):
        await asyncio.to_thread(self._store, envelope, reason)
        return Accept()

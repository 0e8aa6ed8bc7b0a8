"""Deliver each message into a directory, one file per message, durably."""

import asyncio
import errno
import os
from pathlib import Path

from bonzo import Accept, errors, hookimpl


class DirectoryDelivery:
    def __init__(self, directory):
        self.directory = Path(directory)

    def _store(self, envelope):
        final = self.directory / f"{envelope.id}.eml"
        temp = self.directory / f"{envelope.id}.tmp"
        try:
            with open(temp, "xb") as f:
                envelope.write_to(f)  # Received: and added headers, then the content
                f.flush()
                os.fsync(f.fileno())
            os.rename(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fd = os.open(self.directory, os.O_RDONLY)  # make the rename durable too
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final

    @hookimpl
    async def bonzo_deliver(self, envelope):
        try:
            path = await asyncio.to_thread(self._store, envelope)  # off the event loop
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.TransientError(452, "Insufficient storage", "4.3.1") from exc
            raise  # any other fault: 451 4.3.0, logged with this plugin's name
        return Accept(f"Ok: stored as {path.name}")

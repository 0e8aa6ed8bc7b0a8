"""A journal of accepted messages: a file opened at startup, closed at shutdown,
noting each reload of the configuration."""

import asyncio

from bonzo import hookimpl


class Journal:
    def __init__(self):
        self.path = None
        self.file = None

    @hookimpl
    def bonzo_configure(self, config, app):
        path = config.get("path", "journal.log")
        if not isinstance(path, str) or not path:
            raise ValueError(f"path: expected a file name, got {path!r}")
        self.path = app.base_dir / path  # relative to the configuration file

    @hookimpl
    async def bonzo_startup(self, app):
        # In every worker process, before it serves. Raising here stops Bonzo.
        self.file = await asyncio.to_thread(open, self.path, "a", encoding="utf-8")

    @hookimpl
    def bonzo_accepted(self, envelope):
        self.file.write(f"{envelope.id} from=<{envelope.mail_from}> to={len(envelope.rcpt_tos)}\n")
        self.file.flush()

    @hookimpl
    def bonzo_reload(self, app):
        # This Journal belongs to the new configuration (SIGHUP); the old
        # one's file stays open until its sessions end and it shuts down.
        self.file.write("# configuration reloaded\n")
        self.file.flush()

    @hookimpl
    async def bonzo_shutdown(self, app):
        # After the last session has ended.
        await asyncio.to_thread(self.file.close)

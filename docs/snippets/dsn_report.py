"""Write each accepted message's DSN request (RFC 3461) as one JSON line,
for the program that later delivers, relays or bounces it."""

import json
from pathlib import Path

from bonzo import hookimpl


class DSNReport:
    # The program reading dsn.jsonl sends the reports: declared, so that
    # the server offers DSN (it does not when no plugin honours it).
    honours_dsn = True

    def __init__(self):
        self.file = Path("dsn.jsonl")

    @hookimpl
    def bonzo_configure(self, config):
        self.file = Path(config.get("file", "dsn.jsonl"))

    @hookimpl
    def bonzo_accepted(self, envelope):
        # No DSN ever goes to the null sender (RFC 3461 5.2).
        bounces = envelope.mail_from != ""
        recipients = []
        for address, dsn in zip(envelope.rcpt_tos, envelope.rcpt_dsn, strict=True):
            recipients.append(
                {
                    "to": address,
                    "notify": sorted(dsn.notify) if dsn.notify is not None else None,
                    "orcpt": [dsn.orcpt.addr_type, dsn.orcpt.address] if dsn.orcpt else None,
                    "report_success": bounces and dsn.wants("success"),
                    "report_failure": bounces and dsn.wants("failure"),
                }
            )
        record = {
            "id": envelope.id,
            "ret": envelope.dsn.ret,  # "FULL", "HDRS" or None
            "envid": envelope.dsn.envid,  # decoded from xtext, or None
            "recipients": recipients,
        }
        with self.file.open("a", encoding="ascii") as out:
            out.write(json.dumps(record) + "\n")

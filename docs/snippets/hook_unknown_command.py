"""XCLOCK, a made-up SMTP extension: the client asks for the server's time."""

import datetime

from bonzo import errors, hookimpl


class ClockExtension:
    @hookimpl
    def bonzo_ehlo_keywords(self, keywords):
        keywords.append("XCLOCK")  # advertise the extension this plugin implements
        if "HELP" in keywords:
            keywords.remove("HELP")  # and stop advertising one we do not want to

    @hookimpl
    def bonzo_unknown_command(self, session, verb, arg):
        if verb != "XCLOCK":
            return None  # not ours: another plugin, or 500 5.5.2
        if not session.esmtp:
            raise errors.SMTPError(503, "Say EHLO first", enhanced_code="5.5.1")
        if arg:
            return (501, "5.5.4", "Syntax: XCLOCK")
        now = datetime.datetime.now(datetime.timezone.utc)
        return (250, "2.0.0", now.isoformat(timespec="seconds"))

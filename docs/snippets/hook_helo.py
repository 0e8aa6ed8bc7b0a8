"""Refuse HELO/EHLO names that are not fully qualified (nor address literals)."""

from bonzo import errors, hookimpl


class RequireFqdnHelo:
    @hookimpl
    def bonzo_helo(self, session, name, esmtp):
        if "." not in name.strip(".") and not name.startswith("["):
            raise errors.PermanentError(
                "Helo command rejected: need fully-qualified hostname", 504, "5.5.2"
            )
        session.stash["helo_fqdn"] = True  # per-connection state, under our own key

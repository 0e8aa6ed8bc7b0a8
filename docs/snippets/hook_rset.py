"""Close connections that keep resetting: count RSETs, refuse the next MAIL."""

from bonzo import errors, hookimpl


class RsetLimit:
    def __init__(self, limit=5):
        self.limit = limit

    @hookimpl
    def bonzo_rset(self, session):
        session.stash["rset_limit"] = session.stash.get("rset_limit", 0) + 1

    @hookimpl
    def bonzo_mail(self, session):
        if session.stash.get("rset_limit", 0) > self.limit:
            raise errors.TransientError(421, "Too many RSET commands", "4.7.0", close=True)

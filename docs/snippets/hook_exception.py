"""When a recipient lookup cannot reach its directory server, say so: 451 4.4.3."""

from bonzo import errors, hookimpl


class DirectoryOutage:
    @hookimpl
    def bonzo_exception(self, error, hook, plugin):
        if hook == "bonzo_rcpt" and isinstance(error, (ConnectionError, TimeoutError)):
            return errors.TransientError(451, "Directory unavailable, try again later", "4.4.3")
        return None  # anything else: the default 451 4.3.0

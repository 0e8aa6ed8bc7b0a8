"""The ``passwd`` plugin: SMTP AUTH against a password file of salted scrypt hashes.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import PasswdPlugin, add_user, read_password_file

__all__ = ["PasswdPlugin", "add_user", "read_password_file"]

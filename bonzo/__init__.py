"""Bonzo is a plugin-based, extensible SMTP server built on top of Tornado."""

from __future__ import annotations

version_tuple: tuple[int | str, ...] = (0, 2, 0)
"""The version as a tuple; a trailing string is a suffix such as ``"+"`` or ``".dev1"``."""


def get_version_string() -> str:
    """Return :data:`version_tuple` as a string, e.g. ``"0.2.0"``.

    A trailing string element is appended without a dot separator, so
    ``(0, 1, 2, "+")`` gives ``"0.1.2+"``.
    """
    if isinstance(version_tuple[-1], str):
        return ".".join(map(str, version_tuple[:-1])) + version_tuple[-1]
    return ".".join(map(str, version_tuple))


version = get_version_string()
"""Current version of Bonzo."""

# A literal, so that packaging tools can read it without importing Bonzo;
# a test checks that it agrees with version_tuple.
__version__ = "0.2.0"

# The names plugin authors need, importable as ``from bonzo import hookimpl``.
from .hookspecs import Accept, Discard, Quarantine, hookimpl  # noqa: E402

__all__ = [
    "Accept",
    "Discard",
    "Quarantine",
    "hookimpl",
    "version",
    "version_tuple",
    "get_version_string",
]

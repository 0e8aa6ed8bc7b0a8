"""SMTP exceptions for response to the client.

Raise one of these from a request callback, a :class:`~bonzo.smtp.RequestHandler`
or a plugin hook to answer the current command with that reply. Anything else
raised becomes ``451 Internal confusion`` (``451 4.3.0`` in an ESMTP session)
and is logged with its traceback; exception text never reaches the client.

The original classes keep their codes, texts and ``str()`` format. New in this
version: an RFC 3463 enhanced status code (``enhanced_code``), multi-line text
(a message containing newlines, or a list of lines), and ``close`` to end the
connection after the reply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "SMTPError",
    "InternalConfusion",
    "UnrecognisedCommand",
    "BadArguments",
    "NotImplementedCommand",
    "BadSequence",
    "TransientError",
    "PermanentError",
    "default_enhanced_code",
    "enhanced_code_problem",
]

# RFC 3463 section 2: class "." subject "." detail, 1 to 3 digits each.
_ENHANCED_CODE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")


def enhanced_code_problem(status_code: int, enhanced_code: Any) -> str | None:
    """Why ``enhanced_code`` cannot go with ``status_code`` in a reply, or
    ``None`` if it can: it must be an RFC 3463 code (``"5.7.1"``: class,
    subject and detail, one to three digits each) of the same class as the
    status code. Anything else would be written into the reply line as it
    is, where a line break would start a forged reply."""
    if not isinstance(enhanced_code, str) or not _ENHANCED_CODE.fullmatch(enhanced_code):
        return f"enhanced code {enhanced_code!r} is not an RFC 3463 code such as '5.7.1'"
    if enhanced_code[0] != str(status_code)[0]:
        return f"enhanced code {enhanced_code!r} does not match status {status_code}"
    return None


def default_enhanced_code(status_code: int) -> str:
    """Return the RFC 3463 "undefined status" code for a basic reply code.

    ``250`` → ``2.0.0``, ``451`` → ``4.0.0``, ``550`` → ``5.0.0``. Replies that
    carry no enhanced code (``1xx``/``3xx``) give an empty string.
    """
    klass = status_code // 100
    if klass in (2, 4, 5):
        return f"{klass}.0.0"
    return ""


class SMTPError(Exception):
    """An exception that will turn into an SMTP error response.

    :arg int status_code: SMTP status code (e.g. ``550``).
    :arg message: text written to the client after the code. A string with
        newlines, or a sequence of strings, gives a multi-line reply; bytes
        are decoded as UTF-8 (an invalid sequence becomes U+FFFD), and any
        other object is written as its ``str()`` (as in Bonzo 0.1).
    :arg str log_message: message to be written to the log for this error
        (never to the client). May contain ``%s``-style placeholders, which
        are filled in with the remaining positional parameters; one that
        does not format with them is logged as it is, followed by them.
    :arg str enhanced_code: RFC 3463 code such as ``"5.7.1"``, used in ESMTP
        sessions. Defaults to ``X.0.0`` for the class of ``status_code``.
        Anything but ``class.subject.detail`` (one to three digits each) of
        the status code's class raises :exc:`ValueError`.
    :arg bool close: close the connection after sending the reply.

    .. versionchanged:: 0.2
       Added ``enhanced_code``, ``close`` and multi-line messages.
    """

    def __init__(
        self,
        status_code: int,
        message: str | Sequence[str] | object,
        log_message: str | None = None,
        *args: Any,
        enhanced_code: str | None = None,
        close: bool = False,
    ) -> None:
        super().__init__()
        if not 200 <= status_code <= 599:
            raise ValueError(f"SMTP status code out of range: {status_code!r}")
        if enhanced_code is not None:
            problem = enhanced_code_problem(status_code, enhanced_code)
            if problem is not None:
                raise ValueError(problem)
        self.status_code = status_code
        self.message = _text(message)
        self.log_message = log_message
        # As in the original API, ``args`` holds the log_message parameters.
        self.args = args
        self.enhanced_code = enhanced_code
        self.close = close

    @property
    def lines(self) -> list[str]:
        """The reply text as a list of lines (one for a single-line reply)."""
        return self.message.split("\n")

    def __repr__(self) -> str:
        extra = f", enhanced_code={self.enhanced_code!r}" if self.enhanced_code else ""
        return f"{type(self).__name__}({self.status_code}, {self.message!r}{extra})"

    def __str__(self) -> str:
        message = "SMTP %d: %s" % (self.status_code, self.message)
        log = self.log_text()
        if log is None:
            return message
        return message + " (" + log + ")"

    def log_text(self) -> str | None:
        """:attr:`log_message` with its arguments filled in, for a log line
        (``None`` without one). A message that does not format with them
        (a stray ``%``, too few arguments) is given as it is, followed by the
        arguments: the reply must still go out, whatever the log says.
        """
        if not self.log_message:
            return None
        try:
            # Formatted even without arguments, as Bonzo 0.1 did ("%%" is "%").
            return str(self.log_message % self.args)
        except (TypeError, ValueError, KeyError):
            if not self.args:
                return str(self.log_message)
            return f"{self.log_message} {self.args!r}"


def _text(message: object) -> str:
    """The reply text of an error's ``message``: a string as it is, the
    lines of a sequence of strings joined, bytes decoded, anything else its
    ``str()`` (Bonzo 0.1 wrote any object with ``%s``)."""
    if isinstance(message, str):
        return message
    if isinstance(message, (bytes, bytearray, memoryview)):
        return bytes(message).decode("utf-8", "replace")
    if isinstance(message, Sequence) and all(isinstance(line, str) for line in message):
        return "\n".join(message)
    return str(message)


class InternalConfusion(SMTPError):
    """Used to return a ``451`` status code (``451 4.3.0`` with enhanced codes)."""

    def __init__(self) -> None:
        super().__init__(451, "Internal confusion", enhanced_code="4.3.0")


class UnrecognisedCommand(SMTPError):
    """Used to return a ``500`` status code."""

    def __init__(self) -> None:
        super().__init__(500, "Error: bad syntax", enhanced_code="5.5.2")


class BadArguments(SMTPError):
    """Used to return a ``501`` status code.

    :arg str syntax: Syntax returned to the client.
    """

    def __init__(self, syntax: str) -> None:
        super().__init__(501, "Syntax: %s" % syntax, enhanced_code="5.5.4")


class NotImplementedCommand(SMTPError):
    """Used to return a ``502`` status code.

    :arg str command: Command not implemented for the server.
    """

    def __init__(self, command: str) -> None:
        message = 'Error: command "%s" not implemented' % command
        super().__init__(502, message, enhanced_code="5.5.1")


class BadSequence(SMTPError):
    """Used to return a ``503`` status code.

    :arg str message: Message to be written to the stream and to response to
        the client.
    """

    def __init__(self, message: str) -> None:
        super().__init__(503, message, enhanced_code="5.5.1")


class TransientError(SMTPError):
    """A temporary rejection (``4xx``): the client should try again later.

    The arguments come in :class:`SMTPError`'s order — code, then text,
    then the enhanced code — all optional::

        raise TransientError(451, "Try again later", "4.7.1")

    :arg int status_code: a ``4xx`` code, ``451`` by default.
    :arg message: reply text (a sequence of strings: a multi-line reply).
    :arg str enhanced_code: defaults to ``4.0.0`` for the code's class.

    The text may also come first — ``TransientError("Try again later", 451, "4.7.1")``,
    the order of Bonzo 0.2's first releases — and is told apart by its type.

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        status_code: int | str | Sequence[str] = 451,
        message: str | Sequence[str] | int = "Try again later",
        enhanced_code: str | None = None,
        *,
        close: bool = False,
        log_message: str | None = None,
    ) -> None:
        code, text = _code_and_text(status_code, message, 451, "Try again later")
        if code // 100 != 4:
            raise ValueError(f"TransientError needs a 4xx code, not {code}")
        super().__init__(code, text, log_message, enhanced_code=enhanced_code, close=close)


class PermanentError(SMTPError):
    """A permanent rejection (``5xx``): the client must not retry as is.

    The arguments come in :class:`SMTPError`'s order — code, then text,
    then the enhanced code — all optional::

        raise PermanentError(550, "Rejected", "5.7.1")

    :arg int status_code: a ``5xx`` code, ``550`` by default.
    :arg message: reply text (a sequence of strings: a multi-line reply).
    :arg str enhanced_code: defaults to ``5.0.0`` for the code's class.

    The text may also come first — ``PermanentError("Rejected", 550, "5.7.1")``,
    the order of Bonzo 0.2's first releases — and is told apart by its type.

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        status_code: int | str | Sequence[str] = 550,
        message: str | Sequence[str] | int = "Rejected",
        enhanced_code: str | None = None,
        *,
        close: bool = False,
        log_message: str | None = None,
    ) -> None:
        code, text = _code_and_text(status_code, message, 550, "Rejected")
        if code // 100 != 5:
            raise ValueError(f"PermanentError needs a 5xx code, not {code}")
        super().__init__(code, text, log_message, enhanced_code=enhanced_code, close=close)


def _code_and_text(
    first: int | str | Sequence[str], second: str | Sequence[str] | int, code: int, text: str
) -> tuple[int, str | Sequence[str]]:
    """(code, text) from either order of the first two arguments."""
    if isinstance(first, bool) or isinstance(second, bool):
        raise TypeError("an SMTP code is an int, not a bool")
    if isinstance(first, int):
        if isinstance(second, int):
            raise TypeError("give one status code and one text")
        return first, second
    # The text first (the earlier order): the code, if any, second.
    if isinstance(second, int):
        return second, first
    if second != text:
        raise TypeError(f"expected a status code, not {second!r}")
    return code, first

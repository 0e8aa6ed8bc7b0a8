"""bonzo-tagger: tag messages whose subject has a keyword; refuse forbidden words."""

from __future__ import annotations

from typing import Any

from bonzo import errors, hookimpl

__all__ = ["TaggerPlugin"]

_KEYS = {"keywords", "header", "refuse"}


def _words(config: dict[str, Any], key: str) -> list[str]:
    value = config.get(key, [])
    if not isinstance(value, list) or not all(isinstance(w, str) and w for w in value):
        raise ValueError(f"{key}: expected a list of non-empty strings, got {value!r}")
    return [w.lower() for w in value]


def _text(part: Any) -> str:
    """The text of a MIME part. A charset Python does not know (mail
    programs write ``unknown-8bit``) must not fail the hook, which would
    answer 451 to that message at every attempt: its bytes are read as UTF-8,
    with a replacement character for what does not decode."""
    try:
        return str(part.get_content())
    except (LookupError, UnicodeError):
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


class TaggerPlugin:
    """Adds a header naming the keywords found in the subject; refuses a
    message whose body contains a forbidden word with ``550 5.7.1``."""

    def __init__(self) -> None:
        self.keywords: list[str] = []
        self.refuse: list[str] = []
        self.header = "X-Bonzo-Tag"

    @hookimpl
    def bonzo_configure(self, config: dict[str, Any]) -> None:
        unknown = set(config) - _KEYS
        if unknown:
            raise ValueError(f"unknown key(s): {', '.join(sorted(unknown))}")
        self.keywords = _words(config, "keywords")
        self.refuse = _words(config, "refuse")
        header = config.get("header", self.header)
        if not isinstance(header, str) or not header.replace("-", "").isalnum():
            raise ValueError(f"header: expected a header name, got {header!r}")
        self.header = header

    @hookimpl
    def bonzo_message(self, envelope: Any) -> None:
        message = envelope.message
        if self.refuse:
            body = message.get_body(preferencelist=("plain",))
            text = _text(body).lower() if body is not None else ""
            hit = next((w for w in self.refuse if w in text), None)
            if hit is not None:
                raise errors.PermanentError(550, "Message refused by content policy", "5.7.1")
        subject = str(message.get("Subject", "")).lower()
        found = [w for w in self.keywords if w in subject]
        if found:
            envelope.add_header(self.header, ", ".join(found))

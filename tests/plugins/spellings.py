"""Spellings of one mailbox that text comparison tells apart and the core's
canonical form (:class:`bonzo.address.Address`) does not.

Policy that matched the text as sent could be bypassed with any of them
(``ceo@ｅｘａｍｐｌｅ.ｃｏｍ`` past a rule denying ``ceo@example.com``), while the
Maildir folder was the same; the bundled plugins' tests run their rules
against every one.
"""

from __future__ import annotations

import pytest

SOFT_HYPHEN = "\u00ad"
IDEOGRAPHIC_FULL_STOP = "\u3002"


def full_width(text: str) -> str:
    """``text`` with its printable ASCII characters, dots excepted, in their
    full-width forms (``example`` -> ``ｅｘａｍｐｌｅ``)."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" and c != "." else c for c in text)


def spellings(local: str, domain: str) -> dict[str, str]:
    """The four bypass spellings of ``local@domain``, by name."""
    first, dot, rest = domain.partition(".")
    half = max(1, len(first) // 2)
    return {
        "full-width": f"{local}@{full_width(domain)}",
        "ideographic-full-stop": f"{local}@{domain.replace('.', IDEOGRAPHIC_FULL_STOP)}",
        "soft-hyphen": f"{local}@{first[:half]}{SOFT_HYPHEN}{first[half:]}{dot}{rest}",
        "quoted-local-part": f'"{local}"@{domain}',
    }


def parametrize(argname: str, local: str, domain: str) -> pytest.MarkDecorator:
    """``pytest.mark.parametrize`` over the spellings of ``local@domain``, with
    readable ids."""
    cases = spellings(local, domain)
    return pytest.mark.parametrize(argname, list(cases.values()), ids=list(cases))

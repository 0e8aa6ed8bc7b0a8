"""The ``headers`` plugin: adding, removing, placeholders, injection, configuration."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from bonzo_plugins.authres import AuthresPlugin
from bonzo_plugins.headers import HeadersPlugin
from bonzo_plugins.headers.plugin import PLACEHOLDERS
from bonzo_plugins.maildir import MaildirPlugin
from bonzo_plugins.recipients import RecipientsPlugin
from plugin_testing import make_envelope, make_session, serve
from spellings import parametrize

from bonzo.session import Envelope

BODY = (
    b"Subject: hello\r\n"
    b"X-Spam-Flag: YES\r\n"
    b"X-Internal: secret\r\n"
    b"\tcontinued\r\n"
    b"From: a@example.org\r\n"
    b"\r\n"
    b"X-Spam-Flag: in the body stays\r\n"
)

_open: list[Envelope] = []


@pytest.fixture(autouse=True)
def _close_envelopes():
    yield
    while _open:
        _open.pop().close()


def configured(**table: object) -> HeadersPlugin:
    plugin = HeadersPlugin()
    plugin.bonzo_configure(config=table, app=None)
    return plugin


def call(plugin: HeadersPlugin, **kwargs: object) -> object:
    """Call bonzo_message on a running event loop, as Bonzo does, and wait
    for it if it returned an awaitable; return its verdict."""

    async def main() -> object:
        result = plugin.bonzo_message(**kwargs)  # type: ignore[arg-type]
        if result is not None:
            return await result
        return None

    return asyncio.run(main())


def run(plugin: HeadersPlugin, envelope: Envelope | None = None, **session: object) -> bytes:
    envelope = envelope or envelope_of(BODY)
    result = call(plugin, session=make_session(**session), envelope=envelope)
    assert result is None  # no verdict: later filters still run
    return envelope.content


def envelope_of(body: bytes, **kwargs: object) -> Envelope:
    envelope = make_envelope(body, **kwargs)
    _open.append(envelope)
    return envelope


def header_lines(content: bytes) -> list[bytes]:
    return content.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


# ------------------------------------------------------------------- adding
def test_add_headers_in_order():
    content = run(configured(add={"X-One": "1", "X-Two": "two words"}))
    assert content.startswith(b"X-One: 1\r\nX-Two: two words\r\nSubject: hello\r\n")


def test_placeholders_are_filled():
    plugin = configured(add={"X-Trace": "s={session_id} m={message_id} ip={remote_ip} h={helo}"})
    envelope = envelope_of(BODY)
    session = make_session(remote_ip="2001:db8::5", helo="client.example")
    call(plugin, session=session, envelope=envelope)
    expected = f"X-Trace: s={session.id} m={envelope.id} ip=2001:db8::5 h=client.example\r\n"
    assert envelope.content.startswith(expected.encode())


def test_literal_braces():
    content = run(configured(add={"X-Braces": "{{literal}} {helo}"}))
    assert content.startswith(b"X-Braces: {literal} client.example\r\n")


@pytest.mark.parametrize(
    "helo",
    [
        "evil\r\nBcc: victim@example.com",
        "evil\nX-Injected: 1",
        "evil\rX",
        "a b(c)<d>;e\"f'g\\h",
        "caf\u00e9\u2028x",
        "x\x00y",
    ],
)
def test_client_supplied_helo_cannot_inject(helo):
    content = run(configured(add={"X-Helo": "<{helo}>"}), helo=helo)
    lines = header_lines(content)
    assert lines[0].startswith(b"X-Helo: <")
    assert lines[1] == b"Subject: hello"
    value = lines[0][len(b"X-Helo: ") :]
    assert all(33 <= c <= 126 for c in value), value


def test_missing_helo_is_unknown():
    assert run(configured(add={"X-Helo": "{helo}"}), helo=None).startswith(b"X-Helo: unknown\r\n")


def test_long_helo_is_cut_to_fit_a_line():
    plugin = configured(add={"X-H": "x" * 800 + "{helo}{helo}"})
    first = header_lines(run(plugin, helo="h" * 255))[0]
    assert len(first) <= 998


def test_trace_header():
    content = run(configured(trace=True))
    assert content.startswith(b"X-Bonzo-Plugin: headers\r\nSubject: hello\r\n")
    assert not run(configured()).startswith(b"X-Bonzo-Plugin")


# ----------------------------------------------------------------- removing
def test_remove_headers_with_continuations_case_insensitively():
    content = run(configured(remove=["x-spam-flag", "X-INTERNAL"]))
    assert header_lines(content) == [b"Subject: hello", b"From: a@example.org"]
    assert content.endswith(b"\r\n\r\nX-Spam-Flag: in the body stays\r\n")


def test_remove_then_add_keeps_the_new_one():
    content = run(configured(remove=["X-Spam-Flag"], add={"X-Spam-Flag": "NO"}))
    lines = header_lines(content)
    assert lines.count(b"X-Spam-Flag: NO") == 1
    assert b"X-Spam-Flag: YES" not in lines


def test_remove_from_a_spooled_message():
    body = BODY + b"x" * 200_000 + b"\r\n"
    envelope = envelope_of(body, spool_threshold=1024)
    content = run(configured(remove=["X-Spam-Flag"], add={"X-New": "1"}), envelope)
    assert envelope.spooled
    assert content.startswith(b"X-New: 1\r\nSubject: hello\r\nX-Internal")
    assert content.endswith(b"x" * 200_000 + b"\r\n")


def test_nothing_configured_changes_nothing():
    assert run(configured()) == BODY


# --------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"adds": {}}, r"^adds: unknown key"),
        ({"add": ["X-A"]}, r"^add: expected a table, got \['X-A'\]$"),
        ({"add": {"X-A": 5}}, r"^add\.X-A: expected a string, got 5"),
        ({"add": {"X-A": "a\r\nBcc: x@example.com"}}, r"^add\.X-A: the value must be printable"),
        ({"add": {"X-A": "a\nb"}}, r"^add\.X-A: the value must be printable"),
        ({"add": {"X-A": "a\x00b"}}, r"^add\.X-A: the value must be printable"),
        ({"add": {"X-A": "caf\u00e9"}}, r"^add\.X-A: the value must be printable ASCII"),
        ({"add": {"X A": "1"}}, r"^add\.X A: 'X A' is not a valid header name"),
        ({"add": {"X:A": "1"}}, r"^add\.X:A: .* is not a valid header name"),
        ({"add": {"": "1"}}, r"^add\.: expected a header name"),
        ({"add": {"X\r\nB": "1"}}, r"^add\.'X\\r\\nB': .* is not a valid header name"),
        ({"add": {"X-A": "{nope}"}}, r"^add\.X-A: unknown placeholder \{nope\}"),
        ({"add": {"X-A": "{helo.__class__}"}}, r"^add\.X-A: unknown placeholder"),
        ({"add": {"X-A": "{helo!r}"}}, r"^add\.X-A: unknown placeholder \{helo!r\}"),
        ({"add": {"X-A": "{helo:>900}"}}, r"^add\.X-A: unknown placeholder \{helo:>900\}"),
        ({"add": {"X-A": "{0}"}}, r"^add\.X-A: unknown placeholder"),
        ({"add": {"X-A": "{helo"}}, r"^add\.X-A: .*literal brace"),
        ({"add": {"X-A": "}"}}, r"^add\.X-A: .*literal brace"),
        ({"add": {"X-A": "x" * 995}}, r"^add\.X-A: the header line would exceed 998"),
        ({"remove": "X-A"}, r"^remove: expected a list of non-empty strings"),
        ({"remove": ["X-A", ""]}, r"^remove: expected a list of non-empty strings"),
        ({"remove": ["X A"]}, r"^remove: 'X A' is not a valid header name"),
        ({"remove": ["Received"]}, r"^remove: Received headers are trace headers"),
        ({"remove": ["received"]}, r"^remove: received headers are trace headers"),
        ({"trace": "true"}, r"^trace: expected true or false"),
    ],
)
def test_configuration_errors_name_the_key(table, message):
    with pytest.raises(ValueError, match=message):
        configured(**table)


# ---------------------------------------------------------------- addresses
@parametrize("spelling", "ceo", "example.com")
def test_no_address_is_matched_or_written(spelling):
    """The plugin has no hook that receives an address and no placeholder
    that gives one, so no spelling can change what it does."""
    assert not {"bonzo_mail", "bonzo_rcpt"} & set(dir(HeadersPlugin))
    assert set(PLACEHOLDERS) == {"session_id", "message_id", "remote_ip", "helo"}
    plugin = configured(add={"X-Queue": "{message_id}"}, remove=["From"])
    for mail_from, rcpts in ((spelling, ["bob@example.com"]), ("a@example.org", [spelling])):
        envelope = envelope_of(BODY, mail_from=mail_from, rcpt_tos=rcpts)
        content = run(plugin, envelope)
        assert spelling.encode() not in content
        assert content.startswith(f"X-Queue: {envelope.id}\r\n".encode())


# ------------------------------------------------------------ end to end
def test_end_to_end(tmp_path: Path):
    headers = configured(
        add={"X-Received-By": "bonzo {session_id} from [{remote_ip}] helo={helo}"},
        remove=["X-Spam-Flag"],
        trace=True,
    )
    recipients = RecipientsPlugin()
    recipients.bonzo_configure(config={"domains": ["example.com"]}, app=None)
    maildir = MaildirPlugin()
    maildir.bonzo_configure(config={"path": str(tmp_path / "Maildir")}, app=None)
    plugins = (("recipients", recipients), ("headers", headers), ("maildir", maildir))
    with serve(*plugins) as server, server.client(helo="client.example") as client:
        assert client.sendmail("a@example.org", ["alice@example.com"], BODY) == {}
    (path,) = (tmp_path / "Maildir" / "new").iterdir()
    lines = header_lines(path.read_bytes())
    assert lines[0] == b"Return-Path: <a@example.org>"  # the maildir's envelope header
    assert lines[2].startswith(b"Received: from client.example ([127.0.0.1])")
    added = [line for line in lines if line.startswith(b"X-Received-By: ")]
    assert len(added) == 1
    assert added[0].endswith(b" from [127.0.0.1] helo=client.example")
    assert b"X-Bonzo-Plugin: headers" in lines
    assert not any(line.lower().startswith(b"x-spam-flag") for line in lines)
    assert path.read_bytes().endswith(b"\r\n\r\nX-Spam-Flag: in the body stays\r\n")


# ------------------------------------ where the header section ends, stored
AMBIGUOUS = {
    # The client's first line folds into the header Bonzo puts above it.
    "folded-first-line": b" (authenticated as ceo@example.com)\r\n",
    # A line that is no field ends Bonzo's section; a reader that reads on
    # to the first blank line would take the fields after it for headers.
    "no-colon-first-line": b"garbage\r\n",
    "no-colon-mid-section": b"From: a@example.org\r\ngarbage\r\n",
}
FORGED = (
    b"X-Spam-Flag: YES\r\n"
    b"Authentication-Results: mx.test; dmarc=pass header.from=bank.example\r\n"
    b"Subject: forged\r\n\r\nbody\r\n"
)


def strict_fields(message: bytes) -> list[tuple[str, str]]:
    """The fields a reader that reads to the first blank line sees (as an
    IMAP server or Sieve does): every unfolded line with a colon."""
    text = message.replace(b"\r\n", b"\n")
    head = b"" if text[:1] == b"\n" else text.split(b"\n\n", 1)[0]
    unfolded = re.sub(rb"\n[ \t]", b" ", head).split(b"\n")
    return [
        (name.strip().decode().lower(), value.strip().decode())
        for name, colon, value in (line.partition(b":") for line in unfolded)
        if colon
    ]


def remover_and_authres() -> tuple[tuple[str, object], ...]:
    authres = AuthresPlugin()
    authres.bonzo_configure(
        config={}, app=SimpleNamespace(settings=SimpleNamespace(hostname="mx.test"))
    )
    return (("headers", configured(remove=["X-Spam-Flag"])), ("authres", authres))


@pytest.mark.parametrize("spool_threshold", [262144, 1])  # in memory, and spooled to a file
def test_every_reader_sees_the_headers_that_were_removed_gone(tmp_path: Path, spool_threshold):
    recipients = RecipientsPlugin()
    recipients.bonzo_configure(config={"domains": ["example.com"]}, app=None)
    maildir = MaildirPlugin()
    maildir.bonzo_configure(config={"path": str(tmp_path / "Maildir")}, app=None)
    plugins = (("recipients", recipients), *remover_and_authres(), ("maildir", maildir))
    with serve(*plugins, spool_threshold=spool_threshold) as server:
        for name, first in AMBIGUOUS.items():
            with server.client() as client:
                sent = first + FORGED.replace(b"forged", name.encode())
                assert client.sendmail("a@example.org", ["alice@example.com"], sent) == {}
    stored = [p.read_bytes() for p in (tmp_path / "Maildir" / "new").iterdir()]
    assert len(stored) == len(AMBIGUOUS)
    for message in stored:
        fields = strict_fields(message)
        parsed = email.message_from_bytes(message, policy=email.policy.compat32)
        for reader in (fields, [(k.lower(), v) for k, v in parsed.items()]):
            names = [n for n, _ in reader]
            assert "x-spam-flag" not in names, message
            results = [v for n, v in reader if n == "authentication-results"]
            assert results == ["mx.test; none"], message  # ours alone, nothing appended
            assert not any("authenticated as" in v for _, v in reader), message
        # The client's lines are all there, as body.
        assert b"\r\n\r\n" in message and message.endswith(b"\r\n\r\nbody\r\n")


@pytest.mark.parametrize(
    "sent, stored",
    [
        (
            b"Subject: s\r\n\r\nnot a field\r\nX-Spam-Flag: in the body\r\n",
            b"Subject: s\r\n\r\nnot a field\r\nX-Spam-Flag: in the body\r\n",
        ),
        (  # no blank line: it goes in where Bonzo's methods ended the section
            b"Subject: s\r\nnot a field\r\nnor this\r\n\r\nX-Spam-Flag: in the body\r\n",
            b"Subject: s\r\n\r\nnot a field\r\nnor this\r\n\r\nX-Spam-Flag: in the body\r\n",
        ),
    ],
)
def test_a_message_is_stored_as_sent_but_for_a_missing_blank_line(tmp_path: Path, sent, stored):
    recipients = RecipientsPlugin()
    recipients.bonzo_configure(config={"domains": ["example.com"]}, app=None)
    maildir = MaildirPlugin()
    maildir.bonzo_configure(config={"path": str(tmp_path / "Maildir")}, app=None)
    plugins = (("recipients", recipients), *remover_and_authres(), ("maildir", maildir))
    with serve(*plugins) as server, server.client() as client:
        assert client.sendmail("a@example.org", ["alice@example.com"], sent) == {}
    (path,) = (tmp_path / "Maildir" / "new").iterdir()
    assert path.read_bytes().endswith(b"Authentication-Results: mx.test; none\r\n" + stored)

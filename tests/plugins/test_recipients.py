"""The ``recipients`` plugin: local domains and users, relaying, configuration."""

from __future__ import annotations

import smtplib
from pathlib import Path
from types import SimpleNamespace

import pytest
from bonzo_plugins.recipients import RecipientsPlugin
from plugin_testing import make_session, serve
from spellings import parametrize, spellings

from bonzo.address import Address
from bonzo.errors import SMTPError
from bonzo.hookspecs import Accept


def configured(**table: object) -> RecipientsPlugin:
    plugin = RecipientsPlugin()
    plugin.bonzo_configure(config=table, app=None)
    return plugin


def verdict(plugin: RecipientsPlugin, address: str, **session: object) -> tuple[int, str] | str:
    """'accept', or the (code, enhanced code) of the refusal."""
    try:
        result = plugin.bonzo_rcpt(session=make_session(**session), mailbox=Address.parse(address))
    except SMTPError as exc:
        return exc.status_code, exc.enhanced_code or ""
    assert isinstance(result, Accept)
    return "accept"


RELAY_DENIED = (554, "5.7.1")
USER_UNKNOWN = (550, "5.1.1")


# ----------------------------------------------------------------- domains
def test_any_user_at_a_local_domain():
    plugin = configured(domains=["example.com"])
    assert verdict(plugin, "alice@example.com") == "accept"
    assert verdict(plugin, "bob@example.com") == "accept"


def test_domains_compare_case_insensitively_and_ignore_a_trailing_dot():
    plugin = configured(domains=["Example.COM."])
    for address in ("a@example.com", "a@EXAMPLE.com", "a@eXample.Com"):
        assert verdict(plugin, address) == "accept", address
    assert plugin.is_local("example.com.") and plugin.is_local("EXAMPLE.com")
    # A recipient with a trailing dot never reaches the plugin: the core
    # refuses its syntax (test_end_to_end_over_smtp).


def test_subdomains_are_not_local():
    plugin = configured(domains=["example.com"])
    assert verdict(plugin, "a@sub.example.com") == RELAY_DENIED
    assert verdict(plugin, "a@example.com.evil.org") == RELAY_DENIED
    assert verdict(plugin, "a@xexample.com") == RELAY_DENIED


def test_internationalised_domains_match_in_either_form():
    plugin = configured(domains=["bücher.example"])
    assert verdict(plugin, "a@bücher.example") == "accept"
    assert verdict(plugin, "a@xn--bcher-kva.example") == "accept"
    assert verdict(plugin, "a@BÜCHER.example") == "accept"


def test_address_literal_domain():
    plugin = configured(domains=["[192.0.2.1]"])
    assert verdict(plugin, "a@[192.0.2.1]") == "accept"
    assert verdict(plugin, "a@[192.0.2.2]") == RELAY_DENIED


# --------------------------------------------------------------- addresses
def test_listed_addresses_restrict_their_domain():
    plugin = configured(addresses=["alice@example.com", "Bob@Example.com"])
    assert verdict(plugin, "alice@example.com") == "accept"
    assert verdict(plugin, "ALICE@example.com") == "accept"
    assert verdict(plugin, "bob@EXAMPLE.COM") == "accept"
    assert verdict(plugin, "carol@example.com") == USER_UNKNOWN


def test_addresses_win_over_a_catch_all_for_the_same_domain():
    plugin = configured(domains=["example.com", "example.org"], addresses=["alice@example.com"])
    assert verdict(plugin, "carol@example.com") == USER_UNKNOWN
    assert verdict(plugin, "carol@example.org") == "accept"


def test_user_unknown_text():
    plugin = configured(addresses=["alice@example.com"])
    with pytest.raises(SMTPError) as info:
        plugin.bonzo_rcpt(session=make_session(), mailbox=Address.parse("carol@example.com"))
    assert (info.value.status_code, info.value.enhanced_code) == (550, "5.1.1")
    assert info.value.message == "User unknown"


# -------------------------------------------------------------- postmaster
@pytest.mark.parametrize("address", ["postmaster", "PostMaster", "POSTMASTER"])
def test_bare_postmaster_is_always_accepted(address):
    assert verdict(RecipientsPlugin(), address) == "accept"
    assert verdict(configured(addresses=["a@example.com"]), address) == "accept"


def test_postmaster_at_every_local_domain():
    plugin = configured(domains=["example.org"], addresses=["alice@example.com"])
    assert verdict(plugin, "postmaster@example.com") == "accept"
    assert verdict(plugin, "Postmaster@EXAMPLE.com") == "accept"
    assert verdict(plugin, '"postmaster"@ｅｘａｍｐｌｅ。com') == "accept"
    assert verdict(plugin, "postmaster@example.org") == "accept"
    assert verdict(plugin, "postmaster@elsewhere.net") == RELAY_DENIED


# ------------------------------------------------------------------ relay
def test_no_open_relay_by_default():
    plugin = RecipientsPlugin()
    assert verdict(plugin, "victim@elsewhere.net") == RELAY_DENIED
    plugin = configured(domains=["example.com"])
    assert verdict(plugin, "victim@elsewhere.net", remote_ip="127.0.0.1") == RELAY_DENIED


def test_relay_denied_text():
    with pytest.raises(SMTPError) as info:
        RecipientsPlugin().bonzo_rcpt(
            session=make_session(), mailbox=Address.parse("a@elsewhere.net")
        )
    assert (info.value.status_code, info.value.enhanced_code) == (554, "5.7.1")
    assert info.value.message == "Relay access denied"


def test_relay_networks_ipv4_and_ipv6():
    plugin = configured(relay_networks=["192.0.2.0/24", "2001:db8::/32"])
    assert verdict(plugin, "a@elsewhere.net", remote_ip="192.0.2.77") == "accept"
    assert verdict(plugin, "a@elsewhere.net", remote_ip="2001:db8::1") == "accept"
    assert verdict(plugin, "a@elsewhere.net", remote_ip="::ffff:192.0.2.5") == "accept"
    assert verdict(plugin, "a@elsewhere.net", remote_ip="fe80::1%eth0") == RELAY_DENIED
    assert verdict(plugin, "a@elsewhere.net", remote_ip="198.51.100.1") == RELAY_DENIED
    assert verdict(plugin, "a@elsewhere.net", remote_ip="2001:db9::1") == RELAY_DENIED
    assert verdict(plugin, "a@elsewhere.net", remote_ip="not-an-ip") == RELAY_DENIED


def test_single_host_network():
    plugin = configured(relay_networks=["127.0.0.1"])
    assert verdict(plugin, "a@elsewhere.net", remote_ip="127.0.0.1") == "accept"
    assert verdict(plugin, "a@elsewhere.net", remote_ip="127.0.0.2") == RELAY_DENIED


def test_authenticated_sessions_relay_by_default():
    plugin = configured(domains=["example.com"])
    assert verdict(plugin, "a@elsewhere.net", auth="alice") == "accept"
    plugin = configured(domains=["example.com"], relay_authenticated=False)
    assert verdict(plugin, "a@elsewhere.net", auth="alice") == RELAY_DENIED


@pytest.mark.parametrize(
    "address",
    [
        "victim%elsewhere.net@relay.example",
        "elsewhere.net!victim@relay.example",
        '"victim@elsewhere.net"@relay.example',
        "a%b@elsewhere.net",
    ],
)
def test_routing_tricks_are_never_relayed(address):
    plugin = configured(domains=["example.com"], relay_networks=["0.0.0.0/0"])
    assert verdict(plugin, address, remote_ip="192.0.2.1", auth="alice") == RELAY_DENIED


@pytest.mark.parametrize(
    "networks, warned",
    [
        (["0.0.0.0/0"], "relay_networks 0.0.0.0/0 lets every client relay"),
        (["::/1", "8000::/1"], "relay_networks ::/1 8000::/1 hold every IPv6 address together"),
        (["0.0.0.0/1", "128.0.0.0/1", "::1"], "0.0.0.0/1 128.0.0.0/1 hold every IPv4 address"),
        (["192.0.2.0/24", "::1"], None),
    ],
)
def test_relay_networks_of_every_address_are_warned_about(caplog, networks, warned):
    with caplog.at_level("WARNING", logger="bonzo.plugins.recipients"):
        configured(domains=["example.com"], relay_networks=networks)
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if warned is None:
        assert lines == []
    else:
        assert any(warned in line for line in lines), lines


@pytest.mark.parametrize(
    "address",
    [
        "victim%elsewhere.net@example.com",
        "elsewhere.net!victim@example.com",
        '"victim@elsewhere.net"@example.com',
    ],
)
def test_routing_tricks_at_a_catch_all_local_domain_are_refused(address):
    plugin = configured(domains=["example.com"])
    assert verdict(plugin, address) == RELAY_DENIED


def test_routing_characters_in_an_explicitly_listed_address():
    plugin = configured(addresses=["odd%name@example.com"])
    assert verdict(plugin, "odd%name@example.com") == "accept"
    assert verdict(plugin, "other%name@example.com") == USER_UNKNOWN


def test_address_without_domain_is_refused():
    # The core never makes one (RCPT TO:<alice> is a syntax error), but an
    # Address built by hand may have no domain: only postmaster may not.
    plugin = configured(domains=["example.com"])
    with pytest.raises(SMTPError) as info:
        plugin.bonzo_rcpt(session=make_session(), mailbox=Address("alice", "alice", ""))
    assert (info.value.status_code, info.value.enhanced_code) == (550, "5.1.3")
    assert verdict(plugin, "Postmaster") == "accept"


# ------------------------------------------------------- canonical matching
@parametrize("spelling", "ceo", "example.com")
def test_every_spelling_of_a_local_address_gets_its_verdict(spelling):
    # Local, so accepted without relaying rights...
    assert verdict(configured(domains=["example.com"]), spelling) == "accept"
    # ...and at a domain of listed users, decided by the list: never relayed.
    assert verdict(configured(addresses=["alice@example.com"]), spelling) == USER_UNKNOWN
    assert verdict(configured(addresses=["ceo@example.com"]), spelling) == "accept"


@parametrize("entry", "ceo", "example.com")
def test_configured_addresses_are_canonicalised(entry):
    plugin = configured(addresses=[entry])
    assert plugin.users == {"example.com": {"ceo"}}
    for spelling in (
        "ceo@example.com",
        "CEO@Example.com",
        *spellings("ceo", "example.com").values(),
    ):
        assert verdict(plugin, spelling) == "accept", spelling
    assert verdict(plugin, "cfo@ｅｘａｍｐｌｅ.ｃｏｍ") == USER_UNKNOWN


def test_configured_domains_are_canonicalised():
    plugin = configured(
        domains=["ｅｘａｍｐｌｅ.ｃｏｍ", "example。org", "exa­mple.net", "BÜCHER.example"]
    )
    assert plugin.domains == {"example.com", "example.org", "example.net", "xn--bcher-kva.example"}
    for domain in ("example.com", "example.org", "example.net", "bücher.example"):
        for spelling in spellings("anyone", domain).values():
            assert verdict(plugin, spelling) == "accept", spelling


def test_domains_without_an_idna_form_are_configuration_errors():
    with pytest.raises(ValueError, match=r"^domains: .* is not a valid domain"):
        configured(domains=["­.example"])
    with pytest.raises(ValueError, match=r"^addresses: .* is not a valid domain"):
        configured(addresses=["a@exa_mple。。com"])


def test_file_entries_are_canonicalised(tmp_path: Path):
    (tmp_path / "rcpt.txt").write_text(
        '"ceo"@ｅｘａｍｐｌｅ.ｃｏｍ\nexample。org\n', encoding="utf-8"
    )
    plugin = configured(file=str(tmp_path / "rcpt.txt"))
    assert plugin.users == {"example.com": {"ceo"}}
    assert plugin.domains == {"example.org"}
    for spelling in spellings("ceo", "example.com").values():
        assert verdict(plugin, spelling) == "accept", spelling
    assert verdict(plugin, "alice@exa­mple.com") == USER_UNKNOWN
    assert verdict(plugin, "alice@exa­mple.org") == "accept"


@parametrize("spelling", "victim", "elsewhere.net")
def test_relay_decisions_are_on_the_canonical_domain(spelling):
    plugin = configured(domains=["example.com"], relay_networks=["192.0.2.0/24"])
    assert verdict(plugin, spelling, remote_ip="198.51.100.1") == RELAY_DENIED
    assert verdict(plugin, spelling, remote_ip="192.0.2.1") == "accept"
    assert not plugin.is_local(spelling.rpartition("@")[2])


@pytest.mark.parametrize(
    "address",
    [
        "victim％elsewhere.net@relay.example",  # full-width percent sign
        "victim﹫elsewhere.net@relay.example",  # small commercial at
        "elsewhere.net！victim@example.com",  # full-width exclamation mark
    ],
)
def test_compatibility_spellings_of_routing_characters_are_never_relayed(address):
    plugin = configured(domains=["example.com"], relay_networks=["0.0.0.0/0"])
    assert verdict(plugin, address, remote_ip="192.0.2.1") == RELAY_DENIED


# ------------------------------------------------------------------- file
def test_file_of_addresses_and_domains(tmp_path: Path):
    (tmp_path / "rcpt.txt").write_text(
        "# local users\n"
        "\n"
        "alice@example.com   # Alice\n"
        "   bob@example.com\n"
        "example.org\n"
        "#example.net\n"
        "  # indented comment\n",
        encoding="utf-8",
    )
    plugin = RecipientsPlugin()
    plugin.bonzo_configure(
        config={"file": "rcpt.txt", "domains": ["example.info"]},
        app=SimpleNamespace(base_dir=tmp_path),
    )
    assert verdict(plugin, "alice@example.com") == "accept"
    assert verdict(plugin, "bob@example.com") == "accept"
    assert verdict(plugin, "carol@example.com") == USER_UNKNOWN
    assert verdict(plugin, "anyone@example.org") == "accept"
    assert verdict(plugin, "anyone@example.info") == "accept"
    assert verdict(plugin, "anyone@example.net") == RELAY_DENIED


def test_file_relative_to_the_current_directory_without_app(tmp_path, monkeypatch):
    (tmp_path / "rcpt.txt").write_text("example.com\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert verdict(configured(file="rcpt.txt"), "a@example.com") == "accept"


def test_missing_file_is_a_configuration_error(tmp_path):
    plugin = RecipientsPlugin()
    with pytest.raises(ValueError, match=r"^file: cannot read .*nope\.txt"):
        plugin.bonzo_configure(config={"file": "nope.txt"}, app=SimpleNamespace(base_dir=tmp_path))


def test_unreadable_file_is_a_configuration_error(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match=r"^file: cannot read"):
        configured(file=str(tmp_path / "dir"))
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00bad\n")
    with pytest.raises(ValueError, match=r"^file: .* is not UTF-8"):
        configured(file=str(tmp_path / "bin"))


def test_bad_lines_in_file_name_the_line(tmp_path):
    (tmp_path / "rcpt.txt").write_text("example.com\nalice@example.com bob@example.com\n")
    with pytest.raises(ValueError, match=r"line 2: one address or domain per line"):
        configured(file=str(tmp_path / "rcpt.txt"))
    (tmp_path / "rcpt.txt").write_text("example.com\n\nbad..domain\n")
    with pytest.raises(ValueError, match=r"line 3: 'bad..domain' is not a valid domain"):
        configured(file=str(tmp_path / "rcpt.txt"))


# ------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"domain": ["example.com"]}, r"^domain: unknown key"),
        ({"domains": 5}, r"^domains: expected a list of non-empty strings, got 5$"),
        ({"domains": "example.com"}, r"^domains: expected a list of non-empty strings"),
        ({"domains": ["example.com", 3]}, r"^domains: expected a list of non-empty"),
        ({"domains": [""]}, r"^domains: expected a list of non-empty strings, got \[''\]$"),
        ({"domains": ["exa mple.com"]}, r"^domains: 'exa mple.com' is not a valid domain"),
        ({"domains": ["*.example.com"]}, r"^domains: .* is not a valid domain"),
        ({"domains": ["-x.example.com"]}, r"^domains: .* is not a valid domain"),
        ({"domains": ["a@example.com"]}, r"^domains: .* is not a valid domain"),
        ({"addresses": ["example.com"]}, r"^addresses: 'example.com' is not a full address"),
        ({"addresses": ["@example.com"]}, r"^addresses: .* is not a valid address"),
        ({"addresses": ["a b@example.com"]}, r"^addresses: .* is not a valid address"),
        ({"addresses": ["alice@"]}, r"^addresses: .* is not a valid domain"),
        ({"addresses": ["x" * 65 + "@example.com"]}, r"^addresses: .* over 64 octets"),
        ({"file": 3}, r"^file: expected a path, got 3$"),
        ({"file": ""}, r"^file: expected a path, got ''$"),
        ({"relay_networks": "10.0.0.0/8"}, r"^relay_networks: expected a list of networks"),
        (
            {"relay_networks": ["10.0.0.0/33"]},
            r"^relay_networks: expected a network such as 192.0.2.0/24, got '10.0.0.0/33'$",
        ),
        (
            {"relay_networks": ["10.0.0.1/8"]},
            r"^relay_networks: expected a network .*, got '10.0.0.1/8'; host bits set$",
        ),
        ({"relay_networks": ["nonsense"]}, r"^relay_networks: expected a network such as"),
        ({"relay_authenticated": "yes"}, r"^relay_authenticated: expected true or false"),
        ({"relay_authenticated": 1}, r"^relay_authenticated: expected true or false"),
    ],
)
def test_configuration_errors_name_the_key(table, message):
    with pytest.raises(ValueError, match=message):
        configured(**table)


def test_failed_configuration_keeps_the_previous_state():
    plugin = configured(domains=["example.com"])
    with pytest.raises(ValueError):
        plugin.bonzo_configure(config={"domains": ["example.org"], "relay_networks": 1}, app=None)
    assert verdict(plugin, "a@example.com") == "accept"


def test_empty_configuration_accepts_only_postmaster():
    plugin = configured()
    assert verdict(plugin, "postmaster") == "accept"
    assert verdict(plugin, "a@example.com") == RELAY_DENIED


# ------------------------------------------------------------- end to end
def test_end_to_end_over_smtp():
    plugin = configured(addresses=["alice@example.com"], domains=["example.org"])
    with serve(("recipients", plugin)) as server, server.client() as client:
        client.ehlo()
        assert client.mail("sender@elsewhere.net")[0] == 250
        assert client.rcpt("alice@example.com") == (250, b"2.1.5 Ok")
        assert client.rcpt("anyone@example.org")[0] == 250
        assert client.rcpt("postmaster")[0] == 250
        assert client.rcpt("carol@example.com") == (550, b"5.1.1 User unknown")
        assert client.rcpt("victim@elsewhere.net") == (554, b"5.7.1 Relay access denied")
        assert client.rcpt("a%b@example.org") == (554, b"5.7.1 Relay access denied")
        assert client.rcpt("alice@example.com.")[0] == 501  # the core refuses the syntax
        assert client.rset()[0] == 250


def test_end_to_end_relay_from_a_trusted_network():
    plugin = configured(domains=["example.com"], relay_networks=["127.0.0.0/8"])
    with serve(("recipients", plugin)) as server, server.client() as client:
        client.ehlo()
        client.mail("sender@example.com")
        assert client.rcpt("friend@elsewhere.net")[0] == 250
        assert client.rcpt("friend%elsewhere.net@relay.example")[0] == 554


def test_end_to_end_message_refused_without_recipient():
    with serve(("recipients", configured(domains=["example.com"]))) as server:
        with server.client() as client, pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@example.com", ["b@elsewhere.net"], b"Subject: x\r\n\r\nx\r\n")


def test_a_relay_network_of_everything_is_warned_about(caplog):
    configured(relay_networks=["0.0.0.0/0"])
    (record,) = [r for r in caplog.records if r.name == "bonzo.plugins.recipients"]
    assert record.levelname == "WARNING" and "every client" in record.getMessage()


def test_relaying_for_authenticated_sessions_needs_a_plugin_that_authenticates(caplog):
    # In a PluginTestServer the app is real: without a bonzo_auth plugin,
    # nobody can authenticate, so the startup line does not claim relaying
    # for authenticated sessions, and with nothing else to accept the plugin
    # warns (bonzo check prints it).
    from bonzo.testing import PluginTestServer

    with PluginTestServer(("recipients", RecipientsPlugin()), capture=False) as server:
        plugin = server.plugins.get("recipients")
    assert "recipients: accepting mail for no domain (postmaster only); relaying for nobody" in (
        server.log_text
    )
    assert plugin.config_warnings == [  # type: ignore[attr-defined]
        "no domains, addresses, file or relay_networks (and no plugin that authenticates "
        "clients): every recipient but postmaster will be refused"
    ]

    class Auth:
        def bonzo_auth(self, username, password):
            return None

    with PluginTestServer(
        ("auth", Auth()), ("recipients", RecipientsPlugin()), capture=False
    ) as server:
        plugin = server.plugins.get("recipients")
    assert "relaying for authenticated sessions" in server.log_text
    assert plugin.config_warnings == []  # type: ignore[attr-defined]


def test_local_domains_keep_the_order_of_the_configuration(tmp_path):
    """The first local domain is where the queue sends the bare
    ``<postmaster>``: ``domains`` first, then ``addresses``, then the file."""
    (tmp_path / "rcpt.txt").write_text("zeta@file.example\npostmaster\nfile2.example\n")
    plugin = configured(
        domains=["B.example", "a.example"],
        addresses=["x@c.example", "y@a.example"],
        file=str(tmp_path / "rcpt.txt"),
    )
    assert plugin.local_domains == [
        "b.example", "a.example", "c.example", "file.example", "file2.example"
    ]  # fmt: skip
    assert configured(addresses=["x@c.example"]).local_domains == ["c.example"]
    assert configured().local_domains == []

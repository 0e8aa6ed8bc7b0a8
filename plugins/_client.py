"""Outbound connection settings the bundled plugins share: a plugin table's
client keys (the ``queue``'s ``smarthost`` route, the ``forward`` plugin) as
a :class:`bonzo.client.ClientSettings`, checked with errors that name the
key.

Private to ``bonzo_plugins``; third-party plugins should not import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bonzo.client import ClientSettings, ca_file_context

from ._config import describe

__all__ = ["client_settings", "get_port"]


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def client_settings(
    table: Mapping[str, Any],
    app: Any,
    where: str = "",
    loops: bool = False,
    *,
    verify_elsewhere: bool = False,
    **extra: Any,
) -> ClientSettings:
    """The :class:`~bonzo.client.ClientSettings` of a table's keys:
    ``helo_name`` (default: the server's ``hostname``), ``source_address``,
    ``username``, ``password`` (already resolved from ``$env``/``$file`` by
    the configuration loader), ``tls_name``, ``tls`` (the policy),
    ``implicit_tls``, ``tls_ca_file`` (the ``verify`` policy's CA
    certificates, read now; a configuration error with another policy,
    unless ``verify_elsewhere``: a per-domain policy is ``verify``),
    ``auth_plaintext``, ``pipelining``, ``connect_timeout`` and
    ``data_end_timeout``; ``extra`` are further settings. With ``loops``, a
    server that greets with this server's names is refused as a loop
    (``own_names``). ``where`` prefixes the key in error messages."""
    hostname = getattr(getattr(app, "settings", None), "hostname", None)
    helo = table.get("helo_name")
    if helo is None:
        helo = hostname
    options: dict[str, Any] = dict(extra)
    if helo:
        options["helo_name"] = helo
    if loops:
        # An SMTP server that greets with our name is us: a loop, not a delivery.
        options["own_names"] = tuple({n for n in (hostname, helo) if isinstance(n, str) and n})
    for key in ("source_address", "username", "password", "tls_name"):
        if key in table:
            value = table[key]
            if not isinstance(value, str) or not value:
                raise ValueError(
                    f"{_key(where, key)}: expected a non-empty string, got {describe(value)}"
                )
            options[key] = value
    if "tls" in table:
        options["tls_policy"] = table["tls"]
    if "implicit_tls" in table:
        options["implicit_tls"] = table["implicit_tls"]
    if table.get("tls_ca_file") is not None:
        # Read at each configure, so that a reload sees a changed file.
        try:
            options["tls_context"] = ca_file_context(str(table["tls_ca_file"]))
        except ValueError as exc:
            raise ValueError(f"{_key(where, 'tls_ca_file')}: {exc}") from None
    if "auth_plaintext" in table:
        options["auth_plaintext"] = table["auth_plaintext"]
    if "pipelining" in table:
        options["pipelining"] = table["pipelining"]
    for key in ("connect_timeout", "data_end_timeout"):
        if key in table:
            options[key] = table[key]
    options.update(extra)
    policy = options.get("tls_policy", "opportunistic")
    if "tls_context" in options and policy != "verify" and not verify_elsewhere:
        # The CAs serve only to verify: set for another policy, they would
        # give a false sense of it (mail to any certificate, unchecked).
        raise ValueError(
            f'{_key(where, "tls_ca_file")}: used only with tls = "verify", and tls is '
            f'{policy!r} here: set tls = "verify" (or remove tls_ca_file)'
        )
    if (
        policy == "none"
        and not options.get("implicit_tls")
        and "username" in options
        and not options.get("auth_plaintext")
    ):
        # The client never sends credentials in the clear unless told to:
        # every delivery would be deferred until it bounced.
        raise ValueError(
            f'{_key(where, "username")}: AUTH needs TLS, and tls is "none" here, so every '
            'delivery would be deferred: set tls = "require" or "verify" (or '
            "auth_plaintext = true to send the password unencrypted)"
        )
    try:
        return ClientSettings(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}" if where else str(exc)) from None


def get_port(table: Mapping[str, Any], where: str, default: int) -> int:
    """``table["port"]``: an integer 1..65535."""
    port = table.get("port", default)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(
            f"{_key(where, 'port')}: expected an integer 1..65535, got {describe(port)}"
        )
    return port

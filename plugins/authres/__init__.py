"""The ``authres`` plugin: one ``Authentication-Results:`` field (RFC 8601)
for the spf, dkim, dmarc and arc results, under this server's authserv-id;
forged fields carrying that id are removed.

See ``README.rst`` in this directory for its configuration.
"""

from .plugin import AuthresPlugin, authserv_id_of

__all__ = ["AuthresPlugin", "authserv_id_of"]

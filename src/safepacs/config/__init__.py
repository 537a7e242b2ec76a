"""Typed, frozen settings: defaults < ``safepacs.toml`` < ``SAFEPACS_<SECTION>__<KEY>`` < command line.

Nothing is built at import time; :func:`load_settings` validates everything once at start-up
and refuses insecure or impossible combinations with a message that names the setting.
"""

from __future__ import annotations

from safepacs.config._settings import (
    DATA_ENV,
    DEFAULT_DATA_DIR,
    OIDC_ALGORITHMS,
    AuditCollectorSettings,
    AuditSettings,
    AuthSettings,
    IndexSettings,
    OidcIssuerSettings,
    QuerySettings,
    ServerSettings,
    Settings,
    StorageSettings,
    data_dir_from,
    load_settings,
    render_default_toml,
)

__all__ = [
    "DATA_ENV",
    "DEFAULT_DATA_DIR",
    "OIDC_ALGORITHMS",
    "AuditCollectorSettings",
    "AuditSettings",
    "AuthSettings",
    "IndexSettings",
    "OidcIssuerSettings",
    "QuerySettings",
    "ServerSettings",
    "Settings",
    "StorageSettings",
    "data_dir_from",
    "load_settings",
    "render_default_toml",
]

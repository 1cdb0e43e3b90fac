"""Configuration from the environment (and `.env` when present), validated once at start-up."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

DEFAULT_DATABASE_URL = "sqlite:///instance/receiver.db"
DEFAULT_STAMPS_API_BASE_URL = "https://stamps.co.id"
RM_HOSTS = {
    "sandbox": ("https://sb-open.revenuemonster.my", "https://sb-oauth.revenuemonster.my"),
    "production": ("https://open.revenuemonster.my", "https://oauth.revenuemonster.my"),
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# Stamps.co.id: `Authorization: <token_type> <token>`; a scheme word, and a token with no spaces.
_TOKEN_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_TOKEN = re.compile(r"^[\x21-\x7e]{1,512}$")


def default_web_concurrency(cores: int) -> int:
    """gunicorn worker processes when WEB_CONCURRENCY is unset: cores + 1, on either database.

    SQLite admits one writer at a time; with more workers than cores, the worker holding the
    write lock is pre-empted by others waiting for it (measured at 200 callbacks/s on 2 cores:
    p99 44 ms with 5 workers, 9 ms with 3, same throughput). Two SQLite workers wrote callbacks
    ~9 % faster, but under a flood of forged callbacks the genuine p99 doubled (docs/performance.md).
    The workers are threaded (DEFAULT_WEB_THREADS); on PostgreSQL 3 x 8 threads took 790
    callbacks/s where 5 x 8 took 635.
    """
    return cores + 1


# Threads per gunicorn worker when WEB_THREADS is unset, on either database. Callbacks that arrive
# together in a threaded worker share one transaction (group_commit.py). SQLite had sync workers
# until 2026-12-02, because threads had given it a p99 of 10-70 ms at 200 callbacks/s; since the
# writer turn and the WAL flush after COMMIT that p99 is ~5 ms, and threads put SQLite ingest
# ahead of sync workers (docs/performance.md).
DEFAULT_WEB_THREADS = 8


def web_client_timeout_seconds(env: Mapping[str, str] | None = None) -> float:
    """WEB_CLIENT_TIMEOUT_SECONDS: how long a web worker's thread waits for a client's next bytes (default 10)."""
    return _float(os.environ if env is None else env, "WEB_CLIENT_TIMEOUT_SECONDS", 10.0)


class ConfigError(Exception):
    """A configuration variable is missing or invalid; the message names it in one line."""


@dataclass(frozen=True)
class Settings:
    """Validated settings. Secrets are excluded from repr so they never reach a log line."""

    database_url: str = DEFAULT_DATABASE_URL
    rm_environment: str = "sandbox"
    rm_api_base_url: str = RM_HOSTS["sandbox"][0]
    rm_oauth_base_url: str = RM_HOSTS["sandbox"][1]
    rm_client_id: str | None = None
    rm_client_secret: str | None = field(default=None, repr=False)
    rm_private_key_pem: str | None = field(default=None, repr=False)
    rm_server_public_key_pem: str | None = None
    insecure_skip_signature: bool = False
    signature_max_age_seconds: int = 900
    reconcile_interval_seconds: int = 300
    reconcile_stale_after_seconds: int = 3600
    reconcile_concurrency: int = 8
    rm_max_requests_per_second: float = 20.0
    rm_voucher_lookup_method: str = "GET"
    rm_timeout_seconds: float = 15.0
    rm_max_retries: int = 4
    rm_retry_backoff_seconds: float = 0.25
    ops_api_token: str | None = field(default=None, repr=False)
    sqlite_synchronous: str = "FULL"
    sqlite_busy_timeout_seconds: float = 10.0
    db_statement_timeout_seconds: float = 10.0
    db_pool_size: int = 10
    log_level: str = "INFO"
    log_format: str = "text"
    delivery_retention_days: int = 90
    stamps_api_base_url: str = DEFAULT_STAMPS_API_BASE_URL
    stamps_token_type: str = "Token"
    stamps_token: str | None = field(default=None, repr=False)
    stamps_timeout_seconds: float = 15.0
    stamps_max_retries: int = 2
    rejected_deliveries_per_minute: int = 120
    rejected_deliveries_total_per_minute: int = 600
    web_client_timeout_seconds: float = 10.0

    def secret_values(self) -> list[str]:
        """Values that must never appear in a log line."""
        return [
            v for v in (self.rm_client_secret, self.ops_api_token, self.rm_private_key_pem, self.stamps_token) if v
        ]

    @property
    def stamps_configured(self) -> bool:
        """Calls to Stamps.co.id need a token."""
        return bool(self.stamps_token)

    @property
    def rm_credentials_configured(self) -> bool:
        """Outbound calls need client credentials and the merchant key."""
        return bool(self.rm_client_id and self.rm_client_secret and self.rm_private_key_pem)


def load_dotenv_if_present(path: str | os.PathLike[str] = ".env") -> None:
    """Read `.env` from the working directory into os.environ without overriding real variables."""
    if Path(path).is_file():
        from dotenv import load_dotenv

        load_dotenv(path, override=False)


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{name} must be {bound}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0:
        raise ConfigError(f"{name} must be greater than 0, got {raw!r}")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


def _pem(env: Mapping[str, str], name: str, kind: str) -> str | None:
    """Read NAME (inline PEM) or NAME_FILE (path), never both; validate that it parses."""
    from . import signature

    inline = _get(env, name)
    path = _get(env, f"{name}_FILE")
    if inline and path:
        raise ConfigError(f"set {name} or {name}_FILE, not both")
    if path:
        try:
            inline = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{name}_FILE cannot be read: {exc.strerror or exc}") from None
        name = f"{name}_FILE"
    if not inline:
        return None
    try:
        if kind == "private":
            signature.load_private_key(inline)
        else:
            signature.load_public_key(inline)
    except (ValueError, TypeError):
        # Never echo the value: it may be a private key.
        raise ConfigError(f"{name} is not a PEM-encoded RSA {kind} key") from None
    return inline


def _url(env: Mapping[str, str], name: str, default: str) -> str:
    value = _get(env, name) or default
    if not value.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
    return value.rstrip("/")


def database_url_from_env(env: Mapping[str, str] | None = None) -> str:
    """Just DATABASE_URL, for tools (Alembic) that need no other setting."""
    env = os.environ if env is None else env
    return _get(env, "DATABASE_URL") or DEFAULT_DATABASE_URL


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment; raise ConfigError naming the first bad variable."""
    env = os.environ if env is None else env
    environment = (_get(env, "RM_ENVIRONMENT") or "sandbox").lower()
    if environment not in RM_HOSTS:
        raise ConfigError(f"RM_ENVIRONMENT must be 'sandbox' or 'production', got {environment!r}")
    api_default, oauth_default = RM_HOSTS[environment]
    database_url = database_url_from_env(env)
    if "://" not in database_url:
        raise ConfigError(f"DATABASE_URL must be an SQLAlchemy URL such as {DEFAULT_DATABASE_URL}")
    if not database_url.startswith(("sqlite", "postgres")):
        raise ConfigError("DATABASE_URL must be a sqlite:// or postgresql:// URL")

    public_key = _pem(env, "RM_SERVER_PUBLIC_KEY", "public")
    skip = _bool(env, "RM_INSECURE_SKIP_SIGNATURE")
    if public_key is None and not skip:
        raise ConfigError(
            "RM_SERVER_PUBLIC_KEY (or RM_SERVER_PUBLIC_KEY_FILE) is not set: callbacks cannot be verified; "
            "set it, or RM_INSECURE_SKIP_SIGNATURE=1 for local experiments only"
        )
    client_id = _get(env, "RM_CLIENT_ID")
    client_secret = _get(env, "RM_CLIENT_SECRET")
    if bool(client_id) != bool(client_secret):
        missing = "RM_CLIENT_SECRET" if client_id else "RM_CLIENT_ID"
        raise ConfigError(f"{missing} is not set: RM_CLIENT_ID and RM_CLIENT_SECRET go together")
    lookup = (_get(env, "RM_VOUCHER_LOOKUP_METHOD") or "GET").upper()
    if lookup not in ("GET", "POST"):
        raise ConfigError(f"RM_VOUCHER_LOOKUP_METHOD must be GET or POST, got {lookup!r}")
    synchronous = (_get(env, "SQLITE_SYNCHRONOUS") or "FULL").upper()
    if synchronous not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError(f"SQLITE_SYNCHRONOUS must be FULL, EXTRA or NORMAL, got {synchronous!r}")
    log_level = (_get(env, "LOG_LEVEL") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")

    log_format = (_get(env, "LOG_FORMAT") or "text").lower()
    if log_format not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT must be text or json, got {log_format!r}")
    stamps_token_type = _get(env, "STAMPS_TOKEN_TYPE") or "Token"
    if not _TOKEN_TYPE.match(stamps_token_type):
        raise ConfigError(f"STAMPS_TOKEN_TYPE must be one word such as Token or Bearer, got {stamps_token_type!r}")
    stamps_token = _get(env, "STAMPS_TOKEN")
    if stamps_token is not None and not _TOKEN.match(stamps_token):
        # Never echo the value: it is a credential.
        raise ConfigError("STAMPS_TOKEN must be printable characters without spaces (up to 512)")

    return Settings(
        database_url=database_url,
        rm_environment=environment,
        rm_api_base_url=_url(env, "RM_API_BASE_URL", api_default),
        rm_oauth_base_url=_url(env, "RM_OAUTH_BASE_URL", oauth_default),
        rm_client_id=client_id,
        rm_client_secret=client_secret,
        rm_private_key_pem=_pem(env, "RM_PRIVATE_KEY", "private"),
        rm_server_public_key_pem=public_key,
        insecure_skip_signature=skip and public_key is None,
        signature_max_age_seconds=_int(env, "RM_SIGNATURE_MAX_AGE_SECONDS", 900),
        reconcile_interval_seconds=_int(env, "RECONCILE_INTERVAL_SECONDS", 300, minimum=1),
        reconcile_stale_after_seconds=_int(env, "RECONCILE_STALE_AFTER_SECONDS", 3600, minimum=0),
        reconcile_concurrency=_int(env, "RECONCILE_CONCURRENCY", 8, minimum=1, maximum=256),
        rm_max_requests_per_second=_float(env, "RM_MAX_REQUESTS_PER_SECOND", 20.0),
        rm_voucher_lookup_method=lookup,
        rm_timeout_seconds=_float(env, "RM_TIMEOUT_SECONDS", 15.0),
        rm_max_retries=_int(env, "RM_MAX_RETRIES", 4, minimum=0, maximum=20),
        rm_retry_backoff_seconds=_float(env, "RM_RETRY_BACKOFF_SECONDS", 0.25),
        ops_api_token=_get(env, "OPS_API_TOKEN"),
        sqlite_synchronous=synchronous,
        sqlite_busy_timeout_seconds=_float(env, "SQLITE_BUSY_TIMEOUT_SECONDS", 10.0),
        db_statement_timeout_seconds=_float(env, "DB_STATEMENT_TIMEOUT_SECONDS", 10.0),
        db_pool_size=_int(env, "DB_POOL_SIZE", 10, minimum=1, maximum=200),
        log_level=log_level,
        log_format=log_format,
        delivery_retention_days=_int(env, "DELIVERY_RETENTION_DAYS", 90, minimum=1),
        stamps_api_base_url=_url(env, "STAMPS_API_BASE_URL", DEFAULT_STAMPS_API_BASE_URL),
        stamps_token_type=stamps_token_type,
        stamps_token=stamps_token,
        stamps_timeout_seconds=_float(env, "STAMPS_TIMEOUT_SECONDS", 15.0),
        stamps_max_retries=_int(env, "STAMPS_MAX_RETRIES", 2, minimum=0, maximum=10),
        rejected_deliveries_per_minute=_int(env, "REJECTED_DELIVERIES_PER_MINUTE", 120, minimum=0),
        rejected_deliveries_total_per_minute=_int(env, "REJECTED_DELIVERIES_TOTAL_PER_MINUTE", 600, minimum=0),
        web_client_timeout_seconds=web_client_timeout_seconds(env),
    )

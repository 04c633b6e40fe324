"""Settings: every CUSTOMERS_* key, its default, and the checks that refuse a broken one."""

import os

from flask import Flask, current_app

from customers_service.logs import LOG_FORMATS

# Events' retention and the deliverer's (flask customers deliver-webhooks): numbers above 0.
WEBHOOK_SETTINGS = (
    "CUSTOMERS_EVENT_RETENTION_DAYS",
    "CUSTOMERS_WEBHOOK_TIMEOUT",
    "CUSTOMERS_WEBHOOK_CONCURRENCY",
    "CUSTOMERS_WEBHOOK_POLL_SECONDS",
    "CUSTOMERS_WEBHOOK_LEASE_SECONDS",
    "CUSTOMERS_WEBHOOK_RETRY_FIRST_SECONDS",
    "CUSTOMERS_WEBHOOK_RETRY_LONGEST_SECONDS",
    "CUSTOMERS_WEBHOOK_RETRY_FOR_SECONDS",
)
# Read from the environment by the standalone app; a host app sets the same keys in its config.
SETTINGS = (
    "CUSTOMERS_DATABASE_URL",
    "CUSTOMERS_POSTGRES_POOL_SIZE",
    "CUSTOMERS_POSTGRES_POOL_TIMEOUT",
    "CUSTOMERS_POSTGRES_STATEMENT_TIMEOUT",
    "CUSTOMERS_DATABASE",
    "CUSTOMERS_API_KEYS",
    "CUSTOMERS_API_KEY_FILE",
    "CUSTOMERS_REQUIRE_API_KEY",
    "CUSTOMERS_MAX_BODY_BYTES",
    "CUSTOMERS_SQLITE_SYNCHRONOUS",
    "CUSTOMERS_SQLITE_TIMEOUT",
    "CUSTOMERS_MIN_FREE_BYTES",
    "CUSTOMERS_METRICS",
    "CUSTOMERS_METRICS_ROUTE",
    "CUSTOMERS_LOG_FORMAT",
    "CUSTOMERS_TRUSTED_PROXIES",
    *WEBHOOK_SETTINGS,
)
DEFAULTS = {
    "CUSTOMERS_DATABASE_URL": "",
    "CUSTOMERS_POSTGRES_POOL_SIZE": 2,
    "CUSTOMERS_POSTGRES_POOL_TIMEOUT": 5.0,
    "CUSTOMERS_POSTGRES_STATEMENT_TIMEOUT": 5.0,
    "CUSTOMERS_API_KEYS": "",
    "CUSTOMERS_REQUIRE_API_KEY": True,
    "CUSTOMERS_MAX_BODY_BYTES": 65536,
    "CUSTOMERS_SQLITE_SYNCHRONOUS": "FULL",
    "CUSTOMERS_SQLITE_TIMEOUT": 5.0,
    "CUSTOMERS_MIN_FREE_BYTES": 1 << 20,
    "CUSTOMERS_METRICS": True,
    "CUSTOMERS_METRICS_ROUTE": False,  # the standalone app sets it: a host app chooses
    "CUSTOMERS_LOG_FORMAT": "text",
    "CUSTOMERS_TRUSTED_PROXIES": 0,
    "CUSTOMERS_EVENT_RETENTION_DAYS": 30,
    "CUSTOMERS_WEBHOOK_TIMEOUT": 10.0,
    "CUSTOMERS_WEBHOOK_CONCURRENCY": 8,
    "CUSTOMERS_WEBHOOK_POLL_SECONDS": 0.5,
    "CUSTOMERS_WEBHOOK_LEASE_SECONDS": 60.0,
    "CUSTOMERS_WEBHOOK_RETRY_FIRST_SECONDS": 1.0,
    "CUSTOMERS_WEBHOOK_RETRY_LONGEST_SECONDS": 3600.0,
    "CUSTOMERS_WEBHOOK_RETRY_FOR_SECONDS": 86400.0,
}
# Settings whose default is a file in the app's instance folder.
INSTANCE_FILES = {"CUSTOMERS_DATABASE": "customers.sqlite3", "CUSTOMERS_API_KEY_FILE": "api-keys"}


def setting(name: str, app: Flask | None = None):
    """A CUSTOMERS_* setting of ``app`` (the current app by default), or its default."""
    app = app or current_app._get_current_object()
    config = app.config
    if name in config:
        return config[name]
    if name in INSTANCE_FILES:
        return os.path.join(app.instance_path, INSTANCE_FILES[name])
    return DEFAULTS[name]


def from_environment(config) -> None:
    """Copy every CUSTOMERS_* environment variable the service knows into ``config``."""
    for name in SETTINGS:
        if name in os.environ:
            config[name] = os.environ[name]


def check_settings(config) -> None:
    """Refuse, at start, a setting the service could only fail on at every request."""
    from customers_service.backends.sqlite.connections import SYNCHRONOUS_MODES

    synchronous = str(config.get("CUSTOMERS_SQLITE_SYNCHRONOUS", "FULL")).upper()
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"CUSTOMERS_SQLITE_SYNCHRONOUS must be one of {SYNCHRONOUS_MODES}")
    for name in (
        "CUSTOMERS_MAX_BODY_BYTES",
        "CUSTOMERS_MIN_FREE_BYTES",
        "CUSTOMERS_SQLITE_TIMEOUT",
        "CUSTOMERS_POSTGRES_POOL_TIMEOUT",
        "CUSTOMERS_POSTGRES_STATEMENT_TIMEOUT",
    ):
        try:
            float(config.get(name, 0))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, not {config[name]!r}") from None
    for name in (
        "CUSTOMERS_POSTGRES_POOL_TIMEOUT",
        "CUSTOMERS_POSTGRES_STATEMENT_TIMEOUT",
        *WEBHOOK_SETTINGS,
    ):
        try:
            positive = float(config.get(name, 1)) > 0
        except (TypeError, ValueError):
            positive = False
        if not positive:
            raise ValueError(f"{name} must be a number more than 0, not {config[name]!r}")
    timeout = float(config.get("CUSTOMERS_WEBHOOK_TIMEOUT", DEFAULTS["CUSTOMERS_WEBHOOK_TIMEOUT"]))
    lease = float(
        config.get("CUSTOMERS_WEBHOOK_LEASE_SECONDS", DEFAULTS["CUSTOMERS_WEBHOOK_LEASE_SECONDS"])
    )
    if lease <= timeout:
        raise ValueError(
            "CUSTOMERS_WEBHOOK_LEASE_SECONDS must be more than CUSTOMERS_WEBHOOK_TIMEOUT"
        )
    for name, least in (
        ("CUSTOMERS_POSTGRES_POOL_SIZE", 1),
        ("CUSTOMERS_WEBHOOK_CONCURRENCY", 1),
        ("CUSTOMERS_TRUSTED_PROXIES", 0),
    ):
        count = str(config.get(name, DEFAULTS[name]))
        if not count.isdigit() or int(count) < least:
            raise ValueError(f"{name} must be a whole number from {least}, not {count}")
    log_format = str(config.get("CUSTOMERS_LOG_FORMAT", "text")).strip().lower()
    if log_format not in LOG_FORMATS:
        raise ValueError(f"CUSTOMERS_LOG_FORMAT must be one of {LOG_FORMATS}, not {log_format!r}")
    if config.get("CUSTOMERS_DATABASE_URL"):
        check_postgres_url(config["CUSTOMERS_DATABASE_URL"])


def check_postgres_url(url: str) -> None:
    """Refuse a URL that is not PostgreSQL's, or PostgreSQL without its optional packages."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("CUSTOMERS_DATABASE_URL must start with postgresql://")
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        raise ValueError(
            "CUSTOMERS_DATABASE_URL needs the postgres extra: "
            "pip install 'customers-service[postgres]'"
        ) from None


def flag(value) -> bool:
    """A boolean setting, from a bool or from an environment string."""
    if isinstance(value, str):
        return value.strip().lower() not in {"0", "false", "no", "off", ""}
    return bool(value)

"""The database as views and commands see it: a Store per request, from the backend the
settings choose (SQLite by default, PostgreSQL with CUSTOMERS_DATABASE_URL), never creating the
database; only prepare_database() creates and migrates it."""

from flask import Flask, current_app, g

from customers_service.settings import setting
from customers_service.storage import Backend, Connections, Store, load_backend

_connections: dict[tuple, Connections] = {}


class DatabaseNotReady(Exception):
    """The database cannot be created or migrated; the message says why, for an operator."""


def backend(app: Flask | None = None) -> Backend:
    """The backend the app's settings choose: PostgreSQL with a database URL, else SQLite."""
    return load_backend("postgres" if setting("CUSTOMERS_DATABASE_URL", app) else "sqlite")


def connections(app: Flask | None = None):
    """The app's database connections (a backend's Connections), one object per set of
    settings, so each process keeps its connections across requests."""
    app = app or current_app._get_current_object()
    url = setting("CUSTOMERS_DATABASE_URL", app)
    if url:
        key = (
            url,
            int(setting("CUSTOMERS_POSTGRES_POOL_SIZE", app)),
            float(setting("CUSTOMERS_POSTGRES_POOL_TIMEOUT", app)),
            float(setting("CUSTOMERS_POSTGRES_STATEMENT_TIMEOUT", app)),
        )
    else:
        key = (
            setting("CUSTOMERS_DATABASE", app),
            str(setting("CUSTOMERS_SQLITE_SYNCHRONOUS", app)).upper(),
            float(setting("CUSTOMERS_SQLITE_TIMEOUT", app)),
        )
    found = _connections.get(key)
    if found is None:
        found = _connections[key] = backend(app).Connections(*key)
    return found


def where(app: Flask | None = None) -> str:
    """The database's path or URL, without a password, for messages."""
    location = setting("CUSTOMERS_DATABASE_URL", app) or setting("CUSTOMERS_DATABASE", app)
    return backend(app).where(location)


def fault(error: BaseException) -> tuple[str, str] | None:
    """The contract's 503 code and message for a database fault (database_busy, ...), or None
    for any other error, a refused constraint included."""
    return backend().fault(error)


def prepare_database(app: Flask) -> str:
    """Create the database if it is missing and apply pending migrations; return where it is.

    The only code that creates a database: ``flask customers init-db`` and a server's start
    (before any worker forks) call it; a request never does.
    """
    try:
        connections(app).prepare()
    except (OSError, backend(app).Error) as e:
        raise DatabaseNotReady(f"cannot prepare the database {where(app)}: {e}") from None
    return where(app)


def open_store(app: Flask | None = None) -> Store:
    """A new Store on the existing, migrated database, for a command; the caller closes it."""
    conns = connections(app)
    return Store(backend(app), conns.open(), conns)


def get_store() -> Store:
    """This request's Store, on a connection kept by this process."""
    request_globals = g._get_current_object()  # one look-up of the proxy, not three
    store = request_globals.get("customers_store")
    if store is None:
        app = current_app._get_current_object()
        conns = connections(app)
        store = request_globals.customers_store = Store(backend(app), conns.acquire(), conns)
    return store


def release_store() -> None:
    """End the request's use of its connection."""
    store = g._get_current_object().pop("customers_store", None)
    if store is not None:
        store.connections.release(store.conn)


def forget_store() -> None:
    """After a fault: give up the request's connection, so the next request gets a sound one."""
    store = g._get_current_object().pop("customers_store", None)
    if store is not None:
        store.connections.discard(store.conn)


def close_connections() -> None:
    """Close every connection and pool this process keeps (tests, and a host's shutdown)."""
    while _connections:
        _, conns = _connections.popitem()
        conns.close()

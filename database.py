"""The database as views and commands see it: a Store per request, from the backend the
settings choose (SQLite by default, PostgreSQL with CUSTOMERS_DATABASE_URL), never creating the
database; only prepare_database() creates and migrates it."""

import functools
from collections.abc import Iterator, Mapping

from flask import Flask, current_app, g

from customers_service import event_storage, storage
from customers_service.list_query import NO_FILTERS, Filters
from customers_service.settings import setting

_connections: dict[tuple, object] = {}
LARGEST_SEQUENCE = 2**63 - 1  # both backends' largest integer


class DatabaseNotReady(Exception):
    """The database cannot be created or migrated; the message says why, for an operator."""


class Store:
    """One connection and the backend module that speaks its SQL.

    Views and commands call these methods and never ask which backend they have: each backend
    is a module with the same functions (storage.py, storage_postgres.py).
    """

    def __init__(self, backend, conn, connections):
        self.backend, self.conn, self.connections = backend, conn, connections

    @functools.cached_property
    def events(self):
        """The events and webhooks storage module beside the backend (looked up only by the
        requests that use it, not by every customer request)."""
        return events_backend(self.backend)

    def upsert_customer(self, fields: Mapping[str, str | None]) -> dict:
        """Create the customer, or update the keys present in ``fields``; return the row."""
        return self.backend.upsert_customer(self.conn, fields)

    def get_customer(self, customer_id: str) -> dict | None:
        """The customer with that id, or None."""
        return self.backend.get_customer(self.conn, customer_id)

    def delete_customer(self, customer_id: str) -> dict | None:
        """Delete the customer and return it as it was, or None."""
        return self.backend.delete_customer(self.conn, customer_id)

    def list_customers(
        self, page: int, per_page: int, filters: Filters = NO_FILTERS
    ) -> tuple[list[dict], int]:
        """One page of the customers the filters select, in their order, and their count."""
        return self.backend.list_customers(self.conn, page, per_page, filters)

    def check_health(self, min_free_bytes: int) -> None:
        """Raise the backend's error unless the database takes a write and has room for more."""
        self.backend.check(self.conn, min_free_bytes)

    def import_batch(self, rows: list[dict]) -> tuple[int, list[tuple[int, dict]]]:
        """Upsert prepared rows (see storage.upsert_params) in one transaction; return how many
        customers they created, and the position and error details of each row refused."""
        return self.backend.import_batch(self.conn, rows)

    def export_lines(self) -> Iterator[str]:
        """Every customer as one line of JSON, from one snapshot, streamed."""
        return self.backend.export_lines(self.conn)

    def events_page(self, after: int, limit: int) -> tuple[list[dict], bool]:
        """Up to ``limit`` events after the sequence ``after``, in commit order, and whether more
        follow; raise event_storage.EventsExpired if some after it were pruned."""
        # No sequence reaches 2**63 - 1: a larger after (any integer is valid) reads nothing.
        return self.events.events_page(self.conn, min(after, LARGEST_SEQUENCE), limit)

    def prune_events(self, recorded_before: float) -> int:
        """Remove the events recorded before that Unix time; return how many."""
        return self.events.prune_events(self.conn, recorded_before)

    def add_webhook(self, endpoint: dict) -> None:
        """Register a webhook endpoint: id, url, secret, created_at."""
        self.events.add_webhook(self.conn, endpoint)

    def list_webhooks(self) -> list[dict]:
        """Every webhook endpoint (id, url, created_at), oldest first."""
        return self.events.list_webhooks(self.conn)

    def remove_webhook(self, endpoint_id: str) -> bool:
        """Remove an endpoint and its queue; False if there is none."""
        return self.events.remove_webhook(self.conn, endpoint_id)

    def claim_deliveries(
        self, owner: str, now: float, lease_until: float, limit: int, excluded: list[str] = ()
    ) -> list:
        """Lease up to ``limit`` due deliveries, each the next of its endpoint and customer,
        none for the ``excluded`` endpoints."""
        return self.events.claim_deliveries(self.conn, owner, now, lease_until, limit, excluded)

    def release_some(self, owner: str, deliveries: list[dict]) -> None:
        """Give back these leased deliveries (endpoint, event), unsent."""
        self.events.release_some(self.conn, owner, deliveries)

    def finish_deliveries(self, owner: str, outcomes: list[dict]) -> None:
        """Record the outcome of leased deliveries: delivered, retry later or given up."""
        self.events.finish_deliveries(self.conn, owner, outcomes)

    def renew_leases(self, owner: str, lease_until: float, deliveries: list[dict]) -> None:
        """Extend ``owner``'s leases of these deliveries (endpoint, event)."""
        self.events.renew_leases(self.conn, owner, lease_until, deliveries)

    def release_deliveries(self, owner: str) -> None:
        """Give back the deliveries ``owner`` leased and did not finish."""
        self.events.release_deliveries(self.conn, owner)

    def webhook_status(self, failed_shown: int = 100) -> list[dict]:
        """Each endpoint's backlog, failed count, last error and first failed events."""
        return self.events.webhook_status(self.conn, failed_shown)

    def retry_failed(self, endpoint_id: str) -> int | None:
        """Queue an endpoint's failed deliveries again; how many, or None if it is unknown."""
        return self.events.retry_failed(self.conn, endpoint_id)

    def close(self) -> None:
        """Close a command's connection."""
        self.conn.close()


def backend(app: Flask | None = None):
    """The storage module the app's settings choose."""
    if setting("CUSTOMERS_DATABASE_URL", app):
        from customers_service import storage_postgres  # only installed with [postgres]

        return storage_postgres
    return storage


def events_backend(storage_module):
    """The events and webhooks storage module beside a customers storage module."""
    if storage_module is storage:
        return event_storage
    from customers_service import event_storage_postgres

    return event_storage_postgres


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
    url = setting("CUSTOMERS_DATABASE_URL", app)
    if url:
        return backend(app).safe_url(url)
    return setting("CUSTOMERS_DATABASE", app)


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

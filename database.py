"""The database as views and commands see it: one Store per thread, opened after any fork,
never creating the database; only prepare_database() creates and migrates it."""

import os
import threading
from collections.abc import Iterator, Mapping

from flask import Flask, current_app, g

from customers_service import storage
from customers_service.settings import setting

_thread = threading.local()


class DatabaseNotReady(Exception):
    """The database cannot be created or migrated; the message says why, for an operator."""


class Store:
    """One connection and the backend module that speaks its SQL.

    Views and commands call these methods and never ask which backend they have: a second
    backend is a second module with the same functions.
    """

    def __init__(self, backend, conn):
        self.backend, self.conn = backend, conn

    def upsert_customer(self, fields: Mapping[str, str | None]) -> dict:
        """Create the customer, or update the keys present in ``fields``; return the row."""
        return self.backend.upsert_customer(self.conn, fields)

    def get_customer(self, customer_id: str) -> dict | None:
        """The customer with that id, or None."""
        return self.backend.get_customer(self.conn, customer_id)

    def delete_customer(self, customer_id: str) -> dict | None:
        """Delete the customer and return it as it was, or None."""
        return self.backend.delete_customer(self.conn, customer_id)

    def list_customers(self, page: int, per_page: int) -> tuple[list[dict], int]:
        """One page of customers, newest first, and the total count."""
        return self.backend.list_customers(self.conn, page, per_page)

    def check_health(self, min_free_bytes: int) -> None:
        """Raise the backend's error unless the database takes a write and has room for more."""
        self.backend.check(self.conn, min_free_bytes)

    def import_batch(self, rows: list[dict]) -> int:
        """Upsert prepared rows (see storage.upsert_params) in one transaction; return how many
        customers they created."""
        return self.backend.import_batch(self.conn, rows)

    def export_lines(self) -> Iterator[str]:
        """Every customer as one line of JSON, from one snapshot, streamed."""
        return self.backend.export_lines(self.conn)

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def fault(error: BaseException) -> tuple[str, str] | None:
    """The contract's 503 code and message for a database fault (database_busy, ...), or None
    for any other error, a refused constraint included."""
    return storage.fault(error)


def database_settings(app: Flask | None = None) -> tuple[str, str, float]:
    """The database's path, synchronous mode and lock timeout, from the app's settings."""
    app = app or current_app
    return (
        setting("CUSTOMERS_DATABASE", app),
        str(setting("CUSTOMERS_SQLITE_SYNCHRONOUS", app)).upper(),
        float(setting("CUSTOMERS_SQLITE_TIMEOUT", app)),
    )


def prepare_database(app: Flask) -> str:
    """Create the database if it is missing and apply pending migrations; return where it is.

    The only code that creates a database: ``flask customers init-db`` and a server's start
    (before any worker forks) call it; a request never does.
    """
    path, synchronous, timeout = database_settings(app)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DatabaseNotReady(f"the database's folder {folder} does not exist: create it first")
    try:
        conn = storage.connect(path, synchronous=synchronous, timeout=timeout, create=True)
        try:
            storage.migrate(conn)
        finally:
            conn.close()
    except (OSError, storage.Error) as e:
        raise DatabaseNotReady(f"cannot prepare the database {path}: {e}") from None
    return path


def open_store(app: Flask | None = None) -> Store:
    """A new Store on the existing, migrated database, for a command; the caller closes it."""
    path, synchronous, timeout = database_settings(app)
    return Store(storage, storage.connect_ready(path, synchronous=synchronous, timeout=timeout))


def get_store() -> Store:
    """This request's Store: this thread's connection, reopened after a fork or if the file
    was replaced, and never a database created in place of a missing one."""
    if "customers_store" not in g:
        g.customers_store = Store(storage, _thread_connection(*database_settings()))
    return g.customers_store


def release_store() -> None:
    """End the request's use of its connection, rolling back anything left open."""
    store = g.pop("customers_store", None)
    if store is not None and store.conn.in_transaction:
        store.conn.rollback()


def forget_store() -> None:
    """Close this thread's connection after a fault, so the next request opens a fresh one."""
    g.pop("customers_store", None)
    _drop_thread_connection(setting("CUSTOMERS_DATABASE"))


def _thread_connection(path: str, synchronous: str, timeout: float):
    """This thread's connection to ``path`` (opening one costs more than most requests)."""
    key = (os.getpid(), path, synchronous, timeout)
    cached = getattr(_thread, "connections", None)
    if cached is None:
        cached = _thread.connections = {}
    entry = cached.get(key)
    try:
        identity = storage.file_identity(path)
    except storage.DatabaseMissing:
        _drop_thread_connection(path)
        raise
    if entry is not None:
        if entry[0] == identity:
            return entry[1]
        _drop_thread_connection(path)
    conn = storage.connect_ready(path, synchronous=synchronous, timeout=timeout)
    cached[key] = (storage.file_identity(path), conn)
    return conn


def _drop_thread_connection(path: str) -> None:
    """Close this thread's connections to ``path``."""
    cached = getattr(_thread, "connections", {})
    for key in [k for k in cached if k[1] == path]:
        _, conn = cached.pop(key)
        if key[0] == os.getpid():  # one inherited through a fork is the parent's to close
            conn.close()

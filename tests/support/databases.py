"""A test's database on either backend, and checks that read it with plain SQL."""

import sqlite3
from pathlib import Path

from support.postgres_cluster import psycopg_connect
from support.service import API_KEY, started_app

from customers_service import database, storage


class Backend:
    """One test's database on one backend: the app's settings for it, and plain SQL on it."""

    def __init__(self, name: str, config: dict, sqlite_path: Path | None = None, url: str = ""):
        self.name, self.config, self.sqlite_path, self.url = name, config, sqlite_path, url

    def fetch(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of a query written in the SQL both backends share (``?`` for parameters)."""
        if self.name == "sqlite":
            with sqlite3.connect(self.sqlite_path) as db:
                return db.execute(sql, params).fetchall()
        with psycopg_connect(self.url) as conn:
            return conn.execute(sql.replace("?", "%s"), params).fetchall()

    def execute_many(self, sql: str, rows: list[tuple]) -> None:
        """A statement in the SQL both backends share, once per row, in one transaction."""
        if self.name == "sqlite":
            with sqlite3.connect(self.sqlite_path) as db:
                db.executemany(sql, rows)
            return
        with psycopg_connect(self.url) as conn, conn.transaction():
            conn.cursor().executemany(sql.replace("?", "%s"), rows)

    @property
    def env(self) -> dict:
        """The same settings as environment variables, for a server process."""
        return {key: str(value) for key, value in self.config.items()}


def answers_of_both_backends(postgres, tmp_path: Path, source: Path, ask) -> dict:
    """``ask(client)`` on each backend ("sqlite", "postgres"), each a fresh database into which
    ``source`` (JSON Lines) was imported."""
    name = postgres.new_database()
    answers = {}
    try:
        for label, config in (
            ("sqlite", {"CUSTOMERS_DATABASE": str(tmp_path / "same.sqlite3")}),
            ("postgres", {"CUSTOMERS_DATABASE_URL": postgres.url(name)}),
        ):
            app = started_app({**config, "CUSTOMERS_API_KEYS": API_KEY})
            imported = app.test_cli_runner().invoke(args=["customers", "import", str(source)])
            assert imported.exit_code == 0, imported.output
            answers[label] = ask(app.test_client())
            database.close_connections()
    finally:
        postgres.drop_database(name)
    return answers


def assert_all_acknowledged_present(backend: Backend, acked: list[dict]) -> None:
    """Every acknowledged customer is stored with exactly the values sent."""
    columns = ", ".join(storage.FIELDS)
    stored = {
        row[0]: dict(zip(storage.FIELDS, row, strict=True))
        for row in backend.fetch(f"SELECT {columns} FROM customers")
    }
    for customer in acked:
        row = stored.get(customer["customer_id"])
        assert row is not None, f"acknowledged but lost: {customer['customer_id']}"
        assert {k: row[k] for k in customer} == customer

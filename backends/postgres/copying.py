"""PostgreSQL's side of a copy between databases (copying.py), the counterparts of
backends/sqlite/copying.py: each kind read in key order in one repeatable-read snapshot, copied
rows written with COPY without recording events, and the copy's progress."""

import contextlib
import json
from collections.abc import Iterator

import psycopg
from psycopg.rows import tuple_row

from customers_service.backends.postgres.schema import AS_TEXT, MIGRATIONS, schema_version
from customers_service.backends.shared import INSERTED, copied_customer
from customers_service.storage import COPIED, KEY_WIDTH

KEYS = {kind: COPIED[kind][: KEY_WIDTH.get(kind, 1)] for kind in COPIED}

# Values leave as SQLite stores them: uuids and times as the API writes them (AS_TEXT), JSON
# as text (jsonb's text for metadata; an event's customer as it was recorded).
AS_COPIED = {
    "customers": {**AS_TEXT, "metadata": "metadata::text"},
    "events": {"id": "id::text", "customer": "customer::text"},
}
# SQLite: the same selection, its row values compared the same way.
SELECT_COPIED = {
    kind: "SELECT "
    + ", ".join(AS_COPIED.get(kind, {}).get(c, c) for c in columns)
    + f" FROM {kind} {{after}} ORDER BY {', '.join(KEYS[kind])} LIMIT %s"
    for kind, columns in COPIED.items()
}
AFTER = {
    kind: f"WHERE ({', '.join(key)}) > ({', '.join('%s' for _ in key)})"
    for kind, key in KEYS.items()
}
# SQLite: INSERT; here COPY, its text format read by each column's type (jsonb, uuid, ...).
COPY_IN = {
    kind: f"COPY {kind} ({', '.join(INSERTED if kind == 'customers' else columns)}) FROM STDIN"
    for kind, columns in COPIED.items()
}
# SQLite drops and makes again its trigger; here it is turned off in the transaction. The
# deferred trigger's events are queued, or not, as each row is written: none while it is off.
EVENTS_OFF = "ALTER TABLE customers DISABLE TRIGGER customers_events"
EVENTS_ON = "ALTER TABLE customers ENABLE TRIGGER customers_events"

RECORD_PROGRESS = """
INSERT INTO copy_progress (id, progress) VALUES (1, %s)
ON CONFLICT (id) DO UPDATE SET progress = excluded.progress
"""
LAST_SEQUENCE = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM events_sequence"
# The cluster's identifier and the database's oid: a standby has its primary's, and is the same
# database.
IDENTITY = """
SELECT system_identifier::text, (SELECT oid FROM pg_database WHERE datname = current_database())
FROM pg_control_system()
"""


@contextlib.contextmanager
def copy_snapshot(conn: psycopg.Connection) -> Iterator[None]:
    """Backend.copy_snapshot: a repeatable-read, read-only transaction, its snapshot taken by a
    first statement."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute("SELECT 1")
        yield


def copy_contents(conn: psycopg.Connection) -> dict:
    """Backend.copy_contents: the cluster's system identifier and the database's oid are its
    identity."""
    cursor = conn.cursor(row_factory=tuple_row)

    def one(sql: str, table: str, default):
        if cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]:
            row = cursor.execute(sql).fetchone()
            return default if row is None else row[0]
        return default

    progress = one("SELECT progress FROM copy_progress", "copy_progress", None)
    return {
        "identity": ["postgres", *cursor.execute(IDENTITY).fetchone()],
        "migrated": schema_version(conn) >= len(MIGRATIONS),
        "counts": {kind: one(f"SELECT count(*) FROM {kind}", kind, 0) for kind in COPIED},
        "pruned": one("SELECT up_to FROM events_pruned", "events_pruned", 0),
        "last_sequence": one(LAST_SEQUENCE, "events_sequence", 0),
        "progress": None if progress is None else json.loads(progress),
    }


def copy_rows(conn: psycopg.Connection, kind: str, after: list | None, limit: int) -> list[tuple]:
    """Backend.copy_rows: a range of the kind's primary key."""
    after_sql, params = ("", []) if after is None else (AFTER[kind], list(after))
    cursor = conn.cursor(row_factory=tuple_row)
    return cursor.execute(SELECT_COPIED[kind].format(after=after_sql), [*params, limit]).fetchall()


def write_copied(conn: psycopg.Connection, kind: str, rows: list[tuple], progress: dict) -> None:
    """Backend.write_copied: DDL is transactional here too, so the trigger is never left off."""
    values = map(copied_customer, rows) if kind == "customers" else rows
    with conn.transaction(), conn.cursor() as cursor:
        if kind == "customers":
            cursor.execute(EVENTS_OFF)
        with cursor.copy(COPY_IN[kind]) as copy:
            for row in values:
                copy.write_row(row)
        if kind == "customers":
            cursor.execute(EVENTS_ON)
        cursor.execute(RECORD_PROGRESS, (json.dumps(progress),))


def finish_copy(conn: psycopg.Connection, pruned: int, last_sequence: int) -> None:
    """Backend.finish_copy: setval is not undone by a rollback, but setting it again to the
    same number is harmless."""
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cursor:
        cursor.execute("UPDATE events_pruned SET up_to = %s", (pruned,))
        last = max(last_sequence, cursor.execute(LAST_SEQUENCE).fetchone()[0])
        if last > 0:
            cursor.execute("SELECT setval('events_sequence', %s)", (last,))
        cursor.execute("DELETE FROM copy_progress")

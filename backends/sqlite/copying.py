"""SQLite's side of a copy between databases (copying.py): each kind read in key order from one
read transaction, copied rows written without recording events, and the copy's progress.
backends/postgres/copying.py holds the PostgreSQL counterparts."""

import contextlib
import json
import sqlite3
from collections.abc import Iterator

from customers_service.backends.shared import INSERTED, copied_customer
from customers_service.backends.sqlite.connections import file_identity, write
from customers_service.backends.sqlite.schema import MIGRATIONS, body_sql, schema_version
from customers_service.storage import COPIED, KEY_WIDTH

KEYS = {kind: COPIED[kind][: KEY_WIDTH.get(kind, 1)] for kind in COPIED}

# Each kind in its key's order, from the first row or after a key (a row value: SQLite compares
# (event, endpoint) > (?, ?) as the primary key orders them).
SELECT_COPIED = {
    kind: f"SELECT {', '.join(columns)} FROM {kind} {{after}} ORDER BY {', '.join(KEYS[kind])} "
    "LIMIT ?"
    for kind, columns in COPIED.items()
}
AFTER = {
    kind: f"WHERE ({', '.join(key)}) > ({', '.join('?' for _ in key)})"
    for kind, key in KEYS.items()
}

# Metadata is stored as SQLite writes it (compact JSON: json() makes PostgreSQL's jsonb text so).
# A customer's body is written with its row, from the values named as its columns.
COPIED_VALUES = ", ".join(f"json(?) AS {c}" if c == "metadata" else f"? AS {c}" for c in INSERTED)
INSERT_COPIED = {
    "customers": f"INSERT INTO customers ({', '.join(INSERTED)}, body) "
    f"SELECT *, {body_sql()} FROM (SELECT {COPIED_VALUES})",
    **{
        kind: f"INSERT INTO {kind} ({', '.join(columns)}) "
        f"VALUES ({', '.join('?' for _ in columns)})"
        for kind, columns in COPIED.items()
        if kind != "customers"
    },
}
# The trigger that records a created customer's event (schema.event_trigger): dropped while
# copied customers are inserted, then made again from its own stored text, in one transaction.
EVENT_TRIGGER = "customers_event_created"
TRIGGER_TEXT = "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?"

# A copy writes every index of tables that grow to millions of rows: a page cache that holds
# them (128 MiB, for this connection only) spares reading their pages again and again.
COPY_CACHE = "PRAGMA cache_size = -131072"

RECORD_PROGRESS = """
INSERT INTO copy_progress (id, progress) VALUES (1, ?)
ON CONFLICT (id) DO UPDATE SET progress = excluded.progress
"""
# sqlite_sequence holds AUTOINCREMENT's largest sequence given out; inserting an event with its
# sequence raises it, and the copy raises it to the source's own (its newest may be pruned).
LAST_SEQUENCE = "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
FINISH = (
    "UPDATE events_pruned SET up_to = :pruned",
    "UPDATE sqlite_sequence SET seq = max(seq, :last) WHERE name = 'events'",
    """INSERT INTO sqlite_sequence (name, seq) SELECT 'events', :last
       WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'events')""",
    "DELETE FROM copy_progress",
)


@contextlib.contextmanager
def copy_snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """Backend.copy_snapshot: one read transaction, its snapshot taken by a first read."""
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        yield
    finally:
        conn.rollback()


def copy_contents(conn: sqlite3.Connection) -> dict:
    """Backend.copy_contents: the file's device and inode are its identity."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def one(sql: str, table: str, default):
        row = conn.execute(sql).fetchone() if table in tables else None
        return default if row is None else row[0]

    progress = one("SELECT progress FROM copy_progress", "copy_progress", None)
    return {
        "identity": ["sqlite", *file_identity(conn.path)],
        "migrated": schema_version(conn) >= len(MIGRATIONS),
        "counts": {kind: one(f"SELECT count(*) FROM {kind}", kind, 0) for kind in COPIED},
        "pruned": one("SELECT up_to FROM events_pruned", "events_pruned", 0),
        "last_sequence": one(LAST_SEQUENCE, "sqlite_sequence", 0),
        "progress": None if progress is None else json.loads(progress),
    }


def copy_rows(conn: sqlite3.Connection, kind: str, after: list | None, limit: int) -> list[tuple]:
    """Backend.copy_rows: a range of the kind's primary key."""
    cursor = conn.cursor()
    cursor.row_factory = None  # plain tuples
    after_sql, params = ("", []) if after is None else (AFTER[kind], list(after))
    return cursor.execute(SELECT_COPIED[kind].format(after=after_sql), [*params, limit]).fetchall()


def write_copied(conn: sqlite3.Connection, kind: str, rows: list[tuple], progress: dict) -> None:
    """Backend.write_copied. SQLite's schema changes are transactional: the event trigger is
    back when the transaction commits, and never gone if it does not."""
    conn.execute(COPY_CACHE)
    with write(conn):
        conn.execute("BEGIN IMMEDIATE")
        if kind == "customers":
            (trigger,) = conn.execute(TRIGGER_TEXT, (EVENT_TRIGGER,)).fetchone()
            conn.execute(f"DROP TRIGGER {EVENT_TRIGGER}")
            conn.executemany(INSERT_COPIED[kind], map(copied_customer, rows))
            conn.execute(trigger)
        else:
            conn.executemany(INSERT_COPIED[kind], rows)
        conn.execute(RECORD_PROGRESS, (json.dumps(progress),))


def finish_copy(conn: sqlite3.Connection, pruned: int, last_sequence: int) -> None:
    """Backend.finish_copy."""
    with write(conn):
        conn.execute("BEGIN IMMEDIATE")
        for statement in FINISH:
            conn.execute(statement, {"pruned": pruned, "last": last_sequence})

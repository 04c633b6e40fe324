"""SQLite's schema: the ordered migrations (tables, indexes and the triggers that keep the
counter, the metadata pairs, the search index, the events and the stored bodies), and how they
are applied. backends/postgres/schema.py is the same schema in PostgreSQL's terms."""

import sqlite3
from collections.abc import Mapping

from customers_service.backends.shared import FOLDED
from customers_service.storage import COLUMNS, SEARCHED, fold

# The application-defined function that writes a customer's body (shared.customer_body), which
# every connection of the backend registers (connections.py): SQLite's own JSON functions write
# non-ASCII as it is, where the API escapes it.
CUSTOMER_JSON = "customer_json"


def body_sql(values: Mapping[str, str] | None = None) -> str:
    """The SQL expression of a customer's body: CUSTOMER_JSON of each column's value, given as
    SQL in ``values`` (the column itself when absent)."""
    values = values or {}
    return f"{CUSTOMER_JSON}({', '.join(values.get(c, c) for c in COLUMNS)})"


def event_trigger(operation: str, kind: str, row: str, of: tuple[str, ...] = ()) -> str:
    """The trigger that records the event of one kind of change, in the change's transaction,
    and queues it for every webhook endpoint registered now; with ``of``, only a change that
    sets one of those columns."""
    customer = ", ".join(
        f"'{c}', json({row}.{c})" if c == "metadata" else f"'{c}', {row}.{c}" for c in COLUMNS
    )
    changed_at = "new.updated_at" if row == "new" else "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')"
    name, columns = f"customers_event_{kind.split('.')[1]}", f" OF {', '.join(of)}" if of else ""
    return f"""CREATE TRIGGER {name} AFTER {operation}{columns} ON customers
       BEGIN
           INSERT INTO events (id, webhook_type, created_at, recorded_at, customer)
           VALUES ({RANDOM_UUID}, '{kind}', {changed_at}, {UNIX_NOW}, json_object({customer}));
           INSERT INTO webhook_deliveries (endpoint, event, customer_id)
           SELECT id, last_insert_rowid(), {row}.customer_id FROM webhook_endpoints;
       END"""


# A version 4 UUID, made by SQLite itself so that any writer records events the same way.
RANDOM_UUID = """lower(printf('%s-%s-4%s-%s%s-%s',
    hex(randomblob(4)), hex(randomblob(2)), substr(hex(randomblob(2)), 2),
    substr('89ab', 1 + (abs(random()) % 4), 1), substr(hex(randomblob(2)), 2),
    hex(randomblob(6))))"""
UNIX_NOW = "(julianday('now') - 2440587.5) * 86400.0"


def search_index(options: str) -> tuple[str, ...]:
    """The search index with FTS5's ``options``, its triggers and merge options, filled: a
    trigram index of the folded fields, which FTS5 reads from customers."""
    listed = ", ".join(FOLDED)
    insert = f"""INSERT INTO customer_search (rowid, {listed})
               VALUES (new.id, {", ".join(f"new.{c}" for c in FOLDED)})"""
    delete = f"""INSERT INTO customer_search (customer_search, rowid, {listed})
               VALUES ('delete', old.id, {", ".join(f"old.{c}" for c in FOLDED)})"""
    return (
        f"""CREATE VIRTUAL TABLE customer_search USING fts5(
            {listed}, content='customers', content_rowid='id',
            tokenize='trigram case_sensitive 1', {options}
        )""",
        f"CREATE TRIGGER customers_search_in AFTER INSERT ON customers BEGIN {insert}; END",
        # customer_id never changes; only a change of a searched field rewrites the index.
        f"""CREATE TRIGGER customers_search_changed
           AFTER UPDATE OF {", ".join(FOLDED[1:])} ON customers
           WHEN {" OR ".join(f"new.{c} IS NOT old.{c}" for c in FOLDED[1:])}
           BEGIN {delete}; {insert}; END""",
        f"CREATE TRIGGER customers_search_out AFTER DELETE ON customers BEGIN {delete}; END",
        "INSERT INTO customer_search (customer_search, rank) VALUES ('automerge', 8)",
        "INSERT INTO customer_search (customer_search, rank) VALUES ('pgsz', 2000)",
        "INSERT INTO customer_search (customer_search) VALUES ('rebuild')",
    )


# Each step runs once, in order, in its own transaction; PRAGMA user_version counts the steps
# done. Append new steps; never edit or reorder a released one.
MIGRATIONS = (
    (
        """CREATE TABLE customers (
            id INTEGER PRIMARY KEY,
            lago_id TEXT NOT NULL UNIQUE,
            customer_id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            country TEXT, address_line1 TEXT, address_line2 TEXT, state TEXT, zipcode TEXT,
            email TEXT, city TEXT, url TEXT, phone TEXT, logo_url TEXT,
            legal_name TEXT, legal_number TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        "CREATE INDEX customers_newest_first ON customers (created_at DESC, id DESC)",
        # The list's total is read on every page; counting a large table each time is too slow.
        "CREATE TABLE customer_count (n INTEGER NOT NULL)",
        "INSERT INTO customer_count (n) VALUES (0)",
        """CREATE TRIGGER customers_counted_in AFTER INSERT ON customers
           BEGIN UPDATE customer_count SET n = n + 1; END""",
        """CREATE TRIGGER customers_counted_out AFTER DELETE ON customers
           BEGIN UPDATE customer_count SET n = n - 1; END""",
    ),
    (
        # /health writes here: a disk that is full or read-only fails a write, not a read.
        "CREATE TABLE health_probe (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at TEXT)",
        "INSERT INTO health_probe (id, checked_at) VALUES (1, NULL)",
    ),
    (
        # Metadata and the list's filters (issue 11).
        "ALTER TABLE customers ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}'",
        *(f"ALTER TABLE customers ADD COLUMN {column} TEXT" for column in FOLDED),
        lambda conn: fold_existing(conn),
        "CREATE INDEX customers_recently_updated ON customers (updated_at DESC, id DESC)",
        "CREATE INDEX customers_by_country ON customers (country, created_at DESC, id DESC)",
        "CREATE INDEX customers_by_state ON customers (state)",
        "CREATE INDEX customers_by_zipcode ON customers (zipcode)",
        "CREATE INDEX customers_by_email ON customers (folded_email)",
        # The merged metadata holds at most 50 keys; the API checks what it can see before
        # writing, this checks the merge, inside the write.
        """CREATE TRIGGER customers_metadata_limit BEFORE UPDATE OF metadata ON customers
           WHEN new.metadata IS NOT old.metadata
                AND (SELECT count(*) FROM json_each(new.metadata)) > 50
           BEGIN SELECT RAISE(ABORT, 'too_many_metadata_keys'); END""",
        # metadata[KEY]=VALUE finds customers through this table of pairs, kept by triggers.
        """CREATE TABLE customer_metadata (
            customer INTEGER NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (customer, key)
        ) WITHOUT ROWID""",
        "CREATE INDEX customer_metadata_pairs ON customer_metadata (key, value)",
        """CREATE TRIGGER customers_metadata_in AFTER INSERT ON customers
           WHEN new.metadata <> '{}'
           BEGIN
               INSERT INTO customer_metadata SELECT new.id, key, value FROM json_each(new.metadata);
           END""",
        """CREATE TRIGGER customers_metadata_changed AFTER UPDATE OF metadata ON customers
           WHEN new.metadata IS NOT old.metadata
           BEGIN
               DELETE FROM customer_metadata WHERE customer = old.id;
               INSERT INTO customer_metadata SELECT new.id, key, value FROM json_each(new.metadata);
           END""",
        """CREATE TRIGGER customers_metadata_out AFTER DELETE ON customers
           WHEN old.metadata <> '{}'
           BEGIN DELETE FROM customer_metadata WHERE customer = old.id; END""",
        # search_term: a trigram index of the folded fields (FTS5 reads them from customers).
        f"""CREATE VIRTUAL TABLE customer_search USING fts5(
            {", ".join(FOLDED)},
            content='customers', content_rowid='id', tokenize='trigram case_sensitive 1'
        )""",
        f"""CREATE TRIGGER customers_search_in AFTER INSERT ON customers
           BEGIN
               INSERT INTO customer_search (rowid, {", ".join(FOLDED)})
               VALUES (new.id, {", ".join(f"new.{c}" for c in FOLDED)});
           END""",
        f"""CREATE TRIGGER customers_search_changed
           AFTER UPDATE OF {", ".join(FOLDED[1:])} ON customers
           WHEN {" OR ".join(f"new.{c} IS NOT old.{c}" for c in FOLDED[1:])}
           BEGIN
               INSERT INTO customer_search (customer_search, rowid, {", ".join(FOLDED)})
               VALUES ('delete', old.id, {", ".join(f"old.{c}" for c in FOLDED)});
               INSERT INTO customer_search (rowid, {", ".join(FOLDED)})
               VALUES (new.id, {", ".join(f"new.{c}" for c in FOLDED)});
           END""",
        f"""CREATE TRIGGER customers_search_out AFTER DELETE ON customers
           BEGIN
               INSERT INTO customer_search (customer_search, rowid, {", ".join(FOLDED)})
               VALUES ('delete', old.id, {", ".join(f"old.{c}" for c in FOLDED)});
           END""",
        "INSERT INTO customer_search (customer_search) VALUES ('rebuild')",
    ),
    (
        # Events and webhooks (issue 12): see events.py for how they are read.
        # AUTOINCREMENT: a sequence is never reused, even after the newest events are pruned.
        """CREATE TABLE events (
            sequence INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL,
            webhook_type TEXT NOT NULL,
            created_at TEXT NOT NULL,
            recorded_at REAL NOT NULL,
            customer TEXT NOT NULL
        )""",
        # The largest sequence pruned: the feed answers 410 to a consumer behind it.
        "CREATE TABLE events_pruned (id INTEGER PRIMARY KEY CHECK (id = 1), up_to INTEGER)",
        "INSERT INTO events_pruned (id, up_to) VALUES (1, 0)",
        """CREATE TABLE webhook_endpoints (
            id TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            secret TEXT NOT NULL,
            created_at TEXT NOT NULL,
            last_error TEXT,
            last_error_at TEXT
        )""",
        # One row per event and endpoint until it is delivered (then deleted) or given up
        # (failed = 1). Times are Unix seconds. Two B-trees only, since every change writes a
        # row per endpoint: the key, in event order (the deliverer's walk, pruning), and the
        # per-customer index (the order rule; an endpoint's rows: status, retry, removal).
        """CREATE TABLE webhook_deliveries (
            endpoint TEXT NOT NULL,
            event INTEGER NOT NULL,
            customer_id TEXT NOT NULL,
            failed INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            first_try REAL,
            next_try REAL NOT NULL DEFAULT 0,
            leased_until REAL NOT NULL DEFAULT 0,
            lease_owner TEXT,
            last_error TEXT,
            PRIMARY KEY (event, endpoint)
        ) WITHOUT ROWID""",
        """CREATE INDEX webhook_deliveries_per_customer
           ON webhook_deliveries (endpoint, customer_id, event)""",
        *(
            event_trigger(operation, kind, row)
            for operation, kind, row in (
                ("INSERT", "customer.created", "new"),
                ("UPDATE", "customer.updated", "new"),
                ("DELETE", "customer.deleted", "old"),
            )
        ),
    ),
    (
        # Cheaper writes of the search index: FTS5 merges its segments when 8 of a level gather
        # (4 by default) and writes smaller pages; searches cost about the same (bench/README.md).
        "INSERT INTO customer_search (customer_search, rank) VALUES ('automerge', 8)",
        "INSERT INTO customer_search (customer_search, rank) VALUES ('pgsz', 2000)",
    ),
    (
        # A copy from another database (issue 22, copying.py) records how far it got here, in
        # the transaction of each batch it writes, so that a rerun resumes it; the row goes
        # when the copy is finished.
        """CREATE TABLE copy_progress (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            progress TEXT NOT NULL
        )""",
    ),
    (
        # Stored bodies (issue 23): each customer's JSON object as the API answers it, written
        # by the statement that writes the row (the upsert computes it with CUSTOMER_JSON), so
        # reads answer it as it is. Filling it changes no customer: no event for that, and none
        # for an update of the body alone, from here on.
        "DROP TRIGGER customers_event_updated",
        "ALTER TABLE customers ADD COLUMN body TEXT",
        f"UPDATE customers SET body = {body_sql()}",
        event_trigger("UPDATE", "customer.updated", "new", of=COLUMNS),
        # A writer outside the service (the sqlite3 shell, say) that changes a customer's
        # columns without its body leaves a body that no longer says the same: it is emptied,
        # and reads make the body from the columns (BODY) until the next upsert writes it.
        f"""CREATE TRIGGER customers_body_outdated AFTER UPDATE OF {", ".join(COLUMNS)}
           ON customers
           WHEN new.body IS old.body AND new.body IS NOT NULL
           BEGIN UPDATE customers SET body = NULL WHERE id = new.id; END""",
    ),
    (
        # Cheaper writes of the search index (issue 23): it keeps which customers hold each
        # trigram, not where (detail=none), nor each field's length (columnsize=0, which only
        # ranking reads). A term of more than one trigram finds the customers holding all its
        # trigrams, and instr() keeps those holding the term (customers.filter_sql).
        "DROP TRIGGER customers_search_in",
        "DROP TRIGGER customers_search_changed",
        "DROP TRIGGER customers_search_out",
        "DROP TABLE customer_search",
        *search_index("detail=none, columnsize=0"),
    ),
)

# A customer's body as reads select it: the stored one, or when a writer outside the service left
# none (an INSERT without it, or customers_body_outdated), the same text made from the columns.
BODY = f"coalesce(body, {body_sql()})"


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every migration step not yet applied; return the schema version."""
    version = schema_version(conn)
    for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have applied this step while we waited for the lock.
            if schema_version(conn) >= number:
                conn.execute("ROLLBACK")
                continue
            for statement in step:
                statement(conn) if callable(statement) else conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """How many migration steps the database has had."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def fold_existing(conn: sqlite3.Connection) -> None:
    """Fill the folded columns of the customers stored before they existed (a migration)."""
    conn.create_function("fold", 1, fold, deterministic=True)
    conn.execute(f"UPDATE customers SET {', '.join(f'folded_{f} = fold({f})' for f in SEARCHED)}")

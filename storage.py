"""SQLite storage of customers: plain SQL in a few functions that take a connection first."""

import contextlib
import dataclasses
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from operator import itemgetter
from urllib.parse import quote

from customers_service.wal_sync import WalSync

FIELDS = (
    "customer_id",
    "name",
    "country",
    "address_line1",
    "address_line2",
    "state",
    "zipcode",
    "email",
    "city",
    "url",
    "phone",
    "logo_url",
    "legal_name",
    "legal_number",
)
REQUIRED = FIELDS[:2]
OPTIONAL_FIELDS = FIELDS[2:]
SET = {f: "set_" + f for f in OPTIONAL_FIELDS}  # each optional field's flag parameter
COLUMNS = ("lago_id", *FIELDS, "metadata", "created_at", "updated_at")
# search_term looks in these, and email is matched on its folded copy: folded_<field> holds the
# field as fold() makes it, so "ignoring case" means one thing on both backends, whatever the
# database's locale.
SEARCHED = ("customer_id", "name", "legal_name", "email")
FOLDED = tuple(f"folded_{f}" for f in SEARCHED)


def event_trigger(operation: str, kind: str, row: str) -> str:
    """The trigger that records the event of one kind of change, in the change's transaction,
    and queues it for every webhook endpoint registered now."""
    customer = ", ".join(
        f"'{c}', json({row}.{c})" if c == "metadata" else f"'{c}', {row}.{c}" for c in COLUMNS
    )
    changed_at = "new.updated_at" if row == "new" else "strftime('%Y-%m-%dT%H:%M:%SZ', 'now')"
    return f"""CREATE TRIGGER customers_event_{kind.split(".")[1]} AFTER {operation} ON customers
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
        # Events and webhooks (issue 12): see event_storage.py for how they are read.
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
        # Cheaper writes of the search index (issue 14): FTS5 merges its segments when 8 of a
        # level gather (4 by default) and writes pages of 2,000 bytes (4,050): an insert costs
        # about 60,000 instructions less (bench/README.md), and a search about the same.
        "INSERT INTO customer_search (customer_search, rank) VALUES ('automerge', 8)",
        "INSERT INTO customer_search (customer_search, rank) VALUES ('pgsz', 2000)",
    ),
)

SELECTED = ", ".join(COLUMNS)

INSERTED = ("lago_id", *FIELDS, "metadata", *FOLDED, "created_at", "updated_at")
KEEP_ABSENT = ", ".join(
    f"{column} = iif(:set_{f}, excluded.{column}, {column})"
    for f in OPTIONAL_FIELDS
    for column in (f, f"folded_{f}")
    if column in INSERTED
)
# A key absent from the request keeps the stored value: its :set_<field> flag is 0.
# lago_id and created_at are only ever written by the insert. Metadata is merged (RFC 7396:
# json_patch), or emptied when the request's metadata is null.
UPSERT_MANY = f"""
INSERT INTO customers ({", ".join(INSERTED)})
VALUES ({", ".join(":" + c for c in INSERTED)})
ON CONFLICT (customer_id) DO UPDATE SET
    name = excluded.name,
    folded_name = excluded.folded_name,
    {KEEP_ABSENT},
    metadata = CASE
        WHEN NOT :set_metadata THEN metadata
        WHEN :metadata_patch IS NULL THEN '{{}}'
        ELSE json_patch(metadata, :metadata_patch)
    END,
    updated_at = :now
"""

UPSERT_CUSTOMER = UPSERT_MANY + f"RETURNING {SELECTED}"

SELECT_CUSTOMER = f"SELECT {SELECTED} FROM customers WHERE customer_id = ?"

DELETE_CUSTOMER = f"DELETE FROM customers WHERE customer_id = ? RETURNING {SELECTED}"

# WHERE and ORDER BY come from filter_sql() and order_sql(); the table may name the index to walk.
SELECT_PAGE = f"""
SELECT {SELECTED} FROM {{table}}
WHERE {{where}}
ORDER BY {{order}}
LIMIT :limit OFFSET :offset
"""

SELECT_FILTERED_COUNT = "SELECT count(*) FROM customers WHERE {where}"
COUNT_SEARCH = "SELECT count(*) FROM customer_search WHERE customer_search MATCH ?"
COUNT_PAIR = "SELECT count(*) FROM customer_metadata WHERE key = ? AND value = ?"

SELECT_COUNT = "SELECT n FROM customer_count"

# Metadata keys in code point order, as rows give them (customer_from_row).
SORTED_METADATA = """(SELECT json_group_object(key, value)
    FROM (SELECT key, value FROM json_each(customers.metadata) ORDER BY key))"""
EXPORTED = {"metadata": SORTED_METADATA}

# The export's lines, made by SQLite's own JSON functions: several times faster than Python.
EXPORT_LINES = f"""
SELECT json_object('customer', json_object({
    ", ".join(f"'{c}', {EXPORTED.get(c, c)}" for c in COLUMNS)
}))
FROM customers ORDER BY id
"""

PROBE_WRITE = "UPDATE health_probe SET checked_at = ? WHERE id = 1"

SYNCHRONOUS_MODES = ("FULL", "NORMAL")

# Seconds an import pauses after each batch, per second the batch's transaction took. SQLite has
# one write lock, and its busy handler lets a writer that retries at once (the import) win over
# the service's writers, which sleep between tries: pausing as long as it wrote gives them the
# lock, while the import's worker processes go on checking the next batches, so the import keeps
# most of its speed (bench/import_live.py measures both).
IMPORT_PAUSE = 1.0


Error = sqlite3.Error

# The contract's 503 codes for SQLite's primary error codes; any other fault is unavailable.
FAULTS = {
    "SQLITE_BUSY": ("database_busy", "the database is busy; retry"),
    "SQLITE_LOCKED": ("database_busy", "the database is busy; retry"),
    "SQLITE_FULL": ("database_full", "the disk under the database is full"),
    "SQLITE_READONLY": ("database_read_only", "the database cannot be written"),
}
UNAVAILABLE = ("database_unavailable", "the database is unavailable")


class TooManyMetadataKeys(Exception):
    """The merged metadata would hold more than 50 keys: nothing was written."""


class DatabaseMissing(sqlite3.OperationalError):
    """The database file is not where it should be, or was never initialised."""


class DiskNearlyFull(sqlite3.OperationalError):
    """The disk under the database has less room than the service asks to keep free."""


class Connection(sqlite3.Connection):
    """A connection that knows its file and whether its commits must reach the disk."""

    path = ""
    durability: "WalSync | None" = None  # set when synchronous is FULL: write() uses it

    def close(self) -> None:
        if self.durability is not None:
            self.durability.close()
            self.durability = None
        super().close()


def connect(
    path: str, *, synchronous: str = "FULL", timeout: float = 5.0, create: bool = False
) -> Connection:
    """Open the database with its pragmas set.

    Unless ``create``, the file must exist (DatabaseMissing otherwise), and it is opened in a
    mode in which SQLite never creates it, even if it vanishes meanwhile.
    """
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}")
    conn = _open(path, timeout, create)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL is kept by write(), which fsyncs the WAL after each commit; see there why.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        if synchronous == "FULL" and path != ":memory:":
            conn.durability = WalSync(path)
    except OSError as e:  # the folder went away under us, say
        conn.close()
        raise DatabaseMissing(f"the database's folder is unusable: {e.strerror}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def connect_ready(path: str, *, synchronous: str = "FULL", timeout: float = 5.0) -> Connection:
    """Open an existing database that has every migration, or raise DatabaseMissing."""
    conn = connect(path, synchronous=synchronous, timeout=timeout)
    try:
        if schema_version(conn) < len(MIGRATIONS):
            raise DatabaseMissing("the database is not initialised: run flask customers init-db")
    except BaseException:
        conn.close()
        raise
    return conn


def _open(path: str, timeout: float, create: bool) -> Connection:
    """The sqlite3 connection, creating the file (owner-only) only if ``create``."""
    if path == ":memory:":
        target, uri = path, False
    elif create:
        _create_private_file(path)
        target, uri = path, False
    else:
        target, uri = f"file:{quote(os.path.abspath(path))}?mode=rw", True
    try:
        conn = sqlite3.connect(
            target, timeout=timeout, check_same_thread=False, factory=Connection, uri=uri
        )
    except sqlite3.OperationalError as e:
        if getattr(e, "sqlite_errorname", "") == "SQLITE_CANTOPEN":
            raise DatabaseMissing("the database file is missing") from None
        raise
    conn.path = path
    conn.row_factory = sqlite3.Row
    return conn


def file_identity(path: str) -> tuple[int, int]:
    """The device and inode of the database file, raising DatabaseMissing if there is none."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise DatabaseMissing("the database file is missing") from None
    return st.st_dev, st.st_ino


def fault(error: BaseException) -> tuple[str, str] | None:
    """The contract's 503 code and message for a database fault, or None for anything else
    (a refused constraint is a bug, not a fault)."""
    if not isinstance(error, sqlite3.DatabaseError) or type(error) is sqlite3.IntegrityError:
        return None
    if isinstance(error, DiskNearlyFull):
        return "database_full", "the disk under the database is nearly full"
    name = getattr(error, "sqlite_errorname", None) or ""
    primary = "_".join(name.split("_")[:2])  # SQLITE_READONLY_DBMOVED is a SQLITE_READONLY
    return FAULTS.get(primary, UNAVAILABLE)


@contextlib.contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that, with FULL, is on disk when this block ends.

    SQLite's own FULL fsyncs the WAL at commit while it holds the database's one write lock, so
    concurrent writers queue behind each fsync, and sleep in its busy handler while they wait.
    Here SQLite commits with NORMAL (no fsync) and the WAL is fsynced after, outside that lock,
    once for every group of writers that committed meanwhile (WalSync): each commit is as
    durable as FULL's once this returns.
    """
    with conn:
        yield conn
    make_durable(conn)


def write_alone(conn: sqlite3.Connection, sql: str, params) -> list:
    """Run one statement as its own transaction and return its rows; with FULL, on disk when
    this returns.

    SQLite commits it when it ends (autocommit), so it needs no BEGIN and COMMIT statements,
    which Python's sqlite3 compiles anew each time, and no statement journal: about 30,000
    instructions less an upsert. A fault rolls the statement back whole, as a transaction.
    Inside a transaction the caller opened, it joins it and commits it, as write() does.
    """
    if conn.in_transaction:
        with write(conn):
            return conn.execute(sql, params).fetchall()
    previous = conn.isolation_level
    try:
        conn.isolation_level = None  # commits what is open: nothing, as just checked
        # fetchall steps to the end: SQLite commits there, and a failed commit raises here.
        rows = conn.execute(sql, params).fetchall()
    finally:
        conn.isolation_level = previous
    make_durable(conn)
    return rows


def make_durable(conn: sqlite3.Connection) -> None:
    """With FULL, fsync the WAL after a commit (WalSync); with NORMAL, nothing."""
    durability = getattr(conn, "durability", None)
    if durability is not None:
        try:
            durability.after_commit()
        except OSError as e:
            raise sqlite3.OperationalError(f"could not make the commit durable: {e}") from None


def _create_private_file(path: str) -> None:
    """Create an empty file readable by its owner only, unless it exists."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


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


_this_second: tuple[int, str] = (0, "")  # replaced whole: threads read it whole


def utc_now() -> str:
    """The current time as the API writes it: ISO 8601, UTC, whole seconds (formatted once a
    second)."""
    global _this_second
    now, text = _this_second
    second = int(time.time())
    if now != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        _this_second = (second, text)
    return text


def new_lago_id() -> str:
    """A version 7 UUID: it starts with the time, so the lago_id index grows at its end."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    digits = f"{value:032x}"  # what str(uuid.UUID(int=value)) writes, without building one
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def fold(text: str | None) -> str | None:
    """Text as search_term and email compare it: Unicode case folding (``ÉCOLE`` is ``école``;
    accents stay)."""
    return None if text is None else text.casefold()


def fold_existing(conn: sqlite3.Connection) -> None:
    """Fill the folded columns of the customers stored before they existed (a migration)."""
    conn.create_function("fold", 1, fold, deterministic=True)
    conn.execute(f"UPDATE customers SET {', '.join(f'folded_{f} = fold({f})' for f in SEARCHED)}")


_encode_metadata = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def metadata_json(metadata: Mapping) -> str:
    """Metadata as stored: compact JSON text."""
    return _encode_metadata(metadata) if metadata else "{}"


def metadata_from_text(text: str) -> dict:
    """Stored metadata as the API gives it: an object, its keys in code point order."""
    if text == "{}":
        return {}
    return dict(sorted(json.loads(text).items()))


def customer_from_row(row: sqlite3.Row) -> dict:
    """A row as the customer object."""
    # Every query of customers selects COLUMNS in this order: zip costs less than dict(row),
    # which looks each value up by its name.
    customer = dict(zip(COLUMNS, row, strict=True))
    customer["metadata"] = metadata_from_text(customer["metadata"])
    return customer


def upsert_params(fields: Mapping, now: str, flag=bool) -> dict:
    """The named parameters of UPSERT_CUSTOMER for one validated customer.

    ``fields`` may carry lago_id, created_at and updated_at (an import restoring an export):
    they are used only if the customer is created. Its ``metadata`` is a patch (a key set to
    None removes it), or None to remove every key. The ``set_*`` flags are ``flag(bool)``:
    SQLite takes them as int (sqlite3 adapts a bool the slow way, through its adapters).
    """
    params = {f: fields.get(f) for f in FIELDS}
    for f in OPTIONAL_FIELDS:
        params[SET[f]] = flag(f in fields)
    for f in SEARCHED:
        params["folded_" + f] = fold(params[f])
    patch = fields.get("metadata")
    params["set_metadata"] = flag("metadata" in fields)
    params["metadata_patch"] = None if patch is None else metadata_json(patch)
    created = {k: v for k, v in (patch or {}).items() if v is not None}
    params["metadata"] = metadata_json(created)
    params["lago_id"] = fields.get("lago_id") or new_lago_id()
    params["created_at"] = fields.get("created_at") or now
    params["updated_at"] = fields.get("updated_at") or now
    params["now"] = now
    return params


UPSERT_PARAMS = tuple(upsert_params({}, ""))
# UPSERT_CUSTOMER with its parameters numbered (?1 is UPSERT_PARAMS[0]), given as a tuple:
# sqlite3 binds a named parameter by making its name a str and looking it up, 45 times a row.
UPSERT_NUMBERED = re.sub(
    r":(\w+)", lambda m: f"?{UPSERT_PARAMS.index(m.group(1)) + 1}", UPSERT_CUSTOMER
)
in_upsert_order = itemgetter(*UPSERT_PARAMS)


def sent_fields(params: Mapping) -> dict:
    """The customer that upsert_params was given, back from its parameters."""
    fields = {f: params[f] for f in FIELDS if f in REQUIRED or params["set_" + f]}
    if params["set_metadata"]:
        patch = params["metadata_patch"]
        fields["metadata"] = None if patch is None else json.loads(patch)
    fields.update(lago_id=params["lago_id"], created_at=params["created_at"])
    return fields


def refusal(error: sqlite3.IntegrityError) -> dict:
    """Why the database refused a customer, as the API's error details."""
    if "too_many_metadata_keys" in str(error):
        return {"metadata": ["too_many_metadata_keys"]}
    return {"lago_id": ["lago_id_taken"]}  # a restored lago_id that another customer has


def upsert_customer(conn: sqlite3.Connection, fields: Mapping) -> dict:
    """Create the customer, or update the keys present in ``fields``; return the row.
    Raise TooManyMetadataKeys, having written nothing, if the merged metadata is too large."""
    params = upsert_params(fields, utc_now(), flag=int)
    try:
        (row,) = write_alone(conn, UPSERT_NUMBERED, in_upsert_order(params))
    except sqlite3.IntegrityError as e:
        if "metadata" in refusal(e):
            raise TooManyMetadataKeys() from None
        raise
    return customer_from_row(row)


def get_customer(conn: sqlite3.Connection, customer_id: str) -> dict | None:
    """The customer with that id, or None."""
    row = conn.execute(SELECT_CUSTOMER, (customer_id,)).fetchone()
    return customer_from_row(row) if row else None


def delete_customer(conn: sqlite3.Connection, customer_id: str) -> dict | None:
    """Delete the customer and return it as it was, or None if there was none."""
    rows = write_alone(conn, DELETE_CUSTOMER, (customer_id,))
    return customer_from_row(rows[0]) if rows else None


def filter_sql(filters, walk: bool = False) -> tuple[str, dict]:
    """The WHERE condition and its parameters for a list's filters (list_query.Filters).

    By default the search and metadata filters find their rows through their indexes (the FTS5
    table, the pairs). With ``walk`` they test each row instead, for a page read by walking the
    sort's index: cheaper when the filters select so many rows that the page fills quickly.
    """
    conditions, params = [], {}
    if filters.search is not None:
        params["search"] = filters.search
        if has_trigrams(filters.search) and not walk:
            params["search"] = fts_phrase(filters.search)
            conditions.append(
                "customers.id IN (SELECT rowid FROM customer_search "
                "WHERE customer_search MATCH :search)"
            )
        else:  # shorter than a trigram, or walking: each row is looked at
            conditions.append("(" + " OR ".join(f"instr({c}, :search)" for c in FOLDED) + ")")
    if filters.customer_id is not None:
        conditions.append("customer_id = :customer_id")
        params["customer_id"] = filters.customer_id
    if filters.email is not None:
        conditions.append("folded_email = :email")
        params["email"] = filters.email
    for column, values in filters.value_lists():
        names = [f"{column}_{i}" for i in range(len(values))]
        conditions.append(f"{column} IN ({', '.join(':' + n for n in names)})")
        params.update(zip(names, values, strict=True))
    pair = "customer = customers.id AND key = :key_{0} AND value = :value_{0}"
    for i, (key, value) in enumerate(filters.metadata.items()):
        if walk:
            conditions.append(f"EXISTS (SELECT 1 FROM customer_metadata WHERE {pair.format(i)})")
        else:
            conditions.append(
                "customers.id IN (SELECT customer FROM customer_metadata "
                f"WHERE key = :key_{i} AND value = :value_{i})"
            )
        params.update({f"key_{i}": key, f"value_{i}": value})
    for column, operator, name, value in filters.time_bounds():
        conditions.append(f"{column} {operator} :{name}")
        params[name] = value
    return " AND ".join(conditions) or "1", params


def has_trigrams(term: str) -> bool:
    """Whether a folded search term is long enough for the trigram index (3 characters)."""
    return len(term) >= 3


def fts_phrase(term: str) -> str:
    """An FTS5 phrase of the term: with the trigram tokenizer, the substring itself."""
    return '"' + term.replace('"', '""') + '"'


SORT_INDEXES = {"created_at": "customers_newest_first", "updated_at": "customers_recently_updated"}


def order_sql(filters) -> str:
    """The ORDER BY of a list: its sort column, then the insertion order, the same way."""
    direction = "DESC" if filters.descending else "ASC"
    return f"{filters.sort} {direction}, id {direction}"


def list_customers(
    conn: sqlite3.Connection, page: int, per_page: int, filters
) -> tuple[list[dict], int]:
    """One page of the customers that ``filters`` select, in its order, and their count."""
    offset = (page - 1) * per_page
    with conn:
        conn.execute("BEGIN")  # one read transaction, so the page and the count agree
        everyone = count_customers(conn)
        total = count_selected(conn, filters) if filters.any() else everyone
        if offset >= total:  # past the end: no scan, and no integer too large for SQLite
            return [], total
        rows = conn.execute(*page_query(filters, offset, per_page, total, everyone)).fetchall()
    return [customer_from_row(r) for r in rows], total


def count_selected(conn: sqlite3.Connection, filters) -> int:
    """How many customers the filters select.

    A search term or one metadata pair alone is counted in its own index: every row there is a
    customer's (the triggers keep them so), and looking each customer up would cost more than
    the count itself (a search in 10% of 1,000,000 customers: 45 ms against 250 ms).
    """
    others = dataclasses.replace(filters, search=None, metadata={}).any()
    if not others and not filters.metadata and filters.search is not None:
        if has_trigrams(filters.search):
            return conn.execute(COUNT_SEARCH, (fts_phrase(filters.search),)).fetchone()[0]
    if not others and filters.search is None and len(filters.metadata) == 1:
        ((key, value),) = filters.metadata.items()
        return conn.execute(COUNT_PAIR, (key, value)).fetchone()[0]
    where, params = filter_sql(filters)
    return conn.execute(SELECT_FILTERED_COUNT.format(where=where), params).fetchone()[0]


def page_query(filters, offset: int, limit: int, total: int, everyone: int) -> tuple[str, dict]:
    """The statement of a page and its parameters, knowing how many rows the filters select.

    Walking the sort's index and testing each row reads about (offset + limit) x everyone /
    total rows; finding the selected rows through the filters' indexes and sorting them reads
    about total rows. SQLite's planner cannot weigh that (it has no statistics unless ANALYZE
    ran), so the cheaper is chosen here.
    """
    table, walk = "customers", False
    if filters.any() and (offset + limit) * everyone < total * total:
        table, walk = f"customers INDEXED BY {SORT_INDEXES[filters.sort]}", True
    where, params = filter_sql(filters, walk=walk)
    params.update(limit=limit, offset=offset)
    return SELECT_PAGE.format(table=table, where=where, order=order_sql(filters)), params


def export_lines(conn: sqlite3.Connection) -> Iterator[str]:
    """Every customer as one line of JSON, ``{"customer": {...}}``, oldest first, streamed
    from one snapshot while the service goes on writing."""
    with conn:
        conn.execute("BEGIN")
        for (line,) in conn.execute(EXPORT_LINES):
            yield line


def count_customers(conn: sqlite3.Connection) -> int:
    """How many customers there are (kept by triggers, so this reads one row)."""
    return conn.execute(SELECT_COUNT).fetchone()[0]


def upsert_batch(conn: sqlite3.Connection, params: list[dict]) -> int:
    """Run prepared upserts (see upsert_params) in the caller's transaction; return how many
    customers they created."""
    before = count_customers(conn)
    conn.executemany(UPSERT_MANY, params)
    return count_customers(conn) - before


def import_batch(conn: sqlite3.Connection, rows: list[dict]) -> tuple[int, list[tuple]]:
    """Upsert prepared rows (see upsert_params) in one transaction; return how many customers
    they created, and (position, error details) of each row the database refused: a restored
    lago_id that is another customer's, metadata merged past 50 keys (the others are
    committed)."""
    try:
        with write(conn):
            begin_write(conn)
            return upsert_batch(conn, rows), []
    except sqlite3.IntegrityError:
        pass
    inserted, refused = 0, []
    with write(conn):
        begin_write(conn)
        for position, params in enumerate(rows):
            try:
                inserted += upsert_batch(conn, [params])
            except sqlite3.IntegrityError as e:  # SQLite undoes that statement only
                refused.append((position, refusal(e)))
    return inserted, refused


def begin_write(conn: sqlite3.Connection) -> None:
    """Start a write transaction now, so a batch never waits for the lock half-way."""
    conn.execute("BEGIN IMMEDIATE")


def check(conn: Connection, min_free_bytes: int = 0) -> None:
    """Raise sqlite3.Error unless the database takes a (tiny, durable) write and its disk keeps
    ``min_free_bytes`` free (SQLite can still fit a write in space it freed, on a full disk)."""
    with write(conn):
        conn.execute(PROBE_WRITE, (utc_now(),))
    if conn.path != ":memory:" and free_bytes(conn.path) < min_free_bytes:
        raise DiskNearlyFull("the disk under the database is nearly full")


def free_bytes(path: str) -> int:
    """Bytes free for ordinary users on the filesystem that holds ``path``."""
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    return st.f_bavail * st.f_frsize


_thread = threading.local()


class Connections:
    """The connections of one process to one SQLite file: one per thread, kept across requests
    (opening one costs more than most requests), reopened after a fork or when the file is
    replaced, and never creating the file."""

    def __init__(self, path: str, synchronous: str, timeout: float):
        self.path, self.synchronous, self.timeout = path, synchronous, timeout
        self._key = (path, synchronous, timeout)

    def prepare(self) -> None:
        """Create the file if it is missing (its folder must exist) and apply migrations."""
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"the database's folder {folder} does not exist: create it first"
            )
        conn = connect(self.path, synchronous=self.synchronous, timeout=self.timeout, create=True)
        try:
            migrate(conn)
        finally:
            conn.close()

    def open(self) -> Connection:
        """A connection of its own, for a command; the caller closes it."""
        return connect_ready(self.path, synchronous=self.synchronous, timeout=self.timeout)

    def acquire(self) -> Connection:
        """This thread's connection, checked to still be the file at the path."""
        cached = getattr(_thread, "connections", None)
        if cached is None:
            cached = _thread.connections = {}
        entry = cached.get(self._key)
        try:
            identity = file_identity(self.path)
        except DatabaseMissing:
            self._drop(cached)
            raise
        if entry is not None:
            pid, known_identity, conn = entry
            if pid == os.getpid() and known_identity == identity:
                return conn
            self._drop(cached)
        conn = self.open()
        # The identity seen before opening: had the file been replaced meanwhile, the next
        # request sees a new one and opens the file that is there, never writing to a deleted one.
        cached[self._key] = (os.getpid(), identity, conn)
        return conn

    def release(self, conn: Connection) -> None:
        """End a request's use of the connection, rolling back anything left open."""
        if conn.in_transaction:
            conn.rollback()

    def discard(self, conn: Connection) -> None:
        """Close this thread's connection after a fault: the next request opens a fresh one."""
        self.close()

    def close(self) -> None:
        """Close this thread's connection."""
        self._drop(getattr(_thread, "connections", {}))

    def _drop(self, cached: dict) -> None:
        entry = cached.pop(self._key, None)
        if entry is not None and entry[0] == os.getpid():  # a parent's, through a fork: not ours
            entry[2].close()

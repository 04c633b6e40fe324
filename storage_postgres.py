"""PostgreSQL storage of customers: the same functions as storage.py (SQLite), each statement
written beside the SQLite one it stands for, so a reader can compare the two."""

import json
import os
import select
import threading
from collections.abc import Iterator, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from customers_service.storage import (
    COLUMNS,
    FOLDED,
    INSERTED,
    OPTIONAL_FIELDS,
    SEARCHED,
    UNAVAILABLE,
    TooManyMetadataKeys,
    fold,
    upsert_params,
    utc_now,
)

Error = psycopg.Error
# A server that vanishes without closing the connection (a crashed host, a network split) is
# noticed within seconds, as unavailable, not after the kernel's quarter of an hour of retries:
# a request sent into a split fails after about 12 s (tests/test_hosts.py), well inside
# gunicorn's 30 s worker timeout. (15 s of tcp_user_timeout took 42 s, past it.)
NETWORK = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 5_000,  # milliseconds a sent request may stay unacknowledged
}
MIGRATION_LOCK = 7_366_012_001  # pg_advisory_xact_lock key: "customers" migrations
EVENTS_GATE = 7_366_012_002  # shared by writers at commit, exclusive for a moment by the feed
HORIZON_WAIT_MS = 100  # the longest the feed waits for the gate
COUNT_SHARDS = 16
# Row locks, not one write lock, so an import makes no live writer wait for a lock; but they
# share the CPU: half a pause (storage.py) keeps the live p99 well under 100 ms while an import
# keeps two thirds of its speed (bench/import_live.py: 0 gave p99 88 ms, 1 gave 61 ms).
IMPORT_PAUSE = 0.5

# uuid and timestamptz leave the database as the API writes them (SQLite stores that text), so
# both backends answer the same bytes.
API_TIME = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
AS_TEXT = {
    "lago_id": "lago_id::text",
    "created_at": API_TIME.format("created_at"),
    "updated_at": API_TIME.format("updated_at"),
}
SELECTED = ", ".join(f"{AS_TEXT[c]} AS {c}" if c in AS_TEXT else c for c in COLUMNS)

# The event's customer object, built by the trigger from the changed row (see AS_TEXT).
EVENT_CUSTOMER = ", ".join(
    f"'{c}', " + (AS_TEXT[c].replace(c, f"changed.{c}") if c in AS_TEXT else f"changed.{c}")
    for c in COLUMNS
)

CREATE_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""

# SQLite counts migrations in PRAGMA user_version; here they are rows of schema_migrations.
MIGRATIONS = (
    (
        """CREATE TABLE customers (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            lago_id uuid NOT NULL UNIQUE,
            customer_id text NOT NULL UNIQUE,
            name text NOT NULL,
            country text, address_line1 text, address_line2 text, state text, zipcode text,
            email text, city text, url text, phone text, logo_url text,
            legal_name text, legal_number text,
            created_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL
        )""",
        "CREATE INDEX customers_newest_first ON customers (created_at DESC, id DESC)",
        # SQLite keeps one counter row; here each connection adds to one of 16 rows (by its
        # server process id), so inserts on many hosts do not queue on one row, and the total
        # is still exact: the sum is read in the same snapshot as the page.
        "CREATE TABLE customer_count (shard integer PRIMARY KEY, n bigint NOT NULL)",
        f"INSERT INTO customer_count SELECT s, 0 FROM generate_series(0, {COUNT_SHARDS - 1}) s",
        f"""CREATE FUNCTION customers_count() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                UPDATE customer_count
                SET n = n + CASE WHEN TG_OP = 'INSERT' THEN 1 ELSE -1 END
                WHERE shard = pg_backend_pid() % {COUNT_SHARDS};
                RETURN NULL;
            END $$""",
        """CREATE TRIGGER customers_counted AFTER INSERT OR DELETE ON customers
           FOR EACH ROW EXECUTE FUNCTION customers_count()""",
        "CREATE TABLE health_probe (id integer PRIMARY KEY CHECK (id = 1), checked_at timestamptz)",
        "INSERT INTO health_probe (id, checked_at) VALUES (1, NULL)",
    ),
    (
        # Metadata and the list's filters (issue 11). pg_trgm is a trusted extension: the
        # database's owner may create it.
        "CREATE EXTENSION IF NOT EXISTS pg_trgm",
        "ALTER TABLE customers ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}'",
        "ALTER TABLE customers " + ", ".join(f"ADD COLUMN {c} text" for c in FOLDED),
        lambda conn: fold_existing(conn),
        """CREATE FUNCTION customers_metadata_size(jsonb) RETURNS integer
           LANGUAGE sql IMMUTABLE AS 'SELECT count(*)::integer FROM jsonb_object_keys($1)'""",
        # SQLite checks the merge with a trigger; here a constraint does.
        """ALTER TABLE customers ADD CONSTRAINT customers_metadata_keys
           CHECK (customers_metadata_size(metadata) <= 50)""",
        "CREATE INDEX customers_recently_updated ON customers (updated_at DESC, id DESC)",
        "CREATE INDEX customers_by_country ON customers (country, created_at DESC, id DESC)",
        "CREATE INDEX customers_by_state ON customers (state)",
        "CREATE INDEX customers_by_zipcode ON customers (zipcode)",
        "CREATE INDEX customers_by_email ON customers (folded_email)",
        # SQLite: the customer_metadata table of pairs; here containment (@>) in a GIN index.
        "CREATE INDEX customers_by_metadata ON customers USING gin (metadata jsonb_path_ops)",
        # SQLite: the FTS5 trigram table; here pg_trgm, for LIKE '%term%' on the folded fields.
        "CREATE INDEX customers_search ON customers USING gin ("
        + ", ".join(f"{c} gin_trgm_ops" for c in FOLDED)
        + ")",
    ),
    (
        # Events and webhooks (issue 12); event_storage_postgres.py reads them. A sequence is
        # taken at commit (events_recorded below), so numbers follow the commit order.
        "CREATE SEQUENCE events_sequence",
        """CREATE TABLE events (
            sequence bigint PRIMARY KEY,
            id uuid NOT NULL,
            webhook_type text NOT NULL,
            created_at text NOT NULL,
            recorded_at double precision NOT NULL,
            customer json NOT NULL
        )""",
        "CREATE TABLE events_pruned (id integer PRIMARY KEY CHECK (id = 1), up_to bigint)",
        "INSERT INTO events_pruned (id, up_to) VALUES (1, 0)",
        """CREATE TABLE webhook_endpoints (
            id text PRIMARY KEY,
            url text NOT NULL,
            secret text NOT NULL,
            created_at text NOT NULL,
            last_error text,
            last_error_at text
        )""",
        """CREATE TABLE webhook_deliveries (
            endpoint text NOT NULL,
            event bigint NOT NULL,
            customer_id text NOT NULL,
            failed boolean NOT NULL DEFAULT false,
            attempts integer NOT NULL DEFAULT 0,
            first_try double precision,
            next_try double precision NOT NULL DEFAULT 0,
            leased_until double precision NOT NULL DEFAULT 0,
            lease_owner text,
            last_error text,
            PRIMARY KEY (event, endpoint)
        )""",
        """CREATE INDEX webhook_deliveries_per_customer
           ON webhook_deliveries (endpoint, customer_id, event)""",
        # Each change's event is written when its transaction commits (a deferred trigger),
        # holding EVENTS_GATE shared from its sequence number until its commit is visible.
        # The feed takes the gate exclusively for a moment (events_horizon): every number
        # taken before is then committed or aborted, so it hands out only those.
        f"""CREATE FUNCTION customers_event() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE
                changed customers;
                kind text;
                changed_at timestamptz;
                number bigint;
            BEGIN
                IF TG_OP = 'DELETE' THEN
                    changed := OLD; kind := 'customer.deleted'; changed_at := now();
                ELSE
                    changed := NEW; changed_at := NEW.updated_at;
                    kind := CASE TG_OP WHEN 'INSERT' THEN 'customer.created'
                                       ELSE 'customer.updated' END;
                END IF;
                PERFORM pg_advisory_xact_lock_shared({EVENTS_GATE});
                number := nextval('events_sequence');
                INSERT INTO events (sequence, id, webhook_type, created_at, recorded_at, customer)
                VALUES (
                    number, gen_random_uuid(), kind,
                    {API_TIME.format("changed_at")},
                    extract(epoch FROM clock_timestamp()),
                    json_build_object({EVENT_CUSTOMER})
                );
                INSERT INTO webhook_deliveries (endpoint, event, customer_id)
                SELECT id, number, changed.customer_id FROM webhook_endpoints;
                RETURN NULL;
            END $$""",
        """CREATE CONSTRAINT TRIGGER customers_events
           AFTER INSERT OR UPDATE OR DELETE ON customers
           DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION customers_event()""",
        # Writers that come while the feed waits for the gate queue behind it: it waits
        # 100 ms at most (a commit of many rows can hold the gate longer) and then answers
        # NULL, and the feed an empty page, which is always safe.
        f"""CREATE FUNCTION events_horizon() RETURNS bigint LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM set_config('lock_timeout', '{HORIZON_WAIT_MS}ms', true);
                PERFORM pg_advisory_xact_lock({EVENTS_GATE});
                RETURN (SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                        FROM events_sequence);
            EXCEPTION WHEN lock_not_available THEN
                RETURN NULL;
            END $$""",
    ),
)

# SQLite: iif(:set_f, excluded.f, f). A key absent from the request keeps the stored value.
KEEP_ABSENT = ", ".join(
    f"{column} = CASE WHEN %(set_{f})s THEN excluded.{column} ELSE c.{column} END"
    for f in OPTIONAL_FIELDS
    for column in (f, f"folded_{f}")
    if column in INSERTED
)
# SQLite: json_patch(), which follows RFC 7396; here || then dropping the keys set to null.
UPSERT_MANY = f"""
INSERT INTO customers AS c ({", ".join(INSERTED)})
VALUES ({", ".join(f"%({c})s::jsonb" if c == "metadata" else f"%({c})s" for c in INSERTED)})
ON CONFLICT (customer_id) DO UPDATE SET
    name = excluded.name,
    folded_name = excluded.folded_name,
    {KEEP_ABSENT},
    metadata = CASE
        WHEN NOT %(set_metadata)s THEN c.metadata
        WHEN %(metadata_patch)s::jsonb IS NULL THEN '{{}}'::jsonb
        ELSE jsonb_strip_nulls(c.metadata || %(metadata_patch)s::jsonb)
    END,
    updated_at = %(now)s
"""

UPSERT_CUSTOMER = UPSERT_MANY + f"RETURNING {SELECTED}"

# xmax is 0 only in a row version this statement inserted: how an import counts its creations.
UPSERT_COUNTED = UPSERT_MANY + "RETURNING (xmax = 0) AS inserted"

SELECT_CUSTOMER = f"SELECT {SELECTED} FROM customers WHERE customer_id = %s"

DELETE_CUSTOMER = f"DELETE FROM customers WHERE customer_id = %s RETURNING {SELECTED}"

# SQLite reads the count and the page in one read transaction; here one statement, one snapshot.
# LIMIT and OFFSET are written in as numbers: with parameters, the plan psycopg prepares after a
# few calls is generic, and a generic LIMIT makes PostgreSQL sort the whole table. The count is
# the counter's, or with filters a count(*) of what they select; WHERE and ORDER BY come from
# filter_sql() and order_sql().
SELECT_PAGE = f"""
SELECT total.n AS total_count, page.*
FROM ({{count}}) total
LEFT JOIN LATERAL (
    SELECT {SELECTED} FROM customers
    WHERE {{offset:d}} < total.n  -- a page past the end reads no row (checked once)
        AND {{where}}
    ORDER BY {{order}}
    LIMIT {{limit:d}} OFFSET {{offset:d}}
) page ON true
"""
COUNTED = "SELECT sum(n)::bigint AS n FROM customer_count"
COUNT_FILTERED = "SELECT count(*) AS n FROM customers WHERE {where}"

SELECT_COUNT = "SELECT sum(n)::bigint FROM customer_count"

EXPORT_ROWS = f"SELECT {SELECTED} FROM customers ORDER BY id"

PROBE_WRITE = "UPDATE health_probe SET checked_at = now() WHERE id = 1"

SCHEMA_VERSION = "SELECT coalesce(max(version), 0) FROM schema_migrations"

LARGEST_OFFSET = 2**63 - 1

# The contract's 503 codes for PostgreSQL's SQLSTATEs (first the exact code, then its class).
FAULTS = {
    "57014": ("database_busy", "the database is busy; retry"),  # statement_timeout
    "55P03": ("database_busy", "the database is busy; retry"),  # lock_timeout
    "40001": ("database_busy", "the database is busy; retry"),  # serialization failure
    "40P01": ("database_busy", "the database is busy; retry"),  # deadlock
    "53300": ("database_busy", "the database is busy; retry"),  # too many connections
    "53100": ("database_full", "the disk under the database is full"),
    "25006": ("database_read_only", "the database cannot be written"),  # a standby
    "42P01": UNAVAILABLE,  # undefined table: not migrated
}


METADATA_CONSTRAINT = "customers_metadata_keys"


class DatabaseMissing(psycopg.OperationalError):
    """The database is unreachable, or was never initialised."""


def fault(error: BaseException) -> tuple[str, str] | None:
    """The contract's 503 code and message for a database fault, or None for anything else
    (a refused constraint or a bad statement is a bug, not a fault)."""
    if isinstance(error, PoolTimeout):
        return "database_busy", "the database is busy; retry"
    if not isinstance(error, psycopg.Error):
        return None
    state = getattr(error, "sqlstate", None) or ""
    if state in FAULTS:
        return FAULTS[state]
    if isinstance(error, psycopg.IntegrityError | psycopg.DataError | psycopg.ProgrammingError):
        return None
    return UNAVAILABLE  # the connection lost, the server shutting down or starting, ...


SECRET_PARAMETERS = ("password", "sslpassword")


def safe_url(url: str) -> str:
    """The URL without its passwords (before the @ or as parameters), for messages and logs."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = [
        (name, "***" if name in SECRET_PARAMETERS else value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def session_options(statement_timeout: float) -> str:
    """The settings of every session of the service: commits are durable before they return,
    and no statement or lock wait outlasts the timeout."""
    ms = max(1, int(statement_timeout * 1000))
    return (
        f"-c synchronous_commit=on -c statement_timeout={ms} -c lock_timeout={ms} -c TimeZone=UTC"
    )


def connect(url: str, statement_timeout: float = 5.0) -> psycopg.Connection:
    """One connection with the service's session settings, outside any pool."""
    try:
        return psycopg.connect(
            url,
            autocommit=True,
            row_factory=dict_row,
            options=session_options(statement_timeout),
            **NETWORK,
        )
    except psycopg.OperationalError as e:
        # libpq's message names the host and port, never the password; say which database.
        raise DatabaseMissing(f"cannot connect to {safe_url(url)}: {first_line(e)}") from None


def first_line(error: BaseException) -> str:
    """The first line of an error's message."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def migrate(conn: psycopg.Connection) -> int:
    """Apply every migration step not yet applied, each in its own transaction under an advisory
    lock, so hosts starting together apply each step once; return the schema version."""
    for number, step in enumerate(MIGRATIONS, start=1):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(CREATE_MIGRATIONS_TABLE)
            if conn.execute(SCHEMA_VERSION).fetchone()["coalesce"] >= number:
                continue
            for statement in step:
                statement(conn) if callable(statement) else conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (number,))
    return len(MIGRATIONS)


def schema_version(conn: psycopg.Connection) -> int:
    """How many migration steps the database has had (0 for an empty database)."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL AS e").fetchone()
    if not exists["e"]:
        return 0
    return conn.execute(SCHEMA_VERSION).fetchone()["coalesce"]


def connect_ready(url: str, statement_timeout: float = 5.0) -> psycopg.Connection:
    """A connection to a database that has every migration, or DatabaseMissing."""
    conn = connect(url, statement_timeout)
    if schema_version(conn) < len(MIGRATIONS):
        conn.close()
        raise DatabaseMissing("the database is not initialised: run flask customers init-db")
    return conn


def fold_existing(conn: psycopg.Connection) -> None:
    """Fill the folded columns of the customers stored before they existed (a migration)."""
    update = f"UPDATE customers SET {', '.join(f'{c} = %s' for c in FOLDED)} WHERE id = %s"
    with conn.cursor(name="customers_to_fold", row_factory=tuple_row) as rows:
        rows.execute(f"SELECT id, {', '.join(SEARCHED)} FROM customers")
        while batch := rows.fetchmany(5000):
            with conn.cursor() as cursor:
                cursor.executemany(update, [(*map(fold, row[1:]), row[0]) for row in batch])


def customer_from_row(row: dict) -> dict:
    """A row as the customer object: its metadata's keys in code point order, as SQLite's."""
    if len(row["metadata"]) > 1:
        row["metadata"] = dict(sorted(row["metadata"].items()))
    return row


def refusal(error: psycopg.IntegrityError) -> dict:
    """Why the database refused a customer, as the API's error details."""
    if error.diag.constraint_name == METADATA_CONSTRAINT:
        return {"metadata": ["too_many_metadata_keys"]}
    return {"lago_id": ["lago_id_taken"]}  # a restored lago_id that another customer has


def upsert_customer(conn: psycopg.Connection, fields: Mapping) -> dict:
    """Create the customer, or update the keys present in ``fields``; return the row.
    Raise TooManyMetadataKeys, having written nothing, if the merged metadata is too large.

    One statement in autocommit is its own transaction: execute() returns only once the server
    has committed it (after the result, PostgreSQL commits, then says it is ready), so the row
    it returns is durable, in one round trip instead of three.
    """
    try:
        row = conn.execute(UPSERT_CUSTOMER, upsert_params(fields, utc_now())).fetchone()
    except psycopg.errors.CheckViolation as e:
        if "metadata" in refusal(e):
            raise TooManyMetadataKeys() from None
        raise
    return customer_from_row(row)


def get_customer(conn: psycopg.Connection, customer_id: str) -> dict | None:
    """The customer with that id, or None (an id with NUL, which no customer has, included)."""
    if "\0" in customer_id:
        return None
    row = conn.execute(SELECT_CUSTOMER, (customer_id,)).fetchone()
    return customer_from_row(row) if row else None


def delete_customer(conn: psycopg.Connection, customer_id: str) -> dict | None:
    """Delete the customer and return it as it was, or None if there was none."""
    if "\0" in customer_id:
        return None
    row = conn.execute(DELETE_CUSTOMER, (customer_id,)).fetchone()  # autocommit: see upsert
    return customer_from_row(row) if row else None


def like_pattern(text: str) -> str:
    """A LIKE pattern that finds ``text`` anywhere, its % and _ plain characters."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def filter_sql(filters) -> tuple[str, dict]:
    """The WHERE condition and its parameters for a list's filters (list_query.Filters); the
    same selection as storage.filter_sql."""
    conditions, params = [], {}
    if filters.search is not None:
        conditions.append("(" + " OR ".join(f"{c} LIKE %(search)s" for c in FOLDED) + ")")
        params["search"] = like_pattern(filters.search)
    if filters.customer_id is not None:
        conditions.append("customer_id = %(customer_id)s")
        params["customer_id"] = filters.customer_id
    if filters.email is not None:
        conditions.append("folded_email = %(email)s")
        params["email"] = filters.email
    for column, values in filters.value_lists():
        conditions.append(f"{column} = ANY(%({column})s)")
        params[column] = list(values)
    if filters.metadata:
        conditions.append("metadata @> %(metadata)s::jsonb")
        params["metadata"] = json.dumps(filters.metadata)
    for column, operator, name, value in filters.time_bounds():
        conditions.append(f"customers.{column} {operator} %({name})s::timestamptz")
        params[name] = value
    return " AND ".join(conditions) or "true", params


def order_sql(filters) -> str:
    """The ORDER BY of a list (on the columns, not the text aliases of SELECTED)."""
    direction = "DESC" if filters.descending else "ASC"
    return f"customers.{filters.sort} {direction}, customers.id {direction}"


def list_customers(
    conn: psycopg.Connection, page: int, per_page: int, filters
) -> tuple[list[dict], int]:
    """One page of the customers that ``filters`` select, in its order, and their count."""
    offset = (page - 1) * per_page
    where, params = filter_sql(filters)
    count = COUNT_FILTERED.format(where=where) if filters.any() else COUNTED
    if offset > LARGEST_OFFSET:  # past any end, and past what OFFSET takes
        return [], conn.execute(count, params).fetchone()["n"] or 0
    statement = SELECT_PAGE.format(
        count=count,
        where=where,
        order=order_sql(filters),
        limit=per_page,
        offset=offset,
    )
    # Filtered, planned for these very values (unprepared): a rare country and one that half
    # the customers have want different plans.
    rows = conn.execute(statement, params, prepare=False if filters.any() else None).fetchall()
    total = rows[0]["total_count"] or 0
    customers = [row for row in rows if row["lago_id"] is not None]  # a page past the end: none
    for row in customers:
        del row["total_count"]
        customer_from_row(row)
    return customers, total


def count_customers(conn: psycopg.Connection) -> int:
    """How many customers there are (the sum of the counter's shards)."""
    return conn.execute(SELECT_COUNT).fetchone()["sum"] or 0


def export_lines(conn: psycopg.Connection) -> Iterator[str]:
    """Every customer as one line of JSON, ``{"customer": {...}}``, oldest first, streamed from
    one snapshot (a server-side cursor, so memory stays flat)."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        with conn.cursor(name="customers_export") as cursor:
            cursor.itersize = 2000
            cursor.execute(EXPORT_ROWS)
            for row in cursor:
                # The same bytes as SQLite's json_object: compact, non-ASCII as it is.
                customer = customer_from_row(row)
                yield json.dumps({"customer": customer}, ensure_ascii=False, separators=(",", ":"))


def import_batch(conn: psycopg.Connection, rows: list[dict]) -> tuple[int, list[tuple]]:
    """Upsert prepared rows (see upsert_params) in one transaction; return how many customers
    they created, and (position, error details) of each row the database refused: a restored
    lago_id that is another customer's, metadata merged past 50 keys (the others are
    committed)."""
    try:
        with conn.transaction():
            with conn.cursor() as cursor:
                cursor.executemany(UPSERT_COUNTED, rows, returning=True)
                return _inserted(cursor), []
    except (psycopg.errors.UniqueViolation, psycopg.errors.CheckViolation):
        pass
    inserted, refused = 0, []
    with conn.transaction(), conn.cursor() as cursor:
        for position, params in enumerate(rows):
            try:
                with conn.transaction():  # a savepoint: PostgreSQL undoes this row only
                    cursor.execute(UPSERT_COUNTED, params)
                    inserted += cursor.fetchone()["inserted"]
            except (psycopg.errors.UniqueViolation, psycopg.errors.CheckViolation) as e:
                refused.append((position, refusal(e)))
    return inserted, refused


def _inserted(cursor: psycopg.Cursor) -> int:
    """How many rows the results of an executemany(..., returning=True) say were inserted."""
    inserted = 0
    while True:
        inserted += sum(row["inserted"] for row in cursor.fetchall())
        if not cursor.nextset():
            return inserted


def check(conn: psycopg.Connection, min_free_bytes: int = 0) -> None:
    """Raise psycopg.Error unless the database takes a (tiny, durable) write. The server's own
    disk is its operator's to watch: min_free_bytes applies to SQLite's file only."""
    with conn.transaction():
        conn.execute(PROBE_WRITE)


def closed_by_server(conn: psycopg.Connection) -> None:
    """Close and refuse a pooled connection that the server has closed (a restart, an idle
    timeout): its idle socket then reads as ready, with the end of the stream or a last error
    message. One system call, where psycopg_pool's own check costs a round trip to the server on
    every request. Closed, it is thrown away by the pool, which opens another."""
    if conn.closed:
        raise psycopg.OperationalError("the connection is closed")
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        conn.close()
        raise psycopg.OperationalError("the server closed the connection")


class Connections:
    """The connections of one process to one database: a psycopg_pool pool, made in each
    process on its first use (after any fork), its size and waits from the settings."""

    def __init__(self, url: str, pool_size: int, pool_timeout: float, statement_timeout: float):
        self.url, self.pool_size = url, pool_size
        self.pool_timeout, self.statement_timeout = pool_timeout, statement_timeout
        self._pools: dict[int, ConnectionPool] = {}
        self._lock = threading.Lock()
        self._ready: set[int] = set()  # processes that saw the schema up to date
        self._in_use: dict[int, int] = {}  # connections each process has taken
        self._origin: dict[int, ConnectionPool] = {}  # each taken connection's pool

    def prepare(self) -> None:
        """Apply pending migrations (the database itself is the operator's to create)."""
        conn = connect(self.url, self.statement_timeout)
        try:
            migrate(conn)
        finally:
            conn.close()

    def open(self) -> psycopg.Connection:
        """A connection of its own, for a command; the caller closes it."""
        return connect_ready(self.url, self.statement_timeout)

    def acquire(self) -> psycopg.Connection:
        """A connection from this process's pool."""
        pid = os.getpid()  # once: each call is a system call
        pool = self._pool(pid)
        try:
            conn = pool.getconn()
        except PoolTimeout:
            connect(self.url, self.statement_timeout).close()  # unavailable if unreachable
            if self._in_use.get(pid, 0) >= self.pool_size:
                raise  # the server answers and every connection is taken: busy
            # The server is back, but the pool is still waiting out its reconnection backoff
            # from the outage: start afresh rather than answer 503 for seconds more.
            pool = self._replace_pool(pool)
            conn = pool.getconn()
        with self._lock:
            self._in_use[pid] = self._in_use.get(pid, 0) + 1
            self._origin[id(conn)] = pool
        if pid not in self._ready:
            try:
                if schema_version(conn) < len(MIGRATIONS):
                    raise DatabaseMissing("the database is not initialised: run init-db")
            except BaseException:
                self.release(conn)
                raise
            self._ready.add(pid)
        return conn

    def release(self, conn: psycopg.Connection) -> None:
        """Give the connection back (the pool rolls back anything left open)."""
        with self._lock:
            self._in_use[os.getpid()] -= 1
            pool = self._origin.pop(id(conn))
        pool.putconn(conn)  # a replaced pool takes back its own

    def discard(self, conn: psycopg.Connection) -> None:
        """Give back a connection that may be broken: the pool checks it before reuse."""
        self.release(conn)

    def close(self) -> None:
        """Close this process's pool."""
        pool = self._pools.pop(os.getpid(), None)
        if pool is not None:
            pool.close()

    def _pool(self, pid: int) -> ConnectionPool:
        pool = self._pools.get(pid)
        if pool is None:
            with self._lock:
                pool = self._pools.get(pid)
                if pool is None:
                    pool = self._pools[pid] = self._new_pool()
        return pool

    def _new_pool(self) -> ConnectionPool:
        pool = ConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            timeout=self.pool_timeout,
            open=False,
            check=closed_by_server,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "options": session_options(self.statement_timeout),
                **NETWORK,
            },
            name="customers",
        )
        pool.open(wait=False)
        return pool

    def _replace_pool(self, old: ConnectionPool) -> ConnectionPool:
        with self._lock:
            if self._pools.get(os.getpid()) is old:
                self._pools[os.getpid()] = self._new_pool()
        old.close(timeout=0)
        return self._pool(os.getpid())

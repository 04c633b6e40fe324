"""PostgreSQL's schema: the ordered migrations (tables, indexes, the sharded counter, the
trigram search index and the deferred trigger that records events at commit), and how they are
applied. backends/sqlite/schema.py is the same schema in SQLite's terms."""

import psycopg
from psycopg.rows import tuple_row

from customers_service.backends.shared import FOLDED
from customers_service.storage import COLUMNS, REQUIRED, SEARCHED, fold

MIGRATION_LOCK = 7_366_012_001  # pg_advisory_xact_lock key: "customers" migrations
EVENTS_GATE = 7_366_012_002  # shared by writers at commit, exclusive for a moment by the feed
HORIZON_WAIT_MS = 100  # the longest the feed waits for the gate
COUNT_SHARDS = 16

# uuid and timestamptz leave the database as the API writes them (SQLite stores that text), so
# both backends answer the same bytes.
API_TIME = "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
AS_TEXT = {
    "lago_id": "lago_id::text",
    "created_at": API_TIME.format("created_at"),
    "updated_at": API_TIME.format("updated_at"),
}

# The event's customer object, built by the trigger from the changed row (see AS_TEXT).
EVENT_CUSTOMER = ", ".join(
    f"'{c}', " + (AS_TEXT[c].replace(c, f"changed.{c}") if c in AS_TEXT else f"changed.{c}")
    for c in COLUMNS
)

# A customer's body, its JSON object as the API answers it (Python's json: compact, non-ASCII as
# \uXXXX), made by SQL: SQLite's counterpart is the Python function shared.customer_body.
# to_json quotes a text as Python does but for DEL and non-ASCII, which it leaves as they are:
# customers_body then writes each of those as \uXXXX (a surrogate pair past U+FFFF), lower-case,
# one distinct character at a time, wherever it is (in JSON text, only inside strings). The
# functions are IMMUTABLE, as a generated column needs: to_json and to_char are STABLE for the
# sake of other types and patterns, but a text's JSON, and a UTC time in API_TIME's pattern,
# never change.
METADATA_JSON = """CREATE FUNCTION customers_metadata_json(metadata jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT '{' || string_agg(to_json(key)::text || ':' || to_json(value)::text, ','
                             ORDER BY key COLLATE "C") || '}'  -- UTF-8 order: code points'
    FROM jsonb_each_text(metadata)
$$"""
COLUMN_TYPES = {"lago_id": "uuid", "metadata": "jsonb", "created_at": "timestamptz"}
COLUMN_TYPES["updated_at"] = "timestamptz"


def json_value(column: str) -> str:
    """The SQL of a column's value as JSON text (DEL and non-ASCII as they are), in
    customers_body."""
    if column == "lago_id":
        return """'"' || lago_id::text || '"'"""
    if column in ("created_at", "updated_at"):
        return f"""'"' || {API_TIME.format(column)} || '"'"""
    if column == "metadata":
        return "CASE WHEN metadata = '{}' THEN '{}' ELSE customers_metadata_json(metadata) END"
    if column in REQUIRED:
        return f"to_json({column})::text"
    return f"coalesce(to_json({column})::text, 'null')"


def body_expression() -> str:
    """The SQL of the body from the columns: each key, then its value as JSON text."""
    pairs = [f"""'{"," if i else "{"}"{c}":' || {json_value(c)}""" for i, c in enumerate(COLUMNS)]
    return "\n            || ".join(pairs) + " || '}'"


CUSTOMER_BODY = f"""CREATE FUNCTION customers_body(
        {", ".join(f"{c} {COLUMN_TYPES.get(c, 'text')}" for c in COLUMNS)}
    ) RETURNS text LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
    DECLARE
        body text := {body_expression()};
        c text;
        n integer;
    BEGIN
        LOOP
            c := substring(body FROM '[^\\x01-\\x7e]');
            EXIT WHEN c IS NULL;
            n := ascii(c);
            body := replace(body, c, CASE
                WHEN n < 65536 THEN '\\u' || lpad(to_hex(n), 4, '0')
                ELSE '\\u' || to_hex(55232 + (n >> 10)) || '\\u' || to_hex(56320 + (n & 1023))
            END);
        END LOOP;
        RETURN body;
    END $$"""

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
        # Events and webhooks (issue 12); events.py reads them. A sequence is
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
    (
        # SQLite: the same table. A copy records how far it got, batch by batch (copying.py).
        """CREATE TABLE copy_progress (
            id integer PRIMARY KEY CHECK (id = 1),
            progress text NOT NULL
        )""",
    ),
    (
        # Stored bodies (issue 23): each customer's JSON object as the API answers it, a
        # generated column, so every statement that writes a row writes its body (SQLite's
        # upsert computes it instead). Adding it rewrites the table once, firing no trigger.
        METADATA_JSON,
        CUSTOMER_BODY,
        f"""ALTER TABLE customers ADD COLUMN body text NOT NULL
            GENERATED ALWAYS AS (customers_body({", ".join(COLUMNS)})) STORED""",
    ),
)

SCHEMA_VERSION = "SELECT coalesce(max(version), 0) FROM schema_migrations"


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


def fold_existing(conn: psycopg.Connection) -> None:
    """Fill the folded columns of the customers stored before they existed (a migration)."""
    update = f"UPDATE customers SET {', '.join(f'{c} = %s' for c in FOLDED)} WHERE id = %s"
    with conn.cursor(name="customers_to_fold", row_factory=tuple_row) as rows:
        rows.execute(f"SELECT id, {', '.join(SEARCHED)} FROM customers")
        while batch := rows.fetchmany(5000):
            with conn.cursor() as cursor:
                cursor.executemany(update, [(*map(fold, row[1:]), row[0]) for row in batch])

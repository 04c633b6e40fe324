"""PostgreSQL's customers: the upsert, read, delete, list, export and import statements, each
beside a comment naming how SQLite does it (backends/sqlite/customers.py), and the functions
that run them on a connection. Reads answer each customer's stored body (schema.MIGRATIONS)."""

import json
from collections.abc import Iterator, Mapping

import psycopg
import psycopg.errors

from customers_service.backends.postgres.connections import row_cursor
from customers_service.backends.postgres.schema import AS_TEXT
from customers_service.backends.shared import FOLDED, INSERTED, holds_sent, upsert_params
from customers_service.storage import (
    COLUMNS,
    OPTIONAL_FIELDS,
    Customer,
    Filters,
    TooManyMetadataKeys,
    utc_now,
)

# Row locks, not one write lock, so an import makes no live writer wait for a lock; but they
# share the CPU: half the pause SQLite's import takes keeps the live p99 under the contract's
# bound while an import keeps most of its speed (bench/import_live.py measures both).
IMPORT_PAUSE = 0.5
IMPORT_BODIES = False  # the generated column makes each body: the workers' would be wasted

SELECTED = ", ".join(f"{AS_TEXT[c]} AS {c}" if c in AS_TEXT else c for c in COLUMNS)

# SQLite: iif(:set_f, excluded.f, f). A key absent from the request keeps the stored value.
KEEP_ABSENT = ", ".join(
    f"{column} = CASE WHEN %(set_{f})s = 1 THEN excluded.{column} ELSE c.{column} END"
    for f in OPTIONAL_FIELDS
    for column in (f, f"folded_{f}")
    if column in INSERTED
)
# SQLite: the same condition. An upsert that changes nothing writes nothing; jsonb compares
# the merged metadata by value.
CHANGES = " OR ".join(
    [
        "c.name IS DISTINCT FROM excluded.name",
        *(f"(%(set_{f})s = 1 AND c.{f} IS DISTINCT FROM excluded.{f})" for f in OPTIONAL_FIELDS),
        """(%(set_metadata)s = 1 AND c.metadata IS DISTINCT FROM CASE
            WHEN %(metadata_patch)s::jsonb IS NULL THEN '{}'::jsonb
            ELSE jsonb_strip_nulls(c.metadata || %(metadata_patch)s::jsonb)
        END)""",
    ]
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
        WHEN %(set_metadata)s = 0 THEN c.metadata
        WHEN %(metadata_patch)s::jsonb IS NULL THEN '{{}}'::jsonb
        ELSE jsonb_strip_nulls(c.metadata || %(metadata_patch)s::jsonb)
    END,
    updated_at = %(now)s
WHERE {CHANGES}
"""

# The body is a generated column: the statement that writes the row writes it (SQLite's upsert
# computes it in the statement itself).
UPSERT_CUSTOMER = UPSERT_MANY + "RETURNING body"

# xmax is 0 only in a row version this statement inserted: how an import counts its creations.
UPSERT_COUNTED = UPSERT_MANY + "RETURNING (xmax = 0) AS inserted"

SELECT_CUSTOMER = "SELECT body FROM customers WHERE customer_id = %s"

DELETE_CUSTOMER = "DELETE FROM customers WHERE customer_id = %s RETURNING body"

# SQLite reads the count and the page in one read transaction; here one statement, one snapshot.
# LIMIT and OFFSET are written in as numbers: with parameters, the plan psycopg prepares after a
# few calls is generic, and a generic LIMIT makes PostgreSQL sort the whole table. The count is
# the counter's, or with filters a count(*) of what they select; WHERE and ORDER BY come from
# filter_sql() and order_sql().
SELECT_PAGE = """
SELECT total.n AS total_count, page.body
FROM ({count}) total
LEFT JOIN LATERAL (
    SELECT body FROM customers
    WHERE {offset:d} < total.n  -- a page past the end reads no row (checked once)
        AND {where}
    ORDER BY {order}
    LIMIT {limit:d} OFFSET {offset:d}
) page ON true
"""
COUNTED = "SELECT sum(n)::bigint AS n FROM customer_count"
COUNT_FILTERED = "SELECT count(*) AS n FROM customers WHERE {where}"

SELECT_COUNT = "SELECT sum(n)::bigint FROM customer_count"

EXPORT_ROWS = f"SELECT {SELECTED} FROM customers ORDER BY id"

LARGEST_OFFSET = 2**63 - 1

METADATA_CONSTRAINT = "customers_metadata_keys"


def customer_from_row(row: dict) -> dict:
    """A row of SELECTED as the customer object (the export's): its metadata's keys in code
    point order, as SQLite's."""
    if len(row["metadata"]) > 1:
        row["metadata"] = dict(sorted(row["metadata"].items()))
    return row


def refusal(error: psycopg.IntegrityError) -> dict:
    """Why the database refused a customer, as the API's error details."""
    if error.diag.constraint_name == METADATA_CONSTRAINT:
        return {"metadata": ["too_many_metadata_keys"]}
    return {"lago_id": ["lago_id_taken"]}  # a restored lago_id that another customer has


def upsert_customer(conn: psycopg.Connection, fields: Mapping) -> Customer:
    """Backend.upsert_customer: the metadata limit is a CHECK constraint.

    The customer is read first: when it already holds every value sent, that is the answer, and
    nothing that writes or locks runs (a no-op upsert here would lock the row, which writes to
    the WAL). Otherwise one statement in autocommit is its own transaction: execute() returns
    only once the server has committed it, so the row it returns is durable, in one round trip
    instead of three; its WHERE makes the check and the write one. When another request made
    the customer hold what was sent in between, it returns no row, and runs again in a
    transaction, where it locks the row before the read, so the customer answered is the one
    it checked.
    """
    stored = get_customer(conn, fields["customer_id"])
    if holds_sent(stored, fields):
        return stored
    params = upsert_params(fields, utc_now())
    cursor = row_cursor(conn)
    try:
        row = cursor.execute(UPSERT_CUSTOMER, params).fetchone()
        if row is None:
            with conn.transaction():
                row = cursor.execute(UPSERT_CUSTOMER, params).fetchone()
                row = row or cursor.execute(SELECT_CUSTOMER, (fields["customer_id"],)).fetchone()
    except psycopg.errors.CheckViolation as e:
        if "metadata" in refusal(e):
            raise TooManyMetadataKeys() from None
        raise
    return Customer(row[0])


def get_customer(conn: psycopg.Connection, customer_id: str) -> Customer | None:
    """Backend.get_customer (an id with NUL, which PostgreSQL's text cannot hold: None)."""
    if "\0" in customer_id:
        return None
    row = row_cursor(conn).execute(SELECT_CUSTOMER, (customer_id,)).fetchone()
    return Customer(row[0]) if row else None


def delete_customer(conn: psycopg.Connection, customer_id: str) -> Customer | None:
    """Backend.delete_customer: one statement in autocommit, as the upsert."""
    if "\0" in customer_id:
        return None
    row = row_cursor(conn).execute(DELETE_CUSTOMER, (customer_id,)).fetchone()
    return Customer(row[0]) if row else None


def like_pattern(text: str) -> str:
    """A LIKE pattern that finds ``text`` anywhere, its % and _ plain characters."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def filter_sql(filters: Filters) -> tuple[str, dict]:
    """The WHERE condition and its parameters for a list's filters (storage.Filters); the same
    selection as SQLite's filter_sql."""
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


def order_sql(filters: Filters) -> str:
    """The ORDER BY of a list (on the columns, not the text aliases of SELECTED)."""
    direction = "DESC" if filters.descending else "ASC"
    return f"customers.{filters.sort} {direction}, customers.id {direction}"


def list_customers(
    conn: psycopg.Connection, page: int, per_page: int, filters
) -> tuple[list[Customer], int]:
    """Backend.list_customers: the count and the page in one statement, one snapshot."""
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
    cursor = row_cursor(conn)
    rows = cursor.execute(statement, params, prepare=False if filters.any() else None).fetchall()
    total = rows[0][0] or 0
    # A page past the end: one row, without a body.
    return [Customer(body) for _, body in rows if body is not None], total


def count_customers(conn: psycopg.Connection) -> int:
    """Backend.count_customers: the sum of the counter's shards."""
    return conn.execute(SELECT_COUNT).fetchone()["sum"] or 0


def export_lines(conn: psycopg.Connection) -> Iterator[str]:
    """Backend.export_lines: a server-side cursor in a repeatable-read snapshot, so memory
    stays flat."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        with conn.cursor(name="customers_export") as cursor:
            cursor.itersize = 2000
            cursor.execute(EXPORT_ROWS)
            for row in cursor:
                # The same bytes as SQLite's json_object: compact, non-ASCII as it is.
                customer = customer_from_row(row)
                yield json.dumps({"customer": customer}, ensure_ascii=False, separators=(",", ":"))


def import_batch(conn: psycopg.Connection, rows: list[dict]) -> tuple[int, int, list[tuple]]:
    """Backend.import_batch: one executemany; if the database refuses a row, the batch again
    row by row, each in a savepoint, in one transaction."""
    try:
        with conn.transaction():
            with conn.cursor() as cursor:
                cursor.executemany(UPSERT_COUNTED, rows, returning=True)
                return *_written(cursor), []
    except (psycopg.errors.UniqueViolation, psycopg.errors.CheckViolation):
        pass
    inserted, updated, refused = 0, 0, []
    with conn.transaction(), conn.cursor() as cursor:
        for position, params in enumerate(rows):
            try:
                with conn.transaction():  # a savepoint: PostgreSQL undoes this row only
                    cursor.execute(UPSERT_COUNTED, params)
                    created, changed = _written(cursor)
            except (psycopg.errors.UniqueViolation, psycopg.errors.CheckViolation) as e:
                refused.append((position, refusal(e)))
                continue
            inserted, updated = inserted + created, updated + changed
    return inserted, updated, refused


def _written(cursor: psycopg.Cursor) -> tuple[int, int]:
    """How many rows the results of upserts say were inserted and updated: an upsert that
    changed nothing returns no row."""
    inserted = updated = 0
    while True:
        for row in cursor.fetchall():
            inserted, updated = inserted + row["inserted"], updated + (not row["inserted"])
        if not cursor.nextset():
            return inserted, updated

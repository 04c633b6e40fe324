"""SQLite's customers: the upsert, read, delete, list (its filters and their plans), export
and import statements, and the functions that run them on a connection. Reads answer each
customer's stored body (schema.BODY).
backends/postgres/customers.py holds their PostgreSQL counterparts."""

import contextlib
import dataclasses
import re
import sqlite3
from collections.abc import Iterator, Mapping
from operator import itemgetter

from customers_service.backends.shared import (
    FOLDED,
    INSERTED,
    UPSERT_PARAMS,
    holds_sent,
    upsert_params,
)
from customers_service.backends.sqlite.connections import make_durable, write, write_alone
from customers_service.backends.sqlite.schema import BODY, body_sql
from customers_service.storage import (
    COLUMNS,
    OPTIONAL_FIELDS,
    Customer,
    Filters,
    TooManyMetadataKeys,
    utc_now,
)

SELECTED = ", ".join(COLUMNS)  # a customer's columns, in order (its body is made from them)

# The value each column takes when the upsert updates a customer. A key absent from the request
# keeps the stored value: its :set_<field> flag is 0. lago_id and created_at are only ever
# written by the insert. Metadata is merged (RFC 7396: json_patch), or emptied when the
# request's metadata is null. (A SET sees the stored row: the body repeats these expressions.)
UPDATED = {
    "name": "excluded.name",
    "folded_name": "excluded.folded_name",
    **{
        column: f"iif(:set_{f}, excluded.{column}, {column})"
        for f in OPTIONAL_FIELDS
        for column in (f, f"folded_{f}")
        if column in INSERTED
    },
    "metadata": """CASE
        WHEN NOT :set_metadata THEN metadata
        WHEN :metadata_patch IS NULL THEN '{}'
        ELSE json_patch(metadata, :metadata_patch)
    END""",
    "updated_at": ":now",
}
# An upsert that changes nothing writes nothing: the update runs only where a key sent holds a
# new value (the same check in the same statement, so no concurrent change slips between). A
# metadata patch changes something when one of its keys differs from the stored one (a null
# for a key that is absent does not); a null metadata when some key is stored.
# PostgreSQL: the same condition in its customers.py.
CHANGES = " OR ".join(
    [
        "name IS NOT excluded.name",
        *(f"(:set_{f} AND {f} IS NOT excluded.{f})" for f in OPTIONAL_FIELDS),
        """(:set_metadata AND CASE
            WHEN :metadata_patch IS NULL THEN metadata <> '{}'
            ELSE EXISTS (
                SELECT 1 FROM json_each(:metadata_patch) AS sent
                LEFT JOIN json_each(customers.metadata) AS kept ON kept.key = sent.key
                WHERE sent.value IS NOT kept.value
            )
        END)""",
    ]
)
# The body is written in the statement that writes the row, from the values it writes
# (schema.body_sql), or for a created customer from :body, which an import's workers make of
# the same values with the same function (shared.with_created_body). PostgreSQL computes it as
# a generated column.
UPSERT_MANY = f"""
INSERT INTO customers ({", ".join(INSERTED)}, body)
VALUES (
    {", ".join(":" + c for c in INSERTED)},
    coalesce(:body, {body_sql({c: ":" + c for c in COLUMNS})})
)
ON CONFLICT (customer_id) DO UPDATE SET
    {", ".join(f"{column} = {value}" for column, value in UPDATED.items())},
    body = {body_sql(UPDATED)}
WHERE {CHANGES}
"""

UPSERT_CUSTOMER = UPSERT_MANY + "RETURNING body"

SELECT_CUSTOMER = f"SELECT {BODY} FROM customers WHERE customer_id = ?"

DELETE_CUSTOMER = f"DELETE FROM customers WHERE customer_id = ? RETURNING {BODY}"

# WHERE and ORDER BY come from filter_sql() and order_sql(); the table may name the index to walk.
# Each row names its customer_id too, so the two ways to a page can be compared (test_filters).
SELECT_PAGE = f"""
SELECT customer_id, {BODY} AS body FROM {{table}}
WHERE {{where}}
ORDER BY {{order}}
LIMIT :limit OFFSET :offset
"""

# An unfiltered page among the first ones, the list's most frequent read: the total and the page
# in one statement, so one snapshot without a transaction's BEGIN and COMMIT (the count's
# subquery runs once). A page that comes back empty is read again the general way.
SELECT_FIRST_PAGES = f"""
SELECT (SELECT n FROM customer_count), {BODY} FROM customers
ORDER BY {{order}}
LIMIT ? OFFSET ?
"""
FIRST_PAGES_ROWS = 10_000  # offsets below this: an empty page's extra scan stays short

SELECT_FILTERED_COUNT = "SELECT count(*) FROM customers WHERE {where}"
COUNT_SEARCH = "SELECT count(*) FROM customer_search WHERE customer_search MATCH ?"
COUNT_PAIR = "SELECT count(*) FROM customer_metadata WHERE key = ? AND value = ?"

SELECT_COUNT = "SELECT n FROM customer_count"

# Metadata keys in code point order, as bodies give them (shared.customer_body).
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


# Seconds an import pauses after a batch during which a live writer waited for the lock
# (live_writes_since), per second the batch's transaction took. SQLite has
# one write lock, and its busy handler lets a writer that retries at once (the import) win over
# the service's writers, which sleep between tries: pausing as long as it wrote gives them the
# lock, while the import's worker processes go on checking the next batches, so the import keeps
# most of its speed (bench/import_live.py measures both).
IMPORT_PAUSE = 1.0
IMPORT_BODIES = True  # the one writer takes each created customer's body from the workers


# UPSERT_CUSTOMER with its parameters numbered (?1 is UPSERT_PARAMS[0]), given as a tuple:
# sqlite3 binds a named parameter by making its name a str and looking it up, for each one.
UPSERT_NUMBERED = re.sub(
    r":(\w+)", lambda m: f"?{UPSERT_PARAMS.index(m.group(1)) + 1}", UPSERT_CUSTOMER
)
in_upsert_order = itemgetter(*UPSERT_PARAMS)


def refusal(error: sqlite3.IntegrityError) -> dict:
    """Why the database refused a customer, as the API's error details."""
    if "too_many_metadata_keys" in str(error):
        return {"metadata": ["too_many_metadata_keys"]}
    return {"lago_id": ["lago_id_taken"]}  # a restored lago_id that another customer has


def upsert_customer(conn: sqlite3.Connection, fields: Mapping) -> Customer:
    """Backend.upsert_customer: one numbered statement, its own transaction (write_alone); the
    metadata limit is a trigger's.

    A statement that changed nothing returns no row, and the customer is read: if it still holds
    every value sent, that is the answer. If a change came in between, the statement runs again
    holding the write lock, with the read, so the customer answered is the one it checked (and
    the change it would have made is made now).
    """
    params = in_upsert_order(upsert_params(fields, utc_now()))
    with metadata_refused():
        rows = write_alone(conn, UPSERT_NUMBERED, params)
        if rows:
            return Customer(rows[0][0])
        stored = get_customer(conn, fields["customer_id"])
        if holds_sent(stored, fields):
            return stored
        changes = conn.total_changes
        with conn:
            begin_write(conn)
            rows = conn.execute(UPSERT_NUMBERED, params).fetchall()
            rows = rows or conn.execute(SELECT_CUSTOMER, (fields["customer_id"],)).fetchall()
    if conn.total_changes != changes:
        make_durable(conn)
    return Customer(rows[0][0])


@contextlib.contextmanager
def metadata_refused() -> Iterator[None]:
    """Turn the metadata limit's refusal into TooManyMetadataKeys."""
    try:
        yield
    except sqlite3.IntegrityError as e:
        if "metadata" in refusal(e):
            raise TooManyMetadataKeys() from None
        raise


def get_customer(conn: sqlite3.Connection, customer_id: str) -> Customer | None:
    """Backend.get_customer: one read by the unique index."""
    row = conn.execute(SELECT_CUSTOMER, (customer_id,)).fetchone()
    return Customer(row[0]) if row else None


def delete_customer(conn: sqlite3.Connection, customer_id: str) -> Customer | None:
    """Backend.delete_customer: one statement, its own transaction (write_alone)."""
    rows = write_alone(conn, DELETE_CUSTOMER, (customer_id,))
    return Customer(rows[0][0]) if rows else None


def filter_sql(filters: Filters, walk: bool = False) -> tuple[str, dict]:
    """The WHERE condition and its parameters for a list's filters (storage.Filters).

    By default the search and metadata filters find their rows through their indexes (the FTS5
    table, the pairs). With ``walk`` they test each row instead, for a page read by walking the
    sort's index: cheaper when the filters select so many rows that the page fills quickly.
    """
    conditions, params = [], {}
    if filters.search is not None:
        params["search"] = filters.search
        if has_trigrams(filters.search) and not walk:
            params["trigrams"] = fts_query(filters.search)
            conditions.append(
                "customers.id IN (SELECT rowid FROM customer_search "
                "WHERE customer_search MATCH :trigrams)"
            )
        if not is_exact_in_index(filters.search) or walk:
            # Shorter than a trigram, or walking: each row is looked at; or the customers
            # holding the term's trigrams (fts_query), each checked for the term itself.
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


def is_exact_in_index(term: str) -> bool:
    """Whether the search index alone finds exactly the customers holding the term: a term of
    one trigram. The index keeps which customers hold a trigram, not where (detail=none)."""
    return len(term) == 3


def fts_query(term: str) -> str:
    """An FTS5 query of trigrams that cover a term (3 characters or more), each a phrase of one
    token: it finds the customers holding them all, among them those holding the term.

    Every third trigram and the last: a trigram more would select few customers fewer, and
    FTS5 reads a trigram's whole list of customers (bench/README.md, issue 23).
    """
    starts = [*range(0, len(term) - 3, 3), len(term) - 3]
    return " AND ".join(fts_phrase(t) for t in dict.fromkeys(term[i : i + 3] for i in starts))


def fts_phrase(term: str) -> str:
    """An FTS5 phrase of the term: with the trigram tokenizer, the substring itself."""
    return '"' + term.replace('"', '""') + '"'


SORT_INDEXES = {"created_at": "customers_newest_first", "updated_at": "customers_recently_updated"}


def order_sql(filters: Filters) -> str:
    """The ORDER BY of a list: its sort column, then the insertion order, the same way."""
    direction = "DESC" if filters.descending else "ASC"
    return f"{filters.sort} {direction}, id {direction}"


def list_customers(
    conn: sqlite3.Connection, page: int, per_page: int, filters: Filters
) -> tuple[list[Customer], int]:
    """Backend.list_customers: the count and the page in one read transaction."""
    offset = (page - 1) * per_page
    if not filters.any() and offset < FIRST_PAGES_ROWS:
        statement = SELECT_FIRST_PAGES.format(order=order_sql(filters))
        rows = conn.execute(statement, (per_page, offset)).fetchall()
        if rows:
            return [Customer(row[1]) for row in rows], rows[0][0]
    with conn:
        conn.execute("BEGIN")  # one read transaction, so the page and the count agree
        everyone = count_customers(conn)
        total = count_selected(conn, filters) if filters.any() else everyone
        if offset >= total:  # past the end: no scan, and no integer too large for SQLite
            return [], total
        rows = conn.execute(*page_query(filters, offset, per_page, total, everyone)).fetchall()
    return [Customer(row[1]) for row in rows], total


def count_selected(conn: sqlite3.Connection, filters: Filters) -> int:
    """How many customers the filters select.

    A search term of one trigram or one metadata pair alone is counted in its own index: every
    row there is a customer's (the triggers keep them so), and looking each customer up would
    cost more than the count itself (bench/README.md, filters). A longer term's customers are
    looked up, each checked for the term.
    """
    others = dataclasses.replace(filters, search=None, metadata={}).any()
    if not others and not filters.metadata and filters.search is not None:
        if is_exact_in_index(filters.search):
            return conn.execute(COUNT_SEARCH, (fts_query(filters.search),)).fetchone()[0]
    if not others and filters.search is None and len(filters.metadata) == 1:
        ((key, value),) = filters.metadata.items()
        return conn.execute(COUNT_PAIR, (key, value)).fetchone()[0]
    where, params = filter_sql(filters)
    return conn.execute(SELECT_FILTERED_COUNT.format(where=where), params).fetchone()[0]


def page_query(
    filters: Filters, offset: int, limit: int, total: int, everyone: int
) -> tuple[str, dict]:
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
    """Backend.export_lines: SQLite's own JSON functions write each line, in one read
    transaction."""
    with conn:
        conn.execute("BEGIN")
        for (line,) in conn.execute(EXPORT_LINES):
            yield line


def count_customers(conn: sqlite3.Connection) -> int:
    """Backend.count_customers: kept by triggers, so this reads one row."""
    return conn.execute(SELECT_COUNT).fetchone()[0]


def upsert_batch(conn: sqlite3.Connection, params: list[dict]) -> tuple[int, int]:
    """Run prepared upserts (see upsert_params) in the caller's transaction; return how many
    customers they created and how many they changed."""
    before = count_customers(conn)
    written = conn.executemany(UPSERT_MANY, params).rowcount  # a no-op upsert writes no row
    inserted = count_customers(conn) - before
    return inserted, written - inserted


def import_batch(conn: sqlite3.Connection, rows: list[dict]) -> tuple[int, int, list[tuple]]:
    """Backend.import_batch: one executemany; if the database refuses a row, the batch again
    row by row, in one transaction, each refusal undoing its own statement only."""
    try:
        with write(conn):
            begin_write(conn)
            return *upsert_batch(conn, rows), []
    except sqlite3.IntegrityError:
        pass
    inserted, updated, refused = 0, 0, []
    with write(conn):
        begin_write(conn)
        for position, params in enumerate(rows):
            try:
                created, changed = upsert_batch(conn, [params])
            except sqlite3.IntegrityError as e:  # SQLite undoes that statement only
                refused.append((position, refusal(e)))
                continue
            inserted, updated = inserted + created, updated + changed
    return inserted, updated, refused


def begin_write(conn: sqlite3.Connection) -> None:
    """Start a write transaction now, so a batch never waits for the lock half-way."""
    conn.execute("BEGIN IMMEDIATE")

"""Time the migration that stores each customer's body (issue 23) on 1,000,000 customers.

    .venv/bin/python bench/body_migration.py [--rows 1000000] [--backends sqlite postgres]

Builds each database at the schema before that migration: the first migration, the customers
inserted in bulk, the next migrations (their folded copies, indexes and triggers), then metadata
on a fifth of them (its events removed). A tenth have non-ASCII names and cities, every optional
field but one is filled. Then times that migration alone, as a start or `init-db` runs it,
and checks a sample of the bodies against the API's encoder. PostgreSQL runs in a throwaway
cluster (tests/support/postgres_cluster.py) with its default settings.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from support.postgres_cluster import PostgresCluster  # noqa: E402

from customers_service.storage import COLUMNS  # noqa: E402

INSERTED = (
    "lago_id, customer_id, name, country, address_line1, state, zipcode, email, city, url, "
    "phone, logo_url, legal_name, legal_number, created_at, updated_at"
)
METADATA = {"crm_id": "48213", "plan": "pro", "région": "Île-de-France", 'say "hi"': "a\\b"}
_encode = json.JSONEncoder(separators=(",", ":")).encode  # responses._encode


def customer_rows(count: int):
    """The customers, as INSERTED's values (times as the API writes them)."""
    start = 1_600_000_000
    for i in range(count):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + i))
        accented = i % 10 == 0
        yield (
            str(uuid.UUID(int=i)),
            f"cust-{i:08d}",
            f"Zoë Müller {i}" if accented else f"Customer {i}",
            "FR",
            f"{i % 500} rue de la Paix",
            "Île-de-France" if accented else "IDF",
            f"{75000 + i % 20:05d}",
            f"user{i}@example.test",
            "Zürich" if accented else "Paris",
            f"https://example.test/{i}",
            "+33 1 23 45 67 89",
            f"https://example.test/{i}/logo.png",
            f"Company {i} SAS",
            f"FR{i:011d}",
            stamp,
            stamp,
        )


@contextlib.contextmanager
def migrations_up_to(schema, count: int):
    """``schema``'s migrate applies only its first ``count`` steps meanwhile."""
    kept = schema.MIGRATIONS
    schema.MIGRATIONS = kept[:count]
    try:
        yield
    finally:
        schema.MIGRATIONS = kept


def body_step(schema) -> int:
    """The number of ``schema``'s migration step that adds the body column (later steps are
    other issues')."""
    for number, step in enumerate(schema.MIGRATIONS, start=1):
        if any(isinstance(s, str) and "ADD COLUMN body" in s for s in step):
            return number
    raise LookupError("no migration adds the body column")


def expected_body(row: dict) -> str:
    """The customer's JSON object as the API wrote it before bodies were stored."""
    customer = {c: row[c] for c in COLUMNS}
    metadata = customer["metadata"]
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    customer["metadata"] = dict(sorted(metadata.items()))
    return _encode(customer)


def sqlite_database(folder: str, rows: int) -> tuple[float, int]:
    """Seconds the migration took on SQLite, and how many bodies were checked."""
    from customers_service.backends.sqlite import connections, schema

    conn = connections.connect(os.path.join(folder, "body.sqlite3"), create=True)
    conn.execute("PRAGMA synchronous = OFF")  # the fill only
    last = body_step(schema)
    with migrations_up_to(schema, 1):
        schema.migrate(conn)
    with conn:
        conn.executemany(
            f"INSERT INTO customers ({INSERTED}) VALUES ({', '.join('?' * 16)})",
            customer_rows(rows),
        )
    with migrations_up_to(schema, last - 1):
        schema.migrate(conn)
    with conn:
        conn.execute("UPDATE customers SET metadata = ? WHERE id % 5 = 0", (json.dumps(METADATA),))
        conn.execute("DELETE FROM events")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA synchronous = NORMAL")
    started = time.perf_counter()
    with migrations_up_to(schema, last):
        schema.migrate(conn)
    took = time.perf_counter() - started
    assert schema.schema_version(conn) == last
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    checked = 0
    for row in conn.execute(f"SELECT {', '.join(COLUMNS)}, body FROM customers WHERE id % 997 = 1"):
        assert row["body"] == expected_body(dict(row)), dict(row)
        checked += 1
    conn.close()
    return took, checked


def postgres_database(cluster: PostgresCluster, rows: int) -> tuple[float, int]:
    """Seconds the migration took on PostgreSQL, and how many bodies were checked."""
    from customers_service.backends.postgres import connections, customers, schema

    cluster.admin("CREATE DATABASE body")
    conn = connections.connect(cluster.url("body"), statement_timeout=3600)
    last = body_step(schema)
    with migrations_up_to(schema, 1):
        schema.migrate(conn)
    with conn.transaction(), conn.cursor() as cursor:
        # The counter's trigger would update one row a million times in one transaction.
        conn.execute("ALTER TABLE customers DISABLE TRIGGER customers_counted")
        with cursor.copy(f"COPY customers ({INSERTED}) FROM STDIN") as copy:
            for row in customer_rows(rows):
                copy.write_row(row)
        conn.execute("ALTER TABLE customers ENABLE TRIGGER customers_counted")
        conn.execute("UPDATE customer_count SET n = %s WHERE shard = 0", (rows,))
    with migrations_up_to(schema, last - 1):
        schema.migrate(conn)
    with conn.transaction():
        conn.execute("ALTER TABLE customers DISABLE TRIGGER customers_events")
        conn.execute(
            "UPDATE customers SET metadata = %s WHERE id %% 5 = 0", (json.dumps(METADATA),)
        )
        conn.execute("ALTER TABLE customers ENABLE TRIGGER customers_events")
    conn.execute("VACUUM ANALYZE customers")
    conn.execute("CHECKPOINT")
    started = time.perf_counter()
    with migrations_up_to(schema, last):
        schema.migrate(conn)
    took = time.perf_counter() - started
    assert schema.schema_version(conn) == last
    checked = 0
    query = f"SELECT {customers.SELECTED}, body FROM customers WHERE id % 997 = 1"
    for row in conn.execute(query):
        assert row["body"] == expected_body(row), row
        checked += 1
    conn.close()
    return took, checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-body-")
    cluster = None
    try:
        for backend in args.backends:
            if backend == "sqlite":
                took, checked = sqlite_database(folder, args.rows)
            else:
                cluster = PostgresCluster()
                cluster.init()
                cluster.start()
                took, checked = postgres_database(cluster, args.rows)
            print(
                f"{backend}: the body migration took {took:.1f} s on {args.rows:,} customers "
                f"({checked:,} bodies checked)",
                flush=True,
            )
    finally:
        if cluster is not None:
            cluster.remove()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

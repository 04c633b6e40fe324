"""Time page 1 of each list filter on 1,000,000 customers with metadata, on both backends.

    .venv/bin/python bench/filters.py [--rows 1000000] [--requests 100] [--backends sqlite postgres]

Fills a SQLite file and a PostgreSQL database of a throwaway cluster
(tests/support/postgres_cluster.py) with the same customers, a few metadata keys each, then sends
each query of QUERIES through the WSGI app in-process (no network, no gunicorn), the backends
alternating query by query; prints the median and p99 of each and, with --explain, each
backend's query plan.
"""

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from in_process import remove_throwaways  # noqa: E402
from support.postgres_cluster import PostgresCluster  # noqa: E402

from customers_service import database, storage  # noqa: E402
from customers_service.app import create_app  # noqa: E402
from customers_service.backends import shared  # noqa: E402
from customers_service.backends.postgres import connections as pg_connections  # noqa: E402
from customers_service.backends.sqlite import connections as sqlite_connections  # noqa: E402
from customers_service.backends.sqlite import customers as sqlite_customers  # noqa: E402
from customers_service.database import prepare_database  # noqa: E402

KEY = "bench-key"
FIRST = ["Gavin", "Dinesh", "Monica", "Richard", "Jared", "Laurie", "Élodie", "Zoë", "Ørjan", "Ana"]
LAST = ["Belson", "Chugtai", "Hall", "Bachman", "Dunn", "Müller", "Nakamura", "García", "Smith"]
COMPANY = ["Acme", "Hooli", "Pied Piper", "Raviga", "Endframe", "Bream-Hall", "Initech"]
SUFFIX = ["Inc", "LLC", "SAS", "GmbH", "Ltd"]
COUNTRIES = ["FR", "DE", "GB", "ES", "IT", "CA", "NL", "BE", "CH", "SE"]
PLANS = ["free", "starter", "pro", "enterprise"]

# Page 1 of each: name, query string, what it selects of 1,000,000.
QUERIES = [
    ("customer_id", "customer_id=cust-00500000", "1 row"),
    ("email", "email=USER500000%40EXAMPLE0.TEST", "1 row"),
    ("rare search term", "search_term=zyxwvut", "10 rows"),
    ("rare metadata pair", "metadata[crm_id]=CRM-0500000", "1 row"),
    ("rare country", "countries[]=li", "100 rows"),
    ("broad search term", "search_term=holdings", "10%"),
    ("broad country", "countries[]=us", "50%"),
    ("broad metadata pair", "metadata[plan]=pro", "25%"),
    ("two filters", "countries[]=FR&metadata[plan]=enterprise", "few"),
    ("recent changes", "sort=updated_at&updated_at[gte]=2024-06-01T00:00:00Z", "about 1%"),
    ("short search term", "search_term=zy", "10 rows, no trigram"),
    ("no filter", "page=1", "all"),
]


def people(rows: int):
    """The same customers every run: half in the US, 100 in Liechtenstein, 10% with "Holdings"
    in their legal name, 10 named Zyxwvut, a few metadata keys each."""
    rng = random.Random(1)
    start = 1_600_000_000  # 2020-09-13
    step = (1_735_000_000 - start) / rows  # up to the end of 2024
    for i in range(rows):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + int(i * step)))
        if i % 1000 == 7:
            country = "LI" if i % 10_000 == 7 else rng.choice(COUNTRIES)
        else:
            country = "US" if i % 2 else rng.choice(COUNTRIES)
        company = f"{rng.choice(COMPANY)} {'Holdings' if i % 10 == 3 else rng.choice(SUFFIX)}"
        last = "Zyxwvut" if i % 100_000 == 11 else rng.choice(LAST)
        yield {
            "lago_id": str(uuid.UUID(int=i)),
            "customer_id": f"cust-{i:08d}",
            "name": f"{rng.choice(FIRST)} {last}",
            "country": country,
            "address_line1": f"{rng.randrange(1, 9999)} Main Street",
            "state": rng.choice(["CA", "NY", "TX", "IDF", None]),
            "zipcode": f"{rng.randrange(10000, 99999)}",
            "email": f"user{i}@example{i % 10}.test",
            "city": rng.choice(["Paris", "Berlin", "Austin", "Woodland Hills"]),
            "legal_name": company,
            "metadata": {"crm_id": f"CRM-{i:07d}", "plan": PLANS[i % 4], "seats": str(i % 50)},
            "created_at": stamp,
            "updated_at": stamp,
        }


def fill_sqlite(path: str, rows: int) -> None:
    """The customers through the service's own upsert, in big transactions, without fsync."""
    app = create_app({"CUSTOMERS_DATABASE": path, "CUSTOMERS_API_KEYS": KEY})
    prepare_database(app)
    conn = sqlite_connections.connect(path, synchronous="NORMAL")
    conn.execute("PRAGMA synchronous = OFF")
    batch = []
    for person in people(rows):
        batch.append(shared.upsert_params(person, person["created_at"]))
        if len(batch) == 50_000:
            with conn:
                sqlite_customers.upsert_batch(conn, batch)
            batch = []
    with conn:
        sqlite_customers.upsert_batch(conn, batch)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def fill_postgres(url: str, rows: int) -> None:
    """The customers by COPY (the service's columns, its folded copies made by the same
    function), as a bulk load is done: the secondary indexes dropped before and made again
    after, then VACUUM ANALYZE and a checkpoint."""

    app = create_app({"CUSTOMERS_DATABASE_URL": url, "CUSTOMERS_API_KEYS": KEY})
    prepare_database(app)
    conn = pg_connections.connect(url, statement_timeout=3600)
    conn.execute("SET maintenance_work_mem = '512MB'")
    indexes = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'customers' "
        "AND indexname NOT IN ('customers_pkey', 'customers_lago_id_key', "
        "'customers_customer_id_key')"
    ).fetchall()
    for index in indexes:
        conn.execute(f"DROP INDEX {index['indexname']}")
    conn.execute("ALTER TABLE customers DISABLE TRIGGER customers_counted")  # counted below
    columns = shared.INSERTED
    with conn.cursor() as cursor:
        with cursor.copy(f"COPY customers ({', '.join(columns)}) FROM STDIN") as copy:
            for person in people(rows):
                params = shared.upsert_params(person, person["created_at"])
                copy.write_row([params[c] for c in columns])
    conn.execute("UPDATE customer_count SET n = (SELECT count(*) FROM customers) WHERE shard = 0")
    conn.execute("ALTER TABLE customers ENABLE TRIGGER customers_counted")
    for index in indexes:
        conn.execute(index["indexdef"])
    conn.execute("VACUUM ANALYZE customers")
    conn.execute("CHECKPOINT")
    conn.close()


def time_query(client, query: str, count: int) -> tuple[list[float], int]:
    """Milliseconds per GET of page 1 with this query, ``count`` times after 3 warm-ups, and
    the total_count it answered."""
    headers = {"Authorization": f"Bearer {KEY}"}
    timings = []
    for n in range(count + 3):
        t0 = time.perf_counter()
        response = client.get(f"/api/v1/customers?{query}", headers=headers)
        elapsed = (time.perf_counter() - t0) * 1000
        assert response.status_code == 200, response.get_data(as_text=True)
        if n >= 3:
            timings.append(elapsed)
    return timings, response.get_json()["meta"]["total_count"]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


def explain(app, query: str) -> str:
    """The backend's plan of the page (and count) statement of a query."""
    from urllib.parse import parse_qsl

    from werkzeug.datastructures import MultiDict

    from customers_service.list_query import load_list_query

    _, _, filters = load_list_query(MultiDict(parse_qsl(query)))
    with app.app_context():
        store = database.open_store(app)
        try:
            backend = store.backend
            where, params = backend.filter_sql(filters)
            if backend is storage:
                everyone = sqlite_customers.count_customers(store.conn)
                total = store.conn.execute(
                    sqlite_customers.SELECT_FILTERED_COUNT.format(where=where), params
                ).fetchone()[0]
                lines = []
                for sql, values in (
                    (sqlite_customers.SELECT_FILTERED_COUNT.format(where=where), params),
                    sqlite_customers.page_query(filters, 0, 20, total, everyone),
                ):
                    plan = store.conn.execute("EXPLAIN QUERY PLAN " + sql, values).fetchall()
                    lines += [f"    {row[3]}" for row in plan] + ["    --"]
                return "\n".join(lines[:-1])
            count = backend.COUNT_FILTERED.format(where=where) if filters.any() else backend.COUNTED
            page = backend.SELECT_PAGE.format(
                count=count, where=where, order=backend.order_sql(filters), limit=20, offset=0
            )
            plan = store.conn.execute("EXPLAIN ANALYZE " + page, params, prepare=False).fetchall()
            return "\n".join(f"    {row['QUERY PLAN']}" for row in plan)
        finally:
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--explain", action="store_true", help="print each query's plan")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-filters-")
    cluster = None
    apps = {}
    try:
        if "sqlite" in args.backends:
            path = os.path.join(tmp, "customers.sqlite3")
            t0 = time.monotonic()
            fill_sqlite(path, args.rows)
            size = os.path.getsize(path) / 2**20
            print(f"sqlite: {args.rows:,} rows in {time.monotonic() - t0:.0f} s, {size:.0f} MB")
            apps["sqlite"] = create_app({"CUSTOMERS_DATABASE": path, "CUSTOMERS_API_KEYS": KEY})
        if "postgres" in args.backends:
            cluster = PostgresCluster(shared_buffers="1GB").init()
            cluster.start()
            cluster.admin("CREATE DATABASE bench")
            url = cluster.url("bench")
            t0 = time.monotonic()
            fill_postgres(url, args.rows)
            print(f"postgres: {args.rows:,} rows in {time.monotonic() - t0:.0f} s")
            apps["postgres"] = create_app(
                {"CUSTOMERS_DATABASE_URL": url, "CUSTOMERS_API_KEYS": KEY}
            )
        results, selected = {}, {}
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # access lines
            for name, query, _ in QUERIES:
                for backend, app in apps.items():
                    timings, total = time_query(app.test_client(), query, args.requests)
                    results[(name, backend)] = (statistics.median(timings), p99(timings))
                    selected[name] = total
        print()
        print(
            "| filter | query | selects | "
            + " | ".join(f"{b} median / p99 (ms)" for b in apps)
            + " |"
        )
        print("|---|---|---|" + "---|" * len(apps))
        for name, query, selects in QUERIES:
            cells = [f"{results[(name, b)][0]:.1f} / {results[(name, b)][1]:.1f}" for b in apps]
            counted = f"{selected[name]:,} ({selects})"
            print(f"| {name} | `{query}` | {counted} | " + " | ".join(cells) + " |")
        print(json.dumps({f"{n}/{b}": v for (n, b), v in results.items()}), file=sys.stderr)
        if args.explain:
            for name, query, _ in QUERIES:
                for backend, app in apps.items():
                    print(f"\n{name} on {backend}: {query}\n{explain(app, query)}")
    finally:
        remove_throwaways(tmp, cluster)


if __name__ == "__main__":
    main()

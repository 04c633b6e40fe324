"""What the search index's merge options (issue 14's migration: FTS5 ``automerge`` 8, ``pgsz``
2,000) do to writes and searches, against FTS5's defaults (4 and 4,050), on SQLite.

    .venv/bin/python bench/search_index.py [--customers 20000] [--rounds 30]

Writes the same customers one by one (upsert_customer, one transaction each, as the API
does; synchronous NORMAL) into two databases that differ only in those options, timing the
writes, then times page 1 of a search and its count for a rare term, a term in a tenth of the
customers, a frequent trigram and a customer_id, the databases taking turns. Prints medians.
For exact instructions per insert, bench/cost.py measures the code as it is.
"""

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from customers_service.backends.sqlite import connections as sqlite_connections  # noqa: E402
from customers_service.backends.sqlite import customers as sqlite_customers  # noqa: E402
from customers_service.backends.sqlite import schema as sqlite_schema  # noqa: E402

OPTIONS = {"FTS5 defaults": {"automerge": 4, "pgsz": 4050}, "the migration's": {}}
PAGE = """SELECT id FROM customers
WHERE id IN (SELECT rowid FROM customer_search WHERE customer_search MATCH ?)
ORDER BY created_at DESC, id DESC LIMIT 20"""
COUNT = "SELECT count(*) FROM customer_search WHERE customer_search MATCH ?"


def words(count: int) -> list[str]:
    """Random lower-case words of 4 to 9 letters."""
    rnd = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rnd.choices(letters, k=rnd.randint(4, 9))) for _ in range(count)]


def filled(folder: str, options: dict, customers: int, vocabulary: list[str]):
    """A migrated database with those FTS5 options, the customers written one by one; the
    connection and the seconds the writes took."""
    path = os.path.join(folder, "customers.sqlite3")
    conn = sqlite_connections.connect(path, synchronous="NORMAL", create=True)
    sqlite_schema.migrate(conn)
    with sqlite_connections.write(conn):
        for name, value in options.items():
            conn.execute(
                "INSERT INTO customer_search (customer_search, rank) VALUES (?, ?)", (name, value)
            )
    rnd = random.Random(2)
    started = time.perf_counter()
    for i in range(customers):
        pick = rnd.choice
        sqlite_customers.upsert_customer(
            conn,
            {
                "customer_id": f"cus-{i:07d}",
                "name": f"{pick(vocabulary)} {pick(vocabulary)}",
                "email": f"{pick(vocabulary)}@{pick(vocabulary)}.test",
                "legal_name": f"{pick(vocabulary)} holdings" if i % 10 == 0 else pick(vocabulary),
            },
        )
    return conn, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    vocabulary = words(3000)
    terms = {
        "rare term": vocabulary[5],
        "a tenth of them": "holdings",
        "frequent trigram": "ing",
        "customer_id": "cus-00123",
    }
    conns = {}
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        for label, options in OPTIONS.items():
            folder = os.path.join(tmp, str(len(conns)))
            os.mkdir(folder)
            conns[label], seconds = filled(folder, options, args.customers, vocabulary)
            each = seconds / args.customers * 1e6
            print(f"{label}: {args.customers:,} writes, {each:.0f} us each")
        times = {(label, term): [] for label in conns for term in terms}
        for _ in range(args.rounds):
            for label, conn in conns.items():
                for term, text in terms.items():
                    phrase = sqlite_customers.fts_phrase(text)
                    started = time.perf_counter()
                    conn.execute(PAGE, (phrase,)).fetchall()
                    conn.execute(COUNT, (phrase,)).fetchone()
                    times[(label, term)].append(time.perf_counter() - started)
        print("\n| search | " + " | ".join(conns) + " |\n|---|" + "---|" * len(conns))
        for term in terms:
            cells = [f"{statistics.median(times[(label, term)]) * 1000:.2f} ms" for label in conns]
            print(f"| {term} | " + " | ".join(cells) + " |")
        for conn in conns.values():
            conn.close()


if __name__ == "__main__":
    main()

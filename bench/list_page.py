"""Time GET /api/v1/customers page 1 on a 1,000-row and a 1,000,000-row table, in one run.

    .venv/bin/python bench/list_page.py [--rows 1000000] [--requests 3000]

Runs the request through the WSGI app in-process (no network, no gunicorn), alternating the
two databases in rounds so that machine noise hits both alike; prints the median and p99 of each
and their ratio.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from customers_service.app import create_app  # noqa: E402
from customers_service.backends.sqlite import connections as sqlite_connections
from customers_service.backends.sqlite import schema as sqlite_schema

KEY = "bench-key"


def prefill(path: str, rows: int) -> None:
    """A database of ``rows`` customers, made in one transaction without fsync."""
    conn = sqlite_connections.connect(path, create=True)
    sqlite_schema.migrate(conn)
    conn.execute("PRAGMA synchronous = OFF")
    start = 1_600_000_000

    def customers():
        for i in range(rows):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + i))
            # Ids in index order keep the fill fast; the service itself makes random v4 UUIDs.
            yield (str(uuid.UUID(int=i)), f"cust-{i:08d}", f"Customer {i}", "FR", stamp, stamp)

    with conn:
        conn.executemany(
            "INSERT INTO customers (lago_id, customer_id, name, country, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            customers(),
        )
    conn.close()


def time_requests(client, count: int) -> list[float]:
    """Seconds per GET page 1, ``count`` times."""
    headers = {"Authorization": f"Bearer {KEY}"}
    timings = []
    for _ in range(count):
        t0 = time.perf_counter()
        response = client.get("/api/v1/customers?page=1&per_page=20", headers=headers)
        timings.append(time.perf_counter() - t0)
        assert response.status_code == 200
    return timings


def main() -> None:
    """Build both tables, then time page 1 on each in alternating rounds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clients = {}
        for rows in (1000, args.rows):
            path = os.path.join(tmp, f"{rows}.sqlite3")
            t0 = time.perf_counter()
            prefill(path, rows)
            print(f"prefilled {rows:>9,} rows in {time.perf_counter() - t0:.1f} s", flush=True)
            app = create_app({"CUSTOMERS_DATABASE": path, "CUSTOMERS_API_KEYS": KEY})
            clients[rows] = app.test_client()
            timings = {rows: [] for rows in clients}
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            for _ in range(10):
                for rows, client in clients.items():
                    timings[rows] += time_requests(client, args.requests // 10)
        medians = {}
        for rows, values in timings.items():
            values.sort()
            medians[rows] = statistics.median(values)
            p99 = values[int(len(values) * 0.99)]
            print(f"{rows:>9,} rows: median {medians[rows] * 1e6:7.0f} us, p99 {p99 * 1e6:7.0f} us")
        print(f"ratio {args.rows:,} / 1,000: {medians[args.rows] / medians[1000]:.2f}")


if __name__ == "__main__":
    main()

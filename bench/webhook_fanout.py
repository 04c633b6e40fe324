"""What registered webhook endpoints cost upserts: each change writes one delivery row per
endpoint, in the change's transaction.

    .venv/bin/python bench/webhook_fanout.py [--rounds 5] [--upserts 1500]

SQLite (FULL), in-process through the WSGI app: 5,000 customers, then rounds alternating
databases with 0, 1 and 3 endpoints, each ``--upserts`` POSTs (half new customers, half updates).
Prints the median upserts per second of each, and the ratio to none.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from customers_service import database, storage  # noqa: E402
from customers_service.app import create_app  # noqa: E402
from customers_service.backends import shared  # noqa: E402
from customers_service.webhooks import new_endpoint  # noqa: E402

KEY = "bench-key"


def prepared(path: str, endpoints: int) -> None:
    """A database of 5,000 customers with that many endpoints registered."""
    app = create_app({"CUSTOMERS_DATABASE": path, "CUSTOMERS_API_KEYS": KEY})
    database.prepare_database(app)
    store = database.open_store(app)
    now = storage.utc_now()
    rows = [shared.upsert_params({"customer_id": f"c{i}", "name": "N"}, now) for i in range(5000)]
    store.import_batch(rows)
    for _ in range(endpoints):
        store.add_webhook(new_endpoint("http://127.0.0.1:9/hook", now))
    store.close()


def upserts_per_second(path: str, round_: int, count: int) -> float:
    app = create_app({"CUSTOMERS_DATABASE": path, "CUSTOMERS_API_KEYS": KEY})
    client = app.test_client()
    headers = {"Authorization": f"Bearer {KEY}"}
    bodies = [
        {
            "customer": {
                "customer_id": f"new-{round_}-{i}" if i % 2 else f"c{(i * 7919) % 5000}",
                "name": f"N {i}",
                "country": "US",
            }
        }
        for i in range(count + 50)
    ]
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        for body in bodies[:50]:
            client.post("/api/v1/customers", json=body, headers=headers)
        started = time.perf_counter()
        for body in bodies[50:]:
            assert client.post("/api/v1/customers", json=body, headers=headers).status_code == 200
        elapsed = time.perf_counter() - started
    database.close_connections()
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--upserts", type=int, default=1500)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-fanout-")
    paths = {}
    for endpoints in (0, 1, 3):
        paths[endpoints] = os.path.join(tmp, f"endpoints-{endpoints}.sqlite3")
        prepared(paths[endpoints], endpoints)
    rates = {endpoints: [] for endpoints in paths}
    for round_ in range(args.rounds):
        for endpoints, path in paths.items():
            rates[endpoints].append(upserts_per_second(path, round_, args.upserts))
    none = statistics.median(rates[0])
    print("| endpoints | upserts/s (median) | ratio to none |")
    print("|---|---|---|")
    for endpoints, values in rates.items():
        median = statistics.median(values)
        print(f"| {endpoints} | {median:,.0f} | {median / none:.2f} |")


if __name__ == "__main__":
    main()

"""What an update and an upsert that changes nothing cost PostgreSQL's server, which
bench/cost.py does not see: WAL bytes written (pg_stat_wal) and the server process's CPU
(/proc) per request, the store called in-process on a throwaway cluster.

    .venv/bin/python bench/noop_server.py [--requests 3000]
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from support.postgres_cluster import PostgresCluster  # noqa: E402

from customers_service import database  # noqa: E402
from customers_service.app import create_app  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu(pid: int) -> float:
    """Seconds of CPU the server process has used (user and system)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def measure(store, requests: int, name_of) -> tuple[float, float]:
    """WAL bytes and server CPU microseconds per upsert of ``name_of(i)`` as each name."""
    pid = store.conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
    wal = "SELECT wal_bytes FROM pg_stat_wal"
    before_wal, before_cpu = store.conn.execute(wal).fetchone()["wal_bytes"], server_cpu(pid)
    for i in range(requests):
        store.upsert_customer({"customer_id": f"c{i % 500}", "name": name_of(i)})
    after_wal = store.conn.execute(wal).fetchone()["wal_bytes"]
    cpu = server_cpu(pid) - before_cpu
    return (after_wal - before_wal) / requests, cpu / requests * 1e6


def main() -> None:
    """Fill 500 customers, then time updates (a new name each) and no-ops (the same name)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        cluster.admin("CREATE DATABASE noop")
        app = create_app({"CUSTOMERS_DATABASE_URL": cluster.url("noop"), "CUSTOMERS_API_KEYS": "k"})
        database.prepare_database(app)
        store = database.open_store(app)
        measure(store, 500, lambda i: "first")  # creates them
        update = measure(store, args.requests, lambda i: f"name {i}")
        measure(store, 500, lambda i: "same")
        no_op = measure(store, args.requests, lambda i: "same")
        store.close()
        print("| upsert | WAL bytes a request | server CPU a request |\n|---|---|---|")
        for label, (wal, cpu) in (("update", update), ("no-op", no_op)):
            print(f"| {label} | {wal:,.0f} | {cpu:,.0f} us |")
    finally:
        database.close_connections()
        cluster.remove()


if __name__ == "__main__":
    main()

"""What joining k concurrent upserts into one transaction would save (issue 23, group commit), by
a direct experiment on SQLite: the same upserts, k to a transaction, against one each.

    .venv/bin/python bench/group_commit.py [--customers 5000] [--upserts 960] [--rounds 5]

The upserts are the service's statement (backends.sqlite.customers' numbered UPSERT), their
parameters made beforehand, on a database of 5,000 customers written one by one: new customers,
then renames.
"One each" is the service's way (each statement its own transaction, autocommit); "k = n" runs
BEGIN IMMEDIATE, n statements, COMMIT. Instructions per upsert come from callgrind (synchronous
NORMAL: FULL adds an fsync, not instructions); wall times per upsert with NORMAL and with FULL
(NORMAL's commit, then WalSync's fsync of the WAL, as write() does), every way taking turns in
each round, as ratios to one each, medians over the rounds. No group commit is built here.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from customers_service.backends.shared import upsert_params  # noqa: E402
from customers_service.backends.sqlite import connections as sqlite_connections  # noqa: E402
from customers_service.backends.sqlite import customers as sqlite_customers  # noqa: E402
from customers_service.backends.sqlite import schema as sqlite_schema  # noqa: E402
from customers_service.storage import utc_now  # noqa: E402

WAYS = ("one each", 1, 2, 4, 8, 16)
KINDS = ("insert", "rename")
SEED = {
    "country": "US",
    "city": "Woodland Hills",
    "email": "dinesh@piedpiper.test",
    "legal_name": "Coleman-Blair",
    "address_line1": "5230 Penfield Ave",
}


def prepared(path: str, customers: int) -> None:
    """A database of ``customers`` customers written one by one, as the API writes them."""
    conn = sqlite_connections.connect(path, synchronous="NORMAL", create=True)
    sqlite_schema.migrate(conn)
    for i in range(customers):
        sqlite_customers.upsert_customer(conn, {**SEED, "customer_id": f"old-{i}", "name": "G"})
    conn.close()


def params_of(kind: str, way, upserts: int, round_: int) -> list[tuple]:
    """The numbered parameters of ``upserts`` upserts: new customers, or renames."""
    now, tag = utc_now(), f"{way}-{round_}"
    if kind == "insert":
        made = [
            {**SEED, "customer_id": f"new-{tag}-{i}", "name": "Richard"} for i in range(upserts)
        ]
    else:
        made = [
            {"customer_id": f"old-{i % 1000}", "name": f"Renamed {tag} {i}"} for i in range(upserts)
        ]
    return [sqlite_customers.in_upsert_order(upsert_params(c, now)) for c in made]


def run(conn, way, params: list[tuple]) -> None:
    """The upserts, one each (the service's write_alone) or ``way`` to a transaction."""
    if way == "one each":
        for p in params:
            sqlite_connections.write_alone(conn, sqlite_customers.UPSERT_NUMBERED, p)
        return
    previous, conn.isolation_level = conn.isolation_level, None
    for start in range(0, len(params), way):
        conn.execute("BEGIN IMMEDIATE")
        for p in params[start : start + way]:
            conn.execute(sqlite_customers.UPSERT_NUMBERED, p).fetchall()
        conn.execute("COMMIT")
        sqlite_connections.make_durable(conn)
    conn.isolation_level = previous


def child(path: str, upserts: int) -> None:
    """Under callgrind: each way and kind between two os.getppid() calls, after a warm-up."""
    conn = sqlite_connections.connect(path, synchronous="NORMAL")
    for kind in KINDS:
        for way in WAYS:
            run(conn, way, params_of(kind, way, 64, -1))
            params = params_of(kind, way, upserts, 0)
            os.getppid()
            run(conn, way, params)
            os.getppid()
    conn.close()


def instructions(tmp: str, path: str, upserts: int) -> dict:
    """Instructions per upsert of each kind and way."""
    out = os.path.join(tmp, "callgrind.out")
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--dump-before=getppid",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--upserts",
            str(upserts),
            "--child",
            path,
        ],
        check=True,
        capture_output=True,
    )
    counts, n = {}, 0
    for kind in KINDS:
        for way in WAYS:
            with open(f"{out}.{2 * n + 2}") as f:
                counts[kind, way] = int(re.search(r"^totals: (\d+)", f.read(), re.M).group(1))
            counts[kind, way] /= upserts
            n += 1
    return counts


def wall_times(path: str, synchronous: str, upserts: int, rounds: int) -> dict:
    """Median seconds per upsert of each kind and way, the ways taking turns in each round."""
    conn = sqlite_connections.connect(path, synchronous=synchronous)
    times = {(kind, way): [] for kind in KINDS for way in WAYS}
    for round_ in range(rounds):
        for kind in KINDS:
            for way in WAYS:
                params = params_of(kind, way, upserts, f"{synchronous}{round_}")
                started = time.perf_counter()
                run(conn, way, params)
                times[kind, way].append((time.perf_counter() - started) / upserts)
    conn.close()
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--upserts", type=int, default=960)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.upserts)
        return
    tmp = tempfile.mkdtemp(prefix="bench-group-commit-")
    try:
        path = os.path.join(tmp, "group.sqlite3")
        prepared(path, args.customers)
        counted = instructions(tmp, path, args.upserts)
        timed = {s: wall_times(path, s, args.upserts, args.rounds) for s in ("NORMAL", "FULL")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.upserts} upserts a way and kind, {args.rounds} rounds for the times\n")
    print("| upsert | way | instructions | saved | NORMAL us | ratio | FULL us | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in KINDS:
        alone = counted[kind, "one each"]
        for way in WAYS:
            label = way if way == "one each" else f"k = {way}"
            cells = [
                f"{counted[kind, way] / 1000:,.0f}k",
                f"{(alone - counted[kind, way]) / 1000:,.0f}k",
            ]
            for s in ("NORMAL", "FULL"):
                each = timed[s][kind, way]
                cells += [f"{each * 1e6:,.0f}", f"{each / timed[s][kind, 'one each']:.2f}"]
            print(f"| {kind} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

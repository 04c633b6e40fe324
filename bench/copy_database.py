"""``customers copy`` of 1,000,000 customers each way: SQLite to PostgreSQL, then back.

    .venv/bin/python bench/copy_database.py [--customers 1000000] [--endpoint] [--batch-size 5000]

Fills a SQLite file through the service's own upsert (bench/filters.py's customers: metadata,
folded fields, one event each), starts a throwaway PostgreSQL cluster, then times the command
as an operator runs it (its own process), from the file into an empty PostgreSQL database, and
from there into a new SQLite file. With ``--endpoint`` a webhook endpoint is registered first,
so every event also has a due delivery to copy. Prints, for each way, the wall time, the
customers and all rows per second, and the time of each phase the command reports (each kind,
then the check of counts and checksum).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from filters import fill_sqlite  # noqa: E402
from support.postgres_cluster import PostgresCluster  # noqa: E402

FLASK = [sys.executable, "-m", "customers_service", "customers"]


def cpu_seconds(pid: int, children: bool = True) -> float:
    """A process's CPU time, with that of its children that ended (and were waited for)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11 : 15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def cluster_cpu(cluster: PostgresCluster) -> float:
    """The CPU time of a PostgreSQL cluster: its postmaster, the servers it reaped and those
    running."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    total = cpu_seconds(postmaster)
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == postmaster:
            total += cpu_seconds(int(entry), children=False)
    return total


def run_copy(source: str, target: str, batch_size: int, env: dict, cluster) -> dict:
    """Run the command; its wall time, its CPU time and the cluster's, the rows it copied and
    the seconds of each phase it reported (JSON lines: each kind, then the check)."""
    command = [*FLASK, "copy", "--from", source, "--to", target, "--batch-size", str(batch_size)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = cluster_cpu(cluster)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    server_cpu = cluster_cpu(cluster) - server_before
    if result.returncode:
        raise SystemExit(f"{command} failed:\n{result.stderr}")
    said = [json.loads(line) for line in result.stderr.splitlines()]
    phases = {line["kind"]: line["seconds"] for line in said if "kind" in line}
    summary = next(line for line in said if "rows" in line)
    phases["check"] = summary["check_seconds"]
    return {
        "seconds": seconds,
        "rows": summary["rows"],
        "phases": phases,
        "cpu": cpu,
        "server_cpu": server_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--endpoint", action="store_true", help="a delivery per event too")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-copy-")
    cluster = None
    env = {
        **os.environ,
        "CUSTOMERS_LOG_FORMAT": "json",
        "CUSTOMERS_API_KEYS": "bench",
        "CUSTOMERS_DATABASE": os.path.join(tmp, "unused.sqlite3"),
    }
    try:
        source = os.path.join(tmp, "source.sqlite3")
        if args.endpoint:
            subprocess.run(
                [*FLASK, "add-webhook", "http://127.0.0.1:9/hooks"],
                cwd=ROOT,
                env={**env, "CUSTOMERS_DATABASE": source, "CUSTOMERS_LOG_FORMAT": "text"},
                check=True,
                capture_output=True,
            )
        t0 = time.monotonic()
        fill_sqlite(source, args.customers)
        size = os.path.getsize(source) / 2**20
        print(
            f"source: {args.customers:,} customers in {time.monotonic() - t0:.0f} s, {size:.0f} MB"
        )
        cluster = PostgresCluster(shared_buffers="1GB").init()
        cluster.start()
        cluster.admin("CREATE DATABASE copied")
        ways = (
            ("SQLite -> PostgreSQL", source, cluster.url("copied")),
            ("PostgreSQL -> SQLite", cluster.url("copied"), os.path.join(tmp, "back.sqlite3")),
        )
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        print(
            "| way | rows | wall time | customers/s | rows/s | CPU s: copy, PostgreSQL "
            "| phases (s) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, frm, to in ways:
            got = run_copy(frm, to, args.batch_size, env, cluster)
            phases = ", ".join(f"{kind} {s:.1f}" for kind, s in got["phases"].items() if s >= 0.05)
            print(
                f"| {name} | {got['rows']:,} | {got['seconds']:.1f} s | "
                f"{args.customers / got['seconds']:,.0f} | {got['rows'] / got['seconds']:,.0f} | "
                f"{got['cpu']:.0f}, {got['server_cpu']:.0f} | {phases} |",
                flush=True,
            )
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        if cluster is not None:
            cluster.remove()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

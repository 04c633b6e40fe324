"""What metrics (and JSON log lines) cost: the benchmark's ratios to the echo baseline with
CUSTOMERS_METRICS on and off, in one run.

    .venv/bin/python bench/metrics_overhead.py [--rounds 3] [--duration 5] [--backends sqlite]

Starts the echo baseline and, per backend, three gunicorns under gunicorn.conf.py (4 workers,
each its own copy of a prefilled database): metrics off; metrics on (the default, multiprocess
files); metrics on with CUSTOMERS_LOG_FORMAT=json. Rounds then take turns: in each round every
scenario (insert, get, list) runs under wrk against the echo and each server, so that a drift of
the machine's speed falls on all of them alike. Prints, per backend and scenario, the median
ratio to the echo of each server, the drop of the ratio with metrics on against off, and the CPU
time per request of each.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import (  # noqa: E402
    KEY,
    PostgresCluster,
    Server,
    cpu_seconds,
    ensure_wrk,
    postgres_database,
    run_wrk,
    template_database,
)

SCENARIOS = ("insert", "get", "list")
MODES = {
    "off": {"CUSTOMERS_METRICS": "false"},
    "on": {},
    "on+json": {"CUSTOMERS_LOG_FORMAT": "json"},
}


def measure(wrk: str, server: Server, scenario: str, args, rows: int, extra: list[int]) -> tuple:
    """Requests per second and CPU microseconds per request of one wrk run."""
    before = cpu_seconds([server.proc.pid, *extra])
    result = run_wrk(wrk, server.port, scenario, args.connections, args.duration, rows)
    cpu = cpu_seconds([server.proc.pid, *extra]) - before
    if result["errors"]:
        raise RuntimeError(f"{scenario}: {result['errors']} errors")
    return result["rps"], cpu / max(result["requests"], 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--sync", default="NORMAL", help="SQLite's synchronous mode")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    args = parser.parse_args()
    wrk = ensure_wrk()
    tmp = tempfile.mkdtemp(prefix="bench-metrics-")
    cluster, servers = None, {}
    try:
        common = {"CUSTOMERS_API_KEYS": KEY, "CUSTOMERS_WORKERS": "4"}
        databases, extra = {}, {"sqlite": [], "postgres": []}
        if "sqlite" in args.backends:
            template = template_database(tmp, args.rows)
            for mode in MODES:
                path = os.path.join(tmp, f"{mode}.sqlite3")
                shutil.copy(template, path)
                databases[("sqlite", mode)] = {
                    "CUSTOMERS_DATABASE": path,
                    "CUSTOMERS_SQLITE_SYNCHRONOUS": args.sync,
                }
        if "postgres" in args.backends:
            cluster = PostgresCluster(shared_buffers="512MB")
            cluster.init()
            cluster.start()
            extra["postgres"] = [int((cluster.data / "postmaster.pid").read_text().split()[0])]
            url = postgres_database(cluster, args.rows)  # the modes share it: it only grows
            for mode in MODES:
                databases[("postgres", mode)] = {"CUSTOMERS_DATABASE_URL": url}
        echo = Server("bench.echo_app:app", {})
        servers["echo"] = echo
        for (backend, mode), database in databases.items():
            servers[(backend, mode)] = Server("wsgi:app", {**common, **database, **MODES[mode]})
        rps: dict[tuple, list[float]] = {}
        cpu: dict[tuple, list[float]] = {}
        for round_ in range(args.rounds):
            for scenario in SCENARIOS:
                echo_rps, _ = measure(wrk, echo, "echo", args, 0, [])
                for backend in args.backends:
                    for mode in MODES:
                        server = servers[(backend, mode)]
                        got, per_request = measure(
                            wrk, server, scenario, args, args.rows, extra[backend]
                        )
                        rps.setdefault((backend, scenario, mode), []).append(got / echo_rps)
                        cpu.setdefault((backend, scenario, mode), []).append(per_request)
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr, flush=True)
        report(args, rps, cpu)
    finally:
        for server in servers.values():
            server.stop()
        if cluster is not None:
            cluster.remove()
        shutil.rmtree(tmp, ignore_errors=True)


def report(args, rps: dict, cpu: dict) -> None:
    """The table: median ratios to the echo, the drop with metrics on, CPU per request."""
    print(
        f"{args.rounds} rounds of {args.duration} s per run, c{args.connections}, "
        f"{args.rows:,} rows, SQLite synchronous {args.sync}, 4 workers"
    )
    print()
    print(
        "| backend | scenario | ratio off | ratio on (drop) | ratio on + JSON logs (drop) "
        "| CPU/request off, on, on + JSON |"
    )
    print("|---|---|---|---|---|---|")
    for backend in args.backends:
        for scenario in SCENARIOS:
            ratio = {mode: statistics.median(rps[(backend, scenario, mode)]) for mode in MODES}
            used = {mode: statistics.median(cpu[(backend, scenario, mode)]) for mode in MODES}
            off = ratio["off"]
            print(
                f"| {backend} | {scenario} | {off:.3f} "
                f"| {ratio['on']:.3f} ({1 - ratio['on'] / off:+.1%}) "
                f"| {ratio['on+json']:.3f} ({1 - ratio['on+json'] / off:+.1%}) "
                f"| {used['off']:.0f}, {used['on']:.0f}, {used['on+json']:.0f} us |"
            )


if __name__ == "__main__":
    main()

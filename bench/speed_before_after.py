"""What fewer instructions buy in throughput: the wrk ratios to the echo baseline of this checkout
and of another commit (by default the one before issue 14), in one run.

    .venv/bin/python bench/speed_before_after.py [--base 84f4e1c] [--rounds 3] [--duration 5]

Starts the echo and, for each version, gunicorns under this checkout's gunicorn.conf.py (4
workers) on SQLite with synchronous NORMAL and FULL and on PostgreSQL, each on its own copy of a
prefilled database; the other commit's code is served from a git worktree. Rounds take turns:
in each, every scenario (insert, update, get, list) runs under wrk against the echo and each
server, so that a drift of the machine's speed falls on all alike. Prints each median ratio to
the echo, before and after.
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
    ROOT,
    PostgresCluster,
    Server,
    ensure_wrk,
    postgres_database,
    run_wrk,
    template_database,
)
from versions import add_worktree, remove_worktree, shim  # noqa: E402

SCENARIOS = ("insert", "update", "get", "list")
TARGETS = ("SQLite NORMAL", "SQLite FULL", "PostgreSQL")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="84f4e1c", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    wrk = ensure_wrk()
    tmp = tempfile.mkdtemp(prefix="bench-speed-")
    base_code = add_worktree(args.base, os.path.join(tmp, "base"))
    cluster, servers = None, {}
    try:
        paths = {
            "before": shim(base_code, os.path.join(tmp, "before")),
            "after": shim(ROOT, os.path.join(tmp, "after")),
        }
        template = template_database(tmp, args.rows)
        cluster = PostgresCluster(shared_buffers="512MB")
        cluster.init()
        cluster.start()
        urls = {"after": postgres_database(cluster, args.rows)}
        cluster.admin(f"CREATE DATABASE before TEMPLATE bench_{args.rows}")
        urls["before"] = cluster.url("before")
        servers["echo"] = Server("bench.echo_app:app", {})
        for version, path in paths.items():
            common = {"CUSTOMERS_API_KEYS": KEY, "CUSTOMERS_WORKERS": "4", "PYTHONPATH": path}
            for sync in ("NORMAL", "FULL"):
                database = os.path.join(tmp, f"{version}-{sync}.sqlite3")
                shutil.copy(template, database)
                env = {"CUSTOMERS_DATABASE": database, "CUSTOMERS_SQLITE_SYNCHRONOUS": sync}
                servers[(f"SQLite {sync}", version)] = Server(
                    "customers_service.wsgi:app", {**common, **env}
                )
            servers[("PostgreSQL", version)] = Server(
                "customers_service.wsgi:app", {**common, "CUSTOMERS_DATABASE_URL": urls[version]}
            )
        ratios: dict[tuple, list[float]] = {}
        for round_ in range(args.rounds):
            for scenario in SCENARIOS:
                echo_port = servers["echo"].port
                echo = run_wrk(wrk, echo_port, "echo", args.connections, args.duration, 0)
                for target in TARGETS:
                    for version in ("before", "after"):
                        server = servers[(target, version)]
                        result = run_wrk(
                            wrk, server.port, scenario, args.connections, args.duration, args.rows
                        )
                        if result["errors"]:
                            raise RuntimeError(f"{target} {version} {scenario}: errors")
                        key = (target, scenario, version)
                        ratios.setdefault(key, []).append(result["rps"] / echo["rps"])
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr, flush=True)
        print(
            f"{args.rounds} rounds of {args.duration} s, c{args.connections}, {args.rows:,} rows, "
            f"4 workers; before = {args.base}\n"
        )
        print("| target | scenario | ratio before | ratio after | change |")
        print("|---|---|---|---|---|")
        for target in TARGETS:
            for scenario in SCENARIOS:
                before = statistics.median(ratios[(target, scenario, "before")])
                after = statistics.median(ratios[(target, scenario, "after")])
                print(
                    f"| {target} | {scenario} | {before:.2f} | {after:.2f} "
                    f"| {after / before - 1:+.0%} |"
                )
    finally:
        for server in servers.values():
            server.stop()
        if cluster is not None:
            cluster.remove()
        remove_worktree(base_code)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Upserts per second before and after a change, in one run: the service at another commit (by
default the one before issue 11's metadata and filters) against this checkout.

    .venv/bin/python bench/upsert_before_after.py [--base a8ba6a7] [--rows 100000] [--rounds 6]

Each version gets its own database of ``--rows`` customers on each backend (a SQLite file with
the default FULL synchronous, and a database of a throwaway PostgreSQL cluster), filled through
its own import. Then rounds alternate the versions: each round is a fresh process that sends
``--upserts`` POSTs through the WSGI app in-process (half new customers, half updates of
existing ones, the seed's fields; the current version once more with three metadata keys).
Prints the median upserts per second of each, and the ratio to the base.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support.postgres_cluster import PostgresCluster  # noqa: E402

sys.path.insert(0, HERE)
from versions import add_worktree, remove_worktree, shim  # noqa: E402

sys.path.insert(0, ROOT)
from customers_service.schemas import SEED_EXAMPLE  # noqa: E402

KEY = "bench-key"
# The seed's fields, less its customer_id; a legal name the search's index has to take.
SEED = {k: v for k, v in SEED_EXAMPLE.items() if k != "customer_id"} | {
    "legal_name": "Coleman-Blair Holdings"
}

# Run in a child process whose PYTHONPATH holds one version as customers_service.
CHILD = """
import contextlib, json, os, sys, time
from customers_service import database
from customers_service.app import create_app
config, task, count, round_, metadata = json.loads(sys.argv[1])
app = create_app({**config, "CUSTOMERS_API_KEYS": "bench-key"})
seed = json.loads(sys.argv[2])
if task == "fill":
    from customers_service import storage
    try:
        from customers_service.backends.shared import upsert_params
    except ImportError:  # a version from before backends/
        upsert_params = storage.upsert_params
    database.prepare_database(app)
    store = database.open_store(app)
    now = storage.utc_now()
    for start in range(0, count, 5000):
        rows = [upsert_params({**seed, "customer_id": f"c{i}", "name": f"N {i}"}, now)
                for i in range(start, min(start + 5000, count))]
        store.import_batch(rows)
    store.close()
    sys.exit(0)
client = app.test_client()
headers = {"Authorization": "Bearer bench-key"}
bodies = []
for i in range(count):
    # Half new customers, half updates of the prefilled ones.
    customer_id = f"new-{round_}-{i}" if i % 2 else f"c{(i * 7919) % 50000}"
    customer = {**seed, "customer_id": customer_id, "name": f"Name {i}"}
    if metadata:
        customer["metadata"] = {"crm_id": str(i), "plan": "pro", "seats": str(i % 50)}
    bodies.append({"customer": customer})
with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
    for body in bodies[:50]:
        client.post("/api/v1/customers", json=body, headers=headers)
    started = time.perf_counter()
    for body in bodies[50:]:
        assert client.post("/api/v1/customers", json=body, headers=headers).status_code == 200
    elapsed = time.perf_counter() - started
database.close_connections()
print((count - 50) / elapsed)
"""


def run_child(path: str, config: dict, task: str, count: int, round_: int, metadata: bool) -> str:
    """The child's output: upserts per second, or nothing for a fill."""
    env = {**os.environ, "PYTHONPATH": path}
    arguments = json.dumps([config, task, count, round_, metadata])
    result = subprocess.run(
        [sys.executable, "-c", CHILD, arguments, json.dumps(SEED)],
        env=env,
        cwd=path,  # not the checkout: only the shim's customers_service is importable
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{task} failed under {path}:\n{result.stderr[-3000:]}")
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="a8ba6a7", help="the commit to compare with")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--upserts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-before-after-")
    base_root = add_worktree(args.base, os.path.join(tmp, "base"))
    cluster = None
    try:
        versions = {
            "base": shim(base_root, os.path.join(tmp, "base-path")),
            "now": shim(ROOT, os.path.join(tmp, "now-path")),
        }
        configs = {}
        if "sqlite" in args.backends:
            for version in versions:
                path = os.path.join(tmp, f"{version}.sqlite3")
                configs[("sqlite", version)] = {"CUSTOMERS_DATABASE": path}
        if "postgres" in args.backends:
            cluster = PostgresCluster(shared_buffers="512MB").init()
            cluster.start()
            for version in versions:
                cluster.admin(f"CREATE DATABASE {version}")
                configs[("postgres", version)] = {"CUSTOMERS_DATABASE_URL": cluster.url(version)}
        for (backend, version), config in configs.items():
            t0 = time.monotonic()
            run_child(versions[version], config, "fill", args.rows, 0, False)
            print(f"{backend} {version}: {args.rows:,} rows in {time.monotonic() - t0:.0f} s")
        if cluster is not None:
            cluster.admin("CHECKPOINT")
        rates: dict[tuple, list[float]] = {}
        for round_ in range(args.rounds):
            for backend, version, metadata in (
                (b, v, m)
                for b in args.backends
                for v, m in (("base", False), ("now", False), ("now", True))
            ):
                config = configs[(backend, version)]
                out = run_child(
                    versions[version], config, "time", args.upserts, round_ * 2 + metadata, metadata
                )
                rates.setdefault((backend, version, metadata), []).append(float(out))
        print()
        print("| backend | base upserts/s | now (ratio) | now with 3 metadata keys (ratio) |")
        print("|---|---|---|---|")
        for backend in args.backends:
            base = statistics.median(rates[(backend, "base", False)])
            now = statistics.median(rates[(backend, "now", False)])
            meta = statistics.median(rates[(backend, "now", True)])
            print(
                f"| {backend} | {base:,.0f} | {now:,.0f} ({now / base:.2f}) "
                f"| {meta:,.0f} ({meta / base:.2f}) |"
            )
        print(json.dumps({" ".join(map(str, k)): v for k, v in rates.items()}), file=sys.stderr)
    finally:
        if cluster is not None:
            cluster.remove()
        remove_worktree(base_root)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

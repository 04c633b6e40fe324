"""An import beside live traffic, on SQLite and on PostgreSQL: how long the service's upserts
wait while a large import runs, and how much of its speed the import keeps.

    .venv/bin/python bench/import_live.py [--rows 150000] [--clients 4] [--backends sqlite postgres]

For each backend: the import alone into an empty database (rows per second), and the same
import with its pause turned off (a batch never waits for live writers); then the import into
another empty database served by gunicorn (gunicorn.conf.py, 4 workers) while ``--clients``
threads upsert their own customers through it without pause; prints the import's rows per
second and the live upserts' p50, p99 and worst latency during the import. Traffic goes to
127.0.0.1 only.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
FLASK = (sys.executable, "-m", "customers_service", "customers")
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support.postgres_cluster import PostgresCluster  # noqa: E402
from support.servers import free_port  # noqa: E402

KEY = "bench-key"
SEED = {"name": "Gavin Belson", "country": "US", "city": "Woodland Hills", "zipcode": "91364"}


def write_file(path: str, rows: int) -> None:
    """``rows`` seed-like customers as JSON Lines."""
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"customer": {"customer_id": f"imp-{i:07d}", **SEED}}) + "\n")


# The import with its pause off: what "full speed" means when nobody else writes.
NO_PAUSE = """
import sys
from customers_service import __main__, storage
for name in storage.BACKENDS:
    storage.load_backend(name).IMPORT_PAUSE = 0.0
__main__.cli.main(["customers", "import", sys.argv[1]], prog_name="import")
"""


def run_import(env: dict, path: str, pause: bool = True) -> float:
    """Seconds ``customers import`` takes into the database that ``env`` names."""
    started = time.monotonic()
    command = [*FLASK, "import", path] if pause else [sys.executable, "-c", NO_PAUSE, path]
    subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.monotonic() - started


class LiveClients:
    """Threads upserting their own customers without pause; every latency with its time."""

    def __init__(self, url: str, clients: int):
        self.url, self.stop = url, threading.Event()
        self.samples: list[tuple[float, float, int]] = []
        self.threads = [threading.Thread(target=self.run, args=(n,)) for n in range(clients)]

    def run(self, number: int) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        with requests.Session() as session:
            sequence = 0
            while not self.stop.is_set():
                sequence += 1
                body = {"customer": {"customer_id": f"live-{number}-{sequence}", **SEED}}
                started = time.monotonic()
                response = session.post(self.url, json=body, headers=headers, timeout=30)
                self.samples.append((started, time.monotonic() - started, response.status_code))

    def __enter__(self) -> "LiveClients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def serve(env: dict, log: str) -> subprocess.Popen:
    """gunicorn with gunicorn.conf.py and 4 workers on a loopback port, once it answers."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-w", "4"]
        + ["-b", f"127.0.0.1:{port}", "wsgi:app"],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=open(log, "ab"),  # the child keeps it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(proc.url + "/health", timeout=1)
            return proc
        except requests.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("gunicorn did not answer")


def stop(proc: subprocess.Popen) -> None:
    """Stop the gunicorn we started, by its process group."""
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def measure(label: str, env_for, path: str, rows: int, clients: int, tmp: str) -> None:
    """The import alone, without its pause, then beside live clients; one line of figures."""
    alone = run_import(env_for("alone"), path)
    unpaused = run_import(env_for("unpaused"), path, pause=False)
    env = env_for("live")
    subprocess.run(
        [*FLASK, "init-db"],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        capture_output=True,
    )
    server = serve(env, os.path.join(tmp, f"gunicorn-{label}.log"))
    try:
        with LiveClients(server.url + "/api/v1/customers", clients) as live:
            time.sleep(2)
            started = time.monotonic()
            beside = run_import(env, path)
            ended = time.monotonic()
            time.sleep(1)
    finally:
        stop(server)
    during = [s for s in live.samples if started <= s[0] <= ended]
    before = [s for s in live.samples if s[0] < started]
    latencies = sorted(s[1] * 1000 for s in during)
    errors = sum(1 for s in live.samples if s[2] != 200)
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
    quiet = statistics.median(s[1] * 1000 for s in before) if before else float("nan")
    print(
        f"{label:8} import alone {rows / alone:8,.0f} rows/s, without its pause "
        f"{rows / unpaused:8,.0f} rows/s ({unpaused / alone:.0%}) | beside {clients} clients "
        f"{rows / beside:8,.0f} rows/s ({alone / beside:.0%} of alone) | live upserts during "
        f"the import: {len(latencies)} p50 {statistics.median(latencies):.1f} ms p99 {p99:.1f} ms "
        f"max {latencies[-1]:.1f} ms (p50 before it {quiet:.1f} ms), non-200: {errors}",
        flush=True,
    )


def main() -> None:
    """Measure each backend asked for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=150_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    args = parser.parse_args()
    base = {"CUSTOMERS_API_KEYS": KEY, "CUSTOMERS_SQLITE_SYNCHRONOUS": "FULL"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "customers.jsonl")
        write_file(path, args.rows)
        if "sqlite" in args.backends:

            def sqlite_env(name: str) -> dict:
                return {**base, "CUSTOMERS_DATABASE": os.path.join(tmp, f"{name}.sqlite3")}

            measure("sqlite", sqlite_env, path, args.rows, args.clients, tmp)
        if "postgres" in args.backends:
            cluster = PostgresCluster()
            try:
                cluster.init()
                cluster.start()

                def postgres_env(name: str) -> dict:
                    cluster.admin(f"CREATE DATABASE {name}")
                    return {**base, "CUSTOMERS_DATABASE_URL": cluster.url(name)}

                measure("postgres", postgres_env, path, args.rows, args.clients, tmp)
            finally:
                cluster.remove()


if __name__ == "__main__":
    main()

"""A soak run: minutes of mixed traffic on 127.0.0.1, counting errors and watching memory.

    .venv/bin/python bench/soak.py [--minutes 5] [--clients 8] [--backend sqlite|postgres]

Starts the service under gunicorn.conf.py on a fresh database (a SQLite file, or a database in a
throwaway PostgreSQL cluster, tests/support/postgres_cluster.py's, started and removed here),
drives it with a mix of creates, updates, reads, list pages and deletes from ``--clients``
threads, and every 30 seconds prints the requests so far, the errors (anything but the expected
status, or no answer), the machine's load average and the resident memory of each worker; then
the workers' memory once the clients have stopped, and how far it moved from the second sample
to the last. Memory that does not grow from one sample to the next is what we want.
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

import requests

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))

from run import worker_pids, worker_rss_mb  # noqa: E402
from support.postgres_cluster import PostgresCluster  # noqa: E402
from support.servers import free_port  # noqa: E402

KEY = "soak-key"


class Mix:
    """One client thread: a weighted mix of the API's calls, each with its expected status."""

    def __init__(self, url: str, stop: threading.Event, counts: dict, lock: threading.Lock):
        """A client of ``url`` that counts into ``counts`` under ``lock`` until ``stop`` is set."""
        self.url, self.stop, self.counts, self.lock = url, stop, counts, lock
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {KEY}"
        self.mine: list[str] = []

    def call(self, method: str, path: str, expected: int, **kwargs) -> None:
        """Send one request and count it, as an error unless it got ``expected``."""
        try:
            response = self.session.request(method, self.url + path, timeout=10, **kwargs)
            ok = response.status_code == expected
        except requests.RequestException:
            ok = False
        with self.lock:
            self.counts["requests"] += 1
            self.counts["errors"] += not ok

    def run(self) -> None:
        """Send calls of the mix until told to stop."""
        while not self.stop.is_set():
            roll = random.random()
            if roll < 0.3 or not self.mine:
                customer_id = f"soak-{threading.get_ident()}-{random.randrange(10**12)}"
                body = {"customer": {"customer_id": customer_id, "name": "Soak", "country": "FR"}}
                self.call("POST", "/api/v1/customers", 200, json=body)
                self.mine.append(customer_id)
            elif roll < 0.5:
                body = {"customer": {"customer_id": random.choice(self.mine), "name": "Updated"}}
                self.call("POST", "/api/v1/customers", 200, json=body)
            elif roll < 0.75:
                self.call("GET", f"/api/v1/customers/{random.choice(self.mine)}", 200)
            elif roll < 0.9:
                self.call("GET", f"/api/v1/customers?page={random.randint(1, 5)}", 200)
            elif roll < 0.95:
                self.call("DELETE", f"/api/v1/customers/{self.mine.pop()}", 200)
            else:
                self.call("POST", "/api/v1/customers", 422, json={"customer": {"customer_id": ""}})


@contextmanager
def database(backend: str, tmp: str):
    """The settings that point the service at a fresh database of ``backend``."""
    if backend == "sqlite":
        yield {"CUSTOMERS_DATABASE": os.path.join(tmp, "soak.sqlite3")}
        return
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        cluster.admin("CREATE DATABASE soak")
        yield {"CUSTOMERS_DATABASE_URL": cluster.url("soak")}
    finally:
        cluster.remove()


def wait_for_workers(url: str, master: int) -> None:
    """Wait until the service answers and every worker gunicorn.conf.py asks for has started."""
    workers = int(os.environ.get("CUSTOMERS_WORKERS", 2 * (os.cpu_count() or 1)))
    for _ in range(300):
        try:
            requests.get(url + "/health", timeout=1)
            if len(worker_pids(master)) >= workers:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)


def print_sample(label: str, master: int, counts: dict, elapsed: float) -> list[float]:
    """Print one line of figures; return the workers' RSS in it."""
    rss = worker_rss_mb(master)
    rate = counts["requests"] / elapsed if elapsed else 0.0
    print(
        f"{label:>7} {counts['requests']:9,} {counts['errors']:7,} {rate:6.0f} "
        f"{os.getloadavg()[0]:5.2f}   " + " ".join(f"{mb:.1f}" for mb in rss),
        flush=True,
    )
    return rss


def soak(url: str, master: int, minutes: float, clients: int) -> None:
    """Drive the service for ``minutes`` and print a sample every 30 seconds."""
    stop, lock = threading.Event(), threading.Lock()
    counts = {"requests": 0, "errors": 0}
    threads = [threading.Thread(target=Mix(url, stop, counts, lock).run) for _ in range(clients)]
    pids = worker_pids(master)
    print(f"workers {' '.join(map(str, pids))}")
    print("elapsed  requests  errors  req/s  load   worker RSS (MB)")
    print_sample("start", master, counts, 0.0)
    for thread in threads:
        thread.start()
    started = time.monotonic()
    end = started + minutes * 60
    samples = []
    while time.monotonic() < end:
        time.sleep(min(30, max(0.0, end - time.monotonic())))
        elapsed = time.monotonic() - started
        samples.append(print_sample(f"{elapsed:.0f}s", master, counts, elapsed))
    stop.set()
    for thread in threads:
        thread.join()
    print_sample("end", master, counts, time.monotonic() - started)
    if worker_pids(master) != pids:
        print(f"workers replaced during the run: now {' '.join(map(str, worker_pids(master)))}")
    if len(samples) >= 2:
        moved = " ".join(f"{b - a:+.1f}" for a, b in zip(samples[1], samples[-1], strict=False))
        print(f"RSS moved from the 2nd sample to the last (MB, per worker): {moved}")
    print(f"requests {counts['requests']:,}, errors {counts['errors']:,}", flush=True)


def main() -> None:
    """Start the service, soak it, print the figures, stop it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, database(args.backend, tmp) as settings:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}"]
            + ["wsgi:app"],
            cwd=ROOT,
            env={**os.environ, **settings, "CUSTOMERS_API_KEYS": KEY},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_workers(url, server.pid)
            print(f"backend {args.backend}, {args.clients} clients, {args.minutes:g} minutes")
            soak(url, server.pid, args.minutes, args.clients)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()

"""A soak run: minutes of mixed traffic on 127.0.0.1, counting errors and watching memory.

    .venv/bin/python bench/soak.py [--minutes 5] [--clients 8]

Starts the service under gunicorn.conf.py on a fresh database, drives it with a mix of creates,
updates, reads, list pages and deletes from ``--clients`` threads, and every 30 seconds prints the
requests so far, the errors (anything but the expected status, or no answer) and the resident
memory of each worker. Memory that does not grow from one sample to the next is what we want.
"""

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import requests

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KEY = "soak-key"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_rss_mb(master: int) -> list[float]:
    """Resident memory of each worker of a gunicorn master, in MB."""
    with open(f"/proc/{master}/task/{master}/children") as f:
        pids = [int(p) for p in f.read().split()]
    sizes = []
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
    return sizes


class Mix:
    """One client thread: a weighted mix of the API's calls, each with its expected status."""

    def __init__(self, url: str, stop: threading.Event, counts: dict):
        self.url, self.stop, self.counts = url, stop, counts
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {KEY}"
        self.mine: list[str] = []

    def call(self, method: str, path: str, expected: int, **kwargs) -> None:
        try:
            response = self.session.request(method, self.url + path, timeout=10, **kwargs)
            ok = response.status_code == expected
        except requests.RequestException:
            ok = False
        self.counts["requests"] += 1
        if not ok:
            self.counts["errors"] += 1

    def run(self) -> None:
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


def main() -> None:
    """Start the service, soak it, print the figures, stop it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CUSTOMERS_DATABASE": f"{tmp}/soak.sqlite3", "CUSTOMERS_API_KEYS": KEY}
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}"]
            + ["wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(100):
                try:
                    requests.get(url + "/health", timeout=1)
                    break
                except requests.ConnectionError:
                    time.sleep(0.1)
            stop = threading.Event()
            counts = {"requests": 0, "errors": 0}
            threads = [
                threading.Thread(target=Mix(url, stop, counts).run) for _ in range(args.clients)
            ]
            for thread in threads:
                thread.start()
            started = time.monotonic()
            end = started + args.minutes * 60
            print("elapsed  requests  errors  req/s   worker RSS (MB)")
            while time.monotonic() < end:
                time.sleep(min(30, max(0.0, end - time.monotonic())))
                elapsed = time.monotonic() - started
                rss = " ".join(f"{mb:.1f}" for mb in worker_rss_mb(server.pid))
                print(
                    f"{elapsed:6.0f}s {counts['requests']:9,} {counts['errors']:7,} "
                    f"{counts['requests'] / elapsed:6.0f}   {rss}",
                    flush=True,
                )
            stop.set()
            for thread in threads:
                thread.join()
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()

"""What a request costs in CPU time in the service's process, and what each duty a setting
turns off takes of it: the echo, GET one and list page 1, the WSGI apps called in-process.

    .venv/bin/python bench/request_cpu.py [--backends sqlite postgres] [--rounds 5]
                                          [--requests 3000]

cost.py counts instructions, exactly; this times them (process_time), so it also holds what the
kernel spends on a request's system calls and what they cost the code after them, which
instructions do not show: the key file's check was 2% of a GET's instructions and 4% of its
time. Each variant is the same app with one setting changed: metrics off, the key check off,
or the key in the key file rather than in CUSTOMERS_API_KEYS (the key file is then read at each
request). Rounds take turns, and each figure is the median of its rounds. On PostgreSQL the
server's own CPU is not in the figures. Times are noisy: compare variants of one run, not runs.
"""

import argparse
import atexit
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
# Metrics in prometheus_client's multiprocess mode, as under gunicorn.conf.py: chosen when
# prometheus_client is imported, so before the service is.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-metrics-")
    atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], True)

from echo_app import app as echo  # noqa: E402
from in_process import (  # noqa: E402
    KEY,
    SEED,
    customer,
    database_config,
    environ,
    remove_throwaways,
)

from customers_service import database, storage  # noqa: E402
from customers_service.app import create_app  # noqa: E402
from customers_service.backends.shared import upsert_params  # noqa: E402

VARIANTS = {
    "as served": {},
    "metrics off": {"CUSTOMERS_METRICS": False},
    "key check off": {"CUSTOMERS_REQUIRE_API_KEY": False},
    "key in the file": {"CUSTOMERS_API_KEYS": ""},
}


def start_response(status, headers, exc_info=None):
    """WSGI's start_response, refusing anything but a 200."""
    if not status.startswith("200"):
        raise RuntimeError(status)


def cpu_us_per_request(app, environs: list[dict]) -> float:
    """CPU microseconds of this process per request, over ``environs``."""
    started = time.process_time()
    for env in environs:
        b"".join(app(env, start_response))
    return (time.process_time() - started) / len(environs) * 1e6


def requests_of(route: str, n: int) -> list[dict]:
    """``n`` environs of a route: the echo's POST, GET one (of 1,000 customers), list page 1."""
    if route == "echo":
        return [environ("POST", "/api/v1/customers", customer(f"e-{i}")) for i in range(n)]
    if route == "get":
        return [environ("GET", f"/api/v1/customers/old-{i % 1000}") for i in range(n)]
    return [environ("GET", "/api/v1/customers", query="page=1&per_page=20") for _ in range(n)]


def service_on(config: dict):
    """The service on a migrated database holding 1,000 customers."""
    app = create_app({"CUSTOMERS_API_KEYS": KEY, **config})
    database.prepare_database(app)
    store = database.open_store(app)
    now = storage.utc_now()
    store.import_batch(
        [upsert_params({**SEED, "customer_id": f"old-{i}"}, now) for i in range(1000)]
    )
    store.close()
    return app


def measure(app, rounds: int, requests: int) -> dict:
    """Median CPU per request of the echo and of each route under each variant."""
    times: dict[tuple[str, str], list[float]] = {}
    cases = [("echo", "-")] + [(r, v) for r in ("get", "list") for v in VARIANTS]
    served = dict(app.config)
    for _ in range(rounds):
        for route, variant in cases:
            app.config.clear()
            app.config.update(served, **VARIANTS.get(variant, {}))
            target = echo if route == "echo" else app
            cpu_us_per_request(target, requests_of(route, requests // 5))  # warm up
            environs = requests_of(route, requests)
            times.setdefault((route, variant), []).append(cpu_us_per_request(target, environs))
    app.config.clear()
    app.config.update(served)
    return {case: statistics.median(values) for case, values in times.items()}


def report(backend: str, medians: dict) -> None:
    """One table: each route and variant, its CPU per request, and against the echo's."""
    echo_us = medians[("echo", "-")]
    print(f"\n{backend}\n\n| request | CPU per request | x echo |\n|---|---|---|")
    for (route, variant), us in medians.items():
        print(f"| {route} ({variant}) | {us:.1f} us | {us / echo_us:.2f} |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000, help="per route, variant, round")
    args = parser.parse_args()
    if args.requests < 5:
        parser.error("--requests: at least 5 (a fifth of them warm up)")
    tmp = tempfile.mkdtemp(prefix="bench-request-cpu-")
    with open(os.path.join(tmp, "api-keys"), "w") as f:
        f.write(KEY + "\n")  # the variant "key in the file" lets the key in from here
    cluster = None
    try:
        for backend in args.backends:
            config, started = database_config(backend, tmp, "cpu")
            cluster = started or cluster
            app = service_on({**config, "CUSTOMERS_API_KEY_FILE": os.path.join(tmp, "api-keys")})
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                medians = measure(app, args.rounds, args.requests)  # access lines to devnull
            report(backend, medians)
    finally:
        remove_throwaways(tmp, cluster)


if __name__ == "__main__":
    main()

"""Events and webhooks, in one run: how fast the feed reads, how fast the deliverer delivers,
and on PostgreSQL what the commit-order gate costs writers.

    .venv/bin/python bench/events.py [--events 100000] [--deliveries 20000] [--rounds 3]

- feed: ``--events`` changes recorded, then read through gunicorn (2 workers) by one consumer
  paging with ``after`` and ``limit=1000``: events per second.
- deliverer: an endpoint on a local receiver (another process, checking every signature), then
  ``--deliveries`` changes, then ``flask customers deliver-webhooks`` with its default settings:
  deliveries per second from its start until the backlog is empty.
- gate (PostgreSQL): 4 processes upserting new customers at once, each through its own
  connection, with the events trigger as shipped (the gate held shared from the sequence number
  to the commit), alone and with a feed reader taking the gate exclusively every 10 ms; with the
  same trigger less the gate; and with no events trigger at all; and how long the feed's
  exclusive moment (events_horizon) takes while they write.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
FLASK = (sys.executable, "-m", "customers_service", "customers")
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from support.postgres_cluster import PostgresCluster  # noqa: E402
from support.servers import free_port  # noqa: E402

from customers_service import database, storage  # noqa: E402
from customers_service.app import create_app  # noqa: E402
from customers_service.backends import shared  # noqa: E402
from customers_service.schemas import SEED_EXAMPLE  # noqa: E402

KEY = "bench-key"
SEED = {k: v for k, v in SEED_EXAMPLE.items() if k != "customer_id"}

RECEIVER = """
import signal, sys, threading
sys.path.insert(0, sys.argv[1])
from support.receiver import Receiver
receiver = Receiver(sys.argv[2], int(sys.argv[3]), record_bodies=False).start()
print("ready", flush=True)
stopped = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stopped.set())
stopped.wait()
arrivals = receiver.arrivals
print(len(arrivals), sum(a.signed for a in arrivals), len({a.key for a in arrivals}), flush=True)
"""

# One writer process: ready (imported, connected), it waits for the common start time, then
# creates its customers and prints when it finished.
WRITER = """
import json, sys, time
from customers_service import database
from customers_service.app import create_app
config, prefix, count, start_at = json.loads(sys.argv[1])
app = create_app({**config, "CUSTOMERS_API_KEYS": "bench-key"})
store = database.open_store(app)
time.sleep(max(0, start_at - time.time()))
for i in range(count):
    store.upsert_customer({"customer_id": f"{prefix}-{i}", "name": f"N {i}"})
print(time.time())
"""

# The events trigger as shipped, less the gate (for the gate's cost only: never shipped).
NO_GATE = ("PERFORM pg_advisory_xact_lock_shared", "-- PERFORM pg_advisory_xact_lock_shared")


def app_for(config: dict):
    return create_app({**config, "CUSTOMERS_API_KEYS": KEY})


def record_changes(config: dict, count: int, prefix: str) -> None:
    """``count`` new customers through the import path: one event each."""
    app = app_for(config)
    database.prepare_database(app)
    store = database.open_store(app)
    now = storage.utc_now()
    for start in range(0, count, 5000):
        rows = [
            shared.upsert_params({**SEED, "customer_id": f"{prefix}{i}", "name": f"N {i}"}, now)
            for i in range(start, min(start + 5000, count))
        ]
        store.import_batch(rows)
    store.close()


def flask_command(config: dict, *args: str, **kwargs):
    env = {**os.environ, **{k: str(v) for k, v in config.items()}, "CUSTOMERS_API_KEYS": KEY}
    return subprocess.Popen(
        [*FLASK, *args],
        cwd=ROOT,
        env=env,
        **kwargs,
    )


def feed_rate(config: dict, tmp: str) -> float:
    """Events per second one consumer reads through gunicorn, paging 1,000 at a time."""
    port = free_port()
    env = {**os.environ, **config, "CUSTOMERS_API_KEYS": KEY}
    log = open(os.path.join(tmp, f"gunicorn-{port}.log"), "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-w", "2"]
        + ["-b", f"127.0.0.1:{port}", "wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api/v1/events"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.1)
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {KEY}"
            session.get(url, params={"limit": 1000})  # warm up both sides
            read, after = 0, 0
            started = time.perf_counter()
            while True:
                page = session.get(url, params={"after": after, "limit": 1000}).json()
                read += len(page["events"])
                after = page["meta"]["last_sequence"]
                if not page["meta"]["has_more"]:
                    break
            elapsed = time.perf_counter() - started
        return read / elapsed
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def delivery_rate(config: dict, count: int) -> tuple[float, str]:
    """Deliveries per second of one deliverer with its defaults, and the receiver's count."""
    port = free_port()
    added = flask_command(
        config, "add-webhook", f"http://127.0.0.1:{port}/hook", stdout=subprocess.PIPE, text=True
    )
    secret = json.loads(added.communicate()[0])["secret"]
    record_changes(config, count, "delivered-")
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, os.path.join(ROOT, "tests"), secret, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout.readline().strip() == "ready"
    app = app_for(config)
    store = database.open_store(app)
    deliverer = flask_command(config, "deliver-webhooks", stderr=subprocess.DEVNULL)
    started = time.perf_counter()
    try:
        while store.webhook_status()[0]["backlog"]:
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
    finally:
        deliverer.send_signal(signal.SIGTERM)
        deliverer.wait(timeout=60)
        store.close()
        receiver.send_signal(signal.SIGTERM)
        counts = receiver.communicate(timeout=30)[0].strip()
    arrivals, signed, keys = map(int, counts.split())
    return count / elapsed, f"{arrivals:,} requests, {signed:,} signed, {keys:,} distinct keys"


def writers_rate(config: dict, label: str, writers: int, count: int) -> float:
    """Upserts per second of ``writers`` processes together, each creating ``count``, from a
    common start (after their imports and connections) to the last one's end."""
    start_at = time.time() + 2
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, json.dumps([config, f"{label}-{n}", count, start_at])],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(writers)
    ]
    finished = [float(process.communicate(timeout=600)[0]) for process in processes]
    return writers * count / (max(finished) - start_at)


def horizon_times(url: str, stop) -> list[float]:
    """Milliseconds of each events_horizon() call, one every 10 ms until ``stop`` is set."""
    import psycopg

    times = []
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            started = time.perf_counter()
            conn.execute("SELECT events_horizon()").fetchone()
            times.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)
    return times


# (label, database, whether a feed reader takes the gate every 10 ms meanwhile)
GATE_VARIANTS = (
    ("gate", "gate", False),
    ("gate, the feed asked every 10 ms", "gate", True),
    ("no gate", "no_gate", False),
    ("no events", "no_events", False),
)


def gate_cost(cluster, rounds: int, writers: int = 4, count: int = 1500) -> None:
    """Upserts per second with the gate (alone, and with a feed reader taking it 100 times a
    second), without it, and without events; how long the feed's moment takes."""
    import threading

    import psycopg

    configs = {}
    for name in ("gate", "no_gate", "no_events"):
        cluster.admin(f"CREATE DATABASE {name}")
        configs[name] = {"CUSTOMERS_DATABASE_URL": cluster.url(name)}
        database.prepare_database(app_for(configs[name]))
        with psycopg.connect(cluster.url(name), autocommit=True) as conn:
            source = conn.execute(
                "SELECT pg_get_functiondef('customers_event'::regproc)"
            ).fetchone()[0]
            if name == "no_gate":
                conn.execute(source.replace(*NO_GATE))
            if name == "no_events":
                conn.execute("DROP TRIGGER customers_events ON customers")
    database.close_connections()
    rates = {label: [] for label, _, _ in GATE_VARIANTS}
    horizons = []
    for round_ in range(rounds):
        for number, (label, name, with_reader) in enumerate(GATE_VARIANTS):
            config = configs[name]
            stop, sampled = threading.Event(), []
            sampler = threading.Thread(
                target=lambda url, stop, sampled: sampled.extend(horizon_times(url, stop)),
                args=(config["CUSTOMERS_DATABASE_URL"], stop, sampled),
            )
            if with_reader:
                sampler.start()
            rates[label].append(writers_rate(config, f"v{number}r{round_}", writers, count))
            stop.set()
            if with_reader:
                sampler.join()
                horizons += sampled
    print(f"\n### PostgreSQL: {writers} processes upserting new customers at once\n")
    print("| events trigger | upserts/s (median of rounds) | ratio to no events |")
    print("|---|---|---|")
    none = statistics.median(rates["no events"])
    for label, values in rates.items():
        median = statistics.median(values)
        print(f"| {label} | {median:,.0f} | {median / none:.2f} |")
    horizons.sort()
    print(
        f"\nevents_horizon() during that load: {len(horizons)} calls, median "
        f"{statistics.median(horizons):.2f} ms, p99 {horizons[int(len(horizons) * 0.99)]:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--deliveries", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-events-")
    cluster = None
    try:
        configs = {}
        if "sqlite" in args.backends:
            configs["sqlite"] = lambda name: {"CUSTOMERS_DATABASE": os.path.join(tmp, name)}
        if "postgres" in args.backends:
            cluster = PostgresCluster(shared_buffers="512MB").init()
            cluster.start()

            def postgres_config(name: str) -> dict:
                cluster.admin(f"CREATE DATABASE {name.replace('.', '_')}")
                return {"CUSTOMERS_DATABASE_URL": cluster.url(name.replace(".", "_"))}

            configs["postgres"] = postgres_config
        print("| backend | feed: events read/s | deliverer: deliveries/s | receiver saw |")
        print("|---|---|---|---|")
        for backend, make_config in configs.items():
            feed_config = make_config("feed.db")
            started = time.monotonic()
            record_changes(feed_config, args.events, "c")
            filled = time.monotonic() - started
            feed = feed_rate(feed_config, tmp)
            delivery_config = make_config("webhooks.db")
            database.prepare_database(app_for(delivery_config))
            delivered, seen = delivery_rate(delivery_config, args.deliveries)
            database.close_connections()
            print(f"| {backend} | {feed:,.0f} | {delivered:,.0f} | {seen} |")
            print(
                f"({backend}: {args.events:,} events recorded in {filled:.0f} s)", file=sys.stderr
            )
        if cluster is not None:
            gate_cost(cluster, args.rounds)
    finally:
        database.close_connections()
        if cluster is not None:
            cluster.remove()


if __name__ == "__main__":
    main()

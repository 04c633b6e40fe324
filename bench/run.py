"""The benchmark: the service, its peer and a bare Flask baseline under wrk on 127.0.0.1.

    make bench                      # every scenario, 10 s each, the service and the peer
    .venv/bin/python bench/run.py --duration 5 --rows 1000 --sync FULL --connections 16
    .venv/bin/python bench/run.py --backends postgres --scenarios mix get list
    .venv/bin/python bench/run.py --peers --duration 5 --rows 1000   # the quick comparison
    .venv/bin/python bench/run.py --database-cpus 1 --backends postgres   # PostgreSQL apart

Starts each server on a fresh copy of a prefilled database, drives it with wrk (bench/wrk.lua
varies the customer_id), and prints one line per scenario: requests per second, p50 and p99
latency, errors, and the ratio of its requests per second to the baseline's, measured again
just before each backend's (and each synchronous setting's) scenarios.
The service runs under gunicorn.conf.py; the peer (bench/peers/: FastAPI, Pydantic and
SQLAlchemy on its own table of as many rows) under bench/peers/gunicorn.conf.py, with as many
uvicorn workers, on the same backend and the same wrk settings. Then a table of each route's
ratio, ours and the peer's, side by side. Writes the tables to bench/results/results.txt, a
chart of the ratios to bench/results/ratios.png, and a profile of the upsert path to
bench/results/profile-upsert.txt.
With --database-cpus N, PostgreSQL runs on the last N cores and everything else (the echo, the
servers, wrk) on the others, as with a database on a host of its own; by default all share every
core.
"""

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))

from list_page import prefill  # noqa: E402
from support.postgres_cluster import PostgresCluster  # noqa: E402

from customers_service.backends.postgres import connections as pg_connections
from customers_service.backends.postgres import schema as pg_schema

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RESULTS = os.path.join(ROOT, "bench", "results")
PEERS = os.path.join(ROOT, "bench", "peers")
KEY = "bench-key"
SCENARIOS = ("insert", "update", "mix", "get", "list")
SERVERS = ("ours", "peer")


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(master: int) -> list[int]:
    """The pids of a gunicorn master's workers."""
    with open(f"/proc/{master}/task/{master}/children") as f:
        return [int(p) for p in f.read().split()]


def worker_rss_mb(master: int) -> list[float]:
    """Resident memory of each worker of a gunicorn master, in MB."""
    sizes = []
    for pid in worker_pids(master):
        with open(f"/proc/{pid}/status") as f:
            sizes += [int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")]
    return sizes


def ensure_wrk() -> str:
    """wrk from Debian's packages, installed if missing."""
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    return shutil.which("wrk")


class Server:
    """gunicorn with its configuration (ours by default) on a loopback port, stopped by its own
    pid."""

    def __init__(self, app: str, env: dict, config: str = "gunicorn.conf.py"):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", config]
            + ["-b", f"127.0.0.1:{self.port}", app],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        # The master listens before its workers have imported the app: wait until they are idle,
        # so that no scenario pays for a server's start (the peer's imports take longer).
        for _ in range(120):
            before = cpu_seconds([self.proc.pid])
            time.sleep(0.25)
            if cpu_seconds([self.proc.pid]) - before < 0.02:
                break
        time.sleep(0.5)

    def worker_rss_mb(self) -> list[float]:
        """Resident memory of each worker, in MB."""
        return worker_rss_mb(self.proc.pid)

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


def run_wrk(wrk: str, port: int, scenario: str, connections: int, seconds: int, rows: int) -> dict:
    """One wrk run; returns rps, p50 and p99 in ms, and errors."""
    result = subprocess.run(
        [wrk, "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s"]
        + ["-s", os.path.join(ROOT, "bench", "wrk.lua"), f"http://127.0.0.1:{port}"],
        env={**os.environ, "SCENARIO": scenario, "API_KEY": KEY, "ROWS": str(rows)},
        capture_output=True,
        text=True,
        check=True,
    )
    out = result.stdout

    def millis(percent: str) -> float:
        value, unit = re.search(rf"{percent}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": requests,
        "p50": millis("50"),
        "p99": millis("99"),
        "errors": errors + (int(non_2xx.group(1)) if non_2xx else 0),
    }


def template_database(tmp: str, rows: int) -> str:
    """A database of ``rows`` customers cust-00000000..., plus upd-1..upd-1000 for updates."""
    path = os.path.join(tmp, f"template-{rows}.sqlite3")
    prefill(path, rows)
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO customers (lago_id, customer_id, name, created_at, updated_at) "
            "VALUES (?, ?, 'N', '2022-01-01T00:00:00Z', '2022-01-01T00:00:00Z')",
            [(f"00000000-0000-7000-8000-{i:012d}", f"upd-{i}") for i in range(1, 1001)],
        )
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


def postgres_database(cluster: PostgresCluster, rows: int) -> str:
    """A migrated PostgreSQL database like template_database's; returns its URL."""

    name = f"bench_{rows}"
    cluster.admin(f"DROP DATABASE IF EXISTS {name}")
    cluster.admin(f"CREATE DATABASE {name}")
    url = cluster.url(name)
    conn = pg_connections.connect(url, statement_timeout=600)
    pg_schema.migrate(conn)
    conn.execute("ALTER TABLE customers DISABLE TRIGGER customers_counted")  # counted below
    conn.execute(
        "INSERT INTO customers (lago_id, customer_id, name, country, created_at, updated_at) "
        "SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, "
        "'cust-' || lpad(i::text, 8, '0'), 'Customer ' || i, 'FR', "
        "to_timestamp(1600000000 + i), to_timestamp(1600000000 + i) "
        "FROM generate_series(0, %s - 1) i",
        (rows,),
    )
    conn.execute(
        "INSERT INTO customers (lago_id, customer_id, name, created_at, updated_at) "
        "SELECT ('00000000-0000-7000-8000-' || lpad(i::text, 12, '0'))::uuid, 'upd-' || i, 'N', "
        "'2022-01-01T00:00:00Z', '2022-01-01T00:00:00Z' FROM generate_series(1, 1000) i"
    )
    conn.execute("UPDATE customer_count SET n = (SELECT count(*) FROM customers) WHERE shard = 0")
    conn.execute("ALTER TABLE customers ENABLE TRIGGER customers_counted")
    conn.execute("VACUUM ANALYZE customers")
    conn.execute("CHECKPOINT")  # the fill's dirty pages written now, not during a scenario
    conn.close()
    return url


def peer_server(env: dict) -> Server:
    """The peer under gunicorn's uvicorn workers, with the run's key."""
    return Server(
        "fastapi_customers.main:app",
        {**env, "PEER_API_KEYS": KEY},
        config=os.path.join(PEERS, "gunicorn.conf.py"),
    )


def peer_template(tmp: str, rows: int) -> str:
    """The peer's own SQLite file, filled like template_database's."""
    from fill import fill

    path = os.path.join(tmp, f"peer-template-{rows}.sqlite3")
    fill(f"sqlite:///{path}", rows)
    return path


def peer_postgres_database(cluster: PostgresCluster, rows: int) -> str:
    """The peer's own PostgreSQL database, filled like postgres_database's; its SQLAlchemy URL."""
    from fill import fill

    name = f"peer_{rows}"
    cluster.admin(f"DROP DATABASE IF EXISTS {name}")
    cluster.admin(f"CREATE DATABASE {name}")
    url = cluster.url(name).replace("postgresql://", "postgresql+psycopg://", 1)
    fill(url, rows)
    return url


def measure_echo(wrk: str, echo: Server, connections: int, seconds: int) -> dict:
    """One wrk run of the echo baseline, with its CPU per request."""
    before = cpu_seconds([echo.proc.pid])
    result = run_wrk(wrk, echo.port, "echo", connections, seconds, 0)
    spent = cpu_seconds([echo.proc.pid]) - before
    return {**result, "cpu_us": spent / max(result["requests"], 1) * 1e6}


def echo_line(target: str, connections: int, result: dict) -> str:
    """The echo's figures before a target's scenarios, as printed and saved."""
    return (
        f"baseline echo before {target} c{connections}: {result['rps']:8.0f} rps  "
        f"p50 {result['p50']:6.2f} ms  p99 {result['p99']:6.2f} ms  errors {result['errors']}  "
        f"cpu/req {result['cpu_us']:5.0f} us"
    )


def process_tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(parent, []).append(int(entry))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending += parents.get(pid, [])
    return tree


def cpu_seconds(roots: list[int]) -> float:
    """User and system CPU time of the processes under ``roots``, so far."""
    ticks = 0
    for pid in (p for root in roots for p in process_tree(root)):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def profile_upsert(tmp: str) -> None:
    """pyinstrument's profile of 3,000 upserts through the WSGI app, in-process."""
    from pyinstrument import Profiler

    from customers_service.app import create_app
    from customers_service.database import prepare_database

    app = create_app(
        {"CUSTOMERS_DATABASE": os.path.join(tmp, "profile.sqlite3"), "CUSTOMERS_API_KEYS": KEY}
    )
    prepare_database(app)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"customer": {"customer_id": "p", "name": "Gavin Belson", "country": "US"}}
    profiler = Profiler(interval=0.0002)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):  # access lines
        warm_up = client.post("/api/v1/customers", json=body, headers=headers)
        assert warm_up.status_code == 200, warm_up.get_data(as_text=True)
        profiler.start()
        for i in range(3000):
            body["customer"]["customer_id"] = f"p-{i % 1000}"
            client.post("/api/v1/customers", json=body, headers=headers)
        profiler.stop()
    with open(os.path.join(RESULTS, "profile-upsert.txt"), "w") as f:
        f.write(profiler.output_text(unicode=False, color=False, show_all=False))


def chart(lines: list[dict]) -> None:
    """A bar chart of every scenario's ratio to the baseline, the peer's hatched, with the
    targets drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r['scenario']} c{r['connections']} {r['rows']:,} {r['sync']} {r['server']}"
        for r in lines
    ]
    ratios = [r["ratio"] for r in lines]
    fig, ax = plt.subplots(figsize=(10, max(4, len(lines) * 0.28)))
    colors = {"FULL": "#4c78a8", "NORMAL": "#f58518", "PG": "#54a24b"}
    bars = ax.barh(labels, ratios, color=[colors[r["sync"]] for r in lines])
    for bar, r in zip(bars, lines, strict=True):
        if r["server"] == "peer":
            bar.set_hatch("//")
    targets = ((0.5, "list"), (0.6, "upserts FULL"), (0.7, "upserts NORMAL"), (0.8, "GET one"))
    for target, label in targets:
        ax.axvline(target, linestyle="--", linewidth=0.8, color="grey")
        ax.text(target, -0.9, label, fontsize=7, ha="center")
    ax.set_xlabel(
        "requests per second as a ratio to the bare Flask baseline (same run); hatched: the peer"
    )
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "ratios.png"), dpi=110)


def comparison(lines: list[dict]) -> list[str]:
    """Each scenario's ratio to the echo, ours and the peer's, and ours over the peer's."""
    ratios = {
        (r["scenario"], r["connections"], r["rows"], r["sync"], r["server"]): r["ratio"]
        for r in lines
    }
    table = []
    for (scenario, connections, rows, label, server), ours in ratios.items():
        peer = ratios.get((scenario, connections, rows, label, "peer"))
        if server == "ours" and peer:
            table.append(
                f"{scenario:6} c{connections:<3} {rows:>9,} rows {label:6} "
                f"ours {ours:.2f} x echo  peer {peer:.2f} x echo  ours/peer {ours / peer:.2f}"
            )
    return table


@contextlib.contextmanager
def cpus_of(cpus: set[int]):
    """This process (and what it starts meanwhile) on ``cpus`` only, then as it was."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def main() -> None:
    """Run the baseline and every scenario of each server; print and save the tables, the chart
    and the profile."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per scenario")
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 1_000_000])
    parser.add_argument("--sync", nargs="+", help="FULL NORMAL (FULL with --peers)")
    parser.add_argument("--connections", type=int, nargs="+", help="16 64 (16 with --peers)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument(
        "--peers",
        action="store_true",
        help="the quick comparison of ours and the peer: FULL and 16 connections unless given, "
        "no profile",
    )
    parser.add_argument(
        "--database-cpus",
        type=int,
        default=0,
        help="PostgreSQL's own cores, the last N; the rest for everything else (0: all share)",
    )
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if not 0 <= args.database_cpus < len(cpus):
        parser.error(f"--database-cpus: from 0 to {len(cpus) - 1} here")
    database_cpus = set(cpus[len(cpus) - args.database_cpus :])  # none for 0
    # Set before any process starts: the echo, the servers and wrk inherit it.
    os.sched_setaffinity(0, set(cpus) - database_cpus)
    args.sync = args.sync or (["FULL"] if args.peers else ["FULL", "NORMAL"])
    args.connections = args.connections or ([16] if args.peers else [16, 64])
    wrk = ensure_wrk()
    os.makedirs(RESULTS, exist_ok=True)
    header = (
        f"{time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {os.cpu_count()} cores "
        f"python {platform.python_version()} sqlite {sqlite3.sqlite_version}"
    )
    if database_cpus:
        rest = sorted(set(cpus) - database_cpus)
        header += f", PostgreSQL on cores {sorted(database_cpus)}, the rest on {rest}"
    print(header)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        echoes = []
        # (label, rows, each server's env, extra processes to count the CPU of)
        targets = []
        if "sqlite" in args.backends:
            templates = {rows: template_database(tmp, rows) for rows in args.rows}
            if "peer" in args.servers:
                peer_templates = {rows: peer_template(tmp, rows) for rows in args.rows}
            for sync in args.sync:
                for rows in args.rows:
                    envs = {}
                    if "ours" in args.servers:
                        database = os.path.join(tmp, f"run-{sync}-{rows}.sqlite3")
                        shutil.copy(templates[rows], database)
                        envs["ours"] = {
                            "CUSTOMERS_DATABASE": database,
                            "CUSTOMERS_SQLITE_SYNCHRONOUS": sync,
                        }
                    if "peer" in args.servers:
                        database = os.path.join(tmp, f"peer-{sync}-{rows}.sqlite3")
                        shutil.copy(peer_templates[rows], database)
                        envs["peer"] = {
                            "PEER_DATABASE_URL": f"sqlite:///{database}",
                            "PEER_SQLITE_SYNCHRONOUS": sync,
                        }
                    targets.append((sync, rows, envs, []))
        cluster = None
        # Kept running, idle between its runs: measured again before each target's scenarios,
        # so that a drift of this shared machine's speed during the run falls on both sides of
        # a ratio (measured once, at the start, it made every later ratio drift with it).
        echo = Server("bench.echo_app:app", {})
        try:
            if "postgres" in args.backends:
                cluster = PostgresCluster(shared_buffers="1GB")  # holds the 1M-row table
                cluster.init()
                with cpus_of(database_cpus or set(cpus)):  # the postmaster and its children
                    cluster.start()
                postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
                for rows in args.rows:
                    envs = {}
                    if "ours" in args.servers:
                        envs["ours"] = {"CUSTOMERS_DATABASE_URL": postgres_database(cluster, rows)}
                    if "peer" in args.servers:
                        envs["peer"] = {"PEER_DATABASE_URL": peer_postgres_database(cluster, rows)}
                    targets.append(("PG", rows, envs, [postmaster]))
            for label, rows, envs, extra in targets:
                baseline = {c: measure_echo(wrk, echo, c, args.duration) for c in args.connections}
                for c, result in baseline.items():
                    echoes.append(echo_line(f"{label} {rows:,} rows", c, result))
                    print(echoes[-1], flush=True)
                # Both servers of a target run at once, idle while the other is measured, so
                # that each scenario measures them one right after the other.
                servers = {
                    kind: Server("wsgi:app", {**env, "CUSTOMERS_API_KEYS": KEY})
                    if kind == "ours"
                    else peer_server(env)
                    for kind, env in envs.items()
                }
                for connections in args.connections:
                    for scenario in args.scenarios:
                        for kind, server in servers.items():
                            before = cpu_seconds([server.proc.pid, *extra])
                            result = run_wrk(
                                wrk, server.port, scenario, connections, args.duration, rows
                            )
                            cpu = cpu_seconds([server.proc.pid, *extra]) - before
                            ratio = result["rps"] / baseline[connections]["rps"]
                            line = {
                                "server": kind,
                                "scenario": scenario,
                                "connections": connections,
                                "rows": rows,
                                "sync": label,
                                "ratio": ratio,
                                "cpu_us": cpu / max(result["requests"], 1) * 1e6,
                                **result,
                            }
                            lines.append(line)
                            print(
                                f"{scenario:6} c{connections:<3} {rows:>9,} rows {label:6} "
                                f"{kind:4} {result['rps']:8.0f} rps  p50 {result['p50']:6.2f} ms  "
                                f"p99 {result['p99']:6.2f} ms  errors {result['errors']:<4} "
                                f"ratio {ratio:.2f}  cpu/req {line['cpu_us']:5.0f} us",
                                flush=True,
                            )
                for kind, server in servers.items():
                    rss = " ".join(f"{mb:.0f}" for mb in server.worker_rss_mb())
                    print(f"worker RSS after {kind} {label} {rows:,}: {rss} MB", flush=True)
                    server.stop()
        finally:
            echo.stop()
            if cluster is not None:
                cluster.remove()
        if "sqlite" in args.backends and "ours" in args.servers and not args.peers:
            profile_upsert(tmp)
    side_by_side = comparison(lines)
    if side_by_side:
        print("ours and the peer, each as a ratio to the echo:")
        print("\n".join(side_by_side))
    with open(os.path.join(RESULTS, "results.txt"), "w") as f:
        f.write(header + "\n")
        f.write("".join(line + "\n" for line in echoes))
        for r in lines:
            f.write(
                f"{r['scenario']} c{r['connections']} {r['rows']} {r['sync']} {r['server']} "
                f"{r['rps']:.0f} rps p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms "
                f"errors {r['errors']} ratio {r['ratio']:.2f} cpu/req {r['cpu_us']:.0f} us\n"
            )
        if side_by_side:
            f.write("ours and the peer, each as a ratio to the echo:\n")
            f.write("".join(row + "\n" for row in side_by_side))
    chart(lines)


if __name__ == "__main__":
    main()

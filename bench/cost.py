"""What a request costs, exactly: instructions (callgrind) and system calls (strace) per request
for the echo baseline, an insert, an update (a new name), a no-op (the customer as stored: it
writes nothing), GET one and list page 1, the WSGI apps called in-process.

    .venv/bin/python bench/cost.py [--backends sqlite postgres] [--warm-up 300] [--requests 500]
    .venv/bin/python bench/cost.py --backends sqlite --config CUSTOMERS_METRICS=false

Instruction counts repeat on a busy machine, where times do not, so a change shows its cost
exactly. Each phase warms up, then its measured requests run between two calls of
``os.getppid()``: callgrind dumps its counts at each call (``--dump-before``), and strace's log
is cut at them. The apps are called as WSGI callables with environs built before the phase, so
the harness costs next to nothing. On PostgreSQL the counts are the service's process only (the
server's work is not in them). SQLite runs with synchronous NORMAL, so its WAL fsyncs (FULL's,
done beside the lock) do not vary the system calls.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from in_process import KEY, database_config  # noqa: E402
from versions import add_worktree, remove_worktree, shim  # noqa: E402

PHASES = ("echo", "insert", "update", "no-op", "get", "list")
# An insert's own pieces, each called alone: the strict JSON parse of its body, the schema's
# load, the store's upsert (parameters, SQL, the customer back), the response's JSON (around the
# stored body, in a version that stores them).
# What an insert costs beyond them is Flask's and Werkzeug's machinery and the hooks.
PIECES = ("parse", "load", "store", "respond")

# Run under callgrind or strace, with the repository's parent on the path as customers_service.
CHILD = r"""
import contextlib, json, os, sys
sys.path.insert(0, sys.argv[3])
from bench.echo_app import app as echo
from bench.in_process import SEED, customer, environ
from customers_service import database, storage
try:
    from customers_service.backends.shared import upsert_params
except ImportError:  # a version from before backends/
    upsert_params = storage.upsert_params
from customers_service.app import create_app
from customers_service.body import parse_json
from customers_service.responses import json_response
try:
    from customers_service.responses import customer_response
except ImportError:  # a version from before stored bodies
    customer_response = None
from customers_service.schemas import customer_schema
config, warm_up, measured = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
service = create_app(config)
database.prepare_database(service)
store = database.open_store(service)
now = storage.utc_now()
store.import_batch([upsert_params({**SEED, "customer_id": f"old-{i}"}, now)
                    for i in range(1000)])
store.close()

def requests_of(phase, n, offset):
    if phase == "echo":
        return echo, [environ("POST", "/api/v1/customers", customer(f"e-{offset + i}"))
                      for i in range(n)]
    if phase == "insert":
        return service, [environ("POST", "/api/v1/customers", customer(f"new-{offset + i}"))
                         for i in range(n)]
    if phase == "update":  # a new name each time: a write
        return service, [environ("POST", "/api/v1/customers",
                                 {"customer": {**customer(f"old-{(offset + i) % 1000}")["customer"],
                                               "name": f"Renamed {offset + i}"}})
                         for i in range(n)]
    if phase == "no-op":  # each customer the insert phase stored, as it stored it
        return service, [environ("POST", "/api/v1/customers", customer(f"new-{offset + i}"))
                         for i in range(n)]
    if phase == "get":
        return service, [environ("GET", f"/api/v1/customers/old-{(offset + i) % 1000}")
                         for i in range(n)]
    return service, [environ("GET", "/api/v1/customers", query="page=1&per_page=20")
                     for i in range(n)]

def pieces_of(piece, n, offset):
    ids = [f"{piece}-{offset + i}" for i in range(n)]
    if piece == "parse":
        return [(parse_json, (json.dumps(customer(i)).encode(),)) for i in ids]
    if piece == "load":
        return [(customer_schema.load, (customer(i)["customer"],)) for i in ids]
    if piece == "store":
        return [(piece_store.upsert_customer, (customer_schema.load(customer(i)["customer"]),))
                for i in ids]
    row = piece_store.get_customer("old-1")
    if customer_response is not None:
        return [(customer_response, (row,)) for i in ids]
    return [(json_response, ({"customer": dict(row)},)) for i in ids]

def call(calls):
    for function, arguments in calls:
        function(*arguments)

statuses = []
def start_response(status, headers, exc_info=None):
    statuses.append(status)

def run(app, environs):
    for env in environs:
        b"".join(app(env, start_response))

with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
    for phase in json.loads(sys.argv[5]):
        if phase.startswith("piece:"):
            with service.app_context():
                piece_store = database.open_store(service)
                call(pieces_of(phase[6:], warm_up, 0))
                calls = pieces_of(phase[6:], measured, warm_up)
                os.getppid()  # the piece starts
                call(calls)
                os.getppid()  # the piece ends
                piece_store.close()
            continue
        app, environs = requests_of(phase, warm_up, 0)
        run(app, environs)
        app, environs = requests_of(phase, measured, warm_up)
        os.getppid()  # the phase starts
        run(app, environs)
        os.getppid()  # the phase ends
bad = [s for s in statuses if not s.startswith("200")]
assert not bad, bad[:3]
database.close_connections()
"""


def child_command(config: dict, args, phases: list[str]) -> list[str]:
    """The child's command line (its caller puts callgrind or strace in front)."""
    return [
        sys.executable,
        "-c",
        CHILD,
        json.dumps(config),
        str(args.warm_up),
        ROOT,
        str(args.requests),
        json.dumps(phases),
    ]


def child_env(tmp: str, code: str = ROOT) -> dict:
    """The child's environment: ``code`` (this checkout, or another commit's) importable as
    customers_service, and metrics in prometheus_client's multiprocess mode, as under
    gunicorn.conf.py."""
    path = shim(code, os.path.join(tempfile.mkdtemp(prefix="path-", dir=tmp), "importable"))
    metrics = tempfile.mkdtemp(prefix="metrics-", dir=tmp)
    return {**os.environ, "PYTHONPATH": path, "PROMETHEUS_MULTIPROC_DIR": metrics}


def instructions(config: dict, args, tmp: str, code: str) -> dict[str, float]:
    """Instructions per request of each phase and piece, from callgrind's dump at its end."""
    out = os.path.join(tmp, "callgrind.out")
    phases = [*PHASES, *(f"piece:{piece}" for piece in PIECES)]
    subprocess.run(
        ["valgrind", "--tool=callgrind", "--dump-before=getppid", f"--callgrind-out-file={out}"]
        + child_command(config, args, phases),
        env=child_env(tmp, code),
        cwd=tmp,
        check=True,
        capture_output=True,
    )
    counts = {}
    for n, phase in enumerate(phases):
        # Dump 1 is the start up to the first phase's start; phase k's is dump 2k.
        with open(f"{out}.{2 * n + 2}") as f:
            total = int(re.search(r"^totals: (\d+)", f.read(), re.M).group(1))
        counts[phase.removeprefix("piece:")] = total / args.requests
    return counts


def system_calls(config: dict, args, tmp: str, code: str) -> dict[str, Counter]:
    """System calls per request of each phase, by name, from strace's log between the markers."""
    log = os.path.join(tmp, "strace.log")
    subprocess.run(
        ["strace", "-f", "-qq", "-o", log] + child_command(config, args, list(PHASES)),
        env=child_env(tmp, code),
        cwd=tmp,
        check=True,
        capture_output=True,
    )
    counts, phase, inside = {}, 0, False
    with open(log) as f:
        for line in f:
            match = re.match(r"(?:\d+\s+)?(\w+)\(", line)
            if not match:
                continue
            name = match.group(1)
            if name == "getppid":
                if inside:
                    phase += 1
                inside = not inside
                continue
            if inside:
                counts.setdefault(PHASES[phase], Counter())[name] += 1
    return {phase: counts.get(phase, Counter()) for phase in PHASES}


def ensure_tools() -> None:
    """valgrind and strace from Debian's packages, installed if missing."""
    missing = [tool for tool in ("valgrind", "strace") if not shutil.which(tool)]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--warm-up", type=int, default=300)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument(
        "--config", nargs="*", default=[], help="extra settings, NAME=VALUE (e.g. metrics off)"
    )
    parser.add_argument("--commit", help="measure that commit's code (a git worktree), not this")
    args = parser.parse_args()
    ensure_tools()
    extra = dict(item.split("=", 1) for item in args.config)
    tmp = tempfile.mkdtemp(prefix="bench-cost-")
    cluster, code = None, ROOT
    if args.commit:
        code = add_worktree(args.commit, os.path.join(tmp, "code"))
    try:
        for backend in args.backends:
            where, started = database_config(backend, tmp, "cost")
            cluster = started or cluster
            config = {
                "CUSTOMERS_API_KEYS": KEY,
                "CUSTOMERS_API_KEY_FILE": os.path.join(tmp, "api-keys"),
                **extra,
                **where,
            }
            counted = instructions(config, args, tmp, code)
            reset(backend, config, cluster)
            calls = system_calls(config, args, tmp, code)
            reset(backend, config, cluster)
            settings = extra | {"commit": args.commit or "this checkout"}
            report(backend, settings, counted, calls, args.requests)
    finally:
        if cluster is not None:
            cluster.remove()
        if args.commit:
            remove_worktree(code)
        shutil.rmtree(tmp, ignore_errors=True)


def reset(backend: str, config: dict, cluster) -> None:
    """A fresh database for the next child: the same rows, the same work."""
    if backend == "sqlite":
        for suffix in ("", "-wal", "-shm", "-sync"):
            path = config["CUSTOMERS_DATABASE"] + suffix
            if os.path.exists(path):
                os.remove(path)
    else:
        cluster.admin("DROP DATABASE cost")
        cluster.admin("CREATE DATABASE cost")


def report(backend: str, extra: dict, counted: dict, calls: dict, requests: int) -> None:
    """One table per backend: instructions and system calls per request, and the ratio to echo."""
    settings = " ".join(f"{k}={v}" for k, v in extra.items()) or "defaults"
    print(f"\n{backend} ({settings}), {requests} measured requests a phase\n")
    print("| request | instructions | x echo | system calls | the most frequent |")
    print("|---|---|---|---|---|")
    for phase in PHASES:
        made = calls[phase]
        top = ", ".join(f"{name} {count / requests:.1f}" for name, count in made.most_common(4))
        print(
            f"| {phase} | {counted[phase] / 1000:,.0f}k | {counted[phase] / counted['echo']:.2f} "
            f"| {sum(made.values()) / requests:.1f} | {top} |"
        )
    rest = counted["insert"] - sum(counted[piece] for piece in PIECES)
    print("\n| piece of an insert | instructions |\n|---|---|")
    for piece in PIECES:
        print(f"| {piece} | {counted[piece] / 1000:,.0f}k |")
    print(f"| the rest: Flask, Werkzeug, the hooks, reading the body | {rest / 1000:,.0f}k |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

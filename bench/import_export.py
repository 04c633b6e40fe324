"""Import and export speed and peak memory on a generated JSON Lines file, on either backend.

    .venv/bin/python bench/import_export.py [--rows 1000000] [--backend sqlite|postgres]
        [--root DIR ...] [--rounds 1] [--exports 1]

Makes a file of ``--rows`` seed-like customers, imports it into an empty database with
``flask customers import`` (a child process, so its peak resident memory is its own), exports it
with ``flask customers export``, and prints rows per second and the peak memory of each command's
processes (the import's worker processes included; on PostgreSQL the server's are not), sampled
from /proc, and a digest of the exported file without its ids and times. ``--backend postgres``
uses a database in a throwaway cluster (tests/support/postgres_cluster.py's), started and
removed here.

Each ``--root`` is a checkout whose code runs the commands, with its own ``.venv``'s python (the
default: this one, with this python); several roots take turns, ``--rounds`` times, on the same
file and cluster, so a before and an after meet the same load on a shared machine. Each export
is also timed from inside the command, once its modules are imported; ``--exports`` repeats it.
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))

from support.postgres_cluster import PostgresCluster  # noqa: E402

from customers_service.schemas import SEED_EXAMPLE  # noqa: E402


def make_file(path: str, rows: int) -> None:
    """Write ``rows`` customers, every field set, half of them in the envelope."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            customer = {
                **SEED_EXAMPLE,
                "customer_id": f"cust-{i:08d}",
                "name": f"Customer {i}",
                "address_line1": f"{i} Penfield Ave",
                "email": f"billing{i}@example.com",
            }
            f.write(json.dumps({"customer": customer} if i % 2 else customer) + "\n")


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB summed over a process and its children; PSS shares pages out fairly."""
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    rss = pss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
    return rss / 1024, pss / 1024


def run(args: list[str], env: dict, cwd: str) -> tuple[float, float, float]:
    """Run a command; return its wall time and the peak RSS and PSS of its process tree (MB)."""
    t0 = time.perf_counter()
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    peak_rss = peak_pss = 0.0
    while proc.poll() is None:
        rss, pss = tree_memory_mb(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        errors.seek(0)
        raise SystemExit(f"{args} failed:\n{errors.read().decode(errors='replace')}")
    return seconds, peak_rss, peak_pss


def python_of(root: str) -> str:
    """The python that runs ``root``'s code: its own .venv's, or this one for this checkout."""
    if os.path.samefile(root, ROOT):
        return sys.executable
    return os.path.join(root, ".venv", "bin", "python")


def commit_of(root: str) -> str:
    """The short commit a checkout is at, and a + if it has changes."""
    git = ["git", "-C", root]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True
    )
    return commit.stdout.strip() + ("+" if dirty.stdout.strip() else "")


@contextmanager
def databases(backend: str, tmp: str) -> Iterator:
    """A function that gives the settings of a new, empty database of ``backend``, each call."""
    names = iter(range(1, 1_000_000))
    if backend == "sqlite":
        yield lambda: {"CUSTOMERS_DATABASE": os.path.join(tmp, f"db{next(names)}.sqlite3")}
        return
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()

        def new() -> dict:
            """A new database in the cluster, its predecessors dropped to free their disk."""
            number = next(names)
            if number > 1:
                cluster.drop_database(f"bench_{number - 1}")
            cluster.admin(f"CREATE DATABASE bench_{number}")
            return {"CUSTOMERS_DATABASE_URL": cluster.url(f"bench_{number}")}

        yield new
    finally:
        cluster.remove()


# What differs from one import to the next: the generated id and the times of the writes.
VOLATILE = re.compile(rb'"(lago_id|created_at|updated_at)":"[^"]*"')


def digest(path: str) -> tuple[int, str]:
    """An export's line count and SHA-256 (12 hex digits), without its ids and times."""
    sha, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for line in f:
            sha.update(VOLATILE.sub(rb'"\1":""', line))
            lines += 1
    return lines, sha.hexdigest()[:12]


# The export command, timed from when its modules are imported: at a few hundred thousand rows,
# the interpreter's start is a large part of the command's wall time.
EXPORT = """
import sys, time
from customers_service.__main__ import cli
started = time.perf_counter()
try:
    cli.main(["customers", "export", sys.argv[1]], prog_name="export")
finally:
    with open(sys.argv[2], "w") as f:
        f.write(str(time.perf_counter() - started))
"""


def measure(
    root: str, settings: dict, paths: tuple[str, str, str], rows: int, exports: int
) -> None:
    """Import into a new database with ``root``'s code, export ``exports`` times; print it all."""
    source, out, timing = paths
    env = {**os.environ, **settings, "CUSTOMERS_API_KEYS": "bench"}
    python, label = python_of(root), commit_of(root)
    commands = [("import", [python, "-m", "customers_service", "customers", "import", source])]
    commands += [("export", [python, "-c", EXPORT, out, timing])] * exports
    for name, command in commands:
        load = os.getloadavg()[0]
        seconds, rss, pss = run(command, env, root)
        line = f"{label} {name}: {rows / seconds:,.0f} rows/s ({seconds:.1f} s)"
        if name == "export":
            with open(timing) as f:
                inside = float(f.read())
            line += f", {rows / inside:,.0f} rows/s once started ({inside:.2f} s)"
        print(
            f"{line}; peak memory of its processes: {pss:.0f} MB PSS, {rss:.0f} MB RSS;"
            f" load average {load:.2f}",
            flush=True,
        )
    lines, sha = digest(out)
    print(f"{label} export file: {lines:,} lines, sha256 without ids and times {sha}", flush=True)


def main() -> None:
    """Generate, then import and export with each root in turn; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--root", nargs="+", default=[ROOT], help="checkouts to run, in turn")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--exports", type=int, default=1, help="exports after each import")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, databases(args.backend, tmp) as new_database:
        source = os.path.join(tmp, "customers.jsonl")
        t0 = time.perf_counter()
        make_file(source, args.rows)
        size_mb = os.path.getsize(source) / 1e6
        print(f"made {args.rows:,} rows ({size_mb:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        print(f"backend {args.backend}; " + ", ".join(f"{commit_of(r)} = {r}" for r in args.root))
        paths = (source, os.path.join(tmp, "export.jsonl"), os.path.join(tmp, "export-seconds"))
        for _ in range(args.rounds):
            for root in args.root:
                measure(os.path.abspath(root), new_database(), paths, args.rows, args.exports)


if __name__ == "__main__":
    main()

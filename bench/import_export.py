"""Import and export speed and peak memory on a generated JSON Lines file.

    .venv/bin/python bench/import_export.py [--rows 1000000]

Makes a file of ``--rows`` seed-like customers, imports it into an empty database with
``flask customers import`` (a child process, so its peak resident memory is its own), exports it
with ``flask customers export``, and prints rows per second and the peak memory of each command's
processes (the import's worker processes included), sampled from /proc.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from customers_service.schemas import SEED_EXAMPLE  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FLASK = [sys.executable, "-m", "customers_service", "customers"]


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


def run(args: list[str], env: dict) -> tuple[float, float, float]:
    """Run a command; return its wall time and the peak RSS and PSS of its process tree (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    peak_rss = peak_pss = 0.0
    while proc.poll() is None:
        rss, pss = tree_memory_mb(proc.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{args} failed")
    return seconds, peak_rss, peak_pss


def main() -> None:
    """Generate, import, export; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "customers.jsonl")
        t0 = time.perf_counter()
        make_file(source, args.rows)
        size_mb = os.path.getsize(source) / 1e6
        print(f"made {args.rows:,} rows ({size_mb:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        env = {
            **os.environ,
            "CUSTOMERS_DATABASE": os.path.join(tmp, "db.sqlite3"),
            "CUSTOMERS_API_KEYS": "bench",
        }
        out = os.path.join(tmp, "export.jsonl")
        for name, command in (
            ("import", [*FLASK, "import", source]),
            ("export", [*FLASK, "export", out]),
        ):
            seconds, rss, pss = run(command, env)
            print(
                f"{name}: {args.rows / seconds:,.0f} rows/s ({seconds:.1f} s); peak memory of"
                f" its processes: {pss:.0f} MB PSS, {rss:.0f} MB RSS"
            )


if __name__ == "__main__":
    main()

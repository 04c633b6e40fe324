"""Import and export speed and peak memory on a generated JSON Lines file.

    .venv/bin/python bench/import_export.py [--rows 1000000]

Makes a file of ``--rows`` seed-like customers, imports it into an empty database with
``flask customers import`` (a child process, so its peak resident memory is its own), exports it
with ``flask customers export``, and prints rows per second and peak memory of each.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FLASK = [sys.executable, "-m", "flask", "--app", "wsgi", "customers"]


def make_file(path: str, rows: int) -> None:
    """Write ``rows`` customers, every field set, half of them in the envelope."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            customer = {
                "customer_id": f"cust-{i:08d}",
                "name": f"Customer {i}",
                "country": "US",
                "address_line1": f"{i} Penfield Ave",
                "address_line2": None,
                "state": "CA",
                "zipcode": "91364",
                "email": f"billing{i}@example.com",
                "city": "Woodland Hills",
                "url": "http://hooli.com",
                "phone": "1-171-883-3711 x245",
                "logo_url": "http://hooli.com/logo.png",
                "legal_name": "Coleman-Blair",
                "legal_number": "49-008-2965",
            }
            f.write(json.dumps({"customer": customer} if i % 2 else customer) + "\n")


def run(args: list[str], env: dict, stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Run a command; return its wall time in seconds and its peak resident memory in MB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(args, cwd=ROOT, env=env, stdout=stdout, check=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss is the largest child so far: run the smaller command first, or read it as a bound.
    return seconds, max(peak, before) / 1024


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
        seconds, peak = run([*FLASK, "export", out], env)
        print(f"empty export: peak {peak:.0f} MB (the interpreter and the app)")
        seconds, peak = run([*FLASK, "import", source], env)
        print(f"import: {args.rows / seconds:,.0f} rows/s ({seconds:.1f} s), peak {peak:.0f} MB")
        seconds, peak = run([*FLASK, "export", out], env)
        print(f"export: {args.rows / seconds:,.0f} rows/s ({seconds:.1f} s), peak {peak:.0f} MB")


if __name__ == "__main__":
    main()

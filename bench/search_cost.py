"""What SQLite's search index costs a write, and what its variants would (issue 23): instructions
(callgrind) per insert, per update and per search, the store's upsert called in-process.

    .venv/bin/python bench/search_cost.py [--customers 20000] [--writes 1000] [--variants ...]

For each variant a database is made with the variant's search index, then ``--customers``
customers are written one by one (as the API writes them), outside callgrind. Under callgrind,
each phase warms up, then runs between two calls of ``os.getppid()`` (callgrind dumps its counts
at each): inserts of new customers, updates that rename one (the index rewritten), updates of
the city only (the index untouched), and page 1 of a search and its count for a few terms, each
variant's own way. bench/group_commit.py measures what joining upserts in one transaction would
save.
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from search_index import words  # noqa: E402  (the same vocabulary as that bench's)

from customers_service.backends.shared import FOLDED  # noqa: E402
from customers_service.backends.sqlite import connections as sqlite_connections  # noqa: E402
from customers_service.backends.sqlite import customers as sqlite_customers  # noqa: E402
from customers_service.backends.sqlite import schema as sqlite_schema  # noqa: E402

MERGE = {"automerge": 8, "pgsz": 2000}  # the current index's options (its migration)
# Each variant: its columns (the four folded ones, or one that joins them), its content table,
# FTS5's detail and columnsize, merge options. No index: the share of FTS5 in a write.
VARIANTS = {
    "current": dict(columns="four", content="customers", detail="full", columnsize=1),
    "no index": None,
    "columnsize=0": dict(columns="four", content="customers", detail="full", columnsize=0),
    "contentless": dict(columns="four", content="", detail="full", columnsize=1),
    "one column": dict(columns="one", content="", detail="full", columnsize=1),
    "one column, columnsize=0": dict(columns="one", content="", detail="full", columnsize=0),
    "detail=column": dict(columns="four", content="customers", detail="column", columnsize=1),
    "detail=none": dict(columns="four", content="customers", detail="none", columnsize=1),
    "detail=none, columnsize=0": dict(
        columns="four", content="customers", detail="none", columnsize=0
    ),
    "detail=none, columnsize=0, every trigram": dict(
        columns="four", content="customers", detail="none", columnsize=0, trigrams="every"
    ),
    "one column, detail=none, columnsize=0": dict(
        columns="one", content="", detail="none", columnsize=0
    ),
    "automerge 16": dict(
        columns="four", content="customers", detail="full", columnsize=1, automerge=16
    ),
    "automerge 8, crisismerge 64": dict(
        columns="four", content="customers", detail="full", columnsize=1, crisismerge=64
    ),
}
# The folded fields joined, for a one-column index: a phrase of a term without the separator
# lies within one field. Each term is folded, and a folded text never holds an upper-case
# letter (case folding is idempotent), so "A" cannot be in a term; NUL is refused, and FTS5
# stops reading a value at a NUL.
SEPARATOR = "A"


def joined(row: str) -> str:
    """SQL of the folded fields of ``row`` joined into one text."""
    return f" || '{SEPARATOR}' || ".join(f"coalesce({row}.{c}, '')" for c in FOLDED)


def index_sql(variant: dict | None) -> list[str]:
    """The statements that replace the search index and its triggers by the variant's."""
    drop = [
        "DROP TRIGGER customers_search_in",
        "DROP TRIGGER customers_search_changed",
        "DROP TRIGGER customers_search_out",
        "DROP TABLE customer_search",
    ]
    if variant is None:
        return drop
    if variant["columns"] == "four":
        columns, values = list(FOLDED), lambda row: [f"{row}.{c}" for c in FOLDED]
    else:
        columns, values = ["folded"], lambda row: [joined(row)]
    content = "content='customers', content_rowid='id'" if variant["content"] else "content=''"
    listed = ", ".join(columns)
    changed = " OR ".join(f"new.{c} IS NOT old.{c}" for c in FOLDED[1:])
    delete = f"""INSERT INTO customer_search (customer_search, rowid, {listed})
               VALUES ('delete', old.id, {", ".join(values("old"))})"""
    insert = f"""INSERT INTO customer_search (rowid, {listed})
               VALUES (new.id, {", ".join(values("new"))})"""
    statements = [
        f"""CREATE VIRTUAL TABLE customer_search USING fts5({listed}, {content},
            tokenize='trigram case_sensitive 1', detail={variant["detail"]},
            columnsize={variant["columnsize"]})""",
        f"CREATE TRIGGER customers_search_in AFTER INSERT ON customers BEGIN {insert}; END",
        f"""CREATE TRIGGER customers_search_changed
           AFTER UPDATE OF {", ".join(FOLDED[1:])} ON customers WHEN {changed}
           BEGIN {delete}; {insert}; END""",
        f"CREATE TRIGGER customers_search_out AFTER DELETE ON customers BEGIN {delete}; END",
    ]
    if variant["content"]:
        statements.append("INSERT INTO customer_search (customer_search) VALUES ('rebuild')")
    else:
        statements.append(
            f"INSERT INTO customer_search (rowid, {listed}) "
            f"SELECT id, {', '.join(values('customers'))} FROM customers"
        )
    for name in ("automerge", "pgsz", "crisismerge"):
        value = variant.get(name, MERGE.get(name))
        if value is not None:
            statements.append(
                f"INSERT INTO customer_search (customer_search, rank) VALUES ('{name}', {value})"
            )
    return drop + statements


def search_sql(variant: dict | None, term: str) -> tuple[str, str, tuple]:
    """Page 1 of a search, its count and their parameters: a phrase where FTS5 keeps positions,
    else trigrams that cover the term, then each candidate checked with instr() (exact again)."""
    anywhere = "(" + " OR ".join(f"instr({c}, ?2)" for c in FOLDED) + ")"
    order = "ORDER BY created_at DESC, id DESC LIMIT 20"
    if variant is None:
        return (
            f"SELECT id FROM customers WHERE {anywhere} {order}",
            f"SELECT count(*) FROM customers WHERE {anywhere}",
            ("", term),
        )
    found = "id IN (SELECT rowid FROM customer_search WHERE customer_search MATCH ?1)"
    if variant["detail"] == "full" or len(term) == 3:  # one trigram: exact in either
        phrase = sqlite_customers.fts_phrase(term)
        page = f"SELECT id FROM customers WHERE {found} {order}"
        count = "SELECT count(*) FROM customer_search WHERE customer_search MATCH ?1"
        return page.replace("?2", "?1"), count, (phrase,)
    starts = [*range(0, len(term) - 3, 3), len(term) - 3]  # trigrams that cover the term
    if variant.get("trigrams") == "every":
        starts = range(len(term) - 2)
    trigrams = dict.fromkeys(term[i : i + 3] for i in starts)
    query = " AND ".join(sqlite_customers.fts_phrase(t) for t in trigrams)
    page = f"SELECT id FROM customers WHERE {found} AND {anywhere} {order}"
    count = f"SELECT count(*) FROM customers WHERE {found} AND {anywhere}"
    return page, count, (query, term)


VOCABULARY = words(3000)
TERMS = {
    "rare word": VOCABULARY[5],
    "a tenth of them": "holdings",
    "frequent trigram": "ing",
    "customer_id": "cus-0001234",
    "e-mail domain": VOCABULARY[7] + ".test",
}


def customer(i: int, rnd: random.Random) -> dict:
    """A customer as the API would store it, its searched fields from the vocabulary."""
    pick = rnd.choice
    return {
        "customer_id": f"cus-{i:07d}",
        "name": f"{pick(VOCABULARY).title()} {pick(VOCABULARY).title()}",
        "email": f"{pick(VOCABULARY)}@{pick(VOCABULARY)}.test",
        "legal_name": f"{pick(VOCABULARY)} Holdings" if i % 10 == 0 else pick(VOCABULARY),
        "country": "US",
        "city": "Woodland Hills",
        "address_line1": "5230 Penfield Ave",
    }


def prepared(path: str, name: str, customers: int, optimize: bool) -> float:
    """A database with the variant's index, then ``customers`` customers written one by one, as
    the API writes them, so that the index's segments are as writes leave them (a rebuilt or
    merged index costs the next writes less, or more, for a while). Seconds the fill took."""
    conn = sqlite_connections.connect(path, synchronous="NORMAL", create=True)
    sqlite_schema.migrate(conn)
    with sqlite_connections.write(conn):
        sqlite_customers.begin_write(conn)
        for statement in index_sql(VARIANTS[name]):
            conn.execute(statement)
    rnd = random.Random(2)
    started = time.perf_counter()
    for i in range(customers):
        sqlite_customers.upsert_customer(conn, customer(i, rnd))
    if optimize and VARIANTS[name] is not None:
        with sqlite_connections.write(conn):
            conn.execute("INSERT INTO customer_search (customer_search) VALUES ('optimize')")
    seconds = time.perf_counter() - started
    conn.close()
    return seconds


PHASES = ("insert", "rename", "new city", *(f"search: {t}" for t in TERMS))


def measure(path: str, name: str, customers: int, writes: int, warm: int) -> None:
    """The child: each phase warmed up, then measured between two os.getppid() calls."""
    conn = sqlite_connections.connect(path, synchronous="NORMAL")
    rnd = random.Random(3)
    upsert = sqlite_customers.upsert_customer

    def batches(phase: str):
        if phase == "insert":
            made = [customer(customers + i, rnd) for i in range(warm + writes)]
        elif phase == "rename":
            made = [
                {"customer_id": f"cus-{i:07d}", "name": f"Renamed {rnd.choice(VOCABULARY)}"}
                for i in range(warm + writes)
            ]
        elif phase == "new city":
            made = [
                {"customer_id": f"cus-{i:07d}", "name": "", "city": f"City {i}"}
                for i in range(warm + writes)
            ]
            for c in made:
                c["name"] = sqlite_customers.get_customer(conn, c["customer_id"])["name"]
        else:
            page, count, params = search_sql(VARIANTS[name], TERMS[phase.split(": ")[1]])

            def run():
                conn.execute(page, params).fetchall()
                conn.execute(count, params).fetchone()

            return [run] * 5, [run] * 20
        return (
            [lambda c=c: upsert(conn, c) for c in made[:warm]],
            [lambda c=c: upsert(conn, c) for c in made[warm:]],
        )

    for phase in PHASES:
        warming, measured = batches(phase)
        for call in warming:
            call()
        os.getppid()
        for call in measured:
            call()
        os.getppid()
    conn.close()


def instructions(out: str, name: str, writes: int) -> dict[str, float]:
    """Instructions per call of each phase, from callgrind's dumps."""
    counts = {}
    for n, phase in enumerate(PHASES):
        with open(f"{out}.{2 * n + 2}") as f:
            total = int(re.search(r"^totals: (\d+)", f.read(), re.M).group(1))
        counts[phase] = total / (writes if not phase.startswith("search") else 20)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--warm-up", type=int, default=200)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--optimize", action="store_true", help="merge the index after the fill")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child[0], args.child[1], args.customers, args.writes, args.warm_up)
        return
    tmp = tempfile.mkdtemp(prefix="bench-search-cost-")
    results = {}
    try:
        for name in args.variants:
            path = os.path.join(tmp, f"{len(results)}.sqlite3")
            fill = prepared(path, name, args.customers, args.optimize)
            out = os.path.join(tmp, f"callgrind-{len(results)}.out")
            command = [
                sys.executable,
                __file__,
                "--customers",
                str(args.customers),
                "--writes",
                str(args.writes),
                "--warm-up",
                str(args.warm_up),
                "--child",
                path,
                name,
            ]
            subprocess.run(
                [
                    "valgrind",
                    "--tool=callgrind",
                    "--dump-before=getppid",
                    f"--callgrind-out-file={out}",
                    *command,
                ],
                check=True,
                capture_output=True,
            )
            results[name] = {"fill seconds": fill, **instructions(out, name, args.writes)}
            print(name, json.dumps({k: round(v) for k, v in results[name].items()}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.customers:,} customers; instructions per call (k = 1,000)\n")
    print("| variant | " + " | ".join(PHASES) + " |\n|---|" + "---|" * len(PHASES))
    for name, counts in results.items():
        print(f"| {name} | " + " | ".join(f"{counts[p] / 1000:,.0f}k" for p in PHASES) + " |")


if __name__ == "__main__":
    main()

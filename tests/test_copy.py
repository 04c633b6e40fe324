"""``customers copy --from SOURCE --to TARGET``: a deployment's whole state moved between real
databases, SQLite to PostgreSQL, PostgreSQL to SQLite and SQLite to SQLite. The target answers
every read byte for byte as the source did, serves the same feed from the same ``after``,
records no event of its own and numbers its next one above the source's, and its deliverer sends
each due delivery once. Refusals write nothing; a copy killed mid-way is finished by a rerun;
the password never shows. The command runs as an operator runs it, with the environment's
CUSTOMERS_DATABASE and CUSTOMERS_DATABASE_URL pointing elsewhere."""

import hashlib
import json
import os
import signal
import subprocess
import time
from urllib.parse import quote

import pytest
from support.data import SEED
from support.databases import Backend
from support.receiver import Receiver
from support.servers import free_port
from support.service import API_KEY, AUTH, FLASK, ROOT, post_customer, started_app

from customers_service import database, storage

# Where the environment points: a copy must neither create this file nor call this server.
ELSEWHERE_URL = "postgresql://someone:elsewhere-pw@127.0.0.1:9/elsewhere"
QUICK_DELIVERIES = {
    "CUSTOMERS_WEBHOOK_TIMEOUT": "2",
    "CUSTOMERS_WEBHOOK_POLL_SECONDS": "0.05",
    "CUSTOMERS_WEBHOOK_RETRY_FIRST_SECONDS": "0.1",
    "CUSTOMERS_WEBHOOK_RETRY_LONGEST_SECONDS": "0.4",
}
DIRECTIONS = [
    pytest.param("sqlite", "sqlite", id="sqlite-to-sqlite"),
    pytest.param("sqlite", "postgres", id="sqlite-to-postgres", marks=pytest.mark.postgres),
    pytest.param("postgres", "sqlite", id="postgres-to-sqlite", marks=pytest.mark.postgres),
]
ON_BOTH = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture
def databases(request, tmp_path):
    """Make a test's databases: ``databases("sqlite", "source")``, or a PostgreSQL one, migrated
    or (``migrated=False``) empty as a new database is."""
    made = []

    def make(kind: str, name: str, migrated: bool = True) -> Backend:
        if kind == "sqlite":
            path = tmp_path / f"{name}.sqlite3"
            return Backend("sqlite", {"CUSTOMERS_DATABASE": str(path)}, sqlite_path=path)
        cluster = request.getfixturevalue("postgres")
        made.append((cluster, cluster.new_database(migrated=migrated)))
        url = cluster.url(made[-1][1])
        return Backend("postgres", {"CUSTOMERS_DATABASE_URL": url}, url=url)

    yield make
    database.close_connections()
    for cluster, name in made:
        cluster.drop_database(name)


def location(db: Backend) -> str:
    return db.url or str(db.sqlite_path)


def app_on(db: Backend, tmp_path):
    return started_app(
        {
            "TESTING": True,
            **db.config,
            "CUSTOMERS_API_KEYS": API_KEY,
            "CUSTOMERS_API_KEY_FILE": str(tmp_path / "api-keys"),
        }
    )


def command_env(tmp_path, **extra: str) -> dict:
    """The environment of an operator's command: the service's settings point elsewhere."""
    return {
        **os.environ,
        "CUSTOMERS_DATABASE": str(tmp_path / "elsewhere.sqlite3"),
        "CUSTOMERS_DATABASE_URL": ELSEWHERE_URL,
        "CUSTOMERS_API_KEYS": API_KEY,
        "CUSTOMERS_API_KEY_FILE": str(tmp_path / "api-keys"),
        **extra,
    }


def copy_command(source: str, target: str, *extra: str) -> list[str]:
    return [*FLASK, "customers", "copy", "--from", source, "--to", target, *extra]


def run_copy(tmp_path, source: str, target: str, *extra: str, **env: str):
    result = subprocess.run(
        copy_command(source, target, *extra),
        cwd=ROOT,
        env=command_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not (tmp_path / "elsewhere.sqlite3").exists()
    return result


def customer_url(customer_id: str) -> str:
    return "/api/v1/customers/" + quote(customer_id, safe="")


def fill(app, db: Backend, receiver_url: str) -> dict:
    """A source with every kind of state: non-ASCII values, metadata, updates and deletes,
    pruned events, a webhook endpoint with due deliveries (one leased by a deliverer that is
    gone), a given-up one and an endpoint's last error. Returns the endpoint and the events
    of the due and the failed deliveries."""
    client, runner = app.test_client(), app.test_cli_runner()
    for n in range(6):
        post_customer(client, {"customer_id": f"old{n}", "name": "Old"})
    db.execute_many(
        "UPDATE events SET recorded_at = ? WHERE sequence IN "
        "(SELECT sequence FROM events ORDER BY sequence LIMIT 3)",
        [(time.time() - 31 * 86400,)],
    )
    assert "Removed 3 events" in runner.invoke(args=["customers", "prune-events"]).output
    added = runner.invoke(args=["customers", "add-webhook", receiver_url])
    endpoint = json.loads(added.stdout)
    customers = [
        {**SEED, "metadata": {"plan": "pro", "région": "Île-de-France"}},
        {
            "customer_id": 'ünï/cödé "x"\n',
            "name": "Zoë Ωmega 客户 🙂",
            "country": "fr",
            "legal_name": "Société Générale",
            "metadata": {"ключ": "значение", "a": "1"},
        },
        *(
            {
                "customer_id": f"c{n:02d}",
                "name": f"Name {n}",
                "email": f"C{n}@Example.COM",
                "metadata": {"n": str(n)},
            }
            for n in range(16)
        ),
    ]
    for customer in customers:
        assert post_customer(client, customer).status_code == 200
    post_customer(client, {"customer_id": "c03", "name": "Renamed", "metadata": {"n": None}})
    for gone in ("c04", "old0"):
        assert client.delete(customer_url(gone), headers=AUTH).status_code == 200
    queued = [row[0] for row in db.fetch("SELECT event FROM webhook_deliveries ORDER BY event")]
    db.execute_many(
        "UPDATE webhook_deliveries SET failed = true, attempts = 7, first_try = ?, "
        "last_error = 'HTTP 500' WHERE event = ?",
        [(time.time() - 3600, queued[0])],
    )
    db.execute_many(
        "UPDATE webhook_endpoints SET last_error = 'HTTP 500', last_error_at = ?",
        [("2026-01-02T03:04:05Z",)],
    )
    db.execute_many(
        "UPDATE webhook_deliveries SET leased_until = ?, lease_owner = 'a-gone-host' "
        "WHERE event = ?",
        [(time.time() + 3600, queued[1])],
    )
    database.close_connections()
    return {"endpoint": endpoint, "due": queued[1:], "failed": queued[:1]}


def reads(app) -> list:
    """What readers of the API get: the list's pages in two orders and through the search and
    metadata filters, every customer, the feed walked from its start and from the middle, an
    expired feed position, and the webhooks' status."""
    client, answers = app.test_client(), []
    queries = ["sort=-created_at", "sort=updated_at", "search_term=zo%C3%AB", "metadata[n]=7"]
    customer_ids = []
    for query in queries:
        page = 1
        while page:
            response = client.get(f"/api/v1/customers?per_page=4&page={page}&{query}", headers=AUTH)
            answers.append((query, page, response.status_code, response.data))
            if query == queries[0]:
                customer_ids += [c["customer_id"] for c in response.json["customers"]]
            page = response.json["meta"]["next_page"]
    for customer_id in customer_ids:
        answers.append(client.get(customer_url(customer_id), headers=AUTH).data)
    sequences = [e["sequence"] for e in feed(client, 0)]
    answers += [feed(client, 0), feed(client, sequences[len(sequences) // 2])]
    expired = client.get("/api/v1/events?after=1", headers=AUTH)
    answers.append((expired.status_code, expired.data))
    status = app.test_cli_runner().invoke(args=["customers", "webhook-status"])
    answers.append(status.stdout)
    return answers


def feed(client, after: int) -> list[dict]:
    """Every event after ``after``, page by page as a consumer reads them; each page's bytes
    must be the same on both sides, so the events are compared whole."""
    events = []
    while True:
        response = client.get(f"/api/v1/events?after={after}&limit=5", headers=AUTH)
        assert response.status_code == 200, response.data
        events += response.json["events"]
        after = response.json["meta"]["last_sequence"]
        if not response.json["meta"]["has_more"]:
            return events


def deliver(tmp_path, db: Backend, receiver: Receiver, expected: int) -> None:
    """Run the target's deliverer (its own process) until ``expected`` deliveries arrived."""
    env = {**command_env(tmp_path), **db.env, **QUICK_DELIVERIES}
    if db.name == "sqlite":
        env["CUSTOMERS_DATABASE_URL"] = ""
    log = tmp_path / "deliverer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*FLASK, "customers", "deliver-webhooks"], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 30
        while len(receiver.delivered()) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a delivery sent twice would come now
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert len(receiver.delivered()) >= expected, log.read_text()


@pytest.mark.parametrize(("source_kind", "target_kind"), DIRECTIONS)
def test_the_target_answers_as_the_source_did_and_delivers_each_due_webhook_once(
    databases, tmp_path, source_kind, target_kind
):
    source = databases(source_kind, "source")
    target = databases(target_kind, "target", migrated=False)
    port = free_port()
    filled = fill(app_on(source, tmp_path), source, f"http://127.0.0.1:{port}/webhooks")
    source_app = app_on(source, tmp_path)
    before = reads(source_app)
    source_events = feed(source_app.test_client(), 0)

    result = run_copy(tmp_path, location(source), location(target))

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "webhook endpoints: 1",
        f"customers: {18 + 6 - 2}",
        f"events: {len(source_events)}",
        f"webhook deliveries: {len(filled['due']) + 1}",
    ]
    assert f"Copying from {location(source)} to {location(target)}" in result.stderr
    assert "API keys are not copied" in result.stderr
    target_app = app_on(target, tmp_path)
    assert reads(target_app) == before
    if target.name == "sqlite":  # metadata stored as SQLite writes it, whatever the source
        assert target.fetch("SELECT count(*) FROM customers WHERE metadata <> json(metadata)") == [
            (0,)
        ]
        # Each body written with its row, so reads need not make it from the columns.
        assert target.fetch("SELECT count(*) FROM customers WHERE body IS NULL") == [(0,)]
    assert reads(source_app) == before  # the source is as it was

    # The target's deliverer sends each due delivery once (the leased one too, its lease gone
    # with the source's deliverer) and never the given-up one.
    receiver = Receiver(filled["endpoint"]["secret"], port).start()
    try:
        deliver(tmp_path, target, receiver, expected=len(filled["due"]))
    finally:
        receiver.stop()
    arrivals = receiver.arrivals
    assert sorted(a.sequence for a in arrivals) == filled["due"]
    assert all(a.signed and a.try_number == 1 and a.status == 200 for a in arrivals)
    left = target.fetch("SELECT event FROM webhook_deliveries")
    assert [row[0] for row in left] == filled["failed"]

    # The copy recorded no event; the target's next one is numbered above every copied one.
    target_client = target_app.test_client()
    assert feed(target_client, 0) == source_events
    post_customer(target_client, {"customer_id": "after-the-move", "name": "New"})
    (new,) = feed(target_client, source_events[-1]["sequence"])
    assert new["customer"]["customer_id"] == "after-the-move"
    assert new["sequence"] > max(e["sequence"] for e in source_events)


def tables(db: Backend) -> dict:
    """Everything a database holds that a copy could write, for "nothing was written"."""
    if db.name == "sqlite":
        if not db.sqlite_path.exists():
            return {}
        database.close_connections()  # the WAL checkpointed into the file
        wal = db.sqlite_path.with_name(db.sqlite_path.name + "-wal")
        return {
            "file": hashlib.sha256(db.sqlite_path.read_bytes()).hexdigest(),
            "wal": wal.read_bytes() if wal.exists() else b"",
        }
    held = {}
    for table in [*storage.COPIED, "schema_migrations", "events_pruned"]:
        exists = db.fetch("SELECT to_regclass(?) IS NOT NULL", (table,))[0][0]
        held[table] = sorted(map(repr, db.fetch(f"SELECT * FROM {table}"))) if exists else None
    held["triggers"] = db.fetch("SELECT tgname, tgenabled FROM pg_trigger ORDER BY 1")
    return held


def refused(tmp_path, source: Backend, target: Backend, words: str, source_path: str = ""):
    """The copy is refused with exit status 1 and a message, and neither side is written."""
    before = tables(source), tables(target)
    result = run_copy(tmp_path, source_path or location(source), location(target))
    assert result.returncode == 1, result.stderr
    assert words in result.stderr
    assert result.stderr.splitlines()[-1].startswith("Refused: ")
    assert (tables(source), tables(target)) == before
    return result


def filled_source(databases, tmp_path, kind: str = "sqlite") -> Backend:
    source = databases(kind, "source")
    client = app_on(source, tmp_path).test_client()
    for n in range(3):
        post_customer(client, {"customer_id": f"s{n}", "name": "Source"})
    database.close_connections()
    return source


@pytest.mark.parametrize("kind", ON_BOTH)
def test_a_target_that_holds_customers_is_refused(databases, tmp_path, kind):
    source = filled_source(databases, tmp_path)
    target = databases(kind, "target")
    post_customer(app_on(target, tmp_path).test_client(), {"customer_id": "t", "name": "T"})
    refused(tmp_path, source, target, "already holds 1 customers, 1 events")


@pytest.mark.parametrize("kind", ON_BOTH)
def test_a_target_that_holds_events_only_is_refused(databases, tmp_path, kind):
    source = filled_source(databases, tmp_path)
    target = databases(kind, "target")
    client = app_on(target, tmp_path).test_client()
    post_customer(client, {"customer_id": "t", "name": "T"})
    client.delete(customer_url("t"), headers=AUTH)
    refused(tmp_path, source, target, "already holds 2 events")


def test_the_same_sqlite_file_is_refused_however_it_is_named(databases, tmp_path):
    source = filled_source(databases, tmp_path)
    (tmp_path / "link").symlink_to(tmp_path)
    other_name = str(tmp_path / "link" / "source.sqlite3")
    refused(tmp_path, source, source, "are the same database", source_path=other_name)


@pytest.mark.postgres
def test_the_same_postgres_database_is_refused_however_it_is_named(databases, tmp_path):
    source = filled_source(databases, tmp_path, "postgres")
    other_name = source.url.replace("postgresql://", "postgres://") + "?application_name=other"
    refused(tmp_path, source, source, "are the same database", source_path=other_name)


def test_a_missing_or_uninitialised_source_is_refused_and_no_target_is_made(databases, tmp_path):
    target = databases("sqlite", "target")
    (tmp_path / "empty.sqlite3").touch()
    for name, words in (
        ("missing", "the database file is missing"),
        ("empty", "not a database of this version"),
    ):
        source = databases("sqlite", name)
        result = refused(tmp_path, source, target, f"Refused: cannot copy from {location(source)}")
        assert words in result.stderr
    assert not target.sqlite_path.exists()
    assert (tmp_path / "empty.sqlite3").read_bytes() == b""


def test_a_source_written_to_during_the_copy_is_found_out(databases, tmp_path):
    source = big_source(databases, tmp_path, 4000)
    target = databases("sqlite", "target")
    proc = copy_under_way(
        tmp_path, source, target, 20, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    post_customer(app_on(source, tmp_path).test_client(), {"customer_id": "c000001", "name": "X"})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.splitlines()[-1] == (
        f"The copy is not a faithful one: {source.sqlite_path} changed while it was copied. "
        "Stop everything that writes to the source, then copy into an empty database"
    )
    # The copy read one snapshot: the target holds the source as it was when the copy began.
    assert held_rows(target, "events") == 4000
    assert held_rows(target, "copy_progress") == 1  # not finished: a rerun refuses it
    refused(tmp_path, source, target, "changed since the unfinished copy")


@pytest.mark.parametrize("kind", ON_BOTH)
def test_a_target_written_to_during_the_copy_stops_it_with_a_message(databases, tmp_path, kind):
    source = big_source(databases, tmp_path, 4000)
    target = databases(kind, "target", migrated=False)
    proc = copy_under_way(
        tmp_path, source, target, 20, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # An update records its event, numbered 1, as the service on the target would.
    target.execute_many("UPDATE customers SET name = ? WHERE customer_id = ?", [("Y", "c000000")])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.splitlines()[-1].startswith(
        f"The copy stopped: {location(target)} refused events: "
    ), err
    assert "Traceback" not in err
    assert held_rows(target, "copy_progress") == 1


def test_a_target_changed_between_two_runs_fails_the_counts_and_checksum(databases, tmp_path):
    source = big_source(databases, tmp_path, 400)
    target = databases("sqlite", "target")
    command = killed_copy(tmp_path, source, target, batch=1)
    # A customer already copied is changed, and the event that recorded it removed, so the
    # customers' count stays the same; an endpoint is added.
    target.execute_many("UPDATE customers SET name = ? WHERE customer_id = ?", [("Y", "c000000")])
    target.execute_many("DELETE FROM events", [()])
    target.execute_many(
        "INSERT INTO webhook_endpoints (id, url, secret, created_at) VALUES (?, ?, ?, ?)",
        [("extra", "http://127.0.0.1:9/", "s", "2026-01-01T00:00:00Z")],
    )
    rerun = subprocess.run(
        command, cwd=ROOT, env=command_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 1
    (message,) = [line for line in rerun.stderr.splitlines() if line.startswith("The copy")]
    assert message.startswith(
        "The copy differs from the source: webhook endpoints: 0 in the source, 1 in the "
        "target; customers' checksum: "
    )
    assert held_rows(target, "copy_progress") == 1


def big_source(databases, tmp_path, count: int) -> Backend:
    """A SQLite source of ``count`` customers (and their events), imported."""
    source = databases("sqlite", "source")
    lines = tmp_path / "customers.jsonl"
    lines.write_text(
        "".join(
            json.dumps({"customer_id": f"c{n:06d}", "name": f"Nom {n} é", "metadata": {"n": "1"}})
            + "\n"
            for n in range(count)
        )
    )
    imported = (
        app_on(source, tmp_path)
        .test_cli_runner()
        .invoke(args=["customers", "import", str(lines), "--jobs", "1", "--batch-size", "5000"])
    )
    assert imported.exit_code == 0, imported.output
    database.close_connections()
    return source


def export(db: Backend, tmp_path) -> str:
    """The sha256 of the database's export."""
    store = database.open_store(app_on(db, tmp_path))
    try:
        return hashlib.sha256("\n".join(store.export_lines()).encode()).hexdigest()
    finally:
        store.close()


def held_rows(db: Backend, table: str) -> int:
    try:
        return db.fetch(f"SELECT count(*) FROM {table}")[0][0]
    except Exception:  # not made yet
        return 0


def copy_under_way(tmp_path, source: Backend, target: Backend, batch: int, **popen):
    """A copy in its own process, returned once its first batch of customers is committed."""
    command = copy_command(location(source), location(target), "--batch-size", str(batch))
    proc = subprocess.Popen(command, cwd=ROOT, env=command_env(tmp_path), **popen)
    deadline = time.monotonic() + 60
    while held_rows(target, "customers") == 0:
        assert proc.poll() is None and time.monotonic() < deadline, "no batch was committed"
        time.sleep(0.002)
    return proc


def killed_copy(tmp_path, source: Backend, target: Backend, batch: int) -> list[str]:
    """A copy killed (SIGKILL) as soon as its first batch of customers is committed; its
    command, to run again."""
    proc = copy_under_way(
        tmp_path, source, target, batch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert held_rows(target, "copy_progress") == 1, "the copy ended before it was killed"
    return proc.args


@pytest.mark.parametrize("kind", ON_BOTH)
def test_a_copy_killed_mid_way_is_finished_by_a_rerun(databases, tmp_path, kind):
    count, batch = 3000, 30
    source = big_source(databases, tmp_path, count)
    target = databases(kind, "target", migrated=False)
    command = killed_copy(tmp_path, source, target, batch)

    copied = held_rows(target, "customers")
    assert 0 < copied < count and copied % batch == 0
    (progress,) = target.fetch("SELECT progress FROM copy_progress")
    assert json.loads(progress[0])["copied"]["customers"] == copied
    # The event trigger is in place whatever the kill interrupted.
    if kind == "sqlite":
        triggers = target.fetch("SELECT name FROM sqlite_master WHERE name LIKE 'customers_event%'")
        assert len(triggers) == 3
    else:
        enabled = target.fetch("SELECT tgenabled FROM pg_trigger WHERE tgname = 'customers_events'")
        assert enabled == [("O",)]

    rerun = subprocess.run(
        command, cwd=ROOT, env=command_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"Resuming the unfinished copy into {location(target)}: " in rerun.stderr
    assert f"customers: {count:,}" in rerun.stdout and f"events: {count:,}" in rerun.stdout
    for table in ("customers", "events"):
        assert held_rows(target, table) == count
    assert target.fetch("SELECT count(DISTINCT customer_id) FROM customers") == [(count,)]
    assert held_rows(target, "copy_progress") == 0
    assert export(source, tmp_path) == export(target, tmp_path)
    assert feed(app_on(target, tmp_path).test_client(), count - 3) == feed(
        app_on(source, tmp_path).test_client(), count - 3
    )


def test_an_unfinished_copy_resumes_only_from_its_source_unchanged(databases, tmp_path):
    source = big_source(databases, tmp_path, 400)
    target = databases("sqlite", "target")
    killed_copy(tmp_path, source, target, batch=1)
    other = databases("sqlite", "other")
    post_customer(app_on(other, tmp_path).test_client(), {"customer_id": "o", "name": "O"})
    refused(
        tmp_path,
        other,
        target,
        f"holds an unfinished copy from another database ({source.sqlite_path})",
    )
    refused(tmp_path, target, other, f"{target.sqlite_path} holds an unfinished copy")
    post_customer(app_on(source, tmp_path).test_client(), {"customer_id": "late", "name": "L"})
    refused(tmp_path, source, target, f"{source.sqlite_path} changed since the unfinished copy")


@pytest.mark.parametrize(("source_kind", "target_kind"), DIRECTIONS)
def test_a_target_numbers_events_above_every_number_the_source_gave_out(
    databases, tmp_path, source_kind, target_kind
):
    """Above its newest event's, and above numbers no kept event has: on SQLite, every event
    pruned; on PostgreSQL, the last number taken by a writer that did not commit."""
    source = databases(source_kind, "source")
    app = app_on(source, tmp_path)
    for n in range(5):
        post_customer(app.test_client(), {"customer_id": f"p{n}", "name": "P"})
    if source_kind == "sqlite":
        source.execute_many("UPDATE events SET recorded_at = ?", [(0.0,)])
        pruned = app.test_cli_runner().invoke(args=["customers", "prune-events"])
        assert "Removed 5 events" in pruned.output
    else:
        assert source.fetch("SELECT nextval('events_sequence')") == [(6,)]
    database.close_connections()
    target = databases(target_kind, "target", migrated=False)
    result = run_copy(tmp_path, location(source), location(target))
    assert result.returncode == 0, result.stderr
    client = app_on(target, tmp_path).test_client()
    post_customer(client, {"customer_id": "new", "name": "N"})
    (event,) = feed(client, 5)
    assert event["sequence"] > 6 if source_kind == "postgres" else event["sequence"] > 5


@pytest.mark.postgres
def test_the_password_is_never_shown(databases, tmp_path, postgres):
    source = filled_source(databases, tmp_path)
    target = databases("postgres", "target", migrated=False)
    with_password = target.url.replace("postgres@", "postgres:pa55-w0rd@")
    shown = with_password.replace("pa55-w0rd", "***")
    for attempt in ("copied", "refused"):
        result = run_copy(tmp_path, location(source), with_password, CUSTOMERS_LOG_FORMAT="json")
        assert result.returncode == (0 if attempt == "copied" else 1), result.stderr
        assert "pa55-w0rd" not in result.stdout + result.stderr
        lines = [json.loads(line) for line in result.stderr.splitlines()]
        assert lines[0]["target"] == shown and lines[0]["message"].endswith(f"to {shown}")
    assert lines[-1]["failed"] is True and shown in lines[-1]["message"]
    unreachable = with_password.replace(f":{postgres.port}/", ":9/")
    result = run_copy(tmp_path, location(source), unreachable)
    assert result.returncode == 1 and "pa55-w0rd" not in result.stdout + result.stderr
    assert "postgres:***@127.0.0.1:9/" in result.stderr

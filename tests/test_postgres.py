"""PostgreSQL's own machinery: migrations under a lock, the session settings, its faults mapped
to the contract's 503s, the same bytes as SQLite, and the move from SQLite."""

import gc
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path

import psycopg
import pytest
import requests
from support.data import SEED
from support.databases import answers_of_both_backends
from support.filesystems import fill, small_filesystem
from support.servers import Gunicorn
from support.service import API_KEY, AUTH, FLASK, ROOT, post_customer, started_app

from customers_service import database
from customers_service.app import create_app
from customers_service.backends.postgres import connections as pg_connections
from customers_service.backends.postgres import customers as pg_customers
from customers_service.backends.postgres import schema as pg_schema
from customers_service.storage import Filters, fold


def flask_command(env: dict, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """``python -m customers_service customers ...`` in a process of its own."""
    return subprocess.run(
        [*FLASK, "customers", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "CUSTOMERS_API_KEYS": API_KEY, **env},
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


@pytest.mark.postgres
def test_three_hosts_starting_together_apply_each_migration_once(postgres):
    name = postgres.new_database(migrated=False)
    env = {"CUSTOMERS_DATABASE_URL": postgres.url(name)}
    start = threading.Barrier(3)
    results = []

    def host() -> None:
        start.wait()
        results.append(flask_command(env, "init-db"))

    threads = [threading.Thread(target=host) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    with psycopg.connect(postgres.url(name)) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations")]
        triggers = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'customers'::regclass "
            "AND NOT tgisinternal"
        ).fetchone()[0]
    assert sorted(versions) == list(range(1, len(pg_schema.MIGRATIONS) + 1))
    assert triggers == 2  # the counter's and the events', each created once
    postgres.drop_database(name)


@pytest.mark.postgres
def test_a_database_of_the_first_version_is_migrated_with_its_data(postgres):
    name = postgres.new_database(migrated=False)
    conn = pg_connections.connect(postgres.url(name))
    try:
        with conn.transaction():  # as the first PostgreSQL version of this service left it
            conn.execute(pg_schema.CREATE_MIGRATIONS_TABLE)
            for statement in pg_schema.MIGRATIONS[0]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (1)")
        conn.execute(
            "INSERT INTO customers (lago_id, customer_id, name, email, created_at, updated_at) "
            "VALUES (gen_random_uuid(), 'ÉCOLE-2', 'Straße', 'Ö@X.EXAMPLE', now(), now())"
        )
        assert pg_schema.migrate(conn) == len(pg_schema.MIGRATIONS)
        assert pg_customers.get_customer(conn, "ÉCOLE-2")["metadata"] == {}
        for filters in (
            Filters(search=fold("école")),
            Filters(search=fold("STRASSE")),
            Filters(email=fold("ö@x.example")),
        ):
            customers, total = pg_customers.list_customers(conn, 1, 20, filters)
            assert [c["customer_id"] for c in customers] == ["ÉCOLE-2"] and total == 1
    finally:
        conn.close()
        postgres.drop_database(name)


@pytest.mark.postgres
def test_service_sessions_commit_synchronously_whatever_the_database_default(postgres):
    name = postgres.new_database()
    postgres.admin(f"ALTER DATABASE {name} SET synchronous_commit = off")
    connections = pg_connections.Connections(postgres.url(name), 2, 5.0, 5.0)
    conn = connections.acquire()
    try:
        assert conn.execute("SHOW synchronous_commit").fetchone()["synchronous_commit"] == "on"
    finally:
        connections.release(conn)
        connections.close()
        postgres.drop_database(name)


@pytest.mark.postgres
def test_an_uninitialised_database_is_a_503_until_init_db(postgres, tmp_path):
    name = postgres.new_database(migrated=False)
    app = create_app({"CUSTOMERS_DATABASE_URL": postgres.url(name), "CUSTOMERS_API_KEYS": API_KEY})
    client = app.test_client()
    response = post_customer(client, SEED)
    assert response.status_code == 503
    assert response.get_json()["code"] == "database_unavailable"
    assert app.test_cli_runner().invoke(args=["customers", "init-db"]).exit_code == 0
    database.close_connections()  # a new process would see it at once; this one caches the check
    assert post_customer(client, SEED).status_code == 200
    database.close_connections()
    postgres.drop_database(name)


@pytest.fixture
def pg_app(postgres, tmp_path):
    """An app on a fresh migrated PostgreSQL database with short waits."""
    name = postgres.new_database()
    app = started_app(
        {
            "CUSTOMERS_DATABASE_URL": postgres.url(name),
            "CUSTOMERS_API_KEYS": API_KEY,
            "CUSTOMERS_API_KEY_FILE": str(tmp_path / "keys"),
            "CUSTOMERS_POSTGRES_STATEMENT_TIMEOUT": 0.2,
            "CUSTOMERS_POSTGRES_POOL_TIMEOUT": 0.2,
            "CUSTOMERS_POSTGRES_POOL_SIZE": 1,
        }
    )
    app.database_name = name
    yield app
    database.close_connections()
    postgres.drop_database(name)


@pytest.mark.postgres
def test_a_row_locked_past_the_statement_timeout_is_503_database_busy(pg_app, postgres):
    client = pg_app.test_client()
    assert post_customer(client, SEED).status_code == 200
    with psycopg.connect(postgres.url(pg_app.database_name)) as blocker:
        blocker.execute(
            "UPDATE customers SET name = 'held' WHERE customer_id = %s", (SEED["customer_id"],)
        )
        # A change must wait for the row's lock; one that changes nothing reads and needs none.
        response = post_customer(client, {**SEED, "name": "Changed"})
        unchanged = post_customer(client, SEED)
        blocker.rollback()
    assert response.status_code == 503
    assert response.get_json()["code"] == "database_busy"
    assert response.headers["Retry-After"] == "1"
    assert unchanged.status_code == 200
    assert post_customer(client, {**SEED, "name": "Changed"}).status_code == 200


@pytest.mark.postgres
def test_an_exhausted_pool_is_503_database_busy(pg_app):
    client = pg_app.test_client()
    assert client.get("/health").status_code == 200
    connections = database.connections(pg_app)
    held = connections.acquire()  # the pool's one connection, taken by someone else
    try:
        response = post_customer(client, SEED)
        assert response.status_code == 503
        assert response.get_json()["code"] == "database_busy"
    finally:
        connections.release(held)
    assert post_customer(client, SEED).status_code == 200


@pytest.mark.postgres
def test_a_read_only_database_is_503_database_read_only(pg_app, postgres):
    client = pg_app.test_client()
    postgres.admin(f"ALTER DATABASE {pg_app.database_name} SET default_transaction_read_only = on")
    database.close_connections()  # new sessions take the database's new default
    response = post_customer(client, SEED)
    assert response.status_code == 503
    assert response.get_json()["code"] == "database_read_only"
    assert client.get("/health").status_code == 503
    assert client.get("/api/v1/customers", headers=AUTH).status_code == 200  # reads still work


@pytest.mark.postgres
def test_answers_are_the_same_bytes_on_both_backends(postgres, tmp_path):
    lines = [
        {
            "customer": {
                **SEED,
                "customer_id": f"same-{i}",
                "name": f"Zoë «{i}» 客户",
                "lago_id": f"0190a3c4-5b6d-7e8f-9a0b-1c2d3e4f{i:04d}",
                "created_at": f"2022-04-29T08:59:{i:02d}Z",
                "updated_at": "2023-01-02T03:04:05Z",
                "metadata": {"plan": f"p{i % 3}", "Zé": "ü «x»", "a": str(i)} if i % 2 else {},
            }
        }
        for i in range(30)
    ]
    source = tmp_path / "same.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = answers_of_both_backends(
        postgres,
        tmp_path,
        source,
        lambda client: [
            client.get("/api/v1/customers/same-7", headers=AUTH).data,
            client.get("/api/v1/customers?page=2&per_page=7", headers=AUTH).data,
            client.delete("/api/v1/customers/same-3", headers=AUTH).data,
            client.get("/api/v1/customers?per_page=100", headers=AUTH).data,
            client.get("/api/v1/customers?metadata[plan]=p1&search_term=ZO", headers=AUTH).data,
        ],
    )
    assert answers["sqlite"] == answers["postgres"]


@pytest.mark.postgres
def test_export_from_sqlite_piped_into_import_on_postgres_moves_every_column(postgres, tmp_path):
    sqlite_env = {"CUSTOMERS_DATABASE": str(tmp_path / "from.sqlite3")}
    app = started_app({**sqlite_env, "CUSTOMERS_API_KEYS": API_KEY})
    client = app.test_client()
    for i in range(250):
        customer = {**SEED, "customer_id": f"move-{i}", "city": None if i % 3 else "Café"}
        customer["metadata"] = {"crm_id": str(i), "région": "Île"} if i % 4 else {}
        assert post_customer(client, customer).status_code == 200
    name = postgres.new_database(migrated=False)
    pg_env = {"CUSTOMERS_DATABASE_URL": postgres.url(name)}
    exported = subprocess.Popen(
        [*FLASK, "customers", "export"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "CUSTOMERS_API_KEYS": API_KEY, **sqlite_env},
        stdout=subprocess.PIPE,
    )
    imported = flask_command(pg_env, "import", "-", "--format", "jsonl", stdin=exported.stdout)
    exported.stdout.close()
    exported.wait(timeout=60)
    assert exported.returncode == 0
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("250 inserted, 0 updated, 0 unchanged, 0 rejected")
    before = flask_command(sqlite_env, "export").stdout.splitlines()
    after = flask_command(pg_env, "export").stdout.splitlines()
    assert len(before) == 250
    assert after == before  # every column, lago_id and timestamps included, byte for byte
    postgres.drop_database(name)


def owned_database(postgres) -> tuple[str, str]:
    """An empty database owned by a role with a password, and its URL."""
    postgres.admin("DROP ROLE IF EXISTS customers_app")
    postgres.admin(f"CREATE ROLE customers_app LOGIN PASSWORD '{PASSWORD}'")
    name = f"customers_owned_{int(time.time() * 1000)}"
    postgres.admin(f"CREATE DATABASE {name} OWNER customers_app")
    return name, f"postgresql://customers_app:{PASSWORD}@127.0.0.1:{postgres.port}/{name}"


PASSWORD = "Sekr3t-Passw0rd"


@pytest.mark.postgres
@pytest.mark.system
def test_postgres_stopped_is_503_unavailable_and_the_service_recovers_by_itself(tmp_path, postgres):
    name, url = owned_database(postgres)
    gunicorn = Gunicorn(
        tmp_path, env={"CUSTOMERS_DATABASE_URL": url, "CUSTOMERS_POSTGRES_POOL_TIMEOUT": "1"}
    ).start()
    session = requests.Session()
    session.headers.update(AUTH)
    bodies = []
    try:
        assert session.post(gunicorn.url + "/api/v1/customers", json={"customer": SEED}).ok
        postgres.stop("fast")
        try:
            for _ in range(4):
                response = session.post(
                    gunicorn.url + "/api/v1/customers", json={"customer": SEED}, timeout=30
                )
                bodies.append(response.text)
                assert response.status_code == 503, response.text
                assert response.json()["code"] == "database_unavailable"
                assert session.get(gunicorn.url + "/health", timeout=30).status_code == 503
        finally:
            postgres.start()
        deadline = time.monotonic() + 30
        while session.get(gunicorn.url + "/health", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the service did not recover by itself"
            time.sleep(0.2)
        for _ in range(4):
            got = session.get(gunicorn.url + "/api/v1/customers/" + SEED["customer_id"])
            assert got.status_code == 200, got.text + gunicorn.log()[-2500:]
    finally:
        gunicorn.stop()
    log = gunicorn.log()
    assert "database_unavailable" in log and "Traceback" not in log
    for text in [log, *bodies]:
        assert PASSWORD not in text
    postgres.drop_database(name)


def test_passwords_are_hidden_wherever_the_url_holds_them():
    assert pg_connections.safe_url("postgresql://u:pw@h:5432/d") == "postgresql://u:***@h:5432/d"
    hidden = pg_connections.safe_url("postgresql://u@h/d?password=pw&sslpassword=k&sslmode=on")
    assert hidden == "postgresql://u@h/d?password=***&sslpassword=***&sslmode=on"


@pytest.mark.postgres
def test_init_db_on_an_unreachable_server_says_so_without_the_password(postgres):
    url = f"postgresql://customers_app:{PASSWORD}@127.0.0.1:1/nowhere"
    result = flask_command({"CUSTOMERS_DATABASE_URL": url}, "init-db")
    assert result.returncode != 0
    assert "postgresql://customers_app:***@127.0.0.1:1/nowhere" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.postgres
@pytest.mark.system
def test_a_full_disk_is_503_database_full(postgres):
    parent = Path(tempfile.mkdtemp(prefix="customers-pg-full-"))
    parent.chmod(0o755)  # the postgres user reaches the tablespace through it
    name = f"customers_full_{int(time.time() * 1000)}"
    try:
        with small_filesystem(parent / "fs", "32m") as small:
            shutil.chown(small, "postgres", "postgres")
            postgres.admin(f"CREATE TABLESPACE {name} LOCATION '{small}'")
            try:
                postgres.admin(f"CREATE DATABASE {name} TABLESPACE {name}")
                assert_full_disk_is_503_and_clears(postgres.url(name), small)
            finally:
                database.close_connections()
                postgres.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                postgres.admin(f"DROP TABLESPACE IF EXISTS {name}")
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def assert_full_disk_is_503_and_clears(url: str, small: Path) -> None:
    """Fill the disk under the database: a 503 database_full, then writes again once it clears."""
    app = started_app({"CUSTOMERS_DATABASE_URL": url, "CUSTOMERS_API_KEYS": API_KEY})
    client = app.test_client()
    big = {"name": "N", "legal_name": "x" * 250, "address_line1": "y" * 250}
    assert post_customer(client, {"customer_id": "before", **big}).status_code == 200
    fill(small / "filler")
    answers = []
    for i in range(5_000):
        response = post_customer(client, {"customer_id": f"full-{i:05d}", **big})
        answers.append(response.status_code)
        if response.status_code != 200:
            break
    assert answers[-1] == 503, answers[-3:]
    assert set(answers[:-1]) == {200}
    assert response.get_json()["code"] == "database_full"
    assert response.headers["Retry-After"] == "1"
    os.remove(small / "filler")  # the fault clears; nobody restarts anything
    assert post_customer(client, {"customer_id": "after", **big}).status_code == 200
    assert client.get("/api/v1/customers/before", headers=AUTH).status_code == 200


@pytest.mark.postgres
def test_a_closed_connection_and_its_kept_cursor_are_freed(postgres):
    """The cursor a connection keeps for the customers' statements (row_cursor) goes with it: a
    pool replaces its connections (a restart, max_lifetime), and none may stay in memory."""
    name = postgres.new_database()
    conn = pg_connections.connect(postgres.url(name))
    assert pg_customers.get_customer(conn, "nobody") is None
    assert pg_connections.row_cursor(conn) is pg_connections.row_cursor(conn)
    gone = weakref.ref(conn)
    conn.close()
    del conn
    gc.collect()
    assert gone() is None
    postgres.drop_database(name)

"""The storage functions on their own, on real SQLite connections."""

import fcntl
import json
import os
import sqlite3
import stat
import struct
import time

import pytest

from customers_service import storage
from customers_service.backends import shared
from customers_service.backends.sqlite import connections as sqlite_connections
from customers_service.backends.sqlite import customers as sqlite_customers
from customers_service.backends.sqlite import schema as sqlite_schema
from customers_service.storage import NO_FILTERS, Filters

ALICE = {"customer_id": "alice", "name": "Alice", "country": "FR", "email": "a@example.com"}


def test_upsert_inserts_then_updates_present_keys_only(conn):
    first = sqlite_customers.upsert_customer(conn, ALICE)
    assert first["name"] == "Alice" and first["city"] is None
    second = sqlite_customers.upsert_customer(
        conn, {"customer_id": "alice", "name": "A.", "email": None}
    )
    assert second["lago_id"] == first["lago_id"]
    assert second["created_at"] == first["created_at"]
    assert (second["name"], second["country"], second["email"]) == ("A.", "FR", None)


def test_the_numbered_upsert_binds_what_the_named_one_does():
    # Every kind of value a parameter takes: absent and null fields, a metadata patch with a
    # removal, metadata emptied, a restored lago_id and created_at; then the same as updates.
    customers = [
        {**ALICE, "metadata": {"plan": "pro", "gone": None}, "lago_id": "l-1"},
        {"customer_id": "bob", "name": "Bob", "city": None, "metadata": None},
        {"customer_id": "eve", "name": "Eve", "legal_name": "Eve SA", "created_at": "2020-01-01"},
        {"customer_id": "alice", "name": "Al", "state": "CA", "metadata": {"plan": None}},
        {"customer_id": "bob", "name": "B", "email": "B@X.TEST", "metadata": {"k": "v"}},
        {"customer_id": "eve", "name": "E", "metadata": None, "zipcode": "75001"},
    ]
    named, numbered = sqlite_connections.connect(":memory:"), sqlite_connections.connect(":memory:")
    for db in (named, numbered):
        sqlite_schema.migrate(db)
    for fields in customers:
        params = shared.upsert_params(fields, "2026-01-01T00:00:00Z")
        with named:
            expected = named.execute(sqlite_customers.UPSERT_CUSTOMER, params).fetchall()
        with numbered:
            got = numbered.execute(
                sqlite_customers.UPSERT_NUMBERED, sqlite_customers.in_upsert_order(params)
            )
            assert [tuple(r) for r in got.fetchall()] == [tuple(r) for r in expected]
    search = 'SELECT rowid FROM customer_search WHERE customer_search MATCH \'"x.t" AND ".te"\''
    assert named.execute(search).fetchall() == numbered.execute(search).fetchall() != []


def test_a_write_alone_inside_a_transaction_is_part_of_it(conn):
    sqlite_customers.upsert_customer(conn, {**ALICE, "lago_id": "l-1"})
    conn.execute("BEGIN")
    conn.execute("UPDATE health_probe SET checked_at = 'then' WHERE id = 1")
    with pytest.raises(sqlite3.IntegrityError):  # a lago_id that alice has
        sqlite_customers.upsert_customer(
            conn, {"customer_id": "bob", "name": "Bob", "lago_id": "l-1"}
        )
    assert not conn.in_transaction and conn.isolation_level == ""
    # Undone with it: the upsert neither committed what was open nor ran on its own.
    assert conn.execute("SELECT checked_at FROM health_probe").fetchone()[0] is None
    sqlite_customers.upsert_customer(conn, {"customer_id": "bob", "name": "Bob"})
    assert not conn.in_transaction and conn.isolation_level == ""
    conn.rollback()
    assert sqlite_customers.get_customer(conn, "bob")["name"] == "Bob"


def test_upsert_returns_every_column(conn):
    row = sqlite_customers.upsert_customer(conn, ALICE)
    assert tuple(row) == storage.COLUMNS


def test_get_and_delete(conn):
    sqlite_customers.upsert_customer(conn, ALICE)
    assert sqlite_customers.get_customer(conn, "alice")["name"] == "Alice"
    assert sqlite_customers.delete_customer(conn, "alice")["name"] == "Alice"
    assert sqlite_customers.get_customer(conn, "alice") is None
    assert sqlite_customers.delete_customer(conn, "alice") is None


def test_list_is_newest_first_with_a_maintained_count(conn):
    for i in range(5):
        sqlite_customers.upsert_customer(conn, {"customer_id": f"c{i}", "name": "N"})
    sqlite_customers.upsert_customer(conn, {"customer_id": "c0", "name": "updated, not new"})
    rows, total = sqlite_customers.list_customers(conn, page=1, per_page=2, filters=NO_FILTERS)
    assert [r["customer_id"] for r in rows] == ["c4", "c3"]
    assert total == 5
    rows, _ = sqlite_customers.list_customers(conn, page=3, per_page=2, filters=NO_FILTERS)
    assert [r["customer_id"] for r in rows] == ["c0"]
    sqlite_customers.delete_customer(conn, "c1")
    assert sqlite_customers.list_customers(conn, page=9, per_page=2, filters=NO_FILTERS) == ([], 4)


def test_export_lines_are_the_api_objects_oldest_first(conn):
    for i in range(3):
        sqlite_customers.upsert_customer(conn, {"customer_id": f"c{i}", "name": "N"})
    lines = [json.loads(line) for line in sqlite_customers.export_lines(conn)]
    assert [line["customer"]["customer_id"] for line in lines] == ["c0", "c1", "c2"]
    assert lines[0] == {"customer": sqlite_customers.get_customer(conn, "c0")}


def test_migrate_is_idempotent_and_records_the_version(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    conn = sqlite_connections.connect(path, create=True)
    assert sqlite_schema.migrate(conn) == len(sqlite_schema.MIGRATIONS)
    assert sqlite_schema.migrate(conn) == len(sqlite_schema.MIGRATIONS)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(sqlite_schema.MIGRATIONS)
    conn.close()


def test_the_search_index_migration_converts_an_existing_index(tmp_path, monkeypatch):
    """The step that rebuilds the search index without positions (issue 23) finds what the
    index before it found, and the triggers keep the new one as customers change."""
    step = next(
        n for n, s in enumerate(sqlite_schema.MIGRATIONS) if "DROP TABLE customer_search" in s
    )
    conn = sqlite_connections.connect(str(tmp_path / "db.sqlite3"), create=True)
    monkeypatch.setattr(sqlite_schema, "MIGRATIONS", sqlite_schema.MIGRATIONS[:step])
    sqlite_schema.migrate(conn)
    people = [
        {"customer_id": "acme-1", "name": "Acme Holdings", "email": "Ops@Acme.TEST"},
        {"customer_id": "b-2", "name": "Bolt", "legal_name": "Acmé SA"},
        {"customer_id": "c-3", "name": "École", "email": "x@holdings.test"},
    ]
    for fields in people:
        sqlite_customers.upsert_customer(conn, fields)
    expected = {
        "acme": ["acme-1"],
        "hol": ["acme-1", "c-3"],
        "holdings": ["acme-1", "c-3"],
        "école": ["c-3"],
        "acmé": ["b-2"],
        "b-2": ["b-2"],
        "ops@acme.test": ["acme-1"],
        "cme h": ["acme-1"],  # across words, not across fields
        "1acm": [],
        "nothing": [],
    }
    assert {t: found(conn, t) for t in expected} == expected
    monkeypatch.undo()
    assert sqlite_schema.migrate(conn) == len(sqlite_schema.MIGRATIONS)
    sql = "SELECT sql FROM sqlite_master WHERE name = 'customer_search'"
    assert "detail=none, columnsize=0" in conn.execute(sql).fetchone()[0]
    assert {t: found(conn, t) for t in expected} == expected
    sqlite_customers.upsert_customer(conn, {"customer_id": "acme-1", "name": "Renamed"})
    sqlite_customers.upsert_customer(conn, {"customer_id": "d-4", "name": "Acme Two"})
    sqlite_customers.delete_customer(conn, "c-3")
    assert found(conn, "acme") == ["acme-1", "d-4"]  # by its customer_id, and the new one
    assert found(conn, "holdings") == found(conn, "cme h") == []
    assert found(conn, "renamed") == ["acme-1"]
    conn.execute("INSERT INTO customer_search (customer_search) VALUES ('integrity-check')")
    conn.close()


def test_a_search_finds_the_term_not_only_its_trigrams(conn):
    for customer_id, name in [("t-1", "Abcx Defy"), ("t-2", "xABCDEFx"), ("t-3", "def abc")]:
        sqlite_customers.upsert_customer(conn, {"customer_id": customer_id, "name": name})
    assert found(conn, "abcdef") == ["t-2"]
    assert found(conn, "abc") == ["t-1", "t-2", "t-3"]  # one trigram: the index alone
    assert found(conn, "bcx d") == ["t-1"]
    assert found(conn, "c de") == []


def found(conn: sqlite3.Connection, term: str) -> list[str]:
    """The customer_ids a search term selects through the index, checked against its count."""
    filters = Filters(search=storage.fold(term))
    where, params = sqlite_customers.filter_sql(filters)
    sql = f"SELECT customer_id FROM customers WHERE {where} ORDER BY customer_id"
    ids = [row[0] for row in conn.execute(sql, params)]
    assert sqlite_customers.count_selected(conn, filters) == len(ids)
    return ids


def test_connect_sets_wal_synchronous_and_timeout(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    full = sqlite_connections.connect(path, create=True)
    assert full.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # FULL: SQLite commits as NORMAL, and write() fsyncs the WAL after the commit.
    assert full.execute("PRAGMA synchronous").fetchone()[0] == 1
    sqlite_schema.migrate(full)
    sqlite_customers.upsert_customer(full, ALICE)
    assert os.fstat(full.durability.wal_fd).st_ino == os.stat(path + "-wal").st_ino
    with open(path + "-sync", "rb") as counters:
        started, finished = struct.unpack("qq", counters.read())
    assert started == finished >= 1  # the write waited for an fsync of the WAL
    normal = sqlite_connections.connect(path, synchronous="NORMAL")
    assert normal.execute("PRAGMA synchronous").fetchone()[0] == 1
    assert normal.durability is None
    with pytest.raises(ValueError):
        sqlite_connections.connect(path, synchronous="OFF")


def test_connect_refuses_a_missing_file_unless_asked_to_create(tmp_path):
    path = tmp_path / "db.sqlite3"
    with pytest.raises(sqlite_connections.DatabaseMissing):
        sqlite_connections.connect(str(path))
    assert not path.exists()
    sqlite_connections.connect(str(path), create=True).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_write_lock_held_past_the_timeout_raises_operational_error(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    conn = sqlite_connections.connect(path, create=True, timeout=0.05)
    sqlite_schema.migrate(conn)
    blocker = sqlite3.connect(path)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sqlite_customers.upsert_customer(conn, ALICE)
    blocker.rollback()
    assert sqlite_customers.upsert_customer(conn, ALICE)["name"] == "Alice"


def test_rows_have_exactly_the_customer_objects_keys(conn):
    from customers_service.schemas import CustomerSchema

    row = sqlite_customers.upsert_customer(conn, ALICE)
    assert list(row) == list(storage.COLUMNS)
    assert set(storage.COLUMNS) == set(CustomerSchema().fields)
    text = {column: value for column, value in row.items() if column != "metadata"}
    assert all(value is None or isinstance(value, str) for value in text.values())
    assert row["metadata"] == {}


def test_a_frozen_holder_of_the_fsync_lock_delays_a_write_only_briefly(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    conn = sqlite_connections.connect(path, create=True)
    sqlite_schema.migrate(conn)
    sqlite_customers.upsert_customer(conn, ALICE)
    frozen = os.open(path + "-sync", os.O_RDWR)  # as a process stopped mid-fsync would hold it
    fcntl.flock(frozen, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        sqlite_customers.upsert_customer(conn, {"customer_id": "bob", "name": "Bob"})
        assert time.monotonic() - started < 0.5
    finally:
        os.close(frozen)
    assert sqlite_customers.get_customer(conn, "bob")["name"] == "Bob"


def test_a_database_of_the_first_version_is_migrated_with_its_data(tmp_path):
    path = str(tmp_path / "old.sqlite3")
    with sqlite3.connect(path) as old:  # as version 1 of this service left it
        for statement in sqlite_schema.MIGRATIONS[0]:
            old.execute(statement)
        old.execute("PRAGMA user_version = 1")
        old.execute(
            "INSERT INTO customers (lago_id, customer_id, name, created_at, updated_at) "
            "VALUES ('l-1', 'kept', 'Kept', '2022-04-29T08:59:51Z', '2022-04-29T08:59:51Z')"
        )
        old.execute(
            "INSERT INTO customers (lago_id, customer_id, name, email, created_at, updated_at) "
            "VALUES ('l-2', 'ÉCOLE-2', 'Straße', 'Ö@X.EXAMPLE', '2022-04-29T08:59:52Z', "
            "'2022-04-29T08:59:52Z')"
        )
    conn = sqlite_connections.connect(path)
    assert sqlite_schema.migrate(conn) == len(sqlite_schema.MIGRATIONS)
    assert sqlite_customers.get_customer(conn, "kept")["name"] == "Kept"
    assert sqlite_customers.get_customer(conn, "kept")["metadata"] == {}
    assert sqlite_customers.list_customers(conn, 1, 20, NO_FILTERS)[1] == 2
    sqlite_connections.check_health(conn, 0)  # the probe table of version 2 is there
    # Version 3's folded copies and indexes cover the customers stored before it.
    for filters in (
        Filters(search=storage.fold("école")),
        Filters(search=storage.fold("STRASSE")),
        Filters(email=storage.fold("ö@x.example")),
    ):
        customers, total = sqlite_customers.list_customers(conn, 1, 20, filters)
        assert [c["customer_id"] for c in customers] == ["ÉCOLE-2"] and total == 1
    sqlite_customers.upsert_customer(
        conn, {"customer_id": "kept", "name": "Kept", "metadata": {"a": "1"}}
    )
    customers, _ = sqlite_customers.list_customers(conn, 1, 20, Filters(metadata={"a": "1"}))
    assert [c["customer_id"] for c in customers] == ["kept"]

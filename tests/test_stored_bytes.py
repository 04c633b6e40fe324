"""Stored bodies: each customer's JSON object is kept with its row, and every answer made of them
is byte for byte what the API answered when it built each object from its row (issue 23)."""

import json
import os
import signal
import sqlite3
import threading
import uuid
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.databases import Backend
from support.postgres_cluster import psycopg_connect
from support.service import AUTH, post_customer

from customers_service import bulk_import, database, storage
from customers_service.backends import shared
from customers_service.backends.postgres import schema as pg_schema
from customers_service.backends.sqlite import connections as sqlite_connections
from customers_service.backends.sqlite import customers as sqlite_customers
from customers_service.backends.sqlite import schema as sqlite_schema
from customers_service.responses import json_response
from customers_service.storage import encode_json as _encode

API_TIME = 'YYYY-MM-DD"T"HH24:MI:SS"Z"'  # how PostgreSQL's times are written as API text
HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text as hard as JSON gets: quotes, backslashes, controls, DEL, the line separators JavaScript
# minds, non-ASCII and astral characters, among any other character but NUL (which neither
# backend stores) and lone surrogates (which strict JSON refuses).
HARD = '"\\/\b\f\n\r\t\x01\x1f\x7f\x80\xe9\u2028\u2029\ufeff\uffff\U0001f600\U0010ffff'
characters = st.sampled_from(HARD) | st.characters(
    blacklist_categories=("Cs",), blacklist_characters="\0"
)
texts = st.text(characters, max_size=40)
non_blank = st.text(characters, min_size=1, max_size=40).filter(str.strip)
metadata_keys = st.text(characters, min_size=1, max_size=40).filter(
    lambda key: key.strip() and not {"[", "]"} & set(key)
)
patches = st.dictionaries(metadata_keys, st.none() | texts, max_size=6)
FREE_TEXT = [f for f in storage.OPTIONAL_FIELDS if f not in ("country", "email", "url", "logo_url")]
customers = st.fixed_dictionaries(
    {"customer_id": non_blank, "name": non_blank},
    optional={
        "metadata": st.none() | patches,
        "country": st.none() | st.sampled_from(["US", "fr", "De"]),
        "email": st.none() | st.sampled_from(["dinesh@piedpiper.test", "a.b+c@example.fr"]),
        "url": st.none() | st.just('http://hooli.com/é?q="x"'),
        "logo_url": st.none() | st.just("https://hooli.com/logo.png"),
        **{field: st.none() | texts for field in FREE_TEXT},
    },
)


def today(backend: Backend, customer_id: str | None = None) -> list[dict]:
    """Customers as the API built them before bodies were stored: each row read as a dict, its
    values as the API wrote them (times as API text, metadata's keys in code point order),
    newest first as the list orders them; one customer's only, when given its id."""
    columns = ", ".join(storage.COLUMNS)
    if backend.name == "postgres":
        times = [f"""to_char({c} AT TIME ZONE 'UTC', '{API_TIME}')""" for c in storage.COLUMNS[-2:]]
        columns = ", ".join(["lago_id::text", *storage.FIELDS, "metadata", *times])
    where = "WHERE customer_id = ?" if customer_id is not None else ""
    rows = backend.fetch(
        f"SELECT {columns} FROM customers {where} ORDER BY created_at DESC, id DESC",
        (customer_id,) if customer_id is not None else (),
    )
    found = []
    for row in rows:
        customer = dict(zip(storage.COLUMNS, row, strict=True))
        metadata = customer["metadata"]
        metadata = json.loads(metadata) if isinstance(metadata, str) else metadata
        customer["metadata"] = dict(sorted(metadata.items()))
        found.append(customer)
    return found


def bodies(backend: Backend) -> dict[str, str]:
    """Each customer's stored body, by customer_id."""
    return dict(backend.fetch("SELECT customer_id, body FROM customers"))


def answered(app, body: dict) -> bytes:
    """What json_response answers for ``body``: the API's bytes before bodies were stored."""
    with app.app_context():
        return json_response(body).get_data()


def path(customer_id: str) -> str:
    return "/api/v1/customers/" + quote(customer_id, safe="")


@HYPOTHESIS
@given(first=customers, second=customers, patch=customers)
def test_stored_bodies_and_every_answer_are_the_bytes_of_before(
    app, client, backend, first, second, patch
):
    """Two customers, then an update of the first with another's keys (a metadata patch among
    them): each stored body is the encoder's bytes for its row, and the upsert, GET one, the
    list's page and the delete answer what json_response answers for the objects."""
    patch = {**patch, "customer_id": first["customer_id"]}
    for sent in (first, second, patch):
        response = post_customer(client, sent)
        assert response.status_code == 200, response.get_json()
        (customer,) = today(backend, sent["customer_id"])
        assert response.data == answered(app, {"customer": customer})
    everyone = today(backend)
    stored = bodies(backend)
    for customer in everyone:
        assert stored[customer["customer_id"]] == _encode(customer)
        got = client.get(path(customer["customer_id"]), headers=AUTH)
        assert got.data == answered(app, {"customer": customer})
    meta = {
        "current_page": 1,
        "next_page": None,
        "prev_page": None,
        "total_pages": 1,
        "total_count": len(everyone),
    }
    page = client.get("/api/v1/customers", headers=AUTH)
    assert page.data == answered(app, {"customers": everyone, "meta": meta})
    one_per_page = client.get("/api/v1/customers?per_page=1&page=1", headers=AUTH)
    meta = {**meta, "next_page": 2 if len(everyone) > 1 else None}
    meta.update(total_pages=len(everyone))
    assert one_per_page.data == answered(app, {"customers": everyone[:1], "meta": meta})
    for customer in everyone:
        deleted = client.delete(path(customer["customer_id"]), headers=AUTH)
        assert deleted.data == answered(app, {"customer": customer})


# A customer's fields: the two required ones, then the optional ones, any of them null.
field_values = st.tuples(texts, texts, *[st.none() | texts] * len(storage.OPTIONAL_FIELDS))


@HYPOTHESIS
@given(batch=st.lists(customers, min_size=1, max_size=5, unique_by=lambda c: c["customer_id"]))
def test_an_imports_bodies_made_by_its_workers_are_the_bytes_of_before(app, backend, batch):
    """The import's workers make each created customer's body on SQLite (check_rows), none on
    PostgreSQL, whose generated column makes it; stored, each is the encoder's bytes for its
    row, as the API's own upsert writes it."""
    made = storage.load_backend(backend.name).IMPORT_BODIES
    numbered = [(n, customer, None) for n, customer in enumerate(batch)]
    checked = bulk_import.check_rows(numbered, bodies=made)
    rows = [dict(zip(shared.UPSERT_PARAMS, values, strict=True)) for _, _, values, _ in checked]
    # The API's schema takes every generated customer.
    assert [bool(row["body"]) for row in rows] == [made] * len(batch)
    with app.app_context():
        store = database.open_store(app)
        try:
            store.import_batch(rows)
        finally:
            store.close()
    stored = bodies(backend)
    # Examples share the database: a customer_id seen before is updated, its body made by SQL.
    for customer in today(backend):
        assert stored[customer["customer_id"]] == _encode(customer)


def a_customer(values: tuple, metadata: dict) -> dict:
    """A customer object as the API built it, with these fields and this metadata stored."""
    customer = {"lago_id": str(uuid.uuid4()), **dict(zip(storage.FIELDS, values, strict=True))}
    customer["metadata"] = dict(sorted((k, v) for k, v in metadata.items() if v is not None))
    customer.update(created_at="2022-04-29T08:59:51Z", updated_at="9999-12-31T23:59:59Z")
    return customer


@settings(max_examples=300, deadline=None)
@given(values=field_values, metadata=patches)
def test_sqlites_body_function_writes_what_the_api_encoder_writes(values, metadata):
    customer = a_customer(values, metadata)
    row = [*customer.values()]
    row[storage.COLUMNS.index("metadata")] = shared.metadata_json(customer["metadata"])
    assert shared.customer_body(*row) == _encode(customer)


@pytest.fixture
def pg_conn(postgres):
    """A connection to a fresh migrated PostgreSQL database."""
    name = postgres.new_database()
    with psycopg_connect(postgres.url(name)) as conn:
        yield conn
    postgres.drop_database(name)


@pytest.mark.postgres
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=field_values, metadata=patches)
def test_postgres_body_function_writes_what_the_api_encoder_writes(pg_conn, values, metadata):
    customer = a_customer(values, metadata)
    row = [*customer.values()]
    row[storage.COLUMNS.index("metadata")] = json.dumps(customer["metadata"])
    arguments = ", ".join(
        f"%s::{pg_schema.COLUMN_TYPES.get(column, 'text')}" for column in storage.COLUMNS
    )
    (body,) = pg_conn.execute(f"SELECT customers_body({arguments})", row).fetchone()
    assert body == _encode(customer)


# Rows stored before bodies were: non-ASCII, astral, escapes, metadata keys out of order.
OLD_ROWS = [
    ("0190b8f4-7d1e-7c3a-9d2e-2f1c4b5a6d70", "école-1", 'Zoë "Q" \\ Ünal', "FR", "Île\n", "2"),
    ("0190b8f4-7d1e-7c3a-9d2e-2f1c4b5a6d71", "plain", "Plain", None, None, None),
    ("0190b8f4-7d1e-7c3a-9d2e-2f1c4b5a6d72", "emoji-\U0001f600", "\x7f\x01\u2028", "JP", "", ""),
]
OLD_METADATA = {"école-1": {"zeta": "1", "Alpha": "é", "beta": "\U0001f600"}, "plain": {}}


def steps_before_bodies(schema) -> tuple:
    """A backend's migrations up to the step that adds the body column, not included."""
    for number, step in enumerate(schema.MIGRATIONS):
        if any(isinstance(s, str) and "ADD COLUMN body" in s for s in step):
            return schema.MIGRATIONS[:number]
    raise LookupError("no migration adds the body column")


def test_sqlite_migration_fills_every_body_and_records_no_event(tmp_path, monkeypatch):
    path_ = str(tmp_path / "old.sqlite3")
    conn = sqlite_connections.connect(path_, create=True)
    monkeypatch.setattr(sqlite_schema, "MIGRATIONS", steps_before_bodies(sqlite_schema))
    sqlite_schema.migrate(conn)  # the schema before bodies
    with conn:
        for lago_id, customer_id, name, country, city, zipcode in OLD_ROWS:
            conn.execute(
                "INSERT INTO customers (lago_id, customer_id, name, country, city, zipcode, "
                "metadata, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    lago_id,
                    customer_id,
                    name,
                    country,
                    city,
                    zipcode,
                    json.dumps(OLD_METADATA.get(customer_id, {}), ensure_ascii=False),
                    "2022-04-29T08:59:51Z",
                    "2022-04-30T08:59:51Z",
                ),
            )
    events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    monkeypatch.undo()
    assert sqlite_schema.migrate(conn) == len(sqlite_schema.MIGRATIONS)
    backend = Backend("sqlite", {}, sqlite_path=path_)
    stored = bodies(backend)
    assert {c["customer_id"]: _encode(c) for c in today(backend)} == stored
    assert "\\u00e9cole-1" in stored["école-1"] and "\\ud83d\\ude00" in stored["emoji-\U0001f600"]
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == events
    assert sqlite_customers.get_customer(conn, "école-1").body == stored["école-1"]
    conn.close()


@pytest.mark.postgres
def test_postgres_migration_fills_every_body_and_records_no_event(postgres, monkeypatch):
    from customers_service.backends.postgres import connections as pg_connections
    from customers_service.backends.postgres import customers as pg_customers

    name = postgres.new_database(migrated=False)
    conn = pg_connections.connect(postgres.url(name))
    try:
        monkeypatch.setattr(pg_schema, "MIGRATIONS", steps_before_bodies(pg_schema))
        pg_schema.migrate(conn)  # the schema before bodies
        with conn.transaction():
            for lago_id, customer_id, name_, country, city, zipcode in OLD_ROWS:
                conn.execute(
                    "INSERT INTO customers (lago_id, customer_id, name, country, city, zipcode, "
                    "metadata, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, "
                    "'2022-04-29T08:59:51Z', '2022-04-30T08:59:51.75Z')",
                    (
                        lago_id,
                        customer_id,
                        name_,
                        country,
                        city,
                        zipcode,
                        json.dumps(OLD_METADATA.get(customer_id, {})),
                    ),
                )
        events = conn.execute("SELECT count(*) FROM events").fetchone()["count"]
        monkeypatch.undo()
        assert pg_schema.migrate(conn) == len(pg_schema.MIGRATIONS)
        backend = Backend("postgres", {}, url=postgres.url(name))
        stored = bodies(backend)
        assert {c["customer_id"]: _encode(c) for c in today(backend)} == stored
        assert '"updated_at":"2022-04-30T08:59:51Z"' in stored["plain"]
        assert conn.execute("SELECT count(*) FROM events").fetchone()["count"] == events
        assert pg_customers.get_customer(conn, "école-1").body == stored["école-1"]
    finally:
        conn.close()
        postgres.drop_database(name)


def test_a_customer_changed_by_sql_outside_the_service_is_answered_as_it_now_is(
    app, client, backend
):
    """An INSERT without a body and an UPDATE of a column, by plain SQL on a connection of the
    database's own driver: the answers follow the columns, and the update is one event."""
    post_customer(client, {"customer_id": "c1", "name": "Before", "metadata": {"k": "v"}})
    backend.execute_many("UPDATE customers SET name = ? WHERE customer_id = ?", [("Aftër", "c1")])
    backend.execute_many(
        "INSERT INTO customers (lago_id, customer_id, name, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?)",
        [
            (
                "0190b8f4-7d1e-7c3a-9d2e-2f1c4b5a6d7f",
                "c2",
                "Ínserted",
                "2022-01-01T00:00:00Z",
                "2022-01-02T00:00:00Z",
            )
        ],
    )
    everyone = today(backend)
    assert [c["name"] for c in everyone] == ["Aftër", "Ínserted"]
    for customer in everyone:
        got = client.get(path(customer["customer_id"]), headers=AUTH)
        assert got.data == answered(app, {"customer": customer})
    meta = {"current_page": 1, "next_page": None, "prev_page": None, "total_pages": 1}
    meta["total_count"] = 2
    page = client.get("/api/v1/customers", headers=AUTH)
    assert page.data == answered(app, {"customers": everyone, "meta": meta})
    kinds = [kind for (kind,) in backend.fetch("SELECT webhook_type FROM events ORDER BY 1")]
    assert kinds == ["customer.created", "customer.created", "customer.updated"]


def test_sqlite_reads_columns_when_a_writer_left_no_body(db_path, app, client):
    """A row another program inserted without its body is answered from its columns."""
    post_customer(client, {"customer_id": "c1", "name": "N"})
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE customers SET body = NULL")
    (customer,) = today(Backend("sqlite", {}, sqlite_path=db_path))
    assert client.get(path("c1"), headers=AUTH).data == answered(app, {"customer": customer})


def test_a_ctrl_c_while_sqlite_writes_a_body_is_raised_when_the_statement_ends(conn, monkeypatch):
    """sqlite3 drops what a function raises: a Ctrl-C that Python handles inside customer_json
    is raised once the statement has ended, as one handled while SQLite's own code runs."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled in the main thread only")
    body = sqlite_connections.customer_body

    def interrupted(*values):
        signal.raise_signal(signal.SIGINT)  # handled at Python's next check: in here
        return body(*values)

    monkeypatch.setattr(sqlite_connections, "customer_body", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sqlite_customers.upsert_customer(conn, {"customer_id": "c1", "name": "Né"})
    monkeypatch.undo()
    stored = sqlite_customers.get_customer(conn, "c1")  # the statement ran to its end
    assert stored["name"] == "Né" and '"name":"N\\u00e9"' in stored.body

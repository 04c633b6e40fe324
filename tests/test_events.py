"""The events feed: one event per change, written in the change's transaction; GET
/api/v1/events, its paging, its 410 after pruning; and the commit order with concurrent writers
in several processes (several hosts: tests/test_hosts.py)."""

import json
import re
import time
import uuid

import pytest
from support.data import SEED
from support.load import run_writers_and_a_consumer
from support.postgres_cluster import psycopg_connect
from support.service import AUTH, post_customer, started_app

from customers_service import database, storage
from customers_service.backends import shared

EVENT_KEYS = ["id", "sequence", "webhook_type", "object_type", "created_at", "customer"]
API_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def feed(client, **params) -> dict:
    """One page of the feed, which must be a 200."""
    response = client.get("/api/v1/events", query_string=params, headers=AUTH)
    assert response.status_code == 200, response.json
    return response.json


def all_events(client, after: int = 0) -> list[dict]:
    """Every event after ``after``, walked page by page as a consumer does."""
    events = []
    while True:
        page = feed(client, after=after, limit=7)
        events += page["events"]
        after = page["meta"]["last_sequence"]
        if not page["meta"]["has_more"]:
            return events


def test_each_create_update_and_delete_records_one_event_with_the_customer(client):
    created = post_customer(client, SEED).json["customer"]
    time.sleep(1.1)  # so that the update's updated_at differs
    updated = post_customer(client, {"customer_id": SEED["customer_id"], "name": "New"})
    unchanged = post_customer(client, {"customer_id": SEED["customer_id"], "name": "New"})
    deleted = client.delete(f"/api/v1/customers/{SEED['customer_id']}", headers=AUTH)
    events = all_events(client)
    assert [e["webhook_type"] for e in events] == [
        "customer.created",
        "customer.updated",
        "customer.deleted",  # the POST that changed nothing recorded none
    ]
    assert unchanged.json == updated.json
    assert [e["customer"] for e in events] == [
        created,
        updated.json["customer"],
        deleted.json["customer"],  # as it was
    ]
    for event in events:
        assert list(event) == EVENT_KEYS
        assert event["object_type"] == "customer"
        assert uuid.UUID(event["id"])
        assert API_TIME.fullmatch(event["created_at"])
    assert events[0]["created_at"] == created["updated_at"]
    assert events[1]["created_at"] == updated.json["customer"]["updated_at"]
    assert events[2]["created_at"] >= events[1]["created_at"]
    assert len({e["id"] for e in events}) == 3
    sequences = [e["sequence"] for e in events]
    assert sequences == sorted(set(sequences))


def test_the_event_carries_metadata_in_code_point_order(client):
    metadata = {"b": "2", "a": "1", "ab": None, "Z": "0"}
    response = post_customer(client, {"customer_id": "m", "name": "M", "metadata": metadata})
    (event,) = all_events(client)
    assert list(event["customer"]["metadata"]) == ["Z", "a", "b"]
    assert event["customer"] == response.json["customer"]


def test_a_refused_request_records_no_event(client):
    post_customer(
        client, {"customer_id": "full", "name": "F", "metadata": {f"k{i}": "v" for i in range(50)}}
    )
    before = all_events(client)
    assert post_customer(client, {"customer_id": "x"}).status_code == 422  # no name
    too_many = {"customer_id": "full", "name": "G", "metadata": {"one_more": "v"}}
    assert post_customer(client, too_many).status_code == 422  # past 50 keys after the merge
    assert client.delete("/api/v1/customers/nobody", headers=AUTH).status_code == 404
    assert all_events(client) == before


def test_an_import_records_one_event_per_row_and_none_for_a_refused_row(client, runner, tmp_path):
    post_customer(client, {"customer_id": "a", "name": "Before"})
    rows = [
        {"customer_id": "a", "name": "A"},
        {"customer_id": "b", "name": "B"},
        {"customer_id": "c"},  # refused: no name
        {"customer_id": "b", "name": "B2"},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"customer": row}) + "\n" for row in rows))
    result = runner.invoke(args=["customers", "import", str(source)])
    assert result.exit_code == 1, result.output  # one row refused
    events = all_events(client)
    assert [(e["webhook_type"], e["customer"]["name"]) for e in events] == [
        ("customer.created", "Before"),
        ("customer.updated", "A"),
        ("customer.created", "B"),
        ("customer.updated", "B2"),
    ]


def test_an_import_row_the_database_refuses_records_no_event(client, runner, tmp_path):
    taken = post_customer(client, {"customer_id": "owner", "name": "O"}).json["customer"]
    rows = [
        {"customer_id": "fine", "name": "F"},
        {"customer_id": "thief", "name": "T", "lago_id": taken["lago_id"]},  # lago_id_taken
        {"customer_id": "fine2", "name": "F2"},
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"customer": row}) + "\n" for row in rows))
    result = runner.invoke(args=["customers", "import", str(source)])
    assert result.exit_code == 1 and "lago_id_taken" in result.output, result.output
    events = all_events(client)
    assert [e["customer"]["customer_id"] for e in events] == ["owner", "fine", "fine2"]


def test_the_feed_pages_with_after_and_limit(client):
    for n in range(5):
        post_customer(client, {"customer_id": f"p{n}", "name": "P"})
    first = feed(client, limit=2)
    assert [e["customer"]["customer_id"] for e in first["events"]] == ["p0", "p1"]
    assert first["meta"] == {"last_sequence": first["events"][-1]["sequence"], "has_more": True}
    second = feed(client, after=first["meta"]["last_sequence"], limit=2)
    assert [e["customer"]["customer_id"] for e in second["events"]] == ["p2", "p3"]
    third = feed(client, after=second["meta"]["last_sequence"], limit=2)
    assert [e["customer"]["customer_id"] for e in third["events"]] == ["p4"]
    last = third["meta"]["last_sequence"]
    assert third["meta"] == {"last_sequence": last, "has_more": False}
    assert feed(client, after=last) == {
        "events": [],
        "meta": {"last_sequence": last, "has_more": False},
    }
    assert feed(client, after=10**12)["meta"] == {"last_sequence": 10**12, "has_more": False}
    huge = 10**30  # past every backend's integers: still just nothing after it
    assert feed(client, after=huge)["meta"] == {"last_sequence": huge, "has_more": False}
    assert len(feed(client)["events"]) == 5  # the defaults: from the oldest, up to 100


@pytest.mark.parametrize(
    "query, details",
    [
        ("after=-1", {"after": ["must_be_at_least_0"]}),
        ("after=x", {"after": ["invalid_integer"]}),
        ("after=", {"after": ["invalid_integer"]}),
        ("after=1.0", {"after": ["invalid_integer"]}),
        ("limit=0", {"limit": ["must_be_between_1_and_1000"]}),
        ("limit=1001", {"limit": ["must_be_between_1_and_1000"]}),
        ("after=1&after=2", {"after": ["repeated_parameter"]}),
        ("page=2", {"page": ["unknown_parameter"]}),
        ("limit=5&since=3", {"since": ["unknown_parameter"]}),
    ],
)
def test_a_bad_feed_query_is_invalid_pagination(client, query, details):
    response = client.get(f"/api/v1/events?{query}", headers=AUTH)
    assert response.status_code == 400
    assert response.json["code"] == "invalid_pagination"
    assert response.json["error_details"] == details


def test_the_feed_needs_an_api_key(client):
    assert client.get("/api/v1/events").status_code == 401


def test_pruned_events_are_410_behind_them_and_after_0_starts_at_the_oldest(
    app, client, runner, backend
):
    for n in range(6):
        post_customer(client, {"customer_id": f"old{n}", "name": "O"})
    sequences = [e["sequence"] for e in all_events(client)]
    # The first three were recorded 31 days ago; the rest now.
    backend.execute_many(
        "UPDATE events SET recorded_at = ? WHERE sequence = ?",
        [(time.time() - 31 * 86400, s) for s in sequences[:3]],
    )
    result = runner.invoke(args=["customers", "prune-events"])
    assert result.exit_code == 0 and "Removed 3 events" in result.output, result.output
    assert [e["sequence"] for e in all_events(client)] == sequences[3:]
    for behind in (1, sequences[2] - 1):
        response = client.get(f"/api/v1/events?after={behind}", headers=AUTH)
        assert response.status_code == 410
        assert response.json["code"] == "events_expired"
    assert [e["sequence"] for e in all_events(client, after=sequences[2])] == sequences[3:]
    # All pruned: a new change still takes a number above every one handed out.
    backend.execute_many("UPDATE events SET recorded_at = ?", [(0.0,)])
    assert "Removed 3 events" in runner.invoke(args=["customers", "prune-events"]).output
    post_customer(client, {"customer_id": "new", "name": "N"})
    (event,) = all_events(client)
    assert event["sequence"] > sequences[-1]


def test_the_retention_comes_from_the_setting(app, client, runner, backend):
    post_customer(client, {"customer_id": "r", "name": "R"})
    backend.execute_many("UPDATE events SET recorded_at = ?", [(time.time() - 2 * 86400,)])
    assert "Removed 0 events" in runner.invoke(args=["customers", "prune-events"]).output
    app.config["CUSTOMERS_EVENT_RETENTION_DAYS"] = 1
    assert "Removed 1 events" in runner.invoke(args=["customers", "prune-events"]).output


@pytest.mark.system
def test_a_consumer_paging_during_concurrent_writes_sees_every_change_once_in_order(server):
    """Six writers on gunicorn's two worker processes, a consumer paging all along."""
    run_writers_and_a_consumer(server.url, [server.url] * 6, count=60)


@pytest.mark.postgres
def test_postgres_feed_never_hands_out_a_number_above_one_still_in_flight(postgres):
    """The window the gate closes, held open on purpose: a transaction takes its number (its
    event's trigger made to fire at once with SET CONSTRAINTS ... IMMEDIATE, where it would
    otherwise fire at commit) and stays open while a later one commits. Until the earlier
    transaction ends, the feed must not hand out the later number: it waits for the gate 100 ms
    at most, then answers an empty page; once the earlier commits, it hands out both in order."""
    name = postgres.new_database()
    url = postgres.url(name)
    try:
        config = {"CUSTOMERS_DATABASE_URL": url, "CUSTOMERS_API_KEYS": AUTH["Authorization"][7:]}
        client = started_app(config).test_client()
        with psycopg_connect(url) as early:
            early.execute("BEGIN")
            early.execute("SET CONSTRAINTS customers_events IMMEDIATE")
            early.execute(
                "INSERT INTO customers (lago_id, customer_id, name, created_at, updated_at)"
                " VALUES (gen_random_uuid(), 'early', 'E', now(), now())"
            )
            assert post_customer(client, {"customer_id": "late", "name": "L"}).status_code == 200
            started = time.monotonic()
            while_open = feed(client)
            waited = time.monotonic() - started
            assert post_customer(client, {"customer_id": "later", "name": "L"}).status_code == 200
            early.execute("COMMIT")
        assert while_open == {"events": [], "meta": {"last_sequence": 0, "has_more": False}}
        assert waited >= 0.1  # it waited for the gate before giving up
        after_commit = [e["customer"]["customer_id"] for e in feed(client)["events"]]
        assert after_commit == ["early", "late", "later"]
    finally:
        database.close_connections()
        postgres.drop_database(name)


def test_prune_events_removes_them_all_however_many(app, client, runner, backend):
    store = database.open_store(app)
    try:
        now = storage.utc_now()
        for start in range(0, 12_000, 4000):
            rows = [
                shared.upsert_params({"customer_id": f"many{i}", "name": "M"}, now)
                for i in range(start, start + 4000)
            ]
            store.import_batch(rows)
    finally:
        store.close()
    backend.execute_many("UPDATE events SET recorded_at = ?", [(0.0,)])
    result = runner.invoke(args=["customers", "prune-events"])  # past one call's 10,000
    assert "Removed 12000 events" in result.output, result.output
    assert feed(client)["events"] == []

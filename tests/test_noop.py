"""An upsert that changes nothing writes nothing (contract, Upsert): updated_at kept, no event,
no webhook queued, the customer as stored in the 200; the same for an import's rows; and the
check is one statement with the write, so no concurrent change is lost or hidden."""

import json
import random
import threading

import pytest
from support.service import AUTH, post_customer

from customers_service.backends.postgres import customers as postgres_customers
from customers_service.backends.sqlite import customers as sqlite_customers

LATER = "2030-01-01T00:00:00Z"


def all_events(client) -> list[dict]:
    """Every event of the feed, oldest first."""
    response = client.get("/api/v1/events", query_string={"limit": 1000}, headers=AUTH)
    assert response.status_code == 200
    return response.get_json()["events"]


@pytest.fixture
def later(monkeypatch):
    """From now on, the backends write a later time: an update shows in updated_at."""
    for module in (sqlite_customers, postgres_customers):
        monkeypatch.setattr(module, "utc_now", lambda: LATER)


STORED = {
    "customer_id": "c-1",
    "name": "Zoë",
    "country": "FR",
    "email": "zoe@example.com",
    "city": None,
    "metadata": {"plan": "gold", "seats": "3"},
}


@pytest.mark.parametrize(
    "same",
    [
        {"customer_id": "c-1", "name": "Zoë"},  # absent keys keep their values
        {**STORED, "country": "fr"},  # stored upper-cased
        {"customer_id": "c-1", "name": "Zoë", "city": None},  # null where null is stored
        {"customer_id": "c-1", "name": "Zoë", "metadata": {"plan": "gold"}},  # a patch, the same
        {"customer_id": "c-1", "name": "Zoë", "metadata": {"gone": None}},  # removes nothing
        {"customer_id": "c-1", "name": "Zoë", "metadata": {}},
    ],
)
def test_an_upsert_that_changes_nothing_writes_nothing(client, later, same):
    stored = post_customer(client, STORED).get_json()["customer"]
    response = post_customer(client, same)
    assert response.status_code == 200
    assert response.get_json() == {"customer": stored}  # updated_at kept
    assert [e["webhook_type"] for e in all_events(client)] == ["customer.created"]
    assert client.get("/api/v1/customers/c-1", headers=AUTH).get_json() == {"customer": stored}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"name": "Zoe"}, {"name": "Zoe"}),
        ({"city": "Paris"}, {"city": "Paris"}),
        ({"email": None}, {"email": None}),
        ({"email": "ZOE@example.com"}, {"email": "ZOE@example.com"}),  # case is a change
        ({"metadata": {"plan": "free"}}, {"metadata": {"plan": "free", "seats": "3"}}),
        ({"metadata": {"seats": None}}, {"metadata": {"plan": "gold"}}),
        ({"metadata": {"new": "1"}}, {"metadata": {"new": "1", "plan": "gold", "seats": "3"}}),
        ({"metadata": None}, {"metadata": {}}),
    ],
)
def test_an_upsert_that_changes_one_thing_writes_it(client, later, change, expected):
    stored = post_customer(client, STORED).get_json()["customer"]
    response = post_customer(client, {"customer_id": "c-1", "name": "Zoë", **change})
    assert response.status_code == 200
    assert response.get_json() == {"customer": {**stored, **expected, "updated_at": LATER}}
    events = all_events(client)
    assert [e["webhook_type"] for e in events] == ["customer.created", "customer.updated"]
    assert events[1]["customer"] == response.get_json()["customer"]


def test_a_null_metadata_on_empty_metadata_changes_nothing(client, later):
    stored = post_customer(client, {"customer_id": "c-2", "name": "N"}).get_json()["customer"]
    response = post_customer(client, {"customer_id": "c-2", "name": "N", "metadata": None})
    assert response.get_json() == {"customer": stored}
    assert len(all_events(client)) == 1


def test_a_no_op_queues_no_webhook(client, runner, later):
    added = runner.invoke(args=["customers", "add-webhook", "http://127.0.0.1:9/hook"])
    assert added.exit_code == 0, added.output
    post_customer(client, STORED)
    post_customer(client, STORED)
    status = runner.invoke(args=["customers", "webhook-status"])
    assert status.exit_code == 0, status.output
    assert "backlog 1" in status.output or '"backlog": 1' in status.output, status.output


def test_reimporting_an_export_changes_nothing(client, runner, tmp_path):
    for i in range(5):
        post_customer(client, {**STORED, "customer_id": f"c-{i}", "metadata": {"i": str(i)}})
    before = client.get("/api/v1/customers", headers=AUTH).get_json()
    exported = runner.invoke(args=["customers", "export"])
    assert exported.exit_code == 0
    path = tmp_path / "export.jsonl"
    path.write_text(exported.stdout)
    again = runner.invoke(args=["customers", "import", str(path)])
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith("0 inserted, 0 updated, 5 unchanged, 0 rejected")
    assert client.get("/api/v1/customers", headers=AUTH).get_json() == before
    assert len(all_events(client)) == 5


def test_an_import_counts_inserted_updated_and_unchanged(client, runner, tmp_path):
    post_customer(client, {"customer_id": "same", "name": "Same"})
    post_customer(client, {"customer_id": "changed", "name": "Old"})
    rows = [
        {"customer_id": "same", "name": "Same"},
        {"customer_id": "changed", "name": "New"},
        {"customer_id": "new", "name": "New"},
        {"customer_id": "bad"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"customer": row}) + "\n" for row in rows))
    result = runner.invoke(args=["customers", "import", str(path)])
    assert result.stdout.startswith("1 inserted, 1 updated, 1 unchanged, 1 rejected"), result.output
    kinds = [e["webhook_type"] for e in all_events(client)]
    assert kinds == ["customer.created"] * 2 + ["customer.updated", "customer.created"]


def test_concurrent_no_ops_and_changes_lose_and_hide_nothing(app):
    """Threads send one customer's name as A or B at random: every 200 holds the name it sent,
    every update event changes the name (a no-op recorded none), and the last event's name is
    the one stored (no change was skipped as a no-op)."""
    client = app.test_client()
    post_customer(client, {"customer_id": "race", "name": "A"})
    answers, failures = [], []

    def send(seed: int) -> None:
        own = app.test_client()
        chooser = random.Random(seed)
        for _ in range(40):
            name = chooser.choice("AB")
            response = post_customer(own, {"customer_id": "race", "name": name})
            if response.status_code != 200:
                failures.append(response.status_code)
            answers.append((name, response.get_json()["customer"]["name"]))

    threads = [threading.Thread(target=send, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert all(sent == got for sent, got in answers)
    names = [e["customer"]["name"] for e in all_events(client)]
    assert all(a != b for a, b in zip(names, names[1:], strict=False)), names
    stored = client.get("/api/v1/customers/race", headers=AUTH).get_json()["customer"]
    assert names[-1] == stored["name"]
    assert 1 < len(names) <= 1 + len(answers)


def test_a_change_between_the_check_and_the_read_is_undone_by_the_request(
    app, db_path, monkeypatch
):
    """SQLite reads a no-op's customer with a second statement. A change between the check and
    the read: the read no longer holds what was sent, so the request runs again and makes its
    change (nothing hidden). (PostgreSQL reads it in the check's own statement.)"""
    client = app.test_client()
    post_customer(client, {"customer_id": "c", "name": "A"})
    module = sqlite_customers
    read = module.get_customer

    def changed_meanwhile(conn, customer_id):
        monkeypatch.setattr(module, "get_customer", read)
        assert (
            post_customer(app.test_client(), {"customer_id": "c", "name": "B"}).status_code == 200
        )
        return read(conn, customer_id)

    monkeypatch.setattr(module, "get_customer", changed_meanwhile)
    response = post_customer(client, {"customer_id": "c", "name": "A"})
    assert response.get_json()["customer"]["name"] == "A"
    assert module.get_customer is read  # the change came between the check and the read
    names = [(e["webhook_type"], e["customer"]["name"]) for e in all_events(client)]
    assert names == [
        ("customer.created", "A"),
        ("customer.updated", "B"),
        ("customer.updated", "A"),
    ]


def test_a_no_op_whose_read_does_not_hold_what_was_sent_checks_again_in_a_transaction(
    app, monkeypatch
):
    client = app.test_client()
    stored = post_customer(client, STORED).get_json()["customer"]
    module = postgres_customers if app.config.get("CUSTOMERS_DATABASE_URL") else sqlite_customers
    monkeypatch.setattr(module, "holds_sent", lambda customer, fields: False)
    response = post_customer(client, STORED)
    assert response.get_json() == {"customer": stored}
    assert len(all_events(client)) == 1

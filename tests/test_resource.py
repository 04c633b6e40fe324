"""GET one, GET the list, DELETE, and /health: success and error cases."""

import http.client
import json
import os
import sqlite3
from urllib.parse import quote

import pytest
import requests
from support.data import SEED
from support.load import walk_pages_while_inserting
from support.service import AUTH, post_customer

ODD_IDS = [
    "a/b",
    "/leading-slash",
    "trailing-slash/",
    "double//slash",
    "with space",
    "100%",
    "%2F already encoded",
    "what?",
    "hash#tag",
    "ünïcödé-客户-🙂",
    "..",
    ".",
    "a/../b",
    "semi;colon&amp=x+y",
    "tab\there",
    "quote\"'`",
    "back\\slash",
]


def customer_url(customer_id: str) -> str:
    return "/api/v1/customers/" + quote(customer_id, safe="")


def test_get_returns_the_customer(client):
    created = post_customer(client, SEED).get_json()
    response = client.get(customer_url(SEED["customer_id"]), headers=AUTH)
    assert response.status_code == 200
    assert response.get_json() == created


def test_get_unknown_customer_is_404(client):
    response = client.get(customer_url("nobody"), headers=AUTH)
    assert response.status_code == 404
    assert response.get_json() == {
        "status": 404,
        "error": "Not Found",
        "code": "customer_not_found",
        "message": "no customer has that customer_id",
    }


def test_delete_returns_the_customer_as_it_was_then_404(client):
    created = post_customer(client, SEED).get_json()
    response = client.delete(customer_url(SEED["customer_id"]), headers=AUTH)
    assert response.status_code == 200
    assert response.get_json() == created
    assert client.get(customer_url(SEED["customer_id"]), headers=AUTH).status_code == 404
    again = client.delete(customer_url(SEED["customer_id"]), headers=AUTH)
    assert again.status_code == 404
    assert again.get_json()["code"] == "customer_not_found"


def test_a_deleted_customer_can_be_created_again_with_a_new_lago_id(client):
    first = post_customer(client, SEED).get_json()["customer"]
    client.delete(customer_url(SEED["customer_id"]), headers=AUTH)
    second = post_customer(client, SEED).get_json()["customer"]
    assert second["lago_id"] != first["lago_id"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/v1/customers/x"),
        ("delete", "/api/v1/customers/x"),
        ("get", "/api/v1/customers"),
    ],
)
def test_every_resource_route_needs_the_key(client, method, path):
    response = getattr(client, method)(path)
    assert response.status_code == 401
    assert response.get_json()["code"] == "unauthorized"


@pytest.mark.parametrize("customer_id", ODD_IDS)
def test_odd_customer_ids_round_trip(client, customer_id):
    assert post_customer(client, {"customer_id": customer_id, "name": "N"}).status_code == 200
    got = client.get(customer_url(customer_id), headers=AUTH)
    assert got.status_code == 200
    assert got.get_json()["customer"]["customer_id"] == customer_id
    deleted = client.delete(customer_url(customer_id), headers=AUTH)
    assert deleted.get_json()["customer"]["customer_id"] == customer_id


@pytest.mark.system
def test_odd_customer_ids_round_trip_through_gunicorn(server):
    # http.client sends the path as given; some clients would resolve "%2E%2E" away first.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

    def call(method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        headers = {**AUTH, "Content-Type": "application/json"}
        connection.request(method, path, body=json.dumps(body) if body else None, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())

    for customer_id in ODD_IDS:
        body = {"customer": {"customer_id": customer_id, "name": "N"}}
        assert call("POST", "/api/v1/customers", body)[0] == 200
        path = customer_url(customer_id)
        status, got = call("GET", path)
        assert status == 200, customer_id
        assert got["customer"]["customer_id"] == customer_id
        assert call("DELETE", path)[1]["customer"]["customer_id"] == customer_id
        assert call("GET", path)[0] == 404
    connection.close()


def make_customers(backend, count: int) -> None:
    """Insert customers straight into the database, one second apart, oldest first."""
    rows = []
    for i in range(count):
        stamp = f"2022-01-01T00:{i // 60:02d}:{i % 60:02d}Z"
        rows.append((f"00000000-0000-7000-8000-{i:012d}", f"c{i:03d}", stamp, stamp))
    backend.execute_many(
        "INSERT INTO customers (lago_id, customer_id, name, created_at, updated_at) "
        "VALUES (?, ?, 'N', ?, ?)",
        rows,
    )


def test_list_pages_newest_first_with_meta(client, backend):
    make_customers(backend, 45)
    response = client.get("/api/v1/customers?page=2&per_page=20", headers=AUTH)
    assert response.status_code == 200
    body = response.get_json()
    assert [c["customer_id"] for c in body["customers"]] == [f"c{i:03d}" for i in range(24, 4, -1)]
    assert body["meta"] == {
        "current_page": 2,
        "next_page": 3,
        "prev_page": 1,
        "total_pages": 3,
        "total_count": 45,
    }
    last = client.get("/api/v1/customers?page=3&per_page=20", headers=AUTH).get_json()
    assert [c["customer_id"] for c in last["customers"]] == [f"c{i:03d}" for i in range(4, -1, -1)]
    assert last["meta"]["next_page"] is None


def test_list_defaults_to_page_1_of_20(client):
    post_customer(client, SEED)
    body = client.get("/api/v1/customers", headers=AUTH).get_json()
    assert body["meta"] == {
        "current_page": 1,
        "next_page": None,
        "prev_page": None,
        "total_pages": 1,
        "total_count": 1,
    }
    assert body["customers"] == [
        client.get(customer_url(SEED["customer_id"]), headers=AUTH).get_json()["customer"]
    ]


def test_ties_on_created_at_are_broken_by_insertion_order(client):
    for i in range(5):  # same second, most likely: newest insert first all the same
        post_customer(client, {"customer_id": f"t{i}", "name": "N"})
    ids = [
        c["customer_id"]
        for c in client.get("/api/v1/customers", headers=AUTH).get_json()["customers"]
    ]
    assert ids == ["t4", "t3", "t2", "t1", "t0"]


def test_page_past_the_end_is_empty_with_true_totals(client):
    post_customer(client, SEED)
    for page in ("2", "99", "9" * 40):
        body = client.get(f"/api/v1/customers?page={page}", headers=AUTH).get_json()
        assert body["customers"] == []
        assert body["meta"]["total_count"] == 1
        assert body["meta"]["total_pages"] == 1


def test_empty_list(client):
    body = client.get("/api/v1/customers", headers=AUTH).get_json()
    assert body == {
        "customers": [],
        "meta": {
            "current_page": 1,
            "next_page": None,
            "prev_page": None,
            "total_pages": 0,
            "total_count": 0,
        },
    }


@pytest.mark.parametrize(
    ("query", "details"),
    [
        ("page=0", {"page": ["must_be_at_least_1"]}),
        ("page=-1", {"page": ["must_be_at_least_1"]}),
        ("page=abc", {"page": ["invalid_integer"]}),
        ("page=1.5", {"page": ["invalid_integer"]}),
        ("page=", {"page": ["invalid_integer"]}),
        ("page=%EF%BC%91", {"page": ["invalid_integer"]}),  # a full-width digit one
        ("page=+1", {"page": ["invalid_integer"]}),
        ("per_page=0", {"per_page": ["must_be_between_1_and_100"]}),
        ("per_page=101", {"per_page": ["must_be_between_1_and_100"]}),
        ("per_page=ten", {"per_page": ["invalid_integer"]}),
        (
            "page=0&per_page=0",
            {"page": ["must_be_at_least_1"], "per_page": ["must_be_between_1_and_100"]},
        ),
    ],
)
def test_bad_pagination_is_400_invalid_pagination(client, query, details):
    for _ in range(2):  # the same again: good pages are remembered, refusals never are
        response = client.get(f"/api/v1/customers?{query}", headers=AUTH)
        assert response.status_code == 400
        assert response.get_json() == {
            "status": 400,
            "error": "Bad Request",
            "code": "invalid_pagination",
            "error_details": details,
        }


def test_per_page_bounds_are_accepted(client):
    for per_page in (1, 100):
        response = client.get(f"/api/v1/customers?per_page={per_page}", headers=AUTH)
        assert response.status_code == 200


@pytest.mark.system
def test_walking_pages_during_concurrent_inserts_misses_no_customer(server):
    with requests.Session() as session:
        session.headers.update(AUTH)
        for i in range(60):
            body = {"customer": {"customer_id": f"before-{i}", "name": "N"}}
            session.post(server.url + "/api/v1/customers", json=body).raise_for_status()
    pages, inserted = walk_pages_while_inserting(
        server.url,
        {"per_page": 7},
        lambda i: {"customer_id": f"during-{i}", "name": "N"},
        at_most=500,
    )
    seen = [c["customer_id"] for body in pages for c in body["customers"]]
    assert all(body["meta"]["total_count"] >= 60 for body in pages)
    # Newest first with offsets: an insert pushes rows down, so a row may show twice, never zero.
    assert {f"before-{i}" for i in range(60)} <= set(seen)
    assert inserted, "the writer ran during the walk"


def test_health_is_200_when_the_database_answers(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_health_is_503_when_the_file_is_removed_and_recovers(client, db_path):
    assert client.get("/health").status_code == 200
    with sqlite3.connect(db_path) as db:  # everything into the main file, to save it whole
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    saved = db_path.read_bytes()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{db_path}{suffix}"):
            os.remove(f"{db_path}{suffix}")
    response = client.get("/health")
    assert response.status_code == 503
    assert response.get_json()["code"] == "database_unavailable"
    assert post_customer(client, SEED).status_code == 503
    db_path.write_bytes(saved)
    os.chmod(db_path, 0o600)
    assert client.get("/health").status_code == 200


def test_health_is_503_when_the_file_is_not_a_database(client, db_path):
    assert client.get("/health").status_code == 200
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{db_path}{suffix}"):
            os.remove(f"{db_path}{suffix}")
    db_path.unlink()
    db_path.write_bytes(b"this is not a database" * 1000)
    response = client.get("/health")
    assert response.status_code == 503
    assert "not a database" not in response.get_data(as_text=True)


def test_health_needs_no_key(client):
    assert client.get("/health", headers={"Authorization": "Bearer wrong"}).status_code == 200


# The contract's order (Lago's documentation), written out here rather than read from the code.
DOCUMENTED_ORDER = [
    "lago_id",
    "customer_id",
    "name",
    "country",
    "address_line1",
    "address_line2",
    "state",
    "zipcode",
    "email",
    "city",
    "url",
    "phone",
    "logo_url",
    "legal_name",
    "legal_number",
    "metadata",
    "created_at",
    "updated_at",
]


def keys_in_order(response) -> list:
    """The keys of a JSON object body as the bytes list them."""
    return list(json.loads(response.get_data(as_text=True), object_pairs_hook=dict))


def test_customer_keys_come_in_the_documented_order(client):
    created = post_customer(client, SEED)
    assert list(json.loads(created.data)["customer"]) == DOCUMENTED_ORDER
    got = client.get(customer_url(SEED["customer_id"]), headers=AUTH)
    assert list(json.loads(got.data)["customer"]) == DOCUMENTED_ORDER
    page = client.get("/api/v1/customers", headers=AUTH)
    assert keys_in_order(page) == ["customers", "meta"]
    assert list(json.loads(page.data)["customers"][0]) == DOCUMENTED_ORDER
    assert list(json.loads(page.data)["meta"]) == [
        "current_page",
        "next_page",
        "prev_page",
        "total_pages",
        "total_count",
    ]
    deleted = client.delete(customer_url(SEED["customer_id"]), headers=AUTH)
    assert list(json.loads(deleted.data)["customer"]) == DOCUMENTED_ORDER


def test_error_envelope_keys_come_in_the_documented_order(client):
    response = post_customer(client, {"customer_id": "c", "name": ""})
    assert keys_in_order(response) == ["status", "error", "code", "error_details"]
    missing = client.get(customer_url("nobody"), headers=AUTH)
    assert keys_in_order(missing) == ["status", "error", "code", "message"]

"""No one in without a key; private files; safe headers; SQL only ever parameterized."""

import os
import stat
from urllib.parse import quote

import pytest
import requests
from support.data import SEED
from support.service import API_KEY, AUTH, post_customer, started_app

from customers_service import api_keys, storage
from customers_service.app import key_is_valid

# API.md's routes without a key, and the docs page's own assets.
PUBLIC = {
    "customers.health",
    "customers.openapi_document",
    "customers.docs",
    "customers.docs_with_slash",
    "customers.docs_asset",
}
NOT_LETTING_IN = [
    {},
    {"Authorization": "Bearer not-the-key"},
    {"Authorization": f"Basic {API_KEY}"},
    {"Authorization": f"Token {API_KEY}"},
    {"Authorization": f"Bearer {API_KEY} extra"},
    {"Authorization": f"Bearer{API_KEY}"},
    {"X-Api-Key": API_KEY},
]


def every_route(app):
    """(method, url, endpoint) for each method of each rule of the app."""
    for rule in app.url_map.iter_rules():
        arguments = {name: "some/id" for name in rule.arguments}
        path = rule.rule
        for name, value in arguments.items():
            path = path.replace(f"<customer_id:{name}>", quote(value, safe="")).replace(
                f"<path:{name}>", "swagger-ui.css"
            )
        for method in sorted(rule.methods - {"OPTIONS"}):
            yield method, path, rule.endpoint


def test_every_route_but_the_public_ones_needs_the_key(app, client):
    checked = 0
    for method, path, endpoint in every_route(app):
        for headers in NOT_LETTING_IN:
            response = client.open(path, method=method, headers=headers, json={"customer": SEED})
            if endpoint in PUBLIC:
                assert response.status_code != 401, (method, path)
            else:
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["WWW-Authenticate"] == "Bearer"
                checked += 1
            response.close()
    assert checked >= 5 * len(NOT_LETTING_IN)


def test_the_walk_covers_every_blueprint_route(app):
    endpoints = {endpoint for _, _, endpoint in every_route(app)}
    assert {e for e in endpoints if e not in PUBLIC} == {
        "customers.upsert_customer",
        "customers.get_customer",
        "customers.delete_customer",
        "customers.list_customers",
        "customers.events_feed",
        "customers.metrics",
    }


@pytest.mark.parametrize(
    ("presented", "keys", "valid"),
    [
        ("abc", ["abc"], True),
        ("abc", ["x", "abc"], True),
        ("ab", ["abc"], False),
        ("abcd", ["abc"], False),
        ("", ["abc"], False),
        ("abc", [], False),
        ("ünï", ["ünï"], True),
        ("\udc80", ["abc"], False),
    ],
)
def test_key_comparison(presented, keys, valid):
    assert key_is_valid(presented, keys) is valid


def test_a_settings_key_skips_the_key_file_and_a_file_key_reads_it_each_time(
    app, client, tmp_path, monkeypatch
):
    key_file = tmp_path / "api-keys"
    key_file.write_text("cus_from-the-file\n")
    reads = []
    read_key_file = api_keys.read_key_file
    monkeypatch.setattr(
        api_keys, "read_key_file", lambda path: reads.append(path) or read_key_file(path)
    )
    url = "/api/v1/customers/nobody"
    assert client.get(url, headers=AUTH).status_code == 404
    assert reads == []  # the settings' key: in memory, no system call for the file
    file_key = {"Authorization": "Bearer cus_from-the-file"}
    assert client.get(url, headers=file_key).status_code == 404
    key_file.write_text("cus_another\n")  # revoked: the next request sees it
    assert client.get(url, headers=file_key).status_code == 401
    assert reads == [str(key_file)] * 2


@pytest.mark.system
def test_database_key_file_and_instance_folder_are_private(server, tmp_path, db_path):
    session = requests.Session()
    session.headers.update(AUTH)
    assert session.post(server.url + "/api/v1/customers", json={"customer": SEED}).ok
    for suffix in ("", "-wal", "-shm"):
        path = f"{server.db_path}{suffix}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_first_start_files_are_private(tmp_path):
    app = started_app(
        {
            "CUSTOMERS_DATABASE": str(tmp_path / "d.sqlite3"),
            "CUSTOMERS_API_KEY_FILE": str(tmp_path / "keys"),
        }
    )
    key = (tmp_path / "keys").read_text().strip()
    post_customer(app.test_client(), SEED, {"Authorization": f"Bearer {key}"})
    for name in ("keys", "d.sqlite3", "d.sqlite3-wal", "d.sqlite3-shm"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(app.instance_path).st_mode) & 0o077 == 0


def test_api_responses_carry_no_store_and_nosniff(client):
    responses = [
        post_customer(client, SEED),
        post_customer(client, {"customer_id": ""}),
        post_customer(client, SEED, headers={}),
        client.get(f"/api/v1/customers/{SEED['customer_id']}", headers=AUTH),
        client.get("/api/v1/customers/nobody", headers=AUTH),
        client.get("/api/v1/customers", headers=AUTH),
        client.delete(f"/api/v1/customers/{SEED['customer_id']}", headers=AUTH),
        client.get("/api/v1/nothing"),
        client.put("/api/v1/customers", headers=AUTH),
        client.get("/health"),
        client.get("/api/v1/openapi.json"),
    ]
    for response in responses:
        assert response.headers["Cache-Control"] == "no-store", response.request.path
        assert response.headers["X-Content-Type-Options"] == "nosniff"


INJECTIONS = [
    "'; DROP TABLE customers; --",
    "x' OR '1'='1",
    '" OR ""="',
    "1); DELETE FROM customers; --",
    "Robert'); UPDATE customers SET name='owned' WHERE ('1'='1",
    "' UNION SELECT sql, 1, 1 FROM sqlite_master --",
    "%' OR customer_id LIKE '%",
    "\\'; PRAGMA writable_schema=1; --",
    ":lago_id",
    "?",
]


def test_sql_injection_through_every_field_and_the_path_changes_nothing(client, backend):
    post_customer(client, {"customer_id": "bystander", "name": "Bystander"})
    for attack in INJECTIONS:
        customer = {field: attack for field in storage.FIELDS}
        customer.update(country="US", email="a@example.com", url="http://x.example")
        customer["logo_url"] = "http://x.example/" + quote(attack)
        response = post_customer(client, customer)
        assert response.status_code == 200, response.get_json()
        stored = response.get_json()["customer"]
        assert stored["customer_id"] == attack and stored["legal_name"] == attack
        path = "/api/v1/customers/" + quote(attack, safe="")
        assert client.get(path, headers=AUTH).get_json()["customer"]["name"] == attack
        list_response = client.get(
            "/api/v1/customers?page=1&per_page=" + quote(attack), headers=AUTH
        )
        assert list_response.status_code == 400
    if backend.name == "sqlite":
        assert backend.fetch("PRAGMA integrity_check") == [("ok",)]
    for table in ("customers", "customer_count", "health_probe"):
        assert backend.fetch(f"SELECT count(*) FROM {table}")  # still there
    assert backend.fetch("SELECT name FROM customers WHERE customer_id = 'bystander'") == [
        ("Bystander",)
    ]
    assert backend.fetch("SELECT count(*) FROM customers") == [(len(INJECTIONS) + 1,)]
    for attack in INJECTIONS:
        path = "/api/v1/customers/" + quote(attack, safe="")
        assert client.delete(path, headers=AUTH).status_code == 200
    assert client.get("/api/v1/customers", headers=AUTH).get_json()["meta"]["total_count"] == 1

"""The blueprint inside a host Flask app, under a URL prefix, with the host's config."""

import pytest
from flask import Flask
from support.data import SEED
from support.service import API_KEY, AUTH

from customers_service.app import bp
from customers_service.database import prepare_database


@pytest.fixture
def host(tmp_path):
    host = Flask("host_app", instance_path=str(tmp_path / "instance"))
    host.config.update(
        CUSTOMERS_DATABASE=str(tmp_path / "host.sqlite3"),
        CUSTOMERS_API_KEYS=[API_KEY],
        CUSTOMERS_API_KEY_FILE=str(tmp_path / "no-such-file"),
    )

    @host.get("/hello")
    def hello():
        return "hello from the host"

    @host.errorhandler(404)
    def host_not_found(e):
        return "the host's own 404 page", 404

    host.register_blueprint(bp, url_prefix="/billing")
    prepare_database(host)  # the host's own start
    return host


def test_the_api_works_under_a_prefix(host):
    client = host.test_client()
    response = client.post("/billing/api/v1/customers", json={"customer": SEED}, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["X-Request-Id"]
    got = client.get(f"/billing/api/v1/customers/{SEED['customer_id']}", headers=AUTH)
    assert got.get_json()["customer"]["name"] == SEED["name"]


def test_our_errors_are_json_under_a_prefix(host):
    client = host.test_client()
    assert client.post("/billing/api/v1/customers", json={}).get_json()["code"] == "unauthorized"
    response = client.post("/billing/api/v1/customers", json={"customer": {}}, headers=AUTH)
    assert response.get_json()["code"] == "bad_request"
    response = client.get("/billing/api/v1/customers/nobody", headers=AUTH)
    assert response.get_json()["code"] == "customer_not_found"


def test_the_hosts_own_routes_and_404_stay_its_own(host):
    client = host.test_client()
    hello = client.get("/hello")
    assert hello.get_data(as_text=True) == "hello from the host"
    assert "X-Request-Id" not in hello.headers
    missing = client.get("/no-such-page")
    assert missing.status_code == 404
    assert missing.get_data(as_text=True) == "the host's own 404 page"


def test_the_host_may_turn_the_key_check_off(host):
    host.config["CUSTOMERS_REQUIRE_API_KEY"] = False
    client = host.test_client()
    response = client.post("/billing/api/v1/customers", json={"customer": SEED})
    assert response.status_code == 200


def test_an_embedded_blueprint_with_no_key_stays_closed(host):
    host.config["CUSTOMERS_API_KEYS"] = []
    client = host.test_client()
    response = client.post("/billing/api/v1/customers", json={"customer": SEED}, headers=AUTH)
    assert response.status_code == 401


def test_cli_commands_appear_in_the_host(host, tmp_path):
    result = host.test_cli_runner().invoke(args=["customers", "init-db"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "host.sqlite3").exists()

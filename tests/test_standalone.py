"""The standalone app: its first-start API key, its settings, its JSON 404 and 405."""

import os
import stat

import pytest
from support.data import SEED
from support.service import AUTH, post_customer, started_app
from werkzeug.datastructures import Headers

from customers_service.app import CustomersRequest, add_common_headers, create_app


def test_first_start_creates_a_private_key_file_and_shows_it_once(tmp_path, capsys):
    key_file = tmp_path / "api-keys"
    app = started_app(
        {"CUSTOMERS_DATABASE": str(tmp_path / "d.sqlite3"), "CUSTOMERS_API_KEY_FILE": str(key_file)}
    )
    key = key_file.read_text().strip()
    assert len(key) >= 32
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    err = capsys.readouterr().err
    assert str(key_file) in err and err.count(key) == 1  # shown once, when made
    client = app.test_client()
    response = post_customer(client, SEED, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert post_customer(client, SEED, headers={}).status_code == 401
    # A second start keeps the same key, and never shows it again.
    create_app({"CUSTOMERS_API_KEY_FILE": str(key_file)})
    assert key_file.read_text().strip() == key
    assert key not in "".join(capsys.readouterr())


def test_no_key_file_is_made_when_keys_are_configured(tmp_path):
    create_app({"CUSTOMERS_API_KEYS": "k", "CUSTOMERS_API_KEY_FILE": str(tmp_path / "keys")})
    assert not (tmp_path / "keys").exists()


def test_environment_variables_configure_the_app(tmp_path, monkeypatch):
    monkeypatch.setenv("CUSTOMERS_DATABASE", str(tmp_path / "env.sqlite3"))
    monkeypatch.setenv("CUSTOMERS_API_KEYS", "env-key-1,env-key-2")
    monkeypatch.setenv("CUSTOMERS_MAX_BODY_BYTES", "50")
    monkeypatch.setenv("CUSTOMERS_SQLITE_SYNCHRONOUS", "normal")
    client = started_app().test_client()
    headers = {"Authorization": "Bearer env-key-2"}
    assert post_customer(client, {"customer_id": "c", "name": "N"}, headers).status_code == 200
    assert post_customer(client, SEED, headers).status_code == 413
    assert (tmp_path / "env.sqlite3").exists()


def test_test_config_overrides_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CUSTOMERS_API_KEYS", "env-key")
    app = create_app({"CUSTOMERS_API_KEYS": "test-only", "CUSTOMERS_DATABASE": str(tmp_path / "d")})
    headers = {"Authorization": "Bearer env-key"}
    assert post_customer(app.test_client(), SEED, headers).status_code == 401


def test_unknown_route_is_json_404_with_or_without_a_key(client):
    for headers in ({}, AUTH):
        response = client.get("/api/v1/nothing-here", headers=headers)
        assert response.status_code == 404
        assert response.get_json() == {"status": 404, "error": "Not Found", "code": "not_found"}


def test_wrong_method_is_json_405_with_allow(client):
    response = client.patch("/api/v1/customers", headers=AUTH)
    assert response.status_code == 405
    assert response.get_json()["code"] == "method_not_allowed"
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "POST"}


def test_api_responses_are_not_cached_or_sniffed(client):
    response = post_customer(client, SEED)
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    for name in ("X-Request-Id", "X-Content-Type-Options", "Cache-Control"):
        assert len(response.headers.getlist(name)) == 1, name


def test_common_headers_replace_the_id_and_keep_a_response_s_own_cache_control():
    headers = Headers(
        [
            ("Content-Type", "text/css"),
            ("cache-control", "public, max-age=60"),
            ("X-Request-Id", "a"),
        ]
    )
    add_common_headers(headers, "b")
    assert headers.to_wsgi_list() == [
        ("Content-Type", "text/css"),
        ("cache-control", "public, max-age=60"),
        ("X-Request-Id", "b"),
        ("X-Content-Type-Options", "nosniff"),
    ]


def test_the_request_limit_is_read_as_flask_reads_it(app):
    environ = {"REQUEST_METHOD": "POST", "CONTENT_LENGTH": "40"}
    assert CustomersRequest(environ).max_content_length is None  # outside any app
    with app.app_context():
        assert CustomersRequest(environ).max_content_length is None
        app.config["MAX_CONTENT_LENGTH"] = 30
        assert CustomersRequest(environ).max_content_length == 30
        request = CustomersRequest(environ)
        request.max_content_length = 50  # Flask 3.1: one request's own limit
        assert request.max_content_length == 50
    response = post_customer(app.test_client(), SEED)
    assert response.status_code == 413
    assert response.get_json()["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CUSTOMERS_SQLITE_SYNCHRONOUS", "OFF"),
        ("CUSTOMERS_MAX_BODY_BYTES", "64k"),
        ("CUSTOMERS_SQLITE_TIMEOUT", "soon"),
        ("CUSTOMERS_POSTGRES_POOL_SIZE", "0"),
        ("CUSTOMERS_POSTGRES_POOL_SIZE", "2.5"),
        ("CUSTOMERS_POSTGRES_STATEMENT_TIMEOUT", "0"),
    ],
)
def test_a_setting_that_cannot_work_stops_the_start(tmp_path, name, value):
    with pytest.raises(ValueError, match=name):
        create_app(
            {name: value, "CUSTOMERS_API_KEYS": "k", "CUSTOMERS_DATABASE": str(tmp_path / "d")}
        )

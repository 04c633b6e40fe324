"""POST /api/v1/customers: every field rule, error code and the upsert rule of API.md."""

import json
import re
import sqlite3

import pytest
from support.data import SEED
from support.service import API_KEY, AUTH, post_customer

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
OBJECT_KEYS = {"lago_id", *SEED, "metadata", "created_at", "updated_at"}


def error_body(status: int, error: str, code: str, **extra) -> dict:
    return {"status": status, "error": error, "code": code, **extra}


def test_create_returns_the_whole_customer_object(client):
    response = post_customer(client, SEED)
    assert response.status_code == 200
    customer = response.get_json()["customer"]
    assert set(customer) == OBJECT_KEYS
    assert {k: customer[k] for k in SEED} == SEED
    assert UUID.match(customer["lago_id"])
    assert TIMESTAMP.match(customer["created_at"])
    assert customer["updated_at"] == customer["created_at"]


def test_the_seed_example_body_is_accepted_as_raw_json(client):
    body = json.dumps({"customer": SEED})
    response = client.post(
        "/api/v1/customers", data=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status_code == 200


def test_fields_never_set_are_null(client):
    customer = post_customer(client, {"customer_id": "c1", "name": "N"}).get_json()["customer"]
    assert set(customer) == OBJECT_KEYS
    assert all(customer[k] is None for k in SEED if k not in ("customer_id", "name"))


def test_update_returns_200_and_keeps_lago_id_and_created_at(client, backend):
    first = post_customer(client, SEED).get_json()["customer"]
    backend.execute_many(  # move created_at back, so a change would show
        "UPDATE customers SET created_at = ?, updated_at = ?",
        [("2020-01-01T00:00:00Z", "2020-01-01T00:00:00Z")],
    )
    response = post_customer(client, {**SEED, "name": "Other"})
    assert response.status_code == 200
    second = response.get_json()["customer"]
    assert second["lago_id"] == first["lago_id"]
    assert second["created_at"] == "2020-01-01T00:00:00Z"
    assert TIMESTAMP.match(second["updated_at"])
    assert second["name"] == "Other"


def test_upsert_keeps_absent_fields(client):
    post_customer(client, SEED)
    response = post_customer(client, {"customer_id": SEED["customer_id"], "name": "New name"})
    customer = response.get_json()["customer"]
    assert {k: customer[k] for k in SEED} == {**SEED, "name": "New name"}


def test_upsert_null_clears_a_field(client):
    post_customer(client, SEED)
    response = post_customer(client, {**SEED, "email": None, "country": None})
    customer = response.get_json()["customer"]
    assert customer["email"] is None
    assert customer["country"] is None
    assert customer["city"] == SEED["city"]


def test_upsert_leaves_one_row(client, backend):
    for name in ("a", "b", "c"):
        post_customer(client, {**SEED, "name": name})
    assert backend.fetch("SELECT count(*), max(name) FROM customers") == [(1, "c")]


def test_customer_id_is_kept_exactly_as_sent(client):
    odd = "  Ünïcode / id?#%20 with spaces  "
    customer = post_customer(client, {"customer_id": odd, "name": "N"}).get_json()["customer"]
    assert customer["customer_id"] == odd


def test_country_is_stored_upper_case(client):
    customer = post_customer(client, {**SEED, "country": "fr"}).get_json()["customer"]
    assert customer["country"] == "FR"


@pytest.mark.parametrize("country", ["XK", "xk", "US", "gb", "Fr"])
def test_country_codes_accepted(client, country):
    response = post_customer(client, {**SEED, "country": country})
    assert response.status_code == 200
    assert response.get_json()["customer"]["country"] == country.upper()


def test_unknown_null_fields_are_ignored(client):
    customer = {**SEED, "vat_rate": None, "billing_configuration": None}
    assert post_customer(client, customer).status_code == 200


INVALID = [
    ({"name": "N"}, {"customer_id": ["value_is_mandatory"]}),
    ({"customer_id": "c"}, {"name": ["value_is_mandatory"]}),
    ({"customer_id": None, "name": "N"}, {"customer_id": ["value_is_mandatory"]}),
    ({"customer_id": "c", "name": None}, {"name": ["value_is_mandatory"]}),
    ({"customer_id": "", "name": "N"}, {"customer_id": ["value_is_mandatory"]}),
    ({"customer_id": " \t\n", "name": "N"}, {"customer_id": ["value_is_mandatory"]}),
    ({"customer_id": "c", "name": "   "}, {"name": ["value_is_mandatory"]}),
    ({"customer_id": 12, "name": "N"}, {"customer_id": ["invalid_type"]}),
    ({"customer_id": "c", "name": ["N"]}, {"name": ["invalid_type"]}),
    ({"customer_id": "c" * 256, "name": "N"}, {"customer_id": ["value_is_too_long"]}),
    ({"customer_id": "c", "name": "n" * 256}, {"name": ["value_is_too_long"]}),
    ({"customer_id": "c", "name": "N", "country": "ZZ"}, {"country": ["not_a_valid_country_code"]}),
    ({"customer_id": "c", "name": "N", "country": ""}, {"country": ["not_a_valid_country_code"]}),
    (
        {"customer_id": "c", "name": "N", "country": "USA"},
        {"country": ["not_a_valid_country_code"]},
    ),
    ({"customer_id": "c", "name": "N", "country": 1}, {"country": ["invalid_type"]}),
    ({"customer_id": "c", "name": "N", "email": "nope"}, {"email": ["invalid_email_format"]}),
    (
        {"customer_id": "c", "name": "N", "email": "a@b.c, d@e.f"},
        {"email": ["invalid_email_format"]},
    ),
    ({"customer_id": "c", "name": "N", "email": True}, {"email": ["invalid_type"]}),
    (
        {"customer_id": "c", "name": "N", "email": "no-at-sign" * 30},
        {"email": ["invalid_email_format", "value_is_too_long"]},
    ),
    ({"customer_id": "c", "name": "N", "url": "hooli.com"}, {"url": ["invalid_url_format"]}),
    ({"customer_id": "c", "name": "N", "url": "ftp://hooli.com"}, {"url": ["invalid_url_format"]}),
    ({"customer_id": "c", "name": "N", "url": "/logo.png"}, {"url": ["invalid_url_format"]}),
    (
        {"customer_id": "c", "name": "N", "logo_url": "javascript:alert(1)"},
        {"logo_url": ["invalid_url_format"]},
    ),
    (
        {"customer_id": "c", "name": "N", "url": "http://h.com/" + "a" * 2040},
        {"url": ["value_is_too_long"]},
    ),
    ({"customer_id": "c", "name": "N", "url": {"a": 1}}, {"url": ["invalid_type"]}),
    ({"customer_id": "c", "name": "N", "city": 3.5}, {"city": ["invalid_type"]}),
    ({"customer_id": "c", "name": "N", "zipcode": 91364}, {"zipcode": ["invalid_type"]}),
    ({"customer_id": "c", "name": "N", "state": "s" * 256}, {"state": ["value_is_too_long"]}),
    ({"customer_id": "c", "name": "N", "vat_rate": 20}, {"vat_rate": ["unknown_field"]}),
    ({"customer_id": "c", "name": "N", "lago_id": "x"}, {"lago_id": ["unknown_field"]}),
    ({"customer_id": "c", "name": "N", "created_at": "x"}, {"created_at": ["unknown_field"]}),
]


@pytest.mark.parametrize(("customer", "details"), INVALID)
def test_invalid_fields_are_422_with_their_codes(client, customer, details):
    response = post_customer(client, customer)
    assert response.status_code == 422
    assert response.get_json() == error_body(
        422, "Unprocessable Entity", "validation_errors", error_details=details
    )


@pytest.mark.parametrize(
    "field",
    [
        "address_line1",
        "address_line2",
        "state",
        "zipcode",
        "city",
        "phone",
        "legal_name",
        "legal_number",
    ],
)
def test_free_text_fields_take_255_characters_not_256(client, field):
    assert post_customer(client, {**SEED, field: "x" * 255}).status_code == 200
    response = post_customer(client, {**SEED, field: "x" * 256})
    assert response.get_json()["error_details"] == {field: ["value_is_too_long"]}


def test_all_field_errors_are_reported_together(client):
    response = post_customer(
        client, {"customer_id": "", "country": "ZZ", "email": "x", "url": 5, "extra": 1}
    )
    assert response.status_code == 422
    assert response.get_json()["error_details"] == {
        "customer_id": ["value_is_mandatory"],
        "name": ["value_is_mandatory"],
        "country": ["not_a_valid_country_code"],
        "email": ["invalid_email_format"],
        "url": ["invalid_type"],
        "extra": ["unknown_field"],
    }


def test_required_fields_hold_on_update(client):
    post_customer(client, SEED)
    response = post_customer(client, {"customer_id": SEED["customer_id"], "name": ""})
    assert response.get_json()["error_details"] == {"name": ["value_is_mandatory"]}
    response = post_customer(client, {"customer_id": SEED["customer_id"]})
    assert response.get_json()["error_details"] == {"name": ["value_is_mandatory"]}


def test_a_refused_update_changes_nothing(client):
    before = post_customer(client, SEED).get_json()["customer"]
    post_customer(client, {**SEED, "name": "Changed", "country": "ZZ"})
    after = client.get(f"/api/v1/customers/{SEED['customer_id']}", headers=AUTH).get_json()
    assert after["customer"] == before


BAD_REQUEST = error_body(
    400,
    "Bad Request",
    "bad_request",
    message="param is missing or the value is empty or invalid: customer",
)


@pytest.mark.parametrize(
    "body",
    [
        [],
        [{"customer": SEED}],
        "customer",
        42,
        None,
        {},
        {"customer": None},
        {"customer": {}},
        {"customer": "c1"},
        {"customer": [SEED]},
        {"customers": SEED},
        SEED,
    ],
)
def test_missing_or_empty_customer_is_400_bad_request(client, body):
    response = client.post(
        "/api/v1/customers", data=json.dumps(body), content_type="application/json", headers=AUTH
    )
    assert response.status_code == 400
    assert response.get_json() == BAD_REQUEST


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"customer": {"customer_id": "c", "name": "N",}}',
        b"{'customer': {}}",
        b"\xff\xfe{}",
        b'{"customer": {"customer_id": "c", "name": NaN}}',
        b'{"customer": {"customer_id": "c", "name": Infinity}}',
        b'{"customer": {"customer_id": "c", "name": "N", "name": "M"}}',
        b'{"customer": {"customer_id": "\\ud800", "name": "N"}}',
        b'{"customer": {"customer_id": "c", "name": "N"}} trailing',
    ],
)
def test_body_that_is_not_json_is_400_invalid_json(client, raw):
    response = client.post(
        "/api/v1/customers", data=raw, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.get_json()["code"] == "invalid_json"
    assert response.get_json()["status"] == 400


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "text/json"]
)
def test_body_not_sent_as_json_is_415(client, content_type):
    headers = dict(AUTH)
    if content_type:
        headers["Content-Type"] = content_type
    response = client.post(
        "/api/v1/customers", data=json.dumps({"customer": SEED}), headers=headers
    )
    assert response.status_code == 415
    assert response.get_json()["code"] == "unsupported_media_type"
    assert response.get_json()["error"] == "Unsupported Media Type"


def test_json_with_charset_is_accepted(client):
    response = client.post(
        "/api/v1/customers",
        data=json.dumps({"customer": SEED}),
        headers={**AUTH, "Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200


def test_body_over_the_limit_is_413(client):
    body = {"customer": {**SEED, "legal_name": "x" * 70_000}}
    response = client.post("/api/v1/customers", json=body, headers=AUTH)
    assert response.status_code == 413
    assert response.get_json() == error_body(
        413,
        "Request Entity Too Large",
        "payload_too_large",
        message="the body is over 65536 bytes",
    )


def test_body_limit_is_configurable(app, client):
    app.config["CUSTOMERS_MAX_BODY_BYTES"] = 100
    assert post_customer(client, {"customer_id": "c", "name": "N"}).status_code == 200
    assert post_customer(client, SEED).status_code == 413


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": API_KEY},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {API_KEY}x"},
        {"Authorization": f"Bearer {API_KEY[:-1]}"},
    ],
)
def test_missing_or_wrong_key_is_401(client, headers):
    response = post_customer(client, SEED, headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.get_json() == error_body(
        401,
        "Unauthorized",
        "unauthorized",
        message="send an API key in the header Authorization: Bearer <key>",
    )


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(client, scheme):
    response = post_customer(client, SEED, headers={"Authorization": f"{scheme} {API_KEY}"})
    assert response.status_code == 200


def test_auth_is_checked_before_the_body(client):
    response = client.post("/api/v1/customers", data=b"not json", content_type="text/plain")
    assert response.status_code == 401


def test_several_keys_for_rotation(app, client):
    app.config["CUSTOMERS_API_KEYS"] = "old-key, new-key"
    for key in ("old-key", "new-key"):
        headers = {"Authorization": f"Bearer {key}"}
        assert post_customer(client, SEED, headers=headers).status_code == 200
    assert post_customer(client, SEED).status_code == 401


def test_request_id_is_echoed_when_sane(client):
    response = post_customer(client, SEED, headers={**AUTH, "X-Request-Id": "abc-123"})
    assert response.headers["X-Request-Id"] == "abc-123"


@pytest.mark.parametrize("given", ["", "a b", "x" * 201, "é"])
def test_request_id_is_made_when_missing_or_odd(client, given):
    response = post_customer(client, SEED, headers={**AUTH, "X-Request-Id": given})
    made = response.headers["X-Request-Id"]
    assert made != given
    assert re.fullmatch(r"[0-9a-f]{32}", made)


def test_every_response_has_a_request_id(client):
    for response in (
        post_customer(client, SEED),
        post_customer(client, {}),
        client.get("/nowhere"),
        client.put("/api/v1/customers", headers=AUTH),
    ):
        assert response.headers.get("X-Request-Id")


def test_access_log_line_carries_the_request_id(client, capsys):
    post_customer(client, SEED, headers={**AUTH, "X-Request-Id": "trace-42"})
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "request_id=trace-42" in line)
    assert "method=POST path=/api/v1/customers status=200" in line


def test_database_locked_past_timeout_is_503_database_busy(app, client, db_path):
    app.config["CUSTOMERS_SQLITE_TIMEOUT"] = 0.1
    post_customer(client, SEED)
    blocker = sqlite3.connect(db_path)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        response = post_customer(client, {**SEED, "name": "Blocked"})
    finally:
        blocker.rollback()
        blocker.close()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.get_json()["code"] == "database_busy"
    assert post_customer(client, {**SEED, "name": "Free"}).status_code == 200


def test_unexpected_error_is_500_internal_error_without_details(client, db_path, capsys):
    post_customer(client, SEED)
    with sqlite3.connect(db_path) as db:  # a real fault: the database refuses every write
        db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON customers "
            "BEGIN SELECT RAISE(ABORT, 'SELECT secret FROM /var/lib/x.db'); END"
        )
    response = post_customer(client, {**SEED, "name": "Z"}, headers={**AUTH, "X-Request-Id": "r-9"})
    assert response.status_code == 500
    assert response.get_json() == error_body(
        500, "Internal Server Error", "internal_error", message="an unexpected error occurred"
    )
    assert "request_id=r-9 unexpected error" in capsys.readouterr().err

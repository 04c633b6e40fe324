"""Log lines as JSON (CUSTOMERS_LOG_FORMAT=json), and the client's address behind trusted proxies
(CUSTOMERS_TRUSTED_PROXIES), through a real gunicorn."""

import json
import os
import re
import sqlite3

import pytest
import requests
from support.data import SEED
from support.servers import Gunicorn
from support.service import API_KEY, AUTH, post_customer

PERSONAL = {
    "customer_id": "cus-personal-7",
    "name": "Zelda Quartermaine",
    "email": "zelda@quartermaine.example",
    "phone": "+33612345678",
    "address_line1": "12 Rue Oberkampf",
}
ISO_MILLISECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def json_lines(text: str) -> list[dict]:
    """Every line of the log, each parsed as one JSON object (a line that is not one fails)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.system
def test_json_lines_carry_the_request_and_never_a_key_or_personal_field(tmp_path, backend):
    env = {**backend.env, "CUSTOMERS_LOG_FORMAT": "json"}
    gunicorn = Gunicorn(tmp_path, workers=2, env=env).start()
    try:
        headers = {**AUTH, "X-Request-Id": "json-1"}
        body = {"customer": PERSONAL}
        assert requests.post(gunicorn.url + "/api/v1/customers", json=body, headers=headers).ok
        path = f"/api/v1/customers/{PERSONAL['customer_id']}"
        got = requests.get(gunicorn.url + path, headers={**AUTH, "X-Request-Id": "json-2"})
        assert got.status_code == 200
        refused = requests.get(gunicorn.url + path, headers={"X-Request-Id": "json-3"})
        assert refused.status_code == 401
    finally:
        gunicorn.stop()
    lines = json_lines(gunicorn.log())  # gunicorn's own lines included
    by_id = {line["request_id"]: line for line in lines if "request_id" in line}
    post = by_id["json-1"]
    assert set(post) == {
        "time",
        "level",
        "logger",
        "request_id",
        "method",
        "route",
        "status",
        "duration_ms",
        "remote_addr",
    }
    assert ISO_MILLISECONDS.fullmatch(post["time"])
    assert (post["level"], post["method"], post["route"], post["status"]) == (
        "info",
        "POST",
        "/api/v1/customers",
        200,
    )
    assert post["remote_addr"] == "127.0.0.1" and post["duration_ms"] >= 0
    assert (by_id["json-2"]["route"], by_id["json-2"]["status"]) == (
        "/api/v1/customers/<customer_id>",
        200,
    )
    assert by_id["json-3"]["status"] == 401
    assert any(line["logger"] == "gunicorn.error" for line in lines), "gunicorn's lines as JSON"
    text = gunicorn.log()
    for secret in (API_KEY, *PERSONAL.values()):
        assert secret not in text


@pytest.mark.system
def test_a_json_error_line_carries_the_request_id(tmp_path):
    gunicorn = Gunicorn(tmp_path, workers=1, env={"CUSTOMERS_LOG_FORMAT": "json"}).start()
    try:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(f"{gunicorn.db_path}{suffix}"):
                os.remove(f"{gunicorn.db_path}{suffix}")
        headers = {**AUTH, "X-Request-Id": "broken-1"}
        answer = requests.get(gunicorn.url + "/api/v1/customers/x", headers=headers)
        assert answer.json()["code"] == "database_unavailable"
    finally:
        gunicorn.stop()
    lines = [line for line in json_lines(gunicorn.log()) if line.get("request_id") == "broken-1"]
    error = next(line for line in lines if line["level"] == "error")
    assert error["logger"] == "customers.errors"
    assert error["message"].startswith("database_unavailable: ")
    assert error["route"] == "/api/v1/customers/<customer_id>"
    assert ISO_MILLISECONDS.fullmatch(error["time"])


def test_an_unexpected_error_in_json_is_one_line_with_its_traceback(app, client, db_path, capsys):
    app.config["CUSTOMERS_LOG_FORMAT"] = "json"
    post_customer(client, SEED)
    with sqlite3.connect(db_path) as db:  # a real fault: the database refuses every write
        db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON customers "
            "BEGIN SELECT RAISE(ABORT, 'kaboom'); END"
        )
    capsys.readouterr()
    post_customer(client, {**SEED, "name": "Z"}, headers={**AUTH, "X-Request-Id": "boom-1"})
    errors = json_lines(capsys.readouterr().err)
    assert len(errors) == 1
    assert errors[0]["request_id"] == "boom-1" and errors[0]["message"] == "unexpected error"
    assert errors[0]["route"] == "/api/v1/customers"
    assert "IntegrityError: kaboom" in errors[0]["exception"]


def remote_addresses(gunicorn: Gunicorn, forwarded: list[str]) -> list[str]:
    """The remote address each request's access line shows, one request per X-Forwarded-For."""
    for n, value in enumerate(forwarded):
        headers = {**AUTH, "X-Forwarded-For": value, "X-Request-Id": f"fwd-{n}"}
        assert requests.get(gunicorn.url + "/api/v1/customers", headers=headers).ok
    gunicorn.stop()
    by_id = {line.get("request_id"): line for line in json_lines(gunicorn.log())}
    return [by_id[f"fwd-{n}"]["remote_addr"] for n in range(len(forwarded))]


FORGED = ["198.51.100.7", "198.51.100.7, 203.0.113.9", "not-an-address"]


@pytest.mark.system
@pytest.mark.parametrize(
    "proxies, forwarded, believed",
    [
        # Unset: forwarded headers are ignored, whatever a client writes.
        (None, FORGED, ["127.0.0.1"] * 3),
        # One proxy (here, the test) appends what it saw; what the client wrote before it is not
        # believed.
        ("1", FORGED, ["198.51.100.7", "203.0.113.9", "not-an-address"]),
        # Two: the first proxy's entry; with one entry a proxy is missing and nothing is believed.
        ("2", ["forged, 198.51.100.7, 10.0.0.2", "198.51.100.7"], ["198.51.100.7", "127.0.0.1"]),
    ],
)
def test_a_forwarded_address_is_believed_only_from_trusted_proxies(
    tmp_path, proxies, forwarded, believed
):
    env = {"CUSTOMERS_LOG_FORMAT": "json"}
    if proxies is not None:
        env["CUSTOMERS_TRUSTED_PROXIES"] = proxies
    gunicorn = Gunicorn(tmp_path, workers=1, env=env).start()
    try:
        assert remote_addresses(gunicorn, forwarded) == believed
    finally:
        gunicorn.stop()


@pytest.mark.system
def test_a_text_line_quotes_a_forwarded_address_that_could_fake_a_field(tmp_path):
    gunicorn = Gunicorn(tmp_path, workers=1, env={"CUSTOMERS_TRUSTED_PROXIES": "1"}).start()
    try:
        headers = {**AUTH, "X-Forwarded-For": "1.2.3.4 status=200", "X-Request-Id": "fake"}
        requests.get(gunicorn.url + "/api/v1/customers", headers=headers)
    finally:
        gunicorn.stop()
    line = next(line for line in gunicorn.log().splitlines() if "request_id=fake " in line)
    assert " remote=1.2.3.4%20status=200 " in line
    assert [field for field in line.split(" ") if field.startswith("status=")] == ["status=200"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_log_format_applies_in_process_too(app, client, capsys, log_format):
    app.config["CUSTOMERS_LOG_FORMAT"] = log_format
    post_customer(client, {"customer_id": "in-process", "name": "N"})
    line = capsys.readouterr().out.strip().splitlines()[-1]
    if log_format == "json":
        assert json.loads(line)["route"] == "/api/v1/customers"
    else:
        assert " method=POST path=/api/v1/customers status=200 " in line

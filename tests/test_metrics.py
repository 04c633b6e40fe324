"""GET /metrics: requests by route template, method and status, latency, database errors and the
webhook backlog, counted across every gunicorn worker."""

import glob
import json
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families
from support.servers import Gunicorn
from support.service import API_KEY, AUTH, post_customer

from customers_service import database
from customers_service.app import bp, create_app
from customers_service.database import prepare_database

REQUESTS = "customers_http_requests_total"
LATENCY = "customers_http_request_duration_seconds"
CUSTOMER_ROUTE = "/api/v1/customers/<customer_id>"


def samples(text: str) -> dict:
    """Every sample of a scrape, parsed by prometheus_client: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(scraped: dict, name: str) -> dict:
    """The values of one sample name, by their labels as a dict's sorted items."""
    return {labels: value for (each, labels), value in scraped.items() if each == name}


def requests_key(route: str, method: str, status: int) -> tuple:
    return (("method", method), ("route", route), ("status", str(status)))


def scrape(url: str) -> dict:
    answer = requests.get(url + "/metrics", headers=AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return samples(answer.text)


def send_known_traffic(url: str) -> Counter:
    """Requests from 8 threads at once, each on a new connection, so that every worker answers
    some; the count of each (route, method, status) sent."""
    calls = []
    for n in range(20):  # each customer created, then updated
        body = {"customer": {"customer_id": f"cus/{n}", "name": "Known"}}
        calls += [("POST", "/api/v1/customers", body, AUTH)] * 2
    calls += [("GET", f"/api/v1/customers/cus/{n}", None, AUTH) for n in range(20)]
    calls += [("GET", f"/api/v1/customers/missing-{n}", None, AUTH) for n in range(10)]
    calls += [("GET", "/api/v1/customers", None, {}) for _ in range(10)]  # no key: 401
    calls += [("GET", "/api/v1/customers?page=1", None, AUTH) for _ in range(5)]
    calls += [("GET", f"/no/such/route/{n}", None, AUTH) for n in range(5)]
    calls += [("PUT", "/api/v1/customers", None, AUTH) for _ in range(5)]
    calls += [("BREW", "/api/v1/customers", None, AUTH) for _ in range(5)]

    def send(call) -> tuple:
        method, path, body, headers = call
        answer = requests.request(method, url + path, json=body, headers=headers, timeout=10)
        route = {
            "/api/v1/customers": "/api/v1/customers",
            "/api/v1/customers?page=1": "/api/v1/customers",
        }.get(path, CUSTOMER_ROUTE if path.startswith("/api/v1/customers/") else "unmatched")
        if answer.status_code == 405:
            route = "unmatched"
        return (route, method if method != "BREW" else "other", answer.status_code)

    creates = calls[:40]
    with ThreadPoolExecutor(8) as pool:  # the creates first: the GETs find what they made
        sent = list(pool.map(send, creates[0::2]))
        sent += list(pool.map(send, creates[1::2]))
        sent += list(pool.map(send, calls[40:]))
    return Counter(sent)


@pytest.mark.system
def test_a_scrape_counts_every_workers_requests_exactly(tmp_path, backend):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {**backend.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    gunicorn = Gunicorn(tmp_path, workers=4, env=env).start()
    try:
        health_checks = gunicorn.log().count("path=/health ")  # Gunicorn.start()'s
        sent = send_known_traffic(gunicorn.url)
        assert sent[(CUSTOMER_ROUTE, "GET", 404)] == 10 and sent[("unmatched", "other", 405)] == 5
        assert len(workers_that_counted(metrics_dir)) >= 2, "one worker answered everything"

        scraped = scrape(gunicorn.url)
        expected = {requests_key(*key): float(count) for key, count in sent.items()}
        expected[requests_key("/health", "GET", 200)] = float(health_checks)
        assert series(scraped, REQUESTS) == expected
        assert_latency_counts_match(scraped)
        assert series(scraped, "customers_http_requests_in_flight") == {(): 1.0}  # this scrape

        # A worker ends (gunicorn stops one on TTOU): its counts stay, its in-flight gauge goes.
        before = workers_that_counted(metrics_dir)
        live_gauges = set(metrics_dir.glob("gauge_livesum_*.db"))
        os.kill(gunicorn.proc.pid, signal.SIGTTOU)
        gone = wait_for(lambda: live_gauges - set(metrics_dir.glob("gauge_livesum_*.db")))
        assert len(gone) == 1
        assert workers_that_counted(metrics_dir) == before
        again = scrape(gunicorn.url)
        expected[requests_key("/metrics", "GET", 200)] = 1.0
        assert series(again, REQUESTS) == expected
        assert series(again, "customers_http_requests_in_flight") == {(): 1.0}
    finally:
        gunicorn.stop()


def workers_that_counted(metrics_dir: Path) -> set[str]:
    """The pids with a file of counters: workers that answered a request."""
    return {path.stem.split("_")[-1] for path in metrics_dir.glob("counter_*.db")}


def wait_for(condition, seconds: float = 20):
    """The condition's first true value, polled until ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def assert_latency_counts_match(scraped: dict) -> None:
    """Each (route, method)'s histogram holds one observation per request counted."""
    by_route = Counter()
    for labels, value in series(scraped, REQUESTS).items():
        by_route[tuple(item for item in labels if item[0] != "status")] += value
    assert series(scraped, LATENCY + "_count") == dict(by_route)
    infinity = {
        tuple(item for item in labels if item[0] != "le"): value
        for labels, value in series(scraped, LATENCY + "_bucket").items()
        if dict(labels)["le"] == "+Inf"
    }
    assert infinity == dict(by_route)


def test_metrics_need_an_api_key_and_are_prometheus_text(client):
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused.json["code"] == "unauthorized"
    assert refused.headers["WWW-Authenticate"] == "Bearer"
    answer = client.get("/metrics", headers=AUTH)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "X-Request-Id" in answer.headers
    assert (REQUESTS, requests_key("/metrics", "GET", 401)) in samples(answer.get_data(True))


def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(client):
    answer = client.get(
        "/metrics", headers={**AUTH, "Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
    assert answer.get_data(True).endswith("# EOF\n")


def test_a_route_is_labelled_by_its_template_never_its_path(client):
    scraped_before = samples(client.get("/metrics", headers=AUTH).get_data(True))
    client.get("/api/v1/customers/secret-id-42", headers=AUTH)
    text = client.get("/metrics", headers=AUTH).get_data(True)
    assert "secret-id-42" not in text
    key = (REQUESTS, requests_key(CUSTOMER_ROUTE, "GET", 404))
    assert samples(text)[key] == scraped_before.get(key, 0) + 1


def test_database_errors_are_counted_by_code_and_a_scrape_still_answers(app, client, db_path):
    post_customer(client, {"customer_id": "c1", "name": "N"})
    key = ("customers_database_errors_total", (("code", "database_unavailable"),))
    before = samples(client.get("/metrics", headers=AUTH).get_data(True)).get(key, 0)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{db_path}{suffix}"):
            os.remove(f"{db_path}{suffix}")
    assert client.get("/api/v1/customers/c1", headers=AUTH).json["code"] == "database_unavailable"
    answer = client.get("/metrics", headers=AUTH)  # its backlog read fails too: one more
    assert answer.status_code == 200
    assert samples(answer.get_data(True))[key] == before + 2


@pytest.mark.postgres
def test_postgres_errors_are_counted_by_code_and_a_scrape_still_answers(postgres, tmp_path):
    app = create_app(
        {
            "TESTING": True,
            "CUSTOMERS_DATABASE_URL": postgres.url("no_such_database"),  # the server answers no
            "CUSTOMERS_POSTGRES_POOL_TIMEOUT": 0.3,
            "CUSTOMERS_API_KEYS": API_KEY,
            "CUSTOMERS_API_KEY_FILE": str(tmp_path / "api-keys"),
        }
    )
    client = app.test_client()
    key = ("customers_database_errors_total", (("code", "database_unavailable"),))
    before = samples(client.get("/metrics", headers=AUTH).get_data(True)).get(key, 0)
    assert client.get("/api/v1/customers/c1", headers=AUTH).json["code"] == "database_unavailable"
    answer = client.get("/metrics", headers=AUTH)  # its backlog read fails too: one more
    assert answer.status_code == 200
    assert samples(answer.get_data(True))[key] == before + 2
    database.close_connections()


def test_the_webhook_backlog_is_a_gauge_per_endpoint(client, runner):
    added = runner.invoke(args=["customers", "add-webhook", "http://127.0.0.1:9/hooks"])
    endpoint = json.loads(added.stdout)["id"]
    for n in range(3):
        post_customer(client, {"customer_id": f"c{n}", "name": "N"})
    scraped = samples(client.get("/metrics", headers=AUTH).get_data(True))
    assert series(scraped, "customers_webhook_backlog") == {(("endpoint", endpoint),): 3.0}
    assert series(scraped, "customers_webhook_failed") == {(("endpoint", endpoint),): 0.0}


def host_app(tmp_path, **config) -> Flask:
    host = Flask("host")
    host.config.update(
        CUSTOMERS_DATABASE=str(tmp_path / "customers.sqlite3"),
        CUSTOMERS_API_KEYS=API_KEY,
        **config,
    )
    host.register_blueprint(bp, url_prefix="/billing")
    prepare_database(host)
    return host


def test_a_host_app_serves_metrics_only_when_it_chooses(tmp_path):
    quiet = host_app(tmp_path).test_client()
    assert quiet.get("/billing/metrics", headers=AUTH).status_code == 404
    assert quiet.get("/billing/metrics", headers=AUTH).content_type.startswith("text/html")
    serving = host_app(tmp_path, CUSTOMERS_METRICS_ROUTE=True).test_client()
    answer = serving.get("/billing/metrics", headers=AUTH)
    assert answer.status_code == 200
    assert (REQUESTS, requests_key("/billing/metrics", "GET", 200)) not in samples(
        answer.get_data(True)
    )
    again = serving.get("/billing/metrics", headers=AUTH).get_data(True)
    assert (REQUESTS, requests_key("/billing/metrics", "GET", 200)) in samples(again)


def test_metrics_off_counts_nothing_and_serves_no_route(tmp_path):
    config = {
        "TESTING": True,
        "CUSTOMERS_DATABASE": str(tmp_path / "off.sqlite3"),
        "CUSTOMERS_API_KEYS": API_KEY,
        "CUSTOMERS_API_KEY_FILE": str(tmp_path / "api-keys"),
    }
    off = create_app({**config, "CUSTOMERS_METRICS": "false"})
    prepare_database(off)
    counting = create_app(config).test_client()
    before = samples(counting.get("/metrics", headers=AUTH).get_data(True))
    assert off.test_client().get("/metrics", headers=AUTH).status_code == 404
    assert post_customer(off.test_client(), {"customer_id": "c", "name": "N"}).status_code == 200
    after = samples(counting.get("/metrics", headers=AUTH).get_data(True))
    changed = {key for key in after if after[key] != before.get(key) and "/metrics" not in str(key)}
    assert not {key for key in changed if key[0].startswith("customers_http_requests")}


@pytest.mark.parametrize(
    "setting, value",
    [
        ("CUSTOMERS_LOG_FORMAT", "xml"),
        ("CUSTOMERS_TRUSTED_PROXIES", "-1"),
        ("CUSTOMERS_TRUSTED_PROXIES", "one"),
    ],
)
def test_a_bad_operating_setting_stops_the_start(tmp_path, setting, value):
    keys = tmp_path / "api-keys"
    with pytest.raises(ValueError, match=setting):
        create_app(
            {
                "CUSTOMERS_DATABASE": str(tmp_path / "x.sqlite3"),
                "CUSTOMERS_API_KEY_FILE": str(keys),
                setting: value,
            }
        )
    assert not keys.exists()  # a start refused for its settings makes no key


def test_the_in_flight_gauge_counts_the_scrape_itself(client):
    scraped = samples(client.get("/metrics", headers=AUTH).get_data(True))
    assert series(scraped, "customers_http_requests_in_flight") == {(): 1.0}


def metrics_folders() -> set[str]:
    """The metrics folders gunicorn.conf.py has made and not yet removed."""
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "customers-metrics-*")))


def started_with_its_metrics_folder(tmp_path) -> tuple[Gunicorn, str]:
    before = metrics_folders()
    gunicorn = Gunicorn(tmp_path, workers=1).start()
    [folder] = metrics_folders() - before
    return gunicorn, folder


@pytest.mark.system
def test_a_start_removes_only_the_metrics_folders_of_killed_gunicorns(tmp_path):
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    live, live_folder = started_with_its_metrics_folder(tmp_path)
    try:
        killed, left = started_with_its_metrics_folder(tmp_path)
        killed.stop(signal.SIGKILL)  # no on_exit: its folder stays
        assert os.path.isdir(left)
        clean = Gunicorn(tmp_path, workers=1).start()
        assert not os.path.exists(left), "a killed gunicorn's folder is removed at the next start"
        assert os.path.isdir(live_folder), "a live gunicorn's folder is left alone"
        assert requests.get(live.url + "/metrics", headers=AUTH, timeout=10).status_code == 200
        clean.stop()
    finally:
        live.stop()
    assert not os.path.exists(live_folder), "a gunicorn removes its own folder when it stops"


@pytest.mark.system
def test_a_request_never_fails_for_its_metrics(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    gunicorn = Gunicorn(tmp_path, workers=1, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    gunicorn.start()
    try:
        shutil.rmtree(metrics_dir)  # an operator's mistake: where the counts go is gone
        first = set(gunicorn_workers(gunicorn))
        os.kill(gunicorn.proc.pid, signal.SIGTTIN)  # a new worker, whose files cannot be made
        wait_for(lambda: set(gunicorn_workers(gunicorn)) - first)
        os.kill(gunicorn.proc.pid, signal.SIGTTOU)  # gunicorn stops the oldest
        wait_for(lambda: not set(gunicorn_workers(gunicorn)) & first)
        for _ in range(3):
            answer = requests.get(gunicorn.url + "/api/v1/customers", headers=AUTH, timeout=10)
            assert answer.status_code == 200
    finally:
        gunicorn.stop()
    assert gunicorn.log().count("metrics: cannot write the counts") == 1


def gunicorn_workers(gunicorn: Gunicorn) -> list[int]:
    """The pids of the gunicorn's workers (its master's children)."""
    pid = gunicorn.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]

"""What the service's processes print, as `make run` starts them (init-db, the deliverer,
gunicorn and its workers) and as an operator runs its commands: a key is shown once, when it is
made; with CUSTOMERS_LOG_FORMAT=json every line of every process is one JSON object."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from support.servers import Gunicorn
from support.service import FLASK, ROOT

pytestmark = pytest.mark.system


def environment(tmp_path: Path, log_format: str) -> dict:
    """The environment of every process: no key configured, so the first start makes one."""
    return {
        **os.environ,
        "CUSTOMERS_DATABASE": str(tmp_path / "customers.sqlite3"),
        "CUSTOMERS_API_KEYS": "",
        "CUSTOMERS_API_KEY_FILE": str(tmp_path / "api-keys"),
        "CUSTOMERS_LOG_FORMAT": log_format,
        "CUSTOMERS_WEBHOOK_POLL_SECONDS": "0.1",
    }


def command(env: dict, *args: str, stdin: str | None = None) -> str:
    """A `customers` command's whole output, stdout then stderr."""
    done = subprocess.run(
        [*FLASK, "customers", *args],
        env=env,
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout + done.stderr


def deliverer_output(env: dict, tmp_path: Path) -> str:
    """Start the deliverer, let it poll, stop it with SIGTERM; its whole output."""
    log_path = tmp_path / f"deliverer-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*FLASK, "customers", "deliver-webhooks"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while b"delivering webhooks" not in log_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return log_path.read_text()


def served(env: dict, tmp_path: Path, key: str, fault: bool = False) -> str:
    """Start gunicorn with 2 workers, send requests that pass and fail auth (and, with
    ``fault``, some while the database file is gone), stop it; its whole log."""
    server = Gunicorn(tmp_path, env=env)
    server.start()
    try:
        good = {"Authorization": f"Bearer {key}"}
        customer = {"customer": {"customer_id": "c-1", "name": "Zoë", "metadata": {"a": "1"}}}
        assert requests.post(server.url + "/api/v1/customers", json=customer, headers=good).ok
        assert requests.get(server.url + "/api/v1/customers/c-1", headers=good).ok
        for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"}):
            response = requests.get(server.url + "/api/v1/customers", headers=bad)
            assert response.status_code == 401
        assert requests.get(server.url + "/nowhere", headers=good).status_code == 404
        if fault:
            database = Path(env["CUSTOMERS_DATABASE"])
            moved = database.rename(database.with_suffix(".away"))
            for _ in range(4):
                response = requests.get(server.url + "/api/v1/customers/c-1", headers=good)
                assert response.status_code == 503
            moved.rename(database)
    finally:
        server.stop()
    return server.log()


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_key_is_shown_once_when_it_is_made(tmp_path, log_format):
    env = environment(tmp_path, log_format)
    made = command(env, "init-db")  # what `make run` runs first
    key = (tmp_path / "api-keys").read_text().strip()
    assert made.count(key) == 1, made
    later = [
        command(env, "init-db"),
        served(env, tmp_path, key),
        served(env, tmp_path, key),
        command(env, "import", "-", "--format", "jsonl", stdin='{"customer_id":"i","name":"I"}\n'),
        command(env, "export"),
        command(env, "list-api-keys"),
        deliverer_output(env, tmp_path),
    ]
    for output in later:
        shown = [key[i : i + 9] for i in range(len(key) - 8) if key[i : i + 9] in output]
        assert shown == [], output  # nothing of the key beyond its first 8 characters
    assert str(tmp_path / "api-keys") in later[0]  # later starts name the key file


def test_json_logs_are_json_on_every_line_of_every_process(tmp_path):
    env = environment(tmp_path, "json")
    outputs = {"init-db": command(env, "init-db")}
    key = (tmp_path / "api-keys").read_text().strip()
    outputs["deliverer"] = deliverer_output(env, tmp_path)
    outputs["gunicorn"] = served(env, tmp_path, key, fault=True)
    outputs["import"] = command(
        env, "import", "-", "--format", "jsonl", stdin='{"customer_id":"i","name":"I"}\n{}\n'
    )
    outputs["export"] = command(env, "export")
    for name, output in outputs.items():
        lines = output.splitlines()
        assert lines, name
        for line in lines:
            assert isinstance(json.loads(line), dict), (name, line)
    gunicorn = [json.loads(line) for line in outputs["gunicorn"].splitlines()]
    assert any(line.get("status") == 503 for line in gunicorn)  # the fault was logged
    assert any(line.get("status") == 401 for line in gunicorn)
    assert any("Serving on" in line.get("message", "") for line in gunicorn)

"""Fixtures: an app on a fresh SQLite file, its client, an in-memory connection, a real gunicorn."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from customers_service import storage
from customers_service.app import create_app
from customers_service.database import prepare_database

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# The user's spec's example (less its trailing comma), copied here on purpose: tests hold the code
# to the spec, so they do not read the code's own copy (schemas.SEED_EXAMPLE).
SEED = {
    "customer_id": "5eb02857-a71e-4ea2-bcf9-57d3a41bc6ba",
    "name": "Gavin Belson",
    "country": "US",
    "address_line1": "5230 Penfield Ave",
    "address_line2": None,
    "state": "CA",
    "zipcode": "91364",
    "email": "dinesh@piedpiper.test",
    "city": "Woodland Hills",
    "url": "http://hooli.com",
    "phone": "1-171-883-3711 x245",
    "logo_url": "http://hooli.com/logo.png",
    "legal_name": "Coleman-Blair",
    "legal_number": "49-008-2965",
}


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "customers.sqlite3"


def started_app(test_config: dict | None = None):
    """The standalone app with its database prepared, as a server's start does."""
    app = create_app(test_config)
    prepare_database(app)
    return app


@pytest.fixture
def app(tmp_path, db_path):
    return started_app(
        {
            "TESTING": True,
            "CUSTOMERS_DATABASE": str(db_path),
            "CUSTOMERS_API_KEYS": API_KEY,
            "CUSTOMERS_API_KEY_FILE": str(tmp_path / "api-keys"),
        }
    )


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def conn():
    connection = storage.connect(":memory:")
    storage.migrate(connection)
    yield connection
    connection.close()


def post_customer(client, customer: dict, headers: dict | None = None):
    """POST one customer in its envelope with the test key."""
    return client.post(
        "/api/v1/customers",
        json={"customer": customer},
        headers=AUTH if headers is None else headers,
    )


def answers(url: str, proc: subprocess.Popen, seconds: float = 30) -> bool:
    """Wait until ``url`` answers HTTP; False if ``proc`` ends or time runs out first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            requests.get(url, timeout=1)
            return True
        except requests.ConnectionError:
            time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gunicorn:
    """A real gunicorn serving wsgi:app on a loopback port, stopped by its own pid."""

    def __init__(
        self,
        tmp_path: Path,
        workers: int = 2,
        env: dict | None = None,
        db_path: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_path = db_path or tmp_path / "customers.sqlite3"
        self.extra_args = list(extra_args)
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        self.env = {
            **os.environ,
            "CUSTOMERS_DATABASE": str(self.db_path),
            "CUSTOMERS_API_KEYS": API_KEY,
            "CUSTOMERS_API_KEY_FILE": str(tmp_path / "api-keys"),
            **(env or {}),
        }
        self.workers = workers
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gunicorn":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "gunicorn.conf.py",
                "-b",
                f"127.0.0.1:{self.port}",
                "-w",
                str(self.workers),
                *self.extra_args,
                "wsgi:app",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so its workers stop with it
        )
        log.close()
        if not answers(self.url + "/health", self.proc):
            self.stop()
            raise RuntimeError(f"gunicorn did not answer:\n{self.log()}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the process group we started, and wait for the master to end."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def server(tmp_path):
    gunicorn = Gunicorn(tmp_path).start()
    yield gunicorn
    gunicorn.stop()

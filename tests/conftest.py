"""Fixtures: an app on a fresh database of either backend (SQLite, or a PostgreSQL cluster the
tests start themselves), its client, an in-memory connection, a real gunicorn."""

import os
import random
import shutil
import signal
import sqlite3
import string
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from postgres_cluster import PostgresCluster, free_port, psycopg_connect

from customers_service import database, storage
from customers_service.app import create_app
from customers_service.backends.sqlite import connections as sqlite_connections
from customers_service.backends.sqlite import schema as sqlite_schema
from customers_service.database import prepare_database

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key-0123456789"
# flask's command line on the standalone service, from any folder (see __main__.py).
FLASK = (sys.executable, "-m", "customers_service")
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


BACKENDS = ("sqlite", "postgres")


def pytest_generate_tests(metafunc):
    """Tests of the API's behaviour run on both backends; a test that asks for ``db_path`` (the
    SQLite file) is about SQLite's own machinery and runs on SQLite only."""
    if "backend" in metafunc.fixturenames:
        only_sqlite = "db_path" in metafunc.fixturenames
        metafunc.parametrize("backend", ["sqlite"] if only_sqlite else BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL cluster, started once."""
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        cluster.make_template()
        yield cluster
    finally:
        cluster.remove()


class Backend:
    """One test's database on one backend: the app's settings for it, and plain SQL on it."""

    def __init__(self, name: str, config: dict, sqlite_path: Path | None = None, url: str = ""):
        self.name, self.config, self.sqlite_path, self.url = name, config, sqlite_path, url

    def fetch(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of a query written in the SQL both backends share (``?`` for parameters)."""
        if self.name == "sqlite":
            with sqlite3.connect(self.sqlite_path) as db:
                return db.execute(sql, params).fetchall()
        with psycopg_connect(self.url) as conn:
            return conn.execute(sql.replace("?", "%s"), params).fetchall()

    def execute_many(self, sql: str, rows: list[tuple]) -> None:
        """A statement in the SQL both backends share, once per row, in one transaction."""
        if self.name == "sqlite":
            with sqlite3.connect(self.sqlite_path) as db:
                db.executemany(sql, rows)
            return
        with psycopg_connect(self.url) as conn, conn.transaction():
            conn.cursor().executemany(sql.replace("?", "%s"), rows)

    @property
    def env(self) -> dict:
        """The same settings as environment variables, for a server process."""
        return {key: str(value) for key, value in self.config.items()}


@pytest.fixture
def backend(request, tmp_path):
    """A fresh database on the backend of this test's parameter (SQLite when not given)."""
    name = getattr(request, "param", "sqlite")
    if name == "sqlite":
        path = tmp_path / "customers.sqlite3"
        yield Backend("sqlite", {"CUSTOMERS_DATABASE": str(path)}, sqlite_path=path)
        return
    cluster = request.getfixturevalue("postgres")
    database_name = cluster.new_database()
    url = cluster.url(database_name)
    yield Backend("postgres", {"CUSTOMERS_DATABASE_URL": url}, url=url)
    database.close_connections()
    cluster.drop_database(database_name)


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "customers.sqlite3"


def started_app(test_config: dict | None = None):
    """The standalone app with its database prepared, as a server's start does."""
    app = create_app(test_config)
    prepare_database(app)
    return app


@pytest.fixture
def app(tmp_path, backend):
    return started_app(
        {
            "TESTING": True,
            **backend.config,
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
    connection = sqlite_connections.connect(":memory:")
    sqlite_schema.migrate(connection)
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


class Gunicorn:
    """A real gunicorn serving wsgi:app on a loopback port, stopped by its own pid."""

    def __init__(
        self,
        tmp_path: Path,
        workers: int = 2,
        env: dict | None = None,
        db_path: Path | None = None,
        extra_args: tuple[str, ...] = (),
        host: str = "127.0.0.1",
        namespace: str | None = None,
    ):
        self.port = free_port()
        self.host, self.namespace = host, namespace
        self.url = f"http://{host}:{self.port}"
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
        in_namespace = ["ip", "netns", "exec", self.namespace] if self.namespace else []
        self.proc = subprocess.Popen(
            [
                *in_namespace,  # ip execs the server: the pid stays the server's
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "gunicorn.conf.py",
                "-b",
                f"{self.host}:{self.port}",
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
def server(tmp_path, backend):
    gunicorn = Gunicorn(tmp_path, env=backend.env).start()
    gunicorn.backend = backend
    yield gunicorn
    gunicorn.stop()


# The README's nginx block, plus what a test needs to run it unprivileged in a temporary folder.
NGINX_CONF = """
worker_processes 1;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream customers {{ {servers} }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64k;
        client_header_timeout 10s;
        client_body_timeout 10s;
        location / {{
            proxy_pass http://customers;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Request-Id $http_x_request_id;
        }}
    }}
}}
"""


class Nginx:
    """nginx on a loopback port in front of gunicorns, as the README sets it up; stopped by its
    own pid."""

    def __init__(self, prefix: Path, upstreams: list[str]):
        self.prefix, self.upstreams = prefix, upstreams
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.prefix.mkdir(exist_ok=True)
        conf = self.prefix / "nginx.conf"
        servers = " ".join(f"server {address};" for address in self.upstreams)
        conf.write_text(NGINX_CONF.format(prefix=self.prefix, servers=servers, port=self.port))
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", str(self.prefix), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not answers(self.url + "/health", self.proc, seconds=15):
            self.stop()
            pytest.fail(f"nginx did not start: {(self.prefix / 'error.log').read_text()}")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


CUSTOMER_FIELDS = [
    f for f in storage.FIELDS if f not in ("customer_id", "name", "email", "url", "logo_url")
]


def walk_pages_while_inserting(
    url: str, query: dict, new_customer, at_most: int
) -> tuple[list[dict], int]:
    """Every page of GET /api/v1/customers with ``query``, walked while another client inserts
    ``new_customer(i)`` for i = 0, 1, ... (at most ``at_most``); returns the pages' bodies and
    how many customers the other client inserted meanwhile."""
    customers_url = url + "/api/v1/customers"
    stop = threading.Event()
    inserted = []

    def insert_while_walking():
        with requests.Session() as session:
            session.headers.update(AUTH)
            while not stop.is_set() and len(inserted) < at_most:
                body = {"customer": new_customer(len(inserted))}
                session.post(customers_url, json=body).raise_for_status()
                inserted.append(body)

    writer = threading.Thread(target=insert_while_walking)
    writer.start()
    pages = []
    try:
        with requests.Session() as session:
            session.headers.update(AUTH)
            page = 1
            while page is not None:
                response = session.get(customers_url, params={**query, "page": page})
                assert response.status_code == 200, response.text
                pages.append(response.json())
                page = pages[-1]["meta"]["next_page"]
    finally:
        stop.set()
        writer.join()
    return pages, len(inserted)


def answers_of_both_backends(postgres, tmp_path: Path, source: Path, ask) -> dict:
    """``ask(client)`` on each backend ("sqlite", "postgres"), each a fresh database into which
    ``source`` (JSON Lines) was imported."""
    name = postgres.new_database()
    answers = {}
    try:
        for label, config in (
            ("sqlite", {"CUSTOMERS_DATABASE": str(tmp_path / "same.sqlite3")}),
            ("postgres", {"CUSTOMERS_DATABASE_URL": postgres.url(name)}),
        ):
            app = started_app({**config, "CUSTOMERS_API_KEYS": API_KEY})
            imported = app.test_cli_runner().invoke(args=["customers", "import", str(source)])
            assert imported.exit_code == 0, imported.output
            answers[label] = ask(app.test_client())
            database.close_connections()
    finally:
        postgres.drop_database(name)
    return answers


def random_customer(client_number: int, sequence: int) -> dict:
    """A distinct customer with random text in every free-text field."""
    letters = string.ascii_letters + string.digits + " éü-/%"
    customer = {
        "customer_id": f"crash-{client_number}-{sequence}-{random.randrange(10**9)}",
        "name": "".join(random.choices(letters, k=20)).strip() or "N",
        "email": f"c{client_number}.{sequence}@example.com",
        "url": f"https://example.com/{sequence}",
    }
    for field in CUSTOMER_FIELDS:
        if field == "country":
            customer[field] = random.choice(["US", "FR", "DE", None])
        else:
            customer[field] = random.choice([None, "".join(random.choices(letters, k=12))])
    return customer


class WriteLoad:
    """Client threads posting distinct customers until stopped; remembers every 200."""

    def __init__(self, url: str, clients: int = 8):
        self.url, self.clients = url, clients
        self.acked: list[dict] = []
        self.statuses: list[int] = []
        self.connection_errors = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,)) for n in range(clients)]

    def run(self, client_number: int) -> None:
        sequence = 0
        while not self.stop.is_set() and sequence < 5000:
            sequence += 1
            customer = random_customer(client_number, sequence)
            try:
                response = requests.post(
                    self.url + "/api/v1/customers",
                    json={"customer": customer},
                    headers=AUTH,
                    timeout=10,
                )
            except requests.RequestException as e:
                self.connection_errors += 1
                self.errors.append(repr(e))
                time.sleep(0.01)
                continue
            self.statuses.append(response.status_code)
            if response.status_code == 200:
                self.acked.append(customer)

    def __enter__(self) -> "WriteLoad":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def assert_all_acknowledged_present(backend: "Backend", acked: list[dict]) -> None:
    """Every acknowledged customer is stored with exactly the values sent."""
    columns = ", ".join(storage.FIELDS)
    stored = {
        row[0]: dict(zip(storage.FIELDS, row, strict=True))
        for row in backend.fetch(f"SELECT {columns} FROM customers")
    }
    for customer in acked:
        row = stored.get(customer["customer_id"])
        assert row is not None, f"acknowledged but lost: {customer['customer_id']}"
        assert {k: row[k] for k in customer} == customer


@contextmanager
def small_filesystem(path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the test: a disk that can really fill up."""
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs (root is needed): {result.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path) -> None:
    """Write a file until the filesystem is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass

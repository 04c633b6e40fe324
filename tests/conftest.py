"""Fixtures: an app on a fresh database of either backend (SQLite, or a PostgreSQL cluster the
tests start themselves), its client, an in-memory connection, a real gunicorn. The helpers the
tests import live in support/."""

import signal
from pathlib import Path

import pytest
from support.databases import Backend
from support.postgres_cluster import PostgresCluster
from support.servers import Gunicorn
from support.service import API_KEY, started_app

from customers_service import database
from customers_service.backends.sqlite import connections as sqlite_connections
from customers_service.backends.sqlite import schema as sqlite_schema

# The PostgreSQL variant needs the cluster (root and Debian's postgresql): marked, so that
# `-m "not postgres"` keeps the SQLite variant and never starts the cluster.
BACKENDS = ("sqlite", pytest.param("postgres", marks=pytest.mark.postgres))

# A test that asks for one of these fixtures needs what the mark says.
FIXTURE_MARKS = {"postgres": "postgres", "server": "system"}


def pytest_configure(config):
    """Ctrl-C as a terminal delivers it, whoever started the run.

    A shell without job control starts a command put in the background (``make test &``) with
    SIGINT ignored; Python then installs no KeyboardInterrupt handler, and the commands the
    tests start inherit the ignored signal. The tests of Ctrl-C would then fail for the way the
    run was started, not for the code.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_generate_tests(metafunc):
    """Tests of the API's behaviour run on both backends; a test that asks for ``db_path`` (the
    SQLite file) is about SQLite's own machinery and runs on SQLite only."""
    if "backend" in metafunc.fixturenames:
        only_sqlite = "db_path" in metafunc.fixturenames
        metafunc.parametrize("backend", ["sqlite"] if only_sqlite else BACKENDS, indirect=True)


def pytest_collection_modifyitems(items):
    """Refuse a test that asks for the cluster or a real server without the matching mark: a
    run that deselects the mark must never start either."""
    for item in items:
        for fixture, mark in FIXTURE_MARKS.items():
            if fixture in getattr(item, "fixturenames", ()) and not item.get_closest_marker(mark):
                raise pytest.UsageError(f"{item.nodeid} uses the {fixture} fixture: mark it {mark}")


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


@pytest.fixture
def backend(request, tmp_path):
    """A fresh database on the backend of this test's parameter (SQLite when not given)."""
    name = getattr(request, "param", "sqlite")
    if name == "sqlite":
        path = tmp_path / "customers.sqlite3"
        yield Backend("sqlite", {"CUSTOMERS_DATABASE": str(path)}, sqlite_path=path)
        database.close_connections()  # a file descriptor or two each: a test leaves none open
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


@pytest.fixture
def server(tmp_path, backend):
    gunicorn = Gunicorn(tmp_path, env=backend.env).start()
    gunicorn.backend = backend
    yield gunicorn
    gunicorn.stop()

"""What the benchmarks that call the apps in-process share (cost.py, request_cpu.py,
filters.py): requests as WSGI environs, with no server and no socket, so that next to nothing is
spent outside the app; and a throwaway database of either backend, and its removal."""

import io
import json
import os
import shutil
import sys

from customers_service import database
from customers_service.schemas import SEED_EXAMPLE

KEY = "bench-key"
# The customer each in-process benchmark stores and sends: the contract's example, without its
# null and its logo_url.
SEED = {
    k: v for k, v in SEED_EXAMPLE.items() if k not in ("customer_id", "address_line2", "logo_url")
}


def database_config(backend: str, folder: str, name: str) -> tuple[dict, object]:
    """The settings of a throwaway database ``name`` of ``backend``, and the PostgreSQL cluster
    started for it (None on SQLite), for the caller to remove. SQLite runs with synchronous
    NORMAL, so that FULL's WAL fsyncs do not vary the figures."""
    if backend == "sqlite":
        path = os.path.join(folder, f"{name}.sqlite3")
        return {"CUSTOMERS_DATABASE": path, "CUSTOMERS_SQLITE_SYNCHRONOUS": "NORMAL"}, None
    from support.postgres_cluster import PostgresCluster  # tests/ on the caller's path

    cluster = PostgresCluster()
    cluster.init()
    cluster.start()
    cluster.admin(f"CREATE DATABASE {name}")
    return {"CUSTOMERS_DATABASE_URL": cluster.url(name)}, cluster


def remove_throwaways(folder: str, cluster) -> None:
    """Close this process's connections, then remove the cluster (None: none was started) and
    the folder."""
    database.close_connections()
    if cluster is not None:
        cluster.remove()
    shutil.rmtree(folder, ignore_errors=True)


def environ(method: str, path: str, body: dict | None = None, query: str = "") -> dict:
    """The environ of one request with the benchmarks' key, and ``body`` as its JSON."""
    data = json.dumps(body).encode() if body is not None else b""
    env = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_AUTHORIZATION": f"Bearer {KEY}",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(data),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }
    if body is not None:
        env["CONTENT_TYPE"] = "application/json"
        env["CONTENT_LENGTH"] = str(len(data))
    return env


def customer(customer_id: str) -> dict:
    """An upsert's body: the seed customer under ``customer_id``."""
    return {"customer": {**SEED, "customer_id": customer_id}}

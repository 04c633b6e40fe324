"""Gunicorn's deployment defaults for the customers service (see the README)."""

import os

bind = os.environ.get("CUSTOMERS_BIND", "127.0.0.1:8000")
# Two per core: while one waits on its commit's fsync, another uses the core.
workers = int(os.environ.get("CUSTOMERS_WORKERS", 2 * (os.cpu_count() or 1)))
worker_class = "sync"
# Above CUSTOMERS_SQLITE_TIMEOUT (5 s): a worker waiting for the write lock is not a stuck one.
timeout = 30
graceful_timeout = 10
keepalive = 2
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# The service writes its own access line, with the request id; gunicorn's would repeat it.
accesslog = None
errorlog = "-"
# No control socket: one fixed path in $HOME would be shared by every gunicorn on the machine.
control_socket_disable = True


def on_starting(server) -> None:
    """Create or migrate the database, and the first API key, before any worker forks.

    Workers never create a database: one that goes missing is a 503 until it is back.
    """
    from customers_service.app import create_app, prepare_or_exit

    prepare_or_exit(create_app())

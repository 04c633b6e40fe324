"""Gunicorn for the benchmark's peer: the service's settings (gunicorn.conf.py at the top), with
uvicorn's workers instead of sync ones."""

import os

bind = os.environ.get("PEER_BIND", "127.0.0.1:8001")
# As many as the service's: CUSTOMERS_WORKERS, or two per core.
workers = int(os.environ.get("CUSTOMERS_WORKERS", 2 * (os.cpu_count() or 1)))
worker_class = "uvicorn.workers.UvicornWorker"
timeout = 30
graceful_timeout = 10
keepalive = 2
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = None
errorlog = "-"
control_socket_disable = True
# The peer's package, fastapi_customers, lives beside this file.
pythonpath = os.path.dirname(os.path.abspath(__file__))

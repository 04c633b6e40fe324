"""Requests as WSGI environs, for the benchmarks that call the apps in-process (cost.py,
request_cpu.py): no server and no socket, so next to nothing is spent outside the app."""

import io
import json
import sys

KEY = "bench-key"
# The customer each in-process benchmark stores and sends (bench/wrk.lua's but its logo_url).
SEED = {
    "name": "Gavin Belson",
    "country": "US",
    "address_line1": "5230 Penfield Ave",
    "state": "CA",
    "zipcode": "91364",
    "email": "dinesh@piedpiper.test",
    "city": "Woodland Hills",
    "url": "http://hooli.com",
    "phone": "1-171-883-3711 x245",
    "legal_name": "Coleman-Blair",
    "legal_number": "49-008-2965",
}


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

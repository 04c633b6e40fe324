"""The customers blueprint, its Flask glue and error mapping, and the standalone app factory."""

import collections
import contextlib
import csv
import fcntl
import functools
import hmac
import io
import json
import logging
import os
import re
import secrets
import signal
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from http import HTTPStatus
from urllib.parse import quote

import click
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import (
    Blueprint,
    Flask,
    current_app,
    g,
    jsonify,
    render_template_string,
    request,
    send_from_directory,
    url_for,
)
from marshmallow import ValidationError
from swagger_ui_bundle import swagger_ui_path
from werkzeug.exceptions import ClientDisconnected, HTTPException
from werkzeug.routing import BaseConverter

import schemas
import storage
from schemas import customer_schema, pagination_schema

bp = Blueprint("customers", __name__, cli_group="customers")

SETTINGS = (
    "CUSTOMERS_DATABASE",
    "CUSTOMERS_API_KEYS",
    "CUSTOMERS_API_KEY_FILE",
    "CUSTOMERS_REQUIRE_API_KEY",
    "CUSTOMERS_MAX_BODY_BYTES",
    "CUSTOMERS_SQLITE_SYNCHRONOUS",
    "CUSTOMERS_SQLITE_TIMEOUT",
    "CUSTOMERS_MIN_FREE_BYTES",
)
PUBLIC_ENDPOINTS = {
    "customers.openapi_document",
    "customers.health",
    "customers.docs",
    "customers.docs_asset",
}
CUSTOMER_MISSING = "param is missing or the value is empty or invalid: customer"
HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
REQUEST_ID_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))

error_log = logging.getLogger("customers.errors")


class ApiError(Exception):
    """An error the API answers with its envelope."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str | None = None,
        details: dict | None = None,
        headers: dict | None = None,
    ):
        super().__init__(code)
        self.status, self.code, self.message = status, code, message
        self.details, self.headers = details, headers or {}


class CustomerIdConverter(BaseConverter):
    """Any non-empty rest of the path, slashes included: every customer_id is addressable."""

    regex = "[\\s\\S]+"  # "." would stop at a newline
    part_isolating = False


class _CurrentStreamHandler(logging.StreamHandler):
    """A handler that writes to the current sys.stdout or sys.stderr, even if it was swapped."""

    def __init__(self, name: str):
        self._stream_name = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    """Send error lines to stderr, once per process."""
    if not error_log.handlers:
        handler = _CurrentStreamHandler("stderr")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        error_log.addHandler(handler)
        error_log.setLevel(logging.INFO)
        error_log.propagate = False


@bp.record_once
def _on_register(state) -> None:
    check_settings(state.app.config)
    state.app.url_map.converters.setdefault("customer_id", CustomerIdConverter)
    _setup_logging()


# --- settings --------------------------------------------------------------------------------


DEFAULTS = {
    "CUSTOMERS_API_KEYS": "",
    "CUSTOMERS_REQUIRE_API_KEY": True,
    "CUSTOMERS_MAX_BODY_BYTES": 65536,
    "CUSTOMERS_SQLITE_SYNCHRONOUS": "FULL",
    "CUSTOMERS_SQLITE_TIMEOUT": 5.0,
    "CUSTOMERS_MIN_FREE_BYTES": 1 << 20,
}
INSTANCE_FILES = {"CUSTOMERS_DATABASE": "customers.sqlite3", "CUSTOMERS_API_KEY_FILE": "api-keys"}


def setting(name: str):
    """A CUSTOMERS_* setting of the current app, or its default."""
    config = current_app.config
    if name in config:
        return config[name]
    if name in INSTANCE_FILES:
        return os.path.join(current_app.instance_path, INSTANCE_FILES[name])
    return DEFAULTS[name]


def check_settings(config) -> None:
    """Refuse, at start, a setting the service could only fail on at every request."""
    synchronous = str(config.get("CUSTOMERS_SQLITE_SYNCHRONOUS", "FULL")).upper()
    if synchronous not in storage.SYNCHRONOUS_MODES:
        raise ValueError(f"CUSTOMERS_SQLITE_SYNCHRONOUS must be one of {storage.SYNCHRONOUS_MODES}")
    for name in (
        "CUSTOMERS_MAX_BODY_BYTES",
        "CUSTOMERS_MIN_FREE_BYTES",
        "CUSTOMERS_SQLITE_TIMEOUT",
    ):
        try:
            float(config.get(name, 0))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, not {config[name]!r}") from None


def _flag(value) -> bool:
    """A boolean setting, from a bool or from an environment string."""
    if isinstance(value, str):
        return value.strip().lower() not in {"0", "false", "no", "off", ""}
    return bool(value)


# --- API keys --------------------------------------------------------------------------------

_key_file_cache: dict[str, tuple[tuple, list[str]]] = {}


def read_key_file(path: str) -> list[str]:
    """The keys in a key file, one a line, re-read only when the file changes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    cached = _key_file_cache.get(path)
    if cached and cached[0] == stamp:
        return cached[1]
    with open(path, encoding="utf-8") as f:
        keys = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    _key_file_cache[path] = (stamp, keys)
    return keys


def configured_keys() -> list[str]:
    """Keys from CUSTOMERS_API_KEYS (a comma-separated string or a list)."""
    keys = setting("CUSTOMERS_API_KEYS") or []
    if isinstance(keys, str):
        return list(_split_keys(keys))
    return [k.strip() for k in keys if k and k.strip()]


@functools.lru_cache(maxsize=8)
def _split_keys(keys: str) -> tuple[str, ...]:
    # The environment's string is split once, not at every request.
    return tuple(k.strip() for k in keys.split(",") if k.strip())


def api_keys() -> list[str]:
    """Every key that opens the API now: configured ones and those in the key file."""
    return configured_keys() + read_key_file(setting("CUSTOMERS_API_KEY_FILE"))


def new_api_key() -> str:
    """A fresh random API key."""
    return "cus_" + secrets.token_urlsafe(32)


def add_key_to_file(path: str, key: str) -> None:
    """Append a key to the key file, creating it readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(key + "\n")


def ensure_api_key(app: Flask) -> None:
    """Create a key file with one key when the app has no key at all, and say where it is."""
    with app.app_context():
        if not _flag(setting("CUSTOMERS_REQUIRE_API_KEY")) or api_keys():
            return
        path = setting("CUSTOMERS_API_KEY_FILE")
        try:
            # O_EXCL: when several workers start at once, exactly one creates the key.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new_api_key() + "\n")
    _setup_logging()
    error_log.warning("no API key was configured: created one in %s", path)


def key_is_valid(presented: str, keys: list[str]) -> bool:
    """Compare a presented key with every known key in constant time."""
    presented_bytes = presented.encode("utf-8", "surrogateescape")
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented_bytes, key.encode("utf-8"))
    return found


def bearer_token() -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


# --- the database connection -----------------------------------------------------------------

_thread = threading.local()
_migrated: set[tuple[int, str]] = set()


def _file_identity(path: str) -> tuple[int, int]:
    """The device and inode of a file, raising DatabaseMissing if there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise storage.DatabaseMissing("database file is missing") from None
    return st.st_dev, st.st_ino


def open_database(path: str, synchronous: str, timeout: float) -> sqlite3.Connection:
    """Open a connection, creating and migrating the database on its first use in this process."""
    if (os.getpid(), path) not in _migrated:
        conn = storage.connect(path, synchronous=synchronous, timeout=timeout, create=True)
        storage.migrate(conn)
        _migrated.add((os.getpid(), path))
        return conn
    return storage.connect(path, synchronous=synchronous, timeout=timeout)


def thread_connection(path: str, synchronous: str, timeout: float) -> sqlite3.Connection:
    """This thread's connection to ``path``, reopened after a fork or if the file was replaced.

    Connections are kept per thread and per process: opening one costs more than most requests.
    """
    key = (os.getpid(), path, synchronous, timeout)
    cached = getattr(_thread, "connections", None)
    if cached is None:
        cached = _thread.connections = {}
    entry = cached.get(key)
    if entry is not None:
        try:
            identity = _file_identity(path)
        except storage.DatabaseMissing:
            drop_thread_connection(path)
            raise
        if entry[0] == identity:
            return entry[1]
        drop_thread_connection(path)
    conn = open_database(path, synchronous, timeout)
    cached[key] = (_file_identity(path), conn)
    return conn


def drop_thread_connection(path: str) -> None:
    """Close this thread's connections to ``path``, so the next request opens a fresh one."""
    cached = getattr(_thread, "connections", {})
    for key in [k for k in cached if k[1] == path]:
        _, conn = cached.pop(key)
        if key[0] == os.getpid():
            conn.close()


def database_settings() -> tuple[str, str, float]:
    """The database's path, synchronous mode and lock timeout, from the current app."""
    return (
        setting("CUSTOMERS_DATABASE"),
        str(setting("CUSTOMERS_SQLITE_SYNCHRONOUS")).upper(),
        float(setting("CUSTOMERS_SQLITE_TIMEOUT")),
    )


def get_db() -> sqlite3.Connection:
    """The connection for this request."""
    if "customers_db" not in g:
        g.customers_db = thread_connection(*database_settings())
    return g.customers_db


@bp.teardown_request
def _release_db(exc: BaseException | None) -> None:
    conn = g.pop("customers_db", None)
    if conn is not None and conn.in_transaction:
        conn.rollback()


# --- request parsing -------------------------------------------------------------------------


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """Build a JSON object, refusing duplicate keys."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value) -> bool:
    """Whether a parsed JSON value holds a string that is not valid Unicode (e.g. "\\ud800")."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def parse_json(data: bytes):
    """Parse a UTF-8 JSON body strictly, or raise ApiError(400, invalid_json)."""
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
        # Only a \\u escape can make a surrogate; strict UTF-8 bytes never do.
        if SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
            raise ValueError("lone surrogate")
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    return value


def json_body():
    """The request's JSON body, after the media type and size checks."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    return parse_json(read_body(int(setting("CUSTOMERS_MAX_BODY_BYTES"))))


def read_body(limit: int) -> bytes:
    """The request body, at most ``limit`` bytes, whether sent with a length or chunked.

    Werkzeug trusts a server that ends chunked bodies (gunicorn does) to enforce no limit,
    so the limit is counted here, while reading.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
    chunks, size = [], 0
    while size <= limit:
        chunk = request.stream.read(min(65536, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
    if declared is not None and size < declared:
        raise ApiError(400, "bad_request", "the body ended before its Content-Length")
    return b"".join(chunks)


def customer_payload() -> dict:
    """The ``customer`` object of the body, or ApiError(400, bad_request)."""
    body = json_body()
    customer = body.get("customer") if isinstance(body, dict) else None
    if not isinstance(customer, dict) or not customer:
        raise ApiError(400, "bad_request", CUSTOMER_MISSING)
    return customer


# --- request and response hooks --------------------------------------------------------------


def assign_request_id() -> None:
    """Take the caller's X-Request-Id when it is sane, or make one."""
    if "request_id" in g:
        return
    given = request.headers.get("X-Request-Id", "")
    if 1 <= len(given) <= 200 and REQUEST_ID_CHARS.issuperset(given):
        g.request_id = given
    else:
        g.request_id = secrets.token_hex(16)
    g.request_started = time.perf_counter()


def require_api_key() -> None:
    """Refuse the request with 401 unless it carries a valid key."""
    if request.endpoint in PUBLIC_ENDPOINTS:
        return
    if not _flag(setting("CUSTOMERS_REQUIRE_API_KEY")):
        return
    token = bearer_token()
    if token is None or not key_is_valid(token, api_keys()):
        raise ApiError(401, "unauthorized", headers={"WWW-Authenticate": "Bearer"})


def finish_response(response):
    """Add the common headers and write the access log line, once per request."""
    if g.get("response_finished"):
        return response
    g.response_finished = True
    assign_request_id()
    response.headers["X-Request-Id"] = g.request_id
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers.setdefault("Cache-Control", "no-store")
    write_access_line(response.status_code, (time.perf_counter() - g.request_started) * 1000)
    return response


def write_access_line(status: int, elapsed_ms: float) -> None:
    """One line per request on stdout, with its request id.

    Written straight to the stream: the logging module's per-record work (it looks up the
    caller's file) cost more than the rest of a GET.
    """
    req = request._get_current_object()
    path = req.path[:300]
    if not PLAIN_PATH.fullmatch(path):  # quote only what could break the line or fake a field
        path = quote(path, safe="/:@!$&'()*+,;=-._~")
    sys.stdout.write(
        f"{_log_time()} request_id={g.request_id} remote={req.remote_addr} "
        f"method={req.method} path={path} status={status} duration_ms={elapsed_ms:.1f}\n"
    )
    sys.stdout.flush()


PLAIN_PATH = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=._~-]*")
_log_second: list = [0, ""]


def _log_time() -> str:
    """The access line's timestamp, formatted once a second."""
    now = int(time.time())
    if _log_second[0] != now:
        _log_second[:] = [now, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))]
    return _log_second[1]


bp.before_request(assign_request_id)
bp.before_request(require_api_key)
bp.after_request(finish_response)


# --- error mapping ---------------------------------------------------------------------------


def error_response(
    status: int,
    code: str,
    message: str | None = None,
    details: dict | None = None,
    headers: dict | None = None,
):
    """The contract's error envelope as a response."""
    body = {"status": status, "error": HTTPStatus(status).phrase, "code": code}
    if message:
        body["message"] = message
    if details:
        body["error_details"] = details
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers or {})
    return response


@bp.errorhandler(ApiError)
def _api_error(e: ApiError):
    return error_response(e.status, e.code, e.message, e.details, e.headers)


@bp.errorhandler(ValidationError)
def _validation_error(e: ValidationError):
    return error_response(422, "validation_errors", details=e.normalized_messages())


def http_error(e: HTTPException):
    """Werkzeug's HTTP errors in the contract's envelope."""
    if isinstance(e, ClientDisconnected):
        return error_response(400, "bad_request", "the body ended before its Content-Length")
    headers = {}
    if e.code == 405 and getattr(e, "valid_methods", None):
        headers["Allow"] = ", ".join(e.valid_methods)
    code = HTTP_ERROR_CODES.get(e.code, "http_error")
    return error_response(e.code, code, headers=headers)


bp.register_error_handler(HTTPException, http_error)


DATABASE_ERRORS = {
    "SQLITE_BUSY": ("database_busy", "the database is busy; retry"),
    "SQLITE_LOCKED": ("database_busy", "the database is busy; retry"),
    "SQLITE_FULL": ("database_full", "the disk under the database is full"),
    "SQLITE_READONLY": ("database_read_only", "the database cannot be written"),
}


@bp.errorhandler(sqlite3.DatabaseError)
def _database_error(e: sqlite3.DatabaseError):
    if type(e) is sqlite3.IntegrityError:
        return _unexpected_error(e)
    # The connection may be what broke: the next request opens a fresh one.
    g.pop("customers_db", None)
    drop_thread_connection(setting("CUSTOMERS_DATABASE"))
    name = getattr(e, "sqlite_errorname", None) or "unknown"
    primary = "_".join(name.split("_")[:2])  # SQLITE_READONLY_DBMOVED is a SQLITE_READONLY
    code, message = DATABASE_ERRORS.get(
        primary, ("database_unavailable", "the database is unavailable")
    )
    if code != "database_busy":
        error_log.error("request_id=%s %s: %s (%s)", g.get("request_id"), code, e, name)
    return error_response(503, code, message, headers={"Retry-After": "1"})


@bp.errorhandler(Exception)
def _unexpected_error(e: Exception):
    error_log.exception("request_id=%s unexpected error", g.get("request_id"))
    return error_response(500, "internal_error", "an unexpected error occurred")


# --- views -----------------------------------------------------------------------------------
# Storage returns rows with exactly the customer object's keys and JSON-ready values (test_storage
# holds them to CustomerSchema's fields), so views send them as they are: a marshmallow dump
# would copy them for nothing, 20 times on a list page.


@bp.post("/api/v1/customers", provide_automatic_options=False)
def upsert_customer():
    """Create the customer, or update the one with that customer_id."""
    fields = customer_schema.load(customer_payload())
    return {"customer": storage.upsert_customer(get_db(), fields)}


@bp.get(
    "/api/v1/customers/<customer_id:customer_id>",
    merge_slashes=False,
    provide_automatic_options=False,
)
def get_customer(customer_id: str):
    """One customer by its customer_id."""
    customer = storage.get_customer(get_db(), customer_id)
    if customer is None:
        raise ApiError(404, "customer_not_found", "no customer has that customer_id")
    return {"customer": customer}


@bp.delete(
    "/api/v1/customers/<customer_id:customer_id>",
    merge_slashes=False,
    provide_automatic_options=False,
)
def delete_customer(customer_id: str):
    """Delete a customer and return it as it was."""
    customer = storage.delete_customer(get_db(), customer_id)
    if customer is None:
        raise ApiError(404, "customer_not_found", "no customer has that customer_id")
    return {"customer": customer}


@bp.get("/api/v1/customers", provide_automatic_options=False)
def list_customers():
    """One page of customers, newest first."""
    try:
        args = pagination_schema.load(request.args)
    except ValidationError as e:
        raise ApiError(400, "invalid_pagination", details=e.normalized_messages()) from None
    page, per_page = args["page"], args["per_page"]
    customers, total = storage.list_customers(get_db(), page, per_page)
    total_pages = -(-total // per_page)
    return {
        "customers": customers,
        "meta": {
            "current_page": page,
            "next_page": page + 1 if page < total_pages else None,
            "prev_page": page - 1 if page > 1 else None,
            "total_pages": total_pages,
            "total_count": total,
        },
    }


@bp.get("/health", provide_automatic_options=False)
def health():
    """200 when the database takes a write and its disk has room, 503 otherwise."""
    storage.check(get_db())
    # A write can still fit in space SQLite freed; a nearly full disk is a fault all the same.
    if storage.free_bytes(setting("CUSTOMERS_DATABASE")) < int(setting("CUSTOMERS_MIN_FREE_BYTES")):
        raise ApiError(
            503,
            "database_full",
            "the disk under the database is nearly full",
            headers={"Retry-After": "1"},
        )
    return {"status": "ok"}


@bp.get("/api/v1/openapi.json", provide_automatic_options=False)
def openapi_document():
    """The OpenAPI document, generated from the Marshmallow schemas."""
    return openapi_spec(current_app._get_current_object())


@bp.get("/docs", provide_automatic_options=False)
def docs():
    """The interactive API page (Swagger UI, served from the swagger-ui-bundle package)."""
    return render_template_string(
        DOCS_PAGE,
        asset=lambda name: url_for(".docs_asset", filename=name),
        spec_url=url_for(".openapi_document"),
    )


@bp.get("/docs/assets/<path:filename>", provide_automatic_options=False)
def docs_asset(filename: str):
    """One of Swagger UI's static files."""
    return send_from_directory(swagger_ui_path, filename)


# --- the OpenAPI document --------------------------------------------------------------------

DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Customers API</title>
  <link rel="stylesheet" href="{{ asset('swagger-ui.css') }}">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{{ asset('swagger-ui-bundle.js') }}"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: {{ spec_url | tojson }},
      dom_id: "#swagger-ui",
      deepLinking: true,
      persistAuthorization: true,
    });
  </script>
</body>
</html>
"""

ERROR_DESCRIPTIONS = {
    400: "`invalid_json`, `bad_request` or `invalid_pagination`.",
    401: "`unauthorized`: no API key, or a wrong one.",
    404: "`customer_not_found`.",
    413: "`payload_too_large`: the body is over the limit (64 KiB by default).",
    415: "`unsupported_media_type`: the body is not sent as application/json.",
    422: "`validation_errors`: `error_details` maps each field to its error codes.",
    500: "`internal_error`, logged with the request id.",
    503: "`database_busy`, `database_full`, `database_read_only` or `database_unavailable`; "
    "retry after `Retry-After` seconds.",
}
HEADERS = {
    "X-Request-Id": {
        "description": "The caller's X-Request-Id when it is 1-200 visible ASCII characters, "
        "or a new one; the access log line carries the same id.",
        "schema": {"type": "string"},
    },
    "WWW-Authenticate": {"description": "Always `Bearer`.", "schema": {"type": "string"}},
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "string"},
    },
}
# Which error statuses each operation can answer, on top of 500.
OPERATIONS = {
    "customers.upsert_customer": (
        "post",
        "Create or update a customer",
        "Creates the customer, or updates the one with this `customer_id`: each key present "
        "overwrites the stored value (`null` clears it), each key absent keeps it. Unknown keys "
        "are refused with `unknown_field`, unless their value is `null`.",
        "CustomerRequest",
        (400, 401, 413, 415, 422, 503),
    ),
    "customers.list_customers": (
        "get",
        "List customers",
        "One page of customers, newest first (`created_at` descending, then insertion order).",
        None,
        (400, 401, 503),
    ),
    "customers.get_customer": ("get", "Get a customer", "", None, (401, 404, 503)),
    "customers.delete_customer": (
        "delete",
        "Delete a customer",
        "Deletes the customer and returns it as it was.",
        None,
        (401, 404, 503),
    ),
    "customers.health": (
        "get",
        "Health check",
        "200 when the database answers, 503 when it does not. No API key needed.",
        None,
        (503,),
    ),
    "customers.openapi_document": ("get", "This OpenAPI document", "No API key needed.", None, ()),
    "customers.docs": ("get", "This API's interactive page", "No API key needed.", None, ()),
}
# Each operation's 200: its description, media type and schema.
SUCCESSES = {
    "customers.upsert_customer": (
        "The customer as stored.",
        "application/json",
        "CustomerResponse",
    ),
    "customers.get_customer": ("The customer.", "application/json", "CustomerResponse"),
    "customers.delete_customer": (
        "The customer as it was.",
        "application/json",
        "CustomerResponse",
    ),
    "customers.list_customers": ("One page and the totals.", "application/json", "CustomerList"),
    "customers.health": ("The database answers.", "application/json", "Health"),
    "customers.openapi_document": ("The document.", "application/json", {"type": "object"}),
    "customers.docs": ("An HTML page (Swagger UI).", "text/html", {"type": "string"}),
}


def _schema_name(schema) -> str:
    """Component names: the class name less "Schema", "Input" for the request's customer."""
    cls = schema if isinstance(schema, type) else type(schema)
    name = cls.__name__.removesuffix("Schema")
    if not isinstance(schema, type) and schema.exclude:
        name += "Input"
    return name


def _response(description: str, media_type: str, schema, *headers: str) -> dict:
    """One OpenAPI response object."""
    return {
        "description": description,
        "headers": {h: {"$ref": f"#/components/headers/{h}"} for h in ("X-Request-Id", *headers)},
        "content": {media_type: {"schema": schema}},
    }


def _error_responses(statuses: tuple[int, ...]) -> dict:
    """The error responses of one operation, each in the error envelope."""
    extra = {401: ("WWW-Authenticate",), 503: ("Retry-After",)}
    return {
        str(status): _response(
            ERROR_DESCRIPTIONS[status], "application/json", "Error", *extra.get(status, ())
        )
        for status in (*statuses, 500)
    }


def _operation(endpoint: str) -> dict:
    """The OpenAPI operation of one of our endpoints."""
    method, summary, description, request_schema, errors = OPERATIONS[endpoint]
    operation = {
        "summary": summary,
        "operationId": endpoint.split(".")[1],
        "tags": ["service" if endpoint in PUBLIC_ENDPOINTS else "customers"],
    }
    if description:
        operation["description"] = description
    if endpoint in PUBLIC_ENDPOINTS:
        operation["security"] = []
    if endpoint == "customers.list_customers":
        operation["parameters"] = [{"in": "query", "schema": schemas.PaginationSchema}]
    if endpoint in ("customers.get_customer", "customers.delete_customer"):
        operation["parameters"] = [
            {
                "in": "path",
                "name": "customer_id",
                "required": True,
                "description": "The customer's customer_id, percent-encoded.",
                "schema": {"type": "string", "minLength": 1},
            }
        ]
    if request_schema:
        operation["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": request_schema,
                    "example": {"customer": schemas.SEED_EXAMPLE},
                }
            },
        }
    ok = _response(*SUCCESSES[endpoint])
    operation["responses"] = {"200": ok, **_error_responses(errors)}
    return {method: operation}


def build_openapi(app: Flask) -> dict:
    """The OpenAPI 3 document of this app's customer routes, wherever they are mounted."""
    spec = APISpec(
        title="Customers API",
        version="1.0.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin(schema_name_resolver=_schema_name)],
        info={
            "description": "Lago's `POST /api/v1/customers` of 2022, with the rest of the "
            "customer resource around it. Send `Authorization: Bearer <api key>`."
        },
        security=[{"bearerAuth": []}],
    )
    spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer"})
    for name, header in HEADERS.items():
        spec.components.header(name, header)
    spec.components.schema("Error", schema=schemas.ErrorSchema)
    spec.components.schema("CustomerRequest", schema=schemas.CustomerRequestSchema)
    spec.components.schema("CustomerResponse", schema=schemas.CustomerResponseSchema)
    spec.components.schema("CustomerList", schema=schemas.CustomerListSchema)
    spec.components.schema("Health", schema=schemas.HealthSchema)
    paths: dict[str, dict] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in OPERATIONS:
            paths.setdefault(rule.rule, {}).update(_operation(rule.endpoint))
    for rule_path, operations in paths.items():
        path = rule_path.replace("<customer_id:customer_id>", "{customer_id}")
        spec.path(path=path, operations=operations)
    document = spec.to_dict()
    # Unknown keys are refused unless null (Lago clients send their whole model): say so exactly.
    document["components"]["schemas"]["CustomerInput"]["additionalProperties"] = {
        "nullable": True,
        "enum": [None],
    }
    return document


def openapi_spec(app: Flask) -> dict:
    """The app's OpenAPI document, built once per app."""
    if "customers_openapi" not in app.extensions:
        app.extensions["customers_openapi"] = build_openapi(app)
    return app.extensions["customers_openapi"]


# --- operator commands (flask customers ...) ------------------------------------------------


KEY_PREFIX_LENGTH = 12
IMPORT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
EXTRA_CELLS = "\0extra"  # csv.DictReader's key for cells beyond the header


def command_connection() -> sqlite3.Connection:
    """A connection for an operator command, to a database created and migrated if need be."""
    path, synchronous, timeout = database_settings()
    conn = storage.connect(path, synchronous=synchronous, timeout=timeout, create=True)
    storage.migrate(conn)
    return conn


@bp.cli.command("init-db")
def init_db_command() -> None:
    """Create or migrate the database; safe to run any number of times."""
    command_connection().close()
    click.echo(f"Database ready: {setting('CUSTOMERS_DATABASE')}")
    key_file = setting("CUSTOMERS_API_KEY_FILE")
    keys = read_key_file(key_file)
    if keys:
        click.echo(f"API key (from {key_file}): {keys[0]}")
    elif configured_keys():
        click.echo("API keys: those set in CUSTOMERS_API_KEYS")


@contextlib.contextmanager
def key_file_lock(path: str):
    """Hold an exclusive lock beside the key file while it is changed."""
    fd = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_key_file(path: str, keys: list[str]) -> None:
    """Replace the key file atomically, readable by its owner only."""
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(key + "\n" for key in keys)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


@bp.cli.command("create-api-key")
def create_api_key_command() -> None:
    """Make a new random API key, store it in the key file and print it, once."""
    path = setting("CUSTOMERS_API_KEY_FILE")
    key = new_api_key()
    with key_file_lock(path):
        add_key_to_file(path, key)
    click.echo(key)
    click.echo(f"Stored in {path}. It is not shown again: keep it now.", err=True)


@bp.cli.command("list-api-keys")
def list_api_keys_command() -> None:
    """Show the prefix of each key in the key file."""
    for key in read_key_file(setting("CUSTOMERS_API_KEY_FILE")):
        click.echo(key[:KEY_PREFIX_LENGTH] + "...")
    if configured_keys():
        click.echo(f"(and {len(configured_keys())} key(s) set in CUSTOMERS_API_KEYS)")


@bp.cli.command("revoke-api-key")
@click.argument("prefix")
def revoke_api_key_command(prefix: str) -> None:
    """Remove the one key of the key file that starts with PREFIX."""
    path = setting("CUSTOMERS_API_KEY_FILE")
    with key_file_lock(path):
        keys = read_key_file(path)
        matches = [key for key in keys if key.startswith(prefix)]
        if len(matches) != 1:
            found = "no key" if not matches else f"{len(matches)} keys"
            raise click.ClickException(f"{found} of {path} start with {prefix!r}")
        write_key_file(path, [key for key in keys if key != matches[0]])
    click.echo(f"Revoked {matches[0][:KEY_PREFIX_LENGTH]}...")


def _unwrap(value) -> object:
    """A customer, with or without its ``{"customer": ...}`` envelope."""
    if isinstance(value, dict) and isinstance(value.get("customer"), dict):
        return value["customer"]
    return value


def jsonl_rows(stream) -> Iterator[tuple[int, object, dict | None]]:
    """(line number, line, None) for each non-blank line of a JSON Lines stream."""
    for number, line in enumerate(stream, start=1):
        if line.strip():
            yield number, line, None


def csv_rows(stream) -> Iterator[tuple[int, object, dict | None]]:
    """(line number, customer, parse errors) for each record of a CSV stream with a header.

    An empty cell is null: it clears that field of an existing customer.
    """
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    try:
        yield from _csv_records(csv.DictReader(text, restkey=EXTRA_CELLS))
    finally:
        text.detach()  # the caller owns the file


def _csv_records(reader: csv.DictReader) -> Iterator[tuple[int, object, dict | None]]:
    """(line number, customer, parse errors) for each record of a CSV reader."""
    while True:
        number = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield number, None, {"_row": ["invalid_csv"]}
            continue
        customer = {k: (v if v else None) for k, v in record.items() if k != EXTRA_CELLS}
        if EXTRA_CELLS in record:
            yield number, customer, {"_row": ["too_many_cells"]}
        elif not _is_utf8(customer):
            yield number, customer, {"_row": ["invalid_utf8"]}
        else:
            yield number, customer, None


def _is_utf8(customer: dict) -> bool:
    """Whether every key and value decoded from the file was valid UTF-8."""
    try:
        for key, value in customer.items():
            (key or "").encode("utf-8")
            (value or "").encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_rows(rows: list) -> list[tuple[int, object, dict | None, dict | None]]:
    """(line number, raw row if refused, upsert parameter values, errors) for a chunk of rows,
    each parsed if need be and put through the API's schema. Runs in the import's workers."""
    now = storage.utc_now()
    checked = []
    for number, raw, errors in rows:
        if errors is None and isinstance(raw, bytes):
            try:
                raw = _unwrap(parse_json(raw))
            except ApiError as e:
                raw, errors = raw.decode("utf-8", "replace").rstrip("\n"), {"_row": [e.code]}
        if errors is None and (not isinstance(raw, dict) or not raw):
            errors = {"_row": ["bad_request"]}
        if errors is None:
            try:
                fields = schemas.customer_import_schema.load(raw)
                # Values only, in UPSERT_PARAMS order: a third of the bytes to send back.
                values = tuple(storage.upsert_params(fields, now).values())
                checked.append((number, None, values, None))
                continue
            except ValidationError as e:
                errors = e.normalized_messages()
        checked.append((number, raw, None, errors))
    return checked


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    """Lists of ``size`` rows (the last one shorter)."""
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _ignore_sigint() -> None:
    # Ctrl-C is the main process's to handle: it rolls back the batch and reports.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def checked_batches(rows: Iterator, batch_size: int, jobs: int) -> Iterator[list]:
    """check_rows over each batch, in file order, on ``jobs`` worker processes (in-process if 1),
    with only a few batches in flight so memory stays flat whatever the file's size."""
    if jobs == 1:
        yield from map(check_rows, _chunks(rows, batch_size))
        return
    pool = ProcessPoolExecutor(jobs, initializer=_ignore_sigint)
    try:
        in_flight: collections.deque = collections.deque()
        for chunk in _chunks(rows, batch_size):
            in_flight.append(pool.submit(check_rows, chunk))
            if len(in_flight) > 2 * jobs:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class ImportReport:
    """Counts, rejected rows (to stderr and the rejects file) and the progress line."""

    def __init__(self, rejects, total_bytes: int | None, position):
        self.inserted = self.updated = self.rejected = 0
        self.rejects, self.total_bytes, self.position = rejects, total_bytes, position
        self.started = self.last_shown = time.monotonic()
        self.show_progress = sys.stderr.isatty()

    def reject(self, number: int, raw, errors: dict) -> None:
        """Report one refused row, with its line number and error codes."""
        self.rejected += 1
        click.echo(f"line {number}: rejected: {json.dumps(errors, sort_keys=True)}", err=True)
        if self.rejects:
            line = {"line": number, "errors": errors, "customer": raw}
            self.rejects.write(json.dumps(line, ensure_ascii=False) + "\n")

    def committed(self, inserted: int, updated: int) -> None:
        """Count a committed batch, and redraw the progress bar now and then."""
        self.inserted += inserted
        self.updated += updated
        now = time.monotonic()
        if self.show_progress and now - self.last_shown > 0.2:
            self.last_shown = now
            click.echo("\r" + self.progress_line(), err=True, nl=False)

    def _rows_and_rate(self) -> tuple[int, float, float]:
        """Rows handled so far, seconds since the start, and rows per second."""
        rows = self.inserted + self.updated + self.rejected
        seconds = time.monotonic() - self.started
        return rows, seconds, rows / max(seconds, 1e-9)

    def progress_line(self) -> str:
        """A bar of the bytes read (when the size is known) and the rows per second."""
        rows, _, rate = self._rows_and_rate()
        bar = ""
        if self.total_bytes:
            done = min(self.position() / self.total_bytes, 1.0)
            filled = int(done * 30)
            bar = f"[{'#' * filled}{'-' * (30 - filled)}] {done:4.0%}  "
        return f"{bar}{rows:,} rows  {rate:,.0f} rows/s"

    def summary(self) -> str:
        """The one-line summary printed at the end."""
        _, seconds, rate = self._rows_and_rate()
        return (
            f"{self.inserted:,} inserted, {self.updated:,} updated, {self.rejected:,} rejected "
            f"in {seconds:.1f} s ({rate:,.0f} rows/s)"
        )


def commit_batch(conn: sqlite3.Connection, checked: list, report: "ImportReport") -> None:
    """Report the refused rows of a batch and upsert the others in one transaction."""
    valid = []
    for number, raw, values, errors in checked:
        if errors:
            report.reject(number, raw, errors)
        else:
            valid.append((number, dict(zip(storage.UPSERT_PARAMS, values, strict=True))))
    try:
        with storage.write(conn):
            storage.begin_write(conn)
            inserted = storage.upsert_batch(conn, [params for _, params in valid])
        report.committed(inserted, len(valid) - inserted)
    except sqlite3.IntegrityError:  # a restored lago_id that another customer has: find it
        commit_row_by_row(conn, valid, report)


def commit_row_by_row(conn: sqlite3.Connection, valid: list, report: "ImportReport") -> None:
    """Upsert a batch one row at a time in one transaction, rejecting the rows SQL refuses."""
    inserted = upserted = 0
    with storage.write(conn):
        storage.begin_write(conn)
        for number, params in valid:
            try:
                inserted += storage.upsert_batch(conn, [params])
                upserted += 1
            except sqlite3.IntegrityError:
                report.reject(number, storage.sent_fields(params), {"lago_id": ["lago_id_taken"]})
    report.committed(inserted, upserted - inserted)


def import_format(stream, given: str | None) -> str:
    """The format named by --format, or by the file's extension."""
    if given:
        return given
    name = getattr(stream, "name", "-")
    extension = os.path.splitext(name)[1].lower() if isinstance(name, str) else ""
    if extension not in IMPORT_FORMATS:
        raise click.UsageError("cannot tell the format from the file name: give --format")
    return IMPORT_FORMATS[extension]


def _stream_size(stream) -> int | None:
    """The size of a regular file, or None for a pipe."""
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


@bp.cli.command("import")
@click.argument("file", type=click.File("rb"))
@click.option("--format", "file_format", type=click.Choice(["jsonl", "csv"]), help="jsonl or csv")
@click.option("--rejects", type=click.File("w", encoding="utf-8"), help="write refused rows here")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--jobs",
    default=min(2, os.cpu_count() or 1),
    show_default=True,
    type=click.IntRange(min=1),
    help="processes that parse and validate rows",
)
def import_command(file, file_format: str | None, rejects, batch_size: int, jobs: int) -> None:
    """Import customers from FILE (JSON Lines or CSV; - for stdin) through the API's rules."""
    file_format = import_format(file, file_format)
    rows = jsonl_rows(file) if file_format == "jsonl" else csv_rows(file)
    report = ImportReport(rejects, _stream_size(file), file.tell)
    batches = checked_batches(rows, batch_size, jobs)
    conn = None
    try:
        for checked in batches:
            if conn is None:  # opened after the workers forked, so no connection crosses a fork
                conn = command_connection()
            commit_batch(conn, checked, report)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; committed so far: {report.summary()}", err=True)
        raise SystemExit(130) from None
    finally:
        batches.close()
        if conn is not None:
            conn.close()
    if report.show_progress:
        click.echo("\r" + report.progress_line(), err=True)
    click.echo(report.summary())
    if report.rejected:
        raise SystemExit(1)


@bp.cli.command("export")
@click.argument("file", type=click.File("w", encoding="utf-8"), default="-")
def export_command(file) -> None:
    """Write every customer to FILE (default stdout) as JSON Lines, in the API's object shape."""
    conn = command_connection()
    count = 0
    started = time.monotonic()
    try:
        with conn:
            conn.execute("BEGIN")  # one snapshot, while the service goes on writing
            for line in storage.iter_export_lines(conn):
                file.write(line + "\n")
                count += 1
    finally:
        conn.close()
    file.flush()
    seconds = time.monotonic() - started
    click.echo(f"exported {count:,} customers in {seconds:.1f} s", err=True)


# --- the standalone app ----------------------------------------------------------------------


def create_app(test_config: dict | None = None) -> Flask:
    """The standalone service: defaults, then CUSTOMERS_* environment variables, then tests'."""
    app = Flask(__name__, instance_relative_config=True, static_folder=None)
    for name in SETTINGS:
        if name in os.environ:
            app.config[name] = os.environ[name]
    if test_config:
        app.config.update(test_config)
    os.makedirs(app.instance_path, mode=0o700, exist_ok=True)
    ensure_api_key(app)
    app.register_blueprint(bp)
    # Standalone, the whole app is the API: its 404s and 405s are JSON too.
    app.before_request(assign_request_id)
    app.after_request(finish_response)
    app.register_error_handler(404, http_error)
    app.register_error_handler(405, http_error)
    return app

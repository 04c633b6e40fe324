"""The customers blueprint: its routes, request hooks and error handlers, and the standalone app."""

import os
import secrets
import time

import click
from flask import Blueprint, Flask, current_app, g, request, send_from_directory
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter

from customers_service import database, openapi
from customers_service.api_keys import (
    PUBLIC_ENDPOINTS,
    api_keys,
    bearer_token,
    ensure_api_key,
    key_is_valid,
    keys_required,
)
from customers_service.body import customer_payload
from customers_service.commands import cli
from customers_service.event_storage import EventsExpired
from customers_service.events import event_object, load_events_query
from customers_service.list_query import load_list_query
from customers_service.logs import error_log, setup_logging, write_access_line
from customers_service.responses import (
    RETRY_LATER,
    ApiError,
    error_response,
    http_error,
    json_response,
)
from customers_service.schemas import customer_schema
from customers_service.settings import check_settings, from_environment, setting
from customers_service.storage import TooManyMetadataKeys

bp = Blueprint("customers", __name__, cli_group="customers")
bp.cli = cli  # flask customers ...: the commands live in commands.py

REQUEST_ID_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


class CustomerIdConverter(BaseConverter):
    """Any non-empty rest of the path, slashes included: every customer_id is addressable."""

    regex = "[\\s\\S]+"  # "." would stop at a newline
    part_isolating = False


@bp.record_once
def _on_register(state) -> None:
    check_settings(state.app.config)
    state.app.url_map.converters.setdefault("customer_id", CustomerIdConverter)
    setup_logging()


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
    if request.endpoint in PUBLIC_ENDPOINTS or not keys_required():
        return
    token = bearer_token(request)
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
    elapsed_ms = (time.perf_counter() - g.request_started) * 1000
    write_access_line(request, g.request_id, response.status_code, elapsed_ms)
    return response


bp.before_request(assign_request_id)
bp.before_request(require_api_key)
bp.after_request(finish_response)


@bp.teardown_request
def _release_store(exc: BaseException | None) -> None:
    database.release_store()


# --- error handlers: every error in the contract's envelope ----------------------------------


@bp.errorhandler(ApiError)
def _api_error(e: ApiError):
    return error_response(e.status, e.code, e.message, e.details, e.headers)


@bp.errorhandler(ValidationError)
def _validation_error(e: ValidationError):
    return error_response(422, "validation_errors", details=e.normalized_messages())


bp.register_error_handler(HTTPException, http_error)


@bp.errorhandler(Exception)
def _unexpected_error(e: Exception):
    fault = database.fault(e)
    if fault is None:
        error_log.exception("request_id=%s unexpected error", g.get("request_id"))
        return error_response(500, "internal_error", "an unexpected error occurred")
    code, message = fault
    database.forget_store()  # the connection may be what broke: the next request opens anew
    if code != "database_busy":
        error_log.error("request_id=%s %s: %s (%s)", g.get("request_id"), code, e, type(e).__name__)
    return error_response(503, code, message, headers=RETRY_LATER)


# --- views -----------------------------------------------------------------------------------
# Storage returns rows with exactly the customer object's keys, in its order, and JSON-ready
# values (test_storage holds them to CustomerSchema's fields), so views send them as they are.


def not_found() -> ApiError:
    """The 404 of a customer_id that no customer has."""
    return ApiError(404, "customer_not_found", "no customer has that customer_id")


@bp.post("/api/v1/customers", provide_automatic_options=False)
def upsert_customer():
    """Create the customer, or update the one with that customer_id."""
    limit = int(setting("CUSTOMERS_MAX_BODY_BYTES"))
    fields = customer_schema.load(customer_payload(request, limit))
    try:
        customer = database.get_store().upsert_customer(fields)
    except TooManyMetadataKeys:
        raise ValidationError({"metadata": ["too_many_metadata_keys"]}) from None
    return json_response({"customer": customer})


@bp.get(
    "/api/v1/customers/<customer_id:customer_id>",
    merge_slashes=False,
    provide_automatic_options=False,
)
def get_customer(customer_id: str):
    """One customer by its customer_id."""
    customer = database.get_store().get_customer(customer_id)
    if customer is None:
        raise not_found()
    return json_response({"customer": customer})


@bp.delete(
    "/api/v1/customers/<customer_id:customer_id>",
    merge_slashes=False,
    provide_automatic_options=False,
)
def delete_customer(customer_id: str):
    """Delete a customer and return it as it was."""
    customer = database.get_store().delete_customer(customer_id)
    if customer is None:
        raise not_found()
    return json_response({"customer": customer})


@bp.get("/api/v1/customers", provide_automatic_options=False)
def list_customers():
    """One page of the customers the filters select, newest first unless sorted otherwise."""
    page, per_page, filters = load_list_query(request.args)
    if filters is None:  # a time bound past the end of time: nothing to read
        customers, total = [], 0
    else:
        customers, total = database.get_store().list_customers(page, per_page, filters)
    total_pages = -(-total // per_page)
    meta = {
        "current_page": page,
        "next_page": page + 1 if page < total_pages else None,
        "prev_page": page - 1 if page > 1 else None,
        "total_pages": total_pages,
        "total_count": total,
    }
    return json_response({"customers": customers, "meta": meta})


@bp.get("/api/v1/events", provide_automatic_options=False)
def events_feed():
    """The events after ``after``, in commit order."""
    after, limit = load_events_query(request.args)
    try:
        stored, has_more = database.get_store().events_page(after, limit)
    except EventsExpired:
        raise ApiError(
            410,
            "events_expired",
            "events after this sequence were removed (older than the retention): read the "
            "customers again, then the feed from after=0",
        ) from None
    events = [event_object(event) for event in stored]
    meta = {"last_sequence": events[-1]["sequence"] if events else after, "has_more": has_more}
    return json_response({"events": events, "meta": meta})


@bp.get("/health", provide_automatic_options=False)
def health():
    """200 when the database takes a write and its disk has room, 503 otherwise."""
    database.get_store().check_health(int(setting("CUSTOMERS_MIN_FREE_BYTES")))
    return json_response({"status": "ok"})


@bp.get("/api/v1/openapi.json", provide_automatic_options=False)
def openapi_document():
    """The OpenAPI document, generated from the Marshmallow schemas."""
    return openapi.openapi_spec(current_app._get_current_object())


@bp.get("/docs", provide_automatic_options=False)
def docs():
    """The interactive API page (Swagger UI, served from the swagger-ui-py package)."""
    return openapi.docs_page()


@bp.get("/docs/assets/<path:filename>", provide_automatic_options=False)
def docs_asset(filename: str):
    """One of Swagger UI's static files."""
    return send_from_directory(openapi.SWAGGER_UI_ASSETS, filename)


# --- the standalone app ----------------------------------------------------------------------


def create_app(test_config: dict | None = None) -> Flask:
    """The standalone service: defaults, then CUSTOMERS_* environment variables, then tests'.

    It opens no database: gunicorn's master (gunicorn.conf.py), ``flask run`` and
    ``flask customers init-db`` prepare it, so a worker never creates one.
    """
    app = Flask(
        __name__,
        instance_path=checkout_instance_path(),
        instance_relative_config=True,
        static_folder=None,
    )
    from_environment(app.config)
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
    if started_by_flask_run():
        prepare_or_exit(app)
    return app


def checkout_instance_path() -> str | None:
    """``instance/`` in the repository when run from a checkout (or an editable install);
    None, Flask's own choice (``<prefix>/var/...``), when installed (site- or dist-packages)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if {"site-packages", "dist-packages"} & set(here.split(os.sep)):
        return None
    return os.path.join(here, "instance")


def started_by_flask_run() -> bool:
    """Whether Flask's development server is loading this app as it starts (one process,
    no workers: its start is the place to prepare the database)."""
    context = click.get_current_context(silent=True)
    return context is not None and context.info_name == "run"


def prepare_or_exit(app: Flask) -> None:
    """Prepare the app's database at a server's start, or stop the start with the reason."""
    try:
        database.prepare_database(app)
    except database.DatabaseNotReady as e:
        raise SystemExit(f"customers service: {e}") from None

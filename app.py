"""The customers blueprint: its routes, request hooks and error handlers, and create_app."""

import os
import time

from flask import (
    Blueprint,
    Flask,
    Response,
    current_app,
    g,
    redirect,
    request,
    send_from_directory,
    url_for,
)
from marshmallow import ValidationError
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import BaseConverter

from customers_service import database, metrics, openapi
from customers_service.api_keys import (
    ensure_api_key,
    key_is_valid,  # noqa: F401 (tests import it from here)
    require_api_key,
)
from customers_service.body import customer_payload
from customers_service.commands import cli
from customers_service.events import event_object, load_events_query
from customers_service.list_query import load_list_query
from customers_service.logs import (
    error_log,
    route_template,
    setup_logging,
    wants_json,
    write_access_line,
)
from customers_service.responses import (
    RETRY_LATER,
    ApiError,
    customer_response,
    customers_page_response,
    error_response,
    http_error,
    json_response,
)
from customers_service.schemas import customer_schema
from customers_service.settings import check_settings, flag, from_environment, setting
from customers_service.standalone import (
    CustomersApp,
    CustomersRequest,  # noqa: F401 (tests import it from here)
    checkout_instance_path,
    prepare_or_exit,
    started_by_flask_run,
)
from customers_service.storage import EventsExpired, TooManyMetadataKeys

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


# The hooks read Flask's request, g and app once each, then use the objects themselves: every
# attribute read through a proxy looks the context up, and first fails a plain attribute look-up
# (Python formats an AttributeError message for it).


def assign_request_id() -> None:
    """Take the caller's X-Request-Id when it is sane, or make one."""
    request_globals = g._get_current_object()
    if "request_id" in request_globals:
        return
    # From the environ: Werkzeug's headers raise and catch a KeyError for a header not sent.
    given = request._get_current_object().environ.get("HTTP_X_REQUEST_ID", "")
    if 1 <= len(given) <= 200 and REQUEST_ID_CHARS.issuperset(given):
        request_globals.request_id = given
    else:
        request_globals.request_id = os.urandom(16).hex()  # secrets.token_hex(16), one call less
    request_globals.request_started = time.perf_counter()
    counted = flag(current_app._get_current_object().config.get("CUSTOMERS_METRICS", True))
    request_globals.request_counted = counted and metrics.request_started()


def finish_response(response):
    """Add the common headers, count the request and write its access line, once per request."""
    request_globals = g._get_current_object()
    if request_globals.get("response_finished"):
        return response
    request_globals.response_finished = True
    assign_request_id()
    request_id = request_globals.request_id
    add_common_headers(response.headers, request_id)
    seconds = time.perf_counter() - request_globals.request_started
    req = request._get_current_object()
    route = route_template(req.url_rule)
    status = response.status_code
    if request_globals.request_counted:
        metrics.request_finished(route, metrics.method_label(req.method), status, seconds)
    as_json = wants_json(current_app._get_current_object().config)
    write_access_line(req, as_json, request_id, route, status, seconds * 1000)
    return response


def add_common_headers(headers: Headers, request_id: str) -> None:
    """X-Request-Id, nosniff, and Cache-Control: no-store unless the response has its own.

    One look at the headers already there, then each added: Werkzeug's set() scans them all for
    each header it sets, and setdefault() raises and catches a KeyError for an absent one.
    """
    present = {name.lower() for name, _ in headers}
    for name, value in (("X-Request-Id", request_id), ("X-Content-Type-Options", "nosniff")):
        if name.lower() in present:
            headers.set(name, value)
        else:
            headers.add(name, value)
    if "cache-control" not in present:
        headers.add("Cache-Control", "no-store")


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
    fault = note_database_fault(e)
    if fault is None:
        error_log.exception("unexpected error")
        return error_response(500, "internal_error", "an unexpected error occurred")
    code, message = fault
    return error_response(503, code, message, headers=RETRY_LATER)


def note_database_fault(e: Exception) -> tuple[str, str] | None:
    """The contract's code and message for a database fault, after logging and counting it;
    None for any other error."""
    fault = database.fault(e)
    if fault is None:
        return None
    code = fault[0]
    database.forget_store()  # the connection may be what broke: the next request opens anew
    if g._get_current_object().get("request_counted"):
        metrics.database_error(code)
    if code != "database_busy":
        error_log.error("%s: %s (%s)", code, e, type(e).__name__)
    return fault


# --- views -----------------------------------------------------------------------------------
# Storage returns each customer as its stored body, its object exactly as the API answers it
# (test_stored_bytes holds it to json_response's bytes), so views send it as it is.


def not_found() -> ApiError:
    """The 404 of a customer_id that no customer has."""
    return ApiError(404, "customer_not_found", "no customer has that customer_id")


@bp.post("/api/v1/customers", provide_automatic_options=False)
def upsert_customer():
    """Create the customer, or update the one with that customer_id."""
    limit = int(setting("CUSTOMERS_MAX_BODY_BYTES"))
    # The request itself, not its proxy: the body's checks read it a dozen times.
    fields = customer_schema.load(customer_payload(request._get_current_object(), limit))
    try:
        customer = database.get_store().upsert_customer(fields)
    except TooManyMetadataKeys:
        raise ValidationError({"metadata": ["too_many_metadata_keys"]}) from None
    return customer_response(customer)


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
    return customer_response(customer)


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
    return customer_response(customer)


@bp.get("/api/v1/customers", provide_automatic_options=False)
def list_customers():
    """One page of the customers the filters select, newest first unless sorted otherwise."""
    page, per_page, filters = load_list_query(request._get_current_object().args)
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
    return customers_page_response(customers, meta)


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


@bp.record
def _add_metrics_route(state) -> None:
    """Serve /metrics where CUSTOMERS_METRICS_ROUTE says so: the standalone app does; a host
    app chooses (it may serve prometheus_client's registry its own way)."""
    app = state.app
    if flag(setting("CUSTOMERS_METRICS", app)) and flag(setting("CUSTOMERS_METRICS_ROUTE", app)):
        state.add_url_rule(
            "/metrics", "metrics", metrics_page, methods=["GET"], provide_automatic_options=False
        )


def metrics_page():
    """Every worker's request counts, latency and database errors, and the webhook backlog."""
    body, content_type = metrics.scrape(request.headers.get("Accept"), webhook_gauges())
    return Response(body, content_type=content_type)


def webhook_gauges() -> list:
    """The webhook backlog's gauges, read now; none while the database is unreachable, so a
    scrape still reports the requests' counts (and the database error)."""
    try:
        status = database.get_store().webhook_status(failed_shown=0)
    except Exception as e:
        if note_database_fault(e) is None:
            raise
        return []
    return metrics.webhook_families(status)


@bp.get("/api/v1/openapi.json", provide_automatic_options=False)
def openapi_document():
    """The OpenAPI document, generated from the Marshmallow schemas."""
    return openapi.openapi_spec(current_app._get_current_object())


@bp.get("/docs", provide_automatic_options=False)
def docs():
    """The interactive API page (Swagger UI, served from the swagger-ui-py package)."""
    return openapi.docs_page()


@bp.get("/docs/", provide_automatic_options=False)
def docs_with_slash():
    """The interactive API page's address as people type it: a redirect to /docs."""
    return redirect(url_for(".docs"), 308)


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
    app = CustomersApp(
        __name__,
        instance_path=checkout_instance_path(),
        instance_relative_config=True,
        static_folder=None,
    )
    app.config["CUSTOMERS_METRICS_ROUTE"] = True
    from_environment(app.config)
    if test_config:
        app.config.update(test_config)
    os.makedirs(app.instance_path, mode=0o700, exist_ok=True)
    app.register_blueprint(bp)  # checks the settings first: a refused start makes no key
    ensure_api_key(app)
    proxies = int(setting("CUSTOMERS_TRUSTED_PROXIES", app))
    if proxies:  # the client's address is the one the nearest of N trusted proxies saw
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies)
    # Standalone, the whole app is the API: its 404s and 405s are JSON too, and the app's own
    # request-id and access-line hooks serve the blueprint's routes as well (once, not twice).
    app.before_request(assign_request_id)
    app.after_request(finish_response)
    app.before_request_funcs[bp.name].remove(assign_request_id)
    app.after_request_funcs[bp.name].remove(finish_response)
    app.register_error_handler(404, http_error)
    app.register_error_handler(405, http_error)
    if started_by_flask_run():
        prepare_or_exit(app)
    return app

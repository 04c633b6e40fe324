"""The OpenAPI document, built by apispec from the Marshmallow schemas and the app's URL map,
and the docs page that renders it."""

import importlib.util
import os

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask, render_template_string, url_for

from customers_service import events, list_query, schemas
from customers_service.api_keys import PUBLIC_ENDPOINTS

# Swagger UI's files, from the swagger-ui-py package (found, not imported: only its files serve).
SWAGGER_UI_ASSETS = os.path.join(
    importlib.util.find_spec("swagger_ui").submodule_search_locations[0], "static"
)

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
    400: "`invalid_json` or `bad_request` (an upsert's body); `invalid_pagination` or "
    "`invalid_filters` (a list's query), with `error_details` naming each bad parameter.",
    410: "`events_expired`: events after `after` were removed (older than the retention). "
    "Read the customers again, then the feed from `after=0`.",
    401: "`unauthorized`: no API key, or a wrong one.",
    404: "`customer_not_found`.",
    413: "`payload_too_large`: the body is over the limit (64 KiB by default).",
    414: "The request line is longer than the server takes (gunicorn: 8,190 bytes), a long "
    "list of filter values, say. Gunicorn answers this itself, with its own HTML page.",
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
        "One page of the customers the filters select (all of them without filters), newest "
        "first unless `sort` says otherwise; `meta` counts what the filters select. Filters "
        "combine with AND; the values of one repeated filter with OR. Any other parameter, or "
        "a single-valued one repeated, is `400 invalid_filters`.",
        None,
        (400, 401, 414, 503),
    ),
    "customers.get_customer": ("get", "Get a customer", "", None, (401, 404, 503)),
    "customers.events_feed": (
        "get",
        "Events: every change, in commit order",
        "The events after `after`, oldest first. Keep `meta.last_sequence` and pass it as the "
        "next `after`: every event is seen exactly once, in the order the changes committed, "
        "whatever the number of writers. A bad, repeated or unknown parameter is "
        "`400 invalid_pagination`.",
        None,
        (400, 401, 410, 503),
    ),
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
    "customers.metrics": (
        "get",
        "Prometheus metrics",
        "Requests by route template, method and status, their latency, database errors by "
        "code and the webhook backlog, counted across every worker of the server. Prometheus's "
        "text format, or OpenMetrics when the `Accept` header asks for it. Served where "
        "`CUSTOMERS_METRICS_ROUTE` is on (the standalone service; a host app chooses).",
        None,
        (401,),
    ),
    "customers.docs": ("get", "This API's interactive page", "No API key needed.", None, ()),
}
SERVICE_ENDPOINTS = {*PUBLIC_ENDPOINTS, "customers.metrics"}  # about the service, not customers
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
    "customers.events_feed": ("A page of events.", "application/json", "EventList"),
    "customers.health": ("The database answers.", "application/json", "Health"),
    "customers.openapi_document": ("The document.", "application/json", {"type": "object"}),
    "customers.metrics": (
        "Every worker's counts, and the backlog read now.",
        "text/plain",
        {"type": "string"},
    ),
    "customers.docs": ("An HTML page (Swagger UI).", "text/html", {"type": "string"}),
}


# What each webhook carries beside its body (the Event schema).
WEBHOOK_HEADERS = {
    "X-Lago-Unique-Key": "The event's `id`: the same on every repeat of this event, so a "
    "receiver can skip one it has handled.",
    "X-Lago-Signature-Algorithm": "Always `hmac`.",
    "X-Lago-Signature": "Standard base64, with padding, of the HMAC-SHA256 of the exact body "
    "bytes, keyed with the endpoint's secret (its UTF-8 bytes).",
}
WEBHOOK_TYPES = {
    "customer.created": "A customer was created (by the API or an import).",
    "customer.updated": "A customer was updated; sent for every 200, even with nothing changed.",
    "customer.deleted": "A customer was deleted; `customer` is the object as it was.",
}


def _webhooks() -> dict:
    """OpenAPI 3.1's webhooks: what the deliverer POSTs to each registered endpoint."""
    return {
        kind: {
            "post": {
                "summary": kind,
                "operationId": "webhook_" + kind.replace(".", "_"),
                "description": f"{description} Any 2xx within 10 seconds is a delivery; "
                "anything else is retried, with backoff, for at least 24 hours.",
                "security": [],
                "parameters": [
                    {
                        "in": "header",
                        "name": name,
                        "required": True,
                        "description": text,
                        "schema": {"type": "string"},
                    }
                    for name, text in WEBHOOK_HEADERS.items()
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Event"}}
                    },
                },
                "responses": {"200": {"description": "Delivered (any 2xx)."}},
            }
        }
        for kind, description in WEBHOOK_TYPES.items()
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
    responses = {
        str(status): _response(
            ERROR_DESCRIPTIONS[status], "application/json", "Error", *extra.get(status, ())
        )
        for status in (*statuses, 500)
    }
    if "414" in responses:  # not ours: the server's page, without our headers
        responses["414"] = {
            "description": ERROR_DESCRIPTIONS[414],
            "content": {"text/html": {"schema": {"type": "string"}}},
        }
    return responses


def _operation(endpoint: str) -> dict:
    """The OpenAPI operation of one of our endpoints."""
    method, summary, description, request_schema, errors = OPERATIONS[endpoint]
    operation = {
        "summary": summary,
        "operationId": endpoint.split(".")[1],
        "tags": ["service" if endpoint in SERVICE_ENDPOINTS else "customers"],
    }
    if description:
        operation["description"] = description
    if endpoint in PUBLIC_ENDPOINTS:
        operation["security"] = []
    if endpoint == "customers.list_customers":
        operation["parameters"] = [
            {"in": "query", "schema": list_query.PaginationSchema},
            {"in": "query", "schema": list_query.FiltersSchema},
            list_query.METADATA_PARAMETER_DOC,
        ]
    if endpoint == "customers.events_feed":
        operation["parameters"] = [{"in": "query", "schema": events.EventsQuerySchema}]
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
        # 3.1: JSON Schema's propertyNames states the metadata key rules.
        openapi_version="3.1.0",
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
    spec.components.schema("EventList", schema=events.EventListSchema)
    spec.components.schema("Health", schema=schemas.HealthSchema)
    paths: dict[str, dict] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in OPERATIONS:
            paths.setdefault(rule.rule, {}).update(_operation(rule.endpoint))
    for rule_path, operations in paths.items():
        path = rule_path.replace("<customer_id:customer_id>", "{customer_id}")
        spec.path(path=path, operations=operations)
    document = spec.to_dict()
    document["webhooks"] = _webhooks()
    # Unknown keys are refused unless null (Lago clients send their whole model): say so exactly.
    components = document["components"]["schemas"]
    components["CustomerInput"]["additionalProperties"] = {"type": "null"}
    # apispec passes on no propertyNames: the metadata key rules are added here.
    for name in ("Customer", "CustomerInput"):
        components[name]["properties"]["metadata"]["propertyNames"] = schemas.METADATA_KEY_SCHEMA
    return document


def openapi_spec(app: Flask) -> dict:
    """The app's OpenAPI document, built once per app."""
    if "customers_openapi" not in app.extensions:
        app.extensions["customers_openapi"] = build_openapi(app)
    return app.extensions["customers_openapi"]


def docs_page() -> str:
    """The interactive API page (Swagger UI, its assets served by the blueprint)."""
    return render_template_string(
        DOCS_PAGE,
        asset=lambda name: url_for(".docs_asset", filename=name),
        spec_url=url_for(".openapi_document"),
    )

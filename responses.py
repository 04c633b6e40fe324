"""What the API answers: JSON in the contract's key order (customers as their stored bodies),
and the one error envelope."""

from http import HTTPStatus

from flask import Response, current_app
from werkzeug.exceptions import ClientDisconnected, HTTPException

from customers_service.storage import Customer, encode_json

HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
RETRY_LATER = {"Retry-After": "1"}


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


def json_response(body: dict, status: int = 200) -> Response:
    """``body`` as JSON with its keys in the order given (the contract's), as Flask writes it."""
    return text_response(encode_json(body) + "\n", status)


def text_response(text: str, status: int = 200) -> Response:
    """JSON text already written as json_response writes it, answered as it is."""
    response_class = current_app._get_current_object().response_class  # not through the proxy
    return response_class(text, status, content_type="application/json")


def customer_response(customer: Customer) -> Response:
    """``{"customer": ...}`` around a customer's stored body: json_response's bytes for the
    customer's object, without building it."""
    return text_response('{"customer":' + customer.body + "}\n")


def customers_page_response(customers: list[Customer], meta: dict) -> Response:
    """``{"customers": [...], "meta": {...}}``, the page's stored bodies joined: json_response's
    bytes for the page, without building its objects."""
    bodies = ",".join([customer.body for customer in customers])
    return text_response('{"customers":[' + bodies + '],"meta":' + encode_json(meta) + "}\n")


def error_response(
    status: int,
    code: str,
    message: str | None = None,
    details: dict | None = None,
    headers: dict | None = None,
) -> Response:
    """The contract's error envelope as a response."""
    body = {"status": status, "error": HTTPStatus(status).phrase, "code": code}
    if message:
        body["message"] = message
    if details:
        body["error_details"] = details
    response = json_response(body, status)
    response.headers.update(headers or {})
    return response


def http_error(e: HTTPException) -> Response:
    """Werkzeug's HTTP errors in the contract's envelope."""
    if isinstance(e, ClientDisconnected):
        return error_response(400, "bad_request", "the body ended before its Content-Length")
    headers = {}
    if e.code == 405 and getattr(e, "valid_methods", None):
        headers["Allow"] = ", ".join(e.valid_methods)
    code = HTTP_ERROR_CODES.get(e.code, "http_error")
    return error_response(e.code, code, headers=headers)

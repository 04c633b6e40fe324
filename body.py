"""Strict request bodies: the media type, the size limit, and JSON as the standard writes it."""

import json
import re

from flask import Request

from customers_service.responses import ApiError

CUSTOMER_MISSING = "param is missing or the value is empty or invalid: customer"
# Only a \u escape can make a lone surrogate; strict UTF-8 bytes never do.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """Build a JSON object, refusing duplicate keys."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


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
        if SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
            raise ValueError("lone surrogate")
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the request body is not valid JSON") from None
    return value


def read_body(req: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes, whether sent with a length or chunked.

    Werkzeug trusts a server that ends chunked bodies (gunicorn does) to enforce no limit,
    so the limit is counted here, while reading.
    """
    declared = req.content_length
    if declared is not None and declared > limit:
        raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
    chunks, size = [], 0
    while size <= limit:
        chunk = req.stream.read(min(65536, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise ApiError(413, "payload_too_large", f"the body is over {limit} bytes")
    if declared is not None and size < declared:
        raise ApiError(400, "bad_request", "the body ended before its Content-Length")
    return b"".join(chunks)


def json_body(req: Request, limit: int):
    """The request's JSON body, after the media type and size checks."""
    if not req.is_json:
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    return parse_json(read_body(req, limit))


def customer_payload(req: Request, limit: int) -> dict:
    """The ``customer`` object of the body, or ApiError(400, bad_request)."""
    body = json_body(req, limit)
    customer = body.get("customer") if isinstance(body, dict) else None
    if not isinstance(customer, dict) or not customer:
        raise ApiError(400, "bad_request", CUSTOMER_MISSING)
    return customer

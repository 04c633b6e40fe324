"""The peer's FastAPI app: the routes, the API key, and the contract's error envelope.

Endpoints are plain `def`: FastAPI runs them in its thread pool, each with a sync SQLAlchemy
session from get_db.

    gunicorn -c bench/peers/gunicorn.conf.py fastapi_customers.main:app
"""

import os
import secrets
from functools import lru_cache
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import crud
from .database import get_db
from .schemas import (
    BAD_REQUEST,
    CustomerList,
    CustomerOut,
    CustomerRequest,
    CustomerResponse,
    PageMeta,
)

app = FastAPI(title="Customers (the benchmark's peer)")

# Pydantic's error types as the contract's codes; our own validators raise the codes themselves.
PYDANTIC_CODES = {
    "missing": "value_is_mandatory",
    "string_type": "invalid_type",
    "dict_type": "invalid_type",
    "string_too_long": "value_is_too_long",
    "extra_forbidden": "unknown_field",
}
PAGE_CODES = {"page": "must_be_at_least_1", "per_page": "must_be_between_1_and_100"}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    """An error answered with the contract's envelope."""

    def __init__(self, status: int, code: str, message: str | None = None, details=None):
        self.status, self.code, self.message, self.details = status, code, message, details


def envelope(status: int, code: str, message=None, details=None, headers=None) -> JSONResponse:
    body = {"status": status, "error": HTTPStatus(status).phrase, "code": code}
    if message:
        body["message"] = message
    if details:
        body["error_details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(ApiError)
async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return envelope(exc.status, exc.code, exc.message, exc.details, headers)


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if errors[0]["loc"][0] == "query":
        pages: dict[str, list[str]] = {}
        for error in errors:
            name = error["loc"][1]
            code = "invalid_integer" if error["type"] == "int_parsing" else PAGE_CODES[name]
            pages.setdefault(name, []).append(code)
        return envelope(400, "invalid_pagination", details=pages)
    if any(error["type"] == "json_invalid" for error in errors):
        return envelope(400, "invalid_json", "the request body is not valid JSON")
    details: dict[str, list[str]] = {}
    for error in errors:
        if len(error["loc"]) < 3:  # the body itself, or its customer
            return envelope(400, "bad_request", BAD_REQUEST)
        codes = error.get("ctx", {}).get("codes") or [
            PYDANTIC_CODES.get(error["type"], error["type"])
        ]
        field = details.setdefault(str(error["loc"][2]), [])
        field += [code for code in codes if code not in field]
    return envelope(422, "validation_errors", details=details)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return envelope(exc.status_code, code, headers=exc.headers)


@lru_cache
def get_api_keys() -> frozenset[str]:
    keys = os.environ.get("PEER_API_KEYS", "")
    return frozenset(key.strip() for key in keys.split(",") if key.strip())


bearer = HTTPBearer(auto_error=False)


def require_api_key(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    api_keys: Annotated[frozenset[str], Depends(get_api_keys)],
) -> None:
    given = credentials.credentials.encode() if credentials else b""
    if not any(secrets.compare_digest(given, key.encode()) for key in api_keys):
        raise ApiError(401, "unauthorized")


def require_json(content_type: Annotated[str, Header()] = "") -> None:
    media_type = content_type.split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")


DbSession = Annotated[Session, Depends(get_db)]
authenticated = [Depends(require_api_key)]


@app.post(
    "/api/v1/customers",
    response_model=CustomerResponse,
    dependencies=[*authenticated, Depends(require_json)],
)
def upsert_customer(body: CustomerRequest, db: DbSession):
    """Create the customer, or update the one with that customer_id."""
    try:
        customer = crud.upsert_customer(db, body.customer.model_dump(exclude_unset=True))
    except crud.TooManyMetadataKeys:
        raise ApiError(
            422, "validation_errors", details={"metadata": ["too_many_metadata_keys"]}
        ) from None
    return {"customer": customer}


@app.get(
    "/api/v1/customers/{customer_id:path}",
    response_model=CustomerResponse,
    dependencies=authenticated,
)
def get_customer(customer_id: str, db: DbSession):
    """One customer by its customer_id."""
    customer = crud.get_customer(db, customer_id)
    if customer is None:
        raise ApiError(404, "customer_not_found", "no customer has that customer_id")
    return {"customer": customer}


@app.get("/api/v1/customers", response_model=CustomerList, dependencies=authenticated)
def list_customers(
    db: DbSession,
    page: Annotated[int, Query(ge=1)] = 1,
    per_page: Annotated[int, Query(ge=1, le=100)] = 20,
):
    """One page of customers, newest first."""
    customers, total = crud.list_customers(db, page, per_page)
    total_pages = -(-total // per_page)
    meta = PageMeta(
        current_page=page,
        next_page=page + 1 if page < total_pages else None,
        prev_page=page - 1 if page > 1 else None,
        total_pages=total_pages,
        total_count=total,
    )
    return CustomerList(customers=[CustomerOut.model_validate(c) for c in customers], meta=meta)

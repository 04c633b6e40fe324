"""The peer's Pydantic models: a customer as the API takes it in and gives it back.

A rule that fails raises a PydanticCustomError whose type is the contract's error code
(``not_a_valid_country_code``); main.py turns Pydantic's own types (``missing``,
``string_type``, ...) into the contract's codes.
"""

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import pycountry
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    TypeAdapter,
    ValidationError,
    field_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

COUNTRY_CODES = frozenset(country.alpha_2 for country in pycountry.countries) | {"XK"}
# Not EmailStr: email-validator refuses special-use domains (the contract's `.test` examples)
# and rewrites the address, which the API keeps as sent.
EMAIL = re.compile(
    r"[\w.!#$%&'*+/=?^`{|}~-]+@[^\W_](?:[\w-]*[^\W_])?(?:\.[^\W_](?:[\w-]*[^\W_])?)+"
)
HTTP_URL = TypeAdapter(HttpUrl)
METADATA_KEYS = 50
BAD_REQUEST = "param is missing or the value is empty or invalid: customer"


def mandatory(value: Any) -> Any:
    if value is None:
        raise PydanticCustomError("value_is_mandatory", "value is mandatory")
    return value


def no_nul(value: str) -> str:
    if "\0" in value:
        raise PydanticCustomError("invalid_character", "NUL is not allowed")
    return value


def not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("value_is_mandatory", "value is mandatory")
    return value


def country_code(value: str) -> str:
    if value.upper() not in COUNTRY_CODES:
        raise PydanticCustomError("not_a_valid_country_code", "not an ISO 3166-1 alpha-2 code")
    return value.upper()


def email_address(value: str) -> str:
    if not EMAIL.fullmatch(value):
        raise PydanticCustomError("invalid_email_format", "not an e-mail address")
    return value


def http_url(value: str) -> str:
    """Check with Pydantic's HttpUrl, but keep the URL as sent (HttpUrl adds a slash)."""
    try:
        HTTP_URL.validate_python(value)
    except ValidationError:
        raise PydanticCustomError("invalid_url_format", "not an absolute http(s) URL") from None
    return value


def metadata_rules(value: dict[str, Any]) -> dict[str, Any]:
    """Keys of 1-40 characters without `[` or `]`, string or null values of at most 500
    characters, at most 50 keys set; every broken rule is listed under `metadata`."""
    codes = []
    for key, item in value.items():
        if "\0" in key:
            codes.append("invalid_character")
        elif not 1 <= len(key) <= 40 or not key.strip() or "[" in key or "]" in key:
            codes.append("invalid_metadata_key")
        if item is None:
            continue
        if not isinstance(item, str):
            codes.append("invalid_type")
        elif "\0" in item:
            codes.append("invalid_character")
        elif len(item) > 500:
            codes.append("value_is_too_long")
    if sum(item is not None for item in value.values()) > METADATA_KEYS:
        codes.append("too_many_metadata_keys")
    if codes:
        codes = list(dict.fromkeys(codes))
        raise PydanticCustomError("metadata", "invalid metadata: {codes}", {"codes": codes})
    return value


RequiredText = Annotated[
    str,
    Field(max_length=255),
    AfterValidator(no_nul),
    AfterValidator(not_blank),
    BeforeValidator(mandatory),
]
Text = Annotated[str, Field(max_length=255), AfterValidator(no_nul)]
Country = Annotated[str, AfterValidator(no_nul), AfterValidator(country_code)]
Email = Annotated[Text, AfterValidator(email_address)]
Url = Annotated[str, Field(max_length=2048), AfterValidator(no_nul), AfterValidator(http_url)]
Metadata = Annotated[dict[str, Any], AfterValidator(metadata_rules)]


class CustomerIn(BaseModel):
    """A customer to create, or the keys of it to update."""

    model_config = ConfigDict(extra="forbid")

    customer_id: RequiredText
    name: RequiredText
    country: Country | None = None
    address_line1: Text | None = None
    address_line2: Text | None = None
    state: Text | None = None
    zipcode: Text | None = None
    email: Email | None = None
    city: Text | None = None
    url: Url | None = None
    phone: Text | None = None
    logo_url: Url | None = None
    legal_name: Text | None = None
    legal_number: Text | None = None
    metadata: Metadata | None = None

    @model_validator(mode="before")
    @classmethod
    def drop_unknown_nulls(cls, data: Any) -> Any:
        """Lago's clients send every field of their model, unknown ones as null: ignore those."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k in cls.model_fields or v is not None}
        return data


class CustomerRequest(BaseModel):
    """The body of an upsert: one customer under `customer`."""

    customer: CustomerIn

    @model_validator(mode="before")
    @classmethod
    def customer_given(cls, data: Any) -> Any:
        customer = data.get("customer") if isinstance(data, dict) else None
        if not isinstance(customer, dict) or not customer:
            raise PydanticCustomError("bad_request", BAD_REQUEST)
        return data


class CustomerOut(BaseModel):
    """A customer as the API gives it back, its keys in the contract's order."""

    model_config = ConfigDict(from_attributes=True)

    lago_id: uuid.UUID
    customer_id: str
    name: str
    country: str | None
    address_line1: str | None
    address_line2: str | None
    state: str | None
    zipcode: str | None
    email: str | None
    city: str | None
    url: str | None
    phone: str | None
    logo_url: str | None
    legal_name: str | None
    legal_number: str | None
    metadata: dict[str, str] = Field(validation_alias="metadata_")
    created_at: datetime
    updated_at: datetime

    @field_serializer("created_at", "updated_at")
    def utc_seconds(self, value: datetime) -> str:
        if value.tzinfo is not None:  # PostgreSQL's timestamptz; SQLite gives naive UTC
            value = value.astimezone(UTC)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")


class CustomerResponse(BaseModel):
    customer: CustomerOut


class PageMeta(BaseModel):
    current_page: int
    next_page: int | None
    prev_page: int | None
    total_pages: int
    total_count: int


class CustomerList(BaseModel):
    customers: list[CustomerOut]
    meta: PageMeta

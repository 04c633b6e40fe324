"""Marshmallow schemas: the shape of a customer, its rules and its error codes."""

import datetime
import re
import uuid

from marshmallow import EXCLUDE, Schema, ValidationError, fields, pre_load, validate

from customers_service.countries import (
    COUNTRY_CODES,  # noqa: F401 (tests import it from here)
    COUNTRY_PATTERN,
    CountryCode,
    known_country,
)
from customers_service.fast_load import FastLoadSchema

SEED_EXAMPLE = {
    "customer_id": "5eb02857-a71e-4ea2-bcf9-57d3a41bc6ba",
    "name": "Gavin Belson",
    "country": "US",
    "address_line1": "5230 Penfield Ave",
    "address_line2": None,
    "state": "CA",
    "zipcode": "91364",
    "email": "dinesh@piedpiper.test",
    "city": "Woodland Hills",
    "url": "http://hooli.com",
    "phone": "1-171-883-3711 x245",
    "logo_url": "http://hooli.com/logo.png",
    "legal_name": "Coleman-Blair",
    "legal_number": "49-008-2965",
}

TEXT_ERRORS = {
    "required": "value_is_mandatory",
    "null": "value_is_mandatory",
    "invalid": "invalid_type",
    "invalid_utf8": "invalid_type",
}
TOO_LONG = "value_is_too_long"
METADATA_KEYS = 50  # the most a customer's merged metadata may hold
METADATA_KEY_LENGTH = 40
METADATA_VALUE_LENGTH = 500


# White space is what str.isspace() says, spelled out as \uXXXX: regex dialects disagree on \s.
WHITE_SPACE = "".join(f"\\u{ord(c):04x}" for c in map(chr, range(0x3001)) if c.isspace())


class TextRule(validate.Regexp):
    """A string's character rules as one pattern, since the OpenAPI document states one per
    field: no NUL anywhere (PostgreSQL cannot store it, so neither backend takes it) and, when
    ``required``, at least one character that is not white space. Each broken rule has its own
    code: ``invalid_character`` for NUL, ``value_is_mandatory`` for blank."""

    def __init__(self, required: bool):
        if required:
            pattern = f"^[{WHITE_SPACE}]*[^{WHITE_SPACE}\\u0000][^\\u0000]*$"
        else:
            pattern = "^[^\\u0000]*$"
        super().__init__(pattern, error="invalid_character")
        self.required = required

    def __call__(self, value: str) -> str:
        if "\0" in value:
            raise ValidationError("invalid_character")
        if self.required and not value.strip():
            raise ValidationError("value_is_mandatory")
        return value


not_blank = TextRule(required=True)
no_nul = TextRule(required=False)


def described(description: str, example=None, **extra) -> dict:
    """Field metadata for the OpenAPI document."""
    metadata = {"description": description, **extra}
    if example is not None:
        metadata["example"] = example
    return metadata


def required_text(description: str, example: str | None = None) -> fields.String:
    """A required, non-blank string of at most 255 characters."""
    return fields.String(
        required=True,
        validate=[not_blank, validate.Length(max=255, error=TOO_LONG)],
        error_messages=TEXT_ERRORS,
        metadata=described(description, example),
    )


def optional_text(
    description: str, max_length: int = 255, *rules, example=None, **extra
) -> fields.String:
    """An optional string (``null`` clears it) of at most ``max_length`` characters."""
    return fields.String(
        allow_none=True,
        validate=[no_nul, *rules, validate.Length(max=max_length, error=TOO_LONG)],
        error_messages=TEXT_ERRORS,
        metadata=described(description, example, **extra),
    )


def http_url(description: str, example: str) -> fields.String:
    """An optional absolute http or https URL."""
    rule = validate.URL(
        relative=False, require_tld=False, schemes={"http", "https"}, error="invalid_url_format"
    )
    # Marshmallow compiles a URL rule's pattern at its first check, 40 to 60 ms; checking the
    # example compiles it now, at import, so gunicorn's master does it once before it forks
    # rather than each worker on its first upsert (bench/README.md: a worker's first upsert).
    rule(example)
    return optional_text(
        description + " An absolute http or https URL.", 2048, rule, example=example, format="uri"
    )


def metadata_key_errors(key: str) -> list[str]:
    """The error codes of a metadata key: 1-40 characters, not blank, no ``[``, ``]`` or NUL."""
    if "\0" in key:
        return ["invalid_character"]
    if not 1 <= len(key) <= METADATA_KEY_LENGTH or not key.strip() or {"[", "]"} & set(key):
        return ["invalid_metadata_key"]
    return []


def metadata_value_errors(value) -> list[str]:
    """The error codes of a metadata value: a string of at most 500 characters, or null."""
    if value is None:
        return []
    if not isinstance(value, str):
        return ["invalid_type"]
    if "\0" in value:
        return ["invalid_character"]
    return [TOO_LONG] if len(value) > METADATA_VALUE_LENGTH else []


# The key rules as one pattern, for the OpenAPI document (propertyNames).
METADATA_KEY_PATTERN = f"^[^\\[\\]\\u0000]*[^{WHITE_SPACE}\\[\\]\\u0000][^\\[\\]\\u0000]*$"


# The key rules as JSON Schema, for the OpenAPI document (which apispec leaves to openapi.py).
METADATA_KEY_SCHEMA = {
    "minLength": 1,
    "maxLength": METADATA_KEY_LENGTH,
    "pattern": METADATA_KEY_PATTERN,
}


class Metadata(fields.Field):
    """Metadata as the upsert takes it: an object, merged into the stored one (RFC 7396: a key
    set to null is removed), or null to remove every key. Every error is listed under the one
    field ``metadata``."""

    def __init__(self, **kwargs):
        super().__init__(allow_none=True, error_messages={"invalid": "invalid_type"}, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, dict):
            raise self.make_error("invalid")
        codes = []
        for key, item in value.items():
            codes += metadata_key_errors(key) + metadata_value_errors(item)
        if sum(item is not None for item in value.values()) > METADATA_KEYS:
            codes.append("too_many_metadata_keys")
        if codes:
            raise ValidationError(list(dict.fromkeys(codes)))
        return value

    def _serialize(self, value, attr, obj, **kwargs):
        return value


class CustomerSchema(FastLoadSchema):
    """A customer as the API takes it in and gives it back."""

    class Meta:
        unknown = "raise"

    error_messages = {"unknown": "unknown_field", "type": "invalid_type"}
    # The shorter road of its load may take drop_unknown_nulls: it changes nothing when every key
    # is known.
    harmless_hooks = {"pre_load": ["drop_unknown_nulls"]}

    lago_id = fields.String(
        dump_only=True,
        metadata={
            "description": "The service's own UUID for the customer, made on insert.",
            "example": "99a6094e-199b-4101-896a-54e927ce7bd7",
        },
    )
    customer_id = required_text(
        "Customer unique identifier in your application; sending it again updates the customer.",
        SEED_EXAMPLE["customer_id"],
    )
    name = required_text("Full name of the customer.", SEED_EXAMPLE["name"])
    country = CountryCode(
        allow_none=True,
        validate=known_country,
        error_messages=TEXT_ERRORS,
        metadata=described(
            "ISO 3166-1 alpha-2 code of the billing address's country (XK too), in any case; "
            "stored upper-case.",
            "US",
            minLength=2,
            maxLength=2,
            pattern=COUNTRY_PATTERN,
        ),
    )
    address_line1 = optional_text(
        "First line of the billing address.", example=SEED_EXAMPLE["address_line1"]
    )
    address_line2 = optional_text("Second line of the billing address.")
    state = optional_text("State of the billing address.", example="CA")
    zipcode = optional_text("Zipcode of the billing address.", example="91364")
    email = optional_text(
        "Email of the customer.",
        255,
        validate.Email(error="invalid_email_format"),
        example=SEED_EXAMPLE["email"],
        format="email",
    )
    city = optional_text("City of the billing address.", example="Woodland Hills")
    url = http_url("Custom URL of the customer.", SEED_EXAMPLE["url"])
    phone = optional_text("Phone number of the customer.", example=SEED_EXAMPLE["phone"])
    logo_url = http_url("Logo URL of the customer.", SEED_EXAMPLE["logo_url"])
    legal_name = optional_text("Legal company name of the customer.", example="Coleman-Blair")
    legal_number = optional_text("Legal company number of the customer.", example="49-008-2965")
    metadata = Metadata(
        metadata=described(
            "Your own attributes: string values under keys of 1-40 characters (no `[` or `]`), "
            "at most 50. An update merges it into the stored metadata: a key with a string sets "
            "it, a key with null removes it, a key absent keeps it; `null` removes every key. "
            "`{}` when the customer has none.",
            {"crm_id": "48213", "plan": "pro"},
            type="object",
            maxProperties=METADATA_KEYS,
            additionalProperties={
                "type": ["string", "null"],
                "maxLength": METADATA_VALUE_LENGTH,
                "pattern": "^[^\\u0000]*$",
            },
        )
    )
    created_at = fields.String(
        dump_only=True,
        metadata={"description": "When it was created (UTC).", "example": "2022-04-29T08:59:51Z"},
    )
    updated_at = fields.String(
        dump_only=True,
        metadata={
            "description": "When it was last upserted (UTC).",
            "example": "2022-04-29T08:59:51Z",
        },
    )

    @pre_load
    def drop_unknown_nulls(self, data, **kwargs):
        """Ignore unknown keys sent as null, as Lago clients send their whole model."""
        if not isinstance(data, dict):
            return data
        fields_ = self.load_fields
        if all(key in fields_ for key in data):
            return data
        return {k: v for k, v in data.items() if k in fields_ or v is not None}


SERVER_OWNED = tuple(name for name, f in CustomerSchema().fields.items() if f.dump_only)


class CustomerRequestSchema(Schema):
    """The body of an upsert: one customer under ``customer``; other top-level keys are ignored."""

    class Meta:
        unknown = EXCLUDE

    customer = fields.Nested(
        CustomerSchema(exclude=SERVER_OWNED),
        required=True,
        metadata={"description": "The customer to create, or the keys of it to update."},
    )


class CustomerResponseSchema(Schema):
    """One customer under ``customer``."""

    customer = fields.Nested(CustomerSchema, required=True)


class CustomerListSchema(Schema):
    """One page of customers, newest first."""

    class PageMetaSchema(Schema):
        current_page = fields.Integer(metadata={"description": "This page's number."})
        next_page = fields.Integer(
            allow_none=True, metadata={"description": "The next page's number, or null."}
        )
        prev_page = fields.Integer(
            allow_none=True, metadata={"description": "The previous page's number, or null."}
        )
        total_pages = fields.Integer(metadata={"description": "How many pages there are."})
        total_count = fields.Integer(metadata={"description": "How many customers there are."})

    customers = fields.List(fields.Nested(CustomerSchema))
    meta = fields.Nested(PageMetaSchema)


class ErrorSchema(Schema):
    """The envelope of every error."""

    status = fields.Integer(required=True, metadata={"description": "The HTTP status."})
    error = fields.String(required=True, metadata={"description": "The status's reason phrase."})
    code = fields.String(required=True, metadata={"description": "A stable machine code."})
    message = fields.String(metadata={"description": "A sentence for people."})
    error_details = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "Field name to the list of its error codes."},
    )


TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def api_timestamp(value: str) -> None:
    """Refuse a timestamp not written as the API writes them (2022-04-29T08:59:51Z), or not a
    real time (both backends must be able to store it)."""
    try:
        if TIMESTAMP.fullmatch(value):
            datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
            return
    except ValueError:
        pass
    raise ValidationError("invalid_timestamp")


def canonical_uuid(value: str) -> None:
    """Refuse anything but a UUID in its canonical lower-case form."""
    try:
        if str(uuid.UUID(value)) == value:
            return
    except ValueError:
        pass
    raise ValidationError("invalid_uuid")


def server_owned(rule) -> fields.String:
    """A server-owned key as the import command reads it back from an export."""
    return fields.String(allow_none=True, validate=rule, error_messages=TEXT_ERRORS)


class CustomerImportSchema(CustomerSchema):
    """A customer read by the import command: the API's rules, plus the server-owned keys of an
    export, which are kept when the customer is created (a restore) and ignored otherwise."""

    lago_id = server_owned(canonical_uuid)
    created_at = server_owned(api_timestamp)
    updated_at = server_owned(api_timestamp)


class HealthSchema(Schema):
    """The answer of /health."""

    status = fields.String(
        metadata={"description": "ok when the database answers.", "example": "ok"}
    )


customer_schema = CustomerSchema()
customer_import_schema = CustomerImportSchema()

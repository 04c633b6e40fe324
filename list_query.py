"""The list's query string: its page, filters and sort, their rules (Marshmallow schemas, which
the OpenAPI document is made from), read into the storage.Filters each backend turns into SQL."""

import datetime
import functools
import re
from types import MappingProxyType

from marshmallow import Schema, ValidationError, fields, validate
from werkzeug.datastructures import MultiDict

from customers_service.responses import ApiError
from customers_service.schemas import (
    COUNTRY_PATTERN,
    METADATA_KEY_SCHEMA,
    METADATA_KEYS,
    METADATA_VALUE_LENGTH,
    TOO_LONG,
    CountryCode,
    known_country,
    metadata_key_errors,
    metadata_value_errors,
    no_nul,
)
from customers_service.storage import Filters, fold

SORTS = ("-created_at", "created_at", "-updated_at", "updated_at")
MAX_VALUES = 100  # values of one list filter (countries[]=...&countries[]=...)
METADATA_PARAMETER = re.compile(r"metadata\[(.*)\]", re.DOTALL)
# RFC 3339: a date, a time (fractions allowed) and Z or an offset.
TIME_FILTER = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]+))?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
# A bound past either end of what a timestamp can hold (a year before 1 or after 9999 in UTC).
BEFORE_ALL, AFTER_ALL = "before all", "after all"


class QueryInteger(fields.Integer):
    """An integer written in plain decimal digits, as a query string carries it."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str) and not re.fullmatch(r"-?[0-9]+", value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class PaginationSchema(Schema):
    """The page of the list."""

    page = QueryInteger(
        load_default=1,
        validate=validate.Range(min=1, error="must_be_at_least_1"),
        error_messages={"invalid": "invalid_integer"},
        metadata={"description": "Page number, from 1."},
    )
    per_page = QueryInteger(
        load_default=20,
        validate=validate.Range(min=1, max=100, error="must_be_between_1_and_100"),
        error_messages={"invalid": "invalid_integer"},
        metadata={"description": "Customers per page, 1 to 100."},
    )


def utc_bound(text: str) -> str:
    """An RFC 3339 time as the stored timestamps are written (whole seconds, UTC), rounded up
    to the next whole second (stored times are whole seconds, so ``>=`` and ``<`` keep their
    meaning; a leap second ``:60`` is the next minute's start), or BEFORE_ALL / AFTER_ALL when
    it is past what a timestamp can hold."""
    match = TIME_FILTER.fullmatch(text)
    if match is None:
        raise ValidationError("invalid_timestamp")
    day, clock, fraction, offset = match.groups()
    leap = clock.endswith(":60")
    try:
        moment = datetime.datetime.fromisoformat(
            f"{day}T{clock[:-2] + '59' if leap else clock}{offset.upper()}"
        )
    except ValueError:
        raise ValidationError("invalid_timestamp") from None
    later = leap or bool(fraction and fraction.strip("0"))
    try:
        moment = moment.astimezone(datetime.UTC)
        moment += datetime.timedelta(seconds=1 if later else 0)
    except OverflowError:
        return AFTER_ALL if moment.year == 9999 else BEFORE_ALL
    return moment.replace(tzinfo=None).isoformat() + "Z"


class TimeFilter(fields.String):
    """A time filter: an RFC 3339 date and time with Z or an offset."""

    def _deserialize(self, value, attr, data, **kwargs):
        return utc_bound(super()._deserialize(value, attr, data, **kwargs))


def filter_text(description: str, *rules, **kwargs) -> fields.String:
    """A text filter: any string without NUL."""
    return fields.String(
        validate=[no_nul, *rules],
        metadata={"description": description},
        **kwargs,
    )


def value_list(item: fields.Field, description: str, name: str) -> fields.List:
    """A repeatable filter: ``name=a&name=b`` selects either."""
    return fields.List(
        item,
        data_key=name,
        validate=validate.Length(max=MAX_VALUES, error="too_many_values"),
        metadata={
            "description": description + f" Repeat it for any of several (at most {MAX_VALUES})."
        },
    )


def time_filter(column: str, bound: str) -> TimeFilter:
    """One end of a time range on ``column``."""
    meaning = "at or after" if bound == "gte" else "strictly before"
    return TimeFilter(
        data_key=f"{column}[{bound}]",
        metadata={
            "description": f"Customers whose `{column}` is {meaning} this time: RFC 3339, with "
            "`Z` or an offset (fractions of a second allowed; a date alone is not).",
            "format": "date-time",
        },
    )


class FiltersSchema(Schema):
    """The list's filters, combined with AND (the values of one list filter with OR), and its
    sort. ``metadata[KEY]=VALUE`` is read by load_list_query and documented by openapi.py."""

    search_term = filter_text(
        "Customers with this text anywhere in `customer_id`, `name`, `legal_name` or `email`, "
        "ignoring case (Unicode case folding: `ÉCOLE` finds `école`, `ecole` does not); `%` "
        "and `_` are plain characters.",
        validate.Length(min=1, error="value_is_empty"),
        validate.Length(max=255, error=TOO_LONG),
    )
    customer_id = filter_text("The customer with exactly this `customer_id`.")
    email = filter_text("Customers with this e-mail address, ignoring case.")
    countries = value_list(
        CountryCode(
            validate=known_country,
            metadata={"minLength": 2, "maxLength": 2, "pattern": COUNTRY_PATTERN},
        ),
        "Customers in this country (ISO 3166-1 alpha-2, any case).",
        "countries[]",
    )
    states = value_list(
        fields.String(validate=no_nul), "Customers whose `state` is exactly this.", "states[]"
    )
    zipcodes = value_list(
        fields.String(validate=no_nul), "Customers whose `zipcode` is exactly this.", "zipcodes[]"
    )
    created_at_gte = time_filter("created_at", "gte")
    created_at_lt = time_filter("created_at", "lt")
    updated_at_gte = time_filter("updated_at", "gte")
    updated_at_lt = time_filter("updated_at", "lt")
    sort = fields.String(
        validate=validate.OneOf(SORTS, error="invalid_sort"),
        metadata={
            "description": "`-created_at` (newest first, the default), `created_at`, "
            "`-updated_at` or `updated_at`; ties are broken by the order of insertion.",
            "enum": list(SORTS),
        },
    )


# The OpenAPI parameter of metadata[KEY]=VALUE (a deepObject: one KEY per parameter).
METADATA_PARAMETER_DOC = {
    "in": "query",
    "name": "metadata",
    "style": "deepObject",
    "explode": True,
    "description": "`metadata[KEY]=VALUE`: customers whose metadata has `KEY` set to exactly "
    "`VALUE`. Several keys select customers that have them all.",
    "schema": {
        "type": "object",
        "propertyNames": METADATA_KEY_SCHEMA,
        "additionalProperties": {
            "type": "string",
            "maxLength": METADATA_VALUE_LENGTH,
            "pattern": "^[^\\u0000]*$",
        },
    },
}


PAGINATION = frozenset(("page", "per_page"))
pagination_schema = PaginationSchema()
filters_schema = FiltersSchema()
SINGLE = frozenset(
    f.data_key or name
    for name, f in filters_schema.fields.items()
    if not isinstance(f, fields.List)
)
REPEATABLE = frozenset(
    f.data_key for f in filters_schema.fields.values() if isinstance(f, fields.List)
)
NOTHING_FILTERED = MappingProxyType(filters_schema.load({}))


def load_list_query(args: MultiDict) -> tuple[int, int, Filters | None]:
    """The page, the page size and the filters of a list's query string; Filters is None when
    they select nothing whatever is stored (a time bound past the end of time).

    Raises ApiError 400: ``invalid_pagination`` for a bad page or page size, else
    ``invalid_filters`` with every bad parameter under the name it was sent as.
    """
    page_args, filter_args, metadata = {}, {}, {}
    page_errors, filter_errors = {}, {}
    for name in args.keys():
        values = args.getlist(name)
        errors = page_errors if name in PAGINATION else filter_errors
        if name in REPEATABLE:
            filter_args[name] = values
        elif len(values) > 1 and (
            name in PAGINATION or name in SINGLE or name.startswith("metadata[")
        ):
            errors[name] = ["repeated_parameter"]
        elif name in PAGINATION:
            page_args[name] = values[0]
        elif name in SINGLE:
            filter_args[name] = values[0]
        elif (match := METADATA_PARAMETER.fullmatch(name)) is not None:
            codes = metadata_key_errors(match[1]) + metadata_value_errors(values[0])
            if codes:
                errors[name] = codes
            metadata[match[1]] = values[0]
        else:
            errors[name] = ["unknown_parameter"]
    try:
        page, per_page = load_page(page_args.get("page"), page_args.get("per_page"))
    except ValidationError as e:
        page_errors.update(e.normalized_messages())
    if page_errors:
        raise ApiError(400, "invalid_pagination", details=page_errors)
    try:
        # No filter sent: what the schema loads from nothing, loaded once.
        loaded = filters_schema.load(filter_args) if filter_args else NOTHING_FILTERED
    except ValidationError as e:
        filter_errors.update(_codes_by_parameter(e.normalized_messages()))
    if filter_errors:
        raise ApiError(400, "invalid_filters", details=filter_errors)
    if not filter_args and not metadata:
        return page, per_page, UNFILTERED
    return page, per_page, _filters(loaded, metadata)


@functools.lru_cache(maxsize=256)  # each under 4,300 digits: Python's int() refuses longer
def load_page(page: str | None, per_page: str | None) -> tuple[int, int]:
    """The page and page size as PaginationSchema loads them (remembered: a client sends the
    same few again and again, and a load costs more than the rest of a list's parsing)."""
    sent = {"page": page, "per_page": per_page}
    loaded = pagination_schema.load(
        {name: value for name, value in sent.items() if value is not None}
    )
    return loaded["page"], loaded["per_page"]


def _codes_by_parameter(messages: dict) -> dict[str, list[str]]:
    """Marshmallow's messages, a list filter's per-item codes merged into one list."""
    flat = {}
    for name, codes in messages.items():
        if isinstance(codes, dict):  # {index: [codes]} of a list's items
            codes = [code for item in codes.values() for code in item]
        flat[name] = list(dict.fromkeys(codes))
    return flat


def _filters(loaded: dict, metadata: dict) -> Filters | None:
    """Filters from the loaded parameters, or None if they select nothing whatever is stored:
    a time bound past the end of time, or more metadata pairs than a customer may hold keys
    (SQLite would also refuse a condition that long)."""
    if len(metadata) > METADATA_KEYS:
        return None
    bounds = {}
    for name in ("created_at_gte", "created_at_lt", "updated_at_gte", "updated_at_lt"):
        value = loaded.get(name)
        selects_all = value == (BEFORE_ALL if name.endswith("gte") else AFTER_ALL)
        if value in (BEFORE_ALL, AFTER_ALL) and not selects_all:
            return None
        bounds[name] = None if selects_all else value
    sort = loaded.get("sort", "-created_at")
    return Filters(
        search=fold(loaded.get("search_term")),
        customer_id=loaded.get("customer_id"),
        email=fold(loaded.get("email")),
        countries=tuple(loaded.get("countries", ())),
        states=tuple(loaded.get("states", ())),
        zipcodes=tuple(loaded.get("zipcodes", ())),
        metadata=metadata,
        sort=sort.lstrip("-"),
        descending=sort.startswith("-"),
        **bounds,
    )


UNFILTERED = _filters(NOTHING_FILTERED, {})  # no filter sent: made once

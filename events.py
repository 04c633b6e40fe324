"""Events: the feed's query string and the event object, as the feed and webhooks send it."""

from marshmallow import Schema, ValidationError, fields, validate
from werkzeug.datastructures import MultiDict

from customers_service.list_query import QueryInteger
from customers_service.responses import ApiError
from customers_service.schemas import CustomerSchema
from customers_service.storage import encode_json

FEED_LIMIT = 1000


class EventsQuerySchema(Schema):
    """Where the feed's page starts, and how long it is."""

    after = QueryInteger(
        load_default=0,
        validate=validate.Range(min=0, error="must_be_at_least_0"),
        error_messages={"invalid": "invalid_integer"},
        metadata={
            "description": "The last `sequence` already read; 0 (the default) for the "
            "oldest event kept."
        },
    )
    limit = QueryInteger(
        load_default=100,
        validate=validate.Range(min=1, max=FEED_LIMIT, error="must_be_between_1_and_1000"),
        error_messages={"invalid": "invalid_integer"},
        metadata={"description": "Events per page, 1 to 1000."},
    )


class EventSchema(Schema):
    """One change of one customer (the OpenAPI document's description of it)."""

    id = fields.UUID(
        required=True, metadata={"description": "Unique; a webhook's X-Lago-Unique-Key."}
    )
    sequence = fields.Integer(
        required=True,
        metadata={"description": "Grows in the order the changes committed (gaps allowed)."},
    )
    webhook_type = fields.String(
        required=True,
        validate=validate.OneOf(["customer.created", "customer.updated", "customer.deleted"]),
    )
    object_type = fields.String(required=True, validate=validate.OneOf(["customer"]))
    created_at = fields.String(
        required=True,
        metadata={
            "description": "The time of the change (a create's or update's `updated_at`).",
            "format": "date-time",
        },
    )
    customer = fields.Nested(
        CustomerSchema,
        required=True,
        metadata={"description": "The customer after the change (as it was, for a delete)."},
    )


class EventListSchema(Schema):
    """A page of the feed."""

    class FeedMetaSchema(Schema):
        last_sequence = fields.Integer(
            required=True,
            metadata={
                "description": "The last event's sequence, or `after` when none: pass "
                "it as the next `after`."
            },
        )
        has_more = fields.Boolean(
            required=True, metadata={"description": "More events follow right now."}
        )

    events = fields.List(fields.Nested(EventSchema), required=True)
    meta = fields.Nested(FeedMetaSchema, required=True)


events_query_schema = EventsQuerySchema()


def load_events_query(args: MultiDict) -> tuple[int, int]:
    """``after`` and ``limit`` of the feed's query string; ApiError 400 invalid_pagination
    naming each bad, repeated or unknown parameter."""
    errors, given = {}, {}
    for name in args.keys():
        values = args.getlist(name)
        if name not in events_query_schema.fields:
            errors[name] = ["unknown_parameter"]
        elif len(values) > 1:
            errors[name] = ["repeated_parameter"]
        else:
            given[name] = values[0]
    try:
        loaded = events_query_schema.load(given)
    except ValidationError as e:
        errors.update(e.normalized_messages())
    if errors:
        raise ApiError(400, "invalid_pagination", details=errors)
    return loaded["after"], loaded["limit"]


def event_object(stored: dict) -> dict:
    """A stored event (sequence, id, webhook_type, created_at, customer) as the API's object,
    in the contract's key order, its customer's metadata keys in code point order."""
    customer = stored["customer"]
    if len(customer["metadata"]) > 1:
        customer["metadata"] = dict(sorted(customer["metadata"].items()))
    return {
        "id": stored["id"],
        "sequence": stored["sequence"],
        "webhook_type": stored["webhook_type"],
        "object_type": "customer",
        "created_at": stored["created_at"],
        "customer": customer,
    }


def event_body(event: dict) -> bytes:
    """The event as a webhook's body: compact JSON, as the feed writes it."""
    return encode_json(event).encode()

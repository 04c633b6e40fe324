"""What both backends share, and import from here rather than from each other: the parameters
of an upsert, made from a validated customer, the constants and the Python loops around their
SQL, and the contract's 503 codes they map their drivers' faults to."""

import json
import os
import time
from collections.abc import Callable, Mapping
from json.encoder import encode_basestring_ascii as quote_ascii  # what the encoder quotes with

from customers_service.storage import (
    COLUMNS,
    COPIED,
    FIELDS,
    OPTIONAL_FIELDS,
    REQUIRED,
    SEARCHED,
    encode_json,
    fold,
)

# folded_<field> holds the field as fold() makes it, so "ignoring case" means one thing on both
# backends, whatever the database's locale.
FOLDED = tuple(f"folded_{f}" for f in SEARCHED)
# The columns an upsert writes, in the order of both backends' INSERT.
INSERTED = ("lago_id", *FIELDS, "metadata", *FOLDED, "created_at", "updated_at")

BUSY = ("database_busy", "the database is busy; retry")
UNAVAILABLE = ("database_unavailable", "the database is unavailable")

PRUNE_BATCH = 1000
PRUNE_BATCHES = 10  # at most, per call: the deliverer's loop goes on between calls

# Each endpoint's queue; the same SQL in both dialects.
WEBHOOK_STATUS = """
SELECT w.id, w.url, w.created_at, w.last_error, w.last_error_at,
    (SELECT count(*) FROM webhook_deliveries d WHERE d.endpoint = w.id AND NOT d.failed)
        AS backlog,
    (SELECT count(*) FROM webhook_deliveries d WHERE d.endpoint = w.id AND d.failed) AS failed
FROM webhook_endpoints w ORDER BY w.created_at, w.id
"""


def new_lago_id() -> str:
    """A version 7 UUID: it starts with the time, so the lago_id index grows at its end."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    digits = f"{value:032x}"  # what str(uuid.UUID(int=value)) writes, without building one
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


_encode_metadata = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def metadata_json(metadata: Mapping) -> str:
    """Metadata as stored: compact JSON text."""
    return _encode_metadata(metadata) if metadata else "{}"


# Each column's key as that encoder writes it, after the brace or the comma before it.
_BODY_KEYS = tuple(("," if i else "{") + quote_ascii(c) + ":" for i, c in enumerate(COLUMNS))
_METADATA = COLUMNS.index("metadata")


def customer_body(*values: str | None) -> str:
    """A customer's body, its JSON object as the API answers it, from its COLUMNS' values as
    SQLite stores them (metadata as JSON text): each text quoted by the encoder's own function,
    without building a dict. PostgreSQL's counterpart is the SQL function customers_body
    (backends/postgres/schema.py)."""
    parts = []
    for key, value in zip(_BODY_KEYS, values, strict=True):
        parts.append(key)
        parts.append("null" if value is None else quote_ascii(value))
    metadata = values[_METADATA]  # an object, its keys in code point order
    metadata = {} if metadata == "{}" else dict(sorted(json.loads(metadata).items()))
    parts[2 * _METADATA + 1] = encode_json(metadata)
    parts.append("}")
    return "".join(parts)


def upsert_params(fields: Mapping, now: str) -> dict:
    """The named parameters of both backends' upsert for one validated customer.

    ``fields`` may carry lago_id, created_at and updated_at (an import restoring an export):
    they are used only if the customer is created. Its ``metadata`` is a patch (a key set to
    None removes it), or None to remove every key. Each ``set_<field>`` flag is 1 when the key
    was sent and 0 when it was not, a number both databases take as it is.
    """
    params = {f: fields.get(f) for f in FIELDS}
    for f in OPTIONAL_FIELDS:
        params["set_" + f] = 1 if f in fields else 0
    for f in SEARCHED:
        params["folded_" + f] = fold(params[f])
    patch = fields.get("metadata")
    params["set_metadata"] = 1 if "metadata" in fields else 0
    params["metadata_patch"] = None if patch is None else metadata_json(patch)
    created = {k: v for k, v in (patch or {}).items() if v is not None}
    params["metadata"] = metadata_json(created)
    params["lago_id"] = fields.get("lago_id") or new_lago_id()
    params["created_at"] = fields.get("created_at") or now
    params["updated_at"] = fields.get("updated_at") or now
    params["now"] = now
    params["body"] = None  # made in the statement, unless with_created_body made it already
    return params


UPSERT_PARAMS = tuple(upsert_params({}, ""))  # their names, in order


def with_created_body(params: dict) -> dict:
    """Upsert parameters with the body of the customer they create, if they create one: an
    import's workers make it, so SQLite's one writer does not (PostgreSQL makes its own)."""
    params["body"] = customer_body(*(params[c] for c in COLUMNS))
    return params


def sent_fields(params: Mapping) -> dict:
    """The customer that upsert_params was given, back from its parameters."""
    fields = {f: params[f] for f in FIELDS if f in REQUIRED or params["set_" + f]}
    if params["set_metadata"]:
        patch = params["metadata_patch"]
        fields["metadata"] = None if patch is None else json.loads(patch)
    fields.update(lago_id=params["lago_id"], created_at=params["created_at"])
    return fields


def holds_sent(customer: dict | None, fields: Mapping) -> bool:
    """Whether a stored customer holds every value an upsert sent (its metadata patch merged):
    what an upsert that changed nothing may answer without looking again."""
    if customer is None:
        return False
    for field, value in fields.items():
        if field == "metadata":
            stored = customer["metadata"]
            if value is None:
                if stored:
                    return False
            elif any(stored.get(key) != sent for key, sent in value.items()):
                return False
        elif field in FIELDS and customer[field] != value:
            return False
    return True


# Where each value of INSERTED is in a copied customer (storage.COPIED), and whether it is folded.
_FROM_COPIED = tuple(
    (COPIED["customers"].index(c.removeprefix("folded_")), c.startswith("folded_"))
    for c in INSERTED
)


def copied_customer(row: tuple) -> tuple:
    """A customer that a copy read (storage.COPIED) as the values of INSERTED, its searched
    fields folded by fold() as an upsert folds them (upsert_params)."""
    return tuple(fold(row[at]) if folded else row[at] for at, folded in _FROM_COPIED)


def prune_oldest(
    oldest: Callable[[int], list[tuple[int, float]]],
    remove_up_to: Callable[[int], None],
    recorded_before: float,
) -> int:
    """Prune as one run of sequences from the oldest event: ``oldest(n)`` gives the n oldest
    events' (sequence, recorded_at), ``remove_up_to(sequence)`` removes those up to it with
    their deliveries. Up to PRUNE_BATCHES batches; return how many were removed."""
    removed = 0
    for _ in range(PRUNE_BATCHES):
        rows = oldest(PRUNE_BATCH)
        prefix = next((i for i, (_, at) in enumerate(rows) if at >= recorded_before), len(rows))
        if prefix == 0:
            return removed
        remove_up_to(rows[prefix - 1][0])
        removed += prefix
        if prefix < PRUNE_BATCH:
            break
    return removed


def endpoint_status(conn, failed_events: str, failed_shown: int) -> list[dict]:
    """Each endpoint's row of WEBHOOK_STATUS with its first ``failed_shown`` failed events,
    read by the backend's ``failed_events`` statement (endpoint, limit)."""
    status = []
    for row in conn.execute(WEBHOOK_STATUS).fetchall():
        endpoint = dict(row)
        events = conn.execute(failed_events, (endpoint["id"], failed_shown)).fetchall()
        endpoint["failed_events"] = [event["event"] for event in events]
        status.append(endpoint)
    return status

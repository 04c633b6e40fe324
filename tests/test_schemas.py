"""The customer schema's shorter road for valid customers: the same result as marshmallow's."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import Schema, ValidationError

from customers_service.schemas import CustomerSchema, customer_import_schema, customer_schema

FIELD_NAMES = list(CustomerSchema().load_fields)
FIELD_VALUES = st.one_of(
    st.none(),
    st.sampled_from(["", " ", "x", "us", "US", "zz", "a@b.co", "http://h.io", "\0", "x" * 256]),
    st.text(max_size=20),
    st.integers(),
    st.dictionaries(st.text(max_size=3), st.one_of(st.none(), st.text(max_size=3)), max_size=3),
)


ANY_KEYS = st.dictionaries(
    st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=5)), FIELD_VALUES, max_size=8
)
# Mostly valid: the two required keys, and any of the others.
LIKELY_VALID = st.fixed_dictionaries(
    {"customer_id": st.sampled_from(["c-1", "x/y", " z "]), "name": st.sampled_from(["N", "É"])},
    optional={name: FIELD_VALUES for name in FIELD_NAMES if name not in ("customer_id", "name")},
)


@given(st.one_of(ANY_KEYS, LIKELY_VALID))
@settings(max_examples=300, deadline=None)
def test_the_schemas_shorter_road_loads_exactly_what_marshmallows_load_does(customer):
    def outcome(load):
        try:
            return "loaded", load(customer)
        except ValidationError as e:
            return "refused", e.normalized_messages()

    for schema in (customer_schema, customer_import_schema):
        whole = outcome(lambda data, schema=schema: Schema.load(schema, data))
        shorter = outcome(schema.load)
        assert json.dumps(shorter) == json.dumps(whole)  # the keys' order too

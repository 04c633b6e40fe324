"""The customer schema's shorter road for valid customers: the same result as marshmallow's; and
its patterns compiled when it is imported, not at a worker's first upsert."""

import json
import subprocess
import sys
import textwrap

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


# A fresh interpreter: patterns compiled by earlier tests would hide one compiled late.
FIRST_CHECKS = textwrap.dedent(
    """
    import re._compiler

    import customers_service.app  # what gunicorn.conf.py's on_starting imports before forking
    from customers_service.schemas import SEED_EXAMPLE, customer_import_schema, customer_schema

    compiled = []
    compile_pattern = re._compiler.compile
    re._compiler.compile = lambda *args: compiled.append(args[0]) or compile_pattern(*args)
    customer_schema.load(dict(SEED_EXAMPLE))
    customer_import_schema.load(dict(SEED_EXAMPLE))
    print(compiled)
    """
)


def test_importing_the_service_compiles_every_pattern_an_upserts_checks_use():
    result = subprocess.run(
        [sys.executable, "-c", FIRST_CHECKS], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # marshmallow's URL rule compiled it at the first check

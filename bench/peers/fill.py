"""Fill the peer's table as bench/run.py fills the service's: ``rows`` customers
cust-00000000... (newest last), then upd-1..upd-1000 for the update scenarios."""

import uuid
from datetime import UTC, datetime, timedelta

from fastapi_customers.database import make_engine
from fastapi_customers.models import Base, Customer
from sqlalchemy import insert, text

START = datetime.fromtimestamp(1_600_000_000, UTC)
UPDATED = datetime(2022, 1, 1, tzinfo=UTC)
BATCH = 50_000

POSTGRES_FILL = """
INSERT INTO customers (lago_id, customer_id, name, country, metadata, created_at, updated_at)
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid,
    'cust-' || lpad(i::text, 8, '0'), 'Customer ' || i, 'FR', '{}',
    to_timestamp(1600000000 + i), to_timestamp(1600000000 + i)
FROM generate_series(0, :rows - 1) i;
INSERT INTO customers (lago_id, customer_id, name, metadata, created_at, updated_at)
SELECT ('00000000-0000-7000-8000-' || lpad(i::text, 12, '0'))::uuid, 'upd-' || i, 'N', '{}',
    '2022-01-01T00:00:00Z', '2022-01-01T00:00:00Z'
FROM generate_series(1, 1000) i
"""


def customers(rows: int):
    """The rows, as the ORM's table takes them."""
    for i in range(rows):
        stamp = START + timedelta(seconds=i)
        yield {
            "lago_id": uuid.UUID(f"00000000-0000-4000-8000-{i:012x}"),
            "customer_id": f"cust-{i:08d}",
            "name": f"Customer {i}",
            "country": "FR",
            "metadata": {},
            "created_at": stamp,
            "updated_at": stamp,
        }
    for i in range(1, 1001):
        yield {
            "lago_id": uuid.UUID(f"00000000-0000-7000-8000-{i:012d}"),
            "customer_id": f"upd-{i}",
            "name": "N",
            "country": None,
            "metadata": {},
            "created_at": UPDATED,
            "updated_at": UPDATED,
        }


def fill(url: str, rows: int) -> None:
    """Create the peer's table in an empty database and fill it."""
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    table = Customer.__table__
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            for statement in POSTGRES_FILL.split(";"):
                conn.execute(text(statement), {"rows": rows})
        else:
            batch = []
            for row in customers(rows):
                batch.append(row)
                if len(batch) == BATCH:
                    conn.execute(insert(table), batch)
                    batch = []
            if batch:
                conn.execute(insert(table), batch)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("VACUUM ANALYZE customers"))
            conn.execute(text("CHECKPOINT"))  # the fill's pages written now, not during a run
        else:
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    engine.dispose()

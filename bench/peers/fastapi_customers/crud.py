"""The peer's queries: the upsert, one customer, and a page of them, with the ORM."""

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, ColumnElement, func, literal, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from .models import Customer
from .schemas import METADATA_KEYS

INSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


class TooManyMetadataKeys(Exception):
    """The merged metadata would hold more than METADATA_KEYS keys."""


def merged_metadata(dialect: str, patch: dict[str, Any] | None) -> ColumnElement:
    """The stored metadata with the request's merged in (RFC 7396: a null removes its key), or
    none at all for a null metadata."""
    if dialect == "sqlite":
        if patch is None:
            return literal({}, JSON)
        return func.json_patch(Customer.metadata_, literal(patch, JSON), type_=JSON)
    if patch is None:
        return literal({}, JSONB)
    concatenated = Customer.metadata_.op("||", return_type=JSONB)(literal(patch, JSONB))
    return func.jsonb_strip_nulls(concatenated, type_=JSONB)


def metadata_changed(dialect: str, merged: ColumnElement) -> ColumnElement:
    """Whether the merged metadata differs from the stored one."""
    if dialect == "sqlite":  # text: both sides minified by json()
        return func.json(Customer.metadata_) != func.json(merged)
    return Customer.metadata_.is_distinct_from(merged)


def upsert_customer(db: Session, fields: dict[str, Any]) -> Customer:
    """Create the customer, or update the keys sent of the one with that customer_id; an update
    that changes nothing writes nothing."""
    dialect = db.get_bind().dialect.name
    now = datetime.now(UTC).replace(microsecond=0)
    fields = dict(fields)
    metadata_sent = "metadata" in fields
    patch = fields.pop("metadata", None)
    stmt = INSERT[dialect](Customer).values(
        **fields,
        lago_id=uuid.uuid4(),
        metadata_={key: value for key, value in (patch or {}).items() if value is not None},
        created_at=now,
        updated_at=now,
    )
    changes = {name: stmt.excluded[name] for name in fields if name != "customer_id"}
    changed = [getattr(Customer, name).is_distinct_from(value) for name, value in changes.items()]
    if metadata_sent:
        changes["metadata"] = merged_metadata(dialect, patch)
        changed.append(metadata_changed(dialect, changes["metadata"]))
    stmt = stmt.on_conflict_do_update(
        index_elements=[Customer.customer_id],
        set_={**changes, "updated_at": now},
        where=or_(*changed),
    ).returning(Customer)
    customer = db.scalars(stmt).one_or_none()
    if customer is None:  # it exists and nothing changed
        customer = get_customer(db, fields["customer_id"])
    if len(customer.metadata_) > METADATA_KEYS:
        db.rollback()
        raise TooManyMetadataKeys
    db.commit()
    return customer


def get_customer(db: Session, customer_id: str) -> Customer | None:
    return db.scalars(select(Customer).where(Customer.customer_id == customer_id)).one_or_none()


def list_customers(db: Session, page: int, per_page: int) -> tuple[list[Customer], int]:
    """A page of customers, newest first, and how many there are."""
    total = db.scalar(select(func.count()).select_from(Customer))
    customers = db.scalars(
        select(Customer)
        .order_by(Customer.created_at.desc(), Customer.id.desc())
        .limit(per_page)
        .offset((page - 1) * per_page)
    ).all()
    return list(customers), total

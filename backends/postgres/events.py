"""PostgreSQL's events and webhook deliveries, the counterparts of backends/sqlite/events.py.
Events are written at commit by a deferred trigger (schema.MIGRATIONS),
which holds the events gate shared from taking its sequence number until its commit is visible;
the feed and pruning read only up to events_horizon(), the last number taken when no writer
held the gate, so they never hand out a number below one a later commit could still bring."""

import psycopg

from customers_service.backends.postgres.schema import EVENTS_GATE
from customers_service.backends.shared import endpoint_status, prune_oldest
from customers_service.storage import EventsExpired

EVENT_COLUMNS = "e.sequence, e.id::text AS id, e.webhook_type, e.created_at, e.customer"

HORIZON = "SELECT events_horizon() AS horizon"
# SQLite reads the pruned mark and the page in one read transaction; here one statement.
SELECT_EVENTS = f"""
SELECT p.up_to, page.* FROM events_pruned p
LEFT JOIN LATERAL (
    SELECT {EVENT_COLUMNS} FROM events e
    WHERE e.sequence > %(after)s AND e.sequence <= %(horizon)s
    ORDER BY e.sequence
    LIMIT %(limit)s
) page ON true
"""
OLDEST_EVENTS = """
SELECT sequence, recorded_at FROM events WHERE sequence <= %s ORDER BY sequence LIMIT %s
"""
PRUNE = (
    "DELETE FROM webhook_deliveries WHERE event <= %(up_to)s",
    "DELETE FROM events WHERE sequence <= %(up_to)s",
    "UPDATE events_pruned SET up_to = greatest(up_to, %(up_to)s)",
)
# remove-webhook takes the events gate exclusively before its deletes: a change that is
# committing has read the endpoints under the gate (customers_event), so its delivery rows are
# committed before the removal deletes, and any later change no longer sees the endpoint.
EXCLUSIVE_GATE = "SELECT pg_advisory_xact_lock(%s)"

INSERT_ENDPOINT = """
INSERT INTO webhook_endpoints (id, url, secret, created_at)
VALUES (%(id)s, %(url)s, %(secret)s, %(created_at)s)
"""
SELECT_ENDPOINTS = "SELECT id, url, created_at FROM webhook_endpoints ORDER BY created_at, id"
DELETE_ENDPOINT = (
    "DELETE FROM webhook_deliveries WHERE endpoint = %s",
    "DELETE FROM webhook_endpoints WHERE id = %s",
)

# SQLite: the same choice; here the rows another deliverer is leasing right now are skipped.
CLAIM = f"""
WITH claimed AS (
    SELECT c.endpoint, c.event, w.url, w.secret FROM webhook_deliveries c
    JOIN webhook_endpoints w ON w.id = c.endpoint
    WHERE NOT c.failed AND c.next_try <= %(now)s AND c.leased_until <= %(now)s
        AND c.endpoint <> ALL(%(excluded)s::text[])
        AND NOT EXISTS (
            SELECT 1 FROM webhook_deliveries p
            WHERE p.endpoint = c.endpoint AND p.customer_id = c.customer_id
                AND NOT p.failed AND p.event < c.event
        )
    ORDER BY c.event
    LIMIT %(limit)s
    FOR UPDATE OF c SKIP LOCKED
)
UPDATE webhook_deliveries d SET leased_until = %(lease_until)s, lease_owner = %(owner)s
FROM claimed, events e
WHERE d.endpoint = claimed.endpoint AND d.event = claimed.event AND e.sequence = d.event
RETURNING d.endpoint, claimed.url, claimed.secret, d.attempts, d.first_try, {EVENT_COLUMNS}
"""
DELIVERED = """
DELETE FROM webhook_deliveries
WHERE endpoint = %(endpoint)s AND event = %(event)s AND lease_owner = %(owner)s
"""
NOT_DELIVERED = """
UPDATE webhook_deliveries
SET attempts = %(attempts)s, first_try = %(first_try)s, next_try = %(next_try)s,
    failed = %(failed)s, last_error = %(error)s, leased_until = 0, lease_owner = NULL
WHERE endpoint = %(endpoint)s AND event = %(event)s AND lease_owner = %(owner)s
"""
ENDPOINT_ERROR = """
UPDATE webhook_endpoints SET last_error = %(error)s, last_error_at = %(error_at)s
WHERE id = %(endpoint)s
"""
RENEW = """
UPDATE webhook_deliveries SET leased_until = %(lease_until)s
WHERE event = %(event)s AND endpoint = %(endpoint)s AND lease_owner = %(owner)s
"""
RELEASE_ONE = """
UPDATE webhook_deliveries SET leased_until = 0, lease_owner = NULL
WHERE endpoint = %(endpoint)s AND event = %(event)s AND lease_owner = %(owner)s
"""
RELEASE = """
UPDATE webhook_deliveries SET leased_until = 0, lease_owner = NULL WHERE lease_owner = %s
"""
FAILED_EVENTS = """
SELECT event FROM webhook_deliveries WHERE endpoint = %s AND failed ORDER BY event LIMIT %s
"""
ENDPOINT_EXISTS = "SELECT 1 FROM webhook_endpoints WHERE id = %s FOR UPDATE"
RETRY = """
UPDATE webhook_deliveries
SET failed = false, attempts = 0, first_try = NULL, next_try = 0, last_error = NULL
WHERE endpoint = %s AND failed
"""


def horizon(conn: psycopg.Connection) -> int | None:
    """The last sequence number whose transaction has ended: none at or below it can appear
    later (one round trip; the gate is held exclusively for that moment only). None when the
    gate stayed taken for the whole wait (a commit of many rows)."""
    return conn.execute(HORIZON).fetchone()["horizon"]


def event_row(row: dict) -> dict:
    """A stored event as a dict (psycopg has parsed its customer)."""
    return {key: row[key] for key in ("sequence", "id", "webhook_type", "created_at", "customer")}


def events_page(conn: psycopg.Connection, after: int, limit: int) -> tuple[list[dict], bool]:
    """Backend.events_page: the pruned mark and the page in one statement, up to the horizon."""
    # No horizon now: read nothing new (after itself), which is always safe.
    params = {"after": after, "horizon": horizon(conn) or after, "limit": limit + 1}
    rows = conn.execute(SELECT_EVENTS, params).fetchall()
    if 0 < after < rows[0]["up_to"]:
        raise EventsExpired()
    events = [event_row(row) for row in rows if row["sequence"] is not None]
    return events[:limit], len(events) > limit


def prune_events(conn: psycopg.Connection, recorded_before: float) -> int:
    """Backend.prune_events, never past the horizon; each batch one transaction."""
    last = horizon(conn)
    if last is None:
        return 0  # the gate is busy: prune next time

    def oldest(count: int) -> list[tuple[int, float]]:
        rows = conn.execute(OLDEST_EVENTS, (last, count)).fetchall()
        return [(row["sequence"], row["recorded_at"]) for row in rows]

    def remove_up_to(sequence: int) -> None:
        with conn.transaction():
            for statement in PRUNE:
                conn.execute(statement, {"up_to": sequence})

    return prune_oldest(oldest, remove_up_to, recorded_before)


def add_webhook(conn: psycopg.Connection, endpoint: dict) -> None:
    """Backend.add_webhook."""
    conn.execute(INSERT_ENDPOINT, endpoint)


def list_webhooks(conn: psycopg.Connection) -> list[dict]:
    """Backend.list_webhooks."""
    return conn.execute(SELECT_ENDPOINTS).fetchall()


def remove_webhook(conn: psycopg.Connection, endpoint_id: str) -> bool:
    """Backend.remove_webhook, holding the events gate exclusively (EXCLUSIVE_GATE)."""
    with conn.transaction():
        conn.execute(EXCLUSIVE_GATE, (EVENTS_GATE,))
        if conn.execute(ENDPOINT_EXISTS, (endpoint_id,)).fetchone() is None:
            return False
        for statement in DELETE_ENDPOINT:
            conn.execute(statement, (endpoint_id,))
    return True


def claim_deliveries(
    conn: psycopg.Connection,
    owner: str,
    now: float,
    lease_until: float,
    limit: int,
    excluded: list[str] = (),
) -> list[dict]:
    """Backend.claim_deliveries: one statement, skipping rows another deliverer is leasing."""
    params = {"owner": owner, "now": now, "lease_until": lease_until, "limit": limit}
    params["excluded"] = list(excluded)
    rows = conn.execute(CLAIM, params).fetchall()
    rows.sort(key=lambda row: row["sequence"])
    return [
        {
            **{k: row[k] for k in ("endpoint", "url", "secret", "attempts", "first_try")},
            "event": event_row(row),
        }
        for row in rows
    ]


def finish_deliveries(conn: psycopg.Connection, owner: str, outcomes: list[dict]) -> None:
    """Backend.finish_deliveries: in one transaction."""
    with conn.transaction(), conn.cursor() as cursor:
        for outcome in outcomes:
            params = {**outcome, "owner": owner}
            if outcome.get("error") is None:
                cursor.execute(DELIVERED, params)
            else:
                cursor.execute(NOT_DELIVERED, params)
                cursor.execute(ENDPOINT_ERROR, params)


def renew_leases(
    conn: psycopg.Connection, owner: str, lease_until: float, deliveries: list[dict]
) -> None:
    """Backend.renew_leases."""
    params = [{**d, "owner": owner, "lease_until": lease_until} for d in deliveries]
    with conn.transaction(), conn.cursor() as cursor:
        cursor.executemany(RENEW, params)


def release_some(conn: psycopg.Connection, owner: str, deliveries: list[dict]) -> None:
    """Backend.release_some."""
    with conn.transaction(), conn.cursor() as cursor:
        cursor.executemany(RELEASE_ONE, [{**d, "owner": owner} for d in deliveries])


def release_deliveries(conn: psycopg.Connection, owner: str) -> None:
    """Backend.release_deliveries."""
    conn.execute(RELEASE, (owner,))


def webhook_status(conn: psycopg.Connection, failed_shown: int = 100) -> list[dict]:
    """Backend.webhook_status."""
    return endpoint_status(conn, FAILED_EVENTS, failed_shown)


def retry_failed(conn: psycopg.Connection, endpoint_id: str) -> int | None:
    """Backend.retry_failed: in one transaction, the endpoint's row locked."""
    with conn.transaction():
        if conn.execute(ENDPOINT_EXISTS, (endpoint_id,)).fetchone() is None:
            return None
        return conn.execute(RETRY, (endpoint_id,)).rowcount

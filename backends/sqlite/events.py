"""SQLite's events and webhook deliveries: the feed's page, pruning, the endpoints and the
deliveries' queue. The events themselves are written by triggers (schema.MIGRATIONS), in the
transaction of the change; SQLite has one writer at a time, so sequence numbers are taken in
commit order. backends/postgres/events.py holds the PostgreSQL counterparts."""

import json
import sqlite3

from customers_service.backends.shared import endpoint_status, prune_oldest
from customers_service.backends.sqlite.connections import write
from customers_service.storage import EventsExpired

EVENT_COLUMNS = "sequence, id, webhook_type, created_at, customer"

SELECT_EVENTS = f"""
SELECT {EVENT_COLUMNS} FROM events WHERE sequence > ? ORDER BY sequence LIMIT ?
"""
SELECT_PRUNED = "SELECT up_to FROM events_pruned"
OLDEST_EVENTS = "SELECT sequence, recorded_at FROM events ORDER BY sequence LIMIT ?"
PRUNE = (
    "DELETE FROM webhook_deliveries WHERE event <= :up_to",
    "DELETE FROM events WHERE sequence <= :up_to",
    "UPDATE events_pruned SET up_to = max(up_to, :up_to)",
)

INSERT_ENDPOINT = """
INSERT INTO webhook_endpoints (id, url, secret, created_at) VALUES (?, ?, ?, ?)
"""
SELECT_ENDPOINTS = "SELECT id, url, created_at FROM webhook_endpoints ORDER BY created_at, id"
DELETE_ENDPOINT = (
    "DELETE FROM webhook_deliveries WHERE endpoint = ?",
    "DELETE FROM webhook_endpoints WHERE id = ?",
)

# The next deliveries to try: due, not leased by a running deliverer, and each the oldest of
# its endpoint and customer still pending (in order per customer), oldest event first.
CLAIM = """
UPDATE webhook_deliveries SET leased_until = :lease_until, lease_owner = :owner
WHERE (endpoint, event) IN (
    SELECT d.endpoint, d.event FROM webhook_deliveries d
    WHERE NOT d.failed AND d.next_try <= :now AND d.leased_until <= :now
        AND d.endpoint NOT IN (SELECT value FROM json_each(:excluded))
        AND NOT EXISTS (
            SELECT 1 FROM webhook_deliveries p INDEXED BY webhook_deliveries_per_customer
            WHERE p.endpoint = d.endpoint AND p.customer_id = d.customer_id
                AND NOT p.failed AND p.event < d.event
        )
    ORDER BY d.event
    LIMIT :limit
)
RETURNING endpoint, event, attempts, first_try
"""
CLAIMED_EVENTS = (
    f"SELECT {EVENT_COLUMNS} FROM events WHERE sequence IN (SELECT value FROM json_each(?))"
)
CLAIMED_ENDPOINTS = (
    "SELECT id, url, secret FROM webhook_endpoints WHERE id IN (SELECT value FROM json_each(?))"
)
DELIVERED = """
DELETE FROM webhook_deliveries
WHERE endpoint = :endpoint AND event = :event AND lease_owner = :owner
"""
NOT_DELIVERED = """
UPDATE webhook_deliveries
SET attempts = :attempts, first_try = :first_try, next_try = :next_try, failed = :failed,
    last_error = :error, leased_until = 0, lease_owner = NULL
WHERE endpoint = :endpoint AND event = :event AND lease_owner = :owner
"""
ENDPOINT_ERROR = """
UPDATE webhook_endpoints SET last_error = :error, last_error_at = :error_at WHERE id = :endpoint
"""
RENEW = """
UPDATE webhook_deliveries SET leased_until = :lease_until
WHERE event = :event AND endpoint = :endpoint AND lease_owner = :owner
"""
RELEASE_ONE = """
UPDATE webhook_deliveries SET leased_until = 0, lease_owner = NULL
WHERE endpoint = :endpoint AND event = :event AND lease_owner = :owner
"""
RELEASE = """
UPDATE webhook_deliveries SET leased_until = 0, lease_owner = NULL WHERE lease_owner = ?
"""
FAILED_EVENTS = """
SELECT event FROM webhook_deliveries WHERE endpoint = ? AND failed ORDER BY event LIMIT ?
"""
ENDPOINT_EXISTS = "SELECT 1 FROM webhook_endpoints WHERE id = ?"
RETRY = """
UPDATE webhook_deliveries
SET failed = 0, attempts = 0, first_try = NULL, next_try = 0, last_error = NULL
WHERE endpoint = ? AND failed
"""


def event_row(row) -> dict:
    """A stored event as a dict, its customer parsed."""
    event = dict(zip(EVENT_COLUMNS.split(", "), row, strict=True))
    event["customer"] = json.loads(event["customer"])
    return event


def events_page(conn: sqlite3.Connection, after: int, limit: int) -> tuple[list[dict], bool]:
    """Backend.events_page: the pruned mark and the page from one read transaction, handed out
    once on disk (on_disk)."""
    with conn:
        conn.execute("BEGIN")  # one snapshot for the pruned mark and the page
        pruned = conn.execute(SELECT_PRUNED).fetchone()[0]
        rows = conn.execute(SELECT_EVENTS, (after, limit + 1)).fetchall()
    if 0 < after < pruned:
        raise EventsExpired()
    if rows:
        on_disk(conn)
    return [event_row(row) for row in rows[:limit]], len(rows) > limit


def on_disk(conn: sqlite3.Connection) -> None:
    """With FULL, return once every commit this connection has seen is on disk. A commit is
    visible before its writer's fsync (connections.write): an event handed out, then lost to a power
    cut, would have its number taken again by another change."""
    durability = getattr(conn, "durability", None)
    if durability is not None:
        durability.after_commit()


def prune_events(conn: sqlite3.Connection, recorded_before: float) -> int:
    """Backend.prune_events: each batch one write transaction."""

    def oldest(count: int) -> list:
        return conn.execute(OLDEST_EVENTS, (count,)).fetchall()

    def remove_up_to(sequence: int) -> None:
        with write(conn):
            conn.execute("BEGIN IMMEDIATE")
            for statement in PRUNE:
                conn.execute(statement, {"up_to": sequence})

    return prune_oldest(oldest, remove_up_to, recorded_before)


def add_webhook(conn: sqlite3.Connection, endpoint: dict) -> None:
    """Backend.add_webhook."""
    with write(conn):
        conn.execute(INSERT_ENDPOINT, tuple(endpoint.values()))


def list_webhooks(conn: sqlite3.Connection) -> list[dict]:
    """Backend.list_webhooks."""
    return [dict(row) for row in conn.execute(SELECT_ENDPOINTS)]


def remove_webhook(conn: sqlite3.Connection, endpoint_id: str) -> bool:
    """Backend.remove_webhook: in one write transaction."""
    with write(conn):
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute(ENDPOINT_EXISTS, (endpoint_id,)).fetchone() is None:
            return False
        for statement in DELETE_ENDPOINT:
            conn.execute(statement, (endpoint_id,))
    return True


def claim_deliveries(
    conn: sqlite3.Connection,
    owner: str,
    now: float,
    lease_until: float,
    limit: int,
    excluded: list[str] = (),
) -> list[dict]:
    """Backend.claim_deliveries: with FULL, write() returns once the lease is on disk, and with
    it every change it read (see on_disk)."""
    params = {"owner": owner, "now": now, "lease_until": lease_until, "limit": limit}
    params["excluded"] = json.dumps(list(excluded))
    with write(conn):
        conn.execute("BEGIN IMMEDIATE")
        claimed = conn.execute(CLAIM, params).fetchall()
        if not claimed:
            return []
        sequences = json.dumps([row["event"] for row in claimed])
        events = {row[0]: event_row(row) for row in conn.execute(CLAIMED_EVENTS, (sequences,))}
        endpoint_ids = json.dumps(list({row["endpoint"] for row in claimed}))
        endpoints = {row["id"]: row for row in conn.execute(CLAIMED_ENDPOINTS, (endpoint_ids,))}
    return [
        {
            "endpoint": row["endpoint"],
            "url": endpoints[row["endpoint"]]["url"],
            "secret": endpoints[row["endpoint"]]["secret"],
            "attempts": row["attempts"],
            "first_try": row["first_try"],
            "event": events[row["event"]],
        }
        for row in sorted(claimed, key=lambda row: row["event"])
    ]


def finish_deliveries(conn: sqlite3.Connection, owner: str, outcomes: list[dict]) -> None:
    """Backend.finish_deliveries: in one write transaction."""
    with write(conn):
        conn.execute("BEGIN IMMEDIATE")
        for outcome in outcomes:
            params = {**outcome, "owner": owner}
            if outcome.get("error") is None:
                conn.execute(DELIVERED, params)
            else:
                conn.execute(NOT_DELIVERED, params)
                conn.execute(ENDPOINT_ERROR, params)


def renew_leases(
    conn: sqlite3.Connection, owner: str, lease_until: float, deliveries: list[dict]
) -> None:
    """Backend.renew_leases."""
    params = [{**d, "owner": owner, "lease_until": lease_until} for d in deliveries]
    with write(conn):
        conn.executemany(RENEW, params)


def release_some(conn: sqlite3.Connection, owner: str, deliveries: list[dict]) -> None:
    """Backend.release_some."""
    with write(conn):
        conn.executemany(RELEASE_ONE, [{**d, "owner": owner} for d in deliveries])


def release_deliveries(conn: sqlite3.Connection, owner: str) -> None:
    """Backend.release_deliveries."""
    with write(conn):
        conn.execute(RELEASE, (owner,))


def webhook_status(conn: sqlite3.Connection, failed_shown: int = 100) -> list[dict]:
    """Backend.webhook_status."""
    return endpoint_status(conn, FAILED_EVENTS, failed_shown)


def retry_failed(conn: sqlite3.Connection, endpoint_id: str) -> int | None:
    """Backend.retry_failed: in one write transaction."""
    with write(conn):
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute(ENDPOINT_EXISTS, (endpoint_id,)).fetchone() is None:
            return None
        return conn.execute(RETRY, (endpoint_id,)).rowcount

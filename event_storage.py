"""SQLite storage of events and webhook deliveries: the feed's page, pruning, the endpoints and
the deliveries' queue. The events themselves are written by triggers (storage.MIGRATIONS), in
the transaction of the change; SQLite has one writer at a time, so sequence numbers are taken in
commit order."""

import json
import sqlite3

from customers_service.storage import write

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
PRUNE_BATCH = 1000
PRUNE_BATCHES = 10  # at most, per call: the deliverer's loop goes on between calls

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
STATUS = """
SELECT w.id, w.url, w.created_at, w.last_error, w.last_error_at,
    (SELECT count(*) FROM webhook_deliveries d WHERE d.endpoint = w.id AND NOT d.failed)
        AS backlog,
    (SELECT count(*) FROM webhook_deliveries d WHERE d.endpoint = w.id AND d.failed) AS failed
FROM webhook_endpoints w ORDER BY w.created_at, w.id
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


class EventsExpired(Exception):
    """Events after the consumer's position were pruned: it must start again."""


def event_row(row) -> dict:
    """A stored event as a dict, its customer parsed."""
    event = dict(zip(EVENT_COLUMNS.split(", "), row, strict=True))
    event["customer"] = json.loads(event["customer"])
    return event


def events_page(conn: sqlite3.Connection, after: int, limit: int) -> tuple[list[dict], bool]:
    """Up to ``limit`` events after ``after``, oldest first, and whether more follow; raise
    EventsExpired if an event after ``after`` (not 0) was pruned."""
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
    visible before its writer's fsync (storage.write): an event handed out, then lost to a power
    cut, would have its number taken again by another change."""
    durability = getattr(conn, "durability", None)
    if durability is not None:
        durability.after_commit()


def prune_events(conn: sqlite3.Connection, recorded_before: float) -> int:
    """Remove the oldest events recorded before that Unix time (and their deliveries), as one
    run of sequences from the oldest, up to PRUNE_BATCHES batches; return how many."""
    removed = 0
    for _ in range(PRUNE_BATCHES):
        rows = conn.execute(OLDEST_EVENTS, (PRUNE_BATCH,)).fetchall()
        prefix = next((i for i, (_, at) in enumerate(rows) if at >= recorded_before), len(rows))
        if prefix == 0:
            return removed
        with write(conn):
            conn.execute("BEGIN IMMEDIATE")
            for statement in PRUNE:
                conn.execute(statement, {"up_to": rows[prefix - 1][0]})
        removed += prefix
        if prefix < PRUNE_BATCH:
            break
    return removed


def add_webhook(conn: sqlite3.Connection, endpoint: dict) -> None:
    """Register an endpoint (id, url, secret, created_at)."""
    with write(conn):
        conn.execute(INSERT_ENDPOINT, tuple(endpoint.values()))


def list_webhooks(conn: sqlite3.Connection) -> list[dict]:
    """Every endpoint, without its secret, oldest first."""
    return [dict(row) for row in conn.execute(SELECT_ENDPOINTS)]


def remove_webhook(conn: sqlite3.Connection, endpoint_id: str) -> bool:
    """Remove an endpoint and what was queued for it; False if there is none."""
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
    """Lease up to ``limit`` deliveries that are due, to ``owner`` until ``lease_until``; return
    each with its endpoint's url and secret, its tries so far and its event. With FULL, write()
    returns once the lease is on disk, and with it every change it read (see on_disk)."""
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
    """Record what became of leased deliveries: each outcome has endpoint and event, and, when
    not delivered, attempts, first_try, next_try, failed (given up), error and error_at."""
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
    """Extend ``owner``'s leases of these deliveries (endpoint, event) to ``lease_until``."""
    params = [{**d, "owner": owner, "lease_until": lease_until} for d in deliveries]
    with write(conn):
        conn.executemany(RENEW, params)


def release_some(conn: sqlite3.Connection, owner: str, deliveries: list[dict]) -> None:
    """Give back these leased deliveries (endpoint, event), unsent."""
    with write(conn):
        conn.executemany(RELEASE_ONE, [{**d, "owner": owner} for d in deliveries])


def release_deliveries(conn: sqlite3.Connection, owner: str) -> None:
    """Give back every delivery ``owner`` leased and did not finish."""
    with write(conn):
        conn.execute(RELEASE, (owner,))


def webhook_status(conn: sqlite3.Connection, failed_shown: int) -> list[dict]:
    """Each endpoint's backlog, failed count, last error and first failed events."""
    status = []
    for row in conn.execute(STATUS).fetchall():
        endpoint = dict(row)
        events = conn.execute(FAILED_EVENTS, (endpoint["id"], failed_shown)).fetchall()
        endpoint["failed_events"] = [event for (event,) in events]
        status.append(endpoint)
    return status


def retry_failed(conn: sqlite3.Connection, endpoint_id: str) -> int | None:
    """Queue the endpoint's failed deliveries again; how many, or None if no such endpoint."""
    with write(conn):
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute(ENDPOINT_EXISTS, (endpoint_id,)).fetchone() is None:
            return None
        return conn.execute(RETRY, (endpoint_id,)).rowcount

"""PostgreSQL's connections: the session settings, a psycopg_pool pool per process, the check
that drops a connection the server closed, the cursor each keeps for the customers' requests,
and the faults the API answers 503 for.
backends/sqlite/connections.py does the same for a database file."""

import os
import select
import threading
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from customers_service.backends.postgres.schema import MIGRATIONS, migrate, schema_version
from customers_service.backends.shared import BUSY, UNAVAILABLE

Error = psycopg.Error
# A server that vanishes without closing the connection (a crashed host, a network split) is
# noticed within seconds, as unavailable, not after the kernel's quarter of an hour of retries,
# and well inside gunicorn's worker timeout (tests/test_hosts.py sends a request into a split).
NETWORK = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 5_000,  # milliseconds a sent request may stay unacknowledged
}

PROBE_WRITE = "UPDATE health_probe SET checked_at = now() WHERE id = 1"

# The contract's 503 codes for PostgreSQL's SQLSTATEs (first the exact code, then its class).
FAULTS = {
    "57014": BUSY,  # statement_timeout
    "55P03": BUSY,  # lock_timeout
    "40001": BUSY,  # serialization failure
    "40P01": BUSY,  # deadlock
    "53300": BUSY,  # too many connections
    "53100": ("database_full", "the disk under the database is full"),
    "25006": ("database_read_only", "the database cannot be written"),  # a standby
    "42P01": UNAVAILABLE,  # undefined table: not migrated
}


class DatabaseMissing(psycopg.OperationalError):
    """The database is unreachable, or was never initialised."""


def fault(error: BaseException) -> tuple[str, str] | None:
    """The contract's 503 code and message for a database fault, or None for anything else
    (a refused constraint or a bad statement is a bug, not a fault)."""
    if isinstance(error, PoolTimeout):
        return BUSY
    if not isinstance(error, psycopg.Error):
        return None
    state = getattr(error, "sqlstate", None) or ""
    if state in FAULTS:
        return FAULTS[state]
    if isinstance(error, psycopg.IntegrityError | psycopg.DataError | psycopg.ProgrammingError):
        return None
    return UNAVAILABLE  # the connection lost, the server shutting down or starting, ...


SECRET_PARAMETERS = ("password", "sslpassword")


# The next transaction id the server will hand out (only a transaction that writes takes one),
# and the server's time.
LIVE_WRITE_MARK = """
SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax, clock_timestamp() AS at
"""
# Ids taken by others than this connection's one transaction, while another client of this
# database was busy: autovacuum's ANALYZE takes ids too, and must not pause an import alone.
LIVE_WRITES_SINCE = """
SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint - %(xmax)s > 1 AND EXISTS (
    SELECT 1 FROM pg_stat_activity
    WHERE datname = current_database() AND backend_type = 'client backend'
        AND pid <> pg_backend_pid() AND state_change >= %(at)s
) AS wrote
"""


def live_write_mark(conn: psycopg.Connection) -> dict:
    """Backend.live_write_mark: the next transaction id and the server's time."""
    return conn.execute(LIVE_WRITE_MARK).fetchone()


def live_writes_since(conn: psycopg.Connection, mark: dict) -> bool:
    """Backend.live_writes_since: whether other clients wrote (took transaction ids) since the
    mark. Row locks keep live writers from waiting on an import, but they share the CPU."""
    return conn.execute(LIVE_WRITES_SINCE, mark).fetchone()["wrote"]


def where(location: str) -> str:
    """The database's URL as messages name it: without its passwords (safe_url)."""
    return safe_url(location)


def safe_url(url: str) -> str:
    """The URL without its passwords (before the @ or as parameters), for messages and logs."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = [
        (name, "***" if name in SECRET_PARAMETERS else value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def session_options(statement_timeout: float) -> str:
    """The settings of every session of the service: commits are durable before they return,
    and no statement or lock wait outlasts the timeout."""
    ms = max(1, int(statement_timeout * 1000))
    return (
        f"-c synchronous_commit=on -c statement_timeout={ms} -c lock_timeout={ms} -c TimeZone=UTC"
    )


def connect(url: str, statement_timeout: float = 5.0) -> psycopg.Connection:
    """One connection with the service's session settings, outside any pool."""
    try:
        return psycopg.connect(
            url,
            autocommit=True,
            row_factory=dict_row,
            options=session_options(statement_timeout),
            **NETWORK,
        )
    except psycopg.OperationalError as e:
        # libpq's message names the host and port, never the password; say which database.
        raise DatabaseMissing(f"cannot connect to {safe_url(url)}: {first_line(e)}") from None


def first_line(error: BaseException) -> str:
    """The first line of an error's message."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def connect_ready(url: str, statement_timeout: float = 5.0) -> psycopg.Connection:
    """A connection to a database that has every migration, or DatabaseMissing."""
    conn = connect(url, statement_timeout)
    if schema_version(conn) < len(MIGRATIONS):
        conn.close()
        raise DatabaseMissing("the database is not initialised: run flask customers init-db")
    return conn


def check_health(conn: psycopg.Connection, min_free_bytes: int) -> None:
    """Backend.check_health: the server's own disk is its operator's to watch, so
    ``min_free_bytes`` applies to SQLite's file only."""
    with conn.transaction():
        conn.execute(PROBE_WRITE)


def row_cursor(conn: psycopg.Connection) -> psycopg.Cursor:
    """The connection's cursor for the customers' one-statement requests, made once, giving
    tuples: a new cursor and a dict per row cost a GET more than its statement does on the
    client (bench/README.md, "PostgreSQL's reads"). Kept on the connection itself, so it goes
    with it: a map from connections to their cursors would keep both alive (a cursor holds its
    connection)."""
    cursor = getattr(conn, "customers_cursor", None)
    if cursor is None:
        cursor = conn.customers_cursor = conn.cursor(row_factory=tuple_row)
    return cursor


def closed_by_server(conn: psycopg.Connection) -> None:
    """Close and refuse a pooled connection that the server has closed (a restart, an idle
    timeout): its idle socket then reads as ready, with the end of the stream or a last error
    message. One system call, where psycopg_pool's own check costs a round trip to the server on
    every request. Closed, it is thrown away by the pool, which opens another."""
    if conn.closed:
        raise psycopg.OperationalError("the connection is closed")
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        conn.close()
        raise psycopg.OperationalError("the server closed the connection")


class Connections:
    """The connections of one process to one database: a psycopg_pool pool, made in each
    process on its first use (after any fork), its size and waits from the settings."""

    def __init__(self, url: str, pool_size: int, pool_timeout: float, statement_timeout: float):
        self.url, self.pool_size = url, pool_size
        self.pool_timeout, self.statement_timeout = pool_timeout, statement_timeout
        self._pools: dict[int, ConnectionPool] = {}
        self._lock = threading.Lock()
        self._ready: set[int] = set()  # processes that saw the schema up to date
        self._in_use: dict[int, int] = {}  # connections each process has taken
        self._origin: dict[int, ConnectionPool] = {}  # each taken connection's pool

    def prepare(self) -> None:
        """Apply pending migrations (the database itself is the operator's to create)."""
        conn = connect(self.url, self.statement_timeout)
        try:
            migrate(conn)
        finally:
            conn.close()

    def open(self) -> psycopg.Connection:
        """A connection of its own, for a command; the caller closes it."""
        return connect_ready(self.url, self.statement_timeout)

    def peek(self) -> psycopg.Connection:
        """A connection of its own, whatever the schema's version; the caller closes it. Only
        what it is asked to run is run (commands' connections are autocommit)."""
        return connect(self.url, self.statement_timeout)

    def acquire(self) -> psycopg.Connection:
        """A connection from this process's pool."""
        pid = os.getpid()  # once: each call is a system call
        pool = self._pool(pid)
        try:
            conn = pool.getconn()
        except PoolTimeout:
            connect(self.url, self.statement_timeout).close()  # unavailable if unreachable
            if self._in_use.get(pid, 0) >= self.pool_size:
                raise  # the server answers and every connection is taken: busy
            # The server is back, but the pool is still waiting out its reconnection backoff
            # from the outage: start afresh rather than answer 503 for seconds more.
            pool = self._replace_pool(pool)
            conn = pool.getconn()
        with self._lock:
            self._in_use[pid] = self._in_use.get(pid, 0) + 1
            self._origin[id(conn)] = pool
        if pid not in self._ready:
            try:
                if schema_version(conn) < len(MIGRATIONS):
                    raise DatabaseMissing("the database is not initialised: run init-db")
            except BaseException:
                self.release(conn)
                raise
            self._ready.add(pid)
        return conn

    def release(self, conn: psycopg.Connection) -> None:
        """Give the connection back (the pool rolls back anything left open)."""
        with self._lock:
            self._in_use[os.getpid()] -= 1
            pool = self._origin.pop(id(conn))
        pool.putconn(conn)  # a replaced pool takes back its own

    def discard(self, conn: psycopg.Connection) -> None:
        """Give back a connection that may be broken: the pool checks it before reuse."""
        self.release(conn)

    def close(self) -> None:
        """Close this process's pool."""
        pool = self._pools.pop(os.getpid(), None)
        if pool is not None:
            pool.close()

    def _pool(self, pid: int) -> ConnectionPool:
        pool = self._pools.get(pid)
        if pool is None:
            with self._lock:
                pool = self._pools.get(pid)
                if pool is None:
                    pool = self._pools[pid] = self._new_pool()
        return pool

    def _new_pool(self) -> ConnectionPool:
        pool = ConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            timeout=self.pool_timeout,
            open=False,
            check=closed_by_server,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "options": session_options(self.statement_timeout),
                **NETWORK,
            },
            name="customers",
        )
        pool.open(wait=False)
        return pool

    def _replace_pool(self, old: ConnectionPool) -> ConnectionPool:
        with self._lock:
            if self._pools.get(os.getpid()) is old:
                self._pools[os.getpid()] = self._new_pool()
        old.close(timeout=0)
        return self._pool(os.getpid())

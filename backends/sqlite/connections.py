"""SQLite's connections: opening the file with its pragmas, the connections each process
keeps, durable writes (FULL's fsync after commit, through wal_sync) and the faults the API
answers 503 for. backends/postgres/connections.py does the same with a pool."""

import contextlib
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from urllib.parse import quote

from customers_service.backends.shared import BUSY, UNAVAILABLE, customer_body
from customers_service.backends.sqlite.live_writes import LiveWrites
from customers_service.backends.sqlite.schema import (
    CUSTOMER_JSON,
    MIGRATIONS,
    migrate,
    schema_version,
)
from customers_service.backends.sqlite.wal_sync import WalSync
from customers_service.storage import COLUMNS, utc_now

SYNCHRONOUS_MODES = ("FULL", "NORMAL")
PROBE_WRITE = "UPDATE health_probe SET checked_at = ? WHERE id = 1"

Error = sqlite3.Error

# The contract's 503 codes for SQLite's primary error codes; any other fault is unavailable.
FAULTS = {
    "SQLITE_BUSY": BUSY,
    "SQLITE_LOCKED": BUSY,
    "SQLITE_FULL": ("database_full", "the disk under the database is full"),
    "SQLITE_READONLY": ("database_read_only", "the database cannot be written"),
}


class DatabaseMissing(sqlite3.OperationalError):
    """The database file is not where it should be, or was never initialised."""


class DiskNearlyFull(sqlite3.OperationalError):
    """The disk under the database has less room than the service asks to keep free."""


# sqlite3 turns whatever an application-defined function raises into an OperationalError and
# drops the exception, so a Ctrl-C (KeyboardInterrupt) that Python handles while customer_json
# runs, as it mostly does during a long statement, would be lost. In the main thread, Python's
# own SIGINT handler is replaced by one that, there, notes the thread here instead, and the
# statement raises KeyboardInterrupt when it ends, as after a Ctrl-C during SQLite's own code.
_interrupted: set[int] = set()


def customer_json(*values: str | None) -> str:
    """schema.CUSTOMER_JSON: shared.customer_body, as SQLite calls it, in a frame of its own
    that interrupt_after_statement looks for."""
    return customer_body(*values)


def interrupt_after_statement(signum: int, frame) -> None:
    """Python's SIGINT handler (KeyboardInterrupt), but raised when the statement ends
    (Connection) if it comes while customer_json runs."""
    caller = frame
    while caller is not None:
        if caller.f_code is customer_json.__code__:
            _interrupted.add(threading.get_ident())
            return
        caller = caller.f_back
    signal.default_int_handler(signum, frame)


def raise_interrupt() -> None:
    """Raise the KeyboardInterrupt that came while this thread's statement ran customer_json."""
    if threading.get_ident() in _interrupted:
        _interrupted.discard(threading.get_ident())
        raise KeyboardInterrupt


class Connection(sqlite3.Connection):
    """A connection that knows its file and whether its commits must reach the disk, and whose
    statements raise a Ctrl-C that came while they ran customer_json when they end."""

    path = ""
    durability: "WalSync | None" = None  # set when synchronous is FULL: write() uses it
    live_writes: "LiveWrites | None" = None  # set for a file: write_alone notes each write

    def execute(self, sql: str, parameters=(), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        finally:
            if _interrupted:
                raise_interrupt()

    def executemany(self, sql: str, parameters, /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, parameters)
        finally:
            if _interrupted:
                raise_interrupt()

    def close(self) -> None:
        for shared in (self.durability, self.live_writes):
            if shared is not None:
                shared.close()
        self.durability = self.live_writes = None
        super().close()


def connect(
    path: str, *, synchronous: str = "FULL", timeout: float = 5.0, create: bool = False
) -> Connection:
    """Open the database with its pragmas set.

    Unless ``create``, the file must exist (DatabaseMissing otherwise), and it is opened in a
    mode in which SQLite never creates it, even if it vanishes meanwhile.
    """
    if synchronous not in SYNCHRONOUS_MODES:
        raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}")
    conn = _open(path, timeout, create)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL is kept by write(), which fsyncs the WAL after each commit; see there why.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        if synchronous == "FULL" and path != ":memory:":
            conn.durability = WalSync(path)
        if path != ":memory:":
            conn.live_writes = LiveWrites(path)
    except OSError as e:  # the folder went away under us, say
        conn.close()
        raise DatabaseMissing(f"the database's folder is unusable: {e.strerror}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def connect_ready(path: str, *, synchronous: str = "FULL", timeout: float = 5.0) -> Connection:
    """Open an existing database that has every migration, or raise DatabaseMissing."""
    conn = connect(path, synchronous=synchronous, timeout=timeout)
    try:
        if schema_version(conn) < len(MIGRATIONS):
            raise DatabaseMissing("the database is not initialised: run flask customers init-db")
    except BaseException:
        conn.close()
        raise
    return conn


def _open(path: str, timeout: float, create: bool) -> Connection:
    """The sqlite3 connection, creating the file (owner-only) only if ``create``."""
    if path == ":memory:":
        target, uri = path, False
    elif create:
        _create_private_file(path)
        target, uri = path, False
    else:
        target, uri = f"file:{quote(os.path.abspath(path))}?mode=rw", True
    try:
        conn = sqlite3.connect(
            target, timeout=timeout, check_same_thread=False, factory=Connection, uri=uri
        )
    except sqlite3.OperationalError as e:
        if getattr(e, "sqlite_errorname", "") == "SQLITE_CANTOPEN":
            raise DatabaseMissing("the database file is missing") from None
        raise
    conn.path = path
    conn.row_factory = sqlite3.Row
    # The upsert, the import and the migration write bodies with it (schema.BODY reads them).
    conn.create_function(CUSTOMER_JSON, len(COLUMNS), customer_json, deterministic=True)
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt_after_statement)
    return conn


def file_identity(path: str) -> tuple[int, int]:
    """The device and inode of the database file, raising DatabaseMissing if there is none."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise DatabaseMissing("the database file is missing") from None
    return st.st_dev, st.st_ino


def fault(error: BaseException) -> tuple[str, str] | None:
    """The contract's 503 code and message for a database fault, or None for anything else
    (a refused constraint is a bug, not a fault)."""
    if not isinstance(error, sqlite3.DatabaseError) or type(error) is sqlite3.IntegrityError:
        return None
    if isinstance(error, DiskNearlyFull):
        return "database_full", "the disk under the database is nearly full"
    name = getattr(error, "sqlite_errorname", None) or ""
    primary = "_".join(name.split("_")[:2])  # SQLITE_READONLY_DBMOVED is a SQLITE_READONLY
    return FAULTS.get(primary, UNAVAILABLE)


@contextlib.contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that, with FULL, is on disk when this block ends.

    SQLite's own FULL fsyncs the WAL at commit while it holds the database's one write lock, so
    concurrent writers queue behind each fsync, and sleep in its busy handler while they wait.
    Here SQLite commits with NORMAL (no fsync) and the WAL is fsynced after, outside that lock,
    once for every group of writers that committed meanwhile (WalSync): each commit is as
    durable as FULL's once this returns.
    """
    with conn:
        yield conn
    make_durable(conn)


def write_alone(conn: sqlite3.Connection, sql: str, params) -> list:
    """Run one statement as its own transaction and return its rows; with FULL, on disk when
    this returns.

    SQLite commits it when it ends (autocommit), so it needs no BEGIN and COMMIT statements,
    which Python's sqlite3 compiles anew each time, and no statement journal. A fault rolls the
    statement back whole, as a transaction.
    Inside a transaction the caller opened, it joins it and commits it, as write() does.
    """
    if conn.in_transaction:
        with write(conn):
            return conn.execute(sql, params).fetchall()
    previous, changes = conn.isolation_level, conn.total_changes
    if conn.live_writes is not None:
        conn.live_writes.note()  # an import that holds the lock now pauses after its batch
    try:
        conn.isolation_level = None  # commits what is open: nothing, as just checked
        # fetchall steps to the end: SQLite commits there, and a failed commit raises here.
        rows = conn.execute(sql, params).fetchall()
    finally:
        conn.isolation_level = previous
    if conn.total_changes != changes:  # a statement that wrote nothing has nothing to sync
        make_durable(conn)
    return rows


def make_durable(conn: sqlite3.Connection) -> None:
    """With FULL, fsync the WAL after a commit (WalSync); with NORMAL, nothing."""
    durability = getattr(conn, "durability", None)
    if durability is not None:
        try:
            durability.after_commit()
        except OSError as e:
            raise sqlite3.OperationalError(f"could not make the commit durable: {e}") from None


def _create_private_file(path: str) -> None:
    """Create an empty file readable by its owner only, unless it exists."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def live_write_mark(conn: Connection) -> float:
    """Backend.live_write_mark: the monotonic clock's time."""
    return time.monotonic()


def live_writes_since(conn: Connection, mark: float) -> bool:
    """Backend.live_writes_since: whether a live write began since the mark (SQLite has one
    writer at a time: one that began while a batch held the lock waited for it)."""
    return conn.live_writes is not None and conn.live_writes.since(mark)


def where(location: str) -> str:
    """The database's path, as messages name it."""
    return location


def check_health(conn: Connection, min_free_bytes: int) -> None:
    """Raise sqlite3.Error unless the database takes a (tiny, durable) write and its disk keeps
    ``min_free_bytes`` free (SQLite can still fit a write in space it freed, on a full disk)."""
    with write(conn):
        conn.execute(PROBE_WRITE, (utc_now(),))
    if conn.path != ":memory:" and free_bytes(conn.path) < min_free_bytes:
        raise DiskNearlyFull("the disk under the database is nearly full")


def free_bytes(path: str) -> int:
    """Bytes free for ordinary users on the filesystem that holds ``path``."""
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    return st.f_bavail * st.f_frsize


_thread = threading.local()


class Connections:
    """The connections of one process to one SQLite file: one per thread, kept across requests
    (opening one costs more than most requests), reopened after a fork or when the file is
    replaced, and never creating the file."""

    def __init__(self, path: str, synchronous: str, timeout: float):
        self.path, self.synchronous, self.timeout = path, synchronous, timeout
        self._key = (path, synchronous, timeout)

    def prepare(self) -> None:
        """Create the file if it is missing (its folder must exist) and apply migrations."""
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"the database's folder {folder} does not exist: create it first"
            )
        conn = connect(self.path, synchronous=self.synchronous, timeout=self.timeout, create=True)
        try:
            migrate(conn)
        finally:
            conn.close()

    def open(self) -> Connection:
        """A connection of its own, for a command; the caller closes it."""
        return connect_ready(self.path, synchronous=self.synchronous, timeout=self.timeout)

    def peek(self) -> Connection:
        """A read-only connection of its own to the file as it is, pragmas untouched; the caller
        closes it. DatabaseMissing if there is no file."""
        try:
            conn = sqlite3.connect(
                f"file:{quote(os.path.abspath(self.path))}?mode=ro",
                timeout=self.timeout,
                factory=Connection,
                uri=True,
            )
        except sqlite3.OperationalError as e:
            if getattr(e, "sqlite_errorname", "") == "SQLITE_CANTOPEN":
                raise DatabaseMissing("the database file is missing") from None
            raise
        conn.path = self.path
        return conn

    def acquire(self) -> Connection:
        """This thread's connection, checked to still be the file at the path."""
        cached = getattr(_thread, "connections", None)
        if cached is None:
            cached = _thread.connections = {}
        entry = cached.get(self._key)
        try:
            identity = file_identity(self.path)
        except DatabaseMissing:
            self._drop(cached)
            raise
        if entry is not None:
            pid, known_identity, conn = entry
            if pid == os.getpid() and known_identity == identity:
                return conn
            self._drop(cached)
        conn = self.open()
        # The identity seen before opening: had the file been replaced meanwhile, the next
        # request sees a new one and opens the file that is there, never writing to a deleted one.
        cached[self._key] = (os.getpid(), identity, conn)
        return conn

    def release(self, conn: Connection) -> None:
        """End a request's use of the connection, rolling back anything left open."""
        if conn.in_transaction:
            conn.rollback()

    def discard(self, conn: Connection) -> None:
        """Close this thread's connection after a fault: the next request opens a fresh one."""
        self.close()

    def close(self) -> None:
        """Close this thread's connection."""
        self._drop(getattr(_thread, "connections", {}))

    def _drop(self, cached: dict) -> None:
        entry = cached.pop(self._key, None)
        if entry is not None and entry[0] == os.getpid():  # a parent's, through a fork: not ours
            entry[2].close()

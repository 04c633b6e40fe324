"""A deployment's whole state copied from one database into another, either backend to either
(``customers copy``): the customers as stored, the events with their ids and sequences, the
webhook endpoints with their secrets and deliveries, read from one snapshot of the source and
written into an empty target in batches that a rerun resumes, then checked by counts and a
checksum of the customers. API keys are not in a database, so not in a copy."""

import dataclasses
import hashlib
import time
from collections.abc import Iterable

from customers_service.logs import say
from customers_service.storage import COPIED, KEY_WIDTH, Backend, Connections, load_backend

BATCH_SIZE = 5000
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# A copy reads and writes whole tables: the service's limits, sized for a request, are not for it.
STATEMENT_TIMEOUT = 3600.0
SQLITE_TIMEOUT = 30.0
NAMES = {
    "webhook_endpoints": "webhook endpoints",
    "customers": "customers",
    "events": "events",
    "webhook_deliveries": "webhook deliveries",
}
API_KEYS_NOTE = (
    "API keys are not copied: they live in the key file or in CUSTOMERS_API_KEYS, not in the "
    "database. Give the target's service the same keys."
)


class CopyFailed(Exception):
    """The copy is refused, or stopped, or differs from its source; the message says why and
    what to do."""


@dataclasses.dataclass
class Side:
    """One end of a copy: its location as given on the command line, its backend, and the
    backend's connections to it."""

    location: str
    backend: Backend
    connections: Connections

    @classmethod
    def at(cls, location: str) -> "Side":
        """The side at a SQLite file's path or a PostgreSQL URL."""
        if location.startswith(POSTGRES_SCHEMES):
            backend = load_backend("postgres")
            return cls(location, backend, backend.Connections(location, 1, 5.0, STATEMENT_TIMEOUT))
        backend = load_backend("sqlite")
        return cls(location, backend, backend.Connections(location, "FULL", SQLITE_TIMEOUT))

    @property
    def where(self) -> str:
        """Its path, or its URL with the password as ***."""
        return self.backend.where(self.location)


def state(contents: dict) -> dict:
    """What a copy must reproduce of a database's contents (copy_contents): its counts, its
    pruned mark and its last event sequence."""
    return {key: contents[key] for key in ("counts", "pruned", "last_sequence")}


def described(counts: dict) -> str:
    """Counts of kinds as words: ``3 customers, 5 events``."""
    return (
        ", ".join(f"{counts[kind]:,} {NAMES[kind]}" for kind in COPIED if counts[kind]) or "nothing"
    )


def checksum(lines: Iterable[str]) -> str:
    """The sha256 of an export's lines: both backends write the same bytes for the same data."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


class Copy:
    """One run of ``customers copy``: open both sides, refuse what must be refused, copy each
    kind in batches from where an earlier run stopped, check, finish."""

    def __init__(self, source: str, target: str, batch_size: int = BATCH_SIZE):
        self.source, self.target = Side.at(source), Side.at(target)
        self.batch_size = batch_size
        self.copied = dict.fromkeys(COPIED, 0)  # by this run
        self.check_seconds = 0.0
        self.source_conn = self.target_conn = None

    def run(self) -> dict:
        """Copy, check and finish; return the rows of each kind the target holds. Raise
        CopyFailed, having written nothing if it is a refusal to start."""
        say(
            f"Copying from {self.source.where} to {self.target.where}",
            source=self.source.where,
            target=self.target.where,
        )
        try:
            self.source_conn = self._open_source()
            held = self._look_at_target()
            with self.source.backend.copy_snapshot(self.source_conn):
                contents = self.source.backend.copy_contents(self.source_conn)
                progress = self._plan(contents, held)
                self.target_conn = self._prepare_target(held)
                self._copy(progress)
            checked = time.monotonic()
            self._check(contents)
            self.check_seconds = time.monotonic() - checked
            self.target.backend.finish_copy(
                self.target_conn, contents["pruned"], contents["last_sequence"]
            )
        except (self.source.backend.Error, self.target.backend.Error) as e:
            raise self._stopped("a database failed", e) from None
        finally:
            for conn in (self.source_conn, self.target_conn):
                if conn is not None:
                    conn.close()
        return contents["counts"]

    def _open_source(self):
        """The source's connection, which writes nothing (on SQLite, read-only)."""
        try:
            return self.source.connections.peek()
        except self.source.backend.Error as e:
            raise CopyFailed(f"Refused: cannot copy from {self.source.where}: {e}") from None

    def _look_at_target(self) -> dict | None:
        """What the target holds, before anything is written to it; None when there is no
        database there yet."""
        try:
            conn = self.target.connections.peek()
        except self.target.backend.Error:
            return None  # prepare() creates the file, or says why it cannot
        try:
            return self.target.backend.copy_contents(conn)
        except self.target.backend.Error as e:
            raise CopyFailed(f"Refused: cannot read {self.target.where}: {e}") from None
        finally:
            conn.close()

    def _plan(self, contents: dict, held: dict | None) -> dict:
        """The progress to start from: a new copy's, or the one an earlier run recorded in the
        target. Raise CopyFailed for a copy that must not be made."""
        source, target = self.source.where, self.target.where
        if not contents["migrated"]:
            raise CopyFailed(
                f"Refused: cannot copy from {source}: it is not a database of this version's "
                "schema: run init-db on it first"
            )
        if held is not None and held["identity"] == contents["identity"]:
            raise CopyFailed(f"Refused: {source} and {target} are the same database")
        if contents["progress"] is not None:
            raise CopyFailed(f"Refused: {source} holds an unfinished copy: finish that copy first")
        progress = None if held is None else held["progress"]
        if progress is None:
            if held is not None:
                self._refuse_unless_empty(held)
            return {
                "source": {
                    "where": source,
                    "identity": contents["identity"],
                    "state": state(contents),
                },
                "after": dict.fromkeys(COPIED),
                "copied": dict.fromkeys(COPIED, 0),
            }
        if progress["source"]["identity"] != contents["identity"]:
            raise CopyFailed(
                f"Refused: {target} holds an unfinished copy from another database "
                f"({progress['source']['where']}): rerun that copy, or copy into an empty database"
            )
        if progress["source"]["state"] != state(contents):
            raise CopyFailed(
                f"Refused: {source} changed since the unfinished copy into {target} began: "
                "stop everything that writes to the source, then copy into an empty database"
            )
        say(
            f"Resuming the unfinished copy into {target}: "
            f"{described(progress['copied'])} copied already",
            resumed=progress["copied"],
        )
        return progress

    def _refuse_unless_empty(self, held: dict) -> None:
        """Refuse a target that holds anything a copy brings, or has pruned events."""
        if any(held["counts"].values()) or held["pruned"]:
            what = described(held["counts"])
            if held["pruned"]:
                what += f" (and events pruned up to {held['pruned']})"
            raise CopyFailed(
                f"Refused: {self.target.where} already holds {what}: copy into a new or "
                "empty database"
            )

    def _prepare_target(self, held: dict | None):
        """The target, created or migrated as init-db does, and its connection."""
        try:
            self.target.connections.prepare()
            conn = self.target.connections.open()
        except (OSError, self.target.backend.Error) as e:
            raise CopyFailed(f"Refused: cannot prepare {self.target.where}: {e}") from None
        if held is None:  # nothing was there to look at: look now that it is
            try:
                self._refuse_unless_empty(self.target.backend.copy_contents(conn))
            except CopyFailed:
                conn.close()
                raise
        return conn

    def _copy(self, progress: dict) -> None:
        """Each kind in batches, each batch one transaction of the target with the progress."""
        for kind in COPIED:
            width, started = KEY_WIDTH.get(kind, 1), time.monotonic()
            while True:
                after = progress["after"][kind]
                try:
                    rows = self.source.backend.copy_rows(
                        self.source_conn, kind, after, self.batch_size
                    )
                except self.source.backend.Error as e:
                    raise self._stopped(f"cannot read {self.source.where}", e) from None
                if not rows:
                    break
                progress["after"][kind] = list(rows[-1][:width])
                progress["copied"][kind] += len(rows)
                try:
                    self.target.backend.write_copied(self.target_conn, kind, rows, progress)
                except self.target.backend.Error as e:
                    where = self.target.where
                    raise self._stopped(f"{where} refused {NAMES[kind]}", e) from None
                self.copied[kind] += len(rows)
                if len(rows) < self.batch_size:
                    break
            seconds = time.monotonic() - started
            say(
                f"{NAMES[kind]}: {self.copied[kind]:,} copied in {seconds:.1f} s",
                kind=kind,
                copied=self.copied[kind],
                seconds=round(seconds, 3),
            )

    def _stopped(self, what: str, error: Exception) -> CopyFailed:
        """The failure of a copy stopped half-way by a database's error."""
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return CopyFailed(
            f"The copy stopped: {what}: {first_line}. The same command resumes it; if "
            f"something else writes to {self.target.where}, stop that, then copy into an "
            "empty database"
        )

    def _check(self, contents: dict) -> None:
        """Compare the target with the source: the rows of each kind, and the customers'
        export, byte for byte (each side's export reads its own snapshot)."""
        source, target = self.source, self.target
        say("Checking the copy: the rows of each kind, the customers' checksum")
        source_sum = checksum(source.backend.export_lines(self.source_conn))
        target_sum = checksum(target.backend.export_lines(self.target_conn))
        if state(source.backend.copy_contents(self.source_conn)) != state(contents):
            raise CopyFailed(
                f"The copy is not a faithful one: {source.where} changed while it was copied. "
                "Stop everything that writes to the source, then copy into an empty database"
            )
        counts = target.backend.copy_contents(self.target_conn)["counts"]
        differ = [
            f"{NAMES[kind]}: {contents['counts'][kind]:,} in the source, {counts[kind]:,} in "
            "the target"
            for kind in COPIED
            if counts[kind] != contents["counts"][kind]
        ]
        if source_sum != target_sum:
            differ.append(
                f"customers' checksum: {source_sum} in the source, {target_sum} in the target"
            )
        if differ:
            raise CopyFailed(f"The copy differs from the source: {'; '.join(differ)}")


def copy_database(source: str, target: str, batch_size: int = BATCH_SIZE) -> None:
    """Copy the whole state of the database at ``source`` into the one at ``target`` (each a
    SQLite file's path or a PostgreSQL URL), and say what was copied; raise CopyFailed."""
    started = time.monotonic()
    copy = Copy(source, target, batch_size)
    counts = copy.run()
    seconds = time.monotonic() - started
    for kind in COPIED:
        say(f"{NAMES[kind]}: {counts[kind]:,}", err=False, kind=kind, count=counts[kind])
    rows = sum(copy.copied.values())
    say(
        f"Copied {rows:,} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s); "
        f"the counts and the customers' checksum match (checked in {copy.check_seconds:.1f} s)",
        rows=rows,
        seconds=round(seconds, 3),
        check_seconds=round(copy.check_seconds, 3),
    )
    say(API_KEYS_NOTE)

"""The seam between the API and its databases: the contract's types (the fields, Filters, the
storage errors), the Backend protocol that each backend in backends/ implements, and the Store
that views and commands call, whichever backend it runs on."""

import dataclasses
import functools
import importlib
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

FIELDS = (
    "customer_id",
    "name",
    "country",
    "address_line1",
    "address_line2",
    "state",
    "zipcode",
    "email",
    "city",
    "url",
    "phone",
    "logo_url",
    "legal_name",
    "legal_number",
)
REQUIRED = FIELDS[:2]
OPTIONAL_FIELDS = FIELDS[2:]
COLUMNS = ("lago_id", *FIELDS, "metadata", "created_at", "updated_at")  # a customer, in order
# search_term looks in these, ignoring case as fold() does, the same on every backend.
SEARCHED = ("customer_id", "name", "legal_name", "email")
LARGEST_SEQUENCE = 2**63 - 1  # the largest integer of every backend
BACKENDS = ("sqlite", "postgres")  # the packages of backends/

# What a copy moves (commands.py's copy, copying.py), in the order it moves them: each kind's
# values in a row, its key first (KEY_WIDTH of them: the rows come in key order). A customer's
# ``id`` is its place in its database's order, which the target keeps but does not store.
# Times are text as the API writes them, metadata and an event's customer JSON text.
COPIED = {
    "webhook_endpoints": ("id", "url", "secret", "created_at", "last_error", "last_error_at"),
    "customers": ("id", *COLUMNS),
    "events": ("sequence", "id", "webhook_type", "created_at", "recorded_at", "customer"),
    # Every delivery, due or given up, without its lease: a deliverer of the source is no
    # deliverer of the target.
    "webhook_deliveries": (
        "event",
        "endpoint",
        "customer_id",
        "failed",
        "attempts",
        "first_try",
        "next_try",
        "last_error",
    ),
}
KEY_WIDTH = {"webhook_deliveries": 2}  # the others' key is their first value

# The API's JSON: compact, keys in the order given, non-ASCII as \uXXXX (json's ensure_ascii).
# Responses, webhooks and the stored bodies are all written with it (one encoder: json.dumps
# with separators builds one at every call).
encode_json = json.JSONEncoder(separators=(",", ":")).encode


class Customer(Mapping):
    """A customer as stored: ``body``, its JSON object as the API answers it (the keys of COLUMNS
    in order, metadata's keys in code point order, compact, non-ASCII escaped), written with its
    row. A view answers ``body`` as it is; anything that reads a field parses it then, once."""

    __slots__ = ("body", "_fields")

    def __init__(self, body: str):
        self.body = body
        self._fields: dict | None = None

    def __getitem__(self, key: str):
        if self._fields is None:
            self._fields = json.loads(self.body)
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(COLUMNS)

    def __len__(self) -> int:
        return len(COLUMNS)

    def __repr__(self) -> str:
        return f"Customer({self.body!r})"


class TooManyMetadataKeys(Exception):
    """The merged metadata would hold more than 50 keys: nothing was written."""


class EventsExpired(Exception):
    """Events after the consumer's position were pruned: it must start again."""


def fold(text: str | None) -> str | None:
    """Text as search_term and email compare it: Unicode case folding (``ÉCOLE`` is ``école``;
    accents stay)."""
    return None if text is None else text.casefold()


_this_second: tuple[int, str] = (0, "")  # replaced whole: threads read it whole


def utc_now() -> str:
    """The current time as the API writes it: ISO 8601, UTC, whole seconds (formatted once a
    second)."""
    global _this_second
    now, text = _this_second
    second = int(time.time())
    if now != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        _this_second = (second, text)
    return text


ORDER_NAMES = ("sort", "descending")


@dataclasses.dataclass(frozen=True)
class Filters:
    """What a list selects and how it is ordered, in the values storage compares: ``search``
    and ``email`` folded (fold), countries upper-case, times as stored (UTC text)."""

    search: str | None = None
    customer_id: str | None = None
    email: str | None = None
    countries: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    zipcodes: tuple[str, ...] = ()
    metadata: dict = dataclasses.field(default_factory=dict)
    created_at_gte: str | None = None
    created_at_lt: str | None = None
    updated_at_gte: str | None = None
    updated_at_lt: str | None = None
    sort: str = "created_at"
    descending: bool = True

    def any(self) -> bool:
        """Whether anything is filtered (the total is then counted, not read from a counter)."""
        return self.filtered

    @functools.cached_property
    def filtered(self) -> bool:
        """any(), worked out once: a list asks it several times."""
        return any(getattr(self, name) not in (None, (), {}) for name in FILTER_NAMES)

    def value_lists(self) -> list[tuple[str, tuple[str, ...]]]:
        """(column, values) of each list filter given: the column is one of the values."""
        lists = (("country", self.countries), ("state", self.states), ("zipcode", self.zipcodes))
        return [(column, values) for column, values in lists if values]

    def time_bounds(self) -> list[tuple[str, str, str, str]]:
        """(column, operator, name, UTC text) of each time bound given."""
        bounds = []
        for bound, operator in (("gte", ">="), ("lt", "<")):
            for column in ("created_at", "updated_at"):
                value = getattr(self, f"{column}_{bound}")
                if value is not None:
                    bounds.append((column, operator, f"{column}_{bound}", value))
        return bounds


NO_FILTERS = Filters()
FILTER_NAMES = tuple(f.name for f in dataclasses.fields(Filters) if f.name not in ORDER_NAMES)


class Connections(Protocol):
    """The connections of one process to one database, kept across requests."""

    def prepare(self) -> None:
        """Create what the backend may create and apply pending migrations."""

    def open(self) -> Any:
        """A connection of its own to the migrated database, for a command; the caller closes
        it. Raise the backend's DatabaseMissing if the database is missing or not migrated."""

    def acquire(self) -> Any:
        """A connection for this request, kept by this process (never crossing a fork)."""

    def release(self, conn: Any) -> None:
        """End a request's use of the connection, rolling back anything left open."""

    def discard(self, conn: Any) -> None:
        """Give up a connection after a fault, so the next request gets a sound one."""

    def close(self) -> None:
        """Close the connections this process keeps."""

    def peek(self) -> Any:
        """A connection of its own to the database as it is, at any schema version (none
        included), that writes nothing, for a look before prepare(); the caller closes it.
        Raise the backend's DatabaseMissing if there is no database to look at."""


class Backend(Protocol):
    """What each backend package (backends/sqlite, backends/postgres) provides. Every operation
    takes a connection first; the Store passes its own."""

    Error: type[Exception]  # the driver's base error
    IMPORT_PAUSE: float  # seconds an import pauses per second its batch took (live writers)
    IMPORT_BODIES: bool  # whether an import's workers make the bodies of customers it creates
    Connections: type[Connections]

    def where(self, location: str) -> str:
        """The database's path or URL for messages, without a password."""

    def fault(self, error: BaseException) -> tuple[str, str] | None:
        """The contract's 503 code and message for a database fault (database_busy, ...), or
        None for any other error: a refused constraint or a bad statement is a bug."""

    def upsert_customer(self, conn: Any, fields: Mapping) -> Customer:
        """Create the customer, or update the keys present in ``fields``; return it as stored,
        durable (its body written by the statement that wrote its row). An upsert that changes
        nothing writes nothing (no updated_at, no event). Raise TooManyMetadataKeys, having
        written nothing, if the merged metadata would hold more than 50 keys."""

    def get_customer(self, conn: Any, customer_id: str) -> Customer | None:
        """The customer with that id, its stored body, or None."""

    def delete_customer(self, conn: Any, customer_id: str) -> Customer | None:
        """Delete the customer and return it as it was (its stored body), or None if there was
        none."""

    def list_customers(
        self, conn: Any, page: int, per_page: int, filters: Filters
    ) -> tuple[list[Customer], int]:
        """One page of the customers that ``filters`` select, in their order (their stored
        bodies), and how many they select, both from one snapshot."""

    def count_customers(self, conn: Any) -> int:
        """How many customers there are."""

    def export_lines(self, conn: Any) -> Iterator[str]:
        """Every customer as one line of JSON, ``{"customer": {...}}``, oldest first, streamed
        from one snapshot while the service goes on writing."""

    def import_batch(self, conn: Any, rows: list[dict]) -> tuple[int, int, list[tuple[int, dict]]]:
        """Upsert rows prepared by backends.shared.upsert_params in one transaction; return how
        many customers they created, how many they changed (the others changed nothing), and
        (position, error details) of each row the database refused (a restored lago_id another
        customer has, metadata merged past 50 keys); the others are committed."""

    def live_write_mark(self, conn: Any) -> Any:
        """A mark of this moment, for live_writes_since."""

    def live_writes_since(self, conn: Any, mark: Any) -> bool:
        """Whether other connections wrote, or waited to write, since ``mark``: an import
        pauses after such a batch, so live writers get their turn, and otherwise goes on at
        full speed. This connection's own one transaction in between does not count."""

    def check_health(self, conn: Any, min_free_bytes: int) -> None:
        """Raise the backend's Error unless the database takes a tiny, durable write and (for a
        database file) its disk keeps ``min_free_bytes`` free."""

    def events_page(self, conn: Any, after: int, limit: int) -> tuple[list[dict], bool]:
        """Up to ``limit`` events after the sequence ``after``, in commit order, and whether more
        follow; raise EventsExpired if an event after ``after`` (not 0) was pruned."""

    def prune_events(self, conn: Any, recorded_before: float) -> int:
        """Remove the oldest events recorded before that Unix time, and their deliveries, as one
        run of sequences from the oldest, a few batches a call; return how many."""

    def add_webhook(self, conn: Any, endpoint: dict) -> None:
        """Register a webhook endpoint: id, url, secret, created_at."""

    def list_webhooks(self, conn: Any) -> list[dict]:
        """Every webhook endpoint (id, url, created_at), without its secret, oldest first."""

    def remove_webhook(self, conn: Any, endpoint_id: str) -> bool:
        """Remove an endpoint and what was queued for it; False if there is none."""

    def claim_deliveries(
        self,
        conn: Any,
        owner: str,
        now: float,
        lease_until: float,
        limit: int,
        excluded: list[str] = (),
    ) -> list[dict]:
        """Lease to ``owner`` until ``lease_until`` up to ``limit`` due deliveries, each the next
        of its endpoint and customer, none for the ``excluded`` endpoints; return each with its
        endpoint's url and secret, its tries so far and its event, oldest event first."""

    def release_some(self, conn: Any, owner: str, deliveries: list[dict]) -> None:
        """Give back these leased deliveries (endpoint, event), unsent."""

    def finish_deliveries(self, conn: Any, owner: str, outcomes: list[dict]) -> None:
        """Record what became of leased deliveries: each outcome has endpoint and event, and,
        when not delivered, attempts, first_try, next_try, failed (given up), error, error_at."""

    def renew_leases(
        self, conn: Any, owner: str, lease_until: float, deliveries: list[dict]
    ) -> None:
        """Extend ``owner``'s leases of these deliveries (endpoint, event) to ``lease_until``."""

    def release_deliveries(self, conn: Any, owner: str) -> None:
        """Give back every delivery ``owner`` leased and did not finish."""

    def webhook_status(self, conn: Any, failed_shown: int = 100) -> list[dict]:
        """Each endpoint's backlog, failed count, last error and first failed events."""

    def retry_failed(self, conn: Any, endpoint_id: str) -> int | None:
        """Queue the endpoint's failed deliveries again; how many, or None if it is unknown."""

    # --- a copy between databases (copying.py) ---

    def copy_snapshot(self, conn: Any) -> AbstractContextManager[None]:
        """Hold one read snapshot for the block: every read in it sees the database as it was
        when the block began, whatever is committed meanwhile."""

    def copy_contents(self, conn: Any) -> dict:
        """What the database holds, read on any connection (one of Connections.peek, at any
        schema version, included): ``identity`` (equal for two connections to one database,
        whatever their path or URL), ``migrated`` (whether it has every migration step),
        ``counts`` (the rows of each kind of COPIED, 0 for a table not there yet), ``pruned``
        (the events' pruned mark), ``last_sequence`` (the largest event sequence it has given
        out, 0 for none) and ``progress`` (what write_copied last recorded of an unfinished
        copy into it, or None)."""

    def copy_rows(self, conn: Any, kind: str, after: list | None, limit: int) -> list[tuple]:
        """Up to ``limit`` rows of a kind of COPIED whose key is above ``after`` (None: from
        the first), in key order, each the tuple of COPIED[kind]."""

    def write_copied(self, conn: Any, kind: str, rows: list[tuple], progress: dict) -> None:
        """Insert rows that copy_rows read from another database, as they are and in their
        order, and record the copy's ``progress`` (JSON), in one durable transaction.
        Customers record no event: their event trigger is off inside that transaction only,
        while the others (the count, metadata pairs, search index) fire."""

    def finish_copy(self, conn: Any, pruned: int, last_sequence: int) -> None:
        """End a copy in one transaction: set the events' pruned mark, take the next event
        sequence above ``last_sequence``, and forget the recorded progress."""


OPERATIONS = frozenset(
    name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")
) - {"where", "fault"}


@functools.cache
def load_backend(name: str) -> Backend:
    """The backend package of that name (PostgreSQL's needs the [postgres] extra)."""
    if name not in BACKENDS:
        raise ValueError(f"no backend named {name!r}: one of {BACKENDS}")
    return importlib.import_module(f"customers_service.backends.{name}")


class Store:
    """A backend and one of its connections: ``store.get_customer(customer_id)`` is
    ``backend.get_customer(conn, customer_id)``, for each operation of Backend. Views and
    commands call these and never ask which backend they have."""

    def __init__(self, backend: Backend, conn: Any, connections: Connections):
        self.backend, self.conn, self.connections = backend, conn, connections

    def __getattr__(self, name: str):
        if name not in OPERATIONS:
            raise AttributeError(f"Store has no operation {name!r}")
        bound = functools.partial(getattr(self.backend, name), self.conn)
        self.__dict__[name] = bound  # found there next time, without this method
        return bound

    def events_page(self, after: int, limit: int) -> tuple[list[dict], bool]:
        """Backend.events_page for any integer ``after``: no sequence reaches the largest
        integer a backend holds, so a larger ``after`` reads nothing."""
        return self.backend.events_page(self.conn, min(after, LARGEST_SEQUENCE), limit)

    def close(self) -> None:
        """Close a command's connection."""
        self.conn.close()

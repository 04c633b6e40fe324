"""The import pipeline: rows read from JSON Lines or CSV, checked by the API's schema in worker
processes, and committed in batches with a report of what was refused."""

import collections
import csv
import ctypes
import functools
import io
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import click
from marshmallow import ValidationError

from customers_service import schemas
from customers_service.backends.shared import (
    UPSERT_PARAMS,
    sent_fields,
    upsert_params,
    with_created_body,
)
from customers_service.body import parse_json
from customers_service.logs import say
from customers_service.responses import ApiError
from customers_service.storage import Store, utc_now

IMPORT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
EXTRA_CELLS = "\0extra"  # csv.DictReader's key for cells beyond the header


def _unwrap(value) -> object:
    """A customer, with or without its ``{"customer": ...}`` envelope."""
    if isinstance(value, dict) and isinstance(value.get("customer"), dict):
        return value["customer"]
    return value


def jsonl_rows(stream) -> Iterator[tuple[int, object, dict | None]]:
    """(line number, line, None) for each non-blank line of a JSON Lines stream."""
    for number, line in enumerate(stream, start=1):
        if line.strip():
            yield number, line, None


def csv_rows(stream) -> Iterator[tuple[int, object, dict | None]]:
    """(line number, customer, parse errors) for each record of a CSV stream with a header.

    An empty cell is null: it clears that field of an existing customer. The ``metadata`` cell
    holds the metadata as JSON (``{"plan": "pro"}``).
    """
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    try:
        yield from _csv_records(csv.DictReader(text, restkey=EXTRA_CELLS))
    finally:
        text.detach()  # the caller owns the file


def _csv_records(reader: csv.DictReader) -> Iterator[tuple[int, object, dict | None]]:
    """(line number, customer, parse errors) for each record of a CSV reader."""
    try:
        reader.fieldnames  # noqa: B018 (read the header now: the line numbers then count it)
    except csv.Error:
        yield 1, None, {"_row": ["invalid_csv"]}
        return
    while True:
        number = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error:
            yield number, None, {"_row": ["invalid_csv"]}
            continue
        customer = {k: (v if v else None) for k, v in record.items() if k != EXTRA_CELLS}
        if EXTRA_CELLS in record:
            yield number, customer, {"_row": ["too_many_cells"]}
        elif not _is_utf8(customer):
            yield number, customer, {"_row": ["invalid_utf8"]}
        elif not _metadata_cell_parsed(customer):
            yield number, customer, {"metadata": ["invalid_json"]}
        else:
            yield number, customer, None


def _metadata_cell_parsed(customer: dict) -> bool:
    """Replace a CSV record's metadata cell by the JSON it holds, as strictly as a request
    body is read (no duplicate keys, lone surrogates or runaway nesting); False if it is not
    such JSON."""
    if customer.get("metadata") is None:
        return True
    try:
        customer["metadata"] = parse_json(customer["metadata"].encode("utf-8"))
    except ApiError:
        return False
    return True


def _is_utf8(customer: dict) -> bool:
    """Whether every key and value decoded from the file was valid UTF-8."""
    try:
        for key, value in customer.items():
            (key or "").encode("utf-8")
            (value or "").encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_rows(
    rows: list, bodies: bool = True
) -> list[tuple[int, object, dict | None, dict | None]]:
    """(line number, raw row if refused, upsert parameter values, errors) for a chunk of rows,
    each parsed if need be and put through the API's schema, with the body of the customer it
    would create if ``bodies`` (Backend.IMPORT_BODIES). Runs in the import's workers."""
    now = utc_now()
    checked = []
    for number, raw, errors in rows:
        if errors is None and isinstance(raw, bytes):
            try:
                raw = _unwrap(parse_json(raw))
            except ApiError as e:
                raw, errors = raw.decode("utf-8", "replace").rstrip("\n"), {"_row": [e.code]}
        if errors is None and (not isinstance(raw, dict) or not raw):
            errors = {"_row": ["bad_request"]}
        if errors is None:
            try:
                fields = schemas.customer_import_schema.load(raw)
                # Values only, in UPSERT_PARAMS order: the field names are not sent back.
                params = upsert_params(fields, now)
                values = tuple((with_created_body(params) if bodies else params).values())
                checked.append((number, None, values, None))
                continue
            except ValidationError as e:
                errors = e.normalized_messages()
        checked.append((number, raw, None, errors))
    return checked


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    """Lists of ``size`` rows (the last one shorter)."""
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


def _start_worker(parent: int) -> None:
    """Set up a checking worker: Ctrl-C is the main process's to handle (it rolls back the batch
    and reports), and on Linux the worker ends with the main process, which, killed with
    SIGKILL, could not stop it (it would wait forever for more rows)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker outlives a killed import
        return
    if os.getppid() != parent:  # the main process ended before prctl took effect
        os._exit(1)


def checked_batches(
    rows: Iterator, batch_size: int, jobs: int, bodies: bool = True
) -> Iterator[list]:
    """check_rows over each batch, in file order, on ``jobs`` worker processes (in-process if 1),
    with only a few batches in flight so memory stays flat whatever the file's size."""
    check = functools.partial(check_rows, bodies=bodies)
    if jobs == 1:
        yield from map(check, _chunks(rows, batch_size))
        return
    pool = ProcessPoolExecutor(jobs, initializer=_start_worker, initargs=(os.getpid(),))
    try:
        in_flight: collections.deque = collections.deque()
        for chunk in _chunks(rows, batch_size):
            in_flight.append(pool.submit(check, chunk))
            if len(in_flight) > 2 * jobs:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class ImportReport:
    """Counts, rejected rows (to stderr and the rejects file) and the progress line."""

    def __init__(self, rejects, total_bytes: int | None, position):
        self.inserted = self.updated = self.unchanged = self.rejected = 0
        self.rejects, self.total_bytes, self.position = rejects, total_bytes, position
        self.started = self.last_shown = time.monotonic()
        self.show_progress = sys.stderr.isatty()

    def reject(self, number: int, raw, errors: dict) -> None:
        """Report one refused row, with its line number and error codes."""
        self.rejected += 1
        say(f"line {number}: rejected: {json.dumps(errors, sort_keys=True)}", line=number)
        if self.rejects:
            line = {"line": number, "errors": errors, "customer": raw}
            self.rejects.write(json.dumps(line, ensure_ascii=False) + "\n")

    def committed(self, inserted: int, updated: int, unchanged: int) -> None:
        """Count a committed batch, and redraw the progress bar now and then."""
        self.inserted += inserted
        self.updated += updated
        self.unchanged += unchanged
        now = time.monotonic()
        if self.show_progress and now - self.last_shown > 0.2:
            self.last_shown = now
            click.echo("\r" + self.progress_line(), err=True, nl=False)

    def _rows_and_rate(self) -> tuple[int, float, float]:
        """Rows handled so far, seconds since the start, and rows per second."""
        rows = self.inserted + self.updated + self.unchanged + self.rejected
        seconds = time.monotonic() - self.started
        return rows, seconds, rows / max(seconds, 1e-9)

    def progress_line(self) -> str:
        """A bar of the bytes read (when the size is known) and the rows per second."""
        rows, _, rate = self._rows_and_rate()
        bar = ""
        if self.total_bytes:
            done = min(self.position() / self.total_bytes, 1.0)
            filled = int(done * 30)
            bar = f"[{'#' * filled}{'-' * (30 - filled)}] {done:4.0%}  "
        return f"{bar}{rows:,} rows  {rate:,.0f} rows/s"

    def counts(self) -> dict:
        """The rows counted, by what became of them."""
        return {
            "inserted": self.inserted,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
        }

    def summary(self) -> str:
        """The one-line summary printed at the end."""
        _, seconds, rate = self._rows_and_rate()
        return (
            f"{self.inserted:,} inserted, {self.updated:,} updated, "
            f"{self.unchanged:,} unchanged, {self.rejected:,} rejected "
            f"in {seconds:.1f} s ({rate:,.0f} rows/s)"
        )


BATCH_TRIES = 3


def import_with_retries(store: Store, rows: list[dict]) -> tuple[int, int, list[tuple[int, dict]]]:
    """Store.import_batch, tried again when the database was only busy (a lock held by the live
    service past the timeout, a deadlock with it): the batch was rolled back whole."""
    attempt = 1
    while True:
        try:
            return store.import_batch(rows)
        except Exception as e:
            fault = store.backend.fault(e)
            if attempt == BATCH_TRIES or fault is None or fault[0] != "database_busy":
                raise
        time.sleep(0.1 * attempt)
        attempt += 1


def commit_batch(store: Store, checked: list, report: ImportReport) -> None:
    """Report the refused rows of a batch and upsert the others in one transaction."""
    valid = []
    for number, raw, values, errors in checked:
        if errors:
            report.reject(number, raw, errors)
        else:
            valid.append((number, dict(zip(UPSERT_PARAMS, values, strict=True))))
    mark, started = store.live_write_mark(), time.monotonic()
    inserted, updated, refused = import_with_retries(store, [params for _, params in valid])
    if store.live_writes_since(mark):  # alone, the import never pauses
        time.sleep((time.monotonic() - started) * store.backend.IMPORT_PAUSE)
    for position, errors in refused:  # a restored lago_id taken, metadata past 50 keys
        number, params = valid[position]
        report.reject(number, sent_fields(params), errors)
    report.committed(inserted, updated, len(valid) - len(refused) - inserted - updated)


def import_format(stream, given: str | None) -> str:
    """The format named by --format, or by the file's extension."""
    if given:
        return given
    name = getattr(stream, "name", "-")
    extension = os.path.splitext(name)[1].lower() if isinstance(name, str) else ""
    if extension not in IMPORT_FORMATS:
        raise click.UsageError("cannot tell the format from the file name: give --format")
    return IMPORT_FORMATS[extension]


def stream_size(stream) -> int | None:
    """The size of a regular file, or None for a pipe."""
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None

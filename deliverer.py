"""The webhook deliverer: a long-running loop that leases due deliveries from the database,
POSTs each event to its endpoint in a pool of threads, and records the outcome. Several may run
at once (one per host): a lease keeps a delivery to one of them, and one killed mid-delivery
leaves its leases to expire, for any deliverer to try again (at least once)."""

import os
import secrets
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import urllib3

from customers_service.events import event_object
from customers_service.logs import error_log
from customers_service.webhooks import RetrySchedule, delivery_request, unix_now

RESPONSE_READ = 64 * 1024  # bytes of a receiver's answer read before the connection is dropped
ERROR_LENGTH = 300


@dataclass(frozen=True)
class DelivererSettings:
    """How the deliverer works; see the README's settings table."""

    timeout: float = 10.0  # a delivery is a 2xx within this many seconds
    concurrency: int = 8  # deliveries in flight at once
    poll: float = 0.5  # seconds between looks at an empty queue
    lease: float = 60.0  # seconds a leased delivery is kept from other deliverers
    retry: RetrySchedule = field(default_factory=RetrySchedule)
    retention: float = 30 * 86400.0  # seconds events are kept
    prune_every: float = 60.0


class Deliverer:
    """One deliverer process's loop, on one Store (a connection of its own)."""

    def __init__(self, open_store, settings: DelivererSettings):
        self.open_store, self.settings = open_store, settings
        self.store = None
        self.unrecorded: list[dict] = []  # outcomes a database fault kept from being written
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.stopping = threading.Event()
        self.http = urllib3.PoolManager(
            num_pools=64,
            maxsize=settings.concurrency,
            retries=False,
            timeout=urllib3.Timeout(connect=settings.timeout, read=settings.timeout),
        )

    def stop(self) -> None:
        """Ask the loop to end: it stops leasing and finishes what it holds."""
        self.stopping.set()

    def run(self) -> None:
        """Deliver until stop(); then wait for the deliveries in flight (each bounded by the
        timeout), record them, and give back anything leased but not sent."""
        in_flight: dict[Future, dict] = {}
        next_prune = next_renewal = 0.0
        with ThreadPoolExecutor(self.settings.concurrency, "deliver") as pool:
            try:
                while not self.stopping.is_set():
                    try:
                        self._record(in_flight)
                        if time.monotonic() >= next_prune:
                            self.prune()
                            next_prune = time.monotonic() + self.settings.prune_every
                        if in_flight and time.monotonic() >= next_renewal:
                            self._renew_leases()
                            next_renewal = time.monotonic() + self.settings.lease / 3
                        claimed = self._claim(self.settings.concurrency - len(in_flight))
                    except Exception as e:  # the database is away: wait, then start afresh
                        self._lost_database(e)
                        continue
                    for delivery in claimed:
                        in_flight[pool.submit(self.send, delivery)] = delivery
                    if in_flight:
                        wait(in_flight, self.settings.poll, return_when=FIRST_COMPLETED)
                    elif not claimed:
                        self.stopping.wait(self.settings.poll)
            finally:
                wait(in_flight)
                self._record_done(in_flight)
                self._finish()

    def _finish(self) -> None:
        """Record the last outcomes and give back the leases; if the database is away, the
        leases expire instead and other deliverers try those deliveries again."""
        try:
            self._record({})
            self._connected().release_deliveries(self.owner)
        except Exception as e:
            error_log.error("deliverer: leaving its leases to expire: %s", str(e).strip())
        if self.store is not None:
            self.store.close()

    def _lost_database(self, error: Exception) -> None:
        """Log a database fault, drop the connection and wait before trying again."""
        error_log.error("deliverer: database error: %s", str(error).strip()[:ERROR_LENGTH])
        if self.store is not None:
            try:
                self.store.close()
            except Exception:  # already broken: nothing more to do with it
                pass
            self.store = None
        self.stopping.wait(self.settings.poll)

    def _connected(self):
        """The deliverer's Store, opened again after a fault."""
        if self.store is None:
            self.store = self.open_store()
        return self.store

    def _claim(self, room: int) -> list[dict]:
        """Lease up to ``room`` due deliveries."""
        if room <= 0:
            return []
        now = unix_now()
        return self._connected().claim_deliveries(self.owner, now, now + self.settings.lease, room)

    def _renew_leases(self) -> None:
        """Extend the leases of the deliveries in flight: a receiver slower than the lease
        (one that sends its answer a byte at a time) must not make another deliverer send the
        same event meanwhile. A deliverer that dies stops renewing, and its leases run out."""
        self._connected().renew_leases(self.owner, unix_now() + self.settings.lease)

    def _record_done(self, in_flight: dict) -> None:
        """Move the outcomes of finished deliveries out of ``in_flight``."""
        for future in [future for future in in_flight if future.done()]:
            self.unrecorded.append(future.result())
            del in_flight[future]

    def _record(self, in_flight: dict) -> None:
        """Write the outcomes of finished deliveries (and any a fault kept from being written),
        in one transaction."""
        self._record_done(in_flight)
        if self.unrecorded:
            self._connected().finish_deliveries(self.owner, self.unrecorded)
            self.unrecorded = []

    def send(self, delivery: dict) -> dict:
        """POST one event to one endpoint; the outcome to record (never an exception: one
        would leave the delivery leased until its lease ran out)."""
        outcome = {"endpoint": delivery["endpoint"], "event": delivery["event"]["sequence"]}
        try:
            body, headers = delivery_request(delivery["secret"], event_object(delivery["event"]))
            error = self.post(delivery["url"], body, headers)
        except Exception as e:
            error_log.exception("webhook endpoint=%s: unexpected error", delivery["endpoint"])
            error = f"{type(e).__name__}: {e}"[:ERROR_LENGTH]
        if error is None:
            return outcome
        return self.failure(delivery, outcome, error)

    def post(self, url: str, body: bytes, headers: dict) -> str | None:
        """None if the endpoint answered 2xx within the timeout, else what went wrong. The
        status decides: the answer's body is read (up to RESPONSE_READ) only to keep the
        connection for the next delivery, and a body that fails to come is no failure."""
        started = time.monotonic()
        try:
            response = self.http.request(
                "POST", url, body=body, headers=headers, redirect=False, preload_content=False
            )
        except urllib3.exceptions.HTTPError as e:
            return f"{type(e).__name__}: {e}"[:ERROR_LENGTH]
        answered_after = time.monotonic() - started
        whole = False
        try:
            response.read(RESPONSE_READ)
            whole = not response.read(1)
        except urllib3.exceptions.HTTPError:
            pass
        finally:
            if whole:
                response.release_conn()  # read to its end: the connection serves the next
            else:
                response.close()
        if not 200 <= response.status <= 299:
            return f"HTTP {response.status}"
        if answered_after > self.settings.timeout:
            return f"answered after more than {self.settings.timeout:g} s"
        return None

    def failure(self, delivery: dict, outcome: dict, error: str) -> dict:
        """The outcome of a failed try: when to try again, or given up."""
        now = unix_now()
        attempts = delivery["attempts"] + 1
        first_try = delivery["first_try"] or now
        next_try = self.settings.retry.after_failure(attempts, first_try, now)
        error_log.warning(
            "webhook endpoint=%s event=%s attempt=%s failed: %s%s",
            delivery["endpoint"],
            outcome["event"],
            attempts,
            error,
            "" if next_try is not None else " (given up)",
        )
        return {
            **outcome,
            "attempts": attempts,
            "first_try": first_try,
            "next_try": next_try or now,
            "failed": next_try is None,
            "error": error,
            "error_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }

    def prune(self) -> None:
        """Remove the events older than the retention."""
        removed = self._connected().prune_events(unix_now() - self.settings.retention)
        if removed:
            error_log.info("pruned %d events older than the retention", removed)

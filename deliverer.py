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


def lease_key(delivery: dict) -> dict:
    """A claimed delivery's key in the queue (endpoint, event), as storage takes it back."""
    return {"endpoint": delivery["endpoint"], "event": delivery["event"]["sequence"]}


class Unreachable:
    """Endpoints that did not answer (no connection, or no answer in time). While one keeps
    failing, it gets one delivery at a time, and none while it cools down (the retry schedule,
    counted in its failures in a row), so a dead endpoint cannot hold every thread while each
    try waits out the timeout, and starve the others. Any answer, even an error status, ends
    its streak."""

    def __init__(self, schedule: RetrySchedule):
        self.schedule = schedule
        self.streak: dict[str, int] = {}
        self.cooling_until: dict[str, float] = {}
        self.failed_at: dict[str, float] = {}

    def record(self, endpoint: str, answered: bool, tried_at: float, now: float) -> None:
        """Note how a try to ``endpoint``, started at ``tried_at``, went. Tries that were
        already under way when a failure was noted count as that same failure: eight tries
        failing together in one outage are one failure in the streak, not eight."""
        if answered:
            for table in (self.streak, self.cooling_until, self.failed_at):
                table.pop(endpoint, None)
            return
        if tried_at < self.failed_at.get(endpoint, float("-inf")):
            return
        self.failed_at[endpoint] = now
        self.streak[endpoint] = self.streak.get(endpoint, 0) + 1
        wait = self.schedule.first * 2 ** (self.streak[endpoint] - 1)
        self.cooling_until[endpoint] = now + min(wait, self.schedule.longest)

    def excluded(self, in_flight: dict, now: float) -> list[str]:
        """The endpoints not to lease deliveries for now."""
        busy = {delivery["endpoint"] for delivery in in_flight.values()}
        return [
            endpoint
            for endpoint in self.streak
            if self.cooling_until[endpoint] > now or endpoint in busy
        ]


class Deliverer:
    """One deliverer process's loop, on one Store (a connection of its own)."""

    def __init__(self, open_store, settings: DelivererSettings):
        self.open_store, self.settings = open_store, settings
        self.store = None
        self.unrecorded: list[dict] = []  # outcomes a database fault kept from being written
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.stopping = threading.Event()
        self.unreachable = Unreachable(settings.retry)
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
        """Deliver until stop(); then wait for the deliveries in flight (renewing their leases
        meanwhile), record them, and give back anything leased but not sent."""
        in_flight: dict[Future, dict] = {}
        next_prune = next_renewal = 0.0
        with ThreadPoolExecutor(self.settings.concurrency, "deliver") as pool:
            try:
                while not self.stopping.is_set():
                    if time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + self.settings.prune_every
                        self.prune()
                    try:
                        self._record(in_flight)
                        if in_flight and time.monotonic() >= next_renewal:
                            self._renew_leases(in_flight)
                            next_renewal = time.monotonic() + self.settings.lease / 3
                        claimed = self._claim(self.settings.concurrency - len(in_flight), in_flight)
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
                self._drain(in_flight)
                self._finish()

    def _drain(self, in_flight: dict) -> None:
        """Wait for the deliveries in flight to end, renewing their leases meanwhile (a slow
        receiver must not get a second copy from another deliverer while we wait)."""
        while in_flight:
            wait(in_flight, self.settings.lease / 3)
            self._record_done(in_flight)
            if in_flight:
                try:
                    self._renew_leases(in_flight)
                except Exception as e:
                    error_log.error("deliverer: could not renew leases: %s", str(e).strip())

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

    def _claim(self, room: int, in_flight: dict) -> list[dict]:
        """Lease up to ``room`` due deliveries (none for an endpoint that is failing and busy
        or cooling down)."""
        if room <= 0:
            return []
        now = unix_now()
        excluded = self.unreachable.excluded(in_flight, now)
        claimed = self._connected().claim_deliveries(
            self.owner, now, now + self.settings.lease, room, excluded
        )
        return self._one_per_failing_endpoint(claimed)

    def _one_per_failing_endpoint(self, claimed: list[dict]) -> list[dict]:
        """The claimed deliveries less all but the first of each failing endpoint (given back
        at once: they were due, so nothing is lost)."""
        kept, extra, seen = [], [], set()
        for delivery in claimed:
            endpoint = delivery["endpoint"]
            if endpoint in self.unreachable.streak and endpoint in seen:
                extra.append(lease_key(delivery))
            else:
                kept.append(delivery)
                seen.add(endpoint)
        if extra:
            self._connected().release_some(self.owner, extra)
        return kept

    def _renew_leases(self, in_flight: dict) -> None:
        """Extend the leases of the deliveries in flight: a receiver slower than the lease
        must not make another deliverer send the same event meanwhile. Only those: a lease
        whose delivery never reached a thread (a fault between the claim and here) runs out.
        A deliverer that dies stops renewing, and its leases run out too."""
        keys = [lease_key(delivery) for delivery in in_flight.values()]
        self._connected().renew_leases(self.owner, unix_now() + self.settings.lease, keys)

    def _record_done(self, in_flight: dict) -> None:
        """Move the outcomes of finished deliveries out of ``in_flight``."""
        now = unix_now()
        for future in [future for future in in_flight if future.done()]:
            outcome = future.result()
            answered, tried_at = outcome.pop("answered"), outcome.pop("tried_at")
            self.unreachable.record(outcome["endpoint"], answered, tried_at, now)
            self.unrecorded.append(outcome)
            del in_flight[future]

    def _record(self, in_flight: dict) -> None:
        """Write the outcomes of finished deliveries (and any a fault kept from being written),
        in one transaction."""
        self._record_done(in_flight)
        if self.unrecorded:
            self._connected().finish_deliveries(self.owner, self.unrecorded)
            self.unrecorded = []

    def send(self, delivery: dict) -> dict:
        """POST one event to one endpoint; the outcome to record, with ``answered`` (whether
        the endpoint answered at all). Never an exception: one would leave the delivery leased
        until its lease ran out."""
        outcome = lease_key(delivery)
        tried_at = unix_now()
        try:
            body, headers = delivery_request(delivery["secret"], event_object(delivery["event"]))
            error, answered = self.post(delivery["url"], body, headers)
        except Exception as e:
            error_log.exception("webhook endpoint=%s: unexpected error", delivery["endpoint"])
            error, answered = f"{type(e).__name__}: {e}"[:ERROR_LENGTH], True
        if error is not None:
            outcome = self.failure(delivery, outcome, error)
        return {**outcome, "answered": answered, "tried_at": tried_at}

    def post(self, url: str, body: bytes, headers: dict) -> tuple[str | None, bool]:
        """(None if the endpoint answered 2xx within the timeout, else what went wrong;
        whether it answered at all). The status decides: the answer's body is read (up to
        RESPONSE_READ) only to keep the connection for the next delivery, and a body that fails
        to come is no failure."""
        started = time.monotonic()
        try:
            response = self.http.request(
                "POST", url, body=body, headers=headers, redirect=False, preload_content=False
            )
        except urllib3.exceptions.HTTPError as e:
            return f"{type(e).__name__}: {e}"[:ERROR_LENGTH], False
        answered_after = time.monotonic() - started
        whole = False
        try:
            whole = self._read_body(response, started + self.settings.timeout)
        except urllib3.exceptions.HTTPError:
            pass
        finally:
            if whole:
                response.release_conn()  # read to its end: the connection serves the next
            else:
                response.close()
        if not 200 <= response.status <= 299:
            return f"HTTP {response.status}", True
        if answered_after > self.settings.timeout:
            return f"answered after more than {self.settings.timeout:g} s", False
        return None, True

    def _read_body(self, response, deadline: float) -> bool:
        """Read the answer's body (ignored) until its end, RESPONSE_READ bytes or the deadline,
        whichever comes first; whether it was read to its end. Each read returns what one
        receive brings, so a body sent a byte at a time cannot hold the thread past the
        deadline by more than one read's timeout."""
        read = 0
        while read <= RESPONSE_READ and time.monotonic() < deadline:
            chunk = response.read1(16384)
            if not chunk:
                return True
            read += len(chunk)
        return False

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
        """Remove the events older than the retention (a few thousand at a time: the loop
        goes on meanwhile). A failure is logged and tried again at the next prune."""
        try:
            removed = self._connected().prune_events(unix_now() - self.settings.retention)
        except Exception as e:
            error_log.error("deliverer: could not prune events: %s", str(e).strip())
            return
        if removed:
            error_log.info("pruned %d events older than the retention", removed)

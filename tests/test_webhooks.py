"""Webhooks: the endpoint commands, and the deliverer (``flask customers deliver-webhooks``, a
real process) posting to real receivers on 127.0.0.1 that check the signature as a Lago receiver
does; receivers that fail, hang or go away, deliverers killed or running two at once. Retry
times are made short by the settings."""

import itertools
import json
import os
import signal
import subprocess
import time

import pytest
from support.databases import Backend
from support.receiver import Receiver
from support.service import API_KEY, AUTH, FLASK, ROOT, post_customer, started_app

from customers_service import database

QUICK = {
    "CUSTOMERS_WEBHOOK_TIMEOUT": "1",
    "CUSTOMERS_WEBHOOK_POLL_SECONDS": "0.05",
    # Renewed every third while a delivery is in flight; a killed deliverer's run out in 10 s.
    "CUSTOMERS_WEBHOOK_LEASE_SECONDS": "10",
    "CUSTOMERS_WEBHOOK_RETRY_FIRST_SECONDS": "0.1",
    "CUSTOMERS_WEBHOOK_RETRY_LONGEST_SECONDS": "0.4",
}


class DelivererProcess:
    """``flask customers deliver-webhooks`` in a process of its own, stopped by its pid."""

    def __init__(self, tmp_path, backend, settings: dict | None = None):
        self.log_path = tmp_path / f"deliverer-{time.monotonic_ns()}.log"
        self.env = {
            "PATH": os.environ["PATH"],
            "CUSTOMERS_API_KEYS": API_KEY,
            "CUSTOMERS_API_KEY_FILE": str(tmp_path / "api-keys"),
            **backend.env,
            **QUICK,
            **(settings or {}),
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> "DelivererProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*FLASK, "customers", "deliver-webhooks"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def deliverers(tmp_path, backend):
    """Start deliverers with ``deliverers(**settings)``; all are stopped at the end."""
    started = []

    def start(**settings) -> DelivererProcess:
        process = DelivererProcess(tmp_path, backend, settings).start()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.stop(signal.SIGKILL)


@pytest.fixture
def receivers():
    started = []

    def start(secret: str = "", port: int | None = None) -> Receiver:
        receiver = Receiver(secret, port).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def registered(receivers, runner):
    """Start receivers registered as endpoints, each knowing its secret: ``registered()``."""

    def start() -> Receiver:
        receiver = receivers()
        receiver.endpoint = add_webhook(runner, receiver.url)
        receiver.secret = receiver.endpoint["secret"]
        return receiver

    return start


def add_webhook(runner, url: str) -> dict:
    result = runner.invoke(args=["customers", "add-webhook", url])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def status(runner) -> list[dict]:
    result = runner.invoke(args=["customers", "webhook-status"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def wait_until(condition, seconds: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)


def feed_events(client) -> list[dict]:
    events, after = [], 0
    while True:
        page = client.get(f"/api/v1/events?after={after}&limit=1000", headers=AUTH).json
        events += page["events"]
        after = page["meta"]["last_sequence"]
        if not page["meta"]["has_more"]:
            return events


def change_customers(client, customers: int, changes_each: int) -> list[dict]:
    """Interleaved upserts of several customers; the events they recorded."""
    for n in range(changes_each):
        for c in range(customers):
            customer = {"customer_id": f"cust-{c}", "name": f"change {n}"}
            assert post_customer(client, customer).status_code == 200
    return feed_events(client)


def assert_in_order_per_customer(receiver: Receiver, events: list[dict]) -> None:
    """No request for a customer's event arrived before every earlier event of that customer
    had been answered 2xx (nothing here is given up)."""
    customer_of = {e["sequence"]: e["customer"]["customer_id"] for e in events}
    answered: dict[int, float] = {}  # each event's first 2xx answer
    for arrival in receiver.arrivals:
        if arrival.status is not None and 200 <= arrival.status < 300:
            answered.setdefault(arrival.sequence, arrival.answered_at)
    for arrival in receiver.arrivals:
        for sequence, customer_id in customer_of.items():
            if customer_id == customer_of[arrival.sequence] and sequence < arrival.sequence:
                assert sequence in answered and answered[sequence] <= arrival.at, (
                    f"event {arrival.sequence} sent before {sequence} was delivered"
                )


def assert_all_delivered_signed(receiver: Receiver, events: list[dict]) -> None:
    """Each event reached the receiver with 2xx, signed, with its id as the unique key, each
    repeat carrying the same key."""
    delivered = {a.key for a in receiver.delivered()}
    assert delivered == {e["id"] for e in events}
    by_sequence = {e["sequence"]: e for e in events}
    for arrival in receiver.arrivals:
        assert arrival.signed
        assert arrival.key == by_sequence[arrival.sequence]["id"]


def test_each_event_reaches_the_endpoint_signed_as_lago_signs(
    client, runner, receivers, deliverers
):
    receiver = receivers()
    endpoint = add_webhook(runner, receiver.url)
    receiver.secret = endpoint["secret"]
    post_customer(client, {"customer_id": "a", "name": "A", "metadata": {"b": "1", "a": "2"}})
    post_customer(client, {"customer_id": "a", "name": "A2"})
    client.delete("/api/v1/customers/a", headers=AUTH)
    events = feed_events(client)
    deliverers()
    wait_until(lambda: len(receiver.delivered()) == 3, what="3 deliveries")
    arrivals = receiver.delivered()
    assert [a.sequence for a in arrivals] == [e["sequence"] for e in events]
    for arrival, event in zip(arrivals, events, strict=True):
        assert arrival.signed
        assert arrival.body == json.dumps(event, separators=(",", ":")).encode()
        assert arrival.headers["Content-Type"] == "application/json"
        assert arrival.headers["X-Lago-Signature-Algorithm"] == "hmac"
        assert arrival.headers["X-Lago-Unique-Key"] == event["id"]
    wait_until(lambda: status(runner)[0]["backlog"] == 0, what="an empty backlog")
    (shown,) = status(runner)
    assert shown["failed"] == 0 and shown["last_error"] is None


def test_an_endpoint_gets_only_the_events_recorded_while_it_is_registered(
    client, runner, receivers, deliverers
):
    kept, removed = receivers(), receivers()
    post_customer(client, {"customer_id": "before", "name": "B"})
    kept_endpoint = add_webhook(runner, kept.url)
    removed_endpoint = add_webhook(runner, removed.url)
    post_customer(client, {"customer_id": "during", "name": "D"})
    result = runner.invoke(args=["customers", "remove-webhook", removed_endpoint["id"]])
    assert result.exit_code == 0, result.output
    post_customer(client, {"customer_id": "after", "name": "A"})
    deliverers()
    wait_until(lambda: len(kept.delivered()) == 2, what="2 deliveries")
    time.sleep(0.5)  # time for anything wrongly queued to go out too
    assert sorted(a.customer_id for a in kept.arrivals) == ["after", "during"]  # not "before"
    assert removed.arrivals == []  # what was queued for it was dropped with it
    listed = runner.invoke(args=["customers", "list-webhooks"]).stdout.splitlines()
    assert [json.loads(line)["id"] for line in listed] == [kept_endpoint["id"]]


def test_a_receiver_failing_the_first_tries_gets_each_event_again_in_order(
    client, runner, registered, deliverers
):
    receiver = registered()
    # Each event: a 500, then a redirect (not followed), then a 503, then taken.
    answers = {1: 500, 2: 302, 3: 503}
    receiver.answer = lambda arrival: (answers.get(arrival.try_number, 200), 0.0)
    events = change_customers(client, customers=3, changes_each=4)
    deliverers()
    wait_until(lambda: len(receiver.delivered()) == len(events), what="every delivery")
    assert_all_delivered_signed(receiver, events)
    assert_in_order_per_customer(receiver, events)
    assert sorted(receiver.tries.values()) == [4] * len(events)
    assert not [a for a in receiver.arrivals if "elsewhere" in str(a.headers)]
    for key in receiver.tries:  # the backoff: 0.1 s after the first failure, doubling to 0.4
        times = [a.at for a in receiver.arrivals if a.key == key]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(gap >= least - 0.01 for gap, least in zip(gaps, (0.1, 0.2, 0.4), strict=True))
    wait_until(lambda: status(runner)[0]["backlog"] == 0, what="an empty backlog")
    assert status(runner)[0]["last_error"] in ("HTTP 500", "HTTP 302", "HTTP 503")


def test_a_receiver_that_hangs_past_the_timeout_is_tried_again(
    client, runner, registered, deliverers
):
    receiver = registered()
    # The first try of each event waits 2.5 s (the timeout is 1 s), then answers 200 too late.
    receiver.answer = lambda arrival: (200, 2.5) if arrival.try_number == 1 else (200, 0.0)
    events = change_customers(client, customers=2, changes_each=2)
    deliverers()
    wait_until(lambda: len({a.key for a in receiver.arrivals if a.try_number == 2}) == 4)
    assert {a.key for a in receiver.arrivals} == {e["id"] for e in events}
    assert all(a.signed for a in receiver.arrivals)
    shown = status(runner)[0]
    assert "timed out" in shown["last_error"].lower(), shown


def test_a_receiver_down_for_a_while_gets_everything_when_it_is_back(
    client, runner, receivers, registered, deliverers
):
    receiver = registered()
    receiver.stop()
    events = change_customers(client, customers=3, changes_each=3)
    deliverers()
    wait_until(lambda: (status(runner)[0]["last_error"] or "").startswith("NewConnectionError"))
    time.sleep(1)
    assert status(runner)[0]["backlog"] == len(events)
    back = receivers(secret=receiver.secret, port=receiver.port)
    wait_until(lambda: len(back.delivered()) == len(events), what="every delivery")
    assert_all_delivered_signed(back, events)
    assert_in_order_per_customer(back, events)


def test_given_up_events_are_failed_and_retry_webhooks_queues_them_again(
    client, runner, receivers, deliverers
):
    receiver = receivers()
    endpoint = add_webhook(runner, receiver.url)
    receiver.secret = endpoint["secret"]
    receiver.answer = lambda arrival: (500, 0.0)
    events = change_customers(client, customers=3, changes_each=1)
    deliverers(CUSTOMERS_WEBHOOK_RETRY_FOR_SECONDS="0.5")
    wait_until(lambda: status(runner)[0]["failed"] == 3, what="3 failed")
    shown = status(runner)[0]
    assert shown["failed_events"] == [e["sequence"] for e in events]
    assert shown["backlog"] == 0 and shown["last_error"] == "HTTP 500"
    receiver.answer = lambda arrival: (200, 0.0)
    result = runner.invoke(args=["customers", "retry-webhooks", endpoint["id"]])
    assert result.exit_code == 0 and "Queued 3" in result.output, result.output
    wait_until(lambda: len(receiver.delivered()) == 3, what="3 deliveries")
    wait_until(lambda: status(runner)[0]["failed"] == 0)
    assert_all_delivered_signed(receiver, events)


def test_a_given_up_event_does_not_hold_back_the_customer_s_next_one(
    client, runner, registered, deliverers
):
    receiver = registered()
    post_customer(client, {"customer_id": "x", "name": "first"})
    receiver.answer = lambda arrival: (500, 0.0) if arrival.try_number < 99 else (200, 0.0)
    deliverers(CUSTOMERS_WEBHOOK_RETRY_FOR_SECONDS="0.3")
    wait_until(lambda: status(runner)[0]["failed"] == 1, what="the first given up")
    receiver.answer = lambda arrival: (200, 0.0)
    post_customer(client, {"customer_id": "x", "name": "second"})
    wait_until(lambda: len(receiver.delivered()) == 1, what="the second delivered")
    assert json.loads(receiver.delivered()[0].body)["customer"]["name"] == "second"


def test_a_deliverer_killed_mid_delivery_and_started_again_loses_nothing(
    client, runner, registered, deliverers
):
    receiver = registered()
    receiver.answer = lambda arrival: (200, 0.2)
    events = change_customers(client, customers=4, changes_each=5)
    first = deliverers()
    wait_until(lambda: len(receiver.arrivals) >= 6, what="some deliveries")
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL  # leases held, answers unrecorded
    deliverers()
    wait_until(lambda: {a.key for a in receiver.delivered()} == {e["id"] for e in events})
    assert_all_delivered_signed(receiver, events)
    assert_in_order_per_customer(receiver, events)


def test_two_deliverers_at_once_deliver_each_event_once_in_order(
    client, runner, registered, deliverers
):
    receiver = registered()
    receiver.answer = lambda arrival: (200, 0.01)
    events = change_customers(client, customers=10, changes_each=8)
    deliverers(), deliverers()
    wait_until(lambda: len(receiver.delivered()) == len(events), what="every delivery")
    time.sleep(0.5)
    assert sorted(a.key for a in receiver.arrivals) == sorted(e["id"] for e in events)
    assert_all_delivered_signed(receiver, events)
    assert_in_order_per_customer(receiver, events)


def test_sigterm_finishes_the_delivery_in_flight_and_records_it(
    client, runner, registered, deliverers
):
    receiver = registered()
    receiver.answer = lambda arrival: (200, 0.8)
    post_customer(client, {"customer_id": "slow", "name": "S"})
    first = deliverers()
    wait_until(lambda: len(receiver.arrivals) == 1, what="the delivery to start")
    assert first.stop(signal.SIGTERM) == 0, first.log()
    wait_until(lambda: receiver.arrivals[0].status == 200, what="the answer")
    assert status(runner)[0]["backlog"] == 0  # recorded: no other deliverer sends it again
    assert "deliverer stopped" in first.log()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "/relative",
        "http://",
        "example.com",
        "http://x:99999/",
        "http://a b/",
    ],
)
def test_add_webhook_refuses_a_bad_url(runner, url):
    result = runner.invoke(args=["customers", "add-webhook", url])
    assert result.exit_code != 0
    assert "URL" in result.output or "URL" in str(result.exception)


def test_unknown_endpoint_ids_are_errors_and_secrets_are_shown_once(runner, receivers):
    for command in ("remove-webhook", "retry-webhooks"):
        result = runner.invoke(args=["customers", command, "no-such-id"])
        assert result.exit_code != 0 and "no webhook endpoint" in result.output
    endpoint = add_webhook(runner, "https://example.com/hook")
    assert len(endpoint["secret"]) >= 32
    listed = runner.invoke(args=["customers", "list-webhooks"]).stdout
    status_text = runner.invoke(args=["customers", "webhook-status"]).stdout
    assert endpoint["secret"] not in listed + status_text
    assert json.loads(listed) == {k: endpoint[k] for k in ("id", "url", "created_at")}


def test_the_secret_never_reaches_the_deliverer_s_log(client, runner, receivers, deliverers):
    receiver = receivers()
    endpoint = add_webhook(runner, receiver.url)
    receiver.answer = lambda arrival: (500, 0.0)
    post_customer(client, {"customer_id": "s", "name": "S"})
    process = deliverers()
    wait_until(lambda: len(receiver.arrivals) >= 3, what="a few failed tries")
    process.stop()
    assert "HTTP 500" in process.log()
    assert endpoint["secret"] not in process.log()


@pytest.mark.postgres
def test_the_deliverer_rides_out_a_postgres_restart(postgres, tmp_path, receivers):
    """PostgreSQL stops under a running deliverer and comes back: the deliverer logs it, waits,
    reconnects by itself and delivers what was recorded before and after."""
    name = postgres.new_database()
    url = postgres.url(name)
    backend = Backend("postgres", {"CUSTOMERS_DATABASE_URL": url}, url=url)
    app = started_app({**backend.config, "CUSTOMERS_API_KEYS": API_KEY})
    client, runner = app.test_client(), app.test_cli_runner()
    receiver = receivers()
    receiver.secret = add_webhook(runner, receiver.url)["secret"]
    process = DelivererProcess(tmp_path, backend).start()
    try:
        post_customer(client, {"customer_id": "before", "name": "B"})
        wait_until(lambda: len(receiver.delivered()) == 1, what="the first delivery")
        database.close_connections()
        postgres.stop("fast")
        try:
            wait_until(lambda: "database error" in process.log(), what="the deliverer to notice")
            time.sleep(0.5)  # a few more of its tries meet the outage
        finally:
            postgres.start()
        assert post_customer(client, {"customer_id": "after", "name": "A"}).status_code == 200
        wait_until(lambda: len(receiver.delivered()) == 2, what="the delivery after the restart")
        assert process.proc.poll() is None, process.log()
        assert sorted(a.customer_id for a in receiver.delivered()) == ["after", "before"]
    finally:
        process.stop()
        database.close_connections()
        postgres.drop_database(name)


def test_an_endpoint_that_stops_answering_gets_one_try_at_a_time_and_starves_no_other(
    client, registered, deliverers
):
    dead, alive = registered(), registered()
    dead.answer = lambda arrival: (200, 3.0)  # long after the 1 s timeout: never in time
    events = change_customers(client, customers=80, changes_each=1)
    deliverers()
    wait_until(lambda: len(alive.delivered()) == len(events), what="the live endpoint's events")
    started = min(dead.arrivals[0].at, alive.arrivals[0].at)
    # The dead endpoint's first tries hold threads for the 1 s timeout; then it gets one try at
    # a time, so the live one's 80 events do not wait behind the dead one's 80 (without that,
    # every thread waits out the timeout on the dead endpoint, again and again).
    assert alive.delivered()[-1].at - started < 5
    wait_until(lambda: len([a for a in dead.arrivals if a.at > started + 2]) >= 3, what="probes")
    later = [arrival.at for arrival in dead.arrivals if arrival.at > started + 2]
    # Each try waits out the 1 s timeout, then a pause (0.1 s, doubling to 0.4 s): never two
    # at once again.
    gaps = [b - a for a, b in itertools.pairwise(later)]
    assert all(gap >= 1.05 for gap in gaps), gaps

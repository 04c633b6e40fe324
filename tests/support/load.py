"""Client load against a live server: writers posting random customers, a walk through the
pages while another client inserts, and writers changing shared customers while a consumer
pages the event feed."""

import threading
import time

import requests
from support.data import random_customer
from support.service import AUTH


def walk_pages_while_inserting(
    url: str, query: dict, new_customer, at_most: int
) -> tuple[list[dict], int]:
    """Every page of GET /api/v1/customers with ``query``, walked while another client inserts
    ``new_customer(i)`` for i = 0, 1, ... (at most ``at_most``); returns the pages' bodies and
    how many customers the other client inserted meanwhile."""
    customers_url = url + "/api/v1/customers"
    stop = threading.Event()
    inserted = []

    def insert_while_walking():
        with requests.Session() as session:
            session.headers.update(AUTH)
            while not stop.is_set() and len(inserted) < at_most:
                body = {"customer": new_customer(len(inserted))}
                session.post(customers_url, json=body).raise_for_status()
                inserted.append(body)

    writer = threading.Thread(target=insert_while_walking)
    writer.start()
    pages = []
    try:
        with requests.Session() as session:
            session.headers.update(AUTH)
            page = 1
            while page is not None:
                response = session.get(customers_url, params={**query, "page": page})
                assert response.status_code == 200, response.text
                pages.append(response.json())
                page = pages[-1]["meta"]["next_page"]
    finally:
        stop.set()
        writer.join()
    return pages, len(inserted)


class WriteLoad:
    """Client threads posting distinct customers until stopped; remembers every 200."""

    def __init__(self, url: str, clients: int = 8):
        self.url, self.clients = url, clients
        self.acked: list[dict] = []
        self.statuses: list[int] = []
        self.connection_errors = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(n,)) for n in range(clients)]

    def run(self, client_number: int) -> None:
        sequence = 0
        while not self.stop.is_set() and sequence < 5000:
            sequence += 1
            customer = random_customer(client_number, sequence)
            try:
                response = requests.post(
                    self.url + "/api/v1/customers",
                    json={"customer": customer},
                    headers=AUTH,
                    timeout=10,
                )
            except requests.RequestException as e:
                self.connection_errors += 1
                self.errors.append(repr(e))
                time.sleep(0.01)
                continue
            self.statuses.append(response.status_code)
            if response.status_code == 200:
                self.acked.append(customer)

    def __enter__(self) -> "WriteLoad":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def consume_while(url: str, running: threading.Event, pages: list) -> None:
    """Page through the feed as a consumer does, until ``running`` clears and the feed is
    drained; every page's body goes into ``pages``."""
    after = 0
    with requests.Session() as session:
        session.headers.update(AUTH)
        while True:
            was_running = running.is_set()
            body = session.get(url + "/api/v1/events", params={"after": after, "limit": 50})
            assert body.status_code == 200, body.text
            pages.append(body.json())
            after = pages[-1]["meta"]["last_sequence"]
            if not pages[-1]["meta"]["has_more"]:
                if not was_running:
                    return
                time.sleep(0.01)


def write_in_turn(
    url: str, writer: int, ids: list[str], acked: list, count: int, errors: list
) -> None:
    """One client's changes, one after the other: upserts with a name no other change uses, and
    now and then a delete; each 200 is appended to ``acked``, a failure to ``errors``."""
    try:
        _write_in_turn(url, writer, ids, acked, count)
    except Exception as e:  # a thread's exception is otherwise lost: the test reports it
        errors.append(repr(e))


def _write_in_turn(url: str, writer: int, ids: list[str], acked: list, count: int) -> None:
    with requests.Session() as session:
        session.headers.update(AUTH)
        for n in range(count):
            customer_id = ids[(writer * 7 + n) % len(ids)]
            if n % 9 == 8:
                response = session.delete(f"{url}/api/v1/customers/{customer_id}")
                if response.status_code == 200:
                    acked.append(("deleted", customer_id, None))
                continue
            name = f"writer {writer} change {n}"
            body = {"customer": {"customer_id": customer_id, "name": name}}
            response = session.post(url + "/api/v1/customers", json=body)
            assert response.status_code == 200, response.text
            acked.append(("upserted", customer_id, name))


def assert_feed_matches_the_changes(pages: list, acked_by_writer: list, final_rows: dict) -> None:
    """Every change exactly once, numbers only growing, each writer's changes in the order it
    made them, and replaying the feed gives the stored customers."""
    events = [event for page in pages for event in page["events"]]
    sequences = [event["sequence"] for event in events]
    assert sequences == sorted(set(sequences)), "a number at or below one already handed out"
    assert len({event["id"] for event in events}) == len(events)
    assert len(events) == sum(len(acked) for acked in acked_by_writer)
    position = {
        event["customer"]["name"]: i
        for i, event in enumerate(events)
        if event["webhook_type"] != "customer.deleted"
    }
    for acked in acked_by_writer:  # a writer's next change started after its last one's 200
        order = [position[name] for kind, _, name in acked if kind == "upserted"]
        assert order == sorted(order)
    replayed = {}
    for event in events:
        customer = event["customer"]
        if event["webhook_type"] == "customer.deleted":
            del replayed[customer["customer_id"]]
        else:
            replayed[customer["customer_id"]] = customer
    assert replayed == final_rows


def all_customers(url: str) -> dict:
    """Every stored customer by customer_id, read through the API."""
    customers, page = {}, 1
    while page:
        body = requests.get(
            url + "/api/v1/customers", params={"page": page, "per_page": 100}, headers=AUTH
        ).json()
        customers.update((c["customer_id"], c) for c in body["customers"])
        page = body["meta"]["next_page"]
    return customers


def run_writers_and_a_consumer(url: str, writer_urls: list[str], count: int) -> None:
    """Writers on ``writer_urls`` (one thread each) changing a shared set of customers, while a
    consumer pages the feed on ``url``; then check what the consumer collected."""
    ids = [f"shared-{n}" for n in range(12)]
    acked_by_writer = [[] for _ in writer_urls]
    errors = []
    running, pages = threading.Event(), []
    running.set()
    consumer = threading.Thread(target=consume_while, args=(url, running, pages))
    consumer.start()
    writers = [
        threading.Thread(
            target=write_in_turn, args=(writer_url, n, ids, acked_by_writer[n], count, errors)
        )
        for n, writer_url in enumerate(writer_urls)
    ]
    try:
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join()
    finally:
        running.clear()
        consumer.join(timeout=60)
    assert not consumer.is_alive()
    assert errors == []
    assert len(pages) > 3, "the consumer did not read during the load"
    assert_feed_matches_the_changes(pages, acked_by_writer, all_customers(url))

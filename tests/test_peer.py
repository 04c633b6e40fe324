"""The benchmark's peer (bench/peers/fastapi_customers) holds the contract's rules: the same
requests get the same statuses, error codes and customers from it as from the service, on each
backend. Runs where the bench extra is installed; skipped where it is not (`make test`)."""

import json

import pytest
from support.service import API_KEY, AUTH, ROOT

from customers_service.schemas import SEED_EXAMPLE

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("httpx2")  # the TestClient's: with httpx alone, Starlette warns

SERVER_OWNED = ("lago_id", "created_at", "updated_at")
JSON_TYPE = {"Content-Type": "application/json"}


class Both:
    """The service's Flask test client and the peer's TestClient, sent the same requests."""

    def __init__(self, ours, peer):
        self.ours, self.peer = ours, peer

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        """(status, JSON body) of the service, then of the peer."""
        headers = {**AUTH, **JSON_TYPE} if headers is None else headers
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        ours = self.ours.open(path, method=method, data=data, headers=headers)
        peer = self.peer.request(method, path, content=data, headers=headers)
        return (ours.status_code, ours.get_json()), (peer.status_code, peer.json())

    def upsert(self, customer: dict):
        return self.request("POST", "/api/v1/customers", {"customer": customer})


def same_error(ours, peer) -> None:
    """The same status, code and field errors."""
    (ours_status, ours_body), (peer_status, peer_body) = ours, peer
    assert (peer_status, peer_body["code"], peer_body.get("error_details")) == (
        ours_status,
        ours_body["code"],
        ours_body.get("error_details"),
    )


def same_customer(ours: dict, peer: dict) -> None:
    """The same customer object, but for the keys each server makes itself."""
    assert list(peer) == list(ours)
    assert {k: v for k, v in peer.items() if k not in SERVER_OWNED} == {
        k: v for k, v in ours.items() if k not in SERVER_OWNED
    }


@pytest.fixture
def both(client, backend, request, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench" / "peers"))
    from fastapi.testclient import TestClient
    from fastapi_customers.database import get_db, make_engine
    from fastapi_customers.main import app, get_api_keys
    from fastapi_customers.models import Base
    from sqlalchemy.orm import sessionmaker

    if backend.name == "postgres":  # the peer's own database in the session's cluster
        cluster = request.getfixturevalue("postgres")
        name = cluster.new_database(migrated=False)
        url = cluster.url(name).replace("postgresql://", "postgresql+psycopg://", 1)
    else:
        url = f"sqlite:///{tmp_path / 'peer.sqlite3'}"
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)

    def test_db():
        with sessions() as db:
            yield db

    app.dependency_overrides[get_db] = test_db
    app.dependency_overrides[get_api_keys] = lambda: frozenset([API_KEY])
    with TestClient(app) as peer:
        yield Both(client, peer)
    app.dependency_overrides.clear()
    engine.dispose()
    if backend.name == "postgres":
        cluster.drop_database(name)


VALID = {
    "the contract's example": SEED_EXAMPLE,
    "only what is required": {"customer_id": "c-1", "name": "Gavin Belson"},
    "a country in lower case": {"customer_id": "c-1", "name": "G", "country": "fr"},
    "an unknown key sent as null": {"customer_id": "c-1", "name": "G", "vat_rate": None},
    "metadata": {"customer_id": "c-1", "name": "G", "metadata": {"plan": "pro", "x": None}},
    "a customer_id with a slash and spaces": {"customer_id": "a/b c é", "name": "G"},
}


@pytest.mark.parametrize("customer", VALID.values(), ids=VALID.keys())
def test_peer_takes_and_gives_back_the_same_customers(both, customer):
    (ours_status, ours), (peer_status, peer) = both.upsert(customer)
    assert (ours_status, peer_status) == (200, 200)
    same_customer(ours["customer"], peer["customer"])
    path = "/api/v1/customers/" + customer["customer_id"].replace("/", "%2F")
    (ours_status, ours), (peer_status, peer) = both.request("GET", path)
    assert (ours_status, peer_status) == (200, 200)
    same_customer(ours["customer"], peer["customer"])


INVALID = {
    "blank name, unknown country": {"customer_id": "c-1", "name": " ", "country": "ZZ"},
    "null customer_id, no name": {"customer_id": None},
    "too long": {"customer_id": "c" * 256, "name": "G", "state": "s" * 256},
    "not strings": {"customer_id": 5, "name": ["G"], "city": 3, "country": True},
    "a NUL": {"customer_id": "c-1", "name": "G\0", "zipcode": "\0"},
    "an e-mail address": {"customer_id": "c-1", "name": "G", "email": "dinesh@"},
    "URLs": {"customer_id": "c-1", "name": "G", "url": "ftp://hooli.com", "logo_url": "hooli"},
    "a long URL": {"customer_id": "c-1", "name": "G", "url": "http://h.com/" + "a" * 2040},
    "an empty country": {"customer_id": "c-1", "name": "G", "country": ""},
    "an unknown key with a value": {"customer_id": "c-1", "name": "G", "vat_rate": "20"},
    "metadata not an object": {"customer_id": "c-1", "name": "G", "metadata": "pro"},
    "metadata keys and values": {
        "customer_id": "c-1",
        "name": "G",
        "metadata": {"a[b]": "x", "": "y", "k" * 41: "z", "n": 5, "long": "v" * 501},
    },
    "51 metadata keys": {
        "customer_id": "c-1",
        "name": "G",
        "metadata": {f"k{i}": "v" for i in range(51)},
    },
}


@pytest.mark.parametrize("customer", INVALID.values(), ids=INVALID.keys())
def test_peer_refuses_the_same_customers(both, customer):
    ours, peer = both.upsert(customer)
    assert ours[0] == 422
    same_error(ours, peer)


BAD_REQUESTS = {
    "no customer": ({"name": "G"}, None, None),
    "an empty customer": ({"customer": {}}, None, None),
    "a customer that is not an object": ({"customer": "c-1"}, None, None),
    "a body that is not an object": ([1], None, None),
    "not JSON": (None, None, b'{"customer": '),
    "no key": ({"customer": SEED_EXAMPLE}, JSON_TYPE, None),
    "a wrong key": (
        {"customer": SEED_EXAMPLE},
        {"Authorization": "Bearer nope", **JSON_TYPE},
        None,
    ),
    "not JSON's media type": (
        {"customer": SEED_EXAMPLE},
        {**AUTH, "Content-Type": "text/plain"},
        None,
    ),
}


@pytest.mark.parametrize("body, headers, raw", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_peer_refuses_the_same_requests(both, body, headers, raw):
    ours, peer = both.request("POST", "/api/v1/customers", body, headers, raw)
    assert ours[0] in (400, 401, 415)
    same_error(ours, peer)


def test_peer_upserts_by_the_same_rule(both):
    """Absent keys kept, null clears, metadata merged, the merged 50 keys enforced."""
    first = {**SEED_EXAMPLE, "metadata": {f"k{i}": "v" for i in range(49)}}
    both.upsert(first)
    update = {
        "customer_id": SEED_EXAMPLE["customer_id"],
        "name": "Richard Hendricks",
        "city": None,
        "metadata": {"k0": None, "k1": "w", "new": "n"},
    }
    (_, ours), (_, peer) = both.upsert(update)
    same_customer(ours["customer"], peer["customer"])
    assert ours["customer"]["state"] == "CA" and len(ours["customer"]["metadata"]) == 49
    more = {**update, "metadata": {"one": "1", "two": "2"}}  # 51 once merged
    ours, peer = both.upsert(more)
    assert ours[0] == 422
    same_error(ours, peer)
    (_, ours), (_, peer) = both.upsert({**update, "metadata": None})
    same_customer(ours["customer"], peer["customer"])
    assert ours["customer"]["metadata"] == {}


def test_peer_reads_and_lists_the_same(both):
    for i in range(3):
        both.upsert({"customer_id": f"c-{i}", "name": f"Customer {i}"})
    (_, ours), (_, peer) = both.request("GET", "/api/v1/customers?page=1&per_page=2")
    assert peer["meta"] == ours["meta"]
    assert [c["customer_id"] for c in peer["customers"]] == [
        c["customer_id"] for c in ours["customers"]
    ]
    for path in (
        "/api/v1/customers/nobody",
        "/api/v1/customers?page=0",
        "/api/v1/customers?per_page=101",
        "/api/v1/customers?page=x",
    ):
        ours, peer = both.request("GET", path)
        assert ours[0] in (400, 404)
        same_error(ours, peer)

"""GET /api/v1/customers with filters and sort: each filter alone and combined, totals, sort
with ties, paging while others write, every invalid_filters case, and the same answers from
both backends."""

import json
import random
from urllib.parse import quote

import pytest
import requests
from support.databases import answers_of_both_backends
from support.load import walk_pages_while_inserting
from support.service import AUTH, post_customer

from customers_service.backends import shared
from customers_service.backends.sqlite import connections as sqlite_connections
from customers_service.backends.sqlite import customers as sqlite_customers
from customers_service.backends.sqlite import schema as sqlite_schema

# name, legal_name, email, country, state, zipcode, metadata: each row chosen so that every
# filter below selects a known, small set.
PEOPLE = {
    "p1": ("École du Nord", None, "Info@Ecole.example", "FR", "IDF", "75001", {"plan": "pro"}),
    "p2": ("ecole sans accent", "Acme 100%", "b@x.example", "fr", "ARA", "69001", {"plan": "free"}),
    "p3": ("Straße GmbH", "STRASSE_AG", "c@x.example", "DE", "BE", "10115", {"plan": "pro"}),
    "p4": ("Gavin Belson", "Hooli", "gavin@hooli.example", "US", "CA", "91364", {}),
    "p5": ("Σίσυφος", None, None, "GR", None, None, {"plan": "pro", "tier": "1"}),
    "p6": ('Quote "Q" Ltd', "under_score", "E@X.EXAMPLE", "US", "NY", "10001", {"Plan": "pro"}),
}


def load_people(client) -> None:
    for customer_id, (name, legal, email, country, state, zipcode, metadata) in PEOPLE.items():
        customer = {
            "customer_id": customer_id,
            "name": name,
            "legal_name": legal,
            "email": email,
            "country": country,
            "state": state,
            "zipcode": zipcode,
            "metadata": metadata,
        }
        assert post_customer(client, customer).status_code == 200


def listed(client, query: str) -> tuple[list[str], dict]:
    response = client.get(f"/api/v1/customers?{query}", headers=AUTH)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    return [c["customer_id"] for c in body["customers"]], body["meta"]


def selected(client, query: str) -> set[str]:
    ids, meta = listed(client, query + "&per_page=100")
    assert meta["total_count"] == len(ids)
    return set(ids)


SELECTIONS = [
    # search_term: anywhere in customer_id, name, legal_name or email, ignoring case
    ("search_term=%C3%89COLE", {"p1"}),  # ÉCOLE finds École; accents still count
    ("search_term=ecole", {"p1", "p2"}),  # in p1's email, p2's name
    ("search_term=ECOLE.EX", {"p1"}),
    ("search_term=strasse", {"p3"}),  # Straße folds to strasse; STRASSE_AG too
    ("search_term=%CE%A3%CE%99%CE%A3", set()),  # ΣΙΣ is not σίσ: accents count
    ("search_term=%CF%83%CE%AF%CF%83", {"p5"}),  # σίσ
    ("search_term=hooli", {"p4"}),
    ("search_term=P4", {"p4"}),  # customer_id
    ("search_term=100%25", {"p2"}),  # % is a plain character
    ("search_term=%25", {"p2"}),
    ("search_term=_", {"p3", "p6"}),  # so is _
    ("search_term=r_s", {"p6"}),
    ("search_term=%22Q%22", {"p6"}),  # a double quote
    ("search_term=zzzz", set()),
    ("search_term=e", {"p1", "p2", "p3", "p4", "p6"}),  # shorter than a trigram
    # customer_id: exactly
    ("customer_id=p3", {"p3"}),
    ("customer_id=P3", set()),
    ("customer_id=p", set()),
    # email: exactly, ignoring case
    ("email=info%40ecole.example", {"p1"}),
    ("email=e%40x.example", {"p6"}),
    ("email=ecole.example", set()),
    ("email=not%20an%20address", set()),
    # countries[], states[], zipcodes[]: any of them
    ("countries[]=fr", {"p1", "p2"}),
    ("countries[]=US&countries[]=gr", {"p4", "p5", "p6"}),
    ("countries[]=JP", set()),
    ("states[]=CA&states[]=NY", {"p4", "p6"}),
    ("states[]=ca", set()),
    ("zipcodes[]=75001", {"p1"}),
    # metadata[KEY]=VALUE: exactly; keys are case-sensitive; several keys are all needed
    ("metadata[plan]=pro", {"p1", "p3", "p5"}),
    ("metadata[Plan]=pro", {"p6"}),
    ("metadata[plan]=pr", set()),
    ("metadata[plan]=pro&metadata[tier]=1", {"p5"}),
    # combined: AND across filters, OR within one
    ("countries[]=FR&countries[]=DE&metadata[plan]=pro", {"p1", "p3"}),
    ("search_term=ecole&countries[]=FR&states[]=ARA", {"p2"}),
    ("search_term=e&countries[]=US&email=E%40x.example", {"p6"}),
]


def test_each_filter_selects_what_the_contract_says(client):
    load_people(client)
    wrong = {
        query: (selected(client, query), expected)
        for query, expected in SELECTIONS
        if selected(client, query) != expected
    }
    assert wrong == {}  # query: (selected, expected)


def test_no_filter_selects_everyone(client):
    load_people(client)
    assert selected(client, "page=1") == set(PEOPLE)


def test_meta_counts_what_the_filters_select_across_pages(client):
    load_people(client)
    ids, meta = listed(client, "metadata[plan]=pro&per_page=2")
    assert ids == ["p5", "p3"]
    assert meta == {
        "current_page": 1,
        "next_page": 2,
        "prev_page": None,
        "total_pages": 2,
        "total_count": 3,
    }
    ids, meta = listed(client, "metadata[plan]=pro&per_page=2&page=2")
    assert ids == ["p1"] and meta["next_page"] is None
    ids, meta = listed(client, "metadata[plan]=pro&per_page=2&page=9")
    assert ids == [] and meta["total_count"] == 3


def test_a_filtered_list_that_selects_nothing_has_zero_totals(client):
    load_people(client)
    ids, meta = listed(client, "countries[]=JP")
    assert ids == [] and meta["total_count"] == 0 and meta["total_pages"] == 0


def set_times(backend, times: dict[str, tuple[str, str]]) -> None:
    backend.execute_many(
        "UPDATE customers SET created_at = ?, updated_at = ? WHERE customer_id = ?",
        [(created, updated, customer_id) for customer_id, (created, updated) in times.items()],
    )


TIMES = {  # created_at, updated_at
    "p1": ("2022-01-01T00:00:00Z", "2022-06-01T00:00:00Z"),
    "p2": ("2022-01-01T00:00:00Z", "2022-03-01T00:00:00Z"),  # ties p1 on created_at
    "p3": ("2022-02-01T00:00:00Z", "2022-02-01T00:00:00Z"),
    "p4": ("2022-03-01T12:00:00Z", "2022-06-01T00:00:00Z"),  # ties p1 on updated_at
    "p5": ("2022-04-01T00:00:00Z", "2022-04-01T00:00:00Z"),
    "p6": ("2022-05-01T00:00:00Z", "2022-05-01T00:00:00Z"),
}


@pytest.mark.parametrize(
    ("sort", "order"),
    [
        ("", ["p6", "p5", "p4", "p3", "p2", "p1"]),
        ("sort=-created_at", ["p6", "p5", "p4", "p3", "p2", "p1"]),
        ("sort=created_at", ["p1", "p2", "p3", "p4", "p5", "p6"]),
        ("sort=-updated_at", ["p4", "p1", "p6", "p5", "p2", "p3"]),
        ("sort=updated_at", ["p3", "p2", "p5", "p6", "p1", "p4"]),
    ],
)
def test_sort_both_ways_with_ties_broken_by_insertion_order(client, backend, sort, order):
    load_people(client)
    set_times(backend, TIMES)
    assert listed(client, sort)[0] == order
    pages = [listed(client, f"{sort}&per_page=4&page={page}")[0] for page in (1, 2)]
    assert pages[0] + pages[1] == order


TIME_SELECTIONS = [
    ("created_at[gte]=2022-02-01T00:00:00Z", {"p3", "p4", "p5", "p6"}),
    ("created_at[lt]=2022-02-01T00:00:00Z", {"p1", "p2"}),
    ("created_at[gte]=2022-02-01T00:00:00.001Z", {"p4", "p5", "p6"}),  # fractions count
    ("created_at[lt]=2022-02-01T00:00:00.5Z", {"p1", "p2", "p3"}),
    ("created_at[gte]=2022-03-01T13:00:00%2B01:00", {"p4", "p5", "p6"}),  # 12:00 UTC
    ("created_at[gte]=2022-03-01T13:00:01%2B01:00", {"p5", "p6"}),
    ("created_at[lt]=2022-03-01T07:00:00-05:00", {"p1", "p2", "p3"}),
    (
        "created_at[gte]=2022-01-01t00:00:00z&created_at[lt]=2022-03-01T00:00:00Z",
        {"p1", "p2", "p3"},
    ),
    ("updated_at[gte]=2022-05-01T00:00:00Z", {"p1", "p4", "p6"}),
    ("updated_at[lt]=2022-03-01T00:00:00Z", {"p3"}),
    ("updated_at[gte]=2022-04-01T00:00:00Z&countries[]=US", {"p4", "p6"}),
    ("created_at[gte]=0001-01-01T00:00:00%2B01:00", set(PEOPLE)),  # before year 1 in UTC
    ("created_at[lt]=0001-01-01T00:00:00%2B01:00", set()),
    ("created_at[gte]=9999-12-31T23:59:59.5Z", set()),  # after 9999 in UTC
    ("created_at[lt]=9999-12-31T23:00:00-05:00", set(PEOPLE)),
    ("created_at[lt]=2022-01-31T23:59:60Z", {"p1", "p2"}),  # a leap second: before 02-01
    ("created_at[gte]=2022-01-31T23:59:60Z", {"p3", "p4", "p5", "p6"}),
    ("created_at[gte]=2022-02-01T04:59:59.5%2B05:00", {"p3", "p4", "p5", "p6"}),  # UTC, then up
]


def test_time_filters_at_or_after_and_strictly_before(client, backend):
    load_people(client)
    set_times(backend, TIMES)
    wrong = {
        query: (selected(client, query), expected)
        for query, expected in TIME_SELECTIONS
        if selected(client, query) != expected
    }
    assert wrong == {}  # query: (selected, expected)


def test_sort_by_updated_at_with_updated_at_gte_syncs_changes_since_a_time(client, backend):
    load_people(client)
    set_times(backend, TIMES)
    ids, _ = listed(client, "sort=updated_at&updated_at[gte]=2022-04-01T00:00:00Z")
    assert ids == ["p5", "p6", "p1", "p4"]
    post_customer(client, {"customer_id": "p3", "name": "Changed"})  # updated now
    ids, _ = listed(client, "sort=updated_at&updated_at[gte]=2022-04-01T00:00:00Z")
    assert ids == ["p5", "p6", "p1", "p4", "p3"]


def test_more_metadata_pairs_than_a_customer_may_hold_select_nobody(client):
    load_people(client)
    pairs = "&".join(f"metadata[k{i}]=v" for i in range(120))
    ids, meta = listed(client, pairs)
    assert ids == [] and meta["total_count"] == 0
    fifty = "&".join(f"metadata[k{i}]=v" for i in range(50))
    post_customer(
        client, {"customer_id": "m", "name": "M", "metadata": {f"k{i}": "v" for i in range(50)}}
    )
    assert selected(client, fifty) == {"m"}


def test_filters_follow_updates_and_deletes(client):
    load_people(client)
    post_customer(client, {"customer_id": "p4", "name": "N", "country": "FR", "metadata": None})
    post_customer(client, {"customer_id": "p1", "name": "N", "metadata": {"plan": None}})
    client.delete("/api/v1/customers/p3", headers=AUTH)
    assert selected(client, "countries[]=FR") == {"p1", "p2", "p4"}
    assert selected(client, "metadata[plan]=pro") == {"p5"}
    assert selected(client, "search_term=ecole") == {"p1", "p2"}  # p1's email is still there
    assert selected(client, "search_term=strasse") == set()
    assert selected(client, "search_term=hooli") == {"p4"}  # legal_name absent: kept
    post_customer(client, {"customer_id": "p4", "name": "N", "legal_name": None})
    assert selected(client, "search_term=hooli") == {"p4"}  # still in its email
    post_customer(client, {"customer_id": "p4", "name": "N", "email": "new@x.example"})
    assert selected(client, "search_term=hooli") == set()
    assert selected(client, "email=NEW%40X.example") == {"p4"}


LONG = "x" * 256


@pytest.mark.parametrize(
    ("query", "details"),
    [
        ("foo=1", {"foo": ["unknown_parameter"]}),
        ("countries=FR", {"countries": ["unknown_parameter"]}),  # the [] is part of the name
        ("metadata=x", {"metadata": ["unknown_parameter"]}),
        ("search=x", {"search": ["unknown_parameter"]}),
        ("search_term=", {"search_term": ["value_is_empty"]}),
        (f"search_term={LONG}", {"search_term": ["value_is_too_long"]}),
        ("search_term=a%00b", {"search_term": ["invalid_character"]}),
        ("search_term=a&search_term=b", {"search_term": ["repeated_parameter"]}),
        ("customer_id=a&customer_id=b", {"customer_id": ["repeated_parameter"]}),
        ("email=a%00", {"email": ["invalid_character"]}),
        ("countries[]=ZZ", {"countries[]": ["not_a_valid_country_code"]}),
        ("countries[]=FR&countries[]=", {"countries[]": ["not_a_valid_country_code"]}),
        ("countries[]=USA", {"countries[]": ["not_a_valid_country_code"]}),
        ("&".join(["countries[]=FR"] * 101), {"countries[]": ["too_many_values"]}),
        ("states[]=a%00", {"states[]": ["invalid_character"]}),
        ("metadata[]=v", {"metadata[]": ["invalid_metadata_key"]}),
        ("metadata[%20]=v", {"metadata[ ]": ["invalid_metadata_key"]}),
        (f"metadata[{'k' * 41}]=v", {f"metadata[{'k' * 41}]": ["invalid_metadata_key"]}),
        ("metadata[a[b]=v", {"metadata[a[b]": ["invalid_metadata_key"]}),
        ("metadata[a]b]=v", {"metadata[a]b]": ["invalid_metadata_key"]}),
        (f"metadata[k]={'v' * 501}", {"metadata[k]": ["value_is_too_long"]}),
        ("metadata[k]=a%00", {"metadata[k]": ["invalid_character"]}),
        ("metadata[k]=a&metadata[k]=b", {"metadata[k]": ["repeated_parameter"]}),
        ("created_at[gte]=2022-01-01", {"created_at[gte]": ["invalid_timestamp"]}),
        ("created_at[gte]=2022-01-01T00:00:00", {"created_at[gte]": ["invalid_timestamp"]}),
        ("created_at[lt]=2022-02-30T00:00:00Z", {"created_at[lt]": ["invalid_timestamp"]}),
        ("updated_at[gte]=yesterday", {"updated_at[gte]": ["invalid_timestamp"]}),
        ("updated_at[lt]=1651222791", {"updated_at[lt]": ["invalid_timestamp"]}),
        ("created_at[gt]=2022-01-01T00:00:00Z", {"created_at[gt]": ["unknown_parameter"]}),
        ("created_at=2022-01-01T00:00:00Z", {"created_at": ["unknown_parameter"]}),
        ("sort=name", {"sort": ["invalid_sort"]}),
        ("sort=-created_at&sort=created_at", {"sort": ["repeated_parameter"]}),
        (
            "foo=1&countries[]=ZZ&sort=x",
            {
                "foo": ["unknown_parameter"],
                "countries[]": ["not_a_valid_country_code"],
                "sort": ["invalid_sort"],
            },
        ),
    ],
)
def test_every_bad_filter_is_400_invalid_filters_naming_it(client, db_path, query, details):
    """Refused before any database is read: on SQLite only (db_path), as on both it is the
    same code."""
    response = client.get(f"/api/v1/customers?{query}", headers=AUTH)
    assert response.status_code == 400
    assert response.get_json() == {
        "status": 400,
        "error": "Bad Request",
        "code": "invalid_filters",
        "error_details": details,
    }


def test_bad_pagination_is_reported_before_bad_filters(client):
    response = client.get("/api/v1/customers?page=0&foo=1", headers=AUTH)
    assert response.get_json()["code"] == "invalid_pagination"
    response = client.get("/api/v1/customers?page=1&page=2", headers=AUTH)
    assert response.get_json()["error_details"] == {"page": ["repeated_parameter"]}


@pytest.mark.system
def test_paging_a_filtered_list_while_others_insert_misses_no_customer(server):
    """Customers in FR and DE are inserted while a client walks the FR list newest first: each
    FR customer there before the walk is seen, and no DE customer ever is."""
    url = server.url + "/api/v1/customers"
    with requests.Session() as session:
        session.headers.update(AUTH)
        for i in range(40):
            country = "FR" if i % 2 else "DE"
            body = {"customer": {"customer_id": f"before-{i}", "name": "N", "country": country}}
            session.post(url, json=body).raise_for_status()
    pages, inserted = walk_pages_while_inserting(
        server.url,
        {"countries[]": "fr", "per_page": 3},
        lambda i: {"customer_id": f"during-{i}", "name": "N", "country": "FR" if i % 2 else "DE"},
        at_most=300,
    )
    assert all(body["meta"]["total_count"] >= 20 for body in pages)
    seen = [(c["customer_id"], c["country"]) for body in pages for c in body["customers"]]
    assert {f"before-{i}" for i in range(1, 40, 2)} <= {customer_id for customer_id, _ in seen}
    assert {country for _, country in seen} == {"FR"}
    assert inserted, "the writer ran during the walk"


# --- the same answers from both backends ------------------------------------------------------

WORDS = ["école", "ÉCOLE", "Straße", "acme", "ACME", "Σίσυφος", "café", "100%", "a_b", "zoë"]


def random_people(count: int) -> list[dict]:
    """Customers with overlapping names, countries, states and metadata, the same every run."""
    rng = random.Random(20221125)
    people = []
    for i in range(count):
        metadata = {k: rng.choice(["a", "b", "c"]) for k in rng.sample(["plan", "tier", "Plan"], 2)}
        people.append(
            {
                "customer_id": f"r{i:03d}-{rng.choice(WORDS)}",
                "name": f"{rng.choice(WORDS)} {rng.choice(WORDS)}",
                "legal_name": rng.choice([None, *WORDS]),
                "email": rng.choice([None, f"U{i % 7}@Example.test", f"u{i % 7}@example.TEST"]),
                "country": rng.choice(["FR", "de", "US", None]),
                "state": rng.choice(["CA", "NY", None]),
                "zipcode": rng.choice(["75001", "10115", None]),
                "metadata": metadata,
            }
        )
    return people


COMPARED_QUERIES = [
    "",
    "sort=created_at",
    "sort=-updated_at",
    "sort=updated_at&updated_at[gte]=2022-01-05T00:00:00Z",
    "created_at[gte]=2022-01-02T00:00:00Z&created_at[lt]=2022-01-04T00:00:00%2B02:00",
    *(f"search_term={quote(term)}" for term in ["ÉCOLE", "strasse", "acme", "%", "_", "é", "ΣΊΣ"]),
    "email=u3%40example.test",
    "countries[]=fr&countries[]=DE",
    "states[]=CA&zipcodes[]=10115",
    "metadata[plan]=a",
    "metadata[plan]=a&metadata[tier]=b",
    "metadata[Plan]=c&countries[]=US&sort=created_at",
    "search_term=CAF%C3%89",
    "search_term=caf%C3%A9&states[]=NY&sort=-updated_at",
]


@pytest.mark.postgres
def test_both_backends_give_the_same_answer_to_every_filter(postgres, tmp_path):
    """The same customers (lago_id and times included, through an import) in both backends,
    and every page of every compared query, byte for byte."""
    source = tmp_path / "people.jsonl"
    with source.open("w") as out:
        for i, person in enumerate(random_people(200)):
            restored = {
                **person,
                "lago_id": f"0190a3c4-5b6d-7e8f-9a0b-1c2d3e4f{i:04d}",
                "created_at": f"2022-01-{1 + i % 9:02d}T00:00:00Z",
                "updated_at": f"2022-01-{1 + i % 7:02d}T00:00:00Z",
            }
            out.write(json.dumps(restored) + "\n")
    answers = answers_of_both_backends(
        postgres,
        tmp_path,
        source,
        lambda client: {query: all_pages(client, query) for query in COMPARED_QUERIES},
    )
    for query in COMPARED_QUERIES:
        assert answers["sqlite"][query] == answers["postgres"][query], query
    selecting_none_or_all = [
        query
        for query in COMPARED_QUERIES[5:]
        if not 0 < json.loads(answers["sqlite"][query][0])["meta"]["total_count"] < 200
    ]
    assert selecting_none_or_all == []


def all_pages(client, query: str) -> list[bytes]:
    """Every page of a query, as the bytes the API sent."""
    pages, page = [], 1
    while page is not None:
        response = client.get(f"/api/v1/customers?{query}&per_page=37&page={page}", headers=AUTH)
        assert response.status_code == 200, (query, response.get_json())
        pages.append(response.data)
        page = response.get_json()["meta"]["next_page"]
    return pages


def test_sqlites_two_ways_to_a_page_and_its_counts_agree(tmp_path, db_path):
    """SQLite reads a page through the filters' indexes or by walking the sort's index, and
    counts a lone search term or metadata pair in its own index: each way, the same answer."""
    from customers_service import storage
    from customers_service.storage import Filters

    conn = sqlite_connections.connect(str(db_path), create=True)
    sqlite_schema.migrate(conn)
    with conn:
        sqlite_customers.upsert_batch(
            conn, [shared.upsert_params(p, "2022-01-01T00:00:00Z") for p in random_people(300)]
        )
    cases = [
        Filters(search=storage.fold("école")),
        Filters(search=storage.fold("acme"), countries=("FR", "DE")),
        Filters(search="é"),
        Filters(metadata={"plan": "a"}),
        Filters(metadata={"plan": "a", "tier": "b"}, sort="updated_at", descending=False),
        Filters(metadata={"Plan": "c"}, search=storage.fold("zoë")),
        Filters(states=("CA",), zipcodes=("10115",)),
    ]
    for filters in cases:
        orders = []
        for walk in (False, True):
            where, params = sqlite_customers.filter_sql(filters, walk=walk)
            order = sqlite_customers.order_sql(filters)
            query = f"SELECT customer_id FROM customers WHERE {where} ORDER BY {order}"
            orders.append([row[0] for row in conn.execute(query, params)])
        assert orders[0] == orders[1], filters
        assert 0 < len(orders[0]) < 300, filters
        assert sqlite_customers.count_selected(conn, filters) == len(orders[0]), filters
        everyone = sqlite_customers.count_customers(conn)
        for offset in (0, 7, len(orders[0]) - 1):
            sql, params = sqlite_customers.page_query(filters, offset, 5, len(orders[0]), everyone)
            page = [row["customer_id"] for row in conn.execute(sql, params)]
            assert page == orders[0][offset : offset + 5], filters
    conn.close()

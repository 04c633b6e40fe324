"""Customer metadata: its rules and error codes, the merge rule (RFC 7396, one level down), the
50-key limit on the merged result, and metadata through import, export and migration."""

import json
import threading

import pytest
import requests
from support.data import SEED
from support.service import AUTH, post_customer

from customers_service import storage


def get(client, customer_id: str = "c1") -> dict:
    return client.get(f"/api/v1/customers/{customer_id}", headers=AUTH).get_json()["customer"]


def upsert(client, metadata=..., **fields):
    """POST customer c1 with this metadata (left out when not given)."""
    customer = {"customer_id": "c1", "name": "N", **fields}
    if metadata is not ...:
        customer["metadata"] = metadata
    return post_customer(client, customer)


def metadata_errors(response) -> list[str]:
    assert response.status_code == 422, response.get_json()
    return response.get_json()["error_details"]["metadata"]


def test_metadata_is_in_every_customer_object(client):
    created = upsert(client, {"plan": "pro", "crm_id": "48213"}).get_json()["customer"]
    assert created["metadata"] == {"crm_id": "48213", "plan": "pro"}
    assert list(created) == [
        "lago_id",
        *storage.FIELDS,
        "metadata",
        "created_at",
        "updated_at",
    ]
    assert get(client)["metadata"] == {"crm_id": "48213", "plan": "pro"}
    listed = client.get("/api/v1/customers", headers=AUTH).get_json()["customers"]
    assert listed[0]["metadata"] == {"crm_id": "48213", "plan": "pro"}
    deleted = client.delete("/api/v1/customers/c1", headers=AUTH).get_json()["customer"]
    assert deleted["metadata"] == {"crm_id": "48213", "plan": "pro"}


def test_a_customer_without_metadata_has_an_empty_object(client):
    assert post_customer(client, SEED).get_json()["customer"]["metadata"] == {}
    assert get(client, SEED["customer_id"])["metadata"] == {}


def test_keys_come_in_code_point_order_whatever_order_they_were_sent_in(client):
    upsert(client, {"b": "2", "a": "1", "B": "3", "é": "4"})
    upsert(client, {"0": "5"})
    body = client.get("/api/v1/customers/c1", headers=AUTH).get_data(as_text=True)
    assert '"metadata":{"0":"5","B":"3","a":"1","b":"2","\\u00e9":"4"}' in body


def test_keys_are_case_sensitive_and_kept_exactly_as_sent(client):
    upsert(client, {"Plan": "a", "plan": "b", " spaced key ": "c", "ünï": "d"})
    assert get(client)["metadata"] == {"Plan": "a", "plan": "b", " spaced key ": "c", "ünï": "d"}


def test_the_longest_key_and_value_and_fifty_keys_are_accepted(client):
    metadata = {f"k{i:02d}": "v" for i in range(49)}
    metadata["k" * 40] = "v" * 500
    assert upsert(client, metadata).status_code == 200
    assert get(client)["metadata"] == metadata


@pytest.mark.parametrize(
    ("metadata", "codes"),
    [
        ("pro", ["invalid_type"]),
        (["plan", "pro"], ["invalid_type"]),
        (5, ["invalid_type"]),
        (True, ["invalid_type"]),
        ({"": "v"}, ["invalid_metadata_key"]),
        ({"   ": "v"}, ["invalid_metadata_key"]),
        ({"\t\n": "v"}, ["invalid_metadata_key"]),
        ({"k" * 41: "v"}, ["invalid_metadata_key"]),
        ({"a[b": "v"}, ["invalid_metadata_key"]),
        ({"a]": "v"}, ["invalid_metadata_key"]),
        ({"k\0": "v"}, ["invalid_character"]),
        ({"k": 1}, ["invalid_type"]),
        ({"k": 1.5}, ["invalid_type"]),
        ({"k": True}, ["invalid_type"]),
        ({"k": {"nested": "v"}}, ["invalid_type"]),
        ({"k": ["v"]}, ["invalid_type"]),
        ({"k": "v" * 501}, ["value_is_too_long"]),
        ({"k": "v\0"}, ["invalid_character"]),
        ({f"k{i}": "v" for i in range(51)}, ["too_many_metadata_keys"]),
        (
            {"": 1, "ok": "v" * 501, "[x]": None},
            ["invalid_metadata_key", "invalid_type", "value_is_too_long"],
        ),
    ],
)
def test_each_metadata_error_is_listed_under_metadata(client, metadata, codes):
    response = upsert(client, metadata)
    assert metadata_errors(response) == codes
    assert response.get_json()["code"] == "validation_errors"
    assert client.get("/api/v1/customers/c1", headers=AUTH).status_code == 404


def test_metadata_errors_come_with_the_other_fields_errors(client):
    response = post_customer(
        client, {"customer_id": "c1", "name": "", "country": "ZZ", "metadata": {"k": 1}}
    )
    assert response.status_code == 422
    assert response.get_json()["error_details"] == {
        "name": ["value_is_mandatory"],
        "country": ["not_a_valid_country_code"],
        "metadata": ["invalid_type"],
    }


def test_fifty_one_keys_of_which_one_is_null_are_accepted_on_create(client):
    metadata = {f"k{i}": "v" for i in range(50)} | {"gone": None}
    assert upsert(client, metadata).status_code == 200
    assert len(get(client)["metadata"]) == 50


# --- the merge rule, case by case -----------------------------------------------------------


def test_a_key_with_a_string_sets_that_key_and_keeps_the_others(client):
    upsert(client, {"plan": "free", "crm_id": "1"})
    response = upsert(client, {"plan": "pro", "region": "eu"})
    assert response.get_json()["customer"]["metadata"] == {
        "crm_id": "1",
        "plan": "pro",
        "region": "eu",
    }


def test_a_key_with_null_removes_it(client):
    upsert(client, {"plan": "free", "crm_id": "1"})
    assert upsert(client, {"plan": None}).get_json()["customer"]["metadata"] == {"crm_id": "1"}


def test_removing_a_key_that_is_not_there_changes_nothing(client):
    upsert(client, {"crm_id": "1"})
    assert upsert(client, {"nope": None}).get_json()["customer"]["metadata"] == {"crm_id": "1"}


def test_metadata_null_removes_every_key(client):
    upsert(client, {"plan": "free", "crm_id": "1"})
    assert upsert(client, None).get_json()["customer"]["metadata"] == {}
    assert get(client)["metadata"] == {}


def test_no_metadata_keeps_every_key(client):
    upsert(client, {"plan": "free"})
    response = upsert(client, name="Renamed")
    assert response.get_json()["customer"]["metadata"] == {"plan": "free"}
    assert response.get_json()["customer"]["name"] == "Renamed"


def test_an_empty_object_keeps_every_key(client):
    upsert(client, {"plan": "free"})
    assert upsert(client, {}).get_json()["customer"]["metadata"] == {"plan": "free"}


def test_null_metadata_on_create_is_an_empty_object(client):
    assert upsert(client, None).get_json()["customer"]["metadata"] == {}


def test_a_null_value_on_create_is_not_stored(client):
    assert upsert(client, {"a": None, "b": "2"}).get_json()["customer"]["metadata"] == {"b": "2"}


def test_an_empty_string_is_a_value(client):
    assert upsert(client, {"a": ""}).get_json()["customer"]["metadata"] == {"a": ""}


def test_a_metadata_change_moves_updated_at_and_nothing_else(client, backend):
    upsert(client, {"a": "1"}, country="FR")
    backend.execute_many(
        "UPDATE customers SET created_at = ?, updated_at = ?",
        [("2020-01-01T00:00:00Z", "2020-01-01T00:00:00Z")],
    )
    after = upsert(client, {"a": "2"}).get_json()["customer"]
    assert after["created_at"] == "2020-01-01T00:00:00Z"
    assert after["updated_at"] > "2020-01-01T00:00:00Z"
    assert after["country"] == "FR"


# --- the 50-key limit on the merged result ----------------------------------------------------


def test_a_merge_past_fifty_keys_is_a_422_and_changes_nothing(client):
    upsert(client, {f"old{i}": "v" for i in range(30)}, city="Paris")
    before = get(client)
    response = post_customer(
        client,
        {
            "customer_id": "c1",
            "name": "Other",
            "city": "Lyon",
            "metadata": {f"new{i}": "v" for i in range(21)},
        },
    )
    assert response.status_code == 422
    assert response.get_json()["error_details"] == {"metadata": ["too_many_metadata_keys"]}
    assert get(client) == before


def test_a_merge_to_exactly_fifty_keys_is_accepted(client):
    upsert(client, {f"old{i}": "v" for i in range(30)})
    assert upsert(client, {f"new{i}": "v" for i in range(20)}).status_code == 200
    assert len(get(client)["metadata"]) == 50


def test_removals_in_the_same_request_make_room(client):
    upsert(client, {f"old{i}": "v" for i in range(50)})
    response = upsert(client, {"old0": None, "old1": None, "new0": "v", "new1": "v"})
    assert response.status_code == 200
    metadata = response.get_json()["customer"]["metadata"]
    assert len(metadata) == 50 and "new1" in metadata and "old0" not in metadata


def test_overwriting_keys_at_fifty_is_accepted(client):
    full = {f"k{i}": "v" for i in range(50)}
    upsert(client, full)
    assert upsert(client, {"k0": "changed"}).status_code == 200
    assert get(client)["metadata"]["k0"] == "changed"


@pytest.mark.system
def test_concurrent_merges_of_different_keys_keep_them_all(server):
    """Each request adds its own keys to one customer at once: the merge happens inside the
    database's write, so none is lost."""
    url = server.url + "/api/v1/customers"
    requests.post(url, json={"customer": {"customer_id": "m", "name": "N"}}, headers=AUTH)
    statuses = []

    def add_keys(worker: int) -> None:
        with requests.Session() as session:
            for i in range(5):
                body = {"customer_id": "m", "name": "N", "metadata": {f"w{worker}-{i}": "v"}}
                statuses.append(
                    session.post(url, json={"customer": body}, headers=AUTH).status_code
                )

    threads = [threading.Thread(target=add_keys, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 40
    stored = requests.get(url + "/m", headers=AUTH).json()["customer"]["metadata"]
    assert stored == {f"w{w}-{i}": "v" for w in range(8) for i in range(5)}


# --- import and export ----------------------------------------------------------------------


def invoke(runner, *args):
    return runner.invoke(args=["customers", *args])


def test_import_jsonl_and_csv_carry_metadata_and_merge_it(runner, client, tmp_path):
    upsert(client, {"kept": "1", "changed": "old", "removed": "x"})
    jsonl = tmp_path / "in.jsonl"
    line = {"customer_id": "c1", "name": "N", "metadata": {"changed": "new", "removed": None}}
    jsonl.write_text(json.dumps(line) + "\n")
    assert invoke(runner, "import", str(jsonl)).exit_code == 0
    assert get(client)["metadata"] == {"kept": "1", "changed": "new"}
    csv_file = tmp_path / "in.csv"
    csv_file.write_text(
        "customer_id,name,metadata\n"
        'c2,Two,"{""plan"": ""pro"", ""crm_id"": ""7""}"\n'
        "c3,Three,\n"
        "c4,Four,not json\n"
        'c5,Five,"{""bad[key]"": ""v""}"\n'
    )
    result = invoke(runner, "import", str(csv_file))
    assert result.stdout.startswith("2 inserted, 0 updated, 0 unchanged, 2 rejected"), result.output
    assert 'line 4: rejected: {"metadata": ["invalid_json"]}' in result.stderr
    assert 'line 5: rejected: {"metadata": ["invalid_metadata_key"]}' in result.stderr
    assert get(client, "c2")["metadata"] == {"crm_id": "7", "plan": "pro"}
    assert get(client, "c3")["metadata"] == {}


def test_a_csv_metadata_cell_is_read_as_strictly_as_a_body(runner, client, tmp_path):
    csv_file = tmp_path / "in.csv"
    csv_file.write_text(
        "customer_id,name,metadata\n"
        'c1,One,"{""k"": ""\\ud800""}"\n'  # a lone surrogate
        'c2,Two,"{""k"": ""a"", ""k"": ""b""}"\n'  # a duplicate key
        f"c3,Three,{'[' * 5000}\n"  # runaway nesting
        'c4,Four,"{""k"": ""ok""}"\n'
    )
    result = invoke(runner, "import", str(csv_file))
    assert result.stdout.startswith("1 inserted, 0 updated, 0 unchanged, 3 rejected"), result.output
    for line in (2, 3, 4):
        assert f'line {line}: rejected: {{"metadata": ["invalid_json"]}}' in result.stderr
    assert get(client, "c4")["metadata"] == {"k": "ok"}


def test_an_import_merging_past_fifty_keys_rejects_that_row_only(runner, client, tmp_path):
    upsert(client, {f"old{i}": "v" for i in range(30)})
    path = tmp_path / "in.jsonl"
    rows = [
        {"customer_id": "a", "name": "A", "metadata": {"x": "1"}},
        {"customer_id": "c1", "name": "N", "metadata": {f"new{i}": "v" for i in range(21)}},
        {"customer_id": "b", "name": "B"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = invoke(runner, "import", str(path))
    assert result.exit_code == 1
    assert result.stdout.startswith("2 inserted, 0 updated, 0 unchanged, 1 rejected")
    assert 'line 2: rejected: {"metadata": ["too_many_metadata_keys"]}' in result.stderr
    assert len(get(client)["metadata"]) == 30
    assert get(client, "a")["metadata"] == {"x": "1"}


def test_export_carries_metadata_and_reimports_it(runner, client, tmp_path):
    upsert(client, {"b": "2", "a": "ünï"})
    exported = invoke(runner, "export").stdout.splitlines()
    assert json.loads(exported[0]) == {"customer": get(client)}
    assert '"metadata":{"a":"ünï","b":"2"}' in exported[0]
    client.delete("/api/v1/customers/c1", headers=AUTH)
    path = tmp_path / "export.jsonl"
    path.write_text("\n".join(exported) + "\n")
    assert invoke(runner, "import", str(path)).exit_code == 0
    assert get(client)["metadata"] == {"a": "ünï", "b": "2"}

"""The OpenAPI document, schemathesis against a live gunicorn, and /docs in a real Chromium."""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from flask import Flask
from openapi_spec_validator import validate
from support.data import SEED
from support.service import API_KEY, ROOT

from customers_service import storage
from customers_service.app import bp

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--virtual-time-budget=15000",
]


def test_document_is_valid_openapi(client):
    response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    validate(response.get_json())


def test_document_needs_no_key_and_the_api_does(client):
    document = client.get("/api/v1/openapi.json").get_json()
    assert document["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
    }
    assert document["security"] == [{"bearerAuth": []}]
    for path in ("/api/v1/openapi.json", "/health", "/docs"):
        assert document["paths"][path]["get"]["security"] == []


# The page's files, and the redirect of /docs/ to the page: not operations of the API.
NOT_OPERATIONS = {"customers.docs_asset", "customers.docs_with_slash"}


def test_every_route_is_in_the_document(app, client):
    document = client.get("/api/v1/openapi.json").get_json()
    documented = {
        (path, method.upper())
        for path, operations in document["paths"].items()
        for method in operations
    }
    routes = {
        (rule.rule.replace("<customer_id:customer_id>", "{customer_id}"), method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("customers.") and rule.endpoint not in NOT_OPERATIONS
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert routes == documented


def test_every_operation_documents_its_errors_and_request_id(client):
    document = client.get("/api/v1/openapi.json").get_json()
    post = document["paths"]["/api/v1/customers"]["post"]
    assert set(post["responses"]) == {"200", "400", "401", "413", "415", "422", "500", "503"}
    get_one = document["paths"]["/api/v1/customers/{customer_id}"]["get"]
    assert set(get_one["responses"]) == {"200", "401", "404", "500", "503"}
    for operations in document["paths"].values():
        for operation in operations.values():
            assert operation["summary"]
            for status, response in operation["responses"].items():
                if status != "414":  # gunicorn's own answer, before the service
                    assert "X-Request-Id" in response["headers"]


def test_the_request_schema_is_the_marshmallow_schema(client):
    document = client.get("/api/v1/openapi.json").get_json()
    schemas = document["components"]["schemas"]
    customer_input = schemas["CustomerInput"]
    assert set(customer_input["properties"]) == {*storage.FIELDS, "metadata"}
    assert set(customer_input["required"]) == {"customer_id", "name"}
    assert customer_input["properties"]["name"]["maxLength"] == 255
    assert customer_input["properties"]["url"]["maxLength"] == 2048
    assert customer_input["properties"]["email"]["type"] == ["string", "null"]
    metadata = customer_input["properties"]["metadata"]
    assert metadata["maxProperties"] == 50
    assert metadata["propertyNames"]["maxLength"] == 40
    assert metadata["additionalProperties"]["maxLength"] == 500
    assert all(p.get("description") for p in customer_input["properties"].values())
    assert set(schemas["Customer"]["properties"]) == set(storage.COLUMNS)
    example = document["paths"]["/api/v1/customers"]["post"]["requestBody"]["content"][
        "application/json"
    ]["example"]
    assert example == {"customer": SEED}  # the seed's example, less its trailing comma


def test_every_list_parameter_is_in_the_document(client):
    document = client.get("/api/v1/openapi.json").get_json()
    parameters = document["paths"]["/api/v1/customers"]["get"]["parameters"]
    by_name = {p["name"]: p for p in parameters}
    assert set(by_name) == {
        "page",
        "per_page",
        "search_term",
        "customer_id",
        "email",
        "countries[]",
        "states[]",
        "zipcodes[]",
        "metadata",
        "created_at[gte]",
        "created_at[lt]",
        "updated_at[gte]",
        "updated_at[lt]",
        "sort",
    }
    assert by_name["metadata"]["style"] == "deepObject"
    assert by_name["countries[]"]["schema"]["type"] == "array"
    assert by_name["created_at[gte]"]["schema"]["format"] == "date-time"
    assert by_name["sort"]["schema"]["enum"] == [
        "-created_at",
        "created_at",
        "-updated_at",
        "updated_at",
    ]


def test_document_paths_follow_the_blueprints_prefix(tmp_path):
    host = Flask("host", instance_path=str(tmp_path))
    host.config["CUSTOMERS_API_KEYS"] = [API_KEY]
    host.register_blueprint(bp, url_prefix="/billing")
    document = host.test_client().get("/billing/api/v1/openapi.json").get_json()
    assert "/billing/api/v1/customers/{customer_id}" in document["paths"]
    validate(document)


def test_docs_assets_are_served_locally(client):
    page = client.get("/docs").get_data(as_text=True)
    assert "http://" not in page and "https://" not in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        with client.get(f"/docs/assets/{asset}") as response:
            assert response.status_code == 200


@pytest.mark.system
def test_schemathesis_finds_nothing_against_a_live_gunicorn(server):
    command = [
        str(Path(ROOT / ".venv" / "bin" / "st")),
        "--config-file",
        str(ROOT / "tests" / "schemathesis.toml"),
        "run",
        server.url + "/api/v1/openapi.json",
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--max-examples",
        "150",
        "--no-color",
    ]
    if os.environ.get("CI"):  # the same cases every CI run; new ones on every run by hand
        command += ["--seed", "20221125"]
    if not Path(command[0]).exists():
        command[0] = shutil.which("st") or "st"
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    failures = result.stdout[result.stdout.find("FAILURES") :]
    assert result.returncode == 0, failures[:5000] + failures[-1500:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout
    assert "status=200" in server.log()
    assert not re.search(r"status=5\d\d", server.log())


@pytest.fixture(scope="session")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it")
    return path


@pytest.mark.system
def test_docs_page_renders_every_operation_in_chromium(server, chromium):
    ARTIFACTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom"]
            + [server.url + "/docs"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1400"]
            + [f"--screenshot={ARTIFACTS / 'docs.png'}", server.url + "/docs"],
            capture_output=True,
            timeout=120,
        )
    # What the browser built from the document, not what the server sent: the page's HTML
    # has none of these; Swagger UI renders them after fetching openapi.json.
    for operation_id in (
        "upsert_customer",
        "get_customer",
        "list_customers",
        "delete_customer",
        "events_feed",
        "health",
    ):
        assert (
            f'href="#/customers/{operation_id}"' in dom or f'href="#/service/{operation_id}"' in dom
        )
    assert 'data-path="/api/v1/customers/{customer_id}"' in dom
    assert "Authorize" in dom
    assert (ARTIFACTS / "docs.png").stat().st_size > 10_000
    assert "path=/api/v1/openapi.json status=200" in server.log()


def test_docs_page_html_alone_has_no_operations(client):
    page = client.get("/docs").get_data(as_text=True)
    assert "upsert_customer" not in page


def test_the_webhooks_are_documented_with_their_headers_and_body(client):
    document = client.get("/api/v1/openapi.json").json
    assert set(document["webhooks"]) == {"customer.created", "customer.updated", "customer.deleted"}
    for webhook in document["webhooks"].values():
        post = webhook["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/Event"}
        headers = {p["name"] for p in post["parameters"] if p["in"] == "header"}
        assert headers == {"X-Lago-Unique-Key", "X-Lago-Signature-Algorithm", "X-Lago-Signature"}
    event = document["components"]["schemas"]["Event"]
    assert event["properties"]["customer"]["$ref"] == "#/components/schemas/Customer"


def test_docs_with_a_slash_redirects_to_the_page(client):
    response = client.get("/docs/")
    assert response.status_code == 308
    assert response.headers["Location"] == "/docs"
    assert client.get("/docs/", follow_redirects=True).status_code == 200

"""The service as the tests drive it: where it lives, its command line, the test key, the app
started in-process, and a POST of one customer."""

import sys
from pathlib import Path

from customers_service.app import create_app
from customers_service.database import prepare_database

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
# flask's command line on the standalone service, from any folder (see __main__.py).
FLASK = (sys.executable, "-m", "customers_service")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def started_app(test_config: dict | None = None):
    """The standalone app with its database prepared, as a server's start does."""
    app = create_app(test_config)
    prepare_database(app)
    return app


def post_customer(client, customer: dict, headers: dict | None = None):
    """POST one customer in its envelope with the test key."""
    return client.post(
        "/api/v1/customers",
        json={"customer": customer},
        headers=AUTH if headers is None else headers,
    )

"""Customers to send: the spec's example, and random ones with every free-text field filled."""

import random
import string

from customers_service import storage

# The user's spec's example (less its trailing comma), copied here on purpose: tests hold the code
# to the spec, so they do not read the code's own copy (schemas.SEED_EXAMPLE).
SEED = {
    "customer_id": "5eb02857-a71e-4ea2-bcf9-57d3a41bc6ba",
    "name": "Gavin Belson",
    "country": "US",
    "address_line1": "5230 Penfield Ave",
    "address_line2": None,
    "state": "CA",
    "zipcode": "91364",
    "email": "dinesh@piedpiper.test",
    "city": "Woodland Hills",
    "url": "http://hooli.com",
    "phone": "1-171-883-3711 x245",
    "logo_url": "http://hooli.com/logo.png",
    "legal_name": "Coleman-Blair",
    "legal_number": "49-008-2965",
}

CUSTOMER_FIELDS = [
    f for f in storage.FIELDS if f not in ("customer_id", "name", "email", "url", "logo_url")
]


def random_customer(client_number: int, sequence: int) -> dict:
    """A distinct customer with random text in every free-text field."""
    letters = string.ascii_letters + string.digits + " éü-/%"
    customer = {
        "customer_id": f"crash-{client_number}-{sequence}-{random.randrange(10**9)}",
        "name": "".join(random.choices(letters, k=20)).strip() or "N",
        "email": f"c{client_number}.{sequence}@example.com",
        "url": f"https://example.com/{sequence}",
    }
    for field in CUSTOMER_FIELDS:
        if field == "country":
            customer[field] = random.choice(["US", "FR", "DE", None])
        else:
            customer[field] = random.choice([None, "".join(random.choices(letters, k=12))])
    return customer

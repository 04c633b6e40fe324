"""Webhooks: endpoints, the signature a receiver checks, and when a failed delivery is tried
again. The deliverer (deliverer.py) sends; storage keeps the queue."""

import base64
import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass

import urllib3

from customers_service.events import event_body


class BadWebhookUrl(ValueError):
    """The URL is not an absolute http or https URL."""


def check_url(url: str) -> str:
    """The URL if the deliverer can POST to it: absolute http(s), with a host, no credentials
    (they would not be sent: the signature is the proof), no spaces; else BadWebhookUrl. Read
    by urllib3's own parser, the one the deliverer's client uses."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise BadWebhookUrl("the URL must not hold spaces or control characters")
    try:
        parts = urllib3.util.parse_url(url)
    except urllib3.exceptions.LocationParseError as e:
        raise BadWebhookUrl(f"not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.host:
        raise BadWebhookUrl("the URL must be absolute, http:// or https://, with a host")
    if parts.auth is not None:
        raise BadWebhookUrl("the URL must not hold credentials (user:password@)")
    return url


def new_endpoint(url: str, now: str) -> dict:
    """A new endpoint's row: a random id and secret (the secret is shown once)."""
    return {
        "id": str(uuid.uuid4()),
        "url": check_url(url),
        "secret": secrets.token_urlsafe(32),
        "created_at": now,
    }


def signature(secret: str, body: bytes) -> str:
    """Lago's X-Lago-Signature: base64 of the HMAC-SHA256 of the body, keyed with the secret."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def delivery_request(secret: str, event: dict) -> tuple[bytes, dict]:
    """The body and headers of one event's POST to an endpoint with that secret."""
    body = event_body(event)
    headers = {
        "Content-Type": "application/json",
        "X-Lago-Unique-Key": event["id"],
        "X-Lago-Signature-Algorithm": "hmac",
        "X-Lago-Signature": signature(secret, body),
    }
    return body, headers


@dataclass(frozen=True)
class RetrySchedule:
    """Exponential backoff: ``first`` seconds after the first failure, doubling up to
    ``longest``; after ``give_up_after`` seconds since the first try, the next failure is the
    last (so tries go on for at least that long)."""

    first: float = 1.0
    longest: float = 3600.0
    give_up_after: float = 86400.0

    def after_failure(self, attempts: int, first_try: float, now: float) -> float | None:
        """When to try again after the ``attempts``-th failed try, or None to give up."""
        if now - first_try >= self.give_up_after:
            return None
        return now + min(self.first * 2 ** (attempts - 1), self.longest)


def unix_now() -> float:
    """The time as the queue stores it: Unix seconds."""
    return time.time()

"""Prometheus metrics: requests by route template, their latency, database errors by code, and
the webhook backlog, counted across every gunicorn worker (prometheus_client's multiprocess mode).

Under gunicorn.conf.py, ``PROMETHEUS_MULTIPROC_DIR`` is set before prometheus_client is imported:
each worker then writes its counts to its own files in that folder, and a scrape adds them up.
Without it (``flask run``, tests, a host that does not set it) the counts live in the process.
"""

from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from customers_service.logs import error_log

# A client chooses its method; a label of every method it sends would grow without bound.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "customers_http_requests",
    "Requests answered, by route template, method and status.",
    ("route", "method", "status"),
)
LATENCY = Histogram(
    "customers_http_request_duration_seconds",
    "Time from the request's first hook to its response, by route template and method.",
    ("route", "method"),
    buckets=LATENCY_BUCKETS,
)
IN_FLIGHT = Gauge(
    "customers_http_requests_in_flight",
    "Requests being answered now (a sync worker answers one at a time).",
    multiprocess_mode="livesum",
)
DATABASE_ERRORS = Counter(
    "customers_database_errors",
    "Requests answered 503 for a database fault, by the contract's code.",
    ("code",),
)

_request_series: dict[tuple[str, str, int], tuple] = {}


def method_label(method: str) -> str:
    """The request's method, or ``other`` for one the service does not know."""
    return method if method in KNOWN_METHODS else "other"


def request_started() -> bool:
    """Count a request in flight; False if the counts cannot be written (a request never fails
    for its metrics: a removed PROMETHEUS_MULTIPROC_DIR is logged, once; prometheus_client's
    files then fail with OSError first, TypeError after)."""
    try:
        IN_FLIGHT.inc()
    except Exception as e:  # never a failed request for its metrics
        _cannot_count(e)
        return False
    return True


def request_finished(route: str, method: str, status: int, seconds: float) -> None:
    """Count an answered request and its latency, and end its time in flight."""
    key = (route, method, status)
    try:
        series = _request_series.get(key)
        if series is None:  # labels() takes a lock and builds a key: once per series
            series = (REQUESTS.labels(route, method, str(status)), LATENCY.labels(route, method))
            _request_series[key] = series
        series[0].inc()
        series[1].observe(seconds)
        IN_FLIGHT.dec()
    except Exception as e:  # never a failed request for its metrics
        _cannot_count(e)


def database_error(code: str) -> None:
    """Count a request answered 503 for a database fault."""
    try:
        DATABASE_ERRORS.labels(code).inc()
    except Exception as e:  # never a failed request for its metrics
        _cannot_count(e)


_said: list = []


def _cannot_count(error: Exception) -> None:
    """Say once per process that metrics cannot be written, and why."""
    if not _said:
        _said.append(error)
        error_log.error("metrics: cannot write the counts: %s", error)


class _Collected:
    """A collector that yields what it was given: metric families read at this scrape."""

    def __init__(self, families: Iterable):
        self._families = list(families)

    def collect(self):
        return self._families


class _DefaultRegistry:
    """prometheus_client's default registry, as one collector of a scrape's registry."""

    def collect(self):
        return REGISTRY.collect()


def webhook_families(status: list[dict]) -> list[GaugeMetricFamily]:
    """Gauges of each webhook endpoint's backlog and failed deliveries, from webhook_status()."""
    backlog = GaugeMetricFamily(
        "customers_webhook_backlog",
        "Deliveries waiting to be sent (or retried), by webhook endpoint id.",
        labels=("endpoint",),
    )
    failed = GaugeMetricFamily(
        "customers_webhook_failed",
        "Deliveries given up on (retry-webhooks queues them again), by webhook endpoint id.",
        labels=("endpoint",),
    )
    for endpoint in status:
        backlog.add_metric((endpoint["id"],), endpoint["backlog"])
        failed.add_metric((endpoint["id"],), endpoint["failed"])
    return [backlog, failed]


def scrape(accept: str | None, families: Iterable = ()) -> tuple[bytes, str]:
    """The scrape's body and content type: every worker's counts, and ``families`` read now."""
    registry = CollectorRegistry(auto_describe=False)
    if values.ValueClass._multiprocess:  # chosen when prometheus_client was imported
        MultiProcessCollector(registry)
    else:
        registry.register(_DefaultRegistry())
    registry.register(_Collected(families))
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type

"""The PostgreSQL backend (CUSTOMERS_DATABASE_URL; the [postgres] extra): one database for
several hosts. Its operations are storage.Backend's; this package gathers them from the modules
that own them."""

from customers_service.backends.postgres.connections import (
    Connections,
    Error,
    check_health,
    fault,
    live_write_mark,
    live_writes_since,
    where,
)
from customers_service.backends.postgres.copying import (
    copy_contents,
    copy_rows,
    copy_snapshot,
    finish_copy,
    write_copied,
)
from customers_service.backends.postgres.customers import (
    IMPORT_PAUSE,
    count_customers,
    delete_customer,
    export_lines,
    get_customer,
    import_batch,
    list_customers,
    upsert_customer,
)
from customers_service.backends.postgres.events import (
    add_webhook,
    claim_deliveries,
    events_page,
    finish_deliveries,
    list_webhooks,
    prune_events,
    release_deliveries,
    release_some,
    remove_webhook,
    renew_leases,
    retry_failed,
    webhook_status,
)

__all__ = [
    "IMPORT_PAUSE",
    "Connections",
    "Error",
    "add_webhook",
    "check_health",
    "claim_deliveries",
    "copy_contents",
    "copy_rows",
    "copy_snapshot",
    "count_customers",
    "delete_customer",
    "events_page",
    "export_lines",
    "fault",
    "finish_copy",
    "finish_deliveries",
    "get_customer",
    "import_batch",
    "list_customers",
    "list_webhooks",
    "live_write_mark",
    "live_writes_since",
    "prune_events",
    "release_deliveries",
    "release_some",
    "remove_webhook",
    "renew_leases",
    "retry_failed",
    "upsert_customer",
    "webhook_status",
    "where",
    "write_copied",
]

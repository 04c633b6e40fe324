"""The operator commands, ``flask customers ...``: the database, API keys, import, export and
copy, webhook endpoints and their deliverer."""

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator

import click
from flask import current_app
from flask.cli import AppGroup

from customers_service.api_keys import (
    KEY_PREFIX_LENGTH,
    add_key_to_file,
    configured_keys,
    key_file_lock,
    new_api_key,
    read_key_file,
    write_key_file,
)
from customers_service.bulk_import import (
    ImportReport,
    checked_batches,
    commit_batch,
    csv_rows,
    import_format,
    jsonl_rows,
    stream_size,
)
from customers_service.copying import BATCH_SIZE, CopyFailed, copy_database
from customers_service.database import (
    DatabaseNotReady,
    backend,
    open_store,
    prepare_database,
    where,
)
from customers_service.deliverer import Deliverer, DelivererSettings
from customers_service.logs import say
from customers_service.settings import setting
from customers_service.storage import Store, utc_now
from customers_service.webhooks import BadWebhookUrl, RetrySchedule, new_endpoint, unix_now

cli = AppGroup("customers", help="Operate the customers service.")


def command_store(prepare: bool = False) -> Store:
    """A Store for a command, on a database prepared first if ``prepare``; a clear message and
    a non-zero exit when that cannot be."""
    try:
        if prepare:
            prepare_database(current_app)
        store = open_store()
    except DatabaseNotReady as e:
        raise click.ClickException(str(e)) from None
    except backend().Error as e:
        raise click.ClickException(f"{where()}: {e}") from None
    if not prepare:  # init-db says it is ready instead
        say(f"Database: {where()}", database=where())
    return store


@contextlib.contextmanager
def opened_store() -> Iterator[Store]:
    """command_store(), closed when the block ends."""
    store = command_store()
    try:
        yield store
    finally:
        store.close()


@cli.command("init-db")
def init_db_command() -> None:
    """Create or migrate the database; safe to run any number of times."""
    command_store(prepare=True).close()
    say(f"Database ready: {where()}", database=where())
    key_file = setting("CUSTOMERS_API_KEY_FILE")
    if read_key_file(key_file):
        # A key is shown once, when it is made; from then on, where it is.
        say(f"API keys: in {key_file} (list-api-keys shows their prefixes)", key_file=key_file)
    elif configured_keys():
        say("API keys: those set in CUSTOMERS_API_KEYS")


@cli.command("create-api-key")
def create_api_key_command() -> None:
    """Make a new random API key, store it in the key file and print it, once."""
    path = setting("CUSTOMERS_API_KEY_FILE")
    key = new_api_key()
    with key_file_lock(path):
        add_key_to_file(path, key)
    click.echo(key)
    say(f"Stored in {path}. It is not shown again: keep it now.", key_file=path)


@cli.command("list-api-keys")
def list_api_keys_command() -> None:
    """Show the prefix of each key in the key file."""
    for key in read_key_file(setting("CUSTOMERS_API_KEY_FILE")):
        click.echo(key[:KEY_PREFIX_LENGTH] + "...")
    if configured_keys():
        click.echo(f"(and {len(configured_keys())} key(s) set in CUSTOMERS_API_KEYS)")


@cli.command("revoke-api-key")
@click.argument("prefix")
def revoke_api_key_command(prefix: str) -> None:
    """Remove the one key of the key file that starts with PREFIX."""
    path = setting("CUSTOMERS_API_KEY_FILE")
    with key_file_lock(path):
        keys = read_key_file(path)
        matches = [key for key in keys if key.startswith(prefix)]
        if len(matches) != 1:
            found = "no key" if not matches else f"{len(matches)} keys"
            raise click.ClickException(f"{found} of {path} start with {prefix!r}")
        write_key_file(path, [key for key in keys if key != matches[0]])
    say(f"Revoked {matches[0][:KEY_PREFIX_LENGTH]}...", err=False)


@cli.command("import")
@click.argument("file", type=click.File("rb"))
@click.option("--format", "file_format", type=click.Choice(["jsonl", "csv"]), help="jsonl or csv")
@click.option("--rejects", type=click.File("w", encoding="utf-8"), help="write refused rows here")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--jobs",
    default=min(2, os.cpu_count() or 1),
    show_default=True,
    type=click.IntRange(min=1),
    help="processes that parse and validate rows",
)
def import_command(file, file_format: str | None, rejects, batch_size: int, jobs: int) -> None:
    """Import customers from FILE (JSON Lines or CSV; - for stdin) through the API's rules.

    Creates or migrates the database first, as init-db does.
    """
    file_format = import_format(file, file_format)
    prepared = command_store(prepare=True)
    bodies = prepared.backend.IMPORT_BODIES
    prepared.close()
    rows = jsonl_rows(file) if file_format == "jsonl" else csv_rows(file)
    report = ImportReport(rejects, stream_size(file), file.tell)
    batches = checked_batches(rows, batch_size, jobs, bodies)
    store = None
    try:
        for checked in batches:
            if store is None:  # opened after the workers forked, so no connection crosses a fork
                store = command_store()
            commit_batch(store, checked, report)
    except KeyboardInterrupt:
        say(f"\ninterrupted; committed so far: {report.summary()}")
        raise SystemExit(130) from None
    finally:
        batches.close()
        if store is not None:
            store.close()
    if report.show_progress:
        click.echo("\r" + report.progress_line(), err=True)
    say(report.summary(), err=False, **report.counts())
    if report.rejected:
        raise SystemExit(1)


@cli.command("export")
@click.argument("file", type=click.File("w", encoding="utf-8"), default="-")
def export_command(file) -> None:
    """Write every customer to FILE (default stdout) as JSON Lines, in the API's object shape."""
    store = command_store()
    count = 0
    started = time.monotonic()
    try:
        for line in store.export_lines():  # one snapshot, while the service goes on writing
            file.write(line + "\n")
            count += 1
    finally:
        store.close()
    file.flush()
    seconds = time.monotonic() - started
    say(f"exported {count:,} customers in {seconds:.1f} s")


@cli.command("copy")
@click.option(
    "--from",
    "source",
    required=True,
    help="the database to copy: a SQLite file or a postgresql:// URL",
)
@click.option(
    "--to", "target", required=True, help="the database to copy into: new, empty, or a copy's"
)
@click.option("--batch-size", default=BATCH_SIZE, show_default=True, type=click.IntRange(min=1))
def copy_command(source: str, target: str, batch_size: int) -> None:
    """Copy the whole state of one database into an empty one, SQLite or PostgreSQL each: the
    customers, the events, the webhook endpoints and their deliveries. A rerun after a crash
    resumes. CUSTOMERS_DATABASE and CUSTOMERS_DATABASE_URL play no part."""
    try:
        copy_database(source, target, batch_size)
    except CopyFailed as e:
        say(str(e), failed=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        say("\ninterrupted: the same command again resumes the copy")
        raise SystemExit(130) from None


# --- events and webhooks ---------------------------------------------------------------------


def print_json(value: dict) -> None:
    """One line of JSON on stdout."""
    click.echo(json.dumps(value, ensure_ascii=False))


@cli.command("add-webhook")
@click.argument("url")
def add_webhook_command(url: str) -> None:
    """Register URL to receive every event from now on; print its id and secret, once."""
    try:
        endpoint = new_endpoint(url, utc_now())
    except BadWebhookUrl as e:
        raise click.ClickException(f"{url!r}: {e}") from None
    with opened_store() as store:
        store.add_webhook(endpoint)
    print_json(endpoint)
    say("The secret is not shown again: keep it now.")


@cli.command("list-webhooks")
def list_webhooks_command() -> None:
    """Show each webhook endpoint (without its secret), one line of JSON each."""
    with opened_store() as store:
        for endpoint in store.list_webhooks():
            print_json(endpoint)


@cli.command("remove-webhook")
@click.argument("endpoint_id")
def remove_webhook_command(endpoint_id: str) -> None:
    """Remove an endpoint; what was queued for it is dropped."""
    with opened_store() as store:
        removed = store.remove_webhook(endpoint_id)
    if not removed:
        raise click.ClickException(f"no webhook endpoint has the id {endpoint_id!r}")
    say(f"Removed {endpoint_id}", err=False)


@cli.command("webhook-status")
def webhook_status_command() -> None:
    """Each endpoint's backlog, last error and failed events (the first 100), as JSON lines."""
    with opened_store() as store:
        for endpoint in store.webhook_status():
            print_json(endpoint)


@cli.command("retry-webhooks")
@click.argument("endpoint_id")
def retry_webhooks_command(endpoint_id: str) -> None:
    """Queue the endpoint's failed events again, from their first try."""
    with opened_store() as store:
        queued = store.retry_failed(endpoint_id)
    if queued is None:
        raise click.ClickException(f"no webhook endpoint has the id {endpoint_id!r}")
    say(f"Queued {queued} failed events again for {endpoint_id}", err=False)


@cli.command("prune-events")
def prune_events_command() -> None:
    """Remove the events older than CUSTOMERS_EVENT_RETENTION_DAYS (the deliverer does this
    every minute; this is for a deployment that runs none)."""
    removed, recorded_before = 0, unix_now() - retention_seconds()
    with opened_store() as store:
        while pruned := store.prune_events(recorded_before):  # a few thousand at a time
            removed += pruned
    say(f"Removed {removed} events", err=False)


def retention_seconds() -> float:
    """How long events are kept, in seconds."""
    return float(setting("CUSTOMERS_EVENT_RETENTION_DAYS")) * 86400


def deliverer_settings() -> DelivererSettings:
    """The deliverer's settings, from the app's."""
    return DelivererSettings(
        timeout=float(setting("CUSTOMERS_WEBHOOK_TIMEOUT")),
        concurrency=int(setting("CUSTOMERS_WEBHOOK_CONCURRENCY")),
        poll=float(setting("CUSTOMERS_WEBHOOK_POLL_SECONDS")),
        lease=float(setting("CUSTOMERS_WEBHOOK_LEASE_SECONDS")),
        retry=RetrySchedule(
            first=float(setting("CUSTOMERS_WEBHOOK_RETRY_FIRST_SECONDS")),
            longest=float(setting("CUSTOMERS_WEBHOOK_RETRY_LONGEST_SECONDS")),
            give_up_after=float(setting("CUSTOMERS_WEBHOOK_RETRY_FOR_SECONDS")),
        ),
        retention=retention_seconds(),
    )


@cli.command("deliver-webhooks")
def deliver_webhooks_command() -> None:
    """Deliver events to the webhook endpoints until SIGTERM or Ctrl-C (then finish what is in
    flight). Run one per host, under a process manager; several share the work."""
    command_store().close()  # a clear message now if the database is not there
    app = current_app._get_current_object()
    deliverer = Deliverer(lambda: open_store(app), deliverer_settings())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: deliverer.stop())
    say(f"delivering webhooks from {where()} (pid {os.getpid()})", pid=os.getpid())
    deliverer.run()
    say("deliverer stopped")

"""Gunicorn's deployment defaults for the customers service (see the README)."""

import glob
import os
import shutil
import tempfile

from gunicorn import glogging

# Metrics (prometheus_client's multiprocess mode): each worker writes its counts to files in this
# folder and a scrape adds every worker's up. It must be set before prometheus_client is imported.
# Unset, each gunicorn gets a folder of its own, removed when it stops.
METRICS_FOLDERS = os.path.join(tempfile.gettempdir(), "customers-metrics-")


def metrics_folder_owner(path: str) -> int:
    """The pid of the gunicorn that made a metrics folder: ``customers-metrics-<pid>-<random>``."""
    return int(path[len(METRICS_FOLDERS) :].split("-")[0])


def remove_dead_gunicorns_metrics_folders() -> None:
    """Remove the folders of gunicorns that ended without on_exit (killed, or the machine down)."""
    for path in glob.glob(METRICS_FOLDERS + "*-*"):
        try:
            os.kill(metrics_folder_owner(path), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):  # not ours, or a live process of another user
            continue


# (The environment outlives this file: a reload reads it again and keeps the same folder.)
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    remove_dead_gunicorns_metrics_folders()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
        prefix=f"customers-metrics-{os.getpid()}-"
    )

bind = os.environ.get("CUSTOMERS_BIND", "127.0.0.1:8000")
# Two per core: while one waits on its commit's fsync, another uses the core.
workers = int(os.environ.get("CUSTOMERS_WORKERS", 2 * (os.cpu_count() or 1)))
worker_class = "sync"
# Above CUSTOMERS_SQLITE_TIMEOUT (5 s): a worker waiting for the write lock is not a stuck one.
timeout = 30
graceful_timeout = 10
keepalive = 2
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# The service writes its own access line, with the request id; gunicorn's would repeat it.
accesslog = None
errorlog = "-"
# No control socket: one fixed path in $HOME would be shared by every gunicorn on the machine.
control_socket_disable = True


class JsonLines(glogging.Logger):
    """Gunicorn's own lines (worker starts, timeouts) as JSON objects, like the service's."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        from customers_service.logs import JsonFormatter

        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())


if os.environ.get("CUSTOMERS_LOG_FORMAT", "").strip().lower() == "json":
    logger_class = JsonLines


def on_starting(server) -> None:
    """Create or migrate the database, and the first API key, before any worker forks.

    Workers never create a database: one that goes missing is a 503 until it is back.
    """
    from customers_service.app import create_app, prepare_or_exit

    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if not server.master_pid:  # a new master on USR2 shares the old one's workers' counts
        # An earlier run's counts (prometheus_client's docs: wipe the folder before starting).
        for path in glob.glob(os.path.join(folder, "*.db")):
            os.remove(path)
    prepare_or_exit(create_app())


def child_exit(server, worker) -> None:
    """Drop a dead worker's live gauges (requests in flight); its counts stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """Remove the metrics folder this gunicorn made (not one it was given, nor one it handed to
    a new master on USR2)."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        made_here = (
            folder.startswith(METRICS_FOLDERS) and metrics_folder_owner(folder) == os.getpid()
        )
    except ValueError:
        made_here = False
    if made_here and not server.reexec_pid:
        shutil.rmtree(folder, ignore_errors=True)

"""Gunicorn's deployment defaults for the customers service (see the README)."""

import fcntl
import glob
import os
import shutil
import tempfile

from gunicorn import glogging

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


# Metrics (prometheus_client's multiprocess mode): each worker writes its counts to files in one
# folder, and a scrape adds every worker's up. PROMETHEUS_MULTIPROC_DIR names it; unset, each
# gunicorn makes its own in on_starting (in the master itself, after any daemonising), holds a
# shared lock in it for as long as the master or a worker lives (a new master on USR2 takes it
# too), and removes it at exit. A folder whose lock nobody holds was left by a gunicorn that was
# killed: the next start removes it.
METRICS_FOLDERS = os.path.join(tempfile.gettempdir(), "customers-metrics-")
METRICS_LOCK = "held-while-serving.lock"


def on_starting(server) -> None:
    """Prepare the metrics folder, then create or migrate the database and the first API key,
    before any worker forks (and before prometheus_client is imported).

    Workers never create a database: one that goes missing is a 503 until it is back.
    """
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        remove_abandoned_metrics_folders()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = make_metrics_folder()
        os.environ["CUSTOMERS_METRICS_FOLDER_OWNER"] = str(os.getpid())
    else:  # given, or made by the master before a USR2
        hold_metrics_folder(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if not server.master_pid:  # a new master on USR2 shares the old one's workers' counts
        # An earlier run's counts (prometheus_client's docs: wipe the folder before starting).
        for path in glob.glob(os.path.join(folder, "*.db")):
            os.remove(path)
    from customers_service.app import create_app
    from customers_service.standalone import prepare_or_exit

    prepare_or_exit(create_app())
    server.log.info("Serving on http://%s (CUSTOMERS_BIND chooses the address)", bind)


def make_metrics_folder() -> str:
    """A new private folder, held (see hold_metrics_folder) from the moment its lock appears:
    the lock file is locked under another name, then renamed."""
    folder = tempfile.mkdtemp(prefix="customers-metrics-")
    making = os.path.join(folder, "making.lock")
    os.close(os.open(making, os.O_CREAT | os.O_RDWR, 0o600))
    hold_metrics_folder(folder, making)
    os.rename(making, os.path.join(folder, METRICS_LOCK))
    return folder


def hold_metrics_folder(folder: str, lock_file: str = "") -> None:
    """Take a shared lock on a folder this file made, kept by this process and its workers (a
    fork shares it) until the last of them ends."""
    try:
        lock = os.open(lock_file or os.path.join(folder, METRICS_LOCK), os.O_RDWR)
    except OSError:
        return  # a folder the operator gave: not ours to lock
    fcntl.flock(lock, fcntl.LOCK_SH)  # never closed: the lock lives with us


def remove_abandoned_metrics_folders() -> None:
    """Remove the metrics folders of gunicorns that ended without on_exit (killed): those whose
    lock nobody holds. A folder without a lock file is left alone (it may be being made)."""
    for folder in glob.glob(METRICS_FOLDERS + "*"):
        try:
            lock = os.open(os.path.join(folder, METRICS_LOCK), os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: a gunicorn (a master or a worker) still serves from it
        finally:
            os.close(lock)
        shutil.rmtree(folder, ignore_errors=True)


def child_exit(server, worker) -> None:
    """Drop a dead worker's live gauges (requests in flight); its counts stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """Remove the metrics folder this master made (not one it was given, nor one it handed to a
    new master on USR2)."""
    made_here = os.environ.get("CUSTOMERS_METRICS_FOLDER_OWNER") == str(os.getpid())
    if made_here and not server.reexec_pid:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)

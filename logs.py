"""The service's log lines: one access line per request on stdout, error lines on stderr."""

import logging
import re
import sys
import time
from urllib.parse import quote

from flask import Request

error_log = logging.getLogger("customers.errors")

PLAIN_PATH = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=._~-]*")
_log_second: list = [0, ""]


class _CurrentStreamHandler(logging.StreamHandler):
    """A handler that writes to the current sys.stdout or sys.stderr, even if it was swapped."""

    def __init__(self, name: str):
        self._stream_name = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    """Send error lines to stderr, once per process."""
    if not error_log.handlers:
        handler = _CurrentStreamHandler("stderr")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        error_log.addHandler(handler)
        error_log.setLevel(logging.INFO)
        error_log.propagate = False


def write_access_line(req: Request, request_id: str, status: int, elapsed_ms: float) -> None:
    """One line per request on stdout, with its request id.

    Written straight to the stream: the logging module's per-record work (it looks up the
    caller's file) cost more than the rest of a GET.
    """
    path = req.path[:300]
    if not PLAIN_PATH.fullmatch(path):  # quote only what could break the line or fake a field
        path = quote(path, safe="/:@!$&'()*+,;=-._~")
    sys.stdout.write(
        f"{_log_time()} request_id={request_id} remote={req.remote_addr} "
        f"method={req.method} path={path} status={status} duration_ms={elapsed_ms:.1f}\n"
    )
    sys.stdout.flush()


def _log_time() -> str:
    """The access line's timestamp, formatted once a second."""
    now = int(time.time())
    if _log_second[0] != now:
        _log_second[:] = [now, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))]
    return _log_second[1]

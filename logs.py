"""The service's log lines: one access line per request on stdout, error lines on stderr, as
text or, with ``CUSTOMERS_LOG_FORMAT=json``, one JSON object a line."""

import json
import logging
import os
import re
import sys
import time
from urllib.parse import quote

import click
from flask import Request, current_app, g, has_app_context, has_request_context, request
from werkzeug.routing import Rule

error_log = logging.getLogger("customers.errors")

LOG_FORMATS = ("text", "json")
PLAIN_TEXT = re.compile(r"[A-Za-z0-9/:@!$&'()*+,;=._~-]*")
UNMATCHED_ROUTE = "unmatched"  # a 404 or 405: no route template, and never the raw path
# <customer_id:customer_id> -> <customer_id>
ROUTE_PARAMETER = re.compile(r"<(?:[^<>:]*:)?([^<>]+)>")
_route_templates: dict[str, str] = {}
_this_second: tuple[int, str, str] = (0, "", "")  # replaced whole: threads read it whole


def route_template(rule: Rule | None) -> str:
    """The route a request matched (its ``url_rule``), with its converters dropped, or
    ``unmatched``: never the path, which holds a customer_id."""
    if rule is None:
        return UNMATCHED_ROUTE
    template = _route_templates.get(rule.rule)
    if template is None:
        template = _route_templates[rule.rule] = ROUTE_PARAMETER.sub(r"<\1>", rule.rule)
    return template


def wants_json(config=None) -> bool:
    """Whether lines are JSON: the app's CUSTOMERS_LOG_FORMAT, or the environment's outside one."""
    if config is None and has_app_context():
        config = current_app.config
    value = config.get("CUSTOMERS_LOG_FORMAT") if config is not None else None
    if value is None:
        value = os.environ.get("CUSTOMERS_LOG_FORMAT", "text")
    return str(value).strip().lower() == "json"


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, the request's id, method and route
    when there is one, the message, and the traceback if any (newlines escaped: one line)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            **request_fields(),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class ErrorFormatter(logging.Formatter):
    """Error lines as text (``time request_id=... message``) or as JSON, as the app says."""

    _json = JsonFormatter()

    def __init__(self):
        super().__init__("%(asctime)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if wants_json():
            return self._json.format(record)
        return super().format(record)


def _request_id_in_text(record: logging.LogRecord) -> bool:
    """In text, an error line of a request starts its message with ``request_id=...``: whatever
    handler writes it (a host app may give the logger its own)."""
    request_id = request_fields().get("request_id")
    if request_id is not None and not wants_json():
        record.msg, record.args = f"request_id={request_id} {record.getMessage()}", None
    return True


error_log.addFilter(_request_id_in_text)


def request_fields() -> dict:
    """The current request's id, method and route template, or nothing outside a request."""
    if not has_request_context():
        return {}
    return {
        "request_id": g.get("request_id"),
        "method": request.method,
        "route": route_template(request.url_rule),
    }


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
        handler.setFormatter(ErrorFormatter())
        error_log.addHandler(handler)
        error_log.setLevel(logging.INFO)
        error_log.propagate = False


def write_access_line(
    req: Request, as_json: bool, request_id: str, route: str, status: int, elapsed_ms: float
) -> None:
    """One line per request on stdout, with its request id.

    Written straight to the stream, not through the logging module: its per-record work (it
    looks up the caller's file) buys nothing for a line whose fields are fixed.
    """
    remote = req.remote_addr or ""
    method = req.method
    if as_json:
        line = json.dumps(
            {
                "time": iso_time(time.time()),
                "level": "info",
                "logger": "customers.access",
                "request_id": request_id,
                "method": method,
                "route": route,
                "status": status,
                "duration_ms": round(elapsed_ms, 1),
                "remote_addr": remote,
            }
        )
    else:
        line = (
            f"{_log_time()} request_id={request_id} remote={plain(remote)} "
            f"method={plain(method)} path={plain(req.path[:300])} status={status} "
            f"duration_ms={elapsed_ms:.1f}"
        )
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def say(message: str, *, err: bool = True, **fields) -> None:
    """An operator's message from a command or the deliverer, on stderr (or stdout): the text,
    or with CUSTOMERS_LOG_FORMAT=json one JSON object with ``fields`` beside the message."""
    if wants_json():
        line = {"time": iso_time(time.time()), "level": "info", "logger": "customers.commands"}
        line = json.dumps({**line, "message": message, **fields}, ensure_ascii=False)
    else:
        line = message
    click.echo(line, err=err)


def plain(text: str) -> str:
    """The text as it is when it cannot break the line or fake a field, else percent-quoted."""
    if PLAIN_TEXT.fullmatch(text):
        return text
    return quote(text, safe="/:@!$&'()*+,;=-._~")


def _second_texts(second: int) -> tuple[int, str, str]:
    """A second as the text line (local time) and JSON (UTC) write it, formatted once."""
    global _this_second
    texts = _this_second
    if texts[0] != second:
        texts = _this_second = (
            second,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)),
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
        )
    return texts


def iso_time(seconds: float) -> str:
    """UTC in ISO 8601 with milliseconds: ``2026-11-26T05:01:02.345Z``."""
    whole = int(seconds)
    return f"{_second_texts(whole)[2]}.{int((seconds - whole) * 1000):03d}Z"


def _log_time() -> str:
    """The text access line's timestamp (local time, whole seconds)."""
    return _second_texts(int(time.time()))[1]

"""The standalone app's own pieces: its Flask and request classes, its instance folder, and the
database prepared at a server's start. ``create_app`` in app.py puts them together."""

import os

import click
from flask import Flask, Request, current_app, has_app_context

from customers_service import database


class CustomersRequest(Request):
    """Flask's request, reading MAX_CONTENT_LENGTH from the app itself: Flask's own property
    reads it through the app's proxy, twice a request."""

    @property
    def max_content_length(self) -> int | None:
        """This request's limit if one was set, else the app's MAX_CONTENT_LENGTH, as Flask's."""
        if self._max_content_length is None and has_app_context():
            return current_app._get_current_object().config["MAX_CONTENT_LENGTH"]
        return Request.max_content_length.fget(self)

    @max_content_length.setter
    def max_content_length(self, value: int | None) -> None:
        self._max_content_length = value


class CustomersApp(Flask):
    """Flask, remembering which views and hooks are plain functions: Flask asks ``inspect``
    again for each one at every request."""

    request_class = CustomersRequest

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._synchronous: dict = {}

    def ensure_sync(self, func):
        """The function itself when it is synchronous, Flask's wrapper when it is a coroutine."""
        try:
            return self._synchronous[func]
        except KeyError:
            ready = super().ensure_sync(func)
            if len(self._synchronous) < 1000:  # not every callable made per request
                self._synchronous[func] = ready
            return ready


def checkout_instance_path() -> str | None:
    """``instance/`` in the repository when run from a checkout (or an editable install);
    None, Flask's own choice (``<prefix>/var/...``), when installed (site- or dist-packages)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if {"site-packages", "dist-packages"} & set(here.split(os.sep)):
        return None
    return os.path.join(here, "instance")


def started_by_flask_run() -> bool:
    """Whether Flask's development server is loading this app as it starts (one process,
    no workers: its start is the place to prepare the database)."""
    context = click.get_current_context(silent=True)
    return context is not None and context.info_name == "run"


def prepare_or_exit(app: Flask) -> None:
    """Prepare the app's database at a server's start, or stop the start with the reason."""
    try:
        database.prepare_database(app)
    except database.DatabaseNotReady as e:
        raise SystemExit(f"customers service: {e}") from None

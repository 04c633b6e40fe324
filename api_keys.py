"""API keys: where they come from, the key file, and the request hook that refuses a request
without a valid one (keys compared in constant time)."""

import contextlib
import fcntl
import functools
import hmac
import os
import secrets

from flask import Flask, Request, current_app, request

from customers_service.logs import say
from customers_service.responses import ApiError
from customers_service.settings import flag, setting

# Endpoints anyone may call: the health check, the OpenAPI document and the docs page.
PUBLIC_ENDPOINTS = {
    "customers.openapi_document",
    "customers.health",
    "customers.docs",
    "customers.docs_with_slash",
    "customers.docs_asset",
}
KEY_PREFIX_LENGTH = 8  # the most of a key shown after it was made (contract)
HOW_TO_SEND_A_KEY = "send an API key in the header Authorization: Bearer <key>"

_key_file_cache: dict[str, tuple[tuple, list[str]]] = {}


def read_key_file(path: str) -> list[str]:
    """The keys in a key file, one a line, re-read only when the file changes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    cached = _key_file_cache.get(path)
    if cached and cached[0] == stamp:
        return cached[1]
    with open(path, encoding="utf-8") as f:
        keys = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    _key_file_cache[path] = (stamp, keys)
    return keys


def configured_keys(app: Flask | None = None) -> list[str]:
    """Keys from CUSTOMERS_API_KEYS (a comma-separated string or a list)."""
    keys = setting("CUSTOMERS_API_KEYS", app) or []
    if isinstance(keys, str):
        return list(_split_keys(keys))
    return [k.strip() for k in keys if k and k.strip()]


@functools.lru_cache(maxsize=8)
def _split_keys(keys: str) -> tuple[str, ...]:
    # The environment's string is split once, not at every request.
    return tuple(k.strip() for k in keys.split(",") if k.strip())


def api_keys(app: Flask | None = None) -> list[str]:
    """Every key that opens the API now: configured ones and those in the key file."""
    return configured_keys(app) + read_key_file(setting("CUSTOMERS_API_KEY_FILE", app))


def keys_required(app: Flask | None = None) -> bool:
    """Whether the app (the current one by default) checks keys (a host doing its own auth may
    turn it off)."""
    return flag(setting("CUSTOMERS_REQUIRE_API_KEY", app))


def new_api_key() -> str:
    """A fresh random API key."""
    return "cus_" + secrets.token_urlsafe(32)


def add_key_to_file(path: str, key: str) -> None:
    """Append a key to the key file, creating it readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(key + "\n")


def ensure_api_key(app: Flask) -> None:
    """Create a key file with one key when the app has no key at all, and show it, once."""
    with app.app_context():
        if not keys_required() or api_keys():
            return
        path = setting("CUSTOMERS_API_KEY_FILE")
        try:
            # O_EXCL: when several workers start at once, exactly one creates the key.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        key = new_api_key()
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
        # The one time a key is shown: later starts and commands name the file instead.
        say(
            f"No API key was configured: created one in {path} (readable by you only). "
            f"It is not shown again: {key}",
            key_file=path,
        )


@contextlib.contextmanager
def key_file_lock(path: str):
    """Hold an exclusive lock beside the key file while it is changed."""
    fd = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_key_file(path: str, keys: list[str]) -> None:
    """Replace the key file atomically, readable by its owner only."""
    temporary = path + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(key + "\n" for key in keys)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def key_is_valid(presented: str, keys: list[str]) -> bool:
    """Compare a presented key with every known key in constant time."""
    presented_bytes = presented.encode("utf-8", "surrogateescape")
    found = False
    for key in keys:
        found |= hmac.compare_digest(presented_bytes, key.encode("utf-8"))
    return found


def key_opens(token: str, app: Flask) -> bool:
    """Whether ``token`` is a key of the app's settings or of the key file.

    The settings' keys are checked first, in memory: a token among them is let in without a
    look at the key file, whose check is a system call on every request (and a raised
    FileNotFoundError where there is no file), about 4% of a GET's CPU (bench/README.md, "the
    key check").
    """
    return key_is_valid(token, configured_keys(app)) or key_is_valid(
        token, read_key_file(setting("CUSTOMERS_API_KEY_FILE", app))
    )


def bearer_token(req: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    scheme, _, token = req.environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def require_api_key() -> None:
    """Refuse the request with 401 unless it carries a valid key."""
    req = request._get_current_object()
    app = current_app._get_current_object()
    if req.endpoint in PUBLIC_ENDPOINTS or not keys_required(app):
        return
    token = bearer_token(req)
    if token is None or not key_opens(token, app):
        raise ApiError(
            401, "unauthorized", HOW_TO_SEND_A_KEY, headers={"WWW-Authenticate": "Bearer"}
        )

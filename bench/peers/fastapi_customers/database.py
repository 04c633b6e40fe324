"""The peer's engine and sessions: SQLite or PostgreSQL, chosen by a SQLAlchemy URL."""

import os
from collections.abc import Iterator

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

DATABASE_URL = os.environ.get("PEER_DATABASE_URL", "sqlite:///peer.sqlite3")
SQLITE_SYNCHRONOUS = os.environ.get("PEER_SQLITE_SYNCHRONOUS", "FULL").upper()


def make_engine(url: str) -> Engine:
    """An engine with SQLAlchemy's default pool; SQLite in WAL mode, as several workers need."""
    if not url.startswith("sqlite"):
        return create_engine(url)
    if SQLITE_SYNCHRONOUS not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
        raise ValueError(f"PEER_SQLITE_SYNCHRONOUS: {SQLITE_SYNCHRONOUS!r}")
    # FastAPI runs `def` endpoints in its thread pool: a pooled connection moves between threads.
    engine = create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def set_pragmas(dbapi_connection, connection_record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {SQLITE_SYNCHRONOUS}")
        cursor.close()

    return engine


engine = make_engine(DATABASE_URL)
SessionLocal = sessionmaker(engine, expire_on_commit=False)


def get_db() -> Iterator[Session]:
    """One session per request, closed after the response."""
    with SessionLocal() as db:
        yield db

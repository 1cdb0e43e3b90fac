"""Engines and sessions for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

import os
import weakref
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

# Errors that mean "the database cannot take the write right now", as opposed to a bug of ours.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    exc.OperationalError,
    exc.InterfaceError,
    exc.DisconnectionError,
    exc.TimeoutError,
)

_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def normalise_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs that name no driver (postgres://, postgresql://)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def is_unavailable(error: BaseException) -> bool:
    """True when an exception means the database is down, unreachable or locked."""
    return isinstance(error, UNAVAILABLE_ERRORS) or (
        isinstance(error, exc.DBAPIError) and bool(error.connection_invalidated)
    )


def make_engine(
    url: str, *, sqlite_synchronous: str = "FULL", sqlite_busy_timeout: float = 10.0, pool_size: int = 10
) -> Engine:
    """Create an engine tuned for this service: WAL + BEGIN IMMEDIATE on SQLite, a checked pool on PostgreSQL."""
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url, parsed.database, sqlite_synchronous, sqlite_busy_timeout)
    else:
        engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=5,
            # A dead connection after a database restart is replaced instead of failing a request.
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={"connect_timeout": 5, "application_name": "rm-voucher-sync"},
        )
    _engines.add(engine)
    return engine


def _sqlite_engine(url: str, database: str | None, synchronous: str, busy_timeout: float) -> Engine:
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": busy_timeout, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001
        # Take the write lock up front: deliveries for one voucher then serialise instead of
        # failing with "database is locked" when two readers both try to upgrade.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (views read them to build responses)."""
    return sessionmaker(engine, expire_on_commit=False)


def _dispose_in_child() -> None:
    # A forked worker must not reuse the parent's sockets (gunicorn --preload, multiprocessing).
    for engine in list(_engines):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_dispose_in_child)

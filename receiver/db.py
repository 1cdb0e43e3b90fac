"""Engines and sessions for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

import os
import time
import weakref
from pathlib import Path

from sqlalchemy import Engine, Table, TextClause, bindparam, create_engine, event, exc, text
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
            pool_recycle=1800,
            connect_args={"connect_timeout": 5, "application_name": "rm-voucher-sync"},
        )
        _ping_when_idle(engine)
    _engines.add(engine)
    return engine


# A pooled connection unused for longer than this is checked before use.
PING_AFTER_IDLE_SECONDS = 5.0


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection only when it sat idle: a dead one after a database restart is replaced.

    SQLAlchemy's pool_pre_ping costs a round trip on every checkout, i.e. on every callback. A
    connection that came back to the pool moments ago was alive moments ago; if it died since,
    the request fails with a disconnect error (a 503 that RM retries), and SQLAlchemy replaces
    every connection older than that failure.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection, record) -> None:  # noqa: ANN001
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection, record, _proxy) -> None:  # noqa: ANN001
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception:  # noqa: BLE001 - any failure means this connection is unusable
            alive = False
        if not alive:
            # The pool discards this connection and checks out (connects) another one.
            raise exc.DisconnectionError("pooled connection was dead")


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


def insert_unless_conflict(table: Table, column_names: list[str]) -> TextClause:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` for these columns: the id, or no row on a conflict.

    Hand-written because the dialects' on_conflict_do_nothing() constructs have no cache key, so
    SQLAlchemy would recompile them on every execution (measured: 2.5 ms each). A text clause is
    compiled once; typed bind parameters keep the column types' conversions. Same SQL on SQLite
    and PostgreSQL. Without a conflict target any unique constraint counts as a conflict.
    """
    columns = [table.c[name] for name in column_names]
    names = ", ".join(f'"{c.name}"' for c in columns)
    params = ", ".join(f":{c.name}" for c in columns)
    sql = f"INSERT INTO {table.name} ({names}) VALUES ({params}) ON CONFLICT DO NOTHING RETURNING id"
    return text(sql).bindparams(*(bindparam(c.name, type_=c.type) for c in columns))


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (views read them to build responses)."""
    return sessionmaker(engine, expire_on_commit=False)


def _dispose_in_child() -> None:
    # A forked worker must not reuse the parent's sockets (gunicorn --preload, multiprocessing).
    for engine in list(_engines):
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_dispose_in_child)

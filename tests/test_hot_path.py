"""The callback path's shortcuts keep SQLAlchemy's behaviour: wrapped errors, the same stored values, the same headers."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, exc, insert, text

from receiver.db import Direct, is_unavailable, make_engine
from receiver.deliveries import pick_headers
from receiver.models import UTCDateTime


def test_begin_on_a_locked_sqlite_database_is_an_unavailable_sqlalchemy_error(tmp_path: Path) -> None:
    """BEGIN IMMEDIATE runs on the DBAPI connection, yet a lock timeout is still SQLAlchemy's OperationalError (503)."""
    path = tmp_path / "locked.db"
    engine = make_engine(f"sqlite:///{path}", sqlite_busy_timeout=0.2)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(exc.OperationalError) as raised, engine.begin():
            pytest.fail("BEGIN IMMEDIATE succeeded while another connection held the write lock")
        assert "locked" in str(raised.value.orig)
        assert is_unavailable(raised.value)
    finally:
        blocker.rollback()
        blocker.close()
    # The connection went back to the pool in a usable state.
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO t VALUES (1)"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 1
    engine.dispose()


def test_remembered_time_conversions_depend_on_the_instant_only(tmp_path: Path) -> None:
    """Direct remembers datetime conversions: one instant in any zone is stored alike, distinct instants apart."""
    engine = make_engine(f"sqlite:///{tmp_path / 'times.db'}")
    table = Table("times", MetaData(), Column("id", Integer, primary_key=True), Column("at", UTCDateTime()))
    table.metadata.create_all(engine)
    statement = Direct(insert(table))
    utc = datetime(2026, 1, 1, 0, 0, tzinfo=timezone.utc)
    values = [
        utc,
        utc.astimezone(timezone(timedelta(hours=8))),  # equal to utc, written differently
        utc.replace(tzinfo=None),  # naive means UTC
        utc + timedelta(microseconds=1),
        utc.astimezone(timezone(timedelta(hours=8))) + timedelta(hours=1),
        None,
    ]
    with engine.begin() as conn:
        for i, at in enumerate(values):
            statement.rows(conn, {"id": i, "at": at})
        stored = [row[0] for row in conn.execute(text("SELECT at FROM times ORDER BY id"))]
    assert stored == [
        "2026-01-01 00:00:00.000000",
        "2026-01-01 00:00:00.000000",
        "2026-01-01 00:00:00.000000",
        "2026-01-01 00:00:00.000001",
        "2026-01-01 01:00:00.000000",
        None,
    ]
    engine.dispose()


def test_stored_headers_come_from_the_wsgi_environ_bounded_and_without_credentials() -> None:
    """Content-Type and Content-Length have no HTTP_ prefix in the environ; everything kept is cut at 512 characters."""
    environ = {
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "17",
        "HTTP_X_SIGNATURE": "sha256 " + "A" * 700,
        "HTTP_X_NONCE_STR": "nonce-1",
        "HTTP_X_TIMESTAMP": "1767225600",
        "HTTP_AUTHORIZATION": "Bearer secret-token",
        "HTTP_COOKIE": "session=secret",
        "REMOTE_ADDR": "10.0.0.1",
    }
    kept = pick_headers(environ)
    assert kept == {
        "Content-Type": "application/json",
        "Content-Length": "17",
        "X-Signature": ("sha256 " + "A" * 700)[:512],
        "X-Nonce-Str": "nonce-1",
        "X-Timestamp": "1767225600",
    }

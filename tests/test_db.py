"""The PostgreSQL pool: no ping per checkout under load, yet a connection that died while idle is replaced."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, text

from receiver import db as db_module
from tests.conftest import create_postgres_database, drop_postgres_database

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url(postgres_admin_url: str):  # noqa: ANN201
    url = create_postgres_database(postgres_admin_url)
    try:
        yield url
    finally:
        drop_postgres_database(postgres_admin_url, url)


def _backend_pid(engine) -> int:  # noqa: ANN001
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def test_connection_killed_while_idle_is_replaced_before_use(pg_url, postgres_admin_url, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_SECONDS", 0.2)
    engine = db_module.make_engine(pg_url, pool_size=1)
    try:
        pid = _backend_pid(engine)
        admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        admin.dispose()
        time.sleep(0.4)
        # Without the idle check this checkout would hand out the dead connection and fail.
        assert _backend_pid(engine) != pid
    finally:
        engine.dispose()


def test_busy_connections_are_not_pinged(pg_url, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_SECONDS", 0.5)
    engine = db_module.make_engine(pg_url, pool_size=1)
    pings: list[float] = []
    real_ping = engine.dialect.do_ping

    def counting_ping(dbapi_connection):  # noqa: ANN001, ANN202
        pings.append(time.monotonic())
        return real_ping(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counting_ping)
    try:
        pid = _backend_pid(engine)
        for _ in range(20):
            assert _backend_pid(engine) == pid
        assert pings == []  # back-to-back checkouts cost no extra round trip
        time.sleep(0.6)
        assert _backend_pid(engine) == pid
        assert len(pings) == 1  # an idle connection is checked once, and kept when alive
    finally:
        engine.dispose()


def test_direct_statement_error_is_wrapped_and_a_dead_connection_is_invalidated(pg_url, postgres_admin_url) -> None:  # noqa: ANN001
    """db.Direct skips execute(), not its error handling: the web tier's 503 mapping and the pool depend on it."""
    engine = db_module.make_engine(pg_url, pool_size=1)
    select_one = db_module.Direct(text("SELECT :x").bindparams(x=1))
    try:
        with engine.connect() as conn:
            assert select_one.first(conn, {"x": 7}) == (7,)
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as other:
                assert other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
            admin.dispose()
            with pytest.raises(Exception) as caught:
                select_one.first(conn, {"x": 8})
            assert db_module.is_unavailable(caught.value) and caught.value.connection_invalidated
        # The invalidated connection was not put back: the next checkout is a new backend that works.
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
            assert select_one.first(conn, {"x": 9}) == (9,)
    finally:
        engine.dispose()

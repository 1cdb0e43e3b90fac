"""The engines: PostgreSQL's pool (no ping per checkout under load, yet a connection that died while idle is
replaced), and SQLite's readers (they never wait for a writer, and cannot write)."""

from __future__ import annotations

import os
import socket
import time

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from receiver import db as db_module
from tests.conftest import create_postgres_database, drop_postgres_database

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


@pytest.mark.postgres
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


@pytest.mark.postgres
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


@pytest.mark.postgres
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


@pytest.mark.postgres
def test_a_transaction_that_sends_begin_with_its_first_statements_is_still_one_transaction(pg_url) -> None:  # noqa: ANN001
    """transaction_on's BEGIN rides with the first statements, whichever kind they are; all or nothing as before.

    The same with the COMMIT sent with the last statements (pipelined's ``commit``). And the
    pooled connection goes back as it came: psycopg sends its own BEGIN again.
    """
    engine = db_module.make_engine(pg_url, pool_size=1)
    insert = db_module.Direct(text("INSERT INTO t (v) VALUES (:v) RETURNING v"))
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (v int PRIMARY KEY)"))

        def rows() -> list[int]:
            with engine.connect() as conn:
                return list(conn.scalars(text("SELECT v FROM t ORDER BY v")))

        for first in ("direct", "pipelined", "plain"):
            with pytest.raises(RuntimeError), db_module.transaction_on(engine) as conn:
                driver = conn.connection.driver_connection
                if first == "direct":
                    assert insert.first(conn, {"v": 1}) == (1,)
                elif first == "pipelined":
                    assert db_module.pipelined(conn, [(insert, {"v": 1}), (insert, {"v": 2})]) == [[(1,)], [(2,)]]
                else:
                    conn.execute(text("INSERT INTO t (v) VALUES (1)"))
                # The statements ran in a transaction the server has open, though the driver is in autocommit.
                assert driver.autocommit and driver.info.transaction_status != 0
                raise RuntimeError("roll it back")
            assert rows() == [], first  # nothing ran outside the transaction

        with db_module.transaction_on(engine) as conn:
            db_module.pipelined(conn, [(insert, {"v": 3}), (insert, {"v": 4})])
            assert insert.first(conn, {"v": 5}) == (5,)
        assert rows() == [3, 4, 5]

        # A failed statement rolls back what the transaction did before it, BEGIN included.
        with pytest.raises(Exception) as caught, db_module.transaction_on(engine) as conn:
            db_module.pipelined(conn, [(insert, {"v": 6}), (insert, {"v": 3})])
        assert "duplicate key" in str(caught.value)
        assert rows() == [3, 4, 5]

        # The owner's COMMIT sent with the last statements: committed then, and its own commit finds nothing to do.
        with db_module.transaction_on(engine) as conn:
            assert insert.first(conn, {"v": 8}) == (8,)
            assert db_module.pipelined(conn, [(insert, {"v": 9})], commit=True) == [[(9,)]]
            assert conn.connection.driver_connection.info.transaction_status == 0  # none open: committed
            assert rows() == [3, 4, 5, 8, 9]  # as another connection sees it
        assert rows() == [3, 4, 5, 8, 9]
        # After a failed statement the server skips that COMMIT: nothing of the transaction stays.
        with pytest.raises(Exception) as caught, db_module.transaction_on(engine) as conn:
            db_module.pipelined(conn, [(insert, {"v": 10}), (insert, {"v": 11}), (insert, {"v": 3}), (insert, {"v": 12})], commit=True)
        assert "duplicate key" in str(caught.value)
        assert rows() == [3, 4, 5, 8, 9]

        # In a transaction psycopg has yet to begin (not autocommit, as an ORM Session's): ours begins it.
        for first in ("direct", "pipelined"):
            with Session(engine) as session:
                conn = session.connection()
                assert not conn.connection.driver_connection.autocommit
                if first == "direct":
                    assert insert.first(conn, {"v": 20}) == (20,)
                else:
                    assert db_module.pipelined(conn, [(insert, {"v": 20}), (insert, {"v": 21})]) == [[(20,)], [(21,)]]
                assert conn.connection.driver_connection.info.transaction_status != 0
                session.rollback()
            assert rows() == [3, 4, 5, 8, 9], first

        with engine.connect() as conn:  # the same pooled connection, given back in its own mode
            driver = conn.connection.driver_connection
            assert not driver.autocommit
            conn.execute(text("INSERT INTO t (v) VALUES (7)"))
            assert driver.info.transaction_status != 0  # psycopg's own BEGIN
            conn.rollback()
        assert rows() == [3, 4, 5, 8, 9]
    finally:
        engine.dispose()


def test_reads_of_an_sqlite_file_do_not_wait_for_another_processs_write(tmp_path, vectors) -> None:  # noqa: ANN001
    """Health probes, metrics scrapes, operators' queries and the due list read while another process holds the write lock.

    Beginning them with BEGIN IMMEDIATE, as writers do, queued each behind every writer: here for
    the whole busy timeout (then a 503 and a scrape reporting the database down), and under load
    for SQLite's busy-handler sleeps of up to 100 ms, with callbacks queued behind them in turn.
    """
    import sqlite3
    from datetime import timedelta

    from receiver import create_app
    from receiver.config import load_settings
    from receiver.models import utcnow
    from receiver.reconciliation import iter_due_codes
    from receiver.runtime import EXTENSION_KEY
    from tests.support import CALLBACK_PATH, Signer, callback_body, fresh_settings_env, migrate, voucher_item

    path = tmp_path / "receiver.db"
    url = f"sqlite:///{path}"
    migrate(url)
    app = create_app(load_settings(fresh_settings_env(url, vectors, tmp_path, SQLITE_BUSY_TIMEOUT_SECONDS="3")))
    runtime = app.extensions[EXTENSION_KEY]
    client = app.test_client()
    body = callback_body(voucher_item("READER", "VALID"))
    assert client.post(CALLBACK_PATH, data=body, headers=Signer(vectors["rm_server_private_pem"]).headers(body)).status_code == 200

    other_process = sqlite3.connect(path, isolation_level=None)
    other_process.execute("BEGIN IMMEDIATE")  # another writer, mid-transaction
    other_process.execute("UPDATE vouchers SET label = 'uncommitted'")
    try:
        started = time.monotonic()
        ready = client.get("/readyz")
        scrape = client.get("/metrics").get_data(as_text=True)
        with runtime.sessions() as session:
            label = session.execute(text("SELECT label FROM vouchers WHERE code = 'READER'")).scalar_one()
        due = list(iter_due_codes(runtime.sessions, utcnow() + timedelta(days=1), stale_after_seconds=60))
        took = time.monotonic() - started
    finally:
        other_process.rollback()
        other_process.close()
        runtime.engine.dispose()
    assert ready.status_code == 200, ready.get_json()
    assert "rmvs_database_up 1.0" in scrape
    assert label == "Free coffee", "a reader sees the last commit, not the other writer's work in progress"
    assert due == ["READER"]
    assert took < 1.0, f"the reads waited {took:.2f}s for the writer (busy timeout 3 s)"


def test_a_reading_session_of_an_sqlite_file_cannot_write(tmp_path) -> None:  # noqa: ANN001
    """A write in a reader's session fails at once and changes nothing; the same pooled connection then writes in begin().

    A reader begins deferred and outside the writer turn. Were it allowed to write, it would do so
    behind the turn's back, and fail only now and then, with SQLITE_BUSY, when another process
    had written since it began: a bug no single-process test would show.
    """
    import sqlite3

    from sqlalchemy import exc, func, insert, select

    from receiver.models import SchedulerLease, utcnow
    from tests.support import migrate

    path = tmp_path / "receiver.db"
    url = f"sqlite:///{path}"
    migrate(url)
    engine = db_module.make_engine(url)
    try:
        sessions = db_module.make_session_factory(engine)
        lease = {"name": "reconcile", "holder": "h", "acquired_at": utcnow(), "expires_at": utcnow()}
        with sessions() as session:
            with pytest.raises(exc.OperationalError, match="readonly database"):
                session.execute(insert(SchedulerLease).values(**lease))
            session.rollback()
            assert session.execute(select(func.count()).select_from(SchedulerLease)).scalar_one() == 0
            reader_connection = session.connection().connection.dbapi_connection
        with sessions.begin() as session:
            assert session.connection().connection.dbapi_connection is reader_connection
            session.execute(insert(SchedulerLease).values(**lease))
        with sessions() as session:
            assert session.execute(select(SchedulerLease.holder)).scalar_one() == "h"
        assert sqlite3.connect(path).execute("SELECT count(*) FROM scheduler_leases").fetchone() == (1,)
        # One reading engine per engine, whoever asks (the sessions, every /readyz probe): not one per call.
        assert db_module.reading(engine) is sessions.reader is db_module.reading(engine)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_statements_are_bounded_and_the_url_s_options_kept(postgres_url) -> None:  # noqa: ANN001
    """The service's engine (statement_timeout) cancels a statement that runs too long; options in the URL still apply."""
    separator = "&" if "?" in postgres_url else "?"
    bounded = db_module.make_engine(f"{postgres_url}{separator}options=-c%20work_mem%3D5MB", statement_timeout=0.5)
    unbounded = db_module.make_engine(postgres_url)  # migrations' engine: no limit
    try:
        with bounded.connect() as conn:
            assert (conn.scalar(text("SHOW statement_timeout")), conn.scalar(text("SHOW work_mem"))) == ("500ms", "5MB")
            # Keepalives on the client's socket, so a server host that vanished is found out.
            sock = socket.socket(fileno=os.dup(conn.connection.driver_connection.pgconn.socket))
            try:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
            finally:
                sock.close()
            started = time.monotonic()
            with pytest.raises(Exception) as caught:
                conn.execute(text("SELECT pg_sleep(5)"))
            assert db_module.is_unavailable(caught.value) and time.monotonic() - started < 2
        with unbounded.connect() as conn:
            assert conn.scalar(text("SHOW statement_timeout")) == "0"
    finally:
        bounded.dispose()
        unbounded.dispose()

"""receiver.pg_pipeline: a transaction's statements in one message, on libpq's pipeline mode.

Against the real PostgreSQL server: the answers must be what psycopg's own cursors give, errors
the same psycopg exceptions, and a dead connection must be recognised as one.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from sqlalchemy import create_engine, text

from receiver import db as db_module
from receiver import pg_pipeline

pytestmark = pytest.mark.postgres


@pytest.fixture
def driver(postgres_url: str):  # noqa: ANN201
    conn = psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    conn.execute("CREATE TABLE pp (id bigserial PRIMARY KEY, flag boolean, at timestamptz, n bigint, s varchar, u varchar UNIQUE)")
    try:
        yield conn
    finally:
        conn.close()


INSERT = "INSERT INTO pp (flag, at, n, s, u) VALUES (%s, %s::TIMESTAMP WITH TIME ZONE, %s::BIGINT, %s::VARCHAR, %s) RETURNING id, flag, at, n, s, u"


def test_rows_and_types_are_what_psycopg_cursors_give(driver) -> None:  # noqa: ANN001
    """Parameters go as text and the server infers their types; results load through psycopg's loaders."""
    at = datetime(2026, 12, 2, 18, 30, 5, 123456, tzinfo=timezone(timedelta(hours=8)))
    values = [
        (True, at, 2**40, "ünïcode 100% 'quoted' \\ back", "a"),
        (False, None, None, None, "b"),
        (None, at, -1, "", None),
    ]
    rows = pg_pipeline.send_together(driver, [(pg_pipeline.numbered(INSERT), v) for v in values], begin=True, commit=True)
    assert driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # committed
    expected = driver.execute("SELECT id, flag, at, n, s, u FROM pp ORDER BY id").fetchall()
    assert rows == [[row] for row in expected]
    assert [row[1:] for row in expected] == values  # the same instant, and NULLs as NULLs
    assert rows[0][0][2] == at and rows[0][0][2].utcoffset() is not None
    # Statements without rows give none; each statement's rows are its own.
    update = pg_pipeline.numbered("UPDATE pp SET n = %s::BIGINT WHERE u = %s")
    count = pg_pipeline.numbered("SELECT count(*) FROM pp WHERE n = %s::BIGINT")
    assert pg_pipeline.send_together(driver, [(update, (7, "a")), (update, (7, "b")), (count, (7,))]) == [[], [], [(2,)]]


def test_each_statement_is_prepared_once_per_connection(driver) -> None:  # noqa: ANN001
    insert = pg_pipeline.numbered(INSERT)
    select = pg_pipeline.numbered("SELECT s FROM pp WHERE u = %s")
    for i in range(3):
        rows = pg_pipeline.send_together(driver, [(insert, (True, None, i, "x", f"u{i}")), (select, (f"u{i}",))])
        assert rows[1] == [("x",)]
    prepared = driver.execute(
        "SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements WHERE name LIKE 'rmvs%' ORDER BY name"
    ).fetchall()
    assert prepared == [(insert.decode(), 3), (select.decode(), 3)]


def test_the_first_error_is_raised_after_every_answer_is_read(driver) -> None:  # noqa: ANN001
    """A unique violation midway: nothing after it runs, COMMIT included, and the connection stays usable."""
    insert = pg_pipeline.numbered(INSERT)
    with pytest.raises(psycopg.errors.UniqueViolation) as caught:
        pg_pipeline.send_together(
            driver, [(insert, (True, None, 1, "x", "dup")), (insert, (True, None, 2, "x", "dup")), (insert, (True, None, 3, "x", "z"))],
            begin=True, commit=True,
        )
    assert caught.value.pipeline_index == 1  # the statement that failed, for the error's report
    assert driver.info.transaction_status == psycopg.pq.TransactionStatus.INERROR  # the owner rolls back
    driver.execute("ROLLBACK")
    assert driver.execute("SELECT count(*) FROM pp").fetchone() == (0,)
    # A statement the server cannot prepare is an error like any other, and is not remembered as prepared.
    broken = pg_pipeline.numbered("SELECT no_such_column FROM pp WHERE u = %s")
    for _attempt in range(2):
        with pytest.raises(psycopg.errors.UndefinedColumn):
            pg_pipeline.send_together(driver, [(broken, ("a",))])
    assert pg_pipeline.send_together(driver, [(insert, (True, None, 4, "x", "ok"))])[0][0][5] == "ok"


def test_statements_dropped_behind_its_back_are_prepared_again(driver) -> None:  # noqa: ANN001
    """DEALLOCATE ALL (or DISCARD ALL) drops them: that one call fails, the next one prepares them again."""
    select = pg_pipeline.numbered("SELECT %s::int + 1")
    assert pg_pipeline.send_together(driver, [(select, (1,))]) == [[(2,)]]
    driver.execute("DEALLOCATE ALL")
    with pytest.raises(psycopg.errors.InvalidSqlStatementName):
        pg_pipeline.send_together(driver, [(select, (2,))])
    assert pg_pipeline.send_together(driver, [(select, (3,))]) == [[(4,)]]


def test_the_service_s_connections_leave_preparing_to_it(postgres_url) -> None:  # noqa: ANN001
    """psycopg's own preparing would DEALLOCATE ALL after any ROLLBACK (a reconciliation's savepoint, say)."""
    engine = db_module.make_engine(postgres_url, pool_size=1)
    select = db_module.Direct(text("SELECT CAST(:x AS integer) + 1"))
    try:
        with engine.connect() as conn:
            assert select.first(conn, {"x": 1}) == (2,)
            for _ in range(8):  # past psycopg's default threshold of 5
                with conn.begin():
                    conn.execute(text("SELECT 1 FROM scheduler_leases"))
                    with conn.begin_nested() as savepoint:
                        conn.execute(text("SELECT 2"))
                        savepoint.rollback()
            assert select.first(conn, {"x": 2}) == (3,)
    finally:
        engine.dispose()


def test_statements_larger_than_the_socket_buffers_go_through(driver) -> None:  # noqa: ANN001
    """Sending and reading interleave, so a pipeline bigger than both sides' buffers cannot block."""
    insert = pg_pipeline.numbered(INSERT)
    big = "x" * 300_000
    rows = pg_pipeline.send_together(driver, [(insert, (True, None, i, big, f"b{i}")) for i in range(32)], begin=True, commit=True)
    assert [r[0][3] for r in rows] == list(range(32)) and all(r[0][4] == big for r in rows)
    assert driver.execute("SELECT count(*), sum(length(s)) FROM pp").fetchone() == (32, 32 * 300_000)


def test_a_dead_connection_is_invalidated_and_replaced(postgres_url, postgres_admin_url) -> None:  # noqa: ANN001
    """Killed between transactions and between a transaction's statements: unavailable (a 503), then a new connection."""
    engine = db_module.make_engine(postgres_url, pool_size=1)
    insert = db_module.Direct(text("INSERT INTO scheduler_leases (name, holder, acquired_at, expires_at) VALUES (:n, 'h', now(), now()) RETURNING name"))
    admin = create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    try:
        for when in ("before BEGIN", "after the first statement"):
            with pytest.raises(Exception) as caught, db_module.transaction_on(engine) as conn:
                if when == "after the first statement":
                    assert db_module.pipelined(conn, [(insert, {"n": "first"}), (insert, {"n": "second"})]) == [[("first",)], [("second",)]]
                pid = conn.connection.driver_connection.info.backend_pid
                with admin.connect() as other:
                    assert other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
                db_module.pipelined(conn, [(insert, {"n": "third"}), (insert, {"n": "fourth"})], commit=True)
            assert db_module.is_unavailable(caught.value) and caught.value.connection_invalidated, when
            with db_module.transaction_on(engine) as conn:
                assert conn.connection.driver_connection.info.backend_pid != pid
                assert db_module.pipelined(conn, [(insert, {"n": when}), (insert, {"n": f"{when}!"})], commit=True)
            with engine.connect() as conn:
                assert conn.scalar(text("SELECT count(*) FROM scheduler_leases WHERE name = :n"), {"n": when}) == 1
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM scheduler_leases WHERE name IN ('first', 'third')")) == 0
    finally:
        admin.dispose()
        engine.dispose()


def test_a_server_that_stays_silent_is_given_up(driver) -> None:  # noqa: ANN001
    """With a patience set, no answer for that long closes the connection (OperationalError) instead of waiting for ever."""
    sleep = pg_pipeline.numbered("SELECT pg_sleep(%s::float8)")
    pg_pipeline.wait_at_most(driver, 0.3)
    # An answer within the patience is waited for, over several waits.
    assert pg_pipeline.send_together(driver, [(sleep, (0.1,)), (sleep, (0.1,))], begin=True, commit=True) == [[("",)], [("",)]]
    started = time.monotonic()
    with pytest.raises(pg_pipeline.NoAnswer, match="no answer from the database server for 0.3 s"):
        pg_pipeline.send_together(driver, [(sleep, (5,))], begin=True, commit=True)
    assert 0.25 < time.monotonic() - started < 2
    assert driver.closed  # SQLAlchemy's psycopg dialect takes a closed connection for a disconnect

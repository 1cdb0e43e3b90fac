"""SQLite WAL checkpoints run on the Checkpointer's thread, not inside commits, and still bound the WAL."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from sqlalchemy import Engine, event, text

from receiver.db import Checkpointer, WriterTurn, checkpointer_of, make_engine

PAGE = 4096


def _wal_size(path: Path) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except FileNotFoundError:
        return 0


def _blobs_database(path: Path, sqlite_synchronous: str = "FULL", **settings: float) -> tuple[Engine, Checkpointer]:
    """An engine on a new file with a ``blobs`` table, and its Checkpointer with ``settings`` applied."""
    engine = make_engine(f"sqlite:///{path}", sqlite_synchronous=sqlite_synchronous)
    checkpointer = checkpointer_of(engine)
    assert checkpointer is not None
    for name, value in settings.items():
        setattr(checkpointer, name, value)
    with engine.begin() as conn:
        # The setting that keeps a checkpoint out of the commit (and so out of the writer turn).
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        conn.execute(text("CREATE TABLE blobs (b BLOB)"))
    return engine, checkpointer


def test_commits_do_not_checkpoint_and_the_checkpointer_copies_the_wal_then_stops(tmp_path: Path) -> None:
    """A commit leaves the WAL to the Checkpointer's thread, which copies it into the file and ends when idle."""
    path = tmp_path / "c.db"
    engine, checkpointer = _blobs_database(path, idle=0.5)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO blobs VALUES (:b)"), [{"b": os.urandom(PAGE)} for _ in range(2000)])
    assert _wal_size(path) > 2000 * PAGE

    deadline = time.monotonic() + 10
    while os.path.getsize(path) < 2000 * PAGE and time.monotonic() < deadline:
        time.sleep(0.02)
    assert os.path.getsize(path) >= 2000 * PAGE, "the checkpointer copied the WAL into the database file"
    assert checkpointer.checkpoints >= 1
    while checkpointer.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not checkpointer.running(), "the thread ends once commits stop"
    with engine.begin() as conn:  # and a later commit starts it again
        conn.execute(text("INSERT INTO blobs VALUES (x'00')"))
    assert checkpointer.running()
    engine.dispose()


def test_a_commit_slower_than_the_checkpointer_is_still_checkpointed(tmp_path: Path) -> None:
    """The checkpointer is woken after a commit's frames are in the WAL, so a slow commit's pages are copied too."""
    path = tmp_path / "s.db"
    engine, checkpointer = _blobs_database(path, interval=0.01, idle=1.0)
    assert checkpointer.running()  # waiting for the next nudge

    # SQLAlchemy's "commit" event runs just before the DBAPI commit: holding it there is a commit
    # that takes longer than the checkpointer needs to wake, run and go back to waiting.
    event.listen(engine, "commit", lambda _conn: time.sleep(0.15))
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO blobs VALUES (:b)"), [{"b": os.urandom(PAGE)} for _ in range(500)])
    deadline = time.monotonic() + 10
    while checkpointer.running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not checkpointer.running()
    assert os.path.getsize(path) >= 500 * PAGE, "the last commit's WAL frames were copied before the thread stopped"
    engine.dispose()


def test_wal_stays_bounded_under_back_to_back_writers(tmp_path: Path) -> None:
    """Writers that never pause (as under a burst) cannot grow the WAL past its bound: the checkpointer takes the turn."""
    path = tmp_path / "w.db"
    engine, checkpointer = _blobs_database(path, "NORMAL", restart_frames=500, interval=0.02)

    largest = _write_back_to_back(engine, path, writers=2, transactions=400, pages=16)

    written = 2 * 400 * 17 * PAGE  # ~55 MB of WAL frames without a restart
    assert checkpointer.before_begins >= 1
    assert largest < 12 * 1024 * 1024, f"WAL reached {largest / 2**20:.1f} MB of {written / 2**20:.0f} MB written"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM blobs")).scalar() == 2 * 400 * 16
    engine.dispose()


def _write_back_to_back(engine: Engine, path: Path, writers: int, transactions: int, pages: int) -> int:
    """``writers`` threads (each with its own WriterTurn, like worker processes) commit without pause; the WAL's largest size."""
    largest = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal largest
        while not stop.is_set():
            largest = max(largest, _wal_size(path))
            time.sleep(0.002)

    def write() -> None:
        turn = WriterTurn(f"{path}-writer.lock", 10.0)
        for _ in range(transactions):
            with turn.hold(), engine.begin() as conn:
                conn.execute(text("INSERT INTO blobs VALUES (:b)"), [{"b": os.urandom(PAGE)} for _ in range(pages)])

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=write) for _ in range(writers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()
        watcher.join()
    return max(largest, _wal_size(path))


def test_writers_that_outrun_the_checkpointer_stop_at_the_wal_limit(tmp_path: Path) -> None:
    """A checkpointer thread that falls behind (here: never checkpoints again) cannot let the WAL grow past its limit.

    In CI a checkpoint's fsync sat behind another test's while the writers (which do not wait for
    the disk at synchronous=NORMAL) wrote 55 MB; the writers themselves now copy the WAL once it
    is past the limit, and restart it.
    """
    path = tmp_path / "l.db"
    # After its first checkpoint the thread sleeps for the rest of the test: only the limit is left.
    engine, checkpointer = _blobs_database(path, "NORMAL", restart_frames=200, interval=60.0)
    limit = checkpointer.limit_bytes()
    transaction = 20 * (PAGE + Checkpointer.FRAME_HEADER)  # 16 rows of a page and the b-tree pages they touch (measured)

    largest = _write_back_to_back(engine, path, writers=2, transactions=300, pages=16)

    # ~20 MB were written; a writer past the limit finds it at its next BEGIN, so one transaction over at most.
    assert largest <= limit + 2 * transaction, f"WAL reached {largest / 2**20:.2f} MB, limit {limit / 2**20:.2f} MB"
    assert checkpointer.checkpoints <= 1, "the thread did not help"
    assert checkpointer.over_limit_catch_ups >= 3, "the writers restarted the WAL again and again"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM blobs")).scalar() == 2 * 300 * 16
    engine.dispose()


def test_a_wal_grown_past_the_limit_shrinks_back_to_it_after_the_next_restart(tmp_path: Path) -> None:
    """One transaction larger than the limit cannot be stopped, but the file is cut back once the WAL restarts."""
    path = tmp_path / "g.db"
    engine, checkpointer = _blobs_database(path, "NORMAL", restart_frames=100, interval=60.0)
    limit = checkpointer.limit_bytes()
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO blobs VALUES (:b)"), [{"b": os.urandom(PAGE)} for _ in range(1000)])
    assert _wal_size(path) > 2 * limit

    # The next writer copies the WAL, restarts it, and its commit truncates the file to the limit.
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO blobs VALUES (x'00')"))
    assert _wal_size(path) <= limit
    assert not checkpointer.over_limit()
    assert checkpointer.over_limit_catch_ups == 1
    assert os.path.getsize(path) >= 1000 * PAGE, "the rows were copied into the database file before the restart"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM blobs")).scalar() == 1001
    engine.dispose()


def test_checkpointer_never_creates_a_database_that_has_gone(tmp_path: Path) -> None:
    """A nudge after the database file was removed logs and ends; it does not leave an empty new database."""
    gone = tmp_path / "gone.db"
    checkpointer = Checkpointer(str(gone), idle=0.1)
    checkpointer.nudge()
    deadline = time.monotonic() + 5
    while checkpointer.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not checkpointer.running()
    assert not gone.exists()


def test_a_writer_due_to_restart_the_wal_copies_it_before_taking_the_turn(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """The copy a WAL restart needs runs before the writer turn is taken; in the turn only what came in between is left.

    In the turn, that checkpoint held every other writer for 30-75 ms while a retention purge
    rewrote rows (docs/performance.md). Both kinds of writer do it: a session's ``begin()`` and a
    group of callbacks.
    """
    from receiver.db import make_session_factory, writer_turn
    from receiver.group_commit import GroupCommit
    from tests.support import migrate, verified_callback

    path = tmp_path / "t.db"
    migrate(f"sqlite:///{path}")
    engine, checkpointer = _blobs_database(path, interval=60.0)  # the thread copies once, then sleeps
    turn = writer_turn(engine)
    assert turn is not None
    held = threading.Event()
    real_hold = turn.hold

    def hold():  # noqa: ANN202
        with real_hold():
            held.set()
            try:
                yield
            finally:
                held.clear()

    monkeypatch.setattr(turn, "hold", contextlib.contextmanager(hold))
    checkpoints: list[bool] = []  # for each checkpoint a writer ran: was the turn held?

    @event.listens_for(engine, "connect")
    def _trace(dbapi_connection, _record) -> None:  # noqa: ANN001
        dbapi_connection.set_trace_callback(
            lambda sql: checkpoints.append(held.is_set()) if sql.startswith("PRAGMA wal_checkpoint") else None
        )

    engine.dispose()  # the pool's connections are made anew, traced
    deadline = time.monotonic() + 10
    while checkpointer.checkpoints < 1 and time.monotonic() < deadline:
        time.sleep(0.01)

    def frames_left_to_copy() -> None:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO blobs VALUES (:b)"), [{"b": os.urandom(PAGE)} for _ in range(300)])
        checkpoints.clear()
        checkpointer.restart_due = True

    frames_left_to_copy()
    with make_session_factory(engine).begin() as session:
        session.execute(text("INSERT INTO blobs VALUES (x'00')"))
    assert checkpoints == [False, True], "copied before the turn, then the rest (nothing) in it"
    assert not checkpointer.restart_due

    frames_left_to_copy()
    GroupCommit(engine, turn=turn).submit(*verified_callback("CKPT-1", "VALID", 0))
    assert checkpoints == [False, True]

    checkpoints.clear()  # not due: no checkpoint at all on the writer's way in
    with make_session_factory(engine).begin() as session:
        session.execute(text("INSERT INTO blobs VALUES (x'01')"))
    assert checkpoints == []
    engine.dispose()

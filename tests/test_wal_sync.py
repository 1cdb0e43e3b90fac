"""SQLite commits are durable when commit() returns: the WAL is flushed after COMMIT (db.WalSync).

A power cut cannot be staged here, so these tests watch the system calls that durability rests
on: every fsync is recorded (and still made) by wrapping os.fsync, and each test checks which
file was flushed, and when, relative to the commit, the writer turn and the answer.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import select, text

from receiver.db import deferred_wal_syncs, make_engine, make_session_factory, reading, writer_turn
from receiver.group_commit import GroupCommit
from receiver.models import DeliveryOutcome, WebhookDelivery
from tests.support import CALLBACK_PATH, callback_body, migrate, verified_callback, voucher_item


class FsyncLog:
    """os.fsync, recording the inode of every file it flushes; ``hold``/``fail`` stage a slow or broken disk."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inodes: list[int] = []
        self.hold: threading.Event | None = None
        self.entered = threading.Event()
        self.fail = False
        real = os.fsync

        def fsync(fd: int) -> None:
            self.inodes.append(os.fstat(fd).st_ino)
            self.entered.set()
            if self.hold is not None:
                self.hold.wait(10)
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def flushed(self, path: Path) -> int:
        """How many times the file now at ``path`` was flushed."""
        inode = path.stat().st_ino
        return sum(1 for i in self.inodes if i == inode)


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "wal.db"
    migrate(f"sqlite:///{path}")
    yield path


def _wal(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def test_a_commit_returns_only_after_its_wal_is_flushed(sqlite_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(f"sqlite:///{sqlite_file}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL: COMMIT leaves the flush to us
            assert conn.connection.dbapi_connection.wal_sync is not None
        fsyncs = FsyncLog(monkeypatch)
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO scheduler_leases (name, holder, acquired_at, expires_at) VALUES ('a', 'h', '2030-01-01', '2030-01-01')"))
        assert fsyncs.flushed(_wal(sqlite_file)) == 1
        # The first flush of this WAL file also made its directory entry durable; later ones do not need to.
        assert fsyncs.flushed(sqlite_file.parent) == 1
        with engine.begin() as conn:
            conn.execute(text("UPDATE scheduler_leases SET holder = 'g'"))
        assert fsyncs.flushed(_wal(sqlite_file)) == 2 and fsyncs.flushed(sqlite_file.parent) == 1
        # Reading outside a transaction commits nothing, so it flushes nothing.
        with engine.connect() as conn:
            assert conn.execute(text("SELECT holder FROM scheduler_leases")).scalar() == "g"
        assert fsyncs.flushed(_wal(sqlite_file)) == 2

        # Deferred: commit() returns before the flush, which happens when the owner says so.
        with deferred_wal_syncs() as flush:
            with engine.begin() as conn:
                conn.execute(text("UPDATE scheduler_leases SET holder = 'f'"))
            assert fsyncs.flushed(_wal(sqlite_file)) == 2
            flush()
            assert fsyncs.flushed(_wal(sqlite_file)) == 3
        # A deferred flush nobody asked for is still made on the way out.
        with deferred_wal_syncs():
            with engine.begin() as conn:
                conn.execute(text("UPDATE scheduler_leases SET holder = 'e'"))
        assert fsyncs.flushed(_wal(sqlite_file)) == 4
    finally:
        engine.dispose()


def test_a_reader_that_commits_flushes_nothing_unless_it_wrote(sqlite_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers (metrics scrapes, probes, operators' queries) commit without a flush; one that wrote after all is flushed."""
    engine = make_engine(f"sqlite:///{sqlite_file}")
    try:
        sessions = make_session_factory(engine)
        with sessions.begin() as session:
            session.execute(text("INSERT INTO scheduler_leases (name, holder, acquired_at, expires_at) VALUES ('a', 'h', '2030-01-01', '2030-01-01')"))
        fsyncs = FsyncLog(monkeypatch)
        with sessions() as session:
            assert session.execute(text("SELECT holder FROM scheduler_leases")).scalar() == "h"
            session.commit()
        assert fsyncs.flushed(_wal(sqlite_file)) == 0, "a reader's commit wrote nothing to flush"
        with reading(engine).begin() as conn:
            # Readers are query_only (test_db); one that lifts it and writes must still be durable.
            conn.exec_driver_sql("PRAGMA query_only=0")
            conn.execute(text("UPDATE scheduler_leases SET holder = 'g'"))
        assert fsyncs.flushed(_wal(sqlite_file)) == 1, "a reader that changed a row must be flushed like any writer"
    finally:
        engine.dispose()


def test_sqlite_own_full_when_asked(sqlite_file: Path) -> None:
    # The benchmarks' baseline receiver commits the standard way: SQLite flushes inside COMMIT.
    engine = make_engine(f"sqlite:///{sqlite_file}", sqlite_sync_after_commit=False)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
            assert conn.connection.dbapi_connection.wal_sync is None
    finally:
        engine.dispose()


def test_callbacks_flush_after_giving_up_the_writer_turn_and_before_answering(
    sqlite_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(f"sqlite:///{sqlite_file}")
    turn = writer_turn(engine)
    assert turn is not None
    committer = GroupCommit(engine, turn=turn)
    fsyncs = FsyncLog(monkeypatch)
    fsyncs.hold = threading.Event()
    answers: list = []
    worker = threading.Thread(target=lambda: answers.append(committer.submit(*verified_callback("WS-1", "VALID", 0))))
    try:
        worker.start()
        assert fsyncs.entered.wait(10), "the callback's commit was never flushed"
        time.sleep(0.05)
        # While its WAL flush is under way, the callback is committed but not answered...
        assert answers == []
        with engine.connect() as conn:
            assert conn.execute(select(WebhookDelivery.voucher_code)).scalars().all() == ["WS-1"]
        # ...and another writer (here: another open file, as another worker process would hold)
        # can take the writer turn: nobody waits for this callback's disk write.
        with open(turn.path, "a+b") as other:
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(other.fileno(), fcntl.LOCK_UN)
    finally:
        fsyncs.hold.set()
        worker.join(10)
        engine.dispose()
    assert [a.status for a in answers] == [DeliveryOutcome.ACCEPTED]
    assert fsyncs.flushed(_wal(sqlite_file)) >= 1


def test_a_wal_that_cannot_be_flushed_is_a_503_and_the_retry_a_duplicate(
    sqlite_file: Path, vectors: dict, rm_signer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    from receiver import create_app
    from tests.support import fresh_settings_env

    for key, value in fresh_settings_env(f"sqlite:///{sqlite_file}", vectors, tmp_path).items():
        monkeypatch.setenv(key, value)
    client = create_app().test_client()
    fsyncs = FsyncLog(monkeypatch)
    body = callback_body(voucher_item("WS-EIO", "VALID", 0))
    fsyncs.fail = True
    response = client.post(CALLBACK_PATH, data=body, headers=rm_signer.headers(body))
    # Committed, but not known to be on disk: RM must not be told it is safe.
    assert response.status_code == 503, response.get_data(as_text=True)
    fsyncs.fail = False
    retry = client.post(CALLBACK_PATH, data=body, headers=rm_signer.headers(body))
    assert retry.status_code == 200 and retry.get_json() == {"status": "duplicate"}
    engine = make_engine(f"sqlite:///{sqlite_file}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(WebhookDelivery.outcome, WebhookDelivery.attempts)).all()
            assert [tuple(r) for r in rows] == [(DeliveryOutcome.ACCEPTED.value, 2)]
    finally:
        engine.dispose()

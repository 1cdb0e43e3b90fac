"""Engines and sessions for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import fcntl
import functools
import logging
import os
import signal
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from sqlalchemy import (
    Connection, DateTime, Dialect, Engine, Executable, Table, TextClause, TypeDecorator, bindparam, create_engine, event,
    exc, text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from . import pg_pipeline


class WriterTurnTimeout(Exception):
    """Another writer held the SQLite write turn for the whole busy timeout: the database is locked."""


class WalSyncError(Exception):
    """A commit's SQLite WAL could not be flushed to disk: it may not survive a power loss."""


# Errors that mean "the database cannot take the write right now", as opposed to a bug of ours.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    WriterTurnTimeout,
    WalSyncError,
    exc.OperationalError,
    exc.InterfaceError,
    exc.DisconnectionError,
    exc.TimeoutError,
)

_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()

_checkpointers: "weakref.WeakKeyDictionary[Engine, Checkpointer]" = weakref.WeakKeyDictionary()

# How long a background writer's transaction (a reconciliation pass, a backfill page, the
# retention purge) may hold the writer turn before it commits and lets waiting callbacks go first.
WRITER_TURN_BUDGET_SECONDS = 0.005


def turn_budget(seconds: float) -> Callable[[], bool]:
    """For one background writer's transaction: a test that allows its first step, then more until ``seconds`` have passed.

    Always one step, so a writer whose steps each take longer than the budget still advances.
    """
    deadline = time.monotonic() + seconds
    first = True

    def more() -> bool:
        nonlocal first
        if first:
            first = False
            return True
        return time.monotonic() < deadline

    return more


# One writer turn per SQLite file engine, shared by every writer of the process (group commit, sessions).
_turns: "weakref.WeakKeyDictionary[Engine, WriterTurn]" = weakref.WeakKeyDictionary()

log = logging.getLogger(__name__)


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
    url: str,
    *,
    sqlite_synchronous: str = "FULL",
    sqlite_busy_timeout: float = 10.0,
    pool_size: int = 10,
    sqlite_sync_after_commit: bool = True,
    statement_timeout: float | None = None,
) -> Engine:
    """Create an engine tuned for this service: WAL + BEGIN IMMEDIATE on SQLite, a checked pool on PostgreSQL.

    SQLite with ``sqlite_synchronous="FULL"`` makes every commit durable before commit() returns.
    By default it does so with WalSync (the WAL is flushed right after the commit, outside SQLite's
    write lock); ``sqlite_sync_after_commit=False`` leaves it to SQLite's own FULL (flushed inside
    the commit), which the benchmarks' baseline receiver uses. ``statement_timeout`` (seconds,
    PostgreSQL) bounds how long a statement may wait: see _bounded_waits.
    """
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(
            url, parsed.database, sqlite_synchronous, sqlite_busy_timeout,
            sync_after_commit=sqlite_sync_after_commit and sqlite_synchronous == "FULL",
        )
    else:
        engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_timeout=5,
            pool_recycle=1800,
            connect_args={
                "connect_timeout": 5,
                "application_name": "rm-voucher-sync",
                **_bounded_waits(parsed.query, statement_timeout),
            },
        )
        if statement_timeout is not None:
            _give_up_on_silence(engine, statement_timeout + ANSWER_GRACE_SECONDS)
        _ping_when_idle(engine)
        _begin_before_other_statements(engine)
        _statements_prepared_by_pg_pipeline(engine)
    _engines.add(engine)
    return engine


# A pooled connection unused for longer than this is checked before use.
PING_AFTER_IDLE_SECONDS = 5.0

T = TypeVar("T")


def once_more_if_connection_died(work: Callable[[], T]) -> T:
    """Run ``work``, one whole transaction; run it once more if it failed on a pooled connection found dead."""
    # A connection used less than PING_AFTER_IDLE_SECONDS ago is not pinged, so one that died since
    # (the database restarted, a proxy or failover dropped it) is found dead only by the statement
    # sent on it. SQLAlchemy then invalidates it and every pooled connection as old, so the second
    # run connects afresh: it succeeds if the database is back, and fails (a 503) if it is down.
    # Running a callback's transaction again is safe even when the lost answer was that of its
    # COMMIT: the delivery's unique key makes the second run find it and answer "duplicate".
    try:
        return work()
    except exc.DBAPIError as error:
        # A server that answered nothing for the whole patience is hung, not restarted: asking it
        # again would only double the wait before the 503.
        if not error.connection_invalidated or isinstance(error.orig, pg_pipeline.NoAnswer):
            raise
        log.warning("database connection found dead, retrying once on a new one: %s", type(error.orig).__name__)
    return work()


# How much longer than the statement timeout a client waits for an answer before it gives the
# connection up: the server's own cancel (a clean error, the connection kept) normally comes first.
ANSWER_GRACE_SECONDS = 2.0


def _bounded_waits(query: Mapping[str, Any], statement_timeout: float | None) -> dict[str, Any]:
    """libpq settings so that no request waits on PostgreSQL for ever (the URL's own settings win).

    A callback that waits on a row lock (an operator's open transaction), a stuck server or a
    silent network holds a worker thread, and with them its pool connection; enough of them and
    the service answers nothing, while RM stops retrying after five minutes. The server cancels
    any statement that runs longer than ``statement_timeout`` (the transaction rolls back, the
    caller answers 503), and TCP keepalives find a peer that vanished. A server that still holds
    the connection open but answers nothing is pg_pipeline's patience (_give_up_on_silence).
    """
    if statement_timeout is None:
        return {}
    milliseconds = max(1, round(statement_timeout * 1000))
    given = query.get("options") or ()
    options = " ".join([*([given] if isinstance(given, str) else given), f"-c statement_timeout={milliseconds}"])
    keepalives = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
    return {"options": options, **{k: v for k, v in keepalives.items() if k not in query}}


def _give_up_on_silence(engine: Engine, seconds: float) -> None:
    """pg_pipeline closes a connection whose server stays silent for ``seconds`` while an answer is due."""

    @event.listens_for(engine, "connect")
    def _patience(dbapi_connection, _record) -> None:  # noqa: ANN001
        pg_pipeline.wait_at_most(dbapi_connection, seconds)


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection only when it sat idle: a dead one after a database restart is replaced.

    SQLAlchemy's pool_pre_ping costs a round trip on every checkout, i.e. on every callback. A
    connection that came back to the pool moments ago was alive moments ago; if it died since,
    its first statement fails with a disconnect error, SQLAlchemy replaces every connection
    older than that failure, and a callback runs its transaction once more
    (once_more_if_connection_died).
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


def _sqlite_file(database: str | None) -> Path | None:
    """The file behind an SQLite URL's database part; None for in-memory and file: URI databases."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().resolve()


def _sqlite_engine(
    url: str, database: str | None, synchronous: str, busy_timeout: float, *, sync_after_commit: bool
) -> Engine:
    path = _sqlite_file(database)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    wal_sync = WalSync(str(path)) if path is not None and sync_after_commit else None
    checkpointer = Checkpointer(str(path), synchronous) if path is not None else None
    connect_args: dict[str, Any] = {"timeout": busy_timeout, "check_same_thread": False}
    if path is not None:
        connect_args["factory"] = SqliteFileConnection
    engine = create_engine(url, connect_args=connect_args)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # noqa: ANN001
        # Let SQLAlchemy, not pysqlite, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        in_wal = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal"
        if wal_sync is not None and in_wal:
            # Durable all the same: WalSync flushes the WAL after every commit (see there).
            dbapi_connection.wal_sync = wal_sync
            cursor.execute("PRAGMA synchronous=NORMAL")
        else:
            # Without a WAL (a file system without shared memory), SQLite's own setting decides.
            cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        if checkpointer is not None:
            # Checkpoints move to the Checkpointer's thread: run inside a commit, one would hold
            # the writer turn (and so every other writer) while it copies and fsyncs the WAL.
            cursor.execute("PRAGMA wal_autocheckpoint=0")
            checkpointer.page_size = cursor.execute("PRAGMA page_size").fetchone()[0]
            # A WAL that grew past the limit (Checkpointer) is cut back to it once it restarts.
            cursor.execute(f"PRAGMA journal_size_limit={checkpointer.limit_bytes()}")
            dbapi_connection.checkpointer = checkpointer
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001
        # A writer takes the write lock up front: deliveries for one voucher then serialise
        # instead of failing with "database is locked" when two readers both try to upgrade.
        # A reader (reading(engine)) begins deferred: in WAL mode it takes no lock at all, so a
        # health probe, a metrics scrape or an operator's query never queues with the writers.
        dbapi_connection = conn.connection.dbapi_connection
        reader = bool(conn.get_execution_options().get(_READ_ONLY))
        begin = "BEGIN" if reader else "BEGIN IMMEDIATE"
        if isinstance(dbapi_connection, SqliteFileConnection):
            dbapi_connection.reader_began_at = dbapi_connection.total_changes if reader else None
            if dbapi_connection.query_only != reader:
                # A reader that wrote would write outside the writer turn, and its deferred
                # transaction could fail at random with SQLITE_BUSY once another process wrote
                # since it began. query_only makes every such write fail at once, in tests too.
                dbapi_connection.execute(f"PRAGMA query_only={int(reader)}")
                dbapi_connection.query_only = reader
        if checkpointer is not None and not reader:
            checkpointer.before_begin(dbapi_connection)
        # On the DBAPI connection: exec_driver_sql's execution context cost more than the BEGIN.
        # Errors still go through SQLAlchemy's handler (wrapped, e.g. OperationalError when locked).
        try:
            dbapi_connection.execute(begin)
        except sqlite3.Error as error:
            conn._handle_dbapi_exception(error, begin, (), None, None)

    if checkpointer is not None:
        _checkpointers[engine] = checkpointer
    if path is not None:
        _turns[engine] = WriterTurn(f"{path}-writer.lock", busy_timeout)
    return engine


_deferred_wal_syncs: contextvars.ContextVar[set["WalSync"] | None] = contextvars.ContextVar(
    "rmvs_deferred_wal_syncs", default=None
)


class WalSync:
    """Makes SQLite commits durable by flushing the WAL right after each commit instead of inside it.

    With ``synchronous=FULL`` SQLite fsyncs the WAL inside COMMIT, while it still holds the write
    lock (and the callback path its writer turn), so every other writer waits for the disk too:
    about half of a callback's time under the lock. Connections of a file database therefore run
    with ``synchronous=NORMAL`` (COMMIT writes the WAL but does not flush it), and commit() returns
    only after this fsyncs the WAL file; a callback is answered only after that. The guarantee is
    the one FULL gives: a commit that returned is on disk.

    - An fsync flushes everything written to the file before it, other processes' commits too,
      and the WAL is only appended to until a checkpoint has copied all of it into the database
      file and synced that (SQLite's NORMAL still syncs at checkpoints). So a commit's frames are
      either in the WAL when it is flushed, or already durable in the database file.
    - Writers that commit at the same moment flush together: the disk's work is shared.
    - What FULL gives and this does not: another connection may read a commit in the moment
      before its flush. A reader that acts on it is at most one power cut ahead of the disk; every
      answer this service gives waits for its own flush.
    - The first flush of a new WAL file also flushes its directory, as SQLite does.

    The callback path (group_commit.py) defers the flush until it has given up its writer turn
    (``deferred_wal_syncs``); every other transaction flushes inside commit().
    """

    def __init__(self, database_path: str) -> None:
        self.path = database_path + "-wal"
        self.directory = os.path.dirname(database_path) or "."
        self._inode: int | None = None

    def committed(self) -> None:
        """A transaction on this database has just committed: flush now, or when the deferring caller says."""
        pending = _deferred_wal_syncs.get()
        if pending is not None:
            pending.add(self)
        else:
            self.flush()

    def flush(self) -> None:
        """fsync the WAL (and its directory when the file is new); WalSyncError if the disk refuses."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            # The committing connection is still open, so SQLite has not removed the WAL.
            raise WalSyncError(f"cannot open the SQLite WAL to flush it: {error.strerror}") from None
        try:
            os.fsync(fd)
            inode = os.fstat(fd).st_ino
            if inode != self._inode:
                directory = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)
                self._inode = inode
        except OSError as error:
            raise WalSyncError(f"could not flush the SQLite WAL to disk: {error.strerror}") from None
        finally:
            os.close(fd)


class SqliteFileConnection(sqlite3.Connection):
    """A connection to an SQLite file whose commit() nudges the Checkpointer and returns once on disk (WalSync)."""

    wal_sync: WalSync | None = None
    checkpointer: Checkpointer | None = None
    # total_changes when a reader's transaction began (db.reading); None in a writer's.
    reader_began_at: int | None = None
    # PRAGMA query_only as last set: on while the connection serves a reader's transaction.
    query_only: bool = False

    def commit(self) -> None:  # noqa: D102
        committing = self.in_transaction
        super().commit()
        if not committing:
            return
        if self.reader_began_at is not None and self.total_changes == self.reader_began_at:
            # A reader that changed no row committed nothing: no WAL to copy or flush.
            return
        # After the commit, not in SQLAlchemy's "commit" event (which runs before it): a nudge
        # that woke the checkpointer before the frames were in the WAL let it checkpoint without
        # them and then stop, leaving the last burst's WAL uncopied until the next commit.
        if self.checkpointer is not None:
            self.checkpointer.nudge()
        if self.wal_sync is not None:
            self.wal_sync.committed()


@contextlib.contextmanager
def deferred_wal_syncs() -> Iterator[Callable[[], None]]:
    """Commits inside wait for their WAL flush only when the yielded function is called (outside any lock).

    On the way out, flushes still owed are made anyway, so no commit is left unflushed.
    """
    pending: set[WalSync] = set()
    token = _deferred_wal_syncs.set(pending)

    def flush() -> None:
        while pending:
            pending.pop().flush()

    try:
        yield flush
    finally:
        _deferred_wal_syncs.reset(token)
        for wal_sync in pending:
            with contextlib.suppress(WalSyncError):
                wal_sync.flush()


def _passive_checkpoint(dbapi_connection: sqlite3.Connection, when: str, wait: float = 0.0) -> bool:
    """One PASSIVE checkpoint on a writer's connection; False (and a warning) if it failed.

    Another connection's checkpoint in progress makes SQLite skip this one (busy, no busy
    handler); with ``wait`` it is tried again until that one ends, for at most ``wait`` seconds.
    Housekeeping: a failure must not fail the writer it runs for.
    """
    deadline = time.monotonic() + wait
    try:
        while dbapi_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] and time.monotonic() < deadline:
            time.sleep(0.001)
    except sqlite3.Error as error:
        log.warning("sqlite checkpoint %s failed: %s", when, error)
        return False
    return True


class Checkpointer:
    """Checkpoints an SQLite file's WAL on a thread of its own, so that commits do not wait for the bulk of a checkpoint.

    SQLite's auto-checkpoint runs inside whichever commit takes the WAL past 1,000 pages, and that
    commit returns only after the pages are copied into the database file and fsynced; under the
    writer turn every other writer waited for it (a ~270 ms stall of all callbacks after a burst).
    Connections of a file database therefore run with ``wal_autocheckpoint=0``, and each commit
    nudges this thread, which runs a PASSIVE checkpoint (it blocks no writer or reader) at most
    every ``interval`` seconds while commits keep coming.

    A writer restarts the WAL from its start only if its transaction began after a checkpoint had
    copied every frame, and under steady writes the next transaction has nearly always begun
    before a checkpoint outside the turn ends, so the WAL would grow without end. Once the WAL
    holds ``restart_frames`` frames, the next writer therefore runs one more checkpoint before it
    takes the turn (``before_turn``), and another as its transaction begins (``before_begin``):
    that one has only the frames committed in between to copy, and as it runs under the writer
    turn nothing can be committed after it, so that transaction restarts the WAL. The thread
    starts on the first nudge in each process and ends after ``idle`` seconds without one.

    That alone bounds the WAL only while this thread's checkpoints keep up: writers that outrun
    the disk (in CI, a checkpoint's fsync behind another test's) grew it to 55 MB before one
    ended. So the WAL also has a hard limit, ``limit_factor`` times ``restart_frames``: a writer
    that finds the file past it copies the WAL itself in the turn, waiting for a checkpoint in
    progress, and so restarts it. Writers then go at the checkpoint's pace, as with SQLite's own
    auto-checkpoint. ``journal_size_limit`` shrinks the file back to the limit after a restart,
    so its size says whether the WAL is past it: a stat of the file as each write transaction
    begins, and one before a writer takes the turn (catch_up_before_turn).
    """

    # A frame is a page and its 24-byte header; the file starts with a 32-byte header.
    FRAME_HEADER = 24
    WAL_HEADER = 32

    def __init__(
        self, path: str, synchronous: str = "FULL", *, interval: float = 0.2, restart_frames: int = 1000, idle: float = 30.0
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self.interval = interval
        self.restart_frames = restart_frames
        self.limit_factor = 4
        self.page_size = 4096  # the file's: each new connection reads it
        self.idle = idle
        self.checkpoints = 0
        self.before_begins = 0
        self.over_limit_catch_ups = 0
        self.restart_due = False
        self._nudged = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def nudge(self) -> None:
        """Note a commit: a checkpoint follows within ``interval`` seconds."""
        with self._lock:
            self._nudged.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sqlite-checkpointer", daemon=True)
                self._thread.start()

    def limit_bytes(self) -> int:
        """The WAL file size past which writers stop for a checkpoint (and the journal_size_limit)."""
        frames = self.limit_factor * self.restart_frames
        return self.WAL_HEADER + frames * (self.page_size + self.FRAME_HEADER)

    def over_limit(self) -> bool:
        """True while the WAL file is larger than limit_bytes()."""
        try:
            return os.stat(self.path + "-wal").st_size > self.limit_bytes()
        except FileNotFoundError:
            return False

    def restart_wanted(self) -> bool:
        """True when the next writer should copy the WAL so that it can restart it."""
        return self.restart_due or self.over_limit()

    def before_turn(self, dbapi_connection: sqlite3.Connection) -> None:
        """Called before a writer takes the turn: when a restart is due, copy what can be copied without holding it.

        The checkpoint in before_begin copies everything written since this thread's last one,
        in the turn: 30-75 ms while a retention purge rewrote rows as fast as it could. Run first
        here, outside the turn, it leaves that one only what is committed in between.
        """
        if self.restart_wanted():
            # If it fails, before_begin tries again in the turn.
            _passive_checkpoint(dbapi_connection, "before a writer turn")

    def before_begin(self, dbapi_connection: sqlite3.Connection) -> None:
        """Called as a transaction begins: the checkpoint that lets it restart the WAL, when one is due."""
        over = self.over_limit()
        if self.restart_due or over:
            self.restart_due = False
            # Past the limit, this writer (and so every writer) waits out a checkpoint in progress:
            # skipped, it would leave frames uncopied and the WAL would keep growing.
            if _passive_checkpoint(dbapi_connection, "before a transaction", wait=1.0 if over else 0.0):
                self.before_begins += 1
                self.over_limit_catch_ups += over

    def after_fork(self) -> None:
        """Forget the parent's thread (a forked child has none) and a lock it may have held."""
        self._lock = threading.Lock()
        self._thread = None

    def running(self) -> bool:
        """True while this process's checkpointer thread is alive."""
        with self._lock:
            return self._thread is not None

    def _run(self) -> None:
        try:
            # mode=rw: a database file that has gone away is an error here, not a new empty file.
            uri = Path(self.path).as_uri() + "?mode=rw"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            log.warning("sqlite checkpointer cannot open the database: %s", error)
            with self._lock:
                self._thread = None
            return
        try:
            conn.execute(f"PRAGMA synchronous={self.synchronous}")  # a checkpoint fsyncs as commits do
            while True:
                with self._lock:
                    if not self._nudged.is_set():
                        # Decided under the lock nudge() starts threads under, so no nudge is lost.
                        self._thread = None
                        return
                    self._nudged.clear()
                try:
                    _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.checkpoints += 1
                    self.restart_due = frames >= self.restart_frames
                except sqlite3.Error as error:  # the next nudge tries again
                    log.warning("sqlite checkpoint failed: %s", error)
                time.sleep(self.interval)
                self._nudged.wait(self.idle)
        finally:
            conn.close()


class WriterTurn:
    """Takes turns at an SQLite file's write lock across processes; a waiting writer sleeps in the kernel until its turn.

    SQLite's own busy handler sleeps in growing steps (1, 2, 5, 10 ... 100 ms) while another
    process holds the write lock, so a waiting writer oversleeps the release and the lock sits
    idle; under load that was most of a callback's time. Writers that go through here queue on an
    flock(2) beside the database instead, for at most ``timeout`` seconds (the busy timeout). A
    writer that waited that long without its turn gives up with WriterTurnTimeout, an unavailable
    database (503), rather than then waiting out SQLite's busy timeout too. The kernel drops the
    lock of a process that dies, so a killed worker never leaves it held.
    """

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._threads = threading.Lock()
        self._holder: int | None = None
        self._waiter: _FlockWaiter | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the turn (this thread among the process's, this process among the others); a holder may nest."""
        me = threading.get_ident()
        if self._holder == me:
            # E.g. a session's transaction inside a block that already writes in the turn.
            yield
            return
        deadline = time.monotonic() + self.timeout
        if not self._threads.acquire(timeout=self.timeout):
            raise WriterTurnTimeout(f"no write turn within {self.timeout:g}s")
        try:
            waiter = self._process_waiter()
            if not waiter.lock(deadline):
                raise WriterTurnTimeout(f"no write turn within {self.timeout:g}s")
            self._holder = me
            try:
                yield
            finally:
                self._holder = None
                fcntl.flock(waiter.fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def _process_waiter(self) -> _FlockWaiter:
        # One per process: a descriptor inherited across fork would share its lock with the parent,
        # and the parent's waiting thread does not exist in the child.
        if self._waiter is None or self._waiter.pid != os.getpid():
            self._waiter = _FlockWaiter(self.path)
        return self._waiter


class _FlockWaiter:
    """One process's descriptor of a lock file, and how a writer waits on it in a blocking flock.

    The turn used to be polled with flock(LOCK_NB) every 0.1-1 ms. That overslept each release,
    and py-spy under saturation put a fifth of the SQLite workers' CPU in the polling loop. A
    blocking flock is woken by the kernel the moment the holder lets go, and costs nothing
    meanwhile. But a blocking flock cannot time out:
    - In a main thread (sync workers), the writer waits in the flock itself, and SIGALRM cuts
      the wait short at the deadline (_flock_until).
    - Elsewhere, this object's thread waits in the flock, and the writer waits on an Event with
      its deadline. That hand-over cost the whole throughput gain when sync workers used it too.
      A writer that gave up leaves the flock pending. The lock it eventually yields goes to the
      process's next waiting writer, or straight back.

    Only the WriterTurn's one thread per process calls lock().
    """

    def __init__(self, path: str) -> None:
        self.pid = os.getpid()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._mutex = threading.Lock()
        self._request = threading.Event()
        self._granted = threading.Event()
        self._pending = False  # the thread is in (or about to enter) its blocking flock
        self._wanted = False  # a writer is waiting for what that flock yields
        self._thread: threading.Thread | None = None

    def lock(self, deadline: float) -> bool:
        """Take the lock by ``deadline``; False if it stayed with another process."""
        with self._mutex:
            if not self._pending:
                # Never while a flock is pending on this descriptor: the kernel would then grant
                # both, and the thread would hand back a lock that this writer believes it holds.
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return True
                except BlockingIOError:
                    pass
                if _alarm_usable():
                    # A sync worker's thread: it waits in the flock itself, which saves the hand-over
                    # from the waiting thread (measured: that hand-over cost all of the gain).
                    return _flock_until(self.fd, deadline)
                self._pending = True
                self._start()
                self._request.set()
            self._wanted = True
        self._granted.wait(max(0.0, deadline - time.monotonic()))
        with self._mutex:
            self._wanted = False
            if self._granted.is_set():  # possibly just after the deadline: it is ours all the same
                self._granted.clear()
                return True
            return False

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sqlite-writer-turn", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._request.wait()
            self._request.clear()
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            except OSError as error:  # the waiting writer times out (503); the next one tries afresh
                log.error("sqlite writer turn: waiting for the lock failed: %s", error)
                with self._mutex:
                    self._pending = False
                continue
            with self._mutex:
                self._pending = False
                if self._wanted:
                    self._granted.set()
                else:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)


class _TurnExpired(Exception):
    """Raised by the SIGALRM handler into a blocking flock whose deadline passed."""


_alarm = threading.local()  # only the main thread's attributes are ever set
_alarm_installed_in: int | None = None  # the PID whose SIGALRM handler is _on_alarm


def _on_alarm(_signum: int, _frame: object) -> None:
    # Raises only inside _flock_until's guarded region: a late alarm anywhere else is ignored.
    if getattr(_alarm, "waiting", False):
        raise _TurnExpired


def _alarm_usable() -> bool:
    """True in a main thread whose process leaves SIGALRM to us: a blocking flock can then be cut short."""
    global _alarm_installed_in
    if threading.current_thread() is not threading.main_thread():
        return False  # Python runs signal handlers in the main thread only
    if _alarm_installed_in != os.getpid():
        if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, signal.SIG_IGN, None, _on_alarm):
            return False  # the application uses SIGALRM itself
        if signal.getitimer(signal.ITIMER_REAL)[0]:
            return False  # nor take over a timer someone armed
        # Kept installed: restoring the default (terminate) could let a late alarm kill the process.
        signal.signal(signal.SIGALRM, _on_alarm)
        _alarm_installed_in = os.getpid()
    return True


def _flock_until(fd: int, deadline: float) -> bool:
    """Blocking flock in the main thread, cut short by SIGALRM at ``deadline``; True if the lock is held."""
    remaining = deadline - time.monotonic()
    got = False
    if remaining > 0:
        try:
            _alarm.waiting = True
            try:
                signal.setitimer(signal.ITIMER_REAL, remaining)
                fcntl.flock(fd, fcntl.LOCK_EX)
                got = True
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                _settle()  # an alarm that fired just before the disarm is handled here, still guarded
                _alarm.waiting = False
        except _TurnExpired:
            _alarm.waiting = False
    if not got:
        # Expired, possibly just after the flock succeeded: this descriptor may hold the lock already
        # (a second flock on it then succeeds), or the lock may be free by now.
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            pass
    return got


def _settle() -> None:
    """A Python-level call: pending signal handlers run at its start."""


# Execution option of reading(): on SQLite, transactions that only read begin without the write lock.
_READ_ONLY = "rmvs_read_only"


def reading(engine: Engine) -> Engine:
    """``engine`` for transactions that only read (same pool): on SQLite they take no write lock.

    Made once per engine: /readyz asks for it on every probe.
    """
    reader = engine.__dict__.get("_rmvs_reader")
    if reader is None:
        reader = engine.__dict__["_rmvs_reader"] = engine.execution_options(**{_READ_ONLY: True})
    return reader


def writer_turn(engine: Engine) -> WriterTurn | None:
    """The engine's WriterTurn (an SQLite file database, made by make_engine); None for PostgreSQL and in-memory SQLite."""
    return _turns.get(engine)


def insert_unless_conflict(table: Table, column_names: list[str], *, conflict_fails: bool = False) -> TextClause:
    """``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` for these columns: the id, or no row on a conflict.

    Hand-written because the dialects' on_conflict_do_nothing() constructs have no cache key, so
    SQLAlchemy would recompile them on every execution (measured: 2.5 ms each). A text clause is
    compiled once; typed bind parameters keep the column types' conversions. Same SQL on SQLite
    and PostgreSQL. Without a conflict target any unique constraint counts as a conflict.
    ``conflict_fails``: the same insert without ON CONFLICT, so a conflict raises IntegrityError.
    """
    columns = [table.c[name] for name in column_names]
    names = ", ".join(f'"{c.name}"' for c in columns)
    params = ", ".join(f":{c.name}" for c in columns)
    unless = "" if conflict_fails else " ON CONFLICT DO NOTHING"
    sql = f"INSERT INTO {table.name} ({names}) VALUES ({params}){unless} RETURNING id"
    return text(sql).bindparams(*(bindparam(c.name, type_=c.type) for c in columns))


# One memo per dialect and datetime type, shared by every statement: a callback's receipt time is
# bound in several statements, and each would otherwise miss in a memo of its own.
_time_memos: dict[tuple, Callable[[Any], Any]] = {}


def _memo_if_time(key: tuple, type_: Any, process: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """A datetime column's bind conversion, remembered: one callback binds the same instant many times.

    A callback writes its receipt time into six columns and RM's times repeat across callbacks; each
    conversion (to UTC, then to SQLite's text) cost ~3 us. Equal datetimes are the same instant, and
    every conversion here depends on the instant only, so a remembered result is the right one.
    """
    if process is None or not isinstance(type_, (DateTime, TypeDecorator)) or type_._type_affinity is not DateTime:
        return process
    return _time_memos.setdefault((*key, repr(type_)), functools.lru_cache(maxsize=1024)(process))


class _Compiled:
    """One dialect's compiled form of a Direct statement."""

    __slots__ = ("sql", "bound", "fixed", "processors", "returns_rows", "_numbered")

    def __init__(self, sql: str, bound: tuple, fixed: dict[str, Any]) -> None:
        self.sql, self.bound, self.fixed = sql, bound, fixed
        self.processors = dict(bound)
        self.returns_rows: bool | None = None  # learnt from the first execution
        self._numbered: bytes | None = None

    @property
    def numbered(self) -> bytes:
        """PostgreSQL: the SQL with ``$n`` placeholders, for pg_pipeline."""
        if self._numbered is None:
            self._numbered = pg_pipeline.numbered(self.sql)
        return self._numbered


# A Direct statement's compiled form and its positional arguments, made by Direct.bind.
Bound = tuple[_Compiled, tuple]


@contextlib.contextmanager
def transaction_on(bind: Engine | Connection) -> Iterator[Connection]:
    """``engine.begin()``; on a Connection already checked out, a transaction on that connection.

    On PostgreSQL an engine's transaction sends its BEGIN with its first statements (begin_with_first_statements).
    """
    if isinstance(bind, Connection):
        with bind.begin():
            yield bind
        return
    with bind.connect() as conn:
        if conn.dialect.name == "postgresql":
            begin_with_first_statements(conn)
        with conn.begin():
            yield conn


# Execution option of a PostgreSQL Connection whose transactions send BEGIN with their first statements.
_BEGIN_WITH_FIRST = "rmvs_begin_with_first_statements"
# psycopg.pq.TransactionStatus.IDLE (an IntEnum): the server has no transaction open on the connection.
_PG_IDLE = 0


def begin_with_first_statements(conn: Connection) -> None:
    """PostgreSQL: this connection's transactions send BEGIN together with their first statements.

    psycopg sends a transaction's BEGIN on its own and waits for the answer before the first
    statement, even in pipeline mode: a round trip that carries nothing. Here the driver is put in
    autocommit mode (SQLAlchemy puts it back when the connection returns to the pool) and the
    BEGIN is sent by us, in the same pipeline as the first statements (``pipelined``, Direct),
    or just before the first statement of any other kind (a cursor event of every PostgreSQL
    engine), so no statement ever runs outside the transaction. COMMIT and ROLLBACK are psycopg's
    own: they act on the transaction the server has open, autocommit or not.
    """
    conn.execution_options(isolation_level="AUTOCOMMIT", **{_BEGIN_WITH_FIRST: True})


def _begin_pending(conn: Connection) -> bool:
    """Whether this transaction's BEGIN is still to be sent (begin_with_first_statements)."""
    return bool(conn.get_execution_options().get(_BEGIN_WITH_FIRST)) and (
        conn.connection.driver_connection.info.transaction_status == _PG_IDLE
    )


def _direct_begins(conn: Connection) -> bool:
    """Whether a Direct statement must send this transaction's BEGIN: one still pending, or one psycopg has yet to send.

    psycopg sends the BEGIN of a transaction not in autocommit with its first execute; Direct
    statements skip execute (pg_pipeline), so they send it themselves.
    """
    driver = conn.connection.driver_connection
    return driver.info.transaction_status == _PG_IDLE and (
        not driver.autocommit or bool(conn.get_execution_options().get(_BEGIN_WITH_FIRST))
    )


def _begin_before_other_statements(engine: Engine) -> None:
    """A statement that is not a Direct one, first in its transaction, has the BEGIN sent before it."""

    @event.listens_for(engine, "before_cursor_execute")
    def _begin_first(conn, cursor, _statement, _parameters, _context, _executemany) -> None:  # noqa: ANN001
        if _begin_pending(conn):
            cursor.execute("BEGIN")


def _statements_prepared_by_pg_pipeline(engine: Engine) -> None:
    """psycopg prepares nothing itself: it answers a ROLLBACK with DEALLOCATE ALL, which would drop pg_pipeline's statements."""

    @event.listens_for(engine, "connect")
    def _no_driver_preparing(dbapi_connection, _record) -> None:  # noqa: ANN001
        dbapi_connection.prepare_threshold = None


class Direct:
    """A Core statement compiled once per dialect and run straight on the DBAPI cursor (PostgreSQL: pg_pipeline).

    SQLAlchemy's execute() spends about 60-120 us of Python per statement on an execution
    context, parameter processing and result set-up; on the callback hot path (four statements)
    that was half the CPU spent holding SQLite's write lock (measured with cProfile, see
    docs/performance.md). These statements keep what matters of execute(): the same compiled
    SQL and the same type conversions (the compiled bind processors), and a DBAPI error goes
    through SQLAlchemy's own handler, so it is wrapped (is_unavailable sees it) and a dead
    connection is invalidated. Rows come back as plain tuples in the statement's column order.
    """

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._compiled: dict[tuple, _Compiled] = {}

    def _for(self, dialect) -> _Compiled:  # noqa: ANN001
        key = (dialect.name, dialect.driver, dialect.server_version_info)
        found = self._compiled.get(key)
        if found is None:
            if not dialect.positional:
                # psycopg maps named parameters to their positions on every execution (a loop in
                # Python); the same statement compiled with positional %s placeholders skips that.
                dialect = copy.copy(dialect)
                dialect.paramstyle, dialect.positional = "format", True
            compiled = self.statement.compile(dialect=dialect)
            # One value per placeholder, in order (a parameter used twice is sent twice).
            names = compiled.positiontup
            processors = compiled._bind_processors
            types = {name: bind.type for bind, name in compiled.bind_names.items()}
            bound = tuple((name, _memo_if_time(key, types.get(name), processors.get(name))) for name in names)
            # Literals in the statement (x == 'applied') are bound parameters with a value of their own.
            fixed = {name: bind.effective_value for bind, name in compiled.bind_names.items() if not bind.required}
            found = self._compiled[key] = _Compiled(str(compiled), bound, fixed)
        return found

    def bind_value(self, dialect, name: str, value: Any) -> Any:  # noqa: ANN001
        """``value`` as this statement would send it for parameter ``name`` (after its type's conversion)."""
        process = self._for(dialect).processors.get(name)
        return value if process is None else process(value)

    def prepare(self, conn: Connection, params: Mapping[str, Any]) -> Bound:
        """The SQL for ``conn``'s dialect and its positional arguments, converted by the columns' types."""
        return self.bind(conn.dialect, params)

    def bind(self, dialect: Dialect, params: Mapping[str, Any]) -> Bound:
        """``prepare`` without a connection: arguments made ahead of time, e.g. before taking a lock."""
        compiled = self._for(dialect)
        if compiled.fixed:
            params = {**compiled.fixed, **params}
        return compiled, tuple([params[n] if process is None else process(params[n]) for n, process in compiled.bound])

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[tuple]:
        """Run the statement in ``conn``'s transaction; every row it returns (none for plain DML)."""
        return self.run_bound(conn, self.prepare(conn, params))

    def run_bound(self, conn: Connection, bound: Bound) -> list[tuple]:
        """``rows`` with the arguments ``bind`` made for ``conn``'s dialect."""
        if conn.dialect.name == "postgresql":
            return _send_together(conn, [bound])[0]
        compiled, args = bound
        cursor = conn.connection.cursor()
        try:
            cursor.execute(compiled.sql, args)
            # Drained and closed at once: an SQLite statement with RETURNING is only done when read.
            return _fetch(compiled, cursor)
        except Exception as error:  # noqa: BLE001 - SQLAlchemy wraps it (and invalidates a dead connection)
            conn._handle_dbapi_exception(error, compiled.sql, args, cursor, None)
        finally:
            cursor.close()

    def first(self, conn: Connection, params: Mapping[str, Any]) -> tuple | None:
        """The first row, or None."""
        rows = self.rows(conn, params)
        return rows[0] if rows else None


def _fetch(compiled: _Compiled, cursor: Any) -> list[tuple]:
    # Whether it returns rows is asked once: psycopg builds cursor.description anew each time.
    if compiled.returns_rows is None:
        compiled.returns_rows = cursor.description is not None
    return cursor.fetchall() if compiled.returns_rows else []


def pipelined(
    conn: Connection, calls: Sequence[tuple[Direct, Mapping[str, Any]]], *, commit: bool = False
) -> list[list[tuple]]:
    """PostgreSQL: run Direct statements in order in one round trip (pg_pipeline); each one's rows.

    Only for statements whose parameters do not depend on each other's results. A transaction's
    BEGIN still to be sent goes with them (begin_with_first_statements). An error in any
    statement aborts the transaction and is raised as Direct.rows raises it.

    ``commit``: the transaction's COMMIT goes with them, a round trip fewer. Only the owner of the
    transaction asks for it, as its last act in it: the server skips the COMMIT after an error
    (nothing is committed), and the owner's own commit then finds nothing left to do (psycopg
    sends no COMMIT when the server has no transaction open).
    """
    if not calls and not commit and not _direct_begins(conn):
        return []
    prepared = [statement.prepare(conn, params) for statement, params in calls]
    return _send_together(conn, prepared, commit=commit)


def _send_together(conn: Connection, prepared: Sequence[Bound], *, commit: bool = False) -> list[list[tuple]]:
    """``pipelined`` with the statements bound: the transaction's BEGIN first if it is to be sent (_direct_begins), COMMIT last if ``commit``."""
    try:
        return pg_pipeline.send_together(
            conn.connection.driver_connection,
            [(compiled.numbered, args) for compiled, args in prepared],
            begin=_direct_begins(conn),
            commit=commit,
        )
    except Exception as error:  # noqa: BLE001 - SQLAlchemy wraps it (and invalidates a dead connection)
        # The error names the statement that failed (pg_pipeline), if it was one of them.
        index = getattr(error, "pipeline_index", None)
        sql, args = (prepared[index][0].sql, prepared[index][1]) if index is not None else (f"{len(prepared)} statements sent together", None)
        conn._handle_dbapi_exception(error, sql, args, None, None)


def connection_of(target: Session | Connection) -> Connection:
    """The Connection to run Core statements on: ``target`` itself, or a Session's (same transaction)."""
    return target if isinstance(target, Connection) else target.connection()


def checkpointer_of(engine: Engine) -> Checkpointer | None:
    """The engine's WAL Checkpointer (SQLite file databases), else None."""
    return _checkpointers.get(engine)


def catch_up_before_turn(engine: Engine, conn: Connection | None = None) -> None:
    """Before a writer takes the turn: Checkpointer.before_turn, on ``conn`` or a pooled connection."""
    checkpointer = _checkpointers.get(engine)
    if checkpointer is None or not checkpointer.restart_wanted():
        return
    if conn is not None:
        checkpointer.before_turn(conn.connection.dbapi_connection)
        return
    with engine.connect() as own:
        checkpointer.before_turn(own.connection.dbapi_connection)


class TurnTakingSessions(sessionmaker[Session]):
    """Sessions of an SQLite file: ``begin()`` writes in the engine's writer turn; ``factory()`` only reads.

    Every write of the service goes through ``begin()`` (or group commit, which holds the turn
    itself), so rejected deliveries, reconciliation, backfill, leases, merchant actions, Stamps
    operations and the retention purge all queue with the callbacks. In SQLite's busy handler
    instead, they would hold the write lock while a callback that has the turn sleeps out the
    handler's steps, up to 100 ms each. A session made by calling the factory is for reading
    (operators' queries, metrics, reconciliation's list of due codes): its transactions take
    neither the turn nor the write lock, and never wait for a writer.
    """

    def __init__(self, bind: Engine, turn: WriterTurn, **options: Any) -> None:
        super().__init__(bind, **options)
        self.turn = turn
        self.writer = bind
        self.reader = reading(bind)

    def __call__(self, **local_kw: Any) -> Session:
        """A session for reading (see the class); write with ``begin()``."""
        local_kw.setdefault("bind", self.reader)
        return super().__call__(**local_kw)

    @contextlib.contextmanager
    def begin(self) -> Iterator[Session]:  # type: ignore[override]
        """A session in a transaction, committed at the end of the block, written in the writer turn."""
        # As in group commit, the commit's WAL flush waits until the turn is given up (WalSync).
        with deferred_wal_syncs() as flush:
            catch_up_before_turn(self.writer)
            with self.turn.hold(), self(bind=self.writer) as session, session.begin():
                yield session
            flush()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (views read them to build responses).

    On an SQLite file their ``begin()`` takes the writer turn and a session made by calling the
    factory only reads, without the write lock (TurnTakingSessions).
    """
    turn = writer_turn(engine)
    if turn is None:
        return sessionmaker(engine, expire_on_commit=False)
    return TurnTakingSessions(engine, turn, expire_on_commit=False)


def _dispose_in_child() -> None:
    # A forked worker must not reuse the parent's sockets (gunicorn --preload, multiprocessing).
    for engine in list(_engines):
        engine.dispose(close=False)
    for checkpointer in list(_checkpointers.values()):
        checkpointer.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_dispose_in_child)

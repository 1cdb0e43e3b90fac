"""PostgreSQL: a transaction's statements sent in one message, on libpq's pipeline mode directly.

psycopg's own pipeline (``Connection.pipeline()``) sends each statement as it is executed and
asks the server to flush its answer (a Flush message), so the server reads, runs and answers
the statements one network packet at a time, and the client's cursor machinery runs per
statement. Measured on this project's 2-core machine, per trivial statement in a pipeline of 16:
psycopg's 77 us of client CPU and 27 us of server CPU, against 8 and 3 us here, where the
statements, their named prepared forms and one Sync go out together and the answers come back
together (scripts/bench/pipeline_cost.py).

The statements stay prepared for the connection's life. psycopg's own automatic preparing is
off on the service's connections (db.make_engine): it answers any ROLLBACK with DEALLOCATE ALL
(its guard against schema changes), which would drop these too. If they are dropped anyway, the
statement fails with "prepared statement does not exist" and is prepared again the next time.

Only for the hot path's statements (db.Direct), which are plain SQL with ``$n`` parameters sent as
text: the server infers each parameter's type from the statement (the statements cast those it
cannot infer), as it does for psycopg's text parameters. Results are loaded by psycopg's own
loaders, so rows come back as psycopg's cursors would return them; a server error is raised as
the psycopg exception for its SQLSTATE, and a broken connection leaves psycopg's connection
``broken``, so SQLAlchemy wraps both exactly as for any other statement.

A connection may be given a patience (``wait_at_most``, from DB_STATEMENT_TIMEOUT_SECONDS): a
server that stays silent that long while an answer is due is taken for hung, and the connection
is closed (NoAnswer) instead of holding the request for ever.
"""

from __future__ import annotations

import re
import select
import weakref
from typing import Any, Sequence

from psycopg import Connection, errors, pq
from psycopg.adapt import PyFormat, Transformer

# Which of our statements each connection has prepared (a server-side prepared statement lives
# as long as its session), and the loader state used to read its results.
_sessions: "weakref.WeakKeyDictionary[Connection, _Session]" = weakref.WeakKeyDictionary()

_PLACEHOLDER = re.compile(r"%(s|%)")


def numbered(format_sql: str) -> bytes:
    """psycopg's ``%s`` placeholders as PostgreSQL's ``$1``, ``$2``, ... (``%%`` is a literal ``%``)."""
    counter = iter(range(1, 1 << 16))
    return _PLACEHOLDER.sub(lambda m: "%" if m.group(1) == "%" else f"${next(counter)}", format_sql).encode("utf-8")


class NoAnswer(errors.OperationalError):
    """The server stayed silent for the connection's patience (wait_at_most) while an answer was due; the connection is closed."""


class _Session:
    __slots__ = ("prepared", "transformer", "patience_ms")

    def __init__(self, driver: Connection) -> None:
        self.prepared: dict[bytes, bytes] = {}
        self.transformer = Transformer.from_context(driver)
        # How long the server may stay silent while an answer is due (poll's milliseconds; -1: for ever).
        self.patience_ms = -1


def _session(driver: Connection) -> _Session:
    session = _sessions.get(driver)
    if session is None:
        session = _sessions[driver] = _Session(driver)
    return session


def wait_at_most(driver: Connection, seconds: float | None) -> None:
    """From now on, give ``driver`` up (closed, NoAnswer) when its server stays silent for ``seconds`` while an answer is due."""
    _session(driver).patience_ms = -1 if seconds is None else max(1, round(seconds * 1000))


_BEGIN, _COMMIT = b"BEGIN", b"COMMIT"
# SQLSTATE invalid_sql_statement_name: "prepared statement ... does not exist".
_NO_SUCH_STATEMENT = b"26000"


def send_together(
    driver: Connection, statements: Sequence[tuple[bytes, tuple]], *, begin: bool = False, commit: bool = False
) -> list[list[tuple]]:
    """Run ``statements`` (SQL from ``numbered``, arguments) in order in one round trip; each one's rows.

    BEGIN goes first if ``begin`` and COMMIT last if ``commit``. After an error the server skips
    the rest, the COMMIT included, and the first error is raised once every answer is read, so the
    connection is left ready for the owner's ROLLBACK.
    """
    session = _session(driver)
    patience = session.patience_ms
    pgconn = driver.pgconn
    transformer = session.transformer
    # What each answer in the pipeline belongs to: None for BEGIN/COMMIT, else (statement's index, sql, name, is_parse).
    expected: list[tuple[int, bytes, bytes, bool] | None] = []
    parsing: dict[bytes, bytes] = {}
    pgconn.enter_pipeline_mode()
    try:
        if begin:
            pgconn.send_query_params(_BEGIN, None)
            expected.append(None)
        for index, (sql, args) in enumerate(statements):
            name = session.prepared.get(sql) or parsing.get(sql)
            if name is None:
                name = parsing[sql] = b"rmvs_%d" % (len(session.prepared) + len(parsing))
                pgconn.send_prepare(name, sql)
                expected.append((index, sql, name, True))
            values = transformer.dump_sequence(args, [PyFormat.TEXT] * len(args)) if args else None
            pgconn.send_query_prepared(name, values)
            expected.append((index, sql, name, False))
        if commit:
            pgconn.send_query_params(_COMMIT, None)
            expected.append(None)
        pgconn.pipeline_sync()
        _flush(pgconn, patience)
        rows: list[list[tuple]] = []
        failure: errors.Error | None = None
        for what in expected:
            result = _next_result(pgconn, patience)
            status = result.status
            if status == pq.ExecStatus.FATAL_ERROR:
                if result.error_field(pq.DiagnosticField.SQLSTATE) == _NO_SUCH_STATEMENT:
                    # Deallocated behind our back (DEALLOCATE ALL, DISCARD ALL): prepared again next time.
                    session.prepared.clear()
                if failure is None:
                    failure = errors.error_from_result(result, encoding=driver.info.encoding)
                    # Which statement failed (None: BEGIN or COMMIT), for the error's report.
                    failure.pipeline_index = None if what is None else what[0]  # type: ignore[attr-defined]
            elif what is not None and status != pq.ExecStatus.PIPELINE_ABORTED:
                _index, sql, name, is_parse = what
                if is_parse:
                    session.prepared[sql] = name
                elif status == pq.ExecStatus.TUPLES_OK:
                    transformer.set_pgresult(result)
                    rows.append(transformer.load_rows(0, result.ntuples, tuple))
                    transformer.set_pgresult(None)
                else:
                    rows.append([])
            # Each statement's answer ends with "no more results".
            while _next_result(pgconn, patience) is not None:
                pass
        sync = _next_result(pgconn, patience)
        if sync.status != pq.ExecStatus.PIPELINE_SYNC:
            raise errors.InternalError(f"unexpected answer at the end of a pipeline: {pq.ExecStatus(sync.status).name}")
        pgconn.exit_pipeline_mode()
    except BaseException:
        # A connection left half-way through a pipeline cannot be used again: mark it so SQLAlchemy discards it.
        if pgconn.pipeline_status != pq.PipelineStatus.OFF:
            pgconn.finish()
        raise
    if failure is not None:
        raise failure
    return rows


def _flush(pgconn: Any, patience: int) -> None:
    """Send everything buffered, reading answers meanwhile so neither side's buffer fills up and blocks the other."""
    while pgconn.flush():
        if _wait(pgconn, patience, write=True):
            pgconn.consume_input()


def _next_result(pgconn: Any, patience: int) -> Any:
    """The pipeline's next result (None between statements), waiting for the server as needed."""
    while pgconn.is_busy():
        _wait(pgconn, patience, write=False)
        pgconn.consume_input()
    return pgconn.get_result()


def _wait(pgconn: Any, patience: int, *, write: bool) -> bool:
    """Block until the socket is readable (or writable, if ``write``); whether there is something to read.

    NoAnswer if nothing happens for ``patience`` milliseconds (-1: wait for ever).
    """
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN | (select.POLLOUT if write else 0))
    ready = poller.poll(patience)
    if not ready:
        # send_together closes the connection on the way out, so it is never used again.
        raise NoAnswer(f"no answer from the database server for {patience / 1000:g} s")
    events = ready[0][1]
    if events & ~(select.POLLIN | select.POLLOUT):
        # Hang-up or error: let libpq read it and report the connection as broken.
        return True
    return bool(events & select.POLLIN)

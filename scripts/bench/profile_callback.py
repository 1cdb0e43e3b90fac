#!/usr/bin/env python3
"""Where one callback's time goes: statements and round trips per callback, and a timed breakdown.

Runs the project's app in-process (create_app with production-like settings, the Flask test
client instead of gunicorn) against a throwaway database and reports, per scenario (new voucher,
status change of an existing voucher, exact redelivery, older snapshot):

  * every statement the database received, in order. SQLite: sqlite3's trace callback (includes
    BEGIN IMMEDIATE / COMMIT). PostgreSQL: libpq's protocol trace, so implicit BEGINs, pool
    pre-pings and COMMITs are counted too; a round trip is one ReadyForQuery from the server.
  * a breakdown of the wall time of N lifecycle callbacks: signature verification, parsing,
    each SQL statement (SQLAlchemy cursor events), pre-ping, commit, logging, the rest.
  * cProfile's top functions (own time) over the same callbacks.

Usage:  .venv/bin/python scripts/bench/profile_callback.py [--db sqlite|postgresql|both] [--callbacks 600]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
# As under gunicorn.conf.py: prometheus_client in multiprocess mode (counters in mmap'd files).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="rmvs-prof-metrics-"))

from sqlalchemy import event  # noqa: E402

from bench import cpu  # noqa: E402
from bench.callbacks import VECTORS, signed_records  # noqa: E402
from bench.databases import DEFAULT_PG, Database  # noqa: E402
from receiver import create_app  # noqa: E402
from receiver.config import load_settings  # noqa: E402
from receiver.runtime import EXTENSION_KEY  # noqa: E402
from tests.support import CALLBACK_PATH, Signer, callback_body, voucher_item  # noqa: E402


def log(message: str = "") -> None:
    print(message, flush=True)


def shorten(sql: str, width: int = 150) -> str:
    if " + " in sql and not sql.startswith("["):
        return " + ".join(shorten(part, width // 2) for part in sql.split(" + "))
    prefix, sql = re.match(r"^((?:\[[^\]]*\] )?)(.*)$", re.sub(r"\s+", " ", sql).strip()).groups()
    # Column lists say little; keep the shape of the statement.
    sql = re.sub(r"^(INSERT INTO \S+) \(.*?\) (VALUES|SELECT)", r"\1 (...) \2", sql)
    sql = re.sub(r"VALUES \(.*?\)( ON| RETURNING|$)", r"VALUES (...)\1", sql)
    sql = re.sub(r"^SELECT (.{60}).*? FROM", r"SELECT \1... FROM", sql)
    sql = re.sub(r"SET (.{70}).*? WHERE", r"SET \1... WHERE", sql)
    sql = prefix + sql
    return sql if len(sql) <= width else sql[: width - 3] + "..."


class StatementTrace:
    """What the database itself received, per callback."""

    def __init__(self, engine, kind: str, workdir: Path) -> None:  # noqa: ANN001
        self.kind = kind
        self.lines: list[str] = []
        self.trace_path = workdir / f"libpq-trace-{os.getpid()}.txt"
        self._files: list = []
        self._offset = 0
        self.prepared: dict[str, str] = {}

        @event.listens_for(engine, "connect")
        def _trace(dbapi_connection, _record) -> None:  # noqa: ANN001
            if kind == "sqlite":
                dbapi_connection.set_trace_callback(lambda sql: self.lines.append(sql))
            else:
                from psycopg import pq

                f = open(self.trace_path, "ab", buffering=0)
                self._files.append(f)
                dbapi_connection.pgconn.trace(f.fileno())
                dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    def take(self) -> tuple[list[str], int]:
        """Statements since the last call, and round trips (PostgreSQL: ReadyForQuery count)."""
        if self.kind == "sqlite":
            out, self.lines = self.lines, []
            return out, len(out)
        if not self.trace_path.exists():
            return [], 0
        with open(self.trace_path, "rb") as f:
            f.seek(self._offset)
            data = f.read().decode("utf-8", "replace")
            self._offset = f.tell()
        statements, trips = [], 0
        pending: list[str] = []
        # A message starts with "F|B<TAB>length<TAB>Type"; SQL text may span lines.
        messages: list[str] = []
        for line in data.splitlines():
            if re.match(r"^[FB]\t\d+\t\w", line) or not messages:
                messages.append(line)
            else:
                messages[-1] += "\n" + line
        for line in messages:
            parts = line.split("\t", 3)
            if len(parts) < 3:
                continue
            direction, kind, rest = parts[0], parts[2], parts[3] if len(parts) > 3 else ""
            if direction == "F":
                if kind == "Query":
                    m = re.match(r'^ "(.*)"$', rest, re.S)
                    statements.append(f"[simple query] {m.group(1) if m else rest}")
                elif kind == "Parse":
                    m = re.match(r'^ "([^"]*)" "(.*)" \d+', rest, re.S)
                    name, sql = (m.group(1), m.group(2)) if m else ("", rest)
                    if name:
                        self.prepared[name] = sql
                        pending.append(f"[PREPARE {name}] {sql}")
                    else:
                        pending.append(sql)
                elif kind == "Bind":
                    m = re.match(r'^ "([^"]*)" "([^"]*)"', rest)
                    if m and m.group(2):
                        pending.append(f"[prepared {m.group(2)}] {self.prepared.get(m.group(2), '?')}")
                elif kind == "Sync":
                    statements.append(" + ".join(pending) if pending else "[sync]")
                    pending = []
            elif direction == "B" and kind == "ReadyForQuery":
                trips += 1
        return statements, trips


def scenarios(signer: Signer) -> list[tuple[str, bytes]]:
    code = "PROF" + os.urandom(4).hex().upper()
    valid = callback_body(voucher_item(code, "VALID", 0))
    issue = callback_body(voucher_item(code, "ISSUE", 1))
    older = callback_body(voucher_item(code, "VALID", 0, label="older copy"))
    return [
        ("new voucher (VALID)", valid),
        ("status change of an existing voucher (ISSUE)", issue),
        ("exact redelivery of the ISSUE body (RM retry)", issue),
        ("older snapshot arriving late (stale)", older),
    ]


class Timers:
    """Wall time per label, accumulated by wrapping functions and SQLAlchemy events."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.count: dict[str, int] = defaultdict(int)

    def wrap(self, owner, name: str, label: str) -> None:  # noqa: ANN001
        # A name that went away would leave its row out of the breakdown without a word.
        original = getattr(owner, name)

        def timed(*a, **k):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.total[label] += time.perf_counter() - t0
                self.count[label] += 1

        setattr(owner, name, timed)


def statement_label(sql: str) -> str:
    s = re.sub(r"\s+", " ", sql).strip()
    if s.startswith("BEGIN"):
        return "SQL BEGIN IMMEDIATE"
    m = re.match(r"(SELECT|INSERT INTO|UPDATE|DELETE FROM)\s+(.*?)(?:\s|$)", s)
    if not m:
        return "SQL " + s[:30]
    verb, rest = m.groups()
    if verb == "SELECT":
        table = re.search(r"FROM (\w+)", s)
        where = re.search(r"WHERE (.{0,50})", s)
        return f"SQL SELECT {table.group(1) if table else '?'} WHERE {where.group(1) if where else ''}".strip()
    return f"SQL {verb} {rest}"


def cpu_per_callback(kind: str, db: Database, app, stderr_sink, rounds: int, callbacks: int) -> None:  # noqa: ANN001
    """CPU per callback of hello / minimal / project in this process, rounds alternating.

    Throughput on this shared VM moves by +-30% between runs; CPU time per callback of the three
    apps measured back to back in one process is far steadier, and it is what bounds throughput
    when the two cores are saturated. PostgreSQL's share is read from its backends' /proc stats.
    """
    from bench import baseline_apps

    baseline_apps.create_minimal_table(db.engine)
    apps = {"hello": baseline_apps.create_hello_app(), "minimal": baseline_apps.create_minimal_app(), "project": app}
    figures: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for _ in range(rounds):
        for name, target in apps.items():
            client = target.test_client()
            with contextlib.redirect_stderr(stderr_sink):
                for r in signed_records(50, "lifecycle"):
                    assert client.post(r.path, data=r.body, headers=r.headers).status_code == 200
            backends = cpu.postgres_backend_pids(db.engine) if kind == "postgresql" else []
            records = signed_records(callbacks, "lifecycle")
            db0, app0 = cpu.process_seconds(backends), time.process_time()
            with contextlib.redirect_stderr(stderr_sink):
                for r in records:
                    client.post(r.path, data=r.body, headers=r.headers)
            figures[name].append(((time.process_time() - app0) / len(records), (cpu.process_seconds(backends) - db0) / len(records)))
    log(f"\n--- CPU per callback, in-process, {rounds} alternating rounds of {callbacks} (app + database; medians) ---")

    def median(values: list[float]) -> float:
        return sorted(values)[(len(values) - 1) // 2]

    totals = {name: median([a + d for a, d in runs]) for name, runs in figures.items()}
    for name, runs in figures.items():
        app_ms, db_ms = median([a for a, _ in runs]) * 1000, median([d for _, d in runs]) * 1000
        per_round = " / ".join(f"{(a + d) * 1000:.2f}" for a, d in runs)
        log(f"   {name:<8} app {app_ms:6.3f} ms  database {db_ms:6.3f} ms  total {totals[name] * 1000:6.3f} ms"
            f"  (rounds: {per_round})")
    log(f"   minimal / project CPU: {totals['minimal'] / totals['project']:.2f} "
        "(the throughput ratio project/minimal when CPU-bound, before gunicorn's share)")


def profile_database(kind: str, args: argparse.Namespace, workdir: Path) -> None:
    log(f"\n================ {kind} ================")
    with Database(kind, "profile", args, workdir) as db:
        if args.preload:
            from bench.growth import load_history

            log(f"\n(preloading {args.preload:,} voucher_events{' + deliveries' if args.preload_deliveries else ''})")
            load_history(db.engine, args.preload, deliveries=args.preload_deliveries, log=log)
        key_file = workdir / "rm-public.pem"
        key_file.write_text(VECTORS["rm_server_public_pem"], encoding="utf-8")
        env = {
            "DATABASE_URL": db.url, "RM_SERVER_PUBLIC_KEY_FILE": str(key_file),
            "RM_SIGNATURE_MAX_AGE_SECONDS": "900", "LOG_LEVEL": "INFO",
        }
        settings = load_settings(env)
        # The minimal baseline reads its settings from the environment, as under gunicorn.
        os.environ.update(env)
        stderr_sink = open(workdir / f"app-{kind}.log", "w")
        with contextlib.redirect_stderr(stderr_sink):
            app = create_app(settings)
        runtime = app.extensions[EXTENSION_KEY]
        engine = runtime.engine
        if kind == "sqlite" and args.sqlite_cache_mb:
            # An experiment, not the project's setting: a bigger page cache per connection (default 2 MB).
            @event.listens_for(engine, "connect")
            def _cache(dbapi_connection, _record) -> None:  # noqa: ANN001
                dbapi_connection.execute(f"PRAGMA cache_size=-{args.sqlite_cache_mb * 1024}")

            log(f"(experiment: PRAGMA cache_size = {args.sqlite_cache_mb} MB per connection)")
        if args.cpu_rounds:
            cpu_per_callback(kind, db, app, stderr_sink, args.cpu_rounds, args.callbacks)
        if args.cpu_only:
            runtime.engine.dispose()
            return
        trace = StatementTrace(engine, kind, workdir)
        # The CPU rounds above left connections in the pool that the trace's connect hook never saw.
        engine.dispose()
        client = app.test_client()
        signer = Signer(VECTORS["rm_server_private_pem"])

        # Warm up (pool, statement caches, psycopg's prepared statements after 5 uses) before looking.
        warm = signed_records(60, "lifecycle")
        with contextlib.redirect_stderr(stderr_sink):
            for r in warm:
                assert client.post(r.path, data=r.body, headers=r.headers).status_code == 200
        trace.take()

        log("\n--- statements the database received, per callback ---")
        for name, body in scenarios(signer):
            with contextlib.redirect_stderr(stderr_sink):
                resp = client.post(CALLBACK_PATH, data=body, headers=signer.headers(body))
            statements, trips = trace.take()
            log(f"\n{name}: HTTP {resp.status_code} {resp.get_json()}; "
                f"{len(statements)} statements, {trips} round trips" + (" (= statements)" if kind == "sqlite" else ""))
            for i, sql in enumerate(statements, 1):
                log(f"   {i:2}. {shorten(sql)}")

        # --- timed breakdown ---
        timers = Timers()
        import receiver.deliveries as deliveries_mod
        import receiver.webhook as webhook_mod

        timers.wrap(webhook_mod, "verify_signed", "verify signature (RSA + canonical JSON)")
        timers.wrap(webhook_mod, "_voucher_item", "parse JSON (envelope, code)")
        timers.wrap(webhook_mod, "snapshot_from_item", "build the snapshot")
        from sqlalchemy.orm import Session

        timers.wrap(deliveries_mod, "accept_verified", "  accept_verified (everything between BEGIN and COMMIT)")
        timers.wrap(deliveries_mod, "apply_snapshot", "  apply_snapshot (Core statements)")
        timers.wrap(Session, "flush", "  Session.flush (ORM: none expected on the callback path)")
        timers.wrap(Session, "commit", "  Session.commit (ORM: none expected on the callback path)")
        timers.wrap(engine.pool, "connect", "  pool checkout" + (" (incl. pre-ping)" if kind == "postgresql" else ""))
        timers.wrap(webhook_mod.log, "info", "log.info line")
        timers.wrap(webhook_mod.CALLBACKS.labels("accepted"), "inc", "prometheus counter inc")
        timers.wrap(engine.dialect, "do_commit", "SQL COMMIT (DBAPI commit)")
        if kind == "postgresql":
            timers.wrap(engine.dialect, "do_ping", "pool pre-ping (SELECT 1)")

        starts: dict[int, float] = {}

        @event.listens_for(engine, "before_cursor_execute")
        def _before(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ANN202
            starts[id(cursor)] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def _after(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ANN202
            label = statement_label(statement)
            timers.total[label] += time.perf_counter() - starts.pop(id(cursor), time.perf_counter())
            timers.count[label] += 1

        records = signed_records(args.callbacks, "lifecycle")
        note = cpu.wait_for_quiet(0.3, 180, {os.getpid()}, log)
        if note:
            log(f"   ! {note}")
        profiler = cProfile.Profile()
        with contextlib.redirect_stderr(stderr_sink):
            t0 = time.perf_counter()
            for r in records:
                resp = client.post(r.path, data=r.body, headers=r.headers)
                assert resp.status_code == 200, resp.get_data()
            wall = time.perf_counter() - t0
        n = len(records)
        log(f"\n--- wall time of {n} lifecycle callbacks in one process (1 VALID insert + 2 updates per voucher; "
            f"Flask test client, no gunicorn, no contention): {wall / n * 1000:.2f} ms per callback "
            f"= {n / wall:.0f}/s for one worker ---")
        rows = sorted(timers.total.items(), key=lambda kv: -kv[1])
        sql_total = sum(v for k, v in timers.total.items() if k.startswith("SQL") or k.startswith("pool"))
        for label, seconds in rows:
            log(f"   {seconds / n * 1000:7.3f} ms  {seconds / wall:6.1%}  {timers.count[label] / n:5.2f}x  {label}")
        log(f"   {sql_total / n * 1000:7.3f} ms  {sql_total / wall:6.1%}         all SQL incl. commit/ping (DB round trips)")

        # --- cProfile of the same kind of work ---
        records = signed_records(args.callbacks, "lifecycle")
        with contextlib.redirect_stderr(stderr_sink):
            profiler.enable()
            for r in records:
                client.post(r.path, data=r.body, headers=r.headers)
            profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(22)
        log(f"\n--- cProfile, {len(records)} callbacks, top functions by own time (profiler overhead inflates Python) ---")
        body = out.getvalue()
        start = body.find("   ncalls")
        log(body[start:].rstrip())
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("cumulative").print_stats(r"receiver|flask/app|sqlalchemy/orm/session|signature", 30)
        log("\n--- cProfile, cumulative, project/Flask/Session functions ---")
        body = out.getvalue()
        start = body.find("   ncalls")
        log(body[start:].rstrip())
        runtime.engine.dispose()
        # logs.configure() pointed the root logger at the sink; detach before closing it.
        import logging

        for handler in list(logging.getLogger().handlers):
            if getattr(handler, "_rmvs", False):
                logging.getLogger().removeHandler(handler)
        stderr_sink.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", DEFAULT_PG))
    parser.add_argument("--callbacks", type=int, default=600)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--cpu-rounds", type=int, default=3,
                        help="rounds of the hello / minimal / project CPU comparison (0: skip it)")
    parser.add_argument("--cpu-only", action="store_true", help="only the CPU comparison")
    parser.add_argument("--preload", type=int, default=0, help="bulk-load this many voucher_events first (growth)")
    parser.add_argument("--preload-deliveries", action="store_true", help="...and as many webhook_deliveries")
    parser.add_argument("--sqlite-cache-mb", type=int, default=0,
                        help="experiment: PRAGMA cache_size for the app's SQLite connections (default: SQLite's 2 MB)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    for kind in (["postgresql", "sqlite"] if args.db == "both" else [args.db]):
        profile_database(kind, args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

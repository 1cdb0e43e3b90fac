#!/usr/bin/env python3
"""Callbacks while the scheduler reconciles: genuine callback latency with and without a pass writing beside them.

Runs the real gunicorn server (production settings) on SQLite (default) or PostgreSQL, seeds
--vouchers vouchers from the fake RM (its own process, --latency-ms per answer), then:
  1. genuine signed callbacks alone at --rate/s (baseline latency);
  2. the same rate while a reconciliation pass (another process, as the scheduler is) checks every
     seeded voucher at --concurrency and writes each answer back in chunks;
and prints genuine p50/p99 in both phases and the pass's own rate. On SQLite the pass takes the
web workers' writer turn for its transactions (db.TurnTakingSessions); --no-turn runs it without, as
before, so the two can be compared in one session.

    .venv/bin/python scripts/bench_callbacks_during_reconcile.py [--no-turn] [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import requests  # noqa: E402

from bench import stop_cleanly_on_sigterm  # noqa: E402
from bench.callbacks import signed_records  # noqa: E402  (scripts/bench)
from bench.fake_rm_process import fake_rm_process, rm_env  # noqa: E402
from bench.loadgen import run_fixed_rate  # noqa: E402
from receiver.config import default_web_concurrency  # noqa: E402
from receiver.db import normalise_url  # noqa: E402
from tests.support import Gunicorn, fresh_settings_env, migrate  # noqa: E402

VECTORS = json.loads((ROOT / "tests" / "fixtures" / "rm-signature.json").read_text())


def _reconcile(job: tuple[dict[str, str], bool]) -> dict:
    """One pass over every non-final voucher, in a process of its own as the scheduler's is."""
    env, with_turn = job
    from sqlalchemy.orm import sessionmaker

    from receiver.client import RMClient
    from receiver.config import load_settings
    from receiver.db import make_engine, make_session_factory
    from receiver.reconciliation import reconcile_due

    settings = load_settings(env)
    engine = make_engine(settings.database_url)
    try:
        # The service's sessions take the writer turn on SQLite; plain ones are the old way.
        factory = make_session_factory(engine) if with_turn else sessionmaker(engine, expire_on_commit=False)
        summary = reconcile_due(factory, RMClient.from_settings(settings), stale_after_seconds=0,
                                concurrency=settings.reconcile_concurrency, trigger="benchmark")
    finally:
        engine.dispose()
    return {"checked": summary.checked, "changed": summary.changed, "failed": summary.failed,
            "seconds": summary.seconds, "error": summary.error}


def main() -> int:
    stop_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="PostgreSQL server URL (a throwaway database is created); default SQLite")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=100.0, help="genuine callbacks/s")
    parser.add_argument("--vouchers", type=int, default=6000)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the fake RM's answer time")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-turn", action="store_true", help="the pass does not take the writer turn (the old way)")
    args = parser.parse_args()

    from receiver.backfill import backfill
    from receiver.client import RMClient
    from receiver.config import load_settings
    from receiver.db import make_engine, make_session_factory

    work = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    admin = None
    if args.database_url:
        from tests.conftest import create_postgres_database

        admin = normalise_url(args.database_url)
        url = create_postgres_database(admin)
    else:
        url = f"sqlite:///{work / 'receiver.db'}"
    migrate(url)
    server = None
    try:
        with fake_rm_process(work, args.vouchers) as fake:
            env = rm_env(url, fake.base, work, args.concurrency)
            engine = make_engine(url)
            client = RMClient.from_settings(load_settings(env))
            seeded = backfill(make_session_factory(engine), client)
            client.close()
            engine.dispose()
            requests.post(fake.base + "/_fake/faults", json={"latency": args.latency_ms / 1000}, timeout=5)
            count = int(args.rate * (args.seconds + 1))
            genuine = signed_records(count * 2, "lifecycle")
            workers = default_web_concurrency(os.cpu_count() or 1)
            server = Gunicorn(fresh_settings_env(url, VECTORS, work, LOG_LEVEL="WARNING"), workers=workers).start()
            pid = server.proc.pid if server.proc else None
            alone = run_fixed_rate("127.0.0.1", server.port, genuine[:count], rate=args.rate, lead_in=1.0,
                                   server_pid=pid, label="genuine alone")
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                started = time.monotonic()
                pass_ = pool.map_async(_reconcile, [(env, not args.no_turn)])
                # Let the pass reach its steady state (fetching, and writing a chunk every few hundred ms).
                time.sleep(2.0)
                during = run_fixed_rate("127.0.0.1", server.port, genuine[count:], rate=args.rate, lead_in=1.0,
                                        server_pid=pid, label="genuine during pass")
                overlapped = time.monotonic() - started
                result = pass_.get()[0]
    finally:
        if server is not None:
            server.stop()
        if admin:
            from tests.conftest import drop_postgres_database

            drop_postgres_database(admin, url)

    kind = "sqlite" if url.startswith("sqlite") else "postgresql"
    turn = ("no writer turn on PostgreSQL" if kind == "postgresql"
            else f"pass {'WITHOUT' if args.no_turn else 'with'} the writer turn")
    print(f"\ndatabase: {kind}, gunicorn workers: {workers}, seeded {seeded.vouchers} vouchers; {turn}")
    for phase in (alone, during):
        lat = phase.latency_ms
        print(f"{phase.label:<20} {phase.statuses}  p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  "
              f"(offered {args.rate:.0f}/s)")
    slowest = ", ".join(f"{ms:.0f} ms at {at:.1f} s" for ms, at in during.extra["slowest"])
    print(f"slowest during pass  {slowest} (seconds after the first callback of the phase)")
    if result["seconds"] < overlapped:
        print(f"warning: the pass ended after {result['seconds']:.1f} s, before the measured phase did "
              f"({overlapped:.1f} s): raise --vouchers")
    print(f"reconciliation pass  checked {result['checked']} (changed {result['changed']}, failed {result['failed']}) "
          f"in {result['seconds']:.1f} s = {result['checked'] / result['seconds']:.0f} vouchers/s"
          + (f"; error: {result['error']}" if result["error"] else ""))
    return 0 if result["failed"] == 0 and not result["error"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

#!/usr/bin/env python3
"""Abuse: forged callbacks flood the receiver while genuine ones keep arriving.

Runs the real gunicorn server (production settings) on SQLite (default) or PostgreSQL, then:
  1. genuine signed callbacks alone at --genuine-rate/s (baseline latency);
  2. the same genuine rate while --forged-rate forged callbacks/s (valid JSON, bad signatures,
     from one source address, or taking turns among --forged-sources loopback addresses) arrive,
     from before the first to after the last counted genuine one;
and prints genuine p50/p99 in both phases, the flood's answers, how many rejected deliveries were
stored (bounded, rate-limited per source) and how much the database grew.

    .venv/bin/python scripts/bench_abuse.py [--database-url postgresql://root@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from receiver.config import Settings, default_web_concurrency  # noqa: E402
from receiver.db import normalise_url  # noqa: E402
from receiver.models import WebhookDelivery  # noqa: E402
from scripts.bench import stop_cleanly_on_sigterm  # noqa: E402
from scripts.bench.callbacks import Record, signed_records  # noqa: E402
from scripts.bench.loadgen import run_fixed_rate, run_flood  # noqa: E402
from tests.support import Gunicorn, fresh_settings_env, migrate  # noqa: E402

VECTORS = json.loads((ROOT / "tests" / "fixtures" / "rm-signature.json").read_text())


def forged_records(count: int) -> list[Record]:
    """Well-formed callbacks with a signature that does not verify."""
    records = []
    for i in range(count):
        body = json.dumps({"item": {"code": f"FORGED-{i}", "status": "VOID", "updatedAt": "2026-11-21T00:00:00Z",
                                    "label": "x" * 2000}, "code": "SUCCESS"}).encode()
        headers = {"Content-Type": "application/json", "X-Signature": "sha256 " + "QUJD" * 86 + "QQ==",
                   "X-Nonce-Str": uuid.uuid4().hex, "X-Timestamp": "1700000000"}
        records.append(Record("POST", "/webhooks/revenuemonster/voucher", headers, body))
    return records


def _flood(args: tuple) -> dict:
    port, records, rate, generator, sources = args
    if generator == "selectors":
        return run_flood("127.0.0.1", port, [r.raw(f"127.0.0.1:{port}") for r in records], rate=rate, sources=sources)
    result = run_fixed_rate("127.0.0.1", port, records, rate=rate, lead_in=0.0, server_pid=None, label="flood")
    # Every answer counts here (they are all 401s), not only 200s as for genuine traffic.
    answered = result.responses / result.duration if result.duration else 0.0
    return {"statuses": result.statuses, "achieved": answered, "cpu": result.cpu["loadgen"] * result.cpu["wall"],
            "send_lag_p99": result.extra["send_lag_ms"]["p99"]}


def db_size(url: str, path: Path | None) -> int:
    """Bytes the database occupies now."""
    if path is not None:
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT pg_database_size(current_database())")).scalar()
    finally:
        engine.dispose()


def stored_rejections(url: str) -> tuple[int, int]:
    """Rejected deliveries written so far, and from how many source addresses."""
    engine = create_engine(normalise_url(url))
    try:
        with engine.connect() as conn:
            return tuple(conn.execute(
                select(func.count(), func.count(WebhookDelivery.remote_addr.distinct()))
                .where(WebhookDelivery.outcome == "rejected_signature")
            ).one())
    finally:
        engine.dispose()


def main() -> int:
    stop_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="PostgreSQL server URL (a throwaway database is created); default SQLite")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--forged-rate", type=float, default=1000.0)
    parser.add_argument("--genuine-rate", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=None, help="default: gunicorn.conf.py's for the database")
    parser.add_argument("--forged-sources", type=int, default=1,
                        help="source addresses the flood takes turns among (127.1.x.y; needs --flood-generator selectors)")
    parser.add_argument(
        "--flood-generator", choices=("selectors", "asyncio"), default="selectors",
        help="selectors: loadgen.run_flood, about half the CPU of asyncio (run_fixed_rate, the generator before 2026-12-02)",
    )
    args = parser.parse_args()
    if args.forged_sources > 1 and args.flood_generator != "selectors":
        parser.error("--forged-sources needs --flood-generator selectors")

    work = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
    sqlite_path = None
    admin = None
    if args.database_url:
        from tests.conftest import create_postgres_database

        admin = normalise_url(args.database_url)
        url = create_postgres_database(admin)
    else:
        sqlite_path = work / "receiver.db"
        url = f"sqlite:///{sqlite_path}"
    migrate(url)
    genuine_count = int(args.genuine_rate * (args.seconds + 2)) * 2
    print(f"signing {genuine_count} genuine callbacks ...", flush=True)
    genuine = signed_records(genuine_count, "lifecycle")
    half = len(genuine) // 2
    # The flood outlasts the measured genuine phase (--seconds + 2, the first second not counted),
    # so every counted genuine callback meets it, and the flood generator's own wind-down (closing
    # its sockets, sampling CPU) falls after the measurement instead of inside it.
    flood_seconds = args.seconds + 3
    forged = forged_records(int(args.forged_rate * flood_seconds))
    workers = args.workers or default_web_concurrency(os.cpu_count() or 1)
    server = Gunicorn(fresh_settings_env(url, VECTORS, work, LOG_LEVEL="WARNING"), workers=workers).start()
    pid = server.proc.pid if server.proc else None
    try:
        size0 = db_size(url, sqlite_path)
        alone = run_fixed_rate("127.0.0.1", server.port, genuine[:half], rate=args.genuine_rate, lead_in=1.0,
                               server_pid=pid, label="genuine alone")
        size1 = db_size(url, sqlite_path)
        with multiprocessing.get_context("fork").Pool(1) as pool:
            flood = pool.map_async(_flood, [(server.port, forged, args.forged_rate, args.flood_generator, args.forged_sources)])
            under = run_fixed_rate("127.0.0.1", server.port, genuine[half:], rate=args.genuine_rate, lead_in=1.0,
                                   server_pid=pid, label="genuine under flood")
            flood_result = flood.get()[0]
        size2 = db_size(url, sqlite_path)
        rejected_rows = stored_rejections(url)
    finally:
        server.stop()
        if admin:
            from tests.conftest import drop_postgres_database

            drop_postgres_database(admin, url)

    kind = make_url(url).get_backend_name()
    limits = ", ".join(
        f"{name}: {os.environ.get(name) or f'{default} (default)'}"
        for name, default in (("REJECTED_DELIVERIES_PER_MINUTE", Settings.rejected_deliveries_per_minute),
                              ("REJECTED_DELIVERIES_TOTAL_PER_MINUTE", Settings.rejected_deliveries_total_per_minute))
    )
    print(f"\ndatabase: {kind}, gunicorn workers: {workers}, {limits}")
    for phase in (alone, under):
        lat = phase.latency_ms
        cores = ", ".join(f"{k} {v:.2f}" for k, v in phase.cpu.items() if k != "wall")
        print(f"{phase.label:<22} {phase.statuses}  p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  "
              f"(offered {args.genuine_rate:.0f}/s; cores used: {cores})")
    slowest = ", ".join(f"{ms:.0f} ms at {at:.1f} s" for ms, at in under.extra["slowest"])
    print(f"slowest under flood    {slowest} (seconds after the first genuine callback; the flood starts with it)")
    print(f"forged flood           {flood_result['statuses']}  achieved {flood_result['achieved']:.0f}/s of "
          f"{args.forged_rate:.0f}/s offered for {flood_seconds:g} s from {args.forged_sources} source "
          f"address{'es' if args.forged_sources > 1 else ''}; generator send lag p99 "
          f"{flood_result['send_lag_p99']:.1f} ms; generator ({args.flood_generator}) CPU "
          f"{flood_result['cpu'] / flood_seconds:.2f} cores")
    print(f"rejected rows stored   {rejected_rows[0]} of {len(forged)} forged, from {rejected_rows[1]} source address(es)")
    print(f"database growth        genuine phase {(size1 - size0) / 1024:.0f} KiB; flood phase "
          f"{(size2 - size1) / 1024:.0f} KiB (genuine included)")
    print(f"genuine p99 target     <= 25 ms: {'met' if under.latency_ms['p99'] <= 25 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

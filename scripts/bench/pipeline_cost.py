#!/usr/bin/env python3
"""CPU per statement in a pipelined transaction: psycopg's pipeline against receiver.pg_pipeline.

Runs transactions of BEGIN, k copies of a trivial prepared statement and COMMIT, both ways,
alternating, and prints the client's and the PostgreSQL backend's CPU time per statement (the
backend's from /proc), and the wall time:

    .venv/bin/python scripts/bench/pipeline_cost.py [--pg-url URL] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import psycopg  # noqa: E402

from bench import cpu  # noqa: E402
from receiver import pg_pipeline  # noqa: E402

SQL = "SELECT %s::int"


def psycopg_pipeline(conn: psycopg.Connection, k: int) -> None:
    with conn.pipeline():
        conn.cursor().execute("BEGIN")
        for _ in range(k):
            conn.cursor().execute(SQL, (1,))
        conn.cursor().execute("COMMIT")


def one_message(conn: psycopg.Connection, k: int) -> None:
    rows = pg_pipeline.send_together(conn, [(pg_pipeline.numbered(SQL), (1,))] * k, begin=True, commit=True)
    assert rows == [[(1,)]] * k


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pg-url", default="postgresql://root@127.0.0.1:5432/postgres")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--statements", type=int, default=8000, help="statements per measurement")
    args = parser.parse_args()
    conn = psycopg.connect(args.pg_url, autocommit=True)
    pid = conn.info.backend_pid
    print("statements a transaction | way | client CPU | PostgreSQL CPU | wall  (us per statement)")
    for _round in range(args.rounds):
        for k in (1, 4, 16):
            for name, way in (("psycopg pipeline", psycopg_pipeline), ("pg_pipeline", one_message)):
                way(conn, k)  # prepared on the server before the clock starts
                transactions = max(1, args.statements // k)
                db0, app0, wall0 = cpu.process_seconds([pid]), time.process_time(), time.perf_counter()
                for _ in range(transactions):
                    way(conn, k)
                n = transactions * k
                print(f"{k:2d} | {name:16s} | {(time.process_time() - app0) / n * 1e6:6.1f} | "
                      f"{(cpu.process_seconds([pid]) - db0) / n * 1e6:6.1f} | {(time.perf_counter() - wall0) / n * 1e6:6.1f}")
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""CPU per callback on the group-commit path, without gunicorn: GroupCommit._run on groups of N.

Drives receiver.group_commit.GroupCommit directly against a throwaway PostgreSQL database
(the three snapshots of each voucher in turn, N vouchers a group) and prints, per round, the CPU
time per callback of this process and of the PostgreSQL backends (/proc). Throughput runs on
this shared VM move by +-30%; this is steady enough to compare two versions of the code:

    .venv/bin/python scripts/bench/group_cpu.py [--code /path/to/other/checkout] [--group 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", default=str(ROOT), help="checkout whose receiver/ to measure (default: this one)")
    parser.add_argument("--pg-url", default="postgresql://root@127.0.0.1:5432/postgres")
    parser.add_argument("--group", type=int, default=3)
    parser.add_argument("--groups", type=int, default=400, help="vouchers per round = groups x group size")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    code = str(Path(args.code).resolve())
    sys.path[:0] = [code, str(ROOT / "scripts")]
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="rmvs-groupcpu-"))

    from bench import cpu
    from receiver.db import make_engine, normalise_url
    from receiver.deliveries import IncomingCallback
    from receiver.group_commit import GroupCommit, _Waiting
    from receiver.snapshot import snapshot_from_item, voucher_item_from_envelope
    from tests.conftest import create_postgres_database, drop_postgres_database
    from tests.support import callback_body, voucher_item

    def waiting(code_: str, status: str, step: int) -> _Waiting:
        body = callback_body(voucher_item(code_, status, step))
        incoming = IncomingCallback(body=body, headers={"Content-Type": "application/json",
                                                        "X-Nonce-Str": secrets.token_hex(16)},
                                    remote_addr="127.0.0.1", content_type="application/json")
        return _Waiting(incoming, snapshot_from_item(voucher_item_from_envelope(json.loads(body))))

    admin = normalise_url(args.pg_url)
    url = create_postgres_database(admin)
    try:
        subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=code,
                       env={**os.environ, "DATABASE_URL": url}, check=True, capture_output=True)
        engine = make_engine(url)
        committer = GroupCommit(engine)
        figures = []
        for round_no in range(args.rounds):
            groups = []
            for g in range(args.groups):
                codes = [f"R{round_no}G{g}C{i}" for i in range(args.group)]
                for step, status in enumerate(("VALID", "ISSUE", "REDEEMED")):
                    groups.append([waiting(c, status, step) for c in codes])
            committer._run(groups[0])  # opens the connection this round measures
            probe = make_engine(url)
            pids = cpu.postgres_backend_pids(probe)
            probe.dispose()
            count = sum(len(g) for g in groups[1:])
            db0, app0 = cpu.process_seconds(pids), time.process_time()
            for group in groups[1:]:
                committer._run(group)
                failed = [w.error for w in group if w.result is None]
                assert not failed, failed
            figures.append(((time.process_time() - app0) / count * 1000, (cpu.process_seconds(pids) - db0) / count * 1000))
        engine.dispose()
    finally:
        drop_postgres_database(admin, url)
    print(f"code: {code}; groups of {args.group}; fallbacks to one-by-one: {committer.stats.fallbacks}")
    for app_ms, db_ms in figures:
        print(f"  CPU per callback: app {app_ms:.3f} ms + PostgreSQL {db_ms:.3f} ms = {app_ms + db_ms:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

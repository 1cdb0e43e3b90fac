#!/usr/bin/env python3
"""Two servers compared in short interleaved slices, so that the host's drift falls on both alike.

This VM's speed moves by up to 1.8x within minutes. The harness (bench_ingest.py) runs each app
for 6-8 s, one after the other, with set-up in between, so a difference of a few per cent between
two versions of the code, or between the project and the minimal receiver, drowns in that drift.
Here both servers run at once (an idle one costs nothing), each on its own throwaway database
of one kind, and wrk drives them in turn for --seconds at a time, the order swapped every slice
(A B, B A, A B, ...). Each slice pair is seconds apart, so the ratio of a pair is measured on the
same host; the medians over the pairs are printed, with each server's CPU per request (gunicorn,
and every PostgreSQL process: the other server's idle backends included, a negligible share).

A server is APP[@REV]: APP is project or minimal (bench/baseline_apps.py), REV a git revision
copied out with `git archive` (default: the working tree as it is). Every request is distinct and
signed beforehand, and none is sent twice. The databases are migrated with this checkout's
migrations, so both revisions must share a schema.

    .venv/bin/python scripts/bench/ab_ingest.py project@bd95b1d project@HEAD [--db postgresql] [--slices 8] [--seconds 4]
    .venv/bin/python scripts/bench/ab_ingest.py minimal project [--db sqlite]
    .venv/bin/python scripts/bench/ab_ingest.py project project --env-b LOG_LEVEL=WARNING
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench import cpu, loadgen, stop_cleanly_on_sigterm  # noqa: E402
from bench.callbacks import VECTORS, signed_records, write_request_file  # noqa: E402
from bench.databases import DEFAULT_PG, Database  # noqa: E402
from bench.server import MINIMAL_APP, PROJECT_APP, GunicornServer  # noqa: E402
from receiver.config import default_web_concurrency  # noqa: E402

APPS = {"project": PROJECT_APP, "minimal": MINIMAL_APP}


def log(message: str = "") -> None:
    print(message, flush=True)


def checkout(rev: str | None, workdir: Path) -> tuple[Path, str]:
    """The code to run for ``rev`` (None: this checkout as it is) and how to name it."""
    if rev is None:
        return ROOT, "working tree"
    short = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                           check=True).stdout.strip()
    dest = workdir / f"code-{short}"
    if not dest.exists():
        dest.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", short], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest, short


def main() -> int:
    stop_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("servers", nargs=2, metavar="APP[@REV]")
    parser.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--slices", type=int, default=8, help="slice pairs (each server runs once per pair)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one slice")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="untimed load on a server just before each of its slices (its caches and pool warm again)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate-guess", type=float, default=2500.0,
                        help="requests signed per server and second of load (more than either serves)")
    parser.add_argument("--env-a", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for server A only (repeatable), e.g. WEB_THREADS=4")
    parser.add_argument("--env-b", action="append", default=[], metavar="NAME=VALUE", help="the same for server B")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if not loadgen.wrk_path():
        sys.exit(loadgen.WRK_MISSING)

    workdir = Path(tempfile.mkdtemp(prefix="rmvs-ab-"))
    key_file = workdir / "rm-server-public.pem"
    key_file.write_text(VECTORS["rm_server_public_pem"], encoding="utf-8")
    specs = []
    for index, spec in enumerate(args.servers):
        app, _, rev = spec.partition("@")
        if app not in APPS:
            sys.exit(f"unknown app {app!r}: one of {', '.join(APPS)}")
        code, name = checkout(rev or None, workdir)
        extra = dict(item.split("=", 1) for item in (args.env_a, args.env_b)[index])
        shown = "".join(f" {k}={v}" for k, v in extra.items())
        specs.append((f"{chr(ord('A') + index)}: {app} @ {name}{shown}", APPS[app], code, f"ab{index}", extra))

    per_slice = int(args.rate_guess * (args.seconds + args.settle))
    log(f"signing {2 * (args.slices + 1) * per_slice:,} distinct callbacks (not timed)")
    records = signed_records(2 * (args.slices + 1) * per_slice)
    chunks = [records[i * per_slice:(i + 1) * per_slice] for i in range(2 * (args.slices + 1))]

    env = {
        "RM_SERVER_PUBLIC_KEY_FILE": str(key_file),
        "RM_SIGNATURE_MAX_AGE_SECONDS": "900",
        "LOG_LEVEL": "INFO",
        "WEB_CONCURRENCY": str(default_web_concurrency(os.cpu_count() or 1)),
    }
    results: dict[int, list[loadgen.PhaseResult]] = {0: [], 1: []}
    with Database(args.db, specs[0][3], args, workdir) as db_a, Database(args.db, specs[1][3], args, workdir) as db_b:
        servers = []
        try:
            for (_label, app, code, tag, extra), db in zip(specs, (db_a, db_b)):
                servers.append(
                    GunicornServer(app, {**env, **extra, "DATABASE_URL": db.url}, workdir, tag, code=code).__enter__()
                )

            def drive(which: int, chunk: list) -> loadgen.PhaseResult:
                server = servers[which]
                settle = int(args.rate_guess * args.settle)
                if settle:
                    wrk(which, chunk[:settle], args.settle)
                workers = server.workers()
                ctx = cpu.context_switches(workers)
                result = wrk(which, chunk[settle:], args.seconds)
                if result.exhausted:
                    sys.exit("a request file ran out: raise --rate-guess")
                after = cpu.context_switches(workers)
                answered = sum(result.statuses.values()) or 1
                result.extra["voluntary"] = (after[0] - ctx[0]) / answered
                return result

            def wrk(which: int, chunk: list, seconds: float) -> loadgen.PhaseResult:
                path = workdir / f"requests-{which}.txt"
                write_request_file(path, chunk)
                try:
                    return loadgen.run_wrk(servers[which].base, path, connections=args.connections, threads=1,
                                           duration=seconds, wrap=False, server_pid=servers[which].proc.pid,
                                           label=specs[which][0])
                finally:
                    path.unlink()

            # Warm-up: connections, prepared statements, the first pages of every index.
            drive(0, chunks[0])
            drive(1, chunks[1])
            for pair in range(args.slices):
                order = (0, 1) if pair % 2 == 0 else (1, 0)
                for which in order:
                    results[which].append(drive(which, chunks[2 + 2 * pair + which]))
                a, b = results[0][-1], results[1][-1]
                log(f"  pair {pair + 1}: A {a.rate:7.1f} req/s, B {b.rate:7.1f} req/s, B/A {b.rate / a.rate:.3f}"
                    f"  (first: {'AB'[order[0]]})")
            for server in servers:
                errors = server.log_errors()
                if errors:
                    log(f"  errors in {server.label}'s log: {errors[:3]}")
        finally:
            for server in servers:
                server.__exit__(None, None, None)
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)

    log("")
    log(f"{args.db}, {args.slices} pairs of {args.seconds:g} s slices (each after {args.settle:g} s untimed), "
        f"wrk -c{args.connections}, "
        f"{env['WEB_CONCURRENCY']} workers")
    for which, (label, *_rest) in enumerate(specs):
        rs = results[which]
        non_200 = sum(sum(v for k, v in r.statuses.items() if k != "200") for r in rs)
        per_request = statistics.median(r.cpu.get("gunicorn", 0.0) / r.rate * 1000 for r in rs if r.rate)
        pg = (f", PostgreSQL {statistics.median(r.cpu.get('postgres', 0.0) / r.rate * 1000 for r in rs if r.rate):.3f} ms"
              if args.db == "postgresql" else "")
        log(f"  {label}: median {statistics.median(r.rate for r in rs):,.1f} req/s "
            f"(min {min(r.rate for r in rs):,.1f}, max {max(r.rate for r in rs):,.1f}); p50 "
            f"{statistics.median(r.latency_ms.get('p50', 0.0) for r in rs):.1f} ms; CPU per request: gunicorn "
            f"{per_request:.3f} ms{pg}; {statistics.median(r.extra['voluntary'] for r in rs):.1f} voluntary "
            f"switches; non-200: {non_200}")
    ratios = sorted(b.rate / a.rate for a, b in zip(results[0], results[1]) if a.rate)
    log(f"  B/A per pair: median {statistics.median(ratios):.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}); "
        f"B above A in {sum(r > 1 for r in ratios)} of {len(ratios)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

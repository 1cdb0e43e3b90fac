#!/usr/bin/env python3
"""CPU per callback as instructions, not seconds: hello world, the minimal receiver and the project on SQLite.

Timed CPU figures on this shared VM move by 10-20 % from one minute to the next, which hides a
change of a few per cent. valgrind's callgrind counts the instructions a process executes, which
do not depend on what else the machine is doing. Each app runs in-process (the Flask test client,
no gunicorn) against a fresh, migrated SQLite file, once with --small and once with --large
callbacks; the difference divided by the difference in count is the cost of one callback, with
start-up (imports, migrations, the first-use compilation of statements) cancelled out. The
callbacks are RM's lifecycle (bench/callbacks.py: VALID, ISSUE, REDEEMED per voucher), signed
beforehand, outside valgrind; one file serves every run of an invocation. User-space instructions
only: the kernel's share of a commit's fsync is not counted.

Usage:  .venv/bin/python scripts/bench/instructions.py [--apps hello,minimal,project] [--small 30] [--large 330]
        [--ref REV]   also measure the project at git revision REV (a worktree under /tmp), for A/B
Needs valgrind (apt-get install -y valgrind). Takes about a minute per app (two runs in parallel).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sign_requests(path: Path, count: int) -> None:
    """Pre-sign ``count`` lifecycle callbacks (natively; signing under valgrind would dominate)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    from bench.callbacks import signed_records

    # Their X-Timestamp is now; the runs disable the timestamp window, so the file stays usable.
    path.write_bytes(pickle.dumps([(r.body, r.headers) for r in signed_records(count, "lifecycle")]))


def child(root: str, app_kind: str, requests_file: str, count: int) -> None:
    """Inside valgrind: set up the app on a fresh SQLite file, then post ``count`` callbacks."""
    sys.path[:0] = [root, os.path.join(root, "scripts")]
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="rmvs-instr-metrics-"))
    work = Path(tempfile.mkdtemp(prefix="rmvs-instr-"))
    url = f"sqlite:///{work / 'bench.db'}"
    from tests.support import fresh_settings_env, migrate

    migrate(url)
    vectors = json.loads(Path(root, "tests", "fixtures", "rm-signature.json").read_text(encoding="utf-8"))
    # As in production: INFO logging (to /dev/null here), no timestamp window (the bodies are pre-signed).
    os.environ.update(fresh_settings_env(url, vectors, work, LOG_LEVEL="INFO", RM_SIGNATURE_MAX_AGE_SECONDS="0"))
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the whole process
    if app_kind == "project":
        from receiver import create_app

        app = create_app()
    else:
        from bench import baseline_apps
        from receiver.db import make_engine

        if app_kind == "minimal":
            baseline_apps.create_minimal_table(make_engine(url))
            app = baseline_apps.create_minimal_app()
        else:
            app = baseline_apps.create_hello_app()
    import logging

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    client = app.test_client()
    requests = pickle.loads(Path(requests_file).read_bytes())
    for body, headers in requests[:count]:
        response = client.post("/webhooks/revenuemonster/voucher", data=body, headers=headers)
        if response.status_code != 200:
            raise SystemExit(f"callback answered {response.status_code}: {response.get_data(as_text=True)[:200]}")
    shutil.rmtree(work, ignore_errors=True)


def instructions(root: Path, app_kind: str, requests_file: Path, count: int) -> int:
    """Instructions callgrind counted for one child run."""
    out = tempfile.mktemp(prefix="rmvs-callgrind-")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__, "--child",
         str(root), app_kind, str(requests_file), str(count)],
        capture_output=True, text=True, env=env, check=False,
    )
    Path(out).unlink(missing_ok=True)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"valgrind run failed ({app_kind}, {count}):\n{proc.stderr[-2000:]}")
    return int(found.group(1))


def per_callback(root: Path, app_kind: str, requests_file: Path, small: int, large: int) -> float:
    """Instructions of one callback: (large run - small run) / (large - small)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda n: instructions(root, app_kind, requests_file, n), (small, large))
    return (b - a) / (large - small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", default="hello,minimal,project")
    parser.add_argument("--small", type=int, default=30)
    parser.add_argument("--large", type=int, default=330)
    parser.add_argument("--ref", help="also measure the project at this git revision")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        root, kind, requests_file, count = a.child
        child(root, kind, requests_file, int(count))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: apt-get install -y valgrind")
    work = Path(tempfile.mkdtemp(prefix="rmvs-instr-"))
    requests_file = work / "requests.pkl"
    sign_requests(requests_file, a.large)
    runs = [(kind, ROOT) for kind in a.apps.split(",")]
    if a.ref:
        ref_root = work / "ref"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(ref_root), a.ref],
                       check=True, capture_output=True)
        runs.append(("project", ref_root))
    results = {}
    try:
        for kind, root in runs:
            label = kind if root == ROOT else f"project@{a.ref}"
            results[label] = per_callback(root, kind, requests_file, a.small, a.large)
            print(f"  {label:<22} {results[label] / 1e6:7.3f} M instructions per callback", flush=True)
    finally:
        if a.ref:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "ref")],
                           check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    if "minimal" in results and "project" in results:
        print(f"  minimal / project: {results['minimal'] / results['project']:.2f} (the throughput ratio if "
              f"both were CPU-bound and gunicorn cost nothing)")
    if a.ref and "project" in results:
        print(f"  project vs {a.ref}: {100 * (results['project'] / results[f'project@{a.ref}'] - 1):+.1f} %")


if __name__ == "__main__":
    main()

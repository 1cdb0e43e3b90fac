"""The whole product in under a minute, on SQLite: fake RM, receiver, backfill, scheduler, ops queries.

Run it with `scripts/demo` (which makes .venv first). Everything happens in a fresh temporary
folder that is printed at the end, so you can keep poking at the database with sqlite3.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from tests.support import free_port, wait_http  # noqa: E402

VOUCHERS = int(os.environ.get("DEMO_VOUCHERS", "300"))
FINAL = ("VOID", "EXPIRED", "MARKET_PLACE", "COMPLETE")


def say(text: str) -> None:
    """A step heading."""
    print(f"\n== {text}", flush=True)


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A background process of ours, logging to a file."""
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group and wait."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run(args: list[str], env: dict[str, str]) -> str:
    """A foreground command of ours; its output."""
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def ops_query(name: str) -> str:
    """One named query from docs/ops-queries.sql."""
    text = (ROOT / "docs" / "ops-queries.sql").read_text()
    for block in text.split("-- name: ")[1:]:
        header, _, rest = block.partition("\n")
        if header.strip() == name:
            sql_lines = [line for line in rest.splitlines() if not line.strip().startswith("--")]
            return "\n".join(sql_lines).strip().rstrip(";")
    raise KeyError(name)


def main() -> int:
    """Run the demo; exit 0 when the database ends in agreement with the fake RM."""
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="rm-voucher-sync-demo-"))
    db_path = work / "receiver.db"
    fake_port, web_port = free_port(), free_port()
    fake_url, web_url = f"http://127.0.0.1:{fake_port}", f"http://127.0.0.1:{web_port}"
    python = sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RM_", "DATABASE_URL", "RECONCILE_", "OPS_"))}
    env.update({
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": f"sqlite:///{db_path}",
        "RM_API_BASE_URL": fake_url,
        "RM_OAUTH_BASE_URL": fake_url,
        "RM_CLIENT_ID": "fake-client",
        "RM_CLIENT_SECRET": "fake-secret",
        "RM_PRIVATE_KEY_FILE": str(work / "keys" / "merchant-private.pem"),
        "RM_SERVER_PUBLIC_KEY_FILE": str(work / "keys" / "rm-server-public.pem"),
        "RM_MAX_REQUESTS_PER_SECOND": "200",
        "RECONCILE_INTERVAL_SECONDS": "2",
        "RECONCILE_STALE_AFTER_SECONDS": "0",
        "PROMETHEUS_MULTIPROC_DIR": str(work / "metrics"),
        "WEB_CONCURRENCY": "3",
        "LOG_LEVEL": "WARNING",
    })
    (work / "metrics").mkdir()
    procs: list[subprocess.Popen] = []
    try:
        say(f"starting the fake RevenueMonster on {fake_url}")
        procs.append(start([python, "-m", "receiver.fake_rm", "--port", str(fake_port), "--keys-dir",
                            str(work / "keys")], env, work / "fake-rm.log"))
        wait_http(fake_url + "/_fake/requests", proc=procs[-1])

        say(f"migrating {db_path} and starting the receiver (gunicorn) on {web_url}")
        run([python, "-m", "alembic", "upgrade", "head"], env)
        procs.append(start([python, "-m", "gunicorn", "receiver:create_app()", "--bind", f"127.0.0.1:{web_port}"],
                           env, work / "web.log"))
        wait_http(web_url + "/healthz", proc=procs[-1])

        say(f"RM creates {VOUCHERS} vouchers in 3 batches; flask --app receiver backfill copies them in")
        requests.post(fake_url + "/_fake/vouchers", json={"count": VOUCHERS, "prefix": "DEMO", "batches": 3}, timeout=30)
        print("   " + run([python, "-m", "flask", "--app", "receiver", "backfill"], env).strip().splitlines()[-1])

        say("the vouchers live: 25% of callbacks are lost, 10% duplicated, 20% reordered")
        sim = requests.post(fake_url + "/_fake/simulate", timeout=600, json={
            "count": VOUCHERS, "callback_url": web_url + "/webhooks/revenuemonster/voucher",
            "loss": 0.25, "duplicate": 0.10, "reorder": 0.20,
        }).json()
        print(f"   {sim['vouchers']} vouchers changed {sim['changes']} times; {sim['callbacks_planned']} callbacks "
              f"reached the receiver (all answered 200: {sim['delivered_200'] == sim['callbacks_planned']})")
        truth = requests.get(fake_url + "/_fake/vouchers", timeout=30).json()

        def agreement() -> int:
            with sqlite3.connect(db_path) as conn:
                ours = {code: status for code, status in conn.execute("SELECT code, status FROM vouchers")}
            return sum(1 for code, v in truth.items() if ours.get(code) == v["status"])

        print(f"   database agrees with RM on {agreement()} of {len(truth)} vouchers after callbacks alone")

        say("flask --app receiver scheduler   (reconciliation: asks RM wherever a callback may be missing)")
        procs.append(start([python, "-m", "flask", "--app", "receiver", "scheduler"], env, work / "scheduler.log"))
        deadline = time.monotonic() + 60
        run_row = None
        while time.monotonic() < deadline and run_row is None:
            time.sleep(0.5)
            with sqlite3.connect(db_path) as conn:
                run_row = conn.execute(
                    "SELECT id, checked, changed, failed FROM reconcile_runs WHERE finished_at IS NOT NULL "
                    "ORDER BY id LIMIT 1"
                ).fetchone()
        stop(procs.pop())
        if run_row is None:
            raise SystemExit("no reconciliation run finished within a minute; see " + str(work / "scheduler.log"))
        print(f"   run #{run_row[0]}: checked {run_row[1]}, changed {run_row[2]}, failed {run_row[3]}")
        agreed = agreement()
        print(f"   database agrees with RM on {agreed} of {len(truth)} vouchers")

        say("what happened, in numbers")
        with sqlite3.connect(db_path) as conn:
            for status, count in conn.execute("SELECT status, count(*) FROM vouchers GROUP BY status ORDER BY 2 DESC"):
                print(f"   {count:>5} vouchers {status}")
            for source, outcome, count in conn.execute(
                "SELECT source, outcome, count(*) FROM voucher_events GROUP BY source, outcome ORDER BY 1, 2"
            ):
                print(f"   {count:>5} events  {source:<10} {outcome}")
            for outcome, count, attempts in conn.execute(
                "SELECT outcome, count(*), sum(attempts) FROM webhook_deliveries GROUP BY outcome ORDER BY 1"
            ):
                print(f"   {count:>5} deliveries {outcome} ({attempts} POSTs)")
            sample = conn.execute(
                "SELECT voucher_code FROM voucher_events WHERE source = 'reconcile' AND outcome = 'applied' "
                "AND voucher_code IN (SELECT voucher_code FROM voucher_events WHERE source = 'callback') "
                "ORDER BY id LIMIT 1"
            ).fetchone()
            query = ops_query("reconcile_only_changes_per_day")
            header = [d[0] for d in conn.execute(query).description] if query else []
            rows = conn.execute(query).fetchall()

        if sample:
            say(f"a sample timeline: flask --app receiver voucher show {sample[0]}")
            print(run([python, "-m", "flask", "--app", "receiver", "voucher", "show", sample[0]], env).rstrip())

        say("an ops query from docs/ops-queries.sql: reconcile_only_changes_per_day")
        print("   " + " | ".join(header))
        for row in rows:
            print("   " + " | ".join(str(v) for v in row))

        elapsed = time.monotonic() - started
        say(f"done in {elapsed:.0f}s; everything is in {work}")
        print(f"   sqlite3 {db_path} \"SELECT * FROM voucher_history LIMIT 20\"")
        return 0 if agreed == len(truth) else 1
    finally:
        for proc in reversed(procs):
            stop(proc)


if __name__ == "__main__":
    sys.exit(main())

"""The scheduler process (`flask --app receiver scheduler`) and the reconcile CLI, as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from receiver.apply import apply_snapshot
from receiver.models import ReconcileRun, Source, Voucher, VoucherEvent
from receiver.snapshot import snapshot_from_item
from tests.conftest import rm_client_env
from tests.support import ROOT


def _flask(args: list[str], env: dict[str, str], cwd: Path, **kwargs) -> subprocess.Popen:  # noqa: ANN003
    full = {k: v for k, v in os.environ.items() if not k.startswith(("RM_", "DATABASE_URL", "RECONCILE_", "OPS_"))}
    full.update(env)
    full["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "receiver", *args],
        cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        **kwargs,
    )


def _seed_due(db, fake, count: int, prefix: str = "S") -> list[str]:  # noqa: ANN001
    codes = []
    for i in range(count):
        code = f"{prefix}{i:03d}"
        item = fake.add_voucher(code, status="ISSUE")
        with db.begin() as s:
            apply_snapshot(s, snapshot_from_item(item), source=Source.BACKFILL)
        codes.append(code)
    return codes


def _runs(db) -> list[ReconcileRun]:  # noqa: ANN001
    with db() as s:
        return list(s.scalars(select(ReconcileRun).order_by(ReconcileRun.started_at)))


def _scheduler_env(settings_env: dict, fake, vectors: dict, **extra: str) -> dict[str, str]:  # noqa: ANN001
    return {**settings_env, **rm_client_env(fake, vectors), "RECONCILE_INTERVAL_SECONDS": "1",
            "RECONCILE_STALE_AFTER_SECONDS": "0", "RECONCILE_CONCURRENCY": "2", "LOG_LEVEL": "INFO", **extra}


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


@pytest.mark.postgres
def test_two_schedulers_never_reconcile_at_the_same_time(postgres_admin_url, vectors, fake_rm, tmp_path) -> None:  # noqa: ANN001
    from receiver.db import make_engine, make_session_factory
    from tests.conftest import create_postgres_database, drop_postgres_database
    from tests.support import fresh_settings_env, migrate

    url = create_postgres_database(postgres_admin_url)
    try:
        migrate(url)
        engine = make_engine(url)
        db = make_session_factory(engine)
        _seed_due(db, fake_rm, 20)
        fake_rm.faults.latency = 0.05
        env = _scheduler_env(fresh_settings_env(url, vectors, tmp_path), fake_rm, vectors)
        procs = [_flask(["scheduler"], env, tmp_path) for _ in range(2)]
        time.sleep(9)
        outputs = [_stop(p) for p in procs]
        # A pass interrupted by our own SIGTERM records why; every other pass checked everything.
        runs = [r for r in _runs(db) if r.finished_at is not None and r.error != "stopped early: shutting down"]
        engine.dispose()
    finally:
        drop_postgres_database(postgres_admin_url, url)
    assert len(runs) >= 3, outputs
    for earlier, later in zip(runs, runs[1:]):
        assert later.started_at >= earlier.finished_at, "two reconciliations overlapped"
    assert all(r.checked == 20 and r.failed == 0 and r.trigger == "scheduler" for r in runs), [(r.checked, r.failed, r.error) for r in runs if r.checked != 20 or r.error]
    # Both processes were live and competing: at least one of them was told the lease was taken.
    assert any("another process holds" in out for out in outputs), outputs


def test_killed_scheduler_lease_expires_and_the_next_run_completes(settings_env, db, fake_rm, vectors, tmp_path) -> None:  # noqa: ANN001
    codes = _seed_due(db, fake_rm, 40)
    for code in codes:
        fake_rm.set_status(code, "VOID")
    fake_rm.faults.latency = 0.25  # 40 vouchers at concurrency 2: a run takes ~5 s
    env = _scheduler_env(settings_env, fake_rm, vectors, RECONCILE_INTERVAL_SECONDS="1")
    first = _flask(["scheduler"], env, tmp_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not fake_rm.requests_for("get_voucher"):
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(first.pid, signal.SIGKILL)  # mid-run: some vouchers applied, the lease still held
    first.communicate()
    killed_at = time.monotonic()
    fake_rm.faults.latency = 0.0
    second = _flask(["scheduler"], env, tmp_path)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        finished = [r for r in _runs(db) if r.finished_at is not None]
        if finished:
            break
        time.sleep(0.2)
    took_over_after = time.monotonic() - killed_at
    out = _stop(second)
    runs = _runs(db)
    assert runs[0].finished_at is None, "the killed run never finished"
    assert any(r.finished_at is not None and r.failed == 0 for r in runs[1:]), out
    assert took_over_after >= 2, "the lease must be waited out, not ignored"
    with db() as s:
        assert set(s.scalars(select(Voucher.status))) == {"VOID"}
        events = s.scalars(select(VoucherEvent).where(VoucherEvent.source == "reconcile")).all()
    assert sorted(e.voucher_code for e in events) == sorted(codes), "each change applied exactly once"


def test_scheduler_without_credentials_says_so_once_and_keeps_running(settings_env, tmp_path) -> None:  # noqa: ANN001
    proc = _flask(["scheduler"], {**settings_env, "RECONCILE_INTERVAL_SECONDS": "1", "LOG_LEVEL": "INFO"}, tmp_path)
    time.sleep(4)
    assert proc.poll() is None, "the scheduler must keep running"
    out = _stop(proc)
    assert out.count("reconciliation is disabled") == 1
    assert "RM_CLIENT_ID" in out


def test_reconcile_cli_checks_given_codes(settings_env, db, fake_rm, vectors, tmp_path) -> None:  # noqa: ANN001
    _seed_due(db, fake_rm, 2)
    fake_rm.set_status("S000", "VOID")
    env = _scheduler_env(settings_env, fake_rm, vectors)
    proc = _flask(["reconcile", "--code", "S000", "--code", "S001"], env, tmp_path)
    out = _stop(proc) if proc.wait(timeout=60) is None else proc.communicate()[0]
    assert proc.returncode == 0, out
    assert "checked 2, changed 1, failed 0" in out
    with db() as s:
        assert s.scalar(select(Voucher.status).where(Voucher.code == "S000")) == "VOID"

    full = _flask(["reconcile"], env, tmp_path)
    full.wait(timeout=60)
    out = full.communicate()[0]
    assert full.returncode == 0 and "checked 1, changed 0" in out, out


def test_reconcile_cli_without_credentials_is_a_clear_error(settings_env, tmp_path) -> None:  # noqa: ANN001
    proc = _flask(["reconcile"], settings_env, tmp_path)
    proc.wait(timeout=60)
    out = proc.communicate()[0]
    assert proc.returncode != 0
    assert "RM credentials missing" in out and "Traceback" not in out

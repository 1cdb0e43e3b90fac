"""Reconciliation against the fake RM: convergence, retries, not-found, reinstatement, backfill, leases."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import func, select

from receiver.apply import apply_snapshot
from receiver.backfill import backfill
from receiver.models import BackfillBatch, ReconcileRun, Source, Voucher, VoucherEvent
from receiver.reconciliation import reconcile_codes, reconcile_due
from receiver.snapshot import parse_rm_time, snapshot_from_item
from receiver.state_machine import FINAL_STATUSES
from tests.support import CALLBACK_PATH, counting_commits, gunicorn_server, while_another_writer_has_the_turn


def _state(db) -> dict[str, tuple[str, int, bool]]:  # noqa: ANN001
    with db() as s:
        return {
            code: (status, ns, flagged)
            for code, status, ns, flagged in s.execute(
                select(Voucher.code, Voucher.status, Voucher.rm_updated_ns, Voucher.needs_reconcile)
            )
        }


def _rm_state(fake) -> dict[str, tuple[str, int]]:  # noqa: ANN001
    return {code: (item["status"], parse_rm_time(item["updatedAt"]).ns) for code, item in fake.vouchers.items()}


def _seed(db, fake, code: str, status: str, **fields) -> dict:  # noqa: ANN001, ANN003
    item = fake.add_voucher(code, status=status, **fields)
    with db.begin() as s:
        apply_snapshot(s, snapshot_from_item(item), source=Source.BACKFILL)
    return item


def _apply_as_one_chunk(db, rm_client, codes: list[str]):  # noqa: ANN001, ANN202
    """RM's answers for these codes, applied as one chunk of a pass (what the pipeline hands over); its counts."""
    from collections import deque

    from receiver import reconciliation

    summary = reconciliation.ReconcileSummary(run_id=0)
    fetched = deque(reconciliation._fetch(rm_client, code) for code in codes)
    reconciliation.Reconciler(db, rm_client)._apply(fetched, summary)
    return summary


def test_convergence_after_lossy_duplicated_reordered_callbacks(
    app, db, fake_rm, rm_client, settings_env, tmp_path, migrated_url  # noqa: ANN001
) -> None:
    """2,000 vouchers live random lives; callbacks are lost (30%), duplicated (10%), reordered (20%)."""
    from receiver.fake_rm import CallbackPlan

    codes = fake_rm.create_vouchers(2000, batches=5)
    summary = backfill(db, rm_client)
    assert summary.vouchers == 2000 and summary.changed == 2000
    changes = fake_rm.live(codes)
    plan = CallbackPlan(loss=0.30, duplicate=0.10, reorder=0.20, attempts=5, interval=0.05)
    deliveries = fake_rm.plan_deliveries(changes, plan)
    assert len(changes) > 2000
    with gunicorn_server(settings_env, workers=3) as base:
        statuses = fake_rm.deliver(base + CALLBACK_PATH, deliveries, plan, workers=6)
    assert statuses == [200] * len(deliveries)

    before = _state(db)
    rm = _rm_state(fake_rm)
    mismatched = {c for c in codes if before[c][:2] != rm[c]}
    skipped_final = {c for c in codes if before[c][0] in FINAL_STATUSES and not before[c][2]}
    assert mismatched, "the lossy delivery should have left the database behind RM"
    fake_rm.log.clear()

    result = reconcile_due(db, rm_client, stale_after_seconds=0, concurrency=8, trigger="test")

    after = _state(db)
    assert {c: after[c][:2] for c in codes} == rm
    fetched = [r.code for r in fake_rm.requests_for("get_voucher")]
    assert len(fetched) == len(set(fetched)), "each due voucher is fetched once"
    assert not set(fetched) & skipped_final, "final vouchers are never polled"
    assert mismatched <= set(fetched)
    assert (result.checked, result.changed, result.failed) == (len(fetched), len(mismatched), 0)
    with db() as s:
        run = s.get(ReconcileRun, result.run_id)
        assert (run.checked, run.changed, run.failed, run.trigger) == (len(fetched), len(mismatched), 0, "test")
        assert run.finished_at >= run.started_at and run.error is None
        reconcile_events = s.scalar(
            select(func.count()).select_from(VoucherEvent).where(VoucherEvent.source == "reconcile")
        )
        assert reconcile_events == len(mismatched)
    # A second pass finds nothing new to change.
    again = reconcile_due(db, rm_client, stale_after_seconds=0, concurrency=8, trigger="test")
    assert again.changed == 0 and again.failed == 0


def test_due_selection(db, fake_rm, rm_client) -> None:  # noqa: ANN001
    from datetime import timedelta

    from receiver.models import utcnow

    _seed(db, fake_rm, "FRESH", "ISSUE")
    _seed(db, fake_rm, "OLD", "ISSUE")
    _seed(db, fake_rm, "FINAL", "VOID")
    _seed(db, fake_rm, "FLAGGED", "VOID")
    _seed(db, fake_rm, "EXPIRING", "REDEEMED")
    with db.begin() as s:
        vouchers = {v.code: v for v in s.scalars(select(Voucher))}
        vouchers["OLD"].last_confirmed_at = utcnow() - timedelta(hours=2)
        vouchers["FINAL"].last_confirmed_at = utcnow() - timedelta(days=30)
        vouchers["FLAGGED"].needs_reconcile = True
        vouchers["EXPIRING"].expires_at = utcnow() - timedelta(minutes=1)
    reconcile_due(db, rm_client, stale_after_seconds=3600, concurrency=2, trigger="test")
    assert sorted(r.code for r in fake_rm.requests_for("get_voucher")) == ["EXPIRING", "FLAGGED", "OLD"]
    with db() as s:
        assert s.scalar(select(Voucher.needs_reconcile).where(Voucher.code == "FLAGGED")) is False


def test_429_and_5xx_are_retried_and_the_run_finishes(db, fake_rm, rm_client) -> None:  # noqa: ANN001
    for i in range(60):
        _seed(db, fake_rm, f"F{i:03d}", "ISSUE")
        fake_rm.set_status(f"F{i:03d}", "VOID")
    fake_rm.faults.rate_429 = 0.15
    fake_rm.faults.rate_5xx = 0.15
    rm_client.max_retries = 12
    result = reconcile_due(db, rm_client, stale_after_seconds=0, concurrency=4, trigger="test")
    assert (result.checked, result.changed, result.failed) == (60, 60, 0)
    statuses = [r.status for r in fake_rm.requests_for("get_voucher")]
    assert 429 in statuses and any(s >= 500 for s in statuses) and statuses.count(200) == 60
    assert {s for s, _, _ in _state(db).values()} == {"VOID"}


def test_failures_are_counted_and_left_due(db, fake_rm, rm_client) -> None:  # noqa: ANN001
    _seed(db, fake_rm, "DOWN", "ISSUE")
    fake_rm.faults.rate_5xx = 1.0
    rm_client.max_retries = 1
    result = reconcile_due(db, rm_client, stale_after_seconds=0, concurrency=2, trigger="test")
    assert (result.checked, result.changed, result.failed) == (1, 0, 1)
    fake_rm.faults.rate_5xx = 0.0
    assert reconcile_due(db, rm_client, stale_after_seconds=0, concurrency=2, trigger="test").failed == 0


def test_voucher_rm_no_longer_knows_is_recorded_once_and_not_polled_again(db, fake_rm, rm_client) -> None:  # noqa: ANN001
    _seed(db, fake_rm, "GONE", "ISSUE")
    fake_rm.remove_voucher("GONE")
    first = reconcile_due(db, rm_client, stale_after_seconds=0, concurrency=2, trigger="test")
    assert (first.checked, first.not_found, first.failed) == (1, 1, 0)
    with db() as s:
        event = s.scalars(select(VoucherEvent).where(VoucherEvent.voucher_code == "GONE").order_by(VoucherEvent.id.desc())).first()
        v = s.scalars(select(Voucher).where(Voucher.code == "GONE")).one()
    assert (event.outcome, event.source, event.to_status) == ("not_found", "reconcile", "ISSUE")
    assert v.rm_missing_at is not None and v.status == "ISSUE"
    second = reconcile_due(db, rm_client, stale_after_seconds=0, concurrency=2, trigger="test")
    assert second.checked == 0 and len(fake_rm.requests_for("get_voucher")) == 1
    # Checking it explicitly still asks RM, and records no second not-found event.
    explicit = reconcile_codes(db, rm_client, ["GONE"], concurrency=1, trigger="cli")
    assert explicit.not_found == 1
    with db() as s:
        assert s.scalar(select(func.count()).select_from(VoucherEvent).where(VoucherEvent.outcome == "not_found")) == 1


def test_reinstatement_is_applied_from_rm_and_marked(client, db, fake_rm, rm_client, rm_signer) -> None:  # noqa: ANN001
    from tests.support import callback_body

    void = _seed(db, fake_rm, "BACK", "VOID")
    reinstated = fake_rm.set_status("BACK", "ISSUE")
    body = callback_body(reinstated)
    r = client.post(CALLBACK_PATH, data=body, headers=rm_signer.headers(body))
    assert r.status_code == 200
    assert _state(db)["BACK"][0] == "VOID" and _state(db)["BACK"][2] is True
    result = reconcile_due(db, rm_client, stale_after_seconds=3600, concurrency=1, trigger="test")
    assert (result.checked, result.changed, result.reinstated) == (1, 1, 1)
    assert _state(db)["BACK"] == ("ISSUE", parse_rm_time(reinstated["updatedAt"]).ns, False)
    with db() as s:
        evs = s.scalars(select(VoucherEvent).where(VoucherEvent.voucher_code == "BACK").order_by(VoucherEvent.id)).all()
    assert [(e.source, e.outcome, e.to_status) for e in evs] == [
        ("backfill", "applied", "VOID"), ("callback", "illegal", "ISSUE"), ("reconcile", "applied", "ISSUE")
    ]
    assert "RM confirms VOID -> ISSUE" in evs[-1].detail
    assert void["status"] == "VOID"


def test_explicit_codes_include_final_and_unknown_ones(db, fake_rm, rm_client) -> None:  # noqa: ANN001
    _seed(db, fake_rm, "DONE", "VOID")
    fake_rm.add_voucher("NEWTOUS", status="ISSUE")
    result = reconcile_codes(db, rm_client, ["DONE", "NEWTOUS", "NOWHERE"], concurrency=2, trigger="cli")
    assert (result.checked, result.changed, result.not_found, result.failed) == (3, 1, 1, 0)
    assert _state(db)["NEWTOUS"][0] == "ISSUE" and "NOWHERE" not in _state(db)


def test_backfill_resumes_after_interruption_and_is_idempotent(db, fake_rm, rm_client) -> None:  # noqa: ANN001
    fake_rm.page_size = 10
    fake_rm.create_vouchers(75, batches=3)
    pages = []

    def interrupt_after_four(batch: str, count: int) -> None:
        pages.append((batch, count))
        if len(pages) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backfill(db, rm_client, on_page=interrupt_after_four)
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Voucher)) == 35  # batch-0 (25) + one page of batch-1
        progress = {b.batch_key: b for b in s.scalars(select(BackfillBatch))}
    assert progress["batch-0"].completed_at is not None and progress["batch-1"].cursor == "10"

    fake_rm.log.clear()
    resumed = backfill(db, rm_client)
    assert resumed.batches_skipped == 1 and resumed.vouchers == 40
    # batch-1 resumed from its cursor: its first page was not fetched again.
    batch_requests = fake_rm.requests_for("voucher_batch")
    assert sum(1 for r in batch_requests if r.code == "batch-1") == 2
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Voucher)) == 75
        assert s.scalar(select(func.count()).select_from(VoucherEvent)) == 75

    again = backfill(db, rm_client)
    assert again.batches == 0 and again.batches_skipped == 3
    restarted = backfill(db, rm_client, restart=True)
    assert restarted.vouchers == 75 and restarted.changed == 0
    with db() as s:
        assert s.scalar(select(func.count()).select_from(VoucherEvent)) == 75


def test_a_backfill_page_goes_in_transactions_bounded_by_the_budget_and_its_cursor_only_with_the_last(
    db, fake_rm, rm_client, monkeypatch,  # noqa: ANN001
) -> None:
    """Callbacks wait while a backfill transaction holds SQLite's writer turn, so a page is split by time.

    With the budget at zero every voucher is its own transaction; the page's resume cursor is
    committed with its last one, so a run stopped inside a page redoes it without adding events.
    """
    from receiver import backfill as backfill_module

    fake_rm.page_size = 10
    fake_rm.create_vouchers(25, batches=1)
    engine = db.kw["bind"]
    monkeypatch.setattr(backfill_module, "TURN_BUDGET_SECONDS", 0.0)
    real_apply = backfill_module.apply_snapshot
    applied: list[str] = []

    def stop_at_the_fifteenth(session, snapshot, **kwargs):  # noqa: ANN001, ANN202
        if len(applied) == 14:
            raise KeyboardInterrupt
        applied.append(snapshot.code)
        return real_apply(session, snapshot, **kwargs)

    monkeypatch.setattr(backfill_module, "apply_snapshot", stop_at_the_fifteenth)
    with counting_commits(engine) as commits, pytest.raises(KeyboardInterrupt):
        backfill(db, rm_client)
    assert len(commits) == 14  # one a voucher, the first page's cursor with its tenth
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Voucher)) == 14
        (progress,) = s.scalars(select(BackfillBatch))
    assert progress.cursor == "10" and progress.completed_at is None

    monkeypatch.setattr(backfill_module, "apply_snapshot", real_apply)
    monkeypatch.setattr(backfill_module, "TURN_BUDGET_SECONDS", 60.0)
    with counting_commits(engine) as commits:
        resumed = backfill(db, rm_client)
    assert len(commits) == 2  # the two pages left, a transaction each
    assert (resumed.vouchers, resumed.changed) == (15, 11)
    with db() as s:
        assert s.scalar(select(func.count()).select_from(Voucher)) == 25
        assert s.scalar(select(func.count()).select_from(VoucherEvent)) == 25
        assert s.scalars(select(BackfillBatch.completed_at)).one() is not None


def test_memory_bounded_pipeline_keeps_order_irrelevant(db, fake_rm, rm_client) -> None:  # noqa: ANN001
    """More codes than the in-flight window: everything is checked exactly once."""
    codes = [f"W{i:04d}" for i in range(300)]
    for code in codes:
        _seed(db, fake_rm, code, "ISSUE")
    random.Random(3).shuffle(codes)
    result = reconcile_codes(db, rm_client, codes, concurrency=3, trigger="test")
    assert result.checked == 300 and result.failed == 0 and result.changed == 0
    assert sorted(r.code for r in fake_rm.requests_for("get_voucher")) == sorted(codes)


def test_pass_keeps_exactly_concurrency_requests_at_rm(db, fake_rm, rm_client) -> None:  # noqa: ANN001
    """Twice as many threads sign and parse, but RM never sees more than `concurrency` lookups at once."""
    for i in range(40):
        _seed(db, fake_rm, f"CAP{i:02d}", "ISSUE")
    fake_rm.faults.latency = 0.05
    fake_rm.log.clear()
    result = reconcile_due(db, rm_client, stale_after_seconds=0, concurrency=4, trigger="test")
    assert result.checked == 40 and result.failed == 0
    edges = sorted(
        [(r.started, 1) for r in fake_rm.requests_for("get_voucher")]
        + [(r.finished, -1) for r in fake_rm.requests_for("get_voucher")]
    )
    in_flight = peak = 0
    for _at, step in edges:
        in_flight += step
        peak = max(peak, in_flight)
    assert peak == 4


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_scheduled_pass_on_sqlite_writes_only_in_its_writer_turn(app, db, fake_rm, rm_client, migrated_url) -> None:  # noqa: ANN001
    """Reconciliation waits for the web workers' writer turn instead of taking SQLite's lock from under it."""
    from sqlalchemy import make_url

    from receiver.scheduler import run_reconcile_under_lease

    _seed(db, fake_rm, "BEHIND", "ISSUE")
    fake_rm.set_status("BEHIND", "REDEEMED")
    with db.begin() as s:  # a callback was missed: the pass must look at it
        s.scalars(select(Voucher).where(Voucher.code == "BEHIND")).one().needs_reconcile = True
    runtime = app.extensions["rm_voucher_sync"]

    def runs() -> int:
        with db() as s:
            return s.scalar(select(func.count()).select_from(ReconcileRun))

    waited, runs_while_held, results = while_another_writer_has_the_turn(
        make_url(migrated_url).database, lambda: run_reconcile_under_lease(runtime, rm_client, trigger="test"), runs
    )
    assert waited and runs_while_held == 0, "the pass wrote while a web worker had the turn"
    assert results and results[0].changed == 1
    with db() as s:
        assert s.scalar(select(Voucher.status).where(Voucher.code == "BEHIND")) == "REDEEMED"


def test_an_unusable_answer_fails_only_its_voucher(db, fake_rm, rm_client) -> None:  # noqa: ANN001
    """RM's answer that is no voucher snapshot counts as failed; the others in its chunk are applied."""
    for code in ("GOOD-1", "BROKEN", "GOOD-2"):
        _seed(db, fake_rm, code, "ISSUE")
        fake_rm.set_status(code, "REDEEMED")
    fake_rm.vouchers["BROKEN"]["updatedAt"] = "yesterday"

    result = reconcile_codes(db, rm_client, ["GOOD-1", "BROKEN", "GOOD-2"], concurrency=2, trigger="test")

    assert (result.checked, result.changed, result.failed) == (3, 2, 1)
    with db() as s:
        assert dict(s.execute(select(Voucher.code, Voucher.status)).all()) == {
            "GOOD-1": "REDEEMED", "BROKEN": "ISSUE", "GOOD-2": "REDEEMED",
        }
        assert s.get(ReconcileRun, result.run_id).failed == 1


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_backfill_command_on_sqlite_writes_only_in_its_writer_turn(settings_env, fake_rm, vectors, migrated_url) -> None:  # noqa: ANN001
    """`flask backfill` waits for the web workers' writer turn before each page's transaction."""
    from sqlalchemy import make_url

    from receiver import create_app
    from receiver.config import load_settings
    from tests.conftest import rm_client_env

    fake_rm.create_vouchers(30, batches=2)
    app = create_app(load_settings({**settings_env, **rm_client_env(fake_rm, vectors)}))
    db = app.extensions["rm_voucher_sync"].sessions

    def vouchers() -> int:
        with db() as s:
            return s.scalar(select(func.count()).select_from(Voucher))

    try:
        waited, vouchers_while_held, outputs = while_another_writer_has_the_turn(
            make_url(migrated_url).database, lambda: app.test_cli_runner().invoke(args=["backfill"]), vouchers
        )
        vouchers_after = vouchers()
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()
    assert waited and vouchers_while_held == 0, "backfill wrote while a web worker had the turn"
    assert outputs and outputs[0].exit_code == 0, outputs and outputs[0].output
    assert vouchers_after == 30


def test_a_chunk_is_applied_in_transactions_that_end_once_they_have_held_the_writer_turn_for_the_budget(
    db, fake_rm, rm_client, monkeypatch,  # noqa: ANN001
) -> None:
    """Every callback waits while a pass's transaction holds SQLite's writer turn, so a chunk of answers is split by time.

    With the budget at zero each transaction applies one voucher (never none, so the pass always
    advances); with time to spare the chunk is one transaction. Either way each voucher is applied
    and counted exactly once.
    """
    from receiver import reconciliation

    engine = db.kw["bind"]

    def apply_chunk(codes: list[str], budget: float) -> tuple[int, reconciliation.ReconcileSummary]:
        monkeypatch.setattr(reconciliation, "TURN_BUDGET_SECONDS", budget)
        with counting_commits(engine) as commits:
            summary = _apply_as_one_chunk(db, rm_client, codes)
        return len(commits), summary

    codes = [f"BUDGET{i}" for i in range(12)]
    for code in codes:
        _seed(db, fake_rm, code, "ISSUE")
        fake_rm.set_status(code, "REDEEMED")
    commits, summary = apply_chunk(codes, 0.0)
    assert commits == 12
    assert (summary.checked, summary.changed, summary.failed) == (12, 12, 0)
    with db() as s:
        assert set(s.scalars(select(Voucher.status).where(Voucher.code.in_(codes)))) == {"REDEEMED"}
        assert s.scalar(select(func.count()).select_from(VoucherEvent).where(
            VoucherEvent.voucher_code.in_(codes), VoucherEvent.to_status == "REDEEMED")) == 12

    for code in codes:
        fake_rm.set_status(code, "VOID")
    commits, summary = apply_chunk(codes, 60.0)
    assert commits == 1
    assert (summary.checked, summary.changed, summary.failed) == (12, 12, 0)


def test_a_voucher_the_database_refuses_fails_alone_and_the_rest_of_its_chunk_is_applied_once(
    db, fake_rm, rm_client,  # noqa: ANN001
) -> None:
    """A write the database refuses rolls back its transaction; the chunk is redone voucher by voucher from there."""
    from sqlalchemy import text

    codes = ["ISO-1", "ISO-2", "ISO-BAD", "ISO-4", "ISO-5"]
    for code in codes:
        _seed(db, fake_rm, code, "ISSUE")
        fake_rm.set_status(code, "REDEEMED")
    engine = db.kw["bind"]
    # A refusal no snapshot can cause (our data is sanitised), staged in the database itself.
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text(
                "CREATE TRIGGER refuse_bad BEFORE UPDATE ON vouchers WHEN NEW.code = 'ISO-BAD' "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            ))
        else:
            conn.execute(text(
                "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
            ))
            conn.execute(text(
                "CREATE TRIGGER refuse_bad BEFORE UPDATE ON vouchers FOR EACH ROW "
                "WHEN (NEW.code = 'ISO-BAD') EXECUTE FUNCTION refuse_bad()"
            ))
    summary = _apply_as_one_chunk(db, rm_client, codes)

    assert (summary.checked, summary.changed, summary.failed) == (5, 4, 1)
    with db() as s:
        assert dict(s.execute(select(Voucher.code, Voucher.status).where(Voucher.code.in_(codes))).all()) == {
            "ISO-1": "REDEEMED", "ISO-2": "REDEEMED", "ISO-BAD": "ISSUE", "ISO-4": "REDEEMED", "ISO-5": "REDEEMED",
        }
        redeemed = s.scalars(select(VoucherEvent.voucher_code).where(
            VoucherEvent.voucher_code.in_(codes), VoucherEvent.to_status == "REDEEMED"))
        assert sorted(redeemed) == ["ISO-1", "ISO-2", "ISO-4", "ISO-5"]

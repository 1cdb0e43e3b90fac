"""Operators' tools: `voucher show`, `deliveries list|replay|purge`, the ops API, and /metrics."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from receiver import create_app
from receiver.config import load_settings
from receiver.models import Voucher, VoucherEvent, WebhookDelivery, utcnow
from tests.conftest import rm_client_env
from tests.support import CALLBACK_PATH

TOKEN = "ops-token-for-tests-7f3a9c"


@pytest.fixture
def ops_app(settings_env, fake_rm, vectors):  # noqa: ANN001, ANN201
    """The app with RM credentials pointing at the fake RM and the ops API on."""
    application = create_app(load_settings({**settings_env, **rm_client_env(fake_rm, vectors), "OPS_API_TOKEN": TOKEN}))
    yield application
    application.extensions["rm_voucher_sync"].engine.dispose()


@pytest.fixture
def ops_db(ops_app):  # noqa: ANN001, ANN201
    return ops_app.extensions["rm_voucher_sync"].sessions


def _post(client, signer, item) -> dict:  # noqa: ANN001
    body = json.dumps({"item": item, "code": "SUCCESS"}).encode()
    response = client.post(CALLBACK_PATH, data=body, headers=signer.headers(body))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _eventful_voucher(ops_app, fake_rm, rm_signer) -> str:  # noqa: ANN001
    """Callbacks ISSUE and VOID, a stale REDEEMED redelivery, an illegal ISSUE, then RM confirms the reinstatement."""
    client = ops_app.test_client()
    fake_rm.add_voucher("TL1", status="VALID")
    issue = fake_rm.set_status("TL1", "ISSUE")
    redeemed = fake_rm.set_status("TL1", "REDEEMED")
    void = fake_rm.set_status("TL1", "VOID")
    reinstated = fake_rm.set_status("TL1", "ISSUE")
    assert _post(client, rm_signer, issue) == {"status": "accepted"}
    assert _post(client, rm_signer, void) == {"status": "accepted"}
    assert _post(client, rm_signer, redeemed) == {"status": "stale"}
    assert _post(client, rm_signer, reinstated) == {"status": "accepted"}  # recorded as illegal
    result = ops_app.test_cli_runner().invoke(args=["reconcile", "--code", "TL1"])
    assert result.exit_code == 0, result.output
    assert "checked 1, changed 1, failed 0, not found 0, reinstated 1" in result.output
    return "TL1"


EXPECTED_TIMELINE = [
    (None, "ISSUE", "callback", "applied"),
    ("ISSUE", "VOID", "callback", "applied"),
    ("VOID", "REDEEMED", "callback", "stale"),
    ("VOID", "ISSUE", "callback", "illegal"),
    ("VOID", "ISSUE", "reconcile", "applied"),
]


def test_voucher_show_prints_the_whole_ordered_timeline(ops_app, fake_rm, rm_signer) -> None:  # noqa: ANN001
    code = _eventful_voucher(ops_app, fake_rm, rm_signer)
    runner = ops_app.test_cli_runner()
    result = runner.invoke(args=["voucher", "show", code])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines() if line.strip()[:1].isdigit()]
    assert [(cols[2], cols[3], cols[4], cols[5]) for cols in lines] == [
        ("-" if a is None else a, b, c, d) for a, b, c, d in EXPECTED_TIMELINE
    ]
    assert result.output.splitlines()[0] == f"voucher {code}: ISSUE"
    as_json = json.loads(runner.invoke(args=["voucher", "show", code, "--json"]).output)
    assert [(e["from_status"], e["to_status"], e["source"], e["outcome"]) for e in as_json["history"]] == EXPECTED_TIMELINE
    missing = runner.invoke(args=["voucher", "show", "NO-SUCH"])
    assert missing.exit_code != 0 and "no voucher with code 'NO-SUCH'" in missing.output


def test_api_returns_the_same_timeline_and_guards_with_the_token(ops_app, fake_rm, rm_signer) -> None:  # noqa: ANN001
    code = _eventful_voucher(ops_app, fake_rm, rm_signer)
    client = ops_app.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get(f"/api/vouchers/{code}").status_code == 401
    assert client.get(f"/api/vouchers/{code}", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(f"/api/vouchers/{code}", headers={"Authorization": TOKEN}).status_code == 401
    body = client.get(f"/api/vouchers/{code}", headers=auth).get_json()
    assert [(e["from_status"], e["to_status"], e["source"], e["outcome"]) for e in body["history"]] == EXPECTED_TIMELINE
    assert body["voucher"]["status"] == "ISSUE" and body["raw"]["code"] == code
    assert client.get("/api/vouchers/NOPE", headers=auth).status_code == 404


def test_api_lists_vouchers_by_status_and_batch_with_pagination(ops_app, ops_db, fake_rm, rm_signer) -> None:  # noqa: ANN001
    client = ops_app.test_client()
    for i in range(7):
        item = fake_rm.add_voucher(f"L{i}", status="ISSUE" if i % 2 else "VALID", batch_key="b-x" if i < 5 else "b-y")
        _post(client, rm_signer, item)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    page1 = client.get("/api/vouchers?batch=b-x&limit=2", headers=auth).get_json()
    page2 = client.get(f"/api/vouchers?batch=b-x&limit=2&cursor={page1['next_cursor']}", headers=auth).get_json()
    page3 = client.get(f"/api/vouchers?batch=b-x&limit=2&cursor={page2['next_cursor']}", headers=auth).get_json()
    assert [v["code"] for p in (page1, page2, page3) for v in p["items"]] == ["L0", "L1", "L2", "L3", "L4"]
    assert page3["next_cursor"] is None
    issued = client.get("/api/vouchers?status=issue", headers=auth).get_json()
    assert [v["code"] for v in issued["items"]] == ["L1", "L3", "L5"]
    assert client.get("/api/vouchers?limit=x", headers=auth).status_code == 400


def test_api_reconcile_one_code(ops_app, ops_db, fake_rm, rm_signer) -> None:  # noqa: ANN001
    client = ops_app.test_client()
    _post(client, rm_signer, fake_rm.add_voucher("RC1", status="ISSUE"))
    fake_rm.set_status("RC1", "VOID")  # the callback for this change is lost
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = client.post("/api/vouchers/RC1/reconcile", headers=auth)
    assert response.status_code == 200
    body = response.get_json()
    assert (body["checked"], body["changed"], body["failed"]) == (1, 1, 0)
    assert body["voucher"]["voucher"]["status"] == "VOID"
    assert body["voucher"]["history"][-1]["source"] == "reconcile"
    assert client.post("/api/vouchers/RC1/reconcile").status_code == 401


def test_api_is_off_without_a_token_and_documents_itself(settings_env) -> None:  # noqa: ANN001
    app = create_app(load_settings(settings_env))
    try:
        client = app.test_client()
        off = client.get("/api/vouchers", headers={"Authorization": "Bearer anything"})
        assert off.status_code == 404 and off.get_json()["error"] == "ops_api_disabled"
        spec = client.get("/api/openapi.json").get_json()
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    served = {
        (rule.rule.replace("<path:code>", "{code}").replace("<path:batch_key>", "{batch_key}"), method)
        for rule in app.url_map.iter_rules() if rule.rule.startswith("/api/")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert documented == served


def _fail_then_fix(ops_app, ops_db, rm_signer, codes: list[str]) -> list[int]:  # noqa: ANN001
    """Deliveries that fail on our side (a real database trigger refusing them), then the cause is removed."""
    from tests.test_webhook import _install_failing_trigger

    dialect = ops_app.extensions["rm_voucher_sync"].engine.dialect.name
    _install_failing_trigger(ops_db, dialect)
    client = ops_app.test_client()
    from tests.support import voucher_item

    for code in codes:
        body = json.dumps({"item": voucher_item(code, "ISSUE"), "code": "SUCCESS"}).encode()
        assert client.post(CALLBACK_PATH, data=body, headers=rm_signer.headers(body)).status_code == 500
    with ops_db.begin() as s:
        s.execute(text("DROP TRIGGER fail_boom" + (" ON voucher_events" if dialect == "postgresql" else "")))
        return list(s.scalars(select(WebhookDelivery.id).where(WebhookDelivery.outcome == "error")))


def test_replay_failed_applies_exactly_once_even_when_run_twice(ops_app, ops_db, rm_signer) -> None:  # noqa: ANN001
    failed = _fail_then_fix(ops_app, ops_db, rm_signer, ["BOOM1"])
    assert len(failed) == 1
    runner = ops_app.test_cli_runner()
    listed = runner.invoke(args=["deliveries", "list", "--outcome", "error"])
    assert f"{failed[0]:>8}" in listed.output and "boom" in listed.output
    first = runner.invoke(args=["deliveries", "replay", "--failed"])
    assert first.exit_code == 0 and "replayed 1 of 1" in first.output
    second = runner.invoke(args=["deliveries", "replay", "--failed"])
    assert second.exit_code == 0 and "replayed 0 of 0" in second.output
    again_by_id = runner.invoke(args=["deliveries", "replay", "--id", str(failed[0])])
    assert "replayed 0 of 1" in again_by_id.output
    with ops_db() as s:
        events = s.scalars(select(VoucherEvent).where(VoucherEvent.voucher_code == "BOOM1")).all()
        delivery = s.get(WebhookDelivery, failed[0])
    assert [(e.outcome, e.delivery_id) for e in events] == [("applied", failed[0])]
    assert delivery.outcome == "accepted" and delivery.replayed_at is not None


def test_replay_refuses_unverified_and_unknown_deliveries(ops_app, ops_db) -> None:  # noqa: ANN001
    client = ops_app.test_client()
    body = b'{"item": {"code": "FORGED", "status": "VOID"}, "code": "SUCCESS"}'
    assert client.post(CALLBACK_PATH, data=body, headers={"Content-Type": "application/json"}).status_code == 401
    with ops_db() as s:
        forged = s.scalar(select(WebhookDelivery.id).where(WebhookDelivery.voucher_code == "FORGED"))
    result = ops_app.test_cli_runner().invoke(args=["deliveries", "replay", "--id", str(forged), "--id", "999999"])
    assert result.exit_code == 1
    assert "replayed 0 of 2" in result.output
    assert "signature was never verified" in result.output and "no delivery with id 999999" in result.output
    with ops_db() as s:
        assert s.scalar(select(func.count()).select_from(Voucher)) == 0


def test_deliveries_list_filters_and_rejects_bad_options(ops_app, rm_signer) -> None:  # noqa: ANN001
    client = ops_app.test_client()
    from tests.support import callback_body, voucher_item

    good = callback_body(voucher_item("DL1", "ISSUE"))
    client.post(CALLBACK_PATH, data=good, headers=rm_signer.headers(good))
    client.post(CALLBACK_PATH, data=good, headers={"Content-Type": "application/json"})
    runner = ops_app.test_cli_runner()
    rejected = runner.invoke(args=["deliveries", "list", "--outcome", "rejected_signature", "--since", "1h"])
    assert "rejected_signature" in rejected.output and "accepted" not in rejected.output and "(1 shown)" in rejected.output
    everything = runner.invoke(args=["deliveries", "list"])
    assert "(2 shown)" in everything.output
    assert runner.invoke(args=["deliveries", "list", "--outcome", "nope"]).exit_code != 0
    assert runner.invoke(args=["deliveries", "list", "--since", "yesterday-ish"]).exit_code != 0


def test_retention_drops_old_bodies_but_keeps_rows_and_history(ops_app, ops_db, rm_signer) -> None:  # noqa: ANN001
    from receiver.ops import purge_delivery_bodies
    from tests.support import callback_body, voucher_item

    client = ops_app.test_client()
    for i in range(7):
        body = callback_body(voucher_item(f"RET{i}", "ISSUE"))
        client.post(CALLBACK_PATH, data=body, headers=rm_signer.headers(body))
    with ops_db.begin() as s:
        old_ids = list(s.scalars(select(WebhookDelivery.id).order_by(WebhookDelivery.id).limit(5)))
        s.execute(
            WebhookDelivery.__table__.update()
            .where(WebhookDelivery.id.in_(old_ids))
            .values(received_at=utcnow() - timedelta(days=120))
        )
    batches = []
    assert purge_delivery_bodies(ops_db, older_than_days=90, batch_size=2, on_batch=batches.append) == 5
    assert batches == [2, 2, 1]
    with ops_db() as s:
        rows = {d.id: d for d in s.scalars(select(WebhookDelivery))}
        assert s.scalar(select(func.count()).select_from(VoucherEvent)) == 7
    assert all(rows[i].body is None and rows[i].headers is None and rows[i].purged_at for i in old_ids)
    assert all(rows[i].body and rows[i].body_sha256 for i in rows if i not in old_ids)
    result = ops_app.test_cli_runner().invoke(args=["deliveries", "purge"])
    assert "purged bodies of 0 deliveries older than 90 days" in result.output


def test_the_purge_empties_a_batch_in_transactions_that_end_once_they_have_held_the_writer_turn_for_the_budget(
    ops_db, monkeypatch,  # noqa: ANN001
) -> None:
    """Every callback waits while a purge transaction holds SQLite's writer turn, so a batch is split by time.

    With the budget at zero each transaction runs one statement (PURGE_STATEMENT_ROWS rows, never
    none); with time to spare a batch is one transaction. Either way every old row is emptied and
    counted once, and the batches report what they emptied.
    """
    from sqlalchemy import insert

    from receiver import ops
    from tests.support import counting_commits

    engine = ops_db.kw["bind"]
    old = utcnow() - timedelta(days=120)
    with ops_db.begin() as s:
        s.execute(insert(WebhookDelivery), [
            {"received_at": old, "last_received_at": old, "body_sha256": f"{i:064x}", "outcome": "accepted",
             "http_status": 200, "body": "{}", "headers": "{}"}
            for i in range(2 * ops.PURGE_STATEMENT_ROWS + 5)
        ])

    def purge(budget: float, batch_size: int) -> tuple[int, int, list[int]]:
        monkeypatch.setattr(ops, "TURN_BUDGET_SECONDS", budget)
        batches: list[int] = []
        with counting_commits(engine) as commits:
            purged = ops.purge_delivery_bodies(ops_db, older_than_days=90, batch_size=batch_size, on_batch=batches.append)
        return purged, len(commits), batches

    rows = 2 * ops.PURGE_STATEMENT_ROWS + 5
    assert purge(0.0, 500) == (rows, 3, [rows])
    with ops_db() as s:
        assert s.scalar(select(func.count()).select_from(WebhookDelivery).where(
            WebhookDelivery.purged_at.is_not(None), WebhookDelivery.body.is_(None), WebhookDelivery.headers.is_(None)
        )) == rows
    assert purge(0.0, 500) == (0, 0, [])

    with ops_db.begin() as s:
        s.execute(WebhookDelivery.__table__.update().values(purged_at=None, body="{}", headers="{}"))
    assert purge(60.0, 60) == (rows, 2, [60, rows - 60])


def _metric(text_: str, name: str, labels: str = "") -> float:
    for line in text_.splitlines():
        if line.startswith(f"{name}{{{labels}}} " if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_with_accepted_duplicate_and_rejected_callbacks(settings_env, rm_signer) -> None:  # noqa: ANN001
    """Through gunicorn with several workers: the page adds every worker's counts up."""
    import requests

    from tests.support import callback_body, gunicorn_server, voucher_item

    with gunicorn_server(settings_env, workers=3) as base:
        before = requests.get(base + "/metrics", timeout=10).text
        body = callback_body(voucher_item("MET1", "ISSUE"))
        for _ in range(3):  # one accepted, two duplicates
            requests.post(base + CALLBACK_PATH, data=body, headers=rm_signer.headers(body), timeout=10)
        for _ in range(4):
            requests.post(base + CALLBACK_PATH, data=body, headers={"Content-Type": "application/json"}, timeout=10)
        requests.post(base + CALLBACK_PATH, data=b"nope", headers={"Content-Type": "application/json"}, timeout=10)
        after = requests.get(base + "/metrics", timeout=10)
    assert after.headers["Content-Type"].startswith("text/plain")
    page = after.text

    def delta(name: str, labels: str = "") -> float:
        return _metric(page, name, labels) - _metric(before, name, labels)

    assert delta("rmvs_callbacks_total", 'outcome="accepted"') == 1
    assert delta("rmvs_callbacks_total", 'outcome="duplicate"') == 2
    assert delta("rmvs_callbacks_total", 'outcome="rejected_signature"') == 4
    assert delta("rmvs_callbacks_total", 'outcome="rejected_malformed"') == 1
    assert delta("rmvs_apply_outcomes_total", 'outcome="applied",source="callback"') == 1
    count = 'endpoint="/webhooks/revenuemonster/voucher",method="POST"'
    assert delta("rmvs_http_request_duration_seconds_count", count) == 8
    assert _metric(page, "rmvs_database_up") == 1
    assert "rmvs_oldest_unconfirmed_voucher_age_seconds" in page


def test_metrics_show_reconciliation_and_rm_calls(ops_app, fake_rm, rm_signer) -> None:  # noqa: ANN001
    client = ops_app.test_client()
    _post(client, rm_signer, fake_rm.add_voucher("MR1", status="ISSUE"))
    fake_rm.set_status("MR1", "VOID")
    client.post("/api/vouchers/MR1/reconcile", headers={"Authorization": f"Bearer {TOKEN}"})
    page = client.get("/metrics").get_data(as_text=True)
    assert _metric(page, "rmvs_reconcile_runs_total") >= 1
    assert _metric(page, "rmvs_reconcile_vouchers_total", 'result="changed"') >= 1
    assert _metric(page, "rmvs_rm_api_calls_total", 'endpoint="get_voucher",result="200"') >= 1
    assert _metric(page, "rmvs_apply_outcomes_total", 'outcome="applied",source="reconcile"') >= 1
    assert _metric(page, "rmvs_reconcile_last_duration_seconds") > 0

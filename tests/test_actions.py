"""Merchant actions through RM (redeem, void, issue, chop stamps): recorded at once, never done twice."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import func, select

from receiver import create_app
from receiver.config import load_settings
from receiver.models import Action, StampCard, StampEvent, Voucher, VoucherEvent
from tests.conftest import rm_client_env
from tests.support import CALLBACK_PATH

TOKEN = "ops-token-actions-1"
UUIDS = [f"d439a47d-3cd3-48bc-aae7-1effda5c7e{i:02x}" for i in range(8)]
CARD = "EhQKCE1lcmNoYW50EJXVzd3wraqTORIgChRMb3lhbHR5Q2hvcFN0YW1wQ2FyZBCm1qHe2eDX_BU"


@pytest.fixture
def app_rm(settings_env, fake_rm, vectors):  # noqa: ANN001, ANN201
    env = {**settings_env, **rm_client_env(fake_rm, vectors), "OPS_API_TOKEN": TOKEN, "RM_TIMEOUT_SECONDS": "0.6"}
    application = create_app(load_settings(env))
    yield application
    application.extensions["rm_voucher_sync"].engine.dispose()


@pytest.fixture
def sessions(app_rm):  # noqa: ANN001, ANN201
    return app_rm.extensions["rm_voucher_sync"].sessions


def _cli(app, *args: str):  # noqa: ANN001, ANN202
    return app.test_cli_runner().invoke(args=list(args))


def _events(sessions, code: str) -> list[tuple[str, str, str]]:  # noqa: ANN001
    with sessions() as s:
        rows = s.scalars(select(VoucherEvent).where(VoucherEvent.voucher_code == code).order_by(VoucherEvent.id))
        return [(e.source, e.outcome, e.to_status) for e in rows]


def _actions(sessions) -> list[Action]:  # noqa: ANN001
    with sessions() as s:
        return list(s.scalars(select(Action).order_by(Action.id)))


def _deliver_rm_callbacks(app, fake, signer) -> list[dict]:  # noqa: ANN001
    """RM's own callbacks for the changes made through the API (same snapshot as RM's answer)."""
    client = app.test_client()
    answers = []
    for item in fake.outbox:
        body = json.dumps({"item": item, "code": "SUCCESS"}).encode()
        answers.append(client.post(CALLBACK_PATH, data=body, headers=signer.headers(body)).get_json())
    fake.outbox.clear()
    return answers


def test_redeem_through_the_cli_is_recorded_at_once_and_the_callback_is_a_duplicate(app_rm, sessions, fake_rm, rm_signer) -> None:  # noqa: ANN001
    fake_rm.add_voucher("rms@xR43u4bRhUU", status="ISSUE")
    result = _cli(app_rm, "voucher", "redeem", "rms@xR43u4bRhUU", "--country-code", "60", "--phone", "187824152",
                  "--actor", "cashier-7")
    assert result.exit_code == 0, result.output
    assert "redeem succeeded" in result.output and "voucher rms@xR43u4bRhUU: REDEEMED" in result.output
    assert _events(sessions, "rms@xR43u4bRhUU") == [("redeem", "applied", "REDEEMED")]
    (action,) = _actions(sessions)
    assert (action.kind, action.status, action.actor, action.attempts) == ("redeem", "succeeded", "cashier-7", 1)
    assert json.loads(action.params) == {"countryCode": "60", "phoneNumber": "187824152"}
    with sessions() as s:
        v = s.scalars(select(Voucher).where(Voucher.code == "rms@xR43u4bRhUU")).one()
        event = s.get(VoucherEvent, action.event_id)
    assert v.status == "REDEEMED" and v.last_source == "redeem" and event.voucher_code == "rms@xR43u4bRhUU"
    assert _deliver_rm_callbacks(app_rm, fake_rm, rm_signer) == [{"status": "duplicate"}]
    assert len(_events(sessions, "rms@xR43u4bRhUU")) == 1


def test_void_through_the_api(app_rm, sessions, fake_rm, rm_signer) -> None:  # noqa: ANN001
    fake_rm.add_voucher("V-API", status="REDEEMED")
    client = app_rm.test_client()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/api/vouchers/V-API/void", json={}).status_code == 401
    response = client.post("/api/vouchers/V-API/void", json={"usedAt": "2026-11-21T10:00:00Z"}, headers=auth)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["status"] == "succeeded" and body["item"]["status"] == "VOID" and body["event_id"]
    assert body["item"]["usedAt"] == "2026-11-21T10:00:00Z"
    assert _events(sessions, "V-API") == [("void", "applied", "VOID")]
    assert _deliver_rm_callbacks(app_rm, fake_rm, rm_signer) == [{"status": "duplicate"}]


def test_lost_redeem_response_is_checked_not_resent(app_rm, sessions, fake_rm) -> None:  # noqa: ANN001
    fake_rm.add_voucher("LOST1", status="ISSUE")
    fake_rm.faults.drop_after_apply = 1
    fake_rm.faults.timeout_sleep = 1.5  # longer than the client's 0.6 s read timeout
    result = _cli(app_rm, "voucher", "redeem", "LOST1", "--country-code", "60", "--phone", "187824152")
    assert result.exit_code == 0, result.output
    assert "not sent again" in result.output
    assert len(fake_rm.requests_for("redeem")) == 1, "a lost answer must not cause a second redeem"
    assert [r.status for r in fake_rm.requests_for("get_voucher")] == [200]
    assert _events(sessions, "LOST1") == [("redeem", "applied", "REDEEMED")]
    (action,) = _actions(sessions)
    assert action.status == "succeeded" and "lost" in action.decision


def test_failed_redeem_that_rm_shows_undone_is_sent_once_more(app_rm, sessions, fake_rm) -> None:  # noqa: ANN001
    fake_rm.add_voucher("RETRY1", status="ISSUE")
    fake_rm.faults.fail_next = 1  # RM answers 503 before doing anything
    result = _cli(app_rm, "voucher", "redeem", "RETRY1", "--country-code", "60", "--phone", "187824152")
    assert result.exit_code == 0, result.output
    assert [r.status for r in fake_rm.requests_for("redeem")] == [503, 200]
    (action,) = _actions(sessions)
    assert action.attempts == 2 and "sent once more" in action.decision
    assert _events(sessions, "RETRY1") == [("redeem", "applied", "REDEEMED")]


def test_issue_whose_answer_is_lost_is_left_ambiguous(app_rm, sessions, fake_rm) -> None:  # noqa: ANN001
    fake_rm.add_voucher("ISS1", batch_key="batch-i", status="VALID")
    fake_rm.faults.drop_after_apply = 1
    fake_rm.faults.timeout_sleep = 1.5
    result = _cli(app_rm, "voucher", "issue", "batch-i")
    assert result.exit_code == 1
    assert "ambiguous" in result.output and "reconcile --code" in result.output
    assert len(fake_rm.requests_for("issue")) == 1
    assert _actions(sessions)[0].status == "ambiguous"


def test_issue_records_the_issued_voucher(app_rm, sessions, fake_rm) -> None:  # noqa: ANN001
    fake_rm.add_voucher("ISS2", batch_key="batch-j", status="VALID")
    result = _cli(app_rm, "voucher", "issue", "batch-j")
    assert result.exit_code == 0, result.output
    assert _events(sessions, "ISS2") == [("issue", "applied", "ISSUE")]
    empty = _cli(app_rm, "voucher", "issue", "batch-j")
    assert empty.exit_code == 1 and "VOUCHER_BATCH_EMPTY" in empty.output


@pytest.mark.parametrize(
    "setup, args, code",
    [
        (lambda f: None, ["voucher", "redeem", "NOPE", "--country-code", "60", "--phone", "187824152"],
         "VOUCHER_NOT_FOUND"),
        (lambda f: f.add_voucher("USED", status="VOID"), ["voucher", "void", "USED"], "VOUCHER_ALREADY_USED"),
        (lambda f: f.add_voucher("REDEEMED1", status="REDEEMED"),
         ["voucher", "redeem", "REDEEMED1", "--country-code", "60", "--phone", "187824152"], "VOUCHER_ALREADY_REDEEMED"),
    ],
)
def test_rm_errors_leave_the_ledger_unchanged_and_are_shown(app_rm, sessions, fake_rm, setup, args, code) -> None:  # noqa: ANN001
    setup(fake_rm)
    result = _cli(app_rm, *args)
    assert result.exit_code == 1
    assert f"RM said {code}" in result.output
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(VoucherEvent)) == 0
        assert s.scalar(select(func.count()).select_from(Voucher)) == 0
    (action,) = _actions(sessions)
    assert (action.status, action.rm_error_code) == ("failed", code)


def test_bad_signature_from_rm_is_shown_and_nothing_changes(settings_env, fake_rm, vectors) -> None:  # noqa: ANN001
    fake_rm.add_voucher("SIGV", status="ISSUE")
    env = {**settings_env, **rm_client_env(fake_rm, vectors), "RM_PRIVATE_KEY": vectors["rm_server_private_pem"]}
    app = create_app(load_settings(env))
    try:
        result = _cli(app, "voucher", "void", "SIGV")
        sessions = app.extensions["rm_voucher_sync"].sessions
        assert result.exit_code == 1 and "RM said INVALID_REQUEST_SIGNATURE" in result.output
        assert fake_rm.vouchers["SIGV"]["status"] == "ISSUE"
        with sessions() as s:
            assert s.scalar(select(func.count()).select_from(VoucherEvent)) == 0
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()


def test_request_id_is_never_executed_twice(app_rm, sessions, fake_rm) -> None:  # noqa: ANN001
    fake_rm.add_voucher("ONCE", status="ISSUE")
    args = ["voucher", "void", "ONCE", "--request-id", "till-42-txn-9"]
    first, second = _cli(app_rm, *args), _cli(app_rm, *args)
    assert first.exit_code == 0 and second.exit_code == 0
    assert "already done earlier under this request id" in second.output
    assert len(fake_rm.requests_for("void")) == 1 and len(_actions(sessions)) == 1
    api = app_rm.test_client().post("/api/vouchers/ONCE/void", headers={"Authorization": f"Bearer {TOKEN}",
                                                                        "Idempotency-Key": "till-42-txn-9"})
    assert api.status_code == 200 and api.get_json()["replayed"] is True
    other = _cli(app_rm, "voucher", "void", "OTHER", "--request-id", "till-42-txn-9")
    assert other.exit_code != 0 and "already used for void ONCE" in other.output
    assert len(fake_rm.requests_for("void")) == 1


def test_inputs_are_validated_before_calling_rm(app_rm, fake_rm) -> None:  # noqa: ANN001
    for args in (
        ["voucher", "redeem", "X", "--country-code", "+60", "--phone", "187824152"],
        ["voucher", "redeem", "X", "--country-code", "60", "--phone", "18-782"],
        ["voucher", "redeem", "X", "--country-code", "60", "--phone", "1234"],
        ["stamp", "give", "not-a-card-code"],
        ["voucher", "void", "X", "--used-at", "yesterday"],
    ):
        result = _cli(app_rm, *args)
        assert result.exit_code != 0, args
    assert fake_rm.log == []
    client = app_rm.test_client()
    bad = client.post("/api/vouchers/X/redeem", json={"countryCode": "60"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad.status_code == 400 and bad.get_json()["error"] == "invalid_input"


def test_chop_stamps_accumulate_and_completion_is_recorded_once(app_rm, sessions, fake_rm) -> None:  # noqa: ANN001
    fake_rm.stamps_per_card = 3
    outputs = [_cli(app_rm, "stamp", "give", f"{CARD}:{UUIDS[i]}").output for i in range(3)]
    assert "card " + CARD + ": 3 stamps, completed" in outputs[2]
    again = _cli(app_rm, "stamp", "give", f"{CARD}:{UUIDS[0]}")
    assert again.exit_code == 1 and "STAMP_ALREADY_CHOPPED" in again.output
    full = app_rm.test_client().post("/api/stamps", json={"code": f"{CARD}:{UUIDS[3]}"},
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    assert full.status_code == 422 and full.get_json()["rm_error_code"] == "CARD_COMPLETED"
    with sessions() as s:
        card = s.scalars(select(StampCard)).one()
        events = s.scalars(select(StampEvent).order_by(StampEvent.id)).all()
    assert (card.key, card.no_of_chopped_stamp, card.is_completed) == (CARD, 3, True)
    assert card.completed_at is not None and card.rm_id
    assert [(e.no_of_chopped_stamp, e.is_completed, e.completed_now) for e in events] == [
        (1, False, False), (2, False, False), (3, True, True)
    ]


def test_lost_chop_stamp_answer_is_resolved_by_rescanning(app_rm, sessions, fake_rm) -> None:  # noqa: ANN001
    fake_rm.faults.drop_after_apply = 1
    fake_rm.faults.timeout_sleep = 1.5
    result = _cli(app_rm, "stamp", "give", f"{CARD}:{UUIDS[5]}")
    assert result.exit_code == 0, result.output
    deadline = time.monotonic() + 5
    while fake_rm.requests_for("chop_stamp")[0].status == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # the first answer is still being delayed by the fake
    assert [r.status for r in fake_rm.requests_for("chop_stamp")] == [200, 400]  # the re-scan is refused: it counted
    assert fake_rm.cards[CARD]["noOfChoppedStamp"] == 1
    with sessions() as s:
        (event,) = s.scalars(select(StampEvent)).all()
    assert event.no_of_chopped_stamp is None  # RM's count for that scan was never heard; the scan is recorded

"""Stamps.co.id redemptions: every operation recorded at once, never twice, errors told plainly, PIN attempts shown."""

from __future__ import annotations

import json
import logging
import time

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from receiver import create_app
from receiver.client import HTTPResult
from receiver.config import ConfigError, load_settings
from receiver.fake_stamps import FakeStamps
from receiver.logs import RedactFilter
from receiver.models import StampsOperation, StampsRedemption, StampsRedemptionEvent
from receiver.stamps_client import (
    StampsAmbiguous,
    StampsAuthError,
    StampsBadRequest,
    StampsClient,
    StampsInvalidPin,
    StampsNotFound,
    StampsUnavailable,
    error_from_response,
)
from tests.support import free_port

OPS_TOKEN = "ops-token-stamps-1"
STAMPS_TOKEN = "stamps-secret-token-9f8e7d6c"
ALICE = "alice@example.com"
AUTH = {"Authorization": f"Bearer {OPS_TOKEN}"}


def _stamps_env(fake: FakeStamps, **extra: str) -> dict[str, str]:
    env = {"STAMPS_API_BASE_URL": fake.base_url, "STAMPS_TOKEN_TYPE": "Token", "STAMPS_TOKEN": STAMPS_TOKEN,
           "STAMPS_TIMEOUT_SECONDS": "0.6", "STAMPS_MAX_RETRIES": "1"}
    env.update(extra)
    return env


@pytest.fixture
def fake_stamps():  # noqa: ANN201
    """A fake Stamps on a real port: stores 32 and 45, Alice (100 stamps, PIN 123456), rewards, vouchers, a promo."""
    fake = FakeStamps(token=STAMPS_TOKEN, seed=7)
    fake.add_store(32)
    fake.add_store(45)
    alice = fake.add_member(ALICE, stamps=100, pin="123456", member_id="M-ALICE")
    fake.add_reward(1, "Kaya Bun", stamps_to_redeem=2, code="MI0017")
    fake.add_reward(2, "Free Coffee", stamps_to_redeem=10, code="MI0020", voucher=True)
    fake.add_reward(3, "Flexible Discount", stamps_to_redeem=0, code="FLEX", flexible=True)
    fake.add_reward(4, "Big Prize", stamps_to_redeem=1000, code="BIG")
    fake.add_voucher(alice, "Discount Rp 100,000", code="PZ633ECV", template=12)
    fake.add_voucher(alice, "Gift card", code="GIFT0001", value=100000)
    fake.add_voucher(alice, "Free tea", code="TEA00001", template=12)
    fake.add_promo_code("PROMOCODE", "Discount 10%")
    fake.serve()
    yield fake
    fake.shutdown()


@pytest.fixture
def app_stamps(settings_env, fake_stamps):  # noqa: ANN001, ANN201
    application = create_app(load_settings({**settings_env, **_stamps_env(fake_stamps), "OPS_API_TOKEN": OPS_TOKEN}))
    yield application
    application.extensions["rm_voucher_sync"].engine.dispose()


@pytest.fixture
def sessions(app_stamps):  # noqa: ANN001, ANN201
    return app_stamps.extensions["rm_voucher_sync"].sessions


def _cli(app, *args: str, input: str | None = None):  # noqa: ANN001, ANN202, A002
    return app.test_cli_runner().invoke(args=list(args), input=input)


def _voucher(fake: FakeStamps, code: str) -> int:
    return next(v["id"] for v in fake.vouchers.values() if v["code"] == code)


def _rows(sessions) -> list[StampsRedemption]:  # noqa: ANN001
    with sessions() as s:
        return list(s.scalars(select(StampsRedemption).order_by(StampsRedemption.id)))


def _ops(sessions) -> list[StampsOperation]:  # noqa: ANN001
    with sessions() as s:
        return list(s.scalars(select(StampsOperation).order_by(StampsOperation.id)))


def _events(sessions) -> list[tuple[int, str | None, str, int | None]]:  # noqa: ANN001
    with sessions() as s:
        rows = s.execute(
            select(StampsRedemption.stamps_id, StampsRedemptionEvent.from_status, StampsRedemptionEvent.to_status,
                   StampsRedemptionEvent.membership_stamps)
            .join(StampsRedemption, StampsRedemption.id == StampsRedemptionEvent.redemption_id)
            .order_by(StampsRedemptionEvent.id)
        )
        return [tuple(r) for r in rows]


def _answered(fake: FakeStamps, endpoint: str) -> list[int]:
    """Statuses of the fake's answers, once every delayed answer has gone out."""
    deadline = time.monotonic() + 5
    while any(r.status == 0 for r in fake.requests_for(endpoint)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [r.status for r in fake.requests_for(endpoint)]


def _alice(fake: FakeStamps) -> int:
    return fake.member(ALICE).stamps


# -- every operation records the right rows -------------------------------------------------------


def test_every_redemption_kind_records_its_row_and_event(app_stamps, sessions, fake_stamps) -> None:  # noqa: ANN001
    fake = fake_stamps
    reward = _cli(app_stamps, "stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "1",
                  "--qty", "2", "--invoice", "POS-1", "--channel", "3", "--extra-data", '{"discount": "10%"}',
                  "--actor", "cashier-7")
    assert reward.exit_code == 0, reward.output
    assert "redeem_reward succeeded" in reward.output and "4 stamps used, member has 96 stamps" in reward.output
    flexible = _cli(app_stamps, "stamps", "redeem-reward", "--user", "M-ALICE", "--store", "32", "--reward", "3",
                    "--stamps", "6")
    voucher = _cli(app_stamps, "stamps", "redeem-voucher", "--user", ALICE, "--store", "45", "--voucher",
                   str(_voucher(fake, "PZ633ECV")), "--invoice", "POS-2")
    deduct = _cli(app_stamps, "stamps", "deduct", "--user", ALICE, "--store", "32", "--voucher",
                  str(_voucher(fake, "GIFT0001")), "--value", "2500", "--invoice", "POS-3")
    by_code = _cli(app_stamps, "stamps", "by-code", "--user", ALICE, "--store", "32", "--voucher-code", "TEA00001",
                   "--voucher-template", "12")
    promo = _cli(app_stamps, "stamps", "promo", "--user", ALICE, "--store", "45", "--promo-code", "PROMOCODE",
                 "--invoice", "POS-4")
    for result in (flexible, voucher, deduct, by_code, promo):
        assert result.exit_code == 0, result.output
    many = app_stamps.test_client().post("/api/stamps/redemptions/many", headers=AUTH, json={
        "user": ALICE, "store": 32, "invoice_number": "POS-5",
        "rewards": [{"code": 1, "qty": 1}, {"code": "MI0020", "qty": 1}, {"code": "FLEX", "stamps": 3}],
    })
    assert many.status_code == 200, many.get_json()
    assert [r["reward_code"] for r in many.get_json()["redemptions"]] == ["1", "MI0020", "FLEX"]

    rows = _rows(sessions)
    assert [(r.kind, r.store, r.invoice_number, r.stamps_used, r.status) for r in rows] == [
        ("redeem_reward", 32, "POS-1", 4, "Created"),
        ("redeem_reward", 32, None, 6, "Created"),
        ("redeem_voucher", 45, "POS-2", 0, "Created"),
        ("deduct_value", 32, "POS-3", 0, "Created"),
        ("by_voucher_code", 32, None, None, "Created"),
        ("promo_code", 45, "POS-4", 0, "Created"),
        ("redeem_many", 32, "POS-5", 2, "Created"),
        ("redeem_many", 32, "POS-5", 10, "Created"),
        ("redeem_many", 32, "POS-5", 3, "Created"),
    ]
    assert [r.stamps_id for r in rows] == sorted(fake.redemptions)
    first = rows[0]
    assert (first.reward_id, first.reward_code, first.reward_name, first.qty, first.channel) == (
        1, "MI0017", "Kaya Bun", 2, 3)
    assert first.membership_stamps_after == 96 and first.user_identifier == ALICE
    assert json.loads(first.raw_request)["extra_data"] == {"discount": "10%"}
    assert json.loads(first.raw_response)["redemption"]["id"] == first.stamps_id
    assert (rows[2].voucher_id, rows[2].voucher_code) == (_voucher(fake, "PZ633ECV"), "PZ633ECV")
    assert (rows[3].value_deducted, rows[3].voucher_code) == (2500, "GIFT0001")
    assert (rows[4].voucher_code, rows[4].voucher_template, rows[4].membership_stamps_after) == ("TEA00001", 12, 90)
    assert rows[5].promo_code == "PROMOCODE"
    assert rows[-1].membership_stamps_after == _alice(fake) == 100 - 4 - 6 - 2 - 10 - 3
    assert fake.vouchers[_voucher(fake, "GIFT0001")]["value"] == 97500
    # One Created event per redemption, carrying the member's stamps after it.
    assert _events(sessions) == [(r.stamps_id, None, "Created", r.membership_stamps_after) for r in rows]
    ops = _ops(sessions)
    assert [(o.kind, o.status, o.attempts, o.http_status) for o in ops] == [
        (k, "succeeded", 1, 200) for k in ("redeem_reward", "redeem_reward", "redeem_voucher", "deduct_value",
                                           "by_voucher_code", "promo_code", "redeem_many")
    ]
    assert ops[0].actor == "cashier-7" and ops[-1].actor == "ops-api"
    assert all(r.operation_id == ops[-1].id for r in rows[-3:])
    # by-voucher-code names the member both ways the seed shows; nothing is sent as null.
    assert fake.received["by_voucher_code"] == [
        {"identifier": ALICE, "user": ALICE, "voucher_code": "TEA00001", "voucher_template": 12, "store": 32}
    ]
    assert fake.received["redeem_reward"][0] == {
        "user": ALICE, "reward": 1, "store": 32, "invoice_number": "POS-1", "channel": 3, "qty": 2,
        "extra_data": {"discount": "10%"},
    }


def test_cancel_flips_the_status_once(app_stamps, sessions, fake_stamps) -> None:  # noqa: ANN001
    client = app_stamps.test_client()
    redeemed = client.post("/api/stamps/redemptions/reward", headers=AUTH,
                           json={"user": ALICE, "store": 32, "reward": 2, "invoice_number": "POS-10"})
    assert redeemed.status_code == 200
    stamps_id = redeemed.get_json()["redemptions"][0]["stamps_id"]
    assert _alice(fake_stamps) == 90
    assert client.post("/api/stamps/redemptions/cancel", json={"id": stamps_id}).status_code == 401
    canceled = client.post("/api/stamps/redemptions/cancel", headers={**AUTH, "Idempotency-Key": "void-10"},
                           json={"id": stamps_id, "create_replacement_voucher": True})
    assert canceled.status_code == 200, canceled.get_json()
    body = canceled.get_json()
    assert body["status"] == "succeeded" and body["redemptions"][0]["status"] == "Canceled"
    assert body["response"]["customer"]["stamps_remaining"] == 100 == _alice(fake_stamps)
    assert fake_stamps.redemptions[stamps_id].replacement_voucher_id is None  # a reward, not a voucher redemption
    assert json.loads(_ops(sessions)[-1].params) == {"id": stamps_id, "create_replacement_voucher": True}

    again = _cli(app_stamps, "stamps", "cancel", str(stamps_id))
    assert again.exit_code == 1 and f"redemption {stamps_id} was already canceled" in again.output
    replay = client.post("/api/stamps/redemptions/cancel", headers={**AUTH, "Idempotency-Key": "void-10"},
                         json={"id": stamps_id, "create_replacement_voucher": True})
    assert replay.status_code == 200 and replay.get_json()["replayed"] is True
    assert len(fake_stamps.requests_for("cancel")) == 1
    (row,) = _rows(sessions)
    assert row.status == "Canceled" and row.canceled_at is not None
    assert _events(sessions) == [(stamps_id, None, "Created", 90), (stamps_id, "Created", "Canceled", 100)]
    # The history is evidence: the database refuses to rewrite it.
    with pytest.raises(DBAPIError, match="append-only"):
        with sessions.begin() as s:
            s.execute(text("UPDATE stamps_redemption_events SET to_status = 'Created'"))


def test_a_voucher_redemption_canceled_with_a_replacement_voucher(app_stamps, sessions, fake_stamps) -> None:  # noqa: ANN001
    voucher_id = _voucher(fake_stamps, "PZ633ECV")
    done = _cli(app_stamps, "stamps", "redeem-voucher", "--user", ALICE, "--store", "32", "--voucher", str(voucher_id))
    assert done.exit_code == 0, done.output
    (row,) = _rows(sessions)
    result = _cli(app_stamps, "stamps", "cancel", str(row.stamps_id), "--replacement-voucher")
    assert result.exit_code == 0, result.output
    assert "Canceled" in result.output and "has 100 stamps after the cancel" in result.output
    assert fake_stamps.redemptions[row.stamps_id].replacement_voucher_id is not None
    assert _rows(sessions)[0].status == "Canceled"


# -- errors: reported clearly, ledger consistent --------------------------------------------------


def test_a_400_with_field_errors_is_shown_and_frees_the_invoice(app_stamps, sessions, fake_stamps) -> None:  # noqa: ANN001
    result = _cli(app_stamps, "stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "4",
                  "--invoice", "POS-20", "--request-id", "till-20")
    assert result.exit_code == 1
    assert "Stamps said HTTP 400 insufficient_stamps" in result.output
    assert "  stamps: Insufficient stamps: 100 left, 1000 needed" in result.output
    (op,) = _ops(sessions)
    assert (op.status, op.http_status, op.error_code, op.invoice_key) == ("failed", 400, "insufficient_stamps", None)
    assert json.loads(op.error_fields) == {"stamps": "Insufficient stamps: 100 left, 1000 needed"}
    assert _rows(sessions) == [] and _alice(fake_stamps) == 100
    # Nothing happened at Stamps: the invoice may be used again, and so may the request id.
    unknown = app_stamps.test_client().post("/api/stamps/redemptions/reward", headers=AUTH,
                                            json={"user": ALICE, "store": 32, "reward": 99, "invoice_number": "POS-20"})
    assert unknown.status_code == 422
    assert unknown.get_json()["errors"] == {"reward": "Reward 99 not found"}
    assert unknown.get_json()["stamps_http_status"] == 400
    retried = _cli(app_stamps, "stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "1",
                   "--invoice", "POS-20", "--request-id", "till-20")
    assert retried.exit_code != 0 and "already used for redeem_reward" in retried.output  # other parameters
    fixed = _cli(app_stamps, "stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "4",
                 "--invoice", "POS-20", "--request-id", "till-20")
    assert fixed.exit_code == 1 and _ops(sessions)[0].attempts == 2  # the same request id ran again, refused again
    fake_stamps.member(ALICE).stamps = 1000
    ok = _cli(app_stamps, "stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "4",
              "--invoice", "POS-20", "--request-id", "till-20")
    assert ok.exit_code == 0, ok.output
    assert [(r.invoice_number, r.stamps_used) for r in _rows(sessions)] == [("POS-20", 1000)]
    assert _ops(sessions)[0].attempts == 3


def test_a_401_is_reported_without_the_token(settings_env, fake_stamps) -> None:  # noqa: ANN001
    env = {**settings_env, **_stamps_env(fake_stamps, STAMPS_TOKEN="wrong-token-0000"), "OPS_API_TOKEN": OPS_TOKEN}
    app = create_app(load_settings(env))
    sessions = app.extensions["rm_voucher_sync"].sessions
    try:
        result = _cli(app, "stamps", "promo", "--user", ALICE, "--store", "32", "--promo-code", "PROMOCODE",
                      "--invoice", "POS-30")
        assert result.exit_code == 1
        assert "Stamps said HTTP 401 HTTP_401 - Invalid token." in result.output
        api = app.test_client().post("/api/stamps/redemptions/promo", headers=AUTH, json={
            "user": ALICE, "store": 32, "promo_code": "PROMOCODE", "invoice_number": "POS-30"})
        assert api.status_code == 422 and api.get_json()["stamps_http_status"] == 401
        assert _rows(sessions) == [] and fake_stamps.redemptions == {}
        stored = " ".join(f"{o.params} {o.error_message} {o.response}" for o in _ops(sessions))
        assert "wrong-token-0000" not in stored + result.output + api.get_data(as_text=True)
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()


def test_a_404_on_cancel_changes_nothing(app_stamps, sessions, fake_stamps) -> None:  # noqa: ANN001
    _cli(app_stamps, "stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "1")
    missing = app_stamps.test_client().post("/api/stamps/redemptions/cancel", headers=AUTH, json={"id": 424242})
    assert missing.status_code == 422
    body = missing.get_json()
    assert (body["status"], body["stamps_http_status"], body["error_code"]) == ("failed", 404, "redemption_not_found")
    assert body["error_message"] == "Cannot find redemption 424242"
    cli = _cli(app_stamps, "stamps", "cancel", "424242")
    assert cli.exit_code == 1 and "Stamps said HTTP 404 redemption_not_found" in cli.output
    assert [(r.status, r.canceled_at) for r in _rows(sessions)] == [("Created", None)]
    assert [e[2] for e in _events(sessions)] == ["Created"]


def test_a_5xx_on_a_redemption_is_ambiguous_never_resent_and_resolvable(app_stamps, sessions, fake_stamps) -> None:  # noqa: ANN001
    fake_stamps.faults.fail_next, fake_stamps.faults.fail_status = 1, 500
    args = ["stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "1", "--invoice", "POS-40",
            "--request-id", "till-40"]
    result = _cli(app_stamps, *args)
    assert result.exit_code == 1
    assert "ambiguous" in result.output and "HTTP 500 server_error" in result.output
    assert "stamps resolve till-40 --redemption-id ID" in result.output and "--not-done" in result.output
    assert _answered(fake_stamps, "redeem_reward") == [500]  # not retried
    (op,) = _ops(sessions)
    assert (op.status, op.http_status, op.invoice_key) == ("ambiguous", 500, "32:POS-40")
    assert _rows(sessions) == []
    # The operator looks in Stamps' dashboard: nothing there. The invoice is free again.
    resolved = _cli(app_stamps, "stamps", "resolve", "till-40", "--not-done", "--actor", "ops-anna")
    assert resolved.exit_code == 0 and "resolved by ops-anna" in resolved.output
    again = _cli(app_stamps, *args)
    assert again.exit_code == 0, again.output
    assert _answered(fake_stamps, "redeem_reward") == [500, 200]
    assert [r.invoice_number for r in _rows(sessions)] == ["POS-40"]


def test_a_5xx_on_cancel_is_checked_by_asking_again(app_stamps, sessions, fake_stamps) -> None:  # noqa: ANN001
    assert _cli(app_stamps, "stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "1").exit_code == 0
    (row,) = _rows(sessions)
    fake_stamps.faults.fail_next, fake_stamps.faults.fail_status = 1, 502  # a proxy's HTML page, before Stamps acts
    result = _cli(app_stamps, "stamps", "cancel", str(row.stamps_id))
    assert result.exit_code == 0, result.output
    assert "not done, so it was sent once more" in result.output
    assert _answered(fake_stamps, "cancel") == [502, 200]
    assert _rows(sessions)[0].status == "Canceled" and _ops(sessions)[-1].attempts == 2

    # When asking again fails too, the cancel stays ambiguous until an operator settles it.
    assert _cli(app_stamps, "stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "1").exit_code == 0
    second = _rows(sessions)[1]
    fake_stamps.faults.fail_next = 2
    stuck = _cli(app_stamps, "stamps", "cancel", str(second.stamps_id), "--request-id", "void-2")
    assert stuck.exit_code == 1 and "ambiguous" in stuck.output and "asking again failed too" in stuck.output
    assert f"stamps resolve void-2 --redemption-id {second.stamps_id}" in stuck.output
    assert _rows(sessions)[1].status == "Created"
    wrong = _cli(app_stamps, "stamps", "resolve", "void-2", "--redemption-id", str(row.stamps_id))
    assert wrong.exit_code != 0 and _rows(sessions)[1].status == "Created"
    settled = _cli(app_stamps, "stamps", "resolve", "void-2", "--redemption-id", str(second.stamps_id))
    assert settled.exit_code == 0, settled.output
    assert _rows(sessions)[1].status == "Canceled"
    assert [e[2] for e in _events(sessions) if e[0] == second.stamps_id] == ["Created", "Canceled"]


# -- lost answers: never a second redemption ------------------------------------------------------


def test_a_retry_after_a_timeout_never_makes_a_second_redemption(app_stamps, sessions, fake_stamps) -> None:  # noqa: ANN001
    fake_stamps.faults.drop_after_apply, fake_stamps.faults.timeout_sleep = 1, 1.2  # longer than the 0.6 s timeout
    args = ["stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "1", "--invoice", "POS-50",
            "--request-id", "till-50"]
    first = _cli(app_stamps, *args)
    assert first.exit_code == 1 and "ambiguous" in first.output and "no redemption lookup" in first.output
    # The cashier retries: same request id, then a new one for the same invoice, then through the API.
    second = _cli(app_stamps, *args)
    assert "[already run earlier under this request id: not sent again]" in second.output
    third = _cli(app_stamps, *args[:-2])
    assert "[already run earlier under this store and invoice number: not sent again]" in third.output
    api = app_stamps.test_client().post(
        "/api/stamps/redemptions/reward", headers={**AUTH, "Idempotency-Key": "till-50"},
        json={"user": ALICE, "store": 32, "reward": 1, "invoice_number": "POS-50"},
    )
    assert api.status_code == 502 and api.get_json()["replayed"] is True
    assert _answered(fake_stamps, "redeem_reward") == [200]  # the first answer came, too late
    assert len(fake_stamps.redemptions) == 1 and _alice(fake_stamps) == 98
    assert _rows(sessions) == [] and _ops(sessions)[0].status == "ambiguous"
    # The operator finds it in Stamps' dashboard and records it; it can then be canceled as usual.
    (stamps_id,) = fake_stamps.redemptions
    resolved = app_stamps.test_client().post("/api/stamps/resolve", headers=AUTH,
                                             json={"request_id": "till-50", "redemption_ids": [stamps_id]})
    assert resolved.status_code == 200, resolved.get_json()
    (row,) = _rows(sessions)
    assert (row.stamps_id, row.invoice_number, row.reward_id, row.status) == (stamps_id, "POS-50", 1, "Created")
    assert _cli(app_stamps, *args).exit_code == 0  # now a replay of the settled operation
    assert len(fake_stamps.requests_for("redeem_reward")) == 1

    fake_stamps.faults.drop_after_apply = 1
    lost_cancel = _cli(app_stamps, "stamps", "cancel", str(stamps_id))
    assert lost_cancel.exit_code == 0, lost_cancel.output
    assert "asking again showed it was already done" in lost_cancel.output
    assert _answered(fake_stamps, "cancel") == [200, 400]
    assert _events(sessions) == [(stamps_id, None, "Created", None), (stamps_id, "Created", "Canceled", None)]
    assert _alice(fake_stamps) == 100


# -- PIN authorisation ----------------------------------------------------------------------------


def test_invalid_pin_flow_surfaces_the_remaining_attempts(app_stamps, sessions, fake_stamps) -> None:  # noqa: ANN001
    fake_stamps.pin_required = True
    redeem = ["stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "1", "--request-id", "pin-1"]
    unauthorised = _cli(app_stamps, *redeem)
    assert unauthorised.exit_code == 1 and "authorization_required" in unauthorised.output

    wrong = _cli(app_stamps, "stamps", "authorize", "--user", ALICE, "--request-id", "pin-1", "--pin", "111111")
    assert wrong.exit_code == 1
    assert "Invalid PIN, 2 attempt(s) left" in wrong.output and "PIN attempts left: 2" in wrong.output
    api = app_stamps.test_client().post("/api/stamps/authorize", headers=AUTH, json={
        "user": ALICE, "pin": "222222", "request_id": "pin-1", "timeout": 900})
    assert api.status_code == 422
    assert (api.get_json()["error_code"], api.get_json()["pin_attempts_left"]) == ("invalid_pin", 1)
    # The PIN is asked for without echo when not given on the command line.
    right = _cli(app_stamps, "stamps", "authorize", "--user", ALICE, "--request-id", "pin-1", input="123456\n")
    assert right.exit_code == 0, right.output
    assert "authorize succeeded" in right.output and "123456" not in right.output
    assert fake_stamps.member(ALICE).pin_attempts_left == 3

    # The redemption Stamps refused under this request id now runs again, once.
    done = _cli(app_stamps, *redeem)
    assert done.exit_code == 0, done.output
    assert _answered(fake_stamps, "redeem_reward") == [400, 200]
    assert [(r.request_id, r.stamps_used) for r in _rows(sessions)] == [("pin-1", 2)]
    ops = _ops(sessions)
    assert [(o.kind, o.status) for o in ops] == [
        ("redeem_reward", "succeeded"), ("authorize", "failed"), ("authorize", "failed"), ("authorize", "succeeded"),
    ]
    stored = " ".join(f"{o.params} {o.error_message} {o.response}" for o in ops)
    assert all(pin not in stored for pin in ("111111", "222222", "123456")) and '"pin": "******"' in stored

    for _ in range(3):
        _cli(app_stamps, "stamps", "authorize", "--user", ALICE, "--request-id", "pin-2", "--pin", "999999")
    blocked = _cli(app_stamps, "stamps", "authorize", "--user", ALICE, "--request-id", "pin-2", "--pin", "123456")
    assert blocked.exit_code == 1 and "pin_blocked" in blocked.output


# -- idempotency ----------------------------------------------------------------------------------


def test_request_id_and_invoice_never_produce_two_redemptions(app_stamps, sessions, fake_stamps) -> None:  # noqa: ANN001
    client = app_stamps.test_client()
    body = {"user": ALICE, "store": 32, "reward": 1, "invoice_number": "POS-60", "request_id": "till-60"}
    first = client.post("/api/stamps/redemptions/reward", headers=AUTH, json=body)
    second = client.post("/api/stamps/redemptions/reward", headers=AUTH, json=body)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.get_json()["replayed"] is True
    assert second.get_json()["redemptions"] == first.get_json()["redemptions"]
    # The same invoice at the same store for something else, or under another request id: refused.
    promo = client.post("/api/stamps/redemptions/promo", headers=AUTH, json={
        "user": ALICE, "store": 32, "promo_code": "PROMOCODE", "invoice_number": "POS-60"})
    assert promo.status_code == 409 and "already used by redeem_reward" in promo.get_json()["detail"]
    # The POS retried with a fresh request id: the invoice answers with the first redemption, nothing is sent.
    retry = client.post("/api/stamps/redemptions/reward", headers=AUTH, json={**body, "request_id": "till-61"})
    assert retry.status_code == 200 and retry.get_json()["replayed"] is True
    assert retry.get_json()["request_id"] == "till-60"
    changed = client.post("/api/stamps/redemptions/reward", headers=AUTH,
                          json={**body, "reward": 2, "request_id": "till-63"})
    assert changed.status_code == 409
    # Another store may have its own POS-60.
    elsewhere = client.post("/api/stamps/redemptions/reward", headers=AUTH, json={
        **body, "store": 45, "request_id": "till-62"})
    assert elsewhere.status_code == 200
    assert len(fake_stamps.requests_for("redeem_reward")) == 2 and len(_rows(sessions)) == 2
    bad = client.post("/api/stamps/redemptions/reward", headers=AUTH, json={"user": ALICE, "store": "x", "reward": 1})
    assert bad.status_code == 400 and bad.get_json()["error"] == "invalid_input"
    listed = client.get("/api/stamps/redemptions?store=32", headers=AUTH).get_json()
    assert [r["invoice_number"] for r in listed["items"]] == ["POS-60"]


def test_inputs_are_checked_before_calling_stamps(app_stamps, fake_stamps) -> None:  # noqa: ANN001
    for args in (
        ["stamps", "redeem-reward", "--user", ALICE, "--store", "0", "--reward", "1"],
        ["stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "1", "--extra-data", "[1]"],
        ["stamps", "deduct", "--user", ALICE, "--store", "32", "--voucher", "1", "--value", "-5"],
        ["stamps", "promo", "--user", ALICE, "--store", "32", "--promo-code", "X"],
        ["stamps", "authorize", "--user", ALICE, "--request-id", "r1", "--pin", "12ab56"],
        ["stamps", "redeem-many", "--user", ALICE, "--store", "32", "--reward", "1,color=red"],
        ["stamps", "redeem-reward", "--user", ALICE, "--store", "32", "--reward", "1", "--request-id", "no spaces"],
        ["stamps", "resolve", "whatever"],
    ):
        assert _cli(app_stamps, *args).exit_code != 0, args
    assert fake_stamps.log == []


def test_without_a_token_stamps_is_off_and_says_so(settings_env) -> None:  # noqa: ANN001
    app = create_app(load_settings({**settings_env, "OPS_API_TOKEN": OPS_TOKEN}))
    try:
        result = _cli(app, "stamps", "cancel", "1")
        assert result.exit_code != 0 and "STAMPS_TOKEN" in result.output
        api = app.test_client().post("/api/stamps/redemptions/cancel", headers=AUTH, json={"id": 1})
        assert api.status_code == 503 and api.get_json()["error"] == "stamps_not_configured"
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()


# -- the client and the configuration on their own (no database) -----------------------------------


def _client(base_url: str, **options) -> StampsClient:  # noqa: ANN003
    defaults = dict(base_url=base_url, token_type="Token", token=STAMPS_TOKEN, timeout=(0.5, 0.6), max_retries=2,
                    backoff_base=0.01)
    defaults.update(options)
    return StampsClient(**defaults)


def test_client_sends_the_configured_authorization_and_maps_errors(fake_stamps) -> None:  # noqa: ANN001
    client = _client(fake_stamps.base_url)
    assert client.authorize(user=ALICE, pin="123456", request_id="r", timeout=60) == {"status": "ok"}
    with pytest.raises(StampsBadRequest) as missing:
        client.post("redeem_reward", {"store": 32})
    assert missing.value.http_status == 400 and missing.value.code == "invalid_data"
    assert missing.value.errors == {"user": "This field is required.", "reward": "This field is required."}
    with pytest.raises(StampsInvalidPin) as pin:
        client.authorize(user=ALICE, pin="000000", request_id="r", timeout=60)
    assert pin.value.attempts_left == 2 and "2 attempt(s) left" in pin.value.describe()
    with pytest.raises(StampsNotFound):
        client.cancel_redemption(1)
    fake_stamps.faults.fail_next, fake_stamps.faults.fail_status = 1, 503
    with pytest.raises(StampsAmbiguous) as ambiguous:
        client.cancel_redemption(1)
    assert ambiguous.value.http_status == 503 and len(fake_stamps.requests_for("cancel")) == 2
    bearer = _client(fake_stamps.base_url, token_type="Bearer")
    with pytest.raises(StampsAuthError) as auth:
        bearer.cancel_redemption(1)
    assert auth.value.message == "Invalid token."
    assert STAMPS_TOKEN not in repr(client) + str(auth.value) + auth.value.describe()
    echoed = HTTPResult(400, {}, json.dumps({"detail": f"bad header: Token {STAMPS_TOKEN}",
                                             "errors": {"auth": STAMPS_TOKEN}}).encode())
    scrubbed = client._scrubbed(error_from_response(echoed))
    assert STAMPS_TOKEN not in f"{scrubbed} {scrubbed.errors}" and "[redacted]" in scrubbed.message


def test_client_retries_only_what_never_left() -> None:
    refused = _client(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(StampsUnavailable) as info:
        refused.redeem_reward(user=ALICE, reward=1, store=32)
    assert info.value.code == "NETWORK_ERROR" and time.monotonic() - started < 5


@pytest.mark.parametrize(
    "status, body, kind, code, message, errors",
    [
        (400, {"detail": "user: This field is required.", "errors": {"user": ["This field is required."]},
               "error_code": "invalid_data", "error_message": "user: This field is required."},
         StampsBadRequest, "invalid_data", "user: This field is required.", {"user": "This field is required."}),
        (400, {"detail": "pin: Invalid PIN, 2 attempt(s) left", "errors": {"pin": "Invalid PIN, 2 attempt(s) left"},
               "error_code": "invalid_pin", "error_message": "pin: Invalid PIN, 2 attempt(s) left"},
         StampsInvalidPin, "invalid_pin", "pin: Invalid PIN, 2 attempt(s) left",
         {"pin": "Invalid PIN, 2 attempt(s) left"}),
        (401, {"detail": "Authentication credentials were not provided."}, StampsAuthError, "HTTP_401",
         "Authentication credentials were not provided.", {}),
        (404, {"detail": "Not found."}, StampsNotFound, "HTTP_404", "Not found.", {}),
        (503, None, StampsUnavailable, "HTTP_503", "", {}),
    ],
)
def test_errors_are_mapped_from_status_and_body(status, body, kind, code, message, errors) -> None:  # noqa: ANN001
    content = b"<html>busy</html>" if body is None else json.dumps(body).encode()
    error = error_from_response(HTTPResult(status, {}, content))
    assert type(error) is kind
    assert (error.code, error.message, error.errors, error.http_status) == (code, message, errors, status)


def test_stamps_settings_are_validated_and_the_token_is_secret(vectors: dict) -> None:
    base = {"RM_SERVER_PUBLIC_KEY": vectors["rm_server_public_pem"]}
    s = load_settings(base)
    assert (s.stamps_api_base_url, s.stamps_token_type, s.stamps_token, s.stamps_configured) == (
        "https://stamps.co.id", "Token", None, False)
    s = load_settings({**base, "STAMPS_API_BASE_URL": "http://127.0.0.1:9/", "STAMPS_TOKEN_TYPE": "Bearer",
                       "STAMPS_TOKEN": STAMPS_TOKEN, "STAMPS_TIMEOUT_SECONDS": "3", "STAMPS_MAX_RETRIES": "0"})
    assert (s.stamps_api_base_url, s.stamps_token_type, s.stamps_timeout_seconds, s.stamps_max_retries) == (
        "http://127.0.0.1:9", "Bearer", 3.0, 0)
    assert STAMPS_TOKEN not in repr(s) and STAMPS_TOKEN in s.secret_values()
    for env, variable in (({"STAMPS_TOKEN_TYPE": "Token abc"}, "STAMPS_TOKEN_TYPE"),
                          ({"STAMPS_API_BASE_URL": "stamps.co.id"}, "STAMPS_API_BASE_URL"),
                          ({"STAMPS_TIMEOUT_SECONDS": "0"}, "STAMPS_TIMEOUT_SECONDS"),
                          ({"STAMPS_MAX_RETRIES": "many"}, "STAMPS_MAX_RETRIES")):
        with pytest.raises(ConfigError, match=variable):
            load_settings({**base, **env})
    with pytest.raises(ConfigError) as bad_token:
        load_settings({**base, "STAMPS_TOKEN": "two words-secret"})
    assert "STAMPS_TOKEN" in str(bad_token.value) and "words-secret" not in str(bad_token.value)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "sent Token %s", (STAMPS_TOKEN,), None)
    RedactFilter(s.secret_values()).filter(record)
    assert record.getMessage() == "sent Token [redacted]"

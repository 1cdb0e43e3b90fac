"""The callback endpoint through the real app and database (SQLite file and PostgreSQL)."""

from __future__ import annotations

import json
import time

from sqlalchemy import func, select, text

from receiver.models import Voucher, VoucherEvent, WebhookDelivery
from tests.support import CALLBACK_PATH, Signer, callback_body, voucher_item


def post(client, signer: Signer, body: bytes, headers: dict | None = None):  # noqa: ANN001, ANN201
    return client.post(CALLBACK_PATH, data=body, headers=headers or signer.headers(body))


def counts(db) -> tuple[int, int, int]:  # noqa: ANN001
    with db() as s:
        return (
            s.scalar(select(func.count()).select_from(Voucher)),
            s.scalar(select(func.count()).select_from(VoucherEvent)),
            s.scalar(select(func.count()).select_from(WebhookDelivery)),
        )


def events(db, code: str) -> list[VoucherEvent]:  # noqa: ANN001
    with db() as s:
        return list(s.scalars(select(VoucherEvent).where(VoucherEvent.voucher_code == code).order_by(VoucherEvent.id)))


def voucher(db, code: str) -> Voucher | None:  # noqa: ANN001
    with db() as s:
        return s.scalars(select(Voucher).where(Voucher.code == code)).one_or_none()


def test_seed_sample_is_typed_and_a_redelivery_is_a_duplicate(client, db, rm_signer, vectors) -> None:  # noqa: ANN001
    case = next(c for c in vectors["cases"] if c["name"] == "seed_voucher_callback")
    body = case["body"].encode("utf-8")
    headers = rm_signer.headers(body)
    first = post(client, rm_signer, body, headers)
    assert first.status_code == 200 and first.get_json() == {"status": "accepted"}

    v = voucher(db, "NAklEfbVdV")
    assert v.status == "VOID" and v.label == "oijfge" and v.voucher_type == "GIFT" and v.origin == "SYSTEM"
    assert v.batch_key == "EhQKCE1lcmNoYW50EJXVzd3wraqTORIYCgxWb3VjaGVyQmF0Y2gQkvnGweaB2uQg"
    assert v.key == "EhQKCE1lcmNoYW50EJXVzd3wraqTORIVCgdWb3VjaGVyGgpOQWtsRWZiVmRW"
    assert (v.amount, v.discount_rate, v.minimum_spend_amount) == (0, 0, 0)
    assert v.is_shipping is False and v.is_device_redeem is False and v.address is None and v.image_url is None
    assert v.qr_url == "http://api.revenuemonster.my/qr/4118165203679668885/voucher/NAklEfbVdV"
    assert (v.expiry_type, v.expiry_day) == ("DYNAMIC", 100)
    assert v.expires_at.isoformat() == "2019-01-06T17:19:35+00:00"
    assert v.assigned_at.isoformat() == "2018-09-28T17:15:17+00:00"
    assert v.redeemed_at.isoformat() == "2018-09-28T17:19:35+00:00"
    assert v.used_at.isoformat() == "2018-09-28T17:19:44.686549+00:00"
    assert v.rm_created_at.isoformat() == "2018-06-21T11:08:00+00:00"
    assert v.rm_updated_at.isoformat() == "2018-09-28T17:19:44.686549+00:00"
    assert v.rm_updated_ns == 1538155184686549977
    assert json.loads(v.raw)["updatedAt"] == "2018-09-28T17:19:44.686549977Z"
    assert v.needs_reconcile is False and v.last_source == "callback" and v.last_confirmed_at is not None

    (event,) = events(db, "NAklEfbVdV")
    assert (event.from_status, event.to_status, event.source, event.outcome) == (None, "VOID", "callback", "applied")
    with db() as s:
        delivery = s.get(WebhookDelivery, event.delivery_id)
    assert delivery.outcome == "accepted" and delivery.attempts == 1 and delivery.signature_verified
    assert delivery.body == case["body"] and delivery.voucher_code == "NAklEfbVdV"
    assert json.loads(delivery.headers)["X-Nonce-Str"] == headers["X-Nonce-Str"]

    again = post(client, rm_signer, body, headers)
    assert again.status_code == 200 and again.get_json() == {"status": "duplicate"}
    retry = post(client, rm_signer, body)  # RM's next retry, new nonce and timestamp
    assert retry.get_json() == {"status": "duplicate"}
    assert counts(db) == (1, 1, 1)
    with db() as s:
        assert s.get(WebhookDelivery, event.delivery_id).attempts == 3


def test_the_vector_signature_itself_verifies_over_http(app, client, db, vectors) -> None:  # noqa: ANN001
    case = next(c for c in vectors["cases"] if c["name"] == "non_ascii_and_html_chars")
    headers = {"Content-Type": "application/json", "X-Signature": case["x_signature"],
               "X-Nonce-Str": case["nonce"], "X-Timestamp": case["timestamp"]}
    # 2020's timestamp is far outside the default window ...
    stale = client.post(CALLBACK_PATH, data=case["body"].encode(), headers=headers)
    assert stale.status_code == 401
    # ... and verifies once the window is off.
    app.extensions["rm_voucher_sync"].settings = app.extensions["rm_voucher_sync"].settings.__class__(
        **{**app.extensions["rm_voucher_sync"].settings.__dict__, "signature_max_age_seconds": 0}
    )
    ok = client.post(CALLBACK_PATH, data=case["body"].encode(), headers=headers)
    assert ok.status_code == 200, ok.get_json()
    v = voucher(db, "rms@xR43u4bRhUU")
    assert v.label == "Café 咖啡 <b>&</b> 50% off" and v.status == "REDEEMED" and v.amount == 100


def test_out_of_order_older_snapshot_is_stale(client, db, rm_signer) -> None:  # noqa: ANN001
    void = post(client, rm_signer, callback_body(voucher_item("OOO1", "VOID", step=5)))
    redeemed = post(client, rm_signer, callback_body(voucher_item("OOO1", "REDEEMED", step=3)))
    assert void.get_json() == {"status": "accepted"} and redeemed.get_json() == {"status": "stale"}
    assert voucher(db, "OOO1").status == "VOID"
    assert [(e.to_status, e.outcome) for e in events(db, "OOO1")] == [("VOID", "applied"), ("REDEEMED", "stale")]
    # The same stale snapshot re-sent in another shape (different bytes) adds nothing.
    again = json.dumps({"code": "SUCCESS", "item": voucher_item("OOO1", "REDEEMED", step=3)}, indent=2).encode()
    assert post(client, rm_signer, again).get_json() == {"status": "duplicate"}
    assert len(events(db, "OOO1")) == 2


def test_newer_snapshot_with_same_status_is_applied_and_recorded(client, db, rm_signer) -> None:  # noqa: ANN001
    post(client, rm_signer, callback_body(voucher_item("SAME1", "ISSUE", step=1, amount=500)))
    r = post(client, rm_signer, callback_body(voucher_item("SAME1", "ISSUED", step=2, amount=700)))
    assert r.get_json() == {"status": "accepted"}
    v = voucher(db, "SAME1")
    assert v.status == "ISSUE" and v.amount == 700
    assert [(e.from_status, e.to_status) for e in events(db, "SAME1")] == [(None, "ISSUE"), ("ISSUE", "ISSUE")]


def test_data_envelope_is_accepted(client, db, rm_signer) -> None:  # noqa: ANN001
    r = post(client, rm_signer, callback_body(voucher_item("ENV1", "VALID"), envelope="data"))
    assert r.get_json() == {"status": "accepted"} and voucher(db, "ENV1").status == "VALID"


def test_illegal_transition_is_recorded_not_applied_and_flags_reconcile(client, db, rm_signer) -> None:  # noqa: ANN001
    post(client, rm_signer, callback_body(voucher_item("ILL1", "VOID", step=1)))
    r = post(client, rm_signer, callback_body(voucher_item("ILL1", "ISSUE", step=2)))
    assert r.status_code == 200 and r.get_json() == {"status": "accepted"}
    v = voucher(db, "ILL1")
    assert v.status == "VOID" and v.needs_reconcile is True
    last = events(db, "ILL1")[-1]
    assert (last.from_status, last.to_status, last.outcome) == ("VOID", "ISSUE", "illegal")
    assert "not allowed" in last.detail


def test_unknown_status_is_stored_and_flagged(client, db, rm_signer) -> None:  # noqa: ANN001
    post(client, rm_signer, callback_body(voucher_item("UNK1", "ISSUE", step=1)))
    r = post(client, rm_signer, callback_body(voucher_item("UNK1", "TELEPORTED", step=2)))
    assert r.status_code == 200
    assert voucher(db, "UNK1").status == "TELEPORTED"
    assert events(db, "UNK1")[-1].outcome == "unknown_status"


def _assert_only_delivery_changed(db, before: tuple[int, int, int], outcome: str, status: int) -> WebhookDelivery:  # noqa: ANN001
    assert counts(db) == (before[0], before[1], before[2] + 1)
    with db() as s:
        last = s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(1)).one()
    assert last.outcome == outcome and last.http_status == status and last.error
    assert last.signature_verified is False and last.dedupe_key is None
    return last


def test_bad_signatures_are_401_and_change_nothing_but_the_log(client, db, rm_signer, vectors) -> None:  # noqa: ANN001
    body = callback_body(voucher_item("SIG1", "VOID"))
    good = rm_signer.headers(body)
    merchant = Signer(vectors["merchant_private_pem"])
    tampered = body.replace(b'"VOID"', b'"VALID"')
    no_sig = {k: v for k, v in good.items() if k != "X-Signature"}
    no_nonce = {k: v for k, v in good.items() if k != "X-Nonce-Str"}
    bad_prefix = {**good, "X-Signature": good["X-Signature"].replace("sha256 ", "sha1 ")}
    stale = rm_signer.headers(body, timestamp=int(time.time()) - 1000)
    future = rm_signer.headers(body, timestamp=int(time.time()) + 1000)
    cases = [
        (tampered, good), (body, merchant.headers(body)), (body, no_sig), (body, no_nonce),
        (body, bad_prefix), (body, stale), (body, future),
    ]
    for sent, headers in cases:
        before = counts(db)
        r = client.post(CALLBACK_PATH, data=sent, headers=headers)
        assert r.status_code == 401 and r.get_json() == {"error": "invalid_signature"}
        _assert_only_delivery_changed(db, before, "rejected_signature", 401)
    assert voucher(db, "SIG1") is None
    # The genuine one is still accepted afterwards: rejections never poison the dedupe key.
    assert post(client, rm_signer, body, good).get_json() == {"status": "accepted"}


def test_nonce_reused_with_another_body_is_rejected(client, db, rm_signer) -> None:  # noqa: ANN001
    first = callback_body(voucher_item("NON1", "ISSUE", step=1))
    headers = rm_signer.headers(first, nonce="fixed-nonce-1")
    assert post(client, rm_signer, first, headers).status_code == 200
    second = callback_body(voucher_item("NON1", "VOID", step=2))
    before = counts(db)
    r = post(client, rm_signer, second, rm_signer.headers(second, nonce="fixed-nonce-1"))
    assert r.status_code == 401
    _assert_only_delivery_changed(db, before, "rejected_signature", 401)
    assert voucher(db, "NON1").status == "ISSUE"


def test_malformed_requests(client, db, rm_signer) -> None:  # noqa: ANN001
    not_json = b'{"item": {"code": "M1", "status": "VOID"'
    no_code = callback_body({"status": "VOID", "updatedAt": "2026-01-01T00:00:00Z"})
    right = callback_body(voucher_item("M1", "VOID"))
    huge = callback_body(voucher_item("M1", "VOID", label="x" * 100 * 1024))
    cases = [
        (not_json, {**rm_signer.headers(right)}, 400, {"error": "malformed"}),
        (no_code, rm_signer.headers(no_code), 400, {"error": "malformed"}),
        (right, {**rm_signer.headers(right), "Content-Type": "text/plain"}, 415, {"error": "unsupported_media_type"}),
        (huge, rm_signer.headers(huge), 413, {"error": "too_large"}),
    ]
    for body, headers, status, error in cases:
        before = counts(db)
        r = client.post(CALLBACK_PATH, data=body, headers=headers)
        assert r.status_code == status, (status, r.get_json())
        assert error.items() <= r.get_json().items()
        last = _assert_only_delivery_changed(db, before, "rejected_malformed", status)
        assert len(last.body.encode()) <= 64 * 1024
    assert last.body_truncated and len(last.body) == 4096  # the 413 keeps only a bounded prefix
    assert voucher(db, "M1") is None
    assert client.post(CALLBACK_PATH, data=no_code, headers=rm_signer.headers(no_code)).get_json()["detail"] == (
        "voucher object has no code"
    )


def _install_failing_trigger(db, dialect: str) -> None:  # noqa: ANN001
    """A real database error on our side (as a bug or broken constraint would cause), no mocks."""
    with db.begin() as s:
        if dialect == "postgresql":
            s.execute(text(
                "CREATE FUNCTION fail_boom() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF NEW.voucher_code = 'BOOM1' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END; $$"
            ))
            s.execute(text("CREATE TRIGGER fail_boom BEFORE INSERT ON voucher_events "
                           "FOR EACH ROW EXECUTE FUNCTION fail_boom()"))
        else:
            s.execute(text("CREATE TRIGGER fail_boom BEFORE INSERT ON voucher_events "
                           "WHEN NEW.voucher_code = 'BOOM1' BEGIN SELECT RAISE(ABORT, 'boom'); END"))


def test_failure_on_our_side_is_500_stored_as_error_then_applied_on_redelivery(client, db, rm_signer, app) -> None:  # noqa: ANN001
    dialect = app.extensions["rm_voucher_sync"].engine.dialect.name
    _install_failing_trigger(db, dialect)
    body = callback_body(voucher_item("BOOM1", "ISSUE"))
    r = post(client, rm_signer, body)
    assert r.status_code == 500
    assert voucher(db, "BOOM1") is None and events(db, "BOOM1") == []
    with db() as s:
        failed = s.scalars(select(WebhookDelivery).where(WebhookDelivery.voucher_code == "BOOM1")).one()
    assert failed.outcome == "error" and "boom" in failed.error and failed.signature_verified

    assert post(client, rm_signer, body).status_code == 500  # RM's retry, still broken
    with db.begin() as s:
        s.execute(text("DROP TRIGGER fail_boom" + (" ON voucher_events" if dialect == "postgresql" else "")))
    r = post(client, rm_signer, body)  # the next retry, after the fix
    assert r.status_code == 200 and r.get_json() == {"status": "accepted"}
    with db() as s:
        delivery = s.get(WebhookDelivery, failed.id)
    assert delivery.outcome == "accepted" and delivery.attempts == 3 and delivery.error is None
    assert [e.delivery_id for e in events(db, "BOOM1")] == [failed.id]
    assert post(client, rm_signer, body).get_json() == {"status": "duplicate"}


def test_voucher_history_view_reads_newest_first(client, db, rm_signer) -> None:  # noqa: ANN001
    for step, status in enumerate(["VALID", "ISSUE", "REDEEMED", "VOID"]):
        post(client, rm_signer, callback_body(voucher_item("HIST1", status, step=step)))
    with db() as s:
        rows = s.execute(text(
            "SELECT code, batch_key, from_status, to_status, source, outcome, current_status "
            "FROM voucher_history WHERE code = 'HIST1'"
        )).all()
    assert [(r.from_status, r.to_status) for r in rows] == [
        ("REDEEMED", "VOID"), ("ISSUE", "REDEEMED"), ("VALID", "ISSUE"), (None, "VALID")
    ]
    assert {(r.batch_key, r.source, r.outcome, r.current_status) for r in rows} == {("batch-1", "callback", "applied", "VOID")}


def test_health_and_readiness(client) -> None:  # noqa: ANN001
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["status"] == "ready"


def test_readiness_fails_on_an_unmigrated_database(database_url, vectors, tmp_path) -> None:  # noqa: ANN001
    from receiver import create_app
    from receiver.config import load_settings
    from tests.support import fresh_settings_env

    app = create_app(load_settings(fresh_settings_env(database_url, vectors, tmp_path)))
    try:
        r = app.test_client().get("/readyz")
        assert r.status_code == 503 and r.get_json()["status"] == "unavailable"
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()


def test_insecure_mode_accepts_unsigned_only_when_explicit(migrated_url, tmp_path) -> None:  # noqa: ANN001
    from receiver import create_app
    from receiver.config import load_settings

    app = create_app(load_settings({"DATABASE_URL": migrated_url, "RM_INSECURE_SKIP_SIGNATURE": "1"}))
    try:
        body = callback_body(voucher_item("INS1", "VALID"))
        r = app.test_client().post(CALLBACK_PATH, data=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 200
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()


def _forged_from(client, code: str, addresses: list[str]) -> list[int]:  # noqa: ANN001
    """POST one unsigned callback for ``code`` from each address in turn; the status codes."""
    forged = callback_body(voucher_item(code, "VOID"))
    return [
        client.post(CALLBACK_PATH, data=forged, headers={"Content-Type": "application/json"},
                    environ_base={"REMOTE_ADDR": address}).status_code
        for address in addresses
    ]


def test_a_flood_starting_from_one_source_has_at_most_ten_rejections_stored_at_once(settings_env) -> None:  # noqa: ANN001
    """At the default 120 a minute, a flood's first rejections are not all stored: each is a durable commit of its own.

    On PostgreSQL a burst of 60 per worker queued its commits on the WAL flush ahead of genuine
    callbacks (docs/performance.md); the limit over a minute is unchanged.
    """
    from receiver import create_app
    from receiver.config import load_settings

    app = create_app(load_settings(settings_env))
    db = app.extensions["rm_voucher_sync"].sessions
    try:
        client = app.test_client()
        answers = _forged_from(client, "FLOODSTART", ["203.0.113.10"] * 25)
        with db() as s:
            stored = s.scalar(select(func.count()).select_from(WebhookDelivery).where(
                WebhookDelivery.remote_addr == "203.0.113.10"))
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()
    assert answers == [401] * 25
    # Ten at once; the 2 a second of the rate may add one while the 25 requests run.
    assert 10 <= stored <= 11


def test_a_forged_flood_from_many_addresses_is_stored_bounded_too(settings_env, rm_signer) -> None:  # noqa: ANN001
    """Each new address starts with a full bucket; the bucket for all of them together bounds what a spread-out flood stores."""
    from receiver import create_app
    from receiver.config import load_settings

    app = create_app(load_settings({**settings_env, "REJECTED_DELIVERIES_TOTAL_PER_MINUTE": "12"}))
    db = app.extensions["rm_voucher_sync"].sessions
    try:
        client = app.test_client()
        answers = _forged_from(client, "SPREAD", [f"2001:db8::{i:x}" for i in range(40)])
        good = callback_body(voucher_item("GENUINE", "ISSUE"))
        genuine = client.post(CALLBACK_PATH, data=good, headers=rm_signer.headers(good), environ_base={"REMOTE_ADDR": "2001:db8::1"})
        with db() as s:
            stored = s.scalar(select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.outcome == "rejected_signature"))
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()
    assert answers == [401] * 40
    assert genuine.get_json() == {"status": "accepted"}, "genuine callbacks are never limited"
    # Ten at once; the 0.2 a second of the rate may add one while the 40 requests run. Each
    # address alone (120 a minute, 10 at once) would have let all 40 through.
    assert 10 <= stored <= 11


def test_rejected_deliveries_are_stored_bounded_and_rate_limited_per_source(settings_env, rm_signer) -> None:  # noqa: ANN001
    from receiver import create_app
    from receiver.config import load_settings

    app = create_app(load_settings({**settings_env, "REJECTED_DELIVERIES_PER_MINUTE": "5"}))
    db = app.extensions["rm_voucher_sync"].sessions
    try:
        client = app.test_client()
        forged = callback_body(voucher_item("FLOOD", "VOID", label="x" * 20_000))
        answers = [
            client.post(CALLBACK_PATH, data=forged, headers={"Content-Type": "application/json"},
                        environ_base={"REMOTE_ADDR": "203.0.113.9"}).status_code
            for _ in range(12)
        ]
        other_source = client.post(CALLBACK_PATH, data=forged, headers={"Content-Type": "application/json"},
                                   environ_base={"REMOTE_ADDR": "198.51.100.7"})
        good = callback_body(voucher_item("GENUINE", "ISSUE"))
        genuine = client.post(CALLBACK_PATH, data=good, headers=rm_signer.headers(good),
                              environ_base={"REMOTE_ADDR": "203.0.113.9"})
        with db() as s:
            rows = s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()
    assert answers == [401] * 12 and other_source.status_code == 401
    assert genuine.get_json() == {"status": "accepted"}, "genuine callbacks are never limited"
    by_source = [(r.remote_addr, r.outcome) for r in rows]
    assert by_source.count(("203.0.113.9", "rejected_signature")) == 5
    assert by_source.count(("198.51.100.7", "rejected_signature")) == 1
    assert ("203.0.113.9", "accepted") in by_source
    assert all(len(r.body.encode()) <= 8 * 1024 and r.body_truncated for r in rows if r.outcome != "accepted")

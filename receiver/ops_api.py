"""The ops JSON API under /api/: vouchers with history, listings, on-demand reconcile. Bearer OPS_API_TOKEN."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from flask import Blueprint, Response, jsonify, request

from .client import RMNotConfigured
from .runtime import current_runtime
from .signature import constant_time_equals

bp = Blueprint("ops_api", __name__, url_prefix="/api")
OPENAPI_PATH = Path(__file__).with_name("openapi.json")


@lru_cache(maxsize=1)
def _openapi() -> dict:
    return json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))


def _error(status: int, error: str, detail: str) -> tuple[Response, int]:
    return jsonify({"error": error, "detail": detail}), status


@bp.before_request
def _authorise() -> tuple[Response, int] | None:
    if request.endpoint == "ops_api.openapi":
        return None
    token = current_runtime().settings.ops_api_token
    if not token:
        return _error(404, "ops_api_disabled", "the ops API is off: set OPS_API_TOKEN to enable it")
    header = request.headers.get("Authorization", "")
    offered = header[7:] if header.startswith("Bearer ") else ""
    # Compare even when nothing was offered, so timing says nothing about the token.
    if not constant_time_equals(offered, token) or not offered:
        response, status = _error(401, "unauthorized", "send Authorization: Bearer <OPS_API_TOKEN>")
        response.headers["WWW-Authenticate"] = 'Bearer realm="rm-voucher-sync ops"'
        return response, status
    return None


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI description of this API (no token needed: it holds no data)."""
    return jsonify(_openapi())


@bp.get("/vouchers")
def vouchers() -> Response | tuple[Response, int]:
    """Vouchers by status and/or batch, a page at a time (cursor = the last id of the previous page)."""
    from .ops import list_vouchers

    try:
        limit = min(max(int(request.args.get("limit", 50)), 1), 500)
        after = int(request.args.get("cursor", 0))
    except ValueError:
        return _error(400, "bad_request", "limit and cursor must be whole numbers")
    with current_runtime().sessions() as session:
        items, cursor = list_vouchers(
            session, status=request.args.get("status"), batch=request.args.get("batch"), limit=limit, after=after
        )
    return jsonify({"items": items, "next_cursor": cursor})


@bp.get("/vouchers/<path:code>")
def voucher(code: str) -> Response | tuple[Response, int]:
    """One voucher's current state and its full timeline, oldest first."""
    from .ops import voucher_with_history

    with current_runtime().sessions() as session:
        found = voucher_with_history(session, code)
    if found is None:
        return _error(404, "not_found", f"no voucher with code {code!r}")
    return jsonify(found)


@bp.post("/vouchers/<path:code>/reconcile")
def reconcile_voucher(code: str) -> Response | tuple[Response, int]:
    """Ask RM for this voucher now and apply its answer; returns the run's counts and the voucher."""
    from .ops import voucher_with_history
    from .reconciliation import reconcile_codes

    runtime = current_runtime()
    try:
        client = runtime.rm_client()
    except RMNotConfigured as exc:
        return _error(503, "rm_not_configured", exc.message)
    summary = reconcile_codes(runtime.sessions, client, [code], concurrency=1, trigger="api")
    with runtime.sessions() as session:
        found = voucher_with_history(session, code)
    body = {
        "run_id": summary.run_id,
        "checked": summary.checked,
        "changed": summary.changed,
        "failed": summary.failed,
        "not_found": summary.not_found,
        "error": summary.error,
        "voucher": found,
    }
    return jsonify(body), (502 if summary.failed else 200)


@bp.get("/deliveries")
def deliveries() -> Response | tuple[Response, int]:
    """Recent callback deliveries, newest first, optionally by outcome and time."""
    from .ops import DELIVERY_FIELDS, list_deliveries, parse_since, row_dict

    try:
        since = parse_since(request.args["since"]) if request.args.get("since") else None
        limit = min(max(int(request.args.get("limit", 50)), 1), 500)
    except ValueError:
        return _error(400, "bad_request", "since is like 2h / 7d or an ISO time; limit is a whole number")
    with current_runtime().sessions() as session:
        rows = list_deliveries(session, outcomes=tuple(request.args.getlist("outcome")), since=since, limit=limit)
        items = [row_dict(d, DELIVERY_FIELDS) for d in rows]
    return jsonify({"items": items})




def _actions():  # noqa: ANN202
    from .actions import MerchantActions

    runtime = current_runtime()
    return MerchantActions(runtime.sessions, runtime.rm_client(), actor="ops-api")


_ACTION_STATUS = {"succeeded": 200, "failed": 422, "ambiguous": 502, "pending": 409}


def _run_action(run) -> tuple[Response, int]:  # noqa: ANN001
    """Run an action; answer with its outcome and a status saying how it ended."""
    from .actions import ActionInputError

    body = request.get_json(silent=True)
    if body is not None and not isinstance(body, dict):
        return _error(400, "bad_request", "the body must be a JSON object")
    body = body or {}
    request_id = body.get("requestId") or request.headers.get("Idempotency-Key")
    try:
        outcome = run(body, request_id)
    except ActionInputError as exc:
        return _error(400, "invalid_input", str(exc))
    except RMNotConfigured as exc:
        return _error(503, "rm_not_configured", exc.message)
    return jsonify(outcome.as_dict()), _ACTION_STATUS[outcome.status]


@bp.post("/vouchers/<path:code>/redeem")
def redeem_voucher(code: str) -> tuple[Response, int]:
    """Redeem a voucher for a member through RM; recorded at once."""
    return _run_action(lambda body, rid: _actions().redeem(
        code, country_code=str(body.get("countryCode", "")), phone_number=str(body.get("phoneNumber", "")),
        request_id=rid,
    ))


@bp.post("/vouchers/<path:code>/void")
def void_voucher(code: str) -> tuple[Response, int]:
    """Void (use) a voucher through RM; recorded at once."""
    return _run_action(lambda body, rid: _actions().void(code, used_at=body.get("usedAt"), request_id=rid))


@bp.post("/voucher-batches/<path:batch_key>/issue")
def issue_voucher(batch_key: str) -> tuple[Response, int]:
    """Issue the next voucher of a batch through RM; recorded at once."""
    return _run_action(lambda body, rid: _actions().issue(batch_key, request_id=rid))


@bp.post("/stamps")
def give_stamp() -> tuple[Response, int]:
    """Give a chop stamp by the card's QR code; recorded at once."""
    return _run_action(lambda body, rid: _actions().give_stamp(str(body.get("code", "")), request_id=rid))


# -- Stamps.co.id redemptions ---------------------------------------------------------------------

_STAMPS_STATUS = {"succeeded": 200, "failed": 422, "ambiguous": 502, "pending": 409}


def _run_stamps(  # noqa: ANN001
    run, *, offline: bool = False, statuses: dict[str, int] = _STAMPS_STATUS
) -> tuple[Response, int]:
    """Run a Stamps operation with the JSON body; answer with its outcome and a status saying how it ended."""
    from .stamps_client import StampsNotConfigured
    from .stamps_ledger import StampsConflict, StampsInputError, StampsLedger, current_stamps_ledger

    body = request.get_json(silent=True)
    if body is not None and not isinstance(body, dict):
        return _error(400, "bad_request", "the body must be a JSON object")
    body = body or {}
    request_id = body.get("request_id") or body.get("requestId") or request.headers.get("Idempotency-Key")
    try:
        ledger = StampsLedger(current_runtime().sessions, None, actor="ops-api") if offline else \
            current_stamps_ledger("ops-api")
        outcome = run(ledger, body, request_id)
    except StampsConflict as exc:
        return _error(409, "conflict", str(exc))
    except StampsInputError as exc:
        return _error(400, "invalid_input", str(exc))
    except StampsNotConfigured as exc:
        return _error(503, "stamps_not_configured", exc.message)
    return jsonify(outcome.as_dict()), statuses[outcome.status]


def _common(body: dict) -> dict:
    return {"user": body.get("user"), "store": body.get("store"), "invoice_number": body.get("invoice_number"),
            "channel": body.get("channel")}


@bp.get("/stamps/redemptions")
def stamps_redemptions() -> Response | tuple[Response, int]:
    """Recorded Stamps redemptions by store, member, status or invoice, a page at a time."""
    from .stamps_ledger import list_redemptions

    try:
        limit = min(max(int(request.args.get("limit", 50)), 1), 500)
        after = int(request.args.get("cursor", 0))
        store = int(request.args["store"]) if request.args.get("store") else None
    except ValueError:
        return _error(400, "bad_request", "store, limit and cursor must be whole numbers")
    with current_runtime().sessions() as session:
        items, cursor = list_redemptions(
            session, store=store, user=request.args.get("user"), status=request.args.get("status"),
            invoice=request.args.get("invoice_number"), limit=limit, after=after,
        )
    return jsonify({"items": items, "next_cursor": cursor})


@bp.post("/stamps/redemptions/reward")
def stamps_redeem_reward() -> tuple[Response, int]:
    """Redeem a reward through Stamps; recorded at once."""
    return _run_stamps(lambda ledger, body, rid: ledger.redeem_reward(
        **_common(body), reward=body.get("reward"), stamps=body.get("stamps"), qty=body.get("qty"),
        extra_data=body.get("extra_data"), request_id=rid,
    ))


@bp.post("/stamps/redemptions/voucher")
def stamps_redeem_voucher() -> tuple[Response, int]:
    """Redeem a member's voucher through Stamps; recorded at once."""
    return _run_stamps(lambda ledger, body, rid: ledger.redeem_voucher(
        **_common(body), voucher=body.get("voucher"), extra_data=body.get("extra_data"), request_id=rid,
    ))


@bp.post("/stamps/redemptions/deduct")
def stamps_deduct() -> tuple[Response, int]:
    """Deduct a value from a dynamic-value voucher through Stamps; recorded at once."""
    return _run_stamps(lambda ledger, body, rid: ledger.deduct(
        **_common(body), voucher=body.get("voucher"), value=body.get("value"), extra_data=body.get("extra_data"),
        request_id=rid,
    ))


@bp.post("/stamps/redemptions/by-code")
def stamps_by_code() -> tuple[Response, int]:
    """Redeem a voucher by its code through Stamps; recorded at once."""
    return _run_stamps(lambda ledger, body, rid: ledger.redeem_by_code(
        **_common(body), voucher_code=body.get("voucher_code"), voucher_template=body.get("voucher_template"),
        request_id=rid,
    ))


@bp.post("/stamps/redemptions/promo")
def stamps_promo() -> tuple[Response, int]:
    """Redeem a promo code through Stamps; recorded at once."""
    return _run_stamps(lambda ledger, body, rid: ledger.redeem_promo(
        **_common(body), promo_code=body.get("promo_code"), request_id=rid,
    ))


@bp.post("/stamps/redemptions/many")
def stamps_redeem_many() -> tuple[Response, int]:
    """Redeem several rewards in one Stamps call; recorded at once."""
    return _run_stamps(lambda ledger, body, rid: ledger.redeem_many(
        **_common(body), rewards=body.get("rewards"), request_id=rid,
    ))


@bp.post("/stamps/redemptions/cancel")
def stamps_cancel() -> tuple[Response, int]:
    """Cancel a Stamps redemption by its Stamps id; the ledger row flips to Canceled once."""
    return _run_stamps(lambda ledger, body, rid: ledger.cancel(
        body.get("id"), create_replacement_voucher=body.get("create_replacement_voucher") is True, request_id=rid,
    ))


@bp.post("/stamps/authorize")
def stamps_authorize() -> tuple[Response, int]:
    """Authorise a redemption's request id with the member's PIN (never stored)."""
    return _run_stamps(lambda ledger, body, rid: ledger.authorize(
        user=body.get("user"), pin=body.get("pin"), request_id=body.get("request_id"), timeout=body.get("timeout"),
    ))


@bp.post("/stamps/resolve")
def stamps_resolve() -> tuple[Response, int]:
    """Settle an ambiguous operation after checking the Stamps dashboard."""
    def run(ledger, body, rid):  # noqa: ANN001, ANN202
        ids = body.get("redemption_ids") or []
        if not isinstance(ids, list):
            from .stamps_ledger import StampsInputError

            raise StampsInputError("redemption_ids must be a list of Stamps redemption ids")
        return ledger.resolve(str(rid or ""), redemption_ids=ids, not_done=body.get("not_done") is True)

    # Settled either way: as done (succeeded) or as not done (failed).
    return _run_stamps(run, offline=True, statuses={**_STAMPS_STATUS, "failed": 200})

"""The RM voucher callback endpoint: verify, parse, hand to the delivery service, map to a response."""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Mapping

from flask import Blueprint, Response, current_app, jsonify, request

from . import deliveries
from .db import is_unavailable
from .deliveries import MAX_BODY_BYTES, TRUNCATED_BODY_BYTES, IncomingCallback, NonceReused
from .metrics import CALLBACKS, REJECTIONS_NOT_STORED, labelled
from .models import DeliveryOutcome
from .runtime import current_runtime
from .signature import PlainJson, SignatureError, load_json_body, verify_signed
from .snapshot import SnapshotError, VoucherSnapshot, snapshot_from_item, voucher_item_from_envelope

log = logging.getLogger(__name__)
bp = Blueprint("webhook", __name__)
# The signature headers' keys in the WSGI environ (request.headers looks each name up the long way).
_SIGNATURE_KEY, _NONCE_KEY, _TIMESTAMP_KEY = map(deliveries.environ_key, ("X-Signature", "X-Nonce-Str", "X-Timestamp"))


def _read_body() -> tuple[bytes, bool]:
    """Read at most the allowed size (plus one byte to detect more) without buffering a huge body."""
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        return request.stream.read(TRUNCATED_BODY_BYTES), True
    body = request.stream.read(MAX_BODY_BYTES + 1)
    return body, len(body) > MAX_BODY_BYTES


def _incoming(body: bytes, *, complete: bool) -> IncomingCallback:
    """This request as received: ``body`` and what we keep of its headers and origin."""
    return IncomingCallback(
        body=body,
        headers=deliveries.pick_headers(request.environ),
        remote_addr=request.remote_addr,
        content_type=request.content_type,
        complete=complete,
    )


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def _voucher_item(body: bytes) -> tuple[Mapping[str, Any], PlainJson | None]:
    """Just enough parsing to tell a voucher callback from something else (400): JSON, envelope, a code.

    The full snapshot is built only once the signature holds, so a forged flood costs no more than
    this. The parse is handed on to the signature check (load_json_body), which then need not parse again.
    """
    try:
        document, parsed = load_json_body(body.decode("utf-8"))
    except RecursionError:
        raise SnapshotError("body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError):
        raise SnapshotError("body is not UTF-8 JSON") from None
    item = voucher_item_from_envelope(document)
    if not isinstance(item, Mapping):
        raise SnapshotError("voucher object must be a JSON object")
    code = item.get("code")
    if not isinstance(code, str) or not code.strip():
        raise SnapshotError("voucher object has no code")
    return item, parsed


def _malformed(incoming: IncomingCallback, exc: Exception, voucher_code: str | None = None) -> tuple[Response, int]:
    """400 for a body that is not a usable voucher callback; input we did not foresee is logged as such."""
    if isinstance(exc, SnapshotError):
        error = detail = str(exc)
    else:
        log.exception("unexpected error parsing a callback body")
        detail = "body could not be parsed as an RM voucher callback"
        error = f"{detail}: {type(exc).__name__}"
    return _reject(incoming, 400, DeliveryOutcome.REJECTED_MALFORMED, error, {"error": "malformed", "detail": detail},
                   voucher_code=voucher_code)


def _reject(
    incoming: IncomingCallback,
    http_status: int,
    outcome: DeliveryOutcome,
    error: str,
    payload: dict,
    voucher_code: str | None = None,
) -> tuple[Response, int]:
    runtime = current_runtime()
    labelled(CALLBACKS, outcome.value).inc()
    if not runtime.rejection_limiter.allow(incoming.remote_addr):
        REJECTIONS_NOT_STORED.inc()
        return jsonify(payload), http_status
    try:
        with runtime.sessions.begin() as session:
            delivery_id = deliveries.record_rejection(
                session, incoming, outcome=outcome, http_status=http_status, error=error, voucher_code=voucher_code
            )
        log.info("callback rejected %s delivery=%s: %s", http_status, delivery_id, error, extra={"delivery_id": delivery_id})
    except Exception:  # noqa: BLE001 - the answer to a bad request must not depend on the log write
        log.exception("could not record a rejected callback (%s)", outcome.value)
    return jsonify(payload), http_status


@bp.post("/webhooks/revenuemonster/voucher")
def voucher_callback() -> tuple[Response, int]:
    """Receive one RM voucher status callback; 200 only once its effect is committed."""
    runtime = current_runtime()
    try:
        body, too_large = _read_body()
    except (BlockingIOError, TimeoutError):
        # The worker's socket timeout (WEB_CLIENT_TIMEOUT_SECONDS, a kernel SO_RCVTIMEO: EAGAIN):
        # the body stopped coming. What had arrived is lost inside the reader, so the row keeps
        # the headers and an empty body.
        return _reject(
            _incoming(b"", complete=False), 400, DeliveryOutcome.REJECTED_MALFORMED,
            f"request body incomplete: nothing more for {runtime.settings.web_client_timeout_seconds:g} s",
            {"error": "malformed", "detail": "request body incomplete"},
        )
    incoming = _incoming(body, complete=not too_large)
    if too_large:
        return _reject(
            incoming, 413, DeliveryOutcome.REJECTED_MALFORMED, f"body larger than {MAX_BODY_BYTES} bytes",
            {"error": "too_large", "detail": f"body must be at most {MAX_BODY_BYTES} bytes"},
        )
    if not _is_json(request.mimetype):
        return _reject(
            incoming, 415, DeliveryOutcome.REJECTED_MALFORMED, f"content type {request.mimetype or 'missing'!r}",
            {"error": "unsupported_media_type", "detail": "Content-Type must be application/json"},
        )
    try:
        item, parsed = _voucher_item(body)
    except Exception as exc:  # noqa: BLE001 - whatever the parser trips on is the sender's fault
        return _malformed(incoming, exc)

    # What the body claims, for a rejected delivery's row: not validated yet, so bounded and made storable
    # (lone surrogates and NUL cannot be written to PostgreSQL text).
    claimed_code = item["code"].strip()[:128].encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")
    if runtime.server_public_key is not None:
        try:
            verify_signed(
                runtime.server_public_key,
                body=body,
                method="post",
                signature=request.environ.get(_SIGNATURE_KEY),
                nonce=request.environ.get(_NONCE_KEY),
                timestamp=request.environ.get(_TIMESTAMP_KEY),
                max_age_seconds=runtime.settings.signature_max_age_seconds,
                parsed=parsed,
            )
        except SignatureError as exc:
            return _reject(
                incoming, 401, DeliveryOutcome.REJECTED_SIGNATURE, str(exc), {"error": "invalid_signature"},
                voucher_code=claimed_code,
            )
        except Exception as exc:  # noqa: BLE001 - whatever breaks verification, the callback is not proven
            log.exception("unexpected error verifying a callback signature")
            return _reject(
                incoming, 401, DeliveryOutcome.REJECTED_SIGNATURE, f"verification failed: {type(exc).__name__}",
                {"error": "invalid_signature"}, voucher_code=claimed_code,
            )

    try:
        snapshot = snapshot_from_item(item)
    except Exception as exc:  # noqa: BLE001 - a signed but unusable voucher object is still a 400
        return _malformed(incoming, exc, claimed_code)

    try:
        result = runtime.callbacks.submit(incoming, snapshot)
    except NonceReused as exc:
        return _reject(
            incoming, 401, DeliveryOutcome.REJECTED_SIGNATURE, str(exc), {"error": "invalid_signature"},
            voucher_code=snapshot.code,
        )
    except Exception as exc:  # noqa: BLE001 - every failure must map to a status RM will retry
        return _failure(incoming, snapshot, exc)

    # An accepted callback is a row in webhook_deliveries already; its log line, at INFO, cost ~80 us
    # of CPU a callback under load and 11-26 % of the saturated throughput (docs/performance.md).
    # What is worth a look (a redelivery, a stale or otherwise unusual outcome) stays at INFO.
    log.log(
        logging.DEBUG if result.status is DeliveryOutcome.ACCEPTED else logging.INFO,
        "callback %s code=%s delivery=%s attempts=%s",
        result.status.value, snapshot.code, result.delivery_id, result.attempts,
        extra={"voucher_code": snapshot.code, "delivery_id": result.delivery_id},
    )
    labelled(CALLBACKS, result.status.value).inc()
    return current_app.response_class(_status_json(result.status.value), mimetype="application/json"), 200


@functools.cache
def _status_json(status: str) -> bytes:
    """The body jsonify would write for {"status": ...}, made once per status instead of on every callback."""
    return json.dumps({"status": status}, separators=(",", ":")).encode("utf-8") + b"\n"


def _failure(incoming: IncomingCallback, snapshot: VoucherSnapshot, exc: Exception) -> tuple[Response, int]:
    """Nothing was committed. Database down: 503. Our bug: keep the delivery as `error`, answer 500."""
    runtime = current_runtime()
    if is_unavailable(exc):
        log.warning("database unavailable for callback: %s", type(exc).__name__, extra={"voucher_code": snapshot.code})
        labelled(CALLBACKS, "unavailable").inc()
        return jsonify({"error": "unavailable"}), 503
    log.exception("applying callback failed", extra={"voucher_code": snapshot.code})
    try:
        deliveries.record_failure(runtime.sessions, incoming, snapshot, f"{type(exc).__name__}: {exc}")
    except Exception as second:  # noqa: BLE001
        log.warning("could not record the failed callback: %s", type(second).__name__)
        labelled(CALLBACKS, "unavailable").inc()
        return jsonify({"error": "unavailable"}), 503
    labelled(CALLBACKS, DeliveryOutcome.ERROR.value).inc()
    return jsonify({"error": "internal", "detail": "the callback was stored and will be retried"}), 500

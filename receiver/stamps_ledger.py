"""Stamps.co.id redemptions, run through Stamps and recorded in the same ledger at once.

The same guarantees as the RM merchant actions (actions.py), for a second provider:

* every call is a ``stamps_operations`` row, committed as ``pending`` before anything is sent, with
  a unique request id (the caller's, or a generated one): a request id never produces two
  redemptions, and neither does a store + invoice number (``invoice_key``);
* a redemption Stamps made becomes a ``stamps_redemptions`` row (status Created) plus a
  ``stamps_redemption_events`` row, committed together with the operation's result; a cancellation
  flips the row to Canceled and adds one more event, once;
* nothing that may have reached Stamps is re-sent blindly. Stamps has no idempotency key and no way
  to look a redemption up, so a redemption whose answer was lost (timeout after sending, 5xx,
  unreadable 200) is left ``ambiguous``, keeps its request id and invoice, and is resolved by an
  operator after checking Stamps' dashboard (``flask --app receiver stamps resolve``). A lost
  cancel *is* checked, by asking again: Stamps refuses to cancel a canceled redemption, so a
  second cancel either does it or proves it was done;
* an operation Stamps refused (4xx: nothing happened) frees its invoice, and may be run again
  under the same request id;
* the PIN of an authorisation is never stored or logged, and the token never reaches the database.

The service commits only its own operation transactions (like actions.py); ``record_redemption``
and ``record_cancellation`` never commit, and are what seeding and replays use too.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import (
    STAMPS_REDEMPTION_KINDS,
    StampsOperation,
    StampsRedemption,
    StampsRedemptionEvent,
    utcnow,
)
from .ops import keyset_page
from .stamps_client import (
    StampsAmbiguous,
    StampsClient,
    StampsError,
    StampsInvalidPin,
    StampsUnavailable,
    attempts_left,
)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PIN = re.compile(r"^\d{6}$")
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]+$")
PIN_MASK = "******"
# A pending operation younger than this may still be waiting for Stamps' answer: not resolvable yet.
PENDING_GRACE = timedelta(minutes=5)

REDEMPTION_FIELDS = (
    "id", "stamps_id", "kind", "status", "request_id", "user_identifier", "store", "invoice_number", "channel",
    "reward_id", "reward_code", "reward_name", "voucher_id", "voucher_code", "voucher_template", "promo_code", "qty",
    "stamps_used", "value_deducted", "membership_stamps_after", "operation_id", "redeemed_at", "canceled_at",
)


class StampsInputError(ValueError):
    """The operation's input is invalid; nothing was sent to Stamps."""


class StampsConflict(StampsInputError):
    """The request id or the store + invoice is taken by another operation, or there is nothing left to do."""


# -- outcomes ---------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def redemption_dict(row: StampsRedemption) -> dict[str, Any]:
    """A ledger row, JSON-ready."""
    return {name: _jsonable(getattr(row, name)) for name in REDEMPTION_FIELDS}


@dataclass
class StampsOutcome:
    """What an operation did; ``replayed`` says why it was not sent (an earlier run had the request id or invoice)."""

    operation_id: int
    request_id: str
    kind: str
    status: str
    decision: str | None
    http_status: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    errors: dict[str, str] = field(default_factory=dict)
    pin_attempts_left: int | None = None
    redemptions: list[dict[str, Any]] = field(default_factory=list)
    response: dict[str, Any] | None = None
    replayed: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (for the ops API)."""
        return {
            "operation_id": self.operation_id, "request_id": self.request_id, "kind": self.kind,
            "status": self.status, "decision": self.decision, "stamps_http_status": self.http_status,
            "error_code": self.error_code, "error_message": self.error_message, "errors": self.errors,
            "pin_attempts_left": self.pin_attempts_left, "redemptions": self.redemptions,
            "response": self.response, "replayed": self.replayed is not None,
        }

    def line(self) -> str:
        """One human line for the CLI."""
        head = f"stamps {self.kind} {self.status} (operation #{self.operation_id}, request id {self.request_id})"
        if self.replayed:
            head += f" [already run earlier under this {self.replayed}: not sent again]"
        if self.status == "failed" and self.http_status:
            head += f": Stamps said HTTP {self.http_status} {self.error_code}"
            if self.error_message:
                head += f" - {self.error_message}"
            if self.decision:
                head += f" ({self.decision})"
        elif self.status == "failed":
            head += f": {self.error_message or self.error_code}" + (f" ({self.decision})" if self.decision else "")
        elif self.decision:
            head += f": {self.decision}"
        return head


def _outcome(session: Session, op: StampsOperation, *, replayed: str | None = None) -> StampsOutcome:
    if op.kind == "cancel":
        rows = session.scalars(select(StampsRedemption).where(StampsRedemption.stamps_id == int(op.target))).all()
    else:
        rows = session.scalars(
            select(StampsRedemption).where(StampsRedemption.operation_id == op.id).order_by(StampsRedemption.id)
        ).all()
    errors = json.loads(op.error_fields) if op.error_fields else {}
    left = None
    if op.error_code == "invalid_pin" or "pin" in errors:
        left = attempts_left(errors.get("pin") or op.error_message or "")
    return StampsOutcome(
        operation_id=op.id, request_id=op.request_id, kind=op.kind, status=op.status, decision=op.decision,
        http_status=op.http_status, error_code=op.error_code, error_message=op.error_message, errors=errors,
        pin_attempts_left=left, redemptions=[redemption_dict(r) for r in rows],
        response=json.loads(op.response) if op.response else None, replayed=replayed,
    )


# -- input checks ---------------------------------------------------------------------------------


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool):
        raise StampsInputError(f"{name} must be a whole number, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise StampsInputError(f"{name} must be a whole number, got {value!r}") from None
    if isinstance(value, float) and value != number:
        raise StampsInputError(f"{name} must be a whole number, got {value!r}")
    if number < 0 or (number == 0 and not allow_zero) or number > 2**62:
        raise StampsInputError(f"{name} must be {'0 or more' if allow_zero else 'greater than 0'}, got {value!r}")
    return number


def _optional(name: str, value: Any, *, allow_zero: bool = False) -> int | None:
    return None if value is None or value == "" else _positive(name, value, allow_zero=allow_zero)


def _text(name: str, value: Any, limit: int, *, required: bool = True) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise StampsInputError(f"{name} is required")
        return None
    text = str(value).strip()
    if len(text) > limit or not _PRINTABLE.match(text):
        raise StampsInputError(f"{name} must be 1-{limit} printable characters")
    return text


def _extra_data(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise StampsInputError("extra_data must be a JSON object, e.g. '{\"discount\": \"10%\"}'") from None
    if not isinstance(value, dict):
        raise StampsInputError("extra_data must be a JSON object")
    if len(json.dumps(value)) > 4096:
        raise StampsInputError("extra_data is larger than 4 KiB")
    return value


def _common(user: Any, store: Any, invoice_number: Any, channel: Any, *, invoice_required: bool = False) -> dict:
    return {
        "user": _text("user", user, 255),
        "store": _positive("store", store),
        "invoice_number": _text("invoice_number", invoice_number, 128, required=invoice_required),
        "channel": _optional("channel", channel, allow_zero=True),
    }


def _compact(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def _params_json(body: dict[str, Any]) -> str:
    masked = {k: (PIN_MASK if k == "pin" else v) for k, v in body.items()}
    return json.dumps(masked, sort_keys=True, ensure_ascii=False)


def _same_request(stored: str, params: str) -> bool:
    """Equal bodies, apart from the request id they carry."""
    a, b = json.loads(stored), json.loads(params)
    a.pop("request_id", None)
    b.pop("request_id", None)
    return a == b


# -- the ledger's writers (never commit) ----------------------------------------------------------


def _fields_json(exc: StampsError) -> str | None:
    return json.dumps(exc.errors, sort_keys=True) if exc.errors else None


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        return None


def _str_or_none(value: Any, limit: int) -> str | None:
    return None if value is None or value == "" else str(value)[:limit]


def record_redemption(
    session: Session,
    *,
    stamps_id: int,
    kind: str,
    user_identifier: str,
    store: int,
    operation_id: int | None = None,
    request_id: str | None = None,
    invoice_number: str | None = None,
    channel: int | None = None,
    reward_id: int | None = None,
    reward_code: str | None = None,
    reward_name: str | None = None,
    voucher_id: int | None = None,
    voucher_code: str | None = None,
    voucher_template: int | None = None,
    promo_code: str | None = None,
    qty: int | None = None,
    stamps_used: int | None = None,
    value_deducted: int | None = None,
    membership_stamps_after: int | None = None,
    raw_request: str | None = None,
    raw_response: str | None = None,
    detail: str | None = None,
    now: datetime | None = None,
) -> tuple[StampsRedemption, bool]:
    """Record a redemption Stamps made (status Created, with its Created event); (row, created).

    Hearing of the same Stamps redemption id again adds nothing.
    """
    existing = session.scalars(
        select(StampsRedemption).where(StampsRedemption.stamps_id == stamps_id).with_for_update()
    ).one_or_none()
    if existing is not None:
        return existing, False
    now = now or utcnow()
    row = StampsRedemption(
        stamps_id=stamps_id, kind=kind, user_identifier=user_identifier[:255], store=store, operation_id=operation_id,
        request_id=request_id, invoice_number=invoice_number, channel=channel, reward_id=reward_id,
        reward_code=reward_code, reward_name=reward_name, voucher_id=voucher_id, voucher_code=voucher_code,
        voucher_template=voucher_template, promo_code=promo_code, qty=qty, stamps_used=stamps_used,
        value_deducted=value_deducted, status="Created", membership_stamps_after=membership_stamps_after,
        raw_request=raw_request, raw_response=raw_response, redeemed_at=now, updated_at=now,
    )
    session.add(row)
    session.flush()
    session.add(StampsRedemptionEvent(
        redemption_id=row.id, operation_id=operation_id, from_status=None, to_status="Created",
        membership_stamps=membership_stamps_after, recorded_at=now, detail=detail, payload=raw_response,
    ))
    session.flush()
    return row, True


def record_cancellation(
    session: Session,
    stamps_id: int,
    *,
    operation_id: int | None = None,
    membership_stamps: int | None = None,
    raw_response: str | None = None,
    detail: str | None = None,
    now: datetime | None = None,
) -> tuple[StampsRedemption | None, bool]:
    """Flip a recorded redemption to Canceled and add its event, once; (row or None if unknown here, changed)."""
    row = session.scalars(
        select(StampsRedemption).where(StampsRedemption.stamps_id == stamps_id).with_for_update()
    ).one_or_none()
    if row is None or row.status == "Canceled":
        return row, False
    now = now or utcnow()
    row.status, row.canceled_at, row.updated_at = "Canceled", now, now
    session.add(StampsRedemptionEvent(
        redemption_id=row.id, operation_id=operation_id, from_status="Created", to_status="Canceled",
        membership_stamps=membership_stamps, recorded_at=now, detail=detail, payload=raw_response,
    ))
    session.flush()
    return row, True


def redemption_rows(kind: str, body: dict[str, Any], response: dict[str, Any]) -> list[dict[str, Any]]:
    """The ledger fields of each redemption in Stamps' answer (``redemption`` may be one object or a list)."""
    found = response.get("redemption")
    items = [i for i in (found if isinstance(found, list) else [found]) if isinstance(i, dict) and "id" in i]
    membership = response.get("membership") if isinstance(response.get("membership"), dict) else {}
    customer = response.get("customer") if isinstance(response.get("customer"), dict) else {}
    stamps_after = _int_or_none(membership.get("stamps"))
    if stamps_after is None:
        left = customer.get("stamps_remaining") if customer else membership.get("stamps_remaining")
        stamps_after = _int_or_none(left)
    rewards = body.get("rewards") if isinstance(body.get("rewards"), list) else []
    rows = []
    for i, item in enumerate(items):
        reward = item.get("reward") if isinstance(item.get("reward"), dict) else response.get("reward")
        reward = reward if isinstance(reward, dict) else {}
        voucher = item.get("voucher") if isinstance(item.get("voucher"), dict) else response.get("voucher")
        voucher = voucher if isinstance(voucher, dict) else {}
        row: dict[str, Any] = {
            "stamps_id": int(item["id"]),
            "user_identifier": body["user"],
            "store": body["store"],
            "invoice_number": body.get("invoice_number"),
            "channel": body.get("channel"),
            "stamps_used": _int_or_none(item.get("stamps_used")),
            "membership_stamps_after": stamps_after,
            "reward_name": _str_or_none(item["reward"] if isinstance(item.get("reward"), str) else reward.get("name"),
                                        255),
        }
        if kind == "redeem_reward":
            row.update(reward_id=body["reward"], reward_code=_str_or_none(reward.get("code"), 128), qty=body.get("qty"))
        elif kind in ("redeem_voucher", "deduct_value"):
            row.update(voucher_id=body["voucher"], voucher_code=_str_or_none(voucher.get("code"), 128),
                       value_deducted=body.get("value"))
        elif kind == "by_voucher_code":
            row.update(voucher_code=body["voucher_code"], voucher_template=body["voucher_template"])
        elif kind == "promo_code":
            row.update(promo_code=body["promo_code"])
        elif kind == "redeem_many":
            if len(items) == len(rewards):
                asked = rewards[i]
                row.update(reward_code=_str_or_none(asked.get("code"), 128), qty=asked.get("qty"),
                           request_id=asked.get("request_id"))
            else:
                # One redemption for several rewards: keep every code.
                row.update(reward_code=_str_or_none(",".join(str(r.get("code")) for r in rewards), 128),
                           qty=sum(int(r.get("qty") or 1) for r in rewards))
            row.update(reward_id=_int_or_none(reward.get("id")))
        rows.append(row)
    return rows


# -- the service ----------------------------------------------------------------------------------

# A verifier says, after an ambiguous failure, whether the operation took effect:
# ("done_before", answer-or-None) / ("done_now", answer) / ("unknown", None).
Verdict = tuple[str, "dict[str, Any] | None"]


class StampsLedger:
    """Runs Stamps operations and records them; one instance per caller is fine (it holds no state).

    ``client`` may be None for ``resolve``, which only touches the ledger.
    """

    def __init__(self, factory: sessionmaker[Session], client: StampsClient | None, *, actor: str) -> None:
        self.factory = factory
        self.client = client
        self.actor = actor[:128]

    # -- the eight operations ---------------------------------------------------------------------

    def redeem_reward(
        self, *, user: Any, store: Any, reward: Any, invoice_number: Any = None, channel: Any = None,
        stamps: Any = None, qty: Any = None, extra_data: Any = None, request_id: str | None = None,
    ) -> StampsOutcome:
        """Adding Reward Redemption (``stamps`` for a flexible reward, ``qty``, ``extra_data``)."""
        body = _common(user, store, invoice_number, channel)
        body.update(reward=_positive("reward", reward), stamps=_optional("stamps", stamps),
                    qty=_optional("qty", qty), extra_data=_extra_data(extra_data), request_id=request_id)
        return self._redeem("redeem_reward", body, f"reward {body['reward']}", self.client.redeem_reward)

    def redeem_voucher(
        self, *, user: Any, store: Any, voucher: Any, invoice_number: Any = None, channel: Any = None,
        extra_data: Any = None, request_id: str | None = None,
    ) -> StampsOutcome:
        """Adding Voucher Redemption."""
        body = _common(user, store, invoice_number, channel)
        body.update(voucher=_positive("voucher", voucher), extra_data=_extra_data(extra_data), request_id=request_id)
        return self._redeem("redeem_voucher", body, f"voucher {body['voucher']}", self.client.redeem_voucher)

    def deduct(
        self, *, user: Any, store: Any, voucher: Any, value: Any, invoice_number: Any = None, channel: Any = None,
        extra_data: Any = None, request_id: str | None = None,
    ) -> StampsOutcome:
        """Deduct Voucher Value (whole units of the voucher's currency)."""
        body = _common(user, store, invoice_number, channel)
        body.update(voucher=_positive("voucher", voucher), value=_positive("value", value),
                    extra_data=_extra_data(extra_data), request_id=request_id)
        return self._redeem(
            "deduct_value", body, f"{body['value']} from voucher {body['voucher']}", self.client.deduct_voucher_value
        )

    def redeem_by_code(
        self, *, user: Any, store: Any, voucher_code: Any, voucher_template: Any, invoice_number: Any = None,
        channel: Any = None, request_id: str | None = None,
    ) -> StampsOutcome:
        """Adding Redemption by Voucher Code."""
        body = _common(user, store, invoice_number, channel)
        body.update(voucher_code=_text("voucher_code", voucher_code, 128),
                    voucher_template=_positive("voucher_template", voucher_template), request_id=request_id)
        return self._redeem(
            "by_voucher_code", body, f"voucher code {body['voucher_code']}", self.client.redeem_by_voucher_code
        )

    def redeem_promo(
        self, *, user: Any, store: Any, promo_code: Any, invoice_number: Any, channel: Any = None,
        request_id: str | None = None,
    ) -> StampsOutcome:
        """Adding Promo Code Redemption (an invoice number is required)."""
        body = _common(user, store, invoice_number, channel, invoice_required=True)
        body.update(promo_code=_text("promo_code", promo_code, 128), request_id=request_id)
        return self._redeem("promo_code", body, f"promo code {body['promo_code']}", self.client.redeem_promo_code)

    def redeem_many(
        self, *, user: Any, store: Any, rewards: Any, invoice_number: Any = None, channel: Any = None,
        request_id: str | None = None,
    ) -> StampsOutcome:
        """Multiple Reward Redemption: ``rewards`` = [{code, qty?, stamps?, request_id?}, ...]."""
        if not isinstance(rewards, list) or not rewards or len(rewards) > 50:
            raise StampsInputError("rewards must be a list of 1-50 rewards ({code, qty, stamps, request_id})")
        checked = []
        for i, item in enumerate(rewards):
            if not isinstance(item, dict):
                raise StampsInputError(f"rewards[{i}] must be an object with code, qty, stamps, request_id")
            code = item.get("code")
            code = _positive(f"rewards[{i}].code", code) if isinstance(code, int) or str(code).isdigit() else \
                _text(f"rewards[{i}].code", code, 128)
            rid = item.get("request_id")
            if rid is not None and not _REQUEST_ID.match(str(rid)):
                raise StampsInputError(f"rewards[{i}].request_id must be 1-128 letters, digits or . _ : -")
            checked.append(_compact({"code": code, "qty": _optional(f"rewards[{i}].qty", item.get("qty")),
                                     "stamps": _optional(f"rewards[{i}].stamps", item.get("stamps")),
                                     "request_id": rid}))
        body = _common(user, store, invoice_number, channel)
        body.update(rewards=checked)
        codes = ", ".join(str(r["code"]) for r in checked)
        # The rewards carry their own (PIN) request ids; the operation's request id stays ours.
        return self._redeem("redeem_many", body, f"rewards {codes}"[:200], self.client.redeem_multiple_rewards,
                            request_id=request_id)

    def cancel(
        self, redemption_id: Any, *, create_replacement_voucher: bool = False, request_id: str | None = None
    ) -> StampsOutcome:
        """Cancel a redemption (optionally with a replacement voucher); the ledger row flips to Canceled once."""
        stamps_id = _positive("redemption id", redemption_id)
        body = {"id": stamps_id, "create_replacement_voucher": True if create_replacement_voucher else None}

        def call() -> dict[str, Any]:
            return self.client.cancel_redemption(stamps_id, create_replacement_voucher=create_replacement_voucher)

        def verify() -> Verdict:
            # Stamps refuses to cancel a canceled redemption: asking again either cancels it now or proves it was.
            try:
                return "done_now", call()
            except StampsError as exc:
                said = f"{exc.code} {exc.message} {' '.join(exc.errors.values())}".lower()
                if exc.http_status == 400 and ("already_cancel" in said or "already cancel" in said):
                    return "done_before", None
                raise

        def before_sending(session: Session) -> str | None:
            row = session.scalars(select(StampsRedemption).where(StampsRedemption.stamps_id == stamps_id)).one_or_none()
            if row is not None and row.status == "Canceled":
                return f"redemption {stamps_id} was already canceled at {row.canceled_at.isoformat()}; not sent again"
            return None

        return self._run("cancel", _compact(body), str(stamps_id), request_id, call, verify, self._record_cancel,
                         before_sending=before_sending)

    def authorize(self, *, user: Any, pin: Any, request_id: Any, timeout: Any) -> StampsOutcome:
        """Authorize Redemption with the member's PIN; a wrong PIN's outcome carries ``pin_attempts_left``.

        Not idempotent (every attempt is recorded, without the PIN) and never re-sent: a lost answer
        may have used up an attempt.
        """
        if not isinstance(pin, str) or not _PIN.match(pin):
            raise StampsInputError("pin must be the member's 6-digit PIN")
        if not isinstance(request_id, str) or not _REQUEST_ID.match(request_id):
            raise StampsInputError("request id (the one the redemption will carry) must be 1-128 letters, digits "
                                   "or . _ : -")
        seconds = _positive("timeout", timeout)
        if seconds > 86400:
            raise StampsInputError("timeout must be at most 86400 seconds")
        body = {"user": _text("user", user, 255), "pin": pin, "request_id": request_id, "timeout": seconds}

        def call() -> dict[str, Any]:
            answer = self.client.authorize(user=body["user"], pin=pin, request_id=request_id, timeout=seconds)
            if str(answer.get("status", "")).lower() != "ok":
                raise StampsError("NOT_OK", f"Stamps did not say ok: {json.dumps(answer)[:200]}", 200)
            return answer

        return self._run("authorize", body, f"request {request_id} for {body['user']}"[:255], request_id, call, None,
                         None, idempotent=False)

    def resolve(
        self, request_id: str, *, redemption_ids: list[int] | None = None, not_done: bool = False
    ) -> StampsOutcome:
        """Settle an ambiguous (or stuck pending) operation after checking Stamps' dashboard.

        ``not_done``: Stamps shows nothing, the operation becomes failed and its invoice free.
        Otherwise it happened: a redemption's Stamps ids are recorded (``redemption_ids``), a cancel
        is recorded as done.
        """
        if not_done == bool(redemption_ids):
            raise StampsInputError("say what Stamps shows: --redemption-id ID (repeatable) or --not-done, not both")
        with self.factory.begin() as session:
            op = session.scalars(
                select(StampsOperation).where(StampsOperation.idempotency_key == request_id).with_for_update()
            ).one_or_none()
            if op is None:
                raise StampsInputError(f"no Stamps operation with request id {request_id!r}")
            if op.status not in ("ambiguous", "pending"):
                raise StampsConflict(f"operation #{op.id} ({op.kind}) is {op.status}: nothing to resolve")
            if op.status == "pending" and utcnow() - op.created_at < PENDING_GRACE:
                raise StampsConflict(f"operation #{op.id} started less than {PENDING_GRACE} ago and may still be "
                                     "waiting for Stamps: try again later")
            who = f"resolved by {self.actor}"
            op.finished_at = utcnow()
            if not_done:
                op.status, op.invoice_key = "failed", None
                op.decision = f"{who}: Stamps shows it did not happen; the invoice is free again"
            elif op.kind == "cancel":
                if [int(i) for i in redemption_ids or []] != [int(op.target)]:
                    raise StampsInputError(f"operation #{op.id} canceled redemption {op.target}: pass that id")
                record_cancellation(session, int(op.target), operation_id=op.id, detail=who)
                op.status, op.decision = "succeeded", f"{who}: Stamps shows the redemption canceled"
            elif op.kind in STAMPS_REDEMPTION_KINDS:
                ids = [_positive("redemption id", i) for i in redemption_ids or []]
                body = json.loads(op.params)
                items = [{"id": i} for i in ids]
                rows = redemption_rows(op.kind, body, {"redemption": items if len(items) > 1 else items[0]})
                for row in rows:
                    row.setdefault("request_id", None)
                    row["request_id"] = row["request_id"] or op.request_id
                    record_redemption(session, kind=op.kind, operation_id=op.id, raw_request=op.params, detail=who,
                                      **row)
                op.status = "succeeded"
                op.decision = f"{who}: Stamps shows redemption(s) {', '.join(map(str, ids))}"
            else:
                raise StampsConflict(f"{op.kind} operations cannot be resolved this way")
            session.flush()
            return _outcome(session, op)

    # -- the common path ------------------------------------------------------------------------

    def _redeem(self, kind: str, body: dict[str, Any], what: str, send: Callable[..., dict[str, Any]],
                *, request_id: str | None = None) -> StampsOutcome:
        # The caller's request id is the PIN-authorised one Stamps expects; a generated one stays ours.
        rid = body.pop("request_id", None) if request_id is None else request_id
        if rid is not None and kind != "redeem_many":
            body["request_id"] = rid
        body = _compact(body)
        target = f"{what} for {body['user']} at store {body['store']}"[:255]
        return self._run(kind, body, target, rid, lambda: send(**body), None, self._record_redemptions)

    def _start(self, kind: str, body: dict[str, Any], target: str, request_id: str | None,
               idempotent: bool) -> tuple[StampsOperation, str | None]:
        """Insert the pending operation (committed), or find the earlier one with this request id or invoice."""
        if request_id is not None and not _REQUEST_ID.match(request_id):
            raise StampsInputError("request id must be 1-128 letters, digits or . _ : -")
        rid = request_id or f"auto-{uuid.uuid4().hex}"
        params = _params_json(body)
        invoice = body.get("invoice_number")
        invoice_key = f"{body['store']}:{invoice}" if kind in STAMPS_REDEMPTION_KINDS and invoice else None
        for _ in range(3):
            try:
                with self.factory.begin() as session:
                    op = StampsOperation(
                        request_id=rid, idempotency_key=rid if idempotent else None, kind=kind, target=target,
                        user_identifier=body.get("user"), store=body.get("store"), invoice_number=invoice,
                        invoice_key=invoice_key, params=params, actor=self.actor, status="pending", attempts=0,
                        created_at=utcnow(),
                    )
                    session.add(op)
                    session.flush()
                    return op, None
            except IntegrityError:
                pass
            with self.factory() as session:
                earlier = session.scalars(
                    select(StampsOperation).where(StampsOperation.idempotency_key == rid)
                ).one_or_none() if idempotent else None
                holder = None
                if earlier is None and invoice_key is not None:
                    holder = session.scalars(
                        select(StampsOperation).where(StampsOperation.invoice_key == invoice_key)
                    ).one_or_none()
            if earlier is not None:
                if earlier.kind != kind or not _same_request(earlier.params, params):
                    raise StampsConflict(
                        f"request id {rid!r} was already used for {earlier.kind} {earlier.target} "
                        f"(operation #{earlier.id}) with other parameters"
                    )
                if earlier.status == "failed":
                    rearmed = self._rearm(earlier, params, invoice_key)
                    if rearmed is not None:
                        return rearmed, None
                    continue
                return earlier, "request id"
            if holder is not None:
                if holder.kind == kind and _same_request(holder.params, params):
                    return holder, "store and invoice number"
                raise StampsConflict(
                    f"invoice {invoice!r} at store {body['store']} is already used by {holder.kind} {holder.target} "
                    f"(operation #{holder.id}, request id {holder.request_id}, {holder.status})"
                )
        raise StampsConflict("the request id or invoice changed hands while recording this operation: try again")

    def _rearm(self, earlier: StampsOperation, params: str, invoice_key: str | None) -> StampsOperation | None:
        """A refused operation ran at no cost at Stamps: its request id may run again (None if someone else did)."""
        try:
            with self.factory.begin() as session:
                result = session.execute(
                    update(StampsOperation)
                    .where(StampsOperation.id == earlier.id, StampsOperation.status == "failed")
                    .values(status="pending", invoice_key=invoice_key, params=params, decision=None, http_status=None,
                            error_code=None, error_message=None, error_fields=None, response=None, finished_at=None)
                )
                if result.rowcount != 1:
                    return None
                return session.get(StampsOperation, earlier.id, populate_existing=True)
        except IntegrityError:
            raise StampsConflict(
                f"invoice {json.loads(params).get('invoice_number')!r} is already used by another operation"
            ) from None

    def _run(
        self,
        kind: str,
        body: dict[str, Any],
        target: str,
        request_id: str | None,
        call: Callable[[], dict[str, Any]],
        verify: Callable[[], Verdict] | None,
        record: Callable[[Session, StampsOperation, dict[str, Any] | None], str | None] | None,
        *,
        idempotent: bool = True,
        before_sending: Callable[[Session], str | None] | None = None,
    ) -> StampsOutcome:
        op, replayed = self._start(kind, body, target, request_id, idempotent)
        if replayed:
            with self.factory() as session:
                return _outcome(session, session.get(StampsOperation, op.id), replayed=replayed)
        attempts = op.attempts + 1
        if before_sending is not None:
            with self.factory() as session:
                refusal = before_sending(session)
            if refusal:
                return self._finish(op.id, status="failed", attempts=op.attempts, error_code="ALREADY_DONE",
                                    error_message=refusal, decision=None, invoice_key=None)
        decision = None
        try:
            answer = call()
        except StampsAmbiguous as first:
            if verify is None:
                return self._ambiguous(op, attempts, first, self._how_to_resolve(kind, op))
            attempts += 1
            try:
                verdict, answer = verify()
            except StampsError as exc:
                verdict, answer = "unknown", None
                first = StampsAmbiguous(first.code, f"{first.message}; asking again failed too: {exc.describe()}",
                                        first.http_status, first.errors)
            if verdict == "done_before":
                decision = "Stamps' answer was lost; asking again showed it was already done, so nothing was repeated"
            elif verdict == "done_now":
                decision = "Stamps' answer was lost; Stamps showed it was not done, so it was sent once more"
            else:
                return self._ambiguous(op, attempts, first, self._how_to_resolve(kind, op))
        except StampsError as exc:
            return self._failed(op, attempts, exc)

        with self.factory.begin() as session:
            stored = session.get(StampsOperation, op.id, with_for_update=True, populate_existing=True)
            note = record(session, stored, answer) if record is not None else None
            if note is not None and note.startswith("ambiguous:"):
                stored.status, stored.decision = "ambiguous", note[len("ambiguous:"):].strip()
            else:
                stored.status, stored.decision = "succeeded", decision or note
            stored.attempts = attempts
            stored.http_status = 200
            stored.response = json.dumps(answer, sort_keys=True, ensure_ascii=False) if answer is not None else None
            stored.finished_at = utcnow()
            session.flush()
            return _outcome(session, stored)

    def _finish(self, op_id: int, **values: Any) -> StampsOutcome:
        with self.factory.begin() as session:
            op = session.get(StampsOperation, op_id, with_for_update=True, populate_existing=True)
            for name, value in values.items():
                setattr(op, name, value)
            op.finished_at = utcnow()
            session.flush()
            return _outcome(session, op)

    def _failed(self, op: StampsOperation, attempts: int, exc: StampsError) -> StampsOutcome:
        # Refused (4xx), or never reached Stamps: nothing happened there, so the invoice is free again.
        why = "Stamps could not be reached; nothing was sent" if isinstance(exc, StampsUnavailable) else \
            "Stamps refused; nothing changed"
        if isinstance(exc, StampsInvalidPin) and exc.attempts_left is not None:
            why = f"invalid PIN: {exc.attempts_left} attempt(s) left"
        return self._finish(
            op.id, status="failed", attempts=attempts, http_status=exc.http_status, error_code=exc.code[:64],
            error_message=exc.message or None, error_fields=_fields_json(exc),
            decision=why, invoice_key=None,
        )

    def _ambiguous(self, op: StampsOperation, attempts: int, exc: StampsError, why: str) -> StampsOutcome:
        said = (f"HTTP {exc.http_status} {exc.code}" if exc.http_status else exc.code) + (
            f" - {exc.message}" if exc.message else "")
        return self._finish(
            op.id, status="ambiguous", attempts=attempts, http_status=exc.http_status, error_code=exc.code[:64],
            error_message=exc.message or None, error_fields=_fields_json(exc),
            decision=f"Stamps' answer was lost ({said}); {why}",
        )

    @staticmethod
    def _how_to_resolve(kind: str, op: StampsOperation) -> str:
        if kind == "authorize":
            return ("not re-sent (a wrong PIN may have used an attempt): ask the customer to enter the PIN again "
                    "under the same request id")
        if kind == "cancel":
            return (f"Stamps could not tell either; not retried. Check redemption {op.target} in the Stamps dashboard, "
                    f"then `flask --app receiver stamps resolve {op.request_id} --redemption-id {op.target}` if it is "
                    "canceled, or `--not-done` if not")
        where = f"invoice {op.invoice_number} at store {op.store}" if op.invoice_number else \
            f"{op.target} (around {op.created_at.isoformat(timespec='seconds')})"
        return ("not retried, because Stamps has no redemption lookup: find " + where + " in the Stamps dashboard, "
                f"then `flask --app receiver stamps resolve {op.request_id} --redemption-id ID` if it is there, or "
                "`--not-done` if not (that frees the request id and invoice for a new try)")

    # -- ledger effects ---------------------------------------------------------------------------

    @staticmethod
    def _record_redemptions(session: Session, op: StampsOperation, answer: dict[str, Any] | None) -> str | None:
        body = json.loads(op.params)
        rows = redemption_rows(op.kind, body, answer or {})
        if not rows:
            return ("ambiguous: Stamps answered 200 without a redemption id, so the redemption cannot be recorded; "
                    f"find it in the Stamps dashboard and run `flask --app receiver stamps resolve {op.request_id} "
                    "--redemption-id ID`")
        raw = json.dumps(answer, sort_keys=True, ensure_ascii=False)
        seen = []
        for row in rows:
            row["request_id"] = row.get("request_id") or op.request_id
            _, created = record_redemption(session, kind=op.kind, operation_id=op.id, raw_request=op.params,
                                           raw_response=raw, **row)
            if not created:
                seen.append(str(row["stamps_id"]))
        return f"redemption(s) {', '.join(seen)} were already recorded" if seen else None

    @staticmethod
    def _record_cancel(session: Session, op: StampsOperation, answer: dict[str, Any] | None) -> str | None:
        customer = (answer or {}).get("customer")
        stamps = _int_or_none(customer.get("stamps_remaining")) if isinstance(customer, dict) else None
        row, changed = record_cancellation(
            session, int(op.target), operation_id=op.id, membership_stamps=stamps,
            raw_response=json.dumps(answer, sort_keys=True) if answer is not None else None,
        )
        if row is None:
            return "canceled at Stamps; the redemption was not made through this ledger, so no row changed"
        return None if changed else "already canceled in this ledger"


# -- wiring for the CLI and the ops API -------------------------------------------------------------

_CLIENT_KEY = "stamps_client"
_client_lock = threading.Lock()


def current_stamps_ledger(actor: str) -> StampsLedger:
    """A ledger on the current app's database and its one Stamps client (StampsNotConfigured without a token)."""
    from flask import current_app

    from .runtime import current_runtime

    runtime = current_runtime()
    with _client_lock:
        client = current_app.extensions.get(_CLIENT_KEY)
        if client is None:
            client = StampsClient.from_settings(runtime.settings)
            current_app.extensions[_CLIENT_KEY] = client
    return StampsLedger(runtime.sessions, client, actor=actor)


def list_redemptions(
    session: Session, *, store: int | None = None, user: str | None = None, status: str | None = None,
    invoice: str | None = None, limit: int = 50, after: int = 0,
) -> tuple[list[dict[str, Any]], int | None]:
    """A page of recorded redemptions by id (keyset: pass the cursor back as ``after``); None on the last page."""
    filters = []
    if store is not None:
        filters.append(StampsRedemption.store == store)
    if user:
        filters.append(StampsRedemption.user_identifier == user)
    if status:
        filters.append(StampsRedemption.status == status.capitalize())
    if invoice:
        filters.append(StampsRedemption.invoice_number == invoice)
    page, cursor = keyset_page(session, StampsRedemption, filters, limit=limit, after=after)
    return [redemption_dict(r) for r in page], cursor

"""Merchant actions through RM (redeem, void, issue, chop stamp), recorded in the same ledger at once.

RM has no idempotency keys, so an action is never re-sent blindly: after an ambiguous failure
(timeout after sending, a 5xx) we ask RM for the current state and retry only when the action
demonstrably did not happen. Every action is an `actions` row; its result and its effect on the
ledger (a voucher event through the apply service, or a stamp event) commit together.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .apply import apply_snapshot
from .client import RMAmbiguous, RMClient, RMError
from .models import Action, Source, StampCard, StampEvent, utcnow
from .snapshot import parse_rm_time, snapshot_from_item

_COUNTRY_CODE = re.compile(r"^\d{1,4}$")
_PHONE = re.compile(r"^\d{6,15}$")
_CARD_CODE = re.compile(
    r"^[A-Za-z0-9_-]{8,255}:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ActionInputError(ValueError):
    """The action's input is invalid; nothing was sent to RM."""


@dataclass
class ActionOutcome:
    """What an action did; ``replayed`` is True when it ran before under the same request id."""

    action_id: int
    request_id: str
    kind: str
    status: str
    decision: str | None
    rm_error_code: str | None = None
    rm_error_message: str | None = None
    item: dict[str, Any] | None = None
    event_id: int | None = None
    replayed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "action_id": self.action_id, "request_id": self.request_id, "kind": self.kind, "status": self.status,
            "decision": self.decision, "rm_error_code": self.rm_error_code, "rm_error_message": self.rm_error_message,
            "item": self.item, "event_id": self.event_id, "replayed": self.replayed,
        }

    def line(self) -> str:
        """One human line for the CLI."""
        head = f"{self.kind} {self.status} (action #{self.action_id}, request id {self.request_id})"
        if self.replayed:
            head += " [already done earlier under this request id: not sent again]"
        if self.status == "failed":
            head += f": RM said {self.rm_error_code}" + (f" - {self.rm_error_message}" if self.rm_error_message else "")
        elif self.status == "ambiguous":
            head += f": {self.decision} (last error: {self.rm_error_message or self.rm_error_code})"
        elif self.decision:
            head += f": {self.decision}"
        return head


def validate_member(country_code: str, phone_number: str) -> None:
    """countryCode and phoneNumber as RM's redeem endpoint wants them: digits only, sensible lengths."""
    if not _COUNTRY_CODE.match(country_code or ""):
        raise ActionInputError(f"country code must be 1-4 digits (e.g. 60), got {country_code!r}")
    if not _PHONE.match(phone_number or ""):
        raise ActionInputError(f"phone number must be 6-15 digits without the country code, got {phone_number!r}")


def validate_card_code(card_code: str) -> None:
    """A chop-stamp card QR code: '<card key>:<uuid>'."""
    if not _CARD_CODE.match(card_code or ""):
        raise ActionInputError("card code must look like '<card key>:<uuid>' (the QR code of a stamp card)")


def _outcome(action: Action, *, replayed: bool) -> ActionOutcome:
    return ActionOutcome(
        action_id=action.id, request_id=action.request_id, kind=action.kind, status=action.status,
        decision=action.decision, rm_error_code=action.rm_error_code, rm_error_message=action.rm_error_message,
        item=json.loads(action.result) if action.result else None, event_id=action.event_id, replayed=replayed,
    )


# A verifier answers, after an ambiguous failure, whether the action took effect at RM:
# ("done", item) / ("not_done", None) / ("unknown", None).
Verdict = tuple[str, dict[str, Any] | None]


class MerchantActions:
    """Runs actions against RM and records them; one instance per process is fine."""

    def __init__(self, factory: sessionmaker[Session], client: RMClient, *, actor: str) -> None:
        self.factory = factory
        self.client = client
        self.actor = actor[:128]

    # -- the four actions -----------------------------------------------------------------------

    def redeem(self, code: str, *, country_code: str, phone_number: str, request_id: str | None = None) -> ActionOutcome:
        """Redeem a voucher for a member (countryCode + phoneNumber)."""
        validate_member(country_code, phone_number)

        def verify() -> Verdict:
            item = self.client.get_voucher(code)
            if item.get("status") in ("REDEEMED", "VOID"):
                return "done", item
            return ("not_done", None) if item.get("status") in ("VALID", "ISSUE", "ISSUED") else ("unknown", None)

        return self._run(
            "redeem", code, {"countryCode": country_code, "phoneNumber": phone_number}, request_id,
            lambda: self.client.redeem_voucher(code, country_code=country_code, phone_number=phone_number),
            verify, self._record_voucher(Source.REDEEM),
        )

    def void(self, code: str, *, used_at: str | None = None, request_id: str | None = None) -> ActionOutcome:
        """Void (use) a voucher at the shop."""
        if used_at is not None:
            parse_rm_time(used_at, "usedAt")

        def verify() -> Verdict:
            item = self.client.get_voucher(code)
            return ("done", item) if item.get("status") == "VOID" else ("not_done", None)

        return self._run(
            "void", code, {"usedAt": used_at} if used_at else {}, request_id,
            lambda: self.client.void_voucher(code, used_at=used_at), verify, self._record_voucher(Source.VOID),
        )

    def issue(self, batch_key: str, *, request_id: str | None = None) -> ActionOutcome:
        """Issue the next voucher of a batch."""
        if not batch_key.strip():
            raise ActionInputError("batch key is empty")
        # Which voucher RM would have issued is unknowable, so a lost answer is never retried.
        return self._run(
            "issue", batch_key, {}, request_id, lambda: self.client.issue_voucher(batch_key),
            lambda: ("unknown", None), self._record_voucher(Source.ISSUE),
        )

    def give_stamp(self, card_code: str, *, request_id: str | None = None) -> ActionOutcome:
        """Give a chop stamp by the card's QR code."""
        validate_card_code(card_code)

        def verify() -> Verdict:
            # A QR code scans once: re-sending cannot stamp twice, and RM's refusal proves the first counted.
            try:
                return "done", self.client.scan_chop_stamp(card_code)
            except RMError as exc:
                if exc.code == "STAMP_ALREADY_CHOPPED":
                    return "done", None
                raise

        return self._run(
            "chop_stamp", card_code, {"code": card_code}, request_id,
            lambda: self.client.scan_chop_stamp(card_code), verify, self._record_stamp(card_code),
        )

    # -- the common path ------------------------------------------------------------------------

    def _start(self, kind: str, target: str, params: dict, request_id: str | None) -> tuple[Action, bool]:
        """Insert the pending action (committed), or find the earlier one with this request id."""
        if request_id is not None and not _REQUEST_ID.match(request_id):
            raise ActionInputError("request id must be 1-128 letters, digits or . _ : -")
        rid = request_id or f"auto-{uuid.uuid4().hex}"
        try:
            with self.factory.begin() as session:
                action = Action(
                    request_id=rid, kind=kind, target=target, params=json.dumps(params, sort_keys=True),
                    actor=self.actor, status="pending", attempts=0, created_at=utcnow(),
                )
                session.add(action)
                session.flush()
                return action, False
        except IntegrityError:
            with self.factory() as session:
                earlier = session.scalars(select(Action).where(Action.request_id == rid)).one()
            if earlier.kind != kind or earlier.target != target:
                raise ActionInputError(
                    f"request id {rid!r} was already used for {earlier.kind} {earlier.target}"
                ) from None
            return earlier, True

    def _finish(self, action_id: int, **values: Any) -> Action:
        with self.factory.begin() as session:
            action = session.get(Action, action_id, with_for_update=True)
            for name, value in values.items():
                setattr(action, name, value)
            action.finished_at = utcnow()
            return action

    def _run(
        self,
        kind: str,
        target: str,
        params: dict,
        request_id: str | None,
        call: Callable[[], dict[str, Any]],
        verify: Callable[[], Verdict],
        record: Callable[[Session, Action, dict[str, Any] | None], int | None],
    ) -> ActionOutcome:
        action, earlier = self._start(kind, target, params, request_id)
        if earlier:
            return _outcome(action, replayed=True)
        attempts = 1
        try:
            item, decision = call(), "done"
        except RMAmbiguous as first:
            try:
                verdict, item = verify()
            except RMError as exc:
                verdict, item = "unknown", None
                first = RMAmbiguous(first.code, f"{first.message}; checking RM failed too: {exc.code}")
            if verdict == "done":
                decision = "RM's answer was lost; RM shows the change was made, so it was not sent again"
            elif verdict == "not_done":
                attempts = 2
                try:
                    item = call()
                except RMAmbiguous as second:
                    return self._ambiguous(action, attempts, second, "re-sent once after RM showed no change")
                except RMError as exc:
                    return self._failed(action, attempts, exc)
                decision = "RM's answer was lost; RM showed no change, so it was sent once more"
            else:
                return self._ambiguous(action, attempts, first, "RM's answer was lost and RM cannot tell")
        except RMError as exc:
            return self._failed(action, attempts, exc)

        with self.factory.begin() as session:
            event_id = record(session, action, item)
            stored = session.get(Action, action.id, with_for_update=True)
            stored.status, stored.decision, stored.attempts = "succeeded", decision, attempts
            stored.result = json.dumps(item, sort_keys=True) if item is not None else None
            stored.event_id = event_id
            stored.voucher_code = (item or {}).get("code") if kind != "chop_stamp" else None
            stored.finished_at = utcnow()
            session.flush()
            return _outcome(stored, replayed=False)

    def _failed(self, action: Action, attempts: int, exc: RMError) -> ActionOutcome:
        done = self._finish(
            action.id, status="failed", attempts=attempts, rm_error_code=exc.code[:64],
            rm_error_message=exc.message or None, decision="RM refused; nothing changed",
        )
        return _outcome(done, replayed=False)

    def _ambiguous(self, action: Action, attempts: int, exc: RMError, why: str) -> ActionOutcome:
        done = self._finish(
            action.id, status="ambiguous", attempts=attempts, rm_error_code=exc.code[:64],
            rm_error_message=exc.message or None,
            decision=f"{why}; not retried: check with `flask --app receiver reconcile --code`",
        )
        return _outcome(done, replayed=False)

    # -- ledger effects ---------------------------------------------------------------------------

    @staticmethod
    def _record_voucher(source: Source) -> Callable[[Session, Action, dict[str, Any] | None], int | None]:
        def record(session: Session, _action: Action, item: dict[str, Any] | None) -> int | None:
            if item is None:
                return None
            return apply_snapshot(session, snapshot_from_item(item), source=source).event_id

        return record

    @staticmethod
    def _record_stamp(card_code: str) -> Callable[[Session, Action, dict[str, Any] | None], int | None]:
        def record(session: Session, action: Action, item: dict[str, Any] | None) -> int | None:
            now = utcnow()
            key = (item or {}).get("key") or card_code.split(":", 1)[0]
            card = session.scalars(select(StampCard).where(StampCard.key == key).with_for_update()).one_or_none()
            if card is None:
                card = StampCard(key=key, no_of_chopped_stamp=0, is_completed=False, first_seen_at=now, last_seen_at=now)
                session.add(card)
            completed_now = False
            if item is not None:
                times = {k: parse_rm_time(item.get(k), k) for k in ("startAt", "endAt", "createdAt", "updatedAt")}
                card.rm_id = str(item.get("id") or "")[:64] or None
                card.no_of_chopped_stamp = int(item.get("noOfChoppedStamp") or 0)
                card.is_completed = bool(item.get("isCompleted"))
                card.start_at = times["startAt"].at if times["startAt"] else None
                card.end_at = times["endAt"].at if times["endAt"] else None
                card.rm_created_at = times["createdAt"].at if times["createdAt"] else None
                card.rm_updated_at = times["updatedAt"].at if times["updatedAt"] else None
                completed_now = card.is_completed and card.completed_at is None
                if completed_now:
                    card.completed_at = now
            card.last_seen_at = now
            event = StampEvent(
                card_key=key, action_id=action.id, scan_code=card_code,
                no_of_chopped_stamp=card.no_of_chopped_stamp if item is not None else None,
                is_completed=card.is_completed if item is not None else None, completed_now=completed_now,
                rm_updated_at=card.rm_updated_at, recorded_at=now, payload=json.dumps(item or {}, sort_keys=True),
            )
            session.add(event)
            session.flush()
            return None

        return record

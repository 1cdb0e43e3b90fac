"""The voucher state machine: pure decisions, no I/O.

RM is the source of truth and its ``updatedAt`` orders snapshots. Given what we hold and what
arrived, ``decide`` says whether to apply it, and how to record it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(str, enum.Enum):
    """Voucher statuses RM documents."""

    VALID = "VALID"
    ISSUE = "ISSUE"
    REDEEMED = "REDEEMED"
    VOID = "VOID"
    EXPIRED = "EXPIRED"
    MARKET_PLACE = "MARKET_PLACE"
    COMPLETE = "COMPLETE"


KNOWN_STATUSES = frozenset(s.value for s in Status)
FINAL_STATUSES = frozenset({Status.VOID.value, Status.EXPIRED.value, Status.MARKET_PLACE.value, Status.COMPLETE.value})
_RANK = {
    Status.VALID.value: 0,
    Status.ISSUE.value: 1,
    Status.REDEEMED.value: 2,
    **{s: 3 for s in FINAL_STATUSES},
}
# Unknown statuses sort below every known one when times tie, so the known state wins.
_UNKNOWN_RANK = -1
_ALIASES = {"ISSUED": Status.ISSUE.value, "MARKETPLACE": Status.MARKET_PLACE.value}


class Outcome(str, enum.Enum):
    """What became of an observed snapshot; all but DUPLICATE are recorded as voucher_events.outcome."""

    APPLIED = "applied"
    STALE = "stale"
    ILLEGAL = "illegal"
    UNKNOWN_STATUS = "unknown_status"
    # RM answered VOUCHER_NOT_FOUND for a code we hold (reconciliation); no snapshot to apply.
    NOT_FOUND = "not_found"
    DUPLICATE = "duplicate"


def normalise_status(raw: str) -> str:
    """Upper-case RM's status and fold its alternate spellings (ISSUED is ISSUE)."""
    status = raw.strip().upper()
    return _ALIASES.get(status, status)


def is_known(status: str) -> bool:
    """True for statuses the state machine understands."""
    return status in KNOWN_STATUSES


def is_final(status: str) -> bool:
    """True for statuses RM never leaves in normal operation (never polled by reconciliation)."""
    return status in FINAL_STATUSES


def rank(status: str) -> int:
    """Position in the voucher lifecycle: VALID < ISSUE < REDEEMED < final states."""
    return _RANK.get(status, _UNKNOWN_RANK)


def transition_allowed(from_status: str, to_status: str) -> bool:
    """Whether a callback may move a voucher from one status to another without RM's confirmation."""
    if from_status == to_status or not is_known(from_status):
        return True
    if not is_known(to_status):
        return True
    return rank(to_status) > rank(from_status)


@dataclass(frozen=True)
class Observed:
    """The parts of a snapshot (held or incoming) that ordering depends on."""

    status: str
    updated_ns: int | None
    fingerprint: str


@dataclass(frozen=True)
class Decision:
    """The state machine's verdict on one incoming snapshot."""

    outcome: Outcome
    apply: bool
    needs_reconcile: bool = False
    reinstatement: bool = False
    reason: str = ""


def is_newer(current: Observed, incoming: Observed) -> bool:
    """Total order on snapshots: updatedAt, then lifecycle rank, then fingerprint (so ties resolve the same way in any order)."""
    cur_ns = current.updated_ns if current.updated_ns is not None else -1
    inc_ns = incoming.updated_ns if incoming.updated_ns is not None else -1
    if inc_ns != cur_ns:
        return inc_ns > cur_ns
    if rank(incoming.status) != rank(current.status):
        return rank(incoming.status) > rank(current.status)
    return incoming.fingerprint > current.fingerprint


def decide(current: Observed | None, incoming: Observed, *, authoritative: bool = False) -> Decision:
    """Decide what to do with ``incoming`` given ``current`` (None for a voucher never seen).

    ``authoritative`` is True when the snapshot is RM's answer to our own question (reconciliation,
    merchant actions): a transition a callback could not make (a reinstated voucher) is then applied.
    """
    unknown = not is_known(incoming.status)
    if current is None:
        outcome = Outcome.UNKNOWN_STATUS if unknown else Outcome.APPLIED
        return Decision(outcome, apply=True, reason="first snapshot of this voucher")
    if incoming.fingerprint == current.fingerprint:
        return Decision(Outcome.DUPLICATE, apply=False, reason="same snapshot as held")
    if not is_newer(current, incoming):
        return Decision(Outcome.STALE, apply=False, reason="older than the held snapshot")
    if unknown:
        return Decision(Outcome.UNKNOWN_STATUS, apply=True, reason=f"status {incoming.status!r} is not one RM documents")
    if transition_allowed(current.status, incoming.status):
        return Decision(Outcome.APPLIED, apply=True)
    if authoritative:
        return Decision(
            Outcome.APPLIED,
            apply=True,
            reinstatement=True,
            reason=f"RM confirms {current.status} -> {incoming.status}",
        )
    return Decision(
        Outcome.ILLEGAL,
        apply=False,
        needs_reconcile=True,
        reason=f"{current.status} -> {incoming.status} is not allowed from a callback",
    )

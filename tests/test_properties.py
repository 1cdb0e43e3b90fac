"""Property-based tests: the apply service against a real database, and the pure state machine.

1. ``test_callbacks_then_one_reconcile_converge_to_rm``: RM's true history of one voucher (1..8
   snapshots, strictly increasing updatedAt, plausible RM lifecycles including reinstatements and
   same-status field changes), delivered as callbacks in any order with duplicates and losses, then
   one reconciliation step; the row must end equal to RM's latest, except in the one case the merge
   rule accepts (see ``_simulate_reconcile_step`` and the final assertions).
2. ``test_state_machine_max_wins_after_one_authoritative_decision``: pure ``decide()``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from receiver.apply import apply_snapshot
from receiver.models import Source, Voucher, VoucherEvent
from receiver.reconciliation import due_clause
from receiver.snapshot import VoucherSnapshot, parse_rm_time, snapshot_from_item
from receiver.state_machine import FINAL_STATUSES, KNOWN_STATUSES, Observed, Outcome, decide, is_newer
from tests.support import voucher_item

# --------------------------------------------------------------------------------------------------
# RM's own history of one voucher
# --------------------------------------------------------------------------------------------------

# What RM itself may do next from each status. Staying put is a same-status field change (a new
# label, amount or member); the arrows back out of final states and out of REDEEMED are RM
# reinstating a voucher (a merchant un-voids it, extends an expired one, reverses a redemption).
RM_NEXT = {
    "VALID": ["VALID", "ISSUE", "VOID", "EXPIRED", "MARKET_PLACE"],
    "ISSUE": ["ISSUE", "REDEEMED", "VOID", "EXPIRED", "COMPLETE"],
    "REDEEMED": ["REDEEMED", "VOID", "EXPIRED", "COMPLETE", "ISSUE"],
    "VOID": ["VOID", "ISSUE", "VALID"],
    "EXPIRED": ["EXPIRED", "ISSUE"],
    "MARKET_PLACE": ["MARKET_PLACE", "ISSUE"],
    "COMPLETE": ["COMPLETE"],
}
assert set(RM_NEXT) == KNOWN_STATUSES

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
BASE_NS = 1_767_225_600 * 1_000_000_000  # 2026-01-01T00:00:00Z


def rm_time_ns(ns: int) -> str:
    """RM's RFC 3339 UTC time with all nine fractional digits."""
    seconds, frac = divmod(ns, 1_000_000_000)
    at = _EPOCH + timedelta(seconds=seconds)
    return at.strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


@dataclass(frozen=True)
class Step:
    """One snapshot of RM's history: its status (as RM spells it) and what else changed."""

    status: str
    gap_ns: int
    amount: int
    spelled_issued: bool


@st.composite
def rm_histories(draw) -> list[Step]:  # noqa: ANN001
    n = draw(st.integers(1, 8))
    status = draw(st.sampled_from(["VALID", "ISSUE", "MARKET_PLACE"]))
    steps = []
    for i in range(n):
        if i:
            status = draw(st.sampled_from(RM_NEXT[status]))
        steps.append(
            Step(
                status=status,
                # 1 ns gaps: two snapshots in the same microsecond, finer than a database timestamp.
                gap_ns=draw(st.one_of(st.just(1), st.integers(1, 999), st.integers(1, 10**13))),
                amount=draw(st.sampled_from([500, 700, 900])),
                spelled_issued=status == "ISSUE" and draw(st.booleans()),
            )
        )
    return steps


def build_items(code: str, steps: list[Step]) -> list[dict]:
    """RM's voucher objects for a history, oldest first, with strictly increasing updatedAt."""
    items, ns = [], BASE_NS
    for i, step in enumerate(steps):
        ns += step.gap_ns
        items.append(
            voucher_item(
                code,
                "ISSUED" if step.spelled_issued else step.status,
                label=f"Free coffee (revision {i})",
                amount=step.amount,
                updatedAt=rm_time_ns(ns),
            )
        )
    return items


@st.composite
def histories_and_deliveries(draw) -> tuple[list[Step], list[int]]:  # noqa: ANN001
    """A history, and which of its snapshots arrive as callbacks, in what order (indices into it).

    Any list of indices: any interleaving, duplicates, loss of any subset (the newest included),
    and, one time in ten, nothing delivered at all.
    """
    steps = draw(rm_histories())
    n = len(steps)
    if draw(st.sampled_from([False] * 9 + [True])):
        return steps, []  # every callback lost
    return steps, draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=2 * n + 2))


# --------------------------------------------------------------------------------------------------
# Against the database
# --------------------------------------------------------------------------------------------------

_codes = itertools.count()


def _row(db, code: str) -> Voucher | None:  # noqa: ANN001
    with db() as s:
        return s.scalars(select(Voucher).where(Voucher.code == code)).one_or_none()


def _apply(db, snapshot: VoucherSnapshot, source: Source) -> str:  # noqa: ANN001
    """apply_snapshot in its own transaction (as a request or reconcile chunk does); the sha held after it."""
    with db.begin() as s:
        apply_snapshot(s, snapshot, source=source)
        return s.scalar(select(Voucher.snapshot_sha256).where(Voucher.code == snapshot.code))


def _product_says_due(db, code: str) -> bool:  # noqa: ANN001
    """Whether a scheduled reconcile_due pass would select this voucher right now.

    stale_after_seconds=0 and a clock a day ahead: any non-final voucher counts as unconfirmed, so
    the clause reduces to "not missing at RM, and flagged or non-final".
    """
    later = datetime.now(timezone.utc) + timedelta(days=1)
    with db() as s:
        return s.scalar(select(Voucher.id).where(Voucher.code == code, due_clause(later, 0))) is not None


def _simulate_reconcile_step(db, code: str, latest: VoucherSnapshot) -> tuple[str, str | None]:  # noqa: ANN001
    """One reconciliation step, as the product would run it; returns (what ran, sha held after).

    What is simulated, precisely:
    - The voucher was never seen (no callback arrived): the scheduled pass cannot know the code, so
      this is an operator's ``reconcile --code CODE`` (``reconcile_codes``), which fetches RM's
      current snapshot and applies it with source=RECONCILE whatever its status.
    - The voucher is held and *due* -- ``needs_reconcile`` is set, or its status is non-final (with
      stale_after_seconds=0 every non-final voucher is unconfirmed): the scheduled ``reconcile_due``
      pass fetches it and applies RM's current snapshot with source=RECONCILE. We decide "due" from
      the row (flag or non-final) and check that the product's own ``due_clause`` agrees.
    - Otherwise (final status, not flagged) the pass never polls it: nothing happens.
    RM answers with its latest snapshot; no VOUCHER_NOT_FOUND and no RM errors are simulated.
    """
    row = _row(db, code)
    if row is None:
        return "reconcile --code", _apply(db, latest, Source.RECONCILE)
    due = row.needs_reconcile or row.status not in FINAL_STATUSES
    assert _product_says_due(db, code) == due, (row.status, row.needs_reconcile)
    if due:
        return "reconcile_due", _apply(db, latest, Source.RECONCILE)
    return "not due", row.snapshot_sha256


def _state(snapshot: VoucherSnapshot) -> tuple[str, int | None, str]:
    return (snapshot.status, snapshot.rm_updated_ns, snapshot.fingerprint)


# Two small cases pinned as explicit examples (RM: ... -> X -> final -> reinstated; the reinstating
# callback arrives before the one for the final status): the reinstatement is refused as `illegal`
# and flags the voucher; the final snapshot, older than it but newer than what is held, is then
# applied. The merge rule promises the flag survives until a reconciliation asks RM.
_REDEEMED_VOID_ISSUE = [Step("ISSUE", 1, 500, False), Step("REDEEMED", 1_000, 500, False),
                        Step("VOID", 1_000, 500, False), Step("ISSUE", 1_000, 500, False)]
_VOID_VOID_ISSUE = [Step("ISSUE", 1, 500, False), Step("VOID", 1_000, 500, False),
                    Step("VOID", 1_000, 700, False), Step("ISSUE", 1_000, 500, False)]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=histories_and_deliveries())
@example(case=(_REDEEMED_VOID_ISSUE, [1, 3, 2]))
@example(case=(_VOID_VOID_ISSUE, [1, 3, 2]))
def test_callbacks_then_one_reconcile_converge_to_rm(db, case) -> None:  # noqa: ANN001
    steps, order = case
    code = f"PROP-{next(_codes)}"
    items = build_items(code, steps)
    snaps = [snapshot_from_item(item) for item in items]
    latest = snaps[-1]
    by_sha = {s.fingerprint: i for i, s in enumerate(snaps)}
    assert len(by_sha) == len(snaps)

    # Callbacks, each in its own transaction; remember every snapshot that was ever held.
    held_shas: list[str] = []
    for i in order:
        sha = _apply(db, snaps[i], Source.CALLBACK)
        if not held_shas or held_shas[-1] != sha:
            held_shas.append(sha)

    after_callbacks = _row(db, code)
    delivered = set(order)
    if delivered:
        newest_delivered = snaps[max(delivered)]
        # What the merge rule promises after callbacks alone: the newest delivered snapshot is held,
        # or it was refused as illegal and the voucher is flagged for reconciliation.
        assert (
            _state(newest_delivered) == (after_callbacks.status, after_callbacks.rm_updated_ns,
                                         after_callbacks.snapshot_sha256)
            or after_callbacks.needs_reconcile
        ), (
            f"newest delivered snapshot #{max(delivered)} ({newest_delivered.status}) is neither held nor "
            f"flagged: held #{by_sha[after_callbacks.snapshot_sha256]} ({after_callbacks.status}), "
            f"history {[s.status for s in steps]}, delivery order {order}"
        )
    else:
        assert after_callbacks is None

    ran, sha = _simulate_reconcile_step(db, code, latest)
    if not held_shas or held_shas[-1] != sha:
        held_shas.append(sha)

    final = _row(db, code)
    got = (final.status, final.rm_updated_ns, final.snapshot_sha256)
    if ran != "not due":
        assert got == _state(latest), (ran, [s.status for s in steps], order)
        assert final.needs_reconcile is False and final.last_source in ("reconcile", "callback")
    else:
        # The one case the design accepts: a final status is held and not flagged, so reconciliation
        # never polls it; if RM later moved the voucher on (a reinstatement, or a same-status field
        # change) and that callback was lost, the row keeps the final snapshot. What the product still
        # guarantees then: the row is the newest snapshot that *was* delivered, and it differs from
        # RM's latest only when RM's latest was never delivered.
        assert final.status in FINAL_STATUSES and not final.needs_reconcile
        assert got == _state(snaps[max(delivered)]), (
            f"held #{by_sha[final.snapshot_sha256]} ({final.status}) but the newest delivered is "
            f"#{max(delivered)} ({snaps[max(delivered)].status}); history {[s.status for s in steps]}, "
            f"delivery order {order}"
        )
        if got != _state(latest):
            assert len(snaps) - 1 not in delivered
            event("accepted divergence: final status held, RM moved on, callback lost")
    event(f"reconcile step: {ran}")

    # Event invariants.
    with db() as s:
        events = list(
            s.scalars(select(VoucherEvent).where(VoucherEvent.voucher_code == code).order_by(VoucherEvent.id))
        )
    pairs = [(e.snapshot_sha256, e.outcome) for e in events]
    assert len(pairs) == len(set(pairs)), "two events with the same (snapshot, outcome)"
    assert all(e.snapshot_sha256 in by_sha for e in events)
    applied = [e for e in events if e.outcome == Outcome.APPLIED.value]
    # Exactly one 'applied' event per distinct snapshot that was ever held, in the order they were held.
    assert [e.snapshot_sha256 for e in applied] == held_shas
    applied_ns = [parse_rm_time(json.loads(e.payload)["updatedAt"]).ns for e in applied]
    assert applied_ns == sorted(applied_ns) and len(set(applied_ns)) == len(applied_ns)
    assert all(a.rm_updated_at <= b.rm_updated_at for a, b in zip(applied, applied[1:]))
    # Refused snapshots are recorded at most once each, and only for snapshots that were delivered.
    for e in events:
        if e.outcome in (Outcome.STALE.value, Outcome.ILLEGAL.value):
            assert by_sha[e.snapshot_sha256] in delivered and e.source == "callback"
    assert not any(e.outcome == Outcome.UNKNOWN_STATUS.value for e in events)


# --------------------------------------------------------------------------------------------------
# The pure state machine
# --------------------------------------------------------------------------------------------------

ALL_STATUSES = sorted(KNOWN_STATUSES) + ["SOMETHING_NEW", "TELEPORTED"]


@st.composite
def observed_sets(draw) -> list[Observed]:  # noqa: ANN001
    raw = draw(
        st.lists(
            st.tuples(
                st.sampled_from(ALL_STATUSES),
                st.one_of(st.none(), st.integers(0, 6), st.integers(-(2**63), 2**63 - 1)),
                st.text("abcdef0123456789", min_size=1, max_size=4),
            ),
            min_size=1,
            max_size=10,
        )
    )
    # The fingerprint is a hash of the whole snapshot: equal fingerprints only for equal snapshots.
    unique = {f"{status}|{ns}|{salt}": Observed(status, ns, f"{status}|{ns}|{salt}") for status, ns, salt in raw}
    return list(unique.values())


@settings(max_examples=1000, deadline=None)
@given(data=st.data())
def test_state_machine_max_wins_after_one_authoritative_decision(data) -> None:  # noqa: ANN001
    snapshots = data.draw(observed_sets(), label="snapshots")
    order = data.draw(st.lists(st.sampled_from(snapshots), max_size=3 * len(snapshots)), label="deliveries")
    current: Observed | None = None
    for incoming in order:
        decision = decide(current, incoming, authoritative=False)
        if decision.apply:
            # Callbacks alone only ever move the held snapshot forwards.
            assert current is None or is_newer(current, incoming)
            current = incoming
    assert (current is None) == (not order) and (current is None or current in order)
    maximum = snapshots[0]
    for o in snapshots[1:]:
        if is_newer(maximum, o):
            maximum = o
    assert all(o == maximum or is_newer(o, maximum) for o in snapshots)  # is_newer is a total order here
    final = decide(current, maximum, authoritative=True)
    if final.apply:
        current = maximum
    assert current == maximum

"""The pure state machine, exhaustively over statuses and orderings, plus order-independence."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.state_machine import (
    FINAL_STATUSES,
    KNOWN_STATUSES,
    Observed,
    Outcome,
    decide,
    is_newer,
    transition_allowed,
)

LIFECYCLE = ["VALID", "ISSUE", "REDEEMED"]
ALL = sorted(KNOWN_STATUSES) + ["SOMETHING_NEW"]


def test_forward_transitions_are_allowed_and_backward_ones_are_not() -> None:
    for a, b in itertools.product(sorted(KNOWN_STATUSES), repeat=2):
        expected = a == b or (
            (LIFECYCLE.index(b) if b in LIFECYCLE else 3) > (LIFECYCLE.index(a) if a in LIFECYCLE else 3)
        )
        assert transition_allowed(a, b) is expected, (a, b)
    for final in FINAL_STATUSES:
        for other in KNOWN_STATUSES - {final}:
            assert not transition_allowed(final, other)


def test_every_pair_and_ordering() -> None:
    """All statuses x older/equal/newer x callback/authoritative: the decision table."""
    for cur_status, inc_status, delta, authoritative in itertools.product(ALL, ALL, (-1, 0, 1), (False, True)):
        current = Observed(cur_status, 1_000, "m")
        incoming = Observed(inc_status, 1_000 + delta, "n" if delta >= 0 else "a")
        d = decide(current, incoming, authoritative=authoritative)
        newer = is_newer(current, incoming)
        if not newer:
            assert d.outcome is Outcome.STALE and not d.apply, (cur_status, inc_status, delta)
        elif inc_status not in KNOWN_STATUSES:
            assert d.outcome is Outcome.UNKNOWN_STATUS and d.apply
        elif transition_allowed(cur_status, inc_status):
            assert d.outcome is Outcome.APPLIED and d.apply and not d.reinstatement
        elif authoritative:
            assert d.outcome is Outcome.APPLIED and d.apply and d.reinstatement
        else:
            assert d.outcome is Outcome.ILLEGAL and not d.apply and d.needs_reconcile
        if delta > 0:
            assert newer
        if delta < 0:
            assert not newer


def test_same_snapshot_is_duplicate_and_first_snapshot_applies() -> None:
    o = Observed("ISSUE", 5, "f")
    assert decide(o, o).outcome is Outcome.DUPLICATE
    assert decide(None, o).outcome is Outcome.APPLIED
    assert decide(None, Observed("NEW", 5, "f")).outcome is Outcome.UNKNOWN_STATUS


def test_newer_snapshot_with_same_status_is_applied() -> None:
    d = decide(Observed("ISSUE", 5, "a"), Observed("ISSUE", 6, "b"))
    assert d.outcome is Outcome.APPLIED and d.apply


def test_void_then_older_redeemed_is_stale_and_void_then_newer_issue_is_illegal() -> None:
    void = Observed("VOID", 10, "v")
    assert decide(void, Observed("REDEEMED", 9, "r")).outcome is Outcome.STALE
    illegal = decide(void, Observed("ISSUE", 11, "i"))
    assert illegal.outcome is Outcome.ILLEGAL and illegal.needs_reconcile
    reinstated = decide(void, Observed("ISSUE", 11, "i"), authoritative=True)
    assert reinstated.apply and reinstated.reinstatement


def test_ties_are_broken_by_rank_then_fingerprint() -> None:
    assert is_newer(Observed("ISSUE", 5, "z"), Observed("REDEEMED", 5, "a"))
    assert not is_newer(Observed("REDEEMED", 5, "a"), Observed("ISSUE", 5, "z"))
    assert is_newer(Observed("ISSUE", 5, "a"), Observed("ISSUE", 5, "b"))
    assert not is_newer(Observed("ISSUE", 5, "b"), Observed("ISSUE", 5, "a"))
    assert is_newer(Observed("ISSUE", None, "a"), Observed("VALID", 0, "a"))


snapshots = st.lists(
    st.tuples(st.sampled_from(ALL), st.integers(0, 20), st.text("abcdef", min_size=1, max_size=3)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(snapshots, st.randoms())
def test_newest_wins_in_any_order_when_every_transition_is_confirmed(snaps, rnd) -> None:  # noqa: ANN001
    """With authoritative sources, the held snapshot after any delivery order is the maximum."""
    observed = [Observed(s, t, f"{s}{t}{f}") for s, t, f in snaps]
    order = observed[:]
    rnd.shuffle(order)
    current = None
    for incoming in order:
        d = decide(current, incoming, authoritative=True)
        if d.apply:
            current = incoming
    best = observed[0]
    for o in observed[1:]:
        if is_newer(best, o):
            best = o
    assert current == best

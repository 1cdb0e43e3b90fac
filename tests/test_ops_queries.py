"""docs/ops-queries.sql: every query parses, runs on SQLite and PostgreSQL, and returns exactly what it says.

The data set is small and deliberate, and it is built only through the project's own code paths
(apply_snapshot, record_not_found, accept_verified, record_rejection, record_failure, replay,
try_acquire; ReconcileRun rows through the ORM; record_redemption, record_cancellation and the
StampsLedger itself, against a stand-in for Stamps),
with times relative to the real clock, because the queries filter on the ops_clock view.
Each query has a named expectation below; a query without one fails the test.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import text

from receiver.apply import apply_snapshot, record_not_found
from receiver.deliveries import IncomingCallback, accept_verified, record_failure, record_rejection, replay
from receiver.lease import try_acquire
from receiver.models import DeliveryOutcome, ReconcileRun, Source
from receiver.snapshot import snapshot_from_item
from receiver.stamps_client import StampsAmbiguous
from receiver.stamps_ledger import StampsLedger, record_cancellation, record_redemption
from tests.support import ROOT, callback_body, rm_time, voucher_item

QUERIES_FILE = ROOT / "docs" / "ops-queries.sql"
PLACEHOLDER_CODE = "NAklEfbVdV"
_NAME = re.compile(r"^-- name: ([a-z][a-z0-9_]*)\s*$")
_STORED_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d+)?$")
_BIND_PARAM = re.compile(r"(?<![:\w\\]):\w+")


# --------------------------------------------------------------------------------------------
# Parsing the file


@dataclass(frozen=True)
class OpsQuery:
    name: str
    comment: list[str]
    sql: str


def parse_queries(path: Path = QUERIES_FILE) -> list[OpsQuery]:
    """Split the file on `-- name:` markers into (name, comment lines, SQL statement)."""
    queries: list[OpsQuery] = []
    current: tuple[str, list[str]] | None = None
    body: list[str] = []

    def close() -> None:
        if current is not None:
            queries.append(OpsQuery(current[0], current[1], "\n".join(body).strip()))

    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = _NAME.match(line)
        if line.startswith("-- name:") and not match:
            raise AssertionError(f"line {number}: bad query name marker {line!r} (want snake_case)")
        if match:
            close()
            current, body = (match.group(1), []), []
            continue
        if current is None:
            assert not line.strip() or line.startswith("--"), f"line {number}: SQL before the first -- name: marker"
            continue
        if not body and line.startswith("--"):
            current[1].append(line)
        elif line.strip() or body:
            body.append(line)
    close()
    return queries


QUERIES = parse_queries()


def test_the_file_is_a_list_of_named_commented_statements() -> None:
    names = [q.name for q in QUERIES]
    assert len(QUERIES) >= 12, names
    assert len(names) == len(set(names)), [n for n, c in Counter(names).items() if c > 1]
    for q in QUERIES:
        assert q.comment and all(line.startswith("-- ") for line in q.comment), f"{q.name}: needs a -- comment block"
        assert q.sql.endswith(";"), f"{q.name}: must end with ;"
        statement = q.sql[:-1]
        assert ";" not in statement, f"{q.name}: one statement per query"
        assert not _BIND_PARAM.search(statement), f"{q.name}: ':word' would be a bind parameter"
        assert "--" not in statement, f"{q.name}: keep comments in the block above the query"
        if PLACEHOLDER_CODE in statement:
            assert any(PLACEHOLDER_CODE in line and "replace" in line.lower() for line in q.comment), (
                f"{q.name}: say to replace the placeholder code"
            )
        # Time-relative filters go through ops_clock, never through one dialect's date functions.
        lowered = statement.lower()
        for banned in ("now()", "current_timestamp", "current_date", "interval", "julianday", "strftime",
                       "datetime(", "date_trunc", "extract(", "::"):
            assert banned not in lowered, f"{q.name}: uses {banned!r}, which is not portable"


def test_every_query_has_an_expectation() -> None:
    names = {q.name for q in QUERIES}
    assert names - set(EXPECTATIONS) == set(), "queries without an expectation in this test"
    assert set(EXPECTATIONS) - names == set(), "expectations for queries that are not in the file"


# --------------------------------------------------------------------------------------------
# The data set


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


@dataclass
class World:
    """The seeded scenario: the clock it was built on, and the ids the expectations refer to."""

    now: datetime
    today_start: datetime
    ids: dict[str, int] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    stamps: dict[str, Any] = field(default_factory=dict)

    def ago(self, **delta: float) -> datetime:
        return self.now - timedelta(**delta)

    def t(self, fraction: float) -> datetime:
        """A time today (UTC) strictly between midnight and now, whatever the time of day."""
        return self.today_start + (self.now - self.today_start) * fraction

    @property
    def yesterday_late(self) -> datetime:
        """Within the last 24 hours but before midnight, whatever the time of day."""
        return self.today_start - (self.today_start - self.ago(days=1)) / 2

    @property
    def day3(self) -> datetime:
        """Noon UTC three days ago: two events ten minutes apart stay on one date."""
        return self.today_start - timedelta(days=3) + timedelta(hours=12)


def _clock() -> World:
    now = datetime.now(timezone.utc)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    if midnight - now < timedelta(seconds=30):
        # "Today" must not change between seeding and querying.
        time.sleep((midnight - now).total_seconds() + 0.5)
        now = datetime.now(timezone.utc)
    return World(now=now, today_start=now.replace(hour=0, minute=0, second=0, microsecond=0))


def _item(w: World, code: str, status: str, step: int, *, batch: str | None = "batch-A",
          expires: datetime | None = None, **overrides: Any) -> dict[str, Any]:
    expires = expires or w.now + timedelta(days=365)
    return voucher_item(
        code, status, step, voucherBatchKey=batch,
        expiry={"type": "FIXED", "day": 0, "expiredAt": rm_time(expires)}, **overrides,
    )


def _incoming(item: dict[str, Any], at: datetime, addr: str = "10.1.1.1") -> IncomingCallback:
    return IncomingCallback(
        body=callback_body(item),
        headers={"Content-Type": "application/json"},
        remote_addr=addr,
        content_type="application/json",
        received_at=at,
    )


def seed(db, w: World) -> None:  # noqa: ANN001, PLR0915 - one scenario, told in order
    def callback(item: dict[str, Any], at: datetime) -> int:
        with db.begin() as s:
            return accept_verified(s, _incoming(item, at), snapshot_from_item(item)).delivery_id

    def direct(item: dict[str, Any], at: datetime, source: Source) -> None:
        with db.begin() as s:
            apply_snapshot(s, snapshot_from_item(item), source=source, now=at)

    def reject(at: datetime, addr: str, outcome: DeliveryOutcome, code: str | None = None) -> int:
        item = _item(w, code or "FORGED0001", "VOID", 9)
        http_status = 401 if outcome is DeliveryOutcome.REJECTED_SIGNATURE else 400
        with db.begin() as s:
            return record_rejection(
                s, _incoming(item, at, addr), outcome=outcome, http_status=http_status,
                error="signature does not verify", voucher_code=code,
            )

    def fail(item: dict[str, Any], at: datetime) -> int:
        return record_failure(db, _incoming(item, at), snapshot_from_item(item), "OperationalError: database is locked")

    # The placeholder code: issued, redelivered twice, a late stale callback, then redeemed.
    code = PLACEHOLDER_CODE
    w.ids["tl_valid"] = callback(_item(w, code, "VALID", 0), w.ago(days=3))
    issue = _item(w, code, "ISSUE", 1)
    w.ids["tl_issue"] = callback(issue, w.ago(days=2))
    assert callback(issue, w.ago(days=2) + timedelta(minutes=5)) == w.ids["tl_issue"]
    assert callback(issue, w.ago(days=2) + timedelta(minutes=10)) == w.ids["tl_issue"]
    w.ids["tl_stale"] = callback(_item(w, code, "VALID", 0, label="Free tea"), w.ago(minutes=30))
    w.ids["tl_redeemed"] = callback(_item(w, code, "REDEEMED", 2), w.ago(minutes=20))

    # Voided today: batch-A two (one first seen as VOID, one issued earlier today), batch-B one
    # through reconciliation, batch-C one voided twice (voided, reinstated by RM, voided again).
    direct(_item(w, "VOIDTODAY1", "VALID", 0), w.ago(days=10), Source.BACKFILL)
    callback(_item(w, "VOIDTODAY1", "ISSUE", 1), w.t(0.45))
    callback(_item(w, "VOIDTODAY1", "VOID", 2), w.t(0.5))
    callback(_item(w, "VOIDTODAY3", "VOID", 0), w.t(0.5))
    direct(_item(w, "VOIDTODAY2", "ISSUE", 0, batch="batch-B"), w.ago(days=10), Source.BACKFILL)
    direct(_item(w, "VOIDTODAY2", "VOID", 1, batch="batch-B"), w.t(0.5), Source.RECONCILE)
    direct(_item(w, "VOIDTODAY4", "VOID", 0, batch="batch-C"), w.t(0.2), Source.BACKFILL)
    direct(_item(w, "VOIDTODAY4", "VALID", 1, batch="batch-C"), w.t(0.3), Source.RECONCILE)
    callback(_item(w, "VOIDTODAY4", "VOID", 2, batch="batch-C"), w.t(0.4))
    # Voided yesterday (within 24 hours), then a VOID -> VOID label change today: not voided today.
    callback(_item(w, "VOIDOLD01", "VOID", 0, expires=w.ago(days=2)), w.yesterday_late)
    callback(_item(w, "VOIDOLD01", "VOID", 1, expires=w.ago(days=2), label="Free tea"), w.t(0.5))
    # A late VOID for a voucher already REDEEMED with a newer updatedAt: stale, not a void.
    callback(_item(w, "STALEVOID1", "REDEEMED", 5, batch="batch-C"), w.ago(hours=5))
    callback(_item(w, "STALEVOID1", "VOID", 3, batch="batch-C"), w.t(0.55))

    # Stuck: ISSUE for 10 days (with an old stale callback, and RM confirming it an hour ago),
    # REDEEMED for 8 days; ISSUE for 6 days (with a stale callback 5 days ago) is not stuck yet.
    stuck_issue = _item(w, "STUCKISS1", "ISSUE", 1, batch="batch-B")
    direct(stuck_issue, w.ago(days=10), Source.RECONCILE)
    callback(_item(w, "STUCKISS1", "VALID", 0, batch="batch-B"), w.ago(days=9))
    direct(stuck_issue, w.ago(hours=1), Source.RECONCILE)
    direct(_item(w, "STUCKRED1", "VALID", 0, batch="batch-B"), w.ago(days=12), Source.BACKFILL)
    callback(_item(w, "STUCKRED1", "REDEEMED", 1, batch="batch-B"), w.ago(days=8))
    direct(_item(w, "FRESHISS1", "ISSUE", 1), w.ago(days=6), Source.BACKFILL)
    callback(_item(w, "FRESHISS1", "VALID", 0), w.ago(days=5))

    # Old: a callback 40 days ago, then reconciliation 35 days ago (outside every 30-day window).
    callback(_item(w, "OLDVALID1", "VALID", 0), w.ago(days=40))
    direct(_item(w, "OLDVALID1", "VALID", 1, label="Free tea"), w.ago(days=35), Source.RECONCILE)

    # Learned only through reconciliation three days ago: two changes of one voucher, one date.
    direct(_item(w, "RECON3D01", "VALID", 0, batch="batch-B"), w.day3, Source.RECONCILE)
    direct(_item(w, "RECON3D01", "ISSUE", 1, batch="batch-B"), w.day3 + timedelta(minutes=10), Source.RECONCILE)

    # Expiry: a non-final voucher past its date (earlier today), and final ones past theirs.
    direct(_item(w, "EXPIRED01", "ISSUE", 0, batch="batch-B", expires=w.t(0.7)), w.ago(days=2), Source.BACKFILL)
    direct(_item(w, "EXPFINAL1", "EXPIRED", 0, batch=None, expires=w.ago(days=3, hours=1)), w.ago(days=3),
           Source.BACKFILL)
    for final_code, status in (("MARKETPL1", "MARKET_PLACE"), ("COMPLETE1", "COMPLETE"), ("VOIDLONG1", "VOID")):
        direct(_item(w, final_code, status, 0, batch="batch-C", expires=w.ago(days=10)), w.ago(days=20),
               Source.BACKFILL)

    # Backwards callbacks: refused as illegal and flagged for reconciliation.
    callback(_item(w, "FLAGGED01", "REDEEMED", 0), w.ago(hours=25))
    w.ids["illegal1"] = callback(_item(w, "FLAGGED01", "ISSUE", 1), w.ago(minutes=150))
    callback(_item(w, "FLAGGED02", "REDEEMED", 0, batch="batch-B"), w.ago(days=4))
    w.ids["illegal2"] = callback(_item(w, "FLAGGED02", "VALID", 1, batch="batch-B"), w.ago(hours=2))

    # RM no longer knows these two.
    direct(_item(w, "MISSING01", "VALID", 0, batch="batch-B"), w.ago(days=5), Source.BACKFILL)
    direct(_item(w, "MISSING02", "ISSUE", 0), w.ago(days=9), Source.BACKFILL)
    with db.begin() as s:
        assert record_not_found(s, "MISSING01", source=Source.RECONCILE, now=w.ago(hours=1)) is not None
        assert record_not_found(s, "MISSING02", source=Source.RECONCILE, now=w.ago(days=3)) is not None

    # Unknown statuses: PENDING_XYZ twice for one voucher, HOLD once.
    callback(_item(w, "UNKNOWN01", "PENDING_XYZ", 0), w.ago(hours=3))
    callback(_item(w, "UNKNOWN01", "PENDING_XYZ", 1, label="Free tea"), w.ago(hours=2))
    # UNKNOWN02's date has passed too: an unknown status is not a final one.
    unknown02 = {"batch": "batch-B", "expires": w.ago(days=5)}
    direct(_item(w, "UNKNOWN02", "VALID", 0, **unknown02), w.ago(days=4), Source.BACKFILL)
    callback(_item(w, "UNKNOWN02", "HOLD", 1, **unknown02), w.ago(minutes=90))

    # Reinstated: voided by callback two days ago, RM says VALID when reconciliation asks today.
    callback(_item(w, "REINST01", "VOID", 0, batch="batch-B"), w.ago(days=2))
    direct(_item(w, "REINST01", "VALID", 1, batch="batch-B"), w.t(0.6), Source.RECONCILE)

    # Failed on our side: ERRCODE01 never retried, ERRCODE02 replayed by an operator, ERRCODE03
    # redelivered by RM and accepted, ERRCODE04 redelivered by RM and failed again.
    failures = {name: _item(w, name, "VALID", 0, batch="batch-B")
                for name in ("ERRCODE01", "ERRCODE02", "ERRCODE03", "ERRCODE04")}
    w.ids["ERRCODE01"] = fail(failures["ERRCODE01"], w.ago(hours=6))
    w.ids["ERRCODE02"] = fail(failures["ERRCODE02"], w.ago(hours=5))
    with db.begin() as s:
        # What `flask --app receiver deliveries replay --id N` does.
        assert replay(s, w.ids["ERRCODE02"], now=w.ago(hours=4, minutes=30)).status is DeliveryOutcome.ACCEPTED
    w.ids["ERRCODE03"] = fail(failures["ERRCODE03"], w.ago(hours=4))
    assert callback(failures["ERRCODE03"], w.ago(hours=3, minutes=50)) == w.ids["ERRCODE03"]
    w.ids["ERRCODE04"] = fail(failures["ERRCODE04"], w.ago(minutes=100))
    assert fail(failures["ERRCODE04"], w.ago(minutes=95)) == w.ids["ERRCODE04"]

    # Rejected callbacks: four bad signatures from one address (one outside the hour), one from
    # another, and a malformed body that is not a signature problem.
    w.ids["forged_placeholder"] = reject(w.ago(minutes=21), "203.0.113.7", DeliveryOutcome.REJECTED_SIGNATURE, code)
    for minutes in (50, 5, 120):
        reject(w.ago(minutes=minutes), "203.0.113.7", DeliveryOutcome.REJECTED_SIGNATURE)
    reject(w.ago(minutes=10), "198.51.100.9", DeliveryOutcome.REJECTED_SIGNATURE)
    reject(w.ago(minutes=6), "192.0.2.1", DeliveryOutcome.REJECTED_MALFORMED)

    # Reconciliation runs: 22 of them, so the oldest two fall outside the last 20.
    fraction = w.ago(minutes=90).replace(microsecond=900_000)
    runs = [
        dict(name="month_old", started=w.ago(days=30), seconds=10, trigger="schedule"),
        *[dict(name=f"filler{i}", started=w.ago(days=2) + timedelta(minutes=10 * i), seconds=30, trigger="schedule")
          for i in range(16)],
        dict(name="over_midnight", started=w.today_start - timedelta(seconds=30), seconds=75, trigger="schedule",
             checked=40, changed=1),
        dict(name="ok", started=w.ago(hours=3), seconds=42, trigger="schedule", checked=120, changed=3),
        dict(name="stopped", started=w.ago(hours=2), seconds=125, trigger="cli", checked=50, failed=2,
             error="database unavailable: OperationalError: could not connect"),
        dict(name="fraction", started=fraction, seconds=0.3, trigger="schedule", checked=1),
        dict(name="running", started=w.ago(minutes=1), seconds=None, trigger="schedule"),
    ]
    with db.begin() as s:
        for run in runs:
            finished = None if run["seconds"] is None else run["started"] + timedelta(seconds=run["seconds"])
            row = ReconcileRun(started_at=run["started"], finished_at=finished, trigger=run["trigger"],
                               checked=run.get("checked", 0), changed=run.get("changed", 0),
                               failed=run.get("failed", 0), error=run.get("error"),
                               not_found=run.get("not_found", 0), reinstated=run.get("reinstated", 0),
                               duration_ms=None if finished is None else int(run["seconds"] * 1000))
            s.add(row)
            s.flush()
            run.update(id=row.id, finished=finished)
    w.runs = runs

    # Scheduler leases: one whose holder stopped renewing it (it ran out earlier today), one held.
    assert try_acquire(db, "reconcile", "worker-a:101:aaaaaa", ttl=60, now=w.t(0.8) - timedelta(seconds=60))
    assert try_acquire(db, "backfill", "worker-b:202:bbbbbb", ttl=3600, now=w.ago(minutes=1))

    seed_stamps(db, w)


class _StandInStamps:
    """Answers the ledger as Stamps would: a cancel goes through, a redemption's answer is lost."""

    def cancel_redemption(self, redemption_id: int, *, create_replacement_voucher: bool = False) -> dict[str, Any]:
        return {"redemption": {"id": redemption_id, "status": "Canceled"},
                "customer": {"id": 9, "status": "Blue", "stamps_remaining": 100}}

    def redeem_reward(self, **_body: Any) -> dict[str, Any]:
        raise StampsAmbiguous("NO_ANSWER", "no answer from Stamps (ReadTimeoutError)")


def seed_stamps(db, w: World) -> None:  # noqa: ANN001
    """Stamps.co.id redemptions at two stores over the last 40 days, some canceled, one answer lost."""

    def redeem(stamps_id: int, kind: str, store: int, user: str, at: datetime, used: int | None, after: int,
               **fields: Any) -> None:
        with db.begin() as s:
            record_redemption(s, stamps_id=stamps_id, kind=kind, store=store, user_identifier=user, stamps_used=used,
                              membership_stamps_after=after, invoice_number=f"POS-{stamps_id}", now=at, **fields)

    def cancel(stamps_id: int, at: datetime, after: int) -> None:
        with db.begin() as s:
            row, changed = record_cancellation(s, stamps_id, membership_stamps=after, now=at)
            assert changed and row is not None

    # alice: 100 stamps; 4, then 10 (canceled later today), then a voucher value; one 40 days ago.
    redeem(1001, "redeem_reward", 32, "alice@example.com", w.t(0.2), 4, 96, reward_id=1)
    redeem(1004, "redeem_reward", 45, "alice@example.com", w.t(0.25), 10, 86, reward_id=2)
    redeem(1003, "deduct_value", 32, "alice@example.com", w.t(0.4), 0, 86, voucher_id=502, value_deducted=2500)
    cancel(1004, w.t(0.6), 96)
    redeem(1008, "redeem_reward", 32, "alice@example.com", w.ago(days=40), 20, 80, reward_id=1)
    cancel(1008, w.ago(days=35), 100)
    # bob: a voucher today, a voucher by code (no stamps reported) late yesterday.
    redeem(1002, "redeem_voucher", 32, "bob@example.com", w.t(0.3), 0, 50, voucher_id=501)
    redeem(1005, "by_voucher_code", 45, "bob@example.com", w.yesterday_late, None, 50, voucher_code="ABCD100k",
           voucher_template=12)
    # carol: a promo code and three rewards at once three days ago; the rewards canceled two days ago.
    redeem(1006, "promo_code", 32, "carol@example.com", w.day3, 0, 30, promo_code="PROMOCODE")
    redeem(1007, "redeem_many", 32, "carol@example.com", w.day3 + timedelta(minutes=10), 6, 24, reward_code="1,2")
    cancel(1007, w.ago(days=2), 30)
    # dave: redeemed earlier today, canceled just now at the till through the ledger.
    redeem(1009, "redeem_reward", 45, "dave@example.com", w.t(0.1), 3, 97, reward_id=1)
    till = StampsLedger(db, _StandInStamps(), actor="till-7")  # type: ignore[arg-type]
    assert till.cancel(1009).status == "succeeded"
    # erin: the answer of a redemption was lost: ambiguous, holding its request id and invoice.
    lost = till.redeem_reward(user="erin@example.com", store=32, reward=1, invoice_number="POS-LOST",
                              request_id="till-lost")
    assert lost.status == "ambiguous"
    with db() as s:
        w.stamps["dave_canceled_at"] = s.execute(
            text("SELECT canceled_at FROM stamps_redemptions WHERE stamps_id = 1009")).scalar()
        w.stamps["lost_created_at"] = s.execute(
            text("SELECT created_at FROM stamps_operations WHERE request_id = 'till-lost'")).scalar()


# --------------------------------------------------------------------------------------------
# Expectations, one per query name


def _norm(value: Any) -> Any:
    """Same Python value from both databases: aware UTC datetimes, ISO dates, ints."""
    if isinstance(value, datetime):
        return _utc(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, str) and _STORED_TIME.match(value):
        return _utc(datetime.fromisoformat(value))
    return value


def rows_of(result) -> list[dict[str, Any]]:  # noqa: ANN001
    return [{k: _norm(v) for k, v in row._mapping.items()} for row in result]


def pick(rows: list[dict[str, Any]], *columns: str) -> list[tuple]:
    return [tuple(row[c] for c in columns) for row in rows]


Check = Callable[[list[dict[str, Any]], World], None]
EXPECTATIONS: dict[str, Check] = {}


def expect(name: str) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        EXPECTATIONS[name] = check
        return check
    return register


@expect("voucher_timeline")
def _(rows, w):  # noqa: ANN001
    assert pick(rows, "recorded_at", "source", "outcome", "from_status", "to_status", "delivery_id",
                "current_status") == [
        (w.ago(days=3), "callback", "applied", None, "VALID", w.ids["tl_valid"], "REDEEMED"),
        (w.ago(days=2), "callback", "applied", "VALID", "ISSUE", w.ids["tl_issue"], "REDEEMED"),
        (w.ago(minutes=30), "callback", "stale", "ISSUE", "VALID", w.ids["tl_stale"], "REDEEMED"),
        (w.ago(minutes=20), "callback", "applied", "ISSUE", "REDEEMED", w.ids["tl_redeemed"], "REDEEMED"),
    ]


@expect("voucher_current_state")
def _(rows, w):  # noqa: ANN001
    assert pick(rows, "code", "status", "batch", "last_source", "first_seen_at", "last_changed_at",
                "last_confirmed_at", "needs_reconcile", "rm_missing_at") == [
        (PLACEHOLDER_CODE, "REDEEMED", "batch-A", "callback", w.ago(days=3), w.ago(minutes=20), w.ago(minutes=20),
         "no", None),
    ]


@expect("voucher_deliveries")
def _(rows, w):  # noqa: ANN001
    # Includes the forged callback that named this code (rejected, never merged with real ones).
    assert pick(rows, "id", "received_at", "last_received_at", "outcome", "http_status", "attempts",
                "signature_verified", "remote_addr") == [
        (w.ids["tl_valid"], w.ago(days=3), w.ago(days=3), "accepted", 200, 1, "yes", "10.1.1.1"),
        (w.ids["tl_issue"], w.ago(days=2), w.ago(days=2) + timedelta(minutes=10), "accepted", 200, 3, "yes",
         "10.1.1.1"),
        (w.ids["tl_stale"], w.ago(minutes=30), w.ago(minutes=30), "stale", 200, 1, "yes", "10.1.1.1"),
        (w.ids["forged_placeholder"], w.ago(minutes=21), w.ago(minutes=21), "rejected_signature", 401, 1, "no",
         "203.0.113.7"),
        (w.ids["tl_redeemed"], w.ago(minutes=20), w.ago(minutes=20), "accepted", 200, 1, "yes", "10.1.1.1"),
    ]


@expect("vouchers_voided_today_per_batch")
def _(rows, w):  # noqa: ANN001
    # Not VOIDOLD01 (voided yesterday; today's event is VOID -> VOID), not STALEVOID1 (stale),
    # not REINST01 (voided two days ago). VOIDTODAY4 was voided twice today: one voucher.
    assert pick(rows, "batch", "vouchers_voided", "first_voided_at", "last_voided_at") == [
        ("batch-A", 2, w.t(0.5), w.t(0.5)),
        ("batch-B", 1, w.t(0.5), w.t(0.5)),
        ("batch-C", 1, w.t(0.2), w.t(0.4)),
    ]


@expect("vouchers_stuck_in_issue_or_redeemed")
def _(rows, w):  # noqa: ANN001
    # Not FRESHISS1 (6 days), nor ISSUE/REDEEMED vouchers that changed recently.
    assert pick(rows, "code", "status", "batch", "last_changed_at", "last_confirmed_at", "rm_missing_at") == [
        ("STUCKISS1", "ISSUE", "batch-B", w.ago(days=10), w.ago(hours=1), None),
        ("MISSING02", "ISSUE", "batch-A", w.ago(days=9), w.ago(days=9), w.ago(days=3)),
        ("STUCKRED1", "REDEEMED", "batch-B", w.ago(days=8), w.ago(days=8), None),
    ]


@expect("bad_signature_rejections_last_hour")
def _(rows, w):  # noqa: ANN001
    assert pick(rows, "remote_addr", "rejections", "first_rejected_at", "last_rejected_at") == [
        ("203.0.113.7", 3, w.ago(minutes=50), w.ago(minutes=5)),
        ("198.51.100.9", 1, w.ago(minutes=10), w.ago(minutes=10)),
    ]


@expect("errored_deliveries_never_replayed")
def _(rows, w):  # noqa: ANN001
    # Not ERRCODE02 (replayed), not ERRCODE03 (RM's redelivery was accepted).
    error = "OperationalError: database is locked"
    assert pick(rows, "id", "received_at", "last_received_at", "attempts", "voucher_code", "http_status",
                "error") == [
        (w.ids["ERRCODE01"], w.ago(hours=6), w.ago(hours=6), 1, "ERRCODE01", 500, error),
        (w.ids["ERRCODE04"], w.ago(minutes=100), w.ago(minutes=95), 2, "ERRCODE04", 500, error),
    ]


@expect("reconcile_only_changes_per_day")
def _(rows, w):  # noqa: ANN001
    # Applied events from reconciliation in the last 30 days; OLDVALID1's (35 days ago) is out,
    # STUCKISS1's confirmation an hour ago changed nothing and recorded no event.
    applied = [("VOIDTODAY2", w.t(0.5)), ("VOIDTODAY4", w.t(0.3)), ("REINST01", w.t(0.6)),
               ("RECON3D01", w.day3), ("RECON3D01", w.day3 + timedelta(minutes=10)),
               ("STUCKISS1", w.ago(days=10))]
    days: dict[str, list[str]] = {}
    for code, at in applied:
        days.setdefault(at.date().isoformat(), []).append(code)
    expected = [(day, len(codes), len(set(codes))) for day, codes in sorted(days.items(), reverse=True)]
    assert [e[1:] for e in expected] == [(3, 3), (2, 1), (1, 1)]
    assert pick(rows, "recorded_day", "applied_events", "vouchers") == expected


@expect("illegal_or_stale_events_last_week")
def _(rows, w):  # noqa: ANN001
    # STUCKISS1's stale callback 9 days ago is outside the week.
    expected = [
        (w.ago(minutes=30), PLACEHOLDER_CODE, "stale", "callback", "ISSUE", "VALID"),
        (w.t(0.55), "STALEVOID1", "stale", "callback", "REDEEMED", "VOID"),
        (w.ago(minutes=150), "FLAGGED01", "illegal", "callback", "REDEEMED", "ISSUE"),
        (w.ago(hours=2), "FLAGGED02", "illegal", "callback", "REDEEMED", "VALID"),
        (w.ago(days=5), "FRESHISS1", "stale", "callback", "ISSUE", "VALID"),
    ]
    expected.sort(key=lambda r: r[0], reverse=True)
    assert pick(rows, "recorded_at", "code", "outcome", "source", "from_status", "to_status") == expected
    by_code = {row["code"]: row["delivery_id"] for row in rows}
    assert (by_code[PLACEHOLDER_CODE], by_code["FLAGGED01"], by_code["FLAGGED02"]) == (
        w.ids["tl_stale"], w.ids["illegal1"], w.ids["illegal2"])


@expect("last_reconcile_runs")
def _(rows, w):  # noqa: ANN001
    newest = sorted(w.runs, key=lambda r: r["started"], reverse=True)[:20]
    assert {"month_old", "filler0"}.isdisjoint(r["name"] for r in newest)
    states = {"stopped": "stopped", "running": "running (or crashed)"}
    assert pick(rows, "id", "trigger", "started_at", "finished_at", "checked", "changed", "failed", "not_found",
                "reinstated", "duration_seconds", "state", "error") == [
        (r["id"], r["trigger"], r["started"], r["finished"], r.get("checked", 0), r.get("changed", 0),
         r.get("failed", 0), r.get("not_found", 0), r.get("reinstated", 0),
         None if r["seconds"] is None else round(r["seconds"], 3), states.get(r["name"], "ok"), r.get("error"))
        for r in newest
    ]


@expect("expired_by_date_not_confirmed")
def _(rows, w):  # noqa: ANN001
    # Not VOIDOLD01, VOIDLONG1, EXPFINAL1, MARKETPL1, COMPLETE1: final, although their dates have passed.
    assert pick(rows, "code", "status", "batch", "expires_at", "last_confirmed_at", "rm_missing_at") == [
        ("UNKNOWN02", "HOLD", "batch-B", w.ago(days=5), w.ago(minutes=90), None),
        ("EXPIRED01", "ISSUE", "batch-B", w.t(0.7), w.ago(days=2), None),
    ]


@expect("redelivery_distribution")
def _(rows, w):  # noqa: ANN001
    # Verified in the last 30 days: 23 callbacks + 4 failures; OLDVALID1's 40-day-old callback is
    # out, the 6 rejected ones are not verified. The placeholder's ISSUE came 3 times, ERRCODE03
    # and ERRCODE04 twice each.
    assert pick(rows, "attempts", "deliveries") == [(1, 24), (2, 2), (3, 1)]


@expect("deliveries_by_outcome_last_day")
def _(rows, w):  # noqa: ANN001
    # accepted in the last 24 hours: the placeholder's REDEEMED; VOIDTODAY1 (2), VOIDTODAY3,
    # VOIDTODAY4, VOIDOLD01 (2), STALEVOID1's REDEEMED; FLAGGED01's and FLAGGED02's illegal ones;
    # UNKNOWN01 (2), UNKNOWN02; ERRCODE02 (failed, then replayed); ERRCODE03 (failed, then
    # accepted on its second attempt). Still errors: ERRCODE01, ERRCODE04 (2 attempts).
    assert pick(rows, "outcome", "deliveries", "attempts", "last_received_at") == [
        ("accepted", 15, 16, max(w.t(0.5), w.ago(minutes=20))),
        ("rejected_signature", 5, 5, w.ago(minutes=5)),
        ("error", 2, 3, w.ago(minutes=95)),
        ("stale", 2, 2, max(w.t(0.55), w.ago(minutes=30))),
        ("rejected_malformed", 1, 1, w.ago(minutes=6)),
    ]


@expect("vouchers_needing_reconcile")
def _(rows, w):  # noqa: ANN001
    assert pick(rows, "code", "status", "batch", "last_changed_at", "last_event_detail") == [
        ("FLAGGED02", "REDEEMED", "batch-B", w.ago(days=4), "REDEEMED -> VALID is not allowed from a callback"),
        ("FLAGGED01", "REDEEMED", "batch-A", w.ago(hours=25), "REDEEMED -> ISSUE is not allowed from a callback"),
    ]


@expect("vouchers_missing_at_rm")
def _(rows, w):  # noqa: ANN001
    assert pick(rows, "code", "status", "batch", "rm_missing_at", "last_confirmed_at") == [
        ("MISSING01", "VALID", "batch-B", w.ago(hours=1), w.ago(days=5)),
        ("MISSING02", "ISSUE", "batch-A", w.ago(days=3), w.ago(days=9)),
    ]


@expect("status_counts_per_batch")
def _(rows, w):  # noqa: ANN001
    # ERRCODE01 and ERRCODE04 never got past the failure: no voucher rows.
    assert pick(rows, "batch", "status", "vouchers") == [
        ("batch-A", "ISSUE", 2),  # FRESHISS1, MISSING02
        ("batch-A", "PENDING_XYZ", 1),  # UNKNOWN01
        ("batch-A", "REDEEMED", 2),  # placeholder, FLAGGED01
        ("batch-A", "VALID", 1),  # OLDVALID1
        ("batch-A", "VOID", 3),  # VOIDTODAY1, VOIDTODAY3, VOIDOLD01
        ("batch-B", "HOLD", 1),  # UNKNOWN02
        ("batch-B", "ISSUE", 3),  # STUCKISS1, EXPIRED01, RECON3D01
        ("batch-B", "REDEEMED", 2),  # STUCKRED1, FLAGGED02
        ("batch-B", "VALID", 4),  # MISSING01, REINST01, ERRCODE02, ERRCODE03
        ("batch-B", "VOID", 1),  # VOIDTODAY2
        ("batch-C", "COMPLETE", 1),  # COMPLETE1
        ("batch-C", "MARKET_PLACE", 1),  # MARKETPL1
        ("batch-C", "REDEEMED", 1),  # STALEVOID1
        ("batch-C", "VOID", 2),  # VOIDTODAY4, VOIDLONG1
        ("(no batch)", "EXPIRED", 1),  # EXPFINAL1
    ]


@expect("unknown_statuses_seen")
def _(rows, w):  # noqa: ANN001
    assert pick(rows, "unknown_status", "events", "vouchers", "first_seen_at", "last_seen_at") == [
        ("HOLD", 1, 1, w.ago(minutes=90), w.ago(minutes=90)),
        ("PENDING_XYZ", 2, 1, w.ago(hours=3), w.ago(hours=2)),
    ]


@expect("reinstated_vouchers")
def _(rows, w):  # noqa: ANN001
    assert pick(rows, "recorded_at", "code", "from_status", "to_status", "source", "detail") == [
        (w.t(0.6), "REINST01", "VOID", "VALID", "reconcile", "RM confirms VOID -> VALID"),
        (w.t(0.3), "VOIDTODAY4", "VOID", "VALID", "reconcile", "RM confirms VOID -> VALID"),
    ]


@expect("non_final_unconfirmed_for_a_day")
def _(rows, w):  # noqa: ANN001
    # Not STUCKISS1 (RM confirmed it an hour ago), not MISSING01/02 (RM no longer knows them),
    # not the final ones (VOID, EXPIRED, MARKET_PLACE, COMPLETE) however old.
    assert pick(rows, "code", "status", "last_confirmed_at") == [
        ("OLDVALID1", "VALID", w.ago(days=35)),
        ("STUCKRED1", "REDEEMED", w.ago(days=8)),
        ("FRESHISS1", "ISSUE", w.ago(days=6)),
        ("FLAGGED02", "REDEEMED", w.ago(days=4)),
        ("RECON3D01", "ISSUE", w.day3 + timedelta(minutes=10)),
        ("EXPIRED01", "ISSUE", w.ago(days=2)),
        ("FLAGGED01", "REDEEMED", w.ago(hours=25)),
    ]


@expect("scheduler_leases")
def _(rows, w):  # noqa: ANN001
    assert pick(rows, "name", "holder", "acquired_at", "expires_at", "state") == [
        ("backfill", "worker-b:202:bbbbbb", w.ago(minutes=1), w.ago(minutes=1) + timedelta(hours=1), "held"),
        ("reconcile", "worker-a:101:aaaaaa", w.t(0.8) - timedelta(seconds=60), w.t(0.8), "expired"),
    ]


@expect("stamps_redemptions_per_store_per_day")
def _(rows, w):  # noqa: ANN001
    # Not 1008 (40 days ago). Canceled ones count as redemptions and as canceled, not as stamps spent.
    today, yesterday, day3 = (d.date().isoformat() for d in (w.t(0.5), w.yesterday_late, w.day3))
    assert pick(rows, "redeemed_day", "store", "redemptions", "canceled", "stamps_spent", "value_deducted") == [
        (today, 32, 3, 0, 4, 2500),  # 1001, 1002, 1003
        (today, 45, 2, 2, 0, 0),  # 1004, 1009
        (yesterday, 45, 1, 0, 0, 0),  # 1005
        (day3, 32, 2, 1, 0, 0),  # 1006, 1007
    ]


@expect("stamps_cancellations_last_month")
def _(rows, w):  # noqa: ANN001
    # Not 1008 (canceled 35 days ago).
    assert pick(rows, "canceled_at", "redemption_id", "kind", "store", "invoice_number", "user_identifier",
                "redeemed_at", "stamps_used", "member_stamps_after", "canceled_by") == [
        (_norm(w.stamps["dave_canceled_at"]), 1009, "redeem_reward", 45, "POS-1009", "dave@example.com", w.t(0.1), 3,
         100, "till-7"),
        (w.t(0.6), 1004, "redeem_reward", 45, "POS-1004", "alice@example.com", w.t(0.25), 10, 96, None),
        (w.ago(days=2), 1007, "redeem_many", 32, "POS-1007", "carol@example.com", w.day3 + timedelta(minutes=10), 6,
         30, None),
    ]


@expect("stamps_spent_per_member")
def _(rows, w):  # noqa: ANN001
    # alice's last known stamps come from the cancel of 1004 (96), not from 1008's older events.
    assert pick(rows, "member", "redemptions", "stamps_spent", "canceled", "stamps_canceled", "last_redeemed_at",
                "last_known_stamps") == [
        ("alice@example.com", 2, 4, 1, 10, w.t(0.4), 96),
        ("bob@example.com", 2, 0, 0, 0, w.t(0.3), 50),
        ("carol@example.com", 1, 0, 1, 6, w.day3 + timedelta(minutes=10), 30),
        ("dave@example.com", 0, 0, 1, 3, w.t(0.1), 100),
    ]


@expect("stamps_operations_unresolved")
def _(rows, w):  # noqa: ANN001
    # Not the cancel that went through.
    assert pick(rows, "created_at", "request_id", "kind", "status", "store", "invoice_number", "user_identifier",
                "actor", "http_status", "error_code") == [
        (_norm(w.stamps["lost_created_at"]), "till-lost", "redeem_reward", "ambiguous", 32, "POS-LOST",
         "erin@example.com", "till-7", None, "NO_ANSWER"),
    ]
    assert "stamps resolve till-lost" in rows[0]["decision"]


# --------------------------------------------------------------------------------------------
# Running them


def test_every_query_returns_exactly_what_it_says(db) -> None:  # noqa: ANN001
    world = _clock()
    seed(db, world)
    failures: list[str] = []
    with db() as session:
        postgres = session.get_bind().dialect.name == "postgresql"
        for query in QUERIES:
            if postgres:
                # As the file's header says: date() and durations use the session time zone.
                session.execute(text("SET TIME ZONE 'UTC'"))
            try:
                rows = rows_of(session.execute(text(query.sql)))
            except Exception as exc:  # noqa: BLE001 - report every broken query at once
                session.rollback()
                failures.append(f"{query.name}: failed to run: {type(exc).__name__}: {exc}")
                continue
            check = EXPECTATIONS.get(query.name)
            if check is None:
                failures.append(f"{query.name}: no expectation")
                continue
            try:
                check(rows, world)
            except AssertionError as exc:
                failures.append(f"{query.name}: {exc}\n  rows: {rows}")
    assert not failures, "\n\n".join(failures)

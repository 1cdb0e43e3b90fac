"""SQLAlchemy models. Alembic (migrations/) owns the schema; tests check the two agree."""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .state_machine import Outcome

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite (naive text) and PostgreSQL (timestamptz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:  # noqa: ANN001
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        # SQLite stores text; keep it offset-free so ops can compare it with datetime('now').
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:  # noqa: ANN001
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    """Our clock, UTC, microseconds."""
    return datetime.now(timezone.utc)


class Source(str, enum.Enum):
    """Where an observed snapshot came from (voucher_events.source)."""

    CALLBACK = "callback"
    RECONCILE = "reconcile"
    BACKFILL = "backfill"
    REDEEM = "redeem"
    VOID = "void"
    ISSUE = "issue"


class DeliveryOutcome(str, enum.Enum):
    """What became of one callback POST (webhook_deliveries.outcome)."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    STALE = "stale"
    REJECTED_SIGNATURE = "rejected_signature"
    REJECTED_MALFORMED = "rejected_malformed"
    ERROR = "error"


EVENT_OUTCOMES = (Outcome.APPLIED, Outcome.STALE, Outcome.ILLEGAL, Outcome.UNKNOWN_STATUS, Outcome.NOT_FOUND)


def _in(column: str, values) -> str:  # noqa: ANN001
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Base(DeclarativeBase):
    """Declarative base with the naming convention every constraint follows."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Voucher(Base):
    """The current state of one voucher, as of the newest RM snapshot applied."""

    __tablename__ = "vouchers"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    code: Mapped[str] = mapped_column(String(128), unique=True)
    status: Mapped[str] = mapped_column(String(32))
    rm_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Exact RM updatedAt in nanoseconds: RM's times are finer than a database timestamp.
    rm_updated_ns: Mapped[int | None] = mapped_column(BigInteger)
    key: Mapped[str | None] = mapped_column(String(255))
    batch_key: Mapped[str | None] = mapped_column(String(255), index=True)
    label: Mapped[str | None] = mapped_column(String(500))
    voucher_type: Mapped[str | None] = mapped_column(String(32))
    amount: Mapped[int | None] = mapped_column(BigInteger)
    discount_rate: Mapped[int | None] = mapped_column(Integer)
    minimum_spend_amount: Mapped[int | None] = mapped_column(BigInteger)
    origin: Mapped[str | None] = mapped_column(String(32))
    image_url: Mapped[str | None] = mapped_column(String(1000))
    qr_url: Mapped[str | None] = mapped_column(String(1000))
    is_shipping: Mapped[bool | None] = mapped_column(Boolean)
    address: Mapped[str | None] = mapped_column(Text)
    member_profile: Mapped[str | None] = mapped_column(Text)
    is_device_redeem: Mapped[bool | None] = mapped_column(Boolean)
    is_market_place: Mapped[bool | None] = mapped_column(Boolean)
    voucher_combo_key: Mapped[str | None] = mapped_column(String(255))
    expiry_type: Mapped[str | None] = mapped_column(String(32))
    expiry_day: Mapped[int | None] = mapped_column(Integer)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    assigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    redeemed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    rm_created_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    raw: Mapped[str] = mapped_column(Text)
    snapshot_sha256: Mapped[str] = mapped_column(String(64))
    last_source: Mapped[str] = mapped_column(String(32))
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_changed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    needs_reconcile: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Set when RM answered VOUCHER_NOT_FOUND: reconciliation stops polling until RM mentions it again.
    rm_missing_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        Index("ix_vouchers_status_last_confirmed_at", "status", "last_confirmed_at"),
        Index("ix_vouchers_status_last_changed_at", "status", "last_changed_at"),
        Index("ix_vouchers_expires_at", "expires_at"),
        # Few rows are flagged or missing at any time: partial indexes keep those look-ups small.
        Index(
            "ix_vouchers_needs_reconcile", "last_changed_at",
            sqlite_where=text("needs_reconcile = 1"), postgresql_where=text("needs_reconcile = true"),
        ),
        Index(
            "ix_vouchers_rm_missing_at", "rm_missing_at",
            sqlite_where=text("rm_missing_at IS NOT NULL"), postgresql_where=text("rm_missing_at IS NOT NULL"),
        ),
    )


class VoucherEvent(Base):
    """Append-only history: one row per distinct snapshot observed for a voucher."""

    __tablename__ = "voucher_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    voucher_code: Mapped[str] = mapped_column(String(128), ForeignKey("vouchers.code"))
    from_status: Mapped[str | None] = mapped_column(String(32))
    to_status: Mapped[str] = mapped_column(String(32))
    rm_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(24))
    delivery_id: Mapped[int | None] = mapped_column(Id, ForeignKey("webhook_deliveries.id"), index=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    payload: Mapped[str] = mapped_column(Text)
    snapshot_sha256: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("voucher_code", "snapshot_sha256", "outcome"),
        CheckConstraint(_in("outcome", EVENT_OUTCOMES), name="outcome"),
        # Operators look for the rare outcomes (illegal, stale, not found ...): applied events skip this index.
        Index(
            "ix_voucher_events_unusual_outcome_recorded_at", "outcome", "recorded_at",
            sqlite_where=text("outcome <> 'applied'"), postgresql_where=text("outcome <> 'applied'"),
        ),
    )


class WebhookDelivery(Base):
    """Every callback POST received, valid or not; a redelivery of the same body bumps ``attempts``."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    body_sha256: Mapped[str] = mapped_column(String(64))
    # body_sha256 of signature-verified deliveries only, so forgeries never merge with real ones.
    dedupe_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    outcome: Mapped[str] = mapped_column(String(24))
    http_status: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    voucher_code: Mapped[str | None] = mapped_column(String(128), index=True)
    signature_verified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    nonce: Mapped[str | None] = mapped_column(String(128))
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    content_type: Mapped[str | None] = mapped_column(String(255))
    headers: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text)
    body_truncated: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    error: Mapped[str | None] = mapped_column(Text)
    # Set by `deliveries replay`; a failed delivery with no replayed_at was never retried by an operator.
    replayed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set when retention dropped body and headers (the row and its hash stay as evidence).
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint(_in("outcome", DeliveryOutcome), name="outcome"),
        Index("ix_webhook_deliveries_purged_at_received_at", "purged_at", "received_at"),
        # Errors and rejections are what operators look for; accepted deliveries skip this index.
        Index(
            "ix_webhook_deliveries_unusual_outcome_received_at", "outcome", "received_at",
            sqlite_where=text("outcome <> 'accepted'"), postgresql_where=text("outcome <> 'accepted'"),
        ),
        # A verified nonce is never accepted twice: the delivery insert itself detects a replayed signature.
        Index(
            "uq_webhook_deliveries_verified_nonce", "nonce", unique=True,
            sqlite_where=text("signature_verified = 1"), postgresql_where=text("signature_verified"),
        ),
    )


class ReconcileRun(Base):
    """One reconciliation pass and its counts."""

    __tablename__ = "reconcile_runs"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    trigger: Mapped[str] = mapped_column(String(32))
    checked: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    changed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    not_found: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reinstated: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class SchedulerLease(Base):
    """Who may run a job right now; an expired lease (crashed holder) can be taken over."""

    __tablename__ = "scheduler_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


class BackfillBatch(Base):
    """Backfill progress per RM voucher batch, so an interrupted backfill resumes where it stopped."""

    __tablename__ = "backfill_batches"

    batch_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    label: Mapped[str | None] = mapped_column(String(500))
    cursor: Mapped[str | None] = mapped_column(String(500))
    vouchers_seen: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Action(Base):
    """Something the merchant asked RM to do through us (redeem, void, issue, chop stamp), and what came of it."""

    __tablename__ = "actions"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    # Caller-supplied (or generated) idempotency key: an action with a given request id runs at most once.
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(24))
    target: Mapped[str] = mapped_column(String(255), index=True)
    params: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    decision: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rm_error_code: Mapped[str | None] = mapped_column(String(64))
    rm_error_message: Mapped[str | None] = mapped_column(Text)
    voucher_code: Mapped[str | None] = mapped_column(String(128))
    event_id: Mapped[int | None] = mapped_column(Id)
    result: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint("kind IN ('redeem', 'void', 'issue', 'chop_stamp')", name="kind"),
        CheckConstraint("status IN ('pending', 'succeeded', 'failed', 'ambiguous')", name="status"),
    )


class StampCard(Base):
    """A loyalty chop-stamp card as RM last described it."""

    __tablename__ = "stamp_cards"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)
    rm_id: Mapped[str | None] = mapped_column(String(64))
    no_of_chopped_stamp: Mapped[int] = mapped_column(Integer)
    is_completed: Mapped[bool] = mapped_column(Boolean)
    start_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    end_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    rm_created_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    rm_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Our clock when a scan first showed the card completed; set once.
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime())


class StampEvent(Base):
    """One chop-stamp scan result, append-only: a card's progress over time."""

    __tablename__ = "stamp_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    card_key: Mapped[str] = mapped_column(String(255), ForeignKey("stamp_cards.key"))
    action_id: Mapped[int | None] = mapped_column(Id, ForeignKey("actions.id"), index=True)
    scan_code: Mapped[str] = mapped_column(String(512))
    no_of_chopped_stamp: Mapped[int | None] = mapped_column(Integer)
    is_completed: Mapped[bool | None] = mapped_column(Boolean)
    # True on the one scan that completed the card.
    completed_now: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    rm_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())
    payload: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("scan_code"),
        Index("ix_stamp_events_card_key_id", "card_key", "id"),
    )


# -- Stamps.co.id redemptions ---------------------------------------------------------------------

STAMPS_REDEMPTION_KINDS = (
    "redeem_reward", "redeem_voucher", "deduct_value", "by_voucher_code", "promo_code", "redeem_many",
)
STAMPS_OPERATION_KINDS = (*STAMPS_REDEMPTION_KINDS, "cancel", "authorize")
STAMPS_OPERATION_STATUSES = ("pending", "succeeded", "failed", "ambiguous")
STAMPS_REDEMPTION_STATUSES = ("Created", "Canceled")


def _in_values(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class StampsOperation(Base):
    """One call we made (or are making) to Stamps for a merchant, and what came of it, like ``actions`` for RM."""

    __tablename__ = "stamps_operations"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    # The caller's request id (or a generated one); for authorize, the Stamps request id being authorised.
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    # request_id for everything but authorize (NULL): an operation with a given key runs at most once.
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(24))
    target: Mapped[str] = mapped_column(String(255))
    user_identifier: Mapped[str | None] = mapped_column(String(255))
    store: Mapped[int | None] = mapped_column(BigInteger)
    invoice_number: Mapped[str | None] = mapped_column(String(128))
    # '<store>:<invoice>' while a redemption with that invoice is pending, done or ambiguous; NULL once
    # Stamps refused it. One store + invoice can never produce two redemptions.
    invoice_key: Mapped[str | None] = mapped_column(String(160), unique=True)
    # The JSON body sent to Stamps (a PIN is masked); never the token.
    params: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    decision: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    http_status: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    # Stamps' per-field errors as a JSON object.
    error_fields: Mapped[str | None] = mapped_column(Text)
    # Stamps' JSON answer, as received.
    response: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint(_in_values("kind", STAMPS_OPERATION_KINDS), name="kind"),
        CheckConstraint(_in_values("status", STAMPS_OPERATION_STATUSES), name="status"),
        Index("ix_stamps_operations_status_created_at", "status", "created_at"),
    )


class StampsRedemption(Base):
    """One redemption Stamps created for us, and whether it still stands (Created) or was Canceled."""

    __tablename__ = "stamps_redemptions"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    # Stamps' redemption id: a redemption is recorded once, however often we hear of it.
    stamps_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    operation_id: Mapped[int | None] = mapped_column(Id, ForeignKey("stamps_operations.id"), index=True)
    kind: Mapped[str] = mapped_column(String(24))
    request_id: Mapped[str | None] = mapped_column(String(128), index=True)
    user_identifier: Mapped[str] = mapped_column(String(255))
    store: Mapped[int] = mapped_column(BigInteger)
    invoice_number: Mapped[str | None] = mapped_column(String(128))
    channel: Mapped[int | None] = mapped_column(Integer)
    reward_id: Mapped[int | None] = mapped_column(BigInteger)
    reward_code: Mapped[str | None] = mapped_column(String(128))
    reward_name: Mapped[str | None] = mapped_column(String(255))
    voucher_id: Mapped[int | None] = mapped_column(BigInteger)
    voucher_code: Mapped[str | None] = mapped_column(String(128))
    voucher_template: Mapped[int | None] = mapped_column(BigInteger)
    promo_code: Mapped[str | None] = mapped_column(String(128))
    qty: Mapped[int | None] = mapped_column(Integer)
    stamps_used: Mapped[int | None] = mapped_column(Integer)
    value_deducted: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    # The member's stamps right after the redemption, as Stamps reported them.
    membership_stamps_after: Mapped[int | None] = mapped_column(Integer)
    raw_request: Mapped[str | None] = mapped_column(Text)
    raw_response: Mapped[str | None] = mapped_column(Text)
    redeemed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    canceled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (
        CheckConstraint(_in_values("kind", STAMPS_REDEMPTION_KINDS), name="kind"),
        CheckConstraint(_in_values("status", STAMPS_REDEMPTION_STATUSES), name="status"),
        Index("ix_stamps_redemptions_store_redeemed_at", "store", "redeemed_at"),
        Index("ix_stamps_redemptions_user_identifier_redeemed_at", "user_identifier", "redeemed_at"),
    )


class StampsRedemptionEvent(Base):
    """Every status change of a Stamps redemption (Created, then perhaps Canceled), append-only."""

    __tablename__ = "stamps_redemption_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    redemption_id: Mapped[int] = mapped_column(Id, ForeignKey("stamps_redemptions.id"))
    operation_id: Mapped[int | None] = mapped_column(Id, ForeignKey("stamps_operations.id"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    # The member's stamps after this change, when Stamps said.
    membership_stamps: Mapped[int | None] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    detail: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # A redemption is created once and canceled at most once.
        UniqueConstraint("redemption_id", "to_status"),
        CheckConstraint(_in_values("to_status", STAMPS_REDEMPTION_STATUSES), name="to_status"),
    )

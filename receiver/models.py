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

    __table_args__ = (Index("ix_vouchers_status_last_confirmed_at", "status", "last_confirmed_at"),)


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
        Index("ix_voucher_events_voucher_code_id", "voucher_code", "id"),
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
    outcome: Mapped[str] = mapped_column(String(24), index=True)
    http_status: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    voucher_code: Mapped[str | None] = mapped_column(String(128), index=True)
    signature_verified: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    nonce: Mapped[str | None] = mapped_column(String(128), index=True)
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

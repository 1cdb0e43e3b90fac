"""Initial schema: vouchers, voucher_events (append-only), deliveries, reconciliation runs and leases, backfill progress.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)

DELIVERY_OUTCOMES = ("accepted", "duplicate", "stale", "rejected_signature", "rejected_malformed", "error")
EVENT_OUTCOMES = ("applied", "stale", "illegal", "unknown_status", "not_found")

VOUCHER_HISTORY = """
CREATE VIEW voucher_history AS
SELECT
    e.id AS event_id,
    e.voucher_code AS code,
    v.batch_key AS batch_key,
    v.label AS label,
    e.from_status AS from_status,
    e.to_status AS to_status,
    e.source AS source,
    e.outcome AS outcome,
    e.rm_updated_at AS rm_updated_at,
    e.recorded_at AS recorded_at,
    e.delivery_id AS delivery_id,
    e.detail AS detail,
    v.status AS current_status
FROM voucher_events e
JOIN vouchers v ON v.code = e.voucher_code
ORDER BY e.recorded_at DESC, e.id DESC
"""


# Time arithmetic differs between SQLite and PostgreSQL; this one-row view lets the queries in
# docs/ops-queries.sql say "in the last hour" the same way on both. All values are UTC.
OPS_CLOCK = {
    "sqlite": """
CREATE VIEW ops_clock AS SELECT
    strftime('%Y-%m-%d %H:%M:%f', 'now') AS now_utc,
    datetime('now', 'start of day') AS today_start_utc,
    strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 hour') AS hour_ago_utc,
    strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 day') AS day_ago_utc,
    strftime('%Y-%m-%d %H:%M:%f', 'now', '-7 days') AS week_ago_utc,
    strftime('%Y-%m-%d %H:%M:%f', 'now', '-30 days') AS month_ago_utc
""",
    "postgresql": """
CREATE VIEW ops_clock AS SELECT
    now() AS now_utc,
    date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS today_start_utc,
    now() - interval '1 hour' AS hour_ago_utc,
    now() - interval '1 day' AS day_ago_utc,
    now() - interval '7 days' AS week_ago_utc,
    now() - interval '30 days' AS month_ago_utc
""",
}


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "vouchers",
        sa.Column("id", Id, nullable=False),
        sa.Column("code", sa.String(128), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("rm_updated_at", Time, nullable=True),
        sa.Column("rm_updated_ns", sa.BigInteger(), nullable=True),
        sa.Column("key", sa.String(255), nullable=True),
        sa.Column("batch_key", sa.String(255), nullable=True),
        sa.Column("label", sa.String(500), nullable=True),
        sa.Column("voucher_type", sa.String(32), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("discount_rate", sa.Integer(), nullable=True),
        sa.Column("minimum_spend_amount", sa.BigInteger(), nullable=True),
        sa.Column("origin", sa.String(32), nullable=True),
        sa.Column("image_url", sa.String(1000), nullable=True),
        sa.Column("qr_url", sa.String(1000), nullable=True),
        sa.Column("is_shipping", sa.Boolean(), nullable=True),
        sa.Column("address", sa.Text(), nullable=True),
        sa.Column("member_profile", sa.Text(), nullable=True),
        sa.Column("is_device_redeem", sa.Boolean(), nullable=True),
        sa.Column("is_market_place", sa.Boolean(), nullable=True),
        sa.Column("voucher_combo_key", sa.String(255), nullable=True),
        sa.Column("expiry_type", sa.String(32), nullable=True),
        sa.Column("expiry_day", sa.Integer(), nullable=True),
        sa.Column("expires_at", Time, nullable=True),
        sa.Column("assigned_at", Time, nullable=True),
        sa.Column("redeemed_at", Time, nullable=True),
        sa.Column("used_at", Time, nullable=True),
        sa.Column("rm_created_at", Time, nullable=True),
        sa.Column("raw", sa.Text(), nullable=False),
        sa.Column("snapshot_sha256", sa.String(64), nullable=False),
        sa.Column("last_source", sa.String(32), nullable=False),
        sa.Column("first_seen_at", Time, nullable=False),
        sa.Column("last_changed_at", Time, nullable=False),
        sa.Column("last_confirmed_at", Time, nullable=True),
        sa.Column("needs_reconcile", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("rm_missing_at", Time, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_vouchers"),
        sa.UniqueConstraint("code", name="uq_vouchers_code"),
    )
    op.create_index("ix_vouchers_batch_key", "vouchers", ["batch_key"])
    op.create_index("ix_vouchers_status_last_confirmed_at", "vouchers", ["status", "last_confirmed_at"])
    op.create_index("ix_vouchers_status_last_changed_at", "vouchers", ["status", "last_changed_at"])
    op.create_index("ix_vouchers_expires_at", "vouchers", ["expires_at"])
    op.create_index(
        "ix_vouchers_needs_reconcile", "vouchers", ["last_changed_at"],
        sqlite_where=sa.text("needs_reconcile = 1"), postgresql_where=sa.text("needs_reconcile = true"),
    )
    op.create_index(
        "ix_vouchers_rm_missing_at", "vouchers", ["rm_missing_at"],
        sqlite_where=sa.text("rm_missing_at IS NOT NULL"), postgresql_where=sa.text("rm_missing_at IS NOT NULL"),
    )

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", Id, nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.Column("last_received_at", Time, nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("dedupe_key", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(24), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="1", nullable=False),
        sa.Column("voucher_code", sa.String(128), nullable=True),
        sa.Column("signature_verified", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("nonce", sa.String(128), nullable=True),
        sa.Column("remote_addr", sa.String(64), nullable=True),
        sa.Column("content_type", sa.String(255), nullable=True),
        sa.Column("headers", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("body_truncated", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("replayed_at", Time, nullable=True),
        sa.Column("purged_at", Time, nullable=True),
        sa.CheckConstraint(_in("outcome", DELIVERY_OUTCOMES), name="ck_webhook_deliveries_outcome"),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_deliveries"),
        sa.UniqueConstraint("dedupe_key", name="uq_webhook_deliveries_dedupe_key"),
    )
    op.create_index("ix_webhook_deliveries_received_at", "webhook_deliveries", ["received_at"])
    op.create_index("ix_webhook_deliveries_outcome_received_at", "webhook_deliveries", ["outcome", "received_at"])
    op.create_index("ix_webhook_deliveries_voucher_code", "webhook_deliveries", ["voucher_code"])
    op.create_index("ix_webhook_deliveries_nonce", "webhook_deliveries", ["nonce"])
    op.create_index(
        "ix_webhook_deliveries_purged_at_received_at", "webhook_deliveries", ["purged_at", "received_at"]
    )

    op.create_table(
        "voucher_events",
        sa.Column("id", Id, nullable=False),
        sa.Column("voucher_code", sa.String(128), nullable=False),
        sa.Column("from_status", sa.String(32), nullable=True),
        sa.Column("to_status", sa.String(32), nullable=False),
        sa.Column("rm_updated_at", Time, nullable=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(24), nullable=False),
        sa.Column("delivery_id", Id, nullable=True),
        sa.Column("recorded_at", Time, nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("snapshot_sha256", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.CheckConstraint(_in("outcome", EVENT_OUTCOMES), name="ck_voucher_events_outcome"),
        sa.ForeignKeyConstraint(
            ["voucher_code"], ["vouchers.code"], name="fk_voucher_events_voucher_code_vouchers"
        ),
        sa.ForeignKeyConstraint(
            ["delivery_id"], ["webhook_deliveries.id"], name="fk_voucher_events_delivery_id_webhook_deliveries"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_voucher_events"),
        sa.UniqueConstraint(
            "voucher_code", "snapshot_sha256", "outcome", name="uq_voucher_events_voucher_code_snapshot_sha256_outcome"
        ),
    )
    op.create_index("ix_voucher_events_voucher_code_id", "voucher_events", ["voucher_code", "id"])
    op.create_index("ix_voucher_events_delivery_id", "voucher_events", ["delivery_id"])
    op.create_index("ix_voucher_events_recorded_at", "voucher_events", ["recorded_at"])
    op.create_index("ix_voucher_events_outcome_recorded_at", "voucher_events", ["outcome", "recorded_at"])

    op.create_table(
        "reconcile_runs",
        sa.Column("id", Id, nullable=False),
        sa.Column("started_at", Time, nullable=False),
        sa.Column("finished_at", Time, nullable=True),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("checked", sa.Integer(), server_default="0", nullable=False),
        sa.Column("changed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("not_found", sa.Integer(), server_default="0", nullable=False),
        sa.Column("reinstated", sa.Integer(), server_default="0", nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reconcile_runs"),
    )
    op.create_index("ix_reconcile_runs_started_at", "reconcile_runs", ["started_at"])

    op.create_table(
        "scheduler_leases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("acquired_at", Time, nullable=False),
        sa.Column("expires_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_scheduler_leases"),
    )
    op.create_table(
        "backfill_batches",
        sa.Column("batch_key", sa.String(255), nullable=False),
        sa.Column("label", sa.String(500), nullable=True),
        sa.Column("cursor", sa.String(500), nullable=True),
        sa.Column("vouchers_seen", sa.Integer(), server_default="0", nullable=False),
        sa.Column("started_at", Time, nullable=False),
        sa.Column("completed_at", Time, nullable=True),
        sa.PrimaryKeyConstraint("batch_key", name="pk_backfill_batches"),
    )

    op.execute(VOUCHER_HISTORY)
    op.execute(OPS_CLOCK[op.get_bind().dialect.name])
    _create_append_only_guard()


def _create_append_only_guard() -> None:
    """History is evidence: the database itself refuses UPDATE and DELETE on voucher_events."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION voucher_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'voucher_events is append-only';
            END;
            $$
            """
        )
        op.execute(
            "CREATE TRIGGER voucher_events_append_only BEFORE UPDATE OR DELETE ON voucher_events "
            "FOR EACH ROW EXECUTE FUNCTION voucher_events_append_only()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER voucher_events_no_{action.lower()} BEFORE {action} ON voucher_events "
                "BEGIN SELECT RAISE(ABORT, 'voucher_events is append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS voucher_events_append_only ON voucher_events")
        op.execute("DROP FUNCTION IF EXISTS voucher_events_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS voucher_events_no_update")
        op.execute("DROP TRIGGER IF EXISTS voucher_events_no_delete")
    op.execute("DROP VIEW IF EXISTS ops_clock")
    op.execute("DROP VIEW IF EXISTS voucher_history")
    op.drop_table("backfill_batches")
    op.drop_table("scheduler_leases")
    op.drop_table("reconcile_runs")
    op.drop_table("voucher_events")
    op.drop_table("webhook_deliveries")
    op.drop_table("vouchers")

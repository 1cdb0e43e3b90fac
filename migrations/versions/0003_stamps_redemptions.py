"""Stamps.co.id redemptions: stamps_operations, stamps_redemptions, stamps_redemption_events (append-only).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)

REDEMPTION_KINDS = ("redeem_reward", "redeem_voucher", "deduct_value", "by_voucher_code", "promo_code", "redeem_many")
OPERATION_KINDS = (*REDEMPTION_KINDS, "cancel", "authorize")
OPERATION_STATUSES = ("pending", "succeeded", "failed", "ambiguous")
REDEMPTION_STATUSES = ("Created", "Canceled")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "stamps_operations",
        sa.Column("id", Id, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=True),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("user_identifier", sa.String(255), nullable=True),
        sa.Column("store", sa.BigInteger(), nullable=True),
        sa.Column("invoice_number", sa.String(128), nullable=True),
        sa.Column("invoice_key", sa.String(160), nullable=True),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("decision", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_fields", sa.Text(), nullable=True),
        sa.Column("response", sa.Text(), nullable=True),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("finished_at", Time, nullable=True),
        sa.CheckConstraint(_in("kind", OPERATION_KINDS), name="ck_stamps_operations_kind"),
        sa.CheckConstraint(_in("status", OPERATION_STATUSES), name="ck_stamps_operations_status"),
        sa.PrimaryKeyConstraint("id", name="pk_stamps_operations"),
        sa.UniqueConstraint("idempotency_key", name="uq_stamps_operations_idempotency_key"),
        sa.UniqueConstraint("invoice_key", name="uq_stamps_operations_invoice_key"),
    )
    op.create_index("ix_stamps_operations_request_id", "stamps_operations", ["request_id"])
    op.create_index("ix_stamps_operations_status_created_at", "stamps_operations", ["status", "created_at"])

    op.create_table(
        "stamps_redemptions",
        sa.Column("id", Id, nullable=False),
        sa.Column("stamps_id", sa.BigInteger(), nullable=False),
        sa.Column("operation_id", Id, nullable=True),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("user_identifier", sa.String(255), nullable=False),
        sa.Column("store", sa.BigInteger(), nullable=False),
        sa.Column("invoice_number", sa.String(128), nullable=True),
        sa.Column("channel", sa.Integer(), nullable=True),
        sa.Column("reward_id", sa.BigInteger(), nullable=True),
        sa.Column("reward_code", sa.String(128), nullable=True),
        sa.Column("reward_name", sa.String(255), nullable=True),
        sa.Column("voucher_id", sa.BigInteger(), nullable=True),
        sa.Column("voucher_code", sa.String(128), nullable=True),
        sa.Column("voucher_template", sa.BigInteger(), nullable=True),
        sa.Column("promo_code", sa.String(128), nullable=True),
        sa.Column("qty", sa.Integer(), nullable=True),
        sa.Column("stamps_used", sa.Integer(), nullable=True),
        sa.Column("value_deducted", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("membership_stamps_after", sa.Integer(), nullable=True),
        sa.Column("raw_request", sa.Text(), nullable=True),
        sa.Column("raw_response", sa.Text(), nullable=True),
        sa.Column("redeemed_at", Time, nullable=False),
        sa.Column("canceled_at", Time, nullable=True),
        sa.Column("updated_at", Time, nullable=False),
        sa.CheckConstraint(_in("kind", REDEMPTION_KINDS), name="ck_stamps_redemptions_kind"),
        sa.CheckConstraint(_in("status", REDEMPTION_STATUSES), name="ck_stamps_redemptions_status"),
        sa.ForeignKeyConstraint(
            ["operation_id"], ["stamps_operations.id"], name="fk_stamps_redemptions_operation_id_stamps_operations"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_stamps_redemptions"),
        sa.UniqueConstraint("stamps_id", name="uq_stamps_redemptions_stamps_id"),
    )
    op.create_index("ix_stamps_redemptions_operation_id", "stamps_redemptions", ["operation_id"])
    op.create_index("ix_stamps_redemptions_request_id", "stamps_redemptions", ["request_id"])
    op.create_index("ix_stamps_redemptions_canceled_at", "stamps_redemptions", ["canceled_at"])
    op.create_index("ix_stamps_redemptions_store_redeemed_at", "stamps_redemptions", ["store", "redeemed_at"])
    op.create_index(
        "ix_stamps_redemptions_user_identifier_redeemed_at", "stamps_redemptions", ["user_identifier", "redeemed_at"]
    )

    op.create_table(
        "stamps_redemption_events",
        sa.Column("id", Id, nullable=False),
        sa.Column("redemption_id", Id, nullable=False),
        sa.Column("operation_id", Id, nullable=True),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("membership_stamps", sa.Integer(), nullable=True),
        sa.Column("recorded_at", Time, nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("payload", sa.Text(), nullable=True),
        sa.CheckConstraint(_in("to_status", REDEMPTION_STATUSES), name="ck_stamps_redemption_events_to_status"),
        sa.ForeignKeyConstraint(
            ["redemption_id"], ["stamps_redemptions.id"],
            name="fk_stamps_redemption_events_redemption_id_stamps_redemptions",
        ),
        sa.ForeignKeyConstraint(
            ["operation_id"], ["stamps_operations.id"],
            name="fk_stamps_redemption_events_operation_id_stamps_operations",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_stamps_redemption_events"),
        sa.UniqueConstraint(
            "redemption_id", "to_status", name="uq_stamps_redemption_events_redemption_id_to_status"
        ),
    )
    op.create_index("ix_stamps_redemption_events_operation_id", "stamps_redemption_events", ["operation_id"])
    op.create_index("ix_stamps_redemption_events_recorded_at", "stamps_redemption_events", ["recorded_at"])
    _create_append_only_guard()


def _create_append_only_guard() -> None:
    """Like voucher_events: the database refuses UPDATE and DELETE on stamps_redemption_events."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION stamps_redemption_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'stamps_redemption_events is append-only';
            END;
            $$
            """
        )
        op.execute(
            "CREATE TRIGGER stamps_redemption_events_append_only BEFORE UPDATE OR DELETE ON stamps_redemption_events "
            "FOR EACH ROW EXECUTE FUNCTION stamps_redemption_events_append_only()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER stamps_redemption_events_no_{action.lower()} BEFORE {action} "
                "ON stamps_redemption_events "
                "BEGIN SELECT RAISE(ABORT, 'stamps_redemption_events is append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS stamps_redemption_events_append_only ON stamps_redemption_events")
        op.execute("DROP FUNCTION IF EXISTS stamps_redemption_events_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS stamps_redemption_events_no_update")
        op.execute("DROP TRIGGER IF EXISTS stamps_redemption_events_no_delete")
    op.drop_table("stamps_redemption_events")
    op.drop_table("stamps_redemptions")
    op.drop_table("stamps_operations")

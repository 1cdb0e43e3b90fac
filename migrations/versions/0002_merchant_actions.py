"""Merchant actions ledger (actions) and chop-stamp cards (stamp_cards, stamp_events).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "actions",
        sa.Column("id", Id, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("params", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("decision", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("rm_error_code", sa.String(64), nullable=True),
        sa.Column("rm_error_message", sa.Text(), nullable=True),
        sa.Column("voucher_code", sa.String(128), nullable=True),
        sa.Column("event_id", Id, nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("finished_at", Time, nullable=True),
        sa.CheckConstraint("kind IN ('redeem', 'void', 'issue', 'chop_stamp')", name="ck_actions_kind"),
        sa.CheckConstraint("status IN ('pending', 'succeeded', 'failed', 'ambiguous')", name="ck_actions_status"),
        sa.PrimaryKeyConstraint("id", name="pk_actions"),
        sa.UniqueConstraint("request_id", name="uq_actions_request_id"),
    )
    op.create_index("ix_actions_target", "actions", ["target"])
    op.create_index("ix_actions_created_at", "actions", ["created_at"])

    op.create_table(
        "stamp_cards",
        sa.Column("id", Id, nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("rm_id", sa.String(64), nullable=True),
        sa.Column("no_of_chopped_stamp", sa.Integer(), nullable=False),
        sa.Column("is_completed", sa.Boolean(), nullable=False),
        sa.Column("start_at", Time, nullable=True),
        sa.Column("end_at", Time, nullable=True),
        sa.Column("rm_created_at", Time, nullable=True),
        sa.Column("rm_updated_at", Time, nullable=True),
        sa.Column("completed_at", Time, nullable=True),
        sa.Column("first_seen_at", Time, nullable=False),
        sa.Column("last_seen_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_stamp_cards"),
        sa.UniqueConstraint("key", name="uq_stamp_cards_key"),
    )
    op.create_table(
        "stamp_events",
        sa.Column("id", Id, nullable=False),
        sa.Column("card_key", sa.String(255), nullable=False),
        sa.Column("action_id", Id, nullable=True),
        sa.Column("scan_code", sa.String(512), nullable=False),
        sa.Column("no_of_chopped_stamp", sa.Integer(), nullable=True),
        sa.Column("is_completed", sa.Boolean(), nullable=True),
        sa.Column("completed_now", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("rm_updated_at", Time, nullable=True),
        sa.Column("recorded_at", Time, nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["card_key"], ["stamp_cards.key"], name="fk_stamp_events_card_key_stamp_cards"),
        sa.ForeignKeyConstraint(["action_id"], ["actions.id"], name="fk_stamp_events_action_id_actions"),
        sa.PrimaryKeyConstraint("id", name="pk_stamp_events"),
        sa.UniqueConstraint("scan_code", name="uq_stamp_events_scan_code"),
    )
    op.create_index("ix_stamp_events_card_key_id", "stamp_events", ["card_key", "id"])
    op.create_index("ix_stamp_events_action_id", "stamp_events", ["action_id"])


def downgrade() -> None:
    op.drop_table("stamp_events")
    op.drop_table("stamp_cards")
    op.drop_table("actions")

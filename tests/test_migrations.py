"""Alembic owns the schema: it round-trips on both databases and agrees with the models."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError

from receiver.db import make_engine
from receiver.health import migration_head
from receiver.models import Base
from tests.support import alembic_config

TABLES = {"vouchers", "voucher_events", "webhook_deliveries", "reconcile_runs"}


def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    config = alembic_config(database_url)
    engine = make_engine(database_url)
    try:
        command.upgrade(config, "head")
        assert TABLES <= set(inspect(engine).get_table_names())
        assert "voucher_history" in inspect(engine).get_view_names()
        command.downgrade(config, "base")
        insp = inspect(engine)
        assert not TABLES & set(insp.get_table_names())
        assert "voucher_history" not in insp.get_view_names()
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == migration_head()
    finally:
        engine.dispose()


def test_models_and_migrations_agree(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_voucher_events_are_append_only(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO vouchers (code, status, raw, snapshot_sha256, last_source, first_seen_at, "
                "last_changed_at, needs_reconcile) VALUES ('A', 'VALID', '{}', 'x', 'callback', "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, false)"
            ))
            conn.execute(text(
                "INSERT INTO voucher_events (voucher_code, to_status, source, outcome, recorded_at, payload, "
                "snapshot_sha256) VALUES ('A', 'VALID', 'callback', 'applied', CURRENT_TIMESTAMP, '{}', 'x')"
            ))
        for statement in ("UPDATE voucher_events SET to_status = 'VOID'", "DELETE FROM voucher_events"):
            with pytest.raises(DBAPIError, match="append-only"):
                with engine.begin() as conn:
                    conn.execute(text(statement))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT to_status FROM voucher_events")).scalars().all() == ["VALID"]
    finally:
        engine.dispose()


def test_upgrade_to_0004_refuses_duplicate_verified_nonces_with_a_clear_message(database_url: str) -> None:
    """Two verified deliveries with one nonce stop the upgrade before it changes anything, naming the nonce."""
    config = alembic_config(database_url)
    engine = make_engine(database_url)
    try:
        command.upgrade(config, "0003")
        with engine.begin() as conn:
            for i in (1, 2):
                conn.execute(
                    text(
                        "INSERT INTO webhook_deliveries (received_at, last_received_at, body_sha256, dedupe_key, "
                        "outcome, http_status, attempts, signature_verified, nonce, body_truncated) VALUES "
                        "(CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :sha, :sha, 'accepted', 200, 1, :t, 'n-twice', :f)"
                    ),
                    {"sha": f"{i:064d}", "t": True, "f": False},
                )
        with pytest.raises(Exception, match="'n-twice' \\(2 rows\\)"):
            command.upgrade(config, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"
            assert conn.execute(text("SELECT count(*) FROM webhook_deliveries")).scalar() == 2
        with engine.begin() as conn:  # the operator resolves it; the upgrade then goes through
            conn.execute(text("UPDATE webhook_deliveries SET nonce = 'n-resolved' WHERE dedupe_key = :sha"),
                         {"sha": f"{2:064d}"})
        command.upgrade(config, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == migration_head()
    finally:
        engine.dispose()

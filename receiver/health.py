"""Liveness and readiness probes, and the Prometheus metrics page."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flask import Blueprint, Response, jsonify
from sqlalchemy import text

from .db import is_unavailable, once_more_if_connection_died, reading
from .runtime import current_runtime

bp = Blueprint("health", __name__)
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


@lru_cache(maxsize=1)
def migration_head() -> str | None:
    """The newest Alembic revision this code ships."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format: callbacks, latency, apply outcomes, RM calls, reconciliation, oldest unconfirmed."""
    from . import metrics as m

    body, content_type = m.render(current_runtime().sessions)
    return Response(body, content_type=content_type)


@bp.get("/healthz")
def healthz() -> Response:
    """The process is up and serving."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """The database answers and its schema is at the migration head this code expects."""
    head = migration_head()
    engine = current_runtime().engine

    def revision() -> str | None:
        with reading(engine).connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()

    try:
        # A pooled connection left dead by a database restart is not the database being down.
        current = once_more_if_connection_died(revision)
    except Exception as exc:  # noqa: BLE001
        reason = "database unreachable" if is_unavailable(exc) else "schema not migrated"
        return jsonify({"status": "unavailable", "database": reason, "expected_revision": head}), 503
    if current != head:
        return jsonify({"status": "unavailable", "revision": current, "expected_revision": head}), 503
    return jsonify({"status": "ready", "revision": current}), 200

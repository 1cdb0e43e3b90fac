"""Baselines served by the same gunicorn config as the project (gunicorn.conf.py).

    gunicorn "bench.baseline_apps:create_hello_app()"    -c gunicorn.conf.py   (PYTHONPATH=<repo>:<repo>/scripts)
    gunicorn "bench.baseline_apps:create_minimal_app()"  -c gunicorn.conf.py

hello:   a Flask endpoint on the callback path that reads the body and answers 200: the cost of
         gunicorn + Flask + HTTP, nothing else.
minimal: the least a *correct* receiver must do: verify RM's signature (receiver.signature.verify_signed
         with the configured RM public key and the same X-Timestamp window) and commit the raw body
         in its own table, one transaction per request, 200 only after the commit. The engine comes
         from receiver.db.make_engine with the project's own settings, so SQLite gets the identical
         WAL / synchronous / busy timeout / BEGIN IMMEDIATE set-up and PostgreSQL the identical
         psycopg 3 pool (pre-ping included). One difference, on purpose: its durable SQLite commit
         is SQLite's own synchronous=FULL (the WAL flushed inside COMMIT), the standard way a
         receiver gets one. The project flushes the WAL after COMMIT, outside the write lock
         (receiver.db.WalSync), which is its own engineering, as group commit is on PostgreSQL.
         BENCH_MINIMAL_WAL_SYNC=1 gives the minimal receiver that protocol too, for comparison.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from flask import Flask, Response, jsonify, request
from sqlalchemy import Column, Integer, MetaData, Table, Text, event, insert

from receiver.config import load_settings
from receiver.db import make_engine
from receiver.models import Id, UTCDateTime
from receiver.signature import SignatureError, load_public_key, verify_signed

CALLBACK_PATH = "/webhooks/revenuemonster/voucher"
MINIMAL_TABLE = "bench_minimal_deliveries"

metadata = MetaData()
minimal_table = Table(
    MINIMAL_TABLE,
    metadata,
    Column("id", Id, primary_key=True),
    Column("received_at", UTCDateTime(), nullable=False),
    Column("body", Text, nullable=False),
    Column("size", Integer, nullable=False),
)


def create_minimal_table(engine) -> None:  # noqa: ANN001
    """Created by the harness (not by a migration): the baseline's own table in the same database."""
    metadata.create_all(engine)


def _healthz(app: Flask) -> None:
    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})


def create_hello_app() -> Flask:
    """Hello world on the callback path."""
    app = Flask(__name__)
    _healthz(app)

    @app.post(CALLBACK_PATH)
    def hello() -> tuple[Response, int]:
        request.get_data()
        return jsonify({"status": "accepted"}), 200

    return app


def create_minimal_app() -> Flask:
    """Verify the signature, insert the raw body, commit, answer."""
    settings = load_settings()
    key = load_public_key(settings.rm_server_public_key_pem)
    engine = make_engine(
        settings.database_url,
        sqlite_synchronous=settings.sqlite_synchronous,
        sqlite_busy_timeout=settings.sqlite_busy_timeout_seconds,
        pool_size=settings.db_pool_size,
        sqlite_sync_after_commit=os.environ.get("BENCH_MINIMAL_WAL_SYNC") == "1",
    )
    if engine.dialect.name == "postgresql":
        @event.listens_for(engine, "connect")
        def _driver_prepares(dbapi_connection, _record) -> None:  # noqa: ANN001
            # make_engine turns psycopg's own preparing off for the project's pg_pipeline; a plain
            # receiver has it (its insert is prepared from the fifth execution on a connection).
            dbapi_connection.prepare_threshold = 5

    statement = insert(minimal_table)
    app = Flask(__name__)
    _healthz(app)

    @app.post(CALLBACK_PATH)
    def receive() -> tuple[Response, int]:
        body = request.get_data()
        try:
            verify_signed(
                key,
                body=body,
                method="post",
                signature=request.headers.get("X-Signature"),
                nonce=request.headers.get("X-Nonce-Str"),
                timestamp=request.headers.get("X-Timestamp"),
                max_age_seconds=settings.signature_max_age_seconds,
            )
        except SignatureError:
            return jsonify({"error": "invalid_signature"}), 401
        with engine.begin() as conn:
            conn.execute(
                statement,
                {"received_at": datetime.now(timezone.utc), "body": body.decode("utf-8", "replace"), "size": len(body)},
            )
        return jsonify({"status": "accepted"}), 200

    return app

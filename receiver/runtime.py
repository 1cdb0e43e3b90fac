"""What one process shares across requests: settings, the database engine, and keys."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import rsa
from flask import current_app
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from .config import Settings
from .db import make_engine, make_session_factory, writer_turn
from .deliveries import RejectionLimiter
from .group_commit import GroupCommit
from .signature import load_public_key

EXTENSION_KEY = "rm_voucher_sync"


@dataclass
class Runtime:
    """Process-wide resources, built once from validated settings."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    server_public_key: rsa.RSAPublicKey | None
    rejection_limiter: RejectionLimiter
    callbacks: GroupCommit
    _client: object = field(default=None, repr=False)
    _client_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rm_client(self):  # noqa: ANN201 - RMClient; imported lazily to keep start-up light
        """This process's RM client, built on first use; RMNotConfigured without credentials."""
        from .client import RMClient

        with self._client_lock:
            if self._client is None:
                self._client = RMClient.from_settings(self.settings)
            return self._client

    @classmethod
    def from_settings(cls, settings: Settings) -> "Runtime":
        """Create the engine (connections open lazily) and load the callback key."""
        engine = make_engine(
            settings.database_url,
            sqlite_synchronous=settings.sqlite_synchronous,
            sqlite_busy_timeout=settings.sqlite_busy_timeout_seconds,
            pool_size=settings.db_pool_size,
            statement_timeout=settings.db_statement_timeout_seconds,
        )
        key = load_public_key(settings.rm_server_public_key_pem) if settings.rm_server_public_key_pem else None
        sessions = make_session_factory(engine)
        return cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            server_public_key=key,
            rejection_limiter=RejectionLimiter(
                settings.rejected_deliveries_per_minute, settings.rejected_deliveries_total_per_minute
            ),
            callbacks=GroupCommit(engine, turn=writer_turn(engine)),
        )


def current_runtime() -> Runtime:
    """The Runtime of the Flask app handling this request or command."""
    return current_app.extensions[EXTENSION_KEY]

"""Database leases: at most one holder per job across every process sharing the database."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from .models import SchedulerLease, utcnow

log = logging.getLogger(__name__)


def holder_id() -> str:
    """Who we are, for ops reading scheduler_leases: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _lock_row(session: Session, name: str) -> SchedulerLease | None:
    return session.scalars(select(SchedulerLease).where(SchedulerLease.name == name).with_for_update()).one_or_none()


def try_acquire(factory: sessionmaker[Session], name: str, holder: str, ttl: float, now: datetime | None = None) -> bool:
    """Take or extend the lease if it is free, expired, or already ours; False when someone else holds it."""
    now = now or utcnow()
    expires = now + timedelta(seconds=ttl)
    with factory.begin() as session:
        row = _lock_row(session, name)
        if row is None:
            insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
            stmt = (
                insert(SchedulerLease)
                .values(name=name, holder=holder, acquired_at=now, expires_at=expires)
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(SchedulerLease.name)
            )
            if session.execute(stmt).first() is not None:
                return True
            row = _lock_row(session, name)
            assert row is not None
        if row.holder != holder and row.expires_at > now:
            return False
        if row.holder != holder:
            if row.expires_at <= now:
                log.info("taking over lease %s from %s (expired %s)", name, row.holder, row.expires_at.isoformat())
            row.acquired_at = now
        row.holder = holder
        row.expires_at = expires
        return True


def release(factory: sessionmaker[Session], name: str, holder: str) -> None:
    """Give the lease up now, if we still hold it."""
    with factory.begin() as session:
        row = _lock_row(session, name)
        if row is not None and row.holder == holder:
            row.expires_at = utcnow()


class Lease:
    """Hold a lease for the length of a ``with`` block, renewing it in the background.

    ``acquired`` tells whether the block may do the work; ``lost`` is set if a renewal failed
    (database gone, or the lease was taken over), and long jobs should stop early when it is.
    """

    def __init__(self, factory: sessionmaker[Session], name: str, *, ttl: float = 60.0, holder: str | None = None) -> None:
        self.factory = factory
        self.name = name
        self.ttl = ttl
        self.holder = holder or holder_id()
        self.acquired = False
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Lease":
        self.acquired = try_acquire(self.factory, self.name, self.holder, self.ttl)
        if self.acquired:
            self._thread = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
            self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                still_ours = try_acquire(self.factory, self.name, self.holder, self.ttl)
            except Exception as exc:  # noqa: BLE001 - a failed renewal means we must stop, not crash
                log.warning("could not renew lease %s: %s", self.name, type(exc).__name__)
                still_ours = False
            if not still_ours:
                self.lost.set()
                return

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.acquired and not self.lost.is_set():
            try:
                release(self.factory, self.name, self.holder)
            except Exception as exc:  # noqa: BLE001 - it expires on its own
                log.warning("could not release lease %s (it will expire): %s", self.name, type(exc).__name__)

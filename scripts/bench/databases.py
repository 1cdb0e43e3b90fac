"""Throwaway, migrated databases for the benchmarks: a PostgreSQL database on a server, or an SQLite file."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from receiver.db import make_engine, normalise_url
from tests.support import migrate

from .baseline_apps import MINIMAL_TABLE, create_minimal_table

DEFAULT_PG = "postgresql://root@127.0.0.1:5432/postgres"


def log(message: str = "") -> None:
    print(message, flush=True)


class Database:
    """A throwaway, migrated database: a PostgreSQL database on the server, or an SQLite file."""

    def __init__(self, kind: str, tag: str, args: argparse.Namespace, workdir: Path) -> None:
        """``args`` needs .pg_url (an admin URL on the server) and .keep."""
        self.kind = kind
        self.keep = args.keep
        if kind == "sqlite":
            self.path = workdir / f"{tag}.db"
            self.url = f"sqlite:///{self.path}"
        else:
            admin = make_url(normalise_url(args.pg_url))
            self.admin_url = admin
            self.name = f"rmvs_bench_{tag}_{os.getpid()}"
            self.url = admin.set(database=self.name).render_as_string(hide_password=False).replace(
                "postgresql+psycopg://", "postgresql://")

    def __enter__(self) -> "Database":
        if self.kind == "postgresql":
            admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.name}"')
                conn.exec_driver_sql(f'CREATE DATABASE "{self.name}"')
            admin.dispose()
        migrate(self.url)
        self.engine = make_engine(self.url)
        create_minimal_table(self.engine)
        return self

    def counts(self, settle: bool = False) -> dict[str, int]:
        """Rows the phases write, to check every 200 really left its rows (settle: let in-flight requests finish)."""
        if settle:
            time.sleep(1.5)
        with self.engine.connect() as conn:
            out = {f"deliveries_{o}": n for o, n in conn.execute(
                text("SELECT outcome, count(*) FROM webhook_deliveries GROUP BY outcome"))}
            out["events"] = conn.execute(text("SELECT count(*) FROM voucher_events")).scalar_one()
            out["vouchers"] = conn.execute(text("SELECT count(*) FROM vouchers")).scalar_one()
            out["minimal"] = conn.execute(text(f"SELECT count(*) FROM {MINIMAL_TABLE}")).scalar_one()
        return out

    def size(self) -> str:
        if self.kind == "sqlite":
            total = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*"))
            return f"{total / 1e6:.0f} MB (file + WAL)"
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT pg_size_pretty(pg_database_size(current_database()))")).scalar_one()

    def __exit__(self, *exc: object) -> None:
        self.engine.dispose()
        if self.keep:
            log(f"  kept database {self.url}")
            return
        if self.kind == "postgresql":
            admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            admin.dispose()
        else:
            for p in self.path.parent.glob(self.path.name + "*"):
                p.unlink()

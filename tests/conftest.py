"""Shared fixtures: databases (SQLite files and throwaway PostgreSQL databases), app, client, signer."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from receiver.config import load_settings
from receiver.db import normalise_url
from tests.support import (
    Signer,
    fresh_settings_env,
    migrate,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def vectors() -> dict:
    """The RM signature vectors (copied from shared/vectors so a fresh clone has them)."""
    return json.loads((FIXTURES / "rm-signature.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def rm_signer(vectors: dict) -> Signer:
    """Signs callbacks the way RM's server does, with the test server key."""
    return Signer(vectors["rm_server_private_pem"])


def _postgres_admin_url() -> str | None:
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        if os.environ.get("CI") or os.environ.get("REQUIRE_POSTGRES"):
            pytest.fail("TEST_DATABASE_URL is not set, and CI must run the PostgreSQL tests")
        return None
    return normalise_url(url)


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The PostgreSQL server tests create their databases on; skip locally without one, fail in CI."""
    url = _postgres_admin_url()
    if url is None:
        pytest.skip("TEST_DATABASE_URL not set: set it to a PostgreSQL server to run these (CI does, and fails without one)")
    return url


def create_postgres_database(admin_url: str) -> str:
    """Create a throwaway database and return its URL."""
    name = f"rmvs_test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(admin_url: str, url: str) -> None:
    """Drop a throwaway database, closing any sessions a crashed test left behind."""
    name = make_url(url).database
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind: a real SQLite file, and a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'receiver.db'}"
        return
    admin = request.getfixturevalue("postgres_admin_url")
    url = create_postgres_database(admin)
    try:
        yield url
    finally:
        drop_postgres_database(admin, url)


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A throwaway PostgreSQL database at the migration head (tests that only make sense there)."""
    url = create_postgres_database(postgres_admin_url)
    try:
        migrate(url, "head")
        yield url
    finally:
        drop_postgres_database(postgres_admin_url, url)


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """A database at the migration head."""
    migrate(database_url, "head")
    return database_url


@pytest.fixture
def settings_env(migrated_url: str, vectors: dict, tmp_path: Path) -> dict[str, str]:
    """Environment for an app that trusts the test RM server key."""
    return fresh_settings_env(migrated_url, vectors, tmp_path)


@pytest.fixture
def app(settings_env: dict[str, str]):  # noqa: ANN201
    """The Flask app, built by the real factory from environment-style settings."""
    from receiver import create_app

    application = create_app(load_settings(settings_env))
    yield application
    application.extensions["rm_voucher_sync"].engine.dispose()


@pytest.fixture
def client(app):  # noqa: ANN001, ANN201
    """Flask's test client for the app."""
    return app.test_client()


@pytest.fixture
def db(app):  # noqa: ANN001, ANN201
    """A session factory on the app's database, for assertions."""
    return app.extensions["rm_voucher_sync"].sessions


@pytest.fixture
def fake_rm(vectors: dict):  # noqa: ANN201
    """A fake RM on a real port: verifies our signatures with the merchant key, signs callbacks as RM's server."""
    from receiver.fake_rm import FakeRM

    fake = FakeRM(
        merchant_public_pem=vectors["merchant_public_pem"],
        server_private_pem=vectors["rm_server_private_pem"],
        seed=1234,
    )
    fake.serve()
    yield fake
    fake.shutdown()


def rm_client_env(fake, vectors: dict) -> dict[str, str]:  # noqa: ANN001
    """Environment that points the RM client at a fake RM with the test merchant key."""
    return {
        "RM_API_BASE_URL": fake.base_url,
        "RM_OAUTH_BASE_URL": fake.base_url,
        "RM_CLIENT_ID": fake.client_id,
        "RM_CLIENT_SECRET": fake.client_secret,
        "RM_PRIVATE_KEY": vectors["merchant_private_pem"],
        "RM_RETRY_BACKOFF_SECONDS": "0.01",
        "RM_TIMEOUT_SECONDS": "2",
    }


@pytest.fixture
def rm_client(fake_rm, vectors: dict):  # noqa: ANN001, ANN201
    """Our RM client, configured from settings, talking to the fake RM."""
    from receiver.client import RMClient

    settings = load_settings({"RM_INSECURE_SKIP_SIGNATURE": "1", **rm_client_env(fake_rm, vectors)})
    client = RMClient.from_settings(settings, max_requests_per_second=1000.0)
    yield client
    client.close()

"""Configuration: validated at start-up, one clear line naming the variable, secrets never shown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from receiver.config import ConfigError, default_web_concurrency, load_settings
from tests.support import ROOT, child_environ, fresh_settings_env


def _base(vectors: dict) -> dict[str, str]:
    return {"RM_SERVER_PUBLIC_KEY": vectors["rm_server_public_pem"]}


def test_defaults(vectors: dict) -> None:
    s = load_settings(_base(vectors))
    assert s.database_url == "sqlite:///instance/receiver.db"
    assert s.rm_api_base_url == "https://sb-open.revenuemonster.my"
    assert s.rm_oauth_base_url == "https://sb-oauth.revenuemonster.my"
    assert (s.signature_max_age_seconds, s.reconcile_interval_seconds, s.reconcile_stale_after_seconds) == (900, 300, 3600)
    assert (s.reconcile_concurrency, s.rm_max_requests_per_second) == (8, 20.0)
    assert s.ops_api_token is None and not s.rm_credentials_configured
    assert s.sqlite_synchronous == "FULL"
    assert s.db_statement_timeout_seconds == 10.0


def test_production_hosts_and_overrides(vectors: dict) -> None:
    s = load_settings({**_base(vectors), "RM_ENVIRONMENT": "production"})
    assert s.rm_api_base_url == "https://open.revenuemonster.my"
    s = load_settings({**_base(vectors), "RM_API_BASE_URL": "http://127.0.0.1:9/", "RM_OAUTH_BASE_URL": "http://x"})
    assert (s.rm_api_base_url, s.rm_oauth_base_url) == ("http://127.0.0.1:9", "http://x")


def test_refuses_to_start_without_a_server_key() -> None:
    with pytest.raises(ConfigError, match="RM_SERVER_PUBLIC_KEY"):
        load_settings({})
    s = load_settings({"RM_INSECURE_SKIP_SIGNATURE": "1"})
    assert s.insecure_skip_signature and s.rm_server_public_key_pem is None


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"RM_ENVIRONMENT": "staging"}, "RM_ENVIRONMENT"),
        ({"RM_SIGNATURE_MAX_AGE_SECONDS": "ten"}, "RM_SIGNATURE_MAX_AGE_SECONDS"),
        ({"RM_SIGNATURE_MAX_AGE_SECONDS": "-1"}, "RM_SIGNATURE_MAX_AGE_SECONDS"),
        ({"RECONCILE_INTERVAL_SECONDS": "0"}, "RECONCILE_INTERVAL_SECONDS"),
        ({"RECONCILE_CONCURRENCY": "0"}, "RECONCILE_CONCURRENCY"),
        ({"RM_MAX_REQUESTS_PER_SECOND": "0"}, "RM_MAX_REQUESTS_PER_SECOND"),
        ({"RM_API_BASE_URL": "ftp://x"}, "RM_API_BASE_URL"),
        ({"RM_CLIENT_ID": "abc"}, "RM_CLIENT_SECRET"),
        ({"RM_CLIENT_SECRET": "abc"}, "RM_CLIENT_ID"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"RM_INSECURE_SKIP_SIGNATURE": "maybe"}, "RM_INSECURE_SKIP_SIGNATURE"),
        ({"RM_VOUCHER_LOOKUP_METHOD": "PUT"}, "RM_VOUCHER_LOOKUP_METHOD"),
        ({"SQLITE_SYNCHRONOUS": "OFF"}, "SQLITE_SYNCHRONOUS"),
        ({"DB_STATEMENT_TIMEOUT_SECONDS": "0"}, "DB_STATEMENT_TIMEOUT_SECONDS"),
        ({"WEB_CLIENT_TIMEOUT_SECONDS": "soon"}, "WEB_CLIENT_TIMEOUT_SECONDS"),
    ],
)
def test_bad_values_name_the_variable(vectors: dict, env: dict, variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**_base(vectors), **env})
    message = str(info.value)
    assert variable in message and "\n" not in message


def test_keys_from_files_and_never_echoed(vectors: dict, tmp_path: Path) -> None:
    pub = tmp_path / "pub.pem"
    pub.write_text(vectors["rm_server_public_pem"])
    s = load_settings({"RM_SERVER_PUBLIC_KEY_FILE": str(pub), "RM_PRIVATE_KEY": vectors["merchant_private_pem"],
                       "RM_CLIENT_ID": "id", "RM_CLIENT_SECRET": "very-secret-value", "OPS_API_TOKEN": "tok-123456"})
    assert s.rm_credentials_configured
    shown = repr(s)
    for secret in ("very-secret-value", "tok-123456", "PRIVATE KEY"):
        assert secret not in shown

    with pytest.raises(ConfigError, match="not both"):
        load_settings({"RM_SERVER_PUBLIC_KEY_FILE": str(pub), "RM_SERVER_PUBLIC_KEY": vectors["rm_server_public_pem"]})
    with pytest.raises(ConfigError, match="RM_SERVER_PUBLIC_KEY_FILE cannot be read"):
        load_settings({"RM_SERVER_PUBLIC_KEY_FILE": str(tmp_path / "missing.pem")})
    garbage = "-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END RSA PRIVATE KEY-----"
    with pytest.raises(ConfigError) as info:
        load_settings({**_base(vectors), "RM_PRIVATE_KEY": garbage})
    assert "RM_PRIVATE_KEY is not a PEM-encoded RSA private key" == str(info.value)
    assert "c2VjcmV0" not in str(info.value)


def test_env_example_lists_every_variable_the_code_reads() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = (root / "receiver" / "config.py").read_text() + (root / "gunicorn.conf.py").read_text()
    read = set(re.findall(r'"([A-Z][A-Z0-9_]{3,})"', code)) - {"FULL", "NORMAL", "EXTRA", "GET", "POST", "INFO",
                                                                "DEBUG", "WARNING", "ERROR"}
    read |= {f"{name}_FILE" for name in ("RM_SERVER_PUBLIC_KEY", "RM_PRIVATE_KEY")}
    listed = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", (root / ".env.example").read_text(), re.M))
    assert read - listed == set(), "variables read but not documented in .env.example"
    assert listed - read == set(), "variables documented but never read"


def test_default_workers_and_threads_per_database(tmp_path: Path) -> None:
    """gunicorn.conf.py: cores + 1 workers, threaded (group commit) on either database unless WEB_THREADS says."""
    assert default_web_concurrency(2) == 3
    assert default_web_concurrency(4) == 5
    probe = (
        f"import json, runpy; c = runpy.run_path({str(ROOT / 'gunicorn.conf.py')!r}); "
        "print(json.dumps([c['threads'], c['worker_class']]))"
    )
    seen = {}
    for url, threads in [("sqlite:///x.db", ""), ("postgresql://root@127.0.0.1/db", ""), ("sqlite:///x.db", "1")]:
        # Outside the checkout, so a developer's .env cannot set WEB_THREADS.
        out = subprocess.run(
            [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
            env=child_environ({"DATABASE_URL": url, "WEB_THREADS": threads, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}),
        ).stdout
        seen[(url.split(":")[0], threads)] = tuple(json.loads(out.splitlines()[-1]))
    assert seen == {
        ("sqlite", ""): (8, "receiver.gunicorn_worker.AcceptingThreadsWorker"),
        ("postgresql", ""): (8, "receiver.gunicorn_worker.AcceptingThreadsWorker"),
        ("sqlite", "1"): (1, "sync"),
    }


def test_workers_freeze_the_loaded_app_out_of_full_collections(vectors: dict, tmp_path: Path) -> None:
    """gunicorn.conf.py's post_worker_init: full GC collections stop walking the app's start-up objects."""
    # In a child process: freezing is process-wide and would change this test process's collector.
    probe = (
        "import gc, json, runpy\n"
        "conf = runpy.run_path('gunicorn.conf.py')\n"
        "from receiver import create_app\n"
        "create_app()\n"
        "gc.collect()\n"
        "before = len(gc.get_objects())\n"
        "conf['post_worker_init'](None)\n"
        "print(json.dumps({'before': before, 'after': len(gc.get_objects()), 'frozen': gc.get_freeze_count()}))\n"
    )
    env = child_environ(fresh_settings_env(f"sqlite:///{tmp_path / 'app.db'}", vectors, tmp_path))
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["before"] > 20_000  # the loaded app: Flask, SQLAlchemy, cryptography, psycopg
    assert counts["frozen"] >= counts["before"]
    assert counts["after"] < counts["before"] / 20  # what a full collection still walks

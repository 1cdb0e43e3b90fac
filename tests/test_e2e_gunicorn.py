"""End to end through the real web process: `gunicorn "receiver:create_app()"` over HTTP."""

from __future__ import annotations

import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import requests
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from receiver.db import WriterTurn, make_engine, make_session_factory
from receiver.models import Voucher, VoucherEvent, WebhookDelivery
from tests.support import (
    CALLBACK_PATH,
    ROOT,
    Gunicorn,
    TcpProxy,
    callback_body,
    fresh_settings_env,
    gunicorn_server,
    migrate,
    voucher_item,
)

pytestmark = pytest.mark.e2e

STATUSES = ["VALID", "VALID", "ISSUE", "ISSUE", "ISSUE", "REDEEMED", "REDEEMED", "REDEEMED", "REDEEMED", "VOID"]


def test_concurrent_deliveries_for_one_code_serialise(migrated_url, vectors, tmp_path, rm_signer) -> None:  # noqa: ANN001
    """50 threads post 10 snapshots of one voucher (5 copies each) in random order, all at once."""
    snapshots = [callback_body(voucher_item("RACE1", s, step=i, amount=100 + i)) for i, s in enumerate(STATUSES)]
    posts = [body for body in snapshots for _ in range(5)]
    random.Random(7).shuffle(posts)
    env = fresh_settings_env(migrated_url, vectors, tmp_path)
    barrier = threading.Barrier(len(posts))

    with gunicorn_server(env, workers=4) as base:
        def send(body: bytes) -> int:
            headers = rm_signer.headers(body)
            barrier.wait()
            return requests.post(base + CALLBACK_PATH, data=body, headers=headers, timeout=30).status_code

        with ThreadPoolExecutor(len(posts)) as pool:
            codes = list(pool.map(send, posts))

    assert codes == [200] * len(posts)
    engine = make_engine(migrated_url)
    try:
        with make_session_factory(engine)() as s:
            v = s.scalars(select(Voucher).where(Voucher.code == "RACE1")).one()
            evs = s.scalars(select(VoucherEvent).where(VoucherEvent.voucher_code == "RACE1")).all()
            deliveries = s.scalars(select(WebhookDelivery)).all()
    finally:
        engine.dispose()
    assert v.status == "VOID" and v.amount == 109 and v.rm_updated_at.second == 9
    assert len(evs) == 10 and len({e.snapshot_sha256 for e in evs}) == 10
    assert {e.outcome for e in evs} <= {"applied", "stale"}
    assert len(deliveries) == 10 and sum(d.attempts for d in deliveries) == 50
    assert {d.outcome for d in deliveries} <= {"accepted", "stale", "duplicate"}


def test_threaded_workers_close_each_connection_so_load_spreads(migrated_url, vectors, tmp_path) -> None:  # noqa: ANN001
    """A keep-alive client gets `Connection: close`: no worker keeps a long-lived connection to itself.

    With keep-alive, a threaded worker served every request of the connections it had accepted;
    a load generator's 16 connections landed 16/0/0 or 12/4/0 on 3 workers (docs/performance.md).
    """
    env = {**fresh_settings_env(migrated_url, vectors, tmp_path), "WEB_THREADS": "4"}
    with gunicorn_server(env, workers=2) as base, requests.Session() as http:
        answers = [http.get(base + "/healthz", timeout=10) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers.get("Connection", "").lower() for a in answers] == ["close"] * 3


@contextmanager
def _one_worker(tmp_path, vectors, **env: str) -> Iterator[tuple[Gunicorn, Path]]:  # noqa: ANN001
    """One web worker, with the default threads, on a fresh SQLite file: (server, the file)."""
    path = tmp_path / "receiver.db"
    url = f"sqlite:///{path}"
    migrate(url)
    server = Gunicorn(fresh_settings_env(url, vectors, tmp_path, **env), workers=1).start()
    try:
        yield server, path
    finally:
        server.stop()


@contextmanager
def _callbacks_waiting_for_the_turn(server: Gunicorn, path: Path, signer, codes: list[str]) -> Iterator[list]:  # noqa: ANN001
    """One ISSUE callback per code, posted all at once while the test holds the SQLite writer turn.

    Yields the futures of their responses once every request is in the worker, its transaction
    waiting for the turn; the turn is released when the block ends.
    """
    with WriterTurn(f"{path}-writer.lock", 10).hold():
        pool = ThreadPoolExecutor(len(codes))
        bodies = [callback_body(voucher_item(code, "ISSUE")) for code in codes]
        futures = [
            pool.submit(requests.post, server.base + CALLBACK_PATH, data=b, headers=signer.headers(b), timeout=30)
            for b in bodies
        ]
        pool.shutdown(wait=False)
        time.sleep(1.0)
        assert not any(f.done() for f in futures), "no callback can commit while the test holds the turn"
        yield futures


def test_one_threaded_worker_answers_callbacks_at_once_and_commits_them_together(tmp_path, vectors, rm_signer) -> None:  # noqa: ANN001
    """The default worker (receiver.gunicorn_worker): one process takes callbacks in parallel threads.

    The first callback's transaction waits for the writer turn the test holds, and the others,
    arriving meanwhile in other threads of the same process, queue for the next group. One sync
    worker would take them one at a time: six transactions.
    """
    with _one_worker(tmp_path, vectors) as (server, path):
        with _callbacks_waiting_for_the_turn(server, path, rm_signer, [f"PAR{i}" for i in range(6)]) as futures:
            pass
        answers = [f.result() for f in futures]
        assert [(a.status_code, a.json()) for a in answers] == [(200, {"status": "accepted"})] * 6
        metrics = requests.get(server.base + "/metrics", timeout=10).text
        samples = dict(re.findall(r"^(rmvs_group_commit_callbacks_(?:count|sum)) (\S+)$", metrics, re.M))
        assert float(samples["rmvs_group_commit_callbacks_sum"]) == 6
        assert float(samples["rmvs_group_commit_callbacks_count"]) <= 3, samples
    assert sqlite3.connect(path).execute("SELECT count(*) FROM vouchers WHERE status = 'ISSUE'").fetchone() == (6,)


def test_connections_that_send_nothing_cannot_take_every_thread(tmp_path, vectors, rm_signer) -> None:  # noqa: ANN001
    """More idle connections than the worker has threads: each is dropped after WEB_CLIENT_TIMEOUT_SECONDS, and callbacks get through."""
    with _one_worker(tmp_path, vectors, WEB_CLIENT_TIMEOUT_SECONDS="1") as (server, path):
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]  # 8 threads
        try:
            time.sleep(0.3)
            body = callback_body(voucher_item("IDLEFREE", "ISSUE"))
            started = time.monotonic()
            answer = requests.post(server.base + CALLBACK_PATH, data=body, headers=rm_signer.headers(body), timeout=20)
            assert answer.status_code == 200 and time.monotonic() - started < 4
            # The server closed them: each reads end-of-file.
            for conn in idle:
                conn.settimeout(5)
                assert conn.recv(1) == b""
        finally:
            for conn in idle:
                conn.close()
        assert "that sent nothing for 1 s" in server.log_tail()
    assert sqlite3.connect(path).execute("SELECT status FROM vouchers WHERE code = 'IDLEFREE'").fetchone() == ("ISSUE",)


def test_a_callback_whose_body_stops_coming_is_a_recorded_400(tmp_path, vectors, rm_signer) -> None:  # noqa: ANN001
    """Headers promise a body that never arrives: 400 malformed after WEB_CLIENT_TIMEOUT_SECONDS, the delivery recorded, the thread free."""
    with _one_worker(tmp_path, vectors, WEB_CLIENT_TIMEOUT_SECONDS="1") as (server, path):
        body = callback_body(voucher_item("HALFBODY", "ISSUE"))
        head = (
            f"POST {CALLBACK_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in rm_signer.headers(body).items() if k != "Content-Type")
            + "\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(head + body[: len(body) // 2])
            started = time.monotonic()
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 ") and b'"malformed"' in answer and b"incomplete" in answer, answer
        assert 0.9 < time.monotonic() - started < 5
        assert "Traceback" not in server.log_tail()
    row = sqlite3.connect(path).execute("SELECT outcome, http_status, body_truncated, error FROM webhook_deliveries").fetchall()
    assert [(r[0], r[1], r[2]) for r in row] == [("rejected_malformed", 400, 1)] and "incomplete" in row[0][3]
    assert sqlite3.connect(path).execute("SELECT count(*) FROM vouchers").fetchone() == (0,)


def test_sigterm_lets_the_threads_finish_the_callbacks_in_hand(tmp_path, vectors, rm_signer) -> None:  # noqa: ANN001
    """A graceful stop (SIGTERM to the master) answers and commits every callback already accepted."""
    with _one_worker(tmp_path, vectors) as (server, path):
        with _callbacks_waiting_for_the_turn(server, path, rm_signer, [f"TERM{i}" for i in range(4)]) as futures:
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)  # the worker has been told to stop while its threads wait for the turn
            assert not any(f.done() for f in futures)
        assert [f.result().status_code for f in futures] == [200] * 4
        assert server.proc.wait(timeout=15) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(server.base + "/healthz", timeout=5)
    assert sqlite3.connect(path).execute("SELECT count(*) FROM vouchers WHERE code LIKE 'TERM%'").fetchone() == (4,)


def test_sqlite_locked_database_is_503_then_recovers(tmp_path, vectors, rm_signer) -> None:  # noqa: ANN001
    path = tmp_path / "receiver.db"
    url = f"sqlite:///{path}"
    migrate(url)
    env = fresh_settings_env(url, vectors, tmp_path, SQLITE_BUSY_TIMEOUT_SECONDS="1")
    body = callback_body(voucher_item("DOWN1", "ISSUE"))
    with gunicorn_server(env, workers=2) as base:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            for _ in range(3):
                r = requests.post(base + CALLBACK_PATH, data=body, headers=rm_signer.headers(body), timeout=30)
                assert r.status_code == 503 and r.json() == {"error": "unavailable"}
        finally:
            blocker.rollback()
            blocker.close()
        assert sqlite3.connect(path).execute("SELECT count(*) FROM vouchers").fetchone() == (0,)
        r = requests.post(base + CALLBACK_PATH, data=body, headers=rm_signer.headers(body), timeout=30)
        assert r.status_code == 200 and r.json() == {"status": "accepted"}
    assert sqlite3.connect(path).execute("SELECT status FROM vouchers WHERE code='DOWN1'").fetchone() == ("ISSUE",)


@pytest.mark.postgres
def test_postgres_outage_is_503_then_recovers_without_restart(postgres_admin_url, vectors, tmp_path, rm_signer) -> None:  # noqa: ANN001
    from tests.conftest import create_postgres_database, drop_postgres_database
    real_url = create_postgres_database(postgres_admin_url)
    proxy = None
    try:
        migrate(real_url)
        parsed = make_url(real_url)
        proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
        via_proxy = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        env = fresh_settings_env(via_proxy, vectors, tmp_path)
        first = callback_body(voucher_item("PGDOWN1", "ISSUE", step=1))
        second = callback_body(voucher_item("PGDOWN1", "VOID", step=2))
        with gunicorn_server(env, workers=2) as base:
            def send(body: bytes) -> requests.Response:
                return requests.post(base + CALLBACK_PATH, data=body, headers=rm_signer.headers(body), timeout=30)

            assert send(first).json() == {"status": "accepted"}
            proxy.cut()
            outage = [send(second).status_code for _ in range(4)]
            assert outage == [503] * 4
            assert requests.get(base + "/readyz", timeout=30).status_code == 503
            proxy.restore()
            r = send(second)
            assert r.status_code == 200 and r.json() == {"status": "accepted"}
            assert requests.get(base + "/readyz", timeout=30).status_code == 200
        engine = make_engine(real_url)
        try:
            with make_session_factory(engine)() as s:
                assert s.scalar(select(Voucher.status).where(Voucher.code == "PGDOWN1")) == "VOID"
                assert s.scalar(select(func.count()).select_from(VoucherEvent)) == 2
        finally:
            engine.dispose()
    finally:
        if proxy is not None:
            proxy.close()
        drop_postgres_database(postgres_admin_url, real_url)


def test_web_process_refuses_to_start_without_a_key(tmp_path) -> None:  # noqa: ANN001
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "receiver:create_app()", "-c", str(ROOT / "gunicorn.conf.py"),
         "--bind", "127.0.0.1:0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "configuration error" in line]
    assert len(errors) == 1 and "RM_SERVER_PUBLIC_KEY" in errors[0]
    assert "Traceback" not in proc.stderr

"""Faults under load: workers and the master killed with SIGKILL, the database taken away mid-burst."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import threading
import time
from typing import Iterator

import pytest
import requests
from sqlalchemy import select
from sqlalchemy.engine import make_url

from receiver.db import make_engine, make_session_factory
from receiver.fake_rm import CallbackPlan
from receiver.models import Voucher, VoucherEvent, WebhookDelivery
from receiver.snapshot import parse_rm_time, snapshot_from_item
from tests.support import CALLBACK_PATH, Gunicorn, TcpProxy, callback_body, fresh_settings_env, voucher_item

pytestmark = pytest.mark.e2e


def test_sigkill_workers_and_master_under_load_loses_nothing(settings_env, db, fake_rm) -> None:  # noqa: ANN001
    """Every callback that got a 200 is stored; the rest come back with RM's retries and apply exactly once."""
    codes = fake_rm.create_vouchers(120, prefix="K")
    changes = fake_rm.live(codes)
    # RM retries a minute apart; 1.5 s keeps the test short while a master restart (~1-2 s on a
    # busy 2-core machine) still fits well inside the four retry gaps.
    plan = CallbackPlan(attempts=5, interval=1.5)
    server = Gunicorn(settings_env, workers=3).start()
    statuses: list[int | None] = []
    sender = threading.Thread(
        target=lambda: statuses.extend(fake_rm.deliver(server.base + CALLBACK_PATH, changes, plan, workers=8))
    )

    def sent_at_least(fraction: float) -> None:
        # Kills follow the sender's progress, not the clock: on a fast run a fixed schedule found
        # every callback already delivered, and nothing was left to lose.
        deadline = time.monotonic() + 60
        while fake_rm.callbacks_sent < fraction * len(changes) and time.monotonic() < deadline:
            time.sleep(0.001)

    try:
        sender.start()
        rnd = random.Random(5)
        for fraction in (0.1, 0.2, 0.3):
            sent_at_least(fraction)
            pids = server.worker_pids()
            if pids:
                os.kill(rnd.choice(pids), signal.SIGKILL)
        sent_at_least(0.45)
        assert sender.is_alive(), "the master must die with callbacks still to send"
        server.kill_master()
        server.start()  # same port: RM's retries find it again
        sender.join(timeout=180)
    finally:
        server.stop()
    assert not sender.is_alive()
    assert statuses == [200] * len(changes), f"{statuses.count(200)} of {len(changes)} got a 200"
    assert fake_rm.callbacks_sent > len(changes), "some callbacks must have needed a retry"

    with db() as s:
        ours = {v.code: (v.status, v.rm_updated_ns) for v in s.scalars(select(Voucher))}
        events = s.scalars(select(VoucherEvent)).all()
    rm = {c: (fake_rm.vouchers[c]["status"], parse_rm_time(fake_rm.vouchers[c]["updatedAt"]).ns) for c in codes}
    assert {c: ours[c] for c in rm if c in ours} == {c: v for c, v in rm.items() if c in ours}
    expected = sorted(snapshot_from_item(c).fingerprint for c in changes)
    assert sorted(e.snapshot_sha256 for e in events) == expected, "each snapshot recorded exactly once"


def test_workers_of_a_killed_master_exit_at_once(settings_env) -> None:  # noqa: ANN001
    """A kill -9'd master's idle workers stop at once (not after their 15 s poll), freeing the port for a restart."""
    server = Gunicorn({**settings_env, "WEB_THREADS": "1"}, workers=2).start()
    try:
        deadline = time.monotonic() + 15
        while len(server.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # /healthz answers as soon as the first worker is up
        assert len(server.worker_pids()) == 2
        # An idle sync worker polls its parent only every timeout/2 (15 s); the post_fork hook's
        # parent-death signal is what makes this quick.
        exited_after = server.kill_master()
        assert exited_after < 3, f"orphaned workers still ran {exited_after:.1f}s after the master died"
        server.start()
        assert requests.get(server.base + "/healthz", timeout=5).status_code == 200
    finally:
        server.stop()


def _burst(base: str, signer, stop: threading.Event, results: list, prefix: str) -> None:  # noqa: ANN001
    i = 0
    while not stop.is_set():
        body = callback_body(voucher_item(f"{prefix}{threading.get_ident() % 1000}-{i}", "ISSUE"))
        i += 1
        started = time.monotonic()
        try:
            status = requests.post(base + CALLBACK_PATH, data=body, headers=signer.headers(body), timeout=30).status_code
        except requests.RequestException:
            status = None
        results.append((hashlib.sha256(body).hexdigest(), status, started))


def _run_burst(base: str, signer, outage_start, outage_end, prefix: str) -> list:  # noqa: ANN001
    stop = threading.Event()
    results: list = []
    threads = [threading.Thread(target=_burst, args=(base, signer, stop, results, prefix)) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    outage_start()
    cut_at = time.monotonic()
    time.sleep(2.0)
    outage_end()
    restored_at = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    return results, cut_at, restored_at


def _assert_no_200_without_commit(url: str, results: list, cut_at: float, restored_at: float) -> None:
    assert {status for _, status, _ in results} <= {200, 503}, {status for _, status, _ in results}
    # Times are when each request was sent.
    during = [status for _, status, at in results if cut_at + 0.2 < at < restored_at - 0.2]
    after = [status for _, status, at in results if at > restored_at + 0.5]
    assert 503 in during, "the outage must be visible as 503"
    assert after and set(after) == {200}, "full recovery without restarting the service"
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as s:
            stored = set(s.scalars(select(WebhookDelivery.dedupe_key)))
    finally:
        engine.dispose()
    answered_ok = {sha for sha, status, _ in results if status == 200}
    assert answered_ok <= stored, f"{len(answered_ok - stored)} callbacks got a 200 but are not in the database"


@contextlib.contextmanager
def _postgres_behind_a_proxy(admin_url: str, vectors: dict, tmp_path, workers: int, **env: str) -> Iterator[tuple[str, TcpProxy, Gunicorn]]:  # noqa: ANN001
    """A throwaway database, a TcpProxy in front of it, and gunicorn connected through the proxy: (url, proxy, server)."""
    from tests.conftest import create_postgres_database, drop_postgres_database
    from tests.support import migrate

    url = create_postgres_database(admin_url)
    proxy = server = None
    try:
        migrate(url)
        parsed = make_url(url)
        proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432)
        via_proxy = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        server = Gunicorn(fresh_settings_env(via_proxy, vectors, tmp_path, **env), workers=workers).start()
        yield url, proxy, server
    finally:
        if server is not None:
            server.stop()
        if proxy is not None:
            proxy.close()
        drop_postgres_database(admin_url, url)


@pytest.mark.postgres
def test_postgres_outage_mid_burst_only_503_and_recovers(postgres_admin_url, vectors, tmp_path, rm_signer) -> None:  # noqa: ANN001
    with _postgres_behind_a_proxy(postgres_admin_url, vectors, tmp_path, workers=3) as (url, proxy, server):
        results, cut_at, restored_at = _run_burst(server.base, rm_signer, proxy.cut, proxy.restore, "PGB")
        _assert_no_200_without_commit(url, results, cut_at, restored_at)


def test_sqlite_locked_mid_burst_only_503_and_recovers(tmp_path, vectors, rm_signer) -> None:  # noqa: ANN001
    from tests.support import migrate

    path = tmp_path / "receiver.db"
    url = f"sqlite:///{path}"
    migrate(url)
    server = Gunicorn(fresh_settings_env(url, vectors, tmp_path, SQLITE_BUSY_TIMEOUT_SECONDS="0.5"), workers=3).start()
    blocker = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        results, cut_at, restored_at = _run_burst(
            server.base, rm_signer, lambda: blocker.execute("BEGIN EXCLUSIVE"), lambda: blocker.execute("ROLLBACK"),
            "SQB",
        )
    finally:
        blocker.close()
        server.stop()
    _assert_no_200_without_commit(url, results, cut_at, restored_at)


@pytest.mark.postgres
def test_callback_right_after_a_postgres_restart_is_applied_not_refused(postgres_url, postgres_admin_url, vectors, tmp_path, rm_signer) -> None:  # noqa: ANN001
    """Every server connection ended (a restart) moments after a callback: the next callback gets its 200 at once."""
    from tests.support import terminate_backends

    # One worker, so the next callback meets the pooled connection the first one left behind.
    server = Gunicorn(fresh_settings_env(postgres_url, vectors, tmp_path), workers=1).start()
    try:
        def post(status: str, step: int) -> requests.Response:
            body = callback_body(voucher_item("PGRESTART", status, step))
            return requests.post(server.base + CALLBACK_PATH, data=body, headers=rm_signer.headers(body), timeout=30)

        assert post("VALID", 0).status_code == 200
        for step, status in ((1, "ISSUE"), (2, "REDEEMED")):
            assert terminate_backends(postgres_admin_url, postgres_url) >= 1
            # Within PING_AFTER_IDLE_SECONDS of its last use the connection is not checked first.
            answer = post(status, step)
            assert answer.status_code == 200, answer.text
        engine = make_engine(postgres_url)
        try:
            with make_session_factory(engine)() as s:
                assert s.scalar(select(Voucher.status).where(Voucher.code == "PGRESTART")) == "REDEEMED"
        finally:
            engine.dispose()
        assert "retrying once on a new one" in server.log_path.read_text()
    finally:
        server.stop()


@pytest.mark.postgres
def test_readyz_right_after_a_postgres_restart_is_ready(postgres_url, postgres_admin_url, vectors, tmp_path) -> None:  # noqa: ANN001
    """A readiness probe that meets a pooled connection the restart killed says ready, as the database is."""
    from tests.support import terminate_backends

    server = Gunicorn(fresh_settings_env(postgres_url, vectors, tmp_path), workers=1).start()
    try:
        assert requests.get(server.base + "/readyz", timeout=30).status_code == 200
        for _ in range(2):
            assert terminate_backends(postgres_admin_url, postgres_url) >= 1
            # Within PING_AFTER_IDLE_SECONDS of its last use the pooled connection is not checked first.
            ready = requests.get(server.base + "/readyz", timeout=30)
            assert ready.status_code == 200, ready.text
    finally:
        server.stop()


def _post(base: str, signer, code: str, status: str, step: int, timeout: float = 30) -> tuple[int | None, float]:  # noqa: ANN001
    body = callback_body(voucher_item(code, status, step))
    started = time.monotonic()
    try:
        answer = requests.post(base + CALLBACK_PATH, data=body, headers=signer.headers(body), timeout=timeout)
    except requests.RequestException:
        return None, time.monotonic() - started
    return answer.status_code, time.monotonic() - started


def _history(url: str, code: str) -> tuple[str | None, list[str]]:
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as s:
            status = s.scalar(select(Voucher.status).where(Voucher.code == code))
            events = list(s.scalars(select(VoucherEvent.to_status).where(VoucherEvent.voucher_code == code).order_by(VoucherEvent.id)))
    finally:
        engine.dispose()
    return status, events


@pytest.mark.postgres
def test_a_callback_waiting_on_a_locked_voucher_gets_503_in_bounded_time(postgres_url, vectors, tmp_path, rm_signer) -> None:  # noqa: ANN001
    """An operator's open transaction holds the voucher's row: the callback gives up after DB_STATEMENT_TIMEOUT_SECONDS (503), RM's retry applies it once."""
    from sqlalchemy import create_engine, text

    server = Gunicorn(fresh_settings_env(postgres_url, vectors, tmp_path, DB_STATEMENT_TIMEOUT_SECONDS="1"), workers=1).start()
    operator = create_engine(postgres_url)
    try:
        assert _post(server.base, rm_signer, "PGLOCKED", "VALID", 0)[0] == 200
        with operator.connect() as psql:
            psql.execute(text("SELECT id FROM vouchers WHERE code = 'PGLOCKED' FOR UPDATE"))
            status, took = _post(server.base, rm_signer, "PGLOCKED", "ISSUE", 1)
            assert status == 503 and 0.9 < took < 5, (status, took)
            # Nothing of it was kept, and other vouchers are not held up meanwhile.
            assert _post(server.base, rm_signer, "PGFREE", "VALID", 0)[0] == 200
            psql.rollback()
        # RM's retry: the same body, applied as new (the first attempt left no delivery behind).
        assert _post(server.base, rm_signer, "PGLOCKED", "ISSUE", 1)[0] == 200
        assert _history(postgres_url, "PGLOCKED") == ("ISSUE", ["VALID", "ISSUE"])
        assert "canceling statement due to statement timeout" not in server.log_tail()  # no traceback, a warning
        assert "database unavailable for callback: OperationalError" in server.log_tail()
    finally:
        operator.dispose()
        server.stop()


@pytest.mark.postgres
def test_a_database_server_that_stops_answering_gets_503s_then_recovers(postgres_admin_url, vectors, tmp_path, rm_signer) -> None:  # noqa: ANN001
    """The connections stay open but nothing comes back: callbacks get 503 in bounded time, not a hung worker; then full recovery."""
    with _postgres_behind_a_proxy(postgres_admin_url, vectors, tmp_path, workers=1, DB_STATEMENT_TIMEOUT_SECONDS="1") as (url, proxy, server):
        assert _post(server.base, rm_signer, "PGHUNG-0", "VALID", 0)[0] == 200
        proxy.stall()
        answers: dict[str, tuple] = {}
        threads = [
            threading.Thread(target=lambda c=f"PGHUNG-{i}": answers.__setitem__(c, _post(server.base, rm_signer, c, "ISSUE", 1, timeout=25)))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # 1 s + 2 s of patience for the first group; a later group waits for it, then up to 5 s
        # for a new connection (connect_timeout). Not asked again on a new connection: it is hung.
        assert all(status == 503 and took < 10 for status, took in answers.values()), answers
        proxy.restore()
        for code in answers:  # RM's retries
            assert _post(server.base, rm_signer, code, "ISSUE", 1)[0] == 200
        for code in answers:
            assert _history(url, code)[0] == "ISSUE"
        assert _history(url, "PGHUNG-0") == ("ISSUE", ["VALID", "ISSUE"])

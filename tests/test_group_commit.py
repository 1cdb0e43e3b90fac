"""Group commit: callbacks that arrive together share a transaction (SQLite file and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import secrets
import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, make_url, select, text

from receiver.db import WriterTurn, WriterTurnTimeout, is_unavailable, make_engine
from receiver.deliveries import NonceReused, accept_verified
from receiver.group_commit import GroupCommit, _Waiting
from receiver.metrics import GROUP_COMMIT_CALLBACKS
from receiver.models import DeliveryOutcome, Voucher, VoucherEvent, WebhookDelivery
from tests.support import TcpProxy, terminate_backends, verified_callback


def _group_totals() -> tuple[float, float]:
    """(transactions, callbacks) counted by the rmvs_group_commit_callbacks histogram so far."""
    samples = {s.name: s.value for s in GROUP_COMMIT_CALLBACKS.collect()[0].samples}
    return samples["rmvs_group_commit_callbacks_count"], samples["rmvs_group_commit_callbacks_sum"]


@contextmanager
def _writes_blocked(runtime, code: str) -> Iterator[None]:
    """Hold what a callback for ``code`` must wait for: SQLite's write lock, or the voucher's row lock."""
    with runtime.engine.connect() as conn:
        conn.begin()  # on SQLite the engine begins with BEGIN IMMEDIATE: the write lock
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT id FROM vouchers WHERE code = :c FOR UPDATE"), {"c": code})
        try:
            yield
        finally:
            conn.rollback()


def _submit_all(committer: GroupCommit, callbacks: list, runtime, blocked_code: str) -> list:
    """Submit every callback from its own thread while the first one's transaction is held up; results in order."""
    results: list = [None] * len(callbacks)

    def run(i: int) -> None:
        try:
            results[i] = committer.submit(*callbacks[i])
        except Exception as exc:  # noqa: BLE001 - the test looks at what each caller got
            results[i] = exc

    with _writes_blocked(runtime, blocked_code):
        threads = [threading.Thread(target=run, args=(0,))]
        threads[0].start()
        time.sleep(0.3)  # the first callback leads, and waits on the held lock
        for i in range(1, len(callbacks)):
            # One at a time, so they queue (and are applied) in this order.
            threads.append(threading.Thread(target=run, args=(i,)))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while len(committer._queue) < i and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(committer._queue) == i, "a callback did not queue behind the held transaction"
    for t in threads:
        t.join(30)
    return results


def test_callbacks_waiting_together_commit_in_one_transaction_each_with_its_own_outcome(app, db) -> None:  # noqa: ANN001
    runtime = app.extensions["rm_voucher_sync"]
    committer = GroupCommit(runtime.engine, max_batch=32)
    totals_before = _group_totals()
    first = verified_callback("GCFIRST", "VALID", 0)
    committer.submit(*first)  # the voucher exists, so its row lock can be held below

    redeemed = verified_callback("GCA", "REDEEMED", 2)
    same_bytes = verified_callback("GCA", "REDEEMED", 2, body=redeemed[0].body)
    gca_valid = verified_callback("GCA", "VALID", 0)
    replayed_nonce = verified_callback("GCB", "ISSUE", 1, nonce=gca_valid[0].nonce)
    batch = [
        verified_callback("GCFIRST", "ISSUE", 1),
        gca_valid,
        verified_callback("GCA", "ISSUE", 1),
        redeemed,
        same_bytes,  # RM's retry of the same delivery, arriving together with it
        verified_callback("GCC", "VALID", 0),
        replayed_nonce,  # a signed nonce reused for other bytes
        verified_callback("GCC", "VALID", 0),  # a stale copy: same snapshot, new delivery
    ]
    results = _submit_all(committer, batch, runtime, "GCFIRST")

    # The first callback went alone; the seven others waited for it. A group holds one callback
    # per code, in order of arrival: [GCA, GCC, GCB], [GCA, GCC], [GCA], [GCA].
    assert committer.stats.batches == 1 + 1 + 4 and committer.stats.largest == 3
    assert committer.stats.fallbacks == 0
    # Operators see the same in /metrics: 6 transactions for the 9 callbacks.
    totals_after = _group_totals()
    assert (totals_after[0] - totals_before[0], totals_after[1] - totals_before[1]) == (6, 9)
    assert isinstance(results[6], NonceReused)
    statuses = [r.status for r in results if not isinstance(r, Exception)]
    assert statuses.count(DeliveryOutcome.DUPLICATE) == 2  # the same bytes again; the same snapshot again
    assert [r.status for r in results[:4]] == [DeliveryOutcome.ACCEPTED] * 4
    assert results[4].status is DeliveryOutcome.DUPLICATE and results[4].delivery_id == results[3].delivery_id
    assert results[4].attempts == 2
    with db() as s:
        final = dict(s.execute(select(Voucher.code, Voucher.status)).all())
        assert final == {"GCFIRST": "ISSUE", "GCA": "REDEEMED", "GCC": "VALID"}
        event_count = s.scalar(select(func.count()).select_from(VoucherEvent))
        assert event_count == 1 + 1 + 3 + 1  # GCFIRST twice, GCA three snapshots, GCC once
        deliveries = s.scalar(select(func.count()).select_from(WebhookDelivery))
        # One row per distinct delivery: the same-bytes retry bumped attempts; the replayed nonce wrote nothing.
        assert deliveries == 1 + 7 - 2


def test_one_failing_callback_is_retried_alone_and_does_not_fail_the_others(app, db) -> None:  # noqa: ANN001
    runtime = app.extensions["rm_voucher_sync"]
    committer = GroupCommit(runtime.engine)
    committer.submit(*verified_callback("GCLOCK", "VALID", 0))
    incoming, snapshot = verified_callback("GCBAD", "VALID", 0)
    # A value no database column takes: stands in for a bug of ours on one delivery.
    broken = dataclasses.replace(snapshot, fields={**snapshot.fields, "amount": [1, 2]})
    batch = [verified_callback("GCLOCK", "ISSUE", 1), verified_callback("GCX", "VALID", 0), (incoming, broken),
             verified_callback("GCY", "VALID", 0)]
    results = _submit_all(committer, batch, runtime, "GCLOCK")

    assert committer.stats.fallbacks == 1
    assert isinstance(results[2], Exception) and not is_unavailable(results[2])
    assert [results[i].status for i in (0, 1, 3)] == [DeliveryOutcome.ACCEPTED] * 3
    with db() as s:
        assert dict(s.execute(select(Voucher.code, Voucher.status)).all()) == {
            "GCLOCK": "ISSUE", "GCX": "VALID", "GCY": "VALID"
        }


def test_many_threads_converge_to_the_newest_snapshot_of_every_voucher(app, db) -> None:  # noqa: ANN001
    runtime = app.extensions["rm_voucher_sync"]
    committer = GroupCommit(runtime.engine, max_batch=8)
    codes = [f"GCM{i:03d}" for i in range(40)]
    callbacks = [verified_callback(code, status, step) for code in codes for step, status in
                 enumerate(("VALID", "ISSUE", "REDEEMED"))]
    callbacks = callbacks[::2] + callbacks[1::2]  # some arrive out of order
    errors: list[BaseException] = []

    def worker(part: list) -> None:
        for item in part:
            try:
                committer.submit(*item)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(callbacks[i::12],)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert committer.stats.callbacks == len(callbacks)
    with db() as s:
        assert dict(s.execute(select(Voucher.code, Voucher.status)).all()) == {c: "REDEEMED" for c in codes}
        assert s.scalar(select(func.count()).select_from(VoucherEvent)) == len(callbacks)


def _blocked_flock_waiters(path) -> list[int]:  # noqa: ANN001
    """PIDs queued in a blocking flock on this file (Linux /proc/locks "->" lines)."""
    inode = os.stat(path).st_ino
    pids = []
    for line in open("/proc/locks").read().splitlines():  # noqa: SIM115
        fields = line.split()
        if "->" in fields and "FLOCK" in fields and fields[-3].endswith(f":{inode}"):
            pids.append(int(fields[-4]))
    return pids


def test_writer_turn_excludes_other_processes_and_a_killed_holder_releases_it(tmp_path) -> None:  # noqa: ANN001
    turn = WriterTurn(str(tmp_path / "db-writer.lock"), timeout=5)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: take the turn, say so, and hold it until killed
        try:
            with turn.hold():
                os.write(ready_w, b"x")
                time.sleep(60)
        finally:
            os._exit(0)
    os.read(ready_r, 1)
    took = threading.Event()

    def take() -> None:
        with turn.hold():
            took.set()

    waiter = threading.Thread(target=take)
    waiter.start()
    assert not took.wait(0.3), "the turn was taken while another process held it"
    # The waiter sleeps in the kernel's queue for the lock (woken by the release), not polling it.
    assert _blocked_flock_waiters(tmp_path / "db-writer.lock") == [os.getpid()]
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert took.wait(2), "the turn of a killed process was not released"
    waiter.join()


def test_a_main_thread_writer_waits_in_the_kernel_until_its_deadline(tmp_path) -> None:  # noqa: ANN001
    """A sync worker's writer blocks in flock itself, is cut short at its deadline, and takes a free turn at once."""
    assert threading.current_thread() is threading.main_thread()
    path = tmp_path / "m-writer.lock"
    turn = WriterTurn(str(path), timeout=0.5)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: hold the turn until killed
        try:
            with WriterTurn(str(path), timeout=5).hold():
                os.write(ready_w, b"x")
                time.sleep(60)
        finally:
            os._exit(0)
    os.read(ready_r, 1)
    seen: list[list[int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(_blocked_flock_waiters(path))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        with pytest.raises(WriterTurnTimeout), turn.hold():
            pytest.fail("the turn was given while another process held it")
        waited = time.monotonic() - started
    finally:
        stop.set()
        watcher.join()
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert 0.4 <= waited < 2.0
    assert [os.getpid()] in seen, "the writer did not wait in the kernel's queue for the lock"
    assert _blocked_flock_waiters(path) == []  # nothing left queued after the deadline
    with turn.hold():  # the holder is gone: taken at once, and no stray alarm follows
        time.sleep(0.6)


def test_writer_turn_gives_up_waiting_after_its_timeout(tmp_path) -> None:  # noqa: ANN001
    holder = WriterTurn(str(tmp_path / "w.lock"), timeout=5)
    other = WriterTurn(str(tmp_path / "w.lock"), timeout=0.2)
    ready = threading.Event()
    release = threading.Event()

    def hold() -> None:
        # Another open file description of the same file: flock treats it as another holder.
        with holder.hold():
            ready.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    ready.wait(5)
    started = time.monotonic()
    with pytest.raises(WriterTurnTimeout) as raised, other.hold():
        pytest.fail("the turn was given while another holder had it")
    waited = time.monotonic() - started
    release.set()
    t.join()
    assert 0.15 <= waited < 1.5
    assert is_unavailable(raised.value), "a locked database must map to 503"


def test_a_callback_costs_two_statements_on_postgresql_and_four_on_sqlite(app, db) -> None:  # noqa: ANN001
    """The hot path's statement budget, BEGIN and COMMIT aside: a new voucher and a status change alike.

    PostgreSQL: the delivery insert and the voucher's row lock are one statement
    (apply.insert_then_lock), the voucher write and its event another; counted by the server,
    which keeps how often each prepared statement ran (pg_prepared_statements). SQLite runs each in turn.
    """
    runtime = app.extensions["rm_voucher_sync"]
    committer = GroupCommit(runtime.engine)
    statements: list[str] = []
    postgres = runtime.engine.dialect.name == "postgresql"

    def executions() -> int:
        # The one pooled connection the callbacks ran on (sequential use never needs a second).
        assert runtime.engine.pool.checkedin() == 1
        with runtime.engine.connect() as conn:
            return conn.scalar(text(
                "SELECT coalesce(sum(generic_plans + custom_plans), 0) FROM pg_prepared_statements"
                " WHERE name LIKE 'rmvs\\_%'"
            ))

    if not postgres:
        @event.listens_for(runtime.engine, "connect")
        def _count(dbapi_connection, _record) -> None:  # noqa: ANN001
            dbapi_connection.set_trace_callback(statements.append)

    runtime.engine.dispose()  # new connections, counted
    committer.submit(*verified_callback("GCWARM", "VALID", 0))  # the connection, opened and its statements prepared
    expected = 2 if postgres else 4 + 2  # SQLite's trace shows BEGIN IMMEDIATE and COMMIT too
    for status, step in (("VALID", 0), ("ISSUE", 1)):
        statements.clear()
        before = executions() if postgres else 0
        result = committer.submit(*verified_callback("GCCOUNT", status, step))
        assert result.status is DeliveryOutcome.ACCEPTED
        ran = executions() - before if postgres else len(statements)
        assert ran == expected, statements
    with db() as s:
        assert s.scalar(select(Voucher.status).where(Voucher.code == "GCCOUNT")) == "ISSUE"


@pytest.mark.postgres
def test_a_transaction_on_a_pooled_connection_that_died_runs_once_more_on_a_new_one(postgres_url, postgres_admin_url) -> None:  # noqa: ANN001
    """A database restart since the last callback costs no 503: groups and lone callbacks run again, once."""
    engine = make_engine(postgres_url, pool_size=2)
    try:
        committer = GroupCommit(engine)
        committer.submit(*verified_callback("DEADA", "VALID", 0))  # pooled, used just now: not pinged again
        assert terminate_backends(postgres_admin_url, postgres_url) >= 1
        group = [_Waiting(*verified_callback("DEADA", "ISSUE", 1)),
                 _Waiting(*verified_callback("DEADB", "VALID", 0))]
        committer._run(group)  # the path callbacks that arrived together take
        assert [w.error for w in group] == [None, None]
        assert [w.result.status for w in group] == [DeliveryOutcome.ACCEPTED] * 2

        assert terminate_backends(postgres_admin_url, postgres_url) >= 1
        lone = committer.submit(*verified_callback("DEADB", "ISSUE", 1))
        assert lone.status is DeliveryOutcome.ACCEPTED
        # A database that stays away is still a 503: test_faults' outage tests.
        with engine.connect() as conn:
            assert dict(conn.execute(select(Voucher.code, Voucher.status)).all()) == {"DEADA": "ISSUE", "DEADB": "ISSUE"}
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_group_of_callbacks_waits_for_postgresql_twice_whatever_its_size(postgres_url) -> None:  # noqa: ANN001
    """BEGIN with every delivery insert; every voucher write and event with the COMMIT: two waits for the database.

    The database sits behind a proxy that holds each of its answers back 0.2 s, so every wait
    for an answer costs 0.2 s. One statement at a time, a group of five callbacks waited twelve
    times (BEGIN, five inserts, five writes, COMMIT); with psycopg sending the BEGIN on its own,
    four; with the COMMIT sent on its own, three. A lone callback waits as often as a group, and
    a stale snapshot as often as a status change (its delivery's outcome is written with the
    rest). A delivery RM sent twice takes its own statements (find it, count the attempt); the
    others still go together.
    """
    delay = 0.2
    parsed = make_url(postgres_url)
    proxy = TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432, delay=delay)
    engine = make_engine(parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), pool_size=1)

    def waits(group: list[_Waiting]) -> float:
        started = time.monotonic()
        committer._run(group)
        assert [w.error for w in group] == [None] * len(group)
        return (time.monotonic() - started) / delay

    try:
        committer = GroupCommit(engine)
        committer._run([_Waiting(*verified_callback("RTWARM", "VALID", 0))])  # connects outside the count
        for size in (1, 5):
            created = [_Waiting(*verified_callback(f"RT{size}-{i}", "VALID", 0)) for i in range(size)]
            assert 2 <= waits(created) < 3, f"{size} new vouchers"
            changed = [_Waiting(*verified_callback(f"RT{size}-{i}", "REDEEMED", 2)) for i in range(size)]
            assert 2 <= waits(changed) < 3, f"{size} status changes"
            stale = [_Waiting(*verified_callback(f"RT{size}-{i}", "ISSUE", 1)) for i in range(size)]
            assert 2 <= waits(stale) < 3, f"{size} stale snapshots"
            assert {w.result.status for w in stale} == {DeliveryOutcome.STALE}
        assert committer.stats.fallbacks == 0
        group = [_Waiting(changed[0].incoming, changed[0].snapshot), _Waiting(*verified_callback("RT5-1", "VOID", 3))]
        assert 2 + 2 <= waits(group) < 2 + 2 + 2
        assert group[0].result.status is DeliveryOutcome.DUPLICATE and group[0].result.attempts == 2
        assert group[1].result.status is DeliveryOutcome.ACCEPTED
        with engine.connect() as conn:
            statuses = dict(conn.execute(select(Voucher.code, Voucher.status).where(Voucher.code.like("RT5-%"))).all())
            outcomes = conn.execute(
                select(WebhookDelivery.outcome, func.count()).where(WebhookDelivery.voucher_code.like("RT%"))
                .group_by(WebhookDelivery.outcome)
            ).all()
        assert statuses == {"RT5-0": "REDEEMED", "RT5-1": "VOID", "RT5-2": "REDEEMED", "RT5-3": "REDEEMED", "RT5-4": "REDEEMED"}
        # As committed: the stale snapshots' outcome was written in the round trip with the COMMIT.
        assert dict(outcomes) == {"accepted": 1 + 2 * 6 + 1, "stale": 6}
    finally:
        engine.dispose()
        proxy.close()


@pytest.mark.postgres
def test_a_voucher_created_meanwhile_by_another_transaction_fails_the_group_and_each_callback_runs_again(postgres_url) -> None:  # noqa: ANN001
    """The group found no voucher, so it sent an insert; the other transaction's commit makes that insert conflict.

    The COMMIT went with that insert, so nothing may follow it: the conflict fails the whole
    transaction, and the server skips its COMMIT. Each callback then runs alone, RACEX on top of
    the other transaction's row. Had the group's COMMIT gone through, its two deliveries would
    be on record already and the second runs would find them (duplicates, attempts 2).
    """
    from receiver.apply import apply_snapshot
    from receiver.models import Source

    engine = make_engine(postgres_url, pool_size=2)
    try:
        committer = GroupCommit(engine)
        other = engine.connect()
        other.begin()
        apply_snapshot(other, verified_callback("RACEX", "VALID", 0)[1], source=Source.RECONCILE)  # not committed yet
        threading.Timer(0.5, other.commit).start()  # while the group's insert of RACEX waits for it
        group = [_Waiting(*verified_callback("RACEX", "ISSUE", 1)), _Waiting(*verified_callback("RACEY", "VALID", 0))]
        committer._run(group)
        other.close()
        assert [w.error for w in group] == [None, None]
        assert [(w.result.status, w.result.attempts) for w in group] == [(DeliveryOutcome.ACCEPTED, 1)] * 2
        assert group[0].result.apply.from_status == "VALID" and committer.stats.fallbacks == 1

        # A lone callback (its own transaction, COMMIT with its last statement) runs again too.
        other = engine.connect()
        other.begin()
        apply_snapshot(other, verified_callback("RACEZ", "VALID", 0)[1], source=Source.RECONCILE)
        threading.Timer(0.5, other.commit).start()
        alone = [_Waiting(*verified_callback("RACEZ", "ISSUE", 1))]
        committer._run(alone)
        other.close()
        assert alone[0].error is None
        assert (alone[0].result.status, alone[0].result.attempts) == (DeliveryOutcome.ACCEPTED, 1)
        assert alone[0].result.apply.from_status == "VALID"

        with engine.connect() as conn:
            assert dict(conn.execute(select(Voucher.code, Voucher.status)).all()) == {
                "RACEX": "ISSUE", "RACEY": "VALID", "RACEZ": "ISSUE"}
            events = conn.execute(
                select(VoucherEvent.voucher_code, VoucherEvent.to_status, VoucherEvent.source)
                .where(VoucherEvent.voucher_code.in_(["RACEX", "RACEZ"])).order_by(VoucherEvent.id)
            ).all()
            assert [tuple(e) for e in events] == [
                ("RACEX", "VALID", "reconcile"), ("RACEX", "ISSUE", "callback"),
                ("RACEZ", "VALID", "reconcile"), ("RACEZ", "ISSUE", "callback"),
            ]
            deliveries = conn.execute(select(WebhookDelivery.voucher_code, WebhookDelivery.attempts)).all()
            assert sorted(tuple(d) for d in deliveries) == [("RACEX", 1), ("RACEY", 1), ("RACEZ", 1)]
    finally:
        engine.dispose()


_STATUSES = ["VALID", "ISSUE", "REDEEMED", "VOID", "EXPIRED"]


@st.composite
def _traffic(draw):  # noqa: ANN001, ANN202
    """Vouchers' snapshots delivered in any order, some twice (the same bytes), some lost, cut into groups."""
    deliveries = []
    for voucher in range(draw(st.integers(1, 3))):
        statuses = draw(st.lists(st.sampled_from(_STATUSES), min_size=1, max_size=4))
        for step, status in enumerate(statuses):
            deliveries += [(voucher, step, status)] * draw(st.integers(0, 2))
    order = draw(st.permutations(deliveries))
    return order, draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(traffic=_traffic())
def test_callbacks_committed_in_groups_end_as_one_at_a_time_does(migrated_url, traffic) -> None:  # noqa: ANN001
    """The group path against the reference: each callback alone, in a transaction of its own.

    Same deliveries in the same order per voucher, on two sets of codes: the vouchers, their
    events and the deliveries' outcomes and attempts must end the same, and so must every answer.
    Stale snapshots, redeliveries and duplicate snapshots all occur. On PostgreSQL every outcome
    the group path writes in its last round trip (with the COMMIT) is compared with what
    _conclude writes after it; on SQLite, where threaded workers share transactions as well,
    the callbacks of a group follow one another in one transaction.
    """
    order, cuts = traffic
    prefix = secrets.token_hex(3).upper()
    engine = make_engine(migrated_url, pool_size=2)
    try:
        committer = GroupCommit(engine)
        group_answers, reference_answers = [], []
        group: list[_Waiting] = []

        def send() -> None:
            committer._run(group)
            assert [w.error for w in group] == [None] * len(group)
            group_answers.extend((w.snapshot.code[-1], w.result.status, w.result.attempts) for w in group)
            group.clear()

        for (voucher, step, status), cut in zip(order, cuts):
            if any(w.snapshot.code == f"{prefix}G{voucher}" for w in group):
                send()  # one callback per voucher in a group, as GroupCommit._take makes them
            group.append(_Waiting(*verified_callback(f"{prefix}G{voucher}", status, step)))
            if cut:
                send()
            with engine.begin() as conn:
                result = accept_verified(conn, *verified_callback(f"{prefix}R{voucher}", status, step))
            reference_answers.append((str(voucher), result.status, result.attempts))
        if group:
            send()
        assert committer.stats.fallbacks == 0

        def per_voucher(answers: list[tuple]) -> dict[str, list[tuple]]:
            out: dict[str, list[tuple]] = {}
            for voucher, *rest in answers:
                out.setdefault(voucher, []).append(tuple(rest))
            return out

        assert per_voucher(group_answers) == per_voucher(reference_answers)
        with engine.connect() as conn:
            for voucher in {v for v, _step, _status in order}:
                ours, theirs = (f"{prefix}{kind}{voucher}" for kind in "GR")
                rows = [conn.execute(
                    select(Voucher.status, Voucher.rm_updated_ns, Voucher.needs_reconcile).where(Voucher.code == code)
                ).all() for code in (ours, theirs)]
                events = [conn.execute(
                    select(VoucherEvent.from_status, VoucherEvent.to_status, VoucherEvent.outcome)
                    .where(VoucherEvent.voucher_code == code).order_by(VoucherEvent.id)
                ).all() for code in (ours, theirs)]
                deliveries = [conn.execute(
                    select(WebhookDelivery.outcome, WebhookDelivery.attempts)
                    .where(WebhookDelivery.voucher_code == code).order_by(WebhookDelivery.id)
                ).all() for code in (ours, theirs)]
                assert rows[0] == rows[1] and events[0] == events[1] and deliveries[0] == deliveries[1], voucher
    finally:
        engine.dispose()


def test_writer_turn_is_exclusive_while_writers_give_up_and_others_take_over(tmp_path) -> None:  # noqa: ANN001
    """Processes and threads taking turns, many giving up on short deadlines: never two holders at once."""
    lock_path = str(tmp_path / "x-writer.lock")
    marker = tmp_path / "inside"

    def work(seed: int) -> tuple[int, int, int]:
        rng = random.Random(seed)
        turn = WriterTurn(lock_path, timeout=0.003)  # one per process, shared by its threads
        counts = [0, 0, 0]  # held, gave up, overlaps seen

        def writer() -> None:
            for _ in range(150):
                turn.timeout = rng.choice((0.0005, 0.002, 0.02))
                try:
                    with turn.hold():
                        try:
                            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                        except FileExistsError:
                            counts[2] += 1
                            continue
                        time.sleep(rng.choice((0.0, 0.0002, 0.001)))
                        os.close(fd)
                        os.unlink(marker)
                        counts[0] += 1
                except WriterTurnTimeout:
                    counts[1] += 1

        # The main thread waits in the flock itself (cut short by SIGALRM); the other, through
        # the process's waiting thread.
        other = threading.Thread(target=writer)
        other.start()
        writer()
        other.join()
        return counts[0], counts[1], counts[2]

    pipes, pids = [], []
    for seed in range(3):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, json.dumps(work(seed)).encode())
            finally:
                os._exit(0)
        os.close(w)
        pipes.append(r)
        pids.append(pid)
    totals = [0, 0, 0]
    for r, pid in zip(pipes, pids):
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
        os.waitpid(pid, 0)
        for i, n in enumerate(json.loads(data)):
            totals[i] += n
    held, gave_up, overlaps = totals
    assert overlaps == 0, "two writers held the turn at once"
    assert held + gave_up == 3 * 2 * 150
    assert held > 0 and gave_up > 0  # both paths ran: turns taken, and waits abandoned then taken over


def test_a_rejected_callback_is_stored_only_in_its_writer_turn(tmp_path, vectors) -> None:  # noqa: ANN001
    """A forged callback's row waits for the writer turn, so it never holds SQLite's lock while a callback sleeps on it."""
    import sqlite3

    from receiver import create_app
    from receiver.config import load_settings
    from tests.support import callback_body, fresh_settings_env, migrate, voucher_item, while_another_writer_has_the_turn

    path = tmp_path / "receiver.db"
    url = f"sqlite:///{path}"
    migrate(url)
    app = create_app(load_settings(fresh_settings_env(url, vectors, tmp_path)))
    forged = callback_body(voucher_item("FORGED", "VOID"))

    def post() -> int:
        return app.test_client().post("/webhooks/revenuemonster/voucher", data=forged,
                                      headers={"Content-Type": "application/json"}).status_code

    def stored() -> int:
        with sqlite3.connect(path) as conn:
            return conn.execute("SELECT count(*) FROM webhook_deliveries WHERE outcome = 'rejected_signature'").fetchone()[0]

    try:
        waited, rows_while_held, answers = while_another_writer_has_the_turn(str(path), post, stored)
    finally:
        app.extensions["rm_voucher_sync"].engine.dispose()
    assert waited and rows_while_held == 0, "the rejected delivery was written while another writer had the turn"
    assert answers == [401] and stored() == 1


def test_a_thread_that_has_the_writer_turn_may_take_it_again(tmp_path) -> None:  # noqa: ANN001
    """A session transaction inside a block that already writes in the turn nests instead of waiting for itself."""
    turn = WriterTurn(str(tmp_path / "db-writer.lock"), timeout=0.5)
    with turn.hold():
        with turn.hold():
            pass
        other: list[BaseException] = []

        def take() -> None:
            try:
                with turn.hold():
                    pass
            except WriterTurnTimeout as exc:
                other.append(exc)

        thread = threading.Thread(target=take)
        thread.start()
        thread.join()
    assert len(other) == 1, "another thread must still wait for the turn"
    with turn.hold():  # and it is free once the outer block ended
        pass


def test_a_scheduler_lease_on_sqlite_is_written_only_in_its_writer_turn(tmp_path) -> None:  # noqa: ANN001
    """Every session transaction of the service takes the turn: here the scheduler lease's."""
    from receiver.db import make_session_factory
    from receiver.lease import try_acquire
    from receiver.models import SchedulerLease
    from tests.support import migrate, while_another_writer_has_the_turn

    path = tmp_path / "receiver.db"
    migrate(f"sqlite:///{path}")
    engine = make_engine(f"sqlite:///{path}")
    sessions = make_session_factory(engine)

    def leases() -> int:
        with sessions() as s:
            return s.scalar(select(func.count()).select_from(SchedulerLease))

    try:
        waited, while_held, taken = while_another_writer_has_the_turn(
            str(path), lambda: try_acquire(sessions, "reconcile", "me", ttl=30), leases
        )
        after = leases()
    finally:
        engine.dispose()
    assert waited and while_held == 0, "the lease was written while another writer had the turn"
    assert taken == [True] and after == 1


def test_a_callback_waits_for_the_writer_turn_with_its_connection_and_its_insert_ready(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Only the transaction runs in the turn: the connection and the delivery insert's arguments are ready before it.

    One writer of all the processes holds the turn at a time, so the time it is held bounds the
    throughput of every worker together; what needs no write lock is done while waiting for it.
    """
    import sqlite3

    from receiver import deliveries
    from receiver.db import writer_turn
    from tests.support import migrate, while_another_writer_has_the_turn

    path = tmp_path / "receiver.db"
    migrate(f"sqlite:///{path}")
    engine = make_engine(f"sqlite:///{path}")
    committer = GroupCommit(engine, turn=writer_turn(engine))
    made: list[str] = []
    real_values = deliveries._verified_values

    def spied_values(incoming, snapshot):  # noqa: ANN001, ANN202 - records the call, changes nothing
        made.append(snapshot.code)
        return real_values(incoming, snapshot)

    monkeypatch.setattr(deliveries, "_verified_values", spied_values)
    while_waiting: dict[str, object] = {}

    def stored() -> int:
        while_waiting.update(checked_out=engine.pool.checkedout(), made=list(made))
        with sqlite3.connect(path) as conn:
            return conn.execute("SELECT count(*) FROM webhook_deliveries").fetchone()[0]

    try:
        waited, while_held, results = while_another_writer_has_the_turn(
            str(path), lambda: committer.submit(*verified_callback("READY", "VALID", 0)), stored
        )
    finally:
        engine.dispose()
    assert waited and while_held == 0, "the callback was written while another writer had the turn"
    assert while_waiting == {"checked_out": 1, "made": ["READY"]}, "connection and arguments must be ready before the turn"
    assert [r.status for r in results] == [DeliveryOutcome.ACCEPTED] and made == ["READY"], "the arguments are made once"

"""Bulk-load existing history for the growth mode: vouchers + N voucher_events (+ optionally N deliveries).

One INSERT ... SELECT per table (generate_series on PostgreSQL, a recursive CTE on SQLite), respecting
the schema: every NOT NULL column is filled, every voucher_events.voucher_code has its vouchers row
(foreign key), events are only inserted (the append-only triggers forbid UPDATE/DELETE). Each
voucher has three events (VALID -> ISSUE -> REDEEMED, all applied), so N events means ceil(N/3)
vouchers. Codes are random, like RM's, so the indexes are filled in random order as in production.
With deliveries=True every event also gets its webhook_deliveries row (body, headers, random
nonce and dedupe key) and voucher_events.delivery_id points at it: what N callbacks really leave.
"""

from __future__ import annotations

import json
import time

from sqlalchemy import Engine, text

from tests.support import voucher_item

# A real voucher snapshot as RM sends it (~700 bytes), with the code spliced in by SQL.
RAW_TEMPLATE = json.dumps(voucher_item("@CODE@", "REDEEMED", 2))
BODY_TEMPLATE = json.dumps({"item": json.loads(RAW_TEMPLATE), "code": "SUCCESS"})
HEADERS = json.dumps({"Content-Type": "application/json", "X-Signature": "sha256 " + "A" * 344,
                      "X-Timestamp": "1767225600", "X-Nonce-Str": "@NONCE@"}, sort_keys=True)

_PG = {
    "vouchers": """
INSERT INTO vouchers (code, status, rm_updated_at, rm_updated_ns, key, batch_key, label, voucher_type, amount,
    discount_rate, minimum_spend_amount, origin, qr_url, is_shipping, is_device_redeem, expiry_type, expiry_day,
    expires_at, rm_created_at, raw, snapshot_sha256, last_source, first_seen_at, last_changed_at,
    last_confirmed_at, needs_reconcile)
SELECT g.code, 'REDEEMED', g.t, (extract(epoch FROM g.t) * 1000000000)::bigint, 'key-' || g.code,
    'batch-' || (g.i % 50), 'Free coffee', 'CASH', 500, 0, 1000, 'SYSTEM',
    'http://api.revenuemonster.my/qr/1/voucher/' || g.code, false, false, 'FIXED', 0,
    timestamptz '2027-01-01 00:00:00+00', timestamptz '2025-12-31 00:00:00+00',
    replace(:raw, '@CODE@', g.code), encode(sha256(convert_to(g.code || '#2', 'UTF8')), 'hex'), 'callback',
    g.t, g.t + interval '2 hours', g.t + interval '2 hours', false
FROM (SELECT i, upper(substr(md5('grow#' || i), 1, 16)) AS code,
             timestamptz '2025-01-01 00:00:00+00' + i * interval '30 seconds' AS t
      FROM generate_series(1, :n) AS i) AS g
""",
    "deliveries": """
INSERT INTO webhook_deliveries (received_at, last_received_at, body_sha256, dedupe_key, outcome, http_status,
    attempts, voucher_code, signature_verified, nonce, remote_addr, content_type, headers, body, body_truncated)
SELECT d.t, d.t, d.sha, d.sha, 'accepted', 200, 1, d.code, true, d.nonce, '203.0.113.7', 'application/json',
    replace(:headers, '@NONCE@', d.nonce), replace(:body, '@CODE@', d.code), false
FROM (SELECT v.id, s, v.code, v.first_seen_at + s * interval '1 hour' AS t,
             encode(sha256(convert_to(v.code || '#body#' || s, 'UTF8')), 'hex') AS sha,
             substr(md5(v.code || '#nonce#' || s), 1, 32) AS nonce
      FROM vouchers v CROSS JOIN generate_series(0, 2) AS s
      WHERE v.id > :after
      ORDER BY v.id, s
      LIMIT :n) AS d
ORDER BY d.id, d.s
""",
    "events": """
INSERT INTO voucher_events (voucher_code, from_status, to_status, rm_updated_at, source, outcome, delivery_id,
    recorded_at, payload, snapshot_sha256, detail)
SELECT e.code, (ARRAY[NULL, 'VALID', 'ISSUE'])[e.s + 1], (ARRAY['VALID', 'ISSUE', 'REDEEMED'])[e.s + 1],
    e.t, 'callback', 'applied', e.delivery_id, e.t, replace(:raw, '@CODE@', e.code),
    encode(sha256(convert_to(e.code || '#' || e.s, 'UTF8')), 'hex'), NULL
FROM (SELECT v.code, s, v.first_seen_at + s * interval '1 hour' AS t, d.id AS delivery_id
      FROM vouchers v CROSS JOIN generate_series(0, 2) AS s
      LEFT JOIN webhook_deliveries d
             ON :with_deliveries AND d.dedupe_key = encode(sha256(convert_to(v.code || '#body#' || s, 'UTF8')), 'hex')
      WHERE v.id > :after
      ORDER BY v.id, s
      LIMIT :n) AS e
""",
}

_SQLITE_TIME = "strftime('%Y-%m-%d %H:%M:%S', '2025-01-01', '+' || ({expr}) || ' seconds') || '.000000'"

_SQLITE = {
    "vouchers": f"""
WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < :n)
INSERT INTO vouchers (code, status, rm_updated_at, rm_updated_ns, key, batch_key, label, voucher_type, amount,
    discount_rate, minimum_spend_amount, origin, qr_url, is_shipping, is_device_redeem, expiry_type, expiry_day,
    expires_at, rm_created_at, raw, snapshot_sha256, last_source, first_seen_at, last_changed_at,
    last_confirmed_at, needs_reconcile)
SELECT g.code, 'REDEEMED', g.t, (1735689600 + g.i * 30) * 1000000000, 'key-' || g.code, 'batch-' || (g.i % 50),
    'Free coffee', 'CASH', 500, 0, 1000, 'SYSTEM', 'http://api.revenuemonster.my/qr/1/voucher/' || g.code, 0, 0,
    'FIXED', 0, '2027-01-01 00:00:00.000000', '2025-12-31 00:00:00.000000', replace(:raw, '@CODE@', g.code),
    lower(hex(randomblob(32))), 'callback', g.t, g.t2, g.t2, 0
FROM (SELECT i, upper(hex(randomblob(8))) AS code, {_SQLITE_TIME.format(expr='i * 30')} AS t,
             {_SQLITE_TIME.format(expr='i * 30 + 7200')} AS t2
      FROM seq) AS g
""",
    "deliveries": f"""
INSERT INTO webhook_deliveries (received_at, last_received_at, body_sha256, dedupe_key, outcome, http_status,
    attempts, voucher_code, signature_verified, nonce, remote_addr, content_type, headers, body, body_truncated)
SELECT d.t, d.t, d.sha, d.sha, 'accepted', 200, 1, d.code, 1, d.nonce, '203.0.113.7', 'application/json',
    replace(:headers, '@NONCE@', d.nonce), replace(:body, '@CODE@', d.code), 0
FROM (SELECT v.id, s.s, v.code, {_SQLITE_TIME.format(expr='v.id * 30 + s.s * 3600')} AS t,
             lower(hex(randomblob(32))) AS sha, lower(hex(randomblob(16))) AS nonce
      FROM vouchers v CROSS JOIN (SELECT 0 AS s UNION ALL SELECT 1 UNION ALL SELECT 2) AS s
      WHERE v.id > :after
      ORDER BY v.id, s.s
      LIMIT :n) AS d
""",
    # Deliveries were inserted in (voucher, step) order, so the k-th event's delivery is the k-th delivery.
    "events": f"""
INSERT INTO voucher_events (voucher_code, from_status, to_status, rm_updated_at, source, outcome, delivery_id,
    recorded_at, payload, snapshot_sha256, detail)
SELECT e.code, CASE e.s WHEN 0 THEN NULL WHEN 1 THEN 'VALID' ELSE 'ISSUE' END,
    CASE e.s WHEN 0 THEN 'VALID' WHEN 1 THEN 'ISSUE' ELSE 'REDEEMED' END, e.t, 'callback', 'applied',
    CASE WHEN :with_deliveries THEN :first_delivery + e.k ELSE NULL END, e.t,
    replace(:raw, '@CODE@', e.code), lower(hex(randomblob(32))), NULL
FROM (SELECT v.code, s.s, {_SQLITE_TIME.format(expr='v.id * 30 + s.s * 3600')} AS t,
             (v.id - :after - 1) * 3 + s.s AS k
      FROM vouchers v CROSS JOIN (SELECT 0 AS s UNION ALL SELECT 1 UNION ALL SELECT 2) AS s
      WHERE v.id > :after
      ORDER BY v.id, s.s
      LIMIT :n) AS e
""",
}


def load_history(engine: Engine, events: int, *, deliveries: bool = False, log=print) -> dict[str, float]:  # noqa: ANN001
    """Insert ceil(events/3) vouchers and ``events`` voucher_events (+ deliveries); return timings."""
    sqlite = engine.dialect.name == "sqlite"
    sql = _SQLITE if sqlite else _PG
    n_vouchers = -(-events // 3)
    timings: dict[str, float] = {}
    with engine.begin() as conn:
        after = conn.execute(text("SELECT coalesce(max(id), 0) FROM vouchers")).scalar_one()
        first_delivery = conn.execute(text("SELECT coalesce(max(id), 0) + 1 FROM webhook_deliveries")).scalar_one()
        started = time.monotonic()
        conn.execute(text(sql["vouchers"]), {"n": n_vouchers, "raw": RAW_TEMPLATE})
        timings["vouchers"] = time.monotonic() - started
        log(f"    {n_vouchers:,} vouchers in {timings['vouchers']:.1f}s")
        if deliveries:
            started = time.monotonic()
            conn.execute(text(sql["deliveries"]), {"n": events, "after": after, "headers": HEADERS, "body": BODY_TEMPLATE})
            timings["deliveries"] = time.monotonic() - started
            log(f"    {events:,} webhook_deliveries in {timings['deliveries']:.1f}s")
        started = time.monotonic()
        conn.execute(
            text(sql["events"]),
            {"n": events, "after": after, "raw": RAW_TEMPLATE, "with_deliveries": deliveries,
             "first_delivery": first_delivery},
        )
        timings["events"] = time.monotonic() - started
        log(f"    {events:,} voucher_events in {timings['events']:.1f}s")
        counted = conn.execute(text("SELECT count(*) FROM voucher_events")).scalar_one()
        if deliveries:
            linked = conn.execute(
                text("SELECT count(*) FROM voucher_events e JOIN webhook_deliveries d ON d.id = e.delivery_id "
                     "AND d.voucher_code = e.voucher_code")
            ).scalar_one()
            assert linked >= events, f"only {linked} of {events} events point at their own delivery"
    assert counted >= events, f"voucher_events has {counted} rows, expected at least {events}"
    started = time.monotonic()
    if sqlite:
        # Outside a transaction (the engine would BEGIN IMMEDIATE first): the raw connection autocommits.
        raw = engine.raw_connection()
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            raw.close()
    else:
        # autovacuum would get here eventually (it is off on some servers): statistics and visibility
        # map as a long-running production database has them, and no checkpoint during the run.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE vouchers")
            conn.exec_driver_sql("VACUUM ANALYZE voucher_events")
            conn.exec_driver_sql("VACUUM ANALYZE webhook_deliveries")
            conn.exec_driver_sql("CHECKPOINT")
    timings["after_load"] = time.monotonic() - started
    log(f"    {'checkpoint' if sqlite else 'VACUUM ANALYZE + CHECKPOINT'} in {timings['after_load']:.1f}s")
    return timings

-- Operator queries for rm-voucher-sync.
--
-- Every query below runs unchanged on SQLite (3.40+) and PostgreSQL (15+):
--   sqlite3 /path/to/receiver.db        then paste a query
--   psql "$DATABASE_URL"                then paste a query
-- tests/test_ops_queries.py runs each one against a seeded database of both kinds and checks
-- its exact result, so a query added here needs an expectation there.
--
-- Conventions:
--   * All stored times are UTC. "Now", "today", "an hour ago" etc. come from the ops_clock view
--     (now_utc, today_start_utc, hour_ago_utc, day_ago_utc, week_ago_utc, month_ago_utc), so the
--     same text works on both databases. To widen or narrow a window, swap the ops_clock column
--     (e.g. hour_ago_utc -> day_ago_utc).
--   * PostgreSQL: date(column) and the run durations use the session time zone. Run
--         SET TIME ZONE 'UTC';
--     once per psql session so days are UTC days, as on SQLite.
--   * Queries about one voucher use the placeholder code 'NAklEfbVdV': replace it with the code
--     you are looking for.
--   * Booleans are compared with = TRUE / = FALSE (both databases accept it).
--   * Vouchers with no batch are shown under '(no batch)'.


-- name: voucher_timeline
-- Full history of one voucher code, oldest first: every distinct snapshot we saw, where it came
-- from (callback, reconcile, backfill, ...), what we did with it (applied, stale, illegal,
-- unknown_status, not_found) and why (detail).
-- Adapt: replace 'NAklEfbVdV' with the voucher code. delivery_id links to webhook_deliveries.id.
SELECT h.recorded_at,
       h.event_id,
       h.source,
       h.outcome,
       h.from_status,
       h.to_status,
       h.rm_updated_at,
       h.delivery_id,
       h.detail,
       h.current_status
FROM voucher_history h
WHERE h.code = 'NAklEfbVdV'
ORDER BY h.recorded_at ASC, h.event_id ASC;


-- name: voucher_current_state
-- What we currently hold for one voucher code: status, batch, where the last change came from,
-- when RM last confirmed it, whether it is flagged for reconciliation or unknown to RM.
-- Adapt: replace 'NAklEfbVdV' with the voucher code. No row means we never saw the code.
SELECT v.code,
       v.status,
       COALESCE(v.batch_key, '(no batch)') AS batch,
       v.label,
       v.rm_updated_at,
       v.last_source,
       v.first_seen_at,
       v.last_changed_at,
       v.last_confirmed_at,
       v.expires_at,
       CASE WHEN v.needs_reconcile = TRUE THEN 'yes' ELSE 'no' END AS needs_reconcile,
       v.rm_missing_at
FROM vouchers v
WHERE v.code = 'NAklEfbVdV';


-- name: voucher_deliveries
-- Every callback POST that named one voucher code, oldest first, including rejected (forged or
-- badly signed) ones: outcome, HTTP status we answered, how often RM redelivered it (attempts),
-- whether the signature verified, and the error if any.
-- Adapt: replace 'NAklEfbVdV' with the voucher code.
SELECT d.id,
       d.received_at,
       d.last_received_at,
       d.outcome,
       d.http_status,
       d.attempts,
       CASE WHEN d.signature_verified = TRUE THEN 'yes' ELSE 'no' END AS signature_verified,
       d.remote_addr,
       d.error
FROM webhook_deliveries d
WHERE d.voucher_code = 'NAklEfbVdV'
ORDER BY d.received_at ASC, d.id ASC;


-- name: vouchers_voided_today_per_batch
-- How many vouchers were voided today (UTC), per batch: applied transitions into VOID recorded
-- since midnight UTC, from any source. A VOID -> VOID update (e.g. a label change) is not counted.
-- Adapt: replace today_start_utc with day_ago_utc (last 24 hours) or week_ago_utc; replace 'VOID'
-- with another status (e.g. 'REDEEMED') to count those transitions instead.
SELECT COALESCE(v.batch_key, '(no batch)') AS batch,
       COUNT(DISTINCT e.voucher_code) AS vouchers_voided,
       MIN(e.recorded_at) AS first_voided_at,
       MAX(e.recorded_at) AS last_voided_at
FROM voucher_events e
JOIN vouchers v ON v.code = e.voucher_code
WHERE e.outcome = 'applied'
  AND e.to_status = 'VOID'
  AND (e.from_status IS NULL OR e.from_status <> 'VOID')
  AND e.recorded_at >= (SELECT today_start_utc FROM ops_clock)
GROUP BY COALESCE(v.batch_key, '(no batch)')
ORDER BY vouchers_voided DESC, batch ASC;


-- name: vouchers_stuck_in_issue_or_redeemed
-- Vouchers sitting in ISSUE or REDEEMED whose state has not changed for more than 7 days
-- (last_changed_at older than a week), oldest first: candidates for a missed callback or a
-- customer who never completed. last_confirmed_at shows whether RM still confirms the state.
-- Adapt: replace week_ago_utc with month_ago_utc / day_ago_utc; edit the status list.
SELECT v.code,
       v.status,
       COALESCE(v.batch_key, '(no batch)') AS batch,
       v.last_changed_at,
       v.last_confirmed_at,
       v.last_source,
       v.rm_missing_at
FROM vouchers v
WHERE v.status IN ('ISSUE', 'REDEEMED')
  AND v.last_changed_at < (SELECT week_ago_utc FROM ops_clock)
ORDER BY v.last_changed_at ASC, v.code ASC;


-- name: bad_signature_rejections_last_hour
-- Callbacks rejected for a bad or replayed signature in the last hour, per sender address, with
-- how many and when the first and last arrived. Many from one address you do not know is an
-- attack or a misconfigured proxy; rejections from RM's own addresses mean the RM public key
-- configured here is wrong or RM rotated it.
-- Adapt: replace hour_ago_utc with day_ago_utc; replace 'rejected_signature' with
-- 'rejected_malformed' to see malformed bodies instead.
SELECT d.remote_addr,
       COUNT(*) AS rejections,
       MIN(d.received_at) AS first_rejected_at,
       MAX(d.received_at) AS last_rejected_at
FROM webhook_deliveries d
WHERE d.outcome = 'rejected_signature'
  AND d.received_at >= (SELECT hour_ago_utc FROM ops_clock)
GROUP BY d.remote_addr
ORDER BY rejections DESC, last_rejected_at DESC;


-- name: errored_deliveries_never_replayed
-- Verified callbacks that failed on our side (outcome 'error', we answered 5xx) and that RM has
-- not successfully redelivered and no operator has replayed (replayed_at IS NULL), oldest first.
-- A redelivery or a replay that succeeded turns the row into 'accepted', so it drops off this
-- list. Replay them with: flask --app receiver deliveries replay --failed   (or --id ID)
-- Adapt: add "AND d.received_at >= (SELECT week_ago_utc FROM ops_clock)" to limit the window.
SELECT d.id,
       d.received_at,
       d.last_received_at,
       d.attempts,
       d.voucher_code,
       d.http_status,
       d.error
FROM webhook_deliveries d
WHERE d.outcome = 'error'
  AND d.replayed_at IS NULL
ORDER BY d.received_at ASC, d.id ASC;


-- name: reconcile_only_changes_per_day
-- Changes we learned only from reconciliation (RM's answer to our poll, i.e. the callback was
-- missed or late), per UTC day over the last 30 days: applied events whose source is 'reconcile'.
-- A steady non-zero count means callbacks are being lost.
-- Adapt: replace month_ago_utc with week_ago_utc; replace 'reconcile' with 'callback' or
-- 'backfill' to count those sources. On PostgreSQL, SET TIME ZONE 'UTC' first.
SELECT date(e.recorded_at) AS recorded_day,
       COUNT(*) AS applied_events,
       COUNT(DISTINCT e.voucher_code) AS vouchers
FROM voucher_events e
WHERE e.source = 'reconcile'
  AND e.outcome = 'applied'
  AND e.recorded_at >= (SELECT month_ago_utc FROM ops_clock)
GROUP BY date(e.recorded_at)
ORDER BY recorded_day DESC;


-- name: illegal_or_stale_events_last_week
-- Snapshots we did not apply in the last 7 days, most recent first: 'stale' (older than what we
-- hold: reordered or late redelivery, harmless) and 'illegal' (a callback tried a backwards
-- transition such as REDEEMED -> ISSUE; the voucher is flagged needs_reconcile).
-- Adapt: replace week_ago_utc with day_ago_utc / month_ago_utc; keep only one outcome in the IN
-- list; raise or drop the LIMIT.
SELECT e.recorded_at,
       e.voucher_code AS code,
       e.outcome,
       e.source,
       e.from_status,
       e.to_status,
       e.rm_updated_at,
       e.delivery_id,
       e.detail
FROM voucher_events e
WHERE e.outcome IN ('illegal', 'stale')
  AND e.recorded_at >= (SELECT week_ago_utc FROM ops_clock)
ORDER BY e.recorded_at DESC, e.id DESC
LIMIT 200;


-- name: last_reconcile_runs
-- The last 20 reconciliation runs, newest first, with their counts and duration in seconds.
-- state: 'running (or crashed)' when finished_at is missing (a run that crashed never finishes),
-- 'stopped' when it ended early with an error, else 'ok'.
-- Adapt: change LIMIT 20; add "WHERE r.error IS NOT NULL" to see failed runs only.
SELECT r.id,
       r."trigger",
       r.started_at,
       r.finished_at,
       r.checked,
       r.changed,
       r.failed,
       r.not_found,
       r.reinstated,
       r.duration_ms / 1000.0 AS duration_seconds,
       CASE
           WHEN r.finished_at IS NULL THEN 'running (or crashed)'
           WHEN r.error IS NOT NULL THEN 'stopped'
           ELSE 'ok'
       END AS state,
       r.error
FROM reconcile_runs r
ORDER BY r.started_at DESC, r.id DESC
LIMIT 20;


-- name: expired_by_date_not_confirmed
-- Vouchers whose expiry date has passed but which RM has not yet reported as final: status is
-- not VOID, EXPIRED, MARKET_PLACE or COMPLETE, and expires_at is in the past. Reconciliation
-- polls these; rows that stay here mean it is failing, or RM keeps them alive (check with RM).
-- rm_missing_at set means RM no longer knows the code (reconciliation stopped polling it).
-- Adapt: replace now_utc with day_ago_utc to ignore vouchers that expired in the last 24 hours.
SELECT v.code,
       v.status,
       COALESCE(v.batch_key, '(no batch)') AS batch,
       v.expires_at,
       v.last_confirmed_at,
       v.rm_missing_at
FROM vouchers v
WHERE v.status NOT IN ('VOID', 'EXPIRED', 'MARKET_PLACE', 'COMPLETE')
  AND v.expires_at < (SELECT now_utc FROM ops_clock)
ORDER BY v.expires_at ASC, v.code ASC;


-- name: redelivery_distribution
-- How often RM delivered the same signed callback body, over the last 30 days: number of
-- deliveries per attempts value. attempts = 1 is normal; many 2+ means RM did not get (or did not
-- accept) our 200 in time: look at latency, timeouts and 5xx answers.
-- Only signature-verified deliveries are counted (rejected ones are never merged, always 1).
-- Adapt: replace month_ago_utc with week_ago_utc / day_ago_utc.
SELECT d.attempts,
       COUNT(*) AS deliveries
FROM webhook_deliveries d
WHERE d.signature_verified = TRUE
  AND d.received_at >= (SELECT month_ago_utc FROM ops_clock)
GROUP BY d.attempts
ORDER BY d.attempts ASC;


-- name: deliveries_by_outcome_last_day
-- Callback traffic of the last 24 hours by outcome: accepted, duplicate, stale,
-- rejected_signature, rejected_malformed, error. attempts sums redeliveries of the same body.
-- Adapt: replace day_ago_utc with hour_ago_utc / week_ago_utc.
SELECT d.outcome,
       COUNT(*) AS deliveries,
       SUM(d.attempts) AS attempts,
       MAX(d.last_received_at) AS last_received_at
FROM webhook_deliveries d
WHERE d.received_at >= (SELECT day_ago_utc FROM ops_clock)
GROUP BY d.outcome
ORDER BY deliveries DESC, d.outcome ASC;


-- name: vouchers_needing_reconcile
-- Vouchers flagged needs_reconcile (a callback tried a transition we refused, e.g. REDEEMED ->
-- ISSUE); the next reconciliation pass asks RM and clears the flag. last_event_detail says why.
-- Rows that stay here across passes mean reconciliation is failing for them.
-- Adapt: nothing to change; add "AND v.batch_key = 'batch-A'" to narrow to one batch.
SELECT v.code,
       v.status,
       COALESCE(v.batch_key, '(no batch)') AS batch,
       v.last_source,
       v.last_changed_at,
       v.last_confirmed_at,
       (SELECT e.detail
        FROM voucher_events e
        WHERE e.voucher_code = v.code
        ORDER BY e.id DESC
        LIMIT 1) AS last_event_detail
FROM vouchers v
WHERE v.needs_reconcile = TRUE
ORDER BY v.last_changed_at ASC, v.code ASC;


-- name: vouchers_missing_at_rm
-- Vouchers RM no longer knows: reconciliation got VOUCHER_NOT_FOUND and stopped polling them
-- (rm_missing_at is when). They come back by themselves if RM mentions the code again.
-- Adapt: add "AND v.rm_missing_at >= (SELECT week_ago_utc FROM ops_clock)" for recent ones only.
SELECT v.code,
       v.status,
       COALESCE(v.batch_key, '(no batch)') AS batch,
       v.rm_missing_at,
       v.last_confirmed_at,
       v.last_changed_at
FROM vouchers v
WHERE v.rm_missing_at IS NOT NULL
ORDER BY v.rm_missing_at DESC, v.code ASC;


-- name: status_counts_per_batch
-- Current status counts per batch (vouchers with no batch last).
-- Adapt: add "WHERE v.batch_key = 'batch-A'" before GROUP BY for one batch.
SELECT COALESCE(v.batch_key, '(no batch)') AS batch,
       v.status,
       COUNT(*) AS vouchers
FROM vouchers v
GROUP BY COALESCE(v.batch_key, '(no batch)'), v.status
ORDER BY CASE WHEN COALESCE(v.batch_key, '(no batch)') = '(no batch)' THEN 1 ELSE 0 END ASC,
         batch ASC,
         v.status ASC;


-- name: unknown_statuses_seen
-- Statuses RM sent that we do not know (events with outcome 'unknown_status'), with how many
-- events and vouchers and when first and last seen. They are stored and applied as-is; a new one
-- here means RM added a status the state machine should learn.
-- Adapt: add "AND e.recorded_at >= (SELECT week_ago_utc FROM ops_clock)" for recent ones only.
SELECT e.to_status AS unknown_status,
       COUNT(*) AS events,
       COUNT(DISTINCT e.voucher_code) AS vouchers,
       MIN(e.recorded_at) AS first_seen_at,
       MAX(e.recorded_at) AS last_seen_at
FROM voucher_events e
WHERE e.outcome = 'unknown_status'
GROUP BY e.to_status
ORDER BY last_seen_at DESC, unknown_status ASC;


-- name: reinstated_vouchers
-- Vouchers RM moved "backwards" (e.g. VOID -> VALID, a reinstatement) that we applied only
-- because RM itself confirmed it in answer to our own request (reconcile, backfill, merchant
-- action), most recent first. A callback can never do this (it ends as 'illegal').
-- The apply service marks these events only by their detail text 'RM confirms <from> -> <to>'
-- (always outcome 'applied', never source 'callback'); there is no column for it.
-- Adapt: add "AND e.recorded_at >= (SELECT month_ago_utc FROM ops_clock)" to limit the window.
SELECT e.recorded_at,
       e.voucher_code AS code,
       e.from_status,
       e.to_status,
       e.source,
       e.detail
FROM voucher_events e
WHERE e.detail LIKE 'RM confirms %'
ORDER BY e.recorded_at DESC, e.id DESC
LIMIT 100;


-- name: non_final_unconfirmed_for_a_day
-- Non-final vouchers RM has not confirmed for more than a day (and that RM still knows), oldest
-- confirmation first. Reconciliation should keep this list empty for anything older than
-- RECONCILE_STALE_AFTER_SECONDS (default 1 hour): a growing list means reconciliation is not
-- running (see last_reconcile_runs and scheduler_leases) or RM calls are failing.
-- Adapt: replace day_ago_utc with hour_ago_utc to match RECONCILE_STALE_AFTER_SECONDS.
SELECT v.code,
       v.status,
       COALESCE(v.batch_key, '(no batch)') AS batch,
       v.last_confirmed_at,
       v.last_changed_at
FROM vouchers v
WHERE v.status NOT IN ('VOID', 'EXPIRED', 'MARKET_PLACE', 'COMPLETE')
  AND v.rm_missing_at IS NULL
  AND (v.last_confirmed_at IS NULL OR v.last_confirmed_at < (SELECT day_ago_utc FROM ops_clock))
ORDER BY v.last_confirmed_at ASC, v.code ASC;


-- name: scheduler_leases
-- Who holds each scheduler lease (e.g. 'reconcile') and until when. 'expired' means the holder
-- stopped renewing it (crashed or stopped) and the next scheduler may take it over.
-- Adapt: add "WHERE l.name = 'reconcile'" for one job.
SELECT l.name,
       l.holder,
       l.acquired_at,
       l.expires_at,
       CASE
           WHEN l.expires_at <= (SELECT now_utc FROM ops_clock) THEN 'expired'
           ELSE 'held'
       END AS state
FROM scheduler_leases l
ORDER BY l.name ASC;


-- name: stamps_redemptions_per_store_per_day
-- Stamps.co.id redemptions per store per UTC day over the last 30 days: how many were made, how
-- many of those have been canceled since, the stamps held by the ones that stand (a canceled
-- redemption's stamps are not counted) and the voucher value they deducted (deduct_value).
-- by_voucher_code redemptions report no stamps and count as 0.
-- Adapt: replace month_ago_utc with week_ago_utc; add "AND r.store = 32" for one store; add
-- "AND r.kind = 'promo_code'" for one kind. On PostgreSQL, SET TIME ZONE 'UTC' first.
SELECT date(r.redeemed_at) AS redeemed_day,
       r.store,
       COUNT(*) AS redemptions,
       SUM(CASE WHEN r.status = 'Canceled' THEN 1 ELSE 0 END) AS canceled,
       SUM(CASE WHEN r.status = 'Created' THEN COALESCE(r.stamps_used, 0) ELSE 0 END) AS stamps_spent,
       SUM(CASE WHEN r.status = 'Created' THEN COALESCE(r.value_deducted, 0) ELSE 0 END) AS value_deducted
FROM stamps_redemptions r
WHERE r.redeemed_at >= (SELECT month_ago_utc FROM ops_clock)
GROUP BY date(r.redeemed_at), r.store
ORDER BY redeemed_day DESC, r.store ASC;


-- name: stamps_cancellations_last_month
-- Stamps redemptions canceled in the last 30 days, most recent first: the Stamps redemption id,
-- what it was, where and for whom, when it was made and canceled, the stamps it had used, the
-- member's stamps right after the cancel (as Stamps reported them) and who canceled it (the
-- actor of the cancel operation: cli:<login>, ops-api, or NULL when an operator recorded it with
-- `stamps resolve` or it was recorded some other way).
-- Adapt: replace month_ago_utc with week_ago_utc / day_ago_utc; add "AND r.store = 32".
SELECT r.canceled_at,
       r.stamps_id AS redemption_id,
       r.kind,
       r.store,
       r.invoice_number,
       r.user_identifier,
       r.redeemed_at,
       r.stamps_used,
       e.membership_stamps AS member_stamps_after,
       o.actor AS canceled_by
FROM stamps_redemptions r
JOIN stamps_redemption_events e ON e.redemption_id = r.id AND e.to_status = 'Canceled'
LEFT JOIN stamps_operations o ON o.id = e.operation_id
WHERE r.status = 'Canceled'
  AND r.canceled_at >= (SELECT month_ago_utc FROM ops_clock)
ORDER BY r.canceled_at DESC, r.id DESC;


-- name: stamps_spent_per_member
-- Stamps spent per member on redemptions made in the last 30 days, most first: redemptions that
-- stand (Created) and their stamps, canceled ones and the stamps they had used, the last
-- redemption, and the member's stamps as Stamps last reported them to us (after any redemption
-- or cancel, however old). Members are grouped by the identifier the cashier used (an email and
-- a Member ID of the same person are two rows).
-- Adapt: replace month_ago_utc with week_ago_utc; add "AND r.store = 32" for one store.
SELECT r.user_identifier AS member,
       SUM(CASE WHEN r.status = 'Created' THEN 1 ELSE 0 END) AS redemptions,
       SUM(CASE WHEN r.status = 'Created' THEN COALESCE(r.stamps_used, 0) ELSE 0 END) AS stamps_spent,
       SUM(CASE WHEN r.status = 'Canceled' THEN 1 ELSE 0 END) AS canceled,
       SUM(CASE WHEN r.status = 'Canceled' THEN COALESCE(r.stamps_used, 0) ELSE 0 END) AS stamps_canceled,
       MAX(r.redeemed_at) AS last_redeemed_at,
       (SELECT e.membership_stamps
        FROM stamps_redemption_events e
        JOIN stamps_redemptions m ON m.id = e.redemption_id
        WHERE m.user_identifier = r.user_identifier
          AND e.membership_stamps IS NOT NULL
        ORDER BY e.recorded_at DESC, e.id DESC
        LIMIT 1) AS last_known_stamps
FROM stamps_redemptions r
WHERE r.redeemed_at >= (SELECT month_ago_utc FROM ops_clock)
GROUP BY r.user_identifier
ORDER BY stamps_spent DESC, member ASC;


-- name: stamps_operations_unresolved
-- Stamps operations nobody has settled, oldest first: 'ambiguous' (Stamps' answer was lost after
-- the request was sent, and Stamps offers no lookup, so it was not retried) and 'pending' (still
-- waiting for Stamps, or the process died mid-call: one older than a few minutes is stuck). Each
-- keeps its request id and its store + invoice until settled, so nothing is redeemed twice.
-- Check the Stamps dashboard, then run
--     flask --app receiver stamps resolve REQUEST_ID --redemption-id ID    (it is there)
--     flask --app receiver stamps resolve REQUEST_ID --not-done            (it is not)
-- Adapt: add "AND o.kind = 'cancel'" for one kind; add "AND o.store = 32" for one store.
SELECT o.created_at,
       o.request_id,
       o.kind,
       o.status,
       o.store,
       o.invoice_number,
       o.user_identifier,
       o.target,
       o.actor,
       o.http_status,
       o.error_code,
       o.decision
FROM stamps_operations o
WHERE o.status IN ('ambiguous', 'pending')
ORDER BY o.created_at ASC, o.id ASC;

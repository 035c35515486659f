--
-- 190_events: the transactional outbox (billing.events) and the alert
-- thresholds of billing_alerts_set().  Every event type, every threshold
-- edge: a threshold reached exactly, crossed by one micro-unit, crossed
-- twice by one charge, re-armed; rolled-back work writes nothing; the
-- per-tenant sequence has no gaps.  Tenants start with "ev-".
--
-- Payloads are shown without their times (resets_at, expires_at,
-- expired_at depend on today's date and the clock) and the ids that depend
-- on what the earlier files did (hold_id, grant_id, job_id, ...).
--
\set VERBOSITY default
\set SHOW_CONTEXT never

CREATE FUNCTION ev_events(t text) RETURNS TABLE (seq bigint, type text, payload jsonb)
    LANGUAGE sql
AS $$
    SELECT e.seq, e.type, e.payload - 'resets_at' - 'expires_at' - 'expired_at' - 'changed_by'
                                    - 'hold_id' - 'grant_id' - 'entry_trace_id'
      FROM billing.event_log e WHERE e.tenant_id = t ORDER BY e.seq
$$;

--
-- billing_alerts_set: arguments
--
SELECT tenant_id FROM billing_account_create('ev-1');
SELECT balance_after FROM billing_credit('ev-1', 10, 'ev-1-c1');
SELECT regress_error($$SELECT billing_alerts_set(NULL)$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-nobody', low_balance => 1)$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', low_balance => -1)$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', low_balance => 0.0000001)$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', quota_percents => '{}')$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', quota_percents => '{0, 50}')$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', quota_percents => '{50, 101}')$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', quota_percents => '{80, NULL}')$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', quota_percents => '{80, 90, 80}')$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', quota_percents => '{{80}, {90}}')$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', quota_percents => '{1,2,3,4,5,6,7,8,9,10,11}')$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', grant_expiring => '0')$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', grant_expiring => '-1 hour')$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', grant_expiring => '1 month')$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', grant_expiring => '367 days')$$);
SELECT regress_error($$SELECT billing_alerts_set('ev-1', reason => repeat('x', 1001))$$);
-- nothing was written by the refused calls
SELECT count(*) AS events FROM billing.event_log WHERE tenant_id = 'ev-1';

--
-- balance.low: below = less than the threshold.  Reaching it exactly is not
-- a crossing; one micro-unit below is; the event comes once per crossing and
-- is re-armed when the balance is no longer below.
--
SELECT tenant_id, low_balance, quota_percents, grant_expiring, low_balance_announced, last_event_seq
  FROM billing_alerts_set('ev-1', low_balance => 5, reason => 'ticket 17');
SELECT action, changes, reason FROM billing.account_events WHERE tenant_id = 'ev-1' AND action = 'alerts';
SELECT balance_after FROM billing_deduct('ev-1', 5, 'ev-1-d1');            -- 5.000000: not below
SELECT * FROM ev_events('ev-1');
SELECT balance_after FROM billing_deduct('ev-1', 0.000001, 'ev-1-d2');     -- 4.999999: below
SELECT * FROM ev_events('ev-1');
SELECT low_balance_announced FROM billing.alerts WHERE tenant_id = 'ev-1';
SELECT balance_after FROM billing_deduct('ev-1', 1, 'ev-1-d3');            -- further below: no second event
SELECT balance_after FROM billing_credit('ev-1', 0.5, 'ev-1-c2');          -- up, still below
SELECT count(*) AS events FROM billing.event_log WHERE tenant_id = 'ev-1';
SELECT balance_after FROM billing_credit('ev-1', 0.500001, 'ev-1-c3');     -- exactly 5: re-armed
SELECT low_balance_announced FROM billing.alerts WHERE tenant_id = 'ev-1';
SELECT balance_after FROM billing_deduct('ev-1', 0.000001, 'ev-1-d4');     -- below again: a second event
SELECT * FROM ev_events('ev-1');
-- a replay writes nothing
SELECT replayed FROM billing_deduct('ev-1', 0.000001, 'ev-1-d4');
SELECT count(*) AS events FROM billing.event_log WHERE tenant_id = 'ev-1';

-- a rolled-back crossing leaves no event (and the next one gets the next seq)
SELECT balance_after FROM billing_credit('ev-1', 1, 'ev-1-c4');            -- 5.999999: re-armed
BEGIN;
SELECT balance_after FROM billing_deduct('ev-1', 2, 'ev-1-d5');
SELECT count(*) AS events_inside FROM billing.event_log WHERE tenant_id = 'ev-1';
ROLLBACK;
SELECT count(*) AS events_after_rollback, max(seq) AS last_seq FROM billing.event_log WHERE tenant_id = 'ev-1';
-- a charge refused for its funds is no crossing either
SELECT regress_error($$SELECT billing_deduct('ev-1', 100, 'ev-1-d6')$$);
SELECT status, sqlstate FROM billing_try_deduct('ev-1', 100, 'ev-1-d7');
SELECT count(*) AS events FROM billing.event_log WHERE tenant_id = 'ev-1';

-- setting a threshold the balance is already below announces it at once;
-- setting the same thresholds again changes nothing
SELECT low_balance, low_balance_announced, last_event_seq FROM billing_alerts_set('ev-1', low_balance => 100);
SELECT * FROM ev_events('ev-1') WHERE seq > 2;
SELECT low_balance, low_balance_announced, last_event_seq FROM billing_alerts_set('ev-1', low_balance => 100);
SELECT count(*) AS alert_changes FROM billing.account_events WHERE tenant_id = 'ev-1' AND action = 'alerts';
-- NULL: off
SELECT low_balance, low_balance_announced FROM billing_alerts_set('ev-1');
SELECT balance_after FROM billing_deduct('ev-1', 0.1, 'ev-1-d8');
SELECT count(*) AS events FROM billing.event_log WHERE tenant_id = 'ev-1';

--
-- quota.threshold: each percentage of each quota and cap once per period;
-- a charge that passes two percentages writes two events; a refused charge
-- none.  Request quotas count requests, spend caps money charged.
--
SELECT tenant_id FROM billing_account_create('ev-q');
SELECT balance_after FROM billing_credit('ev-q', 1000, 'ev-q-c1');
SELECT daily_request_quota, daily_spend_cap, monthly_spend_cap
  FROM billing_limits_set('ev-q', daily_requests => 10, daily_spend => 10, monthly_spend => 1000);
SELECT quota_percents FROM billing_alerts_set('ev-q', quota_percents => '{90, 50, 100}');
-- 4 requests, 4.00 spent: nothing yet
SELECT count(billing_deduct('ev-q', 1, 'ev-q-d' || g)) FROM generate_series(1, 4) g;
SELECT count(*) AS events FROM billing.event_log WHERE tenant_id = 'ev-q';
-- the 5th request (50 % of 10) and 5.00 of 10.00 (50 %)
SELECT balance_after FROM billing_deduct('ev-q', 1, 'ev-q-d5');
SELECT * FROM ev_events('ev-q');
-- 4.999999 more: 9.999999 of 10.00 (90 %, not 100 %); the 6th request
SELECT balance_after FROM billing_deduct('ev-q', 4.999999, 'ev-q-d6');
SELECT * FROM ev_events('ev-q') WHERE seq > 2;
-- the last micro-unit: 100 % of the cap
SELECT balance_after FROM billing_deduct('ev-q', 0.000001, 'ev-q-d7');
SELECT * FROM ev_events('ev-q') WHERE seq > 3;
-- the cap refuses the next charge: no event, no count
SELECT regress_error($$SELECT billing_deduct('ev-q', 0.000001, 'ev-q-d8')$$);
SELECT status, sqlstate FROM billing_try_deduct('ev-q', 1, 'ev-q-d9');
SELECT daily_requests_announced, daily_spend_announced, monthly_spend_announced, last_event_seq
  FROM billing.alerts WHERE tenant_id = 'ev-q';
-- a hold is a request: the 9th and 10th reach 90 % and 100 % of the request quota
SELECT daily_request_quota, daily_spend_cap
  FROM billing_limits_set('ev-q', daily_requests => 10, daily_spend => 100, monthly_spend => 1000);
SELECT requests_today FROM billing.quota_usage WHERE tenant_id = 'ev-q';
SELECT status FROM billing_hold('ev-q', 1, 'ev-q-h1');                     -- 8th: 80 %, no percentage
SELECT status FROM billing_hold('ev-q', 1, 'ev-q-h2');                     -- 9th: 90 %
SELECT status FROM billing_hold('ev-q', 1, 'ev-q-h3');                     -- 10th: 100 %
SELECT * FROM ev_events('ev-q') WHERE seq > 4;
-- raising the daily cap starts its percentages over: 10.000000 of 100.00 is
-- 10 %, below 50 %; the request quota was not changed: announced stays
SELECT daily_requests_announced, daily_spend_announced FROM billing.alerts WHERE tenant_id = 'ev-q';
-- capturing more spend: 50 % of the new cap
SELECT amount FROM billing_capture('ev-q', 'ev-q-h1', 40, 'ev-q-cap1');
SELECT * FROM ev_events('ev-q') WHERE seq > 6;
SELECT daily_requests_announced, daily_spend_announced, monthly_spend_announced FROM billing.alerts WHERE tenant_id = 'ev-q';

--
-- quota.threshold of an API key budget, per key; a new budget starts over
--
SELECT tenant_id FROM billing_account_create('ev-k');
SELECT balance_after FROM billing_credit('ev-k', 1000, 'ev-k-c1');
SELECT quota_percents FROM billing_alerts_set('ev-k', quota_percents => '{80}');
SELECT key_id FROM billing_api_key_create('ev-k', 'k1', budget => 10, budget_period => 'lifetime');
SELECT key_id FROM billing_api_key_create('ev-k', 'k2', budget => 100, budget_period => 'month');
SELECT balance_after FROM billing_deduct('ev-k', 7.999999, 'ev-k-d1', api_key => 'k1');
SELECT balance_after FROM billing_deduct('ev-k', 80, 'ev-k-d2', api_key => 'k2');
SELECT balance_after FROM billing_deduct('ev-k', 0.000001, 'ev-k-d3', api_key => 'k1');
SELECT * FROM ev_events('ev-k');
SELECT key_id, alert_levels FROM billing.api_keys WHERE tenant_id = 'ev-k' ORDER BY key_id;
SELECT budget FROM billing_api_key_update('ev-k', 'k1', budget => 20);
SELECT key_id, alert_levels FROM billing.api_keys WHERE tenant_id = 'ev-k' ORDER BY key_id;
SELECT balance_after FROM billing_deduct('ev-k', 8, 'ev-k-d4', api_key => 'k1');   -- 16 of 20: 80 %
SELECT * FROM ev_events('ev-k') WHERE seq > 2;
-- new percentages start every key over too
SELECT quota_percents FROM billing_alerts_set('ev-k', quota_percents => '{50}');
SELECT key_id, alert_levels FROM billing.api_keys WHERE tenant_id = 'ev-k' ORDER BY key_id;

--
-- hold.expired: written under the account lock by the first call after the
-- expiry (or the worker's sweep), not by readers
--
SELECT tenant_id FROM billing_account_create('ev-h');
SELECT balance_after FROM billing_credit('ev-h', 10, 'ev-h-c1');
SELECT status FROM billing_hold('ev-h', 2, 'ev-h-1', expires_in => '15 seconds');
SELECT amount FROM billing_capture('ev-h', 'ev-h-1', 0.5, 'ev-h-1-c1');
-- until it has expired
SELECT pg_sleep(greatest(extract(epoch FROM expires_at - clock_timestamp()), 0) + 0.1)
  FROM billing.holds WHERE tenant_id = 'ev-h';
SELECT on_hold FROM billing.balances WHERE tenant_id = 'ev-h';
SELECT count(*) AS events_before_a_write FROM billing.event_log WHERE tenant_id = 'ev-h';
SELECT billing.expire_holds_of('ev-h');
SELECT * FROM ev_events('ev-h');

--
-- grant.expiring (announced once, when the grant expires within the lead;
-- at once for a grant created inside it) and grant.expired
--
SELECT tenant_id FROM billing_account_create('ev-g');
SELECT balance_after FROM billing_credit('ev-g', 10, 'ev-g-c1');
SELECT grant_expiring, next_grant_alert_at IS NULL AS nothing_due
  FROM billing_alerts_set('ev-g', grant_expiring => '1 hour');
SELECT amount FROM billing_grant('ev-g', 3, 'ev-g-g1', expires_at => now() + interval '2 hours');
SELECT amount FROM billing_grant('ev-g', 2, 'ev-g-g2', expires_at => clock_timestamp() + interval '15 seconds');
SELECT * FROM ev_events('ev-g');
-- g1 is due in an hour: the sweep's column says when
SELECT next_grant_alert_at BETWEEN now() + interval '59 minutes' AND now() + interval '61 minutes' AS g1_due_in_an_hour
  FROM billing.alerts WHERE tenant_id = 'ev-g';
-- a charge draws from g2 (expires first); g2 is not announced again
SELECT balance_after FROM billing_deduct('ev-g', 0.5, 'ev-g-d1');
SELECT count(*) AS events FROM billing.event_log WHERE tenant_id = 'ev-g';
-- until g2 has expired
SELECT pg_sleep(greatest(extract(epoch FROM expires_at - clock_timestamp()), 0) + 0.1)
  FROM billing.grants WHERE tenant_id = 'ev-g' AND trace_id = 'ev-g-g2';
SELECT billing.expire_holds_of('ev-g');
SELECT * FROM ev_events('ev-g') WHERE seq > 1;
-- a longer lead announces what is within it at once (g1), once
SELECT grant_expiring, next_grant_alert_at IS NULL AS nothing_due
  FROM billing_alerts_set('ev-g', grant_expiring => '3 hours');
SELECT * FROM ev_events('ev-g') WHERE seq > 2;
SELECT balance_after FROM billing_deduct('ev-g', 0.5, 'ev-g-d2');
SELECT count(*) AS events FROM billing.event_log WHERE tenant_id = 'ev-g';

--
-- job.completed and job.failed (the job guard writes them, for every writer)
--
SELECT tenant_id FROM billing_account_create('ev-j');
SELECT balance_after FROM billing_credit('ev-j', 10, 'ev-j-c1');
SELECT state FROM billing_job_submit('ev-j', 'render', 'ev-j-1', 2.00);
SELECT attempt FROM billing_job_claim('gpu-1', tenant_id => 'ev-j');
SELECT state FROM billing_job_complete('ev-j', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'ev-j-1'), 1.25,
                                       worker => 'gpu-1');
SELECT state FROM billing_job_submit('ev-j', 'render', 'ev-j-2', 2.00, max_attempts => 2);
SELECT attempt FROM billing_job_claim('gpu-1', tenant_id => 'ev-j');
-- a failure with attempts left is no job.failed
SELECT state FROM billing_job_fail('ev-j', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'ev-j-2'), 'oom');
UPDATE billing.jobs SET run_at = now() WHERE idempotency_key = 'ev-j-2';
SELECT attempt FROM billing_job_claim('gpu-2', tenant_id => 'ev-j');
SELECT state FROM billing_job_fail('ev-j', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'ev-j-2'), 'oom again');
SELECT type, payload - 'job_id' - 'charge_entry_id' - 'hold_trace_id' AS payload FROM ev_events('ev-j');
-- a cancel writes none
SELECT state FROM billing_job_submit('ev-j', 'render', 'ev-j-3', 1.00);
SELECT state FROM billing_job_cancel('ev-j', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'ev-j-3'));
SELECT count(*) AS events FROM billing.event_log WHERE tenant_id = 'ev-j';

--
-- account.status_changed (any other change of the account writes none)
--
SELECT tenant_id FROM billing_account_update('ev-j', credit_limit => 5, reason => 'more room');
SELECT status FROM billing_account_update('ev-j', status => 'suspended', reason => 'chargeback');
SELECT status FROM billing_account_update('ev-j', status => 'suspended');
SELECT status FROM billing_account_update('ev-j', status => 'active');
SELECT seq, type, payload FROM ev_events('ev-j') WHERE type = 'account.status_changed';
SELECT payload->>'changed_by' = current_user AS changed_by_me
  FROM billing.event_log WHERE tenant_id = 'ev-j' AND type = 'account.status_changed' LIMIT 1;

--
-- billing.event_write (internal; the worker's mirror.repaired)
--
SELECT billing.event_write('ev-j', 'mirror.repaired', '{"fields": 1}');
SELECT regress_error($$SELECT billing.event_write('ev-nobody', 'mirror.repaired', '{}')$$);
SELECT regress_error($$SELECT billing.event_write('ev-j', 'x', '[1]')$$);
SELECT regress_error($$SELECT billing.event_write('ev-j', NULL, '{}')$$);

--
-- the outbox: per-tenant sequences without gaps, every row undelivered
-- (no worker delivers in this instance), event ids growing with seq
--
SELECT tenant_id, count(*) AS events, min(seq), max(seq),
       bool_and(delivered_at IS NULL) AS undelivered
  FROM billing.event_log WHERE tenant_id LIKE 'ev-%' GROUP BY tenant_id ORDER BY tenant_id;
SELECT count(*) AS seq_order_differs_from_id_order
  FROM (SELECT tenant_id, seq, event_id,
               lag(event_id) OVER (PARTITION BY tenant_id ORDER BY seq) AS prev_id
          FROM billing.event_log WHERE tenant_id LIKE 'ev-%') x
 WHERE prev_id >= event_id;
SELECT a.tenant_id, a.last_event_seq = (SELECT max(e.seq) FROM billing.event_log e WHERE e.tenant_id = a.tenant_id) AS seq_on_the_account
  FROM billing.alerts a WHERE a.tenant_id LIKE 'ev-%' ORDER BY 1;
SELECT count(*) AS inconsistent FROM billing_verify();

--
-- billing_metrics() and billing.metrics: the families
--
SELECT DISTINCT name, type FROM billing.metrics
 WHERE name NOT LIKE 'billing_mirror%' AND name NOT LIKE 'billing_open_holds%' ORDER BY name;
SELECT value = (SELECT count(*) FROM billing.events WHERE delivered_at IS NULL) AS backlog
  FROM billing.metrics WHERE name = 'billing_events_backlog';
SELECT regexp_replace(line, ' [0-9.e+-]+$', ' <n>') AS line FROM regexp_split_to_table(billing_metrics(), E'\n') AS line
 WHERE line LIKE '%billing_jobs %' OR line LIKE 'billing_jobs{%';
-- the outbox's backlog in billing_sync_status() too
SELECT events_backlog = (SELECT count(*) FROM billing.events WHERE delivered_at IS NULL) AS backlog,
       events_lag > interval '0' AS lag
  FROM billing_sync_status();
DROP FUNCTION ev_events(text);

--
-- 110_limits: quotas and spending guardrails of an account, set with
-- billing_limits_set() (which replaces all limits at once; NULL = no
-- limit).  Requests are the calls of billing_deduct / billing_try_deduct
-- and billing_hold; spend is what deducts and captures charge, and the
-- spend caps count open holds as already spent.  Days and months are
-- calendar periods of the account's time zone, the rate limit counts per
-- clock minute.  Every refusal names the limit, what is used and when it
-- resets.  Tenants start with "lim-".
--
-- Reset times depend on today's date: error details show them masked
-- (regress_error), and each one is compared once with the expected value
-- computed in SQL.
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT tenant_id, timezone FROM billing_account_create('lim-q', timezone => 'Asia/Tokyo');
SELECT balance_after FROM billing_credit('lim-q', 1000, 'lim-q-topup');

-- Without limits: nothing is capped; the view counts anyway.
SELECT tenant_id, timezone, requests_today, daily_request_quota, requests_left_today,
       spent_today, daily_spend_cap, requests_this_month, monthly_request_quota,
       spent_this_month, monthly_spend_cap, max_charge, per_minute_limit
  FROM billing.quota_usage WHERE tenant_id = 'lim-q';
-- the periods are those of the account's time zone (Tokyo, UTC+9)
SELECT day = (now() AT TIME ZONE 'Asia/Tokyo')::date AS day_is_tokyo_today,
       day_resets_at = ((now() AT TIME ZONE 'Asia/Tokyo')::date + 1)::timestamp
                       AT TIME ZONE 'Asia/Tokyo' AS day_resets_at_tokyo_midnight,
       month = date_trunc('month', now() AT TIME ZONE 'Asia/Tokyo')::date AS month_is_tokyo_month,
       month_resets_at = (date_trunc('month', now() AT TIME ZONE 'Asia/Tokyo') + interval '1 month')
                         AT TIME ZONE 'Asia/Tokyo' AS month_resets_at_tokyo_midnight
  FROM billing.quota_usage WHERE tenant_id = 'lim-q';

--
-- Daily request quota (ZB040).  A hold is a request; a capture is not
-- (it finishes the request its hold started).
--
SELECT tenant_id, daily_request_quota, requests_today, requests_left_today, monthly_request_quota
  FROM billing_limits_set('lim-q', daily_requests => 3, reason => 'trial plan');
SELECT amount, balance_after FROM billing_deduct('lim-q', 1, 'lim-q-1');
SELECT status, remaining FROM billing_hold('lim-q', 2, 'lim-q-h1');
SELECT status, amount, balance_after FROM billing_try_deduct('lim-q', 1, 'lim-q-2');
-- the quota is used up exactly: the next request is refused, by both forms
SELECT requests_today, requests_left_today FROM billing.quota_usage WHERE tenant_id = 'lim-q';
SELECT regress_error($$SELECT billing_deduct('lim-q', 1, 'lim-q-3')$$);
SELECT regress_error($$SELECT billing_hold('lim-q', 1, 'lim-q-h2')$$);
-- billing_try_deduct records the rejection under its trace id
SELECT status, replayed, amount, sqlstate, reason, regress_mask_at(detail) AS detail
  FROM billing_try_deduct('lim-q', 1, 'lim-q-4');
SELECT trace_id, sqlstate, reason,
       detail = format('Limit 3 requests per day, used 3; resets at %s.',
                       ((now() AT TIME ZONE 'Asia/Tokyo')::date + 1)::timestamp AT TIME ZONE 'Asia/Tokyo')
           AS resets_at_tokyo_midnight
  FROM billing.rejections WHERE tenant_id = 'lim-q';
-- the capture of the earlier hold is not a new request
SELECT amount, hold_status FROM billing_capture('lim-q', 'lim-q-h1', 2, 'lim-q-c1');
-- refused requests are not counted
SELECT requests_today, requests_left_today, spent_today FROM billing.quota_usage WHERE tenant_id = 'lim-q';

-- Raising the quota lets new requests through; the recorded rejection
-- stays what it was.
SELECT daily_request_quota, requests_left_today
  FROM billing_limits_set('lim-q', daily_requests => 4, reason => 'upgrade');
SELECT status, replayed, sqlstate FROM billing_try_deduct('lim-q', 1, 'lim-q-4');
SELECT status, replayed, amount, balance_after FROM billing_try_deduct('lim-q', 1, 'lim-q-5');
SELECT regress_error($$SELECT billing_deduct('lim-q', 1, 'lim-q-6')$$);
-- a quota of 0 allows nothing
SELECT daily_request_quota FROM billing_limits_set('lim-q', daily_requests => 0);
SELECT regress_error($$SELECT billing_deduct('lim-q', 1, 'lim-q-6')$$);

--
-- Monthly request quota (ZB041): the same, per calendar month.  (Setting
-- limits replaces them all: the daily quota is gone.)
--
SELECT daily_request_quota, monthly_request_quota, requests_this_month, requests_left_this_month
  FROM billing_limits_set('lim-q', monthly_requests => 5);
SELECT amount, balance_after FROM billing_deduct('lim-q', 1, 'lim-q-6');
SELECT regress_error($$SELECT billing_deduct('lim-q', 1, 'lim-q-7')$$);
SELECT status, sqlstate,
       detail = format('Limit 5 requests per month, used 5; resets at %s.',
                       (date_trunc('month', now() AT TIME ZONE 'Asia/Tokyo') + interval '1 month')
                       AT TIME ZONE 'Asia/Tokyo') AS resets_at_first_of_next_month
  FROM billing_try_deduct('lim-q', 1, 'lim-q-7');

--
-- Maximum per charge (ZB044): the amount of one deduct, or of one hold.
-- It is checked before the quotas.
--
SELECT max_charge, monthly_request_quota
  FROM billing_limits_set('lim-q', max_charge => 5, monthly_requests => 5);
SELECT regress_error($$SELECT billing_deduct('lim-q', 5.000001, 'lim-q-8')$$);
SELECT max_charge FROM billing_limits_set('lim-q', max_charge => 5);
SELECT amount, balance_after FROM billing_deduct('lim-q', 5, 'lim-q-8');
SELECT regress_error($$SELECT billing_deduct('lim-q', 5.000001, 'lim-q-9')$$);
SELECT regress_error($$SELECT billing_hold('lim-q', 5.000001, 'lim-q-h3')$$);
SELECT status, amount FROM billing_hold('lim-q', 5, 'lim-q-h3');
-- a capture is a charge too: capturing more than the maximum (an excess
-- beyond its hold) is refused (SQLSTATE only; in a transaction that is
-- rolled back, so that a wrong acceptance cannot change what follows)
BEGIN;
SELECT split_part(regress_error($$SELECT billing_capture('lim-q', 'lim-q-h3', 5.000001, 'lim-q-c3x')$$),
                  ':', 1) AS sqlstate;
ROLLBACK;
SELECT amount, hold_status FROM billing_capture('lim-q', 'lim-q-h3', 5, 'lim-q-c3');

--
-- Requests per minute (ZB045), counted per clock minute, by each call's
-- own clock.  The four calls below must fall into one minute: they start
-- with at least 20 seconds of it left.
--
SELECT tenant_id FROM billing_account_create('lim-m');
SELECT balance_after FROM billing_credit('lim-m', 100, 'lim-m-topup');
SELECT per_minute_limit FROM billing_limits_set('lim-m', per_minute => 2);
DO $$
BEGIN
    WHILE extract(second FROM clock_timestamp()) >= 40 LOOP
        PERFORM pg_sleep(0.5);
    END LOOP;
END
$$;
SELECT n, regress_error(format($$SELECT billing_deduct('lim-m', 1, 'lim-m-%s')$$, n)) AS result
  FROM generate_series(1, 3) n;
SELECT status, sqlstate,
       detail = format('Limit 2 requests per minute, used 2; resets at %s.',
                       date_trunc('minute', clock_timestamp()) + interval '1 minute')
           AS resets_at_next_minute
  FROM billing_try_deduct('lim-m', 1, 'lim-m-4');
SELECT count(*) AS charges FROM billing.entries WHERE tenant_id = 'lim-m' AND kind = 'deduct';

--
-- Daily spend cap (ZB042).  Open holds count as spent, so the captures
-- of a hold can never take the day over the cap; a capture within its
-- hold is always allowed, an excess beyond the hold counts like a new
-- charge.
--
SELECT tenant_id FROM billing_account_create('lim-s');
SELECT balance_after FROM billing_credit('lim-s', 100, 'lim-s-topup');
SELECT daily_spend_cap, spent_today FROM billing_limits_set('lim-s', daily_spend => 10);
SELECT amount FROM billing_deduct('lim-s', 4, 'lim-s-1');
SELECT status, amount FROM billing_hold('lim-s', 3, 'lim-s-h1');
SELECT amount FROM billing_deduct('lim-s', 2.999999, 'lim-s-2');
SELECT amount FROM billing_deduct('lim-s', 0.000001, 'lim-s-3');
-- spent 7, on hold 3: the cap is reached exactly
SELECT regress_error($$SELECT billing_deduct('lim-s', 0.000001, 'lim-s-4')$$);
SELECT regress_error($$SELECT billing_hold('lim-s', 0.000001, 'lim-s-h2')$$);
SELECT status, sqlstate,
       detail = format('Cap 10.000000 per day, spent 7.000000, on hold 3.000000, required 0.000001; resets at %s.',
                       ((now() AT TIME ZONE 'UTC')::date + 1)::timestamp AT TIME ZONE 'UTC')
           AS resets_at_utc_midnight
  FROM billing_try_deduct('lim-s', 0.000001, 'lim-s-4');
-- the hold can still be captured; the capture counts as spend
SELECT amount, hold_remaining, hold_status FROM billing_capture('lim-s', 'lim-s-h1', 2, 'lim-s-c1');
SELECT spent_today FROM billing.quota_usage WHERE tenant_id = 'lim-s';
SELECT on_hold FROM billing.balances WHERE tenant_id = 'lim-s';
-- releasing the rest makes room again, to the micro-unit
SELECT status, released FROM billing_release('lim-s', 'lim-s-h1', 'lim-s-r1');
SELECT status, amount FROM billing_hold('lim-s', 0.5, 'lim-s-h3');
SELECT regress_error($$SELECT billing_capture('lim-s', 'lim-s-h3', 1.000001, 'lim-s-c3')$$);
SELECT amount, hold_status FROM billing_capture('lim-s', 'lim-s-h3', 1, 'lim-s-c3');
SELECT spent_today, daily_spend_cap FROM billing.quota_usage WHERE tenant_id = 'lim-s';
SELECT regress_error($$SELECT billing_deduct('lim-s', 0.000001, 'lim-s-5')$$);
-- credits do not give room back: spend is what was charged
SELECT balance_after FROM billing_credit('lim-s', 3, 'lim-s-refund', kind => 'refund');
SELECT regress_error($$SELECT billing_deduct('lim-s', 0.000001, 'lim-s-5')$$);

--
-- Monthly spend cap (ZB043): the same, per calendar month (UTC here).
--
SELECT daily_spend_cap, monthly_spend_cap, spent_this_month
  FROM billing_limits_set('lim-s', monthly_spend => 12);
SELECT amount FROM billing_deduct('lim-s', 2, 'lim-s-5');
SELECT regress_error($$SELECT billing_deduct('lim-s', 0.000001, 'lim-s-6')$$);
SELECT status, sqlstate,
       detail = format('Cap 12.000000 per month, spent 12.000000, on hold 0.000000, required 0.000001; resets at %s.',
                       (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month') AT TIME ZONE 'UTC')
           AS resets_at_first_of_next_month
  FROM billing_try_deduct('lim-s', 0.000001, 'lim-s-6');
-- a cap of 0 allows no spending at all
SELECT monthly_spend_cap FROM billing_limits_set('lim-s', monthly_spend => 0);
SELECT regress_error($$SELECT billing_hold('lim-s', 0.000001, 'lim-s-h4')$$);

--
-- Counters start over with a new period.  To show it without waiting for
-- midnight, the counters of lim-s are moved back by a day as the
-- superuser: the view and the next charge both see a fresh day (the month
-- is still the same, so the monthly counters stay).
--
SELECT daily_spend_cap FROM billing_limits_set('lim-s', daily_spend => 1);
SELECT regress_error($$SELECT billing_deduct('lim-s', 1, 'lim-s-7')$$);
UPDATE billing.accounts SET usage_day = usage_day - 1 WHERE tenant_id = 'lim-s';
SELECT requests_today, spent_today, requests_this_month, spent_this_month
  FROM billing.quota_usage WHERE tenant_id = 'lim-s';
SELECT amount FROM billing_deduct('lim-s', 1, 'lim-s-7');
SELECT regress_error($$SELECT billing_deduct('lim-s', 0.000001, 'lim-s-8')$$);
SELECT requests_today, spent_today, requests_this_month, spent_this_month
  FROM billing.quota_usage WHERE tenant_id = 'lim-s';

--
-- Removing limits: billing_limits_set() without limits.  Every call is
-- one 'limits' row in the audit trail, with all the limits it set.
--
SELECT daily_request_quota, monthly_request_quota, daily_spend_cap, monthly_spend_cap,
       max_charge, per_minute_limit
  FROM billing_limits_set('lim-q', reason => 'limits lifted');
SELECT amount FROM billing_deduct('lim-q', 50, 'lim-q-10');
SELECT action, changes, reason FROM billing.account_events
 WHERE tenant_id = 'lim-q' ORDER BY event_id;

--
-- Invalid limits are refused and change nothing: counts are zero or
-- positive (ZB018), amounts follow the rules of amounts (a spend cap may
-- be 0, the maximum per charge must be positive).
--
SELECT label, split_part(regress_error(sql), E'\n', 1) AS error
  FROM (VALUES
    ('daily_requests -1',     $$SELECT billing_limits_set('lim-m', daily_requests => -1)$$),
    ('monthly_requests -1',   $$SELECT billing_limits_set('lim-m', monthly_requests => -1)$$),
    ('per_minute -1',         $$SELECT billing_limits_set('lim-m', per_minute => -1)$$),
    ('daily_spend -0.000001', $$SELECT billing_limits_set('lim-m', daily_spend => -0.000001)$$),
    ('monthly_spend NaN',     $$SELECT billing_limits_set('lim-m', monthly_spend => 'NaN')$$),
    ('daily_spend 7 decimals', $$SELECT billing_limits_set('lim-m', daily_spend => 0.0000001)$$),
    ('max_charge 0',          $$SELECT billing_limits_set('lim-m', max_charge => 0)$$),
    ('max_charge > 10^12',    $$SELECT billing_limits_set('lim-m', max_charge => 1e12 + 1)$$),
    ('tenant null',           $$SELECT billing_limits_set(NULL, daily_requests => 1)$$),
    ('unknown tenant',        $$SELECT billing_limits_set('lim-nobody', daily_requests => 1)$$)
  ) AS t(label, sql);
SELECT regress_error($$SELECT billing_limits_set('lim-m', daily_requests => -1)$$);
SELECT regress_error($$SELECT billing_limits_set('lim-m', max_charge => 0)$$);
-- an empty tenant id is an invalid tenant id (ZB016), as everywhere else
SELECT split_part(regress_error($$SELECT billing_limits_set('', daily_requests => 1)$$),
                  ':', 1) AS sqlstate;
SELECT per_minute_limit, daily_request_quota FROM billing.quota_usage WHERE tenant_id = 'lim-m';
-- a closed account takes no new limits (ZB003)
SELECT status FROM billing_account_update('lim-m', status => 'closed');
SELECT regress_error($$SELECT billing_limits_set('lim-m')$$);

SELECT * FROM billing_verify() WHERE tenant_id LIKE 'lim-%';

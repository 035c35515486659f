--
-- 060_views: the reporting views.  Days and months are those of the
-- account's time zone, by event time (event_at, or created_at when no
-- event time was given).  Tenants start with "view-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never
-- the event times below are fixed dates; charges accept event_at within
-- billing.event_at_window of now (default 7 days; see 045_bounds)
SET billing.event_at_window = '11000d';

SELECT tenant_id, timezone
  FROM billing_account_create('view-ny', timezone => 'America/New_York', credit_limit => 10,
                              metadata => '{"plan": "pro"}');

-- Entries around midnight UTC.  New York is UTC-5 until 2024-03-10 and
-- UTC-4 after, so its days change at 05:00 UTC in February and 04:00 UTC
-- in April.  (The comment after each call is the New York local time.)
SELECT balance_after FROM billing_credit('view-ny', 100, 'view-ny-01',
       event_at => '2024-02-29 12:00:00+00');                                       -- Feb 29 07:00
SELECT balance_after FROM billing_deduct('view-ny', 1.5, 'view-ny-02', 'chat',
       '{"model": "gpt-4o", "provider": "openai", "input_tokens": 1000, "output_tokens": 200, "api_key": "k1"}',
       '2024-03-01 03:00:00+00');                                                   -- Feb 29 22:00
SELECT balance_after FROM billing_deduct('view-ny', 0.5, 'view-ny-03', 'chat',
       '{"model": "gpt-4o", "provider": "openai", "input_tokens": 10, "output_tokens": 5, "api_key": "k2"}',
       '2024-03-01 04:00:00+00');                                                   -- Feb 29 23:00
SELECT balance_after FROM billing_deduct('view-ny', 0.75, 'view-ny-04', 'chat',
       '{"model": "claude", "provider": "anthropic", "input_tokens": 300, "output_tokens": "many", "api_key": "k2"}',
       '2024-03-01 04:59:59.999999+00');                                            -- Feb 29 23:59:59.999999
SELECT balance_after FROM billing_deduct('view-ny', 2.25, 'view-ny-05', 'chat',
       '{"model": "gpt-4o", "provider": "openai", "input_tokens": 500, "output_tokens": 100, "api_key": "k1"}',
       '2024-03-01 05:00:00+00');                                                   -- Mar 1 00:00
SELECT balance_after FROM billing_deduct('view-ny', 0.1, 'view-ny-06', 'rounding fix',
       '{"model": "gpt-4o", "api_key": "k1"}', '2024-03-01 05:00:00+00', 'adjustment'); -- Mar 1 00:00
SELECT balance_after FROM billing_credit('view-ny', 0.5, 'view-ny-07', 'refund',
       '{"api_key": "k1"}', '2024-03-01 06:00:00+00', 'refund');                    -- Mar 1 01:00
SELECT balance_after FROM billing_deduct('view-ny', 0.5, 'view-ny-08', 'chat',
       '{"model": "claude", "provider": "anthropic", "input_tokens": "12", "output_tokens": 50, "api_key": "k2"}',
       '2024-03-31 23:30:00+00');                                                   -- Mar 31 19:30
SELECT balance_after FROM billing_deduct('view-ny', 1, 'view-ny-09', 'no metadata',
       NULL, '2024-04-01 03:30:00+00');                                             -- Mar 31 23:30
SELECT balance_after FROM billing_credit('view-ny', 5, 'view-ny-10', 'goodwill',
       NULL, '2024-04-01 03:59:59+00', 'grant');                                    -- Mar 31 23:59:59
SELECT balance_after FROM billing_deduct('view-ny', 2, 'view-ny-11', 'chat',
       '{"model": "gpt-4o", "provider": "openai", "input_tokens": 1.5e3, "output_tokens": null, "api_key": "k1"}',
       '2024-04-01 04:00:00+00');                                                   -- Apr 1 00:00

-- billing.balances: one row per account, amounts with scale 6, available
-- = balance + credit limit.
SELECT tenant_id, currency, status, balance, credit_limit, available, version,
       last_entry_at IS NOT NULL AS has_entries, timezone, metadata
  FROM billing.balances WHERE tenant_id LIKE 'view-%' ORDER BY tenant_id;

-- billing.ledger: readable entries, model and api_key lifted out of the
-- metadata.
SELECT trace_id, kind, amount, balance_after, version, description, model, api_key,
       event_at AT TIME ZONE 'UTC' AS event_at_utc
  FROM billing.ledger WHERE tenant_id = 'view-ny' ORDER BY version;
SELECT sum(amount) AS ledger_sum, billing_balance('view-ny') AS balance
  FROM billing.ledger WHERE tenant_id = 'view-ny';

-- billing.usage_daily: per day of the account's time zone.  charges/spent
-- count every debit that counts as spend in the quotas: deducts and the
-- 0.1 debit adjustment (captures too, see 100_holds), net of refunds tied
-- to them (none here; see 066_usage_refunds); credits/credited every entry
-- that added money (the refund view-ny-07 is billing_credit's: tied to no
-- charge, it is a credit).
SELECT day, charges, spent, credits, credited
  FROM billing.usage_daily WHERE tenant_id = 'view-ny' ORDER BY day;

-- billing.usage_monthly: per calendar month of the account's time zone;
-- the entries of 2024-03-01 03:00 to 04:59:59 UTC belong to February and
-- those of 2024-04-01 03:30 and 03:59:59 UTC to March.
SELECT month, charges, spent, credits, credited
  FROM billing.usage_monthly WHERE tenant_id = 'view-ny' ORDER BY month;

-- billing.usage_by_model: charges per day, model and provider; token counts
-- are summed where they are JSON numbers: "many", "12" (a string) and null
-- are ignored, not an error.
SELECT day, model, provider, charges, spent, input_tokens, output_tokens
  FROM billing.usage_by_model WHERE tenant_id = 'view-ny'
 ORDER BY day, model NULLS LAST, provider;

-- billing.usage_by_api_key: charges per day and api key.
SELECT day, api_key, charges, spent
  FROM billing.usage_by_api_key WHERE tenant_id = 'view-ny'
 ORDER BY day, api_key NULLS LAST;

-- The totals agree across views.
SELECT (SELECT sum(spent) FROM billing.usage_daily WHERE tenant_id = 'view-ny') AS daily,
       (SELECT sum(spent) FROM billing.usage_monthly WHERE tenant_id = 'view-ny') AS monthly,
       (SELECT sum(spent) FROM billing.usage_by_model WHERE tenant_id = 'view-ny') AS by_model,
       (SELECT sum(spent) FROM billing.usage_by_api_key WHERE tenant_id = 'view-ny') AS by_api_key,
       (SELECT -sum(amount) FROM billing.ledger
         WHERE tenant_id = 'view-ny' AND amount < 0) AS ledger_debits;

-- The grouping follows the account's current time zone: after a move to
-- Tokyo (UTC+9) the same history falls on other days.
SELECT timezone FROM billing_account_update('view-ny', timezone => 'Asia/Tokyo');
SELECT day, charges, spent, credits, credited
  FROM billing.usage_daily WHERE tenant_id = 'view-ny' ORDER BY day;
SELECT month, charges, spent, credits, credited
  FROM billing.usage_monthly WHERE tenant_id = 'view-ny' ORDER BY month;

-- Without event_at an entry counts on the day it was created.
SELECT tenant_id FROM billing_account_create('view-now', timezone => 'Pacific/Kiritimati');
SELECT balance_after FROM billing_credit('view-now', 3, 'view-now-1');
SELECT balance_after FROM billing_deduct('view-now', 1, 'view-now-2',
       metadata => '{"model": "m", "api_key": "k"}');
SELECT d.charges, d.spent, d.credits, d.credited,
       d.day = (l.created_at AT TIME ZONE 'Pacific/Kiritimati')::date AS created_day
  FROM billing.usage_daily d
  JOIN billing.ledger l ON l.tenant_id = d.tenant_id AND l.trace_id = 'view-now-2'
 WHERE d.tenant_id = 'view-now';
SELECT model, api_key, charges, spent FROM billing.usage_by_model m
  JOIN billing.usage_by_api_key k USING (tenant_id, day, charges, spent)
 WHERE tenant_id = 'view-now';

-- An account without entries has a balance row but no usage rows.
SELECT tenant_id FROM billing_account_create('view-empty');
SELECT tenant_id, balance, available FROM billing.balances WHERE tenant_id = 'view-empty';
SELECT (SELECT count(*) FROM billing.usage_daily WHERE tenant_id = 'view-empty') AS daily,
       (SELECT count(*) FROM billing.usage_monthly WHERE tenant_id = 'view-empty') AS monthly,
       (SELECT count(*) FROM billing.usage_by_model WHERE tenant_id = 'view-empty') AS by_model,
       (SELECT count(*) FROM billing.usage_by_api_key WHERE tenant_id = 'view-empty') AS by_api_key;

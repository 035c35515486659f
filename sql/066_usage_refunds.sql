--
-- 066_usage_refunds: the usage views net refunds against their charge, and
-- agree with the quota counters.
--
-- A refund tied to its charge (billing_refund) counts against the charge's
-- day, model and api key, not the day it was made.  billing_refund gives
-- the day's and month's spend counters (and an API key's period) back only
-- when the charge was made in the current day or month, so "spent today"
-- of billing.quota_usage equals today's net spend in billing.usage_daily
-- (and the same for the month and for a key's budget).  Tenants start with
-- "urf-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

-- An entry as the C code would have written it `days` days ago (the only
-- way to have a charge of an earlier day here; a restore from a dump writes
-- such rows too): the next entry in the account's chain, and the account's
-- counters as that charge left them.  Call it before anything newer is
-- charged.
CREATE FUNCTION pg_temp.charge_days_ago(tenant text, trace text, amount numeric, days integer,
                                        metadata jsonb DEFAULT '{}', key text DEFAULT NULL)
    RETURNS void
    LANGUAGE plpgsql
AS $$
DECLARE
    acc billing.accounts;
    micros bigint := billing.to_micros(amount);
    at timestamptz := now() - days * interval '1 day';
    day date;
BEGIN
    SELECT * INTO acc FROM billing.accounts a WHERE a.tenant_id = tenant FOR UPDATE;
    day := (at AT TIME ZONE acc.timezone)::date;
    INSERT INTO billing.entries (tenant_id, trace_id, kind, amount_micros, balance_after_micros, version,
                                 metadata, created_at, api_key)
    VALUES (tenant, trace, 'deduct', -micros, acc.balance_micros - micros, acc.version + 1, metadata, at, key);
    UPDATE billing.accounts a
       SET balance_micros = a.balance_micros - micros,
           version = a.version + 1,
           day_requests = CASE WHEN a.usage_day = day THEN a.day_requests + 1 ELSE 1 END,
           day_spend_micros = CASE WHEN a.usage_day = day THEN a.day_spend_micros + micros ELSE micros END,
           usage_day = day,
           month_requests = CASE WHEN a.usage_month = date_trunc('month', day)::date
                                 THEN a.month_requests + 1 ELSE 1 END,
           month_spend_micros = CASE WHEN a.usage_month = date_trunc('month', day)::date
                                     THEN a.month_spend_micros + micros ELSE micros END,
           usage_month = date_trunc('month', day)::date
     WHERE a.tenant_id = tenant;
END;
$$;

-- views vs counters for a tenant: today's net spend in usage_daily,
-- usage_by_model and usage_by_api_key against spent_today, a daily key's
-- against its budget's spent, this month's against spent_this_month
CREATE FUNCTION pg_temp.reconcile(tenant text, key text)
    RETURNS TABLE (spent_today numeric, daily_view numeric, by_model numeric, by_api_key numeric,
                   key_spent numeric, key_view numeric, month_agrees boolean)
    LANGUAGE sql
AS $$
    SELECT q.spent_today,
           (SELECT coalesce(sum(d.spent), 0) FROM billing.usage_daily d
             WHERE d.tenant_id = tenant AND d.day = q.day),
           (SELECT coalesce(sum(m.spent), 0) FROM billing.usage_by_model m
             WHERE m.tenant_id = tenant AND m.day = q.day),
           (SELECT coalesce(sum(k.spent), 0) FROM billing.usage_by_api_key k
             WHERE k.tenant_id = tenant AND k.day = q.day),
           (SELECT b.spent FROM billing.api_key_budgets b WHERE b.tenant_id = tenant AND b.key_id = key),
           (SELECT coalesce(sum(k.spent), 0) FROM billing.usage_by_api_key k
             WHERE k.tenant_id = tenant AND k.day = q.day AND k.api_key = key),
           -- (the month's figure depends on the date: two days ago may be
           -- last month)
           q.spent_this_month = (SELECT coalesce(sum(m.spent), 0) FROM billing.usage_monthly m
                                  WHERE m.tenant_id = tenant AND m.month = q.month)
      FROM billing.quota_usage q WHERE q.tenant_id = tenant
$$;

SELECT tenant_id, timezone FROM billing_account_create('urf-a', timezone => 'Pacific/Kiritimati', credit_limit => 10);
SELECT key_id, budget_period FROM billing_api_key_create('urf-a', 'urf-k1', budget => 100, budget_period => 'day');
SELECT key_id, budget_period FROM billing_api_key_create('urf-a', 'urf-k2', budget => 100, budget_period => 'day');
-- two days ago: a charge of 3.00 (model m1, key k1)
SELECT pg_temp.charge_days_ago('urf-a', 'urf-old', 3, 2, '{"model": "m1"}', 'urf-k1');
SELECT balance_after FROM billing_credit('urf-a', 50, 'urf-top');
-- today: deducts through two keys and models, a capture (its model from
-- the hold), a debit adjustment, a hold still open (not spend)
SELECT amount FROM billing_deduct('urf-a', 1, 'urf-d1', metadata => '{"model": "m1"}', api_key => 'urf-k1');
SELECT amount FROM billing_deduct('urf-a', 2, 'urf-d2', metadata => '{"model": "m2"}', api_key => 'urf-k2');
SELECT amount FROM billing_deduct('urf-a', 0.25, 'urf-d3', metadata => '{"model": "m2"}', api_key => 'urf-k1');
SELECT status FROM billing_hold('urf-a', 1, 'urf-h1', metadata => '{"model": "m1"}', api_key => 'urf-k1');
SELECT amount FROM billing_capture('urf-a', 'urf-h1', 0.5, 'urf-c1', final => true);
SELECT amount FROM billing_deduct('urf-a', 0.1, 'urf-adj', description => 'rounding fix', kind => 'adjustment');
SELECT status FROM billing_hold('urf-a', 0.75, 'urf-h2', api_key => 'urf-k2');
SELECT * FROM pg_temp.reconcile('urf-a', 'urf-k1');

-- refunds: part of today's deduct, all of today's capture, part of the
-- charge of two days ago
SELECT amount, refunded, refundable FROM billing_refund('urf-a', 'urf-d2', 0.5, 'urf-r1');
SELECT amount, refunded, refundable FROM billing_refund('urf-a', 'urf-c1', 0.5, 'urf-r2', reason => 'bad answer');
SELECT amount, refunded, refundable FROM billing_refund('urf-a', 'urf-old', 1.25, 'urf-r3');
-- and a refund that is no charge's (billing_credit): a credit
SELECT amount FROM billing_credit('urf-a', 0.2, 'urf-goodwill', kind => 'refund');

-- every view nets the refunds against the charge: today's refunds against
-- today (2.00 - 0.50; 0.50 - 0.50), the old charge's against its day
SELECT day = (now() AT TIME ZONE 'Pacific/Kiritimati')::date AS today, charges, charged, refunded, spent,
       credits, credited
  FROM billing.usage_daily WHERE tenant_id = 'urf-a' ORDER BY day;
SELECT day = (now() AT TIME ZONE 'Pacific/Kiritimati')::date AS today, model, charges, charged, refunded, spent
  FROM billing.usage_by_model WHERE tenant_id = 'urf-a' ORDER BY day, model NULLS LAST;
SELECT day = (now() AT TIME ZONE 'Pacific/Kiritimati')::date AS today, api_key, charges, charged, refunded, spent
  FROM billing.usage_by_api_key WHERE tenant_id = 'urf-a' ORDER BY day, api_key NULLS LAST;
-- and they agree with the counters: the refund of the old charge gave
-- nothing back today (nor to key k1's day), today's refunds did
SELECT * FROM pg_temp.reconcile('urf-a', 'urf-k1');
SELECT spent_today = daily_view AND daily_view = by_model AND by_model = by_api_key
       AND key_spent = key_view AND month_agrees AS reconciled
  FROM pg_temp.reconcile('urf-a', 'urf-k2');
-- every refund is in exactly one place: the ledger's sum of charges minus
-- refunds equals the views' totals
SELECT (SELECT sum(spent) FROM billing.usage_daily WHERE tenant_id = 'urf-a') AS daily,
       (SELECT sum(spent) FROM billing.usage_monthly WHERE tenant_id = 'urf-a') AS monthly,
       (SELECT sum(spent) FROM billing.usage_by_model WHERE tenant_id = 'urf-a') AS by_model,
       (SELECT sum(spent) FROM billing.usage_by_api_key WHERE tenant_id = 'urf-a') AS by_api_key,
       (SELECT billing.to_amount((-sum(amount_micros) FILTER (WHERE amount_micros < 0)
                                  - sum(amount_micros) FILTER (WHERE refund_of IS NOT NULL))::bigint)
          FROM billing.entries WHERE tenant_id = 'urf-a') AS ledger;

-- a full refund of the rest of a charge, then nothing is left of it today
SELECT amount, refundable FROM billing_refund('urf-a', 'urf-d2', 1.5, 'urf-r4');
SELECT charges, charged, refunded, spent FROM billing.usage_by_model
 WHERE tenant_id = 'urf-a' AND model = 'm2' AND day = (now() AT TIME ZONE 'Pacific/Kiritimati')::date;
SELECT spent_today = daily_view AND daily_view = by_model AND by_model = by_api_key
       AND key_spent = key_view AND month_agrees AS reconciled
  FROM pg_temp.reconcile('urf-a', 'urf-k2');

-- What the counters and the views do not share: a usage reported late.
-- The views count a charge on the day of its usage (event_at), the quotas
-- on the day it was charged: a charge of yesterday's usage counts in
-- today's spend cap and in yesterday's report.
SELECT tenant_id FROM billing_account_create('urf-late');
SELECT balance_after FROM billing_credit('urf-late', 10, 'urf-late-top');
SELECT amount FROM billing_deduct('urf-late', 1, 'urf-late-1', event_at => now() - interval '1 day');
SELECT spent_today, daily_view FROM pg_temp.reconcile('urf-late', NULL);

SELECT * FROM billing_verify() WHERE tenant_id LIKE 'urf-%';

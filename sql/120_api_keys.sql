--
-- 120_api_keys: API keys of an account.  A charge may name the key it
-- came through (the api_key argument of billing_deduct, billing_try_deduct,
-- billing_hold and billing_deduct_usage): the key must exist (ZB050) and
-- be active (ZB051), and its optional budget per day, month or lifetime
-- caps what is charged through it (ZB052), open holds of the key
-- included.  Days and months are those of the account's time zone.
-- Tenants start with "key-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT tenant_id, timezone FROM billing_account_create('key-a', timezone => 'America/New_York');
SELECT balance_after FROM billing_credit('key-a', 1000, 'key-a-topup');
SELECT tenant_id FROM billing_account_create('key-b');

--
-- Creating keys.  The result is the key's row of billing.api_key_budgets.
--
SELECT tenant_id, key_id, status, budget, budget_period, spent, on_hold, remaining,
       resets_at = ((now() AT TIME ZONE 'America/New_York')::date + 1)::timestamp
                   AT TIME ZONE 'America/New_York' AS resets_at_local_midnight,
       last_used_at IS NULL AS never_used, metadata
  FROM billing_api_key_create('key-a', 'k-day', 10, 'day', '{"owner": "ci"}');
SELECT key_id, status, budget, budget_period, spent, remaining,
       resets_at = (date_trunc('month', now() AT TIME ZONE 'America/New_York') + interval '1 month')
                   AT TIME ZONE 'America/New_York' AS resets_at_first_of_next_month
  FROM billing_api_key_create('key-a', 'k-month', 20, 'month');
SELECT key_id, status, budget, budget_period, spent, remaining, resets_at
  FROM billing_api_key_create('key-a', 'k-life', 3, 'lifetime');
SELECT key_id, status, budget, budget_period, remaining, resets_at, metadata
  FROM billing_api_key_create('key-a', 'k-free');

-- Creating again with the same settings returns the key unchanged (the
-- metadata may be left out); other settings are a conflict (ZB006).
SELECT key_id, status, budget, budget_period, metadata
  FROM billing_api_key_create('key-a', 'k-day', 10.000000, 'day', '{"owner": "ci"}');
SELECT key_id, status, budget, budget_period, metadata
  FROM billing_api_key_create('key-a', 'k-day', 10, 'day');
SELECT regress_error($$SELECT billing_api_key_create('key-a', 'k-day', 10.000001, 'day')$$);
SELECT regress_error($$SELECT billing_api_key_create('key-a', 'k-day', 10, 'month')$$);
SELECT regress_error($$SELECT billing_api_key_create('key-a', 'k-day', 10, 'day', '{"owner": "ops"}')$$);
SELECT regress_error($$SELECT billing_api_key_create('key-a', 'k-free', 5, 'day')$$);
-- key ids are per account: the same id in another account is another key
SELECT tenant_id, key_id, budget, budget_period FROM billing_api_key_create('key-b', 'k-day');

-- Invalid settings (nothing is created).
SELECT label, split_part(regress_error(sql), E'\n', 1) AS error
  FROM (VALUES
    ('key_id null',            $$SELECT billing_api_key_create('key-a', NULL)$$),
    ('key_id empty',           $$SELECT billing_api_key_create('key-a', '')$$),
    ('key_id 256 chars',       $$SELECT billing_api_key_create('key-a', repeat('k', 256))$$),
    ('budget without period',  $$SELECT billing_api_key_create('key-a', 'k-x', 10)$$),
    ('period without budget',  $$SELECT billing_api_key_create('key-a', 'k-x', NULL, 'day')$$),
    ('period week',            $$SELECT billing_api_key_create('key-a', 'k-x', 10, 'week')$$),
    ('budget negative',        $$SELECT billing_api_key_create('key-a', 'k-x', -1, 'day')$$),
    ('budget 7 decimals',      $$SELECT billing_api_key_create('key-a', 'k-x', 0.0000001, 'day')$$),
    ('metadata array',         $$SELECT billing_api_key_create('key-a', 'k-x', metadata => '[]')$$),
    ('tenant null',            $$SELECT billing_api_key_create(NULL, 'k-x')$$),
    ('unknown tenant',         $$SELECT billing_api_key_create('key-nobody', 'k-x')$$)
  ) AS t(label, sql);
SELECT regress_error($$SELECT billing_api_key_create('key-a', 'k-x', 10)$$);
SELECT regress_error($$SELECT billing_api_key_create('key-a', 'k-x', 10, 'week')$$);
SELECT count(*) AS keys FROM billing.api_keys WHERE tenant_id = 'key-a';

--
-- Charging through a key.  The key is recorded on the entry (and shown by
-- billing.ledger and billing.usage_by_api_key); it is part of the request,
-- so a replay with another key is a conflict (ZB005).
--
SELECT trace_id, kind, amount, balance_after, replayed
  FROM billing_deduct('key-a', 4, 'key-a-1', api_key => 'k-day');
SELECT trace_id, amount, balance_after, replayed
  FROM billing_deduct('key-a', 4, 'key-a-1', api_key => 'k-day');
SELECT regress_error($$SELECT billing_deduct('key-a', 4, 'key-a-1', api_key => 'k-month')$$);
SELECT regress_error($$SELECT billing_deduct('key-a', 4, 'key-a-1')$$);
SELECT trace_id, kind, amount, api_key FROM billing.ledger
 WHERE tenant_id = 'key-a' ORDER BY version;
SELECT key_id, spent, on_hold, remaining, last_used_at IS NOT NULL AS used
  FROM billing.api_key_budgets WHERE tenant_id = 'key-a' AND key_id = 'k-day';

--
-- Budget: what is spent through the key in the current period plus what
-- its open holds reserve may reach the budget exactly; one micro-unit
-- more is refused (ZB052), with budget, spent, on hold, required and the
-- reset time in the detail.
--
SELECT status, amount, remaining FROM billing_hold('key-a', 5, 'key-a-h1', api_key => 'k-day');
SELECT key_id, spent, on_hold, remaining
  FROM billing.api_key_budgets WHERE tenant_id = 'key-a' AND key_id = 'k-day';
SELECT amount FROM billing_deduct('key-a', 1, 'key-a-2', api_key => 'k-day');
SELECT regress_error($$SELECT billing_deduct('key-a', 0.000001, 'key-a-3', api_key => 'k-day')$$);
SELECT regress_error($$SELECT billing_hold('key-a', 0.000001, 'key-a-h2', api_key => 'k-day')$$);
-- billing_try_deduct records the refusal, with the key
SELECT status, replayed, sqlstate, reason,
       detail = format('Budget 10.000000 per day, spent 5.000000, on hold 5.000000, required 0.000001; resets at %s.',
                       ((now() AT TIME ZONE 'America/New_York')::date + 1)::timestamp
                       AT TIME ZONE 'America/New_York') AS resets_at_local_midnight
  FROM billing_try_deduct('key-a', 0.000001, 'key-a-3', api_key => 'k-day');
SELECT trace_id, api_key, sqlstate FROM billing.rejections WHERE tenant_id = 'key-a';
-- the account itself, and other keys, are not limited by this budget
SELECT amount FROM billing_deduct('key-a', 1, 'key-a-4');
SELECT amount FROM billing_deduct('key-a', 1, 'key-a-5', api_key => 'k-free');
-- the key's hold can be captured (it is within the budget already); the
-- capture is charged through the key
SELECT amount, hold_status FROM billing_capture('key-a', 'key-a-h1', 4, 'key-a-c1');
SELECT trace_id, kind, amount, api_key FROM billing.ledger
 WHERE tenant_id = 'key-a' AND trace_id = 'key-a-c1';
SELECT key_id, spent, on_hold, remaining
  FROM billing.api_key_budgets WHERE tenant_id = 'key-a' AND key_id = 'k-day';
-- an excess beyond the hold is new spending: refused while the budget is
-- used up
SELECT regress_error($$SELECT billing_capture('key-a', 'key-a-h1', 1.000001, 'key-a-c2')$$);
SELECT status, released FROM billing_release('key-a', 'key-a-h1', 'key-a-r1');
SELECT key_id, spent, on_hold, remaining
  FROM billing.api_key_budgets WHERE tenant_id = 'key-a' AND key_id = 'k-day';
SELECT amount FROM billing_deduct('key-a', 1, 'key-a-6', api_key => 'k-day');
SELECT regress_error($$SELECT billing_deduct('key-a', 0.000001, 'key-a-7', api_key => 'k-day')$$);

-- A lifetime budget never resets; a budget of 0 allows nothing.
SELECT amount FROM billing_deduct('key-a', 3, 'key-a-8', api_key => 'k-life');
SELECT regress_error($$SELECT billing_deduct('key-a', 0.000001, 'key-a-9', api_key => 'k-life')$$);
SELECT key_id, budget, budget_period FROM billing_api_key_create('key-a', 'k-zero', 0, 'month');
SELECT regress_error($$SELECT billing_hold('key-a', 0.000001, 'key-a-h3', api_key => 'k-zero')$$);
-- a monthly budget resets on the first of the next month
SELECT amount FROM billing_deduct('key-a', 15, 'key-a-10', api_key => 'k-month');
SELECT status, sqlstate,
       detail = format('Budget 20.000000 per month, spent 15.000000, on hold 0.000000, required 5.000001; resets at %s.',
                       (date_trunc('month', now() AT TIME ZONE 'America/New_York') + interval '1 month')
                       AT TIME ZONE 'America/New_York') AS resets_at_first_of_next_month
  FROM billing_try_deduct('key-a', 5.000001, 'key-a-11', api_key => 'k-month');

-- A new period starts from zero.  To show it without waiting for
-- midnight, the period of k-day is moved back by a day as the superuser.
UPDATE billing.api_keys SET period_start = period_start - 1
 WHERE tenant_id = 'key-a' AND key_id = 'k-day';
SELECT key_id, spent, on_hold, remaining
  FROM billing.api_key_budgets WHERE tenant_id = 'key-a' AND key_id = 'k-day';
SELECT amount FROM billing_deduct('key-a', 10, 'key-a-12', api_key => 'k-day');
SELECT regress_error($$SELECT billing_deduct('key-a', 0.000001, 'key-a-13', api_key => 'k-day')$$);

--
-- billing_api_key_update: the budget can be raised or lowered (the spend
-- of the period stays), moved to another period (which starts counting
-- afresh) or removed.
--
SELECT key_id, budget, budget_period, spent, remaining
  FROM billing_api_key_update('key-a', 'k-day', budget => 12);
SELECT amount FROM billing_deduct('key-a', 2, 'key-a-13', api_key => 'k-day');
SELECT key_id, budget, budget_period, spent, remaining
  FROM billing_api_key_update('key-a', 'k-day', budget_period => 'lifetime');
SELECT key_id, budget, budget_period, spent, remaining, resets_at
  FROM billing_api_key_update('key-a', 'k-day', remove_budget => true);
SELECT amount FROM billing_deduct('key-a', 50, 'key-a-14', api_key => 'k-day');
SELECT key_id, budget, budget_period, remaining
  FROM billing_api_key_update('key-a', 'k-day', budget => 5, budget_period => 'day');
SELECT regress_error($$SELECT billing_api_key_update('key-a', 'k-day', budget => -1)$$);
SELECT regress_error($$SELECT billing_api_key_update('key-a', 'k-free', budget => 5)$$);
SELECT regress_error($$SELECT billing_api_key_update('key-a', 'k-nope', status => 'active')$$);
-- a NULL key id is ZB015, a key id that is no identifier ZB018 (not echoed)
SELECT split_part(regress_error($$SELECT billing_api_key_update('key-a', NULL, status => 'active')$$), E'\n', 1);
SELECT split_part(regress_error($$SELECT billing_api_key_update('key-a', repeat('k', 100000), status => 'active')$$), E'\n', 1);
SELECT regress_error($$SELECT billing_api_key_update('key-a', 'k-day', status => 'deleted')$$);

--
-- Status.  A suspended key refuses charges and holds (ZB051) until it is
-- active again; what its holds reserved can still be captured.  Revoked
-- is final.
--
SELECT status FROM billing_hold('key-a', 2, 'key-a-h4', api_key => 'k-free');
SELECT key_id, status FROM billing_api_key_update('key-a', 'k-free', status => 'suspended');
SELECT regress_error($$SELECT billing_deduct('key-a', 1, 'key-a-15', api_key => 'k-free')$$);
SELECT regress_error($$SELECT billing_hold('key-a', 1, 'key-a-h5', api_key => 'k-free')$$);
SELECT status, sqlstate, reason, detail
  FROM billing_try_deduct('key-a', 1, 'key-a-15', api_key => 'k-free');
SELECT amount, hold_status FROM billing_capture('key-a', 'key-a-h4', 2, 'key-a-c4');
SELECT key_id, status FROM billing_api_key_update('key-a', 'k-free', status => 'active');
SELECT amount FROM billing_deduct('key-a', 1, 'key-a-16', api_key => 'k-free');

SELECT key_id, status FROM billing_api_key_update('key-a', 'k-life', status => 'revoked');
-- (the hint is left out: it suggests reactivating the key, which a
-- revoked key cannot be)
SELECT regexp_replace(regress_error($$SELECT billing_deduct('key-a', 1, 'key-a-17', api_key => 'k-life')$$),
                      E'\nHINT: .*', '') AS error;
SELECT regress_error($$SELECT billing_api_key_update('key-a', 'k-life', status => 'active')$$);
SELECT regress_error($$SELECT billing_api_key_update('key-a', 'k-life', status => 'suspended')$$);
SELECT key_id, status FROM billing_api_key_update('key-a', 'k-life', status => 'revoked');
-- a replay of a charge made before the revocation still returns it
SELECT trace_id, amount, replayed FROM billing_deduct('key-a', 3, 'key-a-8', api_key => 'k-life');

--
-- Unknown keys (ZB050) are caller bugs: raised by both forms, nothing is
-- recorded.  A key belongs to one account.  An empty key id is invalid
-- (ZB018).
--
SELECT regress_error($$SELECT billing_deduct('key-a', 1, 'key-a-18', api_key => 'k-nope')$$);
SELECT regress_error($$SELECT billing_try_deduct('key-a', 1, 'key-a-18', api_key => 'k-nope')$$);
SELECT regress_error($$SELECT billing_hold('key-a', 1, 'key-a-h6', api_key => 'k-nope')$$);
SELECT regress_error($$SELECT billing_deduct('key-b', 1, 'key-b-1', api_key => 'k-month')$$);
SELECT regress_error($$SELECT billing_deduct('key-a', 1, 'key-a-18', api_key => '')$$);
SELECT count(*) AS rejections FROM billing.rejections WHERE trace_id IN ('key-a-18', 'key-b-1');

--
-- Reporting.  billing.api_key_budgets: one row per key (spent is what
-- the key's current period counted: a day's or a month's, or, for a key
-- without a budget period, as for a lifetime budget, all that was charged
-- through it); usage_by_api_key
-- groups the charges by the api_key argument, or by metadata->>'api_key'
-- for charges made without it.
--
SELECT key_id, status, budget, budget_period, spent, on_hold, remaining,
       resets_at IS NOT NULL AS resets, last_used_at IS NOT NULL AS used, metadata
  FROM billing.api_key_budgets WHERE tenant_id LIKE 'key-%'
 ORDER BY tenant_id, key_id;
SELECT amount FROM billing_deduct('key-a', 0.5, 'key-a-19', metadata => '{"api_key": "legacy-key"}');
SELECT api_key, charges, spent FROM billing.usage_by_api_key
 WHERE tenant_id = 'key-a' ORDER BY api_key NULLS LAST;
SELECT sum(spent) AS by_api_key,
       (SELECT -sum(amount) FROM billing.ledger
         WHERE tenant_id = 'key-a' AND kind IN ('deduct', 'capture')) AS ledger_charges
  FROM billing.usage_by_api_key WHERE tenant_id = 'key-a';

SELECT * FROM billing_verify() WHERE tenant_id LIKE 'key-%';

-- What the Redis mirror holds for a key with a budget: its open holds too,
-- since billing_deduct counts them against the budget (a gateway must).
SELECT tenant_id FROM billing_account_create('key-m');
SELECT balance_after FROM billing_credit('key-m', 100, 'key-m-top');
SELECT key_id FROM billing_api_key_create('key-m', 'mk', budget => 10, budget_period => 'month');
SELECT key_id FROM billing_api_key_create('key-m', 'nb');
SELECT remaining FROM billing_hold('key-m', 8, 'key-m-h1', api_key => 'mk');
SELECT key_id, fields[array_position(fields, 'spent') + 1] AS spent,
       fields[array_position(fields, 'budget') + 1] AS budget,
       fields[array_position(fields, 'holds') + 1] AS holds
  FROM billing.sync_snapshot(ARRAY['key-m'], '', 0) WHERE key_id IS NOT NULL ORDER BY key_id;

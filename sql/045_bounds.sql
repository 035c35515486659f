--
-- 045_bounds: every free-form input has a documented bound, every error
-- shows bounded data only, and no input can break the ledger's calendar,
-- prices or quotas for anyone.  Tenants start with "bnd-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT tenant_id FROM billing_account_create('bnd-a');
SELECT tenant_id FROM billing_account_create('bnd-tz', timezone => 'Pacific/Kiritimati');
SELECT kind FROM billing_credit('bnd-a', 100, 'bnd-a-top');
SELECT kind FROM billing_credit('bnd-tz', 100, 'bnd-tz-top');

--
-- event_at: within billing.event_at_window (default 7 days) before now and
-- 5 minutes after (ZB019); usage is bucketed and priced by it.
--
SHOW billing.event_at_window;
SELECT kind, amount FROM billing_deduct('bnd-a', 0.5, 'bnd-ev-1', event_at => now() - interval '6 days');
SELECT kind, amount FROM billing_deduct('bnd-a', 0.5, 'bnd-ev-2', event_at => now() + interval '1 minute');
SELECT regress_error($$SELECT billing_deduct('bnd-a', 0.5, 'bnd-ev-3', event_at => now() - interval '8 days')$$) ~
       '^ZB019: event_at is outside the accepted window' AS too_old;
SELECT regress_error($$SELECT billing_deduct('bnd-a', 0.5, 'bnd-ev-4', event_at => now() + interval '1 hour')$$) ~
       '^ZB019: event_at is outside the accepted window' AS too_new;
-- the extreme times that once broke the usage views of every tenant
SELECT regress_error($$SELECT billing_deduct('bnd-tz', 0.5, 'bnd-ev-5', event_at => '294276-12-31 23:59:59+00')$$) ~
       '^ZB019' AS far_future;
SELECT regress_error($$SELECT billing_deduct('bnd-tz', 0.5, 'bnd-ev-6', event_at => '4713-01-01 00:00:00+00 BC')$$) ~
       '^ZB019' AS far_past;
SELECT regress_error($$SELECT billing_deduct('bnd-a', 0.5, 'bnd-ev-7', event_at => 'infinity')$$);
SELECT count(*) > 0 AS usage_views_work FROM billing.usage_daily WHERE tenant_id LIKE 'bnd-%';
SELECT count(*) > 0 AS monthly_works FROM billing.usage_monthly WHERE tenant_id LIKE 'bnd-%';
-- the same window for holds' captures, usage pricing and batches
SELECT status FROM billing_hold('bnd-a', 1, 'bnd-h1');
SELECT regress_error($$SELECT billing_capture('bnd-a', 'bnd-h1', 0.5, 'bnd-c1', event_at => now() - interval '30 days')$$) ~
       '^ZB019' AS capture_too_old;
SELECT model FROM billing_price_set('bnd-model', 1, 1, now() - interval '60 days');
SELECT model FROM billing_price_set('bnd-model', 10, 10, now() - interval '1 day');
-- back-dating usage to before a price rise is refused beyond the window ...
SELECT regress_error($$SELECT billing_deduct_usage('bnd-a', 'bnd-model', 1000, 0, 'bnd-u1',
                                                   event_at => now() - interval '59 days')$$) ~
       '^ZB019' AS backdated_usage;
-- ... and inside it, priced at the time the usage happened
SELECT amount FROM billing_deduct_usage('bnd-a', 'bnd-model', 1000, 0, 'bnd-u2', event_at => now() - interval '2 days');
SELECT amount FROM billing_deduct_usage('bnd-a', 'bnd-model', 1000, 0, 'bnd-u3');
-- a superuser may widen the window for a backfill (the application cannot:
-- the setting is superuser-only)
SET billing.event_at_window = '90d';
SELECT amount FROM billing_deduct_usage('bnd-a', 'bnd-model', 1000, 0, 'bnd-u4', event_at => now() - interval '59 days');
RESET billing.event_at_window;
SELECT context FROM pg_settings WHERE name = 'billing.event_at_window';
-- the window is a rule for new charges: a replay returns the original outcome
-- whenever it comes, also after its event time left the window (narrowed
-- to 5 s once the charge is in: then nothing races the window but the sleep)
SELECT now() AS ev \gset
SELECT kind, replayed FROM billing_deduct('bnd-a', 0.01, 'bnd-r1', event_at => :'ev');
SET billing.event_at_window = '5s';
SELECT pg_sleep(6);
SELECT kind, replayed FROM billing_deduct('bnd-a', 0.01, 'bnd-r1', event_at => :'ev');
SELECT regress_error(format($$SELECT billing_deduct('bnd-a', 0.01, 'bnd-r2', event_at => %L)$$, :'ev')) ~ '^ZB019' AS new_one_refused;
RESET billing.event_at_window;

--
-- Sizes: metadata at most 16 kB, descriptions and reasons at most 1000
-- characters; the errors show sizes, never the value.
--
SELECT regress_error(format($$SELECT billing_deduct('bnd-a', 0.01, 'bnd-m1', metadata => %L)$$,
                            jsonb_build_object('blob', repeat('x', 20000))));
SELECT kind FROM billing_deduct('bnd-a', 0.01, 'bnd-m2', metadata => jsonb_build_object('blob', repeat('x', 16000)));
SELECT regress_error(format($$SELECT billing_deduct('bnd-a', 0.01, 'bnd-m3', description => %L)$$, repeat('d', 1001)));
SELECT regress_error(format($$SELECT billing_deduct_many(ARRAY['bnd-a'], ARRAY[0.01], ARRAY['bnd-m4'],
                                                         metadata => ARRAY[%L::jsonb])$$,
                            jsonb_build_object('blob', repeat('x', 20000))));
SELECT regress_error(format($$SELECT billing_hold('bnd-a', 0.01, 'bnd-m5', metadata => %L)$$,
                            jsonb_build_object('blob', repeat('x', 20000))));
SELECT regress_error(format($$SELECT billing_account_update('bnd-a', reason => %L)$$, repeat('r', 10000000)));
SELECT regress_error(format($$SELECT billing_limits_set('bnd-a', reason => %L)$$, repeat('r', 1001)));
SELECT regress_error(format($$SELECT billing_account_create('bnd-big', metadata => %L)$$,
                            jsonb_build_object('blob', repeat('x', 20000))));
SELECT regress_error(format($$SELECT billing_job_submit('bnd-a', 'k', 'bnd-j1', 1, input => %L)$$,
                            jsonb_build_object('blob', repeat('x', 20000))));
SELECT regress_error(format($$SELECT billing_account_create('bnd-a', currency => %L)$$, repeat('Q', 100000)));
-- a replay with a huge metadata that differs: the detail names sizes only
SELECT length(regress_error(format($$SELECT billing_deduct('bnd-a', 0.01, 'bnd-m2', metadata => %L)$$,
                                   jsonb_build_object('blob', repeat('y', 16000))))) < 400 AS bounded_detail;

--
-- Identifiers (tenant, trace, key, model, kind, idempotency key, worker):
-- no control or invisible characters (they make two ids look alike in logs).
--
SELECT regress_error($$SELECT billing_deduct('bnd-a', 0.01, E'bnd-\u200bx')$$);
SELECT regress_error($$SELECT billing_deduct('bnd-a', 0.01, E'bnd-\nx')$$);
SELECT regress_error($$SELECT billing_deduct(E'bnd-\u202ea', 0.01, 'bnd-i1')$$);
SELECT regress_error($$SELECT billing_account_create(E'bnd-\u00ad')$$);
SELECT regress_error($$SELECT billing_api_key_create('bnd-a', E'key\u2060')$$);
SELECT regress_error($$SELECT billing_price_set(E'model\x01', 1, 1)$$);
SELECT regress_error($$SELECT billing_job_submit('bnd-a', E'kind\ufeff', 'bnd-j2', 1)$$);
SELECT regress_error($$SELECT billing_job_claim(E'worker\t1')$$);
SELECT regress_error($$SELECT billing_hold('bnd-a', 0.01, E'bnd-\x7f')$$);
-- ordinary non-ASCII letters are fine
SELECT trace_id FROM billing_deduct('bnd-a', 0.01, 'bnd-größe-日本');

--
-- A time zone change never resets a quota: the usage of the current day and
-- month carries over (here +14 -> -12 -> +14, which always lands on
-- another calendar date).
--
SELECT daily_request_quota, daily_spend_cap FROM billing_limits_set('bnd-tz', daily_requests => 2, daily_spend => 2);
SELECT kind FROM billing_deduct('bnd-tz', 0.5, 'bnd-tz-1');
SELECT kind FROM billing_deduct('bnd-tz', 0.5, 'bnd-tz-2');
SELECT regress_error($$SELECT billing_deduct('bnd-tz', 0.5, 'bnd-tz-3')$$) ~ '^ZB040' AS quota_reached;
SELECT timezone FROM billing_account_update('bnd-tz', timezone => 'Etc/GMT+12');
SELECT regress_error($$SELECT billing_deduct('bnd-tz', 0.5, 'bnd-tz-4')$$) ~ '^ZB040' AS still_reached;
SELECT timezone FROM billing_account_update('bnd-tz', timezone => 'Pacific/Kiritimati');
SELECT regress_error($$SELECT billing_deduct('bnd-tz', 0.5, 'bnd-tz-5')$$) ~ '^ZB040' AS still_reached_back;
SELECT requests_today, spent_today FROM billing.quota_usage WHERE tenant_id = 'bnd-tz';
-- an API key's daily budget carries over the same way
SELECT key_id FROM billing_api_key_create('bnd-tz', 'bnd-k', 1, 'day');
SELECT daily_request_quota FROM billing_limits_set('bnd-tz');
SELECT kind FROM billing_deduct('bnd-tz', 1, 'bnd-k-1', api_key => 'bnd-k');
SELECT timezone FROM billing_account_update('bnd-tz', timezone => 'Etc/GMT+12');
SELECT regress_error($$SELECT billing_deduct('bnd-tz', 0.5, 'bnd-k-2', api_key => 'bnd-k')$$) ~ '^ZB052' AS key_budget_kept;
SELECT spent, remaining FROM billing.api_key_budgets WHERE tenant_id = 'bnd-tz';

--
-- The DROP guard refuses dropping billing, and nothing else: a statement
-- that only mentions billing in a comment is not refused.
--
DROP EXTENSION IF EXISTS regress_no_such_extension /* not billing */;
SELECT regress_error($$DROP EXTENSION billing$$);

SELECT count(*) AS problems FROM billing_verify();

--
-- Sums past bigint's range.  One amount is at most 10^12 (10^18 micro-units)
-- and a balance stays within bigint, but a day's charges of one tenant, or
-- the open holds of a currency, can add up to more than 9.2 * 10^18
-- micro-units.  The usage views and billing.metrics sum in numeric, so they
-- keep working for every reader (they failed with 22003 for everyone).
--
SELECT tenant_id FROM billing_account_create('bnd-big', currency => 'BNDBIG');
DO $$
BEGIN
    FOR g IN 1 .. 10 LOOP
        PERFORM billing_credit('bnd-big', 1000000000000, 'bnd-big-c' || g);
        PERFORM billing_deduct('bnd-big', 1000000000000, 'bnd-big-d' || g,
                               metadata => '{"model": "bnd-big-model", "api_key": "bnd-big-key"}');
    END LOOP;
END
$$;
-- and one more of 999999999999.999999: the sum is exact to the micro-unit
SELECT kind FROM billing_credit('bnd-big', 999999999999.999999, 'bnd-big-c11');
SELECT kind FROM billing_deduct('bnd-big', 999999999999.999999, 'bnd-big-d11',
                                metadata => '{"model": "bnd-big-model", "api_key": "bnd-big-key"}');
SELECT charges, charged, spent, credited FROM billing.usage_daily WHERE tenant_id = 'bnd-big';
SELECT charges, charged, spent, credited FROM billing.usage_monthly WHERE tenant_id = 'bnd-big';
SELECT model, charged FROM billing.usage_by_model WHERE tenant_id = 'bnd-big';
SELECT api_key, charged FROM billing.usage_by_api_key WHERE tenant_id = 'bnd-big';
SELECT count(*) > 0 AS all_tenants_readable FROM billing.usage_daily;
-- two accounts of one currency, each with 9 holds of 10^12: 1.8 * 10^19
SELECT tenant_id FROM billing_account_create('bnd-big2', currency => 'BNDBIG');
DO $$
BEGIN
    FOR g IN 1 .. 9 LOOP
        PERFORM billing_credit(t, 1000000000000, t || '-hc' || g) FROM unnest(ARRAY['bnd-big', 'bnd-big2']) t;
        PERFORM billing_hold(t, 1000000000000, t || '-h' || g) FROM unnest(ARRAY['bnd-big', 'bnd-big2']) t;
    END LOOP;
END
$$;
SELECT name, value FROM billing.metrics
 WHERE name LIKE 'billing_open_holds%' AND labels->>'currency' = 'BNDBIG' ORDER BY name;
SELECT count(*) > 0 AS metrics_readable FROM regexp_split_to_table(billing_metrics(), E'\n');
SELECT count(*) AS problems FROM billing_verify('bnd-big');

-- Numbers of any length: an error's detail shows a number given as it was
-- up to 64 characters, else its first 64 (an amount's also its length; a
-- numeric may have 100,000 digits; the details once echoed it whole)
SELECT label, length(e) < 300 AS bounded, split_part(e, E'\n', 2) AS detail
  FROM (VALUES
    ('amount 10^1000',      $$SELECT billing_deduct('bnd-a', 1e1000, 'bnd-long-1')$$),
    ('amount -10^1000',     $$SELECT billing_deduct('bnd-a', -1e1000, 'bnd-long-2')$$),
    ('amount 200 decimals', $$SELECT billing_deduct('bnd-a', ('0.' || repeat('1', 200))::numeric, 'bnd-long-3')$$),
    ('seconds -10^1000',    $$SELECT billing_cost('bnd-model', 1, 1, seconds => -1e1000)$$)
  ) AS t(label, sql), LATERAL regress_error(sql) AS e;

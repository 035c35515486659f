--
-- 080_privileges: the role model.  An application role gets EXECUTE on the
-- billing_* API and no table rights; a reporting role gets SELECT on the
-- views and nothing else; other roles get nothing.  The API functions run
-- as their owner with a pinned search_path, so a caller's own objects
-- cannot change what they do.  Tenants start with "priv-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_billing_app;
DROP ROLE IF EXISTS regress_billing_report;
DROP ROLE IF EXISTS regress_billing_nobody;
RESET client_min_messages;
CREATE ROLE regress_billing_app NOLOGIN;
CREATE ROLE regress_billing_report NOLOGIN;
CREATE ROLE regress_billing_nobody NOLOGIN;

-- The grant helpers name every function and view with its schema, so they
-- work whatever the caller's search_path (here: without the extension's
-- schema public).
SET search_path = pg_catalog;
SELECT public.billing_grant_app('regress_billing_app');
SELECT public.billing_grant_reporting('regress_billing_report');
RESET search_path;
-- granting twice is harmless
SELECT billing_grant_app('regress_billing_app');
SELECT regress_error($$SELECT billing_grant_app(NULL)$$);
SELECT regress_error($$SELECT billing_grant_reporting('regress_no_such_role')$$);

-- What each role may execute ...
SELECT p.oid::regprocedure AS function,
       has_function_privilege('regress_billing_app', p.oid, 'EXECUTE') AS app,
       has_function_privilege('regress_billing_report', p.oid, 'EXECUTE') AS report,
       has_function_privilege('regress_billing_nobody', p.oid, 'EXECUTE') AS nobody
  FROM pg_proc p
 WHERE (p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'billing\_%')
    OR p.pronamespace = 'billing'::regnamespace
 ORDER BY p.pronamespace::regnamespace::text, p.proname;

-- ... and read or write.
CREATE FUNCTION pg_temp.rights(r name, c oid) RETURNS text
    LANGUAGE sql
AS $$
    SELECT coalesce(nullif(array_to_string(ARRAY(
               SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE',
                                          'REFERENCES', 'TRIGGER']) p
                WHERE has_table_privilege(r, c, p)), ','), ''), '-')
$$;
SELECT c.oid::regclass AS relation,
       pg_temp.rights('regress_billing_app', c.oid) AS app,
       pg_temp.rights('regress_billing_report', c.oid) AS report,
       pg_temp.rights('regress_billing_nobody', c.oid) AS nobody
  FROM pg_class c
 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'v', 'S')
 ORDER BY c.relkind, c.relname;
SELECT r AS role, has_schema_privilege(r, 'billing', 'USAGE') AS billing_usage,
       has_schema_privilege(r, 'billing', 'CREATE') AS billing_create
  FROM unnest(ARRAY['regress_billing_app', 'regress_billing_report',
                    'regress_billing_nobody']) r;

--
-- The application role: the API works ...
--
SET ROLE regress_billing_app;
SELECT tenant_id, balance FROM billing_account_create('priv-a', credit_limit => 1);
SELECT kind, amount, balance_after FROM billing_credit('priv-a', 10, 'priv-a-1');
SELECT kind, amount, balance_after FROM billing_deduct('priv-a', 3, 'priv-a-2');
SELECT status, amount, sqlstate FROM billing_try_deduct('priv-a', 100, 'priv-a-3');
SELECT billing_balance('priv-a') AS balance, billing_balance_at('priv-a', 'infinity') AS at_infinity;
SELECT status, credit_limit FROM billing_account_update('priv-a', credit_limit => 2, reason => 'app');
-- the holds, limits, API keys and usage pricing too (the price itself is
-- set below by the owner: prices are global, not per account)
RESET ROLE;
SELECT model, input_per_1k, output_per_1k
  FROM billing_price_set('priv-model', 0.5, 1.5, '2024-01-01 00:00:00+00');
SET ROLE regress_billing_app;
SELECT tenant_id, balance FROM billing_account_create('priv-b');
SELECT kind, amount, balance_after FROM billing_credit('priv-b', 10, 'priv-b-1');
SELECT key_id, status FROM billing_api_key_create('priv-b', 'priv-key', 5, 'lifetime');
SELECT daily_request_quota, max_charge FROM billing_limits_set('priv-b', daily_requests => 100,
                                                               max_charge => 5);
SELECT status, amount, remaining, available FROM billing_hold('priv-b', 1, 'priv-b-h1', api_key => 'priv-key');
SELECT status, remaining FROM billing_hold_extend('priv-b', 'priv-b-h1', '1 hour');
SELECT amount, balance_after, hold_status FROM billing_capture('priv-b', 'priv-b-h1', 0.5, 'priv-b-c1');
SELECT status, released FROM billing_release('priv-b', 'priv-b-h1', 'priv-b-r1');
SELECT status, amount, remaining FROM billing_hold('priv-b', 2, 'priv-b-h2');
SELECT billing_cost('priv-model', 1000, 1000) AS cost;
SELECT kind, amount, balance_after
  FROM billing_deduct_usage('priv-b', 'priv-model', 1000, 1000, 'priv-b-u1', api_key => 'priv-key');
SELECT regress_error($$SELECT billing_price_set('priv-model', 1, 1)$$);
-- ... but the tables, views, sequences and the audit function are closed
-- to it (42501), so it cannot bypass the API.
SELECT regress_error($$SELECT count(*) FROM billing.entries$$);
SELECT regress_error($$INSERT INTO billing.entries (tenant_id, trace_id, kind, amount_micros,
        balance_after_micros, version) VALUES ('priv-a', 'forged', 'topup', 1, 1, 99)$$);
SELECT regress_error($$UPDATE billing.entries SET amount_micros = 1$$);
SELECT regress_error($$DELETE FROM billing.entries$$);
SELECT regress_error($$SELECT count(*) FROM billing.accounts$$);
SELECT regress_error($$INSERT INTO billing.accounts (tenant_id) VALUES ('priv-forged')$$);
SELECT regress_error($$UPDATE billing.accounts SET balance_micros = 1000000000$$);
SELECT regress_error($$DELETE FROM billing.accounts$$);
SELECT regress_error($$SELECT count(*) FROM billing.rejections$$);
SELECT regress_error($$INSERT INTO billing.account_events (tenant_id, action, changes)
        VALUES ('priv-a', 'update', '{}')$$);
SELECT regress_error($$SELECT count(*) FROM billing.balances$$);
SELECT regress_error($$SELECT nextval('billing.entry_id_seq')$$);
SELECT regress_error($$SELECT * FROM billing_verify()$$);
SELECT regress_error($$SELECT billing.check_account_settings('priv-a', NULL, NULL, NULL, NULL)$$);
SELECT regress_error($$SELECT count(*) FROM billing.holds$$);
SELECT regress_error($$UPDATE billing.holds SET status = 'released'$$);
SELECT regress_error($$SELECT count(*) FROM billing.hold_events$$);
SELECT regress_error($$UPDATE billing.api_keys SET budget_micros = NULL$$);
SELECT regress_error($$INSERT INTO billing.prices (model, currency, effective_from, input_per_1k_micros,
        output_per_1k_micros) VALUES ('priv-model', 'USD', now(), 0, 0)$$);
SELECT regress_error($$SELECT count(*) FROM billing.open_holds$$);
SELECT regress_error($$SELECT billing.lock_account('priv-a')$$);
SELECT regress_error($$SELECT billing.price_at('priv-model', 'USD', now())$$);
SELECT regress_error($$SELECT billing_grant_app('regress_billing_nobody')$$);
SELECT regress_error($$SELECT billing_grant_reporting('regress_billing_app')$$);
SELECT regress_error($$CREATE TABLE billing.mine (x int)$$);
-- the pure conversion helpers are public (NULL stays NULL)
SELECT billing.to_amount(1500000), billing.to_micros(1.5),
       billing.to_micros(NULL) IS NULL AS null_to_micros;
RESET ROLE;

--
-- The reporting role: the views, nothing else.
--
SET ROLE regress_billing_report;
SELECT tenant_id, balance, credit_limit, available, version FROM billing.balances
 WHERE tenant_id = 'priv-a';
SELECT trace_id, kind, amount, balance_after FROM billing.ledger
 WHERE tenant_id = 'priv-a' ORDER BY version;
SELECT charges, spent, credits, credited FROM billing.usage_daily WHERE tenant_id = 'priv-a';
SELECT charges, spent, credits, credited FROM billing.usage_monthly WHERE tenant_id = 'priv-a';
SELECT charges, spent FROM billing.usage_by_model WHERE tenant_id = 'priv-a';
SELECT charges, spent FROM billing.usage_by_api_key WHERE tenant_id = 'priv-a';
SELECT tenant_id, balance, on_hold, available FROM billing.balances WHERE tenant_id = 'priv-b';
SELECT trace_id, api_key, amount, captured, remaining FROM billing.open_holds
 WHERE tenant_id = 'priv-b';
SELECT requests_today, daily_request_quota, requests_left_today, spent_today, max_charge
  FROM billing.quota_usage WHERE tenant_id = 'priv-b';
SELECT key_id, status, budget, budget_period, spent, on_hold, remaining
  FROM billing.api_key_budgets WHERE tenant_id = 'priv-b';
SELECT model, currency, input_per_1k, output_per_1k FROM billing.price_list
 WHERE model = 'priv-model';
SELECT api_key, charges, spent FROM billing.usage_by_api_key WHERE tenant_id = 'priv-b' ORDER BY 1;
SELECT regress_error($$SELECT billing_deduct('priv-a', 1, 'priv-r-1')$$);
SELECT regress_error($$SELECT billing_credit('priv-a', 1, 'priv-r-1')$$);
SELECT regress_error($$SELECT billing_balance('priv-a')$$);
SELECT regress_error($$SELECT billing_account_create('priv-r')$$);
SELECT regress_error($$SELECT * FROM billing_verify()$$);
SELECT regress_error($$SELECT count(*) FROM billing.entries$$);
SELECT regress_error($$SELECT count(*) FROM billing.accounts$$);
SELECT regress_error($$SELECT count(*) FROM billing.rejections$$);
SELECT regress_error($$SELECT count(*) FROM billing.account_events$$);
SELECT regress_error($$SELECT count(*) FROM billing.holds$$);
SELECT regress_error($$SELECT count(*) FROM billing.api_keys$$);
SELECT regress_error($$SELECT count(*) FROM billing.prices$$);
SELECT regress_error($$DELETE FROM billing.balances$$);
SELECT regress_error($$SELECT billing_hold('priv-b', 1, 'priv-r-2')$$);
SELECT regress_error($$SELECT billing_cost('priv-model', 1, 1)$$);
RESET ROLE;

--
-- A role without grants can call nothing and read nothing.
--
SET ROLE regress_billing_nobody;
SELECT regress_error($$SELECT billing_account_create('priv-n')$$);
SELECT regress_error($$SELECT billing_account_update('priv-a', status => 'closed')$$);
SELECT regress_error($$SELECT billing_credit('priv-a', 1, 'priv-n-1')$$);
SELECT regress_error($$SELECT billing_deduct('priv-a', 1, 'priv-n-1')$$);
SELECT regress_error($$SELECT billing_try_deduct('priv-a', 1, 'priv-n-1')$$);
SELECT regress_error($$SELECT billing_hold('priv-b', 1, 'priv-n-2')$$);
SELECT regress_error($$SELECT billing_capture('priv-b', 'priv-b-h2', 1, 'priv-n-3')$$);
SELECT regress_error($$SELECT billing_release('priv-b', 'priv-b-h2', 'priv-n-4')$$);
SELECT regress_error($$SELECT billing_limits_set('priv-b')$$);
SELECT regress_error($$SELECT billing_api_key_update('priv-b', 'priv-key', status => 'revoked')$$);
SELECT regress_error($$SELECT billing_deduct_usage('priv-b', 'priv-model', 1, 1, 'priv-n-5')$$);
SELECT regress_error($$SELECT billing_balance('priv-a')$$);
SELECT regress_error($$SELECT billing_balance_at('priv-a', now())$$);
SELECT regress_error($$SELECT * FROM billing_verify()$$);
SELECT regress_error($$SELECT count(*) FROM billing.balances$$);
SELECT regress_error($$SELECT count(*) FROM billing.entries$$);
RESET ROLE;

-- Who changed an account is recorded as the session user (the login
-- role), also when the change was made under SET ROLE.
SELECT action, changes, reason, changed_by FROM billing.account_events
 WHERE tenant_id = 'priv-a' ORDER BY event_id;

--
-- A hostile search_path.  The application role owns a schema with its own
-- now(), to_amount() and text = operator, and puts it in front of
-- pg_catalog.  Its own queries now see the fakes, but the API does not:
-- amounts, balances, time-zone checks, idempotency and conflicts behave
-- exactly as before.
--
CREATE SCHEMA regress_hostile;
GRANT USAGE, CREATE ON SCHEMA regress_hostile TO regress_billing_app;
SET ROLE regress_billing_app;
CREATE FUNCTION regress_hostile.now() RETURNS timestamptz
    LANGUAGE sql AS $$ SELECT '2000-01-01 00:00:00+00'::timestamptz $$;
CREATE FUNCTION regress_hostile.to_amount(bigint) RETURNS numeric
    LANGUAGE sql AS $$ SELECT 0::numeric $$;
CREATE FUNCTION regress_hostile.texteq_always(text, text) RETURNS boolean
    LANGUAGE sql AS $$ SELECT true $$;
CREATE OPERATOR regress_hostile.= (LEFTARG = text, RIGHTARG = text,
                                   FUNCTION = regress_hostile.texteq_always);
SET search_path = regress_hostile, pg_catalog, public;
-- the fakes are in effect for the session's own queries
SELECT 'a' = 'b' AS hostile_equals, now() = '2000-01-01 00:00:00+00' AS hostile_now,
       to_amount(1) AS hostile_to_amount;
-- the API is unaffected
SELECT tenant_id, timezone FROM billing_account_create('priv-h', timezone => 'Europe/Paris');
SELECT regress_error($$SELECT billing_account_create('priv-h', timezone => 'Not/AZone')$$);
SELECT regress_error($$SELECT billing_account_create('priv-h', timezone => 'UTC')$$);
SELECT kind, amount, balance_after, replayed FROM billing_credit('priv-h', 5, 'priv-h-1');
SELECT kind, amount, balance_after, replayed FROM billing_deduct('priv-h', 1.25, 'priv-h-2');
SELECT kind, amount, balance_after, replayed FROM billing_deduct('priv-h', 1.25, 'priv-h-2');
SELECT regress_error($$SELECT billing_deduct('priv-h', 1.5, 'priv-h-2')$$);
SELECT regress_error($$SELECT billing_deduct('priv-h', 100, 'priv-h-3')$$);
SELECT regress_error($$SELECT billing_deduct('priv-nobody', 1, 'priv-h-3')$$);
SELECT status, replayed, amount, sqlstate FROM billing_try_deduct('priv-h', 100, 'priv-h-4');
SELECT status, replayed, amount, sqlstate FROM billing_try_deduct('priv-h', 100, 'priv-h-4');
SELECT billing_balance('priv-h') AS balance,
       billing_balance_at('priv-h', pg_catalog.now()) AS balance_now,
       billing_balance_at('priv-h', '2000-01-02 00:00:00+00') AS balance_in_2000;
SELECT tenant_id, credit_limit, version FROM billing_account_update('priv-h', credit_limit => 1);
-- billing_cost's default at => now() is pg_catalog's now(), not the fake
-- (which would be before the first price of the model)
SELECT billing_cost('priv-model', 1000, 1000) AS cost_now;
SELECT kind, amount, balance_after, replayed
  FROM billing_deduct_usage('priv-h', 'priv-model', 1000, 0, 'priv-h-5');
SELECT kind, amount, balance_after, replayed
  FROM billing_deduct_usage('priv-h', 'priv-model', 1000, 0, 'priv-h-5');
SELECT status, amount, remaining FROM billing_hold('priv-h', 1, 'priv-h-6');
SELECT amount, balance_after, hold_status FROM billing_capture('priv-h', 'priv-h-6', 1, 'priv-h-7');
SELECT daily_request_quota FROM billing_limits_set('priv-h', daily_requests => 10);
SELECT key_id, budget FROM billing_api_key_create('priv-h', 'priv-h-key', 1, 'day');
RESET search_path;
RESET ROLE;
SELECT trace_id, kind, amount, balance_after, version FROM billing.ledger
 WHERE tenant_id = 'priv-h' ORDER BY version;
SELECT * FROM billing_verify('priv-h');

-- Clean up: the roles and their objects go, the ledger stays.
DROP SCHEMA regress_hostile CASCADE;
DROP OWNED BY regress_billing_app, regress_billing_report, regress_billing_nobody;
DROP ROLE regress_billing_app;
DROP ROLE regress_billing_report;
DROP ROLE regress_billing_nobody;
SELECT tenant_id, balance FROM billing.balances WHERE tenant_id LIKE 'priv-%' ORDER BY 1;

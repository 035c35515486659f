--
-- 080_privileges: the role model of a payments system, role by role.
--
--   charging   charges, holds, jobs, balance reads; no credits, no settings
--   treasury   credits of every kind, balance reads
--   admin      accounts, limits, API keys, prices, tenant scopes, the audit
--   reporting  the views; a scoped reporting role sees some tenants only
--
-- No role gets table rights.  The API functions run as their owner with a
-- pinned search_path, so a caller's own objects cannot change what they
-- do, and every entry and account event records the role that asked
-- (after SET ROLE, not the function's owner).  Tenants start with "priv-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SET client_min_messages = warning;
DROP ROLE IF EXISTS regress_billing_charging;
DROP ROLE IF EXISTS regress_billing_treasury;
DROP ROLE IF EXISTS regress_billing_admin;
DROP ROLE IF EXISTS regress_billing_report;
DROP ROLE IF EXISTS regress_billing_report_a;
DROP ROLE IF EXISTS regress_billing_app;
DROP ROLE IF EXISTS regress_billing_nobody;
RESET client_min_messages;
CREATE ROLE regress_billing_charging NOLOGIN;
CREATE ROLE regress_billing_treasury NOLOGIN;
CREATE ROLE regress_billing_admin NOLOGIN;
CREATE ROLE regress_billing_report NOLOGIN;
CREATE ROLE regress_billing_report_a NOLOGIN;
CREATE ROLE regress_billing_app NOLOGIN;
CREATE ROLE regress_billing_nobody NOLOGIN;

-- The grant helpers name every function and view with its schema, so they
-- work whatever the caller's search_path (here: without the extension's
-- schema public).
SET search_path = pg_catalog;
SELECT public.billing_grant_charging('regress_billing_charging');
SELECT public.billing_grant_treasury('regress_billing_treasury');
SELECT public.billing_grant_admin('regress_billing_admin');
SELECT public.billing_grant_reporting('regress_billing_report');
SELECT public.billing_grant_reporting('regress_billing_report_a');
-- 1.3's helper: since 1.4 the charging role, nothing more
SELECT public.billing_grant_app('regress_billing_app');
RESET search_path;
-- granting twice is harmless
SELECT billing_grant_charging('regress_billing_charging');
SELECT regress_error($$SELECT billing_grant_charging(NULL)$$);
SELECT regress_error($$SELECT billing_grant_reporting('regress_no_such_role')$$);

-- What each role may execute ...
SELECT p.oid::regprocedure AS function,
       has_function_privilege('regress_billing_charging', p.oid, 'EXECUTE') AS charging,
       has_function_privilege('regress_billing_treasury', p.oid, 'EXECUTE') AS treasury,
       has_function_privilege('regress_billing_admin', p.oid, 'EXECUTE') AS admin,
       has_function_privilege('regress_billing_report', p.oid, 'EXECUTE') AS report,
       has_function_privilege('regress_billing_nobody', p.oid, 'EXECUTE') AS nobody
  FROM pg_proc p
 WHERE (p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'billing\_%')
    OR p.pronamespace = 'billing'::regnamespace
 ORDER BY p.pronamespace::regnamespace::text, p.proname;
-- the application role of 1.3's helper has exactly the charging role's rights
SELECT count(*) AS differences
  FROM pg_proc p
 WHERE ((p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'billing\_%')
        OR p.pronamespace = 'billing'::regnamespace)
   AND has_function_privilege('regress_billing_app', p.oid, 'EXECUTE')
       <> has_function_privilege('regress_billing_charging', p.oid, 'EXECUTE');

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
       pg_temp.rights('regress_billing_charging', c.oid) AS charging,
       pg_temp.rights('regress_billing_treasury', c.oid) AS treasury,
       pg_temp.rights('regress_billing_admin', c.oid) AS admin,
       pg_temp.rights('regress_billing_report', c.oid) AS report,
       pg_temp.rights('regress_billing_nobody', c.oid) AS nobody
  FROM pg_class c
 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind IN ('r', 'v', 'S')
 ORDER BY c.relkind, c.relname;
SELECT r AS role, has_schema_privilege(r, 'billing', 'USAGE') AS billing_usage,
       has_schema_privilege(r, 'billing', 'CREATE') AS billing_create
  FROM unnest(ARRAY['regress_billing_charging', 'regress_billing_treasury', 'regress_billing_admin',
                    'regress_billing_report', 'regress_billing_nobody']) r;

--
-- The admin role: accounts, limits, keys, prices; no money.
--
SET ROLE regress_billing_admin;
SELECT tenant_id, balance, credit_limit FROM billing_account_create('priv-a', credit_limit => 1);
SELECT tenant_id, balance FROM billing_account_create('priv-b');
SELECT status, credit_limit FROM billing_account_update('priv-a', credit_limit => 2, reason => 'ticket 7');
SELECT key_id, status FROM billing_api_key_create('priv-b', 'priv-key', 5, 'lifetime');
SELECT daily_request_quota, max_charge FROM billing_limits_set('priv-b', daily_requests => 100,
                                                               max_charge => 5);
SELECT model, input_per_1m, output_per_1m
  FROM billing_price_set('priv-model', 0.5, 1.5, '2024-01-01 00:00:00+00');
SELECT tenant_id, model, input_per_1m, output_per_1m
  FROM billing_price_override_set('priv-a', 'priv-model', input_per_1m => 400, output_per_1m => 1200,
                                  effective_from => '2024-01-01 00:00:00+00');
SELECT billing_balance('priv-a') AS balance, count(*) AS problems FROM billing_verify('priv-a');
SELECT regress_error($$SELECT billing_credit('priv-a', 10, 'priv-admin-1')$$);
SELECT regress_error($$SELECT billing_deduct('priv-a', 1, 'priv-admin-2')$$);
SELECT regress_error($$SELECT count(*) FROM billing.accounts$$);
RESET ROLE;

--
-- The treasury role: money in, of every kind; nothing else.
--
SET ROLE regress_billing_treasury;
SELECT kind, amount, balance_after FROM billing_credit('priv-a', 10, 'priv-a-1');
SELECT kind, amount, balance_after FROM billing_credit('priv-b', 10, 'priv-b-1', kind => 'grant',
                                                       description => 'welcome credit');
SELECT kind, amount FROM billing_credit('priv-b', 0.5, 'priv-b-2', kind => 'refund');
SELECT kind, amount FROM billing_credit('priv-b', 0.25, 'priv-b-3', kind => 'adjustment');
SELECT billing_balance('priv-b') AS balance;
SELECT regress_error($$SELECT billing_deduct('priv-a', 1, 'priv-t-1')$$);
SELECT regress_error($$SELECT billing_hold('priv-a', 1, 'priv-t-2')$$);
SELECT regress_error($$SELECT billing_account_update('priv-a', credit_limit => 1000)$$);
SELECT regress_error($$SELECT billing_account_create('priv-t')$$);
SELECT regress_error($$SELECT count(*) FROM billing.entries$$);
RESET ROLE;

--
-- The charging role: charges, holds, jobs, balance reads ...
--
SET ROLE regress_billing_charging;
SELECT kind, amount, balance_after FROM billing_deduct('priv-a', 3, 'priv-a-2',
                                                       description => 'chat', metadata => '{"secret": "s3"}');
SELECT status, amount, sqlstate FROM billing_try_deduct('priv-a', 100, 'priv-a-3');
SELECT billing_balance('priv-a') AS balance, billing_balance_at('priv-a', 'infinity') AS at_infinity;
SELECT status, amount, remaining, available FROM billing_hold('priv-b', 1, 'priv-b-h1', api_key => 'priv-key');
SELECT status, remaining FROM billing_hold_extend('priv-b', 'priv-b-h1', '1 hour');
SELECT amount, balance_after, hold_status FROM billing_capture('priv-b', 'priv-b-h1', 0.5, 'priv-b-c1');
SELECT status, released FROM billing_release('priv-b', 'priv-b-h1', 'priv-b-r1');
SELECT billing_cost('priv-model', 1000, 1000) AS cost;
SELECT kind, amount, balance_after
  FROM billing_deduct_usage('priv-b', 'priv-model', 1000, 1000, 'priv-b-u1', api_key => 'priv-key');
SELECT state FROM billing_job_submit('priv-b', 'priv-kind', 'priv-j1', 1);
SELECT state, attempt FROM billing_job_claim('priv-worker', tenant_id => 'priv-b');
SELECT state, actual_cost FROM billing_job_complete('priv-b',
    (SELECT job_id FROM billing_job_submit('priv-b', 'priv-kind', 'priv-j1', 1)), 0.75);
-- ... but no money in, no settings, no tables (42501) ...
SELECT regress_error($$SELECT billing_credit('priv-a', 1000000, 'priv-mint')$$);
SELECT regress_error($$SELECT billing_credit('priv-a', 1, 'priv-mint-2', kind => 'adjustment')$$);
SELECT regress_error($$SELECT billing_account_update('priv-a', credit_limit => 1000000)$$);
SELECT regress_error($$SELECT billing_account_update('priv-a', status => 'closed')$$);
SELECT regress_error($$SELECT billing_account_create('priv-c', credit_limit => 1000000)$$);
SELECT regress_error($$SELECT billing_limits_set('priv-b')$$);
SELECT regress_error($$SELECT billing_api_key_create('priv-b', 'priv-key-2')$$);
SELECT regress_error($$SELECT billing_api_key_update('priv-b', 'priv-key', status => 'revoked')$$);
SELECT regress_error($$SELECT billing_price_set('priv-model', 0, 0)$$);
SELECT regress_error($$SELECT billing_price_override_set('priv-b', 'priv-model', 0, 0)$$);
SELECT regress_error($$SELECT billing_price_override_end('priv-a', 'priv-model')$$);
SELECT regress_error($$SELECT billing_scope_role('regress_billing_report', ARRAY['priv-a'])$$);
SELECT regress_error($$SELECT * FROM billing_verify()$$);
SELECT regress_error($$SELECT count(*) FROM billing.entries$$);
SELECT regress_error($$INSERT INTO billing.entries (tenant_id, trace_id, kind, amount_micros,
        balance_after_micros, version) VALUES ('priv-a', 'forged', 'topup', 1, 1, 99)$$);
SELECT regress_error($$UPDATE billing.accounts SET balance_micros = 1000000000$$);
SELECT regress_error($$SELECT count(*) FROM billing.balances$$);
SELECT regress_error($$SELECT nextval('billing.entry_id_seq')$$);
SELECT regress_error($$SELECT billing.lock_account('priv-a')$$);
SELECT regress_error($$SELECT billing_grant_treasury('regress_billing_charging')$$);
SELECT regress_error($$CREATE TABLE billing.mine (x int)$$);
-- ... and a reused trace id of another tenant's charge names the fields that
-- differ without showing that charge's description or metadata
SELECT regress_error($$SELECT billing_deduct('priv-a', 3, 'priv-a-2', description => 'probe',
                                             metadata => '{"probe": 1}')$$);
-- the pure helpers are public (NULL stays NULL)
SELECT billing.to_amount(1500000), billing.to_micros(1.5),
       billing.to_micros(NULL) IS NULL AS null_to_micros;
RESET ROLE;

-- Who asked is recorded: the role after SET ROLE, not the owner the
-- SECURITY DEFINER functions run as.
SELECT trace_id, kind, amount, actor FROM billing.ledger
 WHERE tenant_id IN ('priv-a', 'priv-b') ORDER BY entry_id;
SELECT tenant_id, action, changes, reason, changed_by FROM billing.account_events
 WHERE tenant_id IN ('priv-a', 'priv-b') ORDER BY event_id;

--
-- The reporting role: the views, nothing else ...
--
SET ROLE regress_billing_report;
SELECT tenant_id, balance, credit_limit, available, version FROM billing.balances
 WHERE tenant_id LIKE 'priv-%' ORDER BY 1;
SELECT trace_id, kind, amount, balance_after FROM billing.ledger
 WHERE tenant_id = 'priv-a' ORDER BY version;
SELECT charges, spent, credits, credited FROM billing.usage_daily WHERE tenant_id = 'priv-a';
SELECT charges, spent FROM billing.usage_by_api_key WHERE tenant_id = 'priv-b' ORDER BY 1;
SELECT requests_today, daily_request_quota FROM billing.quota_usage WHERE tenant_id = 'priv-b';
SELECT key_id, status, budget, spent FROM billing.api_key_budgets WHERE tenant_id = 'priv-b';
SELECT model, input_per_1m FROM billing.price_list WHERE model = 'priv-model';
SELECT tenant_id, model, input_per_1m FROM billing.price_override_list WHERE model = 'priv-model';
SELECT regress_error($$SELECT billing_deduct('priv-a', 1, 'priv-r-1')$$);
SELECT regress_error($$SELECT billing_credit('priv-a', 1, 'priv-r-1')$$);
SELECT regress_error($$SELECT billing_balance('priv-a')$$);
SELECT regress_error($$SELECT count(*) FROM billing.entries$$);
SELECT regress_error($$SELECT count(*) FROM billing.tenant_scopes$$);
-- (a DELETE on a view fails as not updatable before any privilege check:
-- ask for the privilege instead)
SELECT has_table_privilege('billing.balances', 'DELETE') AS may_delete_balances,
       has_table_privilege('billing.entries', 'DELETE') AS may_delete_entries;
RESET ROLE;

-- ... and a reporting role scoped to one tenant sees that tenant only, in
-- every view, whatever its query asks.
SET ROLE regress_billing_admin;
SELECT role_name, tenant_id FROM billing_scope_role('regress_billing_report_a', ARRAY['priv-b']);
SELECT regress_error($$SELECT billing_scope_role('regress_billing_report_a', ARRAY[]::text[])$$);
RESET ROLE;
SET ROLE regress_billing_report_a;
SELECT tenant_id, balance FROM billing.balances ORDER BY 1;
SELECT DISTINCT tenant_id FROM billing.ledger;
SELECT count(*) FROM billing.ledger WHERE tenant_id = 'priv-a';
SELECT DISTINCT tenant_id FROM billing.usage_daily;
SELECT DISTINCT tenant_id FROM billing.api_key_budgets;
SELECT DISTINCT tenant_id FROM billing.jobs_by_state;
SELECT count(*) AS overrides_of_others FROM billing.price_override_list;
SELECT DISTINCT tenant_id FROM billing.usage_by_token_type;
-- a function of its own that leaks what it is shown sees the visible rows
-- only: the views are security barriers
CREATE FUNCTION pg_temp.leak(t text) RETURNS boolean
    LANGUAGE plpgsql COST 0.0000001
AS $$ BEGIN RAISE NOTICE 'saw %', t; RETURN true; END $$;
SELECT count(*) FROM billing.balances WHERE pg_temp.leak(tenant_id) AND tenant_id LIKE 'priv-%';
-- nor through the two functions it is granted, which take an account row it
-- can make up: they read the holds with the caller's rights (42501)
SELECT regress_error($$SELECT billing.effective_holds(jsonb_populate_record(NULL::billing.accounts,
    '{"tenant_id": "priv-a", "holds_next_expiry": "2000-01-01T00:00:00Z"}'))$$);
SELECT regress_error($$SELECT billing.expired_micros(jsonb_populate_record(NULL::billing.accounts,
    '{"tenant_id": "priv-a", "grants_state": [], "holds_next_expiry": "2000-01-01T00:00:00Z"}'), now())$$);
RESET ROLE;
SET ROLE regress_billing_admin;
SELECT billing_unscope_role('regress_billing_report_a');
RESET ROLE;
SET ROLE regress_billing_report_a;
SELECT count(DISTINCT tenant_id) AS tenants FROM billing.balances WHERE tenant_id LIKE 'priv-%';
RESET ROLE;

-- A scope cannot be left by SET ROLE: the role the session logged in as
-- (session_user) counts as well as the role that asks.  A scoped login that
-- is a member of an unscoped reporting role still sees its own tenant only
-- after SET ROLE to it, and may not read the metrics (sums over every
-- tenant: 42501) ...
SET ROLE regress_billing_admin;
SELECT role_name, tenant_id FROM billing_scope_role('regress_billing_report_a', ARRAY['priv-b']);
RESET ROLE;
GRANT regress_billing_report TO regress_billing_report_a;
SET SESSION AUTHORIZATION regress_billing_report_a;
SET ROLE regress_billing_report;
SELECT session_user, current_user;
SELECT DISTINCT tenant_id FROM billing.balances WHERE tenant_id LIKE 'priv-%';
SELECT DISTINCT tenant_id FROM billing.ledger WHERE tenant_id LIKE 'priv-%';
SELECT regress_error($$SELECT billing_metrics()$$);
SELECT regress_error($$SELECT count(*) FROM billing.metrics$$);
-- (billing.sync_status hides last_error from a scoped session: checked in
-- t/050_redis_sync, where the worker has an error to hide)
RESET ROLE;
-- ... nor as itself
SELECT regress_error($$SELECT count(*) FROM billing.metrics$$);
RESET SESSION AUTHORIZATION;
-- With scopes on both roles, the session sees the tenants common to both;
-- with none in common, none.
SET ROLE regress_billing_admin;
SELECT count(*) FROM billing_scope_role('regress_billing_report', ARRAY['priv-a', 'priv-b']);
RESET ROLE;
SET SESSION AUTHORIZATION regress_billing_report_a;
SET ROLE regress_billing_report;
SELECT DISTINCT tenant_id FROM billing.balances WHERE tenant_id LIKE 'priv-%';
RESET ROLE;
RESET SESSION AUTHORIZATION;
SET ROLE regress_billing_admin;
SELECT count(*) FROM billing_scope_role('regress_billing_report', ARRAY['priv-a']);
RESET ROLE;
SET SESSION AUTHORIZATION regress_billing_report_a;
SET ROLE regress_billing_report;
SELECT count(*) AS visible FROM billing.balances;
SELECT regress_error($$SELECT billing_metrics()$$);
RESET ROLE;
RESET SESSION AUTHORIZATION;
-- An unscoped session that sets a scoped role is scoped (as above); one
-- whose roles are both unscoped sees every tenant and reads the metrics.
SET ROLE regress_billing_admin;
SELECT billing_unscope_role('regress_billing_report');
SELECT billing_unscope_role('regress_billing_report_a');
RESET ROLE;
SET SESSION AUTHORIZATION regress_billing_report_a;
SET ROLE regress_billing_report;
SELECT count(DISTINCT tenant_id) AS tenants FROM billing.balances WHERE tenant_id LIKE 'priv-%';
SELECT count(*) > 0 AS metrics_read FROM billing.metrics;
RESET ROLE;
RESET SESSION AUTHORIZATION;
REVOKE regress_billing_report FROM regress_billing_report_a;
-- Nor can any role but a superuser turn on the announcements of events
-- (NOTIFY billing_events names the tenant, and anyone who can connect may
-- LISTEN): billing.events_notify is a superuser's setting.
SET ROLE regress_billing_admin;
SELECT regress_error($$SET billing.events_notify = on$$);
RESET ROLE;

--
-- A role without grants can call nothing and read nothing; revoking takes
-- everything back.
--
SELECT billing_revoke_all('regress_billing_charging');
SET ROLE regress_billing_charging;
SELECT regress_error($$SELECT billing_deduct('priv-a', 1, 'priv-n-1')$$);
SELECT regress_error($$SELECT billing_balance('priv-a')$$);
RESET ROLE;
SET ROLE regress_billing_nobody;
SELECT regress_error($$SELECT billing_account_create('priv-n')$$);
SELECT regress_error($$SELECT billing_credit('priv-a', 1, 'priv-n-1')$$);
SELECT regress_error($$SELECT billing_deduct('priv-a', 1, 'priv-n-1')$$);
SELECT regress_error($$SELECT billing_hold('priv-b', 1, 'priv-n-2')$$);
SELECT regress_error($$SELECT billing_job_claim('w')$$);
SELECT regress_error($$SELECT * FROM billing_verify()$$);
SELECT regress_error($$SELECT count(*) FROM billing.balances$$);
SELECT regress_error($$SELECT count(*) FROM billing.entries$$);
RESET ROLE;

--
-- A hostile search_path.  A role with every API right owns a schema with
-- its own now(), to_amount() and text = operator, and puts it in front of
-- pg_catalog.  Its own queries now see the fakes, but the API does not:
-- amounts, balances, time-zone checks, idempotency and conflicts behave
-- exactly as before.
--
SELECT billing_grant_charging('regress_billing_app');
SELECT billing_grant_treasury('regress_billing_app');
SELECT billing_grant_admin('regress_billing_app');
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
SELECT trace_id, kind, amount, balance_after, version, actor FROM billing.ledger
 WHERE tenant_id = 'priv-h' ORDER BY version;
SELECT * FROM billing_verify('priv-h');

-- Every SECURITY DEFINER function pins its search_path (pg_catalog, then
-- pg_temp, which PostgreSQL never searches for functions or operators).
SELECT p.oid::regprocedure AS unpinned_security_definer
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
 WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'billing')
   AND p.prosecdef
   AND coalesce(p.proconfig, '{}') <> ARRAY['search_path=pg_catalog, pg_temp'];

-- Clean up: the roles and their objects go, the ledger stays.
DROP SCHEMA regress_hostile CASCADE;
DROP OWNED BY regress_billing_charging, regress_billing_treasury, regress_billing_admin,
              regress_billing_report, regress_billing_report_a, regress_billing_app,
              regress_billing_nobody;
DROP ROLE regress_billing_charging;
DROP ROLE regress_billing_treasury;
DROP ROLE regress_billing_admin;
DROP ROLE regress_billing_report;
DROP ROLE regress_billing_report_a;
DROP ROLE regress_billing_app;
DROP ROLE regress_billing_nobody;
SELECT tenant_id, balance FROM billing.balances WHERE tenant_id LIKE 'priv-%' ORDER BY 1;

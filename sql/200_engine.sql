--
-- 200_engine: billing_charge(), the charge engine.  The same arguments,
-- rules and result as billing_deduct, but the charge is applied and
-- committed by an engine worker (batched with other callers' charges)
-- before billing_charge returns.  Needs billing in shared_preload_libraries
-- (test/check.conf): make installcheck skips this file.  The batching of
-- concurrent callers is tested by test/isolation/specs/engine_*.spec, the
-- engine's crashes by test/t/095_engine_fault.pl.  Tenants start with "eng-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT tenant_id FROM billing_account_create('eng-a');
SELECT balance_after FROM billing_credit('eng-a', 10, 'eng-a-top');

-- a charge: billing_deduct's result, committed by the engine
SELECT entry_id AS first_id FROM billing.entries WHERE trace_id = 'eng-a-top' \gset
SELECT entry_id - :first_id AS entry_no, tenant_id, trace_id, kind, amount, balance_after,
       version, replayed
  FROM billing_charge('eng-a', 1.25, 'eng-a-1', description => 'chat', metadata => '{"model": "m1"}');

-- a replay returns the original (replayed = true), whatever changed since
SELECT balance_after FROM billing_credit('eng-a', 5, 'eng-a-top2');
SELECT entry_id - :first_id AS entry_no, amount, balance_after, version, replayed
  FROM billing_charge('eng-a', 1.25, 'eng-a-1', description => 'chat', metadata => '{"model": "m1"}');
-- and billing_deduct sees the same ledger: a billing_charge's trace id
-- replays there, and the other way round
SELECT entry_id - :first_id AS entry_no, replayed
  FROM billing_deduct('eng-a', 1.25, 'eng-a-1', description => 'chat', metadata => '{"model": "m1"}');
SELECT entry_id - :first_id AS entry_no, replayed FROM billing_deduct('eng-a', 0.5, 'eng-a-2');
SELECT entry_id - :first_id AS entry_no, replayed FROM billing_charge('eng-a', 0.5, 'eng-a-2');

-- the caller's errors, raised by billing_charge as billing_deduct raises them:
-- a trace id conflict (ZB005) naming the fields
SELECT regress_error($$SELECT billing_charge('eng-a', 1.5, 'eng-a-1', description => 'chat', metadata => '{"model": "m1"}')$$);
SELECT regress_error($$SELECT billing_charge('eng-a', 1.25, 'eng-a-1')$$);
-- insufficient funds (ZB004) with the numbers, and nothing recorded
SELECT regress_error($$SELECT billing_charge('eng-a', 100, 'eng-a-3')$$);
SELECT count(*) AS recorded FROM billing.rejections WHERE tenant_id = 'eng-a';
-- an unknown tenant (ZB001), an unknown API key (ZB050)
SELECT regress_error($$SELECT billing_charge('eng-nobody', 1, 'eng-x-1')$$);
SELECT regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-4', api_key => 'no-such-key')$$);
-- arguments are checked by the caller, before anything is queued
SELECT regress_error($$SELECT billing_charge('eng-a', NULL, 'eng-a-5')$$);
SELECT regress_error($$SELECT billing_charge('eng-a', 0.0000001, 'eng-a-5')$$);
SELECT regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-5', kind => 'topup')$$);
SELECT regress_error($$SELECT billing_charge('eng-a', 1, E'eng-a-\n5')$$);
SELECT regress_error($$SELECT billing_charge('eng-a', 1, 'billing:own')$$);
-- the key that marks priced usage (billing_deduct_usage's only), refused
-- by the engine, unless a replay of a charge that has it (1.3's
-- billing_deduct let it through; billing.internal_deduct writes it here)
SELECT regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-5', metadata => '{"price_effective_from": "2020-01-01"}')$$);
SELECT tenant_id FROM billing_account_create('eng-mk');
SELECT balance_after FROM billing_credit('eng-mk', 1, 'eng-mk-top');
SELECT amount FROM billing.internal_deduct('eng-mk', 0.01, 'eng-mk-13', metadata => '{"price_effective_from": "1.3"}');
SELECT amount, replayed FROM billing_charge('eng-mk', 0.01, 'eng-mk-13', metadata => '{"price_effective_from": "1.3"}');
-- an event time outside billing.event_at_window (ZB019), unless a replay
SELECT split_part(regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-6', event_at => now() - interval '30 days')$$), E'\n', 1);
-- (a superuser's session may widen it: the engine honours the caller's window)
SET billing.event_at_window = '40d';
SELECT amount FROM billing_charge('eng-a', 0.01, 'eng-a-6', event_at => now() - interval '30 days');
RESET billing.event_at_window;
SELECT replayed FROM billing_charge('eng-a', 0.01, 'eng-a-6', event_at => (SELECT event_at FROM billing.entries WHERE trace_id = 'eng-a-6'));
-- ... or narrow it (ZB019 as billing_deduct would raise it, naming that window),
-- while the replay of a charge made in a wider window still replays
SET billing.event_at_window = '1h';
SELECT split_part(regress_error($$SELECT billing_charge('eng-a', 0.01, 'eng-a-6b', event_at => now() - interval '2 days')$$), E'\n', 1);
SELECT regress_error($$SELECT billing_charge('eng-a', 0.01, 'eng-a-6b', event_at => now() - interval '2 days')$$) ~ 'billing.event_at_window = 3600 s' AS names_the_callers_window;
SELECT replayed FROM billing_charge('eng-a', 0.01, 'eng-a-6', event_at => (SELECT event_at FROM billing.entries WHERE trace_id = 'eng-a-6'));
RESET billing.event_at_window;

-- kind 'adjustment' as with billing_deduct
SELECT kind, amount, balance_after FROM billing_charge('eng-a', 0.25, 'eng-a-7', kind => 'adjustment');

-- refused inside a transaction block (ZB110): the charge would commit on its
-- own, not with the transaction; nothing is charged
BEGIN;
SELECT regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-8')$$);
ROLLBACK;
BEGIN;
SELECT billing_charge('eng-a', 1, 'eng-a-8');
ROLLBACK;
BEGIN;
SAVEPOINT s1;
SELECT regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-8')$$);
ROLLBACK;
-- the transaction COMMIT AND CHAIN (or ROLLBACK AND CHAIN) starts is a block
-- too, with a savepoint or without
BEGIN;
COMMIT AND CHAIN;
SELECT regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-8')$$);
SAVEPOINT s1;
SELECT regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-8')$$);
ROLLBACK AND CHAIN;
SAVEPOINT s1;
SELECT regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-8')$$);
ROLLBACK;
-- several statements in one query string are one transaction block, also
-- for a function with an EXCEPTION clause (regress_error) in a later one
SELECT 1 AS first \; SELECT regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-8')$$);
SELECT 1 AS first \; DO $$BEGIN PERFORM billing_charge('eng-a', 1, 'eng-a-8'); EXCEPTION WHEN sqlstate 'ZB110' THEN RAISE NOTICE 'ZB110 in a DO block'; END$$;
-- a function the planner runs (here for an estimate: STABLE), before the
-- statement's executor starts, in the transaction COMMIT AND CHAIN started
CREATE FUNCTION eng_planned_charge() RETURNS int LANGUAGE plpgsql STABLE AS $f$
BEGIN
    PERFORM billing_charge('eng-a', 1, 'eng-a-planned');
    RETURN 1;
EXCEPTION WHEN sqlstate 'ZB110' THEN
    RAISE NOTICE 'ZB110 while the query was planned';
    RETURN 1;
END $f$;
CREATE TABLE eng_planned (x int);
BEGIN;
COMMIT AND CHAIN;
SELECT count(*) FROM eng_planned WHERE x = eng_planned_charge();
ROLLBACK;
SELECT count(*) AS charged FROM billing.entries WHERE trace_id = 'eng-a-planned';
DROP TABLE eng_planned;
DROP FUNCTION eng_planned_charge();
-- a block that failed ends at its ROLLBACK (or COMMIT) without a commit or
-- an abort: the next autocommit call is in no block
SELECT tenant_id FROM billing_account_create('eng-f');
SELECT balance_after FROM billing_credit('eng-f', 10, 'eng-f-top-up');
BEGIN;
SELECT 1/0;
ROLLBACK;
SELECT amount, balance_after FROM billing_charge('eng-f', 1, 'eng-f-1');
BEGIN;
SAVEPOINT s1;
SELECT 1/0;
COMMIT;
SELECT amount, balance_after FROM billing_charge('eng-f', 1, 'eng-f-2');
-- a PL/pgSQL block with an EXCEPTION clause in an autocommit statement is
-- not a transaction block: regress_error() itself is one
-- and in a transaction that has written: the engine could wait for its locks
SELECT regress_error($$SELECT billing_deduct('eng-a', 1, 'eng-a-8'), billing_charge('eng-a', 1, 'eng-a-9')$$);
SELECT count(*) AS charged FROM billing.entries WHERE trace_id IN ('eng-a-8', 'eng-a-9');
-- a read-only transaction: 25006
SET default_transaction_read_only = on;
SELECT regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-8')$$);
RESET default_transaction_read_only;

-- several charges in one statement: each is committed on its own
SELECT count(*) AS charges, sum(c.amount) AS total
  FROM generate_series(1, 5) g, billing_charge('eng-a', 0.1, 'eng-a-many-' || g) c;
SELECT balance, version FROM billing.balances WHERE tenant_id = 'eng-a';

-- limits at the exact edge: a quota of 3 requests a day, a spending cap
SELECT tenant_id FROM billing_account_create('eng-q');
SELECT balance_after FROM billing_credit('eng-q', 100, 'eng-q-top');
SELECT count(*) FROM billing_limits_set('eng-q', daily_requests => 3, daily_spend => 2.5);
SELECT balance_after FROM billing_charge('eng-q', 1, 'eng-q-1');
SELECT balance_after FROM billing_charge('eng-q', 1.5, 'eng-q-2');
\set VERBOSITY terse
-- the cap: 2.5 spent, 0.000001 more is refused
SELECT regress_error($$SELECT billing_charge('eng-q', 0.000001, 'eng-q-3')$$);
SELECT count(*) FROM billing_limits_set('eng-q', daily_requests => 3, daily_spend => 10);
SELECT balance_after FROM billing_charge('eng-q', 1, 'eng-q-4');
-- the quota: the fourth request of the day
SELECT regress_error($$SELECT billing_charge('eng-q', 1, 'eng-q-5')$$);
\set VERBOSITY default

-- an API key's budget, and grants drawn in burn order with the draws recorded
SELECT tenant_id FROM billing_account_create('eng-k');
SELECT balance_after FROM billing_credit('eng-k', 10, 'eng-k-top');
SELECT key_id FROM billing_api_key_create('eng-k', 'k1', budget => 2, budget_period => 'month');
SELECT amount FROM billing_grant('eng-k', 1, 'eng-k-promo', priority => 10);
SELECT balance_after FROM billing_charge('eng-k', 1.5, 'eng-k-1', api_key => 'k1');
-- the promotional grant (priority 10) first: 1.0 of it, the rest (0.5) from the wallet
SELECT cardinality(draws) AS draws, draws[2] AS from_grant_micros FROM billing.entries WHERE tenant_id = 'eng-k' AND trace_id = 'eng-k-1';
SELECT regress_error($$SELECT billing_charge('eng-k', 0.6, 'eng-k-2', api_key => 'k1')$$);
SELECT balance_after FROM billing_charge('eng-k', 0.5, 'eng-k-3', api_key => 'k1');
SELECT spent, remaining FROM billing.api_key_budgets WHERE tenant_id = 'eng-k';

-- entries name the role that asked, not the engine's
CREATE ROLE eng_app;
SELECT billing_grant_charging('eng_app');
SET ROLE eng_app;
SELECT balance_after FROM billing_charge('eng-a', 0.1, 'eng-a-role');
RESET ROLE;
SELECT actor FROM billing.entries WHERE trace_id = 'eng-a-role';
-- a role without the charging rights may not call it
CREATE ROLE eng_other;
SET ROLE eng_other;
SELECT regress_error($$SELECT billing_charge('eng-a', 0.1, 'eng-a-role2')$$);
RESET ROLE;
SELECT billing_revoke_all('eng_app');
DROP ROLE eng_app;
DROP ROLE eng_other;

-- events (issue 17): a billing_charge announces the thresholds it crosses
-- as billing_deduct does.  eng-ev-d is charged by billing_deduct, eng-ev-c
-- by billing_charge, the same charges: the same events, payloads and seqs
-- (balance.low once per crossing, quota.threshold per percentage, per key).
-- One batch of several charges: test/isolation/specs/engine_events.spec.
SELECT count(*) FROM billing_account_create('eng-ev-d');
SELECT count(*) FROM billing_account_create('eng-ev-c');
SELECT count(*) FROM unnest('{eng-ev-d,eng-ev-c}'::text[]) t, LATERAL billing_credit(t, 10, t || '-top') r;
SELECT count(*) FROM unnest('{eng-ev-d,eng-ev-c}'::text[]) t, LATERAL billing_alerts_set(t, low_balance => 5, quota_percents => '{50, 100}') r;
SELECT count(*) FROM unnest('{eng-ev-d,eng-ev-c}'::text[]) t, LATERAL billing_limits_set(t, daily_requests => 4) r;
SELECT count(*) FROM unnest('{eng-ev-d,eng-ev-c}'::text[]) t, LATERAL billing_api_key_create(t, 'k', budget => 4, budget_period => 'month') r;
-- 3 of the key's 4 (its 50 %); 1 of 4 requests
SELECT balance_after FROM billing_deduct('eng-ev-d', 3, 'ev-1', api_key => 'k');
SELECT balance_after FROM billing_charge('eng-ev-c', 3, 'ev-1', api_key => 'k');
-- below 5: balance.low; 2 of 4 requests (50 %)
SELECT balance_after FROM billing_deduct('eng-ev-d', 3, 'ev-2');
SELECT balance_after FROM billing_charge('eng-ev-c', 3, 'ev-2');
-- still below: no second balance.low; the key's 100 %
SELECT balance_after FROM billing_deduct('eng-ev-d', 1, 'ev-3', api_key => 'k');
SELECT balance_after FROM billing_charge('eng-ev-c', 1, 'ev-3', api_key => 'k');
-- a refusal writes no event
SELECT regress_error($$SELECT billing_deduct('eng-ev-d', 5, 'ev-4')$$);
SELECT regress_error($$SELECT billing_charge('eng-ev-c', 5, 'ev-4')$$);
-- a top-up re-arms balance.low; the next crossing is announced again, and
-- the 4th request of 4 is the quota's 100 %
SELECT balance_after FROM billing_credit('eng-ev-d', 10, 'ev-top2');
SELECT balance_after FROM billing_credit('eng-ev-c', 10, 'ev-top2');
SELECT balance_after FROM billing_deduct('eng-ev-d', 9, 'ev-5');
SELECT balance_after FROM billing_charge('eng-ev-c', 9, 'ev-5');
SELECT seq, type, payload->>'quota' AS quota, payload->>'api_key' AS api_key,
       payload->>'percent' AS percent, payload->>'used' AS used, payload->>'balance' AS balance
  FROM billing.events WHERE tenant_id = 'eng-ev-c' ORDER BY seq;
SELECT count(*) AS differences
  FROM (SELECT seq, type, payload FROM billing.events WHERE tenant_id = 'eng-ev-c') c
  FULL JOIN (SELECT seq, type, payload FROM billing.events WHERE tenant_id = 'eng-ev-d') d USING (seq)
 WHERE c.type IS DISTINCT FROM d.type OR c.payload IS DISTINCT FROM d.payload;
SELECT tenant_id, low_balance_announced, daily_requests_announced, last_event_seq
  FROM billing.alerts WHERE tenant_id LIKE 'eng-ev-%' ORDER BY tenant_id;

-- billing_metrics() counts the engine's charges (committed by the engine
-- worker) and its refusals (raised in the caller) as billing_deduct's: by
-- entry kind and by SQLSTATE; an unknown account or a trace id conflict is
-- no refusal, as with billing_deduct
SELECT count(*) FROM billing_account_create('eng-m');
SELECT balance_after FROM billing_credit('eng-m', 10, 'eng-m-top');
SELECT key_id FROM billing_api_key_create('eng-m', 'k', budget => 1, budget_period => 'month');
CREATE TEMP TABLE eng_m AS
SELECT name, labels, value FROM billing.metrics
 WHERE name IN ('billing_charges_total', 'billing_entries_total', 'billing_charge_refusals_total');
SELECT balance_after FROM billing_charge('eng-m', 0.5, 'ev-m1');
SELECT balance_after FROM billing_charge('eng-m', 0.5, 'ev-m2');
SELECT replayed FROM billing_charge('eng-m', 0.5, 'ev-m2');
SELECT regress_error($$SELECT billing_charge('eng-m', 100, 'ev-m3')$$);
SELECT regress_error($$SELECT billing_charge('eng-m', 2, 'ev-m3', api_key => 'k')$$);
SELECT regress_error($$SELECT billing_charge('eng-nobody', 1, 'ev-m4')$$);
SELECT regress_error($$SELECT billing_charge('eng-m', 0.6, 'ev-m2')$$);
SELECT m.name, m.labels, m.value - coalesce(b.value, 0) AS counted
  FROM billing.metrics m LEFT JOIN eng_m b USING (name, labels)
 WHERE m.name IN ('billing_charges_total', 'billing_entries_total', 'billing_charge_refusals_total')
   AND m.value - coalesce(b.value, 0) <> 0
   AND coalesce(m.labels->>'kind', 'deduct') = 'deduct'  -- not the worker's expiries
 ORDER BY 1, 2::text;
DROP TABLE eng_m;

-- the ledger is consistent, and the engine worker of this database ran
SELECT * FROM billing_verify();
SELECT worker, state, queued, batches > 0 AS batched, charges > 0 AS charged
  FROM billing_engine_status() WHERE database = current_database();

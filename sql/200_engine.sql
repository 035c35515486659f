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
-- an event time outside billing.event_at_window (ZB019), unless a replay
SELECT split_part(regress_error($$SELECT billing_charge('eng-a', 1, 'eng-a-6', event_at => now() - interval '30 days')$$), E'\n', 1);
-- (a superuser's session may widen it: the engine honours the caller's window)
SET billing.event_at_window = '40d';
SELECT amount FROM billing_charge('eng-a', 0.01, 'eng-a-6', event_at => now() - interval '30 days');
RESET billing.event_at_window;
SELECT replayed FROM billing_charge('eng-a', 0.01, 'eng-a-6', event_at => (SELECT event_at FROM billing.entries WHERE trace_id = 'eng-a-6'));

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

-- the ledger is consistent, and the engine worker of this database ran
SELECT * FROM billing_verify();
SELECT worker, state, queued, batches > 0 AS batched, charges > 0 AS charged
  FROM billing_engine_status() WHERE database = current_database();

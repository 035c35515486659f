--
-- 050_append_only: history is never rewritten.  billing.entries,
-- billing.rejections and billing.account_events refuse UPDATE, DELETE and
-- TRUNCATE (SQLSTATE ZB020), and accounts are never deleted, for every
-- role: this file runs as a superuser that owns the tables.  Tenants start
-- with "ao-".
--
-- Every attempt runs inside a transaction that is rolled back, so that a
-- broken guard cannot destroy the other files' data.
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT current_user = (SELECT tableowner FROM pg_tables
                        WHERE schemaname = 'billing' AND tablename = 'entries') AS table_owner,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser;

-- some history in every table
SELECT tenant_id FROM billing_account_create('ao-a');
SELECT balance_after FROM billing_credit('ao-a', 10, 'ao-a-1');
SELECT status, sqlstate FROM billing_try_deduct('ao-a', 50, 'ao-a-2');
SELECT credit_limit FROM billing_account_update('ao-a', credit_limit => 5, reason => 'trial');

CREATE FUNCTION pg_temp.history() RETURNS text
    LANGUAGE sql
AS $$
    SELECT format('accounts %s, entries %s, rejections %s, account_events %s, balance %s',
                  (SELECT count(*) FROM billing.accounts),
                  (SELECT count(*) FROM billing.entries),
                  (SELECT count(*) FROM billing.rejections),
                  (SELECT count(*) FROM billing.account_events),
                  (SELECT balance_micros FROM billing.accounts WHERE tenant_id = 'ao-a'))
$$;
SELECT pg_temp.history() AS history0 \gset

-- What a client sees.
BEGIN;
DELETE FROM billing.entries WHERE tenant_id = 'ao-a';
ROLLBACK;

-- UPDATE, DELETE (even one that matches no row) and TRUNCATE are refused
-- on the three ledger tables.
BEGIN;
SELECT regress_error($$UPDATE billing.entries SET description = 'rewritten' WHERE tenant_id = 'ao-a'$$);
SELECT regress_error($$UPDATE billing.entries SET amount_micros = amount_micros WHERE false$$);
SELECT regress_error($$DELETE FROM billing.entries WHERE tenant_id = 'ao-a'$$);
SELECT regress_error($$DELETE FROM billing.entries WHERE false$$);
SELECT regress_error($$TRUNCATE billing.entries$$);
SELECT regress_error($$UPDATE billing.rejections SET reason = 'rewritten'$$);
SELECT regress_error($$DELETE FROM billing.rejections WHERE false$$);
SELECT regress_error($$TRUNCATE billing.rejections$$);
SELECT regress_error($$UPDATE billing.account_events SET reason = 'rewritten'$$);
SELECT regress_error($$DELETE FROM billing.account_events WHERE false$$);
SELECT regress_error($$TRUNCATE billing.account_events$$);
SELECT pg_temp.history() = :'history0' AS unchanged;
ROLLBACK;

-- The other ways to change rows are refused too: a data-modifying CTE,
-- MERGE, INSERT ... ON CONFLICT DO UPDATE, TRUNCATE of several tables.
BEGIN;
SELECT regress_error($$WITH d AS (DELETE FROM billing.entries RETURNING 1) SELECT count(*) FROM d$$);
SELECT regress_error($$MERGE INTO billing.entries e
        USING (SELECT 'ao-a'::text AS tenant_id) s ON e.tenant_id = s.tenant_id
        WHEN MATCHED THEN UPDATE SET description = 'merged'$$);
SELECT regress_error($$MERGE INTO billing.entries e
        USING (SELECT 'ao-a'::text AS tenant_id) s ON e.tenant_id = s.tenant_id
        WHEN MATCHED THEN DELETE$$);
SELECT regress_error($$INSERT INTO billing.entries (tenant_id, trace_id, kind, amount_micros,
                                                   balance_after_micros, version)
        VALUES ('ao-a', 'ao-a-1', 'topup', 1, 1, 1)
        ON CONFLICT (tenant_id, trace_id) DO UPDATE SET amount_micros = 999000000$$);
SELECT regress_error($$TRUNCATE billing.accounts, billing.entries, billing.rejections,
        billing.account_events$$);
SELECT regress_error($$TRUNCATE billing.entries CASCADE$$);
SELECT pg_temp.history() = :'history0' AS unchanged;
ROLLBACK;

-- Accounts are updated by the API (balance, settings) but never deleted.
BEGIN;
SELECT regress_error($$DELETE FROM billing.accounts WHERE tenant_id = 'ao-a'$$);
SELECT regress_error($$DELETE FROM billing.accounts WHERE false$$);
SELECT regress_error($$TRUNCATE billing.accounts$$);
SELECT pg_temp.history() = :'history0' AS unchanged;
ROLLBACK;

-- The triggers are ENABLE ALWAYS: session_replication_role = replica (as
-- used by logical replication and some restore tools) does not skip them.
BEGIN;
SET LOCAL session_replication_role = replica;
SELECT regress_error($$UPDATE billing.entries SET description = 'rewritten'$$);
SELECT regress_error($$DELETE FROM billing.entries WHERE false$$);
SELECT regress_error($$TRUNCATE billing.entries$$);
SELECT regress_error($$DELETE FROM billing.rejections$$);
SELECT regress_error($$TRUNCATE billing.account_events$$);
SELECT regress_error($$DELETE FROM billing.accounts$$);
SELECT pg_temp.history() = :'history0' AS unchanged;
ROLLBACK;
SHOW session_replication_role;

--
-- What the guard does not cover (documented, not a promise of the API):
--
-- INSERT is what append-only allows, so the table owner can add rows
-- directly, bypassing the API.  The keys (one trace id per tenant) and
-- the NOT NULL columns still hold; kinds and amounts are checked by the
-- functions only (the hot tables carry no CHECK constraints, see the
-- install script), so a forged entry of an unknown kind or of amount 0 is
-- accepted.  The account's cached balance is not touched, and
-- billing_verify() reports the forged entries.
BEGIN;
SELECT regress_error($$INSERT INTO billing.entries (tenant_id, trace_id, kind, amount_micros,
                                                   balance_after_micros, version)
        VALUES ('ao-a', 'ao-a-1', 'topup', 1000000, 11000000, 3)$$);
-- (first line only: the detail shows the whole row, with its generated id and time)
SELECT split_part(regress_error($$INSERT INTO billing.entries (tenant_id, trace_id, kind,
                                  amount_micros, balance_after_micros, version)
        VALUES ('ao-a', 'ao-forged', NULL, 1000000, 11000000, 3)$$), E'\n', 1) AS error;
INSERT INTO billing.entries (tenant_id, trace_id, kind, amount_micros, balance_after_micros, version)
VALUES ('ao-a', 'ao-forged', 'bonus', 1000000, 11000000, 3);
INSERT INTO billing.entries (tenant_id, trace_id, kind, amount_micros, balance_after_micros, version)
VALUES ('ao-a', 'ao-forged-0', 'topup', 0, 11000000, 4);
SELECT billing_balance('ao-a') AS cached_balance;
SELECT tenant_id, cached_balance, ledger_sum, entries, chain_breaks, problem
  FROM billing_verify('ao-a');
ROLLBACK;

-- The owner can also update account rows directly (the API does), and
-- can switch a trigger off: both are owner powers that the ledger cannot
-- take away; billing_verify() is the check for them.
BEGIN;
UPDATE billing.accounts SET balance_micros = balance_micros + 1 WHERE tenant_id = 'ao-a';
SELECT tenant_id, cached_balance, ledger_sum, problem FROM billing_verify('ao-a');
ROLLBACK;
BEGIN;
ALTER TABLE billing.entries DISABLE TRIGGER entries_append_only;
DELETE FROM billing.entries WHERE tenant_id = 'ao-a';
SELECT count(*) AS entries_left FROM billing.entries WHERE tenant_id = 'ao-a';
ROLLBACK;
SELECT tgenabled FROM pg_trigger WHERE tgname = 'entries_append_only';

-- After all of this the history is intact and consistent.
SELECT pg_temp.history() = :'history0' AS unchanged;
SELECT trace_id, kind, amount_micros, description FROM billing.entries
 WHERE tenant_id = 'ao-a' ORDER BY version;
SELECT trace_id, sqlstate, reason FROM billing.rejections WHERE tenant_id = 'ao-a';
SELECT action, changes, reason FROM billing.account_events
 WHERE tenant_id = 'ao-a' ORDER BY event_id;
SELECT * FROM billing_verify('ao-a');

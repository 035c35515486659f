--
-- 170_two_phase: a transaction that changed a billing account can be
-- PREPAREd (two-phase commit: Citus prepares the transaction of every node
-- a distributed transaction wrote on).  Its marks for the Redis mirror wait
-- in shared memory under its transaction id and are pushed when the worker
-- sees it committed, dropped when it was rolled back (the Redis side is
-- tested in test/t/080_citus.pl).  Tenants start with "tp-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT tenant_id FROM billing_account_create('tp-a');
SELECT balance_after FROM billing_credit('tp-a', 10, 'tp-a-top');

-- a charge, PREPARE, COMMIT PREPARED: charged once
BEGIN;
SELECT balance_after FROM billing_deduct('tp-a', 1, 'tp-a-d1');
PREPARE TRANSACTION 'tp-1';
SELECT count(*) AS prepared FROM pg_prepared_xacts WHERE gid = 'tp-1';
COMMIT PREPARED 'tp-1';
SELECT billing_balance('tp-a');
SELECT count(*) AS entries FROM billing.entries WHERE trace_id = 'tp-a-d1';

-- a replay after the commit returns the entry
SELECT balance_after, replayed FROM billing_deduct('tp-a', 1, 'tp-a-d1');

-- PREPARE, ROLLBACK PREPARED: nothing happened
BEGIN;
SELECT tenant_id FROM billing_account_create('tp-b');
SELECT remaining FROM billing_hold('tp-a', 1, 'tp-a-h1');
PREPARE TRANSACTION 'tp-2';
ROLLBACK PREPARED 'tp-2';
SELECT count(*) AS accounts FROM billing.accounts WHERE tenant_id = 'tp-b';
SELECT count(*) AS holds FROM billing.holds WHERE trace_id = 'tp-a-h1';
SELECT billing_balance('tp-a');

-- a transaction that only read billing state can be prepared too
BEGIN;
SELECT billing_balance('tp-a');
PREPARE TRANSACTION 'tp-3';
COMMIT PREPARED 'tp-3';
SELECT * FROM billing_verify() WHERE tenant_id LIKE 'tp-%';

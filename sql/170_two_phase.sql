--
-- 170_two_phase: a transaction that changed a billing account cannot be
-- PREPAREd (two-phase commit).  The Redis mirror learns of a change when
-- the transaction that made it commits; COMMIT PREPARED runs later, maybe
-- in another session, and would bypass that, so the change would never
-- reach Redis.  Tenants start with "tp-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT tenant_id FROM billing_account_create('tp-a');
SELECT balance_after FROM billing_credit('tp-a', 10, 'tp-a-top');

-- a charge, then PREPARE: refused (0A000), and nothing was charged
BEGIN;
SELECT balance_after FROM billing_deduct('tp-a', 1, 'tp-a-d1');
PREPARE TRANSACTION 'tp-1';
\echo :LAST_ERROR_SQLSTATE
SELECT count(*) AS prepared FROM pg_prepared_xacts WHERE gid = 'tp-1';
SELECT billing_balance('tp-a');
SELECT count(*) AS entries FROM billing.entries WHERE trace_id = 'tp-a-d1';

-- the same for a new account and for a hold
BEGIN;
SELECT tenant_id FROM billing_account_create('tp-b');
PREPARE TRANSACTION 'tp-2';
\echo :LAST_ERROR_SQLSTATE
BEGIN;
SELECT remaining FROM billing_hold('tp-a', 1, 'tp-a-h1');
PREPARE TRANSACTION 'tp-3';
\echo :LAST_ERROR_SQLSTATE

-- a rolled-back savepoint still counts: the mark is the transaction's
BEGIN;
SAVEPOINT s;
SELECT balance_after FROM billing_deduct('tp-a', 1, 'tp-a-d2');
ROLLBACK TO SAVEPOINT s;
PREPARE TRANSACTION 'tp-4';
\echo :LAST_ERROR_SQLSTATE

-- a transaction that only read billing state can be prepared
BEGIN;
SELECT billing_balance('tp-a');
PREPARE TRANSACTION 'tp-5';
COMMIT PREPARED 'tp-5';

-- the same call outside two-phase commit works
SELECT balance_after FROM billing_deduct('tp-a', 1, 'tp-a-d1');

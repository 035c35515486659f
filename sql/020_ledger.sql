--
-- 020_ledger: credits and deductions, the cached balance, account status,
-- credit limits and balances in the past.  Tenants start with "led-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never
-- the event times below are fixed dates; charges accept event_at within
-- billing.event_at_window of now (default 7 days; see 045_bounds)
SET billing.event_at_window = '11000d';

SELECT tenant_id, balance FROM billing_account_create('led-a');

-- Every credit kind adds money; the result is the new entry, with the
-- signed amount, the balance after it and the account version.
SELECT tenant_id, trace_id, kind, amount, balance_after, version, replayed
  FROM billing_credit('led-a', 100, 'led-a-1');
SELECT tenant_id, trace_id, kind, amount, balance_after, version, replayed
  FROM billing_credit('led-a', 10.5, 'led-a-2', kind => 'grant', description => 'welcome bonus');
SELECT tenant_id, trace_id, kind, amount, balance_after, version, replayed
  FROM billing_credit('led-a', 0.25, 'led-a-3', kind => 'refund', metadata => '{"ticket": "T-1"}');
SELECT tenant_id, trace_id, kind, amount, balance_after, version, replayed
  FROM billing_credit('led-a', 0.000001, 'led-a-4', kind => 'adjustment');
SELECT billing_balance('led-a');

-- Every debit kind takes money away; amounts in the ledger are negative.
SELECT tenant_id, trace_id, kind, amount, balance_after, version, replayed
  FROM billing_deduct('led-a', 30, 'led-a-5');
SELECT tenant_id, trace_id, kind, amount, balance_after, version, replayed
  FROM billing_deduct('led-a', 0.750001, 'led-a-6', kind => 'adjustment');
SELECT billing_balance('led-a');

-- The entries as stored, in order: amount_micros signed, each
-- balance_after = previous balance_after + amount, versions 1, 2, 3, ...
SELECT trace_id, kind, amount_micros, balance_after_micros, version, description,
       metadata, event_at
  FROM billing.entries WHERE tenant_id = 'led-a' ORDER BY entry_id;
-- entry ids increase with the version; the result's entry_id is the stored one
SELECT count(*) = count(DISTINCT entry_id) AS distinct_ids,
       array_agg(version ORDER BY entry_id) AS versions_by_id
  FROM billing.entries WHERE tenant_id = 'led-a';
-- the account caches the balance, its version and the time of the last entry
SELECT balance, version, last_entry_at = (SELECT max(created_at) FROM billing.entries
                                           WHERE tenant_id = 'led-a') AS last_entry_at_ok
  FROM billing.balances WHERE tenant_id = 'led-a';

-- Amounts: trailing zeros beyond 6 decimals are fine (1.5000000 is 1.5),
-- exactly 6 decimals are fine, and the result always has scale 6.
SELECT amount, balance_after FROM billing_credit('led-a', 1.5000000, 'led-a-7');
SELECT amount, balance_after FROM billing_credit('led-a', 1.500000000000000000000, 'led-a-8');
SELECT amount, balance_after FROM billing_deduct('led-a', 2.123456, 'led-a-9');
SELECT amount, balance_after FROM billing_deduct('led-a', 1e-6, 'led-a-10');
SELECT amount, balance_after FROM billing_credit('led-a', '7E+1', 'led-a-11');
SELECT billing_balance('led-a'),
       (SELECT sum(amount_micros) FROM billing.entries WHERE tenant_id = 'led-a') AS ledger_sum_micros;

-- Account versions are shared by settings changes and entries: an update
-- of the account moves the version, and the next entry continues from it.
SELECT version FROM billing_account_update('led-a', metadata => '{"note": "x"}');
SELECT kind, amount, balance_after, version FROM billing_credit('led-a', 1, 'led-a-12');

--
-- Account status.  A suspended account can receive money but cannot be
-- charged (ZB002); a closed account accepts nothing (ZB003).
--
SELECT tenant_id, status FROM billing_account_create('led-s', status => 'suspended');
SELECT kind, amount, balance_after, version FROM billing_credit('led-s', 20, 'led-s-1');
SELECT kind, amount, balance_after FROM billing_credit('led-s', 1, 'led-s-2', kind => 'grant');
SELECT regress_error($$SELECT billing_deduct('led-s', 1, 'led-s-3')$$);
SELECT regress_error($$SELECT billing_deduct('led-s', 1, 'led-s-3', kind => 'adjustment')$$);
SELECT billing_balance('led-s');
-- reactivated, it can be charged again
SELECT status FROM billing_account_update('led-s', status => 'active', reason => 'paid');
SELECT kind, amount, balance_after FROM billing_deduct('led-s', 1, 'led-s-3');

SELECT status FROM billing_account_update('led-s', status => 'closed', reason => 'churned');
SELECT regress_error($$SELECT billing_credit('led-s', 1, 'led-s-4')$$);
SELECT regress_error($$SELECT billing_credit('led-s', 1, 'led-s-4', kind => 'refund')$$);
SELECT regress_error($$SELECT billing_deduct('led-s', 1, 'led-s-4')$$);
SELECT regress_error($$SELECT billing_deduct('led-s', 100, 'led-s-4')$$);
-- the closed account keeps its balance and history and can still be read
SELECT billing_balance('led-s');
SELECT count(*) AS entries FROM billing.entries WHERE tenant_id = 'led-s';

--
-- Credit limit: a charge may take the balance down to -credit_limit
-- exactly; one micro-unit more is refused (ZB004) with required and
-- available amounts in the detail.  Without a limit the floor is 0.
--
SELECT tenant_id, credit_limit, available
  FROM billing_account_create('led-c', credit_limit => 50);
SELECT amount, balance_after FROM billing_credit('led-c', 10, 'led-c-1');
SELECT regress_error($$SELECT billing_deduct('led-c', 60.000001, 'led-c-2')$$);
SELECT amount, balance_after FROM billing_deduct('led-c', 60, 'led-c-2');
SELECT balance, credit_limit, available FROM billing.balances WHERE tenant_id = 'led-c';
SELECT regress_error($$SELECT billing_deduct('led-c', 0.000001, 'led-c-3')$$);
-- lowering the limit below the current debt is allowed; charges stop
SELECT credit_limit, available
  FROM billing_account_update('led-c', credit_limit => 20, reason => 'risk review');
SELECT regress_error($$SELECT billing_deduct('led-c', 0.000001, 'led-c-3')$$);
-- a credit brings the balance back up, then charges fit again, down to
-- the new limit
SELECT amount, balance_after FROM billing_credit('led-c', 40, 'led-c-3');
SELECT amount, balance_after FROM billing_deduct('led-c', 10, 'led-c-4');
SELECT balance, credit_limit, available FROM billing.balances WHERE tenant_id = 'led-c';

SELECT tenant_id, credit_limit FROM billing_account_create('led-z');
SELECT regress_error($$SELECT billing_deduct('led-z', 0.000001, 'led-z-1')$$);
SELECT amount, balance_after FROM billing_credit('led-z', 5, 'led-z-1');
SELECT regress_error($$SELECT billing_deduct('led-z', 5.000001, 'led-z-2')$$);
SELECT amount, balance_after FROM billing_deduct('led-z', 5, 'led-z-2');
SELECT regress_error($$SELECT billing_deduct('led-z', 0.000001, 'led-z-3')$$);
-- refused charges left no entry
SELECT trace_id, amount, balance_after FROM billing.ledger
 WHERE tenant_id IN ('led-c', 'led-z') ORDER BY tenant_id, version;

--
-- billing_balance_at: the sum of the entries created up to a point in
-- time.  The points are taken with clock_timestamp() between statements.
--
SELECT tenant_id FROM billing_account_create('led-h');
SELECT clock_timestamp() AS t0 \gset
SELECT balance_after FROM billing_credit('led-h', 100, 'led-h-1');
SELECT clock_timestamp() AS t1 \gset
SELECT balance_after FROM billing_deduct('led-h', 30, 'led-h-2');
SELECT clock_timestamp() AS t2 \gset
SELECT balance_after FROM billing_credit('led-h', 5.5, 'led-h-3', kind => 'refund');
SELECT clock_timestamp() AS t3 \gset
SELECT billing_balance_at('led-h', :'t0') AS at_t0,
       billing_balance_at('led-h', :'t1') AS at_t1,
       billing_balance_at('led-h', :'t2') AS at_t2,
       billing_balance_at('led-h', :'t3') AS at_t3,
       billing_balance('led-h') AS now;
-- an entry counts from its created_at on (inclusive), not from event_at
SELECT billing_balance_at('led-h', created_at) AS at_first_entry
  FROM billing.entries WHERE tenant_id = 'led-h' AND trace_id = 'led-h-1';
SELECT billing_balance_at('led-h', created_at - interval '1 microsecond') AS just_before
  FROM billing.entries WHERE tenant_id = 'led-h' AND trace_id = 'led-h-1';
SELECT balance_after FROM billing_credit('led-h', 1, 'led-h-4', event_at => '2001-01-01 00:00:00+00');
SELECT billing_balance_at('led-h', '2001-01-02 00:00:00+00') AS at_2001,
       billing_balance_at('led-h', :'t3') AS at_t3,
       billing_balance('led-h') AS now;
-- before its first entry an account has balance 0
SELECT billing_balance_at('led-z', '2000-01-01 00:00:00+00') AS before_any_entry;

-- Entries written inside a transaction are all or nothing.
BEGIN;
SELECT balance_after FROM billing_credit('led-h', 1000, 'led-h-5');
SELECT balance_after FROM billing_deduct('led-h', 1, 'led-h-6');
SELECT billing_balance('led-h');
ROLLBACK;
SELECT billing_balance('led-h'),
       (SELECT count(*) FROM billing.entries WHERE tenant_id = 'led-h') AS entries;
-- and after the rollback the trace ids are unused: they charge normally
SELECT trace_id, amount, balance_after, replayed FROM billing_deduct('led-h', 1, 'led-h-6');

-- Tenants are separate ledgers.
SELECT tenant_id, balance, version FROM billing.balances
 WHERE tenant_id LIKE 'led-%' ORDER BY tenant_id;
SELECT tenant_id, count(*) AS entries, sum(amount_micros) AS sum_micros
  FROM billing.entries WHERE tenant_id LIKE 'led-%' GROUP BY tenant_id ORDER BY tenant_id;
SELECT * FROM billing_verify() WHERE tenant_id LIKE 'led-%';

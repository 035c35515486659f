--
-- 030_idempotency: a trace id identifies one request per tenant.  Sending
-- the same request again returns the original result (replayed = true) and
-- changes nothing; sending something different under the same trace id is
-- a conflict (ZB005).  billing_try_deduct records business rejections so
-- that their replays are rejected the same way.  Tenants start with "idem-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never
-- the event times below are fixed dates; charges accept event_at within
-- billing.event_at_window of now (default 7 days; see 045_bounds)
SET billing.event_at_window = '11000d';

SELECT tenant_id FROM billing_account_create('idem-a');
SELECT tenant_id FROM billing_account_create('idem-b');

-- The first request writes an entry.
SELECT entry_id AS credit_id, created_at AS credit_at
  FROM billing_credit('idem-a', 100, 'idem-1', 'monthly top-up',
                      '{"order": "o-1", "lines": [1, 2]}', '2024-05-01 10:00:00+00') \gset
SELECT kind, amount, balance_after, version FROM billing.ledger WHERE entry_id = :credit_id;
SELECT entry_id AS deduct_id
  FROM billing_deduct('idem-a', 30, 'idem-2', metadata => '{"model": "m1"}') \gset

-- Replays return the original entry: same id, amount, balance_after (the
-- balance right after the original, not the current one), version and
-- created_at, with replayed = true.  Equal values count as equal: amount
-- 100 = 100.000000, JSON key order and spacing, the same instant written in
-- another time zone.
SELECT entry_id = :credit_id AS same_entry, trace_id, kind, amount, balance_after, version,
       created_at = :'credit_at' AS same_created_at, replayed
  FROM billing_credit('idem-a', 100, 'idem-1', 'monthly top-up',
                      '{"order": "o-1", "lines": [1, 2]}', '2024-05-01 10:00:00+00');
SELECT entry_id = :credit_id AS same_entry, amount, balance_after, version, replayed
  FROM billing_credit('idem-a', 100.000000, 'idem-1', 'monthly top-up',
                      '{ "lines":[1,2],  "order":"o-1" }', '2024-05-01 12:00:00+02',
                      kind => 'topup');
SELECT entry_id = :deduct_id AS same_entry, kind, amount, balance_after, version, replayed
  FROM billing_deduct('idem-a', 30, 'idem-2', metadata => '{"model": "m1"}');
-- nothing changed: still two entries, balance 70, version 2
SELECT balance, version FROM billing.balances WHERE tenant_id = 'idem-a';
SELECT count(*) AS entries FROM billing.entries WHERE tenant_id = 'idem-a';

-- A different request under a used trace id is refused (ZB005), naming
-- each differing field with the original and the new value.  Ledger
-- amounts in the detail are signed.
SELECT regress_error($$SELECT billing_credit('idem-a', 100.000001, 'idem-1', 'monthly top-up',
        '{"order": "o-1", "lines": [1, 2]}', '2024-05-01 10:00:00+00')$$);
SELECT regress_error($$SELECT billing_credit('idem-a', 100, 'idem-1', 'monthly top-up',
        '{"order": "o-1", "lines": [1, 2]}', '2024-05-01 10:00:00+00', kind => 'grant')$$);
SELECT regress_error($$SELECT billing_credit('idem-a', 100, 'idem-1', 'Monthly top-up',
        '{"order": "o-1", "lines": [1, 2]}', '2024-05-01 10:00:00+00')$$);
SELECT regress_error($$SELECT billing_credit('idem-a', 100, 'idem-1', NULL,
        '{"order": "o-1", "lines": [1, 2]}', '2024-05-01 10:00:00+00')$$);
SELECT regress_error($$SELECT billing_credit('idem-a', 100, 'idem-1', 'monthly top-up',
        '{"order": "o-1", "lines": [2, 1]}', '2024-05-01 10:00:00+00')$$);
SELECT regress_error($$SELECT billing_credit('idem-a', 100, 'idem-1', 'monthly top-up',
        NULL, '2024-05-01 10:00:00+00')$$);
SELECT regress_error($$SELECT billing_credit('idem-a', 100, 'idem-1', 'monthly top-up',
        '{"order": "o-1", "lines": [1, 2]}', '2024-05-01 10:00:00.000001+00')$$);
SELECT regress_error($$SELECT billing_credit('idem-a', 100, 'idem-1', 'monthly top-up',
        '{"order": "o-1", "lines": [1, 2]}')$$);
-- several fields at once, in a fixed order
SELECT regress_error($$SELECT billing_credit('idem-a', 5, 'idem-1', kind => 'refund')$$);
SELECT regress_error($$SELECT billing_deduct('idem-a', 30, 'idem-2', 'late description',
        '{"model": "m2"}', '2024-01-01 00:00:00+00', 'adjustment')$$);
-- credit and deduct share the trace ids of a tenant: the same trace id and
-- amount as a credit is still a different request (kind, sign)
SELECT regress_error($$SELECT billing_deduct('idem-a', 100, 'idem-1', 'monthly top-up',
        '{"order": "o-1", "lines": [1, 2]}', '2024-05-01 10:00:00+00')$$);
SELECT regress_error($$SELECT billing_deduct('idem-a', 100, 'idem-1', 'monthly top-up',
        '{"order": "o-1", "lines": [1, 2]}', '2024-05-01 10:00:00+00', kind => 'adjustment')$$);
SELECT regress_error($$SELECT billing_credit('idem-a', 30, 'idem-2', metadata => '{"model": "m1"}')$$);
SELECT regress_error($$SELECT billing_credit('idem-a', 30, 'idem-2', metadata => '{"model": "m1"}',
        kind => 'adjustment')$$);
-- still nothing changed
SELECT balance, version FROM billing.balances WHERE tenant_id = 'idem-a';
SELECT count(*) AS entries FROM billing.entries WHERE tenant_id = 'idem-a';

-- Trace ids are scoped to a tenant: the same trace id in another tenant
-- is a new request, whatever it carries.
SELECT tenant_id, trace_id, kind, amount, balance_after, replayed, entry_id <> :credit_id AS new_entry
  FROM billing_credit('idem-b', 7, 'idem-1');
SELECT tenant_id, trace_id, kind, amount, balance_after, replayed
  FROM billing_deduct('idem-b', 2, 'idem-2');
SELECT tenant_id, balance FROM billing.balances WHERE tenant_id LIKE 'idem-_' ORDER BY 1;
-- trace ids are compared exactly (case and spaces matter)
SELECT quote_literal(trace_id) AS trace_id, amount, balance_after, replayed
  FROM billing_credit('idem-b', 1, 'IDEM-1');
SELECT quote_literal(trace_id) AS trace_id, amount, balance_after, replayed
  FROM billing_credit('idem-b', 1, 'idem-1 ');

-- A refused billing_deduct records nothing: the trace id stays unused and
-- can charge once money is there.
SELECT regress_error($$SELECT billing_deduct('idem-b', 50, 'idem-3')$$);
SELECT count(*) AS rejections FROM billing.rejections WHERE tenant_id = 'idem-b';
SELECT balance_after FROM billing_credit('idem-b', 100, 'idem-4');
SELECT kind, amount, balance_after, replayed FROM billing_deduct('idem-b', 50, 'idem-3');

--
-- billing_try_deduct: the outcome is a row, committed or rejected.
--
SELECT tenant_id, balance FROM billing_account_create('idem-t');
SELECT balance_after FROM billing_credit('idem-t', 10, 'idem-t-topup-1');

-- committed: like billing_deduct, with status and no error fields
SELECT status, replayed, tenant_id, trace_id, kind, amount, balance_after,
       sqlstate, reason, detail
  FROM billing_try_deduct('idem-t', 4, 'idem-t-1', metadata => '{"model": "m1"}');
SELECT entry_id AS try_id FROM billing.entries
 WHERE tenant_id = 'idem-t' AND trace_id = 'idem-t-1' \gset
-- replayed by either form, it returns the same entry
SELECT status, replayed, entry_id = :try_id AS same_entry, amount, balance_after, sqlstate
  FROM billing_try_deduct('idem-t', 4, 'idem-t-1', metadata => '{"model": "m1"}');
SELECT replayed, entry_id = :try_id AS same_entry, amount, balance_after
  FROM billing_deduct('idem-t', 4, 'idem-t-1', metadata => '{"model": "m1"}');
-- the try form also replays entries written by billing_deduct
SELECT balance_after FROM billing_deduct('idem-t', 1, 'idem-t-2');
SELECT status, replayed, amount, balance_after FROM billing_try_deduct('idem-t', 1, 'idem-t-2');
SELECT balance FROM billing.balances WHERE tenant_id = 'idem-t';

-- rejected: returned, not raised; no entry and no balance change, but the
-- rejection is recorded under its trace id
SELECT status, replayed, entry_id, tenant_id, trace_id, kind, amount, balance_after,
       sqlstate, reason, detail
  FROM billing_try_deduct('idem-t', 6, 'idem-t-3', 'big job', '{"model": "m2"}',
                          '2024-05-01 10:00:00+00');
SELECT balance, version FROM billing.balances WHERE tenant_id = 'idem-t';
SELECT count(*) AS entries FROM billing.entries WHERE tenant_id = 'idem-t';
SELECT trace_id, kind, amount_micros, description, metadata, event_at, sqlstate, reason, detail
  FROM billing.rejections WHERE tenant_id = 'idem-t' ORDER BY rejection_id;

-- The rejection is final for its trace id: after a top-up that would make
-- the charge fit, a replay is still rejected with the original reason and
-- detail; the raising form raises the same error.
SELECT balance_after FROM billing_credit('idem-t', 100, 'idem-t-topup-2');
SELECT status, replayed, entry_id, amount, balance_after, sqlstate, reason, detail
  FROM billing_try_deduct('idem-t', 6, 'idem-t-3', 'big job', '{"model": "m2"}',
                          '2024-05-01 10:00:00+00');
SELECT regress_error($$SELECT billing_deduct('idem-t', 6, 'idem-t-3', 'big job',
        '{"model": "m2"}', '2024-05-01 10:00:00+00')$$);
-- no second rejection row, no entry
SELECT count(*) AS rejections FROM billing.rejections WHERE tenant_id = 'idem-t';
SELECT count(*) AS entries, billing_balance('idem-t') AS balance
  FROM billing.entries WHERE tenant_id = 'idem-t';
-- a new trace id for the same charge goes through
SELECT status, replayed, amount, balance_after
  FROM billing_try_deduct('idem-t', 6, 'idem-t-4', 'big job', '{"model": "m2"}',
                          '2024-05-01 10:00:00+00');

-- A different request under the trace id of a recorded rejection is a
-- conflict, raised by both forms and by billing_credit.
SELECT regress_error($$SELECT billing_try_deduct('idem-t', 5, 'idem-t-3', 'big job',
        '{"model": "m2"}', '2024-05-01 10:00:00+00')$$);
SELECT regress_error($$SELECT billing_try_deduct('idem-t', 6, 'idem-t-3')$$);
SELECT regress_error($$SELECT billing_deduct('idem-t', 6, 'idem-t-3', 'big job',
        '{"model": "m2"}', '2024-05-01 10:00:00+00', 'adjustment')$$);
SELECT regress_error($$SELECT billing_credit('idem-t', 6, 'idem-t-3', 'big job',
        '{"model": "m2"}', '2024-05-01 10:00:00+00')$$);

-- Suspended and closed accounts: the try form records ZB002 / ZB003.
SELECT status FROM billing_account_update('idem-t', status => 'suspended');
SELECT status, replayed, amount, sqlstate, reason, detail
  FROM billing_try_deduct('idem-t', 1, 'idem-t-5');
SELECT status FROM billing_account_update('idem-t', status => 'active');
-- reactivated, the recorded refusal stays
SELECT status, replayed, amount, sqlstate, reason, detail
  FROM billing_try_deduct('idem-t', 1, 'idem-t-5');
SELECT regress_error($$SELECT billing_deduct('idem-t', 1, 'idem-t-5')$$);
-- a committed entry replays even after the account is closed
SELECT status FROM billing_account_update('idem-t', status => 'closed');
SELECT status, replayed, amount, sqlstate, reason, detail
  FROM billing_try_deduct('idem-t', 1, 'idem-t-6', kind => 'adjustment');
SELECT status, replayed, entry_id = :try_id AS same_entry, amount, balance_after
  FROM billing_try_deduct('idem-t', 4, 'idem-t-1', metadata => '{"model": "m1"}');

SELECT trace_id, kind, amount_micros, sqlstate FROM billing.rejections
 WHERE tenant_id = 'idem-t' ORDER BY rejection_id;
SELECT trace_id, kind, amount, balance_after FROM billing.ledger
 WHERE tenant_id = 'idem-t' ORDER BY version;
SELECT * FROM billing_verify() WHERE tenant_id LIKE 'idem-%';

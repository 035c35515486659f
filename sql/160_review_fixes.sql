--
-- 160_review_fixes: behaviour pinned down after a code review, one section
-- per finding: NULLs written into billing.jobs by hand, usage counters at
-- the edge of 64 bits, trace ids shared by a capture and a recorded
-- rejection, the sign of an amount checked first, and UPDATE OF <column>
-- triggers on billing.accounts.  Tenants start with "rf-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

-- 1. The job guard (a BEFORE ROW trigger) runs ahead of the table's NOT
-- NULL constraints.  A direct write by the owner that sets a column the
-- state machine needs to NULL is refused with a not-null violation (23502)
-- naming the column; the job is unchanged.
SELECT tenant_id FROM billing_account_create('rf-job');
SELECT balance_after FROM billing_credit('rf-job', 10, 'rf-job-top');
SELECT state FROM billing_job_submit('rf-job', 'render', 'rf-job-1', 1);
SELECT regress_error($$UPDATE billing.jobs SET state = NULL
                       WHERE tenant_id = 'rf-job' AND idempotency_key = 'rf-job-1'$$) AS error;
SELECT regress_error($$UPDATE billing.jobs SET kind = NULL
                       WHERE tenant_id = 'rf-job' AND idempotency_key = 'rf-job-1'$$) AS error;
SELECT regress_error($$UPDATE billing.jobs SET attempt = NULL
                       WHERE tenant_id = 'rf-job' AND idempotency_key = 'rf-job-1'$$) AS error;
SELECT regress_error($$INSERT INTO billing.jobs (tenant_id, idempotency_key, kind, state, estimated_micros)
                       VALUES ('rf-job', 'rf-job-2', 'render', NULL, 1000000)$$) AS error;
SELECT kind, state, attempt FROM billing.jobs WHERE tenant_id = 'rf-job' ORDER BY job_id;
-- the server is still up and the session usable
SELECT state FROM billing_job_cancel('rf-job',
    (SELECT job_id FROM billing.jobs WHERE tenant_id = 'rf-job' AND idempotency_key = 'rf-job-1'),
    'done testing');

-- 2. Usage counters never wrap.  Ten credit/deduct cycles of 10^12 units
-- each charge 10^19 micro-units in a day, more than a bigint holds: the
-- day and month spend (and an API key's period spend) stop at the bigint
-- maximum, which every cap treats as spent, so the caps keep failing
-- closed.  The balance itself is exact.
SELECT tenant_id FROM billing_account_create('rf-big');
SELECT key_id FROM billing_api_key_create('rf-big', 'rf-big-key');
DO $$
BEGIN
    FOR i IN 1..10 LOOP
        PERFORM billing_credit('rf-big', 1e12, 'bc' || i);
        PERFORM billing_deduct('rf-big', 1e12, 'bd' || i, api_key => 'rf-big-key');
    END LOOP;
END $$;
SELECT balance_micros, day_requests, day_spend_micros, month_spend_micros,
       day_spend_micros = 9223372036854775807 AS day_spend_saturated
  FROM billing.accounts WHERE tenant_id = 'rf-big';
SELECT period_spend_micros FROM billing.api_keys
 WHERE tenant_id = 'rf-big' AND key_id = 'rf-big-key';
SELECT balance_after FROM billing_credit('rf-big', 1000, 'rf-big-top');
SELECT daily_spend_cap, monthly_spend_cap
  FROM billing_limits_set('rf-big', daily_spend => 5, monthly_spend => 5);
-- over the daily cap: ZB042, showing the saturated spend
SELECT regress_error($$SELECT billing_deduct('rf-big', 100, 'rf-big-capped')$$) AS error;
SELECT daily_spend_cap FROM billing_limits_set('rf-big', monthly_spend => 5);
SELECT regress_error($$SELECT billing_deduct('rf-big', 100, 'rf-big-capped')$$) AS error;
-- without caps the account charges again; the counters stay at the maximum
SELECT daily_spend_cap FROM billing_limits_set('rf-big');
SELECT balance_after FROM billing_deduct('rf-big', 1, 'rf-big-after', api_key => 'rf-big-key');
SELECT a.day_spend_micros, a.month_spend_micros, k.period_spend_micros
  FROM billing.accounts a JOIN billing.api_keys k USING (tenant_id)
 WHERE tenant_id = 'rf-big';
SELECT * FROM billing_verify('rf-big');

-- 3. (tenant_id, trace_id) is unique across the ledger and the recorded
-- rejections, captures included: a capture cannot take the trace id of a
-- rejection recorded by billing_try_deduct (ZB005), and the rejected
-- request keeps replaying as the same rejection.
SELECT tenant_id FROM billing_account_create('rf-t1');
SELECT balance_after FROM billing_credit('rf-t1', 2, 'rf-t1-top');
SELECT status, sqlstate FROM billing_try_deduct('rf-t1', 100000, 'dup-trace');
SELECT status, remaining FROM billing_hold('rf-t1', 1, 'hh-1');
SELECT regress_error($$SELECT billing_capture('rf-t1', 'hh-1', 0.5, 'dup-trace')$$) AS error;
SELECT status, replayed, sqlstate FROM billing_try_deduct('rf-t1', 100000, 'dup-trace');
SELECT regress_error($$SELECT billing_deduct('rf-t1', 100000, 'dup-trace')$$) AS error;
-- nothing was captured; a capture under a fresh trace id works
SELECT status, captured_micros, released_micros FROM billing.holds
 WHERE tenant_id = 'rf-t1' AND trace_id = 'hh-1';
SELECT amount, hold_remaining FROM billing_capture('rf-t1', 'hh-1', 0.5, 'rf-t1-cap-1');
-- a hold's own trace id lives in the hold journal, not in the ledger: a
-- hold and a release may share a trace id with a rejection
SELECT status, sqlstate FROM billing_try_deduct('rf-t1', 100000, 'rf-t1-shared');
SELECT status, remaining FROM billing_hold('rf-t1', 0.25, 'rf-t1-shared');
SELECT status, released FROM billing_release('rf-t1', 'rf-t1-shared', 'rf-t1-shared-release');
SELECT status, replayed, sqlstate FROM billing_try_deduct('rf-t1', 100000, 'rf-t1-shared');
SELECT * FROM billing_verify('rf-t1');

-- 4. The sign of an amount is checked right after NaN/Infinity: a negative
-- amount is ZB010 whatever its size or precision (not ZB012 or ZB013).
SELECT regress_error($$SELECT billing_credit('rf-t1', -0.0000001, 'rf-neg-1')$$) AS error;
SELECT regress_error($$SELECT billing_credit('rf-t1', -1e13, 'rf-neg-2')$$) AS error;
SELECT regress_error($$SELECT billing_deduct('rf-t1', -5, 'rf-neg-3')$$) AS error;
SELECT regress_error($$SELECT billing_hold('rf-t1', -0.0000001, 'rf-neg-4')$$) AS error;
-- zero-or-positive arguments too
SELECT regress_error($$SELECT billing_price_set('rf-model', -1e13, 0)$$) AS error;
-- the other checks are unchanged for positive amounts
SELECT regress_error($$SELECT billing_credit('rf-t1', 0.0000001, 'rf-neg-5')$$) AS error;
SELECT regress_error($$SELECT billing_credit('rf-t1', 1e13, 'rf-neg-6')$$) AS error;
SELECT regress_error($$SELECT billing_credit('rf-t1', -0.0000000, 'rf-neg-7')$$) AS error;

-- 5. A charge updates billing.accounts by direct heap access; a row
-- trigger declared for UPDATE OF a column fires when a charge sets that
-- column, as for a SQL UPDATE, and not when it leaves the column alone.
CREATE FUNCTION rf_balance_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE '% of %: balance % -> %', TG_WHEN, NEW.tenant_id,
        OLD.balance_micros, NEW.balance_micros;
    RETURN NEW;
END $$;
CREATE TRIGGER rf_balance_before BEFORE UPDATE OF balance_micros ON billing.accounts
    FOR EACH ROW EXECUTE FUNCTION rf_balance_changed();
CREATE TRIGGER rf_balance_after AFTER UPDATE OF balance_micros ON billing.accounts
    FOR EACH ROW EXECUTE FUNCTION rf_balance_changed();
CREATE TRIGGER rf_status_after AFTER UPDATE OF status ON billing.accounts
    FOR EACH ROW EXECUTE FUNCTION rf_balance_changed();
SELECT balance_after FROM billing_deduct('rf-t1', 0.25, 'rf-of-1');
SELECT balance_after FROM billing_credit('rf-t1', 1, 'rf-of-2');
SELECT replayed FROM billing_deduct('rf-t1', 0.25, 'rf-of-1');   -- a replay writes nothing
DROP TRIGGER rf_balance_before ON billing.accounts;
DROP TRIGGER rf_balance_after ON billing.accounts;
DROP TRIGGER rf_status_after ON billing.accounts;
DROP FUNCTION rf_balance_changed();

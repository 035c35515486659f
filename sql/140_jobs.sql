--
-- 140_jobs: billing tied to a state machine.  billing_job_submit creates a
-- queued job and holds its estimated cost in one transaction; a worker
-- claims it (attempt + 1, a lease), heartbeats, and completes it (the
-- actual cost is captured from the hold, the rest released) or fails it
-- (queued again with backoff while attempts remain, else failed with the
-- hold released).  Queued and processing jobs can be cancelled (hold
-- released), failed ones retried (a new hold), and jobs whose lease ran
-- out are rescued.  The C trigger billing.job_guard holds every writer,
-- the table owner included, to the transitions of the diagram and to the
-- billing invariants: completed => charged, failed/cancelled => no open
-- hold.  Tenants start with "job-", kinds too.
--
-- Job ids appear in error messages; the sequence is set so that they do
-- not depend on what ran before this file.  Everything else refers to a
-- job by its tenant and idempotency key (jid()).  No timestamp is printed:
-- they are compared in SQL.
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT setval('billing.job_id_seq', 140000);

-- the job of a tenant's idempotency key
CREATE FUNCTION jid(tenant text, key text) RETURNS bigint
    LANGUAGE sql STABLE
AS $$
    SELECT job_id FROM billing.jobs WHERE tenant_id = tenant AND idempotency_key = key
$$;
-- the holds of a job (hold trace ids are job:<job_id>:<n>), oldest first
CREATE FUNCTION job_holds(tenant text, key text)
    RETURNS TABLE (trace_id text, status text, amount numeric, captured numeric,
                   released numeric, open_now boolean)
    LANGUAGE sql STABLE
AS $$
    SELECT h.trace_id, h.status, billing.to_amount(h.amount_micros),
           billing.to_amount(h.captured_micros), billing.to_amount(h.released_micros),
           h.status = 'open' AND h.expires_at > now()
      FROM billing.holds h
     WHERE h.tenant_id = tenant AND h.trace_id LIKE format('job:%s:%%', jid(tenant, key))
     ORDER BY h.hold_id
$$;
-- the transitions of a job, from billing.job_events
CREATE FUNCTION job_history(tenant text, key text)
    RETURNS TABLE (from_state text, to_state text, attempt integer, reason text, worker text)
    LANGUAGE sql STABLE
AS $$
    SELECT e.from_state, e.to_state, e.attempt, e.reason, e.worker
      FROM billing.job_events e
     WHERE e.tenant_id = tenant AND e.job_id = jid(tenant, key)
     ORDER BY e.event_id
$$;

--
-- Submit: the job is queued (attempt 0) and its estimate is held under the
-- trace id job:<job_id>:1 for hold_ttl (1 hour by default).  The hold
-- lowers available, not the balance, and writes no ledger entry.
--
SELECT tenant_id FROM billing_account_create('job-a');
SELECT balance_after FROM billing_credit('job-a', 100, 'job-a-topup');
SELECT job_id, tenant_id, idempotency_key, kind, state, attempt, max_attempts,
       run_at = now() AS due_now, worker, lease_until, estimated_cost, actual_cost,
       hold_trace_id, charge_entry_id, last_error, input, output, finished_at, replayed
  FROM billing_job_submit('job-a', 'job-translate', 'a1', 2.00,
                          input => '{"doc": "a1.txt"}', max_attempts => 3);
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-a';
SELECT h.trace_id, h.amount, h.captured, h.remaining, h.description,
       h.expires_at >= j.created_at + interval '1 hour'
           AND h.expires_at < j.created_at + interval '1 hour 1 minute' AS expires_1_hour_after_submit
  FROM billing.open_holds h JOIN billing.jobs j ON j.tenant_id = h.tenant_id AND j.hold_trace_id = h.trace_id
 WHERE h.tenant_id = 'job-a';
SELECT trace_id, kind FROM billing.entries WHERE tenant_id = 'job-a' ORDER BY entry_id;
SELECT * FROM job_history('job-a', 'a1');

-- The same submit again returns the same job, replayed = true; nothing is
-- held twice.
SELECT job_id = jid('job-a', 'a1') AS same_job, state, estimated_cost, replayed
  FROM billing_job_submit('job-a', 'job-translate', 'a1', 2.00,
                          input => '{"doc": "a1.txt"}', max_attempts => 3);
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-a';
SELECT count(*) AS jobs FROM billing.jobs WHERE tenant_id = 'job-a';
SELECT count(*) AS holds FROM billing.holds WHERE tenant_id = 'job-a';
-- the key with other fields is a conflict (ZB005) naming every field that
-- differs, and changes nothing
SELECT regress_error($$SELECT billing_job_submit('job-a', 'job-translate', 'a1', 2.50,
        input => '{"doc": "a1.txt"}', max_attempts => 3)$$);
SELECT regress_error($$SELECT billing_job_submit('job-a', 'job-resize', 'a1', 3,
        input => '{"doc": "other.txt"}', max_attempts => 5)$$);
SELECT on_hold, available FROM billing.balances WHERE tenant_id = 'job-a';
-- the same key in another tenant is another job
SELECT tenant_id FROM billing_account_create('job-b');
SELECT balance_after FROM billing_credit('job-b', 100, 'job-b-topup');
SELECT job_id <> jid('job-a', 'a1') AS other_job, tenant_id, state, replayed
  FROM billing_job_submit('job-b', 'job-translate', 'a1', 1, input => '{"doc": "a1.txt"}');

-- Not enough funds for the estimate: ZB004, and no job, hold or event is
-- left behind (the job and its hold are one transaction).
SELECT tenant_id FROM billing_account_create('job-poor');
SELECT balance_after FROM billing_credit('job-poor', 1, 'job-poor-topup');
SELECT regress_error($$SELECT billing_job_submit('job-poor', 'job-translate', 'p1', 5)$$);
SELECT (SELECT count(*) FROM billing.jobs WHERE tenant_id = 'job-poor') AS jobs,
       (SELECT count(*) FROM billing.holds WHERE tenant_id = 'job-poor') AS holds,
       (SELECT count(*) FROM billing.job_events WHERE tenant_id = 'job-poor') AS events;
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-poor';

--
-- Claim: hands out due queued jobs (oldest run_at first): attempt + 1, the
-- worker, a lease (5 minutes by default).  The hold is kept alive past the
-- lease: one that outlives the lease by half the hold_ttl or more is left
-- as it is, one that does not is extended to lease_until + hold_ttl.  a1's
-- hold (hold_ttl 1 hour, submitted a moment ago) ends 55 minutes after the
-- lease: not extended.  A claimed job is not handed out again.
--
SELECT job_id = jid('job-a', 'a1') AS is_a1, state, attempt, worker,
       lease_until - now() AS lease, replayed
  FROM billing_job_claim('job-w1', tenant_id => 'job-a');
SELECT j.state, j.worker, j.attempt, j.lease_until - j.heartbeat_at AS lease,
       h.expires_at >= j.lease_until + j.hold_ttl / 2 AS hold_outlives_lease_by_half_ttl,
       h.expires_at = h.created_at + j.hold_ttl AS not_extended,
       (SELECT count(*) FROM billing.hold_events e
         WHERE e.tenant_id = h.tenant_id AND e.hold_id = h.hold_id AND e.action = 'extend') AS extends
  FROM billing.jobs j JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
 WHERE j.tenant_id = 'job-a' AND j.idempotency_key = 'a1';
-- The edge, with heartbeats of a1: a 25 minute lease leaves the hold 35
-- minutes after it, more than half the hold_ttl: not extended; a 35 minute
-- lease leaves it 25 minutes after, less than half: extended to the lease's
-- end + 1 hour.
-- another worker's heartbeat, complete or fail is ZB073, whose message shows
-- the worker's name cut to 64 characters (it was shown whole)
SELECT label, left(e, 6) AS sqlstate, length(e) < 200 AS bounded
  FROM (SELECT label, split_part(regress_error(sql), E'\n', 1) AS e
          FROM (VALUES
            ('heartbeat', $$SELECT billing_job_heartbeat('job-a', jid('job-a', 'a1'), repeat('w', 100000))$$),
            ('complete',  $$SELECT billing_job_complete('job-a', jid('job-a', 'a1'), 1, worker => repeat('w', 256))$$),
            ('fail',      $$SELECT billing_job_fail('job-a', jid('job-a', 'a1'), 'x', worker => repeat('w', 100000))$$))
               AS t(label, sql)) s;
SELECT lease_until - now() AS lease
  FROM billing_job_heartbeat('job-a', jid('job-a', 'a1'), 'job-w1', lease => '25 minutes');
SELECT h.expires_at = h.created_at + j.hold_ttl AS not_extended
  FROM billing.jobs j JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
 WHERE j.tenant_id = 'job-a' AND j.idempotency_key = 'a1';
SELECT lease_until - now() AS lease
  FROM billing_job_heartbeat('job-a', jid('job-a', 'a1'), 'job-w1', lease => '35 minutes');
SELECT h.expires_at >= j.lease_until + j.hold_ttl
           AND h.expires_at < j.lease_until + j.hold_ttl + interval '1 minute' AS extended_to_lease_plus_ttl,
       (SELECT count(*) FROM billing.hold_events e
         WHERE e.tenant_id = h.tenant_id AND e.hold_id = h.hold_id AND e.action = 'extend') AS extends
  FROM billing.jobs j JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
 WHERE j.tenant_id = 'job-a' AND j.idempotency_key = 'a1';
SELECT count(*) AS second_claim FROM billing_job_claim('job-w2', tenant_id => 'job-a');
SELECT * FROM job_history('job-a', 'a1');

-- max_jobs: three more jobs, claimed two and one at a time, in order
SELECT idempotency_key, state FROM billing_job_submit('job-a', 'job-translate', 'a2', 2.00);
SELECT idempotency_key, state FROM billing_job_submit('job-a', 'job-translate', 'a3', 2.00);
SELECT idempotency_key, state FROM billing_job_submit('job-a', 'job-translate', 'a4', 2.00);
SELECT idempotency_key, state, attempt, worker
  FROM billing_job_claim('job-w1', max_jobs => 2, tenant_id => 'job-a') ORDER BY job_id;
SELECT idempotency_key, state, attempt, worker
  FROM billing_job_claim('job-w1', max_jobs => 2, tenant_id => 'job-a');
SELECT count(*) AS nothing_left FROM billing_job_claim('job-w1', max_jobs => 10, tenant_id => 'job-a');
SELECT on_hold, available FROM billing.balances WHERE tenant_id = 'job-a';

-- Filters: kinds and tenant_id.  job-b has a translate job ('a1') and a
-- resize job, job-c a resize job.
SELECT tenant_id FROM billing_account_create('job-c');
SELECT balance_after FROM billing_credit('job-c', 100, 'job-c-topup');
SELECT idempotency_key, kind FROM billing_job_submit('job-b', 'job-resize', 'b2', 1);
SELECT idempotency_key, kind FROM billing_job_submit('job-c', 'job-resize', 'c1', 1);
SELECT tenant_id, idempotency_key, kind, worker
  FROM billing_job_claim('job-w3', kinds => '{job-resize}', tenant_id => 'job-b');
SELECT tenant_id, idempotency_key, kind, worker
  FROM billing_job_claim('job-w3', kinds => '{job-resize,job-nothing}', max_jobs => 10);
SELECT tenant_id, idempotency_key, kind, worker
  FROM billing_job_claim('job-w3', max_jobs => 10, tenant_id => 'job-b');

-- A job with run_at in the future is not due: it is not claimed, and its
-- hold lasts until run_at + hold_ttl.
SELECT idempotency_key, state, run_at > now() + interval '59 minutes' AS later
  FROM billing_job_submit('job-b', 'job-translate', 'b3', 1, run_at => now() + interval '1 hour');
SELECT count(*) AS claimed FROM billing_job_claim('job-w3', max_jobs => 10, tenant_id => 'job-b');
SELECT h.expires_at >= j.run_at + j.hold_ttl
           AND h.expires_at < j.run_at + j.hold_ttl + interval '1 minute' AS hold_until_run_at_plus_ttl
  FROM billing.jobs j JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
 WHERE j.tenant_id = 'job-b' AND j.idempotency_key = 'b3';

-- billing.job_result, which builds every job function's result row, is
-- inlined where it is called (a SET clause would prevent that and make each
-- call parse its body again): the plan shows the row, not a call.
CREATE FUNCTION plan_text(q text) RETURNS text
    LANGUAGE plpgsql
AS $$
DECLARE
    line text;
    plan text := '';
BEGIN
    FOR line IN EXECUTE 'EXPLAIN (VERBOSE, COSTS OFF) ' || q LOOP
        plan := plan || line || E'\n';
    END LOOP;
    RETURN plan;
END;
$$;
SELECT plan LIKE '%ROW(job_id, tenant_id, %' AS inlined, plan LIKE '%job_result(%' AS called
  FROM plan_text('SELECT billing.job_result(j, true) FROM billing.jobs j') AS plan;

--
-- Heartbeat: the lease becomes now() + lease, and a hold that would end
-- less than half its hold_ttl after it is extended to outlive it by
-- hold_ttl.  A short hold_ttl (1 minute) shows the hold following the
-- lease: claim with a 10 minute lease, then a heartbeat of 20 minutes.
--
SELECT idempotency_key FROM billing_job_submit('job-b', 'job-translate', 'b4', 1, hold_ttl => '1 minute');
SELECT expires_at < now() + interval '1 minute 1 second' AS hold_for_1_minute
  FROM billing.holds WHERE tenant_id = 'job-b' AND trace_id = format('job:%s:1', jid('job-b', 'b4'));
SELECT idempotency_key, attempt, lease_until - now() AS lease
  FROM billing_job_claim('job-w4', kinds => '{job-translate}', lease => '10 minutes', tenant_id => 'job-b');
SELECT h.expires_at >= j.lease_until + interval '1 minute' AS hold_outlives_lease
  FROM billing.jobs j JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
 WHERE j.tenant_id = 'job-b' AND j.idempotency_key = 'b4';
-- (With track_functions = all the heartbeat below also shows that the job
-- functions, PL/pgSQL, run billing.job_result inlined: its calls are not
-- counted, those of billing.job_check_lease are.)
SET track_functions = 'all';
SELECT state, attempt, worker, lease_until - now() AS lease, replayed
  FROM billing_job_heartbeat('job-b', jid('job-b', 'b4'), 'job-w4', lease => '20 minutes');
SELECT pg_stat_force_next_flush();
SELECT coalesce(pg_stat_get_function_calls('billing.job_result(billing.jobs,boolean)'::regprocedure), 0)
           AS job_result_calls,
       pg_stat_get_function_calls('billing.job_check_lease(billing.jobs,text,text)'::regprocedure) > 0
           AS job_check_lease_counted;
RESET track_functions;
SELECT j.lease_until - j.heartbeat_at AS lease,
       h.expires_at >= j.lease_until + interval '1 minute'
           AND h.expires_at < j.lease_until + interval '2 minutes' AS hold_outlives_lease
  FROM billing.jobs j JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
 WHERE j.tenant_id = 'job-b' AND j.idempotency_key = 'b4';
-- a heartbeat is not a transition: nothing is logged
SELECT * FROM job_history('job-b', 'b4');
-- only the worker holding the lease may heartbeat (ZB073); a queued job
-- has no lease (ZB073; message and detail); a finished job is final
-- (ZB070, further below)
SELECT regress_error($$SELECT billing_job_heartbeat('job-b', jid('job-b', 'b4'), 'job-w-other')$$);
SELECT split_part(regress_error($$SELECT billing_job_heartbeat('job-b', jid('job-b', 'b3'), 'job-w4')$$),
                  E'\nHINT', 1) AS error;

--
-- Complete: the actual cost is captured from the hold (final, so the rest
-- is released) and the job is completed in the same transaction;
-- charge_entry_id names the capture entry (trace id job:<job_id>:charge).
--
-- less than the estimate: 1.50 of 2.00 charged, 0.50 released
SELECT state, attempt, actual_cost, estimated_cost, output, replayed,
       charge_entry_id IS NOT NULL AS charged, finished_at = now() AS finished_now
  FROM billing_job_complete('job-a', jid('job-a', 'a1'), 1.50, '{"words": 912}', 'job-w1');
SELECT * FROM job_holds('job-a', 'a1');
-- the entry charge_entry_id names
SELECT l.trace_id, l.kind, l.amount, l.description, l.hold_id = h.hold_id AS on_job_hold
  FROM billing.ledger l
  JOIN billing.jobs j ON j.tenant_id = l.tenant_id AND j.charge_entry_id = l.entry_id
  JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
 WHERE j.tenant_id = 'job-a' AND j.idempotency_key = 'a1';
SELECT state, lease_until IS NULL AS no_lease, actual_micros, output
  FROM billing.jobs WHERE tenant_id = 'job-a' AND idempotency_key = 'a1';
-- balance 100 - 1.50; on hold: a2, a3, a4 (2.00 each)
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-a';
SELECT * FROM job_history('job-a', 'a1');
-- the same complete again (a retry after a lost reply) returns the job,
-- replayed = true, and charges nothing; another cost is refused (ZB070:
-- completed is final)
SELECT state, actual_cost, replayed,
       charge_entry_id = (SELECT charge_entry_id FROM billing.jobs
                           WHERE tenant_id = 'job-a' AND idempotency_key = 'a1') AS same_charge
  FROM billing_job_complete('job-a', jid('job-a', 'a1'), 1.50, '{"words": 912}', 'job-w1');
SELECT regress_error($$SELECT billing_job_complete('job-a', jid('job-a', 'a1'), 1.60, NULL, 'job-w1')$$);
SELECT balance, on_hold FROM billing.balances WHERE tenant_id = 'job-a';
SELECT count(*) AS entries FROM billing.entries WHERE tenant_id = 'job-a';

-- exactly the estimate: 2.00 charged, nothing released
SELECT state, actual_cost, replayed
  FROM billing_job_complete('job-a', jid('job-a', 'a2'), 2.00, NULL, 'job-w1');
SELECT * FROM job_holds('job-a', 'a2');
-- more than the estimate: the excess (1.25) is charged because available
-- funds cover it; the hold is settled
SELECT state, actual_cost, replayed
  FROM billing_job_complete('job-a', jid('job-a', 'a3'), 3.25, NULL, 'job-w1');
SELECT * FROM job_holds('job-a', 'a3');
-- actual cost 0: completed without a charge, the whole hold released
SELECT state, actual_cost, charge_entry_id, replayed
  FROM billing_job_complete('job-a', jid('job-a', 'a4'), 0, NULL, 'job-w1');
SELECT * FROM job_holds('job-a', 'a4');
SELECT state, actual_cost, replayed
  FROM billing_job_complete('job-a', jid('job-a', 'a4'), 0, NULL, 'job-w1');
-- 100 - 1.50 - 2.00 - 3.25 - 0
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-a';
SELECT trace_id, kind, amount, balance_after FROM billing.ledger
 WHERE tenant_id = 'job-a' ORDER BY version;
SELECT tenant_id, kind, completed_jobs, estimated, actual, actual_to_estimate
  FROM billing.job_costs WHERE tenant_id = 'job-a';
-- a completed job takes no heartbeat or failure (ZB070)
SELECT regress_error($$SELECT billing_job_heartbeat('job-a', jid('job-a', 'a1'), 'job-w1')$$);
SELECT regress_error($$SELECT billing_job_fail('job-a', jid('job-a', 'a1'), 'late', worker => 'job-w1')$$);
-- the worker named in complete must hold the lease (ZB073)
SELECT regress_error($$SELECT billing_job_complete('job-b', jid('job-b', 'b4'), 1, NULL, 'job-w-other')$$);
SELECT state, worker FROM billing.jobs WHERE tenant_id = 'job-b' AND idempotency_key = 'b4';

--
-- Fail twice, then succeed (max_attempts 3).  A retryable failure with
-- attempts left puts the job back in the queue with a backoff of
-- attempt^4 seconds (+-10 %) and keeps the hold; the attempt is counted
-- at claim.  To skip the backoff the test moves run_at to now() directly:
-- queued -> queued is a legal update.
--
SELECT tenant_id FROM billing_account_create('job-r');
SELECT balance_after FROM billing_credit('job-r', 20, 'job-r-topup');
SELECT idempotency_key, state, max_attempts
  FROM billing_job_submit('job-r', 'job-video', 'r1', 4, max_attempts => 3);
SELECT attempt, worker FROM billing_job_claim('job-w5', tenant_id => 'job-r');
SELECT state, attempt, last_error, lease_until,
       run_at - now() BETWEEN interval '0.9 seconds' AND interval '1.1 seconds' AS backoff_1s,
       replayed
  FROM billing_job_fail('job-r', jid('job-r', 'r1'), 'upstream 503', retryable => true, worker => 'job-w5');
-- the hold stays, extended to outlive run_at by the whole hold_ttl, as at
-- submit (claims and heartbeats leave a hold that outlives the lease by half
-- the hold_ttl as it is; a retry's wait gets all of it), and the job is not
-- due yet
SELECT * FROM job_holds('job-r', 'r1');
SELECT h.expires_at >= j.run_at + j.hold_ttl
           AND h.expires_at < j.run_at + j.hold_ttl + interval '1 minute' AS hold_until_run_at_plus_ttl
  FROM billing.jobs j JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
 WHERE j.tenant_id = 'job-r' AND j.idempotency_key = 'r1';
SELECT on_hold, available FROM billing.balances WHERE tenant_id = 'job-r';
SELECT count(*) AS claimed FROM billing_job_claim('job-w5', tenant_id => 'job-r');
-- the failed attempt's worker has no lease any more (ZB073; message and
-- detail)
SELECT split_part(regress_error($$SELECT billing_job_complete('job-r', jid('job-r', 'r1'), 1, NULL, 'job-w5')$$),
                  E'\nHINT', 1) AS error;
UPDATE billing.jobs SET run_at = now() WHERE tenant_id = 'job-r' AND idempotency_key = 'r1';
SELECT attempt, worker FROM billing_job_claim('job-w6', tenant_id => 'job-r');
SELECT state, attempt, last_error,
       run_at - now() BETWEEN interval '14.4 seconds' AND interval '17.6 seconds' AS backoff_16s
  FROM billing_job_fail('job-r', jid('job-r', 'r1'), 'upstream 504', worker => 'job-w6');
UPDATE billing.jobs SET run_at = now() WHERE tenant_id = 'job-r' AND idempotency_key = 'r1';
SELECT attempt, worker FROM billing_job_claim('job-w7', tenant_id => 'job-r');
SELECT state, attempt, actual_cost, last_error, replayed
  FROM billing_job_complete('job-r', jid('job-r', 'r1'), 3.5, '{"frames": 240}', 'job-w7');
SELECT * FROM job_holds('job-r', 'r1');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-r';
SELECT * FROM job_history('job-r', 'r1');
SELECT tenant_id, kind, error, failures, jobs FROM billing.job_failures
 WHERE tenant_id = 'job-r' ORDER BY error;

--
-- Failures that end the job: not retryable, or no attempts left.  The job
-- is failed and its hold released in the same transaction.
--
SELECT tenant_id FROM billing_account_create('job-f');
SELECT balance_after FROM billing_credit('job-f', 20, 'job-f-topup');
SELECT idempotency_key FROM billing_job_submit('job-f', 'job-video', 'f1', 4, max_attempts => 3);
SELECT idempotency_key FROM billing_job_submit('job-f', 'job-video', 'f2', 4, max_attempts => 1);
SELECT on_hold, available FROM billing.balances WHERE tenant_id = 'job-f';
SELECT idempotency_key, attempt FROM billing_job_claim('job-w8', max_jobs => 2, tenant_id => 'job-f')
 ORDER BY job_id;
-- retryable => false: failed at the first attempt
SELECT state, attempt, max_attempts, last_error, finished_at = now() AS finished_now, replayed
  FROM billing_job_fail('job-f', jid('job-f', 'f1'), 'bad input', retryable => false, worker => 'job-w8');
SELECT * FROM job_holds('job-f', 'f1');
-- retryable, but max_attempts 1 is used up: failed as well
SELECT state, attempt, max_attempts, last_error
  FROM billing_job_fail('job-f', jid('job-f', 'f2'), 'timeout', worker => 'job-w8');
SELECT * FROM job_holds('job-f', 'f2');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-f';
SELECT * FROM job_history('job-f', 'f1');
-- a failed job takes no further failure, completion or cancel (ZB070)
SELECT regress_error($$SELECT billing_job_fail('job-f', jid('job-f', 'f1'), 'again', worker => 'job-w8')$$);
SELECT regress_error($$SELECT billing_job_complete('job-f', jid('job-f', 'f1'), 1, NULL, 'job-w8')$$);
SELECT regress_error($$SELECT billing_job_cancel('job-f', jid('job-f', 'f1'))$$);

--
-- Retry: a failed job goes back to the queue with attempts starting over
-- and a new hold for its estimate (job:<job_id>:2).  Only failed jobs can
-- be retried (ZB070).
--
SELECT state, attempt, hold_trace_id = format('job:%s:2', job_id) AS second_hold,
       run_at = now() AS due_now, finished_at, replayed
  FROM billing_job_retry('job-f', jid('job-f', 'f1'));
SELECT state, attempt, worker, lease_until, hold_seq, finished_at
  FROM billing.jobs WHERE tenant_id = 'job-f' AND idempotency_key = 'f1';
SELECT * FROM job_holds('job-f', 'f1');
SELECT on_hold, available FROM billing.balances WHERE tenant_id = 'job-f';
SELECT regress_error($$SELECT billing_job_retry('job-f', jid('job-f', 'f1'))$$);
SELECT regress_error($$SELECT billing_job_retry('job-a', jid('job-a', 'a1'))$$);
-- the retried job runs and is charged from its new hold
SELECT idempotency_key, attempt FROM billing_job_claim('job-w8', tenant_id => 'job-f');
SELECT state, attempt, actual_cost FROM billing_job_complete('job-f', jid('job-f', 'f1'), 4, NULL, 'job-w8');
SELECT * FROM job_holds('job-f', 'f1');
SELECT h.trace_id AS charged_from_hold
  FROM billing.jobs j JOIN billing.entries e ON e.tenant_id = j.tenant_id AND e.entry_id = j.charge_entry_id
  JOIN billing.holds h ON h.hold_id = e.hold_id
 WHERE j.tenant_id = 'job-f' AND j.idempotency_key = 'f1';
SELECT from_state, to_state, attempt, reason FROM job_history('job-f', 'f1');
-- Retry without the funds for the estimate: ZB004, the job stays failed
-- with its old hold, no new hold.  After a top-up the retry goes through.
SELECT balance_after FROM billing_deduct('job-f', 13, 'job-f-spend');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-f';
SELECT regress_error($$SELECT billing_job_retry('job-f', jid('job-f', 'f2'))$$);
SELECT state, hold_seq, hold_trace_id = format('job:%s:1', job_id) AS old_hold
  FROM billing.jobs WHERE tenant_id = 'job-f' AND idempotency_key = 'f2';
SELECT * FROM job_holds('job-f', 'f2');
SELECT balance_after FROM billing_credit('job-f', 10, 'job-f-topup-2');
SELECT state, hold_trace_id = format('job:%s:2', job_id) AS second_hold
  FROM billing_job_retry('job-f', jid('job-f', 'f2'));
SELECT on_hold, available FROM billing.balances WHERE tenant_id = 'job-f';

--
-- Cancel: a queued or a processing job is cancelled and its hold released
-- in one transaction.  Cancelling a cancelled job returns it (replayed);
-- completed and failed jobs cannot be cancelled (ZB070).  The worker of a
-- cancelled job gets ZB070 for whatever it tries next.
--
SELECT tenant_id FROM billing_account_create('job-k');
SELECT balance_after FROM billing_credit('job-k', 20, 'job-k-topup');
SELECT idempotency_key FROM billing_job_submit('job-k', 'job-video', 'k1', 3);
SELECT idempotency_key FROM billing_job_submit('job-k', 'job-video', 'k2', 3);
SELECT idempotency_key, attempt FROM billing_job_claim('job-w9', tenant_id => 'job-k');
-- k1 is processing now, k2 queued
SELECT state, finished_at = now() AS finished_now, replayed
  FROM billing_job_cancel('job-k', jid('job-k', 'k2'), 'user cancelled');
SELECT state, attempt, worker, replayed
  FROM billing_job_cancel('job-k', jid('job-k', 'k1'), 'user went away');
-- the reason is kept as last_error; the lease is gone
SELECT idempotency_key, state, last_error, lease_until FROM billing.jobs
 WHERE tenant_id = 'job-k' ORDER BY job_id;
SELECT * FROM job_holds('job-k', 'k1');
SELECT * FROM job_holds('job-k', 'k2');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-k';
SELECT state, last_error, replayed FROM billing_job_cancel('job-k', jid('job-k', 'k1'), 'again');
SELECT * FROM job_history('job-k', 'k1');
SELECT regress_error($$SELECT billing_job_complete('job-k', jid('job-k', 'k1'), 1, NULL, 'job-w9')$$);
SELECT regress_error($$SELECT billing_job_heartbeat('job-k', jid('job-k', 'k1'), 'job-w9')$$);
SELECT regress_error($$SELECT billing_job_fail('job-k', jid('job-k', 'k1'), 'x', worker => 'job-w9')$$);
SELECT regress_error($$SELECT billing_job_retry('job-k', jid('job-k', 'k1'))$$);
SELECT regress_error($$SELECT billing_job_cancel('job-a', jid('job-a', 'a1'))$$);
SELECT balance, on_hold FROM billing.balances WHERE tenant_id = 'job-k';
-- the jobs left open above are cancelled the same way (b3 queued, b4 and
-- job-c's c1 processing; job-b's a1 and b2 complete below)
SELECT idempotency_key, state FROM billing_job_cancel('job-b', jid('job-b', 'b3'));
SELECT idempotency_key, state FROM billing_job_cancel('job-b', jid('job-b', 'b4'));
SELECT idempotency_key, state FROM billing_job_cancel('job-c', jid('job-c', 'c1'));
SELECT idempotency_key, state FROM billing_job_complete('job-b', jid('job-b', 'a1'), 0.5, NULL, 'job-w3');
SELECT idempotency_key, state FROM billing_job_complete('job-b', jid('job-b', 'b2'), 1, NULL, 'job-w3');

--
-- Rescue: a processing job whose lease has expired (lease_until moved
-- into the past; processing -> processing is a legal update) counts as a
-- failed attempt: queued again with backoff, the hold kept, or failed with
-- the hold released when no attempt is left.  The worker that lost the
-- lease then gets ZB073 from complete, heartbeat and fail.
--
SELECT tenant_id FROM billing_account_create('job-s');
SELECT balance_after FROM billing_credit('job-s', 20, 'job-s-topup');
SELECT idempotency_key FROM billing_job_submit('job-s', 'job-video', 's1', 5, max_attempts => 2);
SELECT idempotency_key FROM billing_job_submit('job-s', 'job-video', 's2', 5, max_attempts => 2);
SELECT idempotency_key, attempt, worker FROM billing_job_claim('job-w-slow', tenant_id => 'job-s');
SELECT idempotency_key, attempt, worker FROM billing_job_claim('job-w-ok', tenant_id => 'job-s');
UPDATE billing.jobs SET lease_until = now() - interval '1 minute'
 WHERE tenant_id = 'job-s' AND idempotency_key = 's1';
-- only s1 is rescued (s2's lease runs)
SELECT tenant_id, idempotency_key, state, attempt, worker, last_error, lease_until,
       run_at - now() BETWEEN interval '0.9 seconds' AND interval '1.1 seconds' AS backoff_1s
  FROM billing_job_rescue();
SELECT idempotency_key, state FROM billing.jobs WHERE tenant_id = 'job-s' ORDER BY job_id;
SELECT * FROM job_holds('job-s', 's1');
SELECT on_hold, available FROM billing.balances WHERE tenant_id = 'job-s';
SELECT regress_error($$SELECT billing_job_complete('job-s', jid('job-s', 's1'), 5, NULL, 'job-w-slow')$$);
SELECT regress_error($$SELECT billing_job_heartbeat('job-s', jid('job-s', 's1'), 'job-w-slow')$$);
SELECT regress_error($$SELECT billing_job_fail('job-s', jid('job-s', 's1'), 'x', worker => 'job-w-slow')$$);
-- another worker runs the second attempt; the slow worker still cannot
-- report for it
UPDATE billing.jobs SET run_at = now() WHERE tenant_id = 'job-s' AND idempotency_key = 's1';
SELECT idempotency_key, attempt, worker FROM billing_job_claim('job-w-fast', tenant_id => 'job-s');
SELECT regress_error($$SELECT billing_job_complete('job-s', jid('job-s', 's1'), 5, NULL, 'job-w-slow')$$);
-- the second attempt's lease runs out as well: no attempt left, failed
UPDATE billing.jobs SET lease_until = now() - interval '1 minute'
 WHERE tenant_id = 'job-s' AND idempotency_key = 's1';
SELECT idempotency_key, state, attempt, last_error FROM billing_job_rescue();
SELECT * FROM job_holds('job-s', 's1');
SELECT regress_error($$SELECT billing_job_complete('job-s', jid('job-s', 's1'), 5, NULL, 'job-w-fast')$$);
SELECT count(*) AS nothing_to_rescue FROM billing_job_rescue();
SELECT state, actual_cost FROM billing_job_complete('job-s', jid('job-s', 's2'), 5, NULL, 'job-w-ok');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-s';
SELECT * FROM job_history('job-s', 's1');
SELECT tenant_id, kind, error, failures, jobs FROM billing.job_failures
 WHERE tenant_id = 'job-s' ORDER BY error;

--
-- Complete after the hold expired: the cost is charged with a plain
-- deduct (kind 'deduct', no hold, metadata naming the job).  And a
-- complete whose charge is refused leaves the job processing and writes
-- nothing.  Two jobs with hold_ttl 1 second hold all of job-x's 10.
-- (A hold that close to its expiry is not extended by the claim.)
--
SELECT tenant_id FROM billing_account_create('job-x');
SELECT balance_after FROM billing_credit('job-x', 10, 'job-x-topup');
SELECT idempotency_key FROM billing_job_submit('job-x', 'job-video', 'x1', 2, hold_ttl => '1 second');
SELECT idempotency_key FROM billing_job_submit('job-x', 'job-video', 'x2', 8, hold_ttl => '1 second');
SELECT idempotency_key, attempt FROM billing_job_claim('job-w-x', max_jobs => 2, tenant_id => 'job-x')
 ORDER BY job_id;
SELECT trace_id, expires_at < now() + interval '1 second' AS not_extended
  FROM billing.holds WHERE tenant_id = 'job-x' ORDER BY hold_id;
-- (what they hold: whether the view still counts them depends on how fast
-- the machine got here, so the view is read after the expiry only)
SELECT sum(amount_micros) AS held_micros FROM billing.holds WHERE tenant_id = 'job-x';
SELECT pg_sleep(1.2);
SELECT on_hold, available FROM billing.balances WHERE tenant_id = 'job-x';
-- x1 costs 2.50 (more than its old estimate): deducted.  The deduct is no
-- new request (the hold counted it at submit): with 2 requests a day, both
-- taken by the submits, it is not refused (ZB040)
SELECT count(*) FROM billing_limits_set('job-x', daily_requests => 2);
SELECT requests_today FROM billing.quota_usage WHERE tenant_id = 'job-x';
SELECT state, actual_cost, replayed, charge_entry_id IS NOT NULL AS charged
  FROM billing_job_complete('job-x', jid('job-x', 'x1'), 2.5, NULL, 'job-w-x');
SELECT l.trace_id, l.kind, l.amount, l.balance_after, l.hold_id, l.description,
       l.metadata = jsonb_build_object('job_id', j.job_id, 'kind', 'job-video') AS metadata_names_job
  FROM billing.ledger l JOIN billing.jobs j ON j.tenant_id = l.tenant_id AND j.charge_entry_id = l.entry_id
 WHERE j.tenant_id = 'job-x' AND j.idempotency_key = 'x1';
SELECT * FROM job_holds('job-x', 'x1');
SELECT requests_today FROM billing.quota_usage WHERE tenant_id = 'job-x';
-- x2 costs 9, but only 7.50 are left: ZB004, x2 stays processing, its
-- charge is not in the ledger and no transition is logged
SELECT regress_error($$SELECT billing_job_complete('job-x', jid('job-x', 'x2'), 9, NULL, 'job-w-x')$$);
SELECT state, actual_micros, charge_entry_id, finished_at FROM billing.jobs
 WHERE tenant_id = 'job-x' AND idempotency_key = 'x2';
SELECT count(*) AS charge_entries FROM billing.entries
 WHERE tenant_id = 'job-x' AND trace_id = format('job:%s:charge', jid('job-x', 'x2'));
SELECT * FROM job_history('job-x', 'x2');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-x';
-- the caller may fail it instead (its hold has expired: nothing to release)
SELECT state, attempt FROM billing_job_fail('job-x', jid('job-x', 'x2'), 'no funds', retryable => false,
                                           worker => 'job-w-x');
SELECT * FROM job_holds('job-x', 'x2');

-- With the hold open, a cost above the estimate whose excess the available
-- funds do not cover is refused with ZB033: the job stays processing, the
-- hold stays open, nothing is charged.  An excess that fits is charged.
SELECT tenant_id FROM billing_account_create('job-y');
SELECT balance_after FROM billing_credit('job-y', 5, 'job-y-topup');
SELECT idempotency_key FROM billing_job_submit('job-y', 'job-video', 'y1', 4);
SELECT idempotency_key, attempt FROM billing_job_claim('job-w-y', tenant_id => 'job-y');
SELECT regress_error($$SELECT billing_job_complete('job-y', jid('job-y', 'y1'), 6, NULL, 'job-w-y')$$);
SELECT state, actual_micros, charge_entry_id FROM billing.jobs
 WHERE tenant_id = 'job-y' AND idempotency_key = 'y1';
SELECT * FROM job_holds('job-y', 'y1');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-y';
SELECT count(*) AS entries FROM billing.entries WHERE tenant_id = 'job-y';
SELECT state, actual_cost FROM billing_job_complete('job-y', jid('job-y', 'y1'), 5, NULL, 'job-w-y');
SELECT * FROM job_holds('job-y', 'y1');
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-y';

--
-- Direct writes to billing.jobs, as the table owner (superuser here): the
-- trigger billing.job_guard allows only the transitions of the diagram
-- (ZB070 naming from and to), keeps the billing invariants (ZB072) and the
-- identity of a job; DELETE and TRUNCATE are refused (ZB020).
-- job-d has a job in each state.
--
SELECT tenant_id FROM billing_account_create('job-d');
SELECT balance_after FROM billing_credit('job-d', 50, 'job-d-topup');
SELECT idempotency_key FROM billing_job_submit('job-d', 'job-misc', 'd-done', 1);
SELECT idempotency_key FROM billing_job_claim('job-w-d', tenant_id => 'job-d');
SELECT state FROM billing_job_complete('job-d', jid('job-d', 'd-done'), 1, NULL, 'job-w-d');
SELECT idempotency_key FROM billing_job_submit('job-d', 'job-misc', 'd-failed', 1);
SELECT idempotency_key FROM billing_job_claim('job-w-d', tenant_id => 'job-d');
SELECT state FROM billing_job_fail('job-d', jid('job-d', 'd-failed'), 'x', false, 'job-w-d');
SELECT idempotency_key FROM billing_job_submit('job-d', 'job-misc', 'd-cancelled', 1);
SELECT state FROM billing_job_cancel('job-d', jid('job-d', 'd-cancelled'));
SELECT idempotency_key FROM billing_job_submit('job-d', 'job-misc', 'd-processing', 1, input => '{"n": 1}');
SELECT idempotency_key FROM billing_job_claim('job-w-d', tenant_id => 'job-d');
SELECT idempotency_key FROM billing_job_submit('job-d', 'job-misc', 'd-queued', 1, input => '{"n": 2}');
SELECT job_id - 140000 AS job_no, idempotency_key, state FROM billing.jobs
 WHERE tenant_id = 'job-d' ORDER BY job_id;
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-d';

-- illegal transitions: ZB070 names from and to; completed and cancelled
-- are final (any update of them is refused), failed only goes to queued
SELECT label, regress_error(sql) AS error
  FROM (VALUES
    ('queued -> completed',    $$UPDATE billing.jobs SET state = 'completed' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued'$$),
    ('queued -> failed',       $$UPDATE billing.jobs SET state = 'failed' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued'$$),
    ('completed -> queued',    $$UPDATE billing.jobs SET state = 'queued' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-done'$$),
    ('completed -> completed', $$UPDATE billing.jobs SET output = '{"edited": true}' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-done'$$),
    ('cancelled -> processing', $$UPDATE billing.jobs SET state = 'processing' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-cancelled'$$),
    ('cancelled -> queued',    $$UPDATE billing.jobs SET state = 'queued' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-cancelled'$$),
    ('failed -> completed',    $$UPDATE billing.jobs SET state = 'completed' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-failed'$$),
    ('failed -> processing',   $$UPDATE billing.jobs SET state = 'processing' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-failed'$$),
    ('failed -> cancelled',    $$UPDATE billing.jobs SET state = 'cancelled' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-failed'$$),
    ('failed -> failed',       $$UPDATE billing.jobs SET last_error = 'edited' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-failed'$$)
  ) AS t(label, sql);
-- invariants (ZB072): completed needs its charge, a debit entry of this
-- tenant; failed and cancelled need the hold closed
SELECT entry_id AS d_topup_entry FROM billing.entries WHERE tenant_id = 'job-d' AND trace_id = 'job-d-topup' \gset
SELECT charge_entry_id AS a1_charge_entry FROM billing.jobs WHERE tenant_id = 'job-a' AND idempotency_key = 'a1' \gset
SELECT label, regress_error(sql) AS error
  FROM (VALUES
    ('completed, no charge',
     $$UPDATE billing.jobs SET state = 'completed' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-processing'$$),
    ('completed, actual cost but no charge',
     $$UPDATE billing.jobs SET state = 'completed', actual_micros = 1000000 WHERE tenant_id = 'job-d' AND idempotency_key = 'd-processing'$$),
    ('completed, charge = a credit entry',
     format($$UPDATE billing.jobs SET state = 'completed', actual_micros = 1000000, charge_entry_id = %s WHERE tenant_id = 'job-d' AND idempotency_key = 'd-processing'$$, :d_topup_entry)),
    ('completed, charge = another tenant''s debit',
     format($$UPDATE billing.jobs SET state = 'completed', actual_micros = 1500000, charge_entry_id = %s WHERE tenant_id = 'job-d' AND idempotency_key = 'd-processing'$$, :a1_charge_entry)),
    ('completed, charge = no entry',
     $$UPDATE billing.jobs SET state = 'completed', actual_micros = 1000000, charge_entry_id = 999999999 WHERE tenant_id = 'job-d' AND idempotency_key = 'd-processing'$$),
    ('processing -> failed, hold open',
     $$UPDATE billing.jobs SET state = 'failed' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-processing'$$),
    ('processing -> cancelled, hold open',
     $$UPDATE billing.jobs SET state = 'cancelled' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-processing'$$),
    ('queued -> cancelled, hold open',
     $$UPDATE billing.jobs SET state = 'cancelled' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued'$$)
  ) AS t(label, sql);
-- identity: tenant_id, job_id, idempotency_key, kind and input never
-- change (ZB072), whatever the state
SELECT label, regress_error(sql) AS error
  FROM (VALUES
    ('kind',            $$UPDATE billing.jobs SET kind = 'job-other' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued'$$),
    ('input',           $$UPDATE billing.jobs SET input = '{"n": 3}' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued'$$),
    ('idempotency_key', $$UPDATE billing.jobs SET idempotency_key = 'd-other' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued'$$),
    ('tenant_id',       $$UPDATE billing.jobs SET tenant_id = 'job-a' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued'$$),
    ('job_id',          $$UPDATE billing.jobs SET job_id = job_id + 1000 WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued'$$),
    ('input, processing', $$UPDATE billing.jobs SET input = '{}' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-processing'$$)
  ) AS t(label, sql);
-- A job row may be inserted directly in any state (that is how pg_restore
-- brings jobs back), but only with its invariants: a completed job needs its
-- own charge, and no finished job may keep an open hold (ZB072).  Such an
-- insert carries no note, so nothing is logged (a restore brings the log).
BEGIN;
SELECT label, regress_error(sql) AS error
  FROM (VALUES
    ('completed, no charge', $$INSERT INTO billing.jobs (tenant_id, idempotency_key, kind, state, attempt, estimated_micros, actual_micros)
                     VALUES ('job-d', 'd-ins-1', 'job-misc', 'completed', 1, 1000000, 1000000)$$),
    ('completed at cost 0, hold open', $$INSERT INTO billing.jobs (tenant_id, idempotency_key, kind, state, attempt, estimated_micros, actual_micros, hold_trace_id)
                     VALUES ('job-d', 'd-ins-2', 'job-misc', 'completed', 1, 1000000, 0,
                             (SELECT hold_trace_id FROM billing.jobs WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued'))$$),
    ('failed, hold open', $$INSERT INTO billing.jobs (tenant_id, idempotency_key, kind, state, attempt, estimated_micros, hold_trace_id)
                     VALUES ('job-d', 'd-ins-3', 'job-misc', 'failed', 1, 1000000,
                             (SELECT hold_trace_id FROM billing.jobs WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued'))$$),
    ('processing, as restored', $$INSERT INTO billing.jobs (tenant_id, idempotency_key, kind, state, attempt, estimated_micros)
                     VALUES ('job-d', 'd-ins-4', 'job-misc', 'processing', 1, 1000000)$$)
  ) AS t(label, sql);
SELECT idempotency_key, state,
       (SELECT count(*) FROM billing.job_events e WHERE e.tenant_id = j.tenant_id AND e.job_id = j.job_id) AS logged
  FROM billing.jobs j WHERE tenant_id = 'job-d' AND idempotency_key LIKE 'd-ins-%';
ROLLBACK;
-- The rows of a COPY billing.jobs FROM (what pg_restore sends; pg_restore -j
-- loads the tables in no order) are checked against what is already there:
-- a charge entry that is not there (yet) is no error, one that is there
-- must be the job's own, a hold that is there must not be open.
-- billing_verify() checks every finished job against its charge and hold.
-- An INSERT naming a charge entry that does not exist is refused.  (Entry
-- 990001 is a top-up; the entry sequence is put back afterwards.)
SELECT last_value AS entry_last, is_called AS entry_called FROM billing.entry_id_seq \gset
BEGIN;
SELECT setval('billing.entry_id_seq', 990000);
SELECT entry_id FROM billing_credit('job-d', 1, 'd-copy-topup');
SELECT hold_id > 0 AS held FROM billing_hold('job-d', 1, 'd-copy-hold', expires_in => '1 hour');
COPY billing.jobs (tenant_id, job_id, idempotency_key, kind, state, attempt, estimated_micros, actual_micros, charge_entry_id) FROM STDIN;
job-d	990001	d-copy-1	job-misc	completed	1	1000000	1000000	990999
\.
SELECT state, charge_entry_id FROM billing.jobs WHERE tenant_id = 'job-d' AND idempotency_key = 'd-copy-1';
SELECT tenant_id, problem FROM billing_verify('job-d');
SAVEPOINT copy_own;
COPY billing.jobs (tenant_id, job_id, idempotency_key, kind, state, attempt, estimated_micros, actual_micros, charge_entry_id) FROM STDIN;
job-d	990002	d-copy-2	job-misc	completed	1	1000000	1000000	990001
\.
ROLLBACK TO SAVEPOINT copy_own;
SAVEPOINT copy_hold;
COPY billing.jobs (tenant_id, job_id, idempotency_key, kind, state, attempt, estimated_micros, hold_trace_id) FROM STDIN;
job-d	990003	d-copy-3	job-misc	failed	1	1000000	d-copy-hold
\.
ROLLBACK TO SAVEPOINT copy_hold;
SELECT regress_error($$INSERT INTO billing.jobs (tenant_id, job_id, idempotency_key, kind, state, attempt, estimated_micros, actual_micros, charge_entry_id)
                       VALUES ('job-d', 990004, 'd-ins-6', 'job-misc', 'completed', 1, 1000000, 1000000, 990999)$$) AS error;
ROLLBACK;
SELECT setval('billing.entry_id_seq', :entry_last, :'entry_called') > 0 AS entry_seq_restored;
-- jobs are never deleted, the job log never rewritten (ZB020)
SELECT label, regress_error(sql) AS error
  FROM (VALUES
    ('DELETE jobs',        $$DELETE FROM billing.jobs WHERE tenant_id = 'job-d' AND idempotency_key = 'd-cancelled'$$),
    ('TRUNCATE jobs',      $$TRUNCATE billing.jobs$$),
    ('UPDATE job_events',  $$UPDATE billing.job_events SET reason = 'edited' WHERE tenant_id = 'job-d'$$),
    ('DELETE job_events',  $$DELETE FROM billing.job_events WHERE tenant_id = 'job-d'$$),
    ('TRUNCATE job_events', $$TRUNCATE billing.job_events$$)
  ) AS t(label, sql);
-- the triggers fire in replica mode too (ENABLE ALWAYS)
SET session_replication_role = replica;
SELECT regress_error($$UPDATE billing.jobs SET state = 'completed' WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued'$$);
SELECT regress_error($$DELETE FROM billing.jobs WHERE tenant_id = 'job-d'$$);
RESET session_replication_role;
-- none of it changed anything
SELECT job_id - 140000 AS job_no, idempotency_key, kind, state, input, output, last_error
  FROM billing.jobs WHERE tenant_id = 'job-d' ORDER BY job_id;
SELECT count(*) AS events FROM billing.job_events WHERE tenant_id = 'job-d';
SELECT balance, on_hold, available FROM billing.balances WHERE tenant_id = 'job-d';
-- the legal ones work (as the functions use them): queued -> queued,
-- processing -> processing, and the whole path through the functions
UPDATE billing.jobs SET run_at = now() WHERE tenant_id = 'job-d' AND idempotency_key = 'd-queued';
UPDATE billing.jobs SET lease_until = now() + interval '1 minute'
 WHERE tenant_id = 'job-d' AND idempotency_key = 'd-processing';
SELECT state FROM billing_job_complete('job-d', jid('job-d', 'd-processing'), 1, NULL, 'job-w-d');
SELECT state FROM billing_job_cancel('job-d', jid('job-d', 'd-queued'));

--
-- Argument errors: a NULL required argument is ZB015, an out-of-range one
-- ZB018 (max_attempts 1 to 100, hold_ttl in (0, 31 days], run_at finite
-- and at most 30 days ahead, max_jobs 1 to 1000, lease in (0, 1 day]),
-- amounts follow the rules of amounts, an unknown job is ZB071 (jobs are
-- per tenant).  Nothing is written by any of them.
--
SELECT label, split_part(regress_error(sql), E'\n', 1) AS error
  FROM (VALUES
    ('submit tenant null',       $$SELECT billing_job_submit(NULL, 'job-misc', 'e1', 1)$$),
    ('submit kind null',         $$SELECT billing_job_submit('job-a', NULL, 'e1', 1)$$),
    ('submit key null',          $$SELECT billing_job_submit('job-a', 'job-misc', NULL, 1)$$),
    ('submit estimate null',     $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', NULL)$$),
    ('submit max_attempts null', $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, max_attempts => NULL)$$),
    ('submit hold_ttl null',     $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, hold_ttl => NULL)$$),
    ('submit max_attempts 0',    $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, max_attempts => 0)$$),
    ('submit max_attempts 101',  $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, max_attempts => 101)$$),
    ('submit hold_ttl 0',        $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, hold_ttl => '0')$$),
    ('submit hold_ttl negative', $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, hold_ttl => '-1 hour')$$),
    ('submit hold_ttl 32 days',  $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, hold_ttl => '32 days')$$),
    ('submit run_at infinity',   $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, run_at => 'infinity')$$),
    ('submit run_at -infinity',  $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, run_at => '-infinity')$$),
    ('submit run_at +31 days',   $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, run_at => now() + interval '31 days')$$),
    ('submit kind empty',        $$SELECT billing_job_submit('job-a', '', 'e1', 1)$$),
    ('submit key empty',         $$SELECT billing_job_submit('job-a', 'job-misc', '', 1)$$),
    ('submit estimate 0',        $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 0)$$),
    ('submit estimate -1',       $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', -1)$$),
    ('submit estimate 7 decimals', $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 0.0000001)$$),
    ('submit estimate NaN',      $$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 'NaN')$$),
    ('submit unknown tenant',    $$SELECT billing_job_submit('job-nobody', 'job-misc', 'e1', 1)$$),
    ('claim worker null',        $$SELECT billing_job_claim(NULL)$$),
    ('claim max_jobs null',      $$SELECT billing_job_claim('job-w', max_jobs => NULL)$$),
    ('claim lease null',         $$SELECT billing_job_claim('job-w', lease => NULL)$$),
    ('claim max_jobs 0',         $$SELECT billing_job_claim('job-w', max_jobs => 0)$$),
    ('claim max_jobs 1001',      $$SELECT billing_job_claim('job-w', max_jobs => 1001)$$),
    ('claim lease 0',            $$SELECT billing_job_claim('job-w', lease => '0')$$),
    ('claim lease 2 days',       $$SELECT billing_job_claim('job-w', lease => '2 days')$$),
    ('heartbeat tenant null',    $$SELECT billing_job_heartbeat(NULL, 1, 'job-w')$$),
    ('heartbeat job null',       $$SELECT billing_job_heartbeat('job-a', NULL, 'job-w')$$),
    ('heartbeat lease 0',        $$SELECT billing_job_heartbeat('job-a', jid('job-a', 'a1'), 'job-w1', lease => '0')$$),
    ('heartbeat lease 2 days',   $$SELECT billing_job_heartbeat('job-a', jid('job-a', 'a1'), 'job-w1', lease => '2 days')$$),
    ('heartbeat unknown job',    $$SELECT billing_job_heartbeat('job-a', 999999999, 'job-w1')$$),
    ('complete tenant null',     $$SELECT billing_job_complete(NULL, 1, 1)$$),
    ('complete job null',        $$SELECT billing_job_complete('job-a', NULL, 1)$$),
    ('complete actual null',     $$SELECT billing_job_complete('job-a', jid('job-a', 'a1'), NULL)$$),
    ('complete actual -1',       $$SELECT billing_job_complete('job-a', jid('job-a', 'a1'), -1)$$),
    ('complete actual NaN',      $$SELECT billing_job_complete('job-a', jid('job-a', 'a1'), 'NaN')$$),
    ('complete actual 7 decimals', $$SELECT billing_job_complete('job-a', jid('job-a', 'a1'), 0.0000001)$$),
    ('complete unknown job',     $$SELECT billing_job_complete('job-a', 999999999, 1)$$),
    ('complete job of another tenant', $$SELECT billing_job_complete('job-b', jid('job-a', 'a1'), 1.5)$$),
    ('fail tenant null',         $$SELECT billing_job_fail(NULL, 1, 'x')$$),
    ('fail retryable null',      $$SELECT billing_job_fail('job-a', jid('job-a', 'a1'), 'x', retryable => NULL)$$),
    ('fail unknown job',         $$SELECT billing_job_fail('job-a', 999999999, 'x')$$),
    ('cancel job null',          $$SELECT billing_job_cancel('job-a', NULL)$$),
    ('cancel unknown job',       $$SELECT billing_job_cancel('job-a', 999999999)$$),
    ('retry tenant null',        $$SELECT billing_job_retry(NULL, 1)$$),
    ('retry unknown job',        $$SELECT billing_job_retry('job-a', 999999999)$$),
    ('retry unknown tenant',     $$SELECT billing_job_retry('job-nobody', 1)$$),
    ('rescue max_jobs 0',        $$SELECT billing_job_rescue(0)$$),
    ('rescue max_jobs 10001',    $$SELECT billing_job_rescue(10001)$$)
  ) AS t(label, sql);
-- input and output must be JSON objects (ZB018)
SELECT split_part(regress_error($$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, input => '[1]')$$),
                  ':', 1) AS input_array,
       split_part(regress_error($$SELECT billing_job_complete('job-a', jid('job-a', 'a1'), 1.5, '"done"')$$),
                  ':', 1) AS output_string;
-- two of them in full
SELECT regress_error($$SELECT billing_job_submit('job-a', 'job-misc', 'e1', 1, max_attempts => 0)$$);
SELECT regress_error($$SELECT billing_job_complete('job-a', 999999999, 1)$$);
SELECT count(*) AS jobs FROM billing.jobs WHERE idempotency_key = 'e1' OR tenant_id = 'job-nobody';
SELECT state, actual_micros, output FROM billing.jobs WHERE tenant_id = 'job-a' AND idempotency_key = 'a1';

--
-- The views, for the jobs of this file (only counts, kinds and states:
-- times depend on the clock).
--
SELECT tenant_id, kind, state, jobs, (next_run_at IS NOT NULL) AS has_next_run_at
  FROM billing.jobs_by_state WHERE tenant_id LIKE 'job-%' ORDER BY tenant_id, kind, state;
SELECT tenant_id, kind, error, failures, jobs
  FROM billing.job_failures WHERE tenant_id LIKE 'job-%' ORDER BY tenant_id, kind, error;
SELECT tenant_id, kind, completed_jobs, estimated, actual, actual_to_estimate
  FROM billing.job_costs WHERE tenant_id LIKE 'job-%' ORDER BY tenant_id, kind;
SELECT kind, state, spans, avg_time >= interval '0' AS has_times
  FROM billing.job_time_in_state WHERE kind LIKE 'job-%' ORDER BY kind, state;

-- the retried f2 is still queued: cancel it, so that no job of this file
-- is left open
SELECT idempotency_key, state FROM billing_job_cancel('job-f', jid('job-f', 'f2'));

--
-- The backoff waits at most 30 days, as submit's run_at may: the hold (at
-- most 31 days from now) then outlives the wait.  Attempt 45 of 100 (set by
-- hand; attempt^4 seconds would be about 47 days) waits exactly 30 days.
--
SELECT tenant_id FROM billing_account_create('job-bk');
SELECT balance_after FROM billing_credit('job-bk', 20, 'job-bk-topup');
SELECT idempotency_key FROM billing_job_submit('job-bk', 'job-video', 'bk1', 4, max_attempts => 100);
SELECT attempt FROM billing_job_claim('job-wb', tenant_id => 'job-bk');
UPDATE billing.jobs SET attempt = 45 WHERE tenant_id = 'job-bk' AND idempotency_key = 'bk1';
SELECT state, attempt, run_at - now() AS backoff
  FROM billing_job_fail('job-bk', jid('job-bk', 'bk1'), 'upstream 503', retryable => true, worker => 'job-wb');
SELECT h.expires_at >= j.run_at + j.hold_ttl
           AND h.expires_at < j.run_at + j.hold_ttl + interval '1 minute' AS hold_until_run_at_plus_ttl,
       h.expires_at - now() <= interval '31 days' AS at_most_31_days
  FROM billing.jobs j JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id = j.hold_trace_id
 WHERE j.tenant_id = 'job-bk' AND j.idempotency_key = 'bk1';

--
-- The ledger of this file's tenants is consistent, and the job invariants
-- hold for every job of this file: a completed job's charge is a debit of its tenant for exactly
-- its actual cost under trace id job:<job_id>:charge (or there is no
-- charge and the actual cost is 0); no finished job keeps an open hold;
-- every transition of a job is logged, the last one being its state.
--
SELECT * FROM billing_verify() WHERE tenant_id LIKE 'job-%';
SELECT j.tenant_id, j.idempotency_key, j.state, j.actual_micros, e.amount_micros, e.trace_id
  FROM billing.jobs j
  LEFT JOIN billing.entries e ON e.tenant_id = j.tenant_id AND e.entry_id = j.charge_entry_id
 WHERE j.tenant_id LIKE 'job-%' AND j.state = 'completed'
   AND NOT (CASE WHEN j.charge_entry_id IS NULL THEN j.actual_micros = 0
                 ELSE e.amount_micros = -j.actual_micros
                      AND e.trace_id = format('job:%s:charge', j.job_id) END);
SELECT j.tenant_id, j.idempotency_key, j.state, h.trace_id, h.status
  FROM billing.jobs j
  JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id LIKE format('job:%s:%%', j.job_id)
 WHERE j.tenant_id LIKE 'job-%' AND j.state IN ('completed', 'failed', 'cancelled')
   AND h.status = 'open' AND h.expires_at > now();
SELECT j.tenant_id, j.idempotency_key, j.state, e.to_state AS last_logged
  FROM billing.jobs j
  LEFT JOIN LATERAL (SELECT e.to_state FROM billing.job_events e
                      WHERE e.tenant_id = j.tenant_id AND e.job_id = j.job_id
                      ORDER BY e.event_id DESC LIMIT 1) e ON true
 WHERE j.tenant_id LIKE 'job-%' AND e.to_state IS DISTINCT FROM j.state;
SELECT state, count(*) AS jobs FROM billing.jobs WHERE tenant_id LIKE 'job-%' GROUP BY state ORDER BY state;

DROP FUNCTION jid(text, text);
DROP FUNCTION job_holds(text, text);
DROP FUNCTION job_history(text, text);
DROP FUNCTION plan_text(text);

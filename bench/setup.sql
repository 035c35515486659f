/*
 * bench/setup.sql -- the data every workload runs on; bench/run.sh loads it
 * once into database "bench_template" with psql variables :tenants and
 * :seeds, and every run gets a fresh copy of it ("bench").
 */
\set ON_ERROR_STOP 1
SET client_min_messages = warning;

-- :billing_version (optional) installs an earlier release, as a baseline
\if :{?billing_version}
CREATE EXTENSION billing VERSION :'billing_version';
\else
CREATE EXTENSION billing;
\endif

-- baseline (1): bare one-row INSERT with a unique text key
CREATE TABLE bench_insert (id bigserial PRIMARY KEY, k text NOT NULL UNIQUE);

-- baseline (2): UPDATE of one hot row
CREATE TABLE bench_hot (id int PRIMARY KEY, n bigint NOT NULL);
INSERT INTO bench_hot VALUES (1, 0);

-- baseline (3): the PL/pgSQL deduct, on tenants t1 .. t<tenants>, each with
-- a top-up entry of 1e9 and the same seed charges as billing below (so both
-- ledgers hold the same rows when they are analyzed, and get the same plans)
\ir plpgsql_deduct.sql
INSERT INTO plb.accounts (tenant_id, balance, version)
SELECT 't' || t, 1000000000, 1 FROM generate_series(1, :tenants) t;
INSERT INTO plb.entries (tenant_id, trace_id, amount, balance_after, version)
SELECT tenant_id, 'load-' || tenant_id, balance, balance, 1 FROM plb.accounts;
SELECT count(plb.deduct('t' || ((s - 1) % :tenants + 1), (s % 997 + 1) * 0.000001,
                        'seed-' || s)) AS plb_seeds
  FROM generate_series(1, :seeds) s;

-- billing: tenants t1 .. t<tenants> plus "hot", each topped up with 1e9
SELECT count(*) AS accounts
  FROM generate_series(1, :tenants) t, billing_account_create('t' || t) a;
SELECT count(*) AS accounts FROM billing_account_create('hot');
SELECT count(billing_credit(a.tenant_id, 1000000000, 'load-' || a.tenant_id)) AS topups
  FROM billing.accounts a;

-- replay targets of the 20 % replay mix (workloads/deduct_mix.sql):
-- seed s charged tenant t((s - 1) % tenants + 1) for (s % 997 + 1) micro-units
SELECT count(billing_deduct('t' || ((s - 1) % :tenants + 1), (s % 997 + 1) * 0.000001,
                            'seed-' || s)) AS seeds
  FROM generate_series(1, :seeds) s;

-- Settled holds and finished jobs (hold_capture, job_lifecycle): without
-- them billing.holds, hold_events, jobs and job_events would be empty when
-- analyzed, and a backend plans its saved queries on them once, for its
-- whole life.  A plan made for an empty table (e.g. a sequential scan of
-- hold_events for the trace id probe) gets slower with every row the run
-- adds, and the first run on a fresh copy would measure that, not the steady
-- state.  Released holds and cancelled jobs write no ledger entry, so both
-- ledgers above stay alike.
SELECT count(billing_hold('t' || ((s - 1) % :tenants + 1), (s % 997 + 1) * 0.000001, 'sh-' || s,
                          expires_in => '1 second')) AS seed_holds
  FROM generate_series(1, :seeds) s;
SELECT count(billing_release('t' || ((s - 1) % :tenants + 1), 'sh-' || s, 'sr-' || s)) AS released
  FROM generate_series(1, :seeds) s;
SELECT count(billing_job_cancel(j.tenant_id, j.job_id, 'bench seed')) AS seed_jobs
  FROM generate_series(1, :seeds) s,
       billing_job_submit('t' || ((s - 1) % :tenants + 1), 'seed', 'seed-job-' || s, (s % 997 + 1) * 0.000001,
                          hold_ttl => '1 second') j;
-- An account remembers the earliest expiry of its holds, settled or not,
-- until a call after that time looks again.  Let that time pass and look
-- now: otherwise the first call on every account (or the worker's
-- maintenance) would do it in whichever run comes after the expiry.
SELECT pg_sleep(1.1);
SELECT billing.expire_due_holds(:tenants + 1) AS accounts_looked_at;
SELECT count(*) AS accounts_with_an_expiry_pending FROM billing.accounts WHERE holds_next_expiry IS NOT NULL;

VACUUM ANALYZE;

/*
 * bench/setup.sql -- the data every workload runs on; bench/run.sh loads it
 * into a fresh database "bench" with psql variables :tenants and :seeds.
 */
\set ON_ERROR_STOP 1
SET client_min_messages = warning;

CREATE EXTENSION billing;

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

VACUUM ANALYZE;

--
-- 180_guards: the DROP guard holds for every way the extension can be
-- dropped, not only DROP EXTENSION, and account time zones are names of the
-- tz database, never abbreviations.  Tenants start with "gd-".
--
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT tenant_id FROM billing_account_create('gd-a');
SELECT balance_after FROM billing_credit('gd-a', 10, 'gd-a-top');
SHOW billing.allow_drop;

-- DROP EXTENSION: refused (ZB021), as since 1.1
DROP EXTENSION billing;
\echo :LAST_ERROR_SQLSTATE

-- DROP SCHEMA public CASCADE would cascade to the extension (it depends on
-- its install schema): refused (ZB021), nothing is dropped.  (The NOTICE
-- "drop cascades to extension billing" lists this database's other objects
-- in public too: not shown.)
BEGIN;
SET LOCAL client_min_messages = warning;
DROP SCHEMA public CASCADE;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
SELECT extname, extversion FROM pg_extension WHERE extname = 'billing';
SELECT billing_balance('gd-a');

-- the same for a cascade from another extension the functions depend on
BEGIN;
SET LOCAL client_min_messages = warning;
DROP EXTENSION plpgsql CASCADE;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- the schema billing cannot be dropped on its own (PostgreSQL: 2BP01)
BEGIN;
DROP SCHEMA billing CASCADE;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;

-- DROP OWNED BY the extension's owner: refused (ZB021).  (Here the
-- extension is re-created by another role than the bootstrap superuser,
-- whose objects DROP OWNED refuses anyway; all rolled back.)
CREATE ROLE regress_gd_owner SUPERUSER;
BEGIN;
SET LOCAL billing.allow_drop = on;
DROP EXTENSION billing;
SET LOCAL billing.allow_drop = off;
SET LOCAL ROLE regress_gd_owner;
CREATE EXTENSION billing;
RESET ROLE;
SELECT extowner::regrole FROM pg_extension WHERE extname = 'billing';
DROP OWNED BY regress_gd_owner CASCADE;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
DROP ROLE regress_gd_owner;

-- a non-superuser who owns the install schema cannot drop it with the
-- ledger either; billing.allow_drop is for superusers only (42501)
CREATE ROLE regress_gd_schema_owner;
BEGIN;
ALTER SCHEMA public OWNER TO regress_gd_schema_owner;
SET LOCAL ROLE regress_gd_schema_owner;
SET billing.allow_drop = on;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
BEGIN;
ALTER SCHEMA public OWNER TO regress_gd_schema_owner;
SET LOCAL ROLE regress_gd_schema_owner;
SET LOCAL client_min_messages = warning;
DROP SCHEMA public CASCADE;
\echo :LAST_ERROR_SQLSTATE
ROLLBACK;
DROP ROLE regress_gd_schema_owner;

-- other schemas drop as before, with CASCADE too, and so do other objects
CREATE SCHEMA gd_other;
CREATE TABLE gd_other.t (x int);
CREATE VIEW gd_other.v AS SELECT x FROM gd_other.t;
DROP SCHEMA gd_other CASCADE;
CREATE TABLE gd_t (x int);
DROP TABLE gd_t;
SELECT count(*) AS gd_other FROM pg_namespace WHERE nspname = 'gd_other';

-- with billing.allow_drop = on the cascade goes through (rolled back here)
BEGIN;
SET LOCAL billing.allow_drop = on;
SET LOCAL client_min_messages = warning;
DROP SCHEMA public CASCADE;
SELECT count(*) AS billing_installed FROM pg_extension WHERE extname = 'billing';
ROLLBACK;
BEGIN;
SET LOCAL billing.allow_drop = on;
DROP EXTENSION billing;
SELECT count(*) AS billing_installed FROM pg_extension WHERE extname = 'billing';
ROLLBACK;
SHOW billing.allow_drop;

-- the extension and its ledger are all there
SELECT extname, extversion FROM pg_extension WHERE extname = 'billing';
SELECT evtname, evtevent FROM pg_event_trigger WHERE evtname LIKE 'billing%' ORDER BY 1;
SELECT billing_balance('gd-a');
SELECT count(*) AS verify_problems FROM billing_verify('gd-a');

-- Time zones: an abbreviation is refused (ZB018), whether PostgreSQL knows
-- it as one (IST, PST) or it is also a zone name (EST, CET): AT TIME ZONE
-- would read it from timezone_abbreviations, which differs between sessions.
SELECT regress_error($$SELECT billing_account_create('gd-tz', timezone => 'IST')$$);
SELECT regress_error($$SELECT billing_account_create('gd-tz', timezone => 'PST')$$);
SELECT regress_error($$SELECT billing_account_create('gd-tz', timezone => 'EST')$$);
SELECT regress_error($$SELECT billing_account_create('gd-tz', timezone => 'cet')$$);
SELECT regress_error($$SELECT billing_account_update('gd-a', timezone => 'IST')$$);
SELECT billing_account_create('gd-tz', timezone => 'PST');
\echo :LAST_ERROR_SQLSTATE
-- what makes it ambiguous: IST is +02 in the Default set, +05:30 in India
SELECT utc_offset FROM pg_timezone_abbrevs WHERE abbrev = 'IST';
SET timezone_abbreviations = 'India';
SELECT utc_offset FROM pg_timezone_abbrevs WHERE abbrev = 'IST';
SELECT regress_error($$SELECT billing_account_create('gd-tz', timezone => 'IST')$$);
RESET timezone_abbreviations;
-- neither POSIX zone strings nor the zone directory's local files
SELECT regress_error($$SELECT billing_account_create('gd-tz', timezone => 'XYZ5')$$);
SELECT regress_error($$SELECT billing_account_create('gd-tz', timezone => 'PST8')$$);
SELECT regress_error($$SELECT billing_account_create('gd-tz', timezone => 'localtime')$$);
SELECT regress_error($$SELECT billing_account_create('gd-tz', timezone => 'Mars/Olympus_Mons')$$);
SELECT count(*) AS created FROM billing.accounts WHERE tenant_id = 'gd-tz';

-- names of pg_timezone_names are taken, UTC and its aliases included
SELECT tenant_id, timezone FROM billing_account_create('gd-tz1', timezone => 'Asia/Kolkata');
SELECT tenant_id, timezone FROM billing_account_create('gd-tz2', timezone => 'Etc/GMT+5');
SELECT tenant_id, timezone FROM billing_account_create('gd-tz3', timezone => 'UTC');
SELECT tenant_id, timezone FROM billing_account_create('gd-tz4', timezone => 'GMT');
SELECT tenant_id, timezone FROM billing_account_create('gd-tz5', timezone => 'America/Los_Angeles');
SELECT tenant_id, timezone FROM billing_account_update('gd-a', timezone => 'America/New_York');
SELECT tenant_id, timezone FROM billing_account_update('gd-a', timezone => 'UTC');

-- an account that got an abbreviation before 1.3 keeps it and can still be
-- updated otherwise; only setting an abbreviation again is refused
BEGIN;
UPDATE billing.accounts SET timezone = 'IST' WHERE tenant_id = 'gd-tz5';
SELECT tenant_id, timezone, status FROM billing_account_update('gd-tz5', status => 'suspended');
ROLLBACK;

-- billing.redis_prefix: the Redis keys are <prefix>:{tenant}..., and Redis
-- Cluster hashes the first {...} of a key, so a brace in the prefix would
-- move the hash tag; such a value (or an empty one) is refused.
ALTER SYSTEM SET billing.redis_prefix = 'app{x}';
\echo :LAST_ERROR_SQLSTATE
ALTER SYSTEM SET billing.redis_prefix = '';
\echo :LAST_ERROR_SQLSTATE

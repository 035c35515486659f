# Bad-input fuzzing of every public billing_* function.
#
# FUZZ_CALLS calls (default 12000) are spread over every billing_* function
# of the extension schema (found in pg_proc, so a new function is fuzzed
# automatically; a parameter type the fuzzer has no pool for fails the test).
# Each argument is drawn from a pool of hostile and valid values: NULLs, NaN,
# +-Infinity, zero/negative amounts, 7+ decimals, 1e12 +- 0.000001, 1e300,
# huge integers, empty / 10 KB / emoji / combining / RTL / control-character /
# SQL-injection-looking text, unknown and existing tenants, trace ids, holds,
# keys and jobs, wrong jsonb shapes (arrays, scalars, 100 levels deep, 10 KB),
# extreme intervals and timestamps, NULL booleans, arrays with NULL elements.
# Every pool value is checked to cast cleanly before the run, so every error
# of a call comes from the extension itself.
#
# The fuzzer is PL/pgSQL inside the server (a procedure in the database
# billing_fuzz of the test's own node, billing preloaded): per call it builds
# the statement as text and runs it with EXECUTE inside BEGIN ... EXCEPTION
# WHEN OTHERS, tallying SQLSTATEs.  The pseudo-random choices are
# hashtextextended(call number / choice, seed): deterministic for a FUZZ_SEED,
# but the state the calls meet still depends on the clock (hold expiry,
# leases), so a failing statement is printed in full rather than only its
# call number.  It commits before each call of billing_charge (the charge
# engine refuses a transaction that has written: ZB110) and every 400 calls
# (so now() advances: holds expire,
# leases lapse) and then creates a fresh batch of tenants with money, limits,
# API keys, holds and jobs in every state, so that many calls get deep into
# the code.
#
# Pass: every call succeeds or raises a ZB SQLSTATE of the error table of
# docs/errors.md (its "| ZBnnn |" rows), or 40001.  Anything else
# (XX000, 23505, 22003, 42883, P0001, ...) is a failure and is printed with
# its statement.  Also: every billing_* function was called, billing_verify()
# returned no row after every chunk and at the end, the server accepts a new
# connection, and its log shows no crashed process.  The counts per SQLSTATE,
# per mode and per function are printed (note lines, prove -v shows them).
#
# Environment:
#   FUZZ_CALLS  number of calls (default 12000); long form, about 7 minutes:
#               FUZZ_CALLS=200000 BILLING_SKIP="regress isolation" \
#               BILLING_TESTS=040_fuzz PROVE_FLAGS=-v make check
#   FUZZ_SEED   the seed (default 20261122, printed); replay a failing run
#               with the printed FUZZ_SEED and FUZZ_CALLS
#   FUZZ_KEEP=1 keep the node's data directory (printed at the end; table
#               fz_log of database billing_fuzz has every call)
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use BillingTest;

my $calls = $ENV{FUZZ_CALLS} // 12000;
my $seed  = $ENV{FUZZ_SEED}  // 20261122;
BAIL_OUT('FUZZ_CALLS must be a number') unless $calls =~ /^[0-9]+$/;
BAIL_OUT('FUZZ_SEED must be an integer') unless $seed =~ /^-?[0-9]+$/;
my $db   = 'billing_fuzz';
my $repo = $ENV{BILLING_REPO} // $BillingTest::REPO;

# documented SQLSTATEs: the ZB codes of docs/errors.md's error table
my %zb = map { $_ => 1 } slurp_file("$repo/docs/errors.md") =~ /^\| (ZB[0-9A-Z]{3}) /mg;
BAIL_OUT("could not read the ZB SQLSTATE table from $repo/docs/errors.md")
  if keys(%zb) < 10;
my $allowed = '{' . join(',', '40001', sort keys %zb) . '}';

my $started = time;
note "fuzz: $calls calls, FUZZ_SEED=$seed, database $db";
note "allowed SQLSTATEs: $allowed";
my $node = BillingTest::node('fuzz', database => $db, extension => 0);

# run SQL (psql -f -, ON_ERROR_STOP); dies on an error; returns its output
# and notes what psql said on stderr (notices)
sub run_sql
{
	my ($sql, @psql_args) = @_;
	my ($out, $err) = ('', '');
	my $rc = $node->psql($db, $sql, stdout => \$out, stderr => \$err,
		extra_params => \@psql_args);
	note s/^psql:<stdin>:\d+: //r for grep { length } split /\n/, $err;
	die "psql failed (exit $rc)\n" if $rc != 0;
	return $out;
}

# the value pools and the fuzzer (PL/pgSQL)
run_sql(<<'SQL');
SET client_min_messages = warning;
CREATE EXTENSION billing;

-- value pools: expr is a SQL expression; '@pool:x@' draws from pool x;
-- @n@ (call number), @batch_*@ and @ctx_*@ are filled in per call.
-- good: a well-formed value that lets the call go on (the "all good" and
-- "one bad argument" modes draw the other arguments from these only).
\o /dev/null
CREATE TABLE fz_pool (id serial PRIMARY KEY, pool text NOT NULL, expr text NOT NULL,
                      weight int NOT NULL, good boolean NOT NULL, cum int, cum_good int);
CREATE UNLOGGED TABLE fz_log (n int PRIMARY KEY, fn text NOT NULL, mode text NOT NULL, state text NOT NULL,
                              ok boolean NOT NULL, stmt text, msg text);
CREATE UNLOGGED TABLE fz_chunk (chunk int PRIMARY KEY, last_call int, verify_rows bigint);

CREATE FUNCTION fz_good(p text, w int, VARIADIC exprs text[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO fz_pool (pool, expr, weight, good) SELECT p, e, w, true FROM unnest(exprs) e
$$;
CREATE FUNCTION fz_bad(p text, w int, VARIADIC exprs text[]) RETURNS void LANGUAGE sql AS $$
    INSERT INTO fz_pool (pool, expr, weight, good) SELECT p, e, w, false FROM unnest(exprs) e
$$;

-- hostile text, shared by every text parameter
SELECT fz_bad('junk', 1, 'NULL::text', $e$''::text$e$, $e$' '::text$e$, $e$repeat('x', 255)$e$,
    $e$repeat('x', 256)$e$, $e$repeat('x', 10240)$e$, $e$repeat('é', 255)$e$, $e$repeat('😀', 256)$e$,
    $e$'tenant-😀🔥'$e$, $e$E'e\u0301\u0301\u0301\u0301'$e$, $e$E'\u05e9\u05dc\u05d5\u05dd \u202eevil\u202c'$e$,
    $e$E'\x01'$e$, $e$E'a\tb'$e$, $e$E'line1\nline2'$e$, $e$E'\r\n'$e$, $e$E'\x7f\x1b[31mred'$e$,
    $e$'''; DROP TABLE billing.entries; --'$e$, $e$''' OR ''1''=''1'$e$, $e$'%s%s%s%s%n%n'$e$,
    $e$'%'$e$, $e$'\'$e$, $e$'"'$e$, $e$'Robert"); DROP TABLE students;--'$e$, $e$'NULL'$e$,
    $e$'{}'$e$, $e$'$1'$e$, $e$repeat(' ', 300)$e$, $e$'ＡＢＣ'$e$, $e$'\x00'$e$, $e$'job:1:1'$e$);

SELECT fz_good('tenant', 8, '@ctx_tenant@::text');
SELECT fz_good('tenant', 3, '@batch_a@::text');
SELECT fz_good('tenant', 1, '@batch_l@::text', '@batch_e@::text', $e$'fz-0-a'$e$);
SELECT fz_good('tenant', 1, $e$'fz-new-@n@'$e$);
SELECT fz_bad('tenant', 1, '@batch_s@::text', '@batch_c@::text', $e$'no-such-tenant'$e$);
SELECT fz_bad('tenant', 5, '@pool:junk@');
SELECT fz_good('tenant_ctx', 20, '@ctx_tenant@::text');
SELECT fz_good('tenant_ctx', 1, '@batch_a@::text');
SELECT fz_bad('tenant_ctx', 1, '@batch_s@::text', '@batch_c@::text', $e$'no-such-tenant'$e$);
SELECT fz_bad('tenant_ctx', 4, '@pool:junk@');

SELECT fz_good('trace', 6, $e$'fz-t-@n@@j@'$e$);
SELECT fz_good('trace', 3, '@ctx_trace@::text');
SELECT fz_good('trace', 1, $e$'fz-fixed'$e$);
SELECT fz_bad('trace', 1, '@ctx_hold_trace@::text', $e$'h-open'$e$);
SELECT fz_bad('trace', 4, '@pool:junk@');

SELECT fz_good('hold_trace', 8, '@ctx_hold_trace@::text');
SELECT fz_good('hold_trace', 1, $e$'h-open'$e$);
SELECT fz_bad('hold_trace', 1, $e$'h-short'$e$, $e$'no-such-hold'$e$, '@ctx_trace@::text');
SELECT fz_bad('hold_trace', 4, '@pool:junk@');

-- api_key (optional: NULL is fine) and key_id (required)
SELECT fz_good('api_key', 3, 'NULL::text');
SELECT fz_good('api_key', 5, '@ctx_key@::text');
SELECT fz_good('api_key', 1, $e$'k-budget'$e$, $e$'k-life'$e$, $e$'k-day'$e$, $e$'k-free'$e$);
SELECT fz_bad('api_key', 1, $e$'k-susp'$e$, $e$'k-rev'$e$, $e$'no-such-key'$e$);
SELECT fz_bad('api_key', 4, '@pool:junk@');
SELECT fz_good('key_id', 5, '@ctx_key@::text');
SELECT fz_good('key_id', 2, $e$'fz-k-@n@'$e$);
SELECT fz_good('key_id', 1, $e$'k-budget'$e$, $e$'k-life'$e$, $e$'k-free'$e$);
SELECT fz_bad('key_id', 1, $e$'k-susp'$e$, $e$'k-rev'$e$, $e$'no-such-key'$e$);
SELECT fz_bad('key_id', 4, '@pool:junk@');

SELECT fz_good('job_id', 10, '@ctx_job@::bigint');
SELECT fz_bad('job_id', 1, 'NULL::bigint', '0::bigint', '(-1)::bigint', '9223372036854775807::bigint',
    '(-9223372036854775808)::bigint', '999999::bigint');

SELECT fz_good('amount', 2, '1::numeric', '0.5::numeric', '2.5::numeric', '@ctx_amount@::numeric');
SELECT fz_good('amount', 1, '0.000001::numeric', '10::numeric', $e$'1.5000000'::numeric$e$);
SELECT fz_bad('amount', 1, '100::numeric', '999999999999.999999::numeric', $e$'1e12'::numeric$e$,
    'NULL::numeric', $e$'NaN'::numeric$e$, $e$'Infinity'::numeric$e$, $e$'-Infinity'::numeric$e$,
    '0::numeric', $e$'-0'::numeric$e$, '(-1)::numeric', '(-0.000001)::numeric', '0.0000001::numeric',
    '1.1234567::numeric', '1000000000000.000001::numeric', $e$'1e300'::numeric$e$, $e$'-1e300'::numeric$e$,
    $e$'1e-300'::numeric$e$, '99999999999999999999999999999::numeric', $e$'-1e12'::numeric$e$,
    '0.0000005::numeric');

SELECT fz_good('count', 3, 'NULL::bigint');
SELECT fz_good('count', 1, '3::bigint', '1000::bigint');
SELECT fz_bad('count', 1, '0::bigint', '1::bigint', '(-1)::bigint',
    '9223372036854775807::bigint', '(-9223372036854775808)::bigint');

SELECT fz_good('tokens', 3, '0::bigint', '1000::bigint', '1234::bigint');
SELECT fz_good('tokens', 1, '1::bigint', '567::bigint');
SELECT fz_bad('tokens', 1, 'NULL::bigint', '1000000::bigint', '(-1)::bigint',
    '9223372036854775807::bigint', '(-9223372036854775808)::bigint', '1000000000000000::bigint',
    '4611686018427387904::bigint');

SELECT fz_good('int', 2, '1::integer', '3::integer');
SELECT fz_good('int', 1, '10::integer', '100::integer');
SELECT fz_bad('int', 1, 'NULL::integer', '0::integer', '101::integer', '1000::integer', '1001::integer',
    '10000::integer', '10001::integer', '(-1)::integer', '2147483647::integer', '(-2147483648)::integer');

SELECT fz_good('interval', 2, $e$'15 minutes'::interval$e$, $e$'1 hour'::interval$e$);
SELECT fz_good('interval', 1, $e$'00:00:00.000001'::interval$e$, $e$'1 second'::interval$e$,
    $e$'1 day'::interval$e$, $e$'31 days'::interval$e$, $e$'744:00:00'::interval$e$);
SELECT fz_bad('interval', 1, 'NULL::interval', $e$'0'::interval$e$, $e$'-1 day'::interval$e$,
    $e$'1000000 years'::interval$e$, $e$'1 month'::interval$e$,
    $e$'31 days 00:00:00.000001'::interval$e$, $e$'-00:00:00.000001'::interval$e$,
    $e$'178000000 years'::interval$e$, $e$'-178000000 years'::interval$e$, $e$'1 day -1 second'::interval$e$,
    $e$'2 days -48 hours'::interval$e$, $e$'745:00:00'::interval$e$,
    $e$'-1 month 40 days'::interval$e$, $e$'2147483647 days'::interval$e$, $e$'2562047788:00:54.775807'::interval$e$);

SELECT fz_good('ts', 3, 'NULL::timestamptz', 'now()');
SELECT fz_good('ts', 1, $e$now() - interval '1 day'$e$, $e$'2026-01-01 00:00+00'::timestamptz$e$,
    $e$now() + interval '1 day'$e$);
SELECT fz_bad('ts', 1, $e$'infinity'::timestamptz$e$, $e$'-infinity'::timestamptz$e$,
    $e$'4713-01-01 BC'::timestamptz$e$, $e$'294276-12-31'::timestamptz$e$,
    $e$now() + interval '29 days'$e$, $e$'2000-01-01 00:00+00'::timestamptz$e$,
    $e$'1970-01-01 00:00+00'::timestamptz$e$);

SELECT fz_good('ts_req', 3, 'now()');
SELECT fz_good('ts_req', 1, $e$now() - interval '1 day'$e$, $e$'2026-01-01 00:00+00'::timestamptz$e$);
SELECT fz_bad('ts_req', 1, 'NULL::timestamptz');
SELECT fz_bad('ts_req', 2, '@pool:ts@');

SELECT fz_good('jsonb', 3, 'NULL::jsonb', $e$'{}'::jsonb$e$);
SELECT fz_good('jsonb', 2, $e$'{"model": "gpt-4o", "api_key": "k-budget", "input_tokens": 812}'::jsonb$e$);
SELECT fz_bad('jsonb', 1, $e$'[]'::jsonb$e$, $e$'1'::jsonb$e$, $e$'"x"'::jsonb$e$, $e$'null'::jsonb$e$,
    $e$'true'::jsonb$e$, $e$(repeat('[', 100) || repeat(']', 100))::jsonb$e$,
    $e$(repeat('{"a": ', 100) || '1' || repeat('}', 100))::jsonb$e$,
    $e$(SELECT jsonb_object_agg('k' || i, repeat('v', 5)) FROM generate_series(1, 1000) i)$e$,
    $e$'{"model": {"x": 1}, "input_tokens": "abc", "output_tokens": 1e400, "provider": null}'::jsonb$e$,
    $e$'{"😀\u202e": "\u0001", "": null}'::jsonb$e$, $e$'{"api_key": ["k1"], "model": 5}'::jsonb$e$);

SELECT fz_good('bool', 1, 'true', 'false');
SELECT fz_bad('bool', 1, 'NULL::boolean');

SELECT fz_good('kinds', 2, 'NULL::text[]', $e$'{translate}'::text[]$e$);
SELECT fz_good('kinds', 1, $e$'{render,translate}'::text[]$e$);
SELECT fz_bad('kinds', 1, $e$'{}'::text[]$e$, $e$'{NULL}'::text[]$e$, $e$'{translate,NULL}'::text[]$e$,
    $e$ARRAY[repeat('x', 10240)]$e$, $e$ARRAY[E'\x01', '😀', NULL]$e$, $e$'{{translate},{render}}'::text[]$e$);

SELECT fz_good('role', 1, $e$'postgres'::regrole$e$, $e$'pg_monitor'::regrole$e$);
SELECT fz_bad('role', 1, 'NULL::regrole');

SELECT fz_bad('credit_kind', 1, 'NULL::text');
SELECT fz_good('credit_kind', 1, $e$'topup'$e$, $e$'grant'$e$, $e$'refund'$e$, $e$'adjustment'$e$);
SELECT fz_bad('credit_kind', 1, $e$'deduct'$e$, $e$'capture'$e$, $e$'TOPUP'$e$);
SELECT fz_bad('credit_kind', 2, '@pool:junk@');
SELECT fz_bad('debit_kind', 1, 'NULL::text');
SELECT fz_good('debit_kind', 2, $e$'deduct'$e$);
SELECT fz_good('debit_kind', 1, $e$'adjustment'$e$);
SELECT fz_bad('debit_kind', 1, $e$'topup'$e$, $e$'grant'$e$, $e$'refund'$e$, $e$'capture'$e$, $e$'Deduct'$e$);
SELECT fz_bad('debit_kind', 2, '@pool:junk@');

SELECT fz_good('job_kind', 4, $e$'translate'$e$);
SELECT fz_good('job_kind', 1, $e$'render'$e$);
SELECT fz_bad('job_kind', 3, '@pool:junk@');

SELECT fz_good('currency', 3, 'NULL::text');
SELECT fz_good('currency', 2, $e$'USD'$e$);
SELECT fz_good('currency', 1, $e$'EUR'$e$);
SELECT fz_bad('currency', 1, $e$'usd'$e$, $e$'US'$e$, $e$'ABCDEFGHIJK'$e$, $e$'CREDITS'$e$);
SELECT fz_bad('currency', 3, '@pool:junk@');

SELECT fz_good('status', 3, 'NULL::text');
SELECT fz_good('status', 2, $e$'active'$e$);
SELECT fz_good('status', 1, $e$'suspended'$e$);
SELECT fz_bad('status', 1, $e$'closed'$e$, $e$'revoked'$e$, $e$'Active'$e$);
SELECT fz_bad('status', 3, '@pool:junk@');

SELECT fz_good('timezone', 3, 'NULL::text');
SELECT fz_good('timezone', 1, $e$'UTC'$e$, $e$'Europe/Berlin'$e$, $e$'Pacific/Kiritimati'$e$,
    $e$'America/St_Johns'$e$);
SELECT fz_bad('timezone', 1, $e$'+14'$e$, $e$'-14:30'$e$, $e$'Mars/Olympus'$e$, $e$'UTC+99999'$e$,
    $e$'posix/Asia/Kathmandu'$e$, $e$'EST5EDT,M3.2.0,M11.1.0'$e$, $e$'<+99>-99'$e$);
SELECT fz_bad('timezone', 3, '@pool:junk@');

SELECT fz_good('budget_period', 3, 'NULL::text');
SELECT fz_good('budget_period', 1, $e$'day'$e$, $e$'month'$e$, $e$'lifetime'$e$);
SELECT fz_bad('budget_period', 1, $e$'year'$e$, $e$'DAY'$e$);
SELECT fz_bad('budget_period', 3, '@pool:junk@');

SELECT fz_good('model', 4, $e$'fz-model'$e$);
SELECT fz_good('model', 1, $e$'fz-model-eur'$e$);
SELECT fz_bad('model', 1, $e$'no-such-model'$e$);
SELECT fz_bad('model', 3, '@pool:junk@');

SELECT fz_good('worker', 2, 'NULL::text');
SELECT fz_good('worker', 4, '@ctx_worker@::text');
SELECT fz_good('worker', 1, $e$'w1'$e$);
SELECT fz_bad('worker', 1, $e$'w-other'$e$);
SELECT fz_bad('worker', 3, '@pool:junk@');
SELECT fz_good('worker_req', 2, $e$'w1'$e$, $e$'w2'$e$);
SELECT fz_good('worker_req', 1, $e$'fz-w-@n@'$e$);
SELECT fz_bad('worker_req', 3, '@pool:junk@');

SELECT fz_good('idem', 5, $e$'fz-ik-@n@'$e$);
SELECT fz_good('idem', 3, '@ctx_idem@::text');
SELECT fz_bad('idem', 3, '@pool:junk@');

SELECT fz_good('on_reject', 2, $e$'record'$e$);
SELECT fz_good('on_reject', 1, $e$'raise'$e$);
SELECT fz_bad('on_reject', 1, $e$'RAISE'$e$, $e$'ignore'$e$);
SELECT fz_bad('on_reject', 3, '@pool:junk@');

SELECT fz_good('desc', 4, 'NULL::text');
SELECT fz_good('desc', 2, $e$'fuzz'$e$);
SELECT fz_good('desc', 1, $e$repeat('d', 1000)$e$, $e$repeat('é', 1000)$e$);
SELECT fz_bad('desc', 1, $e$repeat('d', 1001)$e$);
SELECT fz_bad('desc', 3, '@pool:junk@');

-- grants and refunds
SELECT fz_good('charge_trace', 3, $e$'seed-deduct'$e$, $e$'seed-key'$e$);
SELECT fz_good('charge_trace', 1, $e$'seed-usage'$e$, $e$'h-cap-1'$e$, '@ctx_trace@::text');
SELECT fz_bad('charge_trace', 1, $e$'seed'$e$, $e$'seed-grant'$e$, $e$'no-such-charge'$e$, $e$'seed-refund'$e$);
SELECT fz_bad('charge_trace', 2, '@pool:junk@');
SELECT fz_good('expires', 3, 'NULL::timestamptz');
SELECT fz_good('expires', 2, $e$now() + interval '1 day'$e$, $e$clock_timestamp() + interval '2 seconds'$e$);
SELECT fz_good('expires', 1, $e$now() + interval '9 years'$e$);
SELECT fz_bad('expires', 1, $e$now() - interval '1 second'$e$, $e$'infinity'::timestamptz$e$,
    $e$'-infinity'::timestamptz$e$, $e$now() + interval '11 years'$e$, $e$'epoch'::timestamptz$e$);
SELECT fz_good('priority', 3, '0::integer');
SELECT fz_good('priority', 1, '10::integer', '1000::integer');
SELECT fz_bad('priority', 1, 'NULL::integer', '-1::integer', '1001::integer', '2147483647::integer');
SELECT fz_good('category', 2, $e$'promotional'$e$);
SELECT fz_good('category', 1, $e$'paid'$e$);
SELECT fz_bad('category', 1, 'NULL::text', $e$'gift'$e$, $e$'PAID'$e$);
SELECT fz_bad('category', 2, '@pool:junk@');
\o

UPDATE fz_pool p SET cum = s.cum, cum_good = s.cum_good
  FROM (SELECT id, sum(weight) OVER w AS cum,
               CASE WHEN good THEN sum(weight) FILTER (WHERE good) OVER w END AS cum_good
          FROM fz_pool WINDOW w AS (PARTITION BY pool ORDER BY id)) s
 WHERE s.id = p.id;
CREATE TABLE fz_pool_total AS
    SELECT pool, max(cum) AS total, max(cum_good) AS total_good FROM fz_pool GROUP BY pool;
DO $$
BEGIN
    IF EXISTS (SELECT FROM fz_pool_total WHERE total_good IS NULL AND pool <> 'junk') THEN
        RAISE EXCEPTION 'fuzzer: pool without a good value: %',
            (SELECT string_agg(pool, ', ') FROM fz_pool_total WHERE total_good IS NULL AND pool <> 'junk');
    END IF;
END;
$$;

-- every pool value must cast cleanly: then every error of a call is ours
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT * FROM fz_pool WHERE expr !~ '@' LOOP
        BEGIN
            EXECUTE 'SELECT ' || r.expr;
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'pool % value % does not evaluate: % (%)', r.pool, r.expr, SQLERRM, SQLSTATE;
        END;
    END LOOP;
END;
$$;

-- a readable literal (control characters as \xHH)
CREATE FUNCTION fz_lit(v text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    s text;
    i int;
BEGIN
    IF v IS NULL THEN
        RETURN 'NULL';
    END IF;
    IF v !~ '[[:cntrl:]]' THEN
        RETURN quote_literal(v);
    END IF;
    s := replace(replace(v, '\', '\\'), '''', '''''');
    FOR i IN 1..31 LOOP
        s := replace(s, chr(i), '\x' || lpad(to_hex(i), 2, '0'));
    END LOOP;
    s := replace(s, chr(127), '\x7f');
    RETURN 'E''' || s || '''';
END;
$$;

CREATE FUNCTION fz_rand(seed bigint, n int, tag text, m bigint) RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $$
    SELECT (hashtextextended(n::text || '/' || tag, seed) & 9223372036854775807) % greatest(m, 1)
$$;

-- which pool feeds a parameter
CREATE FUNCTION fz_pool_for(fn text, arg text, typ regtype, want text) RETURNS text
    LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN CASE
        WHEN arg = 'tenant_id' AND typ = 'text'::regtype AND want <> 'any' THEN 'tenant_ctx'
        WHEN arg = 'tenant_id' AND typ = 'text'::regtype THEN 'tenant'
        WHEN arg = 'trace_id' THEN 'trace'
        WHEN arg = 'hold_trace_id' THEN 'hold_trace'
        WHEN arg = 'charge_trace_id' THEN 'charge_trace'
        WHEN arg = 'expires_at' AND fn = 'billing_grant' THEN 'expires'
        WHEN arg IN ('priority', 'category') THEN arg
        WHEN arg IN ('api_key', 'key_id') THEN arg
        WHEN arg = 'job_id' THEN 'job_id'
        WHEN arg = 'kind' AND fn = 'billing_job_submit' THEN 'job_kind'
        WHEN arg = 'kind' AND fn = 'billing_credit' THEN 'credit_kind'
        WHEN arg = 'kind' THEN 'debit_kind'
        WHEN arg = 'worker' AND fn = 'billing_job_claim' THEN 'worker_req'
        WHEN arg IN ('currency', 'status', 'timezone', 'budget_period', 'model', 'worker') THEN arg
        WHEN arg = 'idempotency_key' THEN 'idem'
        WHEN arg IN ('at', 'effective_from') THEN 'ts_req'
        WHEN arg IN ('input_tokens', 'output_tokens', 'cached_input_tokens', 'cache_write_tokens',
                     'reasoning_tokens', 'requests') THEN 'tokens'
        WHEN typ = 'numeric'::regtype THEN 'amount'
        WHEN typ = 'bigint'::regtype THEN 'count'
        WHEN typ = 'integer'::regtype THEN 'int'
        WHEN typ = 'interval'::regtype THEN 'interval'
        WHEN typ = 'timestamptz'::regtype THEN 'ts'
        WHEN typ = 'jsonb'::regtype THEN 'jsonb'
        WHEN typ = 'boolean'::regtype THEN 'bool'
        WHEN typ = 'text'::regtype THEN 'desc'
        WHEN arg = 'kinds' THEN 'kinds'
        WHEN arg = 'on_reject' THEN 'on_reject'
        -- other arrays (tenant_ids, amounts, ...): ARRAY[...] from the pool of one element
        WHEN (SELECT t.typcategory = 'A' FROM pg_type t WHERE t.oid = typ) THEN
            'array:' || fz_pool_for(fn, regexp_replace(arg, 's$', ''),
                                    (SELECT t.typelem::regtype FROM pg_type t WHERE t.oid = typ), want)
        WHEN typ = 'regrole'::regtype THEN 'role'
    END;
END;
$$;

-- a fresh batch of tenants in every state, so that calls get deep
CREATE FUNCTION fz_batch(b int) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    a text := format('fz-%s-a', b);
    jid bigint[];
BEGIN
    IF b = 0 THEN
        PERFORM billing_price_set('fz-model', 0.0025, 0.01, '2000-01-01 00:00+00');
        PERFORM billing_price_set('fz-model', 0.003, 0.012, '2026-01-01 00:00+00');
        PERFORM billing_price_set('fz-model-eur', 0.002, 0.008, '2000-01-01 00:00+00', 'EUR');
        -- every kind of rate (per 1M tokens, per request, per second)
        PERFORM billing_price_set('fz-model', effective_from => '2026-06-01 00:00+00', input_per_1m => 2.5,
                                  output_per_1m => 10, cached_input_per_1m => 1.25, cache_write_per_1m => 3,
                                  reasoning_per_1m => 12, per_request => 0.0001, per_second => 0.0002);
        -- the seed batches use models the fuzzer never touches (prices are global)
        PERFORM billing_price_set('fz-seed-model', 0.0025, 0.01, '2000-01-01 00:00+00');
        PERFORM billing_price_set('fz-seed-model', 0.002, 0.008, '2000-01-01 00:00+00', 'EUR');
    END IF;
    PERFORM billing_account_create(a, credit_limit => 5, metadata => '{"plan": "fuzz"}');
    PERFORM billing_credit(a, 1000, 'seed');
    PERFORM billing_credit(a, 50, 'seed-grant', kind => 'grant');
    PERFORM billing_deduct(a, 1.5, 'seed-deduct', description => 'seed', metadata => '{"model": "gpt-4o"}');
    PERFORM billing_try_deduct(a, 100000, 'seed-rejected');
    PERFORM billing_api_key_create(a, 'k-budget', budget => 50, budget_period => 'month');
    PERFORM billing_api_key_create(a, 'k-life', budget => 20, budget_period => 'lifetime');
    PERFORM billing_api_key_create(a, 'k-day', budget => 3, budget_period => 'day');
    PERFORM billing_api_key_create(a, 'k-free');
    PERFORM billing_api_key_create(a, 'k-susp');
    PERFORM billing_api_key_update(a, 'k-susp', status => 'suspended');
    PERFORM billing_api_key_create(a, 'k-rev');
    PERFORM billing_api_key_update(a, 'k-rev', status => 'revoked');
    PERFORM billing_deduct(a, 0.25, 'seed-key', api_key => 'k-budget');
    PERFORM billing_hold(a, 20, 'h-open', expires_in => '1 hour');
    PERFORM billing_hold(a, 5, 'h-short', expires_in => '1 second');
    PERFORM billing_hold(a, 3, 'h-key', api_key => 'k-budget');
    PERFORM billing_hold(a, 10, 'h-cap');
    PERFORM billing_capture(a, 'h-cap', 4, 'h-cap-1');
    PERFORM billing_hold(a, 2, 'h-done');
    PERFORM billing_capture(a, 'h-done', 2.5, 'h-done-1', final => true);
    PERFORM billing_hold(a, 2, 'h-rel');
    PERFORM billing_release(a, 'h-rel', 'h-rel-1');
    PERFORM billing_deduct_usage(a, 'fz-seed-model', 1234, 567, 'seed-usage');
    -- grants (one expires during the run) and a refund
    PERFORM billing_grant(a, 20, 'seed-g1', expires_at => now() + interval '1 day', priority => 5);
    PERFORM billing_grant(a, 3, 'seed-g2', expires_at => clock_timestamp() + interval '1 second',
                          category => 'paid');
    PERFORM billing_hold(a, 2, 'h-grant', expires_in => '2 seconds');
    PERFORM billing_refund(a, 'seed-deduct', 0.5, 'seed-refund', reason => 'seed');
    -- the tenant's own price for the fuzzed model
    PERFORM billing_price_override_set(a, 'fz-model', input_per_1m => 2, output_per_1m => 8, per_second => 0.0001,
                                       effective_from => '2026-01-01 00:00+00');
    SELECT array_agg(s.job_id ORDER BY s.job_id) INTO jid FROM (
        SELECT (billing_job_submit(a, 'translate', 'seed-job-' || i, 2, max_attempts => 2)).job_id
          FROM generate_series(1, 10) i) s;
    PERFORM billing_job_submit(a, 'render', 'seed-job-ttl', 1, hold_ttl => '1 second');
    PERFORM billing_job_claim('w1', tenant_id => a, max_jobs => 2, lease => '1 second');
    PERFORM billing_job_claim('w2', tenant_id => a, max_jobs => 5);
    PERFORM billing_job_complete(a, jid[3], 1.25, '{"words": 1}', 'w2');
    PERFORM billing_job_fail(a, jid[4], 'fatal', retryable => false, worker => 'w2');
    PERFORM billing_job_cancel(a, jid[6], 'seed');
    PERFORM billing_job_submit(a, 'translate', 'seed-job-later', 1, run_at => now() + interval '1 hour');

    PERFORM billing_account_create(format('fz-%s-s', b));
    PERFORM billing_credit(format('fz-%s-s', b), 100, 'seed');
    PERFORM billing_hold(format('fz-%s-s', b), 5, 'h-open');
    PERFORM billing_account_update(format('fz-%s-s', b), status => 'suspended', reason => 'seed');

    PERFORM billing_account_create(format('fz-%s-l', b), timezone => 'Pacific/Kiritimati');
    PERFORM billing_credit(format('fz-%s-l', b), 100, 'seed');
    PERFORM billing_limits_set(format('fz-%s-l', b), daily_requests => 20, monthly_requests => 100,
                               daily_spend => 5, monthly_spend => 50, max_charge => 2, per_minute => 10);
    PERFORM billing_hold(format('fz-%s-l', b), 1, 'h-open');

    PERFORM billing_account_create(format('fz-%s-c', b));
    PERFORM billing_credit(format('fz-%s-c', b), 10, 'seed');
    PERFORM billing_account_update(format('fz-%s-c', b), status => 'closed');

    PERFORM billing_account_create(format('fz-%s-e', b), currency => 'EUR', credit_limit => 1000,
                                   timezone => 'America/St_Johns');
    PERFORM billing_deduct_usage(format('fz-%s-e', b), 'fz-seed-model', 100, 100, 'seed-usage');
END;
$$;

-- candidates for the context of a call: the newest existing objects, copied
-- once per chunk (indexed by a dense i, so a pick costs nothing)
CREATE UNLOGGED TABLE fz_cand (kind text, i int, state text, c jsonb, PRIMARY KEY (kind, i));
CREATE FUNCTION fz_refresh() RETURNS void LANGUAGE sql AS $$
    TRUNCATE fz_cand;
    INSERT INTO fz_cand
    SELECT 'job', row_number() OVER (ORDER BY j.job_id), j.state,
           jsonb_build_object('tenant', j.tenant_id, 'job', j.job_id, 'idem', j.idempotency_key,
                              'worker', j.worker, 'hold_trace', j.hold_trace_id,
                              'amount', billing.to_amount(coalesce(j.actual_micros, j.estimated_micros)))
      FROM (SELECT * FROM billing.jobs ORDER BY job_id DESC LIMIT 2000) j;
    INSERT INTO fz_cand
    SELECT 'hold', row_number() OVER (ORDER BY h.hold_id), h.status,
           jsonb_build_object('tenant', h.tenant_id, 'hold_trace', h.trace_id, 'trace', h.trace_id,
                              'key', h.api_key, 'amount', billing.to_amount(h.amount_micros))
      FROM (SELECT * FROM billing.holds ORDER BY hold_id DESC LIMIT 2000) h;
    INSERT INTO fz_cand
    SELECT 'key', row_number() OVER (ORDER BY x.created_at, x.tenant_id, x.key_id), x.status,
           jsonb_build_object('tenant', x.tenant_id, 'key', x.key_id)
      FROM (SELECT * FROM billing.api_keys ORDER BY created_at DESC, tenant_id, key_id LIMIT 2000) x;
    INSERT INTO fz_cand
    SELECT 'entry', row_number() OVER (ORDER BY e.entry_id), e.kind,
           jsonb_build_object('tenant', e.tenant_id, 'trace', e.trace_id, 'key', e.api_key,
                              'amount', billing.to_amount(abs(e.amount_micros)))
      FROM (SELECT * FROM billing.entries ORDER BY entry_id DESC LIMIT 5000) e;
$$;

-- context of a call: an existing object (entry, hold, key or job) and its tenant
CREATE FUNCTION fz_ctx(seed bigint, n int, want text, fn text) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    k bigint;
    c jsonb;
    bias boolean := fz_rand(seed, n, 'bias', 3) > 0;
    states text[] := CASE
        WHEN want = 'hold' THEN '{open}'
        WHEN fn = 'billing_job_retry' THEN '{failed}'
        WHEN fn = 'billing_job_cancel' THEN '{queued,processing}'
        WHEN fn = 'billing_job_submit' THEN '{queued,processing,completed,failed,cancelled}'
        ELSE '{processing}' END;
BEGIN
    IF want = 'any' THEN
        want := (ARRAY['entry', 'entry', 'hold', 'key', 'job'])[1 + fz_rand(seed, n, 'want', 5)];
        bias := false;
    END IF;
    k := 1 + fz_rand(seed, n, 'ctx', (SELECT coalesce(max(x.i), 0) FROM fz_cand x WHERE x.kind = want));
    IF bias AND want IN ('job', 'hold') THEN
        -- preferably an object in a state the function wants: the first from k on, else wrap around
        SELECT x.c INTO c FROM fz_cand x WHERE x.kind = want
         ORDER BY x.state = ANY (states) DESC, x.i < k, x.i LIMIT 1;
    ELSE
        SELECT x.c INTO c FROM fz_cand x WHERE x.kind = want AND x.i = k;
    END IF;
    RETURN coalesce(c, '{}');
END;
$$;

-- draw a value expression from a pool and fill in the placeholders
CREATE FUNCTION fz_value(seed bigint, n int, tag text, p text, ctx jsonb, b int, good boolean,
                         j int DEFAULT NULL) RETURNS text
    LANGUAGE plpgsql AS $$
DECLARE
    e text;
    depth int := 0;
    r bigint;
BEGIN
    LOOP
        IF good THEN
            r := fz_rand(seed, n, tag || depth, (SELECT t.total_good FROM fz_pool_total t WHERE t.pool = p));
            SELECT x.expr INTO e FROM fz_pool x
             WHERE x.pool = p AND x.good AND x.cum_good > r
             ORDER BY x.cum_good LIMIT 1;
        ELSE
            r := fz_rand(seed, n, tag || depth, (SELECT t.total FROM fz_pool_total t WHERE t.pool = p));
            SELECT x.expr INTO e FROM fz_pool x
             WHERE x.pool = p AND x.cum > r
             ORDER BY x.cum LIMIT 1;
        END IF;
        IF e IS NULL THEN
            RAISE EXCEPTION 'fuzzer: empty pool %', p;
        END IF;
        EXIT WHEN e !~ '^@pool:';
        p := substring(e FROM '^@pool:([a-z_]+)@$');
        depth := depth + 1;
    END LOOP;
    IF e ~ '@' THEN
        e := replace(e, '@n@', n::text);
        e := replace(e, '@j@', coalesce('-' || j, ''));
        e := replace(e, '@batch_a@', fz_lit(format('fz-%s-a', b)));
        e := replace(e, '@batch_s@', fz_lit(format('fz-%s-s', b)));
        e := replace(e, '@batch_l@', fz_lit(format('fz-%s-l', b)));
        e := replace(e, '@batch_c@', fz_lit(format('fz-%s-c', b)));
        e := replace(e, '@batch_e@', fz_lit(format('fz-%s-e', b)));
        e := replace(e, '@ctx_tenant@', fz_lit(coalesce(ctx->>'tenant', format('fz-%s-a', b))));
        e := replace(e, '@ctx_trace@', fz_lit(coalesce(ctx->>'trace', 'fz-t-' || n)));
        e := replace(e, '@ctx_hold_trace@', fz_lit(coalesce(ctx->>'hold_trace', 'h-open')));
        e := replace(e, '@ctx_key@', fz_lit(coalesce(ctx->>'key', 'k-budget')));
        e := replace(e, '@ctx_job@', coalesce(ctx->>'job', 'NULL'));
        e := replace(e, '@ctx_idem@', fz_lit(coalesce(ctx->>'idem', 'fz-ik-' || n)));
        e := replace(e, '@ctx_worker@', fz_lit(ctx->>'worker'));
        e := replace(e, '@ctx_amount@', coalesce(ctx->>'amount', '1'));
    END IF;
    RETURN e;
END;
$$;

-- an array argument: NULL, empty, or ARRAY[...] of 1 to 5 values of the element pool
-- (good: exactly len well-formed values, the same length for every array of the call)
CREATE FUNCTION fz_array(seed bigint, n int, tag text, p text, ctx jsonb, b int, good boolean,
                         len int, typ regtype) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    k int := CASE WHEN good THEN len ELSE fz_rand(seed, n, tag || 'len', 7)::int - 1 END;
    elems text[] := '{}';
BEGIN
    IF k < 0 THEN
        RETURN 'NULL::' || typ;
    ELSIF k = 0 THEN
        RETURN '''{}''::' || typ;
    END IF;
    FOR j IN 1..k LOOP
        elems := elems || fz_value(seed, n, tag || j || ':', p, ctx, b, good, j);
    END LOOP;
    RETURN format('ARRAY[%s]::%s', array_to_string(elems, ', '), typ);
END;
$$;

CREATE TYPE fz_fn AS (proname text, argnames text[], argtypes regtype[], nargs int, ndefaults int);

CREATE PROCEDURE fz_run(calls int, seed bigint, allowed text[], chunk int DEFAULT 400)
    LANGUAGE plpgsql AS $$
DECLARE
    fns fz_fn[];
    f fz_fn;
    n int := 0;
    b int := 0;
    i int;
    stmt text;
    args text[];
    want text;
    ctx jsonb;
    pool text;
    st text;
    msg text;
    det text;
    ectx text;
    mode text;
    bad int;
    len int;
BEGIN
    SELECT array_agg(ROW(x.proname, x.argnames, x.argtypes, x.nargs, x.ndefaults)::fz_fn ORDER BY x.proname) INTO fns FROM (
        SELECT p.proname::text AS proname, coalesce(p.proargnames, '{}') AS argnames,
               (SELECT coalesce(array_agg(t::regtype ORDER BY o), '{}') FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY u(t, o)) AS argtypes, p.pronargs AS nargs, p.pronargdefaults AS ndefaults
          FROM pg_proc p
          JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'billing'
         WHERE p.pronamespace = e.extnamespace AND p.proname LIKE 'billing\_%' AND p.prokind = 'f') x;
    -- every parameter needs a pool
    FOREACH f IN ARRAY fns LOOP
        FOR i IN 1..f.nargs LOOP
            IF fz_pool_for(f.proname, f.argnames[i], f.argtypes[i], 'any') IS NULL THEN
                RAISE EXCEPTION 'fuzzer has no value pool for parameter % % of %',
                                f.argnames[i], f.argtypes[i], f.proname;
            END IF;
        END LOOP;
    END LOOP;
    RAISE NOTICE 'fuzzing % functions', cardinality(fns);

    PERFORM fz_batch(0);
    PERFORM fz_refresh();
    COMMIT;
    WHILE n < calls LOOP
        n := n + 1;
        f := fns[1 + fz_rand(seed, n, 'fn', cardinality(fns))];
        want := CASE
            WHEN 'job_id' = ANY (f.argnames) THEN 'job'
            WHEN 'hold_trace_id' = ANY (f.argnames) THEN 'hold'
            WHEN 'key_id' = ANY (f.argnames) THEN 'key'
            ELSE 'any' END;
        -- chaos: every argument from the whole pool; one-bad: one argument from the
        -- whole pool, the others well-formed; good: only well-formed arguments
        mode := (ARRAY['chaos', 'chaos', 'one-bad', 'one-bad', 'one-bad', 'one-bad', 'good', 'good'])
                [1 + fz_rand(seed, n, 'mode', 8)];
        bad := CASE mode WHEN 'chaos' THEN 0 WHEN 'one-bad' THEN 1 + fz_rand(seed, n, 'bad', f.nargs) ELSE -1 END;
        ctx := fz_ctx(seed, n, want, f.proname);
        len := 1 + fz_rand(seed, n, 'len', 3);
        args := '{}';
        FOR i IN 1..f.nargs LOOP
            -- leave out a parameter that has a default now and then
            CONTINUE WHEN i > f.nargs - f.ndefaults AND i <> bad AND fz_rand(seed, n, 'omit' || i, 3) = 0;
            pool := fz_pool_for(f.proname, f.argnames[i], f.argtypes[i], want);
            args := args || format('%I => %s', f.argnames[i],
                                   CASE WHEN pool LIKE 'array:%'
                                        THEN fz_array(seed, n, 'arg' || i || ':', substr(pool, 7), ctx, b,
                                                      bad = -1 OR (bad > 0 AND i <> bad), len, f.argtypes[i])
                                        ELSE fz_value(seed, n, 'arg' || i || ':', pool, ctx, b,
                                                      bad = -1 OR (bad > 0 AND i <> bad)) END);
        END LOOP;
        stmt := format('SELECT * FROM %I(%s)', f.proname, array_to_string(args, ', '));
        -- billing_charge commits on its own and refuses a transaction that
        -- has written (ZB110): its calls get a transaction of their own
        IF f.proname = 'billing_charge' THEN
            COMMIT;
        END IF;
        BEGIN
            EXECUTE stmt;
            st := 'ok';
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
                                    det = PG_EXCEPTION_DETAIL, ectx = PG_EXCEPTION_CONTEXT;
        END;
        -- (42501 is documented for the metrics in a session limited to some
        -- tenants: a fuzzed billing_scope_role may scope the fuzzer's own role)
        IF st = 'ok' OR st = ANY (allowed)
           OR (st = '42501' AND f.proname = 'billing_metrics' AND billing.visible_tenants() IS NOT NULL) THEN
            INSERT INTO fz_log (n, fn, mode, state, ok) VALUES (n, f.proname, mode, st, true);
        ELSE
            INSERT INTO fz_log (n, fn, mode, state, ok, stmt, msg)
            VALUES (n, f.proname, mode, st, false, stmt,
                    msg || coalesce(E'\n  DETAIL: ' || nullif(det, ''), '')
                        || coalesce(E'\n  CONTEXT: ' || nullif(ectx, ''), ''));
        END IF;
        IF n % chunk = 0 OR n = calls THEN
            INSERT INTO fz_chunk VALUES (b, n, (SELECT count(*) FROM billing_verify()));
            COMMIT;
            b := b + 1;
            IF n < calls THEN
                PERFORM fz_batch(b);
                PERFORM fz_refresh();
                COMMIT;
            END IF;
        END IF;
    END LOOP;
END;
$$;
SQL
note sprintf('setup done (%d s)', time - $started);

my $t0 = time;
run_sql(<<SQL);
SET client_min_messages = notice;
SET statement_timeout = '30min';
SET lock_timeout = '30s';
CALL fz_run($calls, $seed, '$allowed');
SQL
note sprintf('%d calls in %d s', $calls, time - $t0);

# the figures, as psql tables
note $_ for split /\n/, run_sql(<<'SQL', '-P', 'format=aligned', '-P', 'tuples_only=off', '-P', 'pager=off');
\echo 'SQLSTATE counts'
SELECT state AS sqlstate, count(*) AS calls,
       round(100.0 * count(*) / sum(count(*)) OVER (), 1) AS pct,
       CASE WHEN bool_and(ok) THEN 'ok' ELSE 'FAIL' END AS verdict
  FROM fz_log GROUP BY state ORDER BY state = 'ok' DESC, state;
\echo 'per mode (chaos: all arguments from the whole pools, one-bad: one, good: none)'
SELECT mode, count(*) AS calls, count(*) FILTER (WHERE state = 'ok') AS ok,
       count(DISTINCT state) AS sqlstates
  FROM fz_log GROUP BY mode ORDER BY mode;
\echo 'per function: calls, successes, SQLSTATEs seen'
SELECT fn AS function, sum(c) AS calls, coalesce(sum(c) FILTER (WHERE state = 'ok'), 0) AS ok,
       string_agg(state || ':' || c, ' ' ORDER BY state) AS sqlstates
  FROM (SELECT fn, state, count(*) AS c FROM fz_log GROUP BY fn, state) s
 GROUP BY fn ORDER BY fn;
SQL

my $nfail = run_sql('SELECT count(*) FROM fz_log WHERE NOT ok');
is($nfail, 0, 'every call succeeded or raised a documented SQLSTATE')
  or diag "$nfail call(s) ended in an undocumented SQLSTATE; the first of each (function, SQLSTATE):\n"
  . run_sql(<<'SQL');
SELECT format(E'--- call %s: %s -> SQLSTATE %s (%s calls like it)\n  %s\n  ERROR: %s',
              n, fn, state, c,
              CASE WHEN length(stmt) > 2000 THEN left(stmt, 2000) || ' ...[' || length(stmt) || ' chars]' ELSE stmt END,
              msg)
  FROM (SELECT *, row_number() OVER (PARTITION BY fn, state ORDER BY n) AS r,
               count(*) OVER (PARTITION BY fn, state) AS c
          FROM fz_log WHERE NOT ok) s
 WHERE r <= 2 ORDER BY fn, state, n;
SQL

is(run_sql(<<'SQL'), '', 'every billing_* function of the extension schema was called');
SELECT string_agg(p.proname, ' ' ORDER BY p.proname)
  FROM pg_proc p
  JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'billing'
 WHERE p.pronamespace = e.extnamespace AND p.proname LIKE 'billing\_%'
   AND p.proname NOT IN (SELECT fn FROM fz_log);
SQL

# a function that failed every call (even with good arguments) would pass the
# checks above: each must have succeeded at least once
is(run_sql(<<'SQL'), '', 'every billing_* function succeeded at least once');
SELECT string_agg(fn, ' ' ORDER BY fn)
  FROM (SELECT fn FROM fz_log GROUP BY fn HAVING count(*) FILTER (WHERE state = 'ok') = 0) s;
SQL

my $bad_chunk = run_sql('SELECT min(last_call) FROM fz_chunk WHERE verify_rows > 0');
my $nverify   = run_sql('SELECT count(*) FROM billing_verify()');
ok($nverify eq '0' && $bad_chunk eq '', 'billing_verify() is empty (checked after every chunk)')
  or diag "billing_verify() returns $nverify row(s) (first seen after call "
  . ($bad_chunk eq '' ? '?' : $bad_chunk) . ")\n"
  . run_sql('SELECT * FROM billing_verify() LIMIT 20', '-P', 'format=aligned', '-P', 'tuples_only=off');

is($node->safe_psql('postgres', 'SELECT 1'), '1', 'the server accepts a new connection');
BillingTest::no_crashes($node);

if ($ENV{FUZZ_KEEP})
{
	$ENV{PG_TEST_NOCLEAN} = 1;
	note 'FUZZ_KEEP=1: data directory ' . $node->data_dir . " kept (fz_log in database $db has every call)";
}
note sprintf('FUZZ_SEED=%s FUZZ_CALLS=%s, %d s', $seed, $calls, time - $started);
$node->stop;
done_testing();

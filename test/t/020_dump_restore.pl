# pg_dump / pg_restore of a database full of billing state, restored the
# ways DBAs restore (pg_restore serially, pg_restore -j 4) and in the worst
# order (the data of billing.jobs before the ledger).
#
# Fills billing_dump_src through the API with every kind of state (accounts
# with settings and limits, entries of every kind, a recorded rejection,
# account events, holds open/captured/released/expired, hold events, API keys
# with budgets and usage, prices with history, jobs in every state with their
# events, a billing_grant_app() grant), plus enough finished jobs that
# billing.jobs is one of the largest tables of the dump: pg_restore -j loads
# each table in a session of its own, largest first, and pg_dump records no
# order between the data of two tables (foreign keys order only a serial
# restore), so the jobs arrive before or while their charge entries and
# holds are loaded.  The job guard checks the rows of a COPY billing.jobs
# FROM only against what is already loaded, and billing_verify() checks the
# jobs against the ledger afterwards.  Dumps it with pg_dump -Fc and
# restores it into three empty databases: billing_dump_dst with
# `pg_restore -d`, billing_dump_dst_j4 with `pg_restore -j 4 -d` and
# billing_dump_dst_rev with `pg_restore -L` and a list whose table data
# comes in reverse order (jobs before holds before entries).  Each restore
# must report no error.
#
# Checks on each restored database: the same tables; per table the row count
# and md5 of the ordered rows; the sequences; the trigger enable modes
# (ALWAYS must stay ALWAYS) and the extension version; the event triggers;
# function grants; billing_verify() empty; the append-only triggers still
# refuse UPDATE / DELETE / TRUNCATE with ZB020, also with
# session_replication_role = replica; the job state machine still holds;
# replays of old trace ids, a recorded rejection and an old job submit return
# replayed = t; new rows get ids above every restored one; the open hold and
# the processing job carry on.  And since a restore COPYs into billing.jobs:
# what lets that COPY through must not let anything else through (an API call
# made inside a COPY statement is still logged in job_events; a query string
# that merely starts with COPY cannot INSERT a completed job without its
# charge; a COPY billing.jobs FROM run inside a function is checked in full).
use strict;
use warnings FATAL => 'all';
use IPC::Run;
use PostgreSQL::Test::Utils;
use Test::More;
use BillingTest;

my $node = BillingTest::node('dump', database => 'postgres', extension => 0);
my $src  = 'billing_dump_src';
my $role = 'billing_dump_app';
my $tmp  = PostgreSQL::Test::Utils::tempdir();
my $dump = "$tmp/billing.dump";

sub sql { my ($db, $sql) = @_; return $node->safe_psql($db, $sql) }
sub check { my ($what, $expected, $got) = @_; is($got, $expected, $what) }

# run a client program of the node's installation: (success, stdout + stderr)
sub client
{
	my ($prog, @args) = @_;
	my $out = '';
	my $ok = IPC::Run::run([ $node->installed_command($prog), @args ], '<', \'', '>&', \$out);
	return ($ok, $out);
}

$node->safe_psql('postgres', "CREATE DATABASE $src; CREATE ROLE $role NOLOGIN");

# ---------------------------------------------------------------------------
# 1. fill the source database with every kind of state
# ---------------------------------------------------------------------------
sql($src, <<'SQL');
SET client_min_messages = warning;
SET billing.event_at_window = '3650d';  -- the fixed event time below
CREATE EXTENSION billing;
SELECT billing_grant_app('billing_dump_app');
-- accounts with settings and limits
SELECT billing_account_create('t-main', currency => 'USD', credit_limit => 10, timezone => 'Europe/Berlin',
                              metadata => '{"plan": "pro", "emoji": "😀"}');
SELECT billing_account_create('t-eur', currency => 'EUR', timezone => 'America/St_Johns');
SELECT billing_account_create('t-susp');
SELECT billing_account_create('t-closed');
SELECT billing_account_create('t-limits', timezone => 'Pacific/Kiritimati');
SELECT billing_account_create(E'odd tenant ''"\\ ünï', metadata => '{"note": "quotes, backslash, non-ASCII (control characters are refused since 1.4)"}');
SELECT billing_account_update('t-main', credit_limit => 20, reason => 'ticket 1234');
SELECT billing_account_update('t-main', metadata => '{"plan": "enterprise"}', reason => 'upgrade');
SELECT billing_limits_set('t-limits', daily_requests => 100, monthly_requests => 1000, daily_spend => 50,
                          monthly_spend => 500, max_charge => 5, per_minute => 60, reason => 'pro plan');
SELECT billing_limits_set('t-main', max_charge => 100, reason => 'cap');
-- API keys with budgets (and, below, usage)
SELECT billing_api_key_create('t-main', 'k-month', budget => 20, budget_period => 'month');
SELECT billing_api_key_create('t-main', 'k-day', budget => 5, budget_period => 'day');
SELECT billing_api_key_create('t-main', 'k-life', budget => 100, budget_period => 'lifetime', metadata => '{"team": "a"}');
SELECT billing_api_key_create('t-main', 'k-free');
SELECT billing_api_key_create('t-main', 'k-susp');
SELECT billing_api_key_update('t-main', 'k-susp', status => 'suspended');
SELECT billing_api_key_create('t-main', 'k-rev');
SELECT billing_api_key_update('t-main', 'k-rev', status => 'revoked');
-- prices with history
SELECT billing_price_set('gpt-4o', 0.0025, 0.01, '2026-01-01 00:00+00');
SELECT billing_price_set('gpt-4o', 0.002, 0.008, '2026-06-01 00:00+00');
SELECT billing_price_set('gpt-4o', 0.0023, 0.0092, '2026-01-01 00:00+00', 'EUR');
SELECT billing_price_set('claude', 0.003, 0.015, '2025-01-01 00:00+00');
SELECT billing_price_set('sonnet', input_per_1m => 3, output_per_1m => 15, cached_input_per_1m => 0.30,
                         cache_write_per_1m => 3.75, per_request => 0.0001, effective_from => '2025-01-01 00:00+00');
-- a tenant's own price (an enterprise plan), with history
SELECT billing_price_override_set('t-main', 'sonnet', input_per_1m => 2.5, output_per_1m => 12,
                                  effective_from => '2025-06-01 00:00+00');
SELECT billing_price_override_end('t-main', 'sonnet', '2026-01-01 00:00+00');
SELECT billing_price_override_set('t-main', 'sonnet', input_per_1m => 2, output_per_1m => 10,
                                  effective_from => '2026-02-01 00:00+00');
-- entries of every kind: topup, grant, refund, adjustment (both ways), deduct, capture
SELECT billing_credit('t-main', 500, 'pi-1', description => 'stripe', metadata => '{"pi": "pi_1"}');
SELECT billing_credit('t-main', 10, 'promo-1', kind => 'grant', description => 'welcome');
SELECT billing_credit('t-main', 2.5, 'refund-1', kind => 'refund');
SELECT billing_credit('t-main', 1.000001, 'adj-1', kind => 'adjustment');
SELECT billing_deduct('t-main', 0.012345, 'trace-1', description => 'chat completion',
                      metadata => '{"model": "gpt-4o", "provider": "openai", "input_tokens": 812}',
                      event_at => '2026-11-22 10:00:00+00');
SELECT billing_deduct('t-main', 0.5, 'adj-2', kind => 'adjustment');
SELECT billing_deduct('t-main', 1.25, 'trace-key-1', api_key => 'k-month');
SELECT billing_deduct('t-main', 0.75, 'trace-key-2', api_key => 'k-day');
SELECT billing_deduct('t-main', 3, 'trace-key-3', api_key => 'k-life');
SELECT billing_deduct_usage('t-main', 'gpt-4o', 1234, 567, 'usage-1', api_key => 'k-month');
SELECT billing_deduct_usage('t-main', 'gpt-4o', 1000, 1000, 'usage-2', event_at => '2026-02-01 00:00+00');
SELECT billing_deduct_usage('t-main', 'sonnet', 1000, 200, 'usage-3', cached_input_tokens => 5000,
                            cache_write_tokens => 100, reasoning_tokens => 50);
SELECT billing_credit('t-eur', 100, 'eur-1');
SELECT billing_deduct_usage('t-eur', 'gpt-4o', 100, 200, 'eur-usage-1');
SELECT billing_credit('t-limits', 100, 'lim-1');
SELECT billing_deduct('t-limits', 2, 'lim-d-1');
SELECT billing_credit('t-susp', 50, 'susp-1');
SELECT billing_account_update('t-susp', status => 'suspended', reason => 'chargeback');
SELECT billing_credit('t-closed', 5, 'closed-1');
SELECT billing_deduct('t-closed', 5, 'closed-2');
SELECT billing_account_update('t-closed', status => 'closed', reason => 'churned');
SELECT billing_credit(E'odd tenant ''"\\ ünï', 1, E'trace with odd ''chars'' ünï');
-- recorded rejections
SELECT billing_try_deduct('t-eur', 1000000, 'too-much-1', description => 'big');
SELECT billing_try_deduct('t-limits', 10, 'too-big-1');
-- holds: open (extended), captured (partial + final), over-captured, released, expired
SELECT billing_hold('t-main', 5, 'h-open', expires_in => '1 hour', description => 'stream', api_key => 'k-month');
SELECT billing_hold_extend('t-main', 'h-open', '2 hours');
SELECT billing_hold('t-main', 2, 'h-captured');
SELECT billing_capture('t-main', 'h-captured', 0.5, 'h-captured-1');
SELECT billing_capture('t-main', 'h-captured', 0.8, 'h-captured-2', final => true);
SELECT billing_hold('t-main', 1, 'h-over');
SELECT billing_capture('t-main', 'h-over', 1.2, 'h-over-1');
SELECT billing_hold('t-main', 3, 'h-released');
SELECT billing_capture('t-main', 'h-released', 1, 'h-released-1');
SELECT billing_release('t-main', 'h-released', 'h-released-done');
SELECT billing_hold('t-main', 4, 'h-expired', expires_in => '1 second');
SELECT billing_hold('t-limits', 1, 'h-lim-expired', expires_in => '1 second');
-- jobs in every state, with their events
SELECT billing_job_submit('t-main', 'queued', 'job-queued', 1, input => '{"doc": "a"}');
SELECT billing_job_submit('t-main', 'later', 'job-later', 1, run_at => now() + interval '1 day');
SELECT billing_job_submit('t-main', 'proc', 'job-proc', 2, max_attempts => 5);
SELECT billing_job_claim('w1', kinds => '{proc}', tenant_id => 't-main', lease => '1 hour');
SELECT billing_job_heartbeat('t-main', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'job-proc'), 'w1', '2 hours');
SELECT billing_job_submit('t-main', 'done', 'job-done', 2, input => '{"doc": "b"}');
SELECT billing_job_claim('w1', kinds => '{done}', tenant_id => 't-main');
SELECT billing_job_complete('t-main', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'job-done'), 1.37, '{"words": 912}', 'w1');
SELECT billing_job_submit('t-main', 'free', 'job-free', 1);
SELECT billing_job_claim('w1', kinds => '{free}', tenant_id => 't-main');
SELECT billing_job_complete('t-main', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'job-free'), 0, NULL, 'w1');
SELECT billing_job_submit('t-main', 'fail', 'job-failed', 1, max_attempts => 1);
SELECT billing_job_claim('w2', kinds => '{fail}', tenant_id => 't-main');
SELECT billing_job_fail('t-main', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'job-failed'), 'upstream 500', retryable => false, worker => 'w2');
SELECT billing_job_submit('t-main', 'backoff', 'job-backoff', 1, max_attempts => 3);
SELECT billing_job_claim('w2', kinds => '{backoff}', tenant_id => 't-main');
SELECT billing_job_fail('t-main', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'job-backoff'), 'upstream 503', worker => 'w2');
SELECT billing_job_submit('t-main', 'retry', 'job-retried', 1, max_attempts => 1);
SELECT billing_job_claim('w2', kinds => '{retry}', tenant_id => 't-main');
SELECT billing_job_fail('t-main', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'job-retried'), 'oom', worker => 'w2');
SELECT billing_job_retry('t-main', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'job-retried'));
SELECT billing_job_submit('t-main', 'cancel', 'job-cancelled', 1);
SELECT billing_job_cancel('t-main', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'job-cancelled'), 'user cancelled');
SELECT billing_job_submit('t-main', 'cancel', 'job-cancelled-2', 1);
SELECT billing_job_claim('w3', kinds => '{cancel}', tenant_id => 't-main');
SELECT billing_job_cancel('t-main', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'job-cancelled-2'), 'user cancelled while running');
-- let the two short holds expire; the next call on each account marks them
SELECT pg_sleep(1.2);
SELECT billing_credit('t-main', 0.000001, 'after-expiry');
SELECT billing_credit('t-limits', 0.000001, 'after-expiry');
-- enough finished jobs that billing.jobs is the largest table of the dump
SELECT billing_account_create('t-bulk');
SELECT billing_credit('t-bulk', 10000, 'bulk-top');
SELECT count(*) FROM (SELECT billing_job_submit('t-bulk', 'bulk', 'bulk-' || g, 1, input => '{"doc": "bulk"}')
                        FROM generate_series(1, 400) g) s;
SELECT count(*) FROM billing_job_claim('w-bulk', kinds => '{bulk}', max_jobs => 400);
SELECT count(*) FROM (SELECT billing_job_complete('t-bulk', job_id, 0.5, '{"words": 1}', 'w-bulk')
                        FROM billing.jobs WHERE tenant_id = 't-bulk' AND state = 'processing') s;
SQL
$node->safe_psql($src, 'VACUUM ANALYZE');
note 'largest tables of the source (pages): '
  . sql($src, q{SELECT string_agg(relname || ' ' || relpages, ', ' ORDER BY relpages DESC, relname)
                FROM pg_class WHERE relnamespace = 'billing'::regnamespace AND relkind = 'r'});

# the source has what the test claims it has
check('source: jobs in every state', 'cancelled completed failed processing queued',
	sql($src, q{SELECT string_agg(DISTINCT state, ' ' ORDER BY state) FROM billing.jobs}));
check('source: holds in every status', 'captured expired open released',
	sql($src, q{SELECT string_agg(DISTINCT status, ' ' ORDER BY status) FROM billing.holds}));
check('source: entries of every kind', 'adjustment capture deduct grant refund topup',
	sql($src, q{SELECT string_agg(DISTINCT kind, ' ' ORDER BY kind) FROM billing.entries}));
check('source: hold events of every action', 'capture expire extend hold release',
	sql($src, q{SELECT string_agg(DISTINCT action, ' ' ORDER BY action) FROM billing.hold_events}));
check('source: account events of every action', 'create limits update',
	sql($src, q{SELECT string_agg(DISTINCT action, ' ' ORDER BY action) FROM billing.account_events}));
check('source: rejections recorded, keys with usage, price history, overrides, job events', '2 true 5 3 true',
	sql($src, q{SELECT (SELECT count(*) FROM billing.rejections) || ' ' ||
	                 (SELECT bool_and(period_spend_micros > 0) FROM billing.api_keys WHERE key_id IN ('k-month', 'k-day', 'k-life')) || ' ' ||
	                 (SELECT count(*) FROM billing.prices) || ' ' ||
	                 (SELECT count(*) FROM billing.price_overrides) || ' ' ||
	                 (SELECT count(DISTINCT to_state) = 5 FROM billing.job_events)}));
check('source: billing_verify() is empty', 0, sql($src, 'SELECT count(*) FROM billing_verify()'));

# ---------------------------------------------------------------------------
# 2. dump; restore serially and with -j 4, each into an empty database
# ---------------------------------------------------------------------------
my ($dumped, $dump_out) = client('pg_dump', '-Fc', '-d', $node->connstr($src), '-f', $dump);
ok($dumped && -s $dump, 'pg_dump -Fc (' . (-s $dump // 0) . ' bytes)') or diag($dump_out);

# the archive's list with the table data in reverse order
my ($listed, $list) = client('pg_restore', '-l', $dump);
my @data = grep { / TABLE DATA / } split /\n/, $list;
my @rev = reverse @data;
my $reversed = join("\n", map { / TABLE DATA / ? shift @rev : $_ } split /\n/, $list) . "\n";
PostgreSQL::Test::Utils::append_to_file("$tmp/reversed.list", $reversed);
note 'reversed table data: ' . join(', ', map { (split / /)[-2] } reverse @data);

my %restores = (
	billing_dump_dst     => [ 'a plain pg_restore', [] ],
	billing_dump_dst_j4  => [ 'pg_restore -j 4', [ '-j', '4' ] ],
	billing_dump_dst_rev => [ 'pg_restore -L (table data reversed)', [ '-L', "$tmp/reversed.list" ] ]);
for my $dst (sort keys %restores)
{
	my ($label, $opts) = @{ $restores{$dst} };
	$node->safe_psql('postgres', "CREATE DATABASE $dst TEMPLATE template0");
	note "restore: pg_restore @$opts -d $dst DUMP";
	my ($ok, $out) = client('pg_restore', @$opts, '-d', $node->connstr($dst), $dump);
	ok($ok && $out !~ /error/i, "$label succeeds") or diag(
		"$label fails:\n$out\nrows in $dst after it: "
		  . sql($dst, q{SELECT string_agg(format('%s %s', c.relname,
		               (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %s', c.oid::regclass),
		                                                     false, true, '')))[1]), ', ' ORDER BY c.relname)
		                FROM pg_class c WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'}));
}

# ---------------------------------------------------------------------------
# 3. each restored database is the same (checked before any write to it)
# ---------------------------------------------------------------------------
sub same_as_source
{
	my ($dst, $label) = @_;
	my $same = sub { my ($what, $sql) = @_; check("$label: $what", sql($src, $sql), sql($dst, $sql)) };
	my $tables = q{SELECT string_agg(tablename, ' ' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'billing'};
	$same->('the same tables in schema billing', $tables);
	for my $t (split / /, sql($src, $tables))
	{
		$same->("billing.$t: row count and md5 of the ordered rows",
			"SELECT count(*) || ' ' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '-') FROM billing.$t t");
	}
	$same->('every sequence of schema billing has the same last_value',
		q{SELECT string_agg(format('%s=%s/%s', sequencename, last_value, increment_by), ' ' ORDER BY sequencename)
		    FROM pg_sequences WHERE schemaname = 'billing'});
	$same->('every trigger keeps its enable mode (ENABLE ALWAYS)',
		q{SELECT string_agg(format('%s.%s=%s', tgrelid::regclass, tgname, tgenabled), ' ' ORDER BY tgrelid::regclass::text, tgname)
		    FROM pg_trigger WHERE NOT tgisinternal AND tgrelid::regclass::text LIKE 'billing.%'});
	$same->('the same extension version', q{SELECT extversion FROM pg_extension WHERE extname = 'billing'});
	$same->('the same event triggers',
		q{SELECT string_agg(evtname || ':' || evtenabled::text, ' ' ORDER BY evtname) FROM pg_event_trigger});
	check("$label: billing_grant_app() privileges survive (deduct yes, verify no, schema usage yes)", 'true false true',
		sql($dst, qq{SELECT has_function_privilege('$role', 'billing_deduct(text,numeric,text,text,jsonb,timestamptz,text,text)', 'EXECUTE')
		                  || ' ' || has_function_privilege('$role', 'billing_verify(text)', 'EXECUTE')
		                  || ' ' || has_schema_privilege('$role', 'billing', 'USAGE')}));
	check("$label: billing_verify() is empty in the restored database", 0,
		sql($dst, 'SELECT count(*) FROM billing_verify()'));
}

# ---------------------------------------------------------------------------
# 4. each restored database still enforces everything
# ---------------------------------------------------------------------------
# the SQLSTATE SQL fails with ('ok' if it does not), optionally in replica mode
sub sqlstate
{
	my ($db, $sql, $replica) = @_;
	my ($rc, $out, $err) = $node->psql($db, ($replica ? "SET session_replication_role = replica;\n" : '') . <<SQL);
DO \$fz\$
BEGIN
    EXECUTE \$q\$$sql\$q\$;
    RAISE NOTICE 'state=ok';
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'state=%', SQLSTATE;
END;
\$fz\$;
SQL
	return $err =~ /state=([A-Za-z0-9]+)/ ? $1 : "($err)";
}

sub still_enforces
{
	my ($dst, $label) = @_;
	for my $replica (0, 1)
	{
		my $mode = $replica ? ' (session_replication_role = replica)' : '';
		for my $case (
			[ 'UPDATE billing.entries refused',        'ZB020', q{UPDATE billing.entries SET description = 'x'} ],
			[ 'DELETE FROM billing.entries refused',   'ZB020', q{DELETE FROM billing.entries} ],
			[ 'TRUNCATE billing.entries refused',      'ZB020', q{TRUNCATE billing.entries} ],
			[ 'UPDATE billing.rejections refused',     'ZB020', q{UPDATE billing.rejections SET reason = 'x'} ],
			[ 'UPDATE billing.account_events refused', 'ZB020', q{UPDATE billing.account_events SET reason = 'x'} ],
			[ 'UPDATE billing.hold_events refused',    'ZB020', q{UPDATE billing.hold_events SET amount_micros = 0} ],
			[ 'UPDATE billing.job_events refused',     'ZB020', q{UPDATE billing.job_events SET reason = 'x'} ],
			[ 'UPDATE billing.prices refused',         'ZB020', q{UPDATE billing.prices SET input_per_1m_micros = 0} ],
			[ 'DELETE FROM billing.price_overrides refused', 'ZB020', q{DELETE FROM billing.price_overrides} ],
			[ 'DELETE FROM billing.accounts refused',  'ZB020', q{DELETE FROM billing.accounts} ],
			[ 'DELETE FROM billing.holds refused',     'ZB020', q{DELETE FROM billing.holds} ],
			[ 'DELETE FROM billing.jobs refused',      'ZB020', q{DELETE FROM billing.jobs} ],
			[ "UPDATE billing.jobs SET state = 'completed' on a queued job refused", 'ZB070',
				q{UPDATE billing.jobs SET state = 'completed' WHERE idempotency_key = 'job-queued'} ])
		{
			my ($what, $state, $sql) = @$case;
			check("$label: $what$mode", $state, sqlstate($dst, $sql, $replica));
		}
	}

	# replays: idempotency survives the restore
	my $orig = sql($src, q{SELECT entry_id || ' true ' || billing.to_amount(balance_after_micros)
	                        FROM billing.entries WHERE tenant_id = 't-main' AND trace_id = 'trace-1'});
	my $bal_before = sql($dst, q{SELECT billing_balance('t-main')});
	check("$label: a replay of an old deduct trace id returns the original entry, replayed = t", $orig,
		sql($dst, q{SELECT entry_id || ' ' || replayed || ' ' || balance_after FROM billing_deduct('t-main', 0.012345, 'trace-1',
		            description => 'chat completion', metadata => '{"model": "gpt-4o", "provider": "openai", "input_tokens": 812}',
		            event_at => '2026-11-22 10:00:00+00')}));
	check("$label: ... and charges nothing", $bal_before, sql($dst, q{SELECT billing_balance('t-main')}));
	check("$label: a reuse of an old trace id with a different amount is ZB005", 'ZB005',
		sqlstate($dst, q{SELECT billing_deduct('t-main', 0.02, 'trace-1')}));
	check("$label: a recorded rejection replays as the same rejection", 'rejected true ZB004',
		sql($dst, q{SELECT status || ' ' || replayed || ' ' || sqlstate
		            FROM billing_try_deduct('t-eur', 1000000, 'too-much-1', description => 'big')}));
	check("$label: an old capture trace id replays", 't',
		sql($dst, q{SELECT replayed FROM billing_capture('t-main', 'h-captured', 0.5, 'h-captured-1')}));
	check("$label: an old job submit replays", 'completed true',
		sql($dst, q{SELECT state || ' ' || replayed FROM billing_job_submit('t-main', 'done', 'job-done', 2, input => '{"doc": "b"}')}));

	# new rows continue the sequences
	my $max_entry = sql($src, 'SELECT max(entry_id) FROM billing.entries');
	my $new_entry = sql($dst, q{SELECT entry_id FROM billing_deduct('t-main', 0.1, 'after-restore-1')});
	ok($new_entry =~ /^\d+$/ && $new_entry > $max_entry,
		"$label: a new deduct gets entry_id $new_entry > every restored one ($max_entry)");
	for my $case (
		[ 'rejections',     'rejection_id', q{SELECT 1 FROM billing_try_deduct('t-eur', 999999, 'after-restore-2')} ],
		[ 'holds',          'hold_id',      q{SELECT 1 FROM billing_hold('t-main', 1, 'after-restore-3')} ],
		[ 'hold_events',    'event_id',     q{SELECT 1 FROM billing_hold_extend('t-main', 'after-restore-3', '1 hour')} ],
		[ 'account_events', 'event_id',     q{SELECT 1 FROM billing_account_update('t-main', credit_limit => 21)} ],
		[ 'jobs',           'job_id',       q{SELECT 1 FROM billing_job_submit('t-main', 'new', 'after-restore-4', 1)} ],
		[ 'job_events',     'event_id',     q{SELECT 1 FROM billing_job_cancel('t-main',
		                                        (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'job-queued'))} ])
	{
		my ($t, $c, $write) = @$case;
		my $max = sql($src, "SELECT coalesce(max($c), 0) FROM billing.$t");
		my ($new) = (sql($dst, "$write;\nSELECT max($c) FROM billing.$t") =~ /(\S*)\z/);
		ok($new =~ /^\d+$/ && $new > $max,
			"$label: a new row of billing.$t gets $c $new > every restored one ($max)");
	}
	# the open hold and the processing job carry on
	check("$label: the restored open hold can be captured", '0.500000 open',
		sql($dst, q{SELECT -amount || ' ' || hold_status FROM billing_capture('t-main', 'h-open', 0.5, 'after-restore-5')}));
	check("$label: the restored processing job can be completed by its worker", 'completed',
		sql($dst, q{SELECT state FROM billing_job_complete('t-main',
		            (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'job-proc'), 1.5, NULL, 'w1')}));

	# What lets pg_restore's COPY into billing.jobs through must not let
	# anything else through: an API call made inside a COPY statement is
	# still logged, and a query string that merely starts with COPY cannot
	# insert a finished job.
	my $n = sql($dst, q{COPY (SELECT job_id FROM billing_job_submit('t-main', 'copy', 'inside-copy', 1)) TO STDOUT});
	check("$label: a job submitted inside COPY (SELECT ... billing_job_submit(...)) TO STDOUT has its 'submitted' job event",
		1, sql($dst, "SELECT count(*) FROM billing.job_events WHERE tenant_id = 't-main' AND job_id = $n AND to_state = 'queued'"));
	my ($rc, $out, $err) = $node->psql($dst, '', extra_params => [ '-v', 'VERBOSITY=verbose', '-c',
		q{COPY (SELECT 1) TO STDOUT; INSERT INTO billing.jobs (tenant_id, idempotency_key, kind, state, attempt, estimated_micros, actual_micros) VALUES ('t-main', 'forged', 'x', 'completed', 1, 1000000, 5000000) RETURNING 'inserted: ' || state} ]);
	ok($err =~ /ERROR: +(ZB07[02])/,
		"$label: a query string starting with COPY cannot INSERT a completed job without its charge ("
		  . ($1 // 'no ZB070/ZB072') . ')') or diag("$out\n$err");
	check("$label: billing_verify() is empty after the new writes", 0, sql($dst, 'SELECT count(*) FROM billing_verify()'));
}

for my $dst (sort keys %restores)
{
	same_as_source($dst, $restores{$dst}[0]);
	still_enforces($dst, $restores{$dst}[0]);
}

# A COPY billing.jobs FROM that a function runs is no restore: its rows are
# checked in full (the job names a charge entry that does not exist).
my $copy_file = "$tmp/forged-job.copy";
check('a COPY billing.jobs FROM inside a function is checked in full', 'ZB072',
	sqlstate('billing_dump_dst_j4', qq{DO \$d\$ BEGIN
		EXECUTE format('COPY (SELECT ''t-main'', 990001, ''forged-copy'', ''x'', ''completed'', 1, 1000000, 1000000, 990999) TO %L', '$copy_file');
		EXECUTE format('COPY billing.jobs (tenant_id, job_id, idempotency_key, kind, state, attempt, estimated_micros, actual_micros, charge_entry_id) FROM %L', '$copy_file');
	END \$d\$}));

BillingTest::no_crashes($node);
$node->stop;
done_testing();

# Every upgrade path, against a fresh install.
#
# For every release R (releases/billing--R.sql, installed by make install)
# other than the current version: create the extension at R, fill it through
# R's own API with every kind of state, then ALTER EXTENSION billing UPDATE
# as another superuser than the one that created it, while charges keep
# coming in from pgbench.  Then:
#  - every extension member's definition equals a fresh install of the
#    current version (test/catalog.sql: functions, tables, columns,
#    constraints, indexes, triggers, views, types, grants, comments,
#    ownership), line by line;
#  - every row that existed before is still there, unchanged in every column
#    it had;
#  - every charge pgbench got an answer for is in the ledger exactly once;
#  - billing_verify() is clean; old trace ids replay; a job claimed before
#    the upgrade completes after it; the API works.
use strict;
use warnings FATAL => 'all';
use IPC::Run;
use PostgreSQL::Test::Utils;
use Test::More;
use BillingTest;

my $repo    = $ENV{BILLING_REPO} // $BillingTest::REPO;
my $current = BillingTest::extversion();
my @releases = sort grep { $_ ne $current }
  map { m{billing--([^-/]+)\.sql$} ? $1 : () } glob("$repo/releases/billing--*.sql");

plan skip_all => "no release before $current" unless @releases;

my $node = BillingTest::node('upgrade', database => 'postgres', extension => 0);
$node->safe_psql('postgres', 'CREATE ROLE upgrader SUPERUSER LOGIN; CREATE ROLE up_app LOGIN;
	CREATE ROLE up_treasury LOGIN; CREATE ROLE up_pricer LOGIN; CREATE ROLE "gw-app" LOGIN');

# the whole API of 1.3, every kind of state
my $fill = q{
SELECT billing_account_create('up-' || g, credit_limit => g % 3) FROM generate_series(1, 20) g;
SELECT billing_account_create('up-tz', timezone => 'Europe/Berlin', metadata => '{"plan": "pro"}');
SELECT billing_credit('up-' || g, 100, 'up-top-' || g) FROM generate_series(1, 20) g;
SELECT billing_credit('up-3', 5, 'up-grant-3', kind => 'grant', description => 'welcome');
SELECT billing_deduct('up-' || (g % 20 + 1), 0.010001 * (g % 7 + 1), 'up-d-' || g,
                      metadata => jsonb_build_object('model', 'm' || g % 3)) FROM generate_series(1, 500) g;
SELECT billing_deduct_many(ARRAY['up-1', 'up-2'], ARRAY[0.5, 0.25], ARRAY['up-m-1', 'up-m-2']);
SELECT billing_try_deduct('up-1', 100000, 'up-rejected');
SELECT billing_deduct('up-9', 0.5, 'billing:legacy-1');
SELECT billing_hold('up-2', 5, 'up-h1');
SELECT billing_capture('up-2', 'up-h1', 2, 'up-c1');
SELECT billing_hold('up-2', 1, 'up-h2');
SELECT billing_release('up-2', 'up-h2', 'up-r2');
SELECT billing_hold('up-2', 1, 'up-h-mark');
SELECT billing_capture('up-2', 'up-h-mark', 0.5, 'up-c-mark', metadata => '{"price_effective_from": "1.3"}');
SELECT billing_hold('up-6', 1, 'up-h-open', expires_in => '1 hour');
SELECT billing_limits_set('up-3', daily_requests => 1000, monthly_spend => 500);
SELECT billing_account_update('up-7', credit_limit => 10, reason => 'ticket 1');
SELECT billing_account_update('up-8', status => 'suspended', reason => 'chargeback');
SELECT billing_api_key_create('up-4', 'k1', budget => 10, budget_period => 'month');
SELECT billing_deduct('up-4', 1, 'up-key-1', api_key => 'k1');
SELECT billing_price_set('m1', 0.001, 0.002, '2026-01-01');
SELECT billing_price_set('m1', 0.0025, 0.010001, '2026-06-01');
SELECT billing_price_set('m2', 0.000001, 999999999.999999, '2026-01-01', 'EUR');
SELECT billing_deduct_usage('up-5', 'm1', 1000, 500, 'up-u-1');
SELECT billing_deduct_usage('up-5', 'm1', 1234, 567, 'up-u-2');
SELECT billing_job_submit('up-5', 'translate', 'up-j1', 3);
SELECT billing_job_submit('up-5', 'translate', 'up-j2', 2);
SELECT billing_job_submit('up-5', 'translate', 'up-j3', 2);
SELECT billing_job_claim('w1', max_jobs => 3);
SELECT billing_job_complete('up-5', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'up-j2'), 1.5);
SELECT billing_job_fail('up-5', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'up-j3'), 'boom', retryable => false);
SELECT billing_grant_app('up_app');
SELECT billing_grant_app('"gw-app"');
GRANT SELECT ON billing.usage_daily TO "gw-app";
SELECT billing_grant_reporting('up_app');
GRANT USAGE ON SCHEMA billing TO up_treasury;
GRANT EXECUTE ON FUNCTION billing_credit(text, numeric, text, text, jsonb, timestamptz, text) TO up_treasury;
GRANT EXECUTE ON FUNCTION billing_price_set(text, numeric, numeric, timestamptz, text) TO up_pricer;
GRANT EXECUTE ON FUNCTION billing_cost(text, bigint, bigint, timestamptz, text) TO up_pricer WITH GRANT OPTION;
GRANT USAGE ON SCHEMA billing TO up_pricer;
GRANT SELECT ON billing.price_list, billing.usage_by_model TO up_pricer;
};

# 1.4 stores prices per 1M tokens (1.3: per 1,000): the upgrade converts
# every price exactly, and prices a usage as 1.3 did
my $prices_13 = q{SELECT (model, currency, effective_from, input_per_1k_micros * 1000,
	output_per_1k_micros * 1000, created_at)::text FROM billing.prices ORDER BY 1};
my $prices_14 = q{SELECT (model, currency, effective_from, input_per_1m_micros, output_per_1m_micros,
	created_at)::text FROM billing.prices ORDER BY 1};
my $costs = q{SELECT billing_cost('m1', 1000, 500, '2026-03-01 00:00+00'),
	billing_cost('m1', 1234, 567, '2026-06-01 00:00+00'), billing_cost('m1', 999999, 1, '2026-07-01 00:00+00'),
	billing_cost('m2', 500, 0, currency => 'EUR'), billing_cost('m2', 1, 1, currency => 'EUR')};

# every table, as rows of the columns it has now (ordered), for comparing
sub table_rows
{
	my ($db, $cols_of) = @_;
	my %rows;
	for my $t (sort keys %$cols_of)
	{
		my $cols = join(', ', map { "x.$_" } @{ $cols_of->{$t} });
		$rows{$t} = [ split /\n/, $node->safe_psql($db,
			"SELECT ($cols)::text FROM billing.$t x ORDER BY 1") ];
	}
	return \%rows;
}

sub table_columns
{
	my ($db) = @_;
	my %cols;
	for my $line (split /\n/, $node->safe_psql($db, q{
		SELECT c.relname || ' ' || string_agg(a.attname, ' ' ORDER BY a.attnum)
		  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
		 WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'
		 GROUP BY c.relname}))
	{
		my ($t, @c) = split / /, $line;
		$cols{$t} = \@c;
	}
	return \%cols;
}

$node->safe_psql('postgres', 'CREATE DATABASE fresh');
$node->safe_psql('fresh', 'CREATE EXTENSION billing');
my $fresh_catalog = BillingTest::catalog($node, 'fresh');

for my $r (@releases)
{
	my $db = "up_" . ($r =~ s/\W/_/gr);
	$node->safe_psql('postgres', "CREATE DATABASE $db");
	$node->safe_psql($db, "CREATE EXTENSION billing VERSION '$r'");
	is($node->safe_psql($db, "SELECT extversion FROM pg_extension WHERE extname = 'billing'"),
		$r, "$r: installed from its frozen script");
	$node->safe_psql($db, $fill);
	is($node->safe_psql($db, 'SELECT count(*) FROM billing_verify()'), '0', "$r: filled, audit clean");

	my $cols_before = table_columns($db);
	# prices change their unit (checked below)
	delete $cols_before->{prices};
	my $before = table_rows($db, $cols_before);
	my $prices_before = $node->safe_psql($db, $prices_13);
	my $costs_before = $node->safe_psql($db, $costs);
	my $usage_before = $node->safe_psql($db,
		q{SELECT string_agg(amount_micros::text, ' ' ORDER BY trace_id) FROM billing.entries WHERE trace_id LIKE 'up-u-%'});

	# charges from 4 clients for 8 seconds on tenants of their own (their
	# rows change), the upgrade in the middle
	$node->safe_psql($db, q{SELECT billing_account_create('wl-' || g) FROM generate_series(1, 8) g;
		SELECT billing_credit('wl-' || g, 1000, 'wl-top-' || g) FROM generate_series(1, 8) g});
	my $script = PostgreSQL::Test::Utils::tempdir() . '/charge.sql';
	open my $fh, '>', $script or die $!;
	print $fh "\\set id random(1, 1000000000000000)\n"
	  . "\\set t random(1, 8)\n"
	  . "SELECT billing_deduct('wl-' || :t, 0.000001, 'wl-' || :id);\n";
	close $fh;
	my ($out, $err) = ('', '');
	my $bench = IPC::Run::start(
		[ 'pgbench', '-n', '-c', '4', '-j', '2', '-T', '8', '-f', $script,
		  '-h', $node->host, '-p', $node->port, '-U', 'upgrader', $db ],
		'>', \$out, '2>', \$err);
	# the upgrade once the clients are charging (not after a fixed sleep:
	# on a busy machine pgbench may take that long to start)
	ok(BillingTest::wait_until(60, sub {
		$node->safe_psql($db, "SELECT count(*) FROM billing.entries WHERE trace_id LIKE 'wl-%' AND kind = 'deduct'") >= 20 }),
		"$r: the clients are charging");
	my ($rc, $uout, $uerr) = $node->psql($db, 'ALTER EXTENSION billing UPDATE',
		extra_params => [ '-U', 'upgrader' ]);
	is($rc, 0, "$r: ALTER EXTENSION billing UPDATE by another superuser, under load")
	  or diag($uerr);
	like($uerr, qr/WARNING:  billing 1.4: role "up_app" keeps the charging API and may no longer call billing_credit, billing_account_create/,
		"$r: the upgrade warns that 1.3's application role lost what only the treasury and admin roles may do");
	$bench->finish;
	my ($processed) = $out =~ /number of transactions actually processed: (\d+)/;
	is($?, 0, "$r: pgbench ran through the upgrade without an error") or diag($out, $err);
	ok(($processed // 0) > 0, "$r: pgbench charged " . ($processed // 0) . " times");
	is($node->safe_psql($db, "SELECT count(*) FROM billing.entries WHERE trace_id LIKE 'wl-%' AND kind = 'deduct'"),
		$processed // -1, "$r: every answered charge is in the ledger, once");

	is($node->safe_psql($db, "SELECT extversion FROM pg_extension WHERE extname = 'billing'"),
		$current, "$r: updated to $current");
	my $catalog = BillingTest::catalog($node, $db);
	my @diff = do {
		my %f = map { $_ => 1 } split /\n/, $fresh_catalog;
		my %u = map { $_ => 1 } split /\n/, $catalog;
		((map { "fresh only: $_" } grep { !$u{$_} } split /\n/, $fresh_catalog),
		 (map { "upgraded only: $_" } grep { !$f{$_} } split /\n/, $catalog));
	};
	is(join("\n", @diff), '', "$r: every member's definition equals a fresh install of $current ("
		  . scalar(split /\n/, $catalog) . " facts)");

	my $after = table_rows($db, $cols_before);
	for my $t (sort keys %$before)
	{
		my %now = map { $_ => 1 } @{ $after->{$t} };
		my @lost = grep { !$now{$_} } @{ $before->{$t} };
		is(scalar(@lost), 0, "$r: every row of billing.$t (" . scalar(@{ $before->{$t} })
			  . ") is unchanged") or diag(join("\n", @lost[0 .. ($#lost < 4 ? $#lost : 4)]));
	}

	is($node->safe_psql($db, 'SELECT count(*) FROM billing_verify()'), '0', "$r: billing_verify() clean after the upgrade");
	is($node->safe_psql($db, $prices_14), $prices_before,
		"$r: every price is converted exactly to a price per 1M tokens (x 1000)");
	is($node->safe_psql($db, q{SELECT count(*) FROM billing.prices
			WHERE num_nonnulls(cached_input_per_1m_micros, cache_write_per_1m_micros, reasoning_per_1m_micros,
			                   per_request_micros, per_second_micros) > 0}),
		'0', "$r: a converted price has no other rates (cached input at the input rate, reasoning at the output rate)");
	is($node->safe_psql($db, $costs), $costs_before, "$r: billing_cost gives the costs of $r for input and output tokens");
	is($node->safe_psql($db, q{SELECT string_agg((d.amount * 1000000)::bigint::text, ' ' ORDER BY e.trace_id)
			FROM billing.entries e,
			     LATERAL billing_deduct_usage('up-5', 'm1', (e.metadata->>'input_tokens')::bigint,
			                                  (e.metadata->>'output_tokens')::bigint, e.trace_id || '-after',
			                                  event_at => e.created_at) d
			WHERE e.trace_id IN ('up-u-1', 'up-u-2')}),
		$usage_before, "$r: billing_deduct_usage charges what $r charged for the same usage at the same time");
	is($node->safe_psql($db, q{SELECT string_agg(d.replayed::text, ' ' ORDER BY e.trace_id) || '|'
			       || string_agg((d.amount * 1000000)::bigint::text, ' ' ORDER BY e.trace_id)
			FROM billing.entries e,
			     LATERAL billing_deduct_usage('up-5', 'm1', (e.metadata->>'input_tokens')::bigint,
			                                  (e.metadata->>'output_tokens')::bigint, e.trace_id) d
			WHERE e.trace_id IN ('up-u-1', 'up-u-2')}),
		"true true|$usage_before", "$r: a usage charged by $r replays after the upgrade (its metadata as $r wrote it)");
	is($node->safe_psql($db, q{SELECT amount, replayed FROM billing_capture('up-2', 'up-h-mark', 0.5, 'up-c-mark',
			metadata => '{"price_effective_from": "1.3"}')}),
		"-0.500000|t", "$r: a capture whose metadata has the key of priced usage (which 1.4 refuses) replays after the upgrade");
	my ($mark_out, $mark_err) = ('', '');
	$node->psql($db, q{SELECT billing_capture('up-2', 'up-h-mark', 0.1, 'up-c-mark-2',
			metadata => '{"price_effective_from": "1.4"}')}, stdout => \$mark_out, stderr => \$mark_err);
	like($mark_err, qr/metadata has the reserved key "price_effective_from"/, "$r: ... and a new one is refused");
	is($node->safe_psql($db, q{SELECT
			has_function_privilege('up_app', 'billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text, bigint, bigint, bigint, bigint, numeric)', 'EXECUTE'),
			has_function_privilege('up_app', 'billing_cost(text, bigint, bigint, timestamptz, text, bigint, bigint, bigint, bigint, numeric, text)', 'EXECUTE'),
			has_function_privilege('up_pricer', 'billing_price_set(text, numeric, numeric, timestamptz, text, numeric, numeric, numeric, numeric, numeric, numeric, numeric)', 'EXECUTE'),
			has_function_privilege('up_pricer', 'billing_cost(text, bigint, bigint, timestamptz, text, bigint, bigint, bigint, bigint, numeric, text)', 'EXECUTE WITH GRANT OPTION'),
			has_function_privilege('up_pricer', 'billing_deduct_usage(text, text, bigint, bigint, text, text, jsonb, timestamptz, text, bigint, bigint, bigint, bigint, numeric)', 'EXECUTE'),
			has_table_privilege('up_pricer', 'billing.price_list', 'SELECT'),
			has_table_privilege('up_pricer', 'billing.usage_by_model', 'SELECT'),
			has_table_privilege('up_pricer', 'billing.usage_daily', 'SELECT'),
			has_table_privilege('up_app', 'billing.usage_daily', 'SELECT')}),
		't|t|t|t|f|t|t|f|t', "$r: the grants on the functions and views 1.4 replaces are on their replacements");
	is($node->safe_psql($db, q{SELECT
			has_function_privilege('gw-app', 'billing_cost(text, bigint, bigint, timestamptz, text, bigint, bigint, bigint, bigint, numeric, text)', 'EXECUTE'),
			has_table_privilege('gw-app', 'billing.usage_daily', 'SELECT')}),
		't|t', "$r: ... also for a role whose name needs quoting");
	is($node->safe_psql($db, q{SELECT has_function_privilege('up_app',
			'billing_deduct(text, numeric, text, text, jsonb, timestamptz, text, text)', 'EXECUTE')
			AND has_table_privilege('up_app', 'billing.balances', 'SELECT')}),
		't', "$r: the grants made to a role before the upgrade are kept");
	is($node->safe_psql($db, q{SET ROLE up_app; SELECT count(*) > 0 FROM billing.balances; SELECT count(*) > 0 FROM billing.grant_balances}),
		"t\nf", "$r: a reporting role of 1.3 reads billing.balances (which now leaves expired grants out) and 1.4's new views");
	is($node->safe_psql($db, q{SELECT has_function_privilege('up_app',
			'billing_credit(text, numeric, text, text, jsonb, timestamptz, text)', 'EXECUTE'),
			has_function_privilege('up_app', 'billing_account_update(text, numeric, text, text, jsonb, text)', 'EXECUTE'),
			has_function_privilege('up_treasury', 'billing_credit(text, numeric, text, text, jsonb, timestamptz, text)', 'EXECUTE')}),
		'f|f|t', "$r: 1.3's application role can no longer mint money or change settings; a role granted billing_credit on purpose keeps it");
	is($node->safe_psql($db, q{SELECT replayed FROM billing_deduct('up-2', 0.020002, 'up-d-1',
			metadata => '{"model": "m1"}')}), 't', "$r: an old trace id replays");
	is($node->safe_psql($db, q{SELECT replayed FROM billing_deduct('up-9', 0.5, 'billing:legacy-1')}), 't',
		"$r: a charge whose trace id starts with billing: (billing's own since 1.4) still replays");
	is($node->safe_psql($db, q{SELECT amount FROM billing_refund('up-9', 'billing:legacy-1', 0.5, 'up-r-legacy')}),
		'0.500000', "$r: ... and can be refunded");
	is($node->safe_psql($db, q{SELECT status, sqlstate FROM billing_try_deduct('up-1', 100000, 'up-rejected')}),
		'rejected|ZB004', "$r: an old recorded rejection replays");
	is($node->safe_psql($db, q{SELECT state FROM billing_job_complete('up-5',
			(SELECT job_id FROM billing.jobs WHERE idempotency_key = 'up-j1'), 2.5)}),
		'completed', "$r: a job claimed before the upgrade completes after it");
	my $before_capture = $node->safe_psql($db, q{SELECT balance_micros FROM billing.accounts WHERE tenant_id = 'up-6'});
	is($node->safe_psql($db, q{SELECT amount || '|' || hold_status || '|' || balance_after
			FROM billing_capture('up-6', 'up-h-open', 0.5, 'up-c-after', final => true)}),
		'-0.500000|captured|' . $node->safe_psql($db, "SELECT billing.to_amount($before_capture - 500000)"),
		"$r: a hold opened before the upgrade is captured after it (0.5 off the balance, the hold settled)");
	# 1.4's grants and refunds on an account and a charge of the old release:
	# its money is the wallet's, a grant goes first, an old charge is refunded
	# to the wallet
	is($node->safe_psql($db, q{SELECT amount FROM billing_grant('up-2', 1, 'up-g-1', expires_at => now() + interval '1 day', priority => 5);
			SELECT FROM billing_deduct('up-2', 0.25, 'up-d-after');
			SELECT (draws[1] = (SELECT grant_id FROM billing.grants WHERE trace_id = 'up-g-1'))::text || '/' || draws[2]
			  FROM billing.entries WHERE trace_id = 'up-d-after'}),
		"1.000000\ntrue/250000", "$r: a grant on an account of the old release is spent before its wallet");
	is($node->safe_psql($db, q{SELECT amount, refundable FROM billing_refund('up-2', 'up-d-1', 0.020002, 'up-r-1');
			SELECT draws IS NULL FROM billing.entries WHERE trace_id = 'up-r-1'}),
		"0.020002|0.000000\nt", "$r: a charge of the old release is refunded in full, to the wallet");
	is($node->safe_psql($db, 'SELECT count(*) FROM billing_verify()'), '0', "$r: billing_verify() clean at the end");
}

BillingTest::no_crashes($node);
done_testing();

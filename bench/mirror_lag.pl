# bench/mirror_lag.pl -- one tenant's commit -> Redis lag while another
# tenant with many API keys is charged (issue 12, M6).  Run it with
# bench/mirror_lag.sh, which sets up the environment like test/run.sh.
#
# A node with the worker mirroring into a redis-server of its own; tenant
# `big` with LAG_KEYS API keys (default 20,000) and tenant `small` without
# any.  pgbench charges `big` through one of its keys at LAG_RATE charges/s
# (default 100) for the whole run; meanwhile LAG_SAMPLES (default 200)
# charges of `small`, one every 50 ms, each timed from the moment
# billing_deduct returned to the moment Redis shows its version (polled
# every millisecond over one socket).  Prints the p50, p90 and max of that
# lag, its mean and how many samples took over 50 ms, the worker's own
# recent_lag_p50/p99 (billing_sync_status(), every
# tenant) and how many EVALSHA Redis ran per charge of `big`.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use BillingTest;

my $keys    = $ENV{LAG_KEYS}    // 20000;
my $rate    = $ENV{LAG_RATE}    // 100;
my $samples = $ENV{LAG_SAMPLES} // 200;

my $redis = BillingTest::Redis->new('lag');
my $node  = BillingTest::node('lag', redis => $redis, database => 'app',
	conf => "billing.check_interval = 0\n");
$node->safe_psql('app', qq{
	SELECT billing_account_create('big'), billing_account_create('small');
	SELECT billing_credit('big', 1000000, 'c-big'), billing_credit('small', 1000000, 'c-small');
	SELECT count(*) FROM generate_series(1, $keys) i, LATERAL billing_api_key_create('big', 'k' || i);
	SELECT billing_api_key_create('big', 'k1');
});
ok(BillingTest::wait_until(600, sub {
	my $r = BillingTest::query($node, 'app',
		'SELECT dirty_accounts = 0 AND NOT full_resync_pending FROM billing_sync_status()') // '';
	return $r eq 't' && $redis->cli('EXISTS', "billing:{big}:key:k" . ($keys || 1)) eq '1'
	  && $redis->cli('EXISTS', 'billing:{small}') eq '1';
}), "the mirror holds both tenants and the $keys keys");

my $conn = $redis->connect(timeout => 60);
sub evalsha_calls
{
	my $s = $redis->cli('INFO', 'commandstats');
	return $s =~ /^cmdstat_evalsha:calls=(\d+)/m ? $1 : 0;
}
sub big_charges { BillingTest::query($node, 'app', "SELECT count(*) FROM billing.entries WHERE tenant_id = 'big' AND kind = 'deduct'") }

# the load on `big`
my $script = PostgreSQL::Test::Utils::tempdir() . '/big.sql';
PostgreSQL::Test::Utils::append_to_file($script,
	"SELECT 1 FROM billing_deduct('big', 0.000001, 'b-' || pg_catalog.txid_current(), api_key => 'k1');\n");
my $duration = int($samples * 0.08) + 30;
my $calls0 = evalsha_calls();
my $big0 = big_charges();
my $pgbench = IPC::Run::start(
	[ 'pgbench', '-n', '-c', 2, '-j', 1, '-R', $rate, '-T', $duration, '-f', $script,
	  '-h', $node->host, '-p', $node->port, 'app' ],
	'>', \my $pgbench_out, '2>', \my $pgbench_err);
sleep 3;

my $session = BillingTest::Session->new($node, 'app');
my @lag;
for my $i (1 .. $samples)
{
	my $r = $session->call("SELECT version FROM billing_deduct('small', 0.000001, 's-$i')");
	die "charge of small failed: $r->{message}" unless $r->{status} eq 'ok';
	my $v = $r->{rows}[0];
	my $t0 = time;
	while (1)
	{
		my $got = $conn->command('HGET', 'billing:{small}', 'version') // -1;
		last if $got >= $v;
		die 'small never reached Redis' if time - $t0 > 120;
		usleep(1000);
	}
	push @lag, (time - $t0) * 1000;
	usleep(50_000);
}
my $status = BillingTest::query($node, 'app',
	'SELECT round(recent_lag_p50_ms::numeric, 1) || \' / \' || round(recent_lag_p99_ms::numeric, 1) FROM billing_sync_status()');
my $calls = evalsha_calls() - $calls0;
my $big = big_charges() - $big0;
$pgbench->kill_kill;

@lag = sort { $a <=> $b } @lag;
my $pct = sub { $lag[ int($_[0] * $#lag) ] };
my $mean = 0;
$mean += $_ / @lag for @lag;
my $slow = grep { $_ > 50 } @lag;
my $line = sprintf("keys %d, big charged at %d/s: small's commit->Redis lag p50 %.1f ms, p90 %.1f ms, max %.1f ms,"
	  . " mean %.1f ms, %d of %d samples over 50 ms; worker recent_lag p50/p99 %s ms;"
	  . " EVALSHA per charge of big %.1f (%d calls, %d charges)",
	$keys, $rate, $pct->(0.5), $pct->(0.9), $lag[-1], $mean, $slow, scalar(@lag), $status,
	$big ? ($calls - $samples) / $big : 0, $calls, $big);
diag($line);
ok(1, 'measured');
done_testing();


# Issue 12, the worker's robustness items: a billing.database that does not
# exist (said once; the worker waits instead of exiting every 5 s), one
# tenant whose snapshot fails (the rest of its batch, and every resync, go
# on), the consistency check at a day rollover (no false "repaired"), a
# full resync (FLUSHALL, or a client deleting the marker) interleaving the
# dirty tenants' pushes instead of holding them up.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use BillingTest;
use BillingMirror;

my $db = 'later';
my $redis = BillingTest::Redis->new('mirror');
my $node = BillingTest::node('main', database => 'postgres', extension => 0, redis => $redis,
	conf => join("\n", "billing.database = '$db'", "billing.check_interval = 0",
		# no purge: its purge.lua reads hashes with HGETALL too, which the
		# count of the checks' HGETALLs below would take for a check
		"billing.purge_interval = 0", "billing.sync_batch_size = 20", "billing.maintenance_interval = 500"));

sub status
{
	my ($col) = @_;
	return BillingTest::query($node, $db, "SELECT $col FROM billing_sync_status()") // '';
}
sub count_log
{
	my ($re) = @_;
	return scalar(() = BillingTest::slurp_logs($node) =~ /$re/g);
}

# --- billing.database names a database that does not exist
my $missing = qr/billing sync: database "later" \(billing\.database\) does not exist; the worker waits/;
ok(BillingTest::wait_until(120, sub { count_log($missing) >= 1 }), 'the worker says the database is missing');
my $waited_from = time;
# two probe rounds (5 s each) later: still the same process, said once
BillingTest::wait_until(60, sub { time - $waited_from > 11 });
is(count_log($missing), 1, 'said once, not every 5 s');
is(count_log(qr/background worker "billing sync" \(PID \d+\) exited/), 0, 'the worker did not exit and restart');
$node->safe_psql('postgres', "CREATE DATABASE $db");
$node->safe_psql($db, 'CREATE EXTENSION billing');
$node->safe_psql($db, "SELECT billing_account_create('t1')");
ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $redis) }),
	'once the database exists, the worker connects and mirrors');

# --- one tenant whose snapshot fails does not fail its batch
$node->safe_psql($db, "SELECT billing_account_create(t) FROM unnest(ARRAY['a-bad', 'a-good', 'z-good']) AS t");
ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $redis) }), 'three more accounts');
# a time zone no snapshot can be built with (set behind the API's back)
$node->safe_psql($db, "UPDATE billing.accounts SET timezone = 'Nowhere/Bogus' WHERE tenant_id = 'a-bad'");
$node->safe_psql($db, "BEGIN; SELECT billing_credit('a-good', 5, 'g1'); SELECT billing_credit('z-good', 5, 'g2'); "
	  . "SELECT billing.sync_mark('a-bad'); COMMIT;");
my $good = sub {
	my $v = $redis->cli('HGET', 'billing:{a-good}', 'balance');
	my $w = $redis->cli('HGET', 'billing:{z-good}', 'balance');
	return $v eq '5000000' && $w eq '5000000';
};
ok(BillingTest::wait_until(120, $good), 'the other tenants of the batch were pushed');
like(status('last_error'), qr/a-bad/, 'last_error names the tenant set aside: ' . status('last_error'));
# a reporting role limited to other tenants does not see it (the view and
# the function alike); an unlimited one does
$node->safe_psql($db, "CREATE ROLE rep_scoped; CREATE ROLE rep_all;
	SELECT billing_grant_reporting('rep_scoped'); SELECT billing_grant_reporting('rep_all');
	SELECT count(*) FROM billing_scope_role('rep_scoped', ARRAY['z-good'])");
is(BillingTest::query($node, $db, "SET ROLE rep_scoped; SELECT (SELECT last_error IS NULL FROM billing.sync_status)
	AND (SELECT last_error IS NULL FROM billing_sync_status())"), 't', 'a scoped reporting role does not see it');
like(BillingTest::query($node, $db, "SET ROLE rep_all; SELECT last_error FROM billing.sync_status") // '', qr/a-bad/,
	'an unscoped one does');

# and a full resync (FLUSHALL) goes past it
$redis->cli('FLUSHALL');
$node->safe_psql($db, "SELECT billing_credit('z-good', 1, 'g3')");
ok(BillingTest::wait_until(120, sub {
	($redis->cli_ok('HGET', 'billing:{z-good}', 'balance'))[0] eq '6000000'
	  && ($redis->cli_ok('HGET', 'billing:{t1}', 'version'))[0] ne '' }),
	'a full resync pushes every other account');
$node->safe_psql($db, "UPDATE billing.accounts SET timezone = 'UTC' WHERE tenant_id = 'a-bad'");
$node->safe_psql($db, "SELECT billing_credit('a-bad', 1, 'b1')");
ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $redis) }),
	'repaired, the tenant set aside is pushed again');

# --- the consistency check at a day rollover: nothing drifted
my $now_ms = int(time * 1000);
# a hash as pushed yesterday: counters of a day that has ended since
$redis->cli('HSET', 'billing:{t1}', 'day_requests', '3', 'day_spend', '5000',
	'day_resets_at_ms', $now_ms - 1000);
# (each check reads every hash with HGETALL)
my $hgetalls = sub { ($redis->cli('INFO', 'commandstats') =~ /cmdstat_hgetall:calls=(\d+)/)[0] // 0 };
my $nhashes = $node->safe_psql($db, "SELECT count(*) FROM billing.sync_snapshot(NULL, '', 1000000)");
my $c0 = $hgetalls->();
$node->safe_psql($db, "ALTER SYSTEM SET billing.check_interval = 1; SELECT pg_reload_conf()");
ok(BillingTest::wait_until(120, sub { $hgetalls->() >= $c0 + 2 * $nhashes }), 'two checks ran');
is(status('repaired'), '0', 'a day that ended is no drift: repaired stays 0');
# the tests' own comparison (BillingMirror) sees it as the worker does: a
# test that waits for Redis to equal the database across a midnight passes
ok(BillingTest::mirror_equals($node, $db, $redis), 'the tests\' comparison agrees: Redis equals the database');
{
	# a hash pushed on the day that ended at 1000 ms, read at 1500 ms; the
	# database is on the day that ends at 2000 ms
	my $db_line = 'billing:{x} balance=5 day_requests=0 day_resets_at_ms=2000 day_spend=0 version=7';
	my $ended   = 'billing:{x} balance=5 day_requests=3 day_resets_at_ms=1000 day_spend=9 version=7';
	my $settle = sub { BillingMirror::settle_ended_periods($_[0], $_[1], 1500) };
	is($settle->($db_line, $ended), $db_line,
		'BillingMirror: counters of a day that ended since the push count as the new day\'s zeros');
	(my $charged = $db_line) =~ s/day_requests=0/day_requests=1/;
	is($settle->($charged, $ended), $ended, '... not when the database counts the new day already (the push is due)');
	(my $same_day = $ended) =~ s/day_resets_at_ms=1000/day_resets_at_ms=2000/;
	is($settle->($db_line, $same_day), $same_day, '... nor within the same day');
	is(BillingMirror::settle_ended_periods($db_line, $ended, 999), $ended,
		'... nor before the reset time Redis holds has come (the worker calls that drift)');
	(my $drift = $ended) =~ s/balance=5/balance=6/;
	isnt($settle->($db_line, $drift), $db_line, '... and any other field still differs');
	my $key_db = 'billing:{x}:key:k budget=9 resets_at_ms=2000 spent=0 status=active version=3';
	my $key_ended = 'billing:{x}:key:k budget=9 resets_at_ms=1000 spent=4 status=active version=3';
	is($settle->("$db_line\n$key_db", "$ended\n$key_ended"), "$db_line\n$key_db",
		'... and an API key\'s budget period likewise');
}
# a real drift is still repaired and counted
$redis->cli('HSET', 'billing:{t1}', 'balance', '999');
ok(BillingTest::wait_until(120, sub { status('repaired') eq '1' }), 'a drifted balance is repaired and counted');
$node->safe_psql($db, "ALTER SYSTEM SET billing.check_interval = 0; SELECT pg_reload_conf()");

# --- a full resync interleaves the dirty tenants' pushes
$node->safe_psql($db, "SELECT billing_account_create('m' || lpad(i::text, 5, '0')) FROM generate_series(1, 3000) AS i");
$node->safe_psql($db, "SELECT billing_account_create('zzzz')");
ok(BillingTest::wait_until(300, sub { BillingTest::mirror_equals($node, $db, $redis) }), '3,000 more accounts');
# The flush and the change happen while the worker is away from Redis, so
# that the change is waiting when the resync starts, however slow this
# machine is (else a fast resync could end before the change commits)
my $redis_host = $node->safe_psql($db, 'SHOW billing.redis_host');
sub away_from_redis
{
	$node->safe_psql($db, "ALTER SYSTEM SET billing.redis_host = ''; SELECT pg_reload_conf()");
	ok(BillingTest::wait_until(120, sub { status('connected') eq 'f' }), 'the worker left Redis');
}
sub back_to_redis
{
	$node->safe_psql($db, "ALTER SYSTEM SET billing.redis_host = '$redis_host'; SELECT pg_reload_conf()");
}
my $resyncs = status('full_resyncs');
away_from_redis();
$redis->cli('FLUSHALL');
$node->safe_psql($db, "SELECT billing_credit('zzzz', 7, 'z1')");
back_to_redis();
ok(BillingTest::wait_until(300, sub { status('full_resyncs') > $resyncs }), 'the full resync ran');
ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $redis) }), 'the mirror converged');
my $zzzz = $redis->cli('HGET', 'billing:{zzzz}', 'synced_at_ms');
my $last_page = $redis->cli('HGET', 'billing:{m03000}', 'synced_at_ms');
cmp_ok($zzzz, '<', $last_page,
	"the change of zzzz (last in tenant order) was pushed between the resync's pages, "
	  . ($last_page - $zzzz) . ' ms before the resync reached the last page');

# the same when a client deletes only the marker: resync, the mirror goes on.
# The hashes are all still there and a resync writes only those Redis lacks
# or holds older (APPLY_NEWER): so that its last page writes one to compare
# with, the hash of m03000 (on the last page, with zzzz) goes with the marker
$resyncs = status('full_resyncs');
away_from_redis();
$redis->cli('DEL', 'billing:__sync__', 'billing:{m03000}');
$node->safe_psql($db, "SELECT billing_credit('zzzz', 1, 'z2')");
back_to_redis();
ok(BillingTest::wait_until(120, sub { ($redis->cli_ok('HGET', 'billing:{zzzz}', 'balance'))[0] eq '8000000' }),
	'a deleted marker: the dirty tenant is pushed');
ok(BillingTest::wait_until(300, sub { status('full_resyncs') > $resyncs }), 'and the resync completes');
ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $redis) }),
	'a deleted marker: the mirror converged');
$zzzz = $redis->cli('HGET', 'billing:{zzzz}', 'synced_at_ms');
$last_page = $redis->cli('HGET', 'billing:{m03000}', 'synced_at_ms');
cmp_ok($zzzz, '<', $last_page,
	"a deleted marker: the change of zzzz was pushed between the resync's pages, "
	  . ($last_page - $zzzz) . ' ms before the resync reached the last page');

BillingTest::no_crashes($node);
done_testing();

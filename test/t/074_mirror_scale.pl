
# Issue 12 (M6 and the reservations) and issue 16 (expiry in the Redis
# hash), on a node whose worker mirrors into a real redis-server:
#
# - a tenant with many API keys: a charge through one key pushes that key's
#   hash and the tenant's, not every key (counted: Redis' keyspace events
#   name every hash a push writes), also when the charge is committed by
#   COMMIT PREPARED; a hold of a key released or expired pushes that key;
# - a change of all its keys at once (a time zone change) goes at most
#   billing.sync_batch_size keys per batch, and another tenant committed in
#   the same transaction reaches Redis before the rest of them (decided by
#   the order in which Redis applied the hashes, not by a clock);
# - the consistency check finds nothing to repair afterwards;
# - an idle tenant's expired gateway reservation is removed by the worker's
#   sweep (billing.purge_interval);
# - a grant that expires: charge.lua leaves the credit out once Redis' clock
#   passes its expiry while the worker is stopped (SIGSTOP), and the worker
#   then pushes the hash again without the credit at the same version (the
#   account is locked, so the maintenance cannot write the expiry entry),
#   and later the entry.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use BillingTest;

my $db    = 'app';
my $keys  = 2000;
my $batch = 100;
my $redis = BillingTest::Redis->new('mirror');
my $node  = BillingTest::node('main', database => $db, redis => $redis,
	conf => join("\n", "billing.check_interval = 0", "billing.purge_interval = 0",
		"billing.sync_batch_size = $batch", "billing.maintenance_interval = 200",
		"max_prepared_transactions = 4"));
my $lua = ($ENV{BILLING_REPO} // $BillingTest::REPO) . '/lua';

sub sql { return $node->safe_psql($db, shift) }
sub status { return BillingTest::query($node, $db, "SELECT $_[0] FROM billing_sync_status()") // '' }
sub hget { return $redis->cli('HGET', $_[0], $_[1]) }
sub converges { return BillingTest::mirror_converges($node, $db, $redis, @_) }

# what Redis writes, in order: every HSET names its hash (keyspace events)
$redis->cli('CONFIG', 'SET', 'notify-keyspace-events', 'Eh');
my $events = $redis->connect(timeout => 60) or BAIL_OUT('cannot connect to redis-server');
$events->command('SUBSCRIBE', '__keyevent@0__:hset');

# the hashes written since the last call, in order (the messages wait in
# the socket; a PING through the subscription marks where they end)
sub written
{
	my @keys;
	$events->_send('PING', 'end');
	while (1)
	{
		my $m = $events->_reply;
		die 'unexpected message' unless ref $m eq 'ARRAY';
		last if $m->[0] eq 'pong';
		push @keys, $m->[2] if $m->[0] eq 'message';
	}
	return @keys;
}

note "a tenant with $keys API keys, and a small one";
sql("SELECT billing_account_create('big'), billing_account_create('small');
     SELECT billing_credit('big', 1000, 'c-big'), billing_credit('small', 1000, 'c-small');
     SELECT count(*) FROM generate_series(1, $keys) i, LATERAL billing_api_key_create('big', 'k' || i);
     SELECT billing_api_key_create('big', 'kb', budget => 100, budget_period => 'month');");
converges('the mirror holds both tenants and every key');
written();

# --- M6: a charge through one key pushes that key
for my $i (1 .. 10)
{
	sql("SELECT billing_deduct('big', 0.01, 'b-$i', api_key => 'k7');
	     SELECT billing_deduct('small', 0.01, 's-$i')");
}
my $v_big = sql("SELECT version FROM billing.accounts WHERE tenant_id = 'big'");
my $v_small = sql("SELECT version FROM billing.accounts WHERE tenant_id = 'small'");
ok(BillingTest::wait_until(120, sub {
	hget('billing:{big}', 'version') eq $v_big && hget('billing:{small}', 'version') eq $v_small }),
	'ten charges of each tenant reached Redis');
my @w = written();
my @other_keys = grep { /^billing:\{big\}:key:/ && $_ ne 'billing:{big}:key:k7' } @w;
my @k7 = grep { $_ eq 'billing:{big}:key:k7' } @w;
is(scalar(@other_keys), 0, "no other key hash of big was pushed (of $keys)");
ok(@k7 >= 1 && @k7 <= 10, 'the key charged was pushed (' . scalar(@k7) . ' times for 10 charges)');
ok(scalar(@w) <= 30, 'at most 30 hashes written for 20 charges (' . scalar(@w) . ')');
is(hget('billing:{big}:key:k7', 'spent'), '100000', 'k7 shows what was spent through it');
is(hget('billing:{big}:key:k7', 'version'),
	sql("SELECT version FROM billing.api_keys WHERE tenant_id = 'big' AND key_id = 'k7'"),
	"k7's hash carries the key's version");
converges('Redis equals the database');

# --- the same through two-phase commit (Citus prepares the transaction of
# every node a distributed transaction writes on): the marks wait for COMMIT
# PREPARED, and then still push only the key charged
sql("BEGIN; SELECT billing_deduct('big', 0.01, 'b-2pc', api_key => 'k7'); PREPARE TRANSACTION 'charge-2pc'");
sql("COMMIT PREPARED 'charge-2pc'");
$v_big = sql("SELECT version FROM billing.accounts WHERE tenant_id = 'big'");
ok(BillingTest::wait_until(120, sub {
	hget('billing:{big}', 'version') eq $v_big
	  && hget('billing:{big}:key:k7', 'version') eq
		sql("SELECT version FROM billing.api_keys WHERE tenant_id = 'big' AND key_id = 'k7'") }),
	'a charge through k7 committed by COMMIT PREPARED reached Redis');
@w = written();
@other_keys = grep { /^billing:\{big\}:key:/ && $_ ne 'billing:{big}:key:k7' } @w;
is(scalar(@other_keys), 0, "and pushed no other key hash of big (of $keys)");
is(hget('billing:{big}:key:k7', 'spent'), '110000', 'k7 shows the charge');

# a hold of a key with a budget: placed, released, expired
sql("SELECT billing_hold('big', 5, 'h1', api_key => 'kb', expires_in => '1 hour')");
ok(BillingTest::wait_until(120, sub { hget('billing:{big}:key:kb', 'holds') eq '5000000' }),
	"a hold of kb shows in kb's hash");
sql("SELECT billing_release('big', 'h1', 'h1-r')");
ok(BillingTest::wait_until(120, sub { hget('billing:{big}:key:kb', 'holds') eq '0' }),
	"its release too (the key's version moved)");
sql("SELECT billing_hold('big', 3, 'h2', api_key => 'kb', expires_in => '1 second')");
ok(BillingTest::wait_until(120, sub { hget('billing:{big}:key:kb', 'holds') eq '3000000' }),
	'a hold of 1 second');
ok(BillingTest::wait_until(120, sub { hget('billing:{big}:key:kb', 'holds') eq '0' }),
	"its expiry leaves kb's hash without a client call");
# Reads leave an expired hold out at once; the worker's maintenance writes
# its expiry a moment later, which moves kb's and big's versions and pushes
# both again.  Wait for that push, so that it is not counted with the time
# zone change.
ok(BillingTest::wait_until(120, sub {
	sql("SELECT status FROM billing.holds WHERE tenant_id = 'big' AND trace_id = 'h2'") eq 'expired'
	  && hget('billing:{big}:key:kb', 'version') eq
		sql("SELECT version FROM billing.api_keys WHERE tenant_id = 'big' AND key_id = 'kb'")
	  && hget('billing:{big}', 'version') eq sql("SELECT version FROM billing.accounts WHERE tenant_id = 'big'") }),
	"the maintenance wrote the hold's expiry, and kb's hash and big's carry the versions it left");
@w = written();
@other_keys = grep { /^billing:\{big\}:key:/ && $_ ne 'billing:{big}:key:kb' } @w;
is(scalar(@other_keys), 0, 'no other key hash was pushed for the holds');
converges('Redis equals the database after the holds');

# --- a change of every key at once goes a batch at a time; another tenant
# committed with it is not held up behind them
sql("BEGIN;
     SELECT billing_account_update('big', timezone => 'Europe/Berlin');
     SELECT billing_deduct('small', 0.01, 's-tz');
     COMMIT;");
$v_big = sql("SELECT version FROM billing.accounts WHERE tenant_id = 'big'");
$v_small = sql("SELECT version FROM billing.accounts WHERE tenant_id = 'small'");
ok(BillingTest::wait_until(300, sub { hget('billing:{big}', 'version') eq $v_big }),
	'the time zone change reached Redis');
ok(hget('billing:{small}', 'version') eq $v_small, 'and the charge of small');
@w = written();
my ($small_at) = grep { $w[$_] eq 'billing:{small}' } 0 .. $#w;
my ($big_at) = grep { $w[$_] eq 'billing:{big}' } 0 .. $#w;
my @big_keys = grep { /^billing:\{big\}:key:/ } @w;
my $before_small = grep { /^billing:\{big\}:key:/ } @w[ 0 .. ($small_at // 0) ];
is(scalar(@big_keys), $keys + 1, 'every key hash of big was pushed once')
  or diag(do {
	my %seen;
	$seen{$_}++ for @big_keys;
	'not pushed: ' . join(' ', grep { !$seen{"billing:{big}:key:$_"} }
		split /\n/, sql("SELECT key_id FROM billing.api_keys WHERE tenant_id = 'big'"))
	  . '; pushed twice or more: ' . join(' ', grep { $seen{$_} > 1 } sort keys %seen)
	  . '; the first ten written: ' . join(' ', @w[ 0 .. ($#w < 9 ? $#w : 9) ]) });
ok(defined $small_at && $before_small <= $batch,
	"small was applied after at most a batch of big's keys ($before_small of " . scalar(@big_keys) . ')');
ok(defined $big_at && !grep({ /^billing:\{big\}:key:/ } @w[ $big_at .. $#w ]),
	"big's own hash came after all of its keys");
like(hget('billing:{big}:key:k1', 'version'), qr/^\d+$/, 'the keys carry their new version');
converges('Redis equals the database after the time zone change');

# --- the consistency check finds nothing to repair, nor to push
my $hgetalls = sub { ($redis->cli('INFO', 'commandstats') =~ /cmdstat_hgetall:calls=(\d+)/)[0] // 0 };
my $nhashes = sql("SELECT count(*) FROM billing.sync_snapshot(NULL, '', 1000000)");
my $repaired = status('repaired');
written();
my $c0 = $hgetalls->();
sql("ALTER SYSTEM SET billing.check_interval = 1; SELECT pg_reload_conf()");
ok(BillingTest::wait_until(300, sub { $hgetalls->() >= $c0 + 2 * $nhashes }), "two checks of $nhashes hashes ran");
sql("ALTER SYSTEM SET billing.check_interval = 0; SELECT pg_reload_conf()");
is(status('repaired'), $repaired, 'the check repaired nothing (every key hash at its own version)');
@w = written();
is(scalar(@w), 0, 'and pushed nothing: ' . join(' ', @w[ 0 .. ($#w < 4 ? $#w : 4) ]));

# --- an idle tenant's expired reservation is swept
my $conn = $redis->connect(timeout => 60);
my %sha = map { $_ => $conn->command('SCRIPT', 'LOAD', slurp_file("$lua/$_.lua")) } qw(charge);
my @PK = map { "billing:{small}$_" } ':pending', ':pending_amt', ':pending_ver', ':pending_key';
my $r = $conn->command('EVALSHA', $sha{charge}, 5, 'billing:{small}', @PK, 'gw-1', 1000, 0, 200);
is($r->[0], 'OK', 'a gateway reserves on small, for 200 ms, and never settles');
is($conn->command('ZCARD', $PK[0]), 1, 'the reservation is there');
sql("ALTER SYSTEM SET billing.purge_interval = 1; SELECT pg_reload_conf()");
ok(BillingTest::wait_until(120, sub { $conn->command('EXISTS', @PK) == 0 }),
	"the worker's sweep removed it from all four structures, nobody charging small");
# the sweep off again: a sweep every second over the thousands of hashes
# above would slow the push that the next part waits for
sql("ALTER SYSTEM RESET billing.purge_interval; SELECT pg_reload_conf()");

# --- a grant that expires
note 'a grant that expires while the worker runs';
sql("SELECT billing_account_create('gx'); SELECT billing_credit('gx', 10, 'gx-top');
     SELECT billing_grant('gx', 5, 'gx-trial', expires_at => now() + interval '15 seconds', priority => 10);");
# the account locked at once: the maintenance cannot write the expiry
# entry, while the worker still reads and pushes the account (the 15 s
# cover the lock, the push and the checks of the hash below)
my $locker = BillingTest::Session->new($node, $db);
is($locker->call('BEGIN')->{status}, 'ok', 'a session begins a transaction');
is($locker->call("SELECT 1 FROM billing.accounts WHERE tenant_id = 'gx' FOR UPDATE")->{status}, 'ok',
	'and locks the account');
my $expires_ms = sql("SELECT floor(extract(epoch FROM expires_at) * 1000)::bigint FROM billing.grants WHERE trace_id = 'gx-trial'");  # rounded down: never later
ok(BillingTest::wait_until(120, sub { hget('billing:{gx}', 'available') eq '15000000' }),
	'the hash shows the grant as available before its expiry');
is(hget('billing:{gx}', 'grants_expire_at_ms'), $expires_ms, 'grants_expire_at_ms is its expiry');
is(hget('billing:{gx}', 'grants_expire_amount'), '5000000', 'grants_expire_amount what expires then');
is(hget('billing:{gx}', 'grants_expiries'), "$expires_ms:5000000", 'grants_expiries lists it');
my $v_gx = hget('billing:{gx}', 'version');

my $worker = BillingTest::worker_pid($node);
kill 'STOP', $worker;
my @GK = map { "billing:{gx}$_" } ':pending', ':pending_amt', ':pending_ver', ':pending_key';
my $rnow = sub { my $t = $conn->command('TIME'); $t->[0] * 1000 + int($t->[1] / 1000) };
ok(BillingTest::wait_until(120, sub { $rnow->() >= $expires_ms }, 0.05), "Redis' clock passed the expiry");
$r = $conn->command('EVALSHA', $sha{charge}, 5, 'billing:{gx}', @GK, 'gx-1', 12000000, 0, 60000);
is(join(',', @$r), 'INSUFFICIENT,12000000,10000000',
	'charge.lua refuses the expired credit (worker stopped, the now_ms of the gateway 0)');
is(hget('billing:{gx}', 'available'), '15000000', 'while the hash still says 15: the worker did not push');
$r = $conn->command('EVALSHA', $sha{charge}, 5, 'billing:{gx}', @GK, 'gx-1', 10000000, 0, 60000);
is($r->[0], 'OK', 'what is left can be reserved');
kill 'CONT', $worker;
ok(BillingTest::wait_until(120, sub { hget('billing:{gx}', 'available') eq '10000000' }),
	"the worker pushes the hash again without the expired credit");
is(hget('billing:{gx}', 'version'), $v_gx, 'at the same version: nothing was written (the account is locked)');
is(hget('billing:{gx}', 'balance'), '10000000', 'balance leaves it out too (billing_balance())');
is($redis->cli('HEXISTS', 'billing:{gx}', 'grants_expiries'), '0', 'no expiry left to list');
is(sql("SELECT count(*) FROM billing.entries WHERE tenant_id = 'gx' AND kind = 'expire'"), '0',
	'no expire entry yet');
is($locker->call('COMMIT')->{status}, 'ok', 'the lock is released');
ok(BillingTest::wait_until(120, sub {
	sql("SELECT count(*) FROM billing.entries WHERE tenant_id = 'gx' AND kind = 'expire'") eq '1' }),
	'the maintenance writes the expire entry');
converges('Redis equals the database after the expiry');
ok(hget('billing:{gx}', 'version') > $v_gx, 'at a new version');
$locker->close;

$events->close;
$conn->close;
BillingTest::no_crashes($node);
$node->stop;
done_testing();

# The Redis scripts of lua/ (what gateways and the worker run) against a real
# redis-server: every return code and BADARGS path of apply_snapshot.lua,
# charge.lua, key_charge.lua and settle.lua, the version guard, the pruning
# of settled reservations, expiry, replays, day/month rollover, API key
# budgets, the magnitudes at 2^53, wrong key types, the guarantee that a
# stale snapshot never gives reserved funds back, NOSCRIPT recovery; the
# refresh mode of apply_snapshot.lua, purge.lua (the worker's sweep of
# expired reservations), reservations that live by Redis' clock whatever
# the gateway's clock says, and grant credit that expires in charge.lua.
#
# The scripts run against Redis alone (no PostgreSQL node): each check sends
# EVALSHA with hand-made snapshots (over one connection,
# BillingTest::Redis::Conn) and compares the reply, rendered as
# redis-cli --json renders it (integers bare, strings quoted), with what the
# script must answer.  Amounts are micro-units.  Reservations live by
# Redis' clock (TIME): a reservation that must keep counting gets a ttl of
# ten minutes ($TTL), and one that must expire a short ttl, after which the
# test waits until Redis' clock has passed it (decided by what Redis says,
# never by a sleep).  The gateway's now_ms only makes checks stricter: day
# and month rollovers use the earlier of both clocks, so a fixed epoch time
# T0 (long past) plus offsets makes every rollover exact; grant expiries use
# the later, so they are dated from Redis' clock.
#
# pending(TENANT) shows a tenant's reservations from all four structures
# (the sorted set, amounts, settle versions, API keys) and any orphan, so a
# check sees that a script kept them consistent.
use strict;
use warnings FATAL => 'all';
use Digest::SHA qw(sha1_hex);
use PostgreSQL::Test::Utils;
use Test::More;
use BillingTest;

my $redis = BillingTest::Redis->new('lua');
my $conn  = $redis->connect(timeout => 60) or BAIL_OUT('cannot connect to redis-server');
my $lua   = ($ENV{BILLING_REPO} // $BillingTest::REPO) . '/lua';
my $P     = 't-lua';             # every key starts with this
my $M     = 1_000_000;           # 1 unit in micros
my $T0    = 1700000000000;       # a "now" in epoch ms
my $MX    = 9007199254740991;    # 2^53 - 1
my $TTL   = 600000;              # a reservation that keeps counting (10 min)
my @scripts = qw(apply_snapshot charge key_charge settle purge);

# the reply as redis-cli --json shows it; rc: the value as plain text
sub r { BillingTest::Redis::json($conn->typed(@_)) }

sub rc
{
	my $v = $conn->typed(@_);
	return ref $v eq 'ARRAY' ? [ map { $_ // '' } @$v ] : ($v // '');
}
sub hget { rc('HGET', @_) }

sub check { my ($what, $expected, $got) = @_; is($got, $expected, $what) }

# Redis' clock in epoch ms, and a wait until it has passed MS
sub redis_ms { my $t = $conn->command('TIME'); return $t->[0] * 1000 + int($t->[1] / 1000) }
sub wait_redis_past
{
	my ($ms) = @_;
	return BillingTest::wait_until(60, sub { redis_ms() > $ms }, 0.01);
}

# an error reply whose first word is CODE
sub check_err
{
	my ($what, $code, $got) = @_;
	like($got, qr/^error:"\Q$code\E /, $what);
}

my %sha;
sub load_all
{
	$sha{$_} = $conn->command('SCRIPT', 'LOAD', slurp_file("$lua/$_.lua")) for @scripts;
}

# K: the tenant hash and its four pending structures; kh: an API key hash
sub K
{
	my ($t) = @_;
	return ("$P:{$t}", "$P:{$t}:pending", "$P:{$t}:pending_amt", "$P:{$t}:pending_ver",
		"$P:{$t}:pending_key");
}
sub kh { my ($t, $k) = @_; return "$P:{$t}:key:$k" }

# apply_t TENANT VERSION FORCE [field value]...  (tenant hash + pending keys)
sub apply_t { my ($t, @a) = @_; return r('EVALSHA', $sha{apply_snapshot}, 5, K($t), @a) }
# apply_h HASH VERSION FORCE [field value]...  (a hash only)
sub apply_h { my ($h, @a) = @_; return r('EVALSHA', $sha{apply_snapshot}, 1, $h, @a) }
# charge TENANT TRACE AMOUNT NOW TTL
sub charge { my ($t, @a) = @_; return r('EVALSHA', $sha{charge}, 5, K($t), @a) }
# charge_k TENANT KEY TRACE AMOUNT NOW TTL
sub charge_k
{
	my ($t, $k, @a) = @_;
	return r('EVALSHA', $sha{charge}, 6, K($t), kh($t, $k), @a, $k);
}
# key_charge TENANT KEY TRACE AMOUNT NOW TTL
sub key_charge
{
	my ($t, $k, @a) = @_;
	my @K = K($t);
	return r('EVALSHA', $sha{key_charge}, 5, kh($t, $k), @K[ 1 .. 4 ], @a, $k);
}
# purge TENANT (4 keys); purge5: the tenant hash as 5th key
sub purge { my @K = K(shift); return r('EVALSHA', $sha{purge}, 4, @K[ 1 .. 4 ]) }
sub purge5 { my @K = K(shift); return r('EVALSHA', $sha{purge}, 5, @K[ 1 .. 4 ], $K[0]) }
# settle TENANT TRACE VERSION (4 keys); settle5: the tenant hash as 5th key
sub settle { my ($t, @a) = @_; my @K = K($t); return r('EVALSHA', $sha{settle}, 4, @K[ 1 .. 4 ], @a) }
sub settle5
{
	my ($t, @a) = @_;
	my @K = K($t);
	return r('EVALSHA', $sha{settle}, 5, @K[ 1 .. 4 ], $K[0], @a);
}

# "trace=amount/ver/key ..." sorted by trace, from all four structures, and
# orphans in the hashes (which must never exist)
sub pending
{
	my @K = K(shift);
	my @out;
	for my $z (sort @{ rc('ZRANGE', $K[1], 0, -1) })
	{
		my ($a, $v, $k) = map { hget($_, $z) } @K[ 2 .. 4 ];
		push @out, "$z=$a/" . ($v eq '' ? '-' : $v) . '/' . ($k eq '' ? '-' : $k);
	}
	for my $z (map { @{ rc('HKEYS', $_) } } @K[ 2 .. 4 ])
	{
		push @out, "orphan:$z" if rc('ZSCORE', $K[1], $z) eq '';
	}
	return join(' ', @out);
}

# a hash as "field=value ..." sorted, and some fields' values
sub hash_sorted { my %h = @{ rc('HGETALL', shift) }; return join(' ', sort map { "$_=$h{$_}" } keys %h) }
sub hmget { my ($h, @f) = @_; return join(' ', @{ rc('HMGET', $h, @f) }) }

# tenant snapshot without limits: version V, available A (balance A, no
# credit, no holds), more fields after
sub snap_basic
{
	my ($t, $v, $a, @more) = @_;
	return apply_t($t, $v, 0, status => 'active', currency => 'USD', balance => $a,
		credit_limit => 0, holds => 0, available => $a, synced_at_ms => $T0, @more);
}

load_all();
for my $s (@scripts)
{
	check("SCRIPT LOAD $s.lua returns the sha1 of the file",
		sha1_hex(slurp_file("$lua/$s.lua")), $sha{$s});
}

note 'apply_snapshot.lua';
{
	my @K = K('A');
	check('apply: first snapshot is applied', 1, snap_basic('A', 5, 10 * $M, max_charge => 5 * $M));
	check('apply: version stored by the script', 5, hget($K[0], 'version'));
	check('apply: fields stored', 'active 10000000 5000000', hmget($K[0], qw(status available max_charge)));
	check('apply: same version is stale (0)', 0, snap_basic('A', 5, 1));
	check('apply: older version is stale (0)', 0, snap_basic('A', 4, 1));
	check('apply: stale snapshot changes nothing', '5 10000000 5000000',
		hmget($K[0], qw(version available max_charge)));
	check('apply: newer version is applied (1)', 1, snap_basic('A', 6, 9 * $M));
	check('apply: newer snapshot replaced the values', '6 9000000', hmget($K[0], qw(version available)));
	check('apply: a field absent from the newer snapshot is gone', 0, rc('HEXISTS', $K[0], 'max_charge'));
	check('apply: a field added by the newer snapshot is there', 1,
		apply_t('A', 7, 0, status => 'active', available => 5, max_charge => 3));
	check('apply: a repeated field counts once: the last value wins, a field left out is gone', 1,
		apply_t('A', 8, 0, status => 'active', status => 'suspended', available => 5));
	check('apply: hash after the repeated field', 'available=5 status=suspended version=8', hash_sorted($K[0]));
	check('apply: force applies an older version (1)', 1, apply_t('A', 3, 1, status => 'active', available => 7));
	check('apply: forced older snapshot stored as given', 'available=7 status=active version=3',
		hash_sorted($K[0]));
	check('apply: force applies the same version (1)', 1, apply_t('A', 3, 1, status => 'active', available => 8));
	check('apply: a version pair equal to ARGV[1] is accepted', 1,
		apply_t('A', 4, 0, version => 4, status => 'active', available => 8));
	check('apply: no field pairs at all (version only)', 1, apply_t('A', 9, 0));
	check('apply: version-only hash', 'version 9', join(' ', @{ rc('HGETALL', $K[0]) }));
	check('apply: hash only (1 key, API key hash)', 1,
		apply_h(kh('A', 'k1'), 2, 0, status => 'active', budget => 100, period => 'lifetime', spent => 0));
	check('apply: hash only, stale (0)', 0, apply_h(kh('A', 'k1'), 2, 0, status => 'revoked'));
	check('apply: version 0 on an empty hash', 1, apply_h("$P:{A}:key:zero", 0, 0, status => 'active'));

	check_err('apply BADARGS: version not an integer', 'BADARGS', apply_t('A', 'abc', 0, status => 'active'));
	check_err('apply BADARGS: fractional version', 'BADARGS', apply_t('A', '10.5', 0, status => 'active'));
	check_err('apply BADARGS: exponent version', 'BADARGS', apply_t('A', '1e3', 0, status => 'active'));
	check_err('apply BADARGS: hex version', 'BADARGS', apply_t('A', '0x10', 0, status => 'active'));
	check_err('apply BADARGS: empty version', 'BADARGS', apply_t('A', '', 0, status => 'active'));
	check_err('apply BADARGS: negative version', 'BADARGS', apply_t('A', -1, 0, status => 'active'));
	check_err('apply BADARGS: version above 2^53', 'BADARGS',
		apply_t('A', '9007199254740993', 0, status => 'active'));
	check_err('apply BADARGS: mode 3', 'BADARGS', apply_t('A', 10, 3, status => 'active'));
	check_err('apply BADARGS: mode empty', 'BADARGS', apply_t('A', 10, '', status => 'active'));
	check_err('apply BADARGS: odd field/value count', 'BADARGS',
		apply_t('A', 10, 0, 'status', 'active', 'available'));
	check_err('apply BADARGS: version pair differs from ARGV[1]', 'BADARGS',
		apply_t('A', 10, 0, version => 11, status => 'active'));
	check_err('apply BADARGS: no mode argument', 'BADARGS', apply_t('A', 10));
	check_err('apply BADARGS: 2 keys', 'BADARGS', r('EVALSHA', $sha{apply_snapshot}, 2, @K[ 0, 1 ], 10, 0));
	check_err('apply BADARGS: 0 keys', 'BADARGS', r('EVALSHA', $sha{apply_snapshot}, 0, 10, 0));
	check('apply: bad arguments changed nothing', 9, hget($K[0], 'version'));

	# mode 2, a refresh: the same version again replaces the hash (what
	# expired since is left out), an older one does not
	check('apply refresh: the same version is applied (1)', 1,
		apply_t('A', 9, 2, status => 'active', available => 4));
	check('apply refresh: replaced', 'available=4 status=active version=9', hash_sorted($K[0]));
	check('apply refresh: an older version is stale (0)', 0, apply_t('A', 8, 2, status => 'active', available => 3));
	check('apply refresh: a newer one is applied (1)', 1, apply_t('A', 10, 2, status => 'active', available => 2));
	check('apply refresh: unchanged by the stale one', 'available=2 status=active version=10', hash_sorted($K[0]));
}

note 'apply_snapshot.lua: pruning settled reservations';
{
	my @K = K('P');
	snap_basic('P', 10, 100 * $M);
	check('prune: reserve r1', '["OK",99000000]', charge('P', 'r1', $M, $T0, 60000));
	check('prune: reserve r2', '["OK",97000000]', charge('P', 'r2', 2 * $M, $T0, 60000));
	check('prune: reserve r3', '["OK",94000000]', charge('P', 'r3', 3 * $M, $T0, 60000));
	check('prune: settle r1 at version 11', 1, settle('P', 'r1', 11));
	check('prune: settle r2 at version 13', 1, settle('P', 'r2', 13));
	check('prune: settled reservation stops expiring (score inf)', 'inf', rc('ZSCORE', $K[1], 'r1'));
	check('prune: stale snapshot (10) keeps everything', 0, snap_basic('P', 10, 99 * $M));
	check('prune: pending after stale snapshot', 'r1=1000000/11/- r2=2000000/13/- r3=3000000/-/-', pending('P'));
	check('prune: snapshot 12 applied', 1, snap_basic('P', 12, 99 * $M));
	check('prune: r1 (settled 11 <= 12) removed, r2 (13 > 12) and r3 (unsettled) kept',
		'r2=2000000/13/- r3=3000000/-/-', pending('P'));
	check('prune: funds = snapshot - kept reservations', '["INSUFFICIENT",95000000,94000000]',
		charge('P', 'big', 95 * $M, $T0 + 1, 60000));
	check('prune: snapshot 13 applied', 1, snap_basic('P', 13, 97 * $M));
	check('prune: r2 (settled 13 <= 13) removed, r3 kept', 'r3=3000000/-/-', pending('P'));
	check('prune: a hash-only apply prunes nothing', 1,
		apply_h($K[0], 20, 0, status => 'active', available => 1));
	check('prune: r3 still pending', 'r3=3000000/-/-', pending('P'));
	check('prune: force-applied older snapshot prunes only versions <= it', 1, settle('P', 'r3', 30));
	check('prune: force snapshot 25', 1, apply_t('P', 25, 1, status => 'active', available => 1));
	check('prune: r3 (settled 30) survives snapshot 25', 'r3=3000000/30/-', pending('P'));
	check('prune: snapshot 30 removes r3', 1, apply_t('P', 30, 0, status => 'active', available => 1));
	check('prune: nothing pending', '', pending('P'));
}

note 'charge.lua: basic codes';
{
	my @K = K('C');
	check('charge: NO_STATE without a tenant snapshot', '["NO_STATE"]', charge('C', 't1', $M, $T0, $TTL));
	snap_basic('C', 1, 10 * $M, status => 'suspended');
	check('charge: SUSPENDED (suspended)', '["SUSPENDED","suspended"]', charge('C', 't1', $M, $T0, $TTL));
	snap_basic('C', 2, 10 * $M, status => 'closed');
	check('charge: SUSPENDED (closed)', '["SUSPENDED","closed"]', charge('C', 't1', $M, $T0, $TTL));
	apply_t('C', 3, 0, available => 5);
	check('charge: SUSPENDED (no status field)', '["SUSPENDED",""]', charge('C', 't1', $M, $T0, $TTL));
	check('charge: nothing reserved by refusals', '', pending('C'));
	snap_basic('C', 4, 10 * $M);
	my $before = redis_ms();
	check('charge: OK with available_after (integer reply)', '["OK",9000000]', charge('C', 't1', $M, $T0, $TTL));
	my $after = redis_ms();
	check('charge: reservation in all structures', 't1=1000000/-/-', pending('C'));
	my $score = rc('ZSCORE', $K[1], 't1');
	ok($score >= $before + $TTL && $score <= $after + $TTL,
		"charge: expiry score = Redis' TIME + ttl, not now_ms + ttl ($before + $TTL <= $score <= $after + $TTL)");
	check('charge: replay of a pending trace', '["OK",9000000,"replay"]',
		charge('C', 't1', $M, $T0 + 10, $TTL));
	check('charge: replay with another amount counts once (original amount)', '["OK",9000000,"replay"]',
		charge('C', 't1', 7 * $M, $T0 + 10, $TTL));
	check('charge: replay did not extend the expiry', $score, rc('ZSCORE', $K[1], 't1'));
	check('charge: second trace sees the first', '["OK",6500000]', charge('C', 't2', 2500000, $T0 + 10, $TTL));
	check('charge: INSUFFICIENT (amount, available - pending)', '["INSUFFICIENT",6500001,6500000]',
		charge('C', 't3', 6500001, $T0 + 20, $TTL));
	check('charge: amount = available - pending is OK', '["OK",0]', charge('C', 't3', 6500000, $T0 + 20, $TTL));
	check('charge: then INSUFFICIENT for 1 micro', '["INSUFFICIENT",1,0]', charge('C', 't4', 1, $T0 + 20, $TTL));
}

note "reservations live by Redis' clock: a gateway's clock cannot purge, lengthen or shorten them";
{
	my @K = K('E');
	snap_basic('E', 1, 12 * $M);
	check('clock: reserve e1 (4) for a minute', '["OK",8000000]', charge('E', 'e1', 4 * $M, $T0, 60000));
	check('clock: reserve e2 (5)', '["OK",3000000]', charge('E', 'e2', 5 * $M, $T0, $TTL));
	check("clock: a gateway whose clock runs a day ahead does not purge e1 (Redis' clock decides)",
		'["INSUFFICIENT",4000000,3000000]', charge('E', 'e3', 4 * $M, redis_ms() + 86400000, $TTL));
	check('clock: nor a year ahead', '["INSUFFICIENT",4000000,3000000]',
		charge('E', 'e3', 4 * $M, redis_ms() + 86400000 * 365, $TTL));
	check('clock: e1 and e2 still pending', 'e1=4000000/-/- e2=5000000/-/-', pending('E'));
	my $before = redis_ms();
	check('clock: reserve e3 (1) with a clock an hour behind', '["OK",2000000]',
		charge('E', 'e3', $M, $before - 3600000, 3000));
	my $e3 = rc('ZSCORE', $K[1], 'e3');
	ok($e3 >= $before + 3000, "clock: it lasts its ttl by Redis' clock ($e3 >= $before + 3000)");
	check('clock: reserve e4 (1) with a clock a year ahead', '["OK",1000000]',
		charge('E', 'e4', $M, redis_ms() + 86400000 * 365, 4000));
	my $e4 = rc('ZSCORE', $K[1], 'e4');
	my $after = redis_ms();
	ok($e4 <= $after + 4000, "clock: it lasts its ttl, no more ($e4 <= $after + 4000)");
	ok(wait_redis_past($e3 > $e4 ? $e3 : $e4), "clock: Redis' clock passed e3's and e4's expiry");
	check('clock: e3 and e4 purged, their funds back (the gateway clock an hour behind)', '["OK",2000000]',
		charge('E', 'e5', $M, redis_ms() - 3600000, 300));
	check('clock: e3 and e4 gone from all four structures', 'e1=4000000/-/- e2=5000000/-/- e5=1000000/-/-',
		pending('E'));
	ok(wait_redis_past(rc('ZSCORE', $K[1], 'e5')), "clock: Redis' clock passed e5's expiry");
	check('clock: an expired trace is charged anew, not replayed', '["OK",2000000]',
		charge('E', 'e5', $M, $T0, $TTL));
}

note 'charge.lua: tenant limits';
# max_charge
snap_basic('MC', 1, 100 * $M, max_charge => 5 * $M);
check('charge: QUOTA_EXCEEDED max_charge (limit, amount)', '["QUOTA_EXCEEDED","max_charge",5000000,5000001]',
	charge('MC', 'm1', 5000001, $T0, $TTL));
check('charge: amount = max_charge is OK', '["OK",95000000]', charge('MC', 'm1', 5 * $M, $T0, $TTL));

# daily requests: quota 3, 1 used today, resets at T0+1000
snap_basic('DR', 1, 100 * $M, daily_requests_quota => 3, day_requests => 1, month_requests => 1,
	day_resets_at_ms => $T0 + 1000, month_resets_at_ms => $T0 + 100000);
check('charge: daily_requests 1 used + 0 pending + 1 <= 3', '["OK",99000000]',
	charge('DR', 'd1', $M, $T0, $TTL));
check('charge: daily_requests 1 used + 1 pending + 1 <= 3', '["OK",98000000]',
	charge('DR', 'd2', $M, $T0, $TTL));
check('charge: QUOTA_EXCEEDED daily_requests (quota, used)', '["QUOTA_EXCEEDED","daily_requests",3,3]',
	charge('DR', 'd3', $M, $T0, $TTL));
check('charge: day rollover at now = day_resets_at_ms (0 + 2 pending + 1 <= 3)', '["OK",97000000]',
	charge('DR', 'd3', $M, $T0 + 1000, $TTL));
check('charge: after rollover pending still counts', '["QUOTA_EXCEEDED","daily_requests",3,3]',
	charge('DR', 'd4', $M, $T0 + 1000, $TTL));

# monthly requests: quota 2, 1 used this month, resets at T0+1000
snap_basic('MR', 1, 100 * $M, monthly_requests_quota => 2, month_requests => 1, day_requests => 0,
	month_resets_at_ms => $T0 + 1000);
check('charge: monthly_requests 1 + 0 + 1 <= 2', '["OK",99000000]', charge('MR', 'q1', $M, $T0, $TTL));
check('charge: QUOTA_EXCEEDED monthly_requests', '["QUOTA_EXCEEDED","monthly_requests",2,2]',
	charge('MR', 'q2', $M, $T0 + 999, $TTL));
check('charge: month rollover', '["OK",98000000]', charge('MR', 'q2', $M, $T0 + 1000, $TTL));

# daily spend: cap 10, 4 spent today, holds 1 -> 5 free
snap_basic('DS', 1, 100 * $M, daily_spend_cap => 10 * $M, day_spend => 4 * $M, holds => $M,
	day_resets_at_ms => $T0 + 1000);
check('charge: daily_spend 4 + holds 1 + 0 + 3 <= 10', '["OK",97000000]',
	charge('DS', 's1', 3 * $M, $T0, $TTL));
check('charge: QUOTA_EXCEEDED daily_spend (cap, spent + holds + pending)',
	'["QUOTA_EXCEEDED","daily_spend",10000000,8000000]', charge('DS', 's2', 2000001, $T0, $TTL));
check('charge: daily_spend exactly at the cap is OK', '["OK",95000000]', charge('DS', 's2', 2 * $M, $T0, $TTL));
check('charge: day rollover zeroes day_spend (0 + holds 1 + pending 5 + 4 <= 10)', '["OK",91000000]',
	charge('DS', 's3', 4 * $M, $T0 + 1000, $TTL));
check('charge: after rollover holds and pending still count',
	'["QUOTA_EXCEEDED","daily_spend",10000000,10000000]', charge('DS', 's4', 1, $T0 + 1000, $TTL));

# monthly spend: cap 10, 9 spent this month
snap_basic('MS', 1, 100 * $M, monthly_spend_cap => 10 * $M, month_spend => 9 * $M,
	month_resets_at_ms => $T0 + 1000);
check('charge: QUOTA_EXCEEDED monthly_spend', '["QUOTA_EXCEEDED","monthly_spend",10000000,9000000]',
	charge('MS', 'x1', 2000000, $T0, $TTL));
check('charge: monthly_spend within the cap', '["OK",99000000]', charge('MS', 'x1', $M, $T0, $TTL));
check('charge: month rollover zeroes month_spend', '["OK",91000000]',
	charge('MS', 'x2', 8 * $M, $T0 + 1000, $TTL));
snap_basic('NL', 1, 10 * $M);
check('charge: limit fields absent = no limit', '["OK",9000000]', charge('NL', 'n1', $M, $T0, $TTL));

note 'charge.lua: API key';
snap_basic('K', 1, 100 * $M);
check('charge+key: NO_STATE key without a key snapshot', '["NO_STATE","key"]',
	charge_k('K', 'k1', 'a1', $M, $T0, $TTL));
apply_h(kh('K', 'k1'), 1, 0, status => 'suspended', budget => 5 * $M, period => 'day', spent => 0,
	resets_at_ms => $T0 + 1000);
check('charge+key: KEY_INACTIVE (suspended)', '["KEY_INACTIVE","suspended"]',
	charge_k('K', 'k1', 'a1', $M, $T0, $TTL));
apply_h(kh('K', 'k1'), 2, 0, status => 'revoked', budget => 5 * $M, period => 'day', spent => 0,
	resets_at_ms => $T0 + 1000);
check('charge+key: KEY_INACTIVE (revoked)', '["KEY_INACTIVE","revoked"]',
	charge_k('K', 'k1', 'a1', $M, $T0, $TTL));
apply_h(kh('K', 'k1'), 3, 0, status => 'active', budget => 5 * $M, period => 'day', spent => 2 * $M,
	resets_at_ms => $T0 + 1000);
check('charge+key: within budget (2 spent + 2)', '["OK",98000000]',
	charge_k('K', 'k1', 'a1', 2 * $M, $T0, $TTL));
check('charge+key: pending_key recorded', 'a1=2000000/-/k1', pending('K'));
check('charge+key: KEY_BUDGET_EXCEEDED (budget, spent + key pending)', '["KEY_BUDGET_EXCEEDED",5000000,4000000]',
	charge_k('K', 'k1', 'a2', 1000001, $T0, $TTL));
check('charge+key: budget reached exactly', '["OK",97000000]', charge_k('K', 'k1', 'a2', $M, $T0, $TTL));
check('charge+key: tenant charge without key not limited by the key', '["OK",87000000]',
	charge('K', 'a3', 10 * $M, $T0, $TTL));
apply_h(kh('K', 'k2'), 1, 0, status => 'active', budget => 5 * $M, period => 'month', spent => 0,
	resets_at_ms => $T0 + 1000);
check("charge+key: other key's pending does not count", '["OK",82000000]',
	charge_k('K', 'k2', 'b1', 5 * $M, $T0, $TTL));
check('charge+key: k1 still exhausted', '["KEY_BUDGET_EXCEEDED",5000000,5000000]',
	charge_k('K', 'k1', 'a4', 1, $T0, $TTL));
check('charge+key: key period rollover zeroes spent (pending stays)', '["OK",80000000]',
	charge_k('K', 'k1', 'a4', 2 * $M, $T0 + 1000, $TTL));
apply_h(kh('K', 'k3'), 1, 0, status => 'active', budget => 3 * $M, period => 'lifetime', spent => 2 * $M,
	resets_at_ms => $T0);
check('charge+key: lifetime budget never rolls over', '["KEY_BUDGET_EXCEEDED",3000000,2000000]',
	charge_k('K', 'k3', 'c1', 2000000, $T0 + 5000, $TTL));
apply_h(kh('K', 'k4'), 1, 0, status => 'active', period => 'lifetime', spent => 999 * $M);
check('charge+key: key without budget is unlimited', '["OK",79000000]',
	charge_k('K', 'k4', 'd1', $M, $T0, $TTL));
check('charge+key: tenant limits are checked before the key', '["INSUFFICIENT",80000000,79000000]',
	charge_k('K', 'k4', 'd2', 80 * $M, $T0, $TTL));
check('charge+key: replay of a pending trace', '["OK",79000000,"replay"]',
	charge_k('K', 'k1', 'a1', 2 * $M, $T0, $TTL));

note 'charge.lua: bad arguments and state';
{
	my @K = K('C');
	check_err('charge BADARGS: 4 keys', 'BADARGS', r('EVALSHA', $sha{charge}, 4, @K[ 0 .. 3 ], 't', 1, $T0, 1000));
	check_err('charge BADARGS: 7 keys', 'BADARGS',
		r('EVALSHA', $sha{charge}, 7, @K, 'x', 'y', 't', 1, $T0, 1000, 'k'));
	check_err('charge BADARGS: empty trace', 'BADARGS', charge('C', '', 1, $T0, 1000));
	check_err('charge BADARGS: amount 0', 'BADARGS', charge('C', 't', 0, $T0, 1000));
	check_err('charge BADARGS: negative amount', 'BADARGS', charge('C', 't', -5, $T0, 1000));
	check_err('charge BADARGS: fractional amount', 'BADARGS', charge('C', 't', '1.5', $T0, 1000));
	check_err('charge BADARGS: amount with spaces', 'BADARGS', charge('C', 't', ' 15', $T0, 1000));
	check_err('charge BADARGS: amount above 2^53', 'BADARGS', charge('C', 't', '9007199254740992', $T0, 1000));
	check_err('charge BADARGS: now_ms not an integer', 'BADARGS', charge('C', 't', 1, 'now', 1000));
	check_err('charge BADARGS: negative now_ms', 'BADARGS', charge('C', 't', 1, -1, 1000));
	check_err('charge BADARGS: ttl_ms 0', 'BADARGS', charge('C', 't', 1, $T0, 0));
	check_err('charge BADARGS: ttl_ms missing', 'BADARGS', charge('C', 't', 1, $T0));
	check_err('charge BADARGS: key id without key hash', 'BADARGS', charge('C', 't', 1, $T0, 1000, 'k1'));
	check_err('charge BADARGS: key hash without key id', 'BADARGS',
		r('EVALSHA', $sha{charge}, 6, @K, kh('C', 'k1'), 't', 1, $T0, 1000));
	check_err('charge BADARGS: empty key id with key hash', 'BADARGS',
		r('EVALSHA', $sha{charge}, 6, @K, kh('C', 'k1'), 't', 1, $T0, 1000, ''));
	check_err('charge BADARGS: too many arguments', 'BADARGS', charge('C', 't', 1, $T0, 1000, '', 'extra'));
	snap_basic('C2', 1, 10 * $M);
	check('charge: empty key id without key hash = no key', '["OK",9999999]',
		charge('C2', 't6', 1, $T0, $TTL, ''));
}
apply_t('BS', 1, 0, status => 'active', available => '12.5');
check_err('charge BADSTATE: malformed available', 'BADSTATE', charge('BS', 't', 1, $T0, 1000));
apply_t('BS', 2, 0, status => 'active', holds => 0);
check_err('charge BADSTATE: available missing', 'BADSTATE', charge('BS', 't', 1, $T0, 1000));
apply_t('BS', 3, 0, status => 'active', available => 100, daily_spend_cap => '');
check_err('charge BADSTATE: empty limit field', 'BADSTATE', charge('BS', 't', 1, $T0, 1000));
rc('SET', "$P:{WT}:pending", 'x');
apply_t('WT', 1, 0, status => 'active', available => 100);
check_err('charge: wrong key type passes the Redis error through', 'WRONGTYPE', charge('WT', 't', 1, $T0, 1000));
snap_basic('BIG', 1, $MX);
check('charge: exact integer arithmetic at 2^53 - 1', '["OK",9007199254740990]', charge('BIG', 't', 1, $T0, 1000));
check('charge: the whole 2^53 - 2 remainder', '["OK",0]', charge('BIG', 'u', $MX - 1, $T0, 1000));

note 'key_charge.lua';
{
	my @K = K('KC');
	check('key_charge: NO_STATE without a key snapshot', '["NO_STATE","key"]',
		key_charge('KC', 'k1', 'e1', $M, $T0, 1000));
	apply_h(kh('KC', 'k1'), 1, 0, status => 'suspended', budget => 5 * $M, period => 'day', spent => 0,
		resets_at_ms => $T0 + 1000);
	check('key_charge: KEY_INACTIVE', '["KEY_INACTIVE","suspended"]', key_charge('KC', 'k1', 'e1', $M, $T0, 1000));
	apply_h(kh('KC', 'k1'), 2, 0, status => 'active', budget => 5 * $M, period => 'day', spent => 1 * $M,
		resets_at_ms => $T0 + 1000);
	check('key_charge: OK with remaining budget', '["OK",2000000]', key_charge('KC', 'k1', 'e1', 2 * $M, $T0, $TTL));
	check('key_charge: reservation with key id', 'e1=2000000/-/k1', pending('KC'));
	check('key_charge: replay', '["OK",2000000,"replay"]', key_charge('KC', 'k1', 'e1', 2 * $M, $T0, $TTL));
	check('key_charge: KEY_BUDGET_EXCEEDED', '["KEY_BUDGET_EXCEEDED",5000000,3000000]',
		key_charge('KC', 'k1', 'e2', 2000001, $T0, $TTL));
	check('key_charge: budget reached exactly', '["OK",0]', key_charge('KC', 'k1', 'e2', 2 * $M, $T0, $TTL));
	check('key_charge: period rollover (spent 0, pending 4)', '["OK",0]',
		key_charge('KC', 'k1', 'e3', $M, $T0 + 1000, $TTL));
	check("key_charge: no rollover while the gateway's clock is before the reset", '["KEY_BUDGET_EXCEEDED",5000000,6000000]',
		key_charge('KC', 'k1', 'e4', $M, $T0 + 999, $TTL));
	apply_h(kh('KC', 'k5'), 1, 0, status => 'active', budget => 2 * $M, period => 'lifetime', spent => 0);
	check('key_charge: reserve x1 (2) for 3 s', '["OK",0]', key_charge('KC', 'k5', 'x1', 2 * $M, $T0, 3000));
	check('key_charge: x1 counts', '["KEY_BUDGET_EXCEEDED",2000000,2000000]',
		key_charge('KC', 'k5', 'x2', 1, $T0, $TTL));
	ok(wait_redis_past(rc('ZSCORE', $K[1], 'x1')), "key_charge: Redis' clock passed x1's expiry");
	check('key_charge: reservations expire after ttl', '["OK",1999999]', key_charge('KC', 'k5', 'x2', 1, $T0, $TTL));
	check('key_charge: expired purged', 'e1=2000000/-/k1 e2=2000000/-/k1 e3=1000000/-/k1 x2=1/-/k5',
		pending('KC'));
	apply_h(kh('KC', 'k2'), 1, 0, status => 'active', period => 'lifetime', spent => 0);
	check('key_charge: no budget -> remaining -1', '["OK",-1]',
		key_charge('KC', 'k2', 'f1', 1000 * $M, $T0 + 3000, $TTL));
	check('key_charge: no budget replay -> -1', '["OK",-1,"replay"]',
		key_charge('KC', 'k2', 'f1', 1000 * $M, $T0 + 3000, $TTL));
	apply_h(kh('KC', 'k4'), 1, 0, status => 'active', budget => 3 * $M, period => 'lifetime', spent => 2 * $M,
		resets_at_ms => $T0);
	check('key_charge: lifetime budget never rolls over', '["KEY_BUDGET_EXCEEDED",3000000,2000000]',
		key_charge('KC', 'k4', 'h1', 2 * $M, $T0 + 3000, $TTL));
	snap_basic('KC', 1, 10 * $M);
	# pending: e1 2 + e2 2 + e3 1 + x2 0.000001 + f1 1000
	check('key_charge reservations count against the tenant in charge.lua', '["INSUFFICIENT",1,-995000001]',
		charge('KC', 'g1', 1, $T0 + 3000, $TTL));
	check('charge.lua replays a key_charge trace', '["OK",-995000001,"replay"]',
		charge('KC', 'f1', 1, $T0 + 3000, $TTL));
	check_err('key_charge BADARGS: empty key id', 'BADARGS',
		r('EVALSHA', $sha{key_charge}, 5, kh('KC', 'k1'), @K[ 1 .. 4 ], 'e9', 1, $T0, 1000, ''));
	check_err('key_charge BADARGS: key id missing', 'BADARGS',
		r('EVALSHA', $sha{key_charge}, 5, kh('KC', 'k1'), @K[ 1 .. 4 ], 'e9', 1, $T0, 1000));
	check_err('key_charge BADARGS: 6 keys', 'BADARGS',
		r('EVALSHA', $sha{key_charge}, 6, kh('KC', 'k1'), @K, 'e9', 1, $T0, 1000, 'k1'));
	check_err('key_charge BADARGS: empty trace', 'BADARGS', key_charge('KC', 'k1', '', 1, $T0, 1000));
	check_err('key_charge BADARGS: amount 0', 'BADARGS', key_charge('KC', 'k1', 'e9', 0, $T0, 1000));
	check_err('key_charge BADARGS: now_ms fractional', 'BADARGS', key_charge('KC', 'k1', 'e9', 1, '1.0', 1000));
	check_err('key_charge BADARGS: ttl_ms negative', 'BADARGS', key_charge('KC', 'k1', 'e9', 1, $T0, -1));
	apply_h(kh('KC', 'k3'), 1, 0, status => 'active', budget => 'lots');
	check_err('key_charge BADSTATE: malformed budget', 'BADSTATE', key_charge('KC', 'k3', 'e9', 1, $T0, 1000));
}

note 'settle.lua';
{
	my @K = K('S');
	snap_basic('S', 5, 10 * $M);
	check('settle: unknown trace -> 0', 0, settle('S', 'nope', 6));
	check('settle: unknown trace, refused -> 0', 0, settle('S', 'nope', 0));
	charge('S', 's1', $M, $T0, $TTL);
	# (3 s: s2 is settled before it expires)
	charge('S', 's2', 2 * $M, $T0, 3000);
	charge('S', 's3', 3 * $M, $T0, 3000);
	check('settle: refused (version 0) drops the reservation -> 1', 1, settle('S', 's1', 0));
	check('settle: refused trace gone from all structures', 's2=2000000/-/- s3=3000000/-/-', pending('S'));
	check('settle: committed -> 1', 1, settle('S', 's2', 6));
	check('settle: pending_ver set, score +inf', '6 inf', hget($K[3], 's2') . ' ' . rc('ZSCORE', $K[1], 's2'));
	check('settle: settled again with a lower version keeps the higher', 1, settle('S', 's2', 4));
	check('settle: pending_ver still 6', 6, hget($K[3], 's2'));
	ok(wait_redis_past(rc('ZSCORE', $K[1], 's3')), "settle: Redis' clock passed the ttl of s2 and s3");
	check('settle: settled reservation outlives its ttl', '["OK",7000000]', charge('S', 's5', $M, $T0, 1));
	check('settle: unsettled s3 expired, settled s2 kept', 's2=2000000/6/- s5=1000000/-/-', pending('S'));
	ok(wait_redis_past(rc('ZSCORE', $K[1], 's5')), "settle: Redis' clock passed the ttl of s5");
	check('settle: settled trace still replays', '["OK",8000000,"replay"]',
		charge('S', 's2', 2 * $M, $T0, 1));
	check('settle: after expiry -> 0', 0, settle('S', 's5', 7));
	charge('S', 's6', $M, $T0 + 60000, $TTL);
	check('settle (5 keys): snapshot 5 older than version 7 -> kept', 1, settle5('S', 's6', 7));
	check('settle (5 keys): kept with pending_ver 7', 's2=2000000/6/- s6=1000000/7/-', pending('S'));
	charge('S', 's7', $M, $T0 + 60000, $TTL);
	check('settle (5 keys): snapshot 5 already contains version 5 -> dropped, 1', 1, settle5('S', 's7', 5));
	check('settle (5 keys): s7 gone', 's2=2000000/6/- s6=1000000/7/-', pending('S'));
	check('settle: snapshot 6 prunes s2 only', 1, snap_basic('S', 6, 8 * $M));
	check('settle: s6 (7) kept', 's6=1000000/7/-', pending('S'));
	check_err('settle BADARGS: negative version', 'BADARGS', settle('S', 's6', -1));
	check_err('settle BADARGS: version not an integer', 'BADARGS', settle('S', 's6', 'v7'));
	check_err('settle BADARGS: empty version', 'BADARGS', settle('S', 's6', ''));
	check_err('settle BADARGS: empty trace', 'BADARGS', settle('S', '', 7));
	check_err('settle BADARGS: version missing', 'BADARGS', settle('S', 's6'));
	check_err('settle BADARGS: extra argument', 'BADARGS', settle('S', 's6', 7, 8));
	check_err('settle BADARGS: 3 keys', 'BADARGS', r('EVALSHA', $sha{settle}, 3, @K[ 1 .. 3 ], 's6', 7));
	check_err('settle BADARGS: 6 keys', 'BADARGS', r('EVALSHA', $sha{settle}, 6, @K, 'x', 's6', 7));
	check('settle: bad arguments changed nothing', 's6=1000000/7/-', pending('S'));
}

note 'what the database does, the gateway does';
# A retry of a reserved trace is a replay, whatever changed since (the
# database returns the original charge even if the account was suspended).
snap_basic('RS', 1, 10 * $M);
check('replay: reserve r1', '["OK",9000000]', charge('RS', 'r1', $M, $T0, 60000));
snap_basic('RS', 2, 10 * $M, status => 'suspended');
check('replay: after a suspension, the retry of r1 is a replay', '["OK",9000000,"replay"]',
	charge('RS', 'r1', $M, $T0 + 1, 60000));
check('replay: a new trace is refused', '["SUSPENDED","suspended"]', charge('RS', 'r2', $M, $T0 + 1, 60000));
apply_h(kh('RS', 'k1'), 2, 0, status => 'active', period => 'lifetime', spent => 0);
check('replay: key_charge reserve k1-r1', '["OK",-1]', key_charge('RS', 'k1', 'kr1', $M, $T0, 60000));
apply_h(kh('RS', 'k1'), 3, 0, status => 'revoked', period => 'lifetime', spent => 0);
check("replay: after the key is revoked, key_charge's retry is a replay", '["OK",-1,"replay"]',
	key_charge('RS', 'k1', 'kr1', $M, $T0 + 1, 60000));
check('replay: a new trace on the revoked key is refused', '["KEY_INACTIVE","revoked"]',
	key_charge('RS', 'k1', 'kr2', $M, $T0 + 1, 60000));
# A key budget counts the key's open holds (field holds of the key hash), as
# billing_deduct does: budget 10, 8 on hold, a charge of 5 is refused.
snap_basic('KH', 1, 100 * $M);
apply_h(kh('KH', 'k1'), 1, 0, status => 'active', period => 'month', spent => 0, budget => 10 * $M,
	holds => 8 * $M, resets_at_ms => $T0 + 100000);
check('key holds: charge.lua refuses 8 on hold + 5 > 10', '["KEY_BUDGET_EXCEEDED",10000000,8000000]',
	charge_k('KH', 'k1', 'h1', 5 * $M, $T0, 60000));
check('key holds: key_charge.lua too', '["KEY_BUDGET_EXCEEDED",10000000,8000000]',
	key_charge('KH', 'k1', 'h1', 5 * $M, $T0, 60000));
check('key holds: 8 + 2 = 10 fits (remaining 0)', '["OK",0]', key_charge('KH', 'k1', 'h2', 2 * $M, $T0, 60000));
# Magnitudes at the worker's clamp (2^53 - 1): a limit check refuses, it
# does not fail with BADSTATE.
apply_t('SAT', 1, 0, status => 'active', available => $MX, holds => 5, day_spend => $MX,
	daily_spend_cap => $MX, day_resets_at_ms => $T0 + 100000, month_resets_at_ms => $T0 + 100000);
check('clamped: a spend counter at 2^53 - 1 is over the cap',
	'["QUOTA_EXCEEDED","daily_spend",9007199254740991,9007199254740992]', charge('SAT', 's1', 1, $T0, 60000));
apply_t('SAT', 2, 0, status => 'active', available => $MX, holds => 0);
check('clamped: funds of 2^53 - 1 allow a charge', '["OK",9007199254740990]', charge('SAT', 's2', 1, $T0, 60000));
apply_h(kh('SAT', 'k1'), 2, 0, status => 'active', period => 'lifetime', spent => $MX, budget => $MX, holds => 1);
check('clamped: a key spend at 2^53 - 1 is over the budget (key_charge)',
	'["KEY_BUDGET_EXCEEDED",9007199254740991,9007199254740992]', key_charge('SAT', 'k1', 's3', 1, $T0, 60000));
# A stale push still prunes reservations settled at or below the stored
# version (an idle tenant would otherwise count them twice until its next
# change).
snap_basic('ST', 9, 10 * $M);
check('stale prune: reserve r1', '["OK",9000000]', charge('ST', 'r1', $M, $T0, 60000));
check('stale prune: settled at version 9 (the stored one)', 1, settle('ST', 'r1', 9));
check('stale prune: the re-push of version 9 is stale', 0, snap_basic('ST', 9, 9 * $M));
check('stale prune: and removed r1', '', pending('ST'));
{
	# Every read before the first write: a pending_ver of the wrong type
	# fails the apply before the hash is replaced.
	my @K = K('WTA');
	snap_basic('WTA', 1, 10 * $M);
	rc('SET', $K[3], 'x');
	check_err('wrong type: the apply fails', 'WRONGTYPE', snap_basic('WTA', 2, 5 * $M));
	check('wrong type: the hash was not replaced', '1 10000000',
		hget($K[0], 'version') . ' ' . hget($K[0], 'available'));
	rc('DEL', $K[3]);
	# The other pending keys are written only when a settled reservation is
	# pruned: then they are read first too.
	check('wrong type: reserve r1', '["OK",9000000]', charge('WTA', 'r1', $M, $T0, 60000));
	check('wrong type: settle r1 at version 2', 1, settle('WTA', 'r1', 2));
	rc('DEL', $K[4]);
	rc('SET', $K[4], 'x');
	check_err('wrong type: an apply that would prune fails on pending_key', 'WRONGTYPE',
		snap_basic('WTA', 3, 9 * $M));
	check('wrong type: the hash was not replaced by it', '1 10000000',
		hget($K[0], 'version') . ' ' . hget($K[0], 'available'));
	rc('DEL', @K[ 1 .. 4 ]);
	# A forced push is the consistency check's repair: it replaces a
	# snapshot key of another type; an unforced one fails and changes nothing.
	rc('DEL', $K[0]);
	rc('SET', $K[0], 'garbage');
	check_err('wrong type: an unforced apply on a string key fails', 'WRONGTYPE', snap_basic('WTA', 4, $M));
	check('wrong type: the string is still there', 'garbage', rc('GET', $K[0]));
	check('wrong type: a forced apply replaces the string', 1,
		apply_t('WTA', 4, 1, status => 'active', available => 7));
	check('wrong type: it is a hash again', 'hash available=7 status=active version=4',
		rc('TYPE', $K[0]) . ' ' . hash_sorted($K[0]));
	rc('RPUSH', kh('WTA', 'k9'), 'x');
	check('wrong type: a forced apply replaces an API key hash that is a list', 1,
		apply_h(kh('WTA', 'k9'), 3, 1, status => 'active', spent => 0));
	check('wrong type: the key hash', 'hash 3',
		rc('TYPE', kh('WTA', 'k9')) . ' ' . hget(kh('WTA', 'k9'), 'version'));
}

note 'the guarantee: a stale snapshot never resurrects reserved funds';
# Account at version 10 with 10 units; the gateway reserves 4, the database
# commits the charge at version 11, but the worker first pushes a snapshot
# taken before that commit (version 10 again, then a forced 10), then 11.
snap_basic('G', 10, 10 * $M);
check('guarantee: reserve 4', '["OK",6000000]', charge('G', 'g1', 4 * $M, $T0, 3000));
my $g1_expiry = rc('ZSCORE', (K('G'))[1], 'g1');
check('guarantee: settle at version 11', 1, settle('G', 'g1', 11));
ok(wait_redis_past($g1_expiry), "guarantee: Redis' clock passed g1's ttl");
check('guarantee: re-push of the pre-commit snapshot is stale', 0, snap_basic('G', 10, 10 * $M));
check('guarantee: forced pre-commit snapshot keeps the reservation', 1,
	apply_t('G', 10, 1, status => 'active', available => 10 * $M));
check('guarantee: 4 still reserved after the ttl', '["INSUFFICIENT",6000001,6000000]',
	charge('G', 'g2', 6000001, redis_ms() + 3600000, $TTL));
check('guarantee: snapshot 11 (balance 6) prunes it', 1, snap_basic('G', 11, 6 * $M));
check('guarantee: funds counted once', '["OK",0]', charge('G', 'g2', 6 * $M, redis_ms() + 3600000, $TTL));

note "rollovers wait for both clocks: a gateway's clock ahead gets no extra quota";
{
	my $now = redis_ms();
	snap_basic('RO', 1, 100 * $M, daily_requests_quota => 1, day_requests => 1,
		day_resets_at_ms => $now + 3600000, month_resets_at_ms => $now + 7200000);
	check("rollover: a gateway clock past the reset, Redis' before it: the day is not over",
		'["QUOTA_EXCEEDED","daily_requests",1,1]', charge('RO', 'r1', $M, $now + 86400000, $TTL));
	apply_h(kh('RO', 'k1'), 1, 0, status => 'active', budget => $M, period => 'day', spent => $M,
		resets_at_ms => $now + 3600000);
	check("rollover: nor a key's budget period (key_charge.lua)", '["KEY_BUDGET_EXCEEDED",1000000,1000000]',
		key_charge('RO', 'k1', 'r2', 1, $now + 86400000, $TTL));
}

note 'apply_snapshot.lua: a push purges expired reservations of its tenant';
{
	my @K = K('AP');
	snap_basic('AP', 1, 10 * $M);
	check('apply purge: reserve a1 for 3 s', '["OK",9000000]', charge('AP', 'a1', $M, $T0, 3000));
	check('apply purge: reserve a2 (long)', '["OK",8000000]', charge('AP', 'a2', $M, $T0, $TTL));
	check('apply purge: reserve a3, settled at 5', '["OK",7000000]', charge('AP', 'a3', $M, $T0, 3000));
	settle('AP', 'a3', 5);
	ok(wait_redis_past(rc('ZSCORE', $K[1], 'a1')), "apply purge: Redis' clock passed a1's expiry");
	check('apply purge: a1 still there (nobody charged since)', 'a1=1000000/-/- a2=1000000/-/- a3=1000000/5/-',
		pending('AP'));
	check('apply purge: a stale push', 0, snap_basic('AP', 1, 10 * $M));
	check('apply purge: removed the expired a1 only (a3 is settled: until version 5)',
		'a2=1000000/-/- a3=1000000/5/-', pending('AP'));
	check('apply purge: a hash-only apply purges nothing', 1, apply_h($K[0], 2, 0, status => 'active', available => 1));
}

note 'apply_snapshot.lua: a tenant with unsettled reservations only, or none (one EXISTS decides)';
{
	my @K = K('AQ');
	snap_basic('AQ', 1, 10 * $M);
	check('apply quick: reserve q1 for 300 ms', '["OK",9000000]', charge('AQ', 'q1', $M, $T0, 300));
	check('apply quick: only the zset and pending_amt name it (no pending_ver)', '1 1 0',
		join(' ', map { rc('EXISTS', $_) } @K[ 1 .. 3 ]));
	ok(wait_redis_past(rc('ZSCORE', $K[1], 'q1')), "apply quick: Redis' clock passed q1's expiry");
	check('apply quick: a push removes the expired q1', 1, snap_basic('AQ', 2, 10 * $M));
	check('apply quick: nothing pending, no pending key left', '0', rc('EXISTS', @K[ 1 .. 4 ]));
	check('apply quick: a push with nothing pending', 1, snap_basic('AQ', 3, 10 * $M));
	rc('SET', $K[1], 'x');
	check_err('apply quick: a pending zset of the wrong type still fails the push', 'WRONGTYPE',
		snap_basic('AQ', 4, 9 * $M));
	check('apply quick: the hash was not replaced', 3, hget($K[0], 'version'));
	rc('DEL', $K[1]);
	rc('SET', $K[2], 'x');
	check('apply quick: a pending_amt of another type with nothing to prune is not read (as ever)', 1,
		snap_basic('AQ', 4, 9 * $M));
	rc('DEL', $K[2]);
}

note 'purge.lua: the worker sweep of expired and settled reservations';
{
	my @K = K('PU');
	check('purge: nothing there -> 0', 0, purge('PU'));
	snap_basic('PU', 3, 10 * $M);
	# (3 s: the five reservations are made before p1 and p2 expire)
	charge('PU', 'p1', $M, $T0, 3000);
	charge('PU', 'p2', $M, $T0, 3000);
	charge('PU', 'p3', $M, $T0, $TTL);
	charge('PU', 'p4', $M, $T0, 3000);
	charge('PU', 'p5', $M, $T0, 3000);
	settle('PU', 'p4', 3);
	settle('PU', 'p5', 9);
	ok(wait_redis_past(rc('ZSCORE', $K[1], 'p2')), "purge: Redis' clock passed the expiry of p1, p2");
	check('purge: without the tenant hash, the expired unsettled ones -> 2', 2, purge('PU'));
	check('purge: p3 (live), p4 and p5 (settled) kept', 'p3=1000000/-/- p4=1000000/3/- p5=1000000/9/-',
		pending('PU'));
	check('purge: with the tenant hash, also the settled at version <= 3 -> 1', 1, purge5('PU'));
	check('purge: p3 and p5 (settled at 9) kept', 'p3=1000000/-/- p5=1000000/9/-', pending('PU'));
	check('purge: nothing more -> 0', 0, purge5('PU'));
	check_err('purge BADARGS: 3 keys', 'BADARGS', r('EVALSHA', $sha{purge}, 3, @K[ 1 .. 3 ]));
	check_err('purge BADARGS: 6 keys', 'BADARGS', r('EVALSHA', $sha{purge}, 6, @K, 'x'));
	check_err('purge BADARGS: an argument', 'BADARGS', r('EVALSHA', $sha{purge}, 4, @K[ 1 .. 4 ], 'x'));
	rc('SET', "$P:{PW}:pending_amt", 'x');
	rc('ZADD', "$P:{PW}:pending", 1, 'old');
	check_err('purge: a key of the wrong type fails before any write', 'WRONGTYPE', purge('PW'));
	check('purge: the zset is untouched', 'old', join(' ', @{ rc('ZRANGE', "$P:{PW}:pending", 0, -1) }));
}

note 'charge.lua: grant credit that expires (grants_expiries)';
{
	my $now = redis_ms();
	my ($past, $soon, $later) = ($now - 1000, $now + 3600000, $now + 7200000);
	# available 30 of which 5 expired a second ago (not pushed again yet), 3
	# expire in an hour, 2 in two hours
	snap_basic('GR', 1, 30 * $M, grants_expire_at_ms => $past, grants_expire_amount => 5 * $M,
		grants_expiries => "$past:5000000,$soon:3000000,$later:2000000");
	check("grants: credit past its expiry by Redis' clock is not spendable", '["INSUFFICIENT",25000001,25000000]',
		charge('GR', 'g1', 25000001, $T0, $TTL));
	check('grants: the rest is', '["OK",0]', charge('GR', 'g1', 25 * $M, $T0, $TTL));
	settle('GR', 'g1', 0);
	check("grants: a gateway clock past the next expiry leaves it out too (stricter)",
		'["INSUFFICIENT",22000001,22000000]', charge('GR', 'g2', 22000001, $soon, $TTL));
	check('grants: ... and past both', '["INSUFFICIENT",20000001,20000000]',
		charge('GR', 'g2', 20000001, $later, $TTL));
	check('grants: reserve g2', '["OK",24999999]', charge('GR', 'g2', 1, $T0, $TTL));
	check('grants: its replay leaves the expired credit out too', '["OK",24999999,"replay"]',
		charge('GR', 'g2', 1, $T0, $TTL));
	# the next expiry alone (a hash written without the list)
	snap_basic('GN', 1, 30 * $M, grants_expire_at_ms => $past, grants_expire_amount => 5 * $M);
	check('grants: grants_expire_at_ms with grants_expire_amount alone', '["INSUFFICIENT",25000001,25000000]',
		charge('GN', 'n1', 25000001, $T0, $TTL));
	snap_basic('GF', 1, 30 * $M, grants_expiries => "$soon:5000000");
	check('grants: credit expiring later is spendable now', '["OK",0]', charge('GF', 'f1', 30 * $M, $T0, $TTL));
	for my $bad ("$past", "$past:", "$past:5.5", ":5", "$past:5;$soon:1", "-$past:5", 'x' x 5000)
	{
		apply_t('GB', 1, 1, status => 'active', available => 10, grants_expiries => $bad);
		check_err("grants BADSTATE: grants_expiries '" . substr($bad, 0, 20) . "'", 'BADSTATE',
			charge('GB', 'b', 1, $T0, $TTL));
	}
	apply_t('GB', 2, 1, status => 'active', available => 10, grants_expire_at_ms => $past);
	check_err('grants BADSTATE: grants_expire_at_ms without the amount', 'BADSTATE', charge('GB', 'b', 1, $T0, $TTL));
}

note 'NOSCRIPT';
snap_basic('N', 1, 10 * $M);
rc('SCRIPT', 'FLUSH');
my $after_flush        = charge('N', 'n1', 1, $T0, $TTL);
my $exists_after_flush = join(' ', @{ rc('SCRIPT', 'EXISTS', $sha{charge}) });
my $sha_before         = $sha{charge};
my $reloaded           = rc('SCRIPT', 'LOAD', slurp_file("$lua/charge.lua"));
load_all();
check_err('EVALSHA after SCRIPT FLUSH fails with NOSCRIPT', 'NOSCRIPT', $after_flush);
check('SCRIPT EXISTS after SCRIPT FLUSH is 0', 0, $exists_after_flush);
check('SCRIPT LOAD again returns the same sha (the sha1 of the file)', "$sha_before $sha_before",
	"$reloaded " . sha1_hex(slurp_file("$lua/charge.lua")));
check('EVALSHA works after reloading', '["OK",9999999]', charge('N', 'n1', 1, $T0, $TTL));
check('all scripts reloaded', join(' ', (1) x @scripts), join(' ', @{ rc('SCRIPT', 'EXISTS', map { $sha{$_} } @scripts) }));
check('settle callable after reloading', 0, settle('C', 'none', 1));

$conn->close;
$redis->stop;
done_testing();

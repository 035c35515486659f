
# A hostile Redis (test/tools/fake_redis.pl) against the worker: issue 12's
# C1 (a SCAN reply with an integer key crashed the server), M5 (a 512 MiB
# reply took the worker's memory to 1 GB), replies of wrong types, and
# H2 (a trickling or silent Redis hung the worker: SIGTERM, reloads, a fast
# shutdown, hold expiry and job rescue all waited).  The worker must neither
# die by a signal nor block: every surprise is "error -> disconnect -> back
# off -> reconnect", and billing_sync_status() says what happened.  A fast
# shutdown completes promptly whatever Redis does (under 40 s, where a
# worker deaf to it would take 60 s or more): checked while Redis
# trickles, says nothing, is in the middle of a huge reply and of a SCAN
# that never ends (the other modes' replies are refused as they arrive: the
# worker is then backing off, as after the silent server).

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);
use BillingTest;

my $db = 'app';
my $real = BillingTest::Redis->new('real');
my $node = BillingTest::node('main', database => $db, redis => $real,
	conf => join("\n",
		"billing.redis_command_timeout = 1000",
		"billing.redis_connect_timeout = 1000",
		"billing.maintenance_interval = 200",
		"billing.check_interval = 0"));

sub status
{
	my ($col) = @_;
	return BillingTest::query($node, $db, "SELECT $col FROM billing_sync_status()") // '';
}
sub worker_pid { status('worker_pid') }

# the database's clock, and whether the worker recorded an error matching
# RE after it: last_error is kept until the next one, so a wait for an
# error must not be met by one an earlier fake caused
sub db_now { $node->safe_psql($db, "SELECT clock_timestamp()") }
sub error_since
{
	my ($since, $re) = @_;
	return status("coalesce(last_error_at > '$since', false)") eq 't' && status('last_error') =~ $re;
}

# point the worker at another Redis port (a reload)
sub point_at
{
	my ($port) = @_;
	$node->safe_psql($db, "ALTER SYSTEM SET billing.redis_port = $port; SELECT pg_reload_conf()");
}

# a fast shutdown; it ends the background workers with exit code 1 (allowed)
my @killed;
sub stop_fast
{
	my $off = BillingTest::log_size($node);
	my $t0 = time;
	$node->stop('fast');
	my $took = time - $t0;
	push @killed, (BillingTest::log_since($node, $off) =~ /\(PID (\d+)\) exited with exit code 1/g);
	return $took;
}

# the worker's peak memory (VmHWM, kB) and its current pid
sub vm_hwm
{
	my ($pid) = @_;
	open(my $fh, '<', "/proc/$pid/status") or die "/proc/$pid/status: $!";
	while (<$fh>) { return $1 if /^VmHWM:\s+(\d+) kB/; }
	die "no VmHWM in /proc/$pid/status";
}

$node->safe_psql($db, "SELECT billing_account_create('t1'); SELECT billing_credit('t1', 10, 'c1')");
ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $real) }),
	'the worker mirrors into a real Redis');
my $pid = worker_pid();
ok($pid, "worker pid $pid");

# --- C1: SCAN reply with an integer element, during the wipe of another ledger's mirror
{
	my $fake = BillingTest::FakeRedis->new('scan_int');
	point_at($fake->port);
	ok(BillingTest::wait_until(120, sub { $fake->count('SCAN') >= 3 }),
		'scan_int: the worker wiped, met the integer key, reconnected and tried again (' . $fake->count('SCAN') . ' SCANs)');
	like(status('last_error'), qr/SCAN/, 'scan_int: last_error names SCAN: ' . status('last_error'));
	is(worker_pid(), $pid, 'scan_int: the same worker process (it never died)');
	# (each retry shows it connected for the few ms until SCAN fails again)
	ok(BillingTest::wait_until(30, sub { status('connected') eq 'f' }), 'scan_int: not shown as connected');
	$fake->stop;
}

# --- a SCAN that ignores MATCH, during the wipe of another ledger's mirror:
# only keys of billing's pattern (<prefix>:{tenant}...) are deleted, never a
# key of another application, nor billing's own keys outside it
{
	my $fake = BillingTest::FakeRedis->new('scan_foreign');
	point_at($fake->port);
	my $unlinks = sub { [ grep { /^\d+ UNLINK/ } split /\n/, (-f $fake->{log} ? slurp_file($fake->{log}) : '') ] };
	ok(BillingTest::wait_until(120, sub { @{ $unlinks->() } >= 1 }), 'scan_foreign: the worker wiped');
	my @bad = grep { !/^\d+ UNLINK billing:\{a\}$/ } @{ $unlinks->() };
	is_deeply(\@bad, [], 'scan_foreign: every UNLINK named billing:{a} only');
	is(worker_pid(), $pid, 'scan_foreign: the same worker process');
	$fake->stop;
}

# --- a Redis that loses the worker's marker key again and again (one that
# evicts it, or lies): each loss asks for a full resync, but one that
# follows the last within a minute waits twice as long as it (1 s, 2 s, 4 s
# ... 30 s), so the worker does not read and push every account, and log
# it, in every cycle
{
	my $fake = BillingTest::FakeRedis->new('marker_gone');
	my $off = BillingTest::log_size($node);
	my $resyncs = sub { status('full_resyncs') };
	point_at($fake->port);
	my $from = $resyncs->();
	# (the fakes before this one asked for resyncs too, each with a run_id
	# of its own: the waits may have grown to 30 s already)
	ok(BillingTest::wait_until(300, sub { $resyncs->() >= $from + 3 }),
		'marker_gone: every loss of the marker is answered with a full resync');
	my ($n0, $t0) = ($resyncs->(), time);
	sleep 30;
	my ($n1, $t1) = ($resyncs->(), time);
	my $lines = () = BillingTest::log_since($node, $off) =~ /marker key billing:__sync__ is gone/g;
	note("marker_gone: " . ($n1 - $n0) . " full resyncs in " . int($t1 - $t0) . " s, $lines log lines in all");
	cmp_ok($n1 - $n0, '<=', 8, 'marker_gone: at most 8 of them in 30 s (each waits twice as long as the one before: 1 s, 2 s, 4 s, ...)');
	ok($lines >= 1 && $lines <= $n1 - $from + 2, "marker_gone: one log line per resync ($lines lines, " . ($n1 - $from) . ' resyncs)');
	like(BillingTest::log_since($node, $off), qr/this one starts in \d+ s/, 'marker_gone: the log says how long one waits');
	is(worker_pid(), $pid, 'marker_gone: the same worker process');
	$fake->stop;
}

# --- a Redis that fails again 2 s after every reconnect: each connection
# serves whole cycles (EVALSHA, the events' MULTI/EXEC), then is closed.
# One good cycle does not end the outage (Redis must serve 10 s for that),
# so the backoff keeps doubling (to 5 s) and the outage is logged once:
# not, as before, a reconnect 100 ms after each close and two log lines
# ("unavailable", "connected again") per flap
{
	my $fake = BillingTest::FakeRedis->new('flap');
	point_at($fake->port);
	$node->safe_psql($db, "SELECT billing_credit('t1', 1, 'c-flap')");
	ok(BillingTest::wait_until(120, sub { $fake->count('CLOSE') >= 3 }), 'flap: the fake closed three connections');
	cmp_ok($fake->count('EVALSHA'), '>=', 1, 'flap: a connection served a push before it was closed');
	my $off = BillingTest::log_size($node);
	my ($c0, $t0) = ($fake->count('CLOSE'), time);
	sleep 30;
	my ($c1, $t1) = ($fake->count('CLOSE'), time);
	my $log = BillingTest::log_since($node, $off);
	my $down = () = $log =~ /Redis at \S+ unavailable/g;
	my $again = () = $log =~ /connected to Redis at \S+ again/g;
	note("flap: " . ($c1 - $c0) . " connections closed in " . int($t1 - $t0) . " s; log lines: $down unavailable, $again connected again");
	cmp_ok($c1 - $c0, '<=', 10, 'flap: at most 10 reconnects in 30 s (the backoff grows to 5 s)');
	is($down + $again, 0, 'flap: the outage, logged when it began, is not logged again per reconnect');
	is(worker_pid(), $pid, 'flap: the same worker process');
	$fake->stop;
}

# --- replies of wrong types everywhere
{
	my $fake = BillingTest::FakeRedis->new('wrong_types');
	point_at($fake->port);
	$node->safe_psql($db, "SELECT billing_credit('t1', 1, 'c2')");
	ok(BillingTest::wait_until(120, sub { $fake->count('INFO SERVER') >= 12 }),
		'wrong_types: many connections with wrong replies (' . $fake->count('INFO SERVER') . ' INFOs, '
		  . $fake->count('EVALSHA') . ' EVALSHAs)');
	is(worker_pid(), $pid, 'wrong_types: the same worker process');
	$fake->stop;
}

# --- M5: a reply of 512 MiB, an array of 10^8 elements, a nesting 10^5 deep
for my $case ([ 'huge', qr/billing\.redis_max_reply_size/ ],
	[ 'huge_array', qr/array of more than|billing\.redis_max_reply_size/ ],
	[ 'deep', qr/nested deeper/ ])
{
	my ($mode, $why) = @$case;
	my $fake = BillingTest::FakeRedis->new($mode);
	my $since = db_now();
	point_at($fake->port);
	ok(BillingTest::wait_until(120, sub { $fake->count('INFO SERVER') >= 2 && error_since($since, $why) }),
		"$mode: refused, reconnected (" . $fake->count('INFO SERVER') . ' INFOs): ' . status('last_error'));
	is(worker_pid(), $pid, "$mode: the same worker process");
	my $hwm = vm_hwm($pid);
	cmp_ok($hwm, '<', 160 * 1024, "$mode: the worker's peak memory stayed small ($hwm kB)");
	$fake->stop;
}

# --- a fast shutdown in the middle of a huge reply, sent slowly (64 KiB
# every 0.3 s: the worker closes the connection at 16 MiB,
# billing.redis_max_reply_size, after 75 s) and with the longest command
# timeout (60 s): only the worker's sliced wait can make the stop prompt.
# "Prompt" is under 40 s: a fast shutdown also writes a checkpoint, which
# a busy machine may take seconds over; a worker deaf to it takes 60 s.
{
	my $fake = BillingTest::FakeRedis->new('huge', '--delay', 0.3);
	$node->safe_psql($db, "ALTER SYSTEM SET billing.redis_command_timeout = 60000; "
		  . "ALTER SYSTEM SET billing.redis_port = " . $fake->port . "; SELECT pg_reload_conf()");
	ok(BillingTest::wait_until(120, sub { my $k = $fake->last_count('MIB'); $k >= 1 && $k <= 4 }, 0.05),
		'huge, slowly: the worker is in the middle of the reply (' . $fake->last_count('MIB') . ' MiB)');
	my $took = stop_fast();
	cmp_ok($took, '<', 40, sprintf('huge, slowly: pg_ctl stop -m fast took %.1f s (%d MiB into the reply)',
			$took, $fake->last_count('MIB')));
	$fake->stop;
	$node->start;
	$node->safe_psql($db, "ALTER SYSTEM RESET billing.redis_command_timeout; SELECT pg_reload_conf()");
	ok(BillingTest::wait_until(120, sub { worker_pid() }), 'huge, slowly: the worker started again');
	$pid = worker_pid();
}

# --- a SCAN cursor that never ends
{
	my $fake = BillingTest::FakeRedis->new('scan_forever');
	my $since = db_now();
	point_at($fake->port);
	ok(BillingTest::wait_until(120, sub { error_since($since, qr/SCAN did not finish/) }),
		'scan_forever: the wipe gave up: ' . status('last_error'));
	my $before = $fake->count('SCAN');
	ok(BillingTest::wait_until(120, sub { $fake->count('SCAN') > $before }),
		'scan_forever: and starts over after a backoff');
	is(worker_pid(), $pid, 'scan_forever: the same worker process');
	$fake->stop;

	# a fast shutdown in the middle of a wipe whose SCANs take 1.5 s each: a
	# worker that looked at interrupts only between the wipe's steps (50
	# SCANs, then the main loop) would stop up to 75 s later, one that
	# finished the wipe (104 SCANs: DBSIZE says 10) up to 156 s later
	$fake = BillingTest::FakeRedis->new('scan_forever', '--delay', 1.5);
	point_at($fake->port);
	ok(BillingTest::wait_until(120, sub { my $k = $fake->last_count('SCAN'); $k >= 1 && $k <= 10 }, 0.05),
		'scan_forever, slowly: the worker is in the middle of a wipe (' . $fake->last_count('SCAN') . ' SCANs)');
	my $took = stop_fast();
	cmp_ok($took, '<', 40, sprintf('scan_forever, slowly: pg_ctl stop -m fast took %.1f s (%d SCANs into the wipe)',
			$took, $fake->last_count('SCAN')));
	$fake->stop;
	$node->start;
}

# --- H2: a trickling Redis
{
	my $fake = BillingTest::FakeRedis->new('trickle');
	my $since = db_now();
	point_at($fake->port);
	ok(BillingTest::wait_until(120, sub { $fake->count('INFO SERVER') >= 1 }), 'trickle: connected');
	ok(BillingTest::wait_until(120, sub {
		status('connected') eq 'f' && error_since($since, qr/stalls|timeout/) }),
		'trickle: billing_sync_status() shows the stall: ' . status('last_error'));

	# the maintenance goes on: a hold of one second expires
	$node->safe_psql($db, "SELECT billing_hold('t1', 1, 'h1', interval '1 second')");
	ok(BillingTest::wait_until(120, sub {
		(BillingTest::query($node, $db, "SELECT status FROM billing.holds WHERE trace_id = 'h1'") // '') eq 'expired' }),
		'trickle: the hold expired (maintenance runs while Redis trickles)');

	# and so does the job rescue (the same maintenance): a job claimed with a
	# lease of one second that nobody renews is queued again
	$node->safe_psql($db, "SELECT billing_job_submit('t1', 'render', 'j1', 1)");
	my $job = $node->safe_psql($db,
		"SELECT job_id FROM billing_job_claim('w1', tenant_id => 't1', lease => interval '1 second')");
	ok($job, "trickle: job $job claimed");
	my $rescued = sub {
		BillingTest::query($node, $db, "SELECT state || ', ' || last_error FROM billing.jobs "
			  . "WHERE tenant_id = 't1' AND job_id = $job") // '' };
	ok(BillingTest::wait_until(120, sub { $rescued->() =~ /^queued, lease expired \(worker w1, attempt 1\)$/ }),
		'trickle: the job whose lease expired was rescued (' . $rescued->() . ')');

	# a reload is honoured now, not after the current command
	my $t0 = time;
	point_at($real->port);
	ok(BillingTest::wait_until(120, sub { status('connected') eq 't' }),
		sprintf('trickle: a reload moved the worker to the real Redis (%.1f s)', time - $t0));
	$node->safe_psql($db, "SELECT billing_credit('t1', 1, 'c3')");
	ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $real) }),
		'trickle: the real Redis caught up');

	# SIGTERM (pg_terminate_backend) while Redis trickles
	$since = db_now();
	my $infos = $fake->count('INFO SERVER');
	point_at($fake->port);
	ok(BillingTest::wait_until(120, sub {
		$fake->count('INFO SERVER') > $infos && error_since($since, qr/stalls|timeout/) && status('connected') eq 'f' }),
		'trickle: back on the trickling Redis, stalled again');
	my $old = worker_pid();
	$t0 = time;
	$node->safe_psql($db, "SELECT pg_terminate_backend($old)");
	ok(BillingTest::wait_until(60, sub { !kill(0, $old) }, 0.05),
		sprintf('trickle: pg_terminate_backend ended the worker (%.2f s)', time - $t0));
	cmp_ok(time - $t0, '<', 40, 'trickle: ... promptly (a worker deaf to it waits for the reply, which never ends)');
	push @killed, $old;
	# the connections so far are the old worker's (a new one starts 5 s
	# after it ended: bgw_restart_time)
	my %old_conns = map { $_ => 1 } $fake->connections('INFO SERVER');
	ok(BillingTest::wait_until(120, sub { my $p = worker_pid(); $p && $p != $old }),
		'trickle: the postmaster started a new worker');

	# a fast shutdown completes while Redis trickles
	ok(BillingTest::wait_until(120, sub { grep { !$old_conns{$_} } $fake->connections('INFO SERVER') }),
		'trickle: the new worker waits on Redis too (its INFO trickles)');
	my $took = stop_fast();
	cmp_ok($took, '<', 40, sprintf('trickle: pg_ctl stop -m fast took %.1f s', $took));
	$node->start;
	$fake->stop;
}

# --- a server that accepts and never answers
{
	my $fake = BillingTest::FakeRedis->new('silent');
	my $since = db_now();
	point_at($fake->port);
	ok(BillingTest::wait_until(120, sub { error_since($since, qr/timeout/) }),
		'silent: the connection attempt times out: ' . status('last_error'));
	my $took = stop_fast();
	cmp_ok($took, '<', 40, sprintf('silent: pg_ctl stop -m fast took %.1f s', $took));
	$node->start;
	$fake->stop;
	point_at($real->port);
	$node->safe_psql($db, "SELECT billing_credit('t1', 1, 'c4')");
	ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $real) }),
		'back on the real Redis, the mirror converges');
}

BillingTest::no_crashes($node, @killed);
done_testing();

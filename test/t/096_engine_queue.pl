
# The charge engine's queue is bounded, and so is the engine's memory
# (issue 18):
#
# - a full queue is back-pressure, as docs/sql-api.md says: with
#   billing.engine_queue_size = 8 and the engine held (the test gate), 12
#   callers of billing_charge give 8 queued charges (the queue's places)
#   and 4 callers waiting for a place; none is refused.  A waiting caller
#   that is cancelled gets 57014 and one that is terminated loses its
#   connection, and neither charge is made; when the engine goes on, every
#   other caller gets its own charge, once, and the places are all free
#   again;
# - the engine worker's memory stays flat: its memory contexts
#   (pg_log_backend_memory_contexts: the bytes used, from the grand total
#   in the server log) after 40,000 more charges, batched from 4 sessions,
#   are within 128 kB of what they were after the first 10,000 (a leak of
#   4 bytes a charge would exceed that);
# - a cancelled caller is told what became of its charge (the CONTEXT of
#   the 57014): nothing was charged if the engine had not taken it (held
#   at the gate), "it may have been made" if it had (waiting for an account
#   lock), and it is then made once, which the same trace id replays;
# - a caller whose statement holds a lock the engine needs (it reads
#   billing.accounts) while a LOCK TABLE waits for that lock and the engine
#   for the LOCK TABLE gets 40P01 instead of waiting for ever, and its
#   charge is made once;
# - an engine worker that cannot be started (no background worker slot)
#   refuses the charge with ZB112, and nothing is charged.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Utils;
use Test::More;
use BillingTest;

my $DB = 'engine_queue';
my $QUEUE = 8;
my $CALLERS = 12;
my $node = BillingTest::node('queue', database => $DB, conf => join("\n",
	"billing.engine_workers = 1",
	"billing.engine_queue_size = $QUEUE"));

sub sql { return $node->safe_psql($DB, shift) }
sub engine { return BillingTest::query($node, $DB, "SELECT $_[0] FROM billing_engine_status()") // '' }

sql("SELECT billing_account_create('q'), billing_credit('q', 1000, 'q-top-up');
     SELECT billing_account_create('m' || i) FROM generate_series(1, 20) i;
     SELECT billing_credit('m' || i, 1000000, 'm-top-up-' || i) FROM generate_series(1, 20) i;");

# the engine is running before the gate is taken (a caller starts it)
is(sql("SELECT replayed FROM billing_charge('q', 0.5, 'q-first')"), 'f', 'a first charge starts the engine');
is(engine('state'), 'running', 'the engine worker runs');
is(engine('free_slots'), $QUEUE, "the queue has its $QUEUE places");

note 'a full queue';
my $gate = BillingTest::Session->new($node, $DB);
is($gate->call('SELECT billing.engine_test_gate(true)')->{status}, 'ok', 'the engine is held');

my $dir = PostgreSQL::Test::Utils::tempdir();

# A statement in a session of its own, in the background (it may wait for
# long): its backend's pid goes to "$dir/NAME-pid" once it is connected, its
# answer to "$dir/NAME-result" (background_result: status, the first row's
# value or the SQLSTATE, the message).
sub background
{
	my ($name, $query) = @_;
	return BillingTest::spawn(sub {
		my $s = BillingTest::Session->new($node, $DB, timeout => 300);
		PostgreSQL::Test::Utils::append_to_file("$dir/$name-pid", $s->pid);
		my $r = $s->call($query);
		PostgreSQL::Test::Utils::append_to_file("$dir/$name-result",
			join("\n", $r->{status}, ($r->{status} eq 'ok' ? $r->{rows}[0] : $r->{sqlstate}) // '-', $r->{message} // ''));
		$s->close;
	});
}
sub background_pid { my $f = "$dir/$_[0]-pid"; return -s $f ? slurp_file($f) : undef }
sub background_result { return split /\n/, slurp_file("$dir/$_[0]-result"), 3 }

# A LOCK TABLE billing.accounts (background NAME) that queues behind the
# lock of the session PID; returns its child and its backend's pid.
sub lock_table_behind
{
	my ($name, $pid) = @_;
	my $child = background($name, 'BEGIN; LOCK TABLE billing.accounts IN ACCESS EXCLUSIVE MODE; COMMIT');
	my $ddl_pid;
	ok(BillingTest::wait_until(180, sub {
		$ddl_pid = background_pid($name);
		defined $ddl_pid && sql("SELECT pg_blocking_pids($ddl_pid) = ARRAY[$pid]") eq 't' }),
		"a LOCK TABLE waits for process $pid");
	return ($child, $ddl_pid);
}
my %callers;
for my $i (1 .. $CALLERS)
{
	$callers{$i} = BillingTest::spawn(sub {
		my $s = BillingTest::Session->new($node, $DB, timeout => 300);
		my $pid = $s->pid;
		PostgreSQL::Test::Utils::append_to_file("$dir/pid-$i", $pid);
		my $r = $s->call("SELECT entry_id || ' ' || replayed FROM billing_charge('q', 1, 'q-$i')");
		PostgreSQL::Test::Utils::append_to_file("$dir/result-$i",
			join(' ', $r->{status}, $r->{sqlstate} // '-', @{ $r->{rows} }));
		$s->close;
	});
}
my %pid_of;
ok(BillingTest::wait_until(180, sub {
	%pid_of = map { -s "$dir/pid-$_" ? ($_ => slurp_file("$dir/pid-$_")) : () } 1 .. $CALLERS;
	keys %pid_of == $CALLERS }), 'every caller is connected');
my %caller_of = reverse %pid_of;
my $in = join(',', values %pid_of);
my $waiting = sub {    # wait_event_type/wait_event => the callers waiting so
	my %w;
	for (split /\n/, sql("SELECT pid, coalesce(wait_event_type, '-') || '/' || coalesce(wait_event, '-')
	                         FROM pg_stat_activity WHERE pid IN ($in)"))
	{
		my ($pid, $w) = split /\|/;
		push @{ $w{$w} }, $caller_of{$pid};
	}
	return \%w;
};
my $w;
ok(BillingTest::wait_until(180, sub {
	$w = $waiting->();
	@{ $w->{'Lock/advisory'} // [] } == $QUEUE && @{ $w->{'Extension/Extension'} // [] } == $CALLERS - $QUEUE }),
	"$QUEUE callers have a place in the queue (held at the gate), " . ($CALLERS - $QUEUE) . ' wait for one')
  or diag(explain($w));
is(engine('free_slots'), 0, 'no place is free');
is(engine('queued') + engine('free_slots'), $QUEUE, 'the places are the queued charges and the free places, no more');
is(sql("SELECT count(*) FROM billing.entries WHERE tenant_id = 'q' AND trace_id LIKE 'q-%' AND trace_id <> 'q-first' AND trace_id <> 'q-top-up'"),
	'0', 'nothing is charged while the engine is held');

my @for_place = sort { $a <=> $b } @{ $w->{'Extension/Extension'} };
my ($cancelled, $terminated) = @for_place[ 0, 1 ];
sql("SELECT pg_cancel_backend($pid_of{$cancelled})");
sql("SELECT pg_terminate_backend($pid_of{$terminated})");
for my $i ($cancelled, $terminated)
{
	ok(BillingTest::wait_until(180, sub { defined BillingTest::exited($callers{$i}) }), "caller $i is answered");
}
like(slurp_file("$dir/result-$cancelled"), qr/^lost 57014/, 'a cancelled caller waiting for a place gets 57014');
like(slurp_file("$dir/result-$terminated"), qr/^lost /, 'a terminated one loses its connection');
is(engine('free_slots'), 0, 'the queue is still full (the callers that left had no place)');

is($gate->call('SELECT billing.engine_test_gate(false)')->{status}, 'ok', 'the engine goes on');
my @rest = grep { $_ != $cancelled && $_ != $terminated } 1 .. $CALLERS;
for my $i (@rest)
{
	ok(BillingTest::wait_until(300, sub { defined BillingTest::exited($callers{$i}) }), "caller $i is answered");
}
my @charged = grep { slurp_file("$dir/result-$_") =~ /^ok 00000 \d+ false$/ } @rest;
is(scalar(@charged), scalar(@rest), 'every other caller got its own charge (' . scalar(@rest) . ')')
  or diag(join("\n", map { "$_: " . slurp_file("$dir/result-$_") } @rest));
is(sql("SELECT string_agg(trace_id, ' ' ORDER BY trace_id) FROM billing.entries
         WHERE tenant_id = 'q' AND kind = 'deduct' AND trace_id <> 'q-first'"),
	join(' ', sort map { "q-$_" } @rest),
	'the ledger holds exactly those charges, once each: not the cancelled nor the terminated caller\'s');
is(sql("SELECT balance FROM billing.balances WHERE tenant_id = 'q'"),
	sprintf('%.6f', 1000 - 0.5 - scalar(@rest)), 'and the balance says so');
ok(BillingTest::wait_until(60, sub { engine('free_slots') == $QUEUE }), 'every place is free again');
$gate->close;

note 'what a cancelled caller is told';
# The CONTEXT of the 57014 says what became of the charge, decided as the
# caller gives its place up (under the queue's lock).  Queued, not taken
# (the engine held at the gate): nothing was charged.
sql("SELECT billing_account_create('k'), billing_credit('k', 100, 'k-top-up')");
$gate = BillingTest::Session->new($node, $DB);
is($gate->call('SELECT billing.engine_test_gate(true)')->{status}, 'ok', 'the engine is held');
my $caller = BillingTest::Session->new($node, $DB, timeout => 300);
$caller->call("SET statement_timeout = '3s'");
my $r = $caller->call("SELECT replayed FROM billing_charge('k', 1, 'k-queued')");
is($r->{sqlstate}, '57014', 'a caller whose charge waits in the queue is cancelled (statement_timeout)');
like($r->{message}, qr/CONTEXT:\s+billing_charge: the call ended before the charge engine took the charge: nothing was charged/,
	'its CONTEXT: nothing was charged');
is($gate->call('SELECT billing.engine_test_gate(false)')->{status}, 'ok', 'the engine goes on');
$gate->close;
is(sql("SELECT replayed FROM billing_charge('k', 1, 'k-after')"), 'f', 'a later charge is made');
is(sql("SELECT count(*) FROM billing.entries WHERE trace_id = 'k-queued'"), '0', 'the cancelled one was not');

# Taken: another transaction holds the account, so the engine, having
# taken the charge, waits for the lock (after billing.engine_lock_wait).
# A caller cancelled now is told it may have been made, and it is once
# the lock is free: the same trace id then replays it.
my $holder = BillingTest::Session->new($node, $DB);
$holder->call('BEGIN');
is($holder->call("SELECT count(*) FROM billing_deduct('k', 1, 'k-holder')")->{status}, 'ok',
	'another transaction holds the account');
# (cancelled once the engine waits for the lock: it has taken the charge)
my $taken = background('taken', "SELECT replayed FROM billing_charge('k', 1, 'k-taken')");
ok(BillingTest::wait_until(180, sub {
	my $pid = engine('pid');
	background_pid('taken') && $pid ne '' && sql("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $pid") eq 'Lock' }),
	'the engine has taken the charge and waits for the account');
is(sql('SELECT pg_cancel_backend(' . background_pid('taken') . ')'), 't', 'the caller is cancelled');
ok(BillingTest::wait_until(180, sub { defined BillingTest::exited($taken) }), 'and answered');
my (undef, $taken_state, $taken_message) = background_result('taken');
is($taken_state, '57014', 'a caller whose charge the engine is applying is cancelled');
like($taken_message, qr/CONTEXT:\s+billing_charge: the charge engine was applying this charge when the call ended, so it may have been made; call billing_charge again with the same trace id/,
	'its CONTEXT: it may have been made, call again with the same trace id');
is($holder->call('COMMIT')->{status}, 'ok', 'the other transaction commits');
ok(BillingTest::wait_until(120, sub { sql("SELECT count(*) FROM billing.entries WHERE trace_id = 'k-taken'") eq '1' }),
	'the engine makes the charge');
is(sql("SELECT replayed FROM billing_charge('k', 1, 'k-taken')"), 't', 'calling again with the same trace id replays it');
$holder->close;

note 'a charge put off behind a long lock is tried again about 20 times, not every millisecond';
# With billing.engine_lock_wait = 2s the engine puts the charge off for 2 s
# (the account is locked elsewhere), trying it again every 100 ms: about 20
# deferrals, then it waits for the lock.  (It tried every millisecond: some
# 2,000 short transactions.)  A busy machine only tries less often.
sql("ALTER SYSTEM SET billing.engine_lock_wait = '2s'");
sql('SELECT pg_reload_conf()');
ok(BillingTest::wait_until(60, sub { sql('SHOW billing.engine_lock_wait') eq '2s' }),
	'billing.engine_lock_wait is 2s (the engine, signalled before a new session sees it, reloads first)');
my $deferrals0 = engine('deferrals');
$holder = BillingTest::Session->new($node, $DB);
$holder->call('BEGIN');
is($holder->call("SELECT count(*) FROM billing_deduct('k', 1, 'k-holder-2')")->{status}, 'ok',
	'another transaction holds the account');
my $put_off = background('put-off', "SELECT replayed FROM billing_charge('k', 1, 'k-put-off')");
ok(BillingTest::wait_until(180, sub {
	my $pid = engine('pid');
	$pid ne '' && sql("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $pid") eq 'Lock' }),
	'after putting the charge off, the engine waits for the lock');
my $tries = engine('deferrals') - $deferrals0;
ok($tries >= 1 && $tries <= 100, "it put the charge off $tries times in 2 s (at most 100)");
is($holder->call('COMMIT')->{status}, 'ok', 'the other transaction commits');
ok(BillingTest::wait_until(180, sub { defined BillingTest::exited($put_off) }), 'the caller is answered');
is(join(' ', (background_result('put-off'))[0, 1]), 'ok f', 'its charge is made');
$holder->close;
sql('ALTER SYSTEM RESET billing.engine_lock_wait');
sql('SELECT pg_reload_conf()');
ok(BillingTest::wait_until(60, sub { sql('SHOW billing.engine_lock_wait') eq '20ms' }), 'billing.engine_lock_wait is back to 20ms');

note 'a statement that holds a lock the engine needs';
# SELECT ... FROM billing.accounts, LATERAL billing_charge(...) holds a lock
# on billing.accounts while it waits for the engine.  A LOCK TABLE queued
# behind that lock, and the engine behind the LOCK TABLE: a deadlock that
# PostgreSQL's detector cannot see, since the caller waits on its latch.
# The caller finds it (the engine's lock waits, followed back to its own
# locks) and gets 40P01, saying which process is in between; the charge,
# which the engine had taken, is made once the LOCK TABLE is through, and
# the same trace id replays it.
sql("SELECT billing_account_create('d'), billing_credit('d', 100, 'd-top-up')");
$gate = BillingTest::Session->new($node, $DB);
is($gate->call('SELECT billing.engine_test_gate(true)')->{status}, 'ok', 'the engine is held');
my $locked = background('locked', "SELECT c.replayed FROM billing.accounts a, LATERAL billing_charge(a.tenant_id, 1, 'd-locked') c
	                                   WHERE a.tenant_id = 'd'");
my $locked_pid;
ok(BillingTest::wait_until(180, sub {
	$locked_pid = background_pid('locked');
	defined $locked_pid && sql("SELECT wait_event_type || '/' || wait_event FROM pg_stat_activity WHERE pid = $locked_pid") eq 'Lock/advisory' }),
	'the caller, holding billing.accounts, is held at the gate');
my ($ddl, $ddl_pid) = lock_table_behind('ddl', $locked_pid);
is($gate->call('SELECT billing.engine_test_gate(false)')->{status}, 'ok', 'the engine goes on, and waits behind the LOCK TABLE');
ok(BillingTest::wait_until(180, sub { defined BillingTest::exited($locked) }), 'the caller is answered');
my ($status, $sqlstate, $message) = background_result('locked');
is("$status $sqlstate", 'error 40P01', 'it gets 40P01 (deadlock detected)');
like($message, qr/ERROR:\s+40P01: billing_charge waits for the charge engine, which waits for a lock this session holds/,
	'its message');
like($message, qr/DETAIL:\s+The engine worker \(process \d+\) waits for process $ddl_pid, which waits, directly or not, for a lock held by this session \(process $locked_pid\)/,
	'its DETAIL names the LOCK TABLE\'s process');
like($message, qr/CONTEXT:\s+billing_charge: the charge engine was applying this charge when the call ended, so it may have been made/,
	'its CONTEXT: the charge may have been made');
ok(BillingTest::wait_until(180, sub { defined BillingTest::exited($ddl) }), 'the LOCK TABLE is through');
is((background_result('ddl'))[0], 'ok', 'and committed');
ok(BillingTest::wait_until(120, sub { sql("SELECT count(*) FROM billing.entries WHERE trace_id = 'd-locked'") eq '1' }),
	'the engine makes the charge, once');
is(sql("SELECT replayed FROM billing_charge('d', 1, 'd-locked')"), 't', 'calling again with the same trace id replays it');
is(sql("SELECT balance FROM billing.balances WHERE tenant_id = 'd'"), '99.000000', 'the balance holds it once');
$gate->close;

note 'the same, while the statement waits for a place in a full queue';
# The queue is full (the gate holds the engine), so the statement waits for
# a place, not on its latch, while it holds billing.accounts; a LOCK TABLE
# queues behind it, and the engine, once the gate opens, behind the LOCK
# TABLE.  Nobody who holds a place holds the lock, so only the statement
# waiting for a place can find the deadlock: 40P01, nothing queued, nothing
# charged; then the LOCK TABLE and the queued charges go through.
$gate = BillingTest::Session->new($node, $DB);
is($gate->call('SELECT billing.engine_test_gate(true)')->{status}, 'ok', 'the engine is held');
my @fillers = map { background("full-$_", "SELECT replayed FROM billing_charge('m$_', 1, 'full-$_')") } 1 .. $QUEUE;
ok(BillingTest::wait_until(180, sub { engine('free_slots') eq '0' }), "$QUEUE callers fill the queue");
my $placeless = background('placeless', "SELECT c.replayed FROM billing.accounts a, LATERAL billing_charge(a.tenant_id, 1, 'd-full') c
	                                         WHERE a.tenant_id = 'd'");
my $placeless_pid;
ok(BillingTest::wait_until(180, sub {
	$placeless_pid = background_pid('placeless');
	defined $placeless_pid && sql("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $placeless_pid") eq 'Extension' }),
	'a statement holding billing.accounts waits for a place');
my ($ddl2, $ddl2_pid) = lock_table_behind('ddl2', $placeless_pid);
is($gate->call('SELECT billing.engine_test_gate(false)')->{status}, 'ok', 'the engine goes on, and waits behind the LOCK TABLE');
ok(BillingTest::wait_until(180, sub { defined BillingTest::exited($placeless) }), 'the statement waiting for a place is answered');
($status, $sqlstate, $message) = background_result('placeless');
is("$status $sqlstate", 'error 40P01', 'it gets 40P01 (deadlock detected)');
like($message, qr/DETAIL:\s+The engine worker \(process \d+\) waits for process $ddl2_pid, which waits, directly or not, for a lock held by this session \(process $placeless_pid\)/,
	'its DETAIL names the LOCK TABLE\'s process');
like($message, qr/CONTEXT:\s+billing_charge: the call ended before the charge engine took the charge: nothing was charged/,
	'its CONTEXT: nothing was charged');
ok(BillingTest::wait_until(180, sub { defined BillingTest::exited($ddl2) }), 'the LOCK TABLE is through');
is((background_result('ddl2'))[0], 'ok', 'and committed');
ok(BillingTest::wait_until(180, sub { !grep { !defined BillingTest::exited($_) } @fillers }), 'the queued callers are answered');
is(join(',', map { join(' ', (background_result("full-$_"))[0, 1]) } 1 .. $QUEUE), join(',', ('ok f') x $QUEUE), 'each of them charged');
is(sql("SELECT count(*) FROM billing.entries WHERE trace_id = 'd-full'"), '0', 'the statement that got 40P01 charged nothing');
$gate->close;

note 'the engine worker\'s memory';
my $load = sub {    # 4 sessions, each charging 20 tenants in turn
	my ($round, $per) = @_;
	my @kids = map {
		my $c = $_;
		BillingTest::spawn(sub {
			$node->safe_psql($DB, "SELECT count(*) FROM generate_series(1, $per) g,
				LATERAL billing_charge('m' || (g % 20 + 1), 0.000001, 'mem-$round-$c-' || g)");
		});
	} 1 .. 4;
	BillingTest::reap($_) == 0 or return 0 for @kids;
	return 1;
};
# the grand total of the engine's memory contexts, as the engine logs it
my $contexts = sub {
	my $pid = engine('pid');
	my $from = BillingTest::log_size($node);
	sql("SELECT pg_log_backend_memory_contexts($pid)");
	my $total;
	BillingTest::wait_until(120, sub {
		($total) = BillingTest::log_since($node, $from) =~ /\[$pid\] LOG:\s+Grand total: \d+ bytes in \d+ blocks; \d+ free \(\d+ chunks\); (\d+) used/;
		defined $total });
	return $total;
};
ok($load->(1, 2500), 'warm-up: 10,000 charges from 4 sessions');
my $pid = engine('pid');
my ($batches0, $charges0) = split /\|/, sql('SELECT batches, charges FROM billing_engine_status()');
my $before = $contexts->();
ok(defined $before, "the engine (pid $pid) logged its memory contexts: " . ($before // '?') . ' bytes used');
ok($load->($_, 2500), "10,000 more charges (" . ($_ - 1) . " of 4)") for 2 .. 5;
is(engine('pid'), $pid, 'the same engine worker applied them');
my $after = $contexts->();
ok(defined $after && defined $before && $after <= $before + 128 * 1024,
	'the memory its contexts use grew by at most 128 kB: ' . ($before // '?') . ' then ' . ($after // '?') . ' bytes');
is(sql("SELECT count(*) FROM billing.entries WHERE trace_id LIKE 'mem-%'"), '50000', 'every charge is in the ledger');
is(sql("SELECT count(*) FROM billing_verify()"), '0', 'billing_verify() finds nothing');
my ($batches1, $charges1) = split /\|/, sql('SELECT batches, charges FROM billing_engine_status()');
is($charges1 - $charges0, 40000, 'the engine answered the 40,000 charges');
ok($batches1 - $batches0 < 40000, 'in fewer batches: ' . ($batches1 - $batches0) . ' (the memory above is that of batches, not only of single charges)');

note 'a start claimed by a caller that ends before it makes it';
# The idle engine stops.  The next caller claims its start (the entry is
# "starting") and, held at the gate, is cancelled before it starts it: it
# gives the claim back as it ends, so the next caller starts the engine at
# once (before, the entry stayed "starting" until a 30 s takeover, and every
# caller of that engine waited).
sql('ALTER SYSTEM SET billing.engine_idle_timeout = 1');
sql('SELECT pg_reload_conf()');
ok(BillingTest::wait_until(120, sub { engine('state') eq 'stopped' }), 'the idle engine stops (billing.engine_idle_timeout = 1s)');
$gate = BillingTest::Session->new($node, $DB);
is($gate->call('SELECT billing.engine_test_gate(true)')->{status}, 'ok', 'the gate is held');
$caller = BillingTest::Session->new($node, $DB, timeout => 300);
$caller->call("SET statement_timeout = '3s'");
$r = $caller->call("SELECT replayed FROM billing_charge('k', 1, 'k-claimed')");
is($r->{sqlstate}, '57014', 'a caller held at the gate, with the start claimed, is cancelled (statement_timeout)');
is(engine('state'), 'stopped', 'the start it claimed is given back: the engine is "stopped", not "starting"');
is($gate->call('SELECT billing.engine_test_gate(false)')->{status}, 'ok', 'the gate opens');
$gate->close;
$caller->close;
is(sql("SELECT replayed FROM billing_charge('k', 1, 'k-after-claim')"), 'f', 'the next caller starts the engine and is charged');
is(sql("SELECT count(*) FROM billing.entries WHERE trace_id = 'k-claimed'"), '0', 'the cancelled caller\'s charge was not made');
sql('ALTER SYSTEM RESET billing.engine_idle_timeout');
sql('SELECT pg_reload_conf()');

BillingTest::no_crashes($node);
$node->stop;

note 'no background worker slot for the engine';
# the logical replication launcher and billing's sync worker take what
# max_worker_processes allows: the engine worker cannot be registered
my $full = BillingTest::node('no_slot', database => $DB, conf => 'max_worker_processes = 1');
$full->safe_psql($DB, "SELECT billing_account_create('z'), billing_credit('z', 10, 'z-top-up')");
my ($rc, $out, $err) = $full->psql($DB, "SELECT billing_charge('z', 1, 'z-1')",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:\s+ZB112:.*\n.*DETAIL:\s+the engine worker could not be started: .*nothing was charged/,
	'billing_charge: ZB112, the engine worker could not be started, nothing was charged');
is($full->safe_psql($DB, "SELECT count(*) FROM billing.entries WHERE trace_id = 'z-1'"), '0', 'and nothing was charged');
is($full->safe_psql($DB, "SELECT (SELECT count(*) FROM billing_verify()) || ' ' || balance FROM billing.balances WHERE tenant_id = 'z'"),
	'0 10.000000', 'the balance is untouched, billing_verify() clean');
is($full->safe_psql($DB, "SELECT replayed FROM billing_deduct('z', 1, 'z-1')"), 'f',
	'billing_deduct makes the charge with that trace id');
BillingTest::no_crashes($full);
$full->stop;
done_testing();

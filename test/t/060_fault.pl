# Fault test: money invariants under crashes, restarts and Redis failures.
#
# 8 clients run mixed work over 50 tenants while faults are injected;
# afterwards every acknowledged operation is checked against the database,
# the database against its own invariants, and Redis against the database.
#
# Load: each client is a background process with one connection
# (BillingTest::Session: one psql kept open, one statement per call,
# autocommit; a new connection after a lost one), making calls in a loop:
# charges (unique trace ids, some through an API key; half billing_deduct,
# half billing_charge, the charge engine, whose ZB111 "outcome unknown" and
# ZB112 "no engine now" count as calls without an answer), credits,
# billing_try_deduct (poor tenants f41..f50 get rejections), holds ->
# captures (partial, final, over the hold) -> releases, abandoned 2-second
# holds (expired by the worker's maintenance), replays of earlier trace ids
# (same call again: must return the original), "recoveries" (the same call
# again after it lost its connection: the commit may or may not have
# happened), and the job lifecycle (submit -> claim with a 5 s lease ->
# complete, or fail retryable/final; a lost complete is retried).  A client
# appends a call's result to its log ONLY when the server answered success:
# that log is the list of acknowledged operations.  A call the server
# answered with an SQL error (a business rejection such as ZB004) is logged
# as rejected; one without an answer that tells (connection lost, server
# restarting, SQLSTATE class 08/57) as failed, after which the client waits
# 0.2 s and reconnects.
#
# Faults (one round in the short form):
#   backend_kill  kill -9 of up to 3 random client backends of fault_test
#                 (pg_stat_activity; again until the postmaster logs the
#                 kill); the postmaster then restarts the whole cluster:
#                 crash recovery
#   redis_kill    kill -9 of redis-server, restarted once it has been down
#                 1.5 s and clients had work acknowledged meanwhile
#   flushall      FLUSHALL
#   worker_term   pg_terminate_backend(billing_sync_status().worker_pid)
#   pg_immediate  pg_ctl stop -m immediate, then start
# and, in the long form (FAULT_SECONDS >= 45, or FAULT_EXTRA=1), also
#   worker_kill9  kill -9 of the sync worker (crash recovery as well)
#   redis_hang    SIGSTOP of redis-server for 3 s (command timeouts), SIGCONT
#   redis_stop    SHUTDOWN NOSAVE of redis, restarted as after redis_kill
# The long form runs ceil(FAULT_SECONDS / 20) rounds (the first in the order
# above, the others shuffled by FAULT_SEED).
#
# Decided by what happened, not by wall-clock windows: fault k of n is
# injected once FAULT_SECONDS * k / (n + 1) seconds of load have passed AND
# the clients had FAULT_OPS calls acknowledged since the previous fault was
# over (the server back, Redis back); the load ends once FAULT_SECONDS have
# passed, every planned fault has been injected, and FAULT_OPS more calls
# were acknowledged after the last one.  So every planned fault is injected
# and has work to hit however slow the machine; a slow machine makes the test
# longer, never red.  The only bound is on progress: if no client call at
# all is acknowledged for FAULT_STALL seconds, the test fails saying so.
#
# Checks (one TAP test each):
#   - every acknowledged trace id is in billing.entries exactly once (captures
#     also once in hold_events; try_deduct rejections once in billing.rejections
#     instead; holds and releases once in hold_events) with the acknowledged
#     entry id, amount and balance_after, and nowhere else;
#   - every acknowledgement of the same trace id (original, replays,
#     recoveries) agrees, and at most one of them says replayed = f;
#   - no trace id twice anywhere; no ledger/hold row for a call that was never
#     made or that was rejected with an error (nothing half-written); none for
#     a grant refused as expired (ZB018: expected once its expires_at, fixed
#     when the call was first made, has passed; a recovery of a lost grant
#     that had committed replays instead);
#   - billing_verify() returns no rows; no account below -credit_limit, none
#     with negative available funds; the cached sum of open holds matches the
#     holds; every hold's captured amount matches its capture entries;
#   - acknowledged submits/completes/final fails are in billing.jobs as
#     acknowledged; no job completed without its job:<id>:charge entry (amount
#     = -actual cost, entry = charge_entry_id); no failed/cancelled/completed
#     job with an open unexpired hold; job_events form an unbroken chain
#     ending in the job's state;
#   - every planned fault kind was injected, every kind of operation was
#     acknowledged, some calls failed (the faults hit the clients), none
#     failed with an unexpected SQLSTATE or hung (FAULT_CALL_TIMEOUT);
#   - Redis equals billing.sync_snapshot() (as in 050_redis_sync) after the
#     load and the last fault (waited for, bound FAULT_CONVERGE seconds);
#   - a sampler reads every tenant's Redis version every ~0.1 s during the
#     load: it never goes backwards (a missing hash, after FLUSHALL or a Redis
#     restart, is skipped) and never exceeds the database's final version
#     (Redis never showed a version no commit reached; a rolled-back
#     change's version number is taken by the next commit of the tenant, so
#     this catches a pushed uncommitted change only when no later commit
#     reached its number);
#   - the server log shows no crash the test did not cause (only the pids it
#     killed or terminated), and every kill -9 fault made the postmaster
#     reinitialize (crash recovery).
# Figures (notes): the fault plan and when each fault hit, the calls
# acknowledged between faults, operations acknowledged / rejected / failed
# per kind, rejections by SQLSTATE, jobs by state, recoveries, sync counters.
#
# Knobs (environment):
#   FAULT_SECONDS  minimum load duration (default 15: one round of the 5 basic
#                  faults; 60 runs 3 rounds of all 8)
#   FAULT_SEED     the clients' and the plan's random choices (default random,
#                  printed; the same seed replays the same choices, timing differs)
#   FAULT_EXTRA=1  the 3 extra faults in a short run (default: FAULT_SECONDS >= 45)
#   FAULT_OPS      acknowledged calls before each fault and after the last (100)
#   FAULT_STALL    seconds without any acknowledged call before the test gives
#                  up: the machine made no progress at all (600)
#   FAULT_CONVERGE bound in seconds on Redis catching up after the load (300)
#   FAULT_CALL_TIMEOUT  seconds after which a call counts as hung (120)
#   FAULT_KEEP=1   at the end, keep the node and Redis running until the file
#                  named in the output is deleted (for poking around)
# Long form:  FAULT_SECONDS=60 BILLING_TESTS=060_fault make check (or test/run.sh)
use strict;
use POSIX ();
use warnings FATAL => 'all';
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use Time::Local ();
use BillingTest;

my $started_at = time;
my $FAULT_SECONDS = $ENV{FAULT_SECONDS} // 15;
my $FAULT_SEED = $ENV{FAULT_SEED} // int(rand(1 << 30));
my $FAULT_EXTRA = $ENV{FAULT_EXTRA} // ($FAULT_SECONDS >= 45 ? 1 : 0);
my $FAULT_OPS = $ENV{FAULT_OPS} // 100;
my $FAULT_STALL = $ENV{FAULT_STALL} // 600;
my $FAULT_CONVERGE = $ENV{FAULT_CONVERGE} // 300;
my $CALL_TIMEOUT = $ENV{FAULT_CALL_TIMEOUT} // 120;
my $CLIENTS = 8;
my $TENANTS = 50;
my $DB = 'fault_test';

my $redis = BillingTest::Redis->new('fault');
# synchronous_commit = on: an acknowledged commit must survive -m immediate
# and kill -9 (fsync may stay off: the OS does not crash).  Statements are not
# logged (tens of thousands): the clients' logs are the record.
my $node = BillingTest::node('fault', redis => $redis, database => $DB, conf => join("\n",
	"billing.check_interval = 2",
	"billing.maintenance_interval = 200",
	"synchronous_commit = on",
	"restart_after_crash = on",
	"log_statement = 'none'"));
my $W = PostgreSQL::Test::Utils::tempdir('work');
my (@killed, @termed);    # pids killed (SIGKILL) / terminated on purpose

sub sql { return $node->safe_psql($DB, shift) }
sub pg_up { return BillingTest::accepts_connections($node) }
sub wait_for { return BillingTest::wait_until(@_) }
sub now_ms { return int(time * 1000) }
sub worker_pid { return BillingTest::worker_pid($node) }
sub worker_runs { my $p = worker_pid(); return defined $p && $p ne '' }
sub write_file { return BillingTest::write_atomic(@_) }

# sql_check DESCRIPTION QUERY: the query lists violations, one per row; none = ok.
sub sql_check
{
	my ($name, $query) = @_;
	my ($rc, $out, $err) = $node->psql($DB, $query);
	if ($rc != 0)
	{
		fail("$name (the check query failed)");
		diag($err);
		return;
	}
	my @v = split /\n/, $out;
	if (!@v)
	{
		pass($name);
		return;
	}
	fail("$name (" . scalar(@v) . ' violations)');
	$#v = 14 if @v > 15;
	diag(join("\n", @v));
}

# ---------------------------------------------------------------------------
# the clients
# ---------------------------------------------------------------------------
# Every result line of a call is "client|seq|kind|tenant|trace|ref|entry_id|
# amount|balance_after|status|replayed" (the SELECT lists below return the
# last 8 columns). kind is the operation, or replay_<op> / recover_<op> for the
# same call made again after it was acknowledged / after it lost its connection.
#   deduct, credit, try: ref -, entry_id, amount (signed), balance_after, status (try)
#   hold:     entry_id = hold_id, amount, balance_after = available, status
#   capture:  ref = hold trace, entry_id, amount (signed), balance_after, status = hold status
#   release:  ref = hold trace, entry_id = hold_id, amount = released, status = hold status
#   submit:   trace = idempotency key, ref = job_id, amount = estimate, status = state
#   claim:    trace = hold trace, ref = job_id, entry_id = attempt, amount = estimate
#   complete: trace = job:<id>:charge, ref = job_id, entry_id = charge_entry_id, amount = actual cost
#   fail:     ref = job_id, entry_id = attempt, status = state
# Rejected and failed calls go to c<N>.calls as "client|seq|kind|tenant|trace|
# outcome|sqlstate" (outcome rejected, failed, timeout or unexpected).
# c<N>.n holds "<calls acknowledged> <calls made>", rewritten after each call.
my %EXPECTED_CODES = map { $_ => 1 }
  qw(ZB004 ZB030 ZB031 ZB032 ZB033 ZB040 ZB041 ZB042 ZB043 ZB044 ZB045 ZB052 ZB070 ZB073 ZB080 ZB091);

sub client
{
	my ($c) = @_;
	srand(($FAULT_SEED % 100000) * 10 + $c);
	my $s = BillingTest::Session->new($node, $DB, timeout => $CALL_TIMEOUT);
	open my $acked, '>', "$W/c$c.acked" or die $!;
	open my $calls, '>', "$W/c$c.calls" or die $!;
	open my $failures, '>', "$W/c$c.failures.txt" or die $!;
	open my $unexpected, '>', "$W/c$c.unexpected.txt" or die $!;
	$_->autoflush(1) for $acked, $calls, $failures, $unexpected;
	my ($seq, $nacked) = (0, 0);
	my (%ack, %rej, %fail, @replayable, @lost, @charges);
	my ($OUT, $CODE);

	# call KIND TENANT TRACE SQL: 0 = acknowledged ($OUT: the result row),
	# 1 = rejected by the server ($CODE), 2 = failed (no answer that tells),
	# 3 = success without a row (a claim that found no job)
	# A grant's expires_at is fixed when the call is first made, so that a
	# recovery sends the same request.  A grant that expires 3 s after it was
	# made may have expired by the time the server takes it: its recovery is
	# sent after the server came back, or a slow machine held the call.  A
	# grant that had committed replays, expired or not; a new one is refused
	# (ZB018), as it must be -- once its expires_at has passed by our clock
	# (the server's, read before it answered), and only then.
	my $expired_grant = sub {
		my ($kind, $sql) = @_;
		return 0 unless $CODE eq 'ZB018' && $kind =~ /^(recover_)?grant$/
		  && $sql =~ /expires_at => '(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)\+00'/;
		return Time::Local::timegm($6, $5, $4, $3, $2 - 1, $1) <= time;
	};
	my $call = sub {
		my ($kind, $tenant, $trace, $sql) = @_;
		$seq++;
		($OUT, $CODE) = (undef, undef);
		my $r = $s->call($sql);
		my $rc;
		if ($r->{status} eq 'ok')
		{
			$nacked++;
			if (!@{ $r->{rows} })
			{
				$rc = 3;
			}
			else
			{
				$OUT = $r->{rows}[0];
				print $acked "$c|$seq|$kind|$_\n" for @{ $r->{rows} };
				$ack{$kind}++;
				$rc = 0;
			}
		}
		elsif ($r->{status} eq 'error' && $r->{sqlstate} !~ /^ZB11[12]$/)
		{
			$CODE = $r->{sqlstate};
			$rej{$kind}++;
			if ($EXPECTED_CODES{$CODE} || $expired_grant->($kind, $sql))
			{
				print $calls "$c|$seq|$kind|$tenant|$trace|rejected|$CODE\n";
			}
			else
			{
				print $calls "$c|$seq|$kind|$tenant|$trace|unexpected|$CODE\n";
				print $unexpected "client $c call $seq ($kind): $sql\n$r->{message}\n";
			}
			$rc = 1;
		}
		else    # no answer that tells; or billing_charge's ZB111 (outcome unknown) or ZB112 (no engine now)
		{
			$fail{$kind}++;
			my $outcome = $r->{status} eq 'timeout' ? 'timeout' : 'failed';
			print $calls "$c|$seq|$kind|$tenant|$trace|$outcome|" . ($r->{sqlstate} // '') . "\n";
			my @m = split /\n/, $r->{message} // '';
			print $failures join("\n", "call $seq ($kind): $r->{status}", @m[0 .. ($#m < 1 ? $#m : 1)]), "\n";
			usleep(200_000);    # the server is restarting: do not spin
			$rc = 2;
		}
		write_file("$W/c$c.n", "$nacked $seq\n");
		return $rc;
	};
	# a call whose trace id makes it idempotent: remember it for replays /
	# recoveries
	my $idem = sub {    # KIND TENANT TRACE SQL -> return code of call
		my ($kind, $tenant, $trace, $sql) = @_;
		$sql =~ s/\s+/ /g;
		my $r = $call->($kind, $tenant, $trace, $sql);
		push @replayable, [ $kind, $tenant, $trace, $sql ] if $r == 0;
		push @lost,       [ $kind, $tenant, $trace, $sql ] if $r == 2;
		return $r;
	};
	my $amount = sub {    # MIN_MICROS MAX_MICROS -> amount as text
		my ($min, $max) = @_;
		my $m = $min + int(rand($max - $min + 1));
		return sprintf('%d.%06d', int($m / 1000000), $m % 1000000);
	};
	my $micros = sub { my ($a) = @_; $a =~ s/\.//; return $a + 0 };
	my $tenant = sub { return sprintf('f%02d', int(rand($TENANTS)) + 1) };
	my $keyarg = sub {    # tenants f31..f35 charge through their API key k1
		my $n = substr($_[0], 1) + 0;
		return $n >= 31 && $n <= 35 ? ", api_key => 'k1'" : '';
	};

	until (-e "$W/stop")
	{
		my $op = int(rand(100));
		my $tr = "c$c-" . ($seq + 1);
		if ($op < 26)    # a charge: billing_deduct, or billing_charge (the engine) half the time
		{
			my $T = $tenant->();
			my $KEY = $keyarg->($T);
			my $A = $amount->(1, 400000);
			my $fn = int(rand(2)) ? 'charge' : 'deduct';
			my $r = $idem->($fn, $T, "$tr-d", "SELECT tenant_id, trace_id, NULL, entry_id, amount, balance_after, NULL, replayed
			                                FROM billing_$fn('$T', $A, '$tr-d'$KEY)");
			push @charges, [ $T, "$tr-d", $micros->($A), 0 ] if $r == 0;
		}
		elsif ($op < 30)    # a grant: spent before the top-ups, some expire during the load
		{
			my $T = $tenant->();
			my $A = $amount->(100000, 3000000);
			# a fixed time, so that a replay or recovery sends the same request
			my $exp = "'" . POSIX::strftime('%Y-%m-%d %H:%M:%S+00', gmtime(time + (int(rand(3)) == 0 ? 3 : 86400))) . "'";
			my $prio = int(rand(3));
			$idem->('grant', $T, "$tr-g", "SELECT tenant_id, trace_id, NULL, entry_id, granted, balance_after, NULL, replayed
			                               FROM billing_grant('$T', $A, '$tr-g', expires_at => $exp, priority => $prio)");
		}
		elsif ($op < 34)    # a refund of part of an acknowledged charge, or a credit
		{
			if (@charges && int(rand(2)))
			{
				my $ch = $charges[ int(rand(@charges)) ];
				my ($T, $ctr, $charged, $refunded) = @$ch;
				next if $refunded >= $charged;
				my $A = $amount->(1, $charged - $refunded);
				my $r = $idem->('refund', $T, "$tr-rf", "SELECT tenant_id, trace_id, charge_trace_id, entry_id, amount, balance_after, NULL, replayed
				                                          FROM billing_refund('$T', '$ctr', $A, '$tr-rf')");
				# counted as refunded unless refused: a lost refund may have
				# committed (its recovery replays it)
				$ch->[3] += $micros->($A) unless $r == 1;
				next;
			}
			my $T = $tenant->();
			my $A = $amount->(1, 2000000);
			$idem->('credit', $T, "$tr-cr", "SELECT tenant_id, trace_id, NULL, entry_id, amount, balance_after, NULL, replayed
			                                 FROM billing_credit('$T', $A, '$tr-cr')");
		}
		elsif ($op < 48)    # try_deduct
		{
			my $T = $tenant->();
			my $KEY = $keyarg->($T);
			my $A = $amount->(10000, 3000000);
			$idem->('try', $T, "$tr-t", "SELECT tenant_id, trace_id, NULL, entry_id, amount, balance_after, status, replayed
			                             FROM billing_try_deduct('$T', $A, '$tr-t'$KEY)");
		}
		elsif ($op < 56)    # replay of an acknowledged call, or recovery of a lost one
		{
			if (@lost && int(rand(2)))
			{
				my ($kind, $t, $trace, $sql) = @{ splice(@lost, int(rand(@lost)), 1) };
				$kind =~ s/^recover_//;
				$idem->("recover_$kind", $t, $trace, $sql);
			}
			elsif (@replayable)
			{
				my ($kind, $t, $trace, $sql) = @{ $replayable[ int(rand(@replayable)) ] };
				$kind =~ s/^recover_//;
				$kind =~ s/^replay_//;
				$call->("replay_$kind", $t, $trace, $sql);
			}
		}
		elsif ($op < 70)    # hold -> capture(s) -> release
		{
			my $T = $tenant->();
			my $KEY = $keyarg->($T);
			my $A = $amount->(100000, 3000000);
			my $htr = "$tr-h";
			my $exp = int(rand(5)) == 0 ? '2 seconds' : '30 seconds';
			my $r = $idem->('hold', $T, $htr, "SELECT tenant_id, trace_id, NULL, hold_id, amount, available, status, replayed
			                                   FROM billing_hold('$T', $A, '$htr', expires_in => '$exp'$KEY)");
			next if $r == 1;                  # refused (funds, limits): nothing to capture
			next if $exp ne '30 seconds';     # abandoned: the maintenance expires it
			# capture 30 % .. 130 % of the hold: sometimes an excess, sometimes final
			my $a = $micros->($A);
			$A = $amount->(int($a * 3 / 10), int($a * 13 / 10));
			my $fin = int(rand(3)) == 0 ? 'true' : 'false';
			$r = $idem->('capture', $T, "$htr-c1", "SELECT tenant_id, trace_id, '$htr', entry_id, amount, balance_after, hold_status, replayed
			                                        FROM billing_capture('$T', '$htr', $A, '$htr-c1', final => $fin)");
			my $status = $r == 0 ? (split /\|/, $OUT, -1)[6] : '';
			if ($status eq 'open' && int(rand(2)))
			{
				$A = $amount->(1000, int($a / 4) + 1000);
				$idem->('capture', $T, "$htr-c2", "SELECT tenant_id, trace_id, '$htr', entry_id, amount, balance_after, hold_status, replayed
				                                   FROM billing_capture('$T', '$htr', $A, '$htr-c2')");
			}
			$idem->('release', $T, "$htr-r", "SELECT tenant_id, '$htr-r', trace_id, hold_id, released, available, status, replayed
			                                  FROM billing_release('$T', '$htr', '$htr-r')");
		}
		elsif ($op < 82)    # job submit
		{
			my $T = $tenant->();
			my $A = $amount->(500000, 2000000);
			$idem->('submit', $T, "$tr-job", "SELECT tenant_id, idempotency_key, job_id, NULL, estimated_cost, NULL, state, replayed
			                                  FROM billing_job_submit('$T', 'render', '$tr-job', $A, max_attempts => 3)");
		}
		else    # claim -> complete or fail
		{
			my $r = $call->('claim', '-', '-', "SELECT tenant_id, hold_trace_id, job_id, attempt, estimated_cost, NULL, state, replayed
			                                    FROM billing_job_claim('c$c', kinds => '{render}', lease => '5 seconds')");
			if ($r == 3)
			{
				$ack{claim_empty}++;
				next;
			}
			next unless $r == 0;
			my ($ct, undef, $jid, undef, $cest) = split /\|/, $OUT, -1;
			if (int(rand(4)))
			{
				# actual cost 50 % .. 130 % of the estimate
				my $a = $micros->($cest);
				my $act = $amount->(int($a / 2), int($a * 13 / 10));
				my $sql = "SELECT tenant_id, 'job:' || job_id || ':charge', job_id, charge_entry_id, actual_cost, NULL, state, replayed
				           FROM billing_job_complete('$ct', $jid, $act, worker => 'c$c')";
				$r = $idem->('complete', $ct, "job:$jid:charge", $sql);
				# lost: the worker retries its complete once the server is back
				$r = $idem->('recover_complete', $ct, "job:$jid:charge", $sql) if $r == 2;
				if ($r == 1 && $CODE =~ /^(ZB004|ZB033|ZB04.)$/)
				{
					# cannot be charged: give up on the job (releases its hold)
					$call->('fail', $ct, '-', "SELECT tenant_id, NULL, job_id, attempt, NULL, NULL, state, replayed
					                           FROM billing_job_fail('$ct', $jid, 'cannot charge $act', retryable => false, worker => 'c$c')");
				}
			}
			else
			{
				my $retry = int(rand(2)) ? 'true' : 'false';
				$call->('fail', $ct, '-', "SELECT tenant_id, NULL, job_id, attempt, NULL, NULL, state, replayed
				                           FROM billing_job_fail('$ct', $jid, 'simulated failure', retryable => $retry, worker => 'c$c')");
			}
		}
	}
	$s->close;
	my $stats = '';
	$stats .= "$_ acked $ack{$_}\n"    for sort keys %ack;
	$stats .= "$_ rejected $rej{$_}\n" for sort keys %rej;
	$stats .= "$_ failed $fail{$_}\n"  for sort keys %fail;
	write_file("$W/c$c.stats", $stats);
	close $_ for $acked, $calls, $failures, $unexpected;
	write_file("$W/c$c.done", "$seq\n");
}

# The Redis sampler: every 0.1 s during the load, the version field of every
# tenant hash ("-" when missing: after FLUSHALL or a Redis restart). The
# mirror must never go backwards, and never show a version the database
# never reached (see the header for what that does and does not catch).
my $VERSIONS_LUA = 'local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call("HGET", k, "version") or "-" end
return table.concat(out, " ")';

sub sampler
{
	my @keys = map { sprintf('billing:{f%02d}', $_) } 1 .. $TENANTS;
	open my $out, '>', "$W/redis_versions" or die $!;
	$out->autoflush(1);
	my $conn;
	until (-e "$W/stop")
	{
		$conn //= $redis->connect;
		if ($conn)
		{
			my $v = eval { $conn->command('EVAL', $VERSIONS_LUA, scalar(@keys), @keys) };
			if (defined $v && $v =~ /^[-0-9 ]+$/)
			{
				print $out now_ms() . " $v\n";
			}
			else
			{
				$conn->close;
				$conn = undef;
			}
		}
		usleep(100_000);
	}
	close $out;
}

# ---------------------------------------------------------------------------
# progress of the load
# ---------------------------------------------------------------------------
my ($load_start, @client_pids, %client_exit);
my $stalled = '';

sub elapsed { return sprintf('%.1f', time - $load_start) }

sub acked_total
{
	my $n = 0;
	for my $c (1 .. $CLIENTS)
	{
		my $f = "$W/c$c.n";
		next unless -e $f;
		my ($a) = (eval { slurp_file($f) } // '') =~ /^(\d+)/;
		$n += $a // 0;
	}
	return $n;
}

sub clients_running
{
	for my $pid (@client_pids)
	{
		next if exists $client_exit{$pid};
		my $rc = BillingTest::exited($pid);
		$client_exit{$pid} = $rc if defined $rc;
	}
	return scalar(grep { !exists $client_exit{$_} } @client_pids);
}

# wait_ops N SINCE WHY: until the clients had N calls acknowledged since the
# count SINCE.  False (and $stalled says why) only if no call at all was
# acknowledged for FAULT_STALL seconds, or no client runs any more.
sub wait_ops
{
	my ($n, $since, $why) = @_;
	my ($last, $t_last) = (acked_total(), time);
	while (1)
	{
		my $now = acked_total();
		return 1 if $now - $since >= $n;
		if (!clients_running())
		{
			$stalled = "every client stopped ($why)";
			return 0;
		}
		if ($now != $last)
		{
			($last, $t_last) = ($now, time);
		}
		elsif (time - $t_last > $FAULT_STALL)
		{
			$stalled = "no client call was acknowledged for $FAULT_STALL s ($why; $now in all): "
			  . 'the machine made no progress';
			return 0;
		}
		usleep(50_000);
	}
}

# ---------------------------------------------------------------------------
# the faults: each returns true once it has been injected
# ---------------------------------------------------------------------------
my @faults;    # kinds, in the order injected

sub fault_log
{
	my ($kind, $what) = @_;
	push @faults, $kind;
	note('fault ' . scalar(@faults) . ' at ' . elapsed() . " s: $what");
}

sub log_has_kill    # the postmaster logged one of the pids as terminated by signal 9
{
	my ($off, @pids) = @_;
	my $log = BillingTest::log_since($node, $off);
	return grep { $log =~ /\(PID $_\) was terminated by signal 9/ } @pids;
}

sub back_up
{
	my ($kind) = @_;
	wait_for(600, \&pg_up) or note("$kind: server not back within 600 s");
}

# Redis stays down (or hung) MIN seconds and until the clients had work
# acknowledged meanwhile: the mirror has changes to catch up with.
sub redis_down_for
{
	my ($min, $kind) = @_;
	my $since = acked_total();
	usleep(int($min * 1_000_000));
	wait_ops(int($FAULT_OPS / 4) || 1, $since, "$kind: while Redis is down");
}

my %fault = (
	backend_kill => sub {
		wait_for(600, \&pg_up) or return 0;
		# The backends serving our clients (they live as long as a client's
		# connection): kill up to 3 of them (random), then look for the
		# postmaster's "terminated by signal 9" line; try again if there is
		# none (the backend had gone already).
		for my $attempt (1 .. 20)
		{
			my $off = BillingTest::log_size($node);
			my $pids = BillingTest::query($node, 'postgres',
				"SELECT pid FROM pg_stat_activity WHERE datname = '$DB' AND backend_type = 'client backend'
				  ORDER BY random() LIMIT 3") // '';
			my @hit = grep { /^[1-9]\d*$/ && kill 'KILL', $_ } split /\n/, $pids;
			push @killed, @hit;
			if (!@hit)
			{
				usleep(200_000);
				next;
			}
			if (wait_for(60, sub { log_has_kill($off, @hit) }))
			{
				fault_log('backend_kill', "kill -9 of client backend(s) @hit (attempt $attempt)");
				back_up('backend_kill');
				return 1;
			}
		}
		note('backend_kill: no kill -9 of a client backend took effect in 20 attempts');
		return 0;
	},
	worker_kill9 => sub {
		wait_for(600, \&worker_runs) or return 0;
		my $p = worker_pid() // '';
		return 0 unless $p =~ /^[1-9]\d*$/;
		my $off = BillingTest::log_size($node);
		kill 'KILL', $p or return 0;
		push @killed, $p;
		wait_for(60, sub { log_has_kill($off, $p) }) or note("worker_kill9: no \"terminated by signal 9\" line for $p");
		fault_log('worker_kill9', "kill -9 of the sync worker $p");
		back_up('worker_kill9');
		return 1;
	},
	pg_immediate => sub {
		wait_for(600, \&pg_up) or return 0;
		$node->stop('immediate');
		fault_log('pg_immediate', 'pg_ctl stop -m immediate');
		usleep(500_000);
		$node->start;
		note('pg_immediate: started again at ' . elapsed() . ' s');
		return 1;
	},
	redis_kill => sub {
		my $p = $redis->pid;
		$redis->kill9;
		fault_log('redis_kill', "kill -9 of redis-server $p");
		redis_down_for(1.5, 'redis_kill');
		$redis->start;
		note('redis_kill: redis restarted at ' . elapsed() . ' s');
		return 1;
	},
	redis_stop => sub {
		$redis->stop;
		fault_log('redis_stop', 'SHUTDOWN NOSAVE of redis');
		redis_down_for(1.5, 'redis_stop');
		$redis->start;
		note('redis_stop: redis restarted at ' . elapsed() . ' s');
		return 1;
	},
	redis_hang => sub {
		my $p = $redis->pid;
		$redis->pause;
		fault_log('redis_hang', "SIGSTOP of redis-server $p for 3 s");
		redis_down_for(3, 'redis_hang');
		$redis->resume;
		return 1;
	},
	flushall => sub {
		my (undef, $ok) = $redis->cli_ok('FLUSHALL');
		return 0 unless $ok;
		fault_log('flushall', 'FLUSHALL');
		return 1;
	},
	worker_term => sub {
		wait_for(600, \&worker_runs) or return 0;
		my $p = BillingTest::query($node, $DB, 'SELECT worker_pid FROM billing_sync_status()') // '';
		if ($p eq '')
		{
			note('worker_term: no worker running');
			return 0;
		}
		my $r = BillingTest::query($node, $DB, "SELECT pg_terminate_backend($p)") // '';
		return 0 unless $r eq 't';
		push @termed, $p;
		fault_log('worker_term', "pg_terminate_backend of the sync worker $p");
		return 1;
	});

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------
note("own node: port " . $node->port . ", redis port " . $redis->port);
note("FAULT_SECONDS=$FAULT_SECONDS FAULT_SEED=$FAULT_SEED FAULT_EXTRA=$FAULT_EXTRA FAULT_OPS=$FAULT_OPS");
# f01..f40 rich (every 5th with a credit limit of 50), f41..f50 poor (2 + credit
# limit 1: rejections); f31..f35 charge through an API key with a budget,
# f36..f40 have limits (max charge, spend caps, request quotas).
sql("SELECT count(*) FROM generate_series(1, $TENANTS) AS i,
       LATERAL billing_account_create(format('f%s', lpad(i::text, 2, '0')),
                                      credit_limit => CASE WHEN i > 40 THEN 1 WHEN i % 5 = 0 THEN 50 ELSE 0 END);
     SELECT count(*) FROM generate_series(1, $TENANTS) AS i,
       LATERAL billing_credit(format('f%s', lpad(i::text, 2, '0')), CASE WHEN i > 40 THEN 2 ELSE 1000 END,
                              format('f%s-topup', lpad(i::text, 2, '0')));
     SELECT count(*) FROM generate_series(31, 35) AS i,
       LATERAL billing_api_key_create(format('f%s', i), 'k1', budget => 400, budget_period => 'month');
     SELECT count(*) FROM generate_series(36, 40) AS i,
       LATERAL billing_limits_set(format('f%s', i), daily_requests => 100000, monthly_requests => 1000000,
                                  daily_spend => 500, monthly_spend => 5000, max_charge => 2.5, reason => 'fault test')");
BillingTest::mirror_converges($node, $DB, $redis, "setup: the worker mirrors the $TENANTS accounts");

# fault plan: round 1 in a fixed order, later rounds shuffled
my @basic = qw(backend_kill redis_kill flushall worker_term pg_immediate);
my @extra = $FAULT_EXTRA ? qw(worker_kill9 redis_hang redis_stop) : ();
my $rounds = int(($FAULT_SECONDS + 19) / 20) || 1;
my @plan = (@basic, @extra);
srand($FAULT_SEED);
for (2 .. $rounds)
{
	my @round = (@basic, @extra);
	for (my $i = $#round; $i > 0; $i--)
	{
		my $j = int(rand($i + 1));
		@round[ $i, $j ] = @round[ $j, $i ];
	}
	push @plan, @round;
}
note(sprintf('setup done in %.1f s; %d faults planned over at least %d s: %s',
	time - $started_at, scalar(@plan), $FAULT_SECONDS, join(' ', @plan)));

# ---------------------------------------------------------------------------
# load + faults
# ---------------------------------------------------------------------------
note("load: $CLIENTS clients for at least $FAULT_SECONDS s, $FAULT_OPS acknowledged calls before each fault and after the last");
$load_start = time;
for my $c (1 .. $CLIENTS)
{
	push @client_pids, BillingTest::spawn(sub { client($c) });
}
my $sampler = BillingTest::spawn(\&sampler);
my $mark = 0;
my @between;    # calls acknowledged before each fault (since the previous one)
my $n = @plan;
FAULT: for my $k (1 .. $n)
{
	my $kind = $plan[ $k - 1 ];
	my $at = $load_start + $k * $FAULT_SECONDS / ($n + 1);
	usleep(int(($at - time) * 1_000_000)) if $at > time;
	wait_ops($FAULT_OPS, $mark, "before fault $k ($kind)") or last;
	push @between, acked_total() - $mark;
	for my $try (1 .. 5)
	{
		last if $fault{$kind}->();
		note("fault $k ($kind) could not be injected at " . elapsed() . " s (try $try)");
		wait_ops(int($FAULT_OPS / 4) || 1, acked_total(), "before fault $k ($kind), try " . ($try + 1)) or last FAULT;
	}
	$mark = acked_total();
}
my $last_fault_ms = now_ms();
note('last fault done at ' . elapsed() . ' s');
usleep(int(($load_start + $FAULT_SECONDS - time) * 1_000_000)) if $load_start + $FAULT_SECONDS > time;
if (!$stalled && wait_ops($FAULT_OPS, $mark, 'after the last fault'))
{
	push @between, acked_total() - $mark;
}
write_file("$W/stop", "stop\n");
my $load_end = time;
BillingTest::reap($_) for grep { !exists $client_exit{$_} } @client_pids;
BillingTest::reap($sampler);
my $load_done_ms = now_ms();
note('clients finished at ' . elapsed() . " s; calls acknowledged before each fault and after the last: @between");
ok(!$stalled, 'the load made progress until every planned fault was injected and had work to hit')
  or diag($stalled);
ok(wait_for(600, \&pg_up), 'the server accepts connections after the faults');
$redis->start unless $redis->running && ($redis->cli_ok('PING'))[1];

# ---------------------------------------------------------------------------
# what the clients saw
# ---------------------------------------------------------------------------
my $done_clients = grep { -e "$W/c$_.done" } 1 .. $CLIENTS;
is($done_clients, $CLIENTS, "all $CLIENTS clients ran until the end of the load");
for my $kind (qw(acked calls))
{
	open my $all, '>', "$W/$kind.all" or die $!;
	print $all slurp_file("$W/c$_.$kind") for grep { -e "$W/c$_.$kind" } 1 .. $CLIENTS;
	close $all;
}
sql("CREATE TABLE fault_acked (client int, seq int, kind text, tenant text, trace text, ref text,
                               entry_id bigint, amount numeric, balance_after numeric, status text, replayed boolean);
     CREATE TABLE fault_calls (client int, seq int, kind text, tenant text, trace text, outcome text, code text);
     \\copy fault_acked FROM '$W/acked.all' WITH (FORMAT csv, DELIMITER '|')
     \\copy fault_calls FROM '$W/calls.all' WITH (FORMAT csv, DELIMITER '|')
     ANALYZE fault_acked;
     ANALYZE fault_calls;");

# per kind: acknowledged / rejected (SQL error) / failed (no answer)
my %stats;
for my $c (1 .. $CLIENTS)
{
	next unless -e "$W/c$c.stats";
	for (split /\n/, slurp_file("$W/c$c.stats"))
	{
		my ($kind, $what, $count) = split / /;
		$stats{$kind}{$what} += $count;
	}
}
note('operations:       acked rejected failed');
for my $kind (sort keys %stats)
{
	note(sprintf('  %-18s %6d %6d %6d', $kind, map { $stats{$kind}{$_} // 0 } qw(acked rejected failed)));
}
my ($tot_acked, $tot_rej, $tot_failed) = (0, 0, 0);
for my $kind (keys %stats)
{
	$tot_acked  += $stats{$kind}{acked} // 0 unless $kind eq 'claim_empty';
	$tot_rej    += $stats{$kind}{rejected} // 0;
	$tot_failed += $stats{$kind}{failed} // 0;
}
note(sprintf('total: %d acknowledged, %d rejected, %d failed (%.0f acknowledged per second of load)',
	$tot_acked, $tot_rej, $tot_failed, $tot_acked / ($load_end - $load_start)));
note('rejections by SQLSTATE: ' . sql("SELECT string_agg(code || '=' || n, ' ' ORDER BY code) FROM
      (SELECT code, count(*) AS n FROM fault_calls WHERE outcome IN ('rejected', 'unexpected') GROUP BY code) x"));
note('calls without an answer that tells, by SQLSTATE (none: the connection was lost): ' . sql("SELECT string_agg(coalesce(nullif(code, ''), 'none') || '=' || n, ' ' ORDER BY code) FROM
      (SELECT code, count(*) AS n FROM fault_calls WHERE outcome IN ('failed', 'timeout') GROUP BY code) x"));
is(join(' ', grep { !($stats{$_}{acked} // 0) } qw(deduct charge credit grant refund try hold capture release submit claim complete fail)),
	'', 'every kind of operation was acknowledged at least once');
ok($tot_failed > 0, 'some client calls failed during the faults (the faults hit the clients)');
my %injected;
$injected{$_}++ for @faults;
is(join(' ', grep { !$injected{$_} } @basic, @extra), '',
	'every kind of fault was injected (' . scalar(@faults) . ' of ' . scalar(@plan) . ' planned faults)');
note('faults: ' . join(' ', map { "$_=$injected{$_}" } sort keys %injected));
my $unexpected = sql("SELECT count(*) FROM fault_calls WHERE outcome = 'unexpected'");
if (!is($unexpected, '0', 'no client call failed with an unexpected SQLSTATE'))
{
	my @u = map { split /\n/, slurp_file("$W/c$_.unexpected.txt") } 1 .. $CLIENTS;
	$#u = 29 if @u > 30;
	diag(join("\n", @u));
}
is(sql("SELECT count(*) FROM fault_calls WHERE outcome = 'timeout'"), '0', "no client call hung for $CALL_TIMEOUT s");

# ---------------------------------------------------------------------------
# acknowledged operations vs the database
# ---------------------------------------------------------------------------
note('acknowledged operations vs the database');
# where each acknowledged trace id is: counts in entries / rejections /
# hold_events over ALL tenants (our trace ids are globally unique)
sql_check('every acknowledged trace id is recorded exactly once, in the right place', <<'SQL');
WITH a AS (SELECT DISTINCT regexp_replace(kind, '^(replay|recover)_', '') AS fam, tenant, trace,
                  CASE WHEN kind ~ 'try' THEN status END AS st
             FROM fault_acked WHERE kind NOT IN ('claim', 'fail')),
     e AS (SELECT trace_id, count(*) AS n, count(*) FILTER (WHERE tenant_id = a.tenant) AS mine
             FROM billing.entries JOIN (SELECT DISTINCT tenant, trace FROM a) a ON a.trace = trace_id GROUP BY trace_id),
     r AS (SELECT trace_id, count(*) AS n FROM billing.rejections GROUP BY trace_id),
     h AS (SELECT trace_id, count(*) AS n FROM billing.hold_events WHERE trace_id IS NOT NULL GROUP BY trace_id),
     x AS (SELECT a.*, coalesce(e.n, 0) AS ne, coalesce(e.mine, 0) AS me, coalesce(r.n, 0) AS nr, coalesce(h.n, 0) AS nh,
                  CASE WHEN a.fam = 'complete' THEN '1 1 0 ' || CASE WHEN EXISTS (SELECT FROM billing.entries c
                              WHERE c.tenant_id = a.tenant AND c.trace_id = a.trace AND c.kind = 'capture') THEN 1 ELSE 0 END
                       WHEN a.fam = 'submit' THEN '0 0 0 0'
                       WHEN a.fam IN ('deduct', 'charge', 'credit', 'grant', 'refund') OR (a.fam = 'try' AND a.st = 'committed') THEN '1 1 0 0'
                       WHEN a.fam = 'try' THEN '0 0 1 0'
                       WHEN a.fam = 'capture' THEN '1 1 0 1'
                       ELSE '0 0 0 1' END AS want
             FROM a LEFT JOIN e ON e.trace_id = a.trace LEFT JOIN r ON r.trace_id = a.trace LEFT JOIN h ON h.trace_id = a.trace)
SELECT format('%s %s/%s: entries %s (of this tenant %s), rejections %s, hold_events %s; want %s',
              fam, tenant, trace, ne, me, nr, nh, want)
  FROM x WHERE format('%s %s %s %s', ne, me, nr, nh) <> want ORDER BY 1
SQL
sql_check('acknowledged ledger operations match their entry (entry_id, amount, balance_after)', <<'SQL');
SELECT format('%s %s/%s: acked entry %s amount %s balance_after %s; ledger entry %s amount %s balance_after %s kind %s',
              a.kind, a.tenant, a.trace, a.entry_id, a.amount, a.balance_after, e.entry_id,
              billing.to_amount(e.amount_micros), billing.to_amount(e.balance_after_micros), e.kind)
  FROM fault_acked a
  JOIN billing.entries e ON e.tenant_id = a.tenant AND e.trace_id = a.trace
 WHERE (a.kind ~ '(deduct|charge|credit|capture|grant|refund)$' OR (a.kind ~ 'try$' AND a.status = 'committed'))
   AND (e.entry_id IS DISTINCT FROM a.entry_id OR e.amount_micros <> a.amount * 1000000
        OR e.balance_after_micros <> a.balance_after * 1000000
        OR e.kind <> CASE WHEN a.kind ~ 'credit' THEN 'topup' WHEN a.kind ~ 'capture' THEN 'capture'
                          WHEN a.kind ~ 'grant' THEN 'grant' WHEN a.kind ~ 'refund' THEN 'refund' ELSE 'deduct' END
        OR (a.kind ~ 'refund' AND e.refund_of IS DISTINCT FROM
            (SELECT c.entry_id FROM billing.entries c WHERE c.tenant_id = a.tenant AND c.trace_id = a.ref)))
 ORDER BY 1
SQL
sql_check('acknowledged try_deduct rejections are in billing.rejections with their amount', <<'SQL');
SELECT format('%s %s/%s: acked amount %s, rejection %s', a.kind, a.tenant, a.trace, a.amount,
              coalesce(billing.to_amount(r.amount_micros)::text, 'missing'))
  FROM fault_acked a
  LEFT JOIN billing.rejections r ON r.tenant_id = a.tenant AND r.trace_id = a.trace
 WHERE a.kind ~ 'try$' AND a.status = 'rejected'
   AND (r.trace_id IS NULL OR a.amount * 1000000 <> r.amount_micros)
 ORDER BY 1
SQL
sql_check('acknowledged holds and releases are in billing.holds / hold_events as acknowledged', <<'SQL');
SELECT format('%s %s/%s: acked hold_id %s amount %s status %s; found %s', a.kind, a.tenant, a.trace, a.entry_id, a.amount,
              a.status, coalesce(format('hold %s amount %s released %s status %s event %s/%s', h.hold_id,
              billing.to_amount(h.amount_micros), billing.to_amount(h.released_micros), h.status, ev.action, ev.hold_id), 'nothing'))
  FROM fault_acked a
  LEFT JOIN billing.holds h ON h.tenant_id = a.tenant AND h.trace_id = CASE WHEN a.kind ~ 'release' THEN a.ref ELSE a.trace END
  LEFT JOIN billing.hold_events ev ON ev.tenant_id = a.tenant AND ev.trace_id = a.trace
 WHERE a.kind ~ '(hold|release)$'
   AND (h.hold_id IS NULL OR ev.event_id IS NULL OR h.hold_id <> a.entry_id OR ev.hold_id <> a.entry_id
        OR ev.action <> CASE WHEN a.kind ~ 'release' THEN 'release' ELSE 'hold' END
        OR (a.kind ~ 'hold$' AND h.amount_micros <> a.amount * 1000000)
        OR (a.kind ~ 'release$' AND (h.released_micros <> a.amount * 1000000 OR h.status <> a.status)))
 ORDER BY 1
SQL
sql_check('every acknowledgement of a trace id agrees (original, replays, recoveries); at most one is not a replay', <<'SQL');
SELECT format('%s %s/%s: %s acks, %s distinct results, %s with replayed = f', fam, tenant, trace, n, d, nf)
  FROM (SELECT regexp_replace(kind, '^(replay|recover)_', '') AS fam, tenant, trace, count(*) AS n,
               count(*) FILTER (WHERE NOT replayed) AS nf,
               count(DISTINCT format('%s %s %s %s %s', ref, entry_id, amount,
                     CASE WHEN kind ~ '(deduct|charge|credit|try|capture|grant|refund)$' THEN balance_after END,
                     CASE WHEN kind ~ '(try|release|complete)$' THEN status END)) AS d
          FROM fault_acked WHERE kind NOT IN ('claim', 'fail') GROUP BY 1, 2, 3) x
 WHERE d > 1 OR nf > 1 ORDER BY 1
SQL
# (sent is joined: a NOT EXISTS under OR is a subplan run for every row,
# quadratic in the number of calls)
sql_check('no ledger, rejection or hold row for a client trace id that was never sent or was rejected with an error', <<'SQL');
WITH sent AS (SELECT trace FROM fault_acked UNION SELECT trace FROM fault_calls WHERE outcome IN ('failed', 'timeout')),
     refused AS (SELECT tenant, trace, min(code) AS code FROM fault_calls c WHERE outcome IN ('rejected', 'unexpected')
                    AND trace ~ '^c[0-9]' AND NOT EXISTS (SELECT FROM sent s WHERE s.trace = c.trace) GROUP BY 1, 2),
     rows AS (SELECT 'entries' AS t, tenant_id, trace_id FROM billing.entries
              UNION ALL SELECT 'rejections', tenant_id, trace_id FROM billing.rejections
              UNION ALL SELECT 'hold_events', tenant_id, trace_id FROM billing.hold_events WHERE trace_id IS NOT NULL)
SELECT format('%s %s/%s: %s', rows.t, rows.tenant_id, rows.trace_id,
              CASE WHEN f.trace IS NOT NULL THEN 'the call was rejected with ' || f.code ELSE 'never sent' END)
  FROM rows LEFT JOIN refused f ON f.tenant = rows.tenant_id AND f.trace = rows.trace_id
       LEFT JOIN sent s ON s.trace = rows.trace_id
 WHERE rows.trace_id ~ '^c[0-9]' AND (f.trace IS NOT NULL OR s.trace IS NULL)
 ORDER BY 1
SQL
# A grant refused as expired (ZB018, accepted above once its expires_at had
# passed) must not have committed: a lost call that had would be replayed.
sql_check('no grant refused as expired (ZB018) is in the ledger', <<'SQL');
SELECT format('%s %s/%s: refused with ZB018, but ledger entry %s exists', c.kind, c.tenant, c.trace, e.entry_id)
  FROM fault_calls c JOIN billing.entries e ON e.tenant_id = c.tenant AND e.trace_id = c.trace
 WHERE c.kind ~ 'grant$' AND c.code = 'ZB018'
 ORDER BY 1
SQL
sql_check('no trace id twice anywhere (entries, rejections, hold_events, across tenants)', <<'SQL');
SELECT format('entries: %s x %s', trace_id, count(*)) FROM billing.entries GROUP BY trace_id HAVING count(*) > 1
UNION ALL
SELECT format('rejections: %s x %s', trace_id, count(*)) FROM billing.rejections GROUP BY trace_id HAVING count(*) > 1
UNION ALL
SELECT format('hold_events: %s x %s', trace_id, count(*)) FROM billing.hold_events WHERE trace_id IS NOT NULL
 GROUP BY trace_id HAVING count(*) > 1
UNION ALL
SELECT format('%s/%s both in entries and rejections', e.tenant_id, e.trace_id)
  FROM billing.entries e JOIN billing.rejections r USING (tenant_id, trace_id)
UNION ALL
SELECT format('%s/%s: hold event %s (entry %s) vs ledger entry %s', h.tenant_id, h.trace_id, h.action, h.entry_id, e.entry_id)
  FROM billing.hold_events h JOIN billing.entries e USING (tenant_id, trace_id)
 WHERE h.action <> 'capture' OR h.entry_id IS DISTINCT FROM e.entry_id OR e.kind <> 'capture'
UNION ALL
SELECT format('%s/%s: capture entry %s without its capture event', e.tenant_id, e.trace_id, e.entry_id)
  FROM billing.entries e
 WHERE e.kind = 'capture' AND NOT EXISTS (SELECT FROM billing.hold_events h WHERE h.tenant_id = e.tenant_id
                                            AND h.trace_id = e.trace_id AND h.action = 'capture' AND h.entry_id = e.entry_id)
SQL

# ---------------------------------------------------------------------------
# accounts and holds
# ---------------------------------------------------------------------------
note('accounts and holds');
sql_check('no charge was refunded beyond what it charged', <<'SQL');
SELECT format('%s/%s: charged %s, refunded %s', tenant_id, charge_trace_id, charged, refunded)
  FROM billing.refunded_charges WHERE refundable < 0
SQL
# The worker's maintenance sweeps too (every 200 ms), and a sweep skips an
# account another transaction has locked (SKIP LOCKED): the test's sweep may
# skip one the worker is still expiring.  Sweep until nothing that was due
# when the sweep started is left.  (Holds of 30 s and grants of 3 s go on
# expiring after the load: what expires after the sweep started is the next
# sweep's, so the check counts up to that moment, not up to now.)
my $swept_from;
ok(wait_for(120, sub {
	$swept_from = sql('SELECT clock_timestamp()');
	sql('SELECT billing.expire_due_holds(1000)');
	sql("SELECT count(*) FROM billing.accounts a WHERE billing.expired_micros(a, '$swept_from') > 0") eq '0';
}, 0.5), 'an expiry sweep leaves nothing that was due when it started');
sql_check('after an expiry sweep no account holds credit of grants expired before it', <<"SQL");
SELECT format('%s: %s of expired grants', a.tenant_id, billing.expired_micros(a, '$swept_from'))
  FROM billing.accounts a WHERE billing.expired_micros(a, '$swept_from') > 0
SQL
sql_check('billing_verify() returns no rows', <<'SQL');
SELECT row_to_json(v) FROM billing_verify() v
SQL
sql_check('no account below -credit_limit, none with negative available funds', <<'SQL');
SELECT format('%s: balance %s credit_limit %s on_hold %s available %s', tenant_id, balance, credit_limit, on_hold, available)
  FROM billing.balances WHERE balance < -credit_limit OR available < 0
SQL
sql_check("each account's cached sum of open holds equals its open holds", <<'SQL');
SELECT format('%s: holds_micros %s, open holds %s', a.tenant_id, a.holds_micros, coalesce(s.rest, 0))
  FROM billing.accounts a
  LEFT JOIN (SELECT tenant_id, sum(amount_micros - captured_micros - released_micros) AS rest
               FROM billing.holds WHERE status = 'open' GROUP BY tenant_id) s USING (tenant_id)
 WHERE a.holds_micros <> coalesce(s.rest, 0)
SQL
sql_check("each hold's captured amount equals its capture entries; each hold has its hold event", <<'SQL');
SELECT format('%s/%s: captured %s, capture entries %s, hold events %s', h.tenant_id, h.trace_id, h.captured_micros,
              coalesce(c.s, 0), coalesce(ev.n, 0))
  FROM billing.holds h
  LEFT JOIN (SELECT tenant_id, hold_id, -sum(amount_micros) AS s FROM billing.entries WHERE kind = 'capture'
              GROUP BY 1, 2) c USING (tenant_id, hold_id)
  LEFT JOIN (SELECT tenant_id, hold_id, count(*) AS n FROM billing.hold_events WHERE action = 'hold'
              GROUP BY 1, 2) ev USING (tenant_id, hold_id)
 WHERE h.captured_micros <> coalesce(c.s, 0) OR coalesce(ev.n, 0) <> 1
SQL

# ---------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------
note('jobs');
sql_check('acknowledged submits are jobs with their estimate and their hold', <<'SQL');
SELECT format('%s %s/%s: acked job %s estimate %s; found job %s estimate %s, hold %s', a.kind, a.tenant, a.trace, a.ref,
              a.amount, j.job_id, billing.to_amount(j.estimated_micros), coalesce(billing.to_amount(h.amount_micros)::text, 'missing'))
  FROM fault_acked a
  LEFT JOIN billing.jobs j ON j.tenant_id = a.tenant AND j.idempotency_key = a.trace
  LEFT JOIN billing.holds h ON h.tenant_id = a.tenant AND h.trace_id = 'job:' || a.ref || ':1'
 WHERE a.kind ~ 'submit$'
   AND (j.job_id IS NULL OR j.job_id::text <> a.ref OR j.estimated_micros <> a.amount * 1000000
        OR h.amount_micros IS DISTINCT FROM j.estimated_micros)
SQL
sql_check('acknowledged completes are completed jobs with the acknowledged cost and charge entry', <<'SQL');
SELECT format('%s %s job %s: acked actual %s entry %s; job %s actual %s entry %s', a.kind, a.tenant, a.ref, a.amount,
              a.entry_id, j.state, billing.to_amount(j.actual_micros), j.charge_entry_id)
  FROM fault_acked a
  LEFT JOIN billing.jobs j ON j.tenant_id = a.tenant AND j.job_id::text = a.ref
 WHERE a.kind ~ 'complete$'
   AND (j.state IS DISTINCT FROM 'completed' OR j.actual_micros <> a.amount * 1000000
        OR j.charge_entry_id IS DISTINCT FROM a.entry_id)
SQL
sql_check('acknowledged final fails are failed jobs', <<'SQL');
SELECT format('fail %s job %s: acked %s, job %s', a.tenant, a.ref, a.status, j.state)
  FROM fault_acked a LEFT JOIN billing.jobs j ON j.tenant_id = a.tenant AND j.job_id::text = a.ref
 WHERE a.kind = 'fail' AND a.status = 'failed' AND j.state IS DISTINCT FROM 'failed'
SQL
sql_check('no job completed without its job:<id>:charge entry (= -actual cost, = charge_entry_id)', <<'SQL');
SELECT format('%s job %s: actual %s charge_entry_id %s; entry %s kind %s amount %s', j.tenant_id, j.job_id,
              billing.to_amount(j.actual_micros), j.charge_entry_id, e.entry_id, e.kind, billing.to_amount(e.amount_micros))
  FROM billing.jobs j
  LEFT JOIN billing.entries e ON e.tenant_id = j.tenant_id AND e.trace_id = 'job:' || j.job_id || ':charge'
 WHERE j.state = 'completed'
   AND (j.actual_micros IS NULL OR (j.actual_micros > 0 AND (e.entry_id IS NULL OR e.entry_id IS DISTINCT FROM j.charge_entry_id
        OR e.amount_micros <> -j.actual_micros OR e.kind NOT IN ('capture', 'deduct'))))
UNION ALL
SELECT format('%s job %s is %s but has a charge entry %s', j.tenant_id, j.job_id, j.state, e.entry_id)
  FROM billing.jobs j
  JOIN billing.entries e ON e.tenant_id = j.tenant_id AND e.trace_id = 'job:' || j.job_id || ':charge'
 WHERE j.state <> 'completed'
SQL
sql_check('no failed/cancelled/completed job with an open hold', <<'SQL');
SELECT format('%s job %s is %s; hold %s open until %s', j.tenant_id, j.job_id, j.state, h.trace_id, h.expires_at)
  FROM billing.jobs j
  JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id LIKE 'job:' || j.job_id || ':%'
 WHERE j.state IN ('failed', 'cancelled', 'completed') AND h.status = 'open' AND h.expires_at > now()
SQL
sql_check("job_events form an unbroken chain per job, ending in the job's state", <<'SQL');
SELECT format('%s job %s: %s', tenant_id, job_id, problem) FROM (
  SELECT tenant_id, job_id, problem FROM (
    SELECT e.tenant_id, e.job_id,
           format('event %s: from %s, but the previous event went to %s', e.event_id, e.from_state,
                  lag(e.to_state) OVER w) AS problem,
           e.from_state IS DISTINCT FROM lag(e.to_state) OVER w AS bad
      FROM billing.job_events e WINDOW w AS (PARTITION BY e.tenant_id, e.job_id ORDER BY e.event_id)) x
   WHERE bad
  UNION ALL
  SELECT j.tenant_id, j.job_id, format('state %s, last event to %s', j.state, l.to_state)
    FROM billing.jobs j
    LEFT JOIN LATERAL (SELECT to_state FROM billing.job_events e WHERE e.tenant_id = j.tenant_id AND e.job_id = j.job_id
                        ORDER BY e.event_id DESC LIMIT 1) l ON true
   WHERE l.to_state IS DISTINCT FROM j.state) y ORDER BY 1
SQL
note('jobs: ' . sql("SELECT string_agg(state || '=' || n, ' ' ORDER BY state) FROM (SELECT state, count(*) AS n FROM billing.jobs GROUP BY state) x"));

# ---------------------------------------------------------------------------
# Redis vs the database
# ---------------------------------------------------------------------------
note('Redis vs the database');
if (wait_for($FAULT_CONVERGE, sub { BillingTest::mirror_equals($node, $DB, $redis) }))
{
	pass('Redis equals the database (converged ' . (now_ms() - $load_done_ms) . ' ms after the load ended, '
		  . (now_ms() - $last_fault_ms) . ' ms after the last fault)');
}
else
{
	fail("Redis equals the database after the load (not converged after $FAULT_CONVERGE s)");
	diag("database (<) vs Redis (>):\n" . BillingTest::mirror_diff());
	diag('sync status: ' . (BillingTest::query($node, $DB, 'SELECT row_to_json(s) FROM billing_sync_status() s') // '?'));
}
# the sampled Redis versions: never backwards, never beyond the database's last
my @dbv = split / /, sql("SELECT string_agg(version::text, ' ' ORDER BY tenant_id) FROM billing.accounts WHERE tenant_id ~ '^f[0-9]{2}\$'");
my (@samples, %vio, @last, @at);
@samples = split /\n/, slurp_file("$W/redis_versions") if -e "$W/redis_versions";
for my $line (@samples)
{
	my ($t, @v) = split / /, $line;
	for my $i (0 .. $#v)
	{
		next if $v[$i] eq '-';
		my $name = sprintf('f%02d', $i + 1);
		$vio{ sprintf('%s: Redis version %d at %.1f s, then %d at %.1f s', $name, $last[$i], $at[$i] / 1000 - $load_start,
				$v[$i], $t / 1000 - $load_start) } = 1
		  if defined $last[$i] && $v[$i] < $last[$i];
		$vio{ sprintf('%s: Redis showed version %d at %.1f s; the database has %d', $name, $v[$i],
				$t / 1000 - $load_start, $dbv[$i] // -1) } = 1
		  if $v[$i] > ($dbv[$i] // -1);
		($last[$i], $at[$i]) = ($v[$i], $t);
	}
}
if (@samples < 10)
{
	fail('Redis was sampled during the load (only ' . scalar(@samples) . ' samples)');
}
elsif (!%vio)
{
	pass('Redis versions never went backwards and never ran ahead of the database ('
		  . scalar(@samples) . " samples of $TENANTS tenants)");
}
else
{
	fail('Redis versions never went backwards and never ran ahead of the database (' . scalar(@samples) . ' samples)');
	my @v = sort keys %vio;
	$#v = 14 if @v > 15;
	diag(join("\n", @v));
}

# ---------------------------------------------------------------------------
# the server log: only the crashes we caused
# ---------------------------------------------------------------------------
note('server log');
BillingTest::no_crashes($node, @killed, @termed);
my @recoveries = BillingTest::log_since($node, 0) =~ /all server processes terminated; reinitializing/g;
is(scalar(@recoveries), scalar(grep { /^(backend_kill|worker_kill9)$/ } @faults),
	'every kill -9 fault made the postmaster reinitialize (crash recovery)');

# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------
note('entries checked: ' . sql("SELECT count(*) FROM fault_acked WHERE kind !~ '(claim|fail)\$'")
	  . ' acknowledgements against ' . sql('SELECT count(*) FROM billing.entries') . ' ledger entries, '
	  . sql('SELECT count(*) FROM billing.rejections') . ' rejections, '
	  . sql('SELECT count(*) FROM billing.hold_events') . ' hold events, '
	  . sql('SELECT count(*) FROM billing.jobs') . ' jobs');
note('acknowledged operations that failed first (lost connection) and were recovered: '
	  . sql("SELECT count(*) || ' (' || count(*) FILTER (WHERE replayed) || ' had committed before the connection was lost)'
	           FROM fault_acked WHERE kind ~ '^recover_'"));
note('sync status: ' . sql("SELECT 'full_resyncs=' || full_resyncs || ' pushed=' || pushed || ' failed=' || failed
                                   || ' repaired=' || repaired FROM billing_sync_status()"));
note(sprintf('faults injected: %d of %d planned; load %.0f s; runtime %.0f s',
	scalar(@faults), scalar(@plan), $load_end - $load_start, time - $started_at));

if ($ENV{FAULT_KEEP})
{
	my $flag = "$W/keep";
	write_file($flag, "delete this file to stop the node and Redis\n");
	diag("FAULT_KEEP: node on " . $node->host . " port " . $node->port . " (database $DB), redis port "
		  . $redis->port . "; they stay up until you delete $flag");
	wait_for(86400, sub { !-e $flag }, 1);
}
done_testing();

# Fault test of the charge engine: every acknowledged billing_charge is in the
# ledger exactly once, whatever happens to the engine or the server mid-batch.
#
# 8 clients (BillingTest::Session: one psql connection each, autocommit) call
# billing_charge in a loop over 20 tenants and one hot tenant (a third of the
# calls), each with a new trace id.  A call the server answers with a result
# is acknowledged: the client logs it.  A call without an answer that tells
# (the connection lost, the server restarting, a cancel: SQLSTATE class 08
# or 57) or answered ZB111 (the engine stopped while it was applying the
# charge: outcome unknown) or ZB112 (no engine for now) is made again with
# the same trace id and arguments until it is answered; that is what the
# documentation tells callers to do.  A DBA's trigger on billing.entries
# sleeps 1 ms per entry, so the engine spends most of its time inside a
# batch and the faults hit batches in flight.
#
# Faults, each once the clients had ENGINE_FAULT_OPS calls acknowledged
# since the last one (never "within N seconds"):
#   engine_term    pg_terminate_backend() of a running engine worker; again
#                  (up to 10 times) until a caller was answered ZB111, so
#                  that an engine stopped mid-batch is what the test saw
#   engine_cancel  pg_cancel_backend() of an engine worker: its batch is
#                  applied again (nobody notices)
#   caller_cancel  pg_cancel_backend() of a client's backend waiting for
#                  the engine (57014: the client calls again)
#   caller_term    pg_terminate_backend() of two clients' backends waiting
#                  for the engine (the connection is lost: the client
#                  connects again and calls again with the same trace id)
#   engine_kill9   kill -9 of an engine worker: crash recovery of the server
#   pg_immediate   pg_ctl stop -m immediate, then start
#
# Checks: every acknowledged trace id is in billing.entries exactly once,
# with the acknowledged entry_id, amount and balance_after; the answers for
# one trace id agree and at most one says replayed = f; no entry for a trace
# id nobody sent; billing_verify() finds nothing; no unexpected SQLSTATE; a
# caller did get ZB111; the server log shows no crash but those the test
# caused.
#
# Alone: BILLING_SKIP="regress isolation" BILLING_TESTS=095_engine_fault make check
# Environment: ENGINE_FAULT_OPS (acknowledged calls before each fault and
# after the last, default 100), ENGINE_FAULT_STALL (seconds without any
# acknowledged call that fail the test, default 600).
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use BillingTest;

my $OPS = $ENV{ENGINE_FAULT_OPS} // 100;
my $STALL = $ENV{ENGINE_FAULT_STALL} // 600;
my $CLIENTS = 8;
my $TENANTS = 20;
my $DB = 'engine_fault';

# synchronous_commit on: an acknowledged commit survives -m immediate and
# kill -9 (fsync may stay off: the OS does not crash)
my $node = BillingTest::node('engine', database => $DB, conf => join("\n",
	"synchronous_commit = on",
	"restart_after_crash = on",
	"billing.engine_workers = 2",
	"billing.engine_idle_timeout = 600",
	"log_statement = 'none'"));
my $W = PostgreSQL::Test::Utils::tempdir('work');
my (@killed, @termed);

sub sql { return $node->safe_psql($DB, shift) }
sub pg_up { return BillingTest::accepts_connections($node) }

sql(qq{
	SELECT count(*) FROM generate_series(1, $TENANTS) t, billing_account_create('e' || t);
	SELECT count(*) FROM billing_account_create('hot');
	SELECT count(billing_credit(tenant_id, 1000000, 'top-' || tenant_id)) FROM billing.accounts;
	CREATE FUNCTION public.slow_entry() RETURNS trigger LANGUAGE plpgsql AS \$\$
	BEGIN
		PERFORM pg_sleep(0.001);
		RETURN NEW;
	END \$\$;
	CREATE TRIGGER slow_entry BEFORE INSERT ON billing.entries
		FOR EACH ROW EXECUTE FUNCTION public.slow_entry();
});

# ---------------------------------------------------------------------------
# the clients
# ---------------------------------------------------------------------------
# c<N>.acked: "trace|tenant|entry_id|amount|balance_after|replayed" per
# acknowledged call; c<N>.sent: every trace id sent; c<N>.codes: "trace|code"
# per answer that was not a result; c<N>.n: "<acknowledged> <ZB111 answers>".
my %RETRY = map { $_ => 1 } qw(ZB111 ZB112);

sub write_file { return BillingTest::write_atomic(@_) }

sub client
{
	my ($c) = @_;
	srand($c * 7919);
	my $s = BillingTest::Session->new($node, $DB, timeout => 120);
	open my $acked, '>', "$W/c$c.acked" or die $!;
	open my $sent, '>', "$W/c$c.sent" or die $!;
	open my $codes, '>', "$W/c$c.codes" or die $!;
	$_->autoflush(1) for $acked, $sent, $codes;
	my ($n, $nacked, $unknown) = (0, 0, 0);
	until (-e "$W/stop")
	{
		my $tenant = rand() < 1 / 3 ? 'hot' : 'e' . (1 + int(rand($TENANTS)));
		my $amount = sprintf('%.6f', (1 + int(rand(999_999))) / 1_000_000);
		my $trace = "c$c-" . ++$n;
		print $sent "$trace\n";
		while (1)
		{
			my $r = $s->call("SELECT entry_id, amount, balance_after, replayed "
				  . "FROM billing_charge('$tenant', $amount, '$trace')");
			if ($r->{status} eq 'ok')
			{
				$nacked++;
				print $acked "$trace|$tenant|$r->{rows}[0]\n";
				last;
			}
			my $code = $r->{status} eq 'error' ? $r->{sqlstate} : $r->{status};
			print $codes "$trace|$code\n";
			$unknown++ if $code eq 'ZB111';
			write_file("$W/c$c.n", "$nacked $unknown\n");
			# an error that is an answer: the charge was not made; done
			last if $r->{status} eq 'error' && !$RETRY{$code};
			# no answer that tells, or "outcome unknown": the same call again
			usleep($r->{status} eq 'error' ? 50_000 : 200_000);
			last if -e "$W/stop" && $r->{status} ne 'error';
		}
		write_file("$W/c$c.n", "$nacked $unknown\n");
	}
	return;
}

sub counts
{
	my ($acked, $unknown) = (0, 0);
	for my $c (1 .. $CLIENTS)
	{
		my ($a, $u) = (eval { slurp_file("$W/c$c.n") } // '') =~ /^(\d+) (\d+)/;
		$acked += $a // 0;
		$unknown += $u // 0;
	}
	return ($acked, $unknown);
}

my @clients = map { my $c = $_; BillingTest::spawn(sub { client($c) }) } 1 .. $CLIENTS;

my $stalled;
sub wait_ops
{
	my ($n, $why) = @_;
	my ($since) = counts();
	my ($last, $t_last) = ($since, time);
	while (1)
	{
		my ($now) = counts();
		return 1 if $now - $since >= $n;
		if ($now != $last)
		{
			($last, $t_last) = ($now, time);
		}
		elsif (time - $t_last > $STALL)
		{
			$stalled = "no call acknowledged for $STALL s ($why)";
			return 0;
		}
		if (!grep { !defined BillingTest::exited($_) } @clients)
		{
			$stalled = "every client stopped ($why)";
			return 0;
		}
		usleep(100_000);
	}
}

sub engine_pid
{
	my $pid = BillingTest::query($node, $DB,
		"SELECT pid FROM billing_engine_status() WHERE state = 'running' AND database = '$DB' "
		  . "AND pid IN (SELECT pid FROM pg_stat_activity) "    # connected: a backend to signal
		  . "ORDER BY queued DESC, worker LIMIT 1");
	return defined $pid && $pid =~ /^\d+$/ ? $pid : undef;
}

# an engine worker running (the clients start them); undef after 600 s
sub running_engine
{
	my $pid;
	BillingTest::wait_until(600, sub { $pid = engine_pid(); defined $pid });
	return $pid;
}

# an engine worker that was running, signalled by SIGNAL (a sub that takes
# its pid and says whether it reached it): its pid, or undef (a failed
# check) when no engine could be signalled in 10 tries (one may end by
# itself between the look and the signal)
sub signal_engine
{
	my ($what, $signal) = @_;
	for my $try (1 .. 10)
	{
		my $pid = running_engine() // last;
		return $pid if $signal->($pid);
		note("$what: engine $pid was gone before the signal, try $try");
		usleep(500_000);
	}
	fail("$what: an engine worker was running to signal");
	return undef;
}

# each fault returns true when it hit what it aims at
my %fault = (
	engine_term => sub {
		my $hit = 0;
		for my $try (1 .. 10)
		{
			my (undef, $u0) = counts();
			my $pid = signal_engine('engine_term', sub { sql("SELECT pg_terminate_backend($_[0])") eq 't' })
			  // return $hit;
			$hit = 1;
			push @termed, $pid;
			note("engine_term: pg_terminate_backend($pid), try $try");
			wait_ops(int($OPS / 4) || 1, 'after engine_term') or return $hit;
			my (undef, $u1) = counts();
			last if $u1 > $u0;
		}
		return $hit;
	},
	engine_cancel => sub {
		my $pid = signal_engine('engine_cancel', sub { sql("SELECT pg_cancel_backend($_[0])") eq 't' }) // return 0;
		note("engine_cancel: pg_cancel_backend($pid)");
		return 1;
	},
	caller_cancel => sub {
		my $hit = signal_callers('pg_cancel_backend', 3);
		return ok($hit > 0, "caller_cancel: pg_cancel_backend reached $hit callers in billing_charge");
	},
	caller_term => sub {
		my $hit = signal_callers('pg_terminate_backend', 2);
		return ok($hit > 0, "caller_term: pg_terminate_backend reached $hit callers in billing_charge");
	},
	engine_kill9 => sub {
		my $off = BillingTest::log_size($node);
		my $pid = signal_engine('engine_kill9', sub { kill('KILL', $_[0]) == 1 }) // return 0;
		push @killed, $pid;
		note("engine_kill9: kill -9 $pid");
		ok(BillingTest::wait_until(600, sub { BillingTest::log_since($node, $off) =~ /all server processes terminated; reinitializing/ }),
			'engine_kill9: the postmaster reinitialized (crash recovery)');
		return ok(BillingTest::wait_until(600, \&pg_up), 'engine_kill9: the server is back');
	},
	pg_immediate => sub {
		$node->stop('immediate');
		note('pg_immediate: pg_ctl stop -m immediate');
		$node->start;
		return 1;
	},
);

# FUNCTION (pg_cancel_backend, pg_terminate_backend) sent to up to N
# callers that are in a billing_charge call now (active, not only last seen
# in one), in the statement that finds them: how many it reached (it tries
# again for up to 60 s while it reaches none)
sub signal_callers
{
	my ($function, $n) = @_;
	my $hit = 0;
	BillingTest::wait_until(60, sub {
		$hit = sql("SELECT count(*) FILTER (WHERE $function(pid)) FROM (SELECT pid FROM pg_stat_activity "
			  . "WHERE datname = '$DB' AND backend_type = 'client backend' AND state = 'active' "
			  . "AND query LIKE '%billing_charge%' AND pid <> pg_backend_pid() LIMIT $n) AS c");
		$hit > 0 }, 0.01);
	return $hit;
}

my %injected;    # the faults that hit, by kind
my @plan = qw(engine_term engine_cancel caller_cancel caller_term engine_term engine_kill9 pg_immediate);
for my $kind (@plan)
{
	wait_ops($OPS, "before $kind") or last;
	$injected{$kind}++ if $fault{$kind}->();
}
my %planned;
$planned{$_}++ for @plan;
is_deeply(\%injected, \%planned, 'every fault of the plan was injected: ' . join(', ', map { "$_ $injected{$_}" } sort keys %injected));
wait_ops($OPS, 'after the last fault') unless $stalled;
write_file("$W/stop", "stop\n");
BillingTest::reap($_) for @clients;
ok(!$stalled, 'the load went on through every fault') or diag($stalled);

# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------
my (%acks, %sent, %codes);
for my $c (1 .. $CLIENTS)
{
	for (split /\n/, slurp_file("$W/c$c.acked"))
	{
		my ($trace, $tenant, $id, $amount, $after, $replayed) = split /\|/;
		push @{ $acks{$trace} }, { tenant => $tenant, id => $id, amount => $amount,
			after => $after, replayed => $replayed };
	}
	$sent{$_} = 1 for split /\n/, slurp_file("$W/c$c.sent");
	for (split /\n/, slurp_file("$W/c$c.codes"))
	{
		my ($trace, $code) = split /\|/;
		$codes{$code}++;
	}
}
my ($nacked, $nunknown) = counts();
note("acknowledged $nacked calls (" . scalar(keys %acks) . ' trace ids) of '
	  . scalar(keys %sent) . ' sent; other answers: '
	  . join(', ', map { "$_ $codes{$_}" } sort keys %codes));
cmp_ok(scalar(keys %acks), '>=', $OPS * (@plan + 1), 'the clients got answers throughout');

my %unexpected = map { $_ => $codes{$_} }
  grep { !/^(ZB111|ZB112|lost)$/ && !/^(08|57)/ } keys %codes;
is_deeply(\%unexpected, {}, 'no answer but results, ZB111, ZB112 and lost connections (no call hung: timeout)');
cmp_ok($codes{ZB111} // 0, '>', 0, 'a caller was told ZB111: an engine stopped mid-batch');

# the ledger
my %ledger;
for (split /\n/, sql("SELECT trace_id, tenant_id, entry_id, amount, balance_after "
	  . "FROM billing.ledger WHERE trace_id ~ '^c[0-9]+-[0-9]+\$'"))
{
	my ($trace, $tenant, $id, $amount, $after) = split /\|/;
	push @{ $ledger{$trace} }, { tenant => $tenant, id => $id, amount => $amount, after => $after };
}

my @bad;
for my $trace (sort keys %acks)
{
	my @a = @{ $acks{$trace} };
	my $l = $ledger{$trace} // [];
	if (@$l != 1)
	{
		push @bad, "$trace: acknowledged, " . scalar(@$l) . ' entries in the ledger';
		next;
	}
	for my $a (@a)
	{
		push @bad, "$trace: acknowledged entry $a->{id} $a->{amount} $a->{after} $a->{tenant}, "
		  . "the ledger has $l->[0]{id} $l->[0]{amount} $l->[0]{after} $l->[0]{tenant}"
		  if $a->{id} ne $l->[0]{id} || $a->{amount} ne $l->[0]{amount}
		  || $a->{after} ne $l->[0]{after} || $a->{tenant} ne $l->[0]{tenant};
	}
	my $fresh = grep { $_->{replayed} eq 'f' } @a;
	push @bad, "$trace: $fresh answers say replayed = f" if $fresh > 1;
}
for my $trace (sort keys %ledger)
{
	push @bad, "$trace: in the ledger, never sent" unless $sent{$trace};
	push @bad, "$trace: " . scalar(@{ $ledger{$trace} }) . ' entries' if @{ $ledger{$trace} } > 1;
}
is(join("\n", @bad[0 .. ($#bad < 20 ? $#bad : 20)]), '',
	'every acknowledged charge is in the ledger exactly once, as acknowledged');
note(scalar(keys %ledger) - scalar(keys %acks)
	  . ' charges were committed whose answer was lost and never retried to the end (allowed)');

is(sql('SELECT count(*) FROM billing_verify()'), '0', 'billing_verify() finds nothing');
is(sql("SELECT count(*) FROM billing.accounts WHERE balance_micros < -credit_limit_micros"), '0',
	'no account below its credit limit');

BillingTest::no_crashes($node, @killed, @termed);
$node->stop;
done_testing();

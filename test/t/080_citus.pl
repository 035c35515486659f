# billing on a Citus cluster (issue 15, docs/scaling.md): a coordinator and
# two workers on loopback, Citus built from the vendored source
# (test/citus/build.sh, cached outside the work tree), one Redis that every
# node's worker mirrors its own tenants into.
#
#   1. migration: a single-node billing database (accounts, holds, API keys
#      with budgets, jobs, a recorded rejection, a grant, a tenant's price)
#      is distributed by billing.citus_distribute() while 4 clients charge
#      through the coordinator (in phases 1 and 2, two of them through
#      billing_charge: the charge engine of the node that runs the call);
#   2. shard moves under load: the shard group of one tenant moves to the
#      other worker (block_writes) and back (logical replication) while 4
#      clients charge;
#   3. two-phase commit: 4 clients run transactions that charge a tenant on
#      each worker while one worker is stopped (immediate) and started again;
#      the commits were two-phase (pg_dist_transaction), and none is left
#      prepared after recover_prepared_transactions();
#   4. the rest through the coordinator: billing_deduct_many across nodes,
#      holds (capture, release, expiry by the tenant's node), grants and a
#      refund, a job's lifecycle, per-node claims and rescue, the refusals
#      (ZB100, ZB103, ZB104, ZB015 without a crash, ZB020 on the shards);
#      billing_charge (the charge engine) runs on the tenant's node;
#   4b. a node that held billing data of its own joins: its old rows are
#      neither read nor written, billing_verify() reports them, and
#      billing.citus_clear_local_rows() removes them;
#   5. after each load: every acknowledged charge is in the ledger exactly
#      once, no call that failed committed anything, no row is left in a
#      local table on any node, billing_verify() finds nothing (balance =
#      SUM per tenant); at the end every worker's tenants in Redis equal its
#      database, each node numbers ids from its own range, no crash.
#
# Skipped when the Citus source does not support the server's major
# version (18 with Citus 13.2), and when the source is absent (a user's
# clone), but then not in CI (BILLING_CITUS_REQUIRED=1, set by test/run.sh
# when CI=true: it fails instead): it is found in BILLING_CITUS_SRC, default
# <repo>/../shared/citus.  test/run.sh builds
# Citus before the TAP tests (as root it installs the build dependencies)
# and says how that went in BILLING_CITUS_BUILD; run alone (prove), this
# test runs test/citus/build.sh itself.
#
# Alone: BILLING_SKIP="regress isolation" BILLING_TESTS=080_citus make check
use strict;
use warnings FATAL => 'all';

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use BillingTest;

my $started = time;

############################################################################
# Citus: built and installed into the PostgreSQL under test, or skipped
############################################################################

my $pg_config = $ENV{PG_CONFIG} // 'pg_config';
my $build = $ENV{BILLING_CITUS_BUILD};
undef $build if defined $build && $build eq '';
if (!defined $build && $ENV{BILLING_INSTALLCHECK})
{
	# make installcheck TAP_TESTS=1 installs nothing: Citus must be there
	my $lib = `$pg_config --pkglibdir`;
	chomp $lib;
	$build = -f "$lib/citus.so" ? 'ok'
	  : "skip: make installcheck does not build Citus: install it (bash test/citus/build.sh) or run make check";
}
if (!defined $build)
{
	my $src = $ENV{BILLING_CITUS_SRC} // "$BillingTest::REPO/../shared/citus";
	my @tar = glob("$src/citus-v*-notests.tar.gz");
	if (!@tar)
	{
		$build = "skip: no Citus source (citus-v*-notests.tar.gz) in $src; set BILLING_CITUS_SRC";
	}
	else
	{
		my ($out, $err) = ('', '');
		my $ok = IPC::Run::run([ 'bash', "$BillingTest::REPO/test/citus/build.sh" ],
			'<', \'', '>', \$out, '2>', \$err);
		my $rc = $? >> 8;
		$build =
			$ok        ? 'ok'
		  : $rc == 2 ? "skip: $err"
		  : $rc == 3 ? $err
		  :            "fail: test/citus/build.sh exited $rc: $err";
	}
}
# a server version this Citus does not support (PostgreSQL 18 with Citus
# 13.2): nothing to test, in CI too
plan skip_all => "Citus does not support this PostgreSQL: $1"
  if $build =~ /^unsupported:\s*(.*?)\s*$/s;
if ($build =~ /^skip:\s*(.*)/s)
{
	my $why = $1;
	# in CI (test/run.sh sets BILLING_CITUS_REQUIRED=1 when CI=true) this
	# test must run: a missing source is a failure there
	plan skip_all => "Citus is not available: $why"
	  unless ($ENV{BILLING_CITUS_REQUIRED} // '') eq '1';
	fail('the Citus source is there (BILLING_CITUS_REQUIRED=1, as in CI)');
	diag($why);
	done_testing();
	exit;
}
if ($build ne 'ok')
{
	fail('Citus is built and installed (test/citus/build.sh)');
	diag($build);
	done_testing();
	exit;
}
my $pkglib = `$pg_config --pkglibdir`;
chomp $pkglib;
ok(-f "$pkglib/citus.so", "citus.so is installed in $pkglib") or BAIL_OUT('no citus.so');

############################################################################
# the cluster
############################################################################

my $db = 'bill';
my $redis = BillingTest::Redis->new('citus');
my $conf = join("\n",
	"listen_addresses = '127.0.0.1'",    # Citus connects to nodes over TCP
	"citus.enable_unsafe_triggers = on",  # billing's triggers on the shards
	"citus.node_conninfo = 'sslmode=disable'",
	"max_prepared_transactions = 100",    # Citus's two-phase commit
	"max_worker_processes = 32",
	"wal_level = logical",                # shard moves by logical replication
	"max_wal_senders = 10",
	"max_replication_slots = 10",
	"log_min_messages = warning");
my %node;
for my $name (qw(coord w1 w2))
{
	$node{$name} = BillingTest::node($name, libraries => 'citus,billing', database => $db,
		extension => 0, redis => $redis, conf => $conf);
	$node{$name}->safe_psql($db, 'CREATE EXTENSION citus');
}
my ($coord, $w1, $w2) = @node{qw(coord w1 w2)};
my %group;
$coord->safe_psql($db, sprintf(q{
	SELECT citus_set_coordinator_host('127.0.0.1', %d);
	SELECT citus_add_node('127.0.0.1', %d);
	SELECT citus_add_node('127.0.0.1', %d);}, $coord->port, $w1->port, $w2->port));
for my $name (qw(coord w1 w2))
{
	$group{$name} = $node{$name}->safe_psql($db, 'SELECT groupid FROM pg_dist_local_group');
}
note("groups: coord $group{coord}, w1 $group{w1}, w2 $group{w2}");
my %node_of_port = map { $node{$_}->port => $_ } keys %node;
# billing's 9 id sequences (8, and the events' outbox billing.event_id_seq
# since issue 17): each node numbers every one of them from its own range
my $nseqs = '9';

sub q_ok
{
	my ($n, $sql) = @_;
	return $n->safe_psql($db, $sql);
}

# the SQLSTATE of a statement that must fail (psql, verbose errors)
sub sqlstate_of
{
	my ($n, $sql) = @_;
	my ($rc, $out, $err) = $n->psql($db, $sql, extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	return $rc == 0 ? 'ok' : $err =~ /ERROR:\s+([0-9A-Z]{5}):/ ? $1 : "no SQLSTATE: $err";
}

# a billing database on one node, the one a single-node user has: created
# on the coordinator (Citus creates the extension on the workers too)
q_ok($coord, 'CREATE EXTENSION billing');
is(q_ok($w1, "SELECT extversion FROM pg_extension WHERE extname = 'billing'"),
	BillingTest::extversion(), 'CREATE EXTENSION billing reached the workers');

my @tenants = map { sprintf('t%02d', $_) } 1 .. 40;
my $tlist = join(',', map { "'$_'" } @tenants);
q_ok($coord, qq{
	SELECT billing_account_create(t) FROM unnest(ARRAY[$tlist]) t;
	SELECT billing_credit(t, 1000, t || '-seed') FROM unnest(ARRAY[$tlist]) t;
	SELECT billing_hold(t, 1, t || '-hold') FROM unnest(ARRAY[$tlist]) t;
	SELECT billing_api_key_create(t, 'k-' || t, budget => 100000, budget_period => 'month')
	  FROM unnest(ARRAY[$tlist]) t;
	SELECT billing_job_submit(t, 'translate', t || '-job', 2) FROM unnest(ARRAY[$tlist]) t;
	SELECT billing_try_deduct('t07', 1000000, 't07-rejected');
	SELECT billing_grant('t08', 5, 't08-promo', expires_at => now() + interval '30 days');
	SELECT billing_price_set('m1', input_per_1m => 1, output_per_1m => 2);
	SELECT billing_price_override_set('t09', 'm1', input_per_1m => 0.5, output_per_1m => 1);});

############################################################################
# load: clients charging through the coordinator, each acknowledgement logged
############################################################################

my $W = PostgreSQL::Test::Utils::tempdir('citus_load');
my @clients;

# start N clients of a phase; KIND single (one charge per call) or pair (a
# transaction charging a tenant on each worker: PAIRS = [[ta, tb], ...])
sub start_load
{
	my ($phase, $n, $kind, $pairs) = @_;
	unlink "$W/stop-$phase";
	for my $c (1 .. $n)
	{
		push @clients, BillingTest::spawn(sub {
			my $s = BillingTest::Session->new($coord, $db, timeout => 120);
			open my $log, '>', "$W/$phase-$c.log" or die $!;
			$log->autoflush(1);
			my $i = 0;
			until (-e "$W/stop-$phase")
			{
				$i++;
				my $trace = "$phase-$c-$i";
				my $sql;
				if ($kind eq 'pair')
				{
					my ($ta, $tb) = @{ $pairs->[ int(rand(@$pairs)) ] };
					$sql = "BEGIN \\; SELECT entry_id FROM billing_deduct('$ta', 0.000001, '$trace-a')"
					  . " \\; SELECT entry_id FROM billing_deduct('$tb', 0.000001, '$trace-b') \\; COMMIT";
				}
				else
				{
					# half the clients through the charge engine of the
					# tenant's node, half through billing_deduct
					my $t = $tenants[ int(rand(@tenants)) ];
					my $fn = $c % 2 ? 'billing_charge' : 'billing_deduct';
					$sql = "SELECT entry_id FROM $fn('$t', 0.000001, '$trace', api_key => 'k-$t')";
				}
				my $r = $s->call($sql);
				print $log "$r->{status} $trace " . ($r->{sqlstate} // '') . "\n";
				usleep(100_000) if $r->{status} ne 'ok';
			}
			$s->close;
		});
	}
}

# the acknowledged calls of a phase so far
sub acked
{
	my ($phase) = @_;
	my $n = 0;
	for my $f (glob("$W/$phase-*.log"))
	{
		open my $fh, '<', $f or next;
		$n += grep { /^ok / } <$fh>;
	}
	return $n;
}

sub wait_acked
{
	my ($phase, $n, $what) = @_;
	my $target = acked($phase) + $n;
	ok(BillingTest::wait_until(180, sub { acked($phase) >= $target }),
		"$phase: $n more charges acknowledged $what");
}

sub stop_load
{
	my ($phase) = @_;
	open my $fh, '>', "$W/stop-$phase" or die $!;
	close $fh;
	is(BillingTest::reap($_), 0, "$phase: client exited cleanly") for @clients;
	@clients = ();
}

# what the clients of a phase saw: status => [traces], and the SQLSTATEs of errors
sub outcomes
{
	my ($phase) = @_;
	my (%by, %codes);
	for my $f (glob("$W/$phase-*.log"))
	{
		open my $fh, '<', $f or die $!;
		while (<$fh>)
		{
			my ($status, $trace, $code) = split;
			push @{ $by{$status} }, $trace;
			# a call with no SQLSTATE (a lost connection, a timeout) counts
			# as its status, so that the checks below see it
			$codes{ defined $code && $code ne '' ? $code : "($status)" }++ if $status ne 'ok';
		}
	}
	note("$phase: " . join(', ', map { "$_ " . scalar(@{ $by{$_} }) } sort keys %by)
		  . (%codes ? '; failures by SQLSTATE: ' . join(', ', map { "$_ $codes{$_}" } sort keys %codes) : ''));
	return (\%by, \%codes);
}

# the checks after every phase
sub ledger_checks
{
	my ($phase, $pair) = @_;
	my ($by, $codes) = outcomes($phase);
	my %in;
	$in{$_}++ for split /\n/, q_ok($coord,
		"SELECT trace_id FROM billing.entries WHERE trace_id LIKE '$phase-%'");
	my @dup = grep { $in{$_} > 1 } keys %in;
	is(scalar(@dup), 0, "$phase: no trace charged twice");
	my (@missing, @ghost);
	for my $t (@{ $by->{ok} // [] })
	{
		for my $x ($pair ? ("$t-a", "$t-b") : ($t))
		{
			push @missing, $x unless $in{$x};
		}
	}
	for my $t (@{ $by->{error} // [] })
	{
		for my $x ($pair ? ("$t-a", "$t-b") : ($t))
		{
			push @ghost, $x if $in{$x};
		}
	}
	ok(@{ $by->{ok} // [] } > 0, "$phase: charges were acknowledged (" . scalar(@{ $by->{ok} // [] }) . ')');
	# the odd clients charge through billing_charge (start_load)
	my $engine_ok = grep { (split /-/)[1] % 2 } @{ $by->{ok} // [] };
	ok($engine_ok > 0, "$phase: charges through billing_charge were acknowledged ($engine_ok)") unless $pair;
	# single charges fail only as documented for a migration or a move:
	# retryable, nothing charged (no ZB111 "outcome unknown", no internal error)
	is(join(' ', grep { $_ ne '40001' && $_ ne 'ZB100' } sort keys %$codes), '',
		"$phase: every failed call failed with 40001 or ZB100") unless $pair;
	is(scalar(@missing), 0, "$phase: every acknowledged charge is in the ledger")
	  or diag("missing: @missing[0 .. ($#missing < 9 ? $#missing : 9)]");
	is(scalar(@ghost), 0, "$phase: no call that failed left a charge")
	  or diag("committed although refused: @ghost[0 .. ($#ghost < 9 ? $#ghost : 9)]");
	if ($pair)
	{
		my %half;
		for (keys %in)
		{
			my ($base) = /^(.*)-[ab]$/;
			$half{$base}++;
		}
		is(scalar(grep { $half{$_} != 2 } keys %half), 0,
			"$phase: no transaction committed one of its two charges");
	}
	shells_empty($phase);
	is(q_ok($coord, 'SELECT count(*) FROM billing_verify()'), '0',
		"$phase: billing_verify() finds nothing (balance = SUM and every other check, every node)");
}

# no row in a local (shell) table of billing's Citus tables on any node
sub shells_empty
{
	my ($what) = @_;
	for my $name (sort keys %node)
	{
		is(q_ok($node{$name}, q{SELECT coalesce(sum(billing.shell_rows(t)), 0)
		    FROM unnest(billing.tenant_tables() || ARRAY['billing.prices', 'billing.tenant_scopes']::regclass[]) t}),
			'0', "$what: no row in the local tables of $name");
	}
}

sub node_of_tenant
{
	my ($t) = @_;
	my $port = q_ok($coord, qq{SELECT nodeport FROM pg_dist_shard_placement
		WHERE shardid = get_shard_id_for_distribution_column('billing.accounts', '$t')});
	return $node_of_port{$port};
}

# move the shard group of tenant $t from node $from to node $to; the
# previous move's source shards are dropped later (deferred), and a move of
# the same shards refuses to start while they exist.  Returns psql's
# (rc, stdout, stderr) of the move.
sub move_group
{
	my ($t, $from, $to, $mode, $what) = @_;
	ok(BillingTest::wait_until(120, sub {
			$coord->psql($db, 'CALL citus_cleanup_orphaned_resources()');
			q_ok($coord, 'SELECT count(*) FROM pg_dist_cleanup') eq '0';
		}, 0.5), "no orphaned shards before the $what");
	return $coord->psql($db, sprintf(
			q{SELECT citus_move_shard_placement(%s, '127.0.0.1', %d, '127.0.0.1', %d, shard_transfer_mode => '%s')},
			q_ok($coord, "SELECT get_shard_id_for_distribution_column('billing.accounts', '$t')"),
			$node{$from}->port, $node{$to}->port, $mode));
}

############################################################################
# 1. migration under load
############################################################################

start_load('mig', 4, 'single');
wait_acked('mig', 40, 'before the distribution');
my $t0 = time;
my $dist = q_ok($coord, 'SELECT billing.citus_distribute(shard_count => 8)');
note(sprintf('billing.citus_distribute() took %.1f s under load: %s', time - $t0, $dist));
like($dist, qr/"functions": \d+/, 'billing.citus_distribute() under load');
# every billing_* function with a tenant_id argument is delegated, as many
# as docs/scaling.md says
{
	my ($nfun) = $dist =~ /"functions": (\d+)/;
	my $delegated = q_ok($coord, q{SELECT count(*) FROM pg_dist_object o JOIN pg_proc p ON o.classid = 'pg_proc'::regclass AND o.objid = p.oid
		WHERE p.proname LIKE 'billing\_%' AND o.distribution_argument_index IS NOT NULL AND o.force_delegation});
	my ($documented) = slurp_file("$BillingTest::REPO/docs/scaling.md") =~ /\| the (\d+) `billing_\*` functions with a `tenant_id` argument/;
	is(($nfun // '') . ' ' . $delegated, ($documented // '?') . ' ' . ($documented // '?'),
		"the $documented functions docs/scaling.md names are delegated, with the tenant as distribution argument");
}
wait_acked('mig', 40, 'after the distribution');
stop_load('mig');
ledger_checks('mig');
is(q_ok($coord, q{SELECT count(*) FROM pg_dist_partition
		WHERE logicalrelid = ANY (billing.tenant_tables()) AND partmethod = 'h'}),
	'12', 'the twelve tenant tables are distributed by hash');
is(q_ok($coord, q{SELECT count(*) FROM pg_dist_partition
		WHERE logicalrelid IN ('billing.prices'::regclass, 'billing.tenant_scopes'::regclass) AND partmethod = 'n'}),
	'2', 'prices and tenant scopes are reference tables');
# a charge acknowledged before the distribution, replayed through the coordinator
my ($rtrace) = map { /^ok (mig-\d+-1) /m ? $1 : () } map { slurp_file($_) } glob("$W/mig-*.log");
my ($rtenant) = q_ok($coord, "SELECT tenant_id FROM billing.entries WHERE trace_id = '$rtrace'");
is(q_ok($coord, "SELECT replayed FROM billing_deduct('$rtenant', 0.000001, '$rtrace', api_key => 'k-$rtenant')"),
	't', "a charge acknowledged before the distribution replays on the tenant's node");
is(q_ok($coord, "SELECT count(*) FROM billing.entries WHERE trace_id = '$rtrace'"), '1', 'and is still charged once');
is(q_ok($coord, "SELECT status || ' ' || replayed FROM billing_try_deduct('t07', 1000000, 't07-rejected')"),
	'rejected true', 'a rejection recorded before the migration replays as rejected');
is(q_ok($coord, "SELECT count(*) FROM billing.holds WHERE trace_id LIKE '%-hold' AND status = 'open'"),
	'40', 'the open holds moved with their tenants');
like(q_ok($coord, "SELECT amount FROM billing_deduct_usage('t09', 'm1', 1000000, 0, 't09-usage')"),
	qr/^-0\.500000$/, "a tenant's own price (an override) after the migration");
isnt(node_of_tenant('t01'), 'coord', 'tenants live on the workers');

############################################################################
# 2. shard moves under load
############################################################################

start_load('move', 4, 'single');
wait_acked('move', 40, 'before the first move');
for my $mode (qw(block_writes force_logical))
{
	my $from = node_of_tenant('t01');
	my $to = $from eq 'w1' ? 'w2' : 'w1';
	$t0 = time;
	my ($rc, $out, $err) = move_group('t01', $from, $to, $mode, "$mode move");
	is($rc, 0, "t01's shard group moved from $from to $to ($mode) under load") or diag($err);
	note(sprintf('the %s move took %.1f s', $mode, time - $t0));
	is(node_of_tenant('t01'), $to, "t01 is on $to now");
	wait_acked('move', 40, "after the $mode move");
}
stop_load('move');
ledger_checks('move');

############################################################################
# 3. two-phase commit: a worker stopped and started while transactions
#    charge a tenant on each worker
############################################################################

my (@on1, @on2);
for my $t (@tenants)
{
	my $n = node_of_tenant($t);
	push @on1, $t if $n eq 'w1';
	push @on2, $t if $n eq 'w2';
}
ok(@on1 && @on2, 'tenants on both workers (' . scalar(@on1) . ' and ' . scalar(@on2) . ')');
my @pairs = map { [ $on1[ $_ % @on1 ], $on2[ $_ % @on2 ] ] } 0 .. 9;
# Citus's maintenance recovers two-phase commits in the background, which
# deletes their records: off on the coordinator until the pairs have left
# some (with none left from the parts before), then on again before w2
# stops, so that what w2's stop leaves prepared is recovered as it would be
$coord->append_conf('postgresql.conf', 'citus.recover_2pc_interval = -1');
$coord->reload;
my $records = sub { q_ok($coord, "SELECT count(*) FROM pg_dist_transaction WHERE groupid = $group{w2}") };
ok(BillingTest::wait_until(120, sub {
		$coord->psql($db, 'SELECT recover_prepared_transactions()');
		$records->() eq '0';
	}, 0.5), 'no record of a two-phase commit with w2 before the pairs');
start_load('pair', 4, 'pair', \@pairs);
wait_acked('pair', 20, 'before the stop');
ok(BillingTest::wait_until(120, sub { $records->() > 0 }),
	"the pairs' commits are two-phase, with w2 too (" . $records->() . ' records in pg_dist_transaction)');
$coord->append_conf('postgresql.conf', 'citus.recover_2pc_interval = 60000');
$coord->reload;
my %w2_down = (from => log_sizes());
$w2->stop('immediate');
usleep(1_000_000);
$w2->start;
$w2_down{to} = log_sizes();
wait_acked('pair', 20, 'after the restart');
stop_load('pair');
# Citus commits (or rolls back) what was prepared when the node went away
ok(BillingTest::wait_until(120, sub {
		$coord->psql($db, 'SELECT recover_prepared_transactions()');
		q_ok($w1, 'SELECT count(*) FROM pg_prepared_xacts') eq '0'
		  && q_ok($w2, 'SELECT count(*) FROM pg_prepared_xacts') eq '0';
	}, 0.5), 'no prepared transaction left after recover_prepared_transactions()');
ledger_checks('pair', 1);

############################################################################
# 4. the rest of the API through the coordinator, per-node work, refusals
############################################################################

# a batch across both workers (two-phase commit), and its replay
my $batch = "SELECT string_agg(status || ' ' || replayed, ',' ORDER BY trace_id) FROM billing_deduct_many("
  . "ARRAY['$on1[0]', '$on2[0]', '$on1[1]'], ARRAY[0.5, 0.5, 0.5], ARRAY['many-1', 'many-2', 'many-3'])";
is(q_ok($coord, $batch), 'committed false,committed false,committed false', 'billing_deduct_many across both workers');
is(q_ok($coord, $batch), 'committed true,committed true,committed true', 'its replay returns the three entries');

# holds: capture and release through the coordinator; expiry by the worker
# of the tenant's node
q_ok($coord, "SELECT billing_hold('t02', 2, 't02-h1')");
is(q_ok($coord, "SELECT hold_status FROM billing_capture('t02', 't02-h1', 0.5, 't02-c1')"), 'open',
	'a partial capture');
is(q_ok($coord, "SELECT status FROM billing_release('t02', 't02-h1', 't02-r1')"), 'released',
	'the rest released');
q_ok($coord, "SELECT billing_hold('t03', 1, 't03-short', expires_in => '1 second')");
ok(BillingTest::wait_until(120, sub {
		q_ok($coord, "SELECT status FROM billing.holds WHERE tenant_id = 't03' AND trace_id = 't03-short'")
		  eq 'expired' }), "the tenant's node expired its hold (its worker's maintenance)");

# grants and refunds
is(q_ok($coord, "SELECT granted FROM billing_grant('t04', 5, 't04-g', expires_at => now() + interval '1 day')"),
	'5.000000', 'a grant');
q_ok($coord, "SELECT billing_deduct('t04', 2, 't04-c')");
is(q_ok($coord, "SELECT refundable FROM billing_refund('t04', 't04-c', 0.5, 't04-r')"), '1.500000',
	'a refund of part of a charge');

# a job's lifecycle: submit, targeted claim, complete (capture and state together)
my $job = q_ok($coord, "SELECT job_id FROM billing_job_submit('t05', 'urgent', 't05-job2', 3)");
is(q_ok($coord, "SELECT job_id || ' ' || state FROM billing_job_claim('wk', ARRAY['urgent'], tenant_id => 't05')"),
	"$job processing", 'a claim for one tenant');
is(q_ok($coord, "SELECT state FROM billing_job_complete('t05', $job, 2.5)"), 'completed',
	'the job completed with its charge');
is(q_ok($coord, "SELECT -amount FROM billing.ledger WHERE trace_id = 'job:$job:charge'"), '2.500000',
	'its charge is in the ledger');
# untargeted claims run per node (each worker claims its own tenants' jobs);
# a lease that expires is rescued by the worker of the job's node
my $claimed = 0;
$claimed += q_ok($_, "SELECT count(*) FROM billing_job_claim('wk', max_jobs => 100, lease => '1 second')")
  for ($w1, $w2);
is(q_ok($coord, "SELECT count(*) FROM billing.jobs WHERE state = 'queued' AND run_at <= now()"), '0',
	"the workers' untargeted claims took every due job ($claimed)");
ok(BillingTest::wait_until(120, sub {
		q_ok($coord, "SELECT count(*) FROM billing.jobs WHERE state = 'processing'") eq '0' }),
	"every expired lease was rescued by its node's worker");

# billing_verify() gathers what every node finds: an account whose cached
# balance no longer matches its entries (changed behind billing's back)
q_ok($coord, "UPDATE billing.accounts SET balance_micros = balance_micros + 1 WHERE tenant_id = 't10'");
is(q_ok($coord, q{SELECT tenant_id || ': ' || problem FROM billing_verify()}),
	't10: cached balance differs from SUM(entries)', 'billing_verify() reports a problem found on a worker');
q_ok($coord, "UPDATE billing.accounts SET balance_micros = balance_micros - 1 WHERE tenant_id = 't10'");

# refusals
is(sqlstate_of($coord, q{DO $$ DECLARE t text := 't01'; BEGIN PERFORM billing_deduct(t, 1, 'nd-1'); END $$}),
	'ZB100', 'a call Citus does not delegate (a PL/pgSQL variable) on a node without the tenant: ZB100');
is(sqlstate_of($coord, "SELECT * FROM billing_job_claim('wk')"), 'ZB103',
	'an untargeted claim on the coordinator (no shards): ZB103');
is(sqlstate_of($coord, "SELECT * FROM billing_deduct(NULL, 1, 'null-1')"), 'ZB015',
	'a NULL tenant through the coordinator: ZB015, no crash');
is(sqlstate_of($coord, "UPDATE billing.entries SET amount_micros = 0 WHERE tenant_id = 't01'"), 'ZB020',
	"UPDATE of the ledger: refused by the shards' trigger");
is(sqlstate_of($coord, 'TRUNCATE billing.entries'), 'ZB020', "TRUNCATE of the ledger: refused on the shards");
# the charge engine: Citus runs billing_charge on the tenant's node, whose
# engine applies it there; a form Citus does not delegate is refused
# (an entry id tells which node wrote it: group g numbers from g * 2^48 + 1)
for my $t ($on1[0], $on2[0])
{
	my $node = node_of_tenant($t);
	my $charged = q_ok($coord, "SELECT entry_id || ' ' || replayed FROM billing_charge('$t', 1, 'engine-$t')");
	like($charged, qr/^\d+ false$/, "billing_charge through the coordinator, tenant $t on $node: charged");
	is(q_ok($coord, "SELECT entry_id || ' ' || replayed FROM billing_charge('$t', 1, 'engine-$t')"),
		($charged =~ s/ false$/ true/r), 'its retry replays the same entry');
	is(q_ok($coord, "SELECT count(*) || ' ' || max(entry_id >> 48) FROM billing.entries WHERE trace_id = 'engine-$t'"),
		"1 $group{$node}", "the entry is there once, written on $node");
}
is(q_ok($w1, "SELECT replayed FROM billing_charge('$on2[0]', 1, 'engine-$on2[0]')"), 't',
	'a call on the other worker is delegated too (replayed on the tenant\'s node)');
{
	my ($rc, $out, $err) = $coord->psql($db, "BEGIN; SELECT * FROM billing_charge('$on1[0]', 1, 'engine-blk'); COMMIT",
		extra_params => [ '-v', 'VERBOSITY=verbose' ]);
	like($err, qr/ERROR:\s+ZB110:/, 'billing_charge in a transaction block through the coordinator: ZB110, as on a single node');
	my $port = $node{ node_of_tenant($on1[0]) }->port;
	like($err, qr/while executing command on 127\.0\.0\.1:$port/, "raised on the tenant's node (Citus sent the call into the block there)");
}
is(sqlstate_of($coord, qq{DO \$\$ DECLARE t text := '$on1[0]'; BEGIN PERFORM billing_charge(t, 1, 'engine-nd'); END \$\$}),
	'ZB100', 'billing_charge not delegated (a PL/pgSQL variable) on a node without the tenant: ZB100');
is(q_ok($coord, "SELECT count(*) FROM billing.entries WHERE trace_id IN ('engine-blk', 'engine-nd')"), '0',
	'a refused billing_charge charged nothing');

# a charge queued for the engine of the tenant's node while the tenant's
# shard group moves away: nothing charged, 40001 (retry), and the retry is
# charged on the new node.  The engine of w1 is held (the test gate) until
# the move is done.
my $mt = $on1[-1];
is(node_of_tenant($mt), 'w1', "$mt is on w1");
my $mgate = BillingTest::Session->new($w1, $db);
is($mgate->call('SELECT billing.engine_test_gate(true)')->{status}, 'ok', "w1's engine is held");
my $mfile = "$W/engine-moved.result";
my $mcaller = BillingTest::spawn(sub {
	my $s = BillingTest::Session->new($coord, $db, timeout => 300);
	my $r = $s->call("SELECT entry_id FROM billing_charge('$mt', 1, 'engine-moved')");
	BillingTest::write_atomic($mfile, join(' ', $r->{status}, $r->{sqlstate} // '-'));
	$s->close;
});
ok(BillingTest::wait_until(180, sub {
		q_ok($w1, 'SELECT coalesce(sum(queued), 0) FROM billing_engine_status()') ne '0' }),
	"the charge of $mt is queued for w1's engine");
{
	my ($rc, $out, $err) = move_group($mt, 'w1', 'w2', 'block_writes', 'move');
	is($rc, 0, "${mt}'s shard group moved to w2 while its charge was queued on w1") or diag($err);
}
ok(!-e $mfile, 'the caller still waits');
is($mgate->call('SELECT billing.engine_test_gate(false)')->{status}, 'ok', "w1's engine goes on");
is(BillingTest::reap($mcaller), 0, 'the caller returned');
is(slurp_file($mfile), 'error 40001', 'the queued charge failed with 40001 (its shard moved; retry)');
is(q_ok($coord, "SELECT count(*) FROM billing.entries WHERE trace_id = 'engine-moved'"), '0', 'nothing was charged');
is(q_ok($coord, "SELECT replayed FROM billing_charge('$mt', 1, 'engine-moved')"), 'f', 'the retry is charged');
is(q_ok($coord, "SELECT count(*) || ' ' || max(entry_id >> 48) FROM billing.entries WHERE trace_id = 'engine-moved'"),
	"1 $group{w2}", '... once, on w2');
$mgate->close;
my %w1_down = (from => log_sizes());
$w1->stop('fast');
is(sqlstate_of($coord, 'SELECT * FROM billing_verify()'), 'ZB104',
	'billing_verify() with a worker down: ZB104, not a clean audit');
$w1->start;
$w1_down{to} = log_sizes();

############################################################################
# 4b. a node that held billing data of its own joins the cluster: nothing
#     reads or writes its old rows, billing_verify() reports them, and
#     billing.citus_clear_local_rows() removes them on that node only
############################################################################

$node{old} = BillingTest::node('old', libraries => 'citus,billing', database => $db,
	redis => $redis, conf => $conf);
my $old = $node{old};
q_ok($old, q{
	SELECT billing_account_create('t' || i) FROM generate_series(1, 5) i;
	SELECT billing_credit('t' || i, 5, 'old-' || i) FROM generate_series(1, 5) i;
	CREATE EXTENSION citus;});
q_ok($coord, sprintf(q{SELECT citus_add_node('127.0.0.1', %d)}, $old->port));
$group{old} = q_ok($old, 'SELECT groupid FROM pg_dist_local_group');
$node_of_port{ $old->port } = 'old';
like(q_ok($coord, q{SELECT string_agg(problem, '; ') FROM billing_verify() WHERE tenant_id IS NULL}),
	qr/rows left in the local table billing\.entries of node group $group{old}/,
	"billing_verify() reports the joined node's old rows");
my $before = q_ok($coord, "SELECT balance_micros FROM billing.accounts WHERE tenant_id = 't03'");
q_ok($old, "SELECT billing_deduct('t03', 1, 'join-1')");
is(q_ok($coord, "SELECT balance_micros FROM billing.accounts WHERE tenant_id = 't03'"), $before - 1_000_000,
	'a charge made on the joined node went to the tenant (on its node), not to an old row');
is(q_ok($old, "SELECT billing.shell_rows('billing.entries')"), '5', "the joined node's old rows are untouched");
like(q_ok($old, 'SELECT billing.citus_clear_local_rows()'), qr/"billing.entries": 5/,
	'billing.citus_clear_local_rows() on the joined node');
ok(BillingTest::wait_until(120, sub {
		q_ok($old, q{SELECT count(*) FROM pg_sequences WHERE schemaname = 'billing'
			AND min_value = } . "$group{old}::bigint * (1::bigint << 48) + 1") eq $nseqs }),
	"the joined node's maintenance gave it its own id range");

############################################################################
# 4c. billing_deduct_many's items on other nodes call billing_deduct /
#     billing_try_deduct by name, in plans a session keeps: after the API's
#     schema is renamed (the database owner may) and a new one holds
#     functions of those names, the session calls the extension's functions,
#     never the new ones (which would run as the extension's owner)
############################################################################

{
	my $s = BillingTest::Session->new($coord, $db);
	my $many = sub {
		my ($schema, $tag, $mode) = @_;
		return $s->call("SELECT string_agg(status, ',') FROM $schema.billing_deduct_many("
			  . "ARRAY['$on1[0]', '$on2[0]'], ARRAY[0.1, 0.1], ARRAY['rn-$tag-1', 'rn-$tag-2'], on_reject => '$mode')");
	};
	for my $mode (qw(raise record))
	{
		my $r = $many->('public', "before-$mode", $mode);
		is("$r->{status} " . ($r->{rows}[0] // ''), 'ok committed,committed', "4c: a batch on both workers ($mode), its plans kept");
	}
	q_ok($coord, q{
		ALTER SCHEMA public RENAME TO api;
		CREATE SCHEMA public;
		CREATE FUNCTION public.billing_deduct(tenant_id text, amount numeric, trace_id text,
		    description text DEFAULT NULL, metadata jsonb DEFAULT NULL, event_at timestamptz DEFAULT NULL,
		    kind text DEFAULT 'deduct', api_key text DEFAULT NULL)
		  RETURNS billing.entry_result LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'planted billing_deduct ran'; END $$;
		CREATE FUNCTION public.billing_try_deduct(tenant_id text, amount numeric, trace_id text,
		    description text DEFAULT NULL, metadata jsonb DEFAULT NULL, event_at timestamptz DEFAULT NULL,
		    kind text DEFAULT 'deduct', api_key text DEFAULT NULL)
		  RETURNS billing.charge_outcome LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'planted billing_try_deduct ran'; END $$;});
	for my $mode (qw(raise record))
	{
		my $r = $many->('api', "after-$mode", $mode);
		is("$r->{status} " . ($r->{rows}[0] // $r->{message} // ''), 'ok committed,committed',
			"4c: after the rename the same session charges through the extension's functions ($mode)");
	}
	$s->close;
	q_ok($coord, 'DROP SCHEMA public CASCADE; ALTER SCHEMA api RENAME TO public');
	is(q_ok($coord, "SELECT count(*) FROM billing.entries WHERE trace_id LIKE 'rn-after-%'"), '4',
		'4c: the four charges are in the ledger');
}

############################################################################
# 5. the end state
############################################################################

shells_empty('the end');
is(q_ok($coord, 'SELECT count(*) FROM billing_verify()'), '0', 'billing_verify() finds nothing at the end');
is(q_ok($coord, 'SELECT count(*) FROM billing.accounts'), '40', 'every account, once');
for my $name (sort keys %node)
{
	is(q_ok($node{$name}, q{SELECT count(*) FROM pg_sequences WHERE schemaname = 'billing'
		AND min_value = } . "$group{$name}::bigint * (1::bigint << 48) + 1"),
		$nseqs, "$name numbers its ids from its own range (group $group{$name} * 2^48)");
}
# the mirror: each worker pushed its own tenants (a moved tenant's hash is
# final where it is, versions travel with the row)
for my $name (qw(w1 w2))
{
	BillingTest::mirror_converges($node{$name}, $db, $redis, "Redis equals the database for the tenants of $name");
}
is($redis->cli('EXISTS', 'billing:__sync__:' . $group{w1}, 'billing:__sync__:' . $group{w2}), '2',
	'each worker has its own marker in Redis');

# every node's log size now: { name => bytes }
sub log_sizes { return { map { $_ => BillingTest::log_size($node{$_}) } keys %node } }

# background workers that exit with code 1 on purpose: at a fast or
# immediate stop, and Citus's logical replication workers when a shard
# move drops its subscription ("terminating logical replication worker due
# to administrator command"; PostgreSQL 16 and later name them "logical
# replication apply worker", "... tablesync worker", "... parallel apply
# worker", 15 "logical replication worker").
# exits_of: the background workers WHAT (a pattern) that exited with exit
# code 1 in the node's log from byte FROM to byte TO (the end if undef)
sub exits_of
{
	my ($n, $from, $what, $to) = @_;
	my $log = BillingTest::log_since($n, $from);
	$log = substr($log, 0, $to - $from) if defined $to && $to - $from < length $log;
	return $log =~ /background worker "$what" \(PID (\d+)\) exited with exit code 1/g;
}
# any background worker may exit with 1 while a worker node is down (its
# own stop; on the others, Citus' daemons that fail to reach it): from the
# node's stop until its start returned, on every node
for my $name (sort keys %node)
{
	my @allowed = exits_of($node{$name}, 0, 'logical replication (?:apply |tablesync |parallel apply )?worker');
	for my $window (\%w2_down, \%w1_down)
	{
		push @allowed, exits_of($node{$name}, $window->{from}{$name}, '[^"]+', $window->{to}{$name})
		  if defined $window->{from}{$name};
	}
	BillingTest::no_crashes($node{$name}, @allowed);
}
$_->stop for values %node;
note(sprintf('080_citus took %.0f s', time - $started));
done_testing();

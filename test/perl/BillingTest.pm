
=pod

=head1 NAME

BillingTest - what billing's TAP tests need on top of PostgreSQL::Test::Cluster

=head1 SYNOPSIS

  use PostgreSQL::Test::Utils;
  use Test::More;
  use BillingTest;

  my $redis = BillingTest::Redis->new('mirror');
  my $node  = BillingTest::node('main', redis => $redis, database => 'app');
  $node->safe_psql('app', "SELECT billing_account_create('t1')");
  ok(BillingTest::wait_until(60, sub { BillingTest::mirror_equals($node, 'app', $redis) }),
     'Redis converged');
  BillingTest::no_crashes($node);
  done_testing();

=head1 DESCRIPTION

Nodes are PostgreSQL::Test::Cluster nodes with billing preloaded (unless
C<< preload => 0 >>) and a database with the extension created.  Redis
servers are real redis-server processes on a free loopback port in the
test's temporary directory, run as the test's own OS user.  Waits poll a
condition with a generous bound and report how long it took: a slow machine
makes a test slower, never red.

=cut

package BillingTest;

use strict;
use warnings FATAL => 'all';

use Carp;
use File::Basename qw(dirname);
use File::Spec;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

# the repository (test/perl/..)
our $REPO = File::Spec->rel2abs(dirname(__FILE__) . '/../..');

=pod

=head1 FUNCTIONS

=over

=item BillingTest::node(NAME, %params)

Create, configure and start a node.  Parameters:
C<preload> (default 1: shared_preload_libraries = 'billing'),
C<database> (default 'billing_test': created, with the extension unless
C<< extension => 0 >>), C<redis> (a BillingTest::Redis the worker mirrors
into), C<conf> (more postgresql.conf lines), C<start> (default 1).
Commits are not synced to disk (fsync off) unless C<< durable => 1 >>:
a crash of the server processes (kill -9, immediate stop) loses nothing
either way, as the OS keeps what was written.

=cut

sub node
{
	my ($name, %p) = @_;
	my $db = $p{database} // 'billing_test';
	my $node = PostgreSQL::Test::Cluster->new($name);
	$node->init(allows_streaming => $p{allows_streaming} // 0);
	my @conf = (
		"max_connections = 100",
		"log_line_prefix = '%m [%p] '",
		"shared_buffers = 128MB",
		"max_prepared_transactions = 4",
		"fsync = " . ($p{durable} ? 'on' : 'off'));
	if ($p{preload} // 1)
	{
		push @conf, "shared_preload_libraries = 'billing'",
		  "billing.database = '$db'";
	}
	if ($p{redis})
	{
		push @conf, "billing.redis_host = '127.0.0.1'",
		  "billing.redis_port = " . $p{redis}->port;
	}
	push @conf, $p{conf} if defined $p{conf};
	$node->append_conf('postgresql.conf', join("\n", @conf) . "\n");
	return $node if defined $p{start} && !$p{start};
	$node->start;
	if ($db ne 'postgres')
	{
		$node->safe_psql('postgres', "CREATE DATABASE $db");
	}
	$node->safe_psql($db, 'CREATE EXTENSION billing')
	  unless defined $p{extension} && !$p{extension};
	return $node;
}

=item BillingTest::wait_until(SECONDS, CODE [, INTERVAL])

Call CODE every INTERVAL seconds (default 0.1) until it returns true or
SECONDS have passed; returns true if it did.  $BillingTest::waited is the
time the last wait took, in seconds.

=cut

our $waited = 0;

sub wait_until
{
	my ($timeout, $code, $interval) = @_;
	my $start = time;
	$interval //= 0.1;
	while (1)
	{
		if ($code->())
		{
			$waited = time - $start;
			return 1;
		}
		if (time - $start >= $timeout)
		{
			$waited = time - $start;
			return 0;
		}
		usleep(int($interval * 1_000_000));
	}
}

=item BillingTest::query(NODE, DB, SQL)

psql -At output of SQL, or undef (and a diag) if it failed.

=cut

sub query
{
	my ($node, $db, $sql) = @_;
	my ($rc, $out, $err) = $node->psql($db, $sql);
	return $out if $rc == 0;
	diag("query failed: $err") if $ENV{BILLING_TEST_VERBOSE};
	return undef;
}

=item BillingTest::mirror_equals(NODE, DB, REDIS)

True if Redis holds exactly what the database says the mirror must hold:
every tenant hash and API key hash of billing.sync_snapshot(), every field
but synced_at_ms, and the version.  $BillingTest::mirror_db and
$BillingTest::mirror_redis keep both sides of the last comparison.

=cut

our ($mirror_db, $mirror_redis) = ('', '');

my $snapshot_sql = q{
SELECT line FROM (
  SELECT CASE WHEN s.key_id IS NULL THEN format('billing:{%s}', s.tenant_id)
              ELSE format('billing:{%s}:key:%s', s.tenant_id, s.key_id) END
         || ' ' || (SELECT string_agg(p, ' ' ORDER BY p COLLATE "C")
                      FROM (SELECT s.fields[i] || '=' || s.fields[i + 1] AS p
                              FROM generate_series(1, array_length(s.fields, 1), 2) AS i
                             WHERE s.fields[i] <> 'synced_at_ms'
                            UNION ALL
                            SELECT 'version=' || s.version) AS x) AS line
    FROM billing.sync_snapshot(NULL, '', 1000000) AS s) AS l
 ORDER BY line COLLATE "C"};

my $dump_lua = q{local out = {}
for _, k in ipairs(KEYS) do
  local h = redis.call("HGETALL", k)
  local p = {}
  for i = 1, #h, 2 do
    if h[i] ~= "synced_at_ms" then p[#p + 1] = h[i] .. "=" .. h[i + 1] end
  end
  table.sort(p)
  out[#out + 1] = k .. " " .. table.concat(p, " ")
end
return out};

sub mirror_equals
{
	my ($node, $db, $redis) = @_;
	$mirror_redis = '';
	$mirror_db = query($node, $db, $snapshot_sql);
	return 0 unless defined $mirror_db;
	my @keys = map { (split / /, $_, 2)[0] } grep { length } split /\n/, $mirror_db;
	my ($out, $ok) = $redis->cli_ok('--raw', 'EVAL', $dump_lua, scalar(@keys), @keys);
	return 0 unless $ok;
	$mirror_redis = $out;
	return $mirror_db eq $mirror_redis;
}

=item BillingTest::no_crashes(NODE [, PIDS...])

A test: the node's server log shows no process that died by a signal or an
exception or exited with a non-zero code, and no PANIC, except the given
PIDs (processes the test killed or terminated on purpose) and background
workers that exited because their database did not exist yet (billing's
worker starts with the server, before the test's CREATE DATABASE, logs
C<FATAL: database "..." does not exist> and is restarted).

=cut

sub no_crashes
{
	my ($node, @allowed) = @_;
	my %allowed = map { $_ => 1 } @allowed;
	my $log = slurp_logs($node);
	$allowed{$1} = 1 while $log =~ /\[(\d+)\] FATAL:  database "[^"\n]*" does not exist$/mg;
	my @bad;
	for my $line (split /\n/, $log)
	{
		if ($line =~ /\(PID (\d+)\) (?:was terminated by (?:signal|exception)|exited with exit code)/)
		{
			push @bad, $line unless $allowed{$1};
		}
		elsif ($line =~ /PANIC:|terminated by signal|Segmentation fault/)
		{
			push @bad, $line;
		}
	}
	is(join("\n", @bad), '', $node->name . ': no crash in the server log'
		  . (@allowed ? ' but the ' . scalar(@allowed) . ' the test caused' : ''));
	note($node->name . ": processes the test killed or terminated: @allowed") if @allowed;
}

# the node's current log and the rotated ones before it
sub slurp_logs
{
	my ($node) = @_;
	my $text = '';
	my $base = $node->{_logfile_base};
	for my $f (sort glob("$base*.log"))
	{
		$text .= slurp_file($f);
	}
	return $text;
}

=item BillingTest::catalog(NODE, DB)

The definition of every object of the extension, one line per fact
(test/catalog.sql), for comparing two databases.

=cut

sub catalog
{
	my ($node, $db) = @_;
	return $node->safe_psql($db, slurp_file("$REPO/test/catalog.sql"));
}

=item BillingTest::extversion()

The default_version of billing.control in the work tree.

=cut

sub extversion
{
	my ($v) = slurp_file("$REPO/billing.control") =~ /^default_version\s*=\s*'([^']+)'/m;
	return $v;
}

=back

=cut

package BillingTest::Redis;

use strict;
use warnings FATAL => 'all';

use Carp;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

=pod

=head1 BillingTest::Redis

  my $r = BillingTest::Redis->new('name');   # started
  $r->port; $r->pid;
  my $out = $r->cli('GET', 'k');             # redis-cli --raw output (dies on failure)
  my ($out, $ok) = $r->cli_ok(...);          # no die
  $r->stop; $r->start; $r->kill9; $r->restart;
  $r->pause; $r->resume;                     # SIGSTOP / SIGCONT

A real redis-server on 127.0.0.1 and a free port, persistence off, its
directory and log under the test's tmp_check.  Stopped at the end of the
test (END block).

=cut

my @all;

sub new
{
	my ($class, $name, %p) = @_;
	my $self = bless {
		name => $name,
		port => $p{port} // PostgreSQL::Test::Cluster::get_free_port(),
		dir  => PostgreSQL::Test::Utils::tempdir("redis_$name"),
		extra => $p{args} // [],
	}, $class;
	push @all, $self;
	$self->start unless defined $p{start} && !$p{start};
	return $self;
}

sub port { $_[0]->{port} }
sub pid  { $_[0]->{pid} }
sub logfile { $_[0]->{dir} . '/redis.log' }

sub start
{
	my ($self) = @_;
	my @cmd = (
		'redis-server', '--bind', '127.0.0.1', '--port', $self->{port},
		'--dir', $self->{dir}, '--save', '', '--appendonly', 'no',
		'--daemonize', 'yes', '--pidfile', "$self->{dir}/redis.pid",
		'--logfile', $self->logfile, @{ $self->{extra} });
	unlink "$self->{dir}/redis.pid";
	IPC::Run::run(\@cmd) or croak "redis-server failed to start: see " . $self->logfile;
	my $ok = BillingTest::wait_until(60, sub {
		my ($out, $ok) = $self->cli_ok('PING');
		return $ok && $out eq 'PONG' && -s "$self->{dir}/redis.pid";
	});
	croak "redis-server on port $self->{port} did not answer" unless $ok;
	chomp(my $pid = PostgreSQL::Test::Utils::slurp_file("$self->{dir}/redis.pid"));
	$self->{pid} = $pid;
	return $self;
}

sub running
{
	my ($self) = @_;
	return $self->{pid} && kill(0, $self->{pid});
}

sub _wait_gone
{
	my ($self) = @_;
	BillingTest::wait_until(60, sub { !$self->running })
	  or croak "redis-server $self->{pid} did not exit";
	$self->{pid} = undef;
}

sub stop
{
	my ($self) = @_;
	return unless $self->running;
	kill 'CONT', $self->{pid};
	$self->cli_ok('SHUTDOWN', 'NOSAVE');
	kill 'TERM', $self->{pid} if $self->running;
	$self->_wait_gone;
}

sub kill9
{
	my ($self) = @_;
	return unless $self->running;
	kill 'KILL', $self->{pid};
	$self->_wait_gone;
}

sub restart
{
	my ($self) = @_;
	$self->stop;
	$self->start;
}

sub pause  { kill 'STOP', $_[0]->{pid} }
sub resume { kill 'CONT', $_[0]->{pid} }

# (output, success) of redis-cli --raw ARGS
sub cli_ok
{
	my ($self, @args) = @_;
	my ($out, $err) = ('', '');
	unshift @args, '--raw' unless grep { $_ eq '--raw' } @args;
	my $ok = IPC::Run::run(
		[ 'redis-cli', '-h', '127.0.0.1', '-p', $self->{port}, @args ],
		'<', \'', '>', \$out, '2>', \$err,
		IPC::Run::timeout(60));
	chomp $out;
	# redis-cli exits 0 on an error reply; report those as failures too
	$ok = 0 if $out =~ /^(ERR|WRONGTYPE|NOSCRIPT|BUSY|LOADING|READONLY|MISCONF|OOM|BADARGS)\b/;
	return ($out, $ok ? 1 : 0);
}

sub cli
{
	my ($self, @args) = @_;
	my ($out, $ok) = $self->cli_ok(@args);
	croak "redis-cli @args failed: $out" unless $ok;
	return $out;
}

END
{
	my $rc = $?;
	for my $r (@all)
	{
		eval { $r->stop };
	}
	$? = $rc;
}

1;

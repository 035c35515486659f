
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
makes a test slower, never red.  Clients that must know exactly which calls
the server acknowledged (across crashes and restarts) use
BillingTest::Session; background clients and pollers run in child processes
(BillingTest::spawn) that report through files.

=cut

package BillingTest;

use strict;
use warnings FATAL => 'all';

use Carp;
use File::Basename qw(dirname);
use File::Spec;
use IPC::Run ();
use BillingMirror;
use POSIX ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

# the repository (test/perl/..)
our $REPO = File::Spec->rel2abs(dirname(__FILE__) . '/../..');

=pod

=head1 PORTS

Nodes and Redis servers take their TCP ports from
C<PostgreSQL::Test::Cluster::get_free_port()>: by default a free port in
10200-32767, reserved in the directory C<PG_TEST_PORT_DIR> (test/run.sh
gives every run on the machine the same one).  With C<BILLING_PORT_BASE=B>
in the environment (test/matrix.sh sets it for a run inside a chroot, whose
reservation directory is its own) it is a free port in B+100 .. B+999
instead, reserved the same way, so that runs in different chroots and a
native run never pick the same port.

=cut

if (my $base = $ENV{BILLING_PORT_BASE})
{
	croak "BILLING_PORT_BASE must be a number from 1024 to 64535"
	  unless $base =~ /^[0-9]+$/ && $base >= 1024 && $base <= 64535;
	my ($first, $count) = ($base + 100, 900);
	my $next = $first + int(rand($count));
	no warnings 'redefine';
	*PostgreSQL::Test::Cluster::get_free_port = sub {
		for (1 .. $count)
		{
			my $port = $next;
			$next = $next + 1 < $first + $count ? $next + 1 : $first;
			next if grep { $_->port == $port } @PostgreSQL::Test::Cluster::all_nodes;
			next unless PostgreSQL::Test::Cluster::can_bind('127.0.0.1', $port);
			next unless PostgreSQL::Test::Cluster::_reserve_port($port);
			note("port $port (BILLING_PORT_BASE=$base)");
			return $port;
		}
		croak "no free port in $first .. " . ($first + $count - 1) . " (BILLING_PORT_BASE=$base)";
	};
}

=pod

=head1 FUNCTIONS

=over

=item BillingTest::node(NAME, %params)

Create, configure and start a node.  Parameters:
C<preload> (default 1: shared_preload_libraries = 'billing'),
C<libraries> (the shared_preload_libraries of a preloaded node, default
'billing'; 'citus,billing' for a Citus node: Citus must come first),
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
		push @conf, "shared_preload_libraries = '" . ($p{libraries} // 'billing') . "'",
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

=item BillingTest::mirror_equals(NODE, DB, REDIS [, SETUP])

True if Redis holds exactly what the database says the mirror must hold
(SETUP: SQL run first in the same session, e.g. SET commands):
every tenant hash and API key hash of billing.sync_snapshot(), every field
but synced_at_ms, and the version; the counters of a day, a month or an API
key's budget period whose reset time in Redis has passed count as equal when
the database's are 0, as for the worker's check (BillingMirror).  $BillingTest::mirror_db and
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
	my ($node, $db, $redis, $setup) = @_;
	$mirror_redis = '';
	$mirror_db = query($node, $db, ($setup // '') . $snapshot_sql);
	return 0 unless defined $mirror_db;
	my @keys = map { (split / /, $_, 2)[0] } grep { length } split /\n/, $mirror_db;
	my ($out, $ok) = $redis->cli_ok('--raw', 'EVAL', $dump_lua, scalar(@keys), @keys);
	return 0 unless $ok;
	# a day or month that ended since the push is not drift (BillingMirror)
	$mirror_redis = BillingMirror::settle_ended_periods($mirror_db, $out);
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

=item BillingTest::mirror_converges(NODE, DB, REDIS, NAME [, SECONDS])

A test: wait (default bound 120 s) until mirror_equals(NODE, DB, REDIS);
passes as "NAME (converged in N ms)", or fails and shows the lines that
differ.

=cut

sub mirror_converges
{
	my ($node, $db, $redis, $name, $timeout) = @_;
	my $ok = wait_until($timeout // 120, sub { mirror_equals($node, $db, $redis) });
	my $ms = int($waited * 1000);
	if ($ok)
	{
		pass("$name (converged in $ms ms)");
		return 1;
	}
	fail("$name (not converged after $ms ms)");
	diag("database (<) vs Redis (>), first lines that differ:\n" . mirror_diff());
	return 0;
}

=item BillingTest::mirror_diff()

The lines of the last mirror_equals comparison found on one side only:
"< line" in the database, "> line" in Redis (at most 20).

=cut

sub mirror_diff
{
	my %db    = map { $_ => 1 } split /\n/, $mirror_db // '';
	my %redis = map { $_ => 1 } split /\n/, $mirror_redis // '';
	my @d = ((map { "< $_" } grep { !$redis{$_} } split /\n/, $mirror_db // ''),
		(map { "> $_" } grep { !$db{$_} } split /\n/, $mirror_redis // ''));
	$#d = 19 if @d > 20;
	return join("\n", @d);
}

=item BillingTest::log_size(NODE), BillingTest::log_since(NODE, OFFSET)

The size of the node's server log, and what it logged after that offset.

=cut

sub log_size
{
	my ($node) = @_;
	return -s $node->logfile // 0;
}

sub log_since
{
	my ($node, $offset) = @_;
	my $log = slurp_file($node->logfile);
	return length($log) > $offset ? substr($log, $offset) : '';
}

=item BillingTest::accepts_connections(NODE)

True if a psql to the node's postgres database succeeds (false while the
server is down or in crash recovery).

=cut

sub accepts_connections
{
	my ($node) = @_;
	# The query as psql's argument, not on its stdin: a psql refused at once
	# (crash recovery) may exit before it reads its stdin, and writing the
	# query there then died with EPIPE ("ack Broken pipe"), ending the test.
	my ($out, $err);
	my $ok = eval {
		IPC::Run::run([ 'psql', '-X', '-q', '-A', '-t', '-d', $node->connstr('postgres') . ' connect_timeout=10',
				'-c', 'SELECT 1' ],
			'<', '/dev/null', '>', \$out, '2>', \$err, IPC::Run::timeout(60));
	};
	return $ok && ($out // '') =~ /^1$/m ? 1 : 0;
}

=item BillingTest::worker_pid(NODE)

The pid of the running billing sync worker, '' if none runs, undef if the
server did not answer.

=cut

sub worker_pid
{
	my ($node) = @_;
	my $pid = query($node, 'postgres',
		"SELECT pid FROM pg_stat_activity WHERE backend_type = 'billing sync'");
	return $pid;
}

=item BillingTest::write_atomic(FILE, TEXT)

Write TEXT to FILE through a temporary file and a rename, so that a reader
polling FILE (a background client's progress) never sees half of it.

=cut

sub write_atomic
{
	my ($f, $text) = @_;
	open my $fh, '>', "$f.tmp" or croak "$f.tmp: $!";
	print $fh $text;
	close $fh or croak "$f.tmp: $!";
	rename "$f.tmp", $f or croak "$f: $!";
	return;
}

=item BillingTest::redis_proxy(UPSTREAM_PORT, DIR)

Start test/tools/redis_proxy.pl in front of the redis-server on
UPSTREAM_PORT, its trigger and log files in DIR; wait until it listens.
Returns a hash: port (where the worker connects), trigger (the file that
arms an injection: write_atomic it "WORD COMMAND ..."), seen (a function:
how many lines of its log start with a regex), and stop (a function).

=cut

sub redis_proxy
{
	my ($upstream, $dir) = @_;
	my %p = (port => PostgreSQL::Test::Cluster::get_free_port(), trigger => "$dir/inject");
	my $log = "$dir/proxy.log";
	my $out = '';
	my $h = IPC::Run::start(
		[ 'perl', "$REPO/test/tools/redis_proxy.pl", '--port', $p{port},
		  '--upstream', $upstream, '--trigger', $p{trigger}, '--log', $log ],
		'<', \undef, '>', \$out, '2>', \$out);
	$p{seen} = sub {
		my ($what) = @_;
		return scalar(() = (-e $log ? PostgreSQL::Test::Utils::slurp_file($log) : '') =~ /^$what/mg);
	};
	$p{stop} = sub { eval { $h->signal('TERM'); $h->finish; }; return; };
	wait_until(60, sub { $p{seen}->('listen') }) or croak "redis_proxy.pl did not start: $out";
	return \%p;
}

=item BillingTest::spawn(CODE), BillingTest::reap(PID), BillingTest::exited(PID)

Run CODE in a forked child process (a background client, a poller); the
child leaves through POSIX::_exit (0 if CODE returned, 1 if it died), so it
never runs the test's END blocks.  reap waits for it and returns its exit
status ($?); exited returns it if the child has exited, undef if it still
runs.  Both remember it: asked again (a wait loop over several children),
they return it again.  Children not reaped by the end of the test get SIGTERM.  Children
report through files, never through Test::More.

=cut

my @children;
my %reaped;    # pid => exit status, once reap or exited collected it

sub spawn
{
	my ($code) = @_;
	my $pid = fork() // croak "fork: $!";
	if ($pid == 0)
	{
		@children = ();
		my $ok = eval { $code->(); 1 };
		print STDERR "child $$: $@" unless $ok;
		POSIX::_exit($ok ? 0 : 1);
	}
	push @children, $pid;
	return $pid;
}

sub reap
{
	my ($pid) = @_;
	return $reaped{$pid} if exists $reaped{$pid};
	waitpid($pid, 0);
	my $rc = $?;
	$reaped{$pid} = $rc;
	@children = grep { $_ != $pid } @children;
	return $rc;
}

sub exited
{
	my ($pid) = @_;
	return $reaped{$pid} if exists $reaped{$pid};
	return undef unless waitpid($pid, POSIX::WNOHANG()) == $pid;
	my $rc = $?;
	$reaped{$pid} = $rc;
	@children = grep { $_ != $pid } @children;
	return $rc;
}

END
{
	my $rc = $?;
	kill 'TERM', @children if @children;
	waitpid($_, 0) for @children;
	$? = $rc;
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
  $r->running;                               # the process runs (not a zombie)
  $r->info_field('server', 'run_id');        # a field of INFO <section>
  my $c = $r->connect;                       # a socket client, see below

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
	return 0 unless $self->{pid} && kill(0, $self->{pid});
	# a daemonized redis-server that exited may stay a zombie for a while
	# (its parent is init): that is not running
	my $stat = eval { PostgreSQL::Test::Utils::slurp_file("/proc/$self->{pid}/stat") } // '';
	return $stat !~ /^\d+ \(.*\) Z/s;
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

sub pause  { kill 'STOP', $_[0]->{pid} if $_[0]->{pid} }
sub resume { kill 'CONT', $_[0]->{pid} if $_[0]->{pid} }

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

=pod

  my $c = $redis->connect(timeout => 60);
  print BillingTest::Redis::json($c->typed('EVALSHA', $sha, 1, $key));   # ["OK",9000000]

C<BillingTest::Redis::json(REPLY)> renders a reply of C<typed> (see
BillingTest::Redis::Conn) as C<redis-cli --json> does: integers bare,
strings quoted, arrays in brackets without spaces, C<null> for a nil,
C<error:"MESSAGE"> for an error.

=cut

sub json
{
	my ($r) = @_;
	return 'null' unless defined $r;
	return '[' . join(',', map { json($_) } @$r) . ']' if ref $r eq 'ARRAY';
	return "$r" if ref $r eq 'BillingTest::Redis::Integer';
	return 'error:' . _quote("$r") if ref $r eq 'BillingTest::Redis::Error';
	return _quote($r);
}

sub _quote
{
	my ($s) = @_;
	$s =~ s/(["\\])/\\$1/g;
	$s =~ s/\n/\\n/g;
	$s =~ s/\r/\\r/g;
	$s =~ s/\t/\\t/g;
	$s =~ s/([\x00-\x1f])/sprintf('\\u%04x', ord $1)/ge;
	return '"' . $s . '"';
}

package BillingTest::Redis::Integer;
use overload '""' => sub { ${ $_[0] } }, '0+' => sub { ${ $_[0] } }, fallback => 1;
sub new { my ($class, $v) = @_; return bless \$v, $class }

package BillingTest::Redis::Error;
use overload '""' => sub { ${ $_[0] } }, fallback => 1;
sub new { my ($class, $v) = @_; return bless \$v, $class }

package BillingTest::Redis;

END
{
	my $rc = $?;
	for my $r (@all)
	{
		eval { $r->stop };
	}
	$? = $rc;
}

# a RESP connection (BillingTest::Redis::Conn), undef if it cannot connect
sub connect
{
	my ($self, %p) = @_;
	return BillingTest::Redis::Conn->new($self->{port}, $p{timeout} // 2);
}

# a field of INFO <section>
sub info_field
{
	my ($self, $section, $field) = @_;
	my $out = $self->cli('INFO', $section);
	return $out =~ /^\Q$field\E:(.*?)\r?$/m ? $1 : undef;
}

=head1 BillingTest::Redis::Conn

  my $c = $redis->connect;                   # undef if it cannot connect
  my $reply = $c->command('HGET', 'k', 'f'); # string, integer, array ref or undef;
                                             # dies on an error reply, a lost
                                             # connection or no reply in 2 s
  $c->close;

A minimal RESP client on one socket, for pollers that must not start a
redis-cli per request (on a busy machine a process start costs more than
the request).

  my $reply = $c->typed('EVALSHA', $sha, 1, $key);

C<typed> sends a command like C<command> but returns the reply with its
type kept, for tests that check what a script answers: an error reply is
returned as a C<BillingTest::Redis::Error> and an integer as a
C<BillingTest::Redis::Integer> (both compare and print as their value,
the error as its message); strings, arrays and nil as C<command> returns
them.  C<BillingTest::Redis::json> renders such a reply.

=cut

package BillingTest::Redis::Conn;

use strict;
use warnings FATAL => 'all';

use Carp;
use IO::Select;
use IO::Socket::INET;

sub new
{
	my ($class, $port, $timeout) = @_;
	my $sock = IO::Socket::INET->new(
		PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp',
		Timeout => $timeout) or return undef;
	$sock->autoflush(1);
	return bless { sock => $sock, timeout => $timeout, buf => '' }, $class;
}

sub close
{
	my ($self) = @_;
	close $self->{sock} if $self->{sock};
	$self->{sock} = undef;
}

sub command
{
	my ($self, @args) = @_;
	$self->_send(@args);
	my $reply = $self->_reply;
	croak "redis: $reply->[0]" if ref $reply eq 'BillingTest::Redis::Conn::Error';
	return $reply;
}

sub typed
{
	my ($self, @args) = @_;
	$self->_send(@args);
	return $self->_reply(1);
}

sub _send
{
	my ($self, @args) = @_;
	croak 'closed' unless $self->{sock};
	my $req = '*' . scalar(@args) . "\r\n";
	$req .= '$' . length($_) . "\r\n$_\r\n" for @args;
	while (length $req)
	{
		my $sent = syswrite($self->{sock}, $req);
		croak "write: $!" unless defined $sent;
		substr($req, 0, $sent) = '';
	}
}

sub _fill
{
	my ($self) = @_;
	my $sel = IO::Select->new($self->{sock});
	croak 'timeout' unless $sel->can_read($self->{timeout});
	my $n = sysread($self->{sock}, $self->{buf}, 65536, length $self->{buf});
	croak 'connection closed' unless $n;
}

sub _line
{
	my ($self) = @_;
	my $i;
	$self->_fill while ($i = index($self->{buf}, "\r\n")) < 0;
	my $line = substr($self->{buf}, 0, $i);
	substr($self->{buf}, 0, $i + 2) = '';
	return $line;
}

# typed: integers and errors as BillingTest::Redis::Integer and ::Error
sub _reply
{
	my ($self, $typed) = @_;
	my $line = $self->_line;
	my ($t, $rest) = (substr($line, 0, 1), substr($line, 1));
	return $rest if $t eq '+';
	return BillingTest::Redis::Integer->new($rest) if $t eq ':' && $typed;
	return $rest + 0 if $t eq ':';
	return BillingTest::Redis::Error->new($rest) if $t eq '-' && $typed;
	return bless [$rest], 'BillingTest::Redis::Conn::Error' if $t eq '-';
	if ($t eq '$')
	{
		return undef if $rest < 0;
		$self->_fill while length($self->{buf}) < $rest + 2;
		my $s = substr($self->{buf}, 0, $rest);
		substr($self->{buf}, 0, $rest + 2) = '';
		return $s;
	}
	if ($t eq '*')
	{
		return undef if $rest < 0;
		return [ map { $self->_reply($typed) } 1 .. $rest ];
	}
	croak "bad reply: $line";
}

package BillingTest::Session;

use strict;
use warnings FATAL => 'all';

use Carp;
use IPC::Run;

=head1 BillingTest::Session

  my $s = BillingTest::Session->new($node, 'app');   # no connection yet
  my $r = $s->call("SELECT balance_after FROM billing_deduct('t1', 1, 'tr-1')");
  $r->{status};    # 'ok', 'error', 'lost' or 'timeout' (see below)
  $r->{rows};      # array ref of the result lines (psql -At: columns joined by |)
  $r->{sqlstate};  # '00000' if ok, the error's SQLSTATE if error
  $r->{message};   # the server's error message (psql's verbose stderr) if error
  $s->pid;         # the backend's pid (a call; connects if needed), undef if it failed
  $s->close;

A client that records exactly which calls were acknowledged.  One psql
process (psql -X -At, autocommit) per session, kept open across calls like
an application's connection; each call is one statement (no trailing
semicolon needed), followed by
C<\echo> of a tag and C<:SQLSTATE>, which psql prints only after it has
the server's answer to the statement, so:

=over

=item ok

the server answered success: the statement committed (acknowledged);

=item error

the server answered with an SQL error (SQLSTATE): nothing committed;

=item lost

no answer, or one that does not say whether the statement committed: the
connection was lost (a crash, a restart, a terminated backend) or could not
be made, or the error was a connection exception (SQLSTATE class 08) or an
operator's intervention (class 57: the backend terminated, the server
shutting down or restarting after a crash).  The statement may or may not
have committed.  The session is closed; the next call starts a new psql,
i.e. reconnects;

=item timeout

no answer within the session's timeout (C<< timeout => SECONDS >>, default
180): psql is killed, the next call reconnects.

=back

=cut

sub new
{
	my ($class, $node, $db, %p) = @_;
	return bless {
		connstr => $node->connstr($db) . ' connect_timeout=10',
		timeout => $p{timeout} // 180,
		n => 0,
	}, $class;
}

sub _start
{
	my ($self) = @_;
	@$self{qw(in out err)} = ('', '', '');
	$self->{timer} = IPC::Run::timer($self->{timeout});
	$self->{h} = IPC::Run::start(
		[ 'psql', '-X', '-q', '-A', '-t', '-v', 'VERBOSITY=verbose', '-d', $self->{connstr} ],
		'<', \$self->{in}, '>', \$self->{out}, '2>', \$self->{err}, $self->{timer});
}

sub call
{
	my ($self, $sql) = @_;
	$self->_start unless $self->{h};
	my $tag = '@@billing-test-' . ++$self->{n} . '@@';
	$self->{out} = '';
	$self->{err} = '';
	$self->{in} .= "$sql;\n\\echo $tag :SQLSTATE\n";
	$self->{timer}->start($self->{timeout});
	my $state;
	while (1)
	{
		if ($self->{out} =~ /^\Q$tag\E ?(\S*)$/m)
		{
			$state = $1;
			last;
		}
		last if $self->{timer}->is_expired || !$self->{h}->pumpable;
		eval { $self->{h}->pump; 1 } or last;
	}
	my ($out, $err) = @$self{qw(out err)};
	# No answer, or an answer that does not tell: psql's own error (the
	# connection broke: no SQLSTATE), a connection exception (08) or an
	# operator's intervention (57: terminated, shutting down, crash of
	# another process) may come after the commit.
	if (!defined $state || $state eq '' || $state =~ /^(08|57)/)
	{
		my $status = !defined $state && $self->{timer}->is_expired ? 'timeout' : 'lost';
		eval { $self->{h}->pump_nb } for 1 .. 3;
		$err = $self->{err};
		$self->close;
		return { status => $status, rows => [], sqlstate => $state, message => $err };
	}
	my ($text) = $out =~ /\A(.*?)^\Q$tag\E/ms;
	# one line per row (a row of one NULL is an empty line)
	my @rows = $text eq '' ? () : split(/\n/, $text, -1);
	pop @rows if @rows && $rows[-1] eq '';
	my $r = { sqlstate => $state, rows => \@rows };
	if ($state eq '00000')
	{
		$r->{status} = 'ok';
	}
	else
	{
		$r->{status} = 'error';
		# let psql's stderr catch up with its stdout (two pipes)
		eval { $self->{h}->pump_nb } for 1 .. 3;
		$r->{message} = $self->{err};
	}
	return $r;
}

sub pid
{
	my ($self) = @_;
	my $r = $self->call('SELECT pg_backend_pid()');
	return $r->{status} eq 'ok' ? $r->{rows}[0] : undef;
}

sub close
{
	my ($self) = @_;
	my $h = delete $self->{h} or return;
	if ($h->pumpable)
	{
		$self->{in} .= "\\q\n";
		$self->{timer}->start(10);
		eval { $h->pump while $h->pumpable && !$self->{timer}->is_expired; 1 };
	}
	eval { $h->kill_kill(grace => 2) };
}

sub DESTROY
{
	my ($self) = @_;
	$self->close;
}

package BillingTest::FakeRedis;

use strict;
use warnings FATAL => 'all';

use Carp;
use IO::Socket::INET;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;

=pod

=head1 BillingTest::FakeRedis

  my $f = BillingTest::FakeRedis->new('trickle');   # started
  BillingTest::FakeRedis->new('huge', '--delay', 0.1);  # more options
  $f->port; $f->count('SCAN');                       # commands received
  $f->last_count('SCAN');                            # ... on the newest connection
  $f->connections('INFO SERVER');                    # the connections that sent it
  $f->stop;

A hostile Redis (test/tools/fake_redis.pl, see its header for the modes) on
127.0.0.1 and a free port: it lets the worker connect and then misbehaves.
Its log of received commands is in the test's tmp_check.  Stopped at the
end of the test.  A real redis-server (BillingTest::Redis) stays the
reference for everything else.

=cut

my @fakes;

sub new
{
	my ($class, $mode, @options) = @_;
	my $self = bless {
		mode => $mode,
		port => PostgreSQL::Test::Cluster::get_free_port(),
		log  => PostgreSQL::Test::Utils::tempdir("fake_redis_$mode") . '/commands.log',
	}, $class;
	my $out = '';
	$self->{h} = IPC::Run::start(
		[ 'perl', "$BillingTest::REPO/test/tools/fake_redis.pl", '--port', $self->{port},
		  '--mode', $mode, '--log', $self->{log}, @options ],
		'<', \undef, '>', \$out, '2>', \$out);
	push @fakes, $self;
	BillingTest::wait_until(60, sub {
		my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $self->{port}, Timeout => 1);
		return 0 unless $s;
		close $s;
		return 1;
	}) or croak "fake_redis.pl ($mode) did not listen on $self->{port}: $out";
	return $self;
}

sub port { $_[0]->{port} }

# how many commands NAME (e.g. 'SCAN', 'INFO SERVER') it received
sub count
{
	my ($self, $name) = @_;
	return 0 unless -f $self->{log};
	my $n = 0;
	for my $line (split /\n/, PostgreSQL::Test::Utils::slurp_file($self->{log}))
	{
		$n++ if $line =~ /^\d+ \Q$name\E$/;
	}
	return $n;
}

# how many lines NAME the connection that logged last has logged: how far
# the worker got on it (5 SCANs into a wipe, 3 MiB into a huge reply)
sub last_count
{
	my ($self, $name) = @_;
	return 0 unless -f $self->{log};
	my @lines = split /\n/, PostgreSQL::Test::Utils::slurp_file($self->{log});
	return 0 unless @lines && $lines[-1] =~ /^(\d+) /;
	my $pid = $1;
	return scalar(grep { /^$pid \Q$name\E$/ } @lines);
}

# the connections (the pids of the fake's children serving them) that
# received a command NAME, in the order they first did
sub connections
{
	my ($self, $name) = @_;
	return () unless -f $self->{log};
	my (%seen, @pids);
	for my $line (split /\n/, PostgreSQL::Test::Utils::slurp_file($self->{log}))
	{
		push @pids, $1 if $line =~ /^(\d+) \Q$name\E$/ && !$seen{$1}++;
	}
	return @pids;
}

sub stop
{
	my ($self) = @_;
	return unless $self->{h};
	eval { $self->{h}->signal('TERM'); $self->{h}->finish; };
	delete $self->{h};
}

END
{
	my $rc = $?;
	$_->stop for @fakes;
	$? = $rc;
}


1;

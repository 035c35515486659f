
# Issue 12, M7: Redis ACL users (AUTH user password), a password that
# members of pg_read_all_settings cannot read (billing.redis_password is
# shown masked; billing.redis_password_file keeps it out of the settings),
# and TLS where the build has hiredis >= 1.0 with hiredis_ssl.  A build
# without TLS refuses billing.redis_tls = on (the worker does not fall back
# to plain text); the TLS part is skipped there, saying why.

use strict;
use warnings FATAL => 'all';

use File::Temp ();
use IPC::Run;
use PostgreSQL::Test::Utils;
use Test::More;
use BillingTest;

my $db = 'app';
my $tmp = PostgreSQL::Test::Utils::tempdir('auth');

# an ACL user for the worker with exactly the commands docs/security.md
# lists; the default user stays open for the tests' redis-cli
my @worker_acl = ('~billing:*', map { "+$_" }
	  qw(evalsha script|load hgetall exists get set scan unlink dbsize info select xadd watch unwatch multi exec
	  hset hget hdel hlen del type zcard zrangebyscore zrem time));
my $redis = BillingTest::Redis->new('acl',
	args => [ '--user', 'billing', 'on', '>s3cret', @worker_acl ]);
my $node = BillingTest::node('main', database => $db,
	conf => "billing.redis_host = '127.0.0.1'\nbilling.redis_port = " . $redis->port
	  . "\nbilling.check_interval = 0");

sub status
{
	my ($col) = @_;
	return BillingTest::query($node, $db, "SELECT $col FROM billing_sync_status()") // '';
}
sub set_conf
{
	my (%kv) = @_;
	$node->safe_psql($db, join('', map { "ALTER SYSTEM SET $_ = '$kv{$_}';\n" } sort keys %kv)
		  . "SELECT pg_reload_conf();");
}
sub worker_user_in_redis
{
	my ($out) = $redis->cli_ok('CLIENT', 'LIST');
	my @users = map { /\buser=(\S+)/ ? $1 : () } grep { /\bname=|addr=/ } split /\n/, $out;
	return join(',', sort grep { $_ ne 'default' } @users);
}

$node->safe_psql($db, "SELECT billing_account_create('t1'); SELECT billing_credit('t1', 10, 'c1')");

# --- a wrong password is an AUTH failure, named
set_conf('billing.redis_user' => 'billing', 'billing.redis_password' => 'wrong');
ok(BillingTest::wait_until(120, sub { status('last_error') =~ /AUTH failed/ }),
	'a wrong password: ' . status('last_error'));

# --- the password, masked in every view of the settings
# (a change made now, which only a worker connected with it can push; the
# worker may still be waiting out its back-off after the failed AUTH)
set_conf('billing.redis_password' => 's3cret');
$node->safe_psql($db, "SELECT billing_credit('t1', 1, 'c-auth')");
ok(BillingTest::wait_until(120, sub {
	BillingTest::mirror_equals($node, $db, $redis) && status('connected') eq 't' && worker_user_in_redis() eq 'billing' }),
	'AUTH billing s3cret: the mirror converges, the worker connected as ACL user billing');
# an event (t1 crosses its low-balance threshold) reaches its stream with these commands
$node->safe_psql($db, "SELECT billing_credit('t1', 100, 'c-ev'); SELECT billing_alerts_set('t1', low_balance => 50);
                       SELECT billing_deduct('t1', 100, 'd-ev')");
ok(BillingTest::wait_until(120, sub { ($redis->cli('XLEN', 'billing:{t1}:events') // 0) >= 1 }),
	"the ACL user's commands deliver events too");
ok(BillingTest::wait_until(120, sub {
	BillingTest::query($node, $db, "SELECT count(*) FROM billing.events WHERE delivered_at IS NULL") eq '0' }),
	'and marked delivered');
is($node->safe_psql($db, 'SHOW billing.redis_password'), '********', 'SHOW masks the password (superuser)');
$node->safe_psql($db, 'CREATE ROLE mon LOGIN IN ROLE pg_monitor');
is($node->safe_psql($db, "SELECT current_setting('billing.redis_password')", extra_params => [ '-U', 'mon' ]),
	'********', 'a pg_monitor member reads only the mask');
# pg_settings is no view of it at all: its reset_val (and boot_val) columns
# are the raw strings, which the show hook does not mask
for my $role (qw(mon postgres))
{
	my @as = $role eq 'mon' ? (extra_params => [ '-U', 'mon' ]) : ();
	is($node->safe_psql($db, q{SELECT count(*) FILTER (WHERE name = 'billing.redis_password') || ' '
	                              || count(*) FILTER (WHERE s::text LIKE '%s3cret%') FROM pg_settings s}, @as),
		'0 0', "pg_settings does not list it, nor has the password in any column ($role)");
}
is($node->safe_psql($db, "SELECT current_setting('billing.redis_password')", extra_params => [ '-U', 'mon' ]),
	'********', 'SHOW and current_setting still say whether one is set');

# --- the password in a file that only the server's OS user can read
my $file = "$tmp/redis.pass";
PostgreSQL::Test::Utils::append_to_file($file, "s3cret\n");
chmod 0644, $file;
set_conf('billing.redis_password' => '', 'billing.redis_password_file' => $file);
ok(BillingTest::wait_until(120, sub { status('last_error') =~ /chmod 600/ }),
	'a password file others can read is refused: ' . status('last_error'));
chmod 0600, $file;
$node->safe_psql($db, "SELECT billing_credit('t1', 1, 'c2')");
ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $redis) && status('connected') eq 't' }),
	'with billing.redis_password_file (mode 600) the mirror converges');
is(worker_user_in_redis(), 'billing', 'still as ACL user billing');
is($node->safe_psql($db, 'SHOW billing.redis_password'), '', 'no password in the settings');

# --- TLS
my $tls_built;
set_conf('billing.redis_tls' => 'on');
ok(BillingTest::wait_until(120, sub {
	my $e = status('last_error');
	$tls_built = 0 if $e =~ /no TLS support/;
	$tls_built = 1 if $e =~ /TLS/ && $e !~ /no TLS support/;
	defined $tls_built }),
	'billing.redis_tls = on against a plain Redis port: refused, never plain text: ' . status('last_error'));
is(status('connected'), 'f', 'not connected');

SKIP:
{
	skip 'this build has no TLS support (hiredis < 1.0 or no hiredis_ssl, e.g. Debian 12\'s hiredis 0.14): '
	  . 'the worker refuses billing.redis_tls = on, checked above', 6
	  unless $tls_built;
	skip 'no openssl command to make certificates', 6
	  unless IPC::Run::run([ 'openssl', 'version' ], '>', \my $v);

	# a CA, a server certificate for 127.0.0.1, another CA
	my $run = sub {
		my ($o, $e) = ('', '');
		IPC::Run::run([@_], '>', \$o, '2>', \$e) or die "@_: $e";
	};
	for my $ca ('ca', 'otherca')
	{
		$run->('openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
			'-subj', "/CN=$ca", '-keyout', "$tmp/$ca.key", '-out', "$tmp/$ca.crt");
	}
	$run->('openssl', 'req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=redis',
		'-keyout', "$tmp/server.key", '-out', "$tmp/server.csr");
	PostgreSQL::Test::Utils::append_to_file("$tmp/ext.cnf", "subjectAltName = IP:127.0.0.1\n");
	$run->('openssl', 'x509', '-req', '-in', "$tmp/server.csr", '-CA', "$tmp/ca.crt",
		'-CAkey', "$tmp/ca.key", '-CAcreateserial', '-days', '2', '-extfile', "$tmp/ext.cnf",
		'-out', "$tmp/server.crt");

	my $tls_port = PostgreSQL::Test::Cluster::get_free_port();
	my $tls = BillingTest::Redis->new('tls', args => [
		'--tls-port', $tls_port, '--tls-cert-file', "$tmp/server.crt",
		'--tls-key-file', "$tmp/server.key", '--tls-ca-cert-file', "$tmp/ca.crt",
		'--tls-auth-clients', 'no',
		'--user', 'billing', 'on', '>s3cret', '~billing:*', '+@all' ]);

	set_conf('billing.redis_port' => $tls_port, 'billing.redis_tls_ca_file' => "$tmp/otherca.crt");
	ok(BillingTest::wait_until(120, sub { status('last_error') =~ /certificate/ }),
		'a certificate of another CA is refused: ' . status('last_error'));
	is(status('connected'), 'f', 'not connected');

	set_conf('billing.redis_tls_ca_file' => "$tmp/ca.crt", 'billing.redis_tls_server_name' => 'redis.example');
	ok(BillingTest::wait_until(120, sub { status('last_error') =~ /certificate/ && status('last_error') =~ /redis\.example/ }),
		'a certificate for another name is refused: ' . status('last_error'));

	set_conf('billing.redis_tls_server_name' => '');
	$node->safe_psql($db, "SELECT billing_credit('t1', 1, 'c3')");
	ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $tls) && status('connected') eq 't' }),
		'over TLS (verified CA, name 127.0.0.1), the mirror converges: ' . status('last_error'));
	my ($out) = $tls->cli_ok('CLIENT', 'LIST');
	like($out, qr/user=billing/, 'as ACL user billing');
	ok(BillingTest::wait_until(30, sub { status('connected') eq 't' }), 'connected');
}

BillingTest::no_crashes($node);
done_testing();

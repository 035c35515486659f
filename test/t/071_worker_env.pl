
# Issue 12, H1: a database owner (not a superuser) must not get code run by
# the worker.  On 61936f6 the worker inherited ALTER DATABASE ... SET
# search_path and ran `extname = 'billing'` with an unqualified `=`: the
# owner's operator ran as the bootstrap superuser and made the owner a
# superuser.  Now the worker pins its settings right after connecting,
# checks the catalog with C APIs, qualifies every operator, and can run as a
# non-superuser role (billing.worker_role) with exactly the rights
# billing_grant_worker() grants.

use strict;
use warnings FATAL => 'all';

use PostgreSQL::Test::Utils;
use Test::More;
use BillingTest;

my $db = 'app';
my $redis = BillingTest::Redis->new('mirror');
my $node = BillingTest::node('main', database => $db, redis => $redis,
	conf => "billing.maintenance_interval = 200\nbilling.check_interval = 0");
my @restarted;
my $su = $node->safe_psql('postgres', 'SELECT rolname FROM pg_roles WHERE oid = 10');
# our own sessions undo what the owner sets for the database
our $undo = "SET search_path = public, pg_catalog; SET default_transaction_read_only = off; "
  . "SET exit_on_error = off; SET lock_timeout = 0; SET statement_timeout = 0; "
  . "SET default_transaction_isolation = 'read committed'; SET SESSION AUTHORIZATION $su; SET ROLE NONE; ";

sub sql { my ($q) = @_; return $node->safe_psql($db, $undo . $q); }
sub status
{
	my ($col) = @_;
	my ($rc, $out) = $node->psql($db, $undo . "SELECT $col FROM billing_sync_status()");
	return $out // '';
}
sub restart_worker
{
	my $old = status('worker_pid');
	sql("SELECT pg_terminate_backend($old)");
	push @restarted, $old;
	ok(BillingTest::wait_until(120, sub { my $p = status('worker_pid'); $p && $p ne $old && status('connected') eq 't' }),
		"the worker restarted (was $old, now " . status('worker_pid') . ')');
}

$node->safe_psql($db, "SELECT billing_account_create('t0')");
ok(BillingTest::wait_until(120, sub { status('connected') eq 't' && BillingTest::mirror_equals($node, $db, $redis, $undo) }),
	'the worker runs');
$node->safe_psql('postgres', "CREATE ROLE evil_owner LOGIN; ALTER DATABASE $db OWNER TO evil_owner");

# the owner's trap: operators and functions that try to make the owner a
# superuser, first in the database's search_path; and settings that would
# make the worker read-only, strict or someone else
my $trap = q{
CREATE SCHEMA evil;
CREATE FUNCTION evil.escalate() RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
    RAISE LOG 'EVIL RAN as %', current_user;
    BEGIN
        EXECUTE 'ALTER ROLE evil_owner SUPERUSER';
    EXCEPTION WHEN OTHERS THEN NULL;
    END;
    RETURN true;
END $f$;
CREATE FUNCTION evil.eq_name(name, name) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN PERFORM evil.escalate(); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$;
CREATE OPERATOR evil.= (LEFTARG = name, RIGHTARG = name, FUNCTION = evil.eq_name);
CREATE FUNCTION evil.eq_text(text, text) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN PERFORM evil.escalate(); RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq_text);
CREATE FUNCTION evil.gt_text(text, text) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN PERFORM evil.escalate(); RETURN $1 OPERATOR(pg_catalog.>) $2; END $f$;
CREATE OPERATOR evil.> (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.gt_text);
CREATE FUNCTION evil.le_tstz(timestamptz, timestamptz) RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN PERFORM evil.escalate(); RETURN $1 OPERATOR(pg_catalog.<=) $2; END $f$;
CREATE OPERATOR evil.<= (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = evil.le_tstz);
CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE plpgsql AS $f$
BEGIN PERFORM evil.escalate(); RETURN pg_catalog.now(); END $f$;
};
$node->safe_psql($db, $trap, extra_params => [ '-U', 'evil_owner' ]);
# the issue's escalation: the owner's schema first in the database's search_path
$node->safe_psql($db, "ALTER DATABASE $db SET search_path = evil, pg_catalog",
	extra_params => [ '-U', 'evil_owner' ]);
sql("SELECT billing_account_create('t1'); SELECT billing_credit('t1', 10, 'c1')");
restart_worker();
ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $redis, $undo) }),
	'the worker mirrors under the owner\'s search_path');
is($node->safe_psql('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'evil_owner'"), 'f',
	'the owner did not become superuser');
unlike(BillingTest::slurp_logs($node), qr/LOG:  EVIL RAN as/, 'none of the owner\'s operators or functions ran');

# settings that would make the worker read-only, strict, or stop on the first error
$node->safe_psql($db, join('', map { "ALTER DATABASE $db SET $_;\n" }
	"exit_on_error = on", "lock_timeout = '1ms'",
	"default_transaction_isolation = 'serializable'", "transform_null_equals = on",
	"default_transaction_read_only = on"),
	extra_params => [ '-U', 'evil_owner' ]);
sql("SELECT billing_credit('t1', 1, 'c1b')");
restart_worker();
ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $redis, $undo) }),
	'the worker mirrors under the owner\'s settings');
is($node->safe_psql('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'evil_owner'"), 'f',
	'the owner is no superuser');
unlike(BillingTest::slurp_logs($node), qr/LOG:  EVIL RAN as/, 'none of the owner\'s operators or functions ran');
my $pid = status('worker_pid');
# (pg_stat_activity shows the role of the connection, before the worker
# pinned its settings: the database's session_authorization shows there)

# the maintenance writes although the database says read-only
sql("SELECT billing_hold('t1', 1, 'h1', interval '1 second')");
ok(BillingTest::wait_until(120, sub {
	(BillingTest::query($node, $db, $undo . "SELECT status FROM billing.holds WHERE trace_id = 'h1'") // '') =~ /expired/ }),
	'the maintenance expires holds (default_transaction_read_only = on for the database)');

# --- the database also says whom to run as: the worker still runs as itself
$node->safe_psql($db, "SET default_transaction_read_only = off; ALTER DATABASE $db SET role = 'evil_owner'",
	extra_params => [ '-U', 'evil_owner' ]);
# (not every setting may be set by an owner on every version: try, and
# say which were set)
my $set_sa = $node->psql($db, "SET default_transaction_read_only = off; ALTER DATABASE $db SET session_authorization = 'evil_owner'",
	extra_params => [ '-U', 'evil_owner' ]) == 0;
note('the owner could ' . ($set_sa ? '' : 'not ') . 'set session_authorization for the database');
restart_worker();
sql("SELECT billing_credit('t1', 1, 'c2')");
ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $redis, $undo) }),
	'with role ' . ($set_sa ? 'and session_authorization ' : '') . 'set by the database, the worker mirrors');
sql("SELECT billing_hold('t1', 1, 'h0', interval '1 second')");
ok(BillingTest::wait_until(120, sub {
	(BillingTest::query($node, $db, $undo . "SELECT status FROM billing.holds WHERE trace_id = 'h0'") // '') =~ /expired/ }),
	'and expires holds');
unlike(BillingTest::slurp_logs($node), qr/LOG:  EVIL RAN as/, 'none of the owner\'s operators or functions ran');
$pid = status('worker_pid');

# --- the worker as a non-superuser role, with exactly billing_grant_worker()'s rights
$node->safe_psql('postgres', 'CREATE ROLE billing_worker LOGIN');
sql("ALTER SYSTEM SET billing.worker_role = 'billing_worker'; SELECT pg_reload_conf()");
ok(BillingTest::wait_until(120, sub { status('last_error') =~ /USAGE on schema billing/ }),
	'without the rights, the worker says which one is missing: ' . status('last_error'));
push @restarted, $pid;
$pid = status('worker_pid');
is($node->safe_psql('postgres', "SELECT usename FROM pg_stat_activity WHERE pid = $pid"), 'billing_worker',
	'the worker restarted as billing.worker_role');
sql("SELECT billing_grant_worker('billing_worker')");
sql("SELECT billing_api_key_create('t1', 'k1', 5, 'day'); SELECT billing_deduct('t1', 0.5, 'd1', api_key => 'k1')");
ok(BillingTest::wait_until(120, sub { BillingTest::mirror_equals($node, $db, $redis, $undo) }),
	'with billing_grant_worker(), the mirror converges (tenant and key hashes)');
is($node->safe_psql('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'billing_worker'"), 'f',
	'billing_worker is no superuser');
sql("SELECT billing_hold('t1', 1, 'h2', interval '1 second')");
ok(BillingTest::wait_until(120, sub {
	(BillingTest::query($node, $db, $undo . "SELECT status FROM billing.holds WHERE trace_id = 'h2'") // '') =~ /expired/ }),
	'as billing_worker, the maintenance expires holds');
is($node->safe_psql('postgres', "SELECT rolsuper FROM pg_roles WHERE rolname = 'evil_owner'"), 'f',
	'the owner is still no superuser');
unlike(BillingTest::slurp_logs($node), qr/LOG:  EVIL RAN as/, 'none of the owner\'s operators or functions ran');

# the rights are exactly the documented ones
is(sql(q{
	SELECT string_agg(x, ', ' ORDER BY x) FROM (
	  SELECT 'SELECT on ' || c.relname AS x FROM pg_class c
	   WHERE c.relnamespace = 'billing'::regnamespace AND has_table_privilege('billing_worker', c.oid, 'SELECT')
	  UNION ALL
	  SELECT 'EXECUTE on ' || p.proname FROM pg_proc p
	   WHERE p.pronamespace IN ('billing'::regnamespace, 'public'::regnamespace)
	     AND has_function_privilege('billing_worker', p.oid, 'EXECUTE')
	     AND NOT has_function_privilege('public', p.oid, 'EXECUTE')) s}),
	'EXECUTE on alerts_due, EXECUTE on event_write, EXECUTE on local_shards, EXECUTE on maintenance, '
	. 'EXECUTE on sync_snapshot, EXECUTE on sync_snapshot_of, SELECT on accounts, SELECT on api_keys, '
	. 'SELECT on events, SELECT on holds',
	'billing_worker holds exactly the documented rights');

BillingTest::no_crashes($node, @restarted);
done_testing();

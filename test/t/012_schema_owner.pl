# The database owner is not a superuser, and must not become one through the
# extension.  On PostgreSQL 15 and later the owner of a database owns its
# schema public (pg_database_owner), where the SQL API lives by default: the
# owner can create functions and operators there, and rename it.  What the
# extension's superuser-owned code runs must therefore never be found in it
# by name:
#
# - install: a public.nextval(text) the owner created before a superuser ran
#   CREATE EXTENSION is an exact match for the tables' defaults
#   nextval('billing....'), which would bind to it and run it as the caller
#   of every function that inserts a row (SECURITY DEFINER: the extension's
#   owner).  The install script resolves every name in pg_catalog;
# - upgrade: an operator public.= (oid, regclass) is an exact match for the
#   upgrade script's comparisons of catalog oids, run by the superuser who
#   updates;
# - at run time: the job functions (SECURITY DEFINER) called billing_hold,
#   billing_release ... by the schema's name.  The owner renames public,
#   creates a new one with functions of those names, and the next job
#   submit runs them as the extension's owner.  They call the same C
#   functions under names in schema billing now.  The grant helpers find
#   the API through the extension's record, so they grant and revoke the
#   extension's functions after such a rename, not the planted ones.
#
# Each planted object records the role it runs as in spy.planted, which
# stays empty.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Utils;
use Test::More;
use BillingTest;

my $node = BillingTest::node('owner', database => 'postgres', extension => 0);
$node->safe_psql('postgres', q{
	CREATE ROLE dbowner LOGIN;
	CREATE ROLE app LOGIN;
	CREATE DATABASE owned OWNER dbowner;
	CREATE DATABASE owned_13 OWNER dbowner;
});

sub owner_sql { my ($db, $sql) = @_; return $node->safe_psql($db, "SET ROLE dbowner; $sql") }
sub su_sql    { my ($db, $sql) = @_; return $node->safe_psql($db, $sql) }

# a table anyone may write, and a spy that records who runs it
my $spy = q{
	CREATE SCHEMA spy;
	GRANT USAGE ON SCHEMA spy TO PUBLIC;
	CREATE TABLE spy.planted (what text, run_as name);
	GRANT INSERT ON spy.planted TO PUBLIC;
	CREATE FUNCTION spy.spy(what text) RETURNS void LANGUAGE sql
	    AS $$ INSERT INTO spy.planted VALUES (what, current_user) $$;
	GRANT EXECUTE ON FUNCTION spy.spy(text) TO PUBLIC;
};

note 'install: names planted in public before CREATE EXTENSION';
owner_sql('owned', $spy . q{
	CREATE FUNCTION public.nextval(text) RETURNS bigint LANGUAGE plpgsql AS $$
	BEGIN
	    PERFORM spy.spy('nextval(' || $1 || ')');
	    RETURN pg_catalog.nextval($1::pg_catalog.regclass);
	END $$;
});
# the install says that the owner may create functions where the API is:
# calls of other roles to the API can be captured there (an overload with a
# closer argument type), which no pinned search_path inside can prevent
my ($install_ret, $install_out, $install_err);
$install_ret = $node->psql('owned', 'CREATE EXTENSION billing', stdout => \$install_out, stderr => \$install_err);
is($install_ret, 0, 'CREATE EXTENSION in a database whose owner is not a superuser');
like($install_err, qr/WARNING:  billing: roles that are not superusers may create functions in schema public, where the API is\nDETAIL:  1 role\(s\): dbowner\./,
	'and a warning names the owner, who may create functions in public');
su_sql('owned', "SELECT billing_grant_charging('app')");
my $rows = sub {
	my ($db) = @_;
	return $node->safe_psql($db, "SELECT coalesce(string_agg(what || ' as ' || run_as, ', ' ORDER BY what), '') FROM spy.planted");
};
is(su_sql('owned', q{SELECT count(*) FROM pg_depend dep
                       JOIN pg_attrdef d ON dep.classid = 'pg_attrdef'::regclass AND d.oid = dep.objid
                       JOIN pg_proc p ON dep.refclassid = 'pg_proc'::regclass AND p.oid = dep.refobjid
                      WHERE p.pronamespace NOT IN ('pg_catalog'::regnamespace, 'billing'::regnamespace)}),
	'0', 'no column default calls a function outside pg_catalog and billing');
su_sql('owned', q{SELECT billing_account_create('o1'); SELECT billing_credit('o1', 100, 'o1-top-up');
                  SELECT billing_limits_set('o1', daily_requests => 1000)});
is($rows->('owned'), '', 'billing_account_create and billing_limits_set (rows with a nextval default) did not run the planted nextval');

note 'run time: the schema public renamed, and functions of the API\'s names in a new one';
owner_sql('owned', q{
	ALTER SCHEMA public RENAME TO public_orig;
	CREATE SCHEMA public;
	-- the names and argument names of the API (the job functions pass some
	-- by name), results the callers accept
	CREATE FUNCTION public.billing_hold(tenant_id text, amount numeric, trace_id text,
	                                    expires_in interval DEFAULT NULL, description text DEFAULT NULL,
	                                    metadata jsonb DEFAULT NULL, api_key text DEFAULT NULL)
	    RETURNS void LANGUAGE sql AS $$ SELECT spy.spy('billing_hold') $$;
	CREATE FUNCTION public.billing_release(tenant_id text, hold_trace_id text, trace_id text)
	    RETURNS void LANGUAGE sql AS $$ SELECT spy.spy('billing_release') $$;
	CREATE FUNCTION public.billing_hold_extend(tenant_id text, hold_trace_id text, expires_in interval DEFAULT NULL)
	    RETURNS void LANGUAGE sql AS $$ SELECT spy.spy('billing_hold_extend') $$;
	CREATE FUNCTION public.billing_capture(tenant_id text, hold_trace_id text, amount numeric, trace_id text,
	                                       final boolean DEFAULT false, description text DEFAULT NULL,
	                                       metadata jsonb DEFAULT NULL, event_at timestamptz DEFAULT NULL)
	    RETURNS TABLE (entry_id bigint) LANGUAGE sql AS $$ SELECT spy.spy('billing_capture'); SELECT 0::bigint $$;
	CREATE FUNCTION public.billing_deduct(tenant_id text, amount numeric, trace_id text,
	                                      description text DEFAULT NULL, metadata jsonb DEFAULT NULL,
	                                      event_at timestamptz DEFAULT NULL, kind text DEFAULT NULL,
	                                      api_key text DEFAULT NULL)
	    RETURNS TABLE (entry_id bigint) LANGUAGE sql AS $$ SELECT spy.spy('billing_deduct'); SELECT 0::bigint $$;
	GRANT USAGE ON SCHEMA public TO PUBLIC;
	GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO PUBLIC;
});
my $app = sub { return $node->safe_psql('owned', "SET ROLE app; SET search_path = public_orig; $_[0]") };
my $job = $app->(q{SELECT job_id FROM billing_job_submit('o1', 'render', 'o1-job-1', estimated_cost => 5)});
like($job, qr/^\d+$/, 'the application submits a job');
is($node->safe_psql('owned', "SELECT amount_micros || ' ' || status FROM billing.holds WHERE tenant_id = 'o1'"),
	'5000000 open', 'its hold is a real one');
is($app->("SELECT state FROM billing_job_cancel('o1', $job)"), 'cancelled', 'the application cancels it');
is($node->safe_psql('owned', "SELECT status FROM billing.holds WHERE tenant_id = 'o1'"), 'released',
	'and its hold is released');
is($rows->('owned'), '', 'the planted billing_hold and billing_release did not run');
$job = $app->(q{SELECT job_id FROM billing_job_submit('o1', 'render', 'o1-job-2', estimated_cost => 5)});
$app->("SELECT count(*) FROM billing_job_claim('w1', tenant_id => 'o1')");
is($app->("SELECT state FROM billing_job_complete('o1', $job, 3, worker => 'w1')"), 'completed',
	'a second job is claimed and completed');
is($node->safe_psql('owned', "SELECT -amount_micros FROM billing.entries WHERE tenant_id = 'o1' AND kind = 'capture'"),
	'3000000', 'its charge is a real capture');
is($rows->('owned'), '', 'none of the planted functions ran (job submit, cancel, claim, complete)');
is($node->safe_psql('owned', "SELECT rolsuper FROM pg_roles WHERE rolname = 'dbowner'"), 'f', 'the owner is not a superuser');

# the grant helpers find the API through the extension, not by the schema's
# old name: they grant and revoke the extension's functions, never the
# planted ones
su_sql('owned', q{CREATE ROLE app2; SELECT public_orig.billing_grant_charging('app2')});
my $hold = 'billing_hold(text, numeric, text, interval, text, jsonb, text)';
is(su_sql('owned', "SELECT has_function_privilege('app2', 'public_orig.$hold', 'EXECUTE')"), 't',
	'billing_grant_charging grants the extension\'s billing_hold');
is(su_sql('owned', q{SELECT count(*) FROM pg_proc p, aclexplode(p.proacl) a
                      WHERE p.pronamespace = 'public'::regnamespace AND a.grantee = 'app2'::regrole}),
	'0', 'and nothing on the planted functions');
su_sql('owned', q{SELECT public_orig.billing_revoke_all('app2')});
is(su_sql('owned', "SELECT has_function_privilege('app2', 'public_orig.$hold', 'EXECUTE')"), 'f',
	'billing_revoke_all revokes it again');

# ... also when the API's schema has a name that ends another schema's
# (billing.effective_holds is not in "ing2")
$node->safe_psql('postgres', 'CREATE DATABASE named_ing');
$node->psql('named_ing', 'CREATE SCHEMA ing; CREATE EXTENSION billing SCHEMA ing', stderr => \$install_err, on_error_die => 1);
unlike($install_err, qr/WARNING/, 'no warning when the API\'s schema is a superuser\'s that nobody else may create in');
su_sql('named_ing', q{ALTER SCHEMA ing RENAME TO ing2; CREATE ROLE app3;
                      SELECT ing2.billing_grant_reporting('app3')});
is(su_sql('named_ing', q{SELECT has_function_privilege('app3', 'billing.effective_holds(billing.accounts)', 'EXECUTE')
                             AND has_function_privilege('app3', 'ing2.billing_metrics()', 'EXECUTE')}),
	't', 'in a renamed schema "ing" the grant helpers find both the API and schema billing\'s functions');

note 'upgrade: names planted in public before a 1.3 install and its update';
SKIP:
{
	skip 'no release 1.3 installed', 6 unless -f $node->config_data('--sharedir') . '/extension/billing--1.3.sql';
	# planted before CREATE EXTENSION: 1.3's install script did not pin its
	# search_path, so its defaults bound the planted nextval(text); the
	# update must bind them again (and plant nothing of its own)
	owner_sql('owned_13', $spy . q{
		CREATE FUNCTION public.nextval(text) RETURNS bigint LANGUAGE plpgsql AS $$
		BEGIN
		    PERFORM spy.spy('nextval(' || $1 || ')');
		    RETURN pg_catalog.nextval($1::pg_catalog.regclass);
		END $$;
		CREATE FUNCTION public.spy_eq(oid, regclass) RETURNS boolean LANGUAGE plpgsql AS $$
		BEGIN
		    PERFORM spy.spy('oid = regclass');
		    RETURN $1 OPERATOR(pg_catalog.=) $2::pg_catalog.oid;
		END $$;
		CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = regclass, FUNCTION = public.spy_eq);
	});
	su_sql('owned_13', q{CREATE EXTENSION billing VERSION '1.3'});
	# (run with search_path pg_catalog: the planted = (oid, regclass) is an
	# exact match for this query's own comparisons)
	my $planted_deps = q{SET search_path = pg_catalog, pg_temp; SELECT count(*) FROM pg_depend d
	      LEFT JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND p.oid = d.refobjid
	      LEFT JOIN pg_operator o ON d.refclassid = 'pg_operator'::regclass AND o.oid = d.refobjid
	     WHERE coalesce(p.pronamespace, o.oprnamespace) = 'public'::regnamespace
	       AND d.classid IN ('pg_attrdef'::regclass, 'pg_constraint'::regclass, 'pg_rewrite'::regclass,
	                         'pg_class'::regclass, 'pg_trigger'::regclass)
	       AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.refclassid = 'pg_extension'::regclass
	                          AND x.classid = d.refclassid AND x.objid = d.refobjid)};
	cmp_ok(su_sql('owned_13', $planted_deps), '>', 0, '1.3 bound defaults to the planted nextval (the flaw the update repairs)');
	my $before = $rows->('owned_13');
	$node->psql('owned_13', 'ALTER EXTENSION billing UPDATE', stderr => \my $update_err, on_error_die => 1);
	like($update_err, qr/WARNING:  billing: roles that are not superusers may create functions in schema public/,
		'the update warns as the install does');
	is(su_sql('owned_13', q{SELECT extversion FROM pg_extension WHERE extname = 'billing'}), BillingTest::extversion(),
		'the extension is updated');
	is($rows->('owned_13'), $before, 'the update did not run the planted operator or nextval');
	is(su_sql('owned_13', $planted_deps), '0', 'after it no default, constraint, view, index or trigger calls a planted function');
	su_sql('owned_13', q{SELECT billing_account_create('u1'); SELECT billing_credit('u1', 100, 'u1-top-up');
	                     SELECT billing_deduct('u1', 1, 'u1-d1'); SELECT billing_hold('u1', 2, 'u1-h1');
	                     SELECT billing_job_submit('u1', 'render', 'u1-job-1', estimated_cost => 5)});
	is($rows->('owned_13'), $before, 'accounts, entries, holds and jobs written after the update did not run the planted nextval');
}

done_testing();

# The ledger works with a plain CREATE EXTENSION, without billing in
# shared_preload_libraries: no worker, no shared memory, no PGC_POSTMASTER
# settings (defining one after startup would be FATAL); the charge engine
# refuses (ZB112).
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Utils;
use Test::More;
use BillingTest;

my $node = BillingTest::node('no_preload', preload => 0, database => 'app');
my $q = sub { $node->safe_psql('app', shift) };

is($q->('SHOW shared_preload_libraries'), '', 'billing is not preloaded');
is($q->("SELECT extversion FROM pg_extension WHERE extname = 'billing'"),
	BillingTest::extversion(), 'CREATE EXTENSION installs the current version');
is($q->("SELECT tenant_id FROM billing_account_create('np-1')"), 'np-1', 'an account');
$q->("SELECT billing_credit('np-1', 10, 'np-t1')");
is($q->("SELECT balance_after FROM billing_deduct('np-1', 0.5, 'np-t2')"),
	'9.500000', 'credit and deduct');
$q->("SELECT billing_hold('np-1', 1, 'np-h1')");
is($q->("SELECT balance_after FROM billing_capture('np-1', 'np-h1', 0.5, 'np-c1', final => true)"),
	'9.000000', 'hold and capture');
$q->("SELECT billing_job_submit('np-1', 'k', 'np-j1', 1)");
$q->("SELECT billing_job_claim('w')");
is($q->("SELECT state FROM billing_job_complete('np-1',
             (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'np-j1'), 0.25)"),
	'completed', 'a job end to end');
is($q->('SELECT enabled FROM billing_sync_status()'), 'f', 'the mirror reports itself disabled');
is($q->("SELECT current_setting('billing.database', true)"), '',
	'worker settings exist only when preloaded');
# the charge engine needs the preload: ZB112, nothing charged
my ($rc, $out, $err) = $node->psql('app', "SELECT billing_charge('np-1', 0.5, 'np-e1')",
	extra_params => [ '-v', 'VERBOSITY=verbose' ]);
like($err, qr/ERROR:\s+ZB112:/, 'billing_charge without the preload: ZB112');
is($q->("SELECT count(*) FROM billing.entries WHERE trace_id = 'np-e1'"), '0', 'and nothing charged');
is($q->('SELECT count(*) FROM billing_engine_status()'), '0', 'billing_engine_status(): no engine');
is($q->('SELECT count(*) FROM billing_verify()'), '0', 'billing_verify() is clean');

BillingTest::no_crashes($node);
$node->stop;
done_testing();

# billing.jobs under logical replication: the job guard (an ENABLE ALWAYS
# trigger, so that it fires on Citus's shards) must not act again in a
# logical replication worker, which replays changes it already checked and
# logged where they were made.  That is what a Citus shard move by logical
# replication does (the default mode and the rebalancer's: the move creates
# the trigger on the new shard before its last catch-up), and what a plain
# subscription of billing's tables does.  Here a subscription, which
# PostgreSQL alone provides: the jobs of a publisher go through their
# lifecycle; the subscriber receives every state, writes no transition and
# no event of its own, and its apply never fails.
use strict;
use warnings FATAL => 'all';
use PostgreSQL::Test::Utils;
use Test::More;
use BillingTest;

my $DB = 'billing_test';
my $pub = BillingTest::node('publisher', allows_streaming => 'logical');
my $sub = BillingTest::node('subscriber');

sub on_pub { return $pub->safe_psql($DB, shift) }
sub on_sub { return $sub->safe_psql($DB, shift) }

on_pub("SELECT count(*) FROM billing_account_create('lr-a');
   SELECT count(*) FROM billing_credit('lr-a', 100, 'lr-a-top');
   SELECT count(*) FROM billing_job_submit('lr-a', 'k', 'j1', 5);
   CREATE PUBLICATION billing_jobs FOR TABLE billing.jobs;");
my $connstr = $pub->connstr . " dbname=$DB";
# the table copy (a tablesync worker inserts the job, whose hold is not on
# the subscriber) and then the apply of every change
on_sub("CREATE SUBSCRIPTION billing_jobs CONNECTION '$connstr' PUBLICATION billing_jobs");
ok(BillingTest::wait_until(180, sub { (BillingTest::query($sub, $DB,
	"SELECT count(*) FROM billing.jobs WHERE state = 'queued'") // '') eq '1' }),
	'the subscriber copied the queued job');

my $job = on_pub("SELECT job_id FROM billing.jobs WHERE idempotency_key = 'j1'");
on_pub("SELECT count(*) FROM billing_job_claim('w1', tenant_id => 'lr-a')");
on_pub("SELECT count(*) FROM billing_job_complete('lr-a', $job, 4, '{\"ok\": true}', 'w1')");
on_pub("SELECT count(*) FROM billing_job_submit('lr-a', 'k', 'j2', 1, max_attempts => 1)");
my $job2 = on_pub("SELECT job_id FROM billing.jobs WHERE idempotency_key = 'j2'");
on_pub("SELECT count(*) FROM billing_job_claim('w1', tenant_id => 'lr-a')");
on_pub("SELECT count(*) FROM billing_job_fail('lr-a', $job2, 'broken', retryable => false, worker => 'w1')");
is(on_pub("SELECT string_agg(idempotency_key || ':' || state, ' ' ORDER BY job_id) FROM billing.jobs"),
	'j1:completed j2:failed', 'on the publisher: one job completed, one failed');
ok(BillingTest::wait_until(180, sub { (BillingTest::query($sub, $DB,
	"SELECT string_agg(idempotency_key || ':' || state, ' ' ORDER BY job_id) FROM billing.jobs") // '')
	eq 'j1:completed j2:failed' }), 'the subscriber applied every state');
is(on_sub("SELECT count(*) FROM billing.job_events"), '0', 'the subscriber logged no transition of its own');
is(on_sub("SELECT count(*) FROM billing.events"), '0', 'nor wrote a job event');
ok(on_pub("SELECT count(*) FROM billing.job_events WHERE job_id = $job") > 2, 'the publisher logged its transitions');
unlike(slurp_file($sub->logfile), qr/"logical replication[^"]*worker" \(PID \d+\) exited with exit code 1/,
	'the subscriber\'s replication workers never failed');

on_sub("DROP SUBSCRIPTION billing_jobs");
$sub->stop;
$pub->stop;
done_testing();

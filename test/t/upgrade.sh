#!/usr/bin/env bash
# ALTER EXTENSION billing UPDATE on a database full of data: install the
# previous version, fill it through the API, upgrade, and check that every
# table is unchanged, the audit is clean, the API still works and the new
# versions' features (1.1: the DROP EXTENSION guard; 1.3: hold expiry that
# skips locked accounts) are in place.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
db=billing_upgrade_test
psql_db() { "$BILLING_PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -At -d "$db" "$@"; }
PGOPTIONS="-c client_min_messages=warning" "$BILLING_PGBIN/psql" -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
trap '"$BILLING_PGBIN/psql" -X -q -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true' EXIT
fail=0
ok() { echo "ok - $1"; }
bad() { echo "not ok - $1"; fail=1; }

old=$(ls "$repo"/billing--*--*.sql | sed -E 's/.*billing--([0-9.]+)--([0-9.]+)\.sql/\1/' | sort -V | head -n 1)
new=$(sed -nE "s/^default_version = '([^']+)'/\1/p" "$repo/billing.control")
echo "# upgrading $old -> $new"

psql_db -o /dev/null <<SQL
CREATE EXTENSION billing VERSION '$old';
SELECT billing_account_create('up-' || g, credit_limit => g) FROM generate_series(1, 20) g;
SELECT billing_credit('up-' || g, 100, 'up-top-' || g) FROM generate_series(1, 20) g;
SELECT billing_deduct('up-' || (g % 20 + 1), 0.010001 * (g % 7 + 1), 'up-d-' || g,
                      metadata => jsonb_build_object('model', 'm' || g % 3)) FROM generate_series(1, 2000) g;
SELECT billing_try_deduct('up-1', 1000, 'up-rejected');
SELECT billing_hold('up-2', 5, 'up-h1');
SELECT billing_capture('up-2', 'up-h1', 2, 'up-c1');
SELECT billing_limits_set('up-3', daily_requests => 1000);
SELECT billing_api_key_create('up-4', 'k', budget => 10, budget_period => 'month');
SELECT billing_price_set('m1', 0.001, 0.002, '2026-01-01');
SELECT billing_job_submit('up-5', 'translate', 'up-j1', 3);
SELECT billing_job_claim('w');
SQL
snapshot() {
	psql_db -c "SELECT string_agg(c.relname || ':' || (xpath('/row/c/text()',
	              query_to_xml(format('SELECT count(*) AS c, md5(coalesce(string_agg(t::text, '','' ORDER BY t::text), '''')) AS m FROM %s t', c.oid::regclass), false, true, '')))[1]::text
	              || ':' || (xpath('/row/m/text()',
	              query_to_xml(format('SELECT count(*) AS c, md5(coalesce(string_agg(t::text, '','' ORDER BY t::text), '''')) AS m FROM %s t', c.oid::regclass), false, true, '')))[1]::text,
	              ' ' ORDER BY c.relname)
	            FROM pg_class c WHERE c.relnamespace = 'billing'::regnamespace AND c.relkind = 'r'"
}
# what the Redis worker would push (the push time left out, and the open holds
# of a key with a budget, which 1.0 did not mirror)
mirror() {
	psql_db -c "SELECT string_agg(tenant_id || '/' || coalesce(key_id, '') || '/' || version || '/'
	                              || regexp_replace(regexp_replace(array_to_string(fields, ','), 'synced_at_ms,[0-9]+', ''),
	                                                CASE WHEN key_id IS NULL THEN '^\$' ELSE ',holds,[0-9]+' END, ''), ' '
	                              ORDER BY tenant_id, key_id NULLS LAST)
	              FROM billing.sync_snapshot(NULL, '', 1000)"
}
before=$(snapshot)
mirror_before=$(mirror)
psql_db -c "ALTER EXTENSION billing UPDATE"
after=$(snapshot)
mirror_after=$(mirror)

[[ $(psql_db -c "SELECT extversion FROM pg_extension WHERE extname = 'billing'") == "$new" ]] \
	&& ok "extension is at $new" || bad "extension is not at $new"
[[ $before == "$after" ]] && ok "every table unchanged by the upgrade ($(wc -w <<<"$before") tables)" \
	|| { bad "tables changed by the upgrade"; diff <(tr ' ' '\n' <<<"$before") <(tr ' ' '\n' <<<"$after") || true; }
[[ -n $mirror_before && $mirror_before == "$mirror_after" ]] && ok "the worker's snapshot read gives the same hashes ($(wc -w <<<"$mirror_before") of them)" \
	|| bad "sync_snapshot differs after the upgrade: $mirror_before vs $mirror_after"
[[ $(psql_db -c "SELECT count(*) FROM billing_verify()") == 0 ]] && ok "billing_verify() clean" || bad "billing_verify() not clean"
[[ $(psql_db -c "SELECT replayed FROM billing_deduct('up-2', 0.020002, 'up-d-1', metadata => '{\"model\": \"m1\"}')") == t ]] \
	&& ok "an old trace id replays after the upgrade" || bad "old trace id did not replay"
[[ $(psql_db -c "SELECT state FROM billing_job_complete('up-5', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'up-j1'), 2.5)") == completed ]] \
	&& ok "a job claimed before the upgrade completes after it" || bad "job did not complete"
[[ $(psql_db -c "SELECT pg_get_functiondef('billing.expire_due_holds(integer)'::regprocedure) LIKE '%SKIP LOCKED%'") == t ]] \
	&& ok "hold expiry skips locked accounts (1.3)" || bad "billing.expire_due_holds does not skip locked accounts"
[[ $(psql_db -c "BEGIN" -c "DROP SCHEMA public CASCADE" -c "ROLLBACK" 2>&1 || true) == *"would destroy the ledger"* ]] \
	&& ok "DROP SCHEMA public CASCADE refused (1.3 guard)" || bad "DROP SCHEMA public CASCADE was not refused"
if psql_db -c "DROP EXTENSION billing" 2>/tmp/upgrade.err.$$; then
	bad "DROP EXTENSION was not refused"
else
	grep -q "would destroy the ledger" /tmp/upgrade.err.$$ && ok "DROP EXTENSION refused (1.1 guard)" || bad "unexpected error: $(cat /tmp/upgrade.err.$$)"
fi
rm -f /tmp/upgrade.err.$$
psql_db -c "SET billing.allow_drop = on" -c "DROP EXTENSION billing" && ok "DROP EXTENSION with billing.allow_drop = on" || bad "could not drop with allow_drop"
exit $fail

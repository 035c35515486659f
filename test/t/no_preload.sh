#!/usr/bin/env bash
# The ledger must work with a plain CREATE EXTENSION, without billing in
# shared_preload_libraries: no worker, no shared memory, no PGC_POSTMASTER
# settings (defining one after startup would be FATAL).  Starts its own
# cluster so the main one keeps its preload.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export BILLING_TMP="$BILLING_TMP/no-preload" BILLING_PRELOAD=0 BILLING_EXTRA_CONF=""
export BILLING_PGPORT=$((BILLING_PGPORT + 2)) BILLING_REDIS_PORT=$((BILLING_REDIS_PORT + 2))
cluster() { bash "$repo/test/cluster.sh" "$@"; }
trap 'cluster stop >/dev/null 2>&1 || true' EXIT
cluster start
fail=0
check() {	# check NAME EXPECTED SQL
	local got
	got=$(cluster psql -At -c "$3" 2>&1 | tail -n 1) || true
	if [[ $got == "$2" ]]; then echo "ok - $1"; else echo "not ok - $1: expected '$2', got '$got'"; fail=1; fi
}
check "no preload" "" "SHOW shared_preload_libraries"
version=$(sed -n "s/^default_version = '\(.*\)'/\1/p" "$repo/billing.control")
check "create extension" "$version" "CREATE EXTENSION billing; SELECT extversion FROM pg_extension WHERE extname = 'billing'"
check "account" "np-1" "SELECT tenant_id FROM billing_account_create('np-1')"
check "credit and deduct" "9.500000" \
	"SELECT billing_credit('np-1', 10, 'np-t1'); SELECT balance_after FROM billing_deduct('np-1', 0.5, 'np-t2')"
check "hold and capture" "9.000000" \
	"SELECT billing_hold('np-1', 1, 'np-h1'); SELECT balance_after FROM billing_capture('np-1', 'np-h1', 0.5, 'np-c1', final => true)"
check "a job end to end" "completed" \
	"SELECT billing_job_submit('np-1', 'k', 'np-j1', 1); SELECT billing_job_claim('w'); SELECT state FROM billing_job_complete('np-1', (SELECT job_id FROM billing.jobs WHERE idempotency_key = 'np-j1'), 0.25)"
check "the mirror reports itself disabled" "f" "SELECT enabled FROM billing_sync_status()"
check "worker settings exist only when preloaded" "" "SELECT current_setting('billing.database', true)"
check "verify" "0" "SELECT count(*) FROM billing_verify()"
exit $fail

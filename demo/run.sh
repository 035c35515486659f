#!/usr/bin/env bash
# `make demo`: build and install the billing extension, start a throwaway
# PostgreSQL 15 + redis-server on loopback (test/cluster.sh), create database
# "demo" with the extension, and run demo/workload.sql with every query echoed
# before its result.  The cluster is stopped at the end.
#
# Knobs: DEMO_KEEP=1 leaves the cluster running and prints how to connect and
# how to stop it.  The cluster lives in <repo>/tmp_demo (or
# /tmp/billing-demo-<hash> if the postgres user cannot reach the work tree),
# postgres on 127.0.0.1:64319 (and its Unix socket), redis on 127.0.0.1:63789;
# both ports lie above Linux's ephemeral range (32768-60999), so an outgoing
# connection on the machine cannot be holding them.
set -euo pipefail

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$here")
cd "$repo"
PGBIN=/usr/lib/postgresql/15/bin

bash test/deps.sh
make -s
make -s install

# Where the cluster lives.  As root, postgres runs as the `postgres` OS user,
# which must be able to reach <repo>/tmp_demo (not the case under /root); the
# Unix socket path must also stay under 107 bytes.
tmp=$repo/tmp_demo
if ((EUID == 0)); then
	mkdir -p "$tmp"
	chown postgres:postgres "$tmp"
	if ! runuser -u postgres -- test -w "$tmp" -a -x "$tmp" 2>/dev/null ||
		((${#tmp} + 5 + 20 > 107)); then
		rmdir "$tmp" 2>/dev/null || true
		tmp=/tmp/billing-demo-$(printf %s "$repo" | md5sum | cut -c1-8)
	fi
fi
export BILLING_TMP=$tmp BILLING_PGPORT=64319 BILLING_REDIS_PORT=63789 BILLING_PG_TCP=1
# the background worker mirrors database "demo" into this Redis
export BILLING_EXTRA_CONF="billing.database = 'demo'
billing.redis_host = '127.0.0.1'
billing.redis_port = $BILLING_REDIS_PORT"
eval "$(bash test/cluster.sh env)" # PGHOST, PGPORT, PGUSER, BILLING_TMP, ...

keep=${DEMO_KEEP:-0}
stop_cmd="BILLING_TMP=$BILLING_TMP BILLING_PGPORT=$BILLING_PGPORT BILLING_REDIS_PORT=$BILLING_REDIS_PORT bash $repo/test/cluster.sh stop"

# Stop the cluster on any exit (failure or Ctrl-C included) unless DEMO_KEEP=1.
on_exit() {
	local rc=$?
	if [[ $keep == 1 ]]; then
		if ((rc != 0)); then
			echo "demo: failed (exit $rc); the cluster is left running (DEMO_KEEP=1); stop it with:" >&2
			echo "  $stop_cmd" >&2
		fi
	else
		bash test/cluster.sh stop >/dev/null 2>&1 || true
		if ((rc != 0)); then
			echo "demo: failed (exit $rc); the cluster was stopped; its server log was $BILLING_TMP/postgres.log" >&2
		fi
	fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

bash test/cluster.sh start

"$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -d postgres -c 'CREATE DATABASE demo'
"$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -d demo -c 'CREATE EXTENSION billing'

echo
echo "demo: database \"demo\" with CREATE EXTENSION billing; running demo/workload.sql"
echo "demo: each query is printed before its result; the errors shown are the expected ones."

# Read from stdin (not -f) so that error messages are not prefixed with
# "psql:<file>:<line>:".  2>&1 keeps errors in place among the results.
"$PGBIN/psql" -X -q -e -d demo <"$here/workload.sql" 2>&1

# The Redis mirror: wait (with a deadline) until the worker has pushed every
# committed change, then show what a gateway reads.
echo
echo "== 17. The Redis mirror: what gateways read (pushed by the background worker after each commit)"
for _ in $(seq 1 200); do
	state=$("$PGBIN/psql" -X -At -d demo -c \
		"SELECT connected AND dirty_accounts = 0 AND NOT full_resync_pending AND last_full_resync_at IS NOT NULL FROM billing_sync_status()")
	[[ $state == t ]] && break
	sleep 0.1
done
"$PGBIN/psql" -X -q -d demo -c '\pset footer off' \
	-c "SELECT connected, dirty_accounts, lag, pushed, full_resyncs, last_error FROM billing.sync_status"
for t in acme-ai lingua-gmbh; do
	echo "redis-cli HGETALL 'billing:{$t}'   (amounts in micro-units)"
	redis-cli -h 127.0.0.1 -p "$BILLING_REDIS_PORT" --no-raw HGETALL "billing:{$t}" | paste - - | sed 's/^/   /'
done
echo "   The database says (billing.balances, in units):"
"$PGBIN/psql" -X -q -d demo -c '\pset footer off' \
	-c "SELECT tenant_id, balance, on_hold, available, version FROM billing.balances WHERE tenant_id IN ('acme-ai', 'lingua-gmbh') ORDER BY 1"

echo
echo "demo: finished.  The cluster: postgres on 127.0.0.1:$PGPORT (socket in $PGHOST), database demo,"
echo "      user postgres; redis on 127.0.0.1:$BILLING_REDIS_PORT; data and server log in $BILLING_TMP."
if [[ $keep == 1 ]]; then
	echo "demo: it keeps running (DEMO_KEEP=1)."
	echo "  connect: psql -h 127.0.0.1 -p $PGPORT -U postgres demo"
	echo "  stop:    $stop_cmd"
else
	bash test/cluster.sh stop
	echo "demo: cluster stopped.  DEMO_KEEP=1 make demo keeps it running for poking around."
fi

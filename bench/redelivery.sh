#!/usr/bin/env bash
# How fast the worker sends the outbox again after Redis lost it: N events
# already delivered, then FLUSHALL; the time until billing:events holds all
# of them again, and how long the worker's reads of the outbox took.
#
#   bash bench/redelivery.sh        # REDELIVERY_EVENTS=500000 REDELIVERY_TENANTS=1000
#
# A throwaway cluster of its own (test/cluster.sh: preloaded, fsync off,
# its own redis-server; BILLING_TMP=<repo>/tmp_redelivery, ports 54351 and
# 63821).  The events are written straight into billing.events (the test
# harness, not the API: delivered an hour ago, one tenant in
# REDELIVERY_TENANTS after another), the worker is pointed at Redis and its
# watermark is written, then FLUSHALL.  Prints events/s of the redelivery
# and, from pg_stat_statements, the mean time of the worker's outbox read
# per batch (billing.sync_batch_size events).  Each batch reads from where
# the last one ended (events_id_idx), so that time stays flat however
# large the outbox; a read that scans the outbox grows with it.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$here")
cluster=$repo/test/cluster.sh
events=${REDELIVERY_EVENTS:-500000}
tenants=${REDELIVERY_TENANTS:-1000}
export BILLING_TMP=${BILLING_TMP:-$repo/tmp_redelivery}
export BILLING_PGPORT=${BILLING_PGPORT:-54351} BILLING_REDIS_PORT=${BILLING_REDIS_PORT:-63821}
export BILLING_PRELOAD=1 BILLING_FSYNC=off
export BILLING_EXTRA_CONF="billing.database = 'redelivery'
billing.redis_host = ''
billing.redis_port = $BILLING_REDIS_PORT
billing.check_interval = 0
billing.events_all_maxlen = 1000000000
shared_preload_libraries = 'billing,pg_stat_statements'
pg_stat_statements.track = all"

say() { printf '[redelivery] %s\n' "$*"; }
cleanup() { bash "$cluster" stop >/dev/null 2>&1 || true; }
trap cleanup EXIT

make -C "$repo" -s install >/dev/null
bash "$cluster" start >/dev/null
eval "$(bash "$cluster" env)"
q() { psql -X -q -v ON_ERROR_STOP=1 -d redelivery -At "$@"; }
rc() { redis-cli -h 127.0.0.1 -p "$BILLING_REDIS_PORT" "$@" </dev/null; }

psql -X -q -d postgres -c 'CREATE DATABASE redelivery'
q -c 'CREATE EXTENSION billing' -c 'CREATE EXTENSION pg_stat_statements'
say "writing $events delivered events over $tenants tenants"
q -c "ALTER TABLE billing.events DISABLE TRIGGER USER" \
	-c "INSERT INTO billing.events (tenant_id, seq, type, payload, created_at, delivered_at)
	    SELECT 'r-' || (i % $tenants), i / $tenants + 1, 'balance.low',
	           '{\"balance\": 1.000000, \"threshold\": 5.000000}',
	           now() - interval '1 hour', now() - interval '1 hour'
	      FROM generate_series(0, $events - 1) AS i" \
	-c "ALTER TABLE billing.events ENABLE TRIGGER USER" \
	-c "ANALYZE billing.events"
q -c "ALTER SYSTEM SET billing.redis_host = '127.0.0.1'" -c 'SELECT pg_reload_conf()' >/dev/null
for _ in $(seq 600); do
	[[ -n $(rc GET billing:events:watermark) ]] && break
	sleep 0.5
done
[[ -n $(rc GET billing:events:watermark) ]] || { say "the worker never wrote its watermark"; exit 1; }
q -c 'SELECT pg_stat_statements_reset()' >/dev/null
rc CONFIG RESETSTAT >/dev/null
say "FLUSHALL"
t0=$(date +%s.%N)
rc FLUSHALL >/dev/null
for _ in $(seq 36000); do
	[[ $(rc XLEN billing:events) -ge $events ]] && break
	sleep 0.1
done
t1=$(date +%s.%N)
got=$(rc XLEN billing:events)
[[ $got -ge $events ]] || { say "only $got of $events events came back"; exit 1; }
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
say "$events events sent again in $secs s: $(awk -v n="$events" -v s="$secs" 'BEGIN { printf "%d", n / s }') events/s"
q -F ' ' -c "SELECT calls, round(mean_exec_time::numeric, 2), round(max_exec_time::numeric, 2)
               FROM pg_stat_statements WHERE query LIKE '%UNION ALL%billing.events%'" |
	while read -r calls mean max; do
		say "the outbox read: $calls batches, mean $mean ms, max $max ms"
	done
# a batch is one MULTI/EXEC: Redis serves no other client while it runs
rc INFO commandstats | tr -d '\r' | awk -F'[:=,]' '/^cmdstat_exec:/ {
	printf "[redelivery] EXEC (one batch; Redis serves no other client meanwhile): %s calls, %s us each on average\n", $3, $7 }'

#!/usr/bin/env bash
# bench/sync.sh -- the Redis mirror's cost and lag (performance issue):
#   * billing_deduct TPS with the background worker pushing to Redis vs idle,
#     interleaved rounds in the same run (8 clients, -j 2);
#   * commit -> Redis lag p50/p99 under a paced load (pgbench -R, default
#     5,000 deducts/s), sampled from billing_sync_status() every second.
# Writes bench/SYNC_RESULTS.md (BENCH_OUT to write elsewhere).
# Knobs: SYNC_SECONDS (15), SYNC_ROUNDS (3), SYNC_RATE (5000), BENCH_OUT.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
secs=${SYNC_SECONDS:-15} rounds=${SYNC_ROUNDS:-3} rate=${SYNC_RATE:-5000} out=${BENCH_OUT:-$repo/bench}
bash test/deps.sh
make -s install >/dev/null
export BILLING_TMP=$repo/tmp_bench_sync BILLING_PGPORT=54349 BILLING_REDIS_PORT=63819 BILLING_FSYNC=on
export BILLING_EXTRA_CONF="billing.database = 'bench'
billing.redis_host = '127.0.0.1'
billing.redis_port = $BILLING_REDIS_PORT
billing.check_interval = 0"
trap 'bash test/cluster.sh stop >/dev/null 2>&1 || true' EXIT
bash test/cluster.sh start
eval "$(bash test/cluster.sh env)"
PGB=$BILLING_PGBIN
sql() { "$PGB/psql" -X -q -At -v ON_ERROR_STOP=1 -d bench "$@"; }
"$PGB/psql" -X -q -d postgres -c "CREATE DATABASE bench"
sql -c "CREATE EXTENSION billing" \
	-c "SELECT count(*) FROM generate_series(1, 1000) g, billing_account_create('t' || g)" \
	-c "SELECT count(*) FROM generate_series(1, 1000) g, billing_credit('t' || g, 1000000000, 'top-' || g)" >/dev/null
script=$(mktemp)
cat >"$script" <<'PGB'
\set t random(1, 1000)
\set r random(1, 9000000000000000)
SELECT balance_after FROM billing_deduct('t' || :t, 0.000001, 's-' || :client_id || '-' || :r);
PGB
worker() {	# on | off: point the worker at Redis or leave it idle (reload, no restart)
	if [[ $1 == on ]]; then sql -c "ALTER SYSTEM RESET billing.redis_host"; else sql -c "ALTER SYSTEM SET billing.redis_host = ''"; fi
	sql -c "SELECT pg_reload_conf()" >/dev/null
	sleep 2
}
tps() { "$PGB/pgbench" -n -M prepared -c 8 -j 2 -T "$secs" "$@" -f "$script" bench 2>&1 | sed -nE 's/^tps = ([0-9.]+).*/\1/p'; }
declare -a on off
for r in $(seq 1 "$rounds"); do
	worker off; off+=("$(tps)"); echo "round $r: worker off ${off[-1]} TPS"
	worker on; on+=("$(tps)"); echo "round $r: worker on  ${on[-1]} TPS"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
m_on=$(median "${on[@]}") m_off=$(median "${off[@]}")
ratio=$(awk -v a="$m_on" -v b="$m_off" 'BEGIN {printf "%.2f", a / b}')

# lag under a paced load: sample the worker's recent lags every second
worker on
samples=$(mktemp)
( for _ in $(seq 1 "$secs"); do sleep 1; sql -c "SELECT coalesce(recent_lag_p50_ms, 0), coalesce(recent_lag_p99_ms, 0), extract(epoch FROM lag) * 1000 FROM billing_sync_status()" >>"$samples"; done ) &
sampler=$!
achieved=$(tps -R "$rate")
wait $sampler
p50=$(cut -d'|' -f1 "$samples" | sort -g | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}')
p99=$(cut -d'|' -f2 "$samples" | sort -g | tail -n 1)
maxlag=$(cut -d'|' -f3 "$samples" | sort -g | tail -n 1)
converged=$(sql -c "SELECT dirty_accounts = 0 FROM billing_sync_status()")
echo "lag at $achieved TPS: p50 $p50 ms (median of 1-s samples), p99 $p99 ms (worst 1-s sample), max pending age $maxlag ms"

cat >"$out/SYNC_RESULTS.md" <<MD
# Redis mirror: cost and lag

Measured by \`bench/sync.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs; PostgreSQL $("$PGB/postgres" --version | awk '{print $3}'),
fsync and synchronous_commit on; 1,000 tenants; pgbench \`-n -M prepared -c 8 -j 2 -T $secs\` on the same machine;
the worker pushes to a local redis-server (\`billing.check_interval = 0\`: no periodic full check during the runs).
Load average before: $(cut -d' ' -f1 /proc/loadavg).

| worker | TPS per round | median |
| --- | --- | ---: |
| off (idle: \`billing.redis_host = ''\`) | ${off[*]} | $m_off |
| on (pushing every commit) | ${on[*]} | $m_on |

Deduct TPS with the worker on = **$ratio ×** worker off (target ≥ 0.90).

Commit → Redis lag at a paced **$achieved TPS** (target rate $rate/s; pgbench \`-R\`):
p50 **$p50 ms** (median of the 1-second samples of the worker's last 1,024 pushes), p99 **$p99 ms**
(the worst 1-second sample), oldest unpushed change at most $maxlag ms; all pushed after the run: $converged.
(Target: p99 < 50 ms at 5,000 deductions/s.)
MD
echo "wrote $out/SYNC_RESULTS.md"

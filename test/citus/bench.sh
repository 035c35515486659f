#!/usr/bin/env bash
# test/citus/bench.sh: billing_deduct (or billing_charge, the charge engine)
# through the Citus coordinator vs a single node, in the same run, on the lab of test/citus/lab.sh (which must be running
# with `lab.sh billing N` done).  Prints one line per measurement and a summary.
#
#   PG_CONFIG=... bash test/citus/bench.sh [rounds]
#
# Each round: BENCH_CLIENTS clients (-j 2) for BENCH_SECONDS on the single node,
# then on the coordinator; then 1 client on each.  Calls are
# SELECT entry_id FROM <function>('t<random 1..N>', 0.000001, '<random trace>')
# in simple protocol (a constant tenant: Citus delegates the call).
# Environment: BENCH_FUNCTION (billing_deduct | billing_charge), BENCH_SECONDS
# (15), BENCH_CLIENTS (8), BENCH_TENANTS (100),
# BENCH_PROTOCOL (simple | prepared), BENCH_SYNC (synchronous_commit of the
# database billing on every node during the run, default: unchanged).
set -euo pipefail

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
eval "$(bash "$here/lab.sh" env)"
rounds=${1:-2}
secs=${BENCH_SECONDS:-15}
clients=${BENCH_CLIENTS:-8}
tenants=${BENCH_TENANTS:-100}
protocol=${BENCH_PROTOCOL:-simple}
fn=${BENCH_FUNCTION:-billing_deduct}
case $fn in
billing_deduct | billing_charge) ;;
*) echo "BENCH_FUNCTION must be billing_deduct or billing_charge" >&2; exit 2 ;;
esac
script=$(mktemp /tmp/billing-citus-bench.XXXXXX.sql)
trap 'rm -f "$script"' EXIT
cat >"$script" <<EOF
\\set t random(1, $tenants)
\\set r random(1, 9000000000000000000)
SELECT entry_id FROM $fn('t:t', 0.000001, 'b:r');
EOF
chmod a+r "$script"

# run PORT CLIENTS -> "tps latency_ms failed"
run() {
	"$PGBIN/pgbench" -n -h "$SOCK" -p "$1" -U postgres -M "$protocol" -f "$script" \
		-c "$2" -j "$(($2 < 2 ? 1 : 2))" -T "$secs" billing 2>&1 |
		awk '/^tps/ {tps=$3} /latency average/ {lat=$4} /failed transactions/ {f=$(NF-1)}
		     END {printf "%.0f %.3f %s\n", tps, lat, f}'
}

set_sync() {
	for n in coord w1 w2 single; do
		bash "$here/lab.sh" psql "$n" -d postgres -qc "ALTER DATABASE billing $1" >/dev/null
	done
}
if [[ -n ${BENCH_SYNC:-} ]]; then
	set_sync "SET synchronous_commit = $BENCH_SYNC"
	trap 'rm -f "$script"; set_sync "RESET synchronous_commit"' EXIT
fi

declare -a s_tps c_tps s_lat c_lat
for ((r = 1; r <= rounds; r++)); do
	read -r t l f < <(run "$PORT_SINGLE" "$clients")
	echo "round $r single      $clients clients: $t tps, $l ms, failed $f"
	s_tps+=("$t")
	read -r t l f < <(run "$PORT_COORD" "$clients")
	echo "round $r coordinator $clients clients: $t tps, $l ms, failed $f"
	c_tps+=("$t")
	read -r t l f < <(run "$PORT_SINGLE" 1)
	echo "round $r single      1 client:  $t tps, $l ms, failed $f"
	s_lat+=("$l")
	read -r t l f < <(run "$PORT_COORD" 1)
	echo "round $r coordinator 1 client:  $t tps, $l ms, failed $f"
	c_lat+=("$l")
done
echo "summary ($fn): single ${s_tps[*]} tps / coordinator ${c_tps[*]} tps ($clients clients);" \
	"1 client: single ${s_lat[*]} ms / coordinator ${c_lat[*]} ms per call"
for n in coord w1 w2 single; do
	bash "$here/lab.sh" psql "$n" -d billing -Atc "SELECT '$n: verify problems', count(*) FROM billing_verify()" 2>/dev/null || true
done

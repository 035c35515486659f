#!/usr/bin/env bash
# Memory of long-running processes stays flat (NOT part of `make check`: it
# runs for 10-30 minutes on 2 cores).
#
#   bash test/worker_memory.sh
#
# A throwaway cluster (test/cluster.sh, preloaded, Redis configured) with
# WM_TENANTS accounts (2000), then:
#
# 1. the Redis worker: a loop of billing_deduct_many() calls charging every
#    account once per call, so every push batch the worker sends is full
#    (billing.sync_batch_size accounts), plus a FLUSHALL every WM_FLUSH_EVERY
#    calls (a full resync of every account), until billing_sync_status().pushed
#    has grown by WM_PUSHES (1,000,000) snapshots; the periodic consistency
#    check runs every 10 s meanwhile;
# 2. one backend running WM_DEDUCTS (100,000) billing_deduct() calls, one
#    transaction each, in one session (pgbench -c 1, so one connection), mixed
#    with 1 in 10 billing_try_deduct() rejections (recorded, then replayed) and
#    1 in 10 replays of an account's top-up (the idempotency probe).
#
# Every WM_INTERVAL seconds the process's memory is sampled: ps rss (kB) and
# RssAnon from /proc/<pid>/status (kB: private memory only). The verdict uses
# RssAnon: ps rss also counts the pages of shared_buffers the process has
# touched, which grow with the tables, not with a leak. Samples of the first
# WM_WARMUP_PCT (20) % of a run are warm-up; of the rest, the median RssAnon of
# the last third may exceed that of the first third by at most WM_BOUND_KB
# (2048) kB. The memory-context totals of the process (pg_log_backend_memory_contexts:
# TopMemoryContext's own blocks and the grand total) after warm-up and near the
# end are printed too: they show whether a leak is in palloc memory.
#
# Exit 0 = both flat, 1 = a leak (or a failure). Knobs: the WM_* above,
# BILLING_TMP (default <test cluster dir>/worker-memory), BILLING_PGPORT
# (54351), BILLING_REDIS_PORT (63821), WM_SKIP_WORKER=1, WM_SKIP_BACKEND=1.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$here")
cluster=$here/cluster.sh
PGBIN=/usr/lib/postgresql/15/bin
cd "$repo"
t_start=$SECONDS

tenants=${WM_TENANTS:-2000}
want_pushes=${WM_PUSHES:-1000000}
deducts=${WM_DEDUCTS:-100000}
interval=${WM_INTERVAL:-2}
warmup_pct=${WM_WARMUP_PCT:-20}
bound_kb=${WM_BOUND_KB:-2048}
flush_every=${WM_FLUSH_EVERY:-25}

if [[ -z ${BILLING_TMP:-} ]]; then
	BILLING_TMP=$(unset BILLING_PGPORT BILLING_REDIS_PORT; eval "$(bash "$cluster" env)"; echo "$BILLING_TMP")/worker-memory
fi
export BILLING_TMP BILLING_PGPORT=${BILLING_PGPORT:-54351} BILLING_REDIS_PORT=${BILLING_REDIS_PORT:-63821}
export BILLING_PRELOAD=1
export BILLING_EXTRA_CONF="billing.database = 'memtest'
billing.redis_host = '127.0.0.1'
billing.redis_port = $BILLING_REDIS_PORT
billing.check_interval = 10"
unset PGDATABASE PGOPTIONS PGSERVICE
eval "$(bash "$cluster" env)" # PGHOST, PGPORT, ... of our cluster
pglog=$BILLING_TMP/postgres.log
W=$BILLING_TMP/work

say() { echo "worker_memory: $*"; }
q() { bash "$cluster" psql -d memtest -qAt "$@" </dev/null; }
rcli() { redis-cli -h 127.0.0.1 -p "$BILLING_REDIS_PORT" "$@" </dev/null; }

bgpids=()
cleanup() {
	local rc=$? p
	for p in "${bgpids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	bash "$cluster" stop >/dev/null 2>&1 || true
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bash "$here/deps.sh"
make -s
make -s install
rm -f "$pglog"
bash "$cluster" start
rm -rf "$W"
mkdir -p "$W"
bash "$cluster" psql -d postgres -qc 'CREATE DATABASE memtest' </dev/null
q -c 'CREATE EXTENSION billing'
q -c "SELECT count(*) FROM generate_series(1, $tenants) AS i, LATERAL billing_account_create('w-' || i)" \
	-c "SELECT count(*) FROM generate_series(1, $tenants) AS i, LATERAL billing_credit('w-' || i, 1000000, 'w-' || i || '-topup')" \
	-c "SELECT count(*) FROM generate_series(1, $tenants, 10) AS i, LATERAL billing_api_key_create('w-' || i, 'k', 1000000, 'month')" >/dev/null
deadline=$((SECONDS + 120))
until [[ $(q -c 'SELECT connected AND full_resyncs > 0 AND dirty_accounts = 0 FROM billing_sync_status()') == t ]]; do
	((SECONDS < deadline)) || { say "the worker did not connect to Redis"; exit 1; }
	sleep 1
done
say "$tenants accounts, mirrored ($((SECONDS - t_start)) s)"

# mem PID -> "rss_kB rss_anon_kB" (empty when the process is gone)
mem() {
	local rss anon
	rss=$(ps -o rss= -p "$1" 2>/dev/null | tr -d ' ') || return 0
	anon=$(awk '/^RssAnon:/ { print $2 }' "/proc/$1/status" 2>/dev/null) || return 0
	[[ -n $rss && -n $anon ]] && echo "$rss $anon"
}

# contexts PID LABEL: log the memory contexts of PID, print its totals
ctx_n=0
contexts() {
	local pid=$1 label=$2 off lines deadline
	off=$(stat -c %s "$pglog")
	q -c "SELECT pg_log_backend_memory_contexts($pid)" >/dev/null || return 0
	deadline=$((SECONDS + 30))
	# the process logs at its next CHECK_FOR_INTERRUPTS; wait for the total line
	until lines=$(tail -c +"$((off + 1))" "$pglog" | grep -E "\[$pid\] LOG:  (level: 0; TopMemoryContext|Grand total)") &&
		grep -q 'Grand total' <<<"$lines"; do
		if ((SECONDS >= deadline)); then
			say "  $label: no memory-context dump from pid $pid within 30 s"
			return 0
		fi
		sleep 1
	done
	ctx_n=$((ctx_n + 1))
	sed -E 's/^.*LOG:  (level: 0; )?/    /' <<<"$lines" | sed "s/^/  $label /" | head -n 2
}

# verdict NAME SAMPLEFILE (lines: seconds pushed-or-count rss anon)
verdict_failed=0
verdict() {
	local name=$1 f=$2 n skip rest third first last
	n=$(wc -l <"$f")
	if ((n < 6)); then
		say "$name: only $n samples, no verdict"
		verdict_failed=1
		return
	fi
	skip=$((n * warmup_pct / 100))
	rest=$((n - skip))
	third=$((rest / 3))
	median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
	first=$(tail -n +"$((skip + 1))" "$f" | head -n "$third" | awk '{ print $4 }' | median)
	last=$(tail -n "$third" "$f" | awk '{ print $4 }' | median)
	local rss_first rss_last
	rss_first=$(tail -n +"$((skip + 1))" "$f" | head -n "$third" | awk '{ print $3 }' | median)
	rss_last=$(tail -n "$third" "$f" | awk '{ print $3 }' | median)
	say "$name: $n samples, $skip of warm-up; median RssAnon first third $first kB, last third $last kB:" \
		"growth $((last - first)) kB (bound $bound_kb kB); ps rss $rss_first -> $rss_last kB"
	if ((last - first > bound_kb)); then
		say "$name: FAIL: private memory grew by $((last - first)) kB"
		verdict_failed=1
	else
		say "$name: ok (flat)"
	fi
}

# ---------------------------------------------------------------------------
# 1. the worker under a long push run
# ---------------------------------------------------------------------------
if [[ ${WM_SKIP_WORKER:-0} != 1 ]]; then
	wpid=$(q -c 'SELECT worker_pid FROM billing_sync_status()')
	pushed0=$(q -c 'SELECT pushed FROM billing_sync_status()')
	say "1. worker pid $wpid: billing_deduct_many over all $tenants accounts in a loop (FLUSHALL every $flush_every calls) until $want_pushes more snapshots are pushed"
	# the load: one psql per call (a call = one transaction = $tenants dirty accounts)
	(
		i=0
		while :; do
			i=$((i + 1))
			q -c "SELECT count(*) FROM (SELECT array_agg('w-' || t) AS t, array_agg(0.000001::numeric) AS a,
			                                   array_agg('wm-$i-' || t) AS tr
			                              FROM generate_series(1, $tenants) AS t) AS b,
			                      LATERAL billing_deduct_many(b.t, b.a, b.tr)" >/dev/null
			if ((i % flush_every == 0)); then rcli FLUSHALL >/dev/null; fi
			echo "$i" >"$W/calls"
		done
	) &
	load=$!
	bgpids+=("$load")
	f=$W/worker.samples
	: >"$f"
	t0=$SECONDS
	ctx_done=0
	printf '%8s %10s %10s %10s\n' seconds pushed rss_kB anon_kB
	while :; do
		m=$(mem "$wpid")
		if [[ -z $m ]]; then
			say "the worker (pid $wpid) is gone"
			tail -n 20 "$pglog"
			exit 1
		fi
		pushed=$(($(q -c 'SELECT pushed FROM billing_sync_status()') - pushed0))
		echo "$((SECONDS - t0)) $pushed $m" >>"$f"
		printf '%8d %10d %10d %10d\n' "$((SECONDS - t0))" "$pushed" $m
		if ((!ctx_done && pushed >= want_pushes * warmup_pct / 100)); then
			contexts "$wpid" "after warm-up:"
			ctx_done=1
		fi
		((pushed >= want_pushes)) && break
		if ! kill -0 "$load" 2>/dev/null; then
			say "the load generator died"
			exit 1
		fi
		sleep "$interval"
	done
	contexts "$wpid" "at the end:    "
	kill "$load" 2>/dev/null || true
	wait "$load" 2>/dev/null || true
	say "worker: $pushed snapshots pushed in $((SECONDS - t0)) s by $(cat "$W/calls" 2>/dev/null || echo '?') billing_deduct_many calls;" \
		"$(q -c "SELECT 'full_resyncs=' || full_resyncs || ' repaired=' || repaired || ' failed=' || failed FROM billing_sync_status()")"
	verdict worker "$f"
fi

# ---------------------------------------------------------------------------
# 2. one backend, many deducts in one session
# ---------------------------------------------------------------------------
if [[ ${WM_SKIP_BACKEND:-0} != 1 ]]; then
	xacts=$((deducts * 10 / 8))
	say "2. one session running $xacts transactions: ~$deducts billing_deduct(), 1 in 10 a rejection, 1 in 10 a replay (pgbench -c 1 -t $xacts)"
	cat >"$W/deduct.pgbench" <<-EOF
		\set t random(1, $tenants)
		SELECT billing_deduct('w-' || :t, 0.000001, 'bk-' || :t || '-' || gen_random_uuid());
	EOF
	cat >"$W/reject.pgbench" <<-EOF
		\set t random(1, $tenants)
		SELECT status FROM billing_try_deduct('w-' || :t, 100000000, 'bkr-' || :t);
	EOF
	cat >"$W/replay.pgbench" <<-EOF
		\set t random(1, $tenants)
		SELECT replayed FROM billing_credit('w-' || :t, 1000000, 'w-' || :t || '-topup');
	EOF
	PGAPPNAME=wm-backend "$PGBIN/pgbench" -n -c 1 -j 1 -t "$xacts" \
		-f "$W/deduct.pgbench@8" -f "$W/reject.pgbench@1" -f "$W/replay.pgbench@1" memtest \
		</dev/null >"$W/pgbench.out" 2>&1 &
	bench=$!
	bgpids+=("$bench")
	bpid=
	for _ in $(seq 1 100); do
		bpid=$(q -c "SELECT pid FROM pg_stat_activity WHERE application_name = 'wm-backend'")
		[[ -n $bpid ]] && break
		sleep 0.1
	done
	[[ -n $bpid ]] || { say "pgbench's backend not found"; cat "$W/pgbench.out"; exit 1; }
	f=$W/backend.samples
	: >"$f"
	t0=$SECONDS
	bint=$(((interval + 1) / 2))
	ctx_done=0
	printf '%8s %10s %10s %10s\n' seconds deducts rss_kB anon_kB
	while kill -0 "$bench" 2>/dev/null; do
		m=$(mem "$bpid")
		[[ -n $m ]] || break
		n=$(q -c "SELECT count(*) FROM billing.entries WHERE trace_id LIKE 'bk-%'")
		echo "$((SECONDS - t0)) $n $m" >>"$f"
		printf '%8d %10d %10d %10d\n' "$((SECONDS - t0))" "$n" $m
		if ((ctx_done == 0 && n >= deducts * warmup_pct / 100)); then
			contexts "$bpid" "after warm-up:"
			ctx_done=1
		elif ((ctx_done == 1 && n >= deducts * 85 / 100)); then
			contexts "$bpid" "at 85 %:      "
			ctx_done=2
		fi
		sleep "$bint"
	done
	if ! wait "$bench"; then
		say "pgbench failed:"
		tail -n 20 "$W/pgbench.out"
		exit 1
	fi
	say "backend: $(grep -E '^(number of transactions actually processed|tps)' "$W/pgbench.out" | tr '\n' ' ')"
	verdict backend "$f"
fi

if grep -E 'terminated by signal' "$pglog"; then
	say "a server process crashed"
	verdict_failed=1
fi
say "runtime $((SECONDS - t_start)) s"
if ((verdict_failed)); then
	say "FAIL (samples in $W)"
	exit 1
fi
say "PASS: memory flat"

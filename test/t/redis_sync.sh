#!/usr/bin/env bash
# The Redis mirror (background worker, src/worker.c + src/sync.c) against a
# real redis-server, with faults: commit -> Redis visibility, rolled-back and
# stale changes never visible, holds/limits/API keys, hold expiry by the
# maintenance, Redis killed / restarted / FLUSHALL'd during a stream of
# deductions, the worker terminated and kill -9'd, the server crashed
# (pg_ctl stop -m immediate), drift repair by the periodic check, and the lag
# under pgbench load.
#
# It starts its OWN throwaway cluster + redis (test/cluster.sh with
# BILLING_TMP=<BILLING_TMP>/redis-sync and the ports + 1), so it can kill and
# restart them freely without touching the main test cluster; everything is
# stopped on exit. Clients: psql and redis-cli only (plus pgbench for the lag
# run). "Converged" = for every account, billing.sync_snapshot() (every field
# but synced_at_ms, plus version) equals HGETALL of billing:{tenant} and of
# billing:{tenant}:key:<id>, see converged().
#
# Prints "ok - ..." / "not ok - ..." per check and the totals; exits 1 on a failure.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$(dirname "$here")")
cluster=$repo/test/cluster.sh
PGBIN=/usr/lib/postgresql/15/bin
started_at=$SECONDS

# Derive our own cluster from the main one's settings (defaults if run by hand).
if [[ -z ${BILLING_TMP:-} || -z ${BILLING_PGPORT:-} || -z ${BILLING_REDIS_PORT:-} ]]; then
	eval "$(bash "$cluster" env)"
fi
export BILLING_TMP="$BILLING_TMP/redis-sync"
export BILLING_PGPORT=$((BILLING_PGPORT + 1))
export BILLING_REDIS_PORT=$((BILLING_REDIS_PORT + 1))
export BILLING_PRELOAD=1
# synchronous_commit = on: an acknowledged commit must survive a crash of the
# server processes (scenario 8); fsync may stay off (the OS does not crash).
export BILLING_EXTRA_CONF="billing.database = 'sync_test'
billing.redis_host = '127.0.0.1'
billing.redis_port = $BILLING_REDIS_PORT
billing.check_interval = 2
billing.maintenance_interval = 200
billing.sync_max_dirty = 1000
billing.sync_batch_size = 50
synchronous_commit = on"
unset PGDATABASE PGOPTIONS PGSERVICE
eval "$(bash "$cluster" env)" # PGHOST, PGPORT, PGDATA, ... of OUR cluster (pgbench)
W=$BILLING_TMP/work
pglog=$BILLING_TMP/postgres.log
rport=$BILLING_REDIS_PORT

bgpids=()
cleanup() {
	local rc=$? p
	for p in "${bgpids[@]}"; do
		kill "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	bash "$cluster" stop >/dev/null 2>&1 || true
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
q() { bash "$cluster" psql -d sync_test -qAt "$@" </dev/null; }
rc() { redis-cli -h 127.0.0.1 -p "$rport" "$@" </dev/null; }
st() { q -c "SELECT $1 FROM billing_sync_status()"; } # st COLUMN(S)
# ok, not_ok, check, check_true, info, wait_until, now_ms, tap_summary
. "$repo/test/lib/tap.sh"

# SNAP_SQL, DUMP_LUA and converged(): Redis vs the database (test/lib/mirror.sh)
. "$repo/test/lib/mirror.sh"
# check_converged DESCRIPTION [TIMEOUT_S]: wait for convergence, print the diff if not.
check_converged() {
	if wait_until "${2:-30}" converged; then
		ok "$1 (converged in ${WAITED_MS} ms)"
	else
		not_ok "$1 (not converged after ${WAITED_MS} ms)" \
			"diff database (<) vs redis (>):" \
			"$(diff <(echo "$CONV_DB") <(echo "$CONV_REDIS") | head -n 20 || true)"
	fi
}

hget() { rc HGET "$1" "$2"; }
hash_is() { [[ $(hget "$1" "$2") == "$3" ]]; } # hash_is KEY FIELD VALUE
# db value of an account column (micro-units etc.)
acc() { q -c "SELECT $2 FROM billing.accounts WHERE tenant_id = '$1'"; }

# stream NAME COUNT PREFIX NTENANTS [stop-on-error]: COUNT deducts of 0.01 on
# PREFIX-1..PREFIX-NTENANTS, one psql per call; acknowledged trace ids go to
# $W/NAME.acked, failures to $W/NAME.failed, the attempts so far to $W/NAME.n.
stream() {
	local name=$1 n=$2 pre=$3 nt=$4 stop=${5:-} i out
	: >"$W/$name.acked"
	: >"$W/$name.failed"
	progress "$name" 0
	for ((i = 1; i <= n; i++)); do
		if out=$(q -c "SELECT trace_id FROM billing_deduct('$pre-$((i % nt + 1))', 0.01, '$name-$i')" 2>>"$W/$name.err"); then
			echo "$out" >>"$W/$name.acked"
		else
			echo "$i" >>"$W/$name.failed"
			if [[ -n $stop ]]; then
				progress "$name" "$i"
				break
			fi
		fi
		progress "$name" "$i"
	done
}
progress() { # progress NAME N: written atomically, so a reader never sees an empty file
	echo "$2" >"$W/$1.n.tmp"
	mv -f "$W/$1.n.tmp" "$W/$1.n"
}
stream_n() {
	local n
	n=$(cat "$W/$1.n" 2>/dev/null) || true
	echo "${n:-0}"
}
stream_at_least() { (($(stream_n "$1") >= $2)); } # stream_at_least NAME N
lines() { if [[ -s $1 ]]; then wc -l <"$1"; else echo 0; fi; }
start_stream() { # start_stream NAME ... -> STREAM_PID
	progress "$1" 0 # before the background job starts: never a stale count
	stream "$@" &
	STREAM_PID=$!
	bgpids+=("$STREAM_PID")
}
accounts() { # accounts PREFIX N CREDIT: create PREFIX-1..N with CREDIT each
	q -c "SELECT count(*) FROM generate_series(1, $2) AS i, LATERAL billing_account_create('$1-' || i)" \
		-c "SELECT count(*) FROM generate_series(1, $2) AS i, LATERAL billing_credit('$1-' || i, $3, '$1-' || i || '-topup')" >/dev/null
}
worker_pid() { q -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'billing sync'" 2>/dev/null; }
worker_is_new() { # worker_is_new OLD_PID: a worker runs and it is not OLD_PID
	local p
	p=$(worker_pid) || return 1
	[[ -n $p && $p != "$1" ]]
}
pg_up() { q -c 'SELECT 1' >/dev/null 2>&1; }
status_is() { [[ $(st "$1" 2>/dev/null) == "$2" ]]; } # status_is EXPR VALUE
log_from() { tail -c +"$(($1 + 1))" "$pglog"; } # the server log after byte offset
log_size() { stat -c %s "$pglog"; }
log_has() { log_from "$1" | grep -F -- "$2" >/dev/null; } # log_has OFFSET TEXT (no -q: pipefail + SIGPIPE)
# worker_saw_reload OFFSET SETTING VALUE: the postmaster logged the new value
# (it signals its children right after), then two commits made afterwards
# reached Redis: the worker has been through its loop (which reloads first) since.
markers=0
worker_saw_reload() {
	local i v
	wait_until 30 log_has "$1" "parameter \"$2\" changed to \"$3\"" || return 1
	for i in 1 2; do
		markers=$((markers + 1))
		v=$(q -c "SELECT version FROM billing_credit('s1', 0.000001, 'reload-marker-$markers')") || return 1
		wait_until 30 hash_is 'billing:{s1}' version "$v" || return 1
	done
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------
info "own cluster: BILLING_TMP=$BILLING_TMP pg port $BILLING_PGPORT, redis port $rport"
rm -f "$pglog"
bash "$cluster" start
rm -rf "$W"
mkdir -p "$W"
bash "$cluster" psql -d postgres -qc 'CREATE DATABASE sync_test' </dev/null
q -c 'CREATE EXTENSION billing'
check "the worker runs in its own cluster" 1 "$(wait_until 30 worker_is_new 0 && echo 1 || echo 0)"
check_true "the worker connects to redis" wait_until 30 status_is "connected AND full_resyncs > 0" t
check "billing_sync_status reports enabled and our redis run_id" \
	"t|$(rc info server | tr -d '\r' | sed -n 's/^run_id://p')" "$(st "enabled, redis_run_id")"
info "setup done in $((SECONDS - started_at)) s"

# ---------------------------------------------------------------------------
# 1. a deduct becomes visible in Redis; commit -> visible time
# ---------------------------------------------------------------------------
echo "# 1. deduct -> Redis"
q -c "SELECT billing_account_create('s1')" -c "SELECT billing_credit('s1', 100, 's1-topup')" >/dev/null
check_converged "1: new account with a top-up is mirrored"
v0=$(acc s1 version)
target=$((v0 + 1))
# poll Redis as fast as redis-cli goes, in the background, and note when the new version shows
(
	deadline=$(($(now_ms) + 30000))
	while (($(now_ms) < deadline)); do
		if [[ $(rc HGET 'billing:{s1}' version) == "$target" ]]; then
			echo "${EPOCHREALTIME/./}" >"$W/s1.visible"
			exit 0
		fi
	done
	exit 1
) &
poller=$!
bgpids+=("$poller")
# clock_timestamp() after the deduct, inside its transaction: the commit follows at once
read -r dver commit_us < <(q -F' ' -c "SELECT d.version, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
                                         FROM billing_deduct('s1', 1.234567, 's1-d1') AS d") || true
if wait "$poller"; then
	vis_us=$(cat "$W/s1.visible")
	lag1=$(((vis_us - commit_us) / 1000))
	ok "1: the deduct (version $dver) is visible in Redis"
	info "1: commit -> visible in Redis: ${lag1} ms (upper bound: includes one redis-cli round trip)"
else
	not_ok "1: the deduct (version $dver) is visible in Redis within 30 s" "redis version: $(hget 'billing:{s1}' version)"
fi
check "1: Redis balance/available/version of s1" \
	"$(acc s1 "balance_micros || ' ' || (balance_micros + credit_limit_micros - holds_micros) || ' ' || version")" \
	"$(hget 'billing:{s1}' balance) $(hget 'billing:{s1}' available) $(hget 'billing:{s1}' version)"
check "1: balance in micro-units" 98765433 "$(hget 'billing:{s1}' balance)"
check_converged "1: Redis equals the database"

# ---------------------------------------------------------------------------
# 2. a rolled-back deduct never becomes visible
# ---------------------------------------------------------------------------
echo "# 2. rollback"
q -c "SELECT billing_account_create('s2')" -c "SELECT billing_credit('s2', 10, 's2-topup')" >/dev/null
check_converged "2: s2 mirrored"
s1_before="$(hget 'billing:{s1}' version) $(hget 'billing:{s1}' balance)"
q -c 'BEGIN' -c "SELECT billing_deduct('s1', 5, 's1-rolled-back')" -c 'ROLLBACK' >/dev/null
# a savepoint rolled back inside a committed transaction: the mark stays, nothing changed
q -c 'BEGIN' -c 'SAVEPOINT a' -c "SELECT billing_deduct('s1', 7, 's1-rolled-back-sp')" \
	-c 'ROLLBACK TO SAVEPOINT a' -c "SELECT billing_deduct('s2', 1, 's2-d1')" -c 'COMMIT' >/dev/null
v2=$(acc s2 version)
check_true "2: a later committed change of another tenant (s2 version $v2) is visible" \
	wait_until 30 hash_is 'billing:{s2}' version "$v2"
check "2: s1's hash still has the old version and balance" "$s1_before" \
	"$(hget 'billing:{s1}' version) $(hget 'billing:{s1}' balance)"
check "2: the database agrees (nothing was written for s1)" "$s1_before" "$(acc s1 "version || ' ' || balance_micros")"
check_converged "2: Redis equals the database"

# ---------------------------------------------------------------------------
# 3. a stale snapshot is ignored by the installed apply_snapshot.lua
# ---------------------------------------------------------------------------
echo "# 3. stale snapshot"
installed_lua=$("$PGBIN/pg_config" --sharedir)/extension/billing/apply_snapshot.lua
sha=$(sha1sum <"$installed_lua" | cut -c1-40)
check "3: the installed apply_snapshot.lua is lua/apply_snapshot.lua" \
	"$(sha1sum <"$repo/lua/apply_snapshot.lua" | cut -c1-40)" "$sha"
check "3: the worker loaded exactly that script (SCRIPT EXISTS before our load)" 1 "$(rc SCRIPT EXISTS "$sha")"
check "3: SCRIPT LOAD of the installed file returns its sha1" "$sha" \
	"$(redis-cli -h 127.0.0.1 -p "$rport" -x SCRIPT LOAD <"$installed_lua")"
before=$(rc HGETALL 'billing:{s1}')
v=$(hget 'billing:{s1}' version)
K=('billing:{s1}' 'billing:{s1}:pending' 'billing:{s1}:pending_amt' 'billing:{s1}:pending_ver' 'billing:{s1}:pending_key')
check "3: EVALSHA with a lower version returns 0 (stale)" 0 \
	"$(rc EVALSHA "$sha" 5 "${K[@]}" $((v - 1)) 0 status active balance 1 available 1 synced_at_ms 1)"
check "3: EVALSHA with the same version returns 0 (stale)" 0 \
	"$(rc EVALSHA "$sha" 5 "${K[@]}" "$v" 0 status active balance 2 available 2 synced_at_ms 2)"
check "3: the hash is unchanged" "$before" "$(rc HGETALL 'billing:{s1}')"
check_converged "3: Redis equals the database"

# ---------------------------------------------------------------------------
# 4. holds, limits, API keys; hold expiry by the maintenance
# ---------------------------------------------------------------------------
echo "# 4. holds, limits, keys"
q -c "SELECT billing_account_create('s4')" -c "SELECT billing_credit('s4', 100, 's4-topup')" \
	-c "SELECT billing_limits_set('s4', daily_requests => 1000, monthly_requests => 20000, daily_spend => 50,
	                              monthly_spend => 500, max_charge => 20, per_minute => 600, reason => 'test')" \
	-c "SELECT billing_api_key_create('s4', 'k1', budget => 20, budget_period => 'month')" \
	-c "SELECT billing_deduct('s4', 1.5, 's4-d1', api_key => 'k1')" \
	-c "SELECT billing_hold('s4', 10, 's4-h1', expires_in => '10 minutes')" >/dev/null
v=$(acc s4 version)
check_true "4: s4 reaches Redis (version $v)" wait_until 30 hash_is 'billing:{s4}' version "$v"
for fv in daily_requests_quota=1000 monthly_requests_quota=20000 daily_spend_cap=50000000 \
	monthly_spend_cap=500000000 max_charge=20000000 balance=98500000 holds=10000000 available=88500000 \
	day_requests=2 month_requests=2 status=active; do
	check "4: billing:{s4} $fv" "${fv#*=}" "$(hget 'billing:{s4}' "${fv%%=*}")"
done
for fv in status=active period=month budget=20000000 spent=1500000 version=$v; do
	check "4: billing:{s4}:key:k1 $fv" "${fv#*=}" "$(hget 'billing:{s4}:key:k1' "${fv%%=*}")"
done
check "4: the key hash has a reset time" 1 "$([[ $(hget 'billing:{s4}:key:k1' resets_at_ms) =~ ^[0-9]{13}$ ]] && echo 1 || echo 0)"
check_converged "4: Redis equals the database"

# a hold of 1 second: lowers available, then the maintenance expires it and
# available rises in Redis without any further client call
vh=$(q -c "SELECT count(*) FROM billing_hold('s4', 3, 's4-h2', expires_in => '1 second')" \
	-c "SELECT version FROM billing.accounts WHERE tenant_id = 's4'" | tail -n1)
expires_ms=$(q -c "SELECT (extract(epoch FROM expires_at) * 1000)::bigint FROM billing.holds WHERE tenant_id = 's4' AND trace_id = 's4-h2'")
seen_hold() { [[ $(hget 'billing:{s4}' version) -ge $vh ]]; }
if wait_until 30 seen_hold; then
	check "4: the 1-second hold shows in Redis (holds, available)" "13000000 85500000" \
		"$(hget 'billing:{s4}' holds) $(hget 'billing:{s4}' available)"
else
	not_ok "4: the 1-second hold reaches Redis" "redis version $(hget 'billing:{s4}' version), want >= $vh"
fi
# from here on: Redis only, no database call until available rose
expired_in_redis() { [[ $(hget 'billing:{s4}' available) == 88500000 ]]; }
if wait_until 30 expired_in_redis; then
	ok "4: the expired hold raised available in Redis without a client call ($(($(now_ms) - expires_ms)) ms after expires_at)"
else
	not_ok "4: the expired hold raised available in Redis" "available $(hget 'billing:{s4}' available)"
fi
check "4: the expiry was a new version (maintenance wrote it)" 1 "$((($(hget 'billing:{s4}' version) > vh)) && echo 1 || echo 0)"
check "4: the database expired the hold" expired "$(q -c "SELECT status FROM billing.holds WHERE tenant_id = 's4' AND trace_id = 's4-h2'")"
check_converged "4: Redis equals the database after the expiry"

# account status and key status changes. The key check runs with the periodic
# consistency check OFF, so only the normal push path can deliver it.
q -c "SELECT billing_account_update('s4', status => 'suspended', reason => 'test')" >/dev/null
check_true "4: account status suspended reaches Redis" wait_until 30 hash_is 'billing:{s4}' status suspended
q -c "SELECT billing_account_update('s4', status => 'active', reason => 'test')" >/dev/null
check_true "4: account status active again reaches Redis" wait_until 30 hash_is 'billing:{s4}' status active
off=$(log_size)
q -c 'ALTER SYSTEM SET billing.check_interval = 0' -c 'SELECT pg_reload_conf()' >/dev/null
check_true "4: the worker applied the reload (check_interval = 0)" worker_saw_reload "$off" billing.check_interval 0
check_converged "4: Redis equals the database after the reload"
q -c "SELECT billing_api_key_update('s4', 'k1', status => 'suspended')" >/dev/null
if wait_until 10 hash_is 'billing:{s4}:key:k1' status suspended; then
	ok "4: API key status suspended reaches Redis by the normal push (${WAITED_MS} ms)"
else
	not_ok "4: API key status suspended reaches Redis by the normal push (consistency check off)" \
		"redis status=$(hget 'billing:{s4}:key:k1' status) version=$(hget 'billing:{s4}:key:k1' version);" \
		"database status=$(q -c "SELECT status FROM billing.api_keys WHERE tenant_id = 's4' AND key_id = 'k1'") account version=$(acc s4 version)"
fi
off=$(log_size)
q -c 'ALTER SYSTEM RESET billing.check_interval' -c 'SELECT pg_reload_conf()' >/dev/null
check_true "4: the worker applied the reload (check_interval = 2 again)" worker_saw_reload "$off" billing.check_interval 2
check_converged "4: Redis equals the database (check_interval back to 2 s)"

# ---------------------------------------------------------------------------
# 5. Redis killed during a stream of deductions, restarted
# ---------------------------------------------------------------------------
redis_outage() { # redis_outage LABEL HOW COUNT
	local label=$1 how=$2 count=$3 name=$1 failed0 failed1 down_ms off run0 t_down t_up pid
	accounts "$name" 5 1000
	check_converged "$label: accounts mirrored before the outage"
	failed0=$(st failed)
	run0=$(st redis_run_id)
	off=$(log_size)
	start_stream "$name" "$count" "$name" 5
	wait_until 30 stream_at_least "$name" $((count / 5)) || true
	case $how in
	shutdown) rc shutdown nosave >/dev/null 2>&1 || true ;;
	kill9)
		pid=$(cat "$BILLING_TMP/redis/redis.pid")
		kill -9 "$pid"
		;;
	esac
	t_down=$(now_ms)
	info "$label: redis stopped ($how) after $(stream_n "$name") of $count deductions"
	check_true "$label: billing_sync_status shows the outage (connected f, failed > $failed0, last_error set)" \
		wait_until 30 status_is "NOT connected AND failed > $failed0 AND last_error IS NOT NULL AND last_error_at IS NOT NULL" t
	info "$label: during the outage: $(st "'failed=' || failed || ' last_error=' || last_error || ' dirty=' || dirty_accounts || ' lag=' || lag")"
	wait_until 30 stream_at_least "$name" $((count / 2)) || true
	failed1=$(st failed)
	down_ms=$(($(now_ms) - t_down))
	info "$label: redis restarted after $(stream_n "$name") of $count deductions ($down_ms ms down; $((failed1 - failed0)) failed attempts)"
	bash "$cluster" redis-start >/dev/null
	# README: "retries with backoff (100 ms doubling to 5 s)": at most this many
	# attempts fit in the outage (+ 2: the failed push that found the outage, rounding)
	local allowed=2 t=0 b=100
	while ((t <= down_ms)); do
		allowed=$((allowed + 1)) t=$((t + b)) b=$((b * 2 > 5000 ? 5000 : b * 2))
	done
	check "$label: the worker backs off while Redis is down (failed attempts in $down_ms ms <= $allowed)" 1 \
		"$((failed1 - failed0 <= allowed ? 1 : 0))"
	t_up=$(now_ms)
	if [[ $(stream_n "$name") -lt $count ]]; then
		ok "$label: redis came back while the stream was still running"
	else
		info "$label: the stream had already ended when redis came back"
	fi
	wait "$STREAM_PID" || true
	check "$label: all $count deductions succeeded (backends never wait for Redis)" "$count 0" \
		"$(lines "$W/$name.acked") $(lines "$W/$name.failed")"
	check_converged "$label: Redis equals the database after the restart"
	info "$label: converged $(($(now_ms) - t_up)) ms after redis came back"
	check "$label: billing_sync_status connected again, with the new run_id, failures kept" \
		"t|$(rc info server | tr -d '\r' | sed -n 's/^run_id://p')|t" \
		"$(st "connected, redis_run_id, failed > $failed0")"
	check "$label: the run_id changed" 1 "$([[ $(st redis_run_id) != "$run0" ]] && echo 1 || echo 0)"
	check "$label: one 'unavailable' log line for the outage" 1 "$(log_from "$off" | grep -c 'billing sync: Redis at .* unavailable' || true)"
	check "$label: one 'connected again' log line" 1 "$(log_from "$off" | grep -c 'connected to Redis at .* again' || true)"
}
echo "# 5. Redis killed during a stream"
redis_outage 5a shutdown 200
redis_outage 5b kill9 100

# ---------------------------------------------------------------------------
# 6. FLUSHALL during a stream
# ---------------------------------------------------------------------------
echo "# 6. FLUSHALL"
accounts s6 5 1000
check_converged "6: accounts mirrored"
fr=$(st full_resyncs)
start_stream s6 100 s6 5
wait_until 30 stream_at_least s6 30 || true
rc FLUSHALL >/dev/null
info "6: FLUSHALL after $(stream_n s6) of 100 deductions"
wait "$STREAM_PID" || true
check "6: all deductions succeeded" "100 0" "$(lines "$W/s6.acked") $(lines "$W/s6.failed")"
check_converged "6: Redis equals the database after FLUSHALL"
check "6: a full resync ran and the marker key is back" "t 1" "$(st "full_resyncs > $fr") $(rc EXISTS 'billing:__sync__')"

# ---------------------------------------------------------------------------
# 7. the worker terminated / killed
# ---------------------------------------------------------------------------
echo "# 7. worker terminated"
accounts s7 5 1000
check_converged "7: accounts mirrored"
old=$(worker_pid)
check "7a: billing_sync_status().worker_pid is the running worker" "$old" "$(st worker_pid)"
fr=$(st full_resyncs)
check "7a: pg_terminate_backend(worker_pid) succeeds" t "$(q -c 'SELECT pg_terminate_backend(worker_pid) FROM billing_sync_status()')"
t_kill=$(now_ms)
stream s7a 20 s7 5 # while the worker is down (it restarts after bgw_restart_time = 5 s)
gone() { [[ -z $(worker_pid) ]]; }
info "7a: 20 deductions made $(($(now_ms) - t_kill)) ms after the SIGTERM"
if ! gone; then
	info "7a: a worker already runs again: the status check while it is down is skipped"
else
	# while no worker runs, the status must not claim a live, connected worker
	check "7a: while the worker is down, billing_sync_status does not report the dead worker as running and connected" \
		"f" "$(st "coalesce(worker_pid = $old AND connected, false)")"
fi
if wait_until 30 worker_is_new "$old"; then
	ok "7a: the postmaster restarted the worker ($(($(now_ms) - t_kill)) ms after SIGTERM)"
else
	not_ok "7a: the postmaster restarted the worker within 30 s"
fi
check "7a: all deductions made while the worker was down succeeded" "20 0" "$(lines "$W/s7a.acked") $(lines "$W/s7a.failed")"
check_converged "7a: Redis equals the database"
check "7a: the new worker did a full resync and reports its pid" "t|$(worker_pid)" "$(st "full_resyncs > $fr, worker_pid")"

# 7b: kill -9 of the worker while Redis is down: the postmaster restarts the
# whole cluster (crash recovery), shared memory and its dirty set are gone, so
# only the full resync at the worker's start can bring these deducts to Redis.
bash "$cluster" redis-stop >/dev/null
stream s7b 20 s7 5
check "7b: deductions while Redis is down succeeded" "20 0" "$(lines "$W/s7b.acked") $(lines "$W/s7b.failed")"
old=$(worker_pid)
kill -9 "$old"
t_kill=$(now_ms)
if wait_until 60 worker_is_new "$old"; then
	ok "7b: after kill -9 the cluster recovered and a new worker runs ($(($(now_ms) - t_kill)) ms)"
else
	not_ok "7b: after kill -9 the cluster recovered and a new worker runs within 60 s"
fi
check_true "7b: the server accepts connections" wait_until 60 pg_up
check "7b: the crash recovery is in the log" 1 "$(grep -c "background worker \"billing sync\" (PID $old) was terminated by signal 9" "$pglog" || true)"
bash "$cluster" redis-start >/dev/null
check_converged "7b: Redis equals the database (deducts made before the crash included)"
check "7b: the new worker did a full resync" t "$(st "full_resyncs > 0 AND last_full_resync_at > to_timestamp($t_kill / 1000.0)")"

# ---------------------------------------------------------------------------
# 8. server crash (pg_ctl stop -m immediate) during a stream, Redis stale
# ---------------------------------------------------------------------------
echo "# 8. server crash"
accounts s8 5 1000
check_converged "8: accounts mirrored"
start_stream s8 400 s8 5 stop-on-error
wait_until 30 stream_at_least s8 20 || true
bash "$cluster" redis-stop >/dev/null
wait_until 30 stream_at_least s8 40 || true
bash "$cluster" pg_ctl stop -m immediate -w >/dev/null
info "8: server stopped -m immediate after $(stream_n s8) deductions"
wait "$STREAM_PID" || true
acked=$(lines "$W/s8.acked")
info "8: $acked deductions acknowledged before the crash, $(lines "$W/s8.failed") failed (server gone)"
bash "$cluster" pg_ctl start -w -t 60 >/dev/null
check_true "8: the server accepts connections again" wait_until 60 pg_up
bash "$cluster" redis-start >/dev/null
in_ledger=$(q -c "SELECT count(*) FROM billing.entries WHERE tenant_id LIKE 's8-%' AND kind = 'deduct'
                   AND trace_id = ANY (string_to_array('$(paste -sd, "$W/s8.acked")', ','))")
check "8: every acknowledged deduct is in the ledger" "$acked" "$in_ledger"
check "8: some deductions were acknowledged before the crash" 1 "$(((acked >= 20)) && echo 1 || echo 0)"
check_converged "8: Redis equals the database after the crash and restart"
check "8: billing_verify() finds nothing" "" "$(q -c 'SELECT tenant_id FROM billing_verify()')"

# ---------------------------------------------------------------------------
# 9. drift repair by the periodic check
# ---------------------------------------------------------------------------
echo "# 9. drift repair"
q -c "SELECT billing_account_create('s9')" -c "SELECT billing_credit('s9', 10, 's9-topup')" >/dev/null
check_converged "9: s9 mirrored"
rep=$(st repaired)
rc HSET 'billing:{s9}' balance 123 available 123 >/dev/null
t0=$(now_ms)
if wait_until 30 converged; then
	ok "9: a hand-edited balance is repaired ($(($(now_ms) - t0)) ms)"
else
	not_ok "9: a hand-edited balance is repaired within 30 s" "balance $(hget 'billing:{s9}' balance)"
fi
check "9: billing_sync_status().repaired increased" t "$(st "repaired > $rep")"
# Redis ahead of the database (e.g. restored database): normal pushes are stale,
# the check force-applies; a deleted key hash comes back
rep=$(st repaired)
rc HSET 'billing:{s9}' version 999999999 balance 1 >/dev/null
rc DEL 'billing:{s4}:key:k1' >/dev/null
q -c "SELECT billing_deduct('s9', 1, 's9-d1')" >/dev/null
check_converged "9: a hash with a version ahead of the database and a deleted key hash are repaired"
check "9: repaired increased by at least 2" t "$(st "repaired >= $rep + 2")"

# ---------------------------------------------------------------------------
# 10. out of scope
# ---------------------------------------------------------------------------
echo "# 10. skip: a change made by a direct UPDATE as superuser is out of scope (no mark, no push until the check)"

# ---------------------------------------------------------------------------
# 11. lag under pgbench
# ---------------------------------------------------------------------------
echo "# 11. lag under pgbench"
accounts lag 100 100000
check_converged "11: 100 accounts mirrored"
rep=$(st repaired)
cat >"$W/deduct.pgbench" <<'EOF'
\set t random(1, 100)
SELECT billing_deduct('lag-' || :t, 0.01, 'pgb-' || gen_random_uuid());
EOF
if "$PGBIN/pgbench" -n -f "$W/deduct.pgbench" -c 4 -j 4 -T 10 sync_test </dev/null >"$W/pgbench.out" 2>&1; then
	ok "11: pgbench ran"
else
	not_ok "11: pgbench ran" "$(tail -n 5 "$W/pgbench.out")"
fi
info "11: $(grep -E '^(number of transactions actually processed|tps)' "$W/pgbench.out" | tr '\n' ' ')"
info "11: right after: $(st "'lag=' || lag || ' dirty=' || dirty_accounts || ' p50_ms=' || round(recent_lag_p50_ms::numeric, 2) || ' p99_ms=' || round(recent_lag_p99_ms::numeric, 2)")"
check_converged "11: Redis equals the database within 10 s after the run" 10
info "11: after converging: $(st "'lag=' || lag || ' p50_ms=' || round(recent_lag_p50_ms::numeric, 2) || ' p99_ms=' || round(recent_lag_p99_ms::numeric, 2) || ' pushed=' || pushed || ' repaired_during_run=' || (repaired - $rep)")"

# ---------------------------------------------------------------------------
# 12-17 run without the periodic check: it would repair what they test
# ---------------------------------------------------------------------------
q -c "ALTER SYSTEM SET billing.check_interval = 0" -c "SELECT pg_reload_conf()" >/dev/null

# ---------------------------------------------------------------------------
# 12. one tenant's Redis key of another type does not stall the others
# ---------------------------------------------------------------------------
echo "# 12. a bad key of one tenant"
q -c "SELECT billing_account_create('s12-bad')" -c "SELECT billing_account_create('s12-ok')" >/dev/null
check_converged "12: s12-bad and s12-ok mirrored"
rc DEL 'billing:{s12-bad}' >/dev/null
rc SET 'billing:{s12-bad}' junk >/dev/null
fails=$(st failed)
# one transaction: both tenants reach the worker in the same pipelined batch
q -c "BEGIN; SELECT billing_credit('s12-bad', 5, 's12-b1'); SELECT billing_credit('s12-ok', 5, 's12-o1'); COMMIT" >/dev/null
v=$(acc s12-ok version)
check_true "12: the other tenant of the batch is pushed (version $v)" wait_until 30 hash_is 'billing:{s12-ok}' version "$v"
check_true "12: the failure is reported in billing_sync_status (failed, last_error)" \
	wait_until 10 status_is "failed > $fails AND last_error LIKE '%s12-bad%WRONGTYPE%'" t
check "12: the worker stays connected" t "$(st connected)"
check "12: the bad key is left as it is" junk "$(rc GET 'billing:{s12-bad}')"
rc DEL 'billing:{s12-bad}' >/dev/null
check_converged "12: once the key is removed the tenant is pushed again (retried every 5 s)"

# ---------------------------------------------------------------------------
# 13. an account locked by a long transaction, with a due hold, does not
#     stall the mirror (the worker's maintenance skips it)
# ---------------------------------------------------------------------------
echo "# 13. a locked account with a due hold"
q -c "SELECT billing_account_create('s13-locked')" -c "SELECT billing_credit('s13-locked', 10, 's13-t')" \
	-c "SELECT billing_hold('s13-locked', 1, 's13-h', expires_in => '1 second')" \
	-c "SELECT billing_account_create('s13-other')" >/dev/null
q -c "BEGIN" -c "SELECT 1 FROM billing.accounts WHERE tenant_id = 's13-locked' FOR UPDATE" \
	-c "SELECT pg_sleep(25)" -c "COMMIT" >/dev/null 2>&1 &
locker=$!
bgpids+=("$locker")
sleep 2 # the hold is due now; the maintenance (every 200 ms) finds it
q -c "SELECT billing_credit('s13-other', 1, 's13-o1')" >/dev/null
v=$(acc s13-other version)
check_true "13: a change of another tenant is pushed while the account stays locked" \
	wait_until 10 hash_is 'billing:{s13-other}' version "$v"
check "13: the lock is still held (the test saw the stall window)" 0 "$(kill -0 "$locker" 2>/dev/null && echo 0 || echo 1)"
kill "$locker" 2>/dev/null || true
q -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(25)%' AND pid <> pg_backend_pid()" >/dev/null
hold_expired() { [[ $(q -c "SELECT status FROM billing.holds WHERE tenant_id = 's13-locked'") == expired ]]; }
check_true "13: once unlocked, the maintenance expires the hold" wait_until 30 hold_expired
check_converged "13: Redis equals the database"

# ---------------------------------------------------------------------------
# 14. tenant ids of up to 255 characters of up to 4 bytes each
# ---------------------------------------------------------------------------
echo "# 14. long tenant ids"
t14=$(printf '€%.0s' {1..100})x$(printf '𝄞%.0s' {1..150}) # 300 + 1 + 600 bytes, 251 characters
q -c "SELECT billing_account_create('$t14')" >/dev/null
check_converged "14: mirrored"
fr=$(st full_resyncs)
for i in 1 2 3; do q -c "SELECT billing_credit('$t14', 1, 's14-$i')" >/dev/null; done
v=$(acc "$t14" version)
check_true "14: each change is pushed (version $v)" wait_until 30 hash_is "billing:{$t14}" version "$v"
check "14: without a full resync" "$fr" "$(st full_resyncs)"

# ---------------------------------------------------------------------------
# 15. changes in another database of the cluster are not the mirror's
# ---------------------------------------------------------------------------
echo "# 15. another database"
bash "$cluster" psql -d postgres -qc 'CREATE DATABASE sync_other' </dev/null
bash "$cluster" psql -d sync_other -qAt -c 'CREATE EXTENSION billing' \
	-c "SELECT count(*) FROM generate_series(1, 1200) AS i, billing_account_create('o-' || i) AS a" </dev/null >/dev/null
fr=$(st full_resyncs)
q -c "SELECT billing_account_create('s15')" -c "SELECT billing_credit('s15', 1, 's15-t')" >/dev/null
v=$(acc s15 version)
check_true "15: our change is pushed" wait_until 30 hash_is 'billing:{s15}' version "$v"
bash "$cluster" psql -d sync_other -qAt -c "SELECT count(*) FROM generate_series(1, 1200) AS i, billing_credit('o-' || i, 1, 'o-t' || i) AS c" </dev/null >/dev/null
q -c "SELECT billing_credit('s15', 1, 's15-t2')" >/dev/null
v=$(acc s15 version)
check_true "15: our next change is pushed" wait_until 30 hash_is 'billing:{s15}' version "$v"
check "15: 2 x 1,200 changes in sync_other (more than billing.sync_max_dirty) caused no full resync" \
	"$fr" "$(st full_resyncs)"
check "15: and no hash in Redis" 0 "$(rc EXISTS 'billing:{o-1}')"

# ---------------------------------------------------------------------------
# 16. amounts beyond 2^53 micro-units (Lua numbers are doubles)
# ---------------------------------------------------------------------------
echo "# 16. large amounts"
q -c "SELECT billing_account_create('s16')" -c "SELECT billing_credit('s16', 10000000000, 's16-t')" >/dev/null
check_converged "16: mirrored"
check "16: balance and available are sent as 2^53 - 1 micro-units" "9007199254740991 9007199254740991" \
	"$(hget 'billing:{s16}' balance) $(hget 'billing:{s16}' available)"
charge_sha=$(redis-cli -h 127.0.0.1 -p "$rport" -x SCRIPT LOAD <"$repo/lua/charge.lua")
check "16: the gateway's charge.lua accepts a charge against it" OK \
	"$(rc EVALSHA "$charge_sha" 5 'billing:{s16}' 'billing:{s16}:pending' 'billing:{s16}:pending_amt' \
		'billing:{s16}:pending_ver' 'billing:{s16}:pending_key' s16-r1 1000000 "$(now_ms)" 30000 | head -n 1)"

# ---------------------------------------------------------------------------
# 17. the extension dropped and created again: account versions start over
# ---------------------------------------------------------------------------
echo "# 17. DROP and CREATE EXTENSION"
check "17: s1 is in Redis at version > 1" t "$( (($(hget 'billing:{s1}' version) > 1)) && echo t || echo f)"
q -c "SET billing.allow_drop = on" -c "DROP EXTENSION billing CASCADE" -c "CREATE EXTENSION billing" >/dev/null
q -c "SELECT billing_account_create('s1')" -c "SELECT billing_credit('s1', 1, 's17-t')" >/dev/null
check_true "17: the new s1 (version $(acc s1 version)) replaces the old hash" \
	wait_until 30 hash_is 'billing:{s1}' version "$(acc s1 version)"
check_converged "17: Redis equals the new database"
check "17: hashes of tenants that no longer exist are gone" "0 0" \
	"$(rc EXISTS 'billing:{s2}') $(rc EXISTS 'billing:{lag-1}')"

# ---------------------------------------------------------------------------
# the end
# ---------------------------------------------------------------------------
check "no unexpected crash in our server log (only the kill -9 of 7b)" 1 \
	"$(grep -c 'terminated by signal' "$pglog" || true)"
check "billing_verify() finds nothing at the end" "" "$(q -c 'SELECT tenant_id FROM billing_verify()')"
info "runtime $((SECONDS - started_at)) s"
tap_summary

#!/usr/bin/env bash
# Fault test: money invariants under crashes, restarts and Redis failures.
#
# 8 clients run mixed work for FAULT_SECONDS over 50 tenants while faults are
# injected; afterwards every acknowledged operation is checked against the
# database, the database against its own invariants, and Redis against the
# database.
#
# Load: each client is a bash loop of psql calls (one call = one transaction,
# -v ON_ERROR_STOP=1 -At): deducts (unique trace ids, some through an API key),
# credits, billing_try_deduct (poor tenants f41..f50 get rejections), holds ->
# captures (partial, final, over the hold) -> releases, abandoned 2-second
# holds (expired by the worker's maintenance), replays of earlier trace ids
# (same call again: must return the original), "recoveries" (the same call
# again after it failed with a lost connection: the commit may or may not have
# happened), and the job lifecycle (submit -> claim with a 5 s lease ->
# complete, or fail retryable/final; a lost complete is retried). A client
# appends a call's result to its log ONLY when psql returned success: that
# log is the list of acknowledged operations. A call that fails with an SQL
# error (the server answered: a business rejection such as ZB004) is logged
# as rejected, one that lost its connection (crash, restart) as failed; the
# client sleeps 0.2 s and keeps going until the deadline.
#
# Faults, spread evenly over the run (one round in the short form):
#   backend_kill  kill -9 of up to 3 random client backends of fault_test
#                 (pg_stat_activity; retried until the postmaster logs the
#                 kill, as a backend lives for one psql call only); the
#                 postmaster then restarts the whole cluster: crash recovery
#   redis_kill    kill -9 of redis-server, restarted 1.5 s later
#   flushall      FLUSHALL
#   worker_term   pg_terminate_backend(billing_sync_status().worker_pid)
#   pg_immediate  pg_ctl stop -m immediate, then start
# and, in the long form (FAULT_SECONDS >= 45, or FAULT_EXTRA=1), also
#   worker_kill9  kill -9 of the sync worker (crash recovery as well)
#   redis_hang    SIGSTOP of redis-server for 3 s (command timeouts), SIGCONT
#   redis_stop    SHUTDOWN NOSAVE of redis, restarted 1.5 s later
# The long form runs ceil(FAULT_SECONDS / 20) rounds (the first in the order
# above, the others shuffled). A fault is skipped if the load is over when its
# turn comes (a slow machine); every kind must have been injected at least once.
#
# Checks (ok/not ok lines, totals; exit 1 on a failure):
#   - every acknowledged trace id is in billing.entries exactly once (captures
#     also once in hold_events; try_deduct rejections once in billing.rejections
#     instead; holds and releases once in hold_events) with the acknowledged
#     entry id, amount and balance_after, and nowhere else;
#   - every acknowledgement of the same trace id (original, replays,
#     recoveries) agrees, and at most one of them says replayed = f;
#   - no trace id twice anywhere; no ledger/hold row for a call that was never
#     made or that was rejected with an error (nothing half-written);
#   - billing_verify() returns no rows; no account below -credit_limit, none
#     with negative available funds; the cached sum of open holds matches the
#     holds; every hold's captured amount matches its capture entries;
#   - acknowledged submits/completes/final fails are in billing.jobs as
#     acknowledged; no job completed without its job:<id>:charge entry (amount
#     = -actual cost, entry = charge_entry_id); no failed/cancelled/completed
#     job with an open unexpired hold; job_events form an unbroken chain
#     ending in the job's state;
#   - no client call failed with an unexpected SQLSTATE or hung;
#   - Redis equals billing.sync_snapshot() (as in redis_sync.sh) within
#     FAULT_CONVERGE seconds (20) after the load and the last fault;
#   - a sampler reads every tenant's Redis version every ~0.1 s during the
#     load: it never goes backwards (a missing hash, after FLUSHALL or a Redis
#     restart, is skipped) and never exceeds the database's version (Redis
#     never showed a rolled-back or lost change);
#   - our server log shows no crash we did not cause (only signal 9 of the
#     pids we killed; no PANIC, no other "terminated by signal" / exit code).
#
# It starts its OWN cluster + redis (test/cluster.sh with
# BILLING_TMP=<BILLING_TMP>/fault and the ports + 3), stopped on exit; its log
# is $BILLING_TMP/fault/postgres.log, so test/run.sh's crash check of the main
# cluster does not see our intentional kills. Clients: psql and redis-cli only.
#
# Knobs: FAULT_SECONDS (load duration, default 15: the short form run by
# `make check`: about 25 s in all on a loaded 2-core machine; the long
# form below takes about 70 s), FAULT_SEED (default: random, printed),
# FAULT_EXTRA=1 (the extra faults in a short run), FAULT_CONVERGE (20),
# FAULT_KEEP=1 (leave the cluster running for poking around; stop it with
# BILLING_TMP=<...>/fault BILLING_PGPORT=<+3> BILLING_REDIS_PORT=<+3> test/cluster.sh stop).
# Long form:  FAULT_SECONDS=60 test/t/fault.sh   (3 rounds of all 8 faults)
# Replay:     FAULT_SEED=<printed seed> test/t/fault.sh   (same choices; timing differs)
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$(dirname "$here")")
cluster=$repo/test/cluster.sh
started_at=$SECONDS

FAULT_SECONDS=${FAULT_SECONDS:-15}
FAULT_SEED=${FAULT_SEED:-$((RANDOM * 32768 + RANDOM))}
FAULT_CONVERGE=${FAULT_CONVERGE:-20}
if [[ -z ${FAULT_EXTRA:-} ]]; then
	if ((FAULT_SECONDS >= 45)); then FAULT_EXTRA=1; else FAULT_EXTRA=0; fi
fi
CLIENTS=8
TENANTS=50
CALL_TIMEOUT=30 # seconds; a call that takes longer counts as a hang (failure)

# Derive our own cluster from the main one's settings (defaults if run by hand).
if [[ -z ${BILLING_TMP:-} || -z ${BILLING_PGPORT:-} || -z ${BILLING_REDIS_PORT:-} ]]; then
	eval "$(bash "$cluster" env)"
fi
export BILLING_TMP="$BILLING_TMP/fault"
export BILLING_PGPORT=$((BILLING_PGPORT + 3))
export BILLING_REDIS_PORT=$((BILLING_REDIS_PORT + 3))
export BILLING_PRELOAD=1
# synchronous_commit = on: an acknowledged commit must survive -m immediate
# and kill -9 (fsync may stay off: the OS does not crash).
export BILLING_EXTRA_CONF="billing.database = 'fault_test'
billing.redis_host = '127.0.0.1'
billing.redis_port = $BILLING_REDIS_PORT
billing.check_interval = 2
billing.maintenance_interval = 200
synchronous_commit = on"
unset PGDATABASE PGOPTIONS PGSERVICE
eval "$(bash "$cluster" env)" # PGHOST, PGPORT, PGUSER, ... of OUR cluster
PGBIN=${BILLING_PGBIN:-/usr/lib/postgresql/15/bin}
export PGCONNECT_TIMEOUT=5
W=$BILLING_TMP/work
pglog=$BILLING_TMP/postgres.log
rport=$BILLING_REDIS_PORT

bgpids=()
redis_stopped_pid=''
cleanup() {
	local rc=$? p
	for p in "${bgpids[@]}"; do
		kill "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	if [[ -n $redis_stopped_pid ]]; then kill -CONT "$redis_stopped_pid" 2>/dev/null || true; fi
	if [[ ${FAULT_KEEP:-0} != 1 ]]; then
		bash "$cluster" stop >/dev/null 2>&1 || true
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
q() { "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -qAt -d fault_test "$@" </dev/null; }
qp() { "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -qAt -d postgres "$@" </dev/null; }
rc() { redis-cli -h 127.0.0.1 -p "$rport" "$@" </dev/null; }
# ok, not_ok, check, check_true, info, wait_until, now_ms, tap_summary
. "$repo/test/lib/tap.sh"
elapsed() { # seconds since the load started, one decimal
	local ms=$(($(now_ms) - load_start_ms))
	printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

# sql_check DESCRIPTION QUERY: the query lists violations, one per row; none = ok.
sql_check() {
	local out n
	if ! out=$(q -c "$2" 2>&1); then
		not_ok "$1 (the check query failed)" "$out"
		return
	fi
	if [[ -z $out ]]; then
		ok "$1"
	else
		n=$(wc -l <<<"$out")
		not_ok "$1 ($n violations)" "$(head -n 15 <<<"$out")"
	fi
}

pg_up() { q -c 'SELECT 1' >/dev/null 2>&1; }
worker_pid() { qp -c "SELECT pid FROM pg_stat_activity WHERE backend_type = 'billing sync'" 2>/dev/null; }
worker_runs() { [[ -n $(worker_pid) ]]; }
redis_pid() { cat "$BILLING_TMP/redis/redis.pid" 2>/dev/null; }

# SNAP_SQL, DUMP_LUA and converged(): Redis vs the database (test/lib/mirror.sh)
. "$repo/test/lib/mirror.sh"

# ---------------------------------------------------------------------------
# the clients
# ---------------------------------------------------------------------------
# Every result line of a call is "client|seq|kind|tenant|trace|ref|entry_id|
# amount|balance_after|status|replayed" (the SELECT lists below return the
# last 8 columns). kind is the operation, or replay_<op> / recover_<op> for the
# same call made again after it was acknowledged / after it lost its connection.
#   deduct, credit, try: ref -, entry_id, amount (signed), balance_after, status (try)
#   hold:     entry_id = hold_id, amount, balance_after = available, status
#   capture:  ref = hold trace, entry_id, amount (signed), balance_after, status = hold status
#   release:  ref = hold trace, entry_id = hold_id, amount = released, status = hold status
#   submit:   trace = idempotency key, ref = job_id, amount = estimate, status = state
#   claim:    trace = hold trace, ref = job_id, entry_id = attempt, amount = estimate
#   complete: trace = job:<id>:charge, ref = job_id, entry_id = charge_entry_id, amount = actual cost
#   fail:     ref = job_id, entry_id = attempt, status = state
# Rejected and failed calls go to c<N>.calls as "client|seq|kind|tenant|trace|
# outcome|sqlstate" (outcome rejected, failed, timeout or unexpected).
EXPECTED_CODES=' ZB004 ZB030 ZB031 ZB032 ZB033 ZB040 ZB041 ZB042 ZB043 ZB044 ZB045 ZB052 ZB070 ZB073 '

client() {
	local c=$1 seq=0 acked=$W/c$1.acked calls=$W/c$1.calls errf=$W/c$1.stderr
	local OUT CODE r op t a tr htr exp fin est act jid ct cest line i status
	local -A ack=() rej=() fail=()
	local replayable=() lost=()
	RANDOM=$((FAULT_SEED % 100000 * 10 + c))
	: >"$acked"
	: >"$calls"

	# call KIND TENANT TRACE SQL: 0 = acknowledged (OUT), 1 = rejected by the
	# server (CODE), 2 = failed (connection lost, server down, timeout),
	# 3 = success without a row (a claim that found no job)
	call() {
		local kind=$1 tenant=$2 trace=$3 sql=$4 prc=0 out
		seq=$((seq + 1))
		OUT='' CODE=''
		out=$(timeout -k 2 "$CALL_TIMEOUT" "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -At \
			-d fault_test -c "$sql" 2>"$errf" </dev/null) || prc=$?
		if ((prc == 0)); then
			OUT=$out
			[[ -n $out ]] || return 3
			while IFS= read -r line; do
				printf '%s|%s|%s|%s\n' "$c" "$seq" "$kind" "$line"
			done <<<"$out" >>"$acked"
			ack[$kind]=$((${ack[$kind]:-0} + 1))
			return 0
		fi
		CODE=$(sed -n '/^ERROR:  [0-9A-Z]\{5\}: /{s/^ERROR:  \([0-9A-Z]\{5\}\): .*/\1/p;q}' "$errf")
		if ((prc == 124 || prc == 137)); then
			fail[$kind]=$((${fail[$kind]:-0} + 1))
			echo "$c|$seq|$kind|$tenant|$trace|timeout|" >>"$calls"
			return 2
		fi
		if ((prc == 1)) && [[ -n $CODE ]]; then
			rej[$kind]=$((${rej[$kind]:-0} + 1))
			if [[ $EXPECTED_CODES == *" $CODE "* ]]; then
				echo "$c|$seq|$kind|$tenant|$trace|rejected|$CODE" >>"$calls"
			else
				echo "$c|$seq|$kind|$tenant|$trace|unexpected|$CODE" >>"$calls"
				{
					echo "client $c call $seq ($kind): $sql"
					cat "$errf"
				} >>"$W/unexpected.txt"
			fi
			return 1
		fi
		fail[$kind]=$((${fail[$kind]:-0} + 1))
		echo "$c|$seq|$kind|$tenant|$trace|failed|" >>"$calls"
		head -n 2 "$errf" >>"$W/c$c.failures.txt"
		sleep 0.2 # the server is restarting: do not spin
		return 2
	}
	# a call whose trace id makes it idempotent: remember it for replays /
	# recoveries. SQL goes through a variable to keep the quoting sane.
	idem() { # idem KIND TENANT TRACE SQL -> return code of call
		local r=0 sql=${4//[$'\n\t']/ }
		call "$1" "$2" "$3" "$sql" || r=$?
		case $r in
		0) replayable+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"$sql") ;;
		2) lost+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"$sql") ;;
		esac
		return "$r"
	}
	amount() { # amount MIN_MICROS MAX_MICROS -> A
		local m=$(($1 + (RANDOM * 32768 + RANDOM) % ($2 - $1 + 1)))
		printf -v A '%d.%06d' $((m / 1000000)) $((m % 1000000))
	}
	tenant() { printf -v T 'f%02d' $((RANDOM % TENANTS + 1)); }
	keyarg() { # tenants f31..f35 charge through their API key k1
		local n=$((10#${1#f}))
		if ((n >= 31 && n <= 35)); then KEY=", api_key => 'k1'"; else KEY=''; fi
	}
	local A T KEY

	while (($(now_ms) < load_end_ms)); do
		op=$((RANDOM % 100))
		tr="c$c-$((seq + 1))"
		if ((op < 26)); then # deduct
			tenant
			keyarg "$T"
			amount 1 400000
			idem deduct "$T" "$tr-d" "SELECT tenant_id, trace_id, NULL, entry_id, amount, balance_after, NULL, replayed
			                          FROM billing_deduct('$T', $A, '$tr-d'$KEY)" || true
		elif ((op < 34)); then # credit
			tenant
			amount 1 2000000
			idem credit "$T" "$tr-cr" "SELECT tenant_id, trace_id, NULL, entry_id, amount, balance_after, NULL, replayed
			                            FROM billing_credit('$T', $A, '$tr-cr')" || true
		elif ((op < 48)); then # try_deduct
			tenant
			keyarg "$T"
			amount 10000 3000000
			idem try "$T" "$tr-t" "SELECT tenant_id, trace_id, NULL, entry_id, amount, balance_after, status, replayed
			                       FROM billing_try_deduct('$T', $A, '$tr-t'$KEY)" || true
		elif ((op < 56)); then # replay of an acknowledged call, or recovery of a lost one
			if ((${#lost[@]} && RANDOM % 2)); then
				i=$((RANDOM % ${#lost[@]}))
				line=${lost[i]}
				lost=("${lost[@]:0:i}" "${lost[@]:i+1}")
				IFS=$'\t' read -r a t htr est <<<"$line"
				idem "recover_${a#recover_}" "$t" "$htr" "$est" || true
			elif ((${#replayable[@]})); then
				line=${replayable[RANDOM % ${#replayable[@]}]}
				IFS=$'\t' read -r a t htr est <<<"$line"
				a=${a#recover_}
				call "replay_${a#replay_}" "$t" "$htr" "$est" || true
			fi
		elif ((op < 70)); then # hold -> capture(s) -> release
			tenant
			keyarg "$T"
			amount 100000 3000000
			htr="$tr-h"
			if ((RANDOM % 5 == 0)); then exp='2 seconds'; else exp='30 seconds'; fi
			r=0
			idem hold "$T" "$htr" "SELECT tenant_id, trace_id, NULL, hold_id, amount, available, status, replayed
			                       FROM billing_hold('$T', $A, '$htr', expires_in => '$exp'$KEY)" || r=$?
			((r != 1)) || continue # refused (funds, limits): nothing to capture
			[[ $exp == '30 seconds' ]] || continue # abandoned: the maintenance expires it
			# capture 30 % .. 130 % of the hold: sometimes an excess, sometimes final
			a=${A/./}
			a=$((10#$a))
			amount $((a * 3 / 10)) $((a * 13 / 10))
			if ((RANDOM % 3 == 0)); then fin=true; else fin=false; fi
			r=0
			idem capture "$T" "$htr-c1" "SELECT tenant_id, trace_id, '$htr', entry_id, amount, balance_after, hold_status, replayed
			                             FROM billing_capture('$T', '$htr', $A, '$htr-c1', final => $fin)" || r=$?
			status=''
			if ((r == 0)); then IFS='|' read -r _ _ _ _ _ _ status _ <<<"$OUT"; fi
			if [[ $status == open ]] && ((RANDOM % 2)); then
				amount 1000 $((a / 4 + 1000))
				idem capture "$T" "$htr-c2" "SELECT tenant_id, trace_id, '$htr', entry_id, amount, balance_after, hold_status, replayed
				                             FROM billing_capture('$T', '$htr', $A, '$htr-c2')" || true
			fi
			idem release "$T" "$htr-r" "SELECT tenant_id, '$htr-r', trace_id, hold_id, released, available, status, replayed
			                            FROM billing_release('$T', '$htr', '$htr-r')" || true
		elif ((op < 82)); then # job submit
			tenant
			amount 500000 2000000
			idem submit "$T" "$tr-job" "SELECT tenant_id, idempotency_key, job_id, NULL, estimated_cost, NULL, state, replayed
			                            FROM billing_job_submit('$T', 'render', '$tr-job', $A, max_attempts => 3)" || true
		else # claim -> complete or fail
			r=0
			call claim - - "SELECT tenant_id, hold_trace_id, job_id, attempt, estimated_cost, NULL, state, replayed
			                FROM billing_job_claim('c$c', kinds => '{render}', lease => '5 seconds')" || r=$?
			if ((r == 3)); then
				ack[claim_empty]=$((${ack[claim_empty]:-0} + 1))
				continue
			fi
			((r == 0)) || continue
			IFS='|' read -r ct _ jid _ cest _ <<<"$OUT"
			if ((RANDOM % 4)); then
				# actual cost 50 % .. 130 % of the estimate
				a=${cest/./}
				a=$((10#$a))
				amount $((a / 2)) $((a * 13 / 10))
				act=$A
				r=0
				idem complete "$ct" "job:$jid:charge" "SELECT tenant_id, 'job:' || job_id || ':charge', job_id, charge_entry_id, actual_cost, NULL, state, replayed
				                                       FROM billing_job_complete('$ct', $jid, $act, worker => 'c$c')" || r=$?
				if ((r == 2)); then # lost: the worker retries its complete once the server is back
					idem recover_complete "$ct" "job:$jid:charge" "SELECT tenant_id, 'job:' || job_id || ':charge', job_id, charge_entry_id, actual_cost, NULL, state, replayed
					                                               FROM billing_job_complete('$ct', $jid, $act, worker => 'c$c')" || r=$?
				fi
				if ((r == 1)) && [[ $CODE == ZB004 || $CODE == ZB033 || $CODE == ZB04? ]]; then
					# cannot be charged: give up on the job (releases its hold)
					call fail "$ct" - "SELECT tenant_id, NULL, job_id, attempt, NULL, NULL, state, replayed
					                   FROM billing_job_fail('$ct', $jid, 'cannot charge $act', retryable => false, worker => 'c$c')" || true
				fi
			else
				if ((RANDOM % 2)); then r=true; else r=false; fi
				call fail "$ct" - "SELECT tenant_id, NULL, job_id, attempt, NULL, NULL, state, replayed
				                   FROM billing_job_fail('$ct', $jid, 'simulated failure', retryable => $r, worker => 'c$c')" || true
			fi
		fi
	done
	for a in "${!ack[@]}"; do echo "$a acked ${ack[$a]}"; done >"$W/c$c.stats"
	for a in "${!rej[@]}"; do echo "$a rejected ${rej[$a]}"; done >>"$W/c$c.stats"
	for a in "${!fail[@]}"; do echo "$a failed ${fail[$a]}"; done >>"$W/c$c.stats"
	echo "$seq" >"$W/c$c.done"
}

# The Redis sampler: every 0.1 s during the load, the version field of every
# tenant hash ("-" when missing: after FLUSHALL or a Redis restart). The
# mirror must never go backwards, and never show a version the database does
# not have (a rolled-back or lost change).
VERSIONS_LUA='local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call("HGET", k, "version") or "-" end
return table.concat(out, " ")'
redis_sampler() {
	local keys=() i out
	for ((i = 1; i <= TENANTS; i++)); do keys+=("billing:{$(printf 'f%02d' "$i")}"); done
	: >"$W/redis_versions"
	while (($(now_ms) < load_end_ms)); do
		if out=$(timeout -k 1 2 redis-cli -h 127.0.0.1 -p "$rport" --raw EVAL "$VERSIONS_LUA" "${#keys[@]}" "${keys[@]}" 2>/dev/null </dev/null) &&
			[[ $out =~ ^[-0-9\ ]+$ ]]; then
			echo "$(now_ms) $out" >>"$W/redis_versions"
		fi
		sleep 0.1
	done
}

# ---------------------------------------------------------------------------
# the faults
# ---------------------------------------------------------------------------
killed_pids=() # everything we sent SIGKILL to (may show up as "terminated by signal 9")
termed_pids=() # workers we pg_terminate_backend'ed (exit code 1)
nfaults=0
fault_log() {
	nfaults=$((nfaults + 1))
	echo "# fault $nfaults at $(elapsed) s: $*"
	echo "$1" >>"$W/faults"
}

fault_backend_kill() {
	local pids=() hit=() p i deadline tries=0
	wait_until 60 pg_up || true
	# The backends serving our clients. One lives only as long as one psql
	# call, so by the time the signal arrives it may be gone, or exiting
	# normally: kill up to 3 of them (random), then look for the postmaster's
	# "terminated by signal 9" line; try again if there is none.
	deadline=$(($(now_ms) + 20000))
	while (($(now_ms) < deadline)); do
		mapfile -t pids < <(qp -c "SELECT pid FROM pg_stat_activity
		                            WHERE datname = 'fault_test' AND backend_type = 'client backend'
		                              AND pid <> pg_backend_pid() ORDER BY random() LIMIT 3" 2>/dev/null || true)
		if ((${#pids[@]} == 0)); then
			sleep 0.05
			continue
		fi
		hit=()
		tries=$((tries + 1))
		for p in "${pids[@]}"; do
			if kill -9 "$p" 2>/dev/null; then
				killed_pids+=("$p")
				hit+=("$p")
			fi
		done
		((${#hit[@]})) || continue
		for i in 1 2 3 4 5; do
			if log_has_kill "${hit[@]}"; then
				fault_log backend_kill "kill -9 of client backend(s) ${hit[*]} (attempt $tries)"
				sleep 0.3
				wait_until 60 pg_up || info "backend_kill: server not back within 60 s"
				return 0
			fi
			sleep 0.1
		done
	done
	info "backend_kill: no kill -9 of a client backend took effect within 20 s ($tries attempts)"
	return 1
}
# log_has_kill PID...: the postmaster logged one of them as terminated by signal 9
log_has_kill() {
	local p
	for p in "$@"; do
		grep -F -- "(PID $p) was terminated by signal 9" "$pglog" >/dev/null && return 0
	done
	return 1
}
fault_worker_kill9() {
	local p
	wait_until 15 worker_runs || true
	p=$(worker_pid)
	[[ -n $p ]] || return 1
	kill -9 "$p"
	killed_pids+=("$p")
	wait_until 5 log_has_kill "$p" || info "worker_kill9: no \"terminated by signal 9\" line for $p"
	fault_log worker_kill9 "kill -9 of the sync worker $p"
	sleep 0.3
	wait_until 60 pg_up || info "worker_kill9: server not back within 60 s"
}
fault_pg_immediate() {
	wait_until 60 pg_up || true
	bash "$cluster" pg_ctl stop -m immediate -w >/dev/null
	fault_log pg_immediate "pg_ctl stop -m immediate"
	sleep 0.5
	bash "$cluster" pg_ctl start -w -t 60 >/dev/null
	info "pg_immediate: started again at $(elapsed) s"
}
fault_redis_kill() {
	local p
	p=$(redis_pid)
	kill -9 "$p"
	fault_log redis_kill "kill -9 of redis-server $p"
	sleep 1.5
	bash "$cluster" redis-start >/dev/null
	info "redis_kill: redis restarted at $(elapsed) s"
}
fault_redis_stop() {
	rc shutdown nosave >/dev/null 2>&1 || true
	fault_log redis_stop "SHUTDOWN NOSAVE of redis"
	sleep 1.5
	bash "$cluster" redis-start >/dev/null
	info "redis_stop: redis restarted at $(elapsed) s"
}
fault_redis_hang() {
	local p
	p=$(redis_pid)
	redis_stopped_pid=$p
	kill -STOP "$p"
	fault_log redis_hang "SIGSTOP of redis-server $p for 3 s"
	sleep 3
	kill -CONT "$p"
	redis_stopped_pid=''
}
fault_flushall() {
	rc FLUSHALL >/dev/null
	fault_log flushall "FLUSHALL"
}
fault_worker_term() {
	local p r
	wait_until 15 worker_runs || true
	p=$(q -c 'SELECT worker_pid FROM billing_sync_status()' 2>/dev/null) || p=''
	if [[ -z $p ]]; then
		info "worker_term: no worker running"
		return 1
	fi
	r=$(q -c "SELECT pg_terminate_backend($p)" 2>/dev/null) || r=''
	[[ $r == t ]] || return 1
	termed_pids+=("$p")
	fault_log worker_term "pg_terminate_backend of the sync worker $p"
}

# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------
info "own cluster: BILLING_TMP=$BILLING_TMP pg port $BILLING_PGPORT, redis port $rport"
info "FAULT_SECONDS=$FAULT_SECONDS FAULT_SEED=$FAULT_SEED FAULT_EXTRA=$FAULT_EXTRA"
rm -f "$pglog"
bash "$cluster" start
rm -rf "$W"
mkdir -p "$W"
qp -c 'CREATE DATABASE fault_test'
q -c 'CREATE EXTENSION billing'
# f01..f40 rich (every 5th with a credit limit of 50), f41..f50 poor (2 + credit
# limit 1: rejections); f31..f35 charge through an API key with a budget,
# f36..f40 have limits (max charge, spend caps, request quotas).
q -c "SELECT count(*) FROM generate_series(1, $TENANTS) AS i,
        LATERAL billing_account_create(format('f%s', lpad(i::text, 2, '0')),
                                       credit_limit => CASE WHEN i > 40 THEN 1 WHEN i % 5 = 0 THEN 50 ELSE 0 END)" \
	-c "SELECT count(*) FROM generate_series(1, $TENANTS) AS i,
        LATERAL billing_credit(format('f%s', lpad(i::text, 2, '0')), CASE WHEN i > 40 THEN 2 ELSE 1000 END,
                               format('f%s-topup', lpad(i::text, 2, '0')))" \
	-c "SELECT count(*) FROM generate_series(31, 35) AS i,
        LATERAL billing_api_key_create(format('f%s', i), 'k1', budget => 400, budget_period => 'month')" \
	-c "SELECT count(*) FROM generate_series(36, 40) AS i,
        LATERAL billing_limits_set(format('f%s', i), daily_requests => 100000, monthly_requests => 1000000,
                                   daily_spend => 500, monthly_spend => 5000, max_charge => 2.5, reason => 'fault test')" \
	>/dev/null
if wait_until 30 converged; then
	ok "setup: the worker mirrors the $TENANTS accounts (${WAITED_MS} ms)"
else
	not_ok "setup: the worker mirrors the $TENANTS accounts within 30 s"
fi

# fault plan: round 1 in a fixed order, later rounds shuffled
basic=(backend_kill redis_kill flushall worker_term pg_immediate)
extra=()
if ((FAULT_EXTRA)); then extra=(worker_kill9 redis_hang redis_stop); fi
rounds=$(((FAULT_SECONDS + 19) / 20))
plan=("${basic[@]}" "${extra[@]}")
RANDOM=$FAULT_SEED
for ((r = 2; r <= rounds; r++)); do
	mapfile -t shuffled < <(printf '%s\n' "${basic[@]}" "${extra[@]}" | while read -r f; do echo "$RANDOM $f"; done | sort -n | cut -d' ' -f2)
	plan+=("${shuffled[@]}")
done
info "setup done in $((SECONDS - started_at)) s; ${#plan[@]} faults planned over $FAULT_SECONDS s: ${plan[*]}"

# ---------------------------------------------------------------------------
# load + faults
# ---------------------------------------------------------------------------
echo "# load: $CLIENTS clients for $FAULT_SECONDS s"
load_start_ms=$(now_ms)
load_end_ms=$((load_start_ms + FAULT_SECONDS * 1000))
for ((c = 1; c <= CLIENTS; c++)); do
	client "$c" &
	bgpids+=($!)
done
redis_sampler &
bgpids+=($!)
# fault k at k * FAULT_SECONDS / (n + 1): the last one well before the end
: >"$W/faults"
n=${#plan[@]}
for ((k = 1; k <= n; k++)); do
	at=$((load_start_ms + k * FAULT_SECONDS * 1000 / (n + 1)))
	while (($(now_ms) < at)); do sleep 0.05; done
	if (($(now_ms) > load_end_ms - 1000)); then
		info "fault $k (${plan[k - 1]}) and later ones skipped: the load is over"
		break
	fi
	"fault_${plan[k - 1]}" || info "fault ${plan[k - 1]} could not be injected at $(elapsed) s"
done
last_fault_ms=$(now_ms)
info "last fault done at $(elapsed) s"
for p in "${bgpids[@]}"; do
	wait "$p" || true
done
bgpids=()
load_done_ms=$(now_ms)
info "clients finished at $(elapsed) s"
if wait_until 60 pg_up; then ok "the server accepts connections after the faults"; else not_ok "the server accepts connections after the faults (60 s)"; fi
if [[ -z $(redis_pid) ]] || ! rc ping >/dev/null 2>&1; then bash "$cluster" redis-start >/dev/null; fi

# ---------------------------------------------------------------------------
# what the clients saw
# ---------------------------------------------------------------------------
done_clients=$(ls "$W"/c*.done 2>/dev/null | wc -l)
check "all $CLIENTS clients ran until the deadline" "$CLIENTS" "$done_clients"
cat "$W"/c*.acked >"$W/acked.all"
cat "$W"/c*.calls >"$W/calls.all"
q -c 'CREATE TABLE fault_acked (client int, seq int, kind text, tenant text, trace text, ref text,
                                entry_id bigint, amount numeric, balance_after numeric, status text, replayed boolean)' \
	-c 'CREATE TABLE fault_calls (client int, seq int, kind text, tenant text, trace text, outcome text, code text)' \
	-c "\\copy fault_acked FROM '$W/acked.all' WITH (FORMAT csv, DELIMITER '|')" \
	-c "\\copy fault_calls FROM '$W/calls.all' WITH (FORMAT csv, DELIMITER '|')" \
	-c 'ANALYZE fault_acked' -c 'ANALYZE fault_calls' >/dev/null

# per kind: acknowledged / rejected (SQL error) / failed (connection)
stats=$(cat "$W"/c*.stats | awk '{ n[$1 " " $2] += $3; k[$1] = 1 }
	END { for (x in k) printf "%-18s %6d %6d %6d\n", x, n[x " acked"], n[x " rejected"], n[x " failed"] }' | sort)
echo "# operations:       acked rejected failed"
sed 's/^/#   /' <<<"$stats"
tot_acked=$(awk '$1 != "claim_empty" { s += $2 } END { print s + 0 }' <<<"$stats")
tot_rej=$(awk '{ s += $3 } END { print s + 0 }' <<<"$stats")
tot_failed=$(awk '{ s += $4 } END { print s + 0 }' <<<"$stats")
info "total: $tot_acked acknowledged, $tot_rej rejected, $tot_failed failed"
info "rejections by SQLSTATE: $(q -c "SELECT string_agg(code || '=' || n, ' ' ORDER BY code) FROM
      (SELECT code, count(*) AS n FROM fault_calls WHERE outcome IN ('rejected', 'unexpected') GROUP BY code) x")"
missing_kinds=''
for k in deduct credit try hold capture release submit claim complete fail; do
	n=$(awk -v k="$k" '$1 == k { print $2 }' <<<"$stats")
	((${n:-0} > 0)) || missing_kinds+=" $k"
done
check "every kind of operation was acknowledged at least once" "" "${missing_kinds# }"
check "some client calls failed during the faults (the faults hit the clients)" 1 "$((tot_failed > 0 ? 1 : 0))"
planned=${#plan[@]}
injected=$(wc -l <"$W/faults")
missing_faults=''
for f in "${basic[@]}" "${extra[@]}"; do
	grep -qx "$f" "$W/faults" || missing_faults+=" $f"
done
check "every kind of fault was injected ($injected of $planned planned faults)" "" "${missing_faults# }"
info "faults: $(sort "$W/faults" | uniq -c | awk '{ printf "%s=%s ", $2, $1 }')"
n=$(q -c "SELECT count(*) FROM fault_calls WHERE outcome = 'unexpected'")
if ((n == 0)); then
	ok "no client call failed with an unexpected SQLSTATE"
else
	not_ok "no client call failed with an unexpected SQLSTATE ($n did)" "$(head -n 30 "$W/unexpected.txt")"
fi
check "no client call hung for $CALL_TIMEOUT s" 0 "$(q -c "SELECT count(*) FROM fault_calls WHERE outcome = 'timeout'")"

# ---------------------------------------------------------------------------
# acknowledged operations vs the database
# ---------------------------------------------------------------------------
echo "# acknowledged operations vs the database"
# where each acknowledged trace id is: counts in entries / rejections /
# hold_events over ALL tenants (our trace ids are globally unique)
sql_check "every acknowledged trace id is recorded exactly once, in the right place" "
WITH a AS (SELECT DISTINCT regexp_replace(kind, '^(replay|recover)_', '') AS fam, tenant, trace,
                  CASE WHEN kind ~ 'try' THEN status END AS st
             FROM fault_acked WHERE kind NOT IN ('claim', 'fail')),
     e AS (SELECT trace_id, count(*) AS n, count(*) FILTER (WHERE tenant_id = a.tenant) AS mine
             FROM billing.entries JOIN (SELECT DISTINCT tenant, trace FROM a) a ON a.trace = trace_id GROUP BY trace_id),
     r AS (SELECT trace_id, count(*) AS n FROM billing.rejections GROUP BY trace_id),
     h AS (SELECT trace_id, count(*) AS n FROM billing.hold_events WHERE trace_id IS NOT NULL GROUP BY trace_id),
     x AS (SELECT a.*, coalesce(e.n, 0) AS ne, coalesce(e.mine, 0) AS me, coalesce(r.n, 0) AS nr, coalesce(h.n, 0) AS nh,
                  CASE WHEN a.fam = 'complete' THEN '1 1 0 ' || CASE WHEN EXISTS (SELECT FROM billing.entries c
                              WHERE c.tenant_id = a.tenant AND c.trace_id = a.trace AND c.kind = 'capture') THEN 1 ELSE 0 END
                       WHEN a.fam = 'submit' THEN '0 0 0 0'
                       WHEN a.fam IN ('deduct', 'credit') OR (a.fam = 'try' AND a.st = 'committed') THEN '1 1 0 0'
                       WHEN a.fam = 'try' THEN '0 0 1 0'
                       WHEN a.fam = 'capture' THEN '1 1 0 1'
                       ELSE '0 0 0 1' END AS want
             FROM a LEFT JOIN e ON e.trace_id = a.trace LEFT JOIN r ON r.trace_id = a.trace LEFT JOIN h ON h.trace_id = a.trace)
SELECT format('%s %s/%s: entries %s (of this tenant %s), rejections %s, hold_events %s; want %s',
              fam, tenant, trace, ne, me, nr, nh, want)
  FROM x WHERE format('%s %s %s %s', ne, me, nr, nh) <> want ORDER BY 1"

sql_check "acknowledged ledger operations match their entry (entry_id, amount, balance_after)" "
SELECT format('%s %s/%s: acked entry %s amount %s balance_after %s; ledger entry %s amount %s balance_after %s kind %s',
              a.kind, a.tenant, a.trace, a.entry_id, a.amount, a.balance_after, e.entry_id,
              billing.to_amount(e.amount_micros), billing.to_amount(e.balance_after_micros), e.kind)
  FROM fault_acked a
  JOIN billing.entries e ON e.tenant_id = a.tenant AND e.trace_id = a.trace
 WHERE (a.kind ~ '(deduct|credit|capture)\$' OR (a.kind ~ 'try\$' AND a.status = 'committed'))
   AND (e.entry_id IS DISTINCT FROM a.entry_id OR e.amount_micros <> a.amount * 1000000
        OR e.balance_after_micros <> a.balance_after * 1000000
        OR e.kind <> CASE WHEN a.kind ~ 'credit' THEN 'topup' WHEN a.kind ~ 'capture' THEN 'capture' ELSE 'deduct' END)
 ORDER BY 1"

sql_check "acknowledged try_deduct rejections are in billing.rejections with their amount" "
SELECT format('%s %s/%s: acked amount %s, rejection %s', a.kind, a.tenant, a.trace, a.amount,
              coalesce(billing.to_amount(r.amount_micros)::text, 'missing'))
  FROM fault_acked a
  LEFT JOIN billing.rejections r ON r.tenant_id = a.tenant AND r.trace_id = a.trace
 WHERE a.kind ~ 'try\$' AND a.status = 'rejected'
   AND (r.trace_id IS NULL OR a.amount * 1000000 <> r.amount_micros)
 ORDER BY 1"

sql_check "acknowledged holds and releases are in billing.holds / hold_events as acknowledged" "
SELECT format('%s %s/%s: acked hold_id %s amount %s status %s; found %s', a.kind, a.tenant, a.trace, a.entry_id, a.amount,
              a.status, coalesce(format('hold %s amount %s released %s status %s event %s/%s', h.hold_id,
              billing.to_amount(h.amount_micros), billing.to_amount(h.released_micros), h.status, ev.action, ev.hold_id), 'nothing'))
  FROM fault_acked a
  LEFT JOIN billing.holds h ON h.tenant_id = a.tenant AND h.trace_id = CASE WHEN a.kind ~ 'release' THEN a.ref ELSE a.trace END
  LEFT JOIN billing.hold_events ev ON ev.tenant_id = a.tenant AND ev.trace_id = a.trace
 WHERE a.kind ~ '(hold|release)\$'
   AND (h.hold_id IS NULL OR ev.event_id IS NULL OR h.hold_id <> a.entry_id OR ev.hold_id <> a.entry_id
        OR ev.action <> CASE WHEN a.kind ~ 'release' THEN 'release' ELSE 'hold' END
        OR (a.kind ~ 'hold\$' AND h.amount_micros <> a.amount * 1000000)
        OR (a.kind ~ 'release\$' AND (h.released_micros <> a.amount * 1000000 OR h.status <> a.status)))
 ORDER BY 1"

sql_check "every acknowledgement of a trace id agrees (original, replays, recoveries); at most one is not a replay" "
SELECT format('%s %s/%s: %s acks, %s distinct results, %s with replayed = f', fam, tenant, trace, n, d, nf)
  FROM (SELECT regexp_replace(kind, '^(replay|recover)_', '') AS fam, tenant, trace, count(*) AS n,
               count(*) FILTER (WHERE NOT replayed) AS nf,
               count(DISTINCT format('%s %s %s %s %s', ref, entry_id, amount,
                     CASE WHEN kind ~ '(deduct|credit|try|capture)\$' THEN balance_after END,
                     CASE WHEN kind ~ '(try|release|complete)\$' THEN status END)) AS d
          FROM fault_acked WHERE kind NOT IN ('claim', 'fail') GROUP BY 1, 2, 3) x
 WHERE d > 1 OR nf > 1 ORDER BY 1"

sql_check "no ledger, rejection or hold row for a client trace id that was never sent or was rejected with an error" "
WITH sent AS (SELECT trace FROM fault_acked UNION SELECT trace FROM fault_calls WHERE outcome IN ('failed', 'timeout')),
     refused AS (SELECT tenant, trace, min(code) AS code FROM fault_calls c WHERE outcome IN ('rejected', 'unexpected')
                    AND trace ~ '^c[0-9]' AND NOT EXISTS (SELECT FROM sent s WHERE s.trace = c.trace) GROUP BY 1, 2),
     rows AS (SELECT 'entries' AS t, tenant_id, trace_id FROM billing.entries
              UNION ALL SELECT 'rejections', tenant_id, trace_id FROM billing.rejections
              UNION ALL SELECT 'hold_events', tenant_id, trace_id FROM billing.hold_events WHERE trace_id IS NOT NULL)
SELECT format('%s %s/%s: %s', rows.t, rows.tenant_id, rows.trace_id,
              CASE WHEN f.trace IS NOT NULL THEN 'the call was rejected with ' || f.code ELSE 'never sent' END)
  FROM rows LEFT JOIN refused f ON f.tenant = rows.tenant_id AND f.trace = rows.trace_id
 WHERE rows.trace_id ~ '^c[0-9]' AND (f.trace IS NOT NULL OR NOT EXISTS (SELECT FROM sent s WHERE s.trace = rows.trace_id))
 ORDER BY 1"

sql_check "no trace id twice anywhere (entries, rejections, hold_events, across tenants)" "
SELECT format('entries: %s x %s', trace_id, count(*)) FROM billing.entries GROUP BY trace_id HAVING count(*) > 1
UNION ALL
SELECT format('rejections: %s x %s', trace_id, count(*)) FROM billing.rejections GROUP BY trace_id HAVING count(*) > 1
UNION ALL
SELECT format('hold_events: %s x %s', trace_id, count(*)) FROM billing.hold_events WHERE trace_id IS NOT NULL
 GROUP BY trace_id HAVING count(*) > 1
UNION ALL
SELECT format('%s/%s both in entries and rejections', e.tenant_id, e.trace_id)
  FROM billing.entries e JOIN billing.rejections r USING (tenant_id, trace_id)
UNION ALL
SELECT format('%s/%s: hold event %s (entry %s) vs ledger entry %s', h.tenant_id, h.trace_id, h.action, h.entry_id, e.entry_id)
  FROM billing.hold_events h JOIN billing.entries e USING (tenant_id, trace_id)
 WHERE h.action <> 'capture' OR h.entry_id IS DISTINCT FROM e.entry_id OR e.kind <> 'capture'
UNION ALL
SELECT format('%s/%s: capture entry %s without its capture event', e.tenant_id, e.trace_id, e.entry_id)
  FROM billing.entries e
 WHERE e.kind = 'capture' AND NOT EXISTS (SELECT FROM billing.hold_events h WHERE h.tenant_id = e.tenant_id
                                            AND h.trace_id = e.trace_id AND h.action = 'capture' AND h.entry_id = e.entry_id)"

# ---------------------------------------------------------------------------
# accounts and holds
# ---------------------------------------------------------------------------
echo "# accounts and holds"
sql_check "billing_verify() returns no rows" "SELECT row_to_json(v) FROM billing_verify() v"
sql_check "no account below -credit_limit, none with negative available funds" "
SELECT format('%s: balance %s credit_limit %s on_hold %s available %s', tenant_id, balance, credit_limit, on_hold, available)
  FROM billing.balances WHERE balance < -credit_limit OR available < 0"
sql_check "each account's cached sum of open holds equals its open holds" "
SELECT format('%s: holds_micros %s, open holds %s', a.tenant_id, a.holds_micros, coalesce(s.rest, 0))
  FROM billing.accounts a
  LEFT JOIN (SELECT tenant_id, sum(amount_micros - captured_micros - released_micros) AS rest
               FROM billing.holds WHERE status = 'open' GROUP BY tenant_id) s USING (tenant_id)
 WHERE a.holds_micros <> coalesce(s.rest, 0)"
sql_check "each hold's captured amount equals its capture entries; each hold has its hold event" "
SELECT format('%s/%s: captured %s, capture entries %s, hold events %s', h.tenant_id, h.trace_id, h.captured_micros,
              coalesce(c.s, 0), coalesce(ev.n, 0))
  FROM billing.holds h
  LEFT JOIN (SELECT tenant_id, hold_id, -sum(amount_micros) AS s FROM billing.entries WHERE kind = 'capture'
              GROUP BY 1, 2) c USING (tenant_id, hold_id)
  LEFT JOIN (SELECT tenant_id, hold_id, count(*) AS n FROM billing.hold_events WHERE action = 'hold'
              GROUP BY 1, 2) ev USING (tenant_id, hold_id)
 WHERE h.captured_micros <> coalesce(c.s, 0) OR coalesce(ev.n, 0) <> 1"

# ---------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------
echo "# jobs"
sql_check "acknowledged submits are jobs with their estimate and their hold" "
SELECT format('%s %s/%s: acked job %s estimate %s; found job %s estimate %s, hold %s', a.kind, a.tenant, a.trace, a.ref,
              a.amount, j.job_id, billing.to_amount(j.estimated_micros), coalesce(billing.to_amount(h.amount_micros)::text, 'missing'))
  FROM fault_acked a
  LEFT JOIN billing.jobs j ON j.tenant_id = a.tenant AND j.idempotency_key = a.trace
  LEFT JOIN billing.holds h ON h.tenant_id = a.tenant AND h.trace_id = 'job:' || a.ref || ':1'
 WHERE a.kind ~ 'submit\$'
   AND (j.job_id IS NULL OR j.job_id::text <> a.ref OR j.estimated_micros <> a.amount * 1000000
        OR h.amount_micros IS DISTINCT FROM j.estimated_micros)"
sql_check "acknowledged completes are completed jobs with the acknowledged cost and charge entry" "
SELECT format('%s %s job %s: acked actual %s entry %s; job %s actual %s entry %s', a.kind, a.tenant, a.ref, a.amount,
              a.entry_id, j.state, billing.to_amount(j.actual_micros), j.charge_entry_id)
  FROM fault_acked a
  LEFT JOIN billing.jobs j ON j.tenant_id = a.tenant AND j.job_id::text = a.ref
 WHERE a.kind ~ 'complete\$'
   AND (j.state IS DISTINCT FROM 'completed' OR j.actual_micros <> a.amount * 1000000
        OR j.charge_entry_id IS DISTINCT FROM a.entry_id)"
sql_check "acknowledged final fails are failed jobs" "
SELECT format('fail %s job %s: acked %s, job %s', a.tenant, a.ref, a.status, j.state)
  FROM fault_acked a LEFT JOIN billing.jobs j ON j.tenant_id = a.tenant AND j.job_id::text = a.ref
 WHERE a.kind = 'fail' AND a.status = 'failed' AND j.state IS DISTINCT FROM 'failed'"
sql_check "no job completed without its job:<id>:charge entry (= -actual cost, = charge_entry_id)" "
SELECT format('%s job %s: actual %s charge_entry_id %s; entry %s kind %s amount %s', j.tenant_id, j.job_id,
              billing.to_amount(j.actual_micros), j.charge_entry_id, e.entry_id, e.kind, billing.to_amount(e.amount_micros))
  FROM billing.jobs j
  LEFT JOIN billing.entries e ON e.tenant_id = j.tenant_id AND e.trace_id = 'job:' || j.job_id || ':charge'
 WHERE j.state = 'completed'
   AND (j.actual_micros IS NULL OR (j.actual_micros > 0 AND (e.entry_id IS NULL OR e.entry_id IS DISTINCT FROM j.charge_entry_id
        OR e.amount_micros <> -j.actual_micros OR e.kind NOT IN ('capture', 'deduct'))))
UNION ALL
SELECT format('%s job %s is %s but has a charge entry %s', j.tenant_id, j.job_id, j.state, e.entry_id)
  FROM billing.jobs j
  JOIN billing.entries e ON e.tenant_id = j.tenant_id AND e.trace_id = 'job:' || j.job_id || ':charge'
 WHERE j.state <> 'completed'"
sql_check "no failed/cancelled/completed job with an open hold" "
SELECT format('%s job %s is %s; hold %s open until %s', j.tenant_id, j.job_id, j.state, h.trace_id, h.expires_at)
  FROM billing.jobs j
  JOIN billing.holds h ON h.tenant_id = j.tenant_id AND h.trace_id LIKE 'job:' || j.job_id || ':%'
 WHERE j.state IN ('failed', 'cancelled', 'completed') AND h.status = 'open' AND h.expires_at > now()"
sql_check "job_events form an unbroken chain per job, ending in the job's state" "
SELECT format('%s job %s: %s', tenant_id, job_id, problem) FROM (
  SELECT tenant_id, job_id, problem FROM (
    SELECT e.tenant_id, e.job_id,
           format('event %s: from %s, but the previous event went to %s', e.event_id, e.from_state,
                  lag(e.to_state) OVER w) AS problem,
           e.from_state IS DISTINCT FROM lag(e.to_state) OVER w AS bad
      FROM billing.job_events e WINDOW w AS (PARTITION BY e.tenant_id, e.job_id ORDER BY e.event_id)) x
   WHERE bad
  UNION ALL
  SELECT j.tenant_id, j.job_id, format('state %s, last event to %s', j.state, l.to_state)
    FROM billing.jobs j
    LEFT JOIN LATERAL (SELECT to_state FROM billing.job_events e WHERE e.tenant_id = j.tenant_id AND e.job_id = j.job_id
                        ORDER BY e.event_id DESC LIMIT 1) l ON true
   WHERE l.to_state IS DISTINCT FROM j.state) y ORDER BY 1"
info "jobs: $(q -c "SELECT string_agg(state || '=' || n, ' ' ORDER BY state) FROM (SELECT state, count(*) AS n FROM billing.jobs GROUP BY state) x")"

# ---------------------------------------------------------------------------
# Redis vs the database
# ---------------------------------------------------------------------------
echo "# Redis vs the database"
if wait_until "$FAULT_CONVERGE" converged; then
	ok "Redis equals the database (converged $(($(now_ms) - load_done_ms)) ms after the load ended, $(($(now_ms) - last_fault_ms)) ms after the last fault)"
else
	not_ok "Redis equals the database within $FAULT_CONVERGE s after the load (not converged after ${WAITED_MS} ms)" \
		"diff database (<) vs redis (>):" \
		"$(diff <(echo "$CONV_DB") <(echo "$CONV_REDIS") | head -n 20 || true)" \
		"sync status: $(q -c "SELECT row_to_json(s) FROM billing_sync_status() s" 2>&1)"
fi
# the sampled Redis versions: never backwards, never ahead of the database
samples=$(wc -l <"$W/redis_versions")
dbv=$(q -c "SELECT string_agg(version::text, ' ' ORDER BY tenant_id) FROM billing.accounts WHERE tenant_id ~ '^f[0-9]{2}\$'")
vio=$(awk -v db="$dbv" -v t0="$load_start_ms" '
	BEGIN { n = split(db, dbv, " ") }
	{
		for (i = 2; i <= NF; i++) {
			if ($i == "-") continue
			v = $i + 0
			if ((i in last) && v < last[i])
				printf "f%02d: Redis version %d at %.1f s, then %d at %.1f s\n", i - 1, last[i], (at[i] - t0) / 1000, v, ($1 - t0) / 1000
			if (v > dbv[i - 1] + 0)
				printf "f%02d: Redis showed version %d at %.1f s; the database has %d\n", i - 1, v, ($1 - t0) / 1000, dbv[i - 1]
			last[i] = v; at[i] = $1
		}
	}' "$W/redis_versions" | sort -u)
if ((samples < 10)); then
	not_ok "Redis was sampled during the load (only $samples samples)"
elif [[ -z $vio ]]; then
	ok "Redis versions never went backwards and never ran ahead of the database ($samples samples of $TENANTS tenants)"
else
	not_ok "Redis versions never went backwards and never ran ahead of the database ($samples samples)" "$(head -n 15 <<<"$vio")"
fi

# ---------------------------------------------------------------------------
# our server log: only the crashes we caused
# ---------------------------------------------------------------------------
echo "# server log"
# workers that exited because fault_test did not exist yet (the worker starts
# with the cluster, before CREATE DATABASE; README: FATAL, restart every 5 s)
mapfile -t nodb_pids < <(sed -n 's/^.* \[\([0-9]*\)\] FATAL:  database "fault_test" does not exist$/\1/p' "$pglog")
unexpected_log=$(grep -E 'terminated by signal|exited with exit code|terminated by exception|PANIC' "$pglog" | while IFS= read -r l; do
	if [[ $l =~ \(PID\ ([0-9]+)\)\ was\ terminated\ by\ signal\ 9: ]] && [[ " ${killed_pids[*]} " == *" ${BASH_REMATCH[1]} "* ]]; then
		continue
	fi
	if [[ $l =~ background\ worker\ \"billing\ sync\"\ \(PID\ ([0-9]+)\)\ exited\ with\ exit\ code\ 1 ]] &&
		[[ " ${termed_pids[*]} ${nodb_pids[*]} " == *" ${BASH_REMATCH[1]} "* ]]; then
		continue
	fi
	echo "$l"
done || true)
check "no crash in our server log that we did not cause (kill -9'd: ${killed_pids[*]:-none}; terminated: ${termed_pids[*]:-none})" \
	"" "$unexpected_log"
recoveries=$(grep -c 'all server processes terminated; reinitializing' "$pglog" || true)
kills=$(grep -cE '^(backend_kill|worker_kill9)$' "$W/faults" || true)
check "every kill -9 fault made the postmaster reinitialize (crash recovery)" "$kills" "$recoveries"

# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------
info "entries checked: $(q -c "SELECT count(*) FROM fault_acked WHERE kind !~ '(claim|fail)\$'") acknowledgements against $(q -c 'SELECT count(*) FROM billing.entries') ledger entries, $(q -c 'SELECT count(*) FROM billing.rejections') rejections, $(q -c 'SELECT count(*) FROM billing.hold_events') hold events, $(q -c 'SELECT count(*) FROM billing.jobs') jobs"
info "acknowledged operations that failed first (lost connection) and were recovered: $(q -c "SELECT count(*) || ' (' || count(*) FILTER (WHERE replayed) || ' had committed before the connection was lost)' FROM fault_acked WHERE kind ~ '^recover_'")"
info "sync status: $(q -c "SELECT 'full_resyncs=' || full_resyncs || ' pushed=' || pushed || ' failed=' || failed || ' repaired=' || repaired FROM billing_sync_status()")"
info "faults injected: $injected; runtime $((SECONDS - started_at)) s"
tap_summary

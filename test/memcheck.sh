#!/usr/bin/env bash
# Memory-safety check of the C code under valgrind memcheck (NOT part of
# `make check`: it takes several minutes, see the end of this comment).
#
#   bash test/memcheck.sh
#
# 1. build + install (like test/run.sh), start a throwaway cluster + redis
#    with test/cluster.sh (preloaded, so the Redis worker runs too), stop its
#    postgres and start it again on the same data directory with
#    `pg_ctl -p <wrapper>`, the wrapper exec'ing valgrind on the real postgres:
#    the postmaster and every backend / background worker it forks run under
#    memcheck, each logging to $BILLING_TMP/valgrind/vg.<pid>.log;
# 2. the pg_regress suite (sql/) and the isolation specs (test/isolation/);
# 3. replays and rejections whose stored request is large (6 kB of metadata):
#    see "edges" below for why the suites alone cannot show those paths' errors;
# 4. a short Redis-mirror workload in database memcheck_sync (the worker's
#    billing.database): pushes, API-key hashes, hold expiry by the
#    maintenance, FLUSHALL (full resync), a hand-edited hash (consistency
#    check repair), a Redis outage, a reload with new Redis settings and a
#    terminated worker, events crossing low-balance thresholds (sent again
#    after the FLUSHALL, one tenant's stream key of another type meanwhile):
#    worker.c, sync.c and outbox.c run under memcheck too;
# 5. stop the cluster, then read every valgrind log: every error block is
#    counted; the blocks whose stack (or allocation / origin stack) is in
#    billing.so (a frame in src/*.c) are printed, grouped by error kind + first
#    billing frame.
#
# Pass rule: no valgrind error attributed to billing.so, no process killed by
# a signal, and the regression suites pass. Stock Debian postgres is not built
# with USE_VALGRIND, so postgres itself reports some errors of its own
# (uninitialised padding written to WAL/disk, ...); they are counted and
# summarised but do not fail the run. Beware what memcheck cannot see on such
# a build: palloc() carves chunks out of big malloc'ed blocks, so an overrun
# or a use-after-pfree that stays inside a memory-context block is invisible
# (reads of never-written palloc memory are still reported), and overruns of
# stack arrays are never seen by memcheck.
#
# Exit 0 = pass, 1 = fail. Takes ~10-30 min on 2 cores (everything runs
# ~20-50x slower under valgrind).
#
# Knobs: BILLING_TMP (default <test cluster dir>/memcheck), BILLING_PGPORT
# (54349), BILLING_REDIS_PORT (63819), MEMCHECK_KEEP_LOGS=1 (keep the logs
# of a passing run; a failing run always keeps them), MEMCHECK_SKIP_SUITES=1
# (skip the suites), MEMCHECK_SKIP_EDGES=1, MEMCHECK_SKIP_WORKER=1.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$here")
cluster=$here/cluster.sh
PGBIN=/usr/lib/postgresql/15/bin
cd "$repo"
t_start=$SECONDS

if [[ -z ${BILLING_TMP:-} ]]; then
	BILLING_TMP=$(unset BILLING_PGPORT BILLING_REDIS_PORT; eval "$(bash "$cluster" env)"; echo "$BILLING_TMP")/memcheck
fi
export BILLING_TMP BILLING_PGPORT=${BILLING_PGPORT:-54349} BILLING_REDIS_PORT=${BILLING_REDIS_PORT:-63819}
export BILLING_PRELOAD=1
# The worker mirrors memcheck_sync only: it idles (extension not installed
# there) while the suites run in their own databases, as under `make check`.
# autovacuum off: its workers would only add valgrind time and postgres noise.
export BILLING_EXTRA_CONF="shared_buffers = 32MB
autovacuum = off
billing.database = 'memcheck_sync'
billing.redis_host = '127.0.0.1'
billing.redis_port = $BILLING_REDIS_PORT
billing.check_interval = 3
billing.maintenance_interval = 300"
unset PGDATABASE PGOPTIONS PGSERVICE
eval "$(bash "$cluster" env)" # PGHOST, PGPORT, PGDATA of our cluster
pglog=$BILLING_TMP/postgres.log
vgdir=$BILLING_TMP/valgrind
suppfile=$here/valgrind.supp

say() { echo "memcheck: $*"; }
elapsed() { echo "$((SECONDS - t_start)) s"; }

cleanup() {
	local rc=$?
	bash "$cluster" pg_ctl stop -m immediate -w -t 120 >/dev/null 2>&1 || true
	bash "$cluster" stop >/dev/null 2>&1 || true
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- valgrind itself -------------------------------------------------------
if ! command -v valgrind >/dev/null 2>&1; then
	if ((EUID == 0)); then
		say "installing valgrind"
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends valgrind </dev/null >/dev/null ||
			{ apt-get update </dev/null >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends valgrind </dev/null >/dev/null; }
	else
		say "valgrind is missing: apt-get install valgrind" >&2
		exit 1
	fi
fi

bash "$here/deps.sh"
make -s
make -s install

# --- the cluster -----------------------------------------------------------
rm -f "$pglog"
bash "$cluster" start
bash "$cluster" pg_ctl stop -m fast -w -t 60 >/dev/null

rm -rf "$vgdir"
mkdir -p "$vgdir"
if ((EUID == 0)); then chown postgres:postgres "$vgdir"; fi
vgopts=(--quiet --trace-children=yes --track-origins=yes --num-callers=30
	--fullpath-after= --leak-check=no --error-limit=no
	--log-file="$vgdir/vg.%p.log")
if [[ -f $suppfile ]]; then vgopts+=(--suppressions="$suppfile"); fi
{
	echo '#!/bin/sh'
	echo "# postgres under valgrind memcheck (written by test/memcheck.sh)"
	printf 'exec valgrind'
	printf ' %q' "${vgopts[@]}" "$PGBIN/postgres"
	printf ' "$@"\n'
} >"$vgdir/postgres"
chmod 0755 "$vgdir/postgres"

say "starting postgres under valgrind ($(valgrind --version)), logs in $vgdir"
if ! bash "$cluster" pg_ctl start -w -t 600 -p "$vgdir/postgres" >/dev/null; then
	tail -n 40 "$pglog" >&2 || true
	say "postgres did not start under valgrind" >&2
	exit 1
fi
pm_pid=$(head -n1 "$PGDATA/postmaster.pid")
if [[ $(readlink "/proc/$pm_pid/exe") != *memcheck* ]]; then
	say "the postmaster (pid $pm_pid) does not run under memcheck: $(readlink "/proc/$pm_pid/exe")" >&2
	exit 1
fi
say "postmaster pid $pm_pid runs under memcheck ($(elapsed))"

# --- the suites ------------------------------------------------------------
suite_failures=()
# run_regress LABEL PROGRAM INPUTDIR OUTPUTDIR DBNAME TEST... (as in test/run.sh)
run_regress() {
	local label=$1 prog=$2 indir=$3 outdir=$4 db=$5 rc=0 t0=$SECONDS
	shift 5
	rm -rf "$outdir"
	mkdir -p "$outdir"
	say "$label: $*"
	"$prog" --bindir="$PGBIN" --host="$PGHOST" --port="$PGPORT" --user=postgres \
		--inputdir="$indir" --outputdir="$outdir" --dbname="$db" --no-locale \
		"$@" 2>&1 </dev/null | tee "$outdir/run.log" || rc=$?
	if ((rc != 0)) || grep -qE '\.\.\. +FAILED|^not ok ' "$outdir/run.log"; then
		suite_failures+=("$label (see $outdir/regression.diffs)")
		if [[ -f $outdir/regression.diffs ]]; then
			say "$label: first 100 lines of $outdir/regression.diffs"
			head -n 100 "$outdir/regression.diffs"
		fi
	fi
	say "$label took $((SECONDS - t0)) s"
}
names() {
	[[ -d $1 ]] || return 0
	find "$1" -maxdepth 1 -type f -name "*.$2" -printf '%f\n' | sed "s/\.$2\$//" | sort
}
pgxs_dir=$(dirname "$("$PGBIN/pg_config" --pgxs)")

if [[ ${MEMCHECK_SKIP_SUITES:-0} != 1 ]]; then
	mapfile -t tests < <(names sql sql)
	run_regress pg_regress "$pgxs_dir/../test/regress/pg_regress" "$repo" \
		"$BILLING_TMP/regress" contrib_regression "${tests[@]}"
	mapfile -t tests < <(names test/isolation/specs spec)
	run_regress pg_isolation_regress "$pgxs_dir/../test/isolation/pg_isolation_regress" \
		"$repo/test/isolation" "$BILLING_TMP/isolation" isolation_regression "${tests[@]}"
fi

# --- replays and rejections with large stored values -------------------------
# The suites use small values, so everything a C function allocates between
# SPI_connect() and SPI_finish() fits in the first block of the SPI memory
# context; on this (non-USE_VALGRIND) build a read of that memory after
# SPI_finish() cannot be seen, because the block stays allocated (the
# context is kept for reuse). Here the replayed request carries ~6 kB of
# metadata, which the replay check detoasts inside SPI: the context grows a
# second block, which SPI_finish() really frees, so a result that still
# points into SPI memory becomes an invalid read valgrind reports.
if [[ ${MEMCHECK_SKIP_EDGES:-0} != 1 ]]; then
	t0=$SECONDS
	say "edges: replays and rejections with 6 kB of metadata (database memcheck_edges)"
	bash "$cluster" psql -d postgres -qc 'CREATE DATABASE memcheck_edges' </dev/null
	edges_out=$BILLING_TMP/edges.out
	if ! bash "$cluster" psql -d memcheck_edges -a >"$edges_out" 2>&1 <<-'EOF'
		CREATE EXTENSION billing;
		CREATE FUNCTION pg_temp.big() RETURNS jsonb LANGUAGE sql
		    AS $$ SELECT jsonb_build_object('blob', repeat('x', 6000)) $$;
		SELECT tenant_id FROM billing_account_create('edge');
		SELECT balance_after FROM billing_credit('edge', 100, 'edge-topup');
		-- a deduct and its replay
		SELECT kind, amount, replayed FROM billing_deduct('edge', 1, 'edge-d1', metadata => pg_temp.big());
		SELECT kind, amount, replayed FROM billing_deduct('edge', 1, 'edge-d1', metadata => pg_temp.big());
		-- a recorded rejection and its replay
		SELECT status, replayed, sqlstate, reason FROM billing_try_deduct('edge', 1000, 'edge-r1', metadata => pg_temp.big());
		SELECT status, replayed, sqlstate, reason FROM billing_try_deduct('edge', 1000, 'edge-r1', metadata => pg_temp.big());
		SELECT kind, replayed FROM billing_deduct('edge', 1, 'edge-d2', metadata => pg_temp.big());
		SELECT kind, replayed FROM billing_deduct('edge', 1, 'edge-d2', metadata => pg_temp.big());
		-- the batch API: replays and rejections
		SELECT status, replayed, kind, sqlstate
		  FROM billing_deduct_many(ARRAY['edge', 'edge', 'edge'], ARRAY[1, 1000, 1]::numeric[],
		                           ARRAY['edge-d1', 'edge-r1', 'edge-d2'],
		                           metadata => ARRAY[pg_temp.big(), pg_temp.big(), pg_temp.big()],
		                           on_reject => 'record');
		-- a hold, its replay, a capture and its replay, a release and its replay
		SELECT status, amount, replayed FROM billing_hold('edge', 5, 'edge-h1', metadata => pg_temp.big());
		SELECT status, amount, replayed FROM billing_hold('edge', 5, 'edge-h1', metadata => pg_temp.big());
		SELECT hold_status, amount, replayed FROM billing_capture('edge', 'edge-h1', 2, 'edge-c1', metadata => pg_temp.big());
		SELECT hold_status, amount, replayed FROM billing_capture('edge', 'edge-h1', 2, 'edge-c1', metadata => pg_temp.big());
		SELECT status, released, replayed FROM billing_release('edge', 'edge-h1', 'edge-rel1');
		SELECT status, released, replayed FROM billing_release('edge', 'edge-h1', 'edge-rel1');
		-- where a result lands in SPI memory depends on what was allocated before
		-- it: the same calls with tenant ids of several lengths
		DO $$
		DECLARE
		    t text;
		    r record;
		BEGIN
		    FOR len IN 8..248 BY 16 LOOP
		        t := 'e' || repeat('x', len);
		        PERFORM billing_account_create(t);
		        PERFORM billing_credit(t, 100, t || '-topup');
		        FOR i IN 1..2 LOOP
		            SELECT * INTO r FROM billing_deduct(t, 1, t || '-d', metadata => pg_temp.big());
		            SELECT * INTO r FROM billing_try_deduct(t, 1000, t || '-r', metadata => pg_temp.big());
		            SELECT * INTO r FROM billing_hold(t, 5, t || '-h', metadata => pg_temp.big());
		            SELECT * INTO r FROM billing_capture(t, t || '-h', 1, t || '-c', metadata => pg_temp.big());
		            IF i = 1 THEN  -- the second round replays; an extend does not
		                SELECT * INTO r FROM billing_hold_extend(t, t || '-h', '1 hour');
		            END IF;
		            SELECT * INTO r FROM billing_release(t, t || '-h', t || '-rel');
		        END LOOP;
		    END LOOP;
		END
		$$;
		SELECT count(*) AS inconsistent FROM billing_verify();
	EOF
	then
		suite_failures+=("edges: psql failed (see $edges_out)")
	fi
	say "edges took $((SECONDS - t0)) s (output in $edges_out)"
fi

# --- the Redis mirror (worker.c, sync.c) -----------------------------------
q() { bash "$cluster" psql -d memcheck_sync -qAt "$@" </dev/null; }
rcli() { redis-cli -h 127.0.0.1 -p "$BILLING_REDIS_PORT" "$@" </dev/null; }
st() { q -c "SELECT $1 FROM billing_sync_status()"; }
wait_for() { # wait_for SECONDS SQL-CONDITION-ON-billing_sync_status()
	local deadline=$((SECONDS + $1))
	until [[ $(st "($2)" 2>/dev/null) == t ]]; do
		if ((SECONDS >= deadline)); then
			say "worker: timed out waiting for: $2 (status: $(st "'pushed=' || pushed || ' dirty=' || dirty_accounts || ' connected=' || connected || ' last_error=' || coalesce(last_error, '-')" 2>&1))"
			# the step that needed it did not run under valgrind: that is a
			# failure of this run, not a pass (carry on: valgrind still reads
			# what did run)
			suite_failures+=("worker workload: timed out after $1 s waiting for: $2")
			return 0
		fi
		sleep 1
	done
}
converge() { wait_for "${1:-120}" "connected AND dirty_accounts = 0 AND NOT full_resync_pending AND lag < interval '1 second'"; }

if [[ ${MEMCHECK_SKIP_WORKER:-0} != 1 ]]; then
t0=$SECONDS
say "worker: Redis-mirror workload in database memcheck_sync"
bash "$cluster" psql -d postgres -qc 'CREATE DATABASE memcheck_sync' </dev/null
q -c 'CREATE EXTENSION billing'
wait_for 120 "connected AND full_resyncs > 0"
q -c "SELECT count(*) FROM generate_series(1, 20) AS i, LATERAL billing_account_create('m-' || i, timezone => 'Europe/Berlin')" \
	-c "SELECT count(*) FROM generate_series(1, 20) AS i, LATERAL billing_credit('m-' || i, 1000, 'm-' || i || '-topup')" \
	-c "SELECT count(*) FROM billing_limits_set('m-1', daily_requests => 1000, monthly_spend => 500, max_charge => 50)" \
	-c "SELECT count(*) FROM billing_api_key_create('m-1', 'k1', 100, 'day')" \
	-c "SELECT count(*) FROM billing_api_key_create('m-2', 'k2')" \
	-c "SELECT count(*) FROM generate_series(1, 20) AS i, LATERAL billing_alerts_set('m-' || i, low_balance => 999.9)" >/dev/null
# deducts in many small transactions (the worker wakes per commit) and in batches
for i in $(seq 1 30); do
	q -c "SELECT count(*) FROM billing_deduct('m-$((i % 20 + 1))', 0.5, 'm-d-$i')" >/dev/null
done
q -c "SELECT count(*) FROM (SELECT array_agg('m-' || (i % 20 + 1)) AS t, array_agg(0.01::numeric) AS a, array_agg('m-b-' || i) AS tr
                              FROM generate_series(1, 200) AS i) AS b,
                       LATERAL billing_deduct_many(b.t, b.a, b.tr, on_reject => 'record')" >/dev/null
q -c "SELECT count(*) FROM billing_deduct('m-1', 1, 'm-key-1', metadata => '{\"api_key\": \"k1\"}')" >/dev/null 2>&1 || true
q -c "SELECT count(*) FROM billing_hold('m-3', 5, 'm-h1', expires_in => '1 second')" \
	-c "SELECT count(*) FROM billing_hold('m-4', 5, 'm-h2')" \
	-c "SELECT count(*) FROM billing_capture('m-4', 'm-h2', 2, 'm-h2-c1', final => true)" >/dev/null
converge
# the maintenance marks m-h1 expired (its row; the views left it out at once)
wait_for 120 "EXISTS (SELECT 1 FROM billing.holds WHERE trace_id = 'm-h1' AND status = 'expired')"
say "worker: FLUSHALL (full resync; the events sent again, one tenant's stream key of another type meanwhile)"
rcli FLUSHALL >/dev/null
rcli SET 'billing:{m-2}:events' 'not a stream' >/dev/null
q -c "SELECT count(*) FROM billing_deduct('m-5', 0.25, 'm-after-flush')" >/dev/null
q -c "SELECT count(*) FROM billing_deduct('m-2', 0.25, 'm-2-after-flush')" >/dev/null
converge
sleep 2
rcli DEL 'billing:{m-2}:events' >/dev/null
wait_for 120 "events_backlog = 0 AND events_delivered > 0"
say "worker: a hand-edited hash (repair by the consistency check)"
rcli HSET 'billing:{m-6}' balance 1 >/dev/null
wait_for 60 "repaired > 0"
say "worker: Redis outage"
bash "$cluster" redis-stop >/dev/null
for i in $(seq 1 5); do
	q -c "SELECT count(*) FROM billing_deduct('m-7', 0.1, 'm-outage-$i')" >/dev/null
done
wait_for 60 "NOT connected AND failed > 0"
sleep 2
bash "$cluster" redis-start >/dev/null
converge
say "worker: reload with a new Redis setting (reconnect + resync)"
q -c "ALTER SYSTEM SET billing.redis_prefix = 'bill2'" -c 'SELECT pg_reload_conf()' >/dev/null
q -c "SELECT count(*) FROM billing_deduct('m-8', 0.1, 'm-reload')" >/dev/null
# the new prefix is filled from scratch: an account nobody charged since
# appears under it (a resync of the old prefix would not put it there)
deadline=$((SECONDS + 120))
until [[ $(rcli EXISTS 'bill2:{m-20}' 2>/dev/null) == 1 ]]; do
	if ((SECONDS >= deadline)); then
		say "worker: timed out waiting for the resync under the new prefix"
		suite_failures+=("worker workload: timed out after 120 s waiting for bill2:{m-20}")
		break
	fi
	sleep 1
done
converge
say "worker: terminated (the postmaster restarts it after 5 s)"
old_pid=$(st worker_pid)
q -c 'SELECT pg_terminate_backend(worker_pid) FROM billing_sync_status()' >/dev/null
wait_for 120 "connected AND worker_pid IS DISTINCT FROM ${old_pid:-0}"
q -c "SELECT count(*) FROM billing_deduct('m-9', 0.1, 'm-after-restart')" >/dev/null
converge
say "worker: $(st "'pushed=' || pushed || ' full_resyncs=' || full_resyncs || ' repaired=' || repaired || ' failed=' || failed || ' dirty=' || dirty_accounts") ($((SECONDS - t0)) s)"
if [[ -n $(q -c 'SELECT tenant_id FROM billing_verify()') ]]; then
	suite_failures+=("worker workload: billing_verify() reports inconsistencies")
fi
fi

# --- stop, then read the logs ----------------------------------------------
say "stopping the cluster ($(elapsed))"
bash "$cluster" pg_ctl stop -m fast -w -t 600 >/dev/null || {
	say "fast shutdown did not finish in 600 s; immediate" >&2
	bash "$cluster" pg_ctl stop -m immediate -w -t 120 >/dev/null || true
}
bash "$cluster" stop >/dev/null 2>&1 || true

crashes=$(grep -E 'terminated by signal|was terminated by exception' "$pglog" | grep -v 'billing sync.* signal 15' || true)

# Every error block of every log: total, and those with a frame of ours.
srcre=$(find src -maxdepth 1 -name '*.c' -printf '%f\n' | sed 's/\.c$//' | paste -sd'|')
report=$BILLING_TMP/memcheck-report.txt
rm -f "$report" # awk writes it only when there is something to report
awk -v srcre="/src/($srcre)\\.c:[0-9]+" -v report="$report" '
	function flush(   sig) {
		if (n > 0 && frames) {
			total++
			# errors inside postgres connecting the worker (it writes the
			# relcache init file with uninitialised padding) are postgres
			# noise: billing only appears as the caller of its startup.
			# So are errors under a utility statement whose only billing
			# frame is our ProcessUtility hook handing it on to
			# standard_ProcessUtility (postgres writes WAL with padding
			# of its own at COMMIT PREPARED and after a DROP): see below.
			if (ours && !pginit) {
				attributed++
				sig = kind " @ " first
				if (!(sig in seen)) { order[++nsig] = sig; example[sig] = FILENAME "\n" blk }
				seen[sig]++
			}
		}
		n = 0; frames = 0; ours = 0; pginit = 0; blk = ""; kind = ""; first = ""
	}
	FNR == 1 { flush() }
	{
		if (!match($0, /^==[0-9]+== ?/)) next
		body = substr($0, RLENGTH + 1)
		if (body ~ /^[ \t]*$/) { flush(); next }
		if (n == 0 && body ~ /^(Warning|WARNING)/) next # one-line notes, not errors
		if (n == 0) kind = body
		n++
		blk = blk "    " body "\n"
		if (body ~ /^ +(at|by) 0x/) frames++
		if (index(body, "BackgroundWorkerInitializeConnection") && !ours) pginit = 1
		if ((index(body, "billing.so") || body ~ srcre) &&
			!(body ~ /engine_process_utility/ && prev ~ /standard_ProcessUtility/)) {
			if (!ours) { first = body; sub(/^ +(at|by) 0x[0-9A-Fa-f]+: /, "", first) }
			ours = 1
		}
		prev = body
		if (body ~ /^Process terminating/) killed = killed FILENAME ": " body "\n"
	}
	END {
		flush()
		printf "%d %d\n", total + 0, attributed + 0
		for (i = 1; i <= nsig; i++) {
			s = order[i]
			printf "=== %dx  %s\n%s\n", seen[s], s, example[s] > report
		}
		if (killed != "") printf "=== processes killed by a signal under valgrind:\n%s", killed > report
	}' "$vgdir"/vg.*.log >"$BILLING_TMP/memcheck-counts.txt"
read -r total attributed <"$BILLING_TMP/memcheck-counts.txt"
nlogs=$(find "$vgdir" -name 'vg.*.log' | wc -l)

echo
say "valgrind logs: $nlogs processes, $total error blocks in total, $attributed attributed to billing.so"
# a short summary of postgres' own noise, by error kind
if ((total > attributed)); then
	say "error kinds over all logs (postgres' own included):"
	sed -n 's/^==[0-9]*== \([A-Z][a-z].*\)$/\1/p' "$vgdir"/vg.*.log |
		grep -vE '^(Warning|Process terminating|Uninitialised value was created|Address 0x|Block was alloc|HEAP|For lists|ERROR SUMMARY)' |
		sed 's/ of size [0-9]*//; s/([^)]*)$//' | sort | uniq -c | sort -rn | head -n 15 | sed 's/^/    /'
fi
failed=0
if ((attributed > 0)); then
	say "errors attributed to billing.so, by kind @ first billing frame (the frame may be in the"
	say "stack that allocated or freed the memory); one example of each follows the list:"
	grep '^=== ' "$report"
	echo
	cat "$report"
	failed=1
elif [[ -s $report ]]; then
	cat "$report"
	failed=1
fi
if [[ -n $crashes ]]; then
	say "processes terminated by a signal (from $pglog):"
	printf '%s\n' "$crashes"
	failed=1
fi
if ((${#suite_failures[@]})); then
	printf 'memcheck: FAILED: %s\n' "${suite_failures[@]}"
	failed=1
fi
say "runtime $(elapsed)"
if ((failed)); then
	say "FAIL (logs kept in $vgdir)"
	exit 1
fi
if [[ ${MEMCHECK_KEEP_LOGS:-0} != 1 ]]; then
	rm -rf "$vgdir"
fi
say "PASS: no valgrind error in billing.so"

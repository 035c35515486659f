#!/usr/bin/env bash
# Whole test suite for the billing extension; `make check` runs this.
#   1. install missing Debian packages (test/deps.sh), build and install
#   2. start a throwaway postgres + redis (test/cluster.sh)
#   3. pg_regress (sql/*.sql), pg_isolation_regress (test/isolation/specs),
#      then every executable test/t/*.sh
# The last line of output is always "N passed, N failed"; exit 1 on failure.
# Knobs: BILLING_KEEP=1 leaves the cluster running afterwards,
# BILLING_T_TIMEOUT (seconds per test/t script, default 900), plus the
# BILLING_* knobs of test/cluster.sh.
set -euo pipefail

here=$(cd "$(dirname "$(realpath "${BASH_SOURCE[0]}")")" && pwd)
repo=$(dirname "$here")
cd "$repo"
PGBIN=/usr/lib/postgresql/15/bin

passed=0 failed=0 failures=() finished=0
fail() { failed=$((failed + 1)); failures+=("$1"); }

# Always stop the cluster and end with the summary line, even on an abort.
on_exit() {
	local rc=$?
	if [[ ${BILLING_KEEP:-0} != 1 ]]; then
		bash "$here/cluster.sh" stop >/dev/null 2>&1 || true
	fi
	if ((!finished)); then
		echo "run.sh: aborted (exit $rc) before the suite finished" >&2
		fail setup
		echo "$passed passed, $failed failed"
		exit 1
	fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

bash "$here/deps.sh"
make -s
make -s install

eval "$(bash "$here/cluster.sh" env)"
rm -f "$BILLING_TMP/postgres.log" # so the crash check only sees this run
bash "$here/cluster.sh" start

# run_regress LABEL PROGRAM INPUTDIR OUTPUTDIR DBNAME TEST...
# Runs pg_regress or pg_isolation_regress, echoing its output, and counts
# its per-test result lines.
run_regress() {
	local label=$1 prog=$2 indir=$3 outdir=$4 db=$5 rc=0 counts p f
	shift 5
	rm -rf "$outdir"
	mkdir -p "$outdir"
	echo "== $label: $*"
	"$prog" --bindir="$PGBIN" --host="$PGHOST" --port="$PGPORT" --user=postgres \
		--inputdir="$indir" --outputdir="$outdir" --dbname="$db" --no-locale \
		"$@" 2>&1 </dev/null | tee "$outdir/run.log" || rc=$?
	# PG15 lines: "test NAME ... ok  12 ms", "     NAME ... FAILED  12 ms",
	# "... failed (ignored)"; also accept the TAP style of PG16+.
	counts=$(awk '
		/^(test +| +)[^ ]+ +\.\.\. / {
			if (/\(ignored\)/) ok++
			else if (/\.\.\. +FAILED/) bad++
			else if (/\.\.\. +ok/) ok++
			next
		}
		/^ok [0-9]+ /     { ok++ }
		/^not ok [0-9]+ / { if (/# \(ignored\)/) ok++; else bad++ }
		END { print ok + 0, bad + 0 }' "$outdir/run.log")
	read -r p f <<<"$counts"
	passed=$((passed + p))
	((f == 0)) || failures+=("$label: $f test(s)")
	failed=$((failed + f))
	if ((rc != 0 && f == 0)); then
		echo "$label exited with status $rc without reporting a failed test"
		fail "$label (exit $rc)"
	fi
	if ((rc != 0 || f != 0)) && [[ -f $outdir/regression.diffs ]]; then
		echo "== $label: first 300 lines of $outdir/regression.diffs"
		head -n 300 "$outdir/regression.diffs"
	fi
}

# names DIR EXT -- sorted basenames of DIR/*.EXT
names() {
	[[ -d $1 ]] || return 0
	find "$1" -maxdepth 1 -type f -name "*.$2" -printf '%f\n' | sed "s/\.$2\$//" | LC_ALL=C sort
}

pgxs_dir=$(dirname "$("$PGBIN/pg_config" --pgxs)")

# a. pg_regress
mapfile -t tests < <(names sql sql)
if ((${#tests[@]})); then
	run_regress pg_regress "$pgxs_dir/../test/regress/pg_regress" "$repo" \
		"$BILLING_TMP/regress" contrib_regression "${tests[@]}"
fi

# b. pg_isolation_regress
mapfile -t tests < <(names test/isolation/specs spec)
if ((${#tests[@]})); then
	run_regress pg_isolation_regress "$pgxs_dir/../test/isolation/pg_isolation_regress" \
		"$repo/test/isolation" "$BILLING_TMP/isolation" isolation_regression "${tests[@]}"
fi

# c. integration / fault scripts, with the cluster environment exported
mkdir -p "$BILLING_TMP/t"
for t in test/t/*.sh; do
	[[ -f $t && -x $t ]] || continue
	name=$(basename "$t" .sh)
	log=$BILLING_TMP/t/$name.log
	started=$SECONDS
	if timeout -k 10 "${BILLING_T_TIMEOUT:-900}" "$repo/$t" >"$log" 2>&1 </dev/null; then
		echo "t/$name ... ok ($((SECONDS - started)) s)"
		passed=$((passed + 1))
	else
		rc=$?
		why="exit $rc"
		if ((rc == 124)); then why="timed out"; fi
		echo "t/$name ... FAILED ($why, $((SECONDS - started)) s); last 60 lines of $log:"
		tail -n 60 "$log"
		fail "t/$name"
	fi
done

# Did any backend or worker crash during the run?
if crashes=$(grep -E 'terminated by signal|server process .* was terminated' "$BILLING_TMP/postgres.log"); then
	echo "server-crash-check ... FAILED; from $BILLING_TMP/postgres.log:"
	printf '%s\n' "$crashes"
	fail server-crash-check
fi

if ((${#failures[@]})); then
	printf 'FAILED: %s\n' "${failures[@]}"
fi
finished=1
echo "$passed passed, $failed failed"
((failed == 0))
